//! Eviction defaults for one model (`qfilters calibrate --tune`): a short streaming-perplexity
//! sweep of policy qfilters, the rule that picks a setting from it ([`TUNE_TIE`]), and the
//! defaults as the filters carry them in their metadata ([`Tuned`]).

use std::sync::Arc;

use gguf_tools::filters::{
    QFilters, META_DEFAULT_EVIDENCE, META_DEFAULT_GRANULARITY, META_DEFAULT_RECENCY,
    META_DEFAULT_WINDOW,
};
use sha2::{Digest, Sha256};

use crate::args::{EvictionArgs, JobLength, LlamaArgs, DEFAULT_SINKS};
use crate::engine::cache::{Combiner, EvictionConfig, Granularity};
use crate::engine::{Engine, KeySource};
use crate::error::{Error, Result};
use crate::eval::ppl::{perplexities, streaming_nll};
use crate::ffi::{Model, Token};
use crate::policy;

/// How much lower (objective units: ln PPL) a setting must score to replace one listed before
/// it. The same setting's objective moved by up to 0.0063 between two CPUs (SmolLM2 and
/// Qwen-0.5B sweeps, a 2-core Intel Xeon against a 2-core AMD EPYC, where ggml runs other
/// kernels), and SmolLM2's choice flipped between head and position granularity on such a
/// difference; closer than this is a tie, which keeps the earlier value, so the lists start
/// with the plainer settings (no prior, then the weakest; the shortest window; per-head scores
/// as scored). On 4096 tokens of tinyshakespeare the best settings of priors 32, 128 and 512
/// lay within 0.004 of each other on Qwen-0.5B and within 0.015 on Gemma-3-270M; the order
/// then decides, and it keeps what is closest to the paper's pure scores.
pub const TUNE_TIE: f64 = 0.01;

/// One setting of the tuning sweep.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Setting {
    pub recency: f64,
    pub window: usize,
    pub granularity: Granularity,
}

impl Setting {
    pub fn label(&self) -> String {
        format!(
            "recency {} window {} {}",
            self.recency, self.window, self.granularity
        )
    }
}

