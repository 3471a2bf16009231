//! Incremental generations without dirty-memory tracking.
//!
//! The dump itself is a full one: cryo's page receiver (or CRIU) writes every page of the
//! container into the staging directory. After the thaw, each page is compared with the page
//! at the same address in the parent generation, looked up through the parent's own chain.
//! Runs of pages that are byte for byte the same become `PE_PARENT` entries (CRIU reads them
//! from the image its `parent` link names, recursively); the others stay `PE_PRESENT` and
//! are copied into a new, smaller pages image, which replaces the full one before anything is
//! synced. A restore of the generation reads, page for page, exactly the bytes received at
//! its dump: a page is left to the parent only when the parent's bytes are those bytes.
//!
//! Files of the image that are identical to the parent's (same name, size and digest: the
//! rootfs changeset of an unchanged upper dir, `/dev/shm`, CRIU's small images) are replaced
//! by hard links to the parent's, so they cost no space either.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::{Advice, Mmap};

pub use super::extents::MAX_CHAIN;
use super::extents::{self, short_pages};
use super::pagemap::{pagemap_names, pages_name, Entry, Pagemap};
use super::{ParentImage, ParentRecord, SharesRecord, StoreError, PARENT_LINK};
use crate::image::blocks::HashedPages;
use crate::image::digest::{digest_file, FileRecord};
use crate::image::publish::{create_private_file, write_private_file};
use crate::page_receiver::protocol::{PAGE_SIZE, PE_PARENT};
use crate::prefault::{SmallWrites, WRITE_CHUNK};

/// What the comparison kept.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Increment {
    /// Pagemaps compared.
    pub pagemaps: usize,
    /// Bytes of pages that changed (written into this image).
    pub written_bytes: u64,
    /// Bytes of pages left to the parent (or, sharing extents, shared with its chain).
    pub parent_bytes: u64,
    /// The pages images are full ones whose unchanged runs share the parent chain's extents
    /// ([`super::shared`]): the generation needs no parent.
    pub shares_extents: bool,
}

/// A pages file, open and mapped.
#[derive(Debug)]
pub(super) struct Mapped {
    /// The open file (what [`super::shared`] clones extents from).
    pub file: File,
    /// Its bytes.
    pub map: Mmap,
}

/// A run of pages of the parent's chain, mapped.
pub(super) type Extent = super::extents::Extent<Arc<Mapped>>;

/// The page at `vaddr` of extent `x` (which holds it).
pub(super) fn page_of(x: &Extent, vaddr: u64) -> &[u8] {
    let at = (x.offset + (vaddr - x.vaddr)) as usize;
    &x.file.map[at..at + PAGE_SIZE as usize]
}

/// Where every page of pagemap `name` of the generation in `dir` is, mapped.
pub(super) fn locate(dir: &Path, name: &str) -> Result<Vec<Extent>, StoreError> {
    extents::locate(dir, name, &|p| {
        Ok(map_file(p)?.map(|m| {
            let len = m.map.len() as u64;
            (m, len)
        }))
    })
}

/// Replace the full pages images in `dir` (a staging directory) by what changed since the
/// generation in `parent_dir`: full images sharing the unchanged extents where the file
/// system can ([`super::shared`]), else images of what changed whose other pages are left to
/// the parent. Call after the thaw, before the images are synced.
///
/// Sharing extents, the pages files keep the bytes received: `hashed` are the pages files
/// whose digests are known already; the others are digested from the staged bytes while
/// they are in memory, and returned.
pub fn make_incremental(
    dir: &Path,
    parent_dir: &Path,
    hashed: &[HashedPages],
) -> Result<(Increment, Vec<HashedPages>), StoreError> {
    if super::shared::can_share(&parent_dir.join(crate::manifest::FILE), dir) {
        let (mut inc, digests) = super::shared::share_unchanged(dir, parent_dir, hashed)?;
        inc.shares_extents = true;
        return Ok((inc, digests));
    }
    let names = pagemap_names(dir)?;
    let mut inc = Increment::default();
    for name in names {
        let base = locate(parent_dir, &name)?;
        let (written, parent) = compare_one(dir, &name, &base)?;
        inc.pagemaps += 1;
        inc.written_bytes += written;
        inc.parent_bytes += parent;
    }
    Ok((inc, Vec::new()))
}

