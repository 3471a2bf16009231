//! The page images' digests, checked while CRIU restores.
//!
//! A restore used to hash every file before CRIU started; for big containers that is the
//! biggest part of the image and a fifth of the restore. Page bytes are only ever copied into
//! the memory of restored tasks, so their check can run beside CRIU as long as it ends before
//! any of those tasks runs: the restore waits for it at CRIU's `post-restore` notification
//! (every task restored, none resumed) and answers with an error when a digest differs, which
//! makes CRIU kill the tasks and fail. Everything else (the manifest, the pagemaps, the
//! rootfs changeset, CRIU's other images) is still verified before anything is touched:
//! those steer what CRIU and cryo do, page bytes do not. Of a store chain's older
//! generations, only the blocks the restore reads are checked ([`super::reads`],
//! `image/in_order.rs`); every other pages file is hashed whole.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use super::blocks::{blocks_name, BlockDigests};
use super::in_order::check_in_order;
use super::reads::{PageRead, Ranges};
use super::verify::ImageError;

/// Hashed per step, so that a stop is seen within one step.
const STEP: usize = 32 << 20;
/// Steps asked for ahead of the one being hashed: in a fragmented file (a store generation
/// sharing extents) the kernel's own readahead keeps too few reads in flight.
const AHEAD: usize = 2;

/// A file whose size was checked and whose digest is still to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingDigest {
    /// The image directory (a generation of a chain, for incremental images).
    pub dir: PathBuf,
    /// The file name in it.
    pub file: String,
    /// BLAKE3 the manifest records, hex.
    pub blake3: String,
    /// Its size, which the manifest records and was checked.
    pub size: u64,
    /// The manifest lists (so verification checked) its block digests ([`super::blocks`]).
    pub blocks_listed: bool,
    /// Only these byte ranges are read by the restore, so only the blocks under them are
    /// checked (set by [`super::reads::narrow_to_reads`]); `None`: the whole file.
    pub only: Option<Ranges>,
}

/// Whether a name is a page image whose check may wait for CRIU's `post-restore`.
pub fn checked_alongside(name: &str) -> bool {
    name.starts_with("pages-") && name.ends_with(".img")
}

/// The check running in a thread of its own. Dropped unfinished, it stops and is joined.
pub struct AlongsideCheck {
    stop: Arc<AtomicBool>,
    work: Work,
    unread_bytes: u64,
}

enum Work {
    Thread(JoinHandle<Result<f64, ImageError>>),
    /// No thread could be started: the files were checked in [`AlongsideCheck::start`].
    Checked(Result<f64, ImageError>),
    Done,
}

/// What a finished check took.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AlongsideTimes {
    /// Milliseconds the hashing took, from its start.
    pub hashed_ms: f64,
    /// Milliseconds the caller waited for it in [`AlongsideCheck::finish`].
    pub waited_ms: f64,
    /// Bytes of page images left unchecked because the restore does not read them.
    pub unread_bytes: u64,
}

impl AlongsideCheck {
    /// Start hashing `files`; those checked in part ([`PendingDigest::only`]) in the order of
    /// `order`, the restore's reads ([`super::reads::ChainReads::in_order`]), before the
    /// others.
    pub fn start(files: Vec<PendingDigest>, order: Vec<PageRead>) -> Self {
        let unread_bytes = files
            .iter()
            .filter_map(|f| {
                let ranges = f.only.as_ref()?;
                Some(f.size - ranges.iter().map(|(a, b)| b - a).sum::<u64>().min(f.size))
            })
            .sum();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let work = Arc::new((files, order));
        let theirs = work.clone();
        let work = match std::thread::Builder::new()
            .name("cryo-pages-check".into())
            .spawn(move || check_all(&theirs.0, &theirs.1, &flag))
        {
            Ok(t) => Work::Thread(t),
            Err(e) => {
                tracing::warn!("cannot start the page check thread ({e}): checking before CRIU");
                Work::Checked(check_all(&work.0, &work.1, &stop))
            }
        };
        Self {
            stop,
            work,
            unread_bytes,
        }
    }

    /// Wait for the check: its times, or the first file that differs.
    pub fn finish(mut self) -> Result<AlongsideTimes, ImageError> {
        let waiting = Instant::now();
        let hashed_ms = match std::mem::replace(&mut self.work, Work::Done) {
            Work::Thread(t) => t.join().map_err(|_| ImageError::Io {
                path: PathBuf::from("(page images)"),
                source: std::io::Error::other("the page check thread panicked"),
            })??,
            Work::Checked(r) => r?,
            Work::Done => 0.0,
        };
        Ok(AlongsideTimes {
            hashed_ms,
            waited_ms: waiting.elapsed().as_secs_f64() * 1000.0,
            unread_bytes: self.unread_bytes,
        })
    }
}

impl Drop for AlongsideCheck {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Work::Thread(t) = std::mem::replace(&mut self.work, Work::Done) {
            let _ = t.join();
        }
    }
}

fn check_all(
    files: &[PendingDigest],
    order: &[PageRead],
    stop: &AtomicBool,
) -> Result<f64, ImageError> {
    let started = Instant::now();
    let (parts, whole): (Vec<&PendingDigest>, Vec<&PendingDigest>) =
        files.iter().partition(|f| f.only.is_some());
    if !parts.is_empty() {
        check_in_order(&parts, order, stop)?;
    }
    for f in whole {
        check_one(f, stop)?;
    }
    Ok(started.elapsed().as_secs_f64() * 1000.0)
}