/// What one setting measured: (budget, PPL all, PPL 2nd half) per budget, and the objective.
#[derive(Debug, Clone, PartialEq)]
pub struct Measured {
    pub setting: Setting,
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

/// Every recency with every window, recency-major in the order given, so that on a tie the
/// plainer setting listed first (the weaker prior, the shorter window) stays.
pub fn grid(recency: &[f64], window: &[usize], granularity: Granularity) -> Vec<Setting> {
    recency
        .iter()
        .flat_map(|&recency| {
            window.iter().map(move |&window| Setting {
                recency,
                window,
                granularity,
            })
        })
        .collect()
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

/// The outcome of a tuning sweep.
#[derive(Debug, Clone)]
pub struct Tuning {
    pub best: Setting,
    pub best_objective: f64,
    /// Every setting measured, in the order measured.
    pub measured: Vec<Measured>,
    /// Tokens of the text the sweep ran on.
    pub tokens: usize,
}

/// A grid over recency × window (the two trade against each other: a long window with no
/// prior and a short one with a strong prior both favour recent tokens, so tuning one at a
/// fixed value of the other misses the better corner), then granularity at the best pair,
/// minimising the mean over budgets of (ln PPL all + ln PPL 2nd half) / 2: both halves count,
/// and the second half is where eviction has run longest. `on_measured` sees each setting as
/// it is measured.
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
    let mut measured: Vec<Measured> = Vec::new();
    let mut measure = |s: Setting, measured: &mut Vec<Measured>| -> Result<f64> {
        if let Some(m) = measured.iter().find(|m| m.setting == s) {
            return Ok(m.objective);
        }
        let mut per_budget = Vec::new();
        let mut objective = 0.0;
        for &budget in &cfg.budgets {
            let pa = EvictionArgs {
                policy: policy::QFILTERS,
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
            let scorer = pa.scorer(Some(Arc::clone(filters)), llama.seed)?;
            let config = pa.engine_config(&llama, JobLength::Known(tokens.len()), cfg.threads)?;
            let mut engine = Engine::new(model, scorer, config)?;
            let out = streaming_nll(&mut engine, tokens)?;
            let (ppl, ppl2) = perplexities(&out.nll);
            objective += (ppl.ln() + ppl2.ln()) / 2.0 / cfg.budgets.len() as f64;
            per_budget.push((budget, ppl, ppl2));
        }
        let m = Measured {
            setting: s,
            per_budget,
            objective,
        };
        on_measured(&m);
        measured.push(m);
        Ok(objective)
    };
    let mut best = Setting {
        recency: cfg.recency[0],
        window: cfg.window[0],
        granularity: cfg.granularity[0],
    };
    let mut best_objective = f64::INFINITY;
    // Stage by stage; ties (within TUNE_TIE) keep the earlier listed setting.
    for stage in 0..2 {
        let candidates: Vec<Setting> = match stage {
            0 => grid(&cfg.recency, &cfg.window, best.granularity),
            _ => cfg
                .granularity
                .iter()
                .map(|&granularity| Setting {
                    granularity,
                    ..best
                })
                .collect(),
        };
        let mut objectives = Vec::with_capacity(candidates.len());
        for &c in &candidates {
            objectives.push(measure(c, &mut measured)?);
        }
        let i = pick(&objectives);
        (best, best_objective) = (candidates[i], objectives[i]);
    }
    Ok(Tuning {
        best,
        best_objective,
        measured,
        tokens: tokens.len(),
    })
}

impl Tuning {
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
        let evidence = format!(
            "qfilters calibrate --tune {name} (sha256 {sha}…): first {} tokens, chunk {}, budgets {}, policy qfilters, sinks {}; objective mean over budgets of (ln PPL all + ln PPL 2nd half)/2, a later setting replacing an earlier one only when lower by more than {TUNE_TIE}; PPL all/2nd half: {}; chosen: {}",
            self.tokens,
            cfg.chunk,
            budgets.join(","),
            DEFAULT_SINKS,
            rows.join("; "),
            self.best.label()
        );
        for (k, v) in [
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
    pub recency: Option<f64>,
    pub window: Option<usize>,
    pub granularity: Option<Granularity>,
}

impl Tuned {
    pub fn from_filters(f: &QFilters) -> Result<Tuned> {
        let get = |k: &str| f.metadata.get(k).map(|v| v.trim().to_string());
        let bad = |k: &str, v: &str| {
            Error::invalid(format!(
                "the filters' tuned default {k} = {v:?} is invalid; re-run `qfilters calibrate --tune`"
            ))
        };
        let recency = match get(META_DEFAULT_RECENCY) {
            Some(v) => Some(
                v.parse::<f64>()
                    .ok()
                    .filter(|r| r.is_finite() && *r >= 0.0)
                    .ok_or_else(|| bad(META_DEFAULT_RECENCY, &v))?,
            ),
            None => None,
        };
        let window = match get(META_DEFAULT_WINDOW) {
            Some(v) => Some(v.parse().map_err(|_| bad(META_DEFAULT_WINDOW, &v))?),
            None => None,
        };
        let granularity = match get(META_DEFAULT_GRANULARITY) {
            Some(v) => Some(v.parse().map_err(|_| bad(META_DEFAULT_GRANULARITY, &v))?),
            None => None,
        };
        Ok(Tuned {
            recency,
            window,
            granularity,
        })
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
        let g = grid(&[0.0, 512.0], &[32, 128], Granularity::Head);
        let pairs: Vec<(f64, usize)> = g.iter().map(|s| (s.recency, s.window)).collect();
        assert_eq!(pairs, [(0.0, 32), (0.0, 128), (512.0, 32), (512.0, 128)]);
        assert!(g.iter().all(|s| s.granularity == Granularity::Head));
    }
}
