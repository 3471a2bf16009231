//! Putting the target back from the undo journal, or keeping the changes: what an
//! [`AppliedChangeset`] decides, and what [`rollback_pending`] finishes after a crash.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{openat, renameat, renameat2, RenameFlags};
use nix::sys::stat::{fchmod, futimens, mkdirat, utimensat, Mode, SFlag, UtimensatFlags};
use nix::unistd::{fchown, unlinkat, Gid, Uid, UnlinkatFlags};

use super::journal::{DirState, Journal, OpenError, Record, JOURNAL};
use super::safe::{
    dir_flags, kind, list_dir, lstat_at, open_real_path, open_root, owned, remove_any,
};
use super::seam::{FsOpKind, FsSeam, NoFaults};
use super::undo::{ask, overlay_private, At, OpError, Undo, UndoLocation};
use super::{io_err, ApplyReport, Result, RootfsError};

/// What a rollback found and did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RollbackReport {
    /// What was pending.
    pub outcome: RollbackOutcome,
    /// Journal records undone.
    pub undone: u64,
    /// Time taken.
    pub elapsed: Duration,
}

/// What [`rollback_pending`] (or [`commit_pending`]) found and did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RollbackOutcome {
    /// No undo data: nothing to do.
    NothingPending,
    /// An apply (finished or not) was undone: the target is as it was before it.
    RolledBack,
    /// A commit had begun: its removal of the undo data was finished, the changes kept.
    CommitFinished,
    /// The undo directory held no journal and nothing else (an apply killed before its
    /// first record, or a commit killed at its very end): it was removed, nothing undone.
    EmptyRemoved,
}

/// Undo the journal from its end, then remove the undo directory and give the root its times.
pub(crate) fn roll_back(
    root: &OwnedFd,
    undo: &OwnedFd,
    name: &OsStr,
    journal: &mut Journal,
    seam: &dyn FsSeam,
) -> std::result::Result<RollbackReport, OpError> {
    let start = Instant::now();
    let jshown = format!("{}/{JOURNAL}", name.to_string_lossy());
    let records = journal.read().map_err(|r| OpError {
        step: "read the undo journal",
        path: jshown.clone(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, r),
    })?;
    if records.iter().any(|(_, r)| *r == Record::Commit) {
        finish_commit(root, undo, name, seam)?;
        return Ok(RollbackReport {
            outcome: RollbackOutcome::CommitFinished,
            undone: 0,
            elapsed: start.elapsed(),
        });
    }
    let root_times = match records.first() {
        Some((_, Record::Begin { root, .. })) => Some(*root),
        _ => None,
    };
    let mut undone = 0;
    for (off, rec) in records.iter().skip(1).rev() {
        undo_one(root, undo, rec, seam)?;
        ask(seam, FsOpKind::Journal, &jshown)?;
        journal.truncate(*off).at("cut the undo journal", &jshown)?;
        undone += 1;
    }
    remove_undo_dir(root, undo, name, seam)?;
    if let Some(t) = root_times {
        ask(seam, FsOpKind::Times, "/")?;
        futimens(root.as_raw_fd(), &t.atime(), &t.mtime()).at("set the times of", "/")?;
    }
    Ok(RollbackReport {
        outcome: RollbackOutcome::RolledBack,
        undone,
        elapsed: start.elapsed(),
    })
}

