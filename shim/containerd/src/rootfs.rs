//! The container's rootfs: containerd sends the mounts of its snapshot (an overlay, or a bind)
//! in the create request, and the shim mounts them on `<bundle>/rootfs` before cryo runs, as
//! the runc shim does. A failed create, and delete, unmount it again.

use std::path::{Path, PathBuf};

use containerd_shim::mount::{mount_rootfs, umount_recursive};
use containerd_shim::protos::types::mount::Mount;
use containerd_shim::warn;

/// A rootfs mount failed.
#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    /// `<bundle>/rootfs` could not be made.
    #[error("create the rootfs mount point {path}: {source}")]
    MountPoint {
        /// The directory.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A mount failed.
    #[error("mount the rootfs ({kind} {source_path} on {target}): {detail}")]
    Mount {
        /// The mount type.
        kind: String,
        /// Its source.
        source_path: String,
        /// The mount point.
        target: PathBuf,
        /// containerd-shim's error.
        detail: String,
    },
}

/// The mounted rootfs; unmounted on drop unless [`Self::keep`] was called.
pub struct MountedRootfs {
    target: Option<PathBuf>,
}

impl MountedRootfs {
    /// Mount `mounts` (in order) on `<bundle>/rootfs`. No mounts: the bundle's config.json
    /// names its own root, nothing is mounted.
    pub fn mount(bundle: &Path, mounts: &[Mount]) -> Result<Self, RootfsError> {
        if mounts.is_empty() {
            return Ok(Self { target: None });
        }
        let target = bundle.join("rootfs");
        match std::fs::create_dir(&target) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(source) => {
                return Err(RootfsError::MountPoint {
                    path: target,
                    source,
                })
            }
        }
        // From here on a failure unmounts what was mounted.
        let mounted = Self {
            target: Some(target.clone()),
        };
        for m in mounts {
            let options: Vec<String> = m.options.to_vec();
            mount_rootfs(
                Some(m.type_.as_str()).filter(|t| !t.is_empty()),
                Some(m.source.as_str()).filter(|s| !s.is_empty()),
                &options,
                &target,
            )
            .map_err(|e| RootfsError::Mount {
                kind: m.type_.clone(),
                source_path: m.source.clone(),
                target: target.clone(),
                detail: e.to_string(),
            })?;
        }
        Ok(mounted)
    }

    /// Keep it mounted (the container owns it now); [`unmount`] at delete.
    pub fn keep(mut self) -> Option<PathBuf> {
        self.target.take()
    }
}

impl Drop for MountedRootfs {
    fn drop(&mut self) {
        if let Some(target) = self.target.take() {
            if let Err(e) = unmount(&target) {
                warn!("{e}");
            }
        }
    }
}

/// Unmount everything at and below `target`.
pub fn unmount(target: &Path) -> Result<(), String> {
    let Some(text) = target.to_str() else {
        return Err(format!("rootfs path {} is not UTF-8", target.display()));
    };
    umount_recursive(Some(text), 0).map_err(|e| format!("unmount {text}: {e}"))
}
