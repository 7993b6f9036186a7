//! Eviction policies. A policy is a scorer: it gives each new key one score per (layer, KV
//! head), once, when the key enters the cache; higher means "keep". The shared mechanism in
//! `crate::engine::cache` applies the scores; it is tested once for all policies.
//!
//! Adding a policy: one file in this folder and one line in `REGISTRY`. Everything else (the
//! command lines' `--policy` values and their help, the sweep's default list, which knobs
//! matter for it) is read from its [`PolicyInfo`].
//!
//! Any two registered policies that evict combine as `A+B` (`mix.rs`): standardised scores,
//! the second weighted by `--mix-weight`. A combination is parsed from its name, never
//! registered.

mod expected_attention;
mod keydiff;
mod keydiff_live;
pub(crate) mod knorm;
mod mix;
mod none;
mod qfilters;
mod random;
mod recency;
mod streaming;

use std::sync::Arc;

use gguf_tools::filters::QFilters;

use crate::error::{Error, Result};
pub use crate::ffi::{KeyReduce, LiveReduce};
pub use expected_attention::{
    QueryStats, FUTURE_POSITIONS as EXPECTED_ATTENTION_FUTURE, RANK as EXPECTED_ATTENTION_RANK,
};

/// What the cache's device computed from the live keys of one tracked layer for a re-score
/// ([`Scorer::live_reduce`]); [`LiveStats::on_host`] computes the same from keys.
pub struct LiveStats<'a> {
    pub layer: usize,
    /// Each live slot's position, `[cells][n_head_kv]`.
    pub positions: &'a [i32],
    pub n_head_kv: usize,
    pub head_dim: usize,
    /// `LiveReduce::MeanDirection`: per KV head, the sum of the live unit keys,
    /// `[n_head_kv][head_dim]`.
    pub unit_key_sums: &'a [f32],
    /// `LiveReduce::MeanDirection`: each slot's cosine to its head's sum, `[cells][n_head_kv]`.
    pub cosines: &'a [f32],
}

impl LiveStats<'_> {
    /// What the device computes for `reduce` from `live`'s keys, on the host: the reference
    /// of the device graph (ffi `device_live_stats`) and the re-score's path where the cache's
    /// device has none. `sums` and `cosines` are the buffers a `LiveStats` then borrows.
    pub fn on_host(
        reduce: LiveReduce,
        live: &NewKeys<'_>,
        sums: &mut Vec<f32>,
        cosines: &mut Vec<f32>,
    ) {
        let LiveReduce::MeanDirection = reduce;
        let (h, d) = (live.n_head_kv, live.head_dim);
        let n = live.keys.len() / (h * d).max(1);
        let mut sum = vec![0f64; h * d];
        let mut inv_norm = Vec::with_capacity(n * h);
        for t in 0..n {
            for head in 0..h {
                let k = head_slice(live, t, head);
                let norm = k.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>().sqrt();
                // A zero key has no direction: it leaves the sum alone and has cosine 0.
                let inv = if norm > 0.0 && norm.is_finite() {
                    1.0 / norm
                } else {
                    0.0
                };
                inv_norm.push(inv);
                for (a, &x) in sum[head * d..][..d].iter_mut().zip(k) {
                    *a += f64::from(x) * inv;
                }
            }
        }
        sums.clear();
        sums.extend(sum.iter().map(|&x| x as f32));
        cosines.clear();
        cosines.resize(n * h, 0.0);
        for head in 0..h {
            let s = &sum[head * d..][..d];
            let norm = s.iter().map(|a| a * a).sum::<f64>().sqrt();
            if norm == 0.0 {
                continue;
            }
            for t in 0..n {
                let k = head_slice(live, t, head);
                let dot: f64 = k.iter().zip(s).map(|(&x, a)| f64::from(x) * a).sum();
                cosines[t * h + head] = (dot * inv_norm[t * h + head] / norm) as f32;
            }
        }
    }
}

