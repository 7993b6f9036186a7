//! `qfilters calibrate`: Q-Filters for a GGUF model from plain text, no PyTorch.

use std::path::{Path, PathBuf};
use std::time::Instant;

use std::sync::Arc;

use clap::Args;
use gguf_tools::filters::{QFilters, META_SAMPLES, META_TOKENS};
use serde_json::json;
use sha2::{Digest, Sha256};

use qfilters::calibrate::tune::{self, TuneConfig};
use qfilters::calibrate::{calibrate, CalibrationConfig};
use qfilters::engine::cache::{EvictionConfig, Granularity};
use qfilters::ffi::Model;
use qfilters::{Error, Result};

use qfilters::args::DEFAULT_SINKS;

use super::{read_text, write_json, ModelArgs, Progress};

#[derive(Args, Debug)]
pub struct CalibrateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Calibration text (UTF-8); repeat to use several files, read in order.
    #[arg(long = "text", required_unless_present = "filters")]
    pub text: Vec<PathBuf>,
    /// Keep these filters instead of calibrating new ones (to tune them with --tune).
    #[arg(long, conflicts_with = "text")]
    pub filters: Option<PathBuf>,
    /// Development text for choosing this model's eviction policy and defaults: a short
    /// streaming-perplexity sweep (policy qfilters: every recency prior with every recent
    /// window, then granularity at the best pair; every other policy whose inputs exist, and
    /// qfilters+keydiff and expected-attention+keydiff where theirs do, at no prior and at
    /// that prior; StreamingLLM and K-norm as references,
    /// never chosen; a setting or policy listed later must beat the earlier ones by more than
    /// 1% of PPL to be chosen); the choice and its evidence go into the filters' metadata.
    /// Use text you will not evaluate on.
    #[arg(long)]
    pub tune: Option<PathBuf>,
    /// Tokens of the --tune text. Long enough for eviction to reach its steady state: over
    /// 1024 tokens old high-scoring keys have not yet piled up, and the sweep then prefers no
    /// recency prior where 4096 tokens (of the same text, and held-out text) need one.
    #[arg(long = "tune-tokens", default_value_t = 4096)]
    pub tune_tokens: usize,
    /// KV budgets of the sweep; the objective is averaged over them.
    #[arg(long = "tune-budget", value_delimiter = ',', default_value = "256")]
    pub tune_budget: Vec<usize>,
    /// Tokens per decode (and eviction round) of the sweep.
    #[arg(long = "tune-chunk", default_value_t = 32)]
    pub tune_chunk: usize,
    /// Recency priors tried (0 = off), each with every --tune-window, at the first granularity;
    /// listed from the plainest (no prior, then the weakest) so that a tie keeps the setting
    /// that trusts the filters' scores most.
    #[arg(
        long = "tune-recency",
        value_delimiter = ',',
        default_value = "0,512,128,32"
    )]
    pub tune_recency: Vec<f64>,
    /// Granularities tried at the best recency.
    #[arg(
        long = "tune-granularity",
        value_delimiter = ',',
        default_value = "head,position"
    )]
    pub tune_granularity: Vec<Granularity>,
    /// Recent windows tried with every recency prior; each must leave room for scored tokens
    /// in the smallest --tune-budget (window + sinks < budget).
    #[arg(
        long = "tune-window",
        value_delimiter = ',',
        default_value = "32,64,128"
    )]
    pub tune_window: Vec<usize>,
    /// Write every point of the sweep as JSON.
    #[arg(long = "tune-json")]
    pub tune_json: Option<PathBuf>,
    /// Text tokens to run through the model. The default (one window) gives filters within
    /// cosine 0.99 of a 16K-token calibration (docs/RESULTS.md); more costs time, not quality.
    #[arg(long, default_value_t = 2048)]
    pub tokens: usize,
    /// Tokens per independent window (the KV cache is cleared between windows); queries are
    /// sampled at positions up to this, so it should cover the contexts the filters will see.
    #[arg(long = "seq-len", default_value_t = 2048)]
    pub seq_len: usize,
    /// Query positions sampled per layer.
    #[arg(long, default_value_t = 1000)]
    pub samples: usize,
    /// Seed of the position sampling.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Output: a .safetensors file (config.json is written beside it) or a folder.
    #[arg(short = 'o', long = "output")]
    pub output: PathBuf,
    /// Also write a copy of the model with the filters embedded in its GGUF metadata.
    #[arg(long)]
    pub embed: Option<PathBuf>,
}

