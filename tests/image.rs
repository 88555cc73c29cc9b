//! Image sources against real podman and a real registry (`scripts/registry`,
//! `scripts/images`): pull by tag, digest and with credentials, build
//! fallback, extraction safety, verification, and the warm path that spawns
//! no podman at all. The kernel is faked (this host cannot load modules);
//! tests/vm loads what real podman extracted into a real kernel.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use common::{FakeKernel, Fixtures, images_env, podman_lock, read_env_file};
use kvcd::artifacts::ModuleStore;
use kvcd::artifacts::image::Manifest;
use kvcd::artifacts::podman::{ContainerTool as _, Podman};
use kvcd::config::{Config, ModuleConfig, Overrides};
use kvcd::kernel::KernelRelease;
use kvcd::reconciler::{Engine, Outcome, RecordStore, State, Step};

struct Env {
    tmp: tempfile::TempDir,
    fx: Fixtures,
    vars: BTreeMap<String, String>,
    fake: FakeKernel,
}

impl Env {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        fs::create_dir_all(tmp.path().join("etc/modules.d")).unwrap();
        Self {
            tmp,
            fx: Fixtures::get(),
            vars: images_env(),
            fake: FakeKernel::default(),
        }
    }

    fn var(&self, k: &str) -> &str {
        self.vars
            .get(k)
            .unwrap_or_else(|| panic!("{k} not set by scripts/images"))
    }

    fn engine(&self, podman: &str) -> Engine<'_> {
        Engine {
            layout: ModuleStore::new(self.state(), self.fx.modules_dir()),
            kernel: KernelRelease::parse(&self.fx.kver).unwrap(),
            kmods: &self.fake,
            firmware_dir: self.tmp.path().join("firmware"),
            keep_kernels: 3,
            protect: Vec::new(),
            target_is_live: true,
            podman: Box::new(Podman::new(Path::new(podman))),
            records: RecordStore::new(&self.tmp.path().join("run")),
            on_step: None,
            signing: None,
            sysfs: PathBuf::from("/sys"),
        }
    }

    fn state(&self) -> PathBuf {
        self.tmp.path().join("state")
    }

    /// modules.d/NAME.toml with `@VAR@` replaced by the images' variables.
    fn config(&self, name: &str, text: &str) -> ModuleConfig {
        let mut text = text.to_owned();
        for (k, v) in &self.vars {
            text = text.replace(&format!("@{k}@"), v);
        }
        fs::write(
            self.tmp.path().join(format!("etc/modules.d/{name}.toml")),
            text,
        )
        .unwrap();
        let c = Config::load(&[self.tmp.path().join("etc")], &Overrides::default());
        c.module(name).unwrap().clone()
    }
}

fn rmi(reference: &str) {
    let _ = std::process::Command::new("podman")
        .args(["rmi", "--force", reference])
        .output();
}

fn assert_ok(o: &Outcome) {
    assert!(o.state.is_ok(), "{o:#?}");
}

fn fail(o: &Outcome, step: Step) -> String {
    let e = o
        .error
        .clone()
        .unwrap_or_else(|| panic!("expected a failure: {o:#?}"));
    assert_eq!(e.step, step, "{o:#?}");
    e.message
}

fn detail(o: &Outcome, needle: &str) -> bool {
    o.steps.iter().any(|s| s.detail.contains(needle))
}

const PARAM_TAG: &str = r#"
version = "1.2.0"
modules = ["kvcd_user", "kvcd_param"]
[image]
ref = "@KVCD_IMAGE_TAG@"
tls_verify = false
"#;

