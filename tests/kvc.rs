//! KVC library mode through the real `kvcd` binary and real podman: an
//! unmodified framework library (tests/fixtures/kvc) builds its image with
//! `kvc_c_build`, checks with `kvc_c_images`, and loads with
//! `kvc_c_run --privileged … modprobe`. On these hosts that modprobe fails
//! (the kernel cannot load modules), and that error must reach the state and
//! the log intact; kvcd never takes the library's word for what is loaded.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::Fixtures;

fn images_env(key: &str) -> String {
    common::images_env()
        .remove(key)
        .unwrap_or_else(|| panic!("{key} not set by scripts/images"))
}

struct Node {
    tmp: tempfile::TempDir,
    fx: Fixtures,
}

impl Node {
    fn new(library: &Path) -> Self {
        Self::named(library, "kvc-simple")
    }

    /// A node whose module config (and KVC instance) is called `name`.
    fn named(library: &Path, name: &str) -> Self {
        let fx = Fixtures::get();
        let tmp = tempfile::tempdir().unwrap();
        let etc = tmp.path().join("etc");
        fs::create_dir_all(etc.join("modules.d")).unwrap();
        fs::write(
            etc.join("kvcd.toml"),
            format!(
                "kernel_modules_dir = \"{}\"\nstate_dir = \"{}\"\nruntime_dir = \"{}\"\n",
                fx.modules_dir().display(),
                tmp.path().join("state").display(),
                tmp.path().join("run").display()
            ),
        )
        .unwrap();
        fs::write(
            etc.join(format!("modules.d/{name}.toml")),
            format!(
                "modules = [\"kvcd_param\", \"kvcd_base\"]\n[hooks]\nkvc_library = \"{}\"\n",
                library.display()
            ),
        )
        .unwrap();
        // The library's own settings, as /etc/kvc/kvc-simple.conf would hold them.
        let conf = fs::read_to_string(repo().join("tests/fixtures/kvc/kvc-simple.conf"))
            .unwrap()
            .replace("/usr/src/kvc-simple", &images_env("KVCD_BUILD_CONTEXT"));
        fs::create_dir_all(tmp.path().join("kvc")).unwrap();
        fs::write(tmp.path().join(format!("kvc/{name}.conf")), conf).unwrap();
        Self { tmp, fx }
    }

    fn trace(&self) -> PathBuf {
        self.tmp.path().join("trace")
    }

    fn kvcd(&self, args: &[&str]) -> (i32, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_kvcd"))
            .arg("--config-dir")
            .arg(self.tmp.path().join("etc"))
            .arg("apply")
            .arg("--kernel")
            .arg(&self.fx.kver)
            .args(args)
            .env("KVC_CONF_DIR", self.tmp.path().join("kvc"))
            .env("KVC_TRACE", self.trace())
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    }
}

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn an_unmodified_kvc_library_builds_then_fails_to_load_and_the_error_arrives_intact() {
    let _g = common::podman_lock();
    let library = repo().join("tests/fixtures/kvc/kvc-simple-lib.sh");
    let node = Node::new(&library);
    let image = format!("kvc-simple-1.2.0:{}", node.fx.kver);
    let _ = Command::new("podman").args(["rmi", &image]).output();

    let (code, out) = node.kvcd(&["kvc-simple"]);
    assert_eq!(code, 1, "{out}");
    let podman = "runtime=podman";
    let k = &node.fx.kver;
    assert_eq!(
        fs::read_to_string(node.trace()).unwrap(),
        format!(
            "build_kmods action=build name=kvc-simple kver={k} {podman}\n\
             load_kmods action=load name=kvc-simple kver={k} {podman}\n"
        )
    );
    assert!(
        out.contains(&format!("kvc-simple: kvc: build_kmods: building {image}")),
        "{out}"
    );
    let failure = format!(
        "kvc-simple: failed at kvc: hook load_kmods ({}) failed: exit status 1; last stderr lines:\n  modprobe: ",
        library.display()
    );
    // modprobe's own words, from inside the container, are in the error.
    assert!(out.contains(&failure), "{out}");
    assert!(!node.tmp.path().join("run/loaded/kvc-simple.json").exists());

    // The image is there now: the second build_kmods skips the build.
    let (_, out) = node.kvcd(&["--json", "kvc-simple"]);
    let doc: serde_json::Value = serde_json::from_str(&out).unwrap();
    let r = &doc["results"][0];
    assert_eq!(r["state"], "failed");
    assert_eq!(r["error"]["step"], "kvc");
    let steps = details(r);
    assert!(
        steps.contains(&format!("build_kmods: {image} is already built").as_str()),
        "{steps:?}"
    );
    // kvc_c_images, then one kvc_c_run for the first modprobe, which fails.
    assert_eq!(r["podman_calls"], 2, "{steps:?}");
    assert!(
        steps.contains(&"build_kmods made 1 podman call(s) through the kvc_c_* helpers"),
        "{steps:?}"
    );
    assert!(
        steps.contains(&"running build_kmods with KVC_CONTAINER_RUNTIME=podman"),
        "{steps:?}"
    );
    let _ = Command::new("podman").args(["rmi", &image]).output();
}

