//! What kvcd loaded, per module config, under the runtime directory.
//!
//! A record is written atomically after every change to the kernel, so a new
//! process (or one started after a crash) knows exactly which modules it owns
//! and which in-tree modules it must put back.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};

use crate::kmod::ModName;
use crate::util::write_atomic;

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

    fn path(&self, config: &str) -> PathBuf {
        self.dir.join(format!("{config}.json"))
    }

    /// The record of `config`, if kvcd has one.
    pub fn get(&self, config: &str) -> Result<Option<Record>> {
        let p = self.path(config);
        match fs::read(&p) {
            Ok(data) => serde_json::from_slice(&data)
                .with_context(|| format!("{}: corrupt runtime record", p.display()))
                .map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", p.display())),
        }
    }

    /// Writes `record` atomically.
    pub fn put(&self, record: &Record) -> Result<()> {
        let data = serde_json::to_vec_pretty(record)?;
        write_atomic(&self.path(&record.config), &data)
    }

    /// Removes the record of `config`.
    pub fn delete(&self, config: &str) -> Result<()> {
        match fs::remove_file(self.path(config)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(e).with_context(|| format!("removing {}", self.path(config).display()))
            }
            _ => Ok(()),
        }
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

    #[test]
    fn round_trip_and_delete() {
        let d = tempfile::tempdir().unwrap();
        let s = RecordStore::new(d.path());
        assert!(s.get("x").unwrap().is_none());
        let r = Record {
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
        };
        s.put(&r).unwrap();
        assert_eq!(s.get("x").unwrap().unwrap(), r);
        assert_eq!(s.all().unwrap(), vec![r]);
        s.delete("x").unwrap();
        s.delete("x").unwrap();
        assert!(s.all().unwrap().is_empty());
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
