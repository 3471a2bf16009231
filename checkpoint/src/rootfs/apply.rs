//! Applying a changeset to the target rootfs: validate the whole archive first, then apply
//! through directory fds that never follow a symlink.

use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::fcntl::{openat, renameat, AtFlags, OFlag};
use nix::sys::stat::{fchmodat, mknodat, utimensat, FchmodatFlags, Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;
use nix::unistd::{fchownat, linkat, mkfifoat, symlinkat, Gid, Uid};
use tar::{Archive, EntryType};

use super::capture::open_changeset;
use super::safe::{components, fd_path, open_dir, open_root};
use super::{RootfsError, OPAQUE_MARKER, WHITEOUT_PREFIX};

/// What a changeset may do.
#[derive(Debug, Clone, Default)]
pub struct ApplyPolicy {
    /// Device nodes recorded at checkpoint; any other device node is refused.
    pub allowed_devices: Vec<String>,
}

/// What was applied.
#[derive(Debug, Clone, Default)]
pub struct ApplyReport {
    /// Entries written.
    pub written: u64,
    /// Paths deleted (whiteouts) and directories cleared (opaque).
    pub deleted: u64,
    /// Time taken.
    pub elapsed: Duration,
}

/// Validate, then apply `archive` (`.tar` or `.tar.zst`) onto `target_root`.
pub fn apply_changeset(
    archive: &Path,
    target_root: &Path,
    policy: &ApplyPolicy,
) -> Result<ApplyReport, RootfsError> {
    let start = Instant::now();
    let refuse = |entry: &str, reason: String| RootfsError::Refused {
        archive: archive.to_path_buf(),
        entry: entry.to_string(),
        reason,
    };
    validate(archive, target_root, policy).map_err(|(e, r)| refuse(&e, r))?;
    let root = open_root(target_root).map_err(|r| refuse("", r))?;
    let mut report = ApplyReport::default();
    let mut ar = Archive::new(open_changeset(archive)?);
    let entries = ar.entries().map_err(|e| refuse("", e.to_string()))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| refuse("", e.to_string()))?;
        let path = entry
            .path()
            .map_err(|e| refuse("", e.to_string()))?
            .into_owned();
        let shown = path.to_string_lossy().into_owned();
        apply_one(&root, &mut entry, &path, &mut report).map_err(|reason| RootfsError::Apply {
            archive: archive.to_path_buf(),
            entry: shown.clone(),
            reason,
        })?;
    }
    report.elapsed = start.elapsed();
    Ok(report)
}

/// Read every header and all data; refuse anything hostile or broken before writing.
fn validate(archive: &Path, target: &Path, policy: &ApplyPolicy) -> Result<(), (String, String)> {
    let mut ar = Archive::new(open_changeset(archive).map_err(|e| (String::new(), e.to_string()))?);
    let entries = ar.entries().map_err(|e| (String::new(), e.to_string()))?;
    let mut symlinks: HashSet<PathBuf> = HashSet::new();
    for entry in entries {
        let mut entry = entry.map_err(|e| (String::new(), format!("corrupt archive: {e}")))?;
        let path = entry
            .path()
            .map_err(|e| (String::new(), e.to_string()))?
            .into_owned();
        let shown = path.to_string_lossy().into_owned();
        let bad = |r: String| (shown.clone(), r);
        if path.as_os_str().as_bytes().contains(&0) {
            return Err(bad("NUL in path".into()));
        }
        let parts = components(&path).map_err(bad)?;
        check_parents(&parts, &symlinks, target).map_err(bad)?;
        let ty = entry.header().entry_type();
        match ty {
            EntryType::Regular
            | EntryType::Continuous
            | EntryType::GNUSparse
            | EntryType::Directory
            | EntryType::Fifo => {}
            EntryType::Symlink => {
                symlinks.insert(parts.iter().collect());
            }
            EntryType::Link => {
                let target_name = entry
                    .link_name()
                    .map_err(|e| bad(e.to_string()))?
                    .ok_or_else(|| bad("hardlink without a target".into()))?;
                let tparts =
                    components(&target_name).map_err(|r| bad(format!("hardlink target: {r}")))?;
                check_parents(&tparts, &symlinks, target)
                    .map_err(|r| bad(format!("hardlink target: {r}")))?;
            }
            EntryType::Char | EntryType::Block => {
                if !policy.allowed_devices.iter().any(|d| Path::new(d) == path) {
                    return Err(bad("device node not recorded at checkpoint".into()));
                }
            }
            other => return Err(bad(format!("unsupported entry type {other:?}"))),
        }
        let declared = entry.size();
        let read = std::io::copy(&mut entry, &mut std::io::sink())
            .map_err(|e| bad(format!("truncated or corrupt data: {e}")))?;
        if ty != EntryType::GNUSparse && read != declared {
            return Err(bad(format!("truncated: {read} of {declared} bytes")));
        }
    }
    Ok(())
}

