//! The kernels the node may boot next, each with the module tree it will
//! boot with.
//!
//! Two kinds of host:
//! - **package hosts**: kernels installed beside the running one under
//!   `kernel_modules_dir` (`/usr/lib/modules`); the newest boots next when it
//!   is not the running one (the boot loaders' default), the others are
//!   fallbacks.
//! - **ostree hosts** (Fedora/RHEL CoreOS, bootc): every deployment under
//!   `SYSROOT/ostree/deploy/STATEROOT/deploy/CHECKSUM.SERIAL/` carries its own
//!   `usr/lib/modules/KERNEL/`. A staged deployment (named in
//!   `/run/ostree/staged-deployment`, written into the boot loader only at
//!   shutdown) boots next; else the default boot entry (the highest
//!   `version` in `/boot/loader/entries`) when it is not the booted one. The
//!   other deployments are fallbacks (rollback).
//!
//! [`plan`] decides from what was read; [`discover`] reads the host.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::kernel::{KernelRelease, compare_releases, installed_kernels};

/// Whether the node boots a kernel next or only may (a fallback).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// What the node boots on its next reboot.
    Next,
    /// Bootable, but only if chosen (an older kernel, a rollback deployment).
    Fallback,
}

impl Role {
    /// The role as shown (`next`, `fallback`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Next => "next",
            Self::Fallback => "fallback",
        }
    }
}

/// Where a kernel was found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Origin {
    /// Installed under the host's module directory.
    Package,
    /// The kernel of an ostree deployment.
    Ostree {
        /// The deployment's stateroot (osname).
        stateroot: String,
        /// `CHECKSUM.SERIAL`.
        deployment: String,
        /// Staged: written into the boot loader at shutdown.
        staged: bool,
        /// The boot loader's default entry.
        default: bool,
    },
}

/// A kernel the node may boot next.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NextKernel {
    /// Its release.
    pub release: KernelRelease,
    /// The directory holding its `RELEASE/` module tree.
    pub modules_dir: PathBuf,
    /// Boots next, or may.
    pub role: Role,
    /// Where it was found.
    pub origin: Origin,
}

impl NextKernel {
    /// Where it comes from, for people: `package`, `ostree fedora 3f2a…0 (staged)`.
    pub fn describe(&self) -> String {
        match &self.origin {
            Origin::Package => format!("package ({})", self.modules_dir.display()),
            Origin::Ostree {
                stateroot,
                deployment,
                staged,
                default,
            } => {
                let short = match deployment.split_once('.') {
                    Some((c, serial)) => format!("{}…{serial}", &c[..c.len().min(12)]),
                    None => deployment.clone(),
                };
                let how = match (staged, default) {
                    (true, _) => " (staged)",
                    (false, true) => " (default boot entry)",
                    (false, false) => " (rollback)",
                };
                format!("ostree deployment {stateroot}/{short}{how}")
            }
        }
    }
}

/// An ostree deployment as read from disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deployment {
    /// Stateroot (osname).
    pub stateroot: String,
    /// `CHECKSUM.SERIAL`.
    pub id: String,
    /// The deployment's root directory.
    pub dir: PathBuf,
    /// Kernels with a module tree in `dir/usr/lib/modules`.
    pub kernels: Vec<KernelRelease>,
}

impl Deployment {
    /// The commit checksum (the id without its serial).
    pub fn checksum(&self) -> &str {
        self.id.split_once('.').map_or(&self.id, |(c, _)| c)
    }
}

/// What [`discover`] read from a host, and what [`plan`] decides from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostView {
    /// The running kernel.
    pub running: Option<KernelRelease>,
    /// Kernels installed in the host's own module directory.
    pub packages: Vec<KernelRelease>,
    /// The host's module directory.
    pub packages_dir: PathBuf,
    /// Every ostree deployment.
    pub deployments: Vec<Deployment>,
    /// Deployments the boot loader entries name, as (stateroot, id), default first.
    pub entries: Vec<(String, String)>,
    /// The booted deployment, as (stateroot, id).
    pub booted: Option<(String, String)>,
    /// The content of `/run/ostree/staged-deployment`, if it exists.
    pub staged_marker: Option<Vec<u8>>,
}

