//! `qfilters chat` as a user drives it: piped turns, a terminal session in tmux, bad input; and
//! the template arithmetic that lets each turn decode only its new tokens.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use qfilters::conversation::chat::ChatTemplate;
use qfilters::conversation::delta::{self, History};
use qfilters::ffi::Model;

use crate::common::{bin, model_path, qwen, smollm2};

/// The tests share two cores: one model at a time, on one thread (llama.cpp's threads spin
/// while waiting, and collapse when the cores are oversubscribed).
static HEAVY: Mutex<()> = Mutex::new(());

fn lock() -> std::sync::MutexGuard<'static, ()> {
    HEAVY.lock().unwrap_or_else(|e| e.into_inner())
}

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("qfilters-chat-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join(name);
    // The log is appended to: a file left by an earlier run would add its records.
    let _ = std::fs::remove_file(&path);
    path
}

/// Runs `qfilters chat` with `input` on stdin.
fn chat(args: &[&str], input: &[u8]) -> Output {
    let mut child = Command::new(bin())
        .arg("chat")
        .arg("-m")
        .arg(model_path())
        .args(["-t", "1"])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start qfilters chat");
    let mut stdin = child.stdin.take().expect("stdin");
    let input = input.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    let out = child.wait_with_output().expect("wait for qfilters chat");
    let _ = writer.join();
    out
}

/// The log is JSON Lines: one object per turn, each line complete.
fn read_log(path: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(path).expect("json log written");
    assert!(text.ends_with('\n'), "every record ends its line");
    text.lines()
        .map(|l| serde_json::from_str(l).expect("each log line parses"))
        .collect()
}

fn num(record: &serde_json::Value, key: &str) -> f64 {
    record[key]
        .as_f64()
        .unwrap_or_else(|| panic!("record lacks numeric {key}: {record}"))
}

fn check_success(out: &Output) -> (String, String) {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "qfilters chat failed: {}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    (stdout, stderr)
}

#[test]
fn delta_of_formatted_turns_equals_formatting_all_at_once() {
    check_delta(&smollm2(), crate::common::MODEL);
}

/// Qwen2.5's own template (ChatML with a default system message and tool blocks).
#[test]
fn delta_of_formatted_turns_on_qwen2() {
    check_delta(&qwen(), crate::common::QWEN_MODEL);
}

fn check_delta(model: &Model, name: &str) {
    let _guard = lock();
    let (template, notice) = ChatTemplate::resolve(model, None);
    assert!(
        notice.is_none(),
        "{name}: the model's own template is supported: {notice:?}",
    );
    let turns = [
        ("Hello!", "Hi! How can I help you today?"),
        (
            "What did I just say?",
            " You said \"Hello!\".\n\nAnything else?",
        ),
        ("Ünïcödé 🦀, tabs\tand  spaces  ", "Sure: 🦀 — noted."),
        ("Last one.", "Bye"),
    ];
    let system = "You are brief.";
    let mut messages = vec![("system".to_string(), system.to_string())];
    let mut history = History::default();
    let mut incremental = Vec::new();
    let turn = |history: &History, messages: &[(String, String)]| {
        let full = template.segments(messages, true).expect("segments");
        let prompt = delta::parts(model, full).expect("parts");
        let plan = delta::plan(history, &prompt);
        // Every turn after the first extends what the cache holds.
        assert_eq!(
            plan.reuse,
            !history.tokens.is_empty(),
            "{name}: {messages:?}"
        );
        plan
    };
    for (user, reply) in turns {
        messages.push(("user".into(), user.to_string()));
        let plan = turn(&history, &messages);
        incremental.extend_from_slice(plan.new_tokens());
        // What the model would have generated, then kept in the cache.
        let sampled = model.tokenize(reply, false, false).expect("tokenize");
        incremental.extend_from_slice(&sampled);
        history = plan.history_after(reply, &sampled, false);
        messages.push(("assistant".into(), reply.to_string()));
    }
    // One more user turn: the last reply must get its end-of-turn text.
    messages.push(("user".into(), "?".into()));
    incremental.extend_from_slice(turn(&history, &messages).new_tokens());
    let full = template.format(&messages, true).expect("format");
    let whole = model.tokenize(&full, true, true).expect("tokenize");
    assert_eq!(
        model.detokenize(&incremental, true),
        model.detokenize(&whole, true)
    );
    assert_eq!(incremental, whole, "incremental tokens differ from whole");
    let im_end = model.tokenize("<|im_end|>", false, true).expect("tokenize");
    assert_eq!(im_end.len(), 1, "<|im_end|> is one special token");
    let ends = incremental.iter().filter(|&&t| t == im_end[0]).count();
    // System, each user message and reply, and the final user message.
    assert_eq!(ends, 2 + 2 * turns.len(), "every message is closed");
}