/// Undo one journal record; doing it twice is the same as doing it once.
fn undo_one(
    root: &OwnedFd,
    undo: &OwnedFd,
    rec: &Record,
    seam: &dyn FsSeam,
) -> std::result::Result<(), OpError> {
    match rec {
        Record::Begin { .. } | Record::Commit => Ok(()),
        Record::Created { path } => {
            let Some((parents, leaf)) = path.split() else {
                return Ok(());
            };
            let shown = path.shown();
            let Some(parent) = open_real_path(root, parents).at("open the parent of", &shown)?
            else {
                return Ok(());
            };
            if lstat_at(&parent, leaf).at("stat", &shown)?.is_none() {
                return Ok(());
            }
            ask(seam, FsOpKind::Remove, &shown)?;
            remove_any(&parent, leaf).at("remove", &shown).map(|_| ())
        }
        Record::MovedAside { path, saved, times } => {
            let saved = OsStr::new(saved);
            if lstat_at(undo, saved)
                .at("stat the saved copy of", &path.shown())?
                .is_none()
            {
                return Ok(()); // never moved, or already back
            }
            let shown = path.shown();
            let (parents, leaf) = path.split().ok_or_else(|| OpError {
                step: "put back",
                path: shown.clone(),
                source: std::io::Error::other("empty path in the journal"),
            })?;
            let parent = open_real_path(root, parents)
                .at("open the parent of", &shown)?
                .ok_or_else(|| OpError {
                    step: "put back",
                    path: shown.clone(),
                    source: std::io::Error::other("its parent directory is missing"),
                })?;
            ask(seam, FsOpKind::Rename, &shown)?;
            renameat2(
                Some(undo.as_raw_fd()),
                saved,
                Some(parent.as_raw_fd()),
                leaf,
                RenameFlags::RENAME_NOREPLACE,
            )
            .at("put back", &shown)?;
            if let Some(t) = times {
                ask(seam, FsOpKind::Times, &shown)?;
                utimensat(
                    Some(parent.as_raw_fd()),
                    leaf,
                    &t.atime(),
                    &t.mtime(),
                    UtimensatFlags::NoFollowSymlink,
                )
                .at("set the times of", &shown)?;
            }
            Ok(())
        }
        Record::CopiedAside { path, saved } => {
            let saved = OsStr::new(saved);
            let shown = path.shown();
            if lstat_at(undo, saved)
                .at("stat the saved copy of", &shown)?
                .is_none()
            {
                return Ok(()); // already back
            }
            let (parents, leaf) = path.split().ok_or_else(|| OpError {
                step: "put back",
                path: shown.clone(),
                source: std::io::Error::other("empty path in the journal"),
            })?;
            let parent = open_real_path(root, parents)
                .at("open the parent of", &shown)?
                .ok_or_else(|| OpError {
                    step: "put back",
                    path: shown.clone(),
                    source: std::io::Error::other("its parent directory is missing"),
                })?;
            ask(seam, FsOpKind::Rename, &shown)?;
            renameat(
                Some(undo.as_raw_fd()),
                saved,
                Some(parent.as_raw_fd()),
                leaf,
            )
            .at("put back", &shown)
        }
        Record::DirTimes { path, times } => {
            let shown = path.shown();
            let Some(dir) = open_real_path(root, &path.0).at("open", &shown)? else {
                return Ok(());
            };
            ask(seam, FsOpKind::Times, &shown)?;
            futimens(dir.as_raw_fd(), &times.atime(), &times.mtime()).at("set the times of", &shown)
        }
        Record::DirMeta { path, state } => {
            let shown = path.shown();
            let Some(dir) = open_real_path(root, &path.0).at("open", &shown)? else {
                return Ok(());
            };
            restore_dir_state(&File::from(dir), state, seam, &shown)
        }
        Record::RemovedDir { path, state } => {
            let shown = path.shown();
            let (parents, leaf) = path.split().ok_or_else(|| OpError {
                step: "make again",
                path: shown.clone(),
                source: std::io::Error::other("empty path in the journal"),
            })?;
            let parent = open_real_path(root, parents)
                .at("open the parent of", &shown)?
                .ok_or_else(|| OpError {
                    step: "make again",
                    path: shown.clone(),
                    source: std::io::Error::other("its parent directory is missing"),
                })?;
            if lstat_at(&parent, leaf).at("stat", &shown)?.is_none() {
                ask(seam, FsOpKind::Mkdir, &shown)?;
                mkdirat(
                    Some(parent.as_raw_fd()),
                    leaf,
                    Mode::from_bits_truncate(0o700),
                )
                .at("make again", &shown)?;
            }
            let dir = openat(Some(parent.as_raw_fd()), leaf, dir_flags(), Mode::empty())
                .at("open", &shown)?;
            restore_dir_state(&File::from(owned(dir)), state, seam, &shown)
        }
    }
}