/// The kernels found and what was noticed on the way.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Discovery {
    /// Next first, then fallbacks; newest first within each.
    pub kernels: Vec<NextKernel>,
    /// What was skipped, and why.
    pub notes: Vec<String>,
}

/// Decides which kernels the node may boot next from what was read.
pub fn plan(view: &HostView) -> Discovery {
    let mut out = Discovery::default();
    let running = view.running.as_ref();
    // release → kernel; an ostree deployment's tree wins over the host's own
    // directory, a `next` over a fallback.
    let mut found: BTreeMap<KernelRelease, NextKernel> = BTreeMap::new();
    let mut add = |k: NextKernel, notes: &mut Vec<String>| {
        if Some(&k.release) == running {
            return;
        }
        match found.get(&k.release) {
            Some(old) if old.role <= k.role => {
                if old.role == k.role && old.modules_dir != k.modules_dir {
                    notes.push(format!(
                        "kernel {} is also in {}; using {}",
                        k.release,
                        k.describe(),
                        old.describe()
                    ));
                }
            }
            _ => {
                found.insert(k.release.clone(), k);
            }
        }
    };

    let booted = view.booted.as_ref();
    let staged: Vec<&Deployment> = match &view.staged_marker {
        Some(marker) => view
            .deployments
            .iter()
            .filter(|d| {
                !view.entries.contains(&(d.stateroot.clone(), d.id.clone()))
                    && contains(marker, d.checksum().as_bytes())
            })
            .collect(),
        None => Vec::new(),
    };
    for d in &view.deployments {
        let key = (d.stateroot.clone(), d.id.clone());
        if booted == Some(&key) {
            continue;
        }
        let is_staged = staged
            .iter()
            .any(|s| s.id == d.id && s.stateroot == d.stateroot);
        let is_default = view.entries.first() == Some(&key);
        let in_entries = view.entries.contains(&key);
        if !is_staged && !in_entries {
            out.notes.push(format!(
                "ostree deployment {}/{} is neither staged nor in the boot loader entries: skipped",
                d.stateroot, d.id
            ));
            continue;
        }
        // A staged deployment boots next; without one, the default entry does.
        let role = if is_staged || (is_default && staged.is_empty()) {
            Role::Next
        } else {
            Role::Fallback
        };
        if d.kernels.is_empty() {
            out.notes.push(format!(
                "ostree deployment {}/{} has no kernel module tree in {}: skipped",
                d.stateroot,
                d.id,
                d.dir.join("usr/lib/modules").display()
            ));
        }
        for k in &d.kernels {
            add(
                NextKernel {
                    release: k.clone(),
                    modules_dir: d.dir.join("usr/lib/modules"),
                    role,
                    origin: Origin::Ostree {
                        stateroot: d.stateroot.clone(),
                        deployment: d.id.clone(),
                        staged: is_staged,
                        default: is_default,
                    },
                },
                &mut out.notes,
            );
        }
    }

    // Package hosts: the newest kernel is the boot loaders' default.
    let newest = view
        .packages
        .iter()
        .max_by(|a, b| compare_releases(a.as_str(), b.as_str()));
    for k in &view.packages {
        let role = if Some(k) == newest {
            Role::Next
        } else {
            Role::Fallback
        };
        add(
            NextKernel {
                release: k.clone(),
                modules_dir: view.packages_dir.clone(),
                role,
                origin: Origin::Package,
            },
            &mut out.notes,
        );
    }

    let mut kernels: Vec<NextKernel> = found.into_values().collect();
    kernels.sort_by(|a, b| {
        a.role
            .cmp(&b.role)
            .then_with(|| compare_releases(b.release.as_str(), a.release.as_str()))
    });
    out.kernels = kernels;
    out
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// `path` inside `sysroot` (`path` is absolute on the node).
pub fn in_sysroot(sysroot: &Path, path: &Path) -> PathBuf {
    sysroot.join(path.strip_prefix("/").unwrap_or(path))
}

/// Reads the host under `sysroot` (`/` for the node itself) and decides.
/// The booted deployment is known only when `sysroot` is `/` (from the
/// `ostree=` argument of the running kernel's command line).
pub fn discover(sysroot: &Path, kernel_modules_dir: &Path, running: &KernelRelease) -> Discovery {
    let view = read_host(sysroot, kernel_modules_dir, running);
    plan(&view)
}

/// Reads what [`plan`] needs from the host under `sysroot`.
pub fn read_host(sysroot: &Path, kernel_modules_dir: &Path, running: &KernelRelease) -> HostView {
    let packages_dir = in_sysroot(sysroot, kernel_modules_dir);
    let deploy_root = sysroot.join("ostree/deploy");
    let booted = if sysroot == Path::new("/") {
        fs::read_to_string("/proc/cmdline")
            .ok()
            .and_then(|c| ostree_arg(&c).map(str::to_owned))
            .and_then(|arg| deployment_of(&deploy_root, &in_sysroot(sysroot, Path::new(&arg))))
    } else {
        None
    };
    HostView {
        running: Some(running.clone()),
        packages: installed_kernels(&packages_dir),
        packages_dir,
        deployments: read_deployments(&deploy_root),
        entries: read_entries(sysroot, &deploy_root),
        booted,
        staged_marker: fs::read(sysroot.join("run/ostree/staged-deployment")).ok(),
    }
}

/// The value of `ostree=` on a kernel command line.
pub fn ostree_arg(cmdline: &str) -> Option<&str> {
    cmdline
        .split_ascii_whitespace()
        .find_map(|a| a.strip_prefix("ostree="))
}

/// True for a deployment directory name, `CHECKSUM.SERIAL` (64 hex digits).
fn is_deployment_id(name: &str) -> bool {
    name.split_once('.').is_some_and(|(c, s)| {
        c.len() == 64
            && c.bytes().all(|b| b.is_ascii_hexdigit())
            && !s.is_empty()
            && s.bytes().all(|b| b.is_ascii_digit())
    })
}

fn sorted_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// Every deployment under `deploy_root` (`SYSROOT/ostree/deploy`).
pub fn read_deployments(deploy_root: &Path) -> Vec<Deployment> {
    let mut out = Vec::new();
    for stateroot in sorted_names(deploy_root) {
        let dir = deploy_root.join(&stateroot).join("deploy");
        for id in sorted_names(&dir) {
            let path = dir.join(&id);
            if !is_deployment_id(&id) || !path.is_dir() {
                continue;
            }
            out.push(Deployment {
                stateroot: stateroot.clone(),
                kernels: installed_kernels(&path.join("usr/lib/modules")),
                id,
                dir: path,
            });
        }
    }
    out
}

/// The deployment a boot path (`/ostree/boot.N/OS/BOOTCSUM/SERIAL`, a
/// symlink chain into `deploy_root`) leads to, as (stateroot, id).
fn deployment_of(deploy_root: &Path, boot_path: &Path) -> Option<(String, String)> {
    let target = fs::canonicalize(boot_path).ok()?;
    let root = fs::canonicalize(deploy_root).ok()?;
    let rel = target.strip_prefix(&root).ok()?;
    let parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    match parts.as_slice() {
        [stateroot, deploy, id] if deploy == "deploy" && is_deployment_id(id) => {
            Some((stateroot.clone(), id.clone()))
        }
        _ => None,
    }
}

/// One boot loader entry (Boot Loader Specification type 1): its `version`
/// and its `ostree=` argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootEntry {
    /// The `version` key (ostree writes integers; the highest is the default).
    pub version: String,
    /// The `ostree=` argument of `options`, if any.
    pub ostree: Option<String>,
}

