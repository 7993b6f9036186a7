//! Q-Filters computed from a GGUF model itself: run text through llama.cpp, sample post-RoPE
//! queries, take each query head's principal direction.
//!
//! Recipe (Godey et al. 2025): per layer and query head, `v` is the first right singular
//! vector of the sampled `[samples × head_dim]` query matrix, without centering; its sign is
//! chosen so that most entries of the first left singular vector are positive; the `v` of
//! the query heads sharing a KV head are averaged (no renormalisation); the stored filter is
//! `f = −v`, so a key's score is `−⟨k, f⟩ = ⟨k, v⟩`.
//!
//! Only the top singular vector is needed, so instead of a full SVD this uses power iteration
//! on the `head_dim × head_dim` Gram matrix `QᵀQ` in f64: the Gram matrix costs one pass over
//! the samples, each iteration is a 64×64 mat-vec, and no linear-algebra crate is needed. The
//! unit tests check it against a Jacobi eigen-solver.

pub mod check;
mod query_stats;
pub mod tune;

pub use query_stats::QueryStatsOutcome;

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::ffi::{Batch, Context, ContextParams, GraphObserver, Model, NodeInfo, NodeOp, Token};
use crate::math::splitmix64;

/// Power iteration stops when no component of `v` moves by more than this.
pub const POWER_TOLERANCE: f64 = 1e-12;
pub const POWER_MAX_ITERATIONS: usize = 5000;

/// The defaults: one window of 2048 tokens, 1000 of its query positions per layer. On
/// SmolLM2-135M (tinyshakespeare) every (layer, KV head) filter is then within cosine 0.99 of
/// a 16,384-token, 3000-sample calibration (worst 0.994 over three seeds; on
/// Qwen2.5-Coder-0.5B 47 of 48, one layer-0 head moving with the text even at 8192 tokens),
/// at an eighth of its cost; 1024 tokens fall to 0.92
/// (the queries' direction depends on their positions, and such a window never reaches
/// positions 1024–2047), and more samples of the same window change nothing
/// (docs/RESULTS.md, "Calibration: samples against cosine"; scripts/calibration-curve.sh).
#[derive(Debug, Clone)]
pub struct CalibrationConfig {
    /// Text tokens to run through the model (fewer if the text is shorter).
    pub tokens: usize,
    /// Tokens per independent window (the cache is cleared between windows). Filters follow
    /// the positions they were sampled at, so this is the context they are made for.
    pub seq_len: usize,
    /// Query positions sampled per layer (the paper finds about 1000 enough).
    pub samples: usize,
    pub seed: u64,
    pub threads: i32,
    /// Tokens per llama_decode call inside a window.
    pub n_batch: usize,
}

impl Default for CalibrationConfig {
    fn default() -> Self {
        Self {
            tokens: 2048,
            seq_len: 2048,
            samples: 1000,
            seed: 0,
            threads: crate::ffi::threads::default_threads(),
            n_batch: 512,
        }
    }
}

/// The result of a calibration, in the published convention.
#[derive(Debug, Clone)]
pub struct Calibration {
    pub num_layers: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// `f = −v`, flattened `[layer][kv_head][dim]`.
    pub filters: Vec<f32>,
    /// Text tokens actually run through the model.
    pub tokens: usize,
    /// Query positions sampled (per layer).
    pub samples: usize,
    /// Query heads whose power iteration hit the iteration cap (their top two singular values
    /// are nearly equal, so the direction is ill-defined anyway).
    pub unconverged_heads: usize,
    /// The `expected-attention` statistics from the same samples, or why there are none.
    pub query_stats: QueryStatsOutcome,
}

/// `k` distinct sorted indices out of `0..n` (Knuth's selection sampling: one pass, memory
/// only for the answer, deterministic for a seed).
pub fn sample_positions(n: usize, k: usize, seed: u64) -> Vec<usize> {
    let k = k.min(n);
    let mut out = Vec::with_capacity(k);
    let mut state = seed;
    for i in 0..n {
        let needed = k - out.len();
        if needed == 0 {
            break;
        }
        let remaining = n - i;
        // Uniform in [0, remaining) from 53 random bits; exact enough for any realistic n.
        let u = (splitmix64(&mut state) >> 11) as f64 / (1u64 << 53) as f64;
        if ((u * remaining as f64) as usize) < needed {
            out.push(i);
        }
    }
    out
}

