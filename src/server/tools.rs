//! Tool calling: `tools`, `tool_choice`, assistant `tool_calls` and `role: "tool"` messages.
//!
//! Such a conversation is rendered by the model's own Jinja template
//! ([`crate::conversation::jinja`]), since llama.cpp's built-in formatter cannot render tools,
//! and the reply is parsed back into `tool_calls` by the template's family:
//!
//! - [`Family::Hermes`]: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, as many
//!   as the model writes (Qwen2.5, Qwen3, Hermes 2/3 templates);
//! - [`Family::Llama3`]: the reply is one JSON object `{"name": ..., "parameters": {...}}`
//!   (Llama 3.1/3.2/3.3 templates, custom tools).
//!
//! A template that does not render the tools it is given (SmolLM2's, for one) is refused with
//! a 400, as is one whose calls this server cannot parse. `tool_choice: "required"` or a named
//! function constrains the reply with a grammar (src/server/grammar.rs) to one call.

use serde_json::{json, Value};

use super::api::{content_text, ApiError};
use super::grammar;
use crate::conversation::chat::Segment;
use crate::conversation::jinja::{Context, Template};
use crate::error::{Error, Result};
use crate::ffi::Model;

/// What the client allows the model to do with its tools.
#[derive(Debug, Clone, PartialEq)]
pub enum Choice {
    /// `auto` (the default): the model answers or calls.
    Auto,
    /// `none`: the tools are not shown to the model.
    None,
    /// `required`: one call to any tool.
    Required,
    /// `{"type": "function", "function": {"name": ...}}`: one call to that tool.
    Named(String),
}

/// A chat request with tools or tool messages, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolChat {
    /// OpenAI message objects, normalized: `content` a string or null, tool calls'
    /// `arguments` parsed into JSON (templates write them with `tojson`), tool results named.
    pub messages: Vec<Value>,
    /// `{"type": "function", "function": {...}}` objects, as given.
    pub tools: Vec<Value>,
    pub choice: Choice,
    /// `parallel_tool_calls` (default true): false keeps the reply's first call only.
    pub parallel: bool,
}

/// How a template family writes a tool call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Hermes,
    Llama3,
}

type Object = serde_json::Map<String, Value>;

fn bad(message: impl Into<String>, param: &'static str) -> ApiError {
    ApiError::bad_request(message, Some(param))
}

/// The request's tool conversation, or `None` when it has no tools to offer and no tool
/// messages (then it is a plain chat). `tool_choice: "none"` with no tool messages is plain.
pub fn parse(m: &Object, list: &[Value]) -> std::result::Result<Option<ToolChat>, ApiError> {
    let tools = match m.get("tools") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a.clone(),
        Some(_) => return Err(bad("tools must be an array of tools", "tools")),
    };
    let mut names = Vec::with_capacity(tools.len());
    for (i, t) in tools.iter().enumerate() {
        if t.get("type").and_then(Value::as_str) != Some("function") {
            return Err(bad(format!("tools[{i}].type must be 'function'"), "tools"));
        }
        let f = t.get("function").and_then(Value::as_object);
        let name = f.and_then(|f| f.get("name")).and_then(Value::as_str);
        let Some(name) = name.filter(|n| !n.is_empty()) else {
            return Err(bad(
                format!("tools[{i}].function.name must be a non-empty string"),
                "tools",
            ));
        };
        if let Some(p) = f.and_then(|f| f.get("parameters")) {
            if !p.is_object() {
                return Err(bad(
                    format!("tools[{i}].function.parameters must be a JSON Schema object"),
                    "tools",
                ));
            }
        }
        names.push(name.to_string());
    }
    let choice = match m.get("tool_choice") {
        None | Some(Value::Null) => Choice::Auto,
        Some(Value::String(s)) => match s.as_str() {
            "auto" => Choice::Auto,
            "none" => Choice::None,
            "required" => Choice::Required,
            other => {
                return Err(bad(
                    format!(
                        "tool_choice '{other}' is not one of none, auto, required, or a function"
                    ),
                    "tool_choice",
                ))
            }
        },
        Some(v) => {
            let name = v
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .filter(|_| v.get("type").and_then(Value::as_str) == Some("function"));
            match name {
                Some(n) if names.iter().any(|x| x == n) => Choice::Named(n.to_string()),
                Some(n) => {
                    return Err(bad(
                        format!("tool_choice names '{n}', which is not in tools"),
                        "tool_choice",
                    ))
                }
                None => {
                    return Err(bad(
                        "tool_choice must be none, auto, required, or {\"type\": \"function\", \"function\": {\"name\": ...}}",
                        "tool_choice",
                    ))
                }
            }
        }
    };
    if tools.is_empty() && matches!(choice, Choice::Required | Choice::Named(_)) {
        return Err(bad(
            "tool_choice requires a call, but tools is empty",
            "tool_choice",
        ));
    }
    // Any `tool_calls` but an empty array or null takes this path, where it is validated.
    let has_tool_messages = list.iter().any(|msg| {
        msg.get("role").and_then(Value::as_str) == Some("tool")
            || msg
                .get("tool_calls")
                .is_some_and(|c| !c.is_null() && c.as_array().is_none_or(|a| !a.is_empty()))
    });
    let offered = !tools.is_empty() && choice != Choice::None;
    if !offered && !has_tool_messages {
        return Ok(None);
    }
    let parallel = match m.get("parallel_tool_calls") {
        None | Some(Value::Null) => true,
        Some(Value::Bool(b)) => *b,
        Some(_) => {
            return Err(bad(
                "parallel_tool_calls must be true or false",
                "parallel_tool_calls",
            ))
        }
    };
    let messages = messages(list)?;
    Ok(Some(ToolChat {
        messages,
        tools: if choice == Choice::None {
            Vec::new()
        } else {
            tools
        },
        choice,
        parallel,
    }))
}

