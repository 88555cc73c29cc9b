//! Where the `.ko` files come from and where they are kept: a source gives
//! files (`directory`, `image`), `store` keeps the ones a load needs by
//! content and records which each config uses, `verify` checks them against
//! the target kernel and the config before anything is inserted.

pub mod directory;
pub mod image;
pub mod podman;
pub mod prune;
pub mod store;
pub mod verify;

pub use store::ModuleStore;
