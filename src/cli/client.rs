//! `kvcctl status|list|load|unload|reload|reload-config|prepare`: talking to the running agent over D-Bus.

use std::time::Duration;

use anyhow::{Context as _, Result, anyhow};
use clap::{Args, Subcommand};
use futures_util::StreamExt as _;
use zbus::Connection;
use zbus::fdo::PropertiesProxy;
use zbus::names::InterfaceName;

use super::{EXIT_FAILED, EXIT_NO_DAEMON};
use crate::dbus::proxy::ManagerProxy;
use crate::dbus::{BUS_NAME, MANAGER_INTERFACE, MANAGER_PATH, MODULE_INTERFACE, module_path};
use crate::reconciler::status::{ModuleStatus, NextKernelWire, Status};

/// Where the agent is.
#[derive(Debug, Clone, Args)]
pub(super) struct BusArgs {
    /// D-Bus address of the bus kvcd serves on; default the system bus.
    #[arg(long, value_name = "ADDRESS", global = true)]
    bus_address: Option<String>,
}

/// The D-Bus verbs.
#[derive(Debug, Subcommand)]
pub(super) enum ClientCommand {
    /// Every module config (or NAME) with its state, kernel, image and last error.
    Status {
        /// Only this module config.
        name: Option<String>,
        /// Print JSON (a stable format: the fields of the Module object).
        #[arg(long)]
        json: bool,
    },
    /// Module config names, one per line.
    List,
    /// Want NAME loaded and load it.
    Load(OpArgs),
    /// Want NAME unloaded and unload it.
    Unload(OpArgs),
    /// Unload NAME, fetch its artifacts again and load them.
    Reload(OpArgs),
    /// Make the agent read its configuration again.
    ReloadConfig,
    /// Prepare every valid module config for KERNEL (runs in the background; see the journal).
    Prepare {
        /// Kernel release.
        kernel: String,
    },
    /// The kernels the node may boot next and whether every wanted config is
    /// ready for each; exits 1 when one the node boots next is not (a gate to
    /// hold a reboot on).
    Next {
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        /// Also exit 1 when a fallback kernel (an older one, a rollback) is not ready.
        #[arg(long)]
        all: bool,
    },
    /// Prepare the wanted configs (or NAMEs) for every kernel the node may
    /// boot next and wait until done; exits 1 when one is not ready then.
    PrepareNext {
        /// The node's root to look for kernels under (an ostree sysroot).
        #[arg(long, value_name = "DIR", default_value = "/")]
        sysroot: String,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        /// Module config names; default the wanted ones.
        #[arg(value_name = "NAME")]
        names: Vec<String>,
    },
}

/// The next kernels as a table for people.
pub(super) fn next_text(next: &[NextKernelWire]) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    for (release, role, origin, ready, configs) in next {
        let _ = writeln!(
            out,
            "kernel {release} ({role}, {origin}): {}",
            if *ready { "ready" } else { "NOT READY" }
        );
        for (name, state, detail) in configs {
            let _ = writeln!(out, "  {name}: {state}: {detail}");
        }
    }
    out
}

/// True when every kernel the node boots next (every kernel, with `all`) is ready.
pub(super) fn next_ready(next: &[NextKernelWire], all: bool) -> bool {
    next.iter()
        .filter(|k| all || k.1 == crate::boot::Role::Next.as_str())
        .all(|k| k.3)
}

/// `kvcd prepare-next` while the agent runs (it holds the state lock): the agent prepares.
pub(super) fn forward_prepare_next(
    bus_address: Option<&str>,
    sysroot: &std::path::Path,
    names: &[String],
    prepare: bool,
    json: bool,
) -> Result<u8> {
    let bus = BusArgs {
        bus_address: bus_address.map(str::to_owned),
    };
    if !json {
        println!("prepare-next: kvcd is running; asking it");
    }
    let cmd = if prepare {
        ClientCommand::PrepareNext {
            sysroot: sysroot.display().to_string(),
            json,
            names: names.to_vec(),
        }
    } else {
        ClientCommand::Next { json, all: false }
    };
    run(&bus, &cmd)
}

/// NAME and waiting.
#[derive(Debug, Clone, Args)]
pub(super) struct OpArgs {
    /// Module config name.
    name: String,
    /// Wait until the operation finished; exit 1 with its error when it failed.
    #[arg(long)]
    wait: bool,
    /// Give up waiting after this many seconds.
    #[arg(long, default_value_t = 1800, value_name = "SECONDS")]
    timeout: u64,
}

/// A failure that is not the module config's: no bus, no daemon.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Unreachable(String);

