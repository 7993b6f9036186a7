//! Pieces every subcommand shares: loading the model, resolving filters, building the engine.

pub mod bench;
pub mod calibrate;
pub mod chat;
pub mod eval;
pub mod filters;
pub mod run;
pub mod serve;

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use clap::parser::ValueSource;
use clap::{ArgMatches, Args};
use gguf_tools::filters::{
    QFilters, META_DEFAULT_GRANULARITY, META_DEFAULT_RECENCY, META_DEFAULT_WINDOW,
};

use qfilters::cache::{Combiner, EvictionConfig, Granularity};
use qfilters::engine::{Engine, EngineConfig, KeySource};
use qfilters::ffi::{Model, ModelParams};
use qfilters::policy::{self, PolicyInputs};
use qfilters::{Error, Result};

pub const DEFAULT_MODEL: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";

/// Argument ids the user gave on the command line (of the subcommand that runs).
static GIVEN: OnceLock<Vec<String>> = OnceLock::new();

/// Records which arguments of the leaf subcommand came from the command line (not defaults).
pub fn record_given(matches: &ArgMatches) {
    let mut m = matches;
    while let Some((_, sub)) = m.subcommand() {
        m = sub;
    }
    let ids = m
        .ids()
        .filter(|id| m.value_source(id.as_str()) == Some(ValueSource::CommandLine))
        .map(|id| id.as_str().to_string())
        .collect();
    let _ = GIVEN.set(ids);
}

/// Whether the user gave argument `id` (a field name, e.g. "recency") on the command line.
pub fn given(id: &str) -> bool {
    GIVEN.get().is_some_and(|ids| ids.iter().any(|i| i == id))
}

/// Eviction defaults measured for one model (`qfilters calibrate --tune`), carried in the
/// filters' metadata (`defaults.*`; `qfilters.defaults.*` in a GGUF).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Tuned {
    pub recency: Option<f64>,
    pub window: Option<usize>,
    pub granularity: Option<Granularity>,
}

impl Tuned {
    pub fn from_filters(f: &QFilters) -> Result<Tuned> {
        let get = |k: &str| f.metadata.get(k).map(|v| v.trim().to_string());
        let bad = |k: &str, v: &str| {
            Error::invalid(format!(
                "the filters' tuned default {k} = {v:?} is invalid; re-run `qfilters calibrate --tune`"
            ))
        };
        let recency = match get(META_DEFAULT_RECENCY) {
            Some(v) => Some(
                v.parse::<f64>()
                    .ok()
                    .filter(|r| r.is_finite() && *r >= 0.0)
                    .ok_or_else(|| bad(META_DEFAULT_RECENCY, &v))?,
            ),
            None => None,
        };
        let window = match get(META_DEFAULT_WINDOW) {
            Some(v) => Some(v.parse().map_err(|_| bad(META_DEFAULT_WINDOW, &v))?),
            None => None,
        };
        let granularity = match get(META_DEFAULT_GRANULARITY) {
            Some(v) => Some(v.parse().map_err(|_| bad(META_DEFAULT_GRANULARITY, &v))?),
            None => None,
        };
        Ok(Tuned {
            recency,
            window,
            granularity,
        })
    }

    /// The defaults of the filters at `filters` (a --filters path), else of the filters
    /// embedded in `model`; with a description of where they came from.
    pub fn find(filters: Option<&Path>, model: &Path) -> Result<Option<(Tuned, String)>> {
        let (f, origin) = match filters {
            Some(p) => (Some(QFilters::load(p)?), p.display().to_string()),
            // A GGUF our reader cannot parse has no defaults for us; llama.cpp decides whether
            // it loads, and policy qfilters reports the filters' error itself.
            None => (
                QFilters::from_gguf(model).ok().flatten(),
                format!("the Q-Filters embedded in {}", model.display()),
            ),
        };
        match f {
            Some(f) => {
                let t = Tuned::from_filters(&f)?;
                Ok((t != Tuned::default()).then_some((t, origin)))
            }
            None => Ok(None),
        }
    }

