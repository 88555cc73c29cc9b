//! kvcd: gets out-of-tree kernel modules onto a node from driver packages and
//! images, loads them in dependency order with libkmod, and reports what it did.
//!
//! The binaries (`kvcd`, `kvcctl`) are thin; everything they do lives here so
//! tests can drive it directly.

pub mod artifacts;
pub mod boot;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod dbus;
pub mod devices;
pub mod failpoint;
pub mod hooks;
pub mod kernel;
pub mod kmod;
pub mod metrics;
pub mod reconciler;
pub mod signing;
pub mod state;
pub mod util;
