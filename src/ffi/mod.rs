//! The one module with `unsafe`: llama.cpp's C API behind owned, safe handles.
//!
//! Every handle frees its llama.cpp object on drop. Every `unsafe` block says beside it which
//! invariant makes it sound. Nothing outside this module touches a raw pointer.

use std::ffi::{c_char, c_void, CStr, CString};
use std::path::Path;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Once};

use crate::error::{Error, Result};

#[allow(
    non_upper_case_globals,
    non_camel_case_types,
    non_snake_case,
    dead_code,
    improper_ctypes,
    clippy::all
)]
mod sys {
    include!(concat!(env!("OUT_DIR"), "/bindings.rs"));
}

pub type Token = sys::llama_token;

/// src/ffi_shim.cpp: each llama.cpp call that can throw, inside try/catch. Every function
/// returns 0, or 1 (out of memory) / 2 (another C++ exception) with the message kept for
/// `qf_last_error`; the call's own result goes through the last pointer.
mod shim {
    use super::sys;
    use std::ffi::{c_char, c_int};

    extern "C" {
        pub fn qf_last_error() -> *const c_char;
        pub fn qf_tokenize(
            vocab: *const sys::llama_vocab,
            text: *const c_char,
            text_len: i32,
            tokens: *mut sys::llama_token,
            n_tokens_max: i32,
            add_special: bool,
            parse_special: bool,
            result: *mut i32,
        ) -> c_int;
        pub fn qf_token_to_piece(
            vocab: *const sys::llama_vocab,
            token: sys::llama_token,
            buf: *mut c_char,
            length: i32,
            lstrip: i32,
            special: bool,
            result: *mut i32,
        ) -> c_int;
        pub fn qf_model_load_from_file(
            path: *const c_char,
            params: sys::llama_model_params,
            result: *mut *mut sys::llama_model,
        ) -> c_int;
        pub fn qf_init_from_model(
            model: *mut sys::llama_model,
            params: sys::llama_context_params,
            result: *mut *mut sys::llama_context,
        ) -> c_int;
        pub fn qf_decode(
            ctx: *mut sys::llama_context,
            batch: sys::llama_batch,
            result: *mut i32,
        ) -> c_int;
        pub fn qf_chat_apply_template(
            tmpl: *const c_char,
            chat: *const sys::llama_chat_message,
            n_msg: usize,
            add_ass: bool,
            buf: *mut c_char,
            length: i32,
            result: *mut i32,
        ) -> c_int;
        pub fn qf_sampler_sample(
            smpl: *mut sys::llama_sampler,
            ctx: *mut sys::llama_context,
            idx: i32,
            result: *mut sys::llama_token,
        ) -> c_int;
    }
}

/// Turns a shim status into a typed error naming the llama.cpp call.
fn native(call: &'static str, status: std::ffi::c_int) -> Result<()> {
    if status == 0 {
        return Ok(());
    }
    // SAFETY: qf_last_error returns this thread's NUL-terminated message, set by the shim call
    // that just failed on this thread and valid until the next one; it is copied at once.
    let what = unsafe { CStr::from_ptr(shim::qf_last_error()) }
        .to_string_lossy()
        .into_owned();
    Err(Error::Native { call, what })
}

static BACKEND_INIT: Once = Once::new();
static VERBOSE_LOG: AtomicBool = AtomicBool::new(false);

/// llama.cpp logs to stderr by default; a CLI wants that only with --verbose.
pub fn set_verbose_log(verbose: bool) {
    VERBOSE_LOG.store(verbose, Ordering::Relaxed);
}

extern "C" fn log_sink(_level: sys::ggml_log_level, text: *const c_char, _user: *mut c_void) {
    if VERBOSE_LOG.load(Ordering::Relaxed) && !text.is_null() {
        // SAFETY: llama.cpp passes a NUL-terminated string valid for the duration of the call.
        let text = unsafe { CStr::from_ptr(text) };
        eprint!("{}", text.to_string_lossy());
    }
}

fn init_backend() {
    BACKEND_INIT.call_once(|| {
        // SAFETY: called once per process before any other llama.cpp call; `log_sink` is a
        // plain function that lives for the whole program and ignores its user pointer.
        unsafe {
            sys::llama_log_set(Some(log_sink), std::ptr::null_mut());
            sys::llama_backend_init();
        }
    });
}

/// How llama.cpp places the model.
#[derive(Debug, Clone, Default)]
pub struct ModelParams {
    /// Layers offloaded to the GPU (`-ngl`); 0 keeps everything on the CPU.
    pub gpu_layers: i32,
}

/// A loaded GGUF model. Shared read-only between contexts through `Arc`.
pub struct Model {
    ptr: NonNull<sys::llama_model>,
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
        crate::gguf_check::check_model_file(path)?;
        crate::gguf_check::check_hyperparameters(path)?;
        init_backend();
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

