//! The shared eviction mechanism: which token sits in which KV cell for every (layer, KV head),
//! with its score, and the plan that brings the cache back to its budget.
//!
//! Pure bookkeeping, no llama.cpp: the engine applies a plan to the real cache (removing
//! positions, moving head slices). Every policy goes through this one tested piece.

use crate::error::{Error, Result};
use crate::ffi::HeadMoves;

/// Whether a whole position leaves the cache (all layers and heads at once), or each KV head
/// of each layer keeps its own tokens (the paper's setting).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Granularity {
    Position,
    Head,
}

impl std::str::FromStr for Granularity {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "position" => Ok(Granularity::Position),
            "head" => Ok(Granularity::Head),
            _ => Err(Error::invalid(format!(
                "unknown granularity '{s}' (known: head, position)"
            ))),
        }
    }
}

impl std::fmt::Display for Granularity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Granularity::Position => "position",
            Granularity::Head => "head",
        })
    }
}

/// How per-(layer, head) scores become one score per position, for position granularity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Combiner {
    /// Mean over (layer, head) of scores standardised within each (layer, head).
    MeanZ,
    /// Mean over (layer, head) of each score's rank within its (layer, head), in [0, 1].
    MeanRank,
    /// Highest standardised score over (layer, head): keep a token if any head wants it.
    MaxZ,
}

impl std::str::FromStr for Combiner {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "mean-z" => Ok(Combiner::MeanZ),
            "mean-rank" => Ok(Combiner::MeanRank),
            "max-z" => Ok(Combiner::MaxZ),
            _ => Err(Error::invalid(format!(
                "unknown combiner '{s}' (known: mean-z, mean-rank, max-z)"
            ))),
        }
    }
}

impl std::fmt::Display for Combiner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Combiner::MeanZ => "mean-z",
            Combiner::MeanRank => "mean-rank",
            Combiner::MaxZ => "max-z",
        })
    }
}

/// The eviction knobs.
#[derive(Debug, Clone)]
pub struct EvictionConfig {
    /// Cells in use after each eviction round.
    pub budget: usize,
    /// The most recent tokens are never evicted.
    pub window: usize,
    /// The first tokens (attention sinks) are never evicted.
    pub sinks: usize,
    pub granularity: Granularity,
    pub combiner: Combiner,
    /// How far below `budget` each round evicts, so that during generation rounds run once per
    /// `slack + 1` tokens instead of after every token. The cache never exceeds `budget` after a
    /// round either way. 0 evicts just enough.
    pub slack: usize,
}

impl EvictionConfig {
    /// Whether `budget` cells hold `window` recent tokens and `sinks` first tokens with at
    /// least one cell left to score: the one rule for `validate`, the tuning sweep's windows
    /// and tuned windows applied at another budget.
    pub fn window_fits(budget: usize, window: usize, sinks: usize) -> bool {
        budget > window.saturating_add(sinks)
    }

    pub fn validate(&self) -> Result<()> {
        if !Self::window_fits(self.budget, self.window, self.sinks) {
            return Err(Error::BudgetTooSmall {
                budget: self.budget,
                window: self.window,
                sinks: self.sinks,
            });
        }
        Ok(())
    }
}

/// A layer as the book counts them: the `i`-th layer the engine tracks (one with a full-size
/// KV cache), not the model's layer number, which [`crate::engine::Engine::model_layer`]
/// gives. The book's `layer` arguments are all of this kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TrackedLayer(pub usize);

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EvictionPlan {
    /// Cells whose positions leave the cache.
    pub remove: Vec<usize>,
    /// Copies to do before removal (head granularity only), one entry per (layer, head).
    pub moves: Vec<HeadMoves<TrackedLayer>>,
}

const FREE: i32 = -1;

