//! The agent behind `kvcd daemon`: one task owns all state. Events come in
//! (requests from D-Bus, config changes, signals, retry timers, progress and
//! results of work); blocking work (libkmod, podman, hooks) runs on the
//! blocking pool, at most `max_parallel` at a time, with `after` ordering
//! respected; every change is published as a [`Snapshot`] on a `watch`
//! channel. What the admin wants loaded is kept in `RUNTIME/desired.json`, so
//! a restarted agent converges to it, adopting what is already loaded
//! without inserting it again.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Result;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{info, warn};

use super::status::{ModuleStatus, Phase, Snapshot};
use super::{Engine, Outcome, RecordStore, State, Step, StepLog};
use crate::config::{Config, DaemonSettings, ModuleConfig, Overrides};
use crate::kernel::KernelRelease;
use crate::kmod::KernelModules;
use crate::util::{unix_now, write_atomic};

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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Load,
    Unload,
    Reload,
}

enum Event {
    Request(Request, oneshot::Sender<Result<u64, AgentError>>),
    ConfigChanged,
    Progress(String, Step),
    Done(String, Op, u64, Box<Outcome>),
    Ping(oneshot::Sender<()>),
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

    /// The configuration files changed.
    pub fn config_changed(&self) {
        let _ = self.tx.send(Event::ConfigChanged);
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

/// `RUNTIME/desired.json`.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Desired {
    wanted: BTreeSet<String>,
}

struct Entry {
    /// The last good config.
    config: Option<ModuleConfig>,
    /// Why the current file is not used, when it is invalid.
    config_error: Option<String>,
    status: ModuleStatus,
    queue: VecDeque<(Op, u64)>,
    running: bool,
    attempts: u32,
    retry_at: Option<Instant>,
    /// The operation a retry repeats (a reload that met a busy module is retried as a reload).
    retry_op: Op,
    /// The file is gone: unload (if needed), then forget it.
    removed: bool,
}

/// The agent. Build it with [`Agent::new`], run it with [`Agent::run`].
pub struct Agent {
    dirs: Vec<PathBuf>,
    overrides: Overrides,
    settings: DaemonSettings,
    kernel: KernelRelease,
    factory: KmodsFactory,
    entries: BTreeMap<String, Entry>,
    errors: Vec<String>,
    tx: mpsc::UnboundedSender<Event>,
    rx: mpsc::UnboundedReceiver<Event>,
    status: watch::Sender<Arc<Snapshot>>,
    seq: u64,
    running: usize,
    /// Set once the agent is stopping: when it stops waiting for running steps.
    stop_deadline: Option<Instant>,
    ready: bool,
    last_summary: String,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("kernel", &self.kernel)
            .finish_non_exhaustive()
    }
}

impl Agent {
    /// An agent over the configuration in `dirs`, for the running `kernel`.
    pub fn new(
        dirs: Vec<PathBuf>,
        overrides: Overrides,
        kernel: KernelRelease,
        factory: KmodsFactory,
    ) -> (Self, Handle, watch::Receiver<Arc<Snapshot>>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let (status, status_rx) = watch::channel(Arc::new(Snapshot::default()));
        let settings = Config::load(&dirs, &overrides).daemon;
        let agent = Self {
            dirs,
            overrides,
            settings,
            kernel,
            factory,
            entries: BTreeMap::new(),
            errors: Vec::new(),
            tx: tx.clone(),
            rx,
            status,
            seq: 0,
            running: 0,
            stop_deadline: None,
            ready: false,
            last_summary: String::new(),
        };
        (agent, Handle { tx }, status_rx)
    }

    fn records(&self) -> RecordStore {
        RecordStore::new(&self.settings.runtime_dir)
    }

    fn desired_path(&self) -> PathBuf {
        self.settings.runtime_dir.join("desired.json")
    }

    fn save_desired(&self) {
        let d = Desired {
            wanted: self
                .entries
                .iter()
                .filter(|(_, e)| e.status.wanted)
                .map(|(n, _)| n.clone())
                .collect(),
        };
        if let Ok(data) = serde_json::to_vec_pretty(&d) {
            if let Err(e) = write_atomic(&self.desired_path(), &data) {
                warn!("cannot save desired state: {e:#}");
            }
        }
    }

