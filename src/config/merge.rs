//! Which file wins for each name across the configuration directories.
//!
//! Directories are given lowest precedence first; for the same file name the
//! later directory wins, and a symlink to `/dev/null` masks the name.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

/// One candidate file found in one directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// Full path of the file.
    pub path: PathBuf,
    /// True when the file is a symlink to `/dev/null`.
    pub masked: bool,
}

impl Candidate {
    /// A candidate for `path`, masked when it is a symlink to `/dev/null`.
    pub fn new(path: PathBuf) -> Self {
        let masked = is_mask(&path);
        Self { path, masked }
    }
}

/// The outcome of merging one file name across directories.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Merged {
    /// The file that wins (may be a mask).
    pub winner: Candidate,
    /// Lower-precedence files with the same name, lowest first.
    pub shadowed: Vec<PathBuf>,
}

/// Merges per-directory listings (lowest precedence first) keyed by file name.
pub fn merge(listings: Vec<BTreeMap<String, Candidate>>) -> BTreeMap<String, Merged> {
    let mut out: BTreeMap<String, Merged> = BTreeMap::new();
    for listing in listings {
        for (name, cand) in listing {
            match out.get_mut(&name) {
                Some(m) => {
                    let old = std::mem::replace(&mut m.winner, cand);
                    m.shadowed.push(old.path);
                }
                None => {
                    out.insert(
                        name,
                        Merged {
                            winner: cand,
                            shadowed: Vec::new(),
                        },
                    );
                }
            }
        }
    }
    out
}

/// True when `path` is a symlink that points at `/dev/null`.
pub fn is_mask(path: &Path) -> bool {
    fs::read_link(path).is_ok_and(|target| target == Path::new("/dev/null"))
}

/// Lists `dir/*.toml` (no hidden files) as candidates keyed by file name.
pub fn list_toml(dir: &Path) -> std::io::Result<BTreeMap<String, Candidate>> {
    let mut out = BTreeMap::new();
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || !name.ends_with(".toml") {
            continue;
        }
        out.insert(name, Candidate::new(entry.path()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cand(p: &str, masked: bool) -> Candidate {
        Candidate {
            path: PathBuf::from(p),
            masked,
        }
    }

    #[test]
    fn later_directory_wins_and_records_shadowed() {
        let usr = BTreeMap::from([
            (
                "a.toml".to_owned(),
                cand("/usr/lib/kvcd/modules.d/a.toml", false),
            ),
            (
                "b.toml".to_owned(),
                cand("/usr/lib/kvcd/modules.d/b.toml", false),
            ),
        ]);
        let run = BTreeMap::from([(
            "a.toml".to_owned(),
            cand("/run/kvcd/modules.d/a.toml", false),
        )]);
        let etc = BTreeMap::from([
            (
                "a.toml".to_owned(),
                cand("/etc/kvcd/modules.d/a.toml", false),
            ),
            (
                "b.toml".to_owned(),
                cand("/etc/kvcd/modules.d/b.toml", true),
            ),
        ]);
        let m = merge(vec![usr, run, etc]);
        assert_eq!(
            m["a.toml"].winner.path,
            Path::new("/etc/kvcd/modules.d/a.toml")
        );
        assert_eq!(
            m["a.toml"].shadowed,
            vec![
                PathBuf::from("/usr/lib/kvcd/modules.d/a.toml"),
                PathBuf::from("/run/kvcd/modules.d/a.toml")
            ]
        );
        assert!(m["b.toml"].winner.masked);
    }

    #[test]
    fn listing_skips_hidden_and_other_files_and_sees_masks() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("x.toml"), "").unwrap();
        fs::write(dir.path().join(".y.toml"), "").unwrap();
        fs::write(dir.path().join("z.conf"), "").unwrap();
        std::os::unix::fs::symlink("/dev/null", dir.path().join("m.toml")).unwrap();
        let l = list_toml(dir.path()).unwrap();
        assert_eq!(l.keys().collect::<Vec<_>>(), ["m.toml", "x.toml"]);
        assert!(l["m.toml"].masked);
        assert!(!l["x.toml"].masked);
        assert!(list_toml(&dir.path().join("absent")).unwrap().is_empty());
    }
}