/// Who sits where in the KV cache.
#[derive(Debug, Clone)]
pub struct CacheBook {
    n_layer: usize,
    n_head: usize,
    n_cells: usize,
    /// Position label of each cell (what llama.cpp knows it by), FREE when empty.
    cell_pos: Vec<i32>,
    /// `[layer][head][cell]`: position of the token whose key/value the slot holds.
    slot_pos: Vec<i32>,
    /// `[layer][head][cell]`: that token's score for this head.
    slot_score: Vec<f32>,
    live: usize,
    newest: i32,
}

impl CacheBook {
    pub fn new(n_layer: usize, n_head: usize, n_cells: usize) -> Self {
        let slots = n_layer * n_head * n_cells;
        CacheBook {
            n_layer,
            n_head,
            n_cells,
            cell_pos: vec![FREE; n_cells],
            slot_pos: vec![FREE; slots],
            slot_score: vec![0.0; slots],
            live: 0,
            newest: -1,
        }
    }

    pub fn live(&self) -> usize {
        self.live
    }

    pub fn n_cells(&self) -> usize {
        self.n_cells
    }

    /// KV heads per tracked layer.
    pub fn n_head(&self) -> usize {
        self.n_head
    }

    /// The layers the book tracks, in order.
    pub fn layers(&self) -> impl Iterator<Item = TrackedLayer> {
        (0..self.n_layer).map(TrackedLayer)
    }

    pub fn cell_position(&self, cell: usize) -> Option<i32> {
        self.cell_pos.get(cell).copied().filter(|&p| p != FREE)
    }

    /// Position of the token held by (layer, head) in `cell`.
    pub fn slot_position(&self, layer: TrackedLayer, head: usize, cell: usize) -> Option<i32> {
        self.slot_pos
            .get(self.slot(layer.0, head, cell))
            .copied()
            .filter(|&p| p != FREE)
    }

    pub fn slot_score(&self, layer: TrackedLayer, head: usize, cell: usize) -> f32 {
        self.slot_score[self.slot(layer.0, head, cell)]
    }

    #[inline]
    fn slot(&self, layer: usize, head: usize, cell: usize) -> usize {
        (layer * self.n_head + head) * self.n_cells + cell
    }

    /// Records that `positions[i]` was written to `cells[i]`, scores 0 until
    /// [`CacheBook::set_scores`]: the cells are live from now on (the engine scores lazily).
    pub fn place(&mut self, cells: &[usize], positions: &[i32]) -> Result<()> {
        if cells.len() != positions.len() {
            return Err(Error::KvCache(format!(
                "{} cells for {} tokens",
                cells.len(),
                positions.len()
            )));
        }
        for (&cell, &pos) in cells.iter().zip(positions) {
            if cell >= self.n_cells {
                return Err(Error::KvCache(format!(
                    "cell {cell} beyond the {} cells tracked",
                    self.n_cells
                )));
            }
            if self.cell_pos[cell] != FREE {
                return Err(Error::KvCache(format!(
                    "llama.cpp wrote position {pos} into cell {cell}, which still holds position {}",
                    self.cell_pos[cell]
                )));
            }
            self.cell_pos[cell] = pos;
            self.live += 1;
            self.newest = self.newest.max(pos);
            for l in 0..self.n_layer {
                for h in 0..self.n_head {
                    let s = self.slot(l, h, cell);
                    self.slot_pos[s] = pos;
                    self.slot_score[s] = 0.0;
                }
            }
        }
        Ok(())
    }

    /// Sets the scores of tokens placed in `cells` (not moved since), `scores[layer][i][head]`.
    pub fn set_scores(&mut self, cells: &[usize], scores: &[f32]) -> Result<()> {
        let n = cells.len();
        if scores.len() != self.n_layer * n * self.n_head {
            return Err(Error::KvCache(
                "score count does not match the batch".into(),
            ));
        }
        for (i, &cell) in cells.iter().enumerate() {
            if cell >= self.n_cells || self.cell_pos[cell] == FREE {
                return Err(Error::KvCache(format!(
                    "scores for cell {cell}, which holds no token"
                )));
            }
            for l in 0..self.n_layer {
                for h in 0..self.n_head {
                    let s = self.slot(l, h, cell);
                    self.slot_score[s] = scores[(l * n + i) * self.n_head + h];
                }
            }
        }
        Ok(())
    }

