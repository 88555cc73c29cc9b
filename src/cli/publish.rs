//! `kvcd publish`: driver images for a list of kernels, built (or taken from
//! local storage), verified as a node verifies them, and pushed under each
//! config's `image.ref`; a kernel whose tag the registry has already is
//! skipped. Run by a CI matrix or a Kubernetes Job, so that nodes pull
//! (`pull = "missing"`) instead of building.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};
use clap::Args;
use serde::Serialize;

use super::apply::print_step;
use super::{EXIT_FAILED, PathArgs, lock_state};
use crate::artifacts::podman::{Podman, split_tag};
use crate::config::{Config, ModuleConfig, PullPolicy, Source};
use crate::kernel::{KernelRelease, TemplateVars, expand};
use crate::reconciler::{Engine, OnStep, State, order};

/// `kvcd publish` arguments.
#[derive(Debug, Args)]
pub(super) struct PublishArgs {
    /// A kernel release to publish for; repeat for several.
    #[arg(long = "kernel", value_name = "RELEASE")]
    kernels: Vec<String>,
    /// A file of kernel releases, one per line (blank lines and `#` comments skipped); repeatable.
    #[arg(long, value_name = "FILE")]
    kernels_from: Vec<PathBuf>,
    /// Also the kernels this node may boot next, as `kvcd prepare-next` finds them under --sysroot.
    #[arg(long)]
    next: bool,
    /// The node's root for --next.
    #[arg(long, value_name = "DIR", default_value = "/")]
    sysroot: PathBuf,
    /// Build and verify, but push nothing.
    #[arg(long)]
    dry_run: bool,
    /// Print one JSON document instead of progress lines.
    #[arg(long)]
    json: bool,
    /// Module configs to publish; default every valid config with an `[image]`.
    #[arg(value_name = "NAME")]
    names: Vec<String>,
}

/// What publishing one config for one kernel came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum Action {
    /// Built or found locally, verified and pushed.
    Pushed,
    /// The registry has the tag already: nothing was built or pushed.
    Exists,
    /// Verified, not pushed (`--dry-run`).
    Verified,
    /// Not for this kernel (`kernel_match`).
    Skipped,
    /// Something failed; `detail` says what.
    Failed,
}

/// One line of the report.
#[derive(Debug, Clone, Serialize)]
pub(super) struct Published {
    /// Module config name.
    pub config: String,
    /// Kernel release.
    pub kernel: String,
    /// The image reference for this kernel, when it could be expanded.
    pub image: Option<String>,
    /// What happened.
    pub action: Action,
    /// The manifest digest pushed.
    pub digest: Option<String>,
    /// True when the image was built by this run; false when it was in local storage.
    pub built: Option<bool>,
    /// The reason or the error.
    pub detail: String,
}

impl Published {
    fn new(config: &str, kernel: &KernelRelease, image: Option<&str>) -> Self {
        Self {
            config: config.to_owned(),
            kernel: kernel.to_string(),
            image: image.map(str::to_owned),
            action: Action::Failed,
            digest: None,
            built: None,
            detail: String::new(),
        }
    }

    fn with(mut self, action: Action, detail: impl Into<String>) -> Self {
        self.action = action;
        self.detail = detail.into();
        self
    }

    /// Prints the line; in the journal, with the config's and the kernel's fields.
    fn print(&self) {
        super::print_result(&self.config, &self.kernel, &self.line());
    }

    fn line(&self) -> String {
        let image = self.image.as_deref().unwrap_or("-");
        let what = match self.action {
            Action::Pushed => format!(
                "pushed {image} ({}{})",
                self.digest.as_deref().unwrap_or("?"),
                if self.built == Some(true) {
                    ", built"
                } else {
                    ", from local storage"
                }
            ),
            Action::Exists => format!("{image} exists in the registry: skipped"),
            Action::Verified => format!("verified {image}; not pushed (--dry-run)"),
            Action::Skipped => format!("skipped: {}", self.detail),
            Action::Failed => format!("failed: {}", self.detail),
        };
        format!("{} {}: {what}", self.config, self.kernel)
    }
}

