//! The agent behind `kvcd daemon`: one task owns all state. Events come in
//! (requests from D-Bus, config changes, signals, retry timers, progress and
//! results of work) and move each module config's [`machine::Module`]; the
//! agent executes the effects the machine names (queue and run work, arm a
//! retry, save the desired state, forget a config) and publishes the status
//! derived from the models as a [`Snapshot`] on a `watch` channel.
//!
//! Nothing blocks the loop: work (libkmod, podman, hooks), preparing other
//! kernels, reading the configuration, the runtime records and
//! `RUNTIME/desired.json`, and saving it, all run on the blocking pool. Work
//! and preparations share `max_parallel` and `after` ordering is respected.
//! What the admin wants loaded is kept in `desired.json`, so a restarted
//! agent converges to it, adopting what is already loaded without inserting
//! it again.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Result;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use super::machine::{self, Ctx, Effect, Module, Operation, Ran, Refused, Status};
use super::next::{self, NextReport, Readiness};
use super::status::{NextKernelWire, Snapshot, next_wire};
use super::{Engine, Outcome, RecordStore, Step, StepLog};
use crate::config::{Changes, Config, ConfigCache, DaemonSettings, ModuleConfig, Overrides};
use crate::kernel::KernelRelease;
use crate::kmod::KernelModules;
use crate::state::desired;
use crate::util::unix_now;

/// Makes a handle to the running kernel's modules for one piece of work.
pub type KmodsFactory = Arc<dyn Fn() -> Result<Box<dyn KernelModules>> + Send + Sync>;

/// Why a request was refused (mapped to stable D-Bus error names).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AgentError {
    /// No module config by that name.
    #[error("no module config named {0:?}")]
    NotFound(String),
    /// Its file is invalid and there is no earlier good version.
    #[error("{0}")]
    InvalidConfig(String),
    /// The agent is stopping.
    #[error("kvcd is shutting down")]
    ShuttingDown,
}

/// What callers can ask of the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Want it loaded, and load it.
    Load(String),
    /// Want it unloaded, and unload it.
    Unload(String),
    /// Unload, drop the cached extraction, load again.
    Reload(String),
    /// Re-read every configuration file.
    ReloadConfig,
    /// Fetch and verify every valid config for another kernel.
    Prepare(String),
}

type Reply = oneshot::Sender<Result<u64, AgentError>>;

/// The answer to a next-kernels request: the report as JSON.
type NextReply = oneshot::Sender<Result<String, AgentError>>;

/// A request about the kernels the node may boot next.
struct NextJob {
    /// Where to look for kernels.
    sysroot: PathBuf,
    /// Configs to work on; empty: the wanted ones (every valid one when none is wanted).
    names: Vec<String>,
    /// Prepare, or only check readiness.
    prepare: bool,
    reply: Option<NextReply>,
}

enum Event {
    Request(Request, Reply),
    Next(NextJob),
    ConfigChanged(Changes),
    ConfigRead(Box<Config>),
    Progress(String, Step),
    Done {
        name: String,
        op: Operation,
        seq: u64,
        ran: Ran,
        outcome: Box<Outcome>,
        /// How long the operation took, in seconds.
        seconds: f64,
    },
    Prepared,
    /// A readiness check or prepare of the next kernels finished.
    NextDone {
        report: Box<NextReport>,
        prepared: bool,
        reply: Option<NextReply>,
    },
    Ping(oneshot::Sender<()>),
    /// A device was added or bound (a kernel uevent).
    DeviceAdded,
    Shutdown,
}

/// The sending side, for D-Bus adapters, signal handlers and the config watcher.
#[derive(Debug, Clone)]
pub struct Handle {
    tx: mpsc::UnboundedSender<Event>,
}

impl std::fmt::Debug for Event {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Event")
    }
}

impl Handle {
    /// Sends `req`; the answer is the sequence number of the operation it
    /// queued (or of the last one, when nothing needed doing).
    pub async fn request(&self, req: Request) -> Result<u64, AgentError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Event::Request(req, tx))
            .map_err(|_| AgentError::ShuttingDown)?;
        rx.await.map_err(|_| AgentError::ShuttingDown)?
    }

    /// Finds the kernels the node may boot next under `sysroot`, prepares
    /// `names` (the wanted configs when empty) for them when `prepare`, and
    /// answers with the readiness report as JSON once done.
    pub async fn next(
        &self,
        sysroot: PathBuf,
        names: Vec<String>,
        prepare: bool,
    ) -> Result<String, AgentError> {
        let (tx, rx) = oneshot::channel();
        let job = NextJob {
            sysroot,
            names,
            prepare,
            reply: Some(tx),
        };
        self.tx
            .send(Event::Next(job))
            .map_err(|_| AgentError::ShuttingDown)?;
        rx.await.map_err(|_| AgentError::ShuttingDown)?
    }

    /// The configuration files changed (`changes` says which).
    pub fn config_changed(&self, changes: Changes) {
        let _ = self.tx.send(Event::ConfigChanged(changes));
    }

    /// A device appeared: wanted configs that had no matching device are loaded if one matches now.
    pub fn device_added(&self) {
        let _ = self.tx.send(Event::DeviceAdded);
    }

    /// Stop: finish what runs, start nothing new (unload first if configured).
    pub fn shutdown(&self) {
        let _ = self.tx.send(Event::Shutdown);
    }

    /// Answers once the agent's loop has handled it (for the watchdog).
    pub async fn ping(&self) -> bool {
        let (tx, rx) = oneshot::channel();
        self.tx.send(Event::Ping(tx)).is_ok() && rx.await.is_ok()
    }
}

