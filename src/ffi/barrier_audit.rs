//! Which llama.cpp/ggml calls go through the exception barrier (shim.cpp), and why each other
//! direct call may skip it. A new direct call fails this test until it is wrapped or reviewed
//! here; a reviewed call that is no longer made fails it too, so the list stays the truth.
//!
//! Reviewed against the pinned llama.cpp (llama-cpp-sys-2 0.1.161). A C++ exception reaching
//! Rust aborts the process, so "cannot throw" below means: no `throw` on any path our
//! arguments can take. `std::bad_alloc` is not counted: an allocation failure aborts Rust's
//! own allocations the same way.

use std::collections::BTreeSet;
use std::path::Path;

/// The calls that can throw on inputs we pass, each made only through its `qf_` wrapper.
const WRAPPED: &[(&str, &str)] = &[
    ("qf_tokenize", "llama_tokenize"),
    ("qf_token_to_piece", "llama_token_to_piece"),
    ("qf_model_load_from_file", "llama_model_load_from_file"),
    ("qf_init_from_model", "llama_init_from_model"),
    ("qf_decode", "llama_decode"),
    ("qf_chat_apply_template", "llama_chat_apply_template"),
    ("qf_sampler_init_grammar", "llama_sampler_init_grammar"),
    ("qf_sampler_sample", "llama_sampler_sample"),
];

const GGML_C: &str = "defined in C (ggml.c, ggml-alloc.c): cannot throw";
const ACCESSOR: &str = "returns a field or a default struct: cannot throw";
const BACKEND: &str = "ggml-backend.cpp dispatch through the backend's interface table: no \
                       throw there (backend errors abort or return a status)";
const ALLOCATES: &str = "allocates and fills a struct: only std::bad_alloc";

