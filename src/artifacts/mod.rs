//! Where the `.ko` files come from and how they become a module tree libkmod
//! can load from: a source gives files (`directory`), `root` places them in a
//! depmod-indexed tree keyed by content, `verify` checks them against the
//! target kernel and the config before anything is inserted.

pub mod directory;
pub mod image;
pub mod podman;
pub mod prune;
pub mod root;
pub mod verify;

pub use root::{ModuleRoot, RootLayout};
