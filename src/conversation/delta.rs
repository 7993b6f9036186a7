//! What a new prompt adds to what a cache already holds: the one rule `chat` and the server's
//! slots share.
//!
//! A conversation's cache is described by its [`History`]: the parts (BOS, template text,
//! message contents) it has ingested, with their tokens. That is what went in, not what is
//! still in the cells: after eviction the cells hold a subset of it, and a prompt that extends
//! the history needs only its new tokens decoded, whatever was evicted.
//!
//! A new prompt is formatted whole and matched against the history part by part ([`plan`]).
//! A part the history holds keeps the history's tokens, so a reply continues with the tokens
//! that were sampled (retokenizing its text would not always give them back); a reply the
//! template renders with the whitespace at its ends trimmed is still the reply the cache holds.
//! The prompt then extends the history when the history's tokens are a proper prefix of the
//! prompt's: only the tokens after them are decoded. Anything else (a prompt that differs from
//! the history mid-way, a shorter one, the same one again) starts from an empty cache:
//! decoding the rest of the prompt after cells that hold something else would show the model a
//! conversation nobody wrote.

use crate::conversation::chat::{is_c_space, tokenize_segments, Segment};
use crate::error::Result;
use crate::ffi::{Model, Token};

/// A piece of a prompt and its tokens: template text (special tokens parsed), a message's
/// content (plain text), or the BOS token (an empty template piece).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    pub segment: Segment,
    pub tokens: Vec<Token>,
}

/// A formatted prompt as parts, with its BOS: template text and contents are tokenized apart
/// ([`tokenize_segments`]), so no content can become a control token.
pub fn parts(model: &Model, segments: Vec<Segment>) -> Result<Vec<Part>> {
    let tokens = tokenize_segments(model, &segments)?;
    Ok(with_bos(
        model.bos().filter(|_| model.add_bos()),
        segments,
        tokens,
    ))
}

/// The parts of `segments` tokenized as `tokens`, preceded by a BOS part when the model wants
/// `bos` and the prompt does not already start with it (a template that writes its own BOS
/// text, which parses to the token).
fn with_bos(bos: Option<Token>, segments: Vec<Segment>, tokens: Vec<Vec<Token>>) -> Vec<Part> {
    let first = tokens.iter().flatten().next().copied();
    let mut parts = Vec::with_capacity(segments.len() + 1);
    if let Some(bos) = bos.filter(|&b| first != Some(b)) {
        parts.push(Part {
            segment: Segment {
                text: String::new(),
                content: false,
            },
            tokens: vec![bos],
        });
    }
    parts.extend(
        segments
            .into_iter()
            .zip(tokens)
            .map(|(segment, tokens)| Part { segment, tokens }),
    );
    parts
}

/// What a cache has ingested: the parts, their tokens in order, and how many of those tokens
/// went through the cache (the rest, a reply's last token left at the limit, are decoded first
/// by the next prompt that extends it).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct History {
    pub parts: Vec<Part>,
    pub tokens: Vec<Token>,
    pub decoded: usize,
}

/// Whether a prompt's part is the one the history holds: equal, or the same content with
/// whitespace at its ends trimmed (a template that trims the reply sent back; the cache keeps
/// the reply as it was sampled).
fn same_part(held: &Segment, asked: &Segment) -> bool {
    if held == asked {
        return true;
    }
    held.content
        && asked.content
        && held.text.contains(asked.text.as_str())
        && held.text.trim_matches(is_c_space) == asked.text.trim_matches(is_c_space)
}

/// How a cache with a given history takes a prompt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The prompt's parts as the cache will hold them (a matched part keeps the history's
    /// tokens).
    pub parts: Vec<Part>,
    /// The prompt's tokens, in that form.
    pub tokens: Vec<Token>,
    /// Whether the history's tokens are a proper prefix of `tokens`: then only `tokens[keep..]`
    /// is decoded; otherwise the cache starts empty (`keep` = 0).
    pub reuse: bool,
    pub keep: usize,
    /// Tokens of `tokens` the history holds: its length when reused, else 0.
    pub held: usize,
}

