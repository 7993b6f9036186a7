//! `qfilters chat`: a terminal chat whose KV cache never exceeds `--budget`.
//!
//! Interactive when stdin is a terminal (line editing, history, commands, Ctrl-C stops a
//! reply). Otherwise one message per input line: each reply is printed followed by one empty
//! line, and the program ends at the end of input. In both modes a line starting with `/` is a
//! command (`//text` sends `/text`); empty lines are skipped; a line that is not valid UTF-8 is
//! reported on stderr and sent with the bad bytes replaced by U+FFFD.

use std::cell::RefCell;
use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use clap::Args;

use qfilters::chat::{Chat, ChatTemplate, Reply, TurnStats};
use qfilters::ffi::{Model, Sampler, SamplingParams};
use qfilters::generate::Stop;
use qfilters::{Error, Result};

use super::{write_json, ModelArgs, PolicyArgs, Progress};

#[derive(Args, Debug)]
pub struct ChatArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub policy: PolicyArgs,
    /// System message sent first.
    #[arg(long)]
    pub system: Option<String>,
    /// Most tokens per reply.
    #[arg(short = 'n', long = "n-predict", default_value_t = 256)]
    pub n_predict: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.2)]
    pub temp: f32,
    #[arg(long = "top-k", default_value_t = 40)]
    pub top_k: i32,
    #[arg(long = "top-p", default_value_t = 0.95)]
    pub top_p: f32,
    /// Chat template: a llama.cpp built-in name (chatml, llama3, mistral-v7, gemma, phi3, ...)
    /// or Jinja source. Default: the model's own (GGUF tokenizer.chat_template), else chatml.
    #[arg(long)]
    pub template: Option<String>,
    /// Write per-turn statistics as a JSON array, rewritten after each turn.
    #[arg(long = "json-log")]
    pub json_log: Option<PathBuf>,
    /// Print the formatted prompt of a first turn with this message, and exit (for tests).
    #[arg(long = "print-prompt", hide = true)]
    pub print_prompt: Option<String>,
}

const PROMPT: &str = "you> ";

const HELP: &str = "commands:
  /stats       cells in use, budget, positions evicted, KV bytes, last turn's speed
  /reset       forget the conversation
  /save FILE   write the transcript as Markdown
  /help        this list
  /quit        leave (Ctrl-D too)
  //text       send a message that starts with '/'
Ctrl-C stops a reply.";

pub fn run(args: ChatArgs) -> Result<()> {
    let model = args.model.load()?;
    let (template, notice) = ChatTemplate::resolve(&model, args.template.as_deref());
    if let Some(n) = notice {
        eprintln!("qfilters: {n}");
    }
    if let Some(message) = &args.print_prompt {
        let mut messages = Vec::new();
        if let Some(s) = args.system.as_ref().filter(|s| !s.is_empty()) {
            messages.push(("system".to_string(), s.clone()));
        }
        messages.push(("user".to_string(), message.clone()));
        print!("{}", template.format(&messages, true)?);
        return Ok(());
    }
    let mut tuned = args.policy.clone();
    tuned.apply_tuned(&args.model.model)?;
    let mut policy = choose_policy(&tuned, &args.model.model, &model)?;
    if policy.policy == "none" {
        // The full cache is --budget cells; llama.cpp refuses batches larger than its context.
        policy.n_batch = policy.n_batch.min(policy.budget.max(1));
    }
    let engine = policy.engine(&args.model, &model, policy.budget, false)?;
    let sampler = Sampler::new(&SamplingParams {
        temperature: args.temp,
        top_k: args.top_k,
        top_p: args.top_p,
        seed: policy.seed as u32,
    })?;
    let mut session = Session {
        chat: Chat::new(engine, sampler, template, args.system.clone()),
        policy: policy.policy.clone(),
        n_predict: args.n_predict,
        json_log: args.json_log.clone(),
        log: Vec::new(),
        interrupted: Arc::new(AtomicBool::new(false)),
    };
    if std::io::stdin().is_terminal() {
        interactive(&mut session, &args)
    } else {
        piped(&mut session)
    }
}

