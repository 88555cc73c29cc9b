//! Conversion of kmods-via-containers configs (`/etc/kvc/NAME.conf`) into
//! module configs (`modules.d/NAME.toml`).
//!
//! A KVC config is a bash file that its library sources. It is never run
//! here: only plain assignments (`KEY=value`, `KEY="value"`, `KEY='value'`,
//! optionally after `export`) are read, with `$VAR` and `${VAR}` expanded
//! when VAR was set earlier in the same file. Everything else (command
//! substitution, other expansions, conditionals, loops, functions, commands)
//! is reported with its line number and skipped.
//!
//! When a KVC library (`NAME-lib.sh`) exists, the result keeps it: kvcd runs
//! the library exactly as the old dispatcher did. Otherwise the config maps
//! onto kvcd's own image pipeline: an image built on the node from the same
//! context and Containerfile, with the build arguments KVC passed.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::LazyLock;

use regex::Regex;

use super::InstanceName;
use super::validate::is_git_url;
use crate::kmod::ModName;

/// Where KVC keeps its configs.
pub const DEFAULT_KVC_DIR: &str = "/etc/kvc";
/// Where KVC libraries are looked up, in sourcing order (later definitions win).
pub const DEFAULT_LIB_DIRS: &[&str] = &["/usr/local/lib/kvc", "/usr/lib/kvc"];
/// The framework's own settings file in the KVC directory; not an instance config.
pub const FRAMEWORK_CONF: &str = "kmods-via-containers.conf";

/// Build context: a git URL or a directory.
pub const BUILD_CONTEXT: &str = "KMOD_CONTAINER_BUILD_CONTEXT";
/// Containerfile name inside the build context.
pub const BUILD_FILE: &str = "KMOD_CONTAINER_BUILD_FILE";
/// Driver version (build argument `KMODVER`, expected `MODULE_VERSION`).
pub const SOFTWARE_VERSION: &str = "KMOD_SOFTWARE_VERSION";
/// Modules to load, space separated, in order.
pub const NAMES: &str = "KMOD_NAMES";
/// In-tree modules some forks load first.
pub const EXTRA_NAMES: &str = "KMOD_EXTRA_NAMES";
/// The container runtime the KVC dispatcher runs (`podman` unless set).
pub const CONTAINER_RUNTIME: &str = "KVC_CONTAINER_RUNTIME";
/// The variables the importer understands.
pub const KNOWN_VARIABLES: [&str; 5] = [
    BUILD_CONTEXT,
    BUILD_FILE,
    SOFTWARE_VERSION,
    NAMES,
    EXTRA_NAMES,
];

/// A variable's value and the line of its last assignment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Var {
    /// The value after quote removal and expansion.
    pub value: String,
    /// 1-based line of the assignment.
    pub line: usize,
}

/// What could be read from a KVC config without running it.
#[derive(Debug, Clone, Default)]
pub struct ParsedConf {
    /// Variables set by plain assignments, by name.
    pub vars: BTreeMap<String, Var>,
    /// Variables whose last assignment could not be read, with its line.
    pub unreadable: BTreeMap<String, usize>,
    /// Variables other assignments expanded.
    pub used: BTreeSet<String>,
    /// One "could not convert line N: …" note per skipped statement or block.
    pub notes: Vec<String>,
}

/// One logical statement of the file: its words (quotes kept) and where it is.
#[derive(Debug)]
struct Stmt {
    line: usize,
    last_line: usize,
    words: Vec<String>,
    text: String,
    unterminated: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Quote {
    None,
    Single,
    Double,
}

/// Splits bash text into statements (at unquoted newlines and `;`), dropping
/// comments and line continuations. `$(…)` is kept whole.
fn statements(text: &str) -> Vec<Stmt> {
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut words: Vec<String> = Vec::new();
    let mut word = String::new();
    let mut raw = String::new();
    let mut quote = Quote::None;
    let mut depth = 0usize;
    let (mut line, mut start) = (1usize, 1usize);
    let mut i = 0;

    let end_word = |word: &mut String, words: &mut Vec<String>| {
        if !word.is_empty() {
            words.push(std::mem::take(word));
        }
    };
    let end_stmt = |words: &mut Vec<String>,
                    raw: &mut String,
                    out: &mut Vec<Stmt>,
                    start: usize,
                    last: usize,
                    unterminated: bool| {
        if !words.is_empty() {
            out.push(Stmt {
                line: start,
                last_line: last,
                words: std::mem::take(words),
                text: raw.trim().to_owned(),
                unterminated,
            });
        }
        raw.clear();
    };

    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        if words.is_empty() && word.is_empty() {
            start = line;
        }
        match quote {
            Quote::Single => {
                word.push(c);
                raw.push(c);
                if c == '\'' {
                    quote = Quote::None;
                }
            }
            _ if c == '\\' && next == Some('\n') => {
                // A line continuation disappears, in or out of double quotes.
                i += 1;
            }
            _ if c == '\\' => {
                word.push(c);
                raw.push(c);
                if let Some(n) = next.filter(|&n| n != '\n') {
                    word.push(n);
                    raw.push(n);
                    i += 1;
                }
            }
            _ if c == '$' && next == Some('(') => {
                depth += 1;
                word.push_str("$(");
                raw.push_str("$(");
                i += 1;
            }
            _ if depth > 0 && c == '(' => {
                depth += 1;
                word.push(c);
                raw.push(c);
            }
            _ if depth > 0 && c == ')' => {
                depth -= 1;
                word.push(c);
                raw.push(c);
            }
            Quote::Double => {
                word.push(c);
                raw.push(c);
                if c == '"' {
                    quote = Quote::None;
                }
            }
            Quote::None if depth == 0 && (c == ' ' || c == '\t') => {
                end_word(&mut word, &mut words);
                raw.push(c);
            }
            Quote::None if depth == 0 && (c == '\n' || c == ';') => {
                end_word(&mut word, &mut words);
                end_stmt(&mut words, &mut raw, &mut out, start, line, false);
            }
            Quote::None if depth == 0 && c == '#' && word.is_empty() => {
                while i + 1 < chars.len() && chars[i + 1] != '\n' {
                    i += 1;
                }
            }
            Quote::None => {
                if c == '\'' {
                    quote = Quote::Single;
                } else if c == '"' {
                    quote = Quote::Double;
                }
                word.push(c);
                raw.push(c);
            }
        }
        if chars[i] == '\n' {
            line += 1;
        }
        i += 1;
    }
    end_word(&mut word, &mut words);
    let open = quote != Quote::None || depth > 0;
    let last = if text.ends_with('\n') { line - 1 } else { line };
    end_stmt(&mut words, &mut raw, &mut out, start, last.max(start), open);
    out
}

