//! Podman, driven through its CLI (`--format json` where it has one).
//!
//! Callers use the narrow [`ContainerTool`] trait; [`Podman`] implements it
//! with the real CLI, and what podman prints is read by pure functions
//! ([`parse_image_inspect`], [`parse_container_ids`], [`parse_image_mount`], [`parse_pulled_id`],
//! [`is_missing_image`]) tested on captured output (`tests/fixtures/podman`).
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

/// What kvcd asks of podman: images in local storage, pulls, builds, mounts and clean-up.
pub trait ContainerTool: std::fmt::Debug {
    /// The program, for callers that hand it on (a KVC library's runtime, `kvcctl wrapper`).
    fn program(&self) -> &Path;
    /// How many podman processes this value has spawned.
    fn calls(&self) -> usize;
    /// The image `reference` in local storage, if present.
    fn inspect(&self, reference: &str) -> Result<Option<ImageInfo>>;
    /// Pulls `reference`; gives the image ID podman printed, if it printed
    /// one. The error names the registry, the reference and podman's cause.
    fn pull(
        &self,
        reference: &str,
        auth_file: Option<&Path>,
        tls_verify: bool,
        sink: LineSink<'_>,
    ) -> Result<Option<String>>;
    /// Builds an image as `build` says; the error carries the build's last lines.
    fn build(&self, build: &BuildArgs<'_>, sink: LineSink<'_>) -> Result<()>;
    /// Removes an image from local storage (all its names when given by reference).
    fn remove_image(&self, reference: &str) -> Result<()>;
    /// Removes every container (running or not) that carries `label` (`KEY=VALUE`); returns their IDs.
    fn remove_labelled_containers(&self, label: &str) -> Result<Vec<String>>;
    /// Mounts the image's root file system read-only; returns where, and the image's digest when podman says.
    fn mount(&self, image_id: &str) -> Result<Mounted>;
    /// Unmounts an image mounted by [`ContainerTool::mount`].
    fn unmount(&self, image_id: &str) -> Result<()>;
}

/// The podman CLI: the real [`ContainerTool`].
#[derive(Debug)]
pub struct Podman {
    program: PathBuf,
    calls: Cell<usize>,
    pull_timeout: Duration,
    short_timeout: Duration,
    /// Where image mounts are bound again for kvcd to see them, when podman
    /// runs in transient units (`RUNTIME/mounts`); none when it runs inline.
    shared_mounts: Option<PathBuf>,
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

/// One image of `podman image inspect --format json`, as far as kvcd reads it.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RawImage {
    id: String,
    #[serde(default)]
    digest: Option<String>,
    #[serde(default)]
    labels: Option<BTreeMap<String, String>>,
}

/// One container of `podman ps --format json`, as far as kvcd reads it.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RawContainer {
    id: String,
}

/// Reads `podman image inspect --format json` output: the last image it lists, if any.
pub fn parse_image_inspect(json: &str) -> Result<Option<ImageInfo>> {
    let list: Vec<RawImage> = serde_json::from_str(json).context(
        "expected a JSON array of images, each an object with a string \"Id\" (and optionally \"Digest\" and \"Labels\")",
    )?;
    let count = list.len();
    let Some(raw) = list.into_iter().last() else {
        return Ok(None);
    };
    if raw.id.trim().is_empty() {
        bail!("expected an image ID in \"Id\" of image {count} of {count}, found an empty string");
    }
    Ok(Some(ImageInfo {
        id: raw.id,
        digest: raw.digest.filter(|d| !d.is_empty()),
        labels: raw.labels.unwrap_or_default(),
    }))
}

/// Reads `podman ps --format json` output: the IDs of the containers it lists.
pub fn parse_container_ids(json: &str) -> Result<Vec<String>> {
    let list: Option<Vec<RawContainer>> = serde_json::from_str(json)
        .context("expected a JSON array of containers, each an object with a string \"Id\"")?;
    let ids: Vec<String> = list
        .unwrap_or_default()
        .into_iter()
        .map(|c| c.id.trim().to_owned())
        .collect();
    if let Some(i) = ids.iter().position(String::is_empty) {
        bail!(
            "expected a container ID in \"Id\" of container {} of {}, found an empty string",
            i + 1,
            ids.len()
        );
    }
    Ok(ids)
}

