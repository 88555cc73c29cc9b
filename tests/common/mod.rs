//! Shared pieces of the host integration tests: the fixture modules built by
//! `scripts/fixtures`, and a fake kernel behind the `KernelModules` trait
//! (this host cannot load modules; the VM tests load them for real).

#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::Result;
use kvcd::kmod::{
    InitState, KernelModules, KmodError, KmodOp, LiveModule, ModInfo, ModName, ModuleFile,
    ModuleIdentity,
};
use nix::errno::Errno;

/// The variables a setup script exports: the environment when it has `key`,
/// else the script's env file under the repository (`run` says which script).
pub fn env_file(key: &str, file: &str, run: &str) -> BTreeMap<String, String> {
    let mut vars: BTreeMap<String, String> = std::env::vars().collect();
    if !vars.contains_key(key) {
        vars.extend(read_env_file(file, run));
    }
    vars
}

/// The `export K=V` lines of the repository's `file` (written by the script `run`).
pub fn read_env_file(file: &str, run: &str) -> BTreeMap<String, String> {
    let env = Path::new(env!("CARGO_MANIFEST_DIR")).join(file);
    let text = std::fs::read_to_string(&env)
        .unwrap_or_else(|_| panic!("test setup missing: run {run} first (no {})", env.display()));
    text.lines()
        .filter_map(|line| line.trim_start_matches("export ").split_once('='))
        .map(|(k, v)| (k.to_owned(), v.trim_matches(['"', '\'']).to_owned()))
        .collect()
}

/// Tests of one binary that use podman's local storage take turns.
pub fn podman_lock() -> std::sync::MutexGuard<'static, ()> {
    static PODMAN: Mutex<()> = Mutex::new(());
    PODMAN
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The variables `scripts/images` prints (registries, image references, build context).
pub fn images_env() -> BTreeMap<String, String> {
    env_file(
        "KVCD_IMAGE_TAG",
        "target/images/env",
        "scripts/registry start and scripts/images",
    )
}

/// Paths from `scripts/fixtures` (environment, or `target/fixtures/env`).
#[derive(Debug, Clone)]
pub struct Fixtures {
    /// Kernel release the modules were built for.
    pub kver: String,
    /// `ko/` and `bad-vermagic/` live here.
    pub dir: PathBuf,
    /// Unpacked Debian kernel: `lib/modules/KVER/...`.
    pub kernel_root: PathBuf,
}

impl Fixtures {
    pub fn get() -> Self {
        let vars = env_file("KVCD_FIXTURES", "target/fixtures/env", "scripts/fixtures");
        let get = |k: &str| {
            vars.get(k)
                .cloned()
                .unwrap_or_else(|| panic!("{k} not set"))
        };
        Self {
            kver: get("KVCD_KVER"),
            dir: get("KVCD_FIXTURES").into(),
            kernel_root: get("KVCD_KERNEL_ROOT").into(),
        }
    }

    /// The directory of good fixture modules.
    pub fn ko(&self) -> PathBuf {
        self.dir.join("ko")
    }

    /// The host-style `…/lib/modules` directory of the unpacked kernel.
    pub fn modules_dir(&self) -> PathBuf {
        self.kernel_root.join("lib/modules")
    }
}

#[derive(Debug, Clone)]
struct FakeModule {
    path: PathBuf,
    depends: Vec<ModName>,
    params: Vec<String>,
    /// References not from other modules (open files, devices).
    extra_refs: i32,
}

/// A kernel in memory: modules, their users, and an operation log.
#[derive(Debug, Default)]
pub struct FakeKernel {
    mods: Mutex<BTreeMap<ModName, FakeModule>>,
    /// Every insert/remove, e.g. `insert kvcd_base`.
    pub log: Mutex<Vec<String>>,
    /// Fail inserting this module with this errno.
    pub fail_insert: Mutex<Option<(ModName, Errno)>>,
    /// `firmware_class.path`.
    pub firmware_path: Mutex<String>,
}

