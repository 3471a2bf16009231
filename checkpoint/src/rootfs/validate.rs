//! The first pass of a restore: read the whole archive, every header and every data byte to
//! the end of the file (a zstd frame's checksum is checked there), and refuse it before
//! anything is written if any entry is hostile, unknown, broken or beyond its limits: paths
//! the kernel cannot make, device nodes the runtime would not create, sizes beyond what the
//! capture recorded or what the target's filesystem has free.
//!
//! To judge where an entry would land, the pass keeps a model of what the entries before it
//! did (a directory made here, a symlink there, a path deleted) on top of the target as it
//! is. Writing through a symlink the archive made is the classic tar escape and is refused
//! outright; a symlink the target already has is followed the way the container sees it, and
//! refused only when it leads out of the root.

use std::collections::{BTreeMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use nix::fcntl::openat;
use nix::sys::stat::{Mode, SFlag};
use tar::{Archive, Entry, EntryType};

use super::codec::{ChangesetStream, Counting};
use super::meta::{check_symlink_target, checked_components, Meta};
use super::policy::{ChangesetSizes, DeviceKind, DeviceNode, LEGACY_SPARSE_MAX_BYTES};
use super::safe::{dir_flags, key, kind, list_dir, lstat_at, owned, show, InRoot};
use super::sparse::sparse_map;
use super::{ApplyPolicy, Result, RootfsError, OPAQUE_MARKER, WHITEOUT_PREFIX};

/// What a changeset holds, as its validation counted it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChangesetSummary {
    /// Archive entries (markers included).
    pub entries: u64,
    /// File data and total file size declared.
    pub sizes: ChangesetSizes,
    /// Bytes the apply may need on the target's filesystem (data in whole blocks, a block per
    /// directory, and on an overlay the copies of replaced lower files kept for the undo).
    /// 0 when validated without a target.
    pub needed_bytes: u64,
    /// Inodes the apply may need.
    pub needed_inodes: u64,
}

/// What the validation learnt, for the apply pass.
pub(crate) struct Plan {
    /// Opaque directories (`a/b` bytes): what they held in the target goes first.
    pub(crate) opaque: HashSet<Vec<u8>>,
    pub(crate) summary: ChangesetSummary,
}

/// What an earlier entry left at a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Made {
    Dir,
    Symlink,
    /// A file, fifo, device or hard link.
    Other,
    /// Removed by a whiteout.
    Deleted,
}

/// The target a changeset is validated against.
pub(crate) struct Target<'a> {
    pub(crate) root: &'a OwnedFd,
    pub(crate) path: &'a Path,
    /// The undo directory's name, which no entry may reach.
    pub(crate) reserved: &'a OsStr,
}

/// Validate the changeset `archive` (open as `file`, at its start) under `policy`, against
/// `target` if given (without one, symlinks and free space are not judged); see the module
/// docs.
pub(crate) fn validate(
    archive: &Path,
    file: File,
    target: Option<&Target<'_>>,
    policy: &ApplyPolicy,
) -> Result<Plan> {
    let refuse = |entry: String, reason: String| RootfsError::Refused {
        archive: archive.to_path_buf(),
        entry,
        reason,
    };
    let fs = target.map(FsFacts::of).transpose()?;
    let mut v = Validator {
        target,
        policy,
        fs,
        made: BTreeMap::new(),
        plan: Plan {
            opaque: HashSet::new(),
            summary: ChangesetSummary::default(),
        },
        legacy_sparse: 0,
    };
    let (reader, tally) = Counting::new(ChangesetStream::new(file, archive)?);
    let mut ar = Archive::new(reader);
    let mut last = "(start of the archive)".to_string();
    let mut buf = vec![0u8; 1 << 20];
    let mut entries = ar
        .entries()
        .map_err(|e| refuse(last.clone(), format!("unreadable archive: {e}")))?;
    loop {
        tally.budget_headers();
        let Some(entry) = entries.next() else { break };
        tally.unlimited();
        let mut entry = entry.map_err(|e| {
            refuse(
                format!("after {last}"),
                format!("corrupt or truncated archive: {e}"),
            )
        })?;
        let raw = entry.path_bytes().into_owned();
        let shown = String::from_utf8_lossy(&raw).into_owned();
        v.check(&mut entry, &raw, &mut buf)
            .map_err(|r| refuse(shown.clone(), r))?;
        last = shown;
    }
    if tally.hit_eof() {
        return Err(refuse(
            format!("after {last}"),
            "truncated archive: it ends without the end-of-archive blocks".into(),
        ));
    }
    ar.into_inner()
        .into_inner()
        .finish()
        .map_err(|r| refuse(format!("after {last}"), r))?;
    if let (Some(fs), Some(t)) = (&v.fs, target) {
        fs.check_room(t.path, &v.plan.summary)?;
    }
    Ok(v.plan)
}