/// Compare one pagemap of the new image with the parent's pages (`base`), and rewrite it and
/// its pages image to hold only what changed. Returns (bytes kept, bytes left to the parent).
fn compare_one(dir: &Path, name: &str, base: &[Extent]) -> Result<(u64, u64), StoreError> {
    let pagemap_path = dir.join(name);
    let pm = Pagemap::read(&pagemap_path)?;
    if base.is_empty() {
        // Nothing of it in the parent (a process started since): every page stays.
        trim_to_pages(&dir.join(pages_name(pm.pages_id)), pm.present_bytes())?;
        return Ok((pm.present_bytes(), 0));
    }
    let pages_path = dir.join(pages_name(pm.pages_id));
    let Some(pages) = map_file(&pages_path)? else {
        if pm.present_bytes() > 0 {
            return Err(short_pages(&pages_path, &pagemap_path));
        }
        return Ok((0, 0));
    };
    let temp = dir.join(format!(".cryo-delta-{}.tmp", pm.pages_id));
    let file = create_private(&temp)?;
    let mut out = Delta {
        writer: BufWriter::with_capacity(WRITE_CHUNK, SmallWrites(file)),
        path: &temp,
        entries: Vec::with_capacity(pm.entries.len()),
        written: 0,
        parent: 0,
    };
    let mut cursor = 0usize;
    let mut off = 0u64;
    for e in &pm.entries {
        if !e.present() {
            out.entries.push(*e);
            continue;
        }
        let data = pages
            .map
            .get(off as usize..(off + e.len()) as usize)
            .ok_or_else(|| short_pages(&pages_path, &pagemap_path))?;
        off += e.len();
        // Runs of pages that are the same as the parent's, or not.
        let mut run: Option<(u64, bool)> = None;
        for i in 0..e.nr_pages {
            let vaddr = e.vaddr + i * PAGE_SIZE;
            let page = &data[(i * PAGE_SIZE) as usize..((i + 1) * PAGE_SIZE) as usize];
            let same = parent_page(base, &mut cursor, vaddr).is_some_and(|p| p == page);
            match run {
                Some((_, s)) if s == same => {}
                Some((start, s)) => {
                    out.push(e, start, vaddr, s, data)?;
                    run = Some((vaddr, same));
                }
                None => run = Some((vaddr, same)),
            }
        }
        if let Some((start, s)) = run {
            out.push(e, start, e.end(), s, data)?;
        }
    }
    let (written, parent) = (out.written, out.parent);
    let entries = std::mem::take(&mut out.entries);
    let file = out
        .writer
        .into_inner()
        .map_err(|e| StoreError::io("write", &temp)(e.into_error()))?;
    drop(file);
    // The full pages image is unmapped and replaced: its page cache is dropped unwritten.
    drop(pages);
    let new_map = Pagemap {
        pages_id: pm.pages_id,
        entries,
    };
    let map_temp = dir.join(format!(".cryo-delta-{name}.tmp"));
    write_private(&map_temp, &new_map.encode())?;
    std::fs::rename(&temp, &pages_path).map_err(StoreError::io("rename", &temp))?;
    std::fs::rename(&map_temp, &pagemap_path).map_err(StoreError::io("rename", &map_temp))?;
    Ok((written, parent))
}

/// The new pages image and pagemap being built.
struct Delta<'a> {
    writer: BufWriter<SmallWrites<File>>,
    path: &'a Path,
    entries: Vec<Entry>,
    written: u64,
    parent: u64,
}

impl Delta<'_> {
    /// Record the pages `[start, end)` of entry `e` (whose data is `data`) as left to the
    /// parent (`same`) or kept.
    fn push(
        &mut self,
        e: &Entry,
        start: u64,
        end: u64,
        same: bool,
        data: &[u8],
    ) -> Result<(), StoreError> {
        let nr_pages = (end - start) / PAGE_SIZE;
        if same {
            self.entries.push(Entry {
                vaddr: start,
                nr_pages,
                flags: PE_PARENT,
            });
            self.parent += end - start;
            return Ok(());
        }
        self.entries.push(Entry {
            vaddr: start,
            nr_pages,
            flags: e.flags,
        });
        let from = (start - e.vaddr) as usize;
        self.writer
            .write_all(&data[from..from + (end - start) as usize])
            .map_err(StoreError::io("write", self.path))?;
        self.written += end - start;
        Ok(())
    }
}

/// The parent's page at `vaddr`, if it has one; `cursor` only moves forward (addresses are
/// asked in ascending order).
fn parent_page<'a>(base: &'a [Extent], cursor: &mut usize, vaddr: u64) -> Option<&'a [u8]> {
    parent_extent(base, cursor, vaddr).map(|x| page_of(x, vaddr))
}