/// Give a directory back its journaled metadata.
fn restore_dir_state(
    dir: &File,
    s: &DirState,
    seam: &dyn FsSeam,
    shown: &str,
) -> std::result::Result<(), OpError> {
    ask(seam, FsOpKind::Owner, shown)?;
    fchown(
        dir.as_raw_fd(),
        Some(Uid::from_raw(s.uid)),
        Some(Gid::from_raw(s.gid)),
    )
    .at("chown", shown)?;
    ask(seam, FsOpKind::Mode, shown)?;
    fchmod(dir.as_raw_fd(), Mode::from_bits_truncate(s.mode)).at("chmod", shown)?;
    let have: Vec<OsString> = match xattr::FileExt::list_xattr(dir) {
        Ok(n) => n.collect(),
        Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => Vec::new(),
        Err(e) => return Err(e).at("list the xattrs of", shown),
    };
    for n in have {
        if !overlay_private(n.as_bytes()) && !s.xattrs.iter().any(|(k, _)| k.0 == n.as_bytes()) {
            ask(seam, FsOpKind::Xattr, shown)?;
            xattr::FileExt::remove_xattr(dir, &n).at("remove an xattr of", shown)?;
        }
    }
    for (k, v) in &s.xattrs {
        ask(seam, FsOpKind::Xattr, shown)?;
        xattr::FileExt::set_xattr(dir, OsStr::from_bytes(&k.0), &v.0)
            .at("set an xattr of", shown)?;
    }
    ask(seam, FsOpKind::Times, shown)?;
    futimens(dir.as_raw_fd(), &s.times.atime(), &s.times.mtime()).at("set the times of", shown)
}

/// Remove what the undo directory holds (the journal last), then the directory.
fn remove_undo_dir(
    root: &OwnedFd,
    undo: &OwnedFd,
    name: &OsStr,
    seam: &dyn FsSeam,
) -> std::result::Result<(), OpError> {
    let base = name.to_string_lossy().into_owned();
    for entry in list_dir(undo).at("list", &base)? {
        if entry == JOURNAL {
            continue;
        }
        let shown = format!("{base}/{}", entry.to_string_lossy());
        ask(seam, FsOpKind::Remove, &shown)?;
        remove_any(undo, &entry).at("remove", &shown)?;
    }
    let jshown = format!("{base}/{JOURNAL}");
    ask(seam, FsOpKind::Remove, &jshown)?;
    match unlinkat(Some(undo.as_raw_fd()), JOURNAL, UnlinkatFlags::NoRemoveDir) {
        Ok(()) | Err(Errno::ENOENT) => {}
        Err(e) => return Err(e).at("remove", &jshown),
    }
    ask(seam, FsOpKind::Remove, &base)?;
    match unlinkat(Some(root.as_raw_fd()), name, UnlinkatFlags::RemoveDir) {
        Ok(()) | Err(Errno::ENOENT) => Ok(()),
        Err(e) => Err(e).at("remove", &base),
    }
}

pub(crate) fn finish_commit(
    root: &OwnedFd,
    undo: &OwnedFd,
    name: &OsStr,
    seam: &dyn FsSeam,
) -> std::result::Result<(), OpError> {
    remove_undo_dir(root, undo, name, seam)
}

/// The changes of an apply, kept or undone as the caller decides.
///
/// Dropping it without [`commit`](Self::commit) rolls the changes back (and logs it).
#[must_use = "dropping an applied changeset rolls it back: commit() keeps it"]
pub struct AppliedChangeset {
    undo: Option<Undo>,
    report: ApplyReport,
    target: PathBuf,
}

impl AppliedChangeset {
    pub(crate) fn new(undo: Undo, report: ApplyReport, target: &Path) -> Self {
        AppliedChangeset {
            undo: Some(undo),
            report,
            target: target.to_path_buf(),
        }
    }

    /// What the apply did.
    pub fn report(&self) -> &ApplyReport {
        &self.report
    }

