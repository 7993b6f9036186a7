//! qfilters' own small ggml graphs on the device that holds the KV cache: per-head key
//! reductions for scoring, and head-slice moves, so that only scores (not keys) cross to the
//! host. Same reliance on the cache layout as its parent, kv_tensors.rs.

use std::ffi::c_void;

use super::super::threadpool::cpu_backend;
use super::super::{sys, Context};
use super::{HeadMoves, LayerKv};
use crate::error::{Error, Result};

/// How the device reduces each (cell, KV head) slice of a key to one number, so a score can be
/// computed where the keys live and only `n_tokens x n_head_kv` floats come back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyReduce {
    /// `<k, f>` with the head's filter (uploaded once with `Context::set_key_filters`).
    Dot,
    /// `<k, k>`.
    SquaredNorm,
    /// The key rotated back from its position by its layer's RoPE, projected on `per_head`
    /// vectors of its KV head (uploaded with `Context::set_key_projections`), then, with
    /// `value_norm`, the squared norm of its value: `per_head + value_norm` numbers per key
    /// and head instead of one.
    Project { per_head: usize, value_norm: bool },
}

impl KeyReduce {
    /// Numbers per (cell, KV head) this reduction gives.
    pub fn width(&self) -> usize {
        match *self {
            KeyReduce::Dot | KeyReduce::SquaredNorm => 1,
            KeyReduce::Project {
                per_head,
                value_norm,
            } => per_head + usize::from(value_norm),
        }
    }
}

/// What the device computes from all live keys of a layer for a re-score
/// ([`crate::policy::Scorer::rescores_live`]), so that only per-head sums and per-slot numbers
/// cross to the host, not the keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LiveReduce {
    /// Per KV head, the sum of the unit keys of the live cells (`[n_head_kv][head_dim]`), and
    /// each live slot's cosine to that sum (`[cells][n_head_kv]`; 0 for a zero key).
    MeanDirection,
}

/// A backend of the device that holds the K cache, with its own allocator, for the small
/// graphs qfilters computes there (key reductions, head-slice moves).
pub(in crate::ffi) struct DeviceGraphs {
    backend: sys::ggml_backend_t,
    galloc: sys::ggml_gallocr_t,
    /// Per model layer, its filters `[head_dim, n_head_kv]` (f32, `Dot`) or projection vectors
    /// `[head_dim, per_head, n_head_kv]` (`Project`), when set.
    filters: Vec<*mut sys::ggml_tensor>,
    /// Per model layer, the RoPE `Project` rotates keys back with.
    ropes: Vec<Option<crate::rope::RopeSpec>>,
    filter_ctx: *mut sys::ggml_context,
    filter_buf: sys::ggml_backend_buffer_t,
    /// Memory for the tensor and graph metadata of one graph (no data: `no_alloc`).
    meta: Vec<u8>,
}

impl Drop for DeviceGraphs {
    fn drop(&mut self) {
        // SAFETY: each handle was created by this struct, is freed once here (null ones are
        // skipped), and no graph using them is alive (graphs live only inside one call).
        unsafe {
            if !self.filter_buf.is_null() {
                sys::ggml_backend_buffer_free(self.filter_buf);
            }
            if !self.filter_ctx.is_null() {
                sys::ggml_free(self.filter_ctx);
            }
            if !self.galloc.is_null() {
                sys::ggml_gallocr_free(self.galloc);
            }
            if !self.backend.is_null() {
                sys::ggml_backend_free(self.backend);
            }
        }
    }
}

/// A ggml context for one graph's metadata, freed on drop.
struct GraphCtx(*mut sys::ggml_context);

impl Drop for GraphCtx {
    fn drop(&mut self) {
        // SAFETY: created by ggml_init in `DeviceGraphs::graph_ctx`, freed once.
        unsafe { sys::ggml_free(self.0) }
    }
}

impl DeviceGraphs {
    /// A backend for the device whose buffer holds `k` (the CPU backend for host memory).
    ///
    /// SAFETY (caller): `k` is a live, allocated tensor.
    pub(in crate::ffi) unsafe fn for_tensor(
        k: *mut sys::ggml_tensor,
        threads: i32,
    ) -> Option<DeviceGraphs> {
        // SAFETY: `k` is live (caller); its buffer is null-checked, the device is null-checked
        // before a backend is made on it, and the backend is null-checked before use. `out` owns
        // the backend from here, so a failed allocator frees it on drop.
        unsafe {
            let buf = (*k).buffer;
            if buf.is_null() {
                return None;
            }
            let backend = if sys::ggml_backend_buffer_is_host(buf) {
                cpu_backend(threads)
            } else {
                let dev = sys::ggml_backend_buft_get_device(sys::ggml_backend_buffer_get_type(buf));
                if dev.is_null() {
                    return None;
                }
                sys::ggml_backend_dev_init(dev, std::ptr::null())
            };
            if backend.is_null() {
                return None;
            }
            let galloc = sys::ggml_gallocr_new(sys::ggml_backend_get_default_buffer_type(backend));
            let out = DeviceGraphs {
                backend,
                galloc,
                filters: Vec::new(),
                ropes: Vec::new(),
                filter_ctx: std::ptr::null_mut(),
                filter_buf: std::ptr::null_mut(),
                meta: Vec::new(),
            };
            (!galloc.is_null()).then_some(out)
        }
    }

