//! `qfilters bench`: prefill and decode speed on a synthetic workload; `--compare` runs the hook
//! off and on alternately in one process and reports the ratios.

use std::path::PathBuf;
use std::sync::Arc;

use clap::Args;
use serde_json::json;

use qfilters::bench::{self, Comparison, RunMeasure};
use qfilters::cache::Granularity;
use qfilters::engine::{Engine, EngineConfig, KeySource};
use qfilters::ffi::Model;
use qfilters::policy::{self, PolicyInputs};
use qfilters::{Error, Result};

use super::{write_json, EvictionArgs, EvictionCli, ModelArgs};

#[derive(Args, Debug, Clone)]
// The benchmark's own defaults, shown by its --help: its published numbers were measured with
// them (a budget of the whole workload, so that the hook is all that differs; a wider window,
// whole positions and larger prompt batches than run/chat).
#[command(
    mut_arg("budget", |a| a.default_value("0").help(
        "KV cells kept with the hook on; 0: prompt + gen, so nothing is evicted and the comparison measures the hook alone at the same number of live cells"
    )),
    mut_arg("window", |a| a.default_value("64")),
    mut_arg("granularity", |a| a.default_value("position")),
    mut_arg("n_batch", |a| a.default_value("512")),
    mut_arg("filters", |a| a.help(
        "Q-Filters file; default: embedded in the GGUF, else random unit filters (same cost)"
    )),
)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub eviction: EvictionArgs,
    /// Prompt tokens (random token ids from the vocabulary, seeded).
    #[arg(long, default_value_t = 4096)]
    pub prompt: usize,
    /// Greedy decode steps after the prompt.
    #[arg(long, default_value_t = 256)]
    pub gen: usize,
    /// Run hook off and hook on alternately and report on/off ratios.
    #[arg(long)]
    pub compare: bool,
    /// Repetitions (each runs the whole workload on every arm).
    #[arg(long, default_value_t = 3)]
    pub reps: usize,
    /// Decode steps at the end of the stream timed on their own.
    #[arg(long, default_value_t = 64)]
    pub tail: usize,
    /// Seed of the synthetic prompt, the random policy and stand-in filters.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Write the results as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Compare the scores of the cache and graph key paths on this workload and exit.
    #[arg(long = "check-keys", hide = true)]
    pub check_keys: bool,
    /// Check per-head eviction's head-slice moves against a cache that never evicts, and exit.
    #[arg(long = "check-moves", hide = true)]
    pub check_moves: bool,
}

impl BenchArgs {
    /// The budget given, else (0) the whole workload.
    fn budget(&self, input: usize) -> usize {
        match self.eviction.budget {
            0 => input,
            b => b,
        }
    }

    /// Filters from --filters or the GGUF, else random unit filters: they cost the same.
    fn filters(&self, model: &Model) -> Result<Arc<gguf_tools::filters::QFilters>> {
        match self
            .eviction
            .resolve_filters(&self.model.model, model, false)?
        {
            Some(f) => Ok(f),
            None => {
                eprintln!(
                    "qfilters: no Q-Filters for this model: using random unit filters (same cost)"
                );
                Ok(Arc::new(bench::random_filters(model, self.seed)?))
            }
        }
    }

    /// The hook-on engine: the policy with eviction at `budget`.
    fn engine_on(
        &self,
        model: &Arc<Model>,
        budget: usize,
        key_source: KeySource,
    ) -> Result<Engine> {
        let eviction = EvictionArgs {
            budget,
            key_source,
            ..self.eviction.clone()
        };
        let filters = if eviction.policy.needs_filters {
            Some(self.filters(model)?)
        } else {
            None
        };
        // The workload's tokens cap the context, as in `run`.
        let job = self.prompt.saturating_add(self.gen).saturating_add(1);
        eviction.engine_with_filters(&self.model, model, job, filters, self.seed)
    }

    /// The hook-off engine: full cache of `capacity` cells, no callback at all.
    fn engine_off(&self, model: &Arc<Model>, capacity: usize) -> Result<Engine> {
        let scorer = policy::FULL_CACHE.scorer(&PolicyInputs {
            filters: None,
            seed: self.seed,
            recency: 0.0,
        })?;
        Engine::new(
            model,
            scorer,
            EngineConfig {
                eviction: None,
                capacity,
                n_batch: self.eviction.n_batch,
                threads: self.model.threads(),
                key_source: KeySource::Cache,
                // The hook-on engine forces flash attention for head granularity; match it.
                flash_attn: (self.eviction.granularity == Granularity::Head).then_some(true),
                hook: false,
            },
        )
    }
}