fn check_one(f: &PendingDigest, stop: &AtomicBool) -> Result<(), ImageError> {
    let path = f.dir.join(&f.file);
    let io = |source| ImageError::Io {
        path: path.clone(),
        source,
    };
    let file = std::fs::File::open(&path).map_err(io)?;
    let len = file.metadata().map_err(io)?.len();
    if !check_whole(&file, len, &f.blake3, stop).map_err(io)? {
        return Err(ImageError::Digest {
            dir: f.dir.clone(),
            file: f.file.clone(),
        });
    }
    Ok(())
}

/// The block digests of `f` (a file of `len` bytes). The side file was verified with the
/// manifest; its blocks must also add up to the digest of this very file, or they describe
/// another one.
pub(super) fn side_file_of(f: &PendingDigest, len: u64) -> Result<BlockDigests, ImageError> {
    let side = f.dir.join(blocks_name(&f.file));
    let bytes = std::fs::read(&side).map_err(|source| ImageError::Io {
        path: side.clone(),
        source,
    })?;
    BlockDigests::decode(&bytes)
        .ok()
        .filter(|b| b.len == len)
        .filter(|b| b.root().is_some_and(|r| r.to_hex().as_str() == f.blake3))
        .ok_or_else(|| ImageError::Digest {
            dir: f.dir.clone(),
            file: blocks_name(&f.file),
        })
}

pub(super) fn stopped() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::Interrupted,
        "the page check was stopped",
    )
}

/// Whether the whole file hashes to `blake3`.
fn check_whole(
    file: &std::fs::File,
    len: u64,
    blake3: &str,
    stop: &AtomicBool,
) -> std::io::Result<bool> {
    let mut h = blake3::Hasher::new();
    if len > 0 {
        // SAFETY: the mapping is read only and dropped before this function returns. A file
        // changed under it changes the bytes hashed, which the digest comparison then
        // reports; one truncated under it could fault, and image files are cryo's own,
        // written privately and never truncated after publication.
        let map = unsafe { memmap2::Mmap::map(file) }?;
        let _ = map.advise(memmap2::Advice::Sequential);
        for (i, chunk) in map.chunks(STEP).enumerate() {
            if stop.load(Ordering::Relaxed) {
                return Err(stopped());
            }
            let next = ((i + 1) * STEP).min(map.len());
            let ahead = (AHEAD * STEP).min(map.len() - next);
            if ahead > 0 {
                let _ = map.advise_range(memmap2::Advice::WillNeed, next, ahead);
            }
            h.update_rayon(chunk);
        }
    }
    Ok(h.finalize().to_hex().as_str() == blake3)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::image::digest::digest_file;

    fn pending(dir: &std::path::Path, name: &str, data: &[u8]) -> PendingDigest {
        std::fs::write(dir.join(name), data).unwrap();
        PendingDigest {
            dir: dir.to_path_buf(),
            file: name.into(),
            blake3: digest_file(&dir.join(name)).unwrap().1,
            size: data.len() as u64,
            blocks_listed: false,
            only: None,
        }
    }

    #[test]
    fn good_files_pass_and_report_their_time() {
        let d = tempfile::tempdir().unwrap();
        let big: Vec<u8> = (0..(STEP * 2 + 4099)).map(|i| (i % 251) as u8).collect();
        let files = vec![
            pending(d.path(), "pages-1.img", &big),
            pending(d.path(), "pages-2.img", b""),
        ];
        let t = AlongsideCheck::start(files, Vec::new()).finish().unwrap();
        assert!(t.hashed_ms >= 0.0 && t.waited_ms >= 0.0);
    }

    #[test]
    fn one_flipped_byte_names_the_file() {
        let d = tempfile::tempdir().unwrap();
        let mut data = vec![5u8; STEP + 10];
        let good = pending(d.path(), "pages-1.img", &data);
        let bad = pending(d.path(), "pages-2.img", &data);
        data[STEP + 3] ^= 1;
        std::fs::write(d.path().join("pages-2.img"), &data).unwrap();
        let e = AlongsideCheck::start(vec![good, bad], Vec::new())
            .finish()
            .unwrap_err();
        assert!(
            matches!(&e, ImageError::Digest { file, .. } if file == "pages-2.img"),
            "{e}"
        );
    }

    #[test]
    fn a_vanished_file_is_an_error_naming_it() {
        let d = tempfile::tempdir().unwrap();
        let p = pending(d.path(), "pages-1.img", b"abc");
        std::fs::remove_file(d.path().join("pages-1.img")).unwrap();
        let e = AlongsideCheck::start(vec![p], Vec::new())
            .finish()
            .unwrap_err();
        assert!(e.to_string().contains("pages-1.img"), "{e}");
    }

    #[test]
    fn a_stopped_check_never_passes() {
        let d = tempfile::tempdir().unwrap();
        let p = pending(d.path(), "pages-1.img", &[1u8; 4096]);
        let stop = AtomicBool::new(true);
        let e = check_one(&p, &stop).unwrap_err();
        assert!(e.to_string().contains("stopped"), "{e}");
    }

    #[test]
    fn only_page_images_wait() {
        assert!(checked_alongside("pages-1.img"));
        assert!(checked_alongside("pages-12.img"));
        assert!(!checked_alongside("pagemap-1.img"));
        assert!(!checked_alongside("pages-1.img.zst"));
        assert!(!checked_alongside("rootfs-diff.tar.zst"));
    }
}
