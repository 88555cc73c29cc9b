//! The apply engine on the host against real fixture modules, real depmod and
//! real libkmod lookups, with the kernel itself faked (this host cannot load
//! modules; tests/vm proves the same behaviour in a real kernel).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use common::{FakeKernel, Fixtures, m};
use kvcd::artifacts::ModuleStore;
use kvcd::artifacts::podman::Podman;
use kvcd::config::{Config, ModuleConfig, Overrides};
use kvcd::kernel::KernelRelease;
use kvcd::reconciler::next::Readiness;
use kvcd::reconciler::{Action, Engine, Outcome, RecordStore, State, Step};
use nix::errno::Errno;

struct Env {
    tmp: tempfile::TempDir,
    fx: Fixtures,
    fake: FakeKernel,
}

impl Env {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        fs::create_dir_all(tmp.path().join("etc/modules.d")).unwrap();
        Self {
            tmp,
            fx: Fixtures::get(),
            fake: FakeKernel::default(),
        }
    }

    fn kernel(&self) -> KernelRelease {
        KernelRelease::parse(&self.fx.kver).unwrap()
    }

    fn engine_for(&self, kernel: KernelRelease) -> Engine<'_> {
        Engine {
            layout: ModuleStore::new(self.tmp.path().join("state"), self.fx.modules_dir()),
            kernel,
            kmods: &self.fake,
            firmware_dir: self.tmp.path().join("firmware"),
            keep_kernels: 3,
            protect: Vec::new(),
            target_is_live: true,
            podman: Box::new(Podman::new(Path::new("/nonexistent/podman"))),
            records: RecordStore::new(&self.tmp.path().join("run")),
            on_step: None,
            signing: None,
            sysfs: PathBuf::from("/sys"),
        }
    }

    fn engine(&self) -> Engine<'_> {
        self.engine_for(self.kernel())
    }

    fn records(&self) -> RecordStore {
        RecordStore::new(&self.tmp.path().join("run"))
    }

    /// Writes modules.d/NAME.toml (with `@KO@` replaced by the fixture dir) and returns it validated.
    fn config(&self, name: &str, text: &str) -> ModuleConfig {
        let text = text.replace("@KO@", &self.fx.ko().display().to_string());
        fs::write(
            self.tmp.path().join(format!("etc/modules.d/{name}.toml")),
            text,
        )
        .unwrap();
        let c = Config::load(&[self.tmp.path().join("etc")], &Overrides::default());
        c.module(name).unwrap().clone()
    }

    /// A kernel_modules_dir whose `KERNEL/` holds only `kernel` (linked to the
    /// fixtures' in-tree modules): no modules.order, modules.builtin, ….
    /// A host module directory with a tree for `kernel`: the fixtures'
    /// `kernel/` linked in, and their index copied (`index`) or not.
    fn bare_host_tree(&self, kernel: &str, index: bool) -> PathBuf {
        let dir = self.tmp.path().join("host-modules");
        fs::create_dir_all(dir.join(kernel)).unwrap();
        let link = dir.join(kernel).join("kernel");
        if !link.exists() {
            std::os::unix::fs::symlink(self.in_tree("kernel"), link).unwrap();
        }
        if index {
            for f in [
                "modules.dep",
                "modules.dep.bin",
                "modules.builtin.bin",
                "modules.alias.bin",
                "modules.symbols.bin",
            ] {
                fs::copy(self.in_tree(f), dir.join(kernel).join(f)).unwrap();
            }
        }
        dir
    }

    fn in_tree(&self, rel: &str) -> PathBuf {
        self.fx.modules_dir().join(&self.fx.kver).join(rel)
    }
}

fn ok(o: &Outcome) {
    assert!(o.state.is_ok(), "{:#?}", o);
}

fn strs(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| (*s).to_owned()).collect()
}

const DEPS: &str = r#"
version = "1.2.0"
modules = ["kvcd_user", "kvcd-crc", "kvcd_param"]
[parameters]
kvcd_param = ["level=5", "label=hello"]
[directory]
path = "@KO@"
"#;

#[test]
fn resolves_in_set_and_in_tree_dependencies_without_an_index_of_its_own() {
    let env = Env::new();
    let c = env.config("deps", DEPS);
    let o = env.engine().load(&c);
    ok(&o);
    // From each file's own depends=: kvcd_user -> kvcd_base (the package's),
    // kvcd_crc -> crc8 (the kernel's own, from its index).
    assert!(
        o.steps.iter().any(|s| s.step == Step::Resolve
            && s.detail == "load order: kvcd_base, kvcd_user, crc8, kvcd_crc, kvcd_param"),
        "{o:#?}"
    );
    let state = env.tmp.path().join("state");
    let set = common::module_set(&state, "deps", &env.fx.kver);
    assert_eq!(
        set.keys().map(String::as_str).collect::<Vec<_>>(),
        ["kvcd_base", "kvcd_crc", "kvcd_param", "kvcd_user"]
    );
    for (name, stored) in &set {
        assert!(
            stored.starts_with(state.join("files")),
            "{}",
            stored.display()
        );
        assert_eq!(
            fs::read(stored).unwrap(),
            fs::read(env.fx.ko().join(format!("{name}.ko"))).unwrap()
        );
        assert_eq!(env.fake.path_of(name).as_ref(), Some(stored));
    }
    // Only the package's files are kept: no module index is built anywhere.
    assert!(common::files_named(&state, "modules.").is_empty());
    assert_eq!(
        common::files_named(&state, "").len() - set.len(),
        1,
        "the set file"
    );
    assert_eq!(
        env.fake.path_of("crc8").unwrap(),
        env.in_tree("kernel/lib/crc8.ko")
    );
}

