//! `qfilters eval ppl|passkey`: quality under compression, swept over policies, budgets and
//! eviction knobs in one process (timings within one run are comparable).

use std::path::PathBuf;

use clap::{Args, Subcommand};

use qfilters::args::{JobLength, SweepArgs, DEFAULT_SINKS};
use qfilters::eval::frontier::pareto_front;
use qfilters::eval::passkey::{build_task_document, run_trial, PromptFormat, Task};
use qfilters::eval::ppl::{full_context_nll, perplexities, streaming_nll};
use qfilters::eval::sweep::{
    mean_key_survival, passkey_rates, Budget, KvRecord, PasskeyAnswer, PasskeyRecord, PplRecord,
};
use qfilters::eval::windowed_mean;
use qfilters::math::mean;
use qfilters::policy::PolicyInfo;
use qfilters::{Error, Result};

use super::plot::{frontier_chart, heatmaps, line_chart, Heatmap, Series};
use super::{
    check_cells, check_outputs, read_text, write_json, EvictionCli, FoundFilters, Given, ModelArgs,
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

/// Takes the tuned defaults of the filters in use where no flag was given, for every policy of
/// the sweep (so baselines get the same tuning as Q-Filters). `budgets`: every budget in cells
/// the sweep will evict to.
/// The default sweep (every registered policy) runs those whose inputs are at hand: the others
/// are taken out of `args` and their names returned, for [`say_left_out`] to report once the
/// arguments are known to be valid (an invalid one is then still a one-line error). A
/// `--policy` the user typed is kept, and fails saying what it needs.
fn leave_out_missing(
    args: &mut SweepArgs,
    found: Option<&FoundFilters>,
    given: &Given,
) -> Vec<&'static str> {
    if given.has("policy") {
        return Vec::new();
    }
    let available = qfilters::policy::Available::of(found.map(|f| f.filters.as_ref()));
    let (run, skipped): (Vec<PolicyInfo>, Vec<PolicyInfo>) = args
        .sweep
        .policies
        .iter()
        .partition(|p| p.inputs_available(&available));
    args.sweep.policies = run;
    skipped.iter().map(|p| p.name).collect()
}

fn say_left_out(names: &[&str]) {
    if !names.is_empty() {
        eprintln!(
            "qfilters: leaving out {} (their inputs are missing: Q-Filters, or the query statistics this version's `qfilters calibrate` stores with them)",
            names.join(", ")
        );
    }
}

fn apply_tuned(
    args: &mut SweepArgs,
    found: Option<&FoundFilters>,
    budgets: &[usize],
    given: &Given,
) -> Result<()> {
    if let Some((t, origin)) = super::find_tuned(found)? {
        // eval's default is every registered policy: the tuned one is among them, or joins
        // them when it is a combination.
        if let Some(p) = t.policy_default(|id| given.has(id)) {
            let how = if args.sweep.policies.contains(&p) {
                ", swept with every registered policy"
            } else {
                args.sweep.policies.push(p);
                ", added to the sweep of every registered policy"
            };
            super::announce_policy(p, &origin, how);
        }
        let (mut r, mut w, mut g) = (None, None, None);
        let smallest = budgets.iter().copied().min();
        let sweep = &mut args.sweep;
        let sinks = sweep.sinks.iter().copied().max().unwrap_or(DEFAULT_SINKS);
        let budget = smallest.map(|b| (b, sinks));
        let used = t.apply(
            |id| given.has(id),
            budget,
            |x| r = Some(x),
            |x| w = Some(x),
            |x| g = Some(x),
        );
        if let Some(r) = r {
            sweep.recency = vec![r];
        }
        if let Some(w) = w {
            sweep.window = vec![w];
        }
        if let Some(g) = g {
            sweep.granularity = vec![g];
        }
        super::announce(&used, &origin);
    }
    Ok(())
}

#[derive(Args, Debug)]
#[command(
    mut_arg("budget", |a| a.default_values(["256", "512"])),
    mut_arg("n_batch", |a| a.default_value("16")),
)]
pub struct PplArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Text to score (UTF-8).
    #[arg(long)]
    pub text: PathBuf,
    /// Tokens of the text to use (from its start).
    #[arg(long, default_value_t = 4096)]
    pub tokens: usize,
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
    /// SVG chart of perplexity against the KV MiB llama.cpp allocated, every point of the
    /// sweep, with the Pareto front (no other point has fewer bytes and a lower perplexity).
    #[arg(long)]
    pub frontier: Option<PathBuf>,
}

