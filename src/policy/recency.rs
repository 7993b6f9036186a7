//! Filter score plus a recency prior: score = z + position / tau, where z is the inner
//! policy's score standardised per (layer, KV head) with running statistics.
//!
//! Why: on streaming perplexity the sinks + recent window of StreamingLLM is hard to beat,
//! because most attention of a small model goes to recent tokens; a pure key score evicts
//! recent tokens as readily as old ones. With a prior, a token must score `age / tau` standard
//! deviations above a newer one to outlive it, so old tokens survive only if the filter rates
//! them clearly higher. Standardising makes one `tau` mean the same for every head.

use super::{KeyReduce, NewKeys, Scorer};

pub struct Recency {
    inner: Box<dyn Scorer>,
    /// Tokens of age worth one standard deviation of score.
    tau: f64,
    /// Per (layer, head): count, mean, M2 (Welford).
    stats: Vec<(f64, f64, f64)>,
    raw: Vec<f32>,
}

impl Recency {
    pub fn new(inner: Box<dyn Scorer>, tau: f64) -> Recency {
        Recency {
            inner,
            tau,
            stats: Vec::new(),
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

    fn score_reduced(&mut self, layer: usize, positions: &[i32], stats: &[f32], out: &mut [f32]) {
        self.raw.resize(out.len(), 0.0);
        self.inner
            .score_reduced(layer, positions, stats, &mut self.raw);
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

    fn evicts(&self) -> bool {
        self.inner.evicts()
    }
}

impl Recency {
    /// `out = z(raw) + position / tau`, updating the running statistics of (layer, head).
    fn standardise(&mut self, layer: usize, positions: &[i32], h: usize, out: &mut [f32]) {
        let need = (layer + 1) * h;
        if self.stats.len() < need {
            self.stats.resize(need, (0.0, 0.0, 0.0));
        }
        for head in 0..h {
            let st = &mut self.stats[layer * h + head];
            for t in 0..positions.len() {
                let x = self.raw[t * h + head] as f64;
                st.0 += 1.0;
                let d = x - st.1;
                st.1 += d / st.0;
                st.2 += d * (x - st.1);
            }
            let sd = if st.0 > 1.0 {
                (st.2 / (st.0 - 1.0)).sqrt().max(1e-9)
            } else {
                1.0
            };
            for (t, &pos) in positions.iter().enumerate() {
                let z = (self.raw[t * h + head] as f64 - st.1) / sd;
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
        // One head, dim 1: key norms 1 (best knorm score) at position 0 and 2 at position 10.
        let mut r = Recency::new(Box::new(KNorm), 5.0);
        let keys = [1.0f32, 2.0];
        let new = NewKeys {
            layer: 0,
            keys: &keys,
            positions: &[0, 10],
            n_head_kv: 1,
            head_dim: 1,
        };
        let mut out = [0f32; 2];
        r.score(&new, &mut out);
        // z = +0.71 / -0.71 (sample sd of {-1, -2}); recency adds 0 and 2.
        assert!(out[1] > out[0], "{out:?}");
        let mut strong = Recency::new(Box::new(KNorm), 1000.0);
        strong.score(&new, &mut out);
        assert!(
            out[0] > out[1],
            "a weak prior leaves the score in charge: {out:?}"
        );
    }
}
