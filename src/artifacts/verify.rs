//! Checks module files against the target kernel and the config before any
//! insert, so a mismatch is our clear error rather than a kernel message.

use std::fs;
use std::io::{BufRead as _, BufReader};
use std::path::Path;

use anyhow::{Result, bail};

use crate::kernel::KernelRelease;
use crate::kmod::elf::{ElfInfo, machine_name, machine_of};
use crate::kmod::{ModInfo, ModuleFile};

/// What the target kernel's own modules say about themselves: read from the
/// first entry of its `modules.dep` (only that line and that file are read).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reference {
    /// The vermagic of the kernel's own modules.
    pub vermagic: Option<String>,
    /// Their ELF machine.
    pub machine: Option<u16>,
}

impl Reference {
    /// Reads the reference module of the host tree `host_tree` (`MODULES/KERNEL`); empty when there is none.
    pub fn of_tree(host_tree: &Path) -> Self {
        let first = fs::File::open(host_tree.join("modules.dep"))
            .ok()
            .and_then(|dep| {
                let mut line = String::new();
                BufReader::new(dep).read_line(&mut line).ok()?;
                Some(line.split(':').next()?.trim().to_owned())
            })
            .filter(|f| !f.is_empty());
        let Some(elf) = first.and_then(|f| ElfInfo::read(&host_tree.join(f)).ok()) else {
            return Self::default();
        };
        Self {
            vermagic: ModInfo::of(&elf).vermagic,
            machine: Some(elf.machine),
        }
    }
}

/// Refuses a module built for another architecture than the target kernel's
/// own modules (`reference`), or, when those cannot be read, than `arch` (as
/// `uname -m` names it).
pub fn check_machine(
    file: &ModuleFile,
    elf: &ElfInfo,
    reference: &Reference,
    kernel: &KernelRelease,
    arch: &str,
) -> Result<()> {
    let (want, what) = match reference.machine {
        Some(m) => (
            Some(m),
            format!("kernel {kernel}'s own modules are {}", machine_name(m)),
        ),
        None => (machine_of(arch), format!("this kernel runs on {arch}")),
    };
    if want.is_some_and(|w| elf.machine != w) {
        bail!(
            "module {} ({}) is built for {}, but {what}",
            file.name,
            file.path.display(),
            machine_name(elf.machine),
        );
    }
    Ok(())
}

/// Checks one of our module files; `expected_version` is the config's `version` for configured modules.
pub fn check(
    file: &ModuleFile,
    info: &ModInfo,
    kernel: &KernelRelease,
    reference: Option<&str>,
    expected_version: Option<&str>,
) -> Result<()> {
    let Some(vermagic) = info.vermagic.as_deref() else {
        bail!(
            "module {} ({}) has no vermagic: not a module built for a Linux kernel",
            file.name,
            file.path.display()
        );
    };
    let release = info.vermagic_release().unwrap_or_default();
    if release != kernel.as_str() {
        bail!(
            "module {} ({}) was built for kernel {release}, but the target kernel is {kernel} (vermagic {:?})",
            file.name,
            file.path.display(),
            vermagic.trim_end()
        );
    }
    if let Some(reference) = reference {
        let flags = |v: &str| v.split_whitespace().skip(1).collect::<Vec<_>>().join(" ");
        if flags(vermagic) != flags(reference) {
            bail!(
                "module {} ({}) was built with kernel options {:?}, but kernel {kernel}'s modules have {:?}",
                file.name,
                file.path.display(),
                flags(vermagic),
                flags(reference)
            );
        }
    }
    if let (Some(want), Some(have)) = (expected_version, info.version.as_deref()) {
        if want != have {
            bail!(
                "module {} ({}) is version {have}, but the config expects version {want}",
                file.name,
                file.path.display()
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kmod::ModName;

    fn file() -> ModuleFile {
        ModuleFile {
            name: ModName::parse("m").unwrap(),
            path: "/x/m.ko".into(),
            in_tree: false,
        }
    }

    #[test]
    fn another_architecture_is_refused_by_name() {
        let elf = |machine| ElfInfo {
            machine,
            is_64: true,
            build_id: None,
            modinfo: Vec::new(),
        };
        let k = KernelRelease::parse("6.1.0-57-amd64").unwrap();
        let none = Reference::default();
        assert!(check_machine(&file(), &elf(62), &none, &k, "x86_64").is_ok());
        assert_eq!(
            check_machine(&file(), &elf(183), &none, &k, "x86_64")
                .unwrap_err()
                .to_string(),
            "module m (/x/m.ko) is built for aarch64, but this kernel runs on x86_64"
        );
        // An architecture kvcd does not know is not guessed at.
        assert!(check_machine(&file(), &elf(183), &none, &k, "mips").is_ok());
        // The target kernel's own modules decide, not the running machine.
        let arm = Reference {
            vermagic: None,
            machine: Some(183),
        };
        assert!(check_machine(&file(), &elf(183), &arm, &k, "x86_64").is_ok());
        assert_eq!(
            check_machine(&file(), &elf(62), &arm, &k, "x86_64")
                .unwrap_err()
                .to_string(),
            "module m (/x/m.ko) is built for x86_64, but kernel 6.1.0-57-amd64's own modules are aarch64"
        );
    }

    fn info(vermagic: &str, version: Option<&str>) -> ModInfo {
        ModInfo {
            vermagic: Some(vermagic.into()),
            version: version.map(Into::into),
            srcversion: None,
            depends: Vec::new(),
        }
    }

    #[test]
    fn release_flags_and_version() {
        let k = KernelRelease::parse("6.1.0-27-amd64").unwrap();
        let good = info(
            "6.1.0-27-amd64 SMP preempt mod_unload modversions ",
            Some("1.2.0"),
        );
        let reference = Some("6.1.0-27-amd64 SMP preempt mod_unload modversions ");
        check(&file(), &good, &k, reference, Some("1.2.0")).unwrap();
        check(&file(), &good, &k, None, None).unwrap();

        let e = check(&file(), &info("6.1.0-28-amd64 SMP", None), &k, None, None).unwrap_err();
        assert!(
            e.to_string().contains(
                "was built for kernel 6.1.0-28-amd64, but the target kernel is 6.1.0-27-amd64"
            ),
            "{e}"
        );

        let e = check(
            &file(),
            &info("6.1.0-27-amd64 SMP mod_unload ", None),
            &k,
            reference,
            None,
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("kernel options \"SMP mod_unload\""),
            "{e}"
        );

        let e = check(&file(), &good, &k, reference, Some("1.3.0")).unwrap_err();
        assert!(
            e.to_string()
                .contains("is version 1.2.0, but the config expects version 1.3.0"),
            "{e}"
        );

        let none = ModInfo::default();
        let e = check(&file(), &none, &k, None, None).unwrap_err();
        assert!(e.to_string().contains("has no vermagic"), "{e}");
    }
}
