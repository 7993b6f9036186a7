//! The hyper-parameters of a GGUF model, read the way llama.cpp reads them.

use serde::Serialize;
use thiserror::Error;

use crate::gguf::{Array, GgufFile, Value};

#[derive(Debug, Error)]
pub enum ModelError {
    #[error("the model has no general.architecture key; it is not a llama.cpp model file, pass a converted .gguf model")]
    NoArchitecture,
    #[error("the model has no {0} key, which Q-Filters need; re-convert the model with a current llama.cpp")]
    MissingKey(String),
    #[error("the model's {0} is 0; the file is corrupt")]
    Zero(String),
    #[error(
        "{key} is a {found}, not an integer; the file is corrupt or from an unsupported converter"
    )]
    NotInteger { key: String, found: String },
    #[error("{key} differs between layers ({values}); Q-Filters need the same value in every layer, so this model is not supported")]
    NotUniform { key: String, values: String },
    #[error("{key} = {value}: {why}; llama.cpp would abort on this model, so it is refused")]
    Unloadable {
        key: String,
        value: String,
        why: String,
    },
}

/// Most layers llama.cpp accepts (`LLAMA_MAX_LAYERS`, src/llama-hparams.h); it asserts on more.
pub const MAX_LAYERS: u64 = 512;

/// Refuses hyper-parameters on which llama.cpp aborts the process (a `GGML_ASSERT`) or
/// computes nothing but NaN, so that loading such a file is an error instead of a crash or an
/// empty answer: the layer count 1..=[`MAX_LAYERS`], non-zero widths and head counts, heads
/// divisible by KV heads, and every floating-point hyper-parameter of the architecture
/// (epsilons, RoPE bases and scales, ...) finite, with epsilons and RoPE bases positive.
pub fn check_loadable(file: &GgufFile) -> Result<(), ModelError> {
    let Some(arch) = file.architecture() else {
        // llama.cpp refuses a file without an architecture with an error, not an abort.
        return Ok(());
    };
    let key = |suffix: &str| format!("{arch}.{suffix}");
    let bad = |k: &str, value: String, why: &str| ModelError::Unloadable {
        key: k.to_string(),
        value,
        why: why.to_string(),
    };
    let layers_key = key("block_count");
    match file.get(&layers_key) {
        None => return Err(ModelError::MissingKey(layers_key)),
        Some(v) => match v.as_u64() {
            Some(n) if (1..=MAX_LAYERS).contains(&n) => {}
            Some(n) => {
                return Err(bad(
                    &layers_key,
                    n.to_string(),
                    &format!("llama.cpp supports 1 to {MAX_LAYERS} layers"),
                ))
            }
            None => {
                return Err(ModelError::NotInteger {
                    key: layers_key,
                    found: v.type_name(),
                })
            }
        },
    }
    // Scalars only: some architectures give per-layer arrays with zeros for layers without
    // attention, which llama.cpp handles.
    let scalar = |suffix: &str| file.get(&key(suffix)).and_then(Value::as_u64);
    for suffix in [
        "embedding_length",
        "attention.head_count",
        "attention.head_count_kv",
        "attention.key_length",
        "attention.value_length",
    ] {
        if scalar(suffix) == Some(0) {
            return Err(bad(&key(suffix), "0".into(), "it must be at least 1"));
        }
    }
    if let (Some(h), Some(kv)) = (
        scalar("attention.head_count"),
        scalar("attention.head_count_kv"),
    ) {
        if h % kv != 0 {
            return Err(bad(
                &key("attention.head_count_kv"),
                kv.to_string(),
                &format!("it does not divide attention.head_count = {h}"),
            ));
        }
    }
    let prefix = format!("{arch}.");
    for (k, v) in &file.metadata {
        let Some(suffix) = k.strip_prefix(&prefix) else {
            continue;
        };
        let floats: Vec<f64> = match v {
            Value::F32(x) => vec![f64::from(*x)],
            Value::F64(x) => vec![*x],
            Value::Array(Array::F32(xs)) => xs.iter().map(|&x| f64::from(x)).collect(),
            Value::Array(Array::F64(xs)) => xs.clone(),
            _ => continue,
        };
        for x in floats {
            if !x.is_finite() {
                return Err(bad(k, format!("{x}"), "it must be a finite number"));
            }
            let positive = suffix.ends_with("epsilon") || suffix.starts_with("rope.freq_base");
            if positive && x <= 0.0 {
                return Err(bad(k, format!("{x}"), "it must be greater than 0"));
            }
        }
    }
    Ok(())
}

