//! Raw config → validated settings, collecting every error with its location.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use regex::Regex;
use serde::Serialize;

use super::raw::{
    OneOrMany, RawBuild, RawDaemon, RawHooks, RawImage, RawMatch, RawModuleConfig, RawReady,
    RawSigning, S, SList,
};
use super::{
    BuildSpec, ConfigError, DEFAULT_BUILD_TIMEOUT, DEFAULT_HOOK_TIMEOUT, DEFAULT_IMAGE_MODULES_DIR,
    DEFAULT_READY_TIMEOUT, DaemonSettings, Hooks, ImageSource, ModuleConfig, ModuleEntry,
    PullPolicy, ReadyCheck, ReadyKind, SigningSettings, Source,
};
use crate::kernel::check_template;
use crate::kmod::ModName;
use crate::util::sha256_hex;

/// A module config (instance) name: the file stem, also used in unit and D-Bus names.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct InstanceName(String);

impl InstanceName {
    /// Letters, digits, `_`, `-` and `.` (not first), at most 64 characters.
    pub fn parse(s: &str) -> Result<Self, String> {
        let ok = !s.is_empty()
            && s.len() <= 64
            && s.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(format!(
                "{s:?}: expected 1-64 characters of letters, digits, '_', '-' and '.', starting with a letter or digit"
            ))
        }
    }

    /// The name as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for InstanceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Which checks run besides those of each file on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Scope {
    /// One node's configuration: every check, including what must exist on this host.
    Node,
    /// A collection of alternative examples: each config is checked beside only
    /// the configs its `after` names, and host files (KVC libraries) need not exist.
    Examples,
}

/// Collects errors for one file, turning byte spans into line and column.
struct Diag<'a> {
    file: &'a Path,
    text: &'a str,
    /// Byte offset where each line starts.
    line_starts: Vec<usize>,
    errors: Vec<ConfigError>,
}

impl<'a> Diag<'a> {
    fn new(file: &'a Path, text: &'a str) -> Self {
        let line_starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        Self {
            file,
            text,
            line_starts,
            errors: Vec::new(),
        }
    }

    /// 1-based line and column (in bytes) of a byte offset.
    fn line_col(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.text.len());
        // line_starts[0] is 0, so at least one start is <= offset.
        let line = self.line_starts.partition_point(|&s| s <= offset);
        let start = self
            .line_starts
            .get(line.wrapping_sub(1))
            .copied()
            .unwrap_or(0);
        (line, offset - start + 1)
    }

    fn error(
        &mut self,
        span: Option<Range<usize>>,
        key: impl Into<String>,
        message: impl Into<String>,
    ) {
        let (line, column) = match span {
            Some(s) => {
                let (l, c) = self.line_col(s.start);
                (Some(l), Some(c))
            }
            None => (None, None),
        };
        self.errors.push(ConfigError {
            file: self.file.to_owned(),
            line,
            column,
            key: Some(key.into()),
            message: message.into(),
        });
    }

    /// A TOML syntax or type error, with the key guessed from the line it points at.
    fn parse_error(&mut self, err: &toml::de::Error) {
        let message = err.message().trim_end();
        let Some(span) = err.span() else {
            self.deep_key_error(message);
            return;
        };
        let (line, column) = self.line_col(span.start);
        let message = if message.contains("max recursion depth") {
            format!(
                "{message}: expected arrays and inline tables nested fewer than {TOML_DEPTH_LIMIT} levels deep (kvcd's own values nest at most 2)"
            )
        } else {
            message.to_owned()
        };
        self.errors.push(ConfigError {
            file: self.file.to_owned(),
            line: Some(line),
            column: Some(column),
            key: self.key_at(span.start),
            message,
        });
    }

    /// A parse error without a position. The TOML parser reports a dotted key
    /// or table header with too many parts that way, so point at the line with
    /// the most dotted parts.
    fn deep_key_error(&mut self, message: &str) {
        let deepest = self
            .text
            .lines()
            .enumerate()
            .filter_map(|(i, l)| key_parts(l).map(|(parts, key)| (parts, i, key)))
            .max_by_key(|(parts, i, _)| (*parts, std::cmp::Reverse(*i)));
        match deepest {
            Some((parts, i, key)) if parts > 3 => {
                let col = self
                    .text
                    .lines()
                    .nth(i)
                    .map_or(0, |l| l.len() - l.trim_start().len());
                let shown: Vec<&str> = key.split('.').take(3).collect();
                self.errors.push(ConfigError {
                    file: self.file.to_owned(),
                    line: Some(i + 1),
                    column: Some(col + 1),
                    key: Some(format!("{}…", shown.join("."))),
                    message: format!(
                        "key nested {parts} levels deep ({message}): expected fewer than {TOML_DEPTH_LIMIT} levels (kvcd's own keys have at most 3, like `build.args.NAME`)"
                    ),
                });
            }
            _ => self.errors.push(ConfigError::file(
                self.file,
                format!("{message} (the parser gave no position)"),
            )),
        }
    }

    /// The dotted key assigned on the line holding `offset`, with its table header.
    fn key_at(&self, offset: usize) -> Option<String> {
        let offset = offset.min(self.text.len());
        let start = self.text[..offset].rfind('\n').map_or(0, |i| i + 1);
        let line = self.text[start..].lines().next().unwrap_or("");
        let key = line.split_once('=')?.0.trim();
        if key.is_empty() || key.starts_with('[') || key.starts_with('#') {
            return None;
        }
        let key = key.trim_matches('"');
        let table = self.text[..start]
            .lines()
            .rev()
            .map(str::trim)
            .find(|l| l.starts_with('['))
            .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim().to_owned());
        Some(match table {
            Some(t) => format!("{t}.{key}"),
            None => key.to_owned(),
        })
    }

    fn finish<T>(self, value: T) -> Result<T, Vec<ConfigError>> {
        if self.errors.is_empty() {
            Ok(value)
        } else {
            Err(self.errors)
        }
    }
}