/// Reads what `podman image mount` printed: the mount point, an absolute path.
/// A mounted image: where, and its manifest digest when podman says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mounted {
    /// The mount point.
    pub path: PathBuf,
    /// The image's digest (`sha256:…`), if podman reports one.
    pub digest: Option<String>,
}

/// One image of `podman image mount --format json`, as far as kvcd reads it.
#[derive(Debug, Deserialize)]
struct RawMount {
    #[serde(default)]
    mountpoint: Option<String>,
    /// The image's digest (podman names the key `Names`; some versions `Name`).
    #[serde(default, alias = "Name", rename = "Names")]
    names: Option<serde_json::Value>,
}

/// Reads `podman image mount --format json` output (one image), or the
/// plain mount point older podman prints without `--format`.
pub fn parse_image_mount(stdout: &str) -> Result<Mounted> {
    let Ok(list) = serde_json::from_str::<Vec<RawMount>>(stdout) else {
        return Ok(Mounted {
            path: parse_mount_point(stdout)?,
            digest: None,
        });
    };
    let [one] = list.as_slice() else {
        bail!("expected one mounted image, podman listed {}", list.len());
    };
    let path = parse_mount_point(one.mountpoint.as_deref().unwrap_or_default())?;
    let names: Vec<&str> = match &one.names {
        Some(serde_json::Value::String(s)) => vec![s.as_str()],
        Some(serde_json::Value::Array(a)) => {
            a.iter().filter_map(serde_json::Value::as_str).collect()
        }
        _ => Vec::new(),
    };
    let digest = names
        .into_iter()
        .find(|n| {
            n.strip_prefix("sha256:")
                .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
        })
        .map(str::to_owned);
    Ok(Mounted { path, digest })
}

/// Reads the plain mount point podman prints for one image.
pub fn parse_mount_point(stdout: &str) -> Result<PathBuf> {
    let path = stdout.trim();
    if path.is_empty() {
        bail!("podman printed no mount point");
    }
    if !path.starts_with('/') || path.contains('\n') {
        bail!("expected one absolute mount point, found {path:?}");
    }
    Ok(PathBuf::from(path))
}

/// True when podman's cause says the image is not in local storage.
pub fn is_missing_image(cause: &str) -> bool {
    cause.contains("no such image") || cause.contains("image not known")
}

/// The arguments of a podman call that talks to a registry: `HEAD…
/// --tls-verify=… [--authfile=…] -- TARGET` (the target after `--`, so it is
/// never taken for an option).
fn registry_args(
    head: &[&str],
    tls_verify: bool,
    auth_file: Option<&Path>,
    target: &str,
) -> Vec<String> {
    let mut args: Vec<String> = head.iter().map(|a| (*a).to_owned()).collect();
    args.push(format!("--tls-verify={tls_verify}"));
    if let Some(a) = auth_file {
        args.push(format!("--authfile={}", a.display()));
    }
    args.push("--".to_owned());
    args.push(target.to_owned());
    args
}

/// True when `podman search --list-tags` failed because the registry does not
/// know the repository (nothing was ever pushed there).
pub fn is_unknown_repository(tail: &[String]) -> bool {
    tail.iter().any(|l| {
        l.contains("404 (Not Found)")
            || l.contains("NAME_UNKNOWN")
            || l.contains("repository name not known")
    })
}

/// One repository of `podman search --list-tags --format json`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RawTags {
    #[serde(default)]
    tags: Option<Vec<String>>,
}

/// Reads `podman search --list-tags --format json` output: every tag listed.
pub fn parse_tag_list(json: &str) -> Result<Vec<String>> {
    let list: Vec<RawTags> = serde_json::from_str(json).context(
        "expected a JSON array of repositories, each an object with a \"Tags\" array of strings",
    )?;
    Ok(list
        .into_iter()
        .flat_map(|r| r.tags.unwrap_or_default())
        .collect())
}

/// A reference split into its repository and its tag; `None` for a
/// reference by digest (it names content, not a tag to publish under) or
/// one without a tag.
pub fn split_tag(reference: &str) -> Option<(&str, &str)> {
    if reference.contains('@') {
        return None;
    }
    let (repo, tag) = reference.rsplit_once(':')?;
    // A colon before the last slash is a registry port, not a tag.
    (!tag.contains('/') && !repo.is_empty() && !tag.is_empty()).then_some((repo, tag))
}

