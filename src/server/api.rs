//! The OpenAI wire format: request bodies parsed and validated into `Job` parameters, and the
//! JSON of responses, stream chunks and errors. Pure functions, no I/O, so every rule here is
//! unit-tested without a model.

use serde_json::{json, Value};

use crate::ffi::SamplingParams;

/// An error as the client sees it: an HTTP status and OpenAI's `{"error": {...}}` object.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
    /// OpenAI's `error.type`: `invalid_request_error`, `authentication_error`, `server_error`.
    pub kind: &'static str,
    pub code: Option<&'static str>,
    pub param: Option<&'static str>,
}

impl ApiError {
    pub fn bad_request(message: impl Into<String>, param: Option<&'static str>) -> ApiError {
        ApiError {
            status: 400,
            message: message.into(),
            kind: "invalid_request_error",
            code: None,
            param,
        }
    }

    pub fn too_large(limit: usize) -> ApiError {
        ApiError {
            status: 413,
            message: format!(
                "the request body is larger than the server's limit of {limit} bytes (--max-body)"
            ),
            kind: "invalid_request_error",
            code: Some("request_too_large"),
            param: None,
        }
    }

    pub fn unauthorized() -> ApiError {
        ApiError {
            status: 401,
            message: "missing or wrong API key: send `Authorization: Bearer KEY`".into(),
            kind: "authentication_error",
            code: Some("invalid_api_key"),
            param: None,
        }
    }

    pub fn overloaded(slots: usize, queue: usize) -> ApiError {
        ApiError {
            status: 503,
            message: format!(
                "the server is busy: all {slots} slots are generating and {queue} requests are queued (--max-queue); retry later"
            ),
            kind: "server_error",
            code: Some("server_overloaded"),
            param: None,
        }
    }

    pub fn too_many_connections(max: usize) -> ApiError {
        ApiError {
            status: 503,
            message: format!(
                "the server holds its most open connections ({max}, --max-connections); retry later"
            ),
            kind: "server_error",
            code: Some("too_many_connections"),
            param: None,
        }
    }

    pub fn shutting_down() -> ApiError {
        ApiError {
            status: 503,
            message: "the server is shutting down".into(),
            kind: "server_error",
            code: Some("shutting_down"),
            param: None,
        }
    }

    /// An RPC host holding some of the model's layers has gone (`--rpc`): nothing can be
    /// decoded until it and then this server are restarted, since its weights and KV cache
    /// went with it.
    pub fn rpc_host_down(hosts: &[String]) -> ApiError {
        ApiError {
            status: 503,
            message: format!(
                "RPC host {} is down: the layers it held are lost; restart `qfilters rpc-server` there, then this server",
                hosts.join(", ")
            ),
            kind: "server_error",
            code: Some("rpc_host_down"),
            param: None,
        }
    }

    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError {
            status: 500,
            message: message.into(),
            kind: "server_error",
            code: None,
            param: None,
        }
    }

    pub fn not_found(path: &str) -> ApiError {
        ApiError {
            status: 404,
            message: format!("no endpoint {path}: see GET /v1/models, POST /v1/chat/completions, POST /v1/completions, GET /health"),
            kind: "invalid_request_error",
            code: Some("unknown_url"),
            param: None,
        }
    }

    pub fn method_not_allowed(method: &str, path: &str) -> ApiError {
        ApiError {
            status: 405,
            message: format!(
                "{path} does not take {method}: GET /v1/models, GET /v1/models/ID, GET /health; POST /v1/chat/completions, POST /v1/completions"
            ),
            kind: "invalid_request_error",
            code: Some("method_not_allowed"),
            param: None,
        }
    }

    pub fn model_not_found(id: &str) -> ApiError {
        ApiError {
            status: 404,
            message: format!("no model '{id}': this server has one, listed by GET /v1/models"),
            kind: "invalid_request_error",
            code: Some("model_not_found"),
            param: Some("model"),
        }
    }

    pub fn body_timeout(secs: u64) -> ApiError {
        ApiError {
            status: 408,
            message: format!(
                "the request body did not arrive within {secs} s of its head (--read-timeout)"
            ),
            kind: "invalid_request_error",
            code: Some("request_timeout"),
            param: None,
        }
    }

    pub fn prompt_too_long(tokens: usize, max: usize, param: &'static str) -> ApiError {
        ApiError {
            status: 400,
            message: format!(
                "the prompt is {tokens} tokens: this server takes at most {max} (--max-prompt-tokens)"
            ),
            kind: "invalid_request_error",
            code: Some("context_length_exceeded"),
            param: Some(param),
        }
    }

    pub fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

