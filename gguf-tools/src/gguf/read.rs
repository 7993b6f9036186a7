//! GGUF reader. Every count and length is checked against the bytes left in the file before
//! anything is allocated, so a lying header cannot make us allocate more than a small
//! multiple of the file size.

use std::collections::HashSet;
use std::io::{BufReader, ErrorKind, Read};
use std::path::Path;

use super::types::GgmlType;
use super::value::{Array, GgufString, Value, ValueType};
use super::{GgufError, GgufFile, TensorInfo, MAX_ARRAY_DEPTH, MAX_DIMS};

/// Opens and parses the header of a GGUF file, validating tensor placement against its size.
pub fn read(path: &Path) -> Result<GgufFile, GgufError> {
    let open = |source| GgufError::Open {
        path: path.to_path_buf(),
        source,
    };
    let file = crate::safe_io::open_input(path).map_err(|e| match e {
        crate::safe_io::FileError::Read { source, .. } => open(source),
        other => GgufError::File(other),
    })?;
    let len = file.metadata().map_err(open)?.len();
    read_from(BufReader::with_capacity(1 << 16, file), len)
}

/// Parses a GGUF header from `reader`, which must yield the file from its first byte;
/// `file_len` is the full file size, used to bound allocations and validate tensor offsets.
pub fn read_from<R: Read>(reader: R, file_len: u64) -> Result<GgufFile, GgufError> {
    let mut src = Source {
        inner: reader,
        pos: 0,
        len: file_len,
    };
    parse(&mut src)
}

/// Items whose in-memory form is larger than their smallest encoding (strings, arrays, keys,
/// tensor infos) start from at most this capacity and grow only as real items are read, so
/// nested lying counts cannot multiply the allocation.
const PREALLOC_CAP: usize = 4096;

struct Source<R> {
    inner: R,
    pos: u64,
    len: u64,
}

impl<R: Read> Source<R> {
    fn remaining(&self) -> u64 {
        self.len.saturating_sub(self.pos)
    }

    fn truncated(&self, what: &str) -> GgufError {
        GgufError::Truncated {
            what: what.to_string(),
            offset: self.pos,
        }
    }

    fn fill(&mut self, buf: &mut [u8], what: &str) -> Result<(), GgufError> {
        let n = buf.len() as u64;
        if n > self.remaining() {
            return Err(self.truncated(what));
        }
        match self.inner.read_exact(buf) {
            Ok(()) => {
                self.pos += n;
                Ok(())
            }
            // The caller's length may overstate what the reader really holds.
            Err(e) if e.kind() == ErrorKind::UnexpectedEof => Err(self.truncated(what)),
            Err(e) => Err(GgufError::Io(e)),
        }
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], GgufError> {
        let mut b = [0u8; N];
        self.fill(&mut b, what)?;
        Ok(b)
    }

    fn u8(&mut self, what: &str) -> Result<u8, GgufError> {
        Ok(self.array::<1>(what)?[0])
    }

    fn u32(&mut self, what: &str) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// Turns a claimed item count into a usize only if the rest of the file could hold it.
    fn count(&self, count: u64, min_item_size: u64, what: &str) -> Result<usize, GgufError> {
        let too_large = || GgufError::CountTooLarge {
            what: what.to_string(),
            offset: self.pos,
            count,
            remaining: self.remaining(),
        };
        let needed = count.checked_mul(min_item_size).ok_or_else(too_large)?;
        if needed > self.remaining() {
            return Err(too_large());
        }
        usize::try_from(count).map_err(|_| too_large())
    }

    fn bytes(&mut self, what: &str) -> Result<Vec<u8>, GgufError> {
        let len = self.u64(what)?;
        let len = self.count(len, 1, what)?;
        let mut v = vec![0u8; len];
        self.fill(&mut v, what)?;
        Ok(v)
    }

