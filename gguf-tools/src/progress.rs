//! Byte progress bars on stderr, shown only to a person watching a terminal so logs and
//! pipes stay clean.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressStyle};

pub fn bytes_bar(enabled: bool, total: u64, message: &str) -> ProgressBar {
    if !enabled || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total);
    if let Ok(style) = ProgressStyle::with_template(
        "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(message.to_string());
    bar
}

/// Bytes written and how long it took, for the summary line.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Throughput {
    pub bytes: u64,
    pub seconds: f64,
}

impl Throughput {
    pub fn mb_per_s(&self) -> f64 {
        if self.seconds > 0.0 {
            self.bytes as f64 / 1e6 / self.seconds
        } else {
            0.0
        }
    }

    pub fn summary(&self) -> String {
        format!(
            "{:.1} MB in {:.2} s, {:.0} MB/s",
            self.bytes as f64 / 1e6,
            self.seconds,
            self.mb_per_s()
        )
    }
}