    /// Sets each tuned value the user did not give a flag for, through `set`; returns what
    /// was set, for the stderr line.
    fn apply(
        &self,
        mut set_recency: impl FnMut(f64),
        mut set_window: impl FnMut(usize),
        mut set_granularity: impl FnMut(Granularity),
    ) -> Vec<String> {
        let mut used = Vec::new();
        if let Some(r) = self.recency.filter(|_| !given("recency")) {
            set_recency(r);
            used.push(format!("recency {r}"));
        }
        if let Some(w) = self.window.filter(|_| !given("window")) {
            set_window(w);
            used.push(format!("window {w}"));
        }
        if let Some(g) = self.granularity.filter(|_| !given("granularity")) {
            set_granularity(g);
            used.push(format!("granularity {}", granularity_name(g)));
        }
        used
    }
}

pub fn granularity_name(g: Granularity) -> &'static str {
    match g {
        Granularity::Head => "head",
        Granularity::Position => "position",
    }
}

/// Applies the tuned defaults found for `filters`/`model` where no flag was given, and says so
/// on stderr. Built-in defaults stay for filters without tuned ones.
fn announce(used: &[String], origin: &str) {
    if !used.is_empty() {
        eprintln!(
            "qfilters: tuned defaults from {origin}: {} (a flag overrides each)",
            used.join(", ")
        );
    }
}

// Built-in eviction defaults, the fallback for filters without tuned ones (chosen on SmolLM2 by
// `qfilters eval` measurements, docs/RESULTS.md).
pub const DEFAULT_WINDOW: usize = 32;
pub const DEFAULT_SINKS: usize = 4;
pub const DEFAULT_GRANULARITY: &str = "head";
pub const DEFAULT_COMBINER: &str = "mean-z";
pub const DEFAULT_RECENCY: f64 = 128.0;

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
}

impl ModelArgs {
    pub fn load(&self) -> Result<Arc<Model>> {
        self.check_threads()?;
        if self.gpu_layers > 0 && !cfg!(feature = "cuda") {
            eprintln!(
                "qfilters: --gpu-layers {} ignored: this build has no GPU backend (build with --features cuda)",
                self.gpu_layers
            );
        }
        qfilters::ffi::set_verbose_log(self.verbose);
        qfilters::threads::set_poll(self.poll);
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
            _ => qfilters::threads::default_threads(),
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
    i32::try_from(qfilters::threads::available_cpus()).unwrap_or(i32::MAX)
}

/// Most KV cells a budget may name: far above any model's trained context, far below the
/// sizes whose arithmetic overflows (llama.cpp counts cells in 32 bits).
pub const MAX_CELLS: usize = 1 << 24;

/// Refuses a cell count (budget, length) above [`MAX_CELLS`].
pub fn check_cells(what: &str, n: usize) -> Result<()> {
    if n > MAX_CELLS {
        return Err(Error::invalid(format!(
            "{what} {n} is too large: at most {MAX_CELLS} cells"
        )));
    }
    Ok(())
}

/// Sampling parameters llama.cpp's samplers accept: a finite temperature ≥ 0 (0 greedy),
/// top-k ≥ 0 (0 off), top-p in (0, 1].
pub fn check_sampling(temp: f32, top_k: i32, top_p: f32) -> Result<()> {
    if !(temp.is_finite() && temp >= 0.0) {
        return Err(Error::invalid(format!(
            "--temp {temp}: give a finite temperature of at least 0 (0 is greedy)"
        )));
    }
    if top_k < 0 {
        return Err(Error::invalid(format!(
            "--top-k {top_k}: give 0 (off) or more"
        )));
    }
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(Error::invalid(format!(
            "--top-p {top_p}: give a value above 0 and at most 1"
        )));
    }
    Ok(())
}

