//! Client side of kvcd's D-Bus API (used by `kvcctl`). Module objects are
//! read with `GetAll` (one) or `GetManagedObjects` (all) and
//! [`super::module_status`], from the same list of
//! fields the daemon serves.

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
    /// Readiness of the wanted configs for the kernels the node may boot next, as JSON.
    fn check_next(&self) -> zbus::Result<String>;
    /// Prepare configs for the kernels the node may boot next; the report as JSON.
    fn prepare_next(&self, sysroot: &str, names: &[String]) -> zbus::Result<String>;
    /// The kernels the node may boot next and each config's readiness.
    #[zbus(property)]
    fn next_kernels(&self) -> zbus::Result<Vec<crate::reconciler::status::NextKernelWire>>;
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
