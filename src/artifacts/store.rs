//! Module files stored once by content (`STATE/files/SHA256/NAME`), and the
//! set of stored files each config resolved for each kernel
//! (`STATE/sets/KERNEL/CONFIG.json`). Configs and kernels with the same
//! files share them; a file no set names is removed. Nothing is indexed:
//! dependencies resolve from each file's own `depends=` and the target
//! kernel's own index ([`crate::kmod::resolve`]).
//!
//! Also the file helpers every artifact path shares: module files are hashed
//! and copied as streams (never read whole), and copies keep holes.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{ErrorKind, Read as _};
use std::os::unix::fs::{FileExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::{Mutex, MutexGuard, PoisonError};

use anyhow::{Context as _, Result, bail};
use nix::errno::Errno;
use nix::unistd::{Whence, lseek};
use sha2::{Digest as _, Sha256};

use crate::kernel::KernelRelease;
use crate::kmod::elf::ElfInfo;
use crate::kmod::{ModName, ModuleTree};
use crate::signing::{KernelTrust, SignOutcome, Signer};
use crate::state::Layout;
use crate::state::set::{self, ModuleSet, SetFile, SourceStat};
use crate::util::hex;

/// Read and write unit of the streaming copy and hash.
const CHUNK: usize = 128 * 1024;

/// Serializes staging and garbage collection within one process (the state
/// lock serializes processes), so a file being staged is never collected.
static STORE: Mutex<()> = Mutex::new(());

/// Where module files are stored and which kernel trees they resolve against.
#[derive(Debug, Clone)]
pub struct ModuleStore {
    /// kvcd's state directory; files go under `files/`, sets under `sets/`.
    pub state_dir: PathBuf,
    /// Directory holding the host's `KERNEL/` module trees.
    pub kernel_modules_dir: PathBuf,
    /// Kernel trees opened so far (one libkmod context each per store).
    trees: RefCell<BTreeMap<String, Rc<ModuleTree>>>,
}

/// What staging one config's files for one kernel did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Staged {
    /// Files that were new to the store (copied, or linked from an extraction, now).
    pub copied: usize,
    /// Total size of the set's files, in bytes.
    pub bytes: u64,
    /// True when the set names other files than the one recorded before (or there was none).
    pub changed: bool,
    /// The config digest the recorded set's files passed verification for, if any.
    pub verified_for: Option<String>,
    /// Files signed now (not found signed in the set before).
    pub signed: usize,
    /// What signing decided beyond signing (signatures kept or replaced), for the log.
    pub notes: Vec<String>,
}

/// Files being staged for one (config, kernel); [`Staging::finish`] records them as its set.
#[derive(Debug)]
pub struct Staging<'s> {
    state_dir: &'s Path,
    files_dir: PathBuf,
    set_file: PathBuf,
    /// The set recorded before, if readable: what is known of its files is reused.
    old: Option<ModuleSet>,
    set: ModuleSet,
    copied: usize,
    bytes: u64,
    /// The key files are signed with, and what the kernel trusts; none: stored as they come.
    signing: Option<(&'s Signer, &'s KernelTrust)>,
    signed: usize,
    notes: Vec<String>,
    _guard: MutexGuard<'static, ()>,
}

impl ModuleStore {
    /// A store in `state_dir` resolving against the trees in `kernel_modules_dir`.
    pub fn new(state_dir: PathBuf, kernel_modules_dir: PathBuf) -> Self {
        Self {
            state_dir,
            kernel_modules_dir,
            trees: RefCell::default(),
        }
    }

    /// The host's module tree for `kernel`.
    pub fn host_tree(&self, kernel: &KernelRelease) -> PathBuf {
        self.kernel_modules_dir.join(kernel.as_str())
    }

    /// The host's module tree for `kernel`, read through its own index
    /// (opened once per store). Fails when the host has no tree for `kernel`.
    pub fn open_tree(&self, kernel: &KernelRelease) -> Result<Rc<ModuleTree>> {
        if let Some(t) = self.trees.borrow().get(kernel.as_str()) {
            return Ok(Rc::clone(t));
        }
        let host = self.host_tree(kernel);
        let host_kernel = host.join("kernel");
        if !host_kernel.is_dir() {
            let missing = if host.is_dir() { &host_kernel } else { &host };
            bail!(
                "no module tree for kernel {kernel} at {}; kvcd needs the kernel's own modules to resolve in-tree dependencies",
                missing.display()
            );
        }
        let tree = Rc::new(ModuleTree::open(&host)?);
        self.trees
            .borrow_mut()
            .insert(kernel.to_string(), Rc::clone(&tree));
        Ok(tree)
    }

