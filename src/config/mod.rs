//! Configuration: on-disk files (`raw`) → merge across directories (`merge`) →
//! validated settings (`validate`).
//!
//! Layout of each configuration directory: `kvcd.toml` for the daemon and
//! `modules.d/NAME.toml`, one per module config. A broken module config fails
//! only itself; its errors name the file, the line and column, and the key.

pub mod kvc_import;
pub mod merge;
mod raw;
mod validate;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};

use regex::Regex;
use serde::Serialize;

use crate::kmod::ModName;

pub use validate::InstanceName;
use validate::Scope;

/// Default configuration directories, lowest precedence first.
pub const DEFAULT_CONFIG_DIRS: &[&str] = &["/usr/lib/kvcd", "/run/kvcd", "/etc/kvcd"];
/// Default state directory (stored module files, image extractions).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/kvcd";
/// Default runtime directory (what kvcd loaded, lock).
pub const DEFAULT_RUNTIME_DIR: &str = "/run/kvcd";
/// Default directory holding `KERNEL/` module trees.
pub const DEFAULT_KERNEL_MODULES_DIR: &str = "/usr/lib/modules";
/// Default host directory for firmware from driver images.
pub const DEFAULT_FIRMWARE_DIR: &str = "/var/lib/firmware";
/// Default `podman` program (looked up in `PATH`).
pub const DEFAULT_PODMAN: &str = "podman";

/// One configuration problem, pointing at the file and, where known, line, column and key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ConfigError {
    /// The file at fault.
    pub file: PathBuf,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// 1-based column, when known.
    pub column: Option<usize>,
    /// The key at fault (dotted for tables, e.g. `directory.path`), when known.
    pub key: Option<String>,
    /// What is wrong and what was expected.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(col) = self.column {
                write!(f, ":{col}")?;
            }
        }
        write!(f, ": ")?;
        if let Some(key) = &self.key {
            write!(f, "key `{key}`: ")?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for ConfigError {}

impl ConfigError {
    /// An error about a whole file (no line, column or key).
    pub fn file(file: &Path, message: impl Into<String>) -> Self {
        Self {
            file: file.to_owned(),
            line: None,
            column: None,
            key: None,
            message: message.into(),
        }
    }

    /// The same error, naming `key`.
    #[must_use]
    pub fn with_key(mut self, key: &str) -> Self {
        self.key = Some(key.to_owned());
        self
    }
}

/// Where the artifacts (the `.ko` files) of a module config come from.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// A directory on the host holding `.ko` files (a precompiled driver package).
    Directory {
        /// Path template, e.g. `/usr/lib/kvcd/acme/${KERNEL_FULL_VERSION}`.
        path: String,
    },
    /// A driver container image, pulled or built by podman.
    Image(ImageSource),
    /// A kmods-via-containers framework library that builds and loads by itself.
    KvcLibrary {
        /// Libraries sourced in this order (later definitions win).
        libraries: Vec<PathBuf>,
    },
}

/// Default timeout of pre/post hooks and ready commands, in seconds.
pub const DEFAULT_HOOK_TIMEOUT: u64 = 300;
/// Default timeout of build hooks and KVC build/load/unload, in seconds (KVC's unit allowed 25 minutes).
pub const DEFAULT_BUILD_TIMEOUT: u64 = 1500;
/// Default time a ready check may take, in seconds.
pub const DEFAULT_READY_TIMEOUT: u64 = 60;

/// `[hooks]`: vendor commands run around kvcd's own steps (argv, never a shell).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Hooks {
    /// Before anything is loaded (after artifacts are verified); default none.
    pub pre_load: Option<Vec<String>>,
    /// After the modules are in; default none.
    pub post_load: Option<Vec<String>>,
    /// Before anything is unloaded; a failure leaves the modules loaded; default none.
    pub pre_unload: Option<Vec<String>>,
    /// After the modules are out; default none.
    pub post_unload: Option<Vec<String>>,
    /// Builds the image instead of `podman build`; must leave `image.ref` in local storage; default none.
    pub build: Option<Vec<String>>,
    /// Timeout of pre/post hooks in seconds; default 300.
    pub timeout_seconds: u64,
    /// Timeout of the build hook and KVC actions in seconds; default 1500.
    pub build_timeout_seconds: u64,
}

