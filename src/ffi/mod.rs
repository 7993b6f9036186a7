//! The one module with `unsafe`: llama.cpp behind owned, safe handles, split along llama.cpp's
//! own seams (as llama-cpp-rs does): [`Model`] (model.rs), [`Context`] (context.rs), [`Batch`]
//! (batch.rs), [`Sampler`] (sampler.rs), chat templates (template.rs). Every handle frees its
//! llama.cpp object on drop; every `unsafe` block says beside it which invariant makes it sound;
//! nothing outside this module touches a raw pointer.
//!
//! # What may depend on llama.cpp internals
//!
//! The files above use llama.cpp's and ggml's public C API only. Two files rely on internals of
//! the llama.cpp this crate pins (the `llama.cpp/` folder of the crates.io package
//! `llama-cpp-sys-2` 0.1.161, see build.rs), which a llama.cpp upgrade may change without
//! notice; nothing else may:
//!
//! - `graph.rs`: the shape of the compute graph the eval callback sees, i.e. node names
//!   (`Kcur-<layer>`, `Qcur-<layer>`, `kq_soft_max-<layer>`: `<base>-<layer>`), the KV writes as
//!   `GGML_OP_SET_ROWS` nodes with `src[1]` = the I64 cell indices and `src[2]` = the destination
//!   cache tensor, and the callback's ask/observe protocol (patched: vendor/patches).
//! - `kv_tensors.rs` (with `kv_tensors/device.rs`): the KV cache tensors themselves, i.e. their
//!   names `cache_k_l<layer>` / `cache_v_l<layer>`, the layout `[n_head_kv * head_dim, n_cells]`
//!   (one row per cell, heads contiguous within a row), V stored the same way only with flash
//!   attention, and the rule that every layer of one cache writes through the same cell indices;
//!   and, for a quantized K cache, its Hadamard rotation: the graph input `attn_inp_k_rot` (an
//!   orthonormal Sylvester matrix, llama-kv-cache.cpp) whose product with the keys is written.
//!
//! The CPU threadpool and the CPU backend qfilters creates live in `threadpool.rs`.

// Inside an `unsafe fn`, each unsafe operation still needs its own block and SAFETY line.
#![deny(unsafe_op_in_unsafe_fn)]

use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Once;

use crate::error::{Error, Result};

#[cfg(test)]
mod barrier_audit;
mod batch;
mod context;
mod cpu_backend;
mod graph;
// No llama.cpp call: cheap checks on a model file before llama.cpp opens it.
pub mod gguf_check;
mod kv_tensors;
mod model;
pub mod rpc;
mod sampler;
mod template;
mod tensor;
mod threadpool;
// No llama.cpp call: the default thread count and the workers' polling level.
pub mod threads;

pub use batch::Batch;
pub use context::{CacheType, Context, ContextParams};
pub use graph::{GraphObserver, NodeInfo, NodeOp};
pub use kv_tensors::{HeadMoves, KeyReduce, KvTraffic, LiveReduce};
pub use model::{Model, ModelParams};
pub use sampler::{BadSampling, Sampler, SamplingParams, MAX_LOGIT_BIAS, PENALTY_WINDOW};
pub use template::{apply_chat_template, builtin_chat_templates};

#[allow(
    non_upper_case_globals,
    non_camel_case_types,
    non_snake_case,
    dead_code,
    improper_ctypes,
    clippy::all
)]
mod sys {
    include!(concat!(env!("OUT_DIR"), "/bindings.rs"));
}

pub type Token = sys::llama_token;

/// src/ffi/shim.cpp: each llama.cpp call that can throw, inside try/catch. Every function
/// returns 0, or 1 (out of memory) / 2 (another C++ exception) with the message kept for
/// `qf_last_error`; the call's own result goes through the last pointer.
mod shim {
    use super::sys;
    use std::ffi::{c_char, c_int};

