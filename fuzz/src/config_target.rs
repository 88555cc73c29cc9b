//! `config`: configuration directories through `Config::load_named` (the
//! daemon's path), `Config::load_paths` (`kvcctl config validate PATH…`) and
//! `Config::load_examples` (`--examples`).
//!
//! Input: the main file is `etc/modules.d/fuzz.toml`. A marker line
//! `##> PATH` starts the file PATH under the scratch root, where `usr/`,
//! `run/` and `etc/` are the three configuration directories (lowest
//! precedence first) and anything else is just a file (e.g. a KVC library
//! for `hooks.kvc_library`); a PATH without one of those directories goes to
//! `etc/modules.d/`. `##> PATH -> /dev/null` makes PATH a mask. `@ROOT@` in
//! any file stands for the scratch root.
//!
//! Invariants besides not panicking: every error names a file of the tree
//! (a module config's errors name that config's file) and its text starts
//! with that file; a line and column, when given, lie inside the file.

use std::fs;
use std::path::{Path, PathBuf};

use kvcd::config::{Config, ConfigError};

use crate::{limit_allocations, parts, put, safe_relative, scratch, with_root};

/// Configuration directories, lowest precedence first.
const DIRS: [&str; 3] = ["usr", "run", "etc"];
/// Files one input may create.
const MAX_FILES: usize = 16;

/// The `config` target.
pub fn config(data: &[u8]) {
    // Config files are at most 1 MiB; nothing here needs more than a few times that at once.
    limit_allocations(256 << 20);
    let root = scratch("config");
    let dirs: Vec<PathBuf> = DIRS.iter().map(|d| root.join(d)).collect();
    for d in &dirs {
        fs::create_dir_all(d.join("modules.d")).expect("creating a config directory");
    }
    for (i, part) in parts(data).into_iter().take(MAX_FILES).enumerate() {
        let (rel, mask) = if i == 0 {
            (Some(PathBuf::from("etc/modules.d/fuzz.toml")), false)
        } else {
            let (h, mask) = match part.header.strip_suffix(b" -> /dev/null") {
                Some(h) => (h, true),
                None => (part.header, false),
            };
            (safe_relative(h), mask)
        };
        let Some(mut rel) = rel else { continue };
        if !rel
            .components()
            .next()
            .is_some_and(|c| DIRS.iter().chain(&["lib"]).any(|d| c.as_os_str() == *d))
        {
            rel = Path::new("etc/modules.d").join(rel);
        }
        let path = root.join(&rel);
        if fs::symlink_metadata(&path).is_ok() {
            continue;
        }
        if mask {
            if path.parent().is_some_and(|p| fs::create_dir_all(p).is_ok()) {
                let _ = std::os::unix::fs::symlink("/dev/null", &path);
            }
        } else if !path.is_dir() {
            put(&path, &with_root(part.body, &root));
        }
    }

    let modules_dirs: Vec<PathBuf> = dirs.iter().map(|d| d.join("modules.d")).collect();
    let overrides = kvcd::config::Overrides::default();
    for config in [
        Config::load_named(&dirs, &overrides),
        Config::load_paths(&dirs),
        Config::load_examples(&modules_dirs),
    ] {
        check(&config, &root);
    }
}

fn check(config: &Config, root: &Path) {
    for e in &config.errors {
        check_error(e, root);
    }
    for (name, entry) in &config.modules {
        assert!(
            entry.file.starts_with(root),
            "{name}: file {} is outside the tree",
            entry.file.display()
        );
        if let Err(errs) = &entry.result {
            assert!(!errs.is_empty(), "{name}: invalid without an error");
            for e in errs {
                assert_eq!(
                    e.file, entry.file,
                    "an error of {name} names another file: {e}"
                );
                check_error(e, root);
            }
        }
    }
    for m in &config.masked {
        assert!(
            kvcd::config::merge::is_mask(m),
            "{} is listed as masked",
            m.display()
        );
    }
}

fn check_error(e: &ConfigError, root: &Path) {
    assert!(
        e.file.starts_with(root),
        "error names a file outside the tree: {e}"
    );
    let shown = e.to_string();
    assert!(
        shown.starts_with(&e.file.display().to_string()),
        "error text does not start with its file: {shown}"
    );
    assert!(!e.message.is_empty(), "error without a message: {shown}");
    if let Some(line) = e.line {
        let text = fs::read(&e.file).unwrap_or_default();
        let lines = text.iter().filter(|&&b| b == b'\n').count() + 1;
        assert!(
            (1..=lines).contains(&line),
            "line {line} is outside the file's {lines} lines: {shown}"
        );
        if let Some(column) = e.column {
            assert!(column >= 1, "column 0: {shown}");
        }
    } else {
        assert!(e.column.is_none(), "a column without a line: {shown}");
    }
}
