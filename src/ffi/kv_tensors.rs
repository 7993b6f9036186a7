//! Direct access to the KV cache tensors: which tensors and cells a decode wrote, reading K
//! rows, moving one head's K and V slices between cells.
//!
//! Relies on llama.cpp internals of the pinned version (llama-cpp-sys-2 0.1.161; see the
//! module docs of `ffi`): the tensors are found by name (`cache_k_l<layer>`,
//! `cache_v_l<layer>`, see graph.rs); each is `[n_head_kv * head_dim, n_cells]`, one row per
//! cell, the heads contiguous within a row; V has that layout only with flash attention (else
//! it is transposed, which `can_move_heads` detects); all layers of one cache write through the
//! same cell indices, so one layer's indices stand for all; cells are the row numbers.

use std::ffi::c_void;

use super::sys;
use super::tensor::convert_to_f32;
use super::Context;
use crate::error::{Error, Result};

mod device;

pub(super) use device::DeviceGraphs;
pub use device::{KeyReduce, LiveReduce};

/// The persistent KV-cache tensors of one layer, found in the graph's K/V writes.
#[derive(Clone, Copy)]
pub(super) struct LayerKv {
    pub(super) k: *mut sys::ggml_tensor,
    pub(super) v: *mut sys::ggml_tensor,
    /// Cell indices of the last graph's K write (a graph input, valid until the next decode).
    pub(super) k_idx: *mut sys::ggml_tensor,
    /// Hadamard block size the stored keys are rotated by (0: not rotated; see graph.rs).
    pub(super) k_rot: usize,
}

impl Default for LayerKv {
    fn default() -> Self {
        Self {
            k: std::ptr::null_mut(),
            v: std::ptr::null_mut(),
            k_idx: std::ptr::null_mut(),
            k_rot: 0,
        }
    }
}

/// What qfilters itself copied between the host and the KV cache's backend, for eviction:
/// its own reads and writes of cache tensors ([`Context::read_k_rows`],
/// [`Context::move_head_slices`]), its device graphs' inputs and outputs (filters, cell
/// indices, key reductions), the cell indices the graph hook copies at each decode, and
/// the graph nodes an observer reads (the `graph` key source's keys). Not counted: the
/// tests' row reads, the backend's own traffic (llama.cpp's graphs, ggml-rpc's protocol).
/// Counted the same whether the cache lives in host memory (a memcpy) or on another device.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KvTraffic {
    pub to_host: u64,
    pub to_device: u64,
    /// Calls to the backend behind those bytes (over RPC, one message each).
    pub transfers: u64,
}

impl KvTraffic {
    pub(super) fn got(&mut self, bytes: usize) {
        self.to_host += bytes as u64;
        self.transfers += 1;
    }
    pub(super) fn set(&mut self, bytes: usize) {
        self.to_device += bytes as u64;
        self.transfers += 1;
    }
}

/// Head-slice moves of one (layer, KV head): copy the head's K and V slices from cell `from`
/// to cell `to` for each `(from, to)` of `moves`. The eviction plan names the layer as the
/// cache book counts it (`L` = `engine::cache::TrackedLayer`); the ffi calls take the model's
/// layer number (`L = usize`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeadMoves<L = usize> {
    pub layer: L,
    pub head: usize,
    pub moves: Vec<(usize, usize)>,
}

impl Context {
    /// What this context copied for eviction so far ([`KvTraffic`]).
    pub fn kv_traffic(&self) -> KvTraffic {
        self.hook.traffic
    }

    /// Number of layers whose KV tensors the hook has seen.
    pub fn kv_layers(&self) -> usize {
        self.hook.layers.len()
    }

    /// Cells of `layer`'s K cache (SWA layers of some models have a smaller cache), 0 if none.
    pub fn kv_rows(&self, layer: usize) -> usize {
        match self.hook.layers.get(layer) {
            // SAFETY: cache tensors live as long as the context.
            Some(l) if !l.k.is_null() => unsafe { (*l.k).ne[1].max(0) as usize },
            _ => 0,
        }
    }

    /// Layers that have their own K cache tensor (all attention layers).
    pub fn kv_layer_present(&self, layer: usize) -> bool {
        self.hook.layers.get(layer).is_some_and(|l| !l.k.is_null())
    }

