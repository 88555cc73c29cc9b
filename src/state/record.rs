//! What kvcd changed in the kernel, per module config: `RUNTIME/loaded/NAME.json`.
//!
//! Every kernel change is written here as an [`Intent`] before it happens and
//! confirmed (the intent cleared, the change recorded) after, so a process
//! started after a kill at any instant knows exactly which modules are
//! kvcd's, which in-tree modules it must put back and which firmware it placed.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};

use super::file::{self, Versioned};
use crate::kmod::{ModName, ModuleIdentity};

/// A module kvcd inserted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owned {
    /// Module name.
    pub name: ModName,
    /// The file it was inserted from.
    pub path: PathBuf,
    /// True when the config names it (false for a dependency pulled in).
    pub configured: bool,
}

/// A kernel change about to happen; written before it, cleared after it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Intent {
    /// Inserting `module`; a live module of that name with `identity` is this insert's.
    Insert {
        /// The module and its file.
        module: Owned,
        /// The identity of the file being inserted.
        identity: ModuleIdentity,
    },
    /// Removing a module kvcd inserted.
    Remove {
        /// Module name.
        name: ModName,
    },
    /// Taking out an in-tree module to make room.
    TakeOut {
        /// Module name.
        name: ModName,
    },
    /// Putting an in-tree module back.
    Restore {
        /// Module name.
        name: ModName,
    },
    /// Placing firmware files.
    PlaceFirmware {
        /// Every file the placement may create.
        files: Vec<PathBuf>,
    },
    /// Removing firmware files kvcd placed.
    RemoveFirmware {
        /// The files.
        files: Vec<PathBuf>,
    },
}

impl Intent {
    /// A short name of the change (`insert`, `take_out`, …), for failpoints and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Insert { .. } => "insert",
            Self::Remove { .. } => "remove",
            Self::TakeOut { .. } => "take_out",
            Self::Restore { .. } => "restore",
            Self::PlaceFirmware { .. } => "firmware_place",
            Self::RemoveFirmware { .. } => "firmware_remove",
        }
    }
}

impl std::fmt::Display for Intent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Insert { module, .. } => write!(f, "insert {}", module.name),
            Self::Remove { name } => write!(f, "remove {name}"),
            Self::TakeOut { name } => write!(f, "take out in-tree {name}"),
            Self::Restore { name } => write!(f, "restore in-tree {name}"),
            Self::PlaceFirmware { files } => write!(f, "place {} firmware file(s)", files.len()),
            Self::RemoveFirmware { files } => {
                write!(f, "remove {} firmware file(s)", files.len())
            }
        }
    }
}

/// The runtime record of one module config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Module config name.
    pub config: String,
    /// Kernel the modules were loaded into.
    pub kernel: String,
    /// SHA-256 of the config file that was applied.
    pub config_digest: String,
    /// Module configs this one was ordered after.
    #[serde(default)]
    pub after: Vec<String>,
    /// Modules kvcd inserted, in insertion order.
    pub inserted: Vec<Owned>,
    /// In-tree modules kvcd removed to make room, in removal order.
    pub removed_in_tree: Vec<ModName>,
    /// Firmware files kvcd placed.
    #[serde(default)]
    pub firmware: Vec<PathBuf>,
    /// Seconds since the epoch when the config was first applied.
    pub since: u64,
    /// True once a load finished (post_load hook and ready check passed); default false.
    #[serde(default)]
    pub complete: bool,
    /// The kernel change in progress, if any (default none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub intent: Option<Intent>,
}

impl Versioned for Record {
    const VERSION: u32 = 1;
    const WHAT: &'static str = "runtime record";

    /// Version 1 added `complete` and `intent`; a version 0 record was written
    /// by a kvcd that had no way to say a load was unfinished, so it counts as complete.
    fn migrate(from: u32, mut doc: serde_json::Value) -> Result<serde_json::Value> {
        if from == 0 {
            doc["complete"] = serde_json::Value::Bool(true);
        }
        Ok(doc)
    }
}

impl Record {
    /// True when the record holds nothing kvcd must undo.
    pub fn is_empty(&self) -> bool {
        self.inserted.is_empty()
            && self.removed_in_tree.is_empty()
            && self.firmware.is_empty()
            && self.intent.is_none()
    }
}