/// No parent may be a symlink made by the archive, nor a symlink already in the target.
fn check_parents(
    parts: &[&OsStr],
    symlinks: &HashSet<PathBuf>,
    target: &Path,
) -> Result<(), String> {
    let mut prefix = PathBuf::new();
    for p in &parts[..parts.len() - 1] {
        prefix.push(p);
        if symlinks.contains(&prefix) {
            return Err(format!(
                "goes through symlink {} created by the archive",
                prefix.display()
            ));
        }
        if let Ok(md) = std::fs::symlink_metadata(target.join(&prefix)) {
            if md.file_type().is_symlink() {
                return Err(format!(
                    "goes through symlink {} in the target",
                    prefix.display()
                ));
            }
        }
    }
    Ok(())
}

fn apply_one<R: Read>(
    root: &OwnedFd,
    entry: &mut tar::Entry<'_, R>,
    path: &Path,
    report: &mut ApplyReport,
) -> Result<(), String> {
    let parts = components(path)?;
    let (name, parents) = parts.split_last().ok_or("empty path")?;
    let dir = open_dir(root, parents, true)?;
    let name_bytes = name.as_bytes();
    if *name == OsStr::new(OPAQUE_MARKER) {
        clear_children(&dir)?;
        report.deleted += 1;
        return Ok(());
    }
    if let Some(victim) = name_bytes.strip_prefix(WHITEOUT_PREFIX.as_bytes()) {
        remove_any(&dir, OsStr::from_bytes(victim))?;
        report.deleted += 1;
        return Ok(());
    }
    let h = entry.header().clone();
    let mode = Mode::from_bits_truncate(h.mode().map_err(|e| e.to_string())?);
    let ty = h.entry_type();
    let err = |what: &str, e: nix::errno::Errno| format!("{what}: {e}");
    match ty {
        EntryType::Directory => match std::fs::symlink_metadata(fd_path(&dir, name)) {
            Ok(md) if md.is_dir() => {}
            Ok(_) => {
                remove_any(&dir, name)?;
                nix::sys::stat::mkdirat(Some(dir.as_raw_fd()), *name, mode)
                    .map_err(|e| err("mkdir", e))?;
            }
            Err(_) => nix::sys::stat::mkdirat(Some(dir.as_raw_fd()), *name, mode)
                .map_err(|e| err("mkdir", e))?,
        },
        EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
            let tmp = OsString::from(format!(".cryo-tmp-{}", name.to_string_lossy()));
            let fd = openat(
                Some(dir.as_raw_fd()),
                tmp.as_os_str(),
                OFlag::O_WRONLY
                    | OFlag::O_CREAT
                    | OFlag::O_TRUNC
                    | OFlag::O_NOFOLLOW
                    | OFlag::O_CLOEXEC,
                Mode::from_bits_truncate(0o600),
            )
            .map_err(|e| err("create", e))?;
            // SAFETY: openat returned a fresh descriptor that we now own.
            let mut f = unsafe { std::fs::File::from_raw_fd(fd) };
            let len = copy_sparse(entry, &mut f).map_err(|e| format!("write: {e}"))?;
            f.set_len(len).map_err(|e| format!("truncate: {e}"))?;
            drop(f);
            if std::fs::symlink_metadata(fd_path(&dir, name)).is_ok_and(|m| m.is_dir()) {
                remove_any(&dir, name)?;
            }
            renameat(
                Some(dir.as_raw_fd()),
                tmp.as_os_str(),
                Some(dir.as_raw_fd()),
                *name,
            )
            .map_err(|e| err("rename", e))?;
        }
        EntryType::Symlink => {
            let target = entry
                .link_name()
                .map_err(|e| e.to_string())?
                .ok_or("symlink without target")?;
            remove_any(&dir, name)?;
            symlinkat(target.as_ref(), Some(dir.as_raw_fd()), *name)
                .map_err(|e| err("symlink", e))?;
        }
        EntryType::Link => {
            let target = entry
                .link_name()
                .map_err(|e| e.to_string())?
                .ok_or("hardlink without target")?;
            let tparts = components(&target)?;
            let (tname, tparents) = tparts.split_last().ok_or("empty hardlink target")?;
            let tdir = open_dir(root, tparents, false)?;
            remove_any(&dir, name)?;
            linkat(
                Some(tdir.as_raw_fd()),
                *tname,
                Some(dir.as_raw_fd()),
                *name,
                AtFlags::empty(),
            )
            .map_err(|e| err("link", e))?;
            report.written += 1;
            return Ok(());
        }
        EntryType::Fifo => {
            remove_any(&dir, name)?;
            mkfifoat(Some(dir.as_raw_fd()), *name, mode).map_err(|e| err("mkfifo", e))?;
        }
        EntryType::Char | EntryType::Block => {
            remove_any(&dir, name)?;
            let kind = if ty == EntryType::Char {
                SFlag::S_IFCHR
            } else {
                SFlag::S_IFBLK
            };
            let major = h.device_major().ok().flatten().unwrap_or(0);
            let minor = h.device_minor().ok().flatten().unwrap_or(0);
            mknodat(
                Some(dir.as_raw_fd()),
                *name,
                kind,
                mode,
                nix::sys::stat::makedev(major.into(), minor.into()),
            )
            .map_err(|e| err("mknod", e))?;
        }
        other => return Err(format!("unsupported entry type {other:?}")),
    }
    let uid = h.uid().unwrap_or(0) as u32;
    let gid = h.gid().unwrap_or(0) as u32;
    fchownat(
        Some(dir.as_raw_fd()),
        *name,
        Some(Uid::from_raw(uid)),
        Some(Gid::from_raw(gid)),
        AtFlags::AT_SYMLINK_NOFOLLOW,
    )
    .map_err(|e| err("chown", e))?;
    if ty != EntryType::Symlink {
        // chown clears set-id bits, so the mode goes on after it.
        fchmodat(
            Some(dir.as_raw_fd()),
            *name,
            mode,
            FchmodatFlags::FollowSymlink,
        )
        .map_err(|e| err("chmod", e))?;
    }
    if let Ok(Some(exts)) = entry.pax_extensions() {
        for ext in exts.flatten() {
            if let (Ok(k), v) = (ext.key(), ext.value_bytes()) {
                if let Some(xname) = k.strip_prefix("SCHILY.xattr.") {
                    xattr::set(fd_path(&dir, name), xname, v)
                        .map_err(|e| format!("xattr {xname}: {e}"))?;
                }
            }
        }
    }
    let mtime = TimeSpec::new(h.mtime().unwrap_or(0) as i64, 0);
    utimensat(
        Some(dir.as_raw_fd()),
        *name,
        &mtime,
        &mtime,
        UtimensatFlags::NoFollowSymlink,
    )
    .map_err(|e| err("utimes", e))?;
    report.written += 1;
    Ok(())
}

