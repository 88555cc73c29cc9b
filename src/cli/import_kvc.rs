//! `kvcctl import-kvc`: converts kmods-via-containers configs
//! (`/etc/kvc/NAME.conf`) into module configs, printed or written to the
//! last configuration directory's `modules.d/`.

use std::fs;
use std::io::ErrorKind;
use std::os::unix::fs::DirBuilderExt as _;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use clap::Args;
use serde::Serialize;

use super::{EXIT_FAILED, PathArgs};
use crate::config::Config;
use crate::config::kvc_import::{
    self, DEFAULT_KVC_DIR, DEFAULT_LIB_DIRS, FRAMEWORK_CONF, InTree, framework_runtime_note,
};
use crate::hooks::kvc::existing_libraries;
use crate::kernel::KernelRelease;
use crate::util::write_atomic;

/// `kvcctl import-kvc` arguments.
#[derive(Debug, Args)]
pub(super) struct ImportKvcArgs {
    /// KVC config names (KVC-DIR/NAME.conf); default every *.conf there except kmods-via-containers.conf.
    #[arg(value_name = "NAME")]
    names: Vec<String>,
    /// Where the KVC configs are.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_KVC_DIR)]
    kvc_dir: PathBuf,
    /// Where KVC libraries (NAME-lib.sh) are, in sourcing order (repeatable); default /usr/local/lib/kvc, /usr/lib/kvc.
    #[arg(long = "lib-dir", value_name = "DIR")]
    lib_dirs: Vec<PathBuf>,
    /// Write modules.d/NAME.toml in the last configuration directory (default /etc/kvcd) instead of printing.
    #[arg(long)]
    write: bool,
    /// Replace an existing modules.d/NAME.toml.
    #[arg(long, requires = "write")]
    force: bool,
    /// Kernel release whose own modules (kernel_modules_dir/RELEASE) decide `replace_in_tree`; default the running kernel.
    #[arg(long, value_name = "RELEASE")]
    kernel: Option<String>,
    /// Print one JSON document.
    #[arg(long)]
    json: bool,
}

/// The outcome for one KVC config.
#[derive(Debug, Serialize)]
struct Imported {
    name: String,
    source: PathBuf,
    toml: Option<String>,
    written: Option<PathBuf>,
    notes: Vec<String>,
    error: Option<String>,
}

/// A private scratch directory, removed when dropped.
#[derive(Debug)]
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Result<Self> {
        let base = std::env::temp_dir();
        for n in 0..1000 {
            let p = base.join(format!("kvcctl-import-kvc.{}.{n}", std::process::id()));
            match fs::DirBuilder::new().mode(0o700).create(&p) {
                Ok(()) => return Ok(Self(p)),
                Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e).with_context(|| format!("creating {}", p.display())),
            }
        }
        anyhow::bail!("no free scratch directory name in {}", base.display())
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Runs `kvcctl import-kvc`; returns the exit code.
pub(super) fn run(paths: &PathArgs, args: &ImportKvcArgs) -> Result<u8> {
    let kvc_dir = std::path::absolute(&args.kvc_dir)
        .with_context(|| format!("resolving {}", args.kvc_dir.display()))?;
    let lib_dirs: Vec<PathBuf> = if args.lib_dirs.is_empty() {
        DEFAULT_LIB_DIRS.iter().map(PathBuf::from).collect()
    } else {
        args.lib_dirs
            .iter()
            .map(|d| std::path::absolute(d).with_context(|| format!("resolving {}", d.display())))
            .collect::<Result<_>>()?
    };
    let target = paths
        .dirs()
        .last()
        .map(|d| d.join("modules.d"))
        .context("no configuration directory")?;
    let names = if args.names.is_empty() {
        all_names(&kvc_dir)?
    } else {
        args.names
            .iter()
            .map(|n| n.strip_suffix(".conf").unwrap_or(n).to_owned())
            .collect()
    };
    if names.is_empty() && !args.json {
        eprintln!("no KVC configs (*.conf) in {}", kvc_dir.display());
    }

    let kernel = match &args.kernel {
        Some(k) => KernelRelease::parse(k)?,
        None => KernelRelease::running()?,
    };
    let kernel_dir = paths.load().daemon.kernel_modules_dir.join(kernel.as_str());
    let framework = kvc_dir.join(FRAMEWORK_CONF);
    let host = Host {
        kernel,
        in_tree: InTree::read(&kernel_dir).map_err(|e| format!("{e:#}")),
        framework_text: crate::config::read(&framework).ok(),
        framework,
    };

    let scratch = Scratch::new()?;
    let roots: Vec<&Path> = lib_dirs.iter().map(PathBuf::as_path).collect();
    let results: Vec<Imported> = names
        .iter()
        .map(|name| import_one(name, &kvc_dir, &roots, &target, &scratch, &host, args))
        .collect();

    if args.json {
        println!("{:#}", serde_json::json!({ "results": results }));
    } else {
        print_human(&results, args.write);
    }
    Ok(if results.iter().any(|r| r.error.is_some()) {
        EXIT_FAILED
    } else {
        0
    })
}

