//! `kvcd apply` (one reconcile in the foreground, without D-Bus) and
//! `kvcd prepare-next` (artifacts for the kernels the node may boot next).

use std::collections::BTreeSet;
use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use super::{EXIT_FAILED, PathArgs, lock_state};
use crate::config::{Config, ModuleConfig};
use crate::kernel::KernelRelease;
use crate::reconciler::next;
use crate::reconciler::status::next_wire;
use crate::reconciler::{Engine, OnStep, Outcome, Step, StepLog, order};
use crate::state::Layout;

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

/// `kvcd prepare-next` arguments.
#[derive(Debug, Args)]
pub(super) struct PrepareNextArgs {
    /// Only report readiness unless kvcd.toml sets `prepare_next_kernels = true` (for the trigger units).
    #[arg(long)]
    if_enabled: bool,
    /// Print one JSON document instead of progress lines.
    #[arg(long)]
    json: bool,
    /// The node's root to look for kernels under: package trees and ostree deployments (`SYSROOT/ostree/deploy`).
    #[arg(long, value_name = "DIR", default_value = "/")]
    sysroot: PathBuf,
    /// D-Bus address of a running kvcd to ask (it holds the state lock); default the system bus.
    #[arg(long, value_name = "ADDRESS")]
    bus_address: Option<String>,
    /// Module config names; default those the agent wants loaded, or every valid one when it wants none.
    #[arg(value_name = "NAME")]
    names: Vec<String>,
}

pub(super) fn print_step(name: &str, s: &StepLog) {
    // In the journal the engine's own line, with its fields, says it already.
    if !super::steps_to_journal() {
        println!("{name}: {}: {}", s.step.as_str(), s.detail);
    }
}

fn print_outcome(o: &Outcome) {
    let line = match &o.error {
        None => format!("{}: {}", o.name, o.state),
        Some(e) => format!(
            "{}: {} at {}: {}",
            o.name,
            o.state,
            e.step.as_str(),
            e.message
        ),
    };
    super::print_result(&o.name, &o.kernel, &line);
}

fn exit_code(outcomes: &[Outcome]) -> u8 {
    if outcomes.iter().all(|o| o.state.is_ok()) {
        0
    } else {
        EXIT_FAILED
    }
}

/// Runs `kvcd apply`; returns the exit code.
pub(super) fn run(paths: &PathArgs, args: &ApplyArgs) -> Result<u8> {
    let config = paths.load_strict()?;
    let kernel = match &args.kernel {
        Some(k) => KernelRelease::parse(k)?,
        None => KernelRelease::running()?,
    };
    let d = &config.daemon;
    let _lock = lock_state(d)?;
    let kmods = crate::kmod::open()?;
    let on_step: &OnStep<'_> = &print_step;
    let engine = Engine::from_settings(d, &kernel, &*kmods, (!args.json).then_some(on_step));
    for line in engine.recover(&Layout::from_settings(d)) {
        if !args.json {
            println!("kvcd: recover: {line}");
        }
    }

    let mut names = order::load_order(&args.names, &config.after_map());
    if args.unload {
        names.reverse();
    }

    let mut outcomes = Vec::new();
    for name in &names {
        let outcome = if args.unload {
            engine.unload(name, config.module(name).ok())
        } else {
            match config.module(name) {
                Ok(c) if args.prepare => engine.prepare(c),
                Ok(c) => engine.load(c),
                Err(e) => Outcome::failed(name, &kernel, Step::Config, e.to_string()),
            }
        };
        if !args.json {
            print_outcome(&outcome);
        }
        outcomes.push(outcome);
    }
    if args.json {
        let doc = serde_json::json!({ "kernel": kernel.as_str(), "results": outcomes });
        println!("{}", serde_json::to_string_pretty(&doc)?);
    }
    Ok(exit_code(&outcomes))
}

/// The configs `prepare-next` works on, in load order: `names`; else those
/// the agent wants loaded (its desired state); else every valid one. Names
/// that are no valid config come back with the reason.
pub(super) fn next_configs<'c>(
    config: &'c Config,
    names: &[String],
    wanted: &BTreeSet<String>,
) -> (Vec<&'c ModuleConfig>, Vec<(String, String)>) {
    let valid: Vec<String> = config
        .modules
        .keys()
        .filter(|n| config.module(n).is_ok())
        .cloned()
        .collect();
    let chosen = next::choose(names, &valid, |n| wanted.contains(n));
    // A config built on another's image (its `after`) is prepared after it.
    let mut ok = Vec::new();
    let mut bad = Vec::new();
    for n in order::load_order(&chosen, &config.after_map()) {
        match config.module(&n) {
            Ok(c) => ok.push(c),
            Err(e) => bad.push((n, e.to_string())),
        }
    }
    (ok, bad)
}

/// Runs `kvcd prepare-next`; returns the exit code: 0 when every prepare
/// succeeded and every config is ready for the kernels the node boots next.
pub(super) fn prepare_next(paths: &PathArgs, args: &PrepareNextArgs) -> Result<u8> {
    let config = paths.load_strict()?;
    let d = &config.daemon;
    let prepare = !args.if_enabled || d.prepare_next_kernels;
    if !prepare && !args.json {
        println!("prepare-next: prepare_next_kernels is off in kvcd.toml; only checking readiness");
    }
    let layout = Layout::from_settings(d);
    // The agent holds the state lock while it runs: it does the work.
    let Some(_lock) = layout.try_lock()? else {
        return super::client::forward_prepare_next(
            args.bus_address.as_deref(),
            &args.sysroot,
            &args.names,
            prepare,
            args.json,
        );
    };
    let running = KernelRelease::running()?;
    let wanted = crate::state::desired::read(&layout.desired())
        .map(|w| w.wanted)
        .unwrap_or_default();
    let (configs, invalid) = next_configs(&config, &args.names, &wanted);
    let mut failed: Vec<Outcome> = invalid
        .into_iter()
        .map(|(n, e)| Outcome::failed(&n, &running, Step::Config, e))
        .collect();
    let kmods = crate::kmod::open()?;
    let on_step: &OnStep<'_> = &print_step;
    let report = next::run(
        &next::NextRun {
            settings: d,
            kmods: &*kmods,
            sysroot: &args.sysroot,
            running: &running,
            on_step: (!args.json).then_some(on_step),
            cancel: None,
        },
        &configs,
        prepare,
    );
    for o in &failed {
        if !args.json {
            print_outcome(o);
        }
    }
    failed.extend(
        report
            .kernels
            .iter()
            .flat_map(|k| k.results.iter().cloned()),
    );
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        if report.kernels.is_empty() {
            println!(
                "prepare-next: no kernel to boot next besides the running {} under {}",
                report.running,
                report.sysroot.display()
            );
        }
        for n in &report.notes {
            println!("prepare-next: {n}");
        }
        print!("{}", super::client::next_text(&next_wire(&report)));
    }
    if !prepare {
        // Switched off, the trigger only reports: its unit does not fail.
        return Ok(0);
    }
    Ok(if report.ready(false) {
        exit_code(&failed)
    } else {
        EXIT_FAILED
    })
}
