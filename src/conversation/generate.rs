//! The one generation loop: prompt in, sampled tokens and their text out, through an
//! [`Engine`]. `run`, `chat` and `bench` use it, and a server slot can: the caller sees each
//! token with its text as it is sampled and may refuse it (a stop string, a closed
//! connection), and the last sampled token is left undecoded, to be decoded first by whatever
//! continues the conversation.

use crate::engine::{Engine, Logits};
use crate::error::{Error, Result};
use crate::ffi::{Sampler, Token};

/// Why generation stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// The model sampled an end-of-generation token (not part of the output, not decoded).
    EndOfGeneration,
    /// `max_tokens` were sampled.
    Limit,
    /// The callback refused a token.
    Interrupted,
}

impl Stop {
    /// `eog`, `limit` or `interrupted`, as reports and JSON name it.
    pub fn as_str(self) -> &'static str {
        match self {
            Stop::EndOfGeneration => "eog",
            Stop::Limit => "limit",
            Stop::Interrupted => "interrupted",
        }
    }
}

impl std::fmt::Display for Stop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// When generation ends besides the callback refusing a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most tokens to sample.
    pub max_tokens: usize,
    /// Sample through end-of-generation tokens as through any other (a benchmark that must
    /// decode exactly `max_tokens`; a server's `ignore_eos`).
    pub ignore_eog: bool,
}

impl Limits {
    /// At most `max_tokens`, ending early at an end-of-generation token.
    pub fn tokens(max_tokens: usize) -> Limits {
        Limits {
            max_tokens,
            ignore_eog: false,
        }
    }
}

/// What one generation produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generation {
    /// The accepted tokens, in order (a refused or end-of-generation token is not among them).
    pub tokens: Vec<Token>,
    /// Their text: every piece the callback accepted, then `tail`.
    pub text: String,
    /// The end of `text` the callback never saw: an unfinished UTF-8 character at the end,
    /// rendered with U+FFFD. Usually empty; a streaming caller prints it after the loop.
    pub tail: String,
    pub stop: Stop,
    /// The last accepted token when it was sampled but not decoded (at the limit decoding it
    /// would only pay off if the text goes on): a caller that continues the conversation
    /// decodes it first, in front of its next input. `None` when the cache holds every
    /// accepted token.
    pub undecoded: Option<Token>,
}

/// A sampled token as the caller sees it, before it is accepted.
#[derive(Clone, Copy)]
pub struct Sampled<'a> {
    pub token: Token,
    /// The text it completes: whole UTF-8 characters only (possibly empty).
    pub piece: &'a str,
    /// The logits it was sampled from (the model's, before any sampler changed them).
    pub logits: &'a [f32],
}

/// A token's log-probability under the model, and the most likely tokens at its place.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token: Token,
    pub logprob: f32,
    /// Most likely first, at most the number asked for.
    pub top: Vec<(Token, f32)>,
}

impl Sampled<'_> {
    /// The log-softmax of the logits at this token, and the `top` most likely tokens
    /// (`top` = 0: none). The model's distribution, before temperature, truncation, penalties
    /// or bias, as llama-server reports it.
    pub fn logprob(&self, top: usize) -> TokenLogprob {
        let max = self
            .logits
            .iter()
            .copied()
            .fold(f32::NEG_INFINITY, f32::max);
        let sum: f64 = self.logits.iter().map(|&x| f64::from(x - max).exp()).sum();
        let norm = f64::from(max) + sum.ln();
        let lp = |x: f32| (f64::from(x) - norm) as f32;
        let mut best: Vec<(Token, f32)> = Vec::with_capacity(top + 1);
        if top > 0 {
            for (id, &x) in self.logits.iter().enumerate() {
                if best.len() == top && best.last().is_some_and(|&(_, b)| x <= b) {
                    continue;
                }
                let at = best.partition_point(|&(_, b)| b >= x);
                best.insert(at, (id as Token, x));
                best.truncate(top);
            }
        }
        let at = |t: Token| usize::try_from(t).ok().and_then(|i| self.logits.get(i));
        TokenLogprob {
            token: self.token,
            logprob: at(self.token).map_or(f32::NEG_INFINITY, |&x| lp(x)),
            top: best.into_iter().map(|(t, x)| (t, lp(x))).collect(),
        }
    }
}

/// Turns token bytes into text as it streams: whole UTF-8 characters only, a character split
/// across tokens held back until it is complete, and bytes that can never form one replaced
/// by U+FFFD (as `String::from_utf8_lossy` would).
#[derive(Debug, Clone, Default)]
pub struct Utf8Pieces {
    pending: Vec<u8>,
}

impl Utf8Pieces {
    /// Adds a token's bytes and returns the text they complete (possibly empty).
    pub fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(s) => {
                    out.push_str(s);
                    self.pending.clear();
                    return out;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    // The first `valid_up_to` bytes are valid UTF-8 by definition.
                    out.push_str(std::str::from_utf8(&self.pending[..valid]).unwrap_or(""));
                    match e.error_len() {
                        // An unfinished character at the end: wait for the next token.
                        None => {
                            self.pending.drain(..valid);
                            return out;
                        }
                        Some(bad) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            self.pending.drain(..valid + bad);
                        }
                    }
                }
            }
        }
    }

    /// The bytes still held back (an unfinished character), rendered with U+FFFD; the
    /// decoder is empty afterwards.
    pub fn finish(&mut self) -> String {
        let rest = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        rest
    }
}