/// Podman's own reason for a failure: its last `Error: …` line, else its last
/// line, else the exit `status`.
fn cause(tail: &[String], status: &str) -> String {
    tail.iter()
        .rev()
        .find_map(|l| l.strip_prefix("Error: "))
        .or_else(|| tail.last().map(String::as_str))
        .map_or_else(|| format!("podman exited with {status}"), str::to_owned)
}

/// The output of a finished podman run.
struct Run {
    ok: bool,
    status: String,
    stdout: String,
    tail: Vec<String>,
}

impl Run {
    /// Podman's own reason for the failure.
    fn cause(&self) -> String {
        cause(&self.tail, &self.status)
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
            shared_mounts: None,
        }
    }

    /// Podman with the program and timeouts of `settings` (kvcd.toml); when
    /// commands run in transient units, image mounts are shared through the
    /// runtime directory.
    pub fn from_settings(settings: &crate::config::DaemonSettings) -> Self {
        let mut p = Self::new(&settings.podman).with_timeouts(
            Duration::from_secs(settings.pull_timeout_seconds),
            Duration::from_secs(settings.podman_timeout_seconds),
        );
        if crate::hooks::unit::placement() == crate::hooks::unit::Placement::Units {
            p.shared_mounts = Some(settings.runtime_dir.join("mounts"));
        }
        p
    }

    /// Runs a helper (`mount`, `umount`) for `what` with the short timeout.
    fn helper(&self, what: &str, argv: &[&std::ffi::OsStr]) -> Result<()> {
        let mut cmd = Command::new(argv[0]);
        cmd.args(&argv[1..]);
        let Ran { result, tail } =
            run_tailed(cmd, self.short_timeout, TAIL, TailOf::Both, &mut |_, _| {});
        match result {
            Ok(status) if status.success() => Ok(()),
            Ok(status) => bail!("{what}: {}", cause(&tail, &describe(status))),
            Err(RunError::Spawn(e)) => Err(anyhow!(e).context(what.to_owned())),
            Err(RunError::TimedOut) => {
                bail!("{what}: timed out after {}s", self.short_timeout.as_secs())
            }
        }
    }

    /// The same podman with other timeouts: `pull` for pulls, `short` for inspect, mount, unmount and rmi.
    #[must_use]
    pub fn with_timeouts(mut self, pull: Duration, short: Duration) -> Self {
        self.pull_timeout = pull;
        self.short_timeout = short;
        self
    }

    /// The tags of `repository` (a reference without tag or digest) in its
    /// registry; empty when the registry does not know the repository.
    pub fn list_tags(
        &self,
        repository: &str,
        auth_file: Option<&Path>,
        tls_verify: bool,
    ) -> Result<Vec<String>> {
        let args = registry_args(
            &["search", "--list-tags", "--limit=1000000", "--format=json"],
            tls_verify,
            auth_file,
            repository,
        );
        let what = || {
            format!(
                "listing the tags of {repository} in registry {}",
                registry_of(repository)
            )
        };
        let run = self
            .run("search", &args, self.pull_timeout, None)
            .map_err(|e| e.context(what()))?;
        if !run.ok {
            if is_unknown_repository(&run.tail) {
                return Ok(Vec::new());
            }
            // "1 error occurred:" says nothing; the line after it does.
            let detail = run
                .tail
                .iter()
                .rev()
                .find(|l| l.trim_start().starts_with('*'))
                .map_or_else(
                    || run.cause(),
                    |l| l.trim_start_matches(['\t', ' ', '*']).to_owned(),
                );
            bail!("{}: {detail}", what());
        }
        parse_tag_list(&run.stdout).with_context(|| format!("{}: podman's output", what()))
    }

    /// Pushes the local image `reference` to its registry; gives the manifest digest pushed.
    pub fn push(
        &self,
        reference: &str,
        digest_file: &Path,
        auth_file: Option<&Path>,
        tls_verify: bool,
        sink: LineSink<'_>,
    ) -> Result<String> {
        let digest_arg = format!("--digestfile={}", digest_file.display());
        let args = registry_args(&["push", &digest_arg], tls_verify, auth_file, reference);
        let what = || format!("pushing {reference} to registry {}", registry_of(reference));
        let _ = std::fs::remove_file(digest_file);
        let run = self
            .run("push", &args, self.pull_timeout, Some(sink))
            .map_err(|e| e.context(what()))?;
        let digest = std::fs::read_to_string(digest_file).unwrap_or_default();
        let _ = std::fs::remove_file(digest_file);
        if !run.ok {
            bail!("{}: {}", what(), run.cause());
        }
        let digest = digest.trim();
        if !digest.starts_with("sha256:") {
            bail!(
                "{}: podman wrote no digest to {} (got {digest:?})",
                what(),
                digest_file.display()
            );
        }
        Ok(digest.to_owned())
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
}