/// Reads `desired.json` (blocking); empty when absent or unreadable (said in the log).
fn read_desired(path: &std::path::Path) -> BTreeSet<String> {
    match desired::read(path) {
        Ok(d) => d.wanted,
        Err(e) => {
            warn!("{e:#}; starting with nothing wanted");
            BTreeSet::new()
        }
    }
}

/// Saves `desired.json` on the blocking pool, newest state last.
struct DesiredStore {
    path: PathBuf,
    /// The generation last written (a save older than it is skipped).
    written: Arc<Mutex<u64>>,
    generation: u64,
    saves: JoinSet<()>,
}

impl DesiredStore {
    fn new(layout: &crate::state::Layout) -> Self {
        Self {
            path: layout.desired(),
            written: Arc::new(Mutex::new(0)),
            generation: 0,
            saves: JoinSet::new(),
        }
    }

    fn save(&mut self, wanted: BTreeSet<String>) {
        while self.saves.try_join_next().is_some() {}
        self.generation += 1;
        let generation = self.generation;
        let (path, written) = (self.path.clone(), self.written.clone());
        self.saves.spawn_blocking(move || {
            let mut last = written
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if *last > generation {
                return;
            }
            let result = desired::write(&path, &desired::Desired { wanted });
            match result {
                Ok(()) => *last = generation,
                Err(e) => warn!("cannot save desired state: {e:#}"),
            }
        });
    }

    /// Waits for the saves under way.
    async fn flush(&mut self) {
        while self.saves.join_next().await.is_some() {}
    }
}

struct Entry {
    model: Module,
    /// The last good config.
    config: Option<ModuleConfig>,
    /// When the retry the model waits for fires.
    retry_at: Option<Instant>,
    /// A device was added while this config was not waiting for one (an
    /// operation under way may have looked before it appeared): look again
    /// if that operation ends without a matching device.
    devices_dirty: bool,
}

/// What start-up found on disk and in the kernel for one module config.
struct Found {
    recorded: bool,
    live: Option<(u64, Vec<String>)>,
}

/// The agent. Build it with [`Agent::new`], run it with [`Agent::run`].
pub struct Agent {
    dirs: Vec<PathBuf>,
    overrides: Overrides,
    settings: DaemonSettings,
    kernel: KernelRelease,
    factory: KmodsFactory,
    /// The configuration read at start-up, applied when the loop starts.
    initial: Option<Config>,
    entries: BTreeMap<String, Entry>,
    errors: Vec<String>,
    tx: mpsc::UnboundedSender<Event>,
    rx: mpsc::UnboundedReceiver<Event>,
    status: watch::Sender<Arc<Snapshot>>,
    seq: u64,
    /// Work and preparations under way.
    running: usize,
    /// Kernels waiting to be prepared.
    prepares: VecDeque<KernelRelease>,
    /// Tells preparations under way to stop after the config at hand.
    cancel: Arc<AtomicBool>,
    /// Replies to `ReloadConfig`, sent once the configuration is read and applied.
    reload_replies: Vec<Reply>,
    /// Replies due once the next snapshot is published.
    after_publish: Vec<Reply>,
    /// A read of the configuration is under way; `Some(Some(changes))` when
    /// another must follow it, for what changed meanwhile.
    reading: Option<Option<Changes>>,
    /// The module config files as last read, so a change re-reads only its files.
    config_cache: Arc<Mutex<ConfigCache>>,
    desired: DesiredStore,
    save_needed: bool,
    /// Set once the agent is stopping: when it stops waiting for running steps.
    stop_deadline: Option<Instant>,
    ready: bool,
    last_summary: String,
    /// Next-kernel requests waiting; one runs at a time.
    next_jobs: VecDeque<NextJob>,
    next_running: bool,
    /// The last readiness report, as published.
    next: Vec<NextKernelWire>,
    /// The last prepare's error per (kernel, config), until one succeeds.
    next_failures: BTreeMap<(String, String), String>,
    /// Next-kernel answers due once the next snapshot is published.
    after_publish_next: Vec<(NextReply, Result<String, AgentError>)>,
    /// The signing status, read when the configuration is.
    signing: BTreeMap<String, String>,
    /// What the metrics count since start.
    counters: crate::metrics::Counters,
    /// The metrics file (`[metrics] textfile`), if any.
    textfile: Option<crate::metrics::Textfile>,
    /// Set when the counters changed since the metrics were last written.
    counted: bool,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("kernel", &self.kernel)
            .finish_non_exhaustive()
    }
}

impl Agent {
    /// An agent over `config` (read from `dirs`, and read from them again on
    /// every reload), for the running `kernel`.
    pub fn new(
        config: Config,
        dirs: Vec<PathBuf>,
        overrides: Overrides,
        kernel: KernelRelease,
        factory: KmodsFactory,
    ) -> (Self, Handle, watch::Receiver<Arc<Snapshot>>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let (status, status_rx) = watch::channel(Arc::new(Snapshot::default()));
        let settings = config.daemon.clone();
        let config_cache = Arc::new(Mutex::new(ConfigCache::seeded(&config)));
        let agent = Self {
            dirs,
            overrides,
            desired: DesiredStore::new(&crate::state::Layout::from_settings(&settings)),
            settings,
            kernel,
            factory,
            initial: Some(config),
            entries: BTreeMap::new(),
            errors: Vec::new(),
            tx: tx.clone(),
            rx,
            status,
            seq: 0,
            running: 0,
            prepares: VecDeque::new(),
            cancel: Arc::new(AtomicBool::new(false)),
            reload_replies: Vec::new(),
            after_publish: Vec::new(),
            reading: None,
            config_cache,
            save_needed: false,
            stop_deadline: None,
            ready: false,
            last_summary: String::new(),
            next_jobs: VecDeque::new(),
            next_running: false,
            next: Vec::new(),
            after_publish_next: Vec::new(),
            next_failures: BTreeMap::new(),
            signing: BTreeMap::new(),
            counters: crate::metrics::Counters::default(),
            textfile: None,
            counted: false,
        };
        (agent, Handle { tx }, status_rx)
    }