    /// Records that the set of `config` for `kernel` passed verification for
    /// the config with `digest` (an empty set when there is none, as for a
    /// KVC library config, whose files kvcd never sees).
    pub fn mark_verified(&self, config: &str, kernel: &KernelRelease, digest: &str) -> Result<()> {
        let _guard = STORE.lock().unwrap_or_else(PoisonError::into_inner);
        let path = Layout::set_file(&self.state_dir, config, kernel.as_str());
        let mut s = set::read(&path)?.unwrap_or_default();
        if s.verified_for.as_deref() == Some(digest) {
            return Ok(());
        }
        s.verified_for = Some(digest.to_owned());
        set::write(&path, &s)
    }

    /// The set of `config` for `kernel`, if one was recorded.
    pub fn set(&self, config: &str, kernel: &KernelRelease) -> Result<Option<ModuleSet>> {
        set::read(&Layout::set_file(&self.state_dir, config, kernel.as_str()))
    }

    /// The stored file a set entry names.
    pub fn stored_file(&self, file: &SetFile) -> PathBuf {
        Layout::files_dir(&self.state_dir).join(&file.file)
    }

    /// Starts staging the files of `config` for `kernel`, signed by
    /// `signing` when given (see [`crate::signing`]).
    pub fn staging<'s>(
        &'s self,
        config: &str,
        kernel: &KernelRelease,
        signing: Option<(&'s Signer, &'s KernelTrust)>,
    ) -> Result<Staging<'s>> {
        let guard = STORE.lock().unwrap_or_else(PoisonError::into_inner);
        let files_dir = Layout::files_dir(&self.state_dir);
        fs::create_dir_all(&files_dir)
            .with_context(|| format!("creating {}", files_dir.display()))?;
        let set_file = Layout::set_file(&self.state_dir, config, kernel.as_str());
        Ok(Staging {
            state_dir: &self.state_dir,
            files_dir,
            old: set::read(&set_file).ok().flatten(),
            set_file,
            set: ModuleSet::default(),
            copied: 0,
            bytes: 0,
            signing,
            signed: 0,
            notes: Vec::new(),
            _guard: guard,
        })
    }
}

