//! What a careless or hostile user gives the CLI (issue 14): outputs naming inputs, special
//! files as inputs, numbers out of range, a closed stdout. Each reproduction is a test; every
//! refusal must come before the model is loaded or anything generated, as one line.

use std::fs;
use std::io::Read;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Mutex, OnceLock};

use crate::common::{assert_one_line_error, model_path, qfilters, run_ok};
use gguf_tools::filters::QFilters;

fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

fn out_of(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null()).output().expect("spawn qfilters")
}

/// A private copy of the model, so a regression can only damage the copy.
fn model_copy() -> &'static Path {
    static COPY: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    let (_, path) = COPY.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("model.gguf");
        fs::copy(model_path(), &path).expect("copy model");
        (dir, path)
    });
    path
}

/// The copy is shared by the tests of this file; those that check it is unchanged hold this.
fn copy_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn same_bytes(a: &Path, b: &Path) -> bool {
    fs::read(a).expect("read a") == fs::read(b).expect("read b")
}

#[test]
fn stats_and_logs_written_over_the_model_are_refused_and_the_model_is_unchanged() {
    let _g = copy_lock();
    let model = model_copy();
    let dir = tempfile::tempdir().unwrap();
    let hard = dir.path().join("hard.json");
    fs::hard_link(model, &hard).unwrap();
    let soft = dir.path().join("soft.json");
    std::os::unix::fs::symlink(model, &soft).unwrap();
    for target in [model, hard.as_path(), soft.as_path()] {
        let out = out_of(qfilters().args([
            "run",
            "-m",
            p(model),
            "--policy",
            "knorm",
            "-p",
            "Hi",
            "-n",
            "2",
            "--json-stats",
            p(target),
        ]));
        assert_one_line_error(&out, "is the input");
        assert!(out.stdout.is_empty(), "refused before generating");
        let out = out_of(qfilters().args(["chat", "-m", p(model), "--json-log", p(target)]));
        assert_one_line_error(&out, "is the input");
    }
    let out = out_of(qfilters().args([
        "eval",
        "ppl",
        "-m",
        p(model),
        "--text",
        p(&crate::common::data_file("tinyshakespeare.txt")),
        "--json",
        p(&soft),
    ]));
    assert_one_line_error(&out, "is the input");
    assert!(same_bytes(model, &model_path()), "the model is unchanged");
}

#[test]
fn save_in_piped_chat_refuses_the_model_and_the_log() {
    let _g = copy_lock();
    let model = model_copy();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log.jsonl");
    let md = dir.path().join("t.md");
    let script = format!("/save {}\n/save {}\n/save {}\n", p(model), p(&log), p(&md));
    let mut child = qfilters()
        .args(["chat", "-m", p(model), "--policy", "knorm"])
        .args(["--json-log", p(&log)])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(stderr.matches("is the input").count(), 2, "{stderr}");
    assert!(md.is_file(), "a fresh path is written: {stderr}");
    assert!(same_bytes(model, &model_path()), "the model is unchanged");
}

#[test]
fn calibrate_refuses_outputs_that_collide_or_name_inputs_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    // A private copy of the text: a regression may only damage that. Its name makes it a
    // valid -o too.
    let text = dir.path().join("t.safetensors");
    fs::write(&text, crate::common::data_text("tinyshakespeare.txt", 2000)).unwrap();
    let before = fs::read(&text).unwrap();
    let st = dir.path().join("x.safetensors");
    let calibrate = |output: &Path, embed: Option<&Path>| {
        let mut cmd = qfilters();
        cmd.args(["calibrate", "-m", p(&model_path()), "--text", p(&text)])
            .args(["-o", p(output)]);
        if let Some(e) = embed {
            cmd.args(["--embed", p(e)]);
        }
        out_of(&mut cmd)
    };
    assert_one_line_error(&calibrate(&st, Some(&st)), "same file");
    assert_one_line_error(
        &calibrate(&st, Some(&dir.path().join("config.json"))),
        "same file",
    );
    assert_one_line_error(
        &calibrate(&dir.path().join("y.safetensors"), Some(&text)),
        "is the input",
    );
    assert_one_line_error(&calibrate(&text, None), "is the input");
    assert_eq!(
        fs::read_dir(dir.path()).unwrap().count(),
        1,
        "nothing written"
    );
    assert_eq!(fs::read(&text).unwrap(), before);
}