    /// Applies `ev` to the model of `name` and executes the effects; returns the answer to a request.
    fn apply(&mut self, name: &str, ev: machine::Event) -> Result<Option<u64>, Refused> {
        let (base, max) = (
            self.settings.retry_base_seconds,
            self.settings.retry_max_seconds,
        );
        let Some(e) = self.entries.get_mut(name) else {
            return Err(Refused::NotFound);
        };
        let ctx = Ctx {
            now: unix_now(),
            retry_delay: backoff(base, max, e.model.attempts),
        };
        let what = ev.name();
        let (model, effects) = machine::transition(&e.model, ev, &ctx)?;
        e.model = model;
        if e.model.retry.is_none() {
            e.retry_at = None;
        }
        debug!(KVCD_MODULE = %name, "{what}: {} {effects:?}", e.model.status);
        let mut answer = None;
        for fx in effects {
            match fx {
                Effect::Answer(seq) => answer = Some(seq),
                Effect::Queued(_, seq) => self.seq = self.seq.max(seq),
                Effect::Run(op, seq) => self.run_work(name, op, seq),
                Effect::ArmRetry(delay) => {
                    if let Some(e) = self.entries.get_mut(name) {
                        e.retry_at = Some(Instant::now() + delay);
                    }
                    info!(KVCD_MODULE = %name, "retrying in {}s", delay.as_secs());
                }
                Effect::SaveDesired => self.save_needed = true,
                Effect::Forget => {
                    self.entries.remove(name);
                }
            }
        }
        Ok(answer)
    }

    /// The number the next queued operation gets.
    fn next_seq(&self) -> u64 {
        self.seq + 1
    }

    /// Reads the configuration on the blocking pool, again only the files
    /// `changes` names; [`Event::ConfigRead`] brings it back. While a read is
    /// under way, what changed is kept for the read that follows it.
    fn read_config(&mut self, changes: Changes) {
        if let Some(again) = self.reading.as_mut() {
            match again {
                Some(c) => c.add(changes),
                None => *again = Some(changes),
            }
            return;
        }
        self.reading = Some(None);
        let (dirs, overrides, tx) = (self.dirs.clone(), self.overrides.clone(), self.tx.clone());
        let cache = self.config_cache.clone();
        tokio::task::spawn_blocking(move || {
            let mut cache = cache
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let config = Config::load_cached(&dirs, &overrides, &mut cache, &changes);
            drop(cache);
            let _ = tx.send(Event::ConfigRead(Box::new(config)));
        });
    }

    /// A configuration was read: apply it, read again if asked meanwhile, else answer who waited.
    fn config_read(&mut self, config: Config) {
        self.apply_config(config, &BTreeSet::new());
        self.check_next();
        if let Some(changes) = self.reading.take().flatten() {
            self.read_config(changes);
        } else {
            // Answered once the snapshot showing the new configuration is out.
            self.after_publish.append(&mut self.reload_replies);
        }
    }

    /// Works out what changed in `config`; new configs are wanted when `desired` names them.
    fn apply_config(&mut self, config: Config, desired: &BTreeSet<String>) {
        self.settings = config.daemon.clone();
        self.signing = crate::signing::SigningStatus::read(self.settings.signing.as_ref()).wire();
        if self.textfile.as_ref().map(|t| t.path()) != self.settings.metrics_textfile.as_deref() {
            self.textfile = self
                .settings
                .metrics_textfile
                .clone()
                .map(crate::metrics::Textfile::new);
            self.counted = true;
        }
        self.errors = config.errors.iter().map(ToString::to_string).collect();
        let now = unix_now();
        let present: BTreeSet<String> = config.modules.keys().cloned().collect();
        for (name, me) in config.modules {
            let file = me.file.display().to_string();
            let read = me
                .result
                .as_ref()
                .map(|c| (c.digest.clone(), module_names(c)))
                .map_err(|errs| crate::config::join_errors(errs));
            let good = me.result.ok();
            let Some(e) = self.entries.get_mut(&name) else {
                let model = Module::new(file, read, desired.contains(&name), now);
                let entry = Entry {
                    model,
                    config: good,
                    retry_at: None,
                    devices_dirty: false,
                };
                self.entries.insert(name, entry);
                continue;
            };
            if good.is_some() {
                e.config.clone_from(&good);
            }
            let ev = match read {
                Ok((digest, modules)) => machine::Event::ConfigChanged {
                    file,
                    digest,
                    modules,
                    seq: self.next_seq(),
                },
                Err(error) => {
                    warn!(KVCD_MODULE = %name, "invalid configuration: {error}");
                    machine::Event::ConfigInvalid { file, error }
                }
            };
            let before = self.seq;
            match self.apply(&name, ev) {
                Ok(_) if self.seq > before => info!(KVCD_MODULE = %name, "configuration changed"),
                Ok(_) => {}
                Err(r) => warn!(KVCD_MODULE = %name, "configuration not taken: {r}"),
            }
        }
        let gone: Vec<String> = self
            .entries
            .iter()
            .filter(|(n, e)| !e.model.removed && !present.contains(*n))
            .map(|(n, _)| n.clone())
            .collect();
        for name in gone {
            if let Some(e) = self.entries.get_mut(&name) {
                e.config = None;
            }
            let ev = machine::Event::ConfigRemoved {
                seq: self.next_seq(),
            };
            match self.apply(&name, ev) {
                Ok(_) if self.entries.contains_key(&name) => {
                    info!(KVCD_MODULE = %name, "configuration removed; unloading");
                }
                Ok(_) => info!(KVCD_MODULE = %name, "configuration removed"),
                Err(r) => warn!(KVCD_MODULE = %name, "removal not taken: {r}"),
            }
        }
        // A reload looks for devices again too (a device added while no uevent could be read).
        self.devices_changed();
        self.save_needed = true;
    }