/// What a ready check waits for.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ReadyKind {
    /// A path that must exist (e.g. a device node).
    Path(PathBuf),
    /// A command that must exit 0 (retried until the timeout).
    Command(Vec<String>),
}

/// `[ready]`: the module config counts as loaded only once this passes.
#[derive(Debug, Clone, Serialize)]
pub struct ReadyCheck {
    /// What to wait for.
    pub kind: ReadyKind,
    /// How long to wait in seconds; default 60.
    pub timeout_seconds: u64,
}

/// Default `image.modules_dir`.
pub const DEFAULT_IMAGE_MODULES_DIR: &str = "/lib/modules/${KERNEL_FULL_VERSION}";

/// When to ask the registry for the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PullPolicy {
    /// Only when no image with that reference is present (the default).
    Missing,
    /// Every apply (re-extracts only when the digest changed).
    Always,
    /// Never; the image must be present or built.
    Never,
}

/// `[image]`: a driver container image.
#[derive(Debug, Clone, Serialize)]
pub struct ImageSource {
    /// Image reference template (tag or `@sha256:` digest).
    pub reference: String,
    /// Pull policy; default `missing`.
    pub pull: PullPolicy,
    /// Registry credentials (podman auth.json); default podman's own.
    pub auth_file: Option<PathBuf>,
    /// Verify the registry's TLS certificate; default true.
    pub tls_verify: bool,
    /// Where the modules are in the image; default `/lib/modules/${KERNEL_FULL_VERSION}`.
    pub modules_dir: String,
    /// Where firmware is in the image; default none.
    pub firmware_dir: Option<String>,
    /// How to build the image when it cannot be pulled; default none.
    pub build: Option<BuildSpec>,
}

/// `[build]`: a Containerfile build on the node.
#[derive(Debug, Clone, Serialize)]
pub struct BuildSpec {
    /// Build context: an absolute directory or a git URL (template).
    pub context: String,
    /// Containerfile inside the context; default `Containerfile`.
    pub file: String,
    /// `--build-arg` values (templates).
    pub args: BTreeMap<String, String>,
    /// `--secret id=ID,src=PATH` entries.
    pub secrets: BTreeMap<String, PathBuf>,
}

/// A validated module config (`modules.d/NAME.toml`).
#[derive(Debug, Clone, Serialize)]
pub struct ModuleConfig {
    /// Instance name: the file stem.
    pub name: InstanceName,
    /// The file it was read from.
    pub file: PathBuf,
    /// SHA-256 of the file's content (cache key part).
    pub digest: String,
    /// Free text for status output; default none.
    pub description: Option<String>,
    /// Expected `MODULE_VERSION` of the modules; default none (not checked).
    pub version: Option<String>,
    /// Modules to load, in this order; unload reverses it.
    pub modules: Vec<ModName>,
    /// Module configs that must be loaded first; default none.
    pub after: Vec<InstanceName>,
    /// In-tree modules unloaded before loading and restored after unloading; default none.
    pub replace_in_tree: Vec<ModName>,
    /// Kernels this config supports; default all.
    #[serde(serialize_with = "serialize_regex")]
    pub kernel_match: Option<Regex>,
    /// Force removal of modules that are in use; default false.
    pub force_unload: bool,
    /// Sign the modules when `[signing]` is set in kvcd.toml; default true (`sign = false` stages them as they come).
    pub sign: bool,
    /// Module parameters (`name=value`) per module; default none.
    pub parameters: BTreeMap<ModName, Vec<String>>,
    /// Where the `.ko` files come from.
    pub source: Source,
    /// Vendor hooks; default none.
    pub hooks: Hooks,
    /// Ready check; default none (loaded once the modules are in).
    pub ready: Option<ReadyCheck>,
    /// The devices the driver is for (`[match]`); default none (every node).
    pub devices: crate::devices::DeviceMatch,
}

fn serialize_regex<S: serde::Serializer>(r: &Option<Regex>, s: S) -> Result<S::Ok, S::Error> {
    match r {
        Some(r) => s.serialize_some(r.as_str()),
        None => s.serialize_none(),
    }
}

