//! The flag groups every command that runs a model shares, each declared once: [`EvictionArgs`]
//! (the policy and its knobs), [`LlamaArgs`] (llama.cpp's own flags: cache types, flash
//! attention, context size, seed) and [`SamplingArgs`]. `run`, `chat`, `bench` and `serve`
//! flatten them (`#[command(flatten)]`); `eval` flattens [`SweepArgs`], which reads the same
//! declarations with the swept flags ([`SWEPT`]) as comma-separated lists, and its sweep yields
//! one `EvictionArgs` per point.
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

use crate::engine::cache::{Combiner, EvictionConfig, Granularity};
use crate::engine::{CacheSize, EngineConfig, KeySource};
use crate::error::{Error, Result};
use crate::eval::sweep::Sweep;
use crate::ffi::{CacheType, Model, ModelParams, SamplingParams};
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
    /// Eviction policy; two that evict combine as A+B (standardised scores, B weighted by
    /// --mix-weight).
    #[arg(long, value_parser = policy::PolicyParser, default_value_t = policy::DEFAULT)]
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
    /// For a combined policy A+B: the weight of B's standardised score (A's is 1).
    #[arg(long = "mix-weight", default_value_t = 1.0)]
    pub mix_weight: f64,
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
        if self.policy.parts().is_some() {
            r.serialize_field("mix_weight", &self.mix_weight)?;
        } else {
            r.skip_field("mix_weight")?;
        }
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
}

/// Flash attention, as llama.cpp's `-fa` takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum FlashAttn {
    On,
    Off,
    /// llama.cpp decides (on where the backend supports it).
    #[default]
    Auto,
}

impl FlashAttn {
    /// `Some(true)` forced on, `Some(false)` off, `None` llama.cpp's choice.
    pub fn forced(self) -> Option<bool> {
        match self {
            FlashAttn::On => Some(true),
            FlashAttn::Off => Some(false),
            FlashAttn::Auto => None,
        }
    }
}

impl std::fmt::Display for FlashAttn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FlashAttn::On => "on",
            FlashAttn::Off => "off",
            FlashAttn::Auto => "auto",
        })
    }
}

impl clap::ValueEnum for CacheType {
    fn value_variants<'a>() -> &'a [Self] {
        &CacheType::ALL
    }

    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        Some(clap::builder::PossibleValue::new(self.name()))
    }
}

/// The flags qfilters shares with llama.cpp's programs, under llama.cpp's names (the one-dash
/// `-ctk`, `-ctv`, `-fa` too: `main` spells them out for clap) and with its defaults.
#[derive(Args, Debug, Clone, PartialEq)]
pub struct LlamaArgs {
    /// K cache storage type (llama.cpp's -ctk). A quantized K cache is scored as llama.cpp
    /// stores it: dequantized, its Hadamard rotation undone.
    #[arg(
        long = "cache-type-k",
        value_enum,
        value_name = "TYPE",
        default_value_t = CacheType::F16
    )]
    pub cache_type_k: CacheType,
    /// V cache storage type (llama.cpp's -ctv); a quantized V cache needs flash attention.
    #[arg(
        long = "cache-type-v",
        value_enum,
        value_name = "TYPE",
        default_value_t = CacheType::F16
    )]
    pub cache_type_v: CacheType,
    /// Flash attention: on, off or auto (llama.cpp's -fa; `-fa` alone is on). Per-head
    /// eviction and a quantized V cache need it; auto turns it on for them.
    #[arg(
        long = "flash-attn",
        value_enum,
        value_name = "MODE",
        default_value_t = FlashAttn::Auto,
        num_args = 0..=1,
        default_missing_value = "on"
    )]
    pub flash_attn: FlashAttn,
    /// Cells of a cache that never evicts (policy none; llama.cpp's -c); 0: what the job
    /// needs. An evicting policy's cache is sized by --budget.
    #[arg(short = 'c', long = "ctx-size", default_value_t = 0)]
    pub ctx_size: usize,
    /// Seed for sampling, the random policy and generated inputs (llama.cpp's -s).
    #[arg(short = 's', long, default_value_t = 42)]
    pub seed: u64,
}

impl Default for LlamaArgs {
    fn default() -> Self {
        parse_group(&[]).expect("the defaults parse")
    }
}

