//! `qfilters bench` (stub: being built).

use clap::Args;

use qfilters::{Error, Result};

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: super::ModelArgs,
}

pub fn run(_args: BenchArgs) -> Result<()> {
    Err(Error::invalid("qfilters bench is not implemented yet"))
}
