//! The `[image]` source: get the driver image (present → pull → build),
//! extract its modules (and firmware) without running it, and cache the
//! extraction per (config content, kernel, image digest) so that a later
//! apply spawns no podman at all.
//!
//! Only the driver is extracted: the configured modules and their
//! dependency closure (each file's own `depends=`), not the whole
//! `/lib/modules/KERNEL` of an image that installed a kernel package. The
//! module directory is listed by name only; a file is read only when it is
//! needed. Every symlink is resolved inside the image, never on the host;
//! one that leaves the extracted directory fails the extraction.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::ffi::OsString;
use std::fs;
use std::io::ErrorKind;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail};
use serde::{Deserialize, Serialize};

use super::podman::{BUILT_LABEL, BuildArgs, ContainerTool, ImageInfo, LineSink};
use super::store::copy_file_hashed;
use crate::config::{ImageSource, PullPolicy};
use crate::kernel::{KernelRelease, TemplateVars, expand, expand_all};
use crate::kmod::{ModInfo, ModName};
use crate::state::file::{self, Versioned};
use crate::state::index::{self, ImageIndex};
use crate::state::{COMPLETE, Layout, sweep_stale_tmp};

const MAX_LINKS: usize = 8;
/// Deepest directory nesting walked in an image.
const MAX_DEPTH: usize = 32;

/// What to fetch: one module config's image for one kernel.
#[derive(Debug, Clone, Copy)]
pub struct FetchRequest<'a> {
    /// Module config name.
    pub config_name: &'a str,
    /// SHA-256 of the config file (cache key part).
    pub config_digest: &'a str,
    /// The `[image]` table.
    pub source: &'a ImageSource,
    /// Template values (the kernel among them).
    pub vars: &'a TemplateVars,
    /// Force a fresh build (once, when a built image failed verification).
    pub rebuild: bool,
    /// The config's build hook, which replaces `podman build`.
    pub build_hook: Option<&'a BuildHook<'a>>,
    /// The config's `modules`: what is extracted, with their dependencies.
    pub modules: &'a [ModName],
    /// The target kernel's own module tree on the host (e.g. `/usr/lib/modules/KERNEL`):
    /// an in-tree dependency it has is not extracted.
    pub host_tree: &'a Path,
    /// Longest `podman build` may take, in seconds (the config's `hooks.build_timeout_seconds`).
    pub build_timeout_seconds: u64,
}

/// A vendor command that builds the image instead of `podman build`.
#[derive(Debug)]
pub struct BuildHook<'a> {
    /// argv (templates already checked; expanded here).
    pub argv: &'a [String],
    /// Timeout in seconds.
    pub timeout_seconds: u64,
}

/// An extraction ready to use.
#[derive(Debug, Clone)]
pub struct Fetched {
    /// Extracted modules directory.
    pub modules: PathBuf,
    /// Extracted firmware directory, when the config names one.
    pub firmware: Option<PathBuf>,
    /// The expanded image reference.
    pub reference: String,
    /// Manifest digest (or image ID for a local build).
    pub digest: String,
    /// True when the image was built on this node.
    pub built: bool,
    /// What happened, for the log.
    pub notes: Vec<String>,
}

impl Versioned for Manifest {
    const VERSION: u32 = 1;
    const WHAT: &'static str = "extraction manifest";
}

/// One extracted file in the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestFile {
    /// Path relative to the extraction (`modules/…` or `firmware/…`).
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// SHA-256 of the content.
    pub sha256: String,
}

/// `manifest.json`, written beside every extraction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// The image reference as configured and expanded.
    pub reference: String,
    /// Manifest digest, or image ID for a local build.
    pub digest: String,
    /// Image ID.
    pub image_id: String,
    /// Target kernel.
    pub kernel: String,
    /// Directory of modules in the image.
    pub modules_dir: String,
    /// Directory of firmware in the image, if any.
    pub firmware_dir: Option<String>,
    /// Every file extracted.
    pub files: Vec<ManifestFile>,
}

/// The complete extraction recorded in `dir` (a config's image directory for
/// one kernel), if it is of `reference` for the config with `config_digest`.
pub fn current_extraction(dir: &Path, config_digest: &str, reference: &str) -> Option<ImageIndex> {
    index::read(dir).ok().flatten().filter(|i| {
        i.config_digest == config_digest
            && i.reference == reference
            && dir.join(&i.dir).join(COMPLETE).exists()
    })
}

/// Image fetching and extraction for one module config and kernel.
#[derive(Debug)]
pub struct ImageStore<'a> {
    /// kvcd's state directory; extractions go under `images/`.
    pub state_dir: &'a Path,
    /// Podman.
    pub podman: &'a dyn ContainerTool,
}

