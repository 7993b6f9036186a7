//! Q-Filters: one unit vector per (layer, KV head), in the published safetensors layout or
//! inside a GGUF under `qfilters.*` keys.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::gguf::{self, Array, GgufError, Value};

/// Name of the tensor in published Q-Filters safetensors files.
pub const TENSOR_NAME: &str = "q_filters";
/// File name `save` uses when given a folder.
pub const DEFAULT_FILE_NAME: &str = "model.safetensors";
pub const CONFIG_FILE_NAME: &str = "config.json";
/// `qfilters.source` value for filters made by calibration rather than downloaded.
pub const SOURCE_CALIBRATED: &str = "calibrated";
/// Version of the `qfilters.*` GGUF key layout.
pub const GGUF_LAYOUT_VERSION: u32 = 1;

pub const KEY_PREFIX: &str = "qfilters.";
pub const KEY_VERSION: &str = "qfilters.version";
pub const KEY_LAYER_COUNT: &str = "qfilters.layer_count";
pub const KEY_HEAD_COUNT_KV: &str = "qfilters.head_count_kv";
pub const KEY_HEAD_DIM: &str = "qfilters.head_dim";
pub const KEY_FILTERS: &str = "qfilters.filters";
pub const KEY_SOURCE: &str = "qfilters.source";
pub const KEY_CALIBRATION_TOKENS: &str = "qfilters.calibration.tokens";
pub const KEY_CALIBRATION_SAMPLES: &str = "qfilters.calibration.samples";
/// Extra tensors that travel with the filters (e.g. the query statistics of the
/// `expected-attention` policy): safetensors tensor `NAME` is GGUF keys
/// `qfilters.tensor.NAME` (F32 array) and `qfilters.tensor.NAME.shape` (U32 array). The tools
/// carry them without reading them; whoever uses them checks their own version key in the
/// metadata.
pub const KEY_TENSOR_PREFIX: &str = "qfilters.tensor.";
const SHAPE_SUFFIX: &str = ".shape";

/// Defaults chosen for these filters by measurement (`qfilters calibrate --tune`): safetensors
/// metadata `defaults.NAME` is GGUF key `qfilters.defaults.NAME`. Numbers are typed in GGUF
/// (see [`DEFAULT_KEY_TYPES`]); everything else, e.g. the evidence, is a string.
pub const META_DEFAULTS_PREFIX: &str = "defaults.";
pub const KEY_DEFAULTS_PREFIX: &str = "qfilters.defaults.";
pub const META_DEFAULT_RECENCY: &str = "defaults.recency";
pub const META_DEFAULT_WINDOW: &str = "defaults.window";
pub const META_DEFAULT_GRANULARITY: &str = "defaults.granularity";
/// The policy chosen for the model (a `--policy` value, e.g. `keydiff`, `qfilters+keydiff`):
/// a string, like the granularity. Files without it keep the built-in default policy.
pub const META_DEFAULT_POLICY: &str = "defaults.policy";
pub const META_DEFAULT_EVIDENCE: &str = "defaults.evidence";

/// GGUF types of the numeric defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DefaultKind {
    F32,
    U32,
}
pub const DEFAULT_KEY_TYPES: &[(&str, DefaultKind)] = &[
    (META_DEFAULT_RECENCY, DefaultKind::F32),
    (META_DEFAULT_WINDOW, DefaultKind::U32),
];

/// Safetensors metadata keys carried into and out of GGUF.
pub const META_SOURCE: &str = "source";
pub const META_TOKENS: &str = "tokens";
pub const META_SAMPLES: &str = "samples";

/// A real Q-Filters file is tiny (8B model: 128 KiB); anything far larger is a wrong path.
const MAX_FILE_BYTES: u64 = 256 << 20;