#[derive(Args, Debug)]
#[command(
    mut_arg("budget", |a| a.default_value(None::<&str>).conflicts_with("ratio")),
    mut_arg("n_batch", |a| a.default_value("32")),
)]
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
    /// SVG chart of passkey accuracy (over depths) against the KV MiB llama.cpp allocated,
    /// per point of the sweep and document length, with the Pareto front.
    #[arg(long)]
    pub frontier: Option<PathBuf>,
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

pub fn run(args: EvalArgs, given: &Given) -> Result<()> {
    match args.command {
        EvalCommand::Ppl(a) => run_ppl(a, given),
        EvalCommand::Passkey(a) => run_passkey(a, Task::Passkey, given),
        EvalCommand::Needle(a) => run_passkey(a.doc, Task::Needle { needles: a.needles }, given),
    }
}

/// Refuses empty lists and what no point of the sweep could run, before the model loads.
fn check_lists(args: &SweepArgs) -> Result<()> {
    let s = &args.sweep;
    if s.policies.is_empty() || s.window.is_empty() || s.sinks.is_empty() {
        return Err(Error::invalid("empty --policy, --window or --sinks list"));
    }
    args.base.check()?;
    for &b in &args.budgets {
        check_cells("--budget", b)?;
    }
    for (_, type_v) in s.cache_pairs()? {
        for &granularity in &s.granularity {
            let per_head = granularity == qfilters::engine::cache::Granularity::Head
                && s.policies.iter().any(|p| p.evicts && p.scores_vary_by_head);
            let llama = qfilters::args::LlamaArgs {
                cache_type_v: type_v,
                ..args.llama.clone()
            };
            llama.check(per_head)?;
        }
    }
    Ok(())
}

fn write_svg(path: &std::path::Path, svg: &str) -> Result<()> {
    gguf_tools::safe_io::write_file(path, svg.as_bytes())?;
    Ok(())
}

