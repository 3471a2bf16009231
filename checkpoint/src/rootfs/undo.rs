//! The apply's undo data, and putting the target back.
//!
//! Before the apply changes anything it makes the undo directory (0700, named by
//! [`UndoLocation`]) at the target root, on the target's own filesystem, and its journal
//! (0600, see `journal`). Every change is journaled first, then made:
//!
//! - an existing entry the changeset replaces or removes is *moved aside*: renamed into the
//!   undo directory. A directory that cannot be renamed (a lower directory of an overlay
//!   without `redirect_dir`: `EXDEV`) is taken apart instead: its entries are moved aside one
//!   by one (recursively), its own metadata is journaled, and the emptied directory removed;
//! - what is made where nothing was is journaled for removal;
//! - an existing directory's metadata, and the times of every directory whose entries change,
//!   are journaled before they change;
//! - file data is written into temporary files in the undo directory (0600) that take their
//!   final metadata there and are then renamed into place.
//!
//! A rollback undoes the journal from its end, cutting each record off once undone, so a
//! rollback that is itself interrupted resumes where it stopped. A commit journals that it
//! commits, then removes the undo directory; an interrupted commit is finished, never undone.

use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{openat, renameat, renameat2, OFlag, RenameFlags};
use nix::sys::stat::{fchmod, fstat, futimens, mkdirat, utimensat, Mode, SFlag, UtimensatFlags};
use nix::unistd::{fchown, unlinkat, Gid, Uid, UnlinkatFlags};

use super::journal::{Bytes, DirState, Journal, OpenError, Record, RelPath, Times, JOURNAL};
use super::safe::{
    dir_flags, kind, list_dir, lstat_at, open_real_path, open_root, owned, remove_any,
};
use super::seam::{FsOp, FsOpKind, FsSeam, NoFaults};
use super::{io_err, ApplyReport, Result, RootfsError};

/// Where the apply keeps its undo data: a directory of this name at the target root (a
/// rename only moves within a filesystem). No changeset entry may name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UndoLocation {
    name: OsString,
}

impl UndoLocation {
    /// The name cryo uses.
    pub const DEFAULT_NAME: &'static str = ".cryo-rootfs-undo";

    /// Another name (one path component).
    pub fn new(name: impl Into<OsString>) -> Result<Self> {
        let name = name.into();
        let b = name.as_bytes();
        let reason = if b.is_empty() || b == b"." || b == b".." {
            Some("not a file name")
        } else if b.contains(&b'/') || b.contains(&0) {
            Some("it must be one path component")
        } else if b.len() > super::meta::NAME_MAX {
            Some("longer than NAME_MAX")
        } else {
            None
        };
        match reason {
            Some(r) => Err(RootfsError::InvalidUndoName {
                name: name.to_string_lossy().into_owned(),
                reason: r.into(),
            }),
            None => Ok(UndoLocation { name }),
        }
    }

    /// The directory's name at the target root.
    pub fn name(&self) -> &OsStr {
        &self.name
    }
}

impl Default for UndoLocation {
    fn default() -> Self {
        UndoLocation {
            name: OsString::from(Self::DEFAULT_NAME),
        }
    }
}

/// One operation that failed: what, where (relative to the target root), why.
#[derive(Debug)]
pub(crate) struct OpError {
    pub(crate) step: &'static str,
    pub(crate) path: String,
    pub(crate) source: std::io::Error,
}

/// Errors the walking helpers give as text, with the kind of an OS error where they had one.
pub(crate) trait IntoIo {
    fn into_io(self) -> std::io::Error;
}

impl IntoIo for std::io::Error {
    fn into_io(self) -> std::io::Error {
        self
    }
}

impl IntoIo for Errno {
    fn into_io(self) -> std::io::Error {
        self.into()
    }
}

impl IntoIo for String {
    fn into_io(self) -> std::io::Error {
        std::io::Error::other(self)
    }
}

/// Name the step and path of a failed operation.
pub(crate) trait At<T> {
    fn at(self, step: &'static str, path: &str) -> std::result::Result<T, OpError>;
}

impl<T, E: IntoIo> At<T> for std::result::Result<T, E> {
    fn at(self, step: &'static str, path: &str) -> std::result::Result<T, OpError> {
        self.map_err(|e| OpError {
            step,
            path: path.to_string(),
            source: e.into_io(),
        })
    }
}

/// A directory held open, with its real path below the target root.
#[derive(Clone, Copy)]
pub(crate) struct DirAt<'a> {
    pub(crate) fd: &'a OwnedFd,
    pub(crate) path: &'a [OsString],
}

