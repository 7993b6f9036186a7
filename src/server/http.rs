//! The HTTP layer (axum): routes, the API key, body limits, Server-Sent Events. Model work is
//! never done here: prompts are prepared on tokio's blocking pool and generated on the slot
//! threads, so the async runtime only moves bytes.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::stream::{self, Stream, StreamExt};
use serde_json::json;
use tokio::sync::mpsc;

use crate::conversation::chat::ChatTemplate;
use crate::ffi::Model;

use super::api::Input;
use super::api::{self, ApiError, Defaults, Endpoint, Meta};
use super::slots::{prepare, Event, Pool};
use super::tools::{self, ReplyFormat};

pub struct App {
    pub pool: Arc<Pool>,
    pub model: Arc<Model>,
    pub template: ChatTemplate,
    pub defaults: Defaults,
    pub model_id: String,
    pub api_key: Option<String>,
    pub max_body: usize,
    /// Time the client has to send the body once its head has arrived.
    pub read_timeout: Duration,
    /// `--cors ORIGIN`: the origin browsers may call from (`*`: any).
    pub cors: Option<HeaderValue>,
    pub max_prompt_tokens: usize,
    pub created: u64,
    pub ids: AtomicU64,
    pub hosts: HostWatch,
}

/// How long a look at the RPC hosts stands for: a flood of requests looks once a second.
const HOST_CHECK_EVERY: Duration = Duration::from_secs(1);

/// The `--rpc` hosts found down ([`crate::ffi::rpc::lost_hosts`]), looked at most once a
/// second (`HOST_CHECK_EVERY`).
#[derive(Default)]
pub struct HostWatch {
    last: Mutex<Option<(Instant, Vec<String>)>>,
}

impl HostWatch {
    pub fn down(&self) -> Vec<String> {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((at, down)) = &*last {
            if at.elapsed() < HOST_CHECK_EVERY {
                return down.clone();
            }
        }
        let down = crate::ffi::rpc::lost_hosts();
        *last = Some((Instant::now(), down.clone()));
        down
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, Json(self.body())).into_response()
    }
}

pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/v1/models/{id}", get(model))
        .route("/health", get(health))
        .fallback(|uri: Uri| async move { ApiError::not_found(uri.path()) })
        .method_not_allowed_fallback(|method: Method, uri: Uri| async move {
            ApiError::method_not_allowed(method.as_str(), uri.path())
        })
        .layer(middleware::from_fn_with_state(Arc::clone(&app), auth))
        .layer(middleware::from_fn_with_state(Arc::clone(&app), cors))
        .with_state(app)
}

/// With `--cors ORIGIN`: answers a browser's preflight (OPTIONS) without the API key, as
/// browsers send none there, and marks every response as readable from that origin.
async fn cors(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    let Some(origin) = app.cors.clone() else {
        return next.run(req).await;
    };
    let preflight = req.method() == Method::OPTIONS
        && req
            .headers()
            .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
    let mut res = if preflight {
        let mut r = StatusCode::NO_CONTENT.into_response();
        let h = r.headers_mut();
        h.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static("GET, POST, OPTIONS"),
        );
        h.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static("authorization, content-type"),
        );
        h.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static("600"),
        );
        r
    } else {
        next.run(req).await
    };
    let h = res.headers_mut();
    h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    h.insert(header::VARY, HeaderValue::from_static("origin"));
    res
}

/// Compares without stopping at the first difference, so the time taken says nothing about
/// how much of a guessed key was right.
fn same_key(given: &[u8], key: &[u8]) -> bool {
    let mut diff = given.len() ^ key.len();
    for (i, &k) in key.iter().enumerate() {
        diff |= usize::from(given.get(i).copied().unwrap_or(0) ^ k);
    }
    diff == 0
}

async fn auth(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    if let Some(key) = &app.api_key {
        if req.uri().path() != "/health" {
            let ok = req
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .is_some_and(|given| same_key(given.trim().as_bytes(), key.as_bytes()));
            if !ok {
                return ApiError::unauthorized().into_response();
            }
        }
    }
    next.run(req).await
}

async fn health(State(app): State<Arc<App>>) -> Response {
    let mut v = serde_json::to_value(app.pool.load()).unwrap_or_else(|_| json!({}));
    let down = app.hosts.down();
    if down.is_empty() {
        v["status"] = json!("ok");
        return Json(v).into_response();
    }
    v["status"] = json!("rpc_host_down");
    v["message"] = json!(ApiError::rpc_host_down(&down).message);
    v["rpc_hosts_down"] = json!(down);
    (StatusCode::SERVICE_UNAVAILABLE, Json(v)).into_response()
}

