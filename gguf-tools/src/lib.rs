//! Read, write and edit GGUF files, and carry Q-Filters inside them.
//!
//! - [`gguf`]: a bounded, panic-free GGUF reader and a byte-exact header writer.
//! - [`filters`]: Q-Filters in the published safetensors layout or inside a GGUF.
//! - [`edit`]: embed / strip / extract, streaming tensor data with constant memory.
//! - [`model`]: the hyper-parameters of a GGUF model that the filters must match.
//! - [`synth`]: random-weight llama-architecture GGUFs for tests and benchmarks.
//! - [`inspect`]: a human / JSON summary of a GGUF file.
//! - [`safe_io`]: the one way both crates read inputs and write outputs (atomic, no links).

#![forbid(unsafe_code)]

pub mod edit;
pub mod filters;
pub mod gguf;
pub mod inspect;
pub mod model;
pub mod progress;
pub mod safe_io;
pub mod synth;