#[test]
fn an_output_into_a_missing_folder_fails_before_generating() {
    let missing = std::env::temp_dir().join("qfilters-no-such-folder-14/x.json");
    let out = out_of(qfilters().args([
        "run",
        "-m",
        p(&model_path()),
        "--policy",
        "knorm",
        "-p",
        "Hello",
        "--json-stats",
        p(&missing),
    ]));
    assert_one_line_error(&out, "does not exist");
    assert!(out.stdout.is_empty(), "nothing generated");
}

fn mkfifo(path: &Path) {
    assert!(Command::new("mkfifo").arg(path).status().unwrap().success());
}

#[test]
fn special_files_as_inputs_are_refused_without_blocking() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo");
    mkfifo(&fifo);
    let model = model_path();
    let run = |args: &[&str]| {
        out_of(
            qfilters()
                .args(["run", "--policy", "qfilters", "-n", "1"])
                .args(args),
        )
    };
    assert_one_line_error(&run(&["-m", p(&fifo), "-p", "Hi"]), "FIFO");
    assert_one_line_error(
        &run(&["-m", p(&model), "--filters", p(&fifo), "-p", "Hi"]),
        "FIFO",
    );
    assert_one_line_error(&run(&["-m", p(&model), "-f", p(&fifo)]), "FIFO");
    assert_one_line_error(&run(&["-m", p(&model), "-f", "/dev/zero"]), "device");
    assert_one_line_error(
        &run(&["-m", p(&model), "--filters", "/dev/zero", "-p", "Hi"]),
        "device",
    );
    assert_one_line_error(&run(&["-m", p(dir.path()), "-p", "Hi"]), "is a directory");
    assert!(fs::symlink_metadata(&fifo).unwrap().file_type().is_fifo());
    // As an output a FIFO is refused too, and stays a FIFO.
    let out = out_of(qfilters().args([
        "run",
        "-m",
        p(&model),
        "--policy",
        "knorm",
        "-p",
        "Hi",
        "--json-stats",
        p(&fifo),
    ]));
    assert_one_line_error(&out, "FIFO");
    assert!(fs::symlink_metadata(&fifo).unwrap().file_type().is_fifo());
}

#[test]
fn numbers_out_of_range_are_one_line_errors() {
    let model = model_path();
    let base = ["run", "-m", p(&model), "--policy", "knorm", "-p", "Hi"];
    let cases: &[(&[&str], &str)] = &[
        (&["-t", "0"], "0 threads"),
        (&["--threads=-1"], "-1 threads"),
        (&["--budget", "18446744073709551615"], "too large"),
        (&["--batch", "0"], "--batch"),
        (&["--temp", "NaN"], "--temp"),
        (&["--temp=-1"], "--temp"),
        (&["--top-p", "2"], "--top-p"),
        (&["--top-p", "0"], "--top-p"),
        (&["--top-k=-1"], "--top-k"),
        (&["--recency", "inf"], "--recency"),
        (&["-n", "100000000000"], "too large"),
    ];
    for (extra, needle) in cases {
        let out = out_of(qfilters().args(base).args(*extra));
        assert_one_line_error(&out, needle);
    }
    let out = out_of(qfilters().args(base).env("QFILTERS_THREADS", "abc"));
    assert_one_line_error(&out, "QFILTERS_THREADS");
    let out = out_of(qfilters().args([
        "eval",
        "passkey",
        "-m",
        p(&model),
        "--filler",
        p(&crate::common::data_file("tinyshakespeare.txt")),
        "--lengths",
        "100000000",
    ]));
    assert_one_line_error(&out, "too large");
}

#[test]
fn a_large_budget_on_a_short_job_allocates_only_what_the_job_holds() {
    let dir = tempfile::tempdir().unwrap();
    let stats = dir.path().join("s.json");
    for policy in ["knorm", "none"] {
        run_ok(qfilters().args([
            "run",
            "-m",
            p(&model_path()),
            "--policy",
            policy,
            "--budget",
            "100000",
            "-p",
            "Hello there",
            "-n",
            "4",
            "--json-stats",
            p(&stats),
        ]));
        let v: serde_json::Value = serde_json::from_slice(&fs::read(&stats).unwrap()).unwrap();
        let n_ctx = v["n_ctx"].as_u64().unwrap();
        // prompt + 4 + margin, rounded up by llama.cpp to its 256-cell padding.
        assert!(n_ctx <= 512, "{policy}: n_ctx {n_ctx} for a 10-token job");
    }
}

