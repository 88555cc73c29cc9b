//! The daemon put together: the agent, its D-Bus objects, the config
//! watcher, signals and systemd notifications (`kvcd daemon` only parses its
//! arguments and calls [`main`]).

use std::collections::{BTreeSet, HashMap};
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use tracing::{info, warn};

use crate::config::{Changes, Config, DaemonSettings, Overrides};
use crate::kernel::KernelRelease;
use crate::reconciler::agent::{Agent, Handle, KmodsFactory, Request};
use crate::reconciler::status::Snapshot;

/// What a daemon needs to run.
#[derive(Debug, Clone)]
pub struct DaemonOptions {
    /// Configuration directories, lowest precedence first.
    pub dirs: Vec<PathBuf>,
    /// `--state-dir` / `--runtime-dir`.
    pub overrides: Overrides,
    /// The bus to serve on; `None` for the system bus.
    pub bus_address: Option<String>,
    /// The running kernel.
    pub kernel: KernelRelease,
    /// systemd's notification socket (`$NOTIFY_SOCKET`); `None` sends no notifications.
    pub notify_socket: Option<OsString>,
}

/// Sends `msg` to systemd's notification socket `socket`, when there is one.
pub fn sd_notify(socket: Option<&OsStr>, msg: &str) {
    let Some(path) = socket else {
        return;
    };
    let Ok(sock) = std::os::unix::net::UnixDatagram::unbound() else {
        return;
    };
    let path = path.to_string_lossy().into_owned();
    let result = if let Some(name) = path.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt as _;
        std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
            .and_then(|a| sock.send_to_addr(msg.as_bytes(), &a))
    } else {
        sock.send_to(msg.as_bytes(), &path)
    };
    if let Err(e) = result {
        warn!("sd_notify to {path} failed: {e}");
    }
}

/// Half the watchdog interval systemd asked for (`WATCHDOG_USEC`), if it did.
fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Some(pid) = std::env::var("WATCHDOG_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
    {
        if pid != std::process::id() {
            return None;
        }
    }
    Some(Duration::from_micros(usec / 2))
}

/// How long a burst of file events must be quiet before the agent hears of it
/// (an editor's save is several events).
const SETTLE_QUIET: Duration = Duration::from_millis(25);
/// The longest the agent waits to hear of a change while events keep coming.
const SETTLE_MAX: Duration = Duration::from_millis(250);

/// What a watched directory is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Watched {
    /// A configuration directory (holding `kvcd.toml` and `modules.d/`).
    ConfigDir,
    /// A `modules.d/`.
    ModulesDir,
}

/// What one inotify event about `name` in a watched directory (its path and
/// what it is; `None` when the watch is not known) changed of what the
/// configuration reads.
fn changed_by(
    watched: Option<(&Path, Watched)>,
    name: Option<&OsStr>,
    mask: inotify::EventMask,
) -> Option<Changes> {
    use inotify::EventMask;
    // Events were lost, or a watched directory went away: read everything.
    if mask.intersects(EventMask::Q_OVERFLOW | EventMask::IGNORED) {
        return Some(Changes::All);
    }
    // The directory itself, or a watch we do not know.
    let (Some((dir, kind)), Some(name)) = (watched, name) else {
        return Some(Changes::All);
    };
    let text = name.to_string_lossy();
    match kind {
        // kvcd.toml or modules.d/ itself: the daemon settings, or every module config.
        Watched::ConfigDir => (text == "kvcd.toml" || text == "modules.d").then_some(Changes::All),
        // What the configuration reads of modules.d/ (see `merge::list_toml`).
        Watched::ModulesDir => (!text.starts_with('.') && text.ends_with(".toml"))
            .then(|| Changes::Files(BTreeSet::from([dir.join(name)]))),
    }
}

