//! Module signing on the host against real fixture modules and real
//! OpenSSL: every module kvcd signs verifies against its certificate with
//! `openssl cms -verify`, `modinfo` (libkmod) reads its signer, key id and
//! digest, and bad keys, certificates and modules are refused with an error
//! naming the file. tests/vm proves that a Secure Boot kernel loads them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{Fixtures, make_key, run};
use kvcd::config::SigningSettings;
use kvcd::signing::{Hash, KernelTrust, SignOutcome, Signer, modsig};

fn settings(key: &Path, cert: &Path, hash: Hash) -> SigningSettings {
    SigningSettings {
        key: key.to_owned(),
        cert: cert.to_owned(),
        hash,
    }
}

/// Splits a signed module into its content and its PKCS#7 signature.
fn split(signed: &[u8]) -> (&[u8], &[u8]) {
    let n = signed.len();
    let a = modsig::appended(&signed[n - modsig::TAIL_LEN..], n as u64)
        .unwrap()
        .expect("a signature");
    let c = usize::try_from(a.content_len).unwrap();
    let s = usize::try_from(a.signature_len).unwrap();
    (&signed[..c], &signed[c..c + s])
}

/// `openssl cms -verify` of a signed module against `cert` (DER), the way
/// the kernel checks it: detached, binary, signer certificate given.
fn cms_verify(dir: &Path, signed: &Path, cert_pem: &Path) -> Result<(), String> {
    let data = fs::read(signed).unwrap();
    let (content, sig) = split(&data);
    let c = dir.join("content.bin");
    let s = dir.join("sig.p7");
    fs::write(&c, content).unwrap();
    fs::write(&s, sig).unwrap();
    let out = Command::new("openssl")
        .args([
            "cms",
            "-verify",
            "-binary",
            "-inform",
            "DER",
            "-noverify",
            "-nointern",
        ])
        .arg("-in")
        .arg(&s)
        .arg("-content")
        .arg(&c)
        .arg("-certfile")
        .arg(cert_pem)
        .args(["-out", "/dev/null"])
        .output()
        .unwrap();
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// `modinfo -F FIELD FILE`.
fn modinfo(field: &str, file: &Path) -> String {
    run(Command::new("modinfo").args(["-F", field]).arg(file))
        .trim()
        .to_owned()
}

/// The serial number of a DER certificate as modinfo prints key ids.
fn serial_of(der: &Path) -> String {
    let out = run(Command::new("openssl")
        .args(["x509", "-inform", "DER", "-noout", "-serial", "-in"])
        .arg(der));
    let hex = out
        .trim()
        .trim_start_matches("serial=")
        .trim_start_matches('0');
    let hex = if hex.len() % 2 == 1 {
        format!("0{hex}")
    } else {
        hex.to_owned()
    };
    hex.as_bytes()
        .chunks(2)
        .map(|c| String::from_utf8_lossy(c).to_uppercase())
        .collect::<Vec<_>>()
        .join(":")
}

fn fixture_modules() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(Fixtures::get().ko())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "ko"))
        .collect();
    v.sort();
    assert!(v.len() >= 3, "fixture modules missing: {v:?}");
    v
}

#[test]
fn every_module_verifies_with_openssl_and_modinfo_names_the_signer() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let keys = [
        ("rsa", "kvcd rsa test key", "rsa:2048"),
        ("ec", "kvcd ec test key", "ec:/dev/null"),
    ];
    // An EC key needs its curve: write the parameters first.
    run(Command::new("openssl")
        .args(["ecparam", "-name", "prime256v1", "-out"])
        .arg(d.join("ec.param")));
    for (name, cn, newkey) in keys {
        let newkey = if name == "ec" {
            format!("ec:{}", d.join("ec.param").display())
        } else {
            newkey.to_owned()
        };
        let (key, der) = make_key(d, name, cn, &newkey);
        let crt = d.join(format!("{name}.crt"));
        for hash in [Hash::Sha256, Hash::Sha512] {
            let signer = Signer::load(&settings(&key, &der, hash)).unwrap();
            assert_eq!(signer.cert().subject, cn);
            for m in fixture_modules() {
                let out = d.join(format!(
                    "{name}-{}-{}",
                    hash.name(),
                    m.file_name().unwrap().to_string_lossy()
                ));
                let r = signer.sign_file(&m, &out, &KernelTrust::default()).unwrap();
                assert_eq!(r, SignOutcome::Signed { replaced: None });
                cms_verify(d, &out, &crt)
                    .unwrap_or_else(|e| panic!("{} does not verify: {e}", out.display()));
                assert_eq!(modinfo("sig_id", &out), "PKCS#7");
                assert_eq!(modinfo("signer", &out), cn);
                assert_eq!(modinfo("sig_key", &out), serial_of(&der));
                assert_eq!(modinfo("sig_hashalgo", &out), hash.name());
                // The module itself is unchanged before its signature.
                let signed = fs::read(&out).unwrap();
                assert_eq!(split(&signed).0, fs::read(&m).unwrap().as_slice());
            }
        }
    }
}

