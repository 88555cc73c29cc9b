//! `kvcd prepare-next --sysroot` against a sysroot made by the real `ostree`
//! CLI: two deployments, the newer one (the default boot entry, not booted)
//! carrying the real Debian module tree of the fixtures' kernel. kvcd must
//! find that kernel inside the deployment and prepare a driver with an
//! in-tree dependency against the deployment's own tree, while the host's
//! own module directory has no kernel at all.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::process::Command;

use common::{Fixtures, run as sh};

/// Commits `tree` to the sysroot's repo on `testos/x` and deploys it.
fn deploy(sysroot: &Path, tree: &Path) {
    sh(Command::new("ostree")
        .arg(format!("--repo={}", sysroot.join("ostree/repo").display()))
        .args(["commit", "-b", "testos/x"])
        .arg(format!("--tree=dir={}", tree.display())));
    sh(Command::new("ostree")
        .args(["admin", "deploy", "--os=testos"])
        .arg(format!("--sysroot={}", sysroot.display()))
        .arg("testos/x"));
}

/// An OS tree with `usr/lib/modules/RELEASE` holding `modules` (a real tree) or only a kernel image.
fn os_tree(dir: &Path, release: &str, modules: Option<&Path>) {
    let m = dir.join("usr/lib/modules").join(release);
    std::fs::create_dir_all(dir.join("usr/etc")).unwrap();
    std::fs::create_dir_all(dir.join("usr/lib/modules")).unwrap();
    std::fs::write(dir.join("usr/lib/os-release"), "ID=testos\n").unwrap();
    std::fs::write(dir.join("usr/etc/os-release"), "ID=testos\n").unwrap();
    match modules {
        Some(src) => sh(Command::new("cp").arg("-a").arg(src).arg(&m)),
        // A tree whose index was never made (depmod did not run).
        None => {
            std::fs::create_dir_all(m.join("kernel")).unwrap();
            String::new()
        }
    };
    std::fs::write(m.join("vmlinuz"), b"not a kernel").unwrap();
}

/// Clears the immutable attribute ostree puts on deployment roots, so the temporary directory can go.
fn unlock(sysroot: &Path) {
    let _ = Command::new("chattr")
        .arg("-R")
        .arg("-i")
        .arg(sysroot.join("ostree/deploy"))
        .output();
}

#[test]
fn prepare_next_finds_and_prepares_the_pending_ostree_deployments_kernel() {
    if Command::new("ostree").arg("--version").output().is_err() {
        eprintln!("SKIPPED: the ostree CLI is not installed (scripts/setup installs it)");
        return;
    }
    let fx = Fixtures::get();
    let t = tempfile::tempdir().unwrap();
    let sysroot = t.path().join("sysroot");
    std::fs::create_dir_all(&sysroot).unwrap();
    sh(Command::new("ostree")
        .args(["admin", "init-fs"])
        .arg(&sysroot));
    sh(Command::new("ostree")
        .args(["admin", "os-init", "testos"])
        .arg(format!("--sysroot={}", sysroot.display())));

    // The older deployment has another kernel; the newer (default) one the fixtures' real tree.
    let old = "6.1.0-1-amd64";
    os_tree(&t.path().join("tree-a"), old, None);
    deploy(&sysroot, &t.path().join("tree-a"));
    os_tree(
        &t.path().join("tree-b"),
        &fx.kver,
        Some(&fx.modules_dir().join(&fx.kver)),
    );
    deploy(&sysroot, &t.path().join("tree-b"));

    // The host's own module directory is empty: the tree can only come from the deployment.
    let etc = t.path().join("etc");
    std::fs::create_dir_all(etc.join("modules.d")).unwrap();
    std::fs::create_dir_all(t.path().join("host-modules")).unwrap();
    std::fs::write(
        etc.join("kvcd.toml"),
        format!(
            "kernel_modules_dir = \"{}\"\nstate_dir = \"{}\"\nruntime_dir = \"{}\"\n",
            t.path().join("host-modules").display(),
            t.path().join("state").display(),
            t.path().join("run").display()
        ),
    )
    .unwrap();
    // kvcd_crc needs crc8, which only the kernel's own tree has.
    std::fs::write(
        etc.join("modules.d/crc.toml"),
        format!(
            "modules = [\"kvcd_crc\"]\n[directory]\npath = \"{}\"\n",
            fx.ko().display()
        ),
    )
    .unwrap();

    let out = Command::new(env!("CARGO_BIN_EXE_kvcd"))
        .arg("--config-dir")
        .arg(&etc)
        .args(["prepare-next", "--json", "--sysroot"])
        .arg(&sysroot)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    unlock(&sysroot);
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    let doc: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let kernels = doc["kernels"].as_array().unwrap();
    assert_eq!(kernels.len(), 2, "{stdout}");
    let k = &kernels[0];
    assert_eq!(k["release"], fx.kver.as_str(), "{stdout}");
    assert_eq!(k["role"], "next", "{stdout}");
    assert_eq!(k["origin"]["kind"], "ostree", "{stdout}");
    assert_eq!(k["origin"]["stateroot"], "testos", "{stdout}");
    assert_eq!(k["origin"]["default"], true, "{stdout}");
    let modules_dir = k["modules_dir"].as_str().unwrap();
    assert!(
        modules_dir.starts_with(
            &sysroot
                .join("ostree/deploy/testos/deploy")
                .display()
                .to_string()
        ) && modules_dir.ends_with("/usr/lib/modules"),
        "{stdout}"
    );
    // The old deployment is a rollback: listed, not prepared (no index), and
    // it does not hold the gate.
    let a = &kernels[1];
    assert_eq!(
        (
            a["release"].as_str(),
            a["role"].as_str(),
            a["ready"].as_bool()
        ),
        (Some(old), Some("fallback"), Some(false)),
        "{stdout}"
    );
    assert_eq!(a["origin"]["default"], false, "{stdout}");
    assert!(a["results"].as_array().unwrap().is_empty(), "{stdout}");
    assert_eq!(a["configs"][0]["state"], "not-prepared", "{stdout}");
    assert!(
        a["configs"][0]["detail"]
            .as_str()
            .unwrap()
            .contains("module tree has no index yet"),
        "{stdout}"
    );
    let r = &k["results"][0];
    assert_eq!(r["state"], "prepared", "{stdout}");
    let order = r["steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s["detail"].as_str())
        .find(|d| d.starts_with("load order:"))
        .unwrap_or_default()
        .to_owned();
    assert_eq!(order, "load order: crc8, kvcd_crc", "{stdout}");
    assert_eq!(k["ready"], true, "{stdout}");
    assert_eq!(k["configs"][0]["name"], "crc");
    assert_eq!(k["configs"][0]["state"], "ready", "{stdout}");
    assert!(
        t.path()
            .join("state/sets")
            .join(&fx.kver)
            .join("crc.json")
            .is_file()
    );
}
