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

    // qfilters' knobs first (two settings: granularity position again is not re-measured),
    // then every other candidate and the references at recency 0 and the tuned one.
    let points = json(&sweep);
    let points = points.as_array().unwrap();
    let policy = |i: usize| points[i]["policy"].as_str().unwrap();
    let objective = |i: usize| points[i]["objective"].as_f64().unwrap();
    assert_eq!((policy(0), policy(1)), ("qfilters", "qfilters"));
    assert_ne!(objective(0), objective(1));
    let tuned_recency = points[usize::from(objective(1) < objective(0) - TUNE_TIE)]["recency"]
        .as_f64()
        .unwrap();
    let measured: Vec<&str> = points
        .iter()
        .map(|p| p["policy"].as_str().unwrap())
        .collect();
    for (p, role) in [
        ("keydiff", "candidate"),
        ("qfilters+keydiff", "candidate"),
        ("streaming", "reference"),
        ("knorm", "reference"),
    ] {
        let rows: Vec<&Value> = points.iter().filter(|r| r["policy"] == p).collect();
        assert!(!rows.is_empty(), "{p} not measured: {measured:?}");
        assert!(rows.iter().all(|r| r["role"] == role && r["window"] == 24));
        if p != "streaming" {
            let r: Vec<f64> = rows
                .iter()
                .map(|r| r["recency"].as_f64().unwrap())
                .collect();
            let want = if tuned_recency == 0.0 {
                vec![0.0]
            } else {
                vec![0.0, tuned_recency]
            };
            assert_eq!(r, want, "{p}");
        }
    }
    assert!(!measured.contains(&"random"), "{measured:?}");
    // The choice: each policy's best by the tie rule, then the first candidate unless a later
    // one is lower by more than the tie margin; never a reference.
    let mut bests: Vec<(&str, usize)> = Vec::new();
    for (i, r) in points.iter().enumerate() {
        let p = r["policy"].as_str().unwrap();
        match bests.iter_mut().find(|(q, _)| *q == p) {
            Some((_, b)) if objective(i) < objective(*b) - TUNE_TIE => *b = i,
            Some(_) => {}
            None => bests.push((p, i)),
        }
    }
    let mut chosen = bests[0].1;
    for &(_, i) in &bests[1..] {
        if points[i]["role"] == "candidate" && objective(i) < objective(chosen) - TUNE_TIE {
            chosen = i;
        }
    }
    let best = &points[chosen];
    assert_eq!(best["role"], "candidate");
    let chosen_rows: Vec<usize> = (0..points.len())
        .filter(|&i| points[i]["chosen"] == true)
        .collect();
    assert_eq!(chosen_rows, [chosen], "{points:?}");
    let recency = best["recency"].as_f64().unwrap();
    let chosen_policy = best["policy"].as_str().unwrap();

    // Carried in the safetensors metadata and, typed, in the GGUF.
    let st = QFilters::load(&tuned).unwrap();
    let from_gguf = QFilters::from_gguf(&gguf).unwrap().unwrap();
    for f in [&st, &from_gguf] {
        let m = |k: &str| f.metadata.get(k).cloned().unwrap_or_default();
        assert_eq!(m("defaults.policy"), chosen_policy);
        assert_eq!(m("defaults.recency").parse::<f64>().unwrap(), recency);
        assert_eq!(m("defaults.window"), "24");
        assert_eq!(m("defaults.granularity"), "position");
        let evidence = m("defaults.evidence");
        assert!(evidence.contains("tinyshakespeare.txt"), "{evidence}");
        assert!(
            evidence.contains(&format!("chosen: {chosen_policy} recency")),
            "{evidence}"
        );
        assert!(
            evidence.contains("streaming") && evidence.contains("knorm"),
            "{evidence}"
        );
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

/// A filters file whose tuned defaults name a policy: `run` takes it when no `--policy` is
/// given, says so in one line, and uses it (the same completion as `--policy keydiff` typed);
/// a typed `--policy` wins; a name this build does not know is one error line naming the file.
#[test]
fn a_tuned_policy_is_announced_and_used_unless_policy_is_given() {
    let dir = tempfile::tempdir().unwrap();
    let plain = random_filters(dir.path(), 5, 30, 3, 64);
    let with_policy = |name: &str, policy: &str| {
        let mut f = QFilters::load(&plain).unwrap();
        f.metadata
            .insert("defaults.policy".to_string(), policy.to_string());
        let path = dir.path().join(name).join("filters.safetensors");
        f.save(&path).unwrap();
        path
    };
    let keydiff = with_policy("keydiff", "keydiff");
    let prompt = data_text("tinyshakespeare.txt", 300);
    let run = |filters: Option<&std::path::Path>, extra: &[&str]| {
        let stats = dir.path().join("stats.json");
        let mut cmd = run_prompt(&model_path(), &prompt, 4);
        cmd.args(["--budget", "48", "--batch", "16"])
            .args(["--json-stats", stats.to_str().unwrap()])
            .args(extra);
        if let Some(f) = filters {
            cmd.args(["--filters", f.to_str().unwrap()]);
        }
        let out = run_ok(&mut cmd);
        (
            String::from_utf8_lossy(&out.stderr).into_owned(),
            json(&stats),
        )
    };
    let (stderr, s) = run(Some(&keydiff), &[]);
    let line = format!(
        "qfilters: policy keydiff (tuned default from {})",
        keydiff.display()
    );
    assert!(stderr.lines().any(|l| l == line), "{stderr}");
    assert!(!stderr.contains("ignored"), "{stderr}");
    assert!(!stderr.contains("using filters"), "{stderr}");
    assert_eq!(s["policy"], "keydiff");
    assert!(s["evicted"].as_u64().unwrap() > 0, "{s}");
    // The same cache and completion as KeyDiff asked for by name, without filters.
    let (_, typed) = run(None, &["--policy", "keydiff"]);
    assert_eq!(s["text"], typed["text"]);
    assert_eq!(s["evicted"], typed["evicted"]);
    // A typed --policy wins, silently.
    let (stderr, s) = run(Some(&keydiff), &["--policy", "qfilters"]);
    assert!(!stderr.contains("tuned default"), "{stderr}");
    assert_eq!(s["policy"], "qfilters");
    // Filters without the key keep the built-in default policy.
    let (stderr, s) = run(Some(&plain), &[]);
    assert!(!stderr.contains("tuned default"), "{stderr}");
    assert_eq!(s["policy"], "qfilters");
    // eval sweeps every registered policy by default; a tuned combination joins them.
    let mix = with_policy("mix", "qfilters+keydiff");
    let records = dir.path().join("ppl.json");
    let out = run_ok(qfilters().args([
        "eval",
        "ppl",
        "-m",
        model_path().to_str().unwrap(),
        "--filters",
        mix.to_str().unwrap(),
        "--text",
        data_file("wikitext2-valid.txt").to_str().unwrap(),
        "--tokens",
        "64",
        "--batch",
        "16",
        "--budget",
        "48",
        "--json",
        records.to_str().unwrap(),
    ]));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("policy qfilters+keydiff (tuned default from") && stderr.contains("added"),
        "{stderr}"
    );
    let swept: Vec<String> = json(&records)
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["policy"].as_str().unwrap().to_string())
        .collect();
    assert!(swept.iter().any(|p| p == "qfilters+keydiff"), "{swept:?}");
    assert!(swept.iter().any(|p| p == "streaming"), "{swept:?}");
    // A stored name this build does not know: one line naming the file.
    let unknown = with_policy("unknown", "h2o");
    let out = run_prompt(&model_path(), &prompt, 4)
        .args(["--filters", unknown.to_str().unwrap()])
        .output()
        .unwrap();
    assert_one_line_error(&out, &unknown.display().to_string());
    assert!(String::from_utf8_lossy(&out.stderr).contains("\"h2o\""));
}
