//! `qfilters filters` (stub: being built).

use clap::Args;

use qfilters::{Error, Result};

#[derive(Args, Debug)]
pub struct FiltersArgs {
    #[command(flatten)]
    pub model: super::ModelArgs,
}

pub fn run(_args: FiltersArgs) -> Result<()> {
    Err(Error::invalid("qfilters filters is not implemented yet"))
}
