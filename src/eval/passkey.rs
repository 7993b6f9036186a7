//! Passkey retrieval: a 5-digit key hidden at a given depth of filler text, asked for at the
//! end. The whole document (question included) goes through the engine under the policy; the
//! answer is then read greedily and scored under teacher forcing, still under the policy.

use std::ops::Range;

use crate::engine::{Engine, Logits};
use crate::error::{Error, Result};
use crate::ffi::{apply_chat_template, Model, Token};
use crate::math::{argmax, log_prob, splitmix64};

const INTRO: &str = "There is an important piece of information hidden inside a lot of irrelevant text. Find it and memorize it, I will ask you about it.\n\n";
const QUESTION: &str = "\n\nWhat is the pass key? The pass key is";
/// Chat format: the question closes the user turn, the assistant's reply is started for it.
/// Measured on SmolLM2-135M-Instruct, full cache, 1024 tokens: "What is the pass key?" alone
/// gets " a" (as in "a 5-digit number") instead of the digits; asking for the number only
/// gets the digits.
const CHAT_QUESTION: &str = "\n\nWhat is the pass key? Answer with the number only.";
const CHAT_REPLY: &str = "The pass key is";
/// Stands for the document inside the rendered template, to split it around the document.
const MARKER: &str = "QFILTERSDOCUMENTMARKER";

/// How the document and question are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PromptFormat {
    /// Plain text ending "What is the pass key? The pass key is". Base models.
    Plain,
    /// The model's chat template: document and question as the user message, the assistant
    /// reply started with "The pass key is". Instruction-tuned models; SmolLM2-Instruct
    /// answers the plain format with " the" instead of the digits.
    Chat,
}

impl std::str::FromStr for PromptFormat {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "plain" => Ok(PromptFormat::Plain),
            "chat" => Ok(PromptFormat::Chat),
            _ => Err(Error::invalid(format!(
                "unknown prompt format '{s}' (known: chat, plain)"
            ))),
        }
    }
}

impl std::fmt::Display for PromptFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PromptFormat::Plain => "plain",
            PromptFormat::Chat => "chat",
        })
    }
}

/// Tokens before the document and after it (question and answer start included).
fn frame(model: &Model, format: PromptFormat) -> Result<(Vec<Token>, Vec<Token>)> {
    match format {
        PromptFormat::Plain => Ok((
            model.tokenize(INTRO, true, false)?,
            model.tokenize(QUESTION, false, false)?,
        )),
        PromptFormat::Chat => {
            let tmpl = model.chat_template().ok_or_else(|| {
                Error::invalid("the model has no chat template: use --format plain")
            })?;
            let user = format!("{INTRO}{MARKER}{CHAT_QUESTION}");
            let text = apply_chat_template(&tmpl, &[("user".into(), user)], true)?;
            let at = text
                .find(MARKER)
                .ok_or_else(|| Error::Template("the template dropped the user message".into()))?;
            let (pre, post) = (&text[..at], &text[at + MARKER.len()..]);
            Ok((
                model.tokenize(pre, true, true)?,
                model.tokenize(&format!("{post}{CHAT_REPLY}"), false, true)?,
            ))
        }
    }
}

fn key_sentence(key: u32) -> String {
    format!("The pass key is {key}. Remember it. {key} is the pass key.\n")
}

/// One synthetic document and the answer it asks for.
#[derive(Debug, Clone)]
pub struct PasskeyDoc {
    pub tokens: Vec<Token>,
    /// The key's tokens as the model would continue after the question (" 48213").
    pub answer: Vec<Token>,
    pub key: u32,
    /// Index of the first token of the key sentence in `tokens`.
    pub key_at: usize,
    /// Positions of the key's first occurrence in `tokens` (the answer's tokens inside the key
    /// sentence; the whole sentence where the tokenizer split the digits otherwise).
    pub key_span: Range<usize>,
}

