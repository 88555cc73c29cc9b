//! Keeping the state directory small: artifacts (module sets and image
//! extractions) for the newest N kernels per module config, never those of
//! the running kernel or the kernel being applied, the images kvcd built
//! for kernels it lets go, and stored module files no set names any more.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::Result;
use serde::Serialize;

use super::podman::ContainerTool;
use super::store;
use crate::kernel::compare_releases;
use crate::state::{Layout, index};

/// Default number of kernels whose artifacts are kept per module config.
pub const DEFAULT_KEEP_KERNELS: usize = 3;

/// What pruning removed (or would remove) for one module config.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Pruned {
    /// Module config name.
    pub config: String,
    /// Kernels whose artifacts went.
    pub kernels: Vec<String>,
    /// Module sets and extraction directories removed.
    pub paths: Vec<PathBuf>,
    /// Stored module files removed because no set names them any more.
    pub files: Vec<PathBuf>,
    /// kvcd-built images removed.
    pub images: Vec<String>,
}

fn subdirs(dir: &Path) -> Vec<String> {
    fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .filter(|e| e.path().is_dir())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| !n.starts_with('.'))
                .collect()
        })
        .unwrap_or_default()
}

/// The reference of a kvcd-built image recorded for an extraction, if any.
fn built_reference(image_dir: &Path) -> Option<String> {
    index::read(image_dir)
        .ok()
        .flatten()
        .filter(|i| i.built)
        .map(|i| i.reference)
}

/// Prunes `config`'s artifacts down to the newest `keep` kernels plus `protect`.
/// `keep = 0` removes every unprotected kernel (a config that no longer exists).
pub fn prune_config(
    state_dir: &Path,
    podman: Option<&dyn ContainerTool>,
    config: &str,
    keep: usize,
    protect: &[&str],
    dry_run: bool,
) -> Result<Pruned> {
    let images = Layout::images_of(state_dir, config);
    let mut kernels: Vec<String> = Layout::set_kernels(state_dir, config)
        .into_iter()
        .chain(subdirs(&images))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    kernels.sort_by(|a, b| compare_releases(b, a));
    let mut out = Pruned {
        config: config.to_owned(),
        ..Pruned::default()
    };
    let mut kept = 0;
    for k in kernels {
        if protect.contains(&k.as_str()) {
            continue;
        }
        if kept < keep {
            kept += 1;
            continue;
        }
        if let Some(reference) = built_reference(&images.join(&k)) {
            if let Some(p) = podman {
                if dry_run || p.remove_image(&reference).is_ok() {
                    out.images.push(reference);
                }
            }
        }
        let set = Layout::set_file(state_dir, config, &k);
        if set.exists() {
            if !dry_run {
                fs::remove_file(&set)?;
                // The kernel's directory goes with its last set.
                let _ = fs::remove_dir(Layout::sets_for(state_dir, &k));
            }
            out.paths.push(set);
        }
        let extraction = images.join(&k);
        if extraction.exists() {
            if !dry_run {
                fs::remove_dir_all(&extraction)?;
            }
            out.paths.push(extraction);
        }
        out.kernels.push(k);
    }
    if !dry_run {
        let _ = fs::remove_dir(&images);
        if !out.kernels.is_empty() {
            out.files = store::collect_garbage(state_dir)?;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn releases_compare_as_versions() {
        let mut v = vec![
            "6.1.0-9-amd64",
            "6.1.0-27-amd64",
            "5.14.0-284.30.1.el9_2.x86_64",
            "6.10.0-1-amd64",
            "6.1.0-27-cloud-amd64",
        ];
        v.sort_by(|a, b| compare_releases(a, b));
        assert_eq!(
            v,
            [
                "5.14.0-284.30.1.el9_2.x86_64",
                "6.1.0-9-amd64",
                "6.1.0-27-amd64",
                "6.1.0-27-cloud-amd64",
                "6.10.0-1-amd64"
            ]
        );
    }

    #[test]
    fn keeps_newest_and_protected_kernels() {
        let t = tempfile::tempdir().unwrap();
        for k in [
            "6.1.0-1-amd64",
            "6.1.0-2-amd64",
            "6.1.0-10-amd64",
            "6.1.0-3-amd64",
        ] {
            fs::create_dir_all(t.path().join("sets").join(k)).unwrap();
            fs::write(Layout::set_file(t.path(), "x", k), b"{\"files\": {}}").unwrap();
        }
        fs::create_dir_all(t.path().join("images/x/6.1.0-1-amd64/abc")).unwrap();
        let p = prune_config(t.path(), None, "x", 2, &["6.1.0-1-amd64"], true).unwrap();
        assert_eq!(p.kernels, ["6.1.0-2-amd64"]);
        assert!(
            Layout::set_file(t.path(), "x", "6.1.0-2-amd64").exists(),
            "dry run removes nothing"
        );
        let p = prune_config(t.path(), None, "x", 2, &["6.1.0-1-amd64"], false).unwrap();
        assert_eq!(p.kernels, ["6.1.0-2-amd64"]);
        let left = Layout::set_kernels(t.path(), "x")
            .into_iter()
            .collect::<BTreeSet<_>>();
        assert_eq!(
            left,
            ["6.1.0-1-amd64", "6.1.0-10-amd64", "6.1.0-3-amd64"]
                .map(String::from)
                .into()
        );
        let p = prune_config(t.path(), None, "x", 0, &[], false).unwrap();
        assert_eq!(p.kernels.len(), 3);
        assert!(
            Layout::set_kernels(t.path(), "x").is_empty() && !t.path().join("images/x").exists()
        );
        assert!(Layout::configs_with_artifacts(t.path()).is_empty());
    }
}
