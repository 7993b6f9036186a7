//! `qfilters calibrate` and `qfilters filters check` on the real model.
//!
//! One calibration (2048 tokens, to keep the suite short on 2 cores) is shared by the tests;
//! the determinism test runs a second one.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use gguf_tools::filters::QFilters;

use crate::common::{bin, data_file as data, MODEL};

const CAL_ARGS: [&str; 8] = [
    "--tokens",
    "2048",
    "--seq-len",
    "1024",
    "--samples",
    "1000",
    "--seed",
    "7",
];

fn qfilters(args: &[&str]) -> Output {
    Command::new(bin())
        .args(args)
        .args(["-t", "2"])
        .output()
        .expect("run qfilters")
}

fn tmp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("qfilters-calib-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn calibrate_into(dir: &Path) -> PathBuf {
    let out = dir.join("filters.safetensors");
    let shakespeare = data("tinyshakespeare.txt");
    let mut args = vec![
        "calibrate",
        "-m",
        MODEL,
        "--text",
        shakespeare.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ];
    args.extend(CAL_ARGS);
    let o = qfilters(&args);
    assert!(
        o.status.success(),
        "calibrate failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    out
}

/// The shared calibration.
fn filters_file() -> &'static Path {
    static FILE: OnceLock<PathBuf> = OnceLock::new();
    FILE.get_or_init(|| calibrate_into(&tmp_dir("shared")))
}

#[test]
fn calibration_is_deterministic_for_a_seed() {
    let again = calibrate_into(&tmp_dir("again"));
    let a = QFilters::load(filters_file()).unwrap();
    let b = QFilters::load(&again).unwrap();
    let bits = |f: &QFilters| f.data.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert!(
        bits(&a) == bits(&b),
        "two calibrations with the same seed differ"
    );
    assert_eq!(a.metadata, b.metadata);
    // The files themselves are identical too (metadata is written in a fixed order).
    assert_eq!(
        std::fs::read(filters_file()).unwrap(),
        std::fs::read(&again).unwrap()
    );
}

