//! `qfilters run`: one prompt, one completion, KV cache within the budget.

use std::io::Write;
use std::path::PathBuf;

use clap::Args;
use serde_json::json;

use qfilters::conversation::generate::{generate, Limits};
use qfilters::ffi::Sampler;
use qfilters::{Error, Result};

use super::{
    check_outputs, read_text, write_json, EvictionArgs, EvictionCli, FoundFilters, Given,
    LlamaArgs, ModelArgs, Progress, SamplingArgs,
};

#[derive(Args, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub eviction: EvictionArgs,
    #[command(flatten)]
    pub llama: LlamaArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Prompt text.
    #[arg(short = 'p', long, conflicts_with = "file")]
    pub prompt: Option<String>,
    /// Read the prompt from a file.
    #[arg(short = 'f', long)]
    pub file: Option<PathBuf>,
    /// Tokens to generate.
    #[arg(short = 'n', long = "n-predict", default_value_t = 64)]
    pub n_predict: usize,
    /// Parse special-token text in the prompt (`<|im_start|>`...) as the special tokens, as a
    /// chat template's output needs.
    #[arg(long)]
    pub special: bool,
    /// Write the run's statistics as JSON (`-`: standard output, after the completion).
    #[arg(long = "json-stats")]
    pub json_stats: Option<PathBuf>,
}

pub fn run(mut args: RunArgs, given: &Given) -> Result<()> {
    args.sampling.check()?;
    args.eviction.check()?;
    args.llama.check(args.eviction.per_head())?;
    super::check_cells("--n-predict", args.n_predict)?;
    // The stats file is checked now, not after the generation it would report.
    if let Some(out) = &args.json_stats {
        let filters = args.eviction.input_paths();
        let mut inputs: Vec<&std::path::Path> = vec![&args.model.model];
        inputs.extend(filters.iter().map(|p| p.as_path()));
        inputs.extend(args.file.as_deref());
        check_outputs(&[out], &inputs, true)?;
    }
    let text = match (&args.prompt, &args.file) {
        (Some(p), _) => p.clone(),
        (None, Some(f)) => read_text(f)?,
        (None, None) => return Err(Error::invalid("give a prompt with -p TEXT or -f FILE")),
    };
    let found = FoundFilters::load(args.eviction.filters.as_deref(), &args.model.model)?;
    args.eviction.apply_tuned(found.as_ref(), given)?;
    let model = args.model.load()?;
    let tokens = model.tokenize(&text, true, args.special)?;
    if tokens.is_empty() {
        return Err(Error::invalid("the prompt is empty"));
    }
    let filters = args
        .eviction
        .resolve_filters(found.as_ref(), &model, false)?;
    super::fall_back_without_filters(
        &mut args.eviction,
        filters.is_some(),
        &args.model.model,
        given,
    );
    let mut engine = args.eviction.engine_with_filters(
        &args.model,
        &args.llama,
        &model,
        qfilters::args::JobLength::Known(tokens.len() + args.n_predict),
        filters,
    )?;
    let mut sampler = Sampler::new(&model, &args.sampling.params(args.llama.seed)?)?;
    let progress = Progress::new(tokens.len(), "prompt");
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    // A closed stdout (`| head`) stops the generation: nobody reads the rest.
    let mut closed: Option<std::io::Error> = None;
    let gen = generate(
        &mut engine,
        &mut sampler,
        &tokens,
        Limits::tokens(args.n_predict),
        &mut |done, _| {
            progress.set(done);
            true
        },
        &mut |s| {
            let piece = s.piece;
            progress.finish();
            if let Err(e) = out.write_all(piece.as_bytes()).and_then(|()| out.flush()) {
                closed = Some(e);
                return false;
            }
            true
        },
    )?;
    progress.finish();
    // A one-shot run has no next turn to decode the last token in, but its report counts every
    // printed token as a cache position (evicted + live = prompt + generated), so it goes in.
    if let Some(last) = gen.undecoded {
        engine.step(last)?;
    }
    let generated = gen.tokens;
    if let Some(e) = closed {
        return Err(Error::io("cannot write the completion to stdout", e));
    }
    out.write_all(gen.tail.as_bytes())
        .and_then(|()| writeln!(out))
        .and_then(|()| out.flush())
        .map_err(|e| Error::io("cannot write the completion to stdout", e))?;
    drop(out);
    let s = engine.stats();
    let budget = engine.budget();
    eprintln!(
        "qfilters: policy {} | prompt {} tok | generated {} | peak cells {} (budget {}) | evicted {} | KV {:.1} MiB (K {}, V {}) | prefill {:.1} tok/s | decode {:.1} tok/s",
        args.eviction.policy,
        s.prompt_tokens,
        generated.len(),
        s.peak_cells,
        budget.map(|b| b.to_string()).unwrap_or_else(|| "none".into()),
        s.evicted,
        s.kv_bytes as f64 / (1024.0 * 1024.0),
        args.llama.cache_type_k,
        args.llama.cache_type_v,
        s.prefill_tok_s(),
        s.decode_tok_s()
    );
    if let Some(path) = &args.json_stats {
        // The engine's counters (with their rates) as every report has them, then the eviction
        // settings as every result record has them (EvictionArgs serialises them), then the
        // run's own. Every printed token was decoded, so `generated_tokens` counts them all.
        let mut value = serde_json::to_value(s).map_err(|e| Error::invalid(e.to_string()))?;
        if let Some(obj) = value.as_object_mut() {
            let eviction =
                serde_json::to_value(&args.eviction).map_err(|e| Error::invalid(e.to_string()))?;
            if let serde_json::Value::Object(settings) = eviction {
                obj.extend(settings);
            }
            let run = json!({
                "live_cells": engine.live_cells(),
                // The budget the engine evicts to (null: it does not evict).
                "budget": budget,
                "n_batch": args.eviction.n_batch,
                "threads": args.model.threads(),
                "cpu_backend": qfilters::ffi::cpu_backend(),
                "cache_type_k": args.llama.cache_type_k.to_string(),
                "cache_type_v": args.llama.cache_type_v.to_string(),
                "flash_attn": args.llama.flash_attn.to_string(),
                "seed": args.llama.seed,
                "text": model.detokenize(&generated, false),
            });
            if let serde_json::Value::Object(extra) = run {
                obj.extend(extra);
            }
        }
        write_json(path, &value)?;
    }
    Ok(())
}
