//! The kmods-via-containers framework contract, so existing `NAME-lib.sh`
//! libraries run unmodified: default functions that say they are
//! unimplemented and fail, the `kvc_c_*` helpers, the `KVC_*` variables,
//! `set -eu`, and the libraries sourced in order (later definitions win).
//! kvcd supplies the dispatcher; everything user-provided reaches bash as
//! arguments, never as script text.
//!
//! Each `kvc_c_*` helper appends one line to the file named by
//! [`CALLS_ENV`] (when set) before it runs the container runtime, so kvcd
//! can count the podman calls a library made through them ([`CallLog`]).
//! Calls a library makes to podman directly are not counted.

use std::fs;
use std::io::ErrorKind;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, Result};

/// Environment variable naming the file each `kvc_c_*` helper appends a line to (unset: no counting).
pub const CALLS_ENV: &str = "KVCD_KVC_CALLS";
/// Environment variable with a `KEY=VALUE` label `kvc_c_run` puts on its containers (unset: none).
pub const RUN_LABEL_ENV: &str = "KVCD_KVC_RUN_LABEL";
/// The label key of [`RUN_LABEL_ENV`]; its value names one library action.
pub const RUN_LABEL_KEY: &str = "org.kvcd.kvc-action";

/// A KVC action, as the dispatcher names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvcAction {
    /// `build_kmods`.
    Build,
    /// `load_kmods`.
    Load,
    /// `unload_kmods`.
    Unload,
    /// `wrapper TOOL ARGS…`.
    Wrapper,
}

impl KvcAction {
    /// The action's name (`KVC_ACTION`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Build => "build",
            Self::Load => "load",
            Self::Unload => "unload",
            Self::Wrapper => "wrapper",
        }
    }

    /// The library function the action calls (`build_kmods`, `load_kmods`, `unload_kmods`, `wrapper`).
    pub fn function(self) -> &'static str {
        match self {
            Self::Build => "build_kmods",
            Self::Load => "load_kmods",
            Self::Unload => "unload_kmods",
            Self::Wrapper => "wrapper",
        }
    }
}

/// The dispatcher. Arguments: ACTION NAME KERNEL NLIBS LIB… [ARGS…].
const DISPATCHER: &str = r#"set -eu
KVC_ACTION=$1 KVC_SOFTWARE_NAME=$2 KVC_KVER=$3 kvcd_nlibs=$4
shift 4
kvcd_libs=()
while [ "$kvcd_nlibs" -gt 0 ]; do kvcd_libs+=("$1"); shift; kvcd_nlibs=$((kvcd_nlibs - 1)); done
: "${KVC_CONTAINER_RUNTIME:=podman}"
export KVC_ACTION KVC_SOFTWARE_NAME KVC_KVER KVC_CONTAINER_RUNTIME
kvcd_runtime=$KVC_CONTAINER_RUNTIME

build_kmods() { echo "build_kmods is unimplemented for ${KVC_SOFTWARE_NAME}!" >&2; return 1; }
load_kmods() { echo "load_kmods is unimplemented for ${KVC_SOFTWARE_NAME}!" >&2; return 1; }
unload_kmods() { echo "unload_kmods is unimplemented for ${KVC_SOFTWARE_NAME}!" >&2; return 1; }
wrapper() { echo "wrapper is unimplemented for ${KVC_SOFTWARE_NAME}!" >&2; return 1; }

# One line per runtime call, for kvcd's count; never on stdout (callers capture it).
kvcd_count() { if [ -n "${KVCD_KVC_CALLS:-}" ]; then echo "$1" >>"$KVCD_KVC_CALLS" || :; fi; }
# The label lets kvcd find a container whose client it had to kill at the timeout.
kvc_c_run() { kvcd_count run; "$KVC_CONTAINER_RUNTIME" run -i --rm ${KVCD_KVC_RUN_LABEL:+--label "$KVCD_KVC_RUN_LABEL"} "$@"; }
kvc_c_build() { kvcd_count build; "$KVC_CONTAINER_RUNTIME" build "$@"; }
kvc_c_images() { kvcd_count images; "$KVC_CONTAINER_RUNTIME" images "$@"; }
kvc_c_rmi() { kvcd_count rmi; "$KVC_CONTAINER_RUNTIME" rmi "$@"; }

# Like KVC: each location is sourced when the library is there; one must be.
kvcd_sourced=0
for kvcd_lib in "${kvcd_libs[@]}"; do
    if [ -e "$kvcd_lib" ]; then
        # shellcheck disable=SC1090
        source "$kvcd_lib"
        kvcd_sourced=$((kvcd_sourced + 1))
    fi
done
if [ "$kvcd_sourced" -eq 0 ]; then
    echo "no KVC library for ${KVC_SOFTWARE_NAME}: none of ${kvcd_libs[*]} exists" >&2
    exit 1
fi
if [ "$KVC_CONTAINER_RUNTIME" != "$kvcd_runtime" ]; then
    echo "the library set KVC_CONTAINER_RUNTIME=${KVC_CONTAINER_RUNTIME}; its kvc_c_* helpers run that instead of ${kvcd_runtime}" >&2
