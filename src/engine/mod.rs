//! A llama.cpp context whose KV cache stays within a budget: decode tokens, score the new keys
//! once, evict the lowest-scoring tokens. Used by every command (run, chat, eval, bench).

pub mod cache;
mod config;
mod keys;
mod stats;

use std::sync::Arc;
use std::time::Instant;

use crate::engine::cache::{position_ranges, CacheBook, TrackedLayer};
use crate::error::{Error, Result};
use crate::ffi::{Batch, CacheType, Context, ContextParams, HeadMoves, Model, Sampler, Token};
use crate::policy::{KeyReduce, LiveStats, NewKeys, Scorer};

pub use config::{context_cells, CacheSize, EngineConfig, KeySource, DEFAULT_BATCH};
use keys::{KeyReader, KeyTap};
pub use stats::Stats;

/// Which tokens of an [`Engine::ingest`] get logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// Only the last token of the input: what generation samples from.
    Last,
    /// Every token: what perplexity scores.
    All,
}

/// One decoded chunk of an [`Engine::ingest`], seen before the engine evicts after it.
pub struct Chunk<'a> {
    ctx: &'a Context,
    /// Where the chunk starts in the ingested tokens, and how many tokens it holds.
    pub offset: usize,
    pub len: usize,
    /// Whether the chunk's last token is the input's last token.
    pub last: bool,
    logits: Logits,
}

impl Chunk<'_> {
    /// Logits after token `j` of the chunk: any `j` with [`Logits::All`], only the input's
    /// last token with [`Logits::Last`]; anything else is an error.
    pub fn logits(&self, j: usize) -> Result<&[f32]> {
        let has = j < self.len
            && match self.logits {
                Logits::All => true,
                Logits::Last => self.last && j + 1 == self.len,
            };
        if !has {
            return Err(Error::invalid(format!(
                "token {j} of a chunk of {} was decoded without logits",
                self.len
            )));
        }
        self.ctx.logits(j)
    }

    /// The context right after the chunk's decode (for checks on what it wrote).
    pub fn context(&self) -> &Context {
        self.ctx
    }
}

/// Refuses a KV cache llama.cpp would refuse, or that eviction could not keep exact, before
/// llama.cpp sees it: a quantized V cache without flash attention (llama.cpp creates no
/// context), and per-head eviction without it (V is then stored transposed, and head slices
/// cannot move). `flash_attn`: `Some(false)` forced off; on or llama.cpp's choice pass.
pub fn check_cache(type_v: CacheType, flash_attn: Option<bool>, per_head: bool) -> Result<()> {
    if flash_attn != Some(false) {
        return Ok(());
    }
    if type_v.is_quantized() {
        return Err(Error::invalid(format!(
            "a quantized V cache (-ctv {type_v}) needs flash attention: use -fa on or -fa auto, or -ctv f16"
        )));
    }
    if per_head {
        return Err(Error::invalid(
            "per-head eviction (--granularity head) needs flash attention, which stores V one row per cell: use -fa on or -fa auto, or --granularity position",
        ));
    }
    Ok(())
}

/// Refuses a quantized cache type whose blocks do not tile one head of `head_dim` values:
/// llama.cpp refuses it with flash attention, and a head slice that is not whole blocks could
/// not be moved without requantizing. A clear error rather than a fallback to whole-position
/// eviction, since llama.cpp's flash attention refuses the type for this model anyway.
pub fn check_head_blocks(type_k: CacheType, type_v: CacheType, head_dim: usize) -> Result<()> {
    for (flag, t) in [("-ctk", type_k), ("-ctv", type_v)] {
        if !crate::math::whole_blocks(head_dim, t.block_size()) {
            return Err(Error::invalid(format!(
                "{flag} {t}: its blocks of {} values do not tile this model's heads of {head_dim} values; use f16, bf16 or f32",
                t.block_size()
            )));
        }
    }
    Ok(())
}

