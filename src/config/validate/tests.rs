use std::fs;
use std::path::{Path, PathBuf};

use crate::config::{Config, ConfigError, Overrides, PullPolicy, Source};

const GOOD: &str = r#"
description = "example"
version = "1.2.0"
modules = ["simple-kmod", "simple_procfs_kmod"]
replace_in_tree = ["dummy"]
kernel_match = '^6\.'

[parameters]
simple-kmod = ["debug=1", 'label="two words"']

[directory]
path = "/usr/lib/kvcd/simple-kmod/${KERNEL_FULL_VERSION}"
"#;

struct Tree {
    _tmp: tempfile::TempDir,
    dirs: Vec<PathBuf>,
}

impl Tree {
    /// Three config dirs: usr < run < etc.
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let dirs: Vec<PathBuf> = ["usr", "run", "etc"]
            .iter()
            .map(|d| tmp.path().join(d))
            .collect();
        for d in &dirs {
            fs::create_dir_all(d.join("modules.d")).unwrap();
        }
        Self { _tmp: tmp, dirs }
    }

    fn module(&self, dir: usize, name: &str, text: &str) -> PathBuf {
        let p = self.dirs[dir]
            .join("modules.d")
            .join(format!("{name}.toml"));
        fs::write(&p, text).unwrap();
        p
    }

    fn load(&self) -> Config {
        Config::load(&self.dirs, &Overrides::default())
    }
}

/// Loads a single module config and returns its errors.
fn errors_of(text: &str) -> (PathBuf, Vec<ConfigError>) {
    let t = Tree::new();
    let file = t.module(2, "x", text);
    let c = t.load();
    let errs = c.modules["x"]
        .result
        .clone()
        .expect_err("config should be invalid");
    (file, errs)
}

fn one_error(text: &str) -> ConfigError {
    let (file, mut errs) = errors_of(text);
    assert_eq!(errs.len(), 1, "{errs:#?}");
    let e = errs.remove(0);
    assert_eq!(e.file, file);
    e
}

#[test]
fn good_config_validates_into_domain_types() {
    let t = Tree::new();
    t.module(0, "simple-kmod", GOOD);
    let c = t.load();
    assert!(c.all_errors().is_empty(), "{:#?}", c.all_errors());
    let m = c.module("simple-kmod").unwrap();
    let names: Vec<_> = m.modules.iter().map(|n| n.as_str()).collect();
    assert_eq!(names, ["simple_kmod", "simple_procfs_kmod"]);
    assert_eq!(m.version.as_deref(), Some("1.2.0"));
    assert_eq!(m.replace_in_tree[0].as_str(), "dummy");
    assert_eq!(
        m.parameters_for(&m.modules[0]),
        ["debug=1", "label=\"two words\""]
    );
    assert!(m.parameters_for(&m.modules[1]).is_empty());
    let Source::Directory { path } = &m.source else {
        panic!("expected a directory source")
    };
    assert_eq!(path, "/usr/lib/kvcd/simple-kmod/${KERNEL_FULL_VERSION}");
    assert!(m.supports(&crate::kernel::KernelRelease::parse("6.1.0-27-amd64").unwrap()));
    assert!(!m.supports(&crate::kernel::KernelRelease::parse("5.14.0-1.el9").unwrap()));
}

#[test]
fn later_dir_wins_and_dev_null_masks() {
    let t = Tree::new();
    t.module(0, "a", &GOOD.replace("1.2.0", "0.1"));
    let etc_a = t.module(2, "a", GOOD);
    t.module(0, "b", GOOD);
    std::os::unix::fs::symlink("/dev/null", t.dirs[1].join("modules.d/b.toml")).unwrap();
    let c = t.load();
    assert_eq!(c.module("a").unwrap().version.as_deref(), Some("1.2.0"));
    assert_eq!(c.modules["a"].file, etc_a);
    assert_eq!(
        c.modules["a"].shadows,
        vec![t.dirs[0].join("modules.d/a.toml")]
    );
    assert!(!c.modules.contains_key("b"));
    assert_eq!(c.masked, vec![t.dirs[1].join("modules.d/b.toml")]);
    let err = c.module("b").unwrap_err().to_string();
    assert!(err.contains("no module config named \"b\""), "{err}");
}

#[test]
fn a_broken_file_fails_only_itself() {
    let t = Tree::new();
    t.module(2, "good", GOOD);
    t.module(2, "bad", "modules = [");
    let c = t.load();
    assert!(c.module("good").is_ok());
    assert!(c.module("bad").is_err());
    assert_eq!(c.all_errors().len(), 1);
}

#[test]
fn malformed_toml_names_file_line_and_column() {
    let e = one_error("description = \"x\"\nmodules = [\"a\"\n");
    let shown = e.to_string();
    assert!(
        shown.ends_with("x.toml:2:15: key `modules`: unclosed array, expected `]`"),
        "{shown}"
    );
}

#[test]
fn unknown_key_is_named() {
    let e = one_error(&format!("{GOOD}\n[directory2]\npath = \"/x\"\n"));
    assert!(e.message.contains("unknown field `directory2`"), "{e}");
    assert!(e.line.is_some());

    let e = one_error(&GOOD.replace("path =", "pth = \"/x\"\npath ="));
    assert!(e.message.contains("unknown field `pth`"), "{e}");
    assert_eq!(e.key.as_deref(), Some("directory.pth"), "{e}");
}

#[test]
fn wrong_type_names_the_key() {
    let e = one_error(&GOOD.replace(
        "modules = [\"simple-kmod\", \"simple_procfs_kmod\"]",
        "modules = \"simple-kmod\"",
    ));
    assert_eq!(e.key.as_deref(), Some("modules"), "{e}");
    assert!(e.message.contains("expected a sequence"), "{e}");
    assert_eq!(e.line, Some(4));

    let e = one_error(&format!("force_unload = \"yes\"\n{GOOD}"));
    assert_eq!(e.key.as_deref(), Some("force_unload"), "{e}");
    assert!(e.message.contains("expected a boolean"), "{e}");
}

