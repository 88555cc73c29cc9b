//! The little of a module's ELF file that kvcd needs, in one pass over the
//! file (compressed or not): the machine it was built for, its GNU build ID
//! and its `.modinfo` strings; and the build ID of a live module's notes in
//! sysfs.
//!
//! Only the ELF header, the section headers, the section names, the note
//! sections and `.modinfo` are read; an uncompressed file is never read
//! whole. Every offset is checked against the file's size before anything
//! is allocated for it.

use std::fs::File;
use std::io::{BufReader, Cursor, Read, Seek, SeekFrom, Write};
use std::path::Path;

use anyhow::{Context as _, Result, bail};

/// Largest decompressed module kvcd reads (1 GiB).
const MAX_DECOMPRESSED: u64 = 1 << 30;
/// Largest note section kvcd reads (64 KiB; build IDs are 20 bytes).
const MAX_NOTES: u64 = 64 << 10;
/// Largest section name table and `.modinfo` section kvcd reads (1 MiB each).
const MAX_STRINGS: u64 = 1 << 20;
/// `SHT_NOTE`.
const SHT_NOTE: u32 = 7;
/// `NT_GNU_BUILD_ID`.
const NT_GNU_BUILD_ID: u32 = 3;

/// What kvcd reads from a module's ELF file.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ElfInfo {
    /// `e_machine` (62 for x86_64, 183 for aarch64).
    pub machine: u16,
    /// True for a 64-bit ELF file.
    pub is_64: bool,
    /// The GNU build ID, when the file carries one.
    pub build_id: Option<Vec<u8>>,
    /// The `.modinfo` section's `key=value` strings, in file order (empty without one).
    pub modinfo: Vec<(String, String)>,
}

/// A `Read + Seek` over a module file's ELF content.
pub(crate) trait ReadSeek: Read + Seek {}
impl<T: Read + Seek> ReadSeek for T {}

/// A writer that keeps at most `.1` bytes and fails past that, so no
/// decompressor can grow memory beyond the bound.
struct Capped(Vec<u8>, u64);

impl Write for Capped {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if self.0.len() as u64 + data.len() as u64 > self.1 {
            return Err(std::io::Error::other(format!(
                "decompresses to more than {} bytes",
                self.1
            )));
        }
        self.0.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Opens `path` for ELF reading, decompressing `.ko.xz`/`.ko.zst`/`.ko.gz` (at most 1 GiB).
pub(crate) fn open(path: &Path) -> Result<Box<dyn ReadSeek>> {
    open_capped(path, MAX_DECOMPRESSED)
}

/// [`open`] with at most `cap` decompressed bytes.
fn open_capped(path: &Path, cap: u64) -> Result<Box<dyn ReadSeek>> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let mut input = BufReader::new(file);
    let mut out = Capped(Vec::new(), cap);
    let decompressed = if name.ends_with(".ko.gz") {
        std::io::copy(&mut flate2::read::GzDecoder::new(input), &mut out).map(drop)
    } else if name.ends_with(".ko.zst") {
        ruzstd::decoding::StreamingDecoder::new(input)
            .map_err(std::io::Error::other)
            .and_then(|mut d| std::io::copy(&mut d, &mut out))
            .map(drop)
    } else if name.ends_with(".ko.xz") {
        lzma_rs::xz_decompress(&mut input, &mut out).map_err(|e| match e {
            lzma_rs::error::Error::IoError(e) => e,
            other => std::io::Error::other(other.to_string()),
        })
    } else {
        return Ok(Box::new(input.into_inner()));
    };
    decompressed.with_context(|| format!("decompressing {}", path.display()))?;
    Ok(Box::new(Cursor::new(out.0)))
}

/// Byte order and word size of an ELF file.
#[derive(Clone, Copy)]
struct Layout {
    le: bool,
    is_64: bool,
}

impl Layout {
    fn u16(self, b: &[u8], at: usize) -> u16 {
        let a = [b[at], b[at + 1]];
        if self.le {
            u16::from_le_bytes(a)
        } else {
            u16::from_be_bytes(a)
        }
    }

    fn u32(self, b: &[u8], at: usize) -> u32 {
        let a = [b[at], b[at + 1], b[at + 2], b[at + 3]];
        if self.le {
            u32::from_le_bytes(a)
        } else {
            u32::from_be_bytes(a)
        }
    }