/// Watches the configuration directories (and their `modules.d/`) and tells
/// the agent which files changed, once a burst of events has been quiet for
/// [`SETTLE_QUIET`] (or after [`SETTLE_MAX`] of constant events).
fn watch_config(dirs: Vec<PathBuf>, handle: Handle) -> Result<()> {
    use inotify::{Inotify, WatchDescriptor, WatchMask};
    use std::os::fd::AsFd as _;
    let mut inotify = Inotify::init().context("inotify_init")?;
    let mask = WatchMask::CREATE
        | WatchMask::DELETE
        | WatchMask::CLOSE_WRITE
        | WatchMask::MOVED_TO
        | WatchMask::MOVED_FROM
        | WatchMask::ATTRIB;
    let mut watched: HashMap<WatchDescriptor, (PathBuf, Watched)> = HashMap::new();
    let add = move |inotify: &mut Inotify, watched: &mut HashMap<_, _>| {
        for d in &dirs {
            for (p, kind) in [
                (d.clone(), Watched::ConfigDir),
                (d.join("modules.d"), Watched::ModulesDir),
            ] {
                if p.is_dir() {
                    if let Ok(wd) = inotify.watches().add(&p, mask) {
                        watched.insert(wd, (p, kind));
                    }
                }
            }
        }
    };
    add(&mut inotify, &mut watched);
    let readable = |inotify: &Inotify, wait: Duration| {
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        let timeout = PollTimeout::try_from(wait).unwrap_or(PollTimeout::MAX);
        let mut fds = [PollFd::new(inotify.as_fd(), PollFlags::POLLIN)];
        poll(&mut fds, timeout).is_ok_and(|n| n > 0)
    };
    std::thread::Builder::new()
        .name("kvcd-inotify".to_owned())
        .spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                let mut changes: Option<Changes> = None;
                let mut note =
                    |events: inotify::Events<'_>,
                     watched: &HashMap<WatchDescriptor, (PathBuf, Watched)>| {
                        for ev in events {
                            let w = watched.get(&ev.wd).map(|(p, k)| (p.as_path(), *k));
                            if let Some(c) = changed_by(w, ev.name, ev.mask) {
                                match &mut changes {
                                    Some(all) => all.add(c),
                                    None => changes = Some(c),
                                }
                            }
                        }
                    };
                match inotify.read_events_blocking(&mut buf) {
                    Ok(events) => note(events, &watched),
                    Err(e) => {
                        warn!("config watch stopped: {e}");
                        return;
                    }
                }
                // Editors write several events per save: wait for quiet, not forever.
                let first = Instant::now();
                loop {
                    let left = SETTLE_MAX.saturating_sub(first.elapsed());
                    if left.is_zero() || !readable(&inotify, left.min(SETTLE_QUIET)) {
                        break;
                    }
                    match inotify.read_events(&mut buf) {
                        Ok(events) => note(events, &watched),
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        Err(e) => {
                            warn!("config watch stopped: {e}");
                            return;
                        }
                    }
                }
                if changes == Some(Changes::All) {
                    // A directory may have appeared (or come back).
                    watched.clear();
                    add(&mut inotify, &mut watched);
                }
                if let Some(c) = changes {
                    handle.config_changed(c);
                }
            }
        })
        .context("starting the config watcher")?;
    Ok(())
}

/// Sends systemd notifications in the order they are given; `READY=1` only
/// once the snapshot the agent published last is on the bus, so whoever
/// waits for it finds every object.
#[derive(Debug, Clone)]
struct Notifier {
    tx: tokio::sync::mpsc::UnboundedSender<Option<String>>,
}

impl Notifier {
    /// The notifier and its task; `published` is what the agent publishes,
    /// `exported` what the D-Bus side has put on the bus.
    fn start(
        socket: Option<OsString>,
        mut published: tokio::sync::watch::Receiver<Arc<Snapshot>>,
        mut exported: tokio::sync::watch::Receiver<Arc<Snapshot>>,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Option<String>>();
        let task = tokio::spawn(async move {
            while let Some(Some(msg)) = rx.recv().await {
                if msg == "READY=1" {
                    crate::dbus::until_exported(&mut published, &mut exported).await;
                }
                sd_notify(socket.as_deref(), &msg);
            }
        });
        (Self { tx }, task)
    }

