//! Eviction defaults for one model (`qfilters calibrate --tune`): a short streaming-perplexity
//! sweep that chooses the policy and its knobs, the rule that picks from it ([`TUNE_TIE`]), and
//! the defaults as the filters carry them in their metadata ([`Tuned`]).
//!
//! The sweep, sized for a 2-core machine (SmolLM2, 4096 tokens: about 20 settings):
//! - the first candidate (qfilters: registry order) gets the full knob search: every recency
//!   with every window, then granularity at the best pair;
//! - every other candidate ([`policy::tune_candidates`]: the policies whose inputs exist, and
//!   the [`policy::TUNE_COMBINATIONS`]) and each reference ([`policy::TUNE_REFERENCES`]: StreamingLLM and
//!   K-norm) at no prior and at the prior found there, at the window and granularity found
//!   there ([`policy_grid`]). A prior is what each key scorer needs most (KeyDiff without one
//!   lost 40% of StreamingLLM's drop on SmolLM2 where it won 11% with one, docs/RESULTS.md),
//!   while window and granularity moved the objective by less than the tie margin around the
//!   best setting on every model measured;
//! - the policy: the best of each candidate, chosen by the same tie rule ([`choose_policy`]),
//!   never a reference; the evidence states whether the choice beats each reference.

use std::sync::Arc;

use gguf_tools::filters::{
    QFilters, META_DEFAULT_EVIDENCE, META_DEFAULT_GRANULARITY, META_DEFAULT_POLICY,
    META_DEFAULT_RECENCY, META_DEFAULT_WINDOW,
};
use sha2::{Digest, Sha256};

use crate::args::{EvictionArgs, JobLength, LlamaArgs, DEFAULT_SINKS};
use crate::engine::cache::{Combiner, EvictionConfig, Granularity};
use crate::engine::{Engine, KeySource};
use crate::error::{Error, Result};
use crate::eval::ppl::{perplexities, streaming_nll};
use crate::ffi::{Model, Token};
use crate::policy::{self, Available, PolicyInfo};

/// How much lower (objective units: ln PPL) a setting must score to replace one listed before
/// it. The same setting's objective moved by up to 0.0063 between two CPUs (SmolLM2 and
/// Qwen-0.5B sweeps, a 2-core Intel Xeon against a 2-core AMD EPYC, where ggml runs other
/// kernels), and SmolLM2's choice flipped between head and position granularity on such a
/// difference; closer than this is a tie, which keeps the earlier value, so the lists start
/// with the plainer settings (no prior, then the weakest; the shortest window; per-head scores
/// as scored). On 4096 tokens of tinyshakespeare the best settings of priors 32, 128 and 512
/// lay within 0.004 of each other on Qwen-0.5B and within 0.015 on Gemma-3-270M; the order
/// then decides, and it keeps what is closest to the paper's pure scores. Policies follow the
/// same rule, in the order of [`policy::tune_candidates`].
pub const TUNE_TIE: f64 = 0.01;

/// One setting of the tuning sweep: a policy and its knobs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Setting {
    pub policy: PolicyInfo,
    pub recency: f64,
    pub window: usize,
    pub granularity: Granularity,
}

impl Setting {
    pub fn label(&self) -> String {
        format!(
            "{} recency {} window {} {}",
            self.policy, self.recency, self.window, self.granularity
        )
    }
}

/// Why a policy is in the sweep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// May be chosen.
    Candidate,
    /// Measured for comparison, never chosen ([`policy::TUNE_REFERENCES`]).
    Reference,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Candidate => "candidate",
            Role::Reference => "reference",
        })
    }
}

/// What one setting measured: (budget, PPL all, PPL 2nd half) per budget, and the objective.
#[derive(Debug, Clone, PartialEq)]
pub struct Measured {
    pub setting: Setting,
    pub role: Role,
    pub per_budget: Vec<(usize, f64, f64)>,
    pub objective: f64,
}

/// The candidate a stage keeps: the first, replaced by a later one only when that one beats
/// the current choice by more than [`TUNE_TIE`]. Non-empty input; NaN never wins.
pub fn pick(objectives: &[f64]) -> usize {
    let mut best = 0;
    for (i, &o) in objectives.iter().enumerate().skip(1) {
        if o < objectives[best] - TUNE_TIE || (objectives[best].is_nan() && !o.is_nan()) {
            best = i;
        }
    }
    best
}

