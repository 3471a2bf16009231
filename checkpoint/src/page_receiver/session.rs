//! One dump's page stream: CRIU's commands applied to pages files and pagemaps.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use super::memory::{Piece, Writer, PIECE};
use super::protocol::{self, Command, Dest, HEADER_LEN, PAGE_SIZE, PE_PRESENT};
use super::staging::{self, Mode, PagesFile};
use super::ReceiveError;
use crate::image::blocks::HashedPages;

/// Data that did not fit the staged mapping goes through a buffer of this size (small writes
/// into fresh page cache: see `crate::prefault`).
const BOUNCE: usize = crate::prefault::WRITE_CHUNK;

/// Staging memory claimed by the sessions of this process: the members of a coordinated
/// checkpoint stage side by side, and each must count what the others are about to fault in.
static CLAIMED: AtomicU64 = AtomicU64::new(0);

/// One pagemap being received.
#[derive(Debug)]
struct Target {
    dest: Dest,
    pages_id: u32,
    pagemap: Vec<u8>,
    pages: PagesFile,
    received: u64,
    /// Bytes of its memory handed to the writer.
    sent: u64,
}

/// What a finished session put in the image dir.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// Bytes of pages received.
    pub bytes: u64,
    /// Bytes that arrived in staged memory or page cache.
    pub staged_bytes: u64,
    /// Bytes faulted in before the freeze.
    pub prefaulted_bytes: u64,
    /// Pagemaps written.
    pub pagemaps: usize,
    /// The pages files that were hashed as they were written (memory staging).
    pub digests: Vec<HashedPages>,
}

/// The receiving side of a dump. Dropped unfinished, it removes every file it created.
#[derive(Debug)]
pub struct Session {
    dir: PathBuf,
    mode: Mode,
    /// The pages files are replaced after the dump ([`PagesFile::finish`]).
    replaced: bool,
    /// Set when the freeze begins: staging stops.
    stop: Arc<AtomicBool>,
    /// Bytes this session's staging holds of the process-wide claim ([`CLAIMED`]).
    claimed: u64,
    staged: HashMap<u64, PagesFile>,
    targets: Vec<Target>,
    next_pages_id: u32,
    staged_bytes: u64,
    prefaulted_bytes: u64,
    /// Writes staged memory out ([`Mode::Memory`]), started with the first pagemap.
    writer: Option<Writer>,
    closed: bool,
    done: bool,
}

impl Session {
    /// A session writing into image dir `dir`, staging as `mode` says until `stop` is set;
    /// `replaced`: the pages files are replaced after the dump (a store increment).
    pub fn new(dir: &Path, mode: Mode, replaced: bool, stop: Arc<AtomicBool>) -> Self {
        Self {
            dir: dir.to_path_buf(),
            mode,
            replaced,
            stop,
            claimed: 0,
            staged: HashMap::new(),
            targets: Vec::new(),
            next_pages_id: 1,
            staged_bytes: 0,
            prefaulted_bytes: 0,
            writer: None,
            closed: false,
            done: false,
        }
    }

    /// Prepare the pages file of task `vpid` ([`staging::stage`]), within the memory budget
    /// less what other sessions of this process (the members of a group) have claimed.
    pub fn stage(&mut self, vpid: u64, bytes: u64) -> Result<(), ReceiveError> {
        let free = staging::memory_budget().saturating_sub(CLAIMED.load(Ordering::Relaxed));
        let bytes = bytes.min(free) / PAGE_SIZE * PAGE_SIZE;
        CLAIMED.fetch_add(bytes, Ordering::Relaxed);
        self.claimed += bytes;
        let (pf, faulted) =
            staging::stage(&self.dir, &vpid.to_string(), bytes, self.mode, &self.stop)?;
        self.prefaulted_bytes += faulted;
        self.staged.insert(vpid, pf);
        Ok(())
    }

