//! Removing what cryo made without ever reaching what it did not: a tree is removed only
//! within its own mount. A directory below it that is a mount point (a bind mount of a
//! container's rootfs, which has the same `st_dev` when it lives on the same filesystem) is
//! never entered; its path is reported instead.

use std::ffi::{CStr, CString, OsStr};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// A mount found inside a tree being removed: nothing below it was touched.
#[derive(Debug, thiserror::Error)]
#[error("{0} is a mount point inside the tree being removed: unmount it first; nothing below it was touched")]
pub struct MountInside(pub PathBuf);

/// Remove `path` and everything below it that lies on the same mount. Returns `Ok(false)` if
/// nothing was there. A mount point found inside is left (with the directories above it) and
/// reported as an error ([`MountInside`] inside the `io::Error`).
pub fn remove_tree_same_fs(path: &Path) -> io::Result<bool> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    if !meta.is_dir() {
        std::fs::remove_file(path)?;
        return Ok(true);
    }
    let parent = path.parent().unwrap_or(Path::new("/"));
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let parent_fd = open_dir(libc::AT_FDCWD, parent.as_os_str())?;
    let top = match open_dir(parent_fd.as_raw_fd(), name) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        r => r?,
    };
    let mount = mount_id(top.as_raw_fd(), c"")?;
    // Another remover (a guardian undoing the same staging) may empty or remove parts of the
    // tree at the same time: what vanished is removed, and a directory that was filled again
    // while it was cleared is cleared again.
    let mut tries = 0;
    loop {
        clear(&top, mount, path)?;
        match gone(unlink_at(parent_fd.as_raw_fd(), name, true)) {
            Err(e) if e.raw_os_error() == Some(libc::ENOTEMPTY) && tries < 3 => tries += 1,
            r => return r.map(|()| true),
        }
    }
}

/// A step on an entry that vanished meanwhile (removed by someone else) has nothing to do.
fn gone<T: Default>(r: io::Result<T>) -> io::Result<T> {
    match r {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(T::default()),
        r => r,
    }
}

/// Remove everything in the directory `dir` (on mount `mount`); `shown` names it in errors.
fn clear(dir: &OwnedFd, mount: u64, shown: &Path) -> io::Result<()> {
    for name in list(dir)? {
        let cname = CString::new(name.as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "NUL in a file name"))?;
        let st = match lstat_at(dir.as_raw_fd(), &cname) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            r => r?,
        };
        if st.st_mode & libc::S_IFMT != libc::S_IFDIR {
            gone(unlink_at(dir.as_raw_fd(), &name, false))?;
            continue;
        }
        let child_path = shown.join(&name);
        let on = match mount_id(dir.as_raw_fd(), &cname) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            r => r?,
        };
        if on != mount {
            return Err(io::Error::other(MountInside(child_path)));
        }
        let child = match open_dir(dir.as_raw_fd(), &name) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            r => r?,
        };
        // A mount may have appeared between the two looks: check the opened directory too.
        if mount_id(child.as_raw_fd(), c"")? != mount {
            return Err(io::Error::other(MountInside(child_path)));
        }
        clear(&child, mount, &child_path)?;
        gone(unlink_at(dir.as_raw_fd(), &name, true))?;
    }
    Ok(())
}

