//! GGUF header writer. Tensor data is not held in memory: callers stream it after the header.

use std::io::{Read, Write};

use super::value::{Array, GgufString, Value};
use super::{alignment_of, GgufError, GgufFile, TensorInfo, MAX_DIMS};

impl GgufFile {
    /// Encodes magic, counts, metadata and tensor infos, zero-padded to the alignment, in
    /// exactly the byte layout llama.cpp writes. The result's length is the data offset.
    pub fn header_bytes(&self) -> Result<Vec<u8>, GgufError> {
        let mut out = Vec::new();
        self.write_header(&mut out)?;
        Ok(out)
    }

    /// Writes the header to `w` and returns its length (the data offset). The padding is
    /// streamed rather than materialised: a file may legally ask for a 2 GiB alignment.
    pub fn write_header<W: Write>(&self, w: &mut W) -> Result<u64, GgufError> {
        let alignment = alignment_of(&self.metadata)?;
        let body = self.unpadded_header()?;
        w.write_all(&body)?;
        let len = body.len() as u64;
        let padded = super::align_up(len, alignment)
            .ok_or_else(|| GgufError::TooLarge("the header".to_string()))?;
        std::io::copy(&mut std::io::repeat(0).take(padded - len), w)?;
        Ok(padded)
    }

    fn unpadded_header(&self) -> Result<Vec<u8>, GgufError> {
        let mut out = Vec::new();
        out.extend_from_slice(b"GGUF");
        out.extend_from_slice(&self.version.to_le_bytes());
        put_len(&mut out, self.tensors.len());
        put_len(&mut out, self.metadata.len());
        for (key, value) in &self.metadata {
            put_bytes(&mut out, key.as_bytes());
            out.extend_from_slice(&value.value_type().id().to_le_bytes());
            put_value(&mut out, value);
        }
        for t in &self.tensors {
            put_tensor_info(&mut out, t)?;
        }
        Ok(out)
    }
}

fn put_len(out: &mut Vec<u8>, n: usize) {
    out.extend_from_slice(&(n as u64).to_le_bytes());
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    put_len(out, b.len());
    out.extend_from_slice(b);
}

fn put_string(out: &mut Vec<u8>, s: &GgufString) {
    put_bytes(out, &s.0);
}

fn put_value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => out.push(*x),
        Value::I8(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => out.push(u8::from(*x)),
        Value::String(s) => put_string(out, s),
        Value::Array(a) => put_array(out, a),
        Value::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
    }
}

fn put_array(out: &mut Vec<u8>, a: &Array) {
    out.extend_from_slice(&a.elem_type().id().to_le_bytes());
    put_len(out, a.len());
    macro_rules! each {
        ($v:expr) => {
            for x in $v {
                out.extend_from_slice(&x.to_le_bytes());
            }
        };
    }
    match a {
        Array::U8(v) => out.extend_from_slice(v),
        Array::I8(v) => each!(v),
        Array::U16(v) => each!(v),
        Array::I16(v) => each!(v),
        Array::U32(v) => each!(v),
        Array::I32(v) => each!(v),
        Array::F32(v) => each!(v),
        Array::Bool(v) => out.extend(v.iter().map(|&b| u8::from(b))),
        Array::String(v) => v.iter().for_each(|s| put_string(out, s)),
        Array::Array(v) => v.iter().for_each(|inner| put_array(out, inner)),
        Array::U64(v) => each!(v),
        Array::I64(v) => each!(v),
        Array::F64(v) => each!(v),
    }
}

fn put_tensor_info(out: &mut Vec<u8>, t: &TensorInfo) -> Result<(), GgufError> {
    if t.dims.len() > MAX_DIMS {
        return Err(GgufError::TooManyDims {
            tensor: t.name.clone(),
            n_dims: t.dims.len() as u64,
        });
    }
    put_bytes(out, t.name.as_bytes());
    out.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
    for d in &t.dims {
        out.extend_from_slice(&d.to_le_bytes());
    }
    out.extend_from_slice(&t.ggml_type.id().to_le_bytes());
    out.extend_from_slice(&t.offset.to_le_bytes());
    Ok(())
}