impl Plan {
    /// The tokens to decode: a reply token left undecoded first, then the prompt's new ones.
    pub fn new_tokens(&self) -> &[Token] {
        &self.tokens[self.keep..]
    }

    /// The parts that hold the prompt's new tokens (all of them when the cache starts empty).
    /// Parts follow the history's exactly in a conversation; a raw prompt that extends the
    /// history inside one part gives that whole part, whose first tokens the cache holds.
    pub fn added(&self) -> &[Part] {
        let mut start = 0;
        for (i, p) in self.parts.iter().enumerate() {
            if start + p.tokens.len() > self.held {
                return &self.parts[i..];
            }
            start += p.tokens.len();
        }
        &[]
    }

    /// The history once this prompt went in and was answered by `reply`, sampled as
    /// `reply_tokens`; `undecoded`: the last of them was left undecoded (at the limit).
    pub fn history_after(&self, reply: &str, reply_tokens: &[Token], undecoded: bool) -> History {
        let mut tokens = self.tokens.clone();
        tokens.extend_from_slice(reply_tokens);
        let mut parts = self.parts.clone();
        parts.push(Part {
            segment: Segment {
                text: reply.to_string(),
                content: true,
            },
            tokens: reply_tokens.to_vec(),
        });
        History {
            decoded: tokens.len() - usize::from(undecoded && !reply_tokens.is_empty()),
            parts,
            tokens,
        }
    }
}

/// How a cache holding `history` takes `prompt`: it extends the history when the history's
/// tokens are a proper prefix of the prompt's (at least one new token is needed, for logits),
/// else it starts empty.
pub fn plan(history: &History, prompt: &[Part]) -> Plan {
    let mut parts = Vec::with_capacity(prompt.len());
    let mut matching = true;
    for (i, p) in prompt.iter().enumerate() {
        match history.parts.get(i) {
            Some(h) if matching && same_part(&h.segment, &p.segment) => parts.push(Part {
                segment: p.segment.clone(),
                tokens: h.tokens.clone(),
            }),
            _ => {
                matching = false;
                parts.push(p.clone());
            }
        }
    }
    let tokens: Vec<Token> = parts
        .iter()
        .flat_map(|p| p.tokens.iter().copied())
        .collect();
    let reuse = !history.tokens.is_empty()
        && tokens.len() > history.tokens.len()
        && tokens.starts_with(&history.tokens);
    Plan {
        parts,
        tokens,
        reuse,
        keep: if reuse { history.decoded } else { 0 },
        held: if reuse { history.tokens.len() } else { 0 },
    }
}

/// Builders of parts and histories for the tests of the modules that plan with them.
#[cfg(test)]
pub(crate) mod test_parts {
    use super::*;

    pub(crate) fn t(text: &str, tokens: &[Token]) -> Part {
        Part {
            segment: Segment {
                text: text.into(),
                content: false,
            },
            tokens: tokens.to_vec(),
        }
    }

    pub(crate) fn c(text: &str, tokens: &[Token]) -> Part {
        Part {
            segment: Segment {
                text: text.into(),
                content: true,
            },
            tokens: tokens.to_vec(),
        }
    }

