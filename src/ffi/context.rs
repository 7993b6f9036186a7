//! A llama.cpp context: decoding, logits, the memory (KV cache) API (public API only; the
//! hook it installs is graph.rs, the direct cache access kv_tensors.rs).

use std::ffi::c_void;
use std::ptr::NonNull;
use std::sync::Arc;

use super::graph::{eval_callback, GraphObserver, HookState};
use super::kv_tensors::DeviceGraphs;
use super::threadpool::ThreadPool;
use super::{native, shim, sys, Batch, Model};
use crate::error::{Error, Result};

/// Knobs of a llama.cpp context, with the defaults qfilters uses.
#[derive(Debug, Clone)]
pub struct ContextParams {
    /// KV cells to allocate (llama.cpp may round this up).
    pub n_ctx: u32,
    /// Most tokens one `decode` call may carry.
    pub n_batch: u32,
    /// CPU threads; with more than one, their polling level is [`crate::ffi::threads::poll`].
    pub threads: i32,
    /// `Some(true)` forces flash attention on, `Some(false)` off, `None` lets llama.cpp choose.
    pub flash_attn: Option<bool>,
    /// Install the graph hook (eval callback). Without it nothing can be observed or evicted
    /// by score; benchmarks compare against this.
    pub hook: bool,
    /// Storage types of the K and V caches.
    pub type_k: CacheType,
    pub type_v: CacheType,
}

impl Default for ContextParams {
    fn default() -> Self {
        Self {
            n_ctx: 4096,
            n_batch: 512,
            threads: crate::ffi::threads::default_threads(),
            flash_attn: None,
            hook: true,
            type_k: CacheType::F16,
            type_v: CacheType::F16,
        }
    }
}

/// Storage type of the K or V cache: the values of llama.cpp's `--cache-type-k/-v`, with its
/// names. Quantized types store blocks of values with a scale; llama.cpp keeps such a cache
/// Hadamard-rotated (see `Context::k_rotation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub enum CacheType {
    F32,
    #[default]
    F16,
    Bf16,
    Q8_0,
    Q4_0,
    Q4_1,
    Iq4Nl,
    Q5_0,
    Q5_1,
}

impl CacheType {
    /// Every type, in llama.cpp's order (common/arg.cpp's `kv_cache_types`).
    pub const ALL: [CacheType; 9] = [
        CacheType::F32,
        CacheType::F16,
        CacheType::Bf16,
        CacheType::Q8_0,
        CacheType::Q4_0,
        CacheType::Q4_1,
        CacheType::Iq4Nl,
        CacheType::Q5_0,
        CacheType::Q5_1,
    ];

    /// llama.cpp's name (ggml's type name).
    pub fn name(self) -> &'static str {
        match self {
            CacheType::F32 => "f32",
            CacheType::F16 => "f16",
            CacheType::Bf16 => "bf16",
            CacheType::Q8_0 => "q8_0",
            CacheType::Q4_0 => "q4_0",
            CacheType::Q4_1 => "q4_1",
            CacheType::Iq4Nl => "iq4_nl",
            CacheType::Q5_0 => "q5_0",
            CacheType::Q5_1 => "q5_1",
        }
    }

    pub(super) fn ggml(self) -> sys::ggml_type {
        match self {
            CacheType::F32 => sys::GGML_TYPE_F32,
            CacheType::F16 => sys::GGML_TYPE_F16,
            CacheType::Bf16 => sys::GGML_TYPE_BF16,
            CacheType::Q8_0 => sys::GGML_TYPE_Q8_0,
            CacheType::Q4_0 => sys::GGML_TYPE_Q4_0,
            CacheType::Q4_1 => sys::GGML_TYPE_Q4_1,
            CacheType::Iq4Nl => sys::GGML_TYPE_IQ4_NL,
            CacheType::Q5_0 => sys::GGML_TYPE_Q5_0,
            CacheType::Q5_1 => sys::GGML_TYPE_Q5_1,
        }
    }

    /// Values per storage block: 1 for the float types, 32 for the quantized ones (ggml's).
    pub fn block_size(self) -> usize {
        // SAFETY: a plain table lookup for a valid type.
        let b = unsafe { sys::ggml_blck_size(self.ggml()) };
        usize::try_from(b).unwrap_or(1).max(1)
    }

    pub fn is_quantized(self) -> bool {
        self.block_size() > 1
    }

    /// Bytes that `n` values take, `n` a multiple of [`CacheType::block_size`] (else `None`).
    pub fn bytes(self, n: usize) -> Option<usize> {
        if !crate::math::whole_blocks(n, self.block_size()) {
            return None;
        }
        // SAFETY: a plain table lookup for a valid type.
        let size = unsafe { sys::ggml_type_size(self.ggml()) };
        Some(n / self.block_size() * size)
    }
}

