//! Prometheus metrics in the text exposition format, written to a file for
//! node_exporter's textfile collector (`[metrics] textfile` in kvcd.toml).
//! [`render`] is a pure function of what the agent publishes and the
//! counters it keeps; [`Textfile`] writes the result atomically when it
//! changes, and at least once a minute (`kvcd_heartbeat_timestamp_seconds`)
//! so that a daemon that is gone shows as such.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};

use crate::reconciler::status::{ModuleStatus, Snapshot, Status};

/// How often the file is written even when nothing changed (60 s).
pub const HEARTBEAT: Duration = Duration::from_secs(60);

/// The readiness states of a config for a next kernel, as published.
const READINESS: [&str; 4] = ["ready", "not-prepared", "failed", "not-applicable"];

/// What the agent counts per module config.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ConfigCounters {
    /// Operations that ended in failure.
    pub failures: u64,
    /// Per operation (`load`, `unload`, `reload`): how many finished, their total and last duration in seconds.
    pub operations: BTreeMap<String, OperationCounters>,
}

/// Finished operations of one kind.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OperationCounters {
    /// How many finished.
    pub count: u64,
    /// Their total duration, in seconds.
    pub seconds_total: f64,
    /// The last one's duration, in seconds.
    pub last_seconds: f64,
}

/// What the agent counts since it started.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Counters {
    /// Per module config.
    pub configs: BTreeMap<String, ConfigCounters>,
    /// podman processes started for module configs.
    pub podman_invocations: u64,
}

impl Counters {
    /// Counts one finished operation of `config`.
    pub fn record(
        &mut self,
        config: &str,
        operation: &str,
        seconds: f64,
        failed: bool,
        podman: usize,
    ) {
        let c = self.configs.entry(config.to_owned()).or_default();
        if failed {
            c.failures += 1;
        }
        let o = c.operations.entry(operation.to_owned()).or_default();
        o.count += 1;
        o.seconds_total += seconds;
        o.last_seconds = seconds;
        self.podman_invocations += podman as u64;
    }
}

/// A per-config gauge: name, type, help, and its value for a config's status.
type PerConfig = (
    &'static str,
    &'static str,
    &'static str,
    fn(&ModuleStatus) -> u64,
);

