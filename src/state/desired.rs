//! `RUNTIME/desired.json`: the module configs the admin wants loaded, kept
//! by the agent so a restarted daemon converges to them.

use std::collections::BTreeSet;
use std::path::Path;

use anyhow::Result;
use serde::{Deserialize, Serialize};

use super::file::{self, Versioned};

/// The desired state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Desired {
    /// Module configs wanted loaded.
    pub wanted: BTreeSet<String>,
}

impl Versioned for Desired {
    const VERSION: u32 = 1;
    const WHAT: &'static str = "desired state";
}

/// The desired state at `path`; empty when there is none.
pub fn read(path: &Path) -> Result<Desired> {
    Ok(file::read(path)?.unwrap_or_default())
}

/// Writes the desired state atomically.
pub fn write(path: &Path, desired: &Desired) -> Result<()> {
    file::write(path, desired)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_the_unversioned_format() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("desired.json");
        assert_eq!(read(&p).unwrap(), Desired::default());
        let want = Desired {
            wanted: ["a".to_owned()].into(),
        };
        write(&p, &want).unwrap();
        assert_eq!(read(&p).unwrap(), want);
        std::fs::write(&p, r#"{"wanted":["b"]}"#).unwrap();
        assert!(read(&p).unwrap().wanted.contains("b"));
    }
}