#[test]
fn calibrate_windows_are_capped_by_the_tokens_at_hand() {
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("t.txt");
    fs::write(&text, crate::common::data_text("tinyshakespeare.txt", 600)).unwrap();
    let out = dir.path().join("f.safetensors");
    run_ok(qfilters().args([
        "calibrate",
        "-m",
        p(&model_path()),
        "--text",
        p(&text),
        "--tokens",
        "256",
        "--seq-len",
        "50000",
        "--samples",
        "32",
        "-o",
        p(&out),
    ]));
    let f = QFilters::load(&out).unwrap();
    let seq_len: usize = f.metadata["seq_len"].parse().unwrap();
    assert!(seq_len <= 256, "window of {seq_len} tokens on ≤ 256 tokens");
}

#[test]
fn filters_that_score_nothing_are_warned_about_and_unused_filters_not_loaded() {
    let dir = tempfile::tempdir().unwrap();
    let zeros = dir.path().join("zeros.safetensors");
    QFilters::new(30, 3, 64, vec![0.0; 30 * 3 * 64])
        .unwrap()
        .save(&zeros)
        .unwrap();
    let run = |policy: &str| {
        run_ok(qfilters().args([
            "run",
            "-m",
            p(&model_path()),
            "--policy",
            policy,
            "--filters",
            p(&zeros),
            "-p",
            "Hi",
            "-n",
            "1",
        ]))
    };
    let stderr = String::from_utf8_lossy(&run("qfilters").stderr).into_owned();
    assert!(stderr.contains("90 of 90 filter vectors"), "{stderr}");
    let stderr = String::from_utf8_lossy(&run("streaming").stderr).into_owned();
    assert!(stderr.contains("--filters ignored"), "{stderr}");
    assert!(!stderr.contains("using filters"), "{stderr}");
}

#[test]
#[cfg_attr(
    feature = "cuda",
    ignore = "a CUDA build has GPU layers to offload: no note"
)]
fn gpu_layers_on_a_cpu_build_get_a_note() {
    let out = run_ok(qfilters().args([
        "run",
        "-m",
        p(&model_path()),
        "--policy",
        "knorm",
        "-g",
        "99",
        "-p",
        "Hi",
        "-n",
        "1",
    ]));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--gpu-layers 99 ignored"), "{stderr}");
}

/// Reads 5 bytes of the child's stdout, closes it, and waits.
fn read_five_then_close(mut cmd: Command, input: &[u8]) -> Output {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(input).unwrap();
    drop(stdin);
    let mut stdout = child.stdout.take().unwrap();
    let mut five = [0u8; 5];
    stdout.read_exact(&mut five).unwrap();
    drop(stdout);
    child.wait_with_output().unwrap()
}

#[test]
fn a_closed_stdout_ends_run_and_chat_cleanly() {
    let mut cmd = qfilters();
    cmd.args([
        "run",
        "-m",
        p(&model_path()),
        "--policy",
        "knorm",
        "-p",
        "Tell me a long story",
        "-n",
        "200",
    ]);
    let out = read_five_then_close(cmd, b"");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        !stderr.contains("generated 200"),
        "stopped at the closed pipe: {stderr}"
    );

    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log.jsonl");
    let mut cmd = qfilters();
    cmd.args([
        "chat",
        "-m",
        p(&model_path()),
        "--policy",
        "knorm",
        "-n",
        "32",
    ])
    .args(["--json-log", p(&log)]);
    let out = read_five_then_close(cmd, b"Hello!\nTell me more.\nAnd more.\nThanks.\n");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let turns = fs::read_to_string(&log).unwrap_or_default().lines().count();
    assert!(turns < 4, "{turns} turns ran after stdout closed");
}

#[test]
fn the_chat_log_is_appended_one_json_line_per_turn() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log.jsonl");
    for _ in 0..2 {
        let mut child = qfilters()
            .args([
                "chat",
                "-m",
                p(&model_path()),
                "--policy",
                "knorm",
                "-n",
                "4",
            ])
            .args(["--json-log", p(&log)])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child.stdin.take().unwrap().write_all(b"Hi\n").unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = fs::read_to_string(&log).unwrap();
    let records: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    assert_eq!(records.len(), 2, "{text}");
    assert!(records.iter().all(|r| r["user"] == "Hi"), "{text}");
}