/// What the server does when a request leaves a parameter out, and the caps it enforces.
#[derive(Debug, Clone)]
pub struct Defaults {
    pub sampling: SamplingParams,
    /// The most tokens one reply may have (`--max-tokens`); also the default.
    pub max_tokens_cap: usize,
    /// The model's vocabulary size, which bounds `logit_bias`'s token ids.
    pub n_vocab: usize,
}

/// One generation request, validated.
#[derive(Debug, Clone)]
pub struct Params {
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Generation stops when the text contains one; it is not part of the reply.
    pub stop: Vec<String>,
    pub stream: bool,
    /// `stream_options.include_usage`: a last chunk with `choices: []` and the usage.
    pub include_usage: bool,
    /// `logprobs`: each token's log-probability, with this many alternatives.
    pub logprobs: Option<usize>,
}

/// Most alternatives per token `top_logprobs` / `logprobs` may ask for (OpenAI's limit).
const MAX_TOP_LOGPROBS: i64 = 20;

/// A generated token's log-probability, as the response shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenInfo {
    pub text: String,
    pub bytes: Vec<u8>,
    pub logprob: f32,
    /// Where the token's text starts in the reply, in characters.
    pub offset: usize,
    /// The most likely tokens at its place: text, bytes, log-probability.
    pub top: Vec<(String, Vec<u8>, f32)>,
}

/// The `logprobs` of a choice: chat's `{"content": [...]}` or the completions' columns;
/// `null` when not asked for.
pub fn logprobs(e: Endpoint, tokens: Option<&[TokenInfo]>) -> Value {
    let Some(tokens) = tokens else {
        return Value::Null;
    };
    match e {
        Endpoint::Chat => {
            let content: Vec<Value> = tokens
                .iter()
                .map(|t| {
                    let top: Vec<Value> = t
                        .top
                        .iter()
                        .map(|(s, b, lp)| json!({"token": s, "logprob": lp, "bytes": b}))
                        .collect();
                    json!({"token": t.text, "logprob": t.logprob, "bytes": t.bytes, "top_logprobs": top})
                })
                .collect();
            json!({"content": content, "refusal": null})
        }
        Endpoint::Completion => {
            let top: Vec<Value> = tokens
                .iter()
                .map(|t| {
                    let m: serde_json::Map<String, Value> = t
                        .top
                        .iter()
                        .map(|(s, _, lp)| (s.clone(), json!(lp)))
                        .collect();
                    Value::Object(m)
                })
                .collect();
            json!({
                "tokens": tokens.iter().map(|t| t.text.clone()).collect::<Vec<_>>(),
                "token_logprobs": tokens.iter().map(|t| t.logprob).collect::<Vec<_>>(),
                "top_logprobs": top,
                "text_offset": tokens.iter().map(|t| t.offset).collect::<Vec<_>>(),
            })
        }
    }
}

/// What a request asks the model to continue.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// (role, content) pairs, formatted with the model's chat template.
    Chat(Vec<(String, String)>),
    /// Raw text, tokenized as plain text (never parsed for special tokens).
    Text(String),
    /// Messages with tools, tool calls or tool results, rendered by the model's own Jinja
    /// template (src/server/tools.rs).
    Tools(super::tools::ToolChat),
}

#[derive(Debug, Clone)]
pub struct Request {
    pub input: Input,
    pub params: Params,
}

/// Most stop strings per request (OpenAI's limit).
const MAX_STOPS: usize = 4;

type Object = serde_json::Map<String, Value>;

/// The body as a JSON object; syntax errors keep serde_json's line and column, which speak of
/// the text, not of Rust types.
fn parse_object(body: &[u8]) -> Result<Object, ApiError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(ApiError::bad_request(
            "the request body must be a JSON object",
            None,
        )),
        Err(e) => Err(ApiError::bad_request(
            format!("the request body is not valid JSON: {e}"),
            None,
        )),
    }
}

fn number(m: &Object, name: &'static str) -> Result<Option<f64>, ApiError> {
    match m.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => Ok(n.as_f64()),
        Some(_) => Err(ApiError::bad_request(
            format!("{name} must be a number"),
            Some(name),
        )),
    }
}

