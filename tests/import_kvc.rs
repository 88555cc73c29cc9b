//! `kvcctl import-kvc` on KVC trees as they are found on hosts.

#![allow(clippy::unwrap_used, clippy::expect_used)]

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
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        fs::create_dir_all(tmp.path().join("no-lib")).unwrap();
        fs::create_dir_all(tmp.path().join("etc-kvcd")).unwrap();
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

    /// `kvcctl import-kvc` with the fixture KVC tree, no libraries, and this host's config dir.
    fn import(&self, extra: &[&str]) -> (i32, String, String) {
        let (cfg, kvc) = (self.config_dir(), kvc_dir());
        let lib = self.tmp.path().join("no-lib").display().to_string();
        let mut args = vec![
            "--config-dir",
            &cfg,
            "import-kvc",
            "--kvc-dir",
            &kvc,
            "--lib-dir",
            &lib,
        ];
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
        "localhost/kvcd/simple-kmod-${MOD_VERSION}:${KERNEL_FULL_VERSION}"
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
    assert!(!ice.contains_key("replace_in_tree"));

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
        "localhost/kvcd/dynamic:${KERNEL_FULL_VERSION}"
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