/// What a scorer sees of the new keys of one layer after a decode.
pub struct NewKeys<'a> {
    pub layer: usize,
    /// Post-RoPE keys, `[n_tokens][n_head_kv][head_dim]`.
    pub keys: &'a [f32],
    /// Position of each token.
    pub positions: &'a [i32],
    /// The L2 norm of each new token's value per KV head, `[n_tokens][n_head_kv]`, when the
    /// scorer [needs them](Scorer::needs_value_norms); empty otherwise.
    pub value_norms: &'a [f32],
    pub n_head_kv: usize,
    pub head_dim: usize,
}

pub trait Scorer: Send {
    /// Writes one score per (token, KV head) into `out` (`[n_tokens][n_head_kv]`).
    fn score(&mut self, new: &NewKeys<'_>, out: &mut [f32]);

    /// The per-head reduction of a key this score is a function of, when there is one: the
    /// engine then computes it on the device that holds the KV cache (a small ggml graph) and
    /// calls `score_reduced`, instead of reading the keys back and calling `score`.
    fn key_reduce(&self) -> Option<KeyReduce> {
        None
    }

    /// The filters `KeyReduce::Dot` needs: `[head_dim]` for (layer, KV head).
    fn filter(&self, _layer: usize, _head: usize) -> Option<&[f32]> {
        None
    }

    /// The vectors `KeyReduce::Project` needs for `layer`: `[n_head_kv][per_head][head_dim]`,
    /// and the RoPE the keys are rotated back with before they meet them.
    fn projections(&self, _layer: usize) -> Option<(&[f32], crate::rope::RopeSpec)> {
        None
    }

    /// Scores from `stats` (`[n_tokens][n_head_kv][key_reduce().width()]`, the reduction
    /// `key_reduce` names, of the new keys of `layer`), into `out` (`[n_tokens][n_head_kv]`).
    /// Must equal `score` on the same keys, within the rounding of a different summation
    /// order.
    fn score_reduced(&mut self, _layer: usize, _positions: &[i32], stats: &[f32], out: &mut [f32]) {
        out.copy_from_slice(stats);
    }

    /// Whether the score depends on the key values (false: the hook need not read keys).
    fn needs_keys(&self) -> bool {
        true
    }

    /// Whether the score weighs keys by their values' norms (the engine then reads them into
    /// [`NewKeys::value_norms`]).
    fn needs_value_norms(&self) -> bool {
        false
    }

    /// Forgets what the scorer learnt from the tokens so far: the engine starts a new
    /// conversation or document ([`crate::engine::Engine::reset`]).
    fn reset(&mut self) {}

    /// Whether the scores of cached keys change with what else is cached (KeyDiff against the
    /// mean direction of the live keys): the engine then calls [`Scorer::rescore`] on every
    /// live cell at each eviction round, before planning it, and the entry scores only stand
    /// until the first round.
    fn rescores_live(&self) -> bool {
        false
    }

    /// Scores of the keys cached now for one tracked layer, into `out` (`[cells][n_head_kv]`).
    /// `live.keys` is `[cells][n_head_kv][head_dim]` and `live.positions` is
    /// `[cells][n_head_kv]`: under head granularity each head's slot of a cell may hold its own
    /// token. Called only when [`Scorer::rescores_live`] says so. By default: the
    /// [`Scorer::live_reduce`] of the keys, computed here, through [`Scorer::rescore_reduced`].
    fn rescore(&mut self, live: &NewKeys<'_>, out: &mut [f32]) {
        let Some(reduce) = self.live_reduce() else {
            return;
        };
        let (mut sums, mut cosines) = (Vec::new(), Vec::new());
        LiveStats::on_host(reduce, live, &mut sums, &mut cosines);
        let stats = LiveStats {
            layer: live.layer,
            positions: live.positions,
            n_head_kv: live.n_head_kv,
            head_dim: live.head_dim,
            unit_key_sums: &sums,
            cosines: &cosines,
        };
        self.rescore_reduced(&stats, out);
    }

    /// The reduction of the live keys a re-score is a function of, when there is one: the
    /// engine then computes it on the cache's device (one graph for every tracked layer) and
    /// calls [`Scorer::rescore_reduced`], instead of reading every live key back.
    fn live_reduce(&self) -> Option<LiveReduce> {
        None
    }

    /// The re-score from the reduction [`Scorer::live_reduce`] names, into `out`
    /// (`[cells][n_head_kv]`).
    fn rescore_reduced(&mut self, _live: &LiveStats<'_>, _out: &mut [f32]) {}
}

/// What a policy may need to be built.
pub struct PolicyInputs {
    pub filters: Option<Arc<QFilters>>,
    pub seed: u64,
    /// When > 0, key scores are standardised and `position / recency` is added
    /// (see `recency.rs`); policies that ignore keys are unchanged.
    pub recency: f64,
    /// For a combination `A+B`: the weight of B's standardised score (A's is 1).
    pub mix_weight: f64,
}

/// A policy as a value: its name, what it needs and what it does, and how to build its scorer.
/// It is what `--policy` parses to (`clap::ValueEnum` over [`REGISTRY`]).
#[derive(Clone, Copy)]
pub struct PolicyInfo {
    pub name: &'static str,
    /// One line for `--help`.
    pub help: &'static str,
    pub needs_filters: bool,
    /// Needs the query statistics `calibrate` stores with the filters (`expected-attention`).
    pub needs_query_stats: bool,
    /// False for the full-cache reference: nothing is ever evicted, the context holds the
    /// whole input (the engine gets a full cache, not a budget).
    pub evicts: bool,
    /// Whether the scores differ between the KV heads of a layer. When they do not, per-head
    /// granularity keeps the same tokens as per-position, the combiner has nothing to combine
    /// and the recency prior (which standardises per head) is not applied.
    pub scores_vary_by_head: bool,
    pub build: fn(&PolicyInputs) -> Result<Box<dyn Scorer>>,
}

/// Every policy, in the order `--help` lists them.
pub const REGISTRY: &[PolicyInfo] = &[
    qfilters::INFO,
    knorm::INFO,
    streaming::INFO,
    keydiff::INFO,
    keydiff_live::INFO,
    expected_attention::INFO,
    random::INFO,
    none::INFO,
];

/// Q-Filters, the policy `calibrate` tunes.
pub const QFILTERS: PolicyInfo = qfilters::INFO;

/// The default policy of `run`, `chat`, `bench` and `serve`.
pub const DEFAULT: PolicyInfo = QFILTERS;

/// What `run`, `chat` and `serve` use when the default policy needs filters and none are at
/// hand: the best policy that needs none. KeyDiff re-scored at each round beat KeyDiff scored on
/// entry in perplexity on SmolLM2 and Qwen and in passkey retrieval on Qwen (docs/RESULTS.md).
pub const WITHOUT_FILTERS: PolicyInfo = keydiff_live::INFO;

/// The full-cache reference, e.g. a benchmark's hook-off arm.
pub const FULL_CACHE: PolicyInfo = none::INFO;

/// What `calibrate --tune` always measures beside its candidates and never chooses: the
/// baselines a choice has to beat (StreamingLLM: the most recent tokens; K-norm: the plainest
/// key score), so its evidence shows whether it does.
pub const TUNE_REFERENCES: &[PolicyInfo] = &[streaming::INFO, knorm::INFO];

/// Registered policies that evict but are no one's default, so the tuning sweep skips them:
/// `random` is a control.
const NOT_TUNED: &[PolicyInfo] = &[random::INFO];

/// Combinations the tuning sweep adds to the registered policies (weight 1, the default
/// `--mix-weight`): each calibrated scorer with KeyDiff, the uncalibrated one. Expected
/// Attention with KeyDiff was the best perplexity of the 2,048-token probes on Qwen and SmolLM2
/// (docs/RESULTS.md notes), so the tune measures it where the statistics exist.
pub const TUNE_COMBINATIONS: &[&str] = &["qfilters+keydiff", "expected-attention+keydiff"];

/// The inputs a run has for building policies, beyond the model: what
/// [`PolicyInfo::inputs_available`] checks a policy's needs against.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Available {
    /// Q-Filters (a --filters file or the ones embedded in the GGUF).
    pub filters: bool,
    /// The query statistics of `expected-attention`, stored with those filters.
    pub query_stats: bool,
}

impl Available {
    /// What `filters` (the ones a run found, if any) provide.
    pub fn of(filters: Option<&QFilters>) -> Available {
        Available {
            filters: filters.is_some(),
            query_stats: filters.is_some_and(expected_attention::available),
        }
    }
}

/// The policies `calibrate --tune` may choose from, in the order its tie rule prefers them
/// (registry order, then [`TUNE_COMBINATIONS`]): every registered policy that evicts and whose
/// inputs `available` provides, except the references and `random`, so a policy added to
/// [`REGISTRY`] joins by its fields alone.
pub fn tune_candidates(available: &Available) -> Vec<PolicyInfo> {
    let combinations = TUNE_COMBINATIONS.iter().filter_map(|n| lookup(n).ok());
    REGISTRY
        .iter()
        .filter(|p| !TUNE_REFERENCES.contains(p) && !NOT_TUNED.contains(p))
        .chain(combinations)
        .filter(|p| p.evicts && p.inputs_available(available))
        .copied()
        .collect()
}

// What the command lines rely on, checked when the crate compiles.
const _: () = assert!(!WITHOUT_FILTERS.needs_filters && WITHOUT_FILTERS.evicts);
const _: () = assert!(!FULL_CACHE.evicts && FULL_CACHE.evicts != DEFAULT.evicts);

impl PolicyInfo {
    /// Whether the recency prior applies: scores computed from keys, per head.
    pub fn uses_recency(&self) -> bool {
        self.evicts && self.scores_vary_by_head
    }

