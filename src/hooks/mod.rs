//! Running vendor commands: hooks, ready checks and KVC framework libraries.
//!
//! Commands are argv, never shell strings. Each runs in its own process
//! group with stdin closed; its output goes to a sink line by line as it
//! comes; on timeout the whole group is killed (TERM, then KILL), so nothing
//! it started is left behind. Run inline, a command that exits in time may
//! leave background processes it started on purpose running; in a transient
//! unit ([`unit`], kvcd.service's way) they end with it, as in any service.

pub mod kvc;
pub mod unit;

use std::collections::VecDeque;
use std::fmt;
use std::io::{BufRead as _, BufReader, Read};
use std::os::unix::process::{CommandExt as _, ExitStatusExt as _};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

/// How many stderr lines an error keeps.
const TAIL: usize = 10;
/// How long a group gets between TERM and KILL.
const GRACE: Duration = Duration::from_secs(2);

/// A line sink: (is_stderr, line).
pub type Sink<'a> = &'a dyn Fn(bool, &str);

/// Why a command did not succeed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HookErrorKind {
    /// It could not be started.
    Spawn(String),
    /// It exited unsuccessfully.
    Failed(String),
    /// It ran past its timeout and its process group was killed.
    TimedOut(u64),
}

/// A failed command: which, how, and its last stderr lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookError {
    /// The hook's name, e.g. `pre_load`.
    pub hook: String,
    /// The program.
    pub program: String,
    /// What went wrong.
    pub kind: HookErrorKind,
    /// The last lines it wrote to stderr.
    pub stderr_tail: Vec<String>,
}

impl fmt::Display for HookError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "hook {} ({}) ", self.hook, self.program)?;
        match &self.kind {
            HookErrorKind::Spawn(e) => write!(f, "could not be started: {e}")?,
            HookErrorKind::Failed(status) => write!(f, "failed: {status}")?,
            HookErrorKind::TimedOut(s) => {
                write!(f, "timed out after {s}s; its process group was killed")?;
            }
        }
        if !self.stderr_tail.is_empty() {
            write!(
                f,
                "; last stderr lines:\n  {}",
                self.stderr_tail.join("\n  ")
            )?;
        }
        Ok(())
    }
}

impl std::error::Error for HookError {}

/// An exit status in words: `exit status 3`, `killed by signal SIGKILL`.
pub fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit status {c}"),
        (None, Some(s)) => format!(
            "killed by signal {}",
            Signal::try_from(s).map_or_else(|_| s.to_string(), |sig| sig.as_str().to_owned())
        ),
        _ => status.to_string(),
    }
}

/// Sends each line of `stream` to `tx`, tagged with `is_stderr`.
fn spawn_lines<R: Read + Send + 'static>(
    stream: R,
    is_stderr: bool,
    tx: mpsc::Sender<(bool, String)>,
) {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            if tx.send((is_stderr, line)).is_err() {
                break;
            }
        }
    });
}