#[test]
fn user_text_that_looks_like_a_control_token_stays_text() {
    let model = smollm2();
    let (template, _) = ChatTemplate::resolve(&model, None);
    let user = "say <|im_end|> please";
    let segments = template
        .segments(&[("user".into(), user.into())], true)
        .expect("segments");
    let tokens = delta::plan(
        &History::default(),
        &delta::parts(&model, segments).expect("parts"),
    )
    .new_tokens()
    .to_vec();
    let im_end = model.tokenize("<|im_end|>", false, true).expect("tokenize")[0];
    // Only the template's own end of the user message.
    assert_eq!(tokens.iter().filter(|&&t| t == im_end).count(), 1);
}

#[test]
fn piped_two_turns_print_two_replies_and_log_each_turn() {
    let _g = lock();
    let log = tmp("two.json");
    let out = chat(
        &["--budget", "256", "--json-log", log.to_str().expect("path")],
        b"Hello!\nWhat did I just say?\n",
    );
    let (stdout, stderr) = check_success(&out);
    let fallback = qfilters::policy::WITHOUT_FILTERS.name;
    assert!(
        stderr.contains(&format!("policy {fallback} (")),
        "the default falls back to {fallback} without filters and says so: {stderr}"
    );
    let records = read_log(&log);
    assert_eq!(records.len(), 2, "one record per turn: {records:?}");
    for (i, r) in records.iter().enumerate() {
        for key in [
            "turn",
            "peak_cells",
            "budget",
            "evicted_total",
            "prefill_tok_s",
            "decode_tok_s",
            "prompt_tokens",
            "reply_tokens",
            "live_cells",
        ] {
            assert!(r.get(key).is_some(), "record {i} lacks {key}: {r}");
        }
        assert_eq!(num(r, "turn") as usize, i + 1);
        assert_eq!(num(r, "budget") as usize, 256);
        assert!(num(r, "prefill_tok_s") > 0.0);
    }
    // Each reply is printed, in order, followed by an empty line.
    let first = records[0]["reply"].as_str().expect("reply");
    let second = records[1]["reply"].as_str().expect("reply");
    assert!(!first.trim().is_empty() && !second.trim().is_empty());
    assert_eq!(stdout, format!("{first}\n\n{second}\n\n"));
    // The second turn continues the first in the cache: its positions follow on, holding
    // only its own tokens (a reply cut by -n leaves its last token for the next turn).
    let p1 = num(&records[0], "positions");
    let p2 = num(&records[1], "positions");
    let cut = if records[1]["stop"] == "limit" {
        1.0
    } else {
        0.0
    };
    assert_eq!(
        p2 - p1,
        num(&records[1], "prompt_tokens") + num(&records[1], "reply_tokens") - cut
    );
}