/// How a statement changes the nesting of bash blocks (`if … fi`, `{ … }`, …).
fn block_delta(words: &[String]) -> isize {
    let open = ["if", "case", "for", "while", "until", "select", "{"];
    let close = ["fi", "esac", "done", "}"];
    words
        .iter()
        .map(|w| {
            if open.contains(&w.as_str()) {
                1
            } else if close.contains(&w.as_str()) {
                -1
            } else {
                0
            }
        })
        .sum()
}

/// The first line of a statement, shortened, for messages.
fn excerpt(text: &str) -> String {
    let first = text.lines().next().unwrap_or("").trim();
    let mut out: String = first.chars().take(100).collect();
    if first.chars().count() > 100 || text.lines().nth(1).is_some() {
        out.push('…');
    }
    out
}

fn lines(first: usize, last: usize) -> String {
    if first == last {
        format!("line {first}")
    } else {
        format!("lines {first}-{last}")
    }
}

fn is_name(s: &str) -> bool {
    let mut c = s.chars();
    c.next()
        .is_some_and(|f| f.is_ascii_alphabetic() || f == '_')
        && c.all(|ch| ch.is_ascii_alphanumeric() || ch == '_')
}

/// `NAME=raw` or `NAME+=raw`: (name, append, raw value).
fn assignment(word: &str) -> Option<(&str, bool, &str)> {
    let end = word
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(word.len());
    let (name, rest) = word.split_at(end);
    if !is_name(name) {
        return None;
    }
    if let Some(v) = rest.strip_prefix("+=") {
        Some((name, true, v))
    } else {
        rest.strip_prefix('=').map(|v| (name, false, v))
    }
}

impl ParsedConf {
    /// Reads `text` (a KVC config) without running it.
    pub fn parse(text: &str) -> Self {
        let mut p = Self::default();
        let mut depth = 0isize;
        let mut block: Option<(usize, usize, String)> = None;
        for s in statements(text) {
            let delta = block_delta(&s.words);
            if depth > 0 || delta > 0 {
                let b = block.get_or_insert_with(|| (s.line, s.last_line, s.text.clone()));
                b.1 = s.last_line;
                depth += delta;
                if depth <= 0 {
                    depth = 0;
                    p.close_block(&mut block);
                }
                continue;
            }
            if s.unterminated {
                p.skip(&s, "unterminated quote or `$(`");
                continue;
            }
            p.statement(&s);
        }
        p.close_block(&mut block);
        p
    }

    fn close_block(&mut self, block: &mut Option<(usize, usize, String)>) {
        if let Some((first, last, text)) = block.take() {
            self.notes.push(format!(
                "could not convert {}: conditionals, loops, groups and functions are not run: {}",
                lines(first, last),
                excerpt(&text)
            ));
        }
    }

    fn skip(&mut self, s: &Stmt, reason: &str) {
        self.notes.push(format!(
            "could not convert {}: {reason}: {}",
            lines(s.line, s.last_line),
            excerpt(&s.text)
        ));
    }

    fn statement(&mut self, s: &Stmt) {
        let mut words = s.words.as_slice();
        let export = words.first().is_some_and(|w| w == "export");
        if export {
            words = &words[1..];
        }
        let only_assignments = !words.is_empty()
            && words
                .iter()
                .all(|w| assignment(w).is_some() || (export && is_name(w)));
        if !only_assignments {
            self.skip(s, "not a variable assignment");
            return;
        }
        for w in words {
            // `export NAME` alone changes no value.
            let Some((name, append, raw)) = assignment(w) else {
                continue;
            };
            let value = self.expand(raw).and_then(|v| {
                if !append {
                    return Ok(v);
                }
                if let Some(line) = self.unreadable.get(name) {
                    return Err(format!(
                        "appends to {name}, whose value on line {line} could not be converted"
                    ));
                }
                let old = self.vars.get(name).map_or("", |o| o.value.as_str());
                Ok(format!("{old}{v}"))
            });
            match value {
                Ok(value) => {
                    self.unreadable.remove(name);
                    self.vars.insert(
                        name.to_owned(),
                        Var {
                            value,
                            line: s.line,
                        },
                    );
                }
                Err(reason) => {
                    self.vars.remove(name);
                    self.unreadable.insert(name.to_owned(), s.line);
                    self.skip(s, &reason);
                    return;
                }
            }
        }
    }

    fn lookup(&mut self, name: &str) -> Result<String, String> {
        if let Some(v) = self.vars.get(name) {
            let value = v.value.clone();
            self.used.insert(name.to_owned());
            Ok(value)
        } else if let Some(line) = self.unreadable.get(name) {
            Err(format!(
                "uses ${name}, whose value on line {line} could not be converted"
            ))
        } else {
            Err(format!(
                "uses ${name}, which is not set earlier in this file"
            ))
        }
    }

    /// Expands one `$…` at `c[i]`; returns the index after it.
    fn dollar(
        &mut self,
        c: &[char],
        i: usize,
        in_double: bool,
        out: &mut String,
    ) -> Result<usize, String> {
        match c.get(i + 1).copied() {
            Some('{') => {
                let Some(len) = c[i + 2..].iter().position(|&ch| ch == '}') else {
                    return Err("unterminated `${`".to_owned());
                };
                let inner: String = c[i + 2..i + 2 + len].iter().collect();
                if !is_name(&inner) {
                    return Err(format!(
                        "the expansion `${{{inner}}}` is not evaluated (only ${{VAR}} of variables set earlier in this file)"
                    ));
                }
                out.push_str(&self.lookup(&inner)?);
                Ok(i + 3 + len)
            }
            Some('(') if c.get(i + 2) == Some(&'(') => {
                Err("arithmetic expansion `$((…))` is not evaluated".to_owned())
            }
            Some('(') => Err("command substitution `$(…)` is not run".to_owned()),
            Some(ch) if ch.is_ascii_alphabetic() || ch == '_' => {
                let len = c[i + 1..]
                    .iter()
                    .position(|&ch| !(ch.is_ascii_alphanumeric() || ch == '_'))
                    .unwrap_or(c.len() - i - 1);
                let name: String = c[i + 1..i + 1 + len].iter().collect();
                out.push_str(&self.lookup(&name)?);
                Ok(i + 1 + len)
            }
            Some(ch) if ch.is_ascii_digit() || "@*#?$!-".contains(ch) => Err(format!(
                "the special parameter `${ch}` has no value outside bash"
            )),
            Some('\'') if !in_double => Err("`$'…'` quoting is not supported".to_owned()),
            Some('"') if !in_double => Err("`$\"…\"` quoting is not supported".to_owned()),
            _ => {
                out.push('$');
                Ok(i + 1)
            }
        }
    }