#[test]
fn pull_by_tag_extract_load_then_warm_path_without_podman() {
    let _g = podman_lock();
    let env = Env::new();
    rmi(env.var("KVCD_IMAGE_TAG"));
    let c = env.config("img", PARAM_TAG);
    let o = env.engine("podman").load(&c);
    assert_ok(&o);
    assert_eq!(o.state, State::Loaded);
    assert!(
        detail(&o, &format!("pulled {}", env.var("KVCD_IMAGE_TAG"))),
        "{o:#?}"
    );
    assert!(o.podman_calls >= 4, "{o:#?}"); // inspect, pull, inspect, mount, unmount
    assert!(env.fake.is_live("kvcd_user") && env.fake.is_live("kvcd_base"));
    let digest = o.image.unwrap().digest;
    assert!(digest.starts_with("sha256:"), "{digest}");

    // The manifest names the image and every file with its checksum; the
    // image's `build` symlink (pointing outside) was not extracted.
    let dir = env.state().join("images/img").join(&env.fx.kver);
    let ext = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.is_dir())
        .unwrap();
    let m: Manifest =
        serde_json::from_slice(&fs::read(ext.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(m.reference, env.var("KVCD_IMAGE_TAG"));
    assert_eq!(m.digest, digest);
    assert!(
        m.files
            .iter()
            .any(|f| f.path == "modules/extra/kvcd_param.ko"),
        "{m:#?}"
    );
    for f in &m.files {
        let data = fs::read(ext.join(&f.path)).unwrap();
        assert_eq!(kvcd::util::sha256_hex(&data), f.sha256);
    }
    assert!(!ext.join("modules/build").exists());

    // Warm path: a podman that cannot even be started is never needed.
    let o = env.engine("/nonexistent/podman").load(&c);
    assert_ok(&o);
    assert_eq!(o.podman_calls, 0);
    assert!(detail(&o, "no podman needed"), "{o:#?}");
    assert_eq!(o.image.unwrap().digest, digest);
}

#[test]
fn pull_by_digest_and_always_rechecks_without_reextracting() {
    let _g = podman_lock();
    let env = Env::new();
    let reference = env.var("KVCD_IMAGE_DIGEST").to_owned();
    rmi(&reference);
    let c = env.config(
        "dig",
        "modules = [\"kvcd_param\"]\n[image]\nref = \"@KVCD_IMAGE_DIGEST@\"\npull = \"always\"\ntls_verify = false\n",
    );
    let o = env.engine("podman").prepare(&c);
    assert_eq!(o.state, State::Prepared, "{o:#?}");
    assert_eq!(
        o.image.unwrap().digest,
        reference.split('@').nth(1).unwrap()
    );
    assert!(env.fake.take_log().is_empty(), "prepare loads nothing");

    let o = env.engine("podman").prepare(&c);
    assert_eq!(o.state, State::Prepared, "{o:#?}");
    // pull = always asks the registry again; the ID it prints shows the image unchanged.
    assert_eq!(o.podman_calls, 1, "{o:#?}");
    assert!(detail(&o, "is unchanged"), "{o:#?}");
}

#[test]
fn pull_with_credentials_and_each_auth_failure_named() {
    let _g = podman_lock();
    let env = Env::new();
    let reference = env.var("KVCD_IMAGE_AUTH").to_owned();
    let registry = env.var("KVCD_REGISTRY_AUTH").to_owned();
    let cfg = |auth: &str| {
        format!(
            "modules = [\"kvcd_param\"]\n[image]\nref = \"@KVCD_IMAGE_AUTH@\"\npull = \"always\"\ntls_verify = false\nauth_file = \"{auth}\"\n"
        )
    };
    rmi(&reference);
    let c = env.config("auth", &cfg(env.var("KVCD_AUTHFILE")));
    let o = env.engine("podman").prepare(&c);
    assert_eq!(o.state, State::Prepared, "{o:#?}");

    let c = env.config("auth", &cfg(env.var("KVCD_BAD_AUTHFILE")));
    let msg = fail(&env.engine("podman").prepare(&c), Step::Fetch);
    assert!(
        msg.contains(&format!("pulling {reference} from registry {registry}: ")),
        "{msg}"
    );
    assert!(msg.to_lowercase().contains("unauthorized"), "{msg}");
    assert!(msg.contains("build: no [build] in the config"), "{msg}");

    let missing = env.tmp.path().join("no-such-auth.json");
    let c = env.config("auth", &cfg(missing.to_str().unwrap()));
    let msg = fail(&env.engine("podman").prepare(&c), Step::Fetch);
    assert!(
        msg.contains(&format!("pulling {reference} from registry {registry}: ")),
        "{msg}"
    );
    assert!(msg.contains(missing.to_str().unwrap()), "{msg}");
}

#[test]
fn unknown_image_names_registry_reference_and_cause() {
    let _g = podman_lock();
    let env = Env::new();
    let c = env.config(
        "nope",
        "modules = [\"kvcd_param\"]\n[image]\nref = \"@KVCD_REGISTRY@/kvcd/does-not-exist:${KERNEL_FULL_VERSION}\"\ntls_verify = false\n",
    );
    let msg = fail(&env.engine("podman").prepare(&c), Step::Fetch);
    let reference = format!(
        "{}/kvcd/does-not-exist:{}",
        env.var("KVCD_REGISTRY"),
        env.fx.kver
    );
    assert!(
        msg.starts_with(&format!("no image {reference}; tried:")),
        "{msg}"
    );
    assert!(msg.contains("local storage: not present"), "{msg}");
    assert!(
        msg.contains(&format!(
            "pull: pulling {reference} from registry {}: ",
            env.var("KVCD_REGISTRY")
        )),
        "{msg}"
    );
    assert!(msg.contains("manifest unknown"), "{msg}");
}

fn build_config(file: &str, version: &str) -> String {
    format!(
        r#"
version = "{version}"
modules = ["kvcd_user"]
[image]
ref = "127.0.0.1:9/kvcd/unreachable:${{KERNEL_FULL_VERSION}}"
tls_verify = false
[build]
context = "@KVCD_BUILD_CONTEXT@"
file = "{file}"
args = {{ KVER = "${{KERNEL_FULL_VERSION}}", KMODVER = "${{MOD_VERSION}}" }}
"#
    )
}

#[test]
fn registry_down_falls_back_to_build() {
    let _g = podman_lock();
    let env = Env::new();
    let reference = format!("127.0.0.1:9/kvcd/unreachable:{}", env.fx.kver);
    rmi(&reference);
    let c = env.config("built", &build_config("Containerfile", "1.2.0"));
    let o = env.engine("podman").load(&c);
    assert_eq!(o.state, State::Loaded, "{o:#?}");
    assert!(
        detail(
            &o,
            &format!("built {reference} from {}", env.var("KVCD_BUILD_CONTEXT"))
        ),
        "{o:#?}"
    );
    assert!(env.fake.is_live("kvcd_user"));

    // Artifacts of this kernel are pruned once newer kernels are kept, and
    // so is the image kvcd built for it.
    for k in ["99.0.0-1-amd64", "99.0.0-2-amd64"] {
        fs::create_dir_all(env.state().join("images/built").join(k).join("x")).unwrap();
    }
    let podman = Podman::new(Path::new("podman"));
    let p =
        kvcd::artifacts::prune::prune_config(&env.state(), Some(&podman), "built", 1, &[], false)
            .unwrap();
    assert_eq!(p.kernels, ["99.0.0-1-amd64", env.fx.kver.as_str()]);
    assert_eq!(p.images.as_slice(), std::slice::from_ref(&reference));
    assert!(podman.inspect(&reference).unwrap().is_none());
    assert!(!kvcd::state::Layout::set_file(&env.state(), "built", &env.fx.kver).exists());
}

#[test]
fn build_failure_reports_what_was_tried_and_the_last_lines() {
    let _g = podman_lock();
    let env = Env::new();
    // A build from another test must not stand in for this one.
    rmi(&format!("127.0.0.1:9/kvcd/unreachable:{}", env.fx.kver));
    let c = env.config("broken", &build_config("Containerfile.broken", "1.2.0"));
    let msg = fail(&env.engine("podman").prepare(&c), Step::Fetch);
    assert!(
        msg.contains("pull: pulling 127.0.0.1:9/kvcd/unreachable:"),
        "{msg}"
    );
    assert!(msg.contains("from registry 127.0.0.1:9"), "{msg}");
    assert!(
        msg.contains("build: building 127.0.0.1:9/kvcd/unreachable:"),
        "{msg}"
    );
    assert!(
        msg.contains("compiler exploded: missing kernel headers"),
        "{msg}"
    );
}

#[test]
fn a_built_image_that_fails_verification_is_rebuilt_once() {
    let _g = podman_lock();
    let env = Env::new();
    let reference = format!("127.0.0.1:9/kvcd/unreachable:{}", env.fx.kver);
    rmi(&reference);
    let c = env.config("ver", &build_config("Containerfile", "9.9"));
    let o = env.engine("podman").load(&c);
    let msg = fail(&o, Step::Verify);
    assert!(
        msg.contains("is version 1.2.0, but the config expects version 9.9"),
        "{msg}"
    );
    let rebuilds = o
        .steps
        .iter()
        .filter(|s| s.detail.contains("rebuilding the image once"))
        .count();
    assert_eq!(rebuilds, 1, "{o:#?}");
    let builds = o
        .steps
        .iter()
        .filter(|s| s.detail.starts_with("built 127.0.0.1:9"))
        .count();
    assert_eq!(builds, 2, "{o:#?}");
    assert!(env.fake.take_log().is_empty());
    rmi(&reference);
}

#[test]
fn image_for_another_kernel_fails_verification() {
    let _g = podman_lock();
    let env = Env::new();
    let c = env.config(
        "other",
        "modules = [\"kvcd_param\"]\n[image]\nref = \"@KVCD_IMAGE_OTHER_KERNEL@\"\ntls_verify = false\n",
    );
    let msg = fail(&env.engine("podman").load(&c), Step::Verify);
    assert!(msg.starts_with("module kvcd_param ("), "{msg}");
    assert!(msg.contains("was built for kernel 9.9.9"), "{msg}");
    assert!(
        msg.contains(&format!("but the target kernel is {}", env.fx.kver)),
        "{msg}"
    );
    assert!(env.fake.take_log().is_empty());
}

#[test]
fn escaping_symlink_in_image_is_refused_and_nothing_extracted() {
    let _g = podman_lock();
    let env = Env::new();
    let c = env.config(
        "evil",
        "modules = [\"kvcd_param\"]\n[image]\nref = \"@KVCD_IMAGE_EVIL@\"\ntls_verify = false\n",
    );
    let msg = fail(&env.engine("podman").load(&c), Step::Fetch);
    assert!(
        msg.contains("kvcd_param.ko is a symlink to /etc/passwd"),
        "{msg}"
    );
    assert!(msg.contains("refusing to extract it"), "{msg}");
    // No extraction, complete or partial, is left behind.
    let dir = env.state().join("images/evil").join(&env.fx.kver);
    let left: Vec<_> = fs::read_dir(&dir)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn prepare_a_kernel_then_apply_it_on_the_warm_path_through_the_cli() {
    let _g = podman_lock();
    let env = Env::new();
    let etc = env.tmp.path().join("etc");
    let kvcd_toml = |podman: &str| {
        format!(
            "kernel_modules_dir = \"{}\"\nstate_dir = \"{}\"\nruntime_dir = \"{}\"\npodman = \"{podman}\"\n",
            env.fx.modules_dir().display(),
            env.state().display(),
            env.tmp.path().join("run").display()
        )
    };
    fs::write(etc.join("kvcd.toml"), kvcd_toml("podman")).unwrap();
    env.config("next", PARAM_TAG);
    let kvcd = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_kvcd"))
            .arg("--config-dir")
            .arg(&etc)
            .arg("apply")
            .arg("--kernel")
            .arg(&env.fx.kver)
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (code, out) = kvcd(&["--prepare", "next"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("next: verify: ready for kernel"), "{out}");
    assert!(out.trim_end().ends_with("next: prepared"), "{out}");

    fs::write(etc.join("kvcd.toml"), kvcd_toml("/nonexistent/podman")).unwrap();
    let (_, out) = kvcd(&["--json", "next"]);
    let doc: serde_json::Value = serde_json::from_str(&out).unwrap();
    let r = &doc["results"][0];
    assert_eq!(r["podman_calls"], 0, "{out}");
    let steps = r["steps"].as_array().unwrap();
    assert!(
        steps
            .iter()
            .any(|s| s["detail"].as_str().unwrap().contains("no podman needed")),
        "{out}"
    );
    assert!(
        steps.iter().any(|s| s["step"] == "stage"
            && s["detail"]
                .as_str()
                .unwrap()
                .ends_with("in the store already")),
        "{out}"
    );
    // This host cannot insert modules; with a kernel that can, this is where loading starts.
    if !Path::new("/proc/modules").exists() {
        assert_eq!(r["error"]["step"], "insert", "{out}");
    }
}

#[test]
fn firmware_from_the_image_is_placed_found_and_removed() {
    let _g = podman_lock();
    let env = Env::new();
    let c = env.config(
        "fw",
        "modules = [\"kvcd_param\"]\n[image]\nref = \"@KVCD_IMAGE_TAG@\"\ntls_verify = false\nfirmware_dir = \"/lib/firmware\"\n",
    );
    let host = env.tmp.path().join("firmware");
    let o = env.engine("podman").load(&c);
    assert_eq!(o.state, State::Loaded, "{o:#?}");
    let fw = host.join("kvcd/kvcd-test.fw");
    let data = fs::read(&fw).unwrap();
    assert!(!data.is_empty());
    // A link inside the firmware directory arrives as the file it points to.
    assert_eq!(fs::read(host.join("kvcd/kvcd-alias.fw")).unwrap(), data);
    assert_eq!(
        *env.fake.firmware_path.lock().unwrap(),
        host.display().to_string()
    );
    assert!(
        detail(
            &o,
            &format!(
                "set the kernel's firmware search path to {}",
                host.display()
            )
        ),
        "{o:#?}"
    );

    let o = env.engine("podman").unload("fw", None);
    assert_eq!(o.state, State::Inactive, "{o:#?}");
    assert!(
        detail(&o, &format!("removed 2 file(s) from {}", host.display())),
        "{o:#?}"
    );
    assert!(!fw.exists() && !host.join("kvcd").exists());
    // The search path kvcd set goes with the last of its firmware.
    assert_eq!(*env.fake.firmware_path.lock().unwrap(), "");
    assert!(
        detail(&o, "cleared the kernel's firmware search path"),
        "{o:#?}"
    );

    // A search path someone else set is kept, and said so.
    *env.fake.firmware_path.lock().unwrap() = "/opt/vendor/firmware".to_owned();
    let o = env.engine("podman").load(&c);
    assert_eq!(o.state, State::Loaded, "{o:#?}");
    assert!(
        detail(&o, "firmware search path is /opt/vendor/firmware; kept it"),
        "{o:#?}"
    );
    assert_eq!(
        *env.fake.firmware_path.lock().unwrap(),
        "/opt/vendor/firmware"
    );
    let o = env.engine("podman").unload("fw", None);
    assert_eq!(o.state, State::Inactive, "{o:#?}");
    assert_eq!(
        *env.fake.firmware_path.lock().unwrap(),
        "/opt/vendor/firmware"
    );

    // A load that fails after placing firmware takes it away again, and the
    // search path it set.
    *env.fake.firmware_path.lock().unwrap() = String::new();
    *env.fake.fail_insert.lock().unwrap() =
        Some((common::m("kvcd_param"), nix::errno::Errno::ENOEXEC));
    let o = env.engine("podman").load(&c);
    assert_eq!(o.state, State::Failed, "{o:#?}");
    assert!(
        detail(&o, "rolled back: removed 2 firmware file(s)"),
        "{o:#?}"
    );
    assert!(!fw.exists());
    assert_eq!(*env.fake.firmware_path.lock().unwrap(), "");
    assert!(
        detail(&o, "cleared the kernel's firmware search path"),
        "{o:#?}"
    );
}

#[test]
fn missing_firmware_dir_in_the_image_is_named() {
    let _g = podman_lock();
    let env = Env::new();
    let c = env.config(
        "fw",
        "modules = [\"kvcd_param\"]\n[image]\nref = \"@KVCD_IMAGE_TAG@\"\ntls_verify = false\nfirmware_dir = \"/lib/firmware/none\"\n",
    );
    let msg = fail(&env.engine("podman").load(&c), Step::Fetch);
    assert!(msg.contains("extracting /lib/firmware/none from"), "{msg}");
    assert!(msg.contains("the image has no /lib/firmware/none"), "{msg}");
}

#[test]
fn prepare_next_prepares_installed_kernels_behind_its_switch() {
    let _g = podman_lock();
    let env = Env::new();
    let etc = env.tmp.path().join("etc");
    let kvcd_toml = |switch: bool| {
        format!(
            "kernel_modules_dir = \"{}\"\nstate_dir = \"{}\"\nruntime_dir = \"{}\"\nprepare_next_kernels = {switch}\n",
            env.fx.modules_dir().display(),
            env.state().display(),
            env.tmp.path().join("run").display()
        )
    };
    env.config("next", PARAM_TAG);
    let kvcd = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_kvcd"))
            .arg("--config-dir")
            .arg(&etc)
            .arg("prepare-next")
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };

    fs::write(etc.join("kvcd.toml"), kvcd_toml(false)).unwrap();
    let (code, out) = kvcd(&["--if-enabled"]);
    // Switched off, the trigger only reports; it does not fail its unit.
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("prepare_next_kernels is off"), "{out}");
    assert!(
        out.contains(&format!("kernel {} (next, package", env.fx.kver))
            && out.contains("NOT READY"),
        "{out}"
    );
    assert!(
        out.contains("next: not-prepared: never prepared for kernel"),
        "{out}"
    );
    assert!(!env.state().join("images/next").exists());

    fs::write(etc.join("kvcd.toml"), kvcd_toml(true)).unwrap();
    let (code, out) = kvcd(&["--if-enabled", "--json"]);
    assert_eq!(code, Some(0), "{out}");
    let doc: serde_json::Value = serde_json::from_str(&out).unwrap();
    let k = &doc["kernels"][0];
    assert_eq!(k["release"], env.fx.kver.as_str(), "{out}");
    assert_eq!(k["role"], "next", "{out}");
    assert_eq!(k["origin"]["kind"], "package", "{out}");
    assert_eq!(k["results"][0]["name"], "next");
    assert_eq!(k["results"][0]["state"], "prepared", "{out}");
    assert_eq!(k["ready"], true, "{out}");
    assert_eq!(k["configs"][0]["state"], "ready", "{out}");
    assert!(
        env.state()
            .join("images/next")
            .join(&env.fx.kver)
            .join("index.json")
            .exists()
    );

    // Changing the config makes what was prepared stale: the gate says so.
    env.config(
        "next",
        &PARAM_TAG.replace(r#"["kvcd_user", "kvcd_param"]"#, r#"["kvcd_param"]"#),
    );
    fs::write(etc.join("kvcd.toml"), kvcd_toml(false)).unwrap();
    let (code, out) = kvcd(&["--if-enabled", "--json"]);
    assert_eq!(code, Some(0), "{out}");
    let doc: serde_json::Value = serde_json::from_str(&out).unwrap();
    let c = &doc["kernels"][0]["configs"][0];
    assert_eq!(doc["kernels"][0]["ready"], false, "{out}");
    assert_eq!(c["state"], "not-prepared", "{out}");
    assert!(c["detail"].as_str().unwrap().contains("before"), "{out}");
}

#[test]
fn a_build_hook_replaces_podman_build() {
    let _g = podman_lock();
    let env = Env::new();
    let reference = format!("127.0.0.1:9/kvcd/hook-built:{}", env.fx.kver);
    rmi(&reference);
    let hook = r#"["/bin/sh", "-c", "podman build -q --build-arg KVER=$KVCD_KERNEL --build-arg KMODVER=$KVCD_VERSION -t \"$KVCD_IMAGE_REF\" @KVCD_BUILD_CONTEXT@"]"#;
    let c = env.config(
        "hookbuilt",
        &format!(
            "version = \"1.2.0\"\nmodules = [\"kvcd_user\"]\n[image]\nref = \"127.0.0.1:9/kvcd/hook-built:${{KERNEL_FULL_VERSION}}\"\ntls_verify = false\n[hooks]\nbuild = {hook}\n"
        ),
    );
    let o = env.engine("podman").load(&c);
    assert_eq!(o.state, State::Loaded, "{o:#?}");
    assert!(
        detail(&o, &format!("the build hook made {reference}")),
        "{o:#?}"
    );
    assert!(env.fake.is_live("kvcd_user"));
    rmi(&reference);

    let env = Env::new();
    let c = env.config(
        "hookbuilt",
        "modules = [\"kvcd_user\"]\n[image]\nref = \"127.0.0.1:9/kvcd/hook-built:x\"\ntls_verify = false\n[hooks]\nbuild = [\"/bin/sh\", \"-c\", \"echo no compiler here >&2; exit 4\"]\n",
    );
    let msg = fail(&env.engine("podman").load(&c), Step::Fetch);
    assert!(
        msg.contains("pull: pulling 127.0.0.1:9/kvcd/hook-built:x from registry 127.0.0.1:9"),
        "{msg}"
    );
    assert!(
        msg.contains("build hook: hook build (/bin/sh) failed: exit status 4; last stderr lines:\n  no compiler here"),
        "{msg}"
    );
}

/// A variable of `scripts/images` that the environment may predate (it was
/// sourced from an older env file): then this checkout's `target/images/env`.
fn images_var(env: &Env, key: &str) -> String {
    if let Some(v) = env.vars.get(key) {
        return v.clone();
    }
    read_env_file("target/images/env", "scripts/images")
        .remove(key)
        .unwrap_or_else(|| panic!("{key} not in target/images/env: run scripts/images"))
}

#[test]
fn an_image_with_a_whole_kernel_tree_gives_only_the_driver() {
    let _g = podman_lock();
    let env = Env::new();
    let reference = images_var(&env, "KVCD_IMAGE_FULLTREE");
    rmi(&reference);
    let c = env.config(
        "full",
        &format!(
            "modules = [\"kvcd_crc\", \"kvcd_user\", \"dummy\"]\n[image]\nref = \"{reference}\"\ntls_verify = false\n"
        ),
    );
    let o = env.engine("podman").load(&c);
    assert_eq!(o.state, State::Loaded, "{o:#?}");

    // The extraction holds the three drivers and kvcd_base (kvcd_user needs
    // it), nothing of the kernel's own tree.
    let dir = env.state().join("images/full").join(&env.fx.kver);
    let ext = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.is_dir())
        .unwrap();
    let m: Manifest =
        serde_json::from_slice(&fs::read(ext.join("manifest.json")).unwrap()).unwrap();
    let paths: Vec<_> = m.files.iter().map(|f| f.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "modules/extra/dummy.ko",
            "modules/extra/kvcd_base.ko",
            "modules/extra/kvcd_crc.ko",
            "modules/extra/kvcd_user.ko"
        ]
    );
    let drivers: u64 = ["dummy", "kvcd_base", "kvcd_crc", "kvcd_user"]
        .iter()
        .map(|n| {
            fs::metadata(env.fx.ko().join(format!("{n}.ko")))
                .unwrap()
                .len()
        })
        .sum();
    assert_eq!(m.files.iter().map(|f| f.size).sum::<u64>(), drivers);
    for f in &m.files {
        let data = fs::read(ext.join(&f.path)).unwrap();
        assert_eq!(kvcd::util::sha256_hex(&data), f.sha256, "{}", f.path);
    }
    let mut on_disk = Vec::new();
    let mut stack = vec![ext.join("modules")];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                on_disk.push(p);
            }
        }
    }
    assert_eq!(on_disk.len(), 4, "{on_disk:?}");

    // The step says what was taken and what was left: every in-tree module
    // of the kernel (the image's kernel/ is the Debian tree).
    let in_tree = {
        let mut n = 0;
        let mut stack = vec![env.fx.modules_dir().join(&env.fx.kver).join("kernel")];
        while let Some(d) = stack.pop() {
            for e in fs::read_dir(d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    stack.push(p);
                } else if p.to_string_lossy().contains(".ko") {
                    n += 1;
                }
            }
        }
        n
    };
    assert!(in_tree > 1000, "{in_tree}");
    let left = in_tree.to_string();
    let left = if left.len() > 3 {
        format!("{},{}", &left[..left.len() - 3], &left[left.len() - 3..])
    } else {
        left
    };
    let note = format!(
        "extracted 4 module file(s), {} KiB, from /lib/modules/{} in {reference} ({left} other module file(s) left in the image)",
        drivers.div_ceil(1024),
        env.fx.kver
    );
    assert!(detail(&o, &note), "{note}\n{o:#?}");
    assert!(
        detail(&o, "in-tree dependencies from the kernel's own tree"),
        "{o:#?}"
    );

    // crc8 comes from the host's tree; dummy is the driver's, not the kernel's.
    assert!(
        o.steps.iter().any(|s| s.step == Step::Resolve
            && s.detail == "load order: crc8, kvcd_crc, kvcd_base, kvcd_user, dummy"),
        "{o:#?}"
    );
    let set = common::module_set(&env.state(), "full", &env.fx.kver);
    assert_eq!(
        set.keys().map(String::as_str).collect::<Vec<_>>(),
        ["dummy", "kvcd_base", "kvcd_crc", "kvcd_user"]
    );
    assert_eq!(
        env.fake.path_of("crc8").unwrap(),
        env.fx
            .modules_dir()
            .join(&env.fx.kver)
            .join("kernel/lib/crc8.ko")
    );
    assert_eq!(env.fake.path_of("dummy").as_ref(), Some(&set["dummy"]));
    // The store links kvcd's own extraction instead of copying it again.
    for stored in set.values() {
        let nlink = std::os::unix::fs::MetadataExt::nlink(&fs::metadata(stored).unwrap());
        assert_eq!(nlink, 2, "{}", stored.display());
    }
    assert!(env.fake.is_live("crc8") && env.fake.is_live("dummy"));
    rmi(&reference);
}