#[test]
fn piped_commands_save_reset_and_stats() {
    let _g = lock();
    let log = tmp("commands.json");
    let md = tmp("transcript.md");
    let input = format!(
        "Hi, I am Ada.\n/save {}\n/nonsense\n/reset\n//slash first\n/stats\n/quit\nnever sent\n",
        md.display()
    );
    let out = chat(
        &[
            "-n",
            "8",
            "--temp",
            "0",
            "--system",
            "Be brief.",
            "--json-log",
            log.to_str().expect("path"),
        ],
        input.as_bytes(),
    );
    let (stdout, stderr) = check_success(&out);
    assert!(stderr.contains("unknown command /nonsense"), "{stderr}");
    let records = read_log(&log);
    assert_eq!(records.len(), 2, "/quit ends the script: {records:?}");
    assert_eq!(records[1]["user"], "/slash first");
    // After /reset the conversation starts again at position 0 (with the system message).
    let cut = if records[1]["stop"] == "limit" {
        1.0
    } else {
        0.0
    };
    assert_eq!(
        num(&records[1], "positions"),
        num(&records[1], "prompt_tokens") + num(&records[1], "reply_tokens") - cut
    );
    let saved = std::fs::read_to_string(&md).expect("transcript saved");
    assert!(saved.contains("**System:** Be brief."), "{saved}");
    assert!(saved.contains("**User:** Hi, I am Ada."), "{saved}");
    let first = records[0]["reply"].as_str().expect("reply");
    assert!(saved.contains(&format!("**Assistant:** {}", first.trim_end())));
    let stats = stdout
        .lines()
        .find(|l| l.starts_with("[stats]"))
        .expect("stats line");
    assert!(stats.contains("/512"), "default budget: {stats}");
    assert!(stdout.contains("[conversation reset]"));
}

#[test]
fn hundred_turns_stay_within_the_budget() {
    let _g = lock();
    let log = tmp("hundred.json");
    let topics = [
        "Tell me a fact about the sea.",
        "Name a color.",
        "What is 3 plus 4?",
        "Give me a word that rhymes with cat.",
        "Say something kind.",
        "What is the capital of Italy?",
        "Describe a tree in a few words.",
        "Which animal barks?",
        "Count to five.",
        "What do bees make?",
    ];
    let mut input = String::new();
    for i in 0..100 {
        input.push_str(&format!("{} (turn {})\n", topics[i % topics.len()], i + 1));
    }
    let (budget, batch) = (256usize, 64usize);
    let started = Instant::now();
    let out = chat(
        &[
            "--budget",
            "256",
            "--batch",
            "64",
            "-n",
            "12",
            "--temp",
            "0",
            "--json-log",
            log.to_str().expect("path"),
        ],
        input.as_bytes(),
    );
    check_success(&out);
    let records = read_log(&log);
    assert_eq!(records.len(), 100);
    let mut processed = 0.0;
    for r in &records {
        assert!(
            num(r, "peak_cells") as usize <= budget + batch,
            "peak over budget + batch: {r}"
        );
        assert!(num(r, "live_cells") as usize <= budget, "{r}");
        assert!(num(r, "reply_tokens") >= 1.0, "empty reply: {r}");
        assert!(
            !r["reply"].as_str().expect("reply").trim().is_empty(),
            "{r}"
        );
        processed += num(r, "prompt_tokens") + num(r, "reply_tokens");
    }
    let last = &records[99];
    assert!(
        processed > 4.0 * budget as f64,
        "only {processed} tokens processed"
    );
    assert!(num(last, "positions") > 4.0 * budget as f64);
    assert!(num(last, "evicted_total") > 0.0);
    eprintln!(
        "100 turns: {processed} tokens, {} evicted, {:.1} s",
        num(last, "evicted_total"),
        started.elapsed().as_secs_f64()
    );
}

#[test]
fn first_reply_equals_run_on_the_formatted_prompt() {
    let _g = lock();
    let message = "What is the capital of France?";
    let prompt = Command::new(bin())
        .args(["chat", "-m"])
        .arg(model_path())
        .args(["--print-prompt", message])
        .output()
        .expect("print prompt");
    let (prompt, _) = check_success(&prompt);
    assert!(prompt.starts_with("<|im_start|>user\n") && prompt.ends_with("assistant\n"));
    let n = "32";
    let chat_out = chat(
        &[
            "--policy", "none", "--budget", "2048", "--temp", "0", "-n", n,
        ],
        format!("{message}\n").as_bytes(),
    );
    let (chat_text, _) = check_success(&chat_out);
    let run_out = Command::new(bin())
        .args(["run", "-m"])
        .arg(model_path())
        .args([
            "-t",
            "1",
            "--policy",
            "none",
            "--temp",
            "0",
            "-n",
            n,
            "--special",
            "-p",
        ])
        .arg(&prompt)
        .output()
        .expect("qfilters run");
    let (run_text, _) = check_success(&run_out);
    assert!(!run_text.trim().is_empty());
    assert_eq!(chat_text.trim_end(), run_text.trim_end());
}

