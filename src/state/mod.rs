//! Everything kvcd keeps on disk, owned in one place.
//!
//! ```text
//! STATE (/var/lib/kvcd)              RUNTIME (/run/kvcd)
//!   kvcd.lock                          kvcd.lock
//!   files/SHA256/NAME.ko               loaded/CONFIG.json   (records, with intents)
//!   sets/KERNEL/CONFIG.json            desired.json         (the agent's wanted set)
//!   images/CONFIG/KERNEL/index.json
//!   images/CONFIG/KERNEL/DIGEST/
//!   mounts/IMAGE-ID                    (an image mount in progress)
//! ```
//!
//! Module files are stored once by content (`files/`); a set names the files
//! one config resolved for one kernel, so configs and kernels that use the
//! same files share them.
//!
//! ```text
//! ```
//!
//! Every JSON file carries a format version ([`file`]), every write is
//! atomic, and [`Layout::sweep`] removes what a killed process left behind.
//! Work in progress lives in `.tmp-…-PID` directories and `.NAME.tmp-PID`
//! files that only become real by a rename.

pub mod desired;
pub mod file;
pub mod index;
pub mod record;
pub mod set;

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use nix::fcntl::{Flock, FlockArg};

pub use record::{Intent, Owned, Record, RecordStore};

/// The marker written last into a finished module tree or extraction.
pub const COMPLETE: &str = ".kvcd-complete";

/// The state and runtime directories.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// Long-lived state (default `/var/lib/kvcd`).
    pub state_dir: PathBuf,
    /// What is true until reboot (default `/run/kvcd`).
    pub runtime_dir: PathBuf,
}

impl Layout {
    /// The directories of `settings`.
    pub fn from_settings(settings: &crate::config::DaemonSettings) -> Self {
        Self {
            state_dir: settings.state_dir.clone(),
            runtime_dir: settings.runtime_dir.clone(),
        }
    }

    /// The module sets of every config for `kernel` (one directory per
    /// kernel, not per config: a config costs one small file).
    pub fn sets_for(state_dir: &Path, kernel: &str) -> PathBuf {
        state_dir.join("sets").join(kernel)
    }

    /// The module set of (`config`, `kernel`).
    pub fn set_file(state_dir: &Path, config: &str, kernel: &str) -> PathBuf {
        Self::sets_for(state_dir, kernel).join(format!("{config}.json"))
    }

    /// The kernels `config` has a module set for.
    pub fn set_kernels(state_dir: &Path, config: &str) -> Vec<String> {
        subdirs(&state_dir.join("sets"))
            .into_iter()
            .filter(|k| Self::set_file(state_dir, config, k).is_file())
            .collect()
    }

    /// Every module set: (config, kernel, path).
    pub fn all_sets(state_dir: &Path) -> Vec<(String, String, PathBuf)> {
        let mut out = Vec::new();
        for kernel in subdirs(&state_dir.join("sets")) {
            let dir = Self::sets_for(state_dir, &kernel);
            for name in subentries(&dir) {
                if let Some(config) = name
                    .strip_suffix(".json")
                    .filter(|_| !name.starts_with('.'))
                {
                    out.push((config.to_owned(), kernel.clone(), dir.join(&name)));
                }
            }
        }
        out.sort();
        out
    }

    /// The content store of module files: `SHA256/NAME` under it.
    pub fn files_dir(state_dir: &Path) -> PathBuf {
        state_dir.join("files")
    }

    /// Removes the depmod-indexed trees an older kvcd kept per config and
    /// kernel (`STATE/roots`; nothing uses them now); returns the path when
    /// there was one.
    pub fn remove_legacy_trees(&self) -> Option<PathBuf> {
        let roots = self.state_dir.join("roots");
        fs::remove_dir_all(&roots).ok().map(|()| roots)
    }

    /// Image extractions of `config`, one subdirectory per kernel.
    pub fn images_of(state_dir: &Path, config: &str) -> PathBuf {
        state_dir.join("images").join(config)
    }

    /// The image directory of (`config`, `kernel`): its index and extractions.
    pub fn image_dir(state_dir: &Path, config: &str, kernel: &str) -> PathBuf {
        Self::images_of(state_dir, config).join(kernel)
    }

    /// Module configs that have artifacts (module sets or extractions).
    pub fn configs_with_artifacts(state_dir: &Path) -> std::collections::BTreeSet<String> {
        Self::all_sets(state_dir)
            .into_iter()
            .map(|(config, _, _)| config)
            .chain(subdirs(&state_dir.join("images")))
            .collect()
    }