#[test]
fn a_signature_by_another_key_does_not_verify() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let (key, der) = make_key(d, "a", "kvcd key a", "rsa:2048");
    make_key(d, "b", "kvcd key b", "rsa:2048");
    let m = &fixture_modules()[0];
    let out = d.join("signed.ko");
    Signer::load(&settings(&key, &der, Hash::Sha256))
        .unwrap()
        .sign_file(m, &out, &KernelTrust::default())
        .unwrap();
    assert!(cms_verify(d, &out, &d.join("a.crt")).is_ok());
    assert!(cms_verify(d, &out, &d.join("b.crt")).is_err());
    // A flipped byte in the module breaks the signature.
    let mut bytes = fs::read(&out).unwrap();
    bytes[100] ^= 0xff;
    fs::write(&out, &bytes).unwrap();
    assert!(cms_verify(d, &out, &d.join("a.crt")).is_err());
}

/// kvcd's signatures match those of the kernel's own `sign-file` where the
/// host has one (it is not on CoreOS hosts, which is why kvcd signs itself).
#[test]
fn signatures_equal_the_kernels_sign_file() {
    let Some(sign_file) = fs::read_dir("/usr/lib")
        .ok()
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .map(|e| e.path().join("scripts/sign-file"))
        .find(|p| p.is_file())
    else {
        eprintln!(
            "SKIP signatures_equal_the_kernels_sign_file: no linux-kbuild sign-file on this host"
        );
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let (key, der) = make_key(d, "k", "kvcd sign-file test", "rsa:2048");
    for hash in [Hash::Sha256, Hash::Sha512] {
        let m = &fixture_modules()[0];
        let ours = d.join(format!("ours-{}.ko", hash.name()));
        let theirs = d.join(format!("theirs-{}.ko", hash.name()));
        Signer::load(&settings(&key, &der, hash))
            .unwrap()
            .sign_file(m, &ours, &KernelTrust::default())
            .unwrap();
        run(Command::new(&sign_file)
            .arg(hash.name())
            .arg(&key)
            .arg(&der)
            .arg(m)
            .arg(&theirs));
        assert!(
            fs::read(&ours).unwrap() == fs::read(&theirs).unwrap(),
            "kvcd's {} signature differs from sign-file's",
            hash.name()
        );
    }
}

#[test]
fn compressed_and_already_signed_modules() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let (key, der) = make_key(d, "k", "kvcd test key", "rsa:2048");
    let (other_key, other_der) = make_key(d, "o", "kvcd other key", "rsa:2048");
    let signer = Signer::load(&settings(&key, &der, Hash::Sha256)).unwrap();
    let m = &fixture_modules()[0];
    let raw = fs::read(m).unwrap();

    // .ko.xz, .ko.gz: stored signed and uncompressed.
    let xz = d.join("m.ko.xz");
    run(Command::new("sh")
        .arg("-c")
        .arg(format!("xz -c {} > {}", m.display(), xz.display())));
    let gz = d.join("m.ko.gz");
    run(Command::new("sh")
        .arg("-c")
        .arg(format!("gzip -c {} > {}", m.display(), gz.display())));
    for c in [&xz, &gz] {
        let out = d.join(format!(
            "{}.signed",
            c.file_name().unwrap().to_string_lossy()
        ));
        signer.sign_file(c, &out, &KernelTrust::default()).unwrap();
        let signed = fs::read(&out).unwrap();
        assert_eq!(split(&signed).0, raw.as_slice());
        cms_verify(d, &out, &d.join("k.crt")).unwrap();
    }

    // Signed by another key the kernel does not trust: re-signed by kvcd.
    let by_other = d.join("by-other.ko");
    Signer::load(&settings(&other_key, &other_der, Hash::Sha512))
        .unwrap()
        .sign_file(m, &by_other, &KernelTrust::default())
        .unwrap();
    let resigned = d.join("resigned.ko");
    let r = signer
        .sign_file(&by_other, &resigned, &KernelTrust::default())
        .unwrap();
    let SignOutcome::Signed {
        replaced: Some(previous),
    } = r
    else {
        panic!("not re-signed: {r:?}");
    };
    assert_eq!(previous.name, "kvcd other key");
    assert_eq!(previous.hash, "sha512");
    let signed = fs::read(&resigned).unwrap();
    assert_eq!(
        split(&signed).0,
        raw.as_slice(),
        "the old signature was not stripped"
    );
    cms_verify(d, &resigned, &d.join("k.crt")).unwrap();
    assert_eq!(modinfo("signer", &resigned), "kvcd test key");

    // Signed by a key of a name the kernel trusts: kept as it is.
    let trust = KernelTrust {
        keyrings: vec![kvcd::signing::trust::Keyring {
            name: ".machine".into(),
            keys: vec!["kvcd other key: 0011".into()],
        }],
        ..KernelTrust::default()
    };
    let kept = d.join("kept.ko");
    match signer.sign_file(&by_other, &kept, &trust).unwrap() {
        SignOutcome::Kept { signer, keyrings } => {
            assert_eq!(signer.name, "kvcd other key");
            assert_eq!(keyrings, vec![".machine"]);
        }
        r => panic!("not kept: {r:?}"),
    }
    assert!(!kept.exists(), "a kept module is not written again");

    // Already signed by kvcd's own key: kept.
    let again = d.join("again.ko");
    let r = signer
        .sign_file(&resigned, &again, &KernelTrust::default())
        .unwrap();
    assert!(matches!(r, SignOutcome::Kept { .. }), "{r:?}");
}