#[test]
fn a_registry_that_never_answers_times_the_pull_out_and_kills_podman() {
    let _g = podman_lock();
    let env = Env::new();
    let port = common::silent_registry();
    let reference = format!("127.0.0.1:{port}/kvcd/silent:1");
    let c = env.config(
        "silent",
        &format!(
            "modules = [\"kvcd_param\"]\n[image]\nref = \"{reference}\"\ntls_verify = false\n"
        ),
    );
    let mut engine = env.engine("podman");
    engine.podman = Box::new(Podman::new(Path::new("podman")).with_timeouts(
        std::time::Duration::from_secs(2),
        std::time::Duration::from_secs(120),
    ));
    let msg = fail(&engine.prepare(&c), Step::Fetch);
    assert!(
        msg.contains(&format!(
            "pull: pulling {reference} from registry 127.0.0.1:{port}: podman pull timed out after 2s; its process group was killed"
        )),
        "{msg}"
    );
    // No podman process of this pull is left (a killed one may take a moment
    // to be gone: look again a few times).
    let left = || -> Vec<String> {
        fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| fs::read(e.path().join("cmdline")).ok())
            .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
            .filter(|c| c.contains(&reference))
            .collect()
    };
    for _ in 0..100 {
        if left().is_empty() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(left().is_empty(), "{:?}", left());
}

