//! `qfilters serve`: an OpenAI-compatible server whose conversations live in bounded caches.

use std::sync::Arc;

use clap::Args;

use qfilters::conversation::chat::ChatTemplate;
use qfilters::server::{self, api::Defaults, ServerConfig};
use qfilters::{Error, Result};

use super::{
    EvictionArgs, EvictionCli, FoundFilters, Given, JobLength, LlamaArgs, ModelArgs, SamplingArgs,
};

/// The prompt cap when a GGUF does not state its trained context.
const FALLBACK_TRAINED_CONTEXT: usize = 4096;

#[derive(Args, Debug)]
// A chat's default temperature, as `qfilters chat`; a request's own temperature, top_p and seed
// override these per request (top-k has no OpenAI field: the flag holds for every request).
#[command(mut_arg("temp", |a| a.default_value("0.2")))]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub eviction: EvictionArgs,
    #[command(flatten)]
    pub llama: LlamaArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Address to listen on. The default answers this machine only; another address exposes
    /// the server to the network (use --api-key then).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on; 0 picks a free one (the startup line says which).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Conversations decoded at once, each in its own context of budget + batch cells.
    #[arg(long, default_value_t = 1)]
    pub parallel: usize,
    /// Requests that may wait for a slot; more get 503.
    #[arg(long = "max-queue", default_value_t = 8)]
    pub max_queue: usize,
    /// Require `Authorization: Bearer KEY` on every endpoint but /health (401 otherwise).
    /// QFILTERS_API_KEY sets it too, without showing it in the process list.
    #[arg(long = "api-key", env = "QFILTERS_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Most tokens one reply may have; a request's max_tokens is capped to it, and it is the
    /// default when a request gives none.
    #[arg(long = "max-tokens", default_value_t = 512)]
    pub max_tokens: usize,
    /// Largest request body in bytes (413 above).
    #[arg(long = "max-body", default_value_t = 1 << 20)]
    pub max_body: usize,
    /// Seconds a connection has to send a request's head, from when it opens and again from the
    /// end of each reply (so also the idle keep-alive timeout), and then to send its body.
    #[arg(long = "read-timeout", default_value_t = 10)]
    pub read_timeout: u64,
    /// Most connections open at once; one more is answered 503 and closed at once. Keep it well
    /// under the process's descriptor limit (`ulimit -n`).
    #[arg(long = "max-connections", default_value_t = 256)]
    pub max_connections: usize,
    /// Most tokens a request's prompt (the whole conversation, as formatted) may have; more is
    /// refused with 400. Default: the model's trained context (positions past it are outside
    /// what the model learnt, whatever the budget), and for a policy that does not evict, at
    /// most the cache's budget + batch cells less one for the reply.
    #[arg(long = "max-prompt-tokens")]
    pub max_prompt_tokens: Option<usize>,
    /// Let browser pages from ORIGIN (e.g. `http://localhost:3000`, or `*` for any) call the
    /// server: CORS headers on every response, and preflights answered without the API key.
    /// Off by default.
    #[arg(long)]
    pub cors: Option<String>,
    /// Chat template: a llama.cpp built-in name (chatml, llama3, ...) or Jinja source.
    /// Default: the model's own (GGUF tokenizer.chat_template), else chatml.
    #[arg(long)]
    pub template: Option<String>,
}

