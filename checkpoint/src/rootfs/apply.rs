//! Applying a changeset to the target rootfs, as a transaction: validate the whole archive
//! first (nothing is written if any entry is refused), then apply it in archive order with
//! every change journaled in the undo directory (`undo`), so that a failure puts the target
//! back as it was and the caller decides at the end whether to keep the changes.
//!
//! Parents are opened one component at a time from a descriptor of the root (see `safe`:
//! the kernel never follows a symlink on the way, and no walk leaves the root or enters the
//! undo directory), and every leaf is made with a `*at()` call relative to its parent's
//! descriptor, never following the leaf. The apply pass checks paths, device nodes, link
//! targets and sparse maps again, so even an archive swapped between the two passes cannot
//! write outside the root; and it reads the stream to its end again, so such an archive is
//! rolled back.

use std::collections::{BTreeMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{Read, Seek};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::fcntl::{openat, AtFlags};
use nix::sys::stat::{fchmod, fchmodat, futimens, makedev, mknodat, utimensat};
use nix::sys::stat::{FchmodatFlags, Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;
use nix::unistd::{fchown, fchownat, linkat, mkfifoat, symlinkat};
use serde::{Deserialize, Serialize};
use tar::{Archive, Entry, EntryType};

use super::codec::{ChangesetStream, Counting, Tally};
use super::meta::{check_symlink_target, checked_components, Meta};
use super::policy::{DeviceKind, DeviceNode, LEGACY_SPARSE_MAX_BYTES};
use super::rollback::{rollback_error, AppliedChangeset};
use super::safe::{
    dir_flags, fd_path, key, kind, list_dir, lstat_at, open_dir_in_root, open_real_path, open_root,
    owned, MakeDir,
};
use super::seam::{FsOpKind, FsSeam, NoFaults};
use super::sparse::sparse_map;
use super::undo::{ask, At, DirAt, OpError, Undo, UndoLocation};
use super::validate::{validate, Plan, Target};
use super::{io_err, ApplyPolicy, Result, RootfsError, OPAQUE_MARKER, WHITEOUT_PREFIX};
use crate::prefault::WRITE_CHUNK;

/// What an apply did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplyReport {
    /// Entries made where nothing was.
    pub created: u64,
    /// Entries made in place of an existing one (directories updated in place included).
    pub replaced: u64,
    /// Entries removed by whiteouts and opaque directories (a removed tree counts once).
    pub deleted: u64,
    /// Existing entries moved into the undo directory (replaced or removed ones).
    pub moved_aside: u64,
    /// Existing regular files copied into the undo directory instead (on an overlay).
    pub copied_aside: u64,
    /// Directories that could not be moved (an overlay's lower directories) and were taken
    /// apart into the undo directory instead.
    pub taken_apart: u64,
    /// File data and sizes the archive declared.
    pub data_bytes: u64,
    /// Time taken, validation included.
    pub elapsed: Duration,
}

/// Apply `archive` (`.tar` or `.tar.zst`) to `target_root`, the container's merged rootfs
/// view (or any directory), keeping undo data at `undo`: validate it whole, then apply it.
///
/// - [`RootfsError::Refused`], [`RootfsError::NoSpace`], [`RootfsError::PendingUndo`]:
///   nothing was written.
/// - [`RootfsError::Apply`]: applying failed midway and the target was put back as it was.
/// - [`RootfsError::ApplyNotUndone`]: putting it back failed too; the undo journal keeps what
///   is left to undo for [`super::rollback_pending`].
///
/// On success the changes stay pending until [`AppliedChangeset::commit`] (or
/// [`AppliedChangeset::rollback`]); a process killed before either leaves a journal for
/// [`super::rollback_pending`].
pub fn apply_changeset(
    archive: &Path,
    target_root: &Path,
    policy: &ApplyPolicy,
    undo: &UndoLocation,
) -> Result<AppliedChangeset> {
    apply_changeset_with(archive, target_root, policy, undo, Arc::new(NoFaults))
}

/// [`apply_changeset`] with a test seam consulted before every filesystem operation.
pub fn apply_changeset_with(
    archive: &Path,
    target_root: &Path,
    policy: &ApplyPolicy,
    undo: &UndoLocation,
    seam: Arc<dyn FsSeam>,
) -> Result<AppliedChangeset> {
    let start = Instant::now();
    let root = open_root(target_root).map_err(io_err("open target root", target_root))?;
    let undo_path = target_root.join(undo.name());
    if lstat_at(&root, undo.name())
        .map_err(|e| io_err("stat", &undo_path)(e.into()))?
        .is_some()
    {
        return Err(RootfsError::PendingUndo {
            target: target_root.to_path_buf(),
            undo: undo_path,
        });
    }
    let mut file = File::open(archive).map_err(io_err("open", archive))?;
    let plan = {
        let target = Target {
            root: &root,
            path: target_root,
            reserved: undo.name(),
        };
        let f = file.try_clone().map_err(io_err("open", archive))?;
        validate(archive, f, Some(&target), policy)?
    };
    file.rewind().map_err(io_err("rewind", archive))?;
    let fail = |entry: &[u8], e: OpError| (String::from_utf8_lossy(entry).into_owned(), e);
    let tx = Undo::begin(
        root.try_clone().map_err(io_err("dup", target_root))?,
        undo,
        seam,
    )
    .map_err(|e| RootfsError::Apply {
        archive: archive.to_path_buf(),
        entry: String::new(),
        step: e.step,
        path: e.path,
        source: e.source,
    })?;
    let mut ap = Applier {
        root,
        undo: tx,
        policy,
        plan,
        cleared: HashSet::new(),
        dir_times: BTreeMap::new(),
        report: ApplyReport::default(),
        // Fresh files get at most WRITE_CHUNK per write: see crate::prefault.
        buf: vec![0u8; WRITE_CHUNK],
        zeros: vec![0u8; WRITE_CHUNK],
        legacy_sparse: 0,
    };
    let res = ap.run(archive, file).map_err(|(entry, e)| fail(&entry, e));
    let Applier {
        undo: tx,
        mut report,
        ..
    } = ap;
    match res {
        Ok(()) => {
            report.moved_aside = tx.moved_aside;
            report.copied_aside = tx.copied_aside;
            report.taken_apart = tx.taken_apart;
            report.elapsed = start.elapsed();
            Ok(AppliedChangeset::new(tx, report, target_root))
        }
        Err((entry, e)) => match tx.rollback() {
            Ok(_) => Err(RootfsError::Apply {
                archive: archive.to_path_buf(),
                entry,
                step: e.step,
                path: e.path,
                source: e.source,
            }),
            Err(r) => Err(RootfsError::ApplyNotUndone {
                archive: archive.to_path_buf(),
                entry,
                step: e.step,
                path: e.path,
                source: e.source,
                rollback: Box::new(rollback_error(target_root, &undo_path, r)),
            }),
        },
    }
}

/// A directory of the target held open, with its real path.
struct Dir {
    fd: OwnedFd,
    path: Vec<OsString>,
}

impl Dir {
    fn at(&self) -> DirAt<'_> {
        DirAt {
            fd: &self.fd,
            path: &self.path,
        }
    }

    fn shown(&self, name: &OsStr) -> String {
        self.at().child(name).shown()
    }
}