    /// Whether `available` holds everything this policy needs to be built (a combination
    /// needs what either part needs).
    pub fn inputs_available(&self, available: &Available) -> bool {
        (!self.needs_filters || available.filters)
            && (!self.needs_query_stats || available.query_stats)
    }

    /// The two policies of a combination `A+B`; `None` for a registered policy.
    pub fn parts(&self) -> Option<(&'static PolicyInfo, &'static PolicyInfo)> {
        let (a, b) = self.name.split_once('+')?;
        Some((registered(a).ok()?, registered(b).ok()?))
    }
}

impl PartialEq for PolicyInfo {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
    }
}

impl Eq for PolicyInfo {}

impl std::fmt::Debug for PolicyInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name)
    }
}

impl std::fmt::Display for PolicyInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name)
    }
}

impl std::str::FromStr for PolicyInfo {
    type Err = Error;
    fn from_str(name: &str) -> Result<Self> {
        lookup(name).copied()
    }
}

impl clap::ValueEnum for PolicyInfo {
    fn value_variants<'a>() -> &'a [Self] {
        REGISTRY
    }

    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        Some(clap::builder::PossibleValue::new(self.name).help(self.help))
    }
}

impl serde::Serialize for PolicyInfo {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.name)
    }
}

/// The names in [`REGISTRY`] of the policies `keep` accepts, comma-separated (for messages).
pub fn names(keep: impl Fn(&PolicyInfo) -> bool) -> String {
    let names: Vec<&str> = REGISTRY
        .iter()
        .filter(|p| keep(p))
        .map(|p| p.name)
        .collect();
    names.join(", ")
}

