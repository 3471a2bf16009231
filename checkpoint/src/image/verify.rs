//! Verifying an image before anything is restored from it: the manifest (its own digest, its
//! format and requirements), then every file it lists (present, a regular file, its size, its
//! BLAKE3), then that no image file of another dump lies beside them. An image without a
//! manifest is accepted only when it is a plain CRIU image (runc's), with a warning. An
//! incremental store generation is verified with every generation it depends on
//! ([`super::chain`]).

use std::path::{Path, PathBuf};
use std::time::Instant;

use super::alongside::{checked_alongside, PendingDigest};
use super::blocks::blocks_name;
use super::digest::digest_file;
use super::publish::{is_side_file, looks_like_image_file};
use crate::manifest::{self, Manifest, ManifestError};

/// An image refused, naming the file and what is wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// No such directory.
    #[error("{dir} does not exist or is not a directory: pass the --image-path of a checkpoint")]
    NoDir {
        /// The directory.
        dir: PathBuf,
    },
    /// Not a CRIU image at all.
    #[error("{dir} holds no checkpoint (no inventory.img): pass the --image-path of a checkpoint")]
    NotAnImage {
        /// The directory.
        dir: PathBuf,
    },
    /// cryo's files without cryo's manifest: a checkpoint that never completed, or damage.
    #[error(
        "{dir} holds files cryo writes ({file}) but no {}: it is an incomplete or damaged \
         cryo checkpoint and cannot be restored; restore an earlier checkpoint",
        manifest::FILE
    )]
    Incomplete {
        /// The directory.
        dir: PathBuf,
        /// One of cryo's files found.
        file: String,
    },
    /// The manifest is unreadable, edited or of another format.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// A file the manifest lists is missing or not a regular file.
    #[error("image {dir} is damaged: {file} is missing (the manifest lists it); restore an earlier checkpoint")]
    Missing {
        /// The directory.
        dir: PathBuf,
        /// The file.
        file: String,
    },
    /// A file has another size than recorded.
    #[error("image {dir} is damaged: {file} has {found} bytes, the manifest recorded {expected} (truncated or overwritten); restore an earlier checkpoint")]
    Size {
        /// The directory.
        dir: PathBuf,
        /// The file.
        file: String,
        /// Recorded size.
        expected: u64,
        /// Size found.
        found: u64,
    },
    /// A file's content differs from what was recorded.
    #[error("image {dir} is damaged: the content of {file} does not match its recorded BLAKE3 digest (corrupted or edited); restore an earlier checkpoint")]
    Digest {
        /// The directory.
        dir: PathBuf,
        /// The file.
        file: String,
    },
    /// An image file that is not part of this checkpoint.
    #[error("image {dir} holds {file}, which its manifest does not list: the directory mixes files of two checkpoints; restore an earlier checkpoint")]
    Unlisted {
        /// The directory.
        dir: PathBuf,
        /// The file.
        file: String,
    },
    /// The chain of parent generations an incremental image depends on is broken.
    #[error("image {dir} cannot be restored: {reason}")]
    Parent {
        /// The image.
        dir: PathBuf,
        /// What is wrong with its chain.
        reason: String,
    },
    /// Reading a file failed.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// An image that passed verification.
#[derive(Debug)]
pub struct VerifiedImage {
    /// The image directory.
    pub dir: PathBuf,
    /// Its manifest (none for a runc image).
    pub manifest: Option<Manifest>,
    /// What the user should know (no manifest, old format).
    pub warnings: Vec<String>,
    /// Files and bytes whose digests were checked.
    pub files_checked: usize,
    /// Bytes read to check them.
    pub bytes_checked: u64,
    /// How long it took, in milliseconds.
    pub verify_ms: f64,
    /// The parent generations verified with it, nearest first (incremental images).
    pub ancestors: Vec<PathBuf>,
    /// Page images whose sizes were checked and whose digests are left to
    /// [`super::alongside`] ([`Thoroughness::DigestsButPagesAlongside`] only).
    pub pages_pending: Vec<PendingDigest>,
}

/// How closely each listed file is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Thoroughness {
    /// Present, regular, of its size, and of its digest (what a restore checks).
    Digests,
    /// Present, regular and of its size: a quick look (listing a store, pruning).
    Sizes,
    /// As `Digests`, except that the page images' digests are handed back to be checked
    /// while CRIU restores ([`super::alongside`]).
    DigestsButPagesAlongside,
}

/// Verify the image in `dir` and the generations it depends on (see the module docs).
pub fn verify_image(dir: &Path) -> Result<VerifiedImage, ImageError> {
    super::chain::verify_chain(dir, Thoroughness::Digests)
}

/// Verify the image in `dir` and the generations it depends on, all but the page images'
/// digests, which come back in [`VerifiedImage::pages_pending`] (see [`super::alongside`]).
pub fn verify_image_but_pages(dir: &Path) -> Result<VerifiedImage, ImageError> {
    super::chain::verify_chain(dir, Thoroughness::DigestsButPagesAlongside)
}

