//! What the running kernel trusts for module signatures: the keys in its
//! system keyrings (`.builtin_trusted_keys`, `.secondary_trusted_keys`,
//! `.machine` for machine-owner keys enrolled through shim, `.platform` for
//! UEFI `db`), its lockdown mode, `module.sig_enforce`, and whether the
//! firmware booted with Secure Boot. Read from `/proc/keys`, the `keyctl`
//! system call, securityfs, sysfs and efivarfs; every part that cannot be
//! read is reported as unknown, never guessed.

use std::path::Path;

use serde::Serialize;

/// The keyrings whose keys the kernel may verify module signatures with.
pub const KEYRINGS: [&str; 4] = [
    ".builtin_trusted_keys",
    ".secondary_trusted_keys",
    ".machine",
    ".platform",
];

/// `SecureBoot` variable of the EFI global variable GUID, in efivarfs.
const SECURE_BOOT_VAR: &str =
    "/sys/firmware/efi/efivars/SecureBoot-8be4df61-93ca-11d2-aa0d-00e098032b8c";

/// One system keyring and the descriptions of the keys in it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Keyring {
    /// `.machine`.
    pub name: String,
    /// Key descriptions as the kernel forms them: `NAME: KEYID-HEX`.
    pub keys: Vec<String>,
}

/// What the running kernel trusts and enforces.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct KernelTrust {
    /// The system keyrings found, in [`KEYRINGS`] order.
    pub keyrings: Vec<Keyring>,
    /// Why the keyrings could not be read, if they could not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keyring_error: Option<String>,
    /// The active lockdown mode (`none`, `integrity`, `confidentiality`); none when unknown.
    pub lockdown: Option<String>,
    /// `module.sig_enforce`; none when the kernel has no module signing.
    pub sig_enforce: Option<bool>,
    /// Whether the firmware booted with Secure Boot on; none on a non-UEFI boot.
    pub secure_boot: Option<bool>,
}

impl KernelTrust {
    /// Reads the running kernel's trust.
    pub fn read() -> Self {
        let (keyrings, keyring_error) = match sys::keyrings() {
            Ok(k) => (k, None),
            Err(e) => (Vec::new(), Some(e)),
        };
        Self {
            keyrings,
            keyring_error,
            lockdown: std::fs::read_to_string("/sys/kernel/security/lockdown")
                .ok()
                .and_then(|s| lockdown_mode(&s)),
            sig_enforce: std::fs::read_to_string("/sys/module/module/parameters/sig_enforce")
                .ok()
                .map(|s| s.trim() == "Y"),
            secure_boot: read_secure_boot(Path::new(SECURE_BOOT_VAR)),
        }
    }

    /// Whether the kernel refuses modules it cannot verify: `module.sig_enforce`,
    /// or lockdown (which Secure Boot turns on); none when neither can be read.
    pub fn enforced(&self) -> Option<bool> {
        let locked = self
            .lockdown
            .as_deref()
            .map(|m| m == "integrity" || m == "confidentiality");
        match (self.sig_enforce, locked) {
            (Some(true), _) | (_, Some(true)) => Some(true),
            (None, None) => None,
            _ => Some(false),
        }
    }

    /// Why the kernel enforces signatures, for humans (`lockdown (integrity)`).
    pub fn enforced_by(&self) -> String {
        let mut why = Vec::new();
        // Set on the command line, or by the kernel itself under Secure Boot.
        if self.sig_enforce == Some(true) {
            why.push("sig_enforce".to_owned());
        }
        if let Some(m) = self.lockdown.as_deref().filter(|m| *m != "none") {
            why.push(format!("lockdown ({m})"));
        }
        match self.enforced() {
            Some(true) => format!("yes: {}", why.join(", ")),
            Some(false) => "no".to_owned(),
            None => "unknown".to_owned(),
        }
    }

    /// The keyrings holding a key whose description is `description` or
    /// ends with its key id (the kernel's `NAME: KEYID-HEX`).
    pub fn keyrings_with(&self, description: &str) -> Vec<String> {
        let id = description.rsplit_once(": ").map(|(_, id)| id);
        self.keyrings
            .iter()
            .filter(|k| {
                k.keys.iter().any(|d| {
                    d == description
                        || id.is_some_and(|id| d.rsplit_once(": ").is_some_and(|(_, i)| i == id))
                })
            })
            .map(|k| k.name.clone())
            .collect()
    }

    /// The keyrings holding a key of signer name `name` (the part before the
    /// key id in its description); what a module's signature names.
    pub fn keyrings_with_name(&self, name: &str) -> Vec<String> {
        self.keyrings
            .iter()
            .filter(|k| {
                k.keys
                    .iter()
                    .any(|d| d.rsplit_once(": ").is_some_and(|(n, _)| n == name))
            })
            .map(|k| k.name.clone())
            .collect()
    }
}

/// The bracketed mode of `/sys/kernel/security/lockdown` (`none [integrity] confidentiality`).
fn lockdown_mode(text: &str) -> Option<String> {
    let start = text.find('[')?;
    let end = text[start..].find(']')? + start;
    Some(text[start + 1..end].to_owned())
}

/// The `SecureBoot` EFI variable: 4 bytes of attributes, then 1 when on.
fn read_secure_boot(path: &Path) -> Option<bool> {
    if !Path::new("/sys/firmware/efi").is_dir() {
        return None;
    }
    let data = std::fs::read(path).ok()?;
    Some(data.get(4) == Some(&1))
}

/// One line of `/proc/keys`: serial, type and description.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ProcKey {
    serial: i32,
    kind: String,
    description: String,
}