/// A label value, escaped for the text format.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Appends `# HELP` and `# TYPE` of a metric.
fn head(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// The metrics of `snap` and `counters`, without the heartbeat (see [`Textfile`]).
pub fn render(snap: &Snapshot, counters: &Counters, up: bool) -> String {
    let mut o = String::new();
    head(
        &mut o,
        "kvcd_up",
        "gauge",
        "1 while the kvcd agent runs; 0 once it stopped.",
    );
    let _ = writeln!(o, "kvcd_up {}", u8::from(up));
    head(
        &mut o,
        "kvcd_info",
        "gauge",
        "kvcd's version and the running kernel.",
    );
    let _ = writeln!(
        o,
        "kvcd_info{{version=\"{}\",kernel=\"{}\"}} 1",
        label(&snap.version),
        label(&snap.kernel)
    );
    head(
        &mut o,
        "kvcd_config_errors",
        "gauge",
        "Problems outside the module configs (a broken kvcd.toml).",
    );
    let _ = writeln!(o, "kvcd_config_errors {}", snap.errors.len());

    head(
        &mut o,
        "kvcd_module_state",
        "gauge",
        "1 for the state each module config is in, 0 for the others.",
    );
    for (n, m) in &snap.modules {
        for s in Status::ALL {
            let _ = writeln!(
                o,
                "kvcd_module_state{{config=\"{}\",state=\"{}\"}} {}",
                label(n),
                s.as_str(),
                u8::from(m.state == s)
            );
        }
    }
    let per_config: [PerConfig; 4] = [
        (
            "kvcd_module_wanted",
            "gauge",
            "1 when the admin wants the module config loaded.",
            |m| u64::from(m.wanted),
        ),
        (
            "kvcd_module_loaded_modules",
            "gauge",
            "Kernel modules loaded for the module config.",
            |m| m.loaded_modules.len() as u64,
        ),
        (
            "kvcd_module_state_since_timestamp_seconds",
            "gauge",
            "When the module config's state last changed, seconds since the epoch.",
            |m| m.since,
        ),
        (
            "kvcd_module_next_retry_timestamp_seconds",
            "gauge",
            "When the module config is retried next, seconds since the epoch; 0 when no retry is due.",
            |m| m.next_retry,
        ),
    ];
    for (name, kind, help, value) in per_config {
        head(&mut o, name, kind, help);
        for (n, m) in &snap.modules {
            let _ = writeln!(o, "{name}{{config=\"{}\"}} {}", label(n), value(m));
        }
    }

    head(
        &mut o,
        "kvcd_module_failures_total",
        "counter",
        "Operations of the module config that failed, since kvcd started.",
    );
    for n in snap.modules.keys() {
        let f = counters.configs.get(n).map_or(0, |c| c.failures);
        let _ = writeln!(
            o,
            "kvcd_module_failures_total{{config=\"{}\"}} {f}",
            label(n)
        );
    }
    head(
        &mut o,
        "kvcd_module_operations_total",
        "counter",
        "Operations of the module config that finished (load, unload, reload), since kvcd started.",
    );
    let ops = |o: &mut String, f: &dyn Fn(&OperationCounters) -> String, name: &str| {
        for (n, c) in &counters.configs {
            if !snap.modules.contains_key(n) {
                continue;
            }
            for (op, v) in &c.operations {
                let _ = writeln!(
                    o,
                    "{name}{{config=\"{}\",operation=\"{op}\"}} {}",
                    label(n),
                    f(v)
                );
            }
        }
    };
    ops(
        &mut o,
        &|v| v.count.to_string(),
        "kvcd_module_operations_total",
    );
    head(
        &mut o,
        "kvcd_module_operation_seconds_total",
        "counter",
        "Time the module config's finished operations took, in seconds.",
    );
    ops(
        &mut o,
        &|v| format!("{:.6}", v.seconds_total),
        "kvcd_module_operation_seconds_total",
    );
    head(
        &mut o,
        "kvcd_module_last_operation_seconds",
        "gauge",
        "How long the module config's last operation of each kind took, in seconds.",
    );
    ops(
        &mut o,
        &|v| format!("{:.6}", v.last_seconds),
        "kvcd_module_last_operation_seconds",
    );
    head(
        &mut o,
        "kvcd_podman_invocations_total",
        "counter",
        "podman processes kvcd started for module configs, since it started.",
    );
    let _ = writeln!(
        o,
        "kvcd_podman_invocations_total {}",
        counters.podman_invocations
    );

    head(
        &mut o,
        "kvcd_next_kernel_ready",
        "gauge",
        "1 when every wanted module config is ready for a kernel the node may boot next.",
    );
    for (release, role, _, ready, _) in &snap.next {
        let _ = writeln!(
            o,
            "kvcd_next_kernel_ready{{kernel=\"{}\",role=\"{}\"}} {}",
            label(release),
            label(role),
            u8::from(*ready)
        );
    }
    head(
        &mut o,
        "kvcd_next_kernel_config_state",
        "gauge",
        "1 for a module config's readiness state for a kernel the node may boot next, 0 for the others.",
    );
    for (release, _, _, _, configs) in &snap.next {
        for (config, state, _) in configs {
            for s in READINESS {
                let _ = writeln!(
                    o,
                    "kvcd_next_kernel_config_state{{kernel=\"{}\",config=\"{}\",state=\"{s}\"}} {}",
                    label(release),
                    label(config),
                    u8::from(state == s)
                );
            }
        }
    }
    if snap.signing.get("signing").is_some_and(|s| s == "on") {
        head(
            &mut o,
            "kvcd_signing_key_trusted",
            "gauge",
            "1 when one of the running kernel's keyrings holds kvcd's signing certificate.",
        );
        let trusted = snap
            .signing
            .get("trusted by")
            .is_some_and(|t| t != "none" && !t.starts_with("unknown"));
        let _ = writeln!(o, "kvcd_signing_key_trusted {}", u8::from(trusted));
        head(
            &mut o,
            "kvcd_signing_key_usable",
            "gauge",
            "1 when kvcd's signing key and certificate can be used.",
        );
        let _ = writeln!(
            o,
            "kvcd_signing_key_usable {}",
            u8::from(!snap.signing.contains_key("error"))
        );
    }
    head(
        &mut o,
        "kvcd_signatures_enforced",
        "gauge",
        "1 when the running kernel refuses modules it cannot verify (sig_enforce or lockdown).",
    );
    let enforced = snap
        .signing
        .get("signatures enforced")
        .is_some_and(|e| e.starts_with("yes"));
    let _ = writeln!(o, "kvcd_signatures_enforced {}", u8::from(enforced));
    o
}

/// The metrics file: written atomically (a temporary file, then a rename)
/// when its content changes and at least every [`HEARTBEAT`].
#[derive(Debug)]
pub struct Textfile {
    path: PathBuf,
    last: Option<(String, Instant)>,
}

impl Textfile {
    /// A metrics file at `path` (its name ends in `.prom`).
    pub fn new(path: PathBuf) -> Self {
        Self { path, last: None }
    }

    /// The file written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// When the heartbeat is due next, if the file was written.
    pub fn due(&self) -> Option<Instant> {
        self.last.as_ref().map(|(_, t)| *t + HEARTBEAT)
    }

    /// Writes `body` and the heartbeat when the body changed or the heartbeat is due.
    pub fn update(&mut self, body: String) -> Result<()> {
        let now = Instant::now();
        if self
            .last
            .as_ref()
            .is_some_and(|(b, t)| *b == body && now < *t + HEARTBEAT)
        {
            return Ok(());
        }
        let mut text = body.clone();
        head(
            &mut text,
            "kvcd_heartbeat_timestamp_seconds",
            "gauge",
            "When kvcd last wrote this file, seconds since the epoch (at least every minute while it runs).",
        );
        let _ = writeln!(
            text,
            "kvcd_heartbeat_timestamp_seconds {}",
            crate::util::unix_now()
        );
        let dir = self
            .path
            .parent()
            .with_context(|| format!("{} has no directory", self.path.display()))?;
        let name = self.path.file_name().unwrap_or_default().to_string_lossy();
        // Not `*.prom`: node_exporter never reads a half-written file.
        let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
        // Readable by node_exporter's user whatever kvcd's umask (0077 in kvcd.service).
        let written = std::fs::write(&tmp, text.as_bytes())
            .and_then(|()| {
                std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o644))
            })
            .and_then(|()| std::fs::rename(&tmp, &self.path));
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            let hint = if e.raw_os_error() == Some(libc::EROFS) {
                format!(
                    " ({} is read-only to kvcd: kvcd.service may write only where its \
                     ReadWritePaths= say; add the directory in a drop-in, docs/security.md)",
                    dir.display()
                )
            } else {
                String::new()
            };
            return Err(anyhow::Error::new(e)
                .context(format!("writing metrics to {}{hint}", self.path.display())));
        }
        self.last = Some((body, now));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn module(name: &str, state: Status) -> ModuleStatus {
        ModuleStatus {
            name: name.to_owned(),
            state,
            step: String::new(),
            error: String::new(),
            kernel: "6.1.0-57-amd64".to_owned(),
            image: String::new(),
            image_digest: String::new(),
            loaded_modules: vec!["a".to_owned(), "b".to_owned()],
            since: 1_700_000_000,
            next_retry: 0,
            config_file: String::new(),
            wanted: true,
            started_op: 1,
            completed_op: 1,
        }
    }

    #[test]
    fn renders_states_counters_and_next_kernels() {
        let mut snap = Snapshot {
            version: "0.1.0".into(),
            kernel: "6.1.0-57-amd64".into(),
            ..Snapshot::default()
        };
        snap.modules
            .insert("nic".into(), module("nic", Status::Loaded));
        snap.modules
            .insert("gpu\"x".into(), module("gpu\"x", Status::Failed));
        snap.next.push((
            "6.1.0-58-amd64".into(),
            "next".into(),
            "package".into(),
            false,
            vec![("nic".into(), "not-prepared".into(), "never prepared".into())],
        ));
        let mut c = Counters::default();
        c.record("nic", "load", 0.25, false, 3);
        c.record("gpu\"x", "load", 1.5, true, 0);
        c.record("gpu\"x", "load", 0.5, true, 1);
        let t = render(&snap, &c, true);
        for line in [
            "kvcd_up 1",
            "kvcd_info{version=\"0.1.0\",kernel=\"6.1.0-57-amd64\"} 1",
            "kvcd_module_state{config=\"nic\",state=\"loaded\"} 1",
            "kvcd_module_state{config=\"nic\",state=\"failed\"} 0",
            "kvcd_module_state{config=\"gpu\\\"x\",state=\"failed\"} 1",
            "kvcd_module_loaded_modules{config=\"nic\"} 2",
            "kvcd_module_failures_total{config=\"gpu\\\"x\"} 2",
            "kvcd_module_failures_total{config=\"nic\"} 0",
            "kvcd_module_operations_total{config=\"gpu\\\"x\",operation=\"load\"} 2",
            "kvcd_module_operation_seconds_total{config=\"gpu\\\"x\",operation=\"load\"} 2.000000",
            "kvcd_module_last_operation_seconds{config=\"gpu\\\"x\",operation=\"load\"} 0.500000",
            "kvcd_podman_invocations_total 4",
            "kvcd_next_kernel_ready{kernel=\"6.1.0-58-amd64\",role=\"next\"} 0",
            "kvcd_next_kernel_config_state{kernel=\"6.1.0-58-amd64\",config=\"nic\",state=\"not-prepared\"} 1",
            "kvcd_next_kernel_config_state{kernel=\"6.1.0-58-amd64\",config=\"nic\",state=\"ready\"} 0",
            "kvcd_signatures_enforced 0",
        ] {
            assert!(t.lines().any(|l| l == line), "no line {line:?} in:\n{t}");
        }
        assert!(!t.contains("kvcd_signing_key_trusted"), "{t}");
        // One HELP and TYPE per metric.
        let types: Vec<&str> = t.lines().filter(|l| l.starts_with("# TYPE ")).collect();
        let mut unique = types.clone();
        unique.dedup();
        assert_eq!(types, unique);
        assert!(render(&snap, &c, false).lines().any(|l| l == "kvcd_up 0"));
    }

    #[test]
    fn the_file_is_written_on_change_only() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("kvcd.prom");
        let mut f = Textfile::new(p.clone());
        f.update("a 1\n".into()).unwrap();
        let first = std::fs::read_to_string(&p).unwrap();
        assert!(
            first.starts_with("a 1\n# HELP kvcd_heartbeat_timestamp_seconds"),
            "{first}"
        );
        std::fs::remove_file(&p).unwrap();
        f.update("a 1\n".into()).unwrap();
        assert!(
            !p.exists(),
            "an unchanged body was written again before the heartbeat"
        );
        f.update("a 2\n".into()).unwrap();
        assert!(std::fs::read_to_string(&p).unwrap().starts_with("a 2\n"));
        assert!(f.due().is_some());
        // No temporary file is left behind.
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1);
        // node_exporter runs as its own user: the file is world-readable.
        let mode =
            std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&p).unwrap().permissions());
        assert_eq!(mode & 0o777, 0o644);
    }

    #[test]
    fn a_directory_it_cannot_write_is_named() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("missing").join("kvcd.prom");
        let e = Textfile::new(p.clone()).update("a 1\n".into()).unwrap_err();
        let msg = format!("{e:#}");
        assert!(
            msg.starts_with(&format!("writing metrics to {}", p.display())),
            "{msg}"
        );
        assert!(msg.contains("No such file or directory"), "{msg}");
    }
}
