//! Compressed page images (`checkpoint --compress-pages`, a cryo extension).
//!
//! CRIU's `pages-*.img` hold the container's memory byte for byte; for a service whose memory
//! compresses (zeroed buffers, text, caches) they are mostly redundant. With the flag, cryo
//! compresses them with multi-threaded zstd **after the thaw**, so the freeze is unchanged,
//! and records the names in the manifest. Such an image is no longer a plain CRIU image (runc
//! cannot restore it, `crit` cannot read its pages), which is why this is opt-in.
//!
//! At restore cryo stages the image: a scratch directory in the work dir holds a hard link to
//! every other image file and the decompressed pages, and CRIU restores from there. The
//! scratch directory is removed when the restore ends (the restored memory no longer needs
//! it), so `--lazy-pages`, whose daemon reads pages after the restore returns, needs an
//! uncompressed image.

use std::fs;
use std::io::{BufReader, BufWriter};
use std::path::{Path, PathBuf};

use crate::prefault::{SmallWrites, WRITE_CHUNK};

/// Suffix of a compressed page image: `pages-1.img` becomes `pages-1.img.zst`.
pub const SUFFIX: &str = ".zst";

/// `pages-N.img`: a CRIU page image.
pub(crate) fn is_page_image(name: &str) -> bool {
    name.starts_with("pages-") && name.ends_with(".img")
}

/// Compress every `pages-*.img` in `image_dir` into `<name>.zst` and remove the raw file;
/// returns the raw names compressed (sorted) and the bytes written.
pub fn compress_pages(
    image_dir: &Path,
    level: i32,
    threads: u32,
) -> Result<(Vec<String>, u64), String> {
    let mut names: Vec<String> = fs::read_dir(image_dir)
        .map_err(|e| format!("list {}: {e}", image_dir.display()))?
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| is_page_image(n))
        .collect();
    names.sort();
    let mut written = 0;
    for n in &names {
        let raw = image_dir.join(n);
        let zst = image_dir.join(format!("{n}{SUFFIX}"));
        written +=
            crate::rootfs::compress_zstd(&raw, &zst, level, threads).map_err(|e| e.to_string())?;
        fs::remove_file(&raw).map_err(|e| format!("remove {}: {e}", raw.display()))?;
    }
    Ok((names, written))
}

/// A restore's view of an image with compressed pages; removed on drop.
#[derive(Debug)]
pub struct StagedImages {
    dir: PathBuf,
}

impl StagedImages {
    /// The directory to hand CRIU as its images dir.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Stage `image_dir` in `scratch` (created; must not exist): every file but the
    /// compressed pages linked, the pages in `compressed` decompressed.
    pub fn stage(image_dir: &Path, compressed: &[String], scratch: &Path) -> Result<Self, String> {
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        let _ = fs::remove_dir_all(scratch);
        // Private: it holds the container's memory, decompressed.
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(scratch)
            .map_err(|e| format!("create {}: {e}", scratch.display()))?;
        let staged = Self {
            dir: scratch.to_path_buf(),
        };
        let image_dir = image_dir
            .canonicalize()
            .map_err(|e| format!("resolve {}: {e}", image_dir.display()))?;
        for e in
            fs::read_dir(&image_dir).map_err(|e| format!("list {}: {e}", image_dir.display()))?
        {
            let e = e.map_err(|e| format!("list {}: {e}", image_dir.display()))?;
            let name = e.file_name();
            let Some(n) = name.to_str() else { continue };
            // Only the image's files: not the staging dir itself (it lives in the work dir,
            // which is the image dir by default), nor any other directory.
            let is_file = e.file_type().is_ok_and(|t| t.is_file());
            if !is_file || compressed.iter().any(|c| format!("{c}{SUFFIX}") == n) {
                continue;
            }
            // CRIU opens its images without following symlinks: hard-link them (the small
            // files are copied when the work dir is on another filesystem).
            let to = scratch.join(&name);
            if fs::hard_link(e.path(), &to).is_err() {
                fs::copy(e.path(), &to)
                    .map_err(|err| format!("copy {} into {}: {err}", n, scratch.display()))?;
            }
        }
        for c in compressed {
            if !is_page_image(c) || c.contains('/') {
                return Err(format!(
                    "the manifest names {c:?} as a compressed page image"
                ));
            }
            let src = image_dir.join(format!("{c}{SUFFIX}"));
            let input = fs::File::open(&src).map_err(|e| {
                format!(
                    "open {}: {e} (the image is incomplete: copy the whole image directory)",
                    src.display()
                )
            })?;
            let out = scratch.join(c);
            let output = fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&out)
                .map_err(|e| format!("create {}: {e}", out.display()))?;
            zstd::stream::copy_decode(
                BufReader::with_capacity(1 << 20, input),
                BufWriter::with_capacity(WRITE_CHUNK, SmallWrites(output)),
            )
            .map_err(|e| format!("decompress {}: {e}", src.display()))?;
        }
        Ok(staged)
    }
}

impl Drop for StagedImages {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn compress_then_stage_gives_back_the_same_bytes() {
        let dir = std::env::temp_dir().join(format!("cryo-pages-{}", std::process::id()));
        let img = dir.join("img");
        fs::create_dir_all(&img).unwrap();
        let pages: Vec<u8> = (0..3_000_000u32).map(|i| (i / 4096) as u8).collect();
        fs::write(img.join("pages-1.img"), &pages).unwrap();
        fs::write(img.join("pages-2.img"), b"").unwrap();
        fs::write(img.join("inventory.img"), b"inv").unwrap();
        let (names, bytes) = compress_pages(&img, 3, 2).unwrap();
        assert_eq!(names, vec!["pages-1.img", "pages-2.img"]);
        assert!(
            bytes < pages.len() as u64 / 10,
            "compressible pages must shrink: {bytes}"
        );
        assert!(!img.join("pages-1.img").exists() && img.join("pages-1.img.zst").exists());

        let scratch = dir.join("work/stage");
        {
            let staged = StagedImages::stage(&img, &names, &scratch).unwrap();
            assert_eq!(fs::read(staged.dir().join("pages-1.img")).unwrap(), pages);
            assert_eq!(
                fs::read(staged.dir().join("inventory.img")).unwrap(),
                b"inv"
            );
            assert!(!staged.dir().join("pages-1.img.zst").exists());
        }
        assert!(
            !scratch.exists(),
            "the staging dir is removed after the restore"
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_missing_compressed_file_or_a_hostile_name_is_refused() {
        let dir = std::env::temp_dir().join(format!("cryo-pages-bad-{}", std::process::id()));
        let img = dir.join("img");
        fs::create_dir_all(&img).unwrap();
        let e = StagedImages::stage(&img, &["pages-1.img".into()], &dir.join("s")).unwrap_err();
        assert!(e.contains("incomplete"), "{e}");
        let e =
            StagedImages::stage(&img, &["../../etc/passwd".into()], &dir.join("s")).unwrap_err();
        assert!(e.contains("compressed page image"), "{e}");
        fs::remove_dir_all(&dir).unwrap();
    }
}
