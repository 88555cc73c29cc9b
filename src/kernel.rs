//! Kernel releases and `${VAR}` template expansion.
//!
//! Template variables follow the names Kernel Module Management uses so that
//! module specs port over: `${KERNEL_FULL_VERSION}`, `${KERNEL_XYZ}`,
//! `${KERNEL_X}`, `${KERNEL_Y}`, `${KERNEL_Z}`, plus `${ARCH}`, `${MOD_NAME}`
//! and `${MOD_VERSION}`.

use std::fmt;

use anyhow::{Context as _, Result};
use thiserror::Error;

/// Every variable a template may use.
pub const TEMPLATE_VARIABLES: &[&str] = &[
    "KERNEL_FULL_VERSION",
    "KERNEL_XYZ",
    "KERNEL_X",
    "KERNEL_Y",
    "KERNEL_Z",
    "ARCH",
    "MOD_NAME",
    "MOD_VERSION",
];

/// A kernel release as `uname -r` prints it, e.g. `6.1.0-27-amd64`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct KernelRelease(String);

impl KernelRelease {
    /// Checks that `s` is usable as a kernel release (and as a path component).
    pub fn parse(s: &str) -> Result<Self> {
        let ok = !s.is_empty()
            && s.len() <= 128
            && s.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '+' | '~'));
        if !ok {
            anyhow::bail!(
                "invalid kernel release {s:?}: expected something like `uname -r` prints (letters, digits, '.', '-', '_', '+', '~')"
            );
        }
        Ok(Self(s.to_owned()))
    }

    /// The release of the running kernel (`uname -r`).
    pub fn running() -> Result<Self> {
        if let Some(release) = crate::kmod::sim::release() {
            return Self::parse(&release);
        }
        let uts = nix::sys::utsname::uname().context("uname failed")?;
        let release = uts.release().to_string_lossy().into_owned();
        Self::parse(&release)
    }

    /// The release as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The leading `X.Y.Z` numbers, when the release starts with them (`Z` is 0 when absent).
    pub fn xyz(&self) -> Option<(u32, u32, u32)> {
        let head: String = self
            .0
            .chars()
            .take_while(|c| c.is_ascii_digit() || *c == '.')
            .collect();
        let mut parts = head.split('.').filter(|p| !p.is_empty());
        let x = parts.next()?.parse().ok()?;
        let y = parts.next()?.parse().ok()?;
        let z = parts.next().map_or(Some(0), |p| p.parse().ok())?;
        Some((x, y, z))
    }
}

impl fmt::Display for KernelRelease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Compares kernel releases as versions: digit runs by value, the rest as text.
pub fn compare_releases(a: &str, b: &str) -> std::cmp::Ordering {
    fn chunks(s: &str) -> Vec<(bool, &str)> {
        let mut out = Vec::new();
        let mut start = 0;
        let bytes = s.as_bytes();
        for i in 1..=bytes.len() {
            if i == bytes.len() || bytes[i].is_ascii_digit() != bytes[start].is_ascii_digit() {
                out.push((bytes[start].is_ascii_digit(), &s[start..i]));
                start = i;
            }
        }
        out
    }
    let (ca, cb) = (chunks(a), chunks(b));
    for (x, y) in ca.iter().zip(&cb) {
        let o = match (x, y) {
            ((true, x), (true, y)) => {
                let (x, y) = (x.trim_start_matches('0'), y.trim_start_matches('0'));
                x.len().cmp(&y.len()).then_with(|| x.cmp(y))
            }
            ((_, x), (_, y)) => x.cmp(y),
        };
        if o != std::cmp::Ordering::Equal {
            return o;
        }
    }
    ca.len().cmp(&cb.len())
}