/// Checks --json and --plot before the sweep: writable, not an input, not each other.
fn check_eval_outputs(
    outputs: &[&Option<PathBuf>],
    model: &ModelArgs,
    text: &std::path::Path,
    sweep: &SweepArgs,
) -> Result<()> {
    let outputs: Vec<&std::path::Path> = outputs.iter().filter_map(|o| o.as_deref()).collect();
    let filters: Vec<PathBuf> = sweep
        .base
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

fn run_ppl(mut args: PplArgs, given: &Given) -> Result<()> {
    check_lists(&args.sweep)?;
    check_cells("--tokens", args.tokens)?;
    check_eval_outputs(
        &[&args.json, &args.plot, &args.frontier],
        &args.model,
        &args.text,
        &args.sweep,
    )?;
    let budget_cells = args.sweep.budgets.clone();
    let found = FoundFilters::load(args.sweep.base.filters.as_deref(), &args.model.model)?;
    let left_out = leave_out_missing(&mut args.sweep, found.as_ref(), given);
    apply_tuned(&mut args.sweep, found.as_ref(), &budget_cells, given)?;
    let chunk = args.sweep.base.n_batch;
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
    let budgets: Vec<Budget> = budget_cells.iter().map(|&b| Budget::Cells(b)).collect();
    let sweep = &args.sweep.sweep;
    let mut records = Vec::new();
    let mut series = Vec::new();
    say_left_out(&left_out);
    println!(
        "{:<44} {:>9} {:>11} {:>9} {:>6} {:>8}",
        "policy", "ppl", "ppl 2nd half", "tok/s", "peak", "KV MiB"
    );
    for point in sweep.points(&budgets, &args.sweep.base) {
        let eviction = point.at(tokens.len());
        let llama = point.llama(&args.sweep.llama);
        let mut engine = eviction.engine(
            &args.model,
            &llama,
            &model,
            JobLength::Known(tokens.len()),
            found.as_ref(),
            true,
        )?;
        let out = streaming_nll(&mut engine, &tokens)?;
        let (ppl, ppl2) = perplexities(&out.nll);
        let tok_s = tokens.len() as f64 / out.seconds.max(1e-9);
        let label = sweep.label(&point);
        let kv = KvRecord::new(point.cache, engine.stats().kv_bytes);
        println!(
            "{label:<44} {ppl:>9.3} {ppl2:>11.3} {tok_s:>9.1} {:>6} {:>8.2}",
            out.peak_cells,
            kv.mib()
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
            kv,
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
            pareto: false,
        });
        series.push(Series {
            label,
            points: windows,
        });
    }
    let xy: Vec<(f64, f64)> = records.iter().map(|r| (r.kv.mib(), r.ppl)).collect();
    for (r, on) in records.iter_mut().zip(pareto_front(&xy, false)) {
        r.pareto = on;
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
    if let Some(path) = &args.frontier {
        let points: Vec<FrontPoint> = records
            .iter()
            .zip(&series)
            .map(|(r, s)| FrontPoint {
                label: s.label.clone(),
                mib: r.kv.mib(),
                quality: r.ppl,
                on_front: r.pareto,
            })
            .collect();
        let title = format!(
            "Perplexity against KV memory, {} tokens of {} ({})",
            tokens.len(),
            args.text
                .file_name()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default(),
            model_name(&args.model)
        );
        let svg = frontier_svg(&title, "perplexity (lower is better)", &points);
        write_svg(path, &svg)?;
    }
    Ok(())
}

/// A point of a frontier chart: a sweep point's label, its KV MiB, its quality, and whether
/// it is on the Pareto front.
struct FrontPoint {
    label: String,
    mib: f64,
    quality: f64,
    on_front: bool,
}

/// The frontier chart: one series per setting without its budget (so a policy's budgets form
/// a line), the Pareto front drawn over them.
fn frontier_svg(title: &str, y_label: &str, points: &[FrontPoint]) -> String {
    let mut series: Vec<Series> = Vec::new();
    for p in points {
        // "knorm q8_0 b256" and "knorm q8_0 b512" are one line.
        let setting: Vec<&str> = p
            .label
            .split(' ')
            .filter(|w| !(w.starts_with('b') && w[1..].parse::<usize>().is_ok()))
            .collect();
        let setting = setting.join(" ");
        match series.iter_mut().find(|s| s.label == setting) {
            Some(s) => s.points.push((p.mib, p.quality)),
            None => series.push(Series {
                label: setting,
                points: vec![(p.mib, p.quality)],
            }),
        }
    }
    for s in &mut series {
        s.points.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    let mut front: Vec<(f64, f64)> = points
        .iter()
        .filter(|p| p.on_front)
        .map(|p| (p.mib, p.quality))
        .collect();
    front.sort_by(|a, b| a.0.total_cmp(&b.0));
    frontier_chart(title, "KV cache allocated (MiB)", y_label, &series, &front)
}

fn run_passkey(mut args: PasskeyArgs, task: Task, given: &Given) -> Result<()> {
    check_lists(&args.sweep)?;
    // Settings: budgets, or ratios (resolved per length), or the full cache only (budget 0:
    // the evicting policies are skipped).
    let settings: Vec<Budget> = if !args.ratio.is_empty() {
        args.ratio.iter().map(|&r| Budget::Ratio(r)).collect()
    } else if !args.sweep.budgets.is_empty() {
        args.sweep
            .budgets
            .iter()
            .map(|&b| Budget::Cells(b))
            .collect()
    } else {
        vec![Budget::Cells(0)]
    };
    // The budgets the documents will evict to: each setting at each length.
    let budgets: Vec<usize> = settings
        .iter()
        .flat_map(|&s| args.lengths.iter().map(move |&n| s.cells(n)))
        .filter(|&b| b > 0)
        .collect();
    let found = FoundFilters::load(args.sweep.base.filters.as_deref(), &args.model.model)?;
    let left_out = leave_out_missing(&mut args.sweep, found.as_ref(), given);
    apply_tuned(&mut args.sweep, found.as_ref(), &budgets, given)?;
    let chunk = args.sweep.base.n_batch;
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
    if args.depths.iter().any(|d| !(0.0..=1.0).contains(d)) {
        return Err(Error::invalid("--depths values must be between 0 and 1"));
    }
    check_eval_outputs(
        &[&args.json, &args.plot, &args.frontier],
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
                let mut rng = args.sweep.llama.seed
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
    let sweep = &args.sweep.sweep;
    let base = &args.sweep.base;
    let mut records = Vec::new();
    let mut panels: Vec<Heatmap> = Vec::new();
    // Accuracy over the depths against KV MiB, per point and length (with the indices of its
    // rows), for the Pareto front.
    let mut front_points: Vec<(FrontPoint, std::ops::Range<usize>)> = Vec::new();
    say_left_out(&left_out);
    println!(
        "{:<40} {:>7} {:>6} {:>6} {:>8} {:>10} {:>8} {:>8}",
        "policy", "budget", "length", "depth", "accuracy", "answer NLL", "key kept", "KV MiB"
    );
    for (si, &setting) in settings.iter().enumerate() {
        // Setting by setting, so the table reads budget by budget; the full cache once.
        for point in sweep.points(&[setting], base) {
            if point.budget.is_none() && si > 0 {
                continue;
            }
            let label = sweep.label(&point);
            let first_row = records.len();
            let mut grid = vec![vec![f64::NAN; args.depths.len()]; args.lengths.len()];
            for (li, &len) in args.lengths.iter().enumerate() {
                let eviction = point.at(len);
                let answer_max = 16;
                let llama = point.llama(&args.sweep.llama);
                let mut engine = match eviction.engine(
                    &args.model,
                    &llama,
                    &model,
                    JobLength::Known(len + answer_max),
                    found.as_ref(),
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
                            key_kept: out
                                .key_kept
                                .as_ref()
                                .and_then(|k| mean(k.iter().flatten().copied())),
                        });
                        kept.extend(out.key_kept);
                    }
                    let n = answers.len();
                    let (acc, nll) = passkey_rates(hits, nll_sum, n);
                    let (key_kept_by_head, key_kept_by_layer) = match mean_key_survival(&kept) {
                        Some((h, l)) => (Some(h), Some(l)),
                        None => (None, None),
                    };
                    let key_kept = key_kept_by_layer
                        .as_ref()
                        .and_then(|k| mean(k.iter().copied()));
                    grid[li][di] = acc;
                    let kv = KvRecord::new(point.cache, engine.stats().kv_bytes);
                    println!(
                        "{label:<40} {:>7} {len:>6} {depth:>6.2} {:>7.0}% {nll:>10.3} {:>8} {:>8.2}",
                        eviction.budget,
                        acc * 100.0,
                        key_kept.map_or("-".into(), |k| format!("{:.0}%", k * 100.0)),
                        kv.mib()
                    );
                    records.push(PasskeyRecord {
                        task: task.name(),
                        ratio: point.budget.and_then(Budget::ratio),
                        eviction: eviction.clone(),
                        kv,
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
                        key_kept_by_head,
                        answers,
                        pareto: false,
                    });
                }
            }
            for (li, &len) in args.lengths.iter().enumerate() {
                // This point's rows at this length: the last ones pushed with it.
                let rows: Vec<usize> = (first_row..records.len())
                    .filter(|&i| records[i].length == len)
                    .collect();
                let acc = mean(grid[li].iter().copied().filter(|a| a.is_finite()));
                if let (Some(acc), Some(&i), Some(&j)) = (acc, rows.first(), rows.last()) {
                    let at = if args.lengths.len() > 1 {
                        format!(" L{len}")
                    } else {
                        String::new()
                    };
                    let point = FrontPoint {
                        label: format!("{label}{at}"),
                        mib: records[i].kv.mib(),
                        quality: acc,
                        on_front: false,
                    };
                    front_points.push((point, i..j + 1));
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
    let xy: Vec<(f64, f64)> = front_points
        .iter()
        .map(|(p, _)| (p.mib, p.quality))
        .collect();
    for ((p, rows), on) in front_points.iter_mut().zip(pareto_front(&xy, true)) {
        p.on_front = on;
        for r in &mut records[rows.clone()] {
            r.pareto = on;
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
    if let Some(path) = &args.frontier {
        let title = format!(
            "Passkey accuracy against KV memory ({}, {} trial(s) per depth)",
            model_name(&args.model),
            args.trials
        );
        let points: Vec<FrontPoint> = front_points.into_iter().map(|(p, _)| p).collect();
        let svg = frontier_svg(&title, "passkey accuracy (higher is better)", &points);
        write_svg(path, &svg)?;
    }
    Ok(())
}
