//! Where a checkpoint is written, and how it appears at `--image-path` complete or not at all.
//!
//! A checkpoint is written into a private staging directory beside the target (same parent,
//! so same filesystem): `<parent>/.<name>.cryo-new-<pid>`. Only when it is complete, digested
//! and synced is it published with one `rename(2)`: onto the target when there is none, or by
//! `renameat2(RENAME_EXCHANGE)` with the target when it is an empty directory or a previous
//! cryo checkpoint, which then sits at the staging path and is removed. At every instant the
//! target path holds the old complete image or the new complete one, never a mix, and a
//! failed or killed checkpoint leaves the caller's directory exactly as it was.
//!
//! Two cases cannot be swapped: a target that is a mount point (a directory must stay where
//! it is), where the staging directory lives inside the target and publishing moves the
//! files up, the manifest last (an old checkpoint there is removed first: the directory holds
//! no image for a moment, never a mixed one); and a target holding anything else (user files,
//! a runc image, the container's rootfs), which is refused before anything is written.

use std::ffi::OsString;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::manifest::{self, Manifest};

/// Files CRIU and cryo may leave beside an image that belong to no dump (logs and stats;
/// restore writes its own when the work dir is the image dir).
pub const SIDE_FILES: &[&str] = &[
    "dump.log",
    "pre-dump.log",
    "stats-dump",
    "restore.log",
    "stats-restore",
    "lazy-pages.log",
    "lazy-pages.socket",
];

/// Whether `name` in an image directory is a side file or cryo's own scratch (`.cryo-*`).
pub fn is_side_file(name: &str) -> bool {
    SIDE_FILES.contains(&name) || name.starts_with(".cryo-")
}

/// The image path could not be used.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// A filesystem step failed.
    #[error("{step} {path}: {source}")]
    Io {
        /// What we were doing.
        step: &'static str,
        /// Where.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The target holds something cryo must not replace.
    #[error(
        "--image-path {path} already holds {what}: cryo writes a checkpoint only into a new or \
         empty directory or over a previous cryo checkpoint; choose another --image-path or \
         empty it"
    )]
    NotOurs {
        /// The target.
        path: PathBuf,
        /// What is there (e.g. "the file notes.txt").
        what: String,
    },
}

fn io(step: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> PublishError {
    let path = path.to_path_buf();
    move |source| PublishError::Io { step, path, source }
}

/// What the target holds now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Existing {
    /// Nothing at the path.
    Absent,
    /// An empty directory.
    Empty,
    /// A previous cryo checkpoint (a manifest, and only files it lists, or side files).
    Checkpoint,
}

/// The checkpoint's destination, inspected.
#[derive(Debug, Clone)]
pub struct ImageTarget {
    path: PathBuf,
    existing: Existing,
    mount_point: bool,
}

impl ImageTarget {
    /// Inspect `path` (symlinks resolved) and refuse it if it holds what cryo must not
    /// replace. Creates missing parent directories (0700, as runc).
    pub fn inspect(path: &Path) -> Result<Self, PublishError> {
        let name = path.file_name().ok_or_else(|| PublishError::NotOurs {
            path: path.to_path_buf(),
            what: "no directory name (it is a root)".into(),
        })?;
        let parent = path.parent().unwrap_or(Path::new("/"));
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)
            .map_err(io("create", parent))?;
        let parent = parent.canonicalize().map_err(io("resolve", parent))?;
        let mut path = parent.join(name);
        let meta = match std::fs::symlink_metadata(&path) {
            Ok(m) if m.file_type().is_symlink() => {
                path = path.canonicalize().map_err(io("resolve", &path))?;
                Some(std::fs::metadata(&path).map_err(io("stat", &path))?)
            }
            Ok(m) => Some(m),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(io("stat", &path)(e)),
        };
        let Some(meta) = meta else {
            return Ok(Self {
                path,
                existing: Existing::Absent,
                mount_point: false,
            });
        };
        if !meta.is_dir() {
            return Err(PublishError::NotOurs {
                path,
                what: "a file that is not a directory".into(),
            });
        }
        let existing = classify(&path)?;
        let up = path.parent().unwrap_or(Path::new("/"));
        let mount_point = std::fs::metadata(up).map_err(io("stat", up))?.dev() != meta.dev()
            || is_mount_point(&path);
        Ok(Self {
            path,
            existing,
            mount_point,
        })
    }

    /// The resolved target path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What the target holds.
    pub fn existing(&self) -> Existing {
        self.existing
    }

    /// Whether the target is a mount point (published file by file, see the module docs).
    pub fn is_mount_point(&self) -> bool {
        self.mount_point
    }
}

