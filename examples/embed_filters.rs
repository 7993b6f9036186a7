//! Embed Q-Filters into a GGUF model with the gguf-tools crate, so that `qfilters run -m OUT`
//! finds them without `--filters`, then read them back the way qfilters does.
//!
//! ```text
//! cargo run --release --example embed_filters -- MODEL.gguf FILTERS.safetensors OUT.gguf
//! ```
//! (`qfilters calibrate -m MODEL.gguf --text FILE -o FILTERS.safetensors` makes the filters.)

use std::path::{Path, PathBuf};

use gguf_tools::edit;
use gguf_tools::filters::QFilters;

fn main() {
    let argv: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    let [model, filters, out] = argv.as_slice() else {
        eprintln!("usage: embed_filters MODEL.gguf FILTERS.safetensors OUT.gguf");
        std::process::exit(2);
    };
    if let Err(e) = run(model, filters, out) {
        eprintln!("embed_filters: {e}");
        std::process::exit(1);
    }
}

fn run(model: &Path, filters: &Path, out: &Path) -> Result<(), Box<dyn std::error::Error>> {
    // Copies the tensors byte for byte; only the header gains the `qfilters.*` keys. It
    // refuses a model that has filters already (force = false) and an output that is an input.
    let (embedded, copied) = edit::embed(model, filters, out, false, false)?;
    let back = QFilters::from_gguf(out)?.ok_or("the written model has no Q-Filters")?;
    if back.data != embedded.data {
        return Err("the filters read back differ from those embedded".into());
    }
    let [layers, heads, dim] = back.shape();
    println!(
        "{}: {layers} layers x {heads} KV heads x {dim} dims of Q-Filters embedded ({:.0} MB/s)",
        out.display(),
        copied.mb_per_s()
    );
    Ok(())
}
