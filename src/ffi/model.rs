//! A loaded GGUF model: hyper-parameters, metadata, vocabulary (public llama.cpp API only).

use std::ffi::{c_char, CStr, CString};
use std::path::Path;
use std::ptr::NonNull;
use std::sync::Arc;

use super::{init_backend, native, shim, sys, Token};
use crate::error::{Error, Result};

/// How llama.cpp places the model.
#[derive(Debug, Clone, Default)]
pub struct ModelParams {
    /// Layers offloaded to the GPU (`-ngl`); 0 keeps everything on the CPU.
    pub gpu_layers: i32,
}

/// A loaded GGUF model. Shared read-only between contexts through `Arc`.
pub struct Model {
    pub(super) ptr: NonNull<sys::llama_model>,
}

// SAFETY: a llama_model is immutable after loading and llama.cpp allows using it from several
// threads and contexts at once.
unsafe impl Send for Model {}
unsafe impl Sync for Model {}

impl Drop for Model {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from llama_model_load_from_file and is freed exactly once here;
        // contexts hold an `Arc<Model>`, so none outlives it.
        unsafe { sys::llama_model_free(self.ptr.as_ptr()) }
    }
}

impl Model {
    pub fn load(path: &Path, params: &ModelParams) -> Result<Arc<Model>> {
        crate::ffi::gguf_check::check_model_file(path)?;
        crate::ffi::gguf_check::check_hyperparameters(path)?;
        init_backend();
        super::cpu_backend::check()?;
        let c_path = CString::new(path.as_os_str().to_string_lossy().as_bytes())
            .map_err(|_| Error::invalid("model path contains a NUL byte"))?;
        // SAFETY: default params are plain data; we only change an integer field.
        let mut mp = unsafe { sys::llama_model_default_params() };
        mp.n_gpu_layers = params.gpu_layers;
        let mut raw = std::ptr::null_mut();
        // SAFETY: `c_path` is a valid NUL-terminated string for the duration of the call;
        // `raw` is a valid place for the result.
        native("llama_model_load_from_file", unsafe {
            shim::qf_model_load_from_file(c_path.as_ptr(), mp, &mut raw)
        })?;
        let ptr = NonNull::new(raw).ok_or_else(|| Error::ModelLoad {
            path: path.to_path_buf(),
        })?;
        Ok(Arc::new(Model { ptr }))
    }

    pub(super) fn vocab(&self) -> *const sys::llama_vocab {
        // SAFETY: the model pointer is valid while `self` lives; the vocab is owned by it.
        unsafe { sys::llama_model_get_vocab(self.ptr.as_ptr()) }
    }

    pub fn n_layer(&self) -> usize {
        // SAFETY: valid model pointer (see `vocab`).
        unsafe { sys::llama_model_n_layer(self.ptr.as_ptr()).max(0) as usize }
    }

    pub fn n_head(&self) -> usize {
        // SAFETY: valid model pointer.
        unsafe { sys::llama_model_n_head(self.ptr.as_ptr()).max(0) as usize }
    }

    pub fn n_head_kv(&self) -> usize {
        // SAFETY: valid model pointer.
        unsafe { sys::llama_model_n_head_kv(self.ptr.as_ptr()).max(0) as usize }
    }

    pub fn n_embd(&self) -> usize {
        // SAFETY: valid model pointer.
        unsafe { sys::llama_model_n_embd(self.ptr.as_ptr()).max(0) as usize }
    }

    /// Sliding-window size of the model's SWA layers, 0 when it has none.
    pub fn n_swa(&self) -> usize {
        // SAFETY: valid model pointer.
        unsafe { sys::llama_model_n_swa(self.ptr.as_ptr()).max(0) as usize }
    }

    /// The pairing of llama.cpp's rotary embedding for this model: `Some(true)` NeoX (dim i
    /// with i + n/2), `Some(false)` adjacent pairs (2i, 2i+1), `None` any other kind (none,
    /// multi-section, vision), which qfilters does not reproduce.
    pub fn rope_neox(&self) -> Option<bool> {
        // SAFETY: valid model pointer.
        let kind = unsafe { sys::llama_model_rope_type(self.ptr.as_ptr()) };
        match kind {
            sys::LLAMA_ROPE_TYPE_NEOX => Some(true),
            sys::LLAMA_ROPE_TYPE_NORM => Some(false),
            _ => None,
        }
    }