#[derive(Debug, Error)]
pub enum FiltersError {
    #[error(transparent)]
    File(#[from] crate::safe_io::FileError),
    #[error("cannot read {path}: {source}; check the path and permissions")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}; check that the folder exists, is writable and the disk is not full")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no .safetensors file in folder {0}; pass the Q-Filters .safetensors file or the folder that holds it")]
    NoSafetensors(PathBuf),
    #[error("folder {0} holds several .safetensors files and none is named model.safetensors; pass the file itself")]
    AmbiguousFolder(PathBuf),
    #[error("{path} is {size} bytes, far too large for a Q-Filters file; pass the filters file, not a model")]
    TooLarge { path: PathBuf, size: u64 },
    #[error("{path} is not a valid safetensors file ({message}); re-download or re-create it")]
    Safetensors { path: PathBuf, message: String },
    #[error("{path} has no tensor named \"q_filters\" (found: {found}); pass a Q-Filters file")]
    MissingTensor { path: PathBuf, found: String },
    #[error(
        "{path}: tensor q_filters is {dtype}, expected F32, F16 or BF16; re-export it as float32"
    )]
    WrongDtype { path: PathBuf, dtype: String },
    #[error("{path}: tensor q_filters has shape {shape:?}, expected 3 dimensions [layers, kv heads, head dim]; pass a Q-Filters file")]
    WrongRank { path: PathBuf, shape: Vec<usize> },
    #[error("{path} is not a valid Q-Filters config.json ({message}); fix or delete it")]
    BadConfig { path: PathBuf, message: String },
    #[error("{config} says shape {config_shape:?} but the tensor has shape {tensor_shape:?}; the download is inconsistent, fetch both files again")]
    ConfigMismatch {
        config: PathBuf,
        config_shape: [usize; 3],
        tensor_shape: [usize; 3],
    },
    #[error("refusing to overwrite {0}, which is not a Q-Filters config.json; save the filters into their own folder")]
    ForeignConfig(PathBuf),
    #[error("filters of shape [{layers}, {heads}, {dim}] need {expected} values but {got} were given; this is a bug in the caller")]
    LengthMismatch {
        layers: usize,
        heads: usize,
        dim: usize,
        expected: usize,
        got: usize,
    },
    #[error("filter shape [{layers}, {heads}, {dim}] is empty or too large; filters need at least one layer, head and dimension")]
    BadShape {
        layers: usize,
        heads: usize,
        dim: usize,
    },
    #[error("filter value at layer {layer}, kv head {head}, dim {dim} is {value} (not finite); recalibrate or re-download the filters")]
    NonFinite {
        layer: usize,
        head: usize,
        dim: usize,
        value: f32,
    },
    #[error("filters have shape [{}, {}, {}] (layers, kv heads, head dim) but the model needs [{}, {}, {}]; use filters made for this model (calibrate them with `qfilters calibrate` or download the matching published ones)", have[0], have[1], have[2], need[0], need[1], need[2])]
    ShapeMismatch { have: [usize; 3], need: [usize; 3] },
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error("GGUF key {key} is invalid ({why}); strip the qfilters keys with `gguf-tools strip` and embed them again")]
    BadKey { key: String, why: String },
    #[error("qfilters.version is {0} but this tool understands version 1; upgrade gguf-tools")]
    UnsupportedVersion(u64),
}

/// Q-Filters for every (layer, KV head) of one model.
#[derive(Debug, Clone, PartialEq)]
pub struct QFilters {
    pub num_layers: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// Flattened `[layer][kv_head][dim]`. Published convention: the stored vector is the
    /// negated principal direction, so a key's score is `-<k, f>`.
    pub data: Vec<f32>,
    /// `"calibrated"` or the path the filters came from.
    pub source: String,
    /// Provenance, as found in the safetensors `__metadata__`.
    pub metadata: BTreeMap<String, String>,
    /// Extra F32 tensors stored beside `q_filters`, by name (see [`KEY_TENSOR_PREFIX`]).
    pub extra: BTreeMap<String, Extra>,
}

/// An extra tensor carried with the filters: its shape and its values, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Extra {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl Extra {
    /// A tensor whose shape holds exactly `data.len()` values, all finite, with a name the
    /// GGUF keys can carry; `None` otherwise.
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Option<Extra> {
        let n = shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))?;
        (n == data.len() && data.iter().all(|v| v.is_finite())).then_some(Extra { shape, data })
    }
}

