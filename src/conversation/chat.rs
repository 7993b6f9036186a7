//! A conversation that lives in a bounded KV cache.
//!
//! Each turn decodes only what is new: the conversation is formatted with the chat template
//! (llama.cpp's built-in template support) as segments of template text and message contents
//! ([`ChatTemplate::segments`]), and only the tokens after what the cache already holds are
//! decoded ([`crate::conversation::delta`], the rule the server follows too): the previous
//! reply's end-of-turn marker, the new user message and the assistant header. Template text is
//! tokenized with special tokens parsed, contents never. The reply is then sampled token by
//! token. The
//! [`Engine`] evicts after every decode, so the cache stays within its budget during the user's
//! message and during the reply alike.

use std::fmt::Write as _;

use crate::conversation::delta::{self, History, Plan};
use crate::conversation::generate::{generate, Limits, Stop};
use crate::engine::{Engine, Stats};
use crate::error::{Error, Result};
use crate::ffi::{apply_chat_template, Model, Sampler, Token};

/// The template used when the model has none, or one llama.cpp cannot apply. ChatML is also
/// llama.cpp's own fallback, and many small instruct models were tuned on it.
pub const FALLBACK_TEMPLATE: &str = "chatml";

/// A chat template llama.cpp can apply: a built-in name (`chatml`, `llama3`, ...) or the Jinja
/// source of a GGUF, which llama.cpp recognises by its markers.
#[derive(Debug, Clone)]
pub struct ChatTemplate {
    source: String,
    /// Where it came from, for messages: "the model's template", "chatml", ...
    pub label: String,
    /// What the template does to the whitespace at the ends of each role's content, measured
    /// by [`ChatTemplate::probe`].
    trims: Trims,
}

/// Whether a template trims leading / trailing whitespace of a message, per role.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Trim {
    leading: bool,
    trailing: bool,
}

#[derive(Debug, Clone, Copy, Default)]
struct Trims {
    system: Trim,
    user: Trim,
    assistant: Trim,
}

impl Trims {
    fn of(&self, role: &str) -> Trim {
        match role {
            "system" => self.system,
            "assistant" => self.assistant,
            _ => self.user,
        }
    }
}

/// One piece of a formatted conversation: the template's own text (tokenized with special
/// tokens parsed, so its markers become control tokens) or a message's content (tokenized as
/// plain text, so nothing a user types becomes a control token).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    pub text: String,
    pub content: bool,
}

/// The whitespace llama.cpp's templates trim: C `isspace` in the "C" locale (Rust's
/// `is_ascii_whitespace` leaves out the vertical tab).
pub(crate) fn is_c_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\u{0b}' | '\u{0c}' | '\r')
}

fn apply_trim(text: &str, trim: Trim) -> &str {
    let mut t = text;
    if trim.leading {
        t = t.trim_start_matches(is_c_space);
    }
    if trim.trailing {
        t = t.trim_end_matches(is_c_space);
    }
    t
}

impl ChatTemplate {
    /// The template given by `requested` (a name or Jinja source), else the model's; falls back
    /// to [`FALLBACK_TEMPLATE`] when there is none or llama.cpp cannot apply it. The second
    /// value is a one-line notice for the user when a fallback happened.
    pub fn resolve(model: &Model, requested: Option<&str>) -> (ChatTemplate, Option<String>) {
        let (candidate, label) = match requested {
            Some(t) => (Some(t.to_string()), describe(t)),
            None => (
                model.chat_template(),
                "the model's chat template".to_string(),
            ),
        };
        let mut fallback = ChatTemplate {
            source: FALLBACK_TEMPLATE.to_string(),
            label: format!("{FALLBACK_TEMPLATE} (fallback)"),
            trims: Trims::default(),
        };
        // ChatML keeps contents verbatim; probing it cannot fail.
        let _ = fallback.probe();
        let Some(source) = candidate else {
            return (
                fallback,
                Some(format!(
                    "the model has no chat template (tokenizer.chat_template): using {FALLBACK_TEMPLATE}; pass --template NAME to choose another"
                )),
            );
        };
        let mut t = ChatTemplate {
            source,
            label,
            trims: Trims::default(),
        };
        match t.probe() {
            Ok(()) => (t, None),
            Err(_) => {
                let notice = format!(
                    "llama.cpp does not support {}: using {FALLBACK_TEMPLATE}; pass --template NAME (chatml, llama3, mistral-v7, gemma, phi3, ...) to choose another",
                    t.label
                );
                (fallback, Some(notice))
            }
        }
    }

