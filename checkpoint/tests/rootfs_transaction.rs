//! Applying a changeset is a transaction. A realistic changeset (every change `common::change`
//! makes: new files, replaced lower files, whiteouts of files and of lower directories, an
//! opaque directory, hard links, symlinks, a fifo, a device node, sparse files, xattrs, a lower
//! directory's new mode) is applied to a fresh overlay (and to a plain directory), and the
//! filesystem operation number N fails, for every N the apply makes: the target must then be
//! exactly as it was (tree digest: type, mode, owner, size, mtime, data, holes, xattrs,
//! device numbers, hard links), with no undo data left. The same with the process "killed" at
//! N (the seam unwinds out of the apply, nothing of cryo's runs after it), followed by
//! `rollback_pending`; with a rollback, and a commit, killed at each of their operations.
//! Needs root (overlay mounts, chown, mknod): it fails, never skips, without it.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use common::{build_lower, change, require_root, Mounts};
use cryo_checkpoint::rootfs::{
    apply_changeset, apply_changeset_with, capture_upper, commit_pending, commit_pending_with,
    compress_zstd, rollback_pending, rollback_pending_with, ApplyPolicy, CaptureOptions, FsOp,
    FsOpKind, FsSeam, RollbackOutcome, RootfsError, UndoLocation,
};
use cryo_tests::tree_digest::{diff_trees, tree_digest, EntryDigest};

type Digest = BTreeMap<String, EntryDigest>;

/// The payload a "killed" apply unwinds with.
struct Killed;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Fault {
    /// The operation fails with ENOSPC.
    Fail,
    /// The process ends before the operation.
    Kill,
}

/// Counts operations; the one numbered `at` fails or "kills the process".
struct Faults {
    seen: AtomicUsize,
    at: AtomicUsize,
    how: Fault,
    ops: Mutex<Vec<String>>,
}

impl Faults {
    fn new(how: Fault) -> Arc<Self> {
        Arc::new(Faults {
            seen: AtomicUsize::new(0),
            at: AtomicUsize::new(usize::MAX),
            how,
            ops: Mutex::new(Vec::new()),
        })
    }

    fn armed(how: Fault, at: usize) -> Arc<Self> {
        let f = Self::new(how);
        f.at.store(at, Ordering::SeqCst);
        f
    }

    fn count(&self) -> usize {
        self.seen.load(Ordering::SeqCst)
    }

    fn op(&self, n: usize) -> String {
        self.ops.lock().unwrap().get(n).cloned().unwrap_or_default()
    }

    fn kinds(&self) -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        for op in self.ops.lock().unwrap().iter() {
            *m.entry(op.split(' ').next().unwrap_or("").to_string())
                .or_default() += 1;
        }
        m
    }
}

