//! Per-head retention rewrites KV cache rows; these tests prove that doing so keeps what each
//! head attends to, on the real model (CPU).

use std::sync::Arc;

use qfilters::bench::check_head_moves;
use qfilters::ffi::{
    Batch, CacheType, Context, ContextParams, GraphObserver, Model, NodeInfo, Token,
};

use crate::common::{qwen, smollm2 as model};

const TEXT: &str = "The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step. All that glitters is not gold, and not all those who wander are lost. Knowledge is power, and time is money, or so they say in the old books that nobody reads any more.";

/// Captures each layer's attention output for the last decode.
#[derive(Default)]
struct AttnTap(Vec<Vec<f32>>);

impl GraphObserver for AttnTap {
    fn wants(&mut self, node: &NodeInfo) -> bool {
        node.base == "kqv_out" && node.layer.is_some()
    }
    fn observe(&mut self, node: &NodeInfo, data: &[f32]) {
        let Some(l) = node.layer else { return };
        let v = &mut self.0;
        if v.len() <= l {
            v.resize(l + 1, Vec::new());
        }
        v[l] = data.to_vec();
    }
}

fn batch(tokens: &[Token], start: i32) -> Batch {
    let mut b = Batch::new(tokens.len().max(1)).expect("batch");
    for (i, &t) in tokens.iter().enumerate() {
        b.push(t, start + i as i32, i + 1 == tokens.len())
            .expect("room in the batch");
    }
    b
}

