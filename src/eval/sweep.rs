//! The evaluation sweep: the product of lists of policies, budgets and eviction knobs, without
//! the points that cannot differ, each point one [`EvictionArgs`]; its labels; and the result
//! records `qfilters eval` writes as JSON.

use serde::Serialize;

use crate::args::{EvictionArgs, LlamaArgs};
use crate::engine::cache::{Combiner, Granularity};
use crate::error::{Error, Result};
use crate::ffi::CacheType;
use crate::policy::PolicyInfo;

/// The lists swept over (each non-empty; the sweep is their product, except the cache types,
/// which pair up: see [`Sweep::cache_pairs`]). Parsed from the command line by
/// [`crate::args::SweepArgs`].
#[derive(Debug, Clone, PartialEq)]
pub struct Sweep {
    pub policies: Vec<PolicyInfo>,
    pub window: Vec<usize>,
    pub sinks: Vec<usize>,
    pub granularity: Vec<Granularity>,
    pub combiner: Vec<Combiner>,
    pub slack: Vec<usize>,
    pub recency: Vec<f64>,
    pub cache_type_k: Vec<CacheType>,
    pub cache_type_v: Vec<CacheType>,
}

/// How a point's cache is sized.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Budget {
    /// A fixed number of cells.
    Cells(usize),
    /// A compression ratio: the budget is the document's tokens divided by it.
    Ratio(f64),
}

impl Budget {
    /// The cells for a document of `tokens` tokens.
    pub fn cells(self, tokens: usize) -> usize {
        match self {
            Budget::Cells(b) => b,
            Budget::Ratio(r) => (tokens as f64 / r).floor() as usize,
        }
    }

    pub fn ratio(self) -> Option<f64> {
        match self {
            Budget::Ratio(r) => Some(r),
            Budget::Cells(_) => None,
        }
    }
}

/// One point of the sweep: the eviction settings, the budget they run at (`None` for a
/// policy that does not evict: its cache holds the whole input), and the cache's K and V
/// storage types.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    pub eviction: EvictionArgs,
    pub budget: Option<Budget>,
    pub cache: (CacheType, CacheType),
}

impl Point {
    /// The settings for a document of `tokens` tokens: the budget resolved, or the whole
    /// document for the full cache.
    pub fn at(&self, tokens: usize) -> EvictionArgs {
        EvictionArgs {
            budget: self.budget.map_or(tokens, |b| b.cells(tokens)),
            ..self.eviction.clone()
        }
    }

    /// llama.cpp's flags for this point: `base` with the point's cache types.
    pub fn llama(&self, base: &LlamaArgs) -> LlamaArgs {
        LlamaArgs {
            cache_type_k: self.cache.0,
            cache_type_v: self.cache.1,
            ..base.clone()
        }
    }
}

/// Which lists hold more than one value: those knobs go into the labels.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Varies {
    window: bool,
    sinks: bool,
    granularity: bool,
    combiner: bool,
    slack: bool,
    recency: bool,
    cache: bool,
}

impl Sweep {
    /// The (K, V) cache types of the sweep: the two lists pair up in order, as llama.cpp users
    /// give `-ctk q8_0 -ctv q8_0`; a list of one pairs with every value of the other. Lists of
    /// other, different lengths are an error.
    pub fn cache_pairs(&self) -> Result<Vec<(CacheType, CacheType)>> {
        let (k, v) = (&self.cache_type_k, &self.cache_type_v);
        match (k.len(), v.len()) {
            (0, _) | (_, 0) => Err(Error::invalid("empty --cache-type-k or --cache-type-v list")),
            (1, _) => Ok(v.iter().map(|&v| (k[0], v)).collect()),
            (_, 1) => Ok(k.iter().map(|&k| (k, v[0])).collect()),
            (a, b) if a == b => Ok(k.iter().copied().zip(v.iter().copied()).collect()),
            (a, b) => Err(Error::invalid(format!(
                "--cache-type-k lists {a} types and --cache-type-v {b}: they pair up in order, so give as many of each (or one)"
            ))),
        }
    }