#[test]
fn loads_in_dependency_order_with_parameters() {
    let env = Env::new();
    let c = env.config("deps", DEPS);
    let o = env.engine().load(&c);
    ok(&o);
    assert_eq!(o.state, State::Loaded);
    assert_eq!(
        env.fake.take_log(),
        strs(&[
            "insert kvcd_base",
            "insert kvcd_user",
            "insert crc8",
            "insert kvcd_crc",
            "insert kvcd_param"
        ])
    );
    assert_eq!(
        env.fake.params_of("kvcd_param"),
        strs(&["level=5", "label=hello"])
    );
    assert!(env.fake.params_of("kvcd_user").is_empty());
    // crc8 comes from the kernel's own tree.
    let crc8 = env.fake.path_of("crc8").unwrap();
    assert_eq!(
        fs::canonicalize(&crc8).unwrap(),
        fs::canonicalize(env.in_tree("kernel/lib/crc8.ko")).unwrap()
    );
    let rec = env.records().get("deps").unwrap().unwrap();
    let owned: Vec<_> = rec
        .inserted
        .iter()
        .map(|o| (o.name.as_str(), o.configured))
        .collect();
    assert_eq!(
        owned,
        [
            ("kvcd_base", false),
            ("kvcd_user", true),
            ("crc8", false),
            ("kvcd_crc", true),
            ("kvcd_param", true)
        ]
    );
}

#[test]
fn second_apply_is_a_no_op() {
    let env = Env::new();
    let c = env.config("deps", DEPS);
    ok(&env.engine().load(&c));
    env.fake.take_log();
    let o = env.engine().load(&c);
    ok(&o);
    assert!(env.fake.take_log().is_empty());
    assert!(
        o.modules.iter().all(|a| a.action == Action::AlreadyLoaded),
        "{o:#?}"
    );
    assert!(
        o.steps
            .iter()
            .any(|s| s.step == Step::Stage && s.detail.contains("in the store already")),
        "{o:#?}"
    );
}

#[test]
fn unload_reverses_and_forgets() {
    let env = Env::new();
    let c = env.config("deps", DEPS);
    ok(&env.engine().load(&c));
    env.fake.take_log();
    let o = env.engine().unload("deps", None);
    ok(&o);
    assert_eq!(o.state, State::Inactive);
    assert_eq!(
        env.fake.take_log(),
        strs(&[
            "remove kvcd_param",
            "remove kvcd_crc",
            "remove crc8",
            "remove kvcd_user",
            "remove kvcd_base"
        ])
    );
    assert!(env.records().get("deps").unwrap().is_none());
    // Unloading again has nothing to do.
    let o = env.engine().unload("deps", None);
    ok(&o);
    assert!(env.fake.take_log().is_empty());
}

#[test]
fn in_use_module_refuses_unload_and_changes_nothing() {
    let env = Env::new();
    let c = env.config(
        "base",
        "modules = [\"kvcd_base\"]\n[directory]\npath = \"@KO@\"\n",
    );
    ok(&env.engine().load(&c));
    // Someone else loads a user of kvcd_base.
    env.fake.preload(
        "kvcd_user",
        &env.fx.ko().join("kvcd_user.ko"),
        &["kvcd_base"],
    );
    env.fake.take_log();
    let o = env.engine().unload("base", None);
    assert_eq!(o.state, State::Busy);
    let e = o.error.unwrap();
    assert_eq!(e.step, Step::Remove);
    assert_eq!(
        e.message,
        "module kvcd_base is in use (refcount 1, used by kvcd_user); nothing was unloaded"
    );
    assert!(env.fake.take_log().is_empty());
    assert!(env.fake.is_live("kvcd_base"));
    assert!(env.records().get("base").unwrap().is_some());

    // A reference that is not a module counts too.
    let env = Env::new();
    let c = env.config(
        "base",
        "modules = [\"kvcd_base\"]\n[directory]\npath = \"@KO@\"\n",
    );
    ok(&env.engine().load(&c));
    env.fake.hold("kvcd_base");
    let o = env.engine().unload("base", None);
    assert_eq!(o.state, State::Busy);
    assert!(o.error.unwrap().message.contains("in use (refcount 1)"));
}

#[test]
fn a_dependency_someone_else_uses_stays_loaded() {
    let env = Env::new();
    let c = env.config(
        "crc",
        "modules = [\"kvcd_crc\"]\n[directory]\npath = \"@KO@\"\n",
    );
    ok(&env.engine().load(&c));
    env.fake
        .preload("other", Path::new("/x/other.ko"), &["crc8"]);
    env.fake.take_log();
    let o = env.engine().unload("crc", None);
    ok(&o);
    assert_eq!(env.fake.take_log(), strs(&["remove kvcd_crc"]));
    assert!(env.fake.is_live("crc8"));
    assert!(
        o.steps
            .iter()
            .any(|s| s.detail == "leaving dependency crc8 loaded: in use by others")
    );
}

#[test]
fn already_loaded_module_with_other_parameters_is_reported() {
    let env = Env::new();
    let ko = env.fx.ko().join("kvcd_param.ko");
    env.fake
        .preload_with("kvcd_param", &ko, &[], &["level=1", "label=vm"]);
    let c = env.config(
        "params",
        "modules = [\"kvcd_param\"]\n[parameters]\nkvcd_param = [\"level=7\", 'label=\"vm\"']\n[directory]\npath = \"@KO@\"\n",
    );
    let o = env.engine().load(&c);
    ok(&o);
    let notes: Vec<_> = o
        .steps
        .iter()
        .filter(|s| s.detail.contains("runs with"))
        .map(|s| s.detail.as_str())
        .collect();
    assert_eq!(
        notes,
        [
            "kvcd_param runs with level=1, the config wants level=7; unload it and apply again to change it"
        ]
    );
}

#[test]
fn never_unloads_what_it_did_not_load() {
    let env = Env::new();
    env.fake
        .preload("kvcd_param", &env.fx.ko().join("kvcd_param.ko"), &[]);
    let c = env.config(
        "params",
        "modules = [\"kvcd_param\"]\n[directory]\npath = \"@KO@\"\n",
    );
    let o = env.engine().load(&c);
    ok(&o);
    assert!(
        o.steps
            .iter()
            .any(|s| s.detail.contains("already loaded, not by kvcd")),
        "{o:#?}"
    );
    let o = env.engine().unload("params", None);
    ok(&o);
    assert!(env.fake.is_live("kvcd_param"));
    assert!(env.fake.take_log().is_empty());
}

