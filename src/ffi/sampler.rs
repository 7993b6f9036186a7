//! A llama.cpp sampler chain (public API only).

use std::ptr::NonNull;

use super::{native, shim, sys, Context, Model, Token};
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

/// How tokens are drawn: greedy when `temperature <= 0`. The command line's defaults are
/// `args::SamplingArgs`'s (their one owner); the valid ranges are [`SamplingParams::check`]'s.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    pub temperature: f32,
    pub top_k: i32,
    pub top_p: f32,
    pub seed: u32,
    /// Subtracted from a token's logit once per time it was sampled before (OpenAI's
    /// `frequency_penalty`), over the last [`PENALTY_WINDOW`] sampled tokens.
    pub frequency_penalty: f32,
    /// Subtracted once from the logit of every token sampled before (`presence_penalty`).
    pub presence_penalty: f32,
    /// Added to the logits of these tokens before sampling (`logit_bias`).
    pub logit_bias: Vec<(Token, f32)>,
    /// A GBNF grammar (root rule `root`) the reply must follow (`response_format`, a required
    /// tool call): llama.cpp's grammar sampler masks every token that would leave it.
    pub grammar: Option<String>,
}

/// Sampled tokens the penalties look back on: more than any reply the server allows by default.
pub const PENALTY_WINDOW: i32 = 4096;
/// Most `logit_bias` entries (OpenAI accepts 300).
pub const MAX_LOGIT_BIAS: usize = 1024;

/// A sampling parameter outside the range llama.cpp's samplers take: `field` is the parameter's
/// name in the OpenAI API (the command line maps it to its flag).
#[derive(Debug, Clone, PartialEq)]
pub struct BadSampling {
    pub field: &'static str,
    pub message: String,
}

impl SamplingParams {
    /// Plain greedy decoding: the highest logit, nothing else (bench, the server's warm-up).
    pub fn greedy() -> SamplingParams {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            logit_bias: Vec::new(),
            grammar: None,
        }
    }

    /// The ranges llama.cpp's samplers take for a vocabulary of `n_vocab` tokens: finite
    /// temperature ≥ 0 (0 greedy), top-k ≥ 0 (0 off), top-p in (0, 1], penalties in [-2, 2],
    /// at most [`MAX_LOGIT_BIAS`] biases of [-100, 100] on token ids below `n_vocab`.
    /// [`Sampler::new`] refuses anything else, whoever built the parameters.
    pub fn check(&self, n_vocab: usize) -> std::result::Result<(), BadSampling> {
        let bad = |field, message: String| Err(BadSampling { field, message });
        let t = self.temperature;
        if !(t.is_finite() && t >= 0.0) {
            return bad(
                "temperature",
                format!("{t}: give a finite value of at least 0 (0 is greedy)"),
            );
        }
        if self.top_k < 0 {
            return bad("top_k", format!("{}: give 0 (off) or more", self.top_k));
        }
        let p = self.top_p;
        if !(p > 0.0 && p <= 1.0) {
            return bad("top_p", format!("{p}: give a value above 0 and at most 1"));
        }
        for (field, x) in [
            ("frequency_penalty", self.frequency_penalty),
            ("presence_penalty", self.presence_penalty),
        ] {
            if !(x.is_finite() && (-2.0..=2.0).contains(&x)) {
                return bad(field, format!("{x}: give a value from -2 to 2"));
            }
        }
        if self.logit_bias.len() > MAX_LOGIT_BIAS {
            return bad(
                "logit_bias",
                format!(
                    "{} entries: give at most {MAX_LOGIT_BIAS}",
                    self.logit_bias.len()
                ),
            );
        }
        for &(token, bias) in &self.logit_bias {
            if usize::try_from(token).map_or(true, |t| t >= n_vocab) {
                return bad(
                    "logit_bias",
                    format!("token {token} is not in the vocabulary (0 to {n_vocab} excluded)"),
                );
            }
            if !(bias.is_finite() && (-100.0..=100.0).contains(&bias)) {
                return bad(
                    "logit_bias",
                    format!("bias {bias} for token {token}: give a value from -100 to 100"),
                );
            }
        }
        Ok(())
    }
}

