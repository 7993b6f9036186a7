//! End-to-end behaviour of `qfilters run` on the real test model (SmolLM2-135M Q4_1).

use crate::common::*;
use serde_json::Value;

fn json_stats(path: &std::path::Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).expect("stats file")).expect("stats JSON")
}

#[test]
fn qfilters_with_room_for_everything_generates_what_the_full_cache_generates() {
    let dir = tempfile::tempdir().unwrap();
    let filters = random_filters(dir.path(), 1, 30, 3, 64);
    let prompt = data_text("tinyshakespeare.txt", 1500);
    let mut texts = Vec::new();
    for (policy, extra) in [
        ("none", vec![]),
        ("qfilters", vec!["--filters", filters.to_str().unwrap()]),
    ] {
        let stats = dir.path().join(format!("{policy}.json"));
        run_ok(
            run_prompt(&model_path(), &prompt, 24)
                .args([
                    "--policy",
                    policy,
                    "--budget",
                    "2048",
                    "--json-stats",
                    stats.to_str().unwrap(),
                ])
                .args(extra),
        );
        let s = json_stats(&stats);
        assert_eq!(
            s["evicted"], 0,
            "{policy}: nothing to evict within the budget"
        );
        texts.push(s["text"].as_str().unwrap().to_string());
    }
    assert!(!texts[0].is_empty());
    assert_eq!(
        texts[0], texts[1],
        "same greedy tokens with and without the hook"
    );
}

// One test per policy (six long runs in one test left a single core busy at the end of the
// suite): the same checks for each.
#[test]
fn long_prompt_stays_within_budget_and_accounts_for_every_position_qfilters() {
    long_prompt_stays_within_budget("qfilters");
}

#[test]
fn long_prompt_stays_within_budget_and_accounts_for_every_position_knorm() {
    long_prompt_stays_within_budget("knorm");
}

#[test]
fn long_prompt_stays_within_budget_and_accounts_for_every_position_streaming() {
    long_prompt_stays_within_budget("streaming");
}

#[test]
fn long_prompt_stays_within_budget_and_accounts_for_every_position_keydiff() {
    long_prompt_stays_within_budget("keydiff");
}

#[test]
fn long_prompt_stays_within_budget_and_accounts_for_every_position_expected_attention() {
    long_prompt_stays_within_budget("expected-attention");
}

#[test]
fn long_prompt_stays_within_budget_and_accounts_for_every_position_combined() {
    long_prompt_stays_within_budget("qfilters+keydiff");
}

fn long_prompt_stays_within_budget(policy: &str) {
    let dir = tempfile::tempdir().unwrap();
    // Random filters of the model's shape, with random expected-attention statistics (the
    // model's RoPE) for the policy that needs them.
    let filters = dir.path().join("filters.safetensors");
    qfilters::bench::random_filters(&crate::common::smollm2(), 2)
        .expect("valid filters")
        .save(&filters)
        .expect("save filters");
    let prompt_file = dir.path().join("prompt.txt");
    std::fs::write(&prompt_file, data_text("wikitext2-valid.txt", 14000)).unwrap();
    for granularity in ["head", "position"] {
        let stats = dir.path().join(format!("{policy}-{granularity}.json"));
        let out = run_ok(
            qfilters()
                .args([
                    "run",
                    "-m",
                    model_path().to_str().unwrap(),
                    "-f",
                    prompt_file.to_str().unwrap(),
                ])
                .args([
                    "-n", "16", "--policy", policy, "--budget", "256", "--batch", "128",
                ])
                .args([
                    "--granularity",
                    granularity,
                    "--filters",
                    filters.to_str().unwrap(),
                ])
                .args(["--json-stats", stats.to_str().unwrap()]),
        );
        let s = json_stats(&stats);
        let prompt = s["prompt_tokens"].as_u64().unwrap();
        let generated = s["generated_tokens"].as_u64().unwrap();
        let live = s["live_cells"].as_u64().unwrap();
        let peak = s["peak_cells"].as_u64().unwrap();
        assert!(prompt >= 3000, "prompt of {prompt} tokens");
        assert!(
            peak <= 256 + 128,
            "{policy}/{granularity}: peak {peak} cells"
        );
        assert!(
            live <= 256,
            "{policy}/{granularity}: {live} live cells after the run"
        );
        assert_eq!(
            s["evicted"].as_u64().unwrap(),
            prompt + generated - live,
            "{policy}/{granularity}"
        );
        assert!(generated > 0 && !String::from_utf8_lossy(&out.stdout).trim().is_empty());
        for key in ["budget", "prefill_tok_s", "decode_tok_s", "kv_bytes"] {
            assert!(!s[key].is_null(), "stats has {key}");
        }
    }
}

