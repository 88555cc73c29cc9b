//! The `kvcd` and `kvcctl` binaries as an admin runs them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::Fixtures;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn run(bin: &str, args: &[&str]) -> (i32, String, String) {
    let out: Output = Command::new(bin)
        .args(args)
        .current_dir(repo())
        .env_remove("KVCD_LOG")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn kvcctl(args: &[&str]) -> (i32, String, String) {
    run(env!("CARGO_BIN_EXE_kvcctl"), args)
}

fn kvcd(args: &[&str]) -> (i32, String, String) {
    run(env!("CARGO_BIN_EXE_kvcd"), args)
}

#[test]
fn shipped_examples_validate() {
    let (code, out, _) = kvcctl(&["config", "validate", "--examples", "conf.d"]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        out.trim(),
        "7 module config(s) valid, 0 invalid, 0 error(s)"
    );
    // They are alternatives: installed together on one node, the simple-kmod
    // ones would fight over the same modules.
    let (code, out, _) = kvcctl(&["config", "validate", "conf.d"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("conf.d/simple-kmod.toml: key `modules`: module \"simple_kmod\" is also loaded by module config \"simple-kmod-dtk\" (conf.d/simple-kmod-dtk.toml): expected one owner per module; keep it in one config\n"),
        "{out}"
    );
}

/// Every file in tests/configs/broken says on its first line what validate must print.
#[test]
fn each_broken_example_names_file_and_key() {
    let dir = repo().join("tests/configs/broken");
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(files.len() >= 10);
    for f in &files {
        let text = fs::read_to_string(f).unwrap();
        let expect = text
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("# expect: "))
            .unwrap_or_else(|| panic!("{} has no `# expect:` line", f.display()));
        let rel = f.strip_prefix(repo()).unwrap().to_str().unwrap();
        let (code, out, _) = kvcctl(&["config", "validate", rel]);
        assert_eq!(code, 1, "{rel}: {out}");
        let want = format!("tests/configs/broken/{expect}");
        assert!(
            out.starts_with(&want),
            "{rel}:\n  want: {want}\n  got:  {out}"
        );
    }
    // All of them at once: one error each, and the good examples alongside stay valid.
    let (code, out, _) = kvcctl(&[
        "config",
        "validate",
        "--examples",
        "conf.d",
        "tests/configs/broken",
        "--json",
    ]);
    assert_eq!(code, 1);
    let doc: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        doc["errors"].as_array().unwrap().len(),
        files.len(),
        "{out}"
    );
    assert_eq!(doc["valid"].as_array().unwrap().len(), 7, "{out}");
    assert!(doc["errors"][0]["file"].is_string());
}

fn write(path: &Path, text: &str) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, text).unwrap();
}

#[test]
fn show_reports_the_winning_file_and_what_it_overrides() {
    let tmp = tempfile::tempdir().unwrap();
    let (usr, etc) = (tmp.path().join("usr"), tmp.path().join("etc"));
    let body = "modules = [\"a\"]\n[directory]\npath = \"/x/${KERNEL_FULL_VERSION}\"\n";
    write(&usr.join("modules.d/x.toml"), body);
    write(
        &etc.join("modules.d/x.toml"),
        &format!("version = \"2\"\n{body}"),
    );
    write(&usr.join("modules.d/gone.toml"), body);
    fs::create_dir_all(etc.join("modules.d")).unwrap();
    std::os::unix::fs::symlink("/dev/null", etc.join("modules.d/gone.toml")).unwrap();
    let dirs = [
        "--config-dir",
        usr.to_str().unwrap(),
        "--config-dir",
        etc.to_str().unwrap(),
    ];

    let (code, out, _) = kvcctl(&[&dirs[..], &["config", "show", "--json"]].concat());
    assert_eq!(code, 0, "{out}");
    let doc: serde_json::Value = serde_json::from_str(&out).unwrap();
    let m = &doc["modules"][0];
    assert_eq!(m["name"], "x");
    assert_eq!(m["file"], etc.join("modules.d/x.toml").to_str().unwrap());
    assert_eq!(
        m["overrides"][0],
        usr.join("modules.d/x.toml").to_str().unwrap()
    );
    assert_eq!(m["config"]["version"], "2");
    assert_eq!(m["config"]["modules"][0], "a");
    assert_eq!(doc["modules"].as_array().unwrap().len(), 1);
    assert_eq!(
        doc["masked"][0],
        etc.join("modules.d/gone.toml").to_str().unwrap()
    );

    let (code, out, _) = kvcctl(&[&dirs[..], &["config", "show", "x"]].concat());
    assert_eq!(code, 0);
    assert!(out.contains("  version: 2\n"), "{out}");
    assert!(
        out.contains(&format!(
            "  overrides: {}",
            usr.join("modules.d/x.toml").display()
        )),
        "{out}"
    );

    let (code, _, err) = kvcctl(&[&dirs[..], &["config", "show", "gone"]].concat());
    assert_eq!(code, 1);
    assert!(err.contains("no module config named \"gone\""), "{err}");
}

