//! `qfilters eval ppl|passkey`: quality under compression, swept over policies, budgets and
//! eviction knobs in one process (timings within one run are comparable).

use std::path::PathBuf;

use clap::{Args, Subcommand};
use serde_json::{json, Value};

use qfilters::cache::{Combiner, Granularity};
use qfilters::eval::passkey::{build_document, run_trial, PromptFormat};
use qfilters::eval::plot::{heatmaps, line_chart, Heatmap, Series};
use qfilters::eval::ppl::{full_context_nll, perplexities, streaming_nll};
use qfilters::eval::windowed_mean;
use qfilters::{Error, Result};

use super::{
    check_cells, check_outputs, read_text, write_json, EvictionArgs, EvictionCli, ModelArgs,
};

#[derive(Args, Debug)]
pub struct EvalArgs {
    #[command(subcommand)]
    pub command: EvalCommand,
}

#[derive(Subcommand, Debug)]
pub enum EvalCommand {
    /// Streaming perplexity: the text is fed in chunks, the cache evicts after each chunk.
    Ppl(PplArgs),
    /// Passkey retrieval: a 5-digit key hidden in filler text, asked for at the end.
    Passkey(PasskeyArgs),
}

/// Policies and knobs to sweep; every list is comma-separated and the sweep is their product.
#[derive(Args, Debug, Clone)]
pub struct SweepArgs {
    /// Policies: qfilters, knorm, streaming, random, none.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "qfilters,knorm,streaming,random,none"
    )]
    pub policy: Vec<String>,
    /// Q-Filters file (default: the filters embedded in the model).
    #[arg(long)]
    pub filters: Option<PathBuf>,
    /// Most recent tokens never evicted.
    #[arg(long, value_delimiter = ',', default_values_t = [qfilters::args::DEFAULT_WINDOW])]
    pub window: Vec<usize>,
    /// First tokens never evicted.
    #[arg(long, value_delimiter = ',', default_values_t = [qfilters::args::DEFAULT_SINKS])]
    pub sinks: Vec<usize>,
    /// head or position (streaming and random always run per position).
    #[arg(long, value_delimiter = ',', default_values_t = [qfilters::args::DEFAULT_GRANULARITY])]
    pub granularity: Vec<Granularity>,
    /// mean-z, mean-rank, max-z (position granularity only).
    #[arg(long, value_delimiter = ',', default_values_t = [qfilters::args::DEFAULT_COMBINER])]
    pub combiner: Vec<Combiner>,
    /// Each eviction round goes this many cells below the budget, so rounds run once per
    /// slack+1 generated tokens; the cache never exceeds the budget. 0 evicts just enough.
    #[arg(long, value_delimiter = ',', default_value = "0")]
    pub slack: Vec<usize>,
    /// Recency prior (tokens of age per standard deviation of score; 0 off) for qfilters/knorm.
    #[arg(long, value_delimiter = ',', default_values_t = [qfilters::args::DEFAULT_RECENCY])]
    pub recency: Vec<f64>,
    /// Tokens per decode call while feeding the input; eviction runs after each chunk.
    #[arg(long)]
    pub chunk: Option<usize>,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
}

/// One point of the sweep.
#[derive(Debug, Clone)]
struct Variant {
    policy: String,
    budget: Option<usize>,
    window: usize,
    sinks: usize,
    granularity: Granularity,
    combiner: Combiner,
    slack: usize,
    recency: f64,
}

impl Variant {
    fn label(&self, multi: &[bool; 6]) -> String {
        let mut s = self.policy.clone();
        if let Some(b) = self.budget {
            s += &format!(" b{b}");
        }
        if self.policy == "none" {
            return s + " (full cache)";
        }
        if multi[0] {
            s += &format!(" w{}", self.window);
        }
        if multi[1] {
            s += &format!(" s{}", self.sinks);
        }
        if multi[2] && scores_differ(&self.policy) {
            s += &format!(" {}", gran_name(self.granularity));
        }
        if multi[3] && scores_differ(&self.policy) && self.granularity == Granularity::Position {
            s += &format!(" {}", comb_name(self.combiner));
        }
        if multi[4] {
            s += &format!(" slack{}", self.slack);
        }
        if multi[5] && scores_differ(&self.policy) {
            s += &format!(" r{}", self.recency);
        }
        s
    }

