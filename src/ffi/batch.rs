//! A `llama_batch` for one sequence (public API only).

use super::{sys, Token};
use crate::error::{Error, Result};

/// A batch of tokens for one sequence (sequence 0).
pub struct Batch {
    pub(super) raw: sys::llama_batch,
    /// Entries llama_batch_init allocated in each array: what `push` checks against.
    capacity: usize,
}

impl Drop for Batch {
    fn drop(&mut self) {
        // SAFETY: `raw` came from llama_batch_init (checked non-null in `new`) and is freed
        // once, here. llama_batch_free frees `seq_id[i]` up to the null sentinel that
        // llama_batch_init put after the last allocated entry, so it does not depend on
        // `n_tokens`.
        unsafe { sys::llama_batch_free(self.raw) }
    }
}

impl Batch {
    /// A batch of at most `capacity` tokens (at least one). A capacity llama.cpp cannot
    /// allocate (above `i32::MAX`), or an allocation that failed, is an error.
    pub fn new(capacity: usize) -> Result<Self> {
        let capacity = capacity.max(1);
        let n = i32::try_from(capacity).map_err(|_| {
            Error::invalid(format!(
                "a batch of {capacity} tokens is too large (at most {})",
                i32::MAX
            ))
        })?;
        // SAFETY: `n` is in 1..=i32::MAX; llama_batch_init allocates arrays of `n` entries
        // with one sequence id each (embd 0: token ids, not embeddings).
        let raw = unsafe { sys::llama_batch_init(n, 0, 1) };
        let batch = Batch { raw, capacity };
        if raw.token.is_null()
            || raw.pos.is_null()
            || raw.n_seq_id.is_null()
            || raw.seq_id.is_null()
            || raw.logits.is_null()
        {
            // Dropping frees whatever was allocated (free(NULL) is a no-op).
            drop(batch);
            return Err(Error::Native {
                call: "llama_batch_init",
                what: format!("could not allocate a batch of {capacity} tokens"),
            });
        }
        Ok(batch)
    }

    pub fn clear(&mut self) {
        self.raw.n_tokens = 0;
    }

    pub fn len(&self) -> usize {
        usize::try_from(self.raw.n_tokens).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends a token; an error when the batch is full.
    pub fn push(&mut self, token: Token, pos: i32, logits: bool) -> Result<()> {
        let i = self.len();
        if i >= self.capacity {
            return Err(Error::invalid(format!(
                "a batch of {} tokens is full",
                self.capacity
            )));
        }
        // SAFETY: `new` checked that llama_batch_init allocated `capacity` entries in each
        // array (non-null), with one sequence id (a non-null array of one) per entry;
        // `i < capacity` was checked above.
        unsafe {
            *self.raw.token.add(i) = token;
            *self.raw.pos.add(i) = pos;
            *self.raw.n_seq_id.add(i) = 1;
            *(*self.raw.seq_id.add(i)) = 0;
            *self.raw.logits.add(i) = logits as i8;
        }
        // `i < capacity <= i32::MAX`, so this cannot overflow.
        self.raw.n_tokens += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::Batch;

    #[test]
    fn a_capacity_llama_cpp_cannot_allocate_is_refused_not_truncated() {
        // (1 << 32) + 1 was truncated to 1 by `as i32`, while pushes were checked against
        // the untruncated capacity: the second push wrote past the allocation.
        let e = Batch::new((1usize << 32) + 1).err().expect("refused");
        assert!(e.to_string().contains("too large"), "{e}");
        assert!(Batch::new(i32::MAX as usize + 1).is_err());
    }

    #[test]
    fn a_full_batch_refuses_the_next_token() {
        let mut b = Batch::new(2).expect("batch");
        b.push(1, 0, false).expect("first");
        b.push(2, 1, true).expect("second");
        assert!(b.push(3, 2, true).is_err());
        assert_eq!(b.len(), 2);
        b.clear();
        assert!(b.is_empty());
        b.push(3, 0, true).expect("after clear");
    }
}
