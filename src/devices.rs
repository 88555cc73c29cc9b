//! Hardware gating: `[match]` in a module config names the devices its
//! driver is for, by PCI ids (`8086:1592`, `8086:*`) or modalias patterns
//! (`pci:v00008086d00001592*`). On a node without a matching device the
//! config is `unsupported`, not failed; the daemon loads it when one
//! appears (kernel uevents). Devices are read from sysfs: every
//! `/sys/bus/*/devices/*/modalias`, and PCI vendor and device ids.

use std::path::{Path, PathBuf};

use serde::Serialize;

/// The devices a config's driver is for; matches when any pattern does.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DeviceMatch {
    /// PCI `VENDOR:DEVICE` patterns, 4 hex digits each or `*`.
    pub pci: Vec<String>,
    /// modalias glob patterns (`*` any run, `?` one character).
    pub modalias: Vec<String>,
}

/// One device as sysfs shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    /// Its sysfs path, for messages.
    pub path: String,
    /// Its modalias, when it has one.
    pub modalias: Option<String>,
    /// PCI vendor and device id, for a PCI device.
    pub pci: Option<(u16, u16)>,
}

/// Checks one `[match] pci` entry: `VVVV:DDDD`, each part 4 hex digits or `*`.
pub fn check_pci(p: &str) -> Result<(), String> {
    let ok = |s: &str| s == "*" || (s.len() == 4 && s.chars().all(|c| c.is_ascii_hexdigit()));
    match p.split_once(':') {
        Some((v, d)) if ok(v) && ok(d) => Ok(()),
        _ => Err(format!(
            "expected a PCI id VENDOR:DEVICE, 4 hex digits each or * (e.g. \"8086:1592\", \"10de:*\"), found {p:?}"
        )),
    }
}

/// True when `text` matches the glob `pat` (`*`: any run, `?`: one character).
pub fn glob(pat: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pat.chars().collect(), text.chars().collect());
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

impl DeviceMatch {
    /// True when no pattern is given (the config applies to every node).
    pub fn is_empty(&self) -> bool {
        self.pci.is_empty() && self.modalias.is_empty()
    }

    /// The first of `devices` that a pattern matches.
    pub fn find<'d>(&self, devices: &'d [Device]) -> Option<&'d Device> {
        devices.iter().find(|d| {
            let pci = d.pci.is_some_and(|(v, dev)| {
                self.pci.iter().any(|p| {
                    let Some((pv, pd)) = p.split_once(':') else {
                        return false;
                    };
                    let part = |pat: &str, id: u16| {
                        pat == "*" || u16::from_str_radix(pat, 16).is_ok_and(|x| x == id)
                    };
                    part(pv, v) && part(pd, dev)
                })
            });
            pci || d
                .modalias
                .as_deref()
                .is_some_and(|a| self.modalias.iter().any(|p| glob(p, a)))
        })
    }

    /// What the patterns are, for messages: `pci 8086:1592, modalias pci:v…`.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if !self.pci.is_empty() {
            parts.push(format!("pci {}", self.pci.join(", ")));
        }
        if !self.modalias.is_empty() {
            parts.push(format!("modalias {}", self.modalias.join(", ")));
        }
        parts.join("; ")
    }
}

/// Where devices are read: `/sys`; with the `failpoints` feature,
/// `KVCD_SYSFS=DIR` reads a made-up tree instead (tests).
pub fn sysfs_root() -> PathBuf {
    #[cfg(feature = "failpoints")]
    if let Some(d) = std::env::var_os("KVCD_SYSFS") {
        return PathBuf::from(d);
    }
    PathBuf::from("/sys")
}

