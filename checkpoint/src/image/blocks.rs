//! Page images digested in blocks, so that a restore can check just the pages it reads.
//!
//! A generation of a store chain restores its pages from every generation before it, but
//! only those no later generation replaced: checking the whole of each ancestor's pages file
//! reads and hashes bytes the restore never uses. BLAKE3 is a tree whose aligned power-of-two
//! subtrees can be hashed on their own (`blake3::hazmat`), so every pages file also gets a
//! side file, `<pages>.blocks`, with the chaining value of each [`BLOCK`] of it. Those values
//! merge, up the same tree, into the file's ordinary BLAKE3, which the manifest records as
//! before (`b3sum` still checks it): a restore verifies the side file by that merge, then
//! checks the blocks it reads against it. The side file is an ordinary, digested image file;
//! an image without one is checked whole, as before, so nothing about restoring it changes.

use std::path::Path;

use blake3::hazmat::{
    merge_subtrees_non_root, merge_subtrees_root, ChainingValue, HasherExt, Mode,
};

/// Bytes per block: a power of two, a whole number of BLAKE3 chunks (so every full block is
/// a subtree of the file's tree), large enough to keep the hashing SIMD-wide.
pub const BLOCK: u64 = 16 << 10;

const MAGIC: &[u8; 8] = b"CRYOB3K1";
const HEADER: usize = 8 + 8 + 8;

/// The side file of pages file `name`.
pub fn blocks_name(name: &str) -> String {
    format!("{name}.blocks")
}

/// A pages file hashed as it was written: its manifest record and its blocks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HashedPages {
    /// What the manifest records (the name is filled in by whoever names the file).
    pub record: crate::image::digest::FileRecord,
    /// The blocks, for its side file.
    pub blocks: BlockDigests,
}

/// The chaining value of each block of a file, and the file's length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockDigests {
    /// Bytes in the file.
    pub len: u64,
    /// One per block; none for a file of one block or less (it is checked whole).
    pub cvs: Vec<ChainingValue>,
}

impl BlockDigests {
    /// The number of blocks of a file of `len` bytes.
    pub fn count(len: u64) -> u64 {
        len.div_ceil(BLOCK)
    }

    /// Whether a file of `len` bytes is digested in blocks at all.
    pub fn has_blocks(len: u64) -> bool {
        len > BLOCK
    }

    /// The file's BLAKE3, merged from the blocks (`None` for a file of one block or less).
    pub fn root(&self) -> Option<blake3::Hash> {
        (self.cvs.len() >= 2).then(|| {
            let (l, r) = self.cvs.split_at(left_blocks(self.cvs.len()));
            merge_subtrees_root(&subtree(l), &subtree(r), Mode::Hash)
        })
    }

    /// Whether `data` is block `index` of the file.
    pub fn block_matches(&self, index: u64, data: &[u8]) -> bool {
        self.cvs
            .get(index as usize)
            .is_some_and(|cv| block_cv(index, data) == *cv)
    }