#[test]
fn kv_memory_is_set_by_the_budget_not_the_input() {
    let dir = tempfile::tempdir().unwrap();
    let mut kv = Vec::new();
    for chars in [3000, 12000] {
        let stats = dir.path().join(format!("{chars}.json"));
        run_ok(
            qfilters()
                .args([
                    "run",
                    "-m",
                    model_path().to_str().unwrap(),
                    "-p",
                    &data_text("wikitext2-valid.txt", chars),
                ])
                .args([
                    "-n", "4", "--policy", "knorm", "--budget", "256", "--batch", "64",
                ])
                .args(["--json-stats", stats.to_str().unwrap()]),
        );
        kv.push(json_stats(&stats)["kv_bytes"].as_u64().unwrap());
    }
    assert!(kv[0] > 0);
    assert_eq!(kv[0], kv[1], "KV bytes do not grow with the input");
}

#[test]
fn bad_inputs_fail_with_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let model = model_path();
    let m = model.to_str().unwrap();
    let truncated = dir.path().join("truncated.gguf");
    std::fs::write(&truncated, &std::fs::read(&model).unwrap()[..1_000_000]).unwrap();
    let not_gguf = dir.path().join("text.gguf");
    std::fs::write(&not_gguf, "just some text").unwrap();
    let wrong_shape = {
        let d = dir.path().join("wrong");
        std::fs::create_dir_all(&d).unwrap();
        random_filters(&d, 3, 16, 8, 64)
    };
    let nan_filters = dir.path().join("nan.safetensors");
    {
        // Written by hand: the library refuses to build NaN filters, a file can still hold them.
        let mut values = vec![0.1f32; 30 * 3 * 64];
        values[5] = f32::NAN;
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let header = format!(
            r#"{{"q_filters":{{"dtype":"F32","shape":[30,3,64],"data_offsets":[0,{}]}}}}"#,
            bytes.len()
        );
        let mut file = (header.len() as u64).to_le_bytes().to_vec();
        file.extend(header.as_bytes());
        file.extend(bytes);
        std::fs::write(&nan_filters, file).unwrap();
    }
    // A model llama.cpp loads but that has no vocabulary: its tokenizer would abort the process.
    let no_vocab = dir.path().join("no-vocab.gguf");
    let opts = gguf_tools::synth::SynthOptions {
        shape: gguf_tools::synth::shape_by_name("tiny").unwrap(),
        weight_type: gguf_tools::synth::WeightType::F16,
        seed: 1,
    };
    gguf_tools::synth::write(&opts, &no_vocab, false).unwrap();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![
                "-m".into(),
                no_vocab.display().to_string(),
                "--policy".into(),
                "none".into(),
            ],
            "no tokenizer",
        ),
        (
            vec![
                "-m".into(),
                dir.path().join("absent.gguf").display().to_string(),
            ],
            "not found",
        ),
        (
            vec!["-m".into(), truncated.display().to_string()],
            // gguf-tools' reader, run before llama.cpp, names what is cut off.
            "the file is corrupt",
        ),
        (
            vec!["-m".into(), not_gguf.display().to_string()],
            "not a GGUF",
        ),
        (
            vec![
                "-m".into(),
                m.into(),
                "--filters".into(),
                wrong_shape.display().to_string(),
            ],
            "[16, 8, 64]",
        ),
        (
            vec![
                "-m".into(),
                m.into(),
                "--filters".into(),
                nan_filters.display().to_string(),
            ],
            "NaN",
        ),
        (
            vec![
                "-m".into(),
                m.into(),
                "--policy".into(),
                "knorm".into(),
                // Below the default window (32) + sinks (4) + 1.
                "--budget".into(),
                "30".into(),
            ],
            "--budget 30",
        ),
        (
            vec!["-m".into(), m.into(), "--policy".into(), "lru".into()],
            "unknown policy 'lru'",
        ),
        (
            vec!["-m".into(), m.into(), "--policy".into(), "qfilters".into()],
            "needs Q-Filters",
        ),
    ];
    for (args, needle) in cases {
        let out = qfilters()
            .arg("run")
            .args(&args)
            .args(["-p", "Hello", "-n", "2"])
            .output()
            .unwrap();
        assert_one_line_error(&out, needle);
    }
}