struct Node {
    tmp: tempfile::TempDir,
    fx: Fixtures,
}

impl Node {
    fn new() -> Self {
        let fx = Fixtures::get();
        let tmp = tempfile::tempdir().unwrap();
        write(
            &tmp.path().join("etc/kvcd.toml"),
            &format!(
                "kernel_modules_dir = \"{}\"\nstate_dir = \"{}\"\nruntime_dir = \"{}\"\n",
                fx.modules_dir().display(),
                tmp.path().join("state").display(),
                tmp.path().join("run").display()
            ),
        );
        Self { tmp, fx }
    }

    fn module(&self, name: &str, text: &str) {
        let text = text.replace("@KO@", &self.fx.ko().display().to_string());
        write(
            &self.tmp.path().join(format!("etc/modules.d/{name}.toml")),
            &text,
        );
    }

    fn apply(&self, args: &[&str]) -> (i32, String, String) {
        let etc = self.tmp.path().join("etc");
        let mut all = vec![
            "--config-dir",
            etc.to_str().unwrap(),
            "apply",
            "--kernel",
            &self.fx.kver,
        ];
        all.extend_from_slice(args);
        kvcd(&all)
    }
}

#[test]
fn apply_unknown_and_invalid_configs() {
    let node = Node::new();
    node.module(
        "bad",
        "modules = [\"a\"]\nbogus = 1\n[directory]\npath = \"/x\"\n",
    );
    let (code, out, _) = node.apply(&["nosuch", "bad"]);
    assert_eq!(code, 1);
    assert!(
        out.contains("nosuch: failed at config: no module config named \"nosuch\""),
        "{out}"
    );
    assert!(
        out.contains("bad: failed at config: invalid configuration:"),
        "{out}"
    );
    assert!(
        out.contains("modules.d/bad.toml:2:1: key `bogus`: unknown field `bogus`"),
        "{out}"
    );
}

#[test]
fn apply_with_broken_daemon_config_stops_with_the_file_named() {
    let node = Node::new();
    let p = node.tmp.path().join("etc/kvcd.toml");
    fs::write(&p, "state_dir = 3\n").unwrap();
    let (code, _, err) = node.apply(&["x"]);
    assert_eq!(code, 2);
    assert!(
        err.contains(&format!(
            "{}:1:13: key `state_dir`: invalid type: integer `3`, expected a string",
            p.display()
        )),
        "{err}"
    );
}

#[test]
fn apply_reports_unsupported_kernels_as_success_in_json() {
    let node = Node::new();
    node.module(
        "old",
        "kernel_match = '^2\\.6'\nmodules = [\"kvcd_param\"]\n[directory]\npath = \"@KO@\"\n",
    );
    let (code, out, _) = node.apply(&["--json", "old"]);
    assert_eq!(code, 0, "{out}");
    let doc: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(doc["kernel"], node.fx.kver.as_str());
    assert_eq!(doc["results"][0]["name"], "old");
    assert_eq!(doc["results"][0]["state"], "unsupported");
    assert!(doc["results"][0]["error"].is_null());
}