    fn protected(&self, pos: i32, cfg: &EvictionConfig) -> bool {
        pos == self.newest
            || (pos as i64) < cfg.sinks as i64
            || (pos as i64) > self.newest as i64 - cfg.window as i64
    }

    /// What to evict so that at most `cfg.budget - cfg.slack` cells stay in use (never fewer
    /// than the protected tokens). Empty when within budget.
    pub fn plan(&self, cfg: &EvictionConfig) -> EvictionPlan {
        if self.live <= cfg.budget {
            return EvictionPlan::default();
        }
        let floor = (cfg.window + cfg.sinks + 1).min(cfg.budget);
        let target = cfg.budget.saturating_sub(cfg.slack).max(floor);
        let candidates: Vec<usize> = (0..self.n_cells)
            .filter(|&c| self.cell_pos[c] != FREE && !self.protected(self.cell_pos[c], cfg))
            .collect();
        let n_remove = (self.live - target).min(candidates.len());
        if n_remove == 0 {
            return EvictionPlan::default();
        }
        match cfg.granularity {
            Granularity::Position => self.plan_positions(&candidates, n_remove, cfg.combiner),
            Granularity::Head => self.plan_heads(&candidates, n_remove),
        }
    }

    fn plan_positions(
        &self,
        candidates: &[usize],
        n_remove: usize,
        combiner: Combiner,
    ) -> EvictionPlan {
        let combined = self.combine(candidates, combiner);
        let mut order: Vec<usize> = (0..candidates.len()).collect();
        // Lowest combined score first; among equals the oldest goes first.
        order.sort_by(|&a, &b| {
            combined[a]
                .total_cmp(&combined[b])
                .then(self.cell_pos[candidates[a]].cmp(&self.cell_pos[candidates[b]]))
        });
        let mut remove: Vec<usize> = order[..n_remove].iter().map(|&i| candidates[i]).collect();
        remove.sort_unstable();
        EvictionPlan {
            remove,
            moves: Vec::new(),
        }
    }

    /// One score per candidate cell from the per-(layer, head) scores.
    pub fn combine(&self, candidates: &[usize], combiner: Combiner) -> Vec<f32> {
        let n = candidates.len();
        let mut combined = vec![
            if combiner == Combiner::MaxZ {
                f32::NEG_INFINITY
            } else {
                0.0
            };
            n
        ];
        let mut values = vec![0f32; n];
        let n_slots = (self.n_layer * self.n_head).max(1) as f32;
        for l in 0..self.n_layer {
            for h in 0..self.n_head {
                for (v, &c) in values.iter_mut().zip(candidates) {
                    *v = self.slot_score[self.slot(l, h, c)];
                }
                match combiner {
                    Combiner::MeanZ | Combiner::MaxZ => {
                        let mean = values.iter().map(|&v| v as f64).sum::<f64>() / n as f64;
                        let var = values
                            .iter()
                            .map(|&v| (v as f64 - mean).powi(2))
                            .sum::<f64>()
                            / n as f64;
                        let sd = var.sqrt().max(1e-12);
                        for (acc, &v) in combined.iter_mut().zip(&values) {
                            let z = ((v as f64 - mean) / sd) as f32;
                            if combiner == Combiner::MeanZ {
                                *acc += z / n_slots;
                            } else {
                                *acc = acc.max(z);
                            }
                        }
                    }
                    Combiner::MeanRank => {
                        let mut idx: Vec<usize> = (0..n).collect();
                        idx.sort_by(|&a, &b| values[a].total_cmp(&values[b]));
                        let denom = (n.max(2) - 1) as f32;
                        for (rank, &i) in idx.iter().enumerate() {
                            combined[i] += rank as f32 / denom / n_slots;
                        }
                    }
                }
            }
        }
        combined
    }

