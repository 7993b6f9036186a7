//! Every integration test, in one binary so that llama.cpp is linked once: one module per area,
//! and `common` for the models, data files and the CLI they share. `tests/server/` (the HTTP
//! server driven by the official openai client) is run by `scripts/test.sh` beside it.

mod common;

mod calibrate;
mod chat;
mod chat_input;
mod chat_tokens;
mod embedded;
mod eval;
mod files;
mod foundation;
mod head_moves;
mod key_paths;
mod portable;
mod quantized;
mod robust_models;
mod rpc;
mod synth_models;
mod tools;
mod tuned;