    pub fn named(name: &str) -> Result<ChatTemplate> {
        let mut t = ChatTemplate {
            source: name.to_string(),
            label: describe(name),
            trims: Trims::default(),
        };
        t.probe()?;
        Ok(t)
    }

    /// Formats `messages` (role, content); `add_assistant` appends the assistant header.
    pub fn format(&self, messages: &[(String, String)], add_assistant: bool) -> Result<String> {
        apply_chat_template(&self.source, messages, add_assistant)
    }

    /// Checks that llama.cpp can apply the template, and measures what it does to the
    /// whitespace at the ends of each role's content: every message of a probe conversation
    /// is rendered once as a bare placeholder and once padded with whitespace, and the two
    /// renderings show whether the padding survived. Templates that do anything else to a
    /// message's ends are refused (the caller falls back to ChatML).
    fn probe(&mut self) -> Result<()> {
        const PAD_LEAD: &str = " \t\n\u{0b}\u{0c}\r ";
        const PAD_TRAIL: &str = " \r\n\t ";
        let roles = ["system", "user", "assistant", "user"];
        let base = sentinel_base(&[&self.source]);
        let bare: Vec<(String, String)> = roles
            .iter()
            .enumerate()
            .map(|(i, r)| (r.to_string(), sentinel(&base, i)))
            .collect();
        let plain = self.format(&bare, true)?;
        let mut found: Vec<(&str, Trim)> = Vec::new();
        for (i, role) in roles.iter().enumerate() {
            let s = sentinel(&base, i);
            let mut padded = bare.clone();
            padded[i].1 = format!("{PAD_LEAD}{s}{PAD_TRAIL}");
            let rendered = self.format(&padded, true)?;
            let trim = [(false, false), (true, false), (false, true), (true, true)]
                .into_iter()
                .map(|(leading, trailing)| Trim { leading, trailing })
                .find(|&t| {
                    let kept = apply_trim(&padded[i].1, t);
                    plain.replacen(&s, kept, 1) == rendered
                })
                .ok_or_else(|| {
                    Error::Template(format!(
                        "{} changes the {role} message in a way qfilters cannot tokenize safely: pass --template chatml (or another built-in name)",
                        self.label
                    ))
                })?;
            if let Some((_, earlier)) = found.iter().find(|(r, _)| r == role) {
                if *earlier != trim {
                    return Err(Error::Template(format!(
                        "{} trims {role} messages inconsistently: pass --template chatml (or another built-in name)",
                        self.label
                    )));
                }
            }
            found.push((role, trim));
        }
        for (role, trim) in found {
            match role {
                "system" => self.trims.system = trim,
                "assistant" => self.trims.assistant = trim,
                _ => self.trims.user = trim,
            }
        }
        Ok(())
    }

    /// The formatted conversation as template text and message contents, by construction:
    /// llama.cpp formats the conversation with a unique placeholder in place of each content
    /// (random, checked absent from every content and from the template), the result is split
    /// at the placeholders, and each content goes in its slot with the template's own trimming
    /// applied. The joined segments are checked to equal llama.cpp's formatting of the real
    /// messages, so the split is exact or an error, never a guess.
    pub fn segments(
        &self,
        messages: &[(String, String)],
        add_assistant: bool,
    ) -> Result<Vec<Segment>> {
        let mut avoid: Vec<&str> = messages.iter().map(|(_, c)| c.as_str()).collect();
        avoid.push(&self.source);
        let base = sentinel_base(&avoid);
        let placeholders: Vec<(String, String)> = messages
            .iter()
            .enumerate()
            .map(|(i, (r, _))| (r.clone(), sentinel(&base, i)))
            .collect();
        let rendered = self.format(&placeholders, add_assistant)?;
        let unsafe_split = || {
            Error::Template(format!(
                "{} does not place each message exactly once: qfilters cannot tokenize it safely; pass --template chatml (or another built-in name)",
                self.label
            ))
        };
        if rendered.matches(base.as_str()).count() != messages.len() {
            return Err(unsafe_split());
        }
        let mut segments = Vec::with_capacity(2 * messages.len() + 1);
        let mut cursor = 0;
        for (i, (role, content)) in messages.iter().enumerate() {
            let s = sentinel(&base, i);
            let at = rendered[cursor..]
                .find(&s)
                .map(|p| cursor + p)
                .ok_or_else(unsafe_split)?;
            segments.push(Segment {
                text: rendered[cursor..at].to_string(),
                content: false,
            });
            segments.push(Segment {
                text: apply_trim(content, self.trims.of(role)).to_string(),
                content: true,
            });
            cursor = at + s.len();
        }
        segments.push(Segment {
            text: rendered[cursor..].to_string(),
            content: false,
        });
        let joined: String = segments.iter().map(|s| s.text.as_str()).collect();
        if joined != self.format(messages, add_assistant)? {
            return Err(Error::Template(format!(
                "{} formats these messages differently from its placeholders: qfilters cannot tokenize them safely; pass --template chatml (or another built-in name)",
                self.label
            )));
        }
        segments.retain(|s| !s.text.is_empty());
        Ok(segments)
    }
}

