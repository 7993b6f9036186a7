//! `qfilters bench`: prefill and decode speed on a synthetic workload; `--compare` runs the hook
//! off and on alternately in one process and reports the ratios.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::Args;
use serde::Serialize;

use qfilters::bench::summary::Summary;
use qfilters::bench::{self, Comparison, RunMeasure};
use qfilters::engine::cache::Granularity;
use qfilters::engine::{Engine, EngineConfig, KeySource};
use qfilters::ffi::{CacheType, Model};
use qfilters::policy::{self, PolicyInfo, PolicyInputs};
use qfilters::{Error, Result};

use super::{write_json, EvictionArgs, EvictionCli, FoundFilters, JobLength, LlamaArgs, ModelArgs};

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
    /// llama.cpp's flags; --seed also seeds the synthetic prompt and stand-in filters.
    #[command(flatten)]
    pub llama: LlamaArgs,
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
        match self.eviction.resolve_filters(
            FoundFilters::load(self.eviction.filters.as_deref(), &self.model.model)?.as_ref(),
            model,
            false,
        )? {
            Some(f) => Ok(f),
            None => {
                eprintln!(
                    "qfilters: no Q-Filters for this model: using random unit filters (same cost)"
                );
                Ok(Arc::new(bench::random_filters(model, self.llama.seed)?))
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
        let job = JobLength::Known(self.prompt.saturating_add(self.gen).saturating_add(1));
        eviction.engine_with_filters(&self.model, &self.llama, model, job, filters)
    }

    /// The hook-off engine: full cache of `full_cells` cells, no callback at all.
    fn engine_off(&self, model: &Arc<Model>, full_cells: usize) -> Result<Engine> {
        let scorer = policy::FULL_CACHE.scorer(&PolicyInputs {
            filters: None,
            seed: self.llama.seed,
            recency: 0.0,
            mix_weight: 1.0,
        })?;
        Engine::new(
            model,
            scorer,
            EngineConfig {
                n_batch: self.eviction.n_batch,
                threads: self.model.threads(),
                // The hook-on engine forces flash attention for head granularity; match it.
                flash_attn: if self.eviction.granularity == Granularity::Head {
                    Some(true)
                } else {
                    self.llama.flash_attn.forced()
                },
                type_k: self.llama.cache_type_k,
                type_v: self.llama.cache_type_v,
                hook: false,
                ..EngineConfig::full(full_cells)
            },
        )
    }
}

fn line(label: &str, m: &RunMeasure) -> String {
    // The KV bytes come from the cache tensors the hook found: the hook-off arm has none.
    let kv = match m.stats.kv_bytes {
        0 => "not seen (hook off)".to_string(),
        b => format!("{:.1} MiB", b as f64 / (1024.0 * 1024.0)),
    };
    format!(
        "{label:>4}: prefill {:>9.1} tok/s | decode {:>8.2} tok/s | last {} steps {:>8.2} tok/s | peak cells {} | cells allocated {} | KV {kv}",
        m.prefill_tok_s(),
        m.decode_tok_s(),
        m.tail_tokens,
        m.tail_decode_tok_s,
        m.stats.peak_cells,
        m.stats.n_ctx
    )
}

pub fn run(args: BenchArgs) -> Result<()> {
    if args.prompt == 0 {
        return Err(Error::invalid("--prompt must be at least 1"));
    }
    args.eviction.check()?;
    args.llama.check(args.eviction.per_head())?;
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
    let prompt = bench::synthetic_prompt(&model, args.prompt, args.llama.seed)?;
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
    let mut setup = Setup {
        model: &args.model.model,
        gpu_layers: args.model.gpu_layers,
        policy: args.eviction.policy,
        key_source: args.eviction.key_source.to_string(),
        granularity: args.eviction.granularity.to_string(),
        prompt: prompt.len(),
        gen: args.gen,
        tail: args.tail.min(args.gen),
        budget,
        slack: args.eviction.slack,
        n_batch: args.eviction.n_batch,
        cache_type_k: args.llama.cache_type_k.to_string(),
        cache_type_v: args.llama.cache_type_v.to_string(),
        kv_bytes: 0,
    };
    if !args.compare {
        return measure_on(&args, &mut on, &prompt, &setup);
    }
    // Same context size on both arms when nothing is evicted, so the hook is all that differs;
    // with a budget below the input, the hook-off arm is the full cache the budget replaces.
    let full_cells = if budget >= input {
        on.context().n_ctx().saturating_sub(1).max(input)
    } else {
        input
    };
    let mut off = args.engine_off(&model, full_cells)?;
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
    setup.kv_bytes = on.stats().kv_bytes;
    let weights = bench::weight_bytes_per_step(&args.model.model)?;
    let summary = Summary::new(&cmp, budget < input, weights);
    for l in summary.lines(setup.tail, budget, input) {
        println!("{l}");
    }
    if let Some(path) = &args.json {
        write_json(path, &CompareRecord { setup, summary })?;
    }
    Ok(())
}

