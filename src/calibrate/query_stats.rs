//! The query statistics of the `expected-attention` policy, gathered in the same pass as the
//! filters: per layer and query head, the mean and covariance of the pre-RoPE queries at the
//! sampled positions.
//!
//! The graph gives each layer's queries before RoPE (the last `Qcur`/`Qcur_normed` node ahead
//! of the `ROPE` node) and after it. Their pairs also check the host's RoPE (`crate::rope`)
//! against llama.cpp's: each layer keeps the first candidate (the model's pairing, with its
//! frequency base and scale, or the usual alternatives for sliding-window layers) that turns
//! every sampled pre-RoPE query into its post-RoPE one within f32 rounding. When no candidate
//! does for some layer, no statistics are stored, and the reason is reported.

use crate::policy::QueryStats;
use crate::rope::RopeSpec;

/// Largest relative error `|R(p)q − q_post| / |q_post|` accepted as the same rotation: f32
/// rounding of angles in the thousands of radians gives about 1e-4; a wrong base gives O(1).
const ROPE_TOLERANCE: f64 = 2e-3;
/// Orthogonal-iteration steps for the covariance factor (its top `rank` eigenpairs).
const SUBSPACE_ITERATIONS: usize = 100;

pub(super) struct QueryStatsAcc {
    n_head: usize,
    head_dim: usize,
    /// Per layer, the candidates not yet contradicted.
    candidates: Vec<Vec<RopeSpec>>,
    /// `[layer][head][dim]`, f64.
    sums: Vec<f64>,
    /// `[layer][head][dim][dim]` (upper triangle filled), f64.
    grams: Vec<f64>,
    /// Samples per layer.
    count: Vec<usize>,
    rotated: Vec<f32>,
}

/// What calibration reports about the statistics.
#[derive(Debug, Clone)]
pub struct QueryStatsOutcome {
    pub stats: Option<QueryStats>,
    /// Why there are none, when there are none.
    pub skipped: Option<String>,
    /// Share of the covariance's trace the stored factor keeps, mean over heads.
    pub variance_kept: f64,
}

impl QueryStatsAcc {
    pub(super) fn new(
        n_layer: usize,
        n_head: usize,
        head_dim: usize,
        candidates: Vec<RopeSpec>,
    ) -> QueryStatsAcc {
        let candidates: Vec<RopeSpec> = candidates
            .into_iter()
            .filter(|c| c.fits(head_dim))
            .collect();
        QueryStatsAcc {
            n_head,
            head_dim,
            candidates: vec![candidates; n_layer],
            sums: vec![0.0; n_layer * n_head * head_dim],
            grams: vec![0.0; n_layer * n_head * head_dim * head_dim],
            count: vec![0; n_layer],
            rotated: Vec::new(),
        }
    }

    /// One sampled query of `layer` at position `pos`, before and after RoPE (`n_head *
    /// head_dim` values each).
    pub(super) fn push(&mut self, layer: usize, pos: i32, pre: &[f32], post: &[f32]) {
        let (h, d) = (self.n_head, self.head_dim);
        if layer >= self.count.len() || pre.len() != h * d || post.len() != h * d {
            return;
        }
        let post_norm = post
            .iter()
            .map(|&x| f64::from(x).powi(2))
            .sum::<f64>()
            .sqrt();
        let rotated = &mut self.rotated;
        self.candidates[layer].retain(|spec| {
            rotated.clear();
            rotated.extend_from_slice(pre);
            spec.rotate(rotated, d, i64::from(pos));
            let err = rotated
                .iter()
                .zip(post)
                .map(|(&a, &b)| f64::from(a - b).powi(2))
                .sum::<f64>()
                .sqrt();
            err <= ROPE_TOLERANCE * post_norm.max(1e-12)
        });
        for head in 0..h {
            let q = &pre[head * d..(head + 1) * d];
            let base = (layer * h + head) * d;
            for (s, &x) in self.sums[base..base + d].iter_mut().zip(q) {
                *s += f64::from(x);
            }
            let g = &mut self.grams[base * d..(base + d) * d];
            for i in 0..d {
                let qi = f64::from(q[i]);
                for j in i..d {
                    g[i * d + j] += qi * f64::from(q[j]);
                }
            }
        }
        self.count[layer] += 1;
    }

