//! Speed measurements: a synthetic workload (random prompt token ids, greedy decode) through an
//! [`Engine`], timed for prefill, decode and the last decode steps (the end of the stream).
//!
//! The prompt is made of token ids, not text, so models without a tokenizer (`gguf-tools synth`)
//! work too.

pub mod summary;

use std::time::Instant;

use serde::Serialize;

use crate::conversation::generate::{generate, Limits};
use crate::engine::cache::TrackedLayer;
use crate::engine::{Engine, Logits, Stats};
use crate::error::{Error, Result};
use crate::ffi::{CacheType, Model, Sampler, SamplingParams, Token};
use crate::math::{argmax, rate, splitmix64};

/// `n` token ids drawn uniformly (seeded) from the vocabulary, end-of-generation tokens
/// excluded; the model's BOS first when it adds one.
pub fn synthetic_prompt(model: &Model, n: usize, seed: u64) -> Result<Vec<Token>> {
    let n_vocab = model.n_vocab();
    if n_vocab < 2 {
        return Err(Error::invalid("the model's vocabulary is empty"));
    }
    let mut state = seed ^ 0x005E_ED0F_BE4C;
    let mut out = Vec::with_capacity(n);
    if n > 0 && model.add_bos() {
        if let Some(bos) = model.bos() {
            out.push(bos);
        }
    }
    let mut tries = 0usize;
    while out.len() < n {
        let t = (splitmix64(&mut state) % n_vocab as u64) as Token;
        tries += 1;
        if model.is_eog(t) && tries < 100 * n + 100 {
            continue;
        }
        out.push(t);
    }
    Ok(out)
}

/// What one pass of the workload measured: the engine's counters over the pass, and the
/// speed of its last steps.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RunMeasure {
    /// [`Stats::since`] the pass began: tokens, peak cells, evictions, prefill and decode times.
    #[serde(flatten)]
    pub stats: Stats,
    /// Live cells after the pass.
    pub live_cells: usize,
    /// The last `tail_tokens` decode steps (the end of the stream).
    pub tail_tokens: usize,
    pub tail_seconds: f64,
    pub tail_decode_tok_s: f64,
}

impl RunMeasure {
    pub fn prefill_tok_s(&self) -> f64 {
        self.stats.prefill_tok_s()
    }
    pub fn decode_tok_s(&self) -> f64 {
        self.stats.decode_tok_s()
    }
}

/// Runs `prompt` then `gen` greedy decode steps on a fresh cache (the engine is reset first),
/// timing the last `tail` steps separately. End-of-generation tokens do not stop it: the
/// workload always decodes `gen` tokens.
pub fn run_workload(
    engine: &mut Engine,
    prompt: &[Token],
    gen: usize,
    tail: usize,
) -> Result<RunMeasure> {
    if prompt.is_empty() {
        return Err(Error::invalid("the benchmark prompt is empty"));
    }
    engine.reset();
    let before = engine.stats().clone();
    let mut greedy = Sampler::new(engine.model(), &SamplingParams::greedy())?;
    let tail = tail.min(gen);
    // The callback runs once per sampled token: the first after the prefill, each later one
    // after one more decode step. `gen + 1` samples make `gen` decodes (the last sample is
    // left undecoded). Prefill and decode times are the engine's; the tail is timed here,
    // between samples, since the engine cannot be read while it generates.
    let mut marks: Vec<Instant> = Vec::with_capacity(gen + 1);
    generate(
        engine,
        &mut greedy,
        prompt,
        Limits {
            max_tokens: gen.saturating_add(1),
            ignore_eog: true,
        },
        &mut |_, _| true,
        &mut |_| {
            marks.push(Instant::now());
            true
        },
    )?;
    let Some(&end) = marks.last() else {
        return Err(Error::invalid("the benchmark sampled no token"));
    };
    let tail_seconds = (end - marks[marks.len() - 1 - tail]).as_secs_f64();
    Ok(RunMeasure {
        stats: engine.stats().since(&before),
        live_cells: engine.live_cells(),
        tail_tokens: tail,
        tail_seconds,
        tail_decode_tok_s: rate(tail as u64, tail_seconds),
    })
}

/// Median of a non-empty list (mean of the middle two for an even count); 0 when empty.
pub fn median(values: &[f64]) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

/// Per-rep measures of two arms run alternately (A, B, A, B…) and their ratios.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Comparison {
    pub a: Vec<RunMeasure>,
    pub b: Vec<RunMeasure>,
}

impl Comparison {
    /// Per rep, `f(b) / f(a)`.
    pub fn ratios(&self, f: impl Fn(&RunMeasure) -> f64) -> Vec<f64> {
        self.a
            .iter()
            .zip(&self.b)
            .map(|(a, b)| if f(a) > 0.0 { f(b) / f(a) } else { 0.0 })
            .collect()
    }