    /// Start-up: the configuration read before, the desired state from the
    /// runtime dir, the truth from the records and the kernel (read on the
    /// blocking pool).
    async fn start_up(&mut self) {
        let Some(config) = self.initial.take() else {
            return;
        };
        let configs: Vec<ModuleConfig> = config
            .modules
            .values()
            .filter_map(|e| e.result.as_ref().ok().cloned())
            .collect();
        let names: Vec<String> = config.modules.keys().cloned().collect();
        let path = self.desired.path.clone();
        let (factory, runtime_dir, kernel) = (
            self.factory.clone(),
            self.settings.runtime_dir.clone(),
            self.kernel.clone(),
        );
        let survey = tokio::task::spawn_blocking(move || {
            let desired = read_desired(&path);
            let found = survey(&factory, &runtime_dir, &kernel, &names, &configs);
            (desired, found)
        })
        .await;
        let (desired, found) = match survey {
            Ok(r) => r,
            Err(e) => {
                warn!("start-up survey failed: {e}");
                (BTreeSet::new(), None)
            }
        };
        self.apply_config(config, &desired);
        let Some(found) = found else { return };
        for (name, f) in found {
            let adopted = f.live.is_some();
            let ev = machine::Event::Restored {
                recorded: f.recorded,
                live: f.live,
            };
            if let Err(r) = self.apply(&name, ev) {
                warn!(KVCD_MODULE = %name, "start-up state not taken: {r}");
                continue;
            }
            if adopted {
                info!(KVCD_MODULE = %name, "adopted: already loaded by kvcd");
            } else if self
                .entries
                .get(&name)
                .is_some_and(|e| e.model.wanted && e.config.is_some())
            {
                let ev = machine::Event::LoadRequested {
                    seq: self.next_seq(),
                };
                if let Err(r) = self.apply(&name, ev) {
                    warn!(KVCD_MODULE = %name, "cannot load: {r}");
                }
            }
        }
    }

    fn handle(&mut self, ev: Event) {
        match ev {
            Event::Request(req, reply) => self.request(req, reply),
            Event::ConfigChanged(changes) => self.read_config(changes),
            Event::ConfigRead(config) => self.config_read(*config),
            Event::Progress(name, step) => {
                if let Err(r) = self.apply(&name, machine::Event::StepProgress(step)) {
                    debug!(KVCD_MODULE = %name, "progress not taken: {r}");
                }
            }
            Event::Done {
                name,
                op,
                seq,
                ran,
                outcome,
                seconds,
            } => {
                self.running = self.running.saturating_sub(1);
                self.counters.record(
                    &name,
                    &format!("{op:?}").to_lowercase(),
                    seconds,
                    outcome.state == super::State::Failed,
                    outcome.podman_calls,
                );
                self.counted = true;
                let ev = machine::Event::WorkDone {
                    op,
                    seq,
                    ran,
                    outcome,
                };
                match self.apply(&name, ev) {
                    Ok(_) => {
                        let state = self
                            .entries
                            .get(&name)
                            .map_or(Status::Inactive, |e| e.model.status);
                        info!(KVCD_MODULE = %name, "{op:?} finished: {state}");
                    }
                    Err(r) => warn!(KVCD_MODULE = %name, "result of {op:?} not taken: {r}"),
                }
                self.recheck_devices(&name);
            }
            Event::Prepared => self.running = self.running.saturating_sub(1),
            Event::DeviceAdded => {
                if !self.shutting_down() {
                    self.devices_changed();
                }
            }
            Event::Next(job) => {
                if !self.shutting_down() {
                    self.next_jobs.push_back(job);
                } else if let Some(reply) = job.reply {
                    let _ = reply.send(Err(AgentError::ShuttingDown));
                }
            }
            Event::NextDone {
                report,
                prepared,
                reply,
            } => {
                self.next_running = false;
                if prepared {
                    self.running = self.running.saturating_sub(1);
                }
                let mut report = report;
                self.remember_failures(&mut report, prepared);
                self.next = next_wire(&report);
                if let Some(reply) = reply {
                    let json = serde_json::to_string_pretty(&*report)
                        .map_err(|e| AgentError::InvalidConfig(e.to_string()));
                    // Answered once `NextKernels` shows the same.
                    self.after_publish_next.push((reply, json));
                }
            }
            Event::Ping(reply) => {
                let _ = reply.send(());
            }
            Event::Shutdown => self.begin_shutdown(),
        }
    }

    fn request(&mut self, req: Request, reply: Reply) {
        if self.shutting_down() {
            let _ = reply.send(Err(AgentError::ShuttingDown));
            return;
        }
        let seq = self.next_seq();
        let (name, ev) = match req {
            Request::ReloadConfig => {
                self.reload_replies.push(reply);
                self.read_config(Changes::All);
                return;
            }
            Request::Prepare(kernel) => {
                let r = KernelRelease::parse(&kernel)
                    .map(|k| {
                        self.prepares.push_back(k);
                        self.seq
                    })
                    .map_err(|e| AgentError::InvalidConfig(format!("{e:#}")));
                let _ = reply.send(r);
                return;
            }
            Request::Load(n) => (n, machine::Event::LoadRequested { seq }),
            Request::Unload(n) => (n, machine::Event::UnloadRequested { seq }),
            Request::Reload(n) => (n, machine::Event::ReloadRequested { seq }),
        };
        let r = match self.apply(&name, ev) {
            Ok(answer) => Ok(answer.unwrap_or(self.seq)),
            Err(Refused::NotFound) => Err(AgentError::NotFound(name)),
            Err(Refused::InvalidConfig(msg)) => Err(AgentError::InvalidConfig(msg)),
            Err(r @ Refused::NotNow { .. }) => Err(AgentError::InvalidConfig(r.to_string())),
        };
        let _ = reply.send(r);
    }

