//! Bounded generation from Rust: complete a prompt while the KV cache never holds more than
//! 96 cells, evicting with the Q-Filters embedded in the model (K-norm when it has none).
//!
//! ```text
//! cargo run --release --example bounded_generation -- models/SmolLM2-135M-Instruct.Q4_1.gguf "Once upon a time"
//! ```

use std::path::PathBuf;
use std::sync::Arc;

use gguf_tools::filters::QFilters;
use qfilters::args::{EvictionArgs, JobLength, LlamaArgs, SamplingArgs};
use qfilters::conversation::generate::{generate, Limits};
use qfilters::engine::Engine;
use qfilters::ffi::{Model, ModelParams, Sampler};
use qfilters::policy;

fn main() {
    if let Err(e) = run() {
        eprintln!("bounded_generation: {e}");
        std::process::exit(1);
    }
}

fn run() -> qfilters::Result<()> {
    let mut argv = std::env::args().skip(1);
    let path = PathBuf::from(
        argv.next()
            .unwrap_or_else(|| "models/SmolLM2-135M-Instruct.Q4_1.gguf".into()),
    );
    let prompt = argv
        .next()
        .unwrap_or_else(|| "The history of the printing press".into());
    let model = Model::load(&path, &ModelParams { gpu_layers: 0 })?;

    // The knobs in the command line's words; every other one keeps its default.
    let mut eviction = EvictionArgs::from_flags(&["--budget", "96", "--window", "16"])?;
    let filters = QFilters::from_gguf(&path)?.map(Arc::new);
    if filters.is_none() {
        eviction.policy = policy::WITHOUT_FILTERS;
    }

    let tokens = model.tokenize(&prompt, true, false)?;
    let n_predict = 200;
    // llama.cpp's own flags (cache types, flash attention, seed) at llama.cpp's defaults.
    let llama = LlamaArgs::default();
    let scorer = eviction.scorer(filters, llama.seed)?;
    let config = eviction.engine_config(&llama, JobLength::Known(tokens.len() + n_predict), 1)?;
    let mut engine = Engine::new(&model, scorer, config)?;
    let mut sampler = Sampler::new(&model, &SamplingArgs::default().params(llama.seed)?)?;

    let out = generate(
        &mut engine,
        &mut sampler,
        &tokens,
        Limits::tokens(n_predict),
        &mut |_, _| true,
        &mut |_| true,
    )?;
    println!("{prompt}{}", out.text);
    let s = engine.stats();
    eprintln!(
        "policy {} | {} prompt + {} generated tokens | peak {} cells (budget {}) | {} evicted",
        eviction.policy,
        tokens.len(),
        out.tokens.len(),
        s.peak_cells,
        eviction.budget,
        s.evicted
    );
    Ok(())
}