/// Attention shape and context parameters of a model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ModelInfo {
    pub architecture: String,
    pub block_count: Option<u64>,
    pub embedding_length: Option<u64>,
    pub head_count: Option<u64>,
    /// Defaults to `head_count` as in llama.cpp.
    pub head_count_kv: Option<u64>,
    /// `attention.key_length`, else `embedding_length / head_count`.
    pub head_dim: Option<u64>,
    pub context_length: Option<u64>,
    pub sliding_window: Option<u64>,
}

impl ModelInfo {
    pub fn from_gguf(file: &GgufFile) -> Result<Self, ModelError> {
        let arch = file
            .architecture()
            .ok_or(ModelError::NoArchitecture)?
            .to_string();
        let get = |suffix: &str| uniform_int(file, &format!("{arch}.{suffix}"));
        let embedding_length = get("embedding_length")?;
        let head_count = get("attention.head_count")?;
        let head_count_kv = get("attention.head_count_kv")?.or(head_count);
        let head_dim = match get("attention.key_length")? {
            Some(d) => Some(d),
            None => match (embedding_length, head_count) {
                (Some(e), Some(h)) if h > 0 => Some(e / h),
                _ => None,
            },
        };
        Ok(ModelInfo {
            block_count: get("block_count")?,
            embedding_length,
            head_count,
            head_count_kv,
            head_dim,
            context_length: get("context_length")?,
            sliding_window: get("attention.sliding_window")?,
            architecture: arch,
        })
    }

    /// `[layers, kv heads, head dim]` that Q-Filters for this model must have.
    pub fn filter_shape(&self) -> Result<[usize; 3], ModelError> {
        // A zero count is reported as such, not as the key derived from it being missing.
        for (v, key) in [
            (self.block_count, "block_count"),
            (self.head_count, "attention.head_count"),
            (self.head_count_kv, "attention.head_count_kv"),
            (self.head_dim, "attention.key_length"),
        ] {
            if v == Some(0) {
                return Err(ModelError::Zero(format!("{}.{key}", self.architecture)));
            }
        }
        let need = |v: Option<u64>, key: &str| -> Result<usize, ModelError> {
            v.and_then(|n| usize::try_from(n).ok())
                .ok_or_else(|| ModelError::MissingKey(format!("{}.{key}", self.architecture)))
        };
        Ok([
            need(self.block_count, "block_count")?,
            need(self.head_count_kv, "attention.head_count_kv")?,
            need(self.head_dim, "attention.key_length")?,
        ])
    }
}

/// An integer key, accepting any integer width and per-layer arrays whose entries agree
/// (some converters write head counts per layer).
fn uniform_int(file: &GgufFile, key: &str) -> Result<Option<u64>, ModelError> {
    let Some(value) = file.get(key) else {
        return Ok(None);
    };
    if let Some(v) = value.as_u64() {
        return Ok(Some(v));
    }
    let not_int = || ModelError::NotInteger {
        key: key.to_string(),
        found: value.type_name(),
    };
    let Value::Array(array) = value else {
        return Err(not_int());
    };
    let values: Vec<u64> = match array {
        Array::U8(v) => v.iter().map(|&x| u64::from(x)).collect(),
        Array::U16(v) => v.iter().map(|&x| u64::from(x)).collect(),
        Array::U32(v) => v.iter().map(|&x| u64::from(x)).collect(),
        Array::U64(v) => v.clone(),
        Array::I32(v) => v.iter().filter_map(|&x| u64::try_from(x).ok()).collect(),
        Array::I64(v) => v.iter().filter_map(|&x| u64::try_from(x).ok()).collect(),
        _ => return Err(not_int()),
    };
    if values.len() != array.len() {
        return Err(not_int());
    }
    match values.split_first() {
        None => Ok(None),
        Some((first, rest)) if rest.iter().all(|v| v == first) => Ok(Some(*first)),
        Some(_) => Err(ModelError::NotUniform {
            key: key.to_string(),
            values: array.preview(8).join(", "),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_zero_head_count_is_reported_as_such() {
        let info = ModelInfo {
            architecture: "llama".into(),
            block_count: Some(2),
            embedding_length: Some(64),
            head_count: Some(0),
            head_count_kv: Some(0),
            head_dim: None,
            context_length: None,
            sliding_window: None,
        };
        let e = info.filter_shape().unwrap_err();
        assert!(
            e.to_string().contains("llama.attention.head_count is 0"),
            "{e}"
        );
    }
}
