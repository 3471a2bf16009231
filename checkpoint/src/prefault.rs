//! Files whose page cache is faulted in before the freeze.
//!
//! Getting fresh page-cache pages (allocation, zeroing, and on a VM the hypervisor backing
//! each guest page anew) costs more than copying data into them. Whatever cryo writes while
//! the container is frozen (the page images, the rootfs changeset) is therefore written into
//! files sized and faulted in beforehand, while the container still runs.
//!
//! How the pages are allocated matters as much as when. Faulting a fresh file in through its
//! mapping (readahead) or writing it in large chunks asks the page allocator for large folios,
//! which it carves out of whole free pageblocks; on a VM with free page reporting (this one:
//! Firecracker, `page_reporting_order=11`) those are exactly the blocks already handed back to
//! the host, so every page costs a hypervisor fault: 0.4–2.2 s for 512 MiB after another
//! large process had exited, against ~0.1 s otherwise. Writing 64 KiB at a time (as CRIU's own
//! splice writes do) keeps each folio small enough to come from the recently freed, still
//! backed fragments (`nr_free_pages_blocks` in /proc/vmstat stays put).

use std::fs::File;
use std::sync::atomic::{AtomicBool, Ordering};

use memmap2::{Advice, MmapMut};

/// Fill `file` (new and empty) with `bytes` of zeros, or as many as are written before `stop` is
/// set, and map every page of that, writable. Returns the mapping, or `None` (the file cut back
/// to empty) where nothing was filled or the file system cannot map or populate it: writing is
/// then only slower, never wrong.
pub fn map_prefaulted(file: &File, bytes: u64, stop: &AtomicBool) -> Option<MmapMut> {
    let (written, filled) = match fill_with_zeros(file, bytes, stop) {
        Ok(n) => (n, n / PAGE * PAGE),
        Err(_) => (0, 0),
    };
    if filled == 0 || (filled != written && resize(file, filled).is_err()) {
        let _ = file.set_len(0);
        return None;
    }
    // SAFETY: callers pass a file they just created under a private name; nothing else
    // truncates it while the mapping lives (they drop the mapping before cutting the file).
    let mapped = unsafe { MmapMut::map_mut(file) };
    match mapped {
        Ok(map) if map.advise(Advice::PopulateWrite).is_ok() => Some(map),
        _ => {
            let _ = file.set_len(0);
            None
        }
    }
}

const PAGE: u64 = 4096;

/// Set `file`'s size to `len`, unless it has that size already. Why not always: XFS writes
/// back every page of a file that is not on disk yet whenever its size is set past what is on
/// disk, even to the size it has (its guard against files of zeros after a crash). For a
/// staged file about to be replaced, that would write the whole dump to the disk.
pub fn resize(file: &File, len: u64) -> std::io::Result<()> {
    if file.metadata()?.len() != len {
        file.set_len(len)?;
    }
    Ok(())
}

/// The write size that keeps page-cache folios small (see the module doc). Also the buffer
/// size of cryo's other writers of fresh files: the rootfs changeset, decompressed page
/// images, the files a restore extracts.
pub const WRITE_CHUNK: usize = 64 << 10;

/// A writer that passes at most [`WRITE_CHUNK`] bytes per call to the file below it. Wraps
/// the fresh files cryo fills at checkpoint and restore: a `BufWriter` alone still passes a
/// larger write (zstd's 128 KiB blocks, a 1 MiB copy buffer) straight through.
#[derive(Debug)]
pub struct SmallWrites<W>(pub W);

impl<W: std::io::Write> std::io::Write for SmallWrites<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(&buf[..buf.len().min(WRITE_CHUNK)])
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// Give `file` (new and empty) `bytes` of zeroed page cache through the write path,
/// `WRITE_CHUNK` at a time. On failure (no space) the file is cut back to empty.
pub fn fill_page_cache(file: &File, bytes: u64) -> bool {
    let filled = fill_with_zeros(file, bytes, &AtomicBool::new(false)).is_ok_and(|n| n == bytes);
    if !filled {
        let _ = file.set_len(0);
    }
    filled
}

/// Write zeros up to `bytes`, or until `stop` is set; how many were written.
fn fill_with_zeros(file: &File, bytes: u64, stop: &AtomicBool) -> std::io::Result<u64> {
    use std::os::unix::fs::FileExt;
    let zeros = vec![0u8; WRITE_CHUNK];
    let mut off = 0u64;
    while off < bytes && !stop.load(Ordering::Relaxed) {
        let n = (bytes - off).min(WRITE_CHUNK as u64) as usize;
        file.write_all_at(&zeros[..n], off)?;
        off += n as u64;
    }
    Ok(off)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn maps_the_whole_file_or_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let f = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(dir.path().join("f"))
            .unwrap();
        let go = AtomicBool::new(false);
        assert!(map_prefaulted(&f, 0, &go).is_none());
        let map = map_prefaulted(&f, 3 * 4096, &go).unwrap();
        assert_eq!(map.len(), 3 * 4096);
        assert_eq!(f.metadata().unwrap().len(), 3 * 4096);
        assert!(map.iter().all(|&b| b == 0));
    }

    #[test]
    fn a_stopped_fill_maps_nothing_and_leaves_the_file_empty() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let f = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .unwrap();
        assert!(map_prefaulted(&f, 3 * 4096, &AtomicBool::new(true)).is_none());
        assert_eq!(f.metadata().unwrap().len(), 0);
    }

    #[test]
    fn fills_with_zeros_to_the_byte_across_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let f = File::create_new(&path).unwrap();
        let bytes = 2 * WRITE_CHUNK as u64 + 123;
        assert!(fill_page_cache(&f, bytes));
        let content = std::fs::read(&path).unwrap();
        assert_eq!(content.len() as u64, bytes);
        assert!(content.iter().all(|&b| b == 0));
    }

    #[test]
    fn small_writes_split_what_they_pass_on() {
        use std::io::Write;
        struct Sizes(Vec<usize>);
        impl Write for Sizes {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.push(buf.len());
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let mut w = SmallWrites(Sizes(Vec::new()));
        w.write_all(&vec![7u8; 2 * WRITE_CHUNK + 5]).unwrap();
        assert_eq!(w.0 .0, vec![WRITE_CHUNK, WRITE_CHUNK, 5]);
    }
}
