//! `kvcctl import-kvc` on KVC trees as they are found on hosts.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/kvc-import")
}

fn kvc_dir() -> String {
    fixtures().join("etc/kvc").display().to_string()
}

fn kvcctl(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_kvcctl"))
        .args(args)
        .env_remove("KVCD_LOG")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A configuration directory to write into and a library directory with no libraries.
struct Host {
    tmp: tempfile::TempDir,
}

impl Host {
    /// kvcd.toml points at the fixture kernel's module tree (Debian's, with its in-tree modules).
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        fs::create_dir_all(tmp.path().join("no-lib")).unwrap();
        fs::create_dir_all(tmp.path().join("etc-kvcd")).unwrap();
        fs::write(
            tmp.path().join("etc-kvcd/kvcd.toml"),
            format!(
                "kernel_modules_dir = \"{}\"\nstate_dir = \"{}\"\nruntime_dir = \"{}\"\n",
                common::Fixtures::get().modules_dir().display(),
                tmp.path().join("state").display(),
                tmp.path().join("run").display()
            ),
        )
        .unwrap();
        Self { tmp }
    }

    fn config_dir(&self) -> String {
        self.tmp.path().join("etc-kvcd").display().to_string()
    }

    fn target(&self, name: &str) -> PathBuf {
        self.tmp
            .path()
            .join(format!("etc-kvcd/modules.d/{name}.toml"))
    }

    /// `kvcctl import-kvc` with the fixture KVC tree, no libraries, this host's
    /// config dir and the fixture kernel.
    fn import(&self, extra: &[&str]) -> (i32, String, String) {
        self.import_from(&kvc_dir(), extra)
    }

    fn import_from(&self, kvc: &str, extra: &[&str]) -> (i32, String, String) {
        let cfg = self.config_dir();
        let lib = self.tmp.path().join("no-lib").display().to_string();
        let kver = common::Fixtures::get().kver;
        let mut args = vec![
            "--config-dir",
            &cfg,
            "import-kvc",
            "--kvc-dir",
            kvc,
            "--lib-dir",
            &lib,
        ];
        if !extra.contains(&"--kernel") {
            args.extend(["--kernel", kver.as_str()]);
        }
        args.extend_from_slice(extra);
        kvcctl(&args)
    }

    fn read(&self, name: &str) -> toml::Table {
        toml::from_str(&fs::read_to_string(self.target(name)).unwrap()).unwrap()
    }
}

fn s<'a>(t: &'a toml::Table, path: &str) -> &'a str {
    let mut v: &toml::Value = &t[path.split('.').next().unwrap()];
    for key in path.split('.').skip(1) {
        v = &v[key];
    }
    v.as_str().unwrap()
}

fn strings(v: &toml::Value) -> Vec<&str> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap())
        .collect()
}

#[test]
fn simple_kmod_and_ice_convert_and_validate() {
    let h = Host::new();
    let (code, out, err) = h.import(&["simple-kmod", "ice", "--write"]);
    assert_eq!(code, 0, "{out}\n{err}");
    for name in ["simple-kmod", "ice"] {
        let want = format!("wrote {}", h.target(name).display());
        assert!(out.contains(&want), "{out}");
    }
    assert!(
        err.contains(
            "ice: KMOD_EXTRA_NAMES (auxiliary gnss) not converted: kvcd loads in-tree dependencies itself"
        ),
        "{err}"
    );

    let simple = h.read("simple-kmod");
    assert_eq!(s(&simple, "version"), "dd1a7d4");
    assert_eq!(
        strings(&simple["modules"]),
        ["simple-kmod", "simple-procfs-kmod"]
    );
    assert_eq!(
        s(&simple, "description"),
        format!("imported from {}/simple-kmod.conf", kvc_dir())
    );
    assert_eq!(
        s(&simple, "image.ref"),
        "localhost/simple-kmod-${MOD_VERSION}:${KERNEL_FULL_VERSION}"
    );
    assert_eq!(s(&simple, "image.pull"), "never");
    assert_eq!(
        s(&simple, "build.context"),
        "https://github.com/kmods-via-containers/kvc-simple-kmod.git"
    );
    assert_eq!(s(&simple, "build.file"), "Dockerfile.fedora");
    assert_eq!(s(&simple, "build.args.KVER"), "${KERNEL_FULL_VERSION}");
    assert_eq!(s(&simple, "build.args.KMODVER"), "${MOD_VERSION}");
    let text = fs::read_to_string(h.target("simple-kmod")).unwrap();
    assert!(
        text.starts_with(&format!(
            "# Converted by `kvcctl import-kvc` from {}/simple-kmod.conf\n",
            kvc_dir()
        )),
        "{text}"
    );

    let ice = h.read("ice");
    assert_eq!(strings(&ice["modules"]), ["ice"]);
    assert_eq!(s(&ice, "version"), "1.14.9");
    assert_eq!(s(&ice, "build.context"), "/usr/src/kvc-ice-kmod");
    assert_eq!(s(&ice, "build.file"), "Containerfile.rhel");
    // ice is also a module of the kernel's own tree: the out-of-tree one replaces it.
    assert_eq!(strings(&ice["replace_in_tree"]), ["ice"]);
    let kver = common::Fixtures::get().kver;
    assert!(
        err.contains(&format!("ice: ice is also an in-tree module of {kver}; added replace_in_tree = [\"ice\"] so the out-of-tree one replaces it")),
        "{err}"
    );
    assert!(!simple.contains_key("replace_in_tree"));

    let (code, out, _) = kvcctl(&["config", "validate", &h.config_dir()]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        out.trim(),
        "2 module config(s) valid, 0 invalid, 0 error(s)"
    );
}

