//! The graph hook: llama.cpp's eval callback, through which qfilters sees every node of a
//! decode's compute graph. It finds the KV cache writes (to learn the cache tensors and the
//! cells a decode wrote) and hands the nodes an observer asked for to that observer.
//!
//! Relies on llama.cpp internals of the pinned version (llama-cpp-sys-2 0.1.161; see the
//! module docs of `ffi`): graph node names are `<base>-<layer>` (`Kcur-3`, `Qcur-3`,
//! `kq_soft_max-3`); a KV write is a `GGML_OP_SET_ROWS` node whose `src[1]` is the I64 tensor
//! of cell indices and whose `src[2]` is the persistent cache tensor `cache_k_l<layer>` /
//! `cache_v_l<layer>`; the scheduler asks about each node (`ask = true`) before computing it,
//! and with a yes hands it over computed (`ask = false`), with vendor/patches applied.

use std::ffi::c_void;
use std::ptr::NonNull;

use super::kv_tensors::LayerKv;
use super::sys;
use super::tensor::{read_tensor_f32, tensor_name};

/// A node of the compute graph as the eval callback sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeOp {
    Rope,
    SoftMax,
    SetRows,
    MulMat,
    Other,
}

#[derive(Debug, Clone)]
pub struct NodeInfo<'a> {
    /// Name without the `-<layer>` suffix, e.g. `Kcur`.
    pub base: &'a str,
    pub layer: Option<usize>,
    pub op: NodeOp,
    pub ne: [i64; 4],
}

/// Something that wants to read graph nodes while llama.cpp computes them.
///
/// Answering `true` in `wants` makes the scheduler split the graph at that node and hand its
/// data to `observe` (as f32); that split costs a synchronisation, so want only what you need.
pub trait GraphObserver {
    fn wants(&mut self, node: &NodeInfo) -> bool;
    fn observe(&mut self, node: &NodeInfo, data: &[f32]);
}

/// State behind the eval callback's user pointer. Boxed so its address is stable.
#[derive(Default)]
pub(super) struct HookState {
    /// The observer lent to the decode in progress (`Context::decode_observed`); `None`
    /// outside it. Its lifetime is erased: the pointer is set and cleared within that one
    /// call, so it never outlives the borrow it came from.
    pub(super) observer: Option<NonNull<dyn GraphObserver>>,
    pub(super) layers: Vec<LayerKv>,
    pub(super) scratch: Vec<u8>,
    floats: Vec<f32>,
    pub(super) failed: Option<String>,
    /// Cell indices of the current decode's K writes, one entry per index tensor (a model with
    /// sliding-window layers has two caches, each with its own cells), copied in the ask phase.
    pub(super) batch_cells: Vec<(*mut sys::ggml_tensor, Vec<i64>)>,
    /// What the hook and the cache functions copied for eviction (kv_tensors.rs).
    pub(super) traffic: super::kv_tensors::KvTraffic,
}

fn split_layer(name: &str) -> (&str, Option<usize>) {
    match name.rsplit_once('-') {
        Some((base, layer)) => match layer.parse() {
            Ok(l) => (base, Some(l)),
            Err(_) => (name, None),
        },
        None => (name, None),
    }
}

fn node_op(op: sys::ggml_op) -> NodeOp {
    match op {
        sys::GGML_OP_ROPE => NodeOp::Rope,
        sys::GGML_OP_SOFT_MAX => NodeOp::SoftMax,
        sys::GGML_OP_SET_ROWS => NodeOp::SetRows,
        sys::GGML_OP_MUL_MAT => NodeOp::MulMat,
        _ => NodeOp::Other,
    }
}

pub(super) extern "C" fn eval_callback(
    t: *mut sys::ggml_tensor,
    ask: bool,
    user: *mut c_void,
) -> bool {
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        // SAFETY: `user` is the Box<HookState> owned by the Context that registered this
        // callback; llama.cpp calls it only inside llama_decode, while the Context (and so the
        // box) is alive and exclusively borrowed by that decode call.
        let state = unsafe { &mut *(user as *mut HookState) };
        // SAFETY: the scheduler passes a live graph node.
        let op = node_op(unsafe { (*t).op });
        // The scheduler asks about every node of every graph: the common case (not a cache
        // write, no observer) must stay a couple of loads and compares.
        if ask && op == NodeOp::SetRows {
            // SAFETY: a live SET_ROWS node (see `note_cache_write`).
            unsafe { note_cache_write(state, t) };
        }
        let Some(mut observer) = state.observer else {
            return !ask;
        };
        // SAFETY: set by `Context::decode_observed` from a `&mut dyn GraphObserver` that lives
        // for the whole decode this callback runs in, and used by nothing else meanwhile.
        let observer = unsafe { observer.as_mut() };
        // SAFETY: the scheduler passes a live graph node.
        let (name, ne) = unsafe { (tensor_name(t), (*t).ne) };
        let (base, layer) = split_layer(name);
        let info = NodeInfo {
            base,
            layer,
            op,
            ne,
        };
        if ask {
            return observer.wants(&info);
        }
        // SAFETY: with ask=false the scheduler has computed `t` and synchronised its backend.
        let ok = unsafe { read_tensor_f32(t, &mut state.scratch, &mut state.floats) };
        if ok {
            state.traffic.got(state.scratch.len());
            observer.observe(&info, &state.floats);
        } else if state.failed.is_none() {
            state.failed = Some(format!("could not read graph node {name}"));
        }
        true
    }));
    // A panic must not unwind into C; stop the computation instead (decode then reports it).
    result.unwrap_or(false)
}

