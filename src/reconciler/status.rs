//! What the agent publishes: one snapshot of every module config, sent on a
//! `watch` channel that the D-Bus objects (and tests) read.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// Where a module config is in its life, as the agent reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Not loaded by kvcd.
    Inactive,
    /// Getting the driver image (pull, build, extract).
    Fetching,
    /// Building the module tree and checking the files.
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

impl Phase {
    /// The phase's name.
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

    /// Parses a phase name.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "inactive" => Self::Inactive,
            "fetching" => Self::Fetching,
            "verifying" => Self::Verifying,
            "loading" => Self::Loading,
            "loaded" => Self::Loaded,
            "unloading" => Self::Unloading,
            "failed" => Self::Failed,
            "busy" => Self::Busy,
            "unsupported" => Self::Unsupported,
            "invalid" => Self::Invalid,
            _ => return None,
        })
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// One module config as the agent sees it (also the `kvcctl status --json` shape).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleStatus {
    /// Module config name.
    pub name: String,
    /// Phase.
    pub state: Phase,
    /// The step under way or that failed; empty when none.
    pub step: String,
    /// The last error; empty when none.
    pub error: String,
    /// Kernel the status is about.
    pub kernel: String,
    /// Driver image reference in use; empty for other sources.
    pub image: String,
    /// Its digest; empty when none.
    pub image_digest: String,
    /// Modules kvcd inserted for this config (and configured modules found live).
    pub loaded_modules: Vec<String>,
    /// Seconds since the epoch when the state last changed.
    pub since: u64,
    /// Seconds since the epoch of the next retry; 0 when none is planned.
    pub next_retry: u64,
    /// The config file in effect.
    pub config_file: String,
    /// True when the admin wants it loaded (persisted across restarts).
    pub wanted: bool,
    /// Sequence number of the last operation started for it.
    pub started_op: u64,
    /// Sequence number of the last operation that finished.
    pub completed_op: u64,
}

/// Everything the agent publishes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// kvcd's version.
    pub version: String,
    /// The running kernel.
    pub kernel: String,
    /// Module configs by name.
    pub modules: BTreeMap<String, ModuleStatus>,
    /// Problems outside the module configs (e.g. a broken kvcd.toml).
    pub errors: Vec<String>,
}

impl Snapshot {
    /// A one-line summary for systemd's STATUS=, e.g. `2 loaded, 1 failed`.
    pub fn summary(&self) -> String {
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        for m in self.modules.values() {
            *counts.entry(m.state.as_str()).or_default() += 1;
        }
        if counts.is_empty() {
            return "no module configs".to_owned();
        }
        counts
            .iter()
            .map(|(k, n)| format!("{n} {k}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}
