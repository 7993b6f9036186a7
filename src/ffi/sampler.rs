//! A llama.cpp sampler chain (public API only).

use std::ptr::NonNull;

use super::{native, shim, sys, Context, Token};
use crate::error::{Error, Result};

/// A llama.cpp sampler chain.
pub struct Sampler {
    ptr: NonNull<sys::llama_sampler>,
}

// SAFETY: a sampler is used from one thread at a time through &mut self.
unsafe impl Send for Sampler {}

impl Drop for Sampler {
    fn drop(&mut self) {
        // SAFETY: the chain owns the samplers added to it and frees them with itself, once.
        unsafe { sys::llama_sampler_free(self.ptr.as_ptr()) }
    }
}

/// How tokens are drawn: greedy when `temperature <= 0`.
#[derive(Debug, Clone)]
pub struct SamplingParams {
    pub temperature: f32,
    pub top_k: i32,
    pub top_p: f32,
    pub seed: u32,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 40,
            top_p: 0.95,
            seed: 42,
        }
    }
}

impl Sampler {
    pub fn new(params: &SamplingParams) -> Result<Sampler> {
        // SAFETY: the chain takes ownership of each sampler added; all constructors return
        // valid pointers for any argument values.
        unsafe {
            let mut cp = sys::llama_sampler_chain_default_params();
            cp.no_perf = true;
            let chain = sys::llama_sampler_chain_init(cp);
            if params.temperature <= 0.0 {
                sys::llama_sampler_chain_add(chain, sys::llama_sampler_init_greedy());
            } else {
                sys::llama_sampler_chain_add(chain, sys::llama_sampler_init_top_k(params.top_k));
                sys::llama_sampler_chain_add(chain, sys::llama_sampler_init_top_p(params.top_p, 1));
                sys::llama_sampler_chain_add(
                    chain,
                    sys::llama_sampler_init_temp(params.temperature),
                );
                sys::llama_sampler_chain_add(chain, sys::llama_sampler_init_dist(params.seed));
            }
            NonNull::new(chain)
                .map(|ptr| Sampler { ptr })
                .ok_or_else(|| Error::invalid("llama.cpp could not create a sampler"))
        }
    }

    /// Draws the next token from the logits of batch token `i` and records it in the chain.
    /// Samples from the logits of token `i` of the last decode. Non-finite logits (a broken
    /// model) are an error: sampling from them would pick an arbitrary token, or none.
    pub fn sample(&mut self, ctx: &Context, i: usize) -> Result<Token> {
        let logits = ctx.logits(i)?;
        if let Some(bad) = logits.iter().find(|x| !x.is_finite()) {
            return Err(Error::NonFiniteLogits {
                value: bad.to_string(),
            });
        }
        let mut token = 0;
        // SAFETY: both pointers are valid; the logits of token `i` exist (checked above);
        // `token` is a valid result place.
        native("llama_sampler_sample", unsafe {
            shim::qf_sampler_sample(self.ptr.as_ptr(), ctx.ptr.as_ptr(), i as i32, &mut token)
        })?;
        Ok(token)
    }
}