/// The TOML parser's nesting limit (tables, arrays and dotted keys).
const TOML_DEPTH_LIMIT: usize = 80;

/// The number of dotted parts of the key a line assigns or the table header it
/// opens, and the key, when it has one; quoted parts may hold dots.
fn key_parts(line: &str) -> Option<(usize, String)> {
    let t = line.trim_start();
    let body = t.trim_start_matches('[');
    let header = body.len() != t.len();
    if t.starts_with('#') || body.trim().is_empty() {
        return None;
    }
    let mut quote: Option<char> = None;
    let mut parts = 1;
    let mut end = body.len();
    for (i, c) in body.char_indices() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), _) => {}
            (None, '"' | '\'') => quote = Some(c),
            (None, '.') => parts += 1,
            (None, ']') if header => {
                end = i;
                break;
            }
            (None, '=') if !header => {
                end = i;
                break;
            }
            (None, _) => {}
        }
    }
    if !header && end == body.len() {
        return None;
    }
    Some((parts, body[..end].trim().to_owned()))
}

fn absolute_path(d: &mut Diag<'_>, key: &str, v: &S<String>) -> Option<PathBuf> {
    let p = Path::new(v.get_ref());
    if p.is_absolute() {
        Some(p.to_owned())
    } else {
        d.error(
            Some(v.span()),
            key,
            format!("expected an absolute path, found {:?}", v.get_ref()),
        );
        None
    }
}

/// Validates `kvcd.toml`.
pub(super) fn daemon(file: &Path, text: &str) -> Result<DaemonSettings, Vec<ConfigError>> {
    let mut d = Diag::new(file, text);
    let raw: RawDaemon = match toml::from_str(text) {
        Ok(r) => r,
        Err(e) => {
            d.parse_error(&e);
            return Err(d.errors);
        }
    };
    let mut s = DaemonSettings {
        file: Some(file.to_owned()),
        ..DaemonSettings::default()
    };
    let dirs: [(&str, &Option<S<String>>, &mut PathBuf); 4] = [
        ("firmware_dir", &raw.firmware_dir, &mut s.firmware_dir),
        ("state_dir", &raw.state_dir, &mut s.state_dir),
        ("runtime_dir", &raw.runtime_dir, &mut s.runtime_dir),
        (
            "kernel_modules_dir",
            &raw.kernel_modules_dir,
            &mut s.kernel_modules_dir,
        ),
    ];
    for (key, value, slot) in dirs {
        if let Some(v) = value {
            if let Some(p) = absolute_path(&mut d, key, v) {
                *slot = p;
            }
        }
    }
    if let Some(v) = &raw.podman {
        if let Err(msg) = check_program(v.get_ref()) {
            d.error(Some(v.span()), "podman", msg);
        } else {
            s.podman = PathBuf::from(v.get_ref());
        }
    }
    if let Some(v) = raw.prepare_next_kernels {
        s.prepare_next_kernels = v;
    }
    if let Some(v) = raw.unload_on_stop {
        s.unload_on_stop = v;
    }
    if let Some(v) = &raw.max_parallel {
        match usize::try_from(*v.get_ref()) {
            Ok(n) if n >= 1 => s.max_parallel = n,
            _ => d.error(
                Some(v.span()),
                "max_parallel",
                format!(
                    "expected a whole number of module configs worked on at once, at least 1, found {}",
                    v.get_ref()
                ),
            ),
        }
    }
    if let Some(n) = raw
        .retry_base_seconds
        .as_ref()
        .and_then(|v| seconds(&mut d, "retry_base_seconds", v))
    {
        s.retry_base_seconds = n;
    }
    if let Some(n) = raw
        .retry_max_seconds
        .as_ref()
        .and_then(|v| seconds(&mut d, "retry_max_seconds", v))
    {
        s.retry_max_seconds = n;
    }
    if s.retry_max_seconds < s.retry_base_seconds {
        let (key, span) = match (&raw.retry_max_seconds, &raw.retry_base_seconds) {
            (Some(m), _) => ("retry_max_seconds", m.span()),
            (None, Some(b)) => ("retry_base_seconds", b.span()),
            (None, None) => ("retry_max_seconds", 0..0),
        };
        d.error(
            Some(span),
            key,
            format!(
                "retry_max_seconds ({}{}) is below retry_base_seconds ({}{}): expected retry_max_seconds >= retry_base_seconds",
                s.retry_max_seconds,
                if raw.retry_max_seconds.is_none() { ", the default" } else { "" },
                s.retry_base_seconds,
                if raw.retry_base_seconds.is_none() { ", the default" } else { "" },
            ),
        );
    }
    for (key, value, slot) in [
        (
            "pull_timeout_seconds",
            &raw.pull_timeout_seconds,
            &mut s.pull_timeout_seconds,
        ),
        (
            "podman_timeout_seconds",
            &raw.podman_timeout_seconds,
            &mut s.podman_timeout_seconds,
        ),
        (
            "stop_timeout_seconds",
            &raw.stop_timeout_seconds,
            &mut s.stop_timeout_seconds,
        ),
    ] {
        if let Some(n) = value.as_ref().and_then(|v| seconds(&mut d, key, v)) {
            *slot = n;
        }
    }
    if let Some(v) = &raw.signing {
        s.signing = signing(&mut d, v);
    }
    if let Some(m) = &raw.metrics {
        match &m.get_ref().textfile {
            Some(v) if !v.get_ref().ends_with(".prom") => d.error(
                Some(v.span()),
                "metrics.textfile",
                format!(
                    "expected the path of a *.prom file (node_exporter's textfile collector reads only those), found {:?}",
                    v.get_ref()
                ),
            ),
            Some(v) => s.metrics_textfile = absolute_path(&mut d, "metrics.textfile", v),
            None => d.error(
                Some(m.span()),
                "metrics.textfile",
                "[metrics] needs textfile = \"/absolute/path/kvcd.prom\" (in node_exporter's --collector.textfile.directory)",
            ),
        }
    }
    if let Some(v) = &raw.keep_kernels {
        match usize::try_from(*v.get_ref()) {
            Ok(n) if n >= 1 => s.keep_kernels = n,
            _ => d.error(
                Some(v.span()),
                "keep_kernels",
                format!(
                    "expected a whole number of kernels, at least 1, found {}",
                    v.get_ref()
                ),
            ),
        }
    }
    d.finish(s)
}

