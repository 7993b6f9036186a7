//! The CPU threads qfilters gives ggml: a threadpool for llama.cpp's decodes, and a CPU backend
//! for qfilters' own small graphs. Every call that creates, sizes or frees CPU workers is here.

use std::ptr::NonNull;

use super::sys;

/// A ggml CPU threadpool, with the polling level qfilters chooses instead of ggml's default.
pub(super) struct ThreadPool(pub(super) NonNull<sys::ggml_threadpool>);

impl ThreadPool {
    pub(super) fn new(threads: i32, poll: u32) -> Option<ThreadPool> {
        // SAFETY: plain-data parameters filled by ggml; ggml_threadpool_new copies them and
        // returns null on failure.
        unsafe {
            let mut p = sys::ggml_threadpool_params_default(threads);
            p.poll = poll.min(100);
            NonNull::new(super::cpu_backend::threadpool_new(&mut p)).map(ThreadPool)
        }
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        // SAFETY: created by ggml_threadpool_new and freed once, after the context using it.
        unsafe { super::cpu_backend::threadpool_free(self.0.as_ptr()) }
    }
}

/// A CPU backend running on `threads` threads, null when ggml cannot create one.
///
/// SAFETY (caller): the backend is freed once with `ggml_backend_free`.
pub(super) unsafe fn cpu_backend(threads: i32) -> sys::ggml_backend_t {
    // SAFETY: a null parameter string is documented as "no parameters".
    let b = unsafe {
        sys::ggml_backend_init_by_type(sys::GGML_BACKEND_DEVICE_TYPE_CPU, std::ptr::null())
    };
    if !b.is_null() {
        // SAFETY: `b` was just created by the CPU device and is live.
        unsafe { super::cpu_backend::set_n_threads(b, threads.max(1)) };
    }
    b
}
