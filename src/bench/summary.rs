//! What `qfilters bench --compare` reports of a [`Comparison`] of the hook-off full cache (arm
//! `a`) and the hook-on policy (arm `b`): medians, on/off ratios, KV bytes and the bandwidth
//! bound, as one serializable record, and the lines printed from it.
//!
//! In its own file beside `bench.rs` (the measuring) so that the report can be tested without
//! a model.

use serde::Serialize;

use crate::bench::{median, BandwidthBound, Comparison, RunMeasure};

/// Per-rep values of a comparison, in rep order.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PerRep {
    pub prefill_ratio: Vec<f64>,
    pub decode_ratio: Vec<f64>,
    pub tail_decode_ratio: Vec<f64>,
    pub prefill_tok_s_off: Vec<f64>,
    pub prefill_tok_s_on: Vec<f64>,
    pub decode_tok_s_off: Vec<f64>,
    pub decode_tok_s_on: Vec<f64>,
    pub tail_decode_tok_s_off: Vec<f64>,
    pub tail_decode_tok_s_on: Vec<f64>,
}

/// The summary of a hook-off / hook-on comparison (medians over reps; `_off` is arm `a`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    pub reps: usize,
    /// Whether the hook-on cache's budget is below the input (else nothing is evicted and the
    /// comparison measures the hook alone).
    pub evicting: bool,
    pub prefill_tok_s_off: f64,
    pub prefill_tok_s_on: f64,
    pub decode_tok_s_off: f64,
    pub decode_tok_s_on: f64,
    pub tail_decode_tok_s_off: f64,
    pub tail_decode_tok_s_on: f64,
    pub prefill_ratio: f64,
    pub decode_ratio: f64,
    pub tail_decode_ratio: f64,
    /// `off / on - 1` of the speeds: the hook's price (negative: hook-on faster, noise).
    pub prefill_overhead: f64,
    pub decode_overhead: f64,
    pub kv_bytes_off: usize,
    pub kv_bytes_on: usize,
    pub kv_bytes_ratio: f64,
    pub n_ctx_off: usize,
    pub n_ctx_on: usize,
    pub peak_cells_off: usize,
    pub peak_cells: usize,
    pub evicted_on: u64,
    pub live_cells_off: usize,
    pub live_cells_on: usize,
    pub weight_bytes_per_step: u64,
    pub kv_bytes_read_off: u64,
    pub kv_bytes_read_on: u64,
    pub bandwidth_bound: f64,
    pub tail_decode_share_of_bound: f64,
    pub decode_share_of_bound: f64,
    pub per_rep: PerRep,
}

fn column(runs: &[RunMeasure], f: fn(&RunMeasure) -> f64) -> Vec<f64> {
    runs.iter().map(f).collect()
}

fn overhead(ratio: f64) -> f64 {
    1.0 / ratio.max(1e-12) - 1.0
}

const MIB: f64 = 1048576.0;