    fn send(&self, msg: &str) {
        let _ = self.tx.send(Some(msg.to_owned()));
    }

    /// Ends the task once what was sent before is out.
    fn finish(&self) {
        let _ = self.tx.send(None);
    }
}

/// SIGHUP reloads everything; SIGTERM and SIGINT stop.
async fn signals(handle: Handle, notifier: Notifier) -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    loop {
        tokio::select! {
            _ = hup.recv() => {
                info!("SIGHUP: reloading the configuration");
                notifier.send("RELOADING=1");
                let _ = handle.request(Request::ReloadConfig).await;
                notifier.send("READY=1");
            }
            _ = term.recv() => { info!("SIGTERM: stopping"); handle.shutdown(); }
            _ = int.recv() => { info!("SIGINT: stopping"); handle.shutdown(); }
        }
    }
}

/// Converges from what a killed kvcd left, before the agent starts (on the blocking pool).
async fn recover(settings: &DaemonSettings, kernel: &KernelRelease, factory: &KmodsFactory) {
    let (settings, kernel, factory) = (settings.clone(), kernel.clone(), factory.clone());
    let done = tokio::task::spawn_blocking(move || -> Result<Vec<String>> {
        let kmods = factory()?;
        let engine = crate::reconciler::Engine::from_settings(&settings, &kernel, &*kmods, None);
        Ok(engine.recover(&crate::state::Layout::from_settings(&settings)))
    })
    .await;
    match done {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => warn!("recovering after a stop: {e:#}"),
        Err(e) => warn!("recovering after a stop: {e}"),
    }
}

/// Runs the daemon over `config` (read from `opts.dirs` once, at start-up)
/// until SIGTERM/SIGINT or until `stop` completes; `factory` gives the kernel
/// seam (libkmod, or a fake in tests).
pub async fn run(
    opts: DaemonOptions,
    config: Config,
    factory: KmodsFactory,
    stop: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    recover(&config.daemon, &opts.kernel, &factory).await;
    let (agent, handle, status) = Agent::new(
        config,
        opts.dirs.clone(),
        opts.overrides.clone(),
        opts.kernel.clone(),
        factory,
    );
    let conn = match &opts.bus_address {
        Some(a) => zbus::connection::Builder::address(a.as_str())
            .with_context(|| format!("bus address {a}"))?
            .build()
            .await
            .with_context(|| format!("connecting to {a}"))?,
        None => zbus::Connection::system()
            .await
            .context("connecting to the system bus")?,
    };
    let (exported_tx, exported) = tokio::sync::watch::channel(Arc::new(Snapshot::default()));
    let (notifier, notifier_task) =
        Notifier::start(opts.notify_socket.clone(), status.clone(), exported);
    let server = tokio::spawn({
        let conn = conn.clone();
        let handle = handle.clone();
        async move {
            if let Err(e) = crate::dbus::serve(&conn, handle, status, exported_tx).await {
                warn!("D-Bus service stopped: {e}");
            }
        }
    });
    let sig = tokio::spawn(signals(handle.clone(), notifier.clone()));
    let stopper = tokio::spawn({
        let handle = handle.clone();
        async move {
            stop.await;
            handle.shutdown();
        }
    });
    watch_config(opts.dirs.clone(), handle.clone())?;
    // Hotplug for [match]: a device that appears may be one a config waits for.
    let devices = handle.clone();
    if let Err(e) = crate::devices::watch_uevents(move || devices.device_added()) {
        warn!(
            "cannot watch kernel uevents ({e:#}): a device that appears later is seen only at the next config reload"
        );
    }
    let watchdog = watchdog_interval().map(|every| {
        let handle = handle.clone();
        let socket = opts.notify_socket.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                // Only a loop that answers counts as alive.
                if handle.ping().await {
                    sd_notify(socket.as_deref(), "WATCHDOG=1");
                }
            }
        })
    });
    info!(KVCD_KERNEL = %opts.kernel, "kvcd {} starting", env!("CARGO_PKG_VERSION"));
    let mut notify = |m: &str| notifier.send(m);
    let result = agent.run(&mut notify).await;
    // The agent is gone: a READY=1 waiting for the bus waits no more.
    notifier.finish();
    let _ = notifier_task.await;
    sig.abort();
    stopper.abort();
    server.abort();
    if let Some(w) = watchdog {
        w.abort();
    }
    let _ = conn.release_name(crate::dbus::BUS_NAME).await;
    result
}

