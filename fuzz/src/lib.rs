//! Fuzz targets for the parts of kvcd that read untrusted or hand-written
//! input: the configuration pipeline (`kvcd.toml` and `modules.d/*.toml`
//! through merge and validation), the KVC importer, and the module file
//! reader (ELF notes, `.modinfo`, compressed modules).
//!
//! Each target is a plain `fn(&[u8])` that panics when an invariant does not
//! hold; the binaries in `fuzz_targets/` hand them to libFuzzer (see
//! `scripts/fuzz` and docs/fuzzing.md).
//!
//! Inputs are text archives: the bytes before the first line starting with
//! [`MARKER`] are the main file; each marker line starts another file or
//! setting (see each target). Seeds from the repository's real files are
//! therefore valid inputs as they are.

use std::alloc::{GlobalAlloc, Layout, System};
use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

mod config_target;
mod elf_target;
mod kvc_target;

pub use config_target::config;
pub use elf_target::elf;
pub use kvc_target::kvc_import;

/// Starts a new file or setting in a text archive input.
pub const MARKER: &[u8] = b"##> ";

/// Largest single allocation a target may make; larger ones abort the run
/// (libFuzzer records the input as a crash). Set per input by the targets.
static ALLOC_LIMIT: AtomicUsize = AtomicUsize::new(usize::MAX);

/// The system allocator, aborting on an allocation above [`ALLOC_LIMIT`]:
/// without a sanitizer, libFuzzer cannot see one huge allocation that the
/// kernel's overcommit happens to grant.
#[derive(Debug)]
pub struct BoundedAlloc;

impl BoundedAlloc {
    fn check(size: usize) {
        if size > ALLOC_LIMIT.load(Ordering::Relaxed) {
            ALLOC_LIMIT.store(usize::MAX, Ordering::Relaxed);
            let _ = std::io::stderr()
                .write_all(b"kvcd-fuzz: one allocation is larger than this target allows\n");
            std::process::abort();
        }
    }
}

// SAFETY: every method forwards to `System` unchanged after a size check
// that either returns or aborts.
unsafe impl GlobalAlloc for BoundedAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        Self::check(layout.size());
        // SAFETY: the caller's contract is passed on as it is.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        Self::check(layout.size());
        // SAFETY: the caller's contract is passed on as it is.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract is passed on as it is.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        Self::check(new_size);
        // SAFETY: the caller's contract is passed on as it is.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: BoundedAlloc = BoundedAlloc;

/// Sets the largest single allocation allowed until the next call.
fn limit_allocations(bytes: usize) {
    ALLOC_LIMIT.store(bytes, Ordering::Relaxed);
}

/// One part of a text archive: the marker line's argument (empty for the
/// main file) and the bytes up to the next marker line.
#[derive(Debug)]
struct Part<'a> {
    header: &'a [u8],
    body: &'a [u8],
}

/// Splits `data` at marker lines.
fn parts(data: &[u8]) -> Vec<Part<'_>> {
    let mut out = Vec::new();
    let mut header: &[u8] = b"";
    let mut body_start = 0;
    let mut at = 0;
    while at <= data.len() {
        let line_end = data[at..]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(data.len(), |n| at + n);
        if data[at..].starts_with(MARKER) {
            out.push(Part {
                header,
                body: &data[body_start..at],
            });
            header = &data[at + MARKER.len()..line_end];
            body_start = (line_end + 1).min(data.len());
        }
        at = line_end + 1;
    }
    out.push(Part {
        header,
        body: &data[body_start..],
    });
    out
}

/// A scratch directory for one process, emptied before each input:
/// `$KVCD_FUZZ_TMP` (set by `scripts/fuzz`) or the system's temp directory.
fn scratch(target: &str) -> PathBuf {
    let base = std::env::var_os("KVCD_FUZZ_TMP").map_or_else(std::env::temp_dir, PathBuf::from);
    let dir = base.join(format!("kvcd-fuzz-{target}.{}", std::process::id()));
    if dir.exists() {
        fs::remove_dir_all(&dir).unwrap_or_else(|e| panic!("emptying {}: {e}", dir.display()));
    }
    fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    dir
}

/// Writes `bytes` to `path`, creating its directory; false when the tree an
/// input describes cannot hold it (e.g. a file where a directory should be).
fn put(path: &Path, bytes: &[u8]) -> bool {
    path.parent().is_none_or(|p| fs::create_dir_all(p).is_ok()) && fs::write(path, bytes).is_ok()
}

/// A relative path from an archive header: plain components of letters,
/// digits and `._- !` only (no `.`, `..`, empty or hidden tricks beyond a
/// leading dot), at most 4 of them; `None` when nothing usable is left.
fn safe_relative(header: &[u8]) -> Option<PathBuf> {
    let text = std::str::from_utf8(header).ok()?.trim();
    let mut out = PathBuf::new();
    for c in text.split('/').filter(|c| !c.is_empty()).take(4) {
        if c == "."
            || c == ".."
            || !c
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || "._- !".contains(ch))
        {
            return None;
        }
        out.push(c);
    }
    (!out.as_os_str().is_empty()).then_some(out)
}

/// `body` with every `@ROOT@` replaced by `root`, so inputs can name files of the scratch tree.
fn with_root(body: &[u8], root: &Path) -> Vec<u8> {
    const TOKEN: &[u8] = b"@ROOT@";
    let root = root.as_os_str().as_encoded_bytes();
    let mut out = Vec::with_capacity(body.len());
    let mut i = 0;
    while i < body.len() {
        if body[i..].starts_with(TOKEN) {
            out.extend_from_slice(root);
            i += TOKEN.len();
        } else {
            out.push(body[i]);
            i += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archives_split_at_marker_lines() {
        let p = parts(b"main\n##> etc/a.toml\nA\nB\n##> lib\n");
        let got: Vec<(&[u8], &[u8])> = p.iter().map(|p| (p.header, p.body)).collect();
        assert_eq!(
            got,
            [
                (&b""[..], &b"main\n"[..]),
                (&b"etc/a.toml"[..], &b"A\nB\n"[..]),
                (&b"lib"[..], &b""[..]),
            ]
        );
        let p = parts(b"no markers ##> here");
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].body, b"no markers ##> here");
    }

    #[test]
    fn archive_paths_stay_relative() {
        assert_eq!(
            safe_relative(b"etc//modules.d/a.toml"),
            Some(PathBuf::from("etc/modules.d/a.toml"))
        );
        assert_eq!(safe_relative(b"../x"), None);
        assert_eq!(safe_relative(b"/"), None);
        assert_eq!(safe_relative(b"a/\xff"), None);
    }
}
