//! What an entry carries besides its data: owner, mode, times, extended attributes; and the
//! limits its names must keep to. Parsed the same way by the validation and the apply, so a
//! header the apply could not read is refused before anything is written.

use std::ffi::{OsStr, OsString};
use std::io::Read;
use std::os::unix::ffi::OsStrExt;

use nix::sys::stat::Mode;
use nix::sys::time::TimeSpec;
use nix::unistd::{Gid, Uid};
use tar::{Entry, EntryType};

use super::safe::archive_components;

/// Longest file name Linux accepts (`NAME_MAX`).
pub(crate) const NAME_MAX: usize = 255;
/// Longest path Linux accepts, its terminating NUL included (`PATH_MAX`).
pub(crate) const PATH_MAX: usize = 4096;
/// Longest extended attribute name (`XATTR_NAME_MAX`).
const XATTR_NAME_MAX: usize = 255;
/// Largest extended attribute value (`XATTR_SIZE_MAX`).
const XATTR_SIZE_MAX: usize = 65536;

/// Split an archive path (an entry's, or a hard link's target) and check it against the
/// kernel's limits and the undo directory's name: a path the apply could not make, or one
/// that would reach into the undo data, is refused before anything is written.
pub(crate) fn checked_components(
    raw: &[u8],
    reserved: Option<&OsStr>,
) -> Result<Vec<OsString>, String> {
    let parts = archive_components(raw)?;
    if let Some(long) = parts.iter().find(|p| p.len() > NAME_MAX) {
        return Err(format!(
            "a path component of {} bytes (the kernel allows {NAME_MAX}): {:?}…",
            long.len(),
            String::from_utf8_lossy(&long.as_bytes()[..32])
        ));
    }
    // "/a/b" and its NUL, as the container would name it.
    let len = parts.iter().map(|p| p.len() + 1).sum::<usize>() + 1;
    if len > PATH_MAX {
        return Err(format!(
            "a path of {} bytes (the kernel allows {})",
            len - 1,
            PATH_MAX - 1
        ));
    }
    if reserved.is_some_and(|r| parts[0] == r) {
        return Err(format!(
            "the path is cryo's undo directory {:?}, which a changeset may not contain",
            parts[0]
        ));
    }
    Ok(parts)
}

/// A symlink target the kernel can store.
pub(crate) fn check_symlink_target(t: &[u8]) -> Result<(), String> {
    if t.is_empty() || t.contains(&0) {
        return Err("symlink with an empty target or a NUL byte in it".into());
    }
    if t.len() >= PATH_MAX {
        return Err(format!(
            "symlink target of {} bytes (the kernel allows {})",
            t.len(),
            PATH_MAX - 1
        ));
    }
    Ok(())
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
            if k == "atime" {
                // Whole seconds (a fraction, as other tars write it, is dropped).
                let v = ext.value_bytes();
                let secs = v.split(|b| *b == b'.').next().unwrap_or_default();
                let secs = std::str::from_utf8(secs)
                    .ok()
                    .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                    .and_then(|s| s.parse::<i64>().ok())
                    .ok_or_else(|| format!("bad PAX atime {:?}", String::from_utf8_lossy(v)))?;
                m.atime = TimeSpec::new(if secs > 0 { secs } else { mtime }, 0);
            }
            if let Some(name) = k.strip_prefix("SCHILY.xattr.") {
                // Overlay's private attributes must not come back in: on a plain directory
                // that later serves as an upper dir they would hide or redirect files.
                if name.is_empty() || name.len() > XATTR_NAME_MAX {
                    return Err(format!("xattr name of {} bytes", name.len()));
                }
                if ext.value_bytes().len() > XATTR_SIZE_MAX {
                    return Err(format!(
                        "xattr {name} of {} bytes (the kernel allows {XATTR_SIZE_MAX})",
                        ext.value_bytes().len()
                    ));
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
