//! How well do filters predict attention? One decode of a text with flash attention off, the
//! post-RoPE keys (`Kcur-<l>` ROPE nodes) and the attention probabilities (`kq_soft_max-<l>`)
//! read from the graph; then, per layer and KV head, compare the keys' scores with the
//! attention they actually receive from the last quarter of the queries.
//!
//! Only "old" keys (before the last quarter) are ranked: they are the ones an eviction policy
//! must judge without having seen the queries that will read them.

use std::sync::Arc;

use gguf_tools::filters::QFilters;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::ffi::{Batch, Context, ContextParams, GraphObserver, Model, NodeInfo, NodeOp, Token};
use crate::math::mean;
use crate::math::{dot, spearman};

/// Fractions of old keys kept per KV head in the kept-mass report.
pub const FRACTIONS: [f64; 3] = [0.125, 0.25, 0.5];
/// Selection rules compared in the kept-mass report.
pub const SELECTORS: [&str; 4] = ["filters", "knorm", "recency", "oracle"];

#[derive(Debug, Clone, Serialize)]
pub struct LayerCheck {
    /// Mean over KV heads of Spearman(⟨k, v⟩, attention received).
    pub spearman_filters: f64,
    /// Mean over KV heads of Spearman(−‖k‖, attention received).
    pub spearman_knorm: f64,
    /// `[fraction][selector]`: mean over KV heads of the old-key attention mass kept.
    pub mass_kept: Vec<[f64; 4]>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CheckReport {
    pub tokens: usize,
    /// First query of the last quarter; keys before it are the old keys.
    pub query_start: usize,
    pub layers: Vec<LayerCheck>,
}

impl CheckReport {
    // Means over layers (and, per layer, over heads) report 0 for none.
    pub fn mean_spearman_filters(&self) -> f64 {
        mean(self.layers.iter().map(|l| l.spearman_filters)).unwrap_or(0.0)
    }

    pub fn mean_spearman_knorm(&self) -> f64 {
        mean(self.layers.iter().map(|l| l.spearman_knorm)).unwrap_or(0.0)
    }

    /// Mean over layers of the kept mass for one fraction index and selector index.
    pub fn mean_mass(&self, fraction: usize, selector: usize) -> f64 {
        mean(self.layers.iter().map(|l| l.mass_kept[fraction][selector])).unwrap_or(0.0)
    }

    pub fn to_json(&self) -> serde_json::Value {
        let mut mass = serde_json::Map::new();
        for (fi, f) in FRACTIONS.iter().enumerate() {
            let mut by = serde_json::Map::new();
            for (si, s) in SELECTORS.iter().enumerate() {
                by.insert(s.to_string(), self.mean_mass(fi, si).into());
            }
            mass.insert(f.to_string(), by.into());
        }
        let mut per_layer_mass = serde_json::Map::new();
        for (fi, f) in FRACTIONS.iter().enumerate() {
            let mut by = serde_json::Map::new();
            for (si, s) in SELECTORS.iter().enumerate() {
                let v: Vec<f64> = self.layers.iter().map(|l| l.mass_kept[fi][si]).collect();
                by.insert(s.to_string(), v.into());
            }
            per_layer_mass.insert(f.to_string(), by.into());
        }
        serde_json::json!({
            "tokens": self.tokens,
            "query_start": self.query_start,
            "old_keys": self.query_start,
            "spearman_filters": self.layers.iter().map(|l| l.spearman_filters).collect::<Vec<_>>(),
            "spearman_knorm": self.layers.iter().map(|l| l.spearman_knorm).collect::<Vec<_>>(),
            "mean_spearman_filters": self.mean_spearman_filters(),
            "mean_spearman_knorm": self.mean_spearman_knorm(),
            "mass_kept": mass,
            "mass_kept_per_layer": per_layer_mass,
        })
    }
}

/// What the observer keeps per layer: keys and attention received, nothing quadratic.
struct Captured {
    n_tokens: usize,
    n_head: usize,
    n_head_kv: usize,
    head_dim: usize,
    query_start: usize,
    /// `[layer]` → `[token][kv_head][dim]`.
    keys: Vec<Option<Vec<f32>>>,
    /// `[layer]` → `[kv_head][old key]`, summed over the last-quarter queries and the query
    /// heads of the group.
    received: Vec<Option<Vec<f64>>>,
}

impl GraphObserver for Captured {
    fn wants(&mut self, node: &NodeInfo) -> bool {
        let c = self;
        let Some(layer) = node.layer else {
            return false;
        };
        if layer >= c.keys.len() {
            return false;
        }
        let ne = node.ne.map(|x| x.max(0) as usize);
        match (node.base, node.op) {
            ("Kcur", NodeOp::Rope) => {
                ne[0] == c.head_dim && ne[1] == c.n_head_kv && ne[2] == c.n_tokens
            }
            ("kq_soft_max", NodeOp::SoftMax) => {
                ne[0] >= c.n_tokens && ne[1] == c.n_tokens && ne[2] == c.n_head
            }
            _ => false,
        }
    }

