//! qfilters: keep the KV cache of a GGUF model inside a fixed budget with Q-Filters.
//!
//! The crate follows the path a token takes (docs/ARCHITECTURE.md):
//! - [`ffi`]: llama.cpp behind safe handles, the only `unsafe` (with the C++ exception barrier,
//!   the GGUF preflight and the thread defaults);
//! - [`engine`]: a context that decodes, scores new keys once and evicts, with
//!   [`engine::cache`], the shared mechanism that applies scores;
//! - [`policy`]: one scorer per eviction policy;
//! - [`conversation`]: the one generation loop, and a chat that lives in the bounded cache;
//! - [`calibrate`]: filters from the GGUF itself, and how well they predict attention;
//! - [`eval`] (perplexity, passkey and needle sweeps), [`bench`](mod@bench) (speed),
//!   [`server`] (OpenAI API);
//! - [`args`]: the command line's flag groups, usable from code.
//!
//! Completing a prompt with the KV cache kept within 128 cells by K-norm eviction (with
//! filters, `policy::QFILTERS` and `Some(filters)`; see `examples/bounded_generation.rs`):
//!
//! ```no_run
//! use qfilters::args::{EvictionArgs, JobLength, LlamaArgs, SamplingArgs};
//! use qfilters::engine::Engine;
//! use qfilters::ffi::{Model, ModelParams, Sampler};
//!
//! # fn main() -> qfilters::Result<()> {
//! let model = Model::load(
//!     "models/SmolLM2-135M-Instruct.Q4_1.gguf".as_ref(),
//!     &ModelParams { gpu_layers: 0 },
//! )?;
//! let eviction = EvictionArgs::from_flags(&["--policy", "knorm", "--budget", "128"])?;
//! let prompt = model.tokenize("Once upon a time", true, false)?;
//! let job = JobLength::Known(prompt.len() + 256);
//! let config = eviction.engine_config(&LlamaArgs::default(), job, 1)?;
//! let mut engine = Engine::new(&model, eviction.scorer(None, 42)?, config)?;
//! let mut sampler = Sampler::new(&model, &SamplingArgs::default().params(42)?)?;
//! let limits = qfilters::conversation::generate::Limits::tokens(256);
//! let gen = qfilters::conversation::generate::generate(
//!     &mut engine, &mut sampler, &prompt, limits, &mut |_, _| true, &mut |_| true,
//! )?;
//! println!("{}", gen.text);
//! assert!(engine.stats().peak_cells <= 128 + eviction.n_batch);
//! # Ok(())
//! # }
//! ```

#![deny(unsafe_code)]

pub mod args;
pub mod bench;
pub mod calibrate;
pub mod conversation;
pub mod engine;
pub mod error;
pub mod eval;
#[allow(unsafe_code)]
pub mod ffi;
pub mod math;
pub mod policy;
pub mod rope;
pub mod server;

pub use error::{Error, Result};

/// The patches build.rs applied to the llama.cpp this binary links (`name@sha8+…`), or `none`
/// for a user's own `LLAMA_CPP_DIR` checkout (see vendor/patches/README.md).
pub const LLAMA_PATCHES: &str = env!("QFILTERS_LLAMA_PATCHES");

/// `pinned` (the sha256-pinned source build.rs unpacks and patches) or `LLAMA_CPP_DIR`.
pub const LLAMA_SOURCE: &str = env!("QFILTERS_LLAMA_SOURCE");
