//! The one stats type every command reports.

use crate::math::rate;

/// Counters every command reports: the one stats type. A report of part of a job (a chat
/// turn, a benchmark pass) is [`Stats::since`] an earlier snapshot.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Stats {
    pub prompt_tokens: u64,
    pub generated_tokens: u64,
    /// Most cells in use at any point (measured after each decode, before eviction); the
    /// cells in use now are [`Engine::live_cells`](crate::engine::Engine::live_cells).
    pub peak_cells: usize,
    pub evicted: u64,
    pub head_slices_moved: u64,
    /// Scoring batches whose keys were reduced on the cache's device (no key read-back): entry
    /// scores, and re-scores of the live cells.
    pub device_score_batches: u64,
    /// Eviction rounds whose head-slice moves ran as one graph on the cache's device.
    pub device_move_rounds: u64,
    /// Eviction rounds that removed cells.
    pub eviction_rounds: u64,
    /// Eviction rounds that re-scored every live cell first (a scorer that
    /// [re-scores](crate::policy::Scorer::rescores_live)).
    pub rescore_rounds: u64,
    /// Bytes qfilters itself copied from the KV cache's backend to the host for eviction, and
    /// the other way ([`crate::ffi::KvTraffic`]: its own tensor reads and writes and its
    /// graphs' inputs and outputs, for scoring and head moves; not the RPC protocol's own
    /// bytes, and counted even where the cache is in host memory and the copy is a memcpy).
    pub eviction_bytes_to_host: u64,
    pub eviction_bytes_to_device: u64,
    /// The copies behind those bytes, each one call to the backend (over RPC, one message).
    pub eviction_transfers: u64,
    pub kv_bytes: usize,
    pub n_ctx: usize,
    pub prefill_seconds: f64,
    pub decode_seconds: f64,
}

impl Stats {
    pub fn prefill_tok_s(&self) -> f64 {
        rate(self.prompt_tokens, self.prefill_seconds)
    }
    pub fn decode_tok_s(&self) -> f64 {
        rate(self.generated_tokens, self.decode_seconds)
    }
    /// Eviction bytes, both ways, per eviction round (0 without rounds).
    pub fn eviction_bytes_per_round(&self) -> f64 {
        let bytes = self.eviction_bytes_to_host + self.eviction_bytes_to_device;
        if self.eviction_rounds == 0 {
            0.0
        } else {
            bytes as f64 / self.eviction_rounds as f64
        }
    }

    /// What happened since `before` (an earlier snapshot of the same engine): the counters
    /// and times as differences; the peak (since the last [`Engine::reset_peak`](crate::engine::Engine::reset_peak)), the KV
    /// bytes and the context size as they are now.
    pub fn since(&self, before: &Stats) -> Stats {
        Stats {
            prompt_tokens: self.prompt_tokens.saturating_sub(before.prompt_tokens),
            generated_tokens: self
                .generated_tokens
                .saturating_sub(before.generated_tokens),
            peak_cells: self.peak_cells,
            evicted: self.evicted.saturating_sub(before.evicted),
            head_slices_moved: self
                .head_slices_moved
                .saturating_sub(before.head_slices_moved),
            device_score_batches: self
                .device_score_batches
                .saturating_sub(before.device_score_batches),
            device_move_rounds: self
                .device_move_rounds
                .saturating_sub(before.device_move_rounds),
            eviction_rounds: self.eviction_rounds.saturating_sub(before.eviction_rounds),
            rescore_rounds: self.rescore_rounds.saturating_sub(before.rescore_rounds),
            eviction_bytes_to_host: self
                .eviction_bytes_to_host
                .saturating_sub(before.eviction_bytes_to_host),
            eviction_bytes_to_device: self
                .eviction_bytes_to_device
                .saturating_sub(before.eviction_bytes_to_device),
            eviction_transfers: self
                .eviction_transfers
                .saturating_sub(before.eviction_transfers),
            kv_bytes: self.kv_bytes,
            n_ctx: self.n_ctx,
            prefill_seconds: self.prefill_seconds - before.prefill_seconds,
            decode_seconds: self.decode_seconds - before.decode_seconds,
        }
    }
}

/// The counters, then the three rates derived from them, so every report (`run --json-stats`,
/// chat's turn log, `bench --json`) carries them under the same names.
impl serde::Serialize for Stats {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        // Destructured so that a new field cannot be left out of the reports unnoticed.
        let Stats {
            prompt_tokens,
            generated_tokens,
            peak_cells,
            evicted,
            head_slices_moved,
            device_score_batches,
            device_move_rounds,
            eviction_rounds,
            rescore_rounds,
            eviction_bytes_to_host,
            eviction_bytes_to_device,
            eviction_transfers,
            kv_bytes,
            n_ctx,
            prefill_seconds,
            decode_seconds,
        } = self;
        let mut m = s.serialize_struct("Stats", 19)?;
        m.serialize_field("prompt_tokens", prompt_tokens)?;
        m.serialize_field("generated_tokens", generated_tokens)?;
        m.serialize_field("peak_cells", peak_cells)?;
        m.serialize_field("evicted", evicted)?;
        m.serialize_field("head_slices_moved", head_slices_moved)?;
        m.serialize_field("device_score_batches", device_score_batches)?;
        m.serialize_field("device_move_rounds", device_move_rounds)?;
        m.serialize_field("eviction_rounds", eviction_rounds)?;
        m.serialize_field("rescore_rounds", rescore_rounds)?;
        m.serialize_field("eviction_bytes_to_host", eviction_bytes_to_host)?;
        m.serialize_field("eviction_bytes_to_device", eviction_bytes_to_device)?;
        m.serialize_field("eviction_transfers", eviction_transfers)?;
        m.serialize_field("kv_bytes", kv_bytes)?;
        m.serialize_field("n_ctx", n_ctx)?;
        m.serialize_field("prefill_seconds", prefill_seconds)?;
        m.serialize_field("decode_seconds", decode_seconds)?;
        m.serialize_field("prefill_tok_s", &self.prefill_tok_s())?;
        m.serialize_field("decode_tok_s", &self.decode_tok_s())?;
        m.serialize_field("eviction_bytes_per_round", &self.eviction_bytes_per_round())?;
        m.end()
    }
}
