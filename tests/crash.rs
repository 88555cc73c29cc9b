//! The kill -9 tier on the host: `kvcd apply` (the real binary, built with
//! the `failpoints` feature) is killed with SIGKILL at every failpoint a
//! clean run reaches, then run again; the node must end exactly as after a
//! clean run: the same modules live (simulated kernel kept in a directory,
//! as this host cannot load modules), the same records, firmware and
//! firmware search path, no temporary file, no image left mounted, the lock
//! free. Real podman and registry for the image scenario; real depmod and
//! module files throughout. The VM tier does the same on a real kernel.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::process::ExitStatusExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{Fixtures, images_env};
use kvcd::kmod::ModName;
use kvcd::kmod::sim::{SimKernel, SimModule};
use nix::fcntl::{Flock, FlockArg};

/// One node: config, state, runtime, firmware and a simulated kernel under a temp dir.
struct Node {
    tmp: tempfile::TempDir,
    fx: Fixtures,
}

/// What a scenario loads, and how its clean run ends.
struct Scenario {
    name: &'static str,
    config: String,
    /// Modules whose insert the simulated kernel refuses.
    refuse: &'static [&'static str],
    /// The driver image, whose mount must never be left behind.
    image: Option<String>,
    /// Exit code of a clean `apply`.
    load_code: i32,
}

impl Node {
    fn new(s: &Scenario) -> Self {
        let tmp = tempfile::Builder::new()
            .prefix("kvcd-crash")
            .tempdir()
            .unwrap();
        let fx = Fixtures::get();
        let n = Self { tmp, fx };
        let etc = n.path("etc");
        fs::create_dir_all(etc.join("modules.d")).unwrap();
        fs::write(
            etc.join("kvcd.toml"),
            format!(
                "kernel_modules_dir = \"{}\"\nstate_dir = \"{}\"\nruntime_dir = \"{}\"\nfirmware_dir = \"{}\"\n",
                n.fx.modules_dir().display(),
                n.path("state").display(),
                n.path("run").display(),
                n.path("firmware").display(),
            ),
        )
        .unwrap();
        fs::write(
            etc.join(format!("modules.d/{}.toml", s.name)),
            s.config.replace("@KO@", &n.fx.ko().display().to_string()),
        )
        .unwrap();
        // The in-tree dummy is live, as on a node that uses it.
        n.sim()
            .put(
                &ModName::parse("dummy").unwrap(),
                &SimModule {
                    path: n
                        .fx
                        .modules_dir()
                        .join(&n.fx.kver)
                        .join("kernel/drivers/net/dummy.ko"),
                    // As modprobe loads it, with the kernel tree's options.
                    params: vec!["numdummies=0".to_owned()],
                    ..SimModule::default()
                },
            )
            .unwrap();
        if !s.refuse.is_empty() {
            fs::write(n.path("kernel/refuse-insert"), s.refuse.join("\n")).unwrap();
        }
        n
    }

    fn path(&self, p: &str) -> PathBuf {
        self.tmp.path().join(p)
    }

    fn sim(&self) -> SimKernel {
        SimKernel::new(self.path("kernel"))
    }

    /// Runs `kvcd apply ARGS` against this node; `kill_at` arms a failpoint.
    fn apply(&self, args: &[&str], kill_at: Option<&str>, log: Option<&Path>) -> Output {
        let mut c = Command::new(env!("CARGO_BIN_EXE_kvcd"));
        c.arg("--config-dir")
            .arg(self.path("etc"))
            .args(["apply", "--kernel", &self.fx.kver])
            .args(args)
            .env("KVCD_SIM_KERNEL", self.path("kernel"))
            .env_remove("KVCD_FAILPOINTS")
            .env_remove("KVCD_FAILPOINTS_LOG");
        if let Some(fp) = kill_at {
            c.env("KVCD_FAILPOINTS", fp);
        }
        if let Some(l) = log {
            c.env("KVCD_FAILPOINTS_LOG", l);
        }
        c.output().unwrap()
    }