/// The image ID `podman pull` printed last on stdout, if it is one.
pub fn parse_pulled_id(stdout: &str) -> Option<String> {
    stdout
        .lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty())
        .filter(|l| l.len() == 64 && l.bytes().all(|b| b.is_ascii_hexdigit()))
        .map(str::to_owned)
}

impl ContainerTool for Podman {
    fn program(&self) -> &Path {
        &self.program
    }

    fn calls(&self) -> usize {
        self.calls.get()
    }

    fn inspect(&self, reference: &str) -> Result<Option<ImageInfo>> {
        let args = ["image", "inspect", "--format", "json", "--", reference].map(String::from);
        let run = self
            .run("image inspect", &args, self.short_timeout, None)
            .map_err(|e| e.context(format!("inspecting image {reference}")))?;
        if !run.ok {
            let cause = run.cause();
            if is_missing_image(&cause) {
                return Ok(None);
            }
            bail!("inspecting image {reference}: {cause}");
        }
        parse_image_inspect(&run.stdout)
            .with_context(|| format!("reading `podman image inspect` output for {reference}"))
    }

    fn pull(
        &self,
        reference: &str,
        auth_file: Option<&Path>,
        tls_verify: bool,
        sink: LineSink<'_>,
    ) -> Result<Option<String>> {
        let args = registry_args(&["pull"], tls_verify, auth_file, reference);
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
        Ok(parse_pulled_id(&run.stdout))
    }