pub fn run(args: CalibrateArgs) -> Result<()> {
    let start = Instant::now();
    super::check_cells("--seq-len", args.seq_len)?;
    // Every output is checked before the slow part: writable, not an input, not each other
    // (`-o x.safetensors --embed x.safetensors` would overwrite the filters with the model).
    let mut inputs: Vec<&Path> = vec![&args.model.model];
    inputs.extend(args.text.iter().map(PathBuf::as_path));
    inputs.extend(args.tune.as_deref());
    inputs.extend(args.filters.as_deref());
    QFilters::check_save(&args.output, &inputs)?;
    if let Some(embed) = &args.embed {
        let [st, config] = QFilters::save_paths(&args.output);
        gguf_tools::safe_io::check_distinct(&[&st, &config, embed])?;
        gguf_tools::safe_io::check_output(embed, &inputs, false)?;
    }
    // Read every input before the slow part, so a typo fails at once.
    let mut texts = Vec::with_capacity(args.text.len());
    for path in &args.text {
        texts.push(read_text(path)?);
    }
    let tune_text = args.tune.as_deref().map(read_text).transpose()?;
    if args.tune.is_some() {
        check_tune_args(&args)?;
    }
    let model = args.model.load()?;
    let mut filters = match &args.filters {
        Some(path) => {
            let f = QFilters::load(path)?;
            f.check_shape(model.n_layer(), model.n_head_kv(), model.head_dim())?;
            f
        }
        None => calibrate_new(&args, &model, &texts, start)?,
    };
    if let (Some(text), Some(path)) = (&tune_text, &args.tune) {
        tune(&args, &model, &mut filters, text, path)?;
    }
    filters.save(&args.output)?;
    if args.filters.is_some() || args.tune.is_some() {
        eprintln!("qfilters: wrote {}", args.output.display());
    }
    if let Some(out) = &args.embed {
        use std::io::IsTerminal;
        // --force: the output is a new file, and any filters already in the input model are
        // exactly what this calibration replaces.
        gguf_tools::edit::embed(
            &args.model.model,
            &saved_file(&args.output),
            out,
            true,
            std::io::stderr().is_terminal(),
        )?;
        eprintln!(
            "qfilters: wrote {} with the filters embedded",
            out.display()
        );
    }
    Ok(())
}

fn calibrate_new(
    args: &CalibrateArgs,
    model: &Arc<Model>,
    texts: &[String],
    start: Instant,
) -> Result<QFilters> {
    let mut tokens = Vec::new();
    let mut hasher = Sha256::new();
    for text in texts {
        if tokens.len() >= args.tokens {
            break;
        }
        hasher.update(text.as_bytes());
        tokens.extend(model.tokenize(text, false, false)?);
    }
    let text_sha256: String = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    // A window longer than the tokens at hand would only allocate cells nobody fills.
    let seq_len = args.seq_len.min(args.tokens.min(tokens.len()).max(2));
    let cfg = CalibrationConfig {
        tokens: args.tokens,
        seq_len,
        samples: args.samples,
        seed: args.seed,
        threads: args.model.threads(),
        ..CalibrationConfig::default()
    };
    let progress = Progress::new(args.tokens.min(tokens.len()), "calibrate");
    let cal = calibrate(model, &tokens, &cfg, &mut |done, _| progress.set(done));
    progress.finish();
    let cal = cal?;

    let mut filters = QFilters::new(cal.num_layers, cal.num_kv_heads, cal.head_dim, cal.filters)?;
    let model_name = model
        .meta("general.name")
        .unwrap_or_else(|| file_name(&args.model.model));
    for (k, v) in [
        ("model", model_name),
        ("model_file", file_name(&args.model.model)),
        ("text_sha256", text_sha256),
        (META_TOKENS, cal.tokens.to_string()),
        (META_SAMPLES, cal.samples.to_string()),
        ("seed", args.seed.to_string()),
        ("seq_len", seq_len.to_string()),
        ("tool", format!("qfilters {}", env!("CARGO_PKG_VERSION"))),
    ] {
        filters.metadata.insert(k.to_string(), v);
    }
    match (&cal.query_stats.stats, &cal.query_stats.skipped) {
        (Some(stats), _) => {
            stats.store(&mut filters)?;
            eprintln!(
                "qfilters: expected-attention statistics: {} query heads per layer, covariance rank {} ({:.0}% of its variance)",
                stats.n_head,
                stats.rank,
                100.0 * cal.query_stats.variance_kept
            );
        }
        (None, why) => eprintln!(
            "qfilters: no expected-attention statistics: {}; the other policies are unaffected",
            why.as_deref().unwrap_or("none gathered")
        ),
    }
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "qfilters: calibrated {} layers × {} KV heads × {} dims on {} tokens ({} samples/layer) in {:.1} s, peak memory {} → {}",
        cal.num_layers,
        cal.num_kv_heads,
        cal.head_dim,
        cal.tokens,
        cal.samples,
        secs,
        peak_memory().unwrap_or_else(|| "unknown".into()),
        args.output.display()
    );
    if cal.tokens < args.tokens {
        eprintln!(
            "qfilters: the text has only {} tokens (asked for {}); give more --text for steadier filters",
            cal.tokens, args.tokens
        );
    }
    if cal.unconverged_heads > 0 {
        eprintln!(
            "qfilters: {} query heads have no clearly dominant direction (power iteration did not settle); their filters are less reliable",
            cal.unconverged_heads
        );
    }
    Ok(filters)
}

