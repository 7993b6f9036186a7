//! Two policies' scores combined: score = z(first) + weight · z(second), each standardised per
//! (layer, KV head) with running statistics, token by token (the same statistics as the
//! recency prior, so a score does not depend on batching either). Standardising first makes
//! one weight mean the same for every head and every pair of scorers, whatever their scales.
//!
//! Not a registered policy: `--policy A+B` names one for any two registered policies that
//! evict, and [`super::PolicyInfo::scorer`] builds it; `--mix-weight` sets the weight.

use super::recency::RunningZ;
use super::{NewKeys, Scorer};

pub struct Mix {
    first: Box<dyn Scorer>,
    second: Box<dyn Scorer>,
    weight: f64,
    z_first: RunningZ,
    z_second: RunningZ,
    raw_first: Vec<f32>,
    raw_second: Vec<f32>,
}

impl Mix {
    pub fn new(first: Box<dyn Scorer>, second: Box<dyn Scorer>, weight: f64) -> Mix {
        Mix {
            first,
            second,
            weight,
            z_first: RunningZ::default(),
            z_second: RunningZ::default(),
            raw_first: Vec::new(),
            raw_second: Vec::new(),
        }
    }
}

impl Scorer for Mix {
    fn score(&mut self, new: &NewKeys<'_>, out: &mut [f32]) {
        self.raw_first.resize(out.len(), 0.0);
        self.raw_second.resize(out.len(), 0.0);
        self.first.score(new, &mut self.raw_first);
        self.second.score(new, &mut self.raw_second);
        let h = new.n_head_kv;
        for t in 0..new.positions.len() {
            for head in 0..h {
                let i = t * h + head;
                let a = self
                    .z_first
                    .push(new.layer, h, head, self.raw_first[i] as f64);
                let b = self
                    .z_second
                    .push(new.layer, h, head, self.raw_second[i] as f64);
                out[i] = (a + self.weight * b) as f32;
            }
        }
    }

    fn needs_keys(&self) -> bool {
        self.first.needs_keys() || self.second.needs_keys()
    }

    fn needs_value_norms(&self) -> bool {
        self.first.needs_value_norms() || self.second.needs_value_norms()
    }

    /// Both scorers forget; the standardising statistics carry over, as the recency prior's.
    fn reset(&mut self) {
        self.first.reset();
        self.second.reset();
    }
}
