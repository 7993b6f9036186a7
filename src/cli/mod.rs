//! Pieces every subcommand shares: loading the model, resolving filters, building the engine.

pub mod bench;
pub mod calibrate;
pub mod chat;
pub mod eval;
pub mod filters;
pub mod plot;
pub mod rpc;
pub mod run;
pub mod serve;

use std::path::Path;
use std::sync::Arc;

use clap::parser::ValueSource;
use clap::ArgMatches;
use gguf_tools::filters::{
    QFilters, META_DEFAULT_GRANULARITY, META_DEFAULT_RECENCY, META_DEFAULT_WINDOW,
};

pub use qfilters::args::{EvictionArgs, JobLength, LlamaArgs, ModelArgs, SamplingArgs};
use qfilters::engine::cache::{EvictionConfig, Granularity};
use qfilters::engine::Engine;
use qfilters::ffi::Model;
use qfilters::{Error, Result};

/// Which arguments the user typed on the command line (clap ids of the subcommand that runs,
/// e.g. "recency"), as opposed to those at their defaults: tuned defaults apply only where no
/// flag was typed. `main` reads it once from the parsed command line and hands it to the
/// command that asks.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Given(Vec<String>);

impl Given {
    /// The arguments of the leaf subcommand whose values came from the command line.
    pub fn from_matches(matches: &ArgMatches) -> Given {
        let mut m = matches;
        while let Some((_, sub)) = m.subcommand() {
            m = sub;
        }
        Given(
            m.ids()
                .filter(|id| m.value_source(id.as_str()) == Some(ValueSource::CommandLine))
                .map(|id| id.as_str().to_string())
                .collect(),
        )
    }