    /// The node as a test compares it: live modules, records, firmware, search path.
    fn snapshot(&self) -> String {
        let root = self.tmp.path().display().to_string();
        let mut out = String::new();
        for (name, m) in self.sim().modules().unwrap() {
            out += &format!("live {name} from {} {:?}\n", m.path.display(), m.params);
        }
        let search = fs::read_to_string(self.path("kernel/firmware_path")).unwrap_or_default();
        out += &format!("firmware_class.path={search}\n");
        for r in kvcd::state::RecordStore::new(&self.path("run"))
            .all()
            .unwrap()
        {
            out += &format!(
                "record {} inserted={:?} removed_in_tree={:?} firmware={:?} complete={} intent={:?}\n",
                r.config,
                r.inserted
                    .iter()
                    .map(|o| o.name.to_string())
                    .collect::<Vec<_>>(),
                r.removed_in_tree
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>(),
                r.firmware,
                r.complete,
                r.intent,
            );
        }
        for f in walk(&self.path("firmware")) {
            out += &format!("firmware file {}\n", f.display());
        }
        out.replace(&root, "ROOT")
    }

    /// Everything a killed process must not leave behind.
    fn leftovers(&self) -> Vec<String> {
        let mut bad: Vec<String> = walk(self.tmp.path())
            .into_iter()
            .filter(|p| {
                let n = p.file_name().unwrap().to_string_lossy();
                n.contains(".tmp") || p.parent() == Some(&self.path("state/mounts"))
            })
            .map(|p| format!("left {}", p.display()))
            .collect();
        for dir in ["state", "run"] {
            let lock = self.path(dir).join("kvcd.lock");
            if let Ok(f) = fs::File::open(&lock) {
                if Flock::lock(f, FlockArg::LockExclusiveNonblock).is_err() {
                    bad.push(format!("{} is still locked", lock.display()));
                }
            }
        }
        bad
    }
}

/// Every file and directory under `dir`, recursively (symlinks not followed).
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = fs::read_dir(dir) else {
        return out;
    };
    let mut entries: Vec<_> = entries.flatten().collect();
    entries.sort_by_key(fs::DirEntry::file_name);
    for e in entries {
        let p = e.path();
        out.push(p.clone());
        if e.file_type().unwrap().is_dir() {
            out.extend(walk(&p));
        }
    }
    out
}

/// The failpoints a clean run reached, each with how often: `NAME#N` for
/// the first and the last time it was reached.
fn reached(log: &Path) -> Vec<String> {
    let text = fs::read_to_string(log).unwrap_or_default();
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    let mut order = Vec::new();
    for l in text.lines() {
        let c = counts.entry(l).or_default();
        *c += 1;
        if *c == 1 {
            order.push(l);
        }
    }
    let mut out = Vec::new();
    for name in order {
        out.push(format!("{name}#1"));
        if counts[name] > 1 {
            out.push(format!("{name}#{}", counts[name]));
        }
    }
    out
}