    fn vocab(&self) -> *const sys::llama_vocab {
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
    pub fn is_control(&self, token: Token) -> bool {
        // SAFETY: valid vocab pointer; llama.cpp checks the id against the vocabulary size.
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

    pub fn add_bos(&self) -> bool {
        // SAFETY: valid vocab pointer.
        unsafe { sys::llama_vocab_get_add_bos(self.vocab()) }
    }
}

/// The names of llama.cpp's built-in chat templates (`chatml`, `llama3`, ...).
pub fn builtin_chat_templates() -> Vec<String> {
    // SAFETY: with a null output and length 0 llama.cpp only returns the count.
    let n = unsafe { sys::llama_chat_builtin_templates(std::ptr::null_mut(), 0) };
    let mut names: Vec<*const c_char> = vec![std::ptr::null(); n.max(0) as usize];
    // SAFETY: `names` has room for `names.len()` pointers; llama.cpp fills them with static
    // NUL-terminated strings.
    let n = unsafe { sys::llama_chat_builtin_templates(names.as_mut_ptr(), names.len()) };
    names
        .iter()
        .take(n.max(0) as usize)
        .filter(|p| !p.is_null())
        // SAFETY: non-null pointers to llama.cpp's static NUL-terminated names.
        .map(|&p| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
        .collect()
}

/// Formats a conversation with llama.cpp's built-in template support.
///
/// `template` is the Jinja source (from the GGUF) or a built-in name such as `chatml`.
/// llama.cpp recognises templates by their shape; an unknown one is an error, not a guess.
pub fn apply_chat_template(
    template: &str,
    messages: &[(String, String)],
    add_assistant: bool,
) -> Result<String> {
    let tmpl = CString::new(template)
        .map_err(|_| Error::Template("template contains a NUL byte".into()))?;
    let owned: Vec<(CString, CString)> = messages
        .iter()
        .map(|(r, c)| Ok((CString::new(r.as_str())?, CString::new(c.as_str())?)))
        .collect::<std::result::Result<_, std::ffi::NulError>>()
        .map_err(|_| Error::Template("a message contains a NUL byte".into()))?;
    let msgs: Vec<sys::llama_chat_message> = owned
        .iter()
        .map(|(r, c)| sys::llama_chat_message {
            role: r.as_ptr(),
            content: c.as_ptr(),
        })
        .collect();
    let total: usize = messages.iter().map(|(r, c)| r.len() + c.len()).sum();
    let mut buf = vec![0u8; 2 * total + 256];
    loop {
        let mut n = 0;
        // SAFETY: `msgs` points into `owned`, alive for the call; `buf` is writable for its
        // length; `n` is a valid result place.
        native("llama_chat_apply_template", unsafe {
            shim::qf_chat_apply_template(
                tmpl.as_ptr(),
                msgs.as_ptr(),
                msgs.len(),
                add_assistant,
                buf.as_mut_ptr() as *mut c_char,
                buf.len().min(i32::MAX as usize) as i32,
                &mut n,
            )
        })?;
        if n < 0 {
            return Err(Error::Template(
                "llama.cpp does not support this chat template: pass --template chatml (or another built-in name)".into(),
            ));
        }
        let n = n as usize;
        if n <= buf.len() {
            buf.truncate(n);
            return Ok(String::from_utf8_lossy(&buf).into_owned());
        }
        buf.resize(n, 0);
    }
}

/// A batch of tokens for one sequence (sequence 0).
pub struct Batch {
    raw: sys::llama_batch,
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

    pub fn pos(&self, i: usize) -> Option<i32> {
        // SAFETY: bounds checked against n_tokens; the array holds `capacity` entries.
        (i < self.len()).then(|| unsafe { *self.raw.pos.add(i) })
    }
}

/// A node of the compute graph as the eval callback sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeOp {
    Rope,
    SoftMax,
    SetRows,
    MulMat,
    Other,
}

#[derive(Debug, Clone)]
pub struct NodeInfo<'a> {
    /// Name without the `-<layer>` suffix, e.g. `Kcur`.
    pub base: &'a str,
    pub layer: Option<usize>,
    pub op: NodeOp,
    pub ne: [i64; 4],
}

/// Something that wants to read graph nodes while llama.cpp computes them.
///
/// Answering `true` in `wants` makes the scheduler split the graph at that node and hand its
/// data to `observe` (as f32); that split costs a synchronisation, so want only what you need.
pub trait GraphObserver: Send {
    fn wants(&mut self, node: &NodeInfo) -> bool;
    fn observe(&mut self, node: &NodeInfo, data: &[f32]);
}

/// The persistent KV-cache tensors of one layer, found in the graph's K/V writes.
#[derive(Clone, Copy)]
struct LayerKv {
    k: *mut sys::ggml_tensor,
    v: *mut sys::ggml_tensor,
    /// Cell indices of the last graph's K write (a graph input, valid until the next decode).
    k_idx: *mut sys::ggml_tensor,
}

impl Default for LayerKv {
    fn default() -> Self {
        Self {
            k: std::ptr::null_mut(),
            v: std::ptr::null_mut(),
            k_idx: std::ptr::null_mut(),
        }
    }
}

/// State behind the eval callback's user pointer. Boxed so its address is stable.
struct HookState {
    observer: Option<Box<dyn GraphObserver>>,
    layers: Vec<LayerKv>,
    scratch: Vec<u8>,
    floats: Vec<f32>,
    failed: Option<String>,
    /// Cell indices of the current decode's K writes, one entry per index tensor (a model with
    /// sliding-window layers has two caches, each with its own cells), copied in the ask phase.
    batch_cells: Vec<(*mut sys::ggml_tensor, Vec<i64>)>,
}

fn split_layer(name: &str) -> (&str, Option<usize>) {
    match name.rsplit_once('-') {
        Some((base, layer)) => match layer.parse() {
            Ok(l) => (base, Some(l)),
            Err(_) => (name, None),
        },
        None => (name, None),
    }
}

fn node_op(op: sys::ggml_op) -> NodeOp {
    match op {
        sys::GGML_OP_ROPE => NodeOp::Rope,
        sys::GGML_OP_SOFT_MAX => NodeOp::SoftMax,
        sys::GGML_OP_SET_ROWS => NodeOp::SetRows,
        sys::GGML_OP_MUL_MAT => NodeOp::MulMat,
        _ => NodeOp::Other,
    }
}

/// SAFETY (caller): `t` points to a live ggml tensor.
unsafe fn tensor_name<'a>(t: *const sys::ggml_tensor) -> &'a str {
    let name = CStr::from_ptr((*t).name.as_ptr());
    name.to_str().unwrap_or("")
}

/// Reads a whole tensor as f32 into `floats`, converting from its storage type.
///
/// SAFETY (caller): `t` is a live, computed tensor with a backend buffer.
unsafe fn read_tensor_f32(
    t: *const sys::ggml_tensor,
    scratch: &mut Vec<u8>,
    floats: &mut Vec<f32>,
) -> bool {
    if !sys::ggml_is_contiguous(t) {
        return false;
    }
    let n_elems: i64 = (*t).ne.iter().product();
    let bytes = sys::ggml_nbytes(t);
    scratch.resize(bytes, 0);
    sys::ggml_backend_tensor_get(t, scratch.as_mut_ptr() as *mut c_void, 0, bytes);
    floats.resize(n_elems.max(0) as usize, 0.0);
    convert_to_f32((*t).type_, scratch, floats)
}

/// Converts `n = out.len()` values of ggml type `ty` stored in `raw` to f32.
fn convert_to_f32(ty: sys::ggml_type, raw: &[u8], out: &mut [f32]) -> bool {
    if ty == sys::GGML_TYPE_F32 {
        if raw.len() < out.len() * 4 {
            return false;
        }
        for (o, c) in out.iter_mut().zip(raw.chunks_exact(4)) {
            *o = f32::from_ne_bytes([c[0], c[1], c[2], c[3]]);
        }
        return true;
    }
    // SAFETY: ggml_get_type_traits returns a static table entry for every valid type.
    let traits = unsafe { sys::ggml_get_type_traits(ty) };
    if traits.is_null() {
        return false;
    }
    // SAFETY: non-null pointer to a static table.
    let (to_float, blck, type_size) =
        unsafe { ((*traits).to_float, (*traits).blck_size, (*traits).type_size) };
    let Some(to_float) = to_float else {
        return false;
    };
    let n = out.len() as i64;
    if blck <= 0 || n % blck != 0 || raw.len() < (n / blck) as usize * type_size {
        return false;
    }
    // SAFETY: `raw` holds n/blck blocks of `type_size` bytes (checked above) and `out` has room
    // for `n` floats; to_float reads and writes exactly that.
    unsafe { to_float(raw.as_ptr() as *const c_void, out.as_mut_ptr(), n) };
    true
}

extern "C" fn eval_callback(t: *mut sys::ggml_tensor, ask: bool, user: *mut c_void) -> bool {
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        // SAFETY: `user` is the Box<HookState> owned by the Context that registered this
        // callback; llama.cpp calls it only inside llama_decode, while the Context (and so the
        // box) is alive and exclusively borrowed by that decode call.
        let state = unsafe { &mut *(user as *mut HookState) };
        // SAFETY: the scheduler passes a live graph node.
        let op = node_op(unsafe { (*t).op });
        // The scheduler asks about every node of every graph: the common case (not a cache
        // write, no observer) must stay a couple of loads and compares.
        if ask && op == NodeOp::SetRows {
            // SAFETY: a live SET_ROWS node (see `note_cache_write`).
            unsafe { note_cache_write(state, t) };
        }
        let Some(observer) = state.observer.as_mut() else {
            return !ask;
        };
        // SAFETY: the scheduler passes a live graph node.
        let (name, ne) = unsafe { (tensor_name(t), (*t).ne) };
        let (base, layer) = split_layer(name);
        let info = NodeInfo {
            base,
            layer,
            op,
            ne,
        };
        if ask {
            return observer.wants(&info);
        }
        // SAFETY: with ask=false the scheduler has computed `t` and synchronised its backend.
        let ok = unsafe { read_tensor_f32(t, &mut state.scratch, &mut state.floats) };
        if ok {
            observer.observe(&info, &state.floats);
        } else if state.failed.is_none() {
            state.failed = Some(format!("could not read graph node {name}"));
        }
        true
    }));
    // A panic must not unwind into C; stop the computation instead (decode then reports it).
    result.unwrap_or(false)
}