/// Names of extra tensors: short, lowercase ASCII, digits and `_`, so they form a GGUF key.
fn valid_extra_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        && name != TENSOR_NAME
}

/// The published `config.json` beside the safetensors file.
#[derive(Debug, Serialize, Deserialize)]
struct Config {
    num_layers: usize,
    num_kv_heads: usize,
    kv_head_dim: usize,
}

impl QFilters {
    pub fn new(
        num_layers: usize,
        num_kv_heads: usize,
        head_dim: usize,
        data: Vec<f32>,
    ) -> Result<Self, FiltersError> {
        let expected = num_layers
            .checked_mul(num_kv_heads)
            .and_then(|n| n.checked_mul(head_dim))
            .filter(|&n| n > 0)
            .ok_or(FiltersError::BadShape {
                layers: num_layers,
                heads: num_kv_heads,
                dim: head_dim,
            })?;
        if data.len() != expected {
            return Err(FiltersError::LengthMismatch {
                layers: num_layers,
                heads: num_kv_heads,
                dim: head_dim,
                expected,
                got: data.len(),
            });
        }
        if let Some(i) = data.iter().position(|v| !v.is_finite()) {
            return Err(FiltersError::NonFinite {
                layer: i / (num_kv_heads * head_dim),
                head: i / head_dim % num_kv_heads,
                dim: i % head_dim,
                value: data.get(i).copied().unwrap_or(f32::NAN),
            });
        }
        Ok(QFilters {
            num_layers,
            num_kv_heads,
            head_dim,
            data,
            source: SOURCE_CALIBRATED.to_string(),
            metadata: BTreeMap::new(),
            extra: BTreeMap::new(),
        })
    }

    pub fn shape(&self) -> [usize; 3] {
        [self.num_layers, self.num_kv_heads, self.head_dim]
    }

    pub fn check_shape(
        &self,
        num_layers: usize,
        num_kv_heads: usize,
        head_dim: usize,
    ) -> Result<(), FiltersError> {
        let need = [num_layers, num_kv_heads, head_dim];
        if self.shape() == need {
            Ok(())
        } else {
            Err(FiltersError::ShapeMismatch {
                have: self.shape(),
                need,
            })
        }
    }

    /// The `head_dim` values of one filter; empty if the indices are out of range.
    pub fn filter(&self, layer: usize, kv_head: usize) -> &[f32] {
        if layer >= self.num_layers || kv_head >= self.num_kv_heads {
            return &[];
        }
        // In range, so this cannot overflow: it is below data.len().
        let start = (layer * self.num_kv_heads + kv_head) * self.head_dim;
        self.data.get(start..start + self.head_dim).unwrap_or(&[])
    }