/// Direct calls, each with the reason it needs no barrier.
const DIRECT: &[(&str, &str)] = &[
    ("ggml_blck_size", GGML_C),
    ("ggml_cont", GGML_C),
    ("ggml_mul_mat", GGML_C),
    ("ggml_new_tensor_3d", GGML_C),
    ("ggml_permute", GGML_C),
    ("ggml_rope_ext", GGML_C),
    ("ggml_build_forward_expand", GGML_C),
    ("ggml_free", GGML_C),
    ("ggml_get_rows", GGML_C),
    ("ggml_get_type_traits", GGML_C),
    ("ggml_graph_n_nodes", GGML_C),
    ("ggml_l2_norm", GGML_C),
    ("ggml_graph_node", GGML_C),
    ("ggml_graph_overhead_custom", GGML_C),
    ("ggml_init", GGML_C),
    ("ggml_is_contiguous", GGML_C),
    ("ggml_mul", GGML_C),
    ("ggml_nbytes", GGML_C),
    ("ggml_new_graph_custom", GGML_C),
    ("ggml_new_tensor_1d", GGML_C),
    ("ggml_new_tensor_2d", GGML_C),
    ("ggml_reshape_2d", GGML_C),
    ("ggml_reshape_3d", GGML_C),
    ("ggml_row_size", GGML_C),
    ("ggml_set_input", GGML_C),
    ("ggml_set_output", GGML_C),
    ("ggml_set_rows", GGML_C),
    ("ggml_sqr", GGML_C),
    ("ggml_sum_rows", GGML_C),
    ("ggml_tensor_overhead", GGML_C),
    ("ggml_threadpool_params_default", GGML_C),
    ("ggml_type_size", GGML_C),
    ("ggml_view_1d", GGML_C),
    ("ggml_view_2d", GGML_C),
    ("ggml_gallocr_alloc_graph", GGML_C),
    ("ggml_gallocr_free", GGML_C),
    ("ggml_gallocr_new", GGML_C),
    ("ggml_backend_alloc_ctx_tensors", GGML_C),
    ("ggml_backend_buffer_free", BACKEND),
    ("ggml_backend_buffer_get_type", BACKEND),
    ("ggml_backend_buffer_is_host", BACKEND),
    ("ggml_backend_buft_get_device", BACKEND),
    ("ggml_backend_dev_init", BACKEND),
    ("ggml_backend_dev_type", BACKEND),
    ("ggml_backend_free", BACKEND),
    ("ggml_backend_get_default_buffer_type", BACKEND),
    ("ggml_backend_get_device", BACKEND),
    ("ggml_backend_graph_compute", BACKEND),
    ("ggml_backend_init_by_type", BACKEND),
    ("ggml_backend_supports_op", BACKEND),
    (
        "ggml_backend_tensor_get",
        "asserts (abort, not throw) offset + size <= ggml_nbytes: every caller reads within it",
    ),
    (
        "ggml_backend_tensor_set",
        "asserts (abort, not throw) offset + size <= ggml_nbytes: every caller writes within it",
    ),
    (
        "ggml_backend_reg_by_name",
        "ggml-backend-reg.cpp: a name comparison over the registry",
    ),
    ("ggml_backend_reg_get_proc_address", BACKEND),
    (
        "ggml_backend_register",
        "ggml-backend-reg.cpp: appends the entry and its devices to the registry's vectors",
    ),
    (
        "ggml_backend_dev_by_type",
        "ggml-backend-reg.cpp: a loop over the registered devices",
    ),
    ("ggml_set_abort_callback", GGML_C),
    (
        "ggml_backend_load_all_from_path",
        "ggml-backend-reg.cpp: std::filesystem with error_code overloads, loader errors logged",
    ),
    ("llama_attach_threadpool", ACCESSOR),
    (
        "llama_backend_init",
        "initialises ggml's tables through ggml_init (C)",
    ),
    (
        "llama_batch_free",
        "free() of the arrays llama_batch_init made",
    ),
    (
        "llama_batch_init",
        "malloc() of the arrays: C-style, null on failure (checked)",
    ),
    (
        "llama_chat_builtin_templates",
        "copies names out of a static map into our buffer",
    ),
    ("llama_context_default_params", ACCESSOR),
    ("llama_free", "a destructor"),
    (
        "llama_get_logits_ith",
        "catches its own range errors and returns null in the Release build build.rs makes",
    ),
    ("llama_get_memory", ACCESSOR),
    ("llama_log_set", ACCESSOR),
    ("llama_memory_clear", "clears cells: no throw"),
    (
        "llama_memory_seq_rm",
        "asserts (abort) a valid sequence: always called with 0; any position range is accepted",
    ),
    (
        "llama_model_chat_template",
        "a map lookup keyed by the loaded model's (known) architecture",
    ),
    ("llama_model_default_params", ACCESSOR),
    ("llama_model_free", "a destructor"),
    ("llama_model_get_vocab", ACCESSOR),
    (
        "llama_model_meta_val_str",
        "a map lookup and snprintf into our sized buffer",
    ),
    ("llama_model_n_ctx_train", ACCESSOR),
    ("llama_model_n_embd", ACCESSOR),
    ("llama_model_n_head", ACCESSOR),
    ("llama_model_n_head_kv", ACCESSOR),
    ("llama_model_n_layer", ACCESSOR),
    ("llama_model_n_swa", ACCESSOR),
    ("llama_model_rope_freq_scale_train", ACCESSOR),
    (
        "llama_model_rope_type",
        "a switch over the architecture: no throw (an unknown one is a GGML_ABORT, which the abort callback reports)",
    ),
    ("llama_n_ctx", ACCESSOR),
    ("llama_sampler_chain_add", ALLOCATES),
    ("llama_sampler_chain_default_params", ACCESSOR),
    ("llama_sampler_chain_init", ALLOCATES),
    ("llama_sampler_free", "a destructor"),
    ("llama_sampler_init_dist", ALLOCATES),
    ("llama_sampler_init_greedy", ALLOCATES),
    ("llama_sampler_init_logit_bias", ALLOCATES),
    ("llama_sampler_init_penalties", ALLOCATES),
    ("llama_sampler_init_temp", ALLOCATES),
    ("llama_sampler_init_top_k", ALLOCATES),
    ("llama_sampler_init_top_p", ALLOCATES),
    ("llama_synchronize", "waits for the scheduler: no throw"),
    (
        "llama_vocab_get_attr",
        "id_to_token.at() throws out_of_range: Model range-checks every id first",
    ),
    ("llama_vocab_bos", ACCESSOR),
    ("llama_vocab_eos", ACCESSOR),
    ("llama_vocab_get_add_bos", ACCESSOR),
    ("llama_vocab_is_eog", "a set lookup: any id is accepted"),
    ("llama_vocab_n_tokens", ACCESSOR),
    ("llama_vocab_type", ACCESSOR),
];

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every `.rs` file under `dir`, recursively.
fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("src is readable") {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The names `prefix` is directly followed by and then `(`: the calls, not the types.
fn calls_after(text: &str, prefix: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (at, _) in text.match_indices(prefix) {
        let rest = &text[at + prefix.len()..];
        let name: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if rest[name.len()..].starts_with('(') && !name.is_empty() {
            out.insert(name);
        }
    }
    out
}

#[test]
fn every_direct_llama_call_is_wrapped_or_reviewed_as_unable_to_throw() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    rust_files(&root.join("src"), &mut files);
    let mut direct = BTreeSet::new();
    let mut shimmed = BTreeSet::new();
    // This file names calls in its own test text.
    files.retain(|f| !f.ends_with("ffi/barrier_audit.rs"));
    for f in &files {
        let text = read(f);
        direct.extend(calls_after(&text, "sys::"));
        shimmed.extend(calls_after(&text, "shim::"));
    }
    direct.retain(|n| {
        ["llama_", "ggml_", "gguf_"]
            .iter()
            .any(|p| n.starts_with(p))
    });

    let reviewed: BTreeSet<String> = DIRECT.iter().map(|(n, _)| n.to_string()).collect();
    let wrapped_targets: BTreeSet<String> = WRAPPED.iter().map(|(_, t)| t.to_string()).collect();
    let unreviewed: Vec<_> = direct.difference(&reviewed).collect();
    assert!(
        unreviewed.is_empty(),
        "direct llama.cpp calls neither wrapped in shim.cpp nor reviewed here: {unreviewed:?}"
    );
    let bypassed: Vec<_> = direct.intersection(&wrapped_targets).collect();
    assert!(
        bypassed.is_empty(),
        "wrapped calls made directly: {bypassed:?}"
    );
    let stale: Vec<_> = reviewed.difference(&direct).collect();
    assert!(stale.is_empty(), "reviewed calls no longer made: {stale:?}");
    for (n, why) in DIRECT {
        assert!(!why.is_empty(), "{n} has no reason");
    }

    // Each wrapper is used from Rust and, in shim.cpp, makes its call inside `guarded`.
    let shim = read(&root.join("src/ffi/shim.cpp"));
    for (wrapper, target) in WRAPPED {
        assert!(shimmed.contains(*wrapper), "{wrapper} is never called");
        let body = shim
            .split(&format!("int {wrapper}("))
            .nth(1)
            .and_then(|rest| rest.split("\n}\n").next())
            .unwrap_or_else(|| panic!("shim.cpp defines no {wrapper}"));
        let guarded = body
            .split("guarded(")
            .nth(1)
            .unwrap_or_else(|| panic!("{wrapper} does not use guarded()"));
        assert!(
            guarded.contains(&format!("{target}(")),
            "{wrapper} does not call {target} inside guarded()"
        );
    }
    let defined = calls_after(&shim, "int ")
        .into_iter()
        .filter(|n| n.starts_with("qf_"));
    let listed: BTreeSet<String> = WRAPPED.iter().map(|(w, _)| w.to_string()).collect();
    for d in defined {
        assert!(
            listed.contains(&d),
            "shim.cpp defines {d}, not listed in WRAPPED"
        );
    }
}

#[test]
fn the_call_scanner_finds_calls_and_skips_types() {
    let text = "let a = sys::llama_decode(x);\nlet b: sys::llama_batch = y;\nsys::ggml_free(\n z);";
    let found: Vec<_> = calls_after(text, "sys::").into_iter().collect();
    assert_eq!(found, ["ggml_free", "llama_decode"]);
}