/// Kernels installed under `modules_dir` (a `KERNEL/` directory with the kernel's
/// own modules or a `modules.dep`; header-only directories do not count).
pub fn installed_kernels(modules_dir: &std::path::Path) -> Vec<KernelRelease> {
    let Ok(entries) = std::fs::read_dir(modules_dir) else {
        return Vec::new();
    };
    let mut out: Vec<KernelRelease> = entries
        .flatten()
        .filter(|e| e.path().join("kernel").is_dir() || e.path().join("modules.dep").is_file())
        .filter_map(|e| KernelRelease::parse(&e.file_name().to_string_lossy()).ok())
        .collect();
    out.sort();
    out
}

/// The machine architecture as `uname -m` prints it.
pub fn arch() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.machine().to_string_lossy().into_owned())
        .unwrap_or_else(|_| std::env::consts::ARCH.to_owned())
}

/// Why a template could not be checked or expanded.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum TemplateError {
    /// `${NAME}` with a name we do not know.
    #[error("unknown template variable ${{{0}}}; known variables: {known}", known = known_list())]
    Unknown(String),
    /// `${` without a closing `}`.
    #[error("unterminated '${{' at byte {0}")]
    Unterminated(usize),
    /// A known variable that has no value in this context.
    #[error("template variable ${{{0}}} has no value: {1}")]
    NoValue(String, String),
    /// A value that could climb out of a path or smuggle in control characters.
    #[error(
        "template variable ${{{0}}} has the value {1:?}, which is not safe in a path or an argument: expected no '/', no \"..\" and no control characters"
    )]
    UnsafeValue(String, String),
}

/// Checks a module config's `version`, which reaches paths and image tags
/// through `${MOD_VERSION}`: 1-128 of letters, digits, `.`, `_`, `+`, `~`
/// and `-`, not starting with `.` or `-`, without `..`.
pub fn check_version(s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 128
        && !s.starts_with(['.', '-'])
        && !s.contains("..")
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '+' | '~' | '-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "expected a version like \"1.2.0\": 1-128 letters, digits, '.', '_', '+', '~' and '-', not starting with '.' or '-' and without \"..\" (it becomes part of paths and image tags through ${{MOD_VERSION}}), found {s:?}"
        ))
    }
}

/// True when a variable's value can go into a path component or an argument.
fn safe_value(v: &str) -> bool {
    !v.contains('/') && !v.contains("..") && !v.chars().any(char::is_control)
}

fn known_list() -> String {
    TEMPLATE_VARIABLES.join(", ")
}

/// Values for template expansion.
#[derive(Debug, Clone)]
pub struct TemplateVars {
    /// Target kernel.
    pub kernel: KernelRelease,
    /// Machine architecture (`uname -m`).
    pub arch: String,
    /// Module config (instance) name.
    pub mod_name: String,
    /// The config's `version`, if it has one.
    pub mod_version: Option<String>,
}

impl TemplateVars {
    /// The values for module config `name` (with its `version`, if any) on `kernel`, on this machine.
    pub fn for_config(kernel: &KernelRelease, name: &str, version: Option<&str>) -> Self {
        Self {
            kernel: kernel.clone(),
            arch: arch(),
            mod_name: name.to_owned(),
            mod_version: version.map(str::to_owned),
        }
    }

    /// The value of `var`, refused when it holds `/`, `..` or control characters.
    fn value(&self, var: &str) -> Result<String, TemplateError> {
        let v = self.raw_value(var)?;
        if safe_value(&v) {
            Ok(v)
        } else {
            Err(TemplateError::UnsafeValue(var.to_owned(), v))
        }
    }