#[test]
fn a_live_in_tree_module_of_the_same_name_is_not_reported_as_the_package() {
    let env = Env::new();
    let in_tree = env.in_tree("kernel/drivers/net/dummy.ko");
    env.fake.preload("dummy", &in_tree, &[]);
    let c = env.config(
        "nic",
        "modules = [\"dummy\"]\n[directory]\npath = \"@KO@\"\n",
    );
    let o = env.engine().load(&c);
    assert_eq!(o.state, State::Failed, "{o:#?}");
    let e = o.error.as_ref().unwrap();
    assert_eq!(e.step, Step::Verify);
    let msg = &e.message;
    for want in [
        "dummy is already loaded, but the live module is the in-tree dummy of kernel",
        &format!("({})", in_tree.display()),
        "not the package's",
        "live build ID",
        "add replace_in_tree = [\"dummy\"] to",
        "nic.toml",
    ] {
        assert!(msg.contains(want), "{want:?} not in {msg}");
    }
    // Nothing changed: the in-tree module is still the live one, nothing recorded.
    assert!(env.fake.take_log().is_empty());
    assert_eq!(env.fake.path_of("dummy").unwrap(), in_tree);
    assert!(env.records().get("nic").unwrap().is_none());
}

#[test]
fn a_live_module_from_elsewhere_is_named_as_such() {
    let env = Env::new();
    // Another build under the package's name: the fixture kvcd_base file posing as kvcd_param.
    let other = env.tmp.path().join("other/kvcd_param.ko");
    fs::create_dir_all(other.parent().unwrap()).unwrap();
    fs::copy(env.fx.ko().join("kvcd_base.ko"), &other).unwrap();
    env.fake.preload("kvcd_param", &other, &[]);
    let c = env.config(
        "params",
        "modules = [\"kvcd_param\"]\n[directory]\npath = \"@KO@\"\n",
    );
    let o = env.engine().load(&c);
    assert_eq!(o.state, State::Failed, "{o:#?}");
    let msg = &o.error.as_ref().unwrap().message;
    assert!(
        msg.contains("kvcd_param is already loaded, but the live module is a kvcd_param from outside this package"),
        "{msg}"
    );
    assert!(msg.contains("replace_in_tree = [\"kvcd_param\"]"), "{msg}");
    assert!(env.fake.take_log().is_empty());
}

#[test]
fn build_ids_read_from_real_modules_match_readelf() {
    let env = Env::new();
    for f in [
        env.fx.ko().join("kvcd_param.ko"),
        env.in_tree("kernel/lib/crc8.ko"),
    ] {
        let out = std::process::Command::new("readelf")
            .arg("-n")
            .arg(&f)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let want = text
            .lines()
            .find_map(|l| l.trim().strip_prefix("Build ID: "))
            .expect("readelf shows a build ID");
        let id = kvcd::kmod::ModuleIdentity::of_file(&f).unwrap();
        assert_eq!(
            kvcd::util::hex(&id.build_id.unwrap()),
            want,
            "{}",
            f.display()
        );
    }
}

#[test]
fn a_replacement_kvcd_loaded_from_an_earlier_build_is_not_called_loaded() {
    let env = Env::new();
    let in_tree = env.in_tree("kernel/drivers/net/dummy.ko");
    env.fake.preload("dummy", &in_tree, &[]);
    let dir = env.tmp.path().join("pkg");
    fs::create_dir_all(&dir).unwrap();
    fs::copy(env.fx.ko().join("dummy.ko"), dir.join("dummy.ko")).unwrap();
    let text = format!(
        "modules = [\"dummy\"]\nreplace_in_tree = [\"dummy\"]\n[directory]\npath = \"{}\"\n",
        dir.display()
    );
    let c = env.config("replace", &text);
    ok(&env.engine().load(&c));
    env.fake.take_log();
    // The package changes under the loaded module: another build named dummy.
    fs::copy(env.fx.ko().join("kvcd_base.ko"), dir.join("dummy.ko")).unwrap();
    let o = env.engine().load(&c);
    assert_eq!(o.state, State::Failed, "{o:#?}");
    let msg = &o.error.as_ref().unwrap().message;
    assert!(
        msg.starts_with("dummy is live, but not as the package's")
            && msg.contains("kvcctl reload replace"),
        "{msg}"
    );
    assert!(env.fake.take_log().is_empty());
}

#[test]
fn a_module_has_one_owner() {
    let env = Env::new();
    let a = env.config(
        "first",
        "modules = [\"kvcd_param\"]\n[directory]\npath = \"@KO@\"\n",
    );
    ok(&env.engine().load(&a));
    // A second config for the same module, delivered where validation did not see both.
    let b_dir = env.tmp.path().join("other-etc/modules.d");
    fs::create_dir_all(&b_dir).unwrap();
    fs::write(
        b_dir.join("second.toml"),
        format!(
            "modules = [\"kvcd-param\"]\n[directory]\npath = \"{}\"\n",
            env.fx.ko().display()
        ),
    )
    .unwrap();
    let cfg = Config::load(&[env.tmp.path().join("other-etc")], &Overrides::default());
    let b = cfg.module("second").unwrap().clone();
    let o = env.engine().load(&b);
    assert_eq!(o.state, State::Failed, "{o:#?}");
    assert_eq!(
        o.error.as_ref().unwrap().message,
        "kvcd_param is loaded by module config first; a module has one owner, so unload first first or list kvcd_param in only one config"
    );
    assert!(env.records().get("second").unwrap().is_none());
    // The owner's unload still removes it, and then the second config may load it.
    ok(&env.engine().unload("first", None));
    assert!(!env.fake.is_live("kvcd_param"));
    ok(&env.engine().load(&b));
    assert!(env.fake.is_live("kvcd_param"));
}

#[test]
fn same_name_module_replaces_in_tree_and_restores_it() {
    let env = Env::new();
    let in_tree = env.in_tree("kernel/drivers/net/dummy.ko");
    env.fake.preload("dummy", &in_tree, &[]);
    let c = env.config(
        "replace",
        "modules = [\"dummy\"]\nreplace_in_tree = [\"dummy\"]\n[directory]\npath = \"@KO@\"\n",
    );
    let o = env.engine().load(&c);
    ok(&o);
    assert_eq!(env.fake.take_log(), strs(&["remove dummy", "insert dummy"]));
    let ours = env.fake.path_of("dummy").unwrap();
    assert_eq!(
        ours,
        common::module_set(&env.tmp.path().join("state"), "replace", &env.fx.kver)["dummy"]
    );
    assert_eq!(
        env.records()
            .get("replace")
            .unwrap()
            .unwrap()
            .removed_in_tree,
        vec![m("dummy")]
    );

    // Re-apply keeps ours.
    ok(&env.engine().load(&c));
    assert!(env.fake.take_log().is_empty());

    let o = env.engine().unload("replace", None);
    ok(&o);
    assert_eq!(env.fake.take_log(), strs(&["remove dummy", "insert dummy"]));
    assert_eq!(env.fake.path_of("dummy").unwrap(), in_tree);
    assert!(env.records().get("replace").unwrap().is_none());
}

