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

/// The zstd frame header flag saying a checksum of the content ends the frame.
const ZSTD_CHECKSUM_FLAG: u8 = 0x04;

/// A changeset's tar stream, read from a raw or a zstd-compressed file (told apart by the
/// zstd magic number, not the file name). A zstd changeset must be one frame that carries a
/// content checksum; the checksum is checked when the frame's end is read, so a reader must
/// [`finish`](ChangesetStream::finish) the stream, not stop at the tar's end-of-archive.
pub(crate) struct ChangesetStream {
    inner: Inner,
}

enum Inner {
    Raw(BufReader<File>),
    Zstd(zstd::stream::read::Decoder<'static, BufReader<File>>),
}

impl ChangesetStream {
    /// Read a changeset from `file` (at its start), `path` naming it in errors.
    pub(crate) fn new(file: File, path: &Path) -> Result<Self> {
        let mut r = BufReader::with_capacity(1 << 20, file);
        let head = r.fill_buf().map_err(io_err("read", path))?;
        if !head.starts_with(&ZSTD_MAGIC) {
            return Ok(ChangesetStream {
                inner: Inner::Raw(r),
            });
        }
        let descriptor = head.get(ZSTD_MAGIC.len()).copied().unwrap_or(0);
        if descriptor & ZSTD_CHECKSUM_FLAG == 0 {
            return Err(RootfsError::Refused {
                archive: path.to_path_buf(),
                entry: "(zstd frame header)".into(),
                reason: "the zstd frame carries no content checksum, so damage could not be \
                         told: cryo writes every changeset with one"
                    .into(),
            });
        }
        let d = zstd::stream::read::Decoder::with_buffer(r)
            .map_err(io_err("start zstd for", path))?
            .single_frame();
        Ok(ChangesetStream {
            inner: Inner::Zstd(d),
        })
    }

    /// Read what follows the tar's end-of-archive to the end of the file: only zeros (tar
    /// padding) may follow, and a zstd frame is read to its end, where its checksum is
    /// checked; nothing may follow the frame.
    pub(crate) fn finish(mut self) -> Result<(), String> {
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = self
                .read(&mut buf)
                .map_err(|e| format!("corrupt or truncated stream after the archive: {e}"))?;
            if n == 0 {
                break;
            }
            if buf[..n].iter().any(|b| *b != 0) {
                return Err("data after the end-of-archive blocks".into());
            }
        }
        if let Inner::Zstd(d) = self.inner {
            let mut rest = d.finish();
            let more = rest
                .fill_buf()
                .map_err(|e| format!("reading after the zstd frame: {e}"))?;
            if !more.is_empty() {
                return Err("data after the zstd frame".into());
            }
        }
        Ok(())
    }
}

impl Read for ChangesetStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match &mut self.inner {
            Inner::Raw(r) => r.read(buf),
            Inner::Zstd(d) => d.read(buf),
        }
    }
}

/// Open a changeset for reading, raw tar or zstd-compressed tar alike (a zstd one must carry
/// its frame checksum, which is checked when the frame's end is read: a caller that stops at
/// the tar's end-of-archive has not checked it; the validation and the apply read to the end).
pub fn open_changeset(path: &Path) -> Result<Box<dyn Read + Send>> {
    let f = File::open(path).map_err(io_err("open", path))?;
    Ok(Box::new(ChangesetStream::new(f, path)?))
}

/// Bytes the tar reader may consume for one entry's headers (its long names, PAX records,
/// sparse map): it holds them in memory, so a hostile archive must not make them huge.
pub(crate) const HEADER_BUDGET: u64 = 16 << 20;

/// A reader that counts the bytes it delivers, remembers whether its source ran dry, and
/// refuses to deliver more than a budget while the tar reader looks for the next entry.
///
/// The tar crate expands an old-GNU sparse entry's holes from `io::repeat(0)` without touching
/// the stream, so a read that did not advance the count returned hole, not data. And a tar
/// reader that hit end-of-file (instead of the two zero blocks that end an archive) read a
/// truncated archive, even when the cut falls exactly between entries.
pub(crate) struct Counting<R> {
    inner: R,
    count: Rc<Cell<u64>>,
    hit_eof: Rc<Cell<bool>>,
    limit: Rc<Cell<u64>>,
}

/// Shared views of a [`Counting`] reader's state, usable while the archive borrows it.
#[derive(Clone)]
pub(crate) struct Tally {
    count: Rc<Cell<u64>>,
    hit_eof: Rc<Cell<bool>>,
    limit: Rc<Cell<u64>>,
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

    /// From now on deliver at most [`HEADER_BUDGET`] bytes (call before asking for the next
    /// entry).
    pub(crate) fn budget_headers(&self) {
        self.limit.set(self.count().saturating_add(HEADER_BUDGET));
    }

    /// No limit (call once an entry is there, before reading its data).
    pub(crate) fn unlimited(&self) {
        self.limit.set(u64::MAX);
    }
}

impl<R: Read> Counting<R> {
    /// Wrap `inner`; the [`Tally`] observes it.
    pub(crate) fn new(inner: R) -> (Self, Tally) {
        let t = Tally {
            count: Rc::new(Cell::new(0)),
            hit_eof: Rc::new(Cell::new(false)),
            limit: Rc::new(Cell::new(u64::MAX)),
        };
        let c = Counting {
            inner,
            count: t.count.clone(),
            hit_eof: t.hit_eof.clone(),
            limit: t.limit.clone(),
        };
        (c, t)
    }

    /// The wrapped reader.
    pub(crate) fn into_inner(self) -> R {
        self.inner
    }
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self.limit.get().saturating_sub(self.count.get());
        if left == 0 && !buf.is_empty() {
            return Err(std::io::Error::other(format!(
                "one entry's headers (long names, PAX records) exceed {HEADER_BUDGET} bytes"
            )));
        }
        let max = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..max])?;
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
