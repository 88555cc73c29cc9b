//! What a load or an unload will change in the kernel, decided before
//! anything changes: from the staged files, the record and what the kernel
//! shows. The engine carries a plan out through the record's intents.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{Result, anyhow};

use super::{Fail, State, Step, holders_text, used_beyond};
use crate::config::ModuleConfig;
use crate::kmod::{InitState, KernelModules, ModName, ModuleFile};
use crate::state::{Owned, Record};

/// One change (or non-change) of a load, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum LoadStep {
    /// Take out in-tree `target`: `removal` lists the modules that go, holders first.
    TakeOut {
        /// The in-tree module replaced.
        target: ModName,
        /// Modules removed, in order (the target last).
        removal: Vec<ModName>,
    },
    /// Place the extracted firmware from this directory.
    PlaceFirmware(PathBuf),
    /// Insert `file` with `params`.
    Insert {
        /// The module file.
        file: ModuleFile,
        /// Parameters (the config's for its modules, the tree's options for in-tree ones).
        params: Vec<String>,
        /// True when the config names it.
        configured: bool,
    },
    /// The module is live already: kvcd's (`ours`) or someone else's (the same build).
    Present {
        /// The module file.
        file: ModuleFile,
        /// True when the config names it.
        configured: bool,
        /// True when the record says kvcd inserted it.
        ours: bool,
    },
}

/// The plan of loading `order` (dependencies first) for `c` on top of `record`.
/// `in_tree_options` gives the kernel tree's modprobe.d options for an in-tree dependency.
pub(super) fn load(
    c: &ModuleConfig,
    order: &[ModuleFile],
    firmware: Option<&Path>,
    record: &Record,
    kmods: &dyn KernelModules,
    in_tree_options: &dyn Fn(&ModName) -> Vec<String>,
) -> Result<Vec<LoadStep>, Fail> {
    let mut plan = Vec::new();
    let mut going = BTreeSet::new();
    for r in &c.replace_in_tree {
        if record.inserted.iter().any(|o| o.name == *r) {
            continue;
        }
        if let Some(removal) = take_out(r, kmods)? {
            going.extend(removal.iter().cloned());
            plan.push(LoadStep::TakeOut {
                target: r.clone(),
                removal,
            });
        }
    }
    if let Some(fw) = firmware {
        plan.push(LoadStep::PlaceFirmware(fw.to_owned()));
    }
    for f in order {
        let configured = c.modules.contains(&f.name);
        let live = kmods.live(&f.name).map_err(Fail::at(Step::Insert))?;
        if live.is_some() && !going.contains(&f.name) {
            plan.push(LoadStep::Present {
                file: f.clone(),
                configured,
                ours: record.inserted.iter().any(|o| o.name == f.name),
            });
            continue;
        }
        let params = if configured {
            c.parameters_for(&f.name).to_vec()
        } else if f.in_tree {
            in_tree_options(&f.name)
        } else {
            Vec::new()
        };
        plan.push(LoadStep::Insert {
            file: f.clone(),
            params,
            configured,
        });
    }
    Ok(plan)
}

/// What taking out in-tree `target` removes (holders first, each once), or
/// `None` when it is not live; refuses a built-in module or one held from outside.
pub(super) fn take_out(
    target: &ModName,
    kmods: &dyn KernelModules,
) -> Result<Option<Vec<ModName>>, Fail> {
    let Some(live) = kmods.live(target).map_err(Fail::at(Step::Replace))? else {
        return Ok(None);
    };
    if live.state == InitState::Builtin {
        return Err(Fail::at(Step::Replace)(anyhow!(
            "in-tree module {target} is built into the kernel and cannot be replaced"
        )));
    }
    let mut removal = Vec::new();
    collect_holders(kmods, target, &mut removal, &mut BTreeSet::new())
        .map_err(Fail::at(Step::Replace))?;
    let set: BTreeSet<_> = removal.iter().cloned().collect();
    for m in &removal {
        if let Some(l) = kmods.live(m).map_err(Fail::at(Step::Replace))? {
            if used_beyond(&l, &set) {
                return Err(Fail(
                    Step::Replace,
                    anyhow!(
                        "cannot replace in-tree module {target}: {m} is in use (refcount {}{})",
                        l.refcount,
                        holders_text(&l.holders)
                    ),
                    State::Busy,
                ));
            }
        }
    }
    Ok(Some(removal))
}

fn collect_holders(
    kmods: &dyn KernelModules,
    m: &ModName,
    out: &mut Vec<ModName>,
    seen: &mut BTreeSet<ModName>,
) -> Result<()> {
    if !seen.insert(m.clone()) {
        return Ok(());
    }
    if let Some(l) = kmods.live(m)? {
        for h in &l.holders {
            collect_holders(kmods, h, out, seen)?;
        }
    }
    out.push(m.clone());
    Ok(())
}

/// The plan of an unload: what to remove (reverse insertion order) and
/// notes on dependencies left because others use them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(super) struct UnloadPlan {
    /// Modules to remove, in order.
    pub remove: Vec<Owned>,
    /// Dependencies kvcd inserted that others use now: left loaded.
    pub left: Vec<ModName>,
}

