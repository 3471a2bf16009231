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
//!   thaw, one zstd frame with a content checksum; the engine then removes the raw file.
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
//! - sparse files (format 2, [`CHANGESET_FORMAT`]) are regular entries holding only their
//!   data extents, with GNU tar's PAX sparse 0.1 records (`GNU.sparse.size`,
//!   `GNU.sparse.numblocks`, `GNU.sparse.map`): holes cost nothing in the archive, nor at
//!   restore. Format 1 stored them as old-GNU sparse entries (type `S`), which a restore
//!   accepts only when told the image is of format 1 ([`ApplyPolicy::with_legacy_sparse`]),
//!   and only so big.
//!
//! # Restore
//!
//! [`apply_changeset`] validates the whole archive before writing anything: every header,
//! path (no `..`, no absolute path, no component over `NAME_MAX`, no path over `PATH_MAX`, no
//! write through a symlink the archive made or out of the root), sparse map, device node
//! (only those the runtime creates for the target spec: [`ApplyPolicy::for_spec`]), the sizes
//! declared against the capture's record ([`CaptureReport::sizes`]) and the room on the
//! target's filesystem; and it reads the stream to its end, so a zstd frame's checksum is
//! checked before the first write.
//!
//! It then applies it to the container's *merged* rootfs view (overlay makes its own
//! whiteouts and copy-ups, and any kind of rootfs works), through directory descriptors that
//! never let a symlink lead a write out of the root, as a transaction: every change is
//! journaled in an undo directory inside the target root ([`UndoLocation`], see `undo`)
//! before it is made. A failure midway puts the target back as it was; success returns an
//! [`AppliedChangeset`] the caller commits once the restore succeeded, or rolls back (or
//! leaves pending, to decide by path with [`commit_pending`] / [`rollback_pending`]). After
//! a crash, [`rollback_pending`] finishes the job from the journal alone.
//! [`verify_open_files`] then checks the files the checkpointed processes hold open
//! ([`collect_open_files`]) are there with their size.

mod apply;
mod capture;
mod codec;
mod copy;
mod detect;
mod journal;
mod meta;
mod policy;
mod rollback;
mod safe;
mod seam;
mod sparse;
mod undo;
mod validate;
mod verify;

pub use apply::{apply_changeset, apply_changeset_with, ApplyReport};
pub use capture::{
    capture_dir, capture_upper, capture_upper_into, prepare_capture, CaptureOptions, CaptureReport,
    FrozenTop,
};
pub use codec::{compress_zstd, open_changeset};
pub use detect::{detect_rootfs, parse_mountinfo, MountInfo, RootfsKind};
pub use policy::{
    ApplyPolicy, ChangesetSizes, DeviceKind, DeviceNode, LEGACY_SPARSE_MAX_BYTES,
    RUNTIME_DEFAULT_DEVICES,
};
pub use rollback::{
    commit_pending, commit_pending_with, rollback_pending, rollback_pending_with, AppliedChangeset,
    RollbackOutcome, RollbackReport,
};
pub use seam::{FsOp, FsOpKind, FsSeam, NoFaults};
pub use undo::UndoLocation;
pub use validate::{verify_changeset, ChangesetSummary};
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
/// The changeset format [`capture_upper`] writes: 2 stores sparse files as PAX sparse 0.1
/// entries (1 used old-GNU `S` entries).
pub const CHANGESET_FORMAT: u32 = 2;

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
    /// The changeset is refused (hostile, corrupt, truncated or beyond its limits); nothing
    /// was written.
    #[error("rootfs changeset {archive} refused, nothing was written: entry {entry:?}: {reason}")]
    Refused {
        /// The archive.
        archive: PathBuf,
        /// The archive entry (its path, or where in the archive).
        entry: String,
        /// Why.
        reason: String,
    },
    /// The target's filesystem has too little room for the changeset; nothing was written.
    #[error(
        "not enough room in {path} for the rootfs changeset: it needs {needed} {what}, {free} \
         are free (nothing was written): free some space there"
    )]
    NoSpace {
        /// The target root.
        path: PathBuf,
        /// `bytes` or `inodes`.
        what: &'static str,
        /// What the apply may use.
        needed: u64,
        /// What the filesystem has free.
        free: u64,
    },
    /// Applying failed midway; the target was put back as it was.
    #[error(
        "applying rootfs changeset {archive} failed at entry {entry:?} ({step} {path}): \
         {source}; the target rootfs was put back as it was"
    )]
    Apply {
        /// The archive.
        archive: PathBuf,
        /// The archive entry.
        entry: String,
        /// What we were doing.
        step: &'static str,
        /// Where, relative to the target root.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// Applying failed midway, and putting the target back failed too.
    #[error(
        "applying rootfs changeset {archive} failed at entry {entry:?} ({step} {path}): \
         {source}; then {rollback}"
    )]
    ApplyNotUndone {
        /// The archive.
        archive: PathBuf,
        /// The archive entry.
        entry: String,
        /// What we were doing.
        step: &'static str,
        /// Where, relative to the target root.
        path: String,
        /// Why.
        source: std::io::Error,
        /// The rollback's error ([`RootfsError::Rollback`]).
        rollback: Box<RootfsError>,
    },
    /// Putting the target back failed; the journal keeps what is left to undo.
    #[error(
        "rolling back the rootfs changes in {target} failed ({step} {path}): {source}; the \
         undo journal in {undo} keeps what is left to undo: fix the cause and roll back again \
         (rollback_pending, which the next cryo verb on the container runs)"
    )]
    Rollback {
        /// The target root.
        target: PathBuf,
        /// The undo directory.
        undo: PathBuf,
        /// What we were doing.
        step: &'static str,
        /// Where, relative to the target root.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// Committing failed.
    #[error("keeping the rootfs changes in {target} failed ({step} {path}): {source}; {outcome}")]
    Commit {
        /// The target root.
        target: PathBuf,
        /// What we were doing.
        step: &'static str,
        /// Where.
        path: String,
        /// Why.
        source: std::io::Error,
        /// Whether the changes were kept or rolled back.
        outcome: String,
    },
    /// An earlier apply on this target left its undo data: it must be rolled back first.
    #[error(
        "{target} holds {undo}, the undo data of an apply that did not finish (was cryo \
         killed?): roll it back first (rollback_pending; the next cryo verb on that container \
         does it)"
    )]
    PendingUndo {
        /// The target root.
        target: PathBuf,
        /// The undo directory.
        undo: PathBuf,
    },
    /// Something at the undo directory's name is not cryo's undo data; left alone.
    #[error("{path} is not cryo's undo directory ({reason}); nothing was changed: move it away if it is yours")]
    NotUndoDir {
        /// The path.
        path: PathBuf,
        /// Why it is not.
        reason: String,
    },
    /// Another process holds the undo journal (an apply or a rollback is running).
    #[error("{undo} is in use by another cryo process (an apply or a rollback of this rootfs is running)")]
    UndoBusy {
        /// The undo directory.
        undo: PathBuf,
    },
    /// An undo directory name that cannot be one.
    #[error("undo directory name {name:?}: {reason}")]
    InvalidUndoName {
        /// The name.
        name: String,
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