    fn raw_value(&self, var: &str) -> Result<String, TemplateError> {
        let xyz = || {
            self.kernel.xyz().ok_or_else(|| {
                TemplateError::NoValue(
                    var.to_owned(),
                    format!("kernel release {} does not start with X.Y.Z", self.kernel),
                )
            })
        };
        Ok(match var {
            "KERNEL_FULL_VERSION" => self.kernel.to_string(),
            "KERNEL_XYZ" => {
                let (x, y, z) = xyz()?;
                format!("{x}.{y}.{z}")
            }
            "KERNEL_X" => xyz()?.0.to_string(),
            "KERNEL_Y" => xyz()?.1.to_string(),
            "KERNEL_Z" => xyz()?.2.to_string(),
            "ARCH" => self.arch.clone(),
            "MOD_NAME" => self.mod_name.clone(),
            "MOD_VERSION" => self.mod_version.clone().ok_or_else(|| {
                TemplateError::NoValue(var.to_owned(), "the config sets no `version`".to_owned())
            })?,
            other => return Err(TemplateError::Unknown(other.to_owned())),
        })
    }
}

/// Splits a template into literal text and variable names; `$` not followed by `{` is literal.
fn parse(template: &str) -> Result<Vec<(bool, &str)>, TemplateError> {
    let mut out = Vec::new();
    let mut rest = template;
    let mut offset = 0;
    while let Some(start) = rest.find("${") {
        if start > 0 {
            out.push((false, &rest[..start]));
        }
        let after = &rest[start + 2..];
        let end = after
            .find('}')
            .ok_or(TemplateError::Unterminated(offset + start))?;
        let name = &after[..end];
        if !TEMPLATE_VARIABLES.contains(&name) {
            return Err(TemplateError::Unknown(name.to_owned()));
        }
        out.push((true, name));
        let consumed = start + 2 + end + 1;
        offset += consumed;
        rest = &rest[consumed..];
    }
    if !rest.is_empty() {
        out.push((false, rest));
    }
    Ok(out)
}

/// Checks that a template only uses known variables and is well formed.
pub fn check_template(template: &str) -> Result<(), TemplateError> {
    parse(template).map(|_| ())
}

/// Expands every `${VAR}` in `template`.
pub fn expand(template: &str, vars: &TemplateVars) -> Result<String, TemplateError> {
    let mut out = String::with_capacity(template.len());
    for (is_var, text) in parse(template)? {
        if is_var {
            out.push_str(&vars.value(text)?);
        } else {
            out.push_str(text);
        }
    }
    Ok(out)
}