    /// Serve CRIU's stream until it closes the session. Every page has been copied out of the
    /// container's memory when this returns `Ok`.
    pub fn serve<S: Read + Write>(&mut self, stream: &mut S) -> Result<(), ReceiveError> {
        let mut header = [0u8; HEADER_LEN];
        loop {
            if let Err(e) = stream.read_exact(&mut header) {
                return Err(if e.kind() == ErrorKind::UnexpectedEof {
                    ReceiveError::Protocol(
                        "CRIU ended the page stream without closing it (the dump failed)".into(),
                    )
                } else {
                    ReceiveError::Stream(e)
                });
            }
            match protocol::parse(&header) {
                Command::Open { dest, reply } => {
                    let dest = dest.ok_or_else(|| {
                        ReceiveError::Protocol("CRIU opened a pagemap of an unknown kind".into())
                    })?;
                    self.open(dest)?;
                    if reply {
                        // "No parent image": every page is sent.
                        write(stream, &[0u8])?;
                    }
                }
                Command::Add {
                    vaddr,
                    nr_pages,
                    flags,
                } => self.add(stream, vaddr, nr_pages, flags)?,
                Command::Close => {
                    self.closed = true;
                    self.end_all();
                    return write(stream, &0i32.to_ne_bytes());
                }
                Command::Other(raw) => {
                    return Err(ReceiveError::Protocol(format!(
                        "CRIU sent page-server command {raw:#x}, which is not part of a dump \
                         (parent images and lazy pages are not served by cryo's receiver)"
                    )))
                }
            }
        }
    }

    fn open(&mut self, dest: Dest) -> Result<(), ReceiveError> {
        let pages = match dest {
            Dest::Task(vpid) => match self.staged.remove(&vpid) {
                Some(pf) => pf,
                None => staging::create(&self.dir, &format!("task-{vpid}"))?,
            },
            Dest::Shmem(id) => staging::create(&self.dir, &format!("shmem-{id}"))?,
        };
        let pages_id = self.next_pages_id;
        self.next_pages_id += 1;
        if let Some(last) = self.targets.last_mut() {
            hand_over(self.writer.as_ref(), last, last.received);
        }
        if self.mode == Mode::Memory {
            if self.writer.is_none() {
                self.writer = Some(Writer::start()?);
            }
            tell(
                self.writer.as_ref(),
                Piece::Open {
                    key: pages_id,
                    path: pages.path.clone(),
                    memory: pages.memory.clone(),
                },
            );
        }
        self.targets.push(Target {
            dest,
            pages_id,
            pagemap: protocol::pagemap_head(pages_id),
            pages,
            received: 0,
            sent: 0,
        });
        Ok(())
    }

    /// The stream is closed: hand the writer what is left of each file, and its end.
    fn end_all(&mut self) {
        for t in &mut self.targets {
            hand_over(self.writer.as_ref(), t, t.received);
            tell(
                self.writer.as_ref(),
                Piece::End {
                    key: t.pages_id,
                    len: t.received,
                },
            );
        }
    }

    fn add<S: Read>(
        &mut self,
        stream: &mut S,
        vaddr: u64,
        nr: u64,
        flags: u32,
    ) -> Result<(), ReceiveError> {
        let t = self.targets.last_mut().ok_or_else(|| {
            ReceiveError::Protocol("CRIU sent pages before opening a pagemap".into())
        })?;
        protocol::push_pagemap_entry(&mut t.pagemap, vaddr, nr, flags);
        if flags & PE_PRESENT == 0 {
            return Ok(());
        }
        let len = nr.checked_mul(PAGE_SIZE).ok_or_else(|| {
            ReceiveError::Protocol("CRIU announced an impossible number of pages".into())
        })?;
        let (mut at, end) = (t.received, t.received + len);
        let read_err = ReceiveError::Stream;
        if let Some(map) = t.pages.map.as_mut() {
            let upto = end.min(map.len() as u64);
            if at < upto {
                stream
                    .read_exact(&mut map[at as usize..upto as usize])
                    .map_err(read_err)?;
                self.staged_bytes += upto - at;
                at = upto;
            }
        }
        if let Some(memory) = t.pages.memory.as_ref() {
            let upto = end.min(memory.len());
            if at < upto {
                // SAFETY: at..upto lies past everything handed to the writer (t.sent <= at)
                // and is handed over only once filled.
                unsafe { memory.fill_from(at, upto, stream) }.map_err(read_err)?;
                self.staged_bytes += upto - at;
                at = upto;
                if at - t.sent >= PIECE {
                    hand_over(self.writer.as_ref(), t, at);
                }
            }
        }
        if at < end {
            // Past the staged part: written here, through the page cache. The writer hashes
            // it in order after the memory before it.
            hand_over(self.writer.as_ref(), t, at);
            let from = at;
            let mut buf = vec![0u8; BOUNCE.min((end - at) as usize)];
            while at < end {
                let n = buf.len().min((end - at) as usize);
                stream.read_exact(&mut buf[..n]).map_err(read_err)?;
                t.pages
                    .file
                    .write_all_at(&buf[..n], at)
                    .map_err(ReceiveError::io("write", &t.pages.path))?;
                at += n as u64;
            }
            tell(
                self.writer.as_ref(),
                Piece::InFile {
                    key: t.pages_id,
                    from,
                    to: end,
                },
            );
            t.sent = end;
        }
        t.received = end;
        Ok(())
    }