fi

case "$KVC_ACTION" in
    build) build_kmods ;;
    load) load_kmods ;;
    unload) unload_kmods ;;
    wrapper) wrapper "$@" ;;
esac
"#;

/// The libraries that exist, in sourcing order: `/usr/local/lib/kvc` before `/usr/lib/kvc`.
pub fn existing_libraries(name: &str, roots: &[&Path]) -> Vec<PathBuf> {
    roots
        .iter()
        .map(|r| r.join(format!("{name}-lib.sh")))
        .filter(|p| p.is_file())
        .collect()
}

/// A `bash` command running `action` of module config `name` for `kernel`
/// with `libraries` (sourced in order) and `args` (for `wrapper`).
pub fn command(
    libraries: &[PathBuf],
    action: KvcAction,
    name: &str,
    kernel: &str,
    runtime: &Path,
    args: &[String],
) -> Command {
    let mut c = Command::new("bash");
    c.arg("-c")
        .arg(DISPATCHER)
        .arg("kvcd-kvc")
        .arg(action.as_str())
        .arg(name)
        .arg(kernel)
        .arg(libraries.len().to_string())
        .args(libraries)
        .args(args)
        .env("KVC_CONTAINER_RUNTIME", runtime);
    c
}

/// A private file the dispatcher's `kvc_c_*` helpers count their runtime calls in; removed when dropped.
#[derive(Debug)]
pub struct CallLog {
    path: PathBuf,
}

impl CallLog {
    /// A new, empty call log in `base` (kvcd's runtime directory: a helper
    /// in a transient unit sees it, where kvcd's private `/tmp` it would not).
    pub fn new(base: &Path) -> Result<Self> {
        fs::create_dir_all(base).with_context(|| format!("creating {}", base.display()))?;
        for n in 0..1000 {
            let path = base.join(format!("kvcd-kvc-calls.{}.{n}", std::process::id()));
            match fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
            {
                Ok(_) => return Ok(Self { path }),
                Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
                Err(e) => {
                    return Err(e).with_context(|| format!("creating {}", path.display()));
                }
            }
        }
        anyhow::bail!("no free call log name in {}", base.display())
    }

    /// Makes the helpers of `cmd` (a [`command`]) count into this log.
    pub fn attach(&self, cmd: &mut Command) {
        cmd.env(CALLS_ENV, &self.path);
    }

    /// How many runtime calls the helpers made so far (0 when the file is unreadable).
    pub fn count(&self) -> usize {
        fs::read_to_string(&self.path).map_or(0, |t| t.lines().filter(|l| !l.is_empty()).count())
    }
}

impl Drop for CallLog {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn out(c: &mut Command) -> (i32, String, String) {
        let o = c.output().unwrap();
        (
            o.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    }

    #[test]
    fn contract_defaults_variables_helpers_and_precedence() {
        let t = tempfile::tempdir().unwrap();
        let local = t.path().join("local-lib.sh");
        let usr = t.path().join("usr-lib.sh");
        fs::write(
            &local,
            "build_kmods() { echo \"local build $KVC_ACTION $KVC_SOFTWARE_NAME $KVC_KVER $KVC_CONTAINER_RUNTIME\"; }\nload_kmods() { echo local-load; }\n",
        )
        .unwrap();
        fs::write(
            &usr,
            "load_kmods() { echo usr-load; kvc_c_images --quiet x; }\nwrapper() { printf '<%s>' \"$@\"; }\n",
        )
        .unwrap();
        let libs = vec![local, usr];
        let rt = Path::new("/bin/echo");

        let (code, o, _) = out(&mut command(
            &libs,
            KvcAction::Build,
            "simple-kmod",
            "6.1.0-1-amd64",
            rt,
            &[],
        ));
        assert_eq!(code, 0);
        assert_eq!(o, "local build build simple-kmod 6.1.0-1-amd64 /bin/echo\n");

        // The later library wins; helpers call the runtime with KVC's arguments.
        let (code, o, _) = out(&mut command(
            &libs,
            KvcAction::Load,
            "simple-kmod",
            "k",
            rt,
            &[],
        ));
        assert_eq!(code, 0);
        assert_eq!(o, "usr-load\nimages --quiet x\n");

        let (code, _, e) = out(&mut command(
            &libs,
            KvcAction::Unload,
            "simple-kmod",
            "k",
            rt,
            &[],
        ));
        assert_eq!(code, 1);
        assert_eq!(e, "unload_kmods is unimplemented for simple-kmod!\n");

        let args = vec!["tool".to_owned(), "a b".to_owned(), "$(id)".to_owned()];
        let (code, o, _) = out(&mut command(
            &libs,
            KvcAction::Wrapper,
            "simple-kmod",
            "k",
            rt,
            &args,
        ));
        assert_eq!(code, 0);
        assert_eq!(o, "<tool><a b><$(id)>");
    }

