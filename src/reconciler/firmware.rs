//! Firmware from driver images, placed in a host directory kvcd owns
//! (`/lib/firmware` is read-only on image-based hosts) and removed again on
//! unload. The kernel finds it through `firmware_class.path`.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};

use crate::artifacts::store::{copy_file_hashed, hash_file};

/// Copies every file under `src` to the same relative path under `host`.
/// A file that exists with other content and is not in `owned` (placed by
/// kvcd before) is never overwritten. Returns the files now owned, in order.
pub(super) fn place(src: &Path, host: &Path, owned: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    collect(src, src, &mut files)?;
    let mut placed = Vec::new();
    for rel in files {
        let from = src.join(&rel);
        let to = host.join(&rel);
        // Compared and copied as streams: firmware can be large.
        let want = hash_file(&from)?;
        match fs::symlink_metadata(&to) {
            Ok(_) if hash_file(&to).is_ok_and(|have| have == want) => {
                if owned.contains(&to) {
                    placed.push(to);
                }
                continue;
            }
            Ok(_) if !owned.contains(&to) => bail!(
                "firmware file {} exists with other content and was not placed by kvcd; not overwriting it",
                to.display()
            ),
            _ => {}
        }
        let dir = to.parent().unwrap_or(host);
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let tmp = dir.join(format!(
            ".{}.tmp-{}",
            to.file_name().unwrap_or_default().to_string_lossy(),
            std::process::id()
        ));
        let _ = fs::remove_file(&tmp);
        copy_file_hashed(&from, &tmp)
            .and_then(|_| {
                fs::rename(&tmp, &to).with_context(|| format!("renaming {}", tmp.display()))
            })
            .map_err(|e| {
                let _ = fs::remove_file(&tmp);
                e.context(format!("placing firmware {}", to.display()))
            })?;
        placed.push(to);
    }
    Ok(placed)
}

/// The files under `host` that placing `src` may create: those not there yet
/// and those kvcd placed before (`owned`). Written as the intent, so a kill
/// in the middle of placing leaves no file kvcd would not know is its own.
pub(super) fn may_create(src: &Path, host: &Path, owned: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    collect(src, src, &mut files)?;
    Ok(files
        .into_iter()
        .map(|rel| host.join(rel))
        .filter(|to| owned.contains(to) || fs::symlink_metadata(to).is_err())
        .collect())
}

fn collect(base: &Path, dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let mut entries: Vec<_> = fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .collect::<Result<_, _>>()?;
    entries.sort_by_key(fs::DirEntry::file_name);
    for e in entries {
        let p = e.path();
        if e.file_type()?.is_dir() {
            collect(base, &p, out)?;
        } else if e.file_type()?.is_file() {
            out.push(p.strip_prefix(base).unwrap_or(&p).to_owned());
        }
    }
    Ok(())
}

/// Removes the temporary files a killed placement left anywhere under `host`; returns them.
pub(super) fn sweep(host: &Path) -> Vec<PathBuf> {
    let mut removed = crate::state::sweep_stale_tmp(host);
    if let Ok(entries) = fs::read_dir(host) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                removed.extend(sweep(&e.path()));
            }
        }
    }
    removed
}

/// Removes `files` and then the directories under `host` they leave empty; returns how many files went.
pub(super) fn remove(files: &[PathBuf], host: &Path) -> usize {
    let mut n = 0;
    for f in files {
        if fs::remove_file(f).is_ok() {
            n += 1;
        }
        let mut dir = f.parent();
        while let Some(d) = dir.filter(|d| d.starts_with(host) && *d != host) {
            if fs::remove_dir(d).is_err() {
                break;
            }
            dir = d.parent();
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_keeps_foreign_files_and_removes_what_it_placed() {
        let t = tempfile::tempdir().unwrap();
        let (src, host) = (t.path().join("src"), t.path().join("host"));
        fs::create_dir_all(src.join("acme")).unwrap();
        fs::write(src.join("acme/a.bin"), b"A").unwrap();
        fs::write(src.join("top.bin"), b"T").unwrap();
        let placed = place(&src, &host, &[]).unwrap();
        assert_eq!(placed, vec![host.join("acme/a.bin"), host.join("top.bin")]);
        assert_eq!(fs::read(host.join("acme/a.bin")).unwrap(), b"A");

        // Placing again keeps ownership; a changed file of ours is rewritten.
        fs::write(src.join("top.bin"), b"T2").unwrap();
        assert_eq!(place(&src, &host, &placed).unwrap(), placed);
        assert_eq!(fs::read(host.join("top.bin")).unwrap(), b"T2");

        // Someone else's file with other content is not overwritten.
        fs::write(src.join("other.bin"), b"ours").unwrap();
        fs::write(host.join("other.bin"), b"theirs").unwrap();
        let e = place(&src, &host, &placed).unwrap_err().to_string();
        assert!(
            e.contains("other.bin exists with other content and was not placed by kvcd"),
            "{e}"
        );
        assert_eq!(fs::read(host.join("other.bin")).unwrap(), b"theirs");

        // Only what is not there yet (or ours) may be created.
        assert_eq!(
            may_create(&src, &host, &placed[..1]).unwrap(),
            vec![host.join("acme/a.bin")]
        );

        assert_eq!(remove(&placed, &host), 2);
        assert!(!host.join("acme").exists());
        assert!(host.join("other.bin").exists());
    }
}
