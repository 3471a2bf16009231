//! The state of every generation of a store, each generation's own files checked once and its
//! chain judged from its parent's state (parents are older: checked first, and remembered).
//! A generation of a group store holds a group image ([`crate::group::manifest`]): its group
//! manifest and every member's image are checked; a group generation is always full.

use std::collections::HashMap;
use std::path::PathBuf;

use chrono::{DateTime, Utc};

use super::Generation;
use crate::group::is_group_image;
use crate::group::manifest::{check_group, GroupManifest};
use crate::image::chain::parent_of;
use crate::image::{verify_image_alone, Thoroughness};
use crate::manifest::{self, Manifest};

/// Whether a generation can be restored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GenerationState {
    /// It and every generation it depends on check out.
    Good,
    /// Why not.
    Bad(String),
}

/// One generation as a listing shows it.
#[derive(Debug, Clone)]
pub struct GenerationInfo {
    /// Directory name.
    pub name: String,
    /// Sequence number.
    pub seq: u64,
    /// Directory.
    pub dir: PathBuf,
    /// Its manifest, when it could be read (a single container's generation).
    pub manifest: Option<Manifest>,
    /// Its group manifest, when it holds a group image that could be read.
    pub group: Option<GroupManifest>,
    /// Its state.
    pub state: GenerationState,
    /// Bytes it occupies itself (not counting files it shares with its parent).
    pub bytes: u64,
}

impl GenerationInfo {
    /// Whether it checks out.
    pub fn is_good(&self) -> bool {
        self.state == GenerationState::Good
    }

    /// When it was completed.
    pub fn created(&self) -> Option<DateTime<Utc>> {
        match &self.group {
            Some(g) => Some(g.created),
            None => self.manifest.as_ref().map(|m| m.created),
        }
    }

    /// Its parent generation, if it is incremental.
    pub fn parent(&self) -> Option<&str> {
        self.manifest
            .as_ref()
            .and_then(|m| m.parent.as_ref())
            .map(|p| p.name.as_str())
    }

    /// How long the container (or the group, as a whole) was frozen for it, in milliseconds.
    pub fn frozen_ms(&self) -> Option<f64> {
        match &self.group {
            Some(g) => Some(g.timings.frozen_ms),
            None => self.manifest.as_ref().map(|m| m.timings.frozen_ms),
        }
    }

    /// The containers it holds: the one checkpointed, or the group's members.
    pub fn containers(&self) -> Vec<String> {
        match (&self.group, &self.manifest) {
            (Some(g), _) => g.members.iter().map(|m| m.id.clone()).collect(),
            (None, Some(m)) => vec![m.container_id.clone()],
            (None, None) => Vec::new(),
        }
    }
}

/// Check generations (oldest first, as [`super::Store::generations`] lists them), each as
/// `how` says.
pub fn check_all(gens: &[Generation], how: Thoroughness) -> Vec<GenerationInfo> {
    let mut out: Vec<GenerationInfo> = Vec::with_capacity(gens.len());
    let mut by_name: HashMap<String, usize> = HashMap::new();
    for g in gens {
        let info = check_one(g, how, &out, &by_name);
        by_name.insert(g.name.clone(), out.len());
        out.push(info);
    }
    out
}

fn check_one(
    g: &Generation,
    how: Thoroughness,
    earlier: &[GenerationInfo],
    by_name: &HashMap<String, usize>,
) -> GenerationInfo {
    let mut info = GenerationInfo {
        name: g.name.clone(),
        seq: g.seq,
        dir: g.dir.clone(),
        manifest: None,
        group: None,
        state: GenerationState::Good,
        bytes: 0,
    };
    if is_group_image(&g.dir) {
        check_group_generation(&mut info, how);
        return info;
    }
    let own = verify_image_alone(&g.dir, how);
    info.manifest = match &own {
        Ok(v) => v.manifest.clone(),
        Err(_) => Manifest::read(&g.dir).ok().flatten(),
    };
    info.bytes = own_bytes(g, info.manifest.as_ref());
    if let Err(e) = own {
        info.state = GenerationState::Bad(e.to_string());
        return info;
    }
    let Some(m) = info.manifest.as_ref() else {
        info.state = GenerationState::Bad(format!(
            "it has no {}: not a complete cryo checkpoint",
            manifest::FILE
        ));
        return info;
    };
    info.state = match parent_of(&g.dir, m) {
        Err(e) => GenerationState::Bad(e.to_string()),
        Ok(None) => GenerationState::Good,
        Ok(Some((_, record))) => match by_name.get(&record.name).map(|&i| &earlier[i]) {
            None => GenerationState::Bad(format!(
                "it depends on {}, which is not an earlier generation of this store",
                record.name
            )),
            Some(p) => match (&p.state, &p.manifest) {
                (GenerationState::Bad(why), _) => GenerationState::Bad(format!(
                    "it depends on generation {}, which cannot be restored ({why})",
                    record.name
                )),
                (_, Some(pm)) if pm.manifest_blake3 == record.manifest_blake3 => {
                    GenerationState::Good
                }
                _ => GenerationState::Bad(format!(
                    "it depends on generation {}, which is no longer the image it was made from",
                    record.name
                )),
            },
        },
    };
    info
}

/// A group generation: the group manifest binds each member's image, and each member's image
/// checks out on its own (a member of a group generation has no parent).
fn check_group_generation(info: &mut GenerationInfo, how: Thoroughness) {
    let size = |p: PathBuf| std::fs::symlink_metadata(p).map(|m| m.len()).unwrap_or(0);
    info.bytes = size(info.dir.join(crate::group::manifest::FILE));
    let group = match check_group(&info.dir) {
        Ok(g) => g.manifest,
        Err(e) => {
            info.group = GroupManifest::read(&info.dir).ok().flatten();
            info.state = GenerationState::Bad(e.to_string());
            return;
        }
    };
    let mut problem = None;
    for r in &group.members {
        let dir = info.dir.join(&r.dir);
        match verify_image_alone(&dir, how) {
            Ok(v) => {
                let m = v.manifest.as_ref();
                info.bytes += m.map_or(0, |m| m.files.iter().map(|f| f.size).sum::<u64>())
                    + size(dir.join(manifest::FILE));
                if m.is_some_and(|m| m.parent.is_some()) && problem.is_none() {
                    problem = Some(format!(
                        "member {}'s image depends on a parent: a group generation holds full \
                         images only",
                        r.id
                    ));
                }
            }
            Err(e) if problem.is_none() => problem = Some(format!("member {}: {e}", r.id)),
            Err(_) => {}
        }
    }
    info.group = Some(group);
    if let Some(why) = problem {
        info.state = GenerationState::Bad(why);
    }
}

/// Bytes a generation occupies itself: its files (less those it shares with its parent by
/// hard link) and its manifest; without a manifest, everything in its directory.
fn own_bytes(g: &Generation, m: Option<&Manifest>) -> u64 {
    let size = |p: PathBuf| std::fs::symlink_metadata(p).map(|m| m.len()).unwrap_or(0);
    let Some(m) = m else {
        return std::fs::read_dir(&g.dir)
            .map(|d| d.flatten().map(|e| size(e.path())).sum())
            .unwrap_or(0);
    };
    super::own_bytes(m) + size(g.dir.join(manifest::FILE))
}