/// The policy a sweep chooses, as an index into `best` (each policy's best objective, in the
/// order measured): [`pick`] over the policies that are candidates with `available` inputs
/// ([`policy::tune_candidates`]), so a reference, or a policy whose inputs are missing, is
/// never chosen whatever it measured. `None` when no candidate was measured.
pub fn choose_policy(best: &[(PolicyInfo, f64)], available: &Available) -> Option<usize> {
    let candidates = policy::tune_candidates(available);
    let eligible: Vec<usize> = (0..best.len())
        .filter(|&i| candidates.contains(&best[i].0))
        .collect();
    if eligible.is_empty() {
        return None;
    }
    let objectives: Vec<f64> = eligible.iter().map(|&i| best[i].1).collect();
    Some(eligible[pick(&objectives)])
}

/// Every recency with every window, recency-major in the order given, so that on a tie the
/// plainer setting listed first (the weaker prior, the shorter window) stays.
pub fn grid(
    policy: PolicyInfo,
    recency: &[f64],
    window: &[usize],
    granularity: Granularity,
) -> Vec<Setting> {
    recency
        .iter()
        .flat_map(|&recency| {
            window.iter().map(move |&window| Setting {
                policy,
                recency,
                window,
                granularity,
            })
        })
        .collect()
}

/// The settings at which a policy other than the first candidate is measured, given the first
/// candidate's best `tuned`: no prior, then `tuned`'s prior (if not 0), at `tuned`'s window and
/// granularity; a policy whose heads all score alike (no prior applies, per-head granularity
/// keeps what per-position does) once, at no prior, by position, as `eval` runs it.
pub fn policy_grid(policy: PolicyInfo, tuned: &Setting) -> Vec<Setting> {
    let at = |recency, granularity| Setting {
        policy,
        recency,
        window: tuned.window,
        granularity,
    };
    if !policy.uses_recency() {
        return vec![at(0.0, Granularity::Position)];
    }
    let mut g = vec![at(0.0, tuned.granularity)];
    if tuned.recency != 0.0 {
        g.push(at(tuned.recency, tuned.granularity));
    }
    g
}

/// The lists a tuning sweep tries (each non-empty, listed from the plainest setting), and how
/// it runs.
#[derive(Debug, Clone)]
pub struct TuneConfig {
    /// KV budgets; the objective is averaged over them.
    pub budgets: Vec<usize>,
    /// Tokens per decode (and eviction round).
    pub chunk: usize,
    pub recency: Vec<f64>,
    pub window: Vec<usize>,
    pub granularity: Vec<Granularity>,
    pub threads: i32,
}

/// One policy's best setting in a sweep.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyBest {
    pub setting: Setting,
    pub role: Role,
    pub objective: f64,
}

/// The outcome of a tuning sweep.
#[derive(Debug, Clone)]
pub struct Tuning {
    /// The chosen policy at its best setting.
    pub best: Setting,
    pub best_objective: f64,
    /// Every policy's best setting: the candidates in the order of the tie rule, then the
    /// references.
    pub per_policy: Vec<PolicyBest>,
    /// Every setting measured, in the order measured.
    pub measured: Vec<Measured>,
    /// Tokens of the text the sweep ran on.
    pub tokens: usize,
}

