//! Expected Attention (Devoto et al., 2025, arXiv 2510.00636; kvpress
//! `expected_attention_press.py`): keep the keys that future queries are expected to attend to
//! most, weighed by what their values carry.
//!
//! Future queries of a head are modelled as a Gaussian: mean `μ` and covariance `Σ` of its
//! pre-RoPE queries, measured by `qfilters calibrate` on the development text (the paper's
//! "with statistics" variant), with the RoPE rotation averaged over the next `F` positions
//! (`μ' = R̄μ`, `Σ' = R̄ΣR̄ᵀ`, `R̄ = mean over Δ = 1..F of R(Δ)`, F = 512 as in kvpress). For a key
//! `k` (pre-RoPE: the cached key rotated back from its position, see `crate::rope`), the
//! expected logit of query head `h` is `a_h = ⟨μ'_h, k⟩/√d + kᵀΣ'_h k/(2d)`, whose exponential
//! is the expected unnormalised attention under the Gaussian. kvpress then takes a softmax per
//! query head over the keys, averages the query heads of a GQA group, and multiplies by the
//! value norm.
//!
//! Scored once on entry, the softmax over all keys does not exist yet. Its role is to put the
//! query heads of a group on one scale before they are averaged, so each head's logit is
//! normalised by a running log-mean-exp of that head's logits over the document so far
//! (updated token by token, so a score does not depend on batching). The score, in log space
//! (the shared mechanism only ranks it, and the recency prior and combinations standardise
//! it): `ln mean_h exp(a_h − c_h) + ln ‖v‖`.
//!
//! `Σ'` is stored as a rank-`r` factor (`r` rows `√λ_j u_j` of its top eigenpairs), so the
//! quadratic term is `Σ_j ⟨√λ_j u_j, k⟩²`: `1 + r` dot products per query head and key.

use std::sync::Arc;

use gguf_tools::filters::{Extra, QFilters};

use super::{KeyReduce, NewKeys, PolicyInfo, Scorer};
use crate::error::{Error, Result};
use crate::rope::RopeSpec;

pub const INFO: PolicyInfo = PolicyInfo {
    name: "expected-attention",
    help: "keep keys with the highest expected attention from future queries, times the value norm (needs calibrated query statistics)",
    needs_filters: true,
    needs_query_stats: true,
    evicts: true,
    scores_vary_by_head: true,
    build: |inputs| {
        let filters = inputs
            .filters
            .as_ref()
            .ok_or_else(|| Error::invalid("expected-attention needs filters"))?;
        let stats = QueryStats::from_filters(filters)?.ok_or_else(|| {
            Error::invalid(format!(
                "policy 'expected-attention' needs query statistics, and the filters ({}) have none: make filters with this version's `qfilters calibrate` (published Q-Filters files carry none)",
                filters.source
            ))
        })?;
        Ok(Box::new(ExpectedAttention::new(
            Arc::new(stats),
            filters.shape()[1],
        )))
    },
};

/// Version of the statistics layout below (metadata `ea.version`).
pub const VERSION: &str = "1";
pub const META_VERSION: &str = "ea.version";
pub const META_FUTURE: &str = "ea.future_positions";
pub const TENSOR_MEAN: &str = "ea_query_mean";
pub const TENSOR_FACTOR: &str = "ea_query_factor";
pub const TENSOR_ROPE: &str = "ea_rope";
/// Future positions the RoPE rotation is averaged over (kvpress's `n_future_positions`).
pub const FUTURE_POSITIONS: usize = 512;
/// Rank of the stored covariance factor. 16 of 64 dims: on SmolLM2 the top 16 eigenvalues hold
/// most of the variance (calibrate reports the share), at 16 extra dot products per query head.
pub const RANK: usize = 16;

/// Whether `filters` carry the statistics this policy needs (of a version it reads).
pub fn available(filters: &QFilters) -> bool {
    filters.metadata.get(META_VERSION).map(String::as_str) == Some(VERSION)
}

/// Calibrated query statistics, per layer and query head, in the pre-RoPE frame with the
/// rotation over the next [`FUTURE_POSITIONS`] averaged in.
#[derive(Debug, Clone, PartialEq)]
pub struct QueryStats {
    pub n_layer: usize,
    /// Query heads (a multiple of the KV heads).
    pub n_head: usize,
    pub head_dim: usize,
    pub rank: usize,
    /// `[layer][head][dim]`: `μ' = R̄μ`.
    pub mean: Vec<f32>,
    /// `[layer][head][rank][dim]`: rows `√λ_j u_j` of `Σ' = R̄ΣR̄ᵀ`.
    pub factor: Vec<f32>,
    /// Each layer's RoPE, as calibration verified it against the model's graph.
    pub rope: Vec<RopeSpec>,
}

