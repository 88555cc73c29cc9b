//! The life of one module config as a pure state machine: a [`Module`] model,
//! the [`Event`]s that move it, and [`transition`], which says for every
//! event the statuses it may come from and what the agent must do
//! ([`Effect`]s). An event in a status that does not allow it is a
//! [`Refused`], never a silent catch-all. The agent only executes effects;
//! what it publishes is derived from the model ([`Module::published`]).

use std::collections::VecDeque;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::outcome::{Action, Outcome, State, Step};
use super::status::ModuleStatus;
use Status::{
    Busy, Failed, Fetching, Inactive, Invalid, Loaded, Loading, Unloading, Unsupported, Verifying,
};

/// Where a module config is in its life: the one status kvcd publishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Not loaded by kvcd.
    Inactive,
    /// Getting the driver image (pull, build, extract).
    Fetching,
    /// Storing and resolving the module files and checking them.
    Verifying,
    /// Taking out in-tree modules, inserting, hooks, ready check.
    Loading,
    /// Loaded and ready.
    Loaded,
    /// Removing modules.
    Unloading,
    /// A step failed (see `error`, `step`, `next_retry`).
    Failed,
    /// Unload refused: a module is in use.
    Busy,
    /// The running kernel does not match `kernel_match`.
    Unsupported,
    /// The config file is invalid and there is no earlier good one.
    Invalid,
}

impl Status {
    /// Every status, in declaration order.
    pub const ALL: [Self; 10] = [
        Self::Inactive,
        Self::Fetching,
        Self::Verifying,
        Self::Loading,
        Self::Loaded,
        Self::Unloading,
        Self::Failed,
        Self::Busy,
        Self::Unsupported,
        Self::Invalid,
    ];

    /// The status's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Inactive => "inactive",
            Self::Fetching => "fetching",
            Self::Verifying => "verifying",
            Self::Loading => "loading",
            Self::Loaded => "loaded",
            Self::Unloading => "unloading",
            Self::Failed => "failed",
            Self::Busy => "busy",
            Self::Unsupported => "unsupported",
            Self::Invalid => "invalid",
        }
    }

    /// True when no operation is under way.
    pub fn is_settled(self) -> bool {
        !matches!(
            self,
            Self::Fetching | Self::Verifying | Self::Loading | Self::Unloading
        )
    }

    /// Parses a status name.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// An operation on a module config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    /// Load it.
    Load,
    /// Unload it.
    Unload,
    /// Unload it, drop the cached extraction, load it again.
    Reload,
}

/// What the engine ran for an operation whose outcome is reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ran {
    /// A load; the outcome is the load's.
    Load,
    /// An unload (or the unload half of a reload, which then stopped); the outcome is the unload's.
    Unload,
    /// An unload that succeeded, then a load; the outcome is the load's.
    UnloadThenLoad,
}

/// What happens to a module config.
#[derive(Debug, Clone)]
pub enum Event {
    /// The admin wants it loaded; `seq` numbers the operation if one is queued.
    LoadRequested {
        /// Number for a queued operation.
        seq: u64,
    },
    /// The admin wants it unloaded.
    UnloadRequested {
        /// Number for a queued operation.
        seq: u64,
    },
    /// The admin wants it swapped: unload, fetch again, load.
    ReloadRequested {
        /// Number for a queued operation.
        seq: u64,
    },
    /// Its file was read and is valid (maybe unchanged).
    ConfigChanged {
        /// The file in effect.
        file: String,
        /// Its digest.
        digest: String,
        /// The modules it configures.
        modules: Vec<String>,
        /// Number for a queued operation.
        seq: u64,
    },
    /// Its file was read and is invalid.
    ConfigInvalid {
        /// The file in effect.
        file: String,
        /// Why it is invalid.
        error: String,
    },
    /// Its file is gone (deleted or masked).
    ConfigRemoved {
        /// Number for a queued operation.
        seq: u64,
    },
    /// At start-up: what the runtime record and the kernel say.
    Restored {
        /// kvcd has a runtime record for it.
        recorded: bool,
        /// When live as recorded: since when, and the modules kvcd inserted.
        live: Option<(u64, Vec<String>)>,
    },
    /// The next operation waits for these module configs to be loaded.
    Waiting {
        /// Their names.
        on: Vec<String>,
    },
    /// The scheduler starts the queued operation `seq`.
    WorkStarted {
        /// The operation.
        op: Operation,
        /// Its number.
        seq: u64,
    },
    /// The running operation reached `Step`.
    StepProgress(Step),
    /// The running operation finished.
    WorkDone {
        /// The operation.
        op: Operation,
        /// Its number.
        seq: u64,
        /// What the engine ran.
        ran: Ran,
        /// The engine's result.
        outcome: Box<Outcome>,
    },
    /// The retry timer fired.
    RetryDue {
        /// Number for the queued operation.
        seq: u64,
    },
    /// The agent stops; with `unload_seq`, what is loaded is unloaded first.
    Shutdown {
        /// Number for an unload, when `unload_on_stop` is set.
        unload_seq: Option<u64>,
    },
}