    /// True once SIGTERM (or a stop request) has come.
    fn shutting_down(&self) -> bool {
        self.stop_deadline.is_some()
    }

    fn begin_shutdown(&mut self) {
        if self.shutting_down() {
            // Asked again: stop waiting.
            self.stop_deadline = Some(Instant::now());
            return;
        }
        self.stop_deadline =
            Some(Instant::now() + Duration::from_secs(self.settings.stop_timeout_seconds));
        self.prepares.clear();
        for job in self.next_jobs.drain(..) {
            if let Some(reply) = job.reply {
                let _ = reply.send(Err(AgentError::ShuttingDown));
            }
        }
        self.cancel.store(true, Ordering::Relaxed);
        let unload = self.settings.unload_on_stop;
        let names: Vec<String> = self.entries.keys().cloned().collect();
        for name in names {
            let unload_seq = unload.then(|| self.next_seq());
            if let Err(r) = self.apply(&name, machine::Event::Shutdown { unload_seq }) {
                warn!(KVCD_MODULE = %name, "shutdown not taken: {r}");
            }
        }
    }

    /// Names in `after` order: predecessors first.
    fn ordered(&self) -> Vec<String> {
        let names: Vec<String> = self.entries.keys().cloned().collect();
        let after = crate::config::after_map(
            self.entries
                .iter()
                .filter_map(|(n, e)| Some((n.as_str(), e.config.as_ref()?))),
        );
        super::order::load_order(&names, &after)
    }

    /// Starts queued work whose turn it is, then preparations, up to `max_parallel`.
    fn schedule(&mut self) {
        let max = self.settings.max_parallel.max(1);
        for name in self.ordered() {
            if self.running >= max {
                return;
            }
            let Some(e) = self.entries.get(&name) else {
                continue;
            };
            let Some(&(op, seq)) = e.model.queue.front() else {
                continue;
            };
            if !e.model.status.is_settled() {
                continue;
            }
            if op == Operation::Unload {
                // Unload dependents first.
                let dependents = self.entries.values().any(|d| {
                    d.config
                        .as_ref()
                        .is_some_and(|c| c.after.iter().any(|a| a.as_str() == name))
                        && (!d.model.status.is_settled()
                            || d.model.queue.iter().any(|(o, _)| *o == Operation::Unload))
                });
                if dependents {
                    continue;
                }
            } else {
                // Wait for predecessors the admin wants loaded.
                let waiting: Vec<String> = e
                    .config
                    .iter()
                    .flat_map(|c| c.after.iter().map(ToString::to_string))
                    .filter(|p| {
                        self.entries
                            .get(p)
                            .is_some_and(|pe| pe.model.wanted && pe.model.status != Status::Loaded)
                    })
                    .collect();
                if !waiting.is_empty() {
                    let _ = self.apply(&name, machine::Event::Waiting { on: waiting });
                    continue;
                }
            }
            if let Err(r) = self.apply(&name, machine::Event::WorkStarted { op, seq }) {
                warn!(KVCD_MODULE = %name, "cannot start {op:?}: {r}");
            }
        }
        while self.running < max {
            let Some(kernel) = self.prepares.pop_front() else {
                break;
            };
            self.run_prepare(kernel);
        }
        if !self.next_running
            && (self.running < max || self.next_jobs.front().is_some_and(|j| !j.prepare))
        {
            if let Some(job) = self.next_jobs.pop_front() {
                self.run_next(job);
            }
        }
    }

    /// Keeps the errors of the last prepare per (kernel, config), so a later
    /// check says why a config is not ready rather than only that it is not.
    fn remember_failures(&mut self, report: &mut NextReport, prepared: bool) {
        for k in &mut report.kernels {
            let release = k.readiness.kernel.release.to_string();
            if prepared {
                for o in &k.results {
                    let key = (release.clone(), o.name.clone());
                    match &o.error {
                        Some(e) => {
                            self.next_failures
                                .insert(key, format!("{}: {}", e.step.as_str(), e.message));
                        }
                        None => {
                            self.next_failures.remove(&key);
                        }
                    }
                }
            }
            for c in &mut k.readiness.configs {
                if let (Readiness::NotPrepared(_), Some(msg)) = (
                    &c.readiness,
                    self.next_failures.get(&(release.clone(), c.name.clone())),
                ) {
                    c.readiness = Readiness::Failed(msg.clone());
                }
            }
        }
    }

    /// Queues a readiness check of the next kernels unless one is waiting already.
    fn check_next(&mut self) {
        if !self
            .next_jobs
            .iter()
            .any(|j| !j.prepare && j.reply.is_none())
        {
            self.next_jobs.push_back(NextJob {
                sysroot: PathBuf::from("/"),
                names: Vec::new(),
                prepare: false,
                reply: None,
            });
        }
    }