/// `[signing]`: key and cert are required absolute paths (a PKCS#11 URI is
/// refused by name), `hash` one kvcd signs with. The files themselves are
/// read (and the key's permissions checked) when kvcd signs.
fn signing(d: &mut Diag<'_>, v: &S<RawSigning>) -> Option<SigningSettings> {
    let raw = v.get_ref();
    let mut path = |key: &str, value: &Option<S<String>>, what: &str| -> Option<PathBuf> {
        let Some(value) = value else {
            d.error(
                Some(v.span()),
                format!("signing.{key}"),
                format!("[signing] needs {key} = \"/absolute/path\" ({what})"),
            );
            return None;
        };
        if value.get_ref().starts_with("pkcs11:") {
            d.error(
                Some(value.span()),
                format!("signing.{key}"),
                "PKCS#11 URIs are not supported: expected the absolute path of a PEM or DER file",
            );
            return None;
        }
        absolute_path(d, &format!("signing.{key}"), value)
    };
    let key = path(
        "key",
        &raw.key,
        "the private key, PEM, readable by root only",
    );
    let cert = path("cert", &raw.cert, "the key's X.509 certificate, DER or PEM");
    let mut hash = crate::signing::Hash::Sha256;
    if let Some(h) = &raw.hash {
        match crate::signing::Hash::from_name(h.get_ref()) {
            Some(x) => hash = x,
            None => d.error(
                Some(h.span()),
                "signing.hash",
                format!(
                    "expected one of {}, found {:?}",
                    crate::signing::Hash::ALL
                        .iter()
                        .map(|(n, _)| format!("\"{n}\""))
                        .collect::<Vec<_>>()
                        .join(", "),
                    h.get_ref()
                ),
            ),
        }
    }
    Some(SigningSettings {
        key: key?,
        cert: cert?,
        hash,
    })
}

/// A program setting: a bare name looked up in `PATH`, or an absolute path; never a command line.
fn check_program(p: &str) -> Result<(), String> {
    let bare = !p.contains('/');
    let ok = !p.is_empty()
        && (bare || p.starts_with('/'))
        && !p.starts_with('-')
        && !p.chars().any(|c| c.is_whitespace() || c.is_control());
    if ok {
        Ok(())
    } else {
        Err(format!(
            "expected a program path, not a command line: a program name looked up in PATH (e.g. \"podman\") or an absolute path, without blanks or a leading '-'; found {p:?}"
        ))
    }
}

/// Parses a list of module names, reporting bad and duplicate entries.
fn mod_names(d: &mut Diag<'_>, key: &str, list: &SList) -> Vec<ModName> {
    let mut out: Vec<ModName> = Vec::new();
    let mut seen: HashSet<ModName> = HashSet::with_capacity(list.get_ref().len());
    for item in list.get_ref() {
        match ModName::parse(item.get_ref()) {
            Ok(n) if seen.contains(&n) => d.error(
                Some(item.span()),
                key,
                format!(
                    "module {:?} is listed twice ('-' and '_' are the same)",
                    item.get_ref()
                ),
            ),
            Ok(n) => {
                seen.insert(n.clone());
                out.push(n);
            }
            Err(msg) => d.error(Some(item.span()), key, msg),
        }
    }
    out
}

/// One kernel module parameter: `name` or `name=value`; a value with blanks must be double-quoted.
fn check_parameter(p: &str) -> Result<(), String> {
    let (name, value) = p.split_once('=').unwrap_or((p, ""));
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err(format!(
            "parameter {p:?}: expected `name=value` with a name of letters, digits and '_'"
        ));
    }
    let quoted = value.len() >= 2 && value.starts_with('"') && value.ends_with('"');
    if value.chars().any(char::is_control) || (!quoted && value.chars().any(char::is_whitespace)) {
        return Err(format!(
            "parameter {p:?}: a value with blanks must be in double quotes, and control characters are not allowed"
        ));
    }
    Ok(())
}

/// A template value: known variables only; `${MOD_VERSION}` needs a `version`.
fn template(d: &mut Diag<'_>, key: &str, v: &S<String>, has_version: bool) -> Option<String> {
    if let Err(e) = check_template(v.get_ref()) {
        d.error(Some(v.span()), key, e.to_string());
        None
    } else if v.get_ref().contains("${MOD_VERSION}") && !has_version {
        d.error(
            Some(v.span()),
            key,
            "uses ${MOD_VERSION} but the config sets no `version`",
        );
        None
    } else {
        Some(v.get_ref().clone())
    }
}

