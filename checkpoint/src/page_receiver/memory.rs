//! Page images staged in anonymous memory and written to disk with `O_DIRECT`.
//!
//! Staging in the page cache ([`super::staging::stage`]) has a cliff: once the staged zeros
//! pass the dirty background threshold (a tenth of memory by default) the flusher writes them
//! out, the pages turn clean, and every page the freeze then copies takes a write fault that
//! is throttled at the disk's speed. Anonymous memory is never written back. Before the freeze
//! it is faulted in on every core, as far as the time and the memory allow; inside the freeze
//! the pages are copied into it; a [`Writer`] thread sends each filled piece to the file with
//! `O_DIRECT` as soon as it is filled (no second copy in the page cache, the memory handed
//! back piece by piece) and hashes it on the way, so the image is never read back for its
//! digest.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;

use memmap2::{Advice, MmapMut, MmapRaw, UncheckedAdvice};

use super::ReceiveError;
use crate::image::blocks::{BlockHasher, HashedPages};
use crate::image::digest::FileRecord;

/// Memory is faulted in this much at a time, so that a stop is seen quickly.
const POPULATE_CHUNK: usize = 16 << 20;

/// The receiver hands the writer a piece once this much of a task's memory is filled.
pub const PIECE: u64 = 8 << 20;

/// The buffer for hashing what the receiver wrote to a file itself.
const READ_BACK: usize = 1 << 20;

/// Anonymous memory for one task's pages.
#[derive(Debug, Clone)]
pub struct Memory(Arc<MmapRaw>);

impl Memory {
    /// Reserve `bytes` of anonymous memory and fault in as much of it as possible, on every
    /// core, until `stop` is set. Returns the memory and how many bytes were faulted in; the
    /// rest is faulted in when the pages arrive. `None` if it cannot be mapped at all.
    pub fn stage(bytes: u64, stop: &AtomicBool) -> Option<(Self, u64)> {
        let len = usize::try_from(bytes).ok().filter(|&l| l > 0)?;
        // Small pages: huge ones were not faster to fault in here and made the freeze longer
        // (they come from whole free blocks, the ones a VM hands back to its host).
        let map: MmapRaw = MmapMut::map_anon(len).ok()?.into();
        let next = AtomicUsize::new(0);
        let populated = AtomicU64::new(0);
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        std::thread::scope(|s| {
            for _ in 0..threads {
                s.spawn(|| loop {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let at = next.fetch_add(1, Ordering::Relaxed) * POPULATE_CHUNK;
                    if at >= len {
                        break;
                    }
                    let n = POPULATE_CHUNK.min(len - at);
                    if map.advise_range(Advice::PopulateWrite, at, n).is_err() {
                        break;
                    }
                    populated.fetch_add(n as u64, Ordering::Relaxed);
                });
            }
        });
        Some((Self(Arc::new(map)), populated.into_inner()))
    }

    /// The length in bytes.
    pub fn len(&self) -> u64 {
        self.0.len() as u64
    }

    /// Whether it has no bytes.
    pub fn is_empty(&self) -> bool {
        self.0.len() == 0
    }

    /// Fill the bytes `from..to` from `src`.
    ///
    /// # Safety
    /// Nothing else may access `from..to` meanwhile: the receiver fills a range before it
    /// hands it to the writer and never touches it again.
    pub unsafe fn fill_from<R: std::io::Read>(
        &self,
        from: u64,
        to: u64,
        src: &mut R,
    ) -> std::io::Result<()> {
        assert!(from <= to && to <= self.len(), "a range inside the memory");
        // SAFETY: the range lies inside the mapping (asserted), which lives as long as
        // `self`; exclusive access is the caller's promise.
        let into = unsafe {
            std::slice::from_raw_parts_mut(
                self.0.as_mut_ptr().add(from as usize),
                (to - from) as usize,
            )
        };
        src.read_exact(into)
    }