/// What the running kernel says to inserting the fixture module (built for
/// another kernel): the end of kvcd's message, as far as it can be known
/// from the host. `None` when the kernel might really load it.
fn expected_refusal(fixture_kernel: &str) -> Option<&'static [&'static str]> {
    const ENOSYS: &str = "this kernel cannot load or unload modules (built without loadable module support) (ENOSYS)";
    if !Path::new("/proc/modules").exists() {
        return Some(&[ENOSYS]);
    }
    if !nix::unistd::geteuid().is_root() {
        return Some(&["(EPERM)"]);
    }
    let running = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    if running.trim() == fixture_kernel {
        return None;
    }
    // Root on another kernel: refused for the kernel it was built for, or
    // before that for its signature or by a lockdown.
    Some(&["(ENOEXEC)", "(EKEYREJECTED)", "(ENOKEY)", "(EPERM)"])
}

/// The real libkmod insert is refused by the running kernel (without module
/// support: ENOSYS; as a user: EPERM; as root: the fixture is for another
/// kernel); kvcd says so at the insert step, naming the module, and records
/// nothing; a second run reuses the module tree.
#[test]
fn apply_when_the_kernel_refuses_the_insert() {
    let node = Node::new();
    let Some(refusals) = expected_refusal(&node.fx.kver) else {
        // Past the test harness's capture, so that the skip is seen.
        let _ = std::io::Write::write_all(
            &mut std::io::stderr(),
            format!(
                "SKIP apply_when_the_kernel_refuses_the_insert: this host runs kernel {} as root, so the fixture module could really be inserted; the VM tests cover real loading\n",
                node.fx.kver
            )
            .as_bytes(),
        );
        return;
    };
    node.module("p", "modules = [\"kvcd_param\"]\n[parameters]\nkvcd_param = [\"level=3\"]\n[directory]\npath = \"@KO@\"\n");
    let (code, out, _) = node.apply(&["p"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("p: verify: architecture, vermagic and versions match"),
        "{out}"
    );
    let failed = out
        .lines()
        .find_map(|l| l.strip_prefix("p: failed at insert: inserting module kvcd_param: "))
        .unwrap_or_else(|| panic!("no failed insert of kvcd_param: {out}"));
    assert!(
        refusals.iter().any(|r| failed.ends_with(r)),
        "expected a refusal ending in one of {refusals:?}, found {failed:?}"
    );
    assert!(!node.tmp.path().join("run/loaded/p.json").exists());

    let (code, out, _) = node.apply(&["--json", "p"]);
    assert_eq!(code, 1);
    let doc: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(doc["results"][0]["state"], "failed");
    assert_eq!(doc["results"][0]["error"]["step"], "insert");
    // The second run found the file stored already.
    let steps = doc["results"][0]["steps"].as_array().unwrap();
    assert!(
        steps.iter().any(|s| s["step"] == "stage"
            && s["detail"]
                .as_str()
                .unwrap()
                .ends_with("in the store already")),
        "{out}"
    );
    assert!(!node.tmp.path().join("run/loaded/p.json").exists());
}

#[test]
fn unload_of_something_never_loaded_is_a_no_op() {
    let node = Node::new();
    let (code, out, _) = node.apply(&["--unload", "anything"]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("anything: remove: nothing loaded by kvcd"),
        "{out}"
    );
    assert!(out.contains("anything: inactive"), "{out}");
}

#[test]
fn prune_keeps_newest_kernels_the_running_one_and_drops_gone_configs() {
    let node = Node::new();
    node.module(
        "kept",
        "modules = [\"kvcd_param\"]\n[directory]\npath = \"@KO@\"\n",
    );
    let running = nix::sys::utsname::uname()
        .unwrap()
        .release()
        .to_string_lossy()
        .into_owned();
    let state = node.tmp.path().join("state");
    for k in [
        "6.1.0-1-amd64",
        "6.1.0-2-amd64",
        "6.1.0-10-amd64",
        running.as_str(),
    ] {
        fs::create_dir_all(state.join("sets").join(k)).unwrap();
        fs::write(
            state.join("sets").join(k).join("kept.json"),
            b"{\"files\": {}}",
        )
        .unwrap();
    }
    fs::create_dir_all(state.join("images/gone/6.1.0-10-amd64/abc")).unwrap();
    let etc = node.tmp.path().join("etc");
    let args = [
        "--config-dir",
        etc.to_str().unwrap(),
        "prune",
        "--keep",
        "1",
    ];

    let (code, out, _) = kvcd(&[&args[..], &["--dry-run"]].concat());
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("kept: would remove artifacts of kernel(s) 6.1.0-2-amd64, 6.1.0-1-amd64"),
        "{out}"
    );
    assert!(state.join("sets/6.1.0-1-amd64/kept.json").exists());

    let (code, out, _) = kvcd(&[&args[..], &["--json"]].concat());
    assert_eq!(code, 0, "{out}");
    let doc: serde_json::Value = serde_json::from_str(&out).unwrap();
    let results = doc["results"].as_array().unwrap();
    assert_eq!(results[0]["config"], "gone");
    assert_eq!(results[0]["kernels"][0], "6.1.0-10-amd64");
    assert_eq!(results[1]["config"], "kept");
    assert!(!state.join("images/gone").exists());
    assert!(state.join("sets/6.1.0-10-amd64/kept.json").exists());
    assert!(state.join("sets").join(&running).join("kept.json").exists());
    assert!(!state.join("sets/6.1.0-2-amd64/kept.json").exists());
    assert!(!state.join("sets/6.1.0-1-amd64/kept.json").exists());

    let (code, out, _) = kvcd(&args);
    assert_eq!(code, 0);
    assert!(out.contains("kept: nothing to prune"), "{out}");
}

