//! The model's own Jinja chat template (GGUF `tokenizer.chat_template`), rendered with
//! minijinja for what llama.cpp's built-in formatter cannot render: tools, assistant tool
//! calls and tool results. Plain conversations keep [`super::chat::ChatTemplate`].
//!
//! The environment is set up as Hugging Face renders these templates (trim_blocks,
//! lstrip_blocks, loop controls, Python string methods, `raise_exception`, a `tojson` that
//! writes `json.dumps`'s separators), so the prompt is the one the model was tuned on.
//! Message contents are split out as [`Segment`]s exactly as [`super::chat::ChatTemplate::segments`]
//! does: rendered once with random placeholders, once with the real text, and the two checked
//! to agree, so no content is ever tokenized as template text.

use minijinja::value::{Kwargs, Value as JValue};
use minijinja::{Environment, ErrorKind};
use serde_json::Value;

use super::chat::{sentinel, sentinel_base, Segment};
use crate::error::{Error, Result};

/// What the template is given besides the messages.
pub struct Context<'a> {
    pub tools: Option<&'a [Value]>,
    pub bos_token: &'a str,
    pub eos_token: &'a str,
}

/// `json.dumps(value, indent=...)` as Python writes it: `", "` and `": "` between items
/// (newlines and the indent with `indent`), non-ASCII kept.
fn tojson(value: &JValue, kwargs: Kwargs) -> std::result::Result<JValue, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    kwargs.assert_all_used()?;
    let v: Value = serde_json::to_value(value)
        .map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    let mut out = Vec::new();
    let written = match indent {
        Some(n) => {
            let pad = vec![b' '; n];
            let f = serde_json::ser::PrettyFormatter::with_indent(&pad);
            let mut ser = serde_json::Serializer::with_formatter(&mut out, f);
            serde::Serialize::serialize(&v, &mut ser)
        }
        None => {
            let mut ser = serde_json::Serializer::with_formatter(&mut out, PyCompact);
            serde::Serialize::serialize(&v, &mut ser)
        }
    };
    written
        .map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    Ok(JValue::from_safe_string(
        String::from_utf8_lossy(&out).into_owned(),
    ))
}

/// serde_json's compact output with Python's default separators.
struct PyCompact;

impl serde_json::ser::Formatter for PyCompact {
    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(b", ")
        }
    }

    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(b", ")
        }
    }

    fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        w.write_all(b": ")
    }
}

/// A JSON value as a template value (maps keep serde_json's key order).
fn to_jinja(v: &Value) -> JValue {
    match v {
        Value::Null => JValue::from(()),
        Value::Bool(b) => JValue::from(*b),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                JValue::from(i)
            } else if let Some(u) = n.as_u64() {
                JValue::from(u)
            } else {
                JValue::from(n.as_f64().unwrap_or(f64::NAN))
            }
        }
        Value::String(s) => JValue::from(s.as_str()),
        Value::Array(a) => JValue::from(a.iter().map(to_jinja).collect::<Vec<_>>()),
        Value::Object(o) => JValue::from_pairs(o.iter().map(|(k, v)| (k.as_str(), to_jinja(v)))),
    }
}

fn raise_exception(message: String) -> std::result::Result<JValue, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
}

/// A compiled template.
pub struct Template {
    env: Environment<'static>,
}

