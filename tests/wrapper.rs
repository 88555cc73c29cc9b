//! `kvcctl wrapper` and `kvcctl install-wrapper` against real podman: a tool
//! from a driver image that `kvcd apply --prepare` fetched, from an image
//! named by the config for the running kernel, and through a KVC framework
//! library (tests/fixtures/kvc), whose image its own build action makes.
//! Needs `scripts/registry start` and `scripts/images`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::{Fixtures, images_env, podman_lock};
use kvcd::hooks::kvc::{self, KvcAction};
use kvcd::kernel::KernelRelease;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// podman as an absolute path, so tests can tell kvcd.toml's value reached the tool runner.
fn podman_path() -> PathBuf {
    std::env::var_os("PATH")
        .and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("podman"))
                .find(|p| p.is_file())
        })
        .expect("podman not found in PATH (run scripts/setup)")
}

fn podman(args: &[&str]) -> (i32, String) {
    let out = Command::new(podman_path()).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// Removes local image names when dropped (also when a test fails).
struct RemoveOnDrop(Vec<String>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        for name in &self.0 {
            // Only this name goes when the image has others (the base image keeps its own).
            let _ = podman(&["rmi", name]);
        }
    }
}

#[derive(Debug)]
struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

struct Node {
    tmp: tempfile::TempDir,
    etc: PathBuf,
    fx: Fixtures,
    vars: BTreeMap<String, String>,
    /// Extra environment for every command.
    env: Vec<(String, String)>,
}

