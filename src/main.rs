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
    // Boxed: its sweep lists make it several times the size of the other commands.
    Eval(Box<cli::eval::EvalArgs>),
    /// Measure speed: prefill and decode tok/s, hook overhead.
    Bench(cli::bench::BenchArgs),
    /// Serve an OpenAI-compatible API; each conversation lives in a cache bounded by --budget.
    Serve(cli::serve::ServeArgs),
    /// Serve this machine's CPU to other hosts' `--rpc` (ggml's RPC server; loopback by default).
    RpcServer(cli::rpc::RpcServerArgs),
}

fn main() {
    let mut command = Cli::command();
    // Which CPU variant ggml loads is known only at run time; finding it out loads the CPU
    // backend, so only `--version` pays for it.
    if std::env::args_os().any(|a| a == "--version" || a == "-V") {
        let version = format!(
            "{} (llama.cpp patches: {}; cpu: {}; rpc: {})",
            env!("CARGO_PKG_VERSION"),
            env!("QFILTERS_LLAMA_PATCHES"),
            qfilters::ffi::cpu_backend(),
            if qfilters::ffi::rpc::built_in() {
                "built in"
            } else {
                "not built (--features rpc)"
            }
        );
        // clap keeps a version for the life of the program; this runs once, then exits.
        command = command.version(&*Box::leak(version.into_boxed_str()));
    }
    let matches = command
        .try_get_matches_from(std::env::args_os().map(llama_spelling))
        .unwrap_or_else(|e| usage_error(e));
    // Tuned defaults carried with the filters apply only where the user gave no flag.
    let given = cli::Given::from_matches(&matches);
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    // ggml-rpc reads its socket timeout from the environment when it connects to a host. Set
    // here, before any command runs, while this process still has a single thread: setting
    // the environment while another thread may call C's getenv is a data race.
    if let Some(secs) = rpc_timeout(&matches) {
        qfilters::ffi::rpc::set_timeout(secs);
    }
    let result = match cli.command {
        Command::Run(args) => cli::run::run(args, &given),
        Command::Chat(args) => cli::chat::run(args, &given),
        Command::Calibrate(args) => cli::calibrate::run(args),
        Command::Filters(args) => cli::filters::run(args),
        Command::Eval(args) => cli::eval::run(*args, &given),
        Command::Bench(args) => cli::bench::run(args),
        Command::Serve(args) => cli::serve::run(args, &given),
        Command::RpcServer(args) => cli::rpc::run(args),
    };
    if let Err(e) = result.map_err(cli::name_flags) {
        if e.is_broken_pipe() {
            // The reader of stdout is gone (`| head`); that is how such a run ends.
            std::process::exit(0);
        }
        eprintln!("qfilters: {e}");
        std::process::exit(1);
    }
}

/// `--rpc-timeout` (with its default) of the command run, if that command loads a model.
fn rpc_timeout(matches: &clap::ArgMatches) -> Option<u64> {
    let mut m = matches;
    while let Some((_, sub)) = m.subcommand() {
        m = sub;
    }
    m.try_get_one::<u64>("rpc_timeout").ok().flatten().copied()
}

/// llama.cpp's one-dash long flags (`-ngl 99`, `-ctk q8_0`, `-fa on`), which clap would read
/// as clusters of short flags, spelled the way clap reads them.
fn llama_spelling(arg: std::ffi::OsString) -> std::ffi::OsString {
    const LONG: &[(&str, &str)] = &[
        ("-ngl", "--ngl"),
        ("-ctk", "--cache-type-k"),
        ("-ctv", "--cache-type-v"),
        ("-fa", "--flash-attn"),
    ];
    match LONG.iter().find(|(one, _)| arg == *one) {
        Some((_, two)) => (*two).into(),
        None => arg,
    }
}

/// clap's own exit for help, version and usage mistakes, except a value outside a flag's list
/// (`--policy lru`): that gets the one `qfilters: ` line and exit 1 every other bad input gets.
fn usage_error(e: clap::Error) -> ! {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    if e.kind() == ErrorKind::InvalidValue {
        let text = |k| match e.get(k) {
            Some(ContextValue::String(s)) => Some(s.clone()),
            Some(ContextValue::Strings(v)) => Some(v.join(", ")),
            _ => None,
        };
        if let (Some(arg), Some(value), Some(valid)) = (
            text(ContextKind::InvalidArg),
            text(ContextKind::InvalidValue),
            text(ContextKind::ValidValue),
        ) {
            // `--policy <POLICY>` → "policy"; `--flash-attn [<MODE>]` → "mode".
            let what = arg
                .split_once(' ')
                .map_or(arg.as_str(), |(_, n)| n)
                .trim_matches(|c| matches!(c, '<' | '>' | '[' | ']'))
                .to_lowercase();
            eprintln!("qfilters: unknown {what} '{value}' for {arg}: choose one of {valid}");
            std::process::exit(1);
        }
    }
    if e.kind() == ErrorKind::ValueValidation {
        // A flag's own parser said why (`--granularity x`): that reason, on one line.
        if let Some(why) = std::error::Error::source(&e) {
            let arg = match e.get(ContextKind::InvalidArg) {
                Some(ContextValue::String(a)) => format!("{a}: "),
                _ => String::new(),
            };
            eprintln!("qfilters: {arg}{why}");
            std::process::exit(1);
        }
    }
    e.exit()
}