    pub(crate) fn history(parts: Vec<Part>) -> History {
        let tokens: Vec<Token> = parts.iter().flat_map(|p| p.tokens.clone()).collect();
        History {
            decoded: tokens.len(),
            parts,
            tokens,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_parts::{c, history, t};
    use super::*;

    fn segments(parts: &[Part]) -> Vec<Segment> {
        parts.iter().map(|p| p.segment.clone()).collect()
    }

    #[test]
    fn a_prompt_after_an_identical_prefix_decodes_only_its_new_tokens() {
        // Turn 1 ingested: user header, "hi", assistant header, and the reply sampled as [7, 8]
        // (its text would retokenize as [78]: the sampled tokens are kept).
        let h = history(vec![
            t("<u>", &[1]),
            c("hi", &[2]),
            t("<a>", &[3]),
            c("yo", &[7, 8]),
        ]);
        let turn2 = [
            t("<u>", &[1]),
            c("hi", &[2]),
            t("<a>", &[3]),
            c("yo", &[78]),
            t("</a><u>", &[4, 1]),
            c("more", &[5]),
            t("<a>", &[3]),
        ];
        let p = plan(&h, &turn2);
        assert!(p.reuse);
        assert_eq!((p.keep, p.held), (5, 5));
        assert_eq!(p.tokens, vec![1, 2, 3, 7, 8, 4, 1, 5, 3]);
        assert_eq!(p.new_tokens(), &[4, 1, 5, 3]);
        assert_eq!(p.added(), &turn2[4..]);
        // A token left undecoded at the limit is decoded first.
        let mut h2 = h.clone();
        h2.decoded = 4;
        let p2 = plan(&h2, &turn2);
        assert_eq!(p2.new_tokens(), &[8, 4, 1, 5, 3]);
        assert_eq!(p2.added(), &turn2[4..]);
    }

    #[test]
    fn a_reply_the_template_trims_is_still_the_one_the_cache_holds() {
        let h = history(vec![
            t("<u>", &[1]),
            c("hi", &[2]),
            t("<a>", &[3]),
            c(" yo \n", &[9, 7]),
        ]);
        let p = plan(
            &h,
            &[
                t("<u>", &[1]),
                c("hi", &[2]),
                t("<a>", &[3]),
                c("yo", &[7]),
                t("<u>", &[1]),
            ],
        );
        assert!(p.reuse);
        assert_eq!(p.tokens, vec![1, 2, 3, 9, 7, 1]);
        assert_eq!(p.new_tokens(), &[1]);
        // Trimming is all a template may do: other text around the reply is another reply.
        let p = plan(
            &h,
            &[
                t("<u>", &[1]),
                c("hi", &[2]),
                t("<a>", &[3]),
                c("yo!", &[7]),
            ],
        );
        assert!(!p.reuse);
    }

    #[test]
    fn a_history_that_differs_mid_way_starts_from_an_empty_cache() {
        let h = history(vec![
            t("<u>", &[1]),
            c("hi", &[2]),
            t("<a>", &[3]),
            c("yo", &[7]),
        ]);
        // The client re-sent the conversation with its first message edited: nothing after
        // the edit may stay, so everything is decoded again, with the prompt's own tokens.
        let edited = [
            t("<u>", &[1]),
            c("ho", &[6]),
            t("<a>", &[3]),
            c("yo", &[7]),
            t("<u>", &[1]),
            c("more", &[5]),
        ];
        let p = plan(&h, &edited);
        assert!(!p.reuse);
        assert_eq!((p.keep, p.held), (0, 0));
        assert_eq!(p.new_tokens(), &[1, 6, 3, 7, 1, 5]);
        assert_eq!(p.added(), &edited[..]);
        // A different reply is a different conversation too.
        let p = plan(
            &h,
            &[t("<u>", &[1]), c("hi", &[2]), t("<a>", &[3]), c("no", &[6])],
        );
        assert!(!p.reuse);
        assert_eq!(p.tokens, vec![1, 2, 3, 6]);
    }

    #[test]
    fn a_shorter_or_equal_prompt_starts_from_an_empty_cache() {
        let h = history(vec![t("<u>", &[1]), c("hi", &[2]), t("<a>", &[3])]);
        // The same prompt again: nothing new to decode, so no logits to sample from.
        let p = plan(&h, &h.parts);
        assert!(!p.reuse);
        assert_eq!(p.new_tokens(), &[1, 2, 3]);
        // A shorter prompt, even a prefix of the history.
        let p = plan(&h, &[t("<u>", &[1])]);
        assert!(!p.reuse);
        assert_eq!(p.new_tokens(), &[1]);
    }

    #[test]
    fn empty_histories_and_prompts() {
        let prompt = [t("<u>", &[1]), c("hi", &[2])];
        // An empty cache never reuses: the whole prompt is new.
        let p = plan(&History::default(), &prompt);
        assert!(!p.reuse);
        assert_eq!(p.new_tokens(), &[1, 2]);
        assert_eq!(p.added(), &prompt[..]);
        // An empty prompt has nothing to decode.
        let p = plan(&history(prompt.to_vec()), &[]);
        assert!(!p.reuse);
        assert!(p.new_tokens().is_empty() && p.added().is_empty());
        let p = plan(&History::default(), &[]);
        assert!(!p.reuse && p.tokens.is_empty());
    }

    #[test]
    fn raw_prompts_extend_by_tokens() {
        // Raw completions have no template parts: a longer prompt whose tokens start with the
        // history's extends it.
        let h = history(vec![c("Once", &[10]), c(" upon", &[11])]);
        let long = [c("Once upon a time", &[10, 11, 12, 13])];
        let p = plan(&h, &long);
        assert!(p.reuse);
        assert_eq!(p.new_tokens(), &[12, 13]);
        // The one part holding the new tokens, whose first ones the cache has.
        assert_eq!(p.added(), &long[..]);
    }

    #[test]
    fn bos_is_added_once_unless_the_prompt_starts_with_it() {
        let segs = segments(&[t("<u>", &[]), c("hi", &[])]);
        let parts = with_bos(Some(1), segs.clone(), vec![vec![5], vec![6]]);
        assert_eq!(parts.len(), 3);
        assert_eq!(parts[0], t("", &[1]));
        assert_eq!(parts[1], t("<u>", &[5]));
        // A template whose text starts with BOS gets no second one.
        let parts = with_bos(Some(1), segs.clone(), vec![vec![1, 5], vec![6]]);
        assert_eq!(parts, vec![t("<u>", &[1, 5]), c("hi", &[6])]);
        // Nor does a model without one (or that does not want it).
        let parts = with_bos(None, segs, vec![vec![5], vec![6]]);
        assert_eq!(parts, vec![t("<u>", &[5]), c("hi", &[6])]);
        // An empty prompt is just BOS.
        assert_eq!(with_bos(Some(1), vec![], vec![]), vec![t("", &[1])]);
        // The BOS part is matched like any other: the next turn keeps it.
        let turn1 = with_bos(Some(1), segments(&[t("<u>", &[])]), vec![vec![5]]);
        let h = plan(&History::default(), &turn1).history_after("yo", &[7], false);
        let turn2 = with_bos(
            Some(1),
            segments(&[t("<u>", &[]), c("yo", &[]), t("<u>", &[])]),
            vec![vec![5], vec![7], vec![5]],
        );
        let p = plan(&h, &turn2);
        assert!(p.reuse);
        assert_eq!(p.new_tokens(), &[5]);
    }

    #[test]
    fn the_history_after_a_reply_holds_it_as_sampled() {
        let p = plan(&History::default(), &[t("<u>", &[1]), c("hi", &[2])]);
        let h = p.history_after("yo", &[7, 8], false);
        assert_eq!(h.tokens, vec![1, 2, 7, 8]);
        assert_eq!(h.decoded, 4);
        assert_eq!(h.parts.last(), Some(&c("yo", &[7, 8])));
        // At the limit the last token was not decoded: the next prompt decodes it first.
        let h = p.history_after("yo", &[7, 8], true);
        assert_eq!(h.decoded, 3);
        // An empty reply (end of generation at once) adds nothing.
        let h = p.history_after("", &[], true);
        assert_eq!(h.decoded, 2);
    }
}
