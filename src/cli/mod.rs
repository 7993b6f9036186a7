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

use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::parser::ValueSource;
use clap::ArgMatches;
use gguf_tools::filters::QFilters;

pub use qfilters::args::{EvictionArgs, JobLength, LlamaArgs, ModelArgs, SamplingArgs};
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

pub use qfilters::calibrate::tune::Tuned;

/// The tuned defaults of the filters a run found, if they carry any; with where they came
/// from.
fn find_tuned(found: Option<&FoundFilters>) -> Result<Option<(Tuned, String)>> {
    let Some(found) = found else {
        return Ok(None);
    };
    let origin = found.source();
    let t = Tuned::from_filters(&found.filters, &origin)?;
    Ok((t != Tuned::default()).then_some((t, origin)))
}

/// The Q-Filters a run can use, read once before the model loads: from --filters, else the
/// ones embedded in the model's GGUF. The tuned defaults ([`Tuned::find`]) and the scorer
/// ([`EvictionCli::resolve_filters`]) both take them from here.
pub struct FoundFilters {
    pub filters: Arc<QFilters>,
    /// The --filters path they came from; `None`: embedded in `model`.
    file: Option<PathBuf>,
    model: PathBuf,
}

impl FoundFilters {
    /// One error policy for every command: filters that exist but are broken are an error
    /// (a --filters file that does not load, `qfilters.*` keys of the GGUF that do not
    /// decode), whatever the policy; no filters at all is not (no --filters, and a GGUF without
    /// `qfilters.*` keys). A GGUF our reader cannot parse counts as one without filters: the
    /// model file is llama.cpp's to accept or refuse, with its own error, when it loads.
    pub fn load(filters: Option<&Path>, model: &Path) -> Result<Option<FoundFilters>> {
        let (filters, file) = match filters {
            Some(p) => (QFilters::load(p)?, Some(p.to_path_buf())),
            None => {
                let Ok(gguf) = gguf_tools::gguf::read(model) else {
                    return Ok(None);
                };
                match QFilters::from_metadata(&gguf.metadata)? {
                    Some(f) => (f, None),
                    None => return Ok(None),
                }
            }
        };
        Ok(Some(FoundFilters {
            filters: Arc::new(filters),
            file,
            model: model.to_path_buf(),
        }))
    }

    /// Where the filters came from, for stderr notes.
    fn source(&self) -> String {
        match &self.file {
            Some(p) => p.display().to_string(),
            None => format!("the Q-Filters embedded in {}", self.model.display()),
        }
    }
}

/// Says on stderr, in one line, that the policy is the tuned default of `origin`.
fn announce_policy(policy: qfilters::policy::PolicyInfo, origin: &str, how: &str) {
    eprintln!("qfilters: policy {policy} (tuned default from {origin}{how})");
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
    /// Takes the tuned defaults of the filters found (see [`Tuned`]) where no flag was given.
    fn apply_tuned(&mut self, found: Option<&FoundFilters>, given: &Given) -> Result<()>;

    /// The filters found ([`FoundFilters::load`]), for a policy that needs them, checked
    /// against the model; says on stderr which are used unless `quiet`.
    fn resolve_filters(
        &self,
        found: Option<&FoundFilters>,
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
        found: Option<&FoundFilters>,
        quiet: bool,
    ) -> Result<Engine> {
        let filters = self.resolve_filters(found, model, quiet)?;
        self.engine_with_filters(margs, llama, model, job, filters)
    }
}

impl EvictionCli for EvictionArgs {
    fn apply_tuned(&mut self, found: Option<&FoundFilters>, given: &Given) -> Result<()> {
        if let Some((t, origin)) = find_tuned(found)? {
            // The policy first: whether it evicts decides how the window is fitted.
            if let Some(p) = t.policy_default(|id| given.has(id)) {
                self.policy = p;
                announce_policy(p, &origin, "");
            }
            let (mut r, mut w, mut g) = (self.recency, self.window, self.granularity);
            let budget = self.policy.evicts.then_some((self.budget, self.sinks));
            let used = t.apply(|id| given.has(id), budget, |x| r = x, |x| w = x, |x| g = x);
            (self.recency, self.window, self.granularity) = (r, w, g);
            announce(&used, &origin);
        }
        Ok(())
    }

    fn resolve_filters(
        &self,
        found: Option<&FoundFilters>,
        model: &Model,
        quiet: bool,
    ) -> Result<Option<Arc<QFilters>>> {
        if !self.policy.needs_filters {
            // Using them would only announce filters that change nothing; filters that chose
            // this policy are not ignored: their defaults apply (announced then).
            let chose_it = found
                .and_then(|f| Tuned::from_filters(&f.filters, "").ok())
                .and_then(|t| t.policy)
                == Some(self.policy);
            if self.filters.is_some() && !quiet && !chose_it {
                eprintln!(
                    "qfilters: --filters ignored: policy {} does not use filters",
                    self.policy
                );
            }
            return Ok(None);
        }
        let Some(found) = found else {
            return Ok(None);
        };
        let f = &found.filters;
        f.check_shape(model.n_layer(), model.n_head_kv(), model.head_dim())?;
        if !quiet {
            match &found.file {
                Some(p) => eprintln!("qfilters: using filters from {}", p.display()),
                None => eprintln!("qfilters: using {}", found.source()),
            }
            if let Some(w) = magnitude_warning(f) {
                eprintln!("qfilters: {w}");
            }
        }
        Ok(Some(Arc::clone(f)))
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
            rpc_timeout: 60,
        }
    }

    /// One error policy for filters: broken ones are an error whatever the policy, none is not.
    #[test]
    fn filters_that_exist_but_are_broken_are_an_error_and_missing_ones_are_not() {
        use gguf_tools::gguf::{GgufFile, Value};
        let dir = tempfile::tempdir().expect("temp dir");
        let gguf = |name: &str, metadata: Vec<(String, Value)>| {
            let path = dir.path().join(name);
            let bytes = GgufFile::new(metadata, Vec::new())
                .and_then(|f| f.header_bytes())
                .expect("header");
            std::fs::write(&path, bytes).expect("write");
            path
        };
        // A model GGUF without qfilters keys, and one our reader cannot parse: no filters.
        let plain = gguf("plain.gguf", vec![("general.name".into(), Value::U32(1))]);
        assert!(FoundFilters::load(None, &plain).unwrap().is_none());
        let garbage = dir.path().join("garbage.gguf");
        std::fs::write(&garbage, b"not a gguf").expect("write");
        assert!(FoundFilters::load(None, &garbage).unwrap().is_none());
        // Embedded filters of a layout this build does not know: an error.
        let broken = gguf(
            "broken.gguf",
            vec![("qfilters.version".into(), Value::U32(99))],
        );
        let e = FoundFilters::load(None, &broken)
            .err()
            .expect("broken keys refused");
        assert!(e.to_string().contains("version"), "{e}");
        // A --filters file that does not load: an error, even beside a good model.
        let missing = dir.path().join("missing.safetensors");
        assert!(FoundFilters::load(Some(&missing), &plain).is_err());
    }

    #[test]
    fn a_tuned_window_is_kept_where_it_fits_and_halved_where_it_does_not() {
        let t = Tuned {
            window: Some(128),
            ..Tuned::default()
        };
        let window = |budget| {
            let mut w = 0;
            let used = t.apply(|_| false, budget, |_| {}, |x| w = x, |_| {});
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
