//! `kvcctl wrapper` (run a tool from a module config's driver image on the
//! host, as KVC's `kmods-via-containers wrapper` did) and
//! `kvcctl install-wrapper` (a shim in `/usr/local/bin` that does so, and
//! in place of the KVC shims for the same tool it finds).

use std::ffi::OsStr;
use std::fs;
use std::io::Write as _;
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, Result, anyhow, bail};
use clap::Args;

use super::PathArgs;
use crate::artifacts::podman::{ContainerTool as _, Podman};
use crate::config::{InstanceName, ModuleConfig, Source};
use crate::hooks::kvc::{self, KvcAction};
use crate::kernel::{KernelRelease, TemplateVars, expand};
use crate::state::{Layout, index};

/// First lines of every shim; an existing file starting with them may be replaced.
const SHIM_MARKER: &str = "# Written by kvcctl install-wrapper; replaced when it runs again.";

/// `kvcctl wrapper` arguments.
#[derive(Debug, Args)]
pub(super) struct WrapperArgs {
    /// Use the driver image of this kernel release; default the running kernel.
    #[arg(long, value_name = "RELEASE")]
    kernel: Option<String>,
    /// Module config name (modules.d/NAME.toml).
    #[arg(value_name = "NAME")]
    name: String,
    /// The tool to run in the driver image, and its arguments (taken as they are).
    #[arg(
        value_names = ["TOOL", "ARGS"],
        required = true,
        num_args = 1..,
        trailing_var_arg = true,
        allow_hyphen_values = true
    )]
    command: Vec<String>,
}

/// `kvcctl install-wrapper` arguments.
#[derive(Debug, Args)]
pub(super) struct InstallArgs {
    /// Directory to write the shim into.
    #[arg(long, value_name = "DIR", default_value = "/usr/local/bin")]
    dir: PathBuf,
    /// Overwrite DIR/TOOL even when it is neither install-wrapper's shim nor a KVC shim.
    #[arg(long)]
    force: bool,
    /// Where else to look for KVC shims of TOOL to replace (repeatable); default /usr/local/bin, /usr/bin and the PATH directories.
    #[arg(long = "search-dir", value_name = "DIR")]
    search_dirs: Vec<PathBuf>,
    /// Module config name (modules.d/NAME.toml).
    #[arg(value_name = "NAME")]
    name: String,
    /// Name of the tool in the driver image (and of the shim).
    #[arg(value_name = "TOOL")]
    tool: String,
}

/// Runs `kvcctl wrapper`: on success the process becomes the tool's runner
/// (podman, or bash for a KVC library), so its exit status is ours.
pub(super) fn run(paths: &PathArgs, args: &WrapperArgs) -> Result<u8> {
    let config = paths.load_strict()?;
    let module = config.module(&args.name)?;
    let kernel = match &args.kernel {
        Some(k) => KernelRelease::parse(k)?,
        None => KernelRelease::running()?,
    };
    let podman = &config.daemon.podman;
    let mut command = match &module.source {
        Source::Directory { .. } => bail!(
            "module config {} has no driver image; wrappers run tools from an image",
            module.name
        ),
        Source::KvcLibrary { libraries } => kvc::command(
            libraries,
            KvcAction::Wrapper,
            module.name.as_str(),
            kernel.as_str(),
            podman,
            &args.command,
        ),
        Source::Image(_) => {
            let reference = image_reference(module, &config.daemon.state_dir, &kernel)?;
            let present = Podman::from_settings(&config.daemon)
                .inspect(&reference)
                .with_context(|| format!("looking for image {reference}"))?;
            let Some(info) = present else {
                bail!(
                    "{}",
                    not_present(&reference, &module.name, args.kernel.as_deref())
                );
            };
            // The very image found, by ID: no second name lookup (short names
            // could match another image).
            let mut c = Command::new(podman);
            c.args(["run", "-i", "--rm", "--privileged", "--pull=never", "--"])
                .arg(info.id.trim_start_matches("sha256:"))
                .args(&args.command);
            c
        }
    };
    let program = command.get_program().to_owned();
    let err = command.exec();
    Err(anyhow!(err).context(format!("running {}", Path::new(&program).display())))
}

