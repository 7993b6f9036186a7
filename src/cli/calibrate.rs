//! `qfilters calibrate`: Q-Filters for a GGUF model from plain text, no PyTorch.

use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::Args;
use gguf_tools::filters::{QFilters, META_SAMPLES, META_TOKENS};
use sha2::{Digest, Sha256};

use qfilters::calibrate::{calibrate, CalibrationConfig};
use qfilters::Result;

use super::{read_text, ModelArgs, Progress};

#[derive(Args, Debug)]
pub struct CalibrateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Calibration text (UTF-8); repeat to use several files, read in order.
    #[arg(long = "text", required = true)]
    pub text: Vec<PathBuf>,
    /// Text tokens to run through the model.
    #[arg(long, default_value_t = 16384)]
    pub tokens: usize,
    /// Tokens per independent window (the KV cache is cleared between windows).
    #[arg(long = "seq-len", default_value_t = 2048)]
    pub seq_len: usize,
    /// Query positions sampled per layer.
    #[arg(long, default_value_t = 3000)]
    pub samples: usize,
    /// Seed of the position sampling.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Output: a .safetensors file (config.json is written beside it) or a folder.
    #[arg(short = 'o', long = "output")]
    pub output: PathBuf,
    /// Also write a copy of the model with the filters embedded in its GGUF metadata.
    #[arg(long)]
    pub embed: Option<PathBuf>,
}

pub fn run(args: CalibrateArgs) -> Result<()> {
    let start = Instant::now();
    super::check_cells("--seq-len", args.seq_len)?;
    // Every output is checked before the slow part: writable, not an input, not each other
    // (`-o x.safetensors --embed x.safetensors` would overwrite the filters with the model).
    let mut inputs: Vec<&Path> = vec![&args.model.model];
    inputs.extend(args.text.iter().map(PathBuf::as_path));
    QFilters::check_save(&args.output, &inputs)?;
    if let Some(embed) = &args.embed {
        let [st, config] = QFilters::save_paths(&args.output);
        gguf_tools::safe_io::check_distinct(&[&st, &config, embed])?;
        gguf_tools::safe_io::check_output(embed, &inputs, false)?;
    }
    // Read every input before the slow part, so a typo fails at once.
    let mut texts = Vec::with_capacity(args.text.len());
    for path in &args.text {
        texts.push(read_text(path)?);
    }
    let model = args.model.load()?;
    let mut tokens = Vec::new();
    let mut hasher = Sha256::new();
    for text in &texts {
        if tokens.len() >= args.tokens {
            break;
        }
        hasher.update(text.as_bytes());
        tokens.extend(model.tokenize(text, false, false)?);
    }
    let text_sha256: String = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    // A window longer than the tokens at hand would only allocate cells nobody fills.
    let seq_len = args.seq_len.min(args.tokens.min(tokens.len()).max(2));
    let cfg = CalibrationConfig {
        tokens: args.tokens,
        seq_len,
        samples: args.samples,
        seed: args.seed,
        threads: args.model.threads(),
        ..CalibrationConfig::default()
    };
    let progress = Progress::new(args.tokens.min(tokens.len()), "calibrate");
    let cal = calibrate(&model, &tokens, &cfg, &mut |done, _| progress.set(done));
    progress.finish();
    let cal = cal?;

    let mut filters = QFilters::new(cal.num_layers, cal.num_kv_heads, cal.head_dim, cal.filters)?;
    let model_name = model
        .meta("general.name")
        .unwrap_or_else(|| file_name(&args.model.model));
    for (k, v) in [
        ("model", model_name),
        ("model_file", file_name(&args.model.model)),
        ("text_sha256", text_sha256),
        (META_TOKENS, cal.tokens.to_string()),
        (META_SAMPLES, cal.samples.to_string()),
        ("seed", args.seed.to_string()),
        ("seq_len", seq_len.to_string()),
        ("tool", format!("qfilters {}", env!("CARGO_PKG_VERSION"))),
    ] {
        filters.metadata.insert(k.to_string(), v);
    }
    filters.save(&args.output)?;
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "qfilters: calibrated {} layers × {} KV heads × {} dims on {} tokens ({} samples/layer) in {:.1} s, peak memory {} → {}",
        cal.num_layers,
        cal.num_kv_heads,
        cal.head_dim,
        cal.tokens,
        cal.samples,
        secs,
        peak_memory().unwrap_or_else(|| "unknown".into()),
        args.output.display()
    );
    if cal.tokens < args.tokens {
        eprintln!(
            "qfilters: the text has only {} tokens (asked for {}); give more --text for steadier filters",
            cal.tokens, args.tokens
        );
    }
    if cal.unconverged_heads > 0 {
        eprintln!(
            "qfilters: {} query heads have no clearly dominant direction (power iteration did not settle); their filters are less reliable",
            cal.unconverged_heads
        );
    }
    if let Some(out) = &args.embed {
        use std::io::IsTerminal;
        // --force: the output is a new file, and any filters already in the input model are
        // exactly what this calibration replaces.
        gguf_tools::edit::embed(
            &args.model.model,
            &saved_file(&args.output),
            out,
            true,
            std::io::stderr().is_terminal(),
        )?;
        eprintln!(
            "qfilters: wrote {} with the filters embedded",
            out.display()
        );
    }
    Ok(())
}

/// The .safetensors file `QFilters::save` wrote for `output`.
fn saved_file(output: &Path) -> PathBuf {
    if output.extension().is_some_and(|e| e == "safetensors") {
        output.to_path_buf()
    } else {
        output.join(gguf_tools::filters::DEFAULT_FILE_NAME)
    }
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Peak resident memory of this process (VmHWM), Linux only.
fn peak_memory() -> Option<String> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(format!("{:.0} MiB", kb as f64 / 1024.0))
}