/// Builds a document of exactly `length` tokens: intro, filler from a seeded random line of
/// `filler`, the key sentence at `depth` (0 = start of the filler, 1 = end), more filler, the
/// question.
pub fn build_document(
    model: &Model,
    filler: &str,
    length: usize,
    depth: f64,
    format: PromptFormat,
    rng: &mut u64,
) -> Result<PasskeyDoc> {
    if !(0.0..=1.0).contains(&depth) {
        return Err(Error::invalid(format!(
            "depth {depth} is not within [0, 1]"
        )));
    }
    let key = 10_000 + (splitmix64(rng) % 90_000) as u32;
    let (intro, question) = frame(model, format)?;
    let sentence = model.tokenize(&key_sentence(key), false, false)?;
    let answer = model.tokenize(&format!(" {key}"), false, false)?;
    let fixed = intro.len() + sentence.len() + question.len();
    let n_filler = length
        .checked_sub(fixed)
        .filter(|&n| n > 0)
        .ok_or_else(|| {
            Error::invalid(format!(
                "length {length} leaves no room for filler (the fixed text takes {fixed} tokens)"
            ))
        })?;
    if filler.trim().is_empty() {
        return Err(Error::invalid("the filler text is empty"));
    }
    // Enough characters for n_filler tokens (English averages ~4 characters a token), taken
    // from a random line start, wrapping around a short filler.
    let want_chars = n_filler * 8 + 64;
    let start = (splitmix64(rng) % filler.len() as u64) as usize;
    let start = filler[..]
        .char_indices()
        .map(|(i, _)| i)
        .find(|&i| i >= start)
        .unwrap_or(0);
    let start = filler[start..]
        .find('\n')
        .map(|i| start + i + 1)
        .filter(|&i| i < filler.len())
        .unwrap_or(0);
    let mut text = String::with_capacity(want_chars + filler.len());
    text.push_str(&filler[start..]);
    while text.len() < want_chars {
        text.push_str(filler);
    }
    let mut body = model.tokenize(&text, false, false)?;
    if body.len() < n_filler {
        return Err(Error::invalid(
            "the filler text tokenizes to too few tokens",
        ));
    }
    body.truncate(n_filler);
    // Put the key after a line break near the requested depth so it reads as its own line.
    let target = ((depth * n_filler as f64).round() as usize).min(n_filler);
    let split = (target..n_filler.min(target + 64))
        .find(|&i| i > 0 && model.token_bytes(body[i - 1], false).ends_with(b"\n"))
        .unwrap_or(target);
    let mut tokens = Vec::with_capacity(length);
    tokens.extend_from_slice(&intro);
    tokens.extend_from_slice(&body[..split]);
    let key_at = tokens.len();
    let key_span = sentence
        .windows(answer.len())
        .position(|w| w == answer.as_slice())
        .map(|i| key_at + i..key_at + i + answer.len())
        .unwrap_or(key_at..key_at + sentence.len());
    tokens.extend_from_slice(&sentence);
    tokens.extend_from_slice(&body[split..]);
    tokens.extend_from_slice(&question);
    Ok(PasskeyDoc {
        tokens,
        answer,
        key,
        key_at,
        key_span,
    })
}

/// What the model answered for one document.
#[derive(Debug, Clone)]
pub struct TrialOutcome {
    /// Greedy decoding reproduces the key's tokens exactly.
    pub exact: bool,
    /// Mean NLL per answer token under teacher forcing.
    pub answer_nll: f64,
    /// Greedy text up to and including the first wrong token.
    pub greedy: String,
    pub peak_cells: usize,
    /// When the question has been read: per tracked layer, the share of (KV head, key token)
    /// slots that still hold the key (see [`key_survival`]); `None` for a cache that never
    /// evicts.
    pub key_kept: Option<Vec<f64>>,
}

/// Per tracked layer of `engine`'s book, the share of (KV head, position in `span`) slots that
/// hold their token now: 1 when every head of that layer still has all of the key, 0 when none
/// has any of it. `None` without a book (the full cache keeps everything). This is what tells
/// "the policy evicted the key" from "the model could not use it".
pub fn key_survival(engine: &Engine, span: &Range<usize>) -> Option<Vec<f64>> {
    let book = engine.book()?;
    let want = (book.n_head() * span.len()).max(1) as f64;
    Some(
        book.layers()
            .map(|layer| {
                let held = (0..book.n_head())
                    .flat_map(|head| {
                        (0..book.n_cells())
                            .filter_map(move |cell| book.slot_position(layer, head, cell))
                    })
                    .filter(|&p| usize::try_from(p).is_ok_and(|p| span.contains(&p)))
                    .count();
                held as f64 / want
            })
            .collect(),
    )
}

/// Runs one document through `engine` from an empty cache, then teacher-forces the answer.
///
/// Greedy decoding follows the teacher-forced path for as long as the argmax equals the true
/// token, so "greedy reproduces the key" is read from the same pass: exact match means the
/// argmax was right at every answer token.
pub fn run_trial(engine: &mut Engine, doc: &PasskeyDoc) -> Result<TrialOutcome> {
    if doc.answer.is_empty() || doc.tokens.is_empty() {
        return Err(Error::invalid("empty passkey document"));
    }
    engine.reset();
    engine.ingest(&doc.tokens, Logits::Last, &mut |_| Ok(()))?;
    let key_kept = key_survival(engine, &doc.key_span);
    let mut logits: Vec<f32> = engine.last_logits()?.to_vec();
    let model = std::sync::Arc::clone(engine.model());
    let mut nll = 0.0;
    let mut exact = true;
    let mut greedy: Vec<Token> = Vec::new();
    for (t, &want) in doc.answer.iter().enumerate() {
        nll -= log_prob(&logits, want as usize);
        let got = argmax(&logits) as Token;
        if exact {
            greedy.push(got);
            if got != want {
                exact = false;
            }
        }
        if t + 1 < doc.answer.len() {
            engine.step(want)?;
            logits.clear();
            logits.extend_from_slice(engine.last_logits()?);
        }
    }
    Ok(TrialOutcome {
        exact,
        answer_nll: nll / doc.answer.len() as f64,
        greedy: model.detokenize(&greedy, false),
        peak_cells: engine.stats().peak_cells,
        key_kept,
    })
}