/// The directory of records.
#[derive(Debug, Clone)]
pub struct RecordStore {
    dir: PathBuf,
}

impl RecordStore {
    /// Records live in `RUNTIME_DIR/loaded/`.
    pub fn new(runtime_dir: &Path) -> Self {
        Self {
            dir: runtime_dir.join("loaded"),
        }
    }

    /// The directory holding the records.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, config: &str) -> PathBuf {
        self.dir.join(format!("{config}.json"))
    }

    /// The record of `config`, if kvcd has one.
    pub fn get(&self, config: &str) -> Result<Option<Record>> {
        file::read(&self.path(config))
    }

    /// Writes `record` atomically.
    pub fn put(&self, record: &Record) -> Result<()> {
        file::write(&self.path(&record.config), record)
    }

    /// Writes `record`, or removes it when it holds nothing.
    pub fn save(&self, record: &Record) -> Result<()> {
        if record.is_empty() {
            self.delete(&record.config)
        } else {
            self.put(record)
        }
    }

    /// Removes the record of `config`.
    pub fn delete(&self, config: &str) -> Result<()> {
        crate::failpoint::hit("record.delete");
        file::remove(&self.path(config))
    }

    /// All records, sorted by config name.
    pub fn all(&self) -> Result<Vec<Record>> {
        let mut out = Vec::new();
        let entries = match fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(e).with_context(|| format!("reading {}", self.dir.display())),
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(config) = name
                .strip_suffix(".json")
                .filter(|_| !name.starts_with('.'))
            {
                if let Some(r) = self.get(config)? {
                    out.push(r);
                }
            }
        }
        out.sort_by(|a, b| a.config.cmp(&b.config));
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> Record {
        Record {
            config: "x".into(),
            kernel: "6.1.0-27-amd64".into(),
            config_digest: "ab".into(),
            after: vec![],
            inserted: vec![Owned {
                name: ModName::parse("a-b").unwrap(),
                path: "/p/a-b.ko".into(),
                configured: true,
            }],
            removed_in_tree: vec![ModName::parse("dummy").unwrap()],
            firmware: vec![],
            since: 1,
            complete: true,
            intent: Some(Intent::Remove {
                name: ModName::parse("a_b").unwrap(),
            }),
        }
    }

    #[test]
    fn round_trip_and_delete() {
        let d = tempfile::tempdir().unwrap();
        let s = RecordStore::new(d.path());
        assert!(s.get("x").unwrap().is_none());
        let r = record();
        s.put(&r).unwrap();
        assert_eq!(s.get("x").unwrap().unwrap(), r);
        assert_eq!(s.all().unwrap(), vec![r]);
        s.delete("x").unwrap();
        s.delete("x").unwrap();
        assert!(s.all().unwrap().is_empty());
    }

    #[test]
    fn an_empty_record_is_removed_by_save() {
        let d = tempfile::tempdir().unwrap();
        let s = RecordStore::new(d.path());
        let mut r = record();
        s.save(&r).unwrap();
        assert!(s.get("x").unwrap().is_some());
        r.inserted.clear();
        r.removed_in_tree.clear();
        r.intent = None;
        s.save(&r).unwrap();
        assert!(s.get("x").unwrap().is_none());
    }

    #[test]
    fn a_version_0_record_reads_as_complete_without_intent() {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir_all(d.path().join("loaded")).unwrap();
        fs::write(
            d.path().join("loaded/x.json"),
            r#"{"config":"x","kernel":"k","config_digest":"d","inserted":[],"removed_in_tree":["dummy"],"since":5}"#,
        )
        .unwrap();
        let r = RecordStore::new(d.path()).get("x").unwrap().unwrap();
        assert!(r.complete && r.intent.is_none());
        assert_eq!(r.removed_in_tree, vec![ModName::parse("dummy").unwrap()]);
    }

    #[test]
    fn corrupt_record_names_the_file() {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir_all(d.path().join("loaded")).unwrap();
        fs::write(d.path().join("loaded/x.json"), "{").unwrap();
        let e = RecordStore::new(d.path()).get("x").unwrap_err();
        assert!(
            format!("{e:#}").contains("loaded/x.json: corrupt runtime record"),
            "{e:#}"
        );
    }
}
