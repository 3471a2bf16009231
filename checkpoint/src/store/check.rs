//! The state of every generation of a store, each generation's own files checked once and its
//! chain judged from its parent's state (parents are older: checked first, and remembered).

use std::collections::HashMap;
use std::path::PathBuf;

use chrono::{DateTime, Utc};

use super::Generation;
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
    /// Its manifest, when it could be read.
    pub manifest: Option<Manifest>,
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
        self.manifest.as_ref().map(|m| m.created)
    }

    /// Its parent generation, if it is incremental.
    pub fn parent(&self) -> Option<&str> {
        self.manifest
            .as_ref()
            .and_then(|m| m.parent.as_ref())
            .map(|p| p.name.as_str())
    }

    /// How long the container was frozen for it, in milliseconds.
    pub fn frozen_ms(&self) -> Option<f64> {
        self.manifest.as_ref().map(|m| m.timings.frozen_ms)
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
        state: GenerationState::Good,
        bytes: 0,
    };
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

/// Bytes a generation occupies itself: its files (less those it shares with its parent by
/// hard link) and its manifest; without a manifest, everything in its directory.
fn own_bytes(g: &Generation, m: Option<&Manifest>) -> u64 {
    let size = |p: PathBuf| std::fs::symlink_metadata(p).map(|m| m.len()).unwrap_or(0);
    let Some(m) = m else {
        return std::fs::read_dir(&g.dir)
            .map(|d| d.flatten().map(|e| size(e.path())).sum())
            .unwrap_or(0);
    };
    let shared: &[String] = m.parent.as_ref().map_or(&[], |p| &p.shared_files);
    m.files
        .iter()
        .filter(|f| !shared.contains(&f.name))
        .map(|f| f.size)
        .sum::<u64>()
        + size(g.dir.join(manifest::FILE))
}
