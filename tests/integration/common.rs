//! Shared helpers for the integration tests: the models, the data files, the binary. The one
//! place that says where each of them is.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, OnceLock};

use qfilters::engine::{Engine, EngineConfig};
use qfilters::ffi::{Model, ModelParams};
use qfilters::policy::{self, PolicyInputs};

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The test model; the suite needs it (`scripts/test.sh` fetches it first).
pub fn model_path() -> PathBuf {
    let p = root().join(MODEL);
    assert!(
        p.is_file(),
        "{} missing: run scripts/fetch-model.sh (scripts/test.sh does)",
        p.display()
    );
    p
}

/// The second architecture of the suite: Qwen2.5-Coder-0.5B-Instruct (qwen2, QKV bias, 2 KV
/// heads, ChatML), fetched by `scripts/fetch-model.sh qwen05` (`scripts/test.sh` does).
pub fn qwen_path() -> PathBuf {
    let p = root().join(QWEN_MODEL);
    assert!(
        p.is_file(),
        "{} missing: run scripts/fetch-model.sh qwen05 (scripts/test.sh does)",
        p.display()
    );
    p
}

/// The third architecture of the suite: Gemma-3-270M (gemma3: sliding-window layers beside 3
/// full-attention ones, head_dim 256), fetched by `scripts/fetch-model.sh gemma3`
/// (`scripts/test.sh` does).
pub fn gemma_path() -> PathBuf {
    let p = root().join(GEMMA_MODEL);
    assert!(
        p.is_file(),
        "{} missing: run scripts/fetch-model.sh gemma3 (scripts/test.sh does)",
        p.display()
    );
    p
}

/// The default model (SmolLM2-135M-Instruct Q4_1), relative to the repository root.
pub const MODEL: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";
pub const QWEN_MODEL: &str = "models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf";
pub const GEMMA_MODEL: &str = "models/gemma-3-270m-Q4_K_M.gguf";

/// The default model on the CPU, loaded once for the whole test binary: tests only read it,
/// and each builds its own context.
pub fn smollm2() -> Arc<Model> {
    static LOADED: OnceLock<Arc<Model>> = OnceLock::new();
    Arc::clone(LOADED.get_or_init(|| load(&model_path())))
}

/// Qwen2.5-Coder-0.5B on the CPU, loaded once like [`smollm2`].
pub fn qwen() -> Arc<Model> {
    static LOADED: OnceLock<Arc<Model>> = OnceLock::new();
    Arc::clone(LOADED.get_or_init(|| load(&qwen_path())))
}

fn load(path: &Path) -> Arc<Model> {
    Model::load(path, &ModelParams::default())
        .unwrap_or_else(|e| panic!("{} does not load: {e}", path.display()))
}

/// An engine that never evicts (policy `none`): `capacity` cells, batches of `n_batch`, one
/// thread.
pub fn full_engine(model: &Arc<Model>, capacity: usize, n_batch: usize) -> Engine {
    let inputs = PolicyInputs {
        filters: None,
        seed: 0,
        recency: 0.0,
        mix_weight: 1.0,
    };
    let scorer = policy::build("none", &inputs).expect("policy none");
    let config = EngineConfig {
        n_batch,
        threads: 1,
        ..EngineConfig::full(capacity)
    };
    Engine::new(model, scorer, config).expect("full-cache engine")
}

/// The development data: `$QFILTERS_DATA_DIR`, else `../shared/data/` beside the repository.
pub fn data_dir() -> PathBuf {
    std::env::var_os("QFILTERS_DATA_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("../shared/data"))
}

pub fn data_file(name: &str) -> PathBuf {
    let p = data_dir().join(name);
    assert!(
        p.is_file(),
        "{} missing: the tests read ../shared/data/ beside the repository (or $QFILTERS_DATA_DIR)",
        p.display()
    );
    p
}

/// The first `chars` characters of a data file, cut at a character boundary.
pub fn data_text(name: &str, chars: usize) -> String {
    let text = std::fs::read_to_string(data_file(name)).expect("data file is UTF-8");
    text.chars().take(chars).collect()
}

/// The CLI binary cargo built for this test run.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_qfilters")
}

/// The CLI. Tests run side by side on few cores, and llama.cpp's worker threads spin while
/// they wait, so each process gets one thread (set `-t` again to override).
pub fn qfilters() -> Command {
    let mut cmd = Command::new(bin());
    cmd.env("QFILTERS_THREADS", "1");
    cmd
}

/// `qfilters run -m MODEL -p PROMPT -n N`, the start every generation test shares; the caller
/// adds its policy and outputs.
pub fn run_prompt(model: &Path, prompt: &str, n_predict: usize) -> Command {
    let mut cmd = qfilters();
    cmd.arg("run")
        .arg("-m")
        .arg(model)
        .args(["-p", prompt, "-n", &n_predict.to_string()]);
    cmd
}

pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("spawn qfilters");
    assert!(
        out.status.success(),
        "command failed ({:?}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Asserts the CLI failed with exactly one line on stderr mentioning `needle`.
pub fn assert_one_line_error(out: &Output, needle: &str) {
    assert_eq!(
        out.status.code(),
        Some(1),
        "exit code; stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one error line expected, got: {stderr}");
    assert!(lines[0].starts_with("qfilters: "), "prefix: {}", lines[0]);
    assert!(
        lines[0].contains(needle),
        "'{}' should mention '{needle}'",
        lines[0]
    );
    assert!(!stderr.contains("panicked"), "no panic: {stderr}");
}

/// Deterministic unit-norm filters of the given shape (the library's generator), saved in the
/// published layout.
pub fn random_filters(dir: &Path, seed: u64, layers: usize, heads: usize, dim: usize) -> PathBuf {
    let f =
        qfilters::bench::random_filters_of_shape(layers, heads, dim, seed).expect("valid filters");
    let path = dir.join("filters.safetensors");
    f.save(&path).expect("save filters");
    path
}
