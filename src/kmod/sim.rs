//! A simulated kernel kept in a directory, so that separate kvcd processes
//! (and a test killing them) see one kernel: the crash tests run the real
//! binaries with it on hosts that cannot load modules. Reached only with the
//! `failpoints` feature and `KVCD_SIM_KERNEL=DIR` (see [`super::open`]).
//!
//! `DIR/modules/NAME.json` is a live module (the file it came from, its
//! parameters and dependencies, extra references); `DIR/firmware_path` is
//! `firmware_class.path`; `DIR/release`, when present, is the running
//! kernel's release (`uname -r`); `DIR/refuse-insert` lists modules whose insert
//! fails as a module the kernel rejects would. It behaves as the kernel does where kvcd cares:
//! an insert needs its dependencies live, a module in use is not removed.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use nix::errno::Errno;
use serde::{Deserialize, Serialize};

use super::error::{KmodError, KmodOp as Op};
use super::{InitState, KernelModules, LiveModule, ModInfo, ModName, ModuleFile, ModuleIdentity};

/// The release of the simulated kernel (`DIR/release`), when one runs.
pub fn release() -> Option<String> {
    if !cfg!(feature = "failpoints") {
        return None;
    }
    let dir = std::env::var_os("KVCD_SIM_KERNEL")?;
    let r = fs::read_to_string(Path::new(&dir).join("release")).ok()?;
    Some(r.trim().to_owned())
}

/// One live module of the simulated kernel.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SimModule {
    /// The file it was inserted from.
    pub path: PathBuf,
    /// Parameters it was inserted with (`key=value`).
    pub params: Vec<String>,
    /// Modules it uses.
    pub depends: Vec<ModName>,
    /// References that are not modules (an open device, say).
    pub extra_refs: i32,
}

/// The simulated kernel in a directory.
#[derive(Debug, Clone)]
pub struct SimKernel {
    dir: PathBuf,
}

impl SimKernel {
    /// The kernel kept in `dir` (created on first change).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    fn path(&self, name: &ModName) -> PathBuf {
        self.dir.join("modules").join(format!("{name}.json"))
    }

    /// The live module `name`, if any.
    pub fn module(&self, name: &ModName) -> Result<Option<SimModule>> {
        let p = self.path(name);
        match fs::read(&p) {
            Ok(d) => serde_json::from_slice(&d)
                .with_context(|| format!("{}: corrupt simulated module", p.display()))
                .map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", p.display())),
        }
    }

    /// Every live module, by name.
    pub fn modules(&self) -> Result<Vec<(ModName, SimModule)>> {
        let mut out = Vec::new();
        let Ok(entries) = fs::read_dir(self.dir.join("modules")) else {
            return Ok(out);
        };
        for e in entries.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            let Some(stem) = n.strip_suffix(".json").filter(|_| !n.starts_with('.')) else {
                continue;
            };
            let name = ModName::parse(stem).map_err(anyhow::Error::msg)?;
            if let Some(m) = self.module(&name)? {
                out.push((name, m));
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// Makes `name` live as if someone had loaded it from `module.path`.
    pub fn put(&self, name: &ModName, module: &SimModule) -> Result<()> {
        write(&self.path(name), &serde_json::to_vec_pretty(module)?)
    }

    fn holders(&self, name: &ModName) -> Result<Vec<ModName>> {
        Ok(self
            .modules()?
            .into_iter()
            .filter(|(_, m)| m.depends.contains(name))
            .map(|(n, _)| n)
            .collect())
    }
}

impl KernelModules for SimKernel {
    fn live(&self, name: &ModName) -> Result<Option<LiveModule>> {
        let Some(m) = self.module(name)? else {
            return Ok(None);
        };
        let holders = self.holders(name)?;
        Ok(Some(LiveModule {
            state: InitState::Live,
            refcount: i32::try_from(holders.len()).unwrap_or(i32::MAX) + m.extra_refs,
            holders,
        }))
    }

    fn insert(&self, file: &ModuleFile, params: &[String]) -> Result<(), KmodError> {
        let err = |e| KmodError::new(Op::Insert, &file.name, e);
        if matches!(self.module(&file.name), Ok(Some(_))) {
            return Err(err(Errno::EEXIST));
        }
        let refused = fs::read_to_string(self.dir.join("refuse-insert")).unwrap_or_default();
        if refused.lines().any(|l| l.trim() == file.name.as_str()) {
            return Err(err(Errno::ENOEXEC));
        }
        let info = ModInfo::read(&file.path).map_err(|_| err(Errno::ENOEXEC))?;
        let mut depends = Vec::new();
        for d in &info.depends {
            let d = ModName::parse(d).map_err(|_| err(Errno::ENOEXEC))?;
            if !matches!(self.module(&d), Ok(Some(_))) {
                // An unresolved symbol, as the kernel reports it.
                return Err(err(Errno::ENOENT));
            }
            depends.push(d);
        }
        let m = SimModule {
            path: file.path.clone(),
            params: params.to_vec(),
            depends,
            extra_refs: 0,
        };
        self.put(&file.name, &m).map_err(|_| err(Errno::EIO))
    }

    fn remove(&self, name: &ModName, _force: bool) -> Result<(), KmodError> {
        let err = |e| KmodError::new(Op::Remove, name, e);
        match self.live(name).map_err(|_| err(Errno::EIO))? {
            None => Err(err(Errno::ENOENT)),
            Some(l) if l.refcount > 0 => Err(err(Errno::EAGAIN)),
            Some(_) => fs::remove_file(self.path(name)).map_err(|_| err(Errno::EIO)),
        }
    }

    fn identity(&self, name: &ModName) -> ModuleIdentity {
        // What the kernel shows: the identity of the file it was loaded from.
        self.module(name)
            .ok()
            .flatten()
            .and_then(|m| ModuleIdentity::of_file(&m.path).ok())
            .unwrap_or_default()
    }

    fn parameter(&self, name: &ModName, key: &str) -> Option<String> {
        self.module(name)
            .ok()
            .flatten()?
            .params
            .iter()
            .find_map(|p| {
                let (k, v) = p.split_once('=')?;
                (k == key).then(|| v.to_owned())
            })
    }

    fn firmware_search_path(&self) -> Option<String> {
        match fs::read_to_string(self.dir.join("firmware_path")) {
            Ok(s) => Some(s),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Some(String::new()),
            Err(_) => None,
        }
    }

    fn set_firmware_search_path(&self, path: &Path) -> Result<()> {
        write(
            &self.dir.join("firmware_path"),
            path.as_os_str().as_encoded_bytes(),
        )
    }
}

/// Replaces `path` in one step, as the kernel changes its state: a kill of
/// kvcd never catches the simulated kernel half-way (no failpoint here).
fn write(path: &Path, data: &[u8]) -> Result<()> {
    let dir = path.parent().context("no parent directory")?;
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = dir.join(format!(
        ".{}.sim-{}",
        path.file_name().unwrap_or_default().to_string_lossy(),
        std::process::id()
    ));
    fs::write(&tmp, data).with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("renaming {}", tmp.display()))
}