/// Verify the image in `dir` alone, without the generations it depends on.
pub fn verify_image_alone(dir: &Path, how: Thoroughness) -> Result<VerifiedImage, ImageError> {
    let start = Instant::now();
    if !dir.is_dir() {
        return Err(ImageError::NoDir {
            dir: dir.to_path_buf(),
        });
    }
    let names = list(dir)?;
    let manifest = Manifest::read(dir)?;
    let mut v = VerifiedImage {
        dir: dir.to_path_buf(),
        manifest: None,
        warnings: Vec::new(),
        files_checked: 0,
        bytes_checked: 0,
        verify_ms: 0.0,
        ancestors: Vec::new(),
        pages_pending: Vec::new(),
    };
    let Some(m) = manifest else {
        if let Some(file) = names.iter().find(|n| written_by_cryo_only(n)) {
            return Err(ImageError::Incomplete {
                dir: dir.to_path_buf(),
                file: file.clone(),
            });
        }
        if !names.iter().any(|n| n == "inventory.img") {
            return Err(ImageError::NotAnImage {
                dir: dir.to_path_buf(),
            });
        }
        v.warnings.push(format!(
            "{} has no {}: restoring it as a plain CRIU image (made by runc?), without integrity \
             check or rootfs changeset",
            dir.display(),
            manifest::FILE
        ));
        v.verify_ms = start.elapsed().as_secs_f64() * 1000.0;
        return Ok(v);
    };
    if !m.has_digests() {
        v.warnings.push(format!(
            "{} was made by an older cryo ({}): it records no file digests, so its files are \
             not verified",
            dir.display(),
            manifest::FORMAT_V1
        ));
    } else {
        for f in &m.files {
            if how == Thoroughness::DigestsButPagesAlongside && checked_alongside(&f.name) {
                check_file(dir, &f.name, f.size, &f.blake3, Thoroughness::Sizes)?;
                let side = blocks_name(&f.name);
                v.pages_pending.push(PendingDigest {
                    dir: dir.to_path_buf(),
                    file: f.name.clone(),
                    blake3: f.blake3.clone(),
                    size: f.size,
                    blocks_listed: m.files.iter().any(|g| g.name == side),
                    only: None,
                });
                continue;
            }
            check_file(dir, &f.name, f.size, &f.blake3, how)?;
            v.files_checked += 1;
            v.bytes_checked += f.size;
        }
        let listed: std::collections::HashSet<&str> =
            m.files.iter().map(|f| f.name.as_str()).collect();
        if let Some(file) = names
            .iter()
            .find(|n| looks_like_image_file(n) && !listed.contains(n.as_str()) && !is_side_file(n))
        {
            return Err(ImageError::Unlisted {
                dir: dir.to_path_buf(),
                file: file.clone(),
            });
        }
    }
    if !names.iter().any(|n| n == "inventory.img") {
        return Err(ImageError::Missing {
            dir: dir.to_path_buf(),
            file: "inventory.img".into(),
        });
    }
    v.manifest = Some(m);
    v.verify_ms = start.elapsed().as_secs_f64() * 1000.0;
    Ok(v)
}

/// Files only cryo writes: their presence without a manifest means cryo's checkpoint did not
/// complete (or its manifest was removed).
fn written_by_cryo_only(name: &str) -> bool {
    name.starts_with("rootfs-diff.tar")
        || name == crate::dump::DEVSHM_FILE
        || name.ends_with(".img.zst")
        || name.starts_with(".cryo-")
}

fn list(dir: &Path) -> Result<Vec<String>, ImageError> {
    let entries = std::fs::read_dir(dir).map_err(|source| ImageError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    Ok(entries
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect())
}

fn check_file(
    dir: &Path,
    name: &str,
    size: u64,
    blake3: &str,
    how: Thoroughness,
) -> Result<(), ImageError> {
    let missing = || ImageError::Missing {
        dir: dir.to_path_buf(),
        file: name.to_string(),
    };
    // A listed name is one plain component: never a path out of the image.
    if name.is_empty() || name.contains('/') || name == "." || name == ".." {
        return Err(missing());
    }
    let path = dir.join(name);
    let meta = match std::fs::symlink_metadata(&path) {
        Ok(m) if m.file_type().is_file() => m,
        Ok(_) => return Err(missing()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(missing()),
        Err(source) => return Err(ImageError::Io { path, source }),
    };
    if meta.len() != size {
        return Err(ImageError::Size {
            dir: dir.to_path_buf(),
            file: name.to_string(),
            expected: size,
            found: meta.len(),
        });
    }
    if how == Thoroughness::Sizes {
        return Ok(());
    }
    let (_, got) = digest_file(&path).map_err(|source| ImageError::Io {
        path: path.clone(),
        source,
    })?;
    if got != blake3 {
        return Err(ImageError::Digest {
            dir: dir.to_path_buf(),
            file: name.to_string(),
        });
    }
    Ok(())
}