impl ModuleConfig {
    /// True when the config applies to `kernel` (no `kernel_match`, or it matches).
    pub fn supports(&self, kernel: &crate::kernel::KernelRelease) -> bool {
        self.kernel_match
            .as_ref()
            .is_none_or(|re| re.is_match(kernel.as_str()))
    }

    /// The parameters for `module`, empty when none are configured.
    pub fn parameters_for(&self, module: &ModName) -> &[String] {
        self.parameters.get(module).map_or(&[], Vec::as_slice)
    }
}

/// Daemon-wide settings (`kvcd.toml`).
#[derive(Debug, Clone, Serialize)]
pub struct DaemonSettings {
    /// The `kvcd.toml` in effect, if any.
    pub file: Option<PathBuf>,
    /// Stored module files and image extractions; default `/var/lib/kvcd`.
    pub state_dir: PathBuf,
    /// What kvcd loaded, and its lock; default `/run/kvcd`.
    pub runtime_dir: PathBuf,
    /// Directory holding the kernels' module trees; default `/usr/lib/modules`.
    pub kernel_modules_dir: PathBuf,
    /// The `podman` program; default `podman` from `PATH`.
    pub podman: PathBuf,
    /// Where firmware from driver images is placed; default `/var/lib/firmware`.
    pub firmware_dir: PathBuf,
    /// Kernels whose artifacts are kept per module config (besides the running one); default 3.
    pub keep_kernels: usize,
    /// Let `kvcd prepare-next --if-enabled` (run when a kernel or an ostree deployment lands) prepare it; default true.
    pub prepare_next_kernels: bool,
    /// Module configs the daemon works on at the same time; default 2.
    pub max_parallel: usize,
    /// First retry delay after a failure, in seconds (doubles each time); default 5.
    pub retry_base_seconds: u64,
    /// Longest retry delay, in seconds; default 300.
    pub retry_max_seconds: u64,
    /// Unload what kvcd loaded when the daemon stops; default false (drivers stay).
    pub unload_on_stop: bool,
    /// How long SIGTERM waits for running steps before the daemon exits without them, in seconds; default 240.
    pub stop_timeout_seconds: u64,
    /// Longest a `podman pull` may take, in seconds; default 900.
    pub pull_timeout_seconds: u64,
    /// Longest a short podman call (inspect, mount, unmount, rmi) may take, in seconds; default 120.
    pub podman_timeout_seconds: u64,
    /// The key staged modules are signed with (`[signing]`); default none (modules are staged as they come).
    pub signing: Option<SigningSettings>,
    /// The Prometheus textfile kvcd writes its metrics to (`[metrics] textfile`, a `*.prom` file); default none.
    pub metrics_textfile: Option<PathBuf>,
}

/// `[signing]` in `kvcd.toml`: kvcd signs every module it stages with this key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SigningSettings {
    /// The PEM (or DER) private key, RSA or EC, readable by root only.
    pub key: PathBuf,
    /// The key's X.509 certificate, DER or PEM: the one enrolled (MOK) on the node.
    pub cert: PathBuf,
    /// The digest signed; default `sha256`.
    #[serde(serialize_with = "serialize_hash")]
    pub hash: crate::signing::Hash,
}

fn serialize_hash<S: serde::Serializer>(h: &crate::signing::Hash, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(h.name())
}

impl Default for DaemonSettings {
    fn default() -> Self {
        Self {
            file: None,
            state_dir: DEFAULT_STATE_DIR.into(),
            runtime_dir: DEFAULT_RUNTIME_DIR.into(),
            kernel_modules_dir: DEFAULT_KERNEL_MODULES_DIR.into(),
            podman: DEFAULT_PODMAN.into(),
            firmware_dir: DEFAULT_FIRMWARE_DIR.into(),
            keep_kernels: crate::artifacts::prune::DEFAULT_KEEP_KERNELS,
            prepare_next_kernels: true,
            max_parallel: 2,
            retry_base_seconds: 5,
            retry_max_seconds: 300,
            unload_on_stop: false,
            stop_timeout_seconds: 240,
            pull_timeout_seconds: crate::artifacts::podman::DEFAULT_PULL_TIMEOUT,
            podman_timeout_seconds: crate::artifacts::podman::DEFAULT_PODMAN_TIMEOUT,
            signing: None,
            metrics_textfile: None,
        }
    }
}

