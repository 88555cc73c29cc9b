//! Load order without a kernel-wide depmod. The package's own modules say
//! what they need in their `.modinfo` `depends=`; a name the package does
//! not have comes from the target kernel's own index (`modules.dep.bin`,
//! through libkmod), with that module's dependencies as the index lists
//! them. The package's module wins over an in-tree one of the same name,
//! also where an in-tree module depends on it. Only the package's files are
//! read; the kernel's tree is never scanned or indexed again.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, anyhow, bail};

use super::elf::ElfInfo;
use super::{ModInfo, ModName, ModuleFile, ModuleTree};

/// Where a module name resolves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Provider {
    /// One of the package's files, with the names its `depends=` lists.
    Package {
        /// The file.
        path: PathBuf,
        /// Its `depends=`, as written.
        depends: Vec<String>,
    },
    /// The target kernel's own module file, with its dependencies from the index.
    InTree {
        /// The file.
        path: PathBuf,
        /// Its dependencies.
        depends: Vec<ModName>,
    },
    /// Built into the target kernel: nothing to insert.
    BuiltIn,
    /// Neither in the package nor the kernel's tree, but provided already
    /// (live in the kernel, or by a config this one loads after): nothing
    /// to insert.
    Elsewhere,
    /// Neither in the package nor known to the target kernel.
    Missing,
}

/// Answers where a module name resolves: the narrow seam resolution goes through.
pub trait Providers {
    /// Where `name` resolves.
    fn provider(&mut self, name: &ModName) -> Result<Provider>;
    /// What was searched, for the error about a missing module ("the package (DIR) or kernel K's modules (DIR)").
    fn searched(&self) -> String;
}

/// The files for `wanted` and everything they need, dependencies first, each
/// once. A module that is neither in the package nor the kernel's, a
/// dependency cycle, and a `depends=` entry that is no module name are errors
/// naming the modules involved.
pub fn load_order(p: &mut dyn Providers, wanted: &[ModName]) -> Result<Vec<ModuleFile>> {
    let mut walk = Walk {
        seen: BTreeSet::new(),
        stack: Vec::new(),
        out: Vec::new(),
    };
    for name in wanted {
        walk.visit(p, name)?;
    }
    Ok(walk.out)
}

struct Walk {
    seen: BTreeSet<ModName>,
    stack: Vec<ModName>,
    out: Vec<ModuleFile>,
}

impl Walk {
    fn visit(&mut self, p: &mut dyn Providers, name: &ModName) -> Result<()> {
        if self.seen.contains(name) {
            return Ok(());
        }
        if self.stack.contains(name) {
            let chain: Vec<_> = self.stack.iter().map(ModName::as_str).collect();
            bail!("dependency cycle: {} -> {name}", chain.join(" -> "));
        }
        let (path, depends, in_tree) = match p.provider(name)? {
            Provider::Package { path, depends } => {
                let depends = depends
                    .iter()
                    .map(|d| {
                        ModName::parse(d).map_err(|e| {
                            anyhow!(
                                "{}: depends on {d:?}, which is not a module name: {e}",
                                path.display()
                            )
                        })
                    })
                    .collect::<Result<Vec<_>>>()?;
                (path, depends, false)
            }
            Provider::InTree { path, depends } => (path, depends, true),
            Provider::BuiltIn | Provider::Elsewhere => {
                self.seen.insert(name.clone());
                return Ok(());
            }
            Provider::Missing => {
                return Err(match self.stack.last() {
                    Some(by) => anyhow!(
                        "module {by} needs module {name}, which is not in {}",
                        p.searched()
                    ),
                    None => anyhow!("module {name} is not in {}", p.searched()),
                });
            }
        };
        self.stack.push(name.clone());
        for d in &depends {
            self.visit(p, d)?;
        }
        self.stack.pop();
        self.seen.insert(name.clone());
        self.out.push(ModuleFile {
            name: name.clone(),
            path,
            in_tree,
        });
        Ok(())
    }
}