    /// Quote removal and expansion of one assignment value, as bash does it
    /// for an assignment (no word splitting, no globbing).
    fn expand(&mut self, raw: &str) -> Result<String, String> {
        let c: Vec<char> = raw.chars().collect();
        let mut out = String::new();
        let mut in_double = false;
        let mut i = 0;
        while i < c.len() {
            let ch = c[i];
            if in_double {
                match ch {
                    '"' => in_double = false,
                    '\\' if matches!(c.get(i + 1), Some('$' | '`' | '"' | '\\')) => {
                        out.push(c[i + 1]);
                        i += 1;
                    }
                    '$' => {
                        i = self.dollar(&c, i, true, &mut out)?;
                        continue;
                    }
                    '`' => return Err("command substitution with backquotes is not run".into()),
                    _ => out.push(ch),
                }
            } else {
                match ch {
                    '\'' => {
                        let Some(len) = c[i + 1..].iter().position(|&q| q == '\'') else {
                            return Err("unterminated quote".into());
                        };
                        out.extend(&c[i + 1..i + 1 + len]);
                        i += len + 1;
                    }
                    '"' => in_double = true,
                    '\\' => {
                        out.push(c.get(i + 1).copied().unwrap_or('\\'));
                        i += 1;
                    }
                    '$' => {
                        i = self.dollar(&c, i, false, &mut out)?;
                        continue;
                    }
                    '`' => return Err("command substitution with backquotes is not run".into()),
                    '(' | ')' => return Err("arrays and subshells are not supported".into()),
                    '<' | '>' | '|' | '&' => {
                        return Err(format!("the shell operator `{ch}` is not supported"));
                    }
                    '~' if i == 0 || c[i - 1] == ':' => {
                        return Err("tilde expansion is not supported".into());
                    }
                    _ => out.push(ch),
                }
            }
            i += 1;
        }
        if in_double {
            return Err("unterminated quote".into());
        }
        Ok(out)
    }

    /// A variable's value, `None` when it is not set or empty.
    pub fn get(&self, name: &str) -> Option<&Var> {
        self.vars.get(name).filter(|v| !v.value.trim().is_empty())
    }

    /// Why `name` has no value, for an error message.
    fn why_missing(&self, name: &str) -> String {
        match (self.unreadable.get(name), self.vars.get(name)) {
            (Some(line), _) => format!("{name} could not be read (line {line})"),
            (None, Some(v)) => format!("{name} is empty (line {})", v.line),
            (None, None) => format!("{name} is not set"),
        }
    }
}

/// Where the converted config gets its modules from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// The KVC library, kept as it is: `[hooks] kvc_library`.
    KvcLibrary(Vec<PathBuf>),
    /// kvcd's pipeline: an image built on the node.
    Build {
        /// Build context: absolute directory or git URL.
        context: String,
        /// Containerfile inside the context.
        file: String,
    },
}

/// A converted KVC config, ready to render.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Imported {
    /// Module config name (the KVC instance name).
    pub name: InstanceName,
    /// The KVC config it came from.
    pub source: PathBuf,
    /// `KMOD_SOFTWARE_VERSION`.
    pub version: Option<String>,
    /// `KMOD_NAMES`, in order.
    pub modules: Vec<String>,
    /// Modules that are also in-tree modules of the target kernel (see [`Imported::replace_in_tree_of`]); default none.
    pub replace_in_tree: Vec<String>,
    /// Library or image build.
    pub origin: Origin,
}

/// The result of converting one KVC config: notes in any case, then the
/// converted config or why it could not be converted.
#[derive(Debug, Clone)]
pub struct Conversion {
    /// What was skipped or changed, one line each.
    pub notes: Vec<String>,
    /// The converted config, or the reason there is none.
    pub result: Result<Imported, String>,
}