impl LlamaArgs {
    /// Refuses what llama.cpp would refuse, or abort on, before any model is loaded:
    /// `per_head` says whether eviction moves head slices.
    pub fn check(&self, per_head: bool) -> Result<()> {
        check_cells("--ctx-size", self.ctx_size)?;
        crate::engine::check_cache(self.cache_type_v, self.flash_attn.forced(), per_head)
    }
}

/// The flags `eval` sweeps: there each takes a comma-separated list, and the sweep runs their
/// product (the two cache types pair up instead, see [`Sweep::cache_pairs`]). Declared once,
/// in [`EvictionArgs`] and [`LlamaArgs`]; [`SweepArgs`] changes how they are read, not what
/// they are.
pub const SWEPT: &[&str] = &[
    "policy",
    "budget",
    "window",
    "sinks",
    "granularity",
    "combiner",
    "slack",
    "recency",
    "cache_type_k",
    "cache_type_v",
];

/// What `eval` parses: every flag of [`EvictionArgs`] and [`LlamaArgs`], those in [`SWEPT`]
/// as lists. `policy` lists every policy by default; a command changes other defaults where it
/// flattens this (as `eval ppl` does for `budget` and `n_batch`).
#[derive(Debug, Clone, PartialEq)]
pub struct SweepArgs {
    /// The lists of knobs.
    pub sweep: Sweep,
    /// `--budget`: cells kept (empty when not given and without a default).
    pub budgets: Vec<usize>,
    /// The flags not swept (filters, key source, batch), the swept ones at their defaults.
    pub base: EvictionArgs,
    /// The same for llama.cpp's flags (flash attention, context size, seed).
    pub llama: LlamaArgs,
}

impl Args for SweepArgs {
    fn augment_args(cmd: clap::Command) -> clap::Command {
        let cmd = LlamaArgs::augment_args(EvictionArgs::augment_args(cmd));
        let every: Vec<&'static str> = crate::policy::REGISTRY.iter().map(|p| p.name).collect();
        SWEPT
            .iter()
            .fold(cmd, |cmd, id| {
                cmd.mut_arg(*id, |a| {
                    let help = a.get_help().map(|h| h.to_string()).unwrap_or_default();
                    a.action(clap::ArgAction::Append)
                        .value_delimiter(',')
                        .help(format!("{help} [eval: a comma-separated list]"))
                })
            })
            .mut_arg("policy", |a| a.default_values(every))
            // eval's name for --batch until the flags were declared once; the commands
            // recorded in docs/results use it.
            .mut_arg("n_batch", |a| a.alias("chunk"))
    }

    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        Self::augment_args(cmd)
    }
}

