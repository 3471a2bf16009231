//! Paths that never leave a root directory.
//!
//! Archive paths are split into plain components (no `/` prefix, no `..`, no NUL). Directories
//! below the root are opened one component at a time with `openat(O_NOFOLLOW|O_DIRECTORY)`
//! from a descriptor of the root, so the kernel never follows a symlink for us. A symlink met
//! on the way is resolved here, the way the container sees it (an absolute target starts
//! again at the root), and refused when its `..` components climb above the root. Leaf
//! entries are then made with `*at()` calls relative to the parent's descriptor.

use std::collections::VecDeque;
use std::ffi::{OsStr, OsString};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{openat, readlinkat, OFlag};
use nix::sys::stat::{fstatat, FileStat, Mode, SFlag};
use nix::unistd::{unlinkat, UnlinkatFlags};

/// Linux's own limit on symlinks followed in one lookup.
const MAX_SYMLINK_HOPS: u32 = 40;

/// Flags for every directory we walk through.
pub(crate) fn dir_flags() -> OFlag {
    OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC
}

/// Split a raw archive path into its components, refusing anything that could name a place
/// outside the root or confuse the walk.
pub(crate) fn archive_components(raw: &[u8]) -> Result<Vec<OsString>, String> {
    if raw.contains(&0) {
        return Err("NUL byte in path".into());
    }
    if raw.first() == Some(&b'/') {
        return Err("absolute path".into());
    }
    let mut out = Vec::new();
    for part in raw.split(|b| *b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => return Err("path contains a '..' component".into()),
            p => out.push(OsString::from_vec(p.to_vec())),
        }
    }
    if out.is_empty() {
        return Err("empty path (the root itself)".into());
    }
    Ok(out)
}

/// `a/b/c` for messages and map keys.
pub(crate) fn show(parts: &[OsString]) -> String {
    String::from_utf8_lossy(&key(parts)).into_owned()
}

/// The exact bytes `a/b/c` of a component list.
pub(crate) fn key(parts: &[OsString]) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            out.push(b'/');
        }
        out.extend_from_slice(p.as_bytes());
    }
    out
}

