//! embed / strip / extract: rewrite a GGUF's metadata while copying its tensor data
//! verbatim. Tensor offsets are relative to the data section, so only the header changes;
//! the data section (including its inner padding) is streamed byte for byte.

use std::fs::{self, File};
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use thiserror::Error;

use crate::filters::{FiltersError, QFilters, KEY_PREFIX, SOURCE_CALIBRATED};
use crate::gguf::{self, GgufError, GgufFile, Value};
use crate::model::{ModelError, ModelInfo};
use crate::progress::{bytes_bar, Throughput};

const COPY_CHUNK: usize = 1 << 20;

#[derive(Debug, Error)]
pub enum EditError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error(transparent)]
    Filters(#[from] FiltersError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("output {output} is the input file; choose a different -o path")]
    SameFile { output: PathBuf },
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
    refuse_same_file(model, out)?;
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
    refuse_same_file(model, out)?;
    let file = gguf::read(model)?;
    if !has_filters(&file) {
        return Err(EditError::NoFilters(model.to_path_buf()));
    }
    let metadata = without_filters(&file.metadata);
    rewrite(model, &file, metadata, out, progress, "strip")
}

/// Writes the embedded filters in the published safetensors layout.
pub fn extract(model: &Path, out: &Path) -> Result<QFilters, EditError> {
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

/// `OUT.tmp`, next to the output so the final rename stays on one file system.
pub fn tmp_path(out: &Path) -> PathBuf {
    let mut name = out.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    out.with_file_name(name)
}

/// Errors if writing `out` (or its temporary file) would clobber `input`.
pub fn refuse_same_file(input: &Path, out: &Path) -> Result<(), EditError> {
    for candidate in [out.to_path_buf(), tmp_path(out)] {
        if same_file(input, &candidate) {
            return Err(EditError::SameFile {
                output: out.to_path_buf(),
            });
        }
    }
    Ok(())
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (fs::canonicalize(a), fs::canonicalize(b)) {
        (Ok(x), Ok(y)) if x == y => return true,
        (Ok(_), Ok(_)) => {}
        _ => return false,
    }
    // Hard links have different paths but are the same file.
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        if let (Ok(x), Ok(y)) = (fs::metadata(a), fs::metadata(b)) {
            return x.dev() == y.dev() && x.ino() == y.ino();
        }
    }
    false
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
    write_via_tmp(
        out,
        |tmp| write_tmp(src_path, file, &edited, tmp, progress, label),
        |source| EditError::Write {
            path: out.to_path_buf(),
            source,
        },
    )
}

/// Writes `out` through a temporary file beside it, renamed only when `write` succeeded, so a
/// failed or interrupted run never leaves a half-written file under the final name.
pub(crate) fn write_via_tmp<E>(
    out: &Path,
    write: impl FnOnce(&Path) -> Result<u64, E>,
    rename_error: impl FnOnce(std::io::Error) -> E,
) -> Result<Throughput, E> {
    let started = Instant::now();
    let tmp = tmp_path(out);
    let result = write(&tmp).and_then(|bytes| {
        fs::rename(&tmp, out).map_err(rename_error)?;
        Ok(bytes)
    });
    match result {
        Ok(bytes) => Ok(Throughput {
            bytes,
            seconds: started.elapsed().as_secs_f64(),
        }),
        Err(e) => {
            // Best effort: a half-written temporary file is useless to the user.
            let _ = fs::remove_file(&tmp);
            Err(e)
        }
    }
}

fn write_tmp(
    src_path: &Path,
    file: &GgufFile,
    edited: &GgufFile,
    tmp: &Path,
    progress: bool,
    label: &str,
) -> Result<u64, EditError> {
    let read_err = |source| EditError::Read {
        path: src_path.to_path_buf(),
        source,
    };
    let write_err = |source| EditError::Write {
        path: tmp.to_path_buf(),
        source,
    };
    let mut src = File::open(src_path).map_err(read_err)?;
    src.seek(SeekFrom::Start(file.data_offset))
        .map_err(read_err)?;
    let out = File::create(tmp).map_err(write_err)?;
    let mut w = BufWriter::with_capacity(COPY_CHUNK, out);
    let header_len = edited.write_header(&mut w).map_err(|e| match e {
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
    let out = w.into_inner().map_err(|e| write_err(e.into_error()))?;
    // Data must be on disk before the rename makes the file visible under its final name.
    out.sync_all().map_err(write_err)?;
    Ok(header_len + total)
}
