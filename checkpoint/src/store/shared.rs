//! Incremental generations that are full images, where the file system shares extents
//! between files (reflinks: XFS, btrfs).
//!
//! A chain of `parent` links restores more slowly than a full image: CRIU reads every page a
//! generation inherits in its main path, run by run, down through the generations, and the
//! disk reads the pages later generations replaced along with the ones it needs. Where the
//! store's file system can clone a range of one file into another, a new generation needs
//! no parent: its pages image keeps the layout of the full dump, the runs of pages equal to
//! the parent's are cloned from wherever the parent's chain stores them (no bytes written,
//! the extents shared), and only the pages that changed are written. The generation is then
//! an ordinary full image, restored as one, and older generations can go whenever the
//! prune says so: the file system keeps a shared extent as long as one file holds it.
//!
//! Same bytes, same digests: the new file holds exactly what the page receiver staged, so
//! the digests it computed while receiving stand.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use super::delta::{locate, map_file, page_of, parent_extent, Extent, Increment, Mapped};
use super::pagemap::{pagemap_names, pages_name, Pagemap};
use super::StoreError;
use crate::image::blocks::{BlockDigests, HashedPages};
use crate::image::digest::FileRecord;
use crate::image::publish::create_private_file;
use crate::page_receiver::protocol::PAGE_SIZE;

/// Whether a file in `dir` can share the extents of `from` (a regular file): the same file
/// system, and one that clones ranges. Tried for real, on a scratch file.
pub fn can_share(from: &Path, dir: &Path) -> bool {
    let probe = dir.join(".cryo-reflink-probe");
    let _ = std::fs::remove_file(&probe);
    let result = (|| -> std::io::Result<()> {
        let src = File::open(from)?;
        let dst = create_private_file(&probe)?;
        clone_file(&src, &dst)
    })();
    let _ = std::fs::remove_file(&probe);
    result.is_ok()
}

/// Rewrite the pages images in `dir` (a staging directory) so that every run of pages that
/// is the same as the parent chain's (in `parent_dir`) shares its extents. Call after the
/// thaw, before the images are synced, once [`can_share`] said yes.
/// Pages files not in `hashed` are digested from the staged bytes (in memory by then; the
/// new file's shared extents would have to be read back from the disk); their digests are
/// returned.
pub fn share_unchanged(
    dir: &Path,
    parent_dir: &Path,
    hashed: &[HashedPages],
) -> Result<(Increment, Vec<HashedPages>), StoreError> {
    let mut inc = Increment::default();
    let mut digests = Vec::new();
    for name in pagemap_names(dir)? {
        let base = locate(parent_dir, &name)?;
        let (written, shared, digest) = share_one(dir, &name, &base, hashed)?;
        inc.pagemaps += 1;
        inc.written_bytes += written;
        inc.parent_bytes += shared;
        digests.extend(digest);
    }
    Ok((inc, digests))
}

/// One pagemap's pages image: returns (bytes written, bytes shared, its digests when they
/// were not in `hashed`).
fn share_one(
    dir: &Path,
    name: &str,
    base: &[Extent],
    hashed: &[HashedPages],
) -> Result<(u64, u64, Option<HashedPages>), StoreError> {
    let pagemap_path = dir.join(name);
    let pm = Pagemap::read(&pagemap_path)?;
    if base.is_empty() {
        // Nothing of it in the parent (a process started since): every page is new.
        super::delta::trim_to_pages(&dir.join(pages_name(pm.pages_id)), pm.present_bytes())?;
        return Ok((pm.present_bytes(), 0, None));
    }
    let pages_file = pages_name(pm.pages_id);
    let pages_path = dir.join(&pages_file);
    let short = || super::extents::short_pages(&pages_path, &pagemap_path);
    let Some(staged) = map_file(&pages_path)? else {
        if pm.present_bytes() > 0 {
            return Err(short());
        }
        return Ok((0, 0, None));
    };
    // The receiver leaves a file it knows will be replaced at its staged length: the pages
    // are its first `len` bytes.
    let len = pm.present_bytes();
    if (staged.map.len() as u64) < len {
        return Err(short());
    }
    let temp = dir.join(format!(".cryo-shared-{}.tmp", pm.pages_id));
    let file = create_private_file(&temp).map_err(StoreError::io("create", &temp))?;
    let digest_it = !hashed.iter().any(|h| h.record.name == pages_file);
    let digest_of = |threads: usize| {
        let (blocks, root) = BlockDigests::of_bytes(&staged.map[..len as usize], threads);
        HashedPages {
            record: FileRecord {
                name: pages_file.clone(),
                size: len,
                blake3: root.to_hex().to_string(),
            },
            blocks,
        }
    };
    // The digest on the other cores while this one compares and clones.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let hash_threads = cores.saturating_sub(1).max(1);
    let (built, digest) = std::thread::scope(|scope| {
        let hasher = digest_it.then(|| {
            std::thread::Builder::new()
                .name("cryo-pages-hash".into())
                .spawn_scoped(scope, || digest_of(hash_threads))
        });
        let built = build(&pm, base, &staged, &file, &temp);
        let digest = match hasher {
            None => None,
            Some(Ok(h)) => h.join().ok(),
            Some(Err(_)) => None,
        };
        (built, digest)
    });
    let (written, shared) = built?;
    let digest = match (digest_it, digest) {
        (true, None) => Some(digest_of(1)),
        (_, d) => d,
    };
    crate::prefault::resize(&file, len).map_err(StoreError::io("size", &temp))?;
    drop(file);
    // The staged image is unmapped and replaced: its page cache is dropped unwritten.
    drop(staged);
    std::fs::rename(&temp, &pages_path).map_err(StoreError::io("rename", &temp))?;
    Ok((written, shared, digest))
}

