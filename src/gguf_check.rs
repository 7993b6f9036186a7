//! Cheap checks on a model path before llama.cpp sees it, so that the common mistakes get a
//! precise message instead of llama.cpp's generic failure.

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