    /// The side file's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER + self.cvs.len() * 32);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&BLOCK.to_le_bytes());
        out.extend_from_slice(&self.len.to_le_bytes());
        for cv in &self.cvs {
            out.extend_from_slice(cv);
        }
        out
    }

    /// Read a side file's bytes back.
    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        let word = |at: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&bytes[at..at + 8]);
            u64::from_le_bytes(w)
        };
        if bytes.len() < HEADER || &bytes[..8] != MAGIC {
            return Err("it does not start with cryo's block digest header".into());
        }
        if word(8) != BLOCK {
            return Err(format!(
                "its blocks are {} bytes, this cryo reads {BLOCK}",
                word(8)
            ));
        }
        let len = word(16);
        let body = &bytes[HEADER..];
        let want = if Self::has_blocks(len) {
            Self::count(len)
        } else {
            0
        };
        if body.len() as u64 != want * 32 {
            return Err(format!(
                "it holds {} bytes of block digests for a file of {len} bytes",
                body.len()
            ));
        }
        let cvs = body
            .chunks_exact(32)
            .map(|c| {
                let mut cv = [0u8; 32];
                cv.copy_from_slice(c);
                cv
            })
            .collect();
        Ok(Self { len, cvs })
    }

    /// Digest `data` (a whole file) in blocks, on `threads` threads: the blocks, and the
    /// file's BLAKE3.
    pub fn of_bytes(data: &[u8], threads: usize) -> (Self, blake3::Hash) {
        let len = data.len() as u64;
        if !Self::has_blocks(len) {
            return (
                Self {
                    len,
                    cvs: Vec::new(),
                },
                blake3::hash(data),
            );
        }
        let blocks: Vec<&[u8]> = data.chunks(BLOCK as usize).collect();
        let per = blocks.len().div_ceil(threads.max(1));
        let mut cvs = Vec::with_capacity(blocks.len());
        std::thread::scope(|s| {
            let shards: Vec<_> = blocks
                .chunks(per)
                .enumerate()
                .map(|(n, shard)| {
                    s.spawn(move || {
                        shard
                            .iter()
                            .enumerate()
                            .map(|(i, b)| block_cv((n * per + i) as u64, b))
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            for shard in shards {
                // A shard only hashes; it cannot panic short of a bug in BLAKE3.
                cvs.extend(shard.join().unwrap_or_default());
            }
        });
        let digests = Self { len, cvs };
        let root = digests.root().unwrap_or_else(|| blake3::hash(data));
        (digests, root)
    }

    /// Digest the file at `path` in blocks, on all cores.
    pub fn of_file(path: &Path) -> std::io::Result<(Self, blake3::Hash)> {
        let file = std::fs::File::open(path)?;
        let len = file.metadata()?.len();
        if len == 0 {
            return Ok(Self::of_bytes(&[], 1));
        }
        // SAFETY: read-only mapping of an image file cryo wrote privately and does not
        // change while it is being digested; dropped before returning.
        let map = unsafe { memmap2::Mmap::map(&file) }?;
        let _ = map.advise(memmap2::Advice::Sequential);
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        Ok(Self::of_bytes(&map, threads))
    }
}

/// The chaining value of block `index`, whose bytes are `data`.
fn block_cv(index: u64, data: &[u8]) -> ChainingValue {
    let mut h = blake3::Hasher::new();
    h.set_input_offset(index * BLOCK);
    h.update(data);
    h.finalize_non_root()
}

/// Where BLAKE3 splits a subtree of `n` blocks (n ≥ 2): after the largest power of two
/// below n (what `hazmat::left_subtree_len` says in bytes, for blocks of whole chunks).
fn left_blocks(n: usize) -> usize {
    1usize << (usize::BITS - 1 - (n - 1).leading_zeros())
}

/// The chaining value of the subtree made of `cvs` (not the root).
fn subtree(cvs: &[ChainingValue]) -> ChainingValue {
    match cvs {
        [one] => *one,
        _ => {
            let (l, r) = cvs.split_at(left_blocks(cvs.len()));
            merge_subtrees_non_root(&subtree(l), &subtree(r), Mode::Hash)
        }
    }
}

/// Block digests built while a file is written front to back (the page receiver's).
#[derive(Default)]
pub struct BlockHasher {
    /// Bytes before `buf`.
    flushed: u64,
    /// The block being filled; a full one is hashed only once more bytes follow (the last
    /// block of a one-block file is the root, not a subtree).
    buf: Vec<u8>,
    cvs: Vec<ChainingValue>,
}

impl BlockHasher {
    /// Add the next bytes of the file.
    pub fn update(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.buf.len() as u64 == BLOCK {
                self.cvs.push(block_cv(self.flushed / BLOCK, &self.buf));
                self.flushed += BLOCK;
                self.buf.clear();
            }
            if self.buf.is_empty() && data.len() as u64 > BLOCK {
                // Whole blocks with more to come go straight from the caller's bytes.
                self.cvs
                    .push(block_cv(self.flushed / BLOCK, &data[..BLOCK as usize]));
                self.flushed += BLOCK;
                data = &data[BLOCK as usize..];
                continue;
            }
            let take = (BLOCK as usize - self.buf.len()).min(data.len());
            self.buf.extend_from_slice(&data[..take]);
            data = &data[take..];
        }
    }

    /// The block digests and the file's BLAKE3.
    pub fn finish(mut self) -> (BlockDigests, blake3::Hash) {
        let len = self.flushed + self.buf.len() as u64;
        if self.cvs.is_empty() {
            let root = blake3::hash(&self.buf);
            return (
                BlockDigests {
                    len,
                    cvs: Vec::new(),
                },
                root,
            );
        }
        if !self.buf.is_empty() {
            self.cvs.push(block_cv(self.flushed / BLOCK, &self.buf));
        }
        let d = BlockDigests { len, cvs: self.cvs };
        let root = d.root().unwrap_or_else(|| blake3::hash(&[]));
        (d, root)
    }
}

#[cfg(test)]
#[path = "blocks_tests.rs"]
mod tests;
