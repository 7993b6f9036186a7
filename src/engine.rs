//! A llama.cpp context whose KV cache stays within a budget: decode tokens, score the new keys
//! once, evict the lowest-scoring tokens. Used by every command (run, chat, eval, bench).

use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::cache::{position_ranges, CacheBook, EvictionConfig, Granularity};
use crate::error::{Error, Result};
use crate::ffi::{
    Batch, Context, ContextParams, GraphObserver, HeadMoveGroup, Model, NodeInfo, NodeOp, Token,
};
use crate::policy::{KeyReduce, NewKeys, Scorer};

/// Where the hook reads the post-RoPE keys of new tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeySource {
    /// From the KV cache rows the decode just wrote, after `llama_decode` returns: no graph
    /// split, no synchronisation inside the graph. Scored where the cache lives (one small
    /// ggml graph per eviction round on the cache's backend, only n x heads floats come back)
    /// when the policy's score is a per-head reduction of the key; else as `Host`. The default.
    Cache,
    /// Like `Cache`, but the K rows are always copied to the host and scored there (the
    /// reference for the device path).
    Host,
    /// From the `Kcur-<layer>` ROPE nodes while the graph runs: one graph split per layer.
    /// The simple reference path.
    Graph,
}

impl std::str::FromStr for KeySource {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "cache" => Ok(KeySource::Cache),
            "host" => Ok(KeySource::Host),
            "graph" => Ok(KeySource::Graph),
            _ => Err(Error::invalid(format!(
                "unknown key source '{s}' (known: cache, host, graph)"
            ))),
        }
    }
}

impl std::fmt::Display for KeySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KeySource::Cache => "cache",
            KeySource::Host => "host",
            KeySource::Graph => "graph",
        })
    }
}

#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// `None`: full cache of `capacity` cells, no eviction.
    pub eviction: Option<EvictionConfig>,
    /// Without eviction: the cells the context must hold. With eviction: the most tokens the
    /// job will ever feed (prompt + generated), which caps the context, since a cache never
    /// holds more cells than tokens it was given; 0 = unknown (an open-ended chat).
    pub capacity: usize,
    pub n_batch: usize,
    pub threads: i32,
    pub key_source: KeySource,
    pub flash_attn: Option<bool>,
    /// Install the graph hook; only a benchmark's "hook off" baseline turns it off (then
    /// nothing can be evicted by score).
    pub hook: bool,
}

/// Counters every command reports.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Stats {
    pub prompt_tokens: u64,
    pub generated_tokens: u64,
    pub live_cells: usize,
    pub peak_cells: usize,
    pub evicted: u64,
    pub head_slices_moved: u64,
    /// Scoring batches whose keys were reduced on the cache's device (no key read-back).
    pub device_score_batches: u64,
    /// Eviction rounds whose head-slice moves ran as one graph on the cache's device.
    pub device_move_rounds: u64,
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
}

fn rate(n: u64, secs: f64) -> f64 {
    if secs > 0.0 {
        n as f64 / secs
    } else {
        0.0
    }
}

/// Collects `Kcur` ROPE outputs per layer while the graph runs (the `Graph` key source).
#[derive(Default)]
struct KeyTap {
    layers: Arc<Mutex<Vec<Vec<f32>>>>,
}

impl GraphObserver for KeyTap {
    fn wants(&mut self, node: &NodeInfo) -> bool {
        node.op == NodeOp::Rope && node.base == "Kcur" && node.layer.is_some()
    }

    fn observe(&mut self, node: &NodeInfo, data: &[f32]) {
        let Some(layer) = node.layer else { return };
        if let Ok(mut layers) = self.layers.lock() {
            if layers.len() <= layer {
                layers.resize(layer + 1, Vec::new());
            }
            layers[layer].clear();
            layers[layer].extend_from_slice(data);
        }
    }
}