fn not_present(reference: &str, name: &InstanceName, kernel: Option<&str>) -> String {
    let apply = match kernel {
        Some(k) => format!("`kvcd apply --prepare --kernel {k} {name}`"),
        None => format!("`kvcd apply {name}` (or `kvcd apply --prepare {name}`)"),
    };
    format!("image {reference} is not in local storage; run {apply} first")
}

/// The image kvcd applied for `kernel` (its `index.json`), else the config's `image.ref` for `kernel`.
fn image_reference(c: &ModuleConfig, state_dir: &Path, kernel: &KernelRelease) -> Result<String> {
    let dir = Layout::image_dir(state_dir, c.name.as_str(), kernel.as_str());
    if let Some(index) = index::read(&dir)
        .ok()
        .flatten()
        .filter(|i| !i.reference.is_empty())
    {
        return Ok(index.reference);
    }
    let Source::Image(src) = &c.source else {
        bail!("module config {} has no [image]", c.name);
    };
    let vars = TemplateVars::for_config(kernel, c.name.as_str(), c.version.as_deref());
    expand(&src.reference, &vars).with_context(|| format!("{}: key `image.ref`", c.file.display()))
}

/// A tool name usable as a file name in DIR and as a command in the image.
fn check_tool(tool: &str) -> Result<()> {
    let ok = !tool.is_empty()
        && !tool.starts_with('-')
        && tool != "."
        && tool != ".."
        && tool
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '+' | '-'));
    if !ok {
        bail!(
            "invalid tool name {tool:?}: expected letters, digits, '.', '_', '+' and '-', not starting with '-'"
        );
    }
    Ok(())
}

/// `word` quoted for `/bin/sh`: in single quotes, each `'` as `'\''`.
fn sh_quote(word: &OsStr) -> Vec<u8> {
    let mut out = vec![b'\''];
    for &b in word.as_bytes() {
        if b == b'\'' {
            out.extend_from_slice(b"'\\''");
        } else {
            out.push(b);
        }
    }
    out.push(b'\'');
    out
}

/// The shim's text: `exec KVCCTL [--config-dir …] [--state-dir …] wrapper NAME TOOL "$@"`.
fn shim(kvcctl: &Path, paths: &PathArgs, name: &InstanceName, tool: &str) -> Vec<u8> {
    let mut words: Vec<Vec<u8>> = vec![sh_quote(kvcctl.as_os_str())];
    for dir in &paths.config_dirs {
        words.push(b"--config-dir".to_vec());
        words.push(sh_quote(dir.as_os_str()));
    }
    if let Some(dir) = &paths.state_dir {
        words.push(b"--state-dir".to_vec());
        words.push(sh_quote(dir.as_os_str()));
    }
    words.push(b"wrapper".to_vec());
    words.push(sh_quote(OsStr::new(name.as_str())));
    words.push(sh_quote(OsStr::new(tool)));
    words.push(b"\"$@\"".to_vec());

    let mut text = format!(
        "#!/bin/sh\n{SHIM_MARKER}\n# Runs {tool} from the driver image of kvcd module config {name}.\nexec "
    )
    .into_bytes();
    text.extend(words.join(&b' '));
    text.push(b'\n');
    text
}

/// True when `path` is a regular file that install-wrapper wrote.
fn is_our_shim(path: &Path) -> bool {
    let Ok(meta) = fs::symlink_metadata(path) else {
        return false;
    };
    if !meta.is_file() || meta.len() > 64 * 1024 {
        return false;
    }
    fs::read(path).is_ok_and(|data| {
        data.split(|&b| b == b'\n')
            .take(3)
            .any(|line| line == SHIM_MARKER.as_bytes())
    })
}

