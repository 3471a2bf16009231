//! The container's root filesystem at checkpoint and restore.
//!
//! CRIU restores processes, not files. For an overlay rootfs cryo captures the upper dir while
//! the container is frozen into the image dir as an OCI-layer-style changeset:
//!
//! - `rootfs-diff.tar` (raw, written inside the freeze) then `rootfs-diff.tar.zst` (zstd,
//!   compressed after the thaw; the raw file is removed);
//! - new and modified entries with mode, owner, mtime, xattrs (PAX `SCHILY.xattr.*`), symlinks,
//!   hardlinks (tar link entries), fifos, device nodes, sparse files (GNU sparse entries);
//! - a deleted path `d/x` (overlay whiteout, a 0:0 char device) becomes an empty `d/.wh.x`;
//! - an opaque directory `d` (xattr `trusted.overlay.opaque=y`) becomes `d` plus `d/.wh..wh..opq`.
//!
//! At restore the changeset is validated whole, then applied to the target's merged view.

mod apply;
mod capture;
mod detect;
mod safe;
mod verify;

pub use apply::{apply_changeset, ApplyPolicy, ApplyReport};
pub use capture::{
    capture_dir, capture_upper, compress_zstd, open_changeset, CaptureOptions, CaptureReport,
};
pub use detect::{detect_rootfs, parse_mountinfo, MountInfo, RootfsKind};
pub use verify::{collect_open_files, verify_open_files, OpenFile};

use std::path::PathBuf;

/// Raw changeset file name in the image dir.
pub const RAW_CHANGESET: &str = "rootfs-diff.tar";
/// Compressed changeset file name in the image dir.
pub const COMPRESSED_CHANGESET: &str = "rootfs-diff.tar.zst";
/// Whiteout prefix.
pub const WHITEOUT_PREFIX: &str = ".wh.";
/// Opaque-directory marker.
pub const OPAQUE_MARKER: &str = ".wh..wh..opq";

/// A rootfs operation that failed, with the path and the step.
#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    /// An I/O step failed.
    #[error("{step} {path}: {source}")]
    Io {
        /// What we were doing.
        step: &'static str,
        /// The path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The changeset is refused (hostile or corrupt); nothing was written.
    #[error("rootfs changeset {archive} refused, nothing was written: entry {entry:?}: {reason}")]
    Refused {
        /// The archive.
        archive: PathBuf,
        /// The entry.
        entry: String,
        /// Why.
        reason: String,
    },
    /// Applying a validated changeset failed midway (the target is partly updated).
    #[error("applying rootfs changeset {archive} failed at entry {entry:?}: {reason}")]
    Apply {
        /// The archive.
        archive: PathBuf,
        /// The entry.
        entry: String,
        /// Why.
        reason: String,
    },
    /// A file a process holds open does not match.
    #[error("{0}")]
    Mismatch(String),
}

pub(crate) fn io_err(
    step: &'static str,
    path: impl Into<PathBuf>,
) -> impl FnOnce(std::io::Error) -> RootfsError {
    let path = path.into();
    move |source| RootfsError::Io { step, path, source }
}