impl Node {
    /// A node whose configuration directory is called `etc_name` (to test quoting).
    fn with_etc(etc_name: &str) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let etc = tmp.path().join(etc_name);
        fs::create_dir_all(etc.join("modules.d")).unwrap();
        let fx = Fixtures::get();
        fs::write(
            etc.join("kvcd.toml"),
            format!(
                "kernel_modules_dir = \"{}\"\nstate_dir = \"{}\"\nruntime_dir = \"{}\"\npodman = \"{}\"\n",
                fx.modules_dir().display(),
                tmp.path().join("state").display(),
                tmp.path().join("run").display(),
                podman_path().display()
            ),
        )
        .unwrap();
        Self {
            tmp,
            etc,
            fx,
            vars: images_env(),
            env: Vec::new(),
        }
    }

    fn new() -> Self {
        Self::with_etc("etc")
    }

    fn var(&self, k: &str) -> &str {
        self.vars
            .get(k)
            .unwrap_or_else(|| panic!("{k} not set by scripts/images"))
    }

    /// modules.d/NAME.toml with `@VAR@` replaced by the images' variables.
    fn config(&self, name: &str, text: &str) {
        let mut text = text.to_owned();
        for (k, v) in &self.vars {
            text = text.replace(&format!("@{k}@"), v);
        }
        fs::write(self.etc.join(format!("modules.d/{name}.toml")), text).unwrap();
    }

    fn run(&self, program: &Path, args: &[&str], stdin: &str) -> Out {
        let mut cmd = Command::new(program);
        cmd.args(args)
            .env_remove("KVCD_LOG")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let mut input = child.stdin.take().unwrap();
        input.write_all(stdin.as_bytes()).unwrap();
        drop(input);
        let out = child.wait_with_output().unwrap();
        Out {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// `kvcd --config-dir ETC ARGS…`
    fn kvcd(&self, args: &[&str]) -> Out {
        let etc = self.etc.to_str().unwrap();
        let mut all = vec!["--config-dir", etc];
        all.extend_from_slice(args);
        self.run(Path::new(env!("CARGO_BIN_EXE_kvcd")), &all, "")
    }

    /// `kvcctl --config-dir ETC ARGS…` with `stdin`.
    fn kvcctl_in(&self, args: &[&str], stdin: &str) -> Out {
        let etc = self.etc.to_str().unwrap();
        let mut all = vec!["--config-dir", etc];
        all.extend_from_slice(args);
        self.run(Path::new(env!("CARGO_BIN_EXE_kvcctl")), &all, stdin)
    }

    fn kvcctl(&self, args: &[&str]) -> Out {
        self.kvcctl_in(args, "")
    }
}

fn assert_one_line_error(o: &Out, expected: &str) {
    assert_ne!(o.code, 0, "{o:#?}");
    assert_eq!(o.stderr, format!("error: {expected}\n"), "{o:#?}");
    assert_eq!(o.stdout, "", "{o:#?}");
}

const IMAGE_CONFIG: &str = r#"
modules = ["kvcd_param"]
[image]
ref = "@KVCD_IMAGE_TAG@"
tls_verify = false
"#;

#[test]
fn tool_from_the_prepared_image_passes_status_stdin_and_arguments() {
    let _g = podman_lock();
    let node = Node::new();
    let kver = node.fx.kver.clone();
    let reference = node.var("KVCD_IMAGE_TAG").to_owned();
    node.config("img", IMAGE_CONFIG);
    let o = node.kvcd(&["apply", "--prepare", "--kernel", &kver, "img"]);
    assert_eq!(o.code, 0, "{o:#?}");
    assert!(o.stdout.trim_end().ends_with("img: prepared"), "{o:#?}");
    let index = node
        .tmp
        .path()
        .join("state/images/img")
        .join(&kver)
        .join("index.json");
    assert!(index.is_file(), "{o:#?}");

    // The tool's exit status is kvcctl's.
    let o = node.kvcctl(&["wrapper", "img", "--kernel", &kver, "sh", "-c", "exit 7"]);
    assert_eq!(o.code, 7, "{o:#?}");
    let o = node.kvcctl(&["wrapper", "--kernel", &kver, "img", "true"]);
    assert_eq!(o.code, 0, "{o:#?}");

    // stdin reaches the tool; stdout comes back untouched.
    let o = node.kvcctl_in(
        &["wrapper", "img", "--kernel", &kver, "cat"],
        "first line\nsecond line\n",
    );
    assert_eq!(
        (o.code, o.stdout.as_str()),
        (0, "first line\nsecond line\n")
    );

    // Arguments with blanks, leading dashes and kvcctl's own option names stay intact.
    let o = node.kvcctl(&[
        "wrapper",
        "img",
        "--kernel",
        &kver,
        "printf",
        "<%s>",
        "a b",
        "-x",
        "--kernel",
        "--config-dir",
        "$(id)",
        "",
    ]);
    assert_eq!(o.code, 0, "{o:#?}");
    assert_eq!(o.stdout, "<a b><-x><--kernel><--config-dir><$(id)><>");

    // The image in the fixture is the one kvcd extracted from.
    let o = node.kvcctl(&[
        "wrapper",
        "img",
        "--kernel",
        &kver,
        "ls",
        &format!("/lib/modules/{kver}/extra"),
    ]);
    assert_eq!(o.code, 0, "{o:#?}");
    assert!(o.stdout.contains("kvcd_param.ko"), "{o:#?}");

    // A tool the image does not have: non-zero, and the message names it.
    let o = node.kvcctl(&["wrapper", "img", "--kernel", &kver, "no-such-tool", "x"]);
    assert_ne!(o.code, 0, "{o:#?}");
    assert!(o.stderr.contains("no-such-tool"), "{o:#?}");

    // What kvcd applied wins over the config's current `ref`.
    node.config(
        "img",
        &IMAGE_CONFIG.replace("@KVCD_IMAGE_TAG@", "127.0.0.1:1/kvcd/changed:x"),
    );
    let o = node.kvcctl(&["wrapper", "img", "--kernel", &kver, "sh", "-c", "exit 4"]);
    assert_eq!(o.code, 4, "{o:#?}");

    // Once the image is gone from local storage: one line saying what to do.
    let (code, out) = podman(&["rmi", "--force", &reference]);
    assert_eq!(code, 0, "{out}");
    let o = node.kvcctl(&["wrapper", "img", "--kernel", &kver, "true"]);
    assert_one_line_error(
        &o,
        &format!(
            "image {reference} is not in local storage; run `kvcd apply --prepare --kernel {kver} img` first"
        ),
    );
}

/// The base image under a name made from the running kernel's release.
fn running_kernel_image() -> (String, RemoveOnDrop) {
    let vars = images_env();
    let base = vars.get("KVCD_IMAGE_BASE").expect("KVCD_IMAGE_BASE");
    let running = KernelRelease::running().unwrap();
    let name = format!("localhost/kvcd-wrapper-test:{running}");
    let (code, out) = podman(&["tag", base, &name]);
    assert_eq!(code, 0, "{out}");
    (name.clone(), RemoveOnDrop(vec![name]))
}

const RUNNING_CONFIG: &str = r#"
modules = ["kvcd_param"]
[image]
ref = "localhost/kvcd-wrapper-test:${KERNEL_FULL_VERSION}"
pull = "never"
"#;

#[test]
fn config_reference_for_the_running_kernel_and_each_error() {
    let _g = podman_lock();
    let node = Node::new();
    let (_name, _untag) = running_kernel_image();
    node.config("run", RUNNING_CONFIG);

    // Nothing applied: the config's `ref`, expanded for the running kernel.
    let o = node.kvcctl(&["wrapper", "run", "sh", "-c", "exit 3"]);
    assert_eq!(o.code, 3, "{o:#?}");

    // Another kernel: the reference names that kernel.
    let o = node.kvcctl(&["wrapper", "run", "--kernel", "9.9.9-test", "true"]);
    assert_one_line_error(
        &o,
        "image localhost/kvcd-wrapper-test:9.9.9-test is not in local storage; run `kvcd apply --prepare --kernel 9.9.9-test run` first",
    );

    // No --kernel and no image: the advice is for this kernel. (Each config
    // here owns its own module: one owner per module.)
    node.config(
        "gone",
        &RUNNING_CONFIG
            .replace("kvcd-wrapper-test", "kvcd-wrapper-absent")
            .replace("kvcd_param", "kvcd_user"),
    );
    let running = KernelRelease::running().unwrap();
    let o = node.kvcctl(&["wrapper", "gone", "true"]);
    assert_one_line_error(
        &o,
        &format!(
            "image localhost/kvcd-wrapper-absent:{running} is not in local storage; run `kvcd apply gone` (or `kvcd apply --prepare gone`) first"
        ),
    );

    node.config(
        "dir",
        "modules = [\"kvcd_base\"]\n[directory]\npath = \"/usr/lib/kvcd/dir\"\n",
    );
    let o = node.kvcctl(&["wrapper", "dir", "true"]);
    assert_one_line_error(
        &o,
        "module config dir has no driver image; wrappers run tools from an image",
    );

    let o = node.kvcctl(&["wrapper", "nosuch", "true"]);
    assert_one_line_error(
        &o,
        &format!(
            "no module config named \"nosuch\" in {}/modules.d",
            node.etc.display()
        ),
    );

    node.config("broken", "modules = [\"kvcd_param\"]\n");
    let o = node.kvcctl(&["wrapper", "broken", "true"]);
    assert_ne!(o.code, 0, "{o:#?}");
    assert!(o.stderr.contains("invalid configuration"), "{o:#?}");
    assert!(o.stderr.contains("broken.toml"), "{o:#?}");

    let o = node.kvcctl(&["wrapper", "run", "--kernel", "../x", "true"]);
    assert_ne!(o.code, 0, "{o:#?}");
    assert!(o.stderr.contains("invalid kernel release"), "{o:#?}");
}

#[test]
fn install_wrapper_writes_a_working_shim_and_keeps_foreign_files() {
    let _g = podman_lock();
    // A configuration directory whose name needs quoting in the shim.
    let node = Node::with_etc("etc with 'quotes' and $HOME");
    let (_name, _untag) = running_kernel_image();
    node.config("run", RUNNING_CONFIG);
    let bin = node.tmp.path().join("bin");
    fs::create_dir(&bin).unwrap();
    let bin_s = bin.to_str().unwrap();

    let o = node.kvcctl(&["install-wrapper", "run", "printf", "--dir", bin_s]);
    assert_eq!(o.code, 0, "{o:#?}");
    let shim = bin.join("printf");
    assert!(
        o.stdout.starts_with(&format!("wrote {}", shim.display())),
        "{o:#?}"
    );
    let mode = fs::metadata(&shim).unwrap().permissions().mode();
    assert_eq!(mode & 0o7777, 0o755);
    let text = fs::read_to_string(&shim).unwrap();
    assert!(text.starts_with("#!/bin/sh\n"), "{text}");
    assert!(text.contains("--config-dir"), "{text}");

    // The shim passes arguments and the exit status through.
    let o = node.run(&shim, &["<%s>", "a b", "-x", "it's"], "");
    assert_eq!(o.code, 0, "{o:#?}");
    assert_eq!(o.stdout, "<a b><-x><it's>");
    node.kvcctl(&["install-wrapper", "run", "sh", "--dir", bin_s]);
    let o = node.run(
        &bin.join("sh"),
        &["-c", "echo \"$1\"; exit 6", "sh", "x y"],
        "",
    );
    assert_eq!((o.code, o.stdout.as_str()), (6, "x y\n"), "{o:#?}");

    // Its own shim is replaced without --force.
    let o = node.kvcctl(&["install-wrapper", "run", "printf", "--dir", bin_s]);
    assert_eq!(o.code, 0, "{o:#?}");
    assert!(o.stdout.starts_with("replaced "), "{o:#?}");

    // Someone else's file is not, unless forced.
    let foreign = bin.join("cat");
    fs::write(&foreign, "#!/bin/sh\necho mine\n").unwrap();
    let o = node.kvcctl(&["install-wrapper", "run", "cat", "--dir", bin_s]);
    assert_one_line_error(
        &o,
        &format!(
            "{} exists and is neither a shim kvcctl install-wrapper wrote nor a KVC wrapper shim; use --force to replace it",
            foreign.display()
        ),
    );
    assert_eq!(
        fs::read_to_string(&foreign).unwrap(),
        "#!/bin/sh\necho mine\n"
    );
    let o = node.kvcctl(&["install-wrapper", "run", "cat", "--dir", bin_s, "--force"]);
    assert_eq!(o.code, 0, "{o:#?}");
    let o = node.run(&foreign, &[], "through the shim\n");
    assert_eq!((o.code, o.stdout.as_str()), (0, "through the shim\n"));

    // Names that cannot be a file in DIR or a config are refused before anything is written.
    for (name, tool) in [("run", "a/b"), ("run", ".."), ("run", "a b"), ("-x", "t")] {
        let o = node.kvcctl(&["install-wrapper", "--dir", bin_s, "--", name, tool]);
        assert_ne!(o.code, 0, "{name} {tool}: {o:#?}");
        assert!(o.stderr.starts_with("error: invalid "), "{o:#?}");
    }
    let mut names: Vec<_> = fs::read_dir(&bin)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["cat", "printf", "sh"]);
}