/// Component names podman accepts in an image repository path.
static REPO_COMPONENT: LazyLock<Option<Regex>> =
    LazyLock::new(|| Regex::new(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$").ok());

fn valid_repo_component(s: &str) -> bool {
    REPO_COMPONENT.as_ref().is_some_and(|re| re.is_match(s))
}

/// Converts the KVC config `text` (read from `source`) for instance `name`;
/// `libraries` are the existing `NAME-lib.sh` files in sourcing order.
pub fn convert(name: &str, source: &Path, text: &str, libraries: &[PathBuf]) -> Conversion {
    let conf = ParsedConf::parse(text);
    let mut notes = conf.notes.clone();
    let mut problems = Vec::new();
    let name = match InstanceName::parse(name) {
        Ok(n) => Some(n),
        Err(e) => {
            problems.push(format!("not usable as a kvcd module config name: {e}"));
            None
        }
    };
    let library = !libraries.is_empty();

    let mut modules: Vec<String> = Vec::new();
    let mut seen: Vec<ModName> = Vec::new();
    match conf.get(NAMES) {
        None => problems.push(format!(
            "{} (kvcd needs the modules to load)",
            conf.why_missing(NAMES)
        )),
        Some(v) => {
            for m in v.value.split_whitespace() {
                match ModName::parse(m) {
                    Ok(n) if seen.contains(&n) => notes.push(format!(
                        "{NAMES} lists {m} more than once ('-' and '_' are the same); kept once"
                    )),
                    Ok(n) => {
                        seen.push(n);
                        modules.push(m.to_owned());
                    }
                    Err(e) => problems.push(format!("{NAMES} (line {}): {e}", v.line)),
                }
            }
        }
    }

    let version = match conf.get(SOFTWARE_VERSION) {
        Some(v) if !library && v.value.chars().any(char::is_whitespace) => {
            problems.push(format!(
                "{SOFTWARE_VERSION} {:?} (line {}) holds blanks; expected one version string",
                v.value, v.line
            ));
            None
        }
        Some(v) if !library => match crate::kernel::check_version(&v.value) {
            Ok(()) => Some(v.value.clone()),
            Err(e) => {
                problems.push(format!(
                    "{SOFTWARE_VERSION} (line {}) cannot be the config's `version`: {e}",
                    v.line
                ));
                None
            }
        },
        Some(v) => Some(v.value.clone()),
        None => None,
    };

    let origin = if library {
        for l in libraries {
            if !l.is_absolute() || l.to_str().is_none() {
                problems.push(format!(
                    "KVC library {} is not an absolute UTF-8 path",
                    l.display()
                ));
            }
        }
        notes.push(format!(
            "the KVC library reads {} itself when it builds and loads: keep that file",
            source.display()
        ));
        Some(Origin::KvcLibrary(libraries.to_vec()))
    } else {
        build_origin(&conf, name.as_ref(), version.as_deref(), &mut problems)
    };

    if let Some(v) = conf.get(EXTRA_NAMES) {
        let list = v.value.split_whitespace().collect::<Vec<_>>().join(" ");
        notes.push(if library {
            format!(
                "{EXTRA_NAMES} ({list}) not converted: the KVC library reads them from {} and handles them as before",
                source.display()
            )
        } else {
            format!(
                "{EXTRA_NAMES} ({list}) not converted: kvcd loads in-tree dependencies itself; list any that are not dependencies in `modules`"
            )
        });
    }
    if library {
        if let Some(v) = conf.get(SOFTWARE_VERSION) {
            notes.push(format!(
                "{SOFTWARE_VERSION} ({}, line {}) is not written as `version`: the KVC library owns its versions and reads them from {}",
                v.value,
                v.line,
                source.display()
            ));
        }
    } else if version.is_none() && problems.is_empty() {
        notes.push(format!(
            "{}: the config gets no `version`, so module versions are not checked, the image tag has no version and KMODVER is not passed to the build",
            conf.why_missing(SOFTWARE_VERSION),
        ));
    }
    if let Some(n) = runtime_note(&conf, source, library, false) {
        notes.push(n);
    }
    for (var, v) in &conf.vars {
        if KNOWN_VARIABLES.contains(&var.as_str())
            || var == CONTAINER_RUNTIME
            || conf.used.contains(var)
        {
            continue;
        }
        notes.push(if library {
            format!(
                "{var} (line {}) not converted: kvcd has no such setting; the KVC library still reads it",
                v.line
            )
        } else {
            format!("{var} (line {}) not converted: kvcd has no such setting", v.line)
        });
    }

    let result = match (name, origin) {
        (Some(name), Some(origin)) if problems.is_empty() => Ok(Imported {
            name,
            source: source.to_owned(),
            version,
            modules,
            replace_in_tree: Vec::new(),
            origin,
        }),
        _ => Err(format!("cannot convert: {}", problems.join("; "))),
    };
    Conversion { notes, result }
}

/// True when `runtime` (a name or a path) is podman.
fn is_podman(runtime: &str) -> bool {
    Path::new(runtime.trim())
        .file_name()
        .is_some_and(|n| n == "podman")
}

/// What kvcd does instead when `conf` (read from `file`) sets `KVC_CONTAINER_RUNTIME`
/// to something other than podman; `framework` when `file` is `kmods-via-containers.conf`.
fn runtime_note(conf: &ParsedConf, file: &Path, library: bool, framework: bool) -> Option<String> {
    let v = conf
        .get(CONTAINER_RUNTIME)
        .filter(|v| !is_podman(&v.value))?;
    let set = format!(
        "{CONTAINER_RUNTIME}={} ({} line {})",
        v.value,
        file.display(),
        v.line
    );
    Some(match (library, framework) {
        (true, true) => format!(
            "{set}: kvcd does not read this file and gives the KVC library podman (kvcd.toml `podman`), not {}; check that the library works with podman and that the images it expects are in podman's storage (images built by {} are not; the library builds them again)",
            v.value, v.value
        ),
        (true, false) => format!(
            "{set}: the KVC library reads this file, so its kvc_c_* helpers run {} rather than the podman kvcd gives it; remove the line to use podman, or check that {} works for the library under kvcd",
            v.value, v.value
        ),
        (false, _) => format!(
            "{set}: kvcd builds and runs driver images with podman (kvcd.toml `podman`), not {}; images {} built are not in podman's storage, so kvcd builds them again",
            v.value, v.value
        ),
    })
}

/// The note for a non-podman `KVC_CONTAINER_RUNTIME` in the framework's own
/// `kmods-via-containers.conf` (`text`, read from `file`), for a config that keeps its library or not.
pub fn framework_runtime_note(file: &Path, text: &str, library: bool) -> Option<String> {
    runtime_note(&ParsedConf::parse(text), file, library, true)
}

/// A kernel's own modules by name (`-`/`_` folded): `.ko` files (also compressed)
/// under `KERNEL_DIR/kernel`, and the built-in ones `modules.builtin` lists.
#[derive(Debug, Clone, Default)]
pub struct InTree {
    /// Loadable in-tree modules.
    pub loadable: BTreeSet<ModName>,
    /// Modules built into the kernel image.
    pub builtin: BTreeSet<ModName>,
}

/// A module name from a file name such as `ice.ko` or `ice.ko.xz`.
fn module_of(file: &str) -> Option<ModName> {
    let stem = [".ko", ".ko.xz", ".ko.zst", ".ko.gz"]
        .iter()
        .find_map(|ext| file.strip_suffix(ext))?;
    ModName::parse(stem).ok()
}

impl InTree {
    /// Reads the in-tree modules of the kernel whose module directory is `kernel_dir` (`/lib/modules/KVER`).
    pub fn read(kernel_dir: &Path) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        let top = kernel_dir.join("kernel");
        let mut out = Self::default();
        let mut dirs = vec![top];
        while let Some(dir) = dirs.pop() {
            let entries =
                std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))?;
            for e in entries {
                let e = e.with_context(|| format!("reading {}", dir.display()))?;
                let ty = e
                    .file_type()
                    .with_context(|| format!("reading {}", e.path().display()))?;
                if ty.is_dir() {
                    dirs.push(e.path());
                } else if let Some(m) = e.file_name().to_str().and_then(module_of) {
                    out.loadable.insert(m);
                }
            }
        }
        let builtin = kernel_dir.join("modules.builtin");
        match std::fs::read_to_string(&builtin) {
            Ok(text) => {
                for line in text.lines() {
                    let file = line.rsplit('/').next().unwrap_or(line);
                    if let Some(m) = module_of(file.trim()) {
                        out.builtin.insert(m);
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("reading {}", builtin.display())),
        }
        Ok(out)
    }
}

fn build_origin(
    conf: &ParsedConf,
    name: Option<&InstanceName>,
    version: Option<&str>,
    problems: &mut Vec<String>,
) -> Option<Origin> {
    let no_library = |var: &str| {
        format!(
            "{} and there is no KVC library to build with",
            conf.why_missing(var)
        )
    };
    let context = match conf.get(BUILD_CONTEXT) {
        None => {
            problems.push(no_library(BUILD_CONTEXT));
            None
        }
        Some(v) if v.value.contains("${") => {
            problems.push(format!(
                "{BUILD_CONTEXT} {:?} (line {}) holds `${{`, which kvcd would read as a template variable",
                v.value, v.line
            ));
            None
        }
        Some(v) if is_git_url(&v.value) || v.value.starts_with('/') => Some(v.value.clone()),
        Some(v) => {
            problems.push(format!(
                "{BUILD_CONTEXT} {:?} (line {}) is neither an absolute directory nor a git URL (https://, http://, git://, ssh://, git@)",
                v.value, v.line
            ));
            None
        }
    };
    let file = match conf.get(BUILD_FILE) {
        None => {
            problems.push(no_library(BUILD_FILE));
            None
        }
        Some(v) => {
            // An absolute Containerfile path inside a directory context becomes relative to it.
            let inside = context
                .as_deref()
                .filter(|c| c.starts_with('/'))
                .and_then(|c| {
                    v.value
                        .strip_prefix(&format!("{}/", c.trim_end_matches('/')))
                });
            let f = inside.unwrap_or(&v.value);
            if !super::validate::build_file_ok(f) || f.contains("${") {
                problems.push(format!(
                    "{BUILD_FILE} {:?} (line {}) does not name a file inside the build context",
                    v.value, v.line
                ));
                None
            } else {
                Some(f.to_owned())
            }
        }
    };
    if let Some(name) = name {
        let lower = name.as_str().to_ascii_lowercase();
        if let Some(v) = version.filter(|v| !valid_repo_component(&format!("{lower}-{v}"))) {
            problems.push(format!(
                "the image name {lower}-{v} (from the config name and {SOFTWARE_VERSION}) is not a valid image repository name: expected lowercase letters and digits separated by '.', '_' or '-'"
            ));
        } else if version.is_none() && !valid_repo_component(&lower) {
            problems.push(format!(
                "the config name {lower} is not a valid image repository name: expected lowercase letters and digits separated by '.', '_' or '-'"
            ));
        }
    }
    Some(Origin::Build {
        context: context?,
        file: file?,
    })
}

/// A TOML string, escaped by the `toml` crate.
fn quoted(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

/// Text made safe for a TOML comment line (no control characters).
fn comment(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_control() && c != '\t' {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

impl Imported {
    /// `description` of the generated config.
    pub fn description(&self) -> String {
        format!("imported from {}", self.source.display())
    }

    /// The image reference of an imported build: the fully qualified name KVC's
    /// build gave its image (`NAME-VERSION:KERNEL`, which podman stores under
    /// `localhost/`), so an image KVC already built is used as it is.
    pub fn image_ref(&self) -> String {
        let name = self.name.as_str().to_ascii_lowercase();
        if self.version.is_some() {
            format!("localhost/{name}-${{MOD_VERSION}}:${{KERNEL_FULL_VERSION}}")
        } else {
            format!("localhost/{name}:${{KERNEL_FULL_VERSION}}")
        }
    }

    /// Adds to `replace_in_tree` each module that is also an in-tree module of
    /// `kernel` (per `tree`); returns one note per module added or built in.
    pub fn replace_in_tree_of(&mut self, tree: &InTree, kernel: &str) -> Vec<String> {
        let mut notes = Vec::new();
        for m in &self.modules {
            let Ok(n) = ModName::parse(m) else { continue };
            if tree.loadable.contains(&n) {
                self.replace_in_tree.push(m.clone());
                notes.push(format!(
                    "{m} is also an in-tree module of {kernel}; added replace_in_tree = [{}] so the out-of-tree one replaces it",
                    quoted(m)
                ));
            } else if tree.builtin.contains(&n) {
                notes.push(format!(
                    "{m} is built into kernel {kernel} (modules.builtin): it cannot be unloaded, so an out-of-tree {m} cannot replace it there"
                ));
            }
        }
        notes
    }

    /// The module config as TOML, with a header naming the sources and `notes`.
    pub fn to_toml(&self, notes: &[String]) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "# Converted by `kvcctl import-kvc` from {}",
            comment(&self.source.display().to_string())
        );
        if let Origin::KvcLibrary(libs) = &self.origin {
            let _ = writeln!(s, "# KVC library, sourced in this order:");
            for l in libs {
                let _ = writeln!(s, "#   {}", comment(&l.display().to_string()));
            }
        }
        if !notes.is_empty() {
            let _ = writeln!(s, "# Notes:");
            for n in notes {
                let _ = writeln!(s, "#   {}", comment(n));
            }
        }
        let _ = writeln!(s, "description = {}", quoted(&self.description()));
        // A KVC library owns its versions; kvcd would only check against a copy.
        if let (Some(v), Origin::Build { .. }) = (&self.version, &self.origin) {
            let _ = writeln!(s, "version = {}", quoted(v));
        }
        let modules: Vec<String> = self.modules.iter().map(|m| quoted(m)).collect();
        let _ = writeln!(s, "modules = [{}]", modules.join(", "));
        if !self.replace_in_tree.is_empty() {
            let r: Vec<String> = self.replace_in_tree.iter().map(|m| quoted(m)).collect();
            let _ = writeln!(s, "replace_in_tree = [{}]", r.join(", "));
        }
        match &self.origin {
            Origin::KvcLibrary(libs) => {
                let libs: Vec<String> = libs.iter().map(|l| quoted(&l.to_string_lossy())).collect();
                let _ = write!(s, "\n[hooks]\nkvc_library = [{}]\n", libs.join(", "));
            }
            Origin::Build { context, file } => {
                let _ = write!(
                    s,
                    "\n[image]\nref = {}\npull = \"never\"\n\n[build]\ncontext = {}\nfile = {}\n",
                    quoted(&self.image_ref()),
                    quoted(context),
                    quoted(file)
                );
                if self.version.is_some() {
                    s.push_str(
                        "args = { KVER = \"${KERNEL_FULL_VERSION}\", KMODVER = \"${MOD_VERSION}\" }\n",
                    );
                } else {
                    s.push_str("args = { KVER = \"${KERNEL_FULL_VERSION}\" }\n");
                }
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{PullPolicy, Source};

    const SIMPLE: &str = r#"KMOD_CONTAINER_BUILD_CONTEXT="https://github.com/kmods-via-containers/kvc-simple-kmod.git"
KMOD_CONTAINER_BUILD_FILE=Dockerfile.fedora
KMOD_SOFTWARE_VERSION=dd1a7d4
KMOD_NAMES="simple-kmod simple-procfs-kmod"
"#;

    fn conv(name: &str, text: &str, libs: &[PathBuf]) -> Conversion {
        convert(
            name,
            Path::new(&format!("/etc/kvc/{name}.conf")),
            text,
            libs,
        )
    }

    /// Renders and validates with kvcd's own validation.
    fn render(c: &Conversion) -> (String, crate::config::ModuleConfig) {
        let imported = c.result.as_ref().unwrap();
        let text = imported.to_toml(&c.notes);
        let file = PathBuf::from(format!("{}.toml", imported.name));
        // The library paths of these conversions are made up: check the file only.
        let cfg = crate::config::validate::module(
            &imported.name,
            &file,
            &text,
            crate::config::validate::Scope::Examples,
        )
        .unwrap_or_else(|e| panic!("{text}\n{e:?}"));
        (text, cfg)
    }

    #[test]
    fn a_version_kvcd_would_refuse_fails_the_conversion_with_the_line() {
        // Found by the kvc_import fuzz target: 131 characters.
        let long = format!("dd0a{}7d4", "q".repeat(124));
        let c = conv("simple-kmod", &SIMPLE.replace("dd1a7d4", &long), &[]);
        let e = c.result.unwrap_err();
        assert!(
            e.contains("KMOD_SOFTWARE_VERSION (line 3) cannot be the config's `version`: expected a version like"),
            "{e}"
        );
        let c = conv("simple-kmod", &SIMPLE.replace("dd1a7d4", "1..2"), &[]);
        assert!(c.result.is_err());
        let c = conv(
            "simple-kmod",
            &SIMPLE.replace("dd1a7d4", &"7".repeat(128)),
            &[],
        );
        render(&c);
    }

    #[test]
    fn reference_simple_kmod_becomes_an_image_build() {
        let c = conv("simple-kmod", SIMPLE, &[]);
        assert!(c.notes.is_empty(), "{:?}", c.notes);
        let (text, cfg) = render(&c);
        assert_eq!(cfg.version.as_deref(), Some("dd1a7d4"));
        assert_eq!(
            cfg.description.as_deref(),
            Some("imported from /etc/kvc/simple-kmod.conf")
        );
        let names: Vec<_> = cfg.modules.iter().map(ModName::as_str).collect();
        assert_eq!(names, ["simple_kmod", "simple_procfs_kmod"]);
        let Source::Image(img) = &cfg.source else {
            panic!("{text}")
        };
        assert_eq!(
            img.reference,
            "localhost/simple-kmod-${MOD_VERSION}:${KERNEL_FULL_VERSION}"
        );
        assert_eq!(img.pull, PullPolicy::Never);
        let b = img.build.as_ref().unwrap();
        assert_eq!(
            b.context,
            "https://github.com/kmods-via-containers/kvc-simple-kmod.git"
        );
        assert_eq!(b.file, "Dockerfile.fedora");
        assert_eq!(b.args["KVER"], "${KERNEL_FULL_VERSION}");
        assert_eq!(b.args["KMODVER"], "${MOD_VERSION}");
        assert!(
            text.starts_with("# Converted by `kvcctl import-kvc` from /etc/kvc/simple-kmod.conf\n")
        );
    }

    #[test]
    fn a_library_is_kept() {
        let libs = vec![
            PathBuf::from("/usr/local/lib/kvc/simple-kmod-lib.sh"),
            PathBuf::from("/usr/lib/kvc/simple-kmod-lib.sh"),
        ];
        let c = conv("simple-kmod", SIMPLE, &libs);
        let (text, cfg) = render(&c);
        let Source::KvcLibrary { libraries } = &cfg.source else {
            panic!("{text}")
        };
        assert_eq!(libraries, &libs);
        assert!(
            !text.contains("[image]") && !text.contains("[build]"),
            "{text}"
        );
        assert!(c.notes.iter().any(|n| n.contains("keep that file")));
        // The library owns its versions.
        assert!(cfg.version.is_none(), "{text}");
        assert!(!text.contains("\nversion ="), "{text}");
        assert!(
            c.notes.iter().any(|n| n
                == "KMOD_SOFTWARE_VERSION (dd1a7d4, line 3) is not written as `version`: the KVC library owns its versions and reads them from /etc/kvc/simple-kmod.conf"),
            "{:?}",
            c.notes
        );
    }

    #[test]
    fn a_runtime_other_than_podman_is_reported() {
        let lib = vec![PathBuf::from("/usr/lib/kvc/x-lib.sh")];
        let text = "KMOD_NAMES=a\nKVC_CONTAINER_RUNTIME=docker\n";
        let c = conv("x", text, &lib);
        let note = c
            .notes
            .iter()
            .find(|n| n.starts_with("KVC_CONTAINER_RUNTIME=docker (/etc/kvc/x.conf line 2): the KVC library reads this file"))
            .unwrap_or_else(|| panic!("{:?}", c.notes));
        assert!(note.contains("kvc_c_* helpers run docker"), "{note}");
        assert!(
            !c.notes.iter().any(|n| n.contains("not converted")),
            "{:?}",
            c.notes
        );

        // podman by name or path says nothing.
        for p in ["podman", "/usr/bin/podman"] {
            let c = conv(
                "x",
                &format!("KMOD_NAMES=a\nKVC_CONTAINER_RUNTIME={p}\n"),
                &lib,
            );
            assert!(
                !c.notes.iter().any(|n| n.contains("RUNTIME")),
                "{:?}",
                c.notes
            );
        }

        let fw = Path::new("/etc/kvc/kmods-via-containers.conf");
        let n = framework_runtime_note(fw, "KVC_CONTAINER_RUNTIME=\"docker\"\n", true).unwrap();
        assert!(
            n.starts_with("KVC_CONTAINER_RUNTIME=docker (/etc/kvc/kmods-via-containers.conf line 1): kvcd does not read this file and gives the KVC library podman"),
            "{n}"
        );
        let n = framework_runtime_note(fw, "KVC_CONTAINER_RUNTIME=docker\n", false).unwrap();
        assert!(
            n.contains("kvcd builds and runs driver images with podman"),
            "{n}"
        );
        assert!(framework_runtime_note(fw, "KVC_CONTAINER_RUNTIME=podman\n", true).is_none());
        assert!(framework_runtime_note(fw, "", true).is_none());
    }

    #[test]
    fn in_tree_modules_become_replace_in_tree() {
        let t = tempfile::tempdir().unwrap();
        let k = t.path().join("6.1.0-1-amd64");
        std::fs::create_dir_all(k.join("kernel/drivers/net/ethernet/intel/ice")).unwrap();
        std::fs::create_dir_all(k.join("kernel/fs")).unwrap();
        std::fs::write(
            k.join("kernel/drivers/net/ethernet/intel/ice/ice.ko.xz"),
            "",
        )
        .unwrap();
        std::fs::write(k.join("kernel/fs/simple_procfs-kmod.ko"), "").unwrap();
        std::fs::write(k.join("kernel/fs/not-a-module.txt"), "").unwrap();
        std::fs::write(
            k.join("modules.builtin"),
            "kernel/drivers/base/simple-builtin.ko\n",
        )
        .unwrap();
        let tree = InTree::read(&k).unwrap();
        let names: Vec<&str> = tree.loadable.iter().map(ModName::as_str).collect();
        assert_eq!(names, ["ice", "simple_procfs_kmod"]);

        let text = "KMOD_NAMES='ice simple-procfs-kmod simple-builtin other'\nKMOD_SOFTWARE_VERSION=1\nKMOD_CONTAINER_BUILD_CONTEXT=/s\nKMOD_CONTAINER_BUILD_FILE=f\n";
        let mut c = conv("ice", text, &[]);
        let mut imported = c.result.clone().unwrap();
        let notes = imported.replace_in_tree_of(&tree, "6.1.0-1-amd64");
        assert_eq!(
            notes,
            [
                "ice is also an in-tree module of 6.1.0-1-amd64; added replace_in_tree = [\"ice\"] so the out-of-tree one replaces it",
                "simple-procfs-kmod is also an in-tree module of 6.1.0-1-amd64; added replace_in_tree = [\"simple-procfs-kmod\"] so the out-of-tree one replaces it",
                "simple-builtin is built into kernel 6.1.0-1-amd64 (modules.builtin): it cannot be unloaded, so an out-of-tree simple-builtin cannot replace it there",
            ]
        );
        c.result = Ok(imported);
        let (_, cfg) = render(&c);
        let r: Vec<&str> = cfg.replace_in_tree.iter().map(ModName::as_str).collect();
        assert_eq!(r, ["ice", "simple_procfs_kmod"]);

        assert!(InTree::read(&t.path().join("absent")).is_err());
    }

    #[test]
    fn quoting_export_comments_and_expansion() {
        let text = "# header\n\
            export BASE='/srv/kvc'  # trailing comment\n\
            KMOD_CONTAINER_BUILD_CONTEXT=\"${BASE}/ice\"\n\
            KMOD_CONTAINER_BUILD_FILE=$BASE/ice/Containerfile.rhel\n\
            KMOD_SOFTWARE_VERSION=1.14.9 ; KMOD_NAMES=\"ice \\\n   ice-extra\"\n\
            KMOD_NAMES+=' x_y'\n\
            \n\
            OTHER=1\n";
        let c = conv("ice", text, &[]);
        let (_, cfg) = render(&c);
        let Source::Image(img) = &cfg.source else {
            panic!()
        };
        let b = img.build.as_ref().unwrap();
        assert_eq!(b.context, "/srv/kvc/ice");
        assert_eq!(b.file, "Containerfile.rhel");
        let names: Vec<_> = cfg.modules.iter().map(ModName::as_str).collect();
        assert_eq!(names, ["ice", "ice_extra", "x_y"]);
        // BASE was used by another value; OTHER is reported.
        assert_eq!(
            c.notes,
            ["OTHER (line 9) not converted: kvcd has no such setting"]
        );
    }

    #[test]
    fn escapes_in_values() {
        let p = ParsedConf::parse(
            "A=\"a \\\"q\\\" \\$x \\\\ \\n\"\nB='it''s'\\''ok'\nC=lit$\nD=\"$A\"\n",
        );
        assert_eq!(p.vars["A"].value, "a \"q\" $x \\ \\n");
        assert_eq!(p.vars["B"].value, "its'ok");
        assert_eq!(p.vars["C"].value, "lit$");
        assert_eq!(p.vars["D"].value, p.vars["A"].value);
        assert!(p.notes.is_empty(), "{:?}", p.notes);
    }

    #[test]
    fn unsupported_lines_are_reported_with_their_numbers() {
        let text = "A=1\n\
            KMOD_SOFTWARE_VERSION=$(git describe --tags)\n\
            B=`date`\n\
            C=${UNSET:-x}\n\
            D=$HOME\n\
            source /etc/other.conf\n\
            if [ -e /x ]; then\n\
              KMOD_NAMES=a\n\
            fi\n\
            E=$((1+2))\n\
            F=$KMOD_SOFTWARE_VERSION\n\
            G=(a b)\n\
            H=~/x\n\
            I=\"open\n";
        let p = ParsedConf::parse(text);
        let lines: Vec<&str> = p
            .notes
            .iter()
            .map(|n| n.split(':').next().unwrap())
            .collect();
        assert_eq!(
            lines,
            [
                "could not convert line 2",
                "could not convert line 3",
                "could not convert line 4",
                "could not convert line 5",
                "could not convert line 6",
                "could not convert lines 7-9",
                "could not convert line 10",
                "could not convert line 11",
                "could not convert line 12",
                "could not convert line 13",
                "could not convert line 14",
            ],
            "{:#?}",
            p.notes
        );
        assert!(
            p.notes[0].contains("command substitution"),
            "{}",
            p.notes[0]
        );
        assert!(p.notes[0].ends_with("KMOD_SOFTWARE_VERSION=$(git describe --tags)"));
        assert!(p.notes[3].contains("$HOME, which is not set earlier"));
        assert!(
            p.notes[7].contains("line 2 could not be converted"),
            "{}",
            p.notes[7]
        );
        assert!(!p.vars.contains_key("KMOD_NAMES"));
        assert_eq!(p.vars["A"].value, "1");
        assert_eq!(p.unreadable["KMOD_SOFTWARE_VERSION"], 2);
    }

    #[test]
    fn a_command_with_an_assignment_prefix_sets_nothing() {
        let p = ParsedConf::parse("KMOD_NAMES=a modprobe x\n");
        assert!(p.vars.is_empty());
        assert_eq!(p.notes.len(), 1);
        assert!(p.notes[0].contains("not a variable assignment"));
    }

    #[test]
    fn command_substitution_spanning_blanks_and_semicolons_is_one_statement() {
        let p = ParsedConf::parse("X=\"$(cd /a; echo \"b c\")\"\nKMOD_NAMES=m\n");
        assert_eq!(p.notes.len(), 1, "{:?}", p.notes);
        assert!(p.notes[0].starts_with("could not convert line 1: command substitution"));
        assert_eq!(p.vars["KMOD_NAMES"].value, "m");
    }

    #[test]
    fn missing_variables_name_each_one() {
        let c = conv(
            "broken",
            "KMOD_SOFTWARE_VERSION=1.0\nKMOD_NAMES=\"\"\n",
            &[],
        );
        let e = c.result.unwrap_err();
        assert!(e.contains("KMOD_NAMES is empty (line 2)"), "{e}");
        assert!(
            e.contains("KMOD_CONTAINER_BUILD_CONTEXT is not set and there is no KVC library"),
            "{e}"
        );
        assert!(e.contains("KMOD_CONTAINER_BUILD_FILE is not set"), "{e}");

        // A library needs only the modules.
        let c = conv(
            "lib",
            "KMOD_NAMES=m\n",
            &[PathBuf::from("/usr/lib/kvc/lib-lib.sh")],
        );
        let (text, cfg) = render(&c);
        assert!(cfg.version.is_none(), "{text}");
        assert!(
            !c.notes.iter().any(|n| n.contains("version")),
            "{:?}",
            c.notes
        );
    }

    #[test]
    fn an_unreadable_names_line_is_named_in_the_error() {
        let c = conv(
            "x",
            "KMOD_NAMES=$(ls /lib)\n",
            &[PathBuf::from("/l/x-lib.sh")],
        );
        let e = c.result.unwrap_err();
        assert!(e.contains("KMOD_NAMES could not be read (line 1)"), "{e}");
        assert_eq!(c.notes.len(), 2, "{:?}", c.notes);
    }

    #[test]
    fn extra_names_are_reported_not_loaded() {
        let text = format!("{SIMPLE}KMOD_EXTRA_NAMES=\"auxiliary  gnss\"\n");
        let c = conv("ice", &text, &[]);
        let (_, cfg) = render(&c);
        assert_eq!(cfg.modules.len(), 2);
        assert_eq!(
            c.notes,
            [
                "KMOD_EXTRA_NAMES (auxiliary gnss) not converted: kvcd loads in-tree dependencies itself; list any that are not dependencies in `modules`"
            ]
        );
    }

    #[test]
    fn bad_values_are_errors_not_invalid_files() {
        for (text, want) in [
            ("KMOD_NAMES=\"a b.ko\"\n", "may only hold"),
            (
                "KMOD_NAMES=a\nKMOD_SOFTWARE_VERSION=V1\n",
                "not a valid image repository name",
            ),
            (
                "KMOD_NAMES=a\nKMOD_CONTAINER_BUILD_CONTEXT=src\n",
                "neither an absolute directory",
            ),
            (
                "KMOD_NAMES=a\nKMOD_CONTAINER_BUILD_CONTEXT='/s/${X}'\n",
                "template variable",
            ),
            (
                "KMOD_NAMES=a\nKMOD_CONTAINER_BUILD_FILE=../f\n",
                "inside the build context",
            ),
            (
                "KMOD_NAMES=a\nKMOD_CONTAINER_BUILD_FILE=/other/f\n",
                "inside the build context",
            ),
            // What validation refuses as `build.file` (found by fuzzing:
            // NULs in the name made a config that failed validation).
            (
                "KMOD_NAMES=a\nKMOD_CONTAINER_BUILD_FILE='Containe\0\0rfile.rhel'\n",
                "inside the build context",
            ),
            (
                "KMOD_NAMES=a\nKMOD_CONTAINER_BUILD_FILE=-f\n",
                "inside the build context",
            ),
            (
                "KMOD_NAMES=a\nKMOD_CONTAINER_BUILD_CONTEXT=/s\nKMOD_CONTAINER_BUILD_FILE=/s/\n",
                "inside the build context",
            ),
        ] {
            let e = conv("x", text, &[]).result.unwrap_err();
            assert!(e.contains(want), "{text}: {e}");
        }
        let e = conv("bad name", "KMOD_NAMES=a\n", &[PathBuf::from("/l")])
            .result
            .unwrap_err();
        assert!(e.contains("module config name"), "{e}");
    }

    #[test]
    fn absolute_containerfile_inside_a_directory_context_becomes_relative() {
        let text = "KMOD_NAMES=a\nKMOD_CONTAINER_BUILD_CONTEXT=/srv/a/\nKMOD_CONTAINER_BUILD_FILE=/srv/a/sub/Containerfile\n";
        let c = conv("a", text, &[]);
        let (_, cfg) = render(&c);
        let Source::Image(img) = &cfg.source else {
            panic!()
        };
        assert_eq!(img.build.as_ref().unwrap().file, "sub/Containerfile");
        assert_eq!(img.reference, "localhost/a:${KERNEL_FULL_VERSION}");
        assert!(!img.build.as_ref().unwrap().args.contains_key("KMODVER"));
    }

    #[test]
    fn awkward_characters_are_escaped() {
        let text = "KMOD_NAMES='a-b c_d'\nKMOD_SOFTWARE_VERSION='1.0'\nKMOD_CONTAINER_BUILD_CONTEXT='/srv/we\"ird \\path'\"'\"'s'\nKMOD_CONTAINER_BUILD_FILE='Containerfile'\nZ=\u{1}$(x)\n";
        let c = conv("odd", text, &[]);
        let (rendered, cfg) = render(&c);
        let Source::Image(img) = &cfg.source else {
            panic!()
        };
        assert_eq!(img.build.as_ref().unwrap().context, "/srv/we\"ird \\path's");
        // Notes go into comments without control characters.
        assert!(
            rendered
                .lines()
                .all(|l| !l.chars().any(|c| c.is_control() && c != '\t'))
        );
        let lib = vec![PathBuf::from("/opt/kvc \"x\"/odd-lib.sh")];
        let c = conv("odd", text, &lib);
        let (_, cfg) = render(&c);
        assert!(matches!(cfg.source, Source::KvcLibrary { ref libraries } if *libraries == lib));
    }
}