#[test]
fn unknown_template_variable_is_an_error() {
    let e = one_error(&GOOD.replace("${KERNEL_FULL_VERSION}", "${KERNEL_VERSION}"));
    assert_eq!(e.key.as_deref(), Some("directory.path"));
    assert!(
        e.message
            .contains("unknown template variable ${KERNEL_VERSION}"),
        "{e}"
    );
    assert_eq!(e.line, Some(12));
    assert_eq!(e.column, Some(8));
}

#[test]
fn mod_version_without_version_is_an_error() {
    let text = GOOD
        .replace("version = \"1.2.0\"\n", "")
        .replace("${KERNEL_FULL_VERSION}", "${MOD_VERSION}");
    let e = one_error(&text);
    assert_eq!(e.key.as_deref(), Some("directory.path"));
    assert!(e.message.contains("sets no `version`"), "{e}");
}

#[test]
fn bad_instance_name_is_reported_against_the_file() {
    let t = Tree::new();
    let p = t.module(2, "-bad name", GOOD);
    let c = t.load();
    assert!(c.modules.is_empty());
    assert_eq!(c.errors.len(), 1);
    assert_eq!(c.errors[0].file, p);
    assert!(
        c.errors[0]
            .message
            .contains("not a valid module config name"),
        "{}",
        c.errors[0]
    );
}

#[test]
fn collects_every_error_in_a_file() {
    let (_, errs) = errors_of(
        r#"
version = "1 2"
modules = ["ok", "bad/name", "ok"]
kernel_match = "("
after = ["x"]
[parameters]
other = ["a=1"]
ok = ["=1", "v=a b"]
[directory]
path = "relative/${ARCH}"
"#,
    );
    let keys: Vec<_> = errs
        .iter()
        .map(|e| e.key.clone().unwrap_or_default())
        .collect();
    assert_eq!(
        keys,
        [
            "version",
            "modules",
            "modules",
            "after",
            "kernel_match",
            "parameters.ok",
            "parameters.ok",
            "parameters.other",
            "directory.path"
        ],
        "{errs:#?}"
    );
    assert!(errs.iter().all(|e| e.line.is_some()), "{errs:#?}");
}

#[test]
fn missing_required_keys() {
    let (_, errs) = errors_of("description = \"nothing\"\n");
    let msgs: Vec<_> = errs.iter().map(ToString::to_string).collect();
    assert!(msgs[0].contains("key `modules`: missing"), "{msgs:?}");
    assert!(
        msgs[1].contains("key `directory`: missing artifact source"),
        "{msgs:?}"
    );

    let e = one_error("modules = []\n[directory]\npath = \"/x\"\n");
    assert!(e.message.contains("at least one"), "{e}");
    let e = one_error("modules = [\"a\"]\n[directory]\n");
    assert_eq!(e.key.as_deref(), Some("directory.path"));
}

/// GOOD with its modules renamed after `name`, so that configs do not clash.
fn own(name: &str) -> String {
    GOOD.replace("simple-kmod", &format!("{name}-kmod"))
        .replace("simple_procfs_kmod", &format!("{name}_procfs"))
        .replace("\"dummy\"", &format!("\"{name}_dummy\""))
}

#[test]
fn after_must_exist_and_not_cycle() {
    let t = Tree::new();
    for (name, after) in [("a", "b"), ("b", "a"), ("c", "nope"), ("d", "c")] {
        t.module(2, name, &format!("after = [\"{after}\"]\n{}", own(name)));
    }
    let c = t.load();
    let msg = |n: &str| c.module(n).unwrap_err().to_string();
    assert!(
        msg("a").contains("ordering cycle: a -> b -> a"),
        "{}",
        msg("a")
    );
    assert!(
        msg("b").contains("ordering cycle: b -> a -> b"),
        "{}",
        msg("b")
    );
    assert!(
        msg("c").contains("key `after`: no module config named \"nope\""),
        "{}",
        msg("c")
    );
    // d waits for a broken config, which is its own problem, not d's.
    assert!(c.module("d").is_ok());
}

#[test]
fn daemon_settings_and_overrides() {
    let t = Tree::new();
    fs::write(
        t.dirs[0].join("kvcd.toml"),
        "state_dir = \"/srv/state\"\nkernel_modules_dir = \"/opt/mods\"\n",
    )
    .unwrap();
    let c = t.load();
    assert!(c.errors.is_empty(), "{:?}", c.errors);
    assert_eq!(c.daemon.state_dir, Path::new("/srv/state"));
    assert_eq!(c.daemon.kernel_modules_dir, Path::new("/opt/mods"));
    assert_eq!(c.daemon.runtime_dir, Path::new("/run/kvcd"));

    let c = Config::load(
        &t.dirs,
        &Overrides {
            state_dir: Some("/tmp/s".into()),
            runtime_dir: None,
        },
    );
    assert_eq!(c.daemon.state_dir, Path::new("/tmp/s"));

    // A later kvcd.toml replaces the earlier one as a whole file.
    fs::write(
        t.dirs[2].join("kvcd.toml"),
        "runtime_dir = \"relative\"\nfoo = 1\n",
    )
    .unwrap();
    let c = t.load();
    assert_eq!(c.daemon.state_dir, Path::new("/var/lib/kvcd"));
    assert_eq!(c.errors.len(), 1, "{:?}", c.errors);
    assert!(
        c.errors[0].message.contains("unknown field `foo`"),
        "{}",
        c.errors[0]
    );
    assert_eq!(c.errors[0].file, t.dirs[2].join("kvcd.toml"));
}

