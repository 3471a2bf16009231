//! The apply's undo data: the journal of every change, written before the change.
//!
//! Before the apply changes anything it makes the undo directory (0700, named by
//! [`UndoLocation`]) at the target root, on the target's own filesystem, and its journal
//! (0600, see `journal`). Every change is journaled first, then made:
//!
//! - an existing entry the changeset replaces or removes is *moved aside*: renamed into the
//!   undo directory (on an overlay, a regular file is copied there instead, then unlinked:
//!   renaming a lower file would make the kernel copy it up and fsync it). A directory that cannot be renamed (a lower directory of an overlay
//!   without `redirect_dir`: `EXDEV`) is taken apart instead: its entries are moved aside one
//!   by one (recursively), its own metadata is journaled, and the emptied directory removed;
//! - what is made where nothing was is journaled for removal;
//! - an existing directory's metadata, and the times of every directory whose entries change,
//!   are journaled before they change;
//! - file data is written into temporary files in the undo directory (0600) that take their
//!   final metadata there and are then renamed into place.
//!
//! A rollback (`rollback`) undoes the journal from its end, cutting each record off once
//! undone, so a rollback that is itself interrupted resumes where it stopped. A commit
//! journals that it commits, then removes the undo directory; an interrupted commit is
//! finished, never undone.

use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;

use nix::errno::Errno;
use nix::fcntl::{openat, renameat, OFlag};
use nix::sys::stat::{fstat, mkdirat, FileStat, Mode, SFlag};
use nix::unistd::{unlinkat, UnlinkatFlags};

use super::copy::copy_file;
use super::journal::{Bytes, DirState, Journal, Record, RelPath, Times, JOURNAL};
use super::rollback::{finish_commit, roll_back, RollbackReport};
use super::safe::{dir_flags, kind, list_dir, lstat_at, owned, remove_any};
use super::seam::{FsOp, FsOpKind, FsSeam};
use super::{Result, RootfsError};

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
    /// The target is an overlay: see [`Undo::move_aside`].
    overlay: bool,
    pub(crate) moved_aside: u64,
    pub(crate) copied_aside: u64,
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
        let overlay = nix::sys::statfs::fstatfs(&root)
            .at("statfs", "/")?
            .filesystem_type()
            == nix::sys::statfs::OVERLAYFS_SUPER_MAGIC;
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
            overlay,
            moved_aside: 0,
            copied_aside: 0,
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
        if self.overlay && kind(&st) == SFlag::S_IFREG && st.st_nlink == 1 {
            return self.copy_aside(parent, name, &st, saved).map(|()| true);
        }
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

    /// Keep a copy of the regular file `name` in the undo directory, then unlink it. On an
    /// overlay, renaming a lower file copies it up and fsyncs the copy: copying it ourselves,
    /// unsynced (the undo data only has to outlive the process, not the machine), costs far
    /// less. A file with other links is renamed instead, so the links stay one inode.
    fn copy_aside(
        &mut self,
        parent: DirAt<'_>,
        name: &OsStr,
        st: &FileStat,
        saved: OsString,
    ) -> std::result::Result<(), OpError> {
        let path = parent.child(name);
        let shown = path.shown();
        let flags = OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        let src = File::from(owned(
            openat(Some(parent.fd.as_raw_fd()), name, flags, Mode::empty()).at("open", &shown)?,
        ));
        let copy_shown = self.shown(&saved);
        let copy = self.create_private(&saved, &copy_shown)?;
        copy_file(&src, st, &copy, &*self.seam, &copy_shown)?;
        // Journaled once complete: undoing it puts the copy in the file's place.
        self.record(&Record::CopiedAside {
            path,
            saved: saved.to_string_lossy().into_owned(),
        })?;
        ask(&*self.seam, FsOpKind::Remove, &shown)?;
        unlinkat(
            Some(parent.fd.as_raw_fd()),
            name,
            UnlinkatFlags::NoRemoveDir,
        )
        .at("remove", &shown)?;
        self.copied_aside += 1;
        Ok(())
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
        let f = self.create_private(&name, &shown)?;
        Ok((f, name))
    }

    /// Create `name` (0600) in the undo directory.
    fn create_private(&self, name: &OsStr, shown: &str) -> std::result::Result<File, OpError> {
        ask(&*self.seam, FsOpKind::Create, shown)?;
        let flags =
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        let fd = openat(
            Some(self.dir.as_raw_fd()),
            name,
            flags,
            Mode::from_bits_truncate(0o600),
        )
        .at("create", shown)?;
        Ok(File::from(owned(fd)))
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

/// Overlay's private attributes: the merged view neither shows nor accepts them.
pub(crate) fn overlay_private(name: &[u8]) -> bool {
    name.starts_with(b"trusted.overlay.") || name.starts_with(b"user.overlay.")
}

/// A directory's own metadata.
pub(crate) fn dir_state(dir: &File) -> std::io::Result<DirState> {
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