    fn load_desired(&self) -> BTreeSet<String> {
        std::fs::read(self.desired_path())
            .ok()
            .and_then(|d| serde_json::from_slice::<Desired>(&d).ok())
            .map(|d| d.wanted)
            .unwrap_or_default()
    }

    fn new_status(&self, name: &str, file: String, wanted: bool) -> ModuleStatus {
        ModuleStatus {
            name: name.to_owned(),
            state: Phase::Inactive,
            step: String::new(),
            error: String::new(),
            kernel: self.kernel.to_string(),
            image: String::new(),
            image_digest: String::new(),
            loaded_modules: Vec::new(),
            since: unix_now(),
            next_retry: 0,
            config_file: file,
            wanted,
            started_op: 0,
            completed_op: 0,
        }
    }

    fn set_phase(status: &mut ModuleStatus, phase: Phase) {
        if status.state != phase {
            status.state = phase;
            status.since = unix_now();
        }
    }

    fn enqueue(&mut self, name: &str, op: Op) -> u64 {
        self.seq += 1;
        let seq = self.seq;
        if let Some(e) = self.entries.get_mut(name) {
            e.retry_at = None;
            e.status.next_retry = 0;
            e.queue.push_back((op, seq));
        }
        seq
    }

    /// Reads the configuration again and works out what changed.
    fn reload_config(&mut self, desired: Option<&BTreeSet<String>>) {
        let config = Config::load(&self.dirs, &self.overrides);
        self.settings = config.daemon.clone();
        self.errors = config.errors.iter().map(ToString::to_string).collect();
        let mut seen = BTreeSet::new();
        for (name, me) in &config.modules {
            seen.insert(name.clone());
            let file = me.file.display().to_string();
            let wanted = desired.is_some_and(|d| d.contains(name));
            if !self.entries.contains_key(name) {
                let mut status = self.new_status(name, file.clone(), wanted);
                let (cfg, err) = match &me.result {
                    Ok(c) => (Some(c.clone()), None),
                    Err(errs) => {
                        let msg = crate::config::join_errors(errs);
                        Self::set_phase(&mut status, Phase::Invalid);
                        status.error.clone_from(&msg);
                        (None, Some(msg))
                    }
                };
                self.entries.insert(
                    name.clone(),
                    Entry {
                        config: cfg,
                        config_error: err,
                        status,
                        queue: VecDeque::new(),
                        running: false,
                        attempts: 0,
                        retry_at: None,
                        retry_op: Op::Load,
                        removed: false,
                    },
                );
                continue;
            }
            let mut follow = None;
            if let Some(e) = self.entries.get_mut(name) {
                e.removed = false;
                e.status.config_file = file;
                match &me.result {
                    Ok(c) => {
                        let changed = e.config.as_ref().is_none_or(|old| old.digest != c.digest);
                        e.config = Some(c.clone());
                        if e.config_error.take().is_some() {
                            e.status.error.clear();
                            if e.status.state == Phase::Invalid {
                                Self::set_phase(&mut e.status, Phase::Inactive);
                            }
                        }
                        if changed && e.status.wanted {
                            info!(KVCD_MODULE = %name, "configuration changed");
                            follow =
                                follow_change(e.status.state, e.running || !e.queue.is_empty());
                        }
                    }
                    Err(errs) => {
                        let msg = crate::config::join_errors(errs);
                        warn!(KVCD_MODULE = %name, "invalid configuration: {msg}");
                        if e.config.is_some() {
                            e.status.error =
                                format!("invalid configuration, keeping the last good one: {msg}");
                        } else {
                            Self::set_phase(&mut e.status, Phase::Invalid);
                            e.status.error.clone_from(&msg);
                        }
                        e.config_error = Some(msg);
                    }
                }
            }
            if let Some(op) = follow {
                self.enqueue(name, op);
            }
        }
        let gone: Vec<String> = self
            .entries
            .keys()
            .filter(|n| !seen.contains(*n))
            .cloned()
            .collect();
        for name in gone {
            let loaded = self.records().get(&name).ok().flatten().is_some();
            if let Some(e) = self.entries.get_mut(&name) {
                e.removed = true;
                e.status.wanted = false;
                e.config = None;
            }
            if loaded {
                info!(KVCD_MODULE = %name, "configuration removed; unloading");
                self.enqueue(&name, Op::Unload);
            } else if !self.entries.get(&name).is_some_and(|e| e.running) {
                self.entries.remove(&name);
            }
        }
        self.save_desired();
    }