impl FsSeam for Faults {
    fn before(&self, op: &FsOp<'_>) -> std::io::Result<()> {
        let n = self.seen.fetch_add(1, Ordering::SeqCst);
        self.ops.lock().unwrap().push(op.to_string());
        if n == self.at.load(Ordering::SeqCst) {
            match self.how {
                Fault::Fail => return Err(std::io::Error::from_raw_os_error(libc::ENOSPC)),
                Fault::Kill => resume_unwind(Box::new(Killed)),
            }
        }
        Ok(())
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Overlay,
    Plain,
}

/// A lower, the changeset a container made on it (zstd, as images hold it), and the trees
/// before and after.
struct Fixture {
    _t: tempfile::TempDir,
    base: PathBuf,
    lower: PathBuf,
    archive: PathBuf,
    policy: ApplyPolicy,
    changed: Digest,
}

fn fixture() -> Fixture {
    require_root();
    let t = tempfile::Builder::new()
        .prefix("cryo-rootfs-tx-")
        .tempdir_in("/tmp")
        .unwrap();
    let base = t.path().to_path_buf();
    let lower = base.join("lower");
    build_lower(&lower);
    let mut mounts = Mounts(Vec::new());
    let (upper, merged) = mounts.overlay(&base, &lower, 0);
    change(&merged);
    let changed = tree_digest(&merged);
    let raw = base.join("rootfs-diff.tar");
    let rep = capture_upper(&upper, &raw, &CaptureOptions::default()).unwrap();
    let archive = base.join("rootfs-diff.tar.zst");
    compress_zstd(&raw, &archive, 3, 1).unwrap();
    drop(mounts);
    let policy =
        ApplyPolicy::for_spec(&oci_spec::runtime::Spec::default()).with_declared_sizes(rep.sizes());
    Fixture {
        _t: t,
        base,
        lower,
        archive,
        policy,
        changed,
    }
}

/// One fresh target: an overlay over the lower, or a copy of it. Unmounted and removed when
/// dropped.
struct Target {
    root: PathBuf,
    mounts: Mounts,
    dirs: Vec<PathBuf>,
}

impl Drop for Target {
    fn drop(&mut self) {
        self.mounts = Mounts(Vec::new()); // unmounts the old ones first
        for d in &self.dirs {
            let _ = fs::remove_dir_all(d);
        }
    }
}

impl Fixture {
    fn target(&self, kind: Kind, n: usize) -> Target {
        let mut mounts = Mounts(Vec::new());
        match kind {
            Kind::Overlay => {
                let (_, merged) = mounts.overlay(&self.base, &self.lower, 1000 + n as u32);
                let dirs = ["upper", "work", "merged"]
                    .iter()
                    .map(|d| self.base.join(format!("{d}{}", 1000 + n)))
                    .collect();
                Target {
                    root: merged,
                    mounts,
                    dirs,
                }
            }
            Kind::Plain => {
                let root = self.base.join(format!("plain{n}"));
                let st = Command::new("cp")
                    .arg("-a")
                    .arg(&self.lower)
                    .arg(&root)
                    .status()
                    .unwrap();
                assert!(st.success());
                Target {
                    root: root.clone(),
                    mounts,
                    dirs: vec![root],
                }
            }
        }
    }
}

fn undo_dir(root: &Path) -> PathBuf {
    root.join(UndoLocation::DEFAULT_NAME)
}

fn assert_tree(want: &Digest, root: &Path, what: &str) {
    let diff = diff_trees(want, &tree_digest(root));
    assert!(
        diff.is_empty(),
        "{what}: trees differ:\n{}",
        diff.join("\n")
    );
    assert!(
        !undo_dir(root).exists(),
        "{what}: the undo directory is left"
    );
}

/// Apply without faults, counting operations; checks the result and a rollback. Returns the
/// tree before and the number of operations the apply made.
fn dry_run(fx: &Fixture, kind: Kind) -> (Digest, usize) {
    let t = fx.target(kind, 0);
    let before = tree_digest(&t.root);
    let seam = Faults::new(Fault::Fail);
    let undo = UndoLocation::default();
    let applied = apply_changeset_with(&fx.archive, &t.root, &fx.policy, &undo, seam.clone())
        .unwrap_or_else(|e| panic!("{e}"));
    let ops = seam.count();
    let rep = applied.report().clone();
    eprintln!("apply: {ops} operations {:?}; {rep:?}", seam.kinds());
    assert!(rep.moved_aside > 0, "{rep:?}");
    if kind == Kind::Overlay {
        assert!(
            rep.copied_aside > 0,
            "lower files must be copied aside: {rep:?}"
        );
        assert!(
            rep.taken_apart > 0,
            "lower directories must be taken apart (EXDEV): {rep:?}"
        );
    }
    let diff = diff_trees(&fx.changed, &tree_digest(&t.root));
    let diff: Vec<_> = diff
        .into_iter()
        .filter(|d| !d.contains(UndoLocation::DEFAULT_NAME))
        .collect();
    assert!(
        diff.is_empty(),
        "applied tree differs:\n{}",
        diff.join("\n")
    );
    let rb = applied.rollback().unwrap();
    assert_eq!(rb.outcome, RollbackOutcome::RolledBack);
    assert_tree(&before, &t.root, "rollback after a full apply");
    (before, ops)
}

fn every_operation_fails(kind: Kind, how: Fault) {
    let fx = fixture();
    let (before, ops) = dry_run(&fx, kind);
    let undo = UndoLocation::default();
    for n in 0..ops {
        let t = fx.target(kind, n + 1);
        let seam = Faults::armed(how, n);
        let what = || format!("fault {how:?} at operation {n} ({})", seam.op(n));
        match how {
            Fault::Fail => {
                let e = apply_changeset_with(&fx.archive, &t.root, &fx.policy, &undo, seam.clone())
                    .err()
                    .unwrap_or_else(|| panic!("{}: the apply succeeded", what()));
                let msg = e.to_string();
                assert!(matches!(e, RootfsError::Apply { .. }), "{}: {msg}", what());
                assert!(msg.contains("No space left on device"), "{}: {msg}", what());
            }
            Fault::Kill => {
                let r = catch_unwind(AssertUnwindSafe(|| {
                    apply_changeset_with(&fx.archive, &t.root, &fx.policy, &undo, seam.clone())
                }));
                match r {
                    Err(p) if p.is::<Killed>() => {}
                    _ => panic!("{}: not killed", what()),
                }
                if undo_dir(&t.root).exists() {
                    let e = apply_changeset(&fx.archive, &t.root, &fx.policy, &undo)
                        .err()
                        .unwrap();
                    assert!(matches!(e, RootfsError::PendingUndo { .. }), "{e}");
                }
                rollback_pending(&t.root, &undo).unwrap_or_else(|e| panic!("{}: {e}", what()));
            }
        }
        assert_tree(&before, &t.root, &what());
    }
    eprintln!("{ops} faults ({how:?}) each left the target as it was");
}

mod rootfs {
    use super::*;