#[test]
fn an_existing_library_is_kept_in_sourcing_order() {
    let h = Host::new();
    let f = fixtures();
    let (local, usr) = (
        f.join("usr/local/lib/kvc").display().to_string(),
        f.join("usr/lib/kvc").display().to_string(),
    );
    let (cfg, kvc) = (h.config_dir(), kvc_dir());
    let kver = common::Fixtures::get().kver;
    let (code, out, err) = kvcctl(&[
        "--config-dir",
        &cfg,
        "import-kvc",
        "simple-kmod",
        "--kvc-dir",
        &kvc,
        "--lib-dir",
        &local,
        "--lib-dir",
        &usr,
        "--kernel",
        &kver,
        "--write",
    ]);
    assert_eq!(code, 0, "{out}\n{err}");
    let t = h.read("simple-kmod");
    assert_eq!(
        strings(&t["hooks"]["kvc_library"]),
        [
            format!("{local}/simple-kmod-lib.sh"),
            format!("{usr}/simple-kmod-lib.sh")
        ]
    );
    assert!(!t.contains_key("image") && !t.contains_key("build"), "{t}");
    assert_eq!(
        strings(&t["modules"]),
        ["simple-kmod", "simple-procfs-kmod"]
    );
    assert!(err.contains("keep that file"), "{err}");
    // The library owns its versions: no `version` in the config.
    assert!(!t.contains_key("version"), "{t}");
    assert!(
        err.contains(
            "simple-kmod: KMOD_SOFTWARE_VERSION (dd1a7d4, line 3) is not written as `version`"
        ),
        "{err}"
    );
    let (code, out, _) = kvcctl(&["config", "validate", &cfg]);
    assert_eq!(code, 0, "{out}");
}

#[test]
fn missing_variables_are_named_and_other_names_still_convert() {
    let h = Host::new();
    let (code, out, err) = h.import(&["incomplete", "simple-kmod", "--write"]);
    assert_eq!(code, 1, "{out}\n{err}");
    let line = err
        .lines()
        .find(|l| l.starts_with("incomplete: error: "))
        .unwrap_or_else(|| panic!("{err}"));
    for want in [
        "KMOD_NAMES is not set",
        "KMOD_CONTAINER_BUILD_CONTEXT is not set and there is no KVC library",
        "KMOD_CONTAINER_BUILD_FILE is not set",
    ] {
        assert!(line.contains(want), "{line}");
    }
    assert!(!h.target("incomplete").exists());
    assert!(h.target("simple-kmod").is_file(), "{out}");
}

#[test]
fn an_existing_file_is_replaced_only_with_force() {
    let h = Host::new();
    let (code, _, err) = h.import(&["simple-kmod", "--write"]);
    assert_eq!(code, 0, "{err}");
    let mine = "# edited by hand\n";
    fs::write(h.target("simple-kmod"), mine).unwrap();

    let (code, out, err) = h.import(&["simple-kmod", "ice", "--write"]);
    assert_eq!(code, 1, "{out}\n{err}");
    let want = format!(
        "simple-kmod: error: {} already exists; not overwritten (use --force to replace it)",
        h.target("simple-kmod").display()
    );
    assert!(err.contains(&want), "{err}");
    assert_eq!(fs::read_to_string(h.target("simple-kmod")).unwrap(), mine);
    assert!(h.target("ice").is_file(), "the other name is still written");

    let (code, out, err) = h.import(&["simple-kmod", "--write", "--force"]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("wrote "), "{out}");
    assert_eq!(s(&h.read("simple-kmod"), "version"), "dd1a7d4");

    // --force means nothing without --write.
    let (code, _, err) = h.import(&["simple-kmod", "--force"]);
    assert_eq!(code, 2, "{err}");
}