    /// Same buffer type as the K cache (so a graph here may read it directly).
    ///
    /// SAFETY (caller): `t` is a live, allocated tensor.
    unsafe fn reaches(&self, t: *mut sys::ggml_tensor) -> bool {
        // SAFETY: `t` is live (caller), its buffer null-checked; `self.backend` is live while
        // `self` is.
        unsafe {
            let buf = (*t).buffer;
            if buf.is_null() {
                return false;
            }
            let dev = sys::ggml_backend_get_device(self.backend);
            if sys::ggml_backend_buffer_is_host(buf) {
                return sys::ggml_backend_dev_type(dev) == sys::GGML_BACKEND_DEVICE_TYPE_CPU;
            }
            sys::ggml_backend_buft_get_device(sys::ggml_backend_buffer_get_type(buf)) == dev
        }
    }

    /// A metadata-only context for `n_tensors` tensors and one graph of `graph_size` nodes.
    fn graph_ctx(&mut self, n_tensors: usize, graph_size: usize) -> Option<GraphCtx> {
        // SAFETY: plain size computations.
        let size = unsafe {
            n_tensors * sys::ggml_tensor_overhead()
                + sys::ggml_graph_overhead_custom(graph_size, false)
                + 1024
        };
        self.meta.resize(size, 0);
        let params = sys::ggml_init_params {
            mem_size: size,
            mem_buffer: self.meta.as_mut_ptr() as *mut c_void,
            no_alloc: true,
        };
        // SAFETY: `meta` outlives the context (the context is dropped before `meta` is
        // touched again: both are used only within one `&mut self` call).
        let ctx = unsafe { sys::ggml_init(params) };
        (!ctx.is_null()).then_some(GraphCtx(ctx))
    }

    /// Allocates and computes `gf` when the backend supports every node; false otherwise.
    ///
    /// SAFETY (caller): `gf` was built in a live context from live tensors; inputs are set by
    /// the caller after this allocates them (through `set_inputs`).
    unsafe fn compute(
        &mut self,
        gf: *mut sys::ggml_cgraph,
        set_inputs: &mut dyn FnMut(),
    ) -> Result<bool> {
        // SAFETY: `gf` is a live graph (caller) of `ggml_graph_n_nodes` nodes, indexed below
        // that; the graph is computed only after every node is supported and it is allocated.
        unsafe {
            for i in 0..sys::ggml_graph_n_nodes(gf) {
                if !sys::ggml_backend_supports_op(self.backend, sys::ggml_graph_node(gf, i)) {
                    return Ok(false);
                }
            }
            if !sys::ggml_gallocr_alloc_graph(self.galloc, gf) {
                return Err(Error::KvCache(
                    "could not allocate a scoring graph on the cache's device".into(),
                ));
            }
            set_inputs();
            if sys::ggml_backend_graph_compute(self.backend, gf) != sys::GGML_STATUS_SUCCESS {
                return Err(Error::KvCache(
                    "the cache's device failed to compute a qfilters graph".into(),
                ));
            }
            Ok(true)
        }
    }
}

impl Context {
    /// The device graphs for the K caches of `layers` (and their V caches with `with_v`),
    /// when one backend reaches all of them; `None` means: use the host path.
    pub(in crate::ffi) fn device_for(
        &mut self,
        layers: &[usize],
        with_v: bool,
    ) -> Result<Option<&mut DeviceGraphs>> {
        if self.device_unusable || layers.is_empty() {
            return Ok(None);
        }
        let kvs: Vec<LayerKv> = layers
            .iter()
            .map(|&l| self.layer_kv(l))
            .collect::<Result<_>>()?;
        if self.device.is_none() {
            // SAFETY: the K cache tensor lives as long as the context.
            match unsafe { DeviceGraphs::for_tensor(kvs[0].k, self.threads) } {
                Some(d) => self.device = Some(d),
                None => {
                    self.device_unusable = true;
                    return Ok(None);
                }
            }
        }
        let Some(dev) = self.device.as_mut() else {
            return Ok(None);
        };
        for kv in &kvs {
            // SAFETY: cache tensors live as long as the context.
            let ok =
                unsafe { dev.reaches(kv.k) && (!with_v || (!kv.v.is_null() && dev.reaches(kv.v))) };
            if !ok {
                return Ok(None);
            }
        }
        Ok(Some(dev))
    }

