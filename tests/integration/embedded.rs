//! Filters carried inside the GGUF: llama.cpp still loads the model unchanged, and `run` finds
//! the filters without `--filters`.

use crate::common::*;
use serde_json::Value;

#[test]
fn embedded_model_loads_generates_the_same_and_provides_its_filters() {
    check_embedded(&model_path(), [30, 3, 64], 800);
}

/// A second architecture (qwen2: QKV bias, 24 layers, 2 KV heads), short prompt.
#[test]
fn embedded_filters_work_on_qwen2() {
    check_embedded(&qwen_path(), [24, 2, 64], 300);
}

fn check_embedded(model: &std::path::Path, shape: [usize; 3], chars: usize) {
    let dir = tempfile::tempdir().unwrap();
    let filters = random_filters(dir.path(), 11, shape[0], shape[1], shape[2]);
    let embedded = dir.path().join("with-filters.gguf");
    gguf_tools::edit::embed(model, &filters, &embedded, false, false).expect("embed");
    let model_path = || model.to_path_buf();

    let prompt = data_text("tinyshakespeare.txt", chars);
    let mut texts = Vec::new();
    for model in [model_path(), embedded.clone()] {
        let stats = dir.path().join("stats.json");
        run_ok(run_prompt(&model, &prompt, 16).args([
            "--policy",
            "none",
            "--json-stats",
            stats.to_str().unwrap(),
        ]));
        let s: Value = serde_json::from_str(&std::fs::read_to_string(&stats).unwrap()).unwrap();
        texts.push(s["text"].as_str().unwrap().to_string());
    }
    assert!(!texts[0].is_empty());
    assert_eq!(
        texts[0], texts[1],
        "the extra metadata changes nothing for llama.cpp"
    );

    // No --filters: the policy finds the filters in the GGUF and says so, and scores with
    // them: per-head eviction moves the same slices and generates the same text as the same
    // filters given as a file, and not as other filters do.
    let evict = ["--policy", "qfilters", "--budget", "40", "--batch", "32"];
    let outcome = |model: &std::path::Path, filters: Option<&std::path::Path>| {
        let stats = dir.path().join("evict.json");
        let mut cmd = run_prompt(model, &prompt, 4);
        cmd.args(evict).arg("--json-stats").arg(&stats);
        if let Some(f) = filters {
            cmd.arg("--filters").arg(f);
        }
        let out = run_ok(&mut cmd);
        let s: Value = serde_json::from_str(&std::fs::read_to_string(&stats).unwrap()).unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        (
            s["head_slices_moved"].as_u64().unwrap(),
            s["text"].clone(),
            stderr,
        )
    };
    let (moved, text, stderr) = outcome(&embedded, None);
    assert!(
        stderr.contains("embedded in"),
        "announces embedded filters: {stderr}"
    );
    assert!(moved > 0, "the prompt is past the budget: slices move");
    let (file_moved, file_text, _) = outcome(&model_path(), Some(&filters));
    assert_eq!(
        (moved, &text),
        (file_moved, &file_text),
        "the embedded filters score as the same filters given with --filters"
    );
    let other_dir = tempfile::tempdir().unwrap();
    let other = random_filters(other_dir.path(), 12, shape[0], shape[1], shape[2]);
    let (other_moved, _, _) = outcome(&model_path(), Some(&other));
    assert_ne!(
        moved, other_moved,
        "other filters evict other slices (else this comparison shows nothing)"
    );

    // The original model has none: the same command is a clear error.
    let out = run_prompt(&model_path(), &prompt, 4)
        .args(["--policy", "qfilters", "--budget", "40", "--batch", "32"])
        .output()
        .unwrap();
    assert_one_line_error(&out, "needs Q-Filters");
}

/// A plain GGUF without `--filters`: `run` and `serve` use the policy that needs none, and say
/// so, as `chat` does (a new user's first command must work).
#[test]
fn run_and_serve_without_filters_fall_back_to_the_policy_that_needs_none() {
    use std::io::BufRead;
    let fallback = qfilters::policy::WITHOUT_FILTERS.name;
    let out =
        run_ok(run_prompt(&model_path(), "The capital of France is", 4).args(["--budget", "40"]));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("policy {fallback} (")) && stderr.contains("embeds no Q-Filters"),
        "announces the fallback: {stderr}"
    );
    assert!(
        stderr.contains(&format!("qfilters: policy {fallback} |")),
        "runs it: {stderr}"
    );

    let mut child = qfilters()
        .args(["serve", "-m"])
        .arg(model_path())
        .args(["--port", "0"])
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("spawn serve");
    let mut lines = Vec::new();
    for line in std::io::BufReader::new(child.stderr.take().expect("stderr")).lines() {
        let line = line.expect("stderr line");
        let ready = line.contains("serving");
        lines.push(line);
        if ready {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let log = lines.join("\n");
    assert!(
        log.contains(&format!("policy {fallback} (")),
        "announces the fallback: {log}"
    );
    assert!(
        log.contains(&format!("| policy {fallback} |")),
        "serves with it: {log}"
    );
}