pub struct Engine {
    ctx: Context,
    scorer: Box<dyn Scorer>,
    cfg: EngineConfig,
    /// Created after the first decode, when the cache tensors are known.
    book: Option<CacheBook>,
    /// Model layers whose keys are scored (those with a full-size KV cache), indexed by
    /// [`TrackedLayer`].
    tracked: Vec<usize>,
    keys_from: KeyReader,
    batch: Batch,
    next_pos: i32,
    stats: Stats,
    keys: Vec<f32>,
    /// Value norms of the tokens being scored, when the scorer needs them.
    value_norms: Vec<f32>,
    layer_scores: Vec<f32>,
    scores: Vec<f32>,
    n_head_kv: usize,
    head_dim: usize,
    value_dim: usize,
    /// Cache key source: tokens decoded but not scored yet (cells, positions). Their keys stay
    /// in the cache until an eviction round needs the scores, which then reads them in one
    /// batch per layer instead of one small copy per layer after every decode.
    pending_cells: Vec<usize>,
    pending_pos: Vec<i32>,
    /// Tokens placed since the last re-score of the live cells ([`Engine::rescore_live`]).
    since_rescore: usize,
    /// Whether re-scores reduce the live keys on the cache's device (`KeySource::Cache`, until
    /// the device cannot); else the keys are read back.
    rescore_on_device: bool,
    /// Per-head sums a device re-score returns, `[tracked][n_head_kv][head_dim]`.
    live_sums: Vec<f32>,
    /// Batch row of the last decoded token when it has logits (what the next token is sampled
    /// from); `None` before any decode, after a reset, or when the last token had none.
    logits_row: Option<usize>,
}

/// Most tokens scored in one go when pending keys are flushed (bounds the key buffer).
const FLUSH_CHUNK: usize = 2048;

/// New tokens between two re-scores of the live cells: a sixteenth of the budget, so that what
/// a re-score depends on (KeyDiff's anchor: the mean of the live keys) has changed by at most
/// that share between two. Re-scoring at every round of `--slack 0` decoding (one per token)
/// read every live key back per token and cost SmolLM2 +72% decode time against knorm
/// (docs/BENCHMARKS.md, "Scorer cost").
pub fn rescore_interval(budget: usize) -> usize {
    (budget / 16).max(1)
}

impl Engine {
    pub fn new(model: &Arc<Model>, scorer: Box<dyn Scorer>, cfg: EngineConfig) -> Result<Engine> {
        let evicting = cfg.eviction().is_some();
        if evicting && !cfg.hook {
            return Err(Error::invalid("eviction needs the graph hook"));
        }
        if let Some(ev) = cfg.eviction() {
            ev.validate()?;
        }
        let n_batch = cfg.n_batch.max(1);
        let n_ctx = context_cells(&cfg.cache, cfg.job_tokens, n_batch, model.n_swa())?;
        // llama.cpp aborts on a batch larger than the context; a tiny full cache gets small batches.
        let n_batch = n_batch.min(n_ctx);
        let head_mode = cfg.moves_heads();
        check_cache(cfg.type_v, cfg.flash_attn, head_mode)?;
        if evicting && scorer.needs_value_norms() && cfg.flash_attn == Some(false) {
            return Err(Error::invalid(
                "this policy weighs keys by their values' norms, which needs flash attention (V stored one row per cell): use -fa on or -fa auto",
            ));
        }
        check_head_blocks(cfg.type_k, cfg.type_v, model.head_dim())?;
        let params = ContextParams {
            n_ctx: u32::try_from(n_ctx).map_err(|_| Error::invalid("context too large"))?,
            n_batch: n_batch as u32,
            threads: cfg.threads,
            // Moving head slices, and reading value norms, need V stored one row per cell,
            // which flash attention gives.
            flash_attn: if head_mode || (evicting && scorer.needs_value_norms()) {
                Some(true)
            } else {
                cfg.flash_attn
            },
            hook: cfg.hook,
            type_k: cfg.type_k,
            type_v: cfg.type_v,
        };
        let ctx = Context::new(model, &params)?;
        let keys_from = match cfg.key_source {
            KeySource::Graph if evicting && scorer.needs_keys() => {
                KeyReader::Graph(KeyTap::default())
            }
            // Scored on the cache's device while the backend supports it.
            KeySource::Cache if scorer.key_reduce().is_some() => KeyReader::Device {
                filters_loaded: false,
            },
            _ => KeyReader::Host,
        };
        let stats = Stats {
            n_ctx: ctx.n_ctx(),
            ..Stats::default()
        };
        Ok(Engine {
            ctx,
            scorer,
            cfg: EngineConfig { n_batch, ..cfg },
            book: None,
            tracked: Vec::new(),
            keys_from,
            batch: Batch::new(n_batch)?,
            next_pos: 0,
            stats,
            keys: Vec::new(),
            value_norms: Vec::new(),
            layer_scores: Vec::new(),
            scores: Vec::new(),
            n_head_kv: model.n_head_kv(),
            head_dim: model.head_dim(),
            value_dim: model.value_dim(),
            pending_cells: Vec::new(),
            pending_pos: Vec::new(),
            since_rescore: 0,
            rescore_on_device: cfg.key_source == KeySource::Cache,
            live_sums: Vec::new(),
            logits_row: None,
        })
    }

