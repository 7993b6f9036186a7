//! K-norm (Devoto et al., 2024): keys with a small norm tend to receive more attention.

use super::{head_slice, KeyReduce, NewKeys, PolicyInfo, Scorer};

pub const INFO: PolicyInfo = PolicyInfo {
    name: "knorm",
    help: "keep keys with the smallest L2 norm",
    needs_filters: false,
    needs_query_stats: false,
    evicts: true,
    scores_vary_by_head: true,
    build: |_| Ok(Box::new(KNorm)),
};

pub struct KNorm;

impl Scorer for KNorm {
    fn score(&mut self, new: &NewKeys<'_>, out: &mut [f32]) {
        for t in 0..new.positions.len() {
            for h in 0..new.n_head_kv {
                let k = head_slice(new, t, h);
                out[t * new.n_head_kv + h] = -crate::math::dot(k, k).sqrt();
            }
        }
    }

    fn key_reduce(&self) -> Option<KeyReduce> {
        Some(KeyReduce::SquaredNorm)
    }

    fn score_reduced(&mut self, _layer: usize, _positions: &[i32], stats: &[f32], out: &mut [f32]) {
        for (o, &s) in out.iter_mut().zip(stats) {
            *o = -s.max(0.0).sqrt();
        }
    }
}