/// Every device under `sysfs` (normally `/sys`) with a modalias or PCI ids.
pub fn scan(sysfs: &Path) -> Vec<Device> {
    let mut out = Vec::new();
    let Ok(buses) = std::fs::read_dir(sysfs.join("bus")) else {
        return out;
    };
    for bus in buses.flatten() {
        let is_pci = bus.file_name() == "pci";
        let Ok(devs) = std::fs::read_dir(bus.path().join("devices")) else {
            continue;
        };
        for d in devs.flatten() {
            let p = d.path();
            let read = |f: &str| {
                std::fs::read_to_string(p.join(f))
                    .ok()
                    .map(|s| s.trim().to_owned())
            };
            let hex = |f: &str| {
                read(f).and_then(|s| u16::from_str_radix(s.trim_start_matches("0x"), 16).ok())
            };
            let pci = if is_pci {
                hex("vendor").zip(hex("device"))
            } else {
                None
            };
            let modalias = read("modalias").filter(|s| !s.is_empty());
            if pci.is_some() || modalias.is_some() {
                out.push(Device {
                    path: p.display().to_string(),
                    modalias,
                    pci,
                });
            }
        }
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    out
}

/// Watches the kernel's uevents: `on_add` is called after a device is
/// added or bound to a driver. Runs on its own thread until the socket
/// fails; an error opening it is returned (the daemon then only sees
/// devices at start and on a config reload).
pub fn watch_uevents(on_add: impl Fn() + Send + 'static) -> anyhow::Result<()> {
    use nix::sys::socket::{
        AddressFamily, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, recv, socket,
    };
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkKObjectUEvent,
    )?;
    // Group 1: the kernel's own uevents.
    bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &NetlinkAddr::new(0, 1),
    )?;
    std::thread::Builder::new()
        .name("kvcd-uevents".into())
        .spawn(move || {
            let mut buf = vec![0u8; 8192];
            loop {
                match recv(
                    std::os::fd::AsRawFd::as_raw_fd(&fd),
                    &mut buf,
                    nix::sys::socket::MsgFlags::empty(),
                ) {
                    Ok(n) => {
                        let head = &buf[..n.min(buf.len())];
                        if head.starts_with(b"add@") || head.starts_with(b"bind@") {
                            on_add();
                        }
                    }
                    Err(nix::errno::Errno::EINTR | nix::errno::Errno::ENOBUFS) => {}
                    Err(e) => {
                        tracing::warn!("reading kernel uevents: {e}; devices that appear from now on are seen at the next config reload");
                        return;
                    }
                }
            }
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob(
            "pci:v00008086d00001592*",
            "pci:v00008086d00001592sv00008086sd00000002bc02sc00i00"
        ));
        assert!(!glob(
            "pci:v00008086d00001592*",
            "pci:v00008086d00001593sv0"
        ));
        assert!(glob(
            "usb:v0BDAp8153*",
            "usb:v0BDAp8153d3100dc00dsc00dp00icFFisc00ip00in00"
        ));
        assert!(glob("a?c*", "abcdef"));
        assert!(glob("*", ""));
        assert!(!glob("a*b", "ac"));
    }

    #[test]
    fn pci_ids_check_and_match() {
        assert!(check_pci("8086:1592").is_ok());
        assert!(check_pci("10de:*").is_ok());
        assert!(check_pci("8086").is_err());
        assert!(check_pci("80861:1592").is_err());
        assert!(check_pci("zzzz:1592").is_err());
        let devs = vec![
            Device {
                path: "/sys/bus/pci/devices/0000:00:01.0".into(),
                modalias: Some("pci:v00008086d00007113sv0".into()),
                pci: Some((0x8086, 0x7113)),
            },
            Device {
                path: "/sys/bus/usb/devices/1-1".into(),
                modalias: Some("usb:v0BDAp8153d3100".into()),
                pci: None,
            },
        ];
        let m = |pci: &[&str], alias: &[&str]| DeviceMatch {
            pci: pci.iter().map(|s| (*s).to_owned()).collect(),
            modalias: alias.iter().map(|s| (*s).to_owned()).collect(),
        };
        assert_eq!(
            m(&["8086:7113"], &[]).find(&devs).unwrap().path,
            devs[0].path
        );
        assert_eq!(m(&["8086:*"], &[]).find(&devs).unwrap().path, devs[0].path);
        assert!(m(&["8086:1592"], &[]).find(&devs).is_none());
        assert_eq!(
            m(&["dead:beef"], &["usb:v0BDAp8153*"])
                .find(&devs)
                .unwrap()
                .path,
            devs[1].path
        );
        assert_eq!(
            m(&["8086:1592"], &["pci:v*"]).describe(),
            "pci 8086:1592; modalias pci:v*"
        );
    }

    #[test]
    fn sysfs_is_scanned() {
        let d = tempfile::tempdir().unwrap();
        let pci = d.path().join("bus/pci/devices/0000:00:01.0");
        std::fs::create_dir_all(&pci).unwrap();
        std::fs::write(pci.join("vendor"), "0x8086\n").unwrap();
        std::fs::write(pci.join("device"), "0x7113\n").unwrap();
        std::fs::write(pci.join("modalias"), "pci:v00008086d00007113sv00\n").unwrap();
        let usb = d.path().join("bus/usb/devices/usb1");
        std::fs::create_dir_all(&usb).unwrap();
        std::fs::create_dir_all(d.path().join("bus/usb/devices/nothing")).unwrap();
        std::fs::write(usb.join("modalias"), "usb:v1D6Bp0002\n").unwrap();
        let devs = scan(d.path());
        assert_eq!(devs.len(), 2, "{devs:?}");
        assert_eq!(devs[0].pci, Some((0x8086, 0x7113)));
        assert_eq!(devs[1].modalias.as_deref(), Some("usb:v1D6Bp0002"));
    }
}