#[test]
fn replacing_takes_out_unheld_users_but_refuses_held_ones() {
    let env = Env::new();
    let crc8 = env.in_tree("kernel/lib/crc8.ko");
    env.fake.preload("crc8", &crc8, &[]);
    env.fake
        .preload("crc8_user", Path::new("/x/crc8_user.ko"), &["crc8"]);
    let c = env.config(
        "r",
        "modules = [\"kvcd_param\"]\nreplace_in_tree = [\"crc8\"]\n[directory]\npath = \"@KO@\"\n",
    );
    let o = env.engine().load(&c);
    ok(&o);
    assert_eq!(
        env.fake.take_log(),
        strs(&["remove crc8_user", "remove crc8", "insert kvcd_param"])
    );

    let env = Env::new();
    env.fake.preload("crc8", &crc8, &[]);
    env.fake.hold("crc8");
    let c = env.config(
        "r",
        "modules = [\"kvcd_param\"]\nreplace_in_tree = [\"crc8\"]\n[directory]\npath = \"@KO@\"\n",
    );
    let o = env.engine().load(&c);
    assert_eq!(o.state, State::Busy);
    let e = o.error.unwrap();
    assert_eq!(e.step, Step::Replace);
    assert!(
        e.message
            .contains("cannot replace in-tree module crc8: crc8 is in use (refcount 1)"),
        "{}",
        e.message
    );
    assert!(env.fake.take_log().is_empty());
}

#[test]
fn a_failed_load_rolls_back_and_restores_in_tree() {
    let env = Env::new();
    let in_tree = env.in_tree("kernel/drivers/net/dummy.ko");
    env.fake.preload("dummy", &in_tree, &[]);
    *env.fake.fail_insert.lock().unwrap() = Some((m("kvcd_crc"), Errno::EKEYREJECTED));
    let c = env.config(
        "x",
        "modules = [\"dummy\", \"kvcd_user\", \"kvcd_crc\"]\nreplace_in_tree = [\"dummy\"]\n[directory]\npath = \"@KO@\"\n",
    );
    let o = env.engine().load(&c);
    assert_eq!(o.state, State::Failed);
    let e = o.error.unwrap();
    assert_eq!(e.step, Step::Insert);
    assert!(
        e.message
            .starts_with("inserting module kvcd_crc: the kernel enforces module signatures"),
        "{}",
        e.message
    );
    assert!(
        e.message
            .contains("(EKEYREJECTED): the module carries no signature: set [signing]"),
        "{}",
        e.message
    );
    assert_eq!(
        env.fake.take_log(),
        strs(&[
            "remove dummy",
            "insert dummy",
            "insert kvcd_base",
            "insert kvcd_user",
            "insert crc8",
            "remove crc8",
            "remove kvcd_user",
            "remove kvcd_base",
            "remove dummy",
            "insert dummy",
        ])
    );
    assert_eq!(env.fake.path_of("dummy").unwrap(), in_tree);
    assert!(env.records().get("x").unwrap().is_none());
}

#[test]
fn version_mismatch_fails_before_any_insert() {
    let env = Env::new();
    let c = env.config(
        "v",
        "version = \"9.9\"\nmodules = [\"kvcd_user\"]\n[directory]\npath = \"@KO@\"\n",
    );
    let o = env.engine().load(&c);
    assert_eq!(o.state, State::Failed);
    let e = o.error.unwrap();
    assert_eq!(e.step, Step::Verify);
    assert!(e.message.contains("module kvcd_user ("), "{}", e.message);
    assert!(
        e.message
            .contains("is version 1.2.0, but the config expects version 9.9"),
        "{}",
        e.message
    );
    assert!(env.fake.take_log().is_empty());
}

#[test]
fn a_module_for_another_architecture_is_refused_by_name() {
    let env = Env::new();
    // The fixture with its ELF machine changed to aarch64 (183): libkmod still reads it.
    let dir = env.tmp.path().join("arm");
    fs::create_dir_all(&dir).unwrap();
    let mut data = fs::read(env.fx.ko().join("kvcd_param.ko")).unwrap();
    data[18..20].copy_from_slice(&183u16.to_le_bytes());
    fs::write(dir.join("kvcd_param.ko"), data).unwrap();
    let c = env.config(
        "arm",
        &format!(
            "modules = [\"kvcd_param\"]\n[directory]\npath = \"{}\"\n",
            dir.display()
        ),
    );
    let o = env.engine().load(&c);
    assert_eq!(o.state, State::Failed);
    let e = o.error.unwrap();
    assert_eq!(e.step, Step::Verify);
    assert!(
        e.message.starts_with("module kvcd_param (")
            && e.message
                .contains("kvcd_param.ko) is built for aarch64, but "),
        "{}",
        e.message
    );
    assert!(env.fake.take_log().is_empty());
}

#[test]
fn vermagic_mismatch_fails_before_any_insert() {
    let env = Env::new();
    let bad = env.fx.dir.join("bad-vermagic");
    let c = env.config(
        "bad",
        &format!(
            "modules = [\"kvcd_param\"]\n[directory]\npath = \"{}\"\n",
            bad.display()
        ),
    );
    let o = env.engine().load(&c);
    let e = o.error.unwrap();
    assert_eq!(e.step, Step::Verify);
    assert!(e.message.contains("kvcd_param"), "{}", e.message);
    assert!(
        e.message
            .contains(&format!("but the target kernel is {}", env.fx.kver)),
        "{}",
        e.message
    );
    assert!(env.fake.take_log().is_empty());

    // Good files for another kernel are just as wrong (that kernel has a
    // module tree: the fixtures' own `kernel/` and index). One config
    // owns kvcd_param at a time.
    fs::remove_file(env.tmp.path().join("etc/modules.d/bad.toml")).unwrap();
    let c = env.config("deps", DEPS);
    let other = KernelRelease::parse("6.1.0-999-amd64").unwrap();
    let mut engine = env.engine_for(other);
    engine.layout = ModuleStore::new(
        env.tmp.path().join("state"),
        env.bare_host_tree("6.1.0-999-amd64", true),
    );
    let o = engine.load(&c);
    let e = o.error.unwrap();
    assert_eq!(e.step, Step::Verify);
    assert!(
        e.message.contains(&format!(
            "was built for kernel {}, but the target kernel is 6.1.0-999-amd64",
            env.fx.kver
        )),
        "{}",
        e.message
    );
}

