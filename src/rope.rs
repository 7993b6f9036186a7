//! llama.cpp's rotary position embedding (RoPE), reproduced on the host so that the
//! `expected-attention` statistics can live in a frame without positions: calibration turns
//! sampled queries back into their pre-RoPE form to measure their mean and covariance, and the
//! scorer turns each cached (post-RoPE) key back the same way.
//!
//! Mirrors ggml's CPU kernel of the pinned version (llama-cpp-sys-2 0.1.161, `ggml_rope_cache_init`
//! without YaRN and without frequency factors): the angle of pair `i` at position `p` is
//! `p · scale · base^(−2i/n_dims)`, the power built by repeated f32 multiplication as ggml does,
//! so that angles at positions in the thousands agree to f32 rounding. Calibration checks this
//! against the model's own graph (pre- and post-RoPE queries) layer by layer and stores only
//! what it verified, so a model whose RoPE is anything else (YaRN, frequency factors,
//! multi-section) gets no statistics rather than wrong ones.

/// One layer's rotary embedding.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RopeSpec {
    /// NeoX pairing (dim `i` with `i + n_dims/2`); else adjacent pairs (`2i`, `2i+1`).
    pub neox: bool,
    /// Leading dims that rotate (the rest pass through).
    pub n_dims: usize,
    pub base: f32,
    pub scale: f32,
}

impl RopeSpec {
    /// Whether the spec can describe a head of `head_dim` values: an even, non-zero number of
    /// rotated dims within the head, and finite positive frequencies.
    pub fn fits(&self, head_dim: usize) -> bool {
        self.n_dims >= 2
            && crate::math::whole_blocks(self.n_dims, 2)
            && self.n_dims <= head_dim
            && self.base.is_finite()
            && self.base > 1.0
            && self.scale.is_finite()
            && self.scale > 0.0
    }

    /// The two dims of pair `i` (`i < n_dims / 2`).
    fn pair(&self, i: usize) -> (usize, usize) {
        if self.neox {
            (i, i + self.n_dims / 2)
        } else {
            (2 * i, 2 * i + 1)
        }
    }

    /// `base^(−2/n_dims)` in f32, the ratio between the frequencies of successive pairs.
    fn theta_scale(&self) -> f32 {
        self.base.powf(-2.0 / self.n_dims as f32)
    }

    /// Rotates each head (`head_dim` values) of `x` to position `pos`; a negative position
    /// undoes the rotation of position `-pos`. The angles are built as ggml builds them: start
    /// at the position, multiply by the ratio once per pair, scale (f32 throughout).
    pub fn rotate(&self, x: &mut [f32], head_dim: usize, pos: i64) {
        let theta_scale = self.theta_scale();
        let mut theta = pos.unsigned_abs() as f32;
        for i in 0..self.n_dims / 2 {
            let (sin, cos) = (self.scale * theta).sin_cos();
            let sin = if pos < 0 { -sin } else { sin };
            theta *= theta_scale;
            let (a, b) = self.pair(i);
            for head in x.chunks_exact_mut(head_dim) {
                let (x0, x1) = (head[a], head[b]);
                head[a] = x0 * cos - x1 * sin;
                head[b] = x0 * sin + x1 * cos;
            }
        }
    }

    /// The rotation averaged over the next `future` positions, `R̄ = mean over Δ = 1..=future
    /// of R(Δ)`, as one `(cos, sin)` mean per pair: what the expected attention of a key at any
    /// position uses for the queries that will read it (Devoto et al. 2025).
    pub fn mean_rotation(&self, future: usize) -> Vec<(f64, f64)> {
        let n = future.max(1);
        let ratio = f64::from(self.base).powf(-2.0 / self.n_dims as f64);
        (0..self.n_dims / 2)
            .map(|i| {
                let f = f64::from(self.scale) * ratio.powi(i as i32);
                let (mut c, mut s) = (0.0f64, 0.0f64);
                for delta in 1..=n {
                    let (sin, cos) = (delta as f64 * f).sin_cos();
                    c += cos;
                    s += sin;
                }
                (c / n as f64, s / n as f64)
            })
            .collect()
    }

    /// Applies `R̄` ([`Self::mean_rotation`]'s pairs) to one head `x` in place.
    pub fn apply_pairs(&self, pairs: &[(f64, f64)], x: &mut [f64]) {
        for (i, &(c, s)) in pairs.iter().enumerate() {
            let (a, b) = self.pair(i);
            let (x0, x1) = (x[a], x[b]);
            x[a] = c * x0 - s * x1;
            x[b] = s * x0 + c * x1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(neox: bool) -> RopeSpec {
        RopeSpec {
            neox,
            n_dims: 8,
            base: 10000.0,
            scale: 1.0,
        }
    }

    #[test]
    fn rotating_back_undoes_a_rotation_and_keeps_the_norm() {
        for neox in [false, true] {
            let s = spec(neox);
            let x: Vec<f32> = (0..20).map(|i| (i as f32 * 0.7).sin()).collect();
            let mut y = x.clone();
            s.rotate(&mut y, 10, 1234);
            assert!(
                y.iter().zip(&x).any(|(a, b)| (a - b).abs() > 0.1),
                "it rotates"
            );
            let norm = |v: &[f32]| v.iter().map(|a| a * a).sum::<f32>();
            assert!((norm(&y) - norm(&x)).abs() < 1e-4);
            // Dims past n_dims pass through.
            assert_eq!(y[8..10], x[8..10]);
            s.rotate(&mut y, 10, -1234);
            for (a, b) in y.iter().zip(&x) {
                assert!((a - b).abs() < 1e-4, "{y:?} vs {x:?}");
            }
        }
    }

    #[test]
    fn dot_products_depend_only_on_the_relative_position() {
        let s = spec(true);
        let q: Vec<f32> = (0..8).map(|i| 1.0 + i as f32).collect();
        let k: Vec<f32> = (0..8).map(|i| (i as f32).cos()).collect();
        let dot_at = |pq: i64, pk: i64| {
            let (mut a, mut b) = (q.clone(), k.clone());
            s.rotate(&mut a, 8, pq);
            s.rotate(&mut b, 8, pk);
            crate::math::dot(&a, &b)
        };
        assert!((dot_at(100, 90) - dot_at(20, 10)).abs() < 1e-3);
    }

    #[test]
    fn the_mean_rotation_of_one_position_is_that_rotation() {
        let s = spec(false);
        let x: Vec<f32> = (0..8).map(|i| i as f32 - 3.0).collect();
        let mut rotated = x.clone();
        s.rotate(&mut rotated, 8, 1);
        let mut mean: Vec<f64> = x.iter().map(|&v| v as f64).collect();
        s.apply_pairs(&s.mean_rotation(1), &mut mean);
        for (a, b) in mean.iter().zip(&rotated) {
            assert!((*a as f32 - b).abs() < 1e-5);
        }
        // Averaged over many positions, fast pairs fade and the slowest pair barely turns.
        let mut long: Vec<f64> = vec![1.0; 8];
        s.apply_pairs(&s.mean_rotation(512), &mut long);
        assert!(
            long[0].hypot(long[1]) < 0.05 && long[6].hypot(long[7]) > 0.9 * 2f64.sqrt(),
            "{long:?}"
        );
    }
}
