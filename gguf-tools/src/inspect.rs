//! A summary of a GGUF file for people (text) and scripts (JSON).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use crate::filters::{QFilters, KEY_CALIBRATION_SAMPLES, KEY_CALIBRATION_TOKENS, KEY_VERSION};
use crate::gguf::{self, GgufError, GgufFile};
use crate::model::ModelInfo;

#[derive(Debug, Serialize)]
pub struct Report {
    pub file: String,
    pub file_size: u64,
    pub version: u32,
    pub alignment: u64,
    pub data_offset: u64,
    pub architecture: Option<String>,
    pub hyperparameters: Option<ModelInfo>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hyperparameters_error: Option<String>,
    pub metadata: Vec<MetadataEntry>,
    pub tensor_count: usize,
    pub tensor_types: BTreeMap<String, TypeTotal>,
    pub total_tensor_bytes: u64,
    pub qfilters: Option<QFiltersReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub qfilters_error: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct MetadataEntry {
    pub key: String,
    #[serde(rename = "type")]
    pub value_type: String,
    pub value: String,
}

#[derive(Debug, Default, Serialize)]
pub struct TypeTotal {
    pub count: usize,
    pub bytes: u64,
}

#[derive(Debug, Serialize)]
pub struct QFiltersReport {
    pub version: u64,
    pub layer_count: usize,
    pub head_count_kv: usize,
    pub head_dim: usize,
    pub shape: [usize; 3],
    pub source: String,
    pub calibration: Calibration,
}

#[derive(Debug, Serialize)]
pub struct Calibration {
    pub tokens: Option<u64>,
    pub samples: Option<u64>,
}

pub fn inspect(path: &Path) -> Result<Report, GgufError> {
    let file = gguf::read(path)?;
    Ok(report(&path.display().to_string(), &file))
}

/// Builds the report; problems with hyper-parameters or filters are reported, not fatal,
/// because inspect is what people run to find out what is wrong with a file.
pub fn report(name: &str, file: &GgufFile) -> Report {
    let (hyperparameters, hyperparameters_error) = match ModelInfo::from_gguf(file) {
        Ok(m) => (Some(m), None),
        Err(e) => (None, Some(e.to_string())),
    };
    let mut tensor_types: BTreeMap<String, TypeTotal> = BTreeMap::new();
    for t in &file.tensors {
        let e = tensor_types
            .entry(t.ggml_type.name().to_string())
            .or_default();
        e.count += 1;
        e.bytes = e.bytes.saturating_add(t.size());
    }
    let (qfilters, qfilters_error) = match QFilters::from_metadata(&file.metadata) {
        Ok(Some(f)) => (
            Some(QFiltersReport {
                version: file.get_u64(KEY_VERSION).unwrap_or(0),
                layer_count: f.num_layers,
                head_count_kv: f.num_kv_heads,
                head_dim: f.head_dim,
                shape: f.shape(),
                source: f.source.clone(),
                calibration: Calibration {
                    tokens: file.get_u64(KEY_CALIBRATION_TOKENS),
                    samples: file.get_u64(KEY_CALIBRATION_SAMPLES),
                },
            }),
            None,
        ),
        Ok(None) => (None, None),
        Err(e) => (None, Some(e.to_string())),
    };
    Report {
        file: name.to_string(),
        file_size: file.file_len,
        version: file.version,
        alignment: file.alignment,
        data_offset: file.data_offset,
        architecture: file.architecture().map(str::to_string),
        hyperparameters,
        hyperparameters_error,
        metadata: file
            .metadata
            .iter()
            .map(|(k, v)| MetadataEntry {
                key: k.clone(),
                value_type: v.type_name(),
                value: v.short(),
            })
            .collect(),
        tensor_count: file.tensors.len(),
        tensor_types,
        total_tensor_bytes: file.total_tensor_bytes(),
        qfilters,
        qfilters_error,
    }
}

fn mb(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

fn opt(v: Option<u64>) -> String {
    v.map_or_else(|| "-".to_string(), |n| n.to_string())
}

impl Report {
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        // Writing to a String cannot fail.
        let _ = self.write_text(&mut s);
        s
    }

    fn write_text(&self, s: &mut String) -> std::fmt::Result {
        writeln!(s, "file:          {} ({})", self.file, mb(self.file_size))?;
        writeln!(
            s,
            "gguf:          version {}, alignment {}, data at byte {}",
            self.version, self.alignment, self.data_offset
        )?;
        writeln!(
            s,
            "architecture:  {}",
            self.architecture.as_deref().unwrap_or("-")
        )?;
        if let Some(h) = &self.hyperparameters {
            for (name, v) in [
                ("block_count", h.block_count),
                ("embedding_length", h.embedding_length),
                ("head_count", h.head_count),
                ("head_count_kv", h.head_count_kv),
                ("head_dim", h.head_dim),
                ("context_length", h.context_length),
            ] {
                writeln!(s, "  {name:<18} {}", opt(v))?;
            }
            if let Some(w) = h.sliding_window {
                writeln!(s, "  {:<18} {w}", "sliding_window")?;
            }
        }
        if let Some(e) = &self.hyperparameters_error {
            writeln!(s, "  hyper-parameters unavailable: {e}")?;
        }
        writeln!(s, "metadata:      {} keys", self.metadata.len())?;
        let width = self.metadata.iter().map(|m| m.key.len()).max().unwrap_or(0);
        for m in &self.metadata {
            writeln!(
                s,
                "  {:<width$}  {:<8} {}",
                m.key,
                short_type(&m.value_type),
                m.value
            )?;
        }
        writeln!(
            s,
            "tensors:       {} ({} of data)",
            self.tensor_count,
            mb(self.total_tensor_bytes)
        )?;
        for (name, t) in &self.tensor_types {
            writeln!(s, "  {name:<8} {:>6} tensors  {}", t.count, mb(t.bytes))?;
        }
        match (&self.qfilters, &self.qfilters_error) {
            (Some(q), _) => {
                writeln!(
                    s,
                    "qfilters:      version {}, shape {:?} (layers, kv heads, head dim), source {:?}",
                    q.version, q.shape, q.source
                )?;
                writeln!(
                    s,
                    "  calibration  tokens {}, samples {}",
                    opt(q.calibration.tokens),
                    opt(q.calibration.samples)
                )?;
            }
            (None, Some(e)) => writeln!(s, "qfilters:      invalid: {e}")?,
            (None, None) => writeln!(s, "qfilters:      none")?,
        }
        Ok(())
    }
}

fn short_type(t: &str) -> &str {
    if t.starts_with("array") {
        "array"
    } else {
        t
    }
}
