//! `kvcctl config validate|show`: offline checks of the configuration.

use std::path::PathBuf;

use anyhow::Result;
use clap::Subcommand;
use serde_json::{Value, json};

use super::{EXIT_FAILED, PathArgs};
use crate::config::{Config, ModuleEntry, Source};

/// `kvcctl config` verbs.
#[derive(Debug, Subcommand)]
pub(super) enum ConfigCommand {
    /// Check every file; print each error with file, line:column and key; exit 1 on any error.
    Validate {
        /// Configuration directories, directories of module configs, or files; default the --config-dir set.
        #[arg(value_name = "PATH")]
        paths: Vec<PathBuf>,
        /// Print a JSON document.
        #[arg(long)]
        json: bool,
        /// The PATHs are alternative examples, not one node's configuration: check each module config beside only the configs its `after` names, and do not require KVC libraries on this host; default off.
        #[arg(long, requires = "paths")]
        examples: bool,
    },
    /// Show the merged configuration and which file each module config came from.
    Show {
        /// Only this module config.
        name: Option<String>,
        /// Print a JSON document.
        #[arg(long)]
        json: bool,
    },
}

/// Runs a `kvcctl config` verb; returns the exit code.
pub(super) fn run(paths: &PathArgs, cmd: &ConfigCommand) -> Result<u8> {
    match cmd {
        ConfigCommand::Validate {
            paths: p,
            json,
            examples,
        } => {
            let config = if p.is_empty() {
                paths.load()
            } else if *examples {
                Config::load_examples(p)
            } else {
                Config::load_paths(p)
            };
            Ok(validate(&config, *json))
        }
        ConfigCommand::Show { name, json } => show(&paths.load(), name.as_deref(), *json),
    }
}

fn validate(config: &Config, json: bool) -> u8 {
    let errors = config.all_errors();
    let valid: Vec<_> = config
        .modules
        .iter()
        .filter(|(_, e)| e.result.is_ok())
        .map(|(n, _)| n.as_str())
        .collect();
    if json {
        let doc = json!({ "valid": valid, "errors": errors });
        println!("{doc:#}");
    } else {
        for e in &errors {
            println!("{e}");
        }
        let invalid = config.modules.len() - valid.len();
        println!(
            "{} module config(s) valid, {invalid} invalid, {} error(s)",
            valid.len(),
            errors.len()
        );
    }
    if errors.is_empty() { 0 } else { EXIT_FAILED }
}

fn entry_json(name: &str, e: &ModuleEntry) -> Value {
    let mut v = json!({ "name": name, "file": e.file, "overrides": e.shadows });
    match &e.result {
        Ok(c) => v["config"] = serde_json::to_value(c).unwrap_or(Value::Null),
        Err(errs) => v["errors"] = serde_json::to_value(errs).unwrap_or(Value::Null),
    }
    v
}

