//! `elf`: a module file (`.ko`, or `.ko.gz`/`.ko.xz`/`.ko.zst` when the
//! input starts with that format's magic) through what kvcd reads of it:
//! `ElfInfo::read` (machine, build ID, `.modinfo`, in one pass),
//! `ModInfo::read`, `ModuleIdentity::of_file`, the appended module
//! signature (`signing::read_signature`: its record and its PKCS#7 signer);
//! and the input as a live module's sysfs notes file (`gnu_build_id_in`).
//!
//! Invariants besides not panicking: every error names the file; the two
//! reads agree with `ModuleIdentity::of_file`; no allocation is larger than
//! 64 MiB for an uncompressed file (the reader reads headers, notes,
//! section names and `.modinfo` only) or beyond the decompression bound for
//! a compressed one.

use kvcd::kmod::elf::{ElfInfo, gnu_build_id_in};
use kvcd::kmod::{ModInfo, ModuleIdentity};

use crate::{limit_allocations, put, scratch};

/// The `elf` target.
pub fn elf(data: &[u8]) {
    limit_allocations(64 << 20);
    for le in [true, false] {
        if let Some(id) = gnu_build_id_in(data, le) {
            assert!(id.len() <= data.len(), "a build ID longer than its notes");
        }
    }

    let ext = if data.starts_with(&[0x1f, 0x8b]) {
        "ko.gz"
    } else if data.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
        "ko.xz"
    } else if data.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        "ko.zst"
    } else {
        "ko"
    };
    if ext != "ko" {
        // kvcd decompresses up to 1 GiB; a growing buffer may double once past that.
        limit_allocations((2 << 30) + (1 << 20));
    }
    let root = scratch("elf");
    let path = root.join(format!("fuzz_mod.{ext}"));
    assert!(put(&path, data), "writing {}", path.display());
    let shown = path.display().to_string();

    let elf = ElfInfo::read(&path);
    if let Err(e) = &elf {
        let e = format!("{e:#}");
        assert!(
            e.contains(&shown),
            "an ELF error does not name the file: {e}"
        );
    }
    let info = ModInfo::read(&path);
    if let Err(e) = &info {
        let e = format!("{e:#}");
        assert!(
            e.contains(&shown),
            "a modinfo error does not name the file: {e}"
        );
    }
    match kvcd::signing::read_signature(&path) {
        Ok(Some(signer)) => assert!(
            ext != "ko" || signer.key_id.len() + signer.issuer.len() <= data.len(),
            "a signer larger than the file"
        ),
        Ok(None) => {}
        Err(e) => {
            let e = format!("{e:#}");
            assert!(
                e.contains(&shown),
                "a signature error does not name the file: {e}"
            );
        }
    }
    let identity = ModuleIdentity::of_file(&path);
    match (elf, info, identity) {
        (Ok(elf), Ok(info), Ok(id)) => {
            assert_eq!(id, ModuleIdentity::new(&elf, &info));
            // A release, if any, is a word of vermagic.
            if let Some(r) = info.vermagic_release() {
                assert!(!r.is_empty() && !r.contains(char::is_whitespace));
            }
        }
        (_, _, Ok(id)) => panic!("of_file succeeded where a read failed: {id:?}"),
        (_, _, Err(e)) => {
            let e = format!("{e:#}");
            assert!(
                e.contains(&shown),
                "an identity error does not name the file: {e}"
            );
        }
    }
}