    /// Keep the changes and remove the undo data. If even the commit record cannot be
    /// written, the changes are rolled back instead and the error says so.
    pub fn commit(mut self) -> Result<()> {
        let Some(undo) = self.undo.take() else {
            return Ok(());
        };
        let undo_path = self.target.join(undo.name());
        undo.commit()
            .map_err(|(e, rolled_back)| RootfsError::Commit {
                target: self.target.clone(),
                step: e.step,
                path: e.path,
                source: e.source,
                outcome: if rolled_back {
                    "the changes were rolled back instead: the target is as it was".into()
                } else {
                    format!(
                        "the changes are kept; the undo data left in {} is removed by the next \
                     rollback_pending (which never undoes a commit)",
                        undo_path.display()
                    )
                },
            })
    }

    /// Decide neither now: close the journal (releasing its lock) and leave the changes and
    /// their undo data on disk, for a [`rollback_pending`] by another process or a later
    /// verb (as if this process had ended here).
    pub fn leave_pending(mut self) {
        self.undo = None;
    }

    /// Undo the changes: the target is as it was before the apply.
    pub fn rollback(mut self) -> Result<RollbackReport> {
        let Some(undo) = self.undo.take() else {
            return Ok(RollbackReport {
                outcome: RollbackOutcome::NothingPending,
                undone: 0,
                elapsed: Duration::ZERO,
            });
        };
        let undo_path = self.target.join(undo.name());
        undo.rollback()
            .map_err(|e| rollback_error(&self.target, &undo_path, e))
    }
}

impl Drop for AppliedChangeset {
    fn drop(&mut self) {
        if let Some(undo) = self.undo.take() {
            let undo_path = self.target.join(undo.name());
            match undo.rollback() {
                Ok(_) => tracing::warn!(
                    target = %self.target.display(),
                    "rootfs changeset neither committed nor rolled back: rolled back"
                ),
                Err(e) => tracing::error!(
                    target = %self.target.display(),
                    error = %rollback_error(&self.target, &undo_path, e),
                    "rolling back an uncommitted rootfs changeset failed"
                ),
            }
        }
    }
}

pub(crate) fn rollback_error(target: &Path, undo: &Path, e: OpError) -> RootfsError {
    RootfsError::Rollback {
        target: target.to_path_buf(),
        undo: undo.to_path_buf(),
        step: e.step,
        path: e.path,
        source: e.source,
    }
}

/// Put `target_root` back as it was before an apply that did not finish or was never
/// committed (cryo was killed during the apply, or between it and the commit): the journal
/// in the undo directory is all it needs. Finishes a commit that had begun. Does nothing
/// when no undo data is there. Refuses to touch an undo directory an apply or rollback in
/// another process still holds, or a directory of that name that is not cryo's.
pub fn rollback_pending(target_root: &Path, undo: &UndoLocation) -> Result<RollbackReport> {
    rollback_pending_with(target_root, undo, Arc::new(NoFaults))
}

/// [`rollback_pending`] with a test seam.
pub fn rollback_pending_with(
    target_root: &Path,
    loc: &UndoLocation,
    seam: Arc<dyn FsSeam>,
) -> Result<RollbackReport> {
    let start = Instant::now();
    let report = |outcome, undone| RollbackReport {
        outcome,
        undone,
        elapsed: start.elapsed(),
    };
    let Some(p) = Pending::open(target_root, loc)? else {
        return Ok(report(RollbackOutcome::NothingPending, 0));
    };
    let fail = |e| rollback_error(target_root, &p.undo_path, e);
    match p.journal {
        None => {
            remove_undo_dir(&p.root, &p.dir, loc.name(), &*seam).map_err(fail)?;
            Ok(report(RollbackOutcome::EmptyRemoved, 0))
        }
        Some(mut journal) => {
            roll_back(&p.root, &p.dir, loc.name(), &mut journal, &*seam).map_err(fail)
        }
    }
}

/// Keep the changes of an apply left pending ([`AppliedChangeset::leave_pending`], or a
/// process that ended after the apply): journal the commit and remove the undo data. Finishes
/// a begun commit; does nothing when no undo data is there (`NothingPending`). The same
/// refusals as [`rollback_pending`].
pub fn commit_pending(target_root: &Path, loc: &UndoLocation) -> Result<RollbackOutcome> {
    commit_pending_with(target_root, loc, Arc::new(NoFaults))
}