fn check_tune_args(args: &CalibrateArgs) -> Result<()> {
    if args.tune_budget.is_empty()
        || args.tune_recency.is_empty()
        || args.tune_window.is_empty()
        || args.tune_granularity.is_empty()
    {
        return Err(Error::invalid(
            "the --tune-* lists need at least one value each",
        ));
    }
    if args.tune_chunk == 0 || args.tune_tokens < 2 {
        return Err(Error::invalid(
            "--tune-chunk must be at least 1 and --tune-tokens at least 2",
        ));
    }
    for &r in &args.tune_recency {
        qfilters::policy::check_recency("--tune-recency", r)?;
    }
    let smallest = args.tune_budget.iter().copied().min().unwrap_or(0);
    if let Some(w) = args
        .tune_window
        .iter()
        .find(|&&w| !EvictionConfig::window_fits(smallest, w, DEFAULT_SINKS))
    {
        return Err(Error::invalid(format!(
            "--tune-window {w} leaves no scored cells in --tune-budget {smallest} ({DEFAULT_SINKS} sinks): give smaller windows or larger budgets"
        )));
    }
    Ok(())
}

/// Runs the tuning sweep ([`qfilters::calibrate::tune`]) on the --tune text, with progress
/// on stderr, and writes the choice and its evidence into the filters' metadata (and every
/// measurement to --tune-json).
fn tune(
    args: &CalibrateArgs,
    model: &Arc<Model>,
    filters: &mut QFilters,
    text: &str,
    path: &Path,
) -> Result<()> {
    let mut tokens = model.tokenize(text, true, false)?;
    tokens.truncate(args.tune_tokens);
    if tokens.len() < 2 {
        return Err(Error::invalid("the --tune text has fewer than 2 tokens"));
    }
    let cfg = TuneConfig {
        budgets: args.tune_budget.clone(),
        chunk: args.tune_chunk,
        recency: args.tune_recency.clone(),
        window: args.tune_window.clone(),
        granularity: args.tune_granularity.clone(),
        threads: args.model.threads(),
    };
    let started = Instant::now();
    let shared = Arc::new(filters.clone());
    let tuning = tune::tune(model, &shared, &tokens, &cfg, |m| {
        let shown: Vec<String> = m
            .per_budget
            .iter()
            .map(|(b, p, p2)| format!("b{b} {p:.3}/{p2:.3}"))
            .collect();
        eprintln!(
            "qfilters: tune {:<50} PPL all/2nd half {}",
            m.setting.label(),
            shown.join(", ")
        );
    })?;
    let secs = started.elapsed().as_secs_f64();
    let name = file_name(path);
    tuning.record(filters, &cfg, &name, text);
    let best = tuning.best;
    eprintln!(
        "qfilters: tuned on {} tokens of {name} in {secs:.0} s ({} settings): {}",
        tuning.tokens,
        tuning.measured.len(),
        tuning.verdict()
    );
    if let Some(out) = &args.tune_json {
        let (n_tokens, name) = (tuning.tokens, name.as_str());
        let records: Vec<serde_json::Value> = tuning
            .measured
            .iter()
            .flat_map(|p| {
                p.per_budget.iter().map(move |&(b, ppl, ppl2)| {
                    json!({
                        "policy": p.setting.policy,
                        "role": p.role.to_string(),
                        "recency": p.setting.recency,
                        "window": p.setting.window,
                        "granularity": p.setting.granularity.to_string(),
                        "budget": b,
                        "ppl": ppl,
                        "ppl_second_half": ppl2,
                        "objective": p.objective,
                        "chosen": p.setting == best,
                        "tokens": n_tokens,
                        "chunk": args.tune_chunk,
                        "text": name,
                    })
                })
            })
            .collect();
        write_json(out, &serde_json::Value::Array(records))?;
    }
    Ok(())
}

