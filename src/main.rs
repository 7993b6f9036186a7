//! The `qfilters` command line: a thin layer over the library.

mod cli;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "qfilters",
    version,
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
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => cli::run::run(args),
    };
    if let Err(e) = result {
        eprintln!("qfilters: {e}");
        std::process::exit(1);
    }
}