impl ImageStore<'_> {
    fn dir(&self, config: &str, kernel: &KernelRelease) -> PathBuf {
        Layout::image_dir(self.state_dir, config, kernel.as_str())
    }

    fn from_index(dir: &Path, idx: &ImageIndex, src: &ImageSource, notes: Vec<String>) -> Fetched {
        let base = dir.join(&idx.dir);
        Fetched {
            modules: base.join("modules"),
            firmware: src.firmware_dir.as_ref().map(|_| base.join("firmware")),
            reference: idx.reference.clone(),
            digest: idx.digest.clone(),
            built: idx.built,
            notes,
        }
    }

    /// Makes the extraction for the request's config on `vars.kernel` available.
    pub fn fetch(&self, req: &FetchRequest<'_>, sink: LineSink<'_>) -> Result<Fetched> {
        let FetchRequest {
            config_name,
            config_digest,
            source: src,
            vars,
            rebuild,
            modules,
            host_tree,
            ..
        } = *req;
        let reference = expand(&src.reference, vars).context("key `image.ref`")?;
        let dir = self.dir(config_name, &vars.kernel);
        let index = current_extraction(&dir, config_digest, &reference);

        // Warm path: nothing to ask podman.
        if let Some(idx) = &index {
            if src.pull != PullPolicy::Always && !rebuild {
                let note = format!(
                    "using extracted {reference} ({}); no podman needed",
                    idx.digest
                );
                return Ok(Self::from_index(&dir, idx, src, vec![note]));
            }
        }

        let mut notes = Vec::new();
        let acquired = self.acquire(req, &reference, sink, &mut notes)?;
        if let Some(idx) = index.filter(|i| !i.id.is_empty() && i.id == acquired.id) {
            notes.push(format!(
                "{reference} is unchanged ({}); keeping the extraction",
                idx.digest
            ));
            return Ok(Self::from_index(&dir, &idx, src, notes));
        }

        let name: String = acquired
            .id
            .trim_start_matches("sha256:")
            .chars()
            .take(16)
            .collect();
        let modules_dir = expand(&src.modules_dir, vars).context("key `image.modules_dir`")?;
        let firmware_dir = src
            .firmware_dir
            .as_ref()
            .map(|f| expand(f, vars))
            .transpose()
            .context("key `image.firmware_dir`")?;
        sweep_stale_tmp(&dir);
        let wanted = Wanted {
            modules,
            host_tree,
            depends: &|p: &Path| Ok(ModInfo::read(p)?.depends),
        };
        let (extracted, info, built) = self.extract(
            &dir,
            &name,
            &acquired,
            &reference,
            &vars.kernel,
            &modules_dir,
            firmware_dir.as_deref(),
            &wanted,
        )?;
        notes.extend(extracted);
        let idx = ImageIndex {
            config_digest: config_digest.to_owned(),
            reference: reference.clone(),
            digest: info.identity(),
            id: info.id,
            dir: name.clone(),
            built,
        };
        index::write(&dir, &idx)?;
        // Other extractions for this config and kernel are superseded (one
        // in progress in another live process stays).
        for entry in fs::read_dir(&dir)?.flatten() {
            let n = entry.file_name().to_string_lossy().into_owned();
            if entry.path().is_dir() && n != name && !n.starts_with(".tmp-") {
                let _ = fs::remove_dir_all(entry.path());
            }
        }
        Ok(Self::from_index(&dir, &idx, src, notes))
    }

    /// Present image → pull → build, recording why each step did not give an image.
    fn acquire(
        &self,
        req: &FetchRequest<'_>,
        reference: &str,
        sink: LineSink<'_>,
        notes: &mut Vec<String>,
    ) -> Result<Acquired> {
        let FetchRequest {
            config_name,
            source: src,
            vars,
            rebuild,
            build_hook,
            ..
        } = *req;
        let mut tried = Vec::new();
        if !rebuild {
            if src.pull != PullPolicy::Always {
                match self.podman.inspect(reference) {
                    Ok(Some(info)) => {
                        notes.push(format!("image {reference} is present"));
                        return Ok(Acquired::known(info, None));
                    }
                    Ok(None) => tried.push("local storage: not present".to_owned()),
                    Err(e) => tried.push(format!("local storage: {e:#}")),
                }
            }
            if src.pull == PullPolicy::Never {
                tried.push("pull: not tried (pull = \"never\")".to_owned());
            } else {
                // The ID podman prints is enough to mount the image, and
                // the mount says its digest: no inspect after a pull.
                let pulled = self
                    .podman
                    .pull(reference, src.auth_file.as_deref(), src.tls_verify, sink)
                    .and_then(|id| match id {
                        Some(id) => Ok(Acquired {
                            id,
                            info: None,
                            built: Some(false),
                        }),
                        None => self.present(reference).map(|i| Acquired::known(i, None)),
                    });
                match pulled {
                    Ok(a) => {
                        notes.push(format!("pulled {reference}"));
                        return Ok(a);
                    }
                    Err(e) => tried.push(format!("pull: {e:#}")),
                }
            }
        }
        if let Some(hook) = build_hook {
            let argv = expand_all(hook.argv, vars).context("key `hooks.build`")?;
            let mut cmd = crate::hooks::command(&argv);
            cmd.env("KVCD_MODULE", config_name)
                .env("KVCD_KERNEL", vars.kernel.as_str())
                .env("KVCD_HOOK", "build")
                .env("KVCD_IMAGE_REF", reference)
                .env("KVCD_VERSION", vars.mod_version.as_deref().unwrap_or(""));
            let result = crate::hooks::run(
                "build",
                cmd,
                Duration::from_secs(hook.timeout_seconds),
                &|_, line| sink(line),
            )
            .map_err(anyhow::Error::from)
            .and_then(|()| self.present(reference));
            return match result {
                Ok(info) => {
                    notes.push(format!("the build hook made {reference}"));
                    Ok(Acquired::known(info, Some(true)))
                }
                Err(e) => {
                    tried.push(format!("build hook: {e:#}"));
                    Err(anyhow!(
                        "no image {reference}; tried:\n  - {}",
                        tried.join("\n  - ")
                    ))
                }
            };
        }
        let Some(b) = &src.build else {
            tried.push("build: no [build] in the config".to_owned());
            return Err(anyhow!(
                "no image {reference}; tried:\n  - {}",
                tried.join("\n  - ")
            ));
        };
        let context = expand(&b.context, vars).context("key `build.context`")?;
        let args = b
            .args
            .iter()
            .map(|(k, v)| {
                Ok((
                    k.clone(),
                    expand(v, vars).with_context(|| format!("key `build.args.{k}`"))?,
                ))
            })
            .collect::<Result<_>>()?;
        let build = BuildArgs {
            config: config_name,
            tag: reference,
            context: &context,
            file: &b.file,
            args: &args,
            secrets: &b.secrets,
            no_cache: rebuild,
            auth_file: src.auth_file.as_deref(),
            timeout: Duration::from_secs(req.build_timeout_seconds),
        };
        match self
            .podman
            .build(&build, sink)
            .and_then(|()| self.present(reference))
        {
            Ok(info) => {
                notes.push(format!("built {reference} from {context}"));
                Ok(Acquired::known(info, Some(true)))
            }
            Err(e) => {
                tried.push(format!("build: {e:#}"));
                Err(anyhow!(
                    "no image {reference}; tried:\n  - {}",
                    tried.join("\n  - ")
                ))
            }
        }
    }

    fn present(&self, reference: &str) -> Result<ImageInfo> {
        self.podman
            .inspect(reference)?
            .ok_or_else(|| anyhow!("image {reference} is not in local storage afterwards"))
    }

    /// Copies the driver's modules (and the firmware) out of the image
    /// (mounted by its ID) into `dir/name`, atomically. Returns notes on what
    /// was taken, the image's info (a pulled image's digest from its mount)
    /// and whether it was built on this node.
    #[allow(clippy::too_many_arguments)]
    fn extract(
        &self,
        dir: &Path,
        name: &str,
        image: &Acquired,
        reference: &str,
        kernel: &KernelRelease,
        modules_dir: &str,
        firmware_dir: Option<&str>,
        wanted: &Wanted<'_>,
    ) -> Result<(Vec<String>, ImageInfo, bool)> {
        let tmp = dir.join(format!(".tmp-{name}-{}", std::process::id()));
        if tmp.exists() {
            fs::remove_dir_all(&tmp)?;
        }
        fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        // The marker says a mount may be left if this process dies before unmounting.
        let id = image.id.as_str();
        let marker = Layout::mount_marker(self.state_dir, id);
        let root = crate::util::write_atomic(&marker, reference.as_bytes())
            .and_then(|()| self.podman.mount(id));
        let mounted = match root {
            Ok(r) => r,
            Err(e) => {
                let _ = fs::remove_file(&marker);
                let _ = fs::remove_dir_all(&tmp);
                return Err(e);
            }
        };
        crate::failpoint::hit("image.mounted");
        let copied = (|| {
            let img = Image {
                root: &mounted.path,
            };
            let mods = extract_modules(&img, modules_dir, &tmp.join("modules"), wanted)
                .with_context(|| format!("extracting {modules_dir} from {reference}"))?;
            let mut notes = mods.notes;
            notes.insert(
                0,
                format!(
                    "extracted {} module file(s), {}, from {modules_dir} in {reference} ({} other module file(s) left in the image)",
                    mods.files.len(),
                    crate::util::human_bytes(mods.files.iter().map(|f| f.size).sum()),
                    crate::util::thousands(mods.left),
                ),
            );
            let mut files = mods.files;
            if let Some(fw) = firmware_dir {
                let (fw_files, fw_notes) = extract_firmware(&img, fw, &tmp.join("firmware"))
                    .with_context(|| format!("extracting {fw} from {reference}"))?;
                notes.push(format!(
                    "extracted {} firmware file(s), {}, from {fw}",
                    fw_files.len(),
                    crate::util::human_bytes(fw_files.iter().map(|f| f.size).sum()),
                ));
                notes.extend(fw_notes);
                files.extend(fw_files);
            }
            Ok((files, notes))
        })();
        crate::failpoint::hit("image.copied");
        let unmounted = self.podman.unmount(id);
        if unmounted.is_ok() {
            let _ = fs::remove_file(&marker);
        }
        let done = copied.and_then(|c| unmounted.map(|()| c));
        let ((files, notes), (info, built)) = match done.map(|c| (c, image.info(mounted.digest))) {
            Ok(f) => f,
            Err(e) => {
                let _ = fs::remove_dir_all(&tmp);
                return Err(e);
            }
        };
        let manifest = Manifest {
            reference: reference.to_owned(),
            digest: info.identity(),
            image_id: info.id.clone(),
            kernel: kernel.to_string(),
            modules_dir: modules_dir.to_owned(),
            firmware_dir: firmware_dir.map(str::to_owned),
            files,
        };
        let finish = || -> Result<()> {
            fs::write(tmp.join("manifest.json"), file::encode(&manifest)?)?;
            fs::write(tmp.join(COMPLETE), b"")?;
            let dest = dir.join(name);
            if dest.exists() {
                fs::remove_dir_all(&dest)?;
            }
            fs::rename(&tmp, &dest)
                .with_context(|| format!("renaming {} into place", tmp.display()))?;
            crate::failpoint::hit("image.renamed");
            Ok(())
        };
        if let Err(e) = finish() {
            let _ = fs::remove_dir_all(&tmp);
            return Err(e);
        }
        Ok((notes, info, built))
    }
}

