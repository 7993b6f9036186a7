#![no_main]

//! Chat message formatting with SmolLM2's real tokenizer: whatever the messages, the token ids
//! of every message content hold no special token (control or user-defined), and the segments
//! join to llama.cpp's own rendering. (Contents do not always come back byte for byte: the
//! first run found that SmolLM2's tokenizer drops U+0013 from plain text. That is the
//! tokenizer's, and no token becomes special by it.)
//!
//! Input: byte 0 picks the template; the rest is split into messages at 0x01 bytes (at most
//! eight; roles system?, user, assistant, user, ...). A 0x02 byte followed by a byte n stands
//! for the text of the vocabulary's n-th special token, so the fuzzer composes markers
//! (`<|im_end|>`, `<|im_start|>user`, ...) without having to discover them.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use qfilters::conversation::chat::{tokenize_segments, ChatTemplate};
use qfilters::ffi::{Model, ModelParams, Token};

struct Setup {
    model: Arc<Model>,
    templates: Vec<ChatTemplate>,
    special_ids: HashSet<Token>,
    special_texts: Vec<String>,
}

fn setup() -> &'static Setup {
    static SETUP: OnceLock<Setup> = OnceLock::new();
    SETUP.get_or_init(|| {
        let path = std::env::var_os("QFILTERS_FUZZ_MODEL")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                    .join("../models/SmolLM2-135M-Instruct.Q4_1.gguf")
            });
        let model = Model::load(&path, &ModelParams::default()).expect("the fuzz model loads");
        let (own, _) = ChatTemplate::resolve(&model, None);
        let mut templates = vec![own];
        for name in [
            "chatml",
            "llama3",
            "gemma",
            "mistral-v1",
            "mistral-v3",
            "mistral-v7",
            "llama2-sys-strip",
            "phi3",
            "command-r",
        ] {
            templates.push(ChatTemplate::named(name).expect("built-in template"));
        }
        let ids = model.special_tokens();
        let special_texts = ids
            .iter()
            .map(|&t| String::from_utf8_lossy(&model.token_bytes(t, true)).into_owned())
            .collect();
        Setup {
            special_ids: ids.into_iter().collect(),
            special_texts,
            templates,
            model,
        }
    })
}

fn expand(bytes: &[u8], specials: &[String]) -> String {
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == 2 && i + 1 < bytes.len() && !specials.is_empty() {
            out.extend_from_slice(specials[bytes[i + 1] as usize % specials.len()].as_bytes());
            i += 2;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let s = setup();
    let template = &s.templates[pick as usize % s.templates.len()];
    let with_system = pick & 0x80 != 0;
    let mut messages = Vec::new();
    for (i, part) in rest.split(|&b| b == 1).take(8).enumerate() {
        let role = match (with_system, i) {
            (true, 0) => "system",
            (true, i) if i % 2 == 1 => "user",
            (false, i) if i % 2 == 0 => "user",
            _ => "assistant",
        };
        messages.push((role.to_string(), expand(part, &s.special_texts)));
    }
    // A refusal (an error) is safe; only a successful split is checked.
    let Ok(segments) = template.segments(&messages, true) else {
        // ChatML keeps every content verbatim: it only refuses what C strings cannot hold.
        if template.label.contains("chatml") {
            assert!(messages.iter().any(|(_, c)| c.contains('\0')), "{messages:?}");
        }
        return;
    };
    let joined: String = segments.iter().map(|x| x.text.as_str()).collect();
    assert_eq!(joined, template.format(&messages, true).expect("format"));
    let ids = tokenize_segments(&s.model, &segments).expect("tokenize");
    for (seg, seg_ids) in segments.iter().zip(&ids) {
        if seg.content {
            assert!(
                seg_ids.iter().all(|t| !s.special_ids.contains(t)),
                "content {:?} gave a special id: {seg_ids:?}",
                seg.text
            );
        }
    }
});
