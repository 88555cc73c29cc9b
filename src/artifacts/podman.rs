//! Podman, driven through its CLI (`--format json` where it has one).
//!
//! Every call is counted, so callers (and tests) can tell whether a path
//! spawned podman at all. Every call runs through the one process runner
//! ([`crate::hooks::run_tailed`]): its own process group, a timeout, TERM then
//! KILL of the group. Output is handed line by line to a sink (the log)
//! while the command runs; on failure the error carries podman's own cause
//! and the last lines it printed. Positional arguments (references, IDs,
//! paths) come after `--`, so none is ever taken for an option.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail};
use serde::Deserialize;

use crate::hooks::{Ran, RunError, TailOf, describe, run_tailed};

/// Label on images kvcd built.
pub const BUILT_LABEL: &str = "org.kvcd.built";
/// Default for `pull_timeout_seconds`: a slow registry and a big image.
pub const DEFAULT_PULL_TIMEOUT: u64 = 900;
/// Default for `podman_timeout_seconds` (inspect, mount, unmount, rmi).
pub const DEFAULT_PODMAN_TIMEOUT: u64 = 120;
/// How many lines of output an error keeps.
const TAIL: usize = 12;

/// A line sink for podman's output.
pub type LineSink<'a> = &'a dyn Fn(&str);

/// The podman CLI.
#[derive(Debug)]
pub struct Podman {
    program: PathBuf,
    calls: Cell<usize>,
    pull_timeout: Duration,
    short_timeout: Duration,
}

/// What `podman image inspect` says about an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    /// Image ID (sha256 hex).
    pub id: String,
    /// The manifest digest it was pulled by, if any (`sha256:…`).
    pub digest: Option<String>,
    /// Labels.
    pub labels: BTreeMap<String, String>,
}