pub struct Engine {
    ctx: Context,
    scorer: Box<dyn Scorer>,
    cfg: EngineConfig,
    /// Created after the first decode, when the cache tensors are known.
    book: Option<CacheBook>,
    /// Model layers whose keys are scored (those with a full-size KV cache).
    tracked: Vec<usize>,
    graph_keys: Option<Arc<Mutex<Vec<Vec<f32>>>>>,
    batch: Batch,
    next_pos: i32,
    stats: Stats,
    keys: Vec<f32>,
    layer_scores: Vec<f32>,
    scores: Vec<f32>,
    n_head_kv: usize,
    head_dim: usize,
    /// Cache key source: tokens decoded but not scored yet (cells, positions). Their keys stay
    /// in the cache until an eviction round needs the scores, which then reads them in one
    /// batch per layer instead of one small copy per layer after every decode.
    pending_cells: Vec<i64>,
    pending_pos: Vec<i32>,
    /// Score on the cache's device (`KeySource::Cache` and a reducible score) until the
    /// backend turns out not to support it.
    device_scoring: bool,
    filters_on_device: bool,
}

/// Most tokens scored in one go when pending keys are flushed (bounds the key buffer).
const FLUSH_CHUNK: usize = 2048;

impl Engine {
    pub fn new(model: &Arc<Model>, scorer: Box<dyn Scorer>, cfg: EngineConfig) -> Result<Engine> {
        let evicting = cfg.eviction.is_some() && scorer.evicts();
        if evicting && !cfg.hook {
            return Err(Error::invalid("eviction needs the graph hook"));
        }
        if let Some(ev) = &cfg.eviction {
            ev.validate()?;
        }
        let n_batch = cfg.n_batch.max(1);
        // The budget plus one batch of new tokens, plus a margin for llama.cpp's slot search;
        // never more than the job's tokens (`run --budget 100000` on 9 tokens needs 9 cells).
        let too_large = || Error::invalid("the KV budget plus the batch size is too large");
        let n_ctx = match (&cfg.eviction, evicting) {
            (Some(ev), true) => {
                let most = ev.budget.checked_add(n_batch).ok_or_else(too_large)?;
                let most = if cfg.capacity > 0 {
                    most.min(cfg.capacity)
                } else {
                    most
                };
                most.checked_add(16).ok_or_else(too_large)?
            }
            _ => cfg.capacity.max(1).checked_add(1).ok_or_else(too_large)?,
        };
        // Models with sliding-window layers (Gemma 3) get a second, smaller KV cache for them,
        // which llama.cpp prunes by itself; only the full-attention layers may be tracked. They
        // are told apart by cache size, so the full cache must be larger than the SWA one
        // (llama.cpp sizes that at about n_swa + n_batch, padded to 256): a budget below the
        // window would give both the same size and the book would follow the wrong cells.
        let n_swa = model
            .meta(&format!(
                "{}.attention.sliding_window",
                model.architecture()
            ))
            .and_then(|v| v.trim().parse::<usize>().ok())
            .unwrap_or(0);
        let n_ctx = if evicting && n_swa > 0 {
            n_swa
                .checked_add(n_batch)
                .and_then(|x| x.checked_mul(2))
                .and_then(|x| x.checked_add(256))
                .ok_or_else(too_large)?
                .max(n_ctx)
        } else {
            n_ctx
        };
        // llama.cpp aborts on a batch larger than the context; a tiny full cache gets small batches.
        let n_batch = n_batch.min(n_ctx);
        let head_mode = cfg
            .eviction
            .as_ref()
            .is_some_and(|e| e.granularity == Granularity::Head);
        let params = ContextParams {
            n_ctx: u32::try_from(n_ctx).map_err(|_| Error::invalid("context too large"))?,
            n_batch: n_batch as u32,
            threads: cfg.threads,
            // Moving head slices needs V stored one row per cell, which flash attention gives.
            flash_attn: if head_mode {
                Some(true)
            } else {
                cfg.flash_attn
            },
            hook: cfg.hook,
        };
        let mut ctx = Context::new(model, &params)?;
        let mut graph_keys = None;
        if evicting && cfg.key_source == KeySource::Graph && scorer.needs_keys() {
            let tap = KeyTap::default();
            graph_keys = Some(Arc::clone(&tap.layers));
            ctx.set_observer(Some(Box::new(tap)));
        }
        let stats = Stats {
            n_ctx: ctx.n_ctx(),
            ..Stats::default()
        };
        let device_scoring = cfg.key_source == KeySource::Cache && scorer.key_reduce().is_some();
        Ok(Engine {
            ctx,
            scorer,
            cfg: EngineConfig { n_batch, ..cfg },
            book: None,
            tracked: Vec::new(),
            graph_keys,
            batch: Batch::new(n_batch),
            next_pos: 0,
            stats,
            keys: Vec::new(),
            layer_scores: Vec::new(),
            scores: Vec::new(),
            n_head_kv: model.n_head_kv(),
            head_dim: model.head_dim(),
            pending_cells: Vec::new(),
            pending_pos: Vec::new(),
            device_scoring,
            filters_on_device: false,
        })
    }