    /// Runs a next-kernels job on the blocking pool; a prepare counts like any work.
    fn run_next(&mut self, job: NextJob) {
        let NextJob {
            sysroot,
            names,
            prepare,
            reply,
        } = job;
        if let Some(bad) = names
            .iter()
            .find(|n| self.entries.get(*n).is_none_or(|e| e.config.is_none()))
        {
            if let Some(reply) = reply {
                let _ = reply.send(Err(match self.entries.get(bad) {
                    None => AgentError::NotFound(bad.clone()),
                    Some(e) => AgentError::InvalidConfig(e.model.error.clone()),
                }));
            }
            return;
        }
        let valid: Vec<String> = self
            .ordered()
            .into_iter()
            .filter(|n| self.entries.get(n).is_some_and(|e| e.config.is_some()))
            .collect();
        let chosen = next::choose(&names, &valid, |n| {
            self.entries.get(n).is_some_and(|e| e.model.wanted)
        });
        // In `after` order: a config may build on another's image.
        let chosen: Vec<&String> = valid.iter().filter(|n| chosen.contains(n)).collect();
        let configs: Vec<ModuleConfig> = chosen
            .into_iter()
            .filter_map(|n| self.entries.get(n)?.config.clone())
            .collect();
        self.next_running = true;
        if prepare {
            self.running += 1;
        }
        let (factory, settings, tx, cancel, kernel) = (
            self.factory.clone(),
            self.settings.clone(),
            self.tx.clone(),
            self.cancel.clone(),
            self.kernel.clone(),
        );
        tokio::task::spawn_blocking(move || {
            let report = match factory() {
                Ok(kmods) => next::run(
                    &next::NextRun {
                        settings: &settings,
                        kmods: &*kmods,
                        sysroot: &sysroot,
                        running: &kernel,
                        on_step: None,
                        cancel: Some(&cancel),
                    },
                    &configs.iter().collect::<Vec<_>>(),
                    prepare,
                ),
                Err(e) => {
                    warn!("next kernels: cannot read the kernel's modules: {e:#}");
                    NextReport {
                        running: kernel.to_string(),
                        sysroot,
                        kernels: Vec::new(),
                        notes: vec![format!("cannot read the kernel's modules: {e:#}")],
                    }
                }
            };
            for k in &report.kernels {
                let r = &k.readiness;
                let line = format!(
                    "kernel {} ({}, {}): {}",
                    r.kernel.release,
                    r.kernel.role.as_str(),
                    r.kernel.describe(),
                    if r.ready {
                        "every wanted config is ready"
                    } else {
                        "NOT READY"
                    }
                );
                if r.ready {
                    info!(KVCD_KERNEL = %r.kernel.release, "{line}")
                } else {
                    warn!(KVCD_KERNEL = %r.kernel.release, "{line}")
                }
                for c in r.configs.iter().filter(|c| !c.readiness.is_ready()) {
                    warn!(KVCD_MODULE = %c.name, KVCD_KERNEL = %r.kernel.release, "not ready for kernel {}: {}: {}", r.kernel.release, c.readiness.state(), c.readiness.detail());
                }
            }
            let _ = tx.send(Event::NextDone {
                report: Box::new(report),
                prepared: prepare,
                reply,
            });
        });
    }