/// A template that must expand to an absolute path.
fn abs_template(d: &mut Diag<'_>, key: &str, v: &S<String>, has_version: bool) -> Option<String> {
    if !v.get_ref().starts_with('/') {
        d.error(
            Some(v.span()),
            key,
            format!("expected an absolute path, found {:?}", v.get_ref()),
        );
        return None;
    }
    template(d, key, v, has_version)
}

/// True when an image reference names its registry host (as podman's
/// `registry_of` reads it): the first path component holds `.` or `:`, or is `localhost`.
fn fully_qualified(reference: &str) -> bool {
    reference
        .split_once('/')
        .is_some_and(|(first, _)| first.contains(['.', ':']) || first == "localhost")
}

/// A directory inside the image: absolute, below `/`, without `..` components.
fn image_subdir(d: &mut Diag<'_>, key: &str, v: &S<String>, has_version: bool) -> Option<String> {
    let p = v.get_ref();
    let parts: Vec<&str> = p
        .split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect();
    if p.starts_with('/') && (parts.is_empty() || parts.contains(&"..")) {
        let example = if key.ends_with("modules_dir") {
            DEFAULT_IMAGE_MODULES_DIR
        } else {
            "/lib/firmware/acme"
        };
        d.error(
            Some(v.span()),
            key,
            format!(
                "expected a directory below the image's root, e.g. {example:?} (not \"/\" and no \"..\"), found {p:?}"
            ),
        );
        return None;
    }
    abs_template(d, key, v, has_version)
}

/// True for what podman build takes as a remote context.
pub(super) fn is_git_url(s: &str) -> bool {
    ["https://", "http://", "git://", "ssh://", "git@"]
        .iter()
        .any(|p| s.starts_with(p))
}

fn image_source(
    d: &mut Diag<'_>,
    img: &S<RawImage>,
    build: Option<&S<RawBuild>>,
    has_version: bool,
) -> Option<ImageSource> {
    let raw = img.get_ref();
    let reference = match &raw.reference {
        None => {
            d.error(Some(img.span()), "image.ref", "missing: expected an image reference, e.g. \"registry.example.com/acme/driver:${KERNEL_FULL_VERSION}\"");
            None
        }
        Some(r)
            if r.get_ref().trim().is_empty()
                || r.get_ref()
                    .chars()
                    .any(|c| c.is_whitespace() || c.is_control())
                || r.get_ref().starts_with('-') =>
        {
            d.error(
                Some(r.span()),
                "image.ref",
                format!(
                    "expected an image reference without blanks and not starting with '-', found {:?}",
                    r.get_ref()
                ),
            );
            None
        }
        Some(r) if !fully_qualified(r.get_ref()) => {
            d.error(
                Some(r.span()),
                "image.ref",
                format!(
                    "expected a fully qualified image reference that names its registry, e.g. \"localhost/NAME:TAG\" or \"registry.example.com/NAME:TAG\" (podman would look a short name up in other registries), found {:?}",
                    r.get_ref()
                ),
            );
            None
        }
        Some(r) => template(d, "image.ref", r, has_version),
    };
    let pull = match raw.pull.as_ref().map(|p| (p, p.get_ref().as_str())) {
        None | Some((_, "missing")) => Some(PullPolicy::Missing),
        Some((_, "always")) => Some(PullPolicy::Always),
        Some((_, "never")) => Some(PullPolicy::Never),
        Some((p, other)) => {
            d.error(
                Some(p.span()),
                "image.pull",
                format!("expected \"missing\", \"always\" or \"never\", found {other:?}"),
            );
            None
        }
    };
    let auth_file = raw
        .auth_file
        .as_ref()
        .and_then(|a| absolute_path(d, "image.auth_file", a));
    let modules_dir = match &raw.modules_dir {
        None => Some(DEFAULT_IMAGE_MODULES_DIR.to_owned()),
        Some(m) => image_subdir(d, "image.modules_dir", m, has_version),
    };
    let firmware_dir = raw
        .firmware_dir
        .as_ref()
        .map(|f| image_subdir(d, "image.firmware_dir", f, has_version));
    let build = build.map(|b| build_spec(d, b, has_version));
    Some(ImageSource {
        reference: reference?,
        pull: pull?,
        auth_file,
        tls_verify: raw.tls_verify.unwrap_or(true),
        modules_dir: modules_dir?,
        firmware_dir: firmware_dir.map(|f| f.ok_or(())).transpose().ok()?,
        build: build.map(|b| b.ok_or(())).transpose().ok()?,
    })
}

/// True when `file` (`build.file`) names a file inside the build context: not
/// empty, not absolute, not an option, no control characters, no `..`.
pub(super) fn build_file_ok(file: &str) -> bool {
    !(file.is_empty()
        || file.starts_with(['/', '-'])
        || file.chars().any(char::is_control)
        || file.split('/').any(|p| p == ".."))
}

