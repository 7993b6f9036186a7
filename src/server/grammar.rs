//! JSON Schema to GBNF, for `response_format` and required tool calls: llama.cpp's grammar
//! sampler then keeps every sampled token inside the schema.
//!
//! Written here rather than taken from crates.io: the one converter there (`gbnf` 0.2) makes
//! every property required, documents that property names with underscores break, and can
//! panic on some inputs. This one covers the subset clients send (objects with `properties`
//! and `required`, strings, numbers, integers, booleans, null, arrays with `items`, `enum`,
//! `const`, `anyOf`, type lists, local `$ref`s into `$defs`) and refuses every other
//! constraining keyword by name, so a reply never claims a constraint it did not follow.
//! Keywords that only annotate (`title`, `description`, ...) are accepted.

use std::collections::BTreeMap;

use serde_json::Value;

/// Keywords that never constrain a value: accepted and ignored.
const ANNOTATIONS: &[&str] = &[
    "title",
    "description",
    "$schema",
    "$id",
    "$comment",
    "default",
    "examples",
    "deprecated",
    "readOnly",
    "writeOnly",
    // Generating no extra property satisfies any `additionalProperties`.
    "additionalProperties",
    // OpenAI's flag for its own strict mode: this grammar is always strict.
    "strict",
];

/// Keywords the converter implements.
const HANDLED: &[&str] = &[
    "type",
    "properties",
    "required",
    "items",
    "enum",
    "const",
    "anyOf",
    "$ref",
    "$defs",
    "definitions",
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
];

/// How deep schemas may nest: deeper ones are refused rather than recursed into.
const MAX_DEPTH: usize = 32;
/// Longest `maxLength`/`minLength` turned into a bounded repetition (llama.cpp expands
/// repetitions into rules and refuses large ones).
const MAX_LENGTH_BOUND: u64 = 1000;
/// The same for `minItems`/`maxItems`, whose repeated item may be a large rule.
const MAX_ITEMS_BOUND: u64 = 100;

/// Why a schema cannot be converted, in the request's words.
#[derive(Debug, Clone, PartialEq)]
pub struct SchemaError(pub String);

/// Shared rules every grammar may use.
const PRIMITIVES: &str = r#"ws ::= [ \t\n]{0,20}
char ::= [^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F]{4})
string ::= "\"" char* "\""
integer ::= "-"? ([0-9] | [1-9] [0-9]{1,15})
number ::= integer ("." [0-9]{1,16})? ([eE] [-+]? [0-9]{1,3})?
boolean ::= "true" | "false"
null ::= "null"
value ::= object | array | string | number | boolean | null
object ::= "{" ws ( string ws ":" ws value ( "," ws string ws ":" ws value )* )? ws "}"
array ::= "[" ws ( value ( "," ws value )* )? ws "]"
"#;

/// The grammar of any JSON object (`response_format: {"type": "json_object"}`).
pub fn json_object() -> String {
    format!("root ::= object\n{PRIMITIVES}")
}

/// The grammar of the JSON values `schema` accepts.
pub fn from_schema(schema: &Value) -> Result<String, SchemaError> {
    let mut g = Grammar {
        root: schema,
        rules: BTreeMap::new(),
        refs: BTreeMap::new(),
        leading: Vec::new(),
        next: 0,
    };
    let body = g.value(schema, "schema", 0)?;
    let mut out = format!("root ::= {body}\n");
    for (name, rule) in &g.rules {
        out.push_str(&format!("{name} ::= {rule}\n"));
    }
    out.push_str(PRIMITIVES);
    Ok(out)
}

/// The grammar of a whole reply shaped `prefix JSON suffix`, the JSON following `schema`.
pub fn wrapped(prefix: &str, schema: &Value, suffix: &str) -> Result<String, SchemaError> {
    let inner = from_schema(schema)?;
    // The schema's own root becomes `json`; the reply's root wraps it.
    let inner = inner.replacen("root ::= ", "json ::= ", 1);
    Ok(format!(
        "root ::= {} json {}\n{inner}",
        literal(prefix),
        literal(suffix)
    ))
}

struct Grammar<'a> {
    root: &'a Value,
    rules: BTreeMap<String, String>,
    /// `$ref` target to its rule name (made once, so recursive schemas terminate).
    refs: BTreeMap<String, String>,
    /// `$ref`s being converted with no JSON text written yet in front of the current place: a
    /// reference back to one of them would be a left-recursive rule, which llama.cpp refuses.
    leading: Vec<String>,
    next: usize,
}