/// What a benchmark ran (the head of its JSON record).
#[derive(Serialize)]
struct Setup<'a> {
    model: &'a Path,
    gpu_layers: i32,
    policy: PolicyInfo,
    key_source: String,
    granularity: String,
    prompt: usize,
    gen: usize,
    /// Decode steps timed on their own at the end (at most `gen`).
    tail: usize,
    budget: usize,
    slack: usize,
    n_batch: usize,
    cache_type_k: String,
    cache_type_v: String,
    /// Bytes of the hook-on arm's K and V caches.
    kv_bytes: usize,
}

/// `bench --compare --json`.
#[derive(Serialize)]
struct CompareRecord<'a> {
    #[serde(flatten)]
    setup: Setup<'a>,
    #[serde(flatten)]
    summary: Summary,
}

/// `bench --json` without `--compare`: the hook-on runs.
#[derive(Serialize)]
struct RunsRecord<'a> {
    model: &'a Path,
    policy: PolicyInfo,
    budget: usize,
    prompt: usize,
    gen: usize,
    runs: Vec<RunMeasure>,
}

/// The hook-on engine alone, `--reps` times, with the median.
fn measure_on(args: &BenchArgs, on: &mut Engine, prompt: &[i32], setup: &Setup) -> Result<()> {
    let mut runs = Vec::new();
    for rep in 0..args.reps.max(1) {
        let m = bench::run_workload(on, prompt, args.gen, args.tail)?;
        println!("rep {rep} {}", line("on", &m));
        runs.push(m);
    }
    let med = |f: fn(&RunMeasure) -> f64| Comparison::median_of(&runs, f);
    println!(
        "median: prefill {:.1} tok/s | decode {:.2} tok/s | last {} steps {:.2} tok/s",
        med(|m| m.prefill_tok_s()),
        med(|m| m.decode_tok_s()),
        setup.tail,
        med(|m| m.tail_decode_tok_s)
    );
    if let Some(path) = &args.json {
        let record = RunsRecord {
            model: setup.model,
            policy: setup.policy,
            budget: setup.budget,
            prompt: setup.prompt,
            gen: setup.gen,
            runs,
        };
        write_json(path, &record)?;
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
        #[derive(Serialize)]
        struct KeysRecord<'a> {
            #[serde(flatten)]
            graph_vs_cache: &'a bench::KeyPathReport,
            device_score_batches: u64,
            device_vs_host: &'a bench::KeyPathReport,
        }
        let record = KeysRecord {
            graph_vs_cache: &r,
            device_score_batches: device_batches,
            device_vs_host: &h,
        };
        write_json(path, &record)?;
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
    let r = bench::check_head_moves(
        model,
        prompt,
        budget,
        16,
        args.model.threads(),
        CacheType::F16,
    )?;
    println!(
        "check-moves: {} slots checked, {} hold moved slices | {} head slices moved, {} rounds on the device | max |Δ| {:.6}",
        r.checked, r.moved, r.head_slices_moved, r.device_move_rounds, r.max_abs_diff
    );
    if let Some(path) = &args.json {
        write_json(path, &r)?;
    }
    if r.checked == 0 || r.moved == 0 || r.max_abs_diff > 1e-3 {
        return Err(Error::KvCache(format!(
            "head-slice moves do not match the never-evicting cache ({} checked, {} moved, max |Δ| {})",
            r.checked, r.moved, r.max_abs_diff
        )));
    }
    Ok(())
}