#[test]
fn templated_directory_missing_or_incomplete() {
    let env = Env::new();
    let c = env.config(
        "t",
        "modules = [\"kvcd_param\"]\n[directory]\npath = \"@KO@/${KERNEL_FULL_VERSION}/${ARCH}\"\n",
    );
    let o = env.engine().load(&c);
    let e = o.error.unwrap();
    assert_eq!(e.step, Step::Resolve);
    let expanded = format!(
        "{}/{}/{}",
        env.fx.ko().display(),
        env.fx.kver,
        kvcd::kernel::arch()
    );
    assert_eq!(
        e.message,
        format!(
            "module directory {expanded} does not exist or cannot be read: No such file or directory (os error 2)"
        )
    );

    // One config owns kvcd_param at a time.
    fs::remove_file(env.tmp.path().join("etc/modules.d/t.toml")).unwrap();
    let c = env.config(
        "n",
        "modules = [\"kvcd_param\", \"nothere\"]\n[directory]\npath = \"@KO@\"\n",
    );
    let e = env.engine().load(&c).error.unwrap();
    assert_eq!(e.step, Step::Resolve);
    assert!(
        e.message.starts_with(&format!(
            "no .ko file for module nothere in {}",
            env.fx.ko().display()
        )),
        "{}",
        e.message
    );
}

#[test]
fn kernel_match_and_after() {
    let env = Env::new();
    let c = env.config(
        "old",
        "kernel_match = '^4\\.'\nmodules = [\"kvcd_param\"]\n[directory]\npath = \"@KO@\"\n",
    );
    let o = env.engine().load(&c);
    assert_eq!(o.state, State::Unsupported);
    assert!(env.fake.take_log().is_empty());

    env.config(
        "first",
        "modules = [\"kvcd_base\"]\n[directory]\npath = \"@KO@\"\n",
    );
    let second = env.config(
        "second",
        "after = [\"first\"]\nmodules = [\"kvcd_user\"]\n[directory]\npath = \"@KO@\"\n",
    );
    let e = env.engine().load(&second).error.unwrap();
    assert_eq!(e.step, Step::Config);
    assert_eq!(
        e.message,
        "must load after module config first, which is not loaded"
    );

    let first = env.config(
        "first",
        "modules = [\"kvcd_base\"]\n[directory]\npath = \"@KO@\"\n",
    );
    ok(&env.engine().load(&first));
    ok(&env.engine().load(&second));
    // Unloading `first` while `second` (ordered after it) is loaded is refused.
    let o = env.engine().unload("first", None);
    assert_eq!(o.state, State::Busy);
    assert!(
        o.error
            .unwrap()
            .message
            .contains("second is loaded after this one")
    );
    ok(&env.engine().unload("second", None));
    ok(&env.engine().unload("first", None));
    assert!(!env.fake.is_live("kvcd_base"));
}

#[test]
fn a_dependency_from_another_config_is_not_inserted_and_a_missing_one_is_named() {
    let env = Env::new();
    // An app package without the base it calls into (another config ships it).
    let pkg = env.tmp.path().join("app");
    fs::create_dir_all(&pkg).unwrap();
    fs::copy(env.fx.ko().join("kvcd_user.ko"), pkg.join("kvcd_user.ko")).unwrap();
    let app = |after: &str| {
        format!(
            "{after}modules = [\"kvcd_user\"]\n[directory]\npath = \"{}\"\n",
            pkg.display()
        )
    };
    let c = env.config("app", &app(""));
    let e = env.engine().prepare(&c).error.unwrap();
    assert_eq!(e.step, Step::Resolve);
    assert_eq!(
        e.message,
        format!(
            "module kvcd_user needs module kvcd_base, which is not in the package ({}) or kernel {k}'s modules ({})",
            pkg.display(),
            env.in_tree("").display().to_string().trim_end_matches('/'),
            k = env.fx.kver
        )
    );
    // Loaded after the config that ships it: expected from there, not inserted.
    env.config(
        "base",
        "modules = [\"kvcd_base\"]\n[directory]\npath = \"@KO@\"\n",
    );
    let c = env.config("app", &app("after = [\"base\"]\n"));
    let o = env.engine().prepare(&c);
    ok(&o);
    assert!(
        o.steps.iter().any(|s| s.detail
            == "kvcd_base is not in the package or the kernel's tree: expected from base (after)"),
        "{o:#?}"
    );
    ok(&env.engine().load(&env.config(
        "base",
        "modules = [\"kvcd_base\"]\n[directory]\npath = \"@KO@\"\n",
    )));
    env.fake.take_log();
    let o = env.engine().load(&c);
    ok(&o);
    assert_eq!(env.fake.take_log(), strs(&["insert kvcd_user"]));
    assert!(
        o.steps.iter().any(|s| s.detail
            == "kvcd_base is not in the package or the kernel's tree, but is live in the kernel: not inserted"),
        "{o:#?}"
    );
}