/// A module config as found on disk: where it came from and whether it is valid.
#[derive(Debug, Clone)]
pub struct ModuleEntry {
    /// The file in effect.
    pub file: PathBuf,
    /// Lower-precedence files with the same name that it overrides.
    pub shadows: Vec<PathBuf>,
    /// The validated config, or every problem found in it.
    pub result: Result<ModuleConfig, Vec<ConfigError>>,
}

/// Everything read from the configuration directories.
#[derive(Debug, Clone)]
pub struct Config {
    /// The directories read, lowest precedence first.
    pub dirs: Vec<PathBuf>,
    /// Daemon settings (defaults where `kvcd.toml` is absent or broken).
    pub daemon: DaemonSettings,
    /// Problems with `kvcd.toml` and with files that cannot be module configs.
    pub errors: Vec<ConfigError>,
    /// Module configs by instance name.
    pub modules: BTreeMap<String, ModuleEntry>,
    /// Files that mask a name (symlinks to `/dev/null`).
    pub masked: Vec<PathBuf>,
}

/// Overrides given on the command line; they win over `kvcd.toml`.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--state-dir`.
    pub state_dir: Option<PathBuf>,
    /// `--runtime-dir`.
    pub runtime_dir: Option<PathBuf>,
}

/// What changed in the configuration directories since they were last read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Changes {
    /// Anything may have changed: read every file.
    All,
    /// Only these module config files were written, created, removed or
    /// renamed (away or into place).
    Files(BTreeSet<PathBuf>),
}

impl Changes {
    /// Adds what `other` says changed.
    pub fn add(&mut self, other: Self) {
        match (&mut *self, other) {
            (Self::All, _) => {}
            (me, Self::All) => *me = Self::All,
            (Self::Files(mine), Self::Files(theirs)) => mine.extend(theirs),
        }
    }
}

/// Each module config file as validated on its own (before the checks across
/// files), by path, so that a change to one file re-reads only that file.
#[derive(Debug, Default)]
pub struct ConfigCache {
    modules: HashMap<PathBuf, Result<ModuleConfig, Vec<ConfigError>>>,
}

impl ConfigCache {
    /// A cache of the valid module configs of `config`, as read by
    /// [`Config::load`]. (An invalid entry may be invalid because of another
    /// file; it is read again.)
    pub fn seeded(config: &Config) -> Self {
        let modules = config
            .modules
            .values()
            .filter_map(|e| Some((e.file.clone(), Ok(e.result.as_ref().ok()?.clone()))))
            .collect();
        Self { modules }
    }

    /// How many files it holds.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.modules.len()
    }
}

impl Config {
    /// Reads and validates everything under `dirs` (lowest precedence first).
    pub fn load(dirs: &[PathBuf], overrides: &Overrides) -> Self {
        Self::load_cached(dirs, overrides, &mut ConfigCache::default(), &Changes::All)
    }

    /// Like [`Config::load`], reading again only the module config files that
    /// `changes` names (or that `cache` does not hold); every other file comes
    /// from `cache`. The directories are listed again, `kvcd.toml` is read
    /// again and the checks across files (`after`, module ownership) are made
    /// again, so the result is what [`Config::load`] gives when only the
    /// files named changed. `cache` is left holding what this read used.
    pub fn load_cached(
        dirs: &[PathBuf],
        overrides: &Overrides,
        cache: &mut ConfigCache,
        changes: &Changes,
    ) -> Self {
        match changes {
            Changes::All => cache.modules.clear(),
            Changes::Files(files) => {
                for f in files {
                    cache.modules.remove(f);
                }
            }
        }
        let mut found = Found::default();
        for d in dirs {
            found.add_dir(d);
        }
        found.assemble_cached(dirs, overrides, Scope::Node, cache)
    }

