//! K-norm (Devoto et al., 2024): keys with a small norm tend to receive more attention.

use super::{head_slice, NewKeys, PolicyInfo, Scorer};

pub const INFO: PolicyInfo = PolicyInfo {
    name: "knorm",
    help: "keep keys with the smallest L2 norm",
    needs_filters: false,
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
}