/// Facts about the target's filesystem.
struct FsFacts {
    /// Allocation unit.
    block: u64,
    /// Replacing an entry copies it up first (kept for the undo).
    overlay: bool,
    free_bytes: u64,
    /// `None` when the filesystem does not count inodes.
    free_inodes: Option<u64>,
}

impl FsFacts {
    fn of(t: &Target<'_>) -> Result<Self> {
        let err = |e: nix::errno::Errno| RootfsError::Io {
            step: "statfs",
            path: t.path.to_path_buf(),
            source: e.into(),
        };
        let vfs = nix::sys::statvfs::fstatvfs(t.root).map_err(err)?;
        let sfs = nix::sys::statfs::fstatfs(t.root).map_err(err)?;
        Ok(FsFacts {
            block: vfs.fragment_size().max(512),
            overlay: sfs.filesystem_type() == nix::sys::statfs::OVERLAYFS_SUPER_MAGIC,
            free_bytes: vfs.blocks_available().saturating_mul(vfs.fragment_size()),
            free_inodes: (vfs.files() > 0).then(|| vfs.files_available()),
        })
    }

    fn blocks(&self, bytes: u64) -> u64 {
        bytes.div_ceil(self.block).saturating_mul(self.block)
    }

    fn check_room(&self, path: &Path, s: &ChangesetSummary) -> Result<()> {
        if s.needed_bytes > self.free_bytes {
            return Err(RootfsError::NoSpace {
                path: path.to_path_buf(),
                what: "bytes",
                needed: s.needed_bytes,
                free: self.free_bytes,
            });
        }
        match self.free_inodes {
            Some(free) if s.needed_inodes > free => Err(RootfsError::NoSpace {
                path: path.to_path_buf(),
                what: "inodes",
                needed: s.needed_inodes,
                free,
            }),
            _ => Ok(()),
        }
    }
}

struct Validator<'a> {
    target: Option<&'a Target<'a>>,
    policy: &'a ApplyPolicy,
    fs: Option<FsFacts>,
    /// Paths the entries so far made or deleted, by `a/b` bytes.
    made: BTreeMap<Vec<u8>, Made>,
    plan: Plan,
    /// Logical bytes of old-GNU sparse entries so far.
    legacy_sparse: u64,
}

