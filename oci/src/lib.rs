//! OCI-side plumbing shared by every cryo verb: loading a bundle's `config.json`, cryo's
//! per-container record (kept beside libcontainer's `state.json`), and the one transition
//! table that decides which verb may run in which state.

pub mod atomic;
pub mod bundle;
pub mod fsutil;
pub mod state;
pub mod transitions;

pub use bundle::{load_spec, rootfs_path, Bundle, BundleError};
pub use state::{ContainerRecord, StateError, StateStore, StoreLock};
pub use transitions::{check, Status, TransitionError, Verb};