async fn models(State(app): State<Arc<App>>) -> Response {
    Json(api::models(&app.model_id, app.created)).into_response()
}

async fn model(State(app): State<Arc<App>>, Path(id): Path<String>) -> Response {
    if id == app.model_id {
        Json(api::model(&app.model_id, app.created)).into_response()
    } else {
        ApiError::model_not_found(&id).into_response()
    }
}

async fn chat(State(app): State<Arc<App>>, req: Request) -> Response {
    handle(app, Endpoint::Chat, req).await
}

async fn completions(State(app): State<Arc<App>>, req: Request) -> Response {
    handle(app, Endpoint::Completion, req).await
}

async fn handle(app: Arc<App>, e: Endpoint, req: Request) -> Response {
    match start(app, e, req).await {
        Ok(r) => r,
        Err(err) => err.into_response(),
    }
}

/// The body, at most `limit` bytes (413 beyond, told by Content-Length before any is read),
/// within `timeout` (408 after: a client trickling its body holds a connection, not the server).
async fn read_body(req: Request, limit: usize, timeout: Duration) -> Result<Bytes, ApiError> {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::too_large(limit));
    }
    let mut data = req.into_body().into_data_stream();
    let read = async {
        let mut buf = Vec::new();
        while let Some(chunk) = data.next().await {
            let chunk = chunk.map_err(|_| {
                ApiError::bad_request("the request body could not be read to its end", None)
            })?;
            if buf.len() + chunk.len() > limit {
                return Err(ApiError::too_large(limit));
            }
            buf.extend_from_slice(&chunk);
        }
        Ok(Bytes::from(buf))
    };
    tokio::time::timeout(timeout, read)
        .await
        .map_err(|_| ApiError::body_timeout(timeout.as_secs()))?
}

async fn start(app: Arc<App>, e: Endpoint, req: Request) -> Result<Response, ApiError> {
    let body = read_body(req, app.max_body, app.read_timeout).await?;
    let mut req = match e {
        Endpoint::Chat => api::parse_chat(&body, &app.defaults)?,
        Endpoint::Completion => api::parse_completion(&body, &app.defaults)?,
    };
    // Template formatting and tokenization are model work: off the async threads.
    let prep = Arc::clone(&app);
    let input = req.input;
    let (prompt, family, input) = tokio::task::spawn_blocking(move || {
        // A tool conversation needs the model's Jinja template to render tools (400 if not).
        let family = match &input {
            Input::Tools(_) => Some(tools::template(&prep.model)?.1),
            _ => None,
        };
        prepare(&prep.model, &prep.template, &input).map(|p| (p, family, input))
    })
    .await
    .map_err(|_| ApiError::internal("preparing the prompt failed"))?
    .map_err(|err| ApiError::bad_request(err.to_string(), Some(e.input_field())))?;
    let reply_format = match (&input, family) {
        (Input::Tools(chat), Some(f)) => tools::setup(chat, f, &mut req.params.sampling.grammar)?,
        _ => None,
    };
    let n: usize = prompt.iter().map(|p| p.tokens.len()).sum();
    if n > app.max_prompt_tokens {
        return Err(ApiError::prompt_too_long(
            n,
            app.max_prompt_tokens,
            e.input_field(),
        ));
    }
    let lease = app.pool.acquire(&prompt).await?;
    // Looked at once the slot is ours, the last moment before the decode: a decode that needs
    // a lost host would end the process (ggml-rpc aborts).
    let down = app.hosts.down();
    if !down.is_empty() {
        app.pool.give_back(lease);
        return Err(ApiError::rpc_host_down(&down));
    }
    let (tx, rx) = mpsc::channel(256);
    let stream = req.params.stream;
    let include_usage = req.params.include_usage;
    let logprobs = req.params.logprobs.is_some();
    app.pool.submit(lease, req.params, tx)?;
    let n = app.ids.fetch_add(1, Ordering::Relaxed);
    let prefix = match e {
        Endpoint::Chat => "chatcmpl",
        Endpoint::Completion => "cmpl",
    };
    let meta = Meta {
        id: format!("{prefix}-qf{}-{n}", app.created),
        created: now(),
        model: app.model_id.clone(),
    };
    if stream {
        Ok(Sse::new(sse(e, meta, rx, include_usage, logprobs, reply_format)).into_response())
    } else {
        collect(e, meta, rx, logprobs, reply_format).await
    }
}

