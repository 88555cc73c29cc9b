//! Thin zbus adapters: the agent's published [`Snapshot`] as D-Bus objects
//! and properties, D-Bus calls as agent requests.
//!
//! Name `org.kvcd.Kvcd1`; manager `/org/kvcd/Kvcd1` (`org.kvcd.Kvcd1.Manager`,
//! plus `org.freedesktop.DBus.ObjectManager`); one object per module config
//! at `/org/kvcd/Kvcd1/module/<escaped name>` (`org.kvcd.Kvcd1.Module`), whose
//! properties change (with `PropertiesChanged`) on every transition.

pub mod proxy;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;
use zbus::message::Header;
use zbus::object_server::SignalEmitter;
use zbus::zvariant::OwnedObjectPath;
use zbus::{Connection, ObjectServer, interface};

use crate::reconciler::agent::{AgentError, Handle, Request};
use crate::reconciler::status::{ModuleStatus, Snapshot};

/// The bus name kvcd owns.
pub const BUS_NAME: &str = "org.kvcd.Kvcd1";
/// The manager object.
pub const MANAGER_PATH: &str = "/org/kvcd/Kvcd1";
/// Parent of the module objects.
const MODULE_PREFIX: &str = "/org/kvcd/Kvcd1/module/";

/// Errors with stable D-Bus names (`org.kvcd.Kvcd1.Error.*`).
#[derive(Debug, zbus::DBusError)]
#[zbus(prefix = "org.kvcd.Kvcd1.Error")]
pub enum Error {
    /// A bus-level failure.
    #[zbus(error)]
    ZBus(zbus::Error),
    /// No module config by that name.
    NotFound(String),
    /// The module config is invalid.
    InvalidConfig(String),
    /// The caller may not change anything.
    AccessDenied(String),
    /// kvcd is stopping.
    ShuttingDown(String),
}

impl From<AgentError> for Error {
    fn from(e: AgentError) -> Self {
        match e {
            AgentError::NotFound(_) => Self::NotFound(e.to_string()),
            AgentError::InvalidConfig(_) => Self::InvalidConfig(e.to_string()),
            AgentError::ShuttingDown => Self::ShuttingDown(e.to_string()),
        }
    }
}

/// The object path of module config `name`: bytes other than letters and digits become `_XX`.
pub fn module_path(name: &str) -> OwnedObjectPath {
    let mut p = String::from(MODULE_PREFIX);
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() {
            p.push(char::from(b));
        } else {
            p.push_str(&format!("_{b:02x}"));
        }
    }
    OwnedObjectPath::try_from(p).unwrap_or_else(|_| {
        OwnedObjectPath::from(zbus::zvariant::ObjectPath::from_static_str_unchecked(
            MODULE_PREFIX.trim_end_matches('/'),
        ))
    })
}

/// Refuses callers other than root (the bus policy refuses them first; this is the second line).
async fn require_root(conn: &Connection, hdr: &Header<'_>) -> Result<(), Error> {
    let sender = hdr
        .sender()
        .ok_or_else(|| Error::AccessDenied("the call has no sender".to_owned()))?;
    let uid = zbus::fdo::DBusProxy::new(conn)
        .await?
        .get_connection_unix_user(sender.clone().into())
        .await
        .map_err(zbus::Error::from)?;
    if uid != 0 {
        return Err(Error::AccessDenied(format!(
            "uid {uid} may not change kvcd's state; only root may"
        )));
    }
    Ok(())
}

struct Manager {
    agent: Handle,
    /// What the objects on the bus show (updated after they are registered,
    /// so `ListModules` never names an object that is not there yet).
    shown: Arc<Mutex<Arc<Snapshot>>>,
}

impl Manager {
    fn shown(&self) -> Arc<Snapshot> {
        self.shown
            .lock()
            .map_or_else(|p| p.into_inner().clone(), |g| g.clone())
    }
}

impl Manager {
    async fn call(&self, conn: &Connection, hdr: &Header<'_>, req: Request) -> Result<u64, Error> {
        require_root(conn, hdr).await?;
        Ok(self.agent.request(req).await?)
    }
}

#[interface(name = "org.kvcd.Kvcd1.Manager")]
impl Manager {
    /// Every module config: name, object path and state.
    async fn list_modules(&self) -> Vec<(String, OwnedObjectPath, String)> {
        self.shown()
            .modules
            .values()
            .map(|m| (m.name.clone(), module_path(&m.name), m.state.to_string()))
            .collect()
    }