impl QueryStats {
    /// The statistics carried by `filters`; `None` when they have none. Malformed ones (a
    /// shape that does not match the filters, another version) are an error.
    pub fn from_filters(filters: &QFilters) -> Result<Option<QueryStats>> {
        let Some(version) = filters.metadata.get(META_VERSION) else {
            return Ok(None);
        };
        let bad = |why: String| {
            Error::invalid(format!(
                "the expected-attention statistics in {} are unusable ({why}); recalibrate with `qfilters calibrate`",
                filters.source
            ))
        };
        if version != VERSION {
            return Err(bad(format!(
                "version {version}, this build reads version {VERSION}"
            )));
        }
        let get = |name: &str| {
            filters
                .extra
                .get(name)
                .ok_or_else(|| bad(format!("tensor {name} is missing")))
        };
        let (mean, factor, rope) = (get(TENSOR_MEAN)?, get(TENSOR_FACTOR)?, get(TENSOR_ROPE)?);
        let [n_layer, n_kv, head_dim] = filters.shape();
        let (n_head, rank) = match (mean.shape.as_slice(), factor.shape.as_slice()) {
            ([l, h, d], [l2, h2, r, d2])
                if *l == n_layer
                    && *l2 == n_layer
                    && *d == head_dim
                    && *d2 == head_dim
                    && h == h2 =>
            {
                (*h, *r)
            }
            _ => {
                return Err(bad(format!(
                    "shapes {:?} and {:?} do not fit filters of shape {:?}",
                    mean.shape,
                    factor.shape,
                    filters.shape()
                )))
            }
        };
        if n_head == 0 || !crate::math::whole_blocks(n_head, n_kv) {
            return Err(bad(format!(
                "{n_head} query heads cannot be grouped onto {n_kv} KV heads"
            )));
        }
        if rope.shape != [n_layer, 4] {
            return Err(bad(format!(
                "tensor {TENSOR_ROPE} has shape {:?}",
                rope.shape
            )));
        }
        let rope: Vec<RopeSpec> = rope
            .data
            .chunks_exact(4)
            .map(|r| RopeSpec {
                neox: r[0] != 0.0,
                n_dims: r[1] as usize,
                base: r[2],
                scale: r[3],
            })
            .collect();
        if let Some(l) = rope.iter().position(|r| !r.fits(head_dim)) {
            return Err(bad(format!("layer {l}'s RoPE {:?} does not fit", rope[l])));
        }
        Ok(Some(QueryStats {
            n_layer,
            n_head,
            head_dim,
            rank,
            mean: mean.data.clone(),
            factor: factor.data.clone(),
            rope,
        }))
    }

    /// Stores the statistics in `filters` (extra tensors and metadata), replacing any.
    pub fn store(&self, filters: &mut QFilters) -> Result<()> {
        let (l, h, d, r) = (self.n_layer, self.n_head, self.head_dim, self.rank);
        let rope: Vec<f32> = self
            .rope
            .iter()
            .flat_map(|s| {
                [
                    f32::from(u8::from(s.neox)),
                    s.n_dims as f32,
                    s.base,
                    s.scale,
                ]
            })
            .collect();
        for (name, shape, data) in [
            (TENSOR_MEAN, vec![l, h, d], self.mean.clone()),
            (TENSOR_FACTOR, vec![l, h, r, d], self.factor.clone()),
            (TENSOR_ROPE, vec![l, 4], rope),
        ] {
            let extra = Extra::new(shape, data).ok_or_else(|| {
                Error::invalid(format!(
                    "expected-attention statistics: {name} is not finite or has the wrong size"
                ))
            })?;
            filters.extra.insert(name.to_string(), extra);
        }
        filters
            .metadata
            .insert(META_VERSION.to_string(), VERSION.to_string());
        filters
            .metadata
            .insert(META_FUTURE.to_string(), FUTURE_POSITIONS.to_string());
        Ok(())
    }

    fn mean(&self, layer: usize, head: usize) -> &[f32] {
        let d = self.head_dim;
        &self.mean[(layer * self.n_head + head) * d..][..d]
    }

