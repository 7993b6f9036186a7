//! Small numeric helpers shared by scorers, selection and evaluation.

#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Four accumulators let the compiler vectorise without reassociating one long chain.
    let mut acc = [0f32; 4];
    let chunks = a.len().min(b.len()) / 4;
    for i in 0..chunks {
        for j in 0..4 {
            acc[j] += a[4 * i + j] * b[4 * i + j];
        }
    }
    let mut sum = acc[0] + acc[1] + acc[2] + acc[3];
    for i in chunks * 4..a.len().min(b.len()) {
        sum += a[i] * b[i];
    }
    sum
}

/// Index of the largest value, the first of equal maxima (as llama.cpp's greedy sampler
/// picks); 0 for an empty slice.
pub fn argmax(values: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in values.iter().enumerate() {
        if v > values[best] {
            best = i;
        }
    }
    best
}

/// Arithmetic mean; `None` for no values (each caller says what an empty mean reports).
pub fn mean(values: impl IntoIterator<Item = f64>) -> Option<f64> {
    let (mut sum, mut n) = (0.0, 0usize);
    for v in values {
        sum += v;
        n += 1;
    }
    (n > 0).then(|| sum / n as f64)
}

/// Items per second; 0 when no time was measured.
pub fn rate(n: u64, secs: f64) -> f64 {
    if secs > 0.0 {
        n as f64 / secs
    } else {
        0.0
    }
}

pub fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Natural-log softmax probability of `target` under `logits`, i.e. −NLL.
pub fn log_prob(logits: &[f32], target: usize) -> f64 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&l| ((l as f64) - max).exp()).sum();
    logits
        .get(target)
        .map(|&l| l as f64 - max - sum.ln())
        .unwrap_or(f64::NEG_INFINITY)
}

/// Spearman rank correlation (average ranks for ties).
pub fn spearman(a: &[f32], b: &[f32]) -> f64 {
    let ra = ranks(a);
    let rb = ranks(b);
    pearson(&ra, &rb)
}

fn ranks(x: &[f32]) -> Vec<f64> {
    let mut idx: Vec<usize> = (0..x.len()).collect();
    idx.sort_by(|&i, &j| x[i].total_cmp(&x[j]));
    let mut r = vec![0f64; x.len()];
    let mut i = 0;
    while i < idx.len() {
        let mut j = i;
        while j + 1 < idx.len() && x[idx[j + 1]] == x[idx[i]] {
            j += 1;
        }
        let avg = (i + j) as f64 / 2.0;
        for &k in &idx[i..=j] {
            r[k] = avg;
        }
        i = j + 1;
    }
    r
}

pub fn pearson(a: &[f64], b: &[f64]) -> f64 {
    let n = a.len().min(b.len());
    if n < 2 {
        return 0.0;
    }
    let ma = a[..n].iter().sum::<f64>() / n as f64;
    let mb = b[..n].iter().sum::<f64>() / n as f64;
    let (mut sab, mut saa, mut sbb) = (0.0, 0.0, 0.0);
    for i in 0..n {
        let (da, db) = (a[i] - ma, b[i] - mb);
        sab += da * db;
        saa += da * da;
        sbb += db * db;
    }
    if saa <= 0.0 || sbb <= 0.0 {
        return 0.0;
    }
    sab / (saa * sbb).sqrt()
}

/// Whether `n` values are a whole number of blocks of `block` (false for empty blocks). Written
/// without `usize::is_multiple_of`, which is newer than the crate's minimum Rust.
pub fn whole_blocks(n: usize, block: usize) -> bool {
    block != 0 && n / block * block == n
}

/// Applies the orthonormal Walsh-Hadamard transform to each consecutive run of `n` values of
/// `x`, in place; false (and `x` untouched) unless `n` is a power of two that divides
/// `x.len()`. The matrix is Sylvester's, `H[i][j] = (-1)^popcount(i & j) / sqrt(n)`, the one
/// llama.cpp rotates quantized K and V caches with: symmetric and orthonormal, so it is its own
/// inverse.
pub fn hadamard_in_place(x: &mut [f32], n: usize) -> bool {
    if !n.is_power_of_two() || !whole_blocks(x.len(), n) {
        return false;
    }
    let scale = 1.0 / (n as f32).sqrt();
    for block in x.chunks_exact_mut(n) {
        let mut h = 1;
        while h < n {
            for i in (0..n).step_by(2 * h) {
                for j in i..i + h {
                    let (a, b) = (block[j], block[j + h]);
                    block[j] = a + b;
                    block[j + h] = a - b;
                }
            }
            h *= 2;
        }
        for v in block.iter_mut() {
            *v *= scale;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hadamard_matches_the_sylvester_matrix_and_undoes_itself() {
        let n = 8;
        let x: Vec<f32> = (0..2 * n).map(|i| (i as f32 * 0.7).sin()).collect();
        let mut y = x.clone();
        assert!(hadamard_in_place(&mut y, n));
        for (b, block) in x.chunks(n).enumerate() {
            for i in 0..n {
                let want: f32 = (0..n)
                    .map(|j| {
                        let sign = if (i & j).count_ones() % 2 == 0 {
                            1.0
                        } else {
                            -1.0
                        };
                        sign * block[j] / (n as f32).sqrt()
                    })
                    .sum();
                assert!((y[b * n + i] - want).abs() < 1e-5, "row {i} of block {b}");
            }
        }
        assert!(hadamard_in_place(&mut y, n));
        assert!(x.iter().zip(&y).all(|(a, b)| (a - b).abs() < 1e-5));
        // Blocks that are not a power of two, or do not divide the row: refused, untouched.
        assert!(!hadamard_in_place(&mut y, 6) && !hadamard_in_place(&mut y[..12], 8));
        assert!(x.iter().zip(&y).all(|(a, b)| (a - b).abs() < 1e-5));
    }

    #[test]
    fn dot_matches_naive_sum() {
        let a: Vec<f32> = (0..67).map(|i| i as f32 * 0.5).collect();
        let b: Vec<f32> = (0..67).map(|i| 1.0 - i as f32 * 0.25).collect();
        let naive: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        assert!((dot(&a, &b) - naive).abs() < 1e-2 * naive.abs().max(1.0));
    }

    #[test]
    fn spearman_is_one_for_monotone_and_minus_one_for_reversed() {
        let a = [1.0, 2.0, 3.0, 10.0];
        assert!((spearman(&a, &[0.1, 0.2, 0.3, 0.4]) - 1.0).abs() < 1e-12);
        assert!((spearman(&a, &[4.0, 3.0, 2.0, 1.0]) + 1.0).abs() < 1e-12);
    }

    #[test]
    fn log_prob_of_uniform_logits_is_minus_log_n() {
        let l = [0.0f32; 8];
        assert!((log_prob(&l, 3) + (8f64).ln()).abs() < 1e-9);
    }
}
