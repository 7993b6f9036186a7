//! The flag groups every command that runs a model shares, each declared once: [`EvictionArgs`]
//! (the policy and its knobs) and [`SamplingArgs`]. `run`, `chat`, `bench` and `serve` flatten
//! them (`#[command(flatten)]`); the evaluation sweep yields one `EvictionArgs` per point.
//!
//! A command whose job needs other defaults changes them where it flattens the group, with
//! `#[command(mut_arg(..))]`, so that its `--help` shows what it really uses (`bench` does).
//!
//! They live in the library, not in the binary, so that the sweep (`eval::sweep`) and a
//! program embedding qfilters build engines from the same values the command line parses.

use std::path::PathBuf;
use std::sync::Arc;

use clap::{Args, Parser};
use gguf_tools::filters::QFilters;
use serde::Serialize;

use crate::cache::{Combiner, EvictionConfig, Granularity};
use crate::engine::{CacheSize, EngineConfig, KeySource};
use crate::error::{Error, Result};
use crate::ffi::SamplingParams;
use crate::policy::{self, PolicyInfo, PolicyInputs, Scorer};

// Built-in eviction defaults, the fallback for filters without tuned ones (chosen on SmolLM2 by
// `qfilters eval` measurements, docs/RESULTS.md).
pub const DEFAULT_BUDGET: usize = 512;
pub const DEFAULT_WINDOW: usize = 32;
pub const DEFAULT_SINKS: usize = 4;
pub const DEFAULT_GRANULARITY: Granularity = Granularity::Head;
pub const DEFAULT_COMBINER: Combiner = Combiner::MeanZ;
pub const DEFAULT_RECENCY: f64 = 128.0;
pub const DEFAULT_BATCH: usize = crate::engine::DEFAULT_BATCH;

/// Most KV cells a budget may name: far above any model's trained context, far below the
/// sizes whose arithmetic overflows (llama.cpp counts cells in 32 bits).
pub const MAX_CELLS: usize = 1 << 24;

/// Refuses a cell count (budget, length) above [`MAX_CELLS`]; `what` names the flag.
pub fn check_cells(what: &str, n: usize) -> Result<()> {
    if n > MAX_CELLS {
        return Err(Error::invalid(format!(
            "{what} {n} is too large: at most {MAX_CELLS} cells"
        )));
    }
    Ok(())
}

/// The eviction policy and its knobs.
#[derive(Args, Debug, Clone, PartialEq)]
pub struct EvictionArgs {
    /// Eviction policy.
    #[arg(long, value_enum, default_value_t = policy::DEFAULT)]
    pub policy: PolicyInfo,
    /// KV cells kept after each eviction round (ignored by a policy that does not evict).
    #[arg(long, default_value_t = DEFAULT_BUDGET)]
    pub budget: usize,
    /// Q-Filters file (published safetensors layout, or its folder). Default: the filters
    /// embedded in the model's GGUF, if any.
    #[arg(long)]
    pub filters: Option<PathBuf>,
    /// Most recent tokens never evicted.
    #[arg(long, default_value_t = DEFAULT_WINDOW)]
    pub window: usize,
    /// First tokens (attention sinks) never evicted.
    #[arg(long, default_value_t = DEFAULT_SINKS)]
    pub sinks: usize,
    /// `head`: each KV head of each layer keeps its own tokens; `position`: whole positions leave.
    #[arg(long, default_value_t = DEFAULT_GRANULARITY)]
    pub granularity: Granularity,
    /// How per-head scores become one per position (position granularity): mean-z, mean-rank, max-z.
    #[arg(long, default_value_t = DEFAULT_COMBINER)]
    pub combiner: Combiner,
    /// Each eviction round goes this many cells below the budget, so rounds run once per
    /// slack+1 generated tokens; the cache never exceeds the budget. 0 evicts just enough.
    #[arg(long, default_value_t = 0)]
    pub slack: usize,
    /// Recency prior for key-scoring policies: standardised score + position / RECENCY
    /// (tokens of age worth one standard deviation); 0 turns it off.
    #[arg(long, default_value_t = DEFAULT_RECENCY)]
    pub recency: f64,
    /// Where keys are read: `cache` (K cache rows after the decode, scored on the cache's device),
    /// `host` (those rows scored on the host) or `graph` (Kcur nodes, one split per layer).
    #[arg(long = "key-source", default_value_t = KeySource::Cache)]
    pub key_source: KeySource,
    /// Tokens per llama_decode call while ingesting input; eviction runs after each, so the
    /// cache holds at most budget + batch cells.
    #[arg(long = "batch", default_value_t = DEFAULT_BATCH)]
    pub n_batch: usize,
}

