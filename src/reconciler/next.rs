//! Whether a module config is ready for a kernel the node may boot next:
//! its files verified for that kernel with the config as it is now, and,
//! for an image, the extraction there, so the boot needs no podman.

use std::path::PathBuf;

use serde::Serialize;

use super::Engine;
use crate::artifacts::image::current_extraction;
use crate::config::{ImageSource, ModuleConfig, PullPolicy, Source};
use crate::kernel::{TemplateError, expand};
use crate::state::Layout;
use crate::state::index::ImageIndex;

/// The index a kernel's module tree needs before anything can be prepared for it.
const INDEX: &str = "modules.dep.bin";

/// A module config's readiness for one kernel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", content = "detail", rename_all = "kebab-case")]
pub enum Readiness {
    /// Prepared: the boot loads it without fetching anything.
    Ready(String),
    /// Not prepared (or no longer): the boot would take the cold path.
    NotPrepared(String),
    /// Its last prepare failed.
    Failed(String),
    /// `kernel_match` leaves the kernel out: nothing to prepare.
    NotApplicable(String),
}

impl Readiness {
    /// True unless the boot would lack this driver or fetch it first.
    pub fn is_ready(&self) -> bool {
        matches!(self, Self::Ready(_) | Self::NotApplicable(_))
    }

    /// The state as shown: `ready`, `not-prepared`, `failed`, `not-applicable`.
    pub fn state(&self) -> &'static str {
        match self {
            Self::Ready(_) => "ready",
            Self::NotPrepared(_) => "not-prepared",
            Self::Failed(_) => "failed",
            Self::NotApplicable(_) => "not-applicable",
        }
    }

    /// Why.
    pub fn detail(&self) -> &str {
        match self {
            Self::Ready(d) | Self::NotPrepared(d) | Self::Failed(d) | Self::NotApplicable(d) => d,
        }
    }
}

impl Engine<'_> {
    /// The engine for a kernel found in `modules_dir` (its `KERNEL/` tree is
    /// what the prepare resolves and verifies against); the artifacts of the
    /// `protect` kernels are never pruned by it.
    #[must_use]
    pub fn for_tree(mut self, modules_dir: PathBuf, protect: Vec<String>) -> Self {
        self.layout.kernel_modules_dir = modules_dir;
        self.protect = protect;
        self
    }

    /// The image reference of `c` for this engine's kernel and its current
    /// extraction, if there is one (what lets a load skip podman).
    fn current_image(
        &self,
        c: &ModuleConfig,
        src: &ImageSource,
    ) -> Result<(String, Option<ImageIndex>), TemplateError> {
        let reference = expand(&src.reference, &self.vars(c))?;
        let dir = Layout::image_dir(
            &self.layout.state_dir,
            c.name.as_str(),
            self.kernel.as_str(),
        );
        let idx = current_extraction(&dir, &c.digest, &reference);
        Ok((reference, idx))
    }

    /// A note for a load that takes the cold path on a kernel the config was
    /// not prepared for although it was for others (the node rebooted into a
    /// kernel nothing prepared it for); `None` otherwise.
    pub(super) fn cold_path_note(&self, c: &ModuleConfig) -> Option<String> {
        let Source::Image(src) = &c.source else {
            return None;
        };
        let k = &self.kernel;
        if self.current_image(c, src).ok()?.1.is_some() {
            return None;
        }
        let others: Vec<String> = Layout::set_kernels(&self.layout.state_dir, c.name.as_str())
            .into_iter()
            .filter(|o| o != k.as_str())
            .collect();
        (!others.is_empty()).then(|| {
            format!(
                "{} was not prepared for kernel {k} before this boot (it was for {}): fetching it now",
                c.name,
                others.join(", ")
            )
        })
    }

    /// Whether `c` is ready for this engine's kernel (read from the state
    /// directory only; nothing is fetched or changed).
    pub fn readiness(&self, c: &ModuleConfig) -> Readiness {
        let k = &self.kernel;
        if !c.supports(k) {
            return Readiness::NotApplicable(format!(
                "kernel_match in {} leaves out kernel {k}",
                c.file.display()
            ));
        }
        if let Err(why) = self.device_for(c) {
            return Readiness::NotApplicable(why);
        }
        let index = self.layout.host_tree(k).join(INDEX);
        if !index.is_file() {
            return Readiness::NotPrepared(format!(
                "kernel {k}'s module tree has no index yet ({}; its package's scripts run `depmod {k}`)",
                index.display()
            ));
        }
        let set = match self.layout.set(c.name.as_str(), k) {
            Ok(Some(s)) => s,
            Ok(None) => {
                return Readiness::NotPrepared(format!("never prepared for kernel {k}"));
            }
            Err(e) => return Readiness::NotPrepared(format!("{e:#}")),
        };
        match set.verified_for.as_deref() {
            Some(d) if d == self.verified_token(c) => {}
            Some(_) => {
                return Readiness::NotPrepared(format!(
                    "prepared for kernel {k} before {} last changed",
                    c.file.display()
                ));
            }
            None => {
                return Readiness::NotPrepared(format!(
                    "its files for kernel {k} did not pass verification"
                ));
            }
        }
        if let Some((name, _)) = set
            .files
            .iter()
            .find(|(_, f)| !self.layout.stored_file(f).is_file())
        {
            return Readiness::NotPrepared(format!(
                "the stored file of {name} for kernel {k} is gone"
            ));
        }
        match &c.source {
            Source::Image(src) => {
                let (reference, idx) = match self.current_image(c, src) {
                    Ok(found) => found,
                    Err(e) => return Readiness::NotPrepared(format!("key `image.ref`: {e}")),
                };
                let Some(idx) = idx else {
                    return Readiness::NotPrepared(format!(
                        "no current extraction of {reference} for kernel {k}: the boot would pull or build it"
                    ));
                };
                if src.pull == PullPolicy::Always {
                    Readiness::Ready(format!(
                        "{reference} ({}) extracted; pull = \"always\" asks the registry again at boot",
                        idx.digest
                    ))
                } else {
                    Readiness::Ready(format!(
                        "{reference} ({}) extracted and verified",
                        idx.digest
                    ))
                }
            }
            Source::Directory { .. } => {
                Readiness::Ready(format!("{} file(s) stored and verified", set.files.len()))
            }
            Source::KvcLibrary { .. } => {
                Readiness::Ready("the library's build_kmods succeeded".to_owned())
            }
        }
    }
}