impl clap::FromArgMatches for SweepArgs {
    fn from_arg_matches(m: &clap::ArgMatches) -> std::result::Result<Self, clap::Error> {
        fn list<T: Clone + Send + Sync + 'static>(
            m: &clap::ArgMatches,
            id: &str,
        ) -> std::result::Result<Vec<T>, clap::Error> {
            let values = m.try_get_many::<T>(id).map_err(|e| {
                clap::Error::raw(clap::error::ErrorKind::ArgumentConflict, e.to_string())
            })?;
            Ok(values.map(|v| v.cloned().collect()).unwrap_or_default())
        }
        fn one<T: Clone + Send + Sync + 'static>(
            m: &clap::ArgMatches,
            id: &str,
        ) -> std::result::Result<Option<T>, clap::Error> {
            Ok(list(m, id)?.into_iter().next())
        }
        let (e, l) = (EvictionArgs::default(), LlamaArgs::default());
        let sweep = Sweep {
            policies: list(m, "policy")?,
            window: list(m, "window")?,
            sinks: list(m, "sinks")?,
            granularity: list(m, "granularity")?,
            combiner: list(m, "combiner")?,
            slack: list(m, "slack")?,
            recency: list(m, "recency")?,
            cache_type_k: list(m, "cache_type_k")?,
            cache_type_v: list(m, "cache_type_v")?,
        };
        let base = EvictionArgs {
            filters: one(m, "filters")?,
            key_source: one(m, "key_source")?.unwrap_or(e.key_source),
            n_batch: one(m, "n_batch")?.unwrap_or(e.n_batch),
            mix_weight: one(m, "mix_weight")?.unwrap_or(e.mix_weight),
            ..e
        };
        let llama = LlamaArgs {
            flash_attn: one(m, "flash_attn")?.unwrap_or(l.flash_attn),
            ctx_size: one(m, "ctx_size")?.unwrap_or(l.ctx_size),
            seed: one(m, "seed")?.unwrap_or(l.seed),
            ..l
        };
        Ok(SweepArgs {
            sweep,
            budgets: list(m, "budget")?,
            base,
            llama,
        })
    }

    fn update_from_arg_matches(
        &mut self,
        m: &clap::ArgMatches,
    ) -> std::result::Result<(), clap::Error> {
        *self = Self::from_arg_matches(m)?;
        Ok(())
    }
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
        if !self.mix_weight.is_finite() {
            return Err(Error::invalid(format!(
                "--mix-weight {}: give a finite number",
                self.mix_weight
            )));
        }
        policy::check_recency("--recency", self.recency)
    }

    /// The files this policy reads besides the model (for the same-file checks): --filters,
    /// or the .safetensors file inside the folder it names.
    pub fn input_paths(&self) -> Vec<PathBuf> {
        self.filters
            .iter()
            .map(|f| gguf_tools::filters::resolve_file(f).unwrap_or_else(|_| f.clone()))
            .collect()
    }

    /// The cache this policy keeps: bounded by eviction, or full with `full_cells` cells for a
    /// policy that does not evict.
    pub fn cache_size(&self, full_cells: usize) -> CacheSize {
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
            CacheSize::Full {
                capacity: full_cells,
            }
        }
    }

    /// The scorer of the policy, with `filters` (resolved by the caller) and `seed`.
    pub fn scorer(&self, filters: Option<Arc<QFilters>>, seed: u64) -> Result<Box<dyn Scorer>> {
        self.policy.scorer(&PolicyInputs {
            filters,
            seed,
            recency: self.recency,
            mix_weight: self.mix_weight,
        })
    }

    /// Whether eviction moves head slices (per-head granularity, for a policy that evicts).
    pub fn per_head(&self) -> bool {
        self.policy.evicts && self.granularity == Granularity::Head
    }

    /// The engine configuration for `job`, with llama.cpp's flags `llama`.
    pub fn engine_config(
        &self,
        llama: &LlamaArgs,
        job: JobLength,
        threads: i32,
    ) -> Result<EngineConfig> {
        self.check()?;
        llama.check(self.per_head())?;
        let full = job.full_cells(llama.ctx_size);
        Ok(EngineConfig {
            cache: self.cache_size(full),
            job_tokens: job.tokens(),
            n_batch: self.n_batch,
            threads,
            key_source: self.key_source,
            flash_attn: llama.flash_attn.forced(),
            type_k: llama.cache_type_k,
            type_v: llama.cache_type_v,
            ..EngineConfig::full(full)
        })
    }
}

/// What a job knows about its length: with --ctx-size and the eviction flags, all that sizes
/// its cache ([`EvictionArgs::engine_config`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobLength {
    /// At most this many tokens, prompt and generated (`run`, `bench`, `eval`, `calibrate`):
    /// a bounded cache never gets more context than that (a cache never holds more cells than
    /// tokens it was given), and a full cache is that large.
    Known(usize),
    /// No known end (`chat`, `serve`): a bounded cache is sized by its budget alone; a full
    /// one cannot grow, and holds `full_cells` (what the command promises its user).
    Open { full_cells: usize },
}

impl JobLength {
    /// The cells of a full cache (a policy that does not evict): --ctx-size (`ctx_size`; 0:
    /// not given), else what the job says. The one place a full cache is sized.
    pub fn full_cells(self, ctx_size: usize) -> usize {
        match (ctx_size, self) {
            (0, JobLength::Known(n) | JobLength::Open { full_cells: n }) => n,
            (n, _) => n,
        }
    }

    /// The most tokens the job feeds, which caps a bounded cache's context; `None` when open
    /// (or empty: a context is never sized below one batch for it).
    pub fn tokens(self) -> Option<usize> {
        match self {
            JobLength::Known(n) if n > 0 => Some(n),
            _ => None,
        }
    }
}