impl Validator<'_> {
    fn reserved(&self) -> Option<&OsStr> {
        self.target.map(|t| t.reserved)
    }

    fn check<R: Read>(
        &mut self,
        entry: &mut Entry<'_, R>,
        raw: &[u8],
        buf: &mut [u8],
    ) -> Result<(), String> {
        let parts = checked_components(raw, self.reserved())?;
        let ty = entry.header().entry_type();
        self.plan.summary.entries += 1;
        let name = parts.last().ok_or("empty path")?.as_bytes().to_vec();
        if let Some(victim) = name.strip_prefix(WHITEOUT_PREFIX.as_bytes()) {
            if !matches!(ty, EntryType::Regular | EntryType::Continuous) || entry.size() != 0 {
                return Err(format!(
                    "whiteout marker must be an empty regular file, not {ty:?} of {} bytes",
                    entry.size()
                ));
            }
            let parent_parts = &parts[..parts.len() - 1];
            let parent = self.walk_parents(&parts)?;
            if name == OPAQUE_MARKER.as_bytes() {
                if parent_parts.is_empty() {
                    return Err("opaque marker for the root directory itself".into());
                }
                self.cost_of_contents(parent_parts)?;
                self.plan.opaque.insert(key(parent_parts));
                return Ok(());
            }
            if victim.starts_with(b".wh.") || matches!(victim, b"" | b"." | b"..") {
                return Err("unknown whiteout meta-entry or whiteout of an invalid name".into());
            }
            let mut gone = parent_parts.to_vec();
            gone.push(OsStr::from_bytes(victim).to_os_string());
            self.cost_of_replacing(parent.as_ref(), &gone, false)?;
            self.record(&gone, Made::Deleted);
            return Ok(());
        }
        let data = entry.size();
        let made = match ty {
            EntryType::Regular | EntryType::Continuous => {
                let logical = match sparse_map(entry, data)? {
                    Some(map) => map.real_size,
                    None => data,
                };
                self.count_file(data, logical)?;
                Made::Other
            }
            EntryType::GNUSparse => {
                self.legacy_sparse_entry(entry)?;
                Made::Other
            }
            EntryType::Fifo => Made::Other,
            EntryType::Directory => Made::Dir,
            EntryType::Symlink => {
                let t = entry.link_name_bytes().ok_or("symlink without a target")?;
                check_symlink_target(&t)?;
                Made::Symlink
            }
            EntryType::Link => {
                let t = entry
                    .link_name_bytes()
                    .ok_or("hard link without a target")?;
                self.check_hardlink(&parts, &t)?;
                Made::Other
            }
            EntryType::Char | EntryType::Block => {
                let node = device_node(entry)?;
                if !self.policy.allows(&node) {
                    return Err(format!(
                        "device node {} {}:{} is not one the runtime creates for this \
                         container (the target spec's linux.devices and runc's default \
                         devices): refused whatever the image records",
                        if node.kind == DeviceKind::Char {
                            "c"
                        } else {
                            "b"
                        },
                        node.major,
                        node.minor
                    ));
                }
                Made::Other
            }
            other => return Err(format!("unsupported entry type {other:?}")),
        };
        let parent = self.walk_parents(&parts)?;
        Meta::of(entry)?;
        self.cost_of_replacing(parent.as_ref(), &parts, made == Made::Dir)?;
        if !matches!(ty, EntryType::Link) {
            self.plan.summary.needed_inodes += 1;
        }
        if made == Made::Dir {
            let block = self.fs.as_ref().map_or(0, |f| f.block);
            self.plan.summary.needed_bytes += block;
        }
        self.record(&parts, made);
        // Read the data too: a cut or corrupt stream shows here, not halfway through the apply.
        let mut got = 0u64;
        loop {
            let n = entry
                .read(buf)
                .map_err(|e| format!("truncated or corrupt data: {e}"))?;
            if n == 0 {
                break;
            }
            got += n as u64;
        }
        if got != data {
            return Err(format!("truncated archive: {got} of {data} data bytes"));
        }
        Ok(())
    }

    /// Count a regular file's data and size, within what the capture recorded.
    fn count_file(&mut self, data: u64, logical: u64) -> Result<(), String> {
        let s = &mut self.plan.summary;
        s.sizes.data_bytes = s.sizes.data_bytes.saturating_add(data);
        s.sizes.logical_bytes = s.sizes.logical_bytes.saturating_add(logical);
        s.needed_bytes = s
            .needed_bytes
            .saturating_add(self.fs.as_ref().map_or(0, |f| f.blocks(data)));
        if let Some(d) = self.policy.declared() {
            if s.sizes.data_bytes > d.data_bytes {
                return Err(format!(
                    "the archive holds more file data than the capture recorded: over {} \
                     bytes so far, {} recorded",
                    s.sizes.data_bytes, d.data_bytes
                ));
            }
            if s.sizes.logical_bytes > d.logical_bytes {
                return Err(format!(
                    "the archive's files are larger than the capture recorded: over {} bytes \
                     so far, {} recorded",
                    s.sizes.logical_bytes, d.logical_bytes
                ));
            }
        }
        Ok(())
    }

    /// An old-GNU sparse entry: only for format-1 images, and only so big in all (the tar
    /// reader expands its holes).
    fn legacy_sparse_entry<R: Read>(&mut self, entry: &Entry<'_, R>) -> Result<(), String> {
        if !self.policy.legacy_sparse() {
            return Err(
                "old-GNU sparse entry (type S): only changesets of image format 1 hold them, \
                 and this image is not declared as one"
                    .into(),
            );
        }
        let logical = entry.size();
        let data = entry
            .header()
            .entry_size()
            .map_err(|e| format!("bad size field: {e}"))?;
        self.legacy_sparse = self.legacy_sparse.saturating_add(logical);
        if self.legacy_sparse > LEGACY_SPARSE_MAX_BYTES {
            return Err(format!(
                "old-GNU sparse entries declare over {} bytes in all; an image of format 1 \
                 may declare at most {LEGACY_SPARSE_MAX_BYTES} (their holes cost time to \
                 read): checkpoint again with this cryo, whose images store holes for free",
                self.legacy_sparse
            ));
        }
        self.count_file(data, logical)
    }

    /// Note what an entry leaves at `parts`; a non-directory there replaces a whole subtree.
    fn record(&mut self, parts: &[OsString], made: Made) {
        let k = key(parts);
        if made != Made::Dir {
            let (mut lo, mut hi) = (k.clone(), k.clone());
            lo.push(b'/');
            hi.push(b'/' + 1);
            let below: Vec<Vec<u8>> = self.made.range(lo..hi).map(|(k, _)| k.clone()).collect();
            for b in below {
                self.made.remove(&b);
            }
        }
        self.made.insert(k, made);
    }

    /// Check the parent directories of `parts` can be reached without leaving the root or
    /// going through a symlink the archive made. Returns the parent as it is in the target
    /// now, or `None` when the apply will make it (new, or replacing what is there).
    fn walk_parents(&self, parts: &[OsString]) -> Result<Option<InRoot>, String> {
        let mut cur = match self.target {
            Some(t) => Some(InRoot::new(t.root, Some(t.reserved))?),
            None => None,
        };
        for i in 0..parts.len().saturating_sub(1) {
            let prefix = &parts[..=i];
            let k = key(prefix);
            let name = &parts[i];
            match self.made.get(&k) {
                Some(Made::Symlink) => {
                    return Err(format!(
                        "parent {} is a symlink created by the archive: refusing to write \
                         through it",
                        show(prefix)
                    ))
                }
                Some(Made::Other) => {
                    return Err(format!(
                        "parent {} is not a directory (the archive made it a file)",
                        show(prefix)
                    ))
                }
                Some(Made::Deleted) => cur = None,
                Some(Made::Dir) => {
                    // The archive keeps a real directory there, or replaces what is there
                    // with a new one.
                    if let Some(mut w) = cur.take() {
                        if w.enter_real_dir(name)? {
                            cur = Some(w);
                        }
                    }
                }
                None => {
                    if let Some(mut w) = cur.take() {
                        let found = w.step(name, &mut None).map_err(|r| {
                            format!("cannot go through {} in the target: {r}", show(prefix))
                        })?;
                        if found {
                            cur = Some(w);
                        }
                    }
                }
            }
            if self.plan.opaque.contains(&k) {
                // What the target holds there is cleared before anything is written in it.
                cur = None;
            }
        }
        Ok(cur)
    }

    /// On an overlay, an existing entry the apply replaces or removes is first copied up
    /// (renamed into the undo directory): count what that copies.
    fn cost_of_replacing(
        &mut self,
        parent: Option<&InRoot>,
        parts: &[OsString],
        keeps_a_dir: bool,
    ) -> Result<(), String> {
        let (Some(fs), Some(parent)) = (&self.fs, parent) else {
            return Ok(());
        };
        if !fs.overlay || self.made.contains_key(&key(parts)) {
            return Ok(());
        }
        let leaf = parts.last().ok_or("empty path")?;
        let dir = parent.dir()?;
        if keeps_a_dir {
            // A directory entry over a directory keeps it: nothing moves.
            let st = lstat_at(dir, leaf).map_err(|e| format!("stat {}: {e}", show(parts)))?;
            if st.is_some_and(|st| kind(&st) == SFlag::S_IFDIR) {
                return Ok(());
            }
        }
        let bytes = allocated(dir, leaf).map_err(|e| format!("measure {}: {e}", show(parts)))?;
        self.plan.summary.needed_bytes = self.plan.summary.needed_bytes.saturating_add(bytes);
        Ok(())
    }

    /// The same for everything an opaque directory held in the target.
    fn cost_of_contents(&mut self, dir: &[OsString]) -> Result<(), String> {
        if !self.fs.as_ref().is_some_and(|f| f.overlay) {
            return Ok(());
        }
        let mut with_child = dir.to_vec();
        with_child.push(OsString::from("x"));
        // The directory as the target holds it, unless the archive replaced it already.
        let Some(dir) = self.walk_parents(&with_child)? else {
            return Ok(());
        };
        let (fd, _) = dir.into_dir()?;
        let mut bytes = 0u64;
        for name in list_dir(&fd).map_err(|e| e.to_string())? {
            bytes = bytes.saturating_add(allocated(&fd, &name).map_err(|e| e.to_string())?);
        }
        self.plan.summary.needed_bytes = self.plan.summary.needed_bytes.saturating_add(bytes);
        Ok(())
    }

    fn check_hardlink(&self, parts: &[OsString], target: &[u8]) -> Result<(), String> {
        let t = checked_components(target, self.reserved())
            .map_err(|r| format!("hard link target: {r}"))?;
        let shown = show(&t);
        if t == parts || t.starts_with(parts) {
            return Err(format!("hard link to itself or below itself ({shown})"));
        }
        match self.made.get(&key(&t)) {
            Some(Made::Other) | Some(Made::Symlink) => return Ok(()),
            Some(Made::Dir) => return Err(format!("hard link target {shown} is a directory")),
            Some(Made::Deleted) => {
                return Err(format!(
                    "hard link target {shown} is absent (deleted by the archive)"
                ))
            }
            None => {}
        }
        if self.target.is_none() {
            // Judged against the target at restore.
            return Ok(());
        }
        let parent = self
            .walk_parents(&t)
            .map_err(|r| format!("hard link target: {r}"))?;
        let leaf = t.last().ok_or("empty hard link target")?;
        let st = match parent {
            Some(w) => lstat_at(w.dir()?, leaf).map_err(|e| format!("stat {shown}: {e}"))?,
            None => None,
        };
        match st {
            None => Err(format!(
                "hard link target {shown} is absent from the archive and the target"
            )),
            Some(st) if kind(&st) == SFlag::S_IFDIR => {
                Err(format!("hard link target {shown} is a directory"))
            }
            Some(_) => Ok(()),
        }
    }
}