    /// Loads a `.safetensors` file, or the single one in a folder, checking `config.json`.
    pub fn load(path: &Path) -> Result<Self, FiltersError> {
        let file = resolve_file(path)?;
        let read_err = |source| FiltersError::Read {
            path: file.clone(),
            source,
        };
        let size = fs::metadata(&file).map_err(read_err)?.len();
        if size > MAX_FILE_BYTES {
            return Err(FiltersError::TooLarge { path: file, size });
        }
        // The length above is only a first check: special files report 0.
        let bytes = crate::safe_io::read_input(&file, MAX_FILE_BYTES)?;
        let st_err = |e: safetensors::SafeTensorError| FiltersError::Safetensors {
            path: file.clone(),
            message: e.to_string(),
        };
        let (_, header) = SafeTensors::read_metadata(&bytes).map_err(st_err)?;
        let tensors = SafeTensors::deserialize(&bytes).map_err(st_err)?;
        let view = tensors.tensor(TENSOR_NAME).map_err(|_| {
            let mut names: Vec<&str> = tensors.names().into_iter().map(String::as_str).collect();
            names.sort_unstable();
            FiltersError::MissingTensor {
                path: file.clone(),
                found: names.join(", "),
            }
        })?;
        let [layers, heads, dim] = match *view.shape() {
            [l, h, d] => [l, h, d],
            _ => {
                return Err(FiltersError::WrongRank {
                    path: file.clone(),
                    shape: view.shape().to_vec(),
                })
            }
        };
        let data = decode(view.dtype(), view.data()).ok_or_else(|| FiltersError::WrongDtype {
            path: file.clone(),
            dtype: format!("{:?}", view.dtype()),
        })?;
        check_config(&file, [layers, heads, dim])?;

        let mut filters = QFilters::new(layers, heads, dim, data)?;
        for name in tensors.names() {
            if name == TENSOR_NAME || !valid_extra_name(name) {
                continue;
            }
            let bad = |why: &str| FiltersError::Safetensors {
                path: file.clone(),
                message: format!("tensor {name}: {why}"),
            };
            let view = tensors.tensor(name).map_err(|e| bad(&e.to_string()))?;
            let data =
                decode(view.dtype(), view.data()).ok_or_else(|| bad("not F32, F16 or BF16"))?;
            let extra = Extra::new(view.shape().to_vec(), data)
                .ok_or_else(|| bad("holds a value that is not finite"))?;
            filters.extra.insert(name.clone(), extra);
        }
        filters.metadata = header
            .metadata()
            .as_ref()
            .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default();
        filters.source = match filters.metadata.get(META_SOURCE).map(String::as_str) {
            Some(SOURCE_CALIBRATED) => SOURCE_CALIBRATED.to_string(),
            _ => file.display().to_string(),
        };
        Ok(filters)
    }

    /// Writes the published layout: F32 tensor `q_filters` [L, H, D] with the provenance as
    /// `__metadata__`, and `config.json` in the same folder. `path` is the `.safetensors`
    /// file, or a folder that receives `model.safetensors`.
    pub fn save(&self, path: &Path) -> Result<(), FiltersError> {
        let (dir, file) = save_layout(path);
        let write_err = |p: &Path| {
            let p = p.to_path_buf();
            move |source| FiltersError::Write { path: p, source }
        };
        fs::create_dir_all(&dir).map_err(write_err(&dir))?;
        let config_path = dir.join(CONFIG_FILE_NAME);
        if config_path.exists() && read_config(&config_path)?.is_none() {
            return Err(FiltersError::ForeignConfig(config_path));
        }

        let bytes = safetensors_bytes(
            self.shape(),
            &self.data,
            &self.extra,
            &self.metadata,
            &self.source,
        );
        crate::safe_io::write_file(&file, &bytes)?;

        let config = Config {
            num_layers: self.num_layers,
            num_kv_heads: self.num_kv_heads,
            kv_head_dim: self.head_dim,
        };
        let json = serde_json::to_string_pretty(&config).map_err(|e| FiltersError::BadConfig {
            path: config_path.clone(),
            message: e.to_string(),
        })?;
        crate::safe_io::write_file(&config_path, (json + "\n").as_bytes())?;
        Ok(())
    }

    /// Everything [`save`](Self::save) to `path` can check before the work: the destinations
    /// are regular files or absent, none is one of `inputs`, the folder can be made.
    pub fn check_save(path: &Path, inputs: &[&Path]) -> Result<(), FiltersError> {
        let (dir, file) = save_layout(path);
        let config = dir.join(CONFIG_FILE_NAME);
        crate::safe_io::check_output_in_folder(&dir, &[&file, &config], inputs)?;
        Ok(())
    }

    /// The files [`save`](Self::save) writes for `path`: the .safetensors file and the
    /// config.json beside it.
    pub fn save_paths(path: &Path) -> [PathBuf; 2] {
        let (dir, file) = save_layout(path);
        [file, dir.join(CONFIG_FILE_NAME)]
    }

    /// The filters stored in a GGUF's `qfilters.*` keys, or `None` if it has none.
    pub fn from_gguf(path: &Path) -> Result<Option<Self>, FiltersError> {
        let file = gguf::read(path)?;
        Self::from_metadata(&file.metadata)
    }