impl Event {
    /// The event's name, for refusals and logs.
    pub fn name(&self) -> &'static str {
        match self {
            Self::LoadRequested { .. } => "load requested",
            Self::UnloadRequested { .. } => "unload requested",
            Self::ReloadRequested { .. } => "reload requested",
            Self::ConfigChanged { .. } => "config changed",
            Self::ConfigInvalid { .. } => "config invalid",
            Self::ConfigRemoved { .. } => "config removed",
            Self::Restored { .. } => "restored",
            Self::Waiting { .. } => "waiting",
            Self::WorkStarted { .. } => "work started",
            Self::StepProgress(_) => "step progress",
            Self::WorkDone { .. } => "work done",
            Self::RetryDue { .. } => "retry due",
            Self::Shutdown { .. } => "shutdown",
        }
    }
}

/// What the agent must do after a transition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Answer the request with this operation number.
    Answer(u64),
    /// Operation `seq` was queued (the agent's counter moves past it).
    Queued(Operation, u64),
    /// Run the operation on the blocking pool.
    Run(Operation, u64),
    /// Fire [`Event::RetryDue`] after this delay.
    ArmRetry(Duration),
    /// Save which module configs are wanted (`RUNTIME/desired.json`).
    SaveDesired,
    /// Drop the module config: its file is gone and nothing of it is loaded.
    Forget,
}

/// Why an event was not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// Its file is gone.
    #[error("no module config")]
    NotFound,
    /// There is no good config to load (the file's problems).
    #[error("{0}")]
    InvalidConfig(String),
    /// The event is not allowed in this status.
    #[error("{event} is not allowed while {status}")]
    NotNow {
        /// The status.
        status: Status,
        /// The event's name.
        event: &'static str,
    },
}

/// What a transition may read besides the model: the clock and the backoff.
#[derive(Debug, Clone, Copy)]
pub struct Ctx {
    /// Seconds since the epoch.
    pub now: u64,
    /// The delay a retry scheduled now would wait.
    pub retry_delay: Duration,
}

/// One module config as the agent models it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Module {
    /// Where it is.
    pub status: Status,
    /// When `status` last changed (seconds since the epoch).
    pub since: u64,
    /// The step under way or that failed, or what it waits for.
    pub step: String,
    /// The last error; empty when none.
    pub error: String,
    /// The admin wants it loaded.
    pub wanted: bool,
    /// Its file is gone; it is unloaded, then forgotten.
    pub removed: bool,
    /// Digest of the good config in use; `None` when there is none.
    pub digest: Option<String>,
    /// The modules the good config names.
    pub configured: Vec<String>,
    /// The config file in effect.
    pub config_file: String,
    /// Why the current file is not used, when it is invalid.
    pub config_error: Option<String>,
    /// Driver image reference in use.
    pub image: String,
    /// Its digest.
    pub image_digest: String,
    /// Modules kvcd inserted for it and holds.
    pub owned: Vec<String>,
    /// kvcd may have a runtime record for it.
    pub recorded: bool,
    /// Operations waiting to run, oldest first.
    pub queue: VecDeque<(Operation, u64)>,
    /// The operation a pending retry repeats.
    pub retry: Option<Operation>,
    /// Failed attempts in a row (drives the backoff).
    pub attempts: u32,
    /// When the pending retry fires (seconds since the epoch); 0 when none.
    pub next_retry: u64,
    /// Number of the last operation started.
    pub started_op: u64,
    /// Number of the last operation finished.
    pub completed_op: u64,
    /// The agent is stopping: nothing is retried or followed.
    pub stopping: bool,
}

/// A config file as read: valid (digest and module names) or invalid (why).
pub type ConfigRead = Result<(String, Vec<String>), String>;

