//! The evaluation harness on the real model: the streaming full-cache reference agrees with a
//! plain full-context computation, and passkey documents are what they claim to be.

use std::sync::Arc;

use qfilters::engine::cache::{Combiner, EvictionConfig, Granularity};
use qfilters::engine::{Engine, EngineConfig};
use qfilters::eval::passkey::{build_document, build_task_document, run_trial, PromptFormat, Task};
use qfilters::eval::ppl::{full_context_nll, perplexities, streaming_nll};
use qfilters::ffi::Model;
use qfilters::policy::{self, PolicyInputs};

use crate::common::{data_file as data, full_engine, smollm2 as model};

#[test]
fn streaming_full_cache_matches_one_batch_full_context() {
    let model = model();
    let text = std::fs::read_to_string(data("wikitext2-valid.txt")).expect("wikitext2-valid.txt");
    let mut tokens = model.tokenize(&text, true, false).expect("tokenize");
    tokens.truncate(768);
    let mut engine = full_engine(&model, tokens.len(), 16);
    let streamed = streaming_nll(&mut engine, &tokens).expect("streaming");
    let reference = full_context_nll(&model, &tokens, tokens.len(), 1).expect("full context");
    assert_eq!(streamed.nll.len(), tokens.len() - 1);
    assert_eq!(reference.len(), tokens.len() - 1);
    let (a, a2) = perplexities(&streamed.nll);
    let (b, b2) = perplexities(&reference);
    // Chunked and one-batch decoding round differently in the quantized matmuls; PPL must
    // agree closely all the same (a shifted or misaligned NLL would be off by far more).
    assert!(
        (a - b).abs() / b < 0.01,
        "streamed ppl {a} vs full-context {b}"
    );
    assert!((a2 - b2).abs() / b2 < 0.01, "second half {a2} vs {b2}");
    assert!(a > 3.0 && a < 100.0, "implausible ppl {a}");
    assert_eq!(streamed.peak_cells, tokens.len());
}

#[test]
fn passkey_documents_have_the_length_and_key_asked_for_and_the_full_cache_finds_it() {
    let model = model();
    let filler = std::fs::read_to_string(data("tinyshakespeare.txt")).expect("tinyshakespeare");
    let mut rng = 7u64;
    let doc =
        build_document(&model, &filler, 1024, 0.5, PromptFormat::Chat, &mut rng).expect("doc");
    assert_eq!(doc.tokens.len(), 1024);
    let text = model.detokenize(&doc.tokens, false);
    let key = doc.key.to_string();
    assert_eq!(key.len(), 5);
    assert_eq!(
        text.matches(&key).count(),
        2,
        "the key sentence names the key twice"
    );
    assert!(text.trim_end().ends_with("The pass key is"));
    let at = doc.key_at as f64 / doc.tokens.len() as f64;
    assert!((0.4..0.65).contains(&at), "key placed at {at}");
    assert_eq!(model.detokenize(&doc.answer, false).trim(), key);
    // The span the survival diagnostic follows is the key's first occurrence.
    assert_eq!(
        model
            .detokenize(&doc.tokens[doc.key_span.clone()], false)
            .trim(),
        key
    );
    let mut engine = full_engine(&model, doc.tokens.len() + 16, 64);
    let out = run_trial(&mut engine, &doc).expect("trial");
    assert_eq!(out.key_kept, None, "a full cache has no survival to report");
    // With the chat format the full cache answers the digits (the plain format got " the").
    assert!(out.found, "greedy answer {:?} for key {key}", out.greedy);
    assert!(out.answer_nll < 0.5, "answer NLL {}", out.answer_nll);
    // Same seed, same document; different seed, different key or text.
    let again =
        build_document(&model, &filler, 1024, 0.5, PromptFormat::Chat, &mut 7u64).expect("doc");
    assert_eq!(again.tokens, doc.tokens);
    assert!(build_document(&model, &filler, 10, 0.5, PromptFormat::Chat, &mut rng).is_err());
}

