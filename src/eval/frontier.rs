//! The quality-per-byte frontier: which settings no other setting beats on both KV bytes and
//! quality (perplexity, lower is better; passkey rate, higher is better).

/// Whether each of `points` (`(bytes, quality)`) is on the Pareto front: no other point takes
/// at most its bytes with at least its quality and is strictly better on one of the two.
/// `higher_is_better` says which way quality goes. Non-finite points are never on it.
pub fn pareto_front(points: &[(f64, f64)], higher_is_better: bool) -> Vec<bool> {
    let better = |a: f64, b: f64| if higher_is_better { a > b } else { a < b };
    let at_least = |a: f64, b: f64| a == b || better(a, b);
    points
        .iter()
        .map(|&(x, y)| {
            x.is_finite()
                && y.is_finite()
                && !points.iter().any(|&(ox, oy)| {
                    ox.is_finite()
                        && oy.is_finite()
                        && ox <= x
                        && at_least(oy, y)
                        && (ox < x || better(oy, y))
                })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_front_keeps_what_nothing_beats_on_both_axes() {
        // (MiB, ppl): 1 is beaten by 0 (fewer bytes, lower ppl); 3 ties 2 on bytes with a
        // higher ppl; NaN never counts.
        let pts = [
            (7.0, 20.0),
            (8.0, 21.0),
            (14.0, 17.0),
            (14.0, 18.0),
            (28.0, 16.5),
            (f64::NAN, 1.0),
        ];
        assert_eq!(
            pareto_front(&pts, false),
            [true, false, true, false, true, false]
        );
        // Passkey rate: higher is better.
        let rates = [(7.0, 0.2), (8.0, 0.1), (14.0, 0.9), (28.0, 0.9)];
        assert_eq!(pareto_front(&rates, true), [true, false, true, false]);
        // Equal points are both on the front (neither is strictly better).
        assert_eq!(pareto_front(&[(1.0, 1.0), (1.0, 1.0)], false), [true, true]);
    }
}
