//! A small safe wrapper over libkmod (`kmod-sys`).
//!
//! The `kmod` crate covers too little of libkmod for us (no module info, no
//! init state) and reads `errno` where libkmod returns the error code, so we
//! wrap the calls we need here, in one place.

use std::ffi::{CStr, CString, OsStr};
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Path, PathBuf};
use std::ptr::{self, NonNull};

use kmod_sys as sys;
use nix::errno::Errno;

/// A libkmod context: one module directory plus the modprobe.d configuration.
#[derive(Debug)]
pub(crate) struct Ctx(NonNull<sys::kmod_ctx>);

impl Drop for Ctx {
    fn drop(&mut self) {
        // SAFETY: we own one reference taken in `Ctx::new`.
        unsafe { sys::kmod_unref(self.0.as_ptr()) };
    }
}

fn cstring(bytes: &[u8]) -> Result<CString, Errno> {
    CString::new(bytes).map_err(|_| Errno::EINVAL)
}

/// Converts a libkmod return code (negative errno) into a result.
fn check(ret: i32) -> Result<i32, Errno> {
    if ret < 0 {
        Err(Errno::from_raw(-ret))
    } else {
        Ok(ret)
    }
}

/// # Safety
/// `p` must be null or a valid NUL-terminated string that outlives the call.
unsafe fn string(p: *const libc::c_char) -> Option<String> {
    if p.is_null() {
        None
    } else {
        // SAFETY: the caller guarantees `p` is a valid C string.
        Some(unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
    }
}

/// Takes the modules out of a libkmod list and frees the list.
///
/// # Safety
/// `list` must be null or a list of modules returned by libkmod that we own.
unsafe fn take_modules(list: *mut sys::kmod_list) -> Vec<Module> {
    let mut out = Vec::new();
    let mut it = list;
    while !it.is_null() {
        // SAFETY: `it` is an entry of `list`; get_module returns a new reference we own.
        let m = unsafe { sys::kmod_module_get_module(it) };
        if let Some(m) = NonNull::new(m) {
            out.push(Module(m));
        }
        // SAFETY: `list` and `it` are valid; returns null at the end.
        it = unsafe { sys::kmod_list_next(list, it) };
    }
    // SAFETY: we own `list`; the modules taken above hold their own references.
    unsafe { sys::kmod_module_unref_list(list) };
    out
}

impl Ctx {
    /// A context over `dir` (a `lib/modules/KERNEL` directory), or the running kernel's when `None`.
    /// libkmod's own logging is silenced: callers turn errors into messages.
    pub(crate) fn new(dir: Option<&Path>) -> Result<Self, Errno> {
        let dir = dir.map(|d| cstring(d.as_os_str().as_bytes())).transpose()?;
        let p = dir.as_ref().map_or(ptr::null(), |d| d.as_ptr());
        // SAFETY: `p` is null or a valid C string; a null config list means the defaults.
        let ctx = unsafe { sys::kmod_new(p, ptr::null()) };
        let ctx = NonNull::new(ctx).ok_or(Errno::ENOMEM)?;
        // SAFETY: `ctx` is valid.
        unsafe { sys::kmod_set_log_priority(ctx.as_ptr(), 0) };
        Ok(Self(ctx))
    }

    /// The modules an alias or name resolves to through `modules.dep`/`modules.alias`.
    pub(crate) fn lookup(&self, name: &str) -> Result<Vec<Module>, Errno> {
        let name = cstring(name.as_bytes())?;
        let mut list = ptr::null_mut();
        // SAFETY: valid context and string; `list` receives a list we own.
        check(unsafe {
            sys::kmod_module_new_from_lookup(self.0.as_ptr(), name.as_ptr(), &mut list)
        })?;
        // SAFETY: `list` came from libkmod and is ours.
        Ok(unsafe { take_modules(list) })
    }

    /// A module handle by name (not necessarily loaded or existing).
    pub(crate) fn by_name(&self, name: &str) -> Result<Module, Errno> {
        let name = cstring(name.as_bytes())?;
        let mut m = ptr::null_mut();
        // SAFETY: valid context and string; `m` receives a reference we own.
        check(unsafe { sys::kmod_module_new_from_name(self.0.as_ptr(), name.as_ptr(), &mut m) })?;
        NonNull::new(m).map(Module).ok_or(Errno::ENOENT)
    }

    /// A module handle for the file at `path`.
    pub(crate) fn by_path(&self, path: &Path) -> Result<Module, Errno> {
        let path = cstring(path.as_os_str().as_bytes())?;
        let mut m = ptr::null_mut();
        // SAFETY: valid context and string; `m` receives a reference we own.
        check(unsafe { sys::kmod_module_new_from_path(self.0.as_ptr(), path.as_ptr(), &mut m) })?;
        NonNull::new(m).map(Module).ok_or(Errno::ENOENT)
    }
}

/// Where a module is in its life, as `/sys/module/NAME/initstate` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum InitState {
    /// Built into the kernel image.
    Builtin,
    /// Loaded and initialised.
    Live,
    /// Being initialised.
    Coming,
    /// Being removed.
    Going,
}

