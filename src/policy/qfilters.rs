//! Q-Filters (Godey et al., 2025): score = −⟨k, f⟩ with f the published filter (f = −v, v the
//! dominant direction of the head's queries), so a key aligned with the queries scores high.

use std::sync::Arc;

use gguf_tools::filters::QFilters;

use super::{head_slice, KeyReduce, NewKeys, PolicyInfo, Scorer};

pub const INFO: PolicyInfo = PolicyInfo {
    name: "qfilters",
    help: "keep keys with the highest projection on the Q-Filter of their head (needs filters)",
    needs_filters: true,
    needs_query_stats: false,
    evicts: true,
    scores_vary_by_head: true,
    build: |inputs| {
        let filters = inputs
            .filters
            .clone()
            .ok_or_else(|| crate::Error::invalid("qfilters needs filters"))?;
        Ok(Box::new(QFiltersScorer { filters }))
    },
};

pub struct QFiltersScorer {
    filters: Arc<QFilters>,
}

impl Scorer for QFiltersScorer {
    fn score(&mut self, new: &NewKeys<'_>, out: &mut [f32]) {
        for t in 0..new.positions.len() {
            for h in 0..new.n_head_kv {
                let f = self.filters.filter(new.layer, h);
                let k = head_slice(new, t, h);
                out[t * new.n_head_kv + h] = -crate::math::dot(k, f);
            }
        }
    }

    fn key_reduce(&self) -> Option<KeyReduce> {
        Some(KeyReduce::Dot)
    }

    fn filter(&self, layer: usize, head: usize) -> Option<&[f32]> {
        Some(self.filters.filter(layer, head))
    }

    fn score_reduced(&mut self, _layer: usize, _positions: &[i32], stats: &[f32], out: &mut [f32]) {
        for (o, &s) in out.iter_mut().zip(stats) {
            *o = -s;
        }
    }
}