async fn connect(bus: &BusArgs) -> Result<Connection> {
    let conn = match &bus.bus_address {
        Some(a) => {
            zbus::connection::Builder::address(a.as_str())?
                .build()
                .await
        }
        None => Connection::system().await,
    }
    .map_err(|e| Unreachable(format!("cannot reach the D-Bus system bus: {e}")))?;
    let owned = zbus::fdo::DBusProxy::new(&conn)
        .await?
        .name_has_owner(BUS_NAME.try_into()?)
        .await?;
    if !owned {
        return Err(Unreachable(format!(
            "kvcd is not running (nothing owns {BUS_NAME} on the bus); start it with `systemctl start kvcd`"
        ))
        .into());
    }
    Ok(conn)
}

/// The properties of the module object at `path`.
async fn module_properties<'a>(
    conn: &Connection,
    path: &zbus::zvariant::OwnedObjectPath,
) -> Result<PropertiesProxy<'a>> {
    Ok(PropertiesProxy::builder(conn)
        .destination(BUS_NAME)?
        .path(path.clone())?
        .build()
        .await?)
}

async fn module_status(
    conn: &Connection,
    path: &zbus::zvariant::OwnedObjectPath,
) -> Result<ModuleStatus> {
    let props = module_properties(conn, path)
        .await?
        .get_all(InterfaceName::from_static_str_unchecked(MODULE_INTERFACE))
        .await?;
    crate::dbus::module_status(props)
}

/// The manager's properties: version, kernel and errors.
struct ManagerInfo {
    version: String,
    kernel: String,
    errors: Vec<String>,
    next: Vec<NextKernelWire>,
    signing: std::collections::BTreeMap<String, String>,
}

/// The manager's properties in one `GetAll`.
async fn manager_info(conn: &Connection) -> Result<ManagerInfo> {
    let mut props = module_properties(
        conn,
        &zbus::zvariant::OwnedObjectPath::try_from(MANAGER_PATH)?,
    )
    .await?
    .get_all(InterfaceName::from_static_str_unchecked(MANAGER_INTERFACE))
    .await?;
    let mut take = |name: &str| {
        props
            .remove(name)
            .with_context(|| format!("the manager object has no property {name}"))
    };
    Ok(ManagerInfo {
        version: String::try_from(take("Version")?).context("property Version")?,
        kernel: String::try_from(take("Kernel")?).context("property Kernel")?,
        errors: Vec::<String>::try_from(take("Errors")?).context("property Errors")?,
        next: Vec::<NextKernelWire>::try_from(take("NextKernels")?)
            .context("property NextKernels")?,
        // Absent from an older daemon.
        signing: take("Signing")
            .ok()
            .and_then(|v| std::collections::HashMap::<String, String>::try_from(v).ok())
            .map(|m| m.into_iter().collect())
            .unwrap_or_default(),
    })
}

/// Every module object with its status, in one `GetManagedObjects` call, by name.
async fn all_modules(conn: &Connection) -> Result<Vec<ModuleStatus>> {
    let objects = zbus::fdo::ObjectManagerProxy::builder(conn)
        .destination(BUS_NAME)?
        .path(MANAGER_PATH)?
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await?
        .get_managed_objects()
        .await?;
    let mut mods = Vec::with_capacity(objects.len());
    for (path, mut ifaces) in objects {
        // Only module objects; the bare parent path has no interface.
        let Some(props) = ifaces.remove(MODULE_INTERFACE) else {
            continue;
        };
        mods.push(crate::dbus::module_status(props).with_context(|| format!("object {path}"))?);
    }
    mods.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(mods)
}

/// The status of module config `name`, `None` when there is none by that name.
async fn one_module(conn: &Connection, name: &str) -> Result<Option<ModuleStatus>> {
    match module_status(conn, &module_path(name)).await {
        Ok(s) if s.name == name => Ok(Some(s)),
        Ok(_) => Ok(None),
        Err(e) if no_such_object(&e) => Ok(None),
        Err(e) => Err(e),
    }
}

/// True when `e` says the object (or its module interface) does not exist.
fn no_such_object(e: &anyhow::Error) -> bool {
    use zbus::DBusError as _;
    let unknown = |name: &str| {
        matches!(
            name,
            "org.freedesktop.DBus.Error.UnknownObject"
                | "org.freedesktop.DBus.Error.UnknownInterface"
                | "org.freedesktop.DBus.Error.UnknownMethod"
        )
    };
    e.chain().any(|c| {
        if let Some(zbus::Error::MethodError(name, _, _)) = c.downcast_ref::<zbus::Error>() {
            return unknown(name.as_str());
        }
        if let Some(zbus::Error::FDO(f)) = c.downcast_ref::<zbus::Error>() {
            return unknown(f.name().as_str());
        }
        c.downcast_ref::<zbus::fdo::Error>()
            .is_some_and(|f| unknown(f.name().as_str()))
    })
}