impl SamplingArgs {
    /// The parameters, checked by [`SamplingParams::check`] (the one owner of their ranges),
    /// with a refusal naming the flag.
    pub fn check(&self) -> Result<()> {
        self.params(0).map(|_| ())
    }

    /// The sampler's parameters, with `seed` (the command's --seed).
    pub fn params(&self, seed: u64) -> Result<SamplingParams> {
        let p = SamplingParams {
            temperature: self.temp,
            top_k: self.top_k,
            top_p: self.top_p,
            // llama.cpp's sampler seed is 32 bits.
            seed: seed as u32,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            logit_bias: Vec::new(),
            grammar: None,
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

/// The model `run`, `chat`, `serve` and the others load when `-m` is not given (what
/// scripts/fetch-model.sh fetches).
pub const DEFAULT_MODEL: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";

#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// GGUF model file.
    #[arg(short = 'm', long = "model", default_value = DEFAULT_MODEL)]
    pub model: PathBuf,
    /// Layers to offload to the GPU (needs a CUDA build). llama.cpp's `-ngl N` works too.
    #[arg(
        short = 'g',
        long = "gpu-layers",
        visible_alias = "ngl",
        default_value_t = 0
    )]
    pub gpu_layers: i32,
    /// Threads for llama.cpp (default: the physical cores that are idle at start, at least 1).
    #[arg(short = 't', long = "threads")]
    pub threads: Option<i32>,
    /// How hard idle llama.cpp worker threads spin, 0-100 (llama.cpp's --poll; its default is
    /// 50). 0 lets them sleep, which keeps a busy machine responsive.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=100))]
    pub poll: u32,
    /// Show llama.cpp's own log.
    #[arg(long)]
    pub verbose: bool,
    /// Remote hosts running `qfilters rpc-server`, HOST:PORT[,HOST:PORT...]: their devices
    /// take the layers -ngl offloads (llama.cpp's --rpc; needs a build with `--features rpc`).
    /// The protocol has no authentication nor encryption: only over a trusted network or a
    /// tunnel.
    #[arg(long = "rpc", value_name = "HOSTS", value_delimiter = ',')]
    pub rpc: Vec<String>,
    /// Seconds an --rpc host may take to answer before the run ends with an error (one line,
    /// exit 1); 0 waits forever. Without it, a host that vanishes without closing the
    /// connection (power loss, a cut link) is waited for until TCP gives up, about 15 minutes.
    /// A remote step slower than this (a huge batch on a slow host) also ends the run: raise
    /// it then.
    #[arg(
        long = "rpc-timeout",
        value_name = "SECONDS",
        default_value_t = 60,
        value_parser = clap::value_parser!(u64).range(0..=RPC_TIMEOUT_MAX)
    )]
    pub rpc_timeout: u64,
}

/// The largest `--rpc-timeout` (about 68 years): whatever the C side's integer types, it fits.
pub const RPC_TIMEOUT_MAX: u64 = i32::MAX as u64;

impl ModelArgs {
    pub fn load(&self) -> Result<Arc<Model>> {
        self.check_threads()?;
        crate::ffi::set_verbose_log(self.verbose);
        crate::ffi::threads::set_poll(self.poll);
        // Remote devices first: llama.cpp places layers on the devices registered at load.
        crate::ffi::rpc::add_servers(&self.rpc)?;
        if !self.rpc.is_empty() && self.rpc_timeout > 0 && !cfg!(qf_rpc_timeout) {
            eprintln!(
                "qfilters: --rpc-timeout has no effect: this llama.cpp (LLAMA_CPP_DIR) lacks vendor/patches/rpc-socket-timeout.patch, so a host that vanishes is waited for until TCP gives up"
            );
        }
        if self.gpu_layers > 0 && !cfg!(feature = "cuda") && self.rpc.is_empty() {
            eprintln!(
                "qfilters: --gpu-layers {} ignored: this build has no GPU backend (build with --features cuda, or give --rpc hosts)",
                self.gpu_layers
            );
        }
        Model::load(
            &self.model,
            &ModelParams {
                gpu_layers: self.gpu_layers,
            },
        )
    }

    /// The thread count for llama.cpp: -t, else QFILTERS_THREADS, else the default; more than
    /// the cores is clamped. `check_threads` (run by `load`) has refused bad values already.
    pub fn threads(&self) -> i32 {
        match self.requested_threads() {
            Ok(Some(n)) => n.min(available_cores()),
            _ => crate::ffi::threads::default_threads(),
        }
    }

