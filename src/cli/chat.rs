//! `qfilters chat` (stub: being built).

use clap::Args;

use qfilters::{Error, Result};

#[derive(Args, Debug)]
pub struct ChatArgs {
    #[command(flatten)]
    pub model: super::ModelArgs,
}

pub fn run(_args: ChatArgs) -> Result<()> {
    Err(Error::invalid("qfilters chat is not implemented yet"))
}
