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
//! A host that stops answering without closing the connection (power loss) reaches that
//! failure path only because of [`set_timeout`] (`--rpc-timeout`): upstream ggml-rpc's sockets
//! have no timeout of their own.
//!
//! Once a model is loaded, [`lost_hosts`] tells whether ggml's own connection to each host is
//! still open, from the kernel's TCP state of that socket (Linux procfs): no traffic, and no
//! probe connection. A probe would be wrong: ggml's `rpc-server` serves one client at a time
//! from a listen backlog of 1, so while it serves this process, a third probe connection is
//! never accepted and would time out against a live host.

use std::ffi::{c_char, c_void, CStr, CString};
use std::net::{SocketAddr, SocketAddrV4, TcpStream, ToSocketAddrs};
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

/// A host whose devices this process registered (ggml keeps them for the process's life).
struct Added {
    endpoint: String,
    /// Its IPv4 addresses at registration: ggml-rpc connects over IPv4 only
    /// (`gethostbyname`), to one of these.
    addrs: Vec<SocketAddrV4>,
}

static ADDED: Mutex<Vec<Added>> = Mutex::new(Vec::new());

/// How long a host may take to accept a connection at start.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The environment variable vendor/patches/rpc-socket-timeout.patch adds to ggml-rpc: the
/// seconds a send or receive on a connection to a host may block (unset or 0: no limit).
pub const TIMEOUT_ENV: &str = "GGML_RPC_TIMEOUT";

/// Bounds every send and receive on ggml-rpc's connections to `secs` seconds (0: no bound),
/// so that a host that vanishes without closing the connection (power loss, a cut link) ends
/// the run through ggml's failure path (an abort: one line and exit 1, see the module doc)
/// instead of a wait of about 15 minutes for TCP to give up. ggml reads the variable at each
/// connection, so this must run before the first one.
///
/// It sets the process environment: call it only while the process has a single thread
/// (`main`, before any command starts). Setting the environment while another thread may
/// call C's `getenv` is a data race, which `std::env::set_var` cannot rule out (a safe
/// function in edition 2021 all the same).
pub fn set_timeout(secs: u64) {
    std::env::set_var(TIMEOUT_ENV, secs.to_string());
}

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
    let new: Vec<&String> = endpoints
        .iter()
        .filter(|e| !added.iter().any(|a| a.endpoint == **e))
        .collect();
    let mut addrs = Vec::with_capacity(new.len());
    for (i, e) in new.iter().enumerate() {
        if new[..i].contains(e) {
            return Err(Error::invalid(format!("RPC host {e} is given twice")));
        }
        check_endpoint(e)?;
        let v4: Vec<SocketAddrV4> = e
            .to_socket_addrs()
            .map(|it| {
                it.filter_map(|a| match a {
                    SocketAddr::V4(a) => Some(a),
                    SocketAddr::V6(_) => None,
                })
                .collect()
            })
            .unwrap_or_default();
        addrs.push(v4);
    }
    for (e, addrs) in new.into_iter().zip(addrs) {
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
        added.push(Added {
            endpoint: e.clone(),
            addrs,
        });
    }
    Ok(())
}

/// The registered hosts whose connection from ggml is gone: closed by the host (its
/// `rpc-server` stopped or restarted: either way the weights and KV cache it held are lost,
/// so the host stays lost for this process), or never opened. Empty when no host was added,
/// and where the kernel's TCP table cannot be read (not Linux): that cannot be told there.
pub fn lost_hosts() -> Vec<String> {
    let added = ADDED.lock().unwrap_or_else(|p| p.into_inner());
    if added.is_empty() {
        return Vec::new();
    }
    let Some(conns) = own_tcp_connections() else {
        return Vec::new();
    };
    added
        .iter()
        .filter(|a| {
            let mine: Vec<u8> = conns
                .iter()
                .filter(|(peer, _)| a.addrs.contains(peer))
                .map(|&(_, state)| state)
                .collect();
            mine.is_empty() || mine.iter().any(|&s| s != TCP_ESTABLISHED)
        })
        .map(|a| a.endpoint.clone())
        .collect()
}