    /// Like [`Config::load`], for directories named on the command line: each
    /// must exist and be a directory, or it is an error naming it. (The
    /// built-in [`DEFAULT_CONFIG_DIRS`] may be absent; use `load` for them.)
    pub fn load_named(dirs: &[PathBuf], overrides: &Overrides) -> Self {
        let (present, absent): (Vec<PathBuf>, Vec<PathBuf>) =
            dirs.iter().cloned().partition(|d| d.is_dir());
        let mut config = Self::load(&present, overrides);
        config.dirs = dirs.to_vec();
        let mut missing: Vec<ConfigError> = absent
            .iter()
            .map(|d| {
                let what = match fs::metadata(d) {
                    Ok(m) => format!("not a directory ({})", file_kind(m.file_type())),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        "no such directory".to_owned()
                    }
                    Err(e) => format!("cannot read directory: {e}"),
                };
                ConfigError::file(
                    d,
                    format!(
                        "{what}: expected a configuration directory (holding kvcd.toml and modules.d/)"
                    ),
                )
            })
            .collect();
        missing.append(&mut config.errors);
        config.errors = missing;
        config
    }

    /// Reads what `kvcctl config validate PATH…` names: configuration
    /// directories (holding `kvcd.toml` or `modules.d/`), directories of module
    /// configs (`*.toml`), or single files; later paths win as later directories do.
    pub fn load_paths(paths: &[PathBuf]) -> Self {
        Self::load_paths_in(paths, Scope::Node)
    }

    /// Like [`Config::load_paths`], for a collection of alternative examples
    /// (as `conf.d/` ships) rather than one node's configuration: each module
    /// config is checked beside only the configs its `after` names, so two
    /// alternatives may load the same module, and KVC libraries need not exist
    /// on this host.
    pub fn load_examples(paths: &[PathBuf]) -> Self {
        Self::load_paths_in(paths, Scope::Examples)
    }

    fn load_paths_in(paths: &[PathBuf], scope: Scope) -> Self {
        let mut found = Found::default();
        for p in paths {
            if p.is_dir() && (p.join("modules.d").is_dir() || p.join("kvcd.toml").exists()) {
                found.add_dir(p);
            } else if p.is_dir() {
                found.add_modules_dir(p);
            } else if p.file_name().is_some_and(|n| n == "kvcd.toml") {
                found.daemon.push(candidate(p.clone()));
            } else if fs::symlink_metadata(p).is_ok() {
                let name = p
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                found
                    .modules
                    .push(BTreeMap::from([(name, merge::Candidate::new(p.clone()))]));
            } else {
                found
                    .errors
                    .push(ConfigError::file(p, "no such file or directory"));
            }
        }
        found.assemble(paths, &Overrides::default(), scope)
    }

    /// Every problem found, global ones first.
    pub fn all_errors(&self) -> Vec<&ConfigError> {
        let mut out: Vec<_> = self.errors.iter().collect();
        for entry in self.modules.values() {
            if let Err(errs) = &entry.result {
                out.extend(errs);
            }
        }
        out
    }

    /// Each valid module config's `after` list, by name (see [`after_map`]).
    pub fn after_map(&self) -> BTreeMap<String, Vec<String>> {
        after_map(
            self.modules
                .iter()
                .filter_map(|(n, e)| Some((n.as_str(), e.result.as_ref().ok()?))),
        )
    }

    /// The validated module config named `name`.
    pub fn module(&self, name: &str) -> Result<&ModuleConfig, ModuleLookupError> {
        match self.modules.get(name) {
            None => Err(ModuleLookupError::NotFound(
                name.to_owned(),
                self.dirs.clone(),
            )),
            Some(ModuleEntry { result: Ok(c), .. }) => Ok(c),
            Some(ModuleEntry {
                result: Err(errs), ..
            }) => Err(ModuleLookupError::Invalid(errs.clone())),
        }
    }
}

/// The `after` list of each of `configs`, by name: the ordering graph of module configs.
pub fn after_map<'a>(
    configs: impl IntoIterator<Item = (&'a str, &'a ModuleConfig)>,
) -> BTreeMap<String, Vec<String>> {
    configs
        .into_iter()
        .map(|(n, c)| {
            (
                n.to_owned(),
                c.after.iter().map(ToString::to_string).collect(),
            )
        })
        .collect()
}

/// Several errors on one line, `; `-separated.
pub fn join_errors(errs: &[ConfigError]) -> String {
    errs.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// Why a module config could not be used.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ModuleLookupError {
    /// No file defines it.
    #[error("no module config named {0:?} in {dirs}", dirs = display_dirs(.1))]
    NotFound(String, Vec<PathBuf>),
    /// Its file is invalid.
    #[error("invalid configuration:\n  {}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n  "))]
    Invalid(Vec<ConfigError>),
}

