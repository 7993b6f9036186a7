//! Where the keys of new tokens are read from when they are scored.

use crate::error::{Error, Result};
use crate::ffi::{Context, GraphObserver, NodeInfo, NodeOp};

/// Collects `Kcur` ROPE outputs per layer while the graph runs (the `Graph` key source).
#[derive(Default)]
pub(super) struct KeyTap {
    /// `[model layer]` → the last decode's keys, `[token][n_head_kv][head_dim]`.
    pub(super) layers: Vec<Vec<f32>>,
}

impl GraphObserver for KeyTap {
    fn wants(&mut self, node: &NodeInfo) -> bool {
        node.op == NodeOp::Rope && node.base == "Kcur" && node.layer.is_some()
    }

    fn observe(&mut self, node: &NodeInfo, data: &[f32]) {
        let Some(layer) = node.layer else { return };
        if self.layers.len() <= layer {
            self.layers.resize(layer + 1, Vec::new());
        }
        self.layers[layer].clear();
        self.layers[layer].extend_from_slice(data);
    }
}

/// Where the keys of new tokens come from when they are scored, and where they are scored:
/// one choice per engine (made from [`super::KeySource`], the scorer and the backend), so the
/// per-layer scoring loop does not branch on the key source.
pub(super) enum KeyReader {
    /// The K cache rows the decode wrote, reduced to per-head statistics on the cache's device
    /// when an eviction round needs the scores. `filters_loaded`: the scorer's filters are on
    /// the device already. Becomes `Host` for good once the backend turns out not to support it.
    Device { filters_loaded: bool },
    /// The K cache rows the decode wrote, copied to the host when an eviction round needs the
    /// scores, and scored there.
    Host,
    /// The `Kcur-<layer>` nodes, captured during each decode by the tap lent to it; scored at
    /// once, since they are only valid until the next decode.
    Graph(KeyTap),
}

impl KeyReader {
    /// Fills `out` with the keys of `cells` for model layer `layer`, `[cell][head][dim]`.
    pub(super) fn read(
        &self,
        ctx: &mut Context,
        layer: usize,
        cells: &[usize],
        out: &mut Vec<f32>,
    ) -> Result<()> {
        match self {
            KeyReader::Device { .. } | KeyReader::Host => ctx.read_k_rows(layer, cells, out),
            KeyReader::Graph(tap) => {
                let data = tap.layers.get(layer).ok_or_else(|| {
                    Error::KvCache(format!("no Kcur keys captured for layer {layer}"))
                })?;
                out.clear();
                out.extend_from_slice(data);
                Ok(())
            }
        }
    }
}