/// The kernel's `TCP_ESTABLISHED` (include/net/tcp_states.h), as /proc/net/tcp prints it.
const TCP_ESTABLISHED: u8 = 1;

/// This process's IPv4 TCP sockets: their peers and states. `None` without procfs.
fn own_tcp_connections() -> Option<Vec<(SocketAddrV4, u8)>> {
    let mut inodes = std::collections::HashSet::new();
    for fd in std::fs::read_dir("/proc/self/fd").ok()?.flatten() {
        if let Ok(target) = std::fs::read_link(fd.path()) {
            let t = target.to_string_lossy();
            if let Some(n) = t
                .strip_prefix("socket:[")
                .and_then(|r| r.strip_suffix(']'))
                .and_then(|n| n.parse::<u64>().ok())
            {
                inodes.insert(n);
            }
        }
    }
    let table = std::fs::read_to_string("/proc/self/net/tcp").ok()?;
    Some(parse_tcp_table(&table, &inodes))
}

/// The peers and states of the sockets of `/proc/net/tcp` whose inode is in `inodes`. Lines
/// that do not parse are skipped (the header among them).
fn parse_tcp_table(
    table: &str,
    inodes: &std::collections::HashSet<u64>,
) -> Vec<(SocketAddrV4, u8)> {
    table
        .lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let inode = f.get(9)?.parse::<u64>().ok()?;
            if !inodes.contains(&inode) {
                return None;
            }
            let (ip, port) = f.get(2)?.split_once(':')?;
            // The address is the kernel's big-endian word printed as a native integer, so its
            // native bytes are the address's bytes; the port is printed as a number.
            let ip = u32::from_str_radix(ip, 16).ok()?.to_ne_bytes();
            let port = u16::from_str_radix(port, 16).ok()?;
            let state = u8::from_str_radix(f.get(3)?, 16).ok()?;
            Some((SocketAddrV4::new(ip.into(), port), state))
        })
        .collect()
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

    #[test]
    fn the_tcp_table_gives_the_peers_and_states_of_our_sockets_only() {
        let ours: std::collections::HashSet<u64> = [4242, 77].into_iter().collect();
        let lo = u32::from_ne_bytes([127, 0, 0, 1]);
        let table = format!(
            "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
               0: {lo:08X}:D2A4 {lo:08X}:C350 01 00000000:00000000 00:00000000 00000000  1000        0 4242 1 0 20 4 30 10 -1\n\
               1: {lo:08X}:D2A5 {lo:08X}:C351 08 00000000:00000000 00:00000000 00000000  1000        0 77 1 0 20 4 30 10 -1\n\
               2: {lo:08X}:D2A6 {lo:08X}:C352 01 00000000:00000000 00:00000000 00000000  1000        0 999 1 0 20 4 30 10 -1\n\
               garbage line\n"
        );
        let got = parse_tcp_table(&table, &ours);
        let at = |port| SocketAddrV4::new([127, 0, 0, 1].into(), port);
        assert_eq!(got, vec![(at(0xC350), 1), (at(0xC351), 8)]);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn our_own_connections_are_seen_open_then_closed_by_the_peer() {
        let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let SocketAddr::V4(addr) = server.local_addr().unwrap() else {
            panic!("bound to IPv4");
        };
        let client = TcpStream::connect(addr).unwrap();
        let (accepted, _) = server.accept().unwrap();
        let state = || {
            own_tcp_connections()
                .expect("procfs")
                .into_iter()
                .find(|(peer, _)| *peer == addr)
                .map(|(_, s)| s)
        };
        assert_eq!(state(), Some(TCP_ESTABLISHED));
        drop(accepted);
        let t0 = std::time::Instant::now();
        while state() == Some(TCP_ESTABLISHED) {
            assert!(t0.elapsed() < Duration::from_secs(5), "never saw the close");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(state(), Some(8), "CLOSE_WAIT");
        drop(client);
    }
}
