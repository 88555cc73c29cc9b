//! `kvcd daemon --helpers=units`: the one process runner hands every command
//! to `systemd-run`, with the environment by name, and stops the unit when the
//! command times out. systemd is not PID 1 here, so `systemd-run` and
//! `systemctl` are stand-ins that record their arguments and run the command
//! after `--` with only the variables named by `--setenv=`; the real thing
//! runs in the systemd VM tier (tests/sysvm: podman, hooks, builds and
//! firmware under the hardened kvcd.service).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::cell::RefCell;
use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::process::Command;
use std::time::Duration;

use kvcd::hooks::unit::{Placement, placement, set_placement};
use kvcd::hooks::{HookErrorKind, run};

const SYSTEMD_RUN: &str = r#"#!/bin/bash
# Records its arguments, then runs what follows `--` with only the named variables.
printf '%s\n' "$*" >>"$REC_DIR/systemd-run.args"
env=()
while (($#)); do
    case $1 in
        --setenv=*) n=${1#--setenv=}; env+=("$n=${!n}") ;;
        --working-directory=*) cd "${1#--working-directory=}" || exit 200 ;;
        --) shift; break ;;
    esac
    shift
done
exec env -i "${env[@]}" "$@"
"#;

const SYSTEMCTL: &str = "#!/bin/sh\nprintf '%s\\n' \"$*\" >>\"$REC_DIR/systemctl.args\"\n";

#[test]
fn commands_run_through_systemd_run_and_a_timed_out_unit_is_stopped() {
    let d = tempfile::tempdir().unwrap();
    let bin = d.path().join("bin");
    fs::create_dir(&bin).unwrap();
    for (name, text) in [("systemd-run", SYSTEMD_RUN), ("systemctl", SYSTEMCTL)] {
        let p = bin.join(name);
        fs::write(&p, text).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
    }
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap());
    // SAFETY: the only test of this binary, before any thread of its own starts.
    unsafe {
        std::env::set_var("PATH", &path);
        std::env::set_var("REC_DIR", d.path());
        std::env::set_var("HTTPS_PROXY", "http://user:secret@proxy:3128");
        std::env::set_var("NOTIFY_SOCKET", "/run/systemd/notify");
    }
    assert_eq!(placement(), Placement::Inline);
    set_placement(Placement::Units);
    assert_eq!(placement(), Placement::Units);

    // Output comes back line by line, the variables arrive, the exit status is the command's.
    let lines = RefCell::new(Vec::new());
    let sink = |is_stderr: bool, l: &str| lines.borrow_mut().push((is_stderr, l.to_owned()));
    let mut cmd = Command::new("sh");
    cmd.args([
        "-c",
        "echo \"$KVCD_MODULE $HTTPS_PROXY ${NOTIFY_SOCKET:-unset} $(pwd)\"; echo oops >&2; exit 3",
    ])
    .env("KVCD_MODULE", "net")
    .current_dir(d.path());
    let e = run("post_load", cmd, Duration::from_secs(20), &sink).unwrap_err();
    assert_eq!(e.kind, HookErrorKind::Failed("exit status 3".into()));
    assert_eq!(e.stderr_tail, ["oops"]);
    let got = lines.into_inner();
    assert!(
        got.contains(&(
            false,
            format!(
                "net http://user:secret@proxy:3128 unset {}",
                d.path().display()
            )
        )),
        "{got:?}"
    );
    let args = fs::read_to_string(d.path().join("systemd-run.args")).unwrap();
    let first = args.lines().next().unwrap();
    assert!(
        first.starts_with("--quiet --pipe --wait --collect --service-type=exec --unit=kvcd-sh-"),
        "{first}"
    );
    assert!(first.contains("--property=RuntimeMaxSec=20"), "{first}");
    assert!(first.contains("--setenv=KVCD_MODULE"), "{first}");
    assert!(first.contains("--setenv=HTTPS_PROXY"), "{first}");
    assert!(
        !first.contains("secret"),
        "a value on the command line: {first}"
    );
    assert!(!first.contains("--setenv=NOTIFY_SOCKET"), "{first}");
    // The program is resolved in kvcd's PATH, as spawning it would.
    let (_, command) = first.split_once(" -- ").unwrap();
    assert!(
        command.starts_with('/') && command.contains("sh -c echo \"$KVCD_MODULE"),
        "{command}"
    );

    // A missing program fails to start, as it would inline, and no unit is started.
    let e = run(
        "build",
        Command::new("no-such-program-anywhere"),
        Duration::from_secs(5),
        &|_, _| {},
    )
    .unwrap_err();
    assert!(matches!(e.kind, HookErrorKind::Spawn(_)), "{e}");
    assert_eq!(
        fs::read_to_string(d.path().join("systemd-run.args"))
            .unwrap()
            .lines()
            .count(),
        1
    );

    // Past the timeout systemd-run is killed and the unit stopped by name.
    let mut slow = Command::new("sleep");
    slow.arg("30");
    let e = run("pre_load", slow, Duration::from_secs(1), &|_, _| {}).unwrap_err();
    assert_eq!(e.kind, HookErrorKind::TimedOut(1));
    let args = fs::read_to_string(d.path().join("systemd-run.args")).unwrap();
    let unit = args
        .lines()
        .last()
        .unwrap()
        .split(' ')
        .find_map(|a| a.strip_prefix("--unit="))
        .unwrap()
        .to_owned();
    assert!(unit.starts_with("kvcd-sleep-"), "{unit}");
    let stopped = fs::read_to_string(d.path().join("systemctl.args")).unwrap();
    assert_eq!(stopped.trim(), format!("stop --no-block -- {unit}"));
}