fn messages(list: &[Value]) -> std::result::Result<Vec<Value>, ApiError> {
    let mut out = Vec::with_capacity(list.len());
    // Tool call id to function name, to name tool results (some templates show the name).
    let mut called: Vec<(String, String)> = Vec::new();
    for (i, msg) in list.iter().enumerate() {
        let Some(role) = msg.get("role").and_then(Value::as_str) else {
            return Err(bad(
                format!("messages[{i}] must be an object with a string `role`"),
                "messages",
            ));
        };
        let role = match role {
            "system" | "developer" => "system",
            "user" | "assistant" | "tool" => role,
            other => {
                return Err(bad(
                    format!("messages[{i}].role '{other}' is not one of system, developer, user, assistant, tool"),
                    "messages",
                ))
            }
        };
        let text = content_text(msg.get("content"), i)?;
        let mut o = json!({"role": role, "content": if text.is_empty() { Value::Null } else { Value::String(text) }});
        if role == "assistant" {
            if let Some(calls) = msg.get("tool_calls").filter(|v| !v.is_null()) {
                let Some(calls) = calls.as_array() else {
                    return Err(bad(
                        format!("messages[{i}].tool_calls must be an array"),
                        "messages",
                    ));
                };
                let mut norm = Vec::with_capacity(calls.len());
                for (j, c) in calls.iter().enumerate() {
                    let f = c.get("function");
                    let name = f.and_then(|f| f.get("name")).and_then(Value::as_str);
                    let args = f.and_then(|f| f.get("arguments"));
                    let (Some(name), Some(args)) = (name, args) else {
                        return Err(bad(
                            format!("messages[{i}].tool_calls[{j}] needs function.name and function.arguments"),
                            "messages",
                        ));
                    };
                    // OpenAI sends the arguments as a JSON string; templates expect the object.
                    let args = match args {
                        Value::String(s) => serde_json::from_str::<Value>(s)
                            .ok()
                            .filter(Value::is_object)
                            .unwrap_or_else(|| args.clone()),
                        other => other.clone(),
                    };
                    let id = c
                        .get("id")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_string();
                    called.push((id.clone(), name.to_string()));
                    norm.push(json!({"id": id, "type": "function", "function": {"name": name, "arguments": args}}));
                }
                o["tool_calls"] = Value::Array(norm);
            }
        }
        if role == "tool" {
            let id = msg
                .get("tool_call_id")
                .and_then(Value::as_str)
                .unwrap_or("");
            o["tool_call_id"] = json!(id);
            let name = msg
                .get("name")
                .and_then(Value::as_str)
                .map(str::to_string)
                .or_else(|| {
                    called
                        .iter()
                        .rev()
                        .find(|(c, _)| c == id)
                        .map(|(_, n)| n.clone())
                });
            if let Some(n) = name {
                o["name"] = json!(n);
            }
        }
        out.push(o);
    }
    Ok(out)
}