    /// The points at each of `budgets`, policy by policy; settings not swept (filters, key
    /// source, batch) come from `base`. A policy that does not evict appears once, without a
    /// budget; for a policy whose heads all score alike, granularity is per position, the
    /// combiner the first one and the recency prior off (they cannot change what it keeps);
    /// at head granularity the combiner is the first one (it combines nothing there).
    pub fn points(&self, budgets: &[Budget], base: &EvictionArgs) -> Vec<Point> {
        let pairs = self.cache_pairs().unwrap_or_default();
        let first_combiner = self.combiner.first().copied().unwrap_or(Combiner::MeanZ);
        let mut out: Vec<Point> = Vec::new();
        let mut push = |p: Point| {
            if !out.contains(&p) {
                out.push(p);
            }
        };
        for &cache in &pairs {
            for &policy in &self.policies {
                if !policy.evicts {
                    push(Point {
                        eviction: EvictionArgs {
                            policy,
                            window: self.window[0],
                            sinks: self.sinks[0],
                            granularity: Granularity::Position,
                            combiner: Combiner::MeanZ,
                            slack: 0,
                            recency: 0.0,
                            ..base.clone()
                        },
                        budget: None,
                        cache,
                    });
                    continue;
                }
                for &budget in budgets {
                    for &window in &self.window {
                        for &sinks in &self.sinks {
                            for &granularity in &self.granularity {
                                for &combiner in &self.combiner {
                                    for &slack in &self.slack {
                                        for &recency in &self.recency {
                                            let (granularity, combiner, recency) =
                                                if !policy.scores_vary_by_head {
                                                    (Granularity::Position, first_combiner, 0.0)
                                                } else if granularity == Granularity::Head {
                                                    (granularity, first_combiner, recency)
                                                } else {
                                                    (granularity, combiner, recency)
                                                };
                                            push(Point {
                                                eviction: EvictionArgs {
                                                    policy,
                                                    budget: budget.cells(0),
                                                    window,
                                                    sinks,
                                                    granularity,
                                                    combiner,
                                                    slack,
                                                    recency,
                                                    ..base.clone()
                                                },
                                                budget: Some(budget),
                                                cache,
                                            });
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        out
    }

    fn varies(&self) -> Varies {
        Varies {
            window: self.window.len() > 1,
            sinks: self.sinks.len() > 1,
            granularity: self.granularity.len() > 1,
            combiner: self.combiner.len() > 1,
            slack: self.slack.len() > 1,
            recency: self.recency.len() > 1,
            cache: self.cache_pairs().is_ok_and(|p| p.len() > 1),
        }
    }

    /// The point's name in tables and plots: the policy, its budget, and the knobs that the
    /// sweep varies and that matter for this policy.
    pub fn label(&self, p: &Point) -> String {
        let e = &p.eviction;
        let v = self.varies();
        let mut s = e.policy.name.to_string();
        if v.cache {
            s += &match p.cache {
                (k, v) if k == v => format!(" {k}"),
                (k, v) => format!(" k{k}/v{v}"),
            };
        }
        if let Some(Budget::Cells(b)) = p.budget {
            s += &format!(" b{b}");
        }
        if !e.policy.evicts {
            return s + " (full cache)";
        }
        let by_head = e.policy.scores_vary_by_head;
        if v.window {
            s += &format!(" w{}", e.window);
        }
        if v.sinks {
            s += &format!(" s{}", e.sinks);
        }
        if v.granularity && by_head {
            s += &format!(" {}", e.granularity);
        }
        if v.combiner && by_head && e.granularity == Granularity::Position {
            s += &format!(" {}", e.combiner);
        }
        if v.slack {
            s += &format!(" slack{}", e.slack);
        }
        if v.recency && by_head {
            s += &format!(" r{}", e.recency);
        }
        if e.policy.parts().is_some() && e.mix_weight != 1.0 {
            s += &format!(" mix{}", e.mix_weight);
        }
        if let Some(Budget::Ratio(r)) = p.budget {
            s += &format!(" {r}x");
        }
        s
    }
}

/// What a result row says about the KV cache: its storage types and the bytes llama.cpp
/// allocated for it (K and V, every layer: [`crate::engine::Stats::kv_bytes`]).
#[derive(Debug, Clone, Serialize)]
pub struct KvRecord {
    pub cache_type_k: String,
    pub cache_type_v: String,
    pub kv_bytes: usize,
}

impl KvRecord {
    pub fn new(cache: (CacheType, CacheType), kv_bytes: usize) -> KvRecord {
        KvRecord {
            cache_type_k: cache.0.to_string(),
            cache_type_v: cache.1.to_string(),
            kv_bytes,
        }
    }

    /// The bytes in MiB, as tables print them.
    pub fn mib(&self) -> f64 {
        self.kv_bytes as f64 / (1024.0 * 1024.0)
    }
}

/// One row of `qfilters eval ppl --json`.
#[derive(Debug, Clone, Serialize)]
pub struct PplRecord {
    #[serde(flatten)]
    pub eviction: EvictionArgs,
    #[serde(flatten)]
    pub kv: KvRecord,
    pub ppl: f64,
    pub ppl_second_half: f64,
    pub tok_s: f64,
    pub peak_cells: usize,
    pub tokens: usize,
    pub chunk: usize,
    pub evicted: u64,
    pub head_slices_moved: u64,
    pub model: String,
    pub text: String,
    pub plot_window: usize,
    /// Mean NLL of each `plot_window` tokens.
    pub nll_windows: Vec<f64>,
    /// With `--check-full`, for the full cache: the same text scored the plain way.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub full_context_ppl: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub full_context_ppl_second_half: Option<f64>,
    /// Whether the point is on the sweep's perplexity-per-byte Pareto front
    /// ([`crate::eval::frontier::pareto_front`]): no other point of the same run has at most
    /// its KV bytes and at most its perplexity, one of them strictly.
    pub pareto: bool,
}

/// One trial's answer, in a [`PasskeyRecord`].
#[derive(Debug, Clone, Serialize)]
pub struct PasskeyAnswer {
    /// The passkey; `null` for a needle.
    pub key: Option<u32>,
    /// The answer looked for (the key's digits, or the needle's phrase).
    pub expected: String,
    pub greedy: String,
    pub answer_nll: f64,
    /// Share of the key's (layer, KV head, token) slots still cached when the question was
    /// read; `null` for the full cache.
    pub key_kept: Option<f64>,
}

/// One row of `qfilters eval passkey|needle --json`: one (point, length, depth) cell.
#[derive(Debug, Clone, Serialize)]
pub struct PasskeyRecord {
    /// `passkey`, `needle`, or `needle-N` (N needles, one asked).
    pub task: String,
    /// Its budget is the one used at this length (`null` for the full cache).
    #[serde(flatten)]
    pub eviction: EvictionArgs,
    #[serde(flatten)]
    pub kv: KvRecord,
    pub ratio: Option<f64>,
    pub length: usize,
    pub depth: f64,
    pub accuracy: f64,
    pub answer_nll: f64,
    pub trials: usize,
    pub chunk: usize,
    pub peak_cells: usize,
    pub model: String,
    /// Mean over the trials of their `key_kept`; `null` for the full cache.
    pub key_kept: Option<f64>,
    /// The same per tracked layer (the book's layers, in order).
    pub key_kept_by_layer: Option<Vec<f64>>,
    /// The same per tracked layer and KV head: which heads kept the key.
    pub key_kept_by_head: Option<Vec<Vec<f64>>>,
    pub answers: Vec<PasskeyAnswer>,
    /// Whether the point, at this length, is on the run's accuracy-per-byte Pareto front
    /// (accuracy over the depths against KV bytes).
    pub pareto: bool,
}

/// Mean over trials of per-(layer, head) key survival ([`crate::eval::passkey::key_survival`]),
/// as `[layer][head]` and per layer (the mean of its heads): `None` when no trial has it (the
/// full cache).
pub fn mean_key_survival<'a>(
    trials: impl IntoIterator<Item = &'a Vec<Vec<f64>>>,
) -> Option<(Vec<Vec<f64>>, Vec<f64>)> {
    let mut sum: Vec<Vec<f64>> = Vec::new();
    let mut n = 0usize;
    for t in trials {
        if sum.is_empty() {
            sum = t.iter().map(|heads| vec![0.0; heads.len()]).collect();
        }
        for (s, v) in sum.iter_mut().zip(t) {
            for (s, v) in s.iter_mut().zip(v) {
                *s += v;
            }
        }
        n += 1;
    }
    if n == 0 {
        return None;
    }
    let by_head: Vec<Vec<f64>> = sum
        .iter()
        .map(|heads| heads.iter().map(|s| s / n as f64).collect())
        .collect();
    let by_layer = by_head
        .iter()
        .map(|heads| heads.iter().sum::<f64>() / heads.len().max(1) as f64)
        .collect();
    Some((by_head, by_layer))
}

/// Passkey accuracy and mean answer NLL of some trials: (hits / n, nll sum / n), 0 for none.
pub fn passkey_rates(hits: usize, nll_sum: f64, n: usize) -> (f64, f64) {
    (hits as f64 / n.max(1) as f64, nll_sum / n.max(1) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::REGISTRY;

    fn sweep() -> Sweep {
        Sweep {
            policies: REGISTRY.to_vec(),
            window: vec![32],
            sinks: vec![4],
            granularity: vec![Granularity::Head],
            combiner: vec![Combiner::MeanZ],
            slack: vec![0],
            recency: vec![128.0],
            cache_type_k: vec![CacheType::F16],
            cache_type_v: vec![CacheType::F16],
        }
    }

    fn labels(s: &Sweep, budgets: &[Budget]) -> Vec<String> {
        s.points(budgets, &EvictionArgs::default())
            .iter()
            .map(|p| s.label(p))
            .collect()
    }

    #[test]
    fn the_default_sweep_is_every_policy_at_every_budget_and_the_full_cache_once() {
        let s = sweep();
        let budgets = [Budget::Cells(256), Budget::Cells(512)];
        assert_eq!(
            labels(&s, &budgets),
            [
                "qfilters b256",
                "qfilters b512",
                "knorm b256",
                "knorm b512",
                "streaming b256",
                "streaming b512",
                "keydiff b256",
                "keydiff b512",
                "keydiff-live b256",
                "keydiff-live b512",
                "expected-attention b256",
                "expected-attention b512",
                "random b256",
                "random b512",
                "none (full cache)"
            ]
        );
        let points = s.points(&budgets, &EvictionArgs::default());
        let streaming = &points[4].eviction;
        // Heads that score alike: per position, no recency prior.
        assert_eq!(streaming.granularity, Granularity::Position);
        assert_eq!(streaming.recency, 0.0);
        assert_eq!(points[0].eviction.granularity, Granularity::Head);
        assert_eq!(points[0].eviction.recency, 128.0);
        let full = points.last().expect("the full cache");
        assert_eq!(full.budget, None);
        assert_eq!(full.at(1000).budget, 1000);
        assert_eq!(points[1].at(1000).budget, 512);
    }

    #[test]
    fn knobs_that_cannot_differ_are_not_swept_and_varied_ones_are_labelled() {
        let mut s = sweep();
        s.policies = vec![crate::policy::QFILTERS, REGISTRY[2]];
        s.granularity = vec![Granularity::Head, Granularity::Position];
        s.combiner = vec![Combiner::MeanZ, Combiner::MaxZ];
        s.window = vec![16, 32];
        assert_eq!(
            labels(&s, &[Budget::Cells(64)]),
            [
                // Head granularity: one combiner only.
                "qfilters b64 w16 head",
                "qfilters b64 w16 position mean-z",
                "qfilters b64 w16 position max-z",
                "qfilters b64 w32 head",
                "qfilters b64 w32 position mean-z",
                "qfilters b64 w32 position max-z",
                // streaming: neither granularity nor combiner.
                "streaming b64 w16",
                "streaming b64 w32",
            ]
        );
    }

    #[test]
    fn ratios_resolve_per_document_and_are_labelled() {
        let mut s = sweep();
        s.policies = vec![REGISTRY[1]];
        s.recency = vec![0.0, 64.0];
        let points = s.points(&[Budget::Ratio(4.0)], &EvictionArgs::default());
        assert_eq!(s.label(&points[1]), "knorm r64 4x");
        assert_eq!(points[0].at(1026).budget, 256);
        assert_eq!(points[0].budget.and_then(|b| b.ratio()), Some(4.0));
    }

    #[test]
    fn records_serialize_with_the_knobs_flattened() {
        let s = sweep();
        let points = s.points(&[Budget::Cells(256)], &EvictionArgs::default());
        let full = points.last().unwrap().at(100);
        let rec = PasskeyRecord {
            task: "passkey".into(),
            eviction: full,
            kv: KvRecord::new((CacheType::Q8_0, CacheType::F16), 1 << 20),
            ratio: None,
            length: 100,
            depth: 0.5,
            accuracy: 1.0,
            answer_nll: 0.25,
            trials: 1,
            chunk: 32,
            peak_cells: 100,
            model: "m".into(),
            key_kept: None,
            key_kept_by_layer: None,
            key_kept_by_head: None,
            answers: vec![PasskeyAnswer {
                key: Some(12345),
                expected: "12345".into(),
                greedy: "12345".into(),
                answer_nll: 0.25,
                key_kept: None,
            }],
            pareto: true,
        };
        let v = serde_json::to_value(&rec).unwrap();
        assert_eq!(v["policy"], "none");
        assert!(v["budget"].is_null(), "the full cache has no budget: {v}");
        assert_eq!(v["granularity"], "position");
        assert_eq!(v["answers"][0]["key"], 12345);
        assert_eq!(
            (&v["cache_type_k"], &v["cache_type_v"], &v["kv_bytes"]),
            (&"q8_0".into(), &"f16".into(), &(1 << 20).into())
        );
        assert_eq!(passkey_rates(3, 1.5, 4), (0.75, 0.375));
        assert_eq!(passkey_rates(0, 0.0, 0), (0.0, 0.0));
        assert!(
            v["key_kept"].is_null(),
            "the full cache evicts nothing: {v}"
        );
    }

    #[test]
    fn key_survival_is_averaged_head_by_head_over_trials() {
        // Two layers of two heads, two trials.
        let trials = [
            vec![vec![1.0, 0.0], vec![0.5, 0.5]],
            vec![vec![0.0, 0.0], vec![1.0, 0.0]],
        ];
        let (by_head, by_layer) = mean_key_survival(&trials).expect("trials");
        assert_eq!(by_head, vec![vec![0.5, 0.0], vec![0.75, 0.25]]);
        assert_eq!(by_layer, vec![0.25, 0.5]);
        assert_eq!(mean_key_survival(&[] as &[Vec<Vec<f64>>]), None);
    }

    #[test]
    fn cache_types_pair_up_in_order_and_label_the_points_when_they_vary() {
        let mut s = sweep();
        s.policies = vec![crate::policy::FULL_CACHE, REGISTRY[1]];
        let (f16, q8, q4) = (CacheType::F16, CacheType::Q8_0, CacheType::Q4_0);
        s.cache_type_k = vec![f16, q8, q4];
        s.cache_type_v = vec![f16, q8, q4];
        assert_eq!(s.cache_pairs().unwrap(), [(f16, f16), (q8, q8), (q4, q4)]);
        assert_eq!(
            labels(&s, &[Budget::Cells(64)]),
            [
                "none f16 (full cache)",
                "knorm f16 b64",
                "none q8_0 (full cache)",
                "knorm q8_0 b64",
                "none q4_0 (full cache)",
                "knorm q4_0 b64",
            ]
        );
        let points = s.points(&[Budget::Cells(64)], &EvictionArgs::default());
        let llama = points[3].llama(&LlamaArgs::default());
        assert_eq!((llama.cache_type_k, llama.cache_type_v), (q8, q8));
        // One value pairs with each of the other list.
        s.cache_type_v = vec![f16];
        assert_eq!(s.cache_pairs().unwrap(), [(f16, f16), (q8, f16), (q4, f16)]);
        assert_eq!(
            s.label(&s.points(&[], &EvictionArgs::default())[1]),
            "none kq8_0/vf16 (full cache)"
        );
        s.cache_type_v = vec![f16, q8];
        let e = s.cache_pairs().unwrap_err().to_string();
        assert!(e.contains("--cache-type-k lists 3"), "{e}");
    }
}