/// Why `path` is a KVC wrapper shim (it runs `kmods-via-containers wrapper`
/// or a library's `*-wrapper.sh`, itself or as a symlink to it), or `None`.
fn kvc_shim(path: &Path) -> Option<String> {
    let meta = fs::symlink_metadata(path).ok()?;
    if meta.file_type().is_symlink() {
        let target = fs::read_link(path).ok()?;
        let name = target.file_name()?.to_string_lossy();
        if name.ends_with("-wrapper.sh") {
            return Some(format!("a symlink to the KVC wrapper {}", target.display()));
        }
        if name == "kmods-via-containers" {
            return Some(format!("a symlink to {}", target.display()));
        }
    }
    // What it is or points to: a small script.
    let meta = fs::metadata(path).ok()?;
    if !meta.is_file() || meta.len() > 64 * 1024 {
        return None;
    }
    let data = fs::read(path).ok()?;
    let text = String::from_utf8_lossy(&data);
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') {
            continue;
        }
        let words: Vec<&str> = line
            .split(|c: char| c.is_whitespace() || matches!(c, '"' | '\'' | ';' | '(' | ')'))
            .filter(|w| !w.is_empty())
            .collect();
        let dispatcher = words.iter().position(|w| {
            Path::new(w)
                .file_name()
                .is_some_and(|n| n == "kmods-via-containers")
        });
        if dispatcher.is_some_and(|i| words[i + 1..].contains(&"wrapper")) {
            return Some("it runs `kmods-via-containers wrapper`".to_owned());
        }
        if let Some(w) = words.iter().find(|w| w.ends_with("-wrapper.sh")) {
            return Some(format!("it runs the KVC wrapper {w}"));
        }
    }
    None
}

/// The directories to look for KVC shims in: DIR first, then `extra` (or
/// /usr/local/bin, /usr/bin and PATH), each once.
fn shim_dirs(dir: &Path, extra: &[PathBuf]) -> Vec<PathBuf> {
    let defaults: Vec<PathBuf> = if extra.is_empty() {
        let mut d = vec![PathBuf::from("/usr/local/bin"), PathBuf::from("/usr/bin")];
        if let Some(path) = std::env::var_os("PATH") {
            d.extend(std::env::split_paths(&path).filter(|p| p.is_absolute()));
        }
        d
    } else {
        extra.to_vec()
    };
    let mut seen = Vec::new();
    let mut out = Vec::new();
    for d in std::iter::once(dir.to_owned()).chain(defaults) {
        let key = fs::canonicalize(&d).unwrap_or_else(|_| d.clone());
        if !seen.contains(&key) {
            seen.push(key);
            out.push(d);
        }
    }
    out
}

/// Writes `data` to `path` with mode 0755: a temp file in the same directory, then rename.
fn write_executable(path: &Path, data: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = dir.join(format!(".{name}.kvcctl-{}", std::process::id()));
    let written = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o755)
            .open(&tmp)?;
        f.write_all(data)?;
        // The umask may have taken bits away; a shim is 0755 whatever it is.
        f.set_permissions(fs::Permissions::from_mode(0o755))?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("writing {}", path.display()));
    }
    Ok(())
}