/// The status table, to print at once (stdout writes at every line end).
fn table(mods: &[ModuleStatus]) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<24} {:<12} {:<22} {:<28} ERROR",
        "NAME", "STATE", "KERNEL", "MODULES"
    );
    for m in mods {
        let mut error = m.error.lines().next().unwrap_or("").to_owned();
        if m.next_retry > 0 {
            error = format!("{error} (retry at {})", m.next_retry);
        }
        let _ = writeln!(
            out,
            "{:<24} {:<12} {:<22} {:<28} {}",
            m.name,
            m.state,
            m.kernel,
            m.loaded_modules.join(","),
            error
        );
    }
    out
}

/// Follows the module object until operation `op` finished; Ok(true) when it succeeded.
async fn wait_for(
    conn: &Connection,
    path: &zbus::zvariant::OwnedObjectPath,
    op: u64,
    timeout: u64,
    unloading: bool,
) -> Result<ModuleStatus> {
    let mut changes = module_properties(conn, path)
        .await?
        .receive_properties_changed()
        .await?;
    // kvcd stopping (or killed) while we wait ends the wait at once.
    let mut owners = zbus::fdo::DBusProxy::new(conn)
        .await?
        .receive_name_owner_changed_with_args(&[(0, BUS_NAME)])
        .await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout);
    loop {
        let s = module_status(conn, path).await?;
        if s.completed_op >= op && s.state.is_settled() && s.started_op <= s.completed_op {
            return Ok(s);
        }
        tokio::select! {
            _ = changes.next() => {}
            Some(change) = owners.next() => {
                if change.args().is_ok_and(|a| a.new_owner().is_none()) {
                    return Err(Unreachable(format!(
                        "kvcd stopped while {} was {}; it picks up where it stopped when it starts again",
                        s.name, s.state
                    ))
                    .into());
                }
            }
            () = tokio::time::sleep_until(deadline) => {
                return Err(anyhow!(
                    "gave up waiting after {timeout}s: {} is {}{}",
                    s.name,
                    s.state,
                    if unloading { " (still unloading?)" } else { "" }
                ));
            }
        }
    }
}

async fn run_async(bus: &BusArgs, cmd: &ClientCommand) -> Result<u8> {
    let conn = connect(bus).await?;
    let manager = ManagerProxy::new(&conn).await?;
    match cmd {
        ClientCommand::List => {
            let names: String = manager
                .list_modules()
                .await?
                .into_iter()
                .map(|(name, _, _)| name + "\n")
                .collect();
            print!("{names}");
            Ok(0)
        }
        ClientCommand::Status { name, json } => {
            // Two calls made at once, however many module configs there are.
            let (info, mods) = match name {
                Some(n) => {
                    let (info, one) = tokio::try_join!(manager_info(&conn), one_module(&conn, n))?;
                    let Some(one) = one else {
                        eprintln!("no module config named {n:?}");
                        return Ok(EXIT_FAILED);
                    };
                    (info, vec![one])
                }
                None => tokio::try_join!(manager_info(&conn), all_modules(&conn))?,
            };
            if *json {
                let doc = serde_json::json!({
                    "version": info.version,
                    "kernel": info.kernel,
                    "errors": info.errors,
                    "modules": mods,
                    "next_kernels": info.next.iter().map(|(release, role, origin, ready, configs)| serde_json::json!({
                        "release": release, "role": role, "origin": origin, "ready": ready,
                        "configs": configs.iter().map(|(name, state, detail)| serde_json::json!({"name": name, "state": state, "detail": detail})).collect::<Vec<_>>(),
                    })).collect::<Vec<_>>(),
                    "signing": info.signing,
                });
                // Formatted first, so stdout writes it at once, not line by line.
                let text = format!("{doc:#}\n");
                print!("{text}");
            } else {
                println!("kvcd {} on kernel {}", info.version, info.kernel);
                for e in &info.errors {
                    println!("error: {e}");
                }
                let mut text = table(&mods);
                if !info.next.is_empty() {
                    text.push_str("\nnext kernels (kvcctl next):\n");
                    text.push_str(&next_text(&info.next));
                }
                if !info.signing.is_empty() {
                    text.push_str("\nsigning (kvcd signing):\n");
                    for l in crate::signing::SigningStatus::lines_of(&info.signing) {
                        text.push_str(&format!("  {l}\n"));
                    }
                }
                print!("{text}");
            }
            let bad = mods
                .iter()
                .any(|m| matches!(m.state, Status::Failed | Status::Busy | Status::Invalid));
            Ok(if bad { EXIT_FAILED } else { 0 })
        }
        ClientCommand::Load(a) | ClientCommand::Unload(a) | ClientCommand::Reload(a) => {
            let unloading = matches!(cmd, ClientCommand::Unload(_));
            let (path, op) = match cmd {
                ClientCommand::Load(_) => manager.load(&a.name).await,
                ClientCommand::Unload(_) => manager.unload(&a.name).await,
                _ => manager.reload(&a.name).await,
            }
            .map_err(dbus_error)?;
            if !a.wait {
                println!("{}: queued (operation {op})", a.name);
                return Ok(0);
            }
            let s = wait_for(&conn, &path, op, a.timeout, unloading).await?;
            let ok = if unloading {
                matches!(
                    s.state,
                    Status::Inactive | Status::Unsupported | Status::Invalid
                )
            } else {
                matches!(s.state, Status::Loaded | Status::Unsupported)
            };
            if ok {
                println!("{}: {}", s.name, s.state);
                Ok(0)
            } else {
                println!("{}: {} at {}: {}", s.name, s.state, s.step, s.error);
                Ok(EXIT_FAILED)
            }
        }
        ClientCommand::ReloadConfig => {
            manager.reload_config().await.map_err(dbus_error)?;
            Ok(0)
        }
        ClientCommand::Prepare { kernel } => {
            manager.prepare(kernel).await.map_err(dbus_error)?;
            println!("preparing every module config for {kernel}; see `journalctl -u kvcd`");
            Ok(0)
        }
        ClientCommand::Next { json, all } => {
            let report = manager.check_next().await.map_err(dbus_error)?;
            let next = manager.next_kernels().await?;
            print_next(&report, &next, *json);
            Ok(if next_ready(&next, *all) {
                0
            } else {
                EXIT_FAILED
            })
        }
        ClientCommand::PrepareNext {
            sysroot,
            json,
            names,
        } => {
            let report = manager
                .prepare_next(sysroot, names)
                .await
                .map_err(dbus_error)?;
            let next = manager.next_kernels().await?;
            print_next(&report, &next, *json);
            let doc: serde_json::Value = serde_json::from_str(&report).context("kvcd's report")?;
            let failed = doc["kernels"].as_array().is_some_and(|ks| {
                ks.iter().any(|k| {
                    k["results"]
                        .as_array()
                        .is_some_and(|rs| rs.iter().any(|r| !r["error"].is_null()))
                })
            });
            Ok(if next_ready(&next, false) && !failed {
                0
            } else {
                EXIT_FAILED
            })
        }
    }
}

