//! `STATE/sets/KERNEL/CONFIG.json`: the module files one config resolved for
//! one kernel, as paths in the content store (`STATE/files/SHA256/NAME`).
//! Sets are what keep stored files alive: a file no set names is garbage.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Result;
use serde::{Deserialize, Serialize};

use super::file::{self, Versioned};
use crate::kmod::elf::ElfInfo;

/// The files of one (config, kernel).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleSet {
    /// Module name → its stored file.
    pub files: BTreeMap<String, SetFile>,
    /// The config digest these files last passed verification for (what
    /// makes the config ready for this kernel); none until they did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verified_for: Option<String>,
}

/// One module's file in a set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetFile {
    /// The file, relative to the content store (`SHA256/NAME`).
    pub file: String,
    /// The file it was stored from, as it was then: when the source still
    /// looks exactly so, its content is the stored one (no hashing again).
    pub source: Option<SourceStat>,
    /// What was read of the stored file (it never changes: it is named by its content).
    pub elf: Option<ElfInfo>,
    /// The signing identity (digest and certificate fingerprint) the file was
    /// staged under, when `[signing]` applied: another key signs it again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signed: Option<String>,
}

/// What tells a changed file from an unchanged one without reading it
/// (device, inode, size, modification and change times): ctime cannot be
/// set from user space, so a rewrite shows, unless it came within the
/// file system's timestamp granularity of the stat. So a stat is trusted
/// only once the file had been unchanged for a while when it was taken.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceStat {
    /// The path stored from.
    pub path: PathBuf,
    /// Device.
    pub dev: u64,
    /// Inode.
    pub ino: u64,
    /// Size in bytes.
    pub size: u64,
    /// Modification time, nanoseconds since the epoch.
    pub mtime_ns: i128,
    /// Status change time, nanoseconds since the epoch.
    pub ctime_ns: i128,
    /// When the stat was taken, nanoseconds since the epoch.
    pub taken_ns: i128,
}

/// How long a file must have been unchanged when its stat was taken for
/// the stat to vouch for its content (1 s: far above any timestamp tick).
const SETTLED_NS: i128 = 1_000_000_000;

impl SourceStat {
    /// The stat of `path` now (not following a final symlink), if it can be read.
    pub fn of(path: &Path) -> Option<Self> {
        use std::os::unix::fs::MetadataExt as _;
        let m = std::fs::symlink_metadata(path).ok()?;
        let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
        let taken = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i128::try_from(d.as_nanos()).unwrap_or(0));
        Some(Self {
            path: path.to_owned(),
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime_ns: ns(m.mtime(), m.mtime_nsec()),
            ctime_ns: ns(m.ctime(), m.ctime_nsec()),
            taken_ns: taken,
        })
    }

    /// True when `now` (a fresh stat of the same path) shows the file as this
    /// stat saw it, and this stat was taken when the file had settled.
    pub fn vouches_for(&self, now: &Self) -> bool {
        self.path == now.path
            && self.dev == now.dev
            && self.ino == now.ino
            && self.size == now.size
            && self.mtime_ns == now.mtime_ns
            && self.ctime_ns == now.ctime_ns
            && self.taken_ns - self.ctime_ns.max(self.mtime_ns) >= SETTLED_NS
    }
}

impl Versioned for ModuleSet {
    const VERSION: u32 = 1;
    const WHAT: &'static str = "module set";
}

/// The set at `path`, if there is one.
pub fn read(path: &Path) -> Result<Option<ModuleSet>> {
    file::read(path)
}

/// Writes `set` to `path` (atomically).
pub fn write(path: &Path, set: &ModuleSet) -> Result<()> {
    file::write(path, set)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stat_vouches_only_for_the_same_settled_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("m.ko");
        std::fs::write(&p, b"one").unwrap();
        let fresh = SourceStat::of(&p).unwrap();
        // Taken right after the write: a same-size rewrite in the same tick could hide.
        assert!(!fresh.vouches_for(&SourceStat::of(&p).unwrap()));
        let settled = SourceStat {
            taken_ns: fresh.ctime_ns + SETTLED_NS,
            ..fresh
        };
        assert!(settled.vouches_for(&SourceStat::of(&p).unwrap()));
        std::fs::write(&p, b"two!").unwrap();
        assert!(!settled.vouches_for(&SourceStat::of(&p).unwrap()));
        let elsewhere = SourceStat {
            path: d.path().join("other.ko"),
            ..settled
        };
        assert!(!elsewhere.vouches_for(&SourceStat::of(&p).unwrap()));
    }
}