    /// The statistics, or why there are none.
    pub(super) fn finish(self, rank: usize, future: usize) -> QueryStatsOutcome {
        let none = |why: String| QueryStatsOutcome {
            stats: None,
            skipped: Some(why),
            variance_kept: 0.0,
        };
        let (h, d) = (self.n_head, self.head_dim);
        let n_layer = self.count.len();
        let mut rope = Vec::with_capacity(n_layer);
        for (layer, c) in self.candidates.iter().enumerate() {
            if self.count[layer] < 2 {
                return none(format!("layer {layer} had no sampled pre-RoPE queries"));
            }
            match c.first() {
                Some(spec) => rope.push(*spec),
                None => {
                    return none(format!(
                        "layer {layer}'s RoPE is not one qfilters reproduces (YaRN, frequency factors or another kind)"
                    ))
                }
            }
        }
        let rank = rank.min(d);
        let mut mean = Vec::with_capacity(n_layer * h * d);
        let mut factor = Vec::with_capacity(n_layer * h * rank * d);
        let mut kept = 0.0;
        for (layer, spec) in rope.iter().enumerate() {
            let n = self.count[layer] as f64;
            let pairs = spec.mean_rotation(future);
            for head in 0..h {
                let base = (layer * h + head) * d;
                let mu: Vec<f64> = self.sums[base..base + d].iter().map(|s| s / n).collect();
                let g = &self.grams[base * d..(base + d) * d];
                // Covariance (upper triangle mirrored), then R̄ Σ R̄ᵀ: R̄ on each column, then
                // on each row.
                let mut cov = vec![0.0; d * d];
                for i in 0..d {
                    for j in i..d {
                        let c = g[i * d + j] / n - mu[i] * mu[j];
                        cov[i * d + j] = c;
                        cov[j * d + i] = c;
                    }
                }
                let mut col = vec![0.0; d];
                for j in 0..d {
                    for i in 0..d {
                        col[i] = cov[i * d + j];
                    }
                    spec.apply_pairs(&pairs, &mut col);
                    for i in 0..d {
                        cov[i * d + j] = col[i];
                    }
                }
                for row in cov.chunks_exact_mut(d) {
                    spec.apply_pairs(&pairs, row);
                }
                let mut mu = mu;
                spec.apply_pairs(&pairs, &mut mu);
                mean.extend(mu.iter().map(|&x| x as f32));
                let (rows, share) = low_rank_factor(&cov, d, rank);
                kept += share;
                factor.extend(rows.iter().map(|&x| x as f32));
            }
        }
        if mean.iter().chain(&factor).any(|x| !x.is_finite()) {
            return none("the statistics are not finite".into());
        }
        QueryStatsOutcome {
            stats: Some(QueryStats {
                n_layer,
                n_head: h,
                head_dim: d,
                rank,
                mean,
                factor,
                rope,
            }),
            skipped: None,
            variance_kept: kept / (n_layer * h).max(1) as f64,
        }
    }
}