    pub fn context(&self) -> &Context {
        &self.ctx
    }

    /// One K (`value` false) or V cache row of model layer `layer`, as f32: what checks of
    /// head moves and key paths compare. Reads only: the cache's cells change through the
    /// engine alone, so the book always knows who sits where.
    pub fn read_cache_row(&mut self, layer: usize, value: bool, cell: usize) -> Result<Vec<f32>> {
        self.ctx.read_cache_row(layer, value, cell)
    }

    /// [`Engine::read_cache_row`] as stored (quantized blocks stay blocks).
    pub fn read_cache_row_bytes(
        &mut self,
        layer: usize,
        value: bool,
        cell: usize,
    ) -> Result<Vec<u8>> {
        self.ctx.read_cache_row_bytes(layer, value, cell)
    }

    /// The keys of `cells` of model layer `layer` as the host scoring path reads them,
    /// `[cell][head][dim]`.
    pub fn read_k_rows(&mut self, layer: usize, cells: &[usize], out: &mut Vec<f32>) -> Result<()> {
        self.ctx.read_k_rows(layer, cells, out)
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
        self.cfg.eviction().map(|e| e.budget)
    }

    /// Whether keys are still scored where the cache lives (the device path of
    /// [`KeySource::Cache`]); false once a backend refused it and the host path took over.
    pub fn scores_on_device(&self) -> bool {
        matches!(self.keys_from, KeyReader::Device { .. })
    }

    /// Layers the book tracks (its layer index `i` is the `i`-th layer with a full-size cache).
    pub fn tracked_layers(&self) -> usize {
        self.tracked.len()
    }

