//! A model split across hosts with ggml's RPC backend, on one machine over loopback: two
//! `qfilters rpc-server` processes take layers, eviction runs as it does locally, and a host
//! that is missing or dies is one error line and exit 1 (for `serve`: 503 and /health).

use std::io::{BufRead, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
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
        Server::on(port)
    }

    fn on(port: u16) -> Server {
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
/// A `run` long enough to lose a host in the middle of: `prompt`, 64 tokens, K-norm at budget
/// 256, one thread; the caller adds the hosts.
fn long_run(prompt: &std::path::Path) -> Command {
    let mut c = Command::new(bin());
    c.args(["run", "-m"])
        .arg(model_path())
        .arg("-f")
        .arg(prompt)
        .args([
            "-n", "64", "--policy", "knorm", "--budget", "256", "-t", "1",
        ]);
    c
}

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
    let run = long_run(&prompt)
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

/// A host that stops answering without closing the connection (power loss, a cut link:
/// SIGSTOP here, so the kernel keeps the connection open) ends the run after --rpc-timeout
/// with one line and exit 1, instead of a wait of about 15 minutes for TCP to give up.
#[test]
#[cfg_attr(
    any(not(feature = "rpc"), not(unix), not(qf_rpc_timeout)),
    ignore = "needs a build with --features rpc of the patched llama.cpp (not LLAMA_CPP_DIR), and Unix (SIGSTOP; the timeout is not set on Windows)"
)]
fn a_host_that_stops_answering_ends_the_run_after_the_rpc_timeout() {
    // The timeout is a patch to ggml-rpc (vendor/patches): the binary must say it carries it.
    let out = run_ok(qfilters().arg("--version"));
    let version = String::from_utf8_lossy(&out.stdout);
    assert!(version.contains("rpc-socket-timeout@"), "{version}");
    let dir = tempfile::tempdir().unwrap();
    let prompt = dir.path().join("prompt.txt");
    std::fs::write(&prompt, data_text("tinyshakespeare.txt", 40000)).unwrap();
    let (a, b) = (Server::start(), Server::start());
    let hosts = format!("{},{}", a.endpoint, b.endpoint);
    let timeout = 5;
    let mut run = long_run(&prompt)
        .args(["--rpc", &hosts, "-ngl", "30"])
        .args(["--rpc-timeout", &timeout.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn run");
    // Read stderr on a thread, so a full pipe cannot stall the run.
    let mut stderr = run.stderr.take().expect("stderr");
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    // Mid-prefill (10K tokens over two hosts take far longer than this on one thread each).
    std::thread::sleep(Duration::from_secs(3));
    let signal = |sig: &str, child: &Child| {
        Command::new("kill")
            .args([sig, &child.id().to_string()])
            .status()
            .is_ok_and(|s| s.success())
    };
    assert!(signal("-STOP", &b.child), "SIGSTOP the host");
    let stopped = Instant::now();
    // Poll, so that a run that hangs fails the test instead of hanging it.
    let limit = Duration::from_secs(60);
    let status = loop {
        if let Some(status) = run.try_wait().unwrap() {
            break Some(status);
        }
        if stopped.elapsed() > limit {
            let _ = run.kill();
            let _ = run.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let waited = stopped.elapsed();
    // Let the host go before anything can fail: `Server`'s drop then kills it as usual.
    assert!(signal("-CONT", &b.child), "SIGCONT the host");
    let stderr = reader.join().unwrap();
    let Some(status) = status else {
        panic!("the run still waited {limit:?} after its host stopped: {stderr}");
    };
    eprintln!("the run ended {waited:?} after its host stopped (--rpc-timeout {timeout})");
    assert_eq!(status.code(), Some(1), "exit 1, not a signal: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one error line: {stderr}");
    assert!(
        lines[0].starts_with("qfilters: ") && lines[0].contains("--rpc-timeout"),
        "{stderr}"
    );
    drop((a, b));
}

/// One HTTP/1.1 exchange with `Connection: close`: the status and the JSON body.
fn http(addr: &str, method: &str, path: &str, body: &str) -> (u16, Value) {
    let mut s = TcpStream::connect(addr).expect("connect to serve");
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("a whole reply");
    let (head, body) = raw.split_once("\r\n\r\n").expect("head and body");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("a status");
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

#[test]
#[cfg_attr(
    any(not(feature = "rpc"), not(target_os = "linux")),
    ignore = "needs a build with --features rpc, and Linux (the hosts are watched through procfs)"
)]
fn serve_answers_503_naming_a_lost_host_and_health_says_so() {
    let (a, mut b) = (Server::start(), Server::start());
    let hosts = format!("{},{}", a.endpoint, b.endpoint);
    let mut child = Command::new(bin())
        .args(["serve", "-m"])
        .arg(model_path())
        .args([
            "--port", "0", "-t", "1", "--policy", "knorm", "--budget", "64",
        ])
        .args(["--rpc", &hosts, "-ngl", "20"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn serve");
    // Its log, read to the end on a thread (a full pipe would block the server).
    let log = Arc::new(Mutex::new(Vec::<String>::new()));
    let (ready_tx, ready_rx) = mpsc::channel::<String>();
    let stderr = child.stderr.take().expect("stderr");
    let lines = Arc::clone(&log);
    let reader = std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if let Some(at) = line.split("http://").nth(1) {
                let _ = ready_tx.send(at.split_whitespace().next().unwrap_or("").to_string());
            }
            lines.lock().unwrap().push(line);
        }
    });
    let addr = ready_rx
        .recv_timeout(Duration::from_secs(120))
        .unwrap_or_else(|_| panic!("serve never listened: {:?}", log.lock().unwrap()));
    let complete = r#"{"prompt": "Once upon a time", "max_tokens": 4}"#;

    let (status, health) = http(&addr, "GET", "/health", "");
    assert_eq!(
        (status, &health["status"]),
        (200, &Value::from("ok")),
        "{health}"
    );
    let (status, reply) = http(&addr, "POST", "/v1/completions", complete);
    assert_eq!(status, 200, "{reply}");

    // One host dies between requests: the server stays up and says which host.
    let port: u16 = b.endpoint.rsplit_once(':').unwrap().1.parse().unwrap();
    b.child.kill().unwrap();
    let _ = b.child.wait();
    // The kernel sees the connection closed at once; the server looks at most once a second.
    std::thread::sleep(Duration::from_millis(1500));
    let down = |what: &str| {
        let (status, health) = http(&addr, "GET", "/health", "");
        assert_eq!(status, 503, "{what}: {health}");
        assert_eq!(
            health["rpc_hosts_down"],
            serde_json::json!([b.endpoint]),
            "{what}: {health}"
        );
        let (status, reply) = http(&addr, "POST", "/v1/completions", complete);
        assert_eq!(status, 503, "{what}: {reply}");
        assert_eq!(reply["error"]["code"], "rpc_host_down", "{what}: {reply}");
        let message = reply["error"]["message"].as_str().unwrap_or("");
        assert!(
            message.contains(&b.endpoint) && !message.contains(&a.endpoint),
            "{message}"
        );
    };
    down("after the kill");
    // Back on the same port, the host holds none of the model's layers (they died with its
    // process): still down for this server, which says to restart both; nothing is retried.
    let b = Server::on(port);
    std::thread::sleep(Duration::from_millis(1500));
    down("after the restart");

    // SIGTERM: a clean exit that frees nothing on the lost host (ggml-rpc would abort there).
    let pid = child.id().to_string();
    assert!(Command::new("kill").arg(&pid).status().unwrap().success());
    let status = child.wait().unwrap();
    reader.join().unwrap();
    let log = log.lock().unwrap().join("\n");
    assert!(status.success(), "{status}: {log}");
    assert!(
        log.contains(&format!("RPC host {} was lost", b.endpoint)),
        "{log}"
    );
    assert!(!log.contains("llama.cpp stopped"), "{log}");
}