    fn factor(&self, layer: usize, head: usize) -> &[f32] {
        let n = self.rank * self.head_dim;
        &self.factor[(layer * self.n_head + head) * n..][..n]
    }
}

/// A running `ln mean exp(x)` over the values pushed so far (one per layer and query head).
#[derive(Debug, Clone, Copy, Default)]
struct LogMeanExp {
    n: f64,
    max: f64,
    /// `Σ exp(x − max)`.
    sum: f64,
}

impl LogMeanExp {
    /// Adds `x` and returns the log-mean-exp including it.
    fn push(&mut self, x: f64) -> f64 {
        if self.n == 0.0 {
            (self.max, self.sum) = (x, 1.0);
        } else if x > self.max {
            self.sum = self.sum * (self.max - x).exp() + 1.0;
            self.max = x;
        } else {
            self.sum += (x - self.max).exp();
        }
        self.n += 1.0;
        self.max + (self.sum / self.n).ln()
    }
}

pub struct ExpectedAttention {
    stats: Arc<QueryStats>,
    n_head_kv: usize,
    /// `[layer][kv head][query head of the group][1 + rank][dim]`: each query head's mean,
    /// then its covariance factor; what a key is projected on (here or on the device).
    vectors: Vec<f32>,
    /// `[layer][query head]`.
    norms: Vec<LogMeanExp>,
    key: Vec<f32>,
    projected: Vec<f32>,
    terms: Vec<f64>,
}

impl ExpectedAttention {
    /// A scorer for a model with `n_head_kv` KV heads (the statistics' query heads are grouped
    /// onto them).
    pub fn new(stats: Arc<QueryStats>, n_head_kv: usize) -> ExpectedAttention {
        let (l, d, r) = (stats.n_layer, stats.head_dim, stats.rank);
        let mut vectors = Vec::with_capacity(l * stats.n_head * (1 + r) * d);
        for layer in 0..l {
            // Query heads are grouped onto KV heads in order (llama.cpp's GQA layout), so
            // walking them in order walks the KV heads' groups in order.
            for q in 0..stats.n_head {
                vectors.extend_from_slice(stats.mean(layer, q));
                vectors.extend_from_slice(stats.factor(layer, q));
            }
        }
        let n = l * stats.n_head;
        ExpectedAttention {
            stats,
            n_head_kv,
            vectors,
            norms: vec![LogMeanExp::default(); n],
            key: Vec::new(),
            projected: Vec::new(),
            terms: Vec::new(),
        }
    }

    /// Projections of one key per KV head: `(n_head / n_head_kv) * (1 + rank)` numbers.
    fn per_head(&self) -> usize {
        self.stats.n_head / self.n_head_kv.max(1) * (1 + self.stats.rank)
    }

    /// Whether a layer of this shape can be scored (else it scores 0, never out of range).
    fn fits(&self, layer: usize, n_head_kv: usize, head_dim: usize) -> bool {
        let s = &self.stats;
        layer < s.n_layer
            && head_dim == s.head_dim
            && n_head_kv == self.n_head_kv
            && n_head_kv > 0
            && crate::math::whole_blocks(s.n_head, n_head_kv)
    }

    /// The score of one key of KV head `kv` from its projections `p` (`per_head` numbers) and
    /// its value's squared norm; updates the query heads' normalisers.
    fn combine(&mut self, layer: usize, kv: usize, p: &[f32], value_sq: f32) -> f32 {
        let s = &self.stats;
        let (r, d) = (s.rank, s.head_dim as f64);
        let group = s.n_head / self.n_head_kv;
        self.terms.clear();
        for (i, q) in p.chunks_exact(1 + r).enumerate() {
            let quad: f64 = q[1..].iter().map(|&x| f64::from(x).powi(2)).sum();
            let a = f64::from(q[0]) / d.sqrt() + quad / (2.0 * d);
            let c = self.norms[layer * s.n_head + kv * group + i].push(a);
            self.terms.push(a - c);
        }
        let top = self.terms.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let mean = self.terms.iter().map(|x| (x - top).exp()).sum::<f64>() / group as f64;
        // A zero value adds nothing to the output whatever its weight: lowest score.
        let log_v = 0.5 * f64::from(value_sq).max(1e-60).ln();
        (top + mean.ln() + log_v) as f32
    }
}