    fn plan_heads(&self, candidates: &[usize], n_remove: usize) -> EvictionPlan {
        let n = candidates.len();
        let keep = n - n_remove;
        // kept[slot_group][i]: whether (layer, head) keeps the token now in candidates[i].
        let groups = self.n_layer * self.n_head;
        let mut kept = vec![false; groups * n];
        let mut votes = vec![0u32; n];
        let mut order: Vec<usize> = Vec::with_capacity(n);
        for g in 0..groups {
            let (l, h) = (g / self.n_head, g % self.n_head);
            order.clear();
            order.extend(0..n);
            let score = |i: usize| self.slot_score[self.slot(l, h, candidates[i])];
            let pos = |i: usize| self.slot_pos[self.slot(l, h, candidates[i])];
            // Highest score first; among equals the newest token is kept.
            let cmp =
                |a: &usize, b: &usize| score(*b).total_cmp(&score(*a)).then(pos(*b).cmp(&pos(*a)));
            if keep > 0 && keep < n {
                order.select_nth_unstable_by(keep - 1, cmp);
            }
            for &i in &order[..keep] {
                kept[g * n + i] = true;
                votes[i] += 1;
            }
        }
        // Cells that stay: those whose current tokens the most heads keep, so fewest copies.
        let mut by_votes: Vec<usize> = (0..n).collect();
        by_votes.sort_by(|&a, &b| {
            votes[b]
                .cmp(&votes[a])
                .then(self.cell_pos[candidates[b]].cmp(&self.cell_pos[candidates[a]]))
        });
        let mut stays = vec![false; n];
        for &i in &by_votes[..keep] {
            stays[i] = true;
        }
        let mut moves = Vec::new();
        for g in 0..groups {
            let homeless = (0..n).filter(|&i| !stays[i] && kept[g * n + i]);
            let vacant = (0..n).filter(|&i| stays[i] && !kept[g * n + i]);
            let pairs: Vec<(usize, usize)> = homeless
                .zip(vacant)
                .map(|(a, b)| (candidates[a], candidates[b]))
                .collect();
            if !pairs.is_empty() {
                moves.push(HeadMoves {
                    layer: TrackedLayer(g / self.n_head),
                    head: g % self.n_head,
                    moves: pairs,
                });
            }
        }
        let mut remove: Vec<usize> = (0..n)
            .filter(|&i| !stays[i])
            .map(|i| candidates[i])
            .collect();
        remove.sort_unstable();
        EvictionPlan { remove, moves }
    }

    /// Records a plan as done: slots moved, cells freed. Returns the freed positions, sorted.
    pub fn apply(&mut self, plan: &EvictionPlan) -> Vec<i32> {
        for hm in &plan.moves {
            for &(from, to) in &hm.moves {
                let (a, b) = (
                    self.slot(hm.layer.0, hm.head, from),
                    self.slot(hm.layer.0, hm.head, to),
                );
                self.slot_pos[b] = self.slot_pos[a];
                self.slot_score[b] = self.slot_score[a];
            }
        }
        let mut freed = Vec::with_capacity(plan.remove.len());
        for &cell in &plan.remove {
            let pos = self.cell_pos[cell];
            if pos == FREE {
                continue;
            }
            freed.push(pos);
            self.cell_pos[cell] = FREE;
            self.live -= 1;
            for l in 0..self.n_layer {
                for h in 0..self.n_head {
                    let s = self.slot(l, h, cell);
                    self.slot_pos[s] = FREE;
                }
            }
        }
        freed.sort_unstable();
        freed
    }

    pub fn clear(&mut self) {
        self.cell_pos.fill(FREE);
        self.slot_pos.fill(FREE);
        self.live = 0;
        self.newest = -1;
    }
}

