//! cryo's image manifest, `cryo-manifest.json`: written LAST into the image directory, so its
//! presence means the checkpoint is complete (operators restore the newest image that has
//! one), and read FIRST on restore. The CRIU images beside it stay plain CRIU images, so runc,
//! crit and checkpointctl read them too.

use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::plan::ExtMount;

/// File name inside the image directory.
pub const FILE: &str = "cryo-manifest.json";
/// The format this build writes and reads.
pub const FORMAT: &str = "cryo.checkpoint/v1";

/// How long each step took, in milliseconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Timings {
    /// Freezing the cgroup.
    pub freeze_ms: f64,
    /// Capturing the rootfs changes (inside the freeze, beside CRIU's dump unless
    /// `--link-remap`).
    pub rootfs_capture_ms: f64,
    /// How long the freeze waited for the rootfs capture (and /dev/shm) after CRIU's dump.
    #[serde(default)]
    pub rootfs_wait_ms: f64,
    /// CRIU dump (inside the freeze).
    pub dump_ms: f64,
    /// From freeze start to thaw: what the application saw.
    pub frozen_ms: f64,
    /// Compressing the rootfs snapshot (from the end of its capture, at the lowest CPU
    /// priority; plus --compress-pages after the thaw).
    pub compress_ms: f64,
    /// Waiting, before the freeze, for the page images to be faulted in.
    #[serde(default)]
    pub staging_wait_ms: f64,
    /// From the start of the verb to the freeze (CRIU's start, staging).
    #[serde(default)]
    pub before_freeze_ms: f64,
    /// From the thaw until the image is durable (naming, compression, sync). 0 when the
    /// container was stopped instead of thawed.
    #[serde(default)]
    pub after_thaw_ms: f64,
    /// The whole verb until durable.
    pub total_ms: f64,
}

/// What became of the container's root filesystem at checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RootfsRecord {
    /// `overlay`, `directory` or `other:<fstype>`.
    pub kind: String,
    /// The overlay upper dir captured, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upper_dir: Option<PathBuf>,
    /// (st_dev, st_ino) of that upper dir, to recognise an in-place restore.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upper_identity: Option<(u64, u64)>,
    /// The changeset file in the image dir, if a snapshot was taken.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
    /// Why no snapshot was taken, if none was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skipped_because: Option<String>,
    /// Device nodes the changeset may create (recorded at capture; nothing else is allowed).
    #[serde(default)]
    pub device_nodes: Vec<String>,
    /// Entries and bytes in the changeset.
    #[serde(default)]
    pub entries: u64,
    /// Uncompressed bytes.
    #[serde(default)]
    pub bytes: u64,
}

/// A regular file some process held open at checkpoint: it must exist with this size at restore.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct OpenFileRecord {
    /// Path inside the container.
    pub path: String,
    /// Size at checkpoint.
    pub size: u64,
}

/// The manifest.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    /// [`FORMAT`].
    pub format: String,
    /// cryo's version.
    pub cryo_version: String,
    /// CRIU's version number (major*10000+minor*100+sub).
    pub criu_version: u32,
    /// Container id at checkpoint.
    pub container_id: String,
    /// sha256 of the bundle's config.json at checkpoint.
    pub spec_sha256: String,
    /// When the checkpoint completed.
    pub created: DateTime<Utc>,
    /// Whether the container kept running.
    pub leave_running: bool,
    /// Whether it was paused when checkpointed.
    pub was_paused: bool,
    /// Mounts handed to CRIU as external.
    pub external_mounts: Vec<ExtMount>,
    /// Namespaces handed to CRIU as external.
    pub external_namespaces: Vec<String>,
    /// The rootfs record.
    pub rootfs: RootfsRecord,
    /// A captured host-mounted /dev/shm, if any (file name in the image dir).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub devshm: Option<String>,
    /// Regular files held open.
    #[serde(default)]
    pub open_files: Vec<OpenFileRecord>,
    /// Page images stored zstd-compressed as `<name>.zst` (`--compress-pages`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub compressed_pages: Vec<String>,
    /// What cryo's page receiver took in, when it (not CRIU) wrote the page images.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pages: Option<PagesRecord>,
    /// Step timings.
    pub timings: Timings,
    /// GPU: the container's CUDA state went through CRIU's CUDA plugin ([`crate::gpu`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu: Option<crate::gpu::GpuRecord>,
}

