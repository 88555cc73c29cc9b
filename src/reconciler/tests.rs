use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use anyhow::Result;

use super::{same_parameter_value, used_beyond};
use crate::config::{Config, ModuleConfig, Overrides};
use crate::kmod::{
    InitState, KernelModules, KmodError, LiveModule, ModName, ModuleFile, ModuleIdentity,
};
use crate::state::Record;

pub(super) fn n(s: &str) -> ModName {
    ModName::parse(s).unwrap()
}

/// A live module: its dependencies, references that are not modules, state.
type Live = (Vec<ModName>, i32, InitState);

/// A kernel for the pure decisions: live modules with their dependencies,
/// extra references and identities; it refuses every change.
#[derive(Default)]
pub(super) struct Kernel {
    mods: RefCell<BTreeMap<ModName, Live>>,
    pub(super) identities: RefCell<BTreeMap<ModName, ModuleIdentity>>,
}

impl Kernel {
    /// Makes `name` live, using `depends`.
    pub(super) fn live(&self, name: &str, depends: &[&str]) {
        let deps = depends.iter().map(|d| n(d)).collect();
        self.mods
            .borrow_mut()
            .insert(n(name), (deps, 0, InitState::Live));
    }

    /// Makes `name` built into the kernel.
    pub(super) fn builtin(&self, name: &str) {
        self.mods
            .borrow_mut()
            .insert(n(name), (Vec::new(), 0, InitState::Builtin));
    }

    /// Adds a reference that is not a module.
    pub(super) fn hold(&self, name: &str) {
        if let Some(m) = self.mods.borrow_mut().get_mut(&n(name)) {
            m.1 += 1;
        }
    }

    /// Takes `name` out.
    pub(super) fn gone(&self, name: &str) {
        self.mods.borrow_mut().remove(&n(name));
    }
}

impl KernelModules for Kernel {
    fn live(&self, name: &ModName) -> Result<Option<LiveModule>> {
        let mods = self.mods.borrow();
        let Some((_, refs, state)) = mods.get(name) else {
            return Ok(None);
        };
        let holders: Vec<ModName> = mods
            .iter()
            .filter(|(_, (deps, _, _))| deps.contains(name))
            .map(|(h, _)| h.clone())
            .collect();
        Ok(Some(LiveModule {
            state: *state,
            refcount: i32::try_from(holders.len()).unwrap() + refs,
            holders,
        }))
    }
    fn insert(&self, _: &ModuleFile, _: &[String]) -> Result<(), KmodError> {
        unreachable!("decisions never change the kernel")
    }
    fn remove(&self, _: &ModName, _: bool) -> Result<(), KmodError> {
        unreachable!("decisions never change the kernel")
    }
    fn identity(&self, name: &ModName) -> ModuleIdentity {
        self.identities
            .borrow()
            .get(name)
            .cloned()
            .unwrap_or_default()
    }
    fn parameter(&self, _: &ModName, _: &str) -> Option<String> {
        None
    }
    fn firmware_search_path(&self) -> Option<String> {
        None
    }
    fn set_firmware_search_path(&self, _: &Path) -> Result<()> {
        Ok(())
    }
}

/// The module config `x` made of `text` plus a directory source.
pub(super) fn module_config(text: &str) -> ModuleConfig {
    let d = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(d.path().join("modules.d")).unwrap();
    std::fs::write(
        d.path().join("modules.d/x.toml"),
        format!("{text}[directory]\npath = \"/x\"\n"),
    )
    .unwrap();
    let c = Config::load(&[d.path().to_owned()], &Overrides::default());
    c.module("x").unwrap().clone()
}

/// An empty record of config `c`.
pub(super) fn record() -> Record {
    Record {
        config: "c".into(),
        kernel: "k".into(),
        config_digest: "d".into(),
        after: vec![],
        inserted: vec![],
        removed_in_tree: vec![],
        firmware: vec![],
        since: 0,
        complete: false,
        intent: None,
    }
}

fn live(refcount: i32, holders: &[&str]) -> LiveModule {
    LiveModule {
        state: InitState::Live,
        refcount,
        holders: holders.iter().map(|h| n(h)).collect(),
    }
}

#[test]
fn in_use_counts_foreign_holders_and_plain_references() {
    let ours: BTreeSet<_> = [n("a"), n("b")].into();
    assert!(!used_beyond(&live(0, &[]), &ours));
    assert!(!used_beyond(&live(2, &["a", "b"]), &ours));
    assert!(used_beyond(&live(1, &["c"]), &ours));
    assert!(used_beyond(&live(2, &["a", "c"]), &ours));
    // One reference more than the holders account for: an open device, say.
    assert!(used_beyond(&live(2, &["a"]), &ours));
}

#[test]
fn parameter_values_compare_as_sysfs_shows_them() {
    assert!(same_parameter_value("7", "7"));
    assert!(same_parameter_value("two words", "\"two words\""));
    assert!(same_parameter_value("Y", "1"));
    assert!(same_parameter_value("N", "off"));
    assert!(!same_parameter_value("Y", "0"));
    assert!(!same_parameter_value("1", "7"));
}
