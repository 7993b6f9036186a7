//! The binary: successful runs, and one-line errors with exit code 1.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_gguf-tools"))
        .args(args)
        .output()
        .unwrap()
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Asserts the exit code is 1 and stderr is exactly one `gguf-tools: ` line containing `needle`.
fn fails_with(out: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {err}");
    assert_eq!(err.lines().count(), 1, "not one line: {err:?}");
    assert!(err.starts_with("gguf-tools: "), "{err}");
    assert!(err.contains(needle), "{needle:?} not in {err:?}");
    assert!(!err.contains("panicked"), "{err}");
}

fn setup(dir: &Path) -> (PathBuf, PathBuf) {
    let model = dir.join("tiny.gguf");
    let out = run(&["synth", "--shape", "tiny", "--seed", "5", "-o", p(&model)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let filters = dir.join("filters");
    let f = gguf_tools::filters::QFilters::new(2, 2, 16, vec![0.125; 64]).unwrap();
    f.save(&filters).unwrap();
    (model, filters)
}

#[test]
fn full_workflow() {
    let dir = tempfile::tempdir().unwrap();
    let (model, filters) = setup(dir.path());
    let emb = dir.path().join("emb.gguf");
    let out = run(&["embed", p(&model), p(&filters), "-o", p(&emb)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("MB/s"));

    let out = run(&["inspect", p(&emb)]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("architecture:  llama"), "{text}");
    assert!(
        text.contains("qfilters:      version 1, shape [2, 2, 16]"),
        "{text}"
    );

    let out = run(&["inspect", "--json", p(&emb)]);
    assert!(out.status.success());
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["architecture"], "llama");
    assert_eq!(json["hyperparameters"]["head_dim"], 16);
    assert_eq!(json["qfilters"]["shape"], serde_json::json!([2, 2, 16]));
    assert_eq!(json["qfilters"]["source"], "calibrated");
    assert_eq!(json["tensor_count"], 21);

    let out = run(&["inspect", "--json", p(&model)]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(json["qfilters"].is_null());

    let ext = dir.path().join("x.safetensors");
    assert!(run(&["extract", p(&emb), "-o", p(&ext)]).status.success());
    let stripped = dir.path().join("s.gguf");
    assert!(run(&["strip", p(&emb), "-o", p(&stripped)])
        .status
        .success());
    assert_eq!(
        std::fs::read(&stripped).unwrap(),
        std::fs::read(&model).unwrap()
    );
}

#[test]
fn every_error_is_one_line_and_exit_1() {
    let dir = tempfile::tempdir().unwrap();
    let (model, filters) = setup(dir.path());
    let d = dir.path();
    let emb = d.join("emb.gguf");
    assert!(run(&["embed", p(&model), p(&filters), "-o", p(&emb)])
        .status
        .success());
    let junk = d.join("junk.gguf");
    std::fs::write(&junk, b"not a gguf file at all").unwrap();
    let wrong = d.join("wrong");
    gguf_tools::filters::QFilters::new(30, 3, 64, vec![0.5; 30 * 3 * 64])
        .unwrap()
        .save(&wrong)
        .unwrap();
    let out_path = d.join("o.gguf");
    let o = p(&out_path);

    fails_with(
        &run(&["inspect", p(&d.join("missing.gguf"))]),
        "cannot open",
    );
    fails_with(&run(&["inspect", p(&junk)]), "not a GGUF file");
    fails_with(
        &run(&["embed", p(&model), p(&wrong), "-o", o]),
        "[30, 3, 64]",
    );
    fails_with(
        &run(&["embed", p(&model), p(&filters), "-o", p(&model)]),
        "is the input",
    );
    fails_with(&run(&["embed", p(&emb), p(&filters), "-o", o]), "--force");
    fails_with(
        &run(&["embed", p(&model), p(&d.join("nope")), "-o", o]),
        "cannot read",
    );
    fails_with(
        &run(&["embed", p(&junk), p(&filters), "-o", o]),
        "not a GGUF file",
    );
    fails_with(
        &run(&["extract", p(&model), "-o", p(&d.join("f.safetensors"))]),
        "no qfilters",
    );
    fails_with(&run(&["strip", p(&model), "-o", o]), "no qfilters");
    fails_with(
        &run(&["synth", "--shape", "huge", "-o", o]),
        "unknown shape",
    );
    fails_with(
        &run(&["synth", "--shape", "tiny", "--type", "q2_k", "-o", o]),
        "unsupported weight type",
    );
    // Q4_K blocks hold 256 values; the tiny shape is 64 wide.
    fails_with(
        &run(&["synth", "--shape", "tiny", "--type", "q4_k", "-o", o]),
        "multiples of 256",
    );
    fails_with(
        &run(&["synth", "--shape", "tiny", "--layers", "0", "-o", o]),
        "at least 1",
    );
    // llama.cpp asserts on more than 512 layers: synth must not write such a model.
    fails_with(
        &run(&["synth", "--shape", "tiny", "--layers", "513", "-o", o]),
        "at most 512",
    );
    fails_with(&run(&["bogus"]), "unrecognized subcommand");
    fails_with(&run(&["embed", p(&model)]), "required");
    fails_with(&run(&[]), "gguf-tools");
    assert!(!out_path.exists());
    let temps = std::fs::read_dir(d)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .ends_with(".tmp")
        })
        .count();
    assert_eq!(temps, 0, "no temporary file is left");
}

#[test]
fn help_is_not_an_error() {
    let out = run(&["--help"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("embed"));
}