fn open_dir(at: RawFd, name: &OsStr) -> io::Result<OwnedFd> {
    let c = CString::new(name.as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "NUL in a path"))?;
    // SAFETY: openat with a valid C string and flags; the result is checked below.
    let fd = unsafe {
        libc::openat(
            at,
            c.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: openat just returned this fd and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn list(dir: &OwnedFd) -> io::Result<Vec<std::ffi::OsString>> {
    let d = nix::dir::Dir::openat(
        Some(dir.as_raw_fd()),
        ".",
        nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_DIRECTORY,
        nix::sys::stat::Mode::empty(),
    )?;
    let mut names = Vec::new();
    for e in d.into_iter() {
        let e = e?;
        let n = e.file_name().to_bytes();
        if n != b"." && n != b".." {
            names.push(OsStr::from_bytes(n).to_os_string());
        }
    }
    Ok(names)
}

fn lstat_at(at: RawFd, name: &CStr) -> io::Result<libc::stat> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: fstatat writes a full `struct stat` into `st` on success; checked below.
    let r = unsafe {
        libc::fstatat(
            at,
            name.as_ptr(),
            st.as_mut_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fstatat succeeded, so `st` is initialised.
    Ok(unsafe { st.assume_init() })
}

/// The id of the mount `name` (relative to `at`; empty: `at` itself) is on. Bind mounts of
/// the same filesystem have their own id, which `st_dev` cannot tell apart.
fn mount_id(at: RawFd, name: &CStr) -> io::Result<u64> {
    let mut stx = std::mem::MaybeUninit::<libc::statx>::zeroed();
    let flags = libc::AT_SYMLINK_NOFOLLOW
        | if name.is_empty() {
            libc::AT_EMPTY_PATH
        } else {
            0
        };
    // SAFETY: statx fills `stx` on success; the name is a valid C string.
    let r = unsafe {
        libc::statx(
            at,
            name.as_ptr(),
            flags,
            libc::STATX_MNT_ID,
            stx.as_mut_ptr(),
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: statx succeeded (the buffer was zeroed, so every field is initialised).
    let stx = unsafe { stx.assume_init() };
    if stx.stx_mask & libc::STATX_MNT_ID == 0 {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "this kernel does not report mount ids (statx STATX_MNT_ID, Linux >= 5.8)",
        ));
    }
    Ok(stx.stx_mnt_id)
}

fn unlink_at(at: RawFd, name: &OsStr, dir: bool) -> io::Result<()> {
    let c = CString::new(name.as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "NUL in a file name"))?;
    let flags = if dir { libc::AT_REMOVEDIR } else { 0 };
    // SAFETY: unlinkat with a valid C string; it never follows the leaf.
    if unsafe { libc::unlinkat(at, c.as_ptr(), flags) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Mount points at or below `dir`, deepest first (from `/proc/self/mountinfo`), so they can be
/// unmounted before `dir` is removed.
pub fn mounts_below(dir: &Path) -> Vec<PathBuf> {
    let Ok(dir) = dir.canonicalize() else {
        return Vec::new();
    };
    let Ok(infos) = procfs::process::Process::myself().and_then(|p| p.mountinfo()) else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = infos
        .into_iter()
        .map(|m| m.mount_point)
        .filter(|p| p.starts_with(&dir))
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found.dedup();
    found
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// Two removers of one tree at once (a group's guardian and a member's undoing the same
    /// staging): both succeed and nothing is left.
    #[test]
    fn two_removers_at_once_both_succeed() {
        for _ in 0..20 {
            let t = tempfile::tempdir().unwrap();
            let d = t.path().join("staging");
            for m in 0..4 {
                let member = d.join(format!("members/.m{m}.cryo-new-1"));
                std::fs::create_dir_all(&member).unwrap();
                for f in 0..50 {
                    std::fs::write(member.join(format!("f{f}")), b"x").unwrap();
                }
            }
            let inner = d.join("members/.m0.cryo-new-1");
            let (a, b) = std::thread::scope(|s| {
                let a = s.spawn(|| remove_tree_same_fs(&d));
                let b = s.spawn(|| remove_tree_same_fs(&inner));
                (a.join().unwrap(), b.join().unwrap())
            });
            a.unwrap();
            b.unwrap();
            assert!(!d.exists());
        }
    }

    #[test]
    fn removes_a_tree_and_reports_missing_as_false() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("x");
        std::fs::create_dir_all(d.join("a/b")).unwrap();
        std::fs::write(d.join("a/b/f"), b"1").unwrap();
        std::os::unix::fs::symlink("/etc", d.join("a/l")).unwrap();
        assert!(remove_tree_same_fs(&d).unwrap());
        assert!(!d.exists());
        assert!(!remove_tree_same_fs(&d).unwrap());
        assert!(std::path::Path::new("/etc/passwd").exists());
    }

    #[test]
    fn never_enters_a_bind_mount_of_the_same_filesystem() {
        // Needs root (mount). The bind source lives on the same filesystem, so st_dev alone
        // could not tell the mount point from a plain directory.
        let t = tempfile::tempdir().unwrap();
        let precious = t.path().join("precious");
        std::fs::create_dir_all(&precious).unwrap();
        std::fs::write(precious.join("data"), b"keep me").unwrap();
        let tree = t.path().join("state");
        let mnt = tree.join("inner/criu-root");
        std::fs::create_dir_all(&mnt).unwrap();
        std::fs::write(tree.join("file"), b"x").unwrap();
        nix::mount::mount(
            Some(&precious),
            &mnt,
            None::<&str>,
            nix::mount::MsFlags::MS_BIND,
            None::<&str>,
        )
        .expect("bind mount (these tests run as root)");
        assert_eq!(mounts_below(&tree), vec![mnt.canonicalize().unwrap()]);
        let err = remove_tree_same_fs(&tree).unwrap_err();
        let unmount = nix::mount::umount2(&mnt, nix::mount::MntFlags::MNT_DETACH);
        assert!(err.to_string().contains("mount point"), "{err}");
        assert_eq!(std::fs::read(precious.join("data")).unwrap(), b"keep me");
        unmount.unwrap();
        assert!(remove_tree_same_fs(&tree).unwrap());
    }
}
