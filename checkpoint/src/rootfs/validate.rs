//! The first pass of a restore: read the whole archive, every header and every data byte, and
//! refuse it before anything is written if any entry is hostile, unknown or broken.
//!
//! To judge where an entry would land, the pass keeps a model of what the entries before it
//! did (a directory made here, a symlink there, a path deleted) on top of the target as it
//! is. Writing through a symlink the archive made is the classic tar escape and is refused
//! outright; a symlink the target already has is followed the way the container sees it, and
//! refused only when it leads out of the root.

use std::collections::{BTreeMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::io::Read;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use nix::sys::stat::{Mode, SFlag};
use nix::sys::time::TimeSpec;
use nix::unistd::{Gid, Uid};
use tar::{Archive, Entry, EntryType};

use super::codec::{open_changeset, Counting};
use super::safe::{archive_components, key, kind, lstat_at, show, InRoot};
use super::{ApplyPolicy, Result, RootfsError, OPAQUE_MARKER, WHITEOUT_PREFIX};

/// What the validation learnt, for the apply pass.
pub(crate) struct Plan {
    /// Opaque directories (`a/b` bytes): what they held in the target goes first.
    pub(crate) opaque: HashSet<Vec<u8>>,
    /// Device nodes the policy allows (`dev/null` bytes).
    pub(crate) devices: HashSet<Vec<u8>>,
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

/// Validate `archive` against the target root `root`; see the module docs.
pub(crate) fn validate(archive: &Path, root: &OwnedFd, policy: &ApplyPolicy) -> Result<Plan> {
    let refuse = |entry: String, reason: String| RootfsError::Refused {
        archive: archive.to_path_buf(),
        entry,
        reason,
    };
    let mut devices = HashSet::new();
    for d in &policy.allowed_devices {
        let parts = archive_components(d.trim_start_matches('/').as_bytes())
            .map_err(|r| refuse(d.clone(), format!("allowed device path: {r}")))?;
        devices.insert(key(&parts));
    }
    let mut v = Validator {
        root,
        made: BTreeMap::new(),
        plan: Plan {
            opaque: HashSet::new(),
            devices,
        },
    };
    let (reader, tally) = Counting::new(open_changeset(archive)?);
    let mut ar = Archive::new(reader);
    let mut last = "(start of the archive)".to_string();
    let mut buf = vec![0u8; 1 << 20];
    let entries = ar
        .entries()
        .map_err(|e| refuse(last.clone(), format!("unreadable archive: {e}")))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| {
            refuse(
                format!("after {last}"),
                format!("corrupt or truncated archive: {e}"),
            )
        })?;
        let raw = entry.path_bytes().into_owned();
        let shown = String::from_utf8_lossy(&raw).into_owned();
        v.check(&mut entry, &raw)
            .map_err(|r| refuse(shown.clone(), r))?;
        // Read the data too: a cut or corrupt stream shows here, not halfway through the apply.
        let want = entry.size();
        let mut got = 0u64;
        loop {
            let n = entry
                .read(&mut buf)
                .map_err(|e| refuse(shown.clone(), format!("truncated or corrupt data: {e}")))?;
            if n == 0 {
                break;
            }
            got += n as u64;
        }
        if got != want {
            return Err(refuse(
                shown,
                format!("truncated archive: {got} of {want} data bytes"),
            ));
        }
        last = shown;
    }
    if tally.hit_eof() {
        return Err(refuse(
            format!("after {last}"),
            "truncated archive: it ends without the end-of-archive blocks".into(),
        ));
    }
    Ok(v.plan)
}

struct Validator<'a> {
    root: &'a OwnedFd,
    /// Paths the entries so far made or deleted, by `a/b` bytes.
    made: BTreeMap<Vec<u8>, Made>,
    plan: Plan,
}