/// The policy to use: `qfilters` (the default) falls back to `knorm` when no filters are at
/// hand, unless the user asked for `--policy qfilters` explicitly.
fn choose_policy(p: &PolicyArgs, path: &Path, model: &Model) -> Result<PolicyArgs> {
    let explicit = std::env::args_os().any(|a| {
        let a = a.to_string_lossy();
        a == "--policy" || a.starts_with("--policy=")
    });
    if p.policy == "qfilters" && !explicit && p.resolve_filters(path, model, true)?.is_none() {
        eprintln!(
            "qfilters: policy knorm (keep keys of small norm): no --filters given and {} embeds no Q-Filters; make filters with `qfilters calibrate` to use policy qfilters",
            path.display()
        );
        return Ok(PolicyArgs {
            policy: "knorm".into(),
            ..p.clone()
        });
    }
    Ok(p.clone())
}

struct Session {
    chat: Chat,
    policy: String,
    n_predict: usize,
    json_log: Option<PathBuf>,
    log: Vec<serde_json::Value>,
    interrupted: Arc<AtomicBool>,
}

enum Line {
    Message(String),
    Command(String),
    Empty,
}

fn classify(line: &str) -> Line {
    let line = line.trim_end_matches(['\r', '\n']);
    if line.trim().is_empty() {
        Line::Empty
    } else if let Some(rest) = line.strip_prefix("//") {
        Line::Message(format!("/{rest}"))
    } else if line.starts_with('/') {
        Line::Command(line.trim().to_string())
    } else {
        Line::Message(line.to_string())
    }
}

/// What a command asks of the loop.
enum Flow {
    Continue,
    Quit,
}

impl Session {
    fn send(&mut self, message: &str, out: &mut dyn Write, tty: bool) -> Result<Reply> {
        self.interrupted.store(false, Ordering::SeqCst);
        let flag = Arc::clone(&self.interrupted);
        // Shown while a long message is decoded, cleared when the reply starts.
        let bar: RefCell<Option<Progress>> = RefCell::new(None);
        let result = self.chat.turn(
            message,
            self.n_predict,
            &mut |done, total| {
                bar.borrow_mut()
                    .get_or_insert_with(|| Progress::new(total, "reading"))
                    .set(done);
            },
            &mut |piece| {
                if let Some(b) = bar.borrow_mut().take() {
                    b.finish();
                }
                if flag.load(Ordering::SeqCst) {
                    return false;
                }
                let _ = out.write_all(piece.as_bytes());
                let _ = out.flush();
                true
            },
        );
        if let Some(b) = bar.borrow_mut().take() {
            b.finish();
        }
        let reply = result.map_err(|e| match e {
            Error::InvalidArgument(m) if self.chat.engine().budget().is_none() => {
                Error::InvalidArgument(format!(
                    "{m} (in chat the full cache is --budget cells: raise --budget, or /reset)"
                ))
            }
            e => e,
        })?;
        if tty {
            if reply.stop == Stop::Interrupted {
                let _ = writeln!(out, "\n[interrupted]");
            } else {
                let _ = writeln!(out);
            }
        } else {
            let _ = writeln!(out, "\n");
        }
        let _ = out.flush();
        self.record(message, &reply)?;
        Ok(reply)
    }

    fn record(&mut self, message: &str, reply: &Reply) -> Result<()> {
        let Some(path) = &self.json_log else {
            return Ok(());
        };
        let mut value =
            serde_json::to_value(&reply.stats).map_err(|e| Error::invalid(e.to_string()))?;
        if let Some(obj) = value.as_object_mut() {
            obj.insert("policy".into(), self.policy.clone().into());
            obj.insert("user".into(), message.into());
            obj.insert("reply".into(), reply.text.clone().into());
        }
        self.log.push(value);
        write_json(path, &serde_json::Value::Array(self.log.clone()))
    }

    fn stats_line(&self) -> String {
        let e = self.chat.engine();
        let s = e.stats();
        let cells = match e.budget() {
            Some(b) => format!("cells {}/{b}", s.live_cells),
            None => format!("cells {} (full cache of {})", s.live_cells, s.n_ctx),
        };
        let turn = match self.chat.last_turn() {
            Some(t) => last_turn_text(t),
            None => "no turn yet".to_string(),
        };
        format!(
            "[stats] policy {} | {cells} | positions {} | evicted {} | KV {:.1} MiB | {turn}",
            self.policy,
            e.next_position(),
            s.evicted,
            s.kv_bytes as f64 / (1024.0 * 1024.0),
        )
    }

