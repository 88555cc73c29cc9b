//! What one apply did to one module config, for people and machines.

use std::fmt;
use std::path::PathBuf;

use serde::Serialize;

use crate::kernel::KernelRelease;
use crate::kmod::{ModName, ModuleFile};

/// Where a module config ended up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Not loaded by kvcd.
    Inactive,
    /// Every configured module is live.
    Loaded,
    /// The kernel does not match `kernel_match`; nothing to do.
    Unsupported,
    /// A step failed.
    Failed,
    /// Refused because a module is in use; nothing changed.
    Busy,
    /// Artifacts fetched and verified for a kernel; nothing loaded.
    Prepared,
}

impl State {
    /// True for outcomes that count as success.
    pub fn is_ok(self) -> bool {
        matches!(
            self,
            Self::Inactive | Self::Loaded | Self::Unsupported | Self::Prepared
        )
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Inactive => "inactive",
            Self::Loaded => "loaded",
            Self::Unsupported => "unsupported",
            Self::Failed => "failed",
            Self::Busy => "busy",
            Self::Prepared => "prepared",
        })
    }
}

/// A step of applying a module config (the `KVCD_STEP` journal field).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Step {
    /// Reading the config and checking ordering.
    Config,
    /// Getting the driver image and extracting it.
    Fetch,
    /// Finding the module files and the load order.
    Resolve,
    /// Storing the module files the load needs (by content).
    Stage,
    /// Checking vermagic and versions.
    Verify,
    /// Taking out in-tree modules.
    Replace,
    /// Placing or removing firmware.
    Firmware,
    /// Inserting modules.
    Insert,
    /// Removing modules.
    Remove,
    /// Putting in-tree modules back.
    Restore,
    /// Writing the runtime record.
    Record,
    /// Removing artifacts of old kernels.
    Prune,
    /// Running a vendor hook.
    Hook,
    /// Waiting for the ready check.
    Ready,
    /// Running a KVC framework library.
    Kvc,
}

impl Step {
    /// The step's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Config => "config",
            Self::Fetch => "fetch",
            Self::Resolve => "resolve",
            Self::Stage => "stage",
            Self::Verify => "verify",
            Self::Replace => "replace",
            Self::Firmware => "firmware",
            Self::Insert => "insert",
            Self::Remove => "remove",
            Self::Restore => "restore",
            Self::Record => "record",
            Self::Prune => "prune",
            Self::Hook => "hook",
            Self::Ready => "ready",
            Self::Kvc => "kvc",
        }
    }
}

/// One line of progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StepLog {
    /// The step.
    pub step: Step,
    /// What happened.
    pub detail: String,
}

/// The step that failed and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StepError {
    /// The step.
    pub step: Step,
    /// The error with its causes.
    pub message: String,
}

/// What happened to one module.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    /// kvcd inserted it.
    Inserted,
    /// It was live already.
    AlreadyLoaded,
    /// kvcd removed it.
    Removed,
}

/// A module and what was done with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ModuleAction {
    /// Module name.
    pub name: ModName,
    /// Its file.
    pub path: PathBuf,
    /// What was done.
    pub action: Action,
    /// Parameters it was inserted with.
    pub params: Vec<String>,
}

impl ModuleAction {
    pub(super) fn new(f: &ModuleFile, action: Action, params: Vec<String>) -> Self {
        Self {
            name: f.name.clone(),
            path: f.path.clone(),
            action,
            params,
        }
    }
}

/// The result of applying one module config.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    /// Module config name.
    pub name: String,
    /// Target kernel.
    pub kernel: String,
    /// Final state.
    pub state: State,
    /// The failure, when `state` is failed or busy.
    pub error: Option<StepError>,
    /// Modules touched.
    pub modules: Vec<ModuleAction>,
    /// The driver image used, for image sources.
    pub image: Option<ImageRef>,
    /// The directory the module files came from (after extraction, for images).
    pub artifacts: Option<PathBuf>,
    /// How many podman processes this apply spawned.
    pub podman_calls: usize,
    /// True when the image in use was built on this node.
    #[serde(skip)]
    pub(crate) built_image: bool,
    /// The modules kvcd holds for this config after the run, from its record
    /// (none when the run did not say, as for a KVC library).
    #[serde(skip)]
    pub held: Option<Vec<String>>,
    /// Everything that happened, in order.
    pub steps: Vec<StepLog>,
}

/// An image reference and the digest it resolved to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ImageRef {
    /// Expanded reference.
    pub reference: String,
    /// Manifest digest, or image ID for a local build.
    pub digest: String,
}

impl Outcome {
    pub(crate) fn new(name: &str, kernel: &KernelRelease) -> Self {
        Self {
            name: name.to_owned(),
            kernel: kernel.to_string(),
            state: State::Inactive,
            error: None,
            modules: Vec::new(),
            image: None,
            artifacts: None,
            podman_calls: 0,
            built_image: false,
            held: None,
            steps: Vec::new(),
        }
    }

    /// A failure before the engine ran (e.g. an invalid config).
    pub fn failed(name: &str, kernel: &KernelRelease, step: Step, message: String) -> Self {
        let mut o = Self::new(name, kernel);
        o.state = State::Failed;
        o.error = Some(StepError { step, message });
        o
    }
}