/// The family of the model's template, from the markers its source writes.
pub fn family(source: &str) -> Option<Family> {
    if source.contains("<tool_call>") {
        Some(Family::Hermes)
    } else if source.contains("<|python_tag|>") || source.contains("ipython") {
        Some(Family::Llama3)
    } else {
        None
    }
}

/// The model's template, with tool support checked: a template must render the tools it is
/// given, and write calls in a family this server parses.
pub fn template(model: &Model) -> Result<(Template, Family)> {
    let Some(source) = model.chat_template() else {
        return Err(Error::Template(
            "the model has no chat template (tokenizer.chat_template), so it cannot be given tools"
                .into(),
        ));
    };
    let t = Template::new(&source)?;
    let probe_name = "qfilters_probe_tool";
    let probe = [
        json!({"type": "function", "function": {"name": probe_name, "description": "probe", "parameters": {"type": "object", "properties": {}}}}),
    ];
    let ctx = Context {
        tools: Some(&probe),
        bos_token: "",
        eos_token: "",
    };
    let rendered = t.render(&[json!({"role": "user", "content": "hi"})], &ctx)?;
    if !rendered.contains(probe_name) {
        return Err(Error::Template(
            "the model's chat template does not render tools: this model cannot be given tools, tool calls or tool results".into(),
        ));
    }
    let family = family(&source).ok_or_else(|| {
        Error::Template(
            "the model's chat template renders tools, but this server cannot parse its tool calls (it parses Qwen2.5/Hermes <tool_call> and Llama 3 JSON calls)".into(),
        )
    })?;
    Ok((t, family))
}

/// The prompt of a tool conversation as segments; every string the client gave outside
/// message contents (tool definitions, calls) is refused if it holds a control token's text,
/// since it is tokenized as template text.
pub fn segments(model: &Model, chat: &ToolChat) -> Result<Vec<Segment>> {
    let (t, _) = template(model)?;
    for (what, v) in chat.tools.iter().map(|t| ("tools", t)).chain(
        chat.messages
            .iter()
            .filter_map(|m| m.get("tool_calls").map(|c| ("tool_calls", c))),
    ) {
        let text = v.to_string();
        if model.tokenize(&text, false, true)? != model.tokenize(&text, false, false)? {
            return Err(Error::Template(format!(
                "{what} contains the text of a control token of the model"
            )));
        }
    }
    let special = |t: Option<crate::ffi::Token>| {
        t.map(|t| String::from_utf8_lossy(&model.token_bytes(t, true)).into_owned())
            .unwrap_or_default()
    };
    let bos = special(model.bos());
    let eos = special(model.eos());
    let ctx = Context {
        tools: (!chat.tools.is_empty()).then_some(&chat.tools[..]),
        bos_token: &bos,
        eos_token: &eos,
    };
    t.segments(&chat.messages, &ctx)
}

/// The grammar of a reply that is one call, to `only` or to any of `tools`.
pub fn call_grammar(
    family: Family,
    tools: &[Value],
    only: Option<&str>,
) -> std::result::Result<String, ApiError> {
    let args_key = match family {
        Family::Hermes => "arguments",
        Family::Llama3 => "parameters",
    };
    let mut alts = Vec::new();
    for t in tools {
        let f = &t["function"];
        let name = f["name"].as_str().unwrap_or_default();
        if only.is_some_and(|o| o != name) {
            continue;
        }
        let params = f
            .get("parameters")
            .cloned()
            .unwrap_or_else(|| json!({"type": "object", "properties": {}}));
        alts.push(json!({
            "type": "object",
            "properties": {"name": {"const": name}, args_key: params},
            "required": ["name", args_key],
            "$defs": params.get("$defs").cloned().unwrap_or(json!({})),
        }));
    }
    // `$defs` of each tool is reachable at the root for its `$ref`s only when there is one
    // tool; several tools each with `$defs` would clash.
    let schema = match alts.len() {
        1 => {
            let mut one = alts.remove(0);
            let defs = one["$defs"].take();
            if let Some(o) = one.as_object_mut() {
                o.remove("$defs");
                if defs.as_object().is_some_and(|d| !d.is_empty()) {
                    o.insert("$defs".into(), defs);
                }
            }
            one
        }
        _ => {
            for a in &mut alts {
                if let Some(o) = a.as_object_mut() {
                    o.remove("$defs");
                }
            }
            json!({"anyOf": alts})
        }
    };
    let g = match family {
        Family::Hermes => grammar::wrapped("<tool_call>\n", &schema, "\n</tool_call>"),
        Family::Llama3 => grammar::wrapped("", &schema, ""),
    };
    g.map_err(|e| {
        bad(
            format!(
                "the tool's parameters cannot constrain a required call: {}",
                e.0
            ),
            "tools",
        )
    })
}

