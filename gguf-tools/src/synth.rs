//! Random-weight llama-architecture GGUF files that llama.cpp loads, for tests and
//! benchmarks. Data is generated and written tensor by tensor in fixed-size chunks, so an
//! 8B-shaped file needs no more memory than a tiny one.

use std::io::Write;
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::gguf::{self, align_up, GgmlType, GgufError, GgufFile, TensorInfo, Value};
use crate::progress::{bytes_bar, Throughput};

/// Values generated per chunk; a multiple of the Q8_0 block so blocks never straddle chunks.
const CHUNK_VALUES: usize = 32 * 8192;
const WEIGHT_STD: f32 = 0.02;

#[derive(Debug, Error)]
pub enum SynthError {
    #[error("unknown shape {0:?}; use one of tiny, 135m, 1b, 8b")]
    UnknownShape(String),
    #[error("unsupported weight type {0:?}; use f16 or q8_0")]
    UnknownType(String),
    #[error("invalid shape: {0}")]
    BadShape(String),
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error(transparent)]
    File(#[from] crate::safe_io::FileError),
    #[error(
        "cannot write {path}: {source}; check that the folder is writable and the disk has room"
    )]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Model dimensions of a llama-architecture network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    pub name: &'static str,
    pub layers: u64,
    pub embd: u64,
    pub heads: u64,
    pub kv_heads: u64,
    pub ff: u64,
    pub vocab: u64,
}

impl Shape {
    pub fn head_dim(&self) -> u64 {
        self.embd.checked_div(self.heads).unwrap_or(0)
    }
}

pub const SHAPES: &[Shape] = &[
    Shape {
        name: "tiny",
        layers: 2,
        embd: 64,
        heads: 4,
        kv_heads: 2,
        ff: 128,
        vocab: 256,
    },
    // SmolLM2-135M
    Shape {
        name: "135m",
        layers: 30,
        embd: 576,
        heads: 9,
        kv_heads: 3,
        ff: 1536,
        vocab: 32000,
    },
    // Llama-3.2-1B
    Shape {
        name: "1b",
        layers: 16,
        embd: 2048,
        heads: 32,
        kv_heads: 8,
        ff: 8192,
        vocab: 32000,
    },
    // Llama-3.1-8B
    Shape {
        name: "8b",
        layers: 32,
        embd: 4096,
        heads: 32,
        kv_heads: 8,
        ff: 14336,
        vocab: 32000,
    },
];

pub fn shape_by_name(name: &str) -> Result<Shape, SynthError> {
    SHAPES
        .iter()
        .find(|s| s.name.eq_ignore_ascii_case(name))
        .copied()
        .ok_or_else(|| SynthError::UnknownShape(name.to_string()))
}

/// Storage type of the matrices (norm vectors are always F32, as llama.cpp expects).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightType {
    F16,
    Q8_0,
}

impl WeightType {
    pub fn parse(s: &str) -> Result<Self, SynthError> {
        match s.to_ascii_lowercase().as_str() {
            "f16" => Ok(WeightType::F16),
            "q8_0" => Ok(WeightType::Q8_0),
            _ => Err(SynthError::UnknownType(s.to_string())),
        }
    }

    fn ggml(self) -> GgmlType {
        match self {
            WeightType::F16 => GgmlType::F16,
            WeightType::Q8_0 => GgmlType::Q8_0,
        }
    }