/// The configs a next-kernels job works on: `names` when given (the caller
/// checks them); else the `valid` ones the agent wants loaded; else every
/// valid one (nothing is wanted yet). Order is kept; callers load-order.
pub fn choose(names: &[String], valid: &[String], wanted: impl Fn(&str) -> bool) -> Vec<String> {
    if !names.is_empty() {
        return names.to_vec();
    }
    let chosen: Vec<String> = valid.iter().filter(|n| wanted(n)).cloned().collect();
    if chosen.is_empty() {
        valid.to_vec()
    } else {
        chosen
    }
}

/// One config's readiness for one kernel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ConfigReadiness {
    /// Module config name.
    pub name: String,
    /// Its readiness.
    #[serde(flatten)]
    pub readiness: Readiness,
}

/// A kernel the node may boot next, and whether every wanted config is ready for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KernelReadiness {
    /// The kernel, where it was found and its role.
    #[serde(flatten)]
    pub kernel: crate::boot::NextKernel,
    /// True when every config is ready (or does not apply).
    pub ready: bool,
    /// Per config, in name order.
    pub configs: Vec<ConfigReadiness>,
}

impl KernelReadiness {
    /// The readiness of `configs` for `kernel`, read through `engine` (an engine for that kernel).
    pub fn of(
        engine: &Engine<'_>,
        kernel: crate::boot::NextKernel,
        configs: &[&ModuleConfig],
    ) -> Self {
        let configs: Vec<ConfigReadiness> = configs
            .iter()
            .map(|c| ConfigReadiness {
                name: c.name.to_string(),
                readiness: engine.readiness(c),
            })
            .collect();
        Self {
            ready: configs.iter().all(|c| c.readiness.is_ready()),
            kernel,
            configs,
        }
    }
}

/// One kernel in a [`NextReport`]: its readiness and what the prepare did.
#[derive(Debug, Clone, Serialize)]
pub struct KernelReport {
    /// The kernel and the readiness of each config after the prepare.
    #[serde(flatten)]
    pub readiness: KernelReadiness,
    /// The prepare's outcome per config (empty when only checked).
    pub results: Vec<super::Outcome>,
}

