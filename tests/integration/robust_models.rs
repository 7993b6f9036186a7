//! Models llama.cpp would abort on are refused with one line, and a broken model that loads
//! gives a typed error instead of an empty completion (issue 14, defect 6).

use std::path::{Path, PathBuf};
use std::process::Output;

use crate::common::{assert_one_line_error, model_path, qfilters};
use gguf_tools::gguf::{self, Value};
use gguf_tools::synth::{self, SynthOptions, WeightType};
use qfilters::conversation::generate::{generate, Limits};
use qfilters::ffi::{Model, ModelParams, Sampler, SamplingParams};
use qfilters::Error;

fn tiny(dir: &Path) -> PathBuf {
    let path = dir.join("tiny.gguf");
    let opts = SynthOptions {
        shape: synth::shape_by_name("tiny").expect("tiny"),
        weight_type: WeightType::F16,
        seed: 3,
    };
    synth::write(&opts, &path, false).expect("synth tiny");
    path
}

/// A copy of `src` whose metadata `edit` changed, written with gguf-tools' writer: the new
/// header, then the original tensor data (tensor offsets are relative to the data section).
fn with_metadata(src: &Path, dst: &Path, edit: impl FnOnce(&mut Vec<(String, Value)>)) {
    let mut file = gguf::read(src).expect("read");
    let bytes = std::fs::read(src).expect("read bytes");
    let data_start = file.header_bytes().expect("header").len();
    edit(&mut file.metadata);
    let mut out = file.header_bytes().expect("header");
    out.extend_from_slice(&bytes[data_start..]);
    std::fs::write(dst, out).expect("write");
}

fn set(metadata: &mut [(String, Value)], key: &str, value: Value) {
    let slot = metadata
        .iter_mut()
        .find(|(k, _)| k == key)
        .unwrap_or_else(|| panic!("{key} present"));
    slot.1 = value;
}

fn load_with_cli(model: &Path) -> Output {
    qfilters()
        .args(["run", "-p", "hello", "-n", "1", "-m"])
        .arg(model)
        .output()
        .expect("spawn")
}

#[test]
fn hyperparameters_llama_cpp_asserts_on_are_refused_with_one_line() {
    let dir = tempfile::tempdir().expect("tmp");
    let base = tiny(dir.path());
    // The unedited model passes the check (the CLI then refuses text: no tokenizer).
    let ok = load_with_cli(&base);
    assert_one_line_error(&ok, "no tokenizer");
    let cases: Vec<(&str, Value, &str)> = vec![
        ("llama.block_count", Value::U32(0), "1 to 512 layers"),
        ("llama.block_count", Value::U32(600), "1 to 512 layers"),
        (
            "llama.attention.layer_norm_rms_epsilon",
            Value::F32(-1e-5),
            "greater than 0",
        ),
        ("llama.rope.freq_base", Value::F32(f32::NAN), "finite"),
        ("llama.rope.freq_base", Value::F32(f32::INFINITY), "finite"),
        ("llama.attention.head_count", Value::U32(0), "at least 1"),
        ("llama.attention.head_count_kv", Value::U32(3), "divide"),
    ];
    for (i, (key, value, needle)) in cases.into_iter().enumerate() {
        let path = dir.path().join(format!("bad{i}.gguf"));
        let shown = value.short();
        with_metadata(&base, &path, |m| set(m, key, value));
        let out = load_with_cli(&path);
        assert_one_line_error(&out, needle);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(key), "{key}={shown}: {stderr}");
    }
}