const IMAGE: &str = r#"
version = "1.2.0"
modules = ["simple-kmod"]

[image]
ref = "registry.example.com/acme/simple-kmod:${MOD_VERSION}-${KERNEL_FULL_VERSION}"
pull = "always"
auth_file = "/etc/kvcd/auth.json"
tls_verify = false
firmware_dir = "/lib/firmware/acme"

[build]
context = "/usr/share/kvcd/simple-kmod"
file = "Containerfile.rhel"
args = { KVER = "${KERNEL_FULL_VERSION}", KMODVER = "${MOD_VERSION}" }
secrets = { entitlement = "/etc/pki/entitlement/ent.pem" }
"#;

#[test]
fn image_source_with_build() {
    let t = Tree::new();
    t.module(2, "img", IMAGE);
    let c = t.load();
    let m = c.module("img").unwrap();
    let Source::Image(i) = &m.source else {
        panic!("expected an image source")
    };
    assert_eq!(
        i.reference,
        "registry.example.com/acme/simple-kmod:${MOD_VERSION}-${KERNEL_FULL_VERSION}"
    );
    assert_eq!(i.pull, PullPolicy::Always);
    assert!(!i.tls_verify);
    assert_eq!(i.modules_dir, "/lib/modules/${KERNEL_FULL_VERSION}");
    assert_eq!(i.firmware_dir.as_deref(), Some("/lib/firmware/acme"));
    let b = i.build.as_ref().unwrap();
    assert_eq!(b.file, "Containerfile.rhel");
    assert_eq!(b.args["KMODVER"], "${MOD_VERSION}");
    assert_eq!(
        b.secrets["entitlement"],
        Path::new("/etc/pki/entitlement/ent.pem")
    );

    // Defaults, and a git URL as the context.
    let t = Tree::new();
    t.module(
        2,
        "img",
        "modules = [\"a\"]\n[image]\nref = \"q.io/a:${KERNEL_FULL_VERSION}\"\n[build]\ncontext = \"https://git.example.com/acme/driver.git\"\n",
    );
    let c = t.load();
    let Source::Image(i) = &c.module("img").unwrap().source else {
        panic!("expected an image source")
    };
    assert_eq!(i.pull, PullPolicy::Missing);
    assert!(i.tls_verify);
    assert_eq!(i.build.as_ref().unwrap().file, "Containerfile");
}

#[test]
fn image_and_build_errors() {
    let cases: &[(&str, &str, &str)] = &[
        (
            "modules = [\"a\"]\n[directory]\npath = \"/x\"\n[image]\nref = \"q.io/a\"\n",
            "directory",
            "one artifact source: [directory] or [image], not both",
        ),
        (
            "modules = [\"a\"]\n[directory]\npath = \"/x\"\n[build]\ncontext = \"/c\"\n",
            "build",
            "[build] goes with an [image] source",
        ),
        (
            "modules = [\"a\"]\n[image]\npull = \"never\"\n",
            "image.ref",
            "missing: expected an image reference",
        ),
        (
            "modules = [\"a\"]\n[image]\nref = \"q.io/a b\"\n",
            "image.ref",
            "without blanks",
        ),
        (
            "modules = [\"a\"]\n[image]\nref = \"q.io/a:${KVER}\"\n",
            "image.ref",
            "unknown template variable ${KVER}",
        ),
        (
            "modules = [\"a\"]\n[image]\nref = \"q.io/a\"\npull = \"sometimes\"\n",
            "image.pull",
            "expected \"missing\", \"always\" or \"never\", found \"sometimes\"",
        ),
        (
            "modules = [\"a\"]\n[image]\nref = \"q.io/a\"\nauth_file = \"auth.json\"\n",
            "image.auth_file",
            "expected an absolute path",
        ),
        (
            "modules = [\"a\"]\n[image]\nref = \"q.io/a\"\nmodules_dir = \"lib/modules\"\n",
            "image.modules_dir",
            "expected an absolute path",
        ),
        (
            "modules = [\"a\"]\n[image]\nref = \"q.io/a\"\n[build]\nfile = \"C\"\n",
            "build.context",
            "missing: expected the build context",
        ),
        (
            "modules = [\"a\"]\n[image]\nref = \"q.io/a\"\n[build]\ncontext = \"/c\"\nfile = \"../C\"\n",
            "build.file",
            "a file name inside the build context",
        ),
        (
            "modules = [\"a\"]\n[image]\nref = \"q.io/a\"\n[build]\ncontext = \"/c\"\nargs = { 1X = \"v\" }\n",
            "build.args.1X",
            "build argument name",
        ),
        (
            "modules = [\"a\"]\n[image]\nref = \"q.io/a\"\n[build]\ncontext = \"/c\"\nargs = { K = \"${MOD_VERSION}\" }\n",
            "build.args.K",
            "sets no `version`",
        ),
        (
            "modules = [\"a\"]\n[image]\nref = \"q.io/a\"\n[build]\ncontext = \"/c\"\nsecrets = { ent = \"rel.pem\" }\n",
            "build.secrets.ent",
            "expected an absolute path",
        ),
        (
            "modules = [\"a\"]\n[image]\nref = \"q.io/a\"\nregistry = \"x\"\n",
            "image.registry",
            "unknown field `registry`",
        ),
    ];
    for (text, key, msg) in cases {
        let e = one_error(text);
        assert_eq!(e.key.as_deref(), Some(*key), "{text}: {e}");
        assert!(e.message.contains(msg), "{text}: {e}");
    }
}