/// `Σ q qᵀ` over `rows` (each `dim` long, at `offset` within a row of length `stride`), f64.
pub fn gram(data: &[f32], stride: usize, offset: usize, dim: usize) -> Vec<f64> {
    let mut g = vec![0f64; dim * dim];
    let mut q = vec![0f64; dim];
    for row in data.chunks_exact(stride) {
        for (d, &x) in q.iter_mut().zip(&row[offset..offset + dim]) {
            *d = x as f64;
        }
        for i in 0..dim {
            let qi = q[i];
            // Upper triangle only; mirrored below.
            for j in i..dim {
                g[i * dim + j] += qi * q[j];
            }
        }
    }
    for i in 0..dim {
        for j in 0..i {
            g[i * dim + j] = g[j * dim + i];
        }
    }
    g
}

/// Top eigenvector (unit, f64) and eigenvalue of a symmetric positive semi-definite `d × d`
/// matrix by power iteration; `converged` is false if the iteration cap was hit.
pub fn top_eigenvector(g: &[f64], d: usize) -> (Vec<f64>, f64, bool) {
    if d == 0 || g.len() != d * d {
        return (Vec::new(), 0.0, true);
    }
    // Start from the column with the largest diagonal entry: deterministic, never zero for a
    // non-zero PSD matrix, and never orthogonal to the top eigenvector in practice.
    let k = (0..d)
        .max_by(|&a, &b| g[a * d + a].total_cmp(&g[b * d + b]))
        .unwrap_or(0);
    let mut v: Vec<f64> = (0..d).map(|i| g[i * d + k]).collect();
    if normalize(&mut v) == 0.0 {
        let mut e = vec![0.0; d];
        e[0] = 1.0;
        return (e, 0.0, true);
    }
    let mut w = vec![0f64; d];
    let mut converged = false;
    for _ in 0..POWER_MAX_ITERATIONS {
        mat_vec(g, &v, &mut w);
        if normalize(&mut w) == 0.0 {
            break;
        }
        let change = v
            .iter()
            .zip(&w)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        std::mem::swap(&mut v, &mut w);
        if change < POWER_TOLERANCE {
            converged = true;
            break;
        }
    }
    mat_vec(g, &v, &mut w);
    let lambda = v.iter().zip(&w).map(|(a, b)| a * b).sum();
    (v, lambda, converged)
}

fn mat_vec(g: &[f64], v: &[f64], out: &mut [f64]) {
    let d = v.len();
    for (i, o) in out.iter_mut().enumerate() {
        *o = g[i * d..(i + 1) * d]
            .iter()
            .zip(v)
            .map(|(a, b)| a * b)
            .sum();
    }
}

fn normalize(v: &mut [f64]) -> f64 {
    let n = v.iter().map(|x| x * x).sum::<f64>().sqrt();
    if n > 0.0 && n.is_finite() {
        v.iter_mut().for_each(|x| *x /= n);
        n
    } else {
        0.0
    }
}

/// The paper's sign rule: keep `v` when more than half of the entries of `u = Qv / σ` are
/// positive, else flip it. Rows as in [`gram`].
pub fn orient(v: &mut [f64], data: &[f32], stride: usize, offset: usize) {
    let dim = v.len();
    let mut rows = 0usize;
    let mut positive = 0usize;
    for row in data.chunks_exact(stride) {
        let proj: f64 = row[offset..offset + dim]
            .iter()
            .zip(v.iter())
            .map(|(&q, &x)| q as f64 * x)
            .sum();
        rows += 1;
        positive += usize::from(proj > 0.0);
    }
    if 2 * positive <= rows {
        v.iter_mut().for_each(|x| *x = -*x);
    }
}

/// Averages the `v` of consecutive query heads sharing a KV head (llama.cpp's grouping: query
/// head `j` reads KV head `j / (n_head / n_head_kv)`), without renormalising.
pub fn average_groups(per_q_head: &[Vec<f64>], n_head_kv: usize) -> Result<Vec<Vec<f64>>> {
    let n_head = per_q_head.len();
    if n_head.checked_rem(n_head_kv) != Some(0) {
        return Err(Error::invalid(format!(
            "{n_head} query heads cannot be grouped onto {n_head_kv} KV heads"
        )));
    }
    let group = n_head / n_head_kv;
    Ok(per_q_head
        .chunks(group)
        .map(|heads| {
            let dim = heads[0].len();
            (0..dim)
                .map(|d| heads.iter().map(|h| h[d]).sum::<f64>() / group as f64)
                .collect()
        })
        .collect())
}