/// Every `*.conf` in the KVC directory except the framework's own, as bash's glob finds them.
fn all_names(kvc_dir: &Path) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in fs::read_dir(kvc_dir).with_context(|| format!("reading {}", kvc_dir.display()))? {
        let entry = entry.with_context(|| format!("reading {}", kvc_dir.display()))?;
        let file = entry.file_name();
        let Some(file) = file.to_str() else { continue };
        if file == FRAMEWORK_CONF || file.starts_with('.') || !entry.path().is_file() {
            continue;
        }
        if let Some(name) = file.strip_suffix(".conf") {
            names.push(name.to_owned());
        }
    }
    names.sort();
    Ok(names)
}

/// What the host tells every conversion: the target kernel's own modules and the framework's settings.
#[derive(Debug)]
struct Host {
    kernel: KernelRelease,
    /// The kernel's in-tree modules, or why they could not be read.
    in_tree: std::result::Result<InTree, String>,
    framework: PathBuf,
    framework_text: Option<String>,
}

fn import_one(
    name: &str,
    kvc_dir: &Path,
    roots: &[&Path],
    target: &Path,
    scratch: &Scratch,
    host: &Host,
    args: &ImportKvcArgs,
) -> Imported {
    let source = kvc_dir.join(format!("{name}.conf"));
    let mut out = Imported {
        name: name.to_owned(),
        source: source.clone(),
        toml: None,
        written: None,
        notes: Vec::new(),
        error: None,
    };
    if name.is_empty() || name.contains('/') || name.starts_with('.') {
        out.error = Some(format!("{name:?} is not a KVC config name"));
        return out;
    }
    // The same bounded, non-blocking reader as kvcd's own configs.
    let text = match crate::config::read(&source) {
        Ok(t) => t,
        Err(errs) => {
            out.error = Some(crate::config::join_errors(&errs));
            return out;
        }
    };
    let libraries = existing_libraries(name, roots);
    let conversion = kvc_import::convert(name, &source, &text, &libraries);
    out.notes = conversion.notes;
    if let Some(text) = &host.framework_text {
        out.notes.extend(framework_runtime_note(
            &host.framework,
            text,
            !libraries.is_empty(),
        ));
    }
    let mut imported = match conversion.result {
        Ok(i) => i,
        Err(e) => {
            out.error = Some(e);
            return out;
        }
    };
    match &host.in_tree {
        Ok(tree) => out
            .notes
            .extend(imported.replace_in_tree_of(tree, host.kernel.as_str())),
        Err(e) => out.notes.push(format!(
            "could not look for in-tree modules of kernel {} ({e}); add `replace_in_tree` for any module that is also in-tree",
            host.kernel
        )),
    }
    let toml = imported.to_toml(&out.notes);
    if let Err(e) = check(scratch, name, &toml) {
        out.error = Some(format!(
            "internal error: the generated config fails kvcd's own validation, nothing written (please report this with {}): {e}",
            source.display()
        ));
        out.toml = Some(toml);
        return out;
    }
    if args.write {
        let path = target.join(format!("{name}.toml"));
        if !args.force && fs::symlink_metadata(&path).is_ok() {
            out.error = Some(format!(
                "{} already exists; not overwritten (use --force to replace it)",
                path.display()
            ));
        } else {
            match write_atomic(&path, toml.as_bytes()) {
                Ok(()) => out.written = Some(path),
                Err(e) => out.error = Some(format!("{e:#}")),
            }
        }
    }
    out.toml = Some(toml);
    out
}

/// Validates `toml` as `NAME.toml` the way kvcd reads module configs.
fn check(scratch: &Scratch, name: &str, toml: &str) -> Result<()> {
    let file = scratch.0.join(format!("{name}.toml"));
    fs::write(&file, toml).with_context(|| format!("writing {}", file.display()))?;
    let config = Config::load_paths(std::slice::from_ref(&file));
    let _ = fs::remove_file(&file);
    let errors: Vec<String> = config
        .all_errors()
        .iter()
        .map(ToString::to_string)
        .collect();
    if !errors.is_empty() {
        anyhow::bail!("{}", errors.join("; "));
    }
    if config.modules.get(name).is_none_or(|e| e.result.is_err()) {
        anyhow::bail!("no module config {name:?} was read back");
    }
    Ok(())
}

fn print_human(results: &[Imported], write: bool) {
    let mut first = true;
    for r in results {
        for n in &r.notes {
            eprintln!("{}: {n}", r.name);
        }
        if let Some(e) = &r.error {
            eprintln!("{}: error: {e}", r.name);
        }
        if let Some(path) = &r.written {
            println!("wrote {} (from {})", path.display(), r.source.display());
        } else if let (false, None, Some(toml)) = (write, &r.error, &r.toml) {
            if !first {
                println!();
            }
            first = false;
            print!("{toml}");
        }
    }
    for r in results.iter().filter(|r| r.written.is_some()) {
        eprintln!(
            "{n}: to switch over: systemctl disable --now kmods-via-containers@{n} && systemctl enable --now kvcd@{n}",
            n = r.name
        );
    }
}