/// An image in local storage: its ID, and what inspecting it said when it was inspected.
struct Acquired {
    id: String,
    /// `None` for an image just pulled: its mount says its digest.
    info: Option<ImageInfo>,
    /// Whether it was built on this node, when that is known without its labels.
    built: Option<bool>,
}

impl Acquired {
    fn known(info: ImageInfo, built: Option<bool>) -> Self {
        Self {
            id: info.id.clone(),
            info: Some(info),
            built,
        }
    }

    /// The image's info (with `mounted_digest`, the digest its mount
    /// reported, for a pulled one), and whether it was built on this node.
    fn info(&self, mounted_digest: Option<String>) -> (ImageInfo, bool) {
        let info = self.info.clone().unwrap_or_else(|| ImageInfo {
            id: self.id.clone(),
            digest: mounted_digest,
            labels: BTreeMap::new(),
        });
        let built = self.built.unwrap_or_else(|| info_is_built(&info));
        (info, built)
    }
}

fn info_is_built(info: &ImageInfo) -> bool {
    info.labels.contains_key(BUILT_LABEL)
}

/// What to take from the module directory.
pub(crate) struct Wanted<'a> {
    /// The configured modules.
    modules: &'a [ModName],
    /// The target kernel's own module tree on the host.
    host_tree: &'a Path,
    /// Reads a module file's `depends=` (libkmod; a fake in unit tests).
    depends: &'a dyn Fn(&Path) -> Result<Vec<String>>,
}

/// `path` with `.` and `..` resolved lexically (never above `/`).
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for c in path.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(n) => out.push(n),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    out
}

/// A mounted image: paths inside it are resolved as the image sees them.
struct Image<'a> {
    root: &'a Path,
}

impl Image<'_> {
    /// The host path of `image_path`, which must hold no symlink (see [`Image::resolve`]).
    fn local(&self, image_path: &Path) -> PathBuf {
        self.root
            .join(image_path.strip_prefix("/").unwrap_or(image_path))
    }

    /// Resolves `path` component by component, following every symlink as
    /// the image sees it (an absolute link starts again at the image's
    /// root, never the host's), at most [`MAX_LINKS`] of them. The result
    /// has no symlink in it; a missing part ends the walk (the rest is
    /// appended as it is).
    fn resolve(&self, path: &Path) -> Result<PathBuf> {
        let mut out = PathBuf::from("/");
        let mut rest: VecDeque<OsString> = parts(path);
        let mut hops = 0;
        while let Some(c) = rest.pop_front() {
            if c == ".." {
                out.pop();
                continue;
            }
            let next = out.join(&c);
            let meta = match fs::symlink_metadata(self.local(&next)) {
                Ok(m) => m,
                Err(e) if e.kind() == ErrorKind::NotFound => {
                    out = next;
                    out.extend(rest);
                    return Ok(normalize(&out));
                }
                Err(e) => {
                    return Err(e)
                        .with_context(|| format!("reading {} in the image", next.display()));
                }
            };
            if !meta.file_type().is_symlink() {
                out = next;
                continue;
            }
            hops += 1;
            if hops > MAX_LINKS {
                bail!("{}: too many levels of symbolic links", path.display());
            }
            let link = fs::read_link(self.local(&next))
                .with_context(|| format!("reading the link {} in the image", next.display()))?;
            if link.is_absolute() {
                out = PathBuf::from("/");
            }
            let mut again = parts(&link);
            again.extend(rest);
            rest = again;
        }
        Ok(out)
    }
}

/// The normal and `..` components of `path`.
fn parts(path: &Path) -> VecDeque<OsString> {
    path.components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_owned()),
            Component::ParentDir => Some("..".into()),
            _ => None,
        })
        .collect()
}

/// What a directory entry is, from its name's entry alone (no content read).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    File,
    /// A symlink that stays inside the extracted directory.
    Link,
    /// A FIFO, device or socket.
    Special(&'static str),
}

fn special(ft: fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt as _;
    if ft.is_fifo() {
        "a FIFO"
    } else if ft.is_socket() {
        "a socket"
    } else if ft.is_block_device() || ft.is_char_device() {
        "a device"
    } else {
        "not a regular file"
    }
}

/// One entry of a listed directory: where it is (resolved base + `rel`) and what it is.
#[derive(Debug, Clone)]
struct Entry {
    rel: PathBuf,
    kind: Kind,
}