    /// Runs operation `seq` on `name` on the blocking pool; [`Event::Done`] brings the outcome.
    fn run_work(&mut self, name: &str, op: Operation, seq: u64) {
        let Some(e) = self.entries.get(name) else {
            return;
        };
        self.running += 1;
        let config = e.config.clone();
        let name = name.to_owned();
        let factory = self.factory.clone();
        let settings = self.settings.clone();
        let kernel = self.kernel.clone();
        let tx = self.tx.clone();
        info!(KVCD_MODULE = %name, "starting {op:?} (operation {seq})");
        tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            let (ran, outcome) = run_op(
                &factory,
                &settings,
                &kernel,
                &name,
                config.as_ref(),
                op,
                &tx,
            );
            let _ = tx.send(Event::Done {
                name,
                op,
                seq,
                ran,
                outcome: Box::new(outcome),
                seconds: started.elapsed().as_secs_f64(),
            });
        });
    }

    /// Fetches and verifies every valid config for `kernel` on the blocking
    /// pool, counted like any work; stopping ends it after the config at hand.
    fn run_prepare(&mut self, kernel: KernelRelease) {
        // In `after` order: a config may build on another's image.
        let configs: Vec<ModuleConfig> = self
            .ordered()
            .iter()
            .filter_map(|n| self.entries.get(n)?.config.clone())
            .collect();
        self.running += 1;
        let (factory, settings, tx, cancel) = (
            self.factory.clone(),
            self.settings.clone(),
            self.tx.clone(),
            self.cancel.clone(),
        );
        info!(KVCD_KERNEL = %kernel, "preparing {} module config(s)", configs.len());
        tokio::task::spawn_blocking(move || {
            prepare(&factory, &settings, &kernel, &configs, &cancel);
            let _ = tx.send(Event::Prepared);
        });
    }

    /// Loads again the wanted configs that are `unsupported` for want of a
    /// device, now that one was added (the load checks the devices again).
    /// The others with a `[match]` are marked: an operation under way may
    /// have read the devices before this one appeared (a bus rescan adds
    /// several in a row), so it looks again when it ends unsupported.
    fn devices_changed(&mut self) {
        let mut waiting = Vec::new();
        for (n, e) in &mut self.entries {
            if !e.model.wanted || e.config.as_ref().is_none_or(|c| c.devices.is_empty()) {
                continue;
            }
            if e.model.status == Status::Unsupported {
                waiting.push(n.clone());
            } else {
                e.devices_dirty = true;
            }
        }
        for name in waiting {
            self.load_for_device(&name);
        }
    }

    /// After an operation of `name` ended: when it found no device but one
    /// was added meanwhile, it looks again.
    fn recheck_devices(&mut self, name: &str) {
        let stopping = self.shutting_down();
        let Some(e) = self.entries.get_mut(name) else {
            return;
        };
        let dirty = std::mem::take(&mut e.devices_dirty);
        if dirty && !stopping && e.model.wanted && e.model.status == Status::Unsupported {
            self.load_for_device(name);
        }
    }

    /// Asks for a load of `name` because a device was added.
    fn load_for_device(&mut self, name: &str) {
        info!(KVCD_MODULE = %name, "a device was added: looking for a match again");
        let ev = machine::Event::LoadRequested {
            seq: self.next_seq(),
        };
        if let Err(r) = self.apply(name, ev) {
            warn!(KVCD_MODULE = %name, "load after a new device not taken: {r}");
        }
    }

    fn fire_retries(&mut self) {
        let now = Instant::now();
        let due: Vec<String> = self
            .entries
            .iter()
            .filter(|(_, e)| e.retry_at.is_some_and(|t| t <= now))
            .map(|(n, _)| n.clone())
            .collect();
        for name in due {
            if let Some(e) = self.entries.get_mut(&name) {
                e.retry_at = None;
            }
            let ev = machine::Event::RetryDue {
                seq: self.next_seq(),
            };
            if let Err(r) = self.apply(&name, ev) {
                warn!(KVCD_MODULE = %name, "retry not taken: {r}");
            }
        }
    }

    fn snapshot(&self) -> Snapshot {
        Snapshot {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            kernel: self.kernel.to_string(),
            modules: self
                .entries
                .iter()
                .map(|(n, e)| (n.clone(), e.model.published(n, self.kernel.as_str())))
                .collect(),
            errors: self.errors.clone(),
            next: self.next.clone(),
            signing: self.signing.clone(),
        }
    }

    fn publish(&mut self, notify: &mut dyn FnMut(&str)) {
        let snap = self.snapshot();
        let summary = snap.summary();
        let changed = self.status.send_if_modified(|cur| {
            if **cur == snap {
                false
            } else {
                *cur = Arc::new(snap);
                true
            }
        });
        // Rendered only when something it shows may have changed, or the heartbeat is due.
        let due = self
            .textfile
            .as_ref()
            .is_some_and(|t| t.due().is_none_or(|d| d <= Instant::now()));
        if changed || due || std::mem::take(&mut self.counted) {
            let snap = self.status.borrow().clone();
            self.write_metrics(&snap, true);
        }
        if summary != self.last_summary {
            notify(&format!("STATUS={summary}"));
            self.last_summary = summary;
        }
    }

    /// Writes the metrics file, if one is configured and it is due.
    fn write_metrics(&mut self, snap: &Snapshot, up: bool) {
        if let Some(t) = &mut self.textfile {
            if let Err(e) = t.update(crate::metrics::render(snap, &self.counters, up)) {
                warn!("{e:#}");
            }
        }
    }

    fn save_desired(&mut self) {
        if !std::mem::take(&mut self.save_needed) {
            return;
        }
        let wanted = self
            .entries
            .iter()
            .filter(|(_, e)| e.model.wanted)
            .map(|(n, _)| n.clone())
            .collect();
        self.desired.save(wanted);
    }

    fn idle(&self) -> bool {
        self.running == 0
            && self.prepares.is_empty()
            && self.entries.values().all(|e| e.model.queue.is_empty())
    }

    /// Runs until shut down. `notify` receives sd_notify messages (READY=1, STATUS=…, STOPPING=1).
    pub async fn run(mut self, notify: &mut (dyn FnMut(&str) + Send)) -> Result<()> {
        self.start_up().await;
        self.check_next();
        loop {
            if !self.shutting_down() || self.settings.unload_on_stop {
                self.schedule();
            }
            self.save_desired();
            self.publish(notify);
            for reply in self.after_publish.drain(..) {
                let _ = reply.send(Ok(self.seq));
            }
            for (reply, answer) in self.after_publish_next.drain(..) {
                let _ = reply.send(answer);
            }
            if !self.ready && self.idle() {
                self.ready = true;
                notify("READY=1");
                info!("ready: {}", self.last_summary);
            }
            if self.shutting_down()
                && self.running == 0
                && (self.idle() || !self.settings.unload_on_stop)
            {
                break;
            }
            if self.stop_deadline.is_some_and(|t| t <= Instant::now()) {
                let left: Vec<&str> = self
                    .entries
                    .iter()
                    .filter(|(_, e)| !e.model.status.is_settled())
                    .map(|(n, _)| n.as_str())
                    .collect();
                warn!(
                    "stop timeout: exiting with {} step(s) still running ({}); they are abandoned",
                    self.running,
                    left.join(", ")
                );
                break;
            }
            // Stopping clears every retry: then only the stop deadline wakes the loop.
            let metrics_due = self
                .textfile
                .as_ref()
                .and_then(crate::metrics::Textfile::due);
            let next_wake = self
                .stop_deadline
                .or_else(|| self.entries.values().filter_map(|e| e.retry_at).min())
                .into_iter()
                .chain(metrics_due.filter(|_| !self.shutting_down()))
                .min();
            let ev = match next_wake {
                Some(t) => tokio::select! {
                    ev = self.rx.recv() => ev,
                    () = tokio::time::sleep_until(t.into()) => {
                        if !self.shutting_down() {
                            self.fire_retries();
                        }
                        continue;
                    }
                },
                None => self.rx.recv().await,
            };
            match ev {
                Some(ev) => self.handle(ev),
                None => break,
            }
        }
        self.desired.flush().await;
        let snap = self.snapshot();
        self.write_metrics(&snap, false);
        notify("STOPPING=1");
        info!("stopped");
        Ok(())
    }
}

/// The names of the modules a config loads.
fn module_names(c: &ModuleConfig) -> Vec<String> {
    c.modules.iter().map(ToString::to_string).collect()
}