    /// llama_ftype: MOSTLY_F16 = 1, MOSTLY_Q8_0 = 7.
    fn file_type(self) -> u32 {
        match self {
            WeightType::F16 => 1,
            WeightType::Q8_0 => 7,
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct SynthOptions {
    pub shape: Shape,
    pub weight_type: WeightType,
    pub seed: u64,
}

/// The header of the file `write` produces: metadata and tensor infos with final offsets.
pub fn plan(opts: &SynthOptions) -> Result<GgufFile, SynthError> {
    let s = opts.shape;
    validate(&s, opts.weight_type)?;
    let u32_of = |n: u64, what: &str| {
        u32::try_from(n)
            .map_err(|_| SynthError::BadShape(format!("{what} {n} does not fit in a u32")))
    };
    let arch = "llama";
    let metadata: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::from(arch)),
        (
            "general.name".into(),
            Value::from(format!("qfilters-synth-{}", s.name).as_str()),
        ),
        (
            "general.file_type".into(),
            Value::U32(opts.weight_type.file_type()),
        ),
        (
            "llama.block_count".into(),
            Value::U32(u32_of(s.layers, "layers")?),
        ),
        ("llama.context_length".into(), Value::U32(131_072)),
        (
            "llama.embedding_length".into(),
            Value::U32(u32_of(s.embd, "width")?),
        ),
        (
            "llama.feed_forward_length".into(),
            Value::U32(u32_of(s.ff, "ffn")?),
        ),
        (
            "llama.attention.head_count".into(),
            Value::U32(u32_of(s.heads, "heads")?),
        ),
        (
            "llama.attention.head_count_kv".into(),
            Value::U32(u32_of(s.kv_heads, "kv heads")?),
        ),
        ("llama.rope.freq_base".into(), Value::F32(500_000.0)),
        (
            "llama.attention.layer_norm_rms_epsilon".into(),
            Value::F32(1e-5),
        ),
        (
            "llama.vocab_size".into(),
            Value::U32(u32_of(s.vocab, "vocab")?),
        ),
        // "none" makes llama.cpp create llama.vocab_size dummy tokens instead of a tokenizer.
        ("tokenizer.ggml.model".into(), Value::from("none")),
    ];

    let w = opts.weight_type.ggml();
    let kv = s.kv_heads * s.head_dim();
    let mut shapes: Vec<(String, Vec<u64>, GgmlType)> = vec![
        ("token_embd.weight".into(), vec![s.embd, s.vocab], w),
        ("output_norm.weight".into(), vec![s.embd], GgmlType::F32),
        ("output.weight".into(), vec![s.embd, s.vocab], w),
    ];
    for i in 0..s.layers {
        let b = |n: &str| format!("blk.{i}.{n}.weight");
        shapes.extend([
            (b("attn_norm"), vec![s.embd], GgmlType::F32),
            (b("attn_q"), vec![s.embd, s.embd], w),
            (b("attn_k"), vec![s.embd, kv], w),
            (b("attn_v"), vec![s.embd, kv], w),
            (b("attn_output"), vec![s.embd, s.embd], w),
            (b("ffn_norm"), vec![s.embd], GgmlType::F32),
            (b("ffn_gate"), vec![s.embd, s.ff], w),
            (b("ffn_up"), vec![s.embd, s.ff], w),
            (b("ffn_down"), vec![s.ff, s.embd], w),
        ]);
    }

    let mut tensors = Vec::with_capacity(shapes.len());
    let mut offset = 0u64;
    for (name, dims, ggml_type) in shapes {
        let info = TensorInfo {
            name,
            dims,
            ggml_type,
            offset,
        };
        let size = info.checked_size()?;
        // llama.cpp requires each offset to be exactly the previous end, padded.
        offset = offset
            .checked_add(size)
            .and_then(|end| align_up(end, gguf::DEFAULT_ALIGNMENT))
            .ok_or_else(|| SynthError::BadShape("model too large".into()))?;
        tensors.push(info);
    }
    let file = GgufFile::new(metadata, tensors)?;
    // The same check `qfilters` runs before llama.cpp sees a model: synth never writes a file
    // that llama.cpp would abort on.
    crate::model::check_loadable(&file).map_err(|e| SynthError::BadShape(e.to_string()))?;
    Ok(file)
}

fn validate(s: &Shape, w: WeightType) -> Result<(), SynthError> {
    let bad = |m: String| Err(SynthError::BadShape(m));
    if s.layers == 0 || s.embd == 0 || s.heads == 0 || s.kv_heads == 0 || s.ff == 0 || s.vocab == 0
    {
        return bad("every dimension must be at least 1".into());
    }
    if s.layers > crate::model::MAX_LAYERS {
        return bad(format!(
            "{} layers: llama.cpp loads at most {}",
            s.layers,
            crate::model::MAX_LAYERS
        ));
    }
    if s.embd % s.heads != 0 {
        return bad(format!(
            "width {} is not divisible by {} heads",
            s.embd, s.heads
        ));
    }
    if s.heads % s.kv_heads != 0 {
        return bad(format!(
            "{} heads are not divisible by {} kv heads",
            s.heads, s.kv_heads
        ));
    }
    if w == WeightType::Q8_0 && (s.embd % 32 != 0 || s.ff % 32 != 0) {
        return bad("q8_0 needs width and ffn size to be multiples of 32".into());
    }
    Ok(())
}

/// Writes the synthetic model to `out` (via `OUT.tmp`) and returns bytes written and time.
pub fn write(opts: &SynthOptions, out: &Path, progress: bool) -> Result<Throughput, SynthError> {
    let file = plan(opts)?;
    crate::safe_io::check_output(out, &[], false)?;
    crate::edit::write_via_tmp(out, |tmp| write_file(opts, &file, tmp, out, progress))
}

fn write_file(
    opts: &SynthOptions,
    file: &GgufFile,
    w: &mut crate::safe_io::AtomicFile,
    path: &Path,
    progress: bool,
) -> Result<u64, SynthError> {
    let werr = |source| SynthError::Write {
        path: path.to_path_buf(),
        source,
    };
    let header = file.header_bytes()?;
    w.write_all(&header).map_err(werr)?;

    let total = file
        .tensors
        .last()
        .map_or(0, |t| t.offset.saturating_add(t.size()));
    let bar = bytes_bar(progress, total, "synth");
    let mut written = 0u64;
    let mut values = vec![0f32; CHUNK_VALUES];
    let mut bytes = Vec::with_capacity(CHUNK_VALUES * 2);
    for (index, t) in file.tensors.iter().enumerate() {
        // Zero padding up to this tensor's offset.
        let pad = t.offset.saturating_sub(written);
        w.write_all(&vec![0u8; usize::try_from(pad).unwrap_or(0)])
            .map_err(werr)?;
        written += pad;

        let mut rng =
            SplitMix64::new(opts.seed ^ (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let count: u64 = t.dims.iter().product();
        let mut left = count;
        while left > 0 {
            let n = usize::try_from(left).map_or(CHUNK_VALUES, |l| l.min(CHUNK_VALUES));
            let chunk = values.get_mut(..n).unwrap_or_default();
            bytes.clear();
            if t.ggml_type == GgmlType::F32 {
                // Norm weights: ones, like a freshly initialised RMSNorm.
                chunk
                    .iter()
                    .for_each(|_| bytes.extend_from_slice(&1f32.to_le_bytes()));
            } else {
                chunk.iter_mut().for_each(|v| *v = rng.weight());
                match t.ggml_type {
                    GgmlType::Q8_0 => encode_q8_0(chunk, &mut bytes),
                    _ => chunk.iter().for_each(|&v| {
                        bytes.extend_from_slice(&half::f16::from_f32(v).to_le_bytes())
                    }),
                }
            }
            w.write_all(&bytes).map_err(werr)?;
            written += bytes.len() as u64;
            bar.inc(bytes.len() as u64);
            left -= n as u64;
        }
    }
    bar.finish_and_clear();
    Ok(header.len() as u64 + written)
}

/// ggml's Q8_0: per 32 values an f16 scale d = max|x| / 127, then 32 rounded i8 quants.
pub fn encode_q8_0(values: &[f32], out: &mut Vec<u8>) {
    for block in values.chunks(32) {
        let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let inv = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&half::f16::from_f32(d).to_le_bytes());
        for i in 0..32 {
            let q = block.get(i).map_or(0.0, |v| (v * inv).round());
            out.push(q.clamp(-127.0, 127.0) as i8 as u8);
        }
    }
}

/// SplitMix64: tiny, fast and good enough for weights nobody will train on.
struct SplitMix64(u64);

impl SplitMix64 {
    fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A bell-shaped value with standard deviation 0.02: the sum of four 16-bit uniforms
    /// (Irwin-Hall) costs one PRNG call and no transcendental functions, unlike Box-Muller.
    fn weight(&mut self) -> f32 {
        let r = self.next();
        let sum = (r & 0xFFFF) + ((r >> 16) & 0xFFFF) + ((r >> 32) & 0xFFFF) + (r >> 48);
        // Each uniform has variance 1/12, so four have variance 1/3.
        let centered = sum as f32 / 65535.0 - 2.0;
        centered * (WEIGHT_STD * 3f32.sqrt())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q8_0_block_layout() {
        let vals: Vec<f32> = (0..32).map(|i| i as f32 - 16.0).collect();
        let mut out = Vec::new();
        encode_q8_0(&vals, &mut out);
        assert_eq!(out.len(), 34);
        let d = half::f16::from_le_bytes([out[0], out[1]]).to_f32();
        assert!((d - 16.0 / 127.0).abs() < 1e-3);
        assert_eq!(out[2] as i8, -127);
        assert_eq!(out[2 + 16] as i8, 0);
    }

    #[test]
    fn weights_have_the_intended_spread() {
        let mut rng = SplitMix64::new(7);
        let n = 100_000;
        let xs: Vec<f32> = (0..n).map(|_| rng.weight()).collect();
        let mean = xs.iter().sum::<f32>() / n as f32;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / n as f32;
        assert!(mean.abs() < 1e-3, "mean {mean}");
        assert!((var.sqrt() - WEIGHT_STD).abs() < 1e-3, "std {}", var.sqrt());
    }

    #[test]
    fn offsets_are_contiguous_and_aligned() {
        let opts = SynthOptions {
            shape: shape_by_name("tiny").unwrap(),
            weight_type: WeightType::Q8_0,
            seed: 1,
        };
        let f = plan(&opts).unwrap();
        let mut expected = 0;
        for t in &f.tensors {
            assert_eq!(t.offset, expected, "{}", t.name);
            expected = align_up(t.offset + t.size(), 32).unwrap();
        }
        assert_eq!(f.tensors.len(), 3 + 9 * 2);
    }
}