impl Module {
    /// A module config seen for the first time, `inactive` or `invalid`.
    pub fn new(file: String, config: ConfigRead, wanted: bool, now: u64) -> Self {
        let mut m = Self {
            status: Inactive,
            since: now,
            step: String::new(),
            error: String::new(),
            wanted,
            removed: false,
            digest: None,
            configured: Vec::new(),
            config_file: file,
            config_error: None,
            image: String::new(),
            image_digest: String::new(),
            owned: Vec::new(),
            recorded: false,
            queue: VecDeque::new(),
            retry: None,
            attempts: 0,
            next_retry: 0,
            started_op: 0,
            completed_op: 0,
            stopping: false,
        };
        match config {
            Ok((digest, modules)) => {
                m.digest = Some(digest);
                m.configured = modules;
            }
            Err(error) => {
                m.status = Invalid;
                m.error.clone_from(&error);
                m.config_error = Some(error);
            }
        }
        m
    }

    /// No operation runs or waits.
    pub fn idle(&self) -> bool {
        self.status.is_settled() && self.queue.is_empty()
    }

    /// The published status of module config `name` on `kernel`.
    pub fn published(&self, name: &str, kernel: &str) -> ModuleStatus {
        let loaded_modules = if self.status == Loaded && self.owned.is_empty() {
            // Nothing inserted by kvcd itself (a KVC library): the configured names.
            self.configured.clone()
        } else {
            self.owned.clone()
        };
        ModuleStatus {
            name: name.to_owned(),
            state: self.status,
            step: self.step.clone(),
            error: self.error.clone(),
            kernel: kernel.to_owned(),
            image: self.image.clone(),
            image_digest: self.image_digest.clone(),
            loaded_modules,
            since: self.since,
            next_retry: self.next_retry,
            config_file: self.config_file.clone(),
            wanted: self.wanted,
            started_op: self.started_op,
            completed_op: self.completed_op,
        }
    }

    fn set_status(&mut self, status: Status, now: u64) {
        if self.status != status {
            self.status = status;
            self.since = now;
        }
    }

    fn enqueue(&mut self, op: Operation, seq: u64, fx: &mut Vec<Effect>) {
        self.retry = None;
        self.next_retry = 0;
        self.queue.push_back((op, seq));
        fx.push(Effect::Queued(op, seq));
    }
}

/// The status a finished engine run leaves.
fn settled(state: State) -> Status {
    match state {
        State::Loaded => Loaded,
        State::Inactive | State::Prepared => Inactive,
        State::Unsupported => Unsupported,
        State::Failed => Failed,
        State::Busy => Busy,
    }
}

/// The status a step of running work shows.
fn working(step: Step, current: Status) -> Status {
    match step {
        Step::Fetch => Fetching,
        Step::Resolve | Step::Stage | Step::Verify => Verifying,
        Step::Remove | Step::Restore => Unloading,
        _ if current == Unloading => Unloading,
        _ => Loading,
    }
}

/// The modules kvcd holds after `ran` ended in `o`, given those it held before.
pub fn owned_after(before: &[String], ran: Ran, o: &Outcome) -> Vec<String> {
    // The engine's record is the truth when it says (a rollback that could
    // not remove a module leaves it held).
    if let Some(held) = &o.held {
        return held.clone();
    }
    let acted = |action: Action| {
        o.modules
            .iter()
            .filter(move |a| a.action == action)
            .map(|a| a.name.to_string())
    };
    match (ran, o.state) {
        (Ran::Unload, State::Inactive) => Vec::new(),
        (Ran::Unload, _) => {
            let removed: Vec<String> = acted(Action::Removed).collect();
            before
                .iter()
                .filter(|m| !removed.contains(m))
                .cloned()
                .collect()
        }
        (Ran::Load | Ran::UnloadThenLoad, state) => {
            let mut owned = if ran == Ran::Load {
                before.to_vec()
            } else {
                Vec::new()
            };
            // A failing post_load hook or ready check leaves the modules in;
            // any other failure rolled back what the run inserted.
            let kept = state == State::Loaded
                || o.error
                    .as_ref()
                    .is_some_and(|e| matches!(e.step, Step::Hook | Step::Ready));
            if kept {
                for m in acted(Action::Inserted) {
                    if !owned.contains(&m) {
                        owned.push(m);
                    }
                }
            }
            owned
        }
    }
}