    pub fn median_of(runs: &[RunMeasure], f: impl Fn(&RunMeasure) -> f64) -> f64 {
        median(&runs.iter().map(f).collect::<Vec<_>>())
    }
}

/// Runs the workload on `a` then `b`, `reps` times, alternating, so slow drifts of the machine
/// (other load, clocks) hit both arms alike. One untimed warm-up of each arm first.
pub fn compare(
    a: &mut Engine,
    b: &mut Engine,
    prompt: &[Token],
    gen: usize,
    tail: usize,
    reps: usize,
    on_rep: &mut dyn FnMut(usize, &RunMeasure, &RunMeasure),
) -> Result<Comparison> {
    let short = &prompt[..prompt.len().min(64)];
    run_workload(a, short, gen.min(8), 0)?;
    run_workload(b, short, gen.min(8), 0)?;
    let mut out = Comparison::default();
    for rep in 0..reps.max(1) {
        let ma = run_workload(a, prompt, gen, tail)?;
        let mb = run_workload(b, prompt, gen, tail)?;
        on_rep(rep, &ma, &mb);
        out.a.push(ma);
        out.b.push(mb);
    }
    Ok(out)
}

/// Bytes one decode step must read at least, as weights: every matrix once, except the token
/// embedding, of which a step reads one row (unless the model has no `output.weight` and
/// uses the embedding as its output matrix too).
pub fn weight_bytes_per_step(path: &std::path::Path) -> Result<u64> {
    let file = gguf_tools::gguf::read(path).map_err(|e| Error::invalid(e.to_string()))?;
    let tied = !file.tensors.iter().any(|t| t.name == "output.weight");
    Ok(file
        .tensors
        .iter()
        .filter(|t| tied || t.name != "token_embd.weight")
        .map(|t| t.size())
        .sum())
}

/// The bandwidth bound of a long-context comparison: if a decode step only moved bytes
/// (weights + the K and V of the live cells), the budgeted cache could be this much faster.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct BandwidthBound {
    pub weight_bytes: u64,
    pub kv_bytes_read_full: u64,
    pub kv_bytes_read_budget: u64,
    /// (weights + live KV of the full cache) / (weights + live KV of the budgeted cache).
    pub bound: f64,
}

impl BandwidthBound {
    /// `kv_bytes_per_cell` over all layers; live cells of each arm at the end of the stream.
    pub fn new(
        weight_bytes: u64,
        kv_bytes_per_cell: f64,
        live_full: usize,
        live_budget: usize,
    ) -> Self {
        let full = (kv_bytes_per_cell * live_full as f64) as u64;
        let budget = (kv_bytes_per_cell * live_budget as f64) as u64;
        let bound = (weight_bytes + full) as f64 / (weight_bytes + budget).max(1) as f64;
        BandwidthBound {
            weight_bytes,
            kv_bytes_read_full: full,
            kv_bytes_read_budget: budget,
            bound,
        }
    }

    /// The share of the bound an achieved speed ratio reaches.
    pub fn share(&self, ratio: f64) -> f64 {
        if self.bound > 0.0 {
            ratio / self.bound
        } else {
            0.0
        }
    }
}

/// Unit-norm random filters (seeded) of the model's shape: for speed measurements and checks
/// where no calibrated filters exist; scoring costs the same as with real ones.
pub fn random_filters(model: &Model, seed: u64) -> Result<gguf_tools::filters::QFilters> {
    let mut filters =
        random_filters_of_shape(model.n_layer(), model.n_head_kv(), model.head_dim(), seed)?;
    // Random `expected-attention` statistics too, with the model's RoPE as calibration would
    // verify it (the first candidate), so that every policy runs on random inputs.
    if let Some(rope) = crate::calibrate::rope_candidates(model).first() {
        crate::policy::QueryStats::random(
            model.n_layer(),
            model.n_head(),
            model.head_dim(),
            *rope,
            seed,
        )
        .store(&mut filters)?;
    }
    Ok(filters)
}

/// [`random_filters`] of shape `[l, h, d]` (layers, KV heads, head dim), for tests that need
/// filters for a model they do not load, or of a shape no model has.
pub fn random_filters_of_shape(
    l: usize,
    h: usize,
    d: usize,
    seed: u64,
) -> Result<gguf_tools::filters::QFilters> {
    let mut state = seed ^ 0xF1_17E5;
    let mut data = Vec::with_capacity(l * h * d);
    for _ in 0..l * h {
        let v: Vec<f32> = (0..d)
            .map(|_| (splitmix64(&mut state) >> 11) as f32 / (1u64 << 53) as f32 * 2.0 - 1.0)
            .collect();
        let norm = crate::math::dot(&v, &v).sqrt().max(1e-6);
        data.extend(v.iter().map(|x| x / norm));
    }
    gguf_tools::filters::QFilters::new(l, h, d, data).map_err(|e| Error::invalid(e.to_string()))
}