/// Removes the immutable attribute from a directory when dropped (also when a test fails).
struct Mutable(PathBuf);

impl Drop for Mutable {
    fn drop(&mut self) {
        let _ = Command::new("chattr").arg("-i").arg(&self.0).status();
    }
}

#[test]
fn install_wrapper_replaces_kvc_shims_wherever_it_finds_them() {
    let _g = podman_lock();
    let node = Node::new();
    let (_name, _untag) = running_kernel_image();
    node.config("run", RUNNING_CONFIG);
    let t = node.tmp.path();
    let dir = |n: &str| {
        let d = t.join(n);
        fs::create_dir_all(&d).unwrap();
        d
    };
    let (bin, usr_bin, other_bin, locked, lib) = (
        dir("bin"),
        dir("usr-bin"),
        dir("other-bin"),
        dir("locked"),
        dir("lib-kvc"),
    );
    // KVC's shims: a script in DIR, a symlink to the library's wrapper script, and one that cannot be replaced.
    let kvc_script = "#!/bin/sh\nexec kmods-via-containers wrapper run $(uname -r) printf \"$@\"\n";
    fs::write(bin.join("printf"), kvc_script).unwrap();
    let wrapper_sh = lib.join("run-wrapper.sh");
    let wrapper_text = "#!/bin/sh\nexec /usr/local/bin/kmods-via-containers wrapper run $(uname -r) \"$(basename \"$0\")\" \"$@\"\n";
    fs::write(&wrapper_sh, wrapper_text).unwrap();
    std::os::unix::fs::symlink(&wrapper_sh, usr_bin.join("printf")).unwrap();
    fs::write(locked.join("printf"), kvc_script).unwrap();
    // Someone else's printf elsewhere is no shim: left alone, not mentioned.
    fs::write(other_bin.join("printf"), "#!/bin/sh\necho real\n").unwrap();
    let chattr = Command::new("chattr")
        .arg("+i")
        .arg(&locked)
        .status()
        .unwrap();
    assert!(chattr.success(), "chattr +i {}", locked.display());
    let _unlock = Mutable(locked.clone());

    let s = |p: &Path| p.to_str().unwrap().to_owned();
    let o = node.kvcctl(&[
        "install-wrapper",
        "run",
        "printf",
        "--dir",
        &s(&bin),
        "--search-dir",
        &s(&usr_bin),
        "--search-dir",
        &s(&other_bin),
        "--search-dir",
        &s(&locked),
    ]);
    assert_eq!(o.code, 1, "{o:#?}");
    let lines: Vec<&str> = o.stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{o:#?}");
    assert!(
        lines[0].starts_with(&format!(
            "replaced KVC shim {} (it runs `kmods-via-containers wrapper`): runs `",
            bin.join("printf").display()
        )),
        "{o:#?}"
    );
    assert!(
        lines[1].starts_with(&format!(
            "replaced KVC shim {} (a symlink to the KVC wrapper {}): runs `",
            usr_bin.join("printf").display(),
            wrapper_sh.display()
        )),
        "{o:#?}"
    );
    assert!(
        o.stderr.starts_with(&format!(
            "kvcctl: could not replace KVC shim {} (it runs `kmods-via-containers wrapper`): writing {}: ",
            locked.join("printf").display(),
            locked.join("printf").display()
        )),
        "{o:#?}"
    );
    assert!(o.stderr.contains("Operation not permitted"), "{o:#?}");
    assert!(
        !o.stderr.contains(&other_bin.display().to_string()),
        "{o:#?}"
    );

    // Both replaced shims run the tool from the driver image; the library's script is untouched.
    for shim in [bin.join("printf"), usr_bin.join("printf")] {
        assert!(
            !fs::symlink_metadata(&shim)
                .unwrap()
                .file_type()
                .is_symlink()
        );
        let o = node.run(&shim, &["<%s>", "a b"], "");
        assert_eq!((o.code, o.stdout.as_str()), (0, "<a b>"), "{o:#?}");
    }
    assert_eq!(fs::read_to_string(&wrapper_sh).unwrap(), wrapper_text);
    assert_eq!(
        fs::read_to_string(locked.join("printf")).unwrap(),
        kvc_script
    );
    assert_eq!(
        fs::read_to_string(other_bin.join("printf")).unwrap(),
        "#!/bin/sh\necho real\n"
    );

    // Once nothing is left that it cannot replace, it succeeds.
    drop(_unlock);
    fs::remove_file(locked.join("printf")).unwrap();
    let o = node.kvcctl(&[
        "install-wrapper",
        "run",
        "printf",
        "--dir",
        &s(&bin),
        "--search-dir",
        &s(&usr_bin),
        "--search-dir",
        &s(&locked),
    ]);
    assert_eq!(o.code, 0, "{o:#?}");
    assert!(o.stdout.starts_with("replaced "), "{o:#?}");
    assert_eq!(o.stdout.lines().count(), 1, "{o:#?}");
}

/// The KVC fixture library's trace lines (`FUNCTION action=… name=… kver=… runtime=…`).
fn trace(path: &Path) -> Vec<String> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn kvc_library_builds_its_image_and_runs_tools_through_its_wrapper() {
    let _g = podman_lock();
    let mut node = Node::new();
    let kver = node.fx.kver.clone();
    let image = format!("localhost/kvc-simple-1.2.0:{kver}");
    let _untag = RemoveOnDrop(vec![image.clone()]);
    let _ = podman(&["rmi", "--force", &image]);

    // /etc/kvc/kvc-simple.conf as an admin has it, with the build context of this checkout.
    let conf_dir = node.tmp.path().join("kvc");
    fs::create_dir(&conf_dir).unwrap();
    let shipped = fs::read_to_string(repo().join("tests/fixtures/kvc/kvc-simple.conf")).unwrap();
    let context = node.var("KVCD_BUILD_CONTEXT").to_owned();
    let conf: String = shipped
        .lines()
        .map(|l| {
            if l.starts_with("KMOD_CONTAINER_BUILD_CONTEXT=") {
                format!("KMOD_CONTAINER_BUILD_CONTEXT=\"{context}\"\n")
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    assert!(conf.contains(&context), "{conf}");
    fs::write(conf_dir.join("kvc-simple.conf"), conf).unwrap();
    let trace_file = node.tmp.path().join("trace");
    node.env = vec![
        ("KVC_CONF_DIR".into(), conf_dir.to_str().unwrap().into()),
        ("KVC_TRACE".into(), trace_file.to_str().unwrap().into()),
    ];

    let lib = repo().join("tests/fixtures/kvc/kvc-simple-lib.sh");
    let podman_bin = podman_path();
    let action = |action: KvcAction| {
        let mut c = kvc::command(
            std::slice::from_ref(&lib),
            action,
            "kvc-simple",
            &kver,
            &podman_bin,
            &[],
        );
        c.envs(node.env.iter().map(|(k, v)| (k, v)));
        let out = c.output().unwrap();
        Out {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    };

    // build: builds once (labelled as KVC does), then finds the image.
    let o = action(KvcAction::Build);
    assert_eq!(o.code, 0, "{o:#?}");
    assert!(
        o.stdout
            .contains(&format!("building kvc-simple-1.2.0:{kver}")),
        "{o:#?}"
    );
    let (code, label) = podman(&["image", "inspect", "--format", "{{.Labels.name}}", &image]);
    assert_eq!((code, label.trim()), (0, "kvc-simple"));
    let o = action(KvcAction::Build);
    assert_eq!(o.code, 0, "{o:#?}");
    assert!(o.stdout.contains("is already built"), "{o:#?}");

    // wrapper through kvcctl: the library's own wrapper function runs the tool.
    node.config(
        "kvc-simple",
        &format!(
            "version = \"1.2.0\"\nmodules = [\"kvcd_param\", \"kvcd_base\"]\n[hooks]\nkvc_library = \"{}\"\n",
            lib.display()
        ),
    );
    let kmodver = format!("/lib/modules/{kver}/kmodver");
    let o = node.kvcctl(&["wrapper", "kvc-simple", "--kernel", &kver, "cat", &kmodver]);
    assert_eq!((o.code, o.stdout.as_str()), (0, "1.2.0\n"), "{o:#?}");
    let o = node.kvcctl(&[
        "wrapper",
        "kvc-simple",
        "--kernel",
        &kver,
        "sh",
        "-c",
        "exit 9",
    ]);
    assert_eq!(o.code, 9, "{o:#?}");
    let o = node.kvcctl_in(
        &[
            "wrapper",
            "kvc-simple",
            "--kernel",
            &kver,
            "printf",
            "<%s>",
            "a b",
            "-x",
        ],
        "",
    );
    assert_eq!((o.code, o.stdout.as_str()), (0, "<a b><-x>"), "{o:#?}");
    let o = node.kvcctl_in(&["wrapper", "kvc-simple", "--kernel", &kver, "cat"], "in\n");
    assert_eq!((o.code, o.stdout.as_str()), (0, "in\n"), "{o:#?}");

    // load: modprobe in the container cannot load into this host's kernel, and
    // `set -eu` stops at the first module; unload: host rmmod fails the same way.
    let o = action(KvcAction::Load);
    assert_ne!(o.code, 0, "{o:#?}");
    assert!(o.stderr.contains("modprobe"), "{o:#?}");
    let o = action(KvcAction::Unload);
    assert_ne!(o.code, 0, "{o:#?}");
    assert!(o.stderr.contains("kvcd_param"), "{o:#?}");

    let vars = |f: &str, a: &str| {
        format!(
            "{f} action={a} name=kvc-simple kver={kver} runtime={}",
            podman_bin.display()
        )
    };
    let mut expected = vec![vars("build_kmods", "build"), vars("build_kmods", "build")];
    expected.extend(std::iter::repeat_n(vars("wrapper", "wrapper"), 4));
    expected.push(vars("load_kmods", "load"));
    expected.push(vars("unload_kmods", "unload"));
    assert_eq!(trace(&trace_file), expected);
}
