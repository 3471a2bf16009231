//! cryo's image manifest, `cryo-manifest.json`: written LAST into the image directory (which is
//! then published whole, see [`crate::image`]), so its presence means the checkpoint is
//! complete, and read FIRST on restore. It lists every file of the image with its size and
//! BLAKE3 digest, and carries a digest of itself: a restore verifies all of it before it
//! touches anything. The CRIU images beside it stay plain CRIU images, so runc, crit and
//! checkpointctl read them too.
//!
//! The format is a versioned contract: `format` names it, and `requires` lists what a reader
//! must understand to restore the image correctly (a cryo that meets a requirement it does not
//! know refuses instead of misreading).

use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

pub use crate::image::digest::FileRecord;
use crate::plan::ExtMount;

/// File name inside the image directory.
pub const FILE: &str = "cryo-manifest.json";
/// The format this build writes.
pub const FORMAT: &str = "cryo.checkpoint/v2";
/// The previous format, still read (no file digests: restored with a warning).
pub const FORMAT_V1: &str = "cryo.checkpoint/v1";
/// Requirements this build understands (see [`Manifest::requires`]).
pub const KNOWN_REQUIREMENTS: &[&str] = &[
    REQ_COMPRESSED_PAGES,
    REQ_PAX_SPARSE,
    REQ_CUDA,
    REQ_PARENT_CHAIN,
];
/// The page images are stored zstd-compressed (`--compress-pages`).
pub const REQ_COMPRESSED_PAGES: &str = "compressed-pages";
/// The image holds CUDA state: it restores only through CRIU's CUDA plugin ([`crate::gpu`]).
pub const REQ_CUDA: &str = "cuda";
/// The image is an increment over the store generation named in [`Manifest::parent`]: some of
/// its pages are in that generation's images (CRIU's `parent` link), see [`crate::store`].
pub const REQ_PARENT_CHAIN: &str = "parent-chain";
/// Sparse files in the changeset use GNU's PAX sparse map.
pub const REQ_PAX_SPARSE: &str = "changeset-pax-sparse";
/// The JSON key of the manifest's own digest.
const SELF_DIGEST_KEY: &str = "manifest_blake3";

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
    /// Digesting the image's files (after the thaw).
    #[serde(default)]
    pub digest_ms: f64,
    /// Keeping only the pages that changed since the parent generation (after the thaw;
    /// store generations, [`crate::store::delta`]).
    #[serde(default)]
    pub increment_ms: f64,
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
    /// (st_dev, st_ino) of that upper dir (format v1; not enough to recognise it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upper_identity: Option<(u64, u64)>,
    /// Who that upper dir is ([`crate::facts::DirIdentity`]), to recognise an in-place restore.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upper_fingerprint: Option<crate::facts::DirIdentity>,
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
    /// Sum of the captured regular files' sizes, holes included: a restore refuses a
    /// changeset that declares more (or more data than `bytes`). Absent in older images.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logical_bytes: Option<u64>,
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
    /// Every file of the image (but this one and CRIU's logs) with its size and digest.
    #[serde(default)]
    pub files: Vec<FileRecord>,
    /// The store generation this image is an increment of ([`crate::store`]); its pages that
    /// did not change since are read from there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<crate::store::ParentRecord>,
    /// The store generation this full image shares its unchanged pages' extents with
    /// ([`crate::store::shared`]). Informational: it restores without it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shares: Option<crate::store::SharesRecord>,
    /// What a reader must understand to restore this image ([`KNOWN_REQUIREMENTS`]).
    #[serde(default)]
    pub requires: Vec<String>,
    /// BLAKE3 of this file with this value replaced by 64 zeros. Kept last.
    #[serde(default)]
    pub manifest_blake3: String,
}

/// The page receiver's account ([`crate::page_receiver`]).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PagesRecord {
    /// Bytes of pages received from CRIU.
    pub received_bytes: u64,
    /// Of those, bytes that landed in staged memory (or page cache).
    pub staged_bytes: u64,
    /// Bytes of staged memory faulted in before the freeze (staging stops when the freeze
    /// begins). Informational: absent in older manifests.
    #[serde(default)]
    pub prefaulted_bytes: u64,
    /// How the pages were staged: "memory" or "page-cache". Informational.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub staging: String,
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
    #[error("{path} has format {found:?}; this cryo reads {FORMAT:?} and {FORMAT_V1:?}: restore it with the cryo that made it")]
    Format {
        /// File.
        path: PathBuf,
        /// What it says.
        found: String,
    },
    /// Needs something this cryo does not know.
    #[error("{path} requires {requirement:?}, which this cryo does not understand: restore it with a newer cryo")]
    Requires {
        /// File.
        path: PathBuf,
        /// The unknown requirement.
        requirement: String,
    },
    /// The manifest's digest of itself does not match: it was edited or damaged.
    #[error("{path} is damaged or was edited (its own digest does not match): the image cannot be trusted; restore another checkpoint")]
    Damaged {
        /// File.
        path: PathBuf,
    },
}

impl Manifest {
    /// The manifest as written: pretty JSON whose last field is its own digest.
    pub fn to_bytes(&self) -> std::io::Result<Vec<u8>> {
        let mut m = self.clone();
        m.manifest_blake3 = "0".repeat(64);
        let zeroed = serde_json::to_vec_pretty(&m)?;
        m.manifest_blake3 = crate::image::digest::digest_bytes(&zeroed);
        Ok(serde_json::to_vec_pretty(&m)?)
    }