/// Rows `L_j` (`rank × d`) with `Σ_j ⟨L_j, k⟩² ≈ kᵀ C k` for symmetric PSD `c` (`d × d`):
/// orthogonal iteration finds the top-`rank` invariant subspace `Q`, and `QᵀCQ = MMᵀ`
/// (Cholesky) gives `L = (QM)ᵀ`. Returns them and the share of the trace they keep.
fn low_rank_factor(c: &[f64], d: usize, rank: usize) -> (Vec<f64>, f64) {
    // Start from the coordinate axes of the largest diagonal entries: deterministic, and never
    // orthogonal to the top subspace in practice.
    let mut order: Vec<usize> = (0..d).collect();
    order.sort_by(|&a, &b| c[b * d + b].total_cmp(&c[a * d + a]));
    let mut q: Vec<Vec<f64>> = order[..rank]
        .iter()
        .map(|&i| {
            let mut v = vec![1e-3; d];
            v[i] = 1.0;
            v
        })
        .collect();
    let mat_vec = |v: &[f64]| -> Vec<f64> {
        (0..d)
            .map(|i| {
                c[i * d..(i + 1) * d]
                    .iter()
                    .zip(v)
                    .map(|(a, b)| a * b)
                    .sum()
            })
            .collect()
    };
    let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
    let orthonormalise = |q: &mut Vec<Vec<f64>>| {
        for j in 0..q.len() {
            for i in 0..j {
                let p = dot(&q[i], &q[j]);
                let qi = q[i].clone();
                for (x, y) in q[j].iter_mut().zip(&qi) {
                    *x -= p * y;
                }
            }
            let norm = dot(&q[j], &q[j]).sqrt();
            if norm > 1e-300 {
                q[j].iter_mut().for_each(|x| *x /= norm);
            }
        }
    };
    orthonormalise(&mut q);
    for _ in 0..SUBSPACE_ITERATIONS {
        q = q.iter().map(|v| mat_vec(v)).collect();
        orthonormalise(&mut q);
    }
    // M = QᵀCQ (rank × rank), then its Cholesky factor (with a tiny jitter: C may be singular).
    let cq: Vec<Vec<f64>> = q.iter().map(|v| mat_vec(v)).collect();
    let mut m = vec![0.0; rank * rank];
    for i in 0..rank {
        for j in 0..rank {
            m[i * rank + j] = dot(&q[i], &cq[j]);
        }
    }
    let trace_m: f64 = (0..rank).map(|i| m[i * rank + i]).sum();
    let trace_c: f64 = (0..d).map(|i| c[i * d + i]).sum();
    let jitter = 1e-12 * trace_m.abs().max(1e-300);
    let mut l = vec![0.0; rank * rank];
    for i in 0..rank {
        for j in 0..=i {
            let s: f64 = (0..j).map(|k| l[i * rank + k] * l[j * rank + k]).sum();
            if i == j {
                l[i * rank + i] = (m[i * rank + i] + jitter - s).max(0.0).sqrt();
            } else {
                let djj = l[j * rank + j];
                l[i * rank + j] = if djj > 0.0 {
                    (m[i * rank + j] - s) / djj
                } else {
                    0.0
                };
            }
        }
    }
    // L_j = Σ_i Q_i l[i][j].
    let mut rows = vec![0.0; rank * d];
    for j in 0..rank {
        for i in 0..rank {
            let w = l[i * rank + j];
            for (r, &x) in rows[j * d..(j + 1) * d].iter_mut().zip(&q[i]) {
                *r += w * x;
            }
        }
    }
    let share = if trace_c > 0.0 {
        trace_m / trace_c
    } else {
        1.0
    };
    (rows, share)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_factor_reproduces_a_low_rank_covariance_and_reports_its_share() {
        // C = 9 a aᵀ + 4 b bᵀ + 0.01 I in 6 dims.
        let d = 6;
        let a = [1.0, 2.0, 0.0, -1.0, 0.5, 0.0];
        let b = [0.0, 0.5, 1.0, 1.0, -2.0, 1.0];
        let na = a.iter().map(|x: &f64| x * x).sum::<f64>().sqrt();
        let proj = a.iter().zip(&b).map(|(x, y)| x * y).sum::<f64>() / (na * na);
        let b: Vec<f64> = b.iter().zip(&a).map(|(y, x)| y - proj * x).collect();
        let nb = b.iter().map(|x| x * x).sum::<f64>().sqrt();
        let (a, b): (Vec<f64>, Vec<f64>) = (
            a.iter().map(|x| x / na).collect(),
            b.iter().map(|x| x / nb).collect(),
        );
        let mut c = vec![0.0; d * d];
        for i in 0..d {
            for j in 0..d {
                c[i * d + j] =
                    9.0 * a[i] * a[j] + 4.0 * b[i] * b[j] + if i == j { 0.01 } else { 0.0 };
            }
        }
        let (rows, share) = low_rank_factor(&c, d, 2);
        let k = [0.3, -1.0, 2.0, 0.1, 0.7, -0.4];
        let exact: f64 = (0..d)
            .map(|i| (0..d).map(|j| k[i] * c[i * d + j] * k[j]).sum::<f64>())
            .sum();
        let approx: f64 = rows
            .chunks_exact(d)
            .map(|r| r.iter().zip(&k).map(|(x, y)| x * y).sum::<f64>().powi(2))
            .sum();
        // What is left out is the isotropic 0.01 outside the top two directions.
        let residual = 0.01 * k.iter().map(|x| x * x).sum::<f64>();
        assert!(
            approx <= exact + 1e-9 && exact - approx <= residual,
            "{exact} {approx}"
        );
        assert!(
            exact - approx > 0.5 * residual * 4.0 / 6.0 - 1e-3,
            "{exact} {approx}"
        );
        assert!((share - 13.02 / 13.06).abs() < 1e-3, "{share}");
    }

    #[test]
    fn a_wrong_rope_leaves_no_candidate_and_no_statistics() {
        let d = 4;
        let right = RopeSpec {
            neox: true,
            n_dims: d,
            base: 10000.0,
            scale: 1.0,
        };
        let wrong = RopeSpec {
            base: 500.0,
            ..right
        };
        let run = |cands: Vec<RopeSpec>| {
            let mut acc = QueryStatsAcc::new(1, 1, d, cands);
            for pos in 0..50 {
                let pre: Vec<f32> = (0..d).map(|i| (pos * 7 + i) as f32 % 5.0 - 2.0).collect();
                let mut post = pre.clone();
                right.rotate(&mut post, d, pos as i64);
                acc.push(0, pos as i32, &pre, &post);
            }
            acc.finish(2, 512)
        };
        let got = run(vec![wrong, right]);
        assert_eq!(got.stats.unwrap().rope, vec![right]);
        let none = run(vec![wrong]);
        assert!(none.stats.is_none());
        assert!(none.skipped.unwrap().contains("RoPE"));
    }
}