/// The extent of the parent's chain that holds the page at `vaddr`, if any; `cursor` as for
/// [`parent_page`].
pub(super) fn parent_extent<'a>(
    base: &'a [Extent],
    cursor: &mut usize,
    vaddr: u64,
) -> Option<&'a Extent> {
    while base.get(*cursor).is_some_and(|x| x.end() <= vaddr) {
        *cursor += 1;
    }
    base.get(*cursor).filter(|x| x.vaddr <= vaddr)
}

/// Cut a pages image the receiver left at its staged length ([`crate::page_receiver`]: it is
/// replaced, unless kept as it is, as here) to the `len` bytes of its pages.
pub(super) fn trim_to_pages(path: &Path, len: u64) -> Result<(), StoreError> {
    let file = match std::fs::OpenOptions::new().write(true).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(StoreError::io("open", path)(e)),
    };
    if file.metadata().map_err(StoreError::io("stat", path))?.len() > len {
        file.set_len(len)
            .map_err(StoreError::io("truncate", path))?;
    }
    Ok(())
}

/// Map a pages image read-only (`None` when it is empty or absent).
pub(super) fn map_file(path: &Path) -> Result<Option<Arc<Mapped>>, StoreError> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(StoreError::io("open", path)(e)),
    };
    if file.metadata().map_err(StoreError::io("stat", path))?.len() == 0 {
        return Ok(None);
    }
    // SAFETY: images of a store are never written in place: a generation's files are only
    // ever replaced whole (rename) or removed, and the staging directory's are this process's
    // own. A mapping therefore always sees the bytes it was opened on.
    let map = unsafe { Mmap::map(&file) }.map_err(StoreError::io("map", path))?;
    let _ = map.advise(Advice::Sequential);
    Ok(Some(Arc::new(Mapped { file, map })))
}

fn create_private(path: &Path) -> Result<File, StoreError> {
    create_private_file(path).map_err(StoreError::io("create", path))
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    write_private_file(path, bytes).map_err(StoreError::io("write", path))
}

/// How a new generation builds on the one before it, as its manifest records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lineage {
    /// CRIU reads its unchanged pages from its parent.
    Parent(ParentRecord),
    /// A full image that shares the unchanged pages' extents with the one before.
    Shares(SharesRecord),
}

/// Files of the new image (`files`, digested) that are identical to the parent's become hard
/// links to the parent's; then, unless the generation shares extents instead, the `parent`
/// link is made. Returns the record the manifest keeps. A linked file is digested again:
/// what the manifest promises is what is there.
pub fn share_and_link(
    dir: &Path,
    files: &[FileRecord],
    parent: &ParentImage,
    inc: &Increment,
) -> Result<Lineage, StoreError> {
    let mut shared = Vec::new();
    for f in files {
        let same = parent
            .manifest
            .files
            .iter()
            .any(|p| p.name == f.name && p.size == f.size && p.blake3 == f.blake3);
        if !same {
            continue;
        }
        let from = parent.dir.join(&f.name);
        let temp = dir.join(format!(".cryo-link-{}", f.name));
        let _ = std::fs::remove_file(&temp);
        if std::fs::hard_link(&from, &temp).is_err() {
            // A file system without hard links keeps the copy.
            continue;
        }
        match digest_file(&temp) {
            Ok((size, b3)) if size == f.size && b3 == f.blake3 => {
                let to = dir.join(&f.name);
                std::fs::rename(&temp, &to).map_err(StoreError::io("rename", &temp))?;
                shared.push(f.name.clone());
            }
            _ => {
                let _ = std::fs::remove_file(&temp);
            }
        }
    }
    if inc.shares_extents {
        let before = parent.manifest.shares.as_ref().map_or(0, |s| s.since_full);
        return Ok(Lineage::Shares(SharesRecord {
            name: parent.name.clone(),
            pages_written: inc.written_bytes,
            pages_shared: inc.parent_bytes,
            since_full: before + 1,
            shared_files: shared,
        }));
    }
    let link = dir.join(PARENT_LINK);
    std::os::unix::fs::symlink(parent_target(&parent.name), &link)
        .map_err(StoreError::io("create the parent link", &link))?;
    Ok(Lineage::Parent(ParentRecord {
        name: parent.name.clone(),
        manifest_blake3: parent.manifest.manifest_blake3.clone(),
        pages_written: inc.written_bytes,
        pages_in_parent: inc.parent_bytes,
        shared_files: shared,
    }))
}

/// What a generation's `parent` link holds: its sibling, relative, so the store can move.
pub fn parent_target(name: &str) -> PathBuf {
    Path::new("..").join(name)
}

#[cfg(test)]
#[path = "delta_tests.rs"]
mod tests;