    /// The records of what kvcd changed in the kernel.
    pub fn records(&self) -> RecordStore {
        RecordStore::new(&self.runtime_dir)
    }

    /// The agent's desired state.
    pub fn desired(&self) -> PathBuf {
        self.runtime_dir.join("desired.json")
    }

    /// The marker of an image mount in progress, written before mounting and
    /// removed once unmounted.
    pub fn mount_marker(state_dir: &Path, image_id: &str) -> PathBuf {
        state_dir
            .join("mounts")
            .join(image_id.trim_start_matches("sha256:"))
    }

    /// Image mounts a killed process may have left (image IDs, with their markers).
    pub fn left_mounts(&self) -> Vec<(String, PathBuf)> {
        let dir = self.state_dir.join("mounts");
        let mut ids = subentries(&dir);
        ids.retain(|n| !n.starts_with('.'));
        ids.sort();
        ids.into_iter()
            .map(|id| (id.clone(), dir.join(id)))
            .collect()
    }

    /// Takes kvcd's lock on both directories, waiting for another kvcd that holds it.
    pub fn lock(&self) -> Result<Lock> {
        Ok(Lock {
            _state: lock_dir(&self.state_dir, "state")?,
            _runtime: lock_dir(&self.runtime_dir, "runtime")?,
        })
    }

    /// Takes kvcd's lock on both directories if no other kvcd holds it; `None` when one does.
    pub fn try_lock(&self) -> Result<Option<Lock>> {
        let Some(state) = try_lock_dir(&self.state_dir, "state")? else {
            return Ok(None);
        };
        let Some(runtime) = try_lock_dir(&self.runtime_dir, "runtime")? else {
            return Ok(None);
        };
        Ok(Some(Lock {
            _state: state,
            _runtime: runtime,
        }))
    }

    /// Removes what killed processes left in both directories: `.tmp-…-PID`
    /// directories and `.NAME.tmp-PID` files whose process is gone. Call with
    /// the lock held, before any work; returns the paths removed.
    pub fn sweep(&self) -> Vec<PathBuf> {
        let mut dirs = vec![
            self.state_dir.clone(),
            self.runtime_dir.clone(),
            self.records().dir().to_owned(),
            self.state_dir.join("mounts"),
            Self::files_dir(&self.state_dir),
        ];
        for kernel in subdirs(&self.state_dir.join("sets")) {
            dirs.push(Self::sets_for(&self.state_dir, &kernel));
        }
        let images = self.state_dir.join("images");
        for config in subdirs(&images) {
            dirs.push(images.join(&config));
            for kernel in subdirs(&images.join(&config)) {
                dirs.push(images.join(&config).join(kernel));
            }
        }
        dirs.iter().flat_map(|d| sweep_stale_tmp(d)).collect()
    }
}

/// Holds kvcd's lock on the state and runtime directories until dropped.
#[derive(Debug)]
pub struct Lock {
    _state: Flock<fs::File>,
    _runtime: Flock<fs::File>,
}

fn try_lock_dir(dir: &Path, what: &str) -> Result<Option<Flock<fs::File>>> {
    fs::create_dir_all(dir)
        .with_context(|| format!("creating {what} directory {}", dir.display()))?;
    let path = dir.join("kvcd.lock");
    let file = fs::File::create(&path).with_context(|| format!("opening {}", path.display()))?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(l) => Ok(Some(l)),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
        Err((_, e)) => Err(e).with_context(|| format!("locking {}", path.display())),
    }
}