    /// Uploads per-head filters for `layers` (`filters` is `[layers][n_head_kv][head_dim]`) to
    /// the device of the K cache, for `KeyReduce::Dot`. False: no device path here.
    pub fn set_key_filters(
        &mut self,
        layers: &[usize],
        filters: &[f32],
        n_head_kv: usize,
        head_dim: usize,
    ) -> Result<bool> {
        let per = n_head_kv * head_dim;
        if filters.len() != layers.len() * per || per == 0 {
            return Err(Error::KvCache(
                "filters do not match the layers and heads".into(),
            ));
        }
        // Keys of a rotated cache are scored against filters rotated the same way: the rotation
        // is orthonormal and stays within a head, so <H k, H f> = <k, f> head by head, and
        // nothing per key has to be undone.
        let mut filters = filters.to_vec();
        for (i, &l) in layers.iter().enumerate() {
            let rot = self.k_rotation(l);
            let layer_filters = &mut filters[i * per..(i + 1) * per];
            if rot > 1
                && !(crate::math::whole_blocks(head_dim, rot)
                    && crate::math::hadamard_in_place(layer_filters, rot))
            {
                return Err(Error::KvCache(format!(
                    "heads of {head_dim} values are not whole rotation blocks of {rot}"
                )));
            }
        }
        self.upload_vectors(layers, &filters, [head_dim, n_head_kv, 1], Vec::new())
    }

    /// Uploads, for `KeyReduce::Project`, `per_head` vectors per KV head for each of `layers`
    /// (`vectors` is `[layers][n_head_kv][per_head][head_dim]`) and each layer's RoPE. False:
    /// no device path here, which includes a Hadamard-rotated (quantized) K cache: the
    /// rotation would have to be undone before the RoPE, which these graphs do not do.
    pub fn set_key_projections(
        &mut self,
        layers: &[usize],
        vectors: &[f32],
        ropes: &[crate::rope::RopeSpec],
        n_head_kv: usize,
        per_head: usize,
        head_dim: usize,
    ) -> Result<bool> {
        let per = n_head_kv * per_head * head_dim;
        if vectors.len() != layers.len() * per || per == 0 || ropes.len() != layers.len() {
            return Err(Error::KvCache(
                "projection vectors do not match the layers and heads".into(),
            ));
        }
        if let Some(bad) = ropes.iter().find(|r| !r.fits(head_dim)) {
            return Err(Error::KvCache(format!(
                "RoPE {bad:?} does not fit heads of {head_dim}"
            )));
        }
        if layers.iter().any(|&l| self.k_rotation(l) > 1) {
            return Ok(false);
        }
        let max_layer = layers.iter().copied().max().unwrap_or(0);
        let mut by_layer = vec![None; max_layer + 1];
        for (&l, r) in layers.iter().zip(ropes) {
            by_layer[l] = Some(*r);
        }
        self.upload_vectors(layers, vectors, [head_dim, per_head, n_head_kv], by_layer)
    }