    fn fields(&self) -> Value {
        json!({
            "policy": self.policy,
            "budget": self.budget,
            "window": self.window,
            "sinks": self.sinks,
            "granularity": gran_name(self.granularity),
            "combiner": comb_name(self.combiner),
            "slack": self.slack,
            "recency": self.recency,
        })
    }
}

/// Whether a policy's scores differ between heads (else granularity and combiner do nothing).
fn scores_differ(policy: &str) -> bool {
    matches!(policy, "qfilters" | "knorm")
}

fn gran_name(g: Granularity) -> &'static str {
    match g {
        Granularity::Head => "head",
        Granularity::Position => "position",
    }
}

fn comb_name(c: Combiner) -> &'static str {
    match c {
        Combiner::MeanZ => "mean-z",
        Combiner::MeanRank => "mean-rank",
        Combiner::MaxZ => "max-z",
    }
}

impl SweepArgs {
    /// Takes the tuned defaults of the filters in use where no flag was given, for every
    /// policy of the sweep (so baselines get the same tuning as Q-Filters).
    fn apply_tuned(&mut self, model_path: &std::path::Path) -> Result<()> {
        if let Some((t, origin)) = super::Tuned::find(self.filters.as_deref(), model_path)? {
            let (mut r, mut w, mut g) = (None, None, None);
            let used = t.apply(|x| r = Some(x), |x| w = Some(x), |x| g = Some(x));
            if let Some(r) = r {
                self.recency = vec![r];
            }
            if let Some(w) = w {
                self.window = vec![w];
            }
            if let Some(g) = g {
                self.granularity = vec![g];
            }
            super::announce(&used, &origin);
        }
        Ok(())
    }