/// Reads `/proc/keys` (only what the reader may view is listed).
fn parse_proc_keys(text: &str) -> Vec<ProcKey> {
    text.lines()
        .filter_map(|line| {
            let mut f = line.split_whitespace();
            let serial = i32::from_str_radix(f.next()?, 16).ok()?;
            let kind = f.nth(6)?.to_owned();
            // The type's own description follows the key's, after ": ".
            let rest = line.split_once(&format!(" {kind} "))?.1.trim_start();
            let description = rest.rsplit_once(": ").map_or(rest, |(d, _)| d).to_owned();
            Some(ProcKey {
                serial,
                kind,
                description,
            })
        })
        .collect()
}

/// `keyctl(2)` on the kernel's keyrings.
mod sys {
    use super::{KEYRINGS, Keyring, parse_proc_keys};

    /// `KEYCTL_DESCRIBE`.
    const DESCRIBE: libc::c_long = 6;
    /// `KEYCTL_READ`.
    const READ: libc::c_long = 11;

    /// Calls `keyctl(op, serial, buf, buf.len())` until the buffer is large enough.
    fn keyctl_buf(op: libc::c_long, serial: i32) -> Result<Vec<u8>, String> {
        let mut buf = vec![0u8; 4096];
        loop {
            // SAFETY: KEYCTL_READ and KEYCTL_DESCRIBE write at most
            // `buf.len()` bytes to `buf`, which is valid and writable for
            // that length; the other arguments are plain integers.
            let n = unsafe {
                libc::syscall(
                    libc::SYS_keyctl,
                    op,
                    libc::c_long::from(serial),
                    buf.as_mut_ptr(),
                    buf.len(),
                )
            };
            if n < 0 {
                return Err(std::io::Error::last_os_error().to_string());
            }
            let n = usize::try_from(n).map_err(|e| e.to_string())?;
            if n <= buf.len() {
                buf.truncate(n);
                return Ok(buf);
            }
            buf.resize(n, 0);
        }
    }

    /// The system keyrings and their keys.
    pub(super) fn keyrings() -> Result<Vec<Keyring>, String> {
        let text = std::fs::read_to_string("/proc/keys")
            .map_err(|e| format!("reading /proc/keys: {e}"))?;
        let keys = parse_proc_keys(&text);
        let mut out = Vec::new();
        for name in KEYRINGS {
            let Some(ring) = keys
                .iter()
                .find(|k| k.kind == "keyring" && k.description == name)
            else {
                continue;
            };
            let ids = keyctl_buf(READ, ring.serial)
                .map_err(|e| format!("reading keyring {name}: {e}"))?;
            let mut descriptions = Vec::new();
            for id in ids.chunks_exact(4) {
                let id = i32::from_ne_bytes([id[0], id[1], id[2], id[3]]);
                // "type;uid;gid;perm;description"
                let Ok(d) = keyctl_buf(DESCRIBE, id) else {
                    continue;
                };
                let d = String::from_utf8_lossy(&d);
                let d = d.trim_end_matches('\0');
                let mut parts = d.splitn(5, ';');
                if parts.next() == Some("asymmetric") {
                    if let Some(desc) = parts.nth(3) {
                        descriptions.push(desc.to_owned());
                    }
                }
            }
            out.push(Keyring {
                name: name.to_owned(),
                keys: descriptions,
            });
        }
        if out.is_empty() {
            return Err("no system keyring is listed in /proc/keys".to_owned());
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_keys_lines_parse() {
        let text = "\
3b6c2ad1 I------     1 perm 1f0b0000     0     0 keyring   .builtin_trusted_keys: 1
0e2c1d1b I------     1 perm 1f010000     0     0 asymmetric Build time autogenerated kernel key: 5ee1133114299: X509.rsa 661bdee5 []
04c5e018 I--Q---     2 perm 1f3f0000     0 65534 keyring   _uid.0: empty
";
        let k = parse_proc_keys(text);
        assert_eq!(k.len(), 3);
        assert_eq!(k[0].description, ".builtin_trusted_keys");
        assert_eq!(k[0].serial, 0x3b6c_2ad1);
        assert_eq!(k[1].kind, "asymmetric");
        assert_eq!(
            k[1].description,
            "Build time autogenerated kernel key: 5ee1133114299"
        );
    }

    #[test]
    fn lockdown_and_enforcement() {
        assert_eq!(
            lockdown_mode("none [integrity] confidentiality\n").as_deref(),
            Some("integrity")
        );
        let mut t = KernelTrust {
            lockdown: Some("integrity".into()),
            sig_enforce: Some(false),
            ..KernelTrust::default()
        };
        assert_eq!(t.enforced(), Some(true));
        assert_eq!(t.enforced_by(), "yes: lockdown (integrity)");
        t.lockdown = Some("none".into());
        assert_eq!(t.enforced(), Some(false));
        t.sig_enforce = None;
        t.lockdown = None;
        assert_eq!(t.enforced(), None);
    }

    #[test]
    fn keys_are_found_by_description_id_or_name() {
        let t = KernelTrust {
            keyrings: vec![
                Keyring {
                    name: ".builtin_trusted_keys".into(),
                    keys: vec!["Debian Secure Boot CA: 6ccece7e".into()],
                },
                Keyring {
                    name: ".machine".into(),
                    keys: vec!["kvcd test MOK: 00aa11".into()],
                },
            ],
            ..KernelTrust::default()
        };
        assert_eq!(t.keyrings_with("kvcd test MOK: 00aa11"), vec![".machine"]);
        assert_eq!(t.keyrings_with("another name: 00aa11"), vec![".machine"]);
        assert!(t.keyrings_with("kvcd test MOK: 00aa12").is_empty());
        assert_eq!(
            t.keyrings_with_name("Debian Secure Boot CA"),
            vec![".builtin_trusted_keys"]
        );
        assert!(t.keyrings_with_name("kvcd").is_empty());
    }
}
