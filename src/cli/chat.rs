//! `qfilters chat`: a terminal chat whose KV cache never exceeds `--budget`.
//!
//! Interactive when stdin is a terminal (line editing, history, commands, Ctrl-C stops a
//! reply). Otherwise one message per input line: each reply is printed followed by one empty
//! line, and the program ends at the end of input. In both modes a line starting with `/` is a
//! command (`//text` sends `/text`) unless `--no-commands`; empty lines are skipped; a line
//! that is not valid UTF-8 is reported on stderr and sent with the bad bytes replaced by
//! U+FFFD. Piped, a line that cannot be sent (a NUL byte, a message the template refuses) is
//! reported and skipped.

use std::cell::RefCell;
use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use clap::Args;

use qfilters::conversation::chat::{Chat, ChatTemplate, Reply};
use qfilters::conversation::generate::Stop;
use qfilters::ffi::Sampler;
use qfilters::policy::PolicyInfo;
use qfilters::{Error, Result};

use gguf_tools::safe_io::{self, AppendLog};

use super::{
    check_outputs, EvictionArgs, EvictionCli, FoundFilters, Given, JobLength, LlamaArgs, ModelArgs,
    Progress, SamplingArgs,
};

#[derive(Args, Debug)]
// A conversation samples a little by default: greedy replies to a chat loop on themselves.
#[command(mut_arg("temp", |a| a.default_value("0.2")))]
pub struct ChatArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub eviction: EvictionArgs,
    #[command(flatten)]
    pub llama: LlamaArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// System message sent first.
    #[arg(long)]
    pub system: Option<String>,
    /// Most tokens per reply.
    #[arg(short = 'n', long = "n-predict", default_value_t = 256)]
    pub n_predict: usize,
    /// Chat template: a llama.cpp built-in name (chatml, llama3, mistral-v7, gemma, phi3, ...)
    /// or Jinja source. Default: the model's own (GGUF tokenizer.chat_template), else chatml.
    #[arg(long)]
    pub template: Option<String>,
    /// Append per-turn statistics to this file as JSON Lines (one object per turn).
    #[arg(long = "json-log")]
    pub json_log: Option<PathBuf>,
    /// Turn slash commands off: every line, `/save ...` and `/quit` included, is sent to the
    /// model as a message (for untrusted input).
    #[arg(long = "no-commands")]
    pub no_commands: bool,
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

pub fn run(args: ChatArgs, given: &Given) -> Result<()> {
    let tty = std::io::stdin().is_terminal();
    if tty {
        // Ctrl-C stops a reply there; the temporary-file cleanup (installed by the first
        // output check) must not make it end the program.
        safe_io::leave_sigint_to_caller();
    }
    args.sampling.check()?;
    args.eviction.check()?;
    args.llama.check(args.eviction.per_head())?;
    let filters = args.eviction.input_paths();
    let mut inputs: Vec<PathBuf> = vec![args.model.model.clone()];
    inputs.extend(filters);
    if let Some(log) = &args.json_log {
        // stdout carries the conversation, so the log needs a file of its own.
        let refs: Vec<&Path> = inputs.iter().map(PathBuf::as_path).collect();
        check_outputs(&[log], &refs, false)?;
    }
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
    let mut eviction = args.eviction.clone();
    let found = FoundFilters::load(eviction.filters.as_deref(), &args.model.model)?;
    eviction.apply_tuned(found.as_ref(), given)?;
    let filters = eviction.resolve_filters(found.as_ref(), &model, false)?;
    super::fall_back_without_filters(&mut eviction, filters.is_some(), &args.model.model, given);
    // A conversation has no known length; a full cache (no eviction) holds --budget cells.
    let job = JobLength::Open {
        full_cells: eviction.budget,
    };
    if !eviction.policy.evicts {
        // llama.cpp refuses batches larger than its context.
        let cells = job.full_cells(args.llama.ctx_size);
        eviction.n_batch = eviction.n_batch.min(cells.max(1));
    }
    let engine = eviction.engine_with_filters(&args.model, &args.llama, &model, job, filters)?;
    let sampler = Sampler::new(&model, &args.sampling.params(args.llama.seed)?)?;
    let mut session = Session {
        chat: Chat::new(engine, sampler, template, args.system.clone()),
        policy: eviction.policy,
        n_predict: args.n_predict,
        json_log: args.json_log.as_deref().map(AppendLog::open).transpose()?,
        inputs: inputs
            .into_iter()
            .chain(args.json_log.iter().cloned())
            .collect(),
        interrupted: Arc::new(AtomicBool::new(false)),
    };
    if tty {
        interactive(&mut session, &args)
    } else {
        piped(&mut session, !args.no_commands)
    }
}