/// Filters of one layer (`[kv_head][dim]`, published convention `f = −v`) from its sampled
/// queries `[samples][n_head * head_dim]`. Returns the filters and the count of unconverged
/// heads.
pub fn layer_filters(
    queries: &[f32],
    n_head: usize,
    n_head_kv: usize,
    head_dim: usize,
) -> Result<(Vec<f32>, usize)> {
    let stride = n_head * head_dim;
    let mut unconverged = 0;
    let mut vs = Vec::with_capacity(n_head);
    for h in 0..n_head {
        let g = gram(queries, stride, h * head_dim, head_dim);
        let (mut v, _, converged) = top_eigenvector(&g, head_dim);
        unconverged += usize::from(!converged);
        orient(&mut v, queries, stride, h * head_dim);
        vs.push(v);
    }
    let groups = average_groups(&vs, n_head_kv)?;
    Ok((
        groups.iter().flatten().map(|&x| -(x as f32)).collect(),
        unconverged,
    ))
}

/// Sampled post-RoPE queries: the graph observer of the calibration decodes.
struct Samples {
    n_head: usize,
    head_dim: usize,
    n_layer: usize,
    n_samples: usize,
    /// `[layer][sample][n_head * head_dim]`.
    buf: Vec<f32>,
    /// Rows of the current batch to keep: (row in batch, sample slot, position).
    pending: Vec<(usize, usize, i32)>,
    /// Tokens in the current batch.
    batch_tokens: usize,
    /// Rows stored per layer, to detect layers whose node was never seen.
    filled: Vec<usize>,
    /// The pending rows of the last pre-RoPE query node seen, per layer (the ROPE node's input).
    pre: Vec<Vec<f32>>,
    stats: query_stats::QueryStatsAcc,
}

impl GraphObserver for Samples {
    fn wants(&mut self, node: &NodeInfo) -> bool {
        let s = self;
        if s.pending.is_empty() || node.layer.is_none_or(|l| l >= s.n_layer) {
            return false;
        }
        if node.op == NodeOp::Rope {
            return node.base == "Qcur"
                && node.ne[0] as usize == s.head_dim
                && node.ne[1] as usize == s.n_head;
        }
        // The queries before RoPE: the projection (`Qcur`, with its bias when there is one)
        // or, with QK-norm, `Qcur_normed`; the last of them is the ROPE node's input.
        let values: i64 = node.ne.iter().map(|&n| n.max(1)).product();
        (node.base == "Qcur" || node.base == "Qcur_normed")
            && values == (s.n_head * s.head_dim * s.batch_tokens) as i64
    }

    fn observe(&mut self, node: &NodeInfo, data: &[f32]) {
        let s = self;
        let Some(layer) = node.layer else { return };
        let stride = s.n_head * s.head_dim;
        let pending = std::mem::take(&mut s.pending);
        if node.op != NodeOp::Rope {
            let pre = &mut s.pre[layer];
            pre.clear();
            for &(row, _, _) in &pending {
                if let Some(src) = data.get(row * stride..(row + 1) * stride) {
                    pre.extend_from_slice(src);
                }
            }
            s.pending = pending;
            return;
        }
        let base = layer * s.n_samples * stride;
        let pre = std::mem::take(&mut s.pre[layer]);
        let mut stored = 0;
        for (i, &(row, slot, pos)) in pending.iter().enumerate() {
            if let Some(src) = data.get(row * stride..(row + 1) * stride) {
                let dst = base + slot * stride;
                s.buf[dst..dst + stride].copy_from_slice(src);
                stored += 1;
                if let Some(q) = pre.get(i * stride..(i + 1) * stride) {
                    s.stats.push(layer, pos, q, src);
                }
            }
        }
        s.filled[layer] += stored;
        s.pending = pending;
        s.pre[layer] = pre;
        s.pre[layer].clear();
    }
}