/// Parses a boot loader entry's text.
pub fn parse_entry(text: &str) -> BootEntry {
    let mut version = String::new();
    let mut ostree = None;
    for line in text.lines() {
        let line = line.trim();
        let (key, value) = line
            .split_once(char::is_whitespace)
            .map_or((line, ""), |(k, v)| (k, v.trim()));
        match key {
            "version" => value.clone_into(&mut version),
            "options" => {
                if let Some(a) = ostree_arg(value) {
                    ostree = Some(a.to_owned());
                }
            }
            _ => {}
        }
    }
    BootEntry { version, ostree }
}

/// The deployments the boot loader entries under `sysroot/boot/loader/entries`
/// name, default (highest version) first.
fn read_entries(sysroot: &Path, deploy_root: &Path) -> Vec<(String, String)> {
    let dir = sysroot.join("boot/loader/entries");
    let mut entries: Vec<BootEntry> = sorted_names(&dir)
        .into_iter()
        .filter(|n| n.ends_with(".conf"))
        .filter_map(|n| fs::read_to_string(dir.join(n)).ok())
        .map(|t| parse_entry(&t))
        .collect();
    entries.sort_by(|a, b| compare_releases(&b.version, &a.version));
    entries
        .iter()
        .filter_map(|e| e.ostree.as_deref())
        .filter_map(|arg| deployment_of(deploy_root, &in_sysroot(sysroot, Path::new(arg))))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(s: &str) -> KernelRelease {
        KernelRelease::parse(s).unwrap()
    }

    fn id(n: char, serial: u32) -> String {
        format!("{}.{serial}", n.to_string().repeat(64))
    }

    fn dep(n: char, kernel: &str) -> Deployment {
        Deployment {
            stateroot: "fcos".into(),
            id: id(n, 0),
            dir: PathBuf::from(format!("/sysroot/ostree/deploy/fcos/deploy/{}", id(n, 0))),
            kernels: vec![k(kernel)],
        }
    }

    fn key(n: char) -> (String, String) {
        ("fcos".into(), id(n, 0))
    }

    fn summary(d: &Discovery) -> Vec<(String, Role)> {
        d.kernels
            .iter()
            .map(|n| (n.release.to_string(), n.role))
            .collect()
    }

    #[test]
    fn package_host_newest_boots_next_others_are_fallbacks_running_is_left_out() {
        let view = HostView {
            running: Some(k("6.1.0-50-amd64")),
            packages: vec![k("6.1.0-9-amd64"), k("6.1.0-50-amd64"), k("6.1.0-57-amd64")],
            packages_dir: "/usr/lib/modules".into(),
            ..HostView::default()
        };
        let d = plan(&view);
        assert_eq!(
            summary(&d),
            [
                ("6.1.0-57-amd64".to_owned(), Role::Next),
                ("6.1.0-9-amd64".to_owned(), Role::Fallback)
            ]
        );
        assert_eq!(d.kernels[0].modules_dir, Path::new("/usr/lib/modules"));
        assert_eq!(d.kernels[0].origin, Origin::Package);
    }

    #[test]
    fn package_host_running_the_newest_has_nothing_next() {
        let view = HostView {
            running: Some(k("6.1.0-57-amd64")),
            packages: vec![k("6.1.0-50-amd64"), k("6.1.0-57-amd64")],
            ..HostView::default()
        };
        assert_eq!(
            summary(&plan(&view)),
            [("6.1.0-50-amd64".to_owned(), Role::Fallback)]
        );
    }

    #[test]
    fn ostree_pending_default_boots_next_the_booted_is_skipped_rollback_is_fallback() {
        // Entries: b (default, not booted), a (booted); c is an old rollback.
        let view = HostView {
            running: Some(k("6.1.0-50-amd64")),
            packages: vec![k("6.1.0-50-amd64")],
            deployments: vec![
                dep('a', "6.1.0-50-amd64"),
                dep('b', "6.12.9-amd64"),
                dep('c', "6.1.0-47-amd64"),
            ],
            entries: vec![key('b'), key('a'), key('c')],
            booted: Some(key('a')),
            ..HostView::default()
        };
        let d = plan(&view);
        assert_eq!(
            summary(&d),
            [
                ("6.12.9-amd64".to_owned(), Role::Next),
                ("6.1.0-47-amd64".to_owned(), Role::Fallback)
            ]
        );
        assert_eq!(
            d.kernels[0].modules_dir,
            dep('b', "x").dir.join("usr/lib/modules")
        );
        assert!(d.kernels[0].describe().contains("(default boot entry)"));
        assert!(d.kernels[1].describe().contains("(rollback)"));
    }

    #[test]
    fn ostree_staged_deployment_boots_next_and_the_default_becomes_a_fallback() {
        let mut marker = b"\0\0target\0\0(ss)".to_vec();
        marker.extend_from_slice(id('s', 0).split('.').next().unwrap().as_bytes());
        let view = HostView {
            running: Some(k("6.1.0-50-amd64")),
            deployments: vec![
                dep('a', "6.1.0-50-amd64"),
                dep('s', "6.12.9-amd64"),
                dep('c', "6.1.0-47-amd64"),
                // On disk, in no entry, not in the marker: left over.
                dep('z', "6.13.0-amd64"),
            ],
            entries: vec![key('a'), key('c')],
            booted: Some(key('a')),
            staged_marker: Some(marker),
            ..HostView::default()
        };
        let d = plan(&view);
        assert_eq!(
            summary(&d),
            [
                ("6.12.9-amd64".to_owned(), Role::Next),
                ("6.1.0-47-amd64".to_owned(), Role::Fallback)
            ]
        );
        assert!(d.kernels[0].describe().contains("(staged)"));
        assert!(
            d.notes
                .iter()
                .any(|n| n.contains(&id('z', 0)) && n.contains("skipped")),
            "{:?}",
            d.notes
        );
    }

    #[test]
    fn ostree_booted_default_and_same_kernel_elsewhere_give_nothing_next() {
        // The rollback has the running kernel: nothing to prepare for it.
        let view = HostView {
            running: Some(k("6.1.0-50-amd64")),
            deployments: vec![dep('a', "6.1.0-50-amd64"), dep('b', "6.1.0-50-amd64")],
            entries: vec![key('a'), key('b')],
            booted: Some(key('a')),
            ..HostView::default()
        };
        assert!(plan(&view).kernels.is_empty());
    }

    #[test]
    fn ostree_tree_wins_over_the_host_directory_for_the_same_release() {
        let view = HostView {
            running: Some(k("6.1.0-50-amd64")),
            packages: vec![k("6.12.9-amd64")],
            packages_dir: "/usr/lib/modules".into(),
            deployments: vec![dep('b', "6.12.9-amd64")],
            entries: vec![key('b')],
            ..HostView::default()
        };
        let d = plan(&view);
        assert_eq!(d.kernels.len(), 1);
        assert!(matches!(d.kernels[0].origin, Origin::Ostree { .. }));
    }

    #[test]
    fn entries_parse_version_and_ostree_argument() {
        let e = parse_entry(
            "title Fedora CoreOS 41 (ostree:0)\nversion 2\noptions rw ostree=/ostree/boot.1/fedora-coreos/abc/0 console=ttyS0\nlinux /ostree/x/vmlinuz\n",
        );
        assert_eq!(e.version, "2");
        assert_eq!(
            e.ostree.as_deref(),
            Some("/ostree/boot.1/fedora-coreos/abc/0")
        );
        assert_eq!(parse_entry("title x\n").ostree, None);
        assert_eq!(
            ostree_arg("BOOT_IMAGE=/x ostree=/ostree/boot.0/os/c/1 quiet"),
            Some("/ostree/boot.0/os/c/1")
        );
        assert!(is_deployment_id(&id('a', 12)));
        assert!(!is_deployment_id(&format!("{}.0.origin", "a".repeat(64))));
        assert!(!is_deployment_id("abc.0"));
    }

    #[test]
    fn boot_paths_resolve_through_their_symlinks_into_the_deploy_root() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("ostree/deploy/os/deploy").join(id('c', 1));
        fs::create_dir_all(&d).unwrap();
        let b = t.path().join("ostree/boot.0.1/os/bootcsum");
        fs::create_dir_all(&b).unwrap();
        std::os::unix::fs::symlink(
            format!("../../../deploy/os/deploy/{}", id('c', 1)),
            b.join("1"),
        )
        .unwrap();
        std::os::unix::fs::symlink("boot.0.1", t.path().join("ostree/boot.0")).unwrap();
        let root = t.path().join("ostree/deploy");
        assert_eq!(
            deployment_of(
                &root,
                &in_sysroot(t.path(), Path::new("/ostree/boot.0/os/bootcsum/1"))
            ),
            Some(("os".to_owned(), id('c', 1)))
        );
        assert_eq!(
            deployment_of(
                &root,
                &in_sysroot(t.path(), Path::new("/ostree/boot.0/os/bootcsum/9"))
            ),
            None
        );
    }
}