    /// One f32 tensor of shape `shape` (2-D when `shape[2]` is 1) per layer on the device of
    /// the K cache, replacing what was there; `values` is the layers' tensors back to back.
    fn upload_vectors(
        &mut self,
        layers: &[usize],
        values: &[f32],
        shape: [usize; 3],
        ropes: Vec<Option<crate::rope::RopeSpec>>,
    ) -> Result<bool> {
        let per = shape.iter().product::<usize>();
        if values.len() != layers.len() * per {
            return Err(Error::KvCache("vectors do not match the layers".into()));
        }
        let Some(dev) = self.device_for(layers, false)? else {
            return Ok(false);
        };
        // SAFETY: a fresh metadata context sized for `layers.len()` tensors; its tensors are
        // allocated in one backend buffer owned by `dev` (freed in its Drop, with the context);
        // each upload writes exactly the tensor's `per` floats (`values` holds that many per
        // layer, checked above).
        unsafe {
            if !dev.filter_buf.is_null() {
                sys::ggml_backend_buffer_free(dev.filter_buf);
                dev.filter_buf = std::ptr::null_mut();
            }
            if !dev.filter_ctx.is_null() {
                sys::ggml_free(dev.filter_ctx);
                dev.filter_ctx = std::ptr::null_mut();
            }
            dev.filters.clear();
            dev.ropes = ropes;
            let ctx = sys::ggml_init(sys::ggml_init_params {
                mem_size: (layers.len() + 1) * sys::ggml_tensor_overhead(),
                mem_buffer: std::ptr::null_mut(),
                no_alloc: true,
            });
            if ctx.is_null() {
                return Err(Error::KvCache("ggml_init failed".into()));
            }
            dev.filter_ctx = ctx;
            let max_layer = layers.iter().copied().max().unwrap_or(0);
            dev.filters = vec![std::ptr::null_mut(); max_layer + 1];
            for &l in layers {
                dev.filters[l] = if shape[2] == 1 {
                    sys::ggml_new_tensor_2d(
                        ctx,
                        sys::GGML_TYPE_F32,
                        shape[0] as i64,
                        shape[1] as i64,
                    )
                } else {
                    sys::ggml_new_tensor_3d(
                        ctx,
                        sys::GGML_TYPE_F32,
                        shape[0] as i64,
                        shape[1] as i64,
                        shape[2] as i64,
                    )
                };
            }
            dev.filter_buf = sys::ggml_backend_alloc_ctx_tensors(ctx, dev.backend);
            if dev.filter_buf.is_null() {
                return Err(Error::KvCache(
                    "cannot allocate filters on the cache's device".into(),
                ));
            }
            for (i, &l) in layers.iter().enumerate() {
                let f = &values[i * per..(i + 1) * per];
                sys::ggml_backend_tensor_set(
                    dev.filters[l],
                    f.as_ptr() as *const c_void,
                    0,
                    per * 4,
                );
            }
        }
        for _ in layers {
            self.hook.traffic.set(per * 4);
        }
        Ok(true)
    }

    /// The cache tensors of `layers` and the cell indices a gather graph reads from every one
    /// of them, checked against each ([`gather_indices`]).
    fn gather(
        &self,
        layers: &[usize],
        cells: &[usize],
        n_head_kv: usize,
        head_dim: usize,
    ) -> Result<(Vec<LayerKv>, Vec<i32>)> {
        let kvs: Vec<LayerKv> = layers
            .iter()
            .map(|&l| self.layer_kv(l))
            .collect::<Result<_>>()?;
        let mut shapes = Vec::with_capacity(kvs.len());
        for kv in &kvs {
            // SAFETY: `layer_kv` returned live cache tensors (they live as long as the
            // context); only their shape is read.
            shapes.push(unsafe { [(*kv.k).ne[0], (*kv.k).ne[1]] });
        }
        let idx = gather_indices(&shapes, n_head_kv, head_dim, cells)?;
        Ok((kvs, idx))
    }