fn build_spec(d: &mut Diag<'_>, b: &S<RawBuild>, has_version: bool) -> Option<BuildSpec> {
    let raw = b.get_ref();
    let context = match &raw.context {
        None => {
            d.error(
                Some(b.span()),
                "build.context",
                "missing: expected the build context, a directory or a git URL",
            );
            None
        }
        Some(c) if is_git_url(c.get_ref()) => template(d, "build.context", c, has_version),
        Some(c) => abs_template(d, "build.context", c, has_version),
    };
    let file = match &raw.file {
        None => Some("Containerfile".to_owned()),
        Some(f) if !build_file_ok(f.get_ref()) => {
            d.error(
                Some(f.span()),
                "build.file",
                format!(
                    "expected a file name inside the build context, found {:?}",
                    f.get_ref()
                ),
            );
            None
        }
        Some(f) => Some(f.get_ref().clone()),
    };
    let mut ok = true;
    let mut args = BTreeMap::new();
    for (k, v) in raw.args.iter().flatten() {
        let key = format!("build.args.{}", k.get_ref());
        let name_ok = k
            .get_ref()
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && k.get_ref()
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !name_ok {
            d.error(
                Some(k.span()),
                key.clone(),
                "expected a build argument name of letters, digits and '_'",
            );
            ok = false;
        }
        if v.get_ref().starts_with('-') {
            d.error(
                Some(v.span()),
                key.clone(),
                format!(
                    "expected a value not starting with '-' (it would read as an option), found {:?}",
                    v.get_ref()
                ),
            );
            ok = false;
            continue;
        }
        match template(d, &key, v, has_version) {
            Some(t) => {
                args.insert(k.get_ref().clone(), t);
            }
            None => ok = false,
        }
    }
    let mut secrets = BTreeMap::new();
    for (id, src) in raw.secrets.iter().flatten() {
        let key = format!("build.secrets.{}", id.get_ref());
        if id.get_ref().is_empty()
            || id.get_ref().starts_with('-')
            || !id
                .get_ref()
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
        {
            d.error(
                Some(id.span()),
                key.clone(),
                "expected a secret id of letters, digits, '_', '-' and '.', not starting with '-'",
            );
            ok = false;
        }
        match absolute_path(d, &key, src) {
            Some(p) => {
                secrets.insert(id.get_ref().clone(), p);
            }
            None => ok = false,
        }
    }
    if !ok {
        return None;
    }
    Some(BuildSpec {
        context: context?,
        file: file?,
        args,
        secrets,
    })
}

/// A command: argv with an absolute program path; arguments may use template variables.
fn argv(d: &mut Diag<'_>, key: &str, list: &SList, has_version: bool) -> Option<Vec<String>> {
    let items = list.get_ref();
    let Some(first) = items.first() else {
        d.error(
            Some(list.span()),
            key,
            "expected a command: [\"/absolute/program\", \"arg\", …]",
        );
        return None;
    };
    if !first.get_ref().starts_with('/') {
        d.error(
            Some(first.span()),
            key,
            format!("expected an absolute program path as the first element, found {:?} (no shell and no PATH lookup: write [\"/bin/sh\", \"-c\", …] for a shell)", first.get_ref()),
        );
        return None;
    }
    let mut out = Vec::with_capacity(items.len());
    for a in items {
        out.push(template(d, key, a, has_version)?);
    }
    Some(out)
}

/// A positive number of seconds.
fn seconds(d: &mut Diag<'_>, key: &str, v: &S<i64>) -> Option<u64> {
    match u64::try_from(*v.get_ref()) {
        Ok(n) if n >= 1 => Some(n),
        _ => {
            d.error(
                Some(v.span()),
                key,
                format!(
                    "expected a whole number of seconds, at least 1, found {}",
                    v.get_ref()
                ),
            );
            None
        }
    }
}

