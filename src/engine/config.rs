//! What an engine is asked to be: where keys are read, how big the cache is and whether it
//! evicts, and how many cells the llama.cpp context gets for that.

use crate::engine::cache::{EvictionConfig, Granularity};
use crate::error::{Error, Result};
use crate::ffi::CacheType;

/// Where the hook reads the post-RoPE keys of new tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeySource {
    /// From the KV cache rows the decode just wrote, after `llama_decode` returns: no graph
    /// split, no synchronisation inside the graph. Scored where the cache lives (one small
    /// ggml graph per eviction round on the cache's backend, only n x heads floats come back)
    /// when the policy's score is a per-head reduction of the key; else as `Host`. The default.
    Cache,
    /// Like `Cache`, but the K rows are always copied to the host and scored there (the
    /// reference for the device path).
    Host,
    /// From the `Kcur-<layer>` ROPE nodes while the graph runs: one graph split per layer.
    /// The simple reference path.
    Graph,
}

impl std::str::FromStr for KeySource {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "cache" => Ok(KeySource::Cache),
            "host" => Ok(KeySource::Host),
            "graph" => Ok(KeySource::Graph),
            _ => Err(Error::invalid(format!(
                "unknown key source '{s}' (known: cache, host, graph)"
            ))),
        }
    }
}

impl std::fmt::Display for KeySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KeySource::Cache => "cache",
            KeySource::Host => "host",
            KeySource::Graph => "graph",
        })
    }
}

/// How big the KV cache is, and whether it is kept there by eviction: the one place that says
/// whether an engine evicts.
#[derive(Debug, Clone)]
pub enum CacheSize {
    /// Evict the lowest-scoring tokens after every decode, down to the budget.
    Bounded(EvictionConfig),
    /// No eviction: a context of `capacity` cells; a decode that would need more fails with
    /// [`Error::FullCacheOverflow`]. The quality reference (policy `none`).
    Full { capacity: usize },
}

#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub cache: CacheSize,
    /// The most tokens the job will ever feed (prompt + generated), when known. It caps the
    /// context of a bounded cache, since a cache never holds more cells than tokens it was
    /// given (`run --budget 100000` on 9 tokens needs 9 cells); `None` for an open-ended job
    /// (a chat). A full cache is sized by its capacity alone.
    pub job_tokens: Option<usize>,
    pub n_batch: usize,
    pub threads: i32,
    pub key_source: KeySource,
    pub flash_attn: Option<bool>,
    /// Storage types of the K and V caches (llama.cpp's -ctk, -ctv).
    pub type_k: CacheType,
    pub type_v: CacheType,
    /// Install the graph hook; only a benchmark's "hook off" baseline turns it off (then
    /// nothing can be evicted by score).
    pub hook: bool,
}

/// Tokens decoded per `llama_decode` unless the caller says otherwise (the CLI's `--batch`).
pub const DEFAULT_BATCH: usize = 256;

impl EngineConfig {
    /// A cache kept within `eviction.budget` cells, with the defaults of every other knob:
    /// keys read from the cache, llama.cpp's flash-attention choice, the default thread count.
    pub fn bounded(eviction: EvictionConfig) -> EngineConfig {
        EngineConfig::with_cache(CacheSize::Bounded(eviction))
    }

    /// A full cache of `capacity` cells that never evicts, with the same defaults.
    pub fn full(capacity: usize) -> EngineConfig {
        EngineConfig::with_cache(CacheSize::Full { capacity })
    }

    fn with_cache(cache: CacheSize) -> EngineConfig {
        EngineConfig {
            cache,
            job_tokens: None,
            n_batch: DEFAULT_BATCH,
            threads: crate::ffi::threads::default_threads(),
            key_source: KeySource::Cache,
            flash_attn: None,
            type_k: CacheType::F16,
            type_v: CacheType::F16,
            hook: true,
        }
    }

    /// The eviction knobs of a bounded cache.
    pub fn eviction(&self) -> Option<&EvictionConfig> {
        match &self.cache {
            CacheSize::Bounded(ev) => Some(ev),
            CacheSize::Full { .. } => None,
        }
    }

    /// Whether eviction keeps tokens per KV head, moving head slices between cells (which
    /// needs V stored one row per cell: flash attention).
    pub fn moves_heads(&self) -> bool {
        self.eviction()
            .is_some_and(|e| e.granularity == Granularity::Head)
    }
}

/// The KV cells a context needs for `cache`, fed in batches of `n_batch`, for a model whose
/// sliding-window layers (if any) see `n_swa` positions.
///
/// A bounded cache holds the budget plus one batch of new tokens, plus a margin for
/// llama.cpp's slot search, and never more than the job's tokens (`run --budget 100000` on 9
/// tokens needs 9 cells). Models with sliding-window layers (Gemma 3) get a second, smaller
/// KV cache for them, which llama.cpp prunes by itself; only the full-attention layers may be
/// tracked, and the engine tells them apart by cache size, so the full cache must be larger
/// than the SWA one (llama.cpp sizes that at about n_swa + n_batch, padded to 256): a budget
/// below the window would give both the same size and the book would follow the wrong cells.
/// A full cache holds its capacity plus one cell.
pub fn context_cells(
    cache: &CacheSize,
    job_tokens: Option<usize>,
    n_batch: usize,
    n_swa: usize,
) -> Result<usize> {
    let n_batch = n_batch.max(1);
    match cache {
        CacheSize::Full { capacity } => (*capacity).max(1).checked_add(1).ok_or_else(|| {
            Error::invalid(format!("a full cache of {capacity} cells is too large"))
        }),
        CacheSize::Bounded(ev) => {
            let too_large = || {
                Error::invalid(format!(
                    "a KV budget of {} cells plus batches of {n_batch} tokens is too large",
                    ev.budget
                ))
            };
            let most = ev.budget.checked_add(n_batch).ok_or_else(too_large)?;
            let most = match job_tokens {
                Some(job) if job > 0 => most.min(job),
                _ => most,
            };
            let cells = most.checked_add(16).ok_or_else(too_large)?;
            if n_swa == 0 {
                return Ok(cells);
            }
            let above_swa = n_swa
                .checked_add(n_batch)
                .and_then(|x| x.checked_mul(2))
                .and_then(|x| x.checked_add(256))
                .ok_or_else(too_large)?;
            Ok(cells.max(above_swa))
        }
    }
}