#[test]
fn only_needed_files_are_stored_and_replaced_ones_collected() {
    let env = Env::new();
    let pkg = env.tmp.path().join("pkg");
    fs::create_dir_all(&pkg).unwrap();
    fs::copy(env.fx.ko().join("kvcd_param.ko"), pkg.join("kvcd_param.ko")).unwrap();
    let c = env.config(
        "p",
        &format!(
            "modules = [\"kvcd_param\"]\n[directory]\npath = \"{}\"\n",
            pkg.display()
        ),
    );
    let staged = |o: &Outcome| {
        o.steps
            .iter()
            .find(|s| s.step == Step::Stage)
            .map(|s| s.detail.clone())
            .unwrap_or_default()
    };
    let state = env.tmp.path().join("state");
    let stored = || common::files_named(&state.join("files"), "");
    let o = env.engine().load(&c);
    ok(&o);
    assert!(staged(&o).contains("1 new in"), "{o:#?}");
    // A file the load does not need is neither stored nor read.
    fs::copy(env.fx.ko().join("kvcd_base.ko"), pkg.join("kvcd_base.ko")).unwrap();
    let o = env.engine().prepare(&c);
    ok(&o);
    assert!(staged(&o).ends_with("in the store already"), "{o:#?}");
    assert_eq!(stored().len(), 1);
    // New content: stored, and the file it replaces goes.
    let mut bytes = fs::read(pkg.join("kvcd_param.ko")).unwrap();
    bytes.extend_from_slice(b"\0trailer");
    fs::write(pkg.join("kvcd_param.ko"), &bytes).unwrap();
    let o = env.engine().prepare(&c);
    ok(&o);
    assert!(staged(&o).contains("1 new in"), "{o:#?}");
    let left = stored();
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(fs::read(&left[0]).unwrap(), bytes);
    assert_eq!(
        common::module_set(&state, "p", &env.fx.kver)["kvcd_param"],
        left[0]
    );
}

/// A module config with hooks that trace what they see into `trace`.
fn hooked(env: &Env, hooks: &str, ready: &str) -> ModuleConfig {
    env.config(
        "hooked",
        &format!(
            "version = \"1.2.0\"\nmodules = [\"kvcd_param\"]\n[directory]\npath = \"@KO@\"\n[hooks]\n{hooks}\n{ready}"
        ),
    )
}

fn tracer(trace: &Path, record: &Path) -> String {
    format!(
        r#"["/bin/sh", "-c", "echo \"$KVCD_HOOK $KVCD_MODULE $KVCD_KERNEL $KVCD_VERSION $KVCD_MODULES $KVCD_ARTIFACTS_DIR $(test -e {rec} && echo recorded || echo unrecorded)\" >> {trace}; echo out-$KVCD_HOOK; echo err-$KVCD_HOOK >&2"]"#,
        rec = record.display(),
        trace = trace.display()
    )
}

#[test]
fn hooks_run_in_order_with_their_context_and_output_logged() {
    let env = Env::new();
    let trace = env.tmp.path().join("trace");
    let record = env.tmp.path().join("run/loaded/hooked.json");
    let t = tracer(&trace, &record);
    let c = hooked(
        &env,
        &format!("pre_load = {t}\npost_load = {t}\npre_unload = {t}\npost_unload = {t}"),
        "",
    );
    let o = env.engine().load(&c);
    assert_eq!(o.state, State::Loaded, "{o:#?}");
    assert!(
        o.steps
            .iter()
            .any(|s| s.step == Step::Hook && s.detail == "pre_load: out-pre_load"),
        "{o:#?}"
    );
    assert!(
        o.steps
            .iter()
            .any(|s| s.step == Step::Hook && s.detail == "post_load: err-post_load"),
        "{o:#?}"
    );
    let o = env.engine().unload("hooked", Some(&c));
    assert_eq!(o.state, State::Inactive, "{o:#?}");
    let ko = env.fx.ko().display().to_string();
    let k = &env.fx.kver;
    assert_eq!(
        fs::read_to_string(&trace).unwrap(),
        format!(
            "pre_load hooked {k} 1.2.0 kvcd_param {ko} unrecorded\n\
             post_load hooked {k} 1.2.0 kvcd_param {ko} recorded\n\
             pre_unload hooked {k} 1.2.0 kvcd_param  recorded\n\
             post_unload hooked {k} 1.2.0 kvcd_param  unrecorded\n"
        )
    );
}

#[test]
fn a_failing_pre_load_loads_nothing_and_names_the_hook() {
    let env = Env::new();
    let c = hooked(
        &env,
        r#"pre_load = ["/bin/sh", "-c", "echo boom >&2; exit 3"]"#,
        "",
    );
    let o = env.engine().load(&c);
    assert_eq!(o.state, State::Failed);
    let e = o.error.unwrap();
    assert_eq!(e.step, Step::Hook);
    assert_eq!(
        e.message,
        "hook pre_load (/bin/sh) failed: exit status 3; last stderr lines:\n  boom"
    );
    assert!(env.fake.take_log().is_empty());
    assert!(env.records().get("hooked").unwrap().is_none());
}