/// The .safetensors file `QFilters::save` wrote for `output`.
fn saved_file(output: &Path) -> PathBuf {
    if output.extension().is_some_and(|e| e == "safetensors") {
        output.to_path_buf()
    } else {
        output.join(gguf_tools::filters::DEFAULT_FILE_NAME)
    }
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Peak resident memory of this process (VmHWM), Linux only.
fn peak_memory() -> Option<String> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(format!("{:.0} MiB", kb as f64 / 1024.0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use qfilters::calibrate::tune::{grid, pick};

    #[test]
    fn command_line_defaults_are_the_library_defaults() {
        #[derive(clap::Parser)]
        struct One {
            #[command(flatten)]
            args: CalibrateArgs,
        }
        let args = <One as clap::Parser>::try_parse_from(["calibrate", "--text", "t", "-o", "o"])
            .expect("calibrate args parse")
            .args;
        let lib = CalibrationConfig::default();
        assert_eq!(
            (args.tokens, args.seq_len, args.samples, args.seed),
            (lib.tokens, lib.seq_len, lib.samples, lib.seed)
        );
    }

    #[test]
    fn on_a_tie_the_default_order_keeps_the_weakest_prior() {
        #[derive(clap::Parser)]
        struct One {
            #[command(flatten)]
            args: CalibrateArgs,
        }
        let args = <One as clap::Parser>::try_parse_from([
            "calibrate",
            "--filters",
            "f.safetensors",
            "-o",
            "o.safetensors",
        ])
        .expect("calibrate args parse")
        .args;
        assert_eq!(args.tune_recency, [0.0, 512.0, 128.0, 32.0]);
        assert_eq!(args.tune_window, [32, 64, 128]);
        let g = grid(
            qfilters::policy::QFILTERS,
            &args.tune_recency,
            &args.tune_window,
            Granularity::Head,
        );
        // Objectives measured on 4096 tokens of tinyshakespeare, budget 256, in this grid's
        // order (docs/results/*_tune.json): the priors' best settings lie close together, and
        // the weakest prior that no later setting beats by more than TUNE_TIE is kept.
        let qwen = [
            4.7893, 4.7168, 4.6078, 4.6465, 4.6074, 4.5675, 4.5803, 4.5761, 4.5667, 4.5705, 4.5705,
            4.5725,
        ];
        let gemma = [
            4.0516, 4.0074, 3.955, 3.9317, 3.9193, 3.921, 3.9066, 3.9091, 3.9052, 3.9102, 3.9102,
            3.9102,
        ];
        let chosen = |o: &[f64]| (g[pick(o)].recency, g[pick(o)].window);
        assert_eq!(chosen(&qwen), (512.0, 128));
        assert_eq!(chosen(&gemma), (128.0, 32));
    }

    #[test]
    fn a_window_the_smallest_budget_cannot_hold_is_refused() {
        #[derive(clap::Parser)]
        struct One {
            #[command(flatten)]
            args: CalibrateArgs,
        }
        let parse = |extra: &[&str]| {
            let base = [
                "calibrate",
                "--filters",
                "f.safetensors",
                "-o",
                "o.safetensors",
            ];
            <One as clap::Parser>::try_parse_from(base.iter().chain(extra))
                .expect("calibrate args parse")
                .args
        };
        assert!(check_tune_args(&parse(&[])).is_ok());
        let e = check_tune_args(&parse(&[
            "--tune-budget",
            "512,128",
            "--tune-window",
            "32,124",
        ]))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("--tune-window 124") && e.contains("--tune-budget 128"),
            "{e}"
        );
        assert!(check_tune_args(&parse(&["--tune-budget", "128", "--tune-window", "123"])).is_ok());
    }
}