    /// Wants `name` loaded and loads it; returns its object and the operation number to wait for (`CompletedOp`).
    async fn load(
        &self,
        name: String,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] hdr: Header<'_>,
    ) -> Result<(OwnedObjectPath, u64), Error> {
        let op = self.call(conn, &hdr, Request::Load(name.clone())).await?;
        Ok((module_path(&name), op))
    }

    /// Wants `name` unloaded and unloads it; returns its object and the operation number.
    async fn unload(
        &self,
        name: String,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] hdr: Header<'_>,
    ) -> Result<(OwnedObjectPath, u64), Error> {
        let op = self.call(conn, &hdr, Request::Unload(name.clone())).await?;
        Ok((module_path(&name), op))
    }

    /// Unloads `name`, fetches its artifacts again and loads them.
    async fn reload(
        &self,
        name: String,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] hdr: Header<'_>,
    ) -> Result<(OwnedObjectPath, u64), Error> {
        let op = self.call(conn, &hdr, Request::Reload(name.clone())).await?;
        Ok((module_path(&name), op))
    }

    /// Reads every configuration file again.
    async fn reload_config(
        &self,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] hdr: Header<'_>,
    ) -> Result<(), Error> {
        self.call(conn, &hdr, Request::ReloadConfig).await.map(drop)
    }

    /// Fetches and verifies every valid module config for `kernel` (in the background; see the journal).
    async fn prepare(
        &self,
        kernel: String,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] hdr: Header<'_>,
    ) -> Result<(), Error> {
        self.call(conn, &hdr, Request::Prepare(kernel))
            .await
            .map(drop)
    }

    /// kvcd's version.
    #[zbus(property)]
    fn version(&self) -> String {
        self.shown().version.clone()
    }

    /// The running kernel.
    #[zbus(property)]
    fn kernel(&self) -> String {
        self.shown().kernel.clone()
    }

    /// The module config objects.
    #[zbus(property)]
    fn modules(&self) -> Vec<OwnedObjectPath> {
        self.shown()
            .modules
            .keys()
            .map(|n| module_path(n))
            .collect()
    }

    /// Problems outside the module configs (a broken kvcd.toml).
    #[zbus(property)]
    fn errors(&self) -> Vec<String> {
        self.shown().errors.clone()
    }
}

struct ModuleObject {
    s: ModuleStatus,
}

#[interface(name = "org.kvcd.Kvcd1.Module")]
impl ModuleObject {
    /// Module config name.
    #[zbus(property)]
    fn name(&self) -> String {
        self.s.name.clone()
    }
    /// inactive, fetching, verifying, loading, loaded, unloading, failed, busy, unsupported or invalid.
    #[zbus(property)]
    fn state(&self) -> String {
        self.s.state.to_string()
    }
    /// The step under way or that failed.
    #[zbus(property)]
    fn step(&self) -> String {
        self.s.step.clone()
    }
    /// The last error; empty when none.
    #[zbus(property)]
    fn error(&self) -> String {
        self.s.error.clone()
    }
    /// The kernel.
    #[zbus(property)]
    fn kernel(&self) -> String {
        self.s.kernel.clone()
    }
    /// Driver image reference; empty for other sources.
    #[zbus(property)]
    fn image(&self) -> String {
        self.s.image.clone()
    }
    /// Driver image digest.
    #[zbus(property)]
    fn image_digest(&self) -> String {
        self.s.image_digest.clone()
    }
    /// Modules loaded for this config.
    #[zbus(property)]
    fn loaded_modules(&self) -> Vec<String> {
        self.s.loaded_modules.clone()
    }
    /// Seconds since the epoch when the state last changed.
    #[zbus(property)]
    fn since(&self) -> u64 {
        self.s.since
    }
    /// Seconds since the epoch of the next retry; 0 when none.
    #[zbus(property)]
    fn next_retry(&self) -> u64 {
        self.s.next_retry
    }
    /// The config file in effect.
    #[zbus(property)]
    fn config_file(&self) -> String {
        self.s.config_file.clone()
    }
    /// True when the admin wants it loaded.
    #[zbus(property)]
    fn wanted(&self) -> bool {
        self.s.wanted
    }
    /// Number of the last operation started.
    #[zbus(property)]
    fn started_op(&self) -> u64 {
        self.s.started_op
    }
    /// Number of the last operation finished.
    #[zbus(property)]
    fn completed_op(&self) -> u64 {
        self.s.completed_op
    }
}

