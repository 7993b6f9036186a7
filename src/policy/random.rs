//! Random eviction, seeded: the floor every other policy must beat.

use super::{NewKeys, PolicyInfo, Scorer};

pub const INFO: PolicyInfo = PolicyInfo {
    name: "random",
    help: "evict uniformly at random (seeded by --seed)",
    needs_filters: false,
    needs_query_stats: false,
    evicts: true,
    scores_vary_by_head: false,
    build: |inputs| {
        Ok(Box::new(Random {
            state: inputs.seed ^ 0x9E37_79B9_7F4A_7C15,
        }))
    },
};

pub struct Random {
    state: u64,
}

impl Scorer for Random {
    fn score(&mut self, _new: &NewKeys<'_>, out: &mut [f32]) {
        // One score per position, shared by all heads: random per head would keep a random
        // mixture, which is a different (and stronger) baseline than the literature's.
        let n_head = _new.n_head_kv.max(1);
        for chunk in out.chunks_mut(n_head) {
            let v = crate::math::splitmix64(&mut self.state);
            chunk.fill((v >> 40) as f32);
        }
    }

    fn needs_keys(&self) -> bool {
        false
    }
}
