//! The shipped unit files pass `systemd-analyze verify` (as an instance),
//! with the unit's binary path pointed at the binary just built.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::path::Path;
use std::process::Command;

#[test]
fn template_unit_verifies_as_an_instance() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let unit = fs::read_to_string(repo.join("systemd/kvcd@.service")).unwrap();
    assert!(unit.contains("ExecStart=/usr/bin/kvcd apply %i"));
    assert!(unit.contains("ExecStop=/usr/bin/kvcd apply --unload %i"));
    let tmp = tempfile::tempdir().unwrap();
    fs::write(
        tmp.path().join("kvcd@.service"),
        unit.replace("/usr/bin/kvcd", env!("CARGO_BIN_EXE_kvcd")),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(tmp.path().join("kvcd@simple-kmod.service"))
        .output()
        .expect("systemd-analyze is needed (apt-get install systemd)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        !stderr.contains("kvcd@"),
        "warnings about the unit: {stderr}"
    );
}

#[test]
fn prepare_next_units_verify() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let tmp = tempfile::tempdir().unwrap();
    for unit in ["kvcd-prepare-next.path", "kvcd-prepare-next.service"] {
        let text = fs::read_to_string(repo.join("systemd").join(unit)).unwrap();
        fs::write(
            tmp.path().join(unit),
            text.replace("/usr/bin/kvcd", env!("CARGO_BIN_EXE_kvcd")),
        )
        .unwrap();
    }
    let service = fs::read_to_string(repo.join("systemd/kvcd-prepare-next.service")).unwrap();
    assert!(service.contains("ExecStart=/usr/bin/kvcd prepare-next --if-enabled"));
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(tmp.path().join("kvcd-prepare-next.path"))
        .arg(tmp.path().join("kvcd-prepare-next.service"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.contains("kvcd-prepare-next"), "{stderr}");
}