#[test]
fn hooks_ready_and_kvc_library() {
    let t = Tree::new();
    t.module(
        2,
        "h",
        r#"
version = "1.0"
modules = ["a"]
[directory]
path = "/x"
[hooks]
pre_load = ["/usr/libexec/acme/prep", "--kernel", "${KERNEL_FULL_VERSION}"]
post_unload = ["/bin/sh", "-c", "echo done"]
timeout_seconds = 30
[ready]
path = "/dev/acme0"
timeout_seconds = 5
"#,
    );
    // KVC skips missing locations: one existing library is enough.
    let lib = t.dirs[0].join("k-lib.sh");
    fs::write(&lib, "build_kmods() { :; }\n").unwrap();
    t.module(
        2,
        "k",
        &format!(
            "modules = [\"simple-kmod\"]\n[hooks]\nkvc_library = [\"/nonexistent/kvc/k-lib.sh\", {lib:?}]\n"
        ),
    );
    t.module(
        2,
        "k1",
        &format!(
            "modules = [\"other-kmod\"]\n[hooks]\nkvc_library = {lib:?}\n[ready]\ncommand = [\"/usr/bin/test\", \"-e\", \"/dev/x\"]\n"
        ),
    );
    let c = t.load();
    assert!(c.all_errors().is_empty(), "{:#?}", c.all_errors());
    let h = c.module("h").unwrap();
    assert_eq!(
        h.hooks.pre_load.as_deref().unwrap(),
        [
            "/usr/libexec/acme/prep",
            "--kernel",
            "${KERNEL_FULL_VERSION}"
        ]
    );
    assert_eq!(h.hooks.timeout_seconds, 30);
    assert_eq!(
        h.hooks.build_timeout_seconds,
        crate::config::DEFAULT_BUILD_TIMEOUT
    );
    let r = h.ready.as_ref().unwrap();
    assert!(matches!(&r.kind, crate::config::ReadyKind::Path(p) if p == Path::new("/dev/acme0")));
    assert_eq!(r.timeout_seconds, 5);
    let Source::KvcLibrary { libraries } = &c.module("k").unwrap().source else {
        panic!("expected a KVC library")
    };
    assert_eq!(libraries.len(), 2);
    let k1 = c.module("k1").unwrap();
    assert!(matches!(&k1.source, Source::KvcLibrary { libraries } if libraries.len() == 1));
    assert_eq!(
        k1.ready.as_ref().unwrap().timeout_seconds,
        crate::config::DEFAULT_READY_TIMEOUT
    );
}

#[test]
fn hook_errors() {
    let dir = "[directory]\npath = \"/x\"\n";
    let cases: &[(String, &str, &str)] = &[
        (
            format!("modules = [\"a\"]\n{dir}[hooks]\npre_load = [\"prep.sh\"]\n"),
            "hooks.pre_load",
            "absolute program path",
        ),
        (
            format!("modules = [\"a\"]\n{dir}[hooks]\npost_load = []\n"),
            "hooks.post_load",
            "expected a command",
        ),
        (
            format!("modules = [\"a\"]\n{dir}[hooks]\ntimeout_seconds = 0\n"),
            "hooks.timeout_seconds",
            "at least 1",
        ),
        (
            format!("modules = [\"a\"]\n{dir}[hooks]\nbuild = [\"/b\"]\n"),
            "hooks.build",
            "this config has no [image]",
        ),
        (
            format!("modules = [\"a\"]\n{dir}[hooks]\npre_unload = [\"/p\", \"${{NOPE}}\"]\n"),
            "hooks.pre_unload",
            "unknown template variable ${NOPE}",
        ),
        (
            format!("modules = [\"a\"]\n{dir}[ready]\ntimeout_seconds = 3\n"),
            "ready",
            "exactly one of `path`",
        ),
        (
            format!("modules = [\"a\"]\n{dir}[ready]\npath = \"/dev/x\"\ncommand = [\"/t\"]\n"),
            "ready",
            "exactly one of `path`",
        ),
        (
            format!("modules = [\"a\"]\n{dir}[ready]\npath = \"dev/x\"\n"),
            "ready.path",
            "absolute path",
        ),
        (
            format!("modules = [\"a\"]\n{dir}[hooks]\nkvc_library = \"/usr/lib/kvc/a-lib.sh\"\n"),
            "hooks.kvc_library",
            "remove [directory] or [image]",
        ),
        (
            "modules = [\"a\"]\n[hooks]\nkvc_library = \"a-lib.sh\"\n".to_owned(),
            "hooks.kvc_library",
            "absolute path",
        ),
        (
            "modules = [\"a\"]\n[hooks]\nkvc_library = []\n".to_owned(),
            "hooks.kvc_library",
            "path of a KVC library",
        ),
    ];
    for (text, key, msg) in cases {
        let (_, errs) = errors_of(text);
        assert!(
            errs.iter()
                .any(|e| e.key.as_deref() == Some(*key) && e.message.contains(msg)),
            "{text}: {errs:#?}"
        );
    }
}

/// The single error of `kvcd.toml` with `text`.
fn daemon_error(text: &str) -> ConfigError {
    let t = Tree::new();
    let file = t.dirs[2].join("kvcd.toml");
    fs::write(&file, text).unwrap();
    let mut c = t.load();
    assert_eq!(c.errors.len(), 1, "{text}: {:#?}", c.errors);
    let e = c.errors.remove(0);
    assert_eq!(e.file, file);
    e
}