/// The page receiver's account ([`crate::page_receiver`]).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PagesRecord {
    /// Bytes of pages received from CRIU.
    pub received_bytes: u64,
    /// Of those, bytes that landed in pages faulted in before the freeze.
    pub staged_bytes: u64,
}

/// Reading a manifest failed.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// Unreadable.
    #[error("cannot read {path}: {reason}")]
    Read {
        /// File.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// Written by an incompatible cryo.
    #[error("{path} has format {found:?}; this cryo reads {FORMAT:?}: restore it with the cryo that made it")]
    Format {
        /// File.
        path: PathBuf,
        /// What it says.
        found: String,
    },
}

impl Manifest {
    /// Write atomically into `image_dir`.
    pub fn write(&self, image_dir: &Path) -> std::io::Result<()> {
        let bytes = serde_json::to_vec_pretty(self)?;
        cryo_oci::atomic::write_atomic(&image_dir.join(FILE), &bytes)
    }

    /// Read from `image_dir`; `Ok(None)` for an image without one (made by runc or crun).
    pub fn read(image_dir: &Path) -> Result<Option<Self>, ManifestError> {
        let path = image_dir.join(FILE);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(ManifestError::Read {
                    path,
                    reason: e.to_string(),
                })
            }
        };
        let v: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|e| ManifestError::Read {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        let found = v.get("format").and_then(|f| f.as_str()).unwrap_or("");
        if found != FORMAT {
            return Err(ManifestError::Format {
                path,
                found: found.to_string(),
            });
        }
        serde_json::from_value(v)
            .map(Some)
            .map_err(|e| ManifestError::Read {
                path,
                reason: e.to_string(),
            })
    }
}

/// sha256 of a file, hex.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    use sha2::{Digest, Sha256};
    let bytes = std::fs::read(path)?;
    Ok(format!("{:x}", Sha256::digest(&bytes)))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    pub(crate) fn sample() -> Manifest {
        Manifest {
            format: FORMAT.into(),
            cryo_version: "0.1.0".into(),
            criu_version: 40201,
            container_id: "c1".into(),
            spec_sha256: "00".into(),
            created: Utc::now(),
            leave_running: false,
            was_paused: false,
            external_mounts: vec![],
            external_namespaces: vec![],
            rootfs: RootfsRecord {
                kind: "directory".into(),
                upper_dir: None,
                upper_identity: None,
                snapshot: None,
                skipped_because: Some("plain directory".into()),
                device_nodes: vec![],
                entries: 0,
                bytes: 0,
            },
            devshm: None,
            open_files: vec![],
            compressed_pages: Vec::new(),
            pages: Some(PagesRecord {
                received_bytes: 8192,
                staged_bytes: 4096,
            }),
            timings: Timings::default(),
            gpu: Some(crate::gpu::GpuRecord {
                driver_version: "580.159.04".into(),
                devices: vec!["/dev/nvidia0".into()],
                cuda_pids: 1,
                plugin_timings: Some(crate::gpu::PluginTimings {
                    lock_ms: 1.5,
                    checkpoint_ms: 547.0,
                    resume_ms: 393.0,
                }),
            }),
        }
    }

    #[test]
    fn roundtrip_missing_and_foreign_format() {
        let dir = std::env::temp_dir().join(format!("cryo-manifest-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert!(Manifest::read(&dir).unwrap().is_none());
        let m = sample();
        m.write(&dir).unwrap();
        assert_eq!(Manifest::read(&dir).unwrap(), Some(m));
        std::fs::write(dir.join(FILE), r#"{"format":"cryo.checkpoint/v9"}"#).unwrap();
        let e = Manifest::read(&dir).unwrap_err().to_string();
        assert!(
            e.contains("v9") && e.contains("restore it with the cryo that made it"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