/// A reference to one libkmod module.
#[derive(Debug)]
pub(crate) struct Module(NonNull<sys::kmod_module>);

impl Drop for Module {
    fn drop(&mut self) {
        // SAFETY: we own one reference.
        unsafe { sys::kmod_module_unref(self.0.as_ptr()) };
    }
}

impl Module {
    fn ptr(&self) -> *mut sys::kmod_module {
        self.0.as_ptr()
    }

    /// The module name (canonical, `_` form).
    pub(crate) fn name(&self) -> String {
        // SAFETY: the name lives as long as the module.
        unsafe { string(sys::kmod_module_get_name(self.ptr())) }.unwrap_or_default()
    }

    /// The file path from the index, or `None` for built-in or unknown modules.
    pub(crate) fn path(&self) -> Option<PathBuf> {
        // SAFETY: the path lives as long as the module.
        let p = unsafe { sys::kmod_module_get_path(self.ptr()) };
        if p.is_null() {
            return None;
        }
        // SAFETY: non-null C string owned by the module.
        let bytes = unsafe { CStr::from_ptr(p) }.to_bytes();
        Some(PathBuf::from(OsStr::from_bytes(bytes)))
    }

    /// The init state, or `None` when the module is not in the kernel.
    pub(crate) fn initstate(&self) -> Option<InitState> {
        // SAFETY: valid module.
        let s = unsafe { sys::kmod_module_get_initstate(self.ptr()) };
        match u32::try_from(s).ok()? {
            sys::kmod_module_initstate_KMOD_MODULE_BUILTIN => Some(InitState::Builtin),
            sys::kmod_module_initstate_KMOD_MODULE_LIVE => Some(InitState::Live),
            sys::kmod_module_initstate_KMOD_MODULE_COMING => Some(InitState::Coming),
            sys::kmod_module_initstate_KMOD_MODULE_GOING => Some(InitState::Going),
            _ => None,
        }
    }

    /// The kernel's reference count, when loaded.
    pub(crate) fn refcount(&self) -> Option<i32> {
        // SAFETY: valid module.
        check(unsafe { sys::kmod_module_get_refcnt(self.ptr()) }).ok()
    }

    /// Loaded modules that use this one.
    pub(crate) fn holders(&self) -> Vec<Module> {
        // SAFETY: returns a list we own (or null).
        unsafe { take_modules(sys::kmod_module_get_holders(self.ptr())) }
    }

    /// Direct dependencies from `modules.dep`.
    pub(crate) fn dependencies(&self) -> Vec<Module> {
        // SAFETY: returns a list we own (or null).
        unsafe { take_modules(sys::kmod_module_get_dependencies(self.ptr())) }
    }

    /// Options for this module from modprobe.d (`options NAME …`).
    pub(crate) fn options(&self) -> Option<String> {
        // SAFETY: the string lives as long as the module.
        unsafe { string(sys::kmod_module_get_options(self.ptr())) }
    }

    /// Inserts the module file with `options` (space-separated `name=value`).
    pub(crate) fn insert(&self, options: &str) -> Result<(), Errno> {
        let opts = cstring(options.as_bytes())?;
        // SAFETY: valid module and string.
        check(unsafe { sys::kmod_module_insert_module(self.ptr(), 0, opts.as_ptr()) }).map(drop)
    }

    /// Removes the module from the kernel; `force` sets O_TRUNC (needs CONFIG_MODULE_FORCE_UNLOAD).
    pub(crate) fn remove(&self, force: bool) -> Result<(), Errno> {
        let mut flags = sys::kmod_remove_KMOD_REMOVE_NOLOG;
        if force {
            flags |= sys::kmod_remove_KMOD_REMOVE_FORCE;
        }
        // SAFETY: valid module.
        check(unsafe { sys::kmod_module_remove_module(self.ptr(), flags) }).map(drop)
    }
}