/// Runs `kvcctl ARGS`, failing the test if it takes more than 30 seconds.
fn kvcctl_within_30s(args: &[&str]) -> (i32, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kvcctl"))
        .args(args)
        .current_dir(repo())
        .env_remove("KVCD_LOG")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > std::time::Duration::from_secs(30) {
            child.kill().unwrap();
            panic!("kvcctl {args:?} still running after 30 s");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn fifos_and_devices_are_refused_without_blocking() {
    let tmp = tempfile::tempdir().unwrap();
    let etc = tmp.path().join("etc");
    fs::create_dir_all(etc.join("modules.d")).unwrap();
    nix::unistd::mkfifo(
        &etc.join("modules.d/fifo.toml"),
        nix::sys::stat::Mode::S_IRWXU,
    )
    .unwrap();
    std::os::unix::fs::symlink("/dev/zero", etc.join("kvcd.toml")).unwrap();
    std::os::unix::fs::symlink("/dev/zero", etc.join("modules.d/zero.toml")).unwrap();
    write(
        &etc.join("modules.d/big.toml"),
        &format!("modules = [\"a\"]\n{}\n", "#".repeat(2 << 20)),
    );
    let (code, out) =
        kvcctl_within_30s(&["--config-dir", etc.to_str().unwrap(), "config", "validate"]);
    assert_eq!(code, 1, "{out}");
    let d = etc.display();
    assert_eq!(
        out,
        format!(
            "{d}/kvcd.toml: not a regular file (a character device); configs must be regular files\n\
             {d}/modules.d/big.toml: file is larger than 1 MiB, the limit for a config file\n\
             {d}/modules.d/fifo.toml: not a regular file (a FIFO); configs must be regular files\n\
             {d}/modules.d/zero.toml: not a regular file (a character device); configs must be regular files\n\
             0 module config(s) valid, 3 invalid, 4 error(s)\n"
        )
    );
    // Named directly, too.
    let fifo = etc.join("modules.d/fifo.toml");
    let (code, out) = kvcctl_within_30s(&["config", "validate", fifo.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.starts_with(&format!("{}: not a regular file (a FIFO)", fifo.display())),
        "{out}"
    );
}

#[test]
fn a_config_dir_named_on_the_command_line_must_exist() {
    let tmp = tempfile::tempdir().unwrap();
    let gone = tmp.path().join("gone");
    let (code, out, _) = kvcctl(&["--config-dir", gone.to_str().unwrap(), "config", "validate"]);
    assert_eq!(code, 1, "{out}");
    assert_eq!(
        out,
        format!(
            "{}: no such directory: expected a configuration directory (holding kvcd.toml and modules.d/)\n\
             0 module config(s) valid, 0 invalid, 1 error(s)\n",
            gone.display()
        )
    );
    let (code, out, _) = kvcctl(&["--config-dir", gone.to_str().unwrap(), "config", "show"]);
    assert_eq!(code, 1);
    assert!(
        out.contains(&format!("  error: {}: no such directory", gone.display())),
        "{out}"
    );
    let (code, _, err) = kvcd(&["--config-dir", gone.to_str().unwrap(), "apply", "x"]);
    assert_eq!(code, 2);
    assert!(
        err.contains(&format!("{}: no such directory", gone.display())),
        "{err}"
    );
}

#[test]
fn daemon_settings_errors_name_the_keys() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("kvcd.toml");
    write(
        &file,
        "podman = \"/bin/sh -c id\"\nmax_parallel = 0\nretry_base_seconds = 60\nretry_max_seconds = 30\n",
    );
    let (code, out, _) = kvcctl(&["config", "validate", file.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}");
    let f = file.display();
    assert_eq!(
        out,
        format!(
            "{f}:1:10: key `podman`: expected a program path, not a command line: a program name looked up in PATH (e.g. \"podman\") or an absolute path, without blanks or a leading '-'; found \"/bin/sh -c id\"\n\
             {f}:2:16: key `max_parallel`: expected a whole number of module configs worked on at once, at least 1, found 0\n\
             {f}:4:21: key `retry_max_seconds`: retry_max_seconds (30) is below retry_base_seconds (60): expected retry_max_seconds >= retry_base_seconds\n\
             0 module config(s) valid, 0 invalid, 3 error(s)\n"
        )
    );
}

#[test]
fn a_kvc_library_that_is_nowhere_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("k.toml");
    write(
        &file,
        "modules = [\"simple-kmod\"]\n[hooks]\nkvc_library = [\"/nonexistent/kvc/k-lib.sh\", \"/nonexistent/lib/kvc/k-lib.sh\"]\n",
    );
    let (code, out, _) = kvcctl(&["config", "validate", file.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}");
    assert_eq!(
        out.lines().next().unwrap(),
        format!(
            "{}:3:15: key `hooks.kvc_library`: no such file: /nonexistent/kvc/k-lib.sh, /nonexistent/lib/kvc/k-lib.sh (expected at least one existing KVC library; missing locations are skipped)",
            file.display()
        )
    );
    let lib = tmp.path().join("k-lib.sh");
    fs::write(&lib, "").unwrap();
    write(
        &file,
        &format!(
            "modules = [\"simple-kmod\"]\n[hooks]\nkvc_library = [\"/nonexistent/k-lib.sh\", {lib:?}]\n"
        ),
    );
    let (code, out, _) = kvcctl(&["config", "validate", file.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
}

/// Two module configs that claim the same module fail both, in `config
/// validate` and in `kvcd apply` (which loads the configuration as the daemon does).
#[test]
fn a_module_has_one_owner() {
    let node = Node::new();
    node.module(
        "first",
        "modules = [\"kvcd-param\"]\n[directory]\npath = \"@KO@\"\n",
    );
    node.module(
        "second",
        "modules = [\"kvcd_param\"]\nreplace_in_tree = [\"crc8\"]\n[directory]\npath = \"@KO@\"\n",
    );
    node.module(
        "third",
        "modules = [\"kvcd_base\"]\nreplace_in_tree = [\"crc8\"]\n[directory]\npath = \"@KO@\"\n",
    );
    let md = node.tmp.path().join("etc/modules.d");
    let f = |n: &str| md.join(format!("{n}.toml")).display().to_string();
    let etc = node.tmp.path().join("etc");
    let (code, out, _) = kvcctl(&["--config-dir", etc.to_str().unwrap(), "config", "validate"]);
    assert_eq!(code, 1, "{out}");
    let tail = "expected one owner per module; keep it in one config";
    assert_eq!(
        out,
        format!(
            "{first}: key `modules`: module \"kvcd_param\" is also loaded by module config \"second\" ({second}): {tail}\n\
             {second}: key `replace_in_tree`: module \"crc8\" is also replaced in tree by module config \"third\" ({third}): {tail}\n\
             {second}: key `modules`: module \"kvcd_param\" is also loaded by module config \"first\" ({first}): {tail}\n\
             {third}: key `replace_in_tree`: module \"crc8\" is also replaced in tree by module config \"second\" ({second}): {tail}\n\
             0 module config(s) valid, 3 invalid, 4 error(s)\n",
            first = f("first"),
            second = f("second"),
            third = f("third"),
        )
    );
    let (code, out, _) = node.apply(&["second"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("second: failed at config: invalid configuration:"),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "{}: key `modules`: module \"kvcd_param\" is also loaded by module config \"first\"",
            f("second")
        )),
        "{out}"
    );
}