    /// Reduces the keys of `cells` (at `positions`) on the device that holds the K cache,
    /// with one small graph for all `layers`: `get_rows` of the cells, then per KV head a dot
    /// product with its filter (`Dot`), with itself (`SquaredNorm`), or the RoPE undone and a
    /// product with its projection vectors (`Project`, plus the value's squared norm). `out`
    /// becomes `[layers][cells][n_head_kv][reduce.width()]`. Only those floats cross to the
    /// host. False: no device path here (host reads instead).
    #[allow(clippy::too_many_arguments)]
    pub fn device_key_stats(
        &mut self,
        layers: &[usize],
        cells: &[usize],
        positions: &[i32],
        reduce: KeyReduce,
        n_head_kv: usize,
        head_dim: usize,
        out: &mut Vec<f32>,
    ) -> Result<bool> {
        let n = cells.len();
        if n == 0 || layers.is_empty() {
            out.clear();
            return Ok(true);
        }
        if positions.len() != n {
            return Err(Error::KvCache(format!(
                "{n} cells but {} positions",
                positions.len()
            )));
        }
        let (kvs, idx32) = self.gather(layers, cells, n_head_kv, head_dim)?;
        let (width, with_v) = match reduce {
            KeyReduce::Project {
                per_head,
                value_norm,
            } => (per_head, value_norm),
            _ => (1, false),
        };
        if with_v {
            for kv in &kvs {
                // SAFETY: as above; only the shape of a non-null V tensor is read.
                let row = (!kv.v.is_null()).then(|| unsafe { (*kv.v).ne[0] });
                // V must be one row per cell, heads of `head_dim` values (flash attention on).
                if row != Some((n_head_kv * head_dim) as i64) {
                    return Ok(false);
                }
            }
        }
        // ggml's rope wants the positions as I32; negated, it rotates back.
        let back: Vec<i32> = positions.iter().map(|&p| p.saturating_neg()).collect();
        self.synchronize();
        let Some(dev) = self.device_for(layers, with_v)? else {
            return Ok(false);
        };
        let uploaded = |l: usize| dev.filters.get(l).is_some_and(|f| !f.is_null());
        let ready = match reduce {
            KeyReduce::SquaredNorm => true,
            KeyReduce::Dot => layers.iter().all(|&l| uploaded(l)),
            KeyReduce::Project { .. } => layers.iter().all(|&l| {
                uploaded(l)
                    && dev.ropes.get(l).copied().flatten().is_some()
                    // SAFETY: a non-null uploaded tensor of `dev`'s own context.
                    && unsafe { (*dev.filters[l]).ne[1] } == width as i64
            }),
        };
        if !ready {
            return Err(Error::KvCache(
                "no filters or projections on the device for a tracked layer".into(),
            ));
        }
        let graph_size = 12 * layers.len() + 16;
        let Some(gctx) = dev.graph_ctx(12 * layers.len() + 8, graph_size) else {
            return Err(Error::KvCache("ggml_init failed".into()));
        };
        let (h, d) = (n_head_kv as i64, head_dim as i64);
        let mut outs = Vec::with_capacity(layers.len());
        // SAFETY: all tensors are created in `gctx` (alive until the end of this block) from
        // the live cache and filter tensors; `compute` allocates the graph's own tensors
        // before `set_inputs` writes `n` i32 into `idx` and into `pos`; each output holds the
        // n*h*width (keys) or n*h (values) f32 read back into `out` after the (synchronous)
        // compute.
        unsafe {
            let ctx = gctx.0;
            let gf = sys::ggml_new_graph_custom(ctx, graph_size, false);
            let idx = sys::ggml_new_tensor_1d(ctx, sys::GGML_TYPE_I32, n as i64);
            sys::ggml_set_input(idx);
            // Only `Project` reads positions: an input no node uses is never allocated.
            let project = matches!(reduce, KeyReduce::Project { .. });
            let pos = if project {
                let pos = sys::ggml_new_tensor_1d(ctx, sys::GGML_TYPE_I32, n as i64);
                sys::ggml_set_input(pos);
                pos
            } else {
                std::ptr::null_mut()
            };
            for (kv, &l) in kvs.iter().zip(layers) {
                let rows = sys::ggml_get_rows(ctx, kv.k, idx);
                let heads = sys::ggml_reshape_3d(ctx, rows, d, h, n as i64);
                let (keys, values) = match reduce {
                    KeyReduce::Dot => (
                        sys::ggml_sum_rows(ctx, sys::ggml_mul(ctx, heads, dev.filters[l])),
                        None,
                    ),
                    KeyReduce::SquaredNorm => {
                        (sys::ggml_sum_rows(ctx, sys::ggml_sqr(ctx, heads)), None)
                    }
                    KeyReduce::Project { .. } => {
                        let Some(rope) = dev.ropes.get(l).copied().flatten() else {
                            return Err(Error::KvCache("no RoPE for a tracked layer".into()));
                        };
                        let mode = if rope.neox {
                            sys::GGML_ROPE_TYPE_NEOX as i32
                        } else {
                            0
                        };
                        let pre = sys::ggml_rope_ext(
                            ctx,
                            heads,
                            pos,
                            std::ptr::null_mut(),
                            rope.n_dims as i32,
                            mode,
                            0,
                            rope.base,
                            rope.scale,
                            0.0,
                            1.0,
                            0.0,
                            0.0,
                        );
                        // [d, h, n] → [d, n, h]: one matrix product per KV head.
                        let by_head = sys::ggml_cont(ctx, sys::ggml_permute(ctx, pre, 0, 2, 1, 3));
                        let proj = sys::ggml_mul_mat(ctx, dev.filters[l], by_head);
                        let values = with_v.then(|| {
                            let v = sys::ggml_get_rows(ctx, kv.v, idx);
                            let v = sys::ggml_reshape_3d(ctx, v, d, h, n as i64);
                            sys::ggml_sum_rows(ctx, sys::ggml_sqr(ctx, v))
                        });
                        (proj, values)
                    }
                };
                for t in std::iter::once(keys).chain(values) {
                    sys::ggml_set_output(t);
                    sys::ggml_build_forward_expand(gf, t);
                }
                outs.push((keys, values));
            }
            let ok = dev.compute(gf, &mut || {
                sys::ggml_backend_tensor_set(idx, idx32.as_ptr() as *const c_void, 0, n * 4);
                if project {
                    sys::ggml_backend_tensor_set(pos, back.as_ptr() as *const c_void, 0, n * 4);
                }
            })?;
            if !ok {
                return Ok(false);
            }
            let per_key = reduce.width();
            let per = n * n_head_kv * per_key;
            out.resize(layers.len() * per, 0.0);
            let mut keys_buf = vec![0f32; n * n_head_kv * width];
            let mut values_buf = vec![0f32; n * n_head_kv];
            for (i, &(keys, values)) in outs.iter().enumerate() {
                sys::ggml_backend_tensor_get(
                    keys,
                    keys_buf.as_mut_ptr() as *mut c_void,
                    0,
                    keys_buf.len() * 4,
                );
                if let Some(v) = values {
                    sys::ggml_backend_tensor_get(
                        v,
                        values_buf.as_mut_ptr() as *mut c_void,
                        0,
                        values_buf.len() * 4,
                    );
                }
                let dst = &mut out[i * per..(i + 1) * per];
                if let KeyReduce::Project { .. } = reduce {
                    // [width, n, h] (and values [h, n]) → [n][h][width (+ value)].
                    for t in 0..n {
                        for head in 0..n_head_kv {
                            let o = (t * n_head_kv + head) * per_key;
                            let src = (head * n + t) * width;
                            dst[o..o + width].copy_from_slice(&keys_buf[src..src + width]);
                            if with_v {
                                dst[o + width] = values_buf[t * n_head_kv + head];
                            }
                        }
                    }
                } else {
                    dst.copy_from_slice(&keys_buf);
                }
            }
        }
        let traffic = &mut self.hook.traffic;
        traffic.set(n * 4);
        if matches!(reduce, KeyReduce::Project { .. }) {
            traffic.set(n * 4);
        }
        for _ in layers {
            traffic.got(n * n_head_kv * width * 4);
            if with_v {
                traffic.got(n * n_head_kv * 4);
            }
        }
        Ok(true)
    }