    /// Write atomically into `image_dir` (private, synced), with its own digest.
    pub fn write(&self, image_dir: &Path) -> std::io::Result<()> {
        cryo_oci::atomic::write_atomic(&image_dir.join(FILE), &self.to_bytes()?)
    }

    /// Whether this manifest carries file digests (format v2 and later).
    pub fn has_digests(&self) -> bool {
        self.format != FORMAT_V1
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
        if found != FORMAT && found != FORMAT_V1 {
            return Err(ManifestError::Format {
                path,
                found: found.to_string(),
            });
        }
        if found == FORMAT && !self_digest_matches(&bytes) {
            return Err(ManifestError::Damaged { path });
        }
        let m: Manifest = serde_json::from_value(v).map_err(|e| ManifestError::Read {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        if let Some(r) = m
            .requires
            .iter()
            .find(|r| !KNOWN_REQUIREMENTS.contains(&r.as_str()))
        {
            return Err(ManifestError::Requires {
                path,
                requirement: r.clone(),
            });
        }
        Ok(Some(m))
    }
}

/// Whether the manifest text's own digest matches: the digest is taken over the text with its
/// value replaced by zeros, so fields a newer cryo added are covered too.
fn self_digest_matches(bytes: &[u8]) -> bool {
    let key = format!("\"{SELF_DIGEST_KEY}\": \"");
    let Some(at) = find(bytes, key.as_bytes()) else {
        return false;
    };
    let start = at + key.len();
    let Some(value) = bytes.get(start..start + 64) else {
        return false;
    };
    if bytes.get(start + 64) != Some(&b'"') {
        return false;
    }
    let mut zeroed = bytes.to_vec();
    zeroed[start..start + 64].fill(b'0');
    crate::image::digest::digest_bytes(&zeroed).as_bytes() == value
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).rposition(|w| w == needle)
}

/// sha256 of a file, hex.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    use sha2::{Digest, Sha256};
    let bytes = std::fs::read(path)?;
    Ok(format!("{:x}", Sha256::digest(&bytes)))
}

#[cfg(test)]
pub(crate) mod tests {
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
                upper_fingerprint: None,
                snapshot: None,
                skipped_because: Some("plain directory".into()),
                device_nodes: vec![],
                entries: 0,
                bytes: 0,
                logical_bytes: None,
            },
            devshm: None,
            open_files: vec![],
            compressed_pages: Vec::new(),
            pages: Some(PagesRecord {
                received_bytes: 8192,
                staged_bytes: 4096,
                prefaulted_bytes: 4096,
                staging: "memory".into(),
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
            files: vec![FileRecord {
                name: "core-1.img".into(),
                size: 3,
                blake3: "ab".repeat(32),
            }],
            parent: None,
            shares: None,
            requires: vec![],
            manifest_blake3: String::new(),
        }
    }

    #[test]
    fn roundtrip_missing_and_foreign_format() {
        let dir = std::env::temp_dir().join(format!("cryo-manifest-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert!(Manifest::read(&dir).unwrap().is_none());
        let m = sample();
        m.write(&dir).unwrap();
        let back = Manifest::read(&dir).unwrap().unwrap();
        assert_eq!(back.manifest_blake3.len(), 64);
        assert_eq!(
            Manifest {
                manifest_blake3: String::new(),
                ..back
            },
            m
        );
        std::fs::write(dir.join(FILE), r#"{"format":"cryo.checkpoint/v9"}"#).unwrap();
        let e = Manifest::read(&dir).unwrap_err().to_string();
        assert!(
            e.contains("v9") && e.contains("restore it with the cryo that made it"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn any_edit_of_the_manifest_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let m = sample();
        m.write(dir.path()).unwrap();
        let good = std::fs::read(dir.path().join(FILE)).unwrap();
        let text = String::from_utf8(good.clone()).unwrap();
        for (from, to) in [
            ("\"size\": 3", "\"size\": 4"),
            ("\"criu_version\": 40201", "\"criu_version\": 40200"),
            ("abab", "abac"),
        ] {
            assert!(text.contains(from), "{from}");
            std::fs::write(dir.path().join(FILE), text.replacen(from, to, 1)).unwrap();
            let e = Manifest::read(dir.path()).unwrap_err().to_string();
            assert!(e.contains("damaged or was edited"), "{from}: {e}");
        }
        // A field a newer cryo added is covered by the digest, and ignored when intact.
        let mut newer = m.clone();
        newer.timings.total_ms = 5.0;
        let bytes = newer.to_bytes().unwrap();
        std::fs::write(dir.path().join(FILE), &bytes).unwrap();
        assert!(Manifest::read(dir.path()).unwrap().is_some());
        // An unknown requirement is refused with the reason.
        let mut future = m.clone();
        future.requires = vec!["quantum-pages".into()];
        future.write(dir.path()).unwrap();
        let e = Manifest::read(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains("quantum-pages") && e.contains("newer cryo"),
            "{e}"
        );
        // v1 manifests (no digests) are still read.
        let mut old: serde_json::Value = serde_json::from_slice(&good).unwrap();
        old["format"] = FORMAT_V1.into();
        std::fs::write(dir.path().join(FILE), serde_json::to_vec(&old).unwrap()).unwrap();
        assert!(!Manifest::read(dir.path()).unwrap().unwrap().has_digests());
    }
}
