//! Quality under compression, measured like the Q-Filters paper: streaming perplexity
//! ([`ppl`]) and passkey retrieval ([`passkey`]), swept over policies, knobs and cache types
//! ([`sweep`]), and the quality-per-byte front of such a sweep ([`frontier`]).
//!
//! The evaluations drive an [`crate::engine::Engine`] the way a user's run would: the input is
//! fed in chunks, the cache is brought back to its budget after each chunk, and quality is read
//! from the logits the model produced with whatever the policy left in the cache.

pub mod frontier;
pub mod passkey;
pub mod ppl;
pub mod sweep;

use crate::math::mean;

/// Mean NLL over consecutive windows of `window` values (the last one may be shorter):
/// `(centre index, mean)`.
pub fn windowed_mean(values: &[f64], window: usize) -> Vec<(f64, f64)> {
    let w = window.max(1);
    values
        .chunks(w)
        .enumerate()
        .map(|(i, c)| {
            (
                (i * w) as f64 + c.len() as f64 / 2.0,
                mean(c.iter().copied()).unwrap_or(f64::NAN),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windowed_mean_covers_every_value() {
        let v: Vec<f64> = (0..10).map(|i| i as f64).collect();
        let w = windowed_mean(&v, 4);
        assert_eq!(w.len(), 3);
        assert_eq!(w[0], (2.0, 1.5));
        assert_eq!(w[2], (9.0, 8.5));
    }
}