/// The sweep (module docs), minimising the mean over budgets of (ln PPL all + ln PPL 2nd
/// half) / 2: both halves count, and the second half is where eviction has run longest. The
/// first candidate's knobs: a grid over recency × window (the two trade against each other:
/// a long window with no prior and a short one with a strong prior both favour recent tokens,
/// so tuning one at a fixed value of the other misses the better corner), then granularity at
/// the best pair. `on_measured` sees each setting as it is measured.
pub fn tune(
    model: &Arc<Model>,
    filters: &Arc<QFilters>,
    tokens: &[Token],
    cfg: &TuneConfig,
    mut on_measured: impl FnMut(&Measured),
) -> Result<Tuning> {
    if cfg.budgets.is_empty()
        || cfg.recency.is_empty()
        || cfg.window.is_empty()
        || cfg.granularity.is_empty()
    {
        return Err(Error::invalid(
            "a tuning sweep needs at least one value of each list",
        ));
    }
    if tokens.len() < 2 {
        return Err(Error::invalid("the tuning text has fewer than 2 tokens"));
    }
    let available = Available::of(Some(filters.as_ref()));
    let candidates = policy::tune_candidates(&available);
    let Some(&first) = candidates.first() else {
        return Err(Error::invalid("no policy to tune"));
    };
    let mut measured: Vec<Measured> = Vec::new();
    let mut measure = |s: Setting, role: Role, measured: &mut Vec<Measured>| -> Result<f64> {
        if let Some(m) = measured.iter().find(|m| m.setting == s) {
            return Ok(m.objective);
        }
        let mut per_budget = Vec::new();
        let mut objective = 0.0;
        for &budget in &cfg.budgets {
            let pa = EvictionArgs {
                policy: s.policy,
                budget,
                filters: None,
                window: s.window,
                sinks: DEFAULT_SINKS,
                granularity: s.granularity,
                combiner: Combiner::MeanZ,
                recency: s.recency,
                slack: 0,
                key_source: KeySource::Cache,
                n_batch: cfg.chunk,
                mix_weight: 1.0,
            };
            // Tuned on llama.cpp's default cache (f16, flash attention auto).
            let llama = LlamaArgs::default();
            let f = s.policy.needs_filters.then(|| Arc::clone(filters));
            let scorer = pa.scorer(f, llama.seed)?;
            let config = pa.engine_config(&llama, JobLength::Known(tokens.len()), cfg.threads)?;
            let mut engine = Engine::new(model, scorer, config)?;
            let out = streaming_nll(&mut engine, tokens)?;
            let (ppl, ppl2) = perplexities(&out.nll);
            objective += (ppl.ln() + ppl2.ln()) / 2.0 / cfg.budgets.len() as f64;
            per_budget.push((budget, ppl, ppl2));
        }
        let m = Measured {
            setting: s,
            role,
            per_budget,
            objective,
        };
        on_measured(&m);
        measured.push(m);
        Ok(objective)
    };
    // The first candidate's knobs, stage by stage; ties (within TUNE_TIE) keep the earlier
    // listed setting.
    let mut best = Setting {
        policy: first,
        recency: cfg.recency[0],
        window: cfg.window[0],
        granularity: cfg.granularity[0],
    };
    let mut best_objective = f64::INFINITY;
    for stage in 0..2 {
        let settings: Vec<Setting> = match stage {
            0 => grid(first, &cfg.recency, &cfg.window, best.granularity),
            _ => cfg
                .granularity
                .iter()
                .map(|&granularity| Setting {
                    granularity,
                    ..best
                })
                .collect(),
        };
        let mut objectives = Vec::with_capacity(settings.len());
        for &c in &settings {
            objectives.push(measure(c, Role::Candidate, &mut measured)?);
        }
        let i = pick(&objectives);
        (best, best_objective) = (settings[i], objectives[i]);
    }
    let tuned = best;
    let mut per_policy = vec![PolicyBest {
        setting: tuned,
        role: Role::Candidate,
        objective: best_objective,
    }];
    // Every other candidate, then the references, on their small grids.
    let others = candidates[1..].iter().map(|&p| (p, Role::Candidate)).chain(
        policy::TUNE_REFERENCES
            .iter()
            .map(|&p| (p, Role::Reference)),
    );
    for (p, role) in others {
        let settings = policy_grid(p, &tuned);
        let mut objectives = Vec::with_capacity(settings.len());
        for &s in &settings {
            objectives.push(measure(s, role, &mut measured)?);
        }
        let i = pick(&objectives);
        per_policy.push(PolicyBest {
            setting: settings[i],
            role,
            objective: objectives[i],
        });
    }
    let bests: Vec<(PolicyInfo, f64)> = per_policy
        .iter()
        .map(|b| (b.setting.policy, b.objective))
        .collect();
    let chosen = choose_policy(&bests, &available).unwrap_or(0);
    Ok(Tuning {
        best: per_policy[chosen].setting,
        best_objective: per_policy[chosen].objective,
        per_policy,
        measured,
        tokens: tokens.len(),
    })
}

