//! A self-contained GGUF (v2/v3) reader and writer.

mod error;
mod read;
mod types;
mod value;
mod write;

pub use error::GgufError;
pub use read::{read, read_from};
pub use types::{tensor_data_size, GgmlType};
pub use value::{Array, GgufString, Value, ValueType};

/// Alignment of the data section and of every tensor when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml tensors have at most four dimensions.
pub const MAX_DIMS: usize = 4;
/// Deepest array nesting the reader accepts.
pub const MAX_ARRAY_DEPTH: usize = 16;
pub const ALIGNMENT_KEY: &str = "general.alignment";

/// One tensor's header entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    /// Shape with the fastest-varying dimension (ggml's ne0) first, exactly as stored.
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Byte offset of the data, relative to the start of the data section.
    pub offset: u64,
}

impl TensorInfo {
    /// Bytes of tensor data, or why the shape cannot be stored.
    pub fn checked_size(&self) -> Result<u64, GgufError> {
        let block = self.ggml_type.block_size();
        if self.dims.first().copied().unwrap_or(1) % block != 0 {
            return Err(GgufError::RowNotBlocks {
                tensor: self.name.clone(),
                ggml_type: self.ggml_type.name().to_string(),
                ne0: self.dims.first().copied().unwrap_or(1),
                block,
            });
        }
        // ggml keeps element counts in int64_t.
        let elements = self
            .dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .filter(|&n| n <= i64::MAX as u64);
        match (elements, tensor_data_size(self.ggml_type, &self.dims)) {
            (Some(_), Some(size)) => Ok(size),
            _ => Err(GgufError::SizeOverflow {
                tensor: self.name.clone(),
                dims: self.dims.clone(),
            }),
        }
    }

    /// Bytes of tensor data (0 if the shape is invalid, which the reader never lets through).
    pub fn size(&self) -> u64 {
        self.checked_size().unwrap_or(0)
    }
}

/// A parsed GGUF header plus where its tensor data lives in the file.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufFile {
    pub version: u32,
    /// Key/value pairs in file order (order matters for byte-identical rewrites).
    pub metadata: Vec<(String, Value)>,
    pub tensors: Vec<TensorInfo>,
    pub alignment: u64,
    /// Absolute file offset where the data section starts.
    pub data_offset: u64,
    pub file_len: u64,
}

impl GgufFile {
    /// A file description for writing; offsets and sizes are the caller's business.
    pub fn new(
        metadata: Vec<(String, Value)>,
        tensors: Vec<TensorInfo>,
    ) -> Result<Self, GgufError> {
        let alignment = alignment_of(&metadata)?;
        Ok(GgufFile {
            version: 3,
            metadata,
            tensors,
            alignment,
            data_offset: 0,
            file_len: 0,
        })
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(Value::as_str)
    }

    pub fn get_u64(&self, key: &str) -> Option<u64> {
        self.get(key).and_then(Value::as_u64)
    }

    pub fn architecture(&self) -> Option<&str> {
        self.get_str("general.architecture")
    }

    /// Length of the data section as the file holds it.
    pub fn data_len(&self) -> u64 {
        self.file_len.saturating_sub(self.data_offset)
    }

    /// Sum of all tensor data sizes, without padding.
    pub fn total_tensor_bytes(&self) -> u64 {
        self.tensors
            .iter()
            .fold(0u64, |acc, t| acc.saturating_add(t.size()))
    }

    /// Checks that every tensor is aligned, inside the data section and disjoint from others.
    pub fn validate_placement(&self) -> Result<(), GgufError> {
        let data_len = self.data_len();
        let mut spans = Vec::with_capacity(self.tensors.len());
        for t in &self.tensors {
            if t.offset % self.alignment != 0 {
                return Err(GgufError::MisalignedOffset {
                    tensor: t.name.clone(),
                    offset: t.offset,
                    alignment: self.alignment,
                });
            }
            let size = t.checked_size()?;
            let end = t.offset.checked_add(size).filter(|&e| e <= data_len);
            let Some(end) = end else {
                return Err(GgufError::OffsetPastEnd {
                    tensor: t.name.clone(),
                    offset: t.offset,
                    size,
                    data_len,
                });
            };
            spans.push((t.offset, end, t.name.as_str()));
        }
        spans.sort_unstable();
        for pair in spans.windows(2) {
            if let [(_, end_a, a), (start_b, _, b)] = pair {
                if end_a > start_b {
                    return Err(GgufError::Overlap {
                        first: a.to_string(),
                        second: b.to_string(),
                    });
                }
            }
        }
        Ok(())
    }
}

/// The data alignment a metadata list asks for, validated like llama.cpp does.
pub fn alignment_of(metadata: &[(String, Value)]) -> Result<u64, GgufError> {
    match metadata.iter().find(|(k, _)| k == ALIGNMENT_KEY) {
        None => Ok(DEFAULT_ALIGNMENT),
        Some((_, Value::U32(a))) if *a != 0 && a.is_power_of_two() => Ok(u64::from(*a)),
        Some((_, v)) => Err(GgufError::BadAlignment {
            found: format!("{} {}", v.type_name(), v.short()),
        }),
    }
}

/// Rounds `n` up to a multiple of `alignment` (a power of two), or `None` on overflow.
pub fn align_up(n: u64, alignment: u64) -> Option<u64> {
    let mask = alignment.checked_sub(1)?;
    n.checked_add(mask).map(|v| v & !mask)
}