/// Reads a kernel list: one release per line; blank lines and `#` comments
/// are skipped. An error names the file, the line and what was expected.
pub(super) fn parse_kernel_list(file: &Path, text: &str) -> Result<Vec<KernelRelease>> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let k = KernelRelease::parse(line).with_context(|| {
            format!(
                "{}:{}: expected a kernel release (as `uname -r` prints it), got {line:?}",
                file.display(),
                i + 1
            )
        })?;
        out.push(k);
    }
    Ok(out)
}

/// `kernels` without repeats, in first-seen order.
fn dedup(kernels: Vec<Target>) -> Vec<Target> {
    let mut seen = BTreeSet::new();
    kernels
        .into_iter()
        .filter(|(k, _)| seen.insert(k.to_string()))
        .collect()
}

/// The configs to publish, in load order, and a failure for each name that cannot be.
fn choose<'c>(
    config: &'c Config,
    names: &[String],
    kernel: &KernelRelease,
) -> (Vec<&'c ModuleConfig>, Vec<Published>) {
    let chosen: Vec<String> = if names.is_empty() {
        config
            .modules
            .keys()
            .filter(|n| {
                config
                    .module(n)
                    .is_ok_and(|c| matches!(c.source, Source::Image(_)))
            })
            .cloned()
            .collect()
    } else {
        names.to_vec()
    };
    let mut ok = Vec::new();
    let mut bad = Vec::new();
    for n in order::load_order(&chosen, &config.after_map()) {
        match config.module(&n) {
            Ok(c) if matches!(c.source, Source::Image(_)) => ok.push(c),
            Ok(_) => bad.push(Published::new(&n, kernel, None).with(
                Action::Failed,
                "not an image config: publish pushes driver images ([image] in the config)",
            )),
            Err(e) => {
                bad.push(Published::new(&n, kernel, None).with(Action::Failed, e.to_string()))
            }
        }
    }
    (ok, bad)
}

/// A repository as asked: its name, the credentials file and `tls_verify`.
type RepoKey = (String, Option<PathBuf>, bool);

/// A kernel to publish for, with the module tree it boots with when that is not `kernel_modules_dir`'s.
type Target = (KernelRelease, Option<PathBuf>);

/// The registry's tags, asked once per repository and credentials.
struct Tags<'p> {
    podman: &'p Podman,
    known: BTreeMap<RepoKey, Result<BTreeSet<String>, String>>,
}

impl Tags<'_> {
    fn of(
        &mut self,
        repo: &str,
        auth: Option<&Path>,
        tls: bool,
    ) -> &mut Result<BTreeSet<String>, String> {
        let key = (repo.to_owned(), auth.map(Path::to_owned), tls);
        let podman = self.podman;
        self.known.entry(key).or_insert_with(|| {
            podman
                .list_tags(repo, auth, tls)
                .map(|t| t.into_iter().collect())
                .map_err(|e| format!("{e:#}"))
        })
    }
}

