//! Podman, driven through its CLI (`--format json` where it has one).
//!
//! Every call is counted, so callers (and tests) can tell whether a path
//! spawned podman at all. Output is handed line by line to a sink (the log)
//! while the command runs; on failure the error carries podman's own cause
//! and the last lines it printed.

use std::cell::Cell;
use std::collections::{BTreeMap, VecDeque};
use std::io::{BufRead as _, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;

use anyhow::{Context as _, Result, bail};
use serde::Deserialize;

/// Label on images kvcd built.
pub const BUILT_LABEL: &str = "org.kvcd.built";
/// How many lines of output an error keeps.
const TAIL: usize = 12;

/// A line sink for podman's output.
pub type LineSink<'a> = &'a dyn Fn(&str);

/// The podman CLI.
#[derive(Debug)]
pub struct Podman {
    program: PathBuf,
    calls: Cell<usize>,
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

/// Sends each line of `stream` to `tx`, tagged with `is_stdout`.
fn spawn_lines(
    stream: impl Read + Send + 'static,
    is_stdout: bool,
    tx: mpsc::Sender<(bool, String)>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            if tx.send((is_stdout, line)).is_err() {
                break;
            }
        }
    })
}

/// The registry host of an image reference (`docker.io` for short names).
pub fn registry_of(reference: &str) -> &str {
    match reference.split_once('/') {
        Some((first, _)) if first.contains(['.', ':']) || first == "localhost" => first,
        _ => "docker.io",
    }
}

impl Podman {
    /// Podman at `program` (a name looked up in `PATH`, or a path).
    pub fn new(program: &Path) -> Self {
        Self {
            program: program.to_owned(),
            calls: Cell::new(0),
        }
    }

    /// The program this runs.
    pub fn program(&self) -> &Path {
        &self.program
    }

    /// How many podman processes this value has spawned.
    pub fn calls(&self) -> usize {
        self.calls.get()
    }

    fn run(&self, args: &[String], sink: Option<LineSink<'_>>) -> Result<Run> {
        self.calls.set(self.calls.get() + 1);
        let mut child = Command::new(&self.program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("running {}", self.program.display()))?;
        // Both streams, line by line as they come: a long build shows that it is alive.
        let (tx, rx) = mpsc::channel::<(bool, String)>();
        let readers = [
            spawn_lines(
                child.stdout.take().context("podman stdout")?,
                true,
                tx.clone(),
            ),
            spawn_lines(child.stderr.take().context("podman stderr")?, false, tx),
        ];
        let mut stdout = String::new();
        let mut tail = VecDeque::with_capacity(TAIL);
        for (is_stdout, line) in rx {
            if is_stdout {
                stdout.push_str(&line);
                stdout.push('\n');
            }
            if let Some(sink) = sink {
                sink(&line);
            }
            if tail.len() == TAIL {
                tail.pop_front();
            }
            tail.push_back(line);
        }
        for r in readers {
            let _ = r.join();
        }
        let status = child.wait().context("waiting for podman")?;
        Ok(Run {
            ok: status.success(),
            status: status.to_string(),
            stdout,
            tail: tail.into(),
        })
    }

    /// The image `reference` in local storage, if present.
    pub fn inspect(&self, reference: &str) -> Result<Option<ImageInfo>> {
        let args = ["image", "inspect", "--format", "json", reference].map(String::from);
        let run = self.run(&args, None)?;
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
        args.push(reference.to_owned());
        let run = self.run(&args, Some(sink))?;
        if !run.ok {
            bail!(
                "pulling {reference} from registry {}: {}",
                registry_of(reference),
                run.cause()
            );
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
        args.push(build.context.to_owned());
        let run = self.run(&args, Some(sink))?;
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
        let run = self.run(&["rmi", "--force", reference].map(String::from), None)?;
        if !run.ok {
            bail!("removing image {reference}: {}", run.cause());
        }
        Ok(())
    }

    /// Mounts the image's root file system read-only; returns the path.
    pub fn mount(&self, image_id: &str) -> Result<PathBuf> {
        let run = self.run(&["image", "mount", image_id].map(String::from), None)?;
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
        let run = self.run(&["image", "unmount", image_id].map(String::from), None)?;
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
            status: "exit status: 125".into(),
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
        assert_eq!(run.cause(), "podman exited with exit status: 125");
    }

    #[test]
    fn a_missing_podman_is_a_clear_error() {
        let p = Podman::new(Path::new("/nonexistent/podman"));
        let e = p.inspect("x").unwrap_err();
        assert!(
            format!("{e:#}").starts_with("running /nonexistent/podman"),
            "{e:#}"
        );
        assert_eq!(p.calls(), 1);
    }
}