/// The policy named `name`: a registered one, or a combination `A+B` of two registered
/// policies that evict.
pub fn lookup(name: &str) -> Result<&'static PolicyInfo> {
    if let Some((a, b)) = name.split_once('+') {
        return mix_info(registered(a)?, registered(b)?);
    }
    registered(name)
}

fn registered(name: &str) -> Result<&'static PolicyInfo> {
    REGISTRY.iter().find(|p| p.name == name).ok_or_else(|| {
        Error::invalid(format!(
            "unknown policy '{name}' (known: {}; two that evict combine as A+B)",
            names(|_| true)
        ))
    })
}

/// The combination of `a` and `b`, made once per pair for the life of the process (a policy
/// is a `'static` value, copied everywhere; there are at most `REGISTRY.len()²` of them).
fn mix_info(a: &'static PolicyInfo, b: &'static PolicyInfo) -> Result<&'static PolicyInfo> {
    if !a.evicts || !b.evicts || a == b {
        return Err(Error::invalid(format!(
            "policy '{a}+{b}': combine two different policies that evict"
        )));
    }
    static MIXES: std::sync::Mutex<Vec<&'static PolicyInfo>> = std::sync::Mutex::new(Vec::new());
    let mut mixes = MIXES.lock().unwrap_or_else(|e| e.into_inner());
    let name = format!("{a}+{b}");
    if let Some(m) = mixes.iter().find(|m| m.name == name) {
        return Ok(m);
    }
    let info: &'static PolicyInfo = Box::leak(Box::new(PolicyInfo {
        name: Box::leak(name.into_boxed_str()),
        help: "standardised scores of two policies, the second weighted by --mix-weight",
        needs_filters: a.needs_filters || b.needs_filters,
        needs_query_stats: a.needs_query_stats || b.needs_query_stats,
        evicts: true,
        scores_vary_by_head: a.scores_vary_by_head || b.scores_vary_by_head,
        build: |_| Err(Error::invalid("a combination is built from its parts")),
    }));
    mixes.push(info);
    Ok(info)
}