fn integer(m: &Object, name: &'static str) -> Result<Option<i64>, ApiError> {
    match m.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n.as_i64().map(Some).ok_or_else(|| {
            ApiError::bad_request(format!("{name} must be a whole number"), Some(name))
        }),
        Some(_) => Err(ApiError::bad_request(
            format!("{name} must be a whole number"),
            Some(name),
        )),
    }
}

fn boolean(m: &Object, name: &'static str) -> Result<Option<bool>, ApiError> {
    match m.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(ApiError::bad_request(
            format!("{name} must be true or false"),
            Some(name),
        )),
    }
}

/// A string, or an array of strings (`stop`, `prompt`).
fn strings(v: &Value, name: &'static str) -> Result<Vec<String>, ApiError> {
    let bad = || {
        ApiError::bad_request(
            format!("{name} must be a string or an array of strings"),
            Some(name),
        )
    };
    match v {
        Value::String(s) => Ok(vec![s.clone()]),
        Value::Array(a) => a
            .iter()
            .map(|x| x.as_str().map(str::to_string).ok_or_else(bad))
            .collect(),
        _ => Err(bad()),
    }
}

/// OpenAI fields this server does not implement and that change the answer when given with
/// anything but their default: refused, named, rather than ignored (docs/server.md lists
/// them). Each entry: the field, and whether a value leaves the answer as it would be.
/// Whether a field's value leaves the answer as it would be without the field.
type Harmless = fn(&Value) -> bool;

const REFUSED: &[(&str, Harmless)] = &[
    ("functions", |v| v.as_array().is_some_and(Vec::is_empty)),
    ("function_call", |v| v.as_str() == Some("none")),
    ("echo", |v| v == &Value::Bool(false)),
    ("suffix", |v| v.as_str().is_some_and(str::is_empty)),
    ("best_of", |v| v == &json!(1)),
    ("audio", |_| false),
    ("modalities", |v| v == &json!(["text"])),
    ("prediction", |_| false),
];

fn refuse_unsupported(m: &Object) -> Result<(), ApiError> {
    for (name, harmless) in REFUSED {
        match m.get(*name) {
            None | Some(Value::Null) => {}
            Some(v) if harmless(v) => {}
            Some(_) => {
                return Err(ApiError::bad_request(
                    format!("{name} is not supported by this server (see docs/server.md)"),
                    Some(name),
                ))
            }
        }
    }
    Ok(())
}

/// `response_format`: the grammar a JSON reply must follow (`None` for text).
fn response_format(m: &Object) -> Result<Option<String>, ApiError> {
    let bad = |message: String| ApiError::bad_request(message, Some("response_format"));
    let Some(f) = m.get("response_format").filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    match f.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(super::grammar::json_object())),
        Some("json_schema") => {
            let Some(spec) = f.get("json_schema").and_then(Value::as_object) else {
                return Err(bad(
                    "response_format.json_schema must be an object with a `schema`".into(),
                ));
            };
            // No schema: any JSON value.
            let schema = spec.get("schema").cloned().unwrap_or(Value::Bool(true));
            super::grammar::from_schema(&schema)
                .map(Some)
                .map_err(|e| bad(format!("response_format.json_schema.{}", e.0)))
        }
        Some(other) => Err(bad(format!(
            "response_format.type '{other}' is not one of text, json_object, json_schema"
        ))),
        None => Err(bad("response_format must be an object with a `type`".into())),
    }
}

/// One message's content: a string, `null`, or an array of text parts.
pub(super) fn content_text(v: Option<&Value>, i: usize) -> Result<String, ApiError> {
    let bad = |what: String| ApiError::bad_request(what, Some("messages"));
    match v {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => {
            let mut text = String::new();
            for (j, p) in parts.iter().enumerate() {
                let kind = p.get("type").and_then(Value::as_str);
                match (kind, p.get("text")) {
                    (Some("text"), Some(Value::String(t))) => text.push_str(t),
                    (Some("text"), _) => {
                        return Err(bad(format!(
                            "messages[{i}].content[{j}] is a text part without a string `text`"
                        )))
                    }
                    (Some(other), _) => {
                        return Err(bad(format!(
                            "messages[{i}].content[{j}] has type '{other}': only text parts are supported"
                        )))
                    }
                    (None, _) => {
                        return Err(bad(format!(
                            "messages[{i}].content[{j}] must be an object with a `type`"
                        )))
                    }
                }
            }
            Ok(text)
        }
        Some(_) => Err(bad(format!(
            "messages[{i}].content must be a string, null, or an array of text parts"
        ))),
    }
}