    /// Start-up: desired state from the runtime dir, the truth from the kernel.
    fn restore(&mut self) {
        let kmods = match (self.factory)() {
            Ok(k) => k,
            Err(e) => {
                warn!("cannot read the kernel's modules: {e:#}");
                return;
            }
        };
        let records = self.records();
        let names: Vec<String> = self.entries.keys().cloned().collect();
        for name in names {
            let record = records
                .get(&name)
                .ok()
                .flatten()
                .filter(|r| r.kernel == self.kernel.as_str());
            let Some(e) = self.entries.get_mut(&name) else {
                continue;
            };
            let Some(c) = e.config.clone() else { continue };
            let live = record.as_ref().is_some_and(|r| {
                r.config_digest == c.digest
                    && c.modules
                        .iter()
                        .all(|m| matches!(kmods.live(m), Ok(Some(_))))
                    && super::live_as_recorded(kmods.as_ref(), r)
            });
            if live {
                let r = record.as_ref();
                Self::set_phase(&mut e.status, Phase::Loaded);
                e.status.since = r.map_or(e.status.since, |r| r.since);
                e.status.loaded_modules = loaded_names(r, &c);
                info!(KVCD_MODULE = %name, "adopted: already loaded by kvcd");
            } else if e.status.wanted {
                self.enqueue(&name, Op::Load);
            }
        }
    }

    fn handle(&mut self, ev: Event) {
        match ev {
            Event::Request(req, reply) => {
                let r = self.request(&req);
                let _ = reply.send(r);
            }
            Event::ConfigChanged => {
                let desired = self.load_desired();
                self.reload_config(Some(&desired));
            }
            Event::Progress(name, step) => {
                if let Some(e) = self.entries.get_mut(&name) {
                    let phase = match step {
                        Step::Fetch => Phase::Fetching,
                        Step::Resolve | Step::Depmod | Step::Verify => Phase::Verifying,
                        Step::Remove | Step::Restore => Phase::Unloading,
                        _ if e.status.state == Phase::Unloading => Phase::Unloading,
                        _ => Phase::Loading,
                    };
                    Self::set_phase(&mut e.status, phase);
                    e.status.step = step.as_str().to_owned();
                }
            }
            Event::Done(name, op, seq, outcome) => self.done(&name, op, seq, &outcome),
            Event::Ping(reply) => {
                let _ = reply.send(());
            }
            Event::Shutdown => self.begin_shutdown(),
        }
    }

    fn request(&mut self, req: &Request) -> Result<u64, AgentError> {
        if self.shutting_down() {
            return Err(AgentError::ShuttingDown);
        }
        let name = match &req {
            Request::ReloadConfig => {
                let desired = self.load_desired();
                self.reload_config(Some(&desired));
                return Ok(self.seq);
            }
            Request::Prepare(kernel) => return self.prepare(kernel),
            Request::Load(n) | Request::Unload(n) | Request::Reload(n) => n.clone(),
        };
        let e = self
            .entries
            .get_mut(&name)
            .filter(|e| !e.removed)
            .ok_or_else(|| AgentError::NotFound(name.clone()))?;
        match req {
            Request::Load(_) | Request::Reload(_) => {
                if e.config.is_none() {
                    return Err(AgentError::InvalidConfig(
                        e.config_error.clone().unwrap_or_default(),
                    ));
                }
                e.status.wanted = true;
                e.queue.retain(|(op, _)| *op != Op::Unload);
                let idle = !e.running && e.queue.is_empty();
                let current = e.status.completed_op;
                let is_loaded = e.status.state == Phase::Loaded;
                self.save_desired();
                if matches!(req, Request::Load(_)) && idle && is_loaded {
                    return Ok(current);
                }
                let op = if matches!(req, Request::Reload(_)) {
                    Op::Reload
                } else {
                    Op::Load
                };
                Ok(self.enqueue(&name, op))
            }
            Request::Unload(_) => {
                e.status.wanted = false;
                e.queue.retain(|(op, _)| *op == Op::Unload);
                let idle = !e.running && e.queue.is_empty();
                let current = e.status.completed_op;
                let inactive = matches!(
                    e.status.state,
                    Phase::Inactive | Phase::Invalid | Phase::Unsupported
                );
                self.save_desired();
                if idle && inactive {
                    return Ok(current);
                }
                Ok(self.enqueue(&name, Op::Unload))
            }
            Request::ReloadConfig | Request::Prepare(_) => Ok(self.seq),
        }
    }