/// For result records: the knobs that change what is kept, enums as their flag words, and
/// `budget: null` for a policy that does not evict (its cache holds the whole input).
impl Serialize for EvictionArgs {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut r = s.serialize_struct("EvictionArgs", 8)?;
        r.serialize_field("policy", &self.policy)?;
        r.serialize_field("budget", &self.policy.evicts.then_some(self.budget))?;
        r.serialize_field("window", &self.window)?;
        r.serialize_field("sinks", &self.sinks)?;
        r.serialize_field("granularity", &self.granularity.to_string())?;
        r.serialize_field("combiner", &self.combiner.to_string())?;
        r.serialize_field("slack", &self.slack)?;
        r.serialize_field("recency", &self.recency)?;
        r.end()
    }
}

/// Sampling of generated tokens.
#[derive(Args, Debug, Clone, PartialEq)]
pub struct SamplingArgs {
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temp: f32,
    /// Keep the K most likely tokens before sampling; 0 turns it off.
    #[arg(long = "top-k", default_value_t = 40)]
    pub top_k: i32,
    /// Keep the most likely tokens whose probabilities sum to P (0 < P <= 1).
    #[arg(long = "top-p", default_value_t = 0.95)]
    pub top_p: f32,
    /// Seed for sampling and for the random policy.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
}

/// Parses one group alone from `argv` (no program name), for the defaults and for tests.
fn parse_group<T: Args>(argv: &[&str]) -> std::result::Result<T, clap::Error> {
    #[derive(Parser)]
    #[command(no_binary_name = true)]
    struct One<T: Args> {
        #[command(flatten)]
        group: T,
    }
    One::<T>::try_parse_from(argv).map(|o| o.group)
}

impl Default for EvictionArgs {
    /// The command line's defaults (declared once, in the `#[arg]` attributes above).
    fn default() -> Self {
        parse_group(&[]).expect("the defaults parse")
    }
}

impl Default for SamplingArgs {
    fn default() -> Self {
        parse_group(&[]).expect("the defaults parse")
    }
}

impl EvictionArgs {
    /// Parses the flags in `argv` (e.g. `["--policy", "knorm", "--budget", "64"]`), the rest
    /// at their defaults: how a program states a configuration in the command line's words.
    pub fn from_flags(argv: &[&str]) -> Result<EvictionArgs> {
        parse_group(argv).map_err(|e| Error::invalid(e.to_string().trim().to_string()))
    }

    /// Refuses knobs whose arithmetic would overflow or that no job can use.
    pub fn check(&self) -> Result<()> {
        check_cells("--budget", self.budget)?;
        check_cells("--window", self.window)?;
        check_cells("--sinks", self.sinks)?;
        check_cells("--slack", self.slack)?;
        check_cells("--batch", self.n_batch)?;
        if self.n_batch == 0 {
            return Err(Error::invalid("--batch must be at least 1"));
        }
        if !(self.recency.is_finite() && self.recency >= 0.0) {
            return Err(Error::invalid(format!(
                "--recency {}: give a finite value of at least 0 (0 turns it off)",
                self.recency
            )));
        }
        Ok(())
    }

    /// The files this policy reads besides the model (for the same-file checks): --filters,
    /// or the .safetensors file inside the folder it names.
    pub fn input_paths(&self) -> Vec<PathBuf> {
        self.filters
            .iter()
            .map(|f| gguf_tools::filters::resolve_file(f).unwrap_or_else(|_| f.clone()))
            .collect()
    }

    /// The eviction knobs, for a policy that evicts; `None` for the full-cache reference.
    /// The cache this policy keeps: bounded by eviction, or full with `capacity` cells for a
    /// policy that does not evict.
    pub fn cache_size(&self, capacity: usize) -> CacheSize {
        if self.policy.evicts {
            CacheSize::Bounded(EvictionConfig {
                budget: self.budget,
                window: self.window,
                sinks: self.sinks,
                granularity: self.granularity,
                combiner: self.combiner,
                slack: self.slack,
            })
        } else {
            CacheSize::Full { capacity }
        }
    }

    /// The scorer of the policy, with `filters` (resolved by the caller) and `seed`.
    pub fn scorer(&self, filters: Option<Arc<QFilters>>, seed: u64) -> Result<Box<dyn Scorer>> {
        self.policy.scorer(&PolicyInputs {
            filters,
            seed,
            recency: self.recency,
        })
    }

    /// The engine configuration: `capacity` is the full-cache size for a policy that does not
    /// evict, and for one that does the most tokens the job feeds (0: unknown), which caps
    /// the context.
    pub fn engine_config(&self, capacity: usize, threads: i32) -> Result<EngineConfig> {
        self.check()?;
        Ok(EngineConfig {
            cache: self.cache_size(capacity),
            job_tokens: (capacity > 0).then_some(capacity),
            n_batch: self.n_batch,
            threads,
            key_source: self.key_source,
            ..EngineConfig::full(capacity)
        })
    }
}