/// Publishes `c` for the engine's kernel.
fn publish_one(
    engine: &Engine<'_>,
    c: &ModuleConfig,
    tags: &mut Tags<'_>,
    digest_file: &Path,
    dry_run: bool,
    sink: &dyn Fn(&str),
) -> Published {
    let kernel = &engine.kernel;
    let name = c.name.as_str();
    let Source::Image(src) = &c.source else {
        return Published::new(name, kernel, None).with(Action::Failed, "not an image config");
    };
    if !c.supports(kernel) {
        return Published::new(name, kernel, None)
            .with(Action::Skipped, "kernel_match does not cover this kernel");
    }
    let vars = TemplateVars::for_config(kernel, name, c.version.as_deref());
    let reference = match expand(&src.reference, &vars) {
        Ok(r) => r,
        Err(e) => {
            return Published::new(name, kernel, None)
                .with(Action::Failed, format!("image.ref: {e}"));
        }
    };
    let p = Published::new(name, kernel, Some(&reference));
    let Some((repo, tag)) = split_tag(&reference) else {
        return p.with(
            Action::Failed,
            format!(
                "image.ref {reference} has no tag to publish under (a digest names an image already published)"
            ),
        );
    };
    match tags.of(repo, src.auth_file.as_deref(), src.tls_verify) {
        Err(e) => {
            return p.with(
                Action::Failed,
                format!("cannot tell whether the registry has {reference}: {e}"),
            );
        }
        Ok(t) if t.contains(tag) => return p.with(Action::Exists, "the registry has this tag"),
        Ok(_) => {}
    }
    // The registry lacks it: build (or take local storage's), never pull;
    // the devices of this machine do not matter.
    let mut local = c.clone();
    if let Source::Image(s) = &mut local.source {
        s.pull = PullPolicy::Never;
    }
    local.devices = crate::devices::DeviceMatch::default();
    let outcome = engine.prepare(&local);
    let mut p = p;
    p.built = Some(outcome.built_image);
    if outcome.state != State::Prepared {
        let detail = outcome.error.as_ref().map_or_else(
            || format!("ended {}", outcome.state),
            |e| format!("{}: {}", e.step.as_str(), e.message),
        );
        return p.with(Action::Failed, detail);
    }
    if dry_run {
        return p.with(Action::Verified, "verified; --dry-run pushes nothing");
    }
    let podman = tags.podman;
    match podman.push(
        &reference,
        digest_file,
        src.auth_file.as_deref(),
        src.tls_verify,
        sink,
    ) {
        Ok(digest) => {
            if let Ok(t) = tags.of(repo, src.auth_file.as_deref(), src.tls_verify) {
                t.insert(tag.to_owned());
            }
            p.digest = Some(digest);
            p.with(Action::Pushed, "verified and pushed")
        }
        Err(e) => p.with(Action::Failed, format!("{e:#}")),
    }
}

/// The kernels asked for: `--kernel`, `--kernels-from`, then `--next` (with
/// the module tree each boots with), without repeats.
fn kernels(args: &PublishArgs, config: &Config) -> Result<(Vec<Target>, Vec<String>)> {
    let mut out = Vec::new();
    for k in &args.kernels {
        out.push((
            KernelRelease::parse(k).with_context(|| format!("--kernel {k:?}"))?,
            None,
        ));
    }
    for f in &args.kernels_from {
        let text = std::fs::read_to_string(f)
            .with_context(|| format!("--kernels-from: reading {}", f.display()))?;
        out.extend(parse_kernel_list(f, &text)?.into_iter().map(|k| (k, None)));
    }
    let mut notes = Vec::new();
    if args.next {
        let running = KernelRelease::running()?;
        let found =
            crate::boot::discover(&args.sysroot, &config.daemon.kernel_modules_dir, &running);
        notes = found.notes;
        out.extend(
            found
                .kernels
                .into_iter()
                .map(|k| (k.release, Some(k.modules_dir))),
        );
    }
    let out = dedup(out);
    if out.is_empty() {
        bail!(
            "no kernel to publish for: give --kernel RELEASE, --kernels-from FILE or --next{}",
            if args.next {
                format!(
                    " (--next found no kernel besides the running one under {})",
                    args.sysroot.display()
                )
            } else {
                String::new()
            }
        );
    }
    Ok((out, notes))
}

