//! The group image: one directory published whole, holding each member's image (a complete
//! cryo image with its own manifest) under `members/<id>`, and `cryo-group.json`, written last,
//! which names the members and binds them (each member manifest's own digest) and carries a
//! digest of itself, as member manifests do.
//!
//! ```text
//! <image-path>/cryo-group.json
//! <image-path>/members/<id>/cryo-manifest.json, inventory.img, pages-1.img, …
//! ```

use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::image::{verify_image, ImageError};
use crate::manifest::Manifest;

/// File name inside the group directory.
pub const FILE: &str = "cryo-group.json";
/// The format this build writes.
pub const FORMAT: &str = "cryo.group/v1";
/// Where the members' images are, inside the group directory.
pub const MEMBERS_DIR: &str = "members";
/// The JSON key of the group manifest's own digest.
const SELF_DIGEST_KEY: &str = "group_blake3";

/// One member of the group.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MemberRecord {
    /// Its container id at checkpoint.
    pub id: String,
    /// Its image, relative to the group directory (`members/<id>`).
    pub dir: String,
    /// Its bundle at checkpoint (where a restore in place finds it).
    pub bundle: PathBuf,
    /// The digest its own manifest carries: the group holds exactly these images.
    pub manifest_blake3: String,
    /// Its network namespace (`net:[inode]`) at checkpoint.
    pub netns: String,
    /// How long this member stayed frozen, in milliseconds (until killed, when stopped).
    pub frozen_ms: f64,
}

/// How long the group's steps took, in milliseconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct GroupTimings {
    /// From the first member's freeze to the last member's thaw (or kill): what the group's
    /// applications saw as a whole.
    pub frozen_ms: f64,
    /// Locking the members' network, inside the freeze.
    pub lock_ms: f64,
    /// Unlocking it again (0 when it stays locked for a restore).
    pub unlock_ms: f64,
    /// From the freeze to the end of the slowest member's CRIU dump.
    pub dump_ms: f64,
    /// The whole verb, until the group was published.
    pub total_ms: f64,
}

/// `cryo-group.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct GroupManifest {
    /// [`FORMAT`].
    pub format: String,
    /// cryo's version.
    pub cryo_version: String,
    /// When the group checkpoint completed.
    pub created: DateTime<Utc>,
    /// The group's name (`--group`), when the members were named by it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Whether the members kept running.
    pub leave_running: bool,
    /// How the members' network was locked (`iptables`, or `skip`).
    pub network_lock: String,
    /// The members, in the order they were named.
    pub members: Vec<MemberRecord>,
    /// Step timings.
    pub timings: GroupTimings,
    /// BLAKE3 of this file's text with this value zeroed.
    pub group_blake3: String,
}

/// A group image refused.
#[derive(Debug, thiserror::Error)]
pub enum GroupImageError {
    /// Reading or parsing the group manifest failed.
    #[error("cannot read {path}: {reason}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// Another format.
    #[error("{path} has format {found:?}, this cryo reads {FORMAT}: restore it with the cryo that made it")]
    Format {
        /// The file.
        path: PathBuf,
        /// The format found.
        found: String,
    },
    /// The group manifest's own digest does not match.
    #[error("{path} is damaged or was edited (its own digest does not match): the group image cannot be trusted; restore another checkpoint")]
    Damaged {
        /// The file.
        path: PathBuf,
    },
    /// A member's image is not the one the group recorded, or is missing.
    #[error(
        "group image {dir} is damaged: member {id}'s image {what}; restore another checkpoint"
    )]
    Member {
        /// The group directory.
        dir: PathBuf,
        /// The member.
        id: String,
        /// What is wrong.
        what: String,
    },
    /// A member's image fails its own verification.
    #[error("group image {dir}: member {id}: {source}")]
    MemberImage {
        /// The group directory.
        dir: PathBuf,
        /// The member.
        id: String,
        /// Its verification error.
        #[source]
        source: ImageError,
    },
}

impl GroupManifest {
    /// The text as written: pretty JSON carrying its own digest.
    pub fn to_bytes(&self) -> std::io::Result<Vec<u8>> {
        let mut m = self.clone();
        m.group_blake3 = "0".repeat(64);
        let zeroed = serde_json::to_vec_pretty(&m)?;
        m.group_blake3 = crate::image::digest::digest_bytes(&zeroed);
        Ok(serde_json::to_vec_pretty(&m)?)
    }

    /// Write atomically (synced) into `dir`.
    pub fn write(&self, dir: &Path) -> std::io::Result<()> {
        cryo_oci::atomic::write_atomic(&dir.join(FILE), &self.to_bytes()?)
    }

    /// Read from `dir` (`Ok(None)`: not a group image), its own digest checked.
    pub fn read(dir: &Path) -> Result<Option<Self>, GroupImageError> {
        let path = dir.join(FILE);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(GroupImageError::Read {
                    path,
                    reason: e.to_string(),
                })
            }
        };
        let read_err = |reason: String| GroupImageError::Read {
            path: path.clone(),
            reason,
        };
        let v: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|e| read_err(e.to_string()))?;
        let found = v.get("format").and_then(|f| f.as_str()).unwrap_or("");
        if found != FORMAT {
            return Err(GroupImageError::Format {
                path,
                found: found.to_string(),
            });
        }
        if !self_digest_matches(&bytes) {
            return Err(GroupImageError::Damaged { path });
        }
        let m: GroupManifest = serde_json::from_value(v).map_err(|e| read_err(e.to_string()))?;
        for r in &m.members {
            if r.dir != member_dir(&r.id) || cryo_oci::state::validate_id(&r.id).is_err() {
                return Err(read_err(format!(
                    "member {:?} has the image directory {:?}",
                    r.id, r.dir
                )));
            }
        }
        Ok(Some(m))
    }

    /// The member images' directories inside the group directory `dir`.
    pub fn member_path(dir: &Path, id: &str) -> PathBuf {
        dir.join(member_dir(id))
    }
}

