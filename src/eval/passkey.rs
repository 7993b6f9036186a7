//! Retrieval under compression: a passkey (a 5-digit key in filler text) or a needle (a prose
//! sentence in prose filler; several for the multi-key variant, one of them asked), asked for
//! at the end. The whole document (question included) goes through the engine under the
//! policy; the answer is then read greedily, still under the policy: a passkey must come out
//! exactly (and its NLL is taken under teacher forcing), a needle's answer must be contained in
//! the greedy reply (a model may word its reply around it).

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

/// Needles: "The best thing to do in CITY is to ACTIVITY." (after the Paul Graham haystack
/// test's San Francisco sentence), a city and an activity drawn per document. Every activity
/// is a distinct phrase, so a reply that contains it names that needle and no other.
const CITIES: &[&str] = &[
    "Lisbon",
    "Oslo",
    "Nairobi",
    "Lima",
    "Hanoi",
    "Tbilisi",
    "Quebec",
    "Dublin",
    "Kyoto",
    "Valparaiso",
    "Tallinn",
    "Marrakesh",
    "Reykjavik",
    "Cusco",
    "Porto",
    "Krakow",
    "Bergen",
    "Seville",
    "Zanzibar",
    "Bruges",
    "Ljubljana",
    "Salzburg",
    "Hobart",
    "Windhoek",
];
const ACTIVITIES: &[&str] = &[
    "eat a sandwich in the harbour park",
    "ride the blue tram to the last stop",
    "climb the old clock tower at noon",
    "swim in the cold lake at dawn",
    "buy warm bread at the corner bakery",
    "listen to the street musicians by the fountain",
    "visit the glass museum on a rainy day",
    "walk along the river at sunset",
    "play chess with strangers in the main square",
    "drink mint tea on the hill above the market",
    "fly a red kite on the long beach",
    "feed the ducks in the botanical garden",
    "paint the stone bridge from the south bank",
    "dance at the night market on Fridays",
    "watch the fishing boats come in",
    "sail a small boat to the lighthouse",
    "pick apples in the orchard outside town",
    "collect shells on the northern shore",
    "read old maps in the public library",
    "ring the bell of the white chapel",
    "cycle around the lake before breakfast",
    "sing in the choir of the harbour church",
    "bake pies with the baker on Sundays",
    "count the stars from the observatory roof",
];

/// What a document hides and how its answer is scored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Task {
    /// A 5-digit key in a two-sentence line; exact match of the digits.
    Passkey,
    /// `needles` prose sentences about as many cities, one asked; its activity must be
    /// contained in the greedy reply.
    Needle { needles: usize },
}

impl Task {
    /// The most needles a document can hold (each city and activity at most once).
    pub const MAX_NEEDLES: usize = CITIES.len();

    pub fn name(&self) -> String {
        match self {
            Task::Passkey => "passkey".into(),
            Task::Needle { needles: 1 } => "needle".into(),
            Task::Needle { needles } => format!("needle-{needles}"),
        }
    }

    /// Whether the answer is scored by containment in a free greedy reply (else exact match
    /// under teacher forcing).
    fn contains_match(&self) -> bool {
        matches!(self, Task::Needle { .. })
    }
}