/// The `detail` of every step of one JSON result.
fn details(r: &serde_json::Value) -> Vec<&str> {
    r["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["detail"].as_str().unwrap())
        .collect()
}

#[test]
fn prepare_runs_the_library_build_for_another_kernel_and_no_load_hooks() {
    let _g = common::podman_lock();
    let library = repo().join("tests/fixtures/kvc/kvc-simple-lib.sh");
    let node = Node::named(&library, "kvc-prepare");
    let k = node.fx.kver.clone();
    assert_ne!(
        k,
        kvcd::kernel::KernelRelease::running().unwrap().to_string(),
        "the fixture kernel must not be the running one"
    );
    let image = format!("localhost/kvc-prepare-1.2.0:{k}");
    let _ = Command::new("podman").args(["rmi", &image]).output();
    // A load hook that would leave a mark.
    let marker = node.tmp.path().join("pre_load-ran");
    let cfg = node.tmp.path().join("etc/modules.d/kvc-prepare.toml");
    let text = fs::read_to_string(&cfg).unwrap().replace(
        "[hooks]\n",
        &format!(
            "[hooks]\npre_load = [\"/usr/bin/touch\", \"{}\"]\n",
            marker.display()
        ),
    );
    fs::write(&cfg, text).unwrap();

    let (code, out) = node.kvcd(&["--prepare", "--json", "kvc-prepare"]);
    assert_eq!(code, 0, "{out}");
    let doc: serde_json::Value = serde_json::from_str(&out).unwrap();
    let r = &doc["results"][0];
    assert_eq!(r["state"], "prepared", "{out}");
    assert_eq!(r["kernel"], k.as_str());
    // kvc_c_images found nothing, kvc_c_build built it.
    assert_eq!(r["podman_calls"], 2, "{out}");
    let steps = details(r);
    assert!(
        steps.contains(&format!("build_kmods: building kvc-prepare-1.2.0:{k}").as_str()),
        "{steps:?}"
    );
    assert!(steps.iter().all(|s| !s.trim().is_empty()), "{steps:?}");
    assert!(!marker.exists(), "pre_load ran for a prepare");
    assert_eq!(
        fs::read_to_string(node.trace()).unwrap(),
        format!("build_kmods action=build name=kvc-prepare kver={k} runtime=podman\n")
    );
    let (code, label) = podman_out(&["image", "inspect", "--format", "{{.Labels.name}}", &image]);
    assert_eq!((code, label.trim()), (0, "kvc-prepare"), "{label}");
    assert!(!node.tmp.path().join("run/loaded/kvc-prepare.json").exists());

    // prepare-next finds the same kernel installed (not running) and the image
    // built; with [signing] set too (kvcd cannot sign a library's files, so
    // they are ready as the library built them).
    let keys = node.tmp.path().join("keys");
    fs::create_dir_all(&keys).unwrap();
    let (key, cert) = common::make_key(&keys, "k", "kvcd kvc test key", "rsa:2048");
    let toml = node.tmp.path().join("etc/kvcd.toml");
    let mut t = fs::read_to_string(&toml).unwrap();
    t.push_str(&format!(
        "[signing]\nkey = \"{}\"\ncert = \"{}\"\n",
        key.display(),
        cert.display()
    ));
    fs::write(&toml, t).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_kvcd"))
        .arg("--config-dir")
        .arg(node.tmp.path().join("etc"))
        .args(["prepare-next", "--json", "kvc-prepare"])
        .env("KVC_CONF_DIR", node.tmp.path().join("kvc"))
        .env("KVC_TRACE", node.trace())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    let doc: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(doc["kernels"][0]["release"], k.as_str(), "{text}");
    assert_eq!(doc["kernels"][0]["configs"][0]["state"], "ready", "{text}");
    let r = &doc["kernels"][0]["results"][0];
    assert_eq!(r["state"], "prepared", "{text}");
    assert_eq!(r["podman_calls"], 1, "{text}");
    assert!(
        details(r)
            .contains(&format!("build_kmods: kvc-prepare-1.2.0:{k} is already built").as_str()),
        "{text}"
    );
    assert!(!marker.exists());
    let _ = Command::new("podman").args(["rmi", &image]).output();
}

#[test]
fn a_library_action_that_hangs_is_killed_at_build_timeout_seconds_with_its_container() {
    let _g = common::podman_lock();
    let tmp = tempfile::tempdir().unwrap();
    let library = tmp.path().join("hang-lib.sh");
    // PID 1 in the container ignores SIGTERM: only removing the container stops it.
    fs::write(
        &library,
        format!(
            "build_kmods() {{ echo started; kvc_c_run {} sh -c 'echo in-container; exec sleep 67'; }}\n",
            images_env("KVCD_IMAGE_BASE")
        ),
    )
    .unwrap();
    let node = Node::new(&library);
    let cfg = node.tmp.path().join("etc/modules.d/kvc-simple.toml");
    let text = fs::read_to_string(&cfg).unwrap() + "build_timeout_seconds = 5\n";
    fs::write(&cfg, text).unwrap();
    let start = std::time::Instant::now();
    let (code, out) = node.kvcd(&["--prepare", "kvc-simple"]);
    assert_eq!(code, 1, "{out}");
    assert!(start.elapsed().as_secs() < 60, "{out}");
    assert!(
        out.contains("kvc-simple: kvc: build_kmods: in-container"),
        "the container ran: {out}"
    );
    assert!(
        out.contains("kvc-simple: failed at kvc: hook build_kmods ("),
        "{out}"
    );
    assert!(
        out.contains("timed out after 5s; its process group was killed"),
        "{out}"
    );
    assert!(
        out.contains(
            "kvc-simple: kvc: removed 1 container(s) the library's kvc_c_run left running: "
        ),
        "{out}"
    );
    let (code, left) = podman_out(&["ps", "-aq", "--filter", "label=org.kvcd.kvc-action"]);
    assert_eq!((code, left.trim()), (0, ""), "{out}");
}

fn podman_out(args: &[&str]) -> (i32, String) {
    let out = Command::new("podman").args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[test]
fn kvcd_checks_the_kernel_rather_than_trusting_load_kmods() {
    let tmp = tempfile::tempdir().unwrap();
    let library = tmp.path().join("liar-lib.sh");
    fs::write(
        &library,
        "build_kmods() { echo built; }\nload_kmods() { echo \"loaded (not really)\"; }\nunload_kmods() { :; }\n",
    )
    .unwrap();
    let node = Node::new(&library);
    let (code, out) = node.kvcd(&["kvc-simple"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("kvc-simple: kvc: load_kmods: loaded (not really)"),
        "{out}"
    );
    assert!(
        out.contains("kvc-simple: failed at kvc: load_kmods succeeded, but the kernel does not have: kvcd_param, kvcd_base"),
        "{out}"
    );

    // A library that leaves a function out fails the way KVC's dispatcher does.
    fs::write(&library, "build_kmods() { :; }\n").unwrap();
    let (code, out) = node.kvcd(&["kvc-simple"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("load_kmods is unimplemented for kvc-simple!"),
        "{out}"
    );
}

/// An engine for the fixture kernel over a fake kernel (this host cannot load modules).
fn fake_engine<'a>(
    tmp: &Path,
    fx: &Fixtures,
    fake: &'a common::FakeKernel,
) -> kvcd::reconciler::Engine<'a> {
    kvcd::reconciler::Engine {
        layout: kvcd::artifacts::ModuleStore::new(tmp.join("state"), fx.modules_dir()),
        kernel: kvcd::kernel::KernelRelease::parse(&fx.kver).unwrap(),
        kmods: fake,
        firmware_dir: tmp.join("firmware"),
        keep_kernels: 3,
        protect: Vec::new(),
        target_is_live: true,
        podman: Box::new(kvcd::artifacts::podman::Podman::new(Path::new("podman"))),
        records: kvcd::reconciler::RecordStore::new(&tmp.join("run")),
        on_step: None,
        signing: None,
        sysfs: PathBuf::from("/sys"),
    }
}

#[test]
fn library_mode_takes_out_replace_in_tree_and_puts_it_back() {
    use kvcd::kmod::KernelModules as _;
    let fx = Fixtures::get();
    let tmp = tempfile::tempdir().unwrap();
    let fake = common::FakeKernel::default();
    let in_tree = fx
        .modules_dir()
        .join(&fx.kver)
        .join("kernel/drivers/net/dummy.ko");
    fake.preload("dummy", &in_tree, &[]);
    // What the library's load_kmods would have loaded (the fake kernel is this process's).
    fake.preload("kvcd_param", &fx.ko().join("kvcd_param.ko"), &[]);
    let library = tmp.path().join("x-lib.sh");
    let fail = tmp.path().join("fail");
    fs::write(
        &library,
        format!(
            "build_kmods() {{ :; }}\nload_kmods() {{ [ ! -e '{}' ]; }}\nunload_kmods() {{ :; }}\n",
            fail.display()
        ),
    )
    .unwrap();
    let etc = tmp.path().join("etc");
    fs::create_dir_all(etc.join("modules.d")).unwrap();
    fs::write(
        etc.join("modules.d/x.toml"),
        format!(
            "modules = [\"kvcd_param\"]\nreplace_in_tree = [\"dummy\"]\n[hooks]\nkvc_library = \"{}\"\n",
            library.display()
        ),
    )
    .unwrap();
    let config = kvcd::config::Config::load(&[etc], &kvcd::config::Overrides::default());
    let c = config.module("x").unwrap();
    let engine = fake_engine(tmp.path(), &fx, &fake);
    let records = kvcd::reconciler::RecordStore::new(&tmp.path().join("run"));

    // load_kmods fails: the in-tree module goes back.
    fs::write(&fail, "").unwrap();
    let o = engine.load(c);
    assert_eq!(o.state, kvcd::reconciler::State::Failed, "{o:#?}");
    assert_eq!(fake.take_log(), ["remove dummy", "insert dummy"]);
    assert_eq!(fake.path_of("dummy").unwrap(), in_tree);
    assert!(records.get("x").unwrap().is_none());

    // load_kmods succeeds: dummy stays out and is recorded; a second load leaves it alone.
    fs::remove_file(&fail).unwrap();
    let o = engine.load(c);
    assert_eq!(o.state, kvcd::reconciler::State::Loaded, "{o:#?}");
    assert_eq!(fake.take_log(), ["remove dummy"]);
    let r = records.get("x").unwrap().unwrap();
    assert_eq!(r.removed_in_tree, [common::m("dummy")]);
    let o = engine.load(c);
    assert_eq!(o.state, kvcd::reconciler::State::Loaded, "{o:#?}");
    assert!(fake.take_log().is_empty());

    // unload_kmods (here: as if it ran rmmod), then the in-tree module is restored.
    fake.remove(&common::m("kvcd_param"), false).unwrap();
    fake.take_log();
    let o = engine.unload("x", Some(c));
    assert_eq!(o.state, kvcd::reconciler::State::Inactive, "{o:#?}");
    assert_eq!(fake.take_log(), ["insert dummy"]);
    assert_eq!(fake.path_of("dummy").unwrap(), in_tree);
    assert!(records.get("x").unwrap().is_none());
}