/// Fill `file` (at `path`) with the pages of `pm` as staged: runs equal to the parent
/// chain's (`base`) cloned, the others written. Returns (bytes written, bytes shared).
fn build(
    pm: &Pagemap,
    base: &[Extent],
    staged: &Mapped,
    file: &File,
    path: &Path,
) -> Result<(u64, u64), StoreError> {
    let mut out = Builder {
        file,
        path,
        staged,
        run: None,
        written: 0,
        shared: 0,
    };
    let mut at = 0u64;
    let mut cursor = 0usize;
    for e in pm.entries.iter().filter(|e| e.present()) {
        for i in 0..e.nr_pages {
            let vaddr = e.vaddr + i * PAGE_SIZE;
            let page = &staged.map[at as usize..(at + PAGE_SIZE) as usize];
            let source = parent_extent(base, &mut cursor, vaddr)
                .filter(|x| page_of(x, vaddr) == page)
                .map(|x| (&x.file, x.offset + (vaddr - x.vaddr)));
            out.page(at, source)?;
            at += PAGE_SIZE;
        }
    }
    out.flush()?;
    Ok((out.written, out.shared))
}

/// A run of the new pages image: written from the staged bytes, or cloned.
enum Run {
    Write {
        from: u64,
        len: u64,
    },
    Clone {
        src: Arc<Mapped>,
        src_offset: u64,
        to: u64,
        len: u64,
    },
}

/// The new pages image being built, a run at a time.
struct Builder<'a> {
    file: &'a File,
    path: &'a Path,
    staged: &'a Mapped,
    run: Option<Run>,
    written: u64,
    shared: u64,
}

impl Builder<'_> {
    /// The page at offset `at` of the image: the same as the page at `source` (file,
    /// offset), or new.
    fn page(&mut self, at: u64, source: Option<(&Arc<Mapped>, u64)>) -> Result<(), StoreError> {
        let extends = match (&mut self.run, source) {
            (Some(Run::Write { from, len }), None) if *from + *len == at => {
                *len += PAGE_SIZE;
                true
            }
            (
                Some(Run::Clone {
                    src,
                    src_offset,
                    to,
                    len,
                }),
                Some((s, o)),
            ) if Arc::ptr_eq(src, s) && *src_offset + *len == o && *to + *len == at => {
                *len += PAGE_SIZE;
                true
            }
            _ => false,
        };
        if !extends {
            self.flush()?;
            self.run = Some(match source {
                None => Run::Write {
                    from: at,
                    len: PAGE_SIZE,
                },
                Some((s, o)) => Run::Clone {
                    src: s.clone(),
                    src_offset: o,
                    to: at,
                    len: PAGE_SIZE,
                },
            });
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), StoreError> {
        match self.run.take() {
            None => Ok(()),
            Some(Run::Write { from, len }) => self.write(from, len),
            Some(Run::Clone {
                src,
                src_offset,
                to,
                len,
            }) => match clone_range(&src.file, src_offset, len, self.file, to) {
                Ok(()) => {
                    self.shared += len;
                    Ok(())
                }
                // A range the file system will not clone (its blocks larger than a page, a
                // limit of its own): the same bytes, written.
                Err(e) if refused(&e) => self.write(to, len),
                Err(e) => Err(StoreError::io("clone a range into", self.path)(e)),
            },
        }
    }

    /// Write the staged bytes `[from, from + len)` at the same offset.
    fn write(&mut self, from: u64, len: u64) -> Result<(), StoreError> {
        let bytes = &self.staged.map[from as usize..(from + len) as usize];
        self.file
            .write_all_at(bytes, from)
            .map_err(StoreError::io("write", self.path))?;
        self.written += len;
        Ok(())
    }
}

/// Errors that mean "not this range", not "the disk failed".
fn refused(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL | libc::EOPNOTSUPP | libc::EXDEV | libc::ENOTTY)
    )
}

/// Make `dst` share all of `src`'s extents (`FICLONE`).
fn clone_file(src: &File, dst: &File) -> std::io::Result<()> {
    // SAFETY: FICLONE takes the source descriptor as its argument by value; both descriptors
    // are open files owned by the caller for the whole call.
    let r = unsafe { libc::ioctl(dst.as_raw_fd(), libc::FICLONE, src.as_raw_fd()) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Make `[to, to + len)` of `dst` share the extents of `[offset, offset + len)` of `src`
/// (`FICLONERANGE`).
fn clone_range(src: &File, offset: u64, len: u64, dst: &File, to: u64) -> std::io::Result<()> {
    let arg = libc::file_clone_range {
        src_fd: i64::from(src.as_raw_fd()),
        src_offset: offset,
        src_length: len,
        dest_offset: to,
    };
    // SAFETY: FICLONERANGE reads the `file_clone_range` it points to, which lives on this
    // stack frame for the whole call; both descriptors are open files owned by the caller.
    let r = unsafe { libc::ioctl(dst.as_raw_fd(), libc::FICLONERANGE, &arg) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// The probe says no where extents cannot be shared (tmpfs, ext4), and leaves nothing.
    #[test]
    fn the_probe_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let from = dir.path().join("a");
        std::fs::write(&from, b"x").unwrap();
        let _ = can_share(&from, dir.path());
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().flatten().collect();
        assert_eq!(left.len(), 1, "{left:?}");
        assert!(!can_share(&dir.path().join("absent"), dir.path()));
    }
}