fn display_dirs(dirs: &[PathBuf]) -> String {
    dirs.iter()
        .map(|d| format!("{}/modules.d", d.display()))
        .collect::<Vec<_>>()
        .join(", ")
}

fn candidate(path: PathBuf) -> BTreeMap<String, merge::Candidate> {
    BTreeMap::from([("kvcd.toml".to_owned(), merge::Candidate::new(path))])
}

/// Files found, before merging and validation.
#[derive(Default)]
struct Found {
    daemon: Vec<BTreeMap<String, merge::Candidate>>,
    modules: Vec<BTreeMap<String, merge::Candidate>>,
    errors: Vec<ConfigError>,
}

impl Found {
    fn add_dir(&mut self, dir: &Path) {
        let p = dir.join("kvcd.toml");
        if fs::symlink_metadata(&p).is_ok() {
            self.daemon.push(candidate(p));
        }
        self.add_modules_dir(&dir.join("modules.d"));
    }

    fn add_modules_dir(&mut self, md: &Path) {
        match merge::list_toml(md) {
            Ok(l) => self.modules.push(l),
            Err(e) => self
                .errors
                .push(ConfigError::file(md, format!("cannot read directory: {e}"))),
        }
    }

    fn assemble(self, dirs: &[PathBuf], overrides: &Overrides, scope: Scope) -> Config {
        self.assemble_cached(dirs, overrides, scope, &mut ConfigCache::default())
    }

    fn assemble_cached(
        self,
        dirs: &[PathBuf],
        overrides: &Overrides,
        scope: Scope,
        cache: &mut ConfigCache,
    ) -> Config {
        let mut errors = self.errors;
        let mut masked = Vec::new();

        let mut daemon = DaemonSettings::default();
        if let Some(m) = merge::merge(self.daemon).remove("kvcd.toml") {
            if m.winner.masked {
                masked.push(m.winner.path);
            } else {
                match read(&m.winner.path).and_then(|text| validate::daemon(&m.winner.path, &text))
                {
                    Ok(d) => daemon = d,
                    Err(mut e) => errors.append(&mut e),
                }
            }
        }
        if let Some(dir) = &overrides.state_dir {
            daemon.state_dir.clone_from(dir);
        }
        if let Some(dir) = &overrides.runtime_dir {
            daemon.runtime_dir.clone_from(dir);
        }

        let mut modules = BTreeMap::new();
        for (file_name, m) in merge::merge(self.modules) {
            if m.winner.masked {
                masked.push(m.winner.path);
                continue;
            }
            let stem = file_name.trim_end_matches(".toml");
            let name = match InstanceName::parse(stem) {
                Ok(n) => n,
                Err(msg) => {
                    errors.push(ConfigError::file(
                        &m.winner.path,
                        format!("file name is not a valid module config name: {msg}"),
                    ));
                    continue;
                }
            };
            let result = match cache.modules.get(&m.winner.path) {
                Some(r) => r.clone(),
                None => {
                    let r = read(&m.winner.path)
                        .and_then(|text| validate::module(&name, &m.winner.path, &text, scope));
                    cache.modules.insert(m.winner.path.clone(), r.clone());
                    r
                }
            };
            modules.insert(
                name.to_string(),
                ModuleEntry {
                    file: m.winner.path,
                    shadows: m.shadowed,
                    result,
                },
            );
        }
        // Files no longer in effect (removed, shadowed, masked) are forgotten.
        let used: BTreeSet<&PathBuf> = modules.values().map(|e| &e.file).collect();
        cache.modules.retain(|p, _| used.contains(p));
        validate::cross_check(&mut modules, scope);

        Config {
            dirs: dirs.to_vec(),
            daemon,
            errors,
            modules,
            masked,
        }
    }
}

/// Largest config file kvcd reads: 1 MiB.
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// What a non-regular file is, for error messages.
fn file_kind(t: fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt as _;
    if t.is_file() {
        "a regular file"
    } else if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a file"
    }
}