#[derive(Args, Debug, Clone)]
pub struct PolicyArgs {
    /// Eviction policy: qfilters, knorm, streaming, random, none.
    #[arg(long, default_value = "qfilters")]
    pub policy: String,
    /// KV cells kept after each eviction round.
    #[arg(long, default_value_t = 512)]
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
    #[arg(long, default_value = DEFAULT_GRANULARITY)]
    pub granularity: Granularity,
    /// How per-head scores become one per position (position granularity): mean-z, mean-rank, max-z.
    #[arg(long, default_value = DEFAULT_COMBINER)]
    pub combiner: Combiner,
    /// Recency prior for key-scoring policies: standardised score + position / RECENCY
    /// (tokens of age worth one standard deviation); 0 turns it off.
    #[arg(long, default_value_t = DEFAULT_RECENCY)]
    pub recency: f64,
    /// Each eviction round goes this many cells below the budget, so rounds run once per
    /// slack+1 generated tokens; the cache never exceeds the budget. 0 evicts just enough.
    #[arg(long, default_value_t = 0)]
    pub slack: usize,
    /// Where keys are read: `cache` (K cache rows after the decode, scored on the cache's device),
    /// `host` (those rows scored on the host) or `graph` (Kcur nodes, one split per layer).
    #[arg(long = "key-source", default_value = "cache")]
    pub key_source: KeySource,
    /// Tokens per llama_decode call while ingesting input.
    #[arg(long = "batch", default_value_t = 256)]
    pub n_batch: usize,
    /// Seed for the random policy and sampling.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
}

impl PolicyArgs {
    /// Takes the tuned defaults of the filters in use (see [`Tuned`]) where no flag was given.
    pub fn apply_tuned(&mut self, model_path: &Path) -> Result<()> {
        if let Some((t, origin)) = Tuned::find(self.filters.as_deref(), model_path)? {
            let (mut r, mut w, mut g) = (self.recency, self.window, self.granularity);
            let used = t.apply(|x| r = x, |x| w = x, |x| g = x);
            (self.recency, self.window, self.granularity) = (r, w, g);
            announce(&used, &origin);
        }
        Ok(())
    }

    /// Filters from --filters, else from the GGUF; says on stderr which are used.
    pub fn resolve_filters(
        &self,
        model_path: &Path,
        model: &Model,
        quiet: bool,
    ) -> Result<Option<Arc<QFilters>>> {
        let info = policy::lookup(&self.policy)?;
        if !info.needs_filters {
            // Loading them would only announce filters that change nothing.
            if self.filters.is_some() && !quiet {
                eprintln!(
                    "qfilters: --filters ignored: policy {} does not use filters",
                    self.policy
                );
            }
            return Ok(None);
        }
        let filters = match &self.filters {
            Some(path) => Some((
                QFilters::load(path)?,
                format!("filters from {}", path.display()),
            )),
            None => QFilters::from_gguf(model_path)?.map(|f| {
                (
                    f,
                    format!("the Q-Filters embedded in {}", model_path.display()),
                )
            }),
        };
        let filters = match filters {
            Some((f, origin)) => {
                f.check_shape(model.n_layer(), model.n_head_kv(), model.head_dim())?;
                if !quiet {
                    eprintln!("qfilters: using {origin}");
                    if let Some(w) = magnitude_warning(&f) {
                        eprintln!("qfilters: {w}");
                    }
                }
                Some(f)
            }
            None => None,
        };
        Ok(filters.map(Arc::new))
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

    /// The engine for this policy; `capacity` is the full-cache size for policy `none`, and for
    /// evicting policies the most tokens the job feeds (0: unknown), which caps the context.
    pub fn engine(
        &self,
        margs: &ModelArgs,
        model: &Arc<Model>,
        capacity: usize,
        quiet: bool,
    ) -> Result<Engine> {
        let filters = self.resolve_filters(&margs.model, model, quiet)?;
        self.engine_with_filters(margs, model, capacity, filters)
    }

    /// The engine for this policy with filters the caller already has (e.g. a benchmark's
    /// stand-in filters).
    pub fn engine_with_filters(
        &self,
        margs: &ModelArgs,
        model: &Arc<Model>,
        capacity: usize,
        filters: Option<Arc<QFilters>>,
    ) -> Result<Engine> {
        let scorer = policy::build(
            &self.policy,
            &PolicyInputs {
                filters,
                seed: self.seed,
                recency: self.recency,
            },
        )?;
        self.check()?;
        let eviction = if self.policy == "none" {
            None
        } else {
            Some(EvictionConfig {
                budget: self.budget,
                window: self.window,
                sinks: self.sinks,
                granularity: self.granularity,
                combiner: self.combiner,
                slack: self.slack,
            })
        };
        let evicting = eviction.is_some();
        Engine::new(
            model,
            scorer,
            EngineConfig {
                eviction,
                capacity,
                n_batch: self.n_batch,
                threads: margs.threads(),
                key_source: self.key_source,
                flash_attn: None,
                hook: true,
            },
        )
        .map_err(|e| match e {
            // Only commands with a --budget can be told to lower it.
            Error::ContextCreate { .. } if evicting => {
                Error::invalid(format!("{e}: lower --budget"))
            }
            e => e,
        })
    }
}

/// A warning for filters that pass the finiteness check but score nothing sensible: a zero,
/// denormal or huge direction makes every key's score 0, noise, or overflow.
pub fn magnitude_warning(f: &QFilters) -> Option<String> {
    let [layers, heads, _] = f.shape();
    let mut bad = Vec::new();
    for l in 0..layers {
        for h in 0..heads {
            let v = f.filter(l, h);
            let norm = v
                .iter()
                .map(|&x| f64::from(x) * f64::from(x))
                .sum::<f64>()
                .sqrt();
            if !(1e-6..=1e4).contains(&norm) {
                bad.push(format!("layer {l} head {h} (norm {norm:.3e})"));
            }
        }
    }
    let first = bad.first()?;
    Some(format!(
        "{} of {} filter vectors have a norm outside 1e-6..1e4, e.g. {first}: their scores are meaningless; recalibrate with `qfilters calibrate`",
        bad.len(),
        layers * heads
    ))
}

/// A progress bar on stderr for long inputs, only when stderr is a terminal.
pub struct Progress {
    bar: Option<indicatif::ProgressBar>,
}

impl Progress {
    pub fn new(total: usize, what: &str) -> Progress {
        use std::io::IsTerminal;
        let show = std::io::stderr().is_terminal() && total > 256;
        let bar = show.then(|| {
            let bar = indicatif::ProgressBar::new(total as u64);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{msg} [{bar:40}] {pos}/{len} tokens ({per_sec})",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            bar.set_message(what.to_string());
            bar
        });
        Progress { bar }
    }

