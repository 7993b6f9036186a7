//! Defaults chosen per model by `qfilters calibrate --tune`: written into the filters'
//! metadata and the GGUF, used by `run` and `eval` when no flag is given (and said so on
//! stderr), overridden by an explicit flag.

use crate::common::*;
use gguf_tools::filters::QFilters;
use qfilters::calibrate::tune::TUNE_TIE;
use serde_json::Value;

fn json(path: &std::path::Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn tuned_defaults_are_chosen_carried_and_used_unless_a_flag_overrides() {
    let dir = tempfile::tempdir().unwrap();
    let filters = random_filters(dir.path(), 5, 30, 3, 64);
    let tuned = dir.path().join("tuned").join("filters.safetensors");
    let gguf = dir.path().join("tuned.gguf");
    let sweep = dir.path().join("sweep.json");
    let shakespeare = data_file("tinyshakespeare.txt");
    // Two settings, values unlike the built-in defaults (recency 128, window 32, head), so
    // their use is visible; a few hundred tokens through the small model.
    let out = run_ok(qfilters().args([
        "calibrate",
        "-m",
        model_path().to_str().unwrap(),
        "--filters",
        filters.to_str().unwrap(),
        "--tune",
        shakespeare.to_str().unwrap(),
        "--tune-tokens",
        "128",
        "--tune-budget",
        "48",
        "--tune-chunk",
        "16",
        "--tune-recency",
        "0,16",
        "--tune-granularity",
        "position",
        "--tune-window",
        "24",
        "--tune-json",
        sweep.to_str().unwrap(),
        "-o",
        tuned.to_str().unwrap(),
        "--embed",
        gguf.to_str().unwrap(),
    ]));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("tuned on 128 tokens"), "{stderr}");

    // The choice is the measured best of the sweep, the first listed unless the second is lower
    // by more than the tie margin the library decides with.
    let points = json(&sweep);
    let points = points.as_array().unwrap();
    assert_eq!(points.len(), 2);
    let objective = |i: usize| points[i]["objective"].as_f64().unwrap();
    let best = &points[usize::from(objective(1) < objective(0) - TUNE_TIE)];
    assert_eq!(best["chosen"], true);
    let recency = best["recency"].as_f64().unwrap();
    assert_ne!(points[0]["objective"], points[1]["objective"]);

    // Carried in the safetensors metadata and, typed, in the GGUF.
    let st = QFilters::load(&tuned).unwrap();
    let from_gguf = QFilters::from_gguf(&gguf).unwrap().unwrap();
    for f in [&st, &from_gguf] {
        let m = |k: &str| f.metadata.get(k).cloned().unwrap_or_default();
        assert_eq!(m("defaults.recency").parse::<f64>().unwrap(), recency);
        assert_eq!(m("defaults.window"), "24");
        assert_eq!(m("defaults.granularity"), "position");
        assert!(m("defaults.evidence").contains("tinyshakespeare.txt"));
        assert!(m("defaults.evidence").contains("chosen: recency"));
    }

    let prompt = data_text("tinyshakespeare.txt", 300);
    let run = |extra: &[&str]| {
        let stats = dir.path().join("stats.json");
        let out = run_ok(
            run_prompt(&gguf, &prompt, 2)
                .args(["--policy", "qfilters", "--budget", "48", "--batch", "16"])
                .args(["--json-stats", stats.to_str().unwrap()])
                .args(extra),
        );
        (
            String::from_utf8_lossy(&out.stderr).into_owned(),
            json(&stats),
        )
    };
    // No flag: the model's tuned defaults, announced on stderr.
    let (stderr, s) = run(&[]);
    assert!(
        stderr.contains("tuned defaults from the Q-Filters embedded in"),
        "{stderr}"
    );
    assert!(stderr.contains("window 24"), "{stderr}");
    assert_eq!(s["window"], 24);
    assert_eq!(s["granularity"], "position");
    assert_eq!(s["recency"].as_f64().unwrap(), recency);
    assert!(s["evicted"].as_u64().unwrap() > 0);
    // Explicit flags win, each on its own.
    let (stderr, s) = run(&["--window", "8", "--recency", "64", "--slack", "3"]);
    assert!(!stderr.contains("window 24"), "{stderr}");
    assert!(stderr.contains("granularity position"), "{stderr}");
    assert_eq!(s["window"], 8);
    assert_eq!(s["recency"].as_f64().unwrap(), 64.0);
    assert_eq!(s["granularity"], "position");
    // The stats carry every eviction setting, as result records do.
    assert_eq!(s["slack"], 3);
    assert_eq!(s["combiner"], "mean-z");

    // eval: every policy of the sweep gets the same tuned settings.
    let wiki = data_file("wikitext2-valid.txt");
    let records = dir.path().join("ppl.json");
    let out = run_ok(qfilters().args([
        "eval",
        "ppl",
        "-m",
        model_path().to_str().unwrap(),
        "--filters",
        tuned.to_str().unwrap(),
        "--text",
        wiki.to_str().unwrap(),
        "--tokens",
        "80",
        "--batch",
        "16",
        "--budget",
        "48",
        "--policy",
        "qfilters,knorm",
        "--json",
        records.to_str().unwrap(),
    ]));
    assert!(String::from_utf8_lossy(&out.stderr).contains("tuned defaults from"));
    for r in json(&records).as_array().unwrap() {
        assert_eq!(r["window"], 24, "{r}");
        assert_eq!(r["granularity"], "position", "{r}");
        assert_eq!(r["recency"].as_f64().unwrap(), recency, "{r}");
    }
    // Filters without tuned defaults keep the built-in ones, silently.
    let stats = dir.path().join("plain.json");
    let out = run_ok(
        run_prompt(&model_path(), &prompt, 2)
            .args(["--filters", filters.to_str().unwrap(), "--budget", "48"])
            .args(["--json-stats", stats.to_str().unwrap()]),
    );
    assert!(!String::from_utf8_lossy(&out.stderr).contains("tuned defaults"));
    assert_eq!(json(&stats)["window"], 32);
}