    pub fn context(&self) -> &Context {
        &self.ctx
    }

    pub fn context_mut(&mut self) -> &mut Context {
        &mut self.ctx
    }

    pub fn model(&self) -> &Arc<Model> {
        self.ctx.model()
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    pub fn next_position(&self) -> i32 {
        self.next_pos
    }

    pub fn budget(&self) -> Option<usize> {
        self.cfg.eviction.as_ref().map(|e| e.budget)
    }

    /// Layers the book tracks (its layer index `i` is the `i`-th layer with a full-size cache).
    pub fn tracked_layers(&self) -> usize {
        self.tracked.len()
    }

    pub fn book(&self) -> Option<&CacheBook> {
        self.book.as_ref()
    }

    /// Scores every token decoded so far whose score is still pending (the cache key source
    /// scores lazily, when an eviction round needs it). Call before reading `book()` scores.
    pub fn flush_scores(&mut self) -> Result<()> {
        let mut done = 0;
        while done < self.pending_cells.len() {
            let end = (done + FLUSH_CHUNK).min(self.pending_cells.len());
            let cells = self.pending_cells[done..end].to_vec();
            let positions = self.pending_pos[done..end].to_vec();
            self.score_and_insert(&cells, &positions, None)?;
            done = end;
        }
        self.pending_cells.clear();
        self.pending_pos.clear();
        Ok(())
    }

    fn evicting(&self) -> bool {
        self.cfg.eviction.is_some() && self.scorer.evicts()
    }

    /// Starts a new peak measurement from the cells in use now (per-turn peaks in chat).
    pub fn reset_peak(&mut self) {
        self.stats.peak_cells = self.stats.live_cells;
    }

    /// Forgets the conversation: empty cache, positions from 0, counters kept.
    pub fn reset(&mut self) {
        self.ctx.clear_memory();
        if let Some(b) = self.book.as_mut() {
            b.clear();
        }
        self.pending_cells.clear();
        self.pending_pos.clear();
        self.next_pos = 0;
        self.stats.live_cells = 0;
    }

    /// Decodes `tokens` in chunks of `n_batch`, evicting after each chunk.
    ///
    /// `logits_for(i)` says whether token `i` of `tokens` needs logits; `on_chunk` runs after
    /// each chunk's decode with the chunk's offset in `tokens` and its length, while its logits
    /// are readable (`context().logits(j)` for the j-th token of the chunk that asked for them).
    pub fn ingest(
        &mut self,
        tokens: &[Token],
        logits_for: &mut dyn FnMut(usize) -> bool,
        on_chunk: &mut dyn FnMut(&Context, usize, usize) -> Result<()>,
    ) -> Result<()> {
        let n_batch = self.cfg.n_batch;
        let mut offset = 0;
        while offset < tokens.len() {
            let end = (offset + n_batch).min(tokens.len());
            let started = Instant::now();
            self.batch.clear();
            for (i, &t) in tokens[offset..end].iter().enumerate() {
                let pos = self.next_pos + i as i32;
                self.batch.push(t, pos, logits_for(offset + i));
            }
            self.decode_batch()?;
            on_chunk(&self.ctx, offset, end - offset)?;
            self.evict()?;
            self.stats.prefill_seconds += started.elapsed().as_secs_f64();
            self.stats.prompt_tokens += (end - offset) as u64;
            offset = end;
        }
        Ok(())
    }

    /// Decodes one generated token (its logits become readable at batch index 0).
    pub fn step(&mut self, token: Token) -> Result<()> {
        let started = Instant::now();
        self.batch.clear();
        self.batch.push(token, self.next_pos, true);
        self.decode_batch()?;
        self.evict()?;
        self.stats.decode_seconds += started.elapsed().as_secs_f64();
        self.stats.generated_tokens += 1;
        Ok(())
    }

    fn decode_batch(&mut self) -> Result<()> {
        let n = self.batch.len();
        if !self.evicting() && self.next_pos as usize + n > self.ctx.n_ctx() {
            return Err(Error::invalid(format!(
                "the full cache holds {} tokens and the input needs more: policy 'none' sizes the cache to the input, give it a larger capacity",
                self.ctx.n_ctx()
            )));
        }
        self.ctx.decode(&self.batch)?;
        self.next_pos += n as i32;
        self.stats.live_cells += n;
        self.stats.peak_cells = self.stats.peak_cells.max(self.stats.live_cells);
        if self.stats.kv_bytes == 0 {
            self.stats.kv_bytes = self.ctx.kv_bytes();
        }
        if self.evicting() {
            self.record_new_keys()?;
        }
        Ok(())
    }

    fn ensure_book(&mut self) -> Result<()> {
        if self.book.is_some() {
            return Ok(());
        }
        let rows: Vec<usize> = (0..self.ctx.kv_layers())
            .map(|l| self.ctx.kv_rows(l))
            .collect();
        let full = rows.iter().copied().max().unwrap_or(0);
        self.tracked = (0..rows.len())
            .filter(|&l| rows[l] == full && full > 0)
            .collect();
        if self.tracked.is_empty() {
            return Err(Error::KvCache(
                "the hook saw no KV cache writes: is this an attention model?".into(),
            ));
        }
        let head_mode = self
            .cfg
            .eviction
            .as_ref()
            .is_some_and(|e| e.granularity == Granularity::Head);
        if head_mode && !self.ctx.can_move_heads(self.n_head_kv * self.head_dim) {
            return Err(Error::KvCache(
                "per-head retention needs V stored one row per cell (flash attention on): use --granularity position".into(),
            ));
        }
        self.book = Some(CacheBook::new(self.tracked.len(), self.n_head_kv, full));
        Ok(())
    }

    /// Records which cells the tokens of the last batch went to, and scores them: at once when
    /// the keys came from the graph (they are only valid now), later for the cache key source.
    fn record_new_keys(&mut self) -> Result<()> {
        self.ensure_book()?;
        let n = self.batch.len();
        let positions: Vec<i32> = (0..n).filter_map(|i| self.batch.pos(i)).collect();
        let cells = self.ctx.last_cells(self.tracked[0])?;
        if cells.len() != n || positions.len() != n {
            return Err(Error::KvCache(format!(
                "the decode wrote {} cells for {n} tokens",
                cells.len()
            )));
        }
        if self.graph_keys.is_some() {
            let tap = self.graph_keys.clone();
            return self.score_and_insert(&cells, &positions, tap.as_deref());
        }
        self.pending_cells.extend_from_slice(&cells);
        self.pending_pos.extend_from_slice(&positions);
        Ok(())
    }

    /// Scores tokens at `cells` (keys from the graph tap when given, else read from the cache
    /// rows) and records them in the book.
    fn score_and_insert(
        &mut self,
        cells_raw: &[i64],
        positions: &[i32],
        tap: Option<&Mutex<Vec<Vec<f32>>>>,
    ) -> Result<()> {
        let n = cells_raw.len();
        let cells: Vec<usize> = cells_raw.iter().map(|&c| c.max(0) as usize).collect();
        let (h, d) = (self.n_head_kv, self.head_dim);
        self.scores.clear();
        self.scores.resize(self.tracked.len() * n * h, 0.0);
        self.layer_scores.resize(n * h, 0.0);
        let needs_keys = self.scorer.needs_keys();
        if needs_keys
            && tap.is_none()
            && self.device_scoring
            && self.score_on_device(cells_raw, positions)?
        {
            self.stats.device_score_batches += 1;
            let book = self
                .book
                .as_mut()
                .ok_or_else(|| Error::KvCache("no cache book".into()))?;
            return book.insert(&cells, positions, &self.scores);
        }
        for (li, &layer) in self.tracked.iter().enumerate() {
            if needs_keys {
                match tap {
                    Some(tap) => {
                        let layers = tap
                            .lock()
                            .map_err(|_| Error::KvCache("key tap poisoned".into()))?;
                        let data = layers
                            .get(layer)
                            .filter(|v| v.len() == n * h * d)
                            .ok_or_else(|| {
                                Error::KvCache(format!("no Kcur keys captured for layer {layer}"))
                            })?;
                        self.keys.clear();
                        self.keys.extend_from_slice(data);
                    }
                    None => self.ctx.read_k_rows(layer, cells_raw, &mut self.keys)?,
                }
                if self.keys.len() != n * h * d {
                    return Err(Error::KvCache(format!(
                        "layer {layer}: K rows hold {} values, expected {n} x {h} x {d}",
                        self.keys.len()
                    )));
                }
            }
            let new = NewKeys {
                layer,
                keys: &self.keys,
                positions,
                n_head_kv: h,
                head_dim: d,
            };
            self.scorer.score(&new, &mut self.layer_scores);
            self.scores[li * n * h..(li + 1) * n * h].copy_from_slice(&self.layer_scores);
        }
        let book = self
            .book
            .as_mut()
            .ok_or_else(|| Error::KvCache("no cache book".into()))?;
        book.insert(&cells, positions, &self.scores)
    }

    /// Fills `self.scores` for `cells` from per-head key reductions computed on the cache's
    /// device; false (and the host path from then on) when the backend cannot.
    fn score_on_device(&mut self, cells: &[i64], positions: &[i32]) -> Result<bool> {
        let Some(reduce) = self.scorer.key_reduce() else {
            return Ok(false);
        };
        let (n, h, d) = (cells.len(), self.n_head_kv, self.head_dim);
        if reduce == KeyReduce::Dot && !self.filters_on_device {
            let mut flat = Vec::with_capacity(self.tracked.len() * h * d);
            for &layer in &self.tracked {
                for head in 0..h {
                    match self.scorer.filter(layer, head) {
                        Some(f) if f.len() == d => flat.extend_from_slice(f),
                        _ => {
                            self.device_scoring = false;
                            return Ok(false);
                        }
                    }
                }
            }
            self.filters_on_device = self.ctx.set_key_filters(&self.tracked, &flat, h, d)?;
            if !self.filters_on_device {
                self.device_scoring = false;
                return Ok(false);
            }
        }
        if !self
            .ctx
            .device_key_stats(&self.tracked, cells, reduce, h, d, &mut self.keys)?
        {
            self.device_scoring = false;
            return Ok(false);
        }
        for (li, &layer) in self.tracked.iter().enumerate() {
            let stats = &self.keys[li * n * h..(li + 1) * n * h];
            self.scorer
                .score_reduced(layer, positions, stats, &mut self.layer_scores);
            self.scores[li * n * h..(li + 1) * n * h].copy_from_slice(&self.layer_scores);
        }
        Ok(true)
    }

    /// Brings the cache back within its budget.
    pub fn evict(&mut self) -> Result<()> {
        let Some(ev) = self.cfg.eviction.clone() else {
            return Ok(());
        };
        if !self.scorer.evicts() || self.stats.live_cells <= ev.budget {
            return Ok(());
        }
        self.flush_scores()?;
        let Some(book) = self.book.as_mut() else {
            return Ok(());
        };
        let plan = book.plan(&ev);
        if plan.remove.is_empty() {
            return Ok(());
        }
        // One graph on the cache's device for all of the round's moves (when it can).
        let groups: Vec<HeadMoveGroup<'_>> = plan
            .moves
            .iter()
            .map(|hm| (self.tracked[hm.layer], hm.head, hm.moves.as_slice()))
            .collect();
        if self.ctx.move_head_slices_batch(&groups, self.n_head_kv)? {
            self.stats.device_move_rounds += 1;
        }
        self.stats.head_slices_moved += groups.iter().map(|g| g.2.len() as u64).sum::<u64>();
        let freed = book.apply(&plan);
        for (p0, p1) in position_ranges(&freed) {
            if !self.ctx.remove_positions(p0, p1) {
                return Err(Error::KvCache(format!(
                    "llama.cpp refused to remove positions [{p0}, {p1})"
                )));
            }
        }
        self.stats.evicted += freed.len() as u64;
        self.stats.live_cells -= freed.len();
        Ok(())
    }
}