#[test]
fn bad_keys_certificates_and_modules_are_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let (key, der) = make_key(d, "k", "kvcd test key", "rsa:2048");
    let (_, other_der) = make_key(d, "o", "kvcd other key", "rsa:2048");
    let err = |s: &SigningSettings| format!("{:#}", Signer::load(s).unwrap_err());

    let missing = d.join("missing.pem");
    let e = err(&settings(&missing, &der, Hash::Sha256));
    assert!(
        e.contains("[signing] key") && e.contains("missing.pem"),
        "{e}"
    );

    let e = err(&settings(&key, &d.join("missing.der"), Hash::Sha256));
    assert!(
        e.contains("[signing] cert") && e.contains("missing.der"),
        "{e}"
    );

    let e = err(&settings(&key, &other_der, Hash::Sha256));
    assert!(
        e.contains("o.der") && e.contains("does not match key") && e.contains("k.pem"),
        "{e}"
    );

    for mode in [0o644, 0o640, 0o604, 0o660] {
        fs::set_permissions(&key, fs::Permissions::from_mode(mode)).unwrap();
        let e = err(&settings(&key, &der, Hash::Sha256));
        assert!(
            e.contains(&format!("mode {mode:04o}")) && e.contains("chmod 0600"),
            "{e}"
        );
    }
    fs::set_permissions(&key, fs::Permissions::from_mode(0o400)).unwrap();
    assert!(Signer::load(&settings(&key, &der, Hash::Sha256)).is_ok());

    // An encrypted key is refused, never prompted for.
    let enc = d.join("enc.pem");
    run(Command::new("openssl")
        .args(["pkey", "-aes256", "-passout", "pass:secret", "-in"])
        .arg(&key)
        .arg("-out")
        .arg(&enc));
    fs::set_permissions(&enc, fs::Permissions::from_mode(0o600)).unwrap();
    let e = err(&settings(&enc, &der, Hash::Sha256));
    assert!(e.contains("enc.pem is encrypted"), "{e}");

    // Not a key, not a certificate.
    let junk = d.join("junk");
    fs::write(&junk, "not a key\n").unwrap();
    fs::set_permissions(&junk, fs::Permissions::from_mode(0o600)).unwrap();
    let e = err(&settings(&junk, &der, Hash::Sha256));
    assert!(e.contains("junk is not a PEM or DER private key"), "{e}");
    let e = err(&settings(&key, &junk, Hash::Sha256));
    assert!(e.contains("junk is not an X.509 certificate"), "{e}");

    // A key type the kernel cannot verify.
    let ed = d.join("ed.pem");
    run(Command::new("openssl")
        .args(["genpkey", "-algorithm", "ed25519", "-out"])
        .arg(&ed));
    fs::set_permissions(&ed, fs::Permissions::from_mode(0o600)).unwrap();
    let e = err(&settings(&ed, &der, Hash::Sha256));
    assert!(e.contains("ed.pem is neither an RSA nor an EC key"), "{e}");

    // PEM certificates are read as well as DER.
    assert!(Signer::load(&settings(&key, &d.join("k.crt"), Hash::Sha256)).is_ok());

    let signer = Signer::load(&settings(&key, &der, Hash::Sha256)).unwrap();
    let trust = KernelTrust::default();
    // Not a module.
    let e = signer
        .sign_file(&junk, &d.join("out1"), &trust)
        .unwrap_err();
    assert!(
        format!("{e:#}").contains("junk is not an ELF kernel module"),
        "{e:#}"
    );
    // A signature record whose length runs past the file.
    let m = &fixture_modules()[0];
    let mut bytes = fs::read(m).unwrap();
    bytes.extend_from_slice(&[0, 0, 2, 0, 0, 0, 0, 0, 0x7f, 0xff, 0xff, 0xff]);
    bytes.extend_from_slice(modsig::MARKER);
    let corrupt = d.join("corrupt.ko");
    fs::write(&corrupt, &bytes).unwrap();
    let e = signer
        .sign_file(&corrupt, &d.join("out2"), &trust)
        .unwrap_err();
    let e = format!("{e:#}");
    assert!(
        e.contains("corrupt.ko has a corrupt module signature"),
        "{e}"
    );
    // A signature that is not PKCS#7 SignedData.
    let mut bytes = fs::read(m).unwrap();
    bytes.extend_from_slice(&[0x30, 0x03, 0x02, 0x01, 0x01]);
    bytes.extend_from_slice(&[0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 5]);
    bytes.extend_from_slice(modsig::MARKER);
    fs::write(&corrupt, &bytes).unwrap();
    let e = format!(
        "{:#}",
        signer
            .sign_file(&corrupt, &d.join("out3"), &trust)
            .unwrap_err()
    );
    assert!(
        e.contains("corrupt.ko has a corrupt module signature"),
        "{e}"
    );
}
