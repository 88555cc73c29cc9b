//! The `[image]` source: get the driver image (present → pull → build),
//! extract its modules (and firmware) without running it, and cache the
//! extraction per (config content, kernel, image digest) so that a later
//! apply spawns no podman at all.

use std::fs;
use std::path::{Component, Path, PathBuf};

use anyhow::{Context as _, Result, anyhow, bail};
use serde::{Deserialize, Serialize};

use super::podman::{BUILT_LABEL, BuildArgs, ImageInfo, LineSink, Podman};
use crate::config::{ImageSource, PullPolicy};
use crate::kernel::{KernelRelease, TemplateVars, expand, expand_all};
use crate::kmod::ModName;
use crate::util::write_atomic;

const COMPLETE: &str = ".kvcd-complete";
const INDEX: &str = "index.json";
const MAX_LINKS: usize = 8;

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

/// `index.json`: which extraction is current for (config, kernel).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Index {
    config_digest: String,
    reference: String,
    digest: String,
    dir: String,
    built: bool,
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

/// Image fetching and extraction for one module config and kernel.
#[derive(Debug)]
pub struct ImageStore<'a> {
    /// kvcd's state directory; extractions go under `images/`.
    pub state_dir: &'a Path,
    /// Podman.
    pub podman: &'a Podman,
}