/// How a reply is read back when the model was offered tools.
#[derive(Debug, Clone)]
pub struct ReplyFormat {
    pub family: Family,
    pub parallel: bool,
    /// The offered tools' names: a reply of bare JSON calls counts only when it names them.
    pub names: Vec<String>,
}

impl ReplyFormat {
    /// The reply's text and calls, the calls cut to one without `parallel_tool_calls`.
    pub fn split(&self, text: &str) -> (String, Vec<Call>) {
        let (text, mut calls) = parse_reply(self.family, text, &self.names);
        if !self.parallel {
            calls.truncate(1);
        }
        (text, calls)
    }
}

/// Sets up a tool request once its template is known: the grammar of a required call (into
/// `grammar`), and how to read the reply (`None`: no tools offered, plain text).
pub fn setup(
    chat: &ToolChat,
    family: Family,
    grammar: &mut Option<String>,
) -> std::result::Result<Option<ReplyFormat>, ApiError> {
    if chat.tools.is_empty() {
        return Ok(None);
    }
    match &chat.choice {
        Choice::Required => *grammar = Some(call_grammar(family, &chat.tools, None)?),
        Choice::Named(n) => *grammar = Some(call_grammar(family, &chat.tools, Some(n))?),
        Choice::Auto | Choice::None => {}
    }
    let names = chat
        .tools
        .iter()
        .filter_map(|t| t["function"]["name"].as_str().map(str::to_string))
        .collect();
    Ok(Some(ReplyFormat {
        family,
        parallel: chat.parallel,
        names,
    }))
}

/// A call parsed from the reply: name and arguments (a JSON text, as OpenAI sends them).
#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    pub name: String,
    pub arguments: String,
}

/// Splits a reply into its text and its tool calls. Text that looks like a call but does not
/// parse stays text: the client sees what the model wrote. A reply that is nothing but JSON
/// calls to the offered tools (`names`) is calls too: the Hermes tags are control tokens in
/// some vocabularies (Qwen2.5-Coder's), and the reply's text is detokenized without them.
pub fn parse_reply(family: Family, text: &str, names: &[String]) -> (String, Vec<Call>) {
    let call = |v: &Value, key: &str| -> Option<Call> {
        let name = v.get("name")?.as_str()?.to_string();
        let args = v
            .get(key)
            .or_else(|| v.get("arguments"))
            .cloned()
            .unwrap_or(json!({}));
        let arguments = match args {
            Value::String(s) => s,
            other => other.to_string(),
        };
        Some(Call { name, arguments })
    };
    let key = match family {
        Family::Hermes => "arguments",
        Family::Llama3 => "parameters",
    };
    // The whole reply as JSON values back to back, each a call to an offered tool.
    let bare = || -> Option<Vec<Call>> {
        let t = text.trim().trim_start_matches("<|python_tag|>");
        if !t.starts_with('{') {
            return None;
        }
        let mut calls = Vec::new();
        for v in serde_json::Deserializer::from_str(t).into_iter::<Value>() {
            let c = call(&v.ok()?, key)?;
            if !names.contains(&c.name) {
                return None;
            }
            calls.push(c);
        }
        Some(calls)
    };
    if let Some(calls) = bare() {
        return (String::new(), calls);
    }
    match family {
        Family::Hermes => {
            let mut rest = String::new();
            let mut calls = Vec::new();
            let mut s = text;
            while let Some(start) = s.find("<tool_call>") {
                let after = &s[start + "<tool_call>".len()..];
                let (inner, next) = match after.find("</tool_call>") {
                    Some(end) => (&after[..end], &after[end + "</tool_call>".len()..]),
                    // Cut by the token limit or a stop: what came is parsed if it is whole.
                    None => (after, ""),
                };
                match serde_json::from_str::<Value>(inner.trim())
                    .ok()
                    .and_then(|v| call(&v, "arguments"))
                {
                    Some(c) => {
                        rest.push_str(&s[..start]);
                        calls.push(c);
                    }
                    // Kept as written, closing tag included.
                    None => rest.push_str(&s[..s.len() - next.len()]),
                }
                s = next;
            }
            rest.push_str(s);
            let rest = if calls.is_empty() {
                rest
            } else {
                rest.trim().to_string()
            };
            (rest, calls)
        }
        Family::Llama3 => (text.to_string(), Vec::new()),
    }
}