    /// Decodes `qfilters.*` keys from a GGUF metadata list.
    pub fn from_metadata(metadata: &[(String, Value)]) -> Result<Option<Self>, FiltersError> {
        if !metadata.iter().any(|(k, _)| k.starts_with(KEY_PREFIX)) {
            return Ok(None);
        }
        let get = |key: &str| {
            metadata
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v)
                .ok_or_else(|| bad_key(key, "missing"))
        };
        let int = |key: &str| -> Result<u64, FiltersError> {
            let v = get(key)?;
            v.as_u64()
                .ok_or_else(|| bad_key(key, &format!("a {}, not an integer", v.type_name())))
        };
        let dim = |key: &str| -> Result<usize, FiltersError> {
            usize::try_from(int(key)?).map_err(|_| bad_key(key, "too large"))
        };
        let version = int(KEY_VERSION)?;
        if version != u64::from(GGUF_LAYOUT_VERSION) {
            return Err(FiltersError::UnsupportedVersion(version));
        }
        let (layers, heads, head_dim) = (
            dim(KEY_LAYER_COUNT)?,
            dim(KEY_HEAD_COUNT_KV)?,
            dim(KEY_HEAD_DIM)?,
        );
        let data = match get(KEY_FILTERS)? {
            Value::Array(Array::F32(v)) => v.clone(),
            other => {
                return Err(bad_key(
                    KEY_FILTERS,
                    &format!("a {}, not an array of f32", other.type_name()),
                ))
            }
        };
        let mut filters = QFilters::new(layers, heads, head_dim, data)?;
        let source = match get(KEY_SOURCE) {
            Ok(Value::String(s)) => s.to_string_lossy(),
            Ok(other) => {
                return Err(bad_key(
                    KEY_SOURCE,
                    &format!("a {}, not a string", other.type_name()),
                ))
            }
            Err(_) => String::new(),
        };
        filters
            .metadata
            .insert(META_SOURCE.to_string(), source.clone());
        filters.source = source;
        for (key, meta) in [
            (KEY_CALIBRATION_TOKENS, META_TOKENS),
            (KEY_CALIBRATION_SAMPLES, META_SAMPLES),
        ] {
            if get(key).is_ok() {
                filters
                    .metadata
                    .insert(meta.to_string(), int(key)?.to_string());
            }
        }
        for (key, value) in metadata {
            let Some(name) = key.strip_prefix(KEY_TENSOR_PREFIX) else {
                continue;
            };
            if name.ends_with(SHAPE_SUFFIX) {
                continue;
            }
            let data = match value {
                Value::Array(Array::F32(v)) => v.clone(),
                other => {
                    return Err(bad_key(
                        key,
                        &format!("a {}, not an array of f32", other.type_name()),
                    ))
                }
            };
            let shape_key = format!("{key}{SHAPE_SUFFIX}");
            let shape = match get(&shape_key)? {
                Value::Array(Array::U32(v)) => v.iter().map(|&d| d as usize).collect(),
                other => {
                    return Err(bad_key(
                        &shape_key,
                        &format!("a {}, not an array of u32", other.type_name()),
                    ))
                }
            };
            if !valid_extra_name(name) {
                return Err(bad_key(key, "not a valid tensor name"));
            }
            let extra = Extra::new(shape, data).ok_or_else(|| {
                bad_key(
                    key,
                    "its shape does not match its values, or a value is not finite",
                )
            })?;
            filters.extra.insert(name.to_string(), extra);
        }
        for (key, value) in metadata {
            let Some(name) = key.strip_prefix(KEY_DEFAULTS_PREFIX) else {
                continue;
            };
            let text = match value {
                Value::F32(x) => x.to_string(),
                Value::String(s) => s.to_string_lossy(),
                other => match other.as_u64() {
                    Some(n) => n.to_string(),
                    None => {
                        return Err(bad_key(
                            key,
                            &format!("a {}, not a number or string", other.type_name()),
                        ))
                    }
                },
            };
            filters
                .metadata
                .insert(format!("{META_DEFAULTS_PREFIX}{name}"), text);
        }
        Ok(Some(filters))
    }

    /// The `qfilters.*` keys for a GGUF, in a fixed order. `source` is what goes into
    /// `qfilters.source`.
    pub fn to_metadata(&self, source: &str) -> Result<Vec<(String, Value)>, FiltersError> {
        let u32_of = |key: &str, n: usize| {
            u32::try_from(n).map_err(|_| bad_key(key, &format!("{n} does not fit in a u32")))
        };
        let mut out = vec![
            (KEY_VERSION.to_string(), Value::U32(GGUF_LAYOUT_VERSION)),
            (
                KEY_LAYER_COUNT.to_string(),
                Value::U32(u32_of(KEY_LAYER_COUNT, self.num_layers)?),
            ),
            (
                KEY_HEAD_COUNT_KV.to_string(),
                Value::U32(u32_of(KEY_HEAD_COUNT_KV, self.num_kv_heads)?),
            ),
            (
                KEY_HEAD_DIM.to_string(),
                Value::U32(u32_of(KEY_HEAD_DIM, self.head_dim)?),
            ),
            (
                KEY_FILTERS.to_string(),
                Value::Array(Array::F32(self.data.clone())),
            ),
            (KEY_SOURCE.to_string(), Value::from(source)),
        ];
        // Counts that do not parse as a u32 are provenance we cannot represent; they are
        // left out rather than failing the embed.
        for (key, meta) in [
            (KEY_CALIBRATION_TOKENS, META_TOKENS),
            (KEY_CALIBRATION_SAMPLES, META_SAMPLES),
        ] {
            if let Some(n) = self
                .metadata
                .get(meta)
                .and_then(|s| s.trim().parse::<u32>().ok())
            {
                out.push((key.to_string(), Value::U32(n)));
            }
        }
        for (name, extra) in &self.extra {
            let key = format!("{KEY_TENSOR_PREFIX}{name}");
            if !valid_extra_name(name) {
                return Err(bad_key(&key, "not a valid tensor name"));
            }
            let shape = extra
                .shape
                .iter()
                .map(|&d| u32_of(&key, d))
                .collect::<Result<Vec<u32>, _>>()?;
            out.push((
                format!("{key}{SHAPE_SUFFIX}"),
                Value::Array(Array::U32(shape)),
            ));
            out.push((key, Value::Array(Array::F32(extra.data.clone()))));
        }
        for (meta, text) in &self.metadata {
            let Some(name) = meta.strip_prefix(META_DEFAULTS_PREFIX) else {
                continue;
            };
            let key = format!("{KEY_DEFAULTS_PREFIX}{name}");
            let kind = DEFAULT_KEY_TYPES
                .iter()
                .find(|(m, _)| m == meta)
                .map(|(_, k)| *k);
            let value = match kind {
                Some(DefaultKind::F32) => Value::F32(text.trim().parse::<f32>().map_err(|_| {
                    bad_key(&key, &format!("metadata value {text:?} is not a number"))
                })?),
                Some(DefaultKind::U32) => Value::U32(text.trim().parse::<u32>().map_err(|_| {
                    bad_key(&key, &format!("metadata value {text:?} is not a u32"))
                })?),
                None => Value::from(text.as_str()),
            };
            out.push((key, value));
        }
        Ok(out)
    }
}