#[test]
fn a_command_substitution_line_is_reported_with_its_number() {
    let h = Host::new();
    let (code, out, err) = h.import(&["dynamic"]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        err.contains(
            "dynamic: could not convert line 3: command substitution `$(…)` is not run: KMOD_SOFTWARE_VERSION=$(git ls-remote"
        ),
        "{err}"
    );
    // Printed, not written; the rest of the file is converted, without a version.
    assert!(!h.target("dynamic").exists());
    let t: toml::Table = toml::from_str(&out).unwrap();
    assert_eq!(strings(&t["modules"]), ["dynamic-kmod"]);
    assert!(!t.contains_key("version"), "{out}");
    assert_eq!(
        s(&t, "image.ref"),
        "localhost/dynamic:${KERNEL_FULL_VERSION}"
    );
    assert!(out.contains("#   could not convert line 3:"), "{out}");
}

#[test]
fn without_names_every_conf_but_the_framework_file_is_imported_as_json() {
    let h = Host::new();
    let (code, out, err) = h.import(&["--json"]);
    assert_eq!(code, 1, "incomplete.conf cannot be converted: {out}");
    assert!(err.is_empty(), "{err}");
    let doc: serde_json::Value = serde_json::from_str(&out).unwrap();
    let results = doc["results"].as_array().unwrap();
    let names: Vec<&str> = results
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["dynamic", "ice", "incomplete", "simple-kmod"]);
    for r in results {
        let keys: Vec<&str> = r.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            ["error", "name", "notes", "source", "toml", "written"]
        );
        assert!(r["written"].is_null());
        assert_eq!(r["error"].is_null(), r["name"] != "incomplete", "{r}");
        assert_eq!(r["toml"].is_null(), r["name"] == "incomplete", "{r}");
        assert!(
            r["source"]
                .as_str()
                .unwrap()
                .ends_with(&format!("/etc/kvc/{}.conf", r["name"].as_str().unwrap()))
        );
    }
    assert_eq!(results[0]["notes"].as_array().unwrap().len(), 2);
}

/// A KVC directory in a temp dir with `files` (name, text).
fn kvc_tree(h: &Host, files: &[(&str, &str)]) -> String {
    let dir = h.tmp.path().join("kvc");
    fs::create_dir_all(&dir).unwrap();
    for (name, text) in files {
        fs::write(dir.join(name), text).unwrap();
    }
    dir.display().to_string()
}

