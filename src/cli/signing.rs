//! `kvcd signing`: the signing key of kvcd.toml and whether the running kernel trusts it.

use anyhow::Result;
use clap::Args;

use super::{EXIT_FAILED, PathArgs};
use crate::signing::SigningStatus;

/// Arguments of `kvcd signing`.
#[derive(Debug, Args)]
pub(super) struct SigningArgs {
    /// Print the status as JSON.
    #[arg(long)]
    json: bool,
}

/// Prints the signing status; exit 1 when `[signing]` is set but its key
/// cannot be used, or the kernel enforces signatures and does not trust it.
pub(super) fn run(paths: &PathArgs, args: &SigningArgs) -> Result<u8> {
    let config = paths.load_strict()?;
    let status = SigningStatus::read(config.daemon.signing.as_ref());
    if args.json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        for l in SigningStatus::lines_of(&status.wire()) {
            println!("{l}");
        }
    }
    Ok(if status.will_fail() { EXIT_FAILED } else { 0 })
}
