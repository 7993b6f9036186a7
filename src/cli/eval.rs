//! `qfilters eval ppl|passkey`: quality under compression, swept over policies, budgets and
//! eviction knobs in one process (timings within one run are comparable).

use std::path::PathBuf;

use clap::{Args, Subcommand};

use qfilters::args::{
    DEFAULT_COMBINER, DEFAULT_GRANULARITY, DEFAULT_RECENCY, DEFAULT_SINKS, DEFAULT_WINDOW,
};
use qfilters::cache::{Combiner, Granularity};
use qfilters::engine::KeySource;
use qfilters::eval::passkey::{build_task_document, run_trial, PromptFormat, Task};
use qfilters::eval::ppl::{full_context_nll, perplexities, streaming_nll};
use qfilters::eval::sweep::{
    mean_by_layer, passkey_rates, Budget, PasskeyAnswer, PasskeyRecord, PplRecord, Sweep,
};
use qfilters::eval::windowed_mean;
use qfilters::math::mean;
use qfilters::policy::{PolicyInfo, REGISTRY};
use qfilters::{Error, Result};

use super::plot::{heatmaps, line_chart, Heatmap, Series};
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
    /// Needle in a haystack: a sentence ("The best thing to do in CITY is to ...") hidden in
    /// prose filler, asked for at the end; found when the greedy reply contains its answer.
    Needle(NeedleArgs),
}

/// Policies and knobs to sweep; every list is comma-separated and the sweep is their product.
#[derive(Args, Debug, Clone)]
pub struct SweepArgs {
    /// Policies (default: every one).
    #[arg(long, value_parser = qfilters::policy::PolicyParser, value_delimiter = ',', default_values_t = REGISTRY.to_vec())]
    pub policy: Vec<PolicyInfo>,
    /// For combined policies A+B: the weight of B's standardised score (A's is 1).
    #[arg(long = "mix-weight", default_value_t = 1.0)]
    pub mix_weight: f64,
    /// Q-Filters file (default: the filters embedded in the model).
    #[arg(long)]
    pub filters: Option<PathBuf>,
    /// Most recent tokens never evicted.
    #[arg(long, value_delimiter = ',', default_values_t = [DEFAULT_WINDOW])]
    pub window: Vec<usize>,
    /// First tokens never evicted.
    #[arg(long, value_delimiter = ',', default_values_t = [DEFAULT_SINKS])]
    pub sinks: Vec<usize>,
    /// head or position (policies whose heads score alike always run per position).
    #[arg(long, value_delimiter = ',', default_values_t = [DEFAULT_GRANULARITY])]
    pub granularity: Vec<Granularity>,
    /// mean-z, mean-rank, max-z (position granularity only).
    #[arg(long, value_delimiter = ',', default_values_t = [DEFAULT_COMBINER])]
    pub combiner: Vec<Combiner>,
    /// Each eviction round goes this many cells below the budget, so rounds run once per
    /// slack+1 generated tokens; the cache never exceeds the budget. 0 evicts just enough.
    #[arg(long, value_delimiter = ',', default_value = "0")]
    pub slack: Vec<usize>,
    /// Recency prior (tokens of age per standard deviation of score; 0 off), for the policies
    /// that score each head.
    #[arg(long, value_delimiter = ',', default_values_t = [DEFAULT_RECENCY])]
    pub recency: Vec<f64>,
    /// Tokens per decode call while feeding the input; eviction runs after each chunk.
    #[arg(long)]
    pub chunk: Option<usize>,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
}