/// Reads a config file: a regular file (symlinks followed) of at most [`MAX_CONFIG_BYTES`].
///
/// The file is opened without blocking (a FIFO never waits for a writer) and
/// checked on the opened descriptor, so a device or FIFO is refused before
/// anything is read from it.
pub fn read(path: &Path) -> Result<String, Vec<ConfigError>> {
    use std::io::Read as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let fail = |msg: String| vec![ConfigError::file(path, msg)];
    let not_regular = |t: fs::FileType| {
        fail(format!(
            "not a regular file ({}); configs must be regular files",
            file_kind(t)
        ))
    };
    // A socket cannot be opened at all; say what it is rather than ENXIO.
    if let Ok(m) = fs::metadata(path) {
        if std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()) {
            return Err(not_regular(m.file_type()));
        }
    }
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| fail(format!("cannot read file: {e}")))?;
    let meta = file
        .metadata()
        .map_err(|e| fail(format!("cannot read file: {e}")))?;
    if !meta.is_file() {
        return Err(not_regular(meta.file_type()));
    }
    let mut bytes = Vec::new();
    file.take(MAX_CONFIG_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| fail(format!("cannot read file: {e}")))?;
    if bytes.len() as u64 > MAX_CONFIG_BYTES {
        return Err(fail(format!(
            "file is larger than {} MiB, the limit for a config file",
            MAX_CONFIG_BYTES >> 20
        )));
    }
    String::from_utf8(bytes).map_err(|e| {
        fail(format!(
            "expected UTF-8 text, found an invalid byte at offset {}",
            e.utf8_error().valid_up_to()
        ))
    })
}

#[cfg(test)]
mod cache_tests {
    #![allow(clippy::unwrap_used)]

    use std::collections::BTreeSet;
    use std::fs;
    use std::path::{Path, PathBuf};

