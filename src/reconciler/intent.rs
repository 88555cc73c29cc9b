//! Confirming and settling the kernel changes written as intents in a
//! record (see [`crate::state::record`]).
//!
//! A change that returned is *confirmed*: the record takes it as done. An
//! intent found without an answer (the process that wrote it was killed, or
//! the change failed half-way) is *settled* by looking at the kernel and the
//! firmware directory: what is there is kvcd's, what is not was not done.

use std::path::PathBuf;

use crate::kmod::{IdentityMatch, KernelModules};
use crate::state::{Intent, Record};

/// What settling an intent concluded, for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Settled {
    /// The intent.
    pub intent: Intent,
    /// What kvcd found and concluded.
    pub finding: String,
}

/// Takes a change that returned successfully as done.
pub(crate) fn confirm(record: &mut Record, intent: Intent) {
    match intent {
        Intent::Insert { module, .. } => {
            if !record.inserted.iter().any(|o| o.name == module.name) {
                record.inserted.push(module);
            }
        }
        Intent::Remove { name } => record.inserted.retain(|o| o.name != name),
        Intent::TakeOut { name } => {
            if !record.removed_in_tree.contains(&name) {
                record.removed_in_tree.push(name);
            }
        }
        Intent::Restore { name } => record.removed_in_tree.retain(|m| *m != name),
        Intent::PlaceFirmware { files } => add_firmware(record, files),
        Intent::RemoveFirmware { files } => record.firmware.retain(|f| !files.contains(f)),
    }
}

fn add_firmware(record: &mut Record, files: Vec<PathBuf>) {
    for f in files {
        if !record.firmware.contains(&f) {
            record.firmware.push(f);
        }
    }
}

/// Decides an intent whose outcome is unknown from what the kernel shows.
/// Firmware files that may exist stay recorded (removal tolerates missing
/// ones); the caller removes those of an interrupted removal again.
pub(crate) fn settle(record: &mut Record, intent: Intent, kmods: &dyn KernelModules) -> Settled {
    let live = |name| matches!(kmods.live(name), Ok(Some(_)));
    let finding = match &intent {
        Intent::Insert { module, identity } => {
            if !live(&module.name) {
                format!("{} is not live: the insert did not happen", module.name)
            } else if let IdentityMatch::Differs(why) =
                identity.compare(&kmods.identity(&module.name))
            {
                format!(
                    "{} is live but not the file kvcd was inserting ({why}): not kvcd's",
                    module.name
                )
            } else {
                confirm(record, intent.clone());
                format!(
                    "{} is live and the build kvcd was inserting: kvcd's",
                    module.name
                )
            }
        }
        Intent::Remove { name } => {
            if live(name) {
                format!("{name} is still live: kept as kvcd's")
            } else {
                confirm(record, intent.clone());
                format!("{name} is gone: removed")
            }
        }
        Intent::TakeOut { name } => {
            if live(name) {
                format!("in-tree {name} is still live: nothing to restore")
            } else {
                confirm(record, intent.clone());
                format!("in-tree {name} is out: kvcd will put it back on unload")
            }
        }
        Intent::Restore { name } => {
            if live(name) {
                confirm(record, intent.clone());
                format!("in-tree {name} is back")
            } else {
                format!("in-tree {name} is still out: kvcd will put it back on unload")
            }
        }
        Intent::PlaceFirmware { files } => {
            let present: Vec<PathBuf> = files
                .iter()
                .filter(|f| std::fs::symlink_metadata(f).is_ok())
                .cloned()
                .collect();
            let n = present.len();
            add_firmware(record, present);
            format!("{n} of {} firmware file(s) placed: kvcd's", files.len())
        }
        Intent::RemoveFirmware { files } => {
            format!(
                "removal of {} firmware file(s) was interrupted: finishing it",
                files.len()
            )
        }
    };
    Settled { intent, finding }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kmod::ModuleIdentity;
    use crate::reconciler::tests::{Kernel, n, record};
    use crate::state::Owned;

    fn id(b: u8) -> ModuleIdentity {
        ModuleIdentity {
            build_id: Some(vec![b; 20]),
            ..ModuleIdentity::default()
        }
    }

    /// Makes `name` live as the build `b`.
    fn live(k: &Kernel, name: &str, b: u8) {
        k.live(name, &[]);
        k.identities.borrow_mut().insert(n(name), id(b));
    }

    fn insert(name: &str, b: u8) -> Intent {
        Intent::Insert {
            module: Owned {
                name: n(name),
                path: format!("/t/{name}.ko").into(),
                configured: true,
            },
            identity: id(b),
        }
    }

    #[test]
    fn an_interrupted_insert_is_kvcds_only_when_the_live_build_is_the_one_inserted() {
        let k = Kernel::default();
        let mut r = record();
        let s = settle(&mut r, insert("a", 1), &k);
        assert!(r.inserted.is_empty(), "{}", s.finding);
        assert!(s.finding.contains("did not happen"));

        live(&k, "a", 2);
        let s = settle(&mut r, insert("a", 1), &k);
        assert!(r.inserted.is_empty());
        assert!(s.finding.contains("not kvcd's"), "{}", s.finding);

        live(&k, "a", 1);
        settle(&mut r, insert("a", 1), &k);
        assert_eq!(r.inserted.len(), 1);
        // Settling twice does not record it twice.
        settle(&mut r, insert("a", 1), &k);
        assert_eq!(r.inserted.len(), 1);
    }

    #[test]
    fn removals_take_outs_and_restores_follow_the_kernel() {
        let k = Kernel::default();
        let mut r = record();
        confirm(&mut r, insert("a", 1));
        live(&k, "a", 1);
        settle(&mut r, Intent::Remove { name: n("a") }, &k);
        assert_eq!(r.inserted.len(), 1, "still live: still ours");
        k.gone("a");
        settle(&mut r, Intent::Remove { name: n("a") }, &k);
        assert!(r.inserted.is_empty());

        live(&k, "dummy", 3);
        settle(&mut r, Intent::TakeOut { name: n("dummy") }, &k);
        assert!(r.removed_in_tree.is_empty(), "still live: not taken out");
        k.gone("dummy");
        settle(&mut r, Intent::TakeOut { name: n("dummy") }, &k);
        assert_eq!(r.removed_in_tree, vec![n("dummy")]);
        settle(&mut r, Intent::Restore { name: n("dummy") }, &k);
        assert_eq!(r.removed_in_tree, vec![n("dummy")], "not back yet");
        live(&k, "dummy", 3);
        settle(&mut r, Intent::Restore { name: n("dummy") }, &k);
        assert!(r.removed_in_tree.is_empty());
    }

    #[test]
    fn firmware_that_may_have_been_placed_is_recorded() {
        let d = tempfile::tempdir().unwrap();
        let (a, b) = (d.path().join("a.bin"), d.path().join("b.bin"));
        std::fs::write(&a, b"x").unwrap();
        let mut r = record();
        let s = settle(
            &mut r,
            Intent::PlaceFirmware {
                files: vec![a.clone(), b],
            },
            &Kernel::default(),
        );
        assert_eq!(r.firmware, vec![a.clone()]);
        assert!(s.finding.contains("1 of 2"), "{}", s.finding);
        confirm(&mut r, Intent::RemoveFirmware { files: vec![a] });
        assert!(r.firmware.is_empty());
    }
}
