//! Filter score plus a recency prior: score = z + position / tau, where z is the inner
//! policy's score standardised per (layer, KV head) with running statistics, updated token by
//! token.
//!
//! Why: on streaming perplexity the sinks + recent window of StreamingLLM is hard to beat,
//! because most attention of a small model goes to recent tokens; a pure key score evicts
//! recent tokens as readily as old ones. With a prior, a token must score `age / tau` standard
//! deviations above a newer one to outlive it, so old tokens survive only if the filter rates
//! them clearly higher. Standardising makes one `tau` mean the same for every head.

use super::{KeyReduce, LiveReduce, LiveStats, NewKeys, Scorer};

pub struct Recency {
    inner: Box<dyn Scorer>,
    /// Tokens of age worth one standard deviation of score.
    tau: f64,
    z: RunningZ,
    raw: Vec<f32>,
}

/// Running standardisation per (layer, KV head): count, mean, M2 (Welford). Token by token:
/// each value is standardised with the statistics of the values up to and including itself,
/// so its score depends on the token stream only, not on how it was cut into decode batches
/// or scoring rounds (the graph key path scores per decode, the cache path per eviction
/// round). Shared by the recency prior and by combined policies (`mix.rs`).
#[derive(Default)]
pub(super) struct RunningZ {
    stats: Vec<(f64, f64, f64)>,
}

impl RunningZ {
    /// Adds `x` to the statistics of (`layer`, `head`) of a layer with `n_head` KV heads and
    /// returns its standardised value (0 for the first value).
    pub(super) fn push(&mut self, layer: usize, n_head: usize, head: usize, x: f64) -> f64 {
        let need = (layer + 1) * n_head;
        if self.stats.len() < need {
            self.stats.resize(need, (0.0, 0.0, 0.0));
        }
        let st = &mut self.stats[layer * n_head + head];
        st.0 += 1.0;
        let d = x - st.1;
        st.1 += d / st.0;
        st.2 += d * (x - st.1);
        let sd = if st.0 > 1.0 {
            (st.2 / (st.0 - 1.0)).sqrt().max(1e-9)
        } else {
            1.0
        };
        (x - st.1) / sd
    }
}

impl Recency {
    pub fn new(inner: Box<dyn Scorer>, tau: f64) -> Recency {
        Recency {
            inner,
            tau,
            z: RunningZ::default(),
            raw: Vec::new(),
        }
    }
}

impl Scorer for Recency {
    fn score(&mut self, new: &NewKeys<'_>, out: &mut [f32]) {
        self.raw.resize(out.len(), 0.0);
        self.inner.score(new, &mut self.raw);
        self.standardise(new.layer, new.positions, new.n_head_kv, out);
    }

    fn key_reduce(&self) -> Option<KeyReduce> {
        self.inner.key_reduce()
    }

    fn filter(&self, layer: usize, head: usize) -> Option<&[f32]> {
        self.inner.filter(layer, head)
    }

    fn projections(&self, layer: usize) -> Option<(&[f32], crate::rope::RopeSpec)> {
        self.inner.projections(layer)
    }

    fn score_reduced(&mut self, layer: usize, positions: &[i32], stats: &[f32], out: &mut [f32]) {
        self.raw.resize(out.len(), 0.0);
        self.inner
            .score_reduced(layer, positions, stats, &mut self.raw);
        // `out` is one score per (token, head), whatever the width of `stats`.
        let h = if positions.is_empty() {
            1
        } else {
            out.len() / positions.len()
        };
        self.standardise(layer, positions, h, out);
    }

    fn needs_keys(&self) -> bool {
        self.inner.needs_keys()
    }

    fn needs_value_norms(&self) -> bool {
        self.inner.needs_value_norms()
    }

    /// The inner scorer forgets; the prior's own statistics carry over (a score's scale is a
    /// property of the model and policy, and the prior was measured that way).
    fn reset(&mut self) {
        self.inner.reset();
    }

    fn rescores_live(&self) -> bool {
        self.inner.rescores_live()
    }

    /// The inner scores of the live keys, standardised over those keys per head (they are one
    /// set, not a stream), plus each slot's `position / tau`.
    fn rescore(&mut self, live: &NewKeys<'_>, out: &mut [f32]) {
        self.raw.resize(out.len(), 0.0);
        self.inner.rescore(live, &mut self.raw);
        self.standardise_live(live.positions, live.n_head_kv, out);
    }

