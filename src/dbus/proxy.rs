//! Client side of kvcd's D-Bus API (used by `kvcctl`).

use zbus::proxy;
use zbus::zvariant::OwnedObjectPath;

/// `org.kvcd.Kvcd1.Manager`.
#[proxy(
    interface = "org.kvcd.Kvcd1.Manager",
    default_service = "org.kvcd.Kvcd1",
    default_path = "/org/kvcd/Kvcd1"
)]
pub trait Manager {
    /// Every module config: name, object path and state.
    fn list_modules(&self) -> zbus::Result<Vec<(String, OwnedObjectPath, String)>>;
    /// Load; returns the object and the operation number.
    fn load(&self, name: &str) -> zbus::Result<(OwnedObjectPath, u64)>;
    /// Unload; returns the object and the operation number.
    fn unload(&self, name: &str) -> zbus::Result<(OwnedObjectPath, u64)>;
    /// Reload; returns the object and the operation number.
    fn reload(&self, name: &str) -> zbus::Result<(OwnedObjectPath, u64)>;
    /// Re-read the configuration.
    fn reload_config(&self) -> zbus::Result<()>;
    /// Prepare every valid config for `kernel`.
    fn prepare(&self, kernel: &str) -> zbus::Result<()>;
    /// kvcd's version.
    #[zbus(property)]
    fn version(&self) -> zbus::Result<String>;
    /// The running kernel.
    #[zbus(property)]
    fn kernel(&self) -> zbus::Result<String>;
    /// Module config objects.
    #[zbus(property)]
    fn modules(&self) -> zbus::Result<Vec<OwnedObjectPath>>;
    /// Problems outside the module configs.
    #[zbus(property)]
    fn errors(&self) -> zbus::Result<Vec<String>>;
}

/// `org.kvcd.Kvcd1.Module`.
#[proxy(
    interface = "org.kvcd.Kvcd1.Module",
    default_service = "org.kvcd.Kvcd1"
)]
pub trait Module {
    /// Module config name.
    #[zbus(property)]
    fn name(&self) -> zbus::Result<String>;
    /// State.
    #[zbus(property)]
    fn state(&self) -> zbus::Result<String>;
    /// Step.
    #[zbus(property)]
    fn step(&self) -> zbus::Result<String>;
    /// Error.
    #[zbus(property)]
    fn error(&self) -> zbus::Result<String>;
    /// Kernel.
    #[zbus(property)]
    fn kernel(&self) -> zbus::Result<String>;
    /// Image.
    #[zbus(property)]
    fn image(&self) -> zbus::Result<String>;
    /// Image digest.
    #[zbus(property)]
    fn image_digest(&self) -> zbus::Result<String>;
    /// Loaded modules.
    #[zbus(property)]
    fn loaded_modules(&self) -> zbus::Result<Vec<String>>;
    /// Since.
    #[zbus(property)]
    fn since(&self) -> zbus::Result<u64>;
    /// Next retry.
    #[zbus(property)]
    fn next_retry(&self) -> zbus::Result<u64>;
    /// Config file.
    #[zbus(property)]
    fn config_file(&self) -> zbus::Result<String>;
    /// Wanted.
    #[zbus(property)]
    fn wanted(&self) -> zbus::Result<bool>;
    /// Last operation started.
    #[zbus(property)]
    fn started_op(&self) -> zbus::Result<u64>;
    /// Last operation finished.
    #[zbus(property)]
    fn completed_op(&self) -> zbus::Result<u64>;
}