impl Tuning {
    /// How the choice compares with each reference: its best, and the choice's objective minus
    /// the reference's; a negative difference means the choice beats it.
    pub fn against_references(&self) -> Vec<(&PolicyBest, f64)> {
        self.per_policy
            .iter()
            .filter(|b| b.role == Role::Reference)
            .map(|b| (b, self.best_objective - b.objective))
            .collect()
    }

    /// One sentence on the choice against the references, for the evidence and stderr.
    pub fn verdict(&self) -> String {
        let parts: Vec<String> = self
            .against_references()
            .iter()
            .map(|(r, d)| {
                let word = if *d < 0.0 { "beats" } else { "does not beat" };
                format!(
                    "{word} {} ({:.4}, difference {d:+.4})",
                    r.setting.policy, r.objective
                )
            })
            .collect();
        format!(
            "chosen: {} (objective {:.4}); {}",
            self.best.label(),
            self.best_objective,
            parts.join(", ")
        )
    }

    /// Writes the choice and its evidence into the filters' metadata: `name` and `text` are
    /// the tuning text's file name and contents (the evidence names its SHA-256).
    pub fn record(&self, filters: &mut QFilters, cfg: &TuneConfig, name: &str, text: &str) {
        let sha: String = Sha256::digest(text.as_bytes())
            .iter()
            .take(8)
            .map(|b| format!("{b:02x}"))
            .collect();
        let budgets: Vec<String> = cfg.budgets.iter().map(|b| b.to_string()).collect();
        let rows: Vec<String> = self
            .measured
            .iter()
            .map(|m| {
                let v: Vec<String> = m
                    .per_budget
                    .iter()
                    .map(|(b, a, h)| format!("b{b} {a:.2}/{h:.2}"))
                    .collect();
                format!("{}: {}", m.setting.label(), v.join(" "))
            })
            .collect();
        let names = |role: Role| {
            let n: Vec<String> = self
                .per_policy
                .iter()
                .filter(|b| b.role == role)
                .map(|b| format!("{} {:.4}", b.setting.policy, b.objective))
                .collect();
            n.join(", ")
        };
        let evidence = format!(
            "qfilters calibrate --tune {name} (sha256 {sha}…): first {} tokens, chunk {}, budgets {}, sinks {}; objective mean over budgets of (ln PPL all + ln PPL 2nd half)/2, a later setting or candidate replacing an earlier one only when lower by more than {TUNE_TIE}; {}: every recency with every window, then granularity; every other policy at recency 0 and that recency, at that window and granularity (by position where its heads score alike); PPL all/2nd half: {}; best objective of each candidate: {}; of each reference (never chosen): {}; {}",
            self.tokens,
            cfg.chunk,
            budgets.join(","),
            DEFAULT_SINKS,
            self.per_policy[0].setting.policy,
            rows.join("; "),
            names(Role::Candidate),
            names(Role::Reference),
            self.verdict()
        );
        for (k, v) in [
            (META_DEFAULT_POLICY, self.best.policy.to_string()),
            (META_DEFAULT_RECENCY, self.best.recency.to_string()),
            (META_DEFAULT_WINDOW, self.best.window.to_string()),
            (META_DEFAULT_GRANULARITY, self.best.granularity.to_string()),
            (META_DEFAULT_EVIDENCE, evidence),
        ] {
            filters.metadata.insert(k.to_string(), v);
        }
    }
}

/// Eviction defaults measured for one model (`qfilters calibrate --tune`), carried in the
/// filters' metadata (`defaults.*`; `qfilters.defaults.*` in a GGUF).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Tuned {
    /// The chosen policy (`defaults.policy`); `None` in files tuned before the sweep chose
    /// one: the built-in default stays.
    pub policy: Option<PolicyInfo>,
    pub recency: Option<f64>,
    pub window: Option<usize>,
    pub granularity: Option<Granularity>,
}