/// A random placeholder stem absent from every string of `avoid`. Randomness keeps a hostile
/// message from predicting it; the check makes a clash impossible rather than unlikely.
pub(crate) fn sentinel_base(avoid: &[&str]) -> String {
    use std::hash::{BuildHasher, Hasher};
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    loop {
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let mut words = [0u64; 2];
        for (k, w) in words.iter_mut().enumerate() {
            // RandomState is seeded from the OS once per process and differs per instance.
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u128(nanos);
            h.write_u64(n);
            h.write_usize(k);
            *w = h.finish();
        }
        let base = format!("qfSlot{:016x}{:016x}n", words[0], words[1]);
        if avoid.iter().all(|a| !a.contains(&base)) {
            return base;
        }
    }
}

/// The placeholder of message `i`: no whitespace at its ends, so no template trims it, and
/// the closing `q` keeps `...n1q` from matching inside `...n10q`.
pub(crate) fn sentinel(base: &str, i: usize) -> String {
    format!("{base}{i}q")
}

fn describe(t: &str) -> String {
    if t.contains("{%") || t.contains("{{") || t.len() > 40 {
        "the given Jinja template".to_string()
    } else {
        format!("template '{t}'")
    }
}

/// A finished turn.
#[derive(Debug, Clone)]
pub struct Reply {
    pub text: String,
    pub stop: Stop,
    /// The turn's number, from 1 (a reset does not restart it).
    pub turn: usize,
    /// Tokens of the reply, a last one left undecoded for the next turn included.
    pub tokens: usize,
    /// The engine's counters over the turn ([`Stats::since`] its start): `prompt_tokens` is
    /// what was decoded before the reply (end of the previous turn, the user message,
    /// headers), `peak_cells` the most cells in use during the turn.
    pub stats: Stats,
}

/// A conversation with a model through an [`Engine`].
pub struct Chat {
    engine: Engine,
    sampler: Sampler,
    template: ChatTemplate,
    system: Option<String>,
    /// (role, content), system message excluded.
    messages: Vec<(String, String)>,
    /// What the cache has ingested, to find what a new turn adds (a reply token left
    /// undecoded at the limit included).
    history: History,
    /// The tokens the last turn decoded before its reply, as given to the engine.
    last_prompt: Vec<Token>,
    turns: usize,
    last: Option<Reply>,
    /// Set when a turn failed half-way: the cache no longer matches the transcript.
    broken: bool,
}