/// Runs `kvcctl install-wrapper`; returns the exit code: 1 when a KVC shim
/// of TOOL could not be replaced (each one is named, with the reason).
pub(super) fn install(paths: &PathArgs, args: &InstallArgs) -> Result<u8> {
    let name =
        InstanceName::parse(&args.name).map_err(|e| anyhow!("invalid module config name {e}"))?;
    check_tool(&args.tool)?;
    if !args.dir.is_dir() {
        bail!("{} is not a directory", args.dir.display());
    }
    let path = args.dir.join(&args.tool);
    let exists = fs::symlink_metadata(&path).is_ok();
    let target_shim = kvc_shim(&path);
    if exists && !args.force && !is_our_shim(&path) && target_shim.is_none() {
        bail!(
            "{} exists and is neither a shim kvcctl install-wrapper wrote nor a KVC wrapper shim; use --force to replace it",
            path.display()
        );
    }
    let kvcctl = std::env::current_exe().context("finding the kvcctl program")?;
    let text = shim(&kvcctl, paths, &name, &args.tool);
    let runs = format!("runs `{} wrapper {name} {}`", kvcctl.display(), args.tool);
    write_executable(&path, &text)?;
    match &target_shim {
        Some(why) => println!("replaced KVC shim {} ({why}): {runs}", path.display()),
        None if exists => println!("replaced {}: {runs}", path.display()),
        None => println!("wrote {}: {runs}", path.display()),
    }

    // KVC shims of the same tool elsewhere would still run kmods-via-containers.
    let mut failed = 0;
    for dir in shim_dirs(&args.dir, &args.search_dirs).iter().skip(1) {
        let other = dir.join(&args.tool);
        let Some(why) = kvc_shim(&other) else {
            continue;
        };
        match write_executable(&other, &text) {
            Ok(()) => println!("replaced KVC shim {} ({why}): {runs}", other.display()),
            Err(e) => {
                failed += 1;
                eprintln!(
                    "kvcctl: could not replace KVC shim {} ({why}): {:#}; remove it or make it run {}",
                    other.display(),
                    e,
                    path.display()
                );
            }
        }
    }
    Ok(if failed == 0 { 0 } else { super::EXIT_FAILED })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tool_names() {
        for ok in ["modinfo", "ice-tool", "a.b_c+d", "x1"] {
            assert!(check_tool(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-x", "a/b", "..", ".", "a b", "a$b", "ä"] {
            assert!(check_tool(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn kvc_shims_are_recognised_and_other_files_are_not() {
        use std::os::unix::fs::symlink;
        let t = tempfile::tempdir().unwrap();
        let d = t.path();
        let write = |n: &str, text: &str| fs::write(d.join(n), text).unwrap();
        write(
            "a",
            "#!/bin/bash\nexec /usr/local/bin/kmods-via-containers wrapper ice $(uname -r) ice-tool \"$@\"\n",
        );
        write(
            "b",
            "#!/bin/sh\n/usr/lib/kvc/ice-wrapper.sh \"$(basename \"$0\")\" \"$@\"\n",
        );
        write(
            "c",
            "#!/bin/sh\n# kmods-via-containers wrapper was here\nexec /usr/bin/real-tool\n",
        );
        write(
            "d",
            "#!/bin/sh\nkmods-via-containers build ice $(uname -r)\n",
        );
        write(
            "ice-wrapper.sh",
            "#!/bin/sh\nkmods-via-containers wrapper ice $(uname -r) \"$@\"\n",
        );
        symlink(d.join("ice-wrapper.sh"), d.join("e")).unwrap();
        symlink(d.join("c"), d.join("f")).unwrap();
        symlink(d.join("a"), d.join("g")).unwrap();
        assert_eq!(
            kvc_shim(&d.join("a")).as_deref(),
            Some("it runs `kmods-via-containers wrapper`")
        );
        assert_eq!(
            kvc_shim(&d.join("b")).as_deref(),
            Some("it runs the KVC wrapper /usr/lib/kvc/ice-wrapper.sh")
        );
        assert_eq!(kvc_shim(&d.join("c")), None);
        assert_eq!(kvc_shim(&d.join("d")), None);
        assert_eq!(
            kvc_shim(&d.join("e")),
            Some(format!(
                "a symlink to the KVC wrapper {}",
                d.join("ice-wrapper.sh").display()
            ))
        );
        assert_eq!(kvc_shim(&d.join("f")), None);
        assert!(kvc_shim(&d.join("g")).is_some());
        assert_eq!(kvc_shim(&d.join("absent")), None);
        assert_eq!(kvc_shim(d), None);
    }

    #[test]
    fn shim_dirs_start_with_dir_and_hold_each_once() {
        let t = tempfile::tempdir().unwrap();
        let (a, b) = (t.path().join("a"), t.path().join("b"));
        fs::create_dir_all(&a).unwrap();
        std::os::unix::fs::symlink(&a, &b).unwrap();
        let dirs = shim_dirs(&a, &[b, t.path().to_owned(), a.clone()]);
        assert_eq!(dirs, [a, t.path().to_owned()]);
    }

    #[test]
    fn quoting_survives_single_quotes() {
        assert_eq!(sh_quote(OsStr::new("a b")), b"'a b'");
        assert_eq!(sh_quote(OsStr::new("it's")), b"'it'\\''s'");
    }

    #[test]
    fn shim_names_config_dirs_and_marker() {
        let paths = PathArgs {
            config_dirs: vec!["/etc/my dir".into()],
            state_dir: None,
            runtime_dir: Some("/ignored".into()),
        };
        let name = InstanceName::parse("acme").unwrap();
        let text =
            String::from_utf8(shim(Path::new("/usr/bin/kvcctl"), &paths, &name, "tool")).unwrap();
        assert_eq!(
            text,
            format!(
                "#!/bin/sh\n{SHIM_MARKER}\n# Runs tool from the driver image of kvcd module config acme.\nexec '/usr/bin/kvcctl' --config-dir '/etc/my dir' wrapper 'acme' 'tool' \"$@\"\n"
            )
        );
    }
}