    pub fn set(&self, done: usize) {
        if let Some(b) = &self.bar {
            b.set_position(done as u64);
        }
    }

    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

/// Largest text file read (prompt, calibration text, filler): a bound that holds whatever
/// the file's length says (a device or procfs file reports 0).
pub const MAX_TEXT_BYTES: u64 = 256 << 20;

pub fn read_text(path: &Path) -> Result<String> {
    let bytes = gguf_tools::safe_io::read_input(path, MAX_TEXT_BYTES)?;
    String::from_utf8(bytes)
        .map_err(|_| Error::invalid(format!("{} is not UTF-8 text", path.display())))
}

/// Writes `value` to `path` atomically, or to standard output if `path` is `-`.
pub fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|e| Error::invalid(e.to_string()))?;
    gguf_tools::safe_io::write_file(path, (text + "\n").as_bytes())?;
    Ok(())
}

/// Checks, before the work, that every output can be written and is neither an input nor
/// another output; `-` (standard output) is allowed where `stdout_ok`.
pub fn check_outputs(outputs: &[&Path], inputs: &[&Path], stdout_ok: bool) -> Result<()> {
    gguf_tools::safe_io::check_distinct(outputs)?;
    for out in outputs {
        gguf_tools::safe_io::check_output(out, inputs, stdout_ok)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(threads: Option<i32>) -> ModelArgs {
        ModelArgs {
            model: PathBuf::from(DEFAULT_MODEL),
            gpu_layers: 0,
            threads,
            poll: 0,
            verbose: false,
        }
    }

    #[test]
    fn threads_above_the_cores_are_clamped_and_zero_or_negative_refused() {
        assert_eq!(args(Some(100_000)).threads(), available_cores());
        assert!(args(Some(100_000)).check_threads().is_ok());
        assert_eq!(args(Some(1)).threads(), 1);
        for bad in [0, -1] {
            let e = args(Some(bad)).check_threads().unwrap_err();
            assert!(e.to_string().contains("threads"), "{e}");
        }
    }
}
