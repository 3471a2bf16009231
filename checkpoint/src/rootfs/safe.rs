//! Walking a target root without ever leaving it: every parent directory is opened relative to
//! the previous one with O_NOFOLLOW|O_DIRECTORY, so a symlink anywhere in a parent path stops
//! the walk instead of redirecting writes outside the root.

use std::ffi::OsStr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use nix::fcntl::{openat, OFlag};
use nix::sys::stat::{mkdirat, Mode};

/// Split a relative archive path into its normal components, refusing `..`, absolute paths
/// and anything else odd.
pub fn components(path: &Path) -> Result<Vec<&OsStr>, String> {
    let mut out = Vec::new();
    for c in path.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            Component::ParentDir => return Err("path contains '..'".into()),
            Component::RootDir | Component::Prefix(_) => return Err("absolute path".into()),
        }
    }
    if out.is_empty() {
        return Err("empty path".into());
    }
    Ok(out)
}

/// Open a directory under `root` by walking `parts` with O_NOFOLLOW; with `create`, missing
/// directories are made (mode 0755; the archive's own dir entry fixes the mode later).
pub fn open_dir(root: &OwnedFd, parts: &[&OsStr], create: bool) -> Result<OwnedFd, String> {
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let mut cur = root.try_clone().map_err(|e| e.to_string())?;
    for (i, part) in parts.iter().enumerate() {
        let next = match openat(Some(cur.as_raw_fd()), *part, flags, Mode::empty()) {
            Ok(fd) => fd,
            Err(nix::errno::Errno::ENOENT) if create => {
                mkdirat(
                    Some(cur.as_raw_fd()),
                    *part,
                    Mode::from_bits_truncate(0o755),
                )
                .map_err(|e| format!("mkdir {}: {e}", show(&parts[..=i])))?;
                openat(Some(cur.as_raw_fd()), *part, flags, Mode::empty())
                    .map_err(|e| format!("open {}: {e}", show(&parts[..=i])))?
            }
            Err(nix::errno::Errno::ELOOP) | Err(nix::errno::Errno::ENOTDIR) => {
                return Err(format!(
                    "{} is a symlink or not a directory: refusing to write through it",
                    show(&parts[..=i])
                ))
            }
            Err(e) => return Err(format!("open {}: {e}", show(&parts[..=i]))),
        };
        // SAFETY: openat returned a fresh descriptor that we now own.
        cur = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(next) };
    }
    Ok(cur)
}

/// Open the root itself.
pub fn open_root(root: &Path) -> Result<OwnedFd, String> {
    let fd = nix::fcntl::open(
        root,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| format!("open {}: {e}", root.display()))?;
    // SAFETY: open returned a fresh descriptor that we now own.
    Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}

/// A path usable with path-based APIs that stays inside an already opened directory:
/// `/proc/self/fd/<dirfd>/<name>` (the magic link pins the directory we walked to).
pub fn fd_path(dir: &impl AsFd, name: &OsStr) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", dir.as_fd().as_raw_fd())).join(name)
}

fn show(parts: &[&OsStr]) -> String {
    parts
        .iter()
        .map(|p| p.to_string_lossy())
        .collect::<Vec<_>>()
        .join("/")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn refuses_parent_and_absolute() {
        assert!(components(Path::new("a/../b")).is_err());
        assert!(components(Path::new("/etc/passwd")).is_err());
        assert_eq!(components(Path::new("./a/b")).unwrap().len(), 2);
    }

    #[test]
    fn walk_stops_at_symlinks() {
        let d = std::env::temp_dir().join(format!("cryo-safe-{}", std::process::id()));
        std::fs::create_dir_all(d.join("real")).unwrap();
        let _ = std::fs::remove_file(d.join("link"));
        std::os::unix::fs::symlink("/etc", d.join("link")).unwrap();
        let root = open_root(&d).unwrap();
        assert!(open_dir(&root, &[OsStr::new("real")], false).is_ok());
        let e = open_dir(&root, &[OsStr::new("link")], true).unwrap_err();
        assert!(e.contains("symlink"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }
}