impl Staging<'_> {
    /// Puts the file of module `name` into the store (unless its content is
    /// there already) and into the set; returns the stored file, which is
    /// what the load reads and inserts. A source that looks exactly as when
    /// it was stored for this set (under the same signing key) is not read
    /// again. With signing, what is stored is the signed module.
    pub fn put(&mut self, name: &ModName, path: &Path) -> Result<PathBuf> {
        let before = self
            .old
            .as_ref()
            .and_then(|o| o.files.get(name.as_str()))
            .cloned();
        let now = SourceStat::of(path);
        let identity = self.signing.map(|(s, _)| s.identity());
        let unchanged = |e: &&SetFile| match (&e.source, &now) {
            (Some(then), Some(now)) => then.vouches_for(now) && e.signed == identity,
            _ => false,
        };
        if let Some(e) = before.as_ref().filter(unchanged) {
            let stored = self.files_dir.join(&e.file);
            if stored.is_file() {
                self.bytes += now.as_ref().map_or(0, |s| s.size);
                self.set.files.insert(name.to_string(), e.clone());
                return Ok(stored);
            }
        }
        let (rel, size, copied) = match self.signing {
            Some((signer, trust)) => self.put_signed(name, path, signer, trust)?,
            // kvcd's own extractions never change in place: they are linked, not copied.
            None => put(
                &self.files_dir,
                path,
                None,
                path.starts_with(self.state_dir),
            )?,
        };
        self.copied += usize::from(copied);
        self.bytes += size;
        // What was read of the same content before still holds.
        let elf = before.filter(|e| e.file == rel).and_then(|e| e.elf);
        let entry = SetFile {
            source: SourceStat::of(path),
            file: rel,
            elf,
            signed: identity,
        };
        let stored = self.files_dir.join(&entry.file);
        self.set.files.insert(name.to_string(), entry);
        Ok(stored)
    }

    /// Signs the module file at `path` into the store (see
    /// [`Signer::sign_file`]); a module whose signature is kept is stored
    /// as it is.
    fn put_signed(
        &mut self,
        name: &ModName,
        path: &Path,
        signer: &Signer,
        trust: &KernelTrust,
    ) -> Result<(String, u64, bool)> {
        // Stored uncompressed: `m.ko.xz` is signed as `m.ko`. A kill leaves
        // the temporary file to the start-up sweep (`.NAME.tmp-PID`).
        let file_name = path
            .file_name()
            .and_then(|n| n.to_str())
            .with_context(|| format!("{} has no file name kvcd can store", path.display()))?;
        let plain = [".xz", ".zst", ".gz"]
            .iter()
            .find_map(|c| file_name.strip_suffix(c).filter(|p| p.ends_with(".ko")))
            .unwrap_or(file_name);
        let tmp = self
            .files_dir
            .join(format!(".{plain}.signing.tmp-{}", std::process::id()));
        let _ = fs::remove_file(&tmp);
        let signed = signer
            .sign_file(path, &tmp, trust)
            .with_context(|| format!("signing module {name}"));
        let stored = match signed {
            Ok(SignOutcome::Signed { replaced }) => {
                self.signed += 1;
                if let Some(r) = replaced {
                    self.notes.push(format!(
                        "{name}: replaced its signature by \"{}\" (a key the kernel does not trust) with kvcd's",
                        r.name
                    ));
                }
                put(&self.files_dir, &tmp, Some(plain), true)
            }
            Ok(SignOutcome::Kept { signer, keyrings }) => {
                if !keyrings.is_empty() {
                    self.notes.push(format!(
                        "{name}: kept its signature by \"{}\" (a key in {})",
                        signer.name,
                        keyrings.join(", ")
                    ));
                }
                put(
                    &self.files_dir,
                    path,
                    None,
                    path.starts_with(self.state_dir),
                )
            }
            Err(e) => Err(e),
        };
        let _ = fs::remove_file(&tmp);
        stored
    }

    /// What the ELF file of module `name` (put before) says: read from the
    /// stored file once, then kept in the set.
    pub fn elf(&mut self, name: &ModName) -> Result<ElfInfo> {
        let entry = self
            .set
            .files
            .get_mut(name.as_str())
            .with_context(|| format!("module {name} was not stored"))?;
        if let Some(e) = &entry.elf {
            return Ok(e.clone());
        }
        let mut elf = ElfInfo::read(&self.files_dir.join(&entry.file))?;
        // A driver's aliases and parameter descriptions can run to kilobytes: keep what kvcd reads.
        elf.modinfo
            .retain(|(k, _)| crate::kmod::ModInfo::KEYS.contains(&k.as_str()));
        entry.elf = Some(elf.clone());
        Ok(elf)
    }

    /// Records the files put as the set of the config and kernel; when the
    /// set changed, files no set names any more are removed.
    pub fn finish(mut self) -> Result<Staged> {
        let old = self.old;
        let files = |s: &ModuleSet| s.files.values().map(|f| f.file.clone()).collect::<Vec<_>>();
        let changed = old.as_ref().map(files) != Some(files(&self.set));
        // What was verified stays verified while the files are the same.
        if !changed {
            self.set.verified_for = old.as_ref().and_then(|o| o.verified_for.clone());
        }
        if old.as_ref() != Some(&self.set) {
            set::write(&self.set_file, &self.set)?;
        }
        if changed && old.is_some() {
            collect(self.state_dir)?;
        }
        Ok(Staged {
            copied: self.copied,
            bytes: self.bytes,
            changed,
            verified_for: self.set.verified_for,
            signed: self.signed,
            notes: self.notes,
        })
    }
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
        hash_zeros(&mut h, data - pos);
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
            h.update(chunk);
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
        sha256: hex(&h.finalize()),
    })
}

