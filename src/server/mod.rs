//! `qfilters serve`: an OpenAI-compatible HTTP server whose conversations live in bounded
//! caches.
//!
//! - [`api`]: the wire format (requests parsed and validated, responses, errors);
//! - [`slots`]: K slots, each a llama context of budget + batch cells on its own OS thread,
//!   the bounded queue in front of them, and the prefix-reuse decision over evicted caches;
//! - [`stop`]: stop strings over a reply that arrives in pieces;
//! - [`grammar`]: JSON Schema to GBNF, for `response_format` and required tool calls;
//! - [`tools`]: tool definitions, tool messages and tool calls (the model's Jinja template);
//! - [`http`]: axum routes, the API key, SSE.
//!
//! Generation goes through [`crate::conversation::generate::generate`], the loop every command uses.

pub mod api;
pub mod conn;
pub mod grammar;
pub mod http;
pub mod slots;
pub mod stop;
pub mod tools;

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use crate::conversation::chat::ChatTemplate;
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::ffi::Model;

/// How long in-flight requests get after SIGINT/SIGTERM before the server exits regardless.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

pub struct ServerConfig {
    pub host: String,
    pub port: u16,
    pub parallel: usize,
    pub max_queue: usize,
    pub api_key: Option<String>,
    /// Largest request body, in bytes (413 above).
    pub max_body: usize,
    pub defaults: api::Defaults,
    /// The name `/v1/models` gives the model.
    pub model_id: String,
    pub limits: conn::ConnLimits,
    /// `--cors ORIGIN`: the origin browsers may call from.
    pub cors: Option<String>,
    /// Most tokens a request's prompt may have (400 above).
    pub max_prompt_tokens: usize,
}

/// What the server reserved, known once it listens.
pub struct Ready {
    pub addr: SocketAddr,
    /// KV bytes each slot's context reserved (llama.cpp allocates them at creation).
    pub kv_bytes: Vec<usize>,
}

/// Starts the slots (`make_engine(i)` builds slot `i`'s engine on its own thread), listens,
/// calls `on_ready`, and serves until SIGINT or SIGTERM.
pub fn serve(
    cfg: ServerConfig,
    model: Arc<Model>,
    template: ChatTemplate,
    make_engine: Arc<dyn Fn(usize) -> Result<Engine> + Send + Sync>,
    on_ready: impl FnOnce(&Ready),
) -> Result<()> {
    if cfg.parallel == 0 {
        return Err(Error::invalid("at least one slot is needed"));
    }
    let cors = cfg
        .cors
        .as_deref()
        .map(|o| {
            axum::http::HeaderValue::from_str(o)
                .map_err(|_| Error::invalid(format!("--cors {o:?} is not a valid origin")))
        })
        .transpose()?;
    let slots::Started {
        pool,
        threads,
        kv_bytes,
    } = slots::Pool::start(cfg.parallel, cfg.max_queue, make_engine)?;
    // Two async threads are plenty to move bytes: the model runs on the slot threads.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Error::io("cannot start the async runtime", e))?;
    let app = Arc::new(http::App {
        pool: Arc::clone(&pool),
        model,
        template,
        defaults: cfg.defaults,
        model_id: cfg.model_id,
        api_key: cfg.api_key,
        max_body: cfg.max_body,
        read_timeout: cfg.limits.header_timeout,
        cors,
        max_prompt_tokens: cfg.max_prompt_tokens,
        created: http::now(),
        ids: AtomicU64::new(0),
        hosts: http::HostWatch::default(),
    });
    let result = runtime.block_on(async {
        let where_ = format!("{}:{}", cfg.host, cfg.port);
        let listener = tokio::net::TcpListener::bind(&where_)
            .await
            .map_err(|e| Error::io(format!("cannot listen on {where_}"), e))?;
        let addr = listener
            .local_addr()
            .map_err(|e| Error::io("cannot read the bound address", e))?;
        on_ready(&Ready { addr, kv_bytes });
        let pool_for_signal = Arc::clone(&pool);
        let graceful = conn::serve(listener, http::router(app), cfg.limits, async move {
            wait_for_signal().await;
            eprintln!(
                "qfilters: shutting down: queued requests refused, replies cut at their next token"
            );
            pool_for_signal.shut_down();
        })
        .await;
        if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
            .await
            .is_err()
        {
            eprintln!("qfilters: connections still open after {SHUTDOWN_GRACE:?}: exiting");
        }
        Ok(())
    });
    pool.shut_down();
    drop(runtime);
    for t in threads {
        let _ = t.join();
    }
    let lost = crate::ffi::rpc::lost_hosts();
    if !lost.is_empty() {
        // The slots left their engines unfreed (see `slots::slot_loop`), so the model's
        // weights stay allocated too: nothing is sent to the lost host on the way out.
        eprintln!(
            "qfilters: RPC host {} was lost: its buffers were not freed",
            lost.join(", ")
        );
    }
    result
}

async fn wait_for_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}