fn lock_dir(dir: &Path, what: &str) -> Result<Flock<fs::File>> {
    if let Some(l) = try_lock_dir(dir, what)? {
        return Ok(l);
    }
    let path = dir.join("kvcd.lock");
    eprintln!("waiting for another kvcd holding {}", path.display());
    let file = fs::File::create(&path).with_context(|| format!("opening {}", path.display()))?;
    Flock::lock(file, FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .with_context(|| format!("locking {}", path.display()))
}

fn subentries(dir: &Path) -> Vec<String> {
    fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn subdirs(dir: &Path) -> Vec<String> {
    let mut out = subentries(dir);
    out.retain(|n| !n.starts_with('.') && dir.join(n).is_dir());
    out.sort();
    out
}

/// The process id of a temporary name: `.tmp-…-PID` or `.NAME.tmp-PID`.
pub fn tmp_owner(name: &str) -> Option<i32> {
    if !name.starts_with('.') || !name.contains("tmp-") {
        return None;
    }
    name.rsplit_once('-')?.1.parse().ok()
}

/// True for a temporary name whose process is not running (a crash or kill
/// left it; a live process's work in progress is not touched).
pub fn is_stale_tmp(name: &str) -> bool {
    match tmp_owner(name) {
        Some(pid) if pid > 0 => matches!(
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None),
            Err(nix::errno::Errno::ESRCH)
        ),
        Some(_) => false,
        // A work directory without an owner is nobody's.
        None => name.starts_with(".tmp-"),
    }
}

/// Removes the stale temporary entries directly in `dir`; returns them.
pub fn sweep_stale_tmp(dir: &Path) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    for name in subentries(dir) {
        if !is_stale_tmp(&name) {
            continue;
        }
        let p = dir.join(&name);
        let gone = if p.is_dir() && !p.is_symlink() {
            fs::remove_dir_all(&p)
        } else {
            fs::remove_file(&p)
        };
        if gone.is_ok() {
            removed.push(p);
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pid that is not running: past the kernel's maximum.
    const DEAD: i32 = 4_194_305;

    #[test]
    fn temporary_names_and_their_owners() {
        assert_eq!(tmp_owner(".tmp-abc-123"), Some(123));
        assert_eq!(tmp_owner(".x.json.tmp-77"), Some(77));
        assert_eq!(tmp_owner(".m.ko.signing.tmp-78"), Some(78));
        assert_eq!(tmp_owner("tmp-1"), None);
        assert_eq!(tmp_owner(".tmp-abc"), None);
        assert!(is_stale_tmp(&format!(".tmp-k-{DEAD}")));
        assert!(!is_stale_tmp(&format!(".tmp-k-{}", std::process::id())));
        assert!(!is_stale_tmp("index.json"));
        assert!(is_stale_tmp(".tmp-"));
    }

    #[test]
    fn sweep_removes_only_what_dead_processes_left() {
        let d = tempfile::tempdir().unwrap();
        let l = Layout {
            state_dir: d.path().join("s"),
            runtime_dir: d.path().join("r"),
        };
        let img = Layout::image_dir(&l.state_dir, "c", "k");
        let sets = Layout::sets_for(&l.state_dir, "k");
        let files = Layout::files_dir(&l.state_dir);
        let loaded = l.records().dir().to_owned();
        for dir in [&img, &sets, &files, &loaded] {
            fs::create_dir_all(dir.join(format!(".tmp-x-{DEAD}/sub"))).unwrap();
            fs::write(dir.join(format!(".f.json.tmp-{DEAD}")), b"").unwrap();
            fs::create_dir_all(dir.join(format!(".tmp-live-{}", std::process::id()))).unwrap();
            fs::write(dir.join("keep.json"), b"").unwrap();
        }
        fs::write(l.runtime_dir.join(format!(".desired.json.tmp-{DEAD}")), b"").unwrap();
        let removed = l.sweep();
        assert_eq!(removed.len(), 9, "{removed:?}");
        for dir in [&img, &sets, &files, &loaded] {
            let mut left = subentries(dir);
            left.sort();
            assert_eq!(
                left,
                vec![
                    format!(".tmp-live-{}", std::process::id()),
                    "keep.json".into()
                ]
            );
        }
        assert!(
            subentries(&l.runtime_dir)
                .iter()
                .all(|n| !n.contains("tmp"))
        );
    }

    #[test]
    fn the_lock_covers_both_directories_and_names_them() {
        let d = tempfile::tempdir().unwrap();
        let l = Layout {
            state_dir: d.path().join("s"),
            runtime_dir: d.path().join("r"),
        };
        let held = l.lock().unwrap();
        for dir in [&l.state_dir, &l.runtime_dir] {
            let f = fs::File::open(dir.join("kvcd.lock")).unwrap();
            assert!(
                Flock::lock(f, FlockArg::LockExclusiveNonblock).is_err(),
                "{} is not locked",
                dir.display()
            );
        }
        drop(held);
        let f = fs::File::open(l.state_dir.join("kvcd.lock")).unwrap();
        assert!(Flock::lock(f, FlockArg::LockExclusiveNonblock).is_ok());
        let blocked = Layout {
            state_dir: d.path().join("file/s"),
            runtime_dir: d.path().join("r"),
        };
        fs::write(d.path().join("file"), b"").unwrap();
        let e = format!("{:#}", blocked.lock().unwrap_err());
        assert!(
            e.contains("creating state directory") && e.contains("file/s"),
            "{e}"
        );
    }
}