impl<'a> Grammar<'a> {
    fn rule(&mut self, body: String) -> String {
        let name = format!("r{}", self.next);
        self.next += 1;
        self.rules.insert(name.clone(), body);
        name
    }

    /// A GBNF expression for the values `s` accepts; `at` names the place for errors.
    fn value(&mut self, s: &'a Value, at: &str, depth: usize) -> Result<String, SchemaError> {
        if depth > MAX_DEPTH {
            return Err(SchemaError(format!(
                "{at}: the schema nests deeper than {MAX_DEPTH} levels"
            )));
        }
        let m = match s {
            Value::Bool(true) => return Ok("value".into()),
            Value::Bool(false) => {
                return Err(SchemaError(format!(
                    "{at}: the schema `false` accepts nothing"
                )))
            }
            Value::Object(m) => m,
            _ => return Err(SchemaError(format!("{at}: a schema must be an object"))),
        };
        let mut unknown: Vec<&str> = m
            .keys()
            .map(String::as_str)
            .filter(|k| !ANNOTATIONS.contains(k) && !HANDLED.contains(k))
            .collect();
        if !unknown.is_empty() {
            unknown.sort_unstable();
            return Err(SchemaError(format!(
                "{at}: the schema keyword{} {} {} not supported (docs/server.md lists the supported subset)",
                if unknown.len() > 1 { "s" } else { "" },
                unknown.join(", "),
                if unknown.len() > 1 { "are" } else { "is" },
            )));
        }
        if let Some(r) = m.get("$ref") {
            return self.reference(r, at, depth);
        }
        if let Some(c) = m.get("const") {
            return Ok(literal(&c.to_string()));
        }
        if let Some(e) = m.get("enum") {
            let Some(values) = e.as_array().filter(|a| !a.is_empty()) else {
                return Err(SchemaError(format!("{at}.enum must be a non-empty array")));
            };
            let alts: Vec<String> = values.iter().map(|v| literal(&v.to_string())).collect();
            return Ok(format!("({})", alts.join(" | ")));
        }
        if let Some(any) = m.get("anyOf") {
            let Some(branches) = any.as_array().filter(|a| !a.is_empty()) else {
                return Err(SchemaError(format!("{at}.anyOf must be a non-empty array")));
            };
            let mut alts = Vec::with_capacity(branches.len());
            for (i, b) in branches.iter().enumerate() {
                alts.push(self.value(b, &format!("{at}.anyOf[{i}]"), depth + 1)?);
            }
            return Ok(format!("({})", alts.join(" | ")));
        }
        match m.get("type") {
            None => {
                if m.contains_key("properties") {
                    self.typed("object", m, at, depth)
                } else if m.contains_key("items") {
                    self.typed("array", m, at, depth)
                } else {
                    Ok("value".into())
                }
            }
            Some(Value::String(t)) => self.typed(t, m, at, depth),
            Some(Value::Array(ts)) if !ts.is_empty() => {
                let mut alts = Vec::with_capacity(ts.len());
                for t in ts {
                    let Some(t) = t.as_str() else {
                        return Err(SchemaError(format!(
                            "{at}.type must be a string or an array of strings"
                        )));
                    };
                    alts.push(self.typed(t, m, at, depth)?);
                }
                Ok(format!("({})", alts.join(" | ")))
            }
            Some(_) => Err(SchemaError(format!(
                "{at}.type must be a string or a non-empty array of strings"
            ))),
        }
    }