#[test]
fn bad_input_is_handled() {
    let _g = lock();
    let log = tmp("bad.json");
    let mut input = Vec::new();
    input.extend_from_slice(b"\n   \n\r\n");
    input.extend_from_slice(b"Hello \xff\xfe there\n\n");
    let mut long = String::new();
    for i in 0..220 {
        long.push_str(&format!("Item {i} is a blue box. "));
    }
    input.extend_from_slice(long.as_bytes());
    input.extend_from_slice(b"\nThanks!");
    let out = chat(
        &[
            "--budget",
            "256",
            "-n",
            "8",
            "--temp",
            "0",
            "--json-log",
            log.to_str().expect("path"),
        ],
        &input,
    );
    let (stdout, stderr) = check_success(&out);
    assert!(
        stderr.contains("line 4 is not valid UTF-8"),
        "the bad line is named: {stderr}"
    );
    let records = read_log(&log);
    assert_eq!(records.len(), 3, "empty lines are skipped: {records:?}");
    assert!(records[0]["user"]
        .as_str()
        .expect("user")
        .contains('\u{FFFD}'));
    let long_turn = &records[1];
    assert!(
        num(long_turn, "prompt_tokens") > 1000.0,
        "the long message is longer than the budget: {long_turn}"
    );
    assert!(num(long_turn, "peak_cells") as usize <= 256 + 256);
    assert!(num(long_turn, "live_cells") as usize <= 256);
    assert!(num(long_turn, "evicted") > 0.0);
    let expected: String = records
        .iter()
        .map(|r| format!("{}\n\n", r["reply"].as_str().expect("reply")))
        .collect();
    assert_eq!(stdout, expected);
}

#[test]
fn unsupported_template_falls_back_to_chatml_with_a_message() {
    let _g = lock();
    let out = chat(
        &[
            "--template",
            "{% for m in messages %}{{ m.content }}{% endfor %}",
            "-n",
            "8",
            "--temp",
            "0",
        ],
        b"Hello!\n",
    );
    let (stdout, stderr) = check_success(&out);
    let notices: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("does not support"))
        .collect();
    assert_eq!(notices.len(), 1, "one clear line: {stderr}");
    assert!(notices[0].contains("chatml"));
    assert!(!stdout.trim().is_empty());
}