    fn live_reduce(&self) -> Option<LiveReduce> {
        self.inner.live_reduce()
    }

    /// As [`Recency::rescore`], from the device's reduction of the live keys.
    fn rescore_reduced(&mut self, live: &LiveStats<'_>, out: &mut [f32]) {
        self.raw.resize(out.len(), 0.0);
        self.inner.rescore_reduced(live, &mut self.raw);
        self.standardise_live(live.positions, live.n_head_kv, out);
    }
}

impl Recency {
    /// `out = z(raw) + position / tau` over one live set (`raw` and `positions` are
    /// `[cells][h]`), its mean and spread its own: the running statistics are left alone.
    fn standardise_live(&self, positions: &[i32], h: usize, out: &mut [f32]) {
        let h = h.max(1);
        let n = out.len() / h;
        for head in 0..h {
            let column = || (0..n).map(|t| f64::from(self.raw[t * h + head]));
            let mean = column().sum::<f64>() / n.max(1) as f64;
            let var = column().map(|x| (x - mean).powi(2)).sum::<f64>()
                / n.max(2).saturating_sub(1) as f64;
            let sd = var.sqrt().max(1e-9);
            for t in 0..n {
                let i = t * h + head;
                let pos = positions.get(i).copied().unwrap_or(0);
                out[i] = ((f64::from(self.raw[i]) - mean) / sd + f64::from(pos) / self.tau) as f32;
            }
        }
    }

    /// `out = z(raw) + position / tau`, updating the running statistics of (layer, head).
    fn standardise(&mut self, layer: usize, positions: &[i32], h: usize, out: &mut [f32]) {
        for head in 0..h {
            for (t, &pos) in positions.iter().enumerate() {
                let z = self.z.push(layer, h, head, self.raw[t * h + head] as f64);
                out[t * h + head] = (z + pos as f64 / self.tau) as f32;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::knorm::KNorm;

    #[test]
    fn older_tokens_need_a_clearly_better_score() {
        // One head, dim 1: raw knorm scores -1 at position 0 and -2 at position 10, then -3 at
        // position 20 (the first token is standardised against itself alone: z = 0).
        let keys = [1.0f32, 2.0, 3.0];
        let new = NewKeys {
            layer: 0,
            keys: &keys,
            positions: &[0, 10, 20],
            value_norms: &[],
            n_head_kv: 1,
            head_dim: 1,
        };
        let mut out = [0f32; 3];
        Recency::new(Box::new(KNorm), 5.0).score(&new, &mut out);
        // z = 0, -0.71, -1; the prior adds 0, 2 and 4: recency wins.
        assert!(out[2] > out[1] && out[1] > out[0], "{out:?}");
        Recency::new(Box::new(KNorm), 1000.0).score(&new, &mut out);
        assert!(
            out[0] > out[1] && out[1] > out[2],
            "a weak prior leaves the score in charge: {out:?}"
        );
    }

    /// Scores of `keys` (one head, dim 1) fed in batches of `batch` tokens.
    fn scores_in_batches(keys: &[f32], batch: usize) -> Vec<f32> {
        let positions: Vec<i32> = (0..keys.len() as i32).collect();
        let mut r = Recency::new(Box::new(KNorm), 64.0);
        let mut out = vec![0f32; keys.len()];
        for start in (0..keys.len()).step_by(batch) {
            let end = (start + batch).min(keys.len());
            let new = NewKeys {
                layer: 0,
                keys: &keys[start..end],
                positions: &positions[start..end],
                value_norms: &[],
                n_head_kv: 1,
                head_dim: 1,
            };
            r.score(&new, &mut out[start..end]);
        }
        out
    }

    #[test]
    fn scores_do_not_depend_on_batching() {
        let mut s = 3u64;
        let keys: Vec<f32> = (0..600)
            .map(|_| 0.5 + (crate::math::splitmix64(&mut s) >> 40) as f32 / (1u64 << 24) as f32)
            .collect();
        let one = scores_in_batches(&keys, 1);
        for batch in [16, 256, 600] {
            assert_eq!(scores_in_batches(&keys, batch), one, "batch {batch}");
        }
        // The scores are not trivially equal.
        assert!(one.windows(2).any(|w| (w[0] - w[1]).abs() > 1e-3));
    }
}