    /// The RoPE frequency scale the model was trained with (1 without linear scaling).
    pub fn rope_freq_scale(&self) -> f32 {
        // SAFETY: valid model pointer.
        unsafe { sys::llama_model_rope_freq_scale_train(self.ptr.as_ptr()) }
    }

    pub fn n_ctx_train(&self) -> usize {
        // SAFETY: valid model pointer.
        unsafe { sys::llama_model_n_ctx_train(self.ptr.as_ptr()).max(0) as usize }
    }

    pub fn n_vocab(&self) -> usize {
        // SAFETY: valid vocab pointer owned by the model.
        unsafe { sys::llama_vocab_n_tokens(self.vocab()).max(0) as usize }
    }

    /// A metadata value rendered as a string by llama.cpp.
    pub fn meta(&self, key: &str) -> Option<String> {
        let key = CString::new(key).ok()?;
        let mut buf = vec![0u8; 256];
        loop {
            // SAFETY: `buf` is writable for `buf.len()` bytes; llama.cpp writes at most that many
            // and returns the full length it needed.
            let n = unsafe {
                sys::llama_model_meta_val_str(
                    self.ptr.as_ptr(),
                    key.as_ptr(),
                    buf.as_mut_ptr() as *mut c_char,
                    buf.len(),
                )
            };
            if n < 0 {
                return None;
            }
            let n = n as usize;
            if n < buf.len() {
                buf.truncate(n);
                return Some(String::from_utf8_lossy(&buf).into_owned());
            }
            buf.resize(n + 1, 0);
        }
    }

    pub fn architecture(&self) -> String {
        self.meta("general.architecture").unwrap_or_default()
    }