    fn observe(&mut self, node: &NodeInfo, data: &[f32]) {
        let c = self;
        let Some(layer) = node.layer else { return };
        if node.op == NodeOp::Rope {
            c.keys[layer] = Some(data.to_vec());
            return;
        }
        // Softmax element (key j, query i, head h) sits at j + n_kv * (i + n_tokens * h);
        // with one batch into an empty cache, cell j holds position j.
        let n_kv = node.ne[0].max(0) as usize;
        let (n, qs, group) = (c.n_tokens, c.query_start, c.n_head / c.n_head_kv);
        if data.len() < n_kv * n * c.n_head {
            return;
        }
        let mut recv = vec![0f64; c.n_head_kv * qs];
        for h in 0..c.n_head {
            let g = h / group;
            let out = &mut recv[g * qs..(g + 1) * qs];
            for i in qs..n {
                let row = &data[n_kv * (i + n * h)..][..qs];
                for (o, &p) in out.iter_mut().zip(row) {
                    *o += p as f64;
                }
            }
        }
        c.received[layer] = Some(recv);
    }
}

/// Runs `tokens` in one decode and scores `filters` against the attention observed.
pub fn check_filters(
    model: &Arc<Model>,
    filters: &QFilters,
    tokens: &[Token],
    threads: i32,
) -> Result<CheckReport> {
    let (n_layer, n_head, n_head_kv, head_dim) = (
        model.n_layer(),
        model.n_head(),
        model.n_head_kv(),
        model.head_dim(),
    );
    filters.check_shape(n_layer, n_head_kv, head_dim)?;
    if n_head.checked_rem(n_head_kv) != Some(0) {
        return Err(Error::invalid(format!(
            "unsupported attention shape: {n_head} query heads, {n_head_kv} KV heads"
        )));
    }
    let n = tokens.len();
    if n < 16 {
        return Err(Error::invalid(format!(
            "the text has {n} tokens; filters check needs at least 16"
        )));
    }
    let query_start = n - n / 4;
    let mut captured = Captured {
        n_tokens: n,
        n_head,
        n_head_kv,
        head_dim,
        query_start,
        keys: vec![None; n_layer],
        received: vec![None; n_layer],
    };
    let n32 = u32::try_from(n).map_err(|_| Error::invalid("--tokens too large"))?;
    let mut ctx = Context::new(
        model,
        &ContextParams {
            n_ctx: n32,
            n_batch: n32,
            threads,
            // Attention probabilities exist as a graph node only without flash attention.
            flash_attn: Some(false),
            hook: true,
            ..ContextParams::default()
        },
    )?;
    let mut batch = Batch::new(n)?;
    for (i, &t) in tokens.iter().enumerate() {
        batch.push(t, i as i32, i + 1 == n)?;
    }
    ctx.decode_observed(&batch, &mut captured)?;
    drop(ctx);

    let mut layers = Vec::with_capacity(n_layer);
    for layer in 0..n_layer {
        let (Some(keys), Some(recv)) = (&captured.keys[layer], &captured.received[layer]) else {
            return Err(Error::invalid(format!(
                "layer {layer}: the graph has no `Kcur-{layer}` ROPE node or no `kq_soft_max-{layer}` node of the expected shape (architecture {} is not supported by filters check)",
                model.architecture()
            )));
        };
        let mut sp_f = Vec::new();
        let mut sp_k = Vec::new();
        let mut mass = vec![[0f64; 4]; FRACTIONS.len()];
        for g in 0..n_head_kv {
            let f = filters.filter(layer, g);
            let key = |j: usize| &keys[(j * n_head_kv + g) * head_dim..][..head_dim];
            let by_filter: Vec<f32> = (0..query_start).map(|j| -dot(key(j), f)).collect();
            let by_knorm: Vec<f32> = (0..query_start)
                .map(|j| -dot(key(j), key(j)).sqrt())
                .collect();
            let by_recency: Vec<f32> = (0..query_start).map(|j| j as f32).collect();
            let attn = &recv[g * query_start..(g + 1) * query_start];
            let attn32: Vec<f32> = attn.iter().map(|&a| a as f32).collect();
            sp_f.push(spearman(&by_filter, &attn32));
            sp_k.push(spearman(&by_knorm, &attn32));
            let total: f64 = attn.iter().sum();
            for (fi, &frac) in FRACTIONS.iter().enumerate() {
                let keep = ((query_start as f64 * frac).round() as usize).clamp(1, query_start);
                for (si, scores) in [&by_filter, &by_knorm, &by_recency, &attn32]
                    .into_iter()
                    .enumerate()
                {
                    mass[fi][si] += kept_share(scores, attn, keep, total) / n_head_kv as f64;
                }
            }
        }
        layers.push(LayerCheck {
            spearman_filters: mean(sp_f).unwrap_or(0.0),
            spearman_knorm: mean(sp_k).unwrap_or(0.0),
            mass_kept: mass,
        });
    }
    Ok(CheckReport {
        tokens: n,
        query_start,
        layers,
    })
}

/// Share of `total` attention held by the `keep` keys with the highest `scores`.
pub fn kept_share(scores: &[f32], attn: &[f64], keep: usize, total: f64) -> f64 {
    if total <= 0.0 {
        return 0.0;
    }
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    // Ties broken by index so the result does not depend on the sort's internals.
    idx.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    idx.iter().take(keep).map(|&j| attn[j]).sum::<f64>() / total
}

/// How close two sets of filters of one model are: the cosine of each (layer, KV head) pair.
/// The sign counts (a flipped filter ranks keys backwards), the norm does not (scores are
/// compared within a head, so a scale changes no ranking).
#[derive(Debug, Clone, Serialize)]
pub struct Agreement {
    /// `[layer][kv_head]`; a pair with a zero filter on either side has cosine 0.
    pub cosines: Vec<Vec<f64>>,
}

impl Agreement {
    pub fn min(&self) -> f64 {
        self.cosines
            .iter()
            .flatten()
            .copied()
            .fold(f64::INFINITY, f64::min)
    }