    /// Give the received images their final names (`pages-<id>.img`, `pagemap-*.img`) and
    /// remove what was staged for tasks CRIU did not send. Call after a closed session.
    pub fn finish(mut self) -> Result<Summary, ReceiveError> {
        if !self.closed {
            return Err(ReceiveError::Protocol(
                "CRIU never closed the page stream".into(),
            ));
        }
        let mut digests = match self.writer.take() {
            Some(w) => w.finish()?,
            None => HashMap::new(),
        };
        let mut summary = Summary {
            staged_bytes: self.staged_bytes,
            prefaulted_bytes: self.prefaulted_bytes,
            ..Summary::default()
        };
        let mut written: Vec<PathBuf> = Vec::new();
        for t in std::mem::take(&mut self.targets) {
            summary.bytes += t.received;
            summary.pagemaps += 1;
            let name = format!("pages-{}.img", t.pages_id);
            if let Some(mut d) = digests.remove(&t.pages_id) {
                d.record.name.clone_from(&name);
                summary.digests.push(d);
            }
            let pages = self.dir.join(name);
            let pagemap = self.dir.join(t.dest.pagemap_name());
            let temp = t.pages.path.clone();
            let result = t
                .pages
                .finish(t.received, &pages, self.replaced)
                .and_then(|()| write_private(&pagemap, &t.pagemap));
            written.extend([pages, pagemap]);
            if let Err(e) = result {
                for p in written.iter().chain([&temp]) {
                    let _ = std::fs::remove_file(p);
                }
                return Err(e);
            }
        }
        self.done = true;
        Ok(summary)
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        CLAIMED.fetch_sub(self.claimed, Ordering::Relaxed);
        for staged in self.staged.values() {
            let _ = std::fs::remove_file(&staged.path);
        }
        if self.done {
            return;
        }
        for t in &self.targets {
            let _ = std::fs::remove_file(&t.pages.path);
            let _ = std::fs::remove_file(self.dir.join(format!("pages-{}.img", t.pages_id)));
            let _ = std::fs::remove_file(self.dir.join(t.dest.pagemap_name()));
        }
    }
}

/// Tell the writer, if there is one (memory staging).
fn tell(writer: Option<&Writer>, piece: Piece) {
    if let Some(w) = writer {
        w.send(piece);
    }
}

/// Hand the writer target `t`'s memory up to `to` (what is filled and not yet handed over).
fn hand_over(writer: Option<&Writer>, t: &mut Target, to: u64) {
    let Some(memory) = t.pages.memory.as_ref() else {
        return;
    };
    let to = to.min(memory.len());
    if let (Some(w), true) = (writer, to > t.sent) {
        w.send(Piece::InMemory {
            key: t.pages_id,
            from: t.sent,
            to,
        });
        t.sent = to;
    }
}

fn write<S: Write>(stream: &mut S, bytes: &[u8]) -> Result<(), ReceiveError> {
    stream.write_all(bytes).map_err(ReceiveError::Stream)
}

/// A new file readable by its owner only (image files describe the container's memory).
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), ReceiveError> {
    crate::image::publish::write_private_file(path, bytes).map_err(ReceiveError::io("write", path))
}
