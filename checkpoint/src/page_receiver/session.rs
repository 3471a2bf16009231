//! One dump's page stream: CRIU's commands applied to pages files and pagemaps.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::protocol::{self, Command, Dest, HEADER_LEN, PAGE_SIZE, PE_PRESENT};
use super::staging::{self, PagesFile};
use super::ReceiveError;

/// Data that did not fit the staged mapping goes through a buffer of this size (small writes
/// into fresh page cache: see `crate::prefault`).
const BOUNCE: usize = crate::prefault::WRITE_CHUNK;

/// One pagemap being received.
#[derive(Debug)]
struct Target {
    dest: Dest,
    pages_id: u32,
    pagemap: Vec<u8>,
    pages: PagesFile,
    received: u64,
}

/// What a finished session put in the image dir.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// Bytes of pages received.
    pub bytes: u64,
    /// Bytes that arrived in pre-faulted pages.
    pub staged_bytes: u64,
    /// Pagemaps written.
    pub pagemaps: usize,
}

/// The receiving side of a dump. Dropped unfinished, it removes every file it created.
#[derive(Debug)]
pub struct Session {
    dir: PathBuf,
    staged: HashMap<u64, PagesFile>,
    targets: Vec<Target>,
    next_pages_id: u32,
    staged_bytes: u64,
    closed: bool,
    done: bool,
}

impl Session {
    /// A session writing into image dir `dir`.
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
            staged: HashMap::new(),
            targets: Vec::new(),
            next_pages_id: 1,
            staged_bytes: 0,
            closed: false,
            done: false,
        }
    }

    /// Prepare the pages file of task `vpid` ([`staging::stage`]).
    pub fn stage(&mut self, vpid: u64, bytes: u64) -> Result<(), ReceiveError> {
        let pf = staging::stage(&self.dir, &vpid.to_string(), bytes)?;
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
        self.targets.push(Target {
            dest,
            pages_id,
            pagemap: protocol::pagemap_head(pages_id),
            pages,
            received: 0,
        });
        Ok(())
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
        let mut summary = Summary {
            staged_bytes: self.staged_bytes,
            ..Summary::default()
        };
        let mut written: Vec<PathBuf> = Vec::new();
        for t in std::mem::take(&mut self.targets) {
            summary.bytes += t.received;
            summary.pagemaps += 1;
            let pages = self.dir.join(format!("pages-{}.img", t.pages_id));
            let pagemap = self.dir.join(t.dest.pagemap_name());
            let temp = t.pages.path.clone();
            let result = t
                .pages
                .finish(t.received, &pages)
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

fn write<S: Write>(stream: &mut S, bytes: &[u8]) -> Result<(), ReceiveError> {
    stream.write_all(bytes).map_err(ReceiveError::Stream)
}

/// A new file readable by its owner only (image files describe the container's memory).
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), ReceiveError> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(bytes))
        .map_err(ReceiveError::io("write", path))
}
