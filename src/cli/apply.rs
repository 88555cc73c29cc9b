//! `kvcd apply`: one reconcile in the foreground, without D-Bus.

use std::collections::BTreeMap;

use anyhow::Result;
use clap::Args;

use super::{EXIT_FAILED, PathArgs, lock_runtime};
use crate::artifacts::RootLayout;
use crate::artifacts::podman::Podman;
use crate::kernel::KernelRelease;
use crate::kmod::Libkmod;
use crate::reconciler::{Engine, Outcome, RecordStore, Step, StepLog, order};

/// `kvcd apply` arguments.
#[derive(Debug, Args)]
pub(super) struct ApplyArgs {
    /// Unload instead of load (reverse order; in-tree modules put back).
    #[arg(long, conflicts_with = "prepare")]
    unload: bool,
    /// Fetch, extract and verify for the target kernel without loading (use with --kernel for the next kernel).
    #[arg(long)]
    prepare: bool,
    /// Target kernel release; default the running kernel.
    #[arg(long, value_name = "RELEASE")]
    kernel: Option<String>,
    /// Print one JSON document instead of progress lines.
    #[arg(long)]
    json: bool,
    /// Module config names (modules.d/NAME.toml).
    #[arg(required = true, value_name = "NAME")]
    names: Vec<String>,
}

fn print_step(name: &str, s: &StepLog) {
    println!("{name}: {}: {}", s.step.as_str(), s.detail);
}

/// Runs `kvcd apply`; returns the exit code.
pub(super) fn run(paths: &PathArgs, args: &ApplyArgs) -> Result<u8> {
    let config = paths.load_strict()?;
    let kernel = match &args.kernel {
        Some(k) => KernelRelease::parse(k)?,
        None => KernelRelease::running()?,
    };
    let d = &config.daemon;
    let _lock = lock_runtime(&d.runtime_dir)?;

    let kmods = Libkmod::new()?;
    let on_step = print_step;
    let engine = Engine {
        layout: RootLayout {
            state_dir: d.state_dir.clone(),
            kernel_modules_dir: d.kernel_modules_dir.clone(),
            depmod: d.depmod.clone(),
        },
        kernel: kernel.clone(),
        kmods: &kmods,
        podman: Podman::new(&d.podman),
        firmware_dir: d.firmware_dir.clone(),
        keep_kernels: d.keep_kernels,
        records: RecordStore::new(&d.runtime_dir),
        on_step: if args.json { None } else { Some(&on_step) },
    };

    let after: BTreeMap<String, Vec<String>> = config
        .modules
        .iter()
        .filter_map(|(n, e)| {
            let c = e.result.as_ref().ok()?;
            Some((n.clone(), c.after.iter().map(ToString::to_string).collect()))
        })
        .collect();
    let mut names = order::load_order(&args.names, &after);
    if args.unload {
        names.reverse();
    }

    let mut outcomes = Vec::new();
    for name in &names {
        let outcome = if args.unload {
            let force = config.module(name).is_ok_and(|c| c.force_unload);
            engine.unload(name, force)
        } else {
            match config.module(name) {
                Ok(c) if args.prepare => engine.prepare(c),
                Ok(c) => engine.load(c),
                Err(e) => Outcome::failed(name, &kernel, Step::Config, e.to_string()),
            }
        };
        if !args.json {
            match &outcome.error {
                None => println!("{name}: {}", outcome.state),
                Some(e) => println!(
                    "{name}: {} at {}: {}",
                    outcome.state,
                    e.step.as_str(),
                    e.message
                ),
            }
        }
        outcomes.push(outcome);
    }
    if args.json {
        let doc = serde_json::json!({ "kernel": kernel.as_str(), "results": outcomes });
        println!("{}", serde_json::to_string_pretty(&doc)?);
    }
    Ok(if outcomes.iter().all(|o| o.state.is_ok()) {
        0
    } else {
        EXIT_FAILED
    })
}
