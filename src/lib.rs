//! qfilters: keep the KV cache of a GGUF model inside a fixed budget with Q-Filters.
//!
//! The pieces: [`ffi`] (llama.cpp behind safe handles, the only `unsafe`), [`policy`] (one
//! scorer per eviction policy), [`cache`] (the shared mechanism that applies scores),
//! [`engine`] (a context that decodes, scores and evicts), [`generate`] (prompt → text),
//! [`chat`] (a conversation that lives in the bounded cache).

#![deny(unsafe_code)]

pub mod args;
pub mod bench;
pub mod cache;
pub mod calibrate;
pub mod chat;
pub mod check;
pub mod engine;
pub mod error;
pub mod eval;
#[allow(unsafe_code)]
pub mod ffi;
pub mod generate;
pub mod gguf_check;
pub mod math;
pub mod policy;
pub mod server;
pub mod threads;

pub use error::{Error, Result};

/// The patches build.rs applied to the llama.cpp this binary links (`name@sha8+…`), or `none`
/// for a user's own `LLAMA_CPP_DIR` checkout (see vendor/patches/README.md).
pub const LLAMA_PATCHES: &str = env!("QFILTERS_LLAMA_PATCHES");

/// `pinned` (the sha256-pinned source build.rs unpacks and patches) or `LLAMA_CPP_DIR`.
pub const LLAMA_SOURCE: &str = env!("QFILTERS_LLAMA_SOURCE");
