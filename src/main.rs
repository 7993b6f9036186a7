//! The `qfilters` command line: a thin layer over the library.

mod cli;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "qfilters",
    // The llama.cpp patch set decides how fast the hook is on a GPU: say which one is linked.
    version = concat!(
        env!("CARGO_PKG_VERSION"),
        " (llama.cpp patches: ",
        env!("QFILTERS_LLAMA_PATCHES"),
        ")"
    ),
    about = "Run GGUF models with a KV cache bounded by Q-Filters eviction"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Complete one prompt with the KV cache kept within --budget.
    Run(cli::run::RunArgs),
    /// Chat in the terminal; the conversation lives in a KV cache bounded by --budget.
    Chat(cli::chat::ChatArgs),
    /// Compute Q-Filters for a GGUF model from text (no PyTorch).
    Calibrate(cli::calibrate::CalibrateArgs),
    /// Check how well filters predict attention (`filters check`).
    Filters(cli::filters::FiltersArgs),
    /// Measure quality under compression: streaming perplexity, passkey retrieval.
    Eval(cli::eval::EvalArgs),
    /// Measure speed: prefill and decode tok/s, hook overhead.
    Bench(cli::bench::BenchArgs),
    /// Serve an OpenAI-compatible API; each conversation lives in a cache bounded by --budget.
    Serve(cli::serve::ServeArgs),
}

fn main() {
    // llama.cpp users type `-ngl 99`; clap reads a one-dash word as a cluster of short flags.
    let matches = Cli::command().get_matches_from(std::env::args_os().map(|a| {
        if a == "-ngl" {
            "--ngl".into()
        } else {
            a
        }
    }));
    // Tuned defaults carried with the filters apply only where the user gave no flag.
    cli::record_given(&matches);
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let result = match cli.command {
        Command::Run(args) => cli::run::run(args),
        Command::Chat(args) => cli::chat::run(args),
        Command::Calibrate(args) => cli::calibrate::run(args),
        Command::Filters(args) => cli::filters::run(args),
        Command::Eval(args) => cli::eval::run(args),
        Command::Bench(args) => cli::bench::run(args),
        Command::Serve(args) => cli::serve::run(args),
    };
    if let Err(e) = result {
        if e.is_broken_pipe() {
            // The reader of stdout is gone (`| head`); that is how such a run ends.
            std::process::exit(0);
        }
        eprintln!("qfilters: {e}");
        std::process::exit(1);
    }
}
