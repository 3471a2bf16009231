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
use crate::manifest::{Manifest, FORMAT_V1};
use crate::rootfs::{self, RootfsError, UndoLocation};

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
    same_upper(m.rootfs.upper_fingerprint, identity(&upper_dir))
}

/// The sameness rule: the target's upper dir is the captured one only when both identities
/// are known, conclusive (birth time or generation beside device and inode) and equal.
fn same_upper(recorded: Option<DirIdentity>, now: Option<DirIdentity>) -> Option<String> {
    match (recorded, now) {
        (Some(recorded), Some(now)) if recorded.is_conclusive() && recorded == now => {
            Some("restoring in place: the rootfs is the very upper dir that was captured".into())
        }
        _ => None,
    }
}

/// The policy a restore applies `m`'s changeset under for a container with `spec`: device
/// nodes only as the spec's runtime makes them, no more data than the capture recorded, and
/// old-GNU sparse entries only in format-1 images (which wrote them).
pub fn policy(m: &Manifest, spec: &oci_spec::runtime::Spec) -> rootfs::ApplyPolicy {
    let mut p = rootfs::ApplyPolicy::for_spec(spec).with_legacy_sparse(m.format == FORMAT_V1);
    if let Some(logical_bytes) = m.rootfs.logical_bytes {
        p = p.with_declared_sizes(rootfs::ChangesetSizes {
            data_bytes: m.rootfs.bytes,
            logical_bytes,
        });
    }
    p
}

/// Apply the changeset `archive` to `target` and leave it pending: the changes stand, with
/// their undo data in `target`, until [`commit`] keeps them or [`rollback`] undoes them —
/// from this process or, if it is killed, from the next verb that reads the restore journal.
/// A failed apply has already put `target` back as it was.
pub fn apply(
    archive: &Path,
    target: &Path,
    policy: &rootfs::ApplyPolicy,
) -> Result<rootfs::ApplyReport, RootfsError> {
    let applied = rootfs::apply_changeset(archive, target, policy, &UndoLocation::default())?;
    let report = applied.report().clone();
    applied.leave_pending();
    Ok(report)
}

/// Keep the changes of a pending apply on `target` (finishes a begun commit).
pub fn commit(target: &Path) -> Result<(), RootfsError> {
    rootfs::commit_pending(target, &UndoLocation::default()).map(|_| ())
}

/// Undo a pending (or half-made) apply on `target`; nothing to do when none is pending, and
/// a begun commit is finished instead (never half undone).
pub fn rollback(target: &Path) -> Result<(), RootfsError> {
    rootfs::rollback_pending(target, &UndoLocation::default()).map(|_| ())
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

#[cfg(test)]
mod tests {
    use super::*;

    fn id(ino: u64, btime: Option<(i64, u32)>, generation: Option<u64>) -> DirIdentity {
        DirIdentity {
            dev: 65024,
            ino,
            btime,
            generation,
        }
    }

    /// Issue 18: the new container's upper dir got the old one's (st_dev, st_ino); it is a
    /// different directory, and the changeset must be applied.
    #[test]
    fn a_reused_inode_number_is_not_the_captured_upper_dir() {
        let captured = id(901308, Some((1_796_000_000, 5)), Some(7));
        let reused = id(901308, Some((1_796_000_042, 9)), Some(8));
        assert_eq!(same_upper(Some(captured), Some(reused)), None);
        let only_btime_differs = id(901308, Some((1_796_000_042, 9)), Some(7));
        assert_eq!(same_upper(Some(captured), Some(only_btime_differs)), None);
    }

    #[test]
    fn only_a_conclusive_equal_identity_skips_the_changeset() {
        let captured = id(901308, Some((1_796_000_000, 5)), Some(7));
        assert!(same_upper(Some(captured), Some(captured)).is_some());
        // (dev, ino) alone proves nothing, even when equal.
        let bare = id(901308, None, None);
        assert_eq!(same_upper(Some(bare), Some(bare)), None);
        // Unknown on either side: apply.
        assert_eq!(same_upper(None, Some(captured)), None);
        assert_eq!(same_upper(Some(captured), None), None);
    }

    #[test]
    fn a_checkpoint_that_left_the_container_running_is_always_applied() {
        let mut m = crate::manifest::tests::sample();
        m.rootfs.snapshot = Some(rootfs::RAW_CHANGESET.into());
        m.leave_running = true;
        let captured = id(1, Some((1, 1)), Some(1));
        m.rootfs.upper_fingerprint = Some(captured);
        let decision = decide(&m, Path::new("/nonexistent"), false, &|_| Some(captured));
        assert_eq!(decision, None);
    }

    #[test]
    fn no_snapshot_or_the_flag_skips_with_the_reason() {
        let mut m = crate::manifest::tests::sample();
        m.rootfs.snapshot = None;
        m.rootfs.skipped_because = Some("plain directory".into());
        let why = decide(&m, Path::new("/nonexistent"), false, &|_| None).unwrap();
        assert!(why.contains("plain directory"), "{why}");
        m.rootfs.snapshot = Some(rootfs::RAW_CHANGESET.into());
        let why = decide(&m, Path::new("/nonexistent"), true, &|_| None).unwrap();
        assert!(why.contains("--no-rootfs-restore"), "{why}");
    }
}