/// A directory of the image listed by name: every entry below it.
struct Listing {
    /// The configured path, for messages.
    shown: PathBuf,
    /// The same directory with its symlinks resolved.
    base: PathBuf,
    entries: Vec<Entry>,
}

impl Listing {
    /// Lists `dir` (an image path) by name only. Every symlink below it is
    /// checked: one that leaves `dir` is an error naming it (the top-level
    /// `build` and `source` links of a module tree, which point at kernel
    /// sources and are no modules, are skipped as depmod skips them).
    /// Directory symlinks inside are not followed.
    fn new(img: &Image<'_>, dir: &str, module_tree: bool) -> Result<Self> {
        let shown = normalize(Path::new(dir));
        let base = img.resolve(&shown)?;
        let meta = fs::symlink_metadata(img.local(&base))
            .map_err(|_| anyhow!("the image has no {}", shown.display()))?;
        if !meta.is_dir() {
            bail!("{} in the image is not a directory", shown.display());
        }
        let mut entries = Vec::new();
        let mut stack = vec![(PathBuf::new(), 0)];
        while let Some((rel, depth)) = stack.pop() {
            if depth > MAX_DEPTH {
                bail!(
                    "{}: directories nested too deep",
                    shown.join(&rel).display()
                );
            }
            let here = img.local(&base.join(&rel));
            let mut list: Vec<_> = fs::read_dir(&here)
                .and_then(|d| d.collect::<Result<Vec<_>, _>>())
                .with_context(|| format!("listing {} in the image", shown.join(&rel).display()))?;
            list.sort_by_key(fs::DirEntry::file_name);
            for e in list {
                let r = rel.join(e.file_name());
                let ft = e.file_type().with_context(|| {
                    format!("reading {} in the image", shown.join(&r).display())
                })?;
                if ft.is_dir() {
                    stack.push((r, depth + 1));
                } else if ft.is_symlink() {
                    if module_tree
                        && depth == 0
                        && (r == Path::new("build") || r == Path::new("source"))
                    {
                        continue;
                    }
                    let link = fs::read_link(e.path()).with_context(|| {
                        format!("reading the link {}", shown.join(&r).display())
                    })?;
                    let target = img.resolve(&base.join(&r))?;
                    if !target.starts_with(&base) {
                        bail!(
                            "{} is a symlink to {}, outside {}; refusing to extract it",
                            shown.join(&r).display(),
                            link.display(),
                            shown.display()
                        );
                    }
                    entries.push(Entry {
                        rel: r,
                        kind: Kind::Link,
                    });
                } else if ft.is_file() {
                    entries.push(Entry {
                        rel: r,
                        kind: Kind::File,
                    });
                } else {
                    entries.push(Entry {
                        rel: r,
                        kind: Kind::Special(special(ft)),
                    });
                }
            }
        }
        entries.sort_by(|a, b| a.rel.cmp(&b.rel));
        Ok(Self {
            shown,
            base,
            entries,
        })
    }

    /// The image path of the regular file `e` names (following a link inside), or an error naming it.
    fn regular(&self, img: &Image<'_>, e: &Entry) -> Result<PathBuf> {
        let shown = self.shown.join(&e.rel);
        match e.kind {
            Kind::Special(what) => bail!("{} is {what}, not a regular file", shown.display()),
            Kind::File => Ok(self.base.join(&e.rel)),
            Kind::Link => {
                let target = img.resolve(&self.base.join(&e.rel))?;
                let meta = fs::symlink_metadata(img.local(&target)).with_context(|| {
                    format!(
                        "{} is a symlink to a file the image does not have",
                        shown.display()
                    )
                })?;
                if !meta.is_file() {
                    bail!(
                        "{} is a symlink to {}, which is {}",
                        shown.display(),
                        target.display(),
                        if meta.is_dir() {
                            "a directory"
                        } else {
                            special(meta.file_type())
                        }
                    );
                }
                Ok(target)
            }
        }
    }

    /// Copies entry `e` to `dest/REL`, streaming; returns its manifest line.
    fn copy(&self, img: &Image<'_>, e: &Entry, dest: &Path, label: &str) -> Result<ManifestFile> {
        let from = self.regular(img, e)?;
        let out = dest.join(&e.rel);
        if let Some(p) = out.parent() {
            fs::create_dir_all(p).with_context(|| format!("creating {}", p.display()))?;
        }
        let d = copy_file_hashed(&img.local(&from), &out).with_context(|| {
            format!(
                "copying {} from the image",
                self.shown.join(&e.rel).display()
            )
        })?;
        Ok(ManifestFile {
            path: format!("{label}/{}", e.rel.display()),
            size: d.size,
            sha256: d.sha256,
        })
    }
}

/// What [`extract_modules`] took.
#[derive(Debug)]
struct Extracted {
    files: Vec<ManifestFile>,
    /// Module files in the image not taken.
    left: usize,
    notes: Vec<String>,
}

fn under_kernel(e: &Entry) -> bool {
    e.rel.starts_with("kernel")
}

/// The entry to use for `name` among its candidates: the one outside
/// `kernel/` (updates/extra come before the kernel's own, as in depmod's
/// search order), else the kernel's own; two of a kind are an error.
fn choose<'e>(l: &Listing, name: &ModName, cands: &[&'e Entry]) -> Result<&'e Entry> {
    let outside: Vec<_> = cands.iter().copied().filter(|e| !under_kernel(e)).collect();
    let pool = if outside.is_empty() {
        cands.to_vec()
    } else {
        outside
    };
    match pool.as_slice() {
        [one] => Ok(one),
        [a, b, ..] => bail!(
            "two files for module {name} in the image: {} and {} ('-' and '_' are the same name)",
            l.shown.join(&a.rel).display(),
            l.shown.join(&b.rel).display()
        ),
        [] => bail!("no file for module {name}"),
    }
}

/// Module names under `tree` (a host module tree), listed by name.
fn host_modules(tree: &Path) -> BTreeSet<ModName> {
    let mut out = BTreeSet::new();
    let mut stack = vec![(tree.to_owned(), 0)];
    while let Some((dir, depth)) = stack.pop() {
        let Ok(rd) = fs::read_dir(&dir) else { continue };
        for e in rd.flatten() {
            let Ok(ft) = e.file_type() else { continue };
            let path = e.path();
            // `kernel` may be a link (a kvcd tree); follow it at the top only.
            if ft.is_dir()
                || (depth == 0 && ft.is_symlink() && path.is_dir() && e.file_name() == "kernel")
            {
                if depth < MAX_DEPTH {
                    stack.push((path, depth + 1));
                }
            } else if let Some(n) = ModName::from_file_name(&e.file_name().to_string_lossy()) {
                out.insert(n);
            }
        }
    }
    out
}