    /// The product of the lists, without points that cannot differ (the full cache once; no
    /// granularity or combiner variants for policies whose heads all score alike).
    fn variants(&self, budgets: &[Option<usize>]) -> Vec<Variant> {
        let mut out: Vec<Variant> = Vec::new();
        for policy in &self.policy {
            if policy == "none" {
                out.push(Variant {
                    policy: policy.clone(),
                    budget: None,
                    window: self.window[0],
                    sinks: self.sinks[0],
                    granularity: Granularity::Position,
                    combiner: Combiner::MeanZ,
                    slack: 0,
                    recency: 0.0,
                });
                continue;
            }
            for &budget in budgets {
                for &window in &self.window {
                    for &sinks in &self.sinks {
                        for &g in &self.granularity {
                            for &c in &self.combiner {
                                for &slack in &self.slack {
                                    for &recency in &self.recency {
                                        let recency =
                                            if scores_differ(policy) { recency } else { 0.0 };
                                        let (g, c) = if scores_differ(policy) {
                                            (
                                                g,
                                                if g == Granularity::Head {
                                                    self.combiner[0]
                                                } else {
                                                    c
                                                },
                                            )
                                        } else {
                                            (Granularity::Position, self.combiner[0])
                                        };
                                        let v = Variant {
                                            policy: policy.clone(),
                                            budget,
                                            window,
                                            sinks,
                                            granularity: g,
                                            combiner: c,
                                            slack,
                                            recency,
                                        };
                                        if !out.iter().any(|o| same(o, &v)) {
                                            out.push(v);
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        out
    }

    fn multi(&self) -> [bool; 6] {
        [
            self.window.len() > 1,
            self.sinks.len() > 1,
            self.granularity.len() > 1,
            self.combiner.len() > 1,
            self.slack.len() > 1,
            self.recency.len() > 1,
        ]
    }

    fn policy_args(&self, v: &Variant, budget: usize, chunk: usize) -> EvictionArgs {
        EvictionArgs {
            policy: *qfilters::policy::lookup(&v.policy).expect("checked by check_lists"),
            budget,
            filters: self.filters.clone(),
            window: v.window,
            sinks: v.sinks,
            granularity: v.granularity,
            combiner: v.combiner,
            slack: v.slack,
            recency: v.recency,
            key_source: qfilters::engine::KeySource::Cache,
            n_batch: chunk,
        }
    }
}

fn same(a: &Variant, b: &Variant) -> bool {
    a.policy == b.policy
        && a.budget == b.budget
        && a.window == b.window
        && a.sinks == b.sinks
        && a.granularity == b.granularity
        && a.combiner == b.combiner
        && a.slack == b.slack
        && a.recency == b.recency
}

#[derive(Args, Debug)]
pub struct PplArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Text to score (UTF-8).
    #[arg(long)]
    pub text: PathBuf,
    /// Tokens of the text to use (from its start).
    #[arg(long, default_value_t = 4096)]
    pub tokens: usize,
    /// KV budgets (cells kept after each eviction round).
    #[arg(long, value_delimiter = ',', default_value = "256,512")]
    pub budget: Vec<usize>,
    #[command(flatten)]
    pub sweep: SweepArgs,
    /// Also compute the full-context NLLs the plain way (one context, large batches) and
    /// report how far policy `none` is from them.
    #[arg(long = "check-full")]
    pub check_full: bool,
    /// Tokens per window of the plot's mean NLL.
    #[arg(long = "plot-window", default_value_t = 128)]
    pub plot_window: usize,
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// SVG chart of mean NLL per window against position.
    #[arg(long)]
    pub plot: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct PasskeyArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Filler text (UTF-8), e.g. tinyshakespeare.
    #[arg(long)]
    pub filler: PathBuf,
    /// Document lengths in tokens.
    #[arg(long, value_delimiter = ',', default_value = "1024,2048,4096")]
    pub lengths: Vec<usize>,
    /// Depths of the key sentence within the filler (0 start, 1 end).
    #[arg(long, value_delimiter = ',', default_value = "0.1,0.3,0.5,0.7,0.9")]
    pub depths: Vec<f64>,
    /// Prompt layout: `chat` (the model's chat template, answer started as "The pass key is")
    /// or `plain` (text only, for base models).
    #[arg(long, default_value = "chat")]
    pub format: PromptFormat,
    /// Documents per (length, depth); the same documents for every policy.
    #[arg(long, default_value_t = 2)]
    pub trials: usize,
    /// KV budgets in cells.
    #[arg(long, value_delimiter = ',', conflicts_with = "ratio")]
    pub budget: Vec<usize>,
    /// Compression ratios: budget = document tokens / ratio.
    #[arg(long, value_delimiter = ',')]
    pub ratio: Vec<f64>,
    #[command(flatten)]
    pub sweep: SweepArgs,
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// SVG heatmaps of accuracy by length × depth, one per policy setting.
    #[arg(long)]
    pub plot: Option<PathBuf>,
}

pub fn run(args: EvalArgs) -> Result<()> {
    match args.command {
        EvalCommand::Ppl(a) => run_ppl(a),
        EvalCommand::Passkey(a) => run_passkey(a),
    }
}

fn check_lists(sweep: &SweepArgs) -> Result<()> {
    if sweep.policy.is_empty() || sweep.window.is_empty() || sweep.sinks.is_empty() {
        return Err(Error::invalid("empty --policy, --window or --sinks list"));
    }
    for p in &sweep.policy {
        qfilters::policy::lookup(p)?;
    }
    if sweep.chunk == Some(0) {
        return Err(Error::invalid("--chunk must be at least 1"));
    }
    Ok(())
}

fn write_svg(path: &std::path::Path, svg: &str) -> Result<()> {
    gguf_tools::safe_io::write_file(path, svg.as_bytes())?;
    Ok(())
}

/// Checks --json and --plot before the sweep: writable, not an input, not each other.
fn check_eval_outputs(
    json: &Option<PathBuf>,
    plot: &Option<PathBuf>,
    model: &ModelArgs,
    text: &std::path::Path,
    sweep: &SweepArgs,
) -> Result<()> {
    let outputs: Vec<&std::path::Path> = json
        .iter()
        .chain(plot.iter())
        .map(|p| p.as_path())
        .collect();
    let filters: Vec<PathBuf> = sweep
        .filters
        .iter()
        .map(|f| gguf_tools::filters::resolve_file(f).unwrap_or_else(|_| f.clone()))
        .collect();
    let mut inputs: Vec<&std::path::Path> = vec![&model.model, text];
    inputs.extend(filters.iter().map(PathBuf::as_path));
    check_outputs(&outputs, &inputs, true)
}

fn model_name(model: &ModelArgs) -> String {
    model
        .model
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn run_ppl(mut args: PplArgs) -> Result<()> {
    check_lists(&args.sweep)?;
    check_cells("--tokens", args.tokens)?;
    for &b in &args.budget {
        check_cells("--budget", b)?;
    }
    check_eval_outputs(&args.json, &args.plot, &args.model, &args.text, &args.sweep)?;
    args.sweep.apply_tuned(&args.model.model)?;
    let chunk = args.sweep.chunk.unwrap_or(16);
    let model = args.model.load()?;
    let text = read_text(&args.text)?;
    let mut tokens = model.tokenize(&text, true, false)?;
    if tokens.len() < args.tokens {
        eprintln!(
            "qfilters: {} holds only {} tokens; using them all",
            args.text.display(),
            tokens.len()
        );
    }
    tokens.truncate(args.tokens);
    if tokens.len() < 2 {
        return Err(Error::invalid("the text has fewer than 2 tokens"));
    }
    let budgets: Vec<Option<usize>> = args.budget.iter().map(|&b| Some(b)).collect();
    let variants = args.sweep.variants(&budgets);
    let multi = args.sweep.multi();
    let mut records = Vec::new();
    let mut series = Vec::new();
    println!(
        "{:<44} {:>9} {:>11} {:>9} {:>6}",
        "policy", "ppl", "ppl 2nd half", "tok/s", "peak"
    );
    for v in &variants {
        let budget = v.budget.unwrap_or(tokens.len());
        let pa = args.sweep.policy_args(v, budget, chunk);
        let mut engine = pa.engine(&args.model, &model, tokens.len(), args.sweep.seed, true)?;
        let out = streaming_nll(&mut engine, &tokens)?;
        let (ppl, ppl2) = perplexities(&out.nll);
        let tok_s = tokens.len() as f64 / out.seconds.max(1e-9);
        let label = v.label(&multi);
        println!(
            "{label:<44} {ppl:>9.3} {ppl2:>11.3} {tok_s:>9.1} {:>6}",
            out.peak_cells
        );
        let windows = windowed_mean(&out.nll, args.plot_window);
        let mut rec = v.fields();
        if let Some(obj) = rec.as_object_mut() {
            obj.insert("ppl".into(), json!(ppl));
            obj.insert("ppl_second_half".into(), json!(ppl2));
            obj.insert("tok_s".into(), json!(tok_s));
            obj.insert("peak_cells".into(), json!(out.peak_cells));
            obj.insert("tokens".into(), json!(tokens.len()));
            obj.insert("chunk".into(), json!(chunk));
            obj.insert("evicted".into(), json!(engine.stats().evicted));
            obj.insert(
                "head_slices_moved".into(),
                json!(engine.stats().head_slices_moved),
            );
            obj.insert("model".into(), json!(model_name(&args.model)));
            obj.insert("text".into(), json!(args.text.display().to_string()));
            obj.insert("plot_window".into(), json!(args.plot_window));
            obj.insert(
                "nll_windows".into(),
                json!(windows.iter().map(|w| w.1).collect::<Vec<_>>()),
            );
            if v.policy == "none" && args.check_full {
                let full = full_context_nll(&model, &tokens, 1024, args.model.threads())?;
                let (fp, fp2) = perplexities(&full);
                let rel = (ppl - fp).abs() / fp;
                println!(
                    "  full-context reference: ppl {fp:.3} / {fp2:.3} (relative difference {:.3}%)",
                    rel * 100.0
                );
                obj.insert("full_context_ppl".into(), json!(fp));
                obj.insert("full_context_ppl_second_half".into(), json!(fp2));
            }
        }
        records.push(rec);
        series.push(Series {
            label,
            points: windows,
        });
    }
    if let Some(path) = &args.json {
        write_json(path, &Value::Array(records))?;
    }
    if let Some(path) = &args.plot {
        let title = format!(
            "Streaming NLL, {} tokens of {} in chunks of {chunk} ({})",
            tokens.len(),
            args.text
                .file_name()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default(),
            model_name(&args.model)
        );
        let svg = line_chart(
            &title,
            "position (tokens)",
            &format!("mean NLL per {}-token window (nats)", args.plot_window),
            &series,
        );
        write_svg(path, &svg)?;
    }
    Ok(())
}

fn run_passkey(mut args: PasskeyArgs) -> Result<()> {
    check_lists(&args.sweep)?;
    args.sweep.apply_tuned(&args.model.model)?;
    let chunk = args.sweep.chunk.unwrap_or(32);
    if args.lengths.is_empty() || args.depths.is_empty() || args.trials == 0 {
        return Err(Error::invalid(
            "give at least one length, one depth and one trial",
        ));
    }
    if args.ratio.iter().any(|&r| !(r.is_finite() && r >= 1.0)) {
        return Err(Error::invalid("--ratio values must be at least 1"));
    }
    for &len in &args.lengths {
        check_cells("--lengths", len)?;
    }
    for &b in &args.budget {
        check_cells("--budget", b)?;
    }
    if args.depths.iter().any(|d| !(0.0..=1.0).contains(d)) {
        return Err(Error::invalid("--depths values must be between 0 and 1"));
    }
    check_eval_outputs(
        &args.json,
        &args.plot,
        &args.model,
        &args.filler,
        &args.sweep,
    )?;
    let model = args.model.load()?;
    let filler = read_text(&args.filler)?;
    // Settings: budgets, or ratios (resolved per length), or the full cache only.
    let settings: Vec<(Option<usize>, Option<f64>)> = if !args.ratio.is_empty() {
        args.ratio.iter().map(|&r| (None, Some(r))).collect()
    } else if !args.budget.is_empty() {
        args.budget.iter().map(|&b| (Some(b), None)).collect()
    } else {
        vec![(Some(0), None)]
    };
    // The same documents for every policy: one seeded stream per (length, depth, trial).
    let mut docs = Vec::new();
    for &len in &args.lengths {
        for &depth in &args.depths {
            for t in 0..args.trials {
                let mut rng = args.sweep.seed
                    ^ (len as u64).wrapping_mul(0x9E37_79B9)
                    ^ ((depth * 1000.0) as u64).wrapping_mul(0x85EB_CA6B)
                    ^ (t as u64).wrapping_mul(0xC2B2_AE35);
                docs.push((
                    len,
                    depth,
                    build_document(&model, &filler, len, depth, args.format, &mut rng)?,
                ));
            }
        }
    }
    let multi = args.sweep.multi();
    let mut records = Vec::new();
    let mut panels: Vec<Heatmap> = Vec::new();
    println!(
        "{:<40} {:>7} {:>6} {:>6} {:>8} {:>10}",
        "policy", "budget", "length", "depth", "accuracy", "answer NLL"
    );
    for &(budget, ratio) in &settings {
        let placeholder: Vec<Option<usize>> = vec![budget];
        for v in args.sweep.variants(&placeholder) {
            if v.policy == "none" && settings.len() > 1 && (budget, ratio) != settings[0] {
                continue;
            }
            let mut label = v.label(&multi);
            if let (Some(r), true) = (ratio, v.policy != "none") {
                label = label.replace(" b0", "") + &format!(" {r}x");
            }
            let mut grid = vec![vec![f64::NAN; args.depths.len()]; args.lengths.len()];
            for (li, &len) in args.lengths.iter().enumerate() {
                let b = match (ratio, budget) {
                    (Some(r), _) => (len as f64 / r).floor() as usize,
                    (None, Some(b)) => b,
                    _ => len,
                };
                let pa = args.sweep.policy_args(&v, b, chunk);
                let answer_max = 16;
                let mut engine =
                    match pa.engine(&args.model, &model, len + answer_max, args.sweep.seed, true) {
                        Ok(e) => e,
                        Err(e) => {
                            eprintln!("qfilters: skipping {label} at length {len}: {e}");
                            continue;
                        }
                    };
                for (di, &depth) in args.depths.iter().enumerate() {
                    let mut hits = 0usize;
                    let mut nll_sum = 0.0;
                    let mut greedy = Vec::new();
                    let mut peak = 0;
                    let mine = docs
                        .iter()
                        .filter(|(l, d, _)| *l == len && *d == depth)
                        .map(|(_, _, doc)| doc);
                    let mut n = 0usize;
                    for doc in mine {
                        let out = run_trial(&mut engine, doc)?;
                        hits += out.exact as usize;
                        nll_sum += out.answer_nll;
                        peak = peak.max(out.peak_cells);
                        greedy.push(json!({"key": doc.key, "greedy": out.greedy, "answer_nll": out.answer_nll}));
                        n += 1;
                    }
                    let acc = hits as f64 / n.max(1) as f64;
                    let nll = nll_sum / n.max(1) as f64;
                    grid[li][di] = acc;
                    let shown_budget = if v.policy == "none" { len } else { b };
                    println!(
                        "{label:<40} {shown_budget:>7} {len:>6} {depth:>6.2} {:>7.0}% {nll:>10.3}",
                        acc * 100.0
                    );
                    let mut rec = v.fields();
                    if let Some(obj) = rec.as_object_mut() {
                        obj.insert(
                            "budget".into(),
                            json!(if v.policy == "none" { None } else { Some(b) }),
                        );
                        obj.insert(
                            "ratio".into(),
                            json!(if v.policy == "none" { None } else { ratio }),
                        );
                        obj.insert("length".into(), json!(len));
                        obj.insert("depth".into(), json!(depth));
                        obj.insert("accuracy".into(), json!(acc));
                        obj.insert("answer_nll".into(), json!(nll));
                        obj.insert("trials".into(), json!(n));
                        obj.insert("chunk".into(), json!(chunk));
                        obj.insert("peak_cells".into(), json!(peak));
                        obj.insert("model".into(), json!(model_name(&args.model)));
                        obj.insert("answers".into(), Value::Array(greedy));
                    }
                    records.push(rec);
                }
            }
            panels.push(Heatmap {
                title: label,
                rows: args.lengths.iter().map(|l| l.to_string()).collect(),
                cols: args.depths.iter().map(|d| format!("{d}")).collect(),
                values: grid,
            });
        }
    }
    if let Some(path) = &args.json {
        write_json(path, &Value::Array(records))?;
    }
    if let Some(path) = &args.plot {
        let svg = heatmaps(
            &format!(
                "Passkey retrieval ({}, {} trial(s) per cell, chunks of {chunk})",
                model_name(&args.model),
                args.trials
            ),
            "document length (tokens)",
            "key depth",
            &panels,
        );
        write_svg(path, &svg)?;
    }
    Ok(())
}