/// Checks everything before anything is removed: a configured module in use
/// refuses the unload (unless `force`); a dependency in use is left.
pub(super) fn unload(
    record: &Record,
    kmods: &dyn KernelModules,
    force: bool,
) -> Result<UnloadPlan, Fail> {
    let mut plan = UnloadPlan::default();
    let ours: BTreeSet<_> = record.inserted.iter().map(|o| o.name.clone()).collect();
    for o in record.inserted.iter().rev() {
        let Some(l) = kmods.live(&o.name).map_err(Fail::at(Step::Remove))? else {
            continue;
        };
        match (used_beyond(&l, &ours), o.configured, force) {
            (false, _, _) | (true, true, true) => plan.remove.push(o.clone()),
            (true, false, _) => plan.left.push(o.name.clone()),
            (true, true, false) => {
                return Err(Fail(
                    Step::Remove,
                    anyhow!(
                        "module {} is in use (refcount {}{}); nothing was unloaded",
                        o.name,
                        l.refcount,
                        holders_text(&l.holders)
                    ),
                    State::Busy,
                ));
            }
        }
    }
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reconciler::tests::{Kernel, module_config, n, record};

    fn file(name: &str, in_tree: bool) -> ModuleFile {
        ModuleFile {
            name: n(name),
            path: format!("/t/{name}.ko").into(),
            in_tree,
        }
    }

    fn owned(name: &str, configured: bool) -> Owned {
        Owned {
            name: n(name),
            path: format!("/t/{name}.ko").into(),
            configured,
        }
    }

    #[test]
    fn a_fresh_load_takes_out_places_and_inserts_in_order() {
        let k = Kernel::default();
        k.live("dummy", &[]);
        k.live("dummy_user", &["dummy"]);
        k.live("crc8", &[]);
        let c = module_config(
            "modules = [\"dummy\", \"app\"]\nreplace_in_tree = [\"dummy\"]\n[parameters]\napp = [\"x=1\"]\n",
        );
        let order = [
            file("crc8", true),
            file("base", false),
            file("dummy", false),
            file("app", false),
        ];
        let opts = |m: &ModName| vec![format!("{m}_opt=1")];
        let plan = load(&c, &order, Some(Path::new("/fw")), &record(), &k, &opts).unwrap();
        assert_eq!(
            plan,
            vec![
                LoadStep::TakeOut {
                    target: n("dummy"),
                    removal: vec![n("dummy_user"), n("dummy")],
                },
                LoadStep::PlaceFirmware("/fw".into()),
                LoadStep::Present {
                    file: file("crc8", true),
                    configured: false,
                    ours: false,
                },
                LoadStep::Insert {
                    file: file("base", false),
                    params: vec![],
                    configured: false,
                },
                // Live now, but taken out first: inserted.
                LoadStep::Insert {
                    file: file("dummy", false),
                    params: vec![],
                    configured: true,
                },
                LoadStep::Insert {
                    file: file("app", false),
                    params: vec!["x=1".into()],
                    configured: true,
                },
            ]
        );
    }

    #[test]
    fn a_resumed_load_keeps_what_is_kvcds_and_gives_in_tree_options() {
        let k = Kernel::default();
        k.live("dummy", &[]);
        let c = module_config("modules = [\"dummy\"]\nreplace_in_tree = [\"dummy\"]\n");
        let mut r = record();
        r.inserted.push(owned("dummy", true));
        let opts = |m: &ModName| vec![format!("{m}_opt=1")];
        let plan = load(
            &c,
            &[file("crc8", true), file("dummy", false)],
            None,
            &r,
            &k,
            &opts,
        )
        .unwrap();
        assert_eq!(
            plan,
            vec![
                LoadStep::Insert {
                    file: file("crc8", true),
                    params: vec!["crc8_opt=1".into()],
                    configured: false,
                },
                LoadStep::Present {
                    file: file("dummy", false),
                    configured: true,
                    ours: true,
                },
            ]
        );
    }

    #[test]
    fn taking_out_refuses_built_in_and_held_modules() {
        let k = Kernel::default();
        assert_eq!(take_out(&n("dummy"), &k).unwrap(), None);
        k.builtin("dummy");
        let Err(Fail(step, e, _)) = take_out(&n("dummy"), &k) else {
            panic!("a built-in module was planned out");
        };
        assert_eq!(step, Step::Replace);
        assert!(e.to_string().contains("built into the kernel"), "{e}");

        let k = Kernel::default();
        k.live("dummy", &[]);
        k.hold("dummy");
        let Err(Fail(_, e, state)) = take_out(&n("dummy"), &k) else {
            panic!("a module in use was planned out");
        };
        assert_eq!(state, State::Busy);
        assert!(
            e.to_string().contains("dummy is in use (refcount 1)"),
            "{e}"
        );
    }

    #[test]
    fn unloading_refuses_a_configured_module_in_use_and_leaves_shared_dependencies() {
        let k = Kernel::default();
        k.live("base", &[]);
        k.live("app", &["base"]);
        k.live("other", &["base"]);
        let mut r = record();
        r.inserted = vec![
            owned("base", false),
            owned("app", true),
            owned("gone", true),
        ];
        let plan = unload(&r, &k, false).unwrap();
        assert_eq!(plan.remove, vec![owned("app", true)]);
        assert_eq!(plan.left, vec![n("base")]);

        k.hold("app");
        let Err(Fail(_, e, state)) = unload(&r, &k, false) else {
            panic!("an unload of a module in use was planned");
        };
        assert_eq!(state, State::Busy);
        assert!(e.to_string().contains("nothing was unloaded"), "{e}");
        // Forced, a configured module in use goes.
        assert_eq!(
            unload(&r, &k, true).unwrap().remove,
            vec![owned("app", true)]
        );
    }
}