    fn u64(self, b: &[u8], at: usize) -> u64 {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[at..at + 8]);
        if self.le {
            u64::from_le_bytes(a)
        } else {
            u64::from_be_bytes(a)
        }
    }

    /// A word: 8 bytes in ELF64, 4 in ELF32.
    fn word(self, b: &[u8], at: usize) -> u64 {
        if self.is_64 {
            self.u64(b, at)
        } else {
            u64::from(self.u32(b, at))
        }
    }
}

impl ElfInfo {
    /// Reads the ELF header, build ID and `.modinfo` of the module file at `path`.
    pub fn read(path: &Path) -> Result<Self> {
        let mut r = open(path)?;
        Self::from_reader(&mut r).with_context(|| format!("{}: not a module file", path.display()))
    }

    fn from_reader(r: &mut dyn ReadSeek) -> Result<Self> {
        let mut h = [0u8; 64];
        let n = read_up_to(r, &mut h)?;
        if n < 52 || h[..4] != *b"\x7fELF" {
            bail!("no ELF header");
        }
        let is_64 = match h[4] {
            1 => false,
            2 => true,
            c => bail!("unknown ELF class {c}"),
        };
        let le = match h[5] {
            1 => true,
            2 => false,
            d => bail!("unknown ELF byte order {d}"),
        };
        if is_64 && n < 64 {
            bail!("truncated ELF header");
        }
        let l = Layout { le, is_64 };
        let machine = l.u16(&h, 18);
        let (shoff, shentsize, shnum, shstrndx) = if is_64 {
            (
                l.u64(&h, 0x28),
                l.u16(&h, 0x3a),
                l.u16(&h, 0x3c),
                l.u16(&h, 0x3e),
            )
        } else {
            (
                u64::from(l.u32(&h, 0x20)),
                l.u16(&h, 0x2e),
                l.u16(&h, 0x30),
                l.u16(&h, 0x32),
            )
        };
        let mut out = Self {
            machine,
            is_64,
            build_id: None,
            modinfo: Vec::new(),
        };
        let entry = if is_64 { 64 } else { 40 };
        if shoff == 0 || shnum == 0 || usize::from(shentsize) < entry {
            return Ok(out);
        }
        let size = r.seek(SeekFrom::End(0))?;
        let table = section_table(r, shoff, shentsize, shnum)?;
        let sections: Vec<Section> = table
            .chunks_exact(usize::from(shentsize))
            .map(|s| Section::parse(l, s))
            .collect();
        for s in sections.iter().filter(|s| s.kind == SHT_NOTE) {
            if s.size > MAX_NOTES || s.off.checked_add(s.size).is_none_or(|e| e > size) {
                continue;
            }
            let notes = read_at(r, s.off, s.size).context("truncated note section")?;
            if let Some(id) = gnu_build_id_in(&notes, le) {
                out.build_id = Some(id);
                break;
            }
        }
        // SHN_UNDEF: no section names, so no `.modinfo` to find.
        if shstrndx == 0 {
            return Ok(out);
        }
        if shstrndx >= shnum {
            bail!("section name table index {shstrndx} is not one of its {shnum} sections");
        }
        let names = &sections[usize::from(shstrndx)];
        if names.off >= size {
            bail!("the section name table starts at the end of the file");
        }
        let names = names.bytes(r, size, "the section name table")?;
        let Some(modinfo) = sections.iter().skip(1).find(|s| {
            usize::try_from(s.name)
                .ok()
                .and_then(|at| names.get(at..))
                .and_then(|rest| rest.split(|&b| b == 0).next())
                == Some(b".modinfo")
        }) else {
            return Ok(out);
        };
        if modinfo.off >= size {
            bail!("the .modinfo section starts at the end of the file");
        }
        out.modinfo = modinfo_strings(&modinfo.bytes(r, size, "the .modinfo section")?);
        Ok(out)
    }
}

/// One section header: what kvcd uses of it.
#[derive(Clone, Copy)]
struct Section {
    name: u32,
    kind: u32,
    off: u64,
    size: u64,
}

impl Section {
    fn parse(l: Layout, s: &[u8]) -> Self {
        let (off, size) = if l.is_64 {
            (l.word(s, 24), l.word(s, 32))
        } else {
            (l.word(s, 16), l.word(s, 20))
        };
        Self {
            name: l.u32(s, 0),
            kind: l.u32(s, 4),
            off,
            size,
        }
    }

