//! ggml's CPU backend, reached through its registry so that one code path serves both builds:
//! the default one, where the CPU backend is a module (`libggml-cpu-<variant>.so`) that ggml
//! picks for the running CPU and loads at start-up, and the static ones (`native`, `amx`,
//! `cuda`, `dynamic-link`), where it is linked in and registered from the start.
//!
//! With a loaded module, the CPU functions qfilters needs (thread count, threadpool) are not
//! symbols the binary can link against: they exist only in the module, and ggml hands them out
//! by name through `ggml_backend_reg_get_proc_address` (ggml-cpu.cpp). Static builds expose
//! the same names, so nothing here depends on how ggml was built.

use std::ffi::{c_void, CStr, CString};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use super::sys;
use crate::error::{Error, Result};

type SetNThreads = unsafe extern "C" fn(sys::ggml_backend_t, i32);
type ThreadpoolNew =
    unsafe extern "C" fn(*mut sys::ggml_threadpool_params) -> *mut sys::ggml_threadpool;
type ThreadpoolFree = unsafe extern "C" fn(*mut sys::ggml_threadpool);

/// The CPU backend's entry points, resolved once.
struct Cpu {
    set_n_threads: SetNThreads,
    threadpool_new: ThreadpoolNew,
    threadpool_free: ThreadpoolFree,
    /// Which CPU code runs: the loaded variant, or the build's static target.
    variant: String,
}

/// Why no CPU backend is usable, kept as text: the error is rebuilt for every caller.
static CPU: OnceLock<std::result::Result<Cpu, String>> = OnceLock::new();

/// How this binary's llama.cpp was built (build.rs: `dispatch`, `baseline`, `native-noamx`,
/// `native-amx`, `prebuilt`).
const BUILD: &str = env!("QFILTERS_CPU_BUILD");

/// Makes sure a CPU backend is registered: loads the best variant when ggml has none built in.
/// Must run before `llama_backend_init`, which would otherwise search only the executable's
/// folder and the current directory.
pub(super) fn load() {
    CPU.get_or_init(resolve);
}

/// The loaded CPU backend, or the one-line reason there is none.
fn cpu() -> Result<&'static Cpu> {
    match CPU.get_or_init(resolve) {
        Ok(cpu) => Ok(cpu),
        Err(why) => Err(Error::NoCpuBackend(why.clone())),
    }
}

/// Fails when no CPU backend could be loaded; every model load checks this first.
pub(super) fn check() -> Result<()> {
    cpu().map(|_| ())
}

/// The folders searched for CPU variants, in order: `QFILTERS_BACKEND_DIR` alone when set (a
/// packager's own layout), else the executable's own folder (a copied install keeps the
/// modules beside the binary), then the folder the build put them in (`cargo run`, and
/// `cargo test` binaries under target/release/deps).
fn search_dirs() -> Vec<PathBuf> {
    if let Some(dir) = std::env::var_os("QFILTERS_BACKEND_DIR") {
        return vec![PathBuf::from(dir)];
    }
    let mut dirs = Vec::new();
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
    {
        dirs.push(dir);
    }
    let built = PathBuf::from(env!("QFILTERS_BUILD_BACKEND_DIR"));
    if !dirs.contains(&built) {
        dirs.push(built);
    }
    dirs
}

fn cpu_reg() -> sys::ggml_backend_reg_t {
    // SAFETY: a NUL-terminated literal; ggml returns a registered backend or null.
    unsafe { sys::ggml_backend_reg_by_name(c"CPU".as_ptr()) }
}