/// Expands every element of a command's argv.
pub fn expand_all(argv: &[String], vars: &TemplateVars) -> Result<Vec<String>, TemplateError> {
    argv.iter().map(|a| expand(a, vars)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(kernel: &str) -> TemplateVars {
        TemplateVars {
            kernel: KernelRelease::parse(kernel).unwrap(),
            arch: "x86_64".into(),
            mod_name: "simple-kmod".into(),
            mod_version: Some("1.2.0".into()),
        }
    }

    #[test]
    fn a_config_on_this_machine() {
        let k = KernelRelease::parse("6.1.0-1-amd64").unwrap();
        let v = TemplateVars::for_config(&k, "simple-kmod", Some("1.2.0"));
        assert_eq!(
            expand("${MOD_NAME}-${MOD_VERSION}:${KERNEL_FULL_VERSION}", &v).unwrap(),
            "simple-kmod-1.2.0:6.1.0-1-amd64"
        );
        assert_eq!(expand("${ARCH}", &v).unwrap(), arch());
        let v = TemplateVars::for_config(&k, "simple-kmod", None);
        assert!(matches!(
            expand("${MOD_VERSION}", &v),
            Err(TemplateError::NoValue(..))
        ));
    }

    #[test]
    fn expands_every_variable() {
        let v = vars("5.14.0-284.30.1.el9_2.x86_64");
        let t = "${KERNEL_FULL_VERSION}|${KERNEL_XYZ}|${KERNEL_X}|${KERNEL_Y}|${KERNEL_Z}|${ARCH}|${MOD_NAME}|${MOD_VERSION}";
        assert_eq!(
            expand(t, &v).unwrap(),
            "5.14.0-284.30.1.el9_2.x86_64|5.14.0|5|14|0|x86_64|simple-kmod|1.2.0"
        );
    }

    #[test]
    fn dollar_without_brace_is_literal() {
        assert_eq!(expand("a$b$", &vars("6.1.0-27-amd64")).unwrap(), "a$b$");
    }

    #[test]
    fn unknown_and_unterminated_are_errors() {
        assert_eq!(
            check_template("/x/${KERNEL}/y"),
            Err(TemplateError::Unknown("KERNEL".into()))
        );
        let msg = check_template("/x/${KERNEL}").unwrap_err().to_string();
        assert!(msg.contains("unknown template variable ${KERNEL}"), "{msg}");
        assert!(msg.contains("KERNEL_FULL_VERSION"), "{msg}");
        assert_eq!(
            check_template("/x/${ARCH"),
            Err(TemplateError::Unterminated(3))
        );
    }

    #[test]
    fn missing_version_is_an_error_when_used() {
        let mut v = vars("6.1.0-27-amd64");
        v.mod_version = None;
        let err = expand("${MOD_VERSION}", &v).unwrap_err();
        assert!(err.to_string().contains("sets no `version`"), "{err}");
        assert_eq!(expand("${KERNEL_X}", &v).unwrap(), "6");
    }

    #[test]
    fn xyz_needs_leading_numbers() {
        let v = vars("custom-kernel");
        assert!(matches!(
            expand("${KERNEL_XYZ}", &v),
            Err(TemplateError::NoValue(..))
        ));
        assert_eq!(KernelRelease::parse("6.1").unwrap().xyz(), Some((6, 1, 0)));
    }

    #[test]
    fn installed_kernels_need_modules() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(t.path().join("6.1.0-1-amd64/kernel")).unwrap();
        std::fs::create_dir_all(t.path().join("6.1.0-2-amd64")).unwrap();
        std::fs::write(t.path().join("6.1.0-2-amd64/modules.dep"), "").unwrap();
        std::fs::create_dir_all(t.path().join("6.1.0-3-amd64/build")).unwrap();
        let k = installed_kernels(t.path());
        let names: Vec<_> = k.iter().map(KernelRelease::as_str).collect();
        assert_eq!(names, ["6.1.0-1-amd64", "6.1.0-2-amd64"]);
        assert!(installed_kernels(&t.path().join("absent")).is_empty());
    }

    #[test]
    fn values_with_path_tricks_are_refused() {
        let mut v = vars("6.1.0-27-amd64");
        v.mod_version = Some("../../x".into());
        let err = expand("/srv/${MOD_VERSION}/m", &v).unwrap_err();
        assert_eq!(
            err,
            TemplateError::UnsafeValue("MOD_VERSION".into(), "../../x".into())
        );
        assert!(err.to_string().contains("no '/', no \"..\""), "{err}");
        v.mod_version = Some("1.0".into());
        v.mod_name = "a/b".into();
        assert!(matches!(
            expand("${MOD_NAME}", &v),
            Err(TemplateError::UnsafeValue(..))
        ));
        v.arch = "x86\n64".into();
        assert!(matches!(
            expand_all(&["${ARCH}".into()], &v),
            Err(TemplateError::UnsafeValue(..))
        ));
        // Unused variables are not looked at.
        assert_eq!(expand("${KERNEL_X}", &v).unwrap(), "6");
    }

    #[test]
    fn versions_are_tag_and_path_safe() {
        for ok in ["1.2.0", "1.0.0-rc1", "1.0~git+abc_1", "dd1a7d4", "V1"] {
            assert!(check_version(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "../../x",
            "1/2",
            ".hidden",
            "-1",
            "1..2",
            "1 2",
            "1\n",
            &"9".repeat(129),
        ] {
            let err = check_version(bad).unwrap_err();
            assert!(err.starts_with("expected a version like"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn release_rejects_path_tricks() {
        assert!(KernelRelease::parse("../etc").is_err());
        assert!(KernelRelease::parse("6.1/0").is_err());
        assert!(KernelRelease::parse("").is_err());
    }
}