#[test]
fn full_cache_overflow_is_a_clear_error() {
    let _g = lock();
    let mut long = String::new();
    for i in 0..100 {
        long.push_str(&format!("Item {i}. "));
    }
    long.push('\n');
    let out = chat(&["--policy", "none", "--budget", "64"], long.as_bytes());
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("full cache"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// A tmux server of our own, killed when the test ends however it ends.
struct Tmux {
    socket: String,
    session: String,
}

impl Tmux {
    fn cmd(&self) -> Command {
        let mut c = Command::new("tmux");
        c.args(["-L", &self.socket]);
        c
    }

    fn send(&self, keys: &[&str]) {
        let status = self
            .cmd()
            .args(["send-keys", "-t", &self.session])
            .args(keys)
            .status()
            .expect("tmux send-keys");
        assert!(status.success(), "tmux send-keys {keys:?}");
    }

    fn type_line(&self, text: &str) {
        self.send(&["-l", text]);
        self.send(&["Enter"]);
    }

    fn screen(&self) -> String {
        let out = self
            .cmd()
            .args(["capture-pane", "-p", "-J", "-S", "-", "-t", &self.session])
            .output()
            .expect("tmux capture-pane");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Polls the screen until `done` holds; panics with the screen after `secs`.
    fn wait(&self, what: &str, secs: u64, done: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let s = self.screen();
            if done(&s) {
                return s;
            }
            if Instant::now() > deadline {
                panic!("timed out waiting for {what}; screen:\n{s}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.cmd().arg("kill-server").status();
    }
}

const PROMPT: &str = "you> ";

#[test]
fn terminal_session_in_tmux() {
    // scripts/setup.sh installs tmux with the rest: a missing one is a failed setup, not a skip.
    assert!(
        Command::new("tmux").arg("-V").output().is_ok(),
        "tmux is not installed: run scripts/setup.sh (or `apt-get install -y tmux`)"
    );
    let _g = lock();
    let tag = format!(
        "qfilters-chat-{}-{}",
        std::process::id(),
        Instant::now().elapsed().as_nanos()
    );
    let tmux = Tmux {
        socket: tag.clone(),
        session: tag,
    };
    let shell_cmd = format!(
        "'{}' chat -m '{}' -t 1 --budget 256 --batch 64 -n 400 --temp 0; echo CHAT-EXIT=$?; sleep 120",
        bin(),
        model_path().display()
    );
    let status = tmux
        .cmd()
        .args([
            "new-session",
            "-d",
            "-s",
            &tmux.session,
            "-x",
            "160",
            "-y",
            "50",
        ])
        .arg(shell_cmd)
        .status()
        .expect("tmux new-session");
    assert!(status.success(), "tmux new-session failed");
    let prompts = |s: &str| s.matches(PROMPT).count();
    tmux.wait("the first prompt", 60, |s| prompts(s) >= 1);

    tmux.type_line("Hello! Who are you?");
    let s = tmux.wait("the first reply", 60, |s| prompts(s) >= 2);
    let reply = s
        .split("you> Hello! Who are you?")
        .nth(1)
        .and_then(|r| r.split(PROMPT).next())
        .unwrap_or("");
    assert!(!reply.trim().is_empty(), "a reply appears:\n{s}");

    tmux.type_line("Name three fruits.");
    tmux.wait("the second reply", 60, |s| prompts(s) >= 3);

    tmux.type_line("/stats");
    let s = tmux.wait("the stats line", 30, |s| {
        s.contains("[stats]") && prompts(s) >= 4
    });
    let line = s
        .lines()
        .find(|l| l.contains("[stats]"))
        .expect("stats line");
    let cells: usize = line
        .split("cells ")
        .nth(1)
        .and_then(|r| r.split('/').next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no cells in {line}"));
    assert!(cells > 0 && cells <= 256, "{line}");
    assert!(line.contains("/256"), "{line}");

    let ask = "Write a very long story about a dragon who lives in a castle, with many chapters.";
    tmux.type_line(ask);
    // Ctrl-C as soon as the reply has started.
    tmux.wait("the long reply to start", 60, |s| {
        s.split(ask).nth(1).is_some_and(|r| r.trim().len() > 20)
    });
    tmux.send(&["C-c"]);
    let s = tmux.wait("the prompt after Ctrl-C", 30, |s| prompts(s) >= 5);
    assert!(
        s.contains("[interrupted]"),
        "the reply was stopped, not finished:\n{s}"
    );
    assert!(!s.contains("CHAT-EXIT"), "still running after Ctrl-C:\n{s}");

    // The conversation goes on after an interrupted reply.
    tmux.type_line("Thanks.");
    tmux.wait("a reply after the interruption", 60, |s| prompts(s) >= 6);

    // /save asks before it overwrites a file; anything but yes keeps the file.
    let md = tmp("tmux-save.md");
    std::fs::write(&md, "keep me").expect("write");
    let save = format!("/save {}", md.display());
    let question = "exists: overwrite it? [y/N]";
    tmux.type_line(&save);
    tmux.wait("the overwrite question", 30, |s| {
        s.matches(question).count() >= 1
    });
    tmux.type_line("n");
    tmux.wait("the refusal", 30, |s| {
        s.contains("[not saved]") && prompts(s) >= 7
    });
    assert_eq!(std::fs::read_to_string(&md).expect("read"), "keep me");
    tmux.type_line(&save);
    tmux.wait("the question again", 30, |s| {
        s.matches(question).count() >= 2
    });
    tmux.type_line("y");
    tmux.wait("the save", 30, |s| {
        s.contains("[saved to") && prompts(s) >= 8
    });
    let saved = std::fs::read_to_string(&md).expect("read");
    assert!(saved.contains("**User:** Thanks."), "{saved}");

    tmux.type_line("/quit");
    let s = tmux.wait("a clean exit", 30, |s| s.contains("CHAT-EXIT="));
    assert!(s.contains("CHAT-EXIT=0"), "exit status 0:\n{s}");
}
