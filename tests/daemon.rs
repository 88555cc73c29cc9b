//! `kvcd daemon` against a real private dbus-daemon running the shipped
//! policy (scripts/dbus-bus). The daemon runs in this process with the kernel
//! faked behind `KernelModules` (this host cannot load modules); `kvcctl` and
//! `busctl` talk to it as an admin would. The VM test loads for real.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Fixtures, SharedFake};
use kvcd::config::{Config, Overrides};
use kvcd::daemon::{DaemonOptions, run};
use kvcd::kernel::KernelRelease;
use kvcd::kmod::KernelModules;
use kvcd::reconciler::agent::KmodsFactory;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A private bus, a config tree, and a daemon with a fake kernel.
struct Node {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    address: String,
    fx: Fixtures,
    fake: SharedFake,
    rt: tokio::runtime::Runtime,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    daemon: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    /// The kernel the daemon takes for the running one; default the fixtures' kernel.
    running: String,
}

impl Node {
    fn new() -> Self {
        let tmp = tempfile::Builder::new()
            .prefix("kvcd-dbus")
            .tempdir()
            .unwrap();
        fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let root = tmp.path().to_owned();
        let bus = root.join("bus-dir");
        let out = Command::new(repo().join("scripts/dbus-bus"))
            .arg("start")
            .arg(&bus)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let address = format!("unix:path={}", bus.join("bus").display());
        let fx = Fixtures::get();
        fs::create_dir_all(root.join("etc/modules.d")).unwrap();
        fs::write(
            root.join("etc/kvcd.toml"),
            format!(
                "kernel_modules_dir = \"{}\"\nstate_dir = \"{}\"\nruntime_dir = \"{}\"\nretry_base_seconds = 1\nretry_max_seconds = 2\n",
                fx.modules_dir().display(),
                root.join("state").display(),
                root.join("run").display()
            ),
        )
        .unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        Self {
            _tmp: tmp,
            root,
            address,
            fx,
            fake: SharedFake::default(),
            rt,
            stop: None,
            daemon: None,
            running: String::new(),
        }
    }

    fn module(&self, name: &str, text: &str) {
        let text = text.replace("@KO@", &self.fx.ko().display().to_string());
        let p = self.root.join(format!("etc/modules.d/{name}.toml"));
        let tmp = p.with_extension("tmp");
        fs::write(&tmp, text).unwrap();
        fs::rename(tmp, p).unwrap();
    }