    /// Reduces the keys of the live `cells` of every one of `layers` on the device that holds
    /// the K cache, in one graph (`LiveReduce::MeanDirection`): `get_rows` of the cells,
    /// l2-normalised per head, summed over the cells, and each unit key's dot product with its
    /// head's unit sum. `sums` becomes `[layers][n_head_kv][head_dim]` and `cosines`
    /// `[layers][cells][n_head_kv]`. A quantized cache's rotation is undone on the sums (the
    /// cosines do not change under it), so they are those of the keys the model computed.
    /// False: no device path here (host reads instead).
    #[allow(clippy::too_many_arguments)]
    pub fn device_live_stats(
        &mut self,
        layers: &[usize],
        cells: &[usize],
        reduce: LiveReduce,
        n_head_kv: usize,
        head_dim: usize,
        sums: &mut Vec<f32>,
        cosines: &mut Vec<f32>,
    ) -> Result<bool> {
        let LiveReduce::MeanDirection = reduce;
        let n = cells.len();
        let (per_sums, per_cos) = (n_head_kv * head_dim, n * n_head_kv);
        sums.clear();
        cosines.clear();
        if n == 0 || layers.is_empty() {
            sums.resize(layers.len() * per_sums, 0.0);
            return Ok(true);
        }
        let (kvs, idx32) = self.gather(layers, cells, n_head_kv, head_dim)?;
        let rotations: Vec<usize> = layers.iter().map(|&l| self.k_rotation(l)).collect();
        if rotations
            .iter()
            .any(|&r| r > 1 && !crate::math::whole_blocks(head_dim, r))
        {
            return Ok(false);
        }
        self.synchronize();
        let Some(dev) = self.device_for(layers, false)? else {
            return Ok(false);
        };
        let graph_size = 12 * layers.len() + 16;
        let Some(gctx) = dev.graph_ctx(12 * layers.len() + 8, graph_size) else {
            return Err(Error::KvCache("ggml_init failed".into()));
        };
        let (h, d) = (n_head_kv as i64, head_dim as i64);
        // Below ggml's l2_norm clamps the norm at this (CUDA squares it: it must stay a
        // normal f32 then): a zero key stays zero and leaves the sum alone, as on the host.
        let eps = 1e-12f32;
        let mut outs = Vec::with_capacity(layers.len());
        // SAFETY: all tensors are created in `gctx` (alive until the end of this block) from
        // the live cache tensors; `compute` allocates the graph's own tensors before
        // `set_inputs` writes `n` i32 into `idx` (each checked against every layer's cells by
        // `gather_indices`); each output holds h*d (sums) or n*h (cosines) f32, read back
        // into buffers of exactly that size after the (synchronous) compute.
        unsafe {
            let ctx = gctx.0;
            let gf = sys::ggml_new_graph_custom(ctx, graph_size, false);
            let idx = sys::ggml_new_tensor_1d(ctx, sys::GGML_TYPE_I32, n as i64);
            sys::ggml_set_input(idx);
            for kv in &kvs {
                let rows = sys::ggml_get_rows(ctx, kv.k, idx);
                let heads = sys::ggml_reshape_3d(ctx, rows, d, h, n as i64);
                let unit = sys::ggml_l2_norm(ctx, heads, eps);
                // [d, h, n] → [n, d, h]: the sum over cells is a sum of rows.
                let by_cell = sys::ggml_cont(ctx, sys::ggml_permute(ctx, unit, 1, 2, 0, 3));
                let sum = sys::ggml_reshape_2d(ctx, sys::ggml_sum_rows(ctx, by_cell), d, h);
                let unit_sum = sys::ggml_l2_norm(ctx, sum, eps);
                let cos = sys::ggml_sum_rows(ctx, sys::ggml_mul(ctx, unit, unit_sum));
                for t in [sum, cos] {
                    sys::ggml_set_output(t);
                    sys::ggml_build_forward_expand(gf, t);
                }
                outs.push((sum, cos));
            }
            let ok = dev.compute(gf, &mut || {
                sys::ggml_backend_tensor_set(idx, idx32.as_ptr() as *const c_void, 0, n * 4);
            })?;
            if !ok {
                return Ok(false);
            }
            sums.resize(layers.len() * per_sums, 0.0);
            cosines.resize(layers.len() * per_cos, 0.0);
            for (i, &(sum, cos)) in outs.iter().enumerate() {
                let s = &mut sums[i * per_sums..(i + 1) * per_sums];
                sys::ggml_backend_tensor_get(sum, s.as_mut_ptr() as *mut c_void, 0, per_sums * 4);
                let c = &mut cosines[i * per_cos..(i + 1) * per_cos];
                sys::ggml_backend_tensor_get(cos, c.as_mut_ptr() as *mut c_void, 0, per_cos * 4);
            }
        }
        for (i, &rot) in rotations.iter().enumerate() {
            // The rotation is orthonormal and its own inverse (checked to fit above).
            if rot > 1 {
                crate::math::hadamard_in_place(&mut sums[i * per_sums..(i + 1) * per_sums], rot);
            }
        }
        let traffic = &mut self.hook.traffic;
        traffic.set(n * 4);
        for _ in layers {
            traffic.got((per_sums + per_cos) * 4);
        }
        Ok(true)
    }