    #[test]
    fn a_failure_at_any_operation_puts_an_overlay_back() {
        every_operation_fails(Kind::Overlay, Fault::Fail);
    }

    #[test]
    fn a_kill_at_any_operation_is_rolled_back_from_the_journal_on_an_overlay() {
        every_operation_fails(Kind::Overlay, Fault::Kill);
    }

    #[test]
    fn a_failure_at_any_operation_puts_a_directory_back() {
        every_operation_fails(Kind::Plain, Fault::Fail);
    }

    #[test]
    fn a_kill_at_any_operation_is_rolled_back_from_the_journal_in_a_directory() {
        every_operation_fails(Kind::Plain, Fault::Kill);
    }

    /// Killed after the apply (the journal is all there is), then killed again at every
    /// operation of the rollback: the next rollback finishes the job. A rollback that fails
    /// (an error, not a kill) keeps the journal for the next one too.
    #[test]
    fn an_interrupted_rollback_resumes() {
        let fx = fixture();
        let undo = UndoLocation::default();
        let t = fx.target(Kind::Overlay, 0);
        let before = tree_digest(&t.root);
        apply_changeset(&fx.archive, &t.root, &fx.policy, &undo)
            .unwrap()
            .leave_pending();
        let seam = Faults::new(Fault::Kill);
        let rep = rollback_pending_with(&t.root, &undo, seam.clone()).unwrap();
        assert_eq!(rep.outcome, RollbackOutcome::RolledBack);
        assert_tree(&before, &t.root, "rollback_pending after the apply");
        let ops = seam.count();
        eprintln!("rollback: {ops} operations, {} records", rep.undone);
        for how in [Fault::Kill, Fault::Fail] {
            for m in 0..ops {
                let t = fx.target(Kind::Overlay, m + 1);
                apply_changeset(&fx.archive, &t.root, &fx.policy, &undo)
                    .unwrap()
                    .leave_pending();
                let seam = Faults::armed(how, m);
                let what = format!("rollback {how:?} at operation {m}");
                let r = catch_unwind(AssertUnwindSafe(|| {
                    rollback_pending_with(&t.root, &undo, seam.clone())
                }));
                match (how, r) {
                    (Fault::Kill, Err(p)) if p.is::<Killed>() => {}
                    (Fault::Fail, Ok(Err(e))) => {
                        assert!(matches!(e, RootfsError::Rollback { .. }), "{what}: {e}");
                        assert!(e.to_string().contains("No space left"), "{what}: {e}");
                    }
                    _ => panic!("{what}: ({}) was not interrupted", seam.op(m)),
                }
                assert!(undo_dir(&t.root).exists() || m + 3 >= ops, "{what}");
                rollback_pending(&t.root, &undo).unwrap_or_else(|e| panic!("{what}: {e}"));
                assert_tree(&before, &t.root, &what);
            }
        }
    }