/// llama.cpp's grammar sampler for `grammar` (GBNF, root rule `root`) over `model`'s
/// vocabulary; a grammar it cannot parse (null, or an exception) is an error.
fn grammar_sampler(model: &Model, grammar: &str) -> Result<NonNull<sys::llama_sampler>> {
    let text = std::ffi::CString::new(grammar)
        .map_err(|_| Error::invalid("the grammar contains a NUL character"))?;
    let mut out: *mut sys::llama_sampler = std::ptr::null_mut();
    // SAFETY: the vocabulary pointer is the live model's; both strings are NUL-terminated
    // and outlive the call (llama.cpp copies them); `out` is a valid result place. The call
    // goes through the barrier, and a null result is checked below.
    native("llama_sampler_init_grammar", unsafe {
        shim::qf_sampler_init_grammar(model.vocab(), text.as_ptr(), c"root".as_ptr(), &mut out)
    })?;
    NonNull::new(out).ok_or_else(|| Error::invalid("llama.cpp could not parse the grammar"))
}

impl Sampler {
    /// The chain for `params` over `model`'s vocabulary: penalties and biases first (only when
    /// given), then greedy, or top-k, top-p, temperature and a seeded draw.
    pub fn new(model: &Model, params: &SamplingParams) -> Result<Sampler> {
        let n_vocab = model.n_vocab();
        params.check(n_vocab).map_err(|b| {
            Error::invalid(format!("sampling parameter {}: {}", b.field, b.message))
        })?;
        let n_vocab = i32::try_from(n_vocab)
            .map_err(|_| Error::invalid("the vocabulary is too large for llama.cpp's samplers"))?;
        // Made first, so that a grammar llama.cpp refuses leaves no chain to free.
        let grammar = params
            .grammar
            .as_deref()
            .map(|g| grammar_sampler(model, g))
            .transpose()?;
        let bias: Vec<sys::llama_logit_bias> = params
            .logit_bias
            .iter()
            .map(|&(token, bias)| sys::llama_logit_bias { token, bias })
            .collect();
        // SAFETY: the chain takes ownership of each sampler added (the grammar sampler,
        // checked non-null by grammar_sampler, is added once and owned by nothing else).
        // Checked above: the penalties are finite, the window is a small positive constant,
        // and every biased token id is below `n_vocab`, the vocabulary size both samplers are
        // given; `bias` outlives the call that copies it (its length fits i32: at most
        // MAX_LOGIT_BIAS).
        unsafe {
            let mut cp = sys::llama_sampler_chain_default_params();
            cp.no_perf = true;
            let chain = sys::llama_sampler_chain_init(cp);
            // The grammar masks first: the samplers after it only see tokens it allows.
            if let Some(g) = grammar {
                sys::llama_sampler_chain_add(chain, g.as_ptr());
            }
            if params.frequency_penalty != 0.0 || params.presence_penalty != 0.0 {
                sys::llama_sampler_chain_add(
                    chain,
                    sys::llama_sampler_init_penalties(
                        n_vocab,
                        PENALTY_WINDOW,
                        1.0,
                        params.frequency_penalty,
                        params.presence_penalty,
                    ),
                );
            }
            if !bias.is_empty() {
                sys::llama_sampler_chain_add(
                    chain,
                    sys::llama_sampler_init_logit_bias(n_vocab, bias.len() as i32, bias.as_ptr()),
                );
            }
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
        // SAFETY: both pointers are valid; the logits of token `i` exist (checked above, which
        // also checked that `i` fits an i32); `token` is a valid result place.
        native("llama_sampler_sample", unsafe {
            shim::qf_sampler_sample(self.ptr.as_ptr(), ctx.ptr.as_ptr(), i as i32, &mut token)
        })?;
        Ok(token)
    }
}