    fn typed(
        &mut self,
        t: &str,
        m: &'a serde_json::Map<String, Value>,
        at: &str,
        depth: usize,
    ) -> Result<String, SchemaError> {
        match t {
            "string" => string(m, at),
            "number" => Ok("number".into()),
            "integer" => Ok("integer".into()),
            "boolean" => Ok("boolean".into()),
            "null" => Ok("null".into()),
            "array" => {
                // Inside `[`: text comes first, no reference is leading any more.
                let outer = std::mem::take(&mut self.leading);
                let item = match m.get("items") {
                    None => Ok("value".to_string()),
                    Some(s) => self.value(s, &format!("{at}.items"), depth + 1),
                };
                self.leading = outer;
                let item = item?;
                let (lo, hi) = (
                    bound(m, "minItems", MAX_ITEMS_BOUND, at)?,
                    bound(m, "maxItems", MAX_ITEMS_BOUND, at)?,
                );
                let lo = lo.unwrap_or(0);
                if hi.is_some_and(|h| lo > h) {
                    return Err(SchemaError(format!("{at}: minItems is above maxItems")));
                }
                let body = match hi {
                    Some(0) => String::new(),
                    _ => {
                        // The first item, then the rest: `lo - 1` to `hi - 1` more.
                        let more = lo.saturating_sub(1);
                        let rest = match hi {
                            None if more == 0 => format!(r#"( "," ws {item} )*"#),
                            None => format!(r#"( "," ws {item} ){{{more},}}"#),
                            Some(h) => format!(r#"( "," ws {item} ){{{more},{}}}"#, h - 1),
                        };
                        if lo == 0 {
                            format!("( {item} {rest} )?")
                        } else {
                            format!("{item} {rest}")
                        }
                    }
                };
                Ok(self.rule(format!(r#""[" ws {body} ws "]""#)))
            }
            "object" => {
                // Inside `{`, as for arrays.
                let outer = std::mem::take(&mut self.leading);
                let rule = self.object(m, at, depth);
                self.leading = outer;
                rule
            }
            other => Err(SchemaError(format!(
                "{at}.type '{other}' is not a JSON Schema type"
            ))),
        }
    }

    fn object(
        &mut self,
        m: &'a serde_json::Map<String, Value>,
        at: &str,
        depth: usize,
    ) -> Result<String, SchemaError> {
        let props = match m.get("properties") {
            None => return Ok("object".into()),
            Some(Value::Object(p)) => p,
            Some(_) => return Err(SchemaError(format!("{at}.properties must be an object"))),
        };
        let required: Vec<&str> = match m.get("required") {
            None => Vec::new(),
            Some(Value::Array(r)) => r.iter().filter_map(Value::as_str).collect(),
            Some(_) => {
                return Err(SchemaError(format!(
                    "{at}.required must be an array of property names"
                )))
            }
        };
        if let Some(missing) = required.iter().find(|r| !props.contains_key(**r)) {
            return Err(SchemaError(format!(
                "{at}.required names '{missing}', which is not in its properties"
            )));
        }
        // Required properties first, in the order `required` gives, then the optional ones.
        let mut must = Vec::new();
        let mut may = Vec::new();
        for name in &required {
            let s = &props[*name];
            let v = self.value(s, &format!("{at}.properties.{name}"), depth + 1)?;
            must.push(format!(r#"{} ws ":" ws {v}"#, literal(&json_string(name))));
        }
        for (name, s) in props {
            if required.contains(&name.as_str()) {
                continue;
            }
            let v = self.value(s, &format!("{at}.properties.{name}"), depth + 1)?;
            may.push(format!(r#"{} ws ":" ws {v}"#, literal(&json_string(name))));
        }
        let body = if !must.is_empty() {
            let mut b = must.join(r#" "," ws "#);
            for kv in &may {
                b.push_str(&format!(r#" ( "," ws {kv} )?"#));
            }
            b
        } else if may.is_empty() {
            String::new()
        } else {
            // No required property: any subset of the optional ones, in order, comma-separated.
            // rest_i ::= kv_i ("," ws rest_{i+1})? | rest_{i+1}; the last is kv_{n-1}.
            let mut rest = self.rule(may[may.len() - 1].clone());
            for kv in may.iter().rev().skip(1) {
                rest = self.rule(format!(r#"{kv} ( "," ws {rest} )? | {rest}"#));
            }
            format!("{rest}?")
        };
        Ok(self.rule(format!(r#""{{" ws {body} ws "}}""#)))
    }

    fn reference(&mut self, r: &Value, at: &str, depth: usize) -> Result<String, SchemaError> {
        let Some(path) = r.as_str() else {
            return Err(SchemaError(format!("{at}.$ref must be a string")));
        };
        if self.leading.iter().any(|p| p == path) {
            return Err(SchemaError(format!(
                "{at}.$ref '{path}' refers back to itself before any JSON text: such a schema describes no finite value"
            )));
        }
        if let Some(name) = self.refs.get(path) {
            return Ok(name.clone());
        }
        let target = ["#/$defs/", "#/definitions/"]
            .iter()
            .find_map(|p| {
                let key = path.strip_prefix(p)?;
                self.root.get(&p[2..p.len() - 1])?.get(key)
            })
            .ok_or_else(|| {
                SchemaError(format!(
                    "{at}.$ref '{path}': only references into the schema's own $defs are supported"
                ))
            })?;
        // Named before it is converted: a recursive reference finds the name.
        let name = format!("r{}", self.next);
        self.next += 1;
        self.refs.insert(path.to_string(), name.clone());
        self.leading.push(path.to_string());
        let body = self.value(target, path, depth + 1);
        self.leading.pop();
        let body = body?;
        self.rules.insert(name.clone(), body);
        Ok(name)
    }
}

/// A count keyword's value, at most `max`.
fn bound(
    m: &serde_json::Map<String, Value>,
    k: &str,
    max: u64,
    at: &str,
) -> Result<Option<u64>, SchemaError> {
    match m.get(k) {
        None => Ok(None),
        Some(v) => match v.as_u64() {
            Some(n) if n <= max => Ok(Some(n)),
            _ => Err(SchemaError(format!(
                "{at}.{k} must be a whole number from 0 to {max}"
            ))),
        },
    }
}

fn string(m: &serde_json::Map<String, Value>, at: &str) -> Result<String, SchemaError> {
    let len = |k| bound(m, k, MAX_LENGTH_BOUND, at);
    Ok(match (len("minLength")?, len("maxLength")?) {
        (None, None) => "string".into(),
        (lo, Some(hi)) if lo.unwrap_or(0) > hi => {
            return Err(SchemaError(format!("{at}: minLength is above maxLength")))
        }
        (lo, hi) => format!(
            r#"("\"" char{{{},{}}} "\"")"#,
            lo.unwrap_or(0),
            hi.map(|h| h.to_string()).unwrap_or_default()
        ),
    })
}

/// `s` as a JSON string (quotes and escapes included).
fn json_string(s: &str) -> String {
    Value::String(s.to_string()).to_string()
}

/// A GBNF string literal matching exactly `text`.
pub fn literal(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\x{:02X}", c as u32))
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn grammar(s: Value) -> String {
        from_schema(&s).unwrap()
    }

    #[test]
    fn an_object_schema_has_its_required_properties_in_order_and_optional_ones_after() {
        let g = grammar(json!({
            "type": "object",
            "title": "Person",
            "properties": {
                "name": {"type": "string", "description": "who"},
                "age": {"type": "integer"},
                "nick_name": {"type": ["string", "null"]},
                "tags": {"type": "array", "items": {"enum": ["a", "b\"c"]}}
            },
            "required": ["name", "age"],
            "additionalProperties": false
        }));
        assert!(g.starts_with("root ::= r"), "{g}");
        let obj = g.lines().find(|l| l.contains(r#""\"name\"""#)).unwrap();
        let name = obj.find(r#""\"name\"""#).unwrap();
        let age = obj.find(r#""\"age\"""#).unwrap();
        let nick = obj.find(r#""\"nick_name\"""#).unwrap();
        assert!(name < age && age < nick, "{obj}");
        assert!(
            obj.contains(r#"( "," ws "\"nick_name\"" ws ":" ws (string | null) )?"#),
            "{obj}"
        );
        assert!(g.contains(r#"("\"a\"" | "\"b\\\"c\"")"#), "{g}");
    }

    #[test]
    fn an_object_without_required_properties_allows_any_subset() {
        let g = grammar(json!({"properties": {"a": {"type": "number"}, "b": {"const": 3}}}));
        assert!(g.contains(r#"r0 ::= "\"b\"" ws ":" ws "3""#), "{g}");
        assert!(
            g.contains(r#"r1 ::= "\"a\"" ws ":" ws number ( "," ws r0 )? | r0"#),
            "{g}"
        );
        assert!(g.contains(r#""{" ws r1? ws "}""#), "{g}");
    }

    #[test]
    fn local_references_become_rules_and_may_recurse() {
        let g = grammar(json!({
            "$defs": {"Node": {"type": "object", "properties": {
                "next": {"anyOf": [{"$ref": "#/$defs/Node"}, {"type": "null"}]}}}},
            "$ref": "#/$defs/Node"
        }));
        assert!(g.starts_with("root ::= r0\n"), "{g}");
        assert!(g.contains("(r0 | null)"), "{g}");
    }

    #[test]
    fn a_reference_back_to_itself_before_any_text_is_refused() {
        for s in [
            json!({"$defs": {"A": {"$ref": "#/$defs/A"}}, "$ref": "#/$defs/A"}),
            json!({"$defs": {"A": {"anyOf": [{"type": "null"}, {"$ref": "#/$defs/B"}]},
                             "B": {"$ref": "#/$defs/A"}}, "$ref": "#/$defs/A"}),
        ] {
            assert!(
                from_schema(&s)
                    .unwrap_err()
                    .0
                    .contains("refers back to itself"),
                "{s}"
            );
        }
        // Through an array or object it is ordinary recursion.
        let tree = json!({"$defs": {"T": {"type": "array", "items": {"$ref": "#/$defs/T"}}},
                          "$ref": "#/$defs/T"});
        assert!(from_schema(&tree).is_ok());
    }

    #[test]
    fn constraining_keywords_it_does_not_implement_are_refused_by_name() {
        for (s, needle) in [
            (
                json!({"type": "string", "pattern": "^a"}),
                "pattern is not supported",
            ),
            (
                json!({"type": "integer", "minimum": 1, "maximum": 3}),
                "maximum, minimum are not",
            ),
            (json!({"oneOf": [{"type": "string"}]}), "oneOf"),
            (
                json!({"properties": {"x": {"format": "date"}}}),
                "schema.properties.x: the schema keyword format",
            ),
            (json!({"$ref": "http://x/y"}), "only references into"),
            (
                json!({"type": "tuple"}),
                "'tuple' is not a JSON Schema type",
            ),
            (json!({"required": ["z"], "properties": {}}), "'z'"),
            (json!({"type": "string", "maxLength": 5000}), "maxLength"),
            (json!(false), "accepts nothing"),
            (json!(3), "must be an object"),
        ] {
            let e = from_schema(&s).unwrap_err();
            assert!(e.0.contains(needle), "{s}: {}", e.0);
        }
        let mut deep = json!({"type": "string"});
        for _ in 0..40 {
            deep = json!({"type": "array", "items": deep});
        }
        assert!(from_schema(&deep).unwrap_err().0.contains("deeper"));
    }

    #[test]
    fn string_lengths_become_bounded_repetitions() {
        let g = grammar(json!({"type": "string", "minLength": 2, "maxLength": 4}));
        assert!(g.starts_with(r#"root ::= ("\"" char{2,4} "\"")"#), "{g}");
        let g = grammar(json!({"type": "string", "minLength": 1}));
        assert!(g.starts_with(r#"root ::= ("\"" char{1,} "\"")"#), "{g}");
    }

    #[test]
    fn item_counts_become_bounded_repetitions() {
        let g = grammar(json!({"type": "array", "items": {"type": "integer"}, "maxItems": 3}));
        assert!(
            g.contains(r#"r0 ::= "[" ws ( integer ( "," ws integer ){0,2} )? ws "]""#),
            "{g}"
        );
        let g = grammar(json!({"type": "array", "minItems": 2}));
        assert!(
            g.contains(r#"r0 ::= "[" ws value ( "," ws value ){1,} ws "]""#),
            "{g}"
        );
        let g = grammar(json!({"type": "array", "maxItems": 0}));
        assert!(g.contains(r#"r0 ::= "[" ws  ws "]""#), "{g}");
        assert!(from_schema(&json!({"type": "array", "minItems": 3, "maxItems": 2})).is_err());
        assert!(from_schema(&json!({"type": "array", "maxItems": 101})).is_err());
    }

    #[test]
    fn literals_escape_what_gbnf_would_read() {
        assert_eq!(literal("a\"b\\c\nd\u{1}é"), r#""a\"b\\c\nd\x01é""#);
        let g = wrapped(
            "<tool_call>\n",
            &json!({"type": "boolean"}),
            "\n</tool_call>",
        )
        .unwrap();
        assert!(
            g.starts_with(
                "root ::= \"<tool_call>\\n\" json \"\\n</tool_call>\"\njson ::= boolean\n"
            ),
            "{g}"
        );
    }
}