impl Chat {
    pub fn new(
        engine: Engine,
        sampler: Sampler,
        template: ChatTemplate,
        system: Option<String>,
    ) -> Chat {
        Chat {
            engine,
            sampler,
            template,
            // A blank system message is none: templates that trim it drop it altogether.
            system: system.filter(|s| !s.trim_matches(is_c_space).is_empty()),
            messages: Vec::new(),
            history: History::default(),
            last_prompt: Vec::new(),
            turns: 0,
            last: None,
            broken: false,
        }
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    pub fn template(&self) -> &ChatTemplate {
        &self.template
    }

    pub fn messages(&self) -> &[(String, String)] {
        &self.messages
    }

    pub fn turns(&self) -> usize {
        self.turns
    }

    /// True after a turn failed half-way: the cache no longer matches the transcript.
    pub fn needs_reset(&self) -> bool {
        self.broken
    }

    /// The token ids the last turn sent to llama.cpp before sampling its reply (a reply token
    /// left over by `-n` first, then the new template text and message).
    pub fn last_prompt_tokens(&self) -> &[Token] {
        &self.last_prompt
    }

    pub fn last_turn(&self) -> Option<&Reply> {
        self.last.as_ref()
    }

    /// Forgets the conversation (the system message stays); counters are kept.
    pub fn reset(&mut self) {
        self.engine.reset();
        self.messages.clear();
        self.history = History::default();
        self.broken = false;
    }

    fn all_messages(&self, next_user: Option<&str>) -> Vec<(String, String)> {
        let mut all = Vec::with_capacity(self.messages.len() + 2);
        if let Some(s) = &self.system {
            all.push(("system".to_string(), s.clone()));
        }
        all.extend(self.messages.iter().cloned());
        if let Some(u) = next_user {
            all.push(("user".to_string(), u.to_string()));
        }
        all
    }

    /// How the cache takes the conversation with `user` sent now ([`delta::plan`]): its
    /// tokens, and which of them this turn decodes before the reply.
    pub fn turn_plan(&self, user: &str) -> Result<Plan> {
        let full = self
            .template
            .segments(&self.all_messages(Some(user)), true)?;
        let prompt = delta::parts(self.engine.model(), full)?;
        Ok(delta::plan(&self.history, &prompt))
    }

    /// The segments whose tokens this turn decodes for `user` (after BOS on the first turn, and
    /// a reply token left over by `-n`).
    pub fn turn_segments(&self, user: &str) -> Result<Vec<Segment>> {
        Ok(self
            .turn_plan(user)?
            .added()
            .iter()
            .map(|p| p.segment.clone())
            .filter(|s| !s.text.is_empty())
            .collect())
    }

    /// Sends `user` and samples the reply, at most `max_tokens` tokens. `progress(done, total)`
    /// follows the decoding of the message; `on_text` gets the reply in pieces of whole UTF-8
    /// characters, one call per token (possibly empty); returning false refuses that piece and
    /// ends the reply before it.
    pub fn turn(
        &mut self,
        user: &str,
        max_tokens: usize,
        progress: &mut dyn FnMut(usize, usize),
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<Reply> {
        if self.broken {
            return Err(Error::invalid(
                "the conversation was left incomplete by an earlier error: reset it (/reset)",
            ));
        }
        if user.is_empty() {
            return Err(Error::invalid("empty message"));
        }
        let plan = self.turn_plan(user)?;
        self.broken = true;
        if !plan.reuse && !self.history.tokens.is_empty() {
            // The template rendered the conversation the cache holds differently: decoding the
            // rest after it would show the model a conversation nobody wrote (delta.rs).
            self.engine.reset();
        }
        let tokens = plan.new_tokens();
        self.last_prompt = tokens.to_vec();
        let before = self.engine.stats().clone();
        self.engine.reset_peak();
        let gen = generate(
            &mut self.engine,
            &mut self.sampler,
            tokens,
            Limits::tokens(max_tokens),
            &mut |done, total| {
                progress(done, total);
                true
            },
            &mut |s| on_text(s.piece),
        )?;
        if !gen.tail.is_empty() {
            on_text(&gen.tail);
        }
        self.broken = false;
        // The reply's tokens were sampled, not tokenized: the cache holds exactly them, and the
        // next turn compares the template's rendering of the reply with this text. At the
        // limit the last token was sampled but not decoded: the next turn decodes it first.
        self.history = plan.history_after(&gen.text, &gen.tokens, gen.undecoded.is_some());
        self.messages.push(("user".to_string(), user.to_string()));
        self.messages
            .push(("assistant".to_string(), gen.text.clone()));
        self.turns += 1;
        let reply = Reply {
            text: gen.text,
            stop: gen.stop,
            turn: self.turns,
            tokens: gen.tokens.len(),
            stats: self.engine.stats().since(&before),
        };
        self.last = Some(reply.clone());
        Ok(reply)
    }

    /// The transcript as Markdown.
    pub fn transcript_markdown(&self) -> String {
        let mut md = String::from("# Chat transcript\n\n");
        if let Some(s) = &self.system {
            let _ = writeln!(md, "**System:** {}\n", s.trim_end());
        }
        for (role, content) in &self.messages {
            let who = if role == "user" { "User" } else { "Assistant" };
            let _ = writeln!(md, "**{who}:** {}\n", content.trim_end());
        }
        md
    }
}

/// Tokenizes segments: template text with special tokens parsed, contents as plain text.
/// Returns each segment's tokens, in order, so a caller can check which ids came from where.
pub fn tokenize_segments(model: &Model, segments: &[Segment]) -> Result<Vec<Vec<Token>>> {
    segments
        .iter()
        .map(|s| {
            let tokens = model.tokenize(&s.text, false, !s.content)?;
            // llama.cpp never yields a control token for text tokenized without special
            // parsing; checked anyway, because the whole guarantee rests on it.
            if s.content && tokens.iter().any(|&t| model.is_control(t)) {
                return Err(Error::Tokenize(
                    "a message's text was tokenized into a control token".into(),
                ));
            }
            Ok(tokens)
        })
        .collect()
}
