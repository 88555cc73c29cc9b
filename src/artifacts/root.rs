//! A module tree per (module config, kernel): our `.ko` files under `kvcd/`,
//! the kernel's own modules through a `kernel` symlink to the host tree, and a
//! `modules.dep` written by `depmod -b`. Our files win over in-tree ones of
//! the same name (`search kvcd built-in`), so an out-of-tree `ice` resolves
//! to our file. The tree is keyed by content and built once: a later load of
//! the same files reuses it without running depmod.
//!
//! Also the file helpers every artifact path shares: module files are hashed
//! and copied as streams (never read whole), and copies keep holes.

use std::collections::BTreeMap;
use std::fs;
use std::io::{ErrorKind, Read as _};
use std::os::unix::fs::{FileExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail};
use nix::errno::Errno;
use nix::unistd::{Whence, lseek};
use sha2::{Digest as _, Sha256};
use tracing::debug;

use crate::hooks::{RunError, describe, run_lines};
use crate::kernel::KernelRelease;
use crate::kmod::ModName;
use crate::state::{COMPLETE, Layout, is_stale_tmp, sweep_stale_tmp};
use crate::util::hex;

/// Default for `depmod_timeout_seconds`.
pub const DEFAULT_DEPMOD_TIMEOUT: u64 = 120;
/// Subdirectory of the tree holding our modules.
pub const OUR_SUBDIR: &str = "kvcd";
/// Prefix of directories being built; `.tmp-…-PID`.
const TMP_PREFIX: &str = ".tmp-";
/// Files copied from the host tree so depmod knows the built-in modules.
const HOST_INDEX_FILES: &[&str] = &[
    "modules.order",
    "modules.builtin",
    "modules.builtin.modinfo",
];
/// Read and write unit of the streaming copy and hash.
const CHUNK: usize = 128 * 1024;

/// Where module trees are built and what they link to.
#[derive(Debug, Clone)]
pub struct RootLayout {
    /// kvcd's state directory; trees go under `roots/`.
    pub state_dir: PathBuf,
    /// Directory holding the host's `KERNEL/` module trees.
    pub kernel_modules_dir: PathBuf,
    /// The depmod program.
    pub depmod: PathBuf,
    /// Longest a depmod run may take; default 120 s (`depmod_timeout_seconds`).
    pub depmod_timeout: Duration,
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
    /// depmod's warnings, if it printed any (its expected noise about missing index files left out).
    pub depmod_warnings: Vec<String>,
}

/// Size and SHA-256 of a file's content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileDigest {
    /// Size in bytes.
    pub size: u64,
    /// Lowercase hex SHA-256.
    pub sha256: String,
}

/// Opens `path` for reading without following a symlink and without blocking
/// on a FIFO; fails unless it is a regular file.
fn open_regular(path: &Path) -> Result<(fs::File, u64)> {
    let f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    let meta = f
        .metadata()
        .with_context(|| format!("reading {}", path.display()))?;
    if !meta.is_file() {
        bail!("{} is not a regular file", path.display());
    }
    Ok((f, meta.len()))
}

/// Size and SHA-256 of the regular file at `path`, read in chunks.
pub fn hash_file(path: &Path) -> Result<FileDigest> {
    let (mut f, _) = open_regular(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut size = 0u64;
    loop {
        let n = match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        h.update(&buf[..n]);
        size += n as u64;
    }
    Ok(FileDigest {
        size,
        sha256: hex(&h.finalize()),
    })
}

/// Feeds `n` zero bytes to `h`.
fn hash_zeros(h: &mut Sha256, mut n: u64) {
    static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];
    while n > 0 {
        let k = n.min(ZEROS.len() as u64);
        // k <= 64 KiB, so it fits in usize.
        h.update(&ZEROS[..usize::try_from(k).unwrap_or(ZEROS.len())]);
        n -= k;
    }
}

/// Where the next data at or after `pos` starts (`len` when only a hole is left).
fn next_data(f: &fs::File, pos: u64, len: u64) -> u64 {
    let Ok(off) = i64::try_from(pos) else {
        return pos;
    };
    match lseek(f, off, Whence::SeekData) {
        Ok(o) => u64::try_from(o).unwrap_or(pos).min(len),
        Err(Errno::ENXIO) => len,
        // No hole support: everything is data.
        Err(_) => pos,
    }
}

/// Where the hole after data at `pos` starts (`len` when none).
fn next_hole(f: &fs::File, pos: u64, len: u64) -> u64 {
    let Ok(off) = i64::try_from(pos) else {
        return len;
    };
    lseek(f, off, Whence::SeekHole)
        .ok()
        .and_then(|o| u64::try_from(o).ok())
        .map_or(len, |o| o.min(len))
        .max(pos)
}