/// [`commit_pending`] with a test seam.
pub fn commit_pending_with(
    target_root: &Path,
    loc: &UndoLocation,
    seam: Arc<dyn FsSeam>,
) -> Result<RollbackOutcome> {
    let Some(p) = Pending::open(target_root, loc)? else {
        return Ok(RollbackOutcome::NothingPending);
    };
    let fail = |e: OpError, outcome: String| RootfsError::Commit {
        target: target_root.to_path_buf(),
        step: e.step,
        path: e.path,
        source: e.source,
        outcome,
    };
    let Some(mut journal) = p.journal else {
        remove_undo_dir(&p.root, &p.dir, loc.name(), &*seam)
            .map_err(|e| fail(e, "the undo directory held nothing".into()))?;
        return Ok(RollbackOutcome::EmptyRemoved);
    };
    let jshown = format!("{}/{JOURNAL}", loc.name().to_string_lossy());
    let not_yet = |e: OpError| {
        fail(
            e,
            "nothing was committed: the changes are still pending (commit or roll back again)"
                .into(),
        )
    };
    let records = journal.read().map_err(|r| {
        not_yet(OpError {
            step: "read the undo journal",
            path: jshown.clone(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, r),
        })
    })?;
    if !records.iter().any(|(_, r)| *r == Record::Commit) {
        ask(&*seam, FsOpKind::Journal, &jshown).map_err(not_yet)?;
        journal
            .append(&Record::Commit)
            .at("write the undo journal", &jshown)
            .map_err(not_yet)?;
    }
    finish_commit(&p.root, &p.dir, loc.name(), &*seam).map_err(|e| {
        fail(
            e,
            format!(
                "the changes are kept; the undo data left in {} goes at the next commit_pending \
                 or rollback_pending (neither undoes a commit)",
                p.undo_path.display()
            ),
        )
    })?;
    Ok(RollbackOutcome::CommitFinished)
}

/// Undo data found at a target root, checked to be cryo's, its journal locked.
struct Pending {
    root: OwnedFd,
    dir: OwnedFd,
    undo_path: PathBuf,
    /// `None`: an empty undo directory (made but not journaled, or a commit's last step).
    journal: Option<Journal>,
}

impl Pending {
    fn open(target_root: &Path, loc: &UndoLocation) -> Result<Option<Pending>> {
        let root = open_root(target_root).map_err(io_err("open target root", target_root))?;
        let undo_path = target_root.join(loc.name());
        let not_ours = |reason: &str| RootfsError::NotUndoDir {
            path: undo_path.clone(),
            reason: reason.into(),
        };
        let Some(st) =
            lstat_at(&root, loc.name()).map_err(|e| io_err("stat", &undo_path)(e.into()))?
        else {
            return Ok(None);
        };
        if kind(&st) != SFlag::S_IFDIR {
            return Err(not_ours("it is not a directory"));
        }
        if st.st_uid != nix::unistd::geteuid().as_raw() || st.st_mode & 0o077 != 0 {
            return Err(not_ours("cryo makes it 0700, owned by the user it runs as"));
        }
        let dir = openat(
            Some(root.as_raw_fd()),
            loc.name(),
            dir_flags(),
            Mode::empty(),
        )
        .map_err(|e| io_err("open", &undo_path)(e.into()))?;
        let dir = owned(dir);
        let journal = match Journal::open(&dir) {
            Ok(j) => Some(j),
            Err(OpenError::Busy) => return Err(RootfsError::UndoBusy { undo: undo_path }),
            Err(OpenError::Io(e)) => return Err(io_err("open the journal in", &undo_path)(e)),
            Err(OpenError::Missing) => {
                if !list_dir(&dir)
                    .map_err(io_err("list", &undo_path))?
                    .is_empty()
                {
                    return Err(not_ours("it holds files but no journal"));
                }
                None
            }
        };
        Ok(Some(Pending {
            root,
            dir,
            undo_path,
            journal,
        }))
    }
}