    /// The bytes `from..to`, filled.
    ///
    /// # Safety
    /// Nobody may write `from..to` while the slice lives (the writer reads only what the
    /// receiver handed over).
    unsafe fn filled(&self, from: u64, to: u64) -> &[u8] {
        assert!(from <= to && to <= self.len(), "a range inside the memory");
        // SAFETY: inside the mapping (asserted); no writer, as the caller promises.
        unsafe {
            std::slice::from_raw_parts(self.0.as_ptr().add(from as usize), (to - from) as usize)
        }
    }

    /// Give the memory of `from..to` back.
    ///
    /// # Safety
    /// Nobody reads or writes `from..to` again (it would read zeros).
    unsafe fn release(&self, from: u64, to: u64) {
        // SAFETY: the caller promises the range is dead; a failure only keeps the memory.
        let _ = unsafe {
            self.0.unchecked_advise_range(
                UncheckedAdvice::DontNeed,
                from as usize,
                (to - from) as usize,
            )
        };
    }
}

/// What the receiver tells the writer, in order.
#[derive(Debug)]
pub enum Piece {
    /// A pages file `path` begins (key: its pages id); its first bytes go to `memory`.
    Open {
        /// The pages id.
        key: u32,
        /// The file (already created).
        path: PathBuf,
        /// Where the receiver puts its first `memory.len()` bytes.
        memory: Option<Memory>,
    },
    /// Bytes `from..to` are filled in the file's memory: write them.
    InMemory {
        /// The pages id.
        key: u32,
        /// First byte.
        from: u64,
        /// End.
        to: u64,
    },
    /// Bytes `from..to` were written to the file by the receiver: only hash them.
    InFile {
        /// The pages id.
        key: u32,
        /// First byte.
        from: u64,
        /// End.
        to: u64,
    },
    /// The file is complete at `len` bytes.
    End {
        /// The pages id.
        key: u32,
        /// Its final length.
        len: u64,
    },
}

/// The thread that writes staged memory to the pages files and hashes them.
#[derive(Debug)]
pub struct Writer {
    tx: Option<Sender<Piece>>,
    abandon: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<HashMap<u32, HashedPages>, ReceiveError>>>,
}

impl Writer {
    /// Start the thread.
    pub fn start() -> Result<Self, ReceiveError> {
        let (tx, rx) = channel();
        let abandon = Arc::new(AtomicBool::new(false));
        let flag = abandon.clone();
        let thread = std::thread::Builder::new()
            .name("cryo-pages-out".into())
            .spawn(move || {
                lower_priority();
                write_pieces(&rx, &flag)
            })
            .map_err(|e| ReceiveError::Thread(e.to_string()))?;
        Ok(Self {
            tx: Some(tx),
            abandon,
            thread: Some(thread),
        })
    }

    /// Hand over a piece. A writer that failed is told nothing more: its error comes with
    /// [`Writer::finish`], while the receiver goes on taking CRIU's pages.
    pub fn send(&self, piece: Piece) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(piece);
        }
    }

    /// Wait until every piece is written; the digests of the files, by pages id (each file's
    /// `name` is left empty for the caller).
    pub fn finish(mut self) -> Result<HashMap<u32, HashedPages>, ReceiveError> {
        self.tx = None;
        let thread = self
            .thread
            .take()
            .ok_or_else(|| ReceiveError::Thread("the page writer already ended".into()))?;
        thread
            .join()
            .map_err(|_| ReceiveError::Thread("the page writer panicked".into()))?
    }
}

impl Drop for Writer {
    /// An unfinished writer (the dump failed) stops at its next piece.
    fn drop(&mut self) {
        self.abandon.store(true, Ordering::Relaxed);
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One file being written.
struct Out {
    path: PathBuf,
    /// The file opened with `O_DIRECT` (the buffered one where that is refused).
    direct: File,
    buffered: File,
    memory: Option<Memory>,
    hasher: BlockHasher,
    hashed: u64,
    /// For reading back what the receiver wrote itself (allocated on first use: most files
    /// have none).
    read_back: Vec<u8>,
}

/// The writer (and the hashing threads it starts, which inherit this) yields the CPU to CRIU
/// and the receiver inside the freeze, and to the container after it: its work is not urgent,
/// only its end is awaited.
fn lower_priority() {
    // SAFETY: plain syscalls on this thread's own id; a failure only keeps the priority.
    unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, 19);
    }
}