impl SamplingArgs {
    /// The parameters, checked by [`SamplingParams::check`] (the one owner of their ranges),
    /// with a refusal naming the flag.
    pub fn check(&self) -> Result<()> {
        self.params().map(|_| ())
    }

    pub fn params(&self) -> Result<SamplingParams> {
        let p = SamplingParams {
            temperature: self.temp,
            top_k: self.top_k,
            top_p: self.top_p,
            // llama.cpp's sampler seed is 32 bits.
            seed: self.seed as u32,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            logit_bias: Vec::new(),
        };
        p.check(0).map_err(|b| {
            let flag = match b.field {
                "temperature" => "--temp",
                "top_k" => "--top-k",
                "top_p" => "--top-p",
                other => other,
            };
            Error::invalid(format!("{flag} {}", b.message))
        })?;
        Ok(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_documented_ones() {
        let e = EvictionArgs::default();
        assert_eq!(e.policy, policy::DEFAULT);
        assert_eq!(
            (e.budget, e.window, e.sinks, e.slack, e.n_batch),
            (512, 32, 4, 0, 256)
        );
        assert_eq!(
            (e.granularity, e.combiner),
            (Granularity::Head, Combiner::MeanZ)
        );
        assert_eq!(e.recency, 128.0);
        assert_eq!(e.key_source, KeySource::Cache);
        let s = SamplingArgs::default();
        assert_eq!((s.temp, s.top_k, s.top_p, s.seed), (0.0, 40, 0.95, 42));
    }

    #[test]
    fn every_enum_value_prints_as_the_word_that_parses_to_it() {
        for g in [Granularity::Head, Granularity::Position] {
            assert_eq!(g.to_string().parse::<Granularity>().unwrap(), g);
        }
        for c in [Combiner::MeanZ, Combiner::MeanRank, Combiner::MaxZ] {
            assert_eq!(c.to_string().parse::<Combiner>().unwrap(), c);
        }
        for k in [KeySource::Cache, KeySource::Host, KeySource::Graph] {
            assert_eq!(k.to_string().parse::<KeySource>().unwrap(), k);
        }
        for f in [
            crate::eval::passkey::PromptFormat::Chat,
            crate::eval::passkey::PromptFormat::Plain,
        ] {
            assert_eq!(
                f.to_string()
                    .parse::<crate::eval::passkey::PromptFormat>()
                    .unwrap(),
                f
            );
        }
    }

    #[test]
    fn flags_parse_and_the_full_cache_has_no_eviction() {
        let e =
            EvictionArgs::from_flags(&["--policy", "knorm", "--granularity", "position"]).unwrap();
        assert_eq!(e.policy.name, "knorm");
        assert_eq!(e.granularity, Granularity::Position);
        assert!(matches!(e.cache_size(9), CacheSize::Bounded(c) if c.budget == 512));
        let full = EvictionArgs::from_flags(&["--policy", "none"]).unwrap();
        assert!(matches!(
            full.cache_size(9),
            CacheSize::Full { capacity: 9 }
        ));
        let bad = EvictionArgs::from_flags(&["--policy", "nope"]).unwrap_err();
        assert!(bad.to_string().contains("qfilters"), "{bad}");
    }

    #[test]
    fn records_carry_the_knobs_as_words() {
        let v = serde_json::to_value(EvictionArgs::default()).unwrap();
        assert_eq!(v["policy"], "qfilters");
        assert_eq!(v["granularity"], "head");
        assert_eq!(v["combiner"], "mean-z");
        assert_eq!(v["budget"], 512);
        assert!(v.get("filters").is_none() && v.get("n_batch").is_none());
        let full = serde_json::to_value(EvictionArgs::from_flags(&["--policy", "none"]).unwrap());
        assert!(full.unwrap()["budget"].is_null());
    }

    #[test]
    fn bad_knobs_are_refused_with_the_flag_named() {
        let mut e = EvictionArgs {
            n_batch: 0,
            ..EvictionArgs::default()
        };
        assert!(e.check().unwrap_err().to_string().contains("--batch"));
        e.n_batch = 1;
        e.recency = f64::NAN;
        assert!(e.check().unwrap_err().to_string().contains("--recency"));
        e.recency = 0.0;
        e.budget = MAX_CELLS + 1;
        assert!(e.check().unwrap_err().to_string().contains("--budget"));
        let s = SamplingArgs {
            top_p: 0.0,
            ..SamplingArgs::default()
        };
        assert!(s.check().unwrap_err().to_string().contains("--top-p"));
    }
}
