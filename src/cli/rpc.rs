//! `qfilters rpc-server`: serves this machine's CPU to clients on other hosts (their `--rpc`),
//! on ggml's own RPC server. One binary on every host.

use clap::Args;
use qfilters::{Error, Result};

#[derive(Args, Debug)]
pub struct RpcServerArgs {
    /// Address to listen on. Loopback by default: ggml's RPC protocol has no authentication
    /// and no encryption, so never expose it on an untrusted network; tunnel it (SSH,
    /// WireGuard) instead.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on.
    #[arg(long, default_value_t = 50052)]
    pub port: u16,
    /// Threads for the served CPU (default: the physical cores idle at start).
    #[arg(short = 't', long = "threads")]
    pub threads: Option<usize>,
    /// Show ggml's own log.
    #[arg(long)]
    pub verbose: bool,
}

pub fn run(args: RpcServerArgs) -> Result<()> {
    if !qfilters::ffi::rpc::built_in() {
        return Err(Error::invalid(
            "this build has no RPC backend: build with `cargo build --release --features rpc`",
        ));
    }
    if args.threads == Some(0) {
        return Err(Error::invalid("-t 0: give at least 1 thread"));
    }
    let loopback = matches!(args.host.as_str(), "127.0.0.1" | "::1" | "localhost");
    if !loopback {
        eprintln!(
            "qfilters: rpc-server on {}: the RPC protocol has no authentication nor encryption; anyone who reaches this port can run code on this machine's backend. Use it only on a trusted network or through a tunnel.",
            args.host
        );
    }
    qfilters::ffi::set_verbose_log(args.verbose);
    let threads = args
        .threads
        .unwrap_or_else(|| qfilters::ffi::threads::default_threads().max(1) as usize);
    let endpoint = if args.host.contains(':') {
        format!("[{}]:{}", args.host, args.port)
    } else {
        format!("{}:{}", args.host, args.port)
    };
    eprintln!("qfilters: rpc-server on {endpoint}, {threads} thread(s)");
    qfilters::ffi::rpc::serve(&endpoint, threads)
}