/// Applies `ev` to `m`: the next model and what the agent must do, or why the event is refused.
pub fn transition(m: &Module, ev: Event, ctx: &Ctx) -> Result<(Module, Vec<Effect>), Refused> {
    let mut t = Transition {
        m,
        n: m.clone(),
        fx: Vec::new(),
        ctx,
        event: ev.name(),
    };
    match ev {
        Event::LoadRequested { seq } => t.load_requested(seq, Operation::Load),
        Event::ReloadRequested { seq } => t.load_requested(seq, Operation::Reload),
        Event::UnloadRequested { seq } => t.unload_requested(seq),
        Event::ConfigChanged {
            file,
            digest,
            modules,
            seq,
        } => {
            t.config_changed(file, digest, modules, seq);
            Ok(())
        }
        Event::ConfigInvalid { file, error } => {
            t.config_invalid(file, error);
            Ok(())
        }
        Event::ConfigRemoved { seq } => t.config_removed(seq),
        Event::Restored { recorded, live } => t.restored(recorded, live),
        Event::Waiting { on } => t.waiting(&on),
        Event::WorkStarted { op, seq } => t.work_started(op, seq),
        Event::StepProgress(step) => t.step_progress(step),
        Event::WorkDone {
            op,
            seq,
            ran,
            outcome,
        } => t.work_done(op, seq, ran, &outcome),
        Event::RetryDue { seq } => t.retry_due(seq),
        Event::Shutdown { unload_seq } => t.shutdown(unload_seq),
    }?;
    Ok((t.n, t.fx))
}

/// One transition under way: the model before (`m`), after (`n`) and the effects so far.
struct Transition<'a> {
    m: &'a Module,
    n: Module,
    fx: Vec<Effect>,
    ctx: &'a Ctx,
    event: &'static str,
}