impl Tuned {
    /// The defaults of `f`; `origin` names where the filters came from (a file, or the GGUF
    /// that embeds them), for the error a bad value gets.
    pub fn from_filters(f: &QFilters, origin: &str) -> Result<Tuned> {
        let get = |k: &str| f.metadata.get(k).map(|v| v.trim().to_string());
        let bad = |k: &str, v: &str, why: &str| {
            Error::invalid(format!(
                "the tuned default {k} = {v:?} of {origin} {why}; re-run `qfilters calibrate --tune`, or give the flag"
            ))
        };
        let policy = match get(META_DEFAULT_POLICY) {
            Some(v) => {
                let p = policy::lookup(&v).map_err(|_| {
                    let known = policy::names(|p| p.evicts);
                    bad(
                        META_DEFAULT_POLICY,
                        &v,
                        &format!(
                            "is not a policy this build knows (known: {known}; two combine as A+B)"
                        ),
                    )
                })?;
                if !p.evicts {
                    return Err(bad(META_DEFAULT_POLICY, &v, "does not evict"));
                }
                Some(*p)
            }
            None => None,
        };
        let invalid = "is invalid";
        let recency = match get(META_DEFAULT_RECENCY) {
            Some(v) => Some(
                v.parse::<f64>()
                    .ok()
                    .filter(|r| r.is_finite() && *r >= 0.0)
                    .ok_or_else(|| bad(META_DEFAULT_RECENCY, &v, invalid))?,
            ),
            None => None,
        };
        let window = match get(META_DEFAULT_WINDOW) {
            Some(v) => Some(
                v.parse()
                    .map_err(|_| bad(META_DEFAULT_WINDOW, &v, invalid))?,
            ),
            None => None,
        };
        let granularity = match get(META_DEFAULT_GRANULARITY) {
            Some(v) => Some(
                v.parse()
                    .map_err(|_| bad(META_DEFAULT_GRANULARITY, &v, invalid))?,
            ),
            None => None,
        };
        Ok(Tuned {
            policy,
            recency,
            window,
            granularity,
        })
    }

    /// The tuned policy, unless the user typed `--policy` (`typed` says, given a clap id).
    pub fn policy_default(&self, typed: impl Fn(&str) -> bool) -> Option<PolicyInfo> {
        self.policy.filter(|_| !typed("policy"))
    }

