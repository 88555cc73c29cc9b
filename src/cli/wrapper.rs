//! `kvcctl wrapper` (run a tool from a module config's driver image on the
//! host, as KVC's `kmods-via-containers wrapper` did) and
//! `kvcctl install-wrapper` (a shim in `/usr/local/bin` that does so).

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
use crate::artifacts::podman::Podman;
use crate::config::{InstanceName, ModuleConfig, Source};
use crate::hooks::kvc::{self, Action};
use crate::kernel::{KernelRelease, TemplateVars, arch, expand};

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
    /// Overwrite DIR/TOOL even when install-wrapper did not write it.
    #[arg(long)]
    force: bool,
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
            Action::Wrapper,
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
            if present.is_none() {
                bail!(
                    "{}",
                    not_present(&reference, &module.name, args.kernel.as_deref())
                );
            }
            let mut c = Command::new(podman);
            c.args(["run", "-i", "--rm", "--privileged", "--pull=never", "--"])
                .arg(&reference)
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
    let index = state_dir
        .join("images")
        .join(c.name.as_str())
        .join(kernel.as_str())
        .join("index.json");
    if let Some(reference) = applied_reference(&index) {
        return Ok(reference);
    }
    let Source::Image(src) = &c.source else {
        bail!("module config {} has no [image]", c.name);
    };
    let vars = TemplateVars {
        kernel: kernel.clone(),
        arch: arch(),
        mod_name: c.name.to_string(),
        mod_version: c.version.clone(),
    };
    expand(&src.reference, &vars).with_context(|| format!("{}: key `image.ref`", c.file.display()))
}

/// The `reference` recorded in an `index.json`, when the file exists and is readable.
fn applied_reference(index: &Path) -> Option<String> {
    let data = fs::read(index).ok()?;
    let doc: serde_json::Value = serde_json::from_slice(&data).ok()?;
    doc.get("reference")?
        .as_str()
        .filter(|r| !r.is_empty())
        .map(str::to_owned)
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

/// Runs `kvcctl install-wrapper`; returns the exit code.
pub(super) fn install(paths: &PathArgs, args: &InstallArgs) -> Result<u8> {
    let name =
        InstanceName::parse(&args.name).map_err(|e| anyhow!("invalid module config name {e}"))?;
    check_tool(&args.tool)?;
    if !args.dir.is_dir() {
        bail!("{} is not a directory", args.dir.display());
    }
    let path = args.dir.join(&args.tool);
    let exists = fs::symlink_metadata(&path).is_ok();
    if exists && !args.force && !is_our_shim(&path) {
        bail!(
            "{} exists and was not written by kvcctl install-wrapper; use --force to replace it",
            path.display()
        );
    }
    let kvcctl = std::env::current_exe().context("finding the kvcctl program")?;
    write_executable(&path, &shim(&kvcctl, paths, &name, &args.tool))?;
    println!(
        "{} {}: runs `{} wrapper {name} {}`",
        if exists { "replaced" } else { "wrote" },
        path.display(),
        kvcctl.display(),
        args.tool
    );
    Ok(0)
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
