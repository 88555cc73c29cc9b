//! The `[directory]` source: a precompiled driver package on the host.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};

use crate::kmod::ModName;

/// Finds every module file (`.ko`, `.ko.xz`, `.ko.zst`, `.ko.gz`) under `dir`, in subdirectories too.
pub fn scan(dir: &Path) -> Result<BTreeMap<ModName, PathBuf>> {
    let meta = fs::metadata(dir).with_context(|| {
        format!(
            "module directory {} does not exist or cannot be read",
            dir.display()
        )
    })?;
    if !meta.is_dir() {
        bail!("module directory {} is not a directory", dir.display());
    }
    let mut out = BTreeMap::new();
    walk(dir, &mut out, 0)?;
    Ok(out)
}

fn walk(dir: &Path, out: &mut BTreeMap<ModName, PathBuf>, depth: usize) -> Result<()> {
    if depth > 16 {
        bail!("{}: directories nested too deep", dir.display());
    }
    let mut entries: Vec<_> = fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("reading {}", dir.display()))?;
    entries.sort_by_key(fs::DirEntry::file_name);
    for entry in entries {
        let path = entry.path();
        let ft = fs::metadata(&path)
            .with_context(|| format!("reading {}", path.display()))?
            .file_type();
        if ft.is_dir() {
            walk(&path, out, depth + 1)?;
            continue;
        }
        let Some(name) = ModName::from_file_name(&entry.file_name().to_string_lossy()) else {
            continue;
        };
        if !ft.is_file() {
            continue;
        }
        if let Some(prev) = out.get(&name) {
            bail!(
                "two files for module {name}: {} and {} ('-' and '_' are the same name)",
                prev.display(),
                path.display()
            );
        }
        out.insert(name, path);
    }
    Ok(())
}

/// Fails unless every module in `wanted` has a file.
pub fn require(files: &BTreeMap<ModName, PathBuf>, wanted: &[ModName], dir: &Path) -> Result<()> {
    let missing: Vec<_> = wanted
        .iter()
        .filter(|m| !files.contains_key(*m))
        .map(ToString::to_string)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let found: Vec<_> = files.keys().map(ToString::to_string).collect();
    bail!(
        "no .ko file for module{} {} in {} (found: {})",
        if missing.len() > 1 { "s" } else { "" },
        missing.join(", "),
        dir.display(),
        if found.is_empty() {
            "no module files".to_owned()
        } else {
            found.join(", ")
        }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_modules_flat_and_nested() {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir_all(d.path().join("a/b")).unwrap();
        fs::write(d.path().join("simple-kmod.ko"), b"x").unwrap();
        fs::write(d.path().join("a/b/other.ko.xz"), b"x").unwrap();
        fs::write(d.path().join("a/README"), b"x").unwrap();
        let f = scan(d.path()).unwrap();
        let names: Vec<_> = f.keys().map(ModName::as_str).collect();
        assert_eq!(names, ["other", "simple_kmod"]);
        assert_eq!(
            f[&ModName::parse("other").unwrap()],
            d.path().join("a/b/other.ko.xz")
        );
        require(&f, &[ModName::parse("simple_kmod").unwrap()], d.path()).unwrap();
        let err = require(
            &f,
            &[
                ModName::parse("nope").unwrap(),
                ModName::parse("other").unwrap(),
            ],
            d.path(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.starts_with("no .ko file for module nope in "), "{err}");
        assert!(err.ends_with("(found: other, simple_kmod)"), "{err}");
    }

    #[test]
    fn duplicate_and_missing_directory() {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir_all(d.path().join("x")).unwrap();
        fs::write(d.path().join("a-b.ko"), b"x").unwrap();
        fs::write(d.path().join("x/a_b.ko"), b"x").unwrap();
        let err = scan(d.path()).unwrap_err().to_string();
        assert!(err.contains("two files for module a_b"), "{err}");
        let err = scan(&d.path().join("nope")).unwrap_err().to_string();
        assert!(err.contains("does not exist"), "{err}");
    }
}