/// Runs `tokens` (already tokenized text, no BOS) through the model in independent windows and
/// computes the filters. `progress(done, total)` is called after each batch.
pub fn calibrate(
    model: &Arc<Model>,
    tokens: &[Token],
    cfg: &CalibrationConfig,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Calibration> {
    if cfg.seq_len < 2 {
        return Err(Error::invalid("--seq-len must be at least 2"));
    }
    if cfg.samples == 0 {
        return Err(Error::invalid("--samples must be at least 1"));
    }
    let total = cfg.tokens.min(tokens.len());
    if total == 0 {
        return Err(Error::invalid(
            "no text tokens to calibrate on: give a non-empty --text file and --tokens > 0",
        ));
    }
    let tokens = &tokens[..total];
    let (n_layer, n_head, n_head_kv, head_dim) = (
        model.n_layer(),
        model.n_head(),
        model.n_head_kv(),
        model.head_dim(),
    );
    if n_head.checked_rem(n_head_kv) != Some(0) || head_dim == 0 {
        return Err(Error::invalid(format!(
            "unsupported attention shape: {n_head} query heads, {n_head_kv} KV heads, head dim {head_dim}"
        )));
    }
    let positions = sample_positions(total, cfg.samples, cfg.seed);
    let n_samples = positions.len();
    let stride = n_head * head_dim;
    let buf_len = n_layer
        .checked_mul(n_samples)
        .and_then(|n| n.checked_mul(stride))
        .ok_or_else(|| Error::invalid("--samples too large"))?;
    let mut samples = Samples {
        n_head,
        head_dim,
        n_layer,
        n_samples,
        buf: vec![0.0; buf_len],
        pending: Vec::new(),
        batch_tokens: 0,
        filled: vec![0; n_layer],
        pre: vec![Vec::new(); n_layer],
        stats: query_stats::QueryStatsAcc::new(n_layer, n_head, head_dim, rope_candidates(model)),
    };

    // A window starts with BOS when the model expects one, as every real context does; the
    // BOS query itself is never sampled.
    let bos = model.bos().filter(|_| model.add_bos());
    let prefix = usize::from(bos.is_some());
    let text_per_window = cfg.seq_len - prefix;
    let n_batch = cfg.n_batch.clamp(1, cfg.seq_len);
    let mut ctx = Context::new(
        model,
        &ContextParams {
            n_ctx: u32::try_from(cfg.seq_len).map_err(|_| Error::invalid("--seq-len too large"))?,
            n_batch: n_batch as u32,
            threads: cfg.threads,
            flash_attn: None,
            hook: true,
            ..ContextParams::default()
        },
    )?;
    let mut batch = Batch::new(n_batch)?;
    let mut next_sample = 0usize;
    let mut done = 0usize;
    for (w, window) in tokens.chunks(text_per_window).enumerate() {
        ctx.clear_memory();
        let first = w * text_per_window;
        let seq: Vec<(Option<usize>, Token)> = bos
            .map(|b| (None, b))
            .into_iter()
            .chain(
                window
                    .iter()
                    .enumerate()
                    .map(|(i, &t)| (Some(first + i), t)),
            )
            .collect();
        for (c, chunk) in seq.chunks(n_batch).enumerate() {
            batch.clear();
            let mut pending = Vec::new();
            for (i, &(text_idx, tok)) in chunk.iter().enumerate() {
                let pos = (c * n_batch + i) as i32;
                batch.push(tok, pos, i + 1 == chunk.len())?;
                if let Some(idx) = text_idx {
                    if positions.get(next_sample) == Some(&idx) {
                        pending.push((i, next_sample, pos));
                        next_sample += 1;
                    }
                }
            }
            samples.pending = pending;
            samples.batch_tokens = chunk.len();
            ctx.decode_observed(&batch, &mut samples)?;
            done += chunk.iter().filter(|(t, _)| t.is_some()).count();
            progress(done, total);
        }
    }
    drop(ctx);

    if let Some(layer) = samples.filled.iter().position(|&n| n != n_samples) {
        return Err(Error::invalid(format!(
            "layer {layer}: found {} of {n_samples} sampled queries; this model's graph has no post-RoPE `Qcur-{layer}` node of shape [{head_dim}, {n_head}, tokens] (architecture {} is not supported by calibrate)",
            samples.filled[layer],
            model.architecture()
        )));
    }
    let mut filters = Vec::with_capacity(n_layer * n_head_kv * head_dim);
    let mut unconverged_heads = 0;
    for layer in samples.buf.chunks_exact(n_samples * stride) {
        let (f, u) = layer_filters(layer, n_head, n_head_kv, head_dim)?;
        filters.extend(f);
        unconverged_heads += u;
    }
    let query_stats = samples.stats.finish(
        crate::policy::EXPECTED_ATTENTION_RANK,
        crate::policy::EXPECTED_ATTENTION_FUTURE,
    );
    Ok(Calibration {
        num_layers: n_layer,
        num_kv_heads: n_head_kv,
        head_dim,
        filters,
        tokens: total,
        samples: n_samples,
        unconverged_heads,
        query_stats,
    })
}

/// The RoPE variants calibration checks each layer's queries against (`crate::rope`): the
/// model's pairing with its frequency base and scale from the GGUF, then the same with the
/// defaults sliding-window layers often use instead (base 10000, scale 1). Nothing when the
/// model's RoPE is of a kind qfilters does not reproduce.
pub(crate) fn rope_candidates(model: &Model) -> Vec<crate::rope::RopeSpec> {
    let Some(neox) = model.rope_neox() else {
        return Vec::new();
    };
    let arch = model.architecture();
    let meta_f32 = |key: &str| {
        model
            .meta(&format!("{arch}.{key}"))
            .and_then(|v| v.trim().parse::<f32>().ok())
    };
    let n_dims = model
        .meta(&format!("{arch}.rope.dimension_count"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| model.head_dim());
    let mut out = Vec::new();
    for base in [
        meta_f32("rope.freq_base"),
        meta_f32("rope.freq_base_swa"),
        Some(10000.0),
    ]
    .into_iter()
    .flatten()
    {
        for scale in [model.rope_freq_scale(), 1.0] {
            let spec = crate::rope::RopeSpec {
                neox,
                n_dims,
                base,
                scale,
            };
            if !out.contains(&spec) {
                out.push(spec);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rng_matrix(rows: usize, cols: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..rows * cols)
            .map(|_| ((splitmix64(&mut s) >> 40) as f32 / (1u64 << 24) as f32) - 0.5)
            .collect()
    }

    /// Classical cyclic Jacobi: eigenvalues and eigenvectors (columns) of a symmetric matrix.
    fn jacobi(a: &[f64], n: usize) -> (Vec<f64>, Vec<f64>) {
        let mut a = a.to_vec();
        let mut v = vec![0.0; n * n];
        for i in 0..n {
            v[i * n + i] = 1.0;
        }
        for _sweep in 0..100 {
            let off: f64 = (0..n)
                .flat_map(|i| (0..n).filter(move |&j| j != i).map(move |j| (i, j)))
                .map(|(i, j)| a[i * n + j] * a[i * n + j])
                .sum();
            if off < 1e-22 {
                break;
            }
            for p in 0..n {
                for q in p + 1..n {
                    let apq = a[p * n + q];
                    if apq.abs() < 1e-300 {
                        continue;
                    }
                    let theta = (a[q * n + q] - a[p * n + p]) / (2.0 * apq);
                    let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                    let t = if theta == 0.0 { 1.0 } else { t };
                    let c = 1.0 / (t * t + 1.0).sqrt();
                    let s = t * c;
                    for k in 0..n {
                        let akp = a[k * n + p];
                        let akq = a[k * n + q];
                        a[k * n + p] = c * akp - s * akq;
                        a[k * n + q] = s * akp + c * akq;
                    }
                    for k in 0..n {
                        let apk = a[p * n + k];
                        let aqk = a[q * n + k];
                        a[p * n + k] = c * apk - s * aqk;
                        a[q * n + k] = s * apk + c * aqk;
                    }
                    for k in 0..n {
                        let vkp = v[k * n + p];
                        let vkq = v[k * n + q];
                        v[k * n + p] = c * vkp - s * vkq;
                        v[k * n + q] = s * vkp + c * vkq;
                    }
                }
            }
        }
        ((0..n).map(|i| a[i * n + i]).collect(), v)
    }

    #[test]
    fn power_iteration_matches_jacobi_on_query_like_matrices() {
        for seed in 0..5u64 {
            let (rows, dim) = (400, 64);
            let mut q = rng_matrix(rows, dim, seed);
            // Queries have a strong shared direction (that is what the filters find); add one
            // with a seed-dependent strength, down to a small eigen-gap.
            let strength = 0.05 + 0.1 * seed as f32;
            for r in 0..rows {
                for d in 0..dim {
                    q[r * dim + d] += strength * ((d % 7) as f32 - 3.0);
                }
            }
            let g = gram(&q, dim, 0, dim);
            let (v, lambda, converged) = top_eigenvector(&g, dim);
            assert!(converged, "seed {seed}");
            let (vals, vecs) = jacobi(&g, dim);
            let top = (0..dim)
                .max_by(|&a, &b| vals[a].total_cmp(&vals[b]))
                .unwrap();
            assert!((lambda - vals[top]).abs() < 1e-8 * vals[top], "seed {seed}");
            let cos: f64 = (0..dim).map(|i| v[i] * vecs[i * dim + top]).sum();
            assert!(
                (cos.abs() - 1.0).abs() < 1e-9,
                "seed {seed}: |cos| = {}",
                cos.abs()
            );
        }
    }

    #[test]
    fn power_iteration_on_a_known_matrix() {
        // diag(1, 5, 2): top eigenvector is e1 with eigenvalue 5.
        let g = [1.0, 0.0, 0.0, 0.0, 5.0, 0.0, 0.0, 0.0, 2.0];
        let (v, lambda, converged) = top_eigenvector(&g, 3);
        assert!(converged);
        assert!((lambda - 5.0).abs() < 1e-12);
        assert!((v[1].abs() - 1.0).abs() < 1e-12);
        // A zero matrix gives a unit vector, not NaN.
        let (v, lambda, _) = top_eigenvector(&[0.0; 4], 2);
        assert_eq!(lambda, 0.0);
        assert!(v.iter().all(|x| x.is_finite()));
    }

    #[test]
    fn gram_uses_only_the_selected_head() {
        // Two heads of dim 2 per row; head 1 is [1, 2] in both rows.
        let rows = [9.0, 9.0, 1.0, 2.0, -9.0, 3.0, 1.0, 2.0];
        let g = gram(&rows, 4, 2, 2);
        assert_eq!(g, vec![2.0, 4.0, 4.0, 8.0]);
    }

    #[test]
    fn sign_follows_the_majority_of_projections() {
        // Three rows project positively on +e0, one negatively: +e0 is kept.
        let rows = [1.0, 0.0, 2.0, 1.0, 0.5, -3.0, -10.0, 0.0];
        let mut v = vec![1.0, 0.0];
        orient(&mut v, &rows, 2, 0);
        assert_eq!(v, vec![1.0, 0.0]);
        let mut v = vec![-1.0, 0.0];
        orient(&mut v, &rows, 2, 0);
        assert_eq!(v, vec![1.0, 0.0]);
        // A tie is not "more than half": the vector flips.
        let tie = [1.0, 0.0, -1.0, 0.0];
        let mut v = vec![1.0, 0.0];
        orient(&mut v, &tie, 2, 0);
        assert_eq!(v, vec![-1.0, 0.0]);
    }

    #[test]
    fn groups_average_consecutive_heads_without_renormalising() {
        let heads = vec![
            vec![1.0, 0.0],
            vec![0.0, 1.0],
            vec![1.0, 0.0],
            vec![1.0, 0.0],
        ];
        let g = average_groups(&heads, 2).unwrap();
        assert_eq!(g, vec![vec![0.5, 0.5], vec![1.0, 0.0]]);
        assert!(average_groups(&heads, 3).is_err());
        assert!(average_groups(&heads, 0).is_err());
    }

    #[test]
    fn layer_filters_are_negated_oriented_principal_directions() {
        // Queries along +e1 with small noise, two query heads, one KV head.
        let (rows, dim) = (50, 4);
        let noise = rng_matrix(rows, 2 * dim, 7);
        let q: Vec<f32> = (0..rows * 2 * dim)
            .map(|i| noise[i] * 0.1 + if i % dim == 1 { 3.0 } else { 0.0 })
            .collect();
        let (f, unconverged) = layer_filters(&q, 2, 1, dim).unwrap();
        assert_eq!(unconverged, 0);
        assert_eq!(f.len(), dim);
        assert!(f[1] < -0.99, "f = {f:?}");
    }

    #[test]
    fn sampled_positions_are_distinct_sorted_and_seeded() {
        let a = sample_positions(10_000, 300, 1);
        assert_eq!(a.len(), 300);
        assert!(a.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(a, sample_positions(10_000, 300, 1));
        assert_ne!(a, sample_positions(10_000, 300, 2));
        // Spread over the whole range, not bunched at the start.
        assert!(*a.last().unwrap() > 9_000 && a[0] < 1_000);
        assert_eq!(sample_positions(5, 10, 0), vec![0, 1, 2, 3, 4]);
    }
}