    /// Bytes allocated for K and V across all layers (known after the first decode).
    pub fn kv_bytes(&self) -> usize {
        let mut total = 0;
        for l in &self.hook.layers {
            for t in [l.k, l.v] {
                if !t.is_null() {
                    // SAFETY: cache tensors live as long as the context.
                    total += unsafe { sys::ggml_nbytes(t) };
                }
            }
        }
        total
    }

    /// Cell indices written by the last decode (one per token of the batch, in batch order).
    ///
    /// Copied while the decode ran (see `note_cache_write`), so it does not depend on the graph
    /// allocator keeping the index input alive afterwards (it may not, on a GPU).
    /// `layer` must be one whose K cache the hook has seen (all layers of a unified cache share
    /// the cells).
    /// Cells are converted from llama.cpp's `int64` here, once: a negative one is an error.
    pub fn last_cells(&self, layer: usize) -> Result<Vec<usize>> {
        let l = self.layer_kv(layer)?;
        let raw = self
            .hook
            .batch_cells
            .iter()
            .find(|(p, _)| *p == l.k_idx)
            .map(|(_, c)| c)
            .ok_or_else(|| {
                Error::KvCache(
                    "the last decode wrote no K cache rows (is the hook installed?)".into(),
                )
            })?;
        raw.iter()
            .map(|&c| {
                usize::try_from(c)
                    .map_err(|_| Error::KvCache(format!("llama.cpp wrote a key to cell {c}")))
            })
            .collect()
    }

    /// The same indices read back after the decode from the index input of `layer`'s K write:
    /// the way that was checked on a CPU, kept to compare against on other backends. Raw
    /// `int64`s: memory the allocator reused may hold anything.
    pub fn last_cells_after_decode(&self, layer: usize) -> Result<Vec<i64>> {
        let l = self.layer_kv(layer)?;
        if l.k_idx.is_null() {
            return Err(Error::KvCache(format!(
                "layer {layer} wrote no K rows in the last decode"
            )));
        }
        self.synchronize();
        // SAFETY: k_idx is an input tensor of the last graph; its buffer stays allocated until
        // the next graph is allocated (its contents may have been reused, which is what callers
        // of this check look for).
        unsafe {
            let t = l.k_idx;
            if (*t).type_ != sys::GGML_TYPE_I64 || !sys::ggml_is_contiguous(t) {
                return Err(Error::KvCache("unexpected K index tensor type".into()));
            }
            let n = (*t).ne[0].max(0) as usize;
            let mut out = vec![0i64; n];
            sys::ggml_backend_tensor_get(t, out.as_mut_ptr() as *mut c_void, 0, n * 8);
            Ok(out)
        }
    }

    pub(super) fn layer_kv(&self, layer: usize) -> Result<LayerKv> {
        match self.hook.layers.get(layer) {
            Some(l) if !l.k.is_null() => Ok(*l),
            _ => Err(Error::KvCache(format!(
                "no K cache tensor seen for layer {layer} (decode something first)"
            ))),
        }
    }

    /// The size of the Hadamard blocks llama.cpp rotates `layer`'s stored keys by (a quantized
    /// K cache), 0 when it stores them as the model computed them. Known after a decode.
    pub fn k_rotation(&self, layer: usize) -> usize {
        self.hook.layers.get(layer).map_or(0, |l| l.k_rot)
    }

    /// Reads the K rows of `cells` (each n_head_kv * head_dim values) for `layer`, as f32, as
    /// the model computed them: dequantized, and with llama.cpp's rotation of a quantized
    /// cache undone (the rotation is its own inverse), so scores need not know about it.
    pub fn read_k_rows(&mut self, layer: usize, cells: &[usize], out: &mut Vec<f32>) -> Result<()> {
        let l = self.layer_kv(layer)?;
        self.read_rows(l.k, l.k_rot, cells, out)
    }