fn bad_key(key: &str, why: &str) -> FiltersError {
    FiltersError::BadKey {
        key: key.to_string(),
        why: why.to_string(),
    }
}

/// Little-endian F32/F16/BF16 bytes as f32 (widening is exact).
fn decode(dtype: Dtype, bytes: &[u8]) -> Option<Vec<f32>> {
    match dtype {
        Dtype::F32 => Some(
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        ),
        Dtype::F16 => Some(
            bytes
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
        ),
        Dtype::BF16 => Some(
            bytes
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
        ),
        _ => None,
    }
}

/// The folder and .safetensors file that `save(path)` writes.
fn save_layout(path: &Path) -> (PathBuf, PathBuf) {
    if path.extension().is_some_and(|e| e == "safetensors") {
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        (dir, path.to_path_buf())
    } else {
        (path.to_path_buf(), path.join(DEFAULT_FILE_NAME))
    }
}

/// The .safetensors file `path` names: itself, or the one in the folder it names.
pub fn resolve_file(path: &Path) -> Result<PathBuf, FiltersError> {
    if !path.is_dir() {
        return Ok(path.to_path_buf());
    }
    let entries = fs::read_dir(path).map_err(|source| FiltersError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let mut found: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors") && p.is_file())
        .collect();
    found.sort();
    match found.as_slice() {
        [] => Err(FiltersError::NoSafetensors(path.to_path_buf())),
        [only] => Ok(only.clone()),
        many => many
            .iter()
            .find(|p| p.file_name().is_some_and(|n| n == DEFAULT_FILE_NAME))
            .cloned()
            .ok_or_else(|| FiltersError::AmbiguousFolder(path.to_path_buf())),
    }
}

/// Parses a config.json; `None` if it is JSON but not a Q-Filters config (for example a
/// model's own config.json sitting in the same folder).
fn read_config(path: &Path) -> Result<Option<Config>, FiltersError> {
    // A config.json is a few lines; 1 MiB bounds a FIFO or device planted under that name.
    let bytes = crate::safe_io::read_input(path, 1 << 20)?;
    let text = String::from_utf8(bytes).map_err(|_| FiltersError::BadConfig {
        path: path.to_path_buf(),
        message: "not UTF-8".into(),
    })?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| FiltersError::BadConfig {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    let ours = ["num_layers", "num_kv_heads", "kv_head_dim"]
        .iter()
        .any(|k| json.get(k).is_some());
    if !ours {
        return Ok(None);
    }
    serde_json::from_value(json)
        .map(Some)
        .map_err(|e| FiltersError::BadConfig {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
}

fn check_config(file: &Path, tensor_shape: [usize; 3]) -> Result<(), FiltersError> {
    let config_path = match file.parent() {
        Some(p) => p.join(CONFIG_FILE_NAME),
        None => return Ok(()),
    };
    if !config_path.is_file() {
        return Ok(());
    }
    let Some(c) = read_config(&config_path)? else {
        return Ok(());
    };
    let config_shape = [c.num_layers, c.num_kv_heads, c.kv_head_dim];
    if config_shape != tensor_shape {
        return Err(FiltersError::ConfigMismatch {
            config: config_path,
            config_shape,
            tensor_shape,
        });
    }
    Ok(())
}

/// F32 tensors in the safetensors format (`q_filters` first, then the extras by name), written
/// by hand so that the bytes depend only on the content: the `safetensors` crate stores
/// `__metadata__` from a HashMap, whose order varies from run to run, and calibration promises
/// identical files for identical inputs.
fn safetensors_bytes(
    shape: [usize; 3],
    data: &[f32],
    extra: &BTreeMap<String, Extra>,
    metadata: &BTreeMap<String, String>,
    source: &str,
) -> Vec<u8> {
    let mut meta = metadata.clone();
    meta.insert(META_SOURCE.to_string(), source.to_string());
    let mut tensors: Vec<(&str, Vec<usize>, &[f32])> = vec![(TENSOR_NAME, shape.to_vec(), data)];
    for (name, e) in extra {
        tensors.push((name, e.shape.clone(), &e.data));
    }
    // The header's key order is fixed either way serde_json is built: sorted, or (with
    // `preserve_order`, which the workspace enables) as inserted here; offsets are explicit.
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::json!(meta));
    let mut offset = 0;
    for (name, shape, values) in &tensors {
        let end = offset + values.len() * 4;
        header.insert(
            name.to_string(),
            serde_json::json!({ "dtype": "F32", "shape": shape, "data_offsets": [offset, end] }),
        );
        offset = end;
    }
    let mut header = serde_json::Value::Object(header).to_string().into_bytes();
    // The data section starts 8-byte aligned; the format pads the header with spaces.
    while header.len() % 8 != 0 {
        header.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + header.len() + offset);
    out.extend_from_slice(&(header.len() as u64).to_le_bytes());
    out.extend_from_slice(&header);
    for (_, _, values) in &tensors {
        for v in *values {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
    out
}