/// Records the cache tensors behind a SET_ROWS node and, for the first K write of a decode,
/// copies its cell indices.
///
/// The indices are read here, in the ask phase, because the scheduler has just set (on the CPU)
/// or synchronously uploaded (to a GPU split) that input and nothing of the split has run yet;
/// after `llama_decode` the graph allocator may have given the index memory to later nodes.
/// Every layer writing through the same index tensor shares its cells: one read per index tensor.
///
/// SAFETY (caller): `t` is a live SET_ROWS node of the graph being computed.
unsafe fn note_cache_write(state: &mut HookState, t: *mut sys::ggml_tensor) {
    // SET_ROWS nodes have src[0] (rows), src[1] (indices), src[2] (destination); the
    // destination of a KV write is the persistent cache tensor, alive as long as the context.
    let dest = (*t).src[2];
    let idx = (*t).src[1];
    if dest.is_null() {
        return;
    }
    let dest_name = tensor_name(dest);
    let is_k = dest_name.strip_prefix("cache_k_l");
    let is_v = dest_name.strip_prefix("cache_v_l");
    let Some(layer) = is_k.or(is_v).and_then(|l| l.parse::<usize>().ok()) else {
        return;
    };
    if state.layers.len() <= layer {
        state.layers.resize(layer + 1, LayerKv::default());
    }
    if is_k.is_none() {
        state.layers[layer].v = dest;
        return;
    }
    state.layers[layer].k = dest;
    state.layers[layer].k_idx = idx;
    if idx.is_null() || state.batch_cells.iter().any(|(p, _)| *p == idx) {
        return;
    }
    if (*idx).type_ != sys::GGML_TYPE_I64 || !sys::ggml_is_contiguous(idx) || (*idx).data.is_null()
    {
        return;
    }
    let n = (*idx).ne[0].max(0) as usize;
    let mut cells = vec![0i64; n];
    // Reads n*8 bytes of a computed input through its backend (a memcpy on the CPU, one small
    // device-to-host copy on a GPU).
    sys::ggml_backend_tensor_get(idx, cells.as_mut_ptr() as *mut c_void, 0, n * 8);
    state.batch_cells.push((idx, cells));
}

/// Head-slice moves of one (layer, KV head): `(layer, head, [(from cell, to cell)])`.
pub type HeadMoveGroup<'a> = (usize, usize, &'a [(usize, usize)]);

/// How the device reduces each (cell, KV head) slice of a key to one number, so a score can be
/// computed where the keys live and only `n_tokens x n_head_kv` floats come back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyReduce {
    /// `<k, f>` with the head's filter (uploaded once with `Context::set_key_filters`).
    Dot,
    /// `<k, k>`.
    SquaredNorm,
}

/// A backend of the device that holds the K cache, with its own allocator, for the small
/// graphs qfilters computes there (key reductions, head-slice moves).
struct DeviceGraphs {
    backend: sys::ggml_backend_t,
    galloc: sys::ggml_gallocr_t,
    /// Per model layer, its filters `[head_dim, n_head_kv]` (f32), when set.
    filters: Vec<*mut sys::ggml_tensor>,
    filter_ctx: *mut sys::ggml_context,
    filter_buf: sys::ggml_backend_buffer_t,
    /// Memory for the tensor and graph metadata of one graph (no data: `no_alloc`).
    meta: Vec<u8>,
}

impl Drop for DeviceGraphs {
    fn drop(&mut self) {
        // SAFETY: each handle was created by this struct, is freed once here (null ones are
        // skipped), and no graph using them is alive (graphs live only inside one call).
        unsafe {
            if !self.filter_buf.is_null() {
                sys::ggml_backend_buffer_free(self.filter_buf);
            }
            if !self.filter_ctx.is_null() {
                sys::ggml_free(self.filter_ctx);
            }
            if !self.galloc.is_null() {
                sys::ggml_gallocr_free(self.galloc);
            }
            if !self.backend.is_null() {
                sys::ggml_backend_free(self.backend);
            }
        }
    }
}

/// A ggml context for one graph's metadata, freed on drop.
struct GraphCtx(*mut sys::ggml_context);

impl Drop for GraphCtx {
    fn drop(&mut self) {
        // SAFETY: created by ggml_init in `DeviceGraphs::graph_ctx`, freed once.
        unsafe { sys::ggml_free(self.0) }
    }
}

impl DeviceGraphs {
    /// A backend for the device whose buffer holds `k` (the CPU backend for host memory).
    ///
    /// SAFETY (caller): `k` is a live, allocated tensor.
    unsafe fn for_tensor(k: *mut sys::ggml_tensor, threads: i32) -> Option<DeviceGraphs> {
        let buf = (*k).buffer;
        if buf.is_null() {
            return None;
        }
        let backend = if sys::ggml_backend_buffer_is_host(buf) {
            let b =
                sys::ggml_backend_init_by_type(sys::GGML_BACKEND_DEVICE_TYPE_CPU, std::ptr::null());
            if !b.is_null() {
                sys::ggml_backend_cpu_set_n_threads(b, threads.max(1));
            }
            b
        } else {
            let dev = sys::ggml_backend_buft_get_device(sys::ggml_backend_buffer_get_type(buf));
            if dev.is_null() {
                return None;
            }
            sys::ggml_backend_dev_init(dev, std::ptr::null())
        };
        if backend.is_null() {
            return None;
        }
        let galloc = sys::ggml_gallocr_new(sys::ggml_backend_get_default_buffer_type(backend));
        let out = DeviceGraphs {
            backend,
            galloc,
            filters: Vec::new(),
            filter_ctx: std::ptr::null_mut(),
            filter_buf: std::ptr::null_mut(),
            meta: Vec::new(),
        };
        (!galloc.is_null()).then_some(out)
    }