/// Puts a parsed reply into a choice's `message` (or stream `delta`): its text, null when
/// empty and calls were made, the calls with ids, and finish reason `tool_calls`.
pub fn set_calls(choice: &mut Value, field: &str, content: &str, calls: &[Call], id: &str) {
    let m = &mut choice[field];
    m["content"] = if content.is_empty() && !calls.is_empty() {
        Value::Null
    } else {
        json!(content)
    };
    if !calls.is_empty() {
        let mut list = tool_calls_json(calls, id);
        if field == "delta" {
            // Stream deltas index their calls.
            if let Some(a) = list.as_array_mut() {
                for (i, c) in a.iter_mut().enumerate() {
                    c["index"] = json!(i);
                }
            }
        }
        m["tool_calls"] = list;
        if field == "message" {
            choice["finish_reason"] = json!("tool_calls");
        }
    }
}

/// The `tool_calls` array of a response message.
pub fn tool_calls_json(calls: &[Call], id: &str) -> Value {
    Value::Array(
        calls
            .iter()
            .enumerate()
            .map(|(i, c)| {
                json!({
                    "id": format!("call_{id}_{i}"),
                    "type": "function",
                    "function": {"name": c.name, "arguments": c.arguments},
                })
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(v: Value) -> Object {
        v.as_object().unwrap().clone()
    }

    fn weather() -> Value {
        json!({"type": "function", "function": {"name": "get_weather", "parameters": {
            "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}})
    }

    #[test]
    fn tool_requests_are_parsed_and_messages_normalized() {
        let list = vec![
            json!({"role": "user", "content": "weather?"}),
            json!({"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]}),
            json!({"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": "sunny"}]}),
        ];
        let m = obj(json!({"tools": [weather()]}));
        let c = parse(&m, &list).unwrap().unwrap();
        assert_eq!(c.choice, Choice::Auto);
        assert_eq!(
            c.messages[1]["tool_calls"][0]["function"]["arguments"],
            json!({"city": "Paris"})
        );
        assert_eq!(c.messages[2]["name"], "get_weather");
        assert_eq!(c.messages[2]["content"], "sunny");
        // No tools and no tool messages: a plain chat; tool_choice none hides the tools.
        assert!(parse(&obj(json!({})), &list[..1]).unwrap().is_none());
        assert!(parse(
            &obj(json!({"tools": [weather()], "tool_choice": "none"})),
            &list[..1]
        )
        .unwrap()
        .is_none());
        let named = obj(
            json!({"tools": [weather()], "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}),
        );
        assert_eq!(
            parse(&named, &list[..1]).unwrap().unwrap().choice,
            Choice::Named("get_weather".into())
        );
    }

    #[test]
    fn malformed_tool_requests_are_400_naming_the_field() {
        let user = [json!({"role": "user", "content": "x"})];
        for (m, needle) in [
            (json!({"tools": {}}), "tools must be an array"),
            (json!({"tools": [{"type": "retrieval"}]}), "tools[0].type"),
            (
                json!({"tools": [{"type": "function", "function": {}}]}),
                "function.name",
            ),
            (
                json!({"tools": [{"type": "function", "function": {"name": "f", "parameters": 3}}]}),
                "parameters",
            ),
            (
                json!({"tools": [weather()], "tool_choice": "sometimes"}),
                "sometimes",
            ),
            (
                json!({"tools": [weather()], "tool_choice": {"type": "function", "function": {"name": "g"}}}),
                "'g'",
            ),
            (json!({"tool_choice": "required"}), "tools is empty"),
        ] {
            let e = parse(&obj(m.clone()), &user).unwrap_err();
            assert_eq!(e.status, 400);
            assert!(e.message.contains(needle), "{m}: {}", e.message);
        }
        let not_a_list = [json!({"role": "assistant", "tool_calls": {"a": 1}})];
        assert!(parse(&obj(json!({})), &not_a_list)
            .unwrap_err()
            .message
            .contains("tool_calls must be an array"));
        let bad_call = [json!({"role": "assistant", "tool_calls": [{"function": {"name": "f"}}]})];
        assert!(parse(&obj(json!({})), &bad_call)
            .unwrap_err()
            .message
            .contains("function.arguments"));
        let bad_role = [
            json!({"role": "tool", "content": "x"}),
            json!({"role": "robot"}),
        ];
        assert!(parse(&obj(json!({})), &bad_role)
            .unwrap_err()
            .message
            .contains("'robot'"));
    }

    #[test]
    fn hermes_calls_are_parsed_out_of_the_reply() {
        let names = ["get_weather".to_string(), "f".to_string()];
        let (text, calls) = parse_reply(
            Family::Hermes,
            "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"f\", \"arguments\": {}}\n</tool_call>",
            &[],
        );
        assert_eq!(text, "Let me check.");
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0].name, "get_weather");
        assert_eq!(
            serde_json::from_str::<Value>(&calls[0].arguments).unwrap(),
            json!({"city": "Paris"})
        );
        // Broken JSON stays text; plain answers have no calls.
        let (text, calls) = parse_reply(Family::Hermes, "<tool_call>{oops</tool_call> hi", &names);
        assert!(calls.is_empty());
        assert_eq!(text, "<tool_call>{oops</tool_call> hi");
        assert_eq!(
            parse_reply(Family::Hermes, "It is sunny.", &names).0,
            "It is sunny."
        );
        // Tags lost to detokenization: bare JSON calls to offered tools, and only those.
        let bare = "{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n{\"name\": \"f\", \"arguments\": {}}";
        let (text, calls) = parse_reply(Family::Hermes, bare, &names);
        assert_eq!((text.as_str(), calls.len()), ("", 2));
        assert!(parse_reply(Family::Hermes, bare, &names[..1]).1.is_empty());
        assert!(
            parse_reply(Family::Hermes, "{\"name\": \"f\"} and more", &names)
                .1
                .is_empty()
        );
    }

    #[test]
    fn llama3_calls_are_one_json_object() {
        let names = ["get_weather".to_string()];
        let (text, calls) = parse_reply(
            Family::Llama3,
            " {\"name\": \"get_weather\", \"parameters\": {\"city\": \"Oslo\"}}",
            &names,
        );
        assert_eq!(text, "");
        assert_eq!(
            calls,
            vec![Call {
                name: "get_weather".into(),
                arguments: "{\"city\":\"Oslo\"}".into()
            }]
        );
        assert!(parse_reply(Family::Llama3, "{\"answer\": 1}", &names)
            .1
            .is_empty());
        assert_eq!(family("... <|python_tag|> ..."), Some(Family::Llama3));
        assert_eq!(family("{{ '<tool_call>' }}"), Some(Family::Hermes));
        assert_eq!(family("{{ messages }}"), None);
    }

    #[test]
    fn a_required_call_has_a_grammar_over_the_tools() {
        let g = call_grammar(Family::Hermes, &[weather()], None).unwrap();
        assert!(
            g.starts_with("root ::= \"<tool_call>\\n\" json \"\\n</tool_call>\""),
            "{g}"
        );
        assert!(g.contains(r#""\"get_weather\"""#), "{g}");
        let two = [
            weather(),
            json!({"type": "function", "function": {"name": "now"}}),
        ];
        let g = call_grammar(Family::Llama3, &two, Some("now")).unwrap();
        assert!(
            g.contains(r#""\"parameters\"""#) && !g.contains("get_weather"),
            "{g}"
        );
        let bad = [
            json!({"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"x": {"type": "string", "pattern": "a"}}}}}),
        ];
        assert!(call_grammar(Family::Hermes, &bad, None)
            .unwrap_err()
            .message
            .contains("pattern"));
    }
}