fn write_pieces(
    rx: &Receiver<Piece>,
    abandon: &AtomicBool,
) -> Result<HashMap<u32, HashedPages>, ReceiveError> {
    let mut open: HashMap<u32, Out> = HashMap::new();
    let mut done = HashMap::new();
    for piece in rx {
        if abandon.load(Ordering::Relaxed) {
            return Err(ReceiveError::Thread("the dump was abandoned".into()));
        }
        match piece {
            Piece::Open { key, path, memory } => {
                open.insert(key, Out::open(path, memory)?);
            }
            Piece::InMemory { key, from, to } => out(&mut open, key)?.write_memory(from, to)?,
            Piece::InFile { key, from, to } => out(&mut open, key)?.hash_file(from, to)?,
            Piece::End { key, len } => {
                let o = open.remove(&key).ok_or_else(|| unknown(key))?;
                done.insert(key, o.end(len)?);
            }
        }
    }
    Ok(done)
}

fn out(open: &mut HashMap<u32, Out>, key: u32) -> Result<&mut Out, ReceiveError> {
    open.get_mut(&key).ok_or_else(|| unknown(key))
}

fn unknown(key: u32) -> ReceiveError {
    ReceiveError::Protocol(format!(
        "the page writer got a piece of pages file {key}, which was never opened"
    ))
}

impl Out {
    fn open(path: PathBuf, memory: Option<Memory>) -> Result<Self, ReceiveError> {
        let buffered = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(ReceiveError::io("open", &path))?;
        let direct = match OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(&path)
        {
            Ok(f) => f,
            // A file system without O_DIRECT (tmpfs before 6.6): through the page cache.
            Err(_) => buffered
                .try_clone()
                .map_err(ReceiveError::io("open", &path))?,
        };
        Ok(Self {
            path,
            direct,
            buffered,
            memory,
            hasher: BlockHasher::default(),
            hashed: 0,
            read_back: Vec::new(),
        })
    }

    /// Write and hash `from..to` of the memory (side by side), then give that memory back.
    fn write_memory(&mut self, from: u64, to: u64) -> Result<(), ReceiveError> {
        self.in_order(from)?;
        let memory = self.memory.clone().ok_or_else(|| {
            ReceiveError::Protocol("the page writer got memory for a file without any".into())
        })?;
        // SAFETY: the receiver filled from..to before handing it over and does not touch
        // it again; only this thread reads it, and releases it after the last read.
        let data = unsafe { memory.filled(from, to) };
        let (written, hasher) = std::thread::scope(|s| {
            let hashing = s.spawn(|| {
                let mut h = std::mem::take(&mut self.hasher);
                h.update(data);
                h
            });
            let written = write_direct(&self.direct, &self.buffered, data, from);
            (written, hashing.join())
        });
        self.hasher = hasher.map_err(|_| ReceiveError::Thread("hashing panicked".into()))?;
        written.map_err(ReceiveError::io("write", &self.path))?;
        self.hashed = to;
        // SAFETY: the range was read for the last time just above.
        unsafe { memory.release(from, to) };
        Ok(())
    }

    /// Hash `from..to`, which the receiver wrote to the file itself.
    fn hash_file(&mut self, from: u64, to: u64) -> Result<(), ReceiveError> {
        self.in_order(from)?;
        if self.read_back.is_empty() {
            self.read_back = vec![0u8; READ_BACK];
        }
        let buf = &mut self.read_back;
        let mut at = from;
        while at < to {
            let n = buf.len().min((to - at) as usize);
            self.buffered
                .read_exact_at(&mut buf[..n], at)
                .map_err(ReceiveError::io("read back", &self.path))?;
            self.hasher.update(&buf[..n]);
            at += n as u64;
        }
        self.hashed = to;
        Ok(())
    }

    fn in_order(&self, from: u64) -> Result<(), ReceiveError> {
        if from == self.hashed {
            Ok(())
        } else {
            Err(ReceiveError::Protocol(format!(
                "{}: the page writer got bytes from {from}, expected {}",
                self.path.display(),
                self.hashed
            )))
        }
    }

