//! `qfilters filters check`: how well filters predict the attention keys receive.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use gguf_tools::filters::QFilters;

use qfilters::calibrate::check::{check_filters, compare_filters, FRACTIONS, SELECTORS};
use qfilters::{Error, Result};

use super::{read_text, ModelArgs};

#[derive(Args, Debug)]
pub struct FiltersArgs {
    #[command(subcommand)]
    pub command: FiltersCommand,
}

#[derive(Subcommand, Debug)]
pub enum FiltersCommand {
    /// Compare filter scores and −‖k‖ with the attention keys actually receive.
    Check(CheckArgs),
    /// Cosine of each (layer, KV head) filter of one file with the same filter of another,
    /// e.g. a short calibration against a long one.
    Compare(CompareArgs),
}

#[derive(Args, Debug)]
pub struct CompareArgs {
    /// Filters file (published layout, or its folder), e.g. the reference.
    pub a: PathBuf,
    /// Filters file of the same model to compare with it.
    pub b: PathBuf,
    /// Count the pairs whose cosine is below this.
    #[arg(long, default_value_t = 0.99)]
    pub threshold: f64,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct CheckArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Q-Filters file (published layout, or its folder). Default: the filters embedded in the
    /// model's GGUF.
    #[arg(long)]
    pub filters: Option<PathBuf>,
    /// Text to run (UTF-8).
    #[arg(long)]
    pub text: PathBuf,
    /// Tokens of the text to use (one decode; attention is quadratic in this).
    #[arg(long, default_value_t = 1024)]
    pub tokens: usize,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: FiltersArgs) -> Result<()> {
    match args.command {
        FiltersCommand::Check(a) => check(a),
        FiltersCommand::Compare(a) => compare(a),
    }
}

fn compare(args: CompareArgs) -> Result<()> {
    let a = QFilters::load(&args.a)?;
    let b = QFilters::load(&args.b)?;
    let g = compare_filters(&a, &b)?;
    let [layers, heads, _] = a.shape();
    let (wl, wh) = g.worst();
    let below = g.below(args.threshold);
    if args.json {
        let v = serde_json::json!({
            "a": args.a.display().to_string(),
            "b": args.b.display().to_string(),
            "cosines": g.cosines,
            "min": g.min(),
            "mean": g.mean(),
            "worst": {"layer": wl, "kv_head": wh},
            "threshold": args.threshold,
            "below": below,
        });
        println!(
            "{}",
            serde_json::to_string_pretty(&v).map_err(|e| Error::invalid(e.to_string()))?
        );
        return Ok(());
    }
    println!("a: {}\nb: {}", args.a.display(), args.b.display());
    println!("{:>5}  cosine per KV head", "layer");
    for (l, row) in g.cosines.iter().enumerate() {
        let cells: Vec<String> = row.iter().map(|c| format!("{c:.4}")).collect();
        println!("{l:>5}  {}", cells.join("  "));
    }
    println!(
        "min {:.4} (layer {wl}, KV head {wh}) | mean {:.4} | {below} of {} below {}",
        g.min(),
        g.mean(),
        layers * heads,
        args.threshold
    );
    Ok(())
}

fn check(args: CheckArgs) -> Result<()> {
    let text = read_text(&args.text)?;
    if args.tokens < 16 {
        return Err(Error::invalid("--tokens must be at least 16"));
    }
    let model = args.model.load()?;
    let (filters, source) = match &args.filters {
        Some(p) => (QFilters::load(p)?, p.display().to_string()),
        None => (
            QFilters::from_gguf(&args.model.model)?.ok_or_else(|| {
                Error::invalid(format!(
                    "{} has no embedded Q-Filters; pass --filters FILE (make one with `qfilters calibrate`)",
                    args.model.model.display()
                ))
            })?,
            format!("embedded in {}", args.model.model.display()),
        ),
    };
    if let Some(w) = super::magnitude_warning(&filters) {
        eprintln!("qfilters: {w}");
    }
    let mut tokens = model.tokenize(&text, true, false)?;
    tokens.truncate(args.tokens);
    if tokens.len() < args.tokens {
        eprintln!(
            "qfilters: the text has only {} tokens (asked for {})",
            tokens.len(),
            args.tokens
        );
    }
    let report = check_filters(&model, &filters, &tokens, args.model.threads())?;
    if args.json {
        let mut v = report.to_json();
        v["filters"] = source.into();
        println!(
            "{}",
            serde_json::to_string_pretty(&v).map_err(|e| Error::invalid(e.to_string()))?
        );
        return Ok(());
    }
    println!(
        "filters: {source}\ntext: {} tokens; attention received from the last {} queries by the {} older keys",
        report.tokens,
        report.tokens - report.query_start,
        report.query_start
    );
    println!();
    print!("{:>5}  {:>8}  {:>8}", "layer", "ρ filter", "ρ knorm");
    for f in FRACTIONS {
        print!("  {:>14}", format!("kept@{} f/k/o", frac_label(f)));
    }
    println!();
    for (l, layer) in report.layers.iter().enumerate() {
        print!(
            "{:>5}  {:>8.3}  {:>8.3}",
            l, layer.spearman_filters, layer.spearman_knorm
        );
        for m in &layer.mass_kept {
            print!("  {:>14}", format!("{:.2}/{:.2}/{:.2}", m[0], m[1], m[3]));
        }
        println!();
    }
    println!(
        "{:>5}  {:>8.3}  {:>8.3}",
        "mean",
        report.mean_spearman_filters(),
        report.mean_spearman_knorm()
    );
    println!();
    println!("attention mass of old keys kept, each KV head keeping its top fraction (mean over layers and heads):");
    print!("{:>9}", "keep");
    for s in SELECTORS {
        print!("  {s:>8}");
    }
    println!();
    for (fi, f) in FRACTIONS.iter().enumerate() {
        print!("{:>9}", frac_label(*f));
        for si in 0..SELECTORS.len() {
            print!("  {:>8.3}", report.mean_mass(fi, si));
        }
        println!();
    }
    Ok(())
}

fn frac_label(f: f64) -> String {
    format!("1/{}", (1.0 / f).round())
}