    /// Whether the user typed argument `id` (a field name, e.g. "recency").
    pub fn has(&self, id: &str) -> bool {
        self.0.iter().any(|i| i == id)
    }
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
    /// was set, for the stderr line. `budget`: the smallest budget the command will evict to,
    /// with its sinks. A tuned window is used as it is wherever it fits (the setting the sweep
    /// measured); where the smallest budget cannot hold it with the sinks, it is shortened to
    /// half of that budget's non-sink cells (and the line says so) rather than failing a
    /// budget the built-in window fits.
    fn apply(
        &self,
        given: &Given,
        budget: Option<(usize, usize)>,
        mut set_recency: impl FnMut(f64),
        mut set_window: impl FnMut(usize),
        mut set_granularity: impl FnMut(Granularity),
    ) -> Vec<String> {
        let mut used = Vec::new();
        if let Some(r) = self.recency.filter(|_| !given.has("recency")) {
            set_recency(r);
            used.push(format!("recency {r}"));
        }
        if let Some(w) = self.window.filter(|_| !given.has("window")) {
            match budget {
                Some((b, sinks)) if !EvictionConfig::window_fits(b, w, sinks) => {
                    let half = b.saturating_sub(sinks) / 2;
                    set_window(half);
                    used.push(format!(
                        "window {half} (tuned {w} does not fit budget {b}; half its cells)"
                    ));
                }
                _ => {
                    set_window(w);
                    used.push(format!("window {w}"));
                }
            }
        }
        if let Some(g) = self.granularity.filter(|_| !given.has("granularity")) {
            set_granularity(g);
            used.push(format!("granularity {g}"));
        }
        used
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

pub use qfilters::args::check_cells;

/// What the command line adds to [`EvictionArgs`]: the tuned defaults of the filters where no
/// flag was given, filter resolution with its stderr notes, and the engine with errors that
/// name the flag to change.
pub trait EvictionCli {
    /// Takes the tuned defaults of the filters in use (see [`Tuned`]) where no flag was given.
    fn apply_tuned(&mut self, model_path: &Path, given: &Given) -> Result<()>;

    /// Filters from --filters, else from the GGUF, for a policy that needs them; says on
    /// stderr which are used unless `quiet`.
    fn resolve_filters(
        &self,
        model_path: &Path,
        model: &Model,
        quiet: bool,
    ) -> Result<Option<Arc<QFilters>>>;

    /// The engine for this policy with the filters the caller resolved (or a benchmark's
    /// stand-in filters) and llama.cpp's flags, sized for `job`.
    fn engine_with_filters(
        &self,
        margs: &ModelArgs,
        llama: &LlamaArgs,
        model: &Arc<Model>,
        job: JobLength,
        filters: Option<Arc<QFilters>>,
    ) -> Result<Engine>;

    /// [`EvictionCli::engine_with_filters`] with the filters resolved here.
    fn engine(
        &self,
        margs: &ModelArgs,
        llama: &LlamaArgs,
        model: &Arc<Model>,
        job: JobLength,
        quiet: bool,
    ) -> Result<Engine> {
        let filters = self.resolve_filters(&margs.model, model, quiet)?;
        self.engine_with_filters(margs, llama, model, job, filters)
    }
}

impl EvictionCli for EvictionArgs {
    fn apply_tuned(&mut self, model_path: &Path, given: &Given) -> Result<()> {
        if let Some((t, origin)) = Tuned::find(self.filters.as_deref(), model_path)? {
            let (mut r, mut w, mut g) = (self.recency, self.window, self.granularity);
            let budget = self.policy.evicts.then_some((self.budget, self.sinks));
            let used = t.apply(given, budget, |x| r = x, |x| w = x, |x| g = x);
            (self.recency, self.window, self.granularity) = (r, w, g);
            announce(&used, &origin);
        }
        Ok(())
    }

    fn resolve_filters(
        &self,
        model_path: &Path,
        model: &Model,
        quiet: bool,
    ) -> Result<Option<Arc<QFilters>>> {
        if !self.policy.needs_filters {
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

    fn engine_with_filters(
        &self,
        margs: &ModelArgs,
        llama: &LlamaArgs,
        model: &Arc<Model>,
        job: JobLength,
        filters: Option<Arc<QFilters>>,
    ) -> Result<Engine> {
        let scorer = self.scorer(filters, llama.seed)?;
        let config = self.engine_config(llama, job, margs.threads())?;
        let evicting = self.policy.evicts;
        Engine::new(model, scorer, config).map_err(|e| match e {
            // Only commands with a --budget can be told to lower it.
            Error::ContextCreate { .. } if evicting => {
                Error::invalid(format!("{e}: lower --budget"))
            }
            e => e,
        })
    }
}

/// Falls back to [`qfilters::policy::WITHOUT_FILTERS`] when the policy is the default one,
/// needs filters and none are at hand (`run`, `chat` and `serve` with a plain GGUF), and says
/// so on stderr. A `--policy` the user typed is kept (clap's value source, recorded by
/// `main`): it then fails with the error that says how to get filters.
pub fn fall_back_without_filters(
    e: &mut EvictionArgs,
    have_filters: bool,
    model_path: &Path,
    given: &Given,
) {
    let fallback = qfilters::policy::WITHOUT_FILTERS;
    if e.policy.needs_filters && !have_filters && !given.has("policy") {
        eprintln!(
            "qfilters: policy {fallback} ({}): no --filters given and {} embeds no Q-Filters; make filters with `qfilters calibrate` to use policy {}",
            fallback.help,
            model_path.display(),
            e.policy
        );
        e.policy = fallback;
    }
}

/// The library's errors carry the numbers; the flags that change them are the CLI's, named
/// here, once, for every command (each command with eviction flags declares them through
/// [`EvictionArgs`]).
pub fn name_flags(e: Error) -> Error {
    match e {
        Error::BudgetTooSmall {
            budget,
            window,
            sinks,
        } => Error::invalid(format!(
            "--budget {budget} is smaller than --window {window} + --sinks {sinks} + 1: raise the budget or shrink the window"
        )),
        e @ Error::HeadMovesUnsupported { .. } => {
            Error::invalid(format!("{e}: use --granularity position"))
        }
        e => e,
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
pub fn write_json(path: &Path, value: &impl serde::Serialize) -> Result<()> {
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
    use qfilters::args::{available_cores, DEFAULT_MODEL};
    use std::path::PathBuf;

    fn args(threads: Option<i32>) -> ModelArgs {
        ModelArgs {
            model: PathBuf::from(DEFAULT_MODEL),
            gpu_layers: 0,
            threads,
            poll: 0,
            verbose: false,
            rpc: Vec::new(),
        }
    }

    #[test]
    fn a_tuned_window_is_kept_where_it_fits_and_halved_where_it_does_not() {
        let t = Tuned {
            window: Some(128),
            ..Tuned::default()
        };
        let window = |budget| {
            let mut w = 0;
            let used = t.apply(&Given::default(), budget, |_| {}, |x| w = x, |_| {});
            (w, used.join(", "))
        };
        // The tuning budget (256, 4 sinks) holds window 128: the measured setting is used.
        assert_eq!(window(Some((256, 4))), (128, "window 128".to_string()));
        assert_eq!(window(Some((133, 4))).0, 128);
        assert_eq!(window(None).0, 128);
        // 132 cells cannot hold 128 + 4 sinks + 1 scored cell: half of the 128 non-sink cells.
        let (w, line) = window(Some((132, 4)));
        assert_eq!(w, 64);
        assert!(line.contains("tuned 128 does not fit budget 132"), "{line}");
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