impl Summary {
    /// `evicting`: the budget is below the input; `weight_bytes`: what a decode step reads
    /// as weights ([`crate::bench::weight_bytes_per_step`]).
    pub fn new(cmp: &Comparison, evicting: bool, weight_bytes: u64) -> Summary {
        let prefill = cmp.ratios(|m| m.prefill_tok_s());
        let decode = cmp.ratios(|m| m.decode_tok_s());
        let tail = cmp.ratios(|m| m.tail_decode_tok_s);
        let mut off = cmp.a.last().cloned().unwrap_or_default();
        let on = cmp.b.last().cloned().unwrap_or_default();
        // Without the hook the cache tensors are never seen; same layers and types as the
        // hook-on context, so its KV bytes scale with the cells allocated.
        if off.stats.kv_bytes == 0 && on.stats.n_ctx > 0 {
            off.stats.kv_bytes = (on.stats.kv_bytes as f64 * off.stats.n_ctx as f64
                / on.stats.n_ctx as f64) as usize;
        }
        let kv_bytes_ratio = if on.stats.kv_bytes > 0 {
            off.stats.kv_bytes as f64 / on.stats.kv_bytes as f64
        } else {
            0.0
        };
        let kv_per_cell = if on.stats.n_ctx > 0 {
            on.stats.kv_bytes as f64 / on.stats.n_ctx as f64
        } else {
            0.0
        };
        let bound = BandwidthBound::new(weight_bytes, kv_per_cell, off.live_cells, on.live_cells);
        let med = |runs: &[RunMeasure], f: fn(&RunMeasure) -> f64| Comparison::median_of(runs, f);
        Summary {
            reps: prefill.len(),
            evicting,
            prefill_tok_s_off: med(&cmp.a, |m| m.prefill_tok_s()),
            prefill_tok_s_on: med(&cmp.b, |m| m.prefill_tok_s()),
            decode_tok_s_off: med(&cmp.a, |m| m.decode_tok_s()),
            decode_tok_s_on: med(&cmp.b, |m| m.decode_tok_s()),
            tail_decode_tok_s_off: med(&cmp.a, |m| m.tail_decode_tok_s),
            tail_decode_tok_s_on: med(&cmp.b, |m| m.tail_decode_tok_s),
            prefill_ratio: median(&prefill),
            decode_ratio: median(&decode),
            tail_decode_ratio: median(&tail),
            prefill_overhead: overhead(median(&prefill)),
            decode_overhead: overhead(median(&decode)),
            kv_bytes_off: off.stats.kv_bytes,
            kv_bytes_on: on.stats.kv_bytes,
            kv_bytes_ratio,
            n_ctx_off: off.stats.n_ctx,
            n_ctx_on: on.stats.n_ctx,
            peak_cells_off: off.stats.peak_cells,
            peak_cells: on.stats.peak_cells,
            evicted_on: on.stats.evicted,
            live_cells_off: off.live_cells,
            live_cells_on: on.live_cells,
            weight_bytes_per_step: bound.weight_bytes,
            kv_bytes_read_off: bound.kv_bytes_read_full,
            kv_bytes_read_on: bound.kv_bytes_read_budget,
            bandwidth_bound: bound.bound,
            tail_decode_share_of_bound: bound.share(median(&tail)),
            decode_share_of_bound: bound.share(median(&decode)),
            per_rep: PerRep {
                prefill_ratio: prefill,
                decode_ratio: decode,
                tail_decode_ratio: tail,
                prefill_tok_s_off: column(&cmp.a, |m| m.prefill_tok_s()),
                prefill_tok_s_on: column(&cmp.b, |m| m.prefill_tok_s()),
                decode_tok_s_off: column(&cmp.a, |m| m.decode_tok_s()),
                decode_tok_s_on: column(&cmp.b, |m| m.decode_tok_s()),
                tail_decode_tok_s_off: column(&cmp.a, |m| m.tail_decode_tok_s),
                tail_decode_tok_s_on: column(&cmp.b, |m| m.tail_decode_tok_s),
            },
        }
    }