/// `--policy`'s parser: a registered name or a combination `A+B` (clap's value enums accept
/// the listed names only); `--help` lists the registered ones.
#[derive(Clone, Copy, Debug)]
pub struct PolicyParser;

impl clap::builder::TypedValueParser for PolicyParser {
    type Value = PolicyInfo;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> std::result::Result<PolicyInfo, clap::Error> {
        // A plain function parser, so that clap reports our message as the value's reason.
        fn parse(s: &str) -> Result<PolicyInfo> {
            s.parse()
        }
        clap::builder::TypedValueParser::parse_ref(&parse, cmd, arg, value)
    }

    fn possible_values(
        &self,
    ) -> Option<Box<dyn Iterator<Item = clap::builder::PossibleValue> + '_>> {
        Some(Box::new(
            REGISTRY
                .iter()
                .filter_map(clap::ValueEnum::to_possible_value),
        ))
    }
}

impl PolicyInfo {
    /// The scorer of this policy; wrapped in the recency prior when `inputs.recency > 0` and
    /// the policy [uses it](PolicyInfo::uses_recency).
    pub fn scorer(&self, inputs: &PolicyInputs) -> Result<Box<dyn Scorer>> {
        if self.needs_filters && inputs.filters.is_none() {
            return Err(Error::invalid(format!(
                "policy '{}' needs Q-Filters: pass --filters FILE.safetensors, embed them in the model with `gguf-tools embed`, or make them with `qfilters calibrate`",
                self.name
            )));
        }
        check_recency("--recency", inputs.recency)?;
        let scorer = match self.parts() {
            Some((a, b)) => {
                if !inputs.mix_weight.is_finite() {
                    return Err(Error::invalid("--mix-weight must be a finite number"));
                }
                let (a, b) = ((a.build)(inputs)?, (b.build)(inputs)?);
                // A combination standardises a stream of entry scores: a re-scored part
                // would silently be scored on entry only.
                if a.rescores_live() || b.rescores_live() {
                    return Err(Error::invalid(format!(
                        "policy '{}': a policy that re-scores the cache at each round cannot be combined",
                        self.name
                    )));
                }
                Box::new(mix::Mix::new(a, b, inputs.mix_weight))
            }
            None => (self.build)(inputs)?,
        };
        if inputs.recency > 0.0 && self.uses_recency() {
            return Ok(Box::new(recency::Recency::new(scorer, inputs.recency)));
        }
        Ok(scorer)
    }
}

/// The one rule for a recency prior's time constant, whichever flag gives it (`--recency`,
/// `eval`'s list, `calibrate --tune-recency`): finite and at least 0, 0 turning it off.
pub fn check_recency(flag: &str, recency: f64) -> Result<()> {
    if recency.is_finite() && recency >= 0.0 {
        return Ok(());
    }
    Err(Error::invalid(format!(
        "{flag} {recency}: give a finite value of at least 0 (0 turns it off)"
    )))
}

/// The scorer of the policy named `name` (see [`PolicyInfo::scorer`]).
pub fn build(name: &str, inputs: &PolicyInputs) -> Result<Box<dyn Scorer>> {
    lookup(name)?.scorer(inputs)
}