/// Take ownership of a descriptor nix just returned.
pub(crate) fn owned(fd: RawFd) -> OwnedFd {
    // SAFETY: every caller passes a descriptor freshly returned by a successful open call,
    // which nothing else owns or closes.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Open the target root itself (the caller chose this path; it may be a symlink).
pub(crate) fn open_root(root: &Path) -> std::io::Result<OwnedFd> {
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
    let fd = nix::fcntl::open(root, flags, Mode::empty())?;
    Ok(owned(fd))
}

/// `lstat` of `name` in `dir`; `None` when it does not exist.
pub(crate) fn lstat_at(dir: &OwnedFd, name: &OsStr) -> Result<Option<FileStat>, Errno> {
    match fstatat(
        Some(dir.as_raw_fd()),
        name,
        nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
    ) {
        Ok(st) => Ok(Some(st)),
        Err(Errno::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The file type bits of a stat.
pub(crate) fn kind(st: &FileStat) -> SFlag {
    SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits())
}

/// Makes a directory the walk found missing: `(parent, parent's path, name)`. The apply
/// journals the creation first.
pub(crate) type MakeDir<'a> =
    &'a mut dyn FnMut(&OwnedFd, &[OsString], &OsStr) -> Result<(), String>;

/// Open directory `parts` below `root`. Symlinks on the way are followed inside the root (an
/// absolute target restarts at the root); one whose `..` leaves the root is an error. Missing
/// directories are made by `make` if given, otherwise a missing one gives `Ok(None)`.
pub(crate) fn open_dir_in_root(
    root: &OwnedFd,
    reserved: Option<&OsStr>,
    parts: &[OsString],
    mut make: Option<MakeDir<'_>>,
) -> Result<Option<InRoot>, String> {
    let mut w = InRoot::new(root, reserved)?;
    for p in parts {
        if !w.step(p, &mut make)? {
            return Ok(None);
        }
    }
    Ok(Some(w))
}

/// Open directory `parts` below `root` without following any symlink: the path a journal
/// recorded. `Ok(None)` when a component is missing; a component that is not a directory is
/// an error.
pub(crate) fn open_real_path(root: &OwnedFd, parts: &[OsString]) -> Result<Option<OwnedFd>, Errno> {
    let mut cur = root
        .try_clone()
        .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(0)))?;
    for p in parts {
        match openat(
            Some(cur.as_raw_fd()),
            p.as_os_str(),
            dir_flags(),
            Mode::empty(),
        ) {
            Ok(fd) => cur = owned(fd),
            Err(Errno::ENOENT) => return Ok(None),
            Err(e) => return Err(e),
        }
    }
    Ok(Some(cur))
}

/// A directory reached from the root, with every directory on the way held open (a `..` in
/// a symlink target goes back to the real parent, and never above the root).
pub(crate) struct InRoot {
    stack: Vec<OwnedFd>,
    /// The real path of `stack[1..]` (symlinks resolved), as the container names it.
    names: Vec<OsString>,
    /// A name at the root no walk may enter (the undo directory).
    reserved: Option<OsString>,
}

impl InRoot {
    /// Start at the root.
    pub(crate) fn new(root: &OwnedFd, reserved: Option<&OsStr>) -> Result<Self, String> {
        let root = root.try_clone().map_err(|e| format!("dup: {e}"))?;
        Ok(InRoot {
            stack: vec![root],
            names: Vec::new(),
            reserved: reserved.map(OsStr::to_os_string),
        })
    }

    /// The directory we are in.
    pub(crate) fn dir(&self) -> Result<&OwnedFd, String> {
        self.stack
            .last()
            .ok_or_else(|| "empty directory stack".to_string())
    }

    /// End the walk, keeping the directory we are in and its real path.
    pub(crate) fn into_dir(mut self) -> Result<(OwnedFd, Vec<OsString>), String> {
        let fd = self
            .stack
            .pop()
            .ok_or_else(|| "empty directory stack".to_string())?;
        Ok((fd, self.names))
    }

    fn shown(&self, name: &OsStr) -> PathBuf {
        let mut p = PathBuf::from("/");
        for n in &self.names {
            p.push(n);
        }
        p.join(name)
    }

    fn check_reserved(&self, name: &OsStr) -> Result<(), String> {
        if self.stack.len() == 1 && self.reserved.as_deref() == Some(name) {
            return Err(format!(
                "the path leads into {}, cryo's undo directory",
                self.shown(name).display()
            ));
        }
        Ok(())
    }

    /// Enter `name` only if it is a real directory (no symlink followed); false otherwise.
    pub(crate) fn enter_real_dir(&mut self, name: &OsStr) -> Result<bool, String> {
        self.check_reserved(name)?;
        let cur = self.dir()?.as_raw_fd();
        match openat(Some(cur), name, dir_flags(), Mode::empty()) {
            Ok(fd) => {
                self.stack.push(owned(fd));
                self.names.push(name.to_os_string());
                Ok(true)
            }
            Err(Errno::ENOENT) | Err(Errno::ELOOP) | Err(Errno::ENOTDIR) => Ok(false),
            Err(e) => Err(format!("open {}: {e}", self.shown(name).display())),
        }
    }

    /// Walk into `name`, following a symlink there inside the root. A missing directory is
    /// made by `make` if given; without, a missing one returns false (the walk is then
    /// unusable).
    pub(crate) fn step(
        &mut self,
        name: &OsStr,
        make: &mut Option<MakeDir<'_>>,
    ) -> Result<bool, String> {
        let mut pending: VecDeque<OsString> = VecDeque::from([name.to_os_string()]);
        let mut hops = 0;
        while let Some(name) = pending.pop_front() {
            if name.as_bytes() == b"." || name.is_empty() {
                continue;
            }
            if name.as_bytes() == b".." {
                if self.stack.len() == 1 {
                    return Err(format!(
                        "a symlink leads outside the root (above {})",
                        self.shown(OsStr::new("")).display()
                    ));
                }
                self.stack.pop();
                self.names.pop();
                continue;
            }
            self.check_reserved(&name)?;
            let cur = self.dir()?;
            let here = self.shown(&name);
            match openat(
                Some(cur.as_raw_fd()),
                name.as_os_str(),
                dir_flags(),
                Mode::empty(),
            ) {
                Ok(fd) => {
                    self.stack.push(owned(fd));
                    self.names.push(name);
                }
                Err(Errno::ENOENT) => {
                    let Some(make) = make.as_mut() else {
                        return Ok(false);
                    };
                    make(cur, &self.names, &name)?;
                    let fd = openat(
                        Some(cur.as_raw_fd()),
                        name.as_os_str(),
                        dir_flags(),
                        Mode::empty(),
                    )
                    .map_err(|e| format!("open {}: {e}", here.display()))?;
                    self.stack.push(owned(fd));
                    self.names.push(name);
                }
                Err(Errno::ELOOP) | Err(Errno::ENOTDIR) => {
                    let cur = cur.as_raw_fd();
                    let at = nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW;
                    let st = fstatat(Some(cur), name.as_os_str(), at)
                        .map_err(|e| format!("stat {}: {e}", here.display()))?;
                    if kind(&st) != SFlag::S_IFLNK {
                        return Err(format!("{} is not a directory", here.display()));
                    }
                    hops += 1;
                    if hops > MAX_SYMLINK_HOPS {
                        return Err(format!("too many levels of symlinks at {}", here.display()));
                    }
                    let target = readlinkat(Some(cur), name.as_os_str())
                        .map_err(|e| format!("readlink {}: {e}", here.display()))?;
                    let target = target.as_bytes();
                    if target.first() == Some(&b'/') {
                        // The container sees an absolute target from its own root.
                        self.stack.truncate(1);
                        self.names.clear();
                    }
                    let spliced = target
                        .split(|b| *b == b'/')
                        .filter(|p| !p.is_empty())
                        .map(|p| OsString::from_vec(p.to_vec()));
                    for p in spliced.rev() {
                        pending.push_front(p);
                    }
                }
                Err(e) => return Err(format!("open {}: {e}", here.display())),
            }
        }
        Ok(true)
    }
}

/// An OS error with what was being done to which name, keeping its kind.
pub(crate) fn errno_ctx(e: Errno, what: &str, name: &OsStr) -> std::io::Error {
    std::io::Error::new(
        std::io::Error::from(e).kind(),
        format!("{what} {}: {e}", lossy(name)),
    )
}

/// Remove `name` in `dir` whatever it is (a directory with all it holds), never following a
/// symlink. Returns whether something was there.
pub(crate) fn remove_any(dir: &OwnedFd, name: &OsStr) -> std::io::Result<bool> {
    let Some(st) = lstat_at(dir, name).map_err(|e| errno_ctx(e, "stat", name))? else {
        return Ok(false);
    };
    if kind(&st) == SFlag::S_IFDIR {
        let sub = openat(Some(dir.as_raw_fd()), name, dir_flags(), Mode::empty())
            .map_err(|e| errno_ctx(e, "open", name))?;
        clear_dir(&owned(sub))
            .map_err(|e| std::io::Error::new(e.kind(), format!("{}/{e}", lossy(name))))?;
        unlinkat(Some(dir.as_raw_fd()), name, UnlinkatFlags::RemoveDir)
            .map_err(|e| errno_ctx(e, "rmdir", name))?;
    } else {
        unlinkat(Some(dir.as_raw_fd()), name, UnlinkatFlags::NoRemoveDir)
            .map_err(|e| errno_ctx(e, "unlink", name))?;
    }
    Ok(true)
}

/// Remove every entry of `dir`; returns how many top-level entries went.
pub(crate) fn clear_dir(dir: &OwnedFd) -> std::io::Result<u64> {
    let mut removed = 0;
    for name in list_dir(dir)? {
        if remove_any(dir, &name)? {
            removed += 1;
        }
    }
    Ok(removed)
}

/// Names in `dir` (without `.` and `..`), listed before anything is changed in it.
pub(crate) fn list_dir(dir: &OwnedFd) -> std::io::Result<Vec<OsString>> {
    // A fresh open description of the same directory, so the listing starts at offset 0.
    let fd = openat(Some(dir.as_raw_fd()), ".", dir_flags(), Mode::empty())
        .map_err(|e| errno_ctx(e, "open", OsStr::new(".")))?;
    let mut d = nix::dir::Dir::from(owned(fd)).map_err(std::io::Error::from)?;
    let mut names = Vec::new();
    for e in d.iter() {
        let e = e.map_err(std::io::Error::from)?;
        let n = e.file_name().to_bytes();
        if n != b"." && n != b".." {
            names.push(OsString::from_vec(n.to_vec()));
        }
    }
    Ok(names)
}

/// A path usable with path-only APIs (lsetxattr) that names `name` inside the directory we
/// hold: the `/proc/self/fd/N` magic link pins the directory, and the leaf is not followed.
pub(crate) fn fd_path(dir: &OwnedFd, name: &OsStr) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd())).join(name)
}