/// Reads what kvcd left for each of `names` (runtime records) and whether
/// each of `configs` is live as recorded. `None` when the kernel cannot be read.
fn survey(
    factory: &KmodsFactory,
    runtime_dir: &std::path::Path,
    kernel: &KernelRelease,
    names: &[String],
    configs: &[ModuleConfig],
) -> Option<BTreeMap<String, Found>> {
    let kmods = match factory() {
        Ok(k) => k,
        Err(e) => {
            warn!("cannot read the kernel's modules: {e:#}");
            return None;
        }
    };
    let records = RecordStore::new(runtime_dir);
    let mut found = BTreeMap::new();
    for name in names {
        let record = match records.get(name) {
            Ok(r) => r,
            Err(e) => {
                warn!(KVCD_MODULE = %name, "{e:#}");
                None
            }
        };
        let config = configs.iter().find(|c| c.name.as_str() == name);
        let live = match (&record, config) {
            (Some(r), Some(c))
                if r.kernel == kernel.as_str()
                    && r.complete
                    && r.config_digest == c.digest
                    && c.modules
                        .iter()
                        .all(|m| matches!(kmods.live(m), Ok(Some(_))))
                    && super::live_as_recorded(kmods.as_ref(), r) =>
            {
                Some((
                    r.since,
                    r.inserted.iter().map(|o| o.name.to_string()).collect(),
                ))
            }
            _ => None,
        };
        found.insert(
            name.clone(),
            Found {
                recorded: record.is_some(),
                live,
            },
        );
    }
    Some(found)
}

/// `base * 2^attempts`, capped at `max`, with ±20 % jitter.
fn backoff(base: u64, max: u64, attempts: u32) -> Duration {
    let exp = base
        .saturating_mul(1u64.checked_shl(attempts.min(20)).unwrap_or(u64::MAX))
        .min(max.max(base));
    let millis = exp.saturating_mul(1000);
    // Jitter from the clock's nanoseconds: spreads retries of many nodes, needs no RNG.
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let spread = millis / 5;
    let offset = if spread == 0 {
        0
    } else {
        u64::from(nanos) % (2 * spread + 1)
    };
    Duration::from_millis(millis - spread + offset)
}

/// Runs one operation (blocking); says what the engine ran and its outcome.
fn run_op(
    factory: &KmodsFactory,
    settings: &DaemonSettings,
    kernel: &KernelRelease,
    name: &str,
    config: Option<&ModuleConfig>,
    op: Operation,
    tx: &mpsc::UnboundedSender<Event>,
) -> (Ran, Outcome) {
    let ran = if op == Operation::Unload {
        Ran::Unload
    } else {
        Ran::Load
    };
    let kmods = match factory() {
        Ok(k) => k,
        Err(e) => {
            let o = Outcome::failed(name, kernel, Step::Config, format!("{e:#}"));
            return (ran, o);
        }
    };
    let progress = |n: &str, s: &StepLog| {
        let _ = tx.send(Event::Progress(n.to_owned(), s.step));
    };
    let mut engine = Engine::from_settings(settings, kernel, &*kmods, Some(&progress));
    // The agent's kernel is the one its kernel modules read.
    engine.target_is_live = true;
    match (op, config) {
        (Operation::Unload, c) => (Ran::Unload, engine.unload(name, c)),
        (Operation::Load, Some(c)) => (Ran::Load, engine.load(c)),
        (Operation::Reload, Some(c)) => {
            let u = engine.unload(name, Some(c));
            if !u.state.is_ok() {
                return (Ran::Unload, u);
            }
            // Fetch again: forget which extraction is current for this kernel.
            let dir = crate::state::Layout::image_dir(&settings.state_dir, name, kernel.as_str());
            if let Err(e) = crate::state::index::forget(&dir) {
                warn!(KVCD_MODULE = %name, "{e:#}");
            }
            (Ran::UnloadThenLoad, engine.load(c))
        }
        (Operation::Load | Operation::Reload, None) => (
            ran,
            Outcome::failed(
                name,
                kernel,
                Step::Config,
                "no valid configuration".to_owned(),
            ),
        ),
    }
}

/// Prepares `configs` for `kernel` (blocking), logging each result; stops when `cancel` is set.
fn prepare(
    factory: &KmodsFactory,
    settings: &DaemonSettings,
    kernel: &KernelRelease,
    configs: &[ModuleConfig],
    cancel: &AtomicBool,
) {
    let kmods = match factory() {
        Ok(k) => k,
        Err(e) => {
            warn!(KVCD_KERNEL = %kernel, "prepare: cannot read the kernel's modules: {e:#}");
            return;
        }
    };
    let engine = Engine::from_settings(settings, kernel, &*kmods, None);
    for c in configs {
        if cancel.load(Ordering::Relaxed) {
            info!(KVCD_KERNEL = %kernel, "prepare stopped: kvcd is stopping");
            return;
        }
        let o = engine.prepare(c);
        match &o.error {
            None => info!(KVCD_MODULE = %o.name, KVCD_KERNEL = %kernel, "prepare: {}", o.state),
            Some(e) => warn!(
                KVCD_MODULE = %o.name,
                KVCD_KERNEL = %kernel,
                "prepare failed at {}: {}",
                e.step.as_str(),
                e.message
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::backoff;
    use std::time::Duration;

    #[test]
    fn backoff_doubles_caps_and_jitters_within_a_fifth() {
        for (attempts, want) in [(0u32, 5u64), (1, 10), (2, 20), (6, 300), (40, 300)] {
            let d = backoff(5, 300, attempts);
            let (lo, hi) = (
                Duration::from_millis(want * 800),
                Duration::from_millis(want * 1200),
            );
            assert!(
                d >= lo && d <= hi,
                "attempt {attempts}: {d:?} not in {lo:?}..{hi:?}"
            );
        }
    }
}