    /// The L2 norm of each KV head's value of `cells` for `layer`, `[cell][head]` (what the
    /// `expected-attention` policy weighs a key by). Needs V stored one row per cell (flash
    /// attention on). A quantized cache's rotation (Hadamard blocks of 64, see
    /// llama-cpp-facts) is left in place: it is orthonormal within blocks, so when a head is
    /// whole blocks (checked) it keeps each head's norm.
    pub fn read_v_norms(
        &mut self,
        layer: usize,
        cells: &[usize],
        n_head_kv: usize,
        value_dim: usize,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        let l = self.layer_kv(layer)?;
        if l.v.is_null() {
            return Err(Error::KvCache(format!(
                "no V cache tensor seen for layer {layer}"
            )));
        }
        // SAFETY: a non-null cache tensor lives as long as the context; only its fields are read.
        let (row, ty) = unsafe { ((*l.v).ne[0], (*l.v).type_) };
        // Transposed V (flash attention off) has rows of one dim across all cells.
        if value_dim == 0 || row != (n_head_kv * value_dim) as i64 {
            return Err(Error::KvCache(
                "values are not stored one row per cell (flash attention is off): turn flash attention on".into(),
            ));
        }
        let plain = [sys::GGML_TYPE_F16, sys::GGML_TYPE_BF16, sys::GGML_TYPE_F32].contains(&ty);
        if !plain && !crate::math::whole_blocks(value_dim, 64) {
            return Err(Error::KvCache(format!(
                "value heads of {value_dim} values are not whole rotation blocks of 64"
            )));
        }
        let mut rows = Vec::new();
        self.read_rows(l.v, 0, cells, &mut rows)?;
        out.clear();
        out.extend(
            rows.chunks_exact(value_dim)
                .map(|v| v.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>().sqrt() as f32),
        );
        Ok(())
    }

    /// Rows `cells` of cache tensor `t` as f32, its Hadamard rotation of `rot` undone.
    fn read_rows(
        &mut self,
        t: *mut sys::ggml_tensor,
        rot: usize,
        cells: &[usize],
        out: &mut Vec<f32>,
    ) -> Result<()> {
        if t.is_null() {
            return Err(Error::KvCache("no such cache tensor".into()));
        }
        self.synchronize();
        // SAFETY: `t` is a non-null persistent cache tensor owned by the context (callers
        // pass tensors from `layer_kv`).
        let (ty, row_elems, row_bytes, n_rows) =
            unsafe { ((*t).type_, (*t).ne[0], (*t).nb[1], (*t).ne[1]) };
        let row_elems = row_elems.max(0) as usize;
        out.resize(cells.len() * row_elems, 0.0);
        let scratch = &mut self.hook.scratch;
        let mut i = 0;
        while i < cells.len() {
            // Coalesce runs of consecutive cells into one copy (a prefill fills cells in order).
            let start = cells[i];
            let mut run = 1;
            while i + run < cells.len() && cells[i + run] == start + run {
                run += 1;
            }
            if (start + run) as i64 > n_rows {
                return Err(Error::KvCache(format!("cell {start} out of range")));
            }
            let bytes = run * row_bytes;
            scratch.resize(bytes, 0);
            // SAFETY: rows [start, start+run) lie inside the tensor (checked above).
            unsafe {
                sys::ggml_backend_tensor_get(
                    t,
                    scratch.as_mut_ptr() as *mut c_void,
                    start * row_bytes,
                    bytes,
                )
            };
            self.hook.traffic.got(bytes);
            for r in 0..run {
                let dst = &mut out[(i + r) * row_elems..(i + r + 1) * row_elems];
                if !convert_to_f32(ty, &scratch[r * row_bytes..(r + 1) * row_bytes], dst) {
                    return Err(Error::KvCache(
                        "the cache type cannot be read as floats".into(),
                    ));
                }
                if rot > 1 && !crate::math::hadamard_in_place(dst, rot) {
                    return Err(Error::KvCache(format!(
                        "cache rows of {} values are not whole rotation blocks of {rot}",
                        dst.len(),
                    )));
                }
            }
            i += run;
        }
        Ok(())
    }

    /// Moves head slices for every `(layer, head, moves)` group of an eviction round: in one
    /// graph on the cache's device when it can (returns true), else one group at a time
    /// through the host (false).
    pub fn move_head_slices_batch(
        &mut self,
        groups: &[HeadMoves],
        n_head_kv: usize,
    ) -> Result<bool> {
        if self.device_move_heads(groups, n_head_kv)? {
            return Ok(true);
        }
        for g in groups {
            self.move_head_slices(g.layer, g.head, n_head_kv, &g.moves)?;
        }
        Ok(false)
    }