pub fn run(mut args: ServeArgs, given: &Given) -> Result<()> {
    let sampling = args.sampling.params(args.llama.seed)?;
    args.eviction.check()?;
    args.llama.check(args.eviction.per_head())?;
    super::check_cells("--max-tokens", args.max_tokens)?;
    if args.parallel == 0 || args.parallel > 64 {
        return Err(Error::invalid(format!(
            "--parallel {}: give 1 to 64 slots",
            args.parallel
        )));
    }
    if args.max_tokens == 0 {
        return Err(Error::invalid("--max-tokens must be at least 1"));
    }
    if args.read_timeout == 0 || args.read_timeout > 3600 {
        return Err(Error::invalid(format!(
            "--read-timeout {}: give 1 to 3600 seconds",
            args.read_timeout
        )));
    }
    if args.max_connections == 0 || args.max_connections > 1 << 20 {
        return Err(Error::invalid(format!(
            "--max-connections {}: give 1 to 1048576",
            args.max_connections
        )));
    }
    if args.api_key.as_deref().is_some_and(str::is_empty) {
        return Err(Error::invalid("--api-key is empty"));
    }
    let found = FoundFilters::load(args.eviction.filters.as_deref(), &args.model.model)?;
    args.eviction.apply_tuned(found.as_ref(), given)?;
    let model = args.model.load()?;
    let (template, notice) = ChatTemplate::resolve(&model, args.template.as_deref());
    if let Some(n) = notice {
        eprintln!("qfilters: {n}");
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
    let evicting = args.eviction.policy.evicts;
    let (budget, n_batch) = (args.eviction.budget, args.eviction.n_batch);
    // Conversations have no known length. A policy that does not evict gets the KV memory of
    // an evicting slot, a full cache of budget + batch cells (or --ctx-size), and a
    // conversation that outgrows it is refused.
    let job = JobLength::Open {
        full_cells: budget.saturating_add(n_batch),
    };
    let full_cells = job.full_cells(args.llama.ctx_size);
    // Each slot gets its share of the default threads (at least one), so K slots do not
    // contend for the same cores; -t / QFILTERS_THREADS give each slot that many.
    let per_slot = if args.model.threads.is_some() || std::env::var_os("QFILTERS_THREADS").is_some()
    {
        args.model.threads()
    } else {
        (args.model.threads() / args.parallel as i32).max(1)
    };
    let mut margs = args.model.clone();
    margs.threads = Some(per_slot);
    let eviction = args.eviction.clone();
    let llama = args.llama.clone();
    let m = Arc::clone(&model);
    let make = Arc::new(move |_slot: usize| {
        eviction.engine_with_filters(&margs, &llama, &m, job, filters.clone())
    });
    let trained = match model.n_ctx_train() {
        0 => FALLBACK_TRAINED_CONTEXT,
        n => n,
    };
    let max_prompt_tokens = match args.max_prompt_tokens {
        Some(0) => return Err(Error::invalid("--max-prompt-tokens must be at least 1")),
        Some(n) => n,
        None if evicting => trained,
        None => trained.min(full_cells.saturating_sub(1)).max(1),
    };
    let model_id = args
        .model
        .model
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    let cfg = ServerConfig {
        host: args.host.clone(),
        port: args.port,
        parallel: args.parallel,
        max_queue: args.max_queue,
        api_key: args.api_key.clone(),
        max_body: args.max_body,
        defaults: Defaults {
            sampling,
            max_tokens_cap: args.max_tokens,
            n_vocab: model.n_vocab(),
        },
        model_id: model_id.clone(),
        limits: server::conn::ConnLimits {
            header_timeout: std::time::Duration::from_secs(args.read_timeout),
            max_connections: args.max_connections,
        },
        cors: args.cors.clone(),
        max_prompt_tokens,
    };
    let cells = if evicting {
        format!("budget {budget} + batch {n_batch} cells")
    } else {
        format!("full cache of {full_cells} cells")
    };
    let policy_name = args.eviction.policy.to_string();
    let parallel = args.parallel;
    let prompt_cap = max_prompt_tokens;
    let auth = if args.api_key.is_some() {
        "API key required"
    } else {
        "no API key"
    };
    server::serve(cfg, model, template, make, |ready| {
        let total: usize = ready.kv_bytes.iter().sum();
        let each = ready.kv_bytes.first().copied().unwrap_or(0);
        eprintln!(
            "qfilters: serving {model_id} on http://{} | policy {policy_name} | {parallel} slot(s) × ({cells}), {per_slot} thread(s) each | KV reserved {parallel} × {:.2} MiB = {:.2} MiB | prompts up to {prompt_cap} tokens | {auth}",
            ready.addr,
            each as f64 / (1024.0 * 1024.0),
            total as f64 / (1024.0 * 1024.0),
        );
    })
}
