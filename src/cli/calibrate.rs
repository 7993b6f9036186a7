//! `qfilters calibrate` (stub: being built).

use clap::Args;

use qfilters::{Error, Result};

#[derive(Args, Debug)]
pub struct CalibrateArgs {
    #[command(flatten)]
    pub model: super::ModelArgs,
}

pub fn run(_args: CalibrateArgs) -> Result<()> {
    Err(Error::invalid("qfilters calibrate is not implemented yet"))
}
