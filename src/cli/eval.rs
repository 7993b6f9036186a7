//! `qfilters eval` (stub: being built).

use clap::Args;

use qfilters::{Error, Result};

#[derive(Args, Debug)]
pub struct EvalArgs {
    #[command(flatten)]
    pub model: super::ModelArgs,
}

pub fn run(_args: EvalArgs) -> Result<()> {
    Err(Error::invalid("qfilters eval is not implemented yet"))
}