fn code(o: &Output) -> i32 {
    o.status.code().unwrap_or(-1)
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `kvcd daemon` on a private bus, with a node's config and simulated kernel.
struct Daemon {
    child: std::process::Child,
}

impl Node {
    /// Starts the daemon (killed at `kill_at`, if given) and waits until it answers.
    fn daemon(&self, address: &str, kill_at: Option<&str>, log: Option<&Path>) -> Daemon {
        let mut c = Command::new(env!("CARGO_BIN_EXE_kvcd"));
        c.arg("--config-dir")
            .arg(self.path("etc"))
            .args(["daemon", "--bus-address", address])
            .env("KVCD_SIM_KERNEL", self.path("kernel"))
            .env("KVCD_LOG", "kvcd=debug")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("KVCD_FAILPOINTS")
            .env_remove("KVCD_FAILPOINTS_LOG")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(fs::File::create(self.path("daemon.log")).unwrap());
        if let Some(fp) = kill_at {
            c.env("KVCD_FAILPOINTS", fp);
        }
        if let Some(l) = log {
            c.env("KVCD_FAILPOINTS_LOG", l);
        }
        let mut child = c.spawn().unwrap();
        for _ in 0..200 {
            if child.try_wait().unwrap().is_some()
                || self.kvcctl(address, &["list"]).status.success()
            {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        Daemon { child }
    }

    fn kvcctl(&self, address: &str, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_kvcctl"))
            .args(["--bus-address", address])
            .args(args)
            .output()
            .unwrap()
    }
}

impl Daemon {
    /// Waits (up to 60 s) for the daemon to end; its status.
    fn wait(mut self) -> std::process::ExitStatus {
        for _ in 0..600 {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let _ = self.child.kill();
        self.child.wait().unwrap()
    }

    /// SIGTERM, then wait.
    fn stop(self) -> std::process::ExitStatus {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).unwrap()),
            nix::sys::signal::Signal::SIGTERM,
        );
        self.wait()
    }
}

/// A private system bus (scripts/dbus-bus) for as long as it lives.
struct Bus {
    dir: PathBuf,
    address: String,
}

impl Bus {
    fn start(dir: PathBuf) -> Self {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/dbus-bus");
        let out = Command::new(&script)
            .arg("start")
            .arg(&dir)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out));
        let address = format!("unix:path={}", dir.join("bus").display());
        Self { dir, address }
    }
}

impl Drop for Bus {
    fn drop(&mut self) {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/dbus-bus");
        let _ = Command::new(script).arg("stop").arg(&self.dir).output();
    }
}

/// What one failpoint did: killed there, and whether the rerun converged.
struct Row {
    point: String,
    phase: &'static str,
    problems: Vec<String>,
}

/// Kills `apply` (or `apply --unload`) at each failpoint a clean run
/// reaches, reruns it, and compares with the clean run.
fn run_tier(s: &Scenario) -> Vec<Row> {
    // Clean runs: what load and unload reach, and where they end.
    let clean = Node::new(s);
    let before = clean.snapshot();
    let load_log = clean.path("load.log");
    let o = clean.apply(&[s.name], None, Some(&load_log));
    assert_eq!(code(&o), s.load_code, "clean load: {}", text(&o));
    let loaded = clean.snapshot();
    let unload_log = clean.path("unload.log");
    let o = clean.apply(&["--unload", s.name], None, Some(&unload_log));
    assert_eq!(code(&o), 0, "clean unload: {}", text(&o));
    let unloaded = clean.snapshot();
    assert_eq!(
        unloaded, before,
        "a clean load and unload leave the node as it was"
    );
    assert!(clean.leftovers().is_empty(), "{:?}", clean.leftovers());

    let image_id = s.image.as_ref().map(|r| {
        let o = Command::new("podman")
            .args(["image", "inspect", "--format", "{{.Id}}", r])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", text(&o));
        String::from_utf8_lossy(&o.stdout).trim().to_owned()
    });
    let mut rows = Vec::new();
    let mut check = |point: &str, phase: &'static str, node: &Node, o: &Output, want: &str| {
        let mut problems = Vec::new();
        if o.status.signal() != Some(9) {
            problems.push(format!("not killed there (exit {}): {}", code(o), text(o)));
        }
        problems.extend(node.leftovers());
        if let Some(id) = &image_id {
            let mounted = Command::new("podman")
                .args(["image", "mount", "--format", "json"])
                .output()
                .unwrap();
            if String::from_utf8_lossy(&mounted.stdout).contains(id.as_str()) {
                problems.push(format!("image {id} is left mounted"));
            }
        }
        let got = node.snapshot();
        if got != want {
            problems.push(format!("ended as\n{got}instead of\n{want}"));
        }
        rows.push(Row {
            point: point.to_owned(),
            phase,
            problems,
        });
    };

    for point in reached(&load_log) {
        // Killed while loading, then loaded again: as a clean load.
        let node = Node::new(s);
        let killed = node.apply(&[s.name], Some(&point), None);
        let again = node.apply(&[s.name], None, None);
        let mut o = killed.clone();
        if code(&again) != s.load_code {
            o = again;
        }
        check(&point, "load, load", &node, &o, &loaded);
        // Killed while loading, then unloaded: as before the load.
        let node = Node::new(s);
        let killed = node.apply(&[s.name], Some(&point), None);
        let undo = node.apply(&["--unload", s.name], None, None);
        let o = if code(&undo) == 0 { killed } else { undo };
        check(&point, "load, unload", &node, &o, &before);
    }
    for point in reached(&unload_log) {
        // Killed while unloading, then unloaded again: as before the load.
        let node = Node::new(s);
        let o = node.apply(&[s.name], None, None);
        assert_eq!(code(&o), s.load_code, "{}", text(&o));
        let killed = node.apply(&["--unload", s.name], Some(&point), None);
        let again = node.apply(&["--unload", s.name], None, None);
        let o = if code(&again) == 0 { killed } else { again };
        check(&point, "unload, unload", &node, &o, &before);
    }
    rows
}