    /// Moves head slices for several (layer, head) groups in one graph on the cache's device:
    /// per group and tensor, `get_rows` of the source cells from the head's column view and
    /// `set_rows` into the destination cells. Sources must not be destinations (the eviction
    /// plan moves out of removed cells into cells that stay). False: no device path (the
    /// cache type is not f16/bf16/f32, or no backend reaches the tensors).
    pub(in crate::ffi) fn device_move_heads(
        &mut self,
        groups: &[HeadMoves],
        n_head_kv: usize,
    ) -> Result<bool> {
        let mut layers: Vec<usize> = groups.iter().map(|g| g.layer).collect();
        layers.sort_unstable();
        layers.dedup();
        let kvs: Vec<(usize, LayerKv)> = layers
            .iter()
            .map(|&l| Ok((l, self.layer_kv(l)?)))
            .collect::<Result<_>>()?;
        for (_, kv) in &kvs {
            for t in [kv.k, kv.v] {
                if t.is_null() {
                    return Ok(false);
                }
                // SAFETY: cache tensors live as long as the context.
                let ty = unsafe { (*t).type_ };
                // A dequantise/requantise round trip is exact only for these.
                if ![sys::GGML_TYPE_F16, sys::GGML_TYPE_BF16, sys::GGML_TYPE_F32].contains(&ty) {
                    return Ok(false);
                }
            }
        }
        let mut src_idx: Vec<i32> = Vec::new();
        let mut dst_idx: Vec<i64> = Vec::new();
        for g in groups {
            for &(s, t) in &g.moves {
                src_idx.push(s as i32);
                dst_idx.push(t as i64);
            }
        }
        if src_idx.is_empty() {
            return Ok(true);
        }
        self.synchronize();
        let Some(dev) = self.device_for(&layers, true)? else {
            return Ok(false);
        };
        let graph_size = 8 * groups.len() + 16;
        let Some(gctx) = dev.graph_ctx(10 * groups.len() + 8, graph_size) else {
            return Err(Error::KvCache("ggml_init failed".into()));
        };
        let total = src_idx.len();
        // SAFETY: tensors are created in `gctx` (alive for this block) from the live cache
        // tensors; each view covers one head's columns of every cell (offset head*slice < row
        // size, checked); the index inputs are allocated by `compute` before `set_inputs`
        // writes exactly `total` entries into each; cells were checked against ne[1].
        unsafe {
            let ctx = gctx.0;
            let gf = sys::ggml_new_graph_custom(ctx, graph_size, false);
            let src = sys::ggml_new_tensor_1d(ctx, sys::GGML_TYPE_I32, total as i64);
            let dst = sys::ggml_new_tensor_1d(ctx, sys::GGML_TYPE_I64, total as i64);
            sys::ggml_set_input(src);
            sys::ggml_set_input(dst);
            let mut at = 0usize;
            for &HeadMoves {
                layer,
                head,
                ref moves,
            } in groups
            {
                let Some((_, kv)) = kvs.iter().find(|(l, _)| *l == layer) else {
                    return Err(Error::KvCache(format!("layer {layer} not found")));
                };
                let m = moves.len();
                if m == 0 {
                    continue;
                }
                let s = sys::ggml_view_1d(ctx, src, m as i64, at * 4);
                let t = sys::ggml_view_1d(ctx, dst, m as i64, at * 8);
                at += m;
                for cache in [kv.k, kv.v] {
                    let (ne0, ne1, nb1, ty) = (
                        (*cache).ne[0],
                        (*cache).ne[1],
                        (*cache).nb[1],
                        (*cache).type_,
                    );
                    if n_head_kv == 0 || ne0 % n_head_kv as i64 != 0 || head >= n_head_kv {
                        return Err(Error::KvCache(
                            "cache row is not a whole number of heads".into(),
                        ));
                    }
                    if moves
                        .iter()
                        .any(|&(a, b)| a as i64 >= ne1 || b as i64 >= ne1)
                    {
                        return Err(Error::KvCache("a head move's cell is out of range".into()));
                    }
                    let hd = ne0 / n_head_kv as i64;
                    let slice = sys::ggml_row_size(ty, hd);
                    let col = sys::ggml_view_2d(ctx, cache, hd, ne1, nb1, head * slice);
                    let rows = sys::ggml_get_rows(ctx, col, s);
                    let w = sys::ggml_set_rows(ctx, col, rows, t);
                    sys::ggml_build_forward_expand(gf, w);
                }
            }
            let done = dev.compute(gf, &mut || {
                sys::ggml_backend_tensor_set(src, src_idx.as_ptr() as *const c_void, 0, total * 4);
                sys::ggml_backend_tensor_set(dst, dst_idx.as_ptr() as *const c_void, 0, total * 8);
            })?;
            if done {
                self.hook.traffic.set(total * 4);
                self.hook.traffic.set(total * 8);
            }
            Ok(done)
        }
    }
}

