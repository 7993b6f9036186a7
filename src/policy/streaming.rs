//! StreamingLLM (Xiao et al., 2023): attention sinks plus the most recent tokens. The sinks and
//! window are protected by the shared mechanism; among the rest, older means evicted first.

use super::{NewKeys, PolicyInfo, Scorer};

pub const INFO: PolicyInfo = PolicyInfo {
    name: "streaming",
    help: "keep the first --sinks tokens and the most recent ones",
    needs_filters: false,
    needs_query_stats: false,
    evicts: true,
    scores_vary_by_head: false,
    build: |_| Ok(Box::new(Streaming)),
};

pub struct Streaming;

impl Scorer for Streaming {
    fn score(&mut self, new: &NewKeys<'_>, out: &mut [f32]) {
        for (t, &pos) in new.positions.iter().enumerate() {
            out[t * new.n_head_kv..(t + 1) * new.n_head_kv].fill(pos as f32);
        }
    }

    fn needs_keys(&self) -> bool {
        false
    }
}