/// Stores the file at `path` under `store` as `SHA256/NAME` (NAME: `name`,
/// default the file's own) unless its content is there already (as a hard
/// link when `link` and the file system allows it, else as a copy);
/// returns its path relative to the store, its size, and whether it was
/// placed now.
fn put(store: &Path, path: &Path, name: Option<&str>, link: bool) -> Result<(String, u64, bool)> {
    let file_name = match name {
        Some(n) => n,
        None => path
            .file_name()
            .and_then(|n| n.to_str())
            .with_context(|| format!("{} has no file name kvcd can store", path.display()))?,
    };
    let d = hash_file(path)?;
    let rel = format!("{}/{file_name}", d.sha256);
    let dest = store.join(&rel);
    if dest.is_file() {
        return Ok((rel, d.size, false));
    }
    let tmp = store.join(format!(".{file_name}.tmp-{}", std::process::id()));
    let _ = fs::remove_file(&tmp);
    let copied = if link && fs::hard_link(path, &tmp).is_ok() {
        Ok(d.clone())
    } else {
        copy_file_hashed(path, &tmp)
    };
    let placed = copied.and_then(|c| {
        if c != d {
            bail!("{} changed while it was copied", path.display());
        }
        let dir = store.join(&d.sha256);
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        crate::failpoint::hit("store.copied");
        fs::rename(&tmp, &dest)
            .with_context(|| format!("renaming {} to {}", tmp.display(), dest.display()))
    });
    if let Err(e) = placed {
        let _ = fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("storing {}", path.display()));
    }
    Ok((rel, d.size, true))
}

/// Removes every stored file no module set names (and directories left
/// empty); returns what was removed. Unreadable sets keep everything.
pub fn collect_garbage(state_dir: &Path) -> Result<Vec<PathBuf>> {
    let _guard = STORE.lock().unwrap_or_else(PoisonError::into_inner);
    collect(state_dir)
}