#[test]
fn only_regular_files_are_read() {
    let t = Tree::new();
    let md = t.dirs[2].join("modules.d");
    nix::unistd::mkfifo(&md.join("fifo.toml"), nix::sys::stat::Mode::S_IRWXU).unwrap();
    std::os::unix::fs::symlink("/dev/zero", md.join("zero.toml")).unwrap();
    fs::create_dir(md.join("dir.toml")).unwrap();
    // A symlink to a regular file is read; one to /dev/null still masks.
    let real = t.dirs[0].join("real.txt");
    fs::write(&real, GOOD).unwrap();
    std::os::unix::fs::symlink(&real, md.join("linked.toml")).unwrap();
    std::os::unix::fs::symlink("/dev/null", md.join("masked.toml")).unwrap();
    std::os::unix::fs::symlink("/dev/zero", t.dirs[1].join("kvcd.toml")).unwrap();
    let c = t.load();
    let msg = |n: &str| c.module(n).unwrap_err().to_string();
    assert!(
        msg("fifo")
            .contains("fifo.toml: not a regular file (a FIFO); configs must be regular files"),
        "{}",
        msg("fifo")
    );
    assert!(
        msg("zero").contains(
            "zero.toml: not a regular file (a character device); configs must be regular files"
        ),
        "{}",
        msg("zero")
    );
    assert!(
        msg("dir").contains("not a regular file (a directory)"),
        "{}",
        msg("dir")
    );
    assert!(c.module("linked").is_ok());
    assert_eq!(c.masked, vec![md.join("masked.toml")]);
    assert_eq!(c.errors.len(), 1, "{:#?}", c.errors);
    assert_eq!(
        c.errors[0].to_string(),
        format!(
            "{}: not a regular file (a character device); configs must be regular files",
            t.dirs[1].join("kvcd.toml").display()
        )
    );
}

#[test]
fn config_files_are_capped_at_one_mib() {
    let pad = "#".repeat(1 << 20);
    let (file, errs) = errors_of(&format!("{GOOD}{pad}\n"));
    assert_eq!(errs.len(), 1, "{errs:#?}");
    assert_eq!(
        errs[0].to_string(),
        format!(
            "{}: file is larger than 1 MiB, the limit for a config file",
            file.display()
        )
    );
    // Just under the cap is read.
    let t = Tree::new();
    let fill = "#".repeat((1 << 20) - GOOD.len() - 1);
    t.module(2, "x", &format!("{GOOD}{fill}\n"));
    assert!(t.load().module("x").is_ok());
}

#[test]
fn deep_nesting_names_a_line_and_the_limit() {
    let deep = vec!["a"; 5000].join(".");
    let e = one_error(&format!("{GOOD}\n[{deep}]\n"));
    assert_eq!(e.line, Some(GOOD.lines().count() + 2), "{e}");
    assert_eq!(e.key.as_deref(), Some("a.a.a…"), "{e}");
    assert!(
        e.message.starts_with(
            "key nested 5000 levels deep (recursion limit): expected fewer than 80 levels"
        ),
        "{e}"
    );
    let e = one_error(&format!(
        "modules = [\"a\"]\nx = {}1{}\n",
        "[".repeat(5000),
        "]".repeat(5000)
    ));
    assert_eq!((e.line, e.key.as_deref()), (Some(2), Some("x")), "{e}");
    assert!(
        e.message.ends_with("expected arrays and inline tables nested fewer than 80 levels deep (kvcd's own values nest at most 2)"),
        "{e}"
    );
}

#[test]
fn named_config_dirs_must_exist() {
    let t = Tree::new();
    let gone = t.dirs[0].join("gone");
    let file = t.dirs[0].join("kvcd-file");
    fs::write(&file, "").unwrap();
    let dirs = [t.dirs[2].clone(), gone.clone(), file.clone()];
    let c = Config::load_named(&dirs, &Overrides::default());
    let shown: Vec<String> = c.errors.iter().map(ToString::to_string).collect();
    assert_eq!(
        shown,
        [
            format!(
                "{}: no such directory: expected a configuration directory (holding kvcd.toml and modules.d/)",
                gone.display()
            ),
            format!(
                "{}: not a directory (a regular file): expected a configuration directory (holding kvcd.toml and modules.d/)",
                file.display()
            ),
        ]
    );
    assert_eq!(c.dirs, dirs);
    // Config::load (the built-in directories) lets them be absent.
    let c = Config::load(&[gone, t.dirs[2].clone()], &Overrides::default());
    assert!(c.errors.is_empty(), "{:?}", c.errors);
}

#[test]
fn daemon_counts_retries_and_programs() {
    let e = daemon_error("max_parallel = 0\n");
    assert_eq!(e.key.as_deref(), Some("max_parallel"));
    assert_eq!(
        e.message,
        "expected a whole number of module configs worked on at once, at least 1, found 0"
    );

    let e = daemon_error("retry_base_seconds = 60\nretry_max_seconds = 30\n");
    assert_eq!(
        (e.key.as_deref(), e.line),
        (Some("retry_max_seconds"), Some(2))
    );
    assert_eq!(
        e.message,
        "retry_max_seconds (30) is below retry_base_seconds (60): expected retry_max_seconds >= retry_base_seconds"
    );
    let e = daemon_error("retry_base_seconds = 600\n");
    assert_eq!(e.key.as_deref(), Some("retry_base_seconds"));
    assert!(
        e.message
            .starts_with("retry_max_seconds (300, the default) is below retry_base_seconds (600)"),
        "{e}"
    );

    for bad in [
        "/bin/sh -c id",
        "podman --remote",
        "bin/podman",
        "-podman",
        "",
    ] {
        let e = daemon_error(&format!("podman = {bad:?}\n"));
        assert_eq!(e.key.as_deref(), Some("podman"), "{bad}");
        assert!(
            e.message
                .starts_with("expected a program path, not a command line"),
            "{bad}: {e}"
        );
    }
    // Older files set depmod and its timeout; they are accepted and ignored.
    let t = Tree::new();
    fs::write(
        t.dirs[2].join("kvcd.toml"),
        "depmod = \"depmod -a\"\ndepmod_timeout_seconds = 5\n",
    )
    .unwrap();
    assert!(t.load().errors.is_empty());

    let t = Tree::new();
    fs::write(
        t.dirs[2].join("kvcd.toml"),
        "podman = \"/usr/local/bin/podman\"\ndepmod = \"depmod\"\nmax_parallel = 1\nretry_base_seconds = 5\nretry_max_seconds = 5\n",
    )
    .unwrap();
    let c = t.load();
    assert!(c.errors.is_empty(), "{:#?}", c.errors);
    assert_eq!(c.daemon.podman, Path::new("/usr/local/bin/podman"));
    assert_eq!(c.daemon.max_parallel, 1);
}

