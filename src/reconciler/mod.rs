//! Applying module configs to the running kernel.
//!
//! [`Engine::load`] takes a module config from its files to modules live in
//! the kernel: resolve the source, store the files it needs and resolve their
//! load order over the kernel's own index, verify every file, take out
//! in-tree modules it replaces, insert in dependency order. [`Engine::unload`] reverses what the runtime record says kvcd did,
//! and refuses (changing nothing) when a module is in use. Both are
//! idempotent, and a failed load rolls back what that load changed.

pub mod agent;
mod firmware;
mod intent;
pub mod machine;
pub mod next;
pub mod order;
mod outcome;
mod plan;
pub mod status;
mod vendor;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use anyhow::{Context as _, Result, anyhow};
use tracing::{info, warn};

use crate::artifacts::image::{BuildHook, FetchRequest, ImageStore};
use crate::artifacts::podman::{ContainerTool, Podman};
use crate::artifacts::{ModuleStore, directory, prune, verify};
use crate::config::{ModuleConfig, Source};
use crate::kernel::{KernelRelease, expand};
use crate::kmod::{
    IdentityMatch, KernelModules, KmodErrorKind, LiveModule, ModInfo, ModName, ModuleFile,
    ModuleIdentity, ModuleTree, resolve,
};
use crate::state::Layout;

pub use crate::state::{Intent, Owned, Record, RecordStore};
pub use outcome::{Action, ImageRef, ModuleAction, Outcome, State, Step, StepError, StepLog};
use plan::LoadStep;

/// A progress callback: module config name and the step just logged.
pub type OnStep<'a> = dyn Fn(&str, &StepLog) + 'a;

/// Applies module configs for one target kernel.
pub struct Engine<'a> {
    /// Where module files are stored and which kernel trees they resolve against.
    pub layout: ModuleStore,
    /// The kernel the artifacts are for (normally the running one).
    pub kernel: KernelRelease,
    /// The running kernel's modules.
    pub kmods: &'a dyn KernelModules,
    /// Runtime records.
    pub records: RecordStore,
    /// Podman, for image sources.
    pub podman: Box<dyn ContainerTool>,
    /// Host directory for firmware from images (kvcd owns it).
    pub firmware_dir: PathBuf,
    /// Kernels whose artifacts are kept per module config, besides the running one.
    pub keep_kernels: usize,
    /// Kernels whose artifacts pruning never removes, besides the running and target ones; default none.
    pub protect: Vec<String>,
    /// True when the target kernel is the one `kmods` reads (what is live
    /// says nothing about another kernel); default: it is the running one.
    pub target_is_live: bool,
    /// Called for every step as it happens (human output); default none.
    pub on_step: Option<&'a OnStep<'a>>,
    /// The key staged modules are signed with (`[signing]`), loaded once; default none.
    pub signing: Option<std::sync::Arc<crate::signing::Signing>>,
    /// Where the node's devices are read for `[match]`; default `/sys`.
    pub sysfs: PathBuf,
}

impl std::fmt::Debug for Engine<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("kernel", &self.kernel)
            .field("layout", &self.layout)
            .finish_non_exhaustive()
    }
}

/// A step failed: which one, and why.
#[derive(Debug)]
struct Fail(Step, anyhow::Error, State);

impl Fail {
    fn at(step: Step) -> impl FnOnce(anyhow::Error) -> Self {
        move |e| Self(step, e, State::Failed)
    }
}

/// A module config staged for loading: the target kernel's tree and the verified load order.
struct Staged {
    tree: Rc<ModuleTree>,
    order: Vec<ModuleFile>,
    /// The identity of each of the package's own files, read while verifying.
    identities: BTreeMap<ModName, ModuleIdentity>,
    /// Extracted firmware to place before inserting.
    firmware: Option<PathBuf>,
}

/// What one load changed, so a failure can be rolled back.
#[derive(Default)]
struct Changes {
    inserted: Vec<ModName>,
    removed: Vec<ModName>,
    firmware: Vec<PathBuf>,
}

impl Changes {
    /// The changes a load starts from: none, or, when it resumes a load that
    /// never finished (killed, or failed after inserting), everything that
    /// load did, so a failure now undoes all of it.
    fn resuming(record: &Record) -> Self {
        if record.complete {
            return Self::default();
        }
        Self {
            inserted: record.inserted.iter().map(|o| o.name.clone()).collect(),
            removed: record.removed_in_tree.clone(),
            firmware: record.firmware.clone(),
        }
    }
}

impl<'a> Engine<'a> {
    /// An engine for `kernel` with the paths and programs of `settings` (kvcd.toml).
    pub fn from_settings(
        settings: &crate::config::DaemonSettings,
        kernel: &KernelRelease,
        kmods: &'a dyn KernelModules,
        on_step: Option<&'a OnStep<'a>>,
    ) -> Self {
        Self {
            layout: ModuleStore::new(
                settings.state_dir.clone(),
                settings.kernel_modules_dir.clone(),
            ),
            kernel: kernel.clone(),
            kmods,
            podman: Box::new(Podman::from_settings(settings)),
            firmware_dir: settings.firmware_dir.clone(),
            keep_kernels: settings.keep_kernels,
            protect: Vec::new(),
            target_is_live: KernelRelease::running().is_ok_and(|r| r == *kernel),
            records: RecordStore::new(&settings.runtime_dir),
            on_step,
            signing: settings
                .signing
                .as_ref()
                .map(|s| std::sync::Arc::new(crate::signing::Signing::load(s))),
            sysfs: crate::devices::sysfs_root(),
        }
    }
}