fn line(label: &str, m: &RunMeasure) -> String {
    format!(
        "{label:>4}: prefill {:>9.1} tok/s | decode {:>8.2} tok/s | last {} steps {:>8.2} tok/s | peak cells {} | cells allocated {}",
        m.prefill_tok_s,
        m.decode_tok_s,
        m.tail_tokens,
        m.tail_decode_tok_s,
        m.peak_cells,
        m.n_ctx
    )
}

pub fn run(args: BenchArgs) -> Result<()> {
    if args.prompt == 0 {
        return Err(Error::invalid("--prompt must be at least 1"));
    }
    args.eviction.check()?;
    if !args.eviction.policy.evicts {
        return Err(Error::invalid(format!(
            "bench measures an eviction policy against the hook-off full cache: pick --policy {}",
            policy::names(|p| p.evicts)
        )));
    }
    super::check_cells("--prompt", args.prompt)?;
    super::check_cells("--gen", args.gen)?;
    if let Some(out) = &args.json {
        let filters = args.eviction.input_paths();
        let mut inputs: Vec<&std::path::Path> = vec![&args.model.model];
        inputs.extend(filters.iter().map(PathBuf::as_path));
        super::check_outputs(&[out], &inputs, true)?;
    }
    let model = args.model.load()?;
    let prompt = bench::synthetic_prompt(&model, args.prompt, args.seed)?;
    let input = prompt.len() + args.gen;
    let budget = args.budget(input);
    eprintln!(
        "qfilters bench: {} | {} layers, {} KV heads, head dim {} | prompt {} tok, gen {}, budget {budget}, policy {}, key source {:?}, -ngl {}",
        args.model.model.display(),
        model.n_layer(),
        model.n_head_kv(),
        model.head_dim(),
        prompt.len(),
        args.gen,
        args.eviction.policy,
        args.eviction.key_source,
        args.model.gpu_layers
    );

    if args.check_keys {
        return check_keys(&args, &model, &prompt);
    }
    if args.check_moves {
        return check_moves(&args, &model, &prompt);
    }

    let mut on = args.engine_on(&model, budget, args.eviction.key_source)?;
    if !args.compare {
        let mut runs = Vec::new();
        for rep in 0..args.reps.max(1) {
            let m = bench::run_workload(&mut on, &prompt, args.gen, args.tail)?;
            println!("rep {rep} {}", line("on", &m));
            runs.push(m);
        }
        let med = |f: fn(&RunMeasure) -> f64| Comparison::median_of(&runs, f);
        println!(
            "median: prefill {:.1} tok/s | decode {:.2} tok/s | last {} steps {:.2} tok/s",
            med(|m| m.prefill_tok_s),
            med(|m| m.decode_tok_s),
            args.tail.min(args.gen),
            med(|m| m.tail_decode_tok_s)
        );
        if let Some(path) = &args.json {
            write_json(
                path,
                &json!({"model": args.model.model, "policy": args.eviction.policy, "budget": budget,
                        "prompt": prompt.len(), "gen": args.gen, "runs": runs}),
            )?;
        }
        return Ok(());
    }

    // Same context size on both arms when nothing is evicted, so the hook is all that differs;
    // with a budget below the input, the hook-off arm is the full cache the budget replaces.
    let capacity = if budget >= input {
        on.context().n_ctx().saturating_sub(1).max(input)
    } else {
        input
    };
    let mut off = args.engine_off(&model, capacity)?;
    let cmp = bench::compare(
        &mut off,
        &mut on,
        &prompt,
        args.gen,
        args.tail,
        args.reps,
        &mut |rep, a, b| {
            println!("rep {rep} {}", line("off", a));
            println!("rep {rep} {}", line("on", b));
        },
    )?;
    let prefill = cmp.ratios(|m| m.prefill_tok_s);
    let decode = cmp.ratios(|m| m.decode_tok_s);
    let tail = cmp.ratios(|m| m.tail_decode_tok_s);
    let med = bench::median;
    let mut off_last = cmp.a.last().cloned().unwrap_or_default();
    let on_last = cmp.b.last().cloned().unwrap_or_default();
    // Without the hook the cache tensors are never seen; same layers and types as the hook-on
    // context, so its KV bytes scale with the cells allocated.
    if off_last.kv_bytes == 0 && on_last.n_ctx > 0 {
        off_last.kv_bytes =
            (on_last.kv_bytes as f64 * off_last.n_ctx as f64 / on_last.n_ctx as f64) as usize;
    }
    let kv_ratio = if on_last.kv_bytes > 0 {
        off_last.kv_bytes as f64 / on_last.kv_bytes as f64
    } else {
        0.0
    };
    let evicting = budget < input;
    let kv_per_cell = if on_last.n_ctx > 0 {
        on_last.kv_bytes as f64 / on_last.n_ctx as f64
    } else {
        0.0
    };
    let weights = bench::weight_bytes_per_step(&args.model.model)?;
    let bound = bench::BandwidthBound::new(
        weights,
        kv_per_cell,
        off_last.live_cells,
        on_last.live_cells,
    );
    println!(
        "on/off speed ratio (median of {} reps): prefill {:.4} | decode {:.4} | last {} steps {:.4}",
        prefill.len(),
        med(&prefill),
        med(&decode),
        args.tail.min(args.gen),
        med(&tail)
    );
    if evicting {
        println!(
            "long context: budget {budget} vs full cache {input}: KV bytes {:.1} → {:.1} MiB (÷{:.2}), end-of-stream decode ×{:.2}",
            off_last.kv_bytes as f64 / 1048576.0,
            on_last.kv_bytes as f64 / 1048576.0,
            kv_ratio,
            med(&tail)
        );
        println!(
            "bandwidth bound: weights {:.1} MiB + live KV {:.1} → {:.1} MiB per decode step: ×{:.2}; end-of-stream decode reaches {:.2} of it",
            weights as f64 / 1048576.0,
            bound.kv_bytes_read_full as f64 / 1048576.0,
            bound.kv_bytes_read_budget as f64 / 1048576.0,
            bound.bound,
            bound.share(med(&tail))
        );
    } else {
        println!(
            "hook overhead at equal live cells: prefill {:+.2}% | decode {:+.2}% (negative = hook-on faster, noise)",
            (1.0 / med(&prefill).max(1e-12) - 1.0) * 100.0,
            (1.0 / med(&decode).max(1e-12) - 1.0) * 100.0
        );
    }
    if let Some(path) = &args.json {
        let col = |runs: &[RunMeasure], f: fn(&RunMeasure) -> f64| -> Vec<f64> {
            runs.iter().map(f).collect()
        };
        let value = json!({
            "model": args.model.model,
            "gpu_layers": args.model.gpu_layers,
            "policy": args.eviction.policy,
            "key_source": args.eviction.key_source.to_string(),
            "granularity": args.eviction.granularity.to_string(),
            "prompt": prompt.len(),
            "gen": args.gen,
            "tail": args.tail.min(args.gen),
            "budget": budget,
            "slack": args.eviction.slack,
            "n_batch": args.eviction.n_batch,
            "reps": prefill.len(),
            "evicting": evicting,
            "prefill_tok_s_off": Comparison::median_of(&cmp.a, |m| m.prefill_tok_s),
            "prefill_tok_s_on": Comparison::median_of(&cmp.b, |m| m.prefill_tok_s),
            "decode_tok_s_off": Comparison::median_of(&cmp.a, |m| m.decode_tok_s),
            "decode_tok_s_on": Comparison::median_of(&cmp.b, |m| m.decode_tok_s),
            "tail_decode_tok_s_off": Comparison::median_of(&cmp.a, |m| m.tail_decode_tok_s),
            "tail_decode_tok_s_on": Comparison::median_of(&cmp.b, |m| m.tail_decode_tok_s),
            "prefill_ratio": med(&prefill),
            "decode_ratio": med(&decode),
            "tail_decode_ratio": med(&tail),
            "prefill_overhead": 1.0 / med(&prefill).max(1e-12) - 1.0,
            "decode_overhead": 1.0 / med(&decode).max(1e-12) - 1.0,
            "kv_bytes_off": off_last.kv_bytes,
            "kv_bytes_on": on_last.kv_bytes,
            "kv_bytes_ratio": kv_ratio,
            "n_ctx_off": off_last.n_ctx,
            "n_ctx_on": on_last.n_ctx,
            "peak_cells_off": off_last.peak_cells,
            "peak_cells": on_last.peak_cells,
            "evicted_on": on_last.evicted,
            "live_cells_off": off_last.live_cells,
            "live_cells_on": on_last.live_cells,
            "weight_bytes_per_step": bound.weight_bytes,
            "kv_bytes_read_off": bound.kv_bytes_read_full,
            "kv_bytes_read_on": bound.kv_bytes_read_budget,
            "bandwidth_bound": bound.bound,
            "tail_decode_share_of_bound": bound.share(med(&tail)),
            "decode_share_of_bound": bound.share(med(&decode)),
        });
        let per_rep = json!({
                "prefill_ratio": prefill,
                "decode_ratio": decode,
                "tail_decode_ratio": tail,
                "prefill_tok_s_off": col(&cmp.a, |m| m.prefill_tok_s),
                "prefill_tok_s_on": col(&cmp.b, |m| m.prefill_tok_s),
                "decode_tok_s_off": col(&cmp.a, |m| m.decode_tok_s),
                "decode_tok_s_on": col(&cmp.b, |m| m.decode_tok_s),
                "tail_decode_tok_s_off": col(&cmp.a, |m| m.tail_decode_tok_s),
                "tail_decode_tok_s_on": col(&cmp.b, |m| m.tail_decode_tok_s),
        });
        let mut value = value;
        value["per_rep"] = per_rep;
        write_json(path, &value)?;
    }
    Ok(())
}