    /// Same buffer type as the K cache (so a graph here may read it directly).
    ///
    /// SAFETY (caller): `t` is a live, allocated tensor.
    unsafe fn reaches(&self, t: *mut sys::ggml_tensor) -> bool {
        let buf = (*t).buffer;
        if buf.is_null() {
            return false;
        }
        let dev = sys::ggml_backend_get_device(self.backend);
        if sys::ggml_backend_buffer_is_host(buf) {
            return sys::ggml_backend_dev_type(dev) == sys::GGML_BACKEND_DEVICE_TYPE_CPU;
        }
        sys::ggml_backend_buft_get_device(sys::ggml_backend_buffer_get_type(buf)) == dev
    }

    /// A metadata-only context for `n_tensors` tensors and one graph of `graph_size` nodes.
    fn graph_ctx(&mut self, n_tensors: usize, graph_size: usize) -> Option<GraphCtx> {
        // SAFETY: plain size computations.
        let size = unsafe {
            n_tensors * sys::ggml_tensor_overhead()
                + sys::ggml_graph_overhead_custom(graph_size, false)
                + 1024
        };
        self.meta.resize(size, 0);
        let params = sys::ggml_init_params {
            mem_size: size,
            mem_buffer: self.meta.as_mut_ptr() as *mut c_void,
            no_alloc: true,
        };
        // SAFETY: `meta` outlives the context (the context is dropped before `meta` is
        // touched again: both are used only within one `&mut self` call).
        let ctx = unsafe { sys::ggml_init(params) };
        (!ctx.is_null()).then_some(GraphCtx(ctx))
    }

    /// Allocates and computes `gf` when the backend supports every node; false otherwise.
    ///
    /// SAFETY (caller): `gf` was built in a live context from live tensors; inputs are set by
    /// the caller after this allocates them (through `set_inputs`).
    unsafe fn compute(
        &mut self,
        gf: *mut sys::ggml_cgraph,
        set_inputs: &mut dyn FnMut(),
    ) -> Result<bool> {
        for i in 0..sys::ggml_graph_n_nodes(gf) {
            if !sys::ggml_backend_supports_op(self.backend, sys::ggml_graph_node(gf, i)) {
                return Ok(false);
            }
        }
        if !sys::ggml_gallocr_alloc_graph(self.galloc, gf) {
            return Err(Error::KvCache(
                "could not allocate a scoring graph on the cache's device".into(),
            ));
        }
        set_inputs();
        if sys::ggml_backend_graph_compute(self.backend, gf) != sys::GGML_STATUS_SUCCESS {
            return Err(Error::KvCache(
                "the cache's device failed to compute a qfilters graph".into(),
            ));
        }
        Ok(true)
    }
}

/// Knobs of a llama.cpp context, with the defaults qfilters uses.
#[derive(Debug, Clone)]
pub struct ContextParams {
    /// KV cells to allocate (llama.cpp may round this up).
    pub n_ctx: u32,
    /// Most tokens one `decode` call may carry.
    pub n_batch: u32,
    /// CPU threads; with more than one, their polling level is [`crate::threads::poll`].
    pub threads: i32,
    /// `Some(true)` forces flash attention on, `Some(false)` off, `None` lets llama.cpp choose.
    pub flash_attn: Option<bool>,
    /// Install the graph hook (eval callback). Without it nothing can be observed or evicted
    /// by score; benchmarks compare against this.
    pub hook: bool,
}

impl Default for ContextParams {
    fn default() -> Self {
        Self {
            n_ctx: 4096,
            n_batch: 512,
            threads: crate::threads::default_threads(),
            flash_attn: None,
            hook: true,
        }
    }
}

/// A llama.cpp context (one sequence) with the graph hook installed.
pub struct Context {
    ptr: NonNull<sys::llama_context>,
    /// Our own CPU threadpool (None with one thread: ggml then runs on the calling thread).
    /// Declared after `ptr` so it is freed after the context that uses it; held only for that.
    #[allow(dead_code)]
    threadpool: Option<ThreadPool>,
    hook: Box<HookState>,
    model: Arc<Model>,
    n_batch: usize,
    threads: i32,
    /// Graphs on the cache's device, made when first needed.
    device: Option<DeviceGraphs>,
    /// No backend reaches the cache tensors: host paths only.
    device_unusable: bool,
}

// SAFETY: the context is used from one thread at a time (&mut for every mutation); the hook's
// raw tensor pointers are only dereferenced through &self/&mut self methods of this context.
unsafe impl Send for Context {}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from llama_init_from_model and is freed once; the hook box and the
        // threadpool are freed after this (field drop order), so neither the callback nor a
        // worker ever sees a dangling pointer.
        unsafe { sys::llama_free(self.ptr.as_ptr()) }
    }
}

/// A ggml CPU threadpool, with the polling level qfilters chooses instead of ggml's default.
struct ThreadPool(NonNull<sys::ggml_threadpool>);

impl ThreadPool {
    fn new(threads: i32, poll: u32) -> Option<ThreadPool> {
        // SAFETY: plain-data parameters filled by ggml; ggml_threadpool_new copies them and
        // returns null on failure.
        unsafe {
            let mut p = sys::ggml_threadpool_params_default(threads);
            p.poll = poll.min(100);
            NonNull::new(sys::ggml_threadpool_new(&mut p)).map(ThreadPool)
        }
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        // SAFETY: created by ggml_threadpool_new and freed once, after the context using it.
        unsafe { sys::ggml_threadpool_free(self.0.as_ptr()) }
    }
}