/// Emits `PropertiesChanged` for every property that differs between `old` and `new`.
async fn emit_changes(
    obj: &ModuleObject,
    old: &ModuleStatus,
    e: &SignalEmitter<'_>,
) -> zbus::Result<()> {
    let new = &obj.s;
    if old.state != new.state {
        obj.state_changed(e).await?;
    }
    if old.step != new.step {
        obj.step_changed(e).await?;
    }
    if old.error != new.error {
        obj.error_changed(e).await?;
    }
    if old.kernel != new.kernel {
        obj.kernel_changed(e).await?;
    }
    if old.image != new.image {
        obj.image_changed(e).await?;
    }
    if old.image_digest != new.image_digest {
        obj.image_digest_changed(e).await?;
    }
    if old.loaded_modules != new.loaded_modules {
        obj.loaded_modules_changed(e).await?;
    }
    if old.since != new.since {
        obj.since_changed(e).await?;
    }
    if old.next_retry != new.next_retry {
        obj.next_retry_changed(e).await?;
    }
    if old.config_file != new.config_file {
        obj.config_file_changed(e).await?;
    }
    if old.wanted != new.wanted {
        obj.wanted_changed(e).await?;
    }
    if old.started_op != new.started_op {
        obj.started_op_changed(e).await?;
    }
    if old.completed_op != new.completed_op {
        obj.completed_op_changed(e).await?;
    }
    Ok(())
}

async fn sync(
    server: &ObjectServer,
    shown: &mut BTreeMap<String, ModuleStatus>,
    snap: &Snapshot,
) -> zbus::Result<bool> {
    let mut set_changed = false;
    for (name, st) in &snap.modules {
        let path = module_path(name);
        match shown.get(name) {
            None => {
                server.at(&path, ModuleObject { s: st.clone() }).await?;
                set_changed = true;
            }
            Some(old) if old != st => {
                let iface = server.interface::<_, ModuleObject>(&path).await?;
                let mut obj = iface.get_mut().await;
                obj.s = st.clone();
                emit_changes(&obj, old, iface.signal_emitter()).await?;
            }
            Some(_) => {}
        }
        shown.insert(name.clone(), st.clone());
    }
    let gone: Vec<String> = shown
        .keys()
        .filter(|n| !snap.modules.contains_key(*n))
        .cloned()
        .collect();
    for name in gone {
        server
            .remove::<ModuleObject, _>(&module_path(&name))
            .await?;
        shown.remove(&name);
        set_changed = true;
    }
    Ok(set_changed)
}

/// Serves the agent on `conn` until the agent stops publishing; requests the bus name once the objects exist.
pub async fn serve(
    conn: &Connection,
    agent: Handle,
    mut status: watch::Receiver<Arc<Snapshot>>,
) -> zbus::Result<()> {
    let server = conn.object_server();
    server.at(MANAGER_PATH, zbus::fdo::ObjectManager).await?;
    let shown_snapshot = Arc::new(Mutex::new(Arc::new(Snapshot::default())));
    server
        .at(
            MANAGER_PATH,
            Manager {
                agent,
                shown: shown_snapshot.clone(),
            },
        )
        .await?;
    let mut shown = BTreeMap::new();
    let mut first = true;
    loop {
        let snap = status.borrow_and_update().clone();
        let set_changed = sync(server, &mut shown, &snap).await?;
        if let Ok(mut g) = shown_snapshot.lock() {
            *g = snap;
        }
        if first {
            conn.request_name(BUS_NAME).await?;
            first = false;
        } else if set_changed {
            let iface = server.interface::<_, Manager>(MANAGER_PATH).await?;
            iface
                .get()
                .await
                .modules_changed(iface.signal_emitter())
                .await?;
        }
        if status.changed().await.is_err() {
            break;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::module_path;

    #[test]
    fn module_paths_escape_like_systemd() {
        assert_eq!(
            module_path("simple-kmod").as_str(),
            "/org/kvcd/Kvcd1/module/simple_2dkmod"
        );
        assert_eq!(
            module_path("a.b_c").as_str(),
            "/org/kvcd/Kvcd1/module/a_2eb_5fc"
        );
        assert_eq!(module_path("Ice2").as_str(), "/org/kvcd/Kvcd1/module/Ice2");
    }
}