impl std::fmt::Display for CacheType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for CacheType {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        CacheType::ALL
            .into_iter()
            .find(|t| t.name() == s)
            .ok_or_else(|| {
                let known: Vec<&str> = CacheType::ALL.iter().map(|t| t.name()).collect();
                Error::invalid(format!(
                    "unknown cache type '{s}' (known: {})",
                    known.join(", ")
                ))
            })
    }
}

/// A llama.cpp context (one sequence) with the graph hook installed.
pub struct Context {
    pub(super) ptr: NonNull<sys::llama_context>,
    /// Our own CPU threadpool (None with one thread: ggml then runs on the calling thread).
    /// Declared after `ptr` so it is freed after the context that uses it; held only for that.
    #[allow(dead_code)]
    threadpool: Option<ThreadPool>,
    pub(super) hook: Box<HookState>,
    /// Whether the eval callback is installed (`ContextParams::hook`).
    hooked: bool,
    model: Arc<Model>,
    pub(super) threads: i32,
    /// Graphs on the cache's device, made when first needed.
    pub(super) device: Option<DeviceGraphs>,
    /// No backend reaches the cache tensors: host paths only.
    pub(super) device_unusable: bool,
}

// SAFETY: the context is used from one thread at a time (&mut for every mutation); the hook's
// raw tensor pointers are only dereferenced through &self/&mut self methods of this context.
unsafe impl Send for Context {}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from llama_init_from_model and is freed once; the hook box and the
        // threadpool are freed after this (field drop order), so neither the callback nor a
        // worker ever sees a dangling pointer.
        unsafe { sys::llama_free(self.ptr.as_ptr()) }
    }
}

impl Context {
    pub fn new(model: &Arc<Model>, params: &ContextParams) -> Result<Context> {
        let mut hook = Box::<HookState>::default();
        // SAFETY: default params are plain data.
        let mut cp = unsafe { sys::llama_context_default_params() };
        cp.n_ctx = params.n_ctx;
        cp.n_batch = params.n_batch;
        cp.n_ubatch = params.n_batch;
        cp.n_seq_max = 1;
        cp.n_threads = params.threads;
        cp.n_threads_batch = params.threads;
        cp.no_perf = true;
        // Sliding-window layers get their own cache sized to the window, not a full-size one:
        // the engine tells full-attention layers (the ones it tracks) from SWA layers by cache
        // size, and SWA layers prune old positions themselves, so a full-size SWA cache would
        // be mistaken for the full one.
        cp.swa_full = false;
        cp.type_k = params.type_k.ggml();
        cp.type_v = params.type_v.ggml();
        cp.flash_attn_type = match params.flash_attn {
            Some(true) => sys::LLAMA_FLASH_ATTN_TYPE_ENABLED,
            Some(false) => sys::LLAMA_FLASH_ATTN_TYPE_DISABLED,
            None => sys::LLAMA_FLASH_ATTN_TYPE_AUTO,
        };
        if params.hook {
            cp.cb_eval = Some(eval_callback);
            cp.cb_eval_user_data = &mut *hook as *mut HookState as *mut c_void;
        }
        let mut raw = std::ptr::null_mut();
        // SAFETY: the model outlives the context (we keep an Arc); the callback's user pointer
        // is the boxed hook, which the context owns and drops after llama_free; `raw` is a
        // valid result place.
        native("llama_init_from_model", unsafe {
            shim::qf_init_from_model(model.ptr.as_ptr(), cp, &mut raw)
        })?;
        let ptr = NonNull::new(raw).ok_or(Error::ContextCreate {
            n_ctx: params.n_ctx,
        })?;
        // With more than one thread, attach a pool whose idle workers sleep instead of spinning
        // (ggml's own pool polls): the one knob that keeps a busy machine usable.
        let threadpool = if params.threads > 1 {
            ThreadPool::new(params.threads, crate::ffi::threads::poll())
        } else {
            None
        };
        if let Some(pool) = &threadpool {
            // SAFETY: valid context and pool; the pool outlives the context (drop order).
            unsafe { sys::llama_attach_threadpool(ptr.as_ptr(), pool.0.as_ptr(), pool.0.as_ptr()) }
        }
        Ok(Context {
            ptr,
            threadpool,
            hook,
            hooked: params.hook,
            model: Arc::clone(model),
            threads: params.threads,
            device: None,
            device_unusable: false,
        })
    }

    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    /// Cells allocated for the KV cache (after llama.cpp's rounding).
    pub fn n_ctx(&self) -> usize {
        // SAFETY: valid context pointer.
        unsafe { sys::llama_n_ctx(self.ptr.as_ptr()) as usize }
    }