    /// A commit killed at any of its operations: before its record is written the apply is
    /// rolled back; after, the next rollback_pending finishes the commit (never undoes it).
    #[test]
    fn an_interrupted_commit_is_finished_or_never_begun() {
        let fx = fixture();
        let undo = UndoLocation::default();
        let t = fx.target(Kind::Overlay, 0);
        let before = tree_digest(&t.root);
        let seam = Faults::new(Fault::Kill);
        let applied =
            apply_changeset_with(&fx.archive, &t.root, &fx.policy, &undo, seam.clone()).unwrap();
        let apply_ops = seam.count();
        applied.commit().unwrap();
        let ops = seam.count() - apply_ops;
        assert!(!undo_dir(&t.root).exists());
        let after = tree_digest(&t.root);
        assert!(diff_trees(&fx.changed, &after).is_empty());
        assert_eq!(
            rollback_pending(&t.root, &undo).unwrap().outcome,
            RollbackOutcome::NothingPending
        );
        for m in 0..ops {
            let t = fx.target(Kind::Overlay, m + 1);
            let seam = Faults::armed(Fault::Kill, apply_ops + m);
            let applied =
                apply_changeset_with(&fx.archive, &t.root, &fx.policy, &undo, seam.clone())
                    .unwrap();
            let r = catch_unwind(AssertUnwindSafe(|| applied.commit()));
            assert!(matches!(r, Err(ref p) if p.is::<Killed>()), "commit at {m}");
            let rep = rollback_pending(&t.root, &undo).unwrap();
            let what = format!(
                "commit killed at operation {m} ({})",
                seam.op(apply_ops + m)
            );
            if m == 0 {
                assert_eq!(rep.outcome, RollbackOutcome::RolledBack, "{what}");
                assert_tree(&before, &t.root, &what);
            } else {
                // Killed at its very last step, the commit left an empty undo directory.
                let done = [
                    RollbackOutcome::CommitFinished,
                    RollbackOutcome::EmptyRemoved,
                ];
                assert!(done.contains(&rep.outcome), "{what}: {rep:?}");
                assert_tree(&after, &t.root, &what);
            }
        }
    }

    /// An apply left pending is committed by path (as another process would), and a
    /// commit_pending killed at any of its operations is finished by the next one.
    #[test]
    fn a_pending_apply_is_committed_by_path() {
        let fx = fixture();
        let undo = UndoLocation::default();
        let t = fx.target(Kind::Overlay, 0);
        apply_changeset(&fx.archive, &t.root, &fx.policy, &undo)
            .unwrap()
            .leave_pending();
        let seam = Faults::new(Fault::Kill);
        let outcome = commit_pending_with(&t.root, &undo, seam.clone()).unwrap();
        assert_eq!(outcome, RollbackOutcome::CommitFinished);
        let after = tree_digest(&t.root);
        assert!(diff_trees(&fx.changed, &after).is_empty());
        assert_eq!(
            commit_pending(&t.root, &undo).unwrap(),
            RollbackOutcome::NothingPending
        );
        let ops = seam.count();
        for m in 0..ops {
            let t = fx.target(Kind::Overlay, m + 1);
            apply_changeset(&fx.archive, &t.root, &fx.policy, &undo)
                .unwrap()
                .leave_pending();
            let seam = Faults::armed(Fault::Kill, m);
            let r = catch_unwind(AssertUnwindSafe(|| {
                commit_pending_with(&t.root, &undo, seam.clone())
            }));
            let what = format!("commit_pending killed at operation {m} ({})", seam.op(m));
            assert!(matches!(r, Err(ref p) if p.is::<Killed>()), "{what}");
            commit_pending(&t.root, &undo).unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_tree(&after, &t.root, &what);
        }
    }