impl Template {
    pub fn new(source: &str) -> Result<Template> {
        let mut env = Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| Error::Template(format!("the Jinja syntax settings: {e}")))?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_filter("tojson", tojson);
        env.add_function("raise_exception", raise_exception);
        // Bounds what a hostile or broken template can do to the server: no template of a
        // real model comes near it.
        env.set_recursion_limit(64);
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| {
                Error::Template(format!("the model's chat template does not compile: {e}"))
            })?;
        Ok(Template { env })
    }

    /// The template's text for `messages` (OpenAI message objects, `arguments` of tool calls
    /// as JSON objects), with the assistant header appended.
    pub fn render(&self, messages: &[Value], ctx: &Context) -> Result<String> {
        let t = self
            .env
            .get_template("chat")
            .map_err(|e| Error::Template(e.to_string()))?;
        let mut vars = serde_json::Map::new();
        vars.insert("messages".into(), Value::Array(messages.to_vec()));
        if let Some(tools) = ctx.tools {
            vars.insert("tools".into(), Value::Array(tools.to_vec()));
        }
        vars.insert("add_generation_prompt".into(), Value::Bool(true));
        vars.insert("bos_token".into(), Value::String(ctx.bos_token.into()));
        vars.insert("eos_token".into(), Value::String(ctx.eos_token.into()));
        t.render(to_jinja(&Value::Object(vars)))
            .map_err(|e| Error::Template(format!("the model's chat template failed: {e}")))
    }

    /// The conversation as template text and message contents: each non-empty string
    /// `content` becomes a content segment (tokenized as plain text), everything else is
    /// template text. An error when the template does not place each content once and
    /// verbatim (or trimmed of whitespace at its ends).
    pub fn segments(&self, messages: &[Value], ctx: &Context) -> Result<Vec<Segment>> {
        let contents: Vec<Option<&str>> = messages
            .iter()
            .map(|m| {
                m.get("content")
                    .and_then(Value::as_str)
                    .filter(|s| !s.is_empty())
            })
            .collect();
        let real = self.render(messages, ctx)?;
        let mut avoid: Vec<&str> = contents.iter().flatten().copied().collect();
        avoid.push(&real);
        let base = sentinel_base(&avoid);
        let mut placed = messages.to_vec();
        for (i, c) in contents.iter().enumerate() {
            if c.is_some() {
                placed[i]["content"] = Value::String(sentinel(&base, i));
            }
        }
        let rendered = self.render(&placed, ctx)?;
        let unsafe_split = || {
            Error::Template(
                "the model's chat template does not place each message exactly once: qfilters cannot tokenize it safely".into(),
            )
        };
        let n = contents.iter().flatten().count();
        if rendered.matches(base.as_str()).count() != n {
            return Err(unsafe_split());
        }
        // Each content as given, else trimmed as templates that `| trim` contents do.
        for trim in [false, true] {
            let mut segments = Vec::with_capacity(2 * n + 1);
            let mut cursor = 0;
            for (i, c) in contents.iter().enumerate() {
                let Some(c) = c else { continue };
                let s = sentinel(&base, i);
                let at = rendered[cursor..]
                    .find(&s)
                    .map(|p| cursor + p)
                    .ok_or_else(unsafe_split)?;
                segments.push(Segment {
                    text: rendered[cursor..at].to_string(),
                    content: false,
                });
                let text = if trim { c.trim() } else { c };
                segments.push(Segment {
                    text: text.to_string(),
                    content: true,
                });
                cursor = at + s.len();
            }
            segments.push(Segment {
                text: rendered[cursor..].to_string(),
                content: false,
            });
            let joined: String = segments.iter().map(|s| s.text.as_str()).collect();
            if joined == real {
                segments.retain(|s| !s.text.is_empty());
                return Ok(segments);
            }
        }
        Err(Error::Template(
            "the model's chat template changes message contents: qfilters cannot tokenize them safely".into(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const TOOLY: &str = r#"{%- if tools %}<sys>Tools:
{% for t in tools %}{{ t | tojson }}
{% endfor %}</sys>
{% endif %}
{%- for m in messages %}
{%- if m.role == "tool" %}<resp>{{ m.content }}</resp>
{%- elif m.tool_calls %}<a>{% for c in m.tool_calls %}<call>{{ c.function | tojson }}</call>{% endfor %}</a>
{%- else %}<{{ m.role }}>{{ m.content | trim }}</{{ m.role }}>
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}<a>{% endif %}"#;

    fn ctx(tools: &[Value]) -> Context<'_> {
        Context {
            tools: Some(tools),
            bos_token: "<s>",
            eos_token: "</s>",
        }
    }

    #[test]
    fn tools_and_tool_calls_render_with_python_json_and_contents_split_out() {
        let t = Template::new(TOOLY).unwrap();
        let tools =
            [json!({"type": "function", "function": {"name": "f", "parameters": {"a": [1, 2]}}})];
        let messages = [
            json!({"role": "user", "content": "hi <a>"}),
            json!({"role": "assistant", "content": null, "tool_calls": [{"id": "1", "type": "function", "function": {"name": "f", "arguments": {"x": "é"}}}]}),
            json!({"role": "tool", "content": "42"}),
        ];
        let s = t.segments(&messages, &ctx(&tools)).unwrap();
        let text: String = s.iter().map(|s| s.text.as_str()).collect();
        assert_eq!(
            text,
            "<sys>Tools:\n{\"type\": \"function\", \"function\": {\"name\": \"f\", \"parameters\": {\"a\": [1, 2]}}}\n</sys>\n<user>hi <a></user><a><call>{\"name\": \"f\", \"arguments\": {\"x\": \"é\"}}</call></a><resp>42</resp><a>"
        );
        let contents: Vec<&str> = s
            .iter()
            .filter(|s| s.content)
            .map(|s| s.text.as_str())
            .collect();
        assert_eq!(contents, ["hi <a>", "42"]);
    }

    #[test]
    fn a_trimming_template_gets_trimmed_contents_and_errors_are_typed() {
        let t = Template::new(TOOLY).unwrap();
        let s = t
            .segments(&[json!({"role": "user", "content": "  pad \n"})], &ctx(&[]))
            .unwrap();
        assert!(s.iter().any(|s| s.content && s.text == "pad"));
        let bad = Template::new("{{ raise_exception('no tools here') }}").unwrap();
        let e = bad.render(&[], &ctx(&[])).unwrap_err().to_string();
        assert!(e.contains("no tools here"), "{e}");
        assert!(Template::new("{% for %}").is_err());
        // Python string methods through pycompat.
        let py = Template::new("{{ messages[0].content.strip().upper() }}").unwrap();
        let out = py
            .render(&[json!({"role": "user", "content": " a "})], &ctx(&[]))
            .unwrap();
        assert_eq!(out, "A");
        assert_eq!(
            Template::new("{{ tools[0] | tojson(indent=2) }}")
                .unwrap()
                .render(&[], &ctx(&[json!({"a": 1})]))
                .unwrap(),
            "{\n  \"a\": 1\n}"
        );
    }
}
