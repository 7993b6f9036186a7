//! Typed errors of the library. Every message tells the user what went wrong and, where it can,
//! what to do about it; the CLIs print them as one line.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("model file {path} not found: fetch the default model with `scripts/fetch-model.sh` or pass -m PATH")]
    ModelMissing { path: PathBuf },
    #[error("{path} is not a GGUF file (it does not start with the GGUF magic)")]
    NotGguf { path: PathBuf },
    #[error("llama.cpp could not load {path}: the file is truncated, corrupt or of an unsupported architecture (run with --verbose for llama.cpp's log)")]
    ModelLoad { path: PathBuf },
    #[error("llama.cpp could not create a context of {n_ctx} cells: free memory or ask for a shorter context")]
    ContextCreate { n_ctx: u32 },
    #[error("llama_decode failed with code {code}: {hint}")]
    Decode { code: i32, hint: &'static str },
    #[error("the model computed non-finite logits ({value}): its weights or hyper-parameters are broken")]
    NonFiniteLogits { value: String },
    #[error("{path}: {source}")]
    Gguf {
        path: PathBuf,
        source: gguf_tools::gguf::GgufError,
    },
    #[error("{path}: {source}")]
    Unloadable {
        path: PathBuf,
        source: gguf_tools::model::ModelError,
    },
    #[error("no CPU backend: {0}")]
    NoCpuBackend(String),
    #[error("llama.cpp failed in {call}: {what}")]
    Native { call: &'static str, what: String },
    #[error("text could not be tokenized: {0}")]
    Tokenize(String),
    #[error("{0}")]
    Filters(#[from] gguf_tools::filters::FiltersError),
    #[error("{0}")]
    Edit(#[from] gguf_tools::edit::EditError),
    #[error("{0}")]
    File(#[from] gguf_tools::safe_io::FileError),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("the full cache holds {cells} cells and the input needs {needed}: a cache that never evicts must be sized to the whole input")]
    FullCacheOverflow { cells: usize, needed: usize },
    #[error("a KV budget of {budget} cells is smaller than the {window} recent tokens and {sinks} sinks it always keeps, plus one")]
    BudgetTooSmall {
        budget: usize,
        window: usize,
        sinks: usize,
    },
    #[error("per-head retention needs V stored as one row of {row_values} values per cell (flash attention on); this context stores it otherwise")]
    HeadMovesUnsupported { row_values: usize },
    #[error("KV cache: {0}")]
    KvCache(String),
    #[error("chat template: {0}")]
    Template(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("interrupted")]
    Interrupted,
}

impl Error {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Error::InvalidArgument(message.into())
    }

    /// Whether this is a write to a closed pipe (`qfilters run … | head`): the reader has seen
    /// enough, so the program stops quietly.
    pub fn is_broken_pipe(&self) -> bool {
        matches!(self, Error::Io { source, .. } if source.kind() == std::io::ErrorKind::BrokenPipe)
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