    /// Sets each tuned value whose flag the user did not type (`typed` says, given a clap id
    /// such as "window"), through `set`; returns what was set, for the stderr line. `budget`:
    /// the smallest budget the command will evict to, with its sinks. A tuned window is used
    /// as it is wherever it fits (the setting the sweep measured); where the smallest budget
    /// cannot hold it with the sinks, it is shortened to half of that budget's non-sink cells
    /// (and the line says so) rather than failing a budget the built-in window fits.
    pub fn apply(
        &self,
        typed: impl Fn(&str) -> bool,
        budget: Option<(usize, usize)>,
        mut set_recency: impl FnMut(f64),
        mut set_window: impl FnMut(usize),
        mut set_granularity: impl FnMut(Granularity),
    ) -> Vec<String> {
        let mut used = Vec::new();
        if let Some(r) = self.recency.filter(|_| !typed("recency")) {
            set_recency(r);
            used.push(format!("recency {r}"));
        }
        if let Some(w) = self.window.filter(|_| !typed("window")) {
            match budget {
                Some((b, sinks)) if !EvictionConfig::window_fits(b, w, sinks) => {
                    let half = b.saturating_sub(sinks) / 2;
                    set_window(half);
                    used.push(format!(
                        "window {half} (tuned {w} does not fit budget {b}; half its cells)"
                    ));
                }
                _ => {
                    set_window(w);
                    used.push(format!("window {w}"));
                }
            }
        }
        if let Some(g) = self.granularity.filter(|_| !typed("granularity")) {
            set_granularity(g);
            used.push(format!("granularity {g}"));
        }
        used
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stage_keeps_the_earlier_setting_unless_a_later_one_is_clearly_better() {
        assert_eq!(pick(&[3.8303]), 0);
        // SmolLM2's recency stage on two CPUs: 128 ties with 32 (within 0.01) on both.
        assert_eq!(pick(&[3.8575, 3.8303, 3.8293, 3.8507]), 1);
        assert_eq!(pick(&[3.8541, 3.8333, 3.8283, 3.8566]), 1);
        // Qwen-0.5B: recency 512 wins by 0.027 over the plain setting.
        assert_eq!(pick(&[4.5472, 4.5412, 4.5401, 4.5200]), 3);
        // Compared with the current choice: a chain of small steps is no reason to move.
        assert_eq!(pick(&[1.0, 0.995, 0.991, 0.9905]), 0);
        assert_eq!(pick(&[f64::NAN, 2.0]), 1);
        assert_eq!(pick(&[2.0, f64::NAN]), 0);
    }

    #[test]
    fn the_first_stage_tries_every_recency_with_every_window() {
        let g = grid(
            policy::QFILTERS,
            &[0.0, 512.0],
            &[32, 128],
            Granularity::Head,
        );
        let pairs: Vec<(f64, usize)> = g.iter().map(|s| (s.recency, s.window)).collect();
        assert_eq!(pairs, [(0.0, 32), (0.0, 128), (512.0, 32), (512.0, 128)]);
        assert!(g
            .iter()
            .all(|s| s.granularity == Granularity::Head && s.policy == policy::QFILTERS));
    }

    fn named(name: &str) -> PolicyInfo {
        *policy::lookup(name).unwrap()
    }

    #[test]
    fn other_policies_get_no_prior_and_the_tuned_prior_at_the_tuned_window() {
        let tuned = Setting {
            policy: policy::QFILTERS,
            recency: 32.0,
            window: 64,
            granularity: Granularity::Head,
        };
        let g = policy_grid(named("keydiff"), &tuned);
        let r: Vec<f64> = g.iter().map(|s| s.recency).collect();
        assert_eq!(r, [0.0, 32.0]);
        assert!(g
            .iter()
            .all(|s| s.window == 64 && s.granularity == Granularity::Head));
        // No prior to try twice.
        let plain = Setting {
            recency: 0.0,
            ..tuned
        };
        assert_eq!(policy_grid(named("knorm"), &plain).len(), 1);
        // Heads that score alike: once, by position, as eval runs it.
        let s = policy_grid(named("streaming"), &tuned);
        assert_eq!(s.len(), 1);
        assert_eq!(
            (s[0].recency, s[0].granularity),
            (0.0, Granularity::Position)
        );
    }

    #[test]
    fn the_policy_is_chosen_among_candidates_by_the_tie_rule_never_a_reference() {
        let with = Available {
            filters: true,
            query_stats: false,
        };
        let best = |list: &[(&str, f64)]| -> Vec<(PolicyInfo, f64)> {
            list.iter().map(|&(n, o)| (named(n), o)).collect()
        };
        let chosen = |list: &[(&'static str, f64)], avail: &Available| -> Option<&'static str> {
            choose_policy(&best(list), avail).map(|i| list[i].0)
        };
        // A clearly better candidate wins.
        let sweep = [
            ("qfilters", 3.74),
            ("keydiff", 3.70),
            ("qfilters+keydiff", 3.72),
            ("streaming", 3.80),
            ("knorm", 3.75),
        ];
        assert_eq!(chosen(&sweep, &with), Some("keydiff"));
        // A reference is never chosen, however much lower its objective.
        let sweep = [
            ("qfilters", 3.74),
            ("keydiff", 3.76),
            ("streaming", 3.50),
            ("knorm", 3.40),
        ];
        assert_eq!(chosen(&sweep, &with), Some("qfilters"));
        // Within TUNE_TIE the earlier candidate stays; past it the later one wins.
        let tie = [("qfilters", 3.74), ("keydiff", 3.74 - TUNE_TIE * 0.9)];
        assert_eq!(chosen(&tie, &with), Some("qfilters"));
        let clear = [("qfilters", 3.74), ("keydiff", 3.74 - TUNE_TIE * 1.1)];
        assert_eq!(chosen(&clear, &with), Some("keydiff"));
        // A candidate whose inputs are missing is never chosen.
        let sweep = [
            ("qfilters", 3.50),
            ("keydiff", 3.74),
            ("qfilters+keydiff", 3.40),
        ];
        assert_eq!(chosen(&sweep, &Available::default()), Some("keydiff"));
        // Nothing to choose from.
        assert_eq!(chosen(&[("streaming", 3.0), ("knorm", 3.1)], &with), None);
        assert_eq!(chosen(&[("random", 1.0)], &with), None);
    }

    fn filters_with(meta: &[(&str, &str)]) -> QFilters {
        let mut f = QFilters::new(1, 1, 2, vec![1.0, 0.0]).unwrap();
        for (k, v) in meta {
            f.metadata.insert(k.to_string(), v.to_string());
        }
        f
    }

    #[test]
    fn a_stored_policy_is_read_back_and_a_bad_one_names_the_file() {
        let t = Tuned::from_filters(
            &filters_with(&[
                (META_DEFAULT_POLICY, "qfilters+keydiff"),
                (META_DEFAULT_WINDOW, "32"),
            ]),
            "f.safetensors",
        )
        .unwrap();
        assert_eq!(t.policy, Some(named("qfilters+keydiff")));
        assert_eq!(t.window, Some(32));
        assert_eq!(t.policy_default(|_| false), t.policy);
        assert_eq!(t.policy_default(|id| id == "policy"), None);
        // Files tuned before the sweep chose a policy keep the built-in one.
        let old = Tuned::from_filters(&filters_with(&[(META_DEFAULT_WINDOW, "32")]), "f").unwrap();
        assert_eq!(old.policy, None);
        assert_eq!(
            Tuned::from_filters(&filters_with(&[]), "f").unwrap(),
            Tuned::default()
        );
        for (bad, why) in [
            ("h2o", "is not a policy"),
            ("none", "does not evict"),
            ("keydiff+keydiff", "is not a policy"),
        ] {
            let e = Tuned::from_filters(
                &filters_with(&[(META_DEFAULT_POLICY, bad)]),
                "models/x/tuned.safetensors",
            )
            .unwrap_err()
            .to_string();
            assert!(
                e.contains("models/x/tuned.safetensors") && e.contains(bad) && e.contains(why),
                "{e}"
            );
        }
    }

    #[test]
    fn the_choice_goes_into_the_metadata_with_its_evidence() {
        let setting = |p: &str, recency| Setting {
            policy: named(p),
            recency,
            window: 32,
            granularity: Granularity::Head,
        };
        let row = |s: Setting, role, objective| Measured {
            setting: s,
            role,
            per_budget: vec![(256, objective, objective)],
            objective,
        };
        let best = |s: Setting, role, objective| PolicyBest {
            setting: s,
            role,
            objective,
        };
        let (q, k) = (setting("qfilters", 32.0), setting("keydiff", 32.0));
        let (st, kn) = (setting("streaming", 0.0), setting("knorm", 32.0));
        let tuning = Tuning {
            best: k,
            best_objective: 3.70,
            per_policy: vec![
                best(q, Role::Candidate, 3.74),
                best(k, Role::Candidate, 3.70),
                best(st, Role::Reference, 3.80),
                best(kn, Role::Reference, 3.69),
            ],
            measured: vec![
                row(q, Role::Candidate, 3.74),
                row(k, Role::Candidate, 3.70),
                row(st, Role::Reference, 3.80),
                row(kn, Role::Reference, 3.69),
            ],
            tokens: 4096,
        };
        let cfg = TuneConfig {
            budgets: vec![256],
            chunk: 32,
            recency: vec![0.0, 32.0],
            window: vec![32],
            granularity: vec![Granularity::Head],
            threads: 1,
        };
        let mut f = filters_with(&[]);
        tuning.record(&mut f, &cfg, "dev.txt", "some text");
        let m = |k: &str| f.metadata.get(k).cloned().unwrap_or_default();
        assert_eq!(m(META_DEFAULT_POLICY), "keydiff");
        assert_eq!(m(META_DEFAULT_RECENCY), "32");
        let e = m(META_DEFAULT_EVIDENCE);
        assert!(
            e.contains("chosen: keydiff recency 32 window 32 head"),
            "{e}"
        );
        assert!(
            e.contains("beats streaming") && e.contains("does not beat knorm"),
            "{e}"
        );
        let back = Tuned::from_filters(&f, "f").unwrap();
        assert_eq!(back.policy, Some(named("keydiff")));
        assert_eq!(back.granularity, Some(Granularity::Head));
    }
}