    /// The section's bytes; `what` names it in errors. It must lie inside
    /// the file and be at most [`MAX_STRINGS`] long.
    fn bytes(self, r: &mut dyn ReadSeek, file_size: u64, what: &str) -> Result<Vec<u8>> {
        if self
            .off
            .checked_add(self.size)
            .is_none_or(|e| e > file_size)
        {
            bail!("{what} ends past the end of the file");
        }
        if self.size > MAX_STRINGS {
            bail!("{what} is larger than {MAX_STRINGS} bytes");
        }
        read_at(r, self.off, self.size).with_context(|| format!("reading {what}"))
    }
}

/// `len` bytes at `off` (the caller checked both against the file's size).
fn read_at(r: &mut dyn ReadSeek, off: u64, len: u64) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; usize::try_from(len)?];
    r.seek(SeekFrom::Start(off))?;
    r.read_exact(&mut buf)?;
    Ok(buf)
}

/// The `key=value` strings of a `.modinfo` section (NUL-separated, padded
/// with NULs); a string without `=` is a key with an empty value, and bytes
/// that are not UTF-8 are replaced.
fn modinfo_strings(data: &[u8]) -> Vec<(String, String)> {
    data.split(|&b| b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| {
            let s = String::from_utf8_lossy(s);
            match s.split_once('=') {
                Some((k, v)) => (k.to_owned(), v.to_owned()),
                None => (s.into_owned(), String::new()),
            }
        })
        .collect()
}

/// The section header table: `shnum` entries of `shentsize` bytes at
/// `shoff`, which must lie inside the file (nothing is allocated for a
/// table the file cannot hold).
fn section_table(r: &mut dyn ReadSeek, shoff: u64, shentsize: u16, shnum: u16) -> Result<Vec<u8>> {
    let len = u64::from(shentsize) * u64::from(shnum);
    let size = r.seek(SeekFrom::End(0))?;
    if shoff.checked_add(len).is_none_or(|end| end > size) {
        bail!("truncated section headers");
    }
    let mut table = vec![0u8; usize::try_from(len)?];
    r.seek(SeekFrom::Start(shoff))?;
    r.read_exact(&mut table)
        .context("truncated section headers")?;
    Ok(table)
}

fn read_up_to(r: &mut dyn ReadSeek, buf: &mut [u8]) -> Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// The GNU build ID among the notes in `data` (a note section, or a live
/// module's `notes/.note.gnu.build-id` file), in the given byte order.
pub fn gnu_build_id_in(data: &[u8], le: bool) -> Option<Vec<u8>> {
    let l = Layout { le, is_64: false };
    let pad = |n: usize| n.div_ceil(4) * 4;
    let mut at = 0;
    while at + 12 <= data.len() {
        let namesz = usize::try_from(l.u32(data, at)).ok()?;
        let descsz = usize::try_from(l.u32(data, at + 4)).ok()?;
        let kind = l.u32(data, at + 8);
        let name_at = at + 12;
        let desc_at = name_at.checked_add(pad(namesz))?;
        let end = desc_at.checked_add(pad(descsz))?;
        if desc_at + descsz > data.len() {
            return None;
        }
        if kind == NT_GNU_BUILD_ID && data.get(name_at..name_at + namesz) == Some(b"GNU\0") {
            return Some(data[desc_at..desc_at + descsz].to_vec());
        }
        at = end;
    }
    None
}

/// The ELF machine number of an architecture as `uname -m` names it, if kvcd knows it.
pub fn machine_of(arch: &str) -> Option<u16> {
    Some(match arch {
        "x86_64" => 62,
        "aarch64" | "arm64" => 183,
        "ppc64le" | "ppc64" => 21,
        "s390x" => 22,
        "riscv64" => 243,
        "i386" | "i486" | "i586" | "i686" => 3,
        "armv7l" | "armv6l" | "arm" => 40,
        _ => return None,
    })
}