/// Runs `kvcd publish`; returns the exit code (1 when anything failed).
pub(super) fn run(paths: &PathArgs, args: &PublishArgs) -> Result<u8> {
    let config = paths.load_strict()?;
    let (kernels, notes) = kernels(args, &config)?;
    let d = &config.daemon;
    let _lock = lock_state(d)?;
    let kmods = crate::kmod::open()?;
    let podman = Podman::from_settings(d);
    let mut tags = Tags {
        podman: &podman,
        known: BTreeMap::new(),
    };
    let digest_file = d
        .runtime_dir
        .join(format!("publish-{}.digest", std::process::id()));
    std::fs::create_dir_all(&d.runtime_dir)
        .with_context(|| format!("creating {}", d.runtime_dir.display()))?;
    let on_step: &OnStep<'_> = &print_step;
    let quiet = |_: &str| {};
    let loud = |l: &str| println!("  {l}");
    let sink: &dyn Fn(&str) = if args.json { &quiet } else { &loud };
    if !args.json {
        for n in &notes {
            println!("publish: {n}");
        }
    }
    let protect: Vec<String> = kernels.iter().map(|(k, _)| k.to_string()).collect();
    let mut results = Vec::new();
    for (kernel, tree) in &kernels {
        let (configs, bad) = choose(&config, &args.names, kernel);
        let mut engine = Engine::from_settings(d, kernel, &*kmods, (!args.json).then_some(on_step));
        if let Some(tree) = tree {
            engine = engine.for_tree(tree.clone(), protect.clone());
        }
        for p in bad {
            if !args.json {
                p.print();
            }
            results.push(p);
        }
        for c in configs {
            let p = publish_one(&engine, c, &mut tags, &digest_file, args.dry_run, sink);
            if !args.json {
                p.print();
            }
            results.push(p);
        }
    }
    if args.json {
        let doc = serde_json::json!({
            "kernels": kernels.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(),
            "results": results,
            "notes": notes,
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
    }
    Ok(if results.iter().any(|p| p.action == Action::Failed) {
        EXIT_FAILED
    } else {
        0
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kernel_list_skips_comments_and_blank_lines_and_names_a_bad_line() {
        let f = Path::new("/etc/kvcd/kernels.txt");
        let got = parse_kernel_list(
            f,
            "# the fleet's kernels\n6.1.0-57-amd64\n\n  6.12.9-200.fc41.x86_64  # next\n",
        )
        .unwrap();
        let got: Vec<_> = got.iter().map(KernelRelease::as_str).collect();
        assert_eq!(got, ["6.1.0-57-amd64", "6.12.9-200.fc41.x86_64"]);
        let e = parse_kernel_list(f, "6.1.0-57-amd64\nnot a kernel\n").unwrap_err();
        let msg = format!("{e:#}");
        assert!(
            msg.starts_with("/etc/kvcd/kernels.txt:2: expected a kernel release"),
            "{msg}"
        );
        assert!(parse_kernel_list(f, "").unwrap().is_empty());
    }

    #[test]
    fn repeated_kernels_are_published_once_in_first_seen_order() {
        let k = |s: &str| (KernelRelease::parse(s).unwrap(), None);
        let got = dedup(vec![
            k("6.1.0-2-amd64"),
            k("6.1.0-1-amd64"),
            k("6.1.0-2-amd64"),
        ]);
        let got: Vec<_> = got.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(got, ["6.1.0-2-amd64", "6.1.0-1-amd64"]);
    }

    #[test]
    fn report_lines_say_what_happened() {
        let k = KernelRelease::parse("6.1.0-57-amd64").unwrap();
        let mut p = Published::new("nic", &k, Some("r/nic:6.1.0-57-amd64"));
        p.digest = Some("sha256:ab".into());
        p.built = Some(true);
        assert_eq!(
            p.clone().with(Action::Pushed, "").line(),
            "nic 6.1.0-57-amd64: pushed r/nic:6.1.0-57-amd64 (sha256:ab, built)"
        );
        assert_eq!(
            p.clone().with(Action::Exists, "").line(),
            "nic 6.1.0-57-amd64: r/nic:6.1.0-57-amd64 exists in the registry: skipped"
        );
        assert_eq!(
            p.with(Action::Failed, "verify: vermagic").line(),
            "nic 6.1.0-57-amd64: failed: verify: vermagic"
        );
    }
}