/// Decodes `prompt` (after whatever the engine's cache holds; `progress(done, total)` follows
/// it after each chunk, and returning false stops there with [`Error::Interrupted`], the cache
/// holding part of the prompt: a client that went away should not hold its slot through a long
/// prefill), then samples up to `limits.max_tokens` tokens. Each sampled token is passed to
/// `on_token` with the text it completes; returning false refuses it: the token is dropped,
/// never decoded, and generation stops (`Stop::Interrupted`). Every accepted token but the
/// last is decoded as it is accepted; the last one is decoded too unless generation stopped at
/// the limit, where it is returned as `undecoded`. An empty `prompt` continues from the
/// logits of the engine's last decode.
pub fn generate(
    engine: &mut Engine,
    sampler: &mut Sampler,
    prompt: &[Token],
    limits: Limits,
    progress: &mut dyn FnMut(usize, usize) -> bool,
    on_token: &mut dyn FnMut(&Sampled<'_>) -> bool,
) -> Result<Generation> {
    let total = prompt.len();
    engine.ingest(prompt, Logits::Last, &mut |chunk| {
        if progress(chunk.offset + chunk.len, total) {
            Ok(())
        } else {
            Err(Error::Interrupted)
        }
    })?;
    let model = std::sync::Arc::clone(engine.model());
    let mut pieces = Utf8Pieces::default();
    let mut tokens = Vec::new();
    let mut text = String::new();
    let mut undecoded = None;
    let stop = loop {
        if tokens.len() >= limits.max_tokens {
            break Stop::Limit;
        }
        let token = engine.sample(sampler)?;
        if !limits.ignore_eog && model.is_eog(token) {
            break Stop::EndOfGeneration;
        }
        let held = pieces.clone();
        let piece = pieces.push(&model.token_bytes(token, false));
        let sampled = Sampled {
            token,
            piece: &piece,
            logits: engine.last_logits()?,
        };
        if !on_token(&sampled) {
            // Refused: the text ends before this token, which is never decoded.
            pieces = held;
            break Stop::Interrupted;
        }
        text.push_str(&piece);
        tokens.push(token);
        if tokens.len() >= limits.max_tokens {
            undecoded = Some(token);
            break Stop::Limit;
        }
        engine.step(token)?;
    };
    let tail = pieces.finish();
    text.push_str(&tail);
    Ok(Generation {
        tokens,
        text,
        tail,
        stop,
        undecoded,
    })
}

#[cfg(test)]
mod tests {
    use super::{Sampled, Utf8Pieces};

    #[test]
    fn logprobs_are_the_log_softmax_and_the_top_is_sorted() {
        let logits = [1.0f32, 3.0, 2.0, 3.0, -1.0];
        let s = Sampled {
            token: 2,
            piece: "",
            logits: &logits,
        };
        let lp = s.logprob(3);
        let norm: f64 = logits.iter().map(|&x| f64::from(x).exp()).sum::<f64>().ln();
        assert!((f64::from(lp.logprob) - (2.0 - norm)).abs() < 1e-5);
        let ids: Vec<i32> = lp.top.iter().map(|t| t.0).collect();
        assert_eq!(ids, vec![1, 3, 2]);
        let total: f64 = (0..5)
            .map(|i| f64::from(Sampled { token: i, ..s }.logprob(0).logprob).exp())
            .sum();
        assert!((total - 1.0).abs() < 1e-5, "{total}");
        assert!(s.logprob(0).top.is_empty());
        assert_eq!(s.logprob(9).top.len(), 5);
        // A token outside the logits has no probability.
        assert_eq!(
            Sampled { token: 7, ..s }.logprob(0).logprob,
            f32::NEG_INFINITY
        );
    }

    #[test]
    fn pieces_hold_back_split_characters() {
        let mut p = Utf8Pieces::default();
        // "é" is C3 A9; "€" is E2 82 AC.
        assert_eq!(p.push(b"ab\xC3"), "ab");
        assert_eq!(p.push(b"\xA9"), "é");
        assert_eq!(p.push(b"\xE2\x82"), "");
        assert_eq!(p.push(b"\xAC!"), "€!");
        assert_eq!(p.finish(), "");
    }

    #[test]
    fn pieces_replace_bytes_that_never_form_a_character() {
        let mut p = Utf8Pieces::default();
        // 0xFF is never valid; the text after it is not held back.
        assert_eq!(p.push(b"a\xFFb"), "a\u{FFFD}b");
        // An unfinished character at the end is rendered at finish.
        assert_eq!(p.push(b"\xE2\x82"), "");
        assert_eq!(p.finish(), "\u{FFFD}");
        assert_eq!(p.finish(), "");
    }

    #[test]
    fn pieces_equal_lossy_decoding_of_the_whole() {
        let bytes: &[u8] = b"x\xC3\xA9\xF0\x9F\x98\x80\xC3(\xE2\x82\xACz\xF0\x9F";
        for split in 1..4 {
            let mut p = Utf8Pieces::default();
            let mut text: String = bytes.chunks(split).map(|c| p.push(c)).collect();
            text.push_str(&p.finish());
            assert_eq!(text, String::from_utf8_lossy(bytes), "chunks of {split}");
        }
    }
}