/// Prints the table and fails on any row that did not converge.
fn report(s: &Scenario, rows: &[Row], min_points: usize) {
    let mut failed = 0;
    println!("kill -9 tier, scenario {}:", s.name);
    for r in rows {
        let verdict = if r.problems.is_empty() {
            "converged"
        } else {
            failed += 1;
            "FAILED"
        };
        println!("  {:<16} {:<28} {verdict}", r.phase, r.point);
        for p in &r.problems {
            println!("      {}", p.replace('\n', "\n      "));
        }
    }
    let points: std::collections::BTreeSet<_> = rows.iter().map(|r| r.point.as_str()).collect();
    println!(
        "  {} failpoint(s), {} kill(s), {failed} did not converge",
        points.len(),
        rows.len()
    );
    assert_eq!(failed, 0, "scenario {}: see the table above", s.name);
    assert!(
        points.len() >= min_points,
        "scenario {} reached only {} failpoints",
        s.name,
        points.len()
    );
}

fn skip_without_failpoints() -> bool {
    if cfg!(feature = "failpoints") {
        return false;
    }
    println!("SKIP: the kill -9 tier needs `cargo test --features failpoints`");
    true
}

const HOOKS: &str = r#"
[hooks]
pre_load = ["/bin/true"]
post_load = ["/bin/true"]
pre_unload = ["/bin/true"]
post_unload = ["/bin/true"]
"#;

/// A package replacing the in-tree dummy (with a parameter), with a
/// dependency in the package and one in-tree, and hooks around both ways.
fn stack() -> Scenario {
    Scenario {
        name: "stack",
        config: format!(
            "modules = [\"dummy\", \"kvcd_user\", \"kvcd_crc\"]\nreplace_in_tree = [\"dummy\"]\n[parameters]\ndummy = [\"origin=kvcd\"]\n[directory]\npath = \"@KO@\"\n{HOOKS}"
        ),
        refuse: &[],
        image: None,
        load_code: 0,
    }
}

#[test]
fn apply_converges_after_a_kill_at_every_failpoint_of_a_package() {
    if skip_without_failpoints() {
        return;
    }
    let s = stack();
    let rows = run_tier(&s);
    report(&s, &rows, 25);
}

#[test]
fn a_failed_load_rolls_back_the_same_after_a_kill_at_every_failpoint() {
    if skip_without_failpoints() {
        return;
    }
    let s = Scenario {
        name: "refused",
        config: "modules = [\"dummy\", \"kvcd_user\", \"kvcd_crc\"]\nreplace_in_tree = [\"dummy\"]\n[directory]\npath = \"@KO@\"\n".to_owned(),
        refuse: &["kvcd_crc"],
        image: None,
        load_code: 1,
    };
    let rows = run_tier(&s);
    report(&s, &rows, 15);
}