/// How the scores of the two key sources compare (see [`compare_key_paths`]).
#[derive(Debug, Clone, Default, Serialize)]
pub struct KeyPathReport {
    /// (layer, head, cell) slots compared.
    pub compared: usize,
    pub max_abs_diff: f32,
    /// max |Δ| / max(1, |s|).
    pub max_rel_diff: f32,
    /// Decodes after which the K-index input, read back after `llama_decode`, no longer held
    /// the cells the decode wrote (the graph allocator reused its memory).
    pub cells_reused_after_decode: usize,
    pub decodes: usize,
}

/// Runs `prompt` then `gen` greedy steps through `graph` (keys from the `Kcur` nodes) and
/// `cache` (keys read back from the K cache) and compares the scores the two books hold for
/// every live slot. Both engines must be built with a budget that evicts nothing.
pub fn compare_key_paths(
    graph: &mut Engine,
    cache: &mut Engine,
    prompt: &[Token],
    gen: usize,
) -> Result<KeyPathReport> {
    let mut report = KeyPathReport::default();
    let mut tokens = Vec::new();
    for engine in [&mut *graph, &mut *cache] {
        engine.reset();
        let mut reused = 0;
        let mut decodes = 0;
        let check = |ctx: &crate::ffi::Context, reused: &mut usize| -> Result<()> {
            let layer = (0..ctx.kv_layers()).find(|&l| ctx.kv_layer_present(l));
            if let Some(layer) = layer {
                let (during, after) = (ctx.last_cells(layer)?, ctx.last_cells_after_decode(layer)?);
                let same = during.len() == after.len()
                    && during.iter().zip(&after).all(|(&a, &b)| a as i64 == b);
                if !same {
                    *reused += 1;
                }
            }
            Ok(())
        };
        engine.ingest(prompt, Logits::Last, &mut |chunk| {
            decodes += 1;
            check(chunk.context(), &mut reused)
        })?;
        let mut token = argmax(engine.last_logits()?) as Token;
        let record = tokens.is_empty();
        for i in 0..gen {
            // Same tokens through both engines, so their caches hold the same keys.
            if !record {
                token = tokens[i];
            } else {
                tokens.push(token);
            }
            engine.step(token)?;
            decodes += 1;
            check(engine.context(), &mut reused)?;
            token = argmax(engine.last_logits()?) as Token;
        }
        engine.flush_scores()?;
        report.cells_reused_after_decode += reused;
        report.decodes += decodes;
    }
    let (Some(a), Some(b)) = (graph.book(), cache.book()) else {
        return Err(Error::KvCache("no cache book (nothing was scored)".into()));
    };
    let n_head = graph.model().n_head_kv();
    for cell in 0..a.n_cells().min(b.n_cells()) {
        if a.cell_position(cell).is_none() {
            continue;
        }
        if a.cell_position(cell) != b.cell_position(cell) {
            return Err(Error::KvCache(format!(
                "cell {cell} holds position {:?} on one path and {:?} on the other",
                a.cell_position(cell),
                b.cell_position(cell)
            )));
        }
        for l in a.layers() {
            for h in 0..n_head {
                let (x, y) = (a.slot_score(l, h, cell), b.slot_score(l, h, cell));
                let d = (x - y).abs();
                report.max_abs_diff = report.max_abs_diff.max(d);
                report.max_rel_diff = report.max_rel_diff.max(d / x.abs().max(1.0));
                report.compared += 1;
            }
        }
    }
    Ok(report)
}

/// What [`check_head_moves`] found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct HeadMoveReport {
    /// (layer 0, head, live cell) slots compared against the cache that never evicted.
    pub checked: usize,
    /// Of those, slots holding a token other than their cell's label (moved there).
    pub moved: usize,
    /// Of those, slots whose K or V bytes differ from the never-evicting cache's (a moved
    /// slice is copied as stored, never requantized: 0 on every cache type).
    pub differing: usize,
    pub head_slices_moved: u64,
    /// Eviction rounds whose moves ran as one graph on the cache's device.
    pub device_move_rounds: u64,
    /// Largest |difference| between a slot's K or V and the never-evicting cache's.
    pub max_abs_diff: f32,
    /// Cells the evicting cache holds at the end.
    pub live_cells: usize,
}

