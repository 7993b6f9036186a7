//! Cheap checks on a model path before llama.cpp sees it, so that the common mistakes get a
//! precise message instead of llama.cpp's generic failure.

#![forbid(unsafe_code)]

use std::io::Read;
use std::path::Path;

use crate::error::{Error, Result};

pub fn check_model_file(path: &Path) -> Result<()> {
    use gguf_tools::safe_io::{open_input, FileError};
    // A FIFO would block llama.cpp's open, a directory is no "not a GGUF" file.
    let mut file = open_input(path).map_err(|e| match e {
        FileError::Read { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
            Error::ModelMissing {
                path: path.to_path_buf(),
            }
        }
        other => Error::File(other),
    })?;
    let mut magic = [0u8; 4];
    if file.read_exact(&mut magic).is_err() || &magic != b"GGUF" {
        return Err(Error::NotGguf {
            path: path.to_path_buf(),
        });
    }
    Ok(())
}

/// Reads the GGUF header with gguf-tools' reader and refuses what llama.cpp would abort on
/// (see [`gguf_tools::model::check_loadable`]): llama.cpp checks most of these with
/// `GGML_ASSERT`, which ends the process instead of returning an error.
pub fn check_hyperparameters(path: &Path) -> Result<()> {
    let file = gguf_tools::gguf::read(path).map_err(|source| Error::Gguf {
        path: path.to_path_buf(),
        source,
    })?;
    gguf_tools::model::check_loadable(&file).map_err(|source| Error::Unloadable {
        path: path.to_path_buf(),
        source,
    })
}
