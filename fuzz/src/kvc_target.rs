//! `kvc_import`: a KVC config (`/etc/kvc/NAME.conf`) through the steps of
//! `kvcctl import-kvc`: read, convert (with or without a KVC library), the
//! framework's runtime note, `replace_in_tree` from a kernel tree, rendering,
//! and validation of the rendered module config.
//!
//! Input: the main file is the KVC config. Marker lines:
//! - `##> name NAME`: the instance name (default `fuzz`);
//! - `##> lib` / `##> local-lib`: a KVC library `NAME-lib.sh` exists in
//!   `usr/lib/kvc` / `usr/local/lib/kvc` with the part as its text (also
//!   read as bash by the same reader, as libraries are sourced too);
//! - `##> framework`: the part is `kmods-via-containers.conf`;
//! - `##> in-tree`: each line of the part is a file under the kernel's
//!   `kernel/` directory (e.g. `drivers/net/ice.ko.xz`);
//! - `##> builtin`: the part is the kernel's `modules.builtin`.
//!
//! Invariants besides not panicking: a read error names the file; the
//! rendered config has no control characters (notes become comments); when
//! the importer produces a config, it passes kvcd's own validation (the CLI
//! reports anything else as an internal error) and keeps the modules, in
//! order, the libraries or the build context and file, and the version of an
//! image build.

use std::fs;
use std::path::{Path, PathBuf};

use kvcd::config::kvc_import::{self, FRAMEWORK_CONF, InTree, Origin, ParsedConf};
use kvcd::config::{Config, Source};
use kvcd::kmod::ModName;

use crate::{limit_allocations, parts, put, safe_relative, scratch};

/// The kernel release the scratch tree stands for.
const KERNEL: &str = "6.1.0-fuzz";

/// The `kvc_import` target.
pub fn kvc_import(data: &[u8]) {
    limit_allocations(256 << 20);
    let root = scratch("kvc_import");
    let kvc_dir = root.join("etc/kvc");
    let lib_roots = [root.join("usr/local/lib/kvc"), root.join("usr/lib/kvc")];
    let kernel_dir = root.join("lib/modules").join(KERNEL);
    fs::create_dir_all(&kvc_dir).expect("creating the KVC directory");
    fs::create_dir_all(kernel_dir.join("kernel")).expect("creating the kernel tree");

    let parts = parts(data);
    let mut name = "fuzz".to_owned();
    for p in &parts[1..] {
        if let Some(n) = p.header.strip_prefix(b"name ") {
            name = String::from_utf8_lossy(n).trim().to_owned();
        }
    }
    // `kvcctl import-kvc` refuses these before reading anything; longer
    // names cannot be file names.
    if name.is_empty()
        || name.contains('/')
        || name.starts_with('.')
        || name.contains('\0')
        || name.len() > 200
    {
        return;
    }
    let source = kvc_dir.join(format!("{name}.conf"));
    if !put(&source, parts[0].body) {
        return;
    }
    let mut framework_text = None;
    for p in &parts[1..] {
        match p.header {
            b"lib" => {
                put(&lib_roots[1].join(format!("{name}-lib.sh")), p.body);
            }
            b"local-lib" => {
                put(&lib_roots[0].join(format!("{name}-lib.sh")), p.body);
            }
            b"framework" => {
                put(&kvc_dir.join(FRAMEWORK_CONF), p.body);
                framework_text = Some(p.body);
            }
            b"in-tree" => {
                for line in p.body.split(|&b| b == b'\n').take(32) {
                    if let Some(rel) = safe_relative(line) {
                        let f = kernel_dir.join("kernel").join(rel);
                        if !f.exists() {
                            put(&f, b"");
                        }
                    }
                }
            }
            b"builtin" => {
                put(&kernel_dir.join("modules.builtin"), p.body);
            }
            _ => {}
        }
        if matches!(p.header, b"lib" | b"local-lib") {
            if let Ok(text) = std::str::from_utf8(p.body) {
                ParsedConf::parse(text);
            }
        }
    }

    // As `import_one` does it.
    let text = match kvcd::config::read(&source) {
        Ok(t) => t,
        Err(errs) => {
            assert!(!errs.is_empty());
            for e in errs {
                assert_eq!(e.file, source, "a read error names another file: {e}");
            }
            return;
        }
    };
    let roots: Vec<&Path> = lib_roots.iter().map(PathBuf::as_path).collect();
    let libraries = kvcd::hooks::kvc::existing_libraries(&name, &roots);
    let conversion = kvc_import::convert(&name, &source, &text, &libraries);
    let mut notes = conversion.notes;
    if let Some(t) = framework_text.and_then(|t| std::str::from_utf8(t).ok()) {
        notes.extend(kvc_import::framework_runtime_note(
            &kvc_dir.join(FRAMEWORK_CONF),
            t,
            !libraries.is_empty(),
        ));
    }
    let Ok(mut imported) = conversion.result else {
        return;
    };
    // A tree that cannot be read (e.g. modules.builtin is not UTF-8) is a note there.
    if let Ok(tree) = InTree::read(&kernel_dir) {
        notes.extend(imported.replace_in_tree_of(&tree, KERNEL));
    }
    let toml = imported.to_toml(&notes);
    assert!(
        toml.lines()
            .all(|l| !l.chars().any(|c| c.is_control() && c != '\t')),
        "a control character in the rendered config:\n{toml:?}"
    );

    let file = root.join("out").join(format!("{name}.toml"));
    assert!(put(&file, toml.as_bytes()), "writing {}", file.display());
    let config = Config::load_paths(std::slice::from_ref(&file));
    let errors: Vec<String> = config.all_errors().iter().map(|e| e.to_string()).collect();
    assert!(
        errors.is_empty(),
        "the imported config does not validate:\n{toml}\n{errors:#?}"
    );
    let cfg = match config.modules.get(&name).map(|e| &e.result) {
        Some(Ok(cfg)) => cfg,
        other => panic!("the imported config was not read back: {other:?}\n{toml}"),
    };
    let want: Vec<ModName> = imported
        .modules
        .iter()
        .map(|m| ModName::parse(m).expect("the importer kept a bad module name"))
        .collect();
    assert_eq!(cfg.modules, want, "modules changed on the way:\n{toml}");
    match (&imported.origin, &cfg.source) {
        (Origin::KvcLibrary(libs), Source::KvcLibrary { libraries }) => {
            assert_eq!(libs, libraries, "libraries changed on the way:\n{toml}");
        }
        (Origin::Build { context, file }, Source::Image(img)) => {
            let b = img.build.as_ref().expect("an imported build has [build]");
            assert_eq!(&b.context, context, "context changed:\n{toml}");
            assert_eq!(&b.file, file, "file changed:\n{toml}");
            assert_eq!(cfg.version, imported.version, "version changed:\n{toml}");
        }
        (o, s) => panic!("origin {o:?} became source {s:?}:\n{toml}"),
    }
}
