//! Where each page of a generation is stored, following its `parent` links the way CRIU does
//! at restore: a `PE_PRESENT` run is in the generation's own pages file, a `PE_PARENT` run is
//! wherever the parent has that page. The comparison of a new generation with its parent
//! ([`super::delta`]) reads pages through it; a restore learns from it which bytes of each
//! pages file it will read ([`crate::image::reads`]).

use std::path::Path;

use super::pagemap::{pages_name, Entry, Pagemap};
use super::{StoreError, PARENT_LINK};
use crate::page_receiver::protocol::PAGE_SIZE;

/// Longest chain of parents followed (a loop of links can never be a real chain this long).
pub const MAX_CHAIN: usize = 1000;

/// A run of pages stored in pages file `file` (whatever the caller opened it as) at
/// `offset`.
#[derive(Debug, Clone)]
pub struct Extent<F> {
    /// Address of the first page.
    pub vaddr: u64,
    /// Pages in the run.
    pub nr_pages: u64,
    /// The pages file.
    pub file: F,
    /// Byte offset of the first page in it.
    pub offset: u64,
}

impl<F> Extent<F> {
    /// The address after the last page.
    pub fn end(&self) -> u64 {
        self.vaddr + self.nr_pages * PAGE_SIZE
    }

    /// Bytes covered.
    pub fn len(&self) -> u64 {
        self.nr_pages * PAGE_SIZE
    }

    /// Whether it covers nothing.
    pub fn is_empty(&self) -> bool {
        self.nr_pages == 0
    }
}

/// Opens a pages file as the caller wants it: the file and its length, `None` when it is
/// absent or empty.
pub type OpenPages<F> = dyn Fn(&Path) -> Result<Option<(F, u64)>, StoreError>;

/// Where every page of pagemap `name` of the generation in `dir` is stored, following its
/// `parent` links: runs in ascending order. A generation without that pagemap has none of
/// its pages (CRIU reads a missing pagemap as an empty one).
pub fn locate<F: Clone>(
    dir: &Path,
    name: &str,
    open: &OpenPages<F>,
) -> Result<Vec<Extent<F>>, StoreError> {
    locate_at(dir, name, 1, open)
}

fn locate_at<F: Clone>(
    dir: &Path,
    name: &str,
    depth: usize,
    open: &OpenPages<F>,
) -> Result<Vec<Extent<F>>, StoreError> {
    if depth > MAX_CHAIN {
        return Err(StoreError::Chain {
            dir: dir.to_path_buf(),
            reason: format!("its chain of parents is longer than {MAX_CHAIN} (a loop of links?)"),
        });
    }
    let path = dir.join(name);
    if !path.exists() {
        return Ok(Vec::new());
    }
    let pm = Pagemap::read(&path)?;
    let pages_path = dir.join(pages_name(pm.pages_id));
    let pages = open(&pages_path)?;
    let inherited = if pm.entries.iter().any(Entry::in_parent) {
        locate_at(&dir.join(PARENT_LINK), name, depth + 1, open)?
    } else {
        Vec::new()
    };
    let mut out = Vec::with_capacity(pm.entries.len());
    let (mut off, mut cursor) = (0u64, 0usize);
    for e in &pm.entries {
        if e.present() {
            let file = pages
                .as_ref()
                .filter(|(_, len)| off + e.len() <= *len)
                .ok_or_else(|| short_pages(&pages_path, &path))?;
            out.push(Extent {
                vaddr: e.vaddr,
                nr_pages: e.nr_pages,
                file: file.0.clone(),
                offset: off,
            });
            off += e.len();
        } else if e.in_parent() {
            take_inherited(&inherited, &mut cursor, e, &mut out).map_err(|vaddr| {
                StoreError::Chain {
                    dir: dir.to_path_buf(),
                    reason: format!(
                        "{name} leaves the page at 0x{vaddr:x} to its parent, which does not have it"
                    ),
                }
            })?;
        }
    }
    Ok(out)
}

/// Append the parent's runs covering entry `e` to `out`; the address of a page the parent
/// lacks is the error.
fn take_inherited<F: Clone>(
    src: &[Extent<F>],
    cursor: &mut usize,
    e: &Entry,
    out: &mut Vec<Extent<F>>,
) -> Result<(), u64> {
    let mut at = e.vaddr;
    while at < e.end() {
        while src.get(*cursor).is_some_and(|x| x.end() <= at) {
            *cursor += 1;
        }
        let x = src.get(*cursor).filter(|x| x.vaddr <= at).ok_or(at)?;
        let upto = x.end().min(e.end());
        out.push(Extent {
            vaddr: at,
            nr_pages: (upto - at) / PAGE_SIZE,
            file: x.file.clone(),
            offset: x.offset + (at - x.vaddr),
        });
        at = upto;
    }
    Ok(())
}

/// A pages file shorter than its pagemap says.
pub fn short_pages(pages: &Path, pagemap: &Path) -> StoreError {
    StoreError::Chain {
        dir: pages.parent().unwrap_or(Path::new("")).to_path_buf(),
        reason: format!(
            "{} holds fewer pages than {} lists",
            pages.display(),
            pagemap.display()
        ),
    }
}