impl Engine<'_> {
    /// The signer for `c`'s files: none when `[signing]` is not set, the
    /// config sets `sign = false`, or its files are a KVC library's (kvcd
    /// never sees them); an error when the key cannot be used.
    fn signer_for(&self, c: &ModuleConfig) -> Result<Option<&crate::signing::Signer>> {
        let kvc = matches!(c.source, Source::KvcLibrary { .. });
        match self.signing.as_deref() {
            Some(g) if c.sign && !kvc => g.signer.as_ref().map(Some).map_err(|e| {
                anyhow!("{e} (kvcd.toml [signing]; `kvcd signing` shows the key's state)")
            }),
            _ => Ok(None),
        }
    }

    /// What a config's set is marked verified for: the config's digest,
    /// and the signing identity when its files are signed (another key or
    /// digest makes it unprepared).
    pub fn verified_token(&self, c: &ModuleConfig) -> String {
        match self.signer_for(c) {
            Ok(Some(s)) => format!("{}+{}", c.digest, s.identity()),
            Ok(None) => c.digest.clone(),
            Err(_) => format!("{}+unusable-signing-key", c.digest),
        }
    }

    fn log(&self, out: &mut Outcome, step: Step, detail: impl Into<String>) {
        let detail = detail.into();
        info!(
            KVCD_MODULE = %out.name,
            KVCD_KERNEL = %out.kernel,
            KVCD_STEP = step.as_str(),
            "{detail}"
        );
        let entry = StepLog { step, detail };
        if let Some(f) = self.on_step {
            f(&out.name, &entry);
        }
        out.steps.push(entry);
    }

    /// Loads `config` into the running kernel.
    pub fn load(&self, config: &ModuleConfig) -> Outcome {
        let mut out = Outcome::new(config.name.as_str(), &self.kernel);
        if !self.check_supported(config, &mut out) {
            return out;
        }
        if matches!(config.source, Source::KvcLibrary { .. }) {
            match self
                .load_kvc(config, &mut out)
                .and_then(|()| self.after_load(config, &mut out))
            {
                Ok(()) => out.state = State::Loaded,
                Err(Fail(step, err, state)) => self.fail(&mut out, step, &err, state),
            }
            return out;
        }
        crate::failpoint::hit("load.begin");
        let mut record = match self.current_record(config, &mut out) {
            Ok(r) => r,
            Err(Fail(step, err, state)) => {
                self.fail(&mut out, step, &err, state);
                return out;
            }
        };
        if let Some(note) = self.cold_path_note(config) {
            self.log(&mut out, Step::Fetch, note);
        }
        let mut changes = Changes::resuming(&record);
        match self.try_load(config, &mut out, &mut changes, &mut record) {
            // A failing post_load hook or ready check leaves the modules in
            // (and recorded) for inspection; the state says what failed.
            Ok(()) => match self.after_load(config, &mut out) {
                Ok(()) => match self.mark_complete(&mut record) {
                    Ok(()) => {
                        out.state = State::Loaded;
                        self.prune(config, &mut out);
                    }
                    Err(Fail(step, err, state)) => self.fail(&mut out, step, &err, state),
                },
                Err(Fail(step, err, state)) => self.fail(&mut out, step, &err, state),
            },
            Err(Fail(step, err, state)) => {
                self.fail(&mut out, step, &err, state);
                let problems = self.roll_back(&mut out, &changes, &mut record);
                out.held = Some(held(&record));
                if !problems.is_empty() {
                    if let Some(e) = &mut out.error {
                        e.message = format!(
                            "{}; rollback incomplete: {}",
                            e.message,
                            problems.join("; ")
                        );
                    }
                }
            }
        }
        if out.held.is_none() {
            out.held = Some(held(&record));
        }
        out
    }

    /// The record of `name`, with an intent a killed process left settled
    /// (and written back) first.
    fn settled_record(&self, name: &str, out: &mut Outcome) -> Result<Option<Record>, Fail> {
        let Some(mut record) = self.records.get(name).map_err(Fail::at(Step::Record))? else {
            return Ok(None);
        };
        if let Some(intent) = record.intent.take() {
            for line in self.settle(&mut record, intent) {
                self.log(out, Step::Record, line);
            }
            self.records.save(&record).map_err(Fail::at(Step::Record))?;
        }
        Ok(Some(record))
    }

    /// Settles an intent left in `record`; returns what was found, for the log.
    fn settle(&self, record: &mut Record, intent: Intent) -> Vec<String> {
        let s = intent::settle(record, intent, self.kmods);
        let mut lines = vec![format!(
            "found an unfinished {} (kvcd was stopped during it): {}",
            s.intent, s.finding
        )];
        if let Intent::RemoveFirmware { files } = s.intent {
            let n = firmware::remove(&files, &self.firmware_dir);
            intent::confirm(record, Intent::RemoveFirmware { files });
            lines.push(format!("removed {n} firmware file(s)"));
        }
        lines
    }

    /// Converges from whatever a killed kvcd left, before any other work (call
    /// with the lock held): temporary files and directories, image mounts,
    /// unfinished kernel changes in every record, and a firmware search path
    /// no record needs. Returns what was done, for the log.
    pub fn recover(&self, state: &Layout) -> Vec<String> {
        let mut done: Vec<String> = state
            .sweep()
            .into_iter()
            .chain(firmware::sweep(&self.firmware_dir))
            .map(|p| format!("removed {}, left by a stopped kvcd", p.display()))
            .collect();
        if let Some(p) = state.remove_legacy_trees() {
            done.push(format!(
                "removed {}: module trees of an older kvcd, no longer used",
                p.display()
            ));
        }
        for (id, marker) in state.left_mounts() {
            match self.podman.unmount(&id) {
                Ok(()) => done.push(format!(
                    "unmounted image {id}, left mounted by a stopped kvcd"
                )),
                Err(e) => done.push(format!("image {id} was left mounted; unmounting: {e:#}")),
            }
            let _ = std::fs::remove_file(marker);
        }
        let records = match self.records.all() {
            Ok(r) => r,
            Err(e) => {
                done.push(format!("cannot read the records: {e:#}"));
                return done;
            }
        };
        for mut r in records {
            let Some(intent) = r.intent.take() else {
                continue;
            };
            let lines = self.settle(&mut r, intent);
            done.extend(lines.into_iter().map(|l| format!("{}: {l}", r.config)));
            if let Err(e) = self.records.save(&r) {
                done.push(format!("{}: {e:#}", r.config));
            }
        }
        done.extend(self.release_firmware_search_path());
        for d in &done {
            info!(KVCD_STEP = "recover", "{d}");
        }
        done
    }

    /// Records that the load finished (post_load and the ready check passed).
    fn mark_complete(&self, record: &mut Record) -> Result<(), Fail> {
        crate::failpoint::hit("load.finished");
        if record.complete {
            return Ok(());
        }
        record.complete = true;
        self.records.put(record).map_err(Fail::at(Step::Record))
    }

    /// Carries out one kernel change through the record: `intent` is written
    /// first, then `act` runs; a change that returned `Ok(true)` is confirmed,
    /// `Ok(false)` (nothing changed) drops the intent, and a failure is
    /// settled from what the kernel shows. The record is written again after.
    fn change(
        &self,
        record: &mut Record,
        intent: Intent,
        out: &mut Outcome,
        act: impl FnOnce() -> Result<bool, Fail>,
    ) -> Result<bool, Fail> {
        let kind = intent.kind();
        record.intent = Some(intent);
        self.records.put(record).map_err(Fail::at(Step::Record))?;
        crate::failpoint::hit(&format!("{kind}.before"));
        let result = act();
        crate::failpoint::hit(&format!("{kind}.after"));
        if let Some(intent) = record.intent.take() {
            match &result {
                Ok(true) => intent::confirm(record, intent),
                Ok(false) => {}
                Err(_) => {
                    let s = intent::settle(record, intent, self.kmods);
                    self.log(
                        out,
                        Step::Record,
                        format!("after the failed {}: {}", s.intent, s.finding),
                    );
                }
            }
        }
        self.records.save(record).map_err(Fail::at(Step::Record))?;
        result
    }

    /// The post_load hook, then the ready check.
    fn after_load(&self, c: &ModuleConfig, out: &mut Outcome) -> Result<(), Fail> {
        self.hook(c, "post_load", c.hooks.post_load.as_ref(), out)?;
        self.wait_ready(c, out)
    }

    fn try_load(
        &self,
        c: &ModuleConfig,
        out: &mut Outcome,
        changes: &mut Changes,
        record: &mut Record,
    ) -> Result<(), Fail> {
        for a in &c.after {
            let loaded = self
                .records
                .get(a.as_str())
                .map_err(Fail::at(Step::Config))?
                .is_some_and(|r| r.kernel == self.kernel.as_str());
            if !loaded {
                return Err(Fail::at(Step::Config)(anyhow!(
                    "must load after module config {a}, which is not loaded"
                )));
            }
        }

        let staged = self.stage_with_rebuild(c, out)?;
        let Staged {
            tree,
            order,
            identities,
            firmware,
        } = staged;

        crate::failpoint::hit("load.staged");
        self.check_live(c, &order, &identities, record)?;
        self.hook(c, "pre_load", c.hooks.pre_load.as_ref(), out)?;

        let in_tree_options = |m: &ModName| tree.modprobe_options(m);
        let steps = plan::load(
            c,
            &order,
            firmware.as_deref(),
            record,
            self.kmods,
            &in_tree_options,
        )?;
        for step in steps {
            self.execute(c, step, &identities, out, record, changes)?;
        }
        // Written even when empty: a record says the config is applied (`after`).
        self.records.put(record).map_err(Fail::at(Step::Record))?;

        let missing: Vec<_> = c
            .modules
            .iter()
            .filter(|m| !matches!(self.kmods.live(m), Ok(Some(_))))
            .map(ToString::to_string)
            .collect();
        if !missing.is_empty() {
            return Err(Fail::at(Step::Insert)(anyhow!(
                "not live after loading: {}",
                missing.join(", ")
            )));
        }
        Ok(())
    }

    /// Carries out one step of a load plan through the record.
    fn execute(
        &self,
        c: &ModuleConfig,
        step: LoadStep,
        identities: &BTreeMap<ModName, ModuleIdentity>,
        out: &mut Outcome,
        record: &mut Record,
        changes: &mut Changes,
    ) -> Result<(), Fail> {
        match step {
            LoadStep::TakeOut { target, removal } => {
                self.take_out(&target, removal, out, record, changes)
            }
            LoadStep::PlaceFirmware(fw) => self.place_firmware(&fw, out, record, changes),
            LoadStep::Present {
                file,
                configured,
                ours,
            } => {
                if !ours && configured {
                    self.log(
                        out,
                        Step::Insert,
                        format!(
                            "{} is already loaded, not by kvcd (the same build as the package's file); kvcd will not unload it",
                            file.name
                        ),
                    );
                } else {
                    self.log(
                        out,
                        Step::Insert,
                        format!("{} is already loaded", file.name),
                    );
                }
                if configured {
                    self.check_live_parameters(&file.name, c.parameters_for(&file.name), out);
                }
                out.modules
                    .push(ModuleAction::new(&file, Action::AlreadyLoaded, Vec::new()));
                Ok(())
            }
            LoadStep::Insert {
                file,
                params,
                configured,
            } => {
                let identity = identities
                    .get(&file.name)
                    .cloned()
                    .unwrap_or_else(|| ModuleIdentity::of_file(&file.path).unwrap_or_default());
                let intent = Intent::Insert {
                    module: Owned {
                        name: file.name.clone(),
                        path: file.path.clone(),
                        configured,
                    },
                    identity,
                };
                let inserted = self.change(record, intent, out, || {
                    match self.kmods.insert(&file, &params) {
                        Ok(()) => Ok(true),
                        Err(e) if e.kind == KmodErrorKind::AlreadyLoaded => Ok(false),
                        Err(e) if e.kind == KmodErrorKind::SignatureRejected => {
                            let why = crate::signing::Signing::explain_rejection(
                                self.signing.as_deref(),
                                &file.path,
                                !c.sign,
                            );
                            Err(Fail::at(Step::Insert)(anyhow!("{e}: {why}")))
                        }
                        Err(e) => Err(Fail::at(Step::Insert)(e.into())),
                    }
                })?;
                if !inserted {
                    out.modules
                        .push(ModuleAction::new(&file, Action::AlreadyLoaded, params));
                    return Ok(());
                }
                if !changes.inserted.contains(&file.name) {
                    changes.inserted.push(file.name.clone());
                }
                let shown = if params.is_empty() {
                    String::new()
                } else {
                    format!(" {}", params.join(" "))
                };
                self.log(
                    out,
                    Step::Insert,
                    format!("inserted {} from {}{shown}", file.name, file.path.display()),
                );
                out.modules
                    .push(ModuleAction::new(&file, Action::Inserted, params));
                Ok(())
            }
        }
    }

    /// This config's record for the target kernel (a new one when there is
    /// none), with the config's digest and `after` as they are now.
    fn current_record(&self, c: &ModuleConfig, out: &mut Outcome) -> Result<Record, Fail> {
        let name = c.name.as_str();
        let mut record = match self.settled_record(name, out)? {
            Some(r) if r.kernel == self.kernel.as_str() => r,
            _ => Record {
                config: name.to_owned(),
                kernel: self.kernel.to_string(),
                config_digest: String::new(),
                after: Vec::new(),
                inserted: Vec::new(),
                removed_in_tree: Vec::new(),
                firmware: Vec::new(),
                since: crate::util::unix_now(),
                complete: false,
                intent: None,
            },
        };
        record.config_digest.clone_from(&c.digest);
        record.after = c.after.iter().map(ToString::to_string).collect();
        Ok(record)
    }

    /// Refuses, before anything changes, a load that would call a live module
    /// the package's own when it is not: each of the package's modules that
    /// is already live must be the same build as the package's file (build ID,
    /// else srcversion; `version` too), and a module it names must not belong
    /// to another config (a dependency another config loaded is shared).
    fn check_live(
        &self,
        c: &ModuleConfig,
        order: &[ModuleFile],
        identities: &BTreeMap<ModName, ModuleIdentity>,
        record: &Record,
    ) -> Result<(), Fail> {
        let fail = Fail::at(Step::Verify);
        let mut others = None;
        for f in order.iter().filter(|f| !f.in_tree) {
            let ours = record.inserted.iter().find(|o| o.name == f.name);
            // What is not live, or is someone else's that replacement takes out, needs no check.
            if (ours.is_none() && c.replace_in_tree.contains(&f.name))
                || self
                    .kmods
                    .live(&f.name)
                    .map_err(Fail::at(Step::Verify))?
                    .is_none()
            {
                continue;
            }
            // A dependency another config loaded is shared; a module this config names is claimed.
            if ours.is_none() && c.modules.contains(&f.name) {
                let all = match &others {
                    Some(a) => a,
                    None => others.insert(self.records.all().map_err(Fail::at(Step::Record))?),
                };
                if let Some(owner) = all.iter().find(|r| {
                    r.config != c.name.as_str() && r.inserted.iter().any(|o| o.name == f.name)
                }) {
                    return Err(fail(anyhow!(
                        "{} is loaded by module config {}; a module has one owner, so unload {} first or list {} in only one config",
                        f.name,
                        owner.config,
                        owner.config,
                        f.name
                    )));
                }
            }
            let file = match identities.get(&f.name) {
                Some(i) => i.clone(),
                None => ModuleIdentity::of_file(&f.path).map_err(Fail::at(Step::Verify))?,
            };
            let live = self.kmods.identity(&f.name);
            let detail = match file.compare(&live) {
                IdentityMatch::Same => continue,
                IdentityMatch::Unknown if ours.is_some_and(|o| o.path == f.path) => continue,
                IdentityMatch::Unknown => {
                    "neither carries a build ID or srcversion to compare".to_owned()
                }
                IdentityMatch::Differs(d) => d,
            };
            if ours.is_some() {
                return Err(fail(anyhow!(
                    "{} is live, but not as the package's {} ({detail}): an earlier build kvcd loaded, or a module put in its place; unload and load again (kvcctl reload {}) to change it",
                    f.name,
                    f.path.display(),
                    c.name
                )));
            }
            return Err(fail(anyhow!(
                "{} is already loaded, but the live module is {}, not the package's {} ({detail}); add replace_in_tree = [\"{}\"] to {} to have kvcd replace it, or unload it first",
                f.name,
                self.live_provider(&f.name, &live),
                f.path.display(),
                f.name,
                c.file.display()
            )));
        }
        Ok(())
    }

    /// Who provides a live module that is not the package's: the target kernel's own, or something else.
    fn live_provider(&self, name: &ModName, live: &ModuleIdentity) -> String {
        let in_tree = self
            .layout
            .open_tree(&self.kernel)
            .and_then(|t| t.load_order(std::slice::from_ref(name)))
            .ok()
            .and_then(|files| files.into_iter().find(|f| f.name == *name));
        match in_tree {
            Some(f) => match ModuleIdentity::of_file(&f.path).map(|i| i.compare(live)) {
                Ok(IdentityMatch::Same) => {
                    format!(
                        "the in-tree {name} of kernel {} ({})",
                        self.kernel,
                        f.path.display()
                    )
                }
                _ => format!(
                    "a {name} from outside this package (not the in-tree {})",
                    f.path.display()
                ),
            },
            None => format!("a {name} from outside this package"),
        }
    }

    /// Why a module that is neither in `c`'s package nor the target kernel's
    /// tree needs no insert: it is live in the kernel, or `c` loads after
    /// other configs, whose modules it may use (kvcd loads those first; the
    /// kernel refuses the insert if they do not provide it). `None`: it is
    /// missing.
    fn provided_elsewhere(&self, c: &ModuleConfig, m: &ModName) -> Option<String> {
        // What is live now says nothing about another kernel.
        if self.target_is_live && matches!(self.kmods.live(m), Ok(Some(_))) {
            return Some(format!(
                "{m} is not in the package or the kernel's tree, but is live in the kernel: not inserted"
            ));
        }
        (!c.after.is_empty()).then(|| {
            format!(
                "{m} is not in the package or the kernel's tree: expected from {} (after)",
                c.after
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
    }

    /// Stages with one fresh rebuild when an image built on this node fails verification.
    fn stage_with_rebuild(&self, c: &ModuleConfig, out: &mut Outcome) -> Result<Staged, Fail> {
        match self.stage(c, out, false) {
            Err(Fail(Step::Verify, err, _)) if out.built_image => {
                self.log(
                    out,
                    Step::Verify,
                    format!("{err:#}; rebuilding the image once without cache"),
                );
                self.stage(c, out, true)
            }
            other => other,
        }
    }

    /// Source → module files → stored files and load order → verified; the kernel is not touched.
    fn stage(&self, c: &ModuleConfig, out: &mut Outcome, rebuild: bool) -> Result<Staged, Fail> {
        let name = c.name.as_str();
        let vars = self.vars(c);
        let mut firmware = None;
        let dir = match &c.source {
            Source::KvcLibrary { .. } => {
                return Err(Fail::at(Step::Resolve)(anyhow!(
                    "a KVC library config has no module files for kvcd to stage; its library builds and loads them"
                )));
            }
            Source::Directory { path } => expand(path, &vars)
                .map(PathBuf::from)
                .with_context(|| format!("{}: key `directory.path`", c.file.display()))
                .map_err(Fail::at(Step::Resolve))?,
            Source::Image(src) => {
                let store = ImageStore {
                    state_dir: &self.layout.state_dir,
                    podman: &*self.podman,
                };
                let sink = |line: &str| {
                    info!(KVCD_MODULE = %name, KVCD_KERNEL = %self.kernel, KVCD_STEP = "fetch", "podman: {line}");
                    if let Some(f) = self.on_step {
                        f(
                            name,
                            &StepLog {
                                step: Step::Fetch,
                                detail: format!("podman: {line}"),
                            },
                        );
                    }
                };
                let calls = self.podman.calls();
                let build_hook = c.hooks.build.as_ref().map(|argv| BuildHook {
                    argv,
                    timeout_seconds: c.hooks.build_timeout_seconds,
                });
                let req = FetchRequest {
                    config_name: name,
                    config_digest: &c.digest,
                    source: src,
                    vars: &vars,
                    rebuild,
                    build_hook: build_hook.as_ref(),
                    modules: &c.modules,
                    host_tree: &self.layout.host_tree(&self.kernel),
                    build_timeout_seconds: c.hooks.build_timeout_seconds,
                };
                let fetched = store.fetch(&req, &sink);
                out.podman_calls += self.podman.calls() - calls;
                let fetched = fetched.map_err(Fail::at(Step::Fetch))?;
                for n in &fetched.notes {
                    self.log(out, Step::Fetch, n.clone());
                }
                out.built_image = fetched.built;
                out.image = Some(ImageRef {
                    reference: fetched.reference.clone(),
                    digest: fetched.digest.clone(),
                });
                firmware.clone_from(&fetched.firmware);
                fetched.modules
            }
        };
        out.artifacts = Some(dir.clone());
        let files = directory::scan(&dir).map_err(Fail::at(Step::Resolve))?;
        directory::require(&files, &c.modules, &dir).map_err(Fail::at(Step::Resolve))?;
        self.log(
            out,
            Step::Resolve,
            format!("{} module file(s) in {}", files.len(), dir.display()),
        );

        // The package's files over the target kernel's own index; only the
        // files the load needs are stored and read.
        let tree = self
            .layout
            .open_tree(&self.kernel)
            .map_err(Fail::at(Step::Resolve))?;
        let signer = self.signer_for(c).map_err(Fail::at(Step::Stage))?;
        let trust = self.signing.as_ref().map(|g| &g.trust);
        let mut staging = self
            .layout
            .staging(name, &self.kernel, signer.zip(trust))
            .map_err(Fail::at(Step::Stage))?;
        let elsewhere = |m: &ModName| self.provided_elsewhere(c, m);
        let mut pkg = resolve::Package::new(&files, &dir, &tree, |m: &ModName, p: &Path| {
            let stored = staging.put(m, p)?;
            Ok((stored, staging.elf(m)?))
        })
        .with_elsewhere(&elsewhere);
        let order = resolve::load_order(&mut pkg, &c.modules).map_err(Fail::at(Step::Resolve))?;
        for n in pkg.notes() {
            self.log(out, Step::Resolve, n.clone());
        }
        let read = pkg.into_read();
        let staged = staging.finish().map_err(Fail::at(Step::Stage))?;
        let signed = match signer {
            Some(s) if staged.signed > 0 => format!(
                "; signed {} with \"{}\" ({})",
                staged.signed,
                s.cert().subject,
                s.settings().hash.name()
            ),
            _ => String::new(),
        };
        self.log(
            out,
            Step::Stage,
            format!(
                "{} file(s), {}: {}{signed}",
                read.len(),
                crate::util::human_bytes(staged.bytes),
                if staged.copied == 0 {
                    "in the store already".to_owned()
                } else {
                    format!(
                        "{} new in {}",
                        staged.copied,
                        Layout::files_dir(&self.layout.state_dir).display()
                    )
                }
            ),
        );
        for n in &staged.notes {
            self.log(out, Step::Stage, n.clone());
        }
        self.log(
            out,
            Step::Resolve,
            format!(
                "load order: {}",
                order
                    .iter()
                    .map(|f| f.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        );

        // Verify our files before touching the kernel.
        let reference = verify::Reference::of_tree(&self.layout.host_tree(&self.kernel));
        let arch = crate::kernel::arch();
        let mut identities = BTreeMap::new();
        for f in order.iter().filter(|f| !f.in_tree) {
            let elf = read
                .get(&f.name)
                .with_context(|| format!("module {} was resolved but not read", f.name))
                .map_err(Fail::at(Step::Verify))?;
            verify::check_machine(f, elf, &reference, &self.kernel, &arch)
                .map_err(Fail::at(Step::Verify))?;
            let info = ModInfo::of(elf);
            identities.insert(f.name.clone(), ModuleIdentity::new(elf, &info));
            let expected = c
                .modules
                .contains(&f.name)
                .then_some(c.version.as_deref())
                .flatten();
            verify::check(
                f,
                &info,
                &self.kernel,
                reference.vermagic.as_deref(),
                expected,
            )
            .map_err(Fail::at(Step::Verify))?;
        }
        // A warm load finds its set verified already: no second write.
        let token = self.verified_token(c);
        if staged.verified_for.as_deref() != Some(token.as_str()) {
            self.layout
                .mark_verified(name, &self.kernel, &token)
                .map_err(Fail::at(Step::Stage))?;
        }
        self.log(
            out,
            Step::Verify,
            "architecture, vermagic and versions match",
        );
        Ok(Staged {
            tree,
            order,
            identities,
            firmware,
        })
    }

    /// Fetches, extracts and verifies `config` for the target kernel without loading anything.
    pub fn prepare(&self, config: &ModuleConfig) -> Outcome {
        let mut out = Outcome::new(config.name.as_str(), &self.kernel);
        if !self.check_supported(config, &mut out) {
            return out;
        }
        if matches!(config.source, Source::KvcLibrary { .. }) {
            let prepared = self.prepare_kvc(config, &mut out).and_then(|()| {
                self.layout
                    .mark_verified(
                        config.name.as_str(),
                        &self.kernel,
                        &self.verified_token(config),
                    )
                    .map_err(Fail::at(Step::Stage))
            });
            match prepared {
                Ok(()) => out.state = State::Prepared,
                Err(Fail(step, err, state)) => self.fail(&mut out, step, &err, state),
            }
            return out;
        }
        match self.stage_with_rebuild(config, &mut out) {
            Ok(_) => {
                self.log(
                    &mut out,
                    Step::Verify,
                    format!("ready for kernel {}", self.kernel),
                );
                out.state = State::Prepared;
                self.prune(config, &mut out);
            }
            Err(Fail(step, err, state)) => self.fail(&mut out, step, &err, state),
        }
        out
    }

    /// Drops this config's artifacts for all but the newest kernels (never the running or target one).
    fn prune(&self, config: &ModuleConfig, out: &mut Outcome) {
        let running = KernelRelease::running()
            .map(|k| k.to_string())
            .unwrap_or_default();
        let mut protect = vec![self.kernel.as_str(), running.as_str()];
        protect.extend(self.protect.iter().map(String::as_str));
        match prune::prune_config(
            &self.layout.state_dir,
            Some(&*self.podman),
            config.name.as_str(),
            self.keep_kernels,
            &protect,
            false,
        ) {
            Ok(p) if p.kernels.is_empty() => {}
            Ok(p) => self.log(
                out,
                Step::Prune,
                format!(
                    "removed artifacts of kernel(s) {}{}",
                    p.kernels.join(", "),
                    if p.images.is_empty() {
                        String::new()
                    } else {
                        format!(" and image(s) {}", p.images.join(", "))
                    }
                ),
            ),
            Err(e) => self.log(out, Step::Prune, format!("pruning failed: {e:#}")),
        }
    }

    fn fail(&self, out: &mut Outcome, step: Step, err: &anyhow::Error, state: State) {
        let msg = format!("{err:#}");
        warn!(KVCD_MODULE = %out.name, KVCD_KERNEL = %out.kernel, KVCD_STEP = step.as_str(), "{msg}");
        out.state = state;
        out.error = Some(StepError { step, message: msg });
    }

    /// Why `config` does not apply to this node: no device it matches
    /// (`Err`); else the matching device, if `[match]` is set.
    pub fn device_for(&self, config: &ModuleConfig) -> Result<Option<String>, String> {
        if config.devices.is_empty() {
            return Ok(None);
        }
        let devices = crate::devices::scan(&self.sysfs);
        match config.devices.find(&devices) {
            Some(d) => Ok(Some(d.modalias.clone().unwrap_or_else(|| d.path.clone()))),
            None => Err(format!(
                "no matching device ([match] {}; {} device(s) under {})",
                config.devices.describe(),
                devices.len(),
                self.sysfs.display()
            )),
        }
    }

    /// Logs and marks `out` unsupported when `config` does not apply to the
    /// target kernel, or to this node's hardware.
    fn check_supported(&self, config: &ModuleConfig, out: &mut Outcome) -> bool {
        match self.device_for(config) {
            Err(why) => {
                self.log(
                    out,
                    Step::Config,
                    format!("{why}; nothing to do until one appears"),
                );
                out.state = State::Unsupported;
                return false;
            }
            Ok(Some(d)) => self.log(out, Step::Config, format!("device {d} matches [match]")),
            Ok(None) => {}
        }
        if config.supports(&self.kernel) {
            return true;
        }
        self.log(
            out,
            Step::Config,
            format!(
                "kernel {} does not match kernel_match {:?}; nothing to do",
                self.kernel,
                config
                    .kernel_match
                    .as_ref()
                    .map(regex::Regex::as_str)
                    .unwrap_or_default()
            ),
        );
        out.state = State::Unsupported;
        false
    }

    /// Places extracted firmware and makes sure the kernel looks for it there.
    fn place_firmware(
        &self,
        fw: &Path,
        out: &mut Outcome,
        record: &mut Record,
        changes: &mut Changes,
    ) -> Result<(), Fail> {
        let host = &self.firmware_dir;
        let files =
            firmware::may_create(fw, host, &record.firmware).map_err(Fail::at(Step::Firmware))?;
        let owned = record.firmware.clone();
        let mut placed = Vec::new();
        self.change(record, Intent::PlaceFirmware { files }, out, || {
            placed = firmware::place(fw, host, &owned).map_err(Fail::at(Step::Firmware))?;
            Ok(true)
        })?;
        changes
            .firmware
            .extend(placed.iter().filter(|p| !owned.contains(p)).cloned());
        record.firmware.clone_from(&placed);
        self.records.save(record).map_err(Fail::at(Step::Record))?;
        self.log(
            out,
            Step::Firmware,
            format!("placed {} file(s) in {}", placed.len(), host.display()),
        );
        let want = host.to_string_lossy();
        match self.kmods.firmware_search_path() {
            Some(p) if p.is_empty() => {
                crate::failpoint::hit("searchpath.set.before");
                self.kmods
                    .set_firmware_search_path(host)
                    .map_err(Fail::at(Step::Firmware))?;
                crate::failpoint::hit("searchpath.set.after");
                self.log(
                    out,
                    Step::Firmware,
                    format!("set the kernel's firmware search path to {want}"),
                );
            }
            Some(p) if p == want => {}
            Some(p) => {
                warn!(KVCD_MODULE = %out.name, KVCD_STEP = "firmware", "firmware search path is {p}, not {want}");
                self.log(
                    out,
                    Step::Firmware,
                    format!(
                        "the kernel's firmware search path is {p}; kept it, so the firmware in {want} is found only if {p} leads there"
                    ),
                );
            }
            None => self.log(
                out,
                Step::Firmware,
                "cannot read the kernel's firmware search path (firmware_class.path)",
            ),
        }
        Ok(())
    }

    /// Says so when a module that is already loaded runs with other parameter values than configured.
    fn check_live_parameters(&self, module: &ModName, params: &[String], out: &mut Outcome) {
        for p in params {
            let (key, want) = p.split_once('=').unwrap_or((p.as_str(), "Y"));
            let Some(live) = self.kmods.parameter(module, key) else {
                continue;
            };
            if !same_parameter_value(&live, want) {
                self.log(
                    out,
                    Step::Insert,
                    format!(
                        "{module} runs with {key}={live}, the config wants {key}={want}; unload it and apply again to change it"
                    ),
                );
            }
        }
    }

    /// Takes out the in-tree modules of a planned `removal` (holders first) to make room for `target`.
    fn take_out(
        &self,
        target: &ModName,
        removal: Vec<ModName>,
        out: &mut Outcome,
        record: &mut Record,
        changes: &mut Changes,
    ) -> Result<(), Fail> {
        debug_assert!(removal.last() == Some(target));
        for m in removal {
            self.change(record, Intent::TakeOut { name: m.clone() }, out, || {
                self.kmods.remove(&m, false).map(|()| true).map_err(|e| {
                    let state = if e.kind == KmodErrorKind::InUse {
                        State::Busy
                    } else {
                        State::Failed
                    };
                    Fail(Step::Replace, e.into(), state)
                })
            })?;
            if !changes.removed.contains(&m) {
                changes.removed.push(m.clone());
            }
            self.log(out, Step::Replace, format!("removed in-tree module {m}"));
        }
        Ok(())
    }

    /// Undoes what a failed load changed: removes what it inserted, puts back
    /// what it removed. Returns what could not be undone (empty when all was).
    fn roll_back(&self, out: &mut Outcome, changes: &Changes, record: &mut Record) -> Vec<String> {
        let mut problems = Vec::new();
        if changes.inserted.is_empty() && changes.removed.is_empty() && changes.firmware.is_empty()
        {
            return problems;
        }
        crate::failpoint::hit("rollback.begin");
        for m in changes.inserted.iter().rev() {
            let removed = self.change(record, Intent::Remove { name: m.clone() }, out, || {
                self.kmods
                    .remove(m, false)
                    .map(|()| true)
                    .map_err(|e| Fail::at(Step::Remove)(e.into()))
            });
            match removed {
                Ok(_) => self.log(out, Step::Remove, format!("rolled back: removed {m}")),
                Err(Fail(_, e, _)) => {
                    let p = format!("could not remove {m}: {e:#}");
                    self.log(out, Step::Remove, format!("rollback {p}"));
                    problems.push(p);
                }
            }
        }
        if !changes.firmware.is_empty() {
            match self.remove_firmware(record, &changes.firmware, out) {
                Ok(n) => self.log(
                    out,
                    Step::Firmware,
                    format!("rolled back: removed {n} firmware file(s)"),
                ),
                Err(Fail(_, e, _)) => problems.push(format!("firmware: {e:#}")),
            }
        }
        problems.extend(self.restore(record, &changes.removed, out));
        if !changes.firmware.is_empty() {
            if let Some(line) = self.release_firmware_search_path() {
                self.log(out, Step::Firmware, line);
            }
        }
        problems
    }

    /// Removes firmware files kvcd placed, through the record; returns how many went.
    fn remove_firmware(
        &self,
        record: &mut Record,
        files: &[PathBuf],
        out: &mut Outcome,
    ) -> Result<usize, Fail> {
        let mut n = 0;
        let intent = Intent::RemoveFirmware {
            files: files.to_vec(),
        };
        self.change(record, intent, out, || {
            n = firmware::remove(files, &self.firmware_dir);
            Ok(true)
        })?;
        Ok(n)
    }

    /// Clears the kernel's firmware search path when it points at kvcd's
    /// firmware directory and no loaded config has firmware there any more;
    /// returns what happened when there was something to do, for the log.
    fn release_firmware_search_path(&self) -> Option<String> {
        let ours = self.firmware_dir.to_string_lossy();
        if self.kmods.firmware_search_path().as_deref() != Some(&*ours) {
            return None;
        }
        match self.records.all() {
            Ok(all) if all.iter().all(|r| r.firmware.is_empty()) => {}
            Ok(_) => return None,
            Err(e) => return Some(format!("kept the firmware search path: {e:#}")),
        }
        crate::failpoint::hit("searchpath.clear.before");
        let cleared = self.kmods.set_firmware_search_path(Path::new(""));
        crate::failpoint::hit("searchpath.clear.after");
        Some(match cleared {
            Ok(()) => format!(
                "cleared the kernel's firmware search path ({ours}): no firmware of kvcd's is in use"
            ),
            Err(e) => format!("could not clear the kernel's firmware search path: {e:#}"),
        })
    }

    /// Puts in-tree modules back from the host tree (reverse removal order),
    /// through the record; returns what could not be put back.
    fn restore(&self, record: &mut Record, removed: &[ModName], out: &mut Outcome) -> Vec<String> {
        let mut problems = Vec::new();
        if removed.is_empty() {
            return problems;
        }
        let host = match self.layout.open_tree(&self.kernel) {
            Ok(t) => t,
            Err(e) => {
                let p = format!("cannot restore in-tree modules: {e:#}");
                self.log(out, Step::Restore, p.clone());
                return vec![p];
            }
        };
        for m in removed.iter().rev() {
            let result = self.change(record, Intent::Restore { name: m.clone() }, out, || {
                host.load_order(std::slice::from_ref(m))
                    .and_then(|files| {
                        for f in files {
                            if self.kmods.live(&f.name)?.is_none() {
                                let params = host.modprobe_options(&f.name);
                                self.kmods.insert(&f, &params)?;
                            }
                        }
                        Ok(true)
                    })
                    .map_err(Fail::at(Step::Restore))
            });
            match result {
                Ok(_) => self.log(out, Step::Restore, format!("restored in-tree module {m}")),
                Err(Fail(_, e, _)) => {
                    let p = format!("could not restore in-tree module {m}: {e:#}");
                    self.log(out, Step::Restore, p.clone());
                    problems.push(p);
                }
            }
        }
        problems
    }

    /// Unloads what kvcd loaded for the module config `name`. `config` is its
    /// current configuration when it still has one (hooks, `force_unload`,
    /// KVC library); without it kvcd still undoes what its record says.
    pub fn unload(&self, name: &str, config: Option<&ModuleConfig>) -> Outcome {
        let mut out = Outcome::new(name, &self.kernel);
        match self.try_unload(name, config, &mut out) {
            Ok(()) => out.state = State::Inactive,
            Err(Fail(step, err, state)) => self.fail(&mut out, step, &err, state),
        }
        if config.is_none_or(|c| !matches!(c.source, Source::KvcLibrary { .. })) {
            out.held = self
                .records
                .get(name)
                .ok()
                .map(|r| r.as_ref().map(held).unwrap_or_default());
        }
        out
    }

    fn try_unload(
        &self,
        name: &str,
        cfg: Option<&ModuleConfig>,
        out: &mut Outcome,
    ) -> Result<(), Fail> {
        crate::failpoint::hit("unload.begin");
        let force = cfg.is_some_and(|c| c.force_unload);
        let Some(mut record) = self.settled_record(name, out)? else {
            self.log(out, Step::Remove, "nothing loaded by kvcd");
            return Ok(());
        };
        for other in self.records.all().map_err(Fail::at(Step::Record))? {
            if other.config != name && other.after.iter().any(|a| a == name) {
                return Err(Fail(
                    Step::Remove,
                    anyhow!(
                        "module config {} is loaded after this one; unload it first",
                        other.config
                    ),
                    State::Busy,
                ));
            }
        }

        if let Some(c) = cfg.filter(|c| matches!(c.source, Source::KvcLibrary { .. })) {
            self.hook(c, "pre_unload", c.hooks.pre_unload.as_ref(), out)?;
            self.unload_kvc(c, out)?;
            return self.hook(c, "post_unload", c.hooks.post_unload.as_ref(), out);
        }

        // Check everything before removing anything.
        let planned = plan::unload(&record, self.kmods, force)?;
        for m in &planned.left {
            self.log(
                out,
                Step::Remove,
                format!("leaving dependency {m} loaded: in use by others"),
            );
        }
        if let Some(c) = cfg {
            self.hook(c, "pre_unload", c.hooks.pre_unload.as_ref(), out)?;
        }
        for o in planned.remove {
            let intent = Intent::Remove {
                name: o.name.clone(),
            };
            self.change(&mut record, intent, out, || {
                match self.kmods.remove(&o.name, force && o.configured) {
                    Ok(()) => Ok(true),
                    Err(e) if e.kind == KmodErrorKind::NotLoaded => Ok(true),
                    Err(e) => {
                        let state = if e.kind == KmodErrorKind::InUse {
                            State::Busy
                        } else {
                            State::Failed
                        };
                        Err(Fail(Step::Remove, e.into(), state))
                    }
                }
            })?;
            self.log(out, Step::Remove, format!("removed {}", o.name));
            out.modules.push(ModuleAction {
                name: o.name.clone(),
                path: o.path.clone(),
                action: Action::Removed,
                params: Vec::new(),
            });
        }
        // What is left was not live (or is a dependency in use by others):
        // no longer kvcd's to remove.
        record.inserted.clear();
        record.complete = false;
        self.records.save(&record).map_err(Fail::at(Step::Record))?;

        let had_firmware = !record.firmware.is_empty();
        if had_firmware {
            let files = record.firmware.clone();
            let n = self.remove_firmware(&mut record, &files, out)?;
            self.log(
                out,
                Step::Firmware,
                format!("removed {n} file(s) from {}", self.firmware_dir.display()),
            );
        }

        let removed = record.removed_in_tree.clone();
        self.restore(&mut record, &removed, out);
        self.records.save(&record).map_err(Fail::at(Step::Record))?;
        if had_firmware {
            if let Some(line) = self.release_firmware_search_path() {
                self.log(out, Step::Firmware, line);
            }
        }
        unrestored(&record)?;
        if let Some(c) = cfg {
            self.hook(c, "post_unload", c.hooks.post_unload.as_ref(), out)?;
        }
        Ok(())
    }
}

/// True when every module the record says kvcd inserted that is live is the
/// build kvcd inserted (a module swapped in its place while no kvcd ran is not).
pub(crate) fn live_as_recorded(kmods: &dyn KernelModules, record: &Record) -> bool {
    record.inserted.iter().all(|o| {
        if !matches!(kmods.live(&o.name), Ok(Some(_))) {
            return true;
        }
        match ModuleIdentity::of_file(&o.path) {
            Ok(file) => matches!(
                file.compare(&kmods.identity(&o.name)),
                IdentityMatch::Same | IdentityMatch::Unknown
            ),
            // The file is gone (pruned): nothing to compare with.
            Err(_) => true,
        }
    })
}

/// The modules a record says kvcd holds.
fn held(record: &Record) -> Vec<String> {
    record.inserted.iter().map(|o| o.name.to_string()).collect()
}

/// Fails naming the in-tree modules the record still says are out, if any.
fn unrestored(record: &Record) -> Result<(), Fail> {
    if record.removed_in_tree.is_empty() {
        return Ok(());
    }
    Err(Fail::at(Step::Restore)(anyhow!(
        "could not restore in-tree module(s): {}",
        record
            .removed_in_tree
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    )))
}

/// True when something outside `set` holds the module: a module not in the
/// set, or a reference that is not a module at all (each holder counts one).
fn used_beyond(l: &LiveModule, set: &BTreeSet<ModName>) -> bool {
    let inner = l.holders.iter().filter(|h| set.contains(*h)).count();
    inner < l.holders.len() || l.refcount > i32::try_from(inner).unwrap_or(i32::MAX)
}

/// Compares a value from sysfs with a configured one; booleans show as `Y`/`N` there.
fn same_parameter_value(live: &str, want: &str) -> bool {
    let want = want.trim_matches('"');
    let truthy = |v: &str| matches!(v, "1" | "y" | "Y" | "true" | "on");
    let falsy = |v: &str| matches!(v, "0" | "n" | "N" | "false" | "off");
    live == want || (live == "Y" && truthy(want)) || (live == "N" && falsy(want))
}

fn holders_text(holders: &[ModName]) -> String {
    if holders.is_empty() {
        String::new()
    } else {
        format!(
            ", used by {}",
            holders
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        )
    }
}

#[cfg(test)]
mod tests;