#[test]
fn a_directory_link_out_of_the_module_tree_is_refused() {
    let _g = podman_lock();
    let env = Env::new();
    let reference = images_var(&env, "KVCD_IMAGE_EVIL_DIR");
    let c = env.config(
        "evildir",
        &format!("modules = [\"kvcd_base\"]\n[image]\nref = \"{reference}\"\ntls_verify = false\n"),
    );
    let msg = fail(&env.engine("podman").load(&c), Step::Fetch);
    assert!(
        msg.contains(&format!(
            "/lib/modules/{}/extra/sub is a symlink to /, outside /lib/modules/{}; refusing to extract it",
            env.fx.kver, env.fx.kver
        )),
        "{msg}"
    );
    let dir = env.state().join("images/evildir").join(&env.fx.kver);
    let left: Vec<_> = fs::read_dir(&dir)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "{left:?}");
    assert!(env.fake.take_log().is_empty());
}

#[test]
fn a_fifo_named_like_a_module_is_never_opened() {
    let _g = podman_lock();
    let env = Env::new();
    let reference = images_var(&env, "KVCD_IMAGE_SPECIAL");
    let pipe = format!("/lib/modules/{}/extra/pipe.ko", env.fx.kver);
    // Not needed: a note, and the driver loads.
    let c = env.config(
        "special",
        &format!("modules = [\"kvcd_base\"]\n[image]\nref = \"{reference}\"\ntls_verify = false\n"),
    );
    let o = env.engine("podman").load(&c);
    assert_eq!(o.state, State::Loaded, "{o:#?}");
    assert!(
        detail(
            &o,
            &format!("{pipe} is a FIFO, not a regular file; left in the image")
        ),
        "{o:#?}"
    );
    assert!(
        detail(&o, "(1 other module file(s) left in the image)"),
        "{o:#?}"
    );
    // Needed: an error naming it (and nothing blocks on it).
    let c = env.config(
        "special",
        &format!("modules = [\"pipe\"]\n[image]\nref = \"{reference}\"\ntls_verify = false\n"),
    );
    let msg = fail(&env.engine("podman").load(&c), Step::Fetch);
    assert!(
        msg.contains(&format!(
            "module pipe: {pipe} is a FIFO, not a regular file"
        )),
        "{msg}"
    );
}