impl DirAt<'_> {
    pub(crate) fn child(&self, name: &OsStr) -> RelPath {
        let mut p = self.path.to_vec();
        p.push(name.to_os_string());
        RelPath(p)
    }
}

/// Ask the seam, then do it.
pub(crate) fn ask(
    seam: &dyn FsSeam,
    kind: FsOpKind,
    path: &str,
) -> std::result::Result<(), OpError> {
    seam.before(&FsOp { kind, path })
        .at("injected fault before", path)
}

/// An apply in progress: the journal and the undo directory.
pub(crate) struct Undo {
    root: OwnedFd,
    dir: OwnedFd,
    name: OsString,
    journal: Journal,
    seam: Arc<dyn FsSeam>,
    seq: u64,
    /// Directories whose times are journaled.
    timed: HashSet<Vec<OsString>>,
    /// Directories whose metadata is journaled.
    described: HashSet<Vec<OsString>>,
    /// Directories the apply made (removed whole by a rollback).
    fresh: HashSet<Vec<OsString>>,
    pub(crate) moved_aside: u64,
    pub(crate) taken_apart: u64,
}

impl Undo {
    /// Make the undo directory and its journal at `root`.
    pub(crate) fn begin(
        root: OwnedFd,
        loc: &UndoLocation,
        seam: Arc<dyn FsSeam>,
    ) -> std::result::Result<Undo, OpError> {
        let name = loc.name().to_os_string();
        let shown = name.to_string_lossy().into_owned();
        let times = Times::of(&fstat(root.as_raw_fd()).at("stat", "/")?);
        ask(&*seam, FsOpKind::Mkdir, &shown)?;
        mkdirat(
            Some(root.as_raw_fd()),
            name.as_os_str(),
            Mode::from_bits_truncate(0o700),
        )
        .at("make the undo directory", &shown)?;
        let made = (|| -> std::result::Result<(OwnedFd, Journal), OpError> {
            let dir = owned(
                openat(
                    Some(root.as_raw_fd()),
                    name.as_os_str(),
                    dir_flags(),
                    Mode::empty(),
                )
                .at("open the undo directory", &shown)?,
            );
            let jpath = format!("{shown}/{JOURNAL}");
            ask(&*seam, FsOpKind::Create, &jpath)?;
            let journal = Journal::create(&dir).at("create the undo journal", &jpath)?;
            Ok((dir, journal))
        })();
        let (dir, journal) = match made {
            Ok(x) => x,
            Err(e) => {
                let _ = remove_any(&root, &name);
                return Err(e);
            }
        };
        let mut u = Undo {
            root,
            dir,
            name,
            journal,
            seam,
            seq: 0,
            timed: HashSet::new(),
            described: HashSet::new(),
            fresh: HashSet::new(),
            moved_aside: 0,
            taken_apart: 0,
        };
        if let Err(e) = u.record(&Record::begin(times)) {
            let _ = remove_any(&u.root, &u.name);
            return Err(e);
        }
        Ok(u)
    }

    /// The undo directory's name at the root.
    pub(crate) fn name(&self) -> &OsStr {
        &self.name
    }

    pub(crate) fn seam(&self) -> &dyn FsSeam {
        &*self.seam
    }

    /// `<undo>/<name>` for messages and the seam.
    pub(crate) fn shown(&self, name: &OsStr) -> String {
        format!("{}/{}", self.name.to_string_lossy(), name.to_string_lossy())
    }

    fn next(&mut self, prefix: &str) -> OsString {
        self.seq += 1;
        OsString::from(format!("{prefix}{}", self.seq))
    }

    fn record(&mut self, rec: &Record) -> std::result::Result<(), OpError> {
        let shown = self.shown(OsStr::new(JOURNAL));
        ask(&*self.seam, FsOpKind::Journal, &shown)?;
        self.journal
            .append(rec)
            .at("write the undo journal", &shown)
    }

    /// Journal `dir`'s times before the first change among its entries.
    pub(crate) fn note_times(&mut self, dir: DirAt<'_>) -> std::result::Result<(), OpError> {
        if dir.path.is_empty() || self.timed.contains(dir.path) || self.fresh.contains(dir.path) {
            return Ok(()); // the root's are in the begin record; a fresh dir goes whole
        }
        let path = RelPath(dir.path.to_vec());
        let times = Times::of(&fstat(dir.fd.as_raw_fd()).at("stat", &path.shown())?);
        self.record(&Record::DirTimes {
            path: path.clone(),
            times,
        })?;
        self.timed.insert(path.0);
        Ok(())
    }

