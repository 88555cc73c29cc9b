//! `kvcd apply` (one reconcile in the foreground, without D-Bus) and
//! `kvcd prepare-next` (artifacts for installed kernels that are not running).

use anyhow::Result;
use clap::Args;

use super::{EXIT_FAILED, PathArgs, lock_state};
use crate::artifacts::prune::compare_releases;
use crate::config::Config;
use crate::kernel::{KernelRelease, installed_kernels};
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
    /// Do nothing unless kvcd.toml sets `prepare_next_kernels = true` (for the path unit).
    #[arg(long)]
    if_enabled: bool,
    /// Print one JSON document instead of progress lines.
    #[arg(long)]
    json: bool,
    /// Module config names; default every valid module config.
    #[arg(value_name = "NAME")]
    names: Vec<String>,
}

fn print_step(name: &str, s: &StepLog) {
    println!("{name}: {}: {}", s.step.as_str(), s.detail);
}

fn print_outcome(o: &Outcome) {
    match &o.error {
        None => println!("{}: {}", o.name, o.state),
        Some(e) => println!(
            "{}: {} at {}: {}",
            o.name,
            o.state,
            e.step.as_str(),
            e.message
        ),
    }
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

/// The kernels `prepare-next` works on: installed, not running, newest first, at most `keep_kernels`.
fn next_kernels(config: &Config, running: &KernelRelease) -> Vec<KernelRelease> {
    let mut kernels: Vec<_> = installed_kernels(&config.daemon.kernel_modules_dir)
        .into_iter()
        .filter(|k| k != running)
        .collect();
    kernels.sort_by(|a, b| compare_releases(b.as_str(), a.as_str()));
    kernels.truncate(config.daemon.keep_kernels);
    kernels
}

/// Runs `kvcd prepare-next`; returns the exit code.
pub(super) fn prepare_next(paths: &PathArgs, args: &PrepareNextArgs) -> Result<u8> {
    let config = paths.load_strict()?;
    let d = &config.daemon;
    if args.if_enabled && !d.prepare_next_kernels {
        println!("prepare-next: prepare_next_kernels is off in kvcd.toml; nothing to do");
        return Ok(0);
    }
    let _lock = lock_state(d)?;
    let running = KernelRelease::running()?;
    let kernels = next_kernels(&config, &running);
    let names: Vec<String> = if args.names.is_empty() {
        config
            .modules
            .iter()
            .filter(|(_, e)| e.result.is_ok())
            .map(|(n, _)| n.clone())
            .collect()
    } else {
        args.names.clone()
    };
    // A config built on another's image (its `after`) is prepared after it.
    let names = order::load_order(&names, &config.after_map());
    if kernels.is_empty() && !args.json {
        println!(
            "prepare-next: no installed kernel besides the running {running} in {}",
            d.kernel_modules_dir.display()
        );
    }
    let kmods = crate::kmod::open()?;
    let on_step: &OnStep<'_> = &print_step;
    let mut outcomes = Vec::new();
    for kernel in &kernels {
        let engine = Engine::from_settings(d, kernel, &*kmods, (!args.json).then_some(on_step));
        for name in &names {
            let o = match config.module(name) {
                Ok(c) => engine.prepare(c),
                Err(e) => Outcome::failed(name, kernel, Step::Config, e.to_string()),
            };
            if !args.json {
                print_outcome(&o);
            }
            outcomes.push(o);
        }
    }
    if args.json {
        let doc = serde_json::json!({
            "running": running.as_str(),
            "kernels": kernels.iter().map(KernelRelease::as_str).collect::<Vec<_>>(),
            "results": outcomes,
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
    }
    Ok(exit_code(&outcomes))
}