/// Scores of the cache key path against the graph key path on this workload (no eviction).
fn check_keys(args: &BenchArgs, model: &Arc<Model>, prompt: &[i32]) -> Result<()> {
    // The recency prior (if on) updates its statistics token by token, so the scores do not
    // depend on how each path batches its scoring and are compared as the user gets them.
    let input = prompt.len() + args.gen;
    let mut graph = args.engine_on(model, input, KeySource::Graph)?;
    let mut cache = args.engine_on(model, input, KeySource::Cache)?;
    let r = bench::compare_key_paths(&mut graph, &mut cache, prompt, args.gen)?;
    let device_batches = cache.stats().device_score_batches;
    println!(
        "check-keys: policy {} | {} slots compared | max |Δscore| {:.5} | max rel {:.5} | K-index input reused after llama_decode in {}/{} decodes | device scoring batches {}",
        args.eviction.policy, r.compared, r.max_abs_diff, r.max_rel_diff, r.cells_reused_after_decode, r.decodes, device_batches
    );
    // The device reductions against the host path on the same cache rows: equal but for the
    // summation order.
    drop(graph);
    let mut host = args.engine_on(model, input, KeySource::Host)?;
    let h = bench::compare_key_paths(&mut host, &mut cache, prompt, args.gen)?;
    println!(
        "check-keys: device vs host scoring: {} slots | max |Δscore| {:.6} | max rel {:.6}",
        h.compared, h.max_abs_diff, h.max_rel_diff
    );
    if let Some(path) = &args.json {
        let mut v = serde_json::to_value(&r).map_err(|e| Error::invalid(e.to_string()))?;
        v["device_score_batches"] = json!(device_batches);
        v["device_vs_host"] =
            serde_json::to_value(&h).map_err(|e| Error::invalid(e.to_string()))?;
        write_json(path, &v)?;
    }
    if r.compared == 0 || r.max_rel_diff > 0.02 {
        return Err(Error::KvCache(format!(
            "the cache key path disagrees with the graph key path (max rel {:.4}, {} slots)",
            r.max_rel_diff, r.compared
        )));
    }
    if h.compared == 0 || h.max_rel_diff > 1e-3 {
        return Err(Error::KvCache(format!(
            "device scoring disagrees with host scoring (max rel {:.5}, {} slots)",
            h.max_rel_diff, h.compared
        )));
    }
    Ok(())
}

/// Per-head eviction's head-slice moves against a cache that never evicts (no `--budget`:
/// a small one, so that moves happen).
fn check_moves(args: &BenchArgs, model: &Arc<Model>, prompt: &[i32]) -> Result<()> {
    let budget = match args.eviction.budget {
        0 => 48,
        b => b,
    }
    .min(prompt.len().saturating_sub(1));
    let r = bench::check_head_moves(model, prompt, budget, 16, args.model.threads())?;
    println!(
        "check-moves: {} slots checked, {} hold moved slices | {} head slices moved, {} rounds on the device | max |Δ| {:.6}",
        r.checked, r.moved, r.head_slices_moved, r.device_move_rounds, r.max_abs_diff
    );
    if let Some(path) = &args.json {
        write_json(
            path,
            &serde_json::to_value(&r).map_err(|e| Error::invalid(e.to_string()))?,
        )?;
    }
    if r.checked == 0 || r.moved == 0 || r.max_abs_diff > 1e-3 {
        return Err(Error::KvCache(format!(
            "head-slice moves do not match the never-evicting cache ({} checked, {} moved, max |Δ| {})",
            r.checked, r.moved, r.max_abs_diff
        )));
    }
    Ok(())
}