/// The node a device entry would make.
fn device_node<R: Read>(entry: &Entry<'_, R>) -> Result<DeviceNode, String> {
    let h = entry.header();
    let bad = |what: &str, e: &dyn std::fmt::Display| format!("bad device {what} field: {e}");
    Ok(DeviceNode {
        kind: if h.entry_type() == EntryType::Char {
            DeviceKind::Char
        } else {
            DeviceKind::Block
        },
        major: h.device_major().map_err(|e| bad("major", &e))?.unwrap_or(0),
        minor: h.device_minor().map_err(|e| bad("minor", &e))?.unwrap_or(0),
    })
}

/// Bytes allocated to the regular files at `name` in `dir` (the whole tree for a directory),
/// never following a symlink.
fn allocated(dir: &OwnedFd, name: &OsStr) -> std::io::Result<u64> {
    let Some(st) = lstat_at(dir, name)? else {
        return Ok(0);
    };
    match kind(&st) {
        SFlag::S_IFREG => Ok((st.st_blocks as u64).saturating_mul(512)),
        SFlag::S_IFDIR => {
            let sub = owned(openat(
                Some(dir.as_raw_fd()),
                name,
                dir_flags(),
                Mode::empty(),
            )?);
            let mut total = 0u64;
            for child in list_dir(&sub)? {
                total = total.saturating_add(allocated(&sub, &child)?);
            }
            Ok(total)
        }
        _ => Ok(0),
    }
}

/// Validate a changeset without a target (`cryo verify`): its stream and checksum, every
/// header, path, link, device node and sparse map, and its sizes against `policy`. Symlinks
/// in a target and free space are judged at restore.
pub fn verify_changeset(archive: &Path, policy: &ApplyPolicy) -> Result<ChangesetSummary> {
    let file = File::open(archive).map_err(super::io_err("open", archive))?;
    Ok(validate(archive, file, None, policy)?.summary)
}
