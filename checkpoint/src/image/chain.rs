//! Incremental images ([`crate::store`]) and the generations they depend on. Such an image
//! restores only together with its parent chain, so verifying it verifies the chain: each
//! `parent` link must name the sibling its manifest records, each parent must verify, and
//! each must still be the very image the child was made from (its manifest digest, which
//! covers the digest of every file, is the one recorded). An image whose manifest records no
//! parent must have no `parent` link (CRIU would follow it).

use std::path::{Path, PathBuf};
use std::time::Instant;

use super::verify::{verify_image_alone, ImageError, Thoroughness, VerifiedImage};
use crate::manifest::Manifest;
use crate::store::delta::{parent_target, MAX_CHAIN};
use crate::store::{ParentRecord, PARENT_LINK};

/// Verify the image in `dir` and every generation it depends on, each as `how` says.
pub fn verify_chain(dir: &Path, how: Thoroughness) -> Result<VerifiedImage, ImageError> {
    let start = Instant::now();
    let mut v = verify_image_alone(dir, how)?;
    let mut at = dir.to_path_buf();
    let mut manifest = v.manifest.clone();
    while let Some(m) = manifest {
        let Some((parent_dir, record)) = parent_of(&at, &m)? else {
            break;
        };
        let broken = |reason: String| ImageError::Parent {
            dir: dir.to_path_buf(),
            reason,
        };
        if v.ancestors.len() >= MAX_CHAIN {
            return Err(broken(format!(
                "its chain of parent generations is longer than {MAX_CHAIN} (a loop of links?)"
            )));
        }
        let p = verify_image_alone(&parent_dir, how).map_err(|e| {
            broken(format!(
                "it depends on generation {}, which is damaged or incomplete ({e})",
                record.name
            ))
        })?;
        let pm = p.manifest.ok_or_else(|| {
            broken(format!(
                "it depends on {}, which is not a cryo checkpoint",
                record.name
            ))
        })?;
        if pm.manifest_blake3 != record.manifest_blake3 {
            return Err(broken(format!(
                "it depends on generation {}, which is no longer the image it was made from \
                 (its manifest differs)",
                record.name
            )));
        }
        v.files_checked += p.files_checked;
        v.pages_pending.extend(p.pages_pending);
        v.bytes_checked += p.bytes_checked;
        v.warnings.extend(p.warnings);
        v.ancestors.push(parent_dir.clone());
        at = parent_dir;
        manifest = Some(pm);
    }
    v.verify_ms = start.elapsed().as_secs_f64() * 1000.0;
    Ok(v)
}

/// The parent generation of the image in `dir` whose manifest is `m`, with the record: the
/// `parent` link must be `../<name>` and the directory there must exist. `None` for an image
/// without parent (which must have no `parent` link).
pub fn parent_of<'m>(
    dir: &Path,
    m: &'m Manifest,
) -> Result<Option<(PathBuf, &'m ParentRecord)>, ImageError> {
    let broken = |reason: String| ImageError::Parent {
        dir: dir.to_path_buf(),
        reason,
    };
    let link = dir.join(PARENT_LINK);
    let target = match std::fs::read_link(&link) {
        Ok(t) => Some(t),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => {
            return Err(broken(format!("its `{PARENT_LINK}` is not a link")))
        }
        Err(source) => return Err(ImageError::Io { path: link, source }),
    };
    let Some(record) = m.parent.as_ref() else {
        return match target {
            None => Ok(None),
            Some(t) => Err(broken(format!(
                "it has a `{PARENT_LINK}` link (to {}) that its manifest does not record",
                t.display()
            ))),
        };
    };
    let plain =
        !record.name.is_empty() && !record.name.contains('/') && !record.name.starts_with('.');
    if !plain {
        return Err(broken(format!(
            "its manifest names parent {:?}, which is not a generation's name",
            record.name
        )));
    }
    let expected = parent_target(&record.name);
    match target {
        None => {
            return Err(broken(format!(
                "it is incremental over generation {} but its `{PARENT_LINK}` link is missing",
                record.name
            )))
        }
        Some(t) if t != expected => {
            return Err(broken(format!(
                "its `{PARENT_LINK}` link points to {}, its manifest records {}",
                t.display(),
                expected.display()
            )))
        }
        Some(_) => {}
    }
    // Relative to where the image really is (CRIU resolves the link there), not to a link
    // that led to it.
    let real = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    let parent_dir = real.parent().unwrap_or(Path::new("/")).join(&record.name);
    if !parent_dir.is_dir() {
        return Err(broken(format!(
            "it is incremental over generation {}, which is gone (removed, or never complete)",
            record.name
        )));
    }
    Ok(Some((parent_dir, record)))
}

#[cfg(test)]
#[path = "chain_tests.rs"]
mod tests;