#[test]
fn readiness_follows_the_stored_files_and_a_cold_load_says_it_was_not_prepared() {
    use kvcd::reconciler::next::Readiness;
    let _g = podman_lock();
    let env = Env::new();
    let c = env.config("ready", PARAM_TAG);
    let engine = env.engine("podman");
    assert!(
        matches!(engine.readiness(&c), Readiness::NotPrepared(ref d) if d.starts_with("never prepared")),
        "{:?}",
        engine.readiness(&c)
    );
    assert_eq!(engine.prepare(&c).state, State::Prepared);
    let r = engine.readiness(&c);
    assert!(r.is_ready() && r.state() == "ready", "{r:?}");
    assert!(r.detail().contains("extracted and verified"), "{r:?}");

    // A stored file gone: not ready, and the module is named.
    let files = common::module_set(&env.state(), "ready", &env.fx.kver);
    fs::remove_file(&files["kvcd_param"]).unwrap();
    let r = engine.readiness(&c);
    assert!(
        matches!(r, Readiness::NotPrepared(ref d) if d.contains("kvcd_param") && d.contains("gone")),
        "{r:?}"
    );
    // Preparing again restores it.
    assert_eq!(engine.prepare(&c).state, State::Prepared);
    assert!(engine.readiness(&c).is_ready());

    // kernel_match leaving the kernel out: nothing to prepare, not a blocker.
    let other = env.config(
        "elsewhere",
        "kernel_match = \"^5\\\\.\"\nmodules = [\"kvcd_crc\"]\n[directory]\npath = \"/nonexistent\"\n",
    );
    let r = engine.readiness(&other);
    assert!(
        matches!(r, Readiness::NotApplicable(_)) && r.is_ready(),
        "{r:?}"
    );

    // The node booted a kernel the config was prepared for another time but
    // not this one: the load says so before fetching.
    let sets = env.state().join("sets");
    fs::create_dir_all(sets.join("6.1.0-1-amd64")).unwrap();
    fs::copy(
        sets.join(&env.fx.kver).join("ready.json"),
        sets.join("6.1.0-1-amd64/ready.json"),
    )
    .unwrap();
    fs::remove_dir_all(env.state().join("images/ready").join(&env.fx.kver)).unwrap();
    let o = engine.load(&c);
    assert_ok(&o);
    assert!(
        detail(
            &o,
            &format!(
                "ready was not prepared for kernel {} before this boot (it was for 6.1.0-1-amd64): fetching it now",
                env.fx.kver
            )
        ),
        "{o:#?}"
    );
    // Warm again: no such note.
    let o = engine.load(&c);
    assert!(!detail(&o, "before this boot"), "{o:#?}");
}