impl ImageInfo {
    /// The identity used for caching: the manifest digest, else the image ID.
    pub fn identity(&self) -> String {
        self.digest
            .clone()
            .unwrap_or_else(|| format!("sha256:{}", self.id.trim_start_matches("sha256:")))
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RawInspect {
    id: String,
    #[serde(default)]
    digest: Option<String>,
    #[serde(default)]
    labels: Option<BTreeMap<String, String>>,
}

/// The output of a finished podman run.
struct Run {
    ok: bool,
    status: String,
    stdout: String,
    tail: Vec<String>,
}

impl Run {
    /// Podman's own reason: its last `Error: …` line, else the last line.
    fn cause(&self) -> String {
        self.tail
            .iter()
            .rev()
            .find_map(|l| l.strip_prefix("Error: "))
            .or_else(|| self.tail.last().map(String::as_str))
            .map_or_else(
                || format!("podman exited with {}", self.status),
                str::to_owned,
            )
    }
}

/// The registry host of an image reference (`docker.io` for short names).
pub fn registry_of(reference: &str) -> &str {
    match reference.split_once('/') {
        Some((first, _)) if first.contains(['.', ':']) || first == "localhost" => first,
        _ => "docker.io",
    }
}

impl Podman {
    /// Podman at `program` (a name looked up in `PATH`, or a path), with the default timeouts.
    pub fn new(program: &Path) -> Self {
        Self {
            program: program.to_owned(),
            calls: Cell::new(0),
            pull_timeout: Duration::from_secs(DEFAULT_PULL_TIMEOUT),
            short_timeout: Duration::from_secs(DEFAULT_PODMAN_TIMEOUT),
        }
    }

    /// Podman with the program and timeouts of `settings` (kvcd.toml).
    pub fn from_settings(settings: &crate::config::DaemonSettings) -> Self {
        Self::new(&settings.podman).with_timeouts(
            Duration::from_secs(settings.pull_timeout_seconds),
            Duration::from_secs(settings.podman_timeout_seconds),
        )
    }

    /// The same podman with other timeouts: `pull` for pulls, `short` for inspect, mount, unmount and rmi.
    #[must_use]
    pub fn with_timeouts(mut self, pull: Duration, short: Duration) -> Self {
        self.pull_timeout = pull;
        self.short_timeout = short;
        self
    }

    /// The program this runs.
    pub fn program(&self) -> &Path {
        &self.program
    }

    /// How many podman processes this value has spawned.
    pub fn calls(&self) -> usize {
        self.calls.get()
    }

    /// Runs `podman ARGS` (`what` names the call, e.g. `pull`, in errors) with `timeout`.
    fn run(
        &self,
        what: &str,
        args: &[String],
        timeout: Duration,
        sink: Option<LineSink<'_>>,
    ) -> Result<Run> {
        self.calls.set(self.calls.get() + 1);
        let mut cmd = Command::new(&self.program);
        cmd.args(args);
        // Both streams, line by line as they come: a long build shows that it is alive.
        let mut stdout = String::new();
        let Ran { result, tail } =
            run_tailed(cmd, timeout, TAIL, TailOf::Both, &mut |is_stderr, line| {
                if !is_stderr {
                    stdout.push_str(line);
                    stdout.push('\n');
                }
                if let Some(sink) = sink {
                    sink(line);
                }
            });
        match result {
            Ok(status) => Ok(Run {
                ok: status.success(),
                status: describe(status),
                stdout,
                tail,
            }),
            Err(RunError::Spawn(e)) => {
                Err(anyhow!(e).context(format!("running {}", self.program.display())))
            }
            Err(RunError::TimedOut) => {
                let mut msg = format!(
                    "podman {what} timed out after {}s; its process group was killed",
                    timeout.as_secs()
                );
                if !tail.is_empty() {
                    msg.push_str("; last lines:\n  ");
                    msg.push_str(&tail.join("\n  "));
                }
                Err(anyhow!(msg))
            }
        }
    }

    /// The image `reference` in local storage, if present.
    pub fn inspect(&self, reference: &str) -> Result<Option<ImageInfo>> {
        let args = ["image", "inspect", "--format", "json", "--", reference].map(String::from);
        let run = self
            .run("image inspect", &args, self.short_timeout, None)
            .map_err(|e| e.context(format!("inspecting image {reference}")))?;
        if !run.ok {
            let cause = run.cause();
            if cause.contains("no such image") || cause.contains("image not known") {
                return Ok(None);
            }
            bail!("inspecting image {reference}: {cause}");
        }
        let mut list: Vec<RawInspect> = serde_json::from_str(&run.stdout)
            .with_context(|| format!("reading `podman image inspect` output for {reference}"))?;
        let Some(raw) = list.pop() else {
            return Ok(None);
        };
        Ok(Some(ImageInfo {
            id: raw.id,
            digest: raw.digest.filter(|d| !d.is_empty()),
            labels: raw.labels.unwrap_or_default(),
        }))
    }

    /// Pulls `reference`; the error names the registry, the reference and podman's cause.
    pub fn pull(
        &self,
        reference: &str,
        auth_file: Option<&Path>,
        tls_verify: bool,
        sink: LineSink<'_>,
    ) -> Result<()> {
        let mut args = vec!["pull".to_owned(), format!("--tls-verify={tls_verify}")];
        if let Some(a) = auth_file {
            args.push(format!("--authfile={}", a.display()));
        }
        args.push("--".to_owned());
        args.push(reference.to_owned());
        let what = || {
            format!(
                "pulling {reference} from registry {}",
                registry_of(reference)
            )
        };
        let run = self
            .run("pull", &args, self.pull_timeout, Some(sink))
            .map_err(|e| e.context(what()))?;
        if !run.ok {
            bail!("{}: {}", what(), run.cause());
        }
        Ok(())
    }

    /// Builds an image tagged `tag`; the error carries the build's last lines.
    pub fn build(&self, build: &BuildArgs<'_>, sink: LineSink<'_>) -> Result<()> {
        let mut args = vec![
            "build".to_owned(),
            format!("--tag={}", build.tag),
            format!("--file={}", build.file),
            format!("--label={BUILT_LABEL}={}", build.config),
            "--pull=missing".to_owned(),
        ];
        for (k, v) in build.args {
            args.push(format!("--build-arg={k}={v}"));
        }
        if let Some(a) = build.auth_file {
            args.push(format!("--authfile={}", a.display()));
        }
        for (id, src) in build.secrets {
            args.push(format!("--secret=id={id},src={}", src.display()));
        }
        if build.no_cache {
            args.push("--no-cache".to_owned());
        }
        args.push("--".to_owned());
        args.push(build.context.to_owned());
        let run = self
            .run("build", &args, build.timeout, Some(sink))
            .map_err(|e| e.context(format!("building {} from {}", build.tag, build.context)))?;
        if !run.ok {
            bail!(
                "building {} from {} failed ({}); last lines:\n  {}",
                build.tag,
                build.context,
                run.status,
                run.tail.join("\n  ")
            );
        }
        Ok(())
    }

    /// Removes an image from local storage (all its names when given by reference).
    pub fn remove_image(&self, reference: &str) -> Result<()> {
        let args = ["rmi", "--force", "--", reference].map(String::from);
        let run = self
            .run("rmi", &args, self.short_timeout, None)
            .map_err(|e| e.context(format!("removing image {reference}")))?;
        if !run.ok {
            bail!("removing image {reference}: {}", run.cause());
        }
        Ok(())
    }

    /// Removes every container (running or not) that carries `label`
    /// (`KEY=VALUE`); returns their IDs.
    pub fn remove_labelled_containers(&self, label: &str) -> Result<Vec<String>> {
        let filter = format!("label={label}");
        let args = ["ps", "-aq", "--filter", &filter].map(String::from);
        let run = self
            .run("ps", &args, self.short_timeout, None)
            .map_err(|e| e.context(format!("looking for containers labelled {label}")))?;
        if !run.ok {
            bail!("looking for containers labelled {label}: {}", run.cause());
        }
        let ids: Vec<String> = run
            .stdout
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect();
        if ids.is_empty() {
            return Ok(ids);
        }
        let mut args = ["rm", "--force", "--time", "0", "--"]
            .map(String::from)
            .to_vec();
        args.extend(ids.iter().cloned());
        let run = self
            .run("rm", &args, self.short_timeout, None)
            .map_err(|e| e.context(format!("removing container(s) {}", ids.join(" "))))?;
        if !run.ok {
            bail!("removing container(s) {}: {}", ids.join(" "), run.cause());
        }
        Ok(ids)
    }

    /// Mounts the image's root file system read-only; returns the path.
    pub fn mount(&self, image_id: &str) -> Result<PathBuf> {
        let args = ["image", "mount", "--", image_id].map(String::from);
        let run = self
            .run("image mount", &args, self.short_timeout, None)
            .map_err(|e| e.context(format!("mounting image {image_id}")))?;
        if !run.ok {
            bail!("mounting image {image_id}: {}", run.cause());
        }
        let path = run.stdout.trim();
        if path.is_empty() {
            bail!("mounting image {image_id}: podman printed no mount point");
        }
        Ok(PathBuf::from(path))
    }

    /// Unmounts an image mounted by [`Podman::mount`].
    pub fn unmount(&self, image_id: &str) -> Result<()> {
        let args = ["image", "unmount", "--", image_id].map(String::from);
        let run = self
            .run("image unmount", &args, self.short_timeout, None)
            .map_err(|e| e.context(format!("unmounting image {image_id}")))?;
        if !run.ok {
            bail!("unmounting image {image_id}: {}", run.cause());
        }
        Ok(())
    }
}

/// What `podman build` is asked to do.
#[derive(Debug)]
pub struct BuildArgs<'a> {
    /// Module config name (recorded in the label).
    pub config: &'a str,
    /// Tag for the result.
    pub tag: &'a str,
    /// Context directory or git URL.
    pub context: &'a str,
    /// Containerfile name within the context.
    pub file: &'a str,
    /// Expanded `--build-arg`s.
    pub args: &'a BTreeMap<String, String>,
    /// `--secret` entries.
    pub secrets: &'a BTreeMap<String, PathBuf>,
    /// Ignore cached layers (a rebuild after a bad result).
    pub no_cache: bool,
    /// Credentials for pulling base images (the config's `image.auth_file`).
    pub auth_file: Option<&'a Path>,
    /// Longest the build may take (the config's `hooks.build_timeout_seconds`, default 1500 s).
    pub timeout: Duration,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_of_reference() {
        assert_eq!(registry_of("127.0.0.1:5000/kvcd/x:1"), "127.0.0.1:5000");
        assert_eq!(registry_of("quay.io/acme/driver@sha256:ab"), "quay.io");
        assert_eq!(registry_of("localhost/x"), "localhost");
        assert_eq!(registry_of("acme/driver:1"), "docker.io");
        assert_eq!(registry_of("busybox"), "docker.io");
    }

    #[test]
    fn cause_prefers_podmans_error_line() {
        let run = Run {
            ok: false,
            status: "exit status 125".into(),
            stdout: String::new(),
            tail: vec![
                "Trying to pull x...".into(),
                "Error: initializing source x: unauthorized".into(),
            ],
        };
        assert_eq!(run.cause(), "initializing source x: unauthorized");
        let run = Run {
            tail: vec![],
            ..run
        };
        assert_eq!(run.cause(), "podman exited with exit status 125");
    }

    #[test]
    fn a_missing_podman_is_a_clear_error() {
        let p = Podman::new(Path::new("/nonexistent/podman"));
        let e = p.inspect("x").unwrap_err();
        assert!(
            format!("{e:#}").starts_with("inspecting image x: running /nonexistent/podman"),
            "{e:#}"
        );
        assert_eq!(p.calls(), 1);
    }

    #[test]
    fn a_hanging_podman_is_killed_with_its_group_and_the_call_named() {
        let dir = tempfile::tempdir().unwrap();
        let fake = dir.path().join("podman");
        let pidfile = dir.path().join("child.pid");
        std::fs::write(
            &fake,
            format!(
                "#!/bin/sh\nsleep 300 & echo $! > {}\necho \"args: $*\"\nwait\n",
                pidfile.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let p = Podman::new(&fake).with_timeouts(Duration::from_secs(1), Duration::from_secs(1));
        let e = p.inspect("reg.example/x:1").unwrap_err();
        assert_eq!(
            format!("{e:#}"),
            "inspecting image reg.example/x:1: podman image inspect timed out after 1s; \
             its process group was killed; last lines:\n  \
             args: image inspect --format json -- reg.example/x:1"
        );
        // The background child got SIGKILL with the group; give the kernel a
        // moment to deliver it before looking.
        let pid = std::fs::read_to_string(&pidfile).unwrap();
        let gone = || {
            std::fs::read_to_string(format!("/proc/{}/stat", pid.trim()))
                .map_or(true, |s| s.contains(") Z ") || s.contains(") X "))
        };
        for _ in 0..100 {
            if gone() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(gone(), "the group was not killed");
        let e = p.pull("reg.example/x:1", None, false, &|_| {}).unwrap_err();
        assert!(
            format!("{e:#}").starts_with(
                "pulling reg.example/x:1 from registry reg.example: podman pull timed out after 1s; its process group was killed"
            ),
            "{e:#}"
        );
    }
}