impl Scorer for ExpectedAttention {
    fn score(&mut self, new: &NewKeys<'_>, out: &mut [f32]) {
        let (h, d) = (new.n_head_kv, new.head_dim);
        // Shapes were checked against the filters, and the filters against the model; a
        // layer or head outside them scores 0 rather than reading out of range.
        if !self.fits(new.layer, h, d) {
            out.fill(0.0);
            return;
        }
        let m = self.per_head();
        let rope = self.stats.rope[new.layer];
        let mut projected = std::mem::take(&mut self.projected);
        for (t, &pos) in new.positions.iter().enumerate() {
            self.key.clear();
            self.key
                .extend_from_slice(&new.keys[t * h * d..(t + 1) * h * d]);
            rope.rotate(&mut self.key, d, -i64::from(pos));
            for kv in 0..h {
                let k = &self.key[kv * d..(kv + 1) * d];
                let vectors = &self.vectors[(new.layer * h + kv) * m * d..][..m * d];
                projected.clear();
                projected.extend(vectors.chunks_exact(d).map(|u| crate::math::dot(u, k)));
                let v = new.value_norms.get(t * h + kv).copied().unwrap_or(1.0);
                out[t * h + kv] = self.combine(new.layer, kv, &projected, v * v);
            }
        }
        self.projected = projected;
    }

    fn key_reduce(&self) -> Option<KeyReduce> {
        Some(KeyReduce::Project {
            per_head: self.per_head(),
            value_norm: true,
        })
    }

    fn projections(&self, layer: usize) -> Option<(&[f32], RopeSpec)> {
        let n = self.n_head_kv * self.per_head() * self.stats.head_dim;
        let v = self.vectors.get(layer * n..(layer + 1) * n)?;
        Some((v, *self.stats.rope.get(layer)?))
    }

    fn score_reduced(&mut self, layer: usize, positions: &[i32], stats: &[f32], out: &mut [f32]) {
        let h = self.n_head_kv;
        let m = self.per_head();
        if !self.fits(layer, h, self.stats.head_dim) || stats.len() != positions.len() * h * (m + 1)
        {
            out.fill(0.0);
            return;
        }
        for (i, row) in stats.chunks_exact(m + 1).enumerate() {
            out[i] = self.combine(layer, i % h, &row[..m], row[m]);
        }
    }

    fn needs_value_norms(&self) -> bool {
        true
    }

    fn reset(&mut self) {
        self.norms.fill(LogMeanExp::default());
    }
}

impl QueryStats {
    /// Random statistics of the given shape (rank 2), for benchmarks and tests of the shared
    /// mechanism that run the policy without calibrating.
    pub fn random(
        n_layer: usize,
        n_head: usize,
        head_dim: usize,
        rope: RopeSpec,
        seed: u64,
    ) -> QueryStats {
        let mut s = seed ^ 0xEA;
        let mut rnd = |n: usize| -> Vec<f32> {
            (0..n)
                .map(|_| (crate::math::splitmix64(&mut s) >> 40) as f32 / (1u64 << 24) as f32 - 0.5)
                .collect()
        };
        QueryStats {
            n_layer,
            n_head,
            head_dim,
            rank: 2,
            mean: rnd(n_layer * n_head * head_dim),
            factor: rnd(n_layer * n_head * 2 * head_dim),
            rope: vec![rope; n_layer],
        }
    }
}