fn kvc_libraries(d: &mut Diag<'_>, v: &S<OneOrMany>, scope: Scope) -> Option<Vec<PathBuf>> {
    let list: Vec<S<String>> = match v.get_ref() {
        OneOrMany::One(s) => vec![S::new(v.span(), s.clone())],
        OneOrMany::Many(l) => l.iter().map(|s| S::new(v.span(), s.clone())).collect(),
    };
    if list.is_empty() {
        d.error(
            Some(v.span()),
            "hooks.kvc_library",
            "expected the path of a KVC library (NAME-lib.sh), or a list of them",
        );
        return None;
    }
    let mut out = Vec::new();
    for item in &list {
        out.push(absolute_path(d, "hooks.kvc_library", item)?);
    }
    // KVC sources the locations that exist and skips the others; with none
    // there is nothing to run.
    if scope == Scope::Node && !out.iter().any(|p| p.is_file()) {
        d.error(
            Some(v.span()),
            "hooks.kvc_library",
            format!(
                "no such file: {} (expected at least one existing KVC library; missing locations are skipped)",
                out.iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        );
        return None;
    }
    Some(out)
}

fn hooks(d: &mut Diag<'_>, h: &RawHooks, has_version: bool) -> Hooks {
    let mut cmd =
        |key: &str, v: &Option<SList>| v.as_ref().and_then(|l| argv(d, key, l, has_version));
    let (pre_load, post_load) = (
        cmd("hooks.pre_load", &h.pre_load),
        cmd("hooks.post_load", &h.post_load),
    );
    let (pre_unload, post_unload) = (
        cmd("hooks.pre_unload", &h.pre_unload),
        cmd("hooks.post_unload", &h.post_unload),
    );
    let build = cmd("hooks.build", &h.build);
    Hooks {
        pre_load,
        post_load,
        pre_unload,
        post_unload,
        build,
        timeout_seconds: h
            .timeout_seconds
            .as_ref()
            .and_then(|v| seconds(d, "hooks.timeout_seconds", v))
            .unwrap_or(DEFAULT_HOOK_TIMEOUT),
        build_timeout_seconds: h
            .build_timeout_seconds
            .as_ref()
            .and_then(|v| seconds(d, "hooks.build_timeout_seconds", v))
            .unwrap_or(DEFAULT_BUILD_TIMEOUT),
    }
}

fn ready(d: &mut Diag<'_>, r: &S<RawReady>, has_version: bool) -> Option<ReadyCheck> {
    let raw = r.get_ref();
    let timeout_seconds = match &raw.timeout_seconds {
        Some(v) => seconds(d, "ready.timeout_seconds", v)?,
        None => DEFAULT_READY_TIMEOUT,
    };
    let kind = match (&raw.path, &raw.command) {
        (Some(p), None) => ReadyKind::Path(PathBuf::from(abs_template(
            d,
            "ready.path",
            p,
            has_version,
        )?)),
        (None, Some(c)) => ReadyKind::Command(argv(d, "ready.command", c, has_version)?),
        _ => {
            d.error(
                Some(r.span()),
                "ready",
                "expected exactly one of `path` (must exist) or `command` (must exit 0)",
            );
            return None;
        }
    };
    Some(ReadyCheck {
        kind,
        timeout_seconds,
    })
}

/// Validates one `modules.d/NAME.toml`.
pub(super) fn module(
    name: &InstanceName,
    file: &Path,
    text: &str,
    scope: Scope,
) -> Result<ModuleConfig, Vec<ConfigError>> {
    let mut d = Diag::new(file, text);
    let raw: RawModuleConfig = match toml::from_str(text) {
        Ok(r) => r,
        Err(e) => {
            d.parse_error(&e);
            return Err(d.errors);
        }
    };
    // Each part reports into `d` in the order of this list.
    let version = version(&mut d, raw.version.as_ref());
    let modules = modules(&mut d, raw.modules.as_ref());
    let after = after(&mut d, name, raw.after.as_ref());
    let replace_in_tree = raw
        .replace_in_tree
        .as_ref()
        .map(|l| mod_names(&mut d, "replace_in_tree", l))
        .unwrap_or_default();
    let kernel_match = kernel_match(&mut d, raw.kernel_match.as_ref());
    let devices = raw
        .devices
        .as_ref()
        .map(|m| device_match(&mut d, m))
        .unwrap_or_default();
    let parameters = parameters(&mut d, raw.parameters.as_ref(), &modules);
    let has_version = raw.version.is_some();
    let source = source(&mut d, &raw, scope, has_version);
    let hooks = module_hooks(&mut d, raw.hooks.as_ref(), source.as_ref(), has_version);
    let ready = raw
        .ready
        .as_ref()
        .and_then(|r| ready(&mut d, r, has_version));

    let Some(source) = source else {
        return Err(d.errors);
    };
    d.finish(ModuleConfig {
        name: name.clone(),
        file: file.to_owned(),
        digest: sha256_hex(text.as_bytes()),
        description: raw.description.map(S::into_inner),
        version,
        modules,
        after,
        replace_in_tree,
        kernel_match,
        force_unload: raw.force_unload.unwrap_or(false),
        sign: raw.sign.unwrap_or(true),
        parameters,
        source,
        hooks,
        ready,
        devices,
    })
}

/// `[match]`: PCI ids and modalias patterns, at least one.
fn device_match(d: &mut Diag<'_>, m: &S<RawMatch>) -> crate::devices::DeviceMatch {
    let raw = m.get_ref();
    let mut out = crate::devices::DeviceMatch::default();
    for v in raw.pci.iter().flat_map(|l| l.get_ref()) {
        match crate::devices::check_pci(v.get_ref()) {
            Ok(()) => out.pci.push(v.get_ref().to_ascii_lowercase()),
            Err(msg) => d.error(Some(v.span()), "match.pci", msg),
        }
    }
    for v in raw.modalias.iter().flat_map(|l| l.get_ref()) {
        let p = v.get_ref();
        if p.is_empty() || p.chars().any(|c| c.is_whitespace() || c.is_control()) {
            d.error(
                Some(v.span()),
                "match.modalias",
                format!("expected a modalias pattern without blanks (e.g. \"pci:v00008086d00001592*\"), found {p:?}"),
            );
        } else {
            out.modalias.push(p.clone());
        }
    }
    if raw.pci.as_ref().is_none_or(|l| l.get_ref().is_empty())
        && raw.modalias.as_ref().is_none_or(|l| l.get_ref().is_empty())
    {
        d.error(
            Some(m.span()),
            "match",
            "[match] needs pci = [\"VENDOR:DEVICE\", …] or modalias = [\"PATTERN\", …]; without either, leave [match] out",
        );
    }
    out
}

/// `version`: a version string a module's `MODULE_VERSION` can be compared with.
fn version(d: &mut Diag<'_>, v: Option<&S<String>>) -> Option<String> {
    let v = v?;
    let s = v.get_ref();
    if let Err(msg) = crate::kernel::check_version(s) {
        d.error(Some(v.span()), "version", msg);
        None
    } else {
        Some(s.clone())
    }
}

/// `modules`: required, at least one kernel module name.
fn modules(d: &mut Diag<'_>, list: Option<&SList>) -> Vec<ModName> {
    match list {
        None => {
            d.error(None, "modules", "missing: expected a list of kernel module names to load, e.g. modules = [\"simple-kmod\"]");
            Vec::new()
        }
        Some(list) if list.get_ref().is_empty() => {
            d.error(
                Some(list.span()),
                "modules",
                "expected at least one kernel module name",
            );
            Vec::new()
        }
        Some(list) => mod_names(d, "modules", list),
    }
}

/// `after`: other module config names, never this config's own.
fn after(d: &mut Diag<'_>, name: &InstanceName, list: Option<&SList>) -> Vec<InstanceName> {
    let mut after = Vec::new();
    for item in list.map(S::get_ref).into_iter().flatten() {
        match InstanceName::parse(item.get_ref()) {
            Ok(n) if n == *name => d.error(
                Some(item.span()),
                "after",
                "a module config cannot come after itself",
            ),
            Ok(n) => after.push(n),
            Err(msg) => d.error(
                Some(item.span()),
                "after",
                format!("not a module config name: {msg}"),
            ),
        }
    }
    after
}

/// `kernel_match`: a regular expression.
fn kernel_match(d: &mut Diag<'_>, v: Option<&S<String>>) -> Option<Regex> {
    let v = v?;
    match Regex::new(v.get_ref()) {
        Ok(re) => Some(re),
        Err(e) => {
            d.error(
                Some(v.span()),
                "kernel_match",
                format!("expected a regular expression: {e}"),
            );
            None
        }
    }
}

/// `[parameters]`: values for the modules this config loads (`modules`).
fn parameters(
    d: &mut Diag<'_>,
    table: Option<&BTreeMap<S<String>, SList>>,
    modules: &[ModName],
) -> BTreeMap<ModName, Vec<String>> {
    let loaded: HashSet<&ModName> = modules.iter().collect();
    let mut parameters = BTreeMap::new();
    for (module, values) in table.into_iter().flatten() {
        let key = format!("parameters.{}", module.get_ref());
        let m = match ModName::parse(module.get_ref()) {
            Ok(m) => m,
            Err(msg) => {
                d.error(Some(module.span()), key, msg);
                continue;
            }
        };
        if !modules.is_empty() && !loaded.contains(&m) {
            d.error(
                Some(module.span()),
                key.clone(),
                format!("module {:?} is not in `modules`; parameters apply only to the modules this config loads", module.get_ref()),
            );
        }
        let mut vals = Vec::new();
        for v in values.get_ref() {
            match check_parameter(v.get_ref()) {
                Ok(()) => vals.push(v.get_ref().clone()),
                Err(msg) => d.error(Some(v.span()), key.clone(), msg),
            }
        }
        parameters.insert(m, vals);
    }
    parameters
}

/// The one artifact source: `[directory]`, `[image]` (with its `[build]`) or `hooks.kvc_library`.
fn source(
    d: &mut Diag<'_>,
    raw: &RawModuleConfig,
    scope: Scope,
    has_version: bool,
) -> Option<Source> {
    let kvc = raw
        .hooks
        .as_ref()
        .and_then(|h| h.get_ref().kvc_library.as_ref())
        .map(|k| kvc_libraries(d, k, scope));
    match (&raw.directory, &raw.image, kvc) {
        (None, None, None) => {
            d.error(
                None,
                "directory",
                "missing artifact source: expected a [directory] table with `path` pointing at the .ko files, an [image] table with `ref`, or [hooks] kvc_library",
            );
            None
        }
        (Some(dir), Some(_), _) => {
            d.error(
                Some(dir.span()),
                "directory",
                "a config has one artifact source: [directory] or [image], not both",
            );
            None
        }
        (Some(_), None, Some(_)) | (None, Some(_), Some(_)) => {
            d.error(
                None,
                "hooks.kvc_library",
                "a KVC library builds and loads by itself: remove [directory] or [image] from this config",
            );
            None
        }
        (None, None, Some(libraries)) => {
            no_build(d, raw.build.as_ref(), "with a KVC library");
            libraries.map(|libraries| Source::KvcLibrary { libraries })
        }
        (Some(dir), None, None) => {
            no_build(d, raw.build.as_ref(), "with [directory]");
            match &dir.get_ref().path {
                None => {
                    d.error(Some(dir.span()), "directory.path", "missing: expected the directory holding the .ko files, e.g. \"/usr/lib/kvcd/NAME/${KERNEL_FULL_VERSION}\"");
                    None
                }
                Some(p) => abs_template(d, "directory.path", p, has_version)
                    .map(|path| Source::Directory { path }),
            }
        }
        (None, Some(img), None) => {
            image_source(d, img, raw.build.as_ref(), has_version).map(Source::Image)
        }
    }
}

/// A `[build]` table where the source is not an image (`source` says which it is).
fn no_build(d: &mut Diag<'_>, build: Option<&S<RawBuild>>, source: &str) {
    if let Some(b) = build {
        d.error(
            Some(b.span()),
            "build",
            format!("[build] goes with an [image] source, not {source}"),
        );
    }
}

/// `[hooks]` with their defaults; a build hook needs an `[image]` source.
fn module_hooks(
    d: &mut Diag<'_>,
    raw: Option<&S<RawHooks>>,
    source: Option<&Source>,
    has_version: bool,
) -> Hooks {
    let hooks = raw
        .map(|h| hooks(d, h.get_ref(), has_version))
        .unwrap_or_else(|| Hooks {
            timeout_seconds: DEFAULT_HOOK_TIMEOUT,
            build_timeout_seconds: DEFAULT_BUILD_TIMEOUT,
            ..Hooks::default()
        });
    if hooks.build.is_some() && !matches!(source, Some(Source::Image(_)) | None) {
        d.error(
            None,
            "hooks.build",
            "a build hook builds the [image]; this config has no [image]",
        );
    }
    hooks
}

/// Checks what spans files: `after` must name existing configs and form no
/// cycle, and every kernel module has one owner (see [`ownership`]).
pub(super) fn cross_check(modules: &mut BTreeMap<String, ModuleEntry>, scope: Scope) {
    let known: BTreeSet<String> = modules.keys().cloned().collect();
    let graph = super::after_map(
        modules
            .iter()
            .filter_map(|(n, e)| Some((n.as_str(), e.result.as_ref().ok()?))),
    );
    let mut errors: BTreeMap<String, Vec<ConfigError>> = BTreeMap::new();
    for (name, entry) in modules.iter() {
        let Ok(cfg) = &entry.result else { continue };
        let errors = errors.entry(name.clone()).or_default();
        for a in &cfg.after {
            if !known.contains(a.as_str()) {
                errors.push(ConfigError::file(&entry.file, format!(
                    "no module config named {:?} (expected the name of another modules.d/*.toml)",
                    a.as_str()
                )).with_key("after"));
            }
        }
        if let Some(cycle) = find_cycle(&graph, name) {
            errors.push(
                ConfigError::file(
                    &entry.file,
                    format!("ordering cycle: {}", cycle.join(" -> ")),
                )
                .with_key("after"),
            );
        }
    }
    ownership(modules, &graph, scope, &mut errors);
    for (name, errs) in errors {
        if errs.is_empty() {
            continue;
        }
        if let Some(entry) = modules.get_mut(&name) {
            entry.result = Err(errs);
        }
    }
}

/// How a module config claims a kernel module.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Claim {
    /// It is in `modules`: the config loads and unloads it.
    Loads,
    /// It is in `replace_in_tree`: the config unloads the in-tree one and restores it.
    Replaces,
}