#[test]
fn an_image_with_firmware_converges_after_a_kill_at_every_failpoint() {
    if skip_without_failpoints() {
        return;
    }
    let _podman = common::podman_lock();
    let vars = images_env();
    let s = Scenario {
        name: "fw",
        config: format!(
            "modules = [\"kvcd_param\"]\n[image]\nref = \"{}\"\ntls_verify = false\nfirmware_dir = \"/lib/firmware\"\n",
            vars["KVCD_IMAGE_TAG"]
        ),
        refuse: &[],
        image: Some(vars["KVCD_IMAGE_TAG"].clone()),
        load_code: 0,
    };
    let rows = run_tier(&s);
    report(&s, &rows, 20);
}

#[test]
fn the_daemon_converges_after_a_kill_at_every_failpoint() {
    if skip_without_failpoints() {
        return;
    }
    let s = stack();
    let new_node = || {
        let n = Node::new(&s);
        fs::write(n.path("kernel/release"), &n.fx.kver).unwrap();
        n
    };
    let bus_dir = tempfile::Builder::new()
        .prefix("kvcd-crash-bus")
        .tempdir()
        .unwrap();
    fs::set_permissions(
        bus_dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let bus = Bus::start(bus_dir.path().join("bus"));
    let load = ["load", "--wait", "--timeout", "60", "stack"];
    let unload = ["unload", "--wait", "--timeout", "60", "stack"];

    // A clean run: what it reaches and where it ends.
    let clean = new_node();
    let before = clean.snapshot();
    let log = clean.path("daemon-fp.log");
    let d = clean.daemon(&bus.address, None, Some(&log));
    let o = clean.kvcctl(&bus.address, &load);
    assert_eq!(code(&o), 0, "{}", text(&o));
    let loaded = clean.snapshot();
    let o = clean.kvcctl(&bus.address, &unload);
    assert_eq!(code(&o), 0, "{}", text(&o));
    assert!(d.stop().success());
    assert_eq!(clean.snapshot(), before);

    let mut rows = Vec::new();
    for point in reached(&log) {
        let started = std::time::Instant::now();
        let node = new_node();
        let mut problems = Vec::new();
        // The clean run's requests until the daemon is killed; the client
        // waiting on it says so at once.
        let d = node.daemon(&bus.address, Some(&point), None);
        let mut o = node.kvcctl(&bus.address, &load);
        if code(&o) == 0 {
            o = node.kvcctl(&bus.address, &unload);
        }
        if code(&o) != 3 {
            problems.push(format!("kvcctl: exit {}: {}", code(&o), text(&o)));
        }
        let status = d.wait();
        if status.signal() != Some(9) {
            problems.push(format!("not killed there ({status})"));
        }
        let d = node.daemon(&bus.address, None, None);
        let o = node.kvcctl(&bus.address, &load);
        if code(&o) != 0 {
            problems.push(format!("load after the restart: {}", text(&o)));
        }
        let got = node.snapshot();
        if got != loaded {
            problems.push(format!("ended as\n{got}instead of\n{loaded}"));
        }
        let o = node.kvcctl(&bus.address, &unload);
        if code(&o) != 0 || node.snapshot() != before {
            problems.push(format!(
                "unload after the restart: {}{}",
                text(&o),
                node.snapshot()
            ));
        }
        if !d.stop().success() {
            problems.push("the restarted daemon did not stop cleanly".to_owned());
        }
        problems.extend(node.leftovers());
        if !problems.is_empty() {
            problems.push(format!(
                "daemon log:\n{}",
                fs::read_to_string(node.path("daemon.log")).unwrap_or_default()
            ));
            eprintln!("{}", problems.join("\n"));
        }
        eprintln!(
            "daemon killed at {point}: {} in {:.1}s",
            if problems.is_empty() {
                "converged"
            } else {
                "FAILED"
            },
            started.elapsed().as_secs_f64()
        );
        rows.push(Row {
            point,
            phase: "daemon, restart",
            problems,
        });
    }
    report(&s, &rows, 25);
}
