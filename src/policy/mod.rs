//! Eviction policies. A policy is a scorer: it gives each new key one score per (layer, KV
//! head), once, when the key enters the cache; higher means "keep". The shared mechanism in
//! `crate::cache` applies the scores; it is tested once for all policies.
//!
//! Adding a policy: one file in this folder and one line in `REGISTRY`.

pub(crate) mod knorm;
mod none;
mod qfilters;
mod random;
mod recency;
mod streaming;

use std::sync::Arc;

use gguf_tools::filters::QFilters;

use crate::error::{Error, Result};
pub use crate::ffi::KeyReduce;

/// What a scorer sees of the new keys of one layer after a decode.
pub struct NewKeys<'a> {
    pub layer: usize,
    /// Post-RoPE keys, `[n_tokens][n_head_kv][head_dim]`.
    pub keys: &'a [f32],
    /// Position of each token.
    pub positions: &'a [i32],
    pub n_head_kv: usize,
    pub head_dim: usize,
}

pub trait Scorer: Send {
    /// Writes one score per (token, KV head) into `out` (`[n_tokens][n_head_kv]`).
    fn score(&mut self, new: &NewKeys<'_>, out: &mut [f32]);

    /// The per-head reduction of a key this score is a function of, when there is one: the
    /// engine then computes it on the device that holds the KV cache (a small ggml graph) and
    /// calls `score_reduced`, instead of reading the keys back and calling `score`.
    fn key_reduce(&self) -> Option<KeyReduce> {
        None
    }

    /// The filters `KeyReduce::Dot` needs: `[head_dim]` for (layer, KV head).
    fn filter(&self, _layer: usize, _head: usize) -> Option<&[f32]> {
        None
    }

    /// Scores from `stats` (`[n_tokens][n_head_kv]`, the reduction `key_reduce` names, of the
    /// new keys of `layer`), into `out` (same shape). Must equal `score` on the same keys,
    /// within the rounding of a different summation order.
    fn score_reduced(&mut self, _layer: usize, _positions: &[i32], stats: &[f32], out: &mut [f32]) {
        out.copy_from_slice(stats);
    }

    /// Whether the score depends on the key values (false: the hook need not read keys).
    fn needs_keys(&self) -> bool {
        true
    }

    /// False for the full-cache reference: nothing is ever evicted.
    fn evicts(&self) -> bool {
        true
    }
}

/// What a policy may need to be built.
pub struct PolicyInputs {
    pub filters: Option<Arc<QFilters>>,
    pub seed: u64,
    /// When > 0, key scores are standardised and `position / recency` is added
    /// (see `recency.rs`); policies that ignore keys are unchanged.
    pub recency: f64,
}

pub struct PolicyInfo {
    pub name: &'static str,
    pub help: &'static str,
    pub needs_filters: bool,
    pub build: fn(&PolicyInputs) -> Result<Box<dyn Scorer>>,
}

pub const REGISTRY: &[PolicyInfo] = &[
    qfilters::INFO,
    knorm::INFO,
    streaming::INFO,
    random::INFO,
    none::INFO,
];

pub fn lookup(name: &str) -> Result<&'static PolicyInfo> {
    REGISTRY.iter().find(|p| p.name == name).ok_or_else(|| {
        let known: Vec<&str> = REGISTRY.iter().map(|p| p.name).collect();
        Error::invalid(format!(
            "unknown policy '{name}' (known: {})",
            known.join(", ")
        ))
    })
}

pub fn build(name: &str, inputs: &PolicyInputs) -> Result<Box<dyn Scorer>> {
    let info = lookup(name)?;
    if info.needs_filters && inputs.filters.is_none() {
        return Err(Error::invalid(format!(
            "policy '{name}' needs Q-Filters: pass --filters FILE.safetensors, embed them in the model with `gguf-tools embed`, or make them with `qfilters calibrate`"
        )));
    }
    if !(inputs.recency >= 0.0 && inputs.recency.is_finite()) {
        return Err(Error::invalid("--recency must be a finite number >= 0"));
    }
    let scorer = (info.build)(inputs)?;
    if inputs.recency > 0.0 && scorer.needs_keys() && scorer.evicts() {
        return Ok(Box::new(recency::Recency::new(scorer, inputs.recency)));
    }
    Ok(scorer)
}

/// One key's slice of a head: `keys[(t * n_head_kv + h) * head_dim ..][..head_dim]`.
pub(crate) fn head_slice<'a>(new: &NewKeys<'a>, token: usize, head: usize) -> &'a [f32] {
    let start = (token * new.n_head_kv + head) * new.head_dim;
    &new.keys[start..start + new.head_dim]
}