#[test]
fn a_failing_post_load_keeps_the_modules_and_says_so() {
    let env = Env::new();
    let c = hooked(&env, r#"post_load = ["/bin/false"]"#, "");
    let o = env.engine().load(&c);
    assert_eq!(o.state, State::Failed);
    assert_eq!(
        o.error.unwrap().message,
        "hook post_load (/bin/false) failed: exit status 1"
    );
    assert!(env.fake.is_live("kvcd_param"));
    assert!(env.records().get("hooked").unwrap().is_some());
}

#[test]
fn a_failing_pre_unload_leaves_everything_loaded() {
    let env = Env::new();
    let c = hooked(
        &env,
        r#"pre_unload = ["/bin/sh", "-c", "echo device busy >&2; exit 1"]"#,
        "",
    );
    ok(&env.engine().load(&c));
    env.fake.take_log();
    let o = env.engine().unload("hooked", Some(&c));
    assert_eq!(o.state, State::Failed);
    let e = o.error.unwrap();
    assert_eq!(e.step, Step::Hook);
    assert!(
        e.message.contains(
            "hook pre_unload (/bin/sh) failed: exit status 1; last stderr lines:\n  device busy"
        ),
        "{}",
        e.message
    );
    assert!(env.fake.take_log().is_empty());
    assert!(env.fake.is_live("kvcd_param"));
    // Without the config (file deleted), kvcd still undoes its record, hooks aside.
    ok(&env.engine().unload("hooked", None));
    assert!(!env.fake.is_live("kvcd_param"));
}

#[test]
fn a_hook_past_its_timeout_is_killed() {
    let env = Env::new();
    let c = hooked(
        &env,
        "pre_load = [\"/bin/sleep\", \"30\"]\ntimeout_seconds = 1",
        "",
    );
    let t0 = std::time::Instant::now();
    let o = env.engine().load(&c);
    assert!(t0.elapsed() < std::time::Duration::from_secs(15));
    assert_eq!(
        o.error.unwrap().message,
        "hook pre_load (/bin/sleep) timed out after 1s; its process group was killed"
    );
    assert!(env.fake.take_log().is_empty());
}

#[test]
fn ready_path_passes_when_it_appears_and_fails_when_it_does_not() {
    let env = Env::new();
    let dev = env.tmp.path().join("dev-acme0");
    let c = hooked(
        &env,
        &format!(
            "post_load = [\"/bin/sh\", \"-c\", \"(sleep 1; touch {}) &\"]",
            dev.display()
        ),
        &format!(
            "[ready]\npath = \"{}\"\ntimeout_seconds = 20",
            dev.display()
        ),
    );
    let o = env.engine().load(&c);
    assert_eq!(o.state, State::Loaded, "{o:#?}");
    assert!(
        o.steps
            .iter()
            .any(|s| s.step == Step::Ready && s.detail.contains("exists after")),
        "{o:#?}"
    );

    let env = Env::new();
    let c = hooked(
        &env,
        "",
        "[ready]\npath = \"/nonexistent/acme0\"\ntimeout_seconds = 1",
    );
    let o = env.engine().load(&c);
    assert_eq!(o.state, State::Failed);
    let e = o.error.unwrap();
    assert_eq!(e.step, Step::Ready);
    assert_eq!(
        e.message,
        "ready check: /nonexistent/acme0 did not appear within 1s"
    );
    assert!(
        env.fake.is_live("kvcd_param"),
        "the modules stay for inspection"
    );
}

#[test]
fn ready_command_is_retried_until_it_passes_or_time_runs_out() {
    let env = Env::new();
    let flag = env.tmp.path().join("second-try");
    let c = hooked(
        &env,
        "",
        &format!(
            "[ready]\ncommand = [\"/bin/sh\", \"-c\", \"test -e {f} || {{ touch {f}; echo not yet >&2; exit 1; }}\"]\ntimeout_seconds = 20",
            f = flag.display()
        ),
    );
    let o = env.engine().load(&c);
    assert_eq!(o.state, State::Loaded, "{o:#?}");
    assert!(
        o.steps.iter().any(|s| s.detail == "ready: not yet"),
        "{o:#?}"
    );

    let env = Env::new();
    let c = hooked(
        &env,
        "",
        "[ready]\ncommand = [\"/bin/false\"]\ntimeout_seconds = 2",
    );
    let e = env.engine().load(&c).error.unwrap();
    assert_eq!(e.step, Step::Ready);
    assert_eq!(
        e.message,
        "ready check did not pass within 2s; last attempt: hook ready (/bin/false) failed: exit status 1"
    );
}

#[test]
fn a_store_that_cannot_be_written_fails_before_the_kernel_is_touched() {
    let env = Env::new();
    let c = env.config("deps", DEPS);
    let state = env.tmp.path().join("state");
    fs::create_dir_all(&state).unwrap();
    fs::write(state.join("files"), b"not a directory").unwrap();
    let o = env.engine().load(&c);
    let e = o.error.unwrap();
    assert_eq!(e.step, Step::Stage);
    assert!(
        e.message
            .starts_with(&format!("creating {}", state.join("files").display())),
        "{}",
        e.message
    );
    assert!(env.fake.take_log().is_empty());
    fs::remove_file(state.join("files")).unwrap();
    ok(&env.engine().load(&c));
    assert!(common::files_named(&state.join("files"), ".").is_empty());
}

#[test]
fn a_kernel_without_its_module_tree_or_its_index_fails_at_once_naming_it() {
    let env = Env::new();
    let c = env.config("deps", DEPS);
    let k = &env.fx.kver;
    let none = env.tmp.path().join("no-modules");
    fs::create_dir_all(&none).unwrap();
    // The kernel's modules, but no modules.dep.bin: kvcd does not index the kernel itself.
    let bare = env.bare_host_tree(k, false);
    for (host, want) in [
        (
            none.clone(),
            format!(
                "no module tree for kernel {k} at {}/{k}; kvcd needs the kernel's own modules to resolve in-tree dependencies",
                none.display()
            ),
        ),
        (
            bare.clone(),
            format!(
                "{}/{k}: no modules.dep.bin: the kernel's module index is missing (depmod {k} makes it)",
                bare.display()
            ),
        ),
    ] {
        let mut engine = env.engine();
        engine.layout = ModuleStore::new(env.tmp.path().join("state"), host);
        let e = engine.load(&c).error.unwrap();
        assert_eq!(e.step, Step::Resolve);
        assert_eq!(e.message, want);
        assert!(env.fake.take_log().is_empty());
    }
}

/// `[signing]` over a fresh key: every file kvcd stages is signed by it.
fn signing_with(key: &Path, cert: &Path) -> Option<std::sync::Arc<kvcd::signing::Signing>> {
    Some(std::sync::Arc::new(kvcd::signing::Signing::load(
        &kvcd::config::SigningSettings {
            key: key.to_owned(),
            cert: cert.to_owned(),
            hash: kvcd::signing::Hash::Sha256,
        },
    )))
}

/// `modinfo -F signer` of each of the package's own stored files of `config`.
fn signers(env: &Env, config: &str) -> BTreeMap<String, String> {
    let state = env.tmp.path().join("state");
    common::module_set(&state, config, &env.fx.kver)
        .into_iter()
        .filter(|(n, _)| n.starts_with("kvcd_"))
        .map(|(n, f)| {
            let s = common::run(
                std::process::Command::new("modinfo")
                    .args(["-F", "signer"])
                    .arg(&f),
            );
            (n, s.trim().to_owned())
        })
        .collect()
}

#[test]
fn staged_modules_are_signed_and_signed_again_when_the_key_changes() {
    let env = Env::new();
    let keys = env.tmp.path().join("keys");
    fs::create_dir_all(&keys).unwrap();
    let (k1, c1) = common::make_key(&keys, "one", "kvcd engine key one", "rsa:2048");
    let (k2, c2) = common::make_key(&keys, "two", "kvcd engine key two", "rsa:2048");
    let c = env.config("deps", DEPS);

    let mut e = env.engine();
    e.signing = signing_with(&k1, &c1);
    let o = e.prepare(&c);
    ok(&o);
    assert!(
        o.steps.iter().any(|s| s.step == Step::Stage
            && s.detail
                .ends_with("; signed 4 with \"kvcd engine key one\" (sha256)")),
        "{o:#?}"
    );
    let one = signers(&env, "deps");
    assert_eq!(one.len(), 4, "{one:?}");
    assert!(one.values().all(|s| s == "kvcd engine key one"), "{one:?}");
    assert!(
        matches!(e.readiness(&c), Readiness::Ready(_)),
        "{:?}",
        e.readiness(&c)
    );

    // The same key again: nothing is signed again.
    let o = e.prepare(&c);
    ok(&o);
    assert!(
        !o.steps.iter().any(|s| s.detail.contains("signed")),
        "{o:#?}"
    );

    // Another key: the set is no longer ready for it, and is signed again.
    let mut e2 = env.engine();
    e2.signing = signing_with(&k2, &c2);
    assert!(
        matches!(e2.readiness(&c), Readiness::NotPrepared(_)),
        "{:?}",
        e2.readiness(&c)
    );
    ok(&e2.prepare(&c));
    let two = signers(&env, "deps");
    assert!(two.values().all(|s| s == "kvcd engine key two"), "{two:?}");
    assert!(
        matches!(e2.readiness(&c), Readiness::Ready(_)),
        "{:?}",
        e2.readiness(&c)
    );

    // sign = false: the package's files as they come.
    let plain = env.config("plain", PLAIN);
    ok(&e2.prepare(&plain));
    let state = env.tmp.path().join("state");
    let set = common::module_set(&state, "plain", &env.fx.kver);
    assert_eq!(
        fs::read(&set["simple_kmod"]).unwrap(),
        fs::read(env.fx.ko().join("simple-kmod.ko")).unwrap(),
        "simple_kmod was changed"
    );
}

/// A config that opts out of signing.
const PLAIN: &str = "sign = false\nmodules = [\"simple-kmod\"]\n[directory]\npath = \"@KO@\"\n";

#[test]
fn a_rejected_signature_names_the_signer_and_how_to_enroll_it() {
    let env = Env::new();
    let keys = env.tmp.path().join("keys");
    fs::create_dir_all(&keys).unwrap();
    let (k, cert) = common::make_key(&keys, "k", "kvcd untrusted key", "rsa:2048");
    *env.fake.fail_insert.lock().unwrap() = Some((m("kvcd_param"), Errno::EKEYREJECTED));
    let c = env.config("deps", DEPS);
    let mut e = env.engine();
    e.signing = signing_with(&k, &cert);
    let o = e.load(&c);
    assert_eq!(o.state, State::Failed);
    let msg = o.error.unwrap().message;
    assert!(msg.contains("(EKEYREJECTED)"), "{msg}");
    assert!(
        msg.contains("it is signed by \"kvcd untrusted key\"") && msg.contains("kvcd's own key"),
        "{msg}"
    );
    assert!(
        msg.contains(&format!("mokutil --import {}", cert.display())) && msg.contains("MokManager"),
        "{msg}"
    );

    // Opted out: the message says so.
    *env.fake.fail_insert.lock().unwrap() = Some((m("simple_kmod"), Errno::EKEYREJECTED));
    let o = e.load(&env.config("plain", PLAIN));
    let msg = o.error.unwrap().message;
    assert!(
        msg.contains("carries no signature: its config sets sign = false"),
        "{msg}"
    );
}

#[test]
fn an_unusable_key_fails_the_stage_and_names_the_file() {
    let env = Env::new();
    let keys = env.tmp.path().join("keys");
    fs::create_dir_all(&keys).unwrap();
    let (k, cert) = common::make_key(&keys, "k", "kvcd key", "rsa:2048");
    fs::set_permissions(&k, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let c = env.config("deps", DEPS);
    let mut e = env.engine();
    e.signing = signing_with(&k, &cert);
    let o = e.prepare(&c);
    assert_eq!(o.state, State::Failed);
    let err = o.error.unwrap();
    assert_eq!(err.step, Step::Stage);
    assert!(
        err.message
            .contains(&format!("{} has mode 0644", k.display())),
        "{}",
        err.message
    );
    // Nothing was staged, and a config that opts out still prepares.
    let sets = env.tmp.path().join("state/sets").join(&env.fx.kver);
    assert!(!sets.join("deps.json").exists());
    ok(&e.prepare(&env.config("plain", PLAIN)));
    assert!(sets.join("plain.json").exists());
}

#[test]
fn match_gates_the_load_on_a_device_of_the_node() {
    let env = Env::new();
    let sys = env.tmp.path().join("sys");
    fs::create_dir_all(sys.join("bus/pci/devices")).unwrap();
    let c = env.config(
        "nic",
        "modules = [\"kvcd_param\"]\n[match]\npci = [\"8086:1592\"]\n[directory]\npath = \"@KO@\"\n",
    );
    let mut e = env.engine();
    e.sysfs = sys.clone();

    // No such device: unsupported, said why, nothing touched.
    let o = e.load(&c);
    assert_eq!(o.state, State::Unsupported, "{o:#?}");
    assert!(
        o.steps.iter().any(|s| s
            .detail
            .starts_with("no matching device ([match] pci 8086:1592; 0 device(s) under")),
        "{o:#?}"
    );
    assert!(env.fake.take_log().is_empty());
    assert!(!env.records().dir().join("nic.json").exists());
    assert!(matches!(e.readiness(&c), Readiness::NotApplicable(_)));

    // Another device is not it.
    let dev = |addr: &str, vendor: &str, device: &str| {
        let d = sys.join("bus/pci/devices").join(addr);
        fs::create_dir_all(&d).unwrap();
        fs::write(d.join("vendor"), format!("0x{vendor}\n")).unwrap();
        fs::write(d.join("device"), format!("0x{device}\n")).unwrap();
        fs::write(
            d.join("modalias"),
            format!(
                "pci:v0000{}d0000{}sv00000000sd00000000bc02sc00i00\n",
                vendor.to_uppercase(),
                device.to_uppercase()
            ),
        )
        .unwrap();
    };
    dev("0000:00:03.0", "8086", "100e");
    assert_eq!(e.load(&c).state, State::Unsupported);

    // The device appears: the same config loads.
    dev("0000:00:04.0", "8086", "1592");
    let o = e.load(&c);
    ok(&o);
    assert!(
        o.steps.iter().any(|s| s.detail
            == "device pci:v00008086d00001592sv00000000sd00000000bc02sc00i00 matches [match]"),
        "{o:#?}"
    );
    assert!(env.fake.is_live("kvcd_param"));
}