/// Copies the regular file `from` to the new file `to` (mode 0644) as a
/// stream, hashing it on the way. Holes stay holes: the source's holes are
/// skipped (SEEK_DATA/SEEK_HOLE) and all-zero chunks are not written, so a
/// sparse file stays sparse. Symlinks, FIFOs and devices are refused, never
/// opened for reading data.
pub fn copy_file_hashed(from: &Path, to: &Path) -> Result<FileDigest> {
    copy_sparse(from, to, true)
}

/// [`copy_file_hashed`]; the digest is computed only when `hash` (else empty).
fn copy_sparse(from: &Path, to: &Path, hash: bool) -> Result<FileDigest> {
    let (src, len) = open_regular(from)?;
    let out = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(to)
        .with_context(|| format!("creating {}", to.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut pos = 0u64;
    while pos < len {
        let data = next_data(&src, pos, len);
        if hash {
            hash_zeros(&mut h, data - pos);
        }
        pos = data;
        if pos >= len {
            break;
        }
        let mut end = next_hole(&src, pos, len);
        if end <= pos {
            end = len;
        }
        while pos < end {
            let want = usize::try_from((end - pos).min(CHUNK as u64)).unwrap_or(CHUNK);
            let n = match src.read_at(&mut buf[..want], pos) {
                Ok(0) => bail!("{} shrank while it was copied", from.display()),
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e).with_context(|| format!("reading {}", from.display())),
            };
            let chunk = &buf[..n];
            if hash {
                h.update(chunk);
            }
            if chunk.iter().any(|&b| b != 0) {
                out.write_all_at(chunk, pos)
                    .with_context(|| format!("writing {}", to.display()))?;
            }
            pos += n as u64;
        }
    }
    // The length, with a trailing hole where the source ends in one.
    out.set_len(len)
        .with_context(|| format!("writing {}", to.display()))?;
    Ok(FileDigest {
        size: len,
        sha256: if hash {
            hex(&h.finalize())
        } else {
            String::new()
        },
    })
}

/// depmod's expected noise: index files a tree of extra modules does not have.
fn is_depmod_noise(line: &str) -> bool {
    line.contains("could not open modules.order") || line.contains("could not open modules.builtin")
}

impl RootLayout {
    /// The host's module tree for `kernel`.
    pub fn host_tree(&self, kernel: &KernelRelease) -> PathBuf {
        self.kernel_modules_dir.join(kernel.as_str())
    }

    fn roots_dir(&self, config: &str, kernel: &KernelRelease) -> PathBuf {
        Layout::roots_of(&self.state_dir, config).join(kernel.as_str())
    }

    /// Builds (or reuses) the tree for `config` on `kernel` holding `files`.
    /// Fails at once when the host has no module tree for `kernel`; a failed
    /// build leaves no temporary directory behind.
    pub fn prepare(
        &self,
        config: &str,
        config_digest: &str,
        kernel: &KernelRelease,
        files: &BTreeMap<ModName, PathBuf>,
    ) -> Result<ModuleRoot> {
        let host = self.host_tree(kernel);
        let host_kernel = host.join("kernel");
        if !host_kernel.is_dir() {
            let missing = if host.is_dir() { &host_kernel } else { &host };
            bail!(
                "no module tree for kernel {kernel} at {}; kvcd needs the kernel's own modules to resolve in-tree dependencies",
                missing.display()
            );
        }

        let mut h = Sha256::new();
        h.update(b"kvcd-root-v2\0");
        h.update(config_digest.as_bytes());
        h.update(kernel.as_str().as_bytes());
        // The tree links to the host's kernel modules by absolute path: a
        // tree made against another host directory is not this one.
        h.update(host_kernel.as_os_str().as_encoded_bytes());
        for (name, path) in files {
            let d = hash_file(path)?;
            h.update(name.as_str().as_bytes());
            h.update(b"\0");
            h.update(d.sha256.as_bytes());
        }
        let key = hex(&h.finalize())[..16].to_owned();

        let parent = self.roots_dir(config, kernel);
        sweep_stale_tmp(&parent);
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

        let tmp = parent.join(format!("{TMP_PREFIX}{key}-{}", std::process::id()));
        if tmp.exists() {
            fs::remove_dir_all(&tmp).with_context(|| format!("removing {}", tmp.display()))?;
        }
        let built = self
            .build(&tmp, &tree_of(&tmp), kernel, &host, files)
            .and_then(|warnings| {
                if final_base.exists() {
                    fs::remove_dir_all(&final_base)
                        .with_context(|| format!("removing stale {}", final_base.display()))?;
                }
                crate::failpoint::hit("tree.built");
                fs::rename(&tmp, &final_base).with_context(|| {
                    format!("renaming {} to {}", tmp.display(), final_base.display())
                })?;
                crate::failpoint::hit("tree.renamed");
                Ok(warnings)
            });
        let warnings = match built {
            Ok(w) => w,
            Err(e) => {
                let _ = fs::remove_dir_all(&tmp);
                return Err(e);
            }
        };
        // Older trees of this config and kernel are no longer needed: what is
        // loaded lives in the kernel, and restores use the host tree. Another
        // live process's tree in progress stays.
        for entry in fs::read_dir(&parent)?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name != key && (!name.starts_with(TMP_PREFIX) || is_stale_tmp(&name)) {
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

    /// Fills `tmp` (`tree` inside it) and runs depmod; returns depmod's warnings.
    fn build(
        &self,
        tmp: &Path,
        tree: &Path,
        kernel: &KernelRelease,
        host: &Path,
        files: &BTreeMap<ModName, PathBuf>,
    ) -> Result<Vec<String>> {
        let ours = tree.join(OUR_SUBDIR);
        fs::create_dir_all(&ours).with_context(|| format!("creating {}", ours.display()))?;
        for path in files.values() {
            let name = path
                .file_name()
                .with_context(|| format!("{} has no file name", path.display()))?;
            // Hashed already, for the key.
            copy_sparse(path, &ours.join(name), false)
                .with_context(|| format!("copying {} into {}", path.display(), ours.display()))?;
        }
        let host_kernel = host.join("kernel");
        std::os::unix::fs::symlink(&host_kernel, tree.join("kernel"))
            .with_context(|| format!("linking {}", host_kernel.display()))?;
        for f in HOST_INDEX_FILES {
            let src = host.join(f);
            if src.is_file() {
                fs::copy(&src, tree.join(f))
                    .with_context(|| format!("copying {}", src.display()))?;
            }
        }
        let conf_dir = tmp.join("depmod.d");
        fs::create_dir_all(&conf_dir)
            .with_context(|| format!("creating {}", conf_dir.display()))?;
        fs::write(
            conf_dir.join("kvcd.conf"),
            format!(
                "# kvcd: our modules win over in-tree modules of the same name\nsearch {OUR_SUBDIR} built-in\n"
            ),
        )
        .with_context(|| format!("writing {}", conf_dir.display()))?;

        crate::failpoint::hit("depmod.before");
        let mut cmd = Command::new(&self.depmod);
        cmd.arg("-b")
            .arg(tmp)
            .arg("-C")
            .arg(&conf_dir)
            .arg(kernel.as_str());
        let what = format!("{} -b {} {kernel}", self.depmod.display(), tmp.display());
        let mut warnings = Vec::new();
        let status = run_lines(cmd, self.depmod_timeout, &mut |_, line| {
            if line.trim().is_empty() {
            } else if is_depmod_noise(&line) {
                debug!("{line}");
            } else {
                warnings.push(line);
            }
        });
        match status {
            Ok(s) if s.success() => {}
            Ok(s) => bail!("{what} failed ({}): {}", describe(s), warnings.join("; ")),
            Err(RunError::Spawn(e)) => {
                return Err(anyhow!(e).context(format!("running {}", self.depmod.display())));
            }
            Err(RunError::TimedOut) => bail!(
                "{what} timed out after {}s; its process group was killed",
                self.depmod_timeout.as_secs()
            ),
        }
        fs::write(tmp.join(COMPLETE), b"").with_context(|| format!("writing {}", tmp.display()))?;
        Ok(warnings)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek as _, SeekFrom, Write as _};
    use std::os::unix::fs::MetadataExt as _;

    #[test]
    fn a_sparse_file_is_copied_streaming_and_stays_sparse() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("big.ko");
        let mut f = fs::File::create(&src).unwrap();
        f.write_all(b"\x7fELF head").unwrap();
        f.seek(SeekFrom::Start(40 * 1024 * 1024)).unwrap();
        f.write_all(b"middle").unwrap();
        f.set_len(64 * 1024 * 1024).unwrap();
        drop(f);
        let dst = d.path().join("copy.ko");
        let got = copy_file_hashed(&src, &dst).unwrap();
        assert_eq!(got.size, 64 * 1024 * 1024);
        assert_eq!(got, hash_file(&src).unwrap());
        assert_eq!(got, hash_file(&dst).unwrap());
        let m = fs::metadata(&dst).unwrap();
        assert_eq!(m.len(), 64 * 1024 * 1024);
        // A handful of allocated blocks, not 64 MiB of zeros.
        assert!(m.blocks() * 512 <= 1024 * 1024, "{} blocks", m.blocks());
        assert_eq!(m.mode() & 0o777, 0o644);
    }

    #[test]
    fn small_files_hash_like_the_whole_content_and_fifos_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a.ko");
        fs::write(&p, b"abc\0\0\0def").unwrap();
        let got = copy_file_hashed(&p, &d.path().join("b.ko")).unwrap();
        assert_eq!(got.sha256, crate::util::sha256_hex(b"abc\0\0\0def"));
        assert_eq!(fs::read(d.path().join("b.ko")).unwrap(), b"abc\0\0\0def");
        let empty = d.path().join("e.ko");
        fs::write(&empty, b"").unwrap();
        assert_eq!(
            copy_file_hashed(&empty, &d.path().join("e2.ko")).unwrap(),
            FileDigest {
                size: 0,
                sha256: crate::util::sha256_hex(b"")
            }
        );
        let fifo = d.path().join("fifo.ko");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
        let e = copy_file_hashed(&fifo, &d.path().join("f2.ko")).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("{} is not a regular file", fifo.display())
        );
        std::os::unix::fs::symlink(&p, d.path().join("l.ko")).unwrap();
        assert!(hash_file(&d.path().join("l.ko")).is_err());
    }

    /// A layout whose depmod is the shell script `script`, and a host tree for kernel `K`.
    fn fake_layout(d: &Path, script: &str, timeout: u64) -> (RootLayout, KernelRelease) {
        let depmod = d.join("depmod");
        fs::write(&depmod, format!("#!/bin/sh\n{script}\n")).unwrap();
        fs::set_permissions(&depmod, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let k = KernelRelease::parse("6.1.0-1-amd64").unwrap();
        fs::create_dir_all(d.join("host").join(k.as_str()).join("kernel")).unwrap();
        let layout = RootLayout {
            state_dir: d.join("state"),
            kernel_modules_dir: d.join("host"),
            depmod,
            depmod_timeout: Duration::from_secs(timeout),
        };
        (layout, k)
    }

    fn files(d: &Path) -> BTreeMap<ModName, PathBuf> {
        let ko = d.join("a.ko");
        fs::write(&ko, b"module").unwrap();
        BTreeMap::from([(ModName::parse("a").unwrap(), ko)])
    }

    fn left_in(layout: &RootLayout, k: &KernelRelease) -> Vec<String> {
        fs::read_dir(layout.roots_dir("c", k))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    #[test]
    fn a_hanging_depmod_is_killed_and_its_tree_removed() {
        let d = tempfile::tempdir().unwrap();
        let (layout, k) = fake_layout(d.path(), "echo working >&2; exec sleep 300", 1);
        let e = layout
            .prepare("c", "digest", &k, &files(d.path()))
            .unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.ends_with(" 6.1.0-1-amd64 timed out after 1s; its process group was killed"),
            "{msg}"
        );
        assert!(
            left_in(&layout, &k).is_empty(),
            "{:?}",
            left_in(&layout, &k)
        );
    }

    #[test]
    fn depmod_noise_is_left_out_and_real_warnings_kept() {
        let d = tempfile::tempdir().unwrap();
        let (layout, k) = fake_layout(
            d.path(),
            "echo 'depmod: WARNING: could not open modules.order at /x: No such file or directory' >&2\n\
             echo 'depmod: WARNING: could not open modules.builtin at /x: No such file or directory' >&2\n\
             echo 'depmod: WARNING: /x/kvcd/a.ko needs unknown symbol nope' >&2",
            10,
        );
        let root = layout.prepare("c", "digest", &k, &files(d.path())).unwrap();
        assert_eq!(
            root.depmod_warnings,
            ["depmod: WARNING: /x/kvcd/a.ko needs unknown symbol nope"]
        );
        assert_eq!(left_in(&layout, &k), std::slice::from_ref(&root.key));
        // A failing depmod's real errors are reported, its noise is not.
        let (layout, k) = fake_layout(
            d.path(),
            "echo 'depmod: WARNING: could not open modules.order at /x: No such file' >&2\n\
             echo 'depmod: ERROR: could not open directory /x: Permission denied' >&2\nexit 1",
            10,
        );
        let e = layout
            .prepare("c", "other", &k, &files(d.path()))
            .unwrap_err();
        assert!(
            e.to_string().ends_with(
                "failed (exit status 1): depmod: ERROR: could not open directory /x: Permission denied"
            ),
            "{e}"
        );
    }

    #[test]
    fn depmod_noise_is_recognised() {
        assert!(is_depmod_noise(
            "depmod: WARNING: could not open modules.order at /x/lib/modules/K: No such file or directory"
        ));
        assert!(is_depmod_noise(
            "depmod: WARNING: could not open modules.builtin.modinfo at /x: No such file or directory"
        ));
        assert!(!is_depmod_noise(
            "depmod: WARNING: /x/kvcd/a.ko needs unknown symbol crc8"
        ));
    }
}