#[test]
fn version_must_be_safe_in_paths_and_tags() {
    let e = one_error(&GOOD.replace("\"1.2.0\"", "\"../../x\""));
    assert_eq!(
        (e.key.as_deref(), e.line),
        (Some("version"), Some(3)),
        "{e}"
    );
    assert!(
        e.message.starts_with("expected a version like \"1.2.0\""),
        "{e}"
    );
    assert!(e.message.ends_with("found \"../../x\""), "{e}");
    for bad in ["-1", ".1", "1/2", "1 2", "a\u{7}"] {
        let e = one_error(&GOOD.replace("1.2.0", bad));
        assert_eq!(e.key.as_deref(), Some("version"), "{bad}: {e}");
    }
    let t = Tree::new();
    t.module(2, "v", &GOOD.replace("1.2.0", "2.0.1~rc1+git.abc_1"));
    assert!(t.load().module("v").is_ok());
}

#[test]
fn nothing_from_a_config_reaches_podman_as_an_option() {
    let img = |rest: &str| format!("modules = [\"a\"]\n[image]\n{rest}\n");
    let cases: &[(String, &str, &str)] = &[
        (
            img("ref = \"--help\""),
            "image.ref",
            "expected an image reference without blanks and not starting with '-', found \"--help\"",
        ),
        (
            img("ref = \"simple-kmod:1.0\""),
            "image.ref",
            "expected a fully qualified image reference that names its registry, e.g. \"localhost/NAME:TAG\" or \"registry.example.com/NAME:TAG\"",
        ),
        (
            img("ref = \"acme/driver:${KERNEL_FULL_VERSION}\""),
            "image.ref",
            "expected a fully qualified image reference",
        ),
        (
            img("ref = \"q.io/a\"\n[build]\ncontext = \"/c\"\nfile = \"-f\""),
            "build.file",
            "expected a file name inside the build context, found \"-f\"",
        ),
        (
            img("ref = \"q.io/a\"\n[build]\ncontext = \"/c\"\nargs = { K = \"--network=host\" }"),
            "build.args.K",
            "expected a value not starting with '-'",
        ),
        (
            img("ref = \"q.io/a\"\n[build]\ncontext = \"/c\"\nsecrets = { \"-x\" = \"/s\" }"),
            "build.secrets.-x",
            "not starting with '-'",
        ),
    ];
    for (text, key, msg) in cases {
        let e = one_error(text);
        assert_eq!(e.key.as_deref(), Some(*key), "{text}: {e}");
        assert!(e.message.contains(msg), "{text}: {e}");
    }
    for ok in [
        "localhost/kvcd/x:1",
        "127.0.0.1:5000/kvcd/x:${KERNEL_FULL_VERSION}",
        "quay.io/acme/driver@sha256:ab",
        "registry:5000/x",
    ] {
        let t = Tree::new();
        t.module(2, "x", &img(&format!("ref = {ok:?}")));
        assert!(t.load().module("x").is_ok(), "{ok}");
    }
}

#[test]
fn image_dirs_are_proper_subdirectories() {
    let img = |rest: &str| format!("modules = [\"a\"]\n[image]\nref = \"q.io/a\"\n{rest}\n");
    for (text, key) in [
        (img("firmware_dir = \"/\""), "image.firmware_dir"),
        (img("firmware_dir = \"//./\""), "image.firmware_dir"),
        (
            img("firmware_dir = \"/lib/firmware/../..\""),
            "image.firmware_dir",
        ),
        (img("modules_dir = \"/\""), "image.modules_dir"),
        (
            img("modules_dir = \"/lib/modules/../../etc\""),
            "image.modules_dir",
        ),
    ] {
        let e = one_error(&text);
        assert_eq!(e.key.as_deref(), Some(key), "{text}: {e}");
        assert!(
            e.message
                .starts_with("expected a directory below the image's root, e.g. \"/lib/")
                && e.message.contains("(not \"/\" and no \"..\"), found"),
            "{text}: {e}"
        );
    }
    let e = one_error(&img("firmware_dir = \"lib/firmware\""));
    assert!(e.message.contains("expected an absolute path"), "{e}");
}

#[test]
fn a_kvc_library_must_exist() {
    let e = one_error(
        "modules = [\"a\"]\n[hooks]\nkvc_library = [\"/nonexistent/a-lib.sh\", \"/nonexistent/b-lib.sh\"]\n",
    );
    assert_eq!(
        (e.key.as_deref(), e.line),
        (Some("hooks.kvc_library"), Some(3))
    );
    assert_eq!(
        e.message,
        "no such file: /nonexistent/a-lib.sh, /nonexistent/b-lib.sh (expected at least one existing KVC library; missing locations are skipped)"
    );
}