/// `POST /v1/chat/completions`.
pub fn parse_chat(body: &[u8], d: &Defaults) -> Result<Request, ApiError> {
    let m = parse_object(body)?;
    let list = match m.get("messages") {
        Some(Value::Array(a)) => a,
        None | Some(Value::Null) => {
            return Err(ApiError::bad_request(
                "messages is required",
                Some("messages"),
            ))
        }
        Some(_) => {
            return Err(ApiError::bad_request(
                "messages must be an array of messages",
                Some("messages"),
            ))
        }
    };
    if list.is_empty() {
        return Err(ApiError::bad_request(
            "messages is empty: give at least one message",
            Some("messages"),
        ));
    }
    if let Some(chat) = super::tools::parse(&m, list)? {
        for (i, msg) in chat.messages.iter().enumerate() {
            if let Some(c) = msg["content"].as_str() {
                check_text(c, &format!("messages[{i}].content"), "messages")?;
            }
        }
        let params = common(&m, d)?;
        return Ok(Request {
            input: Input::Tools(chat),
            params,
        });
    }
    let mut messages = Vec::with_capacity(list.len());
    for (i, msg) in list.iter().enumerate() {
        let Some(role) = msg.get("role").and_then(Value::as_str) else {
            return Err(ApiError::bad_request(
                format!("messages[{i}] must be an object with a string `role`"),
                Some("messages"),
            ));
        };
        let role = match role {
            "system" | "developer" => "system",
            "user" => "user",
            "assistant" => "assistant",
            other => {
                return Err(ApiError::bad_request(
                    format!(
                    "messages[{i}].role '{other}' is not one of system, developer, user, assistant"
                ),
                    Some("messages"),
                ))
            }
        };
        let content = content_text(msg.get("content"), i)?;
        check_text(&content, &format!("messages[{i}].content"), "messages")?;
        messages.push((role.to_string(), content));
    }
    let params = common(&m, d)?;
    Ok(Request {
        input: Input::Chat(messages),
        params,
    })
}

/// `POST /v1/completions`.
pub fn parse_completion(body: &[u8], d: &Defaults) -> Result<Request, ApiError> {
    let m = parse_object(body)?;
    let Some(p) = m.get("prompt").filter(|v| !v.is_null()) else {
        return Err(ApiError::bad_request("prompt is required", Some("prompt")));
    };
    let mut prompts = strings(p, "prompt")?;
    if prompts.len() != 1 {
        return Err(ApiError::bad_request(
            "prompt must be one string (batches of prompts are not supported)",
            Some("prompt"),
        ));
    }
    let prompt = prompts.remove(0);
    if prompt.is_empty() {
        return Err(ApiError::bad_request("prompt is empty", Some("prompt")));
    }
    check_text(&prompt, "prompt", "prompt")?;
    let params = common(&m, d)?;
    Ok(Request {
        input: Input::Text(prompt),
        params,
    })
}

/// llama.cpp takes C strings: a NUL byte would cut the text short without a word.
fn check_text(text: &str, what: &str, param: &'static str) -> Result<(), ApiError> {
    if text.contains('\0') {
        return Err(ApiError::bad_request(
            format!("{what} contains a NUL character"),
            Some(param),
        ));
    }
    Ok(())
}