/// Groups sorted positions into half-open ranges `[start, end)` for `llama_memory_seq_rm`.
pub fn position_ranges(sorted: &[i32]) -> Vec<(i32, i32)> {
    let mut ranges: Vec<(i32, i32)> = Vec::new();
    for &p in sorted {
        match ranges.last_mut() {
            Some(r) if r.1 == p => r.1 = p + 1,
            _ => ranges.push((p, p + 1)),
        }
    }
    ranges
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(budget: usize, window: usize, sinks: usize, granularity: Granularity) -> EvictionConfig {
        EvictionConfig {
            budget,
            window,
            sinks,
            granularity,
            combiner: Combiner::MeanZ,
            slack: 0,
        }
    }

    /// Places `positions[i]` in `cells[i]` with `scores[layer][i][head]` the way the engine
    /// does (place, then set the scores), so the tests exercise the book's one entry path.
    fn insert(b: &mut CacheBook, cells: &[usize], positions: &[i32], scores: &[f32]) -> Result<()> {
        b.place(cells, positions)?;
        b.set_scores(cells, scores)
    }

    /// One layer, one head, `n` tokens at cells 0..n with the given scores.
    fn book_with(scores: &[f32]) -> CacheBook {
        let n = scores.len();
        let mut b = CacheBook::new(1, 1, n + 4);
        let cells: Vec<usize> = (0..n).collect();
        let pos: Vec<i32> = (0..n as i32).collect();
        insert(&mut b, &cells, &pos, scores).unwrap();
        b
    }

    #[test]
    fn evicts_exactly_the_lowest_unprotected() {
        // positions 0..10; sink 0 and window {8, 9} protected even with the lowest scores.
        let scores = [-9.0, 5.0, 1.0, 7.0, 0.5, 6.0, 2.0, 8.0, -10.0, -11.0];
        let b = book_with(&scores);
        let plan = b.plan(&cfg(6, 2, 1, Granularity::Position));
        // 10 live, budget 6: remove 4 lowest among cells 1..=7: 0.5 (4), 1.0 (2), 2.0 (6), 5.0 (1).
        assert_eq!(plan.remove, vec![1, 2, 4, 6]);
        assert!(plan.moves.is_empty());
    }

    #[test]
    fn never_evicts_the_newest_position_even_without_window() {
        let scores = [3.0, 2.0, 1.0, -100.0];
        let b = book_with(&scores);
        let plan = b.plan(&cfg(2, 0, 0, Granularity::Position));
        assert_eq!(plan.remove, vec![1, 2]);
    }

    #[test]
    fn within_budget_plans_nothing() {
        let b = book_with(&[1.0, 2.0, 3.0]);
        assert_eq!(
            b.plan(&cfg(3, 1, 0, Granularity::Position)),
            EvictionPlan::default()
        );
    }

    #[test]
    fn budget_smaller_than_protection_is_rejected() {
        assert!(cfg(4, 3, 1, Granularity::Position).validate().is_err());
        assert!(cfg(5, 3, 1, Granularity::Position).validate().is_ok());
    }

    #[test]
    fn apply_frees_cells_and_reports_positions() {
        let mut b = book_with(&[0.0, 1.0, 2.0, 3.0, 4.0]);
        let plan = b.plan(&cfg(3, 1, 0, Granularity::Position));
        let freed = b.apply(&plan);
        assert_eq!(freed, vec![0, 1]);
        assert_eq!(b.live(), 3);
        assert_eq!(b.cell_position(0), None);
        // A freed cell can be reused for a new position.
        insert(&mut b, &[0], &[5], &[9.0]).unwrap();
        assert_eq!(b.cell_position(0), Some(5));
        assert!(
            insert(&mut b, &[2], &[6], &[0.0]).is_err(),
            "cell 2 is still live"
        );
    }

    #[test]
    fn mean_z_balances_heads_of_different_scale() {
        // Head 0 scores in the hundreds, head 1 near one. A raw mean would let head 0 decide
        // alone and evict token 1 (head 1's favourite); standardising gives both a vote, and
        // token 2, middling on head 0 and last on head 1, is the one to go.
        let mut b = CacheBook::new(1, 2, 8);
        // scores[l][t][h]: t0 (1000, 0), t1 (0, 1), t2 (600, 0.2), t3 newest
        let scores = [1000.0, 0.0, 0.0, 1.0, 600.0, 0.2, 0.0, 0.0];
        insert(&mut b, &[0, 1, 2, 3], &[0, 1, 2, 3], &scores).unwrap();
        let combined = b.combine(&[0, 1, 2], Combiner::MeanZ);
        let lowest = (0..3)
            .min_by(|&i, &j| combined[i].total_cmp(&combined[j]))
            .unwrap();
        assert_eq!(lowest, 2, "combined {combined:?}");
        let sum: f32 = combined.iter().sum();
        assert!(sum.abs() < 1e-5, "z-scores average to zero: {sum}");
        let plan = b.plan(&cfg(3, 1, 0, Granularity::Position));
        assert_eq!(plan.remove, vec![2]);
    }

    #[test]
    fn head_granularity_keeps_each_heads_own_top_tokens() {
        // 2 heads, 6 tokens. Budget 4 with window 1 → keep 3 of the 5 candidates per head.
        let mut b = CacheBook::new(1, 2, 8);
        let head0 = [9.0, 8.0, 7.0, 1.0, 0.0, 0.0];
        let head1 = [0.0, 1.0, 2.0, 8.0, 9.0, 0.0];
        let mut scores = Vec::new();
        for t in 0..6 {
            scores.push(head0[t]);
            scores.push(head1[t]);
        }
        insert(&mut b, &[0, 1, 2, 3, 4, 5], &[0, 1, 2, 3, 4, 5], &scores).unwrap();
        let plan = b.plan(&cfg(4, 1, 0, Granularity::Head));
        assert_eq!(plan.remove.len(), 2);
        b.apply(&plan);
        for (head, want) in [(0, vec![0, 1, 2, 5]), (1, vec![2, 3, 4, 5])] {
            let mut held: Vec<i32> = (0..8)
                .filter_map(|c| b.slot_position(TrackedLayer(0), head, c))
                .collect();
            held.sort();
            assert_eq!(held, want, "head {head}");
        }
        // Every live cell holds, for each head, a token with that head's own score.
        for c in 0..8 {
            if let Some(p) = b.slot_position(TrackedLayer(0), 1, c) {
                assert_eq!(b.slot_score(TrackedLayer(0), 1, c), head1[p as usize]);
            }
        }
        assert_eq!(b.live(), 4);
    }

    #[test]
    fn head_granularity_moves_only_into_cells_that_stay() {
        let mut b = CacheBook::new(2, 2, 16);
        let n = 10;
        let mut scores = vec![0f32; 2 * n * 2];
        let mut state = 7u64;
        for s in scores.iter_mut() {
            *s = (crate::math::splitmix64(&mut state) % 1000) as f32;
        }
        let cells: Vec<usize> = (0..n).collect();
        let pos: Vec<i32> = (0..n as i32).collect();
        insert(&mut b, &cells, &pos, &scores).unwrap();
        let plan = b.plan(&cfg(6, 2, 1, Granularity::Head));
        for hm in &plan.moves {
            for &(from, to) in &hm.moves {
                assert!(plan.remove.contains(&from), "moves come from removed cells");
                assert!(!plan.remove.contains(&to), "moves land in cells that stay");
            }
        }
        b.apply(&plan);
        // Protected positions (sink 0, window 8, 9) are held by every head.
        for l in 0..2 {
            for h in 0..2 {
                let held: Vec<i32> = (0..16)
                    .filter_map(|c| b.slot_position(TrackedLayer(l), h, c))
                    .collect();
                assert_eq!(held.len(), 6);
                for p in [0, 8, 9] {
                    assert!(held.contains(&p), "layer {l} head {h} lost protected {p}");
                }
                let mut uniq = held.clone();
                uniq.sort();
                uniq.dedup();
                assert_eq!(uniq.len(), held.len(), "no token twice in one head");
            }
        }
    }

    #[test]
    fn position_ranges_coalesce() {
        assert_eq!(
            position_ranges(&[1, 2, 3, 7, 9, 10]),
            vec![(1, 4), (7, 8), (9, 11)]
        );
        assert!(position_ranges(&[]).is_empty());
    }
}
