//! `gguf-tools`: inspect GGUF files and carry Q-Filters inside them.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use gguf_tools::synth::{self, SynthOptions, WeightType};
use gguf_tools::{edit, inspect};

#[derive(Parser)]
#[command(
    name = "gguf-tools",
    version,
    about = "Inspect GGUF files and carry Q-Filters inside them"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show architecture, hyper-parameters, metadata, tensor totals and embedded Q-Filters.
    Inspect {
        file: PathBuf,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Copy MODEL to OUT with the Q-Filters from FILTERS added as qfilters.* metadata.
    Embed {
        model: PathBuf,
        /// A Q-Filters .safetensors file or the folder holding it.
        filters: PathBuf,
        #[arg(short, long)]
        output: PathBuf,
        /// Replace qfilters.* keys the model already has.
        #[arg(long)]
        force: bool,
    },
    /// Write the embedded Q-Filters as safetensors (+ config.json beside it).
    Extract {
        model: PathBuf,
        #[arg(short, long)]
        output: PathBuf,
    },
    /// Copy MODEL to OUT without its qfilters.* keys.
    Strip {
        model: PathBuf,
        #[arg(short, long)]
        output: PathBuf,
    },
    /// Write a random-weight llama-architecture model.
    Synth {
        /// tiny, 135m, 1b or 8b.
        #[arg(long)]
        shape: String,
        /// Matrix type: f16, q8_0, q4_0 or q4_k (quantized types get random valid blocks).
        #[arg(long = "type", default_value = "f16")]
        weight_type: String,
        /// Writer threads (default: one per core).
        #[arg(long)]
        threads: Option<usize>,
        /// Vocabulary size (default: 256 for tiny, 32000 otherwise).
        #[arg(long)]
        vocab: Option<u64>,
        /// Override the number of layers.
        #[arg(long)]
        layers: Option<u64>,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(short, long)]
        output: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help and --version are not errors.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => return fail(&clap_message(&e)),
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => fail(&message),
    }
}

/// Clap's error with its usage and tip lines dropped, so every error is one line.
fn clap_message(e: &clap::Error) -> String {
    let text = e.to_string();
    let first = text
        .lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("invalid arguments");
    format!(
        "{}; run `gguf-tools --help` for usage",
        first.trim_start_matches("error: ").trim()
    )
}

fn fail(message: &str) -> ExitCode {
    // Messages embed paths and file contents; keep them on one line.
    let line = message.replace(['\n', '\r'], " ");
    let _ = writeln!(std::io::stderr(), "gguf-tools: {line}");
    ExitCode::FAILURE
}

fn say(text: &str) -> Result<(), String> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        // A closed pipe (`| head`) means the reader has seen enough.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(format!("cannot write to stdout: {e}")),
    }
}

fn run(cli: Cli) -> Result<(), String> {
    let err = |e: &dyn std::fmt::Display| e.to_string();
    match cli.command {
        Command::Inspect { file, json } => {
            let report = inspect::inspect(&file).map_err(|e| err(&e))?;
            if json {
                let text = serde_json::to_string_pretty(&report).map_err(|e| err(&e))?;
                say(&(text + "\n"))
            } else {
                say(&report.to_text())
            }
        }
        Command::Embed {
            model,
            filters,
            output,
            force,
        } => {
            let (f, stats) =
                edit::embed(&model, &filters, &output, force, true).map_err(|e| err(&e))?;
            say(&format!(
                "embedded Q-Filters {:?} (source {:?}) into {}: {}\n",
                f.shape(),
                f.source,
                output.display(),
                stats.summary()
            ))
        }
        Command::Extract { model, output } => {
            let f = edit::extract(&model, &output).map_err(|e| err(&e))?;
            say(&format!(
                "extracted Q-Filters {:?} to {}\n",
                f.shape(),
                output.display()
            ))
        }
        Command::Strip { model, output } => {
            let stats = edit::strip(&model, &output, true).map_err(|e| err(&e))?;
            say(&format!(
                "stripped Q-Filters into {}: {}\n",
                output.display(),
                stats.summary()
            ))
        }
        Command::Synth {
            shape,
            weight_type,
            vocab,
            layers,
            seed,
            threads,
            output,
        } => {
            let mut s = synth::shape_by_name(&shape).map_err(|e| err(&e))?;
            if let Some(v) = vocab {
                s.vocab = v;
            }
            if let Some(l) = layers {
                s.layers = l;
            }
            let opts = SynthOptions {
                shape: s,
                weight_type: WeightType::parse(&weight_type).map_err(|e| err(&e))?,
                seed,
            };
            let stats = match threads {
                Some(t) => synth::write_with_threads(&opts, &output, true, t),
                None => synth::write(&opts, &output, true),
            }
            .map_err(|e| err(&e))?;
            say(&format!(
                "wrote {} ({} layers, {} wide, {}/{} heads, ffn {}, vocab {}): {}\n",
                output.display(),
                s.layers,
                s.embd,
                s.heads,
                s.kv_heads,
                s.ff,
                s.vocab,
                stats.summary()
            ))
        }
    }
}