fn decode(ctx: &mut Context, tokens: &[Token], start: i32) {
    ctx.decode(&batch(tokens, start)).expect("decode");
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn swapping_one_heads_slices_between_cells_keeps_attention_outputs() {
    let model = model();
    let tokens = model.tokenize(TEXT, true, false).expect("tokenize");
    let n = tokens.len() - 1;
    let (prompt, next) = (&tokens[..n], tokens[n]);
    let mut ctx = Context::new(
        &model,
        &ContextParams {
            n_ctx: 256,
            n_batch: 256,
            threads: 1,
            flash_attn: Some(true),
            hook: true,
            ..ContextParams::default()
        },
    )
    .expect("context");
    decode(&mut ctx, prompt, 0);
    assert!(ctx.can_move_heads(model.n_head_kv() * model.head_dim()));
    let run_next = |ctx: &mut Context| -> Vec<Vec<f32>> {
        let mut tap = AttnTap::default();
        ctx.decode_observed(&batch(&[next], n as i32), &mut tap)
            .expect("decode");
        assert!(ctx.remove_positions(n as i32, n as i32 + 1));
        tap.0
    };
    let reference = run_next(&mut ctx);
    assert_eq!(reference.len(), model.n_layer(), "one kqv_out per layer");

    // Head 1 of every layer: positions 5 and 20 trade cells (via a free scratch cell). Each
    // head still sees the same (key, value) pairs, only stored elsewhere.
    let (h, c1, c2, scratch) = (1, 5usize, 20usize, 200usize);
    for layer in 0..ctx.kv_layers() {
        ctx.move_head_slices(
            layer,
            h,
            model.n_head_kv(),
            &[(c1, scratch), (c2, c1), (scratch, c2)],
        )
        .expect("move");
    }
    let swapped = run_next(&mut ctx);
    let d0 = max_diff(&reference[0], &swapped[0]);
    assert!(d0 < 1e-4, "layer 0 attention output moved by {d0}");
    // Later layers see tiny layer-0 differences amplified by the quantized matmuls (see the
    // facts file), so they get a bound relative to each layer's output scale.
    let worst = (0..model.n_layer())
        .map(|l| {
            let scale = reference[l].iter().map(|x| x.abs()).fold(0.0, f32::max);
            max_diff(&reference[l], &swapped[l]) / scale.max(1e-6)
        })
        .fold(0.0, f32::max);
    eprintln!("layer 0 max diff {d0:e}, worst relative diff over layers {worst:.4}");
    assert!(
        worst < 0.1,
        "a layer's attention output moved by {worst} of its scale"
    );

    // Control: a move that changes head 1's token set (position 20's slice overwritten by
    // position 5's) must show, or the comparison above proves nothing.
    ctx.move_head_slices(0, h, model.n_head_kv(), &[(c1, c2)])
        .expect("move");
    let broken = run_next(&mut ctx);
    let d = max_diff(&reference[0], &broken[0]);
    assert!(
        d > 1e-3,
        "changing the token set moved layer 0's output by only {d}"
    );
}

/// A head past the last one would address the next cell's row inside the same tensor, where
/// ggml's own bounds check cannot see it: the move is refused and no byte changes.
#[test]
fn a_head_out_of_range_is_refused_and_moves_nothing() {
    let model = model();
    let tokens = model.tokenize(TEXT, true, false).expect("tokenize");
    let mut ctx = Context::new(
        &model,
        &ContextParams {
            n_ctx: 256,
            n_batch: 256,
            threads: 1,
            flash_attn: Some(true),
            hook: true,
            ..ContextParams::default()
        },
    )
    .expect("context");
    decode(&mut ctx, &tokens, 0);
    let n_head_kv = model.n_head_kv();
    let before: Vec<Vec<u8>> = [false, true]
        .iter()
        .map(|&v| ctx.read_cache_row_bytes(0, v, 6).expect("row"))
        .collect();
    for head in [n_head_kv, n_head_kv + 1, usize::MAX / 2] {
        let e = ctx
            .move_head_slices(0, head, n_head_kv, &[(5, 6)])
            .expect_err("a head past the last is refused");
        assert!(e.to_string().contains("out of range"), "{e}");
    }
    let after: Vec<Vec<u8>> = [false, true]
        .iter()
        .map(|&v| ctx.read_cache_row_bytes(0, v, 6).expect("row"))
        .collect();
    assert_eq!(before, after, "cell 6 kept its bytes");
    // The same context refuses logits it does not have, including an index that an `as i32`
    // would wrap to -1 ("the last row" to llama.cpp).
    let last = tokens.len() - 1;
    assert!(ctx.logits(last).is_ok(), "the last token asked for logits");
    for i in [0, tokens.len(), (1usize << 32) - 1, usize::MAX] {
        assert!(ctx.logits(i).is_err(), "no logits for batch token {i}");
    }
}

/// After real per-head eviction rounds, every (layer 0, head, cell) slot the book says holds
/// position p holds exactly the bytes of p's key and value slices, as a cache that never
/// evicted has them. Layer 0's K and V depend only on the token and its position, so they are
/// comparable across the two runs; a quantized slice is whole blocks, copied as they are.
#[test]
fn per_head_eviction_moves_the_slices_the_book_says() {
    per_head_moves(&model(), CacheType::F16);
}

/// The same bookkeeping on qwen2, whose K and V projections add a bias (still a function of
/// token and position only in layer 0) and whose 2 KV heads each serve 7 query heads.
#[test]
fn per_head_eviction_moves_the_slices_the_book_says_on_qwen2() {
    per_head_moves(&qwen(), CacheType::F16);
}

/// On a q8_0 cache (K and V), a kept slice is never requantized: its blocks are the bytes the
/// decode wrote.
#[test]
fn per_head_eviction_keeps_the_exact_bytes_of_q8_0_slices() {
    per_head_moves(&model(), CacheType::Q8_0);
}

/// Runs the check `qfilters bench --check-moves` runs ([`check_head_moves`]), at budget 48 in
/// chunks of 16, and asserts what it reports.
fn per_head_moves(model: &Arc<Model>, cache_type: CacheType) {
    let text = TEXT.repeat(3);
    let tokens = model.tokenize(&text, true, false).expect("tokenize");
    let tokens = &tokens[..tokens.len().min(160)];
    let (budget, chunk) = (48, 16);
    let r = check_head_moves(model, tokens, budget, chunk, 1, cache_type).expect("check");
    assert!(r.head_slices_moved > 0, "the test must exercise moves");
    if !cache_type.is_quantized() {
        assert!(
            r.device_move_rounds > 0,
            "the moves must run as one graph per round on the cache's backend"
        );
    }
    assert!(r.live_cells <= budget + chunk);
    assert_eq!(
        r.differing, 0,
        "{} of {} slots hold other K or V bytes than the decode wrote",
        r.differing, r.checked
    );
    assert_eq!(r.max_abs_diff, 0.0);
    assert!(
        r.moved > 0,
        "some layer-0 head must hold a token other than its cell's label"
    );
    assert!(r.checked >= budget * model.n_head_kv());
}