#[test]
fn one_owner_per_module() {
    let t = Tree::new();
    let dir = "[directory]\npath = \"/x\"\n";
    let a = t.module(
        2,
        "a",
        &format!("modules = [\"simple-kmod\", \"own-a\"]\n{dir}"),
    );
    let b = t.module(
        1,
        "b",
        &format!("modules = [\"own-b\", \"simple_kmod\"]\n{dir}"),
    );
    let r = t.module(
        2,
        "r",
        &format!("modules = [\"own-r\"]\nreplace_in_tree = [\"own-a\", \"ice\"]\n{dir}"),
    );
    let r2 = t.module(
        2,
        "r2",
        &format!("modules = [\"own-r2\"]\nreplace_in_tree = [\"ice\"]\n{dir}"),
    );
    // Loading and replacing the same module in one config is in-tree replacement, not a clash.
    t.module(
        2,
        "self",
        &format!("modules = [\"self-mod\"]\nreplace_in_tree = [\"self-mod\"]\n{dir}"),
    );
    // A masked or overridden file claims nothing.
    t.module(0, "old", &format!("modules = [\"simple-kmod\"]\n{dir}"));
    std::os::unix::fs::symlink("/dev/null", t.dirs[2].join("modules.d/old.toml")).unwrap();
    t.module(0, "c", &format!("modules = [\"own-a\"]\n{dir}"));
    t.module(2, "c", &format!("modules = [\"own-c\"]\n{dir}"));
    // Alternatives for different kernels may name the same module; the same
    // pattern twice, or a pattern beside none, still clashes.
    t.module(
        2,
        "el9",
        &format!("kernel_match = '^5\\.14\\.'\nmodules = [\"alt\"]\n{dir}"),
    );
    t.module(
        2,
        "el10",
        &format!("kernel_match = '^6\\.12\\.'\nmodules = [\"alt\"]\n{dir}"),
    );
    let same = t.module(
        2,
        "el9b",
        &format!("kernel_match = '^5\\.14\\.'\nmodules = [\"alt2\"]\n{dir}"),
    );
    t.module(
        2,
        "el9c",
        &format!("kernel_match = '^5\\.14\\.'\nmodules = [\"alt2\"]\n{dir}"),
    );
    // A KVC library config owns the modules it lists.
    let lib = t.dirs[0].join("k-lib.sh");
    fs::write(&lib, "").unwrap();
    let k = t.module(
        2,
        "k",
        &format!("modules = [\"own-b\"]\n[hooks]\nkvc_library = {lib:?}\n"),
    );

    let c = t.load();
    let shown = |n: &str| -> Vec<String> {
        match &c.modules[n].result {
            Ok(_) => Vec::new(),
            Err(errs) => errs.iter().map(ToString::to_string).collect(),
        }
    };
    let line = |f: &Path, key: &str, m: &str, what: &str, other: &str, of: &Path| {
        format!(
            "{}: key `{key}`: module \"{m}\" {what} module config \"{other}\" ({}): expected one owner per module; keep it in one config",
            f.display(),
            of.display()
        )
    };
    assert_eq!(
        shown("a"),
        [
            line(
                &a,
                "modules",
                "own_a",
                "is replaced in tree (unloaded) by",
                "r",
                &r
            ),
            line(&a, "modules", "simple_kmod", "is also loaded by", "b", &b),
        ]
    );
    assert_eq!(
        shown("b"),
        [
            line(&b, "modules", "own_b", "is also loaded by", "k", &k),
            line(&b, "modules", "simple_kmod", "is also loaded by", "a", &a),
        ]
    );
    assert_eq!(
        shown("k"),
        [line(&k, "modules", "own_b", "is also loaded by", "b", &b)]
    );
    assert_eq!(
        shown("r"),
        [
            line(
                &r,
                "replace_in_tree",
                "ice",
                "is also replaced in tree by",
                "r2",
                &r2
            ),
            line(&r, "replace_in_tree", "own_a", "is loaded by", "a", &a),
        ]
    );
    assert_eq!(
        shown("r2"),
        [line(
            &r2,
            "replace_in_tree",
            "ice",
            "is also replaced in tree by",
            "r",
            &r
        )]
    );
    assert!(c.module("self").is_ok());
    assert!(c.module("c").is_ok());
    assert!(c.module("el9").is_ok() && c.module("el10").is_ok());
    assert_eq!(shown("el9b").len(), 1, "{:?}", shown("el9b"));
    assert!(shown("el9b")[0].starts_with(&format!(
        "{}: key `modules`: module \"alt2\" is also loaded by module config \"el9c\"",
        same.display()
    )));

    // As alternative examples they do not clash, unless `after` ties them together.
    let files: Vec<PathBuf> = ["a", "b"]
        .iter()
        .map(|n| t.dirs[2].join(format!("modules.d/{n}.toml")))
        .collect();
    fs::rename(&b, &files[1]).unwrap();
    let c = Config::load_examples(&files);
    assert!(c.all_errors().is_empty(), "{:#?}", c.all_errors());
    fs::write(
        &files[1],
        format!("after = [\"a\"]\nmodules = [\"simple_kmod\"]\n{dir}"),
    )
    .unwrap();
    let c = Config::load_examples(&files);
    assert_eq!(c.all_errors().len(), 2, "{:#?}", c.all_errors());
}

/// Many names validate (the duplicate and parameter checks use sets, not list scans).
#[test]
fn twenty_thousand_module_names() {
    let names: Vec<String> = (0..20_000).map(|i| format!("\"m{i}\"")).collect();
    let params: Vec<String> = (0..20_000)
        .step_by(2)
        .map(|i| format!("m{i} = [\"p=1\"]"))
        .collect();
    let t = Tree::new();
    t.module(
        2,
        "many",
        &format!(
            "modules = [{}]\n[parameters]\n{}\n[directory]\npath = \"/x\"\n",
            names.join(", "),
            params.join("\n")
        ),
    );
    let c = t.load();
    let m = c.module("many").unwrap();
    assert_eq!(m.modules.len(), 20_000);
    assert_eq!(m.parameters.len(), 10_000);
    assert_eq!(m.modules[19_999].as_str(), "m19999");

    // And as many duplicates: one error each, with its line and column.
    let dup: Vec<&str> = vec!["\"m\""; 20_000];
    let (_, errs) = errors_of(&format!(
        "modules = [\n{}\n]\n[directory]\npath = \"/x\"\n",
        dup.join(",\n")
    ));
    assert_eq!(errs.len(), 19_999);
    assert_eq!((errs[0].line, errs[0].column), (Some(3), Some(1)));
    assert_eq!(errs[19_998].line, Some(20_001));
}