fn collect(state_dir: &Path) -> Result<Vec<PathBuf>> {
    let mut used = BTreeSet::new();
    for (_, _, path) in Layout::all_sets(state_dir) {
        let s = set::read(&path)?.unwrap_or_default();
        used.extend(s.files.into_values().map(|f| f.file));
    }
    let store = Layout::files_dir(state_dir);
    let mut removed = Vec::new();
    let Ok(dirs) = fs::read_dir(&store) else {
        return Ok(removed);
    };
    for dir in dirs.flatten() {
        let digest = dir.file_name().to_string_lossy().into_owned();
        if digest.starts_with('.') || !dir.path().is_dir() {
            continue;
        }
        for f in fs::read_dir(dir.path()).into_iter().flatten().flatten() {
            let rel = format!("{digest}/{}", f.file_name().to_string_lossy());
            if !used.contains(&rel) && fs::remove_file(f.path()).is_ok() {
                removed.push(f.path());
            }
        }
        let _ = fs::remove_dir(dir.path());
    }
    Ok(removed)
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

    impl ModuleStore {
        /// Stages all of `files` for `config` on `kernel`; the stored paths.
        fn stage(
            &self,
            config: &str,
            kernel: &KernelRelease,
            files: &BTreeMap<ModName, PathBuf>,
        ) -> Result<(BTreeMap<ModName, PathBuf>, Staged)> {
            let mut s = self.staging(config, kernel, None)?;
            let mut stored = BTreeMap::new();
            for (name, path) in files {
                stored.insert(name.clone(), s.put(name, path)?);
            }
            Ok((stored, s.finish()?))
        }
    }

    fn stored(state: &Path) -> Vec<String> {
        let mut out = Vec::new();
        for d in fs::read_dir(Layout::files_dir(state)).unwrap().flatten() {
            for f in fs::read_dir(d.path()).unwrap().flatten() {
                out.push(format!(
                    "{}/{}",
                    &d.file_name().to_string_lossy()[..8],
                    f.file_name().to_string_lossy()
                ));
            }
        }
        out.sort();
        out
    }

    #[test]
    fn files_are_stored_once_by_content_and_collected_when_no_set_names_them() {
        let d = tempfile::tempdir().unwrap();
        let store = ModuleStore::new(d.path().join("state"), d.path().join("host"));
        let k = KernelRelease::parse("6.1.0-1-amd64").unwrap();
        let k2 = KernelRelease::parse("6.1.0-2-amd64").unwrap();
        let pkg = d.path().join("pkg");
        fs::create_dir_all(&pkg).unwrap();
        fs::write(pkg.join("a.ko"), b"module a").unwrap();
        fs::write(pkg.join("b.ko.xz"), b"module b").unwrap();
        let files = BTreeMap::from([
            (ModName::parse("a").unwrap(), pkg.join("a.ko")),
            (ModName::parse("b").unwrap(), pkg.join("b.ko.xz")),
        ]);
        let (first, s) = store.stage("one", &k, &files).unwrap();
        assert_eq!((s.copied, s.bytes, s.changed), (2, 16, true));
        let a = &first[&ModName::parse("a").unwrap()];
        assert_eq!(fs::read(a).unwrap(), b"module a");
        assert!(a.ends_with(format!("{}/a.ko", crate::util::sha256_hex(b"module a"))));
        // Another config and another kernel with the same files: nothing copied.
        for (config, kernel) in [("two", &k), ("one", &k2)] {
            let (again, s) = store.stage(config, kernel, &files).unwrap();
            assert_eq!((s.copied, s.changed), (0, true));
            assert_eq!(again, first);
        }
        let (_, s) = store.stage("one", &k, &files).unwrap();
        assert_eq!((s.copied, s.changed), (0, false));
        assert_eq!(stored(&store.state_dir).len(), 2);

        // New content for one set: the old file stays while other sets name it.
        fs::write(pkg.join("a.ko"), b"module a, v2").unwrap();
        for (config, kernel) in [("one", &k), ("two", &k)] {
            let (_, s) = store.stage(config, kernel, &files).unwrap();
            assert_eq!(s.copied, usize::from(config == "one"));
        }
        assert_eq!(stored(&store.state_dir).len(), 3);
        store.stage("one", &k2, &files).unwrap();
        let left = stored(&store.state_dir);
        assert_eq!(left.len(), 2, "{left:?}");
        let (now, _) = store.stage("one", &k, &files).unwrap();
        assert_eq!(
            fs::read(&now[&ModName::parse("a").unwrap()]).unwrap(),
            b"module a, v2"
        );

        // Without any set, everything goes.
        fs::remove_dir_all(store.state_dir.join("sets")).unwrap();
        assert_eq!(collect_garbage(&store.state_dir).unwrap().len(), 2);
        assert!(stored(&store.state_dir).is_empty());
    }

    #[test]
    fn a_settled_source_is_not_read_again_and_a_fresh_one_always_is() {
        let d = tempfile::tempdir().unwrap();
        let store = ModuleStore::new(d.path().join("state"), d.path().join("host"));
        let k = KernelRelease::parse("6.1.0-1-amd64").unwrap();
        let src = d.path().join("a.ko");
        fs::write(&src, b"module a").unwrap();
        let files = BTreeMap::from([(ModName::parse("a").unwrap(), src.clone())]);
        let set_file = Layout::set_file(&store.state_dir, "c", k.as_str());
        let (first, _) = store.stage("c", &k, &files).unwrap();
        // A same-size rewrite right away (within one timestamp tick) is still seen.
        fs::write(&src, b"module b").unwrap();
        let (second, s) = store.stage("c", &k, &files).unwrap();
        assert_eq!(s.copied, 1);
        assert_ne!(first, second);
        // Once the stat was taken long after the last change, it vouches for the content.
        let mut recorded = set::read(&set_file).unwrap().unwrap();
        let entry = recorded.files.get_mut("a").unwrap();
        let stat = entry.source.as_mut().unwrap();
        stat.taken_ns = stat.ctime_ns + 5_000_000_000;
        let settled = stat.taken_ns;
        set::write(&set_file, &recorded).unwrap();
        let (third, s) = store.stage("c", &k, &files).unwrap();
        assert_eq!((third, s.copied, s.changed), (second, 0, false));
        let kept = set::read(&set_file).unwrap().unwrap();
        assert_eq!(kept.files["a"].source.as_ref().unwrap().taken_ns, settled);
    }

    #[test]
    fn a_missing_kernel_tree_is_named() {
        let d = tempfile::tempdir().unwrap();
        let store = ModuleStore::new(d.path().join("state"), d.path().join("host"));
        let k = KernelRelease::parse("6.1.0-1-amd64").unwrap();
        let e = store.open_tree(&k).unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "no module tree for kernel 6.1.0-1-amd64 at {}; kvcd needs the kernel's own modules to resolve in-tree dependencies",
                d.path().join("host/6.1.0-1-amd64").display()
            )
        );
    }
}