impl Validator<'_> {
    fn check<R: Read>(&mut self, entry: &mut Entry<'_, R>, raw: &[u8]) -> Result<(), String> {
        let parts = archive_components(raw)?;
        let ty = entry.header().entry_type();
        let name = parts.last().ok_or("empty path")?.as_bytes().to_vec();
        if let Some(victim) = name.strip_prefix(WHITEOUT_PREFIX.as_bytes()) {
            if !matches!(ty, EntryType::Regular | EntryType::Continuous) {
                return Err(format!(
                    "whiteout marker must be an empty regular file, not {ty:?}"
                ));
            }
            self.walk_parents(&parts)?;
            let parent = &parts[..parts.len() - 1];
            if name == OPAQUE_MARKER.as_bytes() {
                if parent.is_empty() {
                    return Err("opaque marker for the root directory itself".into());
                }
                self.plan.opaque.insert(key(parent));
                return Ok(());
            }
            if victim.starts_with(b".wh.") || matches!(victim, b"" | b"." | b"..") {
                return Err("unknown whiteout meta-entry or whiteout of an invalid name".into());
            }
            let mut gone = parent.to_vec();
            gone.push(OsStr::from_bytes(victim).to_os_string());
            self.record(&gone, Made::Deleted);
            return Ok(());
        }
        let made = match ty {
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => Made::Other,
            EntryType::Fifo => Made::Other,
            EntryType::Directory => Made::Dir,
            EntryType::Symlink => {
                let t = entry.link_name_bytes().ok_or("symlink without a target")?;
                if t.is_empty() || t.contains(&0) {
                    return Err("symlink with an empty target or a NUL byte in it".into());
                }
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
                if !self.plan.devices.contains(&key(&parts)) {
                    return Err(
                        "device node not recorded at checkpoint (not in the allowed devices)"
                            .into(),
                    );
                }
                Made::Other
            }
            other => return Err(format!("unsupported entry type {other:?}")),
        };
        self.walk_parents(&parts)?;
        Meta::of(entry)?;
        self.record(&parts, made);
        Ok(())
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
        let mut cur = Some(InRoot::new(self.root)?);
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
                        let found = w.step(name, false).map_err(|r| {
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

    fn check_hardlink(&self, parts: &[OsString], target: &[u8]) -> Result<(), String> {
        let t = archive_components(target).map_err(|r| format!("hard link target: {r}"))?;
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

/// Owner, mode, times and xattrs of an entry.
pub(crate) struct Meta {
    pub(crate) uid: Uid,
    pub(crate) gid: Gid,
    pub(crate) mode: Mode,
    pub(crate) atime: TimeSpec,
    pub(crate) mtime: TimeSpec,
    pub(crate) xattrs: Vec<(String, Vec<u8>)>,
}

impl Meta {
    /// Parse them (validation and apply alike, so a header the apply could not read is
    /// refused before anything is written).
    pub(crate) fn of<R: Read>(entry: &mut Entry<'_, R>) -> Result<Meta, String> {
        let h = entry.header();
        let bad = |what: &str, e: &dyn std::fmt::Display| format!("bad {what} field: {e}");
        let id = |what: &str, v: std::io::Result<u64>| {
            let v = v.map_err(|e| bad(what, &e))?;
            u32::try_from(v).map_err(|_| format!("{what} {v} out of range"))
        };
        let time = |what: &str, v: std::io::Result<u64>| {
            let v = v.map_err(|e| bad(what, &e))?;
            i64::try_from(v).map_err(|_| format!("{what} {v} out of range"))
        };
        let mtime = time("mtime", h.mtime())?;
        // GNU tar leaves the atime field blank unless asked for it: blank means none.
        let atime = match h.as_gnu() {
            Some(g) if g.atime.iter().any(|b| *b != 0) => time("atime", g.atime())?,
            _ => 0,
        };
        let mut m = Meta {
            uid: Uid::from_raw(id("uid", h.uid())?),
            gid: Gid::from_raw(id("gid", h.gid())?),
            mode: Mode::from_bits_truncate(h.mode().map_err(|e| bad("mode", &e))? & 0o7777),
            // Archives without an atime get the mtime.
            atime: TimeSpec::new(if atime > 0 { atime } else { mtime }, 0),
            mtime: TimeSpec::new(mtime, 0),
            xattrs: Vec::new(),
        };
        if matches!(h.entry_type(), EntryType::Char | EntryType::Block) {
            h.device_major().map_err(|e| bad("device major", &e))?;
            h.device_minor().map_err(|e| bad("device minor", &e))?;
        }
        let Some(exts) = entry
            .pax_extensions()
            .map_err(|e| format!("bad PAX header: {e}"))?
        else {
            return Ok(m);
        };
        for ext in exts {
            let ext = ext.map_err(|e| format!("bad PAX record: {e}"))?;
            let k = ext
                .key()
                .map_err(|e| format!("PAX key is not UTF-8: {e}"))?;
            if let Some(name) = k.strip_prefix("SCHILY.xattr.") {
                // Overlay's private attributes must not come back in: on a plain directory
                // that later serves as an upper dir they would hide or redirect files.
                if name.is_empty() {
                    return Err("empty xattr name".into());
                }
                if name.starts_with("trusted.overlay.") || name.starts_with("user.overlay.") {
                    return Err(format!("overlay-private xattr {name}"));
                }
                m.xattrs
                    .push((name.to_string(), ext.value_bytes().to_vec()));
            }
        }
        Ok(m)
    }
}