    /// The model layer behind a tracked layer of the book.
    pub fn model_layer(&self, layer: TrackedLayer) -> Option<usize> {
        self.tracked.get(layer.0).copied()
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
            self.score(&cells, &positions)?;
            done = end;
        }
        self.pending_cells.clear();
        self.pending_pos.clear();
        self.note_traffic();
        Ok(())
    }

    /// The context's eviction copies so far, into the stats (the context counts them: the
    /// copies happen in ffi, some inside a decode).
    fn note_traffic(&mut self) {
        let t = self.ctx.kv_traffic();
        self.stats.eviction_bytes_to_host = t.to_host;
        self.stats.eviction_bytes_to_device = t.to_device;
        self.stats.eviction_transfers = t.transfers;
    }

    fn evicting(&self) -> bool {
        self.cfg.eviction().is_some()
    }

    /// Starts a new peak measurement from the cells in use now (per-turn peaks in chat).
    pub fn reset_peak(&mut self) {
        self.stats.peak_cells = self.live_cells();
    }

    /// Forgets the conversation: empty cache, positions from 0, counters kept.
    pub fn reset(&mut self) {
        self.ctx.clear_memory();
        self.scorer.reset();
        if let Some(b) = self.book.as_mut() {
            b.clear();
        }
        self.pending_cells.clear();
        self.pending_pos.clear();
        self.since_rescore = 0;
        self.next_pos = 0;
        self.logits_row = None;
    }

    /// Cells in use: the book's live tokens for a bounded cache (it owns that fact), every
    /// decoded position for a full one (nothing leaves it).
    pub fn live_cells(&self) -> usize {
        match &self.book {
            Some(book) => book.live(),
            None if self.evicting() => 0,
            None => self.next_pos as usize,
        }
    }

    /// Logits after the last decoded token: the last token of an [`Engine::ingest`] (either
    /// [`Logits`] mode) or the token of an [`Engine::step`].
    pub fn last_logits(&self) -> Result<&[f32]> {
        self.ctx.logits(self.last_row()?)
    }

    /// Draws the next token from [`Engine::last_logits`].
    pub fn sample(&self, sampler: &mut Sampler) -> Result<Token> {
        sampler.sample(&self.ctx, self.last_row()?)
    }

    fn last_row(&self) -> Result<usize> {
        self.logits_row.ok_or_else(|| {
            Error::invalid("no logits to sample from: nothing was decoded since the last reset")
        })
    }

    /// Decodes `tokens` in chunks of `n_batch`, evicting after each chunk, with logits for the
    /// tokens `logits` names. `on_chunk` runs after each chunk's decode, before its eviction,
    /// while the chunk's logits are readable. Afterwards [`Engine::last_logits`] holds the
    /// logits after the last token.
    pub fn ingest(
        &mut self,
        tokens: &[Token],
        logits: Logits,
        on_chunk: &mut dyn FnMut(&Chunk<'_>) -> Result<()>,
    ) -> Result<()> {
        let n_batch = self.cfg.n_batch;
        let mut offset = 0;
        while offset < tokens.len() {
            let end = (offset + n_batch).min(tokens.len());
            let last = end == tokens.len();
            let started = Instant::now();
            self.batch.clear();
            for (i, &t) in tokens[offset..end].iter().enumerate() {
                let pos = self.next_pos + i as i32;
                let wants = logits == Logits::All || (last && offset + i + 1 == end);
                self.batch.push(t, pos, wants)?;
            }
            self.decode_batch(logits == Logits::All || last)?;
            on_chunk(&Chunk {
                ctx: &self.ctx,
                offset,
                len: end - offset,
                last,
                logits,
            })?;
            self.evict()?;
            self.stats.prefill_seconds += started.elapsed().as_secs_f64();
            self.stats.prompt_tokens += (end - offset) as u64;
            offset = end;
        }
        Ok(())
    }

    /// Decodes one generated token; [`Engine::last_logits`] then holds the logits after it.
    pub fn step(&mut self, token: Token) -> Result<()> {
        let started = Instant::now();
        self.batch.clear();
        self.batch.push(token, self.next_pos, true)?;
        self.decode_batch(true)?;
        self.evict()?;
        self.stats.decode_seconds += started.elapsed().as_secs_f64();
        self.stats.generated_tokens += 1;
        Ok(())
    }

    /// Decodes the batch; `last_has_logits` says whether its last token asked for logits.
    fn decode_batch(&mut self, last_has_logits: bool) -> Result<()> {
        let n = self.batch.len();
        let needed = self.next_pos as usize + n;
        if !self.evicting() && needed > self.ctx.n_ctx() {
            return Err(Error::FullCacheOverflow {
                cells: self.ctx.n_ctx(),
                needed,
            });
        }
        self.logits_row = None;
        match &mut self.keys_from {
            KeyReader::Graph(tap) => self.ctx.decode_observed(&self.batch, tap)?,
            KeyReader::Device { .. } | KeyReader::Host => self.ctx.decode(&self.batch)?,
        }
        self.logits_row = (last_has_logits && n > 0).then(|| n - 1);
        let first = self.next_pos;
        self.next_pos += n as i32;
        if self.stats.kv_bytes == 0 {
            self.stats.kv_bytes = self.ctx.kv_bytes();
        }
        if self.evicting() {
            self.record_new_keys(first)?;
            self.note_traffic();
        }
        self.stats.peak_cells = self.stats.peak_cells.max(self.live_cells());
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
        let row = self.n_head_kv * self.head_dim;
        if self.cfg.moves_heads() && !self.ctx.can_move_heads(row) {
            return Err(Error::HeadMovesUnsupported { row_values: row });
        }
        self.book = Some(CacheBook::new(self.tracked.len(), self.n_head_kv, full));
        Ok(())
    }

    /// Places the tokens of the last batch in the book (live from now on) and scores them: at
    /// once when the keys came from the graph (they are only valid now), later for the cache
    /// key source.
    /// The batch held positions `first..`, in order (the engine numbers them; nothing is read
    /// back from the C batch).
    fn record_new_keys(&mut self, first: i32) -> Result<()> {
        self.ensure_book()?;
        let n = self.batch.len();
        let positions: Vec<i32> = (first..first + n as i32).collect();
        let cells = self.ctx.last_cells(self.tracked[0])?;
        if cells.len() != n {
            return Err(Error::KvCache(format!(
                "the decode wrote {} cells for {n} tokens",
                cells.len()
            )));
        }
        self.book_mut()?.place(&cells, &positions)?;
        self.since_rescore += n;
        if matches!(self.keys_from, KeyReader::Graph(_)) {
            return self.score(&cells, &positions);
        }
        self.pending_cells.extend_from_slice(&cells);
        self.pending_pos.extend_from_slice(&positions);
        Ok(())
    }

    /// Scores the tokens placed in `cells` (keys from `keys_from`, or reduced on the cache's
    /// device) and gives the book their scores.
    fn score(&mut self, cells: &[usize], positions: &[i32]) -> Result<()> {
        let n = cells.len();
        let (h, d) = (self.n_head_kv, self.head_dim);
        self.scores.clear();
        self.scores.resize(self.tracked.len() * n * h, 0.0);
        self.layer_scores.resize(n * h, 0.0);
        let needs_keys = self.scorer.needs_keys();
        if needs_keys
            && matches!(self.keys_from, KeyReader::Device { .. })
            && self.score_on_device(cells, positions)?
        {
            self.stats.device_score_batches += 1;
            let book = self
                .book
                .as_mut()
                .ok_or_else(|| Error::KvCache("no cache book".into()))?;
            return book.set_scores(cells, &self.scores);
        }
        for (li, &layer) in self.tracked.iter().enumerate() {
            if needs_keys {
                self.keys_from
                    .read(&mut self.ctx, layer, cells, &mut self.keys)?;
                if self.keys.len() != n * h * d {
                    return Err(Error::KvCache(format!(
                        "layer {layer}: {} key values, expected {n} x {h} x {d}",
                        self.keys.len()
                    )));
                }
            }
            if self.scorer.needs_value_norms() {
                self.ctx
                    .read_v_norms(layer, cells, h, self.value_dim, &mut self.value_norms)?;
            }
            let new = NewKeys {
                layer,
                keys: &self.keys,
                positions,
                value_norms: &self.value_norms,
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
        book.set_scores(cells, &self.scores)
    }

    fn book_mut(&mut self) -> Result<&mut CacheBook> {
        self.book
            .as_mut()
            .ok_or_else(|| Error::KvCache("no cache book".into()))
    }

    /// Fills `self.scores` for `cells` from per-head key reductions computed on the cache's
    /// device; false (and the host path from then on) when the backend cannot.
    fn score_on_device(&mut self, cells: &[usize], positions: &[i32]) -> Result<bool> {
        let Some(reduce) = self.scorer.key_reduce() else {
            return Ok(false);
        };
        let (n, h, d) = (cells.len(), self.n_head_kv, self.head_dim);
        let filters_loaded = matches!(
            self.keys_from,
            KeyReader::Device {
                filters_loaded: true
            }
        );
        if !filters_loaded && reduce != KeyReduce::SquaredNorm {
            if !self.upload_scorer_vectors(reduce)? {
                self.keys_from = KeyReader::Host;
                return Ok(false);
            }
            self.keys_from = KeyReader::Device {
                filters_loaded: true,
            };
        }
        if !self.ctx.device_key_stats(
            &self.tracked,
            cells,
            positions,
            reduce,
            h,
            d,
            &mut self.keys,
        )? {
            self.keys_from = KeyReader::Host;
            return Ok(false);
        }
        let per = n * h * reduce.width();
        for (li, &layer) in self.tracked.iter().enumerate() {
            let stats = &self.keys[li * per..(li + 1) * per];
            self.scorer
                .score_reduced(layer, positions, stats, &mut self.layer_scores);
            self.scores[li * n * h..(li + 1) * n * h].copy_from_slice(&self.layer_scores);
        }
        Ok(true)
    }

    /// Puts the scorer's filters (`Dot`) or projection vectors (`Project`) for every tracked
    /// layer on the cache's device; false when the scorer lacks some or the device cannot.
    fn upload_scorer_vectors(&mut self, reduce: KeyReduce) -> Result<bool> {
        let (h, d) = (self.n_head_kv, self.head_dim);
        let mut flat = Vec::new();
        match reduce {
            KeyReduce::SquaredNorm => Ok(true),
            KeyReduce::Dot => {
                for &layer in &self.tracked {
                    for head in 0..h {
                        match self.scorer.filter(layer, head) {
                            Some(f) if f.len() == d => flat.extend_from_slice(f),
                            _ => return Ok(false),
                        }
                    }
                }
                self.ctx.set_key_filters(&self.tracked, &flat, h, d)
            }
            KeyReduce::Project { per_head, .. } => {
                let mut ropes = Vec::with_capacity(self.tracked.len());
                for &layer in &self.tracked {
                    match self.scorer.projections(layer) {
                        Some((v, rope)) if v.len() == h * per_head * d => {
                            flat.extend_from_slice(v);
                            ropes.push(rope);
                        }
                        _ => return Ok(false),
                    }
                }
                self.ctx
                    .set_key_projections(&self.tracked, &flat, &ropes, h, per_head, d)
            }
        }
    }

    /// Gives every live slot the score the scorer computes from the keys cached now (a scorer
    /// that [re-scores](Scorer::rescores_live)), with each slot's own position: from the
    /// scorer's [reduction](Scorer::live_reduce) of the live keys, computed by one graph on the
    /// cache's device for every tracked layer, or, where there is none, from the keys of all
    /// live cells read back one tracked layer at a time. [`Engine::evict`] calls it before a
    /// round once [`rescore_interval`] tokens have entered since the last re-score (the tokens
    /// in between keep their entry scores); nothing for a scorer that does not re-score.
    pub fn rescore_live(&mut self) -> Result<()> {
        if !self.scorer.rescores_live() {
            return Ok(());
        }
        self.since_rescore = 0;
        let Some(book) = self.book.as_ref() else {
            return Ok(());
        };
        let (h, d) = (self.n_head_kv, self.head_dim);
        let cells: Vec<usize> = (0..book.n_cells())
            .filter(|&c| book.cell_position(c).is_some())
            .collect();
        let n = cells.len();
        let on_device = match self.scorer.live_reduce() {
            Some(reduce) if self.rescore_on_device => {
                let done = self.ctx.device_live_stats(
                    &self.tracked,
                    &cells,
                    reduce,
                    h,
                    d,
                    &mut self.live_sums,
                    &mut self.keys,
                )?;
                self.rescore_on_device = done;
                done
            }
            _ => false,
        };
        let Some(book) = self.book.as_ref() else {
            return Ok(());
        };
        let mut slot_pos = vec![0i32; n * h];
        self.scores.clear();
        self.scores.resize(self.tracked.len() * n * h, 0.0);
        self.layer_scores.resize(n * h, 0.0);
        for li in 0..self.tracked.len() {
            for (i, &cell) in cells.iter().enumerate() {
                for head in 0..h {
                    slot_pos[i * h + head] = book
                        .slot_position(TrackedLayer(li), head, cell)
                        .unwrap_or_default();
                }
            }
            if on_device {
                let live = LiveStats {
                    layer: self.tracked[li],
                    positions: &slot_pos,
                    n_head_kv: h,
                    head_dim: d,
                    unit_key_sums: &self.live_sums[li * h * d..(li + 1) * h * d],
                    cosines: &self.keys[li * n * h..(li + 1) * n * h],
                };
                self.scorer.rescore_reduced(&live, &mut self.layer_scores);
            } else {
                self.ctx
                    .read_k_rows(self.tracked[li], &cells, &mut self.keys)?;
                if self.keys.len() != n * h * d {
                    return Err(Error::KvCache(format!(
                        "layer {}: {} key values, expected {n} x {h} x {d}",
                        self.tracked[li],
                        self.keys.len()
                    )));
                }
                let live = NewKeys {
                    layer: self.tracked[li],
                    keys: &self.keys,
                    positions: &slot_pos,
                    value_norms: &[],
                    n_head_kv: h,
                    head_dim: d,
                };
                self.scorer.rescore(&live, &mut self.layer_scores);
            }
            self.scores[li * n * h..(li + 1) * n * h].copy_from_slice(&self.layer_scores);
        }
        self.stats.rescore_rounds += 1;
        if on_device {
            self.stats.device_score_batches += 1;
        }
        let book = self
            .book
            .as_mut()
            .ok_or_else(|| Error::KvCache("no cache book".into()))?;
        book.set_scores(&cells, &self.scores)
    }

    /// Brings the cache back within its budget.
    pub fn evict(&mut self) -> Result<()> {
        let Some(ev) = self.cfg.eviction().cloned() else {
            return Ok(());
        };
        if self.live_cells() <= ev.budget {
            return Ok(());
        }
        self.flush_scores()?;
        if self.since_rescore >= rescore_interval(ev.budget) {
            self.rescore_live()?;
        }
        let Some(book) = self.book.as_mut() else {
            return Ok(());
        };
        let plan = book.plan(&ev);
        if plan.remove.is_empty() {
            return Ok(());
        }
        // One graph on the cache's device for all of the round's moves (when it can).
        // The book counts tracked layers; the cache tensors are found by model layer.
        let groups: Vec<HeadMoves> = plan
            .moves
            .iter()
            .map(|hm| HeadMoves {
                layer: self.tracked[hm.layer.0],
                head: hm.head,
                moves: hm.moves.clone(),
            })
            .collect();
        self.stats.eviction_rounds += 1;
        if self.ctx.move_head_slices_batch(&groups, self.n_head_kv)? {
            self.stats.device_move_rounds += 1;
        }
        self.stats.head_slices_moved += groups.iter().map(|g| g.moves.len() as u64).sum::<u64>();
        let freed = book.apply(&plan);
        for (p0, p1) in position_ranges(&freed) {
            if !self.ctx.remove_positions(p0, p1) {
                return Err(Error::KvCache(format!(
                    "llama.cpp refused to remove positions [{p0}, {p1})"
                )));
            }
        }
        self.stats.evicted += freed.len() as u64;
        self.note_traffic();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::{context_cells, CacheSize, Stats};
    use crate::engine::cache::{Combiner, EvictionConfig, Granularity};

    fn bounded(budget: usize) -> CacheSize {
        CacheSize::Bounded(EvictionConfig {
            budget,
            window: 8,
            sinks: 2,
            granularity: Granularity::Position,
            combiner: Combiner::MeanZ,
            slack: 0,
        })
    }

    #[test]
    fn a_bounded_context_holds_budget_batch_and_margin_capped_by_the_job() {
        assert_eq!(
            context_cells(&bounded(256), None, 64, 0).unwrap(),
            256 + 64 + 16
        );
        // A job of 9 tokens never needs the budget's cells.
        assert_eq!(
            context_cells(&bounded(100_000), Some(9), 64, 0).unwrap(),
            9 + 16
        );
        // 0 means "unknown", as None.
        assert_eq!(context_cells(&bounded(256), Some(0), 64, 0).unwrap(), 336);
    }

    #[test]
    fn a_full_context_is_its_capacity_plus_one() {
        let full = CacheSize::Full { capacity: 100 };
        assert_eq!(context_cells(&full, Some(5), 64, 512).unwrap(), 101);
        let empty = CacheSize::Full { capacity: 0 };
        assert_eq!(context_cells(&empty, None, 64, 0).unwrap(), 2);
    }

    #[test]
    fn sliding_window_models_get_a_full_cache_larger_than_the_window_cache() {
        // Gemma 3's 512-token window, batches of 64: (512 + 64) * 2 + 256.
        assert_eq!(context_cells(&bounded(128), None, 64, 512).unwrap(), 1408);
        // A budget already above that keeps its own size.
        assert_eq!(
            context_cells(&bounded(4096), None, 64, 512).unwrap(),
            4096 + 80
        );
    }

    #[test]
    fn overflowing_sizes_are_errors_with_the_numbers() {
        let e = context_cells(&bounded(usize::MAX), None, 64, 0).unwrap_err();
        assert!(e.to_string().contains(&usize::MAX.to_string()), "{e}");
        assert!(context_cells(
            &CacheSize::Full {
                capacity: usize::MAX
            },
            None,
            1,
            0
        )
        .is_err());
    }

    #[test]
    fn a_part_of_a_job_is_the_difference_of_two_snapshots_with_its_rates() {
        let before = Stats {
            prompt_tokens: 100,
            generated_tokens: 4,
            evicted: 10,
            eviction_rounds: 2,
            eviction_bytes_to_host: 1000,
            prefill_seconds: 1.0,
            decode_seconds: 0.5,
            ..Stats::default()
        };
        let now = Stats {
            prompt_tokens: 150,
            generated_tokens: 24,
            peak_cells: 300,
            evicted: 40,
            eviction_rounds: 6,
            eviction_bytes_to_host: 5000,
            eviction_bytes_to_device: 1000,
            kv_bytes: 1 << 20,
            n_ctx: 336,
            prefill_seconds: 1.5,
            decode_seconds: 2.5,
            ..Stats::default()
        };
        let d = now.since(&before);
        assert_eq!(
            (d.prompt_tokens, d.generated_tokens, d.evicted),
            (50, 20, 30)
        );
        // Levels (not counters) are taken as they are now.
        assert_eq!((d.peak_cells, d.kv_bytes, d.n_ctx), (300, 1 << 20, 336));
        assert_eq!((d.prefill_tok_s(), d.decode_tok_s()), (100.0, 10.0));
        let v = serde_json::to_value(&d).unwrap();
        assert_eq!(v["prompt_tokens"], 50);
        assert_eq!(v["decode_tok_s"], 10.0);
        assert_eq!(v["prefill_tok_s"], 100.0);
        // 4 rounds moved 4000 + 1000 bytes.
        assert_eq!(v["eviction_rounds"], 4);
        assert_eq!(v["eviction_bytes_per_round"], 1250.0);
        assert_eq!(Stats::default().eviction_bytes_per_round(), 0.0);
        assert_eq!(v.as_object().unwrap().len(), 19, "{v}");
    }
}
