use std::path::PathBuf;

use thiserror::Error;

/// Everything that can go wrong reading or writing a GGUF file. Each message says what was
/// found and what the user can do about it.
#[derive(Debug, Error)]
pub enum GgufError {
    #[error(transparent)]
    File(#[from] crate::safe_io::FileError),
    #[error("cannot open {path}: {source}; check the path and permissions")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("I/O error: {0}; check that the disk is readable and not full")]
    Io(#[from] std::io::Error),
    #[error(
        "not a GGUF file (magic bytes {found:02x?}, expected \"GGUF\"); pass a .gguf model file"
    )]
    BadMagic { found: [u8; 4] },
    #[error("GGUF version {0} is byte-swapped: this is a big-endian file; convert it on a little-endian machine")]
    BigEndian(u32),
    #[error("GGUF version {0} is not supported (only 2 and 3 are); re-convert the model with a current llama.cpp")]
    UnsupportedVersion(u32),
    #[error("file ends inside {what} at byte {offset}; the file is truncated or corrupt, download or convert it again")]
    Truncated { what: String, offset: u64 },
    #[error("{what} at byte {offset} claims {count} items but only {remaining} bytes are left in the file; the file is corrupt")]
    CountTooLarge {
        what: String,
        offset: u64,
        count: u64,
        remaining: u64,
    },
    #[error("metadata key {key:?} has unknown value type {type_id}; the file is corrupt or from a newer GGUF revision")]
    UnknownValueType { key: String, type_id: u32 },
    #[error("metadata key {key:?} nests arrays more than {max} deep; the file is corrupt")]
    NestingTooDeep { key: String, max: usize },
    #[error(
        "metadata key {key:?} holds bool byte {byte} (only 0 and 1 are valid); the file is corrupt"
    )]
    InvalidBool { key: String, byte: u8 },
    #[error("{what} is not valid UTF-8; the file is corrupt")]
    InvalidUtf8 { what: String },
    #[error("metadata key number {index} is empty; the file is corrupt")]
    EmptyKey { index: u64 },
    #[error("metadata key {0:?} appears twice; the file is corrupt")]
    DuplicateKey(String),
    #[error("tensor {0:?} appears twice; the file is corrupt")]
    DuplicateTensor(String),
    #[error(
        "general.alignment is {found}, but it must be a u32 power of two; fix or remove the key"
    )]
    BadAlignment { found: String },
    #[error("tensor {tensor:?} has {n_dims} dimensions, more than ggml's 4; the file is corrupt")]
    TooManyDims { tensor: String, n_dims: u64 },
    #[error("tensor {tensor:?} has unknown ggml type {type_id}; the file is corrupt or needs a newer tool")]
    UnknownGgmlType { tensor: String, type_id: u32 },
    #[error("tensor {tensor:?} has {ne0} elements per row, not a multiple of the {ggml_type} block size {block}; the file is corrupt")]
    RowNotBlocks {
        tensor: String,
        ggml_type: String,
        ne0: u64,
        block: u64,
    },
    #[error("tensor {tensor:?} has shape {dims:?}, whose size overflows; the file is corrupt")]
    SizeOverflow { tensor: String, dims: Vec<u64> },
    #[error("tensor {tensor:?} data offset {offset} is not a multiple of the alignment {alignment}; the file is corrupt")]
    MisalignedOffset {
        tensor: String,
        offset: u64,
        alignment: u64,
    },
    #[error("tensor {tensor:?} data ({size} bytes at offset {offset}) ends past the end of the data section ({data_len} bytes); the file is truncated, download it again")]
    OffsetPastEnd {
        tensor: String,
        offset: u64,
        size: u64,
        data_len: u64,
    },
    #[error("tensors {first:?} and {second:?} overlap in the data section; the file is corrupt")]
    Overlap { first: String, second: String },
    #[error("the header ends at byte {header_end}, past the end of the file ({file_len} bytes); the file is truncated")]
    DataPastEnd { header_end: u64, file_len: u64 },
    #[error("{0} is too large to write; this is a bug in the caller")]
    TooLarge(String),
}