    /// Per-head dimension of keys, from the GGUF (`<arch>.attention.key_length`), else n_embd / n_head.
    pub fn head_dim(&self) -> usize {
        let arch = self.architecture();
        self.meta(&format!("{arch}.attention.key_length"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| self.n_embd() / self.n_head().max(1))
    }

    /// Per-head dimension of values (`<arch>.attention.value_length`), else the key's.
    pub fn value_dim(&self) -> usize {
        let arch = self.architecture();
        self.meta(&format!("{arch}.attention.value_length"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| self.head_dim())
    }

    pub fn chat_template(&self) -> Option<String> {
        // SAFETY: valid model pointer; a null name asks for the default template; the returned
        // string is owned by the model and copied before we return.
        let raw = unsafe { sys::llama_model_chat_template(self.ptr.as_ptr(), std::ptr::null()) };
        if raw.is_null() {
            return None;
        }
        // SAFETY: non-null, NUL-terminated, owned by the model which outlives this call.
        Some(
            unsafe { CStr::from_ptr(raw) }
                .to_string_lossy()
                .into_owned(),
        )
    }

    pub fn tokenize(
        &self,
        text: &str,
        add_special: bool,
        parse_special: bool,
    ) -> Result<Vec<Token>> {
        if !self.has_tokenizer() {
            return Err(Error::Tokenize(
                "this model has no tokenizer (tokenizer.ggml.model is 'none'): give it token ids, as `qfilters bench` does".into(),
            ));
        }
        let len = i32::try_from(text.len())
            .map_err(|_| Error::Tokenize("text longer than 2 GiB".into()))?;
        let mut tokens: Vec<Token> = vec![0; text.len() + 8];
        loop {
            let mut n = 0;
            // SAFETY: `text` is valid for `len` bytes (no NUL needed, the length is passed);
            // `tokens` is writable for `tokens.len()` entries; `n` is a valid result place.
            native("llama_tokenize", unsafe {
                shim::qf_tokenize(
                    self.vocab(),
                    text.as_ptr() as *const c_char,
                    len,
                    tokens.as_mut_ptr(),
                    tokens.len().min(i32::MAX as usize) as i32,
                    add_special,
                    parse_special,
                    &mut n,
                )
            })
            .map_err(|e| match e {
                Error::Native { what, .. } => Error::Tokenize(format!(
                    "llama.cpp failed on a text of {} bytes ({what}): send a shorter text",
                    text.len()
                )),
                e => e,
            })?;
            if n >= 0 {
                tokens.truncate(n as usize);
                return Ok(tokens);
            }
            if n == i32::MIN {
                return Err(Error::Tokenize("too many tokens".into()));
            }
            tokens.resize((-n) as usize, 0);
        }
    }

    /// False for models without a vocabulary (e.g. `gguf-tools synth` models), on which
    /// llama.cpp's tokenizer calls abort the process.
    pub fn has_tokenizer(&self) -> bool {
        // SAFETY: valid vocab pointer owned by the model.
        unsafe { sys::llama_vocab_type(self.vocab()) != sys::LLAMA_VOCAB_TYPE_NONE }
    }

    /// The bytes of one token (may be part of a UTF-8 character).
    pub fn token_bytes(&self, token: Token, special: bool) -> Vec<u8> {
        if !self.has_tokenizer() {
            return Vec::new();
        }
        // llama.cpp looks the id up with `.at()`, which throws for an id outside the vocabulary.
        if token < 0 || token as usize >= self.n_vocab() {
            return Vec::new();
        }
        let mut buf = vec![0u8; 64];
        loop {
            let mut n = 0;
            // SAFETY: `buf` is writable for `buf.len()` bytes; a negative result is the size
            // needed; `n` is a valid result place.
            let status = unsafe {
                shim::qf_token_to_piece(
                    self.vocab(),
                    token,
                    buf.as_mut_ptr() as *mut c_char,
                    buf.len() as i32,
                    0,
                    special,
                    &mut n,
                )
            };
            // With the id checked, only an allocation of one token's text can fail here, and
            // Rust aborts on such a failure itself; the piece is then left empty.
            if status != 0 {
                return Vec::new();
            }
            if n >= 0 {
                buf.truncate(n as usize);
                return buf;
            }
            buf.resize((-n) as usize, 0);
        }
    }

    pub fn detokenize(&self, tokens: &[Token], special: bool) -> String {
        let bytes: Vec<u8> = tokens
            .iter()
            .flat_map(|&t| self.token_bytes(t, special))
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// True for control tokens (the template's markers, BOS/EOS...): llama.cpp parses their
    /// text into the token only when asked to parse special tokens.
    /// An id outside the vocabulary is no token at all, so not a control token.
    pub fn is_control(&self, token: Token) -> bool {
        // llama.cpp reads the attribute with `id_to_token.at(id)`, which throws (through
        // the C ABI, into Rust) for an id outside the vocabulary.
        if usize::try_from(token).map_or(true, |t| t >= self.n_vocab()) {
            return false;
        }
        // SAFETY: valid vocab pointer; `token` was checked to lie in 0..n_vocab above.
        let attr = unsafe { sys::llama_vocab_get_attr(self.vocab(), token) };
        attr & sys::LLAMA_TOKEN_ATTR_CONTROL != 0
    }

    /// Control and user-defined tokens: those whose text llama.cpp may match as a whole token
    /// instead of running the tokenizer over it.
    pub fn special_tokens(&self) -> Vec<Token> {
        let special = sys::LLAMA_TOKEN_ATTR_CONTROL | sys::LLAMA_TOKEN_ATTR_USER_DEFINED;
        (0..self.n_vocab() as Token)
            .filter(|&t| {
                // SAFETY: valid vocab pointer; `t` is below the vocabulary size.
                unsafe { sys::llama_vocab_get_attr(self.vocab(), t) & special != 0 }
            })
            .collect()
    }

    pub fn is_eog(&self, token: Token) -> bool {
        // SAFETY: valid vocab pointer; any token id is accepted.
        unsafe { sys::llama_vocab_is_eog(self.vocab(), token) }
    }

    pub fn bos(&self) -> Option<Token> {
        // SAFETY: valid vocab pointer.
        let t = unsafe { sys::llama_vocab_bos(self.vocab()) };
        (t >= 0).then_some(t)
    }

    /// The end-of-sequence token (chat templates name it `eos_token`).
    pub fn eos(&self) -> Option<Token> {
        // SAFETY: valid vocab pointer.
        let t = unsafe { sys::llama_vocab_eos(self.vocab()) };
        (t >= 0).then_some(t)
    }

    pub fn add_bos(&self) -> bool {
        // SAFETY: valid vocab pointer.
        unsafe { sys::llama_vocab_get_add_bos(self.vocab()) }
    }
}