fn resolve() -> std::result::Result<Cpu, String> {
    let mut reg = cpu_reg();
    let built_in = !reg.is_null();
    let dirs = search_dirs();
    if !built_in {
        for dir in &dirs {
            let Ok(text) = CString::new(dir.as_os_str().as_encoded_bytes()) else {
                continue;
            };
            // SAFETY: a NUL-terminated path; ggml only reads it. It scores every
            // libggml-<name>-*.so there (each module's ggml_backend_score checks the running
            // CPU's features) and registers the best one of each kind.
            unsafe { sys::ggml_backend_load_all_from_path(text.as_ptr()) };
            reg = cpu_reg();
            if !reg.is_null() {
                break;
            }
        }
    }
    if reg.is_null() {
        let searched: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
        return Err(format!(
            "no libggml-cpu-*.so usable on this CPU in {}: keep the build's libggml*.so and libllama.so files (target/llama-cpp/*/lib) beside the qfilters binary or point QFILTERS_BACKEND_DIR at them, or build again with `cargo build --release`",
            searched.join(" or ")
        ));
    }
    let proc = |name: &CStr| -> std::result::Result<*mut c_void, String> {
        // SAFETY: `reg` is a registered backend (non-null, lives until the process ends: we
        // never unload it); the name is NUL-terminated.
        let p = unsafe { sys::ggml_backend_reg_get_proc_address(reg, name.as_ptr()) };
        if p.is_null() {
            Err(format!(
                "the loaded CPU backend has no {} (a llama.cpp other than the pinned one?)",
                name.to_string_lossy()
            ))
        } else {
            Ok(p)
        }
    };
    let set_n_threads = proc(c"ggml_backend_set_n_threads")?;
    let threadpool_new = proc(c"ggml_threadpool_new")?;
    let threadpool_free = proc(c"ggml_threadpool_free")?;
    // SAFETY: ggml-cpu.cpp returns exactly these functions under these names, with the
    // signatures of ggml-backend.h (ggml_backend_set_n_threads_t) and ggml-cpu.h
    // (ggml_threadpool_new, ggml_threadpool_free), which the aliases above copy.
    let (set_n_threads, threadpool_new, threadpool_free) = unsafe {
        (
            std::mem::transmute::<*mut c_void, SetNThreads>(set_n_threads),
            std::mem::transmute::<*mut c_void, ThreadpoolNew>(threadpool_new),
            std::mem::transmute::<*mut c_void, ThreadpoolFree>(threadpool_free),
        )
    };
    let variant = if built_in {
        format!("{BUILD}, built in")
    } else {
        match loaded_variant() {
            Some(tag) => format!("{BUILD}, variant {tag}"),
            None => format!("{BUILD}, variant unknown"),
        }
    };
    Ok(Cpu {
        set_n_threads,
        threadpool_new,
        threadpool_free,
        variant,
    })
}

/// The tag of the `libggml-cpu-<tag>.so` mapped into this process. ggml maps every candidate
/// while scoring and unmaps all but the one it keeps, so exactly one is left.
fn loaded_variant() -> Option<String> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines().find_map(|line| {
        let file = line.rsplit('/').next()?;
        let tag = file.strip_prefix("libggml-cpu-")?.strip_suffix(".so")?;
        Some(tag.to_string())
    })
}

/// One line for `--version` and the JSON stats: the build kind and the CPU code in use.
pub fn describe() -> String {
    match cpu() {
        Ok(cpu) => cpu.variant.clone(),
        Err(e) => format!("{BUILD}, none loaded: {e}"),
    }
}

// The three wrappers below are only reached with a live CPU backend or pool, which exist only
// once the registry resolved: `cpu()` cannot fail there, and a failure would have no object to
// act on, so they do nothing rather than invent an error path.

/// `ggml_backend_cpu_set_n_threads` for a CPU backend made by `ggml_backend_init_by_type`.
///
/// SAFETY (caller): `backend` is a live CPU backend.
pub(super) unsafe fn set_n_threads(backend: sys::ggml_backend_t, threads: i32) {
    if let Ok(cpu) = cpu() {
        // SAFETY: `set_n_threads` was resolved from the CPU backend library with this
        // signature; `backend` is live (caller).
        unsafe { (cpu.set_n_threads)(backend, threads) };
    }
}

/// A ggml threadpool; null on failure.
///
/// SAFETY (caller): `params` points to initialised parameters (ggml copies them).
pub(super) unsafe fn threadpool_new(
    params: *mut sys::ggml_threadpool_params,
) -> *mut sys::ggml_threadpool {
    match cpu() {
        // SAFETY: resolved with this signature; `params` is initialised (caller).
        Ok(cpu) => unsafe { (cpu.threadpool_new)(params) },
        Err(_) => std::ptr::null_mut(),
    }
}

/// Frees a threadpool made by [`threadpool_new`].
///
/// SAFETY (caller): `pool` came from [`threadpool_new`] and is freed once, after its last use.
pub(super) unsafe fn threadpool_free(pool: *mut sys::ggml_threadpool) {
    if let Ok(cpu) = cpu() {
        // SAFETY: resolved with this signature; `pool` is ours and freed once (caller).
        unsafe { (cpu.threadpool_free)(pool) };
    }
}