/// One key's slice of a head: `keys[(t * n_head_kv + h) * head_dim ..][..head_dim]`.
pub(crate) fn head_slice<'a>(new: &NewKeys<'a>, token: usize, head: usize) -> &'a [f32] {
    let start = (token * new.n_head_kv + head) * new.head_dim;
    &new.keys[start..start + new.head_dim]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every registered policy keeps the `Scorer` contract: one finite score per (token, KV
    /// head) on the key path and, where it has one, the same scores on the reduced path (the
    /// one the device takes), with and without the recency prior.
    #[test]
    fn every_registered_policy_scores_every_token_and_head() {
        let (layers, n_head_kv, head_dim, n_tokens) = (2, 3, 4, 5);
        let mut s = 7u64;
        let mut rnd = || (crate::math::splitmix64(&mut s) >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
        let filters: Vec<f32> = (0..layers * n_head_kv * head_dim).map(|_| rnd()).collect();
        let mut filters = QFilters::new(layers, n_head_kv, head_dim, filters).unwrap();
        expected_attention::add_test_stats(&mut filters, 2 * n_head_kv, 9);
        let value_norms: Vec<f32> = (0..n_tokens * n_head_kv).map(|_| rnd() + 1.0).collect();
        let keys: Vec<f32> = (0..n_tokens * n_head_kv * head_dim)
            .map(|_| rnd())
            .collect();
        let positions: Vec<i32> = (10..10 + n_tokens as i32).collect();
        // Every registered policy, and combinations as `--policy A+B` makes them.
        let mixes = ["qfilters+keydiff", "knorm+streaming"].map(|n| *lookup(n).unwrap());
        for recency in [0.0, 64.0] {
            for info in REGISTRY.iter().chain(&mixes) {
                let inputs = PolicyInputs {
                    filters: Some(Arc::new(filters.clone())),
                    seed: 1,
                    recency,
                    mix_weight: 1.0,
                };
                let mut scorer = info.scorer(&inputs).unwrap();
                let mut reduced_scorer = info.scorer(&inputs).unwrap();
                for layer in 0..layers {
                    let new = NewKeys {
                        layer,
                        keys: &keys,
                        positions: &positions,
                        value_norms: &value_norms,
                        n_head_kv,
                        head_dim,
                    };
                    let mut out = vec![f32::NAN; n_tokens * n_head_kv];
                    scorer.score(&new, &mut out);
                    assert!(
                        out.iter().all(|v| v.is_finite()),
                        "{info} (recency {recency}) layer {layer}: {out:?}"
                    );
                    if scorer.rescores_live() {
                        // The engine's re-score: the same keys as one live set, with one
                        // position per slot.
                        let slots: Vec<i32> = positions
                            .iter()
                            .flat_map(|&p| std::iter::repeat_n(p, n_head_kv))
                            .collect();
                        let live = NewKeys {
                            positions: &slots,
                            ..new
                        };
                        let mut again = vec![f32::NAN; n_tokens * n_head_kv];
                        scorer.rescore(&live, &mut again);
                        assert!(
                            again.iter().all(|v| v.is_finite()),
                            "{info} (recency {recency}) re-scored: {again:?}"
                        );
                        // What the device computes (ffi `device_live_stats`) gives the same
                        // re-score, through every wrapper.
                        if let Some(reduce) = scorer.live_reduce() {
                            let (mut sums, mut cosines) = (Vec::new(), Vec::new());
                            LiveStats::on_host(reduce, &live, &mut sums, &mut cosines);
                            let stats = LiveStats {
                                layer,
                                positions: &slots,
                                n_head_kv,
                                head_dim,
                                unit_key_sums: &sums,
                                cosines: &cosines,
                            };
                            let mut reduced = vec![f32::NAN; n_tokens * n_head_kv];
                            reduced_scorer.rescore_reduced(&stats, &mut reduced);
                            assert_eq!(reduced, again, "{info} (recency {recency})");
                        }
                    }
                    // What the sweep and the granularity flags rely on.
                    let heads_differ = out.chunks(n_head_kv).any(|c| c.iter().any(|&v| v != c[0]));
                    assert_eq!(
                        heads_differ, info.scores_vary_by_head,
                        "{info}: scores_vary_by_head says {}: {out:?}",
                        info.scores_vary_by_head
                    );
                    if let Some(reduce) = scorer.key_reduce() {
                        // What the device computes (ffi `device_key_stats`), on the host.
                        let mut stats: Vec<f32> = Vec::new();
                        for t in 0..n_tokens {
                            for h in 0..n_head_kv {
                                let k = head_slice(&new, t, h);
                                match reduce {
                                    KeyReduce::Dot => stats.push(crate::math::dot(
                                        k,
                                        scorer.filter(layer, h).expect("Dot needs a filter"),
                                    )),
                                    KeyReduce::SquaredNorm => stats.push(crate::math::dot(k, k)),
                                    KeyReduce::Project {
                                        per_head,
                                        value_norm,
                                    } => {
                                        let (vectors, rope) = scorer
                                            .projections(layer)
                                            .expect("Project needs vectors");
                                        let mut back = k.to_vec();
                                        rope.rotate(&mut back, head_dim, -i64::from(positions[t]));
                                        let mine = &vectors[h * per_head * head_dim..]
                                            [..per_head * head_dim];
                                        stats.extend(
                                            mine.chunks_exact(head_dim)
                                                .map(|u| crate::math::dot(u, &back)),
                                        );
                                        if value_norm {
                                            stats.push(value_norms[t * n_head_kv + h].powi(2));
                                        }
                                    }
                                }
                            }
                        }
                        assert_eq!(stats.len(), n_tokens * n_head_kv * reduce.width());
                        // A fresh scorer of the same policy, fed the same layers in the same
                        // order, so that state (the recency prior's running statistics) is
                        // the same on both paths.
                        let mut reduced = vec![f32::NAN; n_tokens * n_head_kv];
                        reduced_scorer.score_reduced(layer, &positions, &stats, &mut reduced);
                        let worst = out
                            .iter()
                            .zip(&reduced)
                            .map(|(a, b)| (a - b).abs() / a.abs().max(1.0))
                            .fold(0f32, f32::max);
                        assert!(
                            worst <= 1e-5,
                            "{info} (recency {recency}) layer {layer}: score_reduced differs from score by {worst}: {out:?} vs {reduced:?}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn tuning_chooses_among_the_policies_whose_inputs_exist_never_a_reference() {
        let with = tune_candidates(&Available {
            filters: true,
            query_stats: false,
        });
        let names: Vec<&str> = with.iter().map(|p| p.name).collect();
        assert_eq!(
            names,
            ["qfilters", "keydiff", "keydiff-live", "qfilters+keydiff"]
        );
        // Filters with the query statistics add expected-attention, by its registry line, and
        // its combination with KeyDiff.
        let stats = tune_candidates(&Available {
            filters: true,
            query_stats: true,
        });
        let names: Vec<&str> = stats.iter().map(|p| p.name).collect();
        assert_eq!(
            names,
            [
                "qfilters",
                "keydiff",
                "keydiff-live",
                "expected-attention",
                "qfilters+keydiff",
                "expected-attention+keydiff"
            ]
        );
        let without = tune_candidates(&Available::default());
        assert!(without.iter().all(|p| !p.needs_filters), "{without:?}");
        assert!(without.contains(&WITHOUT_FILTERS), "{without:?}");
        for avail in [
            Available::default(),
            Available {
                filters: true,
                query_stats: false,
            },
            Available {
                filters: true,
                query_stats: true,
            },
        ] {
            let c = tune_candidates(&avail);
            assert!(c.iter().all(|p| p.evicts && p.inputs_available(&avail)));
            assert!(c.iter().all(|p| !TUNE_REFERENCES.contains(p)), "{c:?}");
            assert!(!c.iter().any(|p| p.name == "random" || p.name == "none"));
        }
        // Every registered policy that evicts is a candidate, a reference or the control: one
        // added later is tuned without being listed anywhere.
        for p in REGISTRY.iter().filter(|p| p.evicts) {
            assert!(
                stats.contains(p) || TUNE_REFERENCES.contains(p) || NOT_TUNED.contains(p),
                "{p}"
            );
        }
        let mix = lookup("qfilters+keydiff").unwrap();
        assert!(!mix.inputs_available(&Available::default()));
        assert!(TUNE_REFERENCES.iter().all(|r| r.evicts && !r.needs_filters));
    }

    #[test]
    fn policies_parse_from_their_names_and_print_them() {
        for info in REGISTRY {
            let parsed: PolicyInfo = info.name.parse().unwrap();
            assert_eq!(parsed, *info);
            assert_eq!(parsed.to_string(), info.name);
            let via_clap = <PolicyInfo as clap::ValueEnum>::from_str(info.name, false).unwrap();
            assert_eq!(via_clap, *info);
        }
        let e = "nope".parse::<PolicyInfo>().unwrap_err().to_string();
        assert!(e.contains("qfilters") && e.contains("none"), "{e}");
    }

    #[test]
    fn a_policy_that_re_scores_the_cache_is_not_combined() {
        let inputs = PolicyInputs {
            filters: None,
            seed: 1,
            recency: 0.0,
            mix_weight: 1.0,
        };
        for name in ["keydiff-live+knorm", "knorm+keydiff-live"] {
            match build(name, &inputs) {
                Ok(_) => panic!("{name} was built"),
                Err(e) => assert!(e.to_string().contains("re-scores"), "{e}"),
            }
        }
        // The recency prior wraps it and keeps its device reduction.
        for recency in [0.0, 64.0] {
            let inputs = PolicyInputs {
                filters: None,
                seed: 1,
                recency,
                mix_weight: 1.0,
            };
            let s = build("keydiff-live", &inputs).unwrap();
            assert!(s.rescores_live(), "recency {recency}");
            assert_eq!(
                s.live_reduce(),
                Some(LiveReduce::MeanDirection),
                "recency {recency}"
            );
        }
    }

    #[test]
    fn two_evicting_policies_combine_by_name_and_nothing_else_does() {
        let mix: PolicyInfo = "qfilters+keydiff".parse().unwrap();
        assert_eq!(mix.to_string(), "qfilters+keydiff");
        assert_eq!(
            mix.parts().map(|(a, b)| (a.name, b.name)),
            Some(("qfilters", "keydiff"))
        );
        assert!(mix.needs_filters && mix.evicts && mix.scores_vary_by_head);
        // Made once: the same value each time it is named.
        assert!(std::ptr::eq(
            lookup("qfilters+keydiff").unwrap(),
            lookup("qfilters+keydiff").unwrap()
        ));
        let plain: PolicyInfo = "knorm+streaming".parse().unwrap();
        assert!(!plain.needs_filters);
        assert_eq!(REGISTRY.iter().find(|p| p.parts().is_some()), None);
        for bad in [
            "none+knorm",
            "keydiff+keydiff",
            "knorm+lru",
            "knorm+",
            "a+b+c",
        ] {
            assert!(bad.parse::<PolicyInfo>().is_err(), "{bad}");
        }
        let inputs = PolicyInputs {
            filters: None,
            seed: 1,
            recency: 0.0,
            mix_weight: f64::NAN,
        };
        assert!(plain.scorer(&inputs).is_err(), "a NaN weight is refused");
        assert!(
            mix.scorer(&PolicyInputs {
                mix_weight: 1.0,
                ..inputs
            })
            .is_err(),
            "needs filters"
        );
    }

    /// One head, dim 1, keys of growing norm: K-norm ranks the newest lowest, StreamingLLM
    /// highest; the weight moves the combination from the first to the second.
    #[test]
    fn the_weight_moves_a_combination_from_its_first_policy_to_its_second() {
        let keys: Vec<f32> = (1..=20).map(|i| i as f32).collect();
        let positions: Vec<i32> = (0..20).collect();
        let new = NewKeys {
            layer: 0,
            keys: &keys,
            positions: &positions,
            value_norms: &[],
            n_head_kv: 1,
            head_dim: 1,
        };
        let scores = |w: f64| {
            let inputs = PolicyInputs {
                filters: None,
                seed: 1,
                recency: 0.0,
                mix_weight: w,
            };
            let mut s = lookup("knorm+streaming").unwrap().scorer(&inputs).unwrap();
            let mut out = vec![0f32; 20];
            s.score(&new, &mut out);
            out
        };
        let (first, second) = (scores(0.0), scores(10.0));
        assert!(first[19] < first[10] && first[10] < first[1], "{first:?}");
        assert!(
            second[19] > second[10] && second[10] > second[1],
            "{second:?}"
        );
    }
}