fn lossy(name: &OsStr) -> String {
    name.to_string_lossy().into_owned()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn parts(s: &str) -> Vec<OsString> {
        archive_components(s.as_bytes()).unwrap()
    }

    #[test]
    fn archive_paths_are_normalised_or_refused() {
        assert_eq!(parts("./a//b/"), vec![OsString::from("a"), "b".into()]);
        assert!(archive_components(b"/etc/passwd")
            .unwrap_err()
            .contains("absolute"));
        assert!(archive_components(b"a/../b").unwrap_err().contains(".."));
        assert!(archive_components(b"a\0b").unwrap_err().contains("NUL"));
        assert!(archive_components(b"./").unwrap_err().contains("empty"));
    }

    fn walk(r: &OwnedFd, path: &str, make: bool) -> Result<Option<OwnedFd>, String> {
        let mut mk = |dir: &OwnedFd, _: &[OsString], name: &OsStr| {
            let mode = Mode::from_bits_truncate(0o755);
            nix::sys::stat::mkdirat(Some(dir.as_raw_fd()), name, mode).map_err(|e| e.to_string())
        };
        let make: Option<MakeDir<'_>> = if make { Some(&mut mk) } else { None };
        let w = open_dir_in_root(r, Some(OsStr::new(".undo")), &parts(path), make)?;
        Ok(w.map(|w| w.into_dir().unwrap().0))
    }

    #[test]
    fn walk_follows_symlinks_inside_the_root_only() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("root");
        std::fs::create_dir_all(root.join("usr/lib")).unwrap();
        std::fs::create_dir_all(root.join(".undo")).unwrap();
        std::fs::create_dir_all(t.path().join("outside")).unwrap();
        std::os::unix::fs::symlink("/usr/lib", root.join("lib")).unwrap();
        std::os::unix::fs::symlink("usr/../usr", root.join("rel")).unwrap();
        std::os::unix::fs::symlink("../outside", root.join("esc")).unwrap();
        std::os::unix::fs::symlink("/.undo", root.join("sneaky")).unwrap();
        std::os::unix::fs::symlink("../.undo", root.join("usr/sneaky")).unwrap();
        std::fs::write(root.join("file"), "x").unwrap();
        let r = open_root(&root).unwrap();
        let lib = walk(&r, "lib", false).unwrap().unwrap();
        let st = nix::sys::stat::fstat(lib.as_raw_fd()).unwrap();
        let want = std::fs::metadata(root.join("usr/lib")).unwrap();
        assert_eq!(st.st_ino, std::os::unix::fs::MetadataExt::ino(&want));
        let w = open_dir_in_root(&r, None, &parts("rel/lib"), None)
            .unwrap()
            .unwrap();
        assert_eq!(
            w.into_dir().unwrap().1,
            parts("usr/lib"),
            "the real path, symlinks resolved"
        );
        let e = walk(&r, "esc/x", true).unwrap_err();
        assert!(e.contains("outside the root"), "{e}");
        assert!(walk(&r, "file/x", true)
            .unwrap_err()
            .contains("not a directory"));
        assert!(walk(&r, "none", false).unwrap().is_none());
        assert!(walk(&r, "lib/new/deep", true).unwrap().is_some());
        assert!(root.join("usr/lib/new/deep").is_dir());
        for into_undo in [".undo", "sneaky/x", "usr/sneaky/x"] {
            let e = walk(&r, into_undo, true).unwrap_err();
            assert!(e.contains("undo directory"), "{into_undo}: {e}");
        }
        assert!(std::fs::read_dir(t.path().join("outside"))
            .unwrap()
            .next()
            .is_none());
    }

    #[test]
    fn remove_any_never_follows_symlinks() {
        let t = tempfile::tempdir().unwrap();
        let keep = t.path().join("keep");
        std::fs::create_dir_all(&keep).unwrap();
        std::fs::write(keep.join("f"), "x").unwrap();
        let root = t.path().join("root");
        std::fs::create_dir_all(root.join("d/e")).unwrap();
        std::os::unix::fs::symlink(&keep, root.join("d/e/link")).unwrap();
        let r = open_root(&root).unwrap();
        assert!(remove_any(&r, OsStr::new("d")).unwrap());
        assert!(!root.join("d").exists());
        assert!(keep.join("f").exists());
        assert!(!remove_any(&r, OsStr::new("d")).unwrap());
    }
}