fn common(m: &Object, d: &Defaults) -> Result<Params, ApiError> {
    refuse_unsupported(m)?;
    if let Some(n) = integer(m, "n")? {
        if n != 1 {
            return Err(ApiError::bad_request(
                format!("n = {n}: this server returns one choice per request"),
                Some("n"),
            ));
        }
    }
    let given = match integer(m, "max_completion_tokens")? {
        Some(n) => Some(n),
        None => integer(m, "max_tokens")?,
    };
    let max_tokens = match given {
        None => d.max_tokens_cap,
        Some(n) if n < 1 => {
            return Err(ApiError::bad_request(
                format!("max_tokens = {n}: give at least 1"),
                Some("max_tokens"),
            ))
        }
        // Capped, not refused: a client asking for more than the server allows gets the most
        // it allows, as llama-server does with its n_predict limit.
        Some(n) => usize::try_from(n)
            .unwrap_or(usize::MAX)
            .min(d.max_tokens_cap),
    };
    let mut sampling = d.sampling.clone();
    if let Some(t) = number(m, "temperature")? {
        sampling.temperature = t as f32;
    }
    if let Some(p) = number(m, "top_p")? {
        sampling.top_p = p as f32;
    }
    if let Some(x) = number(m, "frequency_penalty")? {
        sampling.frequency_penalty = x as f32;
    }
    if let Some(x) = number(m, "presence_penalty")? {
        sampling.presence_penalty = x as f32;
    }
    match m.get("logit_bias") {
        None | Some(Value::Null) => {}
        Some(Value::Object(o)) => {
            for (k, v) in o {
                let token = k.parse::<i32>().map_err(|_| {
                    ApiError::bad_request(
                        format!("logit_bias key '{k}' is not a token id"),
                        Some("logit_bias"),
                    )
                })?;
                let bias = v.as_f64().ok_or_else(|| {
                    ApiError::bad_request(
                        format!("logit_bias['{k}'] must be a number"),
                        Some("logit_bias"),
                    )
                })?;
                sampling.logit_bias.push((token, bias as f32));
            }
        }
        Some(_) => {
            return Err(ApiError::bad_request(
                "logit_bias must be an object of token id to bias",
                Some("logit_bias"),
            ))
        }
    }
    // The ranges are the sampler's (one owner); the field it names is the request's.
    sampling.check(d.n_vocab).map_err(|b| {
        ApiError::bad_request(format!("{} = {}", b.field, b.message), Some(b.field))
    })?;
    sampling.grammar = response_format(m)?;
    if let Some(s) = integer(m, "seed")? {
        // llama.cpp's sampler takes 32 bits; the low 32 bits of the given seed are used.
        sampling.seed = s as u32;
    }
    let stop = match m.get("stop") {
        None | Some(Value::Null) => Vec::new(),
        Some(v) => strings(v, "stop")?,
    };
    if stop.len() > MAX_STOPS {
        return Err(ApiError::bad_request(
            format!("{} stop strings: give at most {MAX_STOPS}", stop.len()),
            Some("stop"),
        ));
    }
    if stop.iter().any(String::is_empty) {
        return Err(ApiError::bad_request(
            "a stop string is empty",
            Some("stop"),
        ));
    }
    // Chat sends `logprobs: true` and `top_logprobs: K`; completions `logprobs: K`.
    let top = integer(m, "top_logprobs")?;
    let logprobs = match m.get("logprobs") {
        None | Some(Value::Null) | Some(Value::Bool(false)) => {
            if top.is_some_and(|k| k > 0) {
                return Err(ApiError::bad_request(
                    "top_logprobs needs logprobs: true",
                    Some("top_logprobs"),
                ));
            }
            None
        }
        Some(Value::Bool(true)) => Some(top.unwrap_or(0)),
        Some(Value::Number(n)) => Some(n.as_i64().unwrap_or(-1)),
        Some(_) => {
            return Err(ApiError::bad_request(
                "logprobs must be true, false or a whole number",
                Some("logprobs"),
            ))
        }
    };
    if let Some(k) = logprobs {
        if !(0..=MAX_TOP_LOGPROBS).contains(&k) {
            return Err(ApiError::bad_request(
                format!("{k} alternatives per token: give 0 to {MAX_TOP_LOGPROBS}"),
                Some("top_logprobs"),
            ));
        }
    }
    let logprobs = logprobs.map(|k| k as usize);
    let include_usage = match m.get("stream_options") {
        None | Some(Value::Null) => false,
        Some(Value::Object(o)) => match o.get("include_usage") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => {
                return Err(ApiError::bad_request(
                    "stream_options.include_usage must be true or false",
                    Some("stream_options"),
                ))
            }
        },
        Some(_) => {
            return Err(ApiError::bad_request(
                "stream_options must be an object",
                Some("stream_options"),
            ))
        }
    };
    Ok(Params {
        max_tokens,
        sampling,
        stop,
        stream: boolean(m, "stream")?.unwrap_or(false),
        include_usage,
        logprobs,
    })
}