/// The question of a document, in both layouts.
struct Ask {
    /// Plain text after the document, ending where the answer starts.
    plain: String,
    /// Chat: closes the user turn.
    chat_question: String,
    /// Chat: starts the assistant's reply, ending where the answer starts.
    chat_reply: String,
}

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
fn frame(model: &Model, format: PromptFormat, ask: &Ask) -> Result<(Vec<Token>, Vec<Token>)> {
    match format {
        PromptFormat::Plain => Ok((
            model.tokenize(INTRO, true, false)?,
            model.tokenize(&ask.plain, false, false)?,
        )),
        PromptFormat::Chat => {
            let tmpl = model.chat_template().ok_or_else(|| {
                Error::invalid("the model has no chat template: use --format plain")
            })?;
            let user = format!("{INTRO}{MARKER}{}", ask.chat_question);
            let text = apply_chat_template(&tmpl, &[("user".into(), user)], true)?;
            let at = text
                .find(MARKER)
                .ok_or_else(|| Error::Template("the template dropped the user message".into()))?;
            let (pre, post) = (&text[..at], &text[at + MARKER.len()..]);
            Ok((
                model.tokenize(pre, true, true)?,
                model.tokenize(&format!("{post}{}", ask.chat_reply), false, true)?,
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
    pub task: Task,
    pub tokens: Vec<Token>,
    /// The answer's tokens as the model would continue after the question (" 48213").
    pub answer: Vec<Token>,
    /// The answer as text, without the leading space ("48213", "walk along the river at
    /// sunset").
    pub answer_text: String,
    /// The passkey; 0 for a needle document.
    pub key: u32,
    /// Index of the first token of the asked sentence (key sentence or needle) in `tokens`.
    pub key_at: usize,
    /// Positions of the answer inside the asked sentence in `tokens` (the whole sentence
    /// where the tokenizer split it otherwise): what the survival diagnostic follows.
    pub key_span: Range<usize>,
}

/// What a document hides: its sentences with their depths (the asked one first), the answer
/// and the question.
struct Hidden {
    sentences: Vec<(f64, String)>,
    answer_text: String,
    key: u32,
    ask: Ask,
}

/// Draws `n` distinct indices below `len` (a seeded partial shuffle).
fn distinct(n: usize, len: usize, rng: &mut u64) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..len).collect();
    for i in 0..n.min(len) {
        let j = i + (splitmix64(rng) % (len - i) as u64) as usize;
        idx.swap(i, j);
    }
    idx.truncate(n);
    idx
}

fn hidden(task: Task, depth: f64, rng: &mut u64) -> Result<Hidden> {
    match task {
        Task::Passkey => {
            let key = 10_000 + (splitmix64(rng) % 90_000) as u32;
            Ok(Hidden {
                sentences: vec![(depth, key_sentence(key))],
                answer_text: key.to_string(),
                key,
                ask: Ask {
                    plain: QUESTION.into(),
                    chat_question: CHAT_QUESTION.into(),
                    chat_reply: CHAT_REPLY.into(),
                },
            })
        }
        Task::Needle { needles } => {
            if !(1..=Task::MAX_NEEDLES).contains(&needles) {
                return Err(Error::invalid(format!(
                    "{needles} needles: give 1 to {}",
                    Task::MAX_NEEDLES
                )));
            }
            let cities = distinct(needles, CITIES.len(), rng);
            let activities = distinct(needles, ACTIVITIES.len(), rng);
            let sentences = cities
                .iter()
                .zip(&activities)
                .enumerate()
                .map(|(i, (&c, &a))| {
                    // The asked needle at the requested depth, the others anywhere.
                    let d = if i == 0 {
                        depth
                    } else {
                        (splitmix64(rng) >> 11) as f64 / (1u64 << 53) as f64
                    };
                    let s = format!(
                        " The best thing to do in {} is to {}.",
                        CITIES[c], ACTIVITIES[a]
                    );
                    (d, s)
                })
                .collect();
            let city = CITIES[cities[0]];
            let reply = format!("The best thing to do in {city} is to");
            Ok(Hidden {
                sentences,
                answer_text: ACTIVITIES[activities[0]].into(),
                key: 0,
                ask: Ask {
                    plain: format!("\n\nWhat is the best thing to do in {city}? {reply}"),
                    chat_question: format!(
                        "\n\nWhat is the best thing to do in {city}? Answer in a few words."
                    ),
                    chat_reply: reply,
                },
            })
        }
    }
}

/// Builds a passkey document of exactly `length` tokens: see [`build_task_document`].
pub fn build_document(
    model: &Model,
    filler: &str,
    length: usize,
    depth: f64,
    format: PromptFormat,
    rng: &mut u64,
) -> Result<PasskeyDoc> {
    build_task_document(model, filler, length, depth, format, Task::Passkey, rng)
}

/// Builds a document of exactly `length` tokens: intro, filler from a seeded random line of
/// `filler`, the asked sentence at `depth` (0 = start of the filler, 1 = end) and any other
/// needles at seeded random depths, more filler, the question.
pub fn build_task_document(
    model: &Model,
    filler: &str,
    length: usize,
    depth: f64,
    format: PromptFormat,
    task: Task,
    rng: &mut u64,
) -> Result<PasskeyDoc> {
    if !(0.0..=1.0).contains(&depth) {
        return Err(Error::invalid(format!(
            "depth {depth} is not within [0, 1]"
        )));
    }
    let hidden = hidden(task, depth, rng)?;
    let (intro, question) = frame(model, format, &hidden.ask)?;
    let sentences: Vec<Vec<Token>> = hidden
        .sentences
        .iter()
        .map(|(_, s)| model.tokenize(s, false, false))
        .collect::<Result<_>>()?;
    let answer = model.tokenize(&format!(" {}", hidden.answer_text), false, false)?;
    let fixed = intro.len() + sentences.iter().map(Vec::len).sum::<usize>() + question.len();
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
    // Each sentence goes after a boundary near its depth so it reads as its own line (a
    // passkey) or sentence (a needle in prose, whose paragraphs are long lines).
    let boundary = |i: usize| {
        let prev = model.token_bytes(body[i - 1], false);
        prev.ends_with(b"\n")
            || (task.contains_match()
                && prev.ends_with(b".")
                && model.token_bytes(body[i], false).starts_with(b" "))
    };
    let split_at = |d: f64| {
        let target = ((d * n_filler as f64).round() as usize).min(n_filler);
        (target..n_filler.min(target + 64))
            .find(|&i| i > 0 && boundary(i))
            .unwrap_or(target)
    };
    // (split, sentence index), in document order; the asked sentence (index 0) first among
    // equal splits.
    let mut order: Vec<(usize, usize)> = hidden
        .sentences
        .iter()
        .enumerate()
        .map(|(i, (d, _))| (split_at(*d), i))
        .collect();
    order.sort_unstable();
    let mut tokens = Vec::with_capacity(length);
    tokens.extend_from_slice(&intro);
    let mut key_at = 0;
    let mut done = 0;
    for &(split, i) in &order {
        tokens.extend_from_slice(&body[done..split]);
        done = split;
        if i == 0 {
            key_at = tokens.len();
        }
        tokens.extend_from_slice(&sentences[i]);
    }
    tokens.extend_from_slice(&body[done..]);
    tokens.extend_from_slice(&question);
    let asked = &sentences[0];
    let key_span = asked
        .windows(answer.len().max(1))
        .position(|w| w == answer.as_slice())
        .map(|i| key_at + i..key_at + i + answer.len())
        .unwrap_or(key_at..key_at + asked.len());
    Ok(PasskeyDoc {
        task,
        tokens,
        answer,
        answer_text: hidden.answer_text,
        key: hidden.key,
        key_at,
        key_span,
    })
}

/// What the model answered for one document.
#[derive(Debug, Clone)]
pub struct TrialOutcome {
    /// The answer was found: greedy decoding reproduces the key's tokens exactly (passkey), or
    /// the greedy reply contains the needle's answer (needle).
    pub found: bool,
    /// Passkey: mean NLL per answer token under teacher forcing. Needle: NLL of the answer's
    /// first token (the rest of the reply is free, not forced).
    pub answer_nll: f64,
    /// Greedy text: up to and including the first wrong token (passkey), the reply (needle).
    pub greedy: String,
    pub peak_cells: usize,
    /// When the question has been read: per tracked layer and KV head, the share of the key's
    /// tokens that head still holds (see [`key_survival`]); `None` for a cache that never
    /// evicts.
    pub key_kept: Option<Vec<Vec<f64>>>,
}

/// Per tracked layer of `engine`'s book and per KV head, the share of the positions in `span`
/// that head still holds: 1 when it has all of the key, 0 when it has none of it (`[layer][head]`;
/// a layer's mean over its heads is its share of (head, key token) slots). `None` without a
/// book (the full cache keeps everything). This is what tells "the policy evicted the key" from
/// "the model could not use it", and in which heads.
pub fn key_survival(engine: &Engine, span: &Range<usize>) -> Option<Vec<Vec<f64>>> {
    let book = engine.book()?;
    let want = span.len().max(1) as f64;
    Some(
        book.layers()
            .map(|layer| {
                (0..book.n_head())
                    .map(|head| {
                        let held = (0..book.n_cells())
                            .filter_map(|cell| book.slot_position(layer, head, cell))
                            .filter(|&p| usize::try_from(p).is_ok_and(|p| span.contains(&p)))
                            .count();
                        held as f64 / want
                    })
                    .collect()
            })
            .collect(),
    )
}

/// Runs one document through `engine` from an empty cache, then reads the answer: see
/// [`TrialOutcome`].
///
/// Passkey: greedy decoding follows the teacher-forced path for as long as the argmax equals
/// the true token, so "greedy reproduces the key" is read from the same pass: exact match means
/// the argmax was right at every answer token.
pub fn run_trial(engine: &mut Engine, doc: &PasskeyDoc) -> Result<TrialOutcome> {
    if doc.answer.is_empty() || doc.tokens.is_empty() {
        return Err(Error::invalid("empty passkey document"));
    }
    engine.reset();
    engine.ingest(&doc.tokens, Logits::Last, &mut |_| Ok(()))?;
    let key_kept = key_survival(engine, &doc.key_span);
    let mut logits: Vec<f32> = engine.last_logits()?.to_vec();
    let model = std::sync::Arc::clone(engine.model());
    if doc.task.contains_match() {
        let nll = -log_prob(&logits, doc.answer[0] as usize);
        let reply = greedy_reply(engine, &model, &mut logits, doc.answer.len() + 8)?;
        return Ok(TrialOutcome {
            found: normalise(&reply).contains(&normalise(&doc.answer_text)),
            answer_nll: nll,
            greedy: reply,
            peak_cells: engine.stats().peak_cells,
            key_kept,
        });
    }
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
        found: exact,
        answer_nll: nll / doc.answer.len() as f64,
        greedy: model.detokenize(&greedy, false),
        peak_cells: engine.stats().peak_cells,
        key_kept,
    })
}