struct Session {
    chat: Chat,
    policy: PolicyInfo,
    n_predict: usize,
    json_log: Option<AppendLog>,
    /// Files /save must not overwrite: the model, the filters, the log.
    inputs: Vec<PathBuf>,
    interrupted: Arc<AtomicBool>,
}

enum Line {
    Message(String),
    Command(String),
    Empty,
}

fn classify(line: &str, commands: bool) -> Line {
    let line = line.trim_end_matches(['\r', '\n']);
    if line.trim().is_empty() {
        Line::Empty
    } else if !commands {
        Line::Message(line.to_string())
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
        // A closed stdout ends the reply and then the program: nobody reads the rest.
        let mut closed: Option<std::io::Error> = None;
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
                if let Err(e) = out.write_all(piece.as_bytes()).and_then(|()| out.flush()) {
                    closed = Some(e);
                    return false;
                }
                true
            },
        );
        if let Some(b) = bar.borrow_mut().take() {
            b.finish();
        }
        if let Some(e) = closed {
            return Err(Error::io("cannot write the reply to stdout", e));
        }
        let reply = result.map_err(|e| match e {
            e @ Error::FullCacheOverflow { .. } => Error::invalid(format!(
                "{e} (in chat the full cache is --ctx-size, else --budget, cells: raise it, or /reset)"
            )),
            e => e,
        })?;
        let end = if !tty {
            "\n\n"
        } else if reply.stop == Stop::Interrupted {
            "\n[interrupted]\n"
        } else {
            "\n"
        };
        out.write_all(end.as_bytes())
            .and_then(|()| out.flush())
            .map_err(|e| Error::io("cannot write the reply to stdout", e))?;
        // The reply was given: a log that cannot be written is worth a warning, not the end
        // of the conversation.
        if let Err(e) = self.record(message, &reply) {
            eprintln!("qfilters: warning: turn {} not logged: {e}", reply.turn);
        }
        Ok(reply)
    }

    fn record(&mut self, message: &str, reply: &Reply) -> Result<()> {
        let Some(log) = &mut self.json_log else {
            return Ok(());
        };
        let mut value =
            serde_json::to_value(&reply.stats).map_err(|e| Error::invalid(e.to_string()))?;
        let e = self.chat.engine();
        if let Some(obj) = value.as_object_mut() {
            obj.insert("turn".into(), reply.turn.into());
            obj.insert("reply_tokens".into(), reply.tokens.into());
            obj.insert("stop".into(), reply.stop.as_str().into());
            // The cache right after the turn (the log is written before the next one starts).
            obj.insert("live_cells".into(), e.live_cells().into());
            obj.insert("budget".into(), e.budget().into());
            obj.insert("evicted_total".into(), e.stats().evicted.into());
            obj.insert("positions".into(), e.next_position().into());
            obj.insert("policy".into(), self.policy.name.into());
            obj.insert("user".into(), message.into());
            obj.insert("reply".into(), reply.text.clone().into());
        }
        // One line per turn, appended: a long chat costs O(turns) I/O, and a crash loses at
        // most the turn being written.
        let line = serde_json::to_string(&value).map_err(|e| Error::invalid(e.to_string()))?;
        log.append_line(&line)?;
        Ok(())
    }

    fn stats_line(&self) -> String {
        let e = self.chat.engine();
        let s = e.stats();
        let cells = match e.budget() {
            Some(b) => format!("cells {}/{b}", e.live_cells()),
            None => format!("cells {} (full cache of {})", e.live_cells(), s.n_ctx),
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

    /// Runs a command; `confirm(question)` asks the user before anything is overwritten.
    fn command(
        &mut self,
        cmd: &str,
        out: &mut dyn Write,
        confirm: &mut dyn FnMut(&str) -> bool,
    ) -> Result<Flow> {
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
                // symlink_metadata: a link counts as existing even when it dangles.
                if std::fs::symlink_metadata(arg).is_ok()
                    && !confirm(&format!("{arg} exists: overwrite it? [y/N] "))
                {
                    let _ = writeln!(out, "[not saved]");
                    return Ok(Flow::Continue);
                }
                let path = Path::new(arg);
                let inputs: Vec<&Path> = self.inputs.iter().map(PathBuf::as_path).collect();
                safe_io::check_output(path, &inputs, false)?;
                safe_io::write_file(path, self.chat.transcript_markdown().as_bytes())?;
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

fn last_turn_text(t: &Reply) -> String {
    format!(
        "last turn: {} + {} tok, peak {} cells, prefill {:.1} tok/s, decode {:.1} tok/s",
        t.stats.prompt_tokens,
        t.tokens,
        t.stats.peak_cells,
        t.stats.prefill_tok_s(),
        t.stats.decode_tok_s()
    )
}

fn piped(session: &mut Session, commands: bool) -> Result<()> {
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
        // A NUL byte cannot reach llama.cpp (C strings); the line is skipped, the rest goes on.
        if raw.contains(&0) {
            eprintln!("qfilters: input line {line_no} contains a NUL byte: skipped");
            continue;
        }
        let line = match std::str::from_utf8(&raw) {
            Ok(s) => s.to_string(),
            Err(_) => {
                eprintln!(
                    "qfilters: input line {line_no} is not valid UTF-8: invalid bytes replaced by U+FFFD"
                );
                String::from_utf8_lossy(&raw).into_owned()
            }
        };
        match classify(&line, commands) {
            Line::Empty => {}
            // A command that fails (unknown, unwritable file) is reported and the script goes on.
            // Piped input cannot answer a question: /save overwrites through the safe writer.
            Line::Command(cmd) => match session.command(&cmd, &mut out, &mut |_| true) {
                Ok(Flow::Quit) => return Ok(()),
                Ok(Flow::Continue) => {
                    let _ = writeln!(out);
                }
                Err(e) => eprintln!("qfilters: input line {line_no}: {e}"),
            },
            Line::Message(m) => {
                if let Err(e) = session.send(&m, &mut out, false) {
                    // A turn that failed half-way leaves the cache out of step with the
                    // transcript: that ends the script. Any other failure (a message the
                    // template or tokenizer refuses) skips the line.
                    if session.chat.needs_reset() {
                        return Err(e);
                    }
                    eprintln!("qfilters: input line {line_no} skipped: {e}");
                }
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
        let mut confirm = |question: &str| matches!(editor.readline(question), Ok(a) if matches!(a.trim(), "y" | "Y" | "yes"));
        let result = match classify(&line, !args.no_commands) {
            Line::Empty => Ok(()),
            Line::Command(cmd) => match session.command(&cmd, &mut out, &mut confirm) {
                Ok(Flow::Quit) => return Ok(()),
                Ok(Flow::Continue) => Ok(()),
                Err(e) => Err(e),
            },
            Line::Message(m) => session.send(&m, &mut out, true).map(|_| ()),
        };
        if let Err(e) = result {
            if e.is_broken_pipe() {
                return Err(e);
            }
            let _ = writeln!(out);
            eprintln!("qfilters: {}", super::name_flags(e));
            if session.chat.needs_reset() {
                session.chat.reset();
                eprintln!("qfilters: the conversation was reset");
            }
        }
    }
}