/// Per-head eviction (knorm, `--granularity head`) over `prompt` in chunks of `chunk`, with
/// `budget` cells, against a cache that never evicts: every (layer 0, head, live cell) slot must
/// hold exactly the K and V of the position the book says. Layer 0's K and V depend only on the
/// token and its position, so the two caches are comparable. `threads` for llama.cpp; K and V
/// stored as `cache_type` in both caches.
pub fn check_head_moves(
    model: &std::sync::Arc<Model>,
    prompt: &[Token],
    budget: usize,
    chunk: usize,
    threads: i32,
    cache_type: CacheType,
) -> Result<HeadMoveReport> {
    use crate::engine::cache::{Combiner, EvictionConfig, Granularity};
    use crate::engine::EngineConfig;
    let engine_for = |policy: &str, cache: EngineConfig| -> Result<Engine> {
        let scorer = crate::policy::build(
            policy,
            &crate::policy::PolicyInputs {
                filters: None,
                seed: 1,
                recency: 0.0,
                mix_weight: 1.0,
            },
        )?;
        Engine::new(
            model,
            scorer,
            EngineConfig {
                n_batch: chunk,
                threads,
                flash_attn: Some(true),
                type_k: cache_type,
                type_v: cache_type,
                ..cache
            },
        )
    };
    let mut full = engine_for("none", EngineConfig::full(prompt.len() + 1))?;
    full.ingest(prompt, Logits::Last, &mut |_| Ok(()))?;
    let mut evicting = engine_for(
        "knorm",
        EngineConfig {
            job_tokens: Some(prompt.len() + 1),
            ..EngineConfig::bounded(EvictionConfig {
                budget,
                window: 8,
                sinks: 2,
                granularity: Granularity::Head,
                combiner: Combiner::MeanZ,
                slack: 0,
            })
        },
    )?;
    evicting.ingest(prompt, Logits::Last, &mut |_| Ok(()))?;
    let mut r = HeadMoveReport {
        head_slices_moved: evicting.stats().head_slices_moved,
        device_move_rounds: evicting.stats().device_move_rounds,
        live_cells: evicting.live_cells(),
        ..HeadMoveReport::default()
    };
    let book = evicting
        .book()
        .ok_or_else(|| Error::KvCache("no cache book".into()))?
        .clone();
    let (h_kv, d) = (model.n_head_kv(), model.head_dim());
    let slice = cache_type
        .bytes(d)
        .ok_or_else(|| Error::invalid(format!("a head is not whole {cache_type} blocks")))?;
    for cell in 0..book.n_cells() {
        if book.cell_position(cell).is_none() {
            continue;
        }
        let k = evicting.read_cache_row(0, false, cell)?;
        let v = evicting.read_cache_row(0, true, cell)?;
        let kb = evicting.read_cache_row_bytes(0, false, cell)?;
        let vb = evicting.read_cache_row_bytes(0, true, cell)?;
        for h in 0..h_kv {
            let p = book
                .slot_position(TrackedLayer(0), h, cell)
                .ok_or_else(|| Error::KvCache(format!("live cell {cell} has an empty slot")))?;
            if Some(p) != book.cell_position(cell) {
                r.moved += 1;
            }
            // A cache that never evicted holds position p in cell p.
            let rk = full.read_cache_row(0, false, p as usize)?;
            let rv = full.read_cache_row(0, true, p as usize)?;
            for (a, b) in [(&k, &rk), (&v, &rv)] {
                for i in h * d..(h + 1) * d {
                    r.max_abs_diff = r.max_abs_diff.max((a[i] - b[i]).abs());
                }
            }
            let rkb = full.read_cache_row_bytes(0, false, p as usize)?;
            let rvb = full.read_cache_row_bytes(0, true, p as usize)?;
            let s = h * slice..(h + 1) * slice;
            let same = |a: &[u8], b: &[u8]| {
                a.get(s.clone())
                    .is_some_and(|x| b.get(s.clone()) == Some(x))
            };
            if !(same(&kb, &rkb) && same(&vb, &rvb)) {
                r.differing += 1;
            }
            r.checked += 1;
        }
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_odd_even_and_nan() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(&[f64::NAN, 5.0]), 5.0);
        assert_eq!(median(&[]), 0.0);
    }

    #[test]
    fn bound_is_the_ratio_of_bytes_moved() {
        // 100 bytes of weights, 2 bytes per cell: 1000 live cells against 100.
        let b = BandwidthBound::new(100, 2.0, 1000, 100);
        assert_eq!(b.kv_bytes_read_full, 2000);
        assert_eq!(b.kv_bytes_read_budget, 200);
        assert!((b.bound - 2100.0 / 300.0).abs() < 1e-12);
        assert!((b.share(3.5) - 0.5).abs() < 1e-12);
    }
}
