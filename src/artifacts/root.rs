//! A module tree per (module config, kernel): our `.ko` files under `kvcd/`,
//! the kernel's own modules through a `kernel` symlink to the host tree, and a
//! `modules.dep` written by `depmod -b`. Our files win over in-tree ones of
//! the same name (`search kvcd built-in`), so an out-of-tree `ice` resolves
//! to our file. The tree is keyed by content and built once: a later load of
//! the same files reuses it without running depmod.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, Result, bail};
use sha2::{Digest as _, Sha256};

use crate::kernel::KernelRelease;
use crate::kmod::ModName;
use crate::util::hex;

/// Subdirectory of the tree holding our modules.
pub const OUR_SUBDIR: &str = "kvcd";
const COMPLETE: &str = ".kvcd-complete";
/// Files copied from the host tree so depmod knows the built-in modules.
const HOST_INDEX_FILES: &[&str] = &[
    "modules.order",
    "modules.builtin",
    "modules.builtin.modinfo",
];

/// Where module trees are built and what they link to.
#[derive(Debug, Clone)]
pub struct RootLayout {
    /// kvcd's state directory; trees go under `roots/`.
    pub state_dir: PathBuf,
    /// Directory holding the host's `KERNEL/` module trees.
    pub kernel_modules_dir: PathBuf,
    /// The depmod program.
    pub depmod: PathBuf,
}

/// A ready module tree.
#[derive(Debug, Clone)]
pub struct ModuleRoot {
    /// The `lib/modules/KERNEL` directory inside the root (what libkmod opens).
    pub tree: PathBuf,
    /// Content key (hex).
    pub key: String,
    /// True when an existing tree was reused (no copy, no depmod).
    pub reused: bool,
    /// depmod's warnings, if it printed any.
    pub depmod_warnings: Vec<String>,
}

impl RootLayout {
    /// The host's module tree for `kernel`.
    pub fn host_tree(&self, kernel: &KernelRelease) -> PathBuf {
        self.kernel_modules_dir.join(kernel.as_str())
    }

    fn roots_dir(&self, config: &str, kernel: &KernelRelease) -> PathBuf {
        self.state_dir
            .join("roots")
            .join(config)
            .join(kernel.as_str())
    }

    /// Builds (or reuses) the tree for `config` on `kernel` holding `files`.
    pub fn prepare(
        &self,
        config: &str,
        config_digest: &str,
        kernel: &KernelRelease,
        files: &BTreeMap<ModName, PathBuf>,
    ) -> Result<ModuleRoot> {
        let host = self.host_tree(kernel);
        let host_kernel = host.join("kernel");
        let has_host = host_kernel.is_dir();

        let mut h = Sha256::new();
        h.update(b"kvcd-root-v1\0");
        h.update(config_digest.as_bytes());
        h.update(kernel.as_str().as_bytes());
        // The tree links to the host's kernel modules by absolute path: a
        // tree made against another host directory is not this one.
        h.update(host_kernel.as_os_str().as_encoded_bytes());
        h.update([u8::from(has_host)]);
        for (name, path) in files {
            let data = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            h.update(name.as_str().as_bytes());
            h.update(b"\0");
            h.update(Sha256::digest(&data));
        }
        let key = hex(&h.finalize())[..16].to_owned();

        let parent = self.roots_dir(config, kernel);
        let final_base = parent.join(&key);
        let tree_of = |base: &Path| base.join("lib/modules").join(kernel.as_str());
        if final_base.join(COMPLETE).exists() {
            return Ok(ModuleRoot {
                tree: tree_of(&final_base),
                key,
                reused: true,
                depmod_warnings: Vec::new(),
            });
        }

        let tmp = parent.join(format!(".tmp-{key}-{}", std::process::id()));
        if tmp.exists() {
            fs::remove_dir_all(&tmp).with_context(|| format!("removing {}", tmp.display()))?;
        }
        let tree = tree_of(&tmp);
        let ours = tree.join(OUR_SUBDIR);
        fs::create_dir_all(&ours).with_context(|| format!("creating {}", ours.display()))?;
        for path in files.values() {
            let name = path
                .file_name()
                .with_context(|| format!("{} has no file name", path.display()))?;
            fs::copy(path, ours.join(name))
                .with_context(|| format!("copying {} into {}", path.display(), ours.display()))?;
        }
        if has_host {
            std::os::unix::fs::symlink(&host_kernel, tree.join("kernel"))
                .with_context(|| format!("linking {}", host_kernel.display()))?;
        }
        for f in HOST_INDEX_FILES {
            let src = host.join(f);
            if src.is_file() {
                fs::copy(&src, tree.join(f))
                    .with_context(|| format!("copying {}", src.display()))?;
            }
        }
        let conf_dir = tmp.join("depmod.d");
        fs::create_dir_all(&conf_dir)?;
        fs::write(
            conf_dir.join("kvcd.conf"),
            format!(
                "# kvcd: our modules win over in-tree modules of the same name\nsearch {OUR_SUBDIR} built-in\n"
            ),
        )?;

        let out = Command::new(&self.depmod)
            .arg("-b")
            .arg(&tmp)
            .arg("-C")
            .arg(&conf_dir)
            .arg(kernel.as_str())
            .output()
            .with_context(|| format!("running {}", self.depmod.display()))?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        let warnings: Vec<String> = stderr
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(str::to_owned)
            .collect();
        if !out.status.success() {
            let _ = fs::remove_dir_all(&tmp);
            bail!(
                "{} -b {} {} failed ({}): {}",
                self.depmod.display(),
                tmp.display(),
                kernel,
                out.status,
                warnings.join("; ")
            );
        }
        fs::write(tmp.join(COMPLETE), b"")?;

        if final_base.exists() {
            fs::remove_dir_all(&final_base)
                .with_context(|| format!("removing stale {}", final_base.display()))?;
        }
        fs::rename(&tmp, &final_base)
            .with_context(|| format!("renaming {} to {}", tmp.display(), final_base.display()))?;
        // Older trees of this config and kernel are no longer needed: what is
        // loaded lives in the kernel, and restores use the host tree.
        for entry in fs::read_dir(&parent)?.flatten() {
            if entry.file_name() != key.as_str() {
                let _ = fs::remove_dir_all(entry.path());
            }
        }
        Ok(ModuleRoot {
            tree: tree_of(&final_base),
            key,
            reused: false,
            depmod_warnings: warnings,
        })
    }
}
