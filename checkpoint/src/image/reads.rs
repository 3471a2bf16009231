//! Which bytes of each pages file a restore reads. A generation of a store chain takes most
//! of its pages from earlier generations, but never the pages a later one replaced; with
//! the block digests of [`super::blocks`], a restore checks the blocks it reads and leaves
//! the rest, which no task will ever see.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::alongside::PendingDigest;
use crate::store::extents::locate;
use crate::store::pagemap::pagemap_names;
use crate::store::StoreError;

/// Byte ranges `[from, to)`, sorted and merged.
pub type Ranges = Vec<(u64, u64)>;

/// One read of a restore: (pages file by canonical path, offset, length).
pub type PageRead = (Arc<PathBuf>, u64, u64);

/// What restoring a chain reads of its pages files.
#[derive(Debug, Default)]
pub struct ChainReads {
    /// The ranges of every pages file (by canonical path), sorted and merged.
    pub by_file: HashMap<PathBuf, Ranges>,
    /// Every read in the order CRIU makes them (by address).
    pub in_order: Vec<PageRead>,
}

/// What restoring the image in `top` reads, through its `parent` links.
pub fn chain_reads(top: &Path) -> Result<ChainReads, StoreError> {
    let names = pagemap_names(top)?;
    let open = |p: &Path| -> Result<Option<(Arc<PathBuf>, u64)>, StoreError> {
        let len = match std::fs::metadata(p) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(StoreError::io("stat", p)(e)),
        };
        let real = p.canonicalize().map_err(StoreError::io("resolve", p))?;
        Ok((len > 0).then(|| (Arc::new(real), len)))
    };
    let mut out = ChainReads::default();
    for name in names {
        for x in locate(top, &name, &open)? {
            out.by_file
                .entry(x.file.as_ref().clone())
                .or_default()
                .push((x.offset, x.offset + x.len()));
            match out.in_order.last_mut() {
                Some((f, off, len)) if Arc::ptr_eq(f, &x.file) && *off + *len == x.offset => {
                    *len += x.len()
                }
                _ => out.in_order.push((x.file.clone(), x.offset, x.len())),
            }
        }
    }
    for ranges in out.by_file.values_mut() {
        *ranges = merged(std::mem::take(ranges));
    }
    Ok(out)
}

/// The ranges of every pages file (by canonical path) that restoring the image in `top`
/// reads, through its `parent` links.
pub fn pages_read(top: &Path) -> Result<HashMap<PathBuf, Ranges>, StoreError> {
    Ok(chain_reads(top)?.by_file)
}

fn merged(mut ranges: Ranges) -> Ranges {
    ranges.sort_unstable();
    let mut out: Ranges = Vec::with_capacity(ranges.len());
    for (from, to) in ranges {
        match out.last_mut() {
            Some(last) if from <= last.1 => last.1 = last.1.max(to),
            _ => out.push((from, to)),
        }
    }
    out
}

/// Narrow the pending checks to what the restore reads (`reads`): a pages file with block
/// digests that is read only in part gets those ranges to check (what that leaves unchecked
/// is [`super::alongside::AlongsideTimes::unread_bytes`]).
pub fn narrow_to_reads(
    reads: &ChainReads,
    pending: &mut [PendingDigest],
) -> Result<(), StoreError> {
    for p in pending.iter_mut().filter(|p| p.blocks_listed) {
        let path = p.dir.join(&p.file);
        let real = path
            .canonicalize()
            .map_err(StoreError::io("resolve", &path))?;
        let ranges = reads.by_file.get(&real).cloned().unwrap_or_default();
        let read: u64 = ranges.iter().map(|(a, b)| b - a).sum();
        if read < p.size {
            p.only = Some(ranges);
        }
    }
    Ok(())
}

#[cfg(test)]
#[path = "reads_tests.rs"]
mod tests;