    fn prepare(&mut self, kernel: &str) -> Result<u64, AgentError> {
        let kernel = KernelRelease::parse(kernel)
            .map_err(|e| AgentError::InvalidConfig(format!("{e:#}")))?;
        // In `after` order: a config may build on another's image.
        let configs: Vec<ModuleConfig> = self
            .ordered()
            .iter()
            .filter_map(|n| self.entries.get(n)?.config.clone())
            .collect();
        let factory = self.factory.clone();
        let settings = self.settings.clone();
        tokio::task::spawn_blocking(move || {
            let Ok(kmods) = factory() else { return };
            let engine = Engine::from_settings(&settings, &kernel, &*kmods, None);
            for c in &configs {
                let o = engine.prepare(c);
                match &o.error {
                    None => {
                        info!(KVCD_MODULE = %o.name, KVCD_KERNEL = %kernel, "prepare: {}", o.state)
                    }
                    Some(e) => {
                        warn!(KVCD_MODULE = %o.name, KVCD_KERNEL = %kernel, "prepare failed at {}: {}", e.step.as_str(), e.message)
                    }
                }
            }
        });
        Ok(self.seq)
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
        for e in self.entries.values_mut() {
            e.queue.clear();
            e.retry_at = None;
        }
        if self.settings.unload_on_stop {
            let loaded: Vec<String> = self
                .entries
                .iter()
                .filter(|(_, e)| e.status.state == Phase::Loaded)
                .map(|(n, _)| n.clone())
                .collect();
            for n in loaded {
                self.enqueue(&n, Op::Unload);
            }
        }
    }

    /// Names in `after` order: predecessors first.
    fn ordered(&self) -> Vec<String> {
        let names: Vec<String> = self.entries.keys().cloned().collect();
        let after: BTreeMap<String, Vec<String>> = self
            .entries
            .iter()
            .filter_map(|(n, e)| {
                Some((
                    n.clone(),
                    e.config
                        .as_ref()?
                        .after
                        .iter()
                        .map(ToString::to_string)
                        .collect(),
                ))
            })
            .collect();
        super::order::load_order(&names, &after)
    }

