//! Command-line verbs of `kvcd` and `kvcctl`; the `main.rs` files only call [`kvcd_main`] and [`kvcctl_main`].

mod apply;
mod client;
mod config;
pub mod daemon;
mod import_kvc;
mod prune;
mod publish;
mod signing;
mod wrapper;

use std::path::{Path, PathBuf};

use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::config::{Config, DEFAULT_CONFIG_DIRS, Overrides};

/// Exit code: a module config failed, was busy, or is invalid.
pub const EXIT_FAILED: u8 = 1;
/// Exit code: the command line or the environment is wrong (clap uses 2 as well).
pub const EXIT_USAGE: u8 = 2;
/// Exit code of kvcctl's D-Bus verbs when kvcd (or the bus) cannot be reached.
pub const EXIT_NO_DAEMON: u8 = 3;

/// Where configuration and state live; every verb takes these.
#[derive(Debug, Clone, Args)]
pub struct PathArgs {
    /// A configuration directory (repeatable, lowest precedence first); default /usr/lib/kvcd, /run/kvcd, /etc/kvcd.
    #[arg(long = "config-dir", value_name = "DIR", global = true)]
    pub config_dirs: Vec<PathBuf>,
    /// State directory (stored module files, image extractions); default from kvcd.toml, else /var/lib/kvcd.
    #[arg(long, value_name = "DIR", global = true)]
    pub state_dir: Option<PathBuf>,
    /// Runtime directory (what kvcd loaded); default from kvcd.toml, else /run/kvcd.
    #[arg(long, value_name = "DIR", global = true)]
    pub runtime_dir: Option<PathBuf>,
}

impl PathArgs {
    /// The configuration directories in effect.
    pub fn dirs(&self) -> Vec<PathBuf> {
        if self.config_dirs.is_empty() {
            DEFAULT_CONFIG_DIRS.iter().map(PathBuf::from).collect()
        } else {
            self.config_dirs.clone()
        }
    }

    /// Loads the configuration; fails when `kvcd.toml` (or anything outside the module configs) is broken.
    pub fn load_strict(&self) -> anyhow::Result<Config> {
        let config = self.load();
        if !config.errors.is_empty() {
            for e in &config.errors {
                eprintln!("{e}");
            }
            anyhow::bail!("the configuration has errors outside the module configs (see above)");
        }
        Ok(config)
    }

    /// Loads the configuration with the command-line overrides applied; a
    /// `--config-dir` that is not a directory is an error in `Config::errors`.
    pub fn load(&self) -> Config {
        let overrides = Overrides {
            state_dir: self.state_dir.clone(),
            runtime_dir: self.runtime_dir.clone(),
        };
        if self.config_dirs.is_empty() {
            Config::load(&self.dirs(), &overrides)
        } else {
            Config::load_named(&self.config_dirs, &overrides)
        }
    }
}

#[derive(Debug, Parser)]
#[command(
    name = "kvcd",
    version,
    about = "Loads out-of-tree kernel modules from driver packages"
)]
struct KvcdCli {
    #[command(flatten)]
    paths: PathArgs,
    /// Log progress to stderr (repeat for debug); KVCD_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: KvcdCommand,
}

#[derive(Debug, Subcommand)]
enum KvcdCommand {
    /// Apply module configs once, in the foreground, without D-Bus.
    Apply(apply::ApplyArgs),
    /// Remove artifacts of old kernels and of module configs that are gone.
    Prune(prune::PruneArgs),
    /// Prepare artifacts for installed kernels that are not running (before a reboot into them).
    PrepareNext(apply::PrepareNextArgs),
    /// Build (or take from local storage), verify and push driver images for a list of kernels, skipping tags the registry has.
    Publish(publish::PublishArgs),
    /// Show the signing key of kvcd.toml and whether the running kernel trusts it (exit 1 when signed modules would be refused).
    Signing(signing::SigningArgs),
    /// Run the agent: D-Bus service, config watcher, retries (what kvcd.service runs).
    Daemon(daemon::DaemonArgs),
}

#[derive(Debug, Parser)]
#[command(name = "kvcctl", version, about = "Inspects and controls kvcd")]
struct KvcctlCli {
    #[command(flatten)]
    paths: PathArgs,
    #[command(flatten)]
    bus: client::BusArgs,
    #[command(subcommand)]
    command: KvcctlCommand,
}

#[derive(Debug, Subcommand)]
enum KvcctlCommand {
    #[command(flatten)]
    Client(client::ClientCommand),
    /// Work with configuration files offline.
    #[command(subcommand)]
    Config(config::ConfigCommand),
    /// Convert kmods-via-containers configs (/etc/kvc/NAME.conf) into module configs.
    ImportKvc(import_kvc::ImportKvcArgs),
    /// Run TOOL from a module config's driver image on the host (as KVC's wrapper did).
    Wrapper(wrapper::WrapperArgs),
    /// Write DIR/TOOL, a shim that runs `kvcctl wrapper NAME TOOL`.
    InstallWrapper(wrapper::InstallArgs),
}