    /// -t, else QFILTERS_THREADS (set by scripts and tests that run several processes).
    fn requested_threads(&self) -> Result<Option<i32>> {
        if let Some(n) = self.threads {
            return Ok(Some(n));
        }
        match std::env::var("QFILTERS_THREADS") {
            Ok(v) => v.trim().parse::<i32>().map(Some).map_err(|_| {
                Error::invalid(format!(
                    "QFILTERS_THREADS={v:?} is not a number of threads (1 to {})",
                    available_cores()
                ))
            }),
            Err(std::env::VarError::NotPresent) => Ok(None),
            Err(_) => Err(Error::invalid("QFILTERS_THREADS is not valid UTF-8")),
        }
    }

    /// Refuses 0, negative and non-numeric thread counts; notes once when more than the cores
    /// were asked for (they would only contend: llama.cpp's workers spin while they wait).
    pub fn check_threads(&self) -> Result<()> {
        let cores = available_cores();
        match self.requested_threads()? {
            Some(n) if n < 1 => Err(Error::invalid(format!(
                "{n} threads: give 1 to {cores} (-t or QFILTERS_THREADS)"
            ))),
            Some(n) if n > cores => {
                eprintln!("qfilters: {n} threads asked for, this machine has {cores} cores: using {cores}");
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

/// Cores this process may use.
pub fn available_cores() -> i32 {
    i32::try_from(crate::ffi::threads::available_cpus()).unwrap_or(i32::MAX)
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
        assert_eq!((s.temp, s.top_k, s.top_p), (0.0, 40, 0.95));
        let l = LlamaArgs::default();
        assert_eq!(
            (
                l.cache_type_k,
                l.cache_type_v,
                l.flash_attn,
                l.ctx_size,
                l.seed
            ),
            (CacheType::F16, CacheType::F16, FlashAttn::Auto, 0, 42)
        );
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
        for t in CacheType::ALL {
            assert_eq!(t.to_string().parse::<CacheType>().unwrap(), t);
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

    /// The context each command gets for the same flags: `chat` and `serve` (open jobs) and
    /// `bench`, `run`, `eval` (known lengths), with and without eviction and --ctx-size. The
    /// numbers are llama.cpp's n_ctx (no sliding-window layers).
    #[test]
    fn each_command_gets_the_context_its_job_needs() {
        let n_ctx = |flags: &[&str], llama: &[&str], job: JobLength| {
            let e = EvictionArgs::from_flags(flags).unwrap();
            let l: LlamaArgs = parse_group(llama).unwrap();
            let c = e.engine_config(&l, job, 1).unwrap();
            crate::engine::context_cells(&c.cache, c.job_tokens, c.n_batch, 0).unwrap()
        };
        let knorm = ["--policy", "knorm", "--budget", "128", "--batch", "64"];
        let none = ["--policy", "none", "--budget", "128", "--batch", "64"];
        // chat: an open job, a full cache of --budget cells.
        let chat = JobLength::Open { full_cells: 128 };
        assert_eq!(n_ctx(&knorm, &[], chat), 128 + 64 + 16);
        assert_eq!(n_ctx(&none, &[], chat), 128 + 1);
        assert_eq!(n_ctx(&none, &["-c", "1000"], chat), 1000 + 1);
        // --ctx-size sizes only a full cache.
        assert_eq!(n_ctx(&knorm, &["-c", "1000"], chat), 128 + 64 + 16);
        // serve: an open job, a full cache of budget + batch cells (an evicting slot's memory).
        let serve = JobLength::Open {
            full_cells: 128 + 64,
        };
        assert_eq!(n_ctx(&knorm, &[], serve), 128 + 64 + 16);
        assert_eq!(n_ctx(&none, &[], serve), 128 + 64 + 1);
        assert_eq!(n_ctx(&none, &["-c", "300"], serve), 300 + 1);
        // bench (prompt 100 + gen 20 + 1), run, eval: a known length caps a bounded cache
        // and is a full cache's size.
        let bench = JobLength::Known(121);
        assert_eq!(n_ctx(&knorm, &[], bench), 121 + 16);
        assert_eq!(n_ctx(&none, &[], bench), 121 + 1);
        assert_eq!(n_ctx(&none, &["-c", "50"], bench), 50 + 1);
        assert_eq!(n_ctx(&knorm, &[], JobLength::Known(10_000)), 128 + 64 + 16);
        // An empty job caps nothing.
        assert_eq!(n_ctx(&knorm, &[], JobLength::Known(0)), 128 + 64 + 16);
        assert_eq!(JobLength::Known(0).tokens(), None);
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

    #[test]
    fn llama_flags_parse_with_llama_cpps_names_and_refuse_bad_combinations() {
        let l: LlamaArgs = parse_group(&[
            "--cache-type-k",
            "q8_0",
            "--cache-type-v",
            "q4_0",
            "--flash-attn",
            "-c",
            "4096",
            "-s",
            "7",
        ])
        .unwrap();
        assert_eq!(
            (l.cache_type_k, l.cache_type_v),
            (CacheType::Q8_0, CacheType::Q4_0)
        );
        // `-fa` alone turns it on, as in llama.cpp.
        assert_eq!((l.flash_attn, l.ctx_size, l.seed), (FlashAttn::On, 4096, 7));
        assert!(parse_group::<LlamaArgs>(&["--cache-type-k", "q3_k"]).is_err());
        let off = |v: &str| {
            parse_group::<LlamaArgs>(&["--cache-type-v", v, "--flash-attn", "off"]).unwrap()
        };
        let e = off("q8_0").check(false).unwrap_err().to_string();
        assert!(
            e.contains("quantized V cache") && e.contains("-fa on"),
            "{e}"
        );
        assert!(off("f16").check(false).is_ok());
        let e = off("f16").check(true).unwrap_err().to_string();
        assert!(
            e.contains("per-head eviction") && e.contains("--granularity position"),
            "{e}"
        );
        // A quantized K cache works without flash attention.
        let k = parse_group::<LlamaArgs>(&["--cache-type-k", "q4_0", "--flash-attn", "off"]);
        assert!(k.unwrap().check(false).is_ok());
    }

    #[test]
    fn eval_reads_the_same_flags_as_lists() {
        #[derive(Parser)]
        #[command(no_binary_name = true)]
        struct Eval {
            #[command(flatten)]
            sweep: SweepArgs,
        }
        let parse = |argv: &[&str]| Eval::try_parse_from(argv).map(|e| e.sweep);
        let d = parse(&[]).unwrap();
        assert_eq!(d.sweep.policies, crate::policy::REGISTRY.to_vec());
        assert_eq!(
            (d.sweep.window.clone(), d.sweep.recency.clone()),
            (vec![32], vec![128.0])
        );
        assert_eq!(d.sweep.cache_type_k, [CacheType::F16]);
        assert_eq!(d.budgets, [DEFAULT_BUDGET]);
        assert_eq!(
            (&d.base, &d.llama),
            (&EvictionArgs::default(), &LlamaArgs::default())
        );
        let a = parse(&[
            "--policy",
            "knorm,none",
            "--window",
            "16,32",
            "--window",
            "64",
            "--budget",
            "64,128",
            "--cache-type-k",
            "f16,q8_0",
            "--cache-type-v",
            "f16,q8_0",
            "--chunk",
            "8",
            "--seed",
            "9",
            "--flash-attn",
            "on",
            "--filters",
            "f.safetensors",
        ])
        .unwrap();
        assert_eq!(a.sweep.policies.len(), 2);
        assert_eq!(a.sweep.window, [16, 32, 64]);
        assert_eq!(a.budgets, [64, 128]);
        assert_eq!(a.sweep.cache_type_v, [CacheType::F16, CacheType::Q8_0]);
        assert_eq!((a.base.n_batch, a.llama.seed), (8, 9));
        assert_eq!(a.llama.flash_attn, FlashAttn::On);
        assert_eq!(a.base.filters, Some(PathBuf::from("f.safetensors")));
        // One declaration: eval's help is the single-value help, with the list noted.
        let help = <Eval as clap::CommandFactory>::command()
            .get_arguments()
            .find(|a| a.get_id() == "window")
            .and_then(|a| a.get_help().map(|h| h.to_string()))
            .unwrap();
        assert!(help.starts_with("Most recent tokens never evicted") && help.contains("list"));
    }
}