    /// Starts queued work whose turn it is.
    fn schedule(&mut self) {
        let order = self.ordered();
        let max = self.settings.max_parallel.max(1);
        let mut starts = Vec::new();
        for name in &order {
            if self.running + starts.len() >= max {
                break;
            }
            let Some(e) = self.entries.get(name) else {
                continue;
            };
            let Some(&(op, seq)) = e.queue.front() else {
                continue;
            };
            if e.running {
                continue;
            }
            if op != Op::Unload {
                // Wait for predecessors the admin wants loaded.
                let waiting: Vec<String> = e
                    .config
                    .as_ref()
                    .map(|c| c.after.iter().map(ToString::to_string).collect::<Vec<_>>())
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|p| {
                        self.entries
                            .get(p)
                            .is_some_and(|pe| pe.status.wanted && pe.status.state != Phase::Loaded)
                    })
                    .collect();
                if !waiting.is_empty() {
                    if let Some(e) = self.entries.get_mut(name) {
                        e.status.step = format!("waiting for {}", waiting.join(", "));
                    }
                    continue;
                }
            } else {
                // Unload dependents first.
                let dependents = self.entries.iter().any(|(_, d)| {
                    d.config
                        .as_ref()
                        .is_some_and(|c| c.after.iter().any(|a| a.as_str() == name))
                        && (d.running || d.queue.iter().any(|(o, _)| *o == Op::Unload))
                });
                if dependents {
                    continue;
                }
            }
            starts.push((name.clone(), op, seq));
        }
        for (name, op, seq) in starts {
            self.start(&name, op, seq);
        }
    }

    fn start(&mut self, name: &str, op: Op, seq: u64) {
        let Some(e) = self.entries.get_mut(name) else {
            return;
        };
        e.queue.pop_front();
        e.running = true;
        e.status.started_op = seq;
        e.status.error.clear();
        e.status.step.clear();
        e.status.next_retry = 0;
        Self::set_phase(
            &mut e.status,
            if op == Op::Unload {
                Phase::Unloading
            } else {
                Phase::Verifying
            },
        );
        self.running += 1;
        let config = e.config.clone();
        let name = name.to_owned();
        let factory = self.factory.clone();
        let settings = self.settings.clone();
        let kernel = self.kernel.clone();
        let tx = self.tx.clone();
        info!(KVCD_MODULE = %name, "starting {op:?} (operation {seq})");
        tokio::task::spawn_blocking(move || {
            let outcome = run_op(
                &factory,
                &settings,
                &kernel,
                &name,
                config.as_ref(),
                op,
                &tx,
            );
            let _ = tx.send(Event::Done(name, op, seq, Box::new(outcome)));
        });
    }

    fn done(&mut self, name: &str, op: Op, seq: u64, outcome: &Outcome) {
        self.running = self.running.saturating_sub(1);
        let record = self.records().get(name).ok().flatten();
        let (base, max) = (
            self.settings.retry_base_seconds,
            self.settings.retry_max_seconds,
        );
        let shutting_down = self.shutting_down();
        let Some(e) = self.entries.get_mut(name) else {
            return;
        };
        e.running = false;
        e.status.completed_op = seq;
        if let Some(i) = &outcome.image {
            e.status.image.clone_from(&i.reference);
            e.status.image_digest.clone_from(&i.digest);
        }
        let phase = match outcome.state {
            State::Loaded => Phase::Loaded,
            State::Inactive | State::Prepared => Phase::Inactive,
            State::Unsupported => Phase::Unsupported,
            State::Failed => Phase::Failed,
            State::Busy => Phase::Busy,
        };
        Self::set_phase(&mut e.status, phase);
        e.status.loaded_modules = match (phase, &e.config) {
            (Phase::Loaded, Some(c)) => loaded_names(record.as_ref(), c),
            _ => record
                .as_ref()
                .map(|r| r.inserted.iter().map(|o| o.name.to_string()).collect())
                .unwrap_or_default(),
        };
        match &outcome.error {
            None => {
                e.status.error.clone_from(
                    &e.config_error
                        .clone()
                        .map(|m| format!("invalid configuration, keeping the last good one: {m}"))
                        .unwrap_or_default(),
                );
                e.status.step.clear();
                e.attempts = 0;
            }
            Some(err) => {
                e.status.error.clone_from(&err.message);
                e.status.step = err.step.as_str().to_owned();
                // Retry what the admin wants, with capped exponential backoff and jitter.
                let wants_it =
                    (e.status.wanted && op != Op::Unload) || (!e.status.wanted && op == Op::Unload);
                if wants_it && !shutting_down && e.queue.is_empty() {
                    let delay = backoff(base, max, e.attempts);
                    e.attempts = e.attempts.saturating_add(1);
                    e.retry_at = Some(Instant::now() + delay);
                    e.retry_op = op;
                    e.status.next_retry = unix_now() + delay.as_secs().max(1);
                    info!(KVCD_MODULE = %name, "retrying in {}s", delay.as_secs());
                }
            }
        }
        info!(KVCD_MODULE = %name, "{op:?} finished: {}", e.status.state);
        if e.removed && e.queue.is_empty() && matches!(e.status.state, Phase::Inactive) {
            self.entries.remove(name);
        }
    }

    fn fire_retries(&mut self) {
        let now = Instant::now();
        let due: Vec<(String, Op)> = self
            .entries
            .iter()
            .filter(|(_, e)| e.retry_at.is_some_and(|t| t <= now))
            .map(|(n, e)| {
                let op = match (e.status.wanted, e.retry_op) {
                    (true, Op::Reload) => Op::Reload,
                    (true, _) => Op::Load,
                    (false, _) => Op::Unload,
                };
                (n.clone(), op)
            })
            .collect();
        for (n, op) in due {
            if let Some(e) = self.entries.get_mut(&n) {
                e.retry_at = None;
            }
            self.enqueue(&n, op);
        }
    }

    fn snapshot(&self) -> Snapshot {
        Snapshot {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            kernel: self.kernel.to_string(),
            modules: self
                .entries
                .iter()
                .map(|(n, e)| (n.clone(), e.status.clone()))
                .collect(),
            errors: self.errors.clone(),
        }
    }

    fn publish(&mut self, notify: &mut dyn FnMut(&str)) {
        let snap = self.snapshot();
        let summary = snap.summary();
        self.status.send_if_modified(|cur| {
            if **cur == snap {
                false
            } else {
                *cur = Arc::new(snap);
                true
            }
        });
        if summary != self.last_summary {
            notify(&format!("STATUS={summary}"));
            self.last_summary = summary;
        }
    }

    fn idle(&self) -> bool {
        self.running == 0 && self.entries.values().all(|e| e.queue.is_empty())
    }

    /// Runs until shut down. `notify` receives sd_notify messages (READY=1, STATUS=…, STOPPING=1).
    pub async fn run(mut self, notify: &mut (dyn FnMut(&str) + Send)) -> Result<()> {
        let desired = self.load_desired();
        self.reload_config(Some(&desired));
        self.restore();
        loop {
            if !self.shutting_down() || self.settings.unload_on_stop {
                self.schedule();
            }
            self.publish(notify);
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
                    .filter(|(_, e)| e.running)
                    .map(|(n, _)| n.as_str())
                    .collect();
                warn!(
                    "stop timeout: exiting with {} step(s) still running ({}); they are abandoned",
                    left.len(),
                    left.join(", ")
                );
                break;
            }
            // Stopping clears every retry: then only the stop deadline wakes the loop.
            let next_wake = self
                .stop_deadline
                .or_else(|| self.entries.values().filter_map(|e| e.retry_at).min());
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
        notify("STOPPING=1");
        info!("stopped");
        Ok(())
    }
}