/// Takes the configured modules and their dependency closure from the
/// module directory `dir` of the image into `dest`.
fn extract_modules(img: &Image<'_>, dir: &str, dest: &Path, w: &Wanted<'_>) -> Result<Extracted> {
    let l = Listing::new(img, dir, true)?;
    let mut by_name: BTreeMap<ModName, Vec<&Entry>> = BTreeMap::new();
    for e in &l.entries {
        if let Some(n) = e
            .rel
            .file_name()
            .and_then(|f| ModName::from_file_name(&f.to_string_lossy()))
        {
            by_name.entry(n).or_default().push(e);
        }
    }
    let total: usize = by_name.values().map(Vec::len).sum();
    if total == 0 {
        bail!("the image has no module files under {}", l.shown.display());
    }
    let missing: Vec<_> = w
        .modules
        .iter()
        .filter(|m| !by_name.contains_key(*m))
        .map(ToString::to_string)
        .collect();
    if !missing.is_empty() {
        let outside: Vec<_> = by_name
            .iter()
            .filter(|(_, es)| es.iter().any(|e| !under_kernel(e)))
            .map(|(n, _)| n.to_string())
            .collect();
        bail!(
            "no .ko file for module{} {} under {} in the image (modules outside kernel/: {})",
            if missing.len() > 1 { "s" } else { "" },
            missing.join(", "),
            l.shown.display(),
            if outside.is_empty() {
                "none".to_owned()
            } else {
                outside.join(", ")
            }
        );
    }

    let mut notes = Vec::new();
    let mut host: Option<BTreeSet<ModName>> = None;
    let mut from_host = BTreeSet::new();
    let mut taken: BTreeMap<ModName, &Entry> = BTreeMap::new();
    let mut queue: VecDeque<(ModName, Option<ModName>)> =
        w.modules.iter().map(|m| (m.clone(), None)).collect();
    while let Some((name, needed_by)) = queue.pop_front() {
        if taken.contains_key(&name) || from_host.contains(&name) {
            continue;
        }
        let Some(cands) = by_name.get(&name) else {
            // Not in the image: the kernel's own (or built in); resolving says if not.
            continue;
        };
        let e = choose(&l, &name, cands)?;
        // A dependency the kernel's own tree has comes from there.
        if needed_by.is_some() && under_kernel(e) {
            let host = host.get_or_insert_with(|| host_modules(w.host_tree));
            if host.contains(&name) {
                from_host.insert(name);
                continue;
            }
        }
        let shown = l.shown.join(&e.rel);
        let path = l.regular(img, e).with_context(|| match &needed_by {
            Some(by) => format!("module {name} (needed by {by})"),
            None => format!("module {name}"),
        })?;
        let deps = (w.depends)(&img.local(&path))
            .with_context(|| format!("reading the dependencies of {}", shown.display()))?;
        for d in deps {
            let d = ModName::parse(&d).map_err(|e| {
                anyhow!(
                    "{}: depends on {d:?}, which is not a module name: {e}",
                    shown.display()
                )
            })?;
            queue.push_back((d, Some(name.clone())));
        }
        taken.insert(name, e);
    }

    // Special files named like modules that no one needs: said, never opened
    // (a needed one failed above).
    for e in by_name.values().flatten() {
        if let Kind::Special(what) = e.kind {
            notes.push(format!(
                "{} is {what}, not a regular file; left in the image",
                l.shown.join(&e.rel).display()
            ));
        }
    }
    if !from_host.is_empty() {
        notes.push(format!(
            "in-tree dependencies from the kernel's own tree {}: {}",
            w.host_tree.display(),
            from_host
                .iter()
                .map(ModName::as_str)
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    fs::create_dir_all(dest).with_context(|| format!("creating {}", dest.display()))?;
    let mut files = Vec::new();
    for e in taken.values() {
        files.push(l.copy(img, e, dest, "modules")?);
    }
    files.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(Extracted {
        left: total - files.len(),
        files,
        notes,
    })
}

/// Copies every regular file under the firmware directory `dir` of the image
/// into `dest` (a link inside arrives as the file it points to); other
/// special files are noted and left.
fn extract_firmware(
    img: &Image<'_>,
    dir: &str,
    dest: &Path,
) -> Result<(Vec<ManifestFile>, Vec<String>)> {
    if normalize(Path::new(dir)) == Path::new("/") {
        bail!("firmware directory {dir} is the image's root; refusing to extract the whole image");
    }
    let l = Listing::new(img, dir, false)?;
    fs::create_dir_all(dest).with_context(|| format!("creating {}", dest.display()))?;
    let mut files = Vec::new();
    let mut notes = Vec::new();
    for e in &l.entries {
        match e.kind {
            Kind::Special(what) => notes.push(format!(
                "{} is {what}, not a regular file; left in the image",
                l.shown.join(&e.rel).display()
            )),
            Kind::Link => {
                // A link to a directory inside is not followed; one to a
                // special file is left like the file itself.
                let target = img.resolve(&l.base.join(&e.rel))?;
                match fs::symlink_metadata(img.local(&target)) {
                    Ok(m) if m.is_dir() => {}
                    Ok(m) if !m.is_file() => notes.push(format!(
                        "{} is a symlink to {}, which is {}; left in the image",
                        l.shown.join(&e.rel).display(),
                        target.display(),
                        special(m.file_type())
                    )),
                    _ => files.push(l.copy(img, e, dest, "firmware")?),
                }
            }
            Kind::File => files.push(l.copy(img, e, dest, "firmware")?),
        }
    }
    files.sort_by(|a, b| a.path.cmp(&b.path));
    Ok((files, notes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    const K: &str = "/lib/modules/6.1.0-1-amd64";

    /// A fake image root: lib/modules/K with a kernel tree, drivers in
    /// extra/ and updates/, a `build` link outside, and links. A module
    /// file's content is its `depends=` list (see `fake_depends`).
    fn image() -> tempfile::TempDir {
        let t = tempfile::tempdir().unwrap();
        let m = t.path().join("lib/modules/6.1.0-1-amd64");
        for d in ["extra/sub", "updates", "kernel/lib", "kernel/drivers/net"] {
            fs::create_dir_all(m.join(d)).unwrap();
        }
        fs::write(m.join("extra/a.ko"), b"b,crc8").unwrap();
        fs::write(m.join("extra/sub/b.ko.xz"), b"").unwrap();
        fs::write(m.join("extra/lonely.ko"), b"").unwrap();
        fs::write(m.join("updates/dummy.ko"), b"").unwrap();
        fs::write(m.join("kernel/drivers/net/dummy.ko"), b"").unwrap();
        fs::write(m.join("kernel/lib/crc8.ko"), b"").unwrap();
        fs::write(m.join("kernel/lib/crc7.ko"), b"").unwrap();
        fs::write(m.join("extra/needs-crc7.ko"), b"crc7").unwrap();
        fs::write(m.join("modules.dep"), b"").unwrap();
        symlink("/usr/src/linux-headers-6.1.0-1-amd64", m.join("build")).unwrap();
        symlink("../a.ko", m.join("extra/sub/c.ko")).unwrap();
        t
    }

    /// A host tree for the kernel holding crc8 only.
    fn host() -> tempfile::TempDir {
        let t = tempfile::tempdir().unwrap();
        fs::create_dir_all(t.path().join("kernel/lib")).unwrap();
        fs::write(t.path().join("kernel/lib/crc8.ko"), b"").unwrap();
        t
    }

    fn fake_depends(p: &Path) -> Result<Vec<String>> {
        let text = fs::read_to_string(p)?;
        Ok(text
            .split(',')
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect())
    }

    fn names(v: &[&str]) -> Vec<ModName> {
        v.iter().map(|n| ModName::parse(n).unwrap()).collect()
    }

    fn run(img: &Path, modules: &[&str], host: &Path, dest: &Path) -> Result<Extracted> {
        let modules = names(modules);
        let w = Wanted {
            modules: &modules,
            host_tree: host,
            depends: &fake_depends,
        };
        extract_modules(&Image { root: img }, K, dest, &w)
    }

    fn paths(x: &Extracted) -> Vec<&str> {
        x.files.iter().map(|f| f.path.as_str()).collect()
    }

    #[test]
    fn takes_the_configured_modules_and_their_closure_only() {
        let (img, host) = (image(), host());
        let out = tempfile::tempdir().unwrap();
        let dest = out.path().join("modules");
        let x = run(img.path(), &["a", "dummy"], host.path(), &dest).unwrap();
        // a -> b (extra) is taken; a -> crc8 comes from the host tree;
        // dummy is the updates/ one, not the kernel's own.
        assert_eq!(
            paths(&x),
            [
                "modules/extra/a.ko",
                "modules/extra/sub/b.ko.xz",
                "modules/updates/dummy.ko"
            ]
        );
        assert_eq!(x.left, 6);
        assert_eq!(fs::read(dest.join("extra/a.ko")).unwrap(), b"b,crc8");
        assert_eq!(x.files[0].sha256, crate::util::sha256_hex(b"b,crc8"));
        assert_eq!(x.files[0].size, 6);
        assert!(!dest.join("kernel").exists() && !dest.join("build").exists());
        assert!(!dest.join("modules.dep").exists());
        assert_eq!(
            x.notes,
            [format!(
                "in-tree dependencies from the kernel's own tree {}: crc8",
                host.path().display()
            )]
        );
    }

    #[test]
    fn an_in_tree_dependency_the_host_lacks_comes_from_the_image() {
        let (img, host) = (image(), host());
        let out = tempfile::tempdir().unwrap();
        let x = run(img.path(), &["needs_crc7"], host.path(), out.path()).unwrap();
        assert_eq!(
            paths(&x),
            ["modules/extra/needs-crc7.ko", "modules/kernel/lib/crc7.ko"]
        );
        // No host tree at all: the same.
        let x = run(
            img.path(),
            &["needs-crc7"],
            &out.path().join("none"),
            &out.path().join("2"),
        )
        .unwrap();
        assert_eq!(x.files.len(), 2);
    }

    #[test]
    fn a_link_inside_is_followed_and_arrives_as_a_file() {
        let (img, host) = (image(), host());
        let out = tempfile::tempdir().unwrap();
        let x = run(img.path(), &["c"], host.path(), out.path()).unwrap();
        // c.ko -> a.ko (content "b,crc8"): its dependencies are a's.
        assert_eq!(
            paths(&x),
            ["modules/extra/sub/b.ko.xz", "modules/extra/sub/c.ko"]
        );
        assert_eq!(
            fs::read(out.path().join("extra/sub/c.ko")).unwrap(),
            b"b,crc8"
        );
        assert!(
            !fs::symlink_metadata(out.path().join("extra/sub/c.ko"))
                .unwrap()
                .is_symlink()
        );
    }

    #[test]
    fn two_candidates_outside_kernel_and_missing_modules_are_named() {
        let (img, host) = (image(), host());
        let m = img.path().join("lib/modules/6.1.0-1-amd64");
        fs::write(m.join("extra/dummy.ko"), b"").unwrap();
        let out = tempfile::tempdir().unwrap();
        let e = run(img.path(), &["dummy"], host.path(), out.path()).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "two files for module dummy in the image: {K}/extra/dummy.ko and {K}/updates/dummy.ko ('-' and '_' are the same name)"
            )
        );
        let e = run(img.path(), &["a", "nothere"], host.path(), out.path()).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "no .ko file for module nothere under {K} in the image (modules outside kernel/: a, b, c, dummy, lonely, needs_crc7)"
            )
        );
    }

    #[test]
    fn escaping_links_are_refused_even_unneeded_and_directory_ones() {
        for (name, target) in [
            ("extra/evil.ko", "/etc/passwd"),
            ("extra/evil.ko", "../../../../etc/passwd"),
            ("extra/evil.ko", "../../6.1.0-2-amd64/x.ko"),
            ("extra/sub/up", "/"),
            ("extra/sub/up", "../../../../.."),
            ("README", "/usr/share/doc/x"),
        ] {
            let (img, host) = (image(), host());
            let m = img.path().join("lib/modules/6.1.0-1-amd64");
            symlink(target, m.join(name)).unwrap();
            let out = tempfile::tempdir().unwrap();
            let e = run(img.path(), &["lonely"], host.path(), &out.path().join("m"))
                .unwrap_err()
                .to_string();
            assert_eq!(
                e,
                format!("{K}/{name} is a symlink to {target}, outside {K}; refusing to extract it")
            );
            assert!(!out.path().join("m").exists());
        }
    }

    #[test]
    fn links_are_resolved_in_the_image_not_on_the_host() {
        // An absolute link whose path runs through an image symlink
        // (/lib -> usr/lib) stays in the image.
        let t = tempfile::tempdir().unwrap();
        let m = t.path().join("usr/lib/modules/6.1.0-1-amd64");
        fs::create_dir_all(m.join("extra")).unwrap();
        symlink("usr/lib", t.path().join("lib")).unwrap();
        fs::write(m.join("extra/real.ko"), b"").unwrap();
        symlink(format!("{K}/extra/real.ko"), m.join("extra/alias.ko")).unwrap();
        let out = tempfile::tempdir().unwrap();
        let x = run(t.path(), &["alias"], Path::new("/nonexistent"), out.path()).unwrap();
        assert_eq!(paths(&x), ["modules/extra/alias.ko"]);
        // A directory link inside is not followed, and not an error.
        symlink("extra", m.join("extra2")).unwrap();
        let x = run(
            t.path(),
            &["real"],
            Path::new("/nonexistent"),
            &out.path().join("2"),
        )
        .unwrap();
        assert_eq!(paths(&x), ["modules/extra/real.ko"]);
    }

    #[test]
    fn special_files_are_never_opened() {
        let (img, host) = (image(), host());
        let m = img.path().join("lib/modules/6.1.0-1-amd64");
        let mode = nix::sys::stat::Mode::from_bits_truncate(0o644);
        nix::unistd::mkfifo(&m.join("extra/fifo.ko"), mode).unwrap();
        let out = tempfile::tempdir().unwrap();
        let x = run(img.path(), &["lonely"], host.path(), out.path()).unwrap();
        assert_eq!(
            x.notes,
            [format!(
                "{K}/extra/fifo.ko is a FIFO, not a regular file; left in the image"
            )]
        );
        let e = run(img.path(), &["fifo"], host.path(), &out.path().join("2")).unwrap_err();
        assert_eq!(
            format!("{e:#}"),
            format!("module fifo: {K}/extra/fifo.ko is a FIFO, not a regular file")
        );
        // Needed as a dependency: named with who needs it.
        fs::write(m.join("extra/user.ko"), b"fifo").unwrap();
        let e = run(img.path(), &["user"], host.path(), &out.path().join("3")).unwrap_err();
        assert_eq!(
            format!("{e:#}"),
            format!(
                "module fifo (needed by user): {K}/extra/fifo.ko is a FIFO, not a regular file"
            )
        );
    }

    #[test]
    fn firmware_takes_regular_files_and_refuses_the_root() {
        let t = tempfile::tempdir().unwrap();
        let fw = t.path().join("lib/firmware/acme");
        fs::create_dir_all(fw.join("sub")).unwrap();
        fs::write(fw.join("a.bin"), b"A").unwrap();
        symlink("a.bin", fw.join("alias.bin")).unwrap();
        symlink("sub", fw.join("subdir")).unwrap();
        nix::unistd::mkfifo(
            &fw.join("pipe"),
            nix::sys::stat::Mode::from_bits_truncate(0o644),
        )
        .unwrap();
        symlink("pipe", fw.join("pipe-alias")).unwrap();
        let img = Image { root: t.path() };
        let out = tempfile::tempdir().unwrap();
        let (files, notes) =
            extract_firmware(&img, "/lib/firmware/acme", &out.path().join("fw")).unwrap();
        let p: Vec<_> = files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(p, ["firmware/a.bin", "firmware/alias.bin"]);
        assert_eq!(
            notes,
            [
                "/lib/firmware/acme/pipe is a FIFO, not a regular file; left in the image",
                "/lib/firmware/acme/pipe-alias is a symlink to /lib/firmware/acme/pipe, which is a FIFO; left in the image"
            ]
        );
        for root in ["/", "/lib/.."] {
            let e = extract_firmware(&img, root, &out.path().join("x")).unwrap_err();
            assert!(
                e.to_string().contains("is the image's root; refusing"),
                "{e}"
            );
        }
        symlink("/etc", fw.join("etc")).unwrap();
        let e = extract_firmware(&img, "/lib/firmware", &out.path().join("y")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "/lib/firmware/acme/etc is a symlink to /etc, outside /lib/firmware; refusing to extract it"
        );
    }

    #[test]
    fn a_missing_directory_is_named() {
        let (img, host) = (image(), host());
        let out = tempfile::tempdir().unwrap();
        let modules = names(&["a"]);
        let w = Wanted {
            modules: &modules,
            host_tree: host.path(),
            depends: &fake_depends,
        };
        let e = extract_modules(
            &Image { root: img.path() },
            "/lib/modules/9.9",
            out.path(),
            &w,
        )
        .unwrap_err();
        assert_eq!(e.to_string(), "the image has no /lib/modules/9.9");
    }

    #[test]
    fn normalize_never_climbs_above_root() {
        assert_eq!(
            normalize(Path::new("/a/b/../../../../etc")),
            Path::new("/etc")
        );
        assert_eq!(normalize(Path::new("/a/./b/")), Path::new("/a/b"));
    }

    mod acquire {
        use super::super::*;
        use crate::config::BuildSpec;
        use std::cell::RefCell;

        const REF: &str = "registry.example/acme/driver:6.1.0-1-amd64";

        /// Podman as far as [`ImageStore::acquire`] uses it: local storage,
        /// a registry and a build, each call logged.
        #[derive(Debug, Default)]
        struct FakePodman {
            stored: RefCell<BTreeMap<String, ImageInfo>>,
            /// What pulling a reference gives: an image, or podman's cause.
            registry: BTreeMap<String, Result<ImageInfo, String>>,
            /// What a build gives: an image (stored under the tag), or its failure.
            build: Option<Result<ImageInfo, String>>,
            /// Pulls succeed but store nothing.
            forgetful: bool,
            log: RefCell<Vec<String>>,
        }

        impl ContainerTool for FakePodman {
            fn program(&self) -> &Path {
                Path::new("podman")
            }
            fn calls(&self) -> usize {
                self.log.borrow().len()
            }
            fn inspect(&self, reference: &str) -> Result<Option<ImageInfo>> {
                self.log.borrow_mut().push(format!("inspect {reference}"));
                Ok(self.stored.borrow().get(reference).cloned())
            }
            fn pull(
                &self,
                reference: &str,
                _: Option<&Path>,
                _: bool,
                _: LineSink<'_>,
            ) -> Result<Option<String>> {
                self.log.borrow_mut().push(format!("pull {reference}"));
                match self.registry.get(reference) {
                    Some(Ok(info)) => {
                        if self.forgetful {
                            // Podman printed no ID, and nothing is stored.
                            return Ok(None);
                        }
                        self.stored
                            .borrow_mut()
                            .insert(reference.to_owned(), info.clone());
                        Ok(Some(info.id.clone()))
                    }
                    Some(Err(cause)) => bail!("pulling {reference}: {cause}"),
                    None => bail!("pulling {reference}: manifest unknown"),
                }
            }
            fn build(&self, b: &BuildArgs<'_>, _: LineSink<'_>) -> Result<()> {
                let args: Vec<_> = b.args.iter().map(|(k, v)| format!("{k}={v}")).collect();
                self.log.borrow_mut().push(format!(
                    "build {} from {} no_cache={} {}",
                    b.tag,
                    b.context,
                    b.no_cache,
                    args.join(" ")
                ));
                match &self.build {
                    Some(Ok(info)) => {
                        self.stored
                            .borrow_mut()
                            .insert(b.tag.to_owned(), info.clone());
                        Ok(())
                    }
                    Some(Err(e)) => bail!("building {}: {e}", b.tag),
                    None => bail!("no build expected"),
                }
            }
            fn remove_image(&self, _: &str) -> Result<()> {
                bail!("not used by acquire")
            }
            fn remove_labelled_containers(&self, _: &str) -> Result<Vec<String>> {
                bail!("not used by acquire")
            }
            fn mount(&self, _: &str) -> Result<crate::artifacts::podman::Mounted> {
                bail!("not used by acquire")
            }
            fn unmount(&self, _: &str) -> Result<()> {
                bail!("not used by acquire")
            }
        }

        fn info(id: &str, built: bool) -> ImageInfo {
            let mut labels = BTreeMap::new();
            if built {
                labels.insert(BUILT_LABEL.to_owned(), "driver".to_owned());
            }
            ImageInfo {
                id: id.to_owned(),
                digest: Some(format!("sha256:{id}")),
                labels,
            }
        }

        fn source(pull: PullPolicy, build: bool) -> ImageSource {
            ImageSource {
                reference: "registry.example/acme/driver:${KERNEL_FULL_VERSION}".into(),
                pull,
                auth_file: None,
                tls_verify: true,
                modules_dir: "/lib/modules/${KERNEL_FULL_VERSION}".into(),
                firmware_dir: None,
                build: build.then(|| BuildSpec {
                    context: "/ctx".into(),
                    file: "Containerfile".into(),
                    args: [("KVER".to_owned(), "${KERNEL_FULL_VERSION}".to_owned())].into(),
                    secrets: BTreeMap::new(),
                }),
            }
        }

        /// Runs `acquire` for `src`; gives its result, notes and podman's calls.
        fn acquire(
            podman: &FakePodman,
            src: &ImageSource,
            rebuild: bool,
        ) -> (Result<(ImageInfo, bool)>, Vec<String>, Vec<String>) {
            let vars = TemplateVars::for_config(
                &KernelRelease::parse("6.1.0-1-amd64").unwrap(),
                "driver",
                None,
            );
            let req = FetchRequest {
                config_name: "driver",
                config_digest: "d",
                source: src,
                vars: &vars,
                rebuild,
                build_hook: None,
                modules: &[],
                host_tree: Path::new("/nonexistent"),
                build_timeout_seconds: 60,
            };
            let store = ImageStore {
                state_dir: Path::new("/nonexistent"),
                podman,
            };
            let mut notes = Vec::new();
            // A pulled image's digest comes from its mount.
            let got = store
                .acquire(&req, REF, &|_| {}, &mut notes)
                .map(|a| a.info(Some("sha256:mounted".to_owned())));
            (got, notes, podman.log.take())
        }

        #[test]
        fn a_present_image_is_used_without_a_pull() {
            for built in [false, true] {
                let podman = FakePodman::default();
                podman
                    .stored
                    .borrow_mut()
                    .insert(REF.into(), info("aa", built));
                let (got, notes, calls) =
                    acquire(&podman, &source(PullPolicy::Missing, true), false);
                assert_eq!(got.unwrap(), (info("aa", built), built));
                assert_eq!(notes, [format!("image {REF} is present")]);
                assert_eq!(calls, [format!("inspect {REF}")]);
            }
        }

        #[test]
        fn present_then_pull_then_build_in_that_order() {
            let podman = FakePodman {
                registry: [(REF.to_owned(), Err("unauthorized".to_owned()))].into(),
                build: Some(Ok(info("bb", true))),
                ..FakePodman::default()
            };
            let (got, notes, calls) = acquire(&podman, &source(PullPolicy::Missing, true), false);
            assert_eq!(got.unwrap(), (info("bb", true), true));
            assert_eq!(notes, [format!("built {REF} from /ctx")]);
            assert_eq!(
                calls,
                [
                    format!("inspect {REF}"),
                    format!("pull {REF}"),
                    format!("build {REF} from /ctx no_cache=false KVER=6.1.0-1-amd64"),
                    format!("inspect {REF}"),
                ]
            );
        }

        #[test]
        fn a_pulled_image_is_not_inspected_and_always_skips_the_local_look() {
            // Even with kvcd's label, a pulled image was not built on this node.
            let podman = FakePodman {
                registry: [(REF.to_owned(), Ok(info("cc", true)))].into(),
                ..FakePodman::default()
            };
            let (got, notes, calls) = acquire(&podman, &source(PullPolicy::Always, true), false);
            let want = ImageInfo {
                id: "cc".into(),
                digest: Some("sha256:mounted".into()),
                labels: BTreeMap::new(),
            };
            assert_eq!(got.unwrap(), (want, false));
            assert_eq!(notes, [format!("pulled {REF}")]);
            assert_eq!(calls, [format!("pull {REF}")]);
        }

        #[test]
        fn every_way_tried_is_listed_when_none_gives_the_image() {
            let podman = FakePodman::default();
            let (got, _, calls) = acquire(&podman, &source(PullPolicy::Never, false), false);
            assert_eq!(
                got.unwrap_err().to_string(),
                format!(
                    "no image {REF}; tried:\n  - local storage: not present\n  - pull: not tried (pull = \"never\")\n  - build: no [build] in the config"
                )
            );
            assert_eq!(calls, [format!("inspect {REF}")]);

            let podman = FakePodman {
                build: Some(Err("exit status 1".to_owned())),
                ..FakePodman::default()
            };
            let (got, _, _) = acquire(&podman, &source(PullPolicy::Missing, true), false);
            assert_eq!(
                got.unwrap_err().to_string(),
                format!(
                    "no image {REF}; tried:\n  - local storage: not present\n  - pull: pulling {REF}: manifest unknown\n  - build: building {REF}: exit status 1"
                )
            );
        }

        #[test]
        fn a_pull_that_leaves_no_image_is_a_failed_pull() {
            // Another process removes the image between the pull and the look.
            let podman = FakePodman {
                registry: [(REF.to_owned(), Ok(info("ee", false)))].into(),
                forgetful: true,
                ..FakePodman::default()
            };
            let (got, _, calls) = acquire(&podman, &source(PullPolicy::Always, false), false);
            assert_eq!(
                got.unwrap_err().to_string(),
                format!(
                    "no image {REF}; tried:\n  - pull: image {REF} is not in local storage afterwards\n  - build: no [build] in the config"
                )
            );
            assert_eq!(calls, [format!("pull {REF}"), format!("inspect {REF}")]);
        }

        #[test]
        fn a_rebuild_goes_straight_to_a_build_without_cache() {
            let podman = FakePodman {
                registry: [(REF.to_owned(), Ok(info("cc", false)))].into(),
                build: Some(Ok(info("ff", true))),
                ..FakePodman::default()
            };
            podman
                .stored
                .borrow_mut()
                .insert(REF.into(), info("aa", true));
            let (got, _, calls) = acquire(&podman, &source(PullPolicy::Missing, true), true);
            assert_eq!(got.unwrap(), (info("ff", true), true));
            assert_eq!(
                calls,
                [
                    format!("build {REF} from /ctx no_cache=true KVER=6.1.0-1-amd64"),
                    format!("inspect {REF}"),
                ]
            );
        }
    }
}