/// `members/<id>`.
pub fn member_dir(id: &str) -> String {
    format!("{MEMBERS_DIR}/{id}")
}

/// Whether `dir` holds a group image (a group manifest), complete or not.
pub fn is_group_image(dir: &Path) -> bool {
    dir.join(FILE).exists()
}

fn self_digest_matches(bytes: &[u8]) -> bool {
    let key = format!("\"{SELF_DIGEST_KEY}\": \"");
    let Some(at) = bytes.windows(key.len()).rposition(|w| w == key.as_bytes()) else {
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

/// A group image checked: its manifest, and each member's manifest is the one recorded.
#[derive(Debug, Clone)]
pub struct CheckedGroup {
    /// The group directory.
    pub dir: PathBuf,
    /// Its manifest.
    pub manifest: GroupManifest,
}

/// Check a group image before a restore: the group manifest (format, own digest), and that
/// each member's image has the manifest the group recorded and nothing else lies in
/// `members/`. Each member's files are verified by its own restore (or by
/// [`verify_group_fully`]).
pub fn check_group(dir: &Path) -> Result<CheckedGroup, GroupImageError> {
    let manifest = GroupManifest::read(dir)?.ok_or_else(|| GroupImageError::Read {
        path: dir.join(FILE),
        reason: "no such file: not a group image".into(),
    })?;
    for r in &manifest.members {
        let path = dir.join(&r.dir);
        let m = Manifest::read(&path)
            .map_err(|e| GroupImageError::Member {
                dir: dir.to_path_buf(),
                id: r.id.clone(),
                what: format!("has an unusable manifest ({e})"),
            })?
            .ok_or_else(|| GroupImageError::Member {
                dir: dir.to_path_buf(),
                id: r.id.clone(),
                what: "is missing".into(),
            })?;
        if m.manifest_blake3 != r.manifest_blake3 {
            return Err(GroupImageError::Member {
                dir: dir.to_path_buf(),
                id: r.id.clone(),
                what: "is not the one the group recorded (an image of another checkpoint)".into(),
            });
        }
    }
    let listed: std::collections::HashSet<&str> =
        manifest.members.iter().map(|r| r.id.as_str()).collect();
    let members = dir.join(MEMBERS_DIR);
    let entries = std::fs::read_dir(&members).map_err(|e| GroupImageError::Read {
        path: members.clone(),
        reason: e.to_string(),
    })?;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !listed.contains(name.as_str()) {
            return Err(GroupImageError::Member {
                dir: dir.to_path_buf(),
                id: name,
                what: "lies in the group but the group does not list it".into(),
            });
        }
    }
    Ok(CheckedGroup {
        dir: dir.to_path_buf(),
        manifest,
    })
}

/// [`check_group`], then every member's image verified whole (`cryo verify`).
pub fn verify_group_fully(dir: &Path) -> Result<(CheckedGroup, u64, u64), GroupImageError> {
    let group = check_group(dir)?;
    let (mut files, mut bytes) = (0, 0);
    for r in &group.manifest.members {
        let v = verify_image(&dir.join(&r.dir)).map_err(|source| GroupImageError::MemberImage {
            dir: dir.to_path_buf(),
            id: r.id.clone(),
            source,
        })?;
        files += v.files_checked as u64;
        bytes += v.bytes_checked;
    }
    Ok((group, files, bytes))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn sample() -> GroupManifest {
        GroupManifest {
            format: FORMAT.into(),
            cryo_version: "0.1.0".into(),
            created: Utc::now(),
            group: Some("job".into()),
            leave_running: true,
            network_lock: "iptables".into(),
            members: vec![MemberRecord {
                id: "a".into(),
                dir: member_dir("a"),
                bundle: "/b/a".into(),
                manifest_blake3: "ab".repeat(32),
                netns: "net:[1]".into(),
                frozen_ms: 1.0,
            }],
            timings: GroupTimings::default(),
            group_blake3: String::new(),
        }
    }

    #[test]
    fn the_group_manifest_carries_its_own_digest() {
        let dir = std::env::temp_dir().join(format!("cryo-gm-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let m = sample();
        m.write(&dir).unwrap();
        let back = GroupManifest::read(&dir).unwrap().unwrap();
        assert_eq!(back.group_blake3.len(), 64);
        assert_eq!(
            GroupManifest {
                group_blake3: String::new(),
                ..back
            },
            m
        );
        let text = std::fs::read_to_string(dir.join(FILE)).unwrap();
        std::fs::write(dir.join(FILE), text.replace("\"a\"", "\"b\"")).unwrap();
        assert!(matches!(
            GroupManifest::read(&dir),
            Err(GroupImageError::Damaged { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn member_dirs_must_be_their_own() {
        let dir = std::env::temp_dir().join(format!("cryo-gm2-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut m = sample();
        m.members[0].dir = "../elsewhere".into();
        m.write(&dir).unwrap();
        assert!(matches!(
            GroupManifest::read(&dir),
            Err(GroupImageError::Read { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
