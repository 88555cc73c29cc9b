//! Kernel modules: lookups in a kernel's own module tree through its index
//! (libkmod), load order for a driver package over that tree ([`resolve`]),
//! module file info, and the live kernel behind the narrow [`KernelModules`]
//! trait (faked in unit tests, real in the VM).

pub mod elf;
mod error;
mod name;
pub mod resolve;
pub mod sim;
mod sys;

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};
use serde::Serialize;

pub use error::{KmodError, KmodErrorKind, KmodOp};
pub use name::ModName;
pub use sys::InitState;

/// A module file resolved in a module tree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ModuleFile {
    /// Module name.
    pub name: ModName,
    /// Path of the `.ko` file.
    pub path: PathBuf,
    /// True for the target kernel's own modules (from its tree, not the package).
    pub in_tree: bool,
}

/// What `.modinfo` says about a module file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ModInfo {
    /// `vermagic`, e.g. `6.1.0-27-amd64 SMP preempt mod_unload modversions `.
    pub vermagic: Option<String>,
    /// `version` (`MODULE_VERSION`).
    pub version: Option<String>,
    /// `srcversion`: a hash of the module's source, when modpost added one.
    pub srcversion: Option<String>,
    /// `depends`: modules it needs symbols from.
    pub depends: Vec<String>,
}

impl ModInfo {
    /// The `.modinfo` keys kvcd reads (others are not kept).
    pub const KEYS: &'static [&'static str] = &["vermagic", "version", "srcversion", "depends"];

    /// Reads `.modinfo` from the module file at `path` (compressed or not).
    pub fn read(path: &Path) -> Result<Self> {
        Ok(Self::of(&elf::ElfInfo::read(path)?))
    }

    /// What the `.modinfo` strings read with `elf` say.
    pub fn of(elf: &elf::ElfInfo) -> Self {
        let mut out = Self::default();
        for (k, v) in &elf.modinfo {
            match k.as_str() {
                "vermagic" => out.vermagic = Some(v.clone()),
                "version" => out.version = Some(v.clone()),
                "srcversion" => out.srcversion = Some(v.clone()),
                "depends" => {
                    out.depends = v
                        .split(',')
                        .filter(|d| !d.is_empty())
                        .map(str::to_owned)
                        .collect();
                }
                _ => {}
            }
        }
        out
    }

    /// The kernel release a module was built for: the first word of vermagic.
    pub fn vermagic_release(&self) -> Option<&str> {
        self.vermagic.as_deref()?.split_whitespace().next()
    }
}

/// A kernel's own module tree (`lib/modules/KERNEL`), read through its index.
#[derive(Debug)]
pub struct ModuleTree {
    dir: PathBuf,
    ctx: sys::Ctx,
}

impl ModuleTree {
    /// Opens the tree at `dir` (the directory holding `modules.dep.bin`).
    pub fn open(dir: &Path) -> Result<Self> {
        if !dir.join("modules.dep.bin").exists() && !dir.join("modules.dep").exists() {
            bail!(
                "{}: no modules.dep.bin: the kernel's module index is missing (depmod {} makes it)",
                dir.display(),
                dir.file_name().unwrap_or_default().to_string_lossy()
            );
        }
        let ctx = sys::Ctx::new(Some(dir))
            .with_context(|| format!("{}: cannot create libkmod context", dir.display()))?;
        Ok(Self {
            dir: dir.to_owned(),
            ctx,
        })
    }

    /// The tree's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The kernel release the tree is for (its directory's name).
    pub fn kernel_label(&self) -> String {
        self.dir
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned())
    }

    fn lookup(&self, name: &ModName) -> Result<Option<sys::Module>> {
        let found = self
            .ctx
            .lookup(name.as_str())
            .with_context(|| format!("looking up module {name} in {}", self.dir.display()))?;
        Ok(found
            .into_iter()
            .find(|m| ModName::parse(&m.name()).is_ok_and(|n| n == *name)))
    }

    /// Where `name` resolves among the kernel's own modules.
    pub fn provider(&self, name: &ModName) -> Result<resolve::Provider> {
        let Some(m) = self.lookup(name)? else {
            return Ok(resolve::Provider::Missing);
        };
        let Some(path) = m.path() else {
            return Ok(resolve::Provider::BuiltIn);
        };
        let depends = m
            .dependencies()
            .iter()
            .map(|d| ModName::parse(&d.name()).map_err(anyhow::Error::msg))
            .collect::<Result<_>>()?;
        Ok(resolve::Provider::InTree { path, depends })
    }

    /// The kernel's own files for `names` and their dependencies, dependencies first.
    pub fn load_order(&self, names: &[ModName]) -> Result<Vec<ModuleFile>> {
        resolve::load_order(&mut &*self, names)
    }

    /// modprobe.d `options` for `name`, as modprobe would pass them.
    pub fn modprobe_options(&self, name: &ModName) -> Vec<String> {
        self.lookup(name)
            .ok()
            .flatten()
            .and_then(|m| m.options())
            .map(|o| o.split_whitespace().map(str::to_owned).collect())
            .unwrap_or_default()
    }
}