    fn utf8(&mut self, what: &str) -> Result<String, GgufError> {
        let bytes = self.bytes(what)?;
        String::from_utf8(bytes).map_err(|_| GgufError::InvalidUtf8 {
            what: what.to_string(),
        })
    }

    fn value_type(&mut self, key: &str) -> Result<ValueType, GgufError> {
        let id = self.u32(&format!("the type of key {key:?}"))?;
        ValueType::from_id(id).ok_or_else(|| GgufError::UnknownValueType {
            key: key.to_string(),
            type_id: id,
        })
    }

    fn value(&mut self, ty: ValueType, key: &str, depth: usize) -> Result<Value, GgufError> {
        let what = || format!("the value of key {key:?}");
        Ok(match ty {
            ValueType::U8 => Value::U8(self.u8(&what())?),
            ValueType::I8 => Value::I8(i8::from_le_bytes(self.array(&what())?)),
            ValueType::U16 => Value::U16(u16::from_le_bytes(self.array(&what())?)),
            ValueType::I16 => Value::I16(i16::from_le_bytes(self.array(&what())?)),
            ValueType::U32 => Value::U32(self.u32(&what())?),
            ValueType::I32 => Value::I32(i32::from_le_bytes(self.array(&what())?)),
            ValueType::F32 => Value::F32(f32::from_le_bytes(self.array(&what())?)),
            ValueType::Bool => Value::Bool(self.bool(key)?),
            ValueType::String => Value::String(GgufString(self.bytes(&what())?)),
            ValueType::Array => Value::Array(self.array_value(key, depth)?),
            ValueType::U64 => Value::U64(self.u64(&what())?),
            ValueType::I64 => Value::I64(i64::from_le_bytes(self.array(&what())?)),
            ValueType::F64 => Value::F64(f64::from_le_bytes(self.array(&what())?)),
        })
    }

    fn bool(&mut self, key: &str) -> Result<bool, GgufError> {
        match self.u8(&format!("the value of key {key:?}"))? {
            0 => Ok(false),
            1 => Ok(true),
            byte => Err(GgufError::InvalidBool {
                key: key.to_string(),
                byte,
            }),
        }
    }

    fn array_value(&mut self, key: &str, depth: usize) -> Result<Array, GgufError> {
        // Recursion is driven by the file, so bound it to keep the stack safe.
        if depth >= MAX_ARRAY_DEPTH {
            return Err(GgufError::NestingTooDeep {
                key: key.to_string(),
                max: MAX_ARRAY_DEPTH,
            });
        }
        let elem = self.value_type(key)?;
        let what = format!("the array of key {key:?}");
        let raw_count = self.u64(&what)?;
        let n = self.count(raw_count, elem.min_encoded_size(), &what)?;

        macro_rules! fixed {
            ($variant:ident, $t:ty) => {{
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(<$t>::from_le_bytes(self.array(&what)?));
                }
                Array::$variant(v)
            }};
        }
        Ok(match elem {
            ValueType::U8 => {
                let mut v = vec![0u8; n];
                self.fill(&mut v, &what)?;
                Array::U8(v)
            }
            ValueType::I8 => fixed!(I8, i8),
            ValueType::U16 => fixed!(U16, u16),
            ValueType::I16 => fixed!(I16, i16),
            ValueType::U32 => fixed!(U32, u32),
            ValueType::I32 => fixed!(I32, i32),
            ValueType::F32 => fixed!(F32, f32),
            ValueType::U64 => fixed!(U64, u64),
            ValueType::I64 => fixed!(I64, i64),
            ValueType::F64 => fixed!(F64, f64),
            ValueType::Bool => {
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.bool(key)?);
                }
                Array::Bool(v)
            }
            ValueType::String => {
                let mut v = Vec::with_capacity(n.min(PREALLOC_CAP));
                for _ in 0..n {
                    v.push(GgufString(self.bytes(&what)?));
                }
                Array::String(v)
            }
            ValueType::Array => {
                let mut v = Vec::with_capacity(n.min(PREALLOC_CAP));
                for _ in 0..n {
                    v.push(self.array_value(key, depth + 1)?);
                }
                Array::Array(v)
            }
        })
    }

    fn tensor_info(&mut self, index: u64) -> Result<TensorInfo, GgufError> {
        let name = self.utf8(&format!("the name of tensor {index}"))?;
        let what = format!("tensor {name:?}");
        let n_dims = u64::from(self.u32(&what)?);
        if n_dims > MAX_DIMS as u64 {
            return Err(GgufError::TooManyDims {
                tensor: name,
                n_dims,
            });
        }
        let mut dims = Vec::with_capacity(MAX_DIMS);
        for _ in 0..n_dims {
            dims.push(self.u64(&what)?);
        }
        let type_id = self.u32(&what)?;
        let ggml_type = GgmlType::from_id(type_id).ok_or_else(|| GgufError::UnknownGgmlType {
            tensor: name.clone(),
            type_id,
        })?;
        let offset = self.u64(&what)?;
        let info = TensorInfo {
            name,
            dims,
            ggml_type,
            offset,
        };
        info.checked_size()?;
        Ok(info)
    }
}

