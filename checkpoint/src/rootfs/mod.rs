//! The container's root filesystem at checkpoint and restore.
//!
//! CRIU restores processes, not files. A container restored into a fresh rootfs (a new
//! container, another machine) would lose every change it made to its filesystem, and CRIU
//! fails outright when a file a process holds open has another size. So cryo captures the
//! overlay upper dir **while the container is frozen** into the image dir, and applies it to
//! the new container's rootfs at restore, before CRIU runs.
//!
//! # On-disk format
//!
//! The changeset is a tar archive in the OCI image-layer changeset format:
//!
//! - `rootfs-diff.tar` ([`RAW_CHANGESET`]): written by [`capture_upper`] inside the freeze
//!   window, uncompressed (one buffered pass, no compression, no fsync);
//! - `rootfs-diff.tar.zst` ([`COMPRESSED_CHANGESET`]): made by [`compress_zstd`] after the
//!   thaw; the engine then removes the raw file. [`open_changeset`] reads either.
//!
//! Entries, in directory-walk order (a directory before its children, names sorted):
//!
//! - new and modified directories, regular files, symlinks, fifos, char/block devices, with
//!   mode, uid/gid, mtime (and atime in the GNU header); hard links (an inode met twice) are
//!   tar `Link` entries naming the first path;
//! - extended attributes as PAX `SCHILY.xattr.<name>` records; overlay's private attributes
//!   (`trusted.overlay.*`, `user.overlay.*`) are never copied: they are translated as below;
//! - a deleted path `d/x` (an overlay whiteout: a 0:0 char device) is an empty regular file
//!   `d/.wh.x` ([`WHITEOUT_PREFIX`]);
//! - an opaque directory `d` (`trusted.overlay.opaque=y`, or `user.overlay.opaque=y` with
//!   `userxattr`) is the entry `d` followed by an empty `d/.wh..wh..opq` ([`OPAQUE_MARKER`]);
//! - sparse files are old-GNU sparse entries (type `S`: the first 4 data extents in the
//!   header, 21 more per extension header), so holes cost nothing in the archive.
//!
//! # Restore
//!
//! [`apply_changeset`] validates the whole archive before writing anything, then applies it
//! to the container's *merged* rootfs view (overlay then makes its own whiteouts and
//! copy-ups, and any kind of rootfs works), through directory descriptors that never let a
//! symlink lead a write out of the root. [`verify_open_files`] then checks the files the
//! checkpointed processes hold open ([`collect_open_files`]) are there with their size.

mod apply;
mod capture;
mod codec;
mod detect;
mod safe;
mod sparse;
mod validate;
mod verify;

pub use apply::{apply_changeset, ApplyPolicy, ApplyReport};
pub use capture::{
    capture_dir, capture_upper, capture_upper_into, prepare_capture, CaptureOptions, CaptureReport,
    FrozenTop,
};
pub use codec::{compress_zstd, open_changeset};
pub use detect::{detect_rootfs, parse_mountinfo, MountInfo, RootfsKind};
pub use verify::{collect_open_files, verify_open_files, OpenFile};

use std::path::PathBuf;

/// Raw (uncompressed) changeset file name in the image dir, written inside the freeze.
pub const RAW_CHANGESET: &str = "rootfs-diff.tar";
/// Compressed changeset file name in the image dir, written after the thaw.
pub const COMPRESSED_CHANGESET: &str = "rootfs-diff.tar.zst";
/// Prefix of a whiteout entry: `d/.wh.x` deletes `d/x`.
pub const WHITEOUT_PREFIX: &str = ".wh.";
/// Opaque-directory marker: `d/.wh..wh..opq` hides everything `d` held before.
pub const OPAQUE_MARKER: &str = ".wh..wh..opq";

/// Result of the rootfs operations.
pub type Result<T, E = RootfsError> = std::result::Result<T, E>;

/// A rootfs operation that failed, with the path and the step.
#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    /// An I/O step on a host path failed.
    #[error("{step} {path}: {source}")]
    Io {
        /// What we were doing.
        step: &'static str,
        /// The path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The upper dir uses an overlay feature whose files cannot be captured from it alone.
    #[error("cannot capture {path}: {reason}")]
    Unsupported {
        /// The entry in the upper dir.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The changeset is refused (hostile, corrupt or truncated); nothing was written.
    #[error("rootfs changeset {archive} refused, nothing was written: entry {entry:?}: {reason}")]
    Refused {
        /// The archive.
        archive: PathBuf,
        /// The archive entry (its path, or where in the archive).
        entry: String,
        /// Why.
        reason: String,
    },
    /// Applying a validated changeset failed midway (the target is partly updated).
    #[error("applying rootfs changeset {archive} failed at entry {entry:?} ({step}): {reason}")]
    Apply {
        /// The archive.
        archive: PathBuf,
        /// The archive entry.
        entry: String,
        /// What we were doing.
        step: &'static str,
        /// Why.
        reason: String,
    },
    /// A file a checkpointed process holds open is missing or has another size.
    #[error(
        "file {path} that the checkpointed process holds open {problem}; \
         restore the rootfs snapshot or use the same rootfs"
    )]
    OpenFileMismatch {
        /// Container path of the file.
        path: String,
        /// What is wrong ("is missing from the target rootfs", "has 1 bytes … but 2 …").
        problem: String,
    },
}

/// Map an `io::Error` to [`RootfsError::Io`] for `step` on `path`.
pub(crate) fn io_err(
    step: &'static str,
    path: impl Into<PathBuf>,
) -> impl FnOnce(std::io::Error) -> RootfsError {
    let path = path.into();
    move |source| RootfsError::Io { step, path, source }
}