/// Which endpoint a response is for: the object names and the text field differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completion,
}

impl Endpoint {
    /// The request field that holds what the model continues.
    pub fn input_field(self) -> &'static str {
        match self {
            Endpoint::Chat => "messages",
            Endpoint::Completion => "prompt",
        }
    }
}

/// The numbers a finished request reports: OpenAI's `usage` and the `qfilters` object.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Report {
    /// The request's whole prompt, in tokens (OpenAI's meaning of `prompt_tokens`).
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// `None`: policy `none` (a full cache).
    pub budget: Option<usize>,
    pub live_cells: usize,
    /// Most cells in use during this request (after a decode, before its eviction round).
    pub peak_cells: usize,
    /// Positions evicted since the conversation started in its slot.
    pub evicted: u64,
    /// Prompt tokens this request actually decoded: only the new ones when the slot held the
    /// conversation's earlier turns.
    pub prompt_tokens_decoded: usize,
    pub slot: usize,
    /// Whether the slot's history was reused.
    pub reused: bool,
}

impl Report {
    pub fn usage(&self) -> Value {
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        })
    }

    pub fn qfilters(&self) -> Value {
        json!({
            "budget": self.budget,
            "live_cells": self.live_cells,
            "peak_cells": self.peak_cells,
            "evicted": self.evicted,
            "prompt_tokens_decoded": self.prompt_tokens_decoded,
            "slot": self.slot,
            "reused": self.reused,
        })
    }
}

/// The fields that name a response: id, creation time (Unix seconds), model.
#[derive(Debug, Clone)]
pub struct Meta {
    pub id: String,
    pub created: u64,
    pub model: String,
}

