//! A conversation that lives in a bounded KV cache.
//!
//! Each turn decodes only what is new: the conversation is formatted with the chat template
//! (llama.cpp's built-in template support), and only the part of the formatted text after what
//! the cache already holds is tokenized and decoded: the previous reply's end-of-turn marker, the
//! new user message and the assistant header. The reply is then sampled token by token. The
//! [`Engine`] evicts after every decode, so the cache stays within its budget during the user's
//! message and during the reply alike.

use std::fmt::Write as _;

use crate::engine::{Engine, Stats};
use crate::error::{Error, Result};
use crate::ffi::{apply_chat_template, Model, Sampler, Token};
use crate::generate::Stop;

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
        let fallback = ChatTemplate {
            source: FALLBACK_TEMPLATE.to_string(),
            label: format!("{FALLBACK_TEMPLATE} (fallback)"),
        };
        let Some(source) = candidate else {
            return (
                fallback,
                Some(format!(
                    "the model has no chat template (tokenizer.chat_template): using {FALLBACK_TEMPLATE}; pass --template NAME to choose another"
                )),
            );
        };
        let t = ChatTemplate { source, label };
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
        let t = ChatTemplate {
            source: name.to_string(),
            label: describe(name),
        };
        t.probe()?;
        Ok(t)
    }

    /// Formats `messages` (role, content); `add_assistant` appends the assistant header.
    pub fn format(&self, messages: &[(String, String)], add_assistant: bool) -> Result<String> {
        apply_chat_template(&self.source, messages, add_assistant)
    }

    fn probe(&self) -> Result<()> {
        let probe = [
            ("system".to_string(), "s".to_string()),
            ("user".to_string(), "u".to_string()),
            ("assistant".to_string(), "a".to_string()),
            ("user".to_string(), "v".to_string()),
        ];
        self.format(&probe, true).map(|_| ())
    }
}

fn describe(t: &str) -> String {
    if t.contains("{%") || t.contains("{{") || t.len() > 40 {
        "the given Jinja template".to_string()
    } else {
        format!("template '{t}'")
    }
}

/// Counters of one turn (the engine's are cumulative).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct TurnStats {
    pub turn: usize,
    /// Tokens decoded before the reply: end of the previous turn, the user message, headers.
    pub prompt_tokens: u64,
    pub reply_tokens: u64,
    /// Cells in use after the turn.
    pub live_cells: usize,
    /// Most cells in use at any point of the turn (measured after each decode, before eviction).
    pub peak_cells: usize,
    /// `None` for the full cache (policy `none`).
    pub budget: Option<usize>,
    pub evicted: u64,
    pub evicted_total: u64,
    /// Tokens the conversation has gone through so far (the next position).
    pub positions: i64,
    pub kv_bytes: usize,
    pub prefill_seconds: f64,
    pub decode_seconds: f64,
    pub prefill_tok_s: f64,
    pub decode_tok_s: f64,
    /// `eog`, `limit` or `interrupted`.
    pub stop: &'static str,
}

/// A finished turn.
#[derive(Debug, Clone)]
pub struct Reply {
    pub text: String,
    pub stop: Stop,
    pub stats: TurnStats,
}

/// A conversation with a model through an [`Engine`].
pub struct Chat {
    engine: Engine,
    sampler: Sampler,
    template: ChatTemplate,
    system: Option<String>,
    /// (role, content), system message excluded.
    messages: Vec<(String, String)>,
    /// The formatted text the cache holds (with `pending`), to find what a new turn adds.
    cached_text: String,
    /// Accepted reply tokens not decoded yet: decoded first in the next turn.
    pending: Vec<Token>,
    turns: usize,
    last: Option<TurnStats>,
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
            system: system.filter(|s| !s.is_empty()),
            messages: Vec::new(),
            cached_text: String::new(),
            pending: Vec::new(),
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

    pub fn last_turn(&self) -> Option<&TurnStats> {
        self.last.as_ref()
    }

