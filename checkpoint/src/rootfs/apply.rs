//! Applying a changeset to the target rootfs: validate the whole archive first (nothing is
//! written if any entry is refused), then apply it in archive order. Parents are opened one
//! component at a time from a descriptor of the root (see `safe`: the kernel never follows a
//! symlink on the way, and no walk leaves the root), and every leaf is made with a `*at()`
//! call relative to its parent's descriptor, never following the leaf. The apply pass checks
//! paths, device nodes and link targets again, so even an archive swapped between the two
//! passes cannot write outside the root.

use std::collections::{BTreeMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::fcntl::{openat, renameat, AtFlags, OFlag};
use nix::sys::stat::{fchmod, fchmodat, mkdirat, mknodat, utimensat, FchmodatFlags};
use nix::sys::stat::{futimens, makedev, Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;
use nix::unistd::{fchown, fchownat, linkat, mkfifoat, symlinkat, unlinkat};
use serde::{Deserialize, Serialize};
use tar::{Archive, Entry, EntryType};

use super::codec::{open_changeset, Counting, Tally};
use super::safe::{
    archive_components, clear_dir, dir_flags, fd_path, key, kind, lstat_at, open_dir_in_root,
    open_root, owned, remove_any,
};
use super::validate::{validate, Meta, Plan};
use super::{io_err, Result, RootfsError, OPAQUE_MARKER, WHITEOUT_PREFIX};
use crate::prefault::WRITE_CHUNK;

/// What a changeset may do beyond plain files.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplyPolicy {
    /// Device nodes recorded at checkpoint ([`super::CaptureReport::device_nodes`], relative
    /// paths); a device node entry at any other path is refused.
    pub allowed_devices: Vec<String>,
}

/// What an apply did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplyReport {
    /// Entries made where nothing was.
    pub created: u64,
    /// Entries made in place of an existing one (directories updated in place included).
    pub replaced: u64,
    /// Entries removed by whiteouts and opaque directories (a removed tree counts once).
    pub deleted: u64,
    /// Time taken, validation included.
    pub elapsed: Duration,
}

/// Apply `archive` (`.tar` or `.tar.zst`, see [`super::open_changeset`]) to `target_root`, the
/// container's merged rootfs view (or any directory): validate it whole, then apply it.
///
/// A refused archive ([`RootfsError::Refused`]) left the target untouched; an error while
/// applying ([`RootfsError::Apply`]) may leave it partly updated.
pub fn apply_changeset(
    archive: &Path,
    target_root: &Path,
    policy: &ApplyPolicy,
) -> Result<ApplyReport> {
    let start = Instant::now();
    let root = open_root(target_root).map_err(io_err("open target root", target_root))?;
    let plan = validate(archive, &root, policy)?;
    let (reader, tally) = Counting::new(open_changeset(archive)?);
    let mut ar = Archive::new(reader);
    let fail = |entry: &str, (step, reason): Fail| RootfsError::Apply {
        archive: archive.to_path_buf(),
        entry: entry.to_string(),
        step,
        reason,
    };
    let mut ap = Applier {
        root,
        plan,
        tally,
        cleared: HashSet::new(),
        dir_times: BTreeMap::new(),
        report: ApplyReport::default(),
        // Fresh files get at most WRITE_CHUNK per write: see crate::prefault.
        buf: vec![0u8; WRITE_CHUNK],
        zeros: vec![0u8; WRITE_CHUNK],
        seq: 0,
        pid: std::process::id(),
    };
    let entries = ar
        .entries()
        .map_err(|e| fail("", ("read archive", e.to_string())))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| fail("", ("read archive", e.to_string())))?;
        let raw = entry.path_bytes().into_owned();
        ap.entry(&mut entry, &raw)
            .map_err(|f| fail(&String::from_utf8_lossy(&raw), f))?;
    }
    ap.restore_dir_times()
        .map_err(|(p, f)| fail(&String::from_utf8_lossy(&p), f))?;
    ap.report.elapsed = start.elapsed();
    Ok(ap.report)
}