impl SweepArgs {
    /// Takes the tuned defaults of the filters in use where no flag was given, for every
    /// policy of the sweep (so baselines get the same tuning as Q-Filters). `budgets`: every
    /// budget in cells the sweep will evict to.
    fn apply_tuned(&mut self, model_path: &std::path::Path, budgets: &[usize]) -> Result<()> {
        if let Some((t, origin)) = super::Tuned::find(self.filters.as_deref(), model_path)? {
            let (mut r, mut w, mut g) = (None, None, None);
            let smallest = budgets.iter().copied().min();
            let sinks = self.sinks.iter().copied().max().unwrap_or(DEFAULT_SINKS);
            let budget = smallest.map(|b| (b, sinks));
            let used = t.apply(budget, |x| r = Some(x), |x| w = Some(x), |x| g = Some(x));
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

    fn sweep(&self) -> Sweep {
        Sweep {
            policies: self.policy.clone(),
            window: self.window.clone(),
            sinks: self.sinks.clone(),
            granularity: self.granularity.clone(),
            combiner: self.combiner.clone(),
            slack: self.slack.clone(),
            recency: self.recency.clone(),
        }
    }

    /// What every point shares: the filters, keys from the cache, input in chunks of `chunk`.
    fn base(&self, chunk: usize) -> EvictionArgs {
        EvictionArgs {
            filters: self.filters.clone(),
            key_source: KeySource::Cache,
            n_batch: chunk,
            mix_weight: self.mix_weight,
            ..EvictionArgs::default()
        }
    }
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

/// The passkey's flags, with the filler a prose text (e.g. wikitext2-valid.txt), and how many
/// needles each document hides.
#[derive(Args, Debug)]
pub struct NeedleArgs {
    #[command(flatten)]
    pub doc: PasskeyArgs,
    /// Needles per document, each about a different city; one is asked (more than 1: the
    /// multi-key variant, the others placed at random depths).
    #[arg(long, default_value_t = 1)]
    pub needles: usize,
}

pub fn run(args: EvalArgs) -> Result<()> {
    match args.command {
        EvalCommand::Ppl(a) => run_ppl(a),
        EvalCommand::Passkey(a) => run_passkey(a, Task::Passkey),
        EvalCommand::Needle(a) => run_passkey(a.doc, Task::Needle { needles: a.needles }),
    }
}

fn check_lists(sweep: &SweepArgs) -> Result<()> {
    if sweep.policy.is_empty() || sweep.window.is_empty() || sweep.sinks.is_empty() {
        return Err(Error::invalid("empty --policy, --window or --sinks list"));
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
    args.sweep.apply_tuned(&args.model.model, &args.budget)?;
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
    let budgets: Vec<Budget> = args.budget.iter().map(|&b| Budget::Cells(b)).collect();
    let sweep = args.sweep.sweep();
    let mut records = Vec::new();
    let mut series = Vec::new();
    println!(
        "{:<44} {:>9} {:>11} {:>9} {:>6}",
        "policy", "ppl", "ppl 2nd half", "tok/s", "peak"
    );
    for point in sweep.points(&budgets, &args.sweep.base(chunk)) {
        let eviction = point.at(tokens.len());
        let mut engine =
            eviction.engine(&args.model, &model, tokens.len(), args.sweep.seed, true)?;
        let out = streaming_nll(&mut engine, &tokens)?;
        let (ppl, ppl2) = perplexities(&out.nll);
        let tok_s = tokens.len() as f64 / out.seconds.max(1e-9);
        let label = sweep.label(&point);
        println!(
            "{label:<44} {ppl:>9.3} {ppl2:>11.3} {tok_s:>9.1} {:>6}",
            out.peak_cells
        );
        let windows = windowed_mean(&out.nll, args.plot_window);
        let full = if !eviction.policy.evicts && args.check_full {
            let full = full_context_nll(&model, &tokens, 1024, args.model.threads())?;
            let (fp, fp2) = perplexities(&full);
            let rel = (ppl - fp).abs() / fp;
            println!(
                "  full-context reference: ppl {fp:.3} / {fp2:.3} (relative difference {:.3}%)",
                rel * 100.0
            );
            Some((fp, fp2))
        } else {
            None
        };
        records.push(PplRecord {
            eviction,
            ppl,
            ppl_second_half: ppl2,
            tok_s,
            peak_cells: out.peak_cells,
            tokens: tokens.len(),
            chunk,
            evicted: engine.stats().evicted,
            head_slices_moved: engine.stats().head_slices_moved,
            model: model_name(&args.model),
            text: args.text.display().to_string(),
            plot_window: args.plot_window,
            nll_windows: windows.iter().map(|w| w.1).collect(),
            full_context_ppl: full.map(|f| f.0),
            full_context_ppl_second_half: full.map(|f| f.1),
        });
        series.push(Series {
            label,
            points: windows,
        });
    }
    if let Some(path) = &args.json {
        write_json(path, &records)?;
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

fn run_passkey(mut args: PasskeyArgs, task: Task) -> Result<()> {
    check_lists(&args.sweep)?;
    // Settings: budgets, or ratios (resolved per length), or the full cache only (budget 0:
    // the evicting policies are skipped).
    let settings: Vec<Budget> = if !args.ratio.is_empty() {
        args.ratio.iter().map(|&r| Budget::Ratio(r)).collect()
    } else if !args.budget.is_empty() {
        args.budget.iter().map(|&b| Budget::Cells(b)).collect()
    } else {
        vec![Budget::Cells(0)]
    };
    // The budgets the documents will evict to: each setting at each length.
    let budgets: Vec<usize> = settings
        .iter()
        .flat_map(|&s| args.lengths.iter().map(move |&n| s.cells(n)))
        .filter(|&b| b > 0)
        .collect();
    args.sweep.apply_tuned(&args.model.model, &budgets)?;
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
                    build_task_document(&model, &filler, len, depth, args.format, task, &mut rng)?,
                ));
            }
        }
    }
    let sweep = args.sweep.sweep();
    let base = args.sweep.base(chunk);
    let mut records = Vec::new();
    let mut panels: Vec<Heatmap> = Vec::new();
    println!(
        "{:<40} {:>7} {:>6} {:>6} {:>8} {:>10} {:>8}",
        "policy", "budget", "length", "depth", "accuracy", "answer NLL", "key kept"
    );
    for (si, &setting) in settings.iter().enumerate() {
        // Setting by setting, so the table reads budget by budget; the full cache once.
        for point in sweep.points(&[setting], &base) {
            if point.budget.is_none() && si > 0 {
                continue;
            }
            let label = sweep.label(&point);
            let mut grid = vec![vec![f64::NAN; args.depths.len()]; args.lengths.len()];
            for (li, &len) in args.lengths.iter().enumerate() {
                let eviction = point.at(len);
                let answer_max = 16;
                let mut engine = match eviction.engine(
                    &args.model,
                    &model,
                    len + answer_max,
                    args.sweep.seed,
                    true,
                ) {
                    Ok(e) => e,
                    Err(e) => {
                        eprintln!("qfilters: skipping {label} at length {len}: {e}");
                        continue;
                    }
                };
                for (di, &depth) in args.depths.iter().enumerate() {
                    let (mut hits, mut nll_sum, mut peak) = (0usize, 0.0, 0);
                    let mut answers = Vec::new();
                    let mut kept = Vec::new();
                    let mine = docs
                        .iter()
                        .filter(|(l, d, _)| *l == len && *d == depth)
                        .map(|(_, _, doc)| doc);
                    for doc in mine {
                        let out = run_trial(&mut engine, doc)?;
                        hits += out.found as usize;
                        nll_sum += out.answer_nll;
                        peak = peak.max(out.peak_cells);
                        answers.push(PasskeyAnswer {
                            key: (task == Task::Passkey).then_some(doc.key),
                            expected: doc.answer_text.clone(),
                            greedy: out.greedy,
                            answer_nll: out.answer_nll,
                            key_kept: out.key_kept.as_ref().and_then(|k| mean(k.iter().copied())),
                        });
                        kept.extend(out.key_kept);
                    }
                    let n = answers.len();
                    let (acc, nll) = passkey_rates(hits, nll_sum, n);
                    let key_kept_by_layer = mean_by_layer(&kept);
                    let key_kept = key_kept_by_layer
                        .as_ref()
                        .and_then(|k| mean(k.iter().copied()));
                    grid[li][di] = acc;
                    println!(
                        "{label:<40} {:>7} {len:>6} {depth:>6.2} {:>7.0}% {nll:>10.3} {:>8}",
                        eviction.budget,
                        acc * 100.0,
                        key_kept.map_or("-".into(), |k| format!("{:.0}%", k * 100.0))
                    );
                    records.push(PasskeyRecord {
                        task: task.name(),
                        ratio: point.budget.and_then(Budget::ratio),
                        eviction: eviction.clone(),
                        length: len,
                        depth,
                        accuracy: acc,
                        answer_nll: nll,
                        trials: n,
                        chunk,
                        peak_cells: peak,
                        model: model_name(&args.model),
                        key_kept,
                        key_kept_by_layer,
                        answers,
                    });
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
        write_json(path, &records)?;
    }
    if let Some(path) = &args.plot {
        let svg = heatmaps(
            &format!(
                "{} retrieval ({}, {} trial(s) per cell, chunks of {chunk})",
                task.name(),
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