#[test]
fn signing_needs_a_key_and_cert_and_a_known_hash() {
    let e = daemon_error("[signing]\nkey = \"/etc/kvcd/key.pem\"\n");
    assert_eq!((e.key.as_deref(), e.line), (Some("signing.cert"), Some(1)));
    assert!(e.message.starts_with("[signing] needs cert = "), "{e}");

    let e = daemon_error("[signing]\nkey = \"key.pem\"\ncert = \"/c.der\"\n");
    assert_eq!((e.key.as_deref(), e.line), (Some("signing.key"), Some(2)));
    assert_eq!(e.message, "expected an absolute path, found \"key.pem\"");

    let e = daemon_error("[signing]\nkey = \"pkcs11:token=node;object=kvcd\"\ncert = \"/c.der\"\n");
    assert_eq!(e.key.as_deref(), Some("signing.key"));
    assert!(
        e.message.starts_with("PKCS#11 URIs are not supported"),
        "{e}"
    );

    let e = daemon_error("[signing]\nkey = \"/k.pem\"\ncert = \"/c.der\"\nhash = \"md5\"\n");
    assert_eq!((e.key.as_deref(), e.line), (Some("signing.hash"), Some(4)));
    assert_eq!(
        e.message,
        "expected one of \"sha256\", \"sha384\", \"sha512\", found \"md5\""
    );

    let e = daemon_error("[signing]\nkey = \"/k.pem\"\ncert = \"/c.der\"\nkeyring = \"x\"\n");
    assert!(e.message.contains("unknown field `keyring`"), "{e}");

    let t = Tree::new();
    fs::write(
        t.dirs[2].join("kvcd.toml"),
        "[signing]\nkey = \"/k.pem\"\ncert = \"/c.der\"\nhash = \"sha512\"\n",
    )
    .unwrap();
    let c = t.load();
    assert!(c.errors.is_empty(), "{:#?}", c.errors);
    let s = c.daemon.signing.unwrap();
    assert_eq!(
        (s.key.as_path(), s.cert.as_path(), s.hash.name()),
        (Path::new("/k.pem"), Path::new("/c.der"), "sha512")
    );
    assert!(Tree::new().load().daemon.signing.is_none());
}

#[test]
fn metrics_need_an_absolute_prom_file() {
    let e = daemon_error("[metrics]\ntextfile = \"/var/lib/node_exporter/kvcd.txt\"\n");
    assert_eq!(
        (e.key.as_deref(), e.line),
        (Some("metrics.textfile"), Some(2))
    );
    assert!(
        e.message.starts_with("expected the path of a *.prom file"),
        "{e}"
    );
    let e = daemon_error("[metrics]\ntextfile = \"kvcd.prom\"\n");
    assert_eq!(e.message, "expected an absolute path, found \"kvcd.prom\"");
    let e = daemon_error("[metrics]\n");
    assert!(e.message.starts_with("[metrics] needs textfile = "), "{e}");
    let t = Tree::new();
    fs::write(
        t.dirs[2].join("kvcd.toml"),
        "[metrics]\ntextfile = \"/t/kvcd.prom\"\n",
    )
    .unwrap();
    let c = t.load();
    assert!(c.errors.is_empty(), "{:#?}", c.errors);
    assert_eq!(
        c.daemon.metrics_textfile.as_deref(),
        Some(Path::new("/t/kvcd.prom"))
    );
}

#[test]
fn match_takes_pci_ids_and_modalias_patterns() {
    let t = Tree::new();
    let md = t.dirs[2].join("modules.d");
    fs::create_dir_all(&md).unwrap();
    let base = "modules = [\"m\"]\n[directory]\npath = \"/opt/m\"\n";
    fs::write(
        md.join("ok.toml"),
        format!(
            "{base}[match]\npci = [\"8086:1592\", \"10DE:*\"]\nmodalias = [\"usb:v0BDAp8153*\"]\n"
        ),
    )
    .unwrap();
    fs::write(
        md.join("bad.toml"),
        format!("{base}[match]\npci = [\"8086\", \"zzzz:1\"]\nmodalias = [\"a b\"]\n"),
    )
    .unwrap();
    fs::write(md.join("empty.toml"), format!("{base}[match]\npci = []\n")).unwrap();
    let c = t.load();
    let ok = c.module("ok").unwrap();
    assert_eq!(ok.devices.pci, ["8086:1592", "10de:*"]);
    assert_eq!(ok.devices.modalias, ["usb:v0BDAp8153*"]);
    let Err(errs) = &c.modules["bad"].result else {
        panic!("bad.toml is valid")
    };
    let keys: Vec<_> = errs
        .iter()
        .map(|e| (e.key.clone().unwrap_or_default(), e.line))
        .collect();
    assert_eq!(
        keys,
        [
            ("match.pci".to_owned(), Some(5)),
            ("match.pci".to_owned(), Some(5)),
            ("match.modalias".to_owned(), Some(6))
        ],
        "{errs:#?}"
    );
    assert!(
        errs[0]
            .message
            .starts_with("expected a PCI id VENDOR:DEVICE"),
        "{errs:#?}"
    );
    let Err(errs) = &c.modules["empty"].result else {
        panic!("empty.toml is valid")
    };
    assert!(
        errs[0].message.starts_with("[match] needs pci = "),
        "{errs:#?}"
    );
}
