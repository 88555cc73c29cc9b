//! `STATE/images/CONFIG/KERNEL/index.json`: which extraction of a driver
//! image is current for one module config and kernel.

use std::path::{Path, PathBuf};

use anyhow::Result;
use serde::{Deserialize, Serialize};

use super::file::{self, Versioned};

/// The index of one (config, kernel) image directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageIndex {
    /// SHA-256 of the config file the extraction was made for.
    pub config_digest: String,
    /// The expanded image reference.
    pub reference: String,
    /// Manifest digest, or image ID for a local build.
    pub digest: String,
    /// Image ID (empty in an index an older kvcd wrote).
    #[serde(default)]
    pub id: String,
    /// The extraction's directory name beside the index.
    pub dir: String,
    /// True when the image was built on this node.
    pub built: bool,
}

impl Versioned for ImageIndex {
    const VERSION: u32 = 1;
    const WHAT: &'static str = "image index";
}

/// The index file in an image directory.
pub fn path(image_dir: &Path) -> PathBuf {
    image_dir.join("index.json")
}

/// The index of `image_dir`, if it has a readable one.
pub fn read(image_dir: &Path) -> Result<Option<ImageIndex>> {
    file::read(&path(image_dir))
}

/// Makes `index` current for `image_dir`.
pub fn write(image_dir: &Path, index: &ImageIndex) -> Result<()> {
    crate::failpoint::hit("image.index.write");
    file::write(&path(image_dir), index)
}

/// Forgets which extraction is current, so the next load fetches again.
pub fn forget(image_dir: &Path) -> Result<()> {
    file::remove(&path(image_dir))
}