/// Prints a next-kernels report: its JSON, or the table of `next`.
fn print_next(json_report: &str, next: &[NextKernelWire], json: bool) {
    if json {
        println!("{json_report}");
    } else if next.is_empty() {
        println!("no kernel to boot next besides the running one");
    } else {
        print!("{}", next_text(next));
    }
}

/// A D-Bus error as one line: its name's last part and its message.
fn dbus_error(e: zbus::Error) -> anyhow::Error {
    match &e {
        zbus::Error::MethodError(name, _, _) if gone_error(name.as_str()) => gone(&e).into(),
        zbus::Error::MethodError(name, Some(msg), _) => {
            anyhow!("{msg} ({})", name.as_str())
        }
        _ => anyhow!(e),
    }
}

/// True for the bus's own errors when kvcd left it during a call.
fn gone_error(name: &str) -> bool {
    matches!(
        name,
        "org.freedesktop.DBus.Error.NoReply"
            | "org.freedesktop.DBus.Error.ServiceUnknown"
            | "org.freedesktop.DBus.Error.NameHasNoOwner"
    )
}

/// Says kvcd left the bus during a call, for the error `e` of that call.
fn gone(e: impl std::fmt::Display) -> Unreachable {
    Unreachable(format!(
        "kvcd stopped before it answered ({e}); when it starts again it settles what it was doing"
    ))
}

/// True when `e` says kvcd left the bus during a call.
fn daemon_went_away(e: &anyhow::Error) -> bool {
    use zbus::DBusError as _;
    e.chain().any(|c| {
        if let Some(zbus::Error::MethodError(name, _, _)) = c.downcast_ref::<zbus::Error>() {
            return gone_error(name.as_str());
        }
        if let Some(zbus::Error::FDO(f)) = c.downcast_ref::<zbus::Error>() {
            return gone_error(f.name().as_str());
        }
        c.downcast_ref::<zbus::fdo::Error>()
            .is_some_and(|f| gone_error(f.name().as_str()))
    })
}

/// Runs a D-Bus verb; returns the exit code (3 when kvcd cannot be reached).
pub(super) fn run(bus: &BusArgs, cmd: &ClientCommand) -> Result<u8> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    match rt.block_on(run_async(bus, cmd)) {
        Ok(code) => Ok(code),
        Err(e) if e.is::<Unreachable>() => {
            eprintln!("error: {e}");
            Ok(EXIT_NO_DAEMON)
        }
        Err(e) if daemon_went_away(&e) => {
            eprintln!("error: {}", gone(e).0);
            Ok(EXIT_NO_DAEMON)
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            Ok(EXIT_FAILED)
        }
    }
}
