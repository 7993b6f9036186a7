//! Prompt in, tokens out, through an [`Engine`].

use crate::engine::Engine;
use crate::error::Result;
use crate::ffi::{Sampler, Token};

/// Why generation stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    EndOfGeneration,
    Limit,
    Interrupted,
}

/// Ingests `prompt` (showing progress through `progress(done, total)`), then samples up to
/// `max_tokens`, calling `on_token` for each; `on_token` returning false stops early.
pub fn generate(
    engine: &mut Engine,
    sampler: &mut Sampler,
    prompt: &[Token],
    max_tokens: usize,
    progress: &mut dyn FnMut(usize, usize),
    on_token: &mut dyn FnMut(Token) -> bool,
) -> Result<(Vec<Token>, Stop)> {
    let total = prompt.len();
    let last = total.saturating_sub(1);
    let mut last_chunk_index = 0;
    engine.ingest(prompt, &mut |i| i == last, &mut |_, offset, len| {
        progress(offset + len, total);
        last_chunk_index = len.saturating_sub(1);
        Ok(())
    })?;
    let mut out = Vec::new();
    if max_tokens == 0 || prompt.is_empty() {
        return Ok((out, Stop::Limit));
    }
    let mut index = last_chunk_index;
    loop {
        let token = sampler.sample(engine.context(), index)?;
        if engine.model().is_eog(token) {
            return Ok((out, Stop::EndOfGeneration));
        }
        out.push(token);
        let keep_going = on_token(token);
        // Every emitted token enters the cache, so a conversation can continue from it.
        engine.step(token)?;
        if !keep_going {
            return Ok((out, Stop::Interrupted));
        }
        if out.len() >= max_tokens {
            return Ok((out, Stop::Limit));
        }
        index = 0;
    }
}
