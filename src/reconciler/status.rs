//! What the agent publishes: one snapshot of every module config, sent on a
//! `watch` channel that the D-Bus objects (and tests) read.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use super::machine::Status;

/// One module config as the agent sees it (also the `kvcctl status --json` shape).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleStatus {
    /// Module config name.
    pub name: String,
    /// Status.
    pub state: Status,
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