fn print_entry(name: &str, e: &ModuleEntry) {
    println!("{name}");
    println!("  file: {}", e.file.display());
    for s in &e.shadows {
        println!("  overrides: {}", s.display());
    }
    match &e.result {
        Err(errs) => {
            println!("  invalid:");
            for err in errs {
                println!("    {err}");
            }
        }
        Ok(c) => {
            let list = |v: &[String]| {
                if v.is_empty() {
                    "(none)".to_owned()
                } else {
                    v.join(", ")
                }
            };
            if let Some(d) = &c.description {
                println!("  description: {d}");
            }
            println!(
                "  version: {}",
                c.version.as_deref().unwrap_or("(not checked)")
            );
            println!(
                "  modules: {}",
                list(
                    &c.modules
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                )
            );
            println!(
                "  after: {}",
                list(&c.after.iter().map(ToString::to_string).collect::<Vec<_>>())
            );
            println!(
                "  replace_in_tree: {}",
                list(
                    &c.replace_in_tree
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                )
            );
            println!(
                "  kernel_match: {}",
                c.kernel_match
                    .as_ref()
                    .map_or("(any kernel)", regex::Regex::as_str)
            );
            println!("  force_unload: {}", c.force_unload);
            print_hooks(c);
            for (m, p) in &c.parameters {
                println!("  parameters.{m}: {}", p.join(" "));
            }
            match &c.source {
                Source::Directory { path } => println!("  source: directory {path}"),
                Source::KvcLibrary { libraries } => println!(
                    "  source: KVC library {}",
                    libraries
                        .iter()
                        .map(|l| l.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                Source::Image(i) => {
                    println!("  source: image {}", i.reference);
                    println!(
                        "  image.pull: {}",
                        serde_json::to_value(i.pull)
                            .unwrap_or_default()
                            .as_str()
                            .unwrap_or_default()
                    );
                    println!("  image.tls_verify: {}", i.tls_verify);
                    if let Some(a) = &i.auth_file {
                        println!("  image.auth_file: {}", a.display());
                    }
                    println!("  image.modules_dir: {}", i.modules_dir);
                    if let Some(f) = &i.firmware_dir {
                        println!("  image.firmware_dir: {f}");
                    }
                    if let Some(b) = &i.build {
                        println!("  build.context: {}", b.context);
                        println!("  build.file: {}", b.file);
                        for (k, v) in &b.args {
                            println!("  build.args.{k}: {v}");
                        }
                        for (k, v) in &b.secrets {
                            println!("  build.secrets.{k}: {}", v.display());
                        }
                    }
                }
            }
        }
    }
}

fn print_hooks(c: &crate::config::ModuleConfig) {
    let h = &c.hooks;
    for (name, cmd) in [
        ("pre_load", &h.pre_load),
        ("post_load", &h.post_load),
        ("pre_unload", &h.pre_unload),
        ("post_unload", &h.post_unload),
        ("build", &h.build),
    ] {
        if let Some(argv) = cmd {
            println!("  hooks.{name}: {argv:?}");
        }
    }
    println!(
        "  hooks.timeout_seconds: {} (build: {})",
        h.timeout_seconds, h.build_timeout_seconds
    );
    if let Some(r) = &c.ready {
        match &r.kind {
            crate::config::ReadyKind::Path(p) => println!("  ready.path: {}", p.display()),
            crate::config::ReadyKind::Command(a) => println!("  ready.command: {a:?}"),
        }
        println!("  ready.timeout_seconds: {}", r.timeout_seconds);
    }
}

fn show(config: &Config, name: Option<&str>, json: bool) -> Result<u8> {
    let entries: Vec<_> = match name {
        Some(n) => match config.modules.get_key_value(n) {
            Some(e) => vec![e],
            None => {
                eprintln!(
                    "{}",
                    config
                        .module(n)
                        .err()
                        .map(|e| e.to_string())
                        .unwrap_or_default()
                );
                return Ok(EXIT_FAILED);
            }
        },
        None => config.modules.iter().collect(),
    };
    if json {
        let doc = json!({
            "dirs": config.dirs,
            "daemon": config.daemon,
            "errors": config.errors,
            "masked": config.masked,
            "modules": entries.iter().map(|(n, e)| entry_json(n, e)).collect::<Vec<_>>(),
        });
        println!("{doc:#}");
    } else {
        if name.is_none() {
            let d = &config.daemon;
            println!(
                "daemon ({})",
                d.file
                    .as_ref()
                    .map_or("defaults".to_owned(), |f| f.display().to_string())
            );
            println!("  state_dir: {}", d.state_dir.display());
            println!("  runtime_dir: {}", d.runtime_dir.display());
            println!("  kernel_modules_dir: {}", d.kernel_modules_dir.display());
            println!("  podman: {}", d.podman.display());
            println!("  firmware_dir: {}", d.firmware_dir.display());
            println!("  keep_kernels: {}", d.keep_kernels);
            println!("  prepare_next_kernels: {}", d.prepare_next_kernels);
            for e in &config.errors {
                println!("  error: {e}");
            }
            for m in &config.masked {
                println!("masked: {}", m.display());
            }
        }
        for (n, e) in &entries {
            print_entry(n, e);
        }
    }
    if name.is_some() || json {
        for e in &config.errors {
            eprintln!("{e}");
        }
    }
    let bad = !config.errors.is_empty() || entries.iter().any(|(_, e)| e.result.is_err());
    Ok(if bad { EXIT_FAILED } else { 0 })
}
