//! Streaming perplexity: the text goes through the engine in chunks, every next token is scored
//! from the logits the model produced with the (compressed) cache it had at that moment.

use std::sync::Arc;
use std::time::Instant;

use crate::engine::{Engine, Logits};
use crate::error::{Error, Result};
use crate::ffi::{Batch, Context, ContextParams, Model, Token};
use crate::math::log_prob;

use crate::math::mean;

/// Per-token NLLs of one streaming pass: `nll[i]` is −log p(tokens[i + 1] | what the cache
/// held after tokens[..=i]).
#[derive(Debug, Clone)]
pub struct StreamOutcome {
    pub nll: Vec<f64>,
    pub seconds: f64,
    pub peak_cells: usize,
}

/// Appends the NLL of each next token of the chunk `tokens[offset..offset + len]`, from
/// `logits(j)`, the logits after its `j`-th token.
fn chunk_nll<'a>(
    logits: impl Fn(usize) -> Result<&'a [f32]>,
    tokens: &[Token],
    offset: usize,
    len: usize,
    out: &mut Vec<f64>,
) -> Result<()> {
    for j in 0..len {
        let i = offset + j;
        let Some(&next) = tokens.get(i + 1) else {
            break;
        };
        out.push(-log_prob(logits(j)?, next as usize));
    }
    Ok(())
}

/// Feeds `tokens` through `engine` (chunk size = the engine's batch size) from an empty cache.
pub fn streaming_nll(engine: &mut Engine, tokens: &[Token]) -> Result<StreamOutcome> {
    if tokens.len() < 2 {
        return Err(Error::invalid("perplexity needs at least 2 tokens"));
    }
    engine.reset();
    let peak_before = engine.stats().peak_cells;
    let mut nll = Vec::with_capacity(tokens.len() - 1);
    let started = Instant::now();
    engine.ingest(tokens, Logits::All, &mut |chunk| {
        chunk_nll(
            |j| chunk.logits(j),
            tokens,
            chunk.offset,
            chunk.len,
            &mut nll,
        )
    })?;
    Ok(StreamOutcome {
        nll,
        seconds: started.elapsed().as_secs_f64(),
        peak_cells: engine.stats().peak_cells.max(peak_before),
    })
}

/// The same NLLs computed the plain way: a fresh context holding every token, decoded in
/// batches of `n_batch` with no hook and no eviction. The reference for policy `none`.
pub fn full_context_nll(
    model: &Arc<Model>,
    tokens: &[Token],
    n_batch: usize,
    threads: i32,
) -> Result<Vec<f64>> {
    if tokens.len() < 2 {
        return Err(Error::invalid("perplexity needs at least 2 tokens"));
    }
    let n_batch = n_batch.clamp(1, tokens.len());
    let mut ctx = Context::new(
        model,
        &ContextParams {
            n_ctx: u32::try_from(tokens.len() + 1).map_err(|_| Error::invalid("text too long"))?,
            n_batch: n_batch as u32,
            threads,
            flash_attn: None,
            hook: false,
            ..ContextParams::default()
        },
    )?;
    let mut batch = Batch::new(n_batch)?;
    let mut nll = Vec::with_capacity(tokens.len() - 1);
    for (c, chunk) in tokens.chunks(n_batch).enumerate() {
        batch.clear();
        for (j, &t) in chunk.iter().enumerate() {
            batch.push(t, (c * n_batch + j) as i32, true)?;
        }
        ctx.decode(&batch)?;
        chunk_nll(
            |j| ctx.logits(j),
            tokens,
            c * n_batch,
            chunk.len(),
            &mut nll,
        )?;
    }
    Ok(nll)
}

/// Perplexity over all scored tokens and over the second half of them.
pub fn perplexities(nll: &[f64]) -> (f64, f64) {
    let half = nll.len() / 2;
    // An empty window has no perplexity: NaN.
    let ppl = |v: &[f64]| mean(v.iter().copied()).unwrap_or(f64::NAN).exp();
    (ppl(nll), ppl(&nll[half..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn perplexity_of_constant_nll_is_its_exp() {
        let nll = vec![2.0f64.ln(); 10];
        let (a, b) = perplexities(&nll);
        assert!((a - 2.0).abs() < 1e-12 && (b - 2.0).abs() < 1e-12);
        let (a, b) = perplexities(&[0.0, 0.0, 1.0, 1.0]);
        assert!((a - 0.5f64.exp()).abs() < 1e-12);
        assert!((b - 1f64.exp()).abs() < 1e-12);
    }
}