    /// Journal that something is made at `name` in `parent`, where nothing is.
    pub(crate) fn will_create(
        &mut self,
        parent: DirAt<'_>,
        name: &OsStr,
    ) -> std::result::Result<(), OpError> {
        self.note_times(parent)?;
        if self.fresh.contains(parent.path) {
            return Ok(()); // removed with its fresh parent
        }
        self.record(&Record::Created {
            path: parent.child(name),
        })
    }

    /// Make directory `name` in `parent` (0700 until the entry's metadata is set), journaled.
    pub(crate) fn make_dir(
        &mut self,
        parent: DirAt<'_>,
        name: &OsStr,
        mode: u32,
    ) -> std::result::Result<(), OpError> {
        self.will_create(parent, name)?;
        let path = parent.child(name);
        ask(&*self.seam, FsOpKind::Mkdir, &path.shown())?;
        mkdirat(
            Some(parent.fd.as_raw_fd()),
            name,
            Mode::from_bits_truncate(mode),
        )
        .at("mkdir", &path.shown())?;
        self.fresh.insert(path.0);
        Ok(())
    }

    /// Journal an existing directory's metadata before the apply changes it.
    pub(crate) fn describe_dir(
        &mut self,
        dir: &File,
        path: &RelPath,
    ) -> std::result::Result<(), OpError> {
        if self.fresh.contains(&path.0) || !self.described.insert(path.0.clone()) {
            return Ok(());
        }
        let state = dir_state(dir).at("read the metadata of", &path.shown())?;
        self.record(&Record::DirMeta {
            path: path.clone(),
            state,
        })
    }

    /// Move whatever is at `name` in `parent` into the undo directory. Returns whether
    /// something was there.
    pub(crate) fn move_aside(
        &mut self,
        parent: DirAt<'_>,
        name: &OsStr,
    ) -> std::result::Result<bool, OpError> {
        let path = parent.child(name);
        let shown = path.shown();
        let Some(st) = lstat_at(parent.fd, name).at("stat", &shown)? else {
            return Ok(false);
        };
        self.note_times(parent)?;
        let saved = self.next("s");
        let is_dir = kind(&st) == SFlag::S_IFDIR;
        self.record(&Record::MovedAside {
            path,
            saved: saved.to_string_lossy().into_owned(),
            times: is_dir.then(|| Times::of(&st)),
        })?;
        ask(&*self.seam, FsOpKind::Rename, &shown)?;
        let moved = renameat(
            Some(parent.fd.as_raw_fd()),
            name,
            Some(self.dir.as_raw_fd()),
            saved.as_os_str(),
        );
        match moved {
            Ok(()) => {
                self.moved_aside += 1;
                Ok(true)
            }
            // An overlay cannot rename a directory it merges from a lower layer. The record
            // above names a saved entry that does not exist: undoing it does nothing.
            Err(Errno::EXDEV) if is_dir => {
                self.take_apart(parent, name)?;
                Ok(true)
            }
            Err(e) => Err(e).at("move aside", &shown),
        }
    }

    /// Move a directory's entries aside one by one, then remove it (see the module docs).
    fn take_apart(&mut self, parent: DirAt<'_>, name: &OsStr) -> std::result::Result<(), OpError> {
        let path = parent.child(name);
        let shown = path.shown();
        let fd = owned(
            openat(
                Some(parent.fd.as_raw_fd()),
                name,
                dir_flags(),
                Mode::empty(),
            )
            .at("open", &shown)?,
        );
        let state = dir_state(&File::from(fd.try_clone().at("dup", &shown)?))
            .at("read the metadata of", &shown)?;
        let here = DirAt {
            fd: &fd,
            path: &path.0,
        };
        for child in list_dir(&fd).at("list", &shown)? {
            self.move_aside(here, &child)?;
        }
        self.record(&Record::RemovedDir { path, state })?;
        ask(&*self.seam, FsOpKind::Remove, &shown)?;
        unlinkat(Some(parent.fd.as_raw_fd()), name, UnlinkatFlags::RemoveDir)
            .at("remove the emptied directory", &shown)?;
        self.taken_apart += 1;
        Ok(())
    }

    /// A new private (0600) file in the undo directory, for data on its way into place.
    pub(crate) fn temp_file(&mut self) -> std::result::Result<(File, OsString), OpError> {
        let name = self.next("t");
        let shown = self.shown(&name);
        ask(&*self.seam, FsOpKind::Create, &shown)?;
        let flags =
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        let fd = openat(
            Some(self.dir.as_raw_fd()),
            name.as_os_str(),
            flags,
            Mode::from_bits_truncate(0o600),
        )
        .at("create", &shown)?;
        Ok((File::from(owned(fd)), name))
    }

