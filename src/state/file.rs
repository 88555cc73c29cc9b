//! Versioned JSON files: every file kvcd writes under its state and runtime
//! directories carries a top-level `"version"`, is written atomically, and is
//! read back only by a kvcd that knows that version (older ones are migrated,
//! newer ones refused by name, never misread).

use std::fs;
use std::path::Path;

use anyhow::{Context as _, Result, bail};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::util::write_atomic;

/// The key holding a file's format version.
const VERSION_KEY: &str = "version";

/// A file format kvcd owns.
pub trait Versioned: Serialize + DeserializeOwned {
    /// The version this kvcd writes.
    const VERSION: u32;
    /// What the file is, for errors ("runtime record").
    const WHAT: &'static str;

    /// Turns the document of an older version (0: written before files had
    /// one) into the current shape; the default accepts the shape unchanged.
    fn migrate(from: u32, doc: Value) -> Result<Value> {
        let _ = from;
        Ok(doc)
    }
}

/// Reads `path`; `None` when it does not exist.
pub fn read<T: Versioned>(path: &Path) -> Result<Option<T>> {
    let data = match fs::read(path) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    decode(&data)
        .with_context(|| format!("{}: corrupt {}", path.display(), T::WHAT))
        .map(Some)
}

/// Decodes a document of any version this kvcd reads.
pub fn decode<T: Versioned>(data: &[u8]) -> Result<T> {
    let mut doc: Value = serde_json::from_slice(data)?;
    let Some(obj) = doc.as_object_mut() else {
        bail!("expected a JSON object");
    };
    let version = match obj.remove(VERSION_KEY) {
        None => 0,
        Some(v) => v
            .as_u64()
            .and_then(|v| u32::try_from(v).ok())
            .with_context(|| format!("`{VERSION_KEY}` is {v}, expected a whole number"))?,
    };
    if version > T::VERSION {
        bail!(
            "written by a newer kvcd (format version {version}; this kvcd reads up to {})",
            T::VERSION
        );
    }
    let doc = if version < T::VERSION {
        T::migrate(version, doc).with_context(|| format!("migrating from version {version}"))?
    } else {
        doc
    };
    Ok(serde_json::from_value(doc)?)
}

/// The bytes of `value` with its version.
pub fn encode<T: Versioned>(value: &T) -> Result<Vec<u8>> {
    let mut doc = serde_json::to_value(value)?;
    let Some(obj) = doc.as_object_mut() else {
        bail!("{} is not a JSON object", T::WHAT);
    };
    obj.insert(VERSION_KEY.to_owned(), Value::from(T::VERSION));
    Ok(serde_json::to_vec_pretty(&doc)?)
}

/// Writes `value` to `path` atomically, with its version; a file that holds
/// exactly that already is left as it is (no rename, no sync).
pub fn write<T: Versioned>(path: &Path, value: &T) -> Result<()> {
    let data = encode(value)?;
    if fs::read(path).is_ok_and(|old| old == data) {
        return Ok(());
    }
    write_atomic(path, &data)
}

/// Removes `path`; a missing file is not an error.
pub fn remove(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", path.display()))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct V2 {
        name: String,
        #[serde(default)]
        count: u32,
    }

    impl Versioned for V2 {
        const VERSION: u32 = 2;
        const WHAT: &'static str = "test file";
        fn migrate(from: u32, mut doc: Value) -> Result<Value> {
            if from == 0 {
                // Version 0 called it "title".
                let t = doc
                    .as_object_mut()
                    .and_then(|o| o.remove("title"))
                    .context("no title")?;
                doc["name"] = t;
            }
            Ok(doc)
        }
    }

    #[test]
    fn round_trip_writes_the_version() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f.json");
        let v = V2 {
            name: "a".into(),
            count: 3,
        };
        write(&p, &v).unwrap();
        let raw: Value = serde_json::from_slice(&fs::read(&p).unwrap()).unwrap();
        assert_eq!(raw["version"], 2);
        assert_eq!(read::<V2>(&p).unwrap(), Some(v.clone()));
        // The same content again leaves the file alone (same inode: no rename).
        let ino = |p: &Path| std::os::unix::fs::MetadataExt::ino(&fs::metadata(p).unwrap());
        let before = ino(&p);
        write(&p, &v).unwrap();
        assert_eq!(ino(&p), before);
        let other = V2 { count: 4, ..v };
        write(&p, &other).unwrap();
        assert_ne!(ino(&p), before);
        assert_eq!(read::<V2>(&p).unwrap(), Some(other));
        remove(&p).unwrap();
        remove(&p).unwrap();
        assert_eq!(read::<V2>(&p).unwrap(), None);
    }

    #[test]
    fn older_files_are_migrated() {
        let v: V2 = decode(br#"{"title":"old"}"#).unwrap();
        assert_eq!(v.name, "old");
        let v: V2 = decode(br#"{"version":1,"name":"mid","count":1}"#).unwrap();
        assert_eq!(v.count, 1);
    }

    #[test]
    fn newer_and_malformed_files_are_refused_by_name() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f.json");
        fs::write(&p, br#"{"version":3,"name":"x"}"#).unwrap();
        let e = format!("{:#}", read::<V2>(&p).unwrap_err());
        assert!(e.contains("f.json: corrupt test file"), "{e}");
        assert!(
            e.contains("newer kvcd (format version 3; this kvcd reads up to 2)"),
            "{e}"
        );
        for bad in [&b"[1]"[..], b"{\"version\":\"1\"}", b"{"] {
            fs::write(&p, bad).unwrap();
            assert!(read::<V2>(&p).is_err());
        }
    }
}