/// What a directory holds, for [`ImageTarget::inspect`].
fn classify(dir: &Path) -> Result<Existing, PublishError> {
    let names: Vec<String> = std::fs::read_dir(dir)
        .map_err(io("read", dir))?
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    if names.iter().all(|n| n.starts_with(".cryo-")) {
        return Ok(Existing::Empty);
    }
    if names.iter().any(|n| n == crate::group::manifest::FILE) {
        return classify_group(dir, &names);
    }
    let manifest = match Manifest::read(dir) {
        Ok(Some(m)) => m,
        Ok(None) | Err(_) => {
            let first = names
                .iter()
                .find(|n| !n.starts_with(".cryo-"))
                .cloned()
                .unwrap_or_default();
            let what = if names.iter().any(|n| n == "inventory.img") {
                "a CRIU image without a cryo manifest (made by runc, or an incomplete or damaged cryo checkpoint)".to_string()
            } else {
                format!("files that are not a cryo checkpoint (e.g. {first})")
            };
            return Err(PublishError::NotOurs {
                path: dir.to_path_buf(),
                what,
            });
        }
    };
    let listed: std::collections::HashSet<&str> =
        manifest.files.iter().map(|f| f.name.as_str()).collect();
    let legacy = !manifest.has_digests();
    if let Some(stranger) = names.iter().find(|n| {
        n.as_str() != manifest::FILE
            && !is_side_file(n)
            && !listed.contains(n.as_str())
            && (!legacy || !looks_like_image_file(n))
    }) {
        return Err(PublishError::NotOurs {
            path: dir.to_path_buf(),
            what: format!("a cryo checkpoint plus the file {stranger}, which is not part of it"),
        });
    }
    Ok(Existing::Checkpoint)
}

/// A previous group checkpoint ([`crate::group`]): its manifest, its members, nothing else.
fn classify_group(dir: &Path, names: &[String]) -> Result<Existing, PublishError> {
    let not_ours = |what: String| PublishError::NotOurs {
        path: dir.to_path_buf(),
        what,
    };
    crate::group::manifest::check_group(dir)
        .map_err(|e| not_ours(format!("a damaged or incomplete group checkpoint ({e})")))?;
    if let Some(stranger) = names.iter().find(|n| {
        n.as_str() != crate::group::manifest::FILE
            && n.as_str() != crate::group::manifest::MEMBERS_DIR
            && !is_side_file(n)
    }) {
        return Err(not_ours(format!(
            "a group checkpoint plus {stranger}, which is not part of it"
        )));
    }
    Ok(Existing::Checkpoint)
}

/// Create (or truncate) a file of an image, readable by its owner only: image files describe
/// the container's memory and files.
pub fn create_private_file(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
}

/// Write `bytes` as a file of an image ([`create_private_file`]).
pub fn write_private_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    create_private_file(path)?.write_all(bytes)
}

/// Names CRIU and cryo give the files of an image (for images whose manifest lists none).
pub fn looks_like_image_file(name: &str) -> bool {
    name.ends_with(".img")
        || name.ends_with(".img.zst")
        || name == "descriptors.json"
        || name.starts_with("rootfs-diff.tar")
        || name == crate::dump::DEVSHM_FILE
}

fn is_mount_point(path: &Path) -> bool {
    let Ok(p) = path.canonicalize() else {
        return false;
    };
    procfs::process::Process::myself()
        .and_then(|me| me.mountinfo())
        .map(|m| m.into_iter().any(|e| e.mount_point == p))
        .unwrap_or(false)
}

/// The private directory a checkpoint is written into. Dropped unpublished, it is removed.
#[derive(Debug)]
pub struct Staging {
    dir: PathBuf,
    target: ImageTarget,
    published: bool,
}

impl Staging {
    /// Create the staging directory (0700) for `target`, removing staging directories that
    /// earlier cryo processes, now gone, left for the same target.
    pub fn create(target: ImageTarget) -> Result<Self, PublishError> {
        let name = target
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let (home, prefix) = if target.mount_point {
            (target.path.clone(), ".cryo-new-".to_string())
        } else {
            (
                target.path.parent().unwrap_or(Path::new("/")).to_path_buf(),
                format!(".{name}.cryo-new-"),
            )
        };
        remove_stale(&home, &prefix);
        let dir = home.join(format!("{prefix}{}", std::process::id()));
        // A leftover of ours (same pid, earlier run in this process) goes too.
        let _ = cryo_oci::fsutil::remove_tree_same_fs(&dir);
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(io("create", &dir))?;
        Ok(Self {
            dir,
            target,
            published: false,
        })
    }

    /// Where the checkpoint is written.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The target it will be published at.
    pub fn target(&self) -> &ImageTarget {
        &self.target
    }

