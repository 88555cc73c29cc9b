//! `kvcd daemon`: its arguments; the daemon itself is [`crate::daemon`].

use anyhow::Result;
use clap::Args;

use super::{PathArgs, lock_state};
use crate::config::Overrides;
use crate::daemon::DaemonOptions;
use crate::hooks::unit::Placement;
use crate::kernel::KernelRelease;

/// `kvcd daemon` arguments.
#[derive(Debug, Args)]
pub(super) struct DaemonArgs {
    /// D-Bus address to serve on instead of the system bus (e.g. unix:path=/run/test/bus).
    #[arg(long, value_name = "ADDRESS")]
    bus_address: Option<String>,
    /// Where podman, hooks, ready commands and KVC libraries run: `inline` (children of
    /// the daemon, in its sandbox) or `units` (each in a transient systemd service, outside
    /// it; kvcd.service's way); default inline.
    #[arg(long, value_enum, default_value_t = Placement::Inline)]
    helpers: Placement,
}

/// `kvcd daemon`: reads the configuration once (refusing a broken kvcd.toml), takes the lock, runs.
pub(super) fn main(paths: &PathArgs, args: &DaemonArgs) -> Result<u8> {
    let config = paths.load_strict()?;
    let _lock = lock_state(&config.daemon)?;
    crate::hooks::unit::set_placement(args.helpers);
    let opts = DaemonOptions {
        dirs: paths.dirs(),
        overrides: Overrides {
            state_dir: paths.state_dir.clone(),
            runtime_dir: paths.runtime_dir.clone(),
        },
        bus_address: args.bus_address.clone(),
        kernel: KernelRelease::running()?,
        notify_socket: std::env::var_os("NOTIFY_SOCKET"),
    };
    crate::daemon::main(opts, config)?;
    Ok(0)
}
