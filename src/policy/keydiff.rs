//! KeyDiff (Park et al., 2025, arXiv 2504.15364): keep the keys least similar to the mean
//! direction of their head's keys. Score = −cos(k, anchor), the anchor being the mean of the
//! unit-normalised keys of (layer, KV head).
//!
//! Variant: each key is scored once, on entry, against a running anchor over the keys of the
//! document so far, itself included (updated token by token, so a score does not depend on how
//! the input was cut into batches). On Qwen2.5-Coder-0.5B this variant found a 1K passkey at 2×
//! in 7 of 9 documents where Q-Filters found 1 (issue 22's probe; docs/RESULTS.md has the
//! measured rows). It needs no calibration.
//!
//! cos(k, sum/n) = ⟨k/|k|, sum⟩ / |sum|: the count cancels, so only the sum of unit keys is kept.

use super::{head_slice, NewKeys, PolicyInfo, Scorer};

pub const INFO: PolicyInfo = PolicyInfo {
    name: "keydiff",
    help: "keep keys least similar to the mean direction of their head's keys (KeyDiff)",
    needs_filters: false,
    needs_query_stats: false,
    evicts: true,
    scores_vary_by_head: true,
    build: |_| Ok(Box::new(KeyDiff::default())),
};

#[derive(Default)]
pub struct KeyDiff {
    /// `[layer][head][dim]`: sum of the unit keys seen since the last reset (f64: a long
    /// conversation adds up many thousands of them).
    sums: Vec<f64>,
}

impl KeyDiff {
    /// Replaces the anchor of (`layer`, every head) with `sums` (`[n_head][head_dim]`, sums of
    /// unit keys): `keydiff-live` hands it the anchor of the live keys at each re-score, so the
    /// keys that enter before the next one are scored against what is cached.
    pub(super) fn set_anchor(&mut self, layer: usize, sums: &[f64]) {
        let need = (layer + 1) * sums.len();
        if self.sums.len() < need {
            self.sums.resize(need, 0.0);
        }
        self.sums[layer * sums.len()..need].copy_from_slice(sums);
    }
}

impl Scorer for KeyDiff {
    fn score(&mut self, new: &NewKeys<'_>, out: &mut [f32]) {
        let (h, d) = (new.n_head_kv, new.head_dim);
        let need = (new.layer + 1) * h * d;
        if self.sums.len() < need {
            self.sums.resize(need, 0.0);
        }
        for t in 0..new.positions.len() {
            for head in 0..h {
                let k = head_slice(new, t, head);
                let sum = &mut self.sums[(new.layer * h + head) * d..][..d];
                let norm = k.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>().sqrt();
                // A zero key has no direction: it leaves the anchor alone and scores 0.
                if !(norm > 0.0 && norm.is_finite()) {
                    out[t * h + head] = 0.0;
                    continue;
                }
                let mut dot = 0.0;
                let mut sum_sq = 0.0;
                for (s, &x) in sum.iter_mut().zip(k) {
                    *s += f64::from(x) / norm;
                    dot += f64::from(x) / norm * *s;
                    sum_sq += *s * *s;
                }
                let cos = if sum_sq > 0.0 {
                    dot / sum_sq.sqrt()
                } else {
                    0.0
                };
                out[t * h + head] = -cos as f32;
            }
        }
    }

    fn reset(&mut self) {
        self.sums.fill(0.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Scores of `keys` (`[n][1 head][2 dims]`), fed `batch` tokens at a time.
    fn scores(scorer: &mut KeyDiff, keys: &[f32], batch: usize) -> Vec<f32> {
        let n = keys.len() / 2;
        let positions: Vec<i32> = (0..n as i32).collect();
        let mut out = vec![f32::NAN; n];
        for start in (0..n).step_by(batch) {
            let end = (start + batch).min(n);
            let new = NewKeys {
                layer: 0,
                keys: &keys[start * 2..end * 2],
                positions: &positions[start..end],
                value_norms: &[],
                n_head_kv: 1,
                head_dim: 2,
            };
            scorer.score(&new, &mut out[start..end]);
        }
        out
    }

    #[test]
    fn keys_unlike_the_mean_direction_score_higher_whatever_their_norm() {
        // Nine keys along x (of different norms), then one along y and one along x again: the
        // odd one out is kept first, the tenth x key is the most typical.
        let mut keys = Vec::new();
        for i in 0..9 {
            keys.extend_from_slice(&[1.0 + i as f32, 0.0]);
        }
        keys.extend_from_slice(&[0.0, 0.5, 40.0, 0.0]);
        let out = scores(&mut KeyDiff::default(), &keys, 11);
        assert!(out[9] > out[10] + 0.5, "{out:?}");
        assert!(
            (out[10] + 0.995).abs() < 0.01,
            "aligned with the anchor: {}",
            out[10]
        );
        assert!(out.iter().all(|s| (-1.0..=1.0).contains(s)), "{out:?}");
    }

    #[test]
    fn scores_do_not_depend_on_batching_and_reset_starts_over() {
        let mut s = 11u64;
        let keys: Vec<f32> = (0..2 * 300)
            .map(|_| (crate::math::splitmix64(&mut s) >> 40) as f32 / (1u64 << 24) as f32 - 0.3)
            .collect();
        let one = scores(&mut KeyDiff::default(), &keys, 1);
        for batch in [7, 64, 300] {
            let other = scores(&mut KeyDiff::default(), &keys, batch);
            let diff = one
                .iter()
                .zip(&other)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max);
            assert!(diff < 1e-6, "batch {batch}: {diff}");
        }
        let mut k = KeyDiff::default();
        scores(&mut k, &keys, 300);
        assert_ne!(scores(&mut k, &keys, 300), one, "the anchor carries over");
        k.reset();
        assert_eq!(scores(&mut k, &keys, 300), one);
    }

    #[test]
    fn a_zero_key_scores_zero_and_leaves_the_anchor_alone() {
        let out = scores(&mut KeyDiff::default(), &[0.0, 0.0, 1.0, 0.0, 2.0, 0.0], 3);
        assert_eq!(out[0], 0.0);
        assert!((out[2] + 1.0).abs() < 1e-6, "{out:?}");
    }
}