    fn start(&mut self) {
        self.spawn(None);
        // Ready when the name is on the bus.
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.kvcctl(&["list"]).0 != 0 {
            assert!(Instant::now() < deadline, "daemon did not come up");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Starts the daemon, sending systemd notifications to `notify_socket`.
    fn spawn(&mut self, notify_socket: Option<&Path>) {
        let fake = self.fake.clone();
        let factory: KmodsFactory =
            Arc::new(move || Ok(Box::new(fake.clone()) as Box<dyn KernelModules>));
        let opts = DaemonOptions {
            dirs: vec![self.root.join("etc")],
            overrides: Overrides::default(),
            bus_address: Some(self.address.clone()),
            kernel: KernelRelease::parse(if self.running.is_empty() {
                &self.fx.kver
            } else {
                &self.running
            })
            .unwrap(),
            notify_socket: notify_socket.map(|p| p.as_os_str().to_owned()),
        };
        let config = Config::load(&opts.dirs, &opts.overrides);
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        self.stop = Some(tx);
        self.daemon = Some(self.rt.spawn(run(opts, config, factory, async move {
            let _ = rx.await;
        })));
    }

    /// A connection to the private bus, for calls made from the test itself.
    fn connect(&self) -> zbus::Connection {
        self.rt.block_on(async {
            zbus::connection::Builder::address(self.address.as_str())
                .unwrap()
                .build()
                .await
                .unwrap()
        })
    }

    /// The module objects on the bus (`GetManagedObjects`) by name, and the names `ListModules` gives.
    fn objects(
        &self,
        conn: &zbus::Connection,
    ) -> (
        std::collections::BTreeMap<String, kvcd::reconciler::status::ModuleStatus>,
        Vec<String>,
    ) {
        self.rt.block_on(async {
            let objects = zbus::fdo::ObjectManagerProxy::builder(conn)
                .destination(kvcd::dbus::BUS_NAME)
                .unwrap()
                .path(kvcd::dbus::MANAGER_PATH)
                .unwrap()
                .build()
                .await
                .unwrap()
                .get_managed_objects()
                .await
                .unwrap();
            let by_name = objects
                .into_values()
                .filter_map(|mut i| i.remove(kvcd::dbus::MODULE_INTERFACE))
                .map(|props| {
                    let s = kvcd::dbus::module_status(props).unwrap();
                    (s.name.clone(), s)
                })
                .collect();
            let listed = kvcd::dbus::proxy::ManagerProxy::new(conn)
                .await
                .unwrap()
                .list_modules()
                .await
                .unwrap()
                .into_iter()
                .map(|(n, _, _)| n)
                .collect();
            (by_name, listed)
        })
    }

    fn stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(d) = self.daemon.take() {
            self.rt.block_on(d).unwrap().unwrap();
        }
    }

    fn kvcctl_as(&self, uid: Option<u32>, args: &[&str]) -> (i32, String, String) {
        let mut c = Command::new(env!("CARGO_BIN_EXE_kvcctl"));
        c.arg("--bus-address").arg(&self.address).args(args);
        if let Some(u) = uid {
            c.uid(u).gid(u);
        }
        let out = c.output().unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn kvcctl(&self, args: &[&str]) -> (i32, String, String) {
        self.kvcctl_as(None, args)
    }

    fn status(&self, name: &str) -> serde_json::Value {
        let (_, out, err) = self.kvcctl(&["status", name, "--json"]);
        let doc: serde_json::Value =
            serde_json::from_str(&out).unwrap_or_else(|_| panic!("{out}{err}"));
        doc["modules"][0].clone()
    }

    /// Waits until `pred` holds for the status of `name` (or it is gone, for `None`).
    fn wait_until(&self, what: &str, pred: impl Fn(Option<&serde_json::Value>) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (_, out, _) = self.kvcctl(&["status", "--json"]);
            let doc: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
            let mods = doc["modules"].as_array().cloned().unwrap_or_default();
            let name = what.split(':').next().unwrap();
            let m = mods.iter().find(|m| m["name"] == name);
            if pred(m) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; last status: {out}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.stop();
        let _ = Command::new(repo().join("scripts/dbus-bus"))
            .arg("stop")
            .arg(self.root.join("bus-dir"))
            .output();
    }
}

/// Many module configs that need nothing from the kernel until loaded.
fn many(node: &Node, names: std::ops::Range<usize>) -> Vec<String> {
    names
        .map(|i| {
            let name = format!("c{i:03}");
            node.module(
                &name,
                &format!("modules = [\"m{i}\"]\n[directory]\npath = \"@KO@\"\n"),
            );
            name
        })
        .collect()
}

/// Waits for `want` on the notification socket; the messages seen on the way.
fn notified(sock: &std::os::unix::net::UnixDatagram, want: &str) -> Vec<String> {
    let mut buf = [0u8; 512];
    let mut seen = Vec::new();
    loop {
        let n = sock
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("no {want:?} from the daemon (got {seen:?}): {e}"));
        let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
        seen.push(msg.clone());
        if msg == want {
            return seen;
        }
    }
}

/// READY=1 comes only once every module object is on the bus, and a
/// configuration reload answers only once the new objects are there.
#[test]
fn ready_means_every_object_is_on_the_bus() {
    let mut node = Node::new();
    let mut names = many(&node, 0..200);
    let sock_path = node.root.join("notify");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
    // Only so that a daemon that never says READY fails the test instead of hanging it.
    sock.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    node.spawn(Some(&sock_path));
    notified(&sock, "READY=1");
    let conn = node.connect();
    let (objects, listed) = node.objects(&conn);
    assert_eq!(objects.keys().cloned().collect::<Vec<_>>(), names);
    assert!(objects.values().all(|s| s.state.to_string() == "inactive"));
    assert_eq!(listed, names);

    // Fifty more, then ReloadConfig: when it answers they are all there.
    names.extend(many(&node, 200..250));
    node.rt.block_on(async {
        kvcd::dbus::proxy::ManagerProxy::new(&conn)
            .await
            .unwrap()
            .reload_config()
            .await
            .unwrap();
    });
    let (objects, listed) = node.objects(&conn);
    assert_eq!(objects.keys().cloned().collect::<Vec<_>>(), names);
    assert_eq!(listed, names);
}

/// The signals kvcd sends (`PropertiesChanged`, `InterfacesAdded`/`Removed`, ...).
fn kvcd_signals(node: &Node, conn: &zbus::Connection) -> zbus::MessageStream {
    node.rt.block_on(async {
        let rule = zbus::MatchRule::builder()
            .msg_type(zbus::message::Type::Signal)
            .sender(kvcd::dbus::BUS_NAME)
            .unwrap()
            .build();
        zbus::MessageStream::for_match_rule(rule, conn, None)
            .await
            .unwrap()
    })
}

/// Takes signals from `stream` until `want` holds for one; returns every
/// (member, object path, signal) taken, that one last.
fn signals_until(
    node: &Node,
    stream: &mut zbus::MessageStream,
    what: &str,
    mut want: impl FnMut(&str, &str, &zbus::Message) -> bool,
) -> Vec<(String, String)> {
    use futures_util::StreamExt as _;
    node.rt.block_on(async {
        let mut seen = Vec::new();
        loop {
            // Only so that a missing signal fails the test instead of hanging it.
            let msg = tokio::time::timeout(Duration::from_secs(30), stream.next())
                .await
                .unwrap_or_else(|_| panic!("no signal for {what}; saw {seen:?}"))
                .unwrap()
                .unwrap();
            let hdr = msg.header();
            let member = hdr.member().map(|m| m.to_string()).unwrap_or_default();
            let path = hdr.path().map(|p| p.to_string()).unwrap_or_default();
            seen.push((member.clone(), path.clone()));
            if want(&member, &path, &msg) {
                return seen;
            }
        }
    })
}

/// The changed properties a `PropertiesChanged` carries.
fn changed_props(
    msg: &zbus::Message,
) -> std::collections::HashMap<String, zbus::zvariant::OwnedValue> {
    let (_, changed, _): (
        String,
        std::collections::HashMap<String, zbus::zvariant::OwnedValue>,
        Vec<String>,
    ) = msg.body().deserialize().unwrap();
    changed
}

/// A change to one of many config files re-reads that file: only its object
/// changes. A broken edit says where and why and leaves the others alone; a
/// deleted file removes its object, a renamed one moves it.
#[test]
fn a_changed_file_changes_only_its_object() {
    let mut node = Node::new();
    let mut names = many(&node, 0..30);
    node.module("params", PARAM);
    names.push("params".to_owned());
    node.start();
    let (code, out, err) = node.kvcctl(&["load", "--wait", "params"]);
    assert_eq!(code, 0, "{out}{err}");
    // The connection and the stream are dropped inside the runtime.
    let rt = node.rt.handle().clone();
    let _rt = rt.enter();
    let conn = node.connect();
    let mut stream = kvcd_signals(&node, &conn);
    let (before, _) = node.objects(&conn);
    assert_eq!(before.keys().cloned().collect::<Vec<_>>(), names);
    let path = |n: &str| kvcd::dbus::module_path(n).to_string();

    // A broken edit of c005: its Error says which file, which key, what was expected.
    node.module("c005", "modules = \"m5\"\n[directory]\npath = \"@KO@\"\n");
    let file = node.root.join("etc/modules.d/c005.toml");
    let seen = signals_until(&node, &mut stream, "c005's error", |member, p, msg| {
        member == "PropertiesChanged"
            && p == path("c005")
            && changed_props(msg).contains_key("Error")
    });
    assert!(
        seen.iter().all(|(_, p)| *p == path("c005")),
        "signals for other objects: {seen:?}"
    );
    let (after, _) = node.objects(&conn);
    let error = &after["c005"].error;
    for part in [
        file.display().to_string(),
        "key `modules`".to_owned(),
        "expected".to_owned(),
    ] {
        assert!(error.contains(&part), "{part} not in {error:?}");
    }
    for n in &names {
        if n != "c005" {
            assert_eq!(after[n], before[n], "{n} changed");
        }
    }

    // Editing another one (a new parameter reloads the loaded config) signals
    // only for it: nothing else was signalled in between either.
    let done = before["params"].completed_op;
    node.module("params", &PARAM.replace("level=4", "level=6"));
    let seen = signals_until(&node, &mut stream, "params reloaded", |member, p, msg| {
        member == "PropertiesChanged"
            && p == path("params")
            && changed_props(msg)
                .get("CompletedOp")
                .is_some_and(|v| u64::try_from(v).unwrap() > done)
    });
    assert!(
        seen.iter().all(|(_, p)| *p == path("params")),
        "signals for other objects: {seen:?}"
    );
    assert_eq!(node.fake.0.params_of("kvcd_param"), ["level=6"]);

    // Fixed again: c005 is as it was.
    node.module("c005", "modules = [\"m5\"]\n[directory]\npath = \"@KO@\"\n");
    signals_until(&node, &mut stream, "c005 fixed", |member, p, msg| {
        member == "PropertiesChanged"
            && p == path("c005")
            && changed_props(msg)
                .get("Error")
                .is_some_and(|v| <&str>::try_from(v).unwrap().is_empty())
    });
    let (after, _) = node.objects(&conn);
    assert_eq!(after["c005"].error, "");
    assert_eq!(after["c005"].state, before["c005"].state);

    // Deleting c007 removes its object, and only it.
    fs::remove_file(node.root.join("etc/modules.d/c007.toml")).unwrap();
    let seen = signals_until(&node, &mut stream, "c007 removed", |member, _, msg| {
        member == "InterfacesRemoved"
            && msg
                .body()
                .deserialize::<(zbus::zvariant::OwnedObjectPath, Vec<String>)>()
                .unwrap()
                .0
                .as_str()
                == path("c007")
    });
    assert!(
        !seen.iter().any(|(m, _)| m == "InterfacesAdded"),
        "objects added: {seen:?}"
    );
    let (after, listed) = node.objects(&conn);
    names.retain(|n| n != "c007");
    assert_eq!(after.keys().cloned().collect::<Vec<_>>(), names);
    assert_eq!(listed, names);

    // Renaming c008 to c108 moves the config: one object goes, the other comes.
    fs::rename(
        node.root.join("etc/modules.d/c008.toml"),
        node.root.join("etc/modules.d/c108.toml"),
    )
    .unwrap();
    names.retain(|n| n != "c008");
    names.push("c108".to_owned());
    names.sort();
    let mut gone = false;
    let mut added = false;
    signals_until(&node, &mut stream, "c008 renamed", |member, _, msg| {
        let body = msg.body();
        match member {
            "InterfacesRemoved" => {
                let (p, _): (zbus::zvariant::OwnedObjectPath, Vec<String>) =
                    body.deserialize().unwrap();
                gone |= p.as_str() == path("c008");
            }
            "InterfacesAdded" => {
                type Ifaces = std::collections::HashMap<
                    String,
                    std::collections::HashMap<String, zbus::zvariant::OwnedValue>,
                >;
                let (p, _): (zbus::zvariant::OwnedObjectPath, Ifaces) = body.deserialize().unwrap();
                added |= p.as_str() == path("c108");
            }
            _ => {}
        }
        gone && added
    });
    let (after, _) = node.objects(&conn);
    assert_eq!(after.keys().cloned().collect::<Vec<_>>(), names);
    for n in &names {
        if !["c005", "c108", "params"].contains(&n.as_str()) {
            assert_eq!(after[n], before[n], "{n} changed");
        }
    }
    assert_eq!(
        after["c108"].config_file,
        node.root
            .join("etc/modules.d/c108.toml")
            .display()
            .to_string()
    );
}

const PARAM: &str = "version = \"1.2.0\"\nmodules = [\"kvcd_param\"]\n[parameters]\nkvcd_param = [\"level=4\"]\n[directory]\npath = \"@KO@\"\n";

#[test]
fn load_status_unload_over_dbus_with_wait() {
    let mut node = Node::new();
    node.module("params", PARAM);
    node.start();

    let (code, out, err) = node.kvcctl(&["load", "--wait", "params"]);
    assert_eq!((code, out.as_str()), (0, "params: loaded\n"), "{err}");
    assert!(node.fake.0.is_live("kvcd_param"));
    assert_eq!(node.fake.0.params_of("kvcd_param"), ["level=4"]);
    let s = node.status("params");
    assert_eq!(s["state"], "loaded");
    assert_eq!(s["loaded_modules"][0], "kvcd_param");
    assert_eq!(s["wanted"], true);
    assert!(
        s["config_file"]
            .as_str()
            .unwrap()
            .ends_with("etc/modules.d/params.toml")
    );

    let (code, out, _) = node.kvcctl(&["status"]);
    assert_eq!(code, 0);
    assert!(
        out.lines()
            .any(|l| l.starts_with("params") && l.contains("loaded") && l.contains("kvcd_param")),
        "{out}"
    );

    // Loading again is a no-op that answers at once.
    node.fake.0.take_log();
    let (code, _, _) = node.kvcctl(&["load", "--wait", "params"]);
    assert_eq!(code, 0);
    assert!(node.fake.0.take_log().is_empty());

    let (code, out, _) = node.kvcctl(&["unload", "--wait", "params"]);
    assert_eq!((code, out.as_str()), (0, "params: inactive\n"));
    assert!(!node.fake.0.is_live("kvcd_param"));

    let (code, _, err) = node.kvcctl(&["load", "nosuch"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("no module config named \"nosuch\" (org.kvcd.Kvcd1.Error.NotFound)"),
        "{err}"
    );
    // status NAME reads only that object; there is none for an unknown name.
    for args in [&["status", "nosuch"][..], &["status", "nosuch", "--json"]] {
        let (code, out, err) = node.kvcctl(args);
        assert_eq!((code, out.as_str()), (1, ""), "{args:?}: {err}");
        assert_eq!(err, "no module config named \"nosuch\"\n", "{args:?}");
    }
}

#[test]
fn a_failed_load_says_why_and_retries_with_backoff() {
    let mut node = Node::new();
    node.module(
        "wrong",
        "version = \"9.9\"\nmodules = [\"kvcd_user\"]\n[directory]\npath = \"@KO@\"\n",
    );
    node.start();
    let (code, out, _) = node.kvcctl(&["load", "--wait", "wrong"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.starts_with("wrong: failed at verify: module kvcd_user ("),
        "{out}"
    );
    let s = node.status("wrong");
    assert!(s["next_retry"].as_u64().unwrap() > 0, "{s}");
    let first = s["started_op"].as_u64().unwrap();
    // retry_base_seconds = 1: it tries again by itself.
    node.wait_until("wrong", |m| {
        m.is_some_and(|m| m["started_op"].as_u64().unwrap() > first)
    });
    // Fixing the file is picked up by the watcher and the next attempt succeeds.
    node.module(
        "wrong",
        "version = \"1.2.0\"\nmodules = [\"kvcd_user\"]\n[directory]\npath = \"@KO@\"\n",
    );
    node.wait_until("wrong", |m| m.is_some_and(|m| m["state"] == "loaded"));
    assert!(node.fake.0.is_live("kvcd_user"));
}

#[test]
fn non_root_callers_may_read_but_not_change() {
    let mut node = Node::new();
    node.module("params", PARAM);
    node.start();
    let (code, out, err) = node.kvcctl_as(Some(65534), &["status"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("params"), "{out}");
    for verb in [
        &["load", "params"][..],
        &["unload", "params"],
        &["reload", "params"],
        &["reload-config"],
        &["prepare", "6.1.0-1-amd64"],
        &["prepare-next"],
    ] {
        let (code, _, err) = node.kvcctl_as(Some(65534), verb);
        assert_eq!(code, 1, "{verb:?}: {err}");
        assert!(err.contains("AccessDenied"), "{verb:?}: {err}");
    }
    assert!(!node.fake.0.is_live("kvcd_param"));
    // busctl as nobody can introspect and read properties.
    let out = Command::new("busctl")
        .args([
            "--address",
            &node.address,
            "get-property",
            "org.kvcd.Kvcd1",
            "/org/kvcd/Kvcd1/module/params",
            "org.kvcd.Kvcd1.Module",
            "State",
        ])
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "s \"inactive\"\n",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Every property is read-only: setting one is refused, for root too,
    // with access denied rather than an unknown property.
    let out = Command::new("busctl")
        .args([
            "--address",
            &node.address,
            "set-property",
            "org.kvcd.Kvcd1",
            "/org/kvcd/Kvcd1/module/params",
            "org.kvcd.Kvcd1.Module",
            "State",
            "s",
            "loaded",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("Failed to set property State") && err.contains("Access denied"),
        "{err}"
    );
    assert_eq!(node.status("params")["state"], "inactive");
}

#[test]
fn introspection_and_object_manager() {
    let mut node = Node::new();
    node.module("simple-kmod", PARAM);
    node.start();
    let busctl = |args: &[&str]| {
        let out = Command::new("busctl")
            .arg("--address")
            .arg(&node.address)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let manager = busctl(&["introspect", "org.kvcd.Kvcd1", "/org/kvcd/Kvcd1"]);
    for member in [
        ".ListModules",
        ".Load",
        ".Unload",
        ".Reload",
        ".ReloadConfig",
        ".Prepare",
        ".Version",
        ".Kernel",
        ".Modules",
        "org.freedesktop.DBus.ObjectManager",
    ] {
        assert!(manager.contains(member), "{member} missing:\n{manager}");
    }
    let module = busctl(&[
        "introspect",
        "org.kvcd.Kvcd1",
        "/org/kvcd/Kvcd1/module/simple_2dkmod",
    ]);
    for prop in [
        ".Name",
        ".State",
        ".Step",
        ".Error",
        ".Kernel",
        ".Image",
        ".ImageDigest",
        ".LoadedModules",
        ".Since",
        ".NextRetry",
        ".ConfigFile",
    ] {
        assert!(module.contains(prop), "{prop} missing:\n{module}");
    }
    let objects = busctl(&[
        "call",
        "org.kvcd.Kvcd1",
        "/org/kvcd/Kvcd1",
        "org.freedesktop.DBus.ObjectManager",
        "GetManagedObjects",
    ]);
    assert!(
        objects.contains("/org/kvcd/Kvcd1/module/simple_2dkmod"),
        "{objects}"
    );
    assert!(objects.contains("\"simple-kmod\""), "{objects}");

    // The shipped introspection data is what the daemon serves.
    for (file, path) in [
        ("org.kvcd.Kvcd1.Manager.xml", "/org/kvcd/Kvcd1"),
        (
            "org.kvcd.Kvcd1.Module.xml",
            "/org/kvcd/Kvcd1/module/simple_2dkmod",
        ),
    ] {
        let xml = busctl(&["--xml-interface", "introspect", "org.kvcd.Kvcd1", path]);
        let iface = file.trim_end_matches(".xml");
        let start = xml.find(&format!("<interface name=\"{iface}\">")).unwrap();
        let end = start + xml[start..].find("</interface>").unwrap() + "</interface>".len();
        let served = format!("{}\n", &xml[start..end]);
        let shipped = repo().join("docs/dbus").join(file);
        if std::env::var_os("KVCD_BLESS").is_some() {
            fs::create_dir_all(shipped.parent().unwrap()).unwrap();
            fs::write(&shipped, &served).unwrap();
        }
        assert_eq!(
            fs::read_to_string(&shipped).unwrap_or_default(),
            served,
            "{} is stale: run the test with KVCD_BLESS=1",
            shipped.display()
        );
    }
}

#[test]
fn config_changes_are_followed_live() {
    let mut node = Node::new();
    node.module("params", PARAM);
    node.start();
    assert_eq!(node.kvcctl(&["load", "--wait", "params"]).0, 0);

    // A new file appears as a new object.
    node.module(
        "other",
        "modules = [\"kvcd_base\"]\n[directory]\npath = \"@KO@\"\n",
    );
    node.wait_until("other", |m| m.is_some_and(|m| m["state"] == "inactive"));

    // A version bump reloads the loaded config: out with the old, in with the new.
    node.fake.0.take_log();
    let before = node.status("params")["completed_op"].as_u64().unwrap();
    node.module("params", &PARAM.replace("level=4", "level=5"));
    node.wait_until("params", |m| {
        m.is_some_and(|m| m["completed_op"].as_u64().unwrap() > before && m["state"] == "loaded")
    });
    assert_eq!(
        node.fake.0.take_log(),
        ["remove kvcd_param", "insert kvcd_param"]
    );
    assert_eq!(node.fake.0.params_of("kvcd_param"), ["level=5"]);

    // A kernel_match that leaves the kernel out unloads it; the edit back loads it again.
    let excluded = format!(
        "kernel_match = '^0\\.0\\.'\n{}",
        PARAM.replace("level=4", "level=5")
    );
    node.module("params", &excluded);
    node.wait_until("params", |m| m.is_some_and(|m| m["state"] == "unsupported"));
    assert!(!node.fake.0.is_live("kvcd_param"));
    assert_eq!(node.status("params")["wanted"], true);
    node.module("params", &PARAM.replace("level=4", "level=5"));
    node.wait_until("params", |m| m.is_some_and(|m| m["state"] == "loaded"));
    assert!(node.fake.0.is_live("kvcd_param"));

    // A broken file keeps the working driver and says so.
    node.module("params", "modules = [\n");
    node.wait_until("params", |m| {
        m.is_some_and(|m| {
            m["error"]
                .as_str()
                .unwrap()
                .starts_with("invalid configuration, keeping the last good one:")
        })
    });
    assert_eq!(node.status("params")["state"], "loaded");
    assert!(node.fake.0.is_live("kvcd_param"));

    // Masking it unloads it and its object goes away.
    fs::remove_file(node.root.join("etc/modules.d/params.toml")).unwrap();
    std::os::unix::fs::symlink("/dev/null", node.root.join("etc/modules.d/params.toml")).unwrap();
    node.wait_until("params", |m| m.is_none());
    assert!(!node.fake.0.is_live("kvcd_param"));

    // Deleting works the same way.
    node.module(
        "other",
        "modules = [\"kvcd_base\"]\n[directory]\npath = \"@KO@\"\n",
    );
    assert_eq!(node.kvcctl(&["load", "--wait", "other"]).0, 0);
    fs::remove_file(node.root.join("etc/modules.d/other.toml")).unwrap();
    node.wait_until("other", |m| m.is_none());
    assert!(!node.fake.0.is_live("kvcd_base"));
}

#[test]
fn a_restarted_daemon_adopts_what_is_loaded_without_reinserting() {
    let mut node = Node::new();
    node.module("params", PARAM);
    node.start();
    assert_eq!(node.kvcctl(&["load", "--wait", "params"]).0, 0);
    node.stop();
    // Stopping leaves drivers loaded.
    assert!(node.fake.0.is_live("kvcd_param"));
    node.fake.0.take_log();
    node.start();
    node.wait_until("params", |m| m.is_some_and(|m| m["state"] == "loaded"));
    assert!(node.fake.0.take_log().is_empty(), "adopted, not reinserted");
    assert_eq!(node.status("params")["wanted"], true);

    // A module put in the place of kvcd's while no kvcd ran is not adopted.
    node.stop();
    node.fake.0.remove(&common::m("kvcd_param"), false).unwrap();
    node.fake
        .0
        .preload("kvcd_param", &node.fx.ko().join("kvcd_base.ko"), &[]);
    node.start();
    node.wait_until("params", |m| m.is_some_and(|m| m["state"] == "failed"));
    let err = node.status("params")["error"].as_str().unwrap().to_owned();
    assert!(
        err.starts_with("kvcd_param is live, but not as the package's"),
        "{err}"
    );
}

#[test]
fn after_ordering_is_respected() {
    let mut node = Node::new();
    node.module(
        "first",
        "modules = [\"kvcd_base\"]\n[directory]\npath = \"@KO@\"\n",
    );
    node.module(
        "second",
        "after = [\"first\"]\nmodules = [\"kvcd_param\"]\n[directory]\npath = \"@KO@\"\n",
    );
    node.start();
    assert_eq!(node.kvcctl(&["load", "first"]).0, 0);
    let (code, out, _) = node.kvcctl(&["load", "--wait", "second"]);
    assert_eq!(code, 0, "{out}");
    let log = node.fake.0.take_log();
    assert_eq!(log, ["insert kvcd_base", "insert kvcd_param"]);
}

#[test]
fn kvcctl_says_when_kvcd_is_not_running() {
    let node = Node::new();
    let (code, _, err) = node.kvcctl(&["status"]);
    assert_eq!(code, 3);
    assert_eq!(
        err,
        "error: kvcd is not running (nothing owns org.kvcd.Kvcd1 on the bus); start it with `systemctl start kvcd`\n"
    );
    let (code, _, err) = Command::new(env!("CARGO_BIN_EXE_kvcctl"))
        .args(["--bus-address", "unix:path=/nonexistent/bus", "status"])
        .output()
        .map(|o| {
            (
                o.status.code().unwrap(),
                (),
                String::from_utf8_lossy(&o.stderr).into_owned(),
            )
        })
        .unwrap();
    assert_eq!(code, 3);
    assert!(
        err.starts_with("error: cannot reach the D-Bus system bus:"),
        "{err}"
    );
}

/// The real `kvcd daemon` process: systemd notifications, SIGHUP, watchdog, SIGTERM.
#[test]
fn the_daemon_process_talks_to_systemd_and_obeys_signals() {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    use std::os::unix::net::UnixDatagram;

    let node = Node::new();
    node.module("params", PARAM);
    let sock_path = node.root.join("notify");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_kvcd"))
        .arg("--config-dir")
        .arg(node.root.join("etc"))
        .args(["daemon", "--bus-address", &node.address])
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "400000")
        .env_remove("WATCHDOG_PID")
        .spawn()
        .unwrap();
    let recv_until = |want: &str| notified(&sock, want);
    let seen = recv_until("READY=1");
    assert!(seen.contains(&"STATUS=1 inactive".to_owned()), "{seen:?}");
    recv_until("WATCHDOG=1");
    let pid = Pid::from_raw(i32::try_from(child.id()).unwrap());
    kill(pid, Signal::SIGHUP).unwrap();
    recv_until("RELOADING=1");
    recv_until("READY=1");
    kill(pid, Signal::SIGTERM).unwrap();
    recv_until("STOPPING=1");
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
}

/// A registry that accepts connections and never answers: the load ends as
/// failed with the pull's timeout named, and the daemon answers all along.
#[test]
fn a_silent_registry_fails_the_load_while_the_daemon_answers() {
    let mut node = Node::new();
    let toml = node.root.join("etc/kvcd.toml");
    let mut text = fs::read_to_string(&toml).unwrap();
    text.push_str("podman = \"podman\"\npull_timeout_seconds = 3\n");
    fs::write(&toml, text).unwrap();
    let port = common::silent_registry();
    let reference = format!("127.0.0.1:{port}/kvcd/silent:1");
    node.module(
        "silent",
        &format!(
            "modules = [\"kvcd_param\"]\n[image]\nref = \"{reference}\"\ntls_verify = false\npull = \"always\"\n"
        ),
    );
    node.start();
    assert_eq!(node.kvcctl(&["load", "silent"]).0, 0);
    node.wait_until("silent", |m| m.is_some_and(|m| m["state"] == "fetching"));
    // While the pull hangs, the daemon answers (an answer that waited for
    // the pull would say failed, not fetching).
    let (_, out, err) = node.kvcctl(&["status", "silent"]);
    assert!(out.contains("fetching"), "{out}{err}");
    node.wait_until("silent", |m| m.is_some_and(|m| m["state"] == "failed"));
    let e = node.status("silent")["error"].as_str().unwrap().to_owned();
    assert!(
        e.contains("podman pull timed out after 3s; its process group was killed"),
        "{e}"
    );
}

/// SIGTERM ends the real daemon within `stop_timeout_seconds` even while a
/// step hangs, and the hung step's processes go with it.
#[test]
fn sigterm_ends_the_daemon_within_its_stop_timeout() {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;

    let node = Node::new();
    let toml = node.root.join("etc/kvcd.toml");
    let mut text = fs::read_to_string(&toml).unwrap();
    text.push_str("stop_timeout_seconds = 2\n");
    fs::write(&toml, text).unwrap();
    let pidfile = node.root.join("build.pid");
    // A build hook that never finishes: the load hangs in its fetch step.
    node.module(
        "stuck",
        &format!(
            "modules = [\"kvcd_param\"]\n[image]\nref = \"localhost/kvcd-never-built:1\"\npull = \"never\"\n[hooks]\nbuild = [\"/bin/sh\", \"-c\", \"echo $$ > {}; exec sleep 300\"]\n",
            pidfile.display()
        ),
    );
    let mut child = Command::new(env!("CARGO_BIN_EXE_kvcd"))
        .arg("--config-dir")
        .arg(node.root.join("etc"))
        .args(["daemon", "--bus-address", &node.address])
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while node.kvcctl(&["list"]).0 != 0 {
        assert!(Instant::now() < deadline, "daemon did not come up");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(node.kvcctl(&["load", "stuck"]).0, 0);
    while !pidfile.exists() || fs::read_to_string(&pidfile).unwrap().trim().is_empty() {
        assert!(Instant::now() < deadline, "the build hook did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    let hook: i32 = fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let pid = Pid::from_raw(i32::try_from(child.id()).unwrap());
    kill(pid, Signal::SIGTERM).unwrap();
    let stop = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > stop {
            let _ = child.kill();
            panic!("kvcd did not stop after SIGTERM with stop_timeout_seconds = 2");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(status.code(), Some(0));
    // The abandoned hook was killed (a zombie no longer has a cmdline).
    std::thread::sleep(Duration::from_millis(200));
    let cmdline = fs::read(format!("/proc/{hook}/cmdline")).unwrap_or_default();
    assert!(
        cmdline.is_empty(),
        "the hung build hook {hook} survived: {}",
        String::from_utf8_lossy(&cmdline)
    );
}

#[test]
fn a_busy_reload_is_retried_as_a_reload_and_unload_on_stop_unloads() {
    let mut node = Node::new();
    let toml = node.root.join("etc/kvcd.toml");
    let text = fs::read_to_string(&toml).unwrap();
    fs::write(&toml, format!("{text}unload_on_stop = true\n")).unwrap();
    node.module("params", PARAM);
    node.start();
    assert_eq!(node.kvcctl(&["load", "--wait", "params"]).0, 0);
    // Someone holds the module: the reload after a config change is refused...
    node.fake.0.hold("kvcd_param");
    node.module("params", &PARAM.replace("level=4", "level=6"));
    node.wait_until("params", |m| {
        m.is_some_and(|m| m["state"] == "busy" && m["next_retry"].as_u64().unwrap() > 0)
    });
    // ...and once it is free, the retry swaps in the new config.
    node.fake.0.release("kvcd_param");
    node.wait_until("params", |m| m.is_some_and(|m| m["state"] == "loaded"));
    assert_eq!(node.fake.0.params_of("kvcd_param"), ["level=6"]);
    // unload_on_stop = true: stopping the agent unloads what it loaded.
    node.stop();
    assert!(!node.fake.0.is_live("kvcd_param"));
}

/// Reads the pid a hook wrote to `file`, waiting for it.
fn hook_pid(file: &Path) -> i32 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(pid) = fs::read_to_string(file).unwrap_or_default().trim().parse() {
            return pid;
        }
        assert!(Instant::now() < deadline, "the build hook did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Preparing another kernel takes one of `max_parallel`'s slots like any
/// work, and stopping waits for it (up to `stop_timeout_seconds`).
#[test]
fn a_preparation_counts_as_work_and_stopping_waits_for_it() {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;

    let mut node = Node::new();
    let toml = node.root.join("etc/kvcd.toml");
    let text = fs::read_to_string(&toml).unwrap();
    fs::write(
        &toml,
        format!("{text}max_parallel = 1\nstop_timeout_seconds = 2\n"),
    )
    .unwrap();
    let pidfile = node.root.join("build.pid");
    node.module("params", PARAM);
    node.module(
        "stuck",
        &format!(
            "modules = [\"kvcd_base\"]\n[image]\nref = \"localhost/kvcd-never-built:1\"\npull = \"never\"\n[hooks]\nbuild = [\"/bin/sh\", \"-c\", \"echo $$ > {}; exec sleep 300\"]\n",
            pidfile.display()
        ),
    );
    node.start();
    assert_eq!(node.kvcctl(&["prepare", "6.1.0-99-amd64"]).0, 0);
    let hook = hook_pid(&pidfile);
    // The preparation holds the only slot: the load waits.
    let (code, out, err) = node.kvcctl(&["load", "params"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("params: queued"), "{out}");
    std::thread::sleep(Duration::from_secs(1));
    let s = node.status("params");
    assert_eq!(
        (s["state"].as_str(), s["started_op"].as_u64()),
        (Some("inactive"), Some(0)),
        "{s}"
    );
    assert!(!node.fake.0.is_live("kvcd_param"));
    // Once it ends, the load runs.
    kill(Pid::from_raw(hook), Signal::SIGKILL).unwrap();
    node.wait_until("params", |m| m.is_some_and(|m| m["state"] == "loaded"));
    assert!(node.fake.0.is_live("kvcd_param"));

    // Stopping while a preparation runs waits for it until the stop timeout.
    fs::remove_file(&pidfile).unwrap();
    assert_eq!(node.kvcctl(&["prepare", "6.1.0-99-amd64"]).0, 0);
    let hook = hook_pid(&pidfile);
    let stopping = Instant::now();
    node.stop();
    let waited = stopping.elapsed();
    kill(Pid::from_raw(hook), Signal::SIGKILL).unwrap();
    assert!(
        waited >= Duration::from_millis(1500),
        "stopped after {waited:?} without waiting for the preparation"
    );
}

#[test]
fn the_gate_shows_the_next_kernel_and_prepare_next_goes_through_the_daemon() {
    let mut node = Node::new();
    // Running another kernel makes the fixtures' kernel the one the node boots next.
    node.running = "6.1.0-1-amd64".into();
    node.module(
        "gate",
        "modules = [\"kvcd_param\"]\n[directory]\npath = \"@KO@\"\n",
    );
    // One the prepare cannot give: no package for the next kernel.
    node.module(
        "nopkg",
        "modules = [\"kvcd_crc\"]\n[directory]\npath = \"/nonexistent/${KERNEL_FULL_VERSION}\"\n",
    );
    node.start();
    let kver = node.fx.kver.clone();

    // Not prepared: the gate holds (exit 1) and says why, for anyone.
    let (code, out, err) = node.kvcctl_as(Some(65534), &["next"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        out.contains(&format!("kernel {kver} (next, package")) && out.contains("NOT READY"),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "gate: not-prepared: never prepared for kernel {kver}"
        )),
        "{out}"
    );
    let (_, out, _) = node.kvcctl(&["status"]);
    assert!(out.contains("next kernels (kvcctl next):"), "{out}");

    // `kvcd prepare-next` while the agent holds the lock: the agent prepares.
    let layout = kvcd::state::Layout {
        state_dir: node.root.join("state"),
        runtime_dir: node.root.join("run"),
    };
    let lock = layout.lock().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_kvcd"))
        .arg("--config-dir")
        .arg(node.root.join("etc"))
        .args(["prepare-next", "--json", "--bus-address", &node.address])
        .output()
        .unwrap();
    drop(lock);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let k = &doc["kernels"][0];
    assert_eq!(k["release"], kver.as_str(), "{stdout}");
    assert_eq!(k["ready"], false, "{stdout}");
    let result = |name: &str| {
        k["results"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == name)
            .unwrap()
            .clone()
    };
    assert_eq!(result("gate")["state"], "prepared", "{stdout}");
    assert_eq!(result("nopkg")["state"], "failed", "{stdout}");
    assert!(
        node.root
            .join("state/sets")
            .join(&kver)
            .join("gate.json")
            .is_file()
    );

    // A later look keeps the prepare's reason, not only "not prepared".
    let (code, out, err) = node.kvcctl(&["next"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.contains("gate: ready:"), "{out}");
    assert!(
        out.contains(&format!(
            "nopkg: failed: resolve: module directory /nonexistent/{kver}"
        )),
        "{out}"
    );

    // Without the config that cannot be had, the gate opens.
    fs::remove_file(node.root.join("etc/modules.d/nopkg.toml")).unwrap();
    let (code, _, err) = node.kvcctl(&["reload-config"]);
    assert_eq!(code, 0, "{err}");

    // The property follows (the reload checks again) without being asked, and the gate opens.
    let conn = node.connect();
    let deadline = Instant::now() + Duration::from_secs(10);
    let next = loop {
        let next = node.rt.block_on(async {
            kvcd::dbus::proxy::ManagerProxy::new(&conn)
                .await
                .unwrap()
                .next_kernels()
                .await
                .unwrap()
        });
        if next.first().is_some_and(|k| k.3) || Instant::now() > deadline {
            break next;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(next.len(), 1);
    assert_eq!(
        (next[0].0.as_str(), next[0].1.as_str(), next[0].3),
        (kver.as_str(), "next", true)
    );
    assert_eq!(next[0].4[0].0, "gate");
    assert_eq!(next[0].4[0].1, "ready");
    let (code, out, err) = node.kvcctl(&["next"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("gate: ready:"), "{out}");
    assert!(
        !node.fake.0.is_live("kvcd_param"),
        "preparing loads nothing"
    );
}

#[test]
fn signing_status_is_on_the_bus_and_in_kvcctl_status() {
    let mut node = Node::new();
    let keys = node.root.join("keys");
    fs::create_dir_all(&keys).unwrap();
    let (key, cert) = common::make_key(&keys, "k", "kvcd daemon test key", "rsa:2048");
    let toml = node.root.join("etc/kvcd.toml");
    let mut text = fs::read_to_string(&toml).unwrap();
    text.push_str(&format!(
        "[signing]\nkey = \"{}\"\ncert = \"{}\"\nhash = \"sha512\"\n",
        key.display(),
        cert.display()
    ));
    fs::write(&toml, text).unwrap();
    node.module("params", PARAM);
    node.start();

    let (code, out, err) = node.kvcctl(&["load", "--wait", "params"]);
    assert_eq!((code, out.as_str()), (0, "params: loaded\n"), "{err}");
    // What was inserted is the signed file.
    let path = node.fake.0.path_of("kvcd_param").unwrap();
    let signer = common::run(Command::new("modinfo").args(["-F", "signer"]).arg(&path));
    assert_eq!(signer.trim(), "kvcd daemon test key");

    let (code, out, _) = node.kvcctl(&["status"]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("\nsigning (kvcd signing):\n  signing: on\n"),
        "{out}"
    );
    assert!(out.contains("  subject: kvcd daemon test key\n"), "{out}");
    assert!(out.contains("  hash: sha512\n"), "{out}");
    // This host's kernel has no keyring with the key.
    assert!(out.contains("  trusted by: "), "{out}");

    let (code, out, _) = node.kvcctl(&["status", "--json"]);
    assert_eq!(code, 0);
    let doc: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(doc["signing"]["subject"], "kvcd daemon test key");
    assert_eq!(doc["signing"]["cert"], cert.display().to_string());

    // A key made readable by others shows as an error after a reload.
    fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
    let (code, _, err) = node.kvcctl(&["reload-config"]);
    assert_eq!(code, 0, "{err}");
    let (_, out, _) = node.kvcctl(&["status"]);
    assert!(
        out.contains("has mode 0644: a signing key must be readable by its owner only"),
        "{out}"
    );
}

/// `GET /metrics` from an HTTP server on 127.0.0.1:`port`; the body.
fn http_get(port: u16, path: &str) -> Option<String> {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())
}

#[test]
fn metrics_go_to_a_textfile_that_promtool_accepts_and_node_exporter_serves() {
    let mut node = Node::new();
    let dir = node.root.join("textfile");
    fs::create_dir_all(&dir).unwrap();
    let prom = dir.join("kvcd.prom");
    let toml = node.root.join("etc/kvcd.toml");
    let mut text = fs::read_to_string(&toml).unwrap();
    text.push_str(&format!("[metrics]\ntextfile = \"{}\"\n", prom.display()));
    fs::write(&toml, text).unwrap();
    node.module("params", PARAM);
    node.start();
    let (code, out, err) = node.kvcctl(&["load", "--wait", "params"]);
    assert_eq!((code, out.as_str()), (0, "params: loaded\n"), "{err}");

    // Written by the loop after the load's result: wait for it.
    let want = [
        "kvcd_up 1",
        "kvcd_module_state{config=\"params\",state=\"loaded\"} 1",
        "kvcd_module_state{config=\"params\",state=\"failed\"} 0",
        "kvcd_module_wanted{config=\"params\"} 1",
        "kvcd_module_loaded_modules{config=\"params\"} 1",
        "kvcd_module_operations_total{config=\"params\",operation=\"load\"} 1",
        "kvcd_module_failures_total{config=\"params\"} 0",
    ];
    let deadline = Instant::now() + Duration::from_secs(10);
    let metrics = loop {
        let t = fs::read_to_string(&prom).unwrap_or_default();
        if want.iter().all(|w| t.lines().any(|l| l == *w)) {
            break t;
        }
        assert!(
            Instant::now() < deadline,
            "metrics never showed {want:?}:\n{t}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("kvcd_heartbeat_timestamp_seconds ")),
        "{metrics}"
    );
    // No temporary file next to it: node_exporter reads every *.prom.
    assert_eq!(fs::read_dir(&dir).unwrap().count(), 1);

    match Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(fs::File::open(&prom).unwrap())
        .output()
    {
        Ok(o) => assert!(
            o.status.success(),
            "promtool check metrics: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => eprintln!(
            "SKIP promtool check metrics: promtool cannot run here ({e}; scripts/setup installs prometheus)"
        ),
    }

    // Debian's node_exporter, textfile collector only, on a free loopback port.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    match Command::new("prometheus-node-exporter")
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .args(["--collector.disable-defaults", "--collector.textfile"])
        .arg(format!("--collector.textfile.directory={}", dir.display()))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
    {
        Ok(mut exporter) => {
            let deadline = Instant::now() + Duration::from_secs(20);
            let body = loop {
                if let Some(b) = http_get(port, "/metrics") {
                    break b;
                }
                assert!(Instant::now() < deadline, "node_exporter never answered");
                std::thread::sleep(Duration::from_millis(100));
            };
            let _ = exporter.kill();
            let _ = exporter.wait();
            for w in &want[1..] {
                assert!(
                    body.lines().any(|l| l == *w),
                    "node_exporter does not serve {w:?}:\n{body}"
                );
            }
            assert!(
                body.lines().any(|l| l == "node_textfile_scrape_error 0"),
                "{body}"
            );
        }
        Err(e) => eprintln!(
            "SKIP node_exporter scrape: prometheus-node-exporter cannot run here ({e}; scripts/setup installs it)"
        ),
    }

    // Stopped: the file says so.
    node.stop();
    let t = fs::read_to_string(&prom).unwrap();
    assert!(t.lines().any(|l| l == "kvcd_up 0"), "{t}");
}