impl Transition<'_> {
    fn not_now(&self) -> Result<(), Refused> {
        Err(Refused::NotNow {
            status: self.m.status,
            event: self.event,
        })
    }

    fn set_status(&mut self, status: Status) {
        self.n.set_status(status, self.ctx.now);
    }

    fn enqueue(&mut self, op: Operation, seq: u64) {
        self.n.enqueue(op, seq, &mut self.fx);
    }

    /// Load or reload: wanted from now on; answered at once when loaded and idle.
    fn load_requested(&mut self, seq: u64, op: Operation) -> Result<(), Refused> {
        let m = self.m;
        if m.removed {
            return Err(Refused::NotFound);
        }
        match (m.status, m.digest.is_some()) {
            // No good config (an unload of a removed one may still run).
            (Invalid, _)
            | (
                Inactive | Fetching | Verifying | Loading | Loaded | Unloading | Failed | Busy
                | Unsupported,
                false,
            ) => Err(Refused::InvalidConfig(
                m.config_error.clone().unwrap_or_default(),
            )),
            (
                Inactive | Fetching | Verifying | Loading | Loaded | Unloading | Failed | Busy
                | Unsupported,
                true,
            ) => {
                self.n.wanted = true;
                self.n.queue.retain(|(o, _)| *o != Operation::Unload);
                self.fx.push(Effect::SaveDesired);
                if op == Operation::Load && m.status == Loaded && self.n.idle() {
                    self.fx.push(Effect::Answer(m.completed_op));
                } else {
                    self.enqueue(op, seq);
                    self.fx.push(Effect::Answer(seq));
                }
                Ok(())
            }
        }
    }

    /// Unload: unwanted from now on; answered at once when nothing is loaded or under way.
    fn unload_requested(&mut self, seq: u64) -> Result<(), Refused> {
        let m = self.m;
        if m.removed {
            return Err(Refused::NotFound);
        }
        self.n.wanted = false;
        self.n.queue.retain(|(o, _)| *o == Operation::Unload);
        self.fx.push(Effect::SaveDesired);
        match m.status {
            Inactive | Invalid | Unsupported if self.n.queue.is_empty() => {
                self.fx.push(Effect::Answer(m.completed_op));
            }
            Inactive | Invalid | Unsupported | Fetching | Verifying | Loading | Loaded
            | Unloading | Failed | Busy => {
                self.enqueue(Operation::Unload, seq);
                self.fx.push(Effect::Answer(seq));
            }
        }
        Ok(())
    }

    /// A valid file: taken from every status; a change of a wanted config is followed.
    fn config_changed(&mut self, file: String, digest: String, modules: Vec<String>, seq: u64) {
        let m = self.m;
        self.n.removed = false;
        self.n.config_file = file;
        let changed = m.digest.as_deref() != Some(digest.as_str());
        self.n.digest = Some(digest);
        self.n.configured = modules;
        if self.n.config_error.take().is_some() {
            self.n.error.clear();
            if m.status == Invalid {
                self.set_status(Inactive);
            }
        }
        if changed && self.n.wanted && !self.n.stopping {
            // What is in the kernel is swapped; what had nothing loaded is loaded, unless work is under way.
            match self.n.status {
                Loaded | Failed | Busy => self.enqueue(Operation::Reload, seq),
                Inactive | Unsupported | Invalid if self.n.queue.is_empty() => {
                    self.enqueue(Operation::Load, seq);
                }
                Inactive | Unsupported | Invalid | Fetching | Verifying | Loading | Unloading => {}
            }
        }
    }

    /// An invalid file: the last good config stays; without one, the config is invalid.
    fn config_invalid(&mut self, file: String, error: String) {
        self.n.removed = false;
        self.n.config_file = file;
        match (self.m.status, self.m.digest.is_some()) {
            (
                Inactive | Loaded | Failed | Busy | Unsupported | Invalid | Fetching | Verifying
                | Loading | Unloading,
                true,
            ) => {
                self.n.error = format!("invalid configuration, keeping the last good one: {error}");
            }
            (Inactive | Loaded | Failed | Busy | Unsupported | Invalid, false) => {
                self.set_status(Invalid);
                self.n.error.clone_from(&error);
            }
            // Work under way (the unload of a removed config) settles it.
            (Fetching | Verifying | Loading | Unloading, false) => self.n.error.clone_from(&error),
        }
        self.n.config_error = Some(error);
    }

    /// The file is gone: unload what may be loaded, forget the rest.
    fn config_removed(&mut self, seq: u64) -> Result<(), Refused> {
        let m = self.m;
        if m.removed {
            return Err(Refused::NotFound);
        }
        self.n.removed = true;
        self.n.wanted = false;
        self.n.digest = None;
        self.n.configured.clear();
        self.fx.push(Effect::SaveDesired);
        let holds = m.recorded || !m.owned.is_empty();
        match m.status {
            Inactive | Unsupported | Invalid | Failed if !holds => self.fx.push(Effect::Forget),
            Inactive | Unsupported | Invalid | Failed | Loaded | Busy | Fetching | Verifying
            | Loading | Unloading => {
                self.n.queue.clear();
                self.enqueue(Operation::Unload, seq);
            }
        }
        Ok(())
    }

    /// Start-up: adopt what is live as recorded; remember a record for a later removal.
    fn restored(
        &mut self,
        recorded: bool,
        live: Option<(u64, Vec<String>)>,
    ) -> Result<(), Refused> {
        match self.m.status {
            Inactive => {
                self.n.recorded = recorded;
                if let Some((since, owned)) = live {
                    self.set_status(Loaded);
                    self.n.since = since;
                    self.n.owned = owned;
                }
                Ok(())
            }
            Invalid if live.is_none() => {
                self.n.recorded = recorded;
                Ok(())
            }
            Invalid | Fetching | Verifying | Loading | Loaded | Unloading | Failed | Busy
            | Unsupported => self.not_now(),
        }
    }

    /// The queued operation waits for predecessors.
    fn waiting(&mut self, on: &[String]) -> Result<(), Refused> {
        match self.m.status {
            Inactive | Loaded | Failed | Busy | Unsupported | Invalid
                if !self.m.queue.is_empty() =>
            {
                self.n.step = format!("waiting for {}", on.join(", "));
                Ok(())
            }
            Inactive | Loaded | Failed | Busy | Unsupported | Invalid | Fetching | Verifying
            | Loading | Unloading => self.not_now(),
        }
    }

    /// The front of the queue starts, when nothing runs.
    fn work_started(&mut self, op: Operation, seq: u64) -> Result<(), Refused> {
        match self.m.status {
            Inactive | Loaded | Failed | Busy | Unsupported | Invalid
                if self.m.queue.front() == Some(&(op, seq)) =>
            {
                self.n.queue.pop_front();
                self.n.started_op = seq;
                self.n.error.clear();
                self.n.step.clear();
                self.n.next_retry = 0;
                self.set_status(if op == Operation::Unload {
                    Unloading
                } else {
                    Verifying
                });
                self.fx.push(Effect::Run(op, seq));
                Ok(())
            }
            Inactive | Loaded | Failed | Busy | Unsupported | Invalid | Fetching | Verifying
            | Loading | Unloading => self.not_now(),
        }
    }

    /// Running work reached `step`.
    fn step_progress(&mut self, step: Step) -> Result<(), Refused> {
        match self.m.status {
            Fetching | Verifying | Loading | Unloading => {
                self.set_status(working(step, self.m.status));
                self.n.step = step.as_str().to_owned();
                Ok(())
            }
            Inactive | Loaded | Failed | Busy | Unsupported | Invalid => self.not_now(),
        }
    }

    /// Running work finished: the engine's result decides the status; a failure is retried with backoff.
    fn work_done(
        &mut self,
        op: Operation,
        seq: u64,
        ran: Ran,
        outcome: &Outcome,
    ) -> Result<(), Refused> {
        match self.m.status {
            Fetching | Verifying | Loading | Unloading => {}
            Inactive | Loaded | Failed | Busy | Unsupported | Invalid => return self.not_now(),
        }
        let (m, n, ctx) = (self.m, &mut self.n, self.ctx);
        n.completed_op = seq;
        if let Some(i) = &outcome.image {
            n.image.clone_from(&i.reference);
            n.image_digest.clone_from(&i.digest);
        }
        let status = settled(outcome.state);
        n.set_status(status, ctx.now);
        n.owned = owned_after(&m.owned, ran, outcome);
        n.recorded = match (ran, outcome.state) {
            (Ran::Unload, State::Inactive) => false,
            (_, State::Loaded) => true,
            _ => m.recorded || !n.owned.is_empty(),
        };
        match &outcome.error {
            None => {
                n.error = m
                    .config_error
                    .as_ref()
                    .map(|e| format!("invalid configuration, keeping the last good one: {e}"))
                    .or_else(|| {
                        // Why it does not apply (kernel_match, no matching device).
                        (outcome.state == State::Unsupported)
                            .then(|| outcome.steps.last().map(|s| s.detail.clone()))
                            .flatten()
                    })
                    .unwrap_or_default();
                n.step.clear();
                n.attempts = 0;
            }
            Some(err) => {
                n.error.clone_from(&err.message);
                n.step = err.step.as_str().to_owned();
                // Retry what the admin wants.
                let wants_it =
                    (n.wanted && op != Operation::Unload) || (!n.wanted && op == Operation::Unload);
                if wants_it && !n.stopping && n.queue.is_empty() {
                    n.attempts = n.attempts.saturating_add(1);
                    n.retry = Some(op);
                    n.next_retry = ctx.now + ctx.retry_delay.as_secs().max(1);
                    self.fx.push(Effect::ArmRetry(ctx.retry_delay));
                }
            }
        }
        if self.n.removed && self.n.queue.is_empty() && status == Inactive {
            self.fx.push(Effect::Forget);
        }
        Ok(())
    }

    /// The retry timer fired: queue what the admin wants now (a reload stays a reload).
    fn retry_due(&mut self, seq: u64) -> Result<(), Refused> {
        match (self.m.status, self.m.retry) {
            (Failed | Busy, Some(retry)) => {
                let op = match (self.m.wanted, retry) {
                    (true, Operation::Reload) => Operation::Reload,
                    (true, Operation::Load | Operation::Unload) => Operation::Load,
                    (false, _) => Operation::Unload,
                };
                self.enqueue(op, seq);
                Ok(())
            }
            (
                Failed | Busy | Inactive | Fetching | Verifying | Loading | Loaded | Unloading
                | Unsupported | Invalid,
                _,
            ) => self.not_now(),
        }
    }

    /// Stopping: nothing queued or retried; what is loaded is unloaded when asked.
    fn shutdown(&mut self, unload_seq: Option<u64>) -> Result<(), Refused> {
        if self.m.stopping {
            return self.not_now();
        }
        self.n.stopping = true;
        self.n.queue.clear();
        self.n.retry = None;
        match (self.m.status, unload_seq) {
            (Loaded, Some(seq)) => self.enqueue(Operation::Unload, seq),
            (
                Loaded | Inactive | Fetching | Verifying | Loading | Unloading | Failed | Busy
                | Unsupported | Invalid,
                _,
            ) => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