impl Context {
    pub fn new(model: &Arc<Model>, params: &ContextParams) -> Result<Context> {
        let mut hook = Box::new(HookState {
            observer: None,
            layers: Vec::new(),
            scratch: Vec::new(),
            floats: Vec::new(),
            failed: None,
            batch_cells: Vec::new(),
        });
        // SAFETY: default params are plain data.
        let mut cp = unsafe { sys::llama_context_default_params() };
        cp.n_ctx = params.n_ctx;
        cp.n_batch = params.n_batch;
        cp.n_ubatch = params.n_batch;
        cp.n_seq_max = 1;
        cp.n_threads = params.threads;
        cp.n_threads_batch = params.threads;
        cp.no_perf = true;
        // Sliding-window layers get their own cache sized to the window, not a full-size one:
        // the engine tells full-attention layers (the ones it tracks) from SWA layers by cache
        // size, and SWA layers prune old positions themselves, so a full-size SWA cache would
        // be mistaken for the full one.
        cp.swa_full = false;
        cp.flash_attn_type = match params.flash_attn {
            Some(true) => sys::LLAMA_FLASH_ATTN_TYPE_ENABLED,
            Some(false) => sys::LLAMA_FLASH_ATTN_TYPE_DISABLED,
            None => sys::LLAMA_FLASH_ATTN_TYPE_AUTO,
        };
        if params.hook {
            cp.cb_eval = Some(eval_callback);
            cp.cb_eval_user_data = &mut *hook as *mut HookState as *mut c_void;
        }
        let mut raw = std::ptr::null_mut();
        // SAFETY: the model outlives the context (we keep an Arc); the callback's user pointer
        // is the boxed hook, which the context owns and drops after llama_free; `raw` is a
        // valid result place.
        native("llama_init_from_model", unsafe {
            shim::qf_init_from_model(model.ptr.as_ptr(), cp, &mut raw)
        })?;
        let ptr = NonNull::new(raw).ok_or(Error::ContextCreate {
            n_ctx: params.n_ctx,
        })?;
        // With more than one thread, attach a pool whose idle workers sleep instead of spinning
        // (ggml's own pool polls): the one knob that keeps a busy machine usable.
        let threadpool = if params.threads > 1 {
            ThreadPool::new(params.threads, crate::threads::poll())
        } else {
            None
        };
        if let Some(pool) = &threadpool {
            // SAFETY: valid context and pool; the pool outlives the context (drop order).
            unsafe { sys::llama_attach_threadpool(ptr.as_ptr(), pool.0.as_ptr(), pool.0.as_ptr()) }
        }
        Ok(Context {
            ptr,
            threadpool,
            hook,
            model: Arc::clone(model),
            n_batch: params.n_batch as usize,
            threads: params.threads,
            device: None,
            device_unusable: false,
        })
    }

    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    pub fn n_batch(&self) -> usize {
        self.n_batch
    }

    /// Cells allocated for the KV cache (after llama.cpp's rounding).
    pub fn n_ctx(&self) -> usize {
        // SAFETY: valid context pointer.
        unsafe { sys::llama_n_ctx(self.ptr.as_ptr()) as usize }
    }

    pub fn set_observer(
        &mut self,
        observer: Option<Box<dyn GraphObserver>>,
    ) -> Option<Box<dyn GraphObserver>> {
        std::mem::replace(&mut self.hook.observer, observer)
    }

    pub fn observer_mut(&mut self) -> Option<&mut (dyn GraphObserver + 'static)> {
        self.hook.observer.as_deref_mut()
    }