    fn command(&mut self, cmd: &str, out: &mut dyn Write) -> Result<Flow> {
        let (name, arg) = match cmd.split_once(char::is_whitespace) {
            Some((n, a)) => (n, a.trim()),
            None => (cmd, ""),
        };
        match name {
            "/quit" | "/exit" => return Ok(Flow::Quit),
            "/help" => {
                let _ = writeln!(out, "{HELP}");
            }
            "/stats" => {
                let _ = writeln!(out, "{}", self.stats_line());
            }
            "/reset" => {
                self.chat.reset();
                let _ = writeln!(out, "[conversation reset]");
            }
            "/save" => {
                if arg.is_empty() {
                    return Err(Error::invalid("/save needs a file name"));
                }
                std::fs::write(arg, self.chat.transcript_markdown())
                    .map_err(|e| Error::io(format!("cannot write {arg}"), e))?;
                let _ = writeln!(out, "[saved to {arg}]");
            }
            _ => {
                return Err(Error::invalid(format!(
                    "unknown command {name} (/help lists them; //text sends a message starting with '/')"
                )))
            }
        }
        Ok(Flow::Continue)
    }
}

fn last_turn_text(t: &TurnStats) -> String {
    format!(
        "last turn: {} + {} tok, peak {} cells, prefill {:.1} tok/s, decode {:.1} tok/s",
        t.prompt_tokens, t.reply_tokens, t.peak_cells, t.prefill_tok_s, t.decode_tok_s
    )
}

fn piped(session: &mut Session) -> Result<()> {
    let stdin = std::io::stdin();
    let mut input = stdin.lock();
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut raw = Vec::new();
    let mut line_no = 0usize;
    loop {
        raw.clear();
        let n = input
            .read_until(b'\n', &mut raw)
            .map_err(|e| Error::io("cannot read stdin", e))?;
        if n == 0 {
            return Ok(());
        }
        line_no += 1;
        let line = match std::str::from_utf8(&raw) {
            Ok(s) => s.to_string(),
            Err(_) => {
                eprintln!(
                    "qfilters: input line {line_no} is not valid UTF-8: invalid bytes replaced by U+FFFD"
                );
                String::from_utf8_lossy(&raw).into_owned()
            }
        };
        match classify(&line) {
            Line::Empty => {}
            // A command that fails (unknown, unwritable file) is reported and the script goes on.
            Line::Command(cmd) => match session.command(&cmd, &mut out) {
                Ok(Flow::Quit) => return Ok(()),
                Ok(Flow::Continue) => {
                    let _ = writeln!(out);
                }
                Err(e) => eprintln!("qfilters: line {line_no}: {e}"),
            },
            Line::Message(m) => {
                session.send(&m, &mut out, false)?;
            }
        }
    }
}

fn interactive(session: &mut Session, args: &ChatArgs) -> Result<()> {
    let flag = Arc::clone(&session.interrupted);
    // At the prompt the line editor reads Ctrl-C as a key; during a reply the terminal sends
    // SIGINT, which only asks the reply to stop.
    if let Err(e) = ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst)) {
        eprintln!("qfilters: Ctrl-C will not stop replies ({e})");
    }
    let mut editor = rustyline::DefaultEditor::new()
        .map_err(|e| Error::invalid(format!("cannot start the line editor: {e}")))?;
    let budget = session
        .chat
        .engine()
        .budget()
        .map(|b| format!("budget {b} cells"))
        .unwrap_or_else(|| "full cache".into());
    eprintln!(
        "qfilters chat: {} | policy {} | {budget} | template {} | /help for commands, Ctrl-D to quit",
        args.model.model.display(),
        session.policy,
        session.chat.template().label,
    );
    let stdout = std::io::stdout();
    loop {
        let line = match editor.readline(PROMPT) {
            Ok(l) => l,
            Err(rustyline::error::ReadlineError::Interrupted) => continue,
            Err(rustyline::error::ReadlineError::Eof) => return Ok(()),
            Err(e) => return Err(Error::invalid(format!("cannot read the terminal: {e}"))),
        };
        if !line.trim().is_empty() {
            let _ = editor.add_history_entry(line.as_str());
        }
        let mut out = stdout.lock();
        let result = match classify(&line) {
            Line::Empty => Ok(()),
            Line::Command(cmd) => match session.command(&cmd, &mut out) {
                Ok(Flow::Quit) => return Ok(()),
                Ok(Flow::Continue) => Ok(()),
                Err(e) => Err(e),
            },
            Line::Message(m) => session.send(&m, &mut out, true).map(|_| ()),
        };
        if let Err(e) = result {
            let _ = writeln!(out);
            eprintln!("qfilters: {e}");
            if session.chat.needs_reset() {
                session.chat.reset();
                eprintln!("qfilters: the conversation was reset");
            }
        }
    }
}