/// Waits for the whole reply. If the client goes away, this future is dropped with `rx`, and
/// the slot stops at its next token.
async fn collect(
    e: Endpoint,
    meta: Meta,
    mut rx: mpsc::Receiver<Event>,
    want_logprobs: bool,
    reply_format: Option<ReplyFormat>,
) -> Result<Response, ApiError> {
    let mut text = String::new();
    let mut lps = Vec::new();
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Text(t, l) => {
                text.push_str(&t);
                lps.extend(l);
            }
            Event::Done { finish, report } => {
                let mut v = api::response(e, &meta, &text, finish, &report);
                v["choices"][0]["logprobs"] = api::logprobs(e, want_logprobs.then_some(&lps[..]));
                if let Some(f) = reply_format {
                    let (content, calls) = f.split(&text);
                    tools::set_calls(&mut v["choices"][0], "message", &content, &calls, &meta.id);
                }
                return Ok(Json(v).into_response());
            }
            Event::Failed(err) => return Err(err),
        }
    }
    Err(ApiError::internal("the slot ended without a reply"))
}

struct StreamState {
    rx: mpsc::Receiver<Event>,
    meta: Meta,
    e: Endpoint,
    first: bool,
    include_usage: bool,
    logprobs: bool,
    out: VecDeque<SseEvent>,
    ended: bool,
    /// With tools offered, the reply is held back and sent whole at its end, its calls parsed.
    reply_format: Option<ReplyFormat>,
    held: String,
}

/// The reply as `data:` chunks ending with `data: [DONE]`, or with an error object when the
/// reply was cut (shutdown, failure). Dropping the stream (client gone) drops `rx`, which
/// the slot notices at its next token.
fn sse(
    e: Endpoint,
    meta: Meta,
    rx: mpsc::Receiver<Event>,
    include_usage: bool,
    logprobs: bool,
    reply_format: Option<ReplyFormat>,
) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    let state = StreamState {
        rx,
        meta,
        e,
        first: true,
        include_usage,
        logprobs,
        out: VecDeque::new(),
        ended: false,
        reply_format,
        held: String::new(),
    };
    stream::unfold(state, |mut st| async move {
        loop {
            if let Some(ev) = st.out.pop_front() {
                return Some((Ok(ev), st));
            }
            if st.ended {
                return None;
            }
            let include_usage = st.include_usage;
            let data = |mut v: serde_json::Value| {
                if include_usage && v.get("choices").is_some() && v.get("usage").is_none() {
                    v["usage"] = serde_json::Value::Null;
                }
                SseEvent::default().data(v.to_string())
            };
            match st.rx.recv().await {
                Some(Event::Text(t, _)) if st.reply_format.is_some() => st.held.push_str(&t),
                Some(Event::Text(t, l)) => {
                    let mut c = api::chunk(st.e, &st.meta, Some(&t), st.first, None);
                    c["choices"][0]["logprobs"] =
                        api::logprobs(st.e, st.logprobs.then_some(&l[..]));
                    st.first = false;
                    st.out.push_back(data(c));
                }
                Some(Event::Done { finish, report }) => {
                    let mut finish = finish;
                    if let Some(f) = &st.reply_format {
                        let (content, calls) = f.split(&st.held);
                        let mut c = api::chunk(st.e, &st.meta, None, st.first, None);
                        tools::set_calls(
                            &mut c["choices"][0],
                            "delta",
                            &content,
                            &calls,
                            &st.meta.id,
                        );
                        if !calls.is_empty() {
                            finish = "tool_calls";
                        }
                        st.first = false;
                        st.out.push_back(data(c));
                    }
                    let c = api::chunk(st.e, &st.meta, None, st.first, Some((finish, &report)));
                    st.out.push_back(data(c));
                    if st.include_usage {
                        st.out
                            .push_back(data(api::usage_chunk(st.e, &st.meta, &report)));
                    }
                    st.out.push_back(SseEvent::default().data("[DONE]"));
                    st.ended = true;
                }
                Some(Event::Failed(err)) => {
                    st.out.push_back(data(err.body()));
                    st.ended = true;
                }
                None => {
                    st.out.push_back(data(
                        ApiError::internal("the slot ended without a reply").body(),
                    ));
                    st.ended = true;
                }
            }
        }
    })
}

pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::same_key;

    #[test]
    fn keys_compare_whole() {
        assert!(same_key(b"secret", b"secret"));
        assert!(!same_key(b"secre", b"secret"));
        assert!(!same_key(b"secretx", b"secret"));
        assert!(!same_key(b"", b"secret"));
        assert!(!same_key(b"Secret", b"secret"));
    }
}