/// Copy entry data, seeking over all-zero blocks so sparse files stay sparse.
fn copy_sparse<R: Read>(src: &mut R, dst: &mut std::fs::File) -> std::io::Result<u64> {
    let mut buf = vec![0u8; 1 << 16];
    let mut total = 0u64;
    loop {
        let mut filled = 0;
        while filled < buf.len() {
            let n = src.read(&mut buf[filled..])?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        if filled == 0 {
            return Ok(total);
        }
        if buf[..filled].iter().all(|b| *b == 0) {
            dst.seek(SeekFrom::Current(filled as i64))?;
        } else {
            dst.write_all(&buf[..filled])?;
        }
        total += filled as u64;
    }
}

fn remove_any(dir: &OwnedFd, name: &OsStr) -> Result<(), String> {
    let p = fd_path(dir, name);
    match std::fs::symlink_metadata(&p) {
        Ok(md) if md.is_dir() => std::fs::remove_dir_all(&p)
            .map_err(|e| format!("remove {}: {e}", name.to_string_lossy())),
        Ok(_) => nix::unistd::unlinkat(
            Some(dir.as_raw_fd()),
            name,
            nix::unistd::UnlinkatFlags::NoRemoveDir,
        )
        .map_err(|e| format!("unlink {}: {e}", name.to_string_lossy())),
        Err(_) => Ok(()),
    }
}

fn clear_children(dir: &OwnedFd) -> Result<(), String> {
    let p = fd_path(dir, OsStr::new(""));
    let children = std::fs::read_dir(&p).map_err(|e| format!("list: {e}"))?;
    for c in children.flatten() {
        remove_any(dir, &c.file_name())?;
    }
    Ok(())
}