impl ImageStore<'_> {
    fn dir(&self, config: &str, kernel: &KernelRelease) -> PathBuf {
        self.state_dir
            .join("images")
            .join(config)
            .join(kernel.as_str())
    }

    fn read_index(dir: &Path) -> Option<Index> {
        let data = fs::read(dir.join(INDEX)).ok()?;
        serde_json::from_slice(&data).ok()
    }

    fn from_index(dir: &Path, idx: &Index, src: &ImageSource, notes: Vec<String>) -> Fetched {
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
            ..
        } = *req;
        let reference = expand(&src.reference, vars).context("key `image.ref`")?;
        let dir = self.dir(config_name, &vars.kernel);
        let index = Self::read_index(&dir).filter(|i| {
            i.config_digest == config_digest
                && i.reference == reference
                && dir.join(&i.dir).join(COMPLETE).exists()
        });

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
        let (info, built) = self.acquire(req, &reference, sink, &mut notes)?;
        let digest = info.identity();
        if let Some(idx) = index.filter(|i| i.digest == digest) {
            notes.push(format!(
                "{reference} is unchanged ({digest}); keeping the extraction"
            ));
            return Ok(Self::from_index(&dir, &idx, src, notes));
        }

        let name: String = digest
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
        self.extract(
            &dir,
            &name,
            &info,
            &reference,
            &vars.kernel,
            &modules_dir,
            firmware_dir.as_deref(),
        )?;
        let what = match &firmware_dir {
            Some(fw) => format!("{modules_dir} and {fw}"),
            None => modules_dir,
        };
        notes.push(format!("extracted {what} from {reference} ({digest})"));
        let idx = Index {
            config_digest: config_digest.to_owned(),
            reference: reference.clone(),
            digest,
            dir: name.clone(),
            built,
        };
        write_atomic(&dir.join(INDEX), &serde_json::to_vec_pretty(&idx)?)?;
        // Other extractions for this config and kernel are superseded.
        for entry in fs::read_dir(&dir)?.flatten() {
            let n = entry.file_name();
            if entry.path().is_dir() && n != name.as_str() {
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
    ) -> Result<(ImageInfo, bool)> {
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
                        let built = info_is_built(&info);
                        return Ok((info, built));
                    }
                    Ok(None) => tried.push("local storage: not present".to_owned()),
                    Err(e) => tried.push(format!("local storage: {e:#}")),
                }
            }
            if src.pull == PullPolicy::Never {
                tried.push("pull: not tried (pull = \"never\")".to_owned());
            } else {
                match self
                    .podman
                    .pull(reference, src.auth_file.as_deref(), src.tls_verify, sink)
                    .and_then(|()| self.present(reference))
                {
                    Ok(info) => {
                        notes.push(format!("pulled {reference}"));
                        let built = info_is_built(&info);
                        return Ok((info, built));
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
                std::time::Duration::from_secs(hook.timeout_seconds),
                &|_, line| sink(line),
            )
            .map_err(anyhow::Error::from)
            .and_then(|()| self.present(reference));
            return match result {
                Ok(info) => {
                    notes.push(format!("the build hook made {reference}"));
                    Ok((info, true))
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
        };
        match self
            .podman
            .build(&build, sink)
            .and_then(|()| self.present(reference))
        {
            Ok(info) => {
                notes.push(format!("built {reference} from {context}"));
                Ok((info, true))
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

    /// Copies the modules (and firmware) out of the mounted image into `dir/name`, atomically.
    #[allow(clippy::too_many_arguments)]
    fn extract(
        &self,
        dir: &Path,
        name: &str,
        info: &ImageInfo,
        reference: &str,
        kernel: &KernelRelease,
        modules_dir: &str,
        firmware_dir: Option<&str>,
    ) -> Result<()> {
        let tmp = dir.join(format!(".tmp-{name}-{}", std::process::id()));
        if tmp.exists() {
            fs::remove_dir_all(&tmp)?;
        }
        fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let root = self.podman.mount(&info.id)?;
        let copied = (|| {
            let mut files = copy_tree(&root, modules_dir, &tmp.join("modules"), "modules", true)
                .with_context(|| format!("extracting {modules_dir} from {reference}"))?;
            if files.is_empty() {
                bail!("image {reference} has no module files under {modules_dir}");
            }
            if let Some(fw) = firmware_dir {
                files.extend(
                    copy_tree(&root, fw, &tmp.join("firmware"), "firmware", false)
                        .with_context(|| format!("extracting {fw} from {reference}"))?,
                );
            }
            Ok(files)
        })();
        let unmounted = self.podman.unmount(&info.id);
        let files = match copied {
            Ok(f) => f,
            Err(e) => {
                let _ = fs::remove_dir_all(&tmp);
                return Err(e);
            }
        };
        unmounted?;
        let manifest = Manifest {
            reference: reference.to_owned(),
            digest: info.identity(),
            image_id: info.id.clone(),
            kernel: kernel.to_string(),
            modules_dir: modules_dir.to_owned(),
            firmware_dir: firmware_dir.map(str::to_owned),
            files,
        };
        fs::write(
            tmp.join("manifest.json"),
            serde_json::to_vec_pretty(&manifest)?,
        )?;
        fs::write(tmp.join(COMPLETE), b"")?;
        let dest = dir.join(name);
        if dest.exists() {
            fs::remove_dir_all(&dest)?;
        }
        fs::rename(&tmp, &dest)
            .with_context(|| format!("renaming {} into place", tmp.display()))?;
        Ok(())
    }
}

fn info_is_built(info: &ImageInfo) -> bool {
    info.labels.contains_key(BUILT_LABEL)
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

/// Copies files from `image_dir` (a path inside the image mounted at `root`)
/// to `dest`. Only module files when `modules_only`. Symlinks are followed
/// only while they stay inside `image_dir`; one that leaves it is an error.
/// Nothing is ever written outside `dest`.
fn copy_tree(
    root: &Path,
    image_dir: &str,
    dest: &Path,
    label: &str,
    modules_only: bool,
) -> Result<Vec<ManifestFile>> {
    let base = normalize(Path::new(image_dir));
    let local = |image_path: &Path| root.join(image_path.strip_prefix("/").unwrap_or(image_path));
    let meta = fs::symlink_metadata(local(&base))
        .map_err(|_| anyhow!("the image has no {}", base.display()))?;
    if !meta.is_dir() {
        bail!("{} in the image is not a directory", base.display());
    }
    fs::create_dir_all(dest)?;
    let mut files = Vec::new();
    let mut stack = vec![base.clone()];
    while let Some(d) = stack.pop() {
        let mut entries: Vec<_> = fs::read_dir(local(&d))?.collect::<Result<_, _>>()?;
        entries.sort_by_key(fs::DirEntry::file_name);
        for entry in entries {
            let image_path = d.join(entry.file_name());
            let name = entry.file_name().to_string_lossy().into_owned();
            let wanted = !modules_only || ModName::from_file_name(&name).is_some();
            let ft = entry.file_type()?;
            if ft.is_dir() {
                stack.push(image_path);
                continue;
            }
            if !wanted {
                continue;
            }
            // Follow links inside the extracted directory only.
            let mut target = image_path.clone();
            let mut hops = 0;
            loop {
                let m = fs::symlink_metadata(local(&target))
                    .with_context(|| format!("{} does not exist in the image", target.display()))?;
                if !m.file_type().is_symlink() {
                    if !m.is_file() {
                        bail!("{} is not a regular file", image_path.display());
                    }
                    break;
                }
                hops += 1;
                if hops > MAX_LINKS {
                    bail!(
                        "{}: too many levels of symbolic links",
                        image_path.display()
                    );
                }
                let link = fs::read_link(local(&target))?;
                let next = if link.is_absolute() {
                    normalize(&link)
                } else {
                    normalize(&target.parent().unwrap_or(Path::new("/")).join(&link))
                };
                if !next.starts_with(&base) {
                    bail!(
                        "{} is a symlink to {}, outside {}; refusing to extract it",
                        image_path.display(),
                        link.display(),
                        base.display()
                    );
                }
                target = next;
            }
            let rel = image_path.strip_prefix(&base).unwrap_or(&image_path);
            let out = dest.join(rel);
            if let Some(p) = out.parent() {
                fs::create_dir_all(p)?;
            }
            let data = fs::read(local(&target))
                .with_context(|| format!("reading {} from the image", target.display()))?;
            fs::write(&out, &data).with_context(|| format!("writing {}", out.display()))?;
            files.push(ManifestFile {
                path: format!("{label}/{}", rel.display()),
                size: data.len() as u64,
                sha256: crate::util::sha256_hex(&data),
            });
        }
    }
    files.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    /// A fake image root: lib/modules/K with modules, a `build` link outside, and links.
    fn image() -> tempfile::TempDir {
        let t = tempfile::tempdir().unwrap();
        let m = t.path().join("lib/modules/6.1.0-1-amd64");
        fs::create_dir_all(m.join("extra/sub")).unwrap();
        fs::write(m.join("extra/a.ko"), b"A").unwrap();
        fs::write(m.join("extra/sub/b.ko.xz"), b"B").unwrap();
        fs::write(m.join("modules.dep"), b"").unwrap();
        symlink("/usr/src/linux-headers-6.1.0-1-amd64", m.join("build")).unwrap();
        symlink("../a.ko", m.join("extra/sub/c.ko")).unwrap();
        t
    }

    #[test]
    fn copies_module_files_following_inner_links_only() {
        let img = image();
        let out = tempfile::tempdir().unwrap();
        let dest = out.path().join("modules");
        let files = copy_tree(
            img.path(),
            "/lib/modules/6.1.0-1-amd64",
            &dest,
            "modules",
            true,
        )
        .unwrap();
        let paths: Vec<_> = files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "modules/extra/a.ko",
                "modules/extra/sub/b.ko.xz",
                "modules/extra/sub/c.ko"
            ]
        );
        assert_eq!(fs::read(dest.join("extra/sub/c.ko")).unwrap(), b"A");
        assert!(!dest.join("build").exists());
        assert!(!dest.join("modules.dep").exists());
        assert_eq!(files[0].sha256, crate::util::sha256_hex(b"A"));
    }

    #[test]
    fn escaping_links_are_refused_and_nothing_is_written_outside() {
        for target in [
            "/etc/passwd",
            "../../../../etc/passwd",
            "../../6.1.0-2-amd64/x.ko",
        ] {
            let img = image();
            let m = img.path().join("lib/modules/6.1.0-1-amd64/extra");
            symlink(target, m.join("evil.ko")).unwrap();
            let out = tempfile::tempdir().unwrap();
            let e = copy_tree(
                img.path(),
                "/lib/modules/6.1.0-1-amd64",
                &out.path().join("m"),
                "modules",
                true,
            )
            .unwrap_err()
            .to_string();
            assert!(e.contains("evil.ko is a symlink to"), "{e}");
            assert!(e.contains("outside /lib/modules/6.1.0-1-amd64"), "{e}");
        }
    }

    #[test]
    fn a_missing_directory_is_named() {
        let img = image();
        let out = tempfile::tempdir().unwrap();
        let e = copy_tree(
            img.path(),
            "/lib/modules/9.9",
            &out.path().join("m"),
            "modules",
            true,
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
}