#[test]
fn output_has_the_published_layout_and_provenance() {
    let path = filters_file();
    let f = QFilters::load(path).unwrap();
    assert_eq!(f.shape(), [30, 3, 64]);
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(path.parent().unwrap().join("config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(config["num_layers"], 30);
    assert_eq!(config["num_kv_heads"], 3);
    assert_eq!(config["kv_head_dim"], 64);
    // Raw safetensors header: one F32 tensor q_filters [30, 3, 64].
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    assert_eq!(header["q_filters"]["dtype"], "F32");
    assert_eq!(header["q_filters"]["shape"], serde_json::json!([30, 3, 64]));
    let meta = &header["__metadata__"];
    assert_eq!(meta["source"], "calibrated");
    assert_eq!(meta["tokens"], "2048");
    assert_eq!(meta["samples"], "1000");
    assert_eq!(meta["seed"], "7");
    assert!(meta["text_sha256"].as_str().unwrap().len() == 64);
    assert!(meta["tool"].as_str().unwrap().starts_with("qfilters "));
}

#[test]
fn filters_are_averages_of_unit_vectors() {
    // Each f is the mean of 3 unit vectors: norm ≤ 1, and well above 0 because the query
    // heads of one group point roughly the same way.
    let f = QFilters::load(filters_file()).unwrap();
    let mut min = f64::MAX;
    for l in 0..30 {
        for h in 0..3 {
            let n = f
                .filter(l, h)
                .iter()
                .map(|&x| (x as f64).powi(2))
                .sum::<f64>()
                .sqrt();
            assert!(n <= 1.0 + 1e-5, "layer {l} head {h}: norm {n}");
            min = min.min(n);
        }
    }
    assert!(min > 0.5, "smallest filter norm {min}");
}

#[test]
fn compare_reports_the_cosine_per_head() {
    let shared = filters_file();
    // One filter flipped: the comparison must find it, and only it.
    let mut f = QFilters::load(shared).unwrap();
    let (layer, head) = (17, 2);
    let start = (layer * 3 + head) * 64;
    f.data[start..start + 64].iter_mut().for_each(|x| *x = -*x);
    let flipped = tmp_dir("compare").join("flipped.safetensors");
    f.save(&flipped).unwrap();
    // No model, so no `-t`: not the `qfilters` helper.
    let compare = |args: &[&str]| {
        Command::new(bin())
            .args(["filters", "compare"])
            .args(args)
            .output()
            .unwrap()
    };
    let run = |b: &Path| {
        let o = compare(&[shared.to_str().unwrap(), b.to_str().unwrap(), "--json"]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap()
    };
    let same = run(shared);
    assert!((same["min"].as_f64().unwrap() - 1.0).abs() < 1e-9, "{same}");
    assert_eq!(same["below"], 0);
    let v = run(&flipped);
    assert!((v["min"].as_f64().unwrap() + 1.0).abs() < 1e-9, "{v}");
    assert_eq!(
        v["worst"],
        serde_json::json!({"layer": layer, "kv_head": head})
    );
    assert_eq!(v["below"], 1);
    assert_eq!(v["cosines"].as_array().unwrap().len(), 30);
    // Filters of another shape are one line and a non-zero exit, not a panic.
    let small = tmp_dir("compare").join("small.safetensors");
    QFilters::new(1, 3, 64, vec![1.0; 192])
        .unwrap()
        .save(&small)
        .unwrap();
    let o = compare(&[shared.to_str().unwrap(), small.to_str().unwrap()]);
    assert!(!o.status.success());
    assert_eq!(String::from_utf8_lossy(&o.stderr).trim().lines().count(), 1);
}

#[test]
fn check_shows_filters_predict_attention_better_than_key_norm() {
    let wikitext = data("wikitext2-valid.txt");
    let o = qfilters(&[
        "filters",
        "check",
        "-m",
        MODEL,
        "--filters",
        filters_file().to_str().unwrap(),
        "--text",
        wikitext.to_str().unwrap(),
        "--tokens",
        "1024",
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let f = v["mean_spearman_filters"].as_f64().unwrap();
    let k = v["mean_spearman_knorm"].as_f64().unwrap();
    assert_eq!(v["spearman_filters"].as_array().unwrap().len(), 30);
    assert!(f >= k + 0.2, "filters {f} vs knorm {k}");
    let m = &v["mass_kept"]["0.125"];
    let (mf, mo, mr) = (
        m["filters"].as_f64().unwrap(),
        m["oracle"].as_f64().unwrap(),
        m["recency"].as_f64().unwrap(),
    );
    assert!(mf <= mo + 1e-9 && mf > mr, "kept mass {m}");
}

#[test]
fn qfilters_policy_runs_with_calibrated_filters_within_budget() {
    let text = std::fs::read_to_string(data("tinyshakespeare.txt")).unwrap();
    let dir = tmp_dir("run");
    let prompt = dir.join("prompt.txt");
    std::fs::write(&prompt, &text[..12_000]).unwrap();
    let stats = dir.join("stats.json");
    let o = qfilters(&[
        "run",
        "-m",
        MODEL,
        "--policy",
        "qfilters",
        "--filters",
        filters_file().to_str().unwrap(),
        "--budget",
        "256",
        "-f",
        prompt.to_str().unwrap(),
        "-n",
        "4",
        "--json-stats",
        stats.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&stats).unwrap()).unwrap();
    assert!(s["prompt_tokens"].as_u64().unwrap() >= 3000);
    let peak = s["peak_cells"].as_u64().unwrap();
    let batch = s["n_batch"].as_u64().unwrap();
    assert!(peak <= 256 + batch, "peak cells {peak}");
}

#[test]
fn calibrate_on_a_missing_text_is_one_line_and_exit_1() {
    let o = qfilters(&[
        "calibrate",
        "-m",
        MODEL,
        "--text",
        "/nonexistent/text.txt",
        "-o",
        "/tmp/never.safetensors",
    ]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.starts_with("qfilters: ") && err.contains("/nonexistent/text.txt"));
}

/// The `expected-attention` statistics come from the same pass, with each layer's RoPE checked
/// against the model's own graph: on the three architectures of the suite (adjacent pairs;
/// NeoX with QKV bias; NeoX with QK-norm and sliding-window layers of another base) every
/// layer's RoPE is reproduced, and the statistics travel in the filters file.
#[test]
fn query_statistics_are_gathered_with_a_verified_rope_on_every_architecture() {
    use qfilters::calibrate::{calibrate, CalibrationConfig};
    use qfilters::policy::QueryStats;

    let f = QFilters::load(filters_file()).unwrap();
    let stats = QueryStats::from_filters(&f)
        .unwrap()
        .expect("calibrate stores the statistics");
    assert_eq!((stats.n_layer, stats.n_head, stats.head_dim), (30, 9, 64));
    assert!(stats.rope.iter().all(|r| !r.neox), "llama: adjacent pairs");

    for (path, neox, want_bases) in [
        (crate::common::qwen_path(), true, vec![1_000_000]),
        (crate::common::gemma_path(), true, vec![10_000, 1_000_000]),
    ] {
        let model = qfilters::ffi::Model::load(&path, &Default::default()).unwrap();
        let text = std::fs::read_to_string(data("tinyshakespeare.txt")).unwrap();
        let tokens = model.tokenize(&text[..20_000], false, false).unwrap();
        let cfg = CalibrationConfig {
            tokens: 600,
            seq_len: 600,
            samples: 100,
            threads: 1,
            ..CalibrationConfig::default()
        };
        let cal = calibrate(&model, &tokens, &cfg, &mut |_, _| {}).unwrap();
        let outcome = cal.query_stats;
        let stats = outcome
            .stats
            .unwrap_or_else(|| panic!("{}: {:?}", path.display(), outcome.skipped));
        assert_eq!(stats.n_layer, model.n_layer());
        assert!(
            stats.rope.iter().all(|r| r.neox == neox),
            "{:?}",
            stats.rope
        );
        assert!(stats
            .mean
            .iter()
            .chain(&stats.factor)
            .all(|x| x.is_finite()));
        assert!(outcome.variance_kept > 0.3 && outcome.variance_kept <= 1.0 + 1e-9);
        // Gemma-3's sliding-window layers rotate with base 10000, its global ones with 1e6.
        let bases: std::collections::BTreeSet<u32> =
            stats.rope.iter().map(|r| r.base as u32).collect();
        assert_eq!(
            bases.into_iter().collect::<Vec<_>>(),
            want_bases,
            "{}",
            path.display()
        );
    }
}
