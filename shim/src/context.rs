//! What every command gets: the state store and the global flags.

use std::path::PathBuf;

use cryo_oci::StateStore;

/// Per-invocation context.
pub struct Context {
    /// Container state (`--root`).
    pub store: StateStore,
    /// `--root`.
    pub root: PathBuf,
    /// Where GPU checkpointing looks for cuda-checkpoint and CRIU's CUDA plugin.
    pub gpu: cryo_checkpoint::gpu::GpuLookup,
}