/// What a changed config of a wanted module calls for in `state`: what is
/// in the kernel is swapped; one that had nothing loaded (unsupported, say,
/// by a `kernel_match` that now includes the kernel) is loaded, unless work
/// is already under way or queued for it.
fn follow_change(state: Phase, busy: bool) -> Option<Op> {
    match state {
        Phase::Loaded | Phase::Failed | Phase::Busy => Some(Op::Reload),
        Phase::Unsupported | Phase::Inactive | Phase::Invalid if !busy => Some(Op::Load),
        _ => None,
    }
}

/// The module names to show as loaded: what kvcd inserted, or the configured ones (KVC libraries).
fn loaded_names(record: Option<&super::Record>, c: &ModuleConfig) -> Vec<String> {
    match record {
        Some(r) if !r.inserted.is_empty() => {
            r.inserted.iter().map(|o| o.name.to_string()).collect()
        }
        _ => c.modules.iter().map(ToString::to_string).collect(),
    }
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

fn run_op(
    factory: &KmodsFactory,
    settings: &DaemonSettings,
    kernel: &KernelRelease,
    name: &str,
    config: Option<&ModuleConfig>,
    op: Op,
    tx: &mpsc::UnboundedSender<Event>,
) -> Outcome {
    let kmods = match factory() {
        Ok(k) => k,
        Err(e) => return Outcome::failed(name, kernel, Step::Config, format!("{e:#}")),
    };
    let progress = |n: &str, s: &StepLog| {
        let _ = tx.send(Event::Progress(n.to_owned(), s.step));
    };
    let engine = Engine::from_settings(settings, kernel, &*kmods, Some(&progress));
    match (op, config) {
        (Op::Unload, c) => engine.unload(name, c),
        (Op::Load, Some(c)) => engine.load(c),
        (Op::Reload, Some(c)) => {
            let u = engine.unload(name, Some(c));
            if !u.state.is_ok() {
                return u;
            }
            // Fetch again: forget which extraction is current for this kernel.
            let index = settings
                .state_dir
                .join("images")
                .join(name)
                .join(kernel.as_str())
                .join("index.json");
            let _ = std::fs::remove_file(index);
            engine.load(c)
        }
        (_, None) => Outcome::failed(
            name,
            kernel,
            Step::Config,
            "no valid configuration".to_owned(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::{Op, Phase, backoff, follow_change};
    use std::time::Duration;

    #[test]
    fn a_changed_config_is_followed_from_every_resting_state() {
        assert_eq!(follow_change(Phase::Loaded, false), Some(Op::Reload));
        assert_eq!(follow_change(Phase::Failed, false), Some(Op::Reload));
        assert_eq!(follow_change(Phase::Busy, false), Some(Op::Reload));
        assert_eq!(follow_change(Phase::Unsupported, false), Some(Op::Load));
        assert_eq!(follow_change(Phase::Inactive, false), Some(Op::Load));
        assert_eq!(follow_change(Phase::Unsupported, true), None);
        assert_eq!(follow_change(Phase::Unloading, false), None);
    }

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
