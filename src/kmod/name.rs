//! Kernel module names, compared with `-` and `_` folded as the kernel does.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A kernel module name in the kernel's canonical form (`-` folded to `_`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ModName(String);

impl ModName {
    /// Parses a module name; letters, digits, `-` and `_`, at most 55 characters (the kernel's limit).
    pub fn parse(s: &str) -> Result<Self, String> {
        if s.is_empty() {
            return Err("a module name cannot be empty".to_owned());
        }
        if s.len() > 55 {
            return Err(format!(
                "module name {s:?} is longer than the kernel's 55-character limit"
            ));
        }
        if !s
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(format!(
                "module name {s:?} may only hold letters, digits, '-' and '_'"
            ));
        }
        Ok(Self(s.replace('-', "_")))
    }

    /// The module name from a file name such as `simple-kmod.ko.xz`, if it is a module file.
    pub fn from_file_name(file: &str) -> Option<Self> {
        let stem = [".ko", ".ko.xz", ".ko.zst", ".ko.gz"]
            .iter()
            .find_map(|ext| file.strip_suffix(ext))?;
        Self::parse(stem).ok()
    }

    /// The canonical name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for ModName {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        Self::parse(&s)
    }
}

impl From<ModName> for String {
    fn from(n: ModName) -> String {
        n.0
    }
}

impl fmt::Display for ModName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folds_dashes() {
        assert_eq!(
            ModName::parse("simple-kmod").unwrap(),
            ModName::parse("simple_kmod").unwrap()
        );
        assert_eq!(ModName::parse("a-b").unwrap().as_str(), "a_b");
    }

    #[test]
    fn rejects_bad_names() {
        assert!(ModName::parse("").is_err());
        assert!(ModName::parse("a/b").is_err());
        assert!(ModName::parse("a b").is_err());
        assert!(ModName::parse(&"x".repeat(56)).is_err());
    }

    #[test]
    fn file_names() {
        assert_eq!(
            ModName::from_file_name("simple-kmod.ko").unwrap().as_str(),
            "simple_kmod"
        );
        assert_eq!(
            ModName::from_file_name("ice.ko.xz").unwrap().as_str(),
            "ice"
        );
        assert!(ModName::from_file_name("README").is_none());
        assert!(ModName::from_file_name("x.ko.sig").is_none());
    }
}
