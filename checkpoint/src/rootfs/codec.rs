//! Compression after the thaw, and reading a changeset back (raw or zstd).

use std::cell::Cell;
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Read};
use std::path::Path;
use std::rc::Rc;

use super::{io_err, Result, RootfsError};
use crate::prefault::{SmallWrites, WRITE_CHUNK};

/// The four bytes every zstd frame starts with.
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

/// Compress the raw changeset `raw` into `out` with multi-threaded zstd at `level`, using
/// `threads` worker threads (0: compress on the calling thread). Called after the container is
/// thawed. The frame carries a checksum so corruption is caught at restore. Returns the size
/// of `out`. It is not synced here: the checkpoint syncs the image's file system once, at
/// its end, together with everything else it wrote.
pub fn compress_zstd(raw: &Path, out: &Path, level: i32, threads: u32) -> Result<u64> {
    let run = || -> Result<u64> {
        let mut input = File::open(raw).map_err(io_err("open", raw))?;
        let output = File::create(out).map_err(io_err("create", out))?;
        let mut enc = zstd::stream::Encoder::new(
            BufWriter::with_capacity(WRITE_CHUNK, SmallWrites(output)),
            level,
        )
        .map_err(io_err("start zstd for", out))?;
        enc.include_checksum(true)
            .map_err(io_err("zstd checksum for", out))?;
        enc.multithread(threads)
            .map_err(io_err("zstd worker threads for", out))?;
        std::io::copy(&mut input, &mut enc).map_err(io_err("compress", raw))?;
        let w = enc.finish().map_err(io_err("finish zstd frame of", out))?;
        let SmallWrites(f) = w.into_inner().map_err(|e| RootfsError::Io {
            step: "flush",
            path: out.to_path_buf(),
            source: e.into_error(),
        })?;
        Ok(f.metadata().map_err(io_err("stat", out))?.len())
    };
    let res = run();
    if res.is_err() {
        // A partial .zst must not pass for a snapshot.
        let _ = std::fs::remove_file(out);
    }
    res
}

/// Open a changeset for reading, raw tar or zstd-compressed tar alike (told apart by the zstd
/// magic number, not the file name).
pub fn open_changeset(path: &Path) -> Result<Box<dyn Read + Send>> {
    let f = File::open(path).map_err(io_err("open", path))?;
    let mut r = BufReader::with_capacity(1 << 20, f);
    let head = r.fill_buf().map_err(io_err("read", path))?;
    if head.starts_with(&ZSTD_MAGIC) {
        let d = zstd::stream::Decoder::with_buffer(r).map_err(io_err("start zstd for", path))?;
        Ok(Box::new(d))
    } else {
        Ok(Box::new(r))
    }
}

/// A reader that counts the bytes it delivers and remembers whether its source ran dry.
///
/// The tar crate expands a sparse entry's holes from `io::repeat(0)` without touching the
/// stream, so a read that did not advance the count returned hole, not data. And a tar reader
/// that hit end-of-file (instead of the two zero blocks that end an archive) read a truncated
/// archive, even when the cut falls exactly between entries.
pub(crate) struct Counting<R> {
    inner: R,
    count: Rc<Cell<u64>>,
    hit_eof: Rc<Cell<bool>>,
}

/// Shared views of a [`Counting`] reader's state, usable while the archive borrows it.
#[derive(Clone)]
pub(crate) struct Tally {
    count: Rc<Cell<u64>>,
    hit_eof: Rc<Cell<bool>>,
}

impl Tally {
    /// Bytes delivered so far.
    pub(crate) fn count(&self) -> u64 {
        self.count.get()
    }

    /// Whether a read found the end of the stream.
    pub(crate) fn hit_eof(&self) -> bool {
        self.hit_eof.get()
    }
}

impl<R: Read> Counting<R> {
    /// Wrap `inner`; the [`Tally`] observes it.
    pub(crate) fn new(inner: R) -> (Self, Tally) {
        let t = Tally {
            count: Rc::new(Cell::new(0)),
            hit_eof: Rc::new(Cell::new(false)),
        };
        let c = Counting {
            inner,
            count: t.count.clone(),
            hit_eof: t.hit_eof.clone(),
        };
        (c, t)
    }
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 && !buf.is_empty() {
            self.hit_eof.set(true);
        }
        self.count.set(self.count.get() + n as u64);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn zstd_round_trip_is_transparent() {
        let t = tempfile::tempdir().unwrap();
        let raw = t.path().join("a.tar");
        let data: Vec<u8> = (0..300_000u32)
            .flat_map(|i| (i % 251).to_le_bytes())
            .collect();
        std::fs::write(&raw, &data).unwrap();
        let zst = t.path().join("a.tar.zst");
        let n = compress_zstd(&raw, &zst, 3, 2).unwrap();
        assert!(n > 0 && n < data.len() as u64);
        for p in [&raw, &zst] {
            let mut back = Vec::new();
            open_changeset(p).unwrap().read_to_end(&mut back).unwrap();
            assert_eq!(back, data, "{}", p.display());
        }
        // A cut frame is an error, never a short clean read.
        let bytes = std::fs::read(&zst).unwrap();
        std::fs::write(&zst, &bytes[..bytes.len() / 2]).unwrap();
        let mut back = Vec::new();
        assert!(open_changeset(&zst)
            .unwrap()
            .read_to_end(&mut back)
            .is_err());
    }
}