/// Whether a name in neither the package nor the kernel's tree is provided already, and why.
pub type Elsewhere<'a> = dyn Fn(&ModName) -> Option<String> + 'a;

/// A driver package's files over the target kernel's tree: the real [`Providers`].
/// Each package file the load needs is placed (stored) first and read from
/// where it was placed, once; what was read is kept for verification.
pub struct Package<'a, F> {
    files: &'a BTreeMap<ModName, PathBuf>,
    dir: &'a Path,
    tree: &'a ModuleTree,
    place: F,
    read: BTreeMap<ModName, (PathBuf, ElfInfo)>,
    elsewhere: Option<&'a Elsewhere<'a>>,
    notes: Vec<String>,
}

impl<F> std::fmt::Debug for Package<'_, F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Package")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl<'a, F: FnMut(&ModName, &Path) -> Result<(PathBuf, ElfInfo)>> Package<'a, F> {
    /// The package's `files` (name → file, found in `dir`) over `tree`;
    /// `place` stores a file and gives the copy to load and what it says.
    pub fn new(
        files: &'a BTreeMap<ModName, PathBuf>,
        dir: &'a Path,
        tree: &'a ModuleTree,
        place: F,
    ) -> Self {
        Self {
            files,
            dir,
            tree,
            place,
            read: BTreeMap::new(),
            elsewhere: None,
            notes: Vec::new(),
        }
    }

    /// Asks `elsewhere` about a name in neither the package nor the kernel's
    /// tree: `Some(why)` when it is provided already (nothing to insert).
    #[must_use]
    pub fn with_elsewhere(mut self, elsewhere: &'a Elsewhere<'a>) -> Self {
        self.elsewhere = Some(elsewhere);
        self
    }

    /// What resolution found provided elsewhere, for the log.
    pub fn notes(&self) -> &[String] {
        &self.notes
    }

    /// What was read of each package file that resolution visited.
    pub fn into_read(self) -> BTreeMap<ModName, ElfInfo> {
        self.read.into_iter().map(|(n, (_, e))| (n, e)).collect()
    }
}