/// The stored files of the module set of (`config`, `kernel`) in `state`: module name → file.
pub fn module_set(state: &Path, config: &str, kernel: &str) -> BTreeMap<String, PathBuf> {
    use kvcd::state::Layout;
    let set = kvcd::state::set::read(&Layout::set_file(state, config, kernel))
        .unwrap()
        .unwrap_or_else(|| panic!("no module set for {config} on {kernel}"));
    let files = Layout::files_dir(state);
    set.files
        .into_iter()
        .map(|(n, f)| (n, files.join(f.file)))
        .collect()
}

/// Every file under `dir` whose name starts with `prefix`.
pub fn files_named(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(p);
            } else if e.file_name().to_string_lossy().starts_with(prefix) {
                out.push(p);
            }
        }
    }
    out
}

pub fn m(name: &str) -> ModName {
    ModName::parse(name).unwrap()
}

impl FakeKernel {
    /// Puts a module in as if someone else had loaded it.
    pub fn preload(&self, name: &str, path: &Path, depends: &[&str]) {
        self.preload_with(name, path, depends, &[]);
    }

    /// Like `preload`, with parameter values.
    pub fn preload_with(&self, name: &str, path: &Path, depends: &[&str], params: &[&str]) {
        self.mods.lock().unwrap().insert(
            m(name),
            FakeModule {
                path: path.to_owned(),
                depends: depends.iter().map(|d| m(d)).collect(),
                params: params.iter().map(|p| (*p).to_owned()).collect(),
                extra_refs: 0,
            },
        );
    }

    /// Adds a reference that is not a module (like an open device).
    pub fn hold(&self, name: &str) {
        self.mods
            .lock()
            .unwrap()
            .get_mut(&m(name))
            .unwrap()
            .extra_refs += 1;
    }

    /// Drops a reference added by `hold`.
    pub fn release(&self, name: &str) {
        self.mods
            .lock()
            .unwrap()
            .get_mut(&m(name))
            .unwrap()
            .extra_refs -= 1;
    }

    pub fn is_live(&self, name: &str) -> bool {
        self.mods.lock().unwrap().contains_key(&m(name))
    }

    pub fn path_of(&self, name: &str) -> Option<PathBuf> {
        self.mods
            .lock()
            .unwrap()
            .get(&m(name))
            .map(|f| f.path.clone())
    }

    pub fn params_of(&self, name: &str) -> Vec<String> {
        self.mods.lock().unwrap()[&m(name)].params.clone()
    }

    pub fn take_log(&self) -> Vec<String> {
        std::mem::take(&mut *self.log.lock().unwrap())
    }
}

impl KernelModules for FakeKernel {
    fn live(&self, name: &ModName) -> Result<Option<LiveModule>> {
        let mods = self.mods.lock().unwrap();
        let Some(me) = mods.get(name) else {
            return Ok(None);
        };
        let holders: Vec<ModName> = mods
            .iter()
            .filter(|(_, f)| f.depends.contains(name))
            .map(|(n, _)| n.clone())
            .collect();
        Ok(Some(LiveModule {
            state: InitState::Live,
            refcount: i32::try_from(holders.len()).unwrap() + me.extra_refs,
            holders,
        }))
    }

    fn insert(&self, file: &ModuleFile, params: &[String]) -> Result<(), KmodError> {
        let err = |e| KmodError::new(KmodOp::Insert, &file.name, e);
        if let Some((n, e)) = &*self.fail_insert.lock().unwrap() {
            if *n == file.name {
                return Err(err(*e));
            }
        }
        if self.is_live(file.name.as_str()) {
            return Err(err(Errno::EEXIST));
        }
        let info = ModInfo::read(&file.path).map_err(|_| err(Errno::ENOEXEC))?;
        let depends: Vec<ModName> = info.depends.iter().map(|d| m(d)).collect();
        if let Some(missing) = depends.iter().find(|d| !self.is_live(d.as_str())) {
            // The kernel reports an unresolved symbol this way.
            let _ = missing;
            return Err(err(Errno::ENOENT));
        }
        self.mods.lock().unwrap().insert(
            file.name.clone(),
            FakeModule {
                path: file.path.clone(),
                depends,
                params: params.to_vec(),
                extra_refs: 0,
            },
        );
        self.log
            .lock()
            .unwrap()
            .push(format!("insert {}", file.name));
        Ok(())
    }