/// The architecture name for an ELF machine number, for messages.
pub fn machine_name(machine: u16) -> String {
    match machine {
        62 => "x86_64".into(),
        183 => "aarch64".into(),
        21 => "ppc64".into(),
        22 => "s390x".into(),
        243 => "riscv64".into(),
        3 => "i386".into(),
        40 => "arm".into(),
        m => format!("ELF machine {m}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF64 little-endian file with one note section holding a build ID.
    fn elf(machine: u16, build_id: &[u8]) -> Vec<u8> {
        let mut note = Vec::new();
        note.extend_from_slice(&4u32.to_le_bytes());
        note.extend_from_slice(&u32::try_from(build_id.len()).unwrap().to_le_bytes());
        note.extend_from_slice(&NT_GNU_BUILD_ID.to_le_bytes());
        note.extend_from_slice(b"GNU\0");
        note.extend_from_slice(build_id);
        while note.len() % 4 != 0 {
            note.push(0);
        }
        let note_off = 64u64;
        let shoff = note_off + note.len() as u64;
        let mut f = vec![0u8; 64];
        f[..4].copy_from_slice(b"\x7fELF");
        f[4] = 2;
        f[5] = 1;
        f[18..20].copy_from_slice(&machine.to_le_bytes());
        f[0x28..0x30].copy_from_slice(&shoff.to_le_bytes());
        f[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
        f[0x3c..0x3e].copy_from_slice(&2u16.to_le_bytes());
        f.extend_from_slice(&note);
        // Section 0: null; section 1: the note.
        f.extend_from_slice(&[0u8; 64]);
        let mut sh = [0u8; 64];
        sh[4..8].copy_from_slice(&SHT_NOTE.to_le_bytes());
        sh[24..32].copy_from_slice(&note_off.to_le_bytes());
        sh[32..40].copy_from_slice(&(note.len() as u64).to_le_bytes());
        f.extend_from_slice(&sh);
        f
    }

    #[test]
    fn reads_machine_and_build_id() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("m.ko");
        std::fs::write(&p, elf(183, &[1, 2, 3, 4, 5])).unwrap();
        let info = ElfInfo::read(&p).unwrap();
        assert_eq!(info.machine, 183);
        assert!(info.is_64);
        assert_eq!(info.build_id.as_deref(), Some(&[1u8, 2, 3, 4, 5][..]));
        assert_eq!(machine_name(info.machine), "aarch64");
    }

    /// `raw` written as `m.ko.gz` and `m.ko.xz` in `dir`.
    fn compressed(dir: &Path, raw: &[u8]) -> [std::path::PathBuf; 2] {
        use std::io::Write as _;
        let gz = dir.join("m.ko.gz");
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(raw).unwrap();
        std::fs::write(&gz, e.finish().unwrap()).unwrap();
        let xz = dir.join("m.ko.xz");
        let mut out = Vec::new();
        lzma_rs::xz_compress(&mut Cursor::new(raw), &mut out).unwrap();
        std::fs::write(&xz, out).unwrap();
        [gz, xz]
    }

    #[test]
    fn reads_compressed_modules() {
        let d = tempfile::tempdir().unwrap();
        for p in compressed(d.path(), &elf(62, &[9; 20])) {
            let info = ElfInfo::read(&p).unwrap();
            assert_eq!(info.machine, 62, "{}", p.display());
            assert_eq!(info.build_id.as_deref(), Some(&[9u8; 20][..]));
        }
    }

    #[test]
    fn decompression_stops_at_its_bound() {
        let d = tempfile::tempdir().unwrap();
        for p in compressed(d.path(), &elf(62, &[9; 20])) {
            let e = format!("{:#}", open_capped(&p, 64).err().unwrap());
            assert!(
                e.starts_with(&format!("decompressing {}", p.display()))
                    && e.ends_with("decompresses to more than 64 bytes"),
                "{e}"
            );
        }
    }

    #[test]
    fn not_elf_is_an_error_naming_the_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x.ko");
        std::fs::write(&p, b"#!/bin/sh\n").unwrap();
        let e = format!("{:#}", ElfInfo::read(&p).unwrap_err());
        assert!(e.contains("x.ko: not a module file: no ELF header"), "{e}");
    }

    /// An ELF64 file with a section name table and a `.modinfo` section
    /// holding `version=1`; `at_end` moves the table (`"names"`) or
    /// `.modinfo` (`"modinfo"`) to the end of the file with size 0.
    fn elf_with_modinfo(at_end: &str) -> Vec<u8> {
        let names = b"\0.shstrtab\0.modinfo\0";
        let modinfo = b"version=1\0";
        let names_off = 64u64;
        let modinfo_off = names_off + names.len() as u64;
        let shoff = modinfo_off + modinfo.len() as u64;
        let end = shoff + 3 * 64;
        let mut f = vec![0u8; 64];
        f[..4].copy_from_slice(b"\x7fELF");
        f[4] = 2;
        f[5] = 1;
        f[16] = 1; // ET_REL
        f[18..20].copy_from_slice(&62u16.to_le_bytes());
        f[0x28..0x30].copy_from_slice(&shoff.to_le_bytes());
        f[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
        f[0x3c..0x3e].copy_from_slice(&3u16.to_le_bytes());
        f[0x3e..0x40].copy_from_slice(&1u16.to_le_bytes());
        f.extend_from_slice(names);
        f.extend_from_slice(modinfo);
        f.extend_from_slice(&[0u8; 64]);
        for (name, off, len, moved) in [
            (1u32, names_off, names.len() as u64, "names"),
            (11, modinfo_off, modinfo.len() as u64, "modinfo"),
        ] {
            let (off, len) = if at_end == moved {
                (end, 0)
            } else {
                (off, len)
            };
            let mut sh = [0u8; 64];
            sh[..4].copy_from_slice(&name.to_le_bytes());
            sh[4..8].copy_from_slice(&(if name == 1 { 3u32 } else { 1 }).to_le_bytes());
            sh[24..32].copy_from_slice(&off.to_le_bytes());
            sh[32..40].copy_from_slice(&len.to_le_bytes());
            f.extend_from_slice(&sh);
        }
        assert_eq!(f.len() as u64, end);
        f
    }

    /// Files that made libkmod 30 abort the process on an assertion while
    /// reading `.modinfo` are errors naming the file (kvcd reads `.modinfo`
    /// itself now, and must refuse them just as clearly); a well-formed one reads.
    #[test]
    fn modinfo_of_malformed_files_is_an_error_not_an_abort() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("m.ko");
        std::fs::write(&p, elf_with_modinfo("")).unwrap();
        let info = crate::kmod::ModInfo::read(&p).unwrap();
        assert_eq!(info.version.as_deref(), Some("1"));

        // The first input fuzzing found: e_shstrndx is 0 (SHN_UNDEF), so
        // there are no section names and no `.modinfo` to find.
        let found = include_bytes!("../../fuzz/regressions/elf/shstrndx-zero");
        for bytes in [found.to_vec(), elf(62, &[1; 20])] {
            std::fs::write(&p, bytes).unwrap();
            assert_eq!(
                crate::kmod::ModInfo::read(&p).unwrap(),
                crate::kmod::ModInfo::default()
            );
        }
        let mut past = elf_with_modinfo("");
        past[0x3e..0x40].copy_from_slice(&7u16.to_le_bytes());
        for (bytes, want) in [
            (
                past,
                "section name table index 7 is not one of its 3 sections",
            ),
            (
                elf_with_modinfo("names"),
                "the section name table starts at the end of the file",
            ),
            (
                elf_with_modinfo("modinfo"),
                "the .modinfo section starts at the end of the file",
            ),
        ] {
            std::fs::write(&p, bytes).unwrap();
            let e = format!("{:#}", crate::kmod::ModInfo::read(&p).unwrap_err());
            assert_eq!(e, format!("{}: not a module file: {want}", p.display()));
        }
    }

    /// A section header table larger than the file is an error before
    /// anything is allocated for it (65535 entries of 65535 bytes: 4 GiB).
    #[test]
    fn a_section_table_past_the_end_is_not_allocated() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("m.ko");
        let mut f = elf(62, &[1; 20]);
        f[0x3a..0x3c].copy_from_slice(&u16::MAX.to_le_bytes());
        f[0x3c..0x3e].copy_from_slice(&u16::MAX.to_le_bytes());
        std::fs::write(&p, f).unwrap();
        let e = format!("{:#}", ElfInfo::read(&p).unwrap_err());
        assert!(
            e.ends_with("not a module file: truncated section headers"),
            "{e}"
        );
    }

    #[test]
    fn live_note_file_parses() {
        let mut note = Vec::new();
        note.extend_from_slice(&4u32.to_le_bytes());
        note.extend_from_slice(&3u32.to_le_bytes());
        note.extend_from_slice(&NT_GNU_BUILD_ID.to_le_bytes());
        note.extend_from_slice(b"GNU\0");
        note.extend_from_slice(&[7, 8, 9, 0]);
        assert_eq!(gnu_build_id_in(&note, true), Some(vec![7, 8, 9]));
        assert_eq!(gnu_build_id_in(&note[..10], true), None);
    }

    #[test]
    fn arch_names_map_to_machines() {
        assert_eq!(machine_of("x86_64"), Some(62));
        assert_eq!(machine_of("aarch64"), Some(183));
        assert_eq!(machine_of("mips"), None);
    }
}