impl<F: FnMut(&ModName, &Path) -> Result<(PathBuf, ElfInfo)>> Providers for Package<'_, F> {
    fn provider(&mut self, name: &ModName) -> Result<Provider> {
        if let Some(source) = self.files.get(name) {
            if !self.read.contains_key(name) {
                let placed = (self.place)(name, source)
                    .with_context(|| format!("reading module {name} ({})", source.display()))?;
                self.read.insert(name.clone(), placed);
            }
            let (path, elf) = &self.read[name];
            return Ok(Provider::Package {
                path: path.clone(),
                depends: ModInfo::of(elf).depends,
            });
        }
        match self.tree.provider(name)? {
            Provider::Missing => match self.elsewhere.and_then(|f| f(name)) {
                Some(why) => {
                    self.notes.push(why);
                    Ok(Provider::Elsewhere)
                }
                None => Ok(Provider::Missing),
            },
            found => Ok(found),
        }
    }

    fn searched(&self) -> String {
        format!(
            "the package ({}) or kernel {}'s modules ({})",
            self.dir.display(),
            self.tree.kernel_label(),
            self.tree.dir().display()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Providers from a table: package modules with their depends, in-tree ones with theirs, built-ins.
    struct Table {
        package: BTreeMap<&'static str, Vec<&'static str>>,
        in_tree: BTreeMap<&'static str, Vec<&'static str>>,
        builtin: Vec<&'static str>,
        asked: Vec<String>,
    }

    impl Providers for Table {
        fn provider(&mut self, name: &ModName) -> Result<Provider> {
            self.asked.push(name.to_string());
            let n = name.as_str();
            Ok(if let Some(d) = self.package.get(n) {
                Provider::Package {
                    path: PathBuf::from(format!("/pkg/{n}.ko")),
                    depends: d.iter().map(|s| (*s).to_owned()).collect(),
                }
            } else if let Some(d) = self.in_tree.get(n) {
                Provider::InTree {
                    path: PathBuf::from(format!("/k/{n}.ko")),
                    depends: d.iter().map(|s| ModName::parse(s).unwrap()).collect(),
                }
            } else if self.builtin.contains(&n) {
                Provider::BuiltIn
            } else if n == "live_elsewhere" {
                Provider::Elsewhere
            } else {
                Provider::Missing
            })
        }

        fn searched(&self) -> String {
            "the package or the kernel".into()
        }
    }

    fn table(
        package: &[(&'static str, &[&'static str])],
        in_tree: &[(&'static str, &[&'static str])],
    ) -> Table {
        Table {
            package: package.iter().map(|(n, d)| (*n, d.to_vec())).collect(),
            in_tree: in_tree.iter().map(|(n, d)| (*n, d.to_vec())).collect(),
            builtin: vec!["crc32c"],
            asked: Vec::new(),
        }
    }

    fn order(t: &mut Table, wanted: &[&str]) -> Result<Vec<String>> {
        let wanted: Vec<_> = wanted.iter().map(|w| ModName::parse(w).unwrap()).collect();
        Ok(load_order(t, &wanted)?
            .into_iter()
            .map(|f| {
                format!(
                    "{}{}",
                    f.path.display(),
                    if f.in_tree { " (in-tree)" } else { "" }
                )
            })
            .collect())
    }

    #[test]
    fn package_and_in_tree_dependencies_come_first_each_once() {
        let mut t = table(
            &[
                ("user", &["base", "crc8"]),
                ("base", &["crc32c"]),
                ("other", &["base"]),
            ],
            &[("crc8", &["lib_a"]), ("lib_a", &[]), ("base", &[])],
        );
        assert_eq!(
            order(&mut t, &["user", "other"]).unwrap(),
            [
                "/pkg/base.ko",
                "/k/lib_a.ko (in-tree)",
                "/k/crc8.ko (in-tree)",
                "/pkg/user.ko",
                "/pkg/other.ko"
            ]
        );
        // Each name is looked up once.
        let mut asked = t.asked.clone();
        asked.sort();
        asked.dedup();
        assert_eq!(asked.len(), t.asked.len(), "{:?}", t.asked);
    }

    #[test]
    fn what_is_provided_elsewhere_is_not_inserted() {
        let mut t = table(&[("app", &["live_elsewhere", "crc32c"])], &[]);
        assert_eq!(order(&mut t, &["app"]).unwrap(), ["/pkg/app.ko"]);
    }

    #[test]
    fn the_package_wins_also_under_an_in_tree_module() {
        // In-tree `ice_aux` depends on `ice`; the package brings its own `ice`.
        let mut t = table(
            &[("ice", &[]), ("drv", &["ice_aux"])],
            &[("ice", &[]), ("ice_aux", &["ice"])],
        );
        assert_eq!(
            order(&mut t, &["drv"]).unwrap(),
            ["/pkg/ice.ko", "/k/ice_aux.ko (in-tree)", "/pkg/drv.ko"]
        );
    }

    #[test]
    fn missing_modules_cycles_and_bad_names_are_named() {
        let mut t = table(&[("a", &["b"]), ("b", &["nope"])], &[]);
        assert_eq!(
            order(&mut t, &["a"]).unwrap_err().to_string(),
            "module b needs module nope, which is not in the package or the kernel"
        );
        let mut t = table(&[("a", &["b"]), ("b", &["c"]), ("c", &["a"])], &[]);
        assert_eq!(
            order(&mut t, &["a"]).unwrap_err().to_string(),
            "dependency cycle: a -> b -> c -> a"
        );
        let mut t = table(&[("a", &["../x"])], &[]);
        let e = order(&mut t, &["a"]).unwrap_err().to_string();
        assert!(
            e.starts_with("/pkg/a.ko: depends on \"../x\", which is not a module name"),
            "{e}"
        );
        let mut t = table(&[], &[]);
        assert_eq!(
            order(&mut t, &["zz"]).unwrap_err().to_string(),
            "module zz is not in the package or the kernel"
        );
    }
}