#[test]
fn nan_logits_are_an_error_not_an_empty_completion() {
    let dir = tempfile::tempdir().expect("tmp");
    let base = tiny(dir.path());
    // Valid hyper-parameters, broken weights: the final norm's weights are NaN, so every
    // logit is NaN. The load-time check cannot see this; the sampler must.
    let file = gguf::read(&base).expect("read");
    let data_start = file.header_bytes().expect("header").len();
    let norm = file
        .tensors
        .iter()
        .find(|t| t.name == "output_norm.weight")
        .expect("output_norm");
    let mut bytes = std::fs::read(&base).expect("bytes");
    let at = data_start + norm.offset as usize;
    for i in 0..norm.dims[0] as usize {
        bytes[at + 4 * i..at + 4 * i + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    }
    let broken = dir.path().join("nan.gguf");
    std::fs::write(&broken, bytes).expect("write");

    let model = Model::load(&broken, &ModelParams::default()).expect("hyper-parameters are valid");
    let mut engine = crate::common::full_engine(&model, 64, 16);
    let mut sampler = Sampler::new(&model, &SamplingParams::greedy()).expect("sampler");
    let result = generate(
        &mut engine,
        &mut sampler,
        &[1, 2, 3, 4],
        Limits::tokens(4),
        &mut |_, _| true,
        &mut |_| true,
    );
    match result {
        Err(e @ Error::NonFiniteLogits { .. }) => {
            assert!(e.to_string().contains("non-finite logits"), "{e}")
        }
        other => panic!("expected a non-finite logits error, got {other:?}"),
    }
}

/// A prompt whose tokenization needs more memory than the process may have: llama.cpp throws
/// std::bad_alloc inside llama_tokenize, which used to cross into Rust and abort (SIGABRT).
/// Under an address-space limit it must be one error line and exit 1.
#[test]
fn huge_prompt_under_a_memory_limit_is_an_error_not_an_abort() {
    if std::process::Command::new("prlimit")
        .arg("--version")
        .output()
        .is_err()
    {
        panic!("prlimit (util-linux) is needed for this test");
    }
    let dir = tempfile::tempdir().expect("tmp");
    let prompt = dir.path().join("huge.txt");
    let line = "All the world's a stage, and all the men and women merely players. ";
    let text = line.repeat(45_000_000 / line.len());
    std::fs::write(&prompt, &text).expect("write prompt");
    let out = std::process::Command::new("prlimit")
        .arg("--as=1500000000")
        .arg(crate::common::bin())
        .args(["run", "-t", "1", "-n", "1", "-f"])
        .arg(&prompt)
        .arg("-m")
        .arg(model_path())
        .env("QFILTERS_THREADS", "1")
        .output()
        .expect("spawn");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "exit 1, not a signal: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(lines[0].starts_with("qfilters: "), "{stderr}");
}

/// A grammar llama.cpp cannot parse is a typed error (through the barrier, not an abort), and
/// a grammar it takes constrains what is sampled (`response_format`'s path).
#[test]
fn grammars_are_refused_with_an_error_or_followed() {
    let model = crate::common::smollm2();
    for bad in [
        "root ::= (",
        "root ::= undefined-rule",
        "other ::= \"x\"",
        "root ::= \"a\u{0}\"",
    ] {
        let params = SamplingParams {
            grammar: Some(bad.to_string()),
            ..SamplingParams::greedy()
        };
        assert!(Sampler::new(&model, &params).is_err(), "{bad:?}");
    }
    let params = SamplingParams {
        grammar: Some(r#"root ::= "{\"ok\": " ("true" | "false") "}""#.to_string()),
        ..SamplingParams::greedy()
    };
    let mut sampler = Sampler::new(&model, &params).expect("a valid grammar");
    let mut engine = crate::common::full_engine(&model, 256, 64);
    let prompt = model
        .tokenize("Say something:", true, false)
        .expect("tokenize");
    let gen = generate(
        &mut engine,
        &mut sampler,
        &prompt,
        Limits::tokens(32),
        &mut |_, _| true,
        &mut |_| true,
    )
    .expect("generate");
    let text = gen.text;
    assert!(
        text == "{\"ok\": true}" || text == "{\"ok\": false}",
        "{text:?}"
    );
}

/// Every kind of grammar the server's JSON Schema converter writes, at its bounds, is one
/// llama.cpp's parser takes (a refusal would be a 500 at request time).
#[test]
fn the_schema_converter_writes_grammars_llama_cpp_takes() {
    use qfilters::server::grammar;
    use serde_json::json;
    let model = crate::common::smollm2();
    let item = json!({"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 1000},
        "n": {"type": ["integer", "null"]},
        "tags": {"type": "array", "items": {"enum": ["a", "b\"", 3, null]}, "minItems": 1, "maxItems": 100},
        "child": {"$ref": "#/$defs/Node"}
    }, "required": ["name"]});
    let schemas = [
        json!({"$defs": {"Node": {"type": "object", "properties": {"kids": {"type": "array", "items": {"$ref": "#/$defs/Node"}}}}},
               "type": "array", "items": item, "maxItems": 100}),
        json!({"anyOf": [{"const": {"a": [1, "x"]}}, {"type": "number"}, {"type": "boolean"}]}),
        json!({"type": "object", "properties": {"a": {}, "b": {"type": "string", "minLength": 1000}}}),
        json!(true),
    ];
    let mut grammars = vec![grammar::json_object()];
    for s in &schemas {
        grammars.push(grammar::from_schema(s).expect("convertible"));
        grammars.push(grammar::wrapped("<tool_call>\n", s, "\n</tool_call>").expect("convertible"));
    }
    for g in grammars {
        let params = SamplingParams {
            grammar: Some(g.clone()),
            ..SamplingParams::greedy()
        };
        assert!(
            Sampler::new(&model, &params).is_ok(),
            "llama.cpp refused:\n{g}"
        );
    }
}