#[test]
fn modules_of_the_kernels_own_tree_get_replace_in_tree_and_a_runtime_is_reported() {
    let h = Host::new();
    let kvc = kvc_tree(
        &h,
        &[
            (
                "kmods-via-containers.conf",
                "KVC_CONTAINER_RUNTIME=docker\n",
            ),
            (
                "kvc-dummy.conf",
                "KMOD_CONTAINER_BUILD_CONTEXT=/usr/src/kvc-dummy\nKMOD_CONTAINER_BUILD_FILE=Containerfile\nKMOD_SOFTWARE_VERSION=1.0.0\nKMOD_NAMES=\"dummy kvcd_param\"\n",
            ),
        ],
    );
    let kver = common::Fixtures::get().kver;
    // The fixture module `dummy` has the name of Debian's kernel/drivers/net/dummy.ko.
    assert!(
        common::Fixtures::get()
            .modules_dir()
            .join(&kver)
            .join("kernel/drivers/net/dummy.ko")
            .is_file()
    );
    let (code, out, err) = h.import_from(&kvc, &["--json"]);
    assert_eq!(code, 0, "{out}\n{err}");
    let doc: serde_json::Value = serde_json::from_str(&out).unwrap();
    let r = &doc["results"][0];
    assert_eq!(r["name"], "kvc-dummy");
    let notes: Vec<&str> = r["notes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap())
        .collect();
    assert!(
        notes.contains(
            &format!("dummy is also an in-tree module of {kver}; added replace_in_tree = [\"dummy\"] so the out-of-tree one replaces it").as_str()
        ),
        "{notes:?}"
    );
    let runtime = notes
        .iter()
        .find(|n| {
            n.starts_with(&format!(
                "KVC_CONTAINER_RUNTIME=docker ({kvc}/kmods-via-containers.conf line 1): "
            ))
        })
        .unwrap_or_else(|| panic!("{notes:?}"));
    assert!(runtime.contains("with podman"), "{runtime}");
    let t: toml::Table = toml::from_str(r["toml"].as_str().unwrap()).unwrap();
    assert_eq!(strings(&t["replace_in_tree"]), ["dummy"]);
    assert_eq!(strings(&t["modules"]), ["dummy", "kvcd_param"]);

    // A kernel with no module tree: said, not fatal.
    let (code, out, err) = h.import_from(&kvc, &["--kernel", "9.9.9-none"]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        err.contains("kvc-dummy: could not look for in-tree modules of kernel 9.9.9-none ("),
        "{err}"
    );
    assert!(!out.contains("\nreplace_in_tree ="), "{out}");
}

#[test]
fn an_image_kvc_built_is_used_by_the_imported_config_without_a_build() {
    let _g = common::podman_lock();
    let h = Host::new();
    let fx = common::Fixtures::get();
    let kver = fx.kver;
    let context = common::images_env()["KVCD_BUILD_CONTEXT"].clone();
    // The fixture library's settings, with this checkout's build context.
    let conf = fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/kvc/kvc-simple.conf"),
    )
    .unwrap()
    .replace("/usr/src/kvc-simple", &context);
    // Its own instance name, so no other test shares the image.
    let kvc = kvc_tree(&h, &[("kvc-migrated.conf", &conf)]);
    let image = format!("localhost/kvc-migrated-1.2.0:{kver}");
    let _ = Command::new("podman")
        .args(["rmi", "--force", &image])
        .output();

    // KVC's own build, by the unmodified fixture library: it names the image `NAME-VERSION:KVER`, here `kvc-migrated-1.2.0:KVER`.
    let lib = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/kvc/kvc-simple-lib.sh");
    let built = kvcd::hooks::kvc::command(
        &[lib],
        kvcd::hooks::kvc::KvcAction::Build,
        "kvc-migrated",
        &kver,
        Path::new("podman"),
        &[],
    )
    .env("KVC_CONF_DIR", &kvc)
    .output()
    .unwrap();
    assert!(
        built.status.success(),
        "{}",
        String::from_utf8_lossy(&built.stderr)
    );
    let exists = Command::new("podman")
        .args(["image", "exists", &image])
        .status()
        .unwrap();
    assert!(exists.success(), "KVC's build stores {image}");

    // Imported without the library: kvcd's own pipeline, under KVC's image name.
    let (code, out, err) = h.import_from(&kvc, &["kvc-migrated", "--write"]);
    assert_eq!(code, 0, "{out}\n{err}");
    let t = h.read("kvc-migrated");
    assert_eq!(
        s(&t, "image.ref"),
        "localhost/kvc-migrated-${MOD_VERSION}:${KERNEL_FULL_VERSION}"
    );

    let apply = Command::new(env!("CARGO_BIN_EXE_kvcd"))
        .args(["--config-dir", &h.config_dir()])
        .args([
            "apply",
            "--prepare",
            "--json",
            "--kernel",
            &kver,
            "kvc-migrated",
        ])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&apply.stdout).into_owned();
    let _ = Command::new("podman")
        .args(["rmi", "--force", &image])
        .output();
    assert_eq!(apply.status.code(), Some(0), "{out}");
    let doc: serde_json::Value = serde_json::from_str(&out).unwrap();
    let r = &doc["results"][0];
    assert_eq!(r["state"], "prepared", "{out}");
    assert_eq!(r["image"]["reference"], image.as_str(), "{out}");
    let steps: Vec<&str> = r["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["detail"].as_str().unwrap())
        .collect();
    assert!(
        steps.contains(&format!("image {image} is present").as_str()),
        "{steps:?}"
    );
    assert!(
        !steps
            .iter()
            .any(|s| s.starts_with(&format!("built {image}"))),
        "nothing rebuilt: {steps:?}"
    );
    assert!(r["podman_calls"].as_u64().unwrap() >= 1, "{out}");
}

#[test]
fn a_conf_that_is_a_fifo_is_refused_without_waiting() {
    let h = Host::new();
    let kvc = kvc_tree(&h, &[]);
    let fifo = Path::new(&kvc).join("kvc-fifo.conf");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let (code, out, err) = h.import_from(&kvc, &["kvc-fifo", "--json"]);
    assert_eq!(code, 1, "{out}\n{err}");
    let doc: serde_json::Value = serde_json::from_str(&out).unwrap();
    let e = doc["results"][0]["error"].as_str().unwrap();
    assert_eq!(
        e,
        format!(
            "{}: not a regular file (a FIFO); configs must be regular files",
            fifo.display()
        )
    );
}
