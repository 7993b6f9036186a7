//! Random-weight llama-architecture GGUF files that llama.cpp loads, for tests and
//! benchmarks. Data is generated in fixed-size chunks by several threads, each writing its
//! chunks at their final offsets, so an 8B-shaped file needs little memory and takes seconds.
//! Quantized types are written as random valid blocks (random quants, small finite scales):
//! nobody runs these weights for their values, and quantizing floats would cost most of the
//! time.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use thiserror::Error;

use crate::gguf::{self, align_up, GgmlType, GgufError, GgufFile, TensorInfo, Value};
use crate::progress::{bytes_bar, Throughput};

/// Values generated per chunk; a multiple of the largest block (Q4_K, 256 values) so blocks
/// never straddle chunks.
const CHUNK_VALUES: usize = 256 * 4096;
const WEIGHT_STD: f32 = 0.02;

#[derive(Debug, Error)]
pub enum SynthError {
    #[error("unknown shape {0:?}; use one of tiny, 135m, 1b, 8b")]
    UnknownShape(String),
    #[error("unsupported weight type {0:?}; use f16, q8_0, q4_0 or q4_k")]
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
    Q4_0,
    /// All matrices Q4_K (what a Q4_K_M file holds for most of its bytes).
    Q4K,
}

impl WeightType {
    pub fn parse(s: &str) -> Result<Self, SynthError> {
        match s.to_ascii_lowercase().as_str() {
            "f16" => Ok(WeightType::F16),
            "q8_0" => Ok(WeightType::Q8_0),
            "q4_0" => Ok(WeightType::Q4_0),
            "q4_k" => Ok(WeightType::Q4K),
            _ => Err(SynthError::UnknownType(s.to_string())),
        }
    }

    fn ggml(self) -> GgmlType {
        match self {
            WeightType::F16 => GgmlType::F16,
            WeightType::Q8_0 => GgmlType::Q8_0,
            WeightType::Q4_0 => GgmlType::Q4_0,
            WeightType::Q4K => GgmlType::Q4K,
        }
    }

    /// llama_ftype: MOSTLY_F16 = 1, MOSTLY_Q4_0 = 2, MOSTLY_Q8_0 = 7, MOSTLY_Q4_K_S = 14.
    fn file_type(self) -> u32 {
        match self {
            WeightType::F16 => 1,
            WeightType::Q4_0 => 2,
            WeightType::Q8_0 => 7,
            WeightType::Q4K => 14,
        }
    }

