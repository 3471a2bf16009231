//! The older generations' page images of a chain, checked in the order CRIU reads them.
//!
//! CRIU reads a chain's inherited pages in the main restore path, one run at a time, each a
//! small synchronous read; from a cold disk, every one waits for the disk. This check walks
//! the same runs in the same order (by address, across the chain's files), a little ahead:
//! it hints the kernel to read a window in advance, reads each run's blocks and checks them.
//! CRIU then finds its pages in the page cache, and the disk sees one stream instead of a
//! second pass over the files. Each block is checked once, the first time a run needs it.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

use super::alongside::{side_file_of, stopped, PendingDigest};
use super::blocks::{BlockDigests, BLOCK};
use super::reads::PageRead;
use super::verify::ImageError;

/// How far ahead of the check the kernel is asked to read.
const WINDOW: u64 = 32 << 20;

/// One pages file checked in part.
struct Part<'a> {
    f: &'a PendingDigest,
    file: File,
    len: u64,
    blocks: BlockDigests,
    done: Vec<bool>,
}

impl Part<'_> {
    fn damaged(&self) -> ImageError {
        ImageError::Digest {
            dir: self.f.dir.clone(),
            file: self.f.file.clone(),
        }
    }

    fn io(&self, source: std::io::Error) -> ImageError {
        ImageError::Io {
            path: self.f.dir.join(&self.f.file),
            source,
        }
    }

    /// Check the blocks `first..end` that are not checked yet, reading each span of them
    /// at once.
    fn check_span(&mut self, first: u64, end: u64, buf: &mut Vec<u8>) -> Result<(), ImageError> {
        let mut b = first;
        while b < end {
            if self.done[b as usize] {
                b += 1;
                continue;
            }
            let start = b;
            while b < end && !self.done[b as usize] {
                b += 1;
            }
            let (from, to) = (start * BLOCK, (b * BLOCK).min(self.len));
            buf.resize((to - from) as usize, 0);
            self.file.read_exact_at(buf, from).map_err(|e| self.io(e))?;
            for (i, block) in buf.chunks(BLOCK as usize).enumerate() {
                let index = start + i as u64;
                if !self.blocks.block_matches(index, block) {
                    return Err(self.damaged());
                }
                self.done[index as usize] = true;
            }
        }
        Ok(())
    }
}

/// Check the blocks of `parts` (each with [`PendingDigest::only`]) that `order` reads, in
/// that order; then any block their ranges name that `order` did not (none, when both come
/// from the same [`super::reads::ChainReads`]).
pub(super) fn check_in_order(
    parts: &[&PendingDigest],
    order: &[PageRead],
    stop: &AtomicBool,
) -> Result<(), ImageError> {
    let mut open = Vec::with_capacity(parts.len());
    let mut by_path: HashMap<PathBuf, usize> = HashMap::new();
    for f in parts {
        let path = f.dir.join(&f.file);
        let io = |source| ImageError::Io {
            path: path.clone(),
            source,
        };
        let file = File::open(&path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        let blocks = side_file_of(f, len)?;
        if let Ok(real) = path.canonicalize() {
            by_path.insert(real, open.len());
        }
        open.push(Part {
            f,
            file,
            len,
            done: vec![false; BlockDigests::count(len) as usize],
            blocks,
        });
    }
    let mut buf = Vec::new();
    let (mut hinted, mut hinted_bytes, mut passed_bytes) = (0usize, 0u64, 0u64);
    for (path, offset, len) in order {
        if stop.load(Ordering::Relaxed) {
            return Err(ImageError::Io {
                path: path.as_ref().clone(),
                source: stopped(),
            });
        }
        while hinted < order.len() && hinted_bytes < passed_bytes + WINDOW {
            let (p, o, l) = &order[hinted];
            if let Some(part) = by_path.get(p.as_ref()).map(|&k| &open[k]) {
                // SAFETY: a hint on a descriptor this function owns; no memory is passed.
                unsafe {
                    libc::posix_fadvise(
                        part.file.as_raw_fd(),
                        *o as libc::off_t,
                        *l as libc::off_t,
                        libc::POSIX_FADV_WILLNEED,
                    );
                }
            }
            hinted_bytes += l;
            hinted += 1;
        }
        passed_bytes += len;
        let Some(&k) = by_path.get(path.as_ref()) else {
            continue;
        };
        let part = &mut open[k];
        if *len == 0 || offset + len > part.len {
            continue;
        }
        part.check_span(offset / BLOCK, (offset + len).div_ceil(BLOCK), &mut buf)?;
    }
    for part in &mut open {
        let Some(ranges) = part.f.only.clone() else {
            continue;
        };
        for (from, to) in ranges {
            if stop.load(Ordering::Relaxed) {
                return Err(part.io(stopped()));
            }
            let to = to.min(part.len);
            if from < to {
                part.check_span(from / BLOCK, to.div_ceil(BLOCK), &mut buf)?;
            }
        }
    }
    Ok(())
}
