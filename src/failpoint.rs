//! Named failpoints at every step boundary, for the crash tests.
//!
//! Built in only with the `failpoints` feature; without it [`hit`] does
//! nothing. With it, `KVCD_FAILPOINTS=NAME[#N]` kills the process with
//! SIGKILL at the Nth time (default the first) it reaches `NAME`, as a power
//! cut or `kill -9` would; `KVCD_FAILPOINTS_LOG=FILE` appends the name of
//! every failpoint reached to FILE, so a test can list them.

/// Marks a step boundary called `name`.
pub fn hit(name: &str) {
    if cfg!(feature = "failpoints") {
        active::hit(name);
    }
}

mod active {
    use std::io::Write as _;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicU32, Ordering};

    static SEEN: AtomicU32 = AtomicU32::new(0);
    static LOG: Mutex<()> = Mutex::new(());

    /// The failpoint to kill at and after how many hits of it.
    fn target() -> Option<(String, u32)> {
        let spec = std::env::var("KVCD_FAILPOINTS").ok()?;
        let (name, nth) = match spec.split_once('#') {
            Some((n, k)) => (n.to_owned(), k.parse().ok()?),
            None => (spec, 1),
        };
        Some((name, nth))
    }

    pub(super) fn hit(name: &str) {
        if let Some(path) = std::env::var_os("KVCD_FAILPOINTS_LOG") {
            let _guard = LOG.lock();
            if let Ok(mut f) = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
            {
                let _ = writeln!(f, "{name}");
            }
        }
        if let Some((want, nth)) = target() {
            if want == name && SEEN.fetch_add(1, Ordering::SeqCst) + 1 == nth {
                // SAFETY: kill(2) on our own pid has no memory-safety requirements.
                unsafe {
                    libc::kill(libc::getpid(), libc::SIGKILL);
                }
            }
        }
    }
}