#[test]
fn needle_documents_hide_their_sentences_in_prose_and_the_full_cache_finds_the_asked_one() {
    let model = model();
    let prose = std::fs::read_to_string(data("wikitext2-valid.txt")).expect("wikitext2-valid.txt");
    let needle = |needles, rng: &mut u64| {
        build_task_document(
            &model,
            &prose,
            1024,
            0.2,
            PromptFormat::Chat,
            Task::Needle { needles },
            rng,
        )
        .expect("doc")
    };
    let doc = needle(1, &mut 3u64);
    assert_eq!(doc.tokens.len(), 1024);
    let text = model.detokenize(&doc.tokens, false);
    assert_eq!(
        text.matches("The best thing to do in").count(),
        2,
        "the needle, then the question"
    );
    assert_eq!(
        text.matches(&doc.answer_text).count(),
        1,
        "the answer only in the needle"
    );
    let at = doc.key_at as f64 / doc.tokens.len() as f64;
    assert!((0.15..0.35).contains(&at), "needle placed at {at}");
    // The needle starts a sentence of the prose: it follows a full stop or a line break.
    let before = model.detokenize(&doc.tokens[doc.key_at - 1..doc.key_at], false);
    assert!(
        before.ends_with('.') || before.ends_with('\n'),
        "after {before:?}"
    );
    assert_eq!(
        model
            .detokenize(&doc.tokens[doc.key_span.clone()], false)
            .trim(),
        doc.answer_text
    );
    let mut engine = full_engine(&model, doc.tokens.len() + 32, 64);
    let out = run_trial(&mut engine, &doc).expect("trial");
    assert!(
        out.found,
        "reply {:?} for {:?}",
        out.greedy, doc.answer_text
    );
    assert!(out.greedy.contains(&doc.answer_text), "{:?}", out.greedy);
    // The multi-key variant: four needles, one answer among them asked.
    let multi = needle(4, &mut 3u64);
    assert_eq!(multi.tokens.len(), 1024);
    let text = model.detokenize(&multi.tokens, false);
    assert_eq!(text.matches("The best thing to do in").count(), 5);
    assert_eq!(text.matches(&multi.answer_text).count(), 1);
}

fn evicting_engine(
    model: &Arc<Model>,
    policy_name: &str,
    granularity: Granularity,
    flash_attn: Option<bool>,
) -> Engine {
    let scorer = policy::build(
        policy_name,
        &PolicyInputs {
            filters: None,
            seed: 0,
            recency: 0.0,
            mix_weight: 1.0,
        },
    )
    .expect("policy");
    Engine::new(
        model,
        scorer,
        EngineConfig {
            n_batch: 16,
            threads: 1,
            flash_attn,
            ..EngineConfig::bounded(EvictionConfig {
                budget: 128,
                window: 32,
                sinks: 4,
                granularity,
                combiner: Combiner::MeanZ,
                slack: 0,
            })
        },
    )
    .expect("engine")
}

/// The key-survival diagnostic reads the book: StreamingLLM (budget 128: 4 sinks and the
/// newest tokens) has dropped a key near the start from every head of every layer, and keeps one
/// read just before the question in all of them.
#[test]
fn key_survival_says_where_streaming_kept_the_key() {
    let model = model();
    let filler = std::fs::read_to_string(data("tinyshakespeare.txt")).expect("tinyshakespeare");
    let mut engine = evicting_engine(&model, "streaming", Granularity::Position, None);
    for (depth, want) in [(0.1, 0.0), (1.0, 1.0)] {
        let doc = build_document(&model, &filler, 512, depth, PromptFormat::Chat, &mut 3u64)
            .expect("doc");
        let out = run_trial(&mut engine, &doc).expect("trial");
        let kept = out.key_kept.expect("a bounded cache reports survival");
        assert_eq!(kept.len(), engine.book().expect("book").layers().count());
        assert!(
            kept.iter()
                .all(|heads| heads.len() == model.n_head_kv() && heads.iter().all(|&k| k == want)),
            "depth {depth}: key kept {kept:?}, want {want} in every head of every layer"
        );
    }
}

/// StreamingLLM scores every head of a token alike, so per-head selection keeps the same tokens
/// as per-position selection and moves nothing: the two must give the same NLLs. A difference
/// would mean the move path (or the head bookkeeping) changes what attention sees.
#[test]
fn streaming_per_head_equals_streaming_per_position() {
    let model = model();
    let text = std::fs::read_to_string(data("wikitext2-valid.txt")).expect("wikitext2-valid.txt");
    let mut tokens = model.tokenize(&text, true, false).expect("tokenize");
    tokens.truncate(512);
    let mut head = evicting_engine(&model, "streaming", Granularity::Head, Some(true));
    let by_head = streaming_nll(&mut head, &tokens).expect("head");
    assert_eq!(
        head.stats().head_slices_moved,
        0,
        "all heads agree: no moves"
    );
    let mut pos = evicting_engine(&model, "streaming", Granularity::Position, Some(true));
    let by_pos = streaming_nll(&mut pos, &tokens).expect("position");
    assert_eq!(head.stats().evicted, pos.stats().evicted);
    let max = by_head
        .nll
        .iter()
        .zip(&by_pos.nll)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    assert!(max < 1e-4, "per-token NLLs differ by up to {max}");
}
