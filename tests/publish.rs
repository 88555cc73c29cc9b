//! `kvcd publish` against the real test registry with real podman: driver
//! images for two real kernels (the fixtures' kernel and the older one of
//! `scripts/fixtures --older`) are built from a context, verified against
//! each kernel's module tree and pushed; a second run skips both tags; then a
//! node with another state directory, `pull = "missing"` and no build context
//! prepares both kernels from the registry with zero builds.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{Fixtures, env_file, images_env, podman_lock};

/// The older kernel's fixtures (`scripts/fixtures --older`), if they were made.
fn older() -> Option<(String, PathBuf, PathBuf)> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/fixtures/alt.env");
    let vars = if std::env::var_os("KVCD_ALT_KVER").is_some() || !path.exists() {
        std::env::vars().collect()
    } else {
        env_file(
            "KVCD_ALT_KVER",
            "target/fixtures/alt.env",
            "scripts/fixtures --older",
        )
    };
    Some((
        vars.get("KVCD_ALT_KVER")?.clone(),
        PathBuf::from(vars.get("KVCD_ALT_FIXTURES")?),
        PathBuf::from(vars.get("KVCD_ALT_MODULES_DIR")?),
    ))
}

struct Node {
    tmp: tempfile::TempDir,
}

impl Node {
    fn path(&self, p: &str) -> PathBuf {
        self.tmp.path().join(p)
    }

