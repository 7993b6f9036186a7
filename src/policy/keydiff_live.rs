//! KeyDiff re-scored over the live cells at each eviction round, as kvpress's `KeyDiffPress`
//! scores a cache: the anchor is the mean direction of the keys cached now, not of every key
//! seen, and every cached key is scored against it again before each round. Issue 22 asks for
//! this variant to be measured against `keydiff` (scored once on entry against a running
//! anchor); docs/RESULTS.md has both.
//!
//! The re-scoring is the shared mechanism's ([`super::Scorer::rescores_live`]), at most once
//! per [`crate::engine::rescore_interval`] new tokens: one graph on the cache's device computes
//! each head's sum of live unit keys and every slot's cosine to it
//! ([`super::LiveReduce::MeanDirection`]), and only those cross to the host (the keys are read
//! back only where that device has no such graph). The keys that enter in between are scored
//! on entry against the live anchor of the last re-score plus themselves.

use super::keydiff::KeyDiff;
use super::{LiveReduce, LiveStats, NewKeys, PolicyInfo, Scorer};

pub const INFO: PolicyInfo = PolicyInfo {
    name: "keydiff-live",
    help: "KeyDiff re-scored at each eviction round against the mean direction of the cached keys",
    needs_filters: false,
    needs_query_stats: false,
    evicts: true,
    scores_vary_by_head: true,
    build: |_| Ok(Box::new(KeyDiffLive::default())),
};

#[derive(Default)]
pub struct KeyDiffLive {
    /// Entry scores of the keys that arrive between two re-scores: KeyDiff's running anchor,
    /// reset to the live keys' anchor at each re-score.
    entry: KeyDiff,
    /// `[head][dim]`: the sum of the live unit keys of the layer being re-scored.
    anchor: Vec<f64>,
}

impl Scorer for KeyDiffLive {
    fn score(&mut self, new: &NewKeys<'_>, out: &mut [f32]) {
        self.entry.score(new, out);
    }

    fn rescores_live(&self) -> bool {
        true
    }

    fn live_reduce(&self) -> Option<LiveReduce> {
        Some(LiveReduce::MeanDirection)
    }

    /// Score = −cos(k, anchor), the anchor the sum of the layer's live unit keys per head;
    /// keys entering before the next re-score meet that anchor.
    fn rescore_reduced(&mut self, live: &LiveStats<'_>, out: &mut [f32]) {
        self.anchor.clear();
        self.anchor
            .extend(live.unit_key_sums.iter().map(|&x| f64::from(x)));
        self.entry.set_anchor(live.layer, &self.anchor);
        for (o, &c) in out.iter_mut().zip(live.cosines) {
            *o = -c;
        }
    }

    fn reset(&mut self) {
        self.entry.reset();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Scores of `keys` (one head, 2 dims) from `s`: re-scored as the live set, or on entry.
    fn run(s: &mut KeyDiffLive, keys: &[f32], positions: &[i32], live: bool) -> Vec<f32> {
        let new = NewKeys {
            layer: 0,
            keys,
            positions,
            value_norms: &[],
            n_head_kv: 1,
            head_dim: 2,
        };
        let mut out = vec![f32::NAN; keys.len() / 2];
        if live {
            s.rescore(&new, &mut out);
        } else {
            s.score(&new, &mut out);
        }
        out
    }

    fn live(keys: &[f32], positions: &[i32]) -> Vec<f32> {
        run(&mut KeyDiffLive::default(), keys, positions, true)
    }

    #[test]
    fn the_anchor_is_the_mean_direction_of_the_live_keys_only() {
        // Live: three keys along x and one along y. The y key is the odd one out, whatever
        // keys came and went before (a re-score has no memory).
        let keys = [2.0, 0.0, 1.0, 0.0, 5.0, 0.0, 0.0, 3.0];
        let out = live(&keys, &[0, 1, 2, 3]);
        // anchor = (3, 1)/√10: cos with x = 3/√10, with y = 1/√10.
        let (cx, cy) = (3.0 / 10f32.sqrt(), 1.0 / 10f32.sqrt());
        for (i, want) in [-cx, -cx, -cx, -cy].into_iter().enumerate() {
            assert!((out[i] - want).abs() < 1e-6, "{out:?}");
        }
        // Once the x keys are gone, a y key is typical again.
        let out = live(&[0.0, 3.0, 0.0, 1.0], &[3, 4]);
        assert!(out.iter().all(|&s| (s + 1.0).abs() < 1e-6), "{out:?}");
    }

    #[test]
    fn keys_entering_after_a_re_score_meet_the_live_anchor() {
        let mut s = KeyDiffLive::default();
        // Five y keys entered and left; three x keys are cached now.
        run(&mut s, &[0.0, 1.0].repeat(5), &[0, 1, 2, 3, 4], false);
        run(&mut s, &[1.0, 0.0].repeat(3), &[5, 6, 7], true);
        // A new y key: anchor (3, 1) with itself, cos 1/√10; the running anchor of every key
        // seen would have made it typical (cos ≈ 0.9).
        let out = run(&mut s, &[0.0, 2.0], &[8], false);
        assert!((out[0] + 1.0 / 10f32.sqrt()).abs() < 1e-6, "{out:?}");
    }

    #[test]
    fn a_zero_key_scores_zero_and_leaves_the_anchor_alone() {
        let out = live(&[0.0, 0.0, 1.0, 0.0], &[0, 1]);
        assert_eq!(out[0], 0.0);
        assert!((out[1] + 1.0).abs() < 1e-6, "{out:?}");
    }
}
