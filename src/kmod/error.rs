//! What a failed insert or remove means, by errno.

use std::fmt;

use nix::errno::Errno;
use serde::Serialize;

use super::ModName;

/// The operation that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum KmodOp {
    /// `init_module`/`finit_module`.
    Insert,
    /// `delete_module`.
    Remove,
}

/// The meaning of a failure, where callers branch on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum KmodErrorKind {
    /// The kernel has no loadable-module support (ENOSYS).
    NotSupported,
    /// No privilege, or loading is disabled (EPERM).
    NotPermitted,
    /// Signature enforcement rejected the module (EKEYREJECTED, ENOKEY).
    SignatureRejected,
    /// Not a module for this kernel (ENOEXEC).
    BadFormat,
    /// Already in the kernel (EEXIST).
    AlreadyLoaded,
    /// In use; removal refused (EAGAIN, EBUSY).
    InUse,
    /// Not in the kernel (ENOENT on remove).
    NotLoaded,
    /// Unknown symbol or a dependency missing (ENOENT on insert).
    UnknownSymbol,
    /// Bad parameter value or module data (EINVAL).
    Invalid,
    /// Anything else.
    Other,
}

/// A failed insert or remove, naming the module and what the errno means.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KmodError {
    /// What we tried.
    pub op: KmodOp,
    /// The module.
    pub module: ModName,
    /// What it means.
    pub kind: KmodErrorKind,
    /// The raw errno name, e.g. `EKEYREJECTED`.
    pub errno: String,
}

impl KmodError {
    /// Classifies `errno` for `op` on `module`.
    pub fn new(op: KmodOp, module: &ModName, errno: Errno) -> Self {
        use KmodErrorKind as K;
        let kind = match (op, errno) {
            (_, Errno::ENOSYS) => K::NotSupported,
            (_, Errno::EPERM) => K::NotPermitted,
            (KmodOp::Insert, Errno::EKEYREJECTED | Errno::ENOKEY) => K::SignatureRejected,
            (KmodOp::Insert, Errno::ENOEXEC) => K::BadFormat,
            (KmodOp::Insert, Errno::EEXIST) => K::AlreadyLoaded,
            (KmodOp::Insert, Errno::ENOENT) => K::UnknownSymbol,
            (KmodOp::Insert, Errno::EINVAL) => K::Invalid,
            (KmodOp::Remove, Errno::EAGAIN | Errno::EBUSY) => K::InUse,
            (KmodOp::Remove, Errno::ENOENT) => K::NotLoaded,
            _ => K::Other,
        };
        Self {
            op,
            module: module.clone(),
            kind,
            errno: format!("{errno:?}"),
        }
    }

    fn meaning(&self) -> &'static str {
        use KmodErrorKind as K;
        match (self.op, self.kind) {
            (_, K::NotSupported) => {
                "this kernel cannot load or unload modules (built without loadable module support)"
            }
            (_, K::NotPermitted) => {
                "not permitted: needs root with CAP_SYS_MODULE, and module loading must not be disabled (kernel.modules_disabled, lockdown)"
            }
            (_, K::SignatureRejected) => {
                "the kernel enforces module signatures (module.sig_enforce=1 or Secure Boot) and rejected this module: sign it with a key the kernel trusts"
            }
            (_, K::BadFormat) => {
                "invalid module format: it was built for another kernel (vermagic or symbol versions) or architecture"
            }
            (_, K::AlreadyLoaded) => "a module with this name is already loaded",
            (_, K::UnknownSymbol) => {
                "the kernel could not resolve a symbol it needs or an unknown parameter was given (see the kernel log)"
            }
            (_, K::Invalid) => {
                "the kernel refused a parameter value or the module data (see the kernel log)"
            }
            (_, K::InUse) => "the module is in use",
            (_, K::NotLoaded) => "the module is not loaded",
            (_, K::Other) => "unexpected error",
        }
    }
}

impl fmt::Display for KmodError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verb = match self.op {
            KmodOp::Insert => "inserting",
            KmodOp::Remove => "removing",
        };
        write!(
            f,
            "{verb} module {}: {} ({})",
            self.module,
            self.meaning(),
            self.errno
        )
    }
}

impl std::error::Error for KmodError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_meanings_name_the_module() {
        let m = ModName::parse("simple-kmod").unwrap();
        let e = KmodError::new(KmodOp::Insert, &m, Errno::EKEYREJECTED);
        assert_eq!(e.kind, KmodErrorKind::SignatureRejected);
        let s = e.to_string();
        assert!(
            s.starts_with("inserting module simple_kmod: the kernel enforces module signatures"),
            "{s}"
        );
        assert!(s.ends_with("(EKEYREJECTED)"), "{s}");
        assert_eq!(
            KmodError::new(KmodOp::Insert, &m, Errno::ENOSYS).kind,
            KmodErrorKind::NotSupported
        );
        assert_eq!(
            KmodError::new(KmodOp::Insert, &m, Errno::EPERM).kind,
            KmodErrorKind::NotPermitted
        );
        assert_eq!(
            KmodError::new(KmodOp::Insert, &m, Errno::ENOEXEC).kind,
            KmodErrorKind::BadFormat
        );
        assert_eq!(
            KmodError::new(KmodOp::Insert, &m, Errno::EEXIST).kind,
            KmodErrorKind::AlreadyLoaded
        );
        assert_eq!(
            KmodError::new(KmodOp::Remove, &m, Errno::EAGAIN).kind,
            KmodErrorKind::InUse
        );
        assert_eq!(
            KmodError::new(KmodOp::Remove, &m, Errno::EBUSY).kind,
            KmodErrorKind::InUse
        );
        assert_eq!(
            KmodError::new(KmodOp::Remove, &m, Errno::ENOENT).kind,
            KmodErrorKind::NotLoaded
        );
        assert_eq!(
            KmodError::new(KmodOp::Insert, &m, Errno::ENOENT).kind,
            KmodErrorKind::UnknownSymbol
        );
        let s = KmodError::new(KmodOp::Remove, &m, Errno::EAGAIN).to_string();
        assert_eq!(
            s,
            "removing module simple_kmod: the module is in use (EAGAIN)"
        );
    }
}