    /// Forgets the conversation (the system message stays); counters are kept.
    pub fn reset(&mut self) {
        self.engine.reset();
        self.messages.clear();
        self.cached_text.clear();
        self.pending.clear();
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

    /// The whole formatted conversation if `user` were sent now, ending with the assistant
    /// header: what a one-shot completion of this turn would be given.
    pub fn formatted_with(&self, user: &str) -> Result<String> {
        self.template.format(&self.all_messages(Some(user)), true)
    }

    /// The tokens this turn decodes for `user` (before the reply), and the formatted text the
    /// cache will then hold.
    pub fn turn_tokens(&self, user: &str) -> Result<(Vec<Token>, String)> {
        let full = self.formatted_with(user)?;
        let contents: Vec<&str> = if self.cached_text.is_empty() {
            self.system
                .iter()
                .map(String::as_str)
                .chain(std::iter::once(user))
                .collect()
        } else {
            vec![user]
        };
        let tokens = delta_tokens(self.engine.model(), &self.cached_text, &full, &contents)?;
        Ok((tokens, full))
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
        let (new_tokens, full) = self.turn_tokens(user)?;
        let mut tokens = std::mem::take(&mut self.pending);
        tokens.extend_from_slice(&new_tokens);
        let before = self.engine.stats().clone();
        self.engine.reset_peak();
        self.broken = true;
        let (reply_tokens, bytes, stop) =
            self.decode_turn(&tokens, max_tokens, progress, on_text)?;
        self.broken = false;
        let text = String::from_utf8_lossy(&bytes).into_owned();
        self.cached_text = full;
        self.cached_text.push_str(&text);
        self.messages.push(("user".to_string(), user.to_string()));
        self.messages.push(("assistant".to_string(), text.clone()));
        // At the limit the last token was sampled but not decoded (decoding it only pays off
        // if the conversation goes on).
        if stop == Stop::Limit {
            if let Some(&t) = reply_tokens.last() {
                self.pending.push(t);
            }
        }
        self.turns += 1;
        let stats = self.turn_stats(&before, reply_tokens.len(), stop);
        self.last = Some(stats.clone());
        Ok(Reply { text, stop, stats })
    }

    fn decode_turn(
        &mut self,
        tokens: &[Token],
        max_tokens: usize,
        progress: &mut dyn FnMut(usize, usize),
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<(Vec<Token>, Vec<u8>, Stop)> {
        let total = tokens.len();
        let last = total.saturating_sub(1);
        let mut index = 0;
        self.engine
            .ingest(tokens, &mut |i| i == last, &mut |_, offset, len| {
                progress(offset + len, total);
                index = len.saturating_sub(1);
                Ok(())
            })?;
        let model = std::sync::Arc::clone(self.engine.model());
        let mut out = Vec::new();
        let mut bytes: Vec<u8> = Vec::new();
        let mut emitted = 0;
        let stop = loop {
            if out.len() >= max_tokens {
                break Stop::Limit;
            }
            let token = self.sampler.sample(self.engine.context(), index);
            if model.is_eog(token) {
                break Stop::EndOfGeneration;
            }
            out.push(token);
            bytes.extend(model.token_bytes(token, false));
            let valid = match std::str::from_utf8(&bytes[emitted..]) {
                Ok(s) => s.len(),
                Err(e) => e.valid_up_to(),
            };
            let piece = std::str::from_utf8(&bytes[emitted..emitted + valid]).unwrap_or("");
            if !on_text(piece) {
                // Refused: the reply ends before this token, which is never decoded.
                out.pop();
                bytes.truncate(emitted);
                break Stop::Interrupted;
            }
            emitted += valid;
            if out.len() >= max_tokens {
                break Stop::Limit;
            }
            self.engine.step(token)?;
            index = 0;
        };
        if emitted < bytes.len() {
            on_text(&String::from_utf8_lossy(&bytes[emitted..]));
        }
        Ok((out, bytes, stop))
    }

    fn turn_stats(&self, before: &Stats, reply_tokens: usize, stop: Stop) -> TurnStats {
        let s = self.engine.stats();
        let prompt_tokens = s.prompt_tokens - before.prompt_tokens;
        let generated = s.generated_tokens - before.generated_tokens;
        let prefill_seconds = s.prefill_seconds - before.prefill_seconds;
        let decode_seconds = s.decode_seconds - before.decode_seconds;
        TurnStats {
            turn: self.turns,
            prompt_tokens,
            reply_tokens: reply_tokens as u64,
            live_cells: s.live_cells,
            peak_cells: s.peak_cells,
            budget: self.engine.budget(),
            evicted: s.evicted - before.evicted,
            evicted_total: s.evicted,
            positions: i64::from(self.engine.next_position()),
            kv_bytes: s.kv_bytes,
            prefill_seconds,
            decode_seconds,
            prefill_tok_s: rate(prompt_tokens, prefill_seconds),
            decode_tok_s: rate(generated, decode_seconds),
            stop: match stop {
                Stop::EndOfGeneration => "eog",
                Stop::Limit => "limit",
                Stop::Interrupted => "interrupted",
            },
        }
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

fn rate(n: u64, secs: f64) -> f64 {
    if secs > 0.0 {
        n as f64 / secs
    } else {
        0.0
    }
}

/// Length of the longest common prefix of `a` and `b`, on a character boundary of `a`.
fn common_prefix(a: &str, b: &str) -> usize {
    let mut n = a.bytes().zip(b.bytes()).take_while(|(x, y)| x == y).count();
    while !a.is_char_boundary(n) {
        n -= 1;
    }
    n
}

/// The tokens that bring a cache holding the formatted text `cached` to `full`: the part of
/// `full` after their common prefix, with BOS first when the cache is empty and the model wants
/// one. `contents` are the messages in that part, tokenized as plain text.
///
/// Templates that rewrite earlier turns (trimming a reply, say) break the prefix; the turn then
/// continues from where the texts differ, the cache keeping the old version.
pub fn delta_tokens(
    model: &Model,
    cached: &str,
    full: &str,
    contents: &[&str],
) -> Result<Vec<Token>> {
    let start = common_prefix(full, cached);
    let mut tokens = tokenize_turn(model, &full[start..], contents)?;
    if cached.is_empty() && model.add_bos() {
        if let Some(bos) = model.bos() {
            if tokens.first() != Some(&bos) {
                tokens.insert(0, bos);
            }
        }
    }
    Ok(tokens)
}

/// Tokenizes formatted template text: the template's own text with special tokens parsed, the
/// message `contents` (found in order) as plain text, so that a user typing `<|im_end|>` gets
/// the characters, not the control token. When a content cannot be found verbatim (a template
/// that rewrites messages), the rest is tokenized as template text.
pub fn tokenize_turn(model: &Model, text: &str, contents: &[&str]) -> Result<Vec<Token>> {
    let mut tokens = Vec::new();
    let mut cursor = 0;
    for content in contents.iter().filter(|c| !c.is_empty()) {
        let Some(found) = text[cursor..].find(content) else {
            break;
        };
        let start = cursor + found;
        tokens.extend(model.tokenize(&text[cursor..start], false, true)?);
        tokens.extend(model.tokenize(content, false, false)?);
        cursor = start + content.len();
    }
    tokens.extend(model.tokenize(&text[cursor..], false, true)?);
    Ok(tokens)
}

#[cfg(test)]
mod tests {
    use super::common_prefix;

    #[test]
    fn common_prefix_respects_char_boundaries() {
        assert_eq!(common_prefix("abc", "abd"), 2);
        assert_eq!(common_prefix("abc", ""), 0);
        assert_eq!(common_prefix("abc", "abcdef"), 3);
        // "é" is two bytes sharing the first with "è".
        assert_eq!(common_prefix("aé", "aè"), 1);
    }
}
