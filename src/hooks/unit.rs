//! Where the programs kvcd starts run: as its own children, or each in a
//! transient systemd service outside the daemon's sandbox.
//!
//! `kvcd.service` is locked down (no network, a read-only system, one
//! capability: `docs/security.md`); podman, vendor hooks, ready commands and
//! KVC libraries need what it lacks. Under `kvcd daemon --helpers=units`
//! each runs through `systemd-run --pipe --wait` as `kvcd-PROGRAM-PID-N.service`:
//! its output still comes to kvcd line by line on the same pipes, its exit
//! status is the command's, and systemd enforces the same timeout
//! (`RuntimeMaxSec=`) and kills the whole unit when it is reached. The
//! environment is passed by name (`--setenv=NAME`, the value taken from
//! systemd-run's own environment), so values never show on a command line.

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Where the programs kvcd starts run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Placement {
    /// As children of kvcd, in its sandbox (the default).
    #[default]
    Inline,
    /// Each in a transient systemd service (`systemd-run`), outside kvcd's sandbox.
    Units,
}

static PLACEMENT: OnceLock<Placement> = OnceLock::new();

/// Sets where this process's commands run; the first call wins (the daemon makes it at start).
pub fn set_placement(p: Placement) {
    let _ = PLACEMENT.set(p);
}

/// Where this process's commands run; default [`Placement::Inline`].
pub fn placement() -> Placement {
    PLACEMENT.get().copied().unwrap_or_default()
}

/// The program that starts transient units.
const SYSTEMD_RUN: &str = "systemd-run";

/// Variables systemd sets for kvcd.service itself; a helper unit gets its own.
const SERVICE_ONLY: &[&str] = &[
    "NOTIFY_SOCKET",
    "WATCHDOG_PID",
    "WATCHDOG_USEC",
    "INVOCATION_ID",
    "JOURNAL_STREAM",
    "MAINPID",
    "MANAGERPID",
    "SYSTEMD_EXEC_PID",
    "LISTEN_PID",
    "LISTEN_FDS",
    "LISTEN_FDNAMES",
    "RUNTIME_DIRECTORY",
    "STATE_DIRECTORY",
    "CACHE_DIRECTORY",
    "LOGS_DIRECTORY",
    "CONFIGURATION_DIRECTORY",
    "CREDENTIALS_DIRECTORY",
    "MONITOR_SERVICE_RESULT",
    "MONITOR_EXIT_CODE",
    "MONITOR_EXIT_STATUS",
    "MONITOR_INVOCATION_ID",
    "MONITOR_UNIT",
];

/// A command placed in a transient unit: the `systemd-run` command to spawn, and the unit's name.
#[derive(Debug)]
pub struct InUnit {
    /// `systemd-run … -- PROGRAM ARGS`.
    pub command: Command,
    /// The unit, e.g. `kvcd-podman-812-3.service`.
    pub unit: String,
}

/// The unit name for the `n`th command of process `pid` running `program`.
fn unit_name(program: &OsStr, pid: u32, n: u64) -> String {
    let base = Path::new(program)
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    let base: String = base
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(40)
        .collect();
    let base = if base.is_empty() { "cmd".into() } else { base };
    format!("kvcd-{base}-{pid}-{n}.service")
}

/// `program` as a path: a bare name is looked up in `path` (kvcd's `PATH`), as spawning it would.
fn resolve(program: &OsStr, path: Option<&OsStr>) -> Option<PathBuf> {
    let p = Path::new(program);
    if p.as_os_str().is_empty() {
        return None;
    }
    if p.components().count() > 1 || p.is_absolute() {
        return Some(std::path::absolute(p).unwrap_or_else(|_| p.to_owned()));
    }
    std::env::split_paths(path?).find_map(|dir| {
        let candidate = dir.join(p);
        candidate
            .metadata()
            .is_ok_and(|m| m.is_file())
            .then_some(candidate)
    })
}

/// What `cmd` would run with: `base` (kvcd's environment) with `cmd`'s own settings applied.
fn effective_env(
    cmd: &Command,
    base: impl Iterator<Item = (OsString, OsString)>,
) -> Vec<(OsString, OsString)> {
    let mut env: std::collections::BTreeMap<OsString, OsString> = base.collect();
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => env.insert(k.to_owned(), v.to_owned()),
            None => env.remove(k),
        };
    }
    env.into_iter().collect()
}

/// `cmd` rewritten to run as transient unit `unit` with a limit of `timeout`;
/// `env` is the environment it would have had (names only reach the
/// command line), `path` the `PATH` its program is looked up in.
/// `None` when the program cannot be found (spawning it would fail the same way).
pub fn in_unit(
    cmd: &Command,
    unit: &str,
    timeout: Duration,
    env: Vec<(OsString, OsString)>,
    path: Option<&OsStr>,
) -> Option<Command> {
    let program = resolve(cmd.get_program(), path)?;
    let mut run = Command::new(SYSTEMD_RUN);
    run.env_clear();
    run.args([
        "--quiet",
        "--pipe",
        "--wait",
        "--collect",
        "--service-type=exec",
    ]);
    run.arg(format!("--unit={unit}"));
    run.arg(format!("--description=kvcd: {}", program.display()));
    // systemd stops the unit at the same limit kvcd kills systemd-run at;
    // the grace before KILL is kvcd's own.
    let secs = timeout.as_secs() + u64::from(timeout.subsec_nanos() > 0);
    run.arg(format!("--property=RuntimeMaxSec={}", secs.max(1)));
    run.arg(format!(
        "--property=TimeoutStopSec={}",
        super::GRACE.as_secs()
    ));
    if let Some(dir) = cmd.get_current_dir() {
        let dir = std::path::absolute(dir).unwrap_or_else(|_| dir.to_owned());
        let mut a = OsString::from("--working-directory=");
        a.push(dir);
        run.arg(a);
    }
    for (k, v) in env {
        if k.to_str().is_some_and(|k| SERVICE_ONLY.contains(&k)) || k.is_empty() {
            continue;
        }
        let mut a = OsString::from("--setenv=");
        a.push(&k);
        run.arg(a);
        run.env(k, v);
    }
    run.arg("--").arg(program).args(cmd.get_args());
    Some(run)
}