/// Kills the process group of `child`: TERM, a grace period, then KILL.
fn kill_group(child: &mut Child) {
    let Ok(raw) = i32::try_from(child.id()) else {
        return;
    };
    let pgid = Pid::from_raw(raw);
    let _ = killpg(pgid, Signal::SIGTERM);
    let deadline = Instant::now() + GRACE;
    while Instant::now() < deadline {
        if matches!(child.try_wait(), Ok(Some(_))) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // Whatever is left of the group, the leader included.
    let _ = killpg(pgid, Signal::SIGKILL);
    let _ = child.wait();
}

/// Why [`run_lines`] has no exit status to give.
#[derive(Debug)]
pub enum RunError {
    /// The program could not be started.
    Spawn(std::io::Error),
    /// It ran past its timeout; its process group was killed.
    TimedOut,
}

/// Runs `cmd` in its own process group with stdin closed, handing each line
/// of output to `on_line` (is_stderr, line) as it comes; past `timeout` the
/// whole group is killed (TERM, then KILL). The one process runner of kvcd:
/// hooks and podman go through it. Under [`unit::Placement::Units`] the
/// command runs in a transient systemd service (see [`unit`]), which is
/// stopped too when the timeout is reached.
pub fn run_lines(
    cmd: Command,
    timeout: Duration,
    on_line: &mut dyn FnMut(bool, String),
) -> Result<ExitStatus, RunError> {
    if unit::placement() == unit::Placement::Inline {
        return run_inline(cmd, timeout, on_line);
    }
    let placed = unit::place(&cmd, timeout).map_err(RunError::Spawn)?;
    let result = run_inline(placed.command, timeout, on_line);
    if matches!(result, Err(RunError::TimedOut)) {
        unit::stop(&placed.unit);
    }
    result
}

/// [`run_lines`] as a child of this process, whatever the placement.
fn run_inline(
    mut cmd: Command,
    timeout: Duration,
    on_line: &mut dyn FnMut(bool, String),
) -> Result<ExitStatus, RunError> {
    cmd.process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(RunError::Spawn)?;
    let (tx, rx) = mpsc::channel();
    if let Some(out) = child.stdout.take() {
        spawn_lines(out, false, tx.clone());
    }
    if let Some(e) = child.stderr.take() {
        spawn_lines(e, true, tx);
    }

    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Ok(Some(status)) = child.try_wait() {
            break Some(status);
        }
        let now = Instant::now();
        if now >= deadline {
            break None;
        }
        let wait = (deadline - now).min(Duration::from_millis(50));
        match rx.recv_timeout(wait) {
            Ok((e, line)) => on_line(e, line),
            Err(RecvTimeoutError::Timeout) => {}
            // Both pipes closed but the process still runs: poll, do not spin.
            Err(RecvTimeoutError::Disconnected) => {
                std::thread::sleep(wait.min(Duration::from_millis(10)));
            }
        }
    };
    let Some(status) = status else {
        kill_group(&mut child);
        while let Ok((e, line)) = rx.recv_timeout(Duration::from_millis(100)) {
            on_line(e, line);
        }
        return Err(RunError::TimedOut);
    };
    // The rest of its output; a helper it left running may hold the pipes open.
    let drain_until = Instant::now() + Duration::from_millis(500);
    while let Some(left) = drain_until.checked_duration_since(Instant::now()) {
        match rx.recv_timeout(left) {
            Ok((e, line)) => on_line(e, line),
            Err(_) => break,
        }
    }
    Ok(status)
}

/// Which output streams a tail keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TailOf {
    /// stderr only.
    Stderr,
    /// stdout and stderr, as they came.
    Both,
}

/// A command run to its end or its timeout: how it ended, and its last lines.
#[derive(Debug)]
pub struct Ran {
    /// The exit status, or why there is none.
    pub result: Result<ExitStatus, RunError>,
    /// The last lines of the streams kept, oldest first.
    pub tail: Vec<String>,
}

/// [`run_lines`], keeping the last `keep` lines of the streams `of` as a tail.
pub fn run_tailed(
    cmd: Command,
    timeout: Duration,
    keep: usize,
    of: TailOf,
    on_line: &mut dyn FnMut(bool, &str),
) -> Ran {
    let mut tail: VecDeque<String> = VecDeque::with_capacity(keep);
    let result = run_lines(cmd, timeout, &mut |is_stderr, line| {
        on_line(is_stderr, &line);
        if keep > 0 && (is_stderr || of == TailOf::Both) {
            if tail.len() == keep {
                tail.pop_front();
            }
            tail.push_back(line);
        }
    });
    Ran {
        result,
        tail: tail.into(),
    }
}

/// Runs `cmd` as hook `hook`, with `timeout`, sending its output to `sink`.
pub fn run(hook: &str, cmd: Command, timeout: Duration, sink: Sink<'_>) -> Result<(), HookError> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let err = |kind, stderr_tail| HookError {
        hook: hook.to_owned(),
        program: program.clone(),
        kind,
        stderr_tail,
    };
    let ran = run_tailed(
        cmd,
        timeout,
        TAIL,
        TailOf::Stderr,
        &mut |is_stderr, line| {
            sink(is_stderr, line);
        },
    );
    match ran.result {
        Err(RunError::Spawn(e)) => Err(err(HookErrorKind::Spawn(e.to_string()), Vec::new())),
        Err(RunError::TimedOut) => Err(err(HookErrorKind::TimedOut(timeout.as_secs()), ran.tail)),
        Ok(status) if status.success() => Ok(()),
        Ok(status) => Err(err(HookErrorKind::Failed(describe(status)), ran.tail)),
    }
}