    fn end(self, len: u64) -> Result<HashedPages, ReceiveError> {
        if len != self.hashed {
            return Err(ReceiveError::Protocol(format!(
                "{}: {len} bytes received, {} written",
                self.path.display(),
                self.hashed
            )));
        }
        let (blocks, root) = self.hasher.finish();
        Ok(HashedPages {
            record: FileRecord {
                name: String::new(),
                size: len,
                blake3: root.to_hex().to_string(),
            },
            blocks,
        })
    }
}

/// Write `data` at `offset`, with `O_DIRECT` where the file system takes it (the memory and
/// the offsets are page-aligned); through the page cache where it refuses.
fn write_direct(direct: &File, buffered: &File, data: &[u8], offset: u64) -> std::io::Result<()> {
    match direct.write_all_at(data, offset) {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => buffered.write_all_at(data, offset),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn filled(bytes: u64, byte: u8) -> Memory {
        let (m, faulted) = Memory::stage(bytes, &AtomicBool::new(false)).unwrap();
        assert_eq!(faulted, bytes);
        let data = vec![byte; bytes as usize];
        // SAFETY: nothing else has this memory yet.
        unsafe { m.fill_from(0, bytes, &mut &data[..]) }.unwrap();
        m
    }

    #[test]
    fn writes_and_hashes_memory_and_file_pieces_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pages");
        std::fs::write(&path, b"").unwrap();
        let memory = filled(3 * PIECE, 7);
        // What the receiver wrote itself past the memory.
        let tail = vec![9u8; 8192];
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .write_all_at(&tail, 3 * PIECE)
            .unwrap();
        let w = Writer::start().unwrap();
        w.send(Piece::Open {
            key: 4,
            path: path.clone(),
            memory: Some(memory),
        });
        w.send(Piece::InMemory {
            key: 4,
            from: 0,
            to: PIECE,
        });
        w.send(Piece::InMemory {
            key: 4,
            from: PIECE,
            to: 3 * PIECE,
        });
        w.send(Piece::InFile {
            key: 4,
            from: 3 * PIECE,
            to: 3 * PIECE + 8192,
        });
        w.send(Piece::End {
            key: 4,
            len: 3 * PIECE + 8192,
        });
        let digests = w.finish().unwrap();
        let mut expected = vec![7u8; 3 * PIECE as usize];
        expected.extend(&tail);
        assert_eq!(std::fs::read(&path).unwrap(), expected);
        let d = &digests[&4];
        assert_eq!(d.record.size, expected.len() as u64);
        assert_eq!(
            d.record.blake3,
            blake3::hash(&expected).to_hex().to_string()
        );
        assert_eq!(
            d.blocks,
            crate::image::blocks::BlockDigests::of_bytes(&expected, 1).0
        );
    }

    #[test]
    fn a_full_disk_is_the_writers_error() {
        let w = Writer::start().unwrap();
        w.send(Piece::Open {
            key: 1,
            path: "/dev/full".into(),
            memory: Some(filled(1 << 16, 1)),
        });
        w.send(Piece::InMemory {
            key: 1,
            from: 0,
            to: 1 << 16,
        });
        w.send(Piece::End {
            key: 1,
            len: 1 << 16,
        });
        let err = w.finish().unwrap_err();
        assert!(err.is_write_failure(), "{err}");
        let msg = err.to_string();
        assert!(
            msg.contains("/dev/full") && msg.contains("No space"),
            "{msg}"
        );
    }

    #[test]
    fn pieces_out_of_order_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pages");
        std::fs::write(&path, b"").unwrap();
        let w = Writer::start().unwrap();
        w.send(Piece::Open {
            key: 1,
            path,
            memory: Some(filled(2 * PIECE, 1)),
        });
        w.send(Piece::InMemory {
            key: 1,
            from: PIECE,
            to: 2 * PIECE,
        });
        let err = w.finish().unwrap_err().to_string();
        assert!(err.contains("expected 0"), "{err}");
    }
}