    fn build(&self, build: &BuildArgs<'_>, sink: LineSink<'_>) -> Result<()> {
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

    fn remove_image(&self, reference: &str) -> Result<()> {
        let args = ["rmi", "--force", "--", reference].map(String::from);
        let run = self
            .run("rmi", &args, self.short_timeout, None)
            .map_err(|e| e.context(format!("removing image {reference}")))?;
        if !run.ok {
            bail!("removing image {reference}: {}", run.cause());
        }
        Ok(())
    }

    fn remove_labelled_containers(&self, label: &str) -> Result<Vec<String>> {
        let filter = format!("label={label}");
        let args = ["ps", "--all", "--format", "json", "--filter", &filter].map(String::from);
        let run = self
            .run("ps", &args, self.short_timeout, None)
            .map_err(|e| e.context(format!("looking for containers labelled {label}")))?;
        if !run.ok {
            bail!("looking for containers labelled {label}: {}", run.cause());
        }
        let ids = parse_container_ids(&run.stdout).with_context(|| {
            format!("reading `podman ps` output for containers labelled {label}")
        })?;
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

    fn mount(&self, image_id: &str) -> Result<Mounted> {
        let args = ["image", "mount", "--format", "json", "--", image_id].map(String::from);
        let run = self
            .run("image mount", &args, self.short_timeout, None)
            .map_err(|e| e.context(format!("mounting image {image_id}")))?;
        if !run.ok {
            bail!("mounting image {image_id}: {}", run.cause());
        }
        let m =
            parse_image_mount(&run.stdout).with_context(|| format!("mounting image {image_id}"))?;
        let Some(shared) = &self.shared_mounts else {
            return Ok(m);
        };
        // podman's mount point sits under its storage, which it makes a
        // private mount: a mount there never reaches kvcd's namespace. A
        // read-only bind under the runtime directory (a shared mount) does.
        let at = shared_mount_point(shared, image_id)?;
        let bound = std::fs::create_dir_all(&at)
            .with_context(|| format!("creating {}", at.display()))
            .and_then(|()| {
                if is_mount_point(&at) {
                    self.helper(
                        &format!("unmounting a stale {}", at.display()),
                        &["umount".as_ref(), at.as_os_str()],
                    )?;
                }
                self.helper(
                    &format!("binding {} to {}", m.path.display(), at.display()),
                    &[
                        "mount".as_ref(),
                        "--bind".as_ref(),
                        "-o".as_ref(),
                        "ro".as_ref(),
                        m.path.as_os_str(),
                        at.as_os_str(),
                    ],
                )
            });
        if let Err(e) = bound {
            let _ = self.podman_unmount(image_id);
            return Err(e.context(format!("mounting image {image_id}")));
        }
        Ok(Mounted {
            path: at,
            digest: m.digest,
        })
    }

    fn unmount(&self, image_id: &str) -> Result<()> {
        if let Some(shared) = &self.shared_mounts {
            let at = shared_mount_point(shared, image_id)?;
            if is_mount_point(&at) {
                self.helper(
                    &format!("unmounting {}", at.display()),
                    &["umount".as_ref(), at.as_os_str()],
                )
                .with_context(|| format!("unmounting image {image_id}"))?;
            }
            let _ = std::fs::remove_dir(&at);
        }
        self.podman_unmount(image_id)
    }
}

/// Where image `id` is bound under `shared` (a plain ID: no path may hide in it).
fn shared_mount_point(shared: &Path, id: &str) -> Result<PathBuf> {
    if id.is_empty() || !id.chars().all(|c| c.is_ascii_alphanumeric()) {
        bail!("image ID {id:?} is not a plain ID");
    }
    Ok(shared.join(id))
}

/// True when `path` is a mount point (its device differs from its parent's).
fn is_mount_point(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    let (Ok(m), Some(Ok(p))) = (
        std::fs::symlink_metadata(path),
        path.parent().map(std::fs::metadata),
    ) else {
        return false;
    };
    m.dev() != p.dev()
}

impl Podman {
    /// `podman image unmount ID`.
    fn podman_unmount(&self, image_id: &str) -> Result<()> {
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
    fn the_pulled_image_id_is_the_last_line_of_stdout() {
        assert_eq!(
            parse_pulled_id(&fixture("pull.stdout")).as_deref(),
            Some("0cc8bc244ef36983d711db1b8980a7777b332da20996905bcbfdf3dbdd9f1a18")
        );
        let id = "5a65c0211c0f56610419c488cc8c259c0acab1f2d986976e78e9be51b4ada47b";
        assert_eq!(parse_pulled_id(&format!("{id}\n")).as_deref(), Some(id));
        // Several images (a manifest list pulled with --all-tags): the last.
        let other = "f".repeat(64);
        assert_eq!(parse_pulled_id(&format!("{id}\n{other}\n\n")), Some(other));
        for not_an_id in [
            "",
            "\n",
            "Writing manifest to image destination\n",
            "abc\n",
            &"g".repeat(64),
        ] {
            assert_eq!(parse_pulled_id(not_an_id), None, "{not_an_id:?}");
        }
    }

    #[test]
    fn registry_of_reference() {
        assert_eq!(registry_of("127.0.0.1:5000/kvcd/x:1"), "127.0.0.1:5000");
        assert_eq!(registry_of("quay.io/acme/driver@sha256:ab"), "quay.io");
        assert_eq!(registry_of("localhost/x"), "localhost");
        assert_eq!(registry_of("acme/driver:1"), "docker.io");
        assert_eq!(registry_of("busybox"), "docker.io");
    }

    /// A capture of real podman output (`tests/fixtures/podman`).
    fn fixture(name: &str) -> String {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/podman")
            .join(name);
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    #[test]
    fn tag_lists_are_read_from_podman_search_and_an_unknown_repository_is_empty() {
        assert_eq!(
            parse_tag_list(&fixture("search-tags.json")).unwrap(),
            ["6.1.0-57-amd64"]
        );
        assert!(parse_tag_list("[]").unwrap().is_empty());
        assert!(
            parse_tag_list("[{\"Name\": \"r\", \"Tags\": null}]")
                .unwrap()
                .is_empty()
        );
        let e = parse_tag_list("{}").unwrap_err();
        assert!(format!("{e:#}").contains("\"Tags\" array"), "{e:#}");
        let tail: Vec<String> = fixture("search-tags-unknown.stderr")
            .lines()
            .map(str::to_owned)
            .collect();
        assert!(is_unknown_repository(&tail));
        assert!(!is_unknown_repository(&[
            "Error: connection refused".to_owned()
        ]));
    }

    #[test]
    fn references_split_into_repository_and_tag() {
        assert_eq!(
            split_tag("127.0.0.1:5731/kvcd/drivers:6.1.0-57-amd64"),
            Some(("127.0.0.1:5731/kvcd/drivers", "6.1.0-57-amd64"))
        );
        assert_eq!(split_tag("quay.io/a/b:1.0"), Some(("quay.io/a/b", "1.0")));
        assert_eq!(split_tag("127.0.0.1:5731/kvcd/drivers"), None);
        assert_eq!(split_tag("quay.io/a/b@sha256:abc"), None);
        assert_eq!(split_tag("quay.io/a/b:1@sha256:abc"), None);
    }

    fn lines(text: &str) -> Vec<String> {
        text.lines().map(str::to_owned).collect()
    }

    const FIXTURES_ID: &str = "0cc8bc244ef36983d711db1b8980a7777b332da20996905bcbfdf3dbdd9f1a18";
    const FIXTURES_DIGEST: &str =
        "sha256:3a5e6cefe82ac23eaf9f5595e64a7e427fd2d3931bcede2b434599e9fbcdbfe4";
    const BUILT_ID: &str = "0871b0daeed6a21b51a564f8b1eae7c046fb5307544e28a24a14be1ea1fdd8a4";

    #[test]
    fn a_pulled_image_is_read_from_podmans_inspect_output() {
        let info = parse_image_inspect(&fixture("image-inspect-pulled.json"))
            .unwrap()
            .unwrap();
        assert_eq!(info.id, FIXTURES_ID);
        assert_eq!(info.digest.as_deref(), Some(FIXTURES_DIGEST));
        assert_eq!(info.identity(), FIXTURES_DIGEST);
        assert_eq!(
            info.labels.keys().collect::<Vec<_>>(),
            ["io.buildah.version", "org.kvcd.base-stamp", "org.kvcd.test"]
        );
        assert_eq!(info.labels["org.kvcd.test"], "1");
        assert!(!info.labels.contains_key(BUILT_LABEL));
    }

    #[test]
    fn a_built_image_carries_kvcds_label() {
        let info = parse_image_inspect(&fixture("image-inspect-built.json"))
            .unwrap()
            .unwrap();
        assert_eq!(info.id, BUILT_ID);
        assert_eq!(info.labels[BUILT_LABEL], "simple-kmod");
        assert_eq!(
            info.identity(),
            "sha256:7fda0e79024fb2b2bbed3f743d29d37997aafb97056b691b479b3806a48f639a"
        );
    }

    #[test]
    fn null_labels_are_no_labels() {
        let json = fixture("image-inspect-no-labels.json");
        assert!(
            json.contains("\"Labels\": null"),
            "the capture has null labels"
        );
        let info = parse_image_inspect(&json).unwrap().unwrap();
        assert_eq!(
            info.id,
            "0ea3f1946d3f16fb05c5b7579fef20029e9b6d3a0946431f5bff09038b79c5f2"
        );
        assert!(info.labels.is_empty());
    }

    #[test]
    fn of_two_images_the_last_is_taken() {
        let info = parse_image_inspect(&fixture("image-inspect-two.json"))
            .unwrap()
            .unwrap();
        assert_eq!(info.id, BUILT_ID);
    }

    #[test]
    fn a_missing_image_is_none_and_its_cause_is_recognised() {
        assert_eq!(
            parse_image_inspect(&fixture("image-inspect-missing.json")).unwrap(),
            None
        );
        let cause = cause(
            &lines(&fixture("image-inspect-missing.stderr")),
            "exit status 125",
        );
        assert_eq!(
            cause,
            "inspecting object: localhost/kvcd-capture/nothere:1: image not known"
        );
        assert!(is_missing_image(&cause));
        assert!(is_missing_image("no such image"));
    }

    #[test]
    fn pull_failures_give_podmans_cause_and_are_not_a_missing_image() {
        let c = cause(
            &lines(&fixture("pull-unauthorized.stderr")),
            "exit status 125",
        );
        assert_eq!(
            c,
            "initializing source docker://127.0.0.1:5732/kvcd/fixtures:6.1.0-57-amd64: reading manifest 6.1.0-57-amd64 in 127.0.0.1:5732/kvcd/fixtures: unauthorized: authentication required"
        );
        assert!(!is_missing_image(&c));
        let c = cause(&lines(&fixture("pull-missing.stderr")), "exit status 125");
        assert!(c.ends_with("manifest unknown: manifest unknown"), "{c}");
        // A manifest the registry lacks is not an image missing from local storage.
        assert!(!is_missing_image(&c));
    }

    /// The pulled capture with `edit` applied to its one image.
    fn edited(edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) -> String {
        let mut v: serde_json::Value =
            serde_json::from_str(&fixture("image-inspect-pulled.json")).unwrap();
        edit(v[0].as_object_mut().unwrap());
        v.to_string()
    }

    #[test]
    fn missing_and_null_fields_of_an_image() {
        let info = parse_image_inspect(&edited(|o| {
            o.remove("Digest");
            o.remove("Labels");
        }))
        .unwrap()
        .unwrap();
        assert_eq!((info.digest, info.labels.len()), (None, 0));
        for digest in [serde_json::Value::Null, "".into()] {
            let info = parse_image_inspect(&edited(|o| {
                o.insert("Digest".into(), digest);
            }))
            .unwrap()
            .unwrap();
            assert_eq!(info.digest, None);
            assert_eq!(info.identity(), format!("sha256:{FIXTURES_ID}"));
        }
        let e = parse_image_inspect(&edited(|o| {
            o.remove("Id");
        }))
        .unwrap_err();
        let msg = format!("{e:#}");
        assert!(
            msg.starts_with("expected a JSON array of images, each an object with a string \"Id\"")
                && msg.contains("missing field `Id`"),
            "{msg}"
        );
        let e = parse_image_inspect(&edited(|o| {
            o.insert("Id".into(), serde_json::Value::Null);
        }))
        .unwrap_err();
        assert!(
            format!("{e:#}").contains("invalid type: null, expected a string"),
            "{e:#}"
        );
        let e = parse_image_inspect(&edited(|o| {
            o.insert("Id".into(), "".into());
        }))
        .unwrap_err();
        assert_eq!(
            format!("{e:#}"),
            "expected an image ID in \"Id\" of image 1 of 1, found an empty string"
        );
    }

    #[test]
    fn output_that_is_not_an_image_list_names_what_was_expected() {
        let whole = fixture("image-inspect-pulled.json");
        for bad in [
            "",
            "{}",
            "null",
            "Error: something",
            &whole[..whole.len() / 2],
        ] {
            let e = parse_image_inspect(bad).unwrap_err();
            assert!(
                format!("{e:#}").starts_with(
                    "expected a JSON array of images, each an object with a string \"Id\" (and optionally \"Digest\" and \"Labels\"): "
                ),
                "{bad:?}: {e:#}"
            );
        }
    }

    #[test]
    fn containers_are_read_from_podmans_ps_output() {
        assert_eq!(
            parse_container_ids(&fixture("ps-labelled.json")).unwrap(),
            [
                "9d10327e12c2f771aab5d1492f8fe20ec5a8899e773bd64f40f6dcbeb3c52e3f",
                "32c81164c4507cb6890747c5467ec414259686bc6a5aff7a58c6d98b55a491ab"
            ]
        );
        assert!(
            parse_container_ids(&fixture("ps-none.json"))
                .unwrap()
                .is_empty()
        );
        assert!(parse_container_ids("null").unwrap().is_empty());
        let e = parse_container_ids("[{\"Names\": [\"x\"]}]").unwrap_err();
        assert!(
            format!("{e:#}").starts_with(
                "expected a JSON array of containers, each an object with a string \"Id\": missing field `Id`"
            ),
            "{e:#}"
        );
        let e = parse_container_ids("[{\"Id\": \"abc\"}, {\"Id\": \" \"}]").unwrap_err();
        assert_eq!(
            e.to_string(),
            "expected a container ID in \"Id\" of container 2 of 2, found an empty string"
        );
        let e = parse_container_ids("9d10327e12c2\n32c81164c450\n").unwrap_err();
        assert!(
            format!("{e:#}").starts_with("expected a JSON array of containers"),
            "{e:#}"
        );
    }

    #[test]
    fn the_mount_point_is_what_podman_printed() {
        assert_eq!(
            parse_mount_point(&fixture("image-mount.stdout")).unwrap(),
            Path::new(
                "/tmp/podcap/root/vfs/dir/93700c50a8767181a570246e9d4425bc28f34b388fa365a601353e96aef54595"
            )
        );
        assert_eq!(
            parse_mount_point("\n").unwrap_err().to_string(),
            "podman printed no mount point"
        );
        assert_eq!(
            parse_mount_point("overlay\n").unwrap_err().to_string(),
            "expected one absolute mount point, found \"overlay\""
        );
        assert_eq!(
            parse_mount_point("/a\n/b\n").unwrap_err().to_string(),
            "expected one absolute mount point, found \"/a\\n/b\""
        );
    }

    /// A podman that answers from the captures: `script` is the body of a
    /// shell `case "$*"`, run with `F` set to the fixture directory; every
    /// call's arguments are appended to `calls.log`.
    fn scripted(dir: &Path, script: &str) -> Podman {
        let fake = dir.join("podman");
        std::fs::write(
            &fake,
            format!(
                "#!/bin/sh\nF={}\necho \"$*\" >> {}\ncase \"$*\" in\n{script}\nesac\n",
                Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("tests/fixtures/podman")
                    .display(),
                dir.join("calls.log").display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        Podman::new(&fake)
    }

    fn logged(dir: &Path) -> Vec<String> {
        lines(&std::fs::read_to_string(dir.join("calls.log")).unwrap_or_default())
    }

    #[test]
    fn inspect_reads_an_image_and_a_missing_one_from_podmans_output() {
        let dir = tempfile::tempdir().unwrap();
        let p = scripted(
            dir.path(),
            "*nothere*) cat $F/image-inspect-missing.json; cat $F/image-inspect-missing.stderr >&2; exit 125 ;;\n\
             *broken*) echo 'Error: database is locked' >&2; exit 125 ;;\n\
             *) cat $F/image-inspect-pulled.json ;;",
        );
        let info = p
            .inspect("127.0.0.1:5731/kvcd/fixtures:6.1.0-57-amd64")
            .unwrap();
        assert_eq!(info.unwrap().id, FIXTURES_ID);
        assert_eq!(p.inspect("localhost/kvcd-capture/nothere:1").unwrap(), None);
        let e = p.inspect("localhost/broken:1").unwrap_err();
        assert_eq!(
            format!("{e:#}"),
            "inspecting image localhost/broken:1: database is locked"
        );
        assert_eq!(p.calls(), 3);
        assert_eq!(
            logged(dir.path())[1],
            "image inspect --format json -- localhost/kvcd-capture/nothere:1"
        );
    }

    #[test]
    fn labelled_containers_are_found_in_podmans_ps_output_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let p = scripted(
            dir.path(),
            "*label=org.kvcd.kvc-action=none*) cat $F/ps-none.json ;;\n\
             ps*) cat $F/ps-labelled.json ;;\n\
             rm*) ;;",
        );
        let ids = p
            .remove_labelled_containers("org.kvcd.kvc-action=1234-simple-kmod-99")
            .unwrap();
        assert_eq!(ids.len(), 2);
        assert!(
            p.remove_labelled_containers("org.kvcd.kvc-action=none")
                .unwrap()
                .is_empty()
        );
        assert_eq!(
            logged(dir.path()),
            [
                "ps --all --format json --filter label=org.kvcd.kvc-action=1234-simple-kmod-99"
                    .to_owned(),
                format!("rm --force --time 0 -- {} {}", ids[0], ids[1]),
                "ps --all --format json --filter label=org.kvcd.kvc-action=none".to_owned(),
            ]
        );
        assert_eq!(p.calls(), 3);
    }

    #[test]
    fn mount_gives_the_path_and_digest_podman_printed() {
        let dir = tempfile::tempdir().unwrap();
        let p = scripted(
            dir.path(),
            "*mount*json*--*0cc8*) cat $F/image-mount.json ;;\n*mount*--*plain*) cat $F/image-mount.stdout ;;\n*mount*) ;;",
        );
        let mounted = p.mount("0cc8bc244ef3").unwrap();
        assert!(
            mounted.path.ends_with(
                "vfs/dir/93700c50a8767181a570246e9d4425bc28f34b388fa365a601353e96aef54595"
            )
        );
        assert_eq!(
            mounted.digest.as_deref(),
            Some("sha256:3a5e6cefe82ac23eaf9f5595e64a7e427fd2d3931bcede2b434599e9fbcdbfe4")
        );
        // A podman that prints only the path: no digest.
        let plain = p.mount("plain").unwrap();
        assert_eq!(plain.path, mounted.path);
        assert_eq!(plain.digest, None);
        assert_eq!(
            logged(dir.path())[0],
            "image mount --format json -- 0cc8bc244ef3"
        );
        assert_eq!(
            parse_image_mount("[]").unwrap_err().to_string(),
            "expected one mounted image, podman listed 0"
        );
        let e = p.mount("other").unwrap_err();
        assert_eq!(
            format!("{e:#}"),
            "mounting image other: podman printed no mount point"
        );
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