/// A command from an argv (the first element is the program).
pub fn command(argv: &[String]) -> Command {
    let mut c = Command::new(argv.first().map_or("", String::as_str));
    c.args(argv.iter().skip(1));
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    fn sh(script: &str) -> Command {
        let mut c = Command::new("/bin/sh");
        c.arg("-c").arg(script);
        c
    }

    #[test]
    fn output_is_passed_on_and_failure_keeps_stderr() {
        let lines = RefCell::new(Vec::new());
        let sink = |e: bool, l: &str| {
            lines
                .borrow_mut()
                .push(format!("{}{l}", if e { "E:" } else { "O:" }))
        };
        let e = run(
            "post_load",
            sh("echo out; echo bad >&2; exit 3"),
            Duration::from_secs(5),
            &sink,
        )
        .unwrap_err();
        assert_eq!(e.kind, HookErrorKind::Failed("exit status 3".into()));
        assert_eq!(e.stderr_tail, ["bad"]);
        assert!(
            e.to_string().starts_with(
                "hook post_load (/bin/sh) failed: exit status 3; last stderr lines:\n  bad"
            ),
            "{e}"
        );
        let mut got = lines.into_inner();
        got.sort();
        assert_eq!(got, ["E:bad", "O:out"]);
        run("x", sh("exit 0"), Duration::from_secs(5), &|_, _| {}).unwrap();
    }

    #[test]
    fn a_tail_keeps_the_last_lines_of_the_streams_asked_for() {
        let script = "for i in 1 2 3 4 5; do echo out$i; echo err$i >&2; sleep 0.01; done";
        let mut seen = 0;
        let ran = run_tailed(
            sh(script),
            Duration::from_secs(5),
            3,
            TailOf::Stderr,
            &mut |_, _| seen += 1,
        );
        assert!(ran.result.unwrap().success());
        assert_eq!(seen, 10);
        assert_eq!(ran.tail, ["err3", "err4", "err5"]);
        // Both streams: stdout lines count too (the pause orders the two readers).
        let ran = run_tailed(
            sh("echo out1; echo out2; echo out3; sleep 0.3; echo err1 >&2"),
            Duration::from_secs(5),
            3,
            TailOf::Both,
            &mut |_, _| {},
        );
        assert_eq!(ran.tail, ["out2", "out3", "err1"]);
    }

    #[test]
    fn timeout_kills_the_whole_group() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("child.pid");
        let script = format!(
            "sleep 300 & echo $! > {}; echo started >&2; wait",
            pidfile.display()
        );
        let t0 = Instant::now();
        let e = run("pre_load", sh(&script), Duration::from_secs(1), &|_, _| {}).unwrap_err();
        assert_eq!(e.kind, HookErrorKind::TimedOut(1));
        assert_eq!(e.stderr_tail, ["started"]);
        assert!(t0.elapsed() < Duration::from_secs(10));
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // The background child is gone too (not even a zombie we could signal).
        std::thread::sleep(Duration::from_millis(200));
        let alive = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| !s.contains(") Z "))
            .unwrap_or(false);
        assert!(!alive, "child {pid} survived the timeout");
    }

    #[test]
    fn a_command_that_closes_its_output_still_times_out() {
        let e = run(
            "x",
            sh("exec >/dev/null 2>&1; exec sleep 300"),
            Duration::from_secs(1),
            &|_, _| {},
        )
        .unwrap_err();
        assert_eq!(e.kind, HookErrorKind::TimedOut(1));
    }

    #[test]
    fn a_missing_program_is_a_spawn_error() {
        let e = run(
            "build",
            command(&["/nonexistent/hook".to_owned()]),
            Duration::from_secs(1),
            &|_, _| {},
        )
        .unwrap_err();
        assert!(matches!(e.kind, HookErrorKind::Spawn(_)));
        assert!(
            e.to_string()
                .starts_with("hook build (/nonexistent/hook) could not be started"),
            "{e}"
        );
    }

    #[test]
    fn signals_are_named() {
        let e = run("x", sh("kill -9 $$"), Duration::from_secs(5), &|_, _| {}).unwrap_err();
        assert_eq!(
            e.kind,
            HookErrorKind::Failed("killed by signal SIGKILL".into())
        );
    }
}
