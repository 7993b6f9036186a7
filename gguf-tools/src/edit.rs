//! embed / strip / extract: rewrite a GGUF's metadata while copying its tensor data
//! verbatim. Tensor offsets are relative to the data section, so only the header changes;
//! the data section (including its inner padding) is streamed byte for byte.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use thiserror::Error;

use crate::filters::{FiltersError, QFilters, KEY_PREFIX, SOURCE_CALIBRATED};
use crate::gguf::{self, GgufError, GgufFile, Value};
use crate::model::{ModelError, ModelInfo};
use crate::progress::{bytes_bar, Throughput};
use crate::safe_io::{self, AtomicFile, FileError};

const COPY_CHUNK: usize = 1 << 20;

#[derive(Debug, Error)]
pub enum EditError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error(transparent)]
    Filters(#[from] FiltersError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    File(#[from] FileError),
    #[error("{0} already has qfilters.* keys; pass --force to replace them, or `gguf-tools strip` them first")]
    AlreadyHasFilters(PathBuf),
    #[error("{0} has no qfilters.* keys; embed filters first with `gguf-tools embed`")]
    NoFilters(PathBuf),
    #[error("cannot read {path}: {source}; check the path and permissions")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "cannot write {path}: {source}; check that the folder is writable and the disk is not full"
    )]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} changed size while it was being copied; make sure nothing else writes it and try again")]
    SourceChanged { path: PathBuf },
}

/// Adds the `qfilters.*` keys for the filters at `filters_path` to `model`, writing `out`.
pub fn embed(
    model: &Path,
    filters_path: &Path,
    out: &Path,
    force: bool,
    progress: bool,
) -> Result<(QFilters, Throughput), EditError> {
    let filters_file = crate::filters::resolve_file(filters_path)?;
    safe_io::check_output(out, &[model, &filters_file], false)?;
    let file = gguf::read(model)?;
    let filters = QFilters::load(filters_path)?;
    let [layers, heads, dim] = ModelInfo::from_gguf(&file)?.filter_shape()?;
    filters.check_shape(layers, heads, dim)?;
    if has_filters(&file) && !force {
        return Err(EditError::AlreadyHasFilters(model.to_path_buf()));
    }
    let source = if filters.source == SOURCE_CALIBRATED {
        SOURCE_CALIBRATED.to_string()
    } else {
        Path::new(&filters.source).file_name().map_or_else(
            || filters.source.clone(),
            |n| n.to_string_lossy().into_owned(),
        )
    };
    let mut metadata = without_filters(&file.metadata);
    metadata.extend(filters.to_metadata(&source)?);
    let stats = rewrite(model, &file, metadata, out, progress, "embed")?;
    Ok((filters, stats))
}

/// Removes exactly the `qfilters.*` keys, keeping everything else byte for byte.
pub fn strip(model: &Path, out: &Path, progress: bool) -> Result<Throughput, EditError> {
    safe_io::check_output(out, &[model], false)?;
    let file = gguf::read(model)?;
    if !has_filters(&file) {
        return Err(EditError::NoFilters(model.to_path_buf()));
    }
    let metadata = without_filters(&file.metadata);
    rewrite(model, &file, metadata, out, progress, "strip")
}

/// Writes the embedded filters in the published safetensors layout.
pub fn extract(model: &Path, out: &Path) -> Result<QFilters, EditError> {
    QFilters::check_save(out, &[model])?;
    let filters =
        QFilters::from_gguf(model)?.ok_or_else(|| EditError::NoFilters(model.to_path_buf()))?;
    filters.save(out)?;
    Ok(filters)
}

pub fn has_filters(file: &GgufFile) -> bool {
    file.metadata.iter().any(|(k, _)| k.starts_with(KEY_PREFIX))
}

fn without_filters(metadata: &[(String, Value)]) -> Vec<(String, Value)> {
    metadata
        .iter()
        .filter(|(k, _)| !k.starts_with(KEY_PREFIX))
        .cloned()
        .collect()
}

/// Errors if writing `out` would clobber `input` (same file through symlinks or hard links).
pub fn refuse_same_file(input: &Path, out: &Path) -> Result<(), EditError> {
    safe_io::check_output(out, &[input], false)?;
    Ok(())
}

/// Writes `file` with new metadata to `out` via `OUT.tmp`, streaming the data section.
fn rewrite(
    src_path: &Path,
    file: &GgufFile,
    metadata: Vec<(String, Value)>,
    out: &Path,
    progress: bool,
    label: &str,
) -> Result<Throughput, EditError> {
    let edited = GgufFile {
        metadata,
        ..file.clone()
    };
    write_via_tmp(out, |tmp| {
        write_tmp(src_path, file, &edited, tmp, out, progress, label)
    })
}

/// Writes `out` through a temporary file beside it (see [`safe_io::AtomicFile`]), renamed
/// only when `write` succeeded, so a failed or interrupted run never leaves a half-written
/// file under the final name and keeps the previous one.
pub(crate) fn write_via_tmp<E: From<FileError>>(
    out: &Path,
    write: impl FnOnce(&mut AtomicFile) -> Result<u64, E>,
) -> Result<Throughput, E> {
    let started = Instant::now();
    let mut tmp = AtomicFile::create(out)?;
    let bytes = write(&mut tmp)?;
    tmp.commit()?;
    Ok(Throughput {
        bytes,
        seconds: started.elapsed().as_secs_f64(),
    })
}

fn write_tmp(
    src_path: &Path,
    file: &GgufFile,
    edited: &GgufFile,
    w: &mut AtomicFile,
    out: &Path,
    progress: bool,
    label: &str,
) -> Result<u64, EditError> {
    let read_err = |source| EditError::Read {
        path: src_path.to_path_buf(),
        source,
    };
    let write_err = |source| EditError::Write {
        path: out.to_path_buf(),
        source,
    };
    let mut src = safe_io::open_input(src_path)?;
    src.seek(SeekFrom::Start(file.data_offset))
        .map_err(read_err)?;
    let header_len = edited.write_header(w).map_err(|e| match e {
        GgufError::Io(source) => write_err(source),
        other => EditError::Gguf(other),
    })?;

    let total = file.data_len();
    let bar = bytes_bar(progress, total, label);
    let mut buf = vec![0u8; COPY_CHUNK];
    let mut left = total;
    while left > 0 {
        let want = usize::try_from(left).map_or(COPY_CHUNK, |l| l.min(COPY_CHUNK));
        let chunk = buf.get_mut(..want).unwrap_or_default();
        let n = src.read(chunk).map_err(read_err)?;
        if n == 0 {
            return Err(EditError::SourceChanged {
                path: src_path.to_path_buf(),
            });
        }
        w.write_all(chunk.get(..n).unwrap_or_default())
            .map_err(write_err)?;
        left -= n as u64;
        bar.inc(n as u64);
    }
    bar.finish_and_clear();
    Ok(header_len + total)
}