    /// `kvcd --config-dir etc --state-dir STATE --runtime-dir run ARGS`: (exit code, stdout, stderr).
    fn kvcd(&self, state: &str, args: &[&str]) -> (i32, String, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_kvcd"))
            .arg("--config-dir")
            .arg(self.path("etc"))
            .arg("--state-dir")
            .arg(self.path(state))
            .arg("--runtime-dir")
            .arg(self.path("run"))
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// The podman subcommands kvcd ran since the last call (the counting wrapper's log).
    fn podman_calls(&self) -> Vec<String> {
        let log = self.path("podman.log");
        let text = fs::read_to_string(&log).unwrap_or_default();
        let _ = fs::remove_file(&log);
        text.lines()
            .map(|l| l.split(' ').next().unwrap_or("").to_owned())
            .collect()
    }

    fn write_config(&self, text: &str) {
        fs::write(self.path("etc/modules.d/pubdrv.toml"), text).unwrap();
    }
}

/// Removes `REPO:TAG` for each tag from podman's local storage (absent ones are fine).
fn remove_images(repo: &str, tags: &[&str]) {
    for t in tags {
        let _ = Command::new("podman")
            .args(["rmi", "--force", &format!("{repo}:{t}")])
            .output();
    }
}

fn json(out: &str) -> serde_json::Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

/// The report's results as (kernel, action).
fn actions(doc: &serde_json::Value) -> Vec<(String, String)> {
    doc["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["kernel"].as_str().unwrap().to_owned(),
                r["action"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[test]
fn publish_for_two_kernels_then_a_node_prepares_both_with_zero_builds() {
    let Some((kver_a, fix_a, mods_a)) = older() else {
        eprintln!(
            "SKIP publish_for_two_kernels…: no second kernel's fixtures (run scripts/fixtures --older; tests/run does)"
        );
        return;
    };
    let _podman = podman_lock();
    let fx = Fixtures::get();
    let kver_b = fx.kver.clone();
    let vars = images_env();
    let registry = vars
        .get("KVCD_REGISTRY")
        .expect("KVCD_REGISTRY from scripts/images");
    let node = Node {
        tmp: tempfile::tempdir().unwrap(),
    };
    fs::create_dir_all(node.path("etc/modules.d")).unwrap();

    // Both kernels' module trees under one kernel_modules_dir.
    fs::create_dir_all(node.path("modules")).unwrap();
    std::os::unix::fs::symlink(
        fx.modules_dir().join(&kver_b),
        node.path("modules").join(&kver_b),
    )
    .unwrap();
    std::os::unix::fs::symlink(&mods_a, node.path("modules").join(&kver_a)).unwrap();
    // podman behind a counter.
    let wrapper = node.path("podman");
    fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nprintf '%s\\n' \"$*\" >>{}\nexec podman \"$@\"\n",
            node.path("podman.log").display()
        ),
    )
    .unwrap();
    fs::set_permissions(&wrapper, fs::Permissions::from_mode(0o755)).unwrap();
    fs::write(
        node.path("etc/kvcd.toml"),
        format!(
            "podman = \"{}\"\nkernel_modules_dir = \"{}\"\n",
            wrapper.display(),
            node.path("modules").display()
        ),
    )
    .unwrap();
    // One build context per kernel: that kernel's fixture modules.
    for (k, fix) in [(&kver_a, &fix_a), (&kver_b, &fx.dir)] {
        let ctx = node.path(&format!("ctx/{k}"));
        fs::create_dir_all(ctx.join("ko")).unwrap();
        for m in ["kvcd_base.ko", "kvcd_user.ko"] {
            fs::copy(fix.join("ko").join(m), ctx.join("ko").join(m)).unwrap();
        }
        fs::write(
            ctx.join("Containerfile"),
            format!("FROM scratch\nCOPY ko/ /lib/modules/{k}/extra/\n"),
        )
        .unwrap();
    }
    // A repository no earlier run pushed to.
    let repo = format!(
        "{registry}/kvcd-publish/t{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    let image = format!(
        "modules = [\"kvcd_user\"]\n\n[image]\nref = \"{repo}:${{KERNEL_FULL_VERSION}}\"\ntls_verify = false\n"
    );
    node.write_config(&format!(
        "{image}\n[build]\ncontext = \"{}/${{KERNEL_FULL_VERSION}}\"\n",
        node.path("ctx").display()
    ));
    let kernels = node.path("kernels.txt");
    fs::write(&kernels, format!("# the fleet\n{kver_b}\n")).unwrap();

    // 1. Both kernels built, verified and pushed.
    let (rc, out, err) = node.kvcd(
        "publisher",
        &[
            "publish",
            "--json",
            "--kernel",
            &kver_a,
            "--kernels-from",
            kernels.to_str().unwrap(),
            "pubdrv",
        ],
    );
    assert_eq!(rc, 0, "{out}\n{err}");
    let doc = json(&out);
    assert_eq!(
        actions(&doc),
        [
            (kver_a.clone(), "pushed".to_owned()),
            (kver_b.clone(), "pushed".to_owned())
        ],
        "{out}"
    );
    for r in doc["results"].as_array().unwrap() {
        assert_eq!(r["built"], true, "{r}");
        assert!(r["digest"].as_str().unwrap().starts_with("sha256:"), "{r}");
        assert_eq!(
            r["image"].as_str().unwrap(),
            format!("{repo}:{}", r["kernel"].as_str().unwrap())
        );
    }
    let calls = node.podman_calls();
    assert_eq!(
        calls.iter().filter(|c| *c == "build").count(),
        2,
        "{calls:?}"
    );
    assert_eq!(
        calls.iter().filter(|c| *c == "push").count(),
        2,
        "{calls:?}"
    );
    assert_eq!(
        calls.iter().filter(|c| *c == "pull").count(),
        0,
        "{calls:?}"
    );
    // The registry has both tags (asked without kvcd).
    let listed = common::run(Command::new("podman").args([
        "search",
        "--list-tags",
        "--format=json",
        "--tls-verify=false",
        &repo,
    ]));
    let listed = json(&listed);
    let mut tags: Vec<&str> = listed[0]["Tags"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    tags.sort_unstable();
    let mut want = vec![kver_a.as_str(), kver_b.as_str()];
    want.sort_unstable();
    assert_eq!(tags, want, "{listed}");

    // 2. Again: both tags exist, nothing is built or pushed; text output says so.
    let (rc, out, err) = node.kvcd(
        "publisher",
        &[
            "publish", "--kernel", &kver_a, "--kernel", &kver_b, "pubdrv",
        ],
    );
    assert_eq!(rc, 0, "{out}\n{err}");
    assert!(
        out.contains(&format!(
            "pubdrv {kver_a}: {repo}:{kver_a} exists in the registry: skipped"
        )),
        "{out}"
    );
    let calls = node.podman_calls();
    assert_eq!(calls, ["search"], "one tag list per repository: {calls:?}");

    // 3. A node: its own state, the images gone from local storage, no build context.
    remove_images(&repo, &[&kver_a, &kver_b]);
    node.write_config(&image.replace("tls_verify", "pull = \"missing\"\ntls_verify"));
    for k in [&kver_a, &kver_b] {
        let (rc, out, err) = node.kvcd(
            "node",
            &["apply", "--prepare", "--json", "--kernel", k, "pubdrv"],
        );
        assert_eq!(rc, 0, "{out}\n{err}");
        let doc = json(&out);
        assert_eq!(doc["results"][0]["state"], "prepared", "{out}");
        assert!(
            common::module_set(&node.path("node"), "pubdrv", k).contains_key("kvcd_user"),
            "no kvcd_user in the node's set for {k}"
        );
    }
    let calls = node.podman_calls();
    assert_eq!(
        calls.iter().filter(|c| *c == "pull").count(),
        2,
        "{calls:?}"
    );
    assert_eq!(
        calls.iter().filter(|c| *c == "build").count(),
        0,
        "{calls:?}"
    );
    remove_images(&repo, &[&kver_a, &kver_b]);
}

#[test]
fn publish_refuses_what_it_cannot_publish_and_says_why() {
    let node = Node {
        tmp: tempfile::tempdir().unwrap(),
    };
    fs::create_dir_all(node.path("etc/modules.d")).unwrap();
    fs::write(
        node.path("etc/modules.d/dir.toml"),
        "modules = [\"kvcd_user\"]\n[directory]\npath = \"/nonexistent\"\n",
    )
    .unwrap();
    fs::write(
        node.path("etc/modules.d/pinned.toml"),
        "modules = [\"kvcd_crc\"]\n[image]\nref = \"127.0.0.1:1/x/y@sha256:0000000000000000000000000000000000000000000000000000000000000000\"\n",
    )
    .unwrap();

    // No kernel at all.
    let (rc, out, err) = node.kvcd("s", &["publish", "dir"]);
    assert_eq!(rc, 2, "{out}\n{err}");
    assert!(
        err.contains(
            "no kernel to publish for: give --kernel RELEASE, --kernels-from FILE or --next"
        ),
        "{err}"
    );
    // A kernel list with a bad line names the file and the line.
    let list = node.path("kernels.txt");
    fs::write(&list, "6.1.0-57-amd64\n../../etc\n").unwrap();
    let (rc, _, err) = node.kvcd(
        "s",
        &["publish", "--kernels-from", list.to_str().unwrap(), "dir"],
    );
    assert_eq!(rc, 2, "{err}");
    assert!(
        err.contains(&format!("{}:2: expected a kernel release", list.display())),
        "{err}"
    );
    // A missing list is named too.
    let (rc, _, err) = node.kvcd("s", &["publish", "--kernels-from", "/nonexistent/k.txt"]);
    assert_eq!(rc, 2, "{err}");
    assert!(
        err.contains("--kernels-from: reading /nonexistent/k.txt"),
        "{err}"
    );
    // A directory config, a reference by digest and an unknown name each fail with the reason; nothing runs.
    let (rc, out, err) = node.kvcd(
        "s",
        &[
            "publish",
            "--json",
            "--kernel",
            "6.1.0-57-amd64",
            "dir",
            "pinned",
            "nope",
        ],
    );
    assert_eq!(rc, 1, "{out}\n{err}");
    let doc = json(&out);
    let by_name = |n: &str| {
        doc["results"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["config"] == n)
            .unwrap_or_else(|| panic!("no result for {n}: {out}"))
            .clone()
    };
    assert_eq!(by_name("dir")["action"], "failed");
    assert!(
        by_name("dir")["detail"]
            .as_str()
            .unwrap()
            .contains("not an image config"),
        "{out}"
    );
    assert_eq!(by_name("pinned")["action"], "failed");
    assert!(
        by_name("pinned")["detail"]
            .as_str()
            .unwrap()
            .contains("has no tag to publish under"),
        "{out}"
    );
    assert_eq!(by_name("nope")["action"], "failed");
}