    /// Dropping an applied changeset without deciding rolls it back; nothing pending is a
    /// no-op; a running apply's undo data is never touched by another rollback; something
    /// else at the undo directory's name is left alone.
    #[test]
    fn undo_data_is_only_cryos_and_only_when_nobody_holds_it() {
        let fx = fixture();
        let undo = UndoLocation::default();
        let t = fx.target(Kind::Overlay, 0);
        let before = tree_digest(&t.root);
        assert_eq!(
            rollback_pending(&t.root, &undo).unwrap().outcome,
            RollbackOutcome::NothingPending
        );
        let applied = apply_changeset(&fx.archive, &t.root, &fx.policy, &undo).unwrap();
        let e = rollback_pending(&t.root, &undo).err().unwrap();
        assert!(matches!(e, RootfsError::UndoBusy { .. }), "{e}");
        drop(applied);
        assert_tree(&before, &t.root, "dropped without a commit");

        let d = undo_dir(&t.root);
        fs::create_dir(&d).unwrap();
        fs::write(d.join("mine"), b"x").unwrap();
        fs::set_permissions(&d, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        for (what, prep) in [("0755", None), ("files, no journal", Some(0o700))] {
            if let Some(mode) = prep {
                fs::set_permissions(&d, std::os::unix::fs::PermissionsExt::from_mode(mode))
                    .unwrap();
            }
            let e = rollback_pending(&t.root, &undo).err().unwrap();
            assert!(matches!(e, RootfsError::NotUndoDir { .. }), "{what}: {e}");
            assert_eq!(fs::read(d.join("mine")).unwrap(), b"x", "{what}");
        }
        let e = apply_changeset(&fx.archive, &t.root, &fx.policy, &undo)
            .err()
            .unwrap();
        assert!(matches!(e, RootfsError::PendingUndo { .. }), "{e}");
        fs::remove_dir_all(&d).unwrap();
        std::os::unix::fs::symlink("/tmp", &d).unwrap();
        let e = rollback_pending(&t.root, &undo).err().unwrap();
        assert!(e.to_string().contains("not a directory"), "{e}");
        fs::remove_file(&d).unwrap();
        assert_tree(&before, &t.root, "left alone");
    }

    /// What the apply writes is private until it takes its final metadata: the undo
    /// directory 0700, the journal and temporary files 0600, new directories 0700 and nodes
    /// 0600 until their owner and mode are set.
    #[test]
    fn everything_in_flight_is_private() {
        let fx = fixture();
        let undo = UndoLocation::default();
        let t = fx.target(Kind::Overlay, 0);
        struct Watch {
            root: PathBuf,
            last: Mutex<Option<String>>,
            checked: AtomicUsize,
        }
        impl FsSeam for Watch {
            fn before(&self, op: &FsOp<'_>) -> std::io::Result<()> {
                let mode = |p: &str| {
                    fs::symlink_metadata(self.root.join(p))
                        .map(|m| m.mode() & 0o7777)
                        .ok()
                };
                let mut last = self.last.lock().unwrap();
                if op.path.starts_with(UndoLocation::DEFAULT_NAME) && op.kind != FsOpKind::Mkdir {
                    assert_eq!(mode(UndoLocation::DEFAULT_NAME), Some(0o700), "{op}");
                    let j = format!("{}/journal", UndoLocation::DEFAULT_NAME);
                    if let Some(m) = mode(&j) {
                        assert_eq!(m, 0o600, "journal at {op}");
                    }
                }
                match op.kind {
                    FsOpKind::Write => {
                        assert_eq!(mode(op.path), Some(0o600), "{op}");
                        self.checked.fetch_add(1, Ordering::SeqCst);
                    }
                    // The operation after a mkdir or mknod: what it made is still private.
                    FsOpKind::Owner if last.as_deref() == Some(op.path) => {
                        let m = mode(op.path).unwrap();
                        assert!(m == 0o700 || m == 0o600, "{op}: {m:o}");
                        self.checked.fetch_add(1, Ordering::SeqCst);
                    }
                    _ => {}
                }
                *last = matches!(op.kind, FsOpKind::Mkdir | FsOpKind::Mknod)
                    .then(|| op.path.to_string());
                Ok(())
            }
        }
        let seam = Arc::new(Watch {
            root: t.root.clone(),
            last: Mutex::new(None),
            checked: AtomicUsize::new(0),
        });
        apply_changeset_with(&fx.archive, &t.root, &fx.policy, &undo, seam.clone())
            .unwrap()
            .commit()
            .unwrap();
        assert!(seam.checked.load(Ordering::SeqCst) > 20);
    }
}
