//! `STATE/sets/CONFIG/KERNEL.json`: the module files one config resolved for
//! one kernel, as paths in the content store (`STATE/files/SHA256/NAME`).
//! Sets are what keep stored files alive: a file no set names is garbage.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Result;
use serde::{Deserialize, Serialize};

use super::file::{self, Versioned};

/// The files of one (config, kernel).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleSet {
    /// Module name → its file, relative to the content store (`SHA256/NAME`).
    pub files: BTreeMap<String, String>,
}

impl Versioned for ModuleSet {
    const VERSION: u32 = 1;
    const WHAT: &'static str = "module set";
}

/// The set at `path`, if there is one.
pub fn read(path: &Path) -> Result<Option<ModuleSet>> {
    file::read(path)
}

/// Writes `set` to `path` (atomically).
pub fn write(path: &Path, set: &ModuleSet) -> Result<()> {
    file::write(path, set)
}