/// Kills what is left of the processes the daemon started (a pull, a build or
/// a hook abandoned at the stop timeout), each with its process group.
fn end_children() {
    use nix::sys::signal::{Signal, kill, killpg};
    use nix::unistd::Pid;
    let me = std::process::id().to_string();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return;
    };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|p| p.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // After the command name, which may hold spaces: state, ppid, pgrp.
        let mut rest = stat
            .rsplit_once(')')
            .map_or("", |(_, r)| r)
            .split_whitespace();
        let (ppid, pgrp) = (rest.nth(1), rest.next());
        if ppid != Some(me.as_str()) {
            continue;
        }
        warn!("killing process {pid} (and its process group), abandoned at stop");
        if pgrp == Some(pid.to_string().as_str()) {
            let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
        } else {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

/// Runs the daemon on the real kernel (libkmod) over `config` until it is
/// stopped, then ends what abandoned steps left running.
pub fn main(opts: DaemonOptions, config: Config) -> Result<()> {
    // One thread is enough for the agent and D-Bus: everything that blocks
    // (libkmod, podman, hooks, reading the configuration) runs on the
    // blocking pool, and the config watcher has its own thread.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let factory: KmodsFactory = Arc::new(crate::kmod::open);
    let result = rt.block_on(run(opts, config, factory, std::future::pending()));
    // Steps abandoned at the stop timeout must not hold the process, nor
    // outlive it.
    end_children();
    rt.shutdown_timeout(Duration::from_secs(1));
    result
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::ffi::OsStr;
    use std::path::{Path, PathBuf};

    use inotify::EventMask;

    use super::{Watched, changed_by};
    use crate::config::Changes;

    #[test]
    fn events_name_the_module_config_files_they_touch() {
        let md = Path::new("/etc/kvcd/modules.d");
        let etc = Path::new("/etc/kvcd");
        let modules = Some((md, Watched::ModulesDir));
        let config = Some((etc, Watched::ConfigDir));
        let name = |n: &'static str| Some(OsStr::new(n));
        assert_eq!(
            changed_by(modules, name("a.toml"), EventMask::CLOSE_WRITE),
            Some(Changes::Files(BTreeSet::from([PathBuf::from(
                "/etc/kvcd/modules.d/a.toml"
            )])))
        );
        assert_eq!(
            changed_by(modules, name("a.toml"), EventMask::MOVED_FROM),
            Some(Changes::Files(BTreeSet::from([md.join("a.toml")])))
        );
        // What the configuration never reads: editor files, hidden files.
        for n in [".a.toml.swp", "a.toml~", "a.tmp", ".a.toml"] {
            assert_eq!(changed_by(modules, name(n), EventMask::CREATE), None, "{n}");
        }
        // kvcd.toml and modules.d/ itself: everything.
        assert_eq!(
            changed_by(config, name("kvcd.toml"), EventMask::CLOSE_WRITE),
            Some(Changes::All)
        );
        assert_eq!(
            changed_by(config, name("modules.d"), EventMask::CREATE),
            Some(Changes::All)
        );
        assert_eq!(
            changed_by(config, name("notes.txt"), EventMask::CREATE),
            None
        );
        // Lost events, a directory gone, an unknown watch: everything.
        assert_eq!(
            changed_by(None, None, EventMask::Q_OVERFLOW),
            Some(Changes::All)
        );
        assert_eq!(
            changed_by(modules, None, EventMask::IGNORED),
            Some(Changes::All)
        );
        assert_eq!(
            changed_by(None, name("a.toml"), EventMask::CREATE),
            Some(Changes::All)
        );
    }
}