    extern "C" {
        pub fn qf_last_error() -> *const c_char;
        pub fn qf_tokenize(
            vocab: *const sys::llama_vocab,
            text: *const c_char,
            text_len: i32,
            tokens: *mut sys::llama_token,
            n_tokens_max: i32,
            add_special: bool,
            parse_special: bool,
            result: *mut i32,
        ) -> c_int;
        pub fn qf_token_to_piece(
            vocab: *const sys::llama_vocab,
            token: sys::llama_token,
            buf: *mut c_char,
            length: i32,
            lstrip: i32,
            special: bool,
            result: *mut i32,
        ) -> c_int;
        pub fn qf_model_load_from_file(
            path: *const c_char,
            params: sys::llama_model_params,
            result: *mut *mut sys::llama_model,
        ) -> c_int;
        pub fn qf_init_from_model(
            model: *mut sys::llama_model,
            params: sys::llama_context_params,
            result: *mut *mut sys::llama_context,
        ) -> c_int;
        pub fn qf_decode(
            ctx: *mut sys::llama_context,
            batch: sys::llama_batch,
            result: *mut i32,
        ) -> c_int;
        pub fn qf_chat_apply_template(
            tmpl: *const c_char,
            chat: *const sys::llama_chat_message,
            n_msg: usize,
            add_ass: bool,
            buf: *mut c_char,
            length: i32,
            result: *mut i32,
        ) -> c_int;
        pub fn qf_sampler_init_grammar(
            vocab: *const sys::llama_vocab,
            grammar_str: *const c_char,
            grammar_root: *const c_char,
            result: *mut *mut sys::llama_sampler,
        ) -> c_int;
        pub fn qf_sampler_sample(
            smpl: *mut sys::llama_sampler,
            ctx: *mut sys::llama_context,
            idx: i32,
            result: *mut sys::llama_token,
        ) -> c_int;
    }
}

/// Turns a shim status into a typed error naming the llama.cpp call.
pub(crate) fn native(call: &'static str, status: std::ffi::c_int) -> Result<()> {
    if status == 0 {
        return Ok(());
    }
    // SAFETY: qf_last_error returns this thread's NUL-terminated message, set by the shim call
    // that just failed on this thread and valid until the next one; it is copied at once.
    let what = unsafe { CStr::from_ptr(shim::qf_last_error()) }
        .to_string_lossy()
        .into_owned();
    Err(Error::Native { call, what })
}

static BACKEND_INIT: Once = Once::new();
static VERBOSE_LOG: AtomicBool = AtomicBool::new(false);

/// llama.cpp logs to stderr by default; a CLI wants that only with --verbose.
pub fn set_verbose_log(verbose: bool) {
    VERBOSE_LOG.store(verbose, Ordering::Relaxed);
}

extern "C" fn log_sink(_level: sys::ggml_log_level, text: *const c_char, _user: *mut c_void) {
    if VERBOSE_LOG.load(Ordering::Relaxed) && !text.is_null() {
        // SAFETY: llama.cpp passes a NUL-terminated string valid for the duration of the call.
        let text = unsafe { CStr::from_ptr(text) };
        eprint!("{}", text.to_string_lossy());
    }
}

/// Which CPU code ggml runs (the build kind, and the variant loaded for this CPU), in one line.
pub fn cpu_backend() -> String {
    init_backend();
    cpu_backend::describe()
}

extern "C" {
    // glibc's `_exit`: ends the process at once, without running exit handlers that could
    // meet other threads inside llama.cpp's static state.
    fn _exit(status: c_int) -> !;
}

/// What ggml calls instead of printing a backtrace, just before it would `abort()`: the message
/// becomes the CLIs' one error line and the process exits with status 1, never a signal. A
/// GGML_ASSERT the preflight (gguf_check) did not foresee, or ggml-rpc losing a host, ends here.
extern "C" fn on_ggml_abort(message: *const c_char) {
    let what = if message.is_null() {
        "an internal error".into()
    } else {
        // SAFETY: ggml passes its NUL-terminated message buffer, alive during this call.
        unsafe { CStr::from_ptr(message) }.to_string_lossy()
    };
    // ggml starts its message with the source path: the file name is enough.
    let first = what.lines().next().unwrap_or("").trim();
    let short = match first.split_once(": ") {
        Some((place, rest)) => format!("{}: {rest}", place.rsplit('/').next().unwrap_or(place)),
        None => first.to_string(),
    };
    // ggml-rpc's one message for a lost host (RPC_STATUS_ASSERT) blames a crash; with
    // vendor/patches/rpc-socket-timeout.patch it also means the host did not answer in time.
    let hint = if first.contains("Remote RPC server") {
        ": an --rpc host closed the connection, or gave no answer within --rpc-timeout"
    } else {
        ""
    };
    let line = format!("qfilters: llama.cpp stopped ({short}{hint}); nothing more was written\n");
    let _ = std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes());
    // SAFETY: `_exit` takes any status and does not return.
    unsafe { _exit(1) }
}

pub(crate) fn init_backend() {
    BACKEND_INIT.call_once(|| {
        // SAFETY: called once per process before any other llama.cpp call; `log_sink` and
        // `on_ggml_abort` are plain functions that live for the whole program (the log sink
        // ignores its user pointer).
        unsafe {
            sys::ggml_set_abort_callback(Some(on_ggml_abort));
            sys::llama_log_set(Some(log_sink), std::ptr::null_mut());
            // Before llama_backend_init, which loads backends only from the executable's
            // folder and the current directory when none is registered.
            cpu_backend::load();
            sys::llama_backend_init();
        }
    });
}
