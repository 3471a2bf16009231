//! What every command gets: the state store and the global flags.

use std::path::PathBuf;

use cryo_oci::StateStore;

use crate::cli::LogFormat;

/// Per-invocation context.
pub struct Context {
    /// Container state (`--root`).
    pub store: StateStore,
    /// `--root`.
    pub root: PathBuf,
    /// `--criu`: the CRIU binary (a name on PATH or a path).
    pub criu: PathBuf,
    /// `--log`.
    pub log: Option<PathBuf>,
    /// `--log-format`.
    pub log_format: LogFormat,
    /// Where GPU checkpointing looks for cuda-checkpoint and CRIU's CUDA plugin.
    pub gpu: cryo_checkpoint::gpu::GpuLookup,
}

impl Context {
    /// `--log-format`'s value, to pass on to a child cryo.
    pub fn log_format_arg(&self) -> &'static str {
        match self.log_format {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}