    /// The report's lines: the ratios, then the long-context gain (evicting) or the hook's
    /// overhead (not evicting). `tail` is the steps timed at the end of the stream; `budget`
    /// and `input` the cells of each arm.
    pub fn lines(&self, tail: usize, budget: usize, input: usize) -> Vec<String> {
        let mut out = vec![format!(
            "on/off speed ratio (median of {} reps): prefill {:.4} | decode {:.4} | last {tail} steps {:.4}",
            self.reps, self.prefill_ratio, self.decode_ratio, self.tail_decode_ratio
        )];
        if self.evicting {
            out.push(format!(
                "long context: budget {budget} vs full cache {input}: KV bytes {:.1} → {:.1} MiB (÷{:.2}), end-of-stream decode ×{:.2}",
                self.kv_bytes_off as f64 / MIB,
                self.kv_bytes_on as f64 / MIB,
                self.kv_bytes_ratio,
                self.tail_decode_ratio
            ));
            out.push(format!(
                "bandwidth bound: weights {:.1} MiB + live KV {:.1} → {:.1} MiB per decode step: ×{:.2}; end-of-stream decode reaches {:.2} of it",
                self.weight_bytes_per_step as f64 / MIB,
                self.kv_bytes_read_off as f64 / MIB,
                self.kv_bytes_read_on as f64 / MIB,
                self.bandwidth_bound,
                self.tail_decode_share_of_bound
            ));
        } else {
            out.push(format!(
                "hook overhead at equal live cells: prefill {:+.2}% | decode {:+.2}% (negative = hook-on faster, noise)",
                self.prefill_overhead * 100.0,
                self.decode_overhead * 100.0
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn measure(
        prefill: f64,
        decode: f64,
        kv_bytes: usize,
        n_ctx: usize,
        live: usize,
    ) -> RunMeasure {
        // One second of prefill and of decode: the token counts are the rates.
        RunMeasure {
            stats: crate::engine::Stats {
                prompt_tokens: prefill as u64,
                generated_tokens: decode as u64,
                prefill_seconds: 1.0,
                decode_seconds: 1.0,
                kv_bytes,
                n_ctx,
                peak_cells: live,
                ..Default::default()
            },
            tail_decode_tok_s: decode,
            live_cells: live,
            ..RunMeasure::default()
        }
    }

    #[test]
    fn a_budgeted_cache_reports_its_kv_saving_and_bound() {
        // Off: 4096 cells, KV bytes unseen (no hook); on: 1024 cells of 1 KiB each.
        let cmp = Comparison {
            a: vec![measure(100.0, 10.0, 0, 4096, 4000); 3],
            b: vec![
                measure(90.0, 20.0, 1 << 20, 1024, 1000),
                measure(95.0, 30.0, 1 << 20, 1024, 1000),
                measure(80.0, 25.0, 1 << 20, 1024, 1000),
            ],
        };
        let s = Summary::new(&cmp, true, 3 << 20);
        assert_eq!(s.reps, 3);
        assert_eq!(s.kv_bytes_off, 4 << 20, "scaled by the cells allocated");
        assert!((s.kv_bytes_ratio - 4.0).abs() < 1e-9);
        assert!((s.decode_ratio - 2.5).abs() < 1e-9, "median of 2, 3, 2.5");
        assert!((s.prefill_ratio - 0.9).abs() < 1e-9);
        // (3 MiB + 4000 KiB) / (3 MiB + 1000 KiB).
        let bound = (3072.0 + 4000.0) / (3072.0 + 1000.0);
        assert!(
            (s.bandwidth_bound - bound).abs() < 1e-3,
            "{}",
            s.bandwidth_bound
        );
        assert_eq!(s.per_rep.decode_ratio, [2.0, 3.0, 2.5]);
        let lines = s.lines(64, 1024, 4096);
        assert_eq!(lines.len(), 3);
        assert!(
            lines[1].contains("budget 1024 vs full cache 4096"),
            "{}",
            lines[1]
        );
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(v["per_rep"]["decode_ratio"][1], 3.0);
    }

    #[test]
    fn without_eviction_the_report_is_the_hook_overhead() {
        let cmp = Comparison {
            a: vec![measure(100.0, 10.0, 1 << 20, 1024, 500)],
            b: vec![measure(50.0, 10.0, 1 << 20, 1024, 500)],
        };
        let s = Summary::new(&cmp, false, 1 << 20);
        assert!(
            (s.prefill_overhead - 1.0).abs() < 1e-9,
            "half the speed: +100%"
        );
        assert_eq!(s.decode_overhead, 0.0);
        let lines = s.lines(64, 1024, 1024);
        assert_eq!(lines.len(), 2);
        assert!(lines[1].contains("prefill +100.00%"), "{}", lines[1]);
    }
}
