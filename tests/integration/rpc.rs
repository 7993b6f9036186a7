//! A model split across hosts with ggml's RPC backend, on one machine over loopback: two
//! `qfilters rpc-server` processes take layers, eviction runs as it does locally, and a host
//! that is missing or dies is one error line and exit 1.

use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::*;

/// A `qfilters rpc-server` on a free loopback port, killed when dropped.
struct Server {
    child: Child,
    endpoint: String,
}

impl Server {
    fn start() -> Server {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = qfilters()
            .args(["rpc-server", "--port", &port.to_string(), "-t", "1"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn rpc-server");
        let endpoint = format!("127.0.0.1:{port}");
        let t0 = Instant::now();
        while TcpStream::connect(&endpoint).is_err() {
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "rpc-server on {endpoint} never listened"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Server { child, endpoint }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The stats of `run` on a prompt past 2K tokens, greedy, Q-Filters at budget 256, with
/// `extra` flags.
fn run_stats(prompt: &std::path::Path, filters: &std::path::Path, extra: &[&str]) -> Value {
    let dir = tempfile::tempdir().unwrap();
    let stats = dir.path().join("stats.json");
    let mut cmd = qfilters();
    cmd.args(["run", "-m"])
        .arg(model_path())
        .arg("-f")
        .arg(prompt)
        .args([
            "-n",
            "16",
            "--policy",
            "qfilters",
            "--budget",
            "256",
            "--filters",
        ])
        .arg(filters)
        .arg("--json-stats")
        .arg(&stats)
        .args(extra);
    run_ok(&mut cmd);
    serde_json::from_str(&std::fs::read_to_string(&stats).unwrap()).unwrap()
}

#[test]
#[cfg_attr(not(feature = "rpc"), ignore = "needs a build with --features rpc")]
fn a_model_split_across_two_hosts_gives_the_local_tokens_and_evictions() {
    let dir = tempfile::tempdir().unwrap();
    let prompt = dir.path().join("prompt.txt");
    std::fs::write(&prompt, data_text("tinyshakespeare.txt", 9000)).unwrap();
    let filters = random_filters(dir.path(), 5, 30, 3, 64);
    let local = run_stats(&prompt, &filters, &[]);
    assert!(local["prompt_tokens"].as_u64().unwrap() > 2048, "{local}");
    assert!(local["evicted"].as_u64().unwrap() > 0, "{local}");
    let (a, b) = (Server::start(), Server::start());
    let hosts = format!("{},{}", a.endpoint, b.endpoint);
    // 20 of SmolLM2's 30 layers on the two hosts, the rest on the local CPU.
    let split = run_stats(&prompt, &filters, &["--rpc", &hosts, "-ngl", "20"]);
    for key in [
        "text",
        "evicted",
        "head_slices_moved",
        "prompt_tokens",
        "live_cells",
    ] {
        assert_eq!(
            split[key], local[key],
            "{key}: split {split} against local {local}"
        );
    }
}

#[test]
#[cfg_attr(not(feature = "rpc"), ignore = "needs a build with --features rpc")]
fn a_host_that_is_not_there_is_one_line_naming_it() {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let host = format!("127.0.0.1:{port}");
    let out = run_prompt(&model_path(), "Hello", 4)
        .args(["--rpc", &host, "-ngl", "10"])
        .output()
        .unwrap();
    assert_one_line_error(&out, &host);
}

#[test]
#[cfg_attr(not(feature = "rpc"), ignore = "needs a build with --features rpc")]
fn a_host_that_dies_mid_run_ends_it_with_one_line_and_exit_1() {
    let dir = tempfile::tempdir().unwrap();
    let prompt = dir.path().join("prompt.txt");
    std::fs::write(&prompt, data_text("tinyshakespeare.txt", 40000)).unwrap();
    let stats = dir.path().join("stats.json");
    let mut server = Server::start();
    let run = Command::new(bin())
        .args(["run", "-m"])
        .arg(model_path())
        .arg("-f")
        .arg(&prompt)
        .args([
            "-n", "64", "--policy", "knorm", "--budget", "256", "-t", "1",
        ])
        .args(["--rpc", &server.endpoint, "-ngl", "30", "--json-stats"])
        .arg(&stats)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn run");
    // Mid-prefill (10K tokens take far longer than this on one thread).
    std::thread::sleep(Duration::from_secs(3));
    let killed = Instant::now();
    server.child.kill().unwrap();
    let _ = server.child.wait();
    let out = run.wait_with_output().unwrap();
    let waited = killed.elapsed();
    assert!(
        waited < Duration::from_secs(30),
        "the run ended {waited:?} after the host died"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "exit 1, not a signal: {stderr}");
    let last = stderr
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("");
    assert!(
        last.starts_with("qfilters: ") && last.contains("RPC"),
        "{stderr}"
    );
    assert!(
        !stats.exists(),
        "no stats file from a run that did not finish"
    );
}