/// Records the cache tensors behind a SET_ROWS node and, for the first K write of a decode,
/// copies its cell indices.
///
/// The indices are read here, in the ask phase, because the scheduler has just set (on the CPU)
/// or synchronously uploaded (to a GPU split) that input and nothing of the split has run yet;
/// after `llama_decode` the graph allocator may have given the index memory to later nodes.
/// Every layer writing through the same index tensor shares its cells: one read per index tensor.
///
/// SAFETY (caller): `t` is a live SET_ROWS node of the graph being computed.
unsafe fn note_cache_write(state: &mut HookState, t: *mut sys::ggml_tensor) {
    // SAFETY: `t` is a live SET_ROWS node (caller), so its sources are null or live nodes of the
    // same graph; each is null-checked before use. The index read copies `ne[0]` i64 values of a
    // contiguous, allocated I64 tensor (type, contiguity and data checked) into a buffer of that length.
    unsafe {
        // SET_ROWS nodes have src[0] (rows), src[1] (indices), src[2] (destination); the
        // destination of a KV write is the persistent cache tensor, alive as long as the context.
        let dest = (*t).src[2];
        let idx = (*t).src[1];
        if dest.is_null() {
            return;
        }
        let dest_name = tensor_name(dest);
        let is_k = dest_name.strip_prefix("cache_k_l");
        let is_v = dest_name.strip_prefix("cache_v_l");
        let Some(layer) = is_k.or(is_v).and_then(|l| l.parse::<usize>().ok()) else {
            return;
        };
        if state.layers.len() <= layer {
            state.layers.resize(layer + 1, LayerKv::default());
        }
        if is_k.is_none() {
            state.layers[layer].v = dest;
            return;
        }
        state.layers[layer].k = dest;
        state.layers[layer].k_idx = idx;
        state.layers[layer].k_rot = key_rotation((*t).src[0]);
        if idx.is_null() || state.batch_cells.iter().any(|(p, _)| *p == idx) {
            return;
        }
        if (*idx).type_ != sys::GGML_TYPE_I64
            || !sys::ggml_is_contiguous(idx)
            || (*idx).data.is_null()
        {
            return;
        }
        let n = (*idx).ne[0].max(0) as usize;
        let mut cells = vec![0i64; n];
        // Reads n*8 bytes of a computed input through its backend (a memcpy on the CPU, one small
        // device-to-host copy on a GPU).
        sys::ggml_backend_tensor_get(idx, cells.as_mut_ptr() as *mut c_void, 0, n * 8);
        state.traffic.got(n * 8);
        state.batch_cells.push((idx, cells));
    }
}

/// The size of the Hadamard blocks llama.cpp rotated the keys of a K cache write with, 0 when
/// they are stored as computed. llama.cpp rotates the keys (and queries) of a quantized K cache
/// (llama-kv-cache.cpp: `n_rot_k`, unless LLAMA_ATTN_ROT_DISABLE is set), which makes the write's
/// rows a view or reshape of `MUL_MAT(attn_inp_k_rot, keys)` (llama-graph.cpp's
/// `llama_mul_mat_hadamard`): found here in the graph itself, not re-derived from its rules.
///
/// SAFETY (caller): `src` is null or a live node of the graph being computed.
unsafe fn key_rotation(mut src: *mut sys::ggml_tensor) -> usize {
    // SAFETY: `src` is null or live (caller); each hop follows a source of a live node, which
    // is null or live, and is null-checked before it is read.
    unsafe {
        // view(reshape(mul_mat)): a few hops at most.
        for _ in 0..4 {
            if src.is_null() {
                return 0;
            }
            match (*src).op {
                sys::GGML_OP_MUL_MAT => {
                    let rot = (*src).src[0];
                    let named = !rot.is_null() && tensor_name(rot).starts_with("attn_inp_k_rot");
                    return if named {
                        (*rot).ne[0].max(0) as usize
                    } else {
                        0
                    };
                }
                sys::GGML_OP_VIEW | sys::GGML_OP_RESHAPE | sys::GGML_OP_CONT => src = (*src).src[0],
                _ => return 0,
            }
        }
        0
    }
}