/// The kernel's own modules alone, as [`resolve::Providers`].
impl resolve::Providers for &ModuleTree {
    fn provider(&mut self, name: &ModName) -> Result<resolve::Provider> {
        ModuleTree::provider(self, name)
    }

    fn searched(&self) -> String {
        format!(
            "kernel {}'s modules ({})",
            self.kernel_label(),
            self.dir.display()
        )
    }
}

/// A module as the running kernel has it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LiveModule {
    /// Init state.
    pub state: InitState,
    /// Reference count (each holder counts one).
    pub refcount: i32,
    /// Modules that use this one.
    pub holders: Vec<ModName>,
}

/// What tells one build of a module from another: from a file, or from the kernel for a live module.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct ModuleIdentity {
    /// The GNU build ID (`.note.gnu.build-id`), when there is one.
    pub build_id: Option<Vec<u8>>,
    /// `srcversion`, when there is one.
    pub srcversion: Option<String>,
    /// `version` (`MODULE_VERSION`), when there is one.
    pub version: Option<String>,
}

/// How a live module compares with a module file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdentityMatch {
    /// The same build.
    Same,
    /// Another build; the text says what differs.
    Differs(String),
    /// Neither a build ID nor a srcversion to compare.
    Unknown,
}

impl ModuleIdentity {
    /// The identity of a module file from what was read of it.
    pub fn new(elf: &elf::ElfInfo, info: &ModInfo) -> Self {
        Self {
            build_id: elf.build_id.clone(),
            srcversion: info.srcversion.clone(),
            version: info.version.clone(),
        }
    }

    /// The identity of the module file at `path` (compressed or not).
    pub fn of_file(path: &Path) -> Result<Self> {
        let elf = elf::ElfInfo::read(path)?;
        Ok(Self::new(&elf, &ModInfo::of(&elf)))
    }

    /// Compares the live module `live` with this file: build IDs first, then srcversion, then version.
    pub fn compare(&self, live: &Self) -> IdentityMatch {
        if let (Some(v), Some(l)) = (&self.version, &live.version) {
            if v != l {
                return IdentityMatch::Differs(format!("live version {l}, the file has {v}"));
            }
        }
        match (&self.build_id, &live.build_id) {
            (Some(f), Some(l)) if f == l => return IdentityMatch::Same,
            (Some(f), Some(l)) => {
                return IdentityMatch::Differs(format!(
                    "live build ID {}, the file has {}",
                    crate::util::hex(l),
                    crate::util::hex(f)
                ));
            }
            _ => {}
        }
        match (&self.srcversion, &live.srcversion) {
            (Some(f), Some(l)) if f == l => IdentityMatch::Same,
            (Some(f), Some(l)) => {
                IdentityMatch::Differs(format!("live srcversion {l}, the file has {f}"))
            }
            (Some(f), None) => IdentityMatch::Differs(format!(
                "the live module has no srcversion, the file has {f}"
            )),
            (None, Some(l)) => {
                IdentityMatch::Differs(format!("live srcversion {l}, the file has none"))
            }
            (None, None) => IdentityMatch::Unknown,
        }
    }
}

/// The running kernel's modules: libkmod; with the `failpoints` feature and
/// `KVCD_SIM_KERNEL=DIR`, the simulated kernel kept in DIR instead.
pub fn open() -> Result<Box<dyn KernelModules>> {
    if cfg!(feature = "failpoints") {
        if let Some(dir) = std::env::var_os("KVCD_SIM_KERNEL") {
            return Ok(Box::new(sim::SimKernel::new(dir)));
        }
    }
    Ok(Box::new(Libkmod::new()?))
}

/// The running kernel's modules: the narrow seam the reconciler works through.
pub trait KernelModules {
    /// The module's state in the kernel, `None` when it is not there.
    fn live(&self, name: &ModName) -> Result<Option<LiveModule>>;
    /// Inserts `file` with `params` (`name=value` each).
    fn insert(&self, file: &ModuleFile, params: &[String]) -> Result<(), KmodError>;
    /// Removes `name`; `force` only when the config asks for it.
    fn remove(&self, name: &ModName, force: bool) -> Result<(), KmodError>;
    /// What the kernel shows of a loaded module's identity (build ID, srcversion, version).
    fn identity(&self, name: &ModName) -> ModuleIdentity;
    /// The value of a loaded module's parameter, when the kernel shows it.
    fn parameter(&self, name: &ModName, key: &str) -> Option<String>;
    /// The kernel's extra firmware search path (`firmware_class.path`), when readable.
    fn firmware_search_path(&self) -> Option<String>;
    /// Sets the kernel's extra firmware search path; an empty path clears it.
    fn set_firmware_search_path(&self, path: &Path) -> Result<()>;
}