    /// Paths a guardian must remove if cryo dies during [`Staging::publish`] (besides the
    /// staging directory itself): the files a mount-point target receives one by one.
    pub fn publish_debris(&self) -> Vec<PathBuf> {
        if !self.target.mount_point {
            return Vec::new();
        }
        self.names()
            .unwrap_or_default()
            .into_iter()
            .map(|n| self.target.path.join(n))
            .collect()
    }

    fn names(&self) -> Result<Vec<OsString>, PublishError> {
        Ok(std::fs::read_dir(&self.dir)
            .map_err(io("read", &self.dir))?
            .filter_map(Result::ok)
            .map(|e| e.file_name())
            .collect())
    }

    /// Whether [`Staging::publish`] succeeded.
    pub fn is_published(&self) -> bool {
        self.published
    }

    /// Make the complete (and synced) image appear at the target. The previous image, if
    /// any, is removed afterwards; a failure to remove it is returned as a warning. Once
    /// published, the staging directory is no longer removed on drop.
    pub fn publish(&mut self) -> Result<Option<String>, PublishError> {
        if self.published {
            return Ok(None);
        }
        sync_path(&self.dir)?;
        let warning = if self.target.mount_point {
            self.publish_into_mount_point()?;
            None
        } else {
            self.publish_by_rename()?
        };
        self.published = true;
        Ok(warning)
    }

    fn publish_by_rename(&mut self) -> Result<Option<String>, PublishError> {
        let target = &self.target.path;
        if self.target.existing == Existing::Absent {
            std::fs::rename(&self.dir, target).map_err(io("rename into place", target))?;
            sync_parent(target)?;
            return Ok(None);
        }
        exchange(&self.dir, target)?;
        sync_parent(target)?;
        // The old image now sits at the staging path.
        Ok(cryo_oci::fsutil::remove_tree_same_fs(&self.dir)
            .err()
            .map(|e| {
                format!(
                    "the previous image could not be removed from {}: {e}",
                    self.dir.display()
                )
            }))
    }

    fn publish_into_mount_point(&mut self) -> Result<(), PublishError> {
        let target = self.target.path.clone();
        // An old checkpoint goes first, its manifest before anything: from then on the
        // directory holds no complete image, never a mixed one.
        if self.target.existing == Existing::Checkpoint {
            remove_file_if_present(&target.join(manifest::FILE))?;
            for e in std::fs::read_dir(&target)
                .map_err(io("read", &target))?
                .flatten()
            {
                let n = e.file_name();
                if !n.to_string_lossy().starts_with(".cryo-") {
                    remove_file_if_present(&e.path())?;
                }
            }
        }
        let mut names = self.names()?;
        let manifest_name = OsString::from(manifest::FILE);
        names.retain(|n| n != &manifest_name);
        names.push(manifest_name);
        for n in names {
            let from = self.dir.join(&n);
            if !from.exists() {
                continue;
            }
            std::fs::rename(&from, target.join(&n)).map_err(io("move into place", &from))?;
        }
        sync_path(&target)?;
        std::fs::remove_dir(&self.dir).map_err(io("remove", &self.dir))?;
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.published {
            let _ = cryo_oci::fsutil::remove_tree_same_fs(&self.dir);
        }
    }
}

fn remove_file_if_present(p: &Path) -> Result<(), PublishError> {
    match std::fs::remove_file(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io("remove", p)(e)),
    }
}

/// Remove `<home>/<prefix><pid>` directories whose cryo process is gone.
fn remove_stale(home: &Path, prefix: &str) {
    let Ok(entries) = std::fs::read_dir(home) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(prefix)
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = cryo_oci::fsutil::remove_tree_same_fs(&e.path());
        }
    }
}

/// Swap two directories atomically (`renameat2(RENAME_EXCHANGE)`).
fn exchange(a: &Path, b: &Path) -> Result<(), PublishError> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let ca = CString::new(a.as_os_str().as_bytes()).map_err(|_| PublishError::NotOurs {
        path: a.to_path_buf(),
        what: "a NUL byte in its name".into(),
    })?;
    let cb = CString::new(b.as_os_str().as_bytes()).map_err(|_| PublishError::NotOurs {
        path: b.to_path_buf(),
        what: "a NUL byte in its name".into(),
    })?;
    // SAFETY: renameat2 with two valid C strings and AT_FDCWD; no memory is kept.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            ca.as_ptr(),
            libc::AT_FDCWD,
            cb.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if r < 0 {
        return Err(io("swap into place", b)(std::io::Error::last_os_error()));
    }
    Ok(())
}

fn sync_path(p: &Path) -> Result<(), PublishError> {
    std::fs::File::open(p)
        .and_then(|f| f.sync_all())
        .map_err(io("sync", p))
}

fn sync_parent(p: &Path) -> Result<(), PublishError> {
    sync_path(p.parent().unwrap_or(Path::new("/")))
}

#[cfg(test)]
#[path = "publish_tests.rs"]
mod tests;