/// One owner per kernel module (names folded as [`ModName`] does): two
/// configs loading the same module, one loading what another replaces in
/// tree, or two replacing the same in-tree module are errors on both
/// configs, each naming the other — unless both are restricted to kernels by
/// different `kernel_match` patterns. KVC-library configs count with the
/// modules they list. With [`Scope::Examples`] only configs that `after`
/// ties together count as installed together.
fn ownership(
    modules: &BTreeMap<String, ModuleEntry>,
    graph: &BTreeMap<String, Vec<String>>,
    scope: Scope,
    errors: &mut BTreeMap<String, Vec<ConfigError>>,
) {
    let mut claims: BTreeMap<&ModName, Vec<(&str, Claim)>> = BTreeMap::new();
    for (name, entry) in modules {
        let Ok(cfg) = &entry.result else { continue };
        for m in &cfg.modules {
            claims.entry(m).or_default().push((name, Claim::Loads));
        }
        for m in &cfg.replace_in_tree {
            claims.entry(m).or_default().push((name, Claim::Replaces));
        }
    }
    for (m, owners) in claims {
        let Some((first, _)) = owners.first() else {
            continue;
        };
        if owners.iter().all(|(n, _)| n == first) {
            continue;
        }
        for &(a, claim_a) in &owners {
            for &(b, claim_b) in &owners {
                if a == b
                    || (scope == Scope::Examples && !reaches(graph, a, b) && !reaches(graph, b, a))
                    || for_other_kernels(modules, a, b)
                {
                    continue;
                }
                let other = modules
                    .get(b)
                    .map_or_else(String::new, |e| e.file.display().to_string());
                let (key, what) = match (claim_a, claim_b) {
                    (Claim::Loads, Claim::Loads) => ("modules", "is also loaded by"),
                    (Claim::Loads, Claim::Replaces) => {
                        ("modules", "is replaced in tree (unloaded) by")
                    }
                    (Claim::Replaces, Claim::Loads) => ("replace_in_tree", "is loaded by"),
                    (Claim::Replaces, Claim::Replaces) => {
                        ("replace_in_tree", "is also replaced in tree by")
                    }
                };
                let Some(entry) = modules.get(a) else {
                    continue;
                };
                errors.entry(a.to_owned()).or_default().push(
                    ConfigError::file(
                        &entry.file,
                        format!(
                            "module {:?} {what} module config {b:?} ({other}): expected one owner per module; keep it in one config",
                            m.as_str()
                        ),
                    )
                    .with_key(key),
                );
            }
        }
    }
}