    #[test]
    fn missing_locations_are_skipped_but_one_must_exist() {
        let t = tempfile::tempdir().unwrap();
        let lib = t.path().join("x-lib.sh");
        fs::write(&lib, "load_kmods() { echo loaded; }\n").unwrap();
        let libs = vec![t.path().join("absent-lib.sh"), lib];
        let (code, o, _) = out(&mut command(
            &libs,
            KvcAction::Load,
            "x",
            "k",
            Path::new("podman"),
            &[],
        ));
        assert_eq!((code, o.as_str()), (0, "loaded\n"));
        let none = vec![t.path().join("absent-lib.sh")];
        let (code, _, e) = out(&mut command(
            &none,
            KvcAction::Load,
            "x",
            "k",
            Path::new("podman"),
            &[],
        ));
        assert_eq!(code, 1);
        assert!(e.starts_with("no KVC library for x: none of "), "{e}");
    }

    #[test]
    fn set_eu_fails_the_action() {
        let t = tempfile::tempdir().unwrap();
        let lib = t.path().join("x-lib.sh");
        fs::write(
            &lib,
            "load_kmods() { false; echo not reached; }\nbuild_kmods() { echo \"$UNSET_VAR\"; }\n",
        )
        .unwrap();
        let libs = vec![lib];
        let (code, o, _) = out(&mut command(
            &libs,
            KvcAction::Load,
            "x",
            "k",
            Path::new("podman"),
            &[],
        ));
        assert_eq!((code, o.as_str()), (1, ""));
        let (code, _, e) = out(&mut command(
            &libs,
            KvcAction::Build,
            "x",
            "k",
            Path::new("podman"),
            &[],
        ));
        assert_eq!(code, 1);
        assert!(e.contains("UNSET_VAR: unbound variable"), "{e}");
    }

    #[test]
    fn helpers_count_their_calls_even_from_command_substitutions() {
        let t = tempfile::tempdir().unwrap();
        let lib = t.path().join("x-lib.sh");
        fs::write(
            &lib,
            "build_kmods() { local f; f=$(kvc_c_images --quiet x); echo \"[$f]\"; kvc_c_build -t x .; kvc_c_run x true; kvc_c_rmi x; }\n",
        )
        .unwrap();
        let log = CallLog::new(t.path()).unwrap();
        let mut c = command(
            std::slice::from_ref(&lib),
            KvcAction::Build,
            "x",
            "k",
            Path::new("/bin/echo"),
            &[],
        );
        log.attach(&mut c);
        let (code, o, _) = out(&mut c);
        assert_eq!(code, 0);
        // The count does not leak into what the library captures.
        assert_eq!(
            o,
            "[images --quiet x]\nbuild -t x .\nrun -i --rm x true\nrmi x\n"
        );
        assert_eq!(log.count(), 4);
        let path = log.path.clone();
        drop(log);
        assert!(!path.exists());

        // With a label, kvc_c_run puts it on the container.
        let mut c = command(
            std::slice::from_ref(&lib),
            KvcAction::Build,
            "x",
            "k",
            Path::new("/bin/echo"),
            &[],
        );
        c.env(RUN_LABEL_ENV, "org.kvcd.kvc-action=a b");
        let (code, o, _) = out(&mut c);
        assert_eq!(code, 0);
        assert!(
            o.contains("\nrun -i --rm --label org.kvcd.kvc-action=a b x true\n"),
            "{o}"
        );

        // Without a log nothing is counted and nothing fails.
        let (code, _, _) = out(&mut command(
            &[lib],
            KvcAction::Build,
            "x",
            "k",
            Path::new("/bin/echo"),
            &[],
        ));
        assert_eq!(code, 0);
    }

    #[test]
    fn a_library_that_changes_the_runtime_is_named() {
        let t = tempfile::tempdir().unwrap();
        let lib = t.path().join("x-lib.sh");
        fs::write(
            &lib,
            "KVC_CONTAINER_RUNTIME=/bin/true\nbuild_kmods() { kvc_c_images; }\n",
        )
        .unwrap();
        let (code, o, e) = out(&mut command(
            &[lib],
            KvcAction::Build,
            "x",
            "k",
            Path::new("/bin/echo"),
            &[],
        ));
        assert_eq!((code, o.as_str()), (0, ""));
        assert_eq!(
            e,
            "the library set KVC_CONTAINER_RUNTIME=/bin/true; its kvc_c_* helpers run that instead of /bin/echo\n"
        );
    }

    #[test]
    fn existing_libraries_in_kvc_order() {
        let t = tempfile::tempdir().unwrap();
        let (l, u) = (
            t.path().join("usr/local/lib/kvc"),
            t.path().join("usr/lib/kvc"),
        );
        fs::create_dir_all(&l).unwrap();
        fs::create_dir_all(&u).unwrap();
        fs::write(u.join("a-lib.sh"), "").unwrap();
        assert_eq!(existing_libraries("a", &[&l, &u]), vec![u.join("a-lib.sh")]);
        fs::write(l.join("a-lib.sh"), "").unwrap();
        assert_eq!(
            existing_libraries("a", &[&l, &u]),
            vec![l.join("a-lib.sh"), u.join("a-lib.sh")]
        );
    }
}
