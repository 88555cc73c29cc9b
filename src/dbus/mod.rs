//! Thin zbus adapters: the agent's published [`Snapshot`] as D-Bus objects
//! and properties, D-Bus calls as agent requests.
//!
//! Name `org.kvcd.Kvcd1`; manager `/org/kvcd/Kvcd1` (`org.kvcd.Kvcd1.Manager`,
//! plus `org.freedesktop.DBus.ObjectManager`); one object per module config
//! at `/org/kvcd/Kvcd1/module/<escaped name>` (`org.kvcd.Kvcd1.Module`), whose
//! properties change (with `PropertiesChanged`) on every transition.

pub mod proxy;

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::Context as _;

use tokio::sync::watch;
use zbus::message::Header;
use zbus::names::InterfaceName;
use zbus::object_server::SignalEmitter;
use zbus::zvariant::{OwnedObjectPath, OwnedValue, Value};
use zbus::{Connection, ObjectServer, interface};

use crate::reconciler::agent::{AgentError, Handle, Request};
use crate::reconciler::status::{
    ModuleStatus, NextKernelWire, Snapshot, Wire, module_status_fields,
};

/// The bus name kvcd owns.
pub const BUS_NAME: &str = "org.kvcd.Kvcd1";
/// The manager object.
pub const MANAGER_PATH: &str = "/org/kvcd/Kvcd1";
/// The interface of the manager object.
pub const MANAGER_INTERFACE: &str = "org.kvcd.Kvcd1.Manager";
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
    /// What the agent publishes and what is on the bus, to answer
    /// `ReloadConfig` once the new configuration is on the bus.
    published: watch::Receiver<Arc<Snapshot>>,
    exported: watch::Receiver<Arc<Snapshot>>,
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

    /// Reads every configuration file again; answers once the objects show it.
    async fn reload_config(
        &self,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] hdr: Header<'_>,
    ) -> Result<(), Error> {
        self.call(conn, &hdr, Request::ReloadConfig).await?;
        until_exported(&mut self.published.clone(), &mut self.exported.clone()).await;
        Ok(())
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

    /// Looks for the kernels the node may boot next and reads every wanted
    /// config's readiness for each (nothing is fetched); answers with the
    /// report as JSON, and `NextKernels` shows it.
    async fn check_next(&self) -> Result<String, Error> {
        Ok(self
            .agent
            .next(PathBuf::from("/"), Vec::new(), false)
            .await?)
    }

    /// Prepares `names` (the wanted configs when empty) for every kernel the
    /// node may boot next under `sysroot` (`/` for the node); answers when
    /// done with the report as JSON.
    async fn prepare_next(
        &self,
        sysroot: String,
        names: Vec<String>,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] hdr: Header<'_>,
    ) -> Result<String, Error> {
        require_root(conn, &hdr).await?;
        Ok(self.agent.next(PathBuf::from(sysroot), names, true).await?)
    }

    /// The kernels the node may boot next: release, role (`next` or
    /// `fallback`), where it was found, whether every wanted config is
    /// ready, and per config its name, state (`ready`, `not-prepared`,
    /// `failed`, `not-applicable`) and why.
    #[zbus(property)]
    fn next_kernels(&self) -> Vec<NextKernelWire> {
        self.shown().next.clone()
    }

    /// Module signing, as text fields: `signing` (on/off), `key`, `cert`,
    /// `subject`, `key id`, `serial`, `hash`, `error`, `trusted by` (the
    /// running kernel's keyrings holding the cert, or `none`), `lockdown`,
    /// `sig_enforce`, `secure boot`, `signatures enforced`.
    #[zbus(property)]
    fn signing(&self) -> HashMap<String, String> {
        self.shown()
            .signing
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
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

/// The interface of the module objects.
pub const MODULE_INTERFACE: &str = "org.kvcd.Kvcd1.Module";

struct ModuleObject {
    s: ModuleStatus,
}

/// Generates, from the one list of status fields, the module object's
/// properties, the values of those that changed, and the client's reading.
macro_rules! module_properties {
    ($( $(#[$doc:meta])* $field:ident : $ty:ty => $wire:ty, $prop:literal; )*) => {
        #[interface(name = "org.kvcd.Kvcd1.Module")]
        impl ModuleObject {
            $(
                $(#[$doc])*
                #[zbus(property)]
                fn $field(&self) -> $wire {
                    Wire::<$wire>::to_wire(&self.s.$field)
                }
            )*
        }

        /// The D-Bus property names of a module object, in field order.
        pub const MODULE_PROPERTIES: &[&str] = &[$($prop),*];

        /// The properties whose values differ between `old` and `new`, with their new values.
        fn changed_properties(old: &ModuleStatus, new: &ModuleStatus) -> HashMap<&'static str, Value<'static>> {
            let mut changed = HashMap::new();
            $(
                if old.$field != new.$field {
                    changed.insert($prop, Value::from(Wire::<$wire>::to_wire(&new.$field)));
                }
            )*
            changed
        }

        /// A module object's status from its properties (as `GetAll` returns them).
        pub fn module_status(mut props: HashMap<String, OwnedValue>) -> anyhow::Result<ModuleStatus> {
            Ok(ModuleStatus {
                $(
                    $field: {
                        let v = props
                            .remove($prop)
                            .with_context(|| format!("the module object has no property {}", $prop))?;
                        let w = <$wire>::try_from(v)
                            .with_context(|| format!("property {}", $prop))?;
                        Wire::<$wire>::from_wire(w)
                    },
                )*
            })
        }
    };
}
module_status_fields!(module_properties);

/// Emits one `PropertiesChanged` with every property that differs between `old` and `new`.
async fn emit_changes(
    old: &ModuleStatus,
    new: &ModuleStatus,
    e: &SignalEmitter<'_>,
) -> zbus::Result<()> {
    let changed = changed_properties(old, new);
    if changed.is_empty() {
        return Ok(());
    }
    zbus::fdo::Properties::properties_changed(
        e,
        InterfaceName::from_static_str_unchecked(MODULE_INTERFACE),
        changed,
        Cow::Borrowed(&[]),
    )
    .await
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
                iface.get_mut().await.s = st.clone();
                emit_changes(old, st, iface.signal_emitter()).await?;
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

/// Waits until the snapshot the agent published last is the one on the bus
/// (every object of it exported, every property set), or until either side
/// stops.
pub async fn until_exported(
    published: &mut watch::Receiver<Arc<Snapshot>>,
    exported: &mut watch::Receiver<Arc<Snapshot>>,
) {
    loop {
        {
            let (p, e) = (published.borrow_and_update(), exported.borrow_and_update());
            // The agent publishes only changed snapshots, and the bus side
            // exports the very snapshot it took: the same one is the same Arc.
            if Arc::ptr_eq(&p, &e) {
                return;
            }
        }
        tokio::select! {
            r = published.changed() => if r.is_err() { return },
            r = exported.changed() => if r.is_err() { return },
        }
    }
}

/// Serves the agent on `conn` until the agent stops publishing; requests the
/// bus name once the objects exist. Each snapshot whose objects and
/// properties are on the bus is sent on `exported` (see [`until_exported`]).
pub async fn serve(
    conn: &Connection,
    agent: Handle,
    mut status: watch::Receiver<Arc<Snapshot>>,
    exported: watch::Sender<Arc<Snapshot>>,
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
                published: status.clone(),
                exported: exported.subscribe(),
            },
        )
        .await?;
    let mut shown = BTreeMap::new();
    let mut first = true;
    loop {
        let snap = status.borrow_and_update().clone();
        let (next_changed, signing_changed) = shown_snapshot.lock().map_or((true, true), |g| {
            (g.next != snap.next, g.signing != snap.signing)
        });
        let set_changed = sync(server, &mut shown, &snap).await?;
        if let Ok(mut g) = shown_snapshot.lock() {
            *g = snap.clone();
        }
        if first {
            conn.request_name(BUS_NAME).await?;
            first = false;
        } else if set_changed || next_changed || signing_changed {
            let iface = server.interface::<_, Manager>(MANAGER_PATH).await?;
            let manager = iface.get().await;
            if set_changed {
                manager.modules_changed(iface.signal_emitter()).await?;
            }
            if next_changed {
                manager.next_kernels_changed(iface.signal_emitter()).await?;
            }
            if signing_changed {
                manager.signing_changed(iface.signal_emitter()).await?;
            }
        }
        exported.send_replace(snap);
        if status.changed().await.is_err() {
            break;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use zbus::zvariant::OwnedValue;

    use super::{MODULE_PROPERTIES, changed_properties, module_path, module_status};
    use crate::reconciler::status::{ModuleStatus, Status};

    fn status(n: u64) -> ModuleStatus {
        ModuleStatus {
            name: format!("name{n}"),
            state: if n == 0 {
                Status::Inactive
            } else {
                Status::Loaded
            },
            step: format!("step{n}"),
            error: format!("error{n}"),
            kernel: format!("kernel{n}"),
            image: format!("image{n}"),
            image_digest: format!("digest{n}"),
            loaded_modules: vec![format!("m{n}")],
            since: n + 10,
            next_retry: n + 20,
            config_file: format!("file{n}"),
            wanted: n != 0,
            started_op: n + 30,
            completed_op: n + 40,
        }
    }

    #[test]
    fn every_field_travels_as_its_property_and_back() {
        let (old, new) = (status(0), status(1));
        let changed = changed_properties(&old, &new);
        let mut names: Vec<&str> = changed.keys().copied().collect();
        names.sort_unstable();
        let mut all = MODULE_PROPERTIES.to_vec();
        all.sort_unstable();
        assert_eq!(names, all);
        assert_eq!(MODULE_PROPERTIES.len(), 14);
        let props: HashMap<String, OwnedValue> = changed
            .into_iter()
            .map(|(k, v)| (k.to_owned(), OwnedValue::try_from(v).unwrap()))
            .collect();
        assert_eq!(module_status(props.clone()).unwrap(), new);
        // A property missing is named.
        let mut short = props;
        short.remove("ImageDigest");
        let err = module_status(short).unwrap_err().to_string();
        assert!(err.contains("ImageDigest"), "{err}");
    }

    #[test]
    fn only_changed_properties_are_signalled() {
        let old = status(1);
        let mut new = old.clone();
        new.completed_op += 1;
        new.state = Status::Failed;
        let changed = changed_properties(&old, &new);
        let mut names: Vec<&str> = changed.keys().copied().collect();
        names.sort_unstable();
        assert_eq!(names, ["CompletedOp", "State"]);
        assert_eq!(
            changed["State"],
            zbus::zvariant::Value::from("failed".to_owned())
        );
        assert!(changed_properties(&old, &old).is_empty());
    }

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