/// Random statistics for `filters` (`n_head` query heads, adjacent-pair RoPE), for tests.
#[cfg(test)]
pub(crate) fn add_test_stats(filters: &mut QFilters, n_head: usize, seed: u64) {
    let [l, _, d] = filters.shape();
    let rope = RopeSpec {
        neox: false,
        n_dims: d - d % 2,
        base: 10000.0,
        scale: 1.0,
    };
    QueryStats::random(l, n_head, d, rope, seed)
        .store(filters)
        .unwrap();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filters() -> QFilters {
        let mut f = QFilters::new(2, 2, 8, vec![0.1; 32]).unwrap();
        add_test_stats(&mut f, 4, 3);
        f
    }

    #[test]
    fn statistics_round_trip_through_the_filters_and_are_refused_when_malformed() {
        let f = filters();
        assert!(available(&f));
        let stats = QueryStats::from_filters(&f).unwrap().unwrap();
        assert_eq!((stats.n_head, stats.rank), (4, 2));
        let mut g = QFilters::new(2, 2, 8, vec![0.1; 32]).unwrap();
        assert!(QueryStats::from_filters(&g).unwrap().is_none());
        stats.store(&mut g).unwrap();
        assert_eq!(QueryStats::from_filters(&g).unwrap().unwrap(), stats);

        let mut other = f.clone();
        other.metadata.insert(META_VERSION.into(), "2".into());
        assert!(QueryStats::from_filters(&other).is_err());
        let mut short = f.clone();
        short.extra.insert(
            TENSOR_MEAN.into(),
            Extra::new(vec![2, 3, 8], vec![0.0; 48]).unwrap(),
        );
        let e = QueryStats::from_filters(&short).unwrap_err().to_string();
        assert!(e.contains("do not fit"), "{e}");
        let mut no_rope = f.clone();
        no_rope.extra.remove(TENSOR_ROPE);
        assert!(QueryStats::from_filters(&no_rope).is_err());
    }

    /// The score follows its definition: a key along a head's mean query, with a large value,
    /// outranks the opposite key; the value norm enters as its log; the key is rotated back
    /// from its position before it meets the statistics.
    #[test]
    fn aligned_keys_with_large_values_score_highest_at_any_position() {
        let d = 8;
        let mut mean = vec![0f32; d];
        mean[0] = 4.0;
        let stats = Arc::new(QueryStats {
            n_layer: 1,
            n_head: 1,
            head_dim: d,
            rank: 1,
            mean,
            factor: vec![0.0; d],
            rope: vec![RopeSpec {
                neox: true,
                n_dims: d,
                base: 10000.0,
                scale: 1.0,
            }],
        });
        let score = |pre: &[f32], pos: i32, vnorm: f32| {
            let mut k = pre.to_vec();
            stats.rope[0].rotate(&mut k, d, i64::from(pos));
            let mut ea = ExpectedAttention::new(stats.clone(), 1);
            // Warm the normaliser with a neutral key so the two scores share it.
            let mut out = [0f32; 2];
            let keys: Vec<f32> = [vec![0.0; d], k].concat();
            ea.score(
                &NewKeys {
                    layer: 0,
                    keys: &keys,
                    positions: &[0, pos],
                    value_norms: &[1.0, vnorm],
                    n_head_kv: 1,
                    head_dim: d,
                },
                &mut out,
            );
            out[1]
        };
        let mut along = vec![0f32; d];
        along[0] = 1.0;
        let against: Vec<f32> = along.iter().map(|x| -x).collect();
        for pos in [3, 700, 5000] {
            assert!(score(&along, pos, 1.0) > score(&against, pos, 1.0) + 0.5);
            let gap = score(&along, pos, 8.0) - score(&along, pos, 1.0);
            assert!(
                (gap - 8f32.ln()).abs() < 1e-3,
                "value norm enters as its log: {gap}"
            );
        }
        assert!((score(&along, 9, 1.0) - score(&along, 4000, 1.0)).abs() < 1e-2);
    }

    #[test]
    fn scores_do_not_depend_on_batching_and_reset_starts_over() {
        let f = filters();
        let stats = Arc::new(QueryStats::from_filters(&f).unwrap().unwrap());
        let (n, h, d) = (40, 2, 8);
        let mut s = 5u64;
        let keys: Vec<f32> = (0..n * h * d)
            .map(|_| (crate::math::splitmix64(&mut s) >> 40) as f32 / (1u64 << 24) as f32 - 0.5)
            .collect();
        let norms: Vec<f32> = (0..n * h).map(|i| 0.5 + i as f32 * 0.01).collect();
        let positions: Vec<i32> = (0..n as i32).collect();
        let run = |ea: &mut ExpectedAttention, batch: usize| {
            let mut out = vec![f32::NAN; n * h];
            for start in (0..n).step_by(batch) {
                let end = (start + batch).min(n);
                ea.score(
                    &NewKeys {
                        layer: 1,
                        keys: &keys[start * h * d..end * h * d],
                        positions: &positions[start..end],
                        value_norms: &norms[start * h..end * h],
                        n_head_kv: h,
                        head_dim: d,
                    },
                    &mut out[start * h..end * h],
                );
            }
            out
        };
        let one = run(&mut ExpectedAttention::new(stats.clone(), h), 1);
        assert!(one.iter().all(|x| x.is_finite()));
        assert_eq!(run(&mut ExpectedAttention::new(stats.clone(), h), 7), one);
        let mut ea = ExpectedAttention::new(stats, h);
        run(&mut ea, 40);
        assert_ne!(run(&mut ea, 40), one, "the normaliser carries over");
        ea.reset();
        assert_eq!(run(&mut ea, 40), one);
    }
}
