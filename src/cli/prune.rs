//! `kvcd prune`: drop artifacts of old kernels and of module configs that are gone.

use anyhow::Result;
use clap::Args;

use super::{PathArgs, lock_state};
use crate::artifacts::podman::Podman;
use crate::artifacts::prune::prune_config;
use crate::kernel::KernelRelease;
use crate::reconciler::RecordStore;

/// `kvcd prune` arguments.
#[derive(Debug, Args)]
pub(super) struct PruneArgs {
    /// Kernels to keep per module config besides the running one; default `keep_kernels` from kvcd.toml (3).
    #[arg(long, value_name = "N")]
    keep: Option<usize>,
    /// Say what would go, remove nothing.
    #[arg(long)]
    dry_run: bool,
    /// Print one JSON document.
    #[arg(long)]
    json: bool,
    /// Only these module configs; default every config with artifacts.
    #[arg(value_name = "NAME")]
    names: Vec<String>,
}

/// Runs `kvcd prune`; returns the exit code.
pub(super) fn run(paths: &PathArgs, args: &PruneArgs) -> Result<u8> {
    let config = paths.load_strict()?;
    let d = &config.daemon;
    let _lock = lock_state(d)?;
    let keep = args.keep.unwrap_or(d.keep_kernels);
    let running = KernelRelease::running()?;
    let records = RecordStore::new(&d.runtime_dir);
    let podman = Podman::from_settings(d);
    let names: Vec<String> = if args.names.is_empty() {
        crate::state::Layout::configs_with_artifacts(&d.state_dir)
            .into_iter()
            .collect()
    } else {
        args.names.clone()
    };
    let mut results = Vec::new();
    for name in &names {
        let record = records.get(name)?;
        let mut protect = vec![running.to_string()];
        protect.extend(record.as_ref().map(|r| r.kernel.clone()));
        let protect: Vec<&str> = protect.iter().map(String::as_str).collect();
        // A config that no longer exists and has nothing loaded keeps nothing.
        let n = if config.modules.contains_key(name) || record.is_some() {
            keep
        } else {
            0
        };
        let p = prune_config(&d.state_dir, Some(&podman), name, n, &protect, args.dry_run)?;
        if !args.json {
            let verb = if args.dry_run {
                "would remove"
            } else {
                "removed"
            };
            if p.kernels.is_empty() {
                println!("{name}: nothing to prune");
            } else {
                println!(
                    "{name}: {verb} artifacts of kernel(s) {}",
                    p.kernels.join(", ")
                );
                for i in &p.images {
                    println!("{name}: {verb} image {i}");
                }
            }
        }
        results.push(p);
    }
    if args.json {
        let doc = serde_json::json!({ "dry_run": args.dry_run, "results": results });
        println!("{doc:#}");
    }
    Ok(0)
}
