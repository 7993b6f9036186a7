//! Eviction on quantized KV caches from the command line: llama.cpp's `-ctk`/`-ctv`/`-fa`
//! flags, runs that evict on a q8_0 cache on each model of the suite, and the combinations
//! refused with one line before llama.cpp sees them. (The exactness of head-slice moves on a
//! q8_0 cache is tests/integration/head_moves.rs; its scores, key_paths.rs.)

use std::path::Path;

use serde_json::Value;

use crate::common::{assert_one_line_error, gemma_path, model_path, qwen_path, run_ok, run_prompt};

const PROMPT: &str = "Once upon a time, in a small village by the sea, there lived an old fisherman who every morning";

/// `run --json-stats -` with `extra` flags: the stats object.
fn stats(model: &Path, extra: &[&str]) -> Value {
    let mut cmd = run_prompt(model, PROMPT, 24);
    cmd.args([
        "--policy", "knorm", "--budget", "16", "--window", "4", "--sinks", "2",
    ])
    .args(["--json-stats", "-"])
    .args(extra);
    let out = run_ok(&mut cmd);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let start = stdout.find("\n{").map_or(0, |i| i + 1);
    serde_json::from_str(&stdout[start..]).expect("stats JSON after the completion")
}

/// Per-head eviction on a q8_0 K and V cache completes on `model`, evicts, says which cache
/// it ran on, and allocates about half the bytes of the f16 run (q8_0 stores 34 bytes per 32
/// values; f16 64).
fn q8_0_eviction_runs(model: &Path) {
    let f16 = stats(model, &[]);
    let q8 = stats(model, &["-ctk", "q8_0", "-ctv", "q8_0"]);
    assert!(q8["evicted"].as_u64().unwrap() > 0, "{q8}");
    assert_eq!(
        (&q8["cache_type_k"], &q8["cache_type_v"]),
        (&"q8_0".into(), &"q8_0".into())
    );
    assert_eq!(q8["generated_tokens"], 24);
    let (b8, b16) = (
        q8["kv_bytes"].as_f64().unwrap(),
        f16["kv_bytes"].as_f64().unwrap(),
    );
    assert_eq!(q8["n_ctx"], f16["n_ctx"], "same cells, other bytes");
    assert!(
        (b8 / b16 - 34.0 / 64.0).abs() < 1e-6,
        "q8_0 {b8} B against f16 {b16} B"
    );
}

#[test]
fn q8_0_eviction_runs_on_smollm2() {
    q8_0_eviction_runs(&model_path());
}

#[test]
fn q8_0_eviction_runs_on_qwen2() {
    q8_0_eviction_runs(&qwen_path());
}

/// Gemma 3: only its full-attention layers are evicted; its sliding-window cache is quantized
/// too, so the byte ratio holds for the whole allocation.
#[test]
fn q8_0_eviction_runs_on_gemma3() {
    q8_0_eviction_runs(&gemma_path());
}

#[test]
fn bad_cache_flags_get_one_line_before_llama_cpp() {
    let model = model_path();
    let refused = |flags: &[&str], needle: &str| {
        let mut cmd = run_prompt(&model, PROMPT, 4);
        cmd.args(flags);
        assert_one_line_error(&cmd.output().expect("spawn"), needle);
    };
    // llama.cpp itself would refuse to create the context (or abort).
    refused(
        &["-ctv", "q8_0", "-fa", "off", "--policy", "knorm"],
        "needs flash attention",
    );
    refused(
        &["-ctv", "q4_0", "--flash-attn", "off", "--policy", "none"],
        "-fa on",
    );
    // Per-head eviction moves V rows, which only flash attention stores per cell.
    refused(
        &["-fa", "off", "--policy", "knorm"],
        "--granularity position",
    );
    refused(&["-ctk", "q3_k"], "q8_0");
    refused(&["-fa", "sometimes"], "on, off, auto");
    // eval pairs K and V types in order.
    let mut eval = crate::common::qfilters();
    eval.args(["eval", "ppl", "-m"]).arg(&model).args([
        "--text",
        "Cargo.toml",
        "-ctk",
        "f16,q8_0",
        "-ctv",
        "f16,q8_0,q4_0",
    ]);
    assert_one_line_error(&eval.output().expect("spawn"), "pair up");
    // What llama.cpp accepts passes: a quantized K cache without flash attention, positions.
    let mut ok = run_prompt(&model, PROMPT, 4);
    ok.args([
        "-ctk", "q4_0", "-fa", "off", "--policy", "knorm", "--budget", "16",
    ])
    .args(["--window", "4", "--granularity", "position"]);
    run_ok(&mut ok);
}