pub fn response(e: Endpoint, m: &Meta, text: &str, finish: &str, r: &Report) -> Value {
    let (object, choice) = match e {
        Endpoint::Chat => (
            "chat.completion",
            json!({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": null, "finish_reason": finish}),
        ),
        Endpoint::Completion => (
            "text_completion",
            json!({"index": 0, "text": text, "logprobs": null, "finish_reason": finish}),
        ),
    };
    json!({
        "id": m.id,
        "object": object,
        "created": m.created,
        "model": m.model,
        "choices": [choice],
        "usage": r.usage(),
        "qfilters": r.qfilters(),
    })
}

/// One stream chunk; the first chat chunk carries the role, the last the finish reason and the
/// `qfilters` object (clients ignore extra fields). The usage is [`usage_chunk`]'s, when asked.
pub fn chunk(
    e: Endpoint,
    m: &Meta,
    text: Option<&str>,
    first: bool,
    end: Option<(&str, &Report)>,
) -> Value {
    let finish = end.map(|(f, _)| f);
    let (object, choice) = match e {
        Endpoint::Chat => {
            let mut delta = serde_json::Map::new();
            if first {
                delta.insert("role".into(), json!("assistant"));
            }
            if let Some(t) = text {
                delta.insert("content".into(), json!(t));
            }
            (
                "chat.completion.chunk",
                json!({"index": 0, "delta": delta, "finish_reason": finish}),
            )
        }
        Endpoint::Completion => (
            "text_completion",
            json!({"index": 0, "text": text.unwrap_or(""), "logprobs": null, "finish_reason": finish}),
        ),
    };
    let mut v = json!({
        "id": m.id,
        "object": object,
        "created": m.created,
        "model": m.model,
        "choices": [choice],
    });
    if let Some((_, r)) = end {
        v["qfilters"] = r.qfilters();
    }
    v
}

/// The chunk OpenAI streams last when `stream_options.include_usage` is set: no choices, the
/// usage (the other chunks then carry `"usage": null`).
pub fn usage_chunk(e: Endpoint, m: &Meta, r: &Report) -> Value {
    let object = match e {
        Endpoint::Chat => "chat.completion.chunk",
        Endpoint::Completion => "text_completion",
    };
    json!({
        "id": m.id,
        "object": object,
        "created": m.created,
        "model": m.model,
        "choices": [],
        "usage": r.usage(),
    })
}

pub fn models(id: &str, created: u64) -> Value {
    json!({"object": "list", "data": [model(id, created)]})
}

/// `GET /v1/models/{id}`, and the one entry of the list.
pub fn model(id: &str, created: u64) -> Value {
    json!({"id": id, "object": "model", "created": created, "owned_by": "qfilters"})
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d() -> Defaults {
        Defaults {
            sampling: crate::args::SamplingArgs::default().params(42).unwrap(),
            max_tokens_cap: 100,
            n_vocab: 1000,
        }
    }

    fn chat(body: &str) -> Result<Request, ApiError> {
        parse_chat(body.as_bytes(), &d())
    }

    #[test]
    fn a_chat_request_is_parsed_with_defaults_and_unknown_fields_ignored() {
        let r = chat(r#"{"model":"x","messages":[{"role":"system","content":"s"},{"role":"user","content":"hi"}],"frequency_penalty":0,"logit_bias":{},"user":"u"}"#).unwrap();
        assert_eq!(
            r.input,
            Input::Chat(vec![
                ("system".into(), "s".into()),
                ("user".into(), "hi".into())
            ])
        );
        assert_eq!(r.params.max_tokens, 100);
        let s = d().sampling;
        assert_eq!(r.params.sampling.temperature, s.temperature);
        assert_eq!(r.params.sampling.seed, s.seed);
        assert!(!r.params.stream);
        assert!(r.params.stop.is_empty());
    }

    #[test]
    fn parameters_are_applied_and_max_tokens_capped() {
        let r = chat(r#"{"messages":[{"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]}],
            "max_tokens":5000,"temperature":0.7,"top_p":0.5,"seed":7,"stop":"\n","stream":true}"#)
        .unwrap();
        assert_eq!(r.input, Input::Chat(vec![("user".into(), "ab".into())]));
        assert_eq!(r.params.max_tokens, 100);
        assert_eq!(r.params.sampling.temperature, 0.7);
        assert_eq!(r.params.sampling.top_p, 0.5);
        assert_eq!(r.params.sampling.seed, 7);
        assert_eq!(r.params.stop, vec!["\n".to_string()]);
        assert!(r.params.stream);
        let r = chat(r#"{"messages":[{"role":"user","content":"x"}],"max_completion_tokens":3,"stop":["a","b"]}"#).unwrap();
        assert_eq!(r.params.max_tokens, 3);
        assert_eq!(r.params.stop.len(), 2);
    }

    #[test]
    fn malformed_or_mistyped_bodies_are_400_with_a_message() {
        for (body, needle) in [
            ("{", "not valid JSON"),
            ("[]", "must be a JSON object"),
            (r#"{"messages":"hi"}"#, "messages must be an array"),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"max_tokens":"5"}"#,
                "max_tokens must be a whole number",
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"temperature":true}"#,
                "temperature must be a number",
            ),
            (
                r#"{"messages":[{"role":"user","content":5}]}"#,
                "messages[0].content must be a string",
            ),
            (
                r#"{"messages":[{"role":"user","content":[{"type":"text"}]}]}"#,
                "without a string `text`",
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"stop":[1]}"#,
                "stop must be a string or an array of strings",
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"tools":[{"type":"function"}]}"#,
                "tools[0].function.name",
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"response_format":{"type":"json_schema","json_schema":{"schema":{"type":"string","pattern":"a+"}}}}"#,
                "response_format.json_schema.schema: the schema keyword pattern is not supported",
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"response_format":{"type":"yaml"}}"#,
                "'yaml'",
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"functions":[{"name":"f"}]}"#,
                "functions is not supported",
            ),
            (r#"{"messages":[]}"#, "empty"),
            (
                r#"{"messages":[{"role":"function","content":"x"}]}"#,
                "role 'function'",
            ),
            (
                r#"{"messages":[{"role":"user","content":[{"type":"image_url"}]}]}"#,
                "image_url",
            ),
            (
                r#"{"messages":[{"role":"user","content":"a\u0000b"}]}"#,
                "NUL",
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"max_tokens":0}"#,
                "at least 1",
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"temperature":-1}"#,
                "temperature",
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"presence_penalty":2.5}"#,
                "presence_penalty",
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"logit_bias":{"1000":1}}"#,
                "not in the vocabulary",
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"logit_bias":{"5":101}}"#,
                "-100 to 100",
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"logit_bias":{"a":1}}"#,
                "not a token id",
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"top_p":0}"#,
                "top_p",
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"stop":["a","b","c","d","e"]}"#,
                "at most 4",
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"stop":""}"#,
                "empty",
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"n":2}"#,
                "one choice",
            ),
        ] {
            let e = chat(body).unwrap_err();
            assert_eq!(e.status, 400, "{body}");
            assert_eq!(e.kind, "invalid_request_error");
            assert!(e.message.contains(needle), "{body}: {}", e.message);
            for rust in ["enum", "struct", "i64", "OneOrMany", "variant"] {
                assert!(!e.message.contains(rust), "{body}: {}", e.message);
            }
            assert_eq!(e.body()["error"]["message"], e.message);
        }
    }

    #[test]
    fn response_format_sets_a_grammar_and_tools_take_the_jinja_path() {
        let r = chat(
            r#"{"messages":[{"role":"user","content":"x"}],"response_format":{"type":"text"}}"#,
        )
        .unwrap();
        assert!(r.params.sampling.grammar.is_none());
        let r = chat(r#"{"messages":[{"role":"user","content":"x"}],"response_format":{"type":"json_object"}}"#).unwrap();
        assert!(r
            .params
            .sampling
            .grammar
            .unwrap()
            .starts_with("root ::= object"));
        let r = chat(r#"{"messages":[{"role":"user","content":"x"}],"response_format":{"type":"json_schema","json_schema":{"name":"n","strict":true,"schema":{"type":"object","properties":{"a":{"type":"integer"}},"required":["a"]}}}}"#).unwrap();
        assert!(r
            .params
            .sampling
            .grammar
            .unwrap()
            .contains(r#""\"a\"" ws ":" ws integer"#));
        let r = chat(r#"{"messages":[{"role":"user","content":"x"}],"tools":[{"type":"function","function":{"name":"f"}}]}"#).unwrap();
        assert!(matches!(r.input, Input::Tools(_)));
        let r = chat(r#"{"messages":[{"role":"user","content":"x"}],"tools":[{"type":"function","function":{"name":"f"}}],"tool_choice":"none"}"#).unwrap();
        assert!(matches!(r.input, Input::Chat(_)));
        let e = chat(r#"{"messages":[{"role":"tool","content":"a\u0000b"}]}"#).unwrap_err();
        assert!(e.message.contains("NUL"), "{}", e.message);
    }

    #[test]
    fn completions_take_one_prompt() {
        let r = parse_completion(br#"{"prompt":"Once","max_tokens":2}"#, &d()).unwrap();
        assert_eq!(r.input, Input::Text("Once".into()));
        assert_eq!(r.params.max_tokens, 2);
        let r = parse_completion(br#"{"prompt":["Once"]}"#, &d()).unwrap();
        assert_eq!(r.input, Input::Text("Once".into()));
        for body in [
            r#"{"prompt":["a","b"]}"#,
            r#"{"prompt":""}"#,
            r#"{"prompt":5}"#,
            r#"{}"#,
        ] {
            assert_eq!(
                parse_completion(body.as_bytes(), &d()).unwrap_err().status,
                400,
                "{body}"
            );
        }
    }

    #[test]
    fn responses_carry_usage_and_the_qfilters_object() {
        let m = Meta {
            id: "chatcmpl-1".into(),
            created: 1,
            model: "m".into(),
        };
        let r = Report {
            prompt_tokens: 10,
            completion_tokens: 3,
            budget: Some(128),
            live_cells: 13,
            peak_cells: 13,
            evicted: 0,
            prompt_tokens_decoded: 4,
            slot: 1,
            reused: true,
        };
        let v = response(Endpoint::Chat, &m, "hey", "stop", &r);
        assert_eq!(v["choices"][0]["message"]["content"], "hey");
        assert_eq!(v["usage"]["total_tokens"], 13);
        assert_eq!(v["qfilters"]["prompt_tokens_decoded"], 4);
        assert_eq!(v["qfilters"]["budget"], 128);
        let c = chunk(Endpoint::Chat, &m, Some("a"), true, None);
        assert_eq!(c["choices"][0]["delta"]["role"], "assistant");
        assert!(c["choices"][0]["finish_reason"].is_null());
        let c = chunk(Endpoint::Chat, &m, None, false, Some(("length", &r)));
        assert_eq!(c["choices"][0]["finish_reason"], "length");
        assert!(c.get("usage").is_none());
        let u = usage_chunk(Endpoint::Chat, &m, &r);
        assert_eq!(u["choices"], json!([]));
        assert_eq!(u["usage"]["completion_tokens"], 3);
    }
}