    /// Decodes `batch` while `observer` sees the graph nodes it asks for (see
    /// [`GraphObserver`]); the observer is lent for this one decode only.
    pub fn decode_observed(
        &mut self,
        batch: &Batch,
        observer: &mut dyn GraphObserver,
    ) -> Result<()> {
        if !self.hooked {
            return Err(Error::invalid(
                "internal: observing a decode needs a context created with the hook",
            ));
        }
        let ptr: NonNull<dyn GraphObserver + '_> = NonNull::from(observer);
        // SAFETY: only the lifetime is changed. `decode_with` stores the pointer for this one
        // decode and clears it before returning; every decode sets it afresh before llama.cpp
        // can call the hook, so a pointer left by an unwound call is never read.
        let ptr: NonNull<dyn GraphObserver + 'static> = unsafe { std::mem::transmute(ptr) };
        self.decode_with(batch, Some(ptr))
    }

    pub fn decode(&mut self, batch: &Batch) -> Result<()> {
        self.decode_with(batch, None)
    }

    fn decode_with(
        &mut self,
        batch: &Batch,
        observer: Option<NonNull<dyn GraphObserver>>,
    ) -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        self.hook.batch_cells.clear();
        self.hook.observer = observer;
        let mut code = 0;
        // SAFETY: the batch arrays are valid for n_tokens entries; the context is exclusively
        // borrowed, so the callback's access to the hook does not alias any Rust reference;
        // the observer pointer, if any, is valid for this call (`decode_observed`); `code` is
        // a valid result place.
        let status = unsafe { shim::qf_decode(self.ptr.as_ptr(), batch.raw, &mut code) };
        self.hook.observer = None;
        native("llama_decode", status)?;
        if let Some(msg) = self.hook.failed.take() {
            return Err(Error::KvCache(msg));
        }
        match code {
            0 => Ok(()),
            1 => Err(Error::Decode { code, hint: "no free KV cell for the batch (the cache is full: give it more cells or decode smaller batches)" }),
            2 => Err(Error::Decode { code, hint: "aborted (an internal callback failed)" }),
            _ => Err(Error::Decode { code, hint: "llama.cpp rejected the batch (run with --verbose for its log)" }),
        }
    }

    /// Logits of the `i`-th token of the last batch (which must have asked for them).
    pub fn logits(&self, i: usize) -> Result<&[f32]> {
        let n_vocab = self.model.n_vocab();
        // A negative index means "from the end" to llama.cpp: an index that does not fit is
        // refused here rather than wrapped into one.
        let Ok(idx) = i32::try_from(i) else {
            return Err(Error::invalid(format!("no logits for batch token {i}")));
        };
        // SAFETY: valid context; llama_get_logits_ith range-checks `idx` inside a try/catch
        // and, in the Release build build.rs makes (NDEBUG), returns null for a token without
        // logits instead of aborting.
        let p = unsafe { sys::llama_get_logits_ith(self.ptr.as_ptr(), idx) };
        if p.is_null() {
            return Err(Error::invalid(format!("no logits for batch token {i}")));
        }
        // SAFETY: non-null logits rows hold n_vocab floats, valid until the next decode, which
        // needs &mut self and so cannot happen while this borrow lives.
        Ok(unsafe { std::slice::from_raw_parts(p, n_vocab) })
    }

    fn memory(&self) -> sys::llama_memory_t {
        // SAFETY: valid context pointer; the memory object is owned by the context.
        unsafe { sys::llama_get_memory(self.ptr.as_ptr()) }
    }

    /// Removes positions [p0, p1) of sequence 0 from every layer and head.
    pub fn remove_positions(&mut self, p0: i32, p1: i32) -> bool {
        // SAFETY: valid memory handle; any range is accepted.
        unsafe { sys::llama_memory_seq_rm(self.memory(), 0, p0, p1) }
    }

    pub fn clear_memory(&mut self) {
        // SAFETY: valid memory handle.
        unsafe { sys::llama_memory_clear(self.memory(), true) }
    }

    /// Waits until the backends have finished the last decode. `llama_decode` may return while
    /// a GPU still computes (always without a callback, and with one since
    /// vendor/patches/sched-eval-callback.patch): every direct read or write of a cache
    /// tensor, or of a graph input, calls this first. Cheap when nothing is pending.
    pub(super) fn synchronize(&self) {
        // SAFETY: valid context pointer.
        unsafe { sys::llama_synchronize(self.ptr.as_ptr()) }
    }
}
