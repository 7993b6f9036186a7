//! A `llama_batch` for one sequence (public API only).

use super::{sys, Token};

/// A batch of tokens for one sequence (sequence 0).
pub struct Batch {
    pub(super) raw: sys::llama_batch,
    capacity: usize,
}

impl Drop for Batch {
    fn drop(&mut self) {
        // SAFETY: `raw` came from llama_batch_init and is freed once; n_tokens is reset so
        // llama.cpp frees exactly the arrays it allocated.
        unsafe { sys::llama_batch_free(self.raw) }
    }
}

impl Batch {
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        // SAFETY: allocates arrays for `capacity` tokens with one sequence id each.
        let raw = unsafe { sys::llama_batch_init(capacity as i32, 0, 1) };
        Batch { raw, capacity }
    }

    pub fn clear(&mut self) {
        self.raw.n_tokens = 0;
    }

    pub fn len(&self) -> usize {
        self.raw.n_tokens.max(0) as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Appends a token; `false` when the batch is full.
    pub fn push(&mut self, token: Token, pos: i32, logits: bool) -> bool {
        let i = self.len();
        if i >= self.capacity {
            return false;
        }
        // SAFETY: llama_batch_init allocated `capacity` entries in each array and one sequence
        // id per entry; `i < capacity`.
        unsafe {
            *self.raw.token.add(i) = token;
            *self.raw.pos.add(i) = pos;
            *self.raw.n_seq_id.add(i) = 1;
            *(*self.raw.seq_id.add(i)) = 0;
            *self.raw.logits.add(i) = logits as i8;
        }
        self.raw.n_tokens += 1;
        true
    }
}
