//! ggml's RPC backend (cargo feature `rpc`): serving this machine's CPU to other hosts
//! (`qfilters rpc-server`), and adding remote hosts' devices to this process (`--rpc`).
//!
//! Reached through ggml's backend registry, as llama.cpp's `common/arg.cpp` does, because in
//! the default (dispatch) build the RPC backend is a module ggml loads at run time, like the
//! CPU variants: its functions are handed out by name (`ggml_backend_reg_get_proc_address`).
//!
//! ggml-rpc (pinned llama.cpp) aborts the process when a host cannot be reached or stops
//! answering (`GGML_ABORT` in `rpc_dispatcher::start` and `RPC_STATUS_ASSERT`). So a host is
//! checked here with a plain TCP connection, with a timeout, before ggml is given it, and the
//! abort callback `init_backend` installs turns an abort later on into one line and exit 1.

use std::ffi::{c_char, c_void, CStr, CString};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::Mutex;
use std::time::Duration;

use super::sys;
use crate::error::{Error, Result};

type AddServer = unsafe extern "C" fn(endpoint: *const c_char) -> sys::ggml_backend_reg_t;
type StartServer = unsafe extern "C" fn(
    endpoint: *const c_char,
    cache_dir: *const c_char,
    n_threads: usize,
    n_devices: usize,
    devices: *mut sys::ggml_backend_dev_t,
);

/// The hosts whose devices this process registered (ggml keeps them for the process's life).
static ADDED: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// How long a host may take to accept a connection at start.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Whether this build has ggml's RPC backend.
pub fn built_in() -> bool {
    cfg!(feature = "rpc")
}

/// The RPC backend's registry entry, or the line saying how to get one.
fn rpc_reg() -> Result<sys::ggml_backend_reg_t> {
    super::init_backend();
    // SAFETY: a NUL-terminated literal; ggml returns a registered backend or null.
    let reg = unsafe { sys::ggml_backend_reg_by_name(c"RPC".as_ptr()) };
    if reg.is_null() {
        return Err(Error::invalid(
            "this build has no RPC backend: build with `cargo build --release --features rpc`",
        ));
    }
    Ok(reg)
}

/// A function of the RPC backend, by name.
fn proc_address(name: &CStr) -> Result<*mut c_void> {
    let reg = rpc_reg()?;
    // SAFETY: `reg` is a registered backend (non-null, checked); `name` is NUL-terminated.
    let f = unsafe { sys::ggml_backend_reg_get_proc_address(reg, name.as_ptr()) };
    if f.is_null() {
        return Err(Error::invalid(format!(
            "the RPC backend has no {}: rebuild llama.cpp with this version's sources",
            name.to_string_lossy()
        )));
    }
    Ok(f)
}

/// `host:port` checked for what ggml-rpc would abort on: a port, a host that resolves, and
/// a server that accepts a connection within [`CONNECT_TIMEOUT`].
pub fn check_endpoint(endpoint: &str) -> Result<SocketAddr> {
    let bad = |why: String| Error::invalid(format!("RPC host {endpoint}: {why}"));
    let Some((host, port)) = endpoint.rsplit_once(':') else {
        return Err(bad("give it as HOST:PORT".into()));
    };
    if host.is_empty() || port.parse::<u16>().is_err() {
        return Err(bad("give it as HOST:PORT".into()));
    }
    let addr = endpoint
        .to_socket_addrs()
        .map_err(|e| bad(format!("cannot resolve it ({e})")))?
        .next()
        .ok_or_else(|| bad("cannot resolve it".into()))?;
    TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT).map_err(|e| {
        bad(format!(
            "cannot connect within {} s ({e}): is `qfilters rpc-server` running there?",
            CONNECT_TIMEOUT.as_secs()
        ))
    })?;
    Ok(addr)
}

/// Adds each host's devices to ggml's registry, so that a model loaded afterwards can put
/// layers on them (`-ngl`). Every host is checked first: nothing is added unless all answer.
pub fn add_servers(endpoints: &[String]) -> Result<()> {
    if endpoints.is_empty() {
        return Ok(());
    }
    // SAFETY: the registry hands out `ggml_backend_rpc_add_server` under this name with this
    // signature (ggml-rpc.h). Looked up first: a build without RPC says so before connecting.
    let add = unsafe {
        std::mem::transmute::<*mut c_void, AddServer>(proc_address(c"ggml_backend_rpc_add_server")?)
    };
    let mut added = ADDED.lock().unwrap_or_else(|p| p.into_inner());
    let new: Vec<&String> = endpoints.iter().filter(|e| !added.contains(*e)).collect();
    for (i, e) in new.iter().enumerate() {
        if new[..i].contains(e) {
            return Err(Error::invalid(format!("RPC host {e} is given twice")));
        }
        check_endpoint(e)?;
    }
    for e in new {
        let c = CString::new(e.as_str())
            .map_err(|_| Error::invalid("an RPC endpoint contains a NUL byte"))?;
        // SAFETY: `c` is NUL-terminated and outlives the call. The host accepted a connection
        // just above; if it vanished since, ggml aborts, which the abort callback turns into
        // one line and exit 1.
        let reg = unsafe { add(c.as_ptr()) };
        if reg.is_null() {
            return Err(Error::invalid(format!(
                "RPC host {e}: ggml could not add it"
            )));
        }
        // SAFETY: a registry entry ggml just made for a new endpoint (ggml returns the same
        // entry for an endpoint it knows, which `ADDED` keeps from being registered twice).
        unsafe { sys::ggml_backend_register(reg) };
        added.push(e.clone());
    }
    Ok(())
}

/// Serves this machine's CPU to RPC clients on `endpoint` (`host:port`) with `threads`
/// threads; returns only if ggml's server cannot start.
pub fn serve(endpoint: &str, threads: usize) -> Result<()> {
    // SAFETY: the registry hands out `ggml_backend_rpc_start_server` under this name with this
    // signature (ggml-rpc.h).
    let start = unsafe {
        std::mem::transmute::<*mut c_void, StartServer>(proc_address(
            c"ggml_backend_rpc_start_server",
        )?)
    };
    // SAFETY: plain registry lookup; null when no CPU device is registered.
    let mut cpu = unsafe { sys::ggml_backend_dev_by_type(sys::GGML_BACKEND_DEVICE_TYPE_CPU) };
    if cpu.is_null() {
        return Err(Error::invalid("no CPU device to serve"));
    }
    let c =
        CString::new(endpoint).map_err(|_| Error::invalid("the endpoint contains a NUL byte"))?;
    // SAFETY: `c` is NUL-terminated and outlives the call; a null cache folder turns ggml's
    // tensor cache off; `cpu` is one live device, passed as an array of one.
    unsafe { start(c.as_ptr(), std::ptr::null(), threads.max(1), 1, &mut cpu) };
    Err(Error::invalid(format!(
        "the RPC server on {endpoint} stopped (is the port free? run with --verbose for ggml's log)"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_need_a_host_and_a_port_and_an_answer() {
        for bad in ["localhost", ":50052", "localhost:port", "localhost:70000"] {
            let e = check_endpoint(bad).unwrap_err().to_string();
            assert!(e.contains("HOST:PORT"), "{bad}: {e}");
        }
        // A port nothing listens on: bind one, then free it.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let e = check_endpoint(&format!("127.0.0.1:{port}"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("cannot connect") && e.contains("rpc-server"),
            "{e}"
        );
        let live = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = live.local_addr().unwrap();
        assert_eq!(check_endpoint(&addr.to_string()).unwrap(), addr);
    }
}