/// The next unit name of this process for `program`.
pub fn next_unit_name(program: &OsStr) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    unit_name(
        program,
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed),
    )
}

/// `cmd` placed in a transient unit with kvcd's own environment as the base, or why not.
pub fn place(cmd: &Command, timeout: Duration) -> std::io::Result<InUnit> {
    let unit = next_unit_name(cmd.get_program());
    let env = effective_env(cmd, std::env::vars_os());
    let path = env
        .iter()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.clone());
    in_unit(cmd, &unit, timeout, env, path.as_deref())
        .map(|command| InUnit { command, unit })
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!(
                    "{}: no such program (looked up in PATH)",
                    cmd.get_program().to_string_lossy()
                ),
            )
        })
}

/// Stops `unit` (after kvcd gave up on it); best effort, it also stops itself at its limit.
pub fn stop(unit: &str) {
    let mut c = Command::new("systemctl");
    c.args(["stop", "--no-block", "--", unit]);
    let _ = super::run_inline(c, Duration::from_secs(10), &mut |_, _| {});
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(c: &Command) -> Vec<String> {
        std::iter::once(c.get_program())
            .chain(c.get_args())
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn a_command_becomes_a_transient_service_with_its_limit_directory_and_environment() {
        let mut cmd = Command::new("/bin/echo");
        cmd.args(["a b", "--c"])
            .current_dir("/var/tmp")
            .env("KVCD_MODULE", "net")
            .env_remove("DROPPED");
        let env = effective_env(
            &cmd,
            [
                ("PATH".into(), "/usr/bin".into()),
                ("DROPPED".into(), "x".into()),
                ("HTTPS_PROXY".into(), "http://user:secret@proxy:3128".into()),
                ("NOTIFY_SOCKET".into(), "/run/systemd/notify".into()),
                ("INVOCATION_ID".into(), "abc".into()),
            ]
            .into_iter(),
        );
        let run = in_unit(
            &cmd,
            "kvcd-echo-1-0.service",
            Duration::from_millis(2500),
            env,
            None,
        )
        .unwrap();
        assert_eq!(
            argv(&run),
            [
                "systemd-run",
                "--quiet",
                "--pipe",
                "--wait",
                "--collect",
                "--service-type=exec",
                "--unit=kvcd-echo-1-0.service",
                "--description=kvcd: /bin/echo",
                "--property=RuntimeMaxSec=3",
                "--property=TimeoutStopSec=2",
                "--working-directory=/var/tmp",
                "--setenv=HTTPS_PROXY",
                "--setenv=KVCD_MODULE",
                "--setenv=PATH",
                "--",
                "/bin/echo",
                "a b",
                "--c",
            ]
        );
        // Values travel in systemd-run's environment, never on its command line.
        assert!(!argv(&run).iter().any(|a| a.contains("secret")));
        let envs: Vec<_> = run
            .get_envs()
            .map(|(k, v)| {
                (
                    k.to_string_lossy().into_owned(),
                    v.map(|v| v.to_string_lossy().into_owned()),
                )
            })
            .collect();
        assert!(envs.contains(&(
            "HTTPS_PROXY".into(),
            Some("http://user:secret@proxy:3128".into())
        )));
        assert!(envs.contains(&("KVCD_MODULE".into(), Some("net".into()))));
        assert!(
            !envs
                .iter()
                .any(|(k, _)| k == "NOTIFY_SOCKET" || k == "DROPPED")
        );
    }

    #[test]
    fn a_bare_program_is_looked_up_in_path_and_a_missing_one_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let tool = d.path().join("podman");
        std::fs::write(&tool, "#!/bin/sh\n").unwrap();
        let path = std::env::join_paths(["/nonexistent", d.path().to_str().unwrap()]).unwrap();
        let cmd = Command::new("podman");
        let run = in_unit(&cmd, "u", Duration::from_secs(5), Vec::new(), Some(&path)).unwrap();
        assert_eq!(argv(&run).last().unwrap(), &tool.display().to_string());
        assert!(
            in_unit(
                &Command::new("no-such-tool"),
                "u",
                Duration::from_secs(5),
                Vec::new(),
                Some(&path)
            )
            .is_none()
        );
        assert!(
            in_unit(
                &Command::new(""),
                "u",
                Duration::from_secs(5),
                Vec::new(),
                Some(&path)
            )
            .is_none()
        );
    }

    #[test]
    fn unit_names_are_valid_and_name_the_program() {
        assert_eq!(
            unit_name(OsStr::new("/usr/bin/podman"), 42, 7),
            "kvcd-podman-42-7.service"
        );
        assert_eq!(
            unit_name(OsStr::new("/opt/v/pre load.sh"), 1, 0),
            "kvcd-pre_load_sh-1-0.service"
        );
        assert_eq!(unit_name(OsStr::new(""), 1, 0), "kvcd-cmd-1-0.service");
        let long = "x".repeat(300);
        assert!(unit_name(OsStr::new(&long), 1, 0).len() < 80);
    }
}