/// What `prepare-next` (or a check) found and did.
#[derive(Debug, Clone, Serialize)]
pub struct NextReport {
    /// The running kernel.
    pub running: String,
    /// The root the kernels were looked for under.
    pub sysroot: PathBuf,
    /// Kernels the node may boot next: `next` first, then fallbacks.
    pub kernels: Vec<KernelReport>,
    /// What discovery skipped, and why.
    pub notes: Vec<String>,
}

impl NextReport {
    /// True when every config is ready for every kernel the node boots next
    /// (and, with `all`, for the fallbacks too).
    pub fn ready(&self, all: bool) -> bool {
        self.kernels
            .iter()
            .filter(|k| all || k.readiness.kernel.role == crate::boot::Role::Next)
            .all(|k| k.readiness.ready)
    }
}

/// How [`run`] goes about it.
pub struct NextRun<'a> {
    /// kvcd.toml's settings.
    pub settings: &'a crate::config::DaemonSettings,
    /// The running kernel's modules.
    pub kmods: &'a dyn crate::kmod::KernelModules,
    /// Where to look for kernels (`/` for the node).
    pub sysroot: &'a std::path::Path,
    /// The running kernel.
    pub running: &'a crate::kernel::KernelRelease,
    /// Progress output, if any.
    pub on_step: Option<&'a super::OnStep<'a>>,
    /// Set to stop between configs.
    pub cancel: Option<&'a std::sync::atomic::AtomicBool>,
}

impl std::fmt::Debug for NextRun<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NextRun")
            .field("sysroot", &self.sysroot)
            .field("running", &self.running)
            .finish_non_exhaustive()
    }
}

/// Finds the kernels the node may boot next; with `prepare`, prepares
/// `configs` (in order) for each (every `next` kernel, and fallbacks up to
/// `keep_kernels` kernels in all); then reads each config's readiness.
pub fn run(r: &NextRun<'_>, configs: &[&ModuleConfig], prepare: bool) -> NextReport {
    let found = crate::boot::discover(r.sysroot, &r.settings.kernel_modules_dir, r.running);
    let protect: Vec<String> = found
        .kernels
        .iter()
        .map(|k| k.release.to_string())
        .collect();
    let mut kernels = Vec::new();
    for (i, k) in found.kernels.into_iter().enumerate() {
        let engine = Engine::from_settings(r.settings, &k.release, r.kmods, r.on_step)
            .for_tree(k.modules_dir.clone(), protect.clone());
        let within = k.role == crate::boot::Role::Next || i < r.settings.keep_kernels;
        // A tree the package manager is still writing has no index yet:
        // nothing can be prepared for it (its readiness says so).
        let indexed = engine.layout.host_tree(&k.release).join(INDEX).is_file();
        let mut results = Vec::new();
        if prepare && within && indexed {
            for c in configs {
                if r.cancel
                    .is_some_and(|c| c.load(std::sync::atomic::Ordering::Relaxed))
                {
                    break;
                }
                results.push(engine.prepare(c));
            }
        }
        let mut readiness = KernelReadiness::of(&engine, k, configs);
        // A prepare that failed says why better than "not prepared".
        for c in &mut readiness.configs {
            let failed = results
                .iter()
                .find(|o: &&super::Outcome| o.name == c.name)
                .and_then(|o| o.error.as_ref());
            if let (Some(e), false) = (failed, c.readiness.is_ready()) {
                c.readiness = Readiness::Failed(format!("{}: {}", e.step.as_str(), e.message));
            }
        }
        kernels.push(KernelReport { readiness, results });
    }
    NextReport {
        running: r.running.to_string(),
        sysroot: r.sysroot.to_owned(),
        kernels,
        notes: found.notes,
    }
}

#[cfg(test)]
mod tests {
    use super::choose;

    fn v(names: &[&str]) -> Vec<String> {
        names.iter().map(|n| (*n).to_owned()).collect()
    }

    #[test]
    fn names_win_then_the_wanted_then_every_valid_config() {
        let valid = v(&["base", "nic", "gpu"]);
        assert_eq!(choose(&v(&["x"]), &valid, |_| true), v(&["x"]));
        assert_eq!(choose(&[], &valid, |n| n != "nic"), v(&["base", "gpu"]));
        assert_eq!(choose(&[], &valid, |_| false), valid);
    }
}