    fn identity(&self, name: &ModName) -> ModuleIdentity {
        // What the kernel would show: the identity of the file it was loaded from.
        let path = self.path_of(name.as_str());
        path.and_then(|p| ModuleIdentity::of_file(&p).ok())
            .unwrap_or_default()
    }

    fn parameter(&self, name: &ModName, key: &str) -> Option<String> {
        let mods = self.mods.lock().unwrap();
        let f = mods.get(name)?;
        f.params.iter().find_map(|p| {
            let (k, v) = p.split_once('=')?;
            (k == key).then(|| v.to_owned())
        })
    }

    fn firmware_search_path(&self) -> Option<String> {
        Some(self.firmware_path.lock().unwrap().clone())
    }

    fn set_firmware_search_path(&self, path: &Path) -> Result<()> {
        *self.firmware_path.lock().unwrap() = path.display().to_string();
        Ok(())
    }

    fn remove(&self, name: &ModName, _force: bool) -> Result<(), KmodError> {
        let live = self.live(name).unwrap();
        match live {
            None => Err(KmodError::new(KmodOp::Remove, name, Errno::ENOENT)),
            Some(l) if l.refcount > 0 => Err(KmodError::new(KmodOp::Remove, name, Errno::EAGAIN)),
            Some(_) => {
                self.mods.lock().unwrap().remove(name);
                self.log.lock().unwrap().push(format!("remove {name}"));
                Ok(())
            }
        }
    }
}

/// A fake kernel shared between threads (the daemon's blocking pool and the test).
#[derive(Debug, Clone, Default)]
pub struct SharedFake(pub Arc<FakeKernel>);

impl KernelModules for SharedFake {
    fn live(&self, name: &ModName) -> Result<Option<LiveModule>> {
        self.0.live(name)
    }
    fn insert(&self, file: &ModuleFile, params: &[String]) -> Result<(), KmodError> {
        self.0.insert(file, params)
    }
    fn remove(&self, name: &ModName, force: bool) -> Result<(), KmodError> {
        self.0.remove(name, force)
    }
    fn identity(&self, name: &ModName) -> ModuleIdentity {
        self.0.identity(name)
    }
    fn parameter(&self, name: &ModName, key: &str) -> Option<String> {
        self.0.parameter(name, key)
    }
    fn firmware_search_path(&self) -> Option<String> {
        self.0.firmware_search_path()
    }
    fn set_firmware_search_path(&self, path: &Path) -> Result<()> {
        self.0.set_firmware_search_path(path)
    }
}

/// A "registry" on 127.0.0.1 that accepts connections and never says a word;
/// returns its port. It lives as long as the test process.
pub fn silent_registry() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in listener.incoming() {
            held.push(s);
        }
    });
    port
}

/// Runs a command, panicking with its output when it fails; returns stdout.
pub fn run(cmd: &mut std::process::Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A self-signed key and certificate made by the openssl CLI: `KEY.pem`
/// (mode 0600) and `KEY.der`/`KEY.crt` (DER and PEM certificate).
pub fn make_key(dir: &Path, name: &str, cn: &str, newkey: &str) -> (PathBuf, PathBuf) {
    let key = dir.join(format!("{name}.pem"));
    let der = dir.join(format!("{name}.der"));
    run(std::process::Command::new("openssl")
        .args(["req", "-new", "-x509", "-nodes", "-days", "3650"])
        .args([
            "-newkey",
            newkey,
            "-subj",
            &format!("/CN={cn}/"),
            "-addext",
            "extendedKeyUsage=codeSigning",
        ])
        .arg("-keyout")
        .arg(&key)
        .args(["-outform", "DER", "-out"])
        .arg(&der));
    std::fs::set_permissions(
        &key,
        <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o600),
    )
    .unwrap();
    run(std::process::Command::new("openssl")
        .args(["x509", "-inform", "DER", "-in"])
        .arg(&der)
        .arg("-out")
        .arg(dir.join(format!("{name}.crt"))));
    (key, der)
}
