//! What the agent publishes: one snapshot of every module config, sent on a
//! `watch` channel that the D-Bus objects (and tests) read.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use super::machine::Status;

/// Calls `$callback!` with every field of a module config's published
/// status, once: `/// description`, `field: RustType => DBusType, "DBusProperty";`.
/// The [`ModuleStatus`] struct, the D-Bus properties, their change signals
/// and the client's reading are all generated from this one list, so a new
/// field is one line here.
macro_rules! module_status_fields {
    ($callback:ident) => {
        $callback! {
            /// Module config name.
            name: String => String, "Name";
            /// inactive, fetching, verifying, loading, loaded, unloading, failed, busy, unsupported or invalid.
            state: Status => String, "State";
            /// The step under way or that failed.
            step: String => String, "Step";
            /// The last error; empty when none.
            error: String => String, "Error";
            /// The kernel.
            kernel: String => String, "Kernel";
            /// Driver image reference; empty for other sources.
            image: String => String, "Image";
            /// Driver image digest.
            image_digest: String => String, "ImageDigest";
            /// Modules loaded for this config.
            loaded_modules: Vec<String> => Vec<String>, "LoadedModules";
            /// Seconds since the epoch when the state last changed.
            since: u64 => u64, "Since";
            /// Seconds since the epoch of the next retry; 0 when none.
            next_retry: u64 => u64, "NextRetry";
            /// The config file in effect.
            config_file: String => String, "ConfigFile";
            /// True when the admin wants it loaded.
            wanted: bool => bool, "Wanted";
            /// Number of the last operation started.
            started_op: u64 => u64, "StartedOp";
            /// Number of the last operation finished.
            completed_op: u64 => u64, "CompletedOp";
        }
    };
}
pub(crate) use module_status_fields;

macro_rules! module_status_struct {
    ($( $(#[$doc:meta])* $field:ident : $ty:ty => $wire:ty, $prop:literal; )*) => {
        /// One module config as the agent publishes it (also the `kvcctl status --json` shape).
        #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
        pub struct ModuleStatus {
            $( $(#[$doc])* pub $field: $ty, )*
        }
    };
}
module_status_fields!(module_status_struct);

/// How a status field travels on the wire: as itself, or (the state) as its name.
pub trait Wire<W>: Sized {
    /// The value as sent.
    fn to_wire(&self) -> W;
    /// The value as received.
    fn from_wire(w: W) -> Self;
}

impl<T: Clone> Wire<T> for T {
    fn to_wire(&self) -> T {
        self.clone()
    }
    fn from_wire(w: T) -> Self {
        w
    }
}

impl Wire<String> for Status {
    fn to_wire(&self) -> String {
        self.as_str().to_owned()
    }
    /// An unknown name (a newer daemon) reads as invalid.
    fn from_wire(w: String) -> Self {
        Self::parse(&w).unwrap_or(Self::Invalid)
    }
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
    /// The kernels the node may boot next and the wanted configs' readiness for each.
    pub next: Vec<NextKernelWire>,
    /// Module signing: the key of `[signing]` and what the running kernel trusts ([`crate::signing::SigningStatus::wire`]).
    pub signing: BTreeMap<String, String>,
}

/// One kernel the node may boot next, as on D-Bus (`(sssba(sss))`): release,
/// role (`next`/`fallback`), where it was found, ready, and per config its
/// name, readiness state and detail.
pub type NextKernelWire = (String, String, String, bool, Vec<(String, String, String)>);

/// The D-Bus form of a readiness report.
pub fn next_wire(report: &super::next::NextReport) -> Vec<NextKernelWire> {
    report
        .kernels
        .iter()
        .map(|k| {
            let r = &k.readiness;
            (
                r.kernel.release.to_string(),
                r.kernel.role.as_str().to_owned(),
                r.kernel.describe(),
                r.ready,
                r.configs
                    .iter()
                    .map(|c| {
                        (
                            c.name.clone(),
                            c.readiness.state().to_owned(),
                            c.readiness.detail().to_owned(),
                        )
                    })
                    .collect(),
            )
        })
        .collect()
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
