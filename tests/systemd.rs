//! The shipped unit files pass `systemd-analyze verify` (template units as an
//! instance), with their binary paths pointed at the binaries just built.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::path::Path;
use std::process::Command;

fn verify(units: &[&str], check: &[&str]) {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let tmp = tempfile::tempdir().unwrap();
    for unit in units {
        let text = fs::read_to_string(repo.join("systemd").join(unit)).unwrap();
        fs::write(
            tmp.path().join(unit),
            text.replace("/usr/bin/kvcctl", env!("CARGO_BIN_EXE_kvcctl"))
                .replace("/usr/bin/kvcd", env!("CARGO_BIN_EXE_kvcd")),
        )
        .unwrap();
    }
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .args(check.iter().map(|u| tmp.path().join(u)))
        .output()
        .expect("systemd-analyze is needed (apt-get install systemd)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // Unknown keys and the like only warn: any mention of our units is a failure.
    assert!(
        !stderr.contains("kvcd"),
        "warnings about the units: {stderr}"
    );
}

#[test]
fn agent_and_template_units_verify() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let agent = fs::read_to_string(repo.join("systemd/kvcd.service")).unwrap();
    for line in [
        "Type=notify",
        "BusName=org.kvcd.Kvcd1",
        "ExecStart=/usr/bin/kvcd daemon --helpers=units",
        "RuntimeDirectoryPreserve=yes",
        "WatchdogSec=",
    ] {
        assert!(agent.contains(line), "kvcd.service lacks {line}");
    }
    let template = fs::read_to_string(repo.join("systemd/kvcd@.service")).unwrap();
    for line in [
        "ExecStart=/usr/bin/kvcctl load --wait %i",
        "ExecStop=/usr/bin/kvcctl unload --wait %i",
        "ExecReload=/usr/bin/kvcctl reload --wait %i",
        "Type=oneshot",
        "RemainAfterExit=yes",
        "After=kvcd.service",
        "LogExtraFields=KVCD_MODULE=%i",
    ] {
        assert!(template.contains(line), "kvcd@.service lacks {line}");
    }
    verify(
        &["kvcd.service", "kvcd@.service"],
        &["kvcd.service", "kvcd@simple-kmod.service"],
    );
}

#[test]
fn prepare_next_units_verify() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let service = fs::read_to_string(repo.join("systemd/kvcd-prepare-next.service")).unwrap();
    assert!(service.contains("ExecStart=/usr/bin/kvcd prepare-next --if-enabled"));
    verify(
        &["kvcd-prepare-next.path", "kvcd-prepare-next.service"],
        &["kvcd-prepare-next.path", "kvcd-prepare-next.service"],
    );
}