/// A failed step and why.
type Fail = (&'static str, String);

/// Name the step of an error.
trait Step<T> {
    fn step(self, step: &'static str) -> Result<T, Fail>;
}

impl<T, E: std::fmt::Display> Step<T> for std::result::Result<T, E> {
    fn step(self, step: &'static str) -> Result<T, Fail> {
        self.map_err(|e| (step, e.to_string()))
    }
}

struct Applier {
    root: OwnedFd,
    plan: Plan,
    tally: Tally,
    /// Opaque directories already emptied.
    cleared: HashSet<Vec<u8>>,
    /// Directory times, set at the end: writing in a directory changes its mtime.
    /// By path: a directory listed twice gets the times of its last entry.
    dir_times: BTreeMap<Vec<u8>, (Vec<OsString>, TimeSpec, TimeSpec)>,
    report: ApplyReport,
    buf: Vec<u8>,
    zeros: Vec<u8>,
    seq: u64,
    /// In temporary names, so two applies never collide.
    pid: u32,
}

impl Applier {
    fn entry<R: Read>(&mut self, entry: &mut Entry<'_, R>, raw: &[u8]) -> Result<(), Fail> {
        let parts = archive_components(raw).step("check path")?;
        let ty = entry.header().entry_type();
        self.clear_opaque(&parts, ty == EntryType::Directory)?;
        let (name, parents) = parts.split_last().ok_or(("check path", "empty".into()))?;
        let name = name.as_os_str();
        if name.as_bytes() == OPAQUE_MARKER.as_bytes() {
            return Ok(()); // done by clear_opaque, before anything was written in the dir
        }
        if let Some(victim) = name.as_bytes().strip_prefix(WHITEOUT_PREFIX.as_bytes()) {
            if let Some(dir) = open_dir_in_root(&self.root, parents, false).step("open parent")? {
                if remove_any(&dir, OsStr::from_bytes(victim)).step("remove")? {
                    self.report.deleted += 1;
                }
            }
            return Ok(());
        }
        let dir = open_dir_in_root(&self.root, parents, true)
            .step("open parent")?
            .ok_or(("open parent", "missing".to_string()))?;
        let meta = Meta::of(entry).map_err(|r| ("read header", r))?;
        match ty {
            EntryType::Directory => self.directory(&dir, name, &parts, &meta),
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                self.file(&dir, name, entry, &meta, ty == EntryType::GNUSparse)
            }
            EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .ok_or(("symlink", "no target".to_string()))?
                    .into_owned();
                self.existing(&dir, name)?;
                symlinkat(OsStr::from_bytes(&target), Some(dir.as_raw_fd()), name)
                    .step("symlink")?;
                self.finish_node(&dir, name, &meta, false)
            }
            EntryType::Link => {
                let target = entry
                    .link_name_bytes()
                    .ok_or(("link", "no target".to_string()))?
                    .into_owned();
                let t = archive_components(&target).step("link")?;
                let (tname, tparents) = t.split_last().ok_or(("link", "empty".to_string()))?;
                let tdir = open_dir_in_root(&self.root, tparents, false)
                    .step("open link target")?
                    .ok_or(("open link target", "missing".to_string()))?;
                self.existing(&dir, name)?;
                linkat(
                    Some(tdir.as_raw_fd()),
                    tname.as_os_str(),
                    Some(dir.as_raw_fd()),
                    name,
                    AtFlags::empty(),
                )
                .step("link")
            }
            EntryType::Fifo | EntryType::Char | EntryType::Block => {
                self.existing(&dir, name)?;
                if ty == EntryType::Fifo {
                    mkfifoat(Some(dir.as_raw_fd()), name, meta.mode).step("mkfifo")?;
                } else {
                    if !self.plan.devices.contains(&key(&parts)) {
                        return Err(("mknod", "device node not allowed".into()));
                    }
                    let h = entry.header();
                    let major = h.device_major().step("device")?.unwrap_or(0);
                    let minor = h.device_minor().step("device")?.unwrap_or(0);
                    let k = if ty == EntryType::Char {
                        SFlag::S_IFCHR
                    } else {
                        SFlag::S_IFBLK
                    };
                    let dev = makedev(u64::from(major), u64::from(minor));
                    mknodat(Some(dir.as_raw_fd()), name, k, meta.mode, dev).step("mknod")?;
                }
                self.finish_node(&dir, name, &meta, true)
            }
            other => Err(("check type", format!("unsupported entry type {other:?}"))),
        }
    }

    /// Count what is at `name` and remove it, so a new entry can take its place.
    fn existing(&mut self, dir: &OwnedFd, name: &OsStr) -> Result<(), Fail> {
        if remove_any(dir, name).step("remove old entry")? {
            self.report.replaced += 1;
        } else {
            self.report.created += 1;
        }
        Ok(())
    }

    /// Empty the opaque directories among the ones this entry goes into (or is), the first
    /// time the archive touches them: before any of their new children is written.
    fn clear_opaque(&mut self, parts: &[OsString], is_dir: bool) -> Result<(), Fail> {
        let upto = if is_dir { parts.len() } else { parts.len() - 1 };
        for i in 1..=upto {
            let k = key(&parts[..i]);
            if !self.plan.opaque.contains(&k) || !self.cleared.insert(k) {
                continue;
            }
            let (dname, dparents) = parts[..i].split_last().ok_or(("opaque", String::new()))?;
            let Some(pdir) = open_dir_in_root(&self.root, dparents, false).step("open parent")?
            else {
                continue;
            };
            match lstat_at(&pdir, dname).step("stat opaque dir")? {
                None => {}
                Some(st) if kind(&st) == SFlag::S_IFDIR => {
                    let d = openat(
                        Some(pdir.as_raw_fd()),
                        dname.as_os_str(),
                        dir_flags(),
                        Mode::empty(),
                    )
                    .step("open opaque dir")?;
                    self.report.deleted += clear_dir(&owned(d)).step("clear opaque dir")?;
                }
                // Not a directory (yet): the archive makes one in its place.
                Some(_) => {
                    remove_any(&pdir, dname).step("remove")?;
                    self.report.deleted += 1;
                }
            }
        }
        Ok(())
    }

    fn directory(
        &mut self,
        dir: &OwnedFd,
        name: &OsStr,
        parts: &[OsString],
        meta: &Meta,
    ) -> Result<(), Fail> {
        match lstat_at(dir, name).step("stat")? {
            Some(st) if kind(&st) == SFlag::S_IFDIR => self.report.replaced += 1,
            Some(_) => {
                remove_any(dir, name).step("remove old entry")?;
                mkdirat(Some(dir.as_raw_fd()), name, meta.mode).step("mkdir")?;
                self.report.replaced += 1;
            }
            None => {
                mkdirat(Some(dir.as_raw_fd()), name, meta.mode).step("mkdir")?;
                self.report.created += 1;
            }
        }
        let fd =
            openat(Some(dir.as_raw_fd()), name, dir_flags(), Mode::empty()).step("open dir")?;
        let d = File::from(owned(fd));
        own(&d, meta)?;
        // Attributes the directory has but the archive does not were removed at the source.
        let have = xattr::FileExt::list_xattr(&d).step("list xattrs")?;
        for n in have {
            let s = n.to_string_lossy();
            let private = s.starts_with("trusted.overlay.") || s.starts_with("user.overlay.");
            if !private && !meta.xattrs.iter().any(|(k, _)| OsStr::new(k) == n) {
                xattr::FileExt::remove_xattr(&d, &n).step("remove xattr")?;
            }
        }
        for (k, v) in &meta.xattrs {
            xattr::FileExt::set_xattr(&d, k, v).step("set xattr")?;
        }
        self.dir_times
            .insert(key(parts), (parts.to_vec(), meta.atime, meta.mtime));
        Ok(())
    }

    /// A regular file, written to a temporary name in the same directory and renamed over
    /// the old entry, so a reader never sees half a file.
    fn file<R: Read>(
        &mut self,
        dir: &OwnedFd,
        name: &OsStr,
        entry: &mut Entry<'_, R>,
        meta: &Meta,
        sparse: bool,
    ) -> Result<(), Fail> {
        let flags =
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        let (tmp, fd) = loop {
            self.seq += 1;
            let tmp = OsString::from(format!(".cryo-apply.{}.{}", self.pid, self.seq));
            let mode = Mode::from_bits_truncate(0o600);
            match openat(Some(dir.as_raw_fd()), tmp.as_os_str(), flags, mode) {
                Ok(fd) => break (tmp, fd),
                Err(nix::errno::Errno::EEXIST) => continue,
                Err(e) => return Err(("create", e.to_string())),
            }
        };
        let f = File::from(owned(fd));
        let res = self.fill(&f, entry, meta, sparse).and_then(|()| {
            if let Some(st) = lstat_at(dir, name).step("stat")? {
                self.report.replaced += 1;
                if kind(&st) == SFlag::S_IFDIR {
                    remove_any(dir, name).step("remove old directory")?;
                }
            } else {
                self.report.created += 1;
            }
            renameat(
                Some(dir.as_raw_fd()),
                tmp.as_os_str(),
                Some(dir.as_raw_fd()),
                name,
            )
            .step("rename")
        });
        if res.is_err() {
            let _ = unlinkat(
                Some(dir.as_raw_fd()),
                tmp.as_os_str(),
                nix::unistd::UnlinkatFlags::NoRemoveDir,
            );
        }
        res
    }

    fn fill<R: Read>(
        &mut self,
        f: &File,
        entry: &mut Entry<'_, R>,
        meta: &Meta,
        sparse: bool,
    ) -> Result<(), Fail> {
        let want = entry.size();
        let mut off = 0u64;
        let mut w = f;
        loop {
            let before = self.tally.count();
            let n = entry.read(&mut self.buf).step("read archive")?;
            if n == 0 {
                break;
            }
            let chunk = &self.buf[..n];
            // A sparse entry's holes come from the tar reader, not the archive: skip them (a
            // chunk is taken for hole only if it is zeros too, so data is never lost).
            let hole = sparse && self.tally.count() == before && chunk == &self.zeros[..n];
            if !hole {
                if sparse {
                    f.write_all_at(chunk, off).step("write")?;
                } else {
                    w.write_all(chunk).step("write")?;
                }
            }
            off += n as u64;
        }
        if off != want {
            return Err(("read archive", format!("{off} of {want} bytes")));
        }
        if sparse {
            f.set_len(want).step("set size")?;
        }
        own(f, meta)?;
        for (k, v) in &meta.xattrs {
            xattr::FileExt::set_xattr(f, k, v).step("set xattr")?;
        }
        futimens(f.as_raw_fd(), &meta.atime, &meta.mtime).step("set times")
    }

    /// Owner, mode, xattrs and times of a symlink or node just made at `name`.
    fn finish_node(
        &mut self,
        dir: &OwnedFd,
        name: &OsStr,
        meta: &Meta,
        chmod: bool,
    ) -> Result<(), Fail> {
        let d = Some(dir.as_raw_fd());
        fchownat(
            d,
            name,
            Some(meta.uid),
            Some(meta.gid),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .step("chown")?;
        if chmod {
            // After chown, which clears set-id bits. `name` is the node we just made.
            fchmodat(d, name, meta.mode, FchmodatFlags::FollowSymlink).step("chmod")?;
        }
        let p = fd_path(dir, name);
        for (k, v) in &meta.xattrs {
            // lsetxattr: the leaf is not followed.
            xattr::set(&p, k, v).step("set xattr")?;
        }
        utimensat(
            d,
            name,
            &meta.atime,
            &meta.mtime,
            UtimensatFlags::NoFollowSymlink,
        )
        .step("set times")
    }

    fn restore_dir_times(&mut self) -> Result<(), (Vec<u8>, Fail)> {
        for (k, (parts, atime, mtime)) in &self.dir_times {
            let fail = |f: Fail| (k.clone(), f);
            let (name, parents) = parts.split_last().ok_or(fail(("times", String::new())))?;
            let Some(dir) = open_dir_in_root(&self.root, parents, false)
                .step("open parent")
                .map_err(fail)?
            else {
                continue;
            };
            // A later entry may have replaced the directory with something else.
            match lstat_at(&dir, name).step("stat").map_err(fail)? {
                Some(st) if kind(&st) == SFlag::S_IFDIR => {}
                _ => continue,
            }
            let at = Some(dir.as_raw_fd());
            utimensat(
                at,
                name.as_os_str(),
                atime,
                mtime,
                UtimensatFlags::NoFollowSymlink,
            )
            .step("set times")
            .map_err(fail)?;
        }
        Ok(())
    }
}

/// chown, then chmod (chown clears set-id bits), on an open file or directory.
fn own(f: &File, meta: &Meta) -> Result<(), Fail> {
    fchown(f.as_raw_fd(), Some(meta.uid), Some(meta.gid)).step("chown")?;
    fchmod(f.as_raw_fd(), meta.mode).step("chmod")
}