    use super::{Changes, Config, ConfigCache, Overrides};

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let md = dir.join("modules.d");
        fs::create_dir_all(&md).unwrap();
        let p = md.join(format!("{name}.toml"));
        fs::write(&p, text).unwrap();
        p
    }

    fn config(module: &str, extra: &str) -> String {
        format!("{extra}modules = [\"{module}\"]\n[directory]\npath = \"/nonexistent\"\n")
    }

    fn files(paths: &[&PathBuf]) -> Changes {
        Changes::Files(paths.iter().map(|p| (*p).clone()).collect::<BTreeSet<_>>())
    }

    /// What a test compares: every module config's file and result, and the errors.
    fn shape(c: &Config) -> String {
        format!("{:?}\n{:?}\n{:?}", c.modules, c.errors, c.masked)
    }

    #[test]
    fn only_the_named_files_are_read_again() {
        let tmp = tempfile::tempdir().unwrap();
        let etc = tmp.path().join("etc");
        let dirs = vec![etc.clone()];
        let a = write(&etc, "a", &config("ma", ""));
        let b = write(&etc, "b", &config("mb", ""));
        let first = Config::load(&dirs, &Overrides::default());
        let mut cache = ConfigCache::seeded(&first);
        assert_eq!(cache.len(), 2);

        // Both files change on disk; only `a` is named.
        fs::write(&a, config("ma2", "")).unwrap();
        fs::write(&b, config("mb2", "")).unwrap();
        let c = Config::load_cached(&dirs, &Overrides::default(), &mut cache, &files(&[&a]));
        let modules = |c: &Config, n: &str| c.module(n).unwrap().modules[0].to_string();
        assert_eq!(modules(&c, "a"), "ma2");
        assert_eq!(modules(&c, "b"), "mb");

        // Naming `b` too, or everything, reads what is on disk: as Config::load does.
        let c = Config::load_cached(&dirs, &Overrides::default(), &mut cache, &files(&[&b]));
        assert_eq!(modules(&c, "b"), "mb2");
        let full = Config::load(&dirs, &Overrides::default());
        assert_eq!(shape(&c), shape(&full));
        fs::write(&a, config("ma3", "")).unwrap();
        let c = Config::load_cached(&dirs, &Overrides::default(), &mut cache, &Changes::All);
        assert_eq!(modules(&c, "a"), "ma3");
    }

    #[test]
    fn checks_across_files_are_made_again() {
        let tmp = tempfile::tempdir().unwrap();
        let etc = tmp.path().join("etc");
        let dirs = vec![etc.clone()];
        let a = write(&etc, "a", &config("ma", ""));
        write(&etc, "b", &config("mb", "after = [\"a\"]\n"));
        let mut cache = ConfigCache::seeded(&Config::load(&dirs, &Overrides::default()));

        // `a` removed: it is gone, and `b` (not read again) now names a missing config.
        fs::remove_file(&a).unwrap();
        let c = Config::load_cached(&dirs, &Overrides::default(), &mut cache, &files(&[&a]));
        assert!(!c.modules.contains_key("a"));
        let err = super::join_errors(c.modules["b"].result.as_ref().unwrap_err());
        assert!(
            err.contains("key `after`") && err.contains("\"a\""),
            "{err}"
        );
        assert_eq!(
            shape(&c),
            shape(&Config::load(&dirs, &Overrides::default()))
        );
        assert_eq!(cache.len(), 1);

        // `a` back, loading what `b` loads: both are told, `b` still from the cache.
        write(&etc, "a", &config("mb", ""));
        let c = Config::load_cached(&dirs, &Overrides::default(), &mut cache, &files(&[&a]));
        for n in ["a", "b"] {
            let err = super::join_errors(c.modules[n].result.as_ref().unwrap_err());
            assert!(err.contains("mb"), "{n}: {err}");
        }
        assert_eq!(
            shape(&c),
            shape(&Config::load(&dirs, &Overrides::default()))
        );
    }

    #[test]
    fn an_invalid_edit_names_file_and_key_as_a_full_read_does() {
        let tmp = tempfile::tempdir().unwrap();
        let etc = tmp.path().join("etc");
        let dirs = vec![etc.clone()];
        let a = write(&etc, "a", &config("ma", ""));
        write(&etc, "b", &config("mb", ""));
        let mut cache = ConfigCache::seeded(&Config::load(&dirs, &Overrides::default()));
        fs::write(&a, "modules = \"ma\"\n[directory]\npath = \"/x\"\n").unwrap();
        let c = Config::load_cached(&dirs, &Overrides::default(), &mut cache, &files(&[&a]));
        let err = super::join_errors(c.modules["a"].result.as_ref().unwrap_err());
        assert!(
            err.contains(&a.display().to_string()) && err.contains("key `modules`"),
            "{err}"
        );
        assert!(c.modules["b"].result.is_ok());
        assert_eq!(
            shape(&c),
            shape(&Config::load(&dirs, &Overrides::default()))
        );
    }

    #[test]
    fn a_removed_override_uncovers_the_file_it_shadowed() {
        let tmp = tempfile::tempdir().unwrap();
        let (usr, etc) = (tmp.path().join("usr"), tmp.path().join("etc"));
        let dirs = vec![usr.clone(), etc.clone()];
        write(&usr, "a", &config("from_usr", ""));
        let over = write(&etc, "a", &config("from_etc", ""));
        let mut cache = ConfigCache::seeded(&Config::load(&dirs, &Overrides::default()));
        let name = |c: &Config| c.module("a").unwrap().modules[0].to_string();

        // Masked: gone.
        fs::remove_file(&over).unwrap();
        std::os::unix::fs::symlink("/dev/null", &over).unwrap();
        let c = Config::load_cached(&dirs, &Overrides::default(), &mut cache, &files(&[&over]));
        assert!(!c.modules.contains_key("a"));
        assert_eq!(c.masked, std::slice::from_ref(&over));

        // The mask removed: the lower file is read.
        fs::remove_file(&over).unwrap();
        let c = Config::load_cached(&dirs, &Overrides::default(), &mut cache, &files(&[&over]));
        assert_eq!(name(&c), "from_usr");
        assert_ne!(cache.len(), 0);
    }

    #[test]
    fn changes_add_up() {
        let mut c = Changes::Files(BTreeSet::from([PathBuf::from("/a")]));
        c.add(Changes::Files(BTreeSet::from([PathBuf::from("/b")])));
        assert_eq!(
            c,
            Changes::Files(BTreeSet::from([PathBuf::from("/a"), PathBuf::from("/b")]))
        );
        c.add(Changes::All);
        assert_eq!(c, Changes::All);
        c.add(Changes::Files(BTreeSet::new()));
        assert_eq!(c, Changes::All);
    }
}