/// The greedy reply from `logits` on: at most `max_tokens`, ending at an end-of-generation
/// token or a line break.
fn greedy_reply(
    engine: &mut Engine,
    model: &Model,
    logits: &mut Vec<f32>,
    max_tokens: usize,
) -> Result<String> {
    let mut reply: Vec<Token> = Vec::new();
    for t in 0..max_tokens {
        let got = argmax(logits) as Token;
        if model.is_eog(got) {
            break;
        }
        reply.push(got);
        if model.token_bytes(got, false).contains(&b'\n') || t + 1 == max_tokens {
            break;
        }
        engine.step(got)?;
        logits.clear();
        logits.extend_from_slice(engine.last_logits()?);
    }
    Ok(model.detokenize(&reply, false).trim().to_string())
}

/// Lower case, letters and digits only, single spaces: what containment compares, so that
/// "Walk along the river, at sunset!" contains "walk along the river at sunset".
fn normalise(text: &str) -> String {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn containment_ignores_case_punctuation_and_spacing() {
        let want = normalise("walk along the river at sunset");
        assert!(normalise(" Walk along the river,  at sunset!").contains(&want));
        assert!(!normalise("walk along the river at noon").contains(&want));
    }

    #[test]
    fn needles_name_distinct_cities_and_activities_and_the_asked_one_sits_at_its_depth() {
        let mut rng = 5u64;
        let h = hidden(Task::Needle { needles: 4 }, 0.25, &mut rng).unwrap();
        assert_eq!(h.sentences.len(), 4);
        assert_eq!(h.sentences[0].0, 0.25);
        assert!(h.sentences[0].1.contains(&h.answer_text));
        assert!(h.ask.chat_reply.starts_with("The best thing to do in "));
        let city = h
            .ask
            .chat_reply
            .trim_start_matches("The best thing to do in ");
        let city = city.trim_end_matches(" is to");
        // The asked city and its answer appear in exactly one needle.
        assert_eq!(
            h.sentences
                .iter()
                .filter(|(_, s)| s.contains(&format!(" {city} ")))
                .count(),
            1
        );
        assert_eq!(
            h.sentences
                .iter()
                .filter(|(_, s)| s.contains(&h.answer_text))
                .count(),
            1
        );
        assert!(h.sentences.iter().all(|(d, _)| (0.0..=1.0).contains(d)));
        assert!(hidden(Task::Needle { needles: 0 }, 0.5, &mut rng).is_err());
        assert!(hidden(
            Task::Needle {
                needles: Task::MAX_NEEDLES + 1
            },
            0.5,
            &mut rng
        )
        .is_err());
        assert_eq!(Task::Needle { needles: 4 }.name(), "needle-4");
    }
}
