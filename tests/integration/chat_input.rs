//! Piped chat input a careless or hostile user sends: a bad line is skipped with one warning
//! and the rest goes on; `--no-commands` sends every line as a message (issue 14, defect 8).

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use crate::common::{model_path, qfilters};

fn chat(args: &[&str], input: &[u8]) -> Output {
    let mut cmd: Command = qfilters();
    let mut child = cmd
        .arg("chat")
        .arg("-m")
        .arg(model_path())
        .args([
            "-t", "1", "--policy", "knorm", "--budget", "256", "--temp", "0",
        ])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let written = child.stdin.take().expect("stdin").write_all(input);
    // A chat that refuses its flags exits before reading its input (the test then checks it
    // refused); only then may the pipe be closed under the write.
    if let Err(e) = written {
        assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe, "write stdin: {e}");
    }
    child.wait_with_output().expect("wait")
}

/// The turns of a chat log, whether written as one JSON array or as JSON Lines.
fn log_records(path: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(path).expect("log written");
    if let Ok(serde_json::Value::Array(records)) = serde_json::from_str(&text) {
        return records;
    }
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).expect("a JSON record per line"))
        .collect()
}

#[test]
fn a_nul_byte_line_is_skipped_with_one_warning_and_the_chat_goes_on() {
    let dir = tempfile::tempdir().expect("tmp");
    let log = dir.path().join("log.json");
    let input = b"Hello.\nbad \0 line\n/nonsense\nBad \xff byte\nThanks.\n".to_vec();
    let out = chat(
        &["-n", "2", "--json-log", log.to_str().expect("path")],
        &input,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let warnings: Vec<&str> = stderr.lines().collect();
    assert!(
        warnings
            .iter()
            .any(|l| l.contains("line 2 contains a NUL byte: skipped")),
        "{stderr}"
    );
    assert!(
        warnings
            .iter()
            .any(|l| l.contains("line 3") && l.contains("unknown command /nonsense")),
        "{stderr}"
    );
    assert!(
        warnings
            .iter()
            .any(|l| l.contains("line 4 is not valid UTF-8")),
        "{stderr}"
    );
    assert_eq!(warnings.len(), 3, "one line per bad input line: {stderr}");
    let users: Vec<String> = log_records(&log)
        .iter()
        .map(|r| r["user"].as_str().expect("user").to_string())
        .collect();
    assert_eq!(users, ["Hello.", "Bad \u{FFFD} byte", "Thanks."]);
}

#[test]
fn no_commands_sends_every_line_as_a_message() {
    let dir = tempfile::tempdir().expect("tmp");
    let log = dir.path().join("log.json");
    let target = dir.path().join("written.md");
    let input = format!("/save {}\n/quit\n//x\nHello.\n", target.display());
    let out = chat(
        &[
            "-n",
            "1",
            "--no-commands",
            "--json-log",
            log.to_str().expect("path"),
        ],
        input.as_bytes(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!target.exists(), "/save was sent as text, not run");
    let users: Vec<String> = log_records(&log)
        .iter()
        .map(|r| r["user"].as_str().expect("user").to_string())
        .collect();
    assert_eq!(
        users,
        [
            format!("/save {}", target.display()),
            "/quit".to_string(),
            "//x".to_string(),
            "Hello.".to_string()
        ]
    );
}

/// A log that cannot be written never drops the rest of the input silently: either the chat
/// refuses the path before the first turn, or every turn is still answered with a warning.
#[test]
fn an_unwritable_log_does_not_end_the_chat_silently() {
    let dir = tempfile::tempdir().expect("tmp");
    let not_a_dir = dir.path().join("file");
    std::fs::write(&not_a_dir, "x").expect("write");
    let log = not_a_dir.join("log.json");
    let out = chat(
        &["-n", "1", "--json-log", log.to_str().expect("path")],
        b"Hello.\nAgain.\n/stats\n",
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    if out.status.success() {
        assert!(stdout.contains("[stats]"), "the input went on: {stdout}");
        let warned = stderr.lines().filter(|l| l.contains("not logged")).count();
        assert_eq!(warned, 2, "one warning per turn: {stderr}");
    } else {
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(stdout.is_empty(), "refused before any turn: {stdout}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
    }
}