    /// Moves the K and V slices of one KV head from cell `src` to cell `dst`, for each pair.
    ///
    /// Needs V stored one row per cell (flash attention on); the caller checks `can_move_heads`.
    pub fn move_head_slices(
        &mut self,
        layer: usize,
        head: usize,
        n_head_kv: usize,
        moves: &[(usize, usize)],
    ) -> Result<()> {
        let l = self.layer_kv(layer)?;
        if l.v.is_null() {
            return Err(Error::KvCache(format!(
                "no V cache tensor seen for layer {layer}"
            )));
        }
        self.synchronize();
        for t in [l.k, l.v] {
            // SAFETY: persistent cache tensors owned by the context.
            let (ne0, nb1, ne1, ty) = unsafe { ((*t).ne[0], (*t).nb[1], (*t).ne[1], (*t).type_) };
            if n_head_kv == 0 || ne0 % n_head_kv as i64 != 0 {
                return Err(Error::KvCache(
                    "cache row is not a whole number of heads".into(),
                ));
            }
            // A head past the last one would still land inside the tensor, in the next
            // cell's row: ggml's own bounds check cannot see it.
            if head >= n_head_kv {
                return Err(Error::KvCache(format!(
                    "head {head} out of range (the cache has {n_head_kv} KV heads)"
                )));
            }
            let head_values = ne0 / n_head_kv as i64;
            // SAFETY: reads the block size of the tensor's own (valid) type.
            let block = unsafe { sys::ggml_blck_size(ty) };
            // A slice that is not whole blocks has no byte range of its own.
            if block <= 0 || head_values % block != 0 {
                return Err(Error::KvCache(format!(
                    "a head of {head_values} values is not whole blocks of {block} of this cache type"
                )));
            }
            // SAFETY: plain size computation for a valid type and a whole number of blocks.
            let slice = unsafe { sys::ggml_row_size(ty, head_values) };
            let hook = &mut *self.hook;
            hook.scratch.resize(slice, 0);
            for &(src, dst) in moves {
                if src as i64 >= ne1 || dst as i64 >= ne1 {
                    return Err(Error::KvCache(format!("cell {src} or {dst} out of range")));
                }
                // SAFETY: `src`, `dst` < ne[1] and `head` < n_head_kv were checked above, and a
                // row holds n_head_kv slices of `slice` bytes, so both byte ranges lie inside
                // row `src`/`dst` of the tensor; `scratch` holds `slice` bytes.
                unsafe {
                    sys::ggml_backend_tensor_get(
                        t,
                        hook.scratch.as_mut_ptr() as *mut c_void,
                        src * nb1 + head * slice,
                        slice,
                    );
                    sys::ggml_backend_tensor_set(
                        t,
                        hook.scratch.as_ptr() as *const c_void,
                        dst * nb1 + head * slice,
                        slice,
                    );
                }
                hook.traffic.got(slice);
                hook.traffic.set(slice);
            }
        }
        Ok(())
    }

    /// Whether head slices can be moved between cells: V must be stored one row per cell.
    pub fn can_move_heads(&self, n_embd_v_gqa: usize) -> bool {
        self.hook.layers.iter().filter(|l| !l.k.is_null()).all(|l| {
            // SAFETY: persistent cache tensors owned by the context.
            !l.v.is_null() && unsafe { (*l.v).ne[0] } as usize == n_embd_v_gqa
        })
    }

    /// The bytes of one K or V cache row of `layer`, as stored (quantized blocks stay blocks;
    /// tests use this to check that moves copy them exactly).
    pub fn read_cache_row_bytes(
        &mut self,
        layer: usize,
        value: bool,
        cell: usize,
    ) -> Result<Vec<u8>> {
        let l = self.layer_kv(layer)?;
        let t = if value { l.v } else { l.k };
        if t.is_null() {
            return Err(Error::KvCache("no such cache tensor".into()));
        }
        self.synchronize();
        // SAFETY: persistent cache tensor; the row range is checked against ne[1].
        unsafe {
            if cell as i64 >= (*t).ne[1] {
                return Err(Error::KvCache(format!("cell {cell} out of range")));
            }
            let nb1 = (*t).nb[1];
            let mut raw = vec![0u8; nb1];
            sys::ggml_backend_tensor_get(t, raw.as_mut_ptr() as *mut c_void, cell * nb1, nb1);
            Ok(raw)
        }
    }

    /// Reads one K or V cache row of `layer` as stored, dequantized (tests use this to check
    /// moves).
    pub fn read_cache_row(&mut self, layer: usize, value: bool, cell: usize) -> Result<Vec<f32>> {
        let l = self.layer_kv(layer)?;
        let mut out = Vec::new();
        // A test's look at the cache is not eviction traffic (see `KvTraffic`).
        let traffic = self.hook.traffic;
        let read = self.read_rows(if value { l.v } else { l.k }, 0, &[cell], &mut out);
        self.hook.traffic = traffic;
        read.map(|()| out)
    }
}