    /// Values per block: matrix rows must be a whole number of blocks.
    fn block(self) -> u64 {
        match self {
            WeightType::F16 => 1,
            WeightType::Q8_0 | WeightType::Q4_0 => 32,
            WeightType::Q4K => 256,
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
    let b = w.block();
    if s.embd % b != 0 || s.ff % b != 0 {
        return bad(format!(
            "{w:?} needs width and ffn size to be multiples of {b} (its block)"
        ));
    }
    Ok(())
}

/// Writes the synthetic model to `out` (via `OUT.tmp`) with one thread per core.
pub fn write(opts: &SynthOptions, out: &Path, progress: bool) -> Result<Throughput, SynthError> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    write_with_threads(opts, out, progress, threads)
}

/// Writes the synthetic model with `threads` writers (the bytes do not depend on it).
pub fn write_with_threads(
    opts: &SynthOptions,
    out: &Path,
    progress: bool,
    threads: usize,
) -> Result<Throughput, SynthError> {
    let file = plan(opts)?;
    crate::safe_io::check_output(out, &[], false)?;
    crate::edit::write_via_tmp(out, |tmp| {
        write_file(opts, &file, tmp, out, progress, threads.max(1))
    })
}

/// One unit of work: values `[first, first + n)` of tensor `tensor`.
struct Chunk {
    tensor: usize,
    first: u64,
    n: usize,
}

fn write_file(
    opts: &SynthOptions,
    file: &GgufFile,
    w: &mut crate::safe_io::AtomicFile,
    path: &Path,
    progress: bool,
    threads: usize,
) -> Result<u64, SynthError> {
    let werr = |source| SynthError::Write {
        path: path.to_path_buf(),
        source,
    };
    let header = file.header_bytes()?;
    w.write_all(&header).map_err(werr)?;
    let f = w.file()?;
    let base = header.len() as u64;
    let data_end = file
        .tensors
        .last()
        .map_or(0, |t| t.offset.saturating_add(t.size()));
    // Padding between tensors stays zero: the file is sized first, then filled in place.
    f.set_len(base + data_end).map_err(werr)?;

    let mut chunks = Vec::new();
    for (tensor, t) in file.tensors.iter().enumerate() {
        let count: u64 = t.dims.iter().product();
        let mut first = 0;
        while first < count {
            let n = (count - first).min(CHUNK_VALUES as u64) as usize;
            chunks.push(Chunk { tensor, first, n });
            first += n as u64;
        }
    }
    let bar = bytes_bar(progress, data_end, "synth");
    let next = AtomicUsize::new(0);
    let failed: std::sync::Mutex<Option<std::io::Error>> = std::sync::Mutex::new(None);
    std::thread::scope(|scope| {
        for _ in 0..threads.min(chunks.len().max(1)) {
            scope.spawn(|| {
                let mut bytes = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(c) = chunks.get(i) else { break };
                    let t = &file.tensors[c.tensor];
                    // One stream per (tensor, chunk): the bytes do not depend on the threads.
                    let mut rng = SplitMix64::new(
                        opts.seed
                            ^ (c.tensor as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
                            ^ (c.first / CHUNK_VALUES as u64 + 1)
                                .wrapping_mul(0xD1B5_4A32_D192_ED03),
                    );
                    bytes.clear();
                    fill_chunk(t.ggml_type, c.n, &mut rng, &mut bytes);
                    let at = base
                        + t.offset
                        + c.first / t.ggml_type.block_size() * t.ggml_type.type_size();
                    if let Err(e) = write_at(f, &bytes, at) {
                        if let Ok(mut slot) = failed.lock() {
                            slot.get_or_insert(e);
                        }
                        break;
                    }
                    bar.inc(bytes.len() as u64);
                }
            });
        }
    });
    bar.finish_and_clear();
    if let Some(e) = failed.into_inner().ok().flatten() {
        return Err(werr(e));
    }
    // The temporary file is synced and renamed by `AtomicFile::commit`.
    Ok(base + data_end)
}

#[cfg(unix)]
fn write_at(f: &File, bytes: &[u8], at: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::write_all_at(f, bytes, at)
}

#[cfg(windows)]
fn write_at(f: &File, mut bytes: &[u8], mut at: u64) -> std::io::Result<()> {
    while !bytes.is_empty() {
        let n = std::os::windows::fs::FileExt::seek_write(f, bytes, at)?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        bytes = &bytes[n..];
        at += n as u64;
    }
    Ok(())
}

/// Appends `n` values of type `ty` to `out`: ones for F32 (norm weights, like a freshly
/// initialised RMSNorm), bell-shaped values of std 0.02 for F16, random valid blocks otherwise.
fn fill_chunk(ty: GgmlType, n: usize, rng: &mut SplitMix64, out: &mut Vec<u8>) {
    let f16 = |x: f32| half::f16::from_f32(x).to_le_bytes();
    match ty {
        GgmlType::F32 => (0..n).for_each(|_| out.extend_from_slice(&1f32.to_le_bytes())),
        GgmlType::Q8_0 => {
            // x = d * q, q uniform in [-128, 127] (rms ~74): d = 0.02 / 74.
            for _ in 0..n / 32 {
                out.extend_from_slice(&f16(2.7e-4));
                random_bytes(rng, 32, out);
            }
        }
        GgmlType::Q4_0 => {
            // x = d * (q - 8), q uniform in [0, 15] (rms ~4.6): d = 0.02 / 4.6.
            for _ in 0..n / 32 {
                out.extend_from_slice(&f16(4.3e-3));
                random_bytes(rng, 16, out);
            }
        }
        GgmlType::Q4K => {
            // x = d * sc * q - dmin * m with 6-bit sc, m and 4-bit q, all random (rms of
            // sc * q ~ 320): d gives about 0.02, dmin centres the mean.
            for _ in 0..n / 256 {
                out.extend_from_slice(&f16(6.5e-5));
                out.extend_from_slice(&f16(4.9e-4));
                random_bytes(rng, 12 + 128, out);
            }
        }
        _ => (0..n).for_each(|_| out.extend_from_slice(&f16(rng.weight()))),
    }
}

fn random_bytes(rng: &mut SplitMix64, n: usize, out: &mut Vec<u8>) {
    let mut left = n;
    while left > 0 {
        let r = rng.next().to_le_bytes();
        let k = left.min(8);
        out.extend_from_slice(&r[..k]);
        left -= k;
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