/// An archive entry that failed (its raw path) and the operation.
type EntryFail = (Vec<u8>, OpError);

/// Where an error came from when no filesystem operation did.
fn invalid(step: &'static str, path: &str, why: impl Into<String>) -> OpError {
    OpError {
        step,
        path: path.to_string(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, why.into()),
    }
}

struct Applier<'a> {
    root: OwnedFd,
    undo: Undo,
    policy: &'a ApplyPolicy,
    plan: Plan,
    /// Opaque directories already emptied.
    cleared: HashSet<Vec<u8>>,
    /// Directory times, set at the end: writing in a directory changes its mtime. By real
    /// path: a directory listed twice gets the times of its last entry.
    dir_times: BTreeMap<Vec<OsString>, (TimeSpec, TimeSpec)>,
    report: ApplyReport,
    buf: Vec<u8>,
    zeros: Vec<u8>,
    legacy_sparse: u64,
}

impl Applier<'_> {
    fn run(&mut self, archive: &Path, file: File) -> std::result::Result<(), EntryFail> {
        let whole = |e: OpError| (Vec::new(), e);
        let stream = ChangesetStream::new(file, archive)
            .map_err(|e| whole(invalid("read archive", "", e.to_string())))?;
        let (reader, tally) = Counting::new(stream);
        let mut ar = Archive::new(reader);
        let mut entries = ar
            .entries()
            .map_err(|e| whole(invalid("read archive", "", e.to_string())))?;
        loop {
            tally.budget_headers();
            let Some(entry) = entries.next() else { break };
            tally.unlimited();
            let mut entry = entry.map_err(|e| whole(invalid("read archive", "", e.to_string())))?;
            let raw = entry.path_bytes().into_owned();
            self.entry(&mut entry, &raw, &tally)
                .map_err(|e| (raw.clone(), e))?;
        }
        ar.into_inner()
            .into_inner()
            .finish()
            .map_err(|r| whole(invalid("read archive", "", r)))?;
        self.report.data_bytes = self.plan.summary.sizes.data_bytes;
        self.restore_dir_times().map_err(whole)
    }

    fn seam(&self) -> &dyn FsSeam {
        self.undo.seam()
    }

    /// Open the parent directory `parents`, making missing ones (journaled, 0755: no entry
    /// gives them other metadata) when `create`.
    fn parent(
        &mut self,
        parents: &[OsString],
        create: bool,
    ) -> std::result::Result<Option<Dir>, OpError> {
        let reserved = self.undo.name().to_os_string();
        let undo = &mut self.undo;
        let mut failed: Option<OpError> = None;
        let mut make = |fd: &OwnedFd, path: &[OsString], name: &OsStr| {
            undo.make_dir(DirAt { fd, path }, name, 0o755).map_err(|e| {
                let msg = e.source.to_string();
                failed = Some(e);
                msg
            })
        };
        let make: Option<MakeDir<'_>> = if create { Some(&mut make) } else { None };
        let shown = super::safe::show(parents);
        let walked = open_dir_in_root(&self.root, Some(&reserved), parents, make);
        if let Some(e) = failed {
            return Err(e);
        }
        let Some(w) = walked.at("open parent", &shown)? else {
            return Ok(None);
        };
        let (fd, path) = w.into_dir().at("open parent", &shown)?;
        Ok(Some(Dir { fd, path }))
    }

    fn entry<R: Read>(
        &mut self,
        entry: &mut Entry<'_, R>,
        raw: &[u8],
        tally: &Tally,
    ) -> std::result::Result<(), OpError> {
        let shown_raw = String::from_utf8_lossy(raw).into_owned();
        let parts = checked_components(raw, Some(undo_name(&self.undo)))
            .map_err(|r| invalid("check path", &shown_raw, r))?;
        let ty = entry.header().entry_type();
        self.clear_opaque(&parts, ty == EntryType::Directory)?;
        let (name, parents) = parts
            .split_last()
            .ok_or_else(|| invalid("check path", "", "empty"))?;
        let name = name.as_os_str();
        if name.as_bytes() == OPAQUE_MARKER.as_bytes() {
            return Ok(()); // done by clear_opaque, before anything was written in the dir
        }
        if let Some(victim) = name.as_bytes().strip_prefix(WHITEOUT_PREFIX.as_bytes()) {
            if let Some(dir) = self.parent(parents, false)? {
                if self.undo.move_aside(dir.at(), OsStr::from_bytes(victim))? {
                    self.report.deleted += 1;
                }
            }
            return Ok(());
        }
        let dir = self
            .parent(parents, true)?
            .ok_or_else(|| invalid("open parent", &shown_raw, "missing"))?;
        let meta = Meta::of(entry).map_err(|r| invalid("read header", &shown_raw, r))?;
        match ty {
            EntryType::Directory => self.directory(&dir, name, &meta),
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                self.file(&dir, name, entry, &meta, tally)
            }
            EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| invalid("symlink", &shown_raw, "no target"))?
                    .into_owned();
                check_symlink_target(&target).map_err(|r| invalid("symlink", &shown_raw, r))?;
                self.replace(&dir, name)?;
                let shown = dir.shown(name);
                ask(self.seam(), FsOpKind::Symlink, &shown)?;
                symlinkat(OsStr::from_bytes(&target), Some(dir.fd.as_raw_fd()), name)
                    .at("symlink", &shown)?;
                self.finish_node(&dir, name, &meta, false)
            }
            EntryType::Link => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| invalid("link", &shown_raw, "no target"))?
                    .into_owned();
                let t = checked_components(&target, Some(undo_name(&self.undo)))
                    .map_err(|r| invalid("link", &shown_raw, r))?;
                let (tname, tparents) = t
                    .split_last()
                    .ok_or_else(|| invalid("link", &shown_raw, "empty"))?;
                let tdir = self
                    .parent(tparents, false)?
                    .ok_or_else(|| invalid("open link target", &shown_raw, "missing"))?;
                self.replace(&dir, name)?;
                let shown = dir.shown(name);
                ask(self.seam(), FsOpKind::Link, &shown)?;
                linkat(
                    Some(tdir.fd.as_raw_fd()),
                    tname.as_os_str(),
                    Some(dir.fd.as_raw_fd()),
                    name,
                    AtFlags::empty(),
                )
                .at("link", &shown)
            }
            EntryType::Fifo | EntryType::Char | EntryType::Block => {
                let shown = dir.shown(name);
                let private = Mode::from_bits_truncate(0o600);
                let node = if ty == EntryType::Fifo {
                    None
                } else {
                    let h = entry.header();
                    let major = h.device_major().at("device", &shown)?.unwrap_or(0);
                    let minor = h.device_minor().at("device", &shown)?.unwrap_or(0);
                    let kind = if ty == EntryType::Char {
                        DeviceKind::Char
                    } else {
                        DeviceKind::Block
                    };
                    let node = DeviceNode { kind, major, minor };
                    if !self.policy.allows(&node) {
                        return Err(invalid("mknod", &shown, "device node not allowed"));
                    }
                    Some(node)
                };
                self.replace(&dir, name)?;
                ask(self.seam(), FsOpKind::Mknod, &shown)?;
                match node {
                    None => {
                        mkfifoat(Some(dir.fd.as_raw_fd()), name, private).at("mkfifo", &shown)?
                    }
                    Some(n) => {
                        let k = if n.kind == DeviceKind::Char {
                            SFlag::S_IFCHR
                        } else {
                            SFlag::S_IFBLK
                        };
                        let dev = makedev(u64::from(n.major), u64::from(n.minor));
                        mknodat(Some(dir.fd.as_raw_fd()), name, k, private, dev)
                            .at("mknod", &shown)?;
                    }
                }
                self.finish_node(&dir, name, &meta, true)
            }
            other => Err(invalid(
                "check type",
                &shown_raw,
                format!("unsupported entry type {other:?}"),
            )),
        }
    }

    /// Move whatever is at `name` aside, count it, and journal the entry about to be made.
    fn replace(&mut self, dir: &Dir, name: &OsStr) -> std::result::Result<(), OpError> {
        if self.undo.move_aside(dir.at(), name)? {
            self.report.replaced += 1;
        } else {
            self.report.created += 1;
        }
        self.undo.will_create(dir.at(), name)
    }

    /// Empty the opaque directories among the ones this entry goes into (or is), the first
    /// time the archive touches them: before any of their new children is written.
    fn clear_opaque(
        &mut self,
        parts: &[OsString],
        is_dir: bool,
    ) -> std::result::Result<(), OpError> {
        let upto = if is_dir { parts.len() } else { parts.len() - 1 };
        for i in 1..=upto {
            let k = key(&parts[..i]);
            if !self.plan.opaque.contains(&k) || !self.cleared.insert(k) {
                continue;
            }
            let (dname, dparents) = parts[..i]
                .split_last()
                .ok_or_else(|| invalid("opaque", "", "empty"))?;
            let Some(pdir) = self.parent(dparents, false)? else {
                continue;
            };
            let shown = pdir.shown(dname);
            match lstat_at(&pdir.fd, dname).at("stat opaque dir", &shown)? {
                None => {}
                Some(st) if kind(&st) == SFlag::S_IFDIR => {
                    let fd = openat(
                        Some(pdir.fd.as_raw_fd()),
                        dname.as_os_str(),
                        dir_flags(),
                        Mode::empty(),
                    )
                    .at("open opaque dir", &shown)?;
                    let d = Dir {
                        fd: owned(fd),
                        path: pdir.at().child(dname).0,
                    };
                    for child in list_dir(&d.fd).at("list opaque dir", &shown)? {
                        if self.undo.move_aside(d.at(), &child)? {
                            self.report.deleted += 1;
                        }
                    }
                }
                // Not a directory (yet): the archive makes one in its place.
                Some(_) => {
                    self.undo.move_aside(pdir.at(), dname)?;
                    self.report.deleted += 1;
                }
            }
        }
        Ok(())
    }

    fn directory(
        &mut self,
        dir: &Dir,
        name: &OsStr,
        meta: &Meta,
    ) -> std::result::Result<(), OpError> {
        let path = dir.at().child(name);
        let shown = path.shown();
        let existing = lstat_at(&dir.fd, name).at("stat", &shown)?;
        let is_dir = existing.is_some_and(|st| kind(&st) == SFlag::S_IFDIR);
        if !is_dir {
            if existing.is_some() {
                self.undo.move_aside(dir.at(), name)?;
                self.report.replaced += 1;
            } else {
                self.report.created += 1;
            }
            self.undo.make_dir(dir.at(), name, 0o700)?;
        }
        let fd = openat(Some(dir.fd.as_raw_fd()), name, dir_flags(), Mode::empty())
            .at("open dir", &shown)?;
        let d = File::from(owned(fd));
        if is_dir {
            self.undo.describe_dir(&d, &path)?;
            self.report.replaced += 1;
        }
        self.own(&d, meta, &shown)?;
        // Attributes the directory has but the archive does not were removed at the source.
        let have = xattr::FileExt::list_xattr(&d).at("list xattrs", &shown)?;
        for n in have {
            let s = n.to_string_lossy();
            let private = s.starts_with("trusted.overlay.") || s.starts_with("user.overlay.");
            if !private && !meta.xattrs.iter().any(|(k, _)| OsStr::new(k) == n) {
                ask(self.seam(), FsOpKind::Xattr, &shown)?;
                xattr::FileExt::remove_xattr(&d, &n).at("remove xattr", &shown)?;
            }
        }
        self.set_xattrs(&d, meta, &shown)?;
        self.dir_times.insert(path.0, (meta.atime, meta.mtime));
        Ok(())
    }

    /// A regular file: written into a temporary file in the undo directory, given its
    /// metadata there, then renamed into place (the old entry moved aside first).
    fn file<R: Read>(
        &mut self,
        dir: &Dir,
        name: &OsStr,
        entry: &mut Entry<'_, R>,
        meta: &Meta,
        tally: &Tally,
    ) -> std::result::Result<(), OpError> {
        let shown = dir.shown(name);
        let (f, temp) = self.undo.temp_file()?;
        let temp_shown = self.undo.shown(&temp);
        if entry.header().entry_type() == EntryType::GNUSparse {
            self.fill_legacy_sparse(&f, entry, tally, &temp_shown)?;
        } else {
            let data = entry.size();
            match sparse_map(entry, data).map_err(|r| invalid("read sparse map", &shown, r))? {
                Some(map) => {
                    for (off, len) in &map.extents {
                        ask(self.seam(), FsOpKind::Write, &temp_shown)?;
                        self.copy_extent(&f, entry, *off, *len)
                            .at("write", &temp_shown)?;
                    }
                    ask(self.seam(), FsOpKind::Truncate, &temp_shown)?;
                    f.set_len(map.real_size)
                        .at("set the size of", &temp_shown)?;
                }
                None => {
                    ask(self.seam(), FsOpKind::Write, &temp_shown)?;
                    self.copy_extent(&f, entry, 0, data)
                        .at("write", &temp_shown)?;
                }
            }
        }
        self.own(&f, meta, &temp_shown)?;
        self.set_xattrs(&f, meta, &temp_shown)?;
        ask(self.seam(), FsOpKind::Times, &temp_shown)?;
        futimens(f.as_raw_fd(), &meta.atime, &meta.mtime).at("set times", &temp_shown)?;
        drop(f);
        self.replace(dir, name)?;
        self.undo.put_in_place(&temp, dir.at(), name)
    }

    /// `len` bytes of the entry's data written at `off`, at most WRITE_CHUNK per write.
    fn copy_extent<R: Read>(
        &mut self,
        f: &File,
        entry: &mut Entry<'_, R>,
        off: u64,
        len: u64,
    ) -> std::io::Result<()> {
        let mut done = 0u64;
        while done < len {
            let want = (len - done).min(self.buf.len() as u64) as usize;
            let n = entry.read(&mut self.buf[..want])?;
            if n == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("the archive ends {} bytes into a {len}-byte extent", done),
                ));
            }
            f.write_all_at(&self.buf[..n], off + done)?;
            done += n as u64;
        }
        Ok(())
    }

    /// An old-GNU sparse entry: the tar reader gives its holes as zeros that did not come
    /// from the stream; only the data is written. Bounded like the validation bounds it.
    fn fill_legacy_sparse<R: Read>(
        &mut self,
        f: &File,
        entry: &mut Entry<'_, R>,
        tally: &Tally,
        shown: &str,
    ) -> std::result::Result<(), OpError> {
        let want = entry.size();
        self.legacy_sparse = self.legacy_sparse.saturating_add(want);
        if !self.policy.legacy_sparse() || self.legacy_sparse > LEGACY_SPARSE_MAX_BYTES {
            return Err(invalid(
                "read sparse entry",
                shown,
                "old-GNU sparse entry not accepted",
            ));
        }
        ask(self.seam(), FsOpKind::Write, shown)?;
        let mut off = 0u64;
        loop {
            let before = tally.count();
            let n = entry.read(&mut self.buf).at("read archive", shown)?;
            if n == 0 {
                break;
            }
            let chunk = &self.buf[..n];
            // A chunk is taken for hole only if it is zeros too, so data is never lost.
            let hole = tally.count() == before && chunk == &self.zeros[..n];
            if !hole {
                f.write_all_at(chunk, off).at("write", shown)?;
            }
            off += n as u64;
        }
        if off != want {
            return Err(invalid(
                "read archive",
                shown,
                format!("{off} of {want} bytes"),
            ));
        }
        ask(self.seam(), FsOpKind::Truncate, shown)?;
        f.set_len(want).at("set the size of", shown)
    }

    /// chown, then chmod (chown clears set-id bits), on an open file or directory.
    fn own(&self, f: &File, meta: &Meta, shown: &str) -> std::result::Result<(), OpError> {
        ask(self.seam(), FsOpKind::Owner, shown)?;
        fchown(f.as_raw_fd(), Some(meta.uid), Some(meta.gid)).at("chown", shown)?;
        ask(self.seam(), FsOpKind::Mode, shown)?;
        fchmod(f.as_raw_fd(), meta.mode).at("chmod", shown)
    }

    fn set_xattrs(&self, f: &File, meta: &Meta, shown: &str) -> std::result::Result<(), OpError> {
        for (k, v) in &meta.xattrs {
            ask(self.seam(), FsOpKind::Xattr, shown)?;
            xattr::FileExt::set_xattr(f, k, v).at("set xattr", shown)?;
        }
        Ok(())
    }

    /// Owner, mode, xattrs and times of a symlink or node just made at `name`.
    fn finish_node(
        &mut self,
        dir: &Dir,
        name: &OsStr,
        meta: &Meta,
        chmod: bool,
    ) -> std::result::Result<(), OpError> {
        let d = Some(dir.fd.as_raw_fd());
        let shown = dir.shown(name);
        ask(self.seam(), FsOpKind::Owner, &shown)?;
        fchownat(
            d,
            name,
            Some(meta.uid),
            Some(meta.gid),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .at("chown", &shown)?;
        if chmod {
            // After chown, which clears set-id bits. `name` is the node we just made.
            ask(self.seam(), FsOpKind::Mode, &shown)?;
            fchmodat(d, name, meta.mode, FchmodatFlags::FollowSymlink).at("chmod", &shown)?;
        }
        let p = fd_path(&dir.fd, name);
        for (k, v) in &meta.xattrs {
            // lsetxattr: the leaf is not followed.
            ask(self.seam(), FsOpKind::Xattr, &shown)?;
            xattr::set(&p, k, v).at("set xattr", &shown)?;
        }
        ask(self.seam(), FsOpKind::Times, &shown)?;
        utimensat(
            d,
            name,
            &meta.atime,
            &meta.mtime,
            UtimensatFlags::NoFollowSymlink,
        )
        .at("set times", &shown)
    }

    fn restore_dir_times(&mut self) -> std::result::Result<(), OpError> {
        for (path, (atime, mtime)) in &self.dir_times {
            let shown = super::safe::show(path);
            let Some((name, parents)) = path.split_last() else {
                continue;
            };
            let Some(dir) = open_real_path(&self.root, parents).at("open parent", &shown)? else {
                continue;
            };
            // A later entry may have replaced the directory with something else.
            match lstat_at(&dir, name).at("stat", &shown)? {
                Some(st) if kind(&st) == SFlag::S_IFDIR => {}
                _ => continue,
            }
            ask(self.undo.seam(), FsOpKind::Times, &shown)?;
            utimensat(
                Some(dir.as_raw_fd()),
                name.as_os_str(),
                atime,
                mtime,
                UtimensatFlags::NoFollowSymlink,
            )
            .at("set times", &shown)?;
        }
        Ok(())
    }
}

fn undo_name(u: &Undo) -> &OsStr {
    u.name()
}
