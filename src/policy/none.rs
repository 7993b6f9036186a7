//! The full-cache reference: nothing is evicted, the context holds the whole input.

use super::{NewKeys, PolicyInfo, Scorer};

pub const INFO: PolicyInfo = PolicyInfo {
    name: "none",
    help: "no eviction: full cache sized to the input (the quality reference)",
    needs_filters: false,
    needs_query_stats: false,
    evicts: false,
    scores_vary_by_head: false,
    build: |_| Ok(Box::new(FullCache)),
};

pub struct FullCache;

impl Scorer for FullCache {
    fn score(&mut self, _new: &NewKeys<'_>, out: &mut [f32]) {
        out.fill(0.0);
    }

    fn needs_keys(&self) -> bool {
        false
    }
}