    pub fn decode(&mut self, batch: &Batch) -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        self.hook.batch_cells.clear();
        let mut code = 0;
        // SAFETY: the batch arrays are valid for n_tokens entries; the context is exclusively
        // borrowed, so the callback's access to the hook does not alias any Rust reference;
        // `code` is a valid result place.
        let status = unsafe { shim::qf_decode(self.ptr.as_ptr(), batch.raw, &mut code) };
        native("llama_decode", status)?;
        if let Some(msg) = self.hook.failed.take() {
            return Err(Error::KvCache(msg));
        }
        match code {
            0 => Ok(()),
            1 => Err(Error::Decode { code, hint: "no free KV cell for the batch (the cache is full: raise --budget or lower the batch size)" }),
            2 => Err(Error::Decode { code, hint: "aborted (an internal callback failed)" }),
            _ => Err(Error::Decode { code, hint: "llama.cpp rejected the batch (run with --verbose for its log)" }),
        }
    }

    /// Logits of the `i`-th token of the last batch (which must have asked for them).
    pub fn logits(&self, i: usize) -> Result<&[f32]> {
        let n_vocab = self.model.n_vocab();
        // SAFETY: llama_get_logits_ith checks `i` and returns null for a token without logits.
        let p = unsafe { sys::llama_get_logits_ith(self.ptr.as_ptr(), i as i32) };
        if p.is_null() {
            return Err(Error::invalid(format!("no logits for batch token {i}")));
        }
        // SAFETY: non-null logits rows hold n_vocab floats, valid until the next decode, which
        // needs &mut self and so cannot happen while this borrow lives.
        Ok(unsafe { std::slice::from_raw_parts(p, n_vocab) })
    }

    fn memory(&self) -> sys::llama_memory_t {
        // SAFETY: valid context pointer; the memory object is owned by the context.
        unsafe { sys::llama_get_memory(self.ptr.as_ptr()) }
    }

    /// Removes positions [p0, p1) of sequence 0 from every layer and head.
    pub fn remove_positions(&mut self, p0: i32, p1: i32) -> bool {
        // SAFETY: valid memory handle; any range is accepted.
        unsafe { sys::llama_memory_seq_rm(self.memory(), 0, p0, p1) }
    }

    pub fn clear_memory(&mut self) {
        // SAFETY: valid memory handle.
        unsafe { sys::llama_memory_clear(self.memory(), true) }
    }

    /// Highest position in the cache, -1 when empty.
    pub fn max_position(&self) -> i32 {
        // SAFETY: valid memory handle.
        unsafe { sys::llama_memory_seq_pos_max(self.memory(), 0) }
    }

    /// Number of layers whose KV tensors the hook has seen.
    pub fn kv_layers(&self) -> usize {
        self.hook.layers.len()
    }

    /// Cells of `layer`'s K cache (SWA layers of some models have a smaller cache), 0 if none.
    pub fn kv_rows(&self, layer: usize) -> usize {
        match self.hook.layers.get(layer) {
            // SAFETY: cache tensors live as long as the context.
            Some(l) if !l.k.is_null() => unsafe { (*l.k).ne[1].max(0) as usize },
            _ => 0,
        }
    }

    /// Layers that have their own K cache tensor (all attention layers).
    pub fn kv_layer_present(&self, layer: usize) -> bool {
        self.hook.layers.get(layer).is_some_and(|l| !l.k.is_null())
    }

    /// Bytes allocated for K and V across all layers (known after the first decode).
    pub fn kv_bytes(&self) -> usize {
        let mut total = 0;
        for l in &self.hook.layers {
            for t in [l.k, l.v] {
                if !t.is_null() {
                    // SAFETY: cache tensors live as long as the context.
                    total += unsafe { sys::ggml_nbytes(t) };
                }
            }
        }
        total
    }

    /// Cell indices written by the last decode (one per token of the batch, in batch order).
    ///
    /// Copied while the decode ran (see `note_cache_write`), so it does not depend on the graph
    /// allocator keeping the index input alive afterwards (it may not, on a GPU).
    /// `layer` must be one whose K cache the hook has seen (all layers of a unified cache share
    /// the cells).
    pub fn last_cells(&self, layer: usize) -> Result<Vec<i64>> {
        let l = self.layer_kv(layer)?;
        self.hook
            .batch_cells
            .iter()
            .find(|(p, _)| *p == l.k_idx)
            .map(|(_, c)| c.clone())
            .ok_or_else(|| {
                Error::KvCache(
                    "the last decode wrote no K cache rows (is the hook installed?)".into(),
                )
            })
    }

    /// The same indices read back after the decode from the index input of `layer`'s K write:
    /// the way that was checked on a CPU, kept to compare against on other backends.
    pub fn last_cells_after_decode(&self, layer: usize) -> Result<Vec<i64>> {
        let l = self.layer_kv(layer)?;
        if l.k_idx.is_null() {
            return Err(Error::KvCache(format!(
                "layer {layer} wrote no K rows in the last decode"
            )));
        }
        self.synchronize();
        // SAFETY: k_idx is an input tensor of the last graph; its buffer stays allocated until
        // the next graph is allocated (its contents may have been reused, which is what callers
        // of this check look for).
        unsafe {
            let t = l.k_idx;
            if (*t).type_ != sys::GGML_TYPE_I64 || !sys::ggml_is_contiguous(t) {
                return Err(Error::KvCache("unexpected K index tensor type".into()));
            }
            let n = (*t).ne[0].max(0) as usize;
            let mut out = vec![0i64; n];
            sys::ggml_backend_tensor_get(t, out.as_mut_ptr() as *mut c_void, 0, n * 8);
            Ok(out)
        }
    }

    fn layer_kv(&self, layer: usize) -> Result<LayerKv> {
        match self.hook.layers.get(layer) {
            Some(l) if !l.k.is_null() => Ok(*l),
            _ => Err(Error::KvCache(format!(
                "no K cache tensor seen for layer {layer} (decode something first)"
            ))),
        }
    }

    /// Waits until the backends have finished the last decode. `llama_decode` may return while
    /// a GPU still computes (always without a callback, and with one since
    /// vendor/patches/sched-eval-callback.patch): every direct read or write of a cache
    /// tensor, or of a graph input, calls this first. Cheap when nothing is pending.
    fn synchronize(&self) {
        // SAFETY: valid context pointer.
        unsafe { sys::llama_synchronize(self.ptr.as_ptr()) }
    }

    /// The device graphs for the K caches of `layers` (and their V caches with `with_v`),
    /// when one backend reaches all of them; `None` means: use the host path.
    fn device_for(&mut self, layers: &[usize], with_v: bool) -> Result<Option<&mut DeviceGraphs>> {
        if self.device_unusable || layers.is_empty() {
            return Ok(None);
        }
        let kvs: Vec<LayerKv> = layers
            .iter()
            .map(|&l| self.layer_kv(l))
            .collect::<Result<_>>()?;
        if self.device.is_none() {
            // SAFETY: the K cache tensor lives as long as the context.
            match unsafe { DeviceGraphs::for_tensor(kvs[0].k, self.threads) } {
                Some(d) => self.device = Some(d),
                None => {
                    self.device_unusable = true;
                    return Ok(None);
                }
            }
        }
        let Some(dev) = self.device.as_mut() else {
            return Ok(None);
        };
        for kv in &kvs {
            // SAFETY: cache tensors live as long as the context.
            let ok =
                unsafe { dev.reaches(kv.k) && (!with_v || (!kv.v.is_null() && dev.reaches(kv.v))) };
            if !ok {
                return Ok(None);
            }
        }
        Ok(Some(dev))
    }

    /// Uploads per-head filters for `layers` (`filters` is `[layers][n_head_kv][head_dim]`) to
    /// the device of the K cache, for `KeyReduce::Dot`. False: no device path here.
    pub fn set_key_filters(
        &mut self,
        layers: &[usize],
        filters: &[f32],
        n_head_kv: usize,
        head_dim: usize,
    ) -> Result<bool> {
        let per = n_head_kv * head_dim;
        if filters.len() != layers.len() * per || per == 0 {
            return Err(Error::KvCache(
                "filters do not match the layers and heads".into(),
            ));
        }
        let Some(dev) = self.device_for(layers, false)? else {
            return Ok(false);
        };
        // SAFETY: a fresh metadata context sized for `layers.len()` tensors; its tensors are
        // allocated in one backend buffer owned by `dev` (freed in its Drop, with the context);
        // each upload writes exactly the tensor's `per` floats.
        unsafe {
            if !dev.filter_buf.is_null() {
                sys::ggml_backend_buffer_free(dev.filter_buf);
                dev.filter_buf = std::ptr::null_mut();
            }
            if !dev.filter_ctx.is_null() {
                sys::ggml_free(dev.filter_ctx);
                dev.filter_ctx = std::ptr::null_mut();
            }
            dev.filters.clear();
            let ctx = sys::ggml_init(sys::ggml_init_params {
                mem_size: (layers.len() + 1) * sys::ggml_tensor_overhead(),
                mem_buffer: std::ptr::null_mut(),
                no_alloc: true,
            });
            if ctx.is_null() {
                return Err(Error::KvCache("ggml_init failed".into()));
            }
            dev.filter_ctx = ctx;
            let max_layer = layers.iter().copied().max().unwrap_or(0);
            dev.filters = vec![std::ptr::null_mut(); max_layer + 1];
            for &l in layers {
                dev.filters[l] = sys::ggml_new_tensor_2d(
                    ctx,
                    sys::GGML_TYPE_F32,
                    head_dim as i64,
                    n_head_kv as i64,
                );
            }
            dev.filter_buf = sys::ggml_backend_alloc_ctx_tensors(ctx, dev.backend);
            if dev.filter_buf.is_null() {
                return Err(Error::KvCache(
                    "cannot allocate filters on the cache's device".into(),
                ));
            }
            for (i, &l) in layers.iter().enumerate() {
                let f = &filters[i * per..(i + 1) * per];
                sys::ggml_backend_tensor_set(
                    dev.filters[l],
                    f.as_ptr() as *const c_void,
                    0,
                    per * 4,
                );
            }
        }
        Ok(true)
    }

    /// Reduces the keys of `cells` on the device that holds the K cache, with one small graph
    /// for all `layers`: `get_rows` of the cells, then per KV head a dot product with its filter
    /// (`Dot`) or with itself (`SquaredNorm`). `out` becomes `[layers][cells][n_head_kv]`.
    /// Only those floats cross to the host. False: no device path here (host reads instead).
    pub fn device_key_stats(
        &mut self,
        layers: &[usize],
        cells: &[i64],
        reduce: KeyReduce,
        n_head_kv: usize,
        head_dim: usize,
        out: &mut Vec<f32>,
    ) -> Result<bool> {
        let n = cells.len();
        if n == 0 || layers.is_empty() {
            out.clear();
            return Ok(true);
        }
        let kvs: Vec<LayerKv> = layers
            .iter()
            .map(|&l| self.layer_kv(l))
            .collect::<Result<_>>()?;
        // SAFETY: cache tensors live as long as the context.
        let rows = unsafe { (*kvs[0].k).ne[1] };
        let mut idx32 = Vec::with_capacity(n);
        for &c in cells {
            if c < 0 || c >= rows {
                return Err(Error::KvCache(format!("cell {c} out of range")));
            }
            idx32.push(c as i32);
        }
        for kv in &kvs {
            // SAFETY: cache tensors live as long as the context.
            if unsafe { (*kv.k).ne[0] } != (n_head_kv * head_dim) as i64 {
                return Err(Error::KvCache(
                    "K cache rows are not n_head_kv x head_dim".into(),
                ));
            }
        }
        self.synchronize();
        let Some(dev) = self.device_for(layers, false)? else {
            return Ok(false);
        };
        if reduce == KeyReduce::Dot
            && layers
                .iter()
                .any(|&l| dev.filters.get(l).is_none_or(|f| f.is_null()))
        {
            return Err(Error::KvCache(
                "no filters on the device for a tracked layer".into(),
            ));
        }
        let graph_size = 8 * layers.len() + 16;
        let Some(gctx) = dev.graph_ctx(6 * layers.len() + 8, graph_size) else {
            return Err(Error::KvCache("ggml_init failed".into()));
        };
        let (h, d) = (n_head_kv as i64, head_dim as i64);
        let mut outs = Vec::with_capacity(layers.len());
        // SAFETY: all tensors are created in `gctx` (alive until the end of this block) from
        // the live cache and filter tensors; `compute` allocates the graph's own tensors
        // before `set_inputs` writes `n` i32 into `idx`; each output holds n*h f32, read once
        // into its slice of `out` after the (synchronous) compute.
        unsafe {
            let ctx = gctx.0;
            let gf = sys::ggml_new_graph_custom(ctx, graph_size, false);
            let idx = sys::ggml_new_tensor_1d(ctx, sys::GGML_TYPE_I32, n as i64);
            sys::ggml_set_input(idx);
            for (kv, &l) in kvs.iter().zip(layers) {
                let rows = sys::ggml_get_rows(ctx, kv.k, idx);
                let heads = sys::ggml_reshape_3d(ctx, rows, d, h, n as i64);
                let prod = match reduce {
                    KeyReduce::Dot => sys::ggml_mul(ctx, heads, dev.filters[l]),
                    KeyReduce::SquaredNorm => sys::ggml_sqr(ctx, heads),
                };
                let s = sys::ggml_sum_rows(ctx, prod);
                sys::ggml_set_output(s);
                sys::ggml_build_forward_expand(gf, s);
                outs.push(s);
            }
            let ok = dev.compute(gf, &mut || {
                sys::ggml_backend_tensor_set(idx, idx32.as_ptr() as *const c_void, 0, n * 4)
            })?;
            if !ok {
                return Ok(false);
            }
            let per = n * n_head_kv;
            out.resize(layers.len() * per, 0.0);
            for (i, &s) in outs.iter().enumerate() {
                sys::ggml_backend_tensor_get(
                    s,
                    out[i * per..].as_mut_ptr() as *mut c_void,
                    0,
                    per * 4,
                );
            }
        }
        Ok(true)
    }

    /// Moves head slices for several (layer, head) groups in one graph on the cache's device:
    /// per group and tensor, `get_rows` of the source cells from the head's column view and
    /// `set_rows` into the destination cells. Sources must not be destinations (the eviction
    /// plan moves out of removed cells into cells that stay). False: no device path (the
    /// cache type is not f16/bf16/f32, or no backend reaches the tensors).
    fn device_move_heads(
        &mut self,
        groups: &[HeadMoveGroup<'_>],
        n_head_kv: usize,
    ) -> Result<bool> {
        let mut layers: Vec<usize> = groups.iter().map(|g| g.0).collect();
        layers.sort_unstable();
        layers.dedup();
        let kvs: Vec<(usize, LayerKv)> = layers
            .iter()
            .map(|&l| Ok((l, self.layer_kv(l)?)))
            .collect::<Result<_>>()?;
        for (_, kv) in &kvs {
            for t in [kv.k, kv.v] {
                if t.is_null() {
                    return Ok(false);
                }
                // SAFETY: cache tensors live as long as the context.
                let ty = unsafe { (*t).type_ };
                // A dequantise/requantise round trip is exact only for these.
                if ![sys::GGML_TYPE_F16, sys::GGML_TYPE_BF16, sys::GGML_TYPE_F32].contains(&ty) {
                    return Ok(false);
                }
            }
        }
        let mut src_idx: Vec<i32> = Vec::new();
        let mut dst_idx: Vec<i64> = Vec::new();
        for (_, _, moves) in groups {
            for &(s, t) in moves.iter() {
                src_idx.push(s as i32);
                dst_idx.push(t as i64);
            }
        }
        if src_idx.is_empty() {
            return Ok(true);
        }
        self.synchronize();
        let Some(dev) = self.device_for(&layers, true)? else {
            return Ok(false);
        };
        let graph_size = 8 * groups.len() + 16;
        let Some(gctx) = dev.graph_ctx(10 * groups.len() + 8, graph_size) else {
            return Err(Error::KvCache("ggml_init failed".into()));
        };
        let total = src_idx.len();
        // SAFETY: tensors are created in `gctx` (alive for this block) from the live cache
        // tensors; each view covers one head's columns of every cell (offset head*slice < row
        // size, checked); the index inputs are allocated by `compute` before `set_inputs`
        // writes exactly `total` entries into each; cells were checked against ne[1].
        unsafe {
            let ctx = gctx.0;
            let gf = sys::ggml_new_graph_custom(ctx, graph_size, false);
            let src = sys::ggml_new_tensor_1d(ctx, sys::GGML_TYPE_I32, total as i64);
            let dst = sys::ggml_new_tensor_1d(ctx, sys::GGML_TYPE_I64, total as i64);
            sys::ggml_set_input(src);
            sys::ggml_set_input(dst);
            let mut at = 0usize;
            for &(layer, head, moves) in groups {
                let Some((_, kv)) = kvs.iter().find(|(l, _)| *l == layer) else {
                    return Err(Error::KvCache(format!("layer {layer} not found")));
                };
                let m = moves.len();
                if m == 0 {
                    continue;
                }
                let s = sys::ggml_view_1d(ctx, src, m as i64, at * 4);
                let t = sys::ggml_view_1d(ctx, dst, m as i64, at * 8);
                at += m;
                for cache in [kv.k, kv.v] {
                    let (ne0, ne1, nb1, ty) = (
                        (*cache).ne[0],
                        (*cache).ne[1],
                        (*cache).nb[1],
                        (*cache).type_,
                    );
                    if n_head_kv == 0 || ne0 % n_head_kv as i64 != 0 || head >= n_head_kv {
                        return Err(Error::KvCache(
                            "cache row is not a whole number of heads".into(),
                        ));
                    }
                    if moves
                        .iter()
                        .any(|&(a, b)| a as i64 >= ne1 || b as i64 >= ne1)
                    {
                        return Err(Error::KvCache("a head move's cell is out of range".into()));
                    }
                    let hd = ne0 / n_head_kv as i64;
                    let slice = sys::ggml_row_size(ty, hd);
                    let col = sys::ggml_view_2d(ctx, cache, hd, ne1, nb1, head * slice);
                    let rows = sys::ggml_get_rows(ctx, col, s);
                    let w = sys::ggml_set_rows(ctx, col, rows, t);
                    sys::ggml_build_forward_expand(gf, w);
                }
            }
            dev.compute(gf, &mut || {
                sys::ggml_backend_tensor_set(src, src_idx.as_ptr() as *const c_void, 0, total * 4);
                sys::ggml_backend_tensor_set(dst, dst_idx.as_ptr() as *const c_void, 0, total * 8);
            })
        }
    }

    /// Reads the K rows of `cells` (each n_head_kv * head_dim values) for `layer`, as f32.
    pub fn read_k_rows(&mut self, layer: usize, cells: &[i64], out: &mut Vec<f32>) -> Result<()> {
        let l = self.layer_kv(layer)?;
        self.synchronize();
        // SAFETY: `l.k` is a persistent cache tensor owned by the context.
        let (ty, row_elems, row_bytes, n_rows) =
            unsafe { ((*l.k).type_, (*l.k).ne[0], (*l.k).nb[1], (*l.k).ne[1]) };
        let row_elems = row_elems.max(0) as usize;
        out.resize(cells.len() * row_elems, 0.0);
        let scratch = &mut self.hook.scratch;
        let mut i = 0;
        while i < cells.len() {
            // Coalesce runs of consecutive cells into one copy (a prefill fills cells in order).
            let start = cells[i];
            let mut run = 1;
            while i + run < cells.len() && cells[i + run] == start + run as i64 {
                run += 1;
            }
            if start < 0 || start + run as i64 > n_rows {
                return Err(Error::KvCache(format!("cell {start} out of range")));
            }
            let bytes = run * row_bytes;
            scratch.resize(bytes, 0);
            // SAFETY: rows [start, start+run) lie inside the tensor (checked above).
            unsafe {
                sys::ggml_backend_tensor_get(
                    l.k,
                    scratch.as_mut_ptr() as *mut c_void,
                    start as usize * row_bytes,
                    bytes,
                )
            };
            for r in 0..run {
                let dst = &mut out[(i + r) * row_elems..(i + r + 1) * row_elems];
                if !convert_to_f32(ty, &scratch[r * row_bytes..(r + 1) * row_bytes], dst) {
                    return Err(Error::KvCache(
                        "the K cache type cannot be read as floats".into(),
                    ));
                }
            }
            i += run;
        }
        Ok(())
    }

    /// Moves head slices for every `(layer, head, moves)` group of an eviction round: in one
    /// graph on the cache's device when it can (returns true), else one group at a time
    /// through the host (false).
    pub fn move_head_slices_batch(
        &mut self,
        groups: &[HeadMoveGroup<'_>],
        n_head_kv: usize,
    ) -> Result<bool> {
        if self.device_move_heads(groups, n_head_kv)? {
            return Ok(true);
        }
        for &(layer, head, moves) in groups {
            self.move_head_slices(layer, head, n_head_kv, moves)?;
        }
        Ok(false)
    }

    /// Moves the K and V slices of one KV head from cell `src` to cell `dst`, for each pair.
    ///
    /// Needs V stored one row per cell (flash attention on); the caller checks `can_move_heads`.
    pub fn move_head_slices(
        &mut self,
        layer: usize,
        head: usize,
        n_head_kv: usize,
        moves: &[(usize, usize)],
    ) -> Result<()> {
        let l = self.layer_kv(layer)?;
        if l.v.is_null() {
            return Err(Error::KvCache(format!(
                "no V cache tensor seen for layer {layer}"
            )));
        }
        self.synchronize();
        for t in [l.k, l.v] {
            // SAFETY: persistent cache tensors owned by the context.
            let (ne0, nb1, ne1, ty) = unsafe { ((*t).ne[0], (*t).nb[1], (*t).ne[1], (*t).type_) };
            if n_head_kv == 0 || ne0 % n_head_kv as i64 != 0 {
                return Err(Error::KvCache(
                    "cache row is not a whole number of heads".into(),
                ));
            }
            // SAFETY: plain size computation for a valid type.
            let slice = unsafe { sys::ggml_row_size(ty, ne0 / n_head_kv as i64) };
            let scratch = &mut self.hook.scratch;
            scratch.resize(slice, 0);
            for &(src, dst) in moves {
                if src as i64 >= ne1 || dst as i64 >= ne1 {
                    return Err(Error::KvCache(format!("cell {src} or {dst} out of range")));
                }
                // SAFETY: both byte ranges lie inside row `src`/`dst` of the tensor (cells and
                // head checked above); `scratch` holds `slice` bytes.
                unsafe {
                    sys::ggml_backend_tensor_get(
                        t,
                        scratch.as_mut_ptr() as *mut c_void,
                        src * nb1 + head * slice,
                        slice,
                    );
                    sys::ggml_backend_tensor_set(
                        t,
                        scratch.as_ptr() as *const c_void,
                        dst * nb1 + head * slice,
                        slice,
                    );
                }
            }
        }
        Ok(())
    }

    /// Whether head slices can be moved between cells: V must be stored one row per cell.
    pub fn can_move_heads(&self, n_embd_v_gqa: usize) -> bool {
        self.hook.layers.iter().filter(|l| !l.k.is_null()).all(|l| {
            // SAFETY: persistent cache tensors owned by the context.
            !l.v.is_null() && unsafe { (*l.v).ne[0] } as usize == n_embd_v_gqa
        })
    }

    /// Reads one K or V cache row of `layer` (tests use this to check moves).
    pub fn read_cache_row(&mut self, layer: usize, value: bool, cell: usize) -> Result<Vec<f32>> {
        let l = self.layer_kv(layer)?;
        let t = if value { l.v } else { l.k };
        if t.is_null() {
            return Err(Error::KvCache("no such cache tensor".into()));
        }
        self.synchronize();
        // SAFETY: persistent cache tensor; the row range is checked against ne[1].
        unsafe {
            if cell as i64 >= (*t).ne[1] {
                return Err(Error::KvCache(format!("cell {cell} out of range")));
            }
            let nb1 = (*t).nb[1];
            let n = (*t).ne[0].max(0) as usize;
            let mut raw = vec![0u8; nb1];
            sys::ggml_backend_tensor_get(t, raw.as_mut_ptr() as *mut c_void, cell * nb1, nb1);
            let mut out = vec![0f32; n];
            if !convert_to_f32((*t).type_, &raw, &mut out) {
                return Err(Error::KvCache("cache type cannot be read as floats".into()));
            }
            Ok(out)
        }
    }
}

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