    pub fn mean(&self) -> f64 {
        mean(self.cosines.iter().flatten().copied()).unwrap_or(0.0)
    }

    /// (layer, KV head) of the lowest cosine (the first one on a tie).
    pub fn worst(&self) -> (usize, usize) {
        let mut best = (0, 0, f64::INFINITY);
        for (l, heads) in self.cosines.iter().enumerate() {
            for (h, &c) in heads.iter().enumerate() {
                if c < best.2 {
                    best = (l, h, c);
                }
            }
        }
        (best.0, best.1)
    }

    /// Pairs whose cosine is below `threshold`.
    pub fn below(&self, threshold: f64) -> usize {
        self.cosines
            .iter()
            .flatten()
            .filter(|&&c| c < threshold)
            .count()
    }
}

/// Cosine of every (layer, KV head) filter of `a` with the same one of `b`, in f64.
pub fn compare_filters(a: &QFilters, b: &QFilters) -> Result<Agreement> {
    let [layers, heads, dim] = a.shape();
    b.check_shape(layers, heads, dim)?;
    let cosines = (0..layers)
        .map(|l| {
            (0..heads)
                .map(|h| {
                    let (x, y) = (a.filter(l, h), b.filter(l, h));
                    let (mut xy, mut xx, mut yy) = (0f64, 0f64, 0f64);
                    for (&p, &q) in x.iter().zip(y) {
                        let (p, q) = (f64::from(p), f64::from(q));
                        xy += p * q;
                        xx += p * p;
                        yy += q * q;
                    }
                    if xx > 0.0 && yy > 0.0 {
                        xy / (xx * yy).sqrt()
                    } else {
                        0.0
                    }
                })
                .collect()
        })
        .collect();
    Ok(Agreement { cosines })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_share_takes_the_top_scores() {
        let attn = [0.1, 0.6, 0.3];
        assert!((kept_share(&[0.0, 1.0, 0.5], &attn, 1, 1.0) - 0.6).abs() < 1e-12);
        assert!((kept_share(&[3.0, 1.0, 2.0], &attn, 2, 1.0) - 0.4).abs() < 1e-12);
        assert_eq!(kept_share(&[1.0], &[0.0], 1, 0.0), 0.0);
    }

    #[test]
    fn agreement_is_the_cosine_per_head_sign_included_scale_ignored() {
        // Two layers, two heads, dim 2.
        let a = QFilters::new(2, 2, 2, vec![1.0, 0.0, 0.0, 1.0, 3.0, 4.0, 1.0, 1.0]).unwrap();
        // Same directions except: layer 0 head 1 scaled by 5 (cosine 1), layer 1 head 0
        // flipped (cosine -1), layer 1 head 1 rotated by 45° (cosine 1/√2).
        let b = QFilters::new(2, 2, 2, vec![1.0, 0.0, 0.0, 5.0, -3.0, -4.0, 0.0, 1.0]).unwrap();
        let g = compare_filters(&a, &b).unwrap();
        let r = std::f64::consts::FRAC_1_SQRT_2;
        let want = [[1.0, 1.0], [-1.0, r]];
        for (l, heads) in want.iter().enumerate() {
            for (h, &c) in heads.iter().enumerate() {
                assert!(
                    (g.cosines[l][h] - c).abs() < 1e-12,
                    "{l} {h}: {:?}",
                    g.cosines
                );
            }
        }
        assert!((g.min() + 1.0).abs() < 1e-12);
        assert!((g.mean() - (1.0 + 1.0 - 1.0 + r) / 4.0).abs() < 1e-12);
        assert_eq!(g.worst(), (1, 0));
        assert_eq!(g.below(0.99), 2);
        // Against itself: every cosine is 1.
        let same = compare_filters(&a, &a).unwrap();
        assert!((same.min() - 1.0).abs() < 1e-12 && same.below(0.999_999) == 0);
        // A zero filter agrees with nothing; a different shape is an error, not a panic.
        let z = QFilters::new(2, 2, 2, vec![0.0; 8]).unwrap();
        assert_eq!(compare_filters(&a, &z).unwrap().min(), 0.0);
        let other = QFilters::new(1, 2, 2, vec![1.0; 4]).unwrap();
        assert!(compare_filters(&a, &other).is_err());
    }
}