fn parse<R: Read>(src: &mut Source<R>) -> Result<GgufFile, GgufError> {
    let magic: [u8; 4] = src.array("the magic bytes")?;
    if &magic != b"GGUF" {
        return Err(GgufError::BadMagic { found: magic });
    }
    let version = src.u32("the version")?;
    if version & 0xFFFF == 0 && version != 0 {
        return Err(GgufError::BigEndian(version));
    }
    if !(2..=3).contains(&version) {
        return Err(GgufError::UnsupportedVersion(version));
    }
    let n_tensors = src.u64("the tensor count")?;
    let n_kv = src.u64("the metadata count")?;
    // Smallest possible key/value: empty-length key (8) + type (4) + one byte.
    let n_kv = src.count(n_kv, 13, "the metadata count")?;
    // Smallest possible tensor info: name length (8) + n_dims (4) + type (4) + offset (8).
    let n_tensors = src.count(n_tensors, 24, "the tensor count")?;

    let mut metadata = Vec::with_capacity(n_kv.min(PREALLOC_CAP));
    let mut seen = HashSet::with_capacity(n_kv.min(PREALLOC_CAP));
    for index in 0..n_kv as u64 {
        let key = src.utf8(&format!("metadata key {index}"))?;
        if key.is_empty() {
            return Err(GgufError::EmptyKey { index });
        }
        if !seen.insert(key.clone()) {
            return Err(GgufError::DuplicateKey(key));
        }
        let ty = src.value_type(&key)?;
        let value = src.value(ty, &key, 0)?;
        metadata.push((key, value));
    }
    let alignment = super::alignment_of(&metadata)?;

    let mut tensors = Vec::with_capacity(n_tensors.min(PREALLOC_CAP));
    let mut names = HashSet::with_capacity(n_tensors.min(PREALLOC_CAP));
    for index in 0..n_tensors as u64 {
        let info = src.tensor_info(index)?;
        if !names.insert(info.name.clone()) {
            return Err(GgufError::DuplicateTensor(info.name));
        }
        tensors.push(info);
    }

    let header_end = src.pos;
    let padded = super::align_up(header_end, alignment).ok_or(GgufError::DataPastEnd {
        header_end,
        file_len: src.len,
    })?;
    // llama.cpp only seeks to the aligned data start when there are tensors; a tensor-less
    // file may legitimately end right after its header.
    let data_offset = if tensors.is_empty() {
        padded.min(src.len)
    } else if padded > src.len {
        return Err(GgufError::DataPastEnd {
            header_end: padded,
            file_len: src.len,
        });
    } else {
        padded
    };

    let file = GgufFile {
        version,
        metadata,
        tensors,
        alignment,
        data_offset,
        file_len: src.len,
    };
    file.validate_placement()?;
    Ok(file)
}