/// A sysfs value without the one newline the kernel adds (a value that itself
/// ends in a newline keeps it: for `firmware_class.path` that matters).
fn sysfs_value(v: &str) -> String {
    v.strip_suffix('\n').unwrap_or(v).to_owned()
}

/// Where the kernel shows `firmware_class.path`.
const FIRMWARE_PATH_PARAM: &str = "/sys/module/firmware_class/parameters/path";

/// The real kernel, through libkmod and sysfs.
#[derive(Debug)]
pub struct Libkmod {
    ctx: sys::Ctx,
}

impl Libkmod {
    /// Opens libkmod for the running kernel.
    pub fn new() -> Result<Self> {
        Ok(Self {
            ctx: sys::Ctx::new(None).context("creating libkmod context")?,
        })
    }
}

impl KernelModules for Libkmod {
    fn live(&self, name: &ModName) -> Result<Option<LiveModule>> {
        let m = self
            .ctx
            .by_name(name.as_str())
            .with_context(|| format!("module {name}: libkmod lookup failed"))?;
        let Some(state) = m.initstate() else {
            return Ok(None);
        };
        let holders = m
            .holders()
            .iter()
            .filter_map(|h| ModName::parse(&h.name()).ok())
            .collect();
        Ok(Some(LiveModule {
            state,
            refcount: m.refcount().unwrap_or(0),
            holders,
        }))
    }

    fn insert(&self, file: &ModuleFile, params: &[String]) -> Result<(), KmodError> {
        let m = self
            .ctx
            .by_path(&file.path)
            .map_err(|e| KmodError::new(KmodOp::Insert, &file.name, e))?;
        m.insert(&params.join(" "))
            .map_err(|e| KmodError::new(KmodOp::Insert, &file.name, e))
    }

    fn remove(&self, name: &ModName, force: bool) -> Result<(), KmodError> {
        let m = self
            .ctx
            .by_name(name.as_str())
            .map_err(|e| KmodError::new(KmodOp::Remove, name, e))?;
        m.remove(force)
            .map_err(|e| KmodError::new(KmodOp::Remove, name, e))
    }

    fn identity(&self, name: &ModName) -> ModuleIdentity {
        let dir = Path::new("/sys/module").join(name.as_str());
        let text = |f: &str| {
            std::fs::read_to_string(dir.join(f))
                .ok()
                .map(|v| v.trim().to_owned())
        };
        // Notes are in the kernel's own byte order.
        let build_id = std::fs::read(dir.join("notes/.note.gnu.build-id"))
            .ok()
            .and_then(|n| elf::gnu_build_id_in(&n, cfg!(target_endian = "little")));
        ModuleIdentity {
            build_id,
            srcversion: text("srcversion"),
            version: text("version"),
        }
    }

    fn parameter(&self, name: &ModName, key: &str) -> Option<String> {
        let p = Path::new("/sys/module")
            .join(name.as_str())
            .join("parameters")
            .join(key);
        std::fs::read_to_string(p).ok().map(|v| sysfs_value(&v))
    }

    fn firmware_search_path(&self) -> Option<String> {
        std::fs::read_to_string(FIRMWARE_PATH_PARAM)
            .ok()
            .map(|v| sysfs_value(&v))
    }

    fn set_firmware_search_path(&self, path: &Path) -> Result<()> {
        // An empty write never reaches the kernel; a lone NUL stores the empty string.
        let value = match path.as_os_str().as_encoded_bytes() {
            [] => &b"\0"[..],
            v => v,
        };
        std::fs::write(FIRMWARE_PATH_PARAM, value)
            .with_context(|| format!("writing {FIRMWARE_PATH_PARAM}"))
    }
}

#[cfg(test)]
mod tests {
    use super::sysfs_value;

    #[test]
    fn sysfs_values_lose_only_the_kernels_newline() {
        assert_eq!(sysfs_value("/var/lib/firmware\n"), "/var/lib/firmware");
        assert_eq!(sysfs_value("/var/lib/firmware\n\n"), "/var/lib/firmware\n");
        assert_eq!(sysfs_value("\n"), "");
    }
}