/// Takes kvcd's lock on the state and runtime directories, waiting for another kvcd that holds it.
fn lock_state(settings: &crate::config::DaemonSettings) -> anyhow::Result<crate::state::Lock> {
    crate::state::Layout::from_settings(settings).lock()
}

/// Set when a `kvcd` verb's output goes to the journal natively (see [`init_logging`]).
static STEPS_TO_JOURNAL: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// True when stdout is the journal stream systemd gave this process (`JOURNAL_STREAM` names its device and inode).
fn stdout_is_journal() -> bool {
    use std::os::fd::AsFd as _;
    let Some((dev, ino)) = std::env::var("JOURNAL_STREAM")
        .ok()
        .and_then(|v| v.split_once(':').map(|(d, i)| (d.to_owned(), i.to_owned())))
    else {
        return false;
    };
    nix::sys::stat::fstat(std::io::stdout().as_fd())
        .is_ok_and(|st| st.st_dev.to_string() == dev && st.st_ino.to_string() == ino)
}

/// True when a `kvcd` verb logs its steps to the journal with `KVCD_*` fields
/// instead of printing them (its stdout is the journal, as under a unit).
fn steps_to_journal() -> bool {
    STEPS_TO_JOURNAL.load(std::sync::atomic::Ordering::Relaxed)
}

/// Prints a result `line` about module config `module` on `kernel`; when the
/// verb's output is the journal, logs it there with their `KVCD_*` fields instead.
pub(super) fn print_result(module: &str, kernel: &str, line: &str) {
    if steps_to_journal() {
        tracing::info!(KVCD_MODULE = %module, KVCD_KERNEL = %kernel, "{line}");
    } else {
        println!("{line}");
    }
}

/// Logging: `KVCD_LOG` or `RUST_LOG` if set, else by `-v` (the daemon logs at info by default).
/// The daemon writes to the journal, with `KVCD_*` fields, when the journal socket exists;
/// so does a `kvcd` verb (`steps`) whose stdout is the journal (a unit's
/// `kvcd prepare-next`): its step lines then carry the fields too.
fn init_logging(verbose: u8, daemon: bool, steps: bool) {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let native = daemon || (steps && stdout_is_journal());
    let journal = (native && Path::new("/run/systemd/journal/socket").exists())
        .then(|| tracing_journald::layer().ok())
        .flatten()
        .map(|l| {
            l.with_field_prefix(None)
                .with_syslog_identifier("kvcd".to_owned())
        });
    let default = match (verbose, daemon || journal.is_some()) {
        (0, false) => "off",
        (0, true) | (1, _) => "kvcd=info",
        _ => "kvcd=debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("KVCD_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_env("RUST_LOG"))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let registry = tracing_subscriber::registry().with(filter);
    let _ = match journal {
        Some(j) => {
            STEPS_TO_JOURNAL.store(!daemon, std::sync::atomic::Ordering::Relaxed);
            registry.with(j).try_init()
        }
        None => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
            )
            .try_init(),
    };
}

/// Lets a closed pipe end the process quietly, as for any Unix filter (`kvcctl … | head`).
fn default_sigpipe() {
    // SAFETY: restoring the default disposition of SIGPIPE before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// `kvcd` entry point.
pub fn kvcd_main() -> ExitCode {
    default_sigpipe();
    let cli = KvcdCli::parse();
    let daemon = matches!(cli.command, KvcdCommand::Daemon(_));
    init_logging(cli.verbose, daemon, !daemon);
    let result = match cli.command {
        KvcdCommand::Apply(args) => apply::run(&cli.paths, &args),
        KvcdCommand::Prune(args) => prune::run(&cli.paths, &args),
        KvcdCommand::PrepareNext(args) => apply::prepare_next(&cli.paths, &args),
        KvcdCommand::Publish(args) => publish::run(&cli.paths, &args),
        KvcdCommand::Signing(args) => signing::run(&cli.paths, &args),
        KvcdCommand::Daemon(args) => daemon::main(&cli.paths, &args),
    };
    finish(result)
}

/// `kvcctl` entry point.
pub fn kvcctl_main() -> ExitCode {
    default_sigpipe();
    let cli = KvcctlCli::parse();
    init_logging(0, false, false);
    let result = match cli.command {
        KvcctlCommand::Config(cmd) => config::run(&cli.paths, &cmd),
        KvcctlCommand::Client(cmd) => client::run(&cli.bus, &cmd),
        KvcctlCommand::ImportKvc(args) => import_kvc::run(&cli.paths, &args),
        KvcctlCommand::Wrapper(args) => wrapper::run(&cli.paths, &args),
        KvcctlCommand::InstallWrapper(args) => wrapper::install(&cli.paths, &args),
    };
    finish(result)
}

fn finish(result: anyhow::Result<u8>) -> ExitCode {
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(EXIT_USAGE)
        }
    }
}