/// The cell indices one gather graph reads from every layer of `shapes` (`[row values, rows]`
/// of each K cache tensor), checked against every layer: a backend's `get_rows` need not
/// check its indices (CUDA's does not), and layers may hold different numbers of cells
/// (sliding-window layers hold fewer).
fn gather_indices(
    shapes: &[[i64; 2]],
    n_head_kv: usize,
    head_dim: usize,
    cells: &[usize],
) -> Result<Vec<i32>> {
    let row_values = n_head_kv
        .checked_mul(head_dim)
        .and_then(|x| i64::try_from(x).ok());
    let mut rows = i64::MAX;
    for &[ne0, ne1] in shapes {
        if Some(ne0) != row_values {
            return Err(Error::KvCache(
                "K cache rows are not n_head_kv x head_dim".into(),
            ));
        }
        rows = rows.min(ne1);
    }
    cells
        .iter()
        .map(|&c| match (i64::try_from(c), i32::try_from(c)) {
            (Ok(c64), Ok(c32)) if c64 < rows => Ok(c32),
            _ => Err(Error::KvCache(format!(
                "cell {c} out of range (the smallest layer holds {rows} cells)"
            ))),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::gather_indices;

    #[test]
    fn gathered_cells_are_checked_against_every_layer_not_the_first() {
        // A full-attention layer of 512 cells, then a sliding-window layer of 256.
        let shapes = [[128, 512], [128, 256]];
        assert_eq!(
            gather_indices(&shapes, 2, 64, &[0, 255]).expect("in range"),
            vec![0, 255]
        );
        let e = gather_indices(&shapes, 2, 64, &[300]).expect_err("past the second layer");
        assert!(e.to_string().contains("out of range"), "{e}");
        assert!(gather_indices(&shapes, 2, 64, &[usize::MAX]).is_err());
        // Rows of another width are refused before any index is built.
        assert!(gather_indices(&[[96, 512]], 2, 64, &[0]).is_err());
    }
}