/// True when configs `a` and `b` both have a `kernel_match` and the patterns
/// differ: alternatives for different kernels may name the same module (at
/// run time the one that loaded it owns it; the other refuses to load it).
fn for_other_kernels(modules: &BTreeMap<String, ModuleEntry>, a: &str, b: &str) -> bool {
    let pattern = |n: &str| {
        modules
            .get(n)
            .and_then(|e| e.result.as_ref().ok())
            .and_then(|c| c.kernel_match.as_ref())
            .map(Regex::as_str)
    };
    matches!((pattern(a), pattern(b)), (Some(x), Some(y)) if x != y)
}

/// True when `to` can be reached from `from` through `after` edges.
fn reaches(graph: &BTreeMap<String, Vec<String>>, from: &str, to: &str) -> bool {
    let mut seen = BTreeSet::new();
    let mut stack = vec![from];
    while let Some(n) = stack.pop() {
        for next in graph.get(n).into_iter().flatten() {
            if next == to {
                return true;
            }
            if seen.insert(next.as_str()) {
                stack.push(next);
            }
        }
    }
    false
}

/// A path from `start` back to itself through `after` edges, if there is one.
fn find_cycle(graph: &BTreeMap<String, Vec<String>>, start: &str) -> Option<Vec<String>> {
    fn walk(
        graph: &BTreeMap<String, Vec<String>>,
        start: &str,
        node: &str,
        path: &mut Vec<String>,
        seen: &mut BTreeSet<String>,
    ) -> bool {
        for next in graph.get(node).into_iter().flatten() {
            if next == start {
                path.push(next.clone());
                return true;
            }
            if seen.insert(next.clone()) {
                path.push(next.clone());
                if walk(graph, start, next, path, seen) {
                    return true;
                }
                path.pop();
            }
        }
        false
    }
    let mut path = vec![start.to_owned()];
    walk(graph, start, start, &mut path, &mut BTreeSet::new()).then_some(path)
}

#[cfg(test)]
mod tests;