    /// Rename temporary file `temp` to `name` in `parent` (journaled with
    /// [`Self::will_create`] first).
    pub(crate) fn put_in_place(
        &mut self,
        temp: &OsStr,
        parent: DirAt<'_>,
        name: &OsStr,
    ) -> std::result::Result<(), OpError> {
        let shown = parent.child(name).shown();
        ask(&*self.seam, FsOpKind::Rename, &shown)?;
        renameat(
            Some(self.dir.as_raw_fd()),
            temp,
            Some(parent.fd.as_raw_fd()),
            name,
        )
        .at("rename into place", &shown)
    }

    /// Keep the changes: journal the commit, then remove the undo data.
    pub(crate) fn commit(mut self) -> std::result::Result<(), (OpError, bool)> {
        if let Err(e) = self.record(&Record::Commit) {
            // Not committed: put the target back as it was.
            let rolled_back = self.rollback().is_ok();
            return Err((e, rolled_back));
        }
        finish_commit(&self.root, &self.dir, &self.name, &*self.seam).map_err(|e| (e, false))
    }

    /// Undo everything the journal records.
    pub(crate) fn rollback(mut self) -> std::result::Result<RollbackReport, OpError> {
        roll_back(
            &self.root,
            &self.dir,
            &self.name,
            &mut self.journal,
            &*self.seam,
        )
    }
}

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

/// What [`rollback_pending`] found.
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
fn roll_back(
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

/// Overlay's private attributes: the merged view neither shows nor accepts them.
fn overlay_private(name: &[u8]) -> bool {
    name.starts_with(b"trusted.overlay.") || name.starts_with(b"user.overlay.")
}

/// A directory's own metadata.
fn dir_state(dir: &File) -> std::io::Result<DirState> {
    let st = fstat(dir.as_raw_fd())?;
    let mut xattrs = Vec::new();
    let names = match xattr::FileExt::list_xattr(dir) {
        Ok(n) => n.collect::<Vec<_>>(),
        Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => Vec::new(),
        Err(e) => return Err(e),
    };
    for n in names {
        if overlay_private(n.as_bytes()) {
            continue;
        }
        if let Some(v) = xattr::FileExt::get_xattr(dir, &n)? {
            xattrs.push((Bytes(n.as_bytes().to_vec()), Bytes(v)));
        }
    }
    Ok(DirState {
        mode: st.st_mode & 0o7777,
        uid: st.st_uid,
        gid: st.st_gid,
        xattrs,
        times: Times::of(&st),
    })
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

fn finish_commit(
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
        let undo_path = self.target.join(&undo.name);
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
        let undo_path = self.target.join(&undo.name);
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
    let root = open_root(target_root).map_err(io_err("open target root", target_root))?;
    let undo_path = target_root.join(loc.name());
    let not_ours = |reason: &str| RootfsError::NotUndoDir {
        path: undo_path.clone(),
        reason: reason.into(),
    };
    let Some(st) = lstat_at(&root, loc.name()).map_err(|e| io_err("stat", &undo_path)(e.into()))?
    else {
        return Ok(RollbackReport {
            outcome: RollbackOutcome::NothingPending,
            undone: 0,
            elapsed: start.elapsed(),
        });
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
    let mut journal = match Journal::open(&dir) {
        Ok(j) => j,
        Err(OpenError::Busy) => return Err(RootfsError::UndoBusy { undo: undo_path }),
        Err(OpenError::Io(e)) => return Err(io_err("open the journal in", &undo_path)(e)),
        Err(OpenError::Missing) => {
            // Made but not yet journaled, or a commit's last step: nothing to undo.
            let names = list_dir(&dir).map_err(io_err("list", &undo_path))?;
            if !names.is_empty() {
                return Err(not_ours("it holds files but no journal"));
            }
            remove_undo_dir(&root, &dir, loc.name(), &*seam)
                .map_err(|e| rollback_error(target_root, &undo_path, e))?;
            return Ok(RollbackReport {
                outcome: RollbackOutcome::EmptyRemoved,
                undone: 0,
                elapsed: start.elapsed(),
            });
        }
    };
    roll_back(&root, &dir, loc.name(), &mut journal, &*seam)
        .map_err(|e| rollback_error(target_root, &undo_path, e))
}
