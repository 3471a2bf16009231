//! CRIU's pagemap images read back (images/pagemap.proto, the framing of criu/image.c): two
//! magics, a `pagemap_head` naming the pages image (`pages-<id>.img`), then one
//! `pagemap_entry` per run of pages. The writing side is
//! [`crate::page_receiver::protocol`].

use std::path::{Path, PathBuf};

use protobuf::CodedInputStream;

use crate::page_receiver::protocol::{self, PAGE_SIZE, PE_PARENT, PE_PRESENT};

const IMG_COMMON_MAGIC: u32 = 0x5456_4319;
const PAGEMAP_MAGIC: u32 = 0x5608_4025;

/// One run of pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// Address (or offset, for shared memory) of the first page.
    pub vaddr: u64,
    /// Number of pages.
    pub nr_pages: u64,
    /// `PE_*` flags.
    pub flags: u32,
}

impl Entry {
    /// The pages are in this image's pages file.
    pub fn present(&self) -> bool {
        self.flags & PE_PRESENT != 0
    }

    /// The pages are in the parent image.
    pub fn in_parent(&self) -> bool {
        self.flags & PE_PARENT != 0
    }

    /// Bytes covered.
    pub fn len(&self) -> u64 {
        self.nr_pages * PAGE_SIZE
    }

    /// Whether it covers nothing.
    pub fn is_empty(&self) -> bool {
        self.nr_pages == 0
    }

    /// The address after the last page.
    pub fn end(&self) -> u64 {
        self.vaddr + self.len()
    }
}

/// A pagemap image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pagemap {
    /// The pages image is `pages-<pages_id>.img`.
    pub pages_id: u32,
    /// The runs, in the order CRIU restores them (ascending addresses).
    pub entries: Vec<Entry>,
}

/// A pagemap image that cannot be read.
#[derive(Debug, thiserror::Error)]
#[error("{path} is not a readable CRIU pagemap image: {reason}")]
pub struct PagemapError {
    /// The file.
    pub path: PathBuf,
    /// What is wrong.
    pub reason: String,
}

impl Pagemap {
    /// Read `path`.
    pub fn read(path: &Path) -> Result<Self, PagemapError> {
        let fail = |reason: String| PagemapError {
            path: path.to_path_buf(),
            reason,
        };
        let bytes = std::fs::read(path).map_err(|e| fail(e.to_string()))?;
        Self::parse(&bytes).map_err(fail)
    }

    /// Parse the bytes of a pagemap image.
    pub fn parse(bytes: &[u8]) -> Result<Self, String> {
        let word = |at: usize| -> Option<u32> {
            bytes
                .get(at..at + 4)
                .map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
        };
        if word(0) != Some(IMG_COMMON_MAGIC) || word(4) != Some(PAGEMAP_MAGIC) {
            return Err("it does not start with CRIU's pagemap magic".into());
        }
        let mut records = Records { bytes, at: 8 };
        let head = records.next_record()?.ok_or("it has no pagemap head")?;
        let pages_id = parse_head(head)?;
        let mut entries = Vec::new();
        let mut last_end = 0u64;
        while let Some(rec) = records.next_record()? {
            let e = parse_entry(rec)?;
            if e.vaddr < last_end {
                return Err(format!(
                    "its entries are not in ascending order (0x{:x} after 0x{last_end:x})",
                    e.vaddr
                ));
            }
            last_end = e
                .nr_pages
                .checked_mul(PAGE_SIZE)
                .and_then(|l| e.vaddr.checked_add(l))
                .ok_or("an entry runs past the end of the address space")?;
            entries.push(e);
        }
        Ok(Self { pages_id, entries })
    }

    /// The image's bytes, as CRIU writes them.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = protocol::pagemap_head(self.pages_id);
        for e in &self.entries {
            protocol::push_pagemap_entry(&mut out, e.vaddr, e.nr_pages, e.flags);
        }
        out
    }

    /// Bytes of pages this image's own pages file holds.
    pub fn present_bytes(&self) -> u64 {
        self.entries
            .iter()
            .filter(|e| e.present())
            .map(Entry::len)
            .sum()
    }
}

/// The name of the pages image a pagemap names.
pub fn pages_name(pages_id: u32) -> String {
    format!("pages-{pages_id}.img")
}

/// Whether `name` is a pagemap image (a task's or a shared memory segment's).
pub fn is_pagemap_name(name: &str) -> bool {
    name.starts_with("pagemap-") && name.ends_with(".img")
}

/// The pagemap images in `dir`, sorted.
pub fn pagemap_names(dir: &Path) -> Result<Vec<String>, super::StoreError> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map_err(super::StoreError::io("list", dir))?
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| is_pagemap_name(n))
        .collect();
    names.sort();
    Ok(names)
}

/// CRIU's record framing: a native-endian u32 length, then the message.
struct Records<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Records<'a> {
    fn next_record(&mut self) -> Result<Option<&'a [u8]>, String> {
        if self.at == self.bytes.len() {
            return Ok(None);
        }
        let len = self
            .bytes
            .get(self.at..self.at + 4)
            .map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]) as usize)
            .ok_or("it ends inside a record's length")?;
        let start = self.at + 4;
        let rec = self
            .bytes
            .get(start..start + len)
            .ok_or("it ends inside a record (truncated)")?;
        self.at = start + len;
        Ok(Some(rec))
    }
}

fn parse_head(rec: &[u8]) -> Result<u32, String> {
    let mut s = CodedInputStream::from_bytes(rec);
    let mut pages_id = None;
    while let Some(tag) = s.read_raw_tag_or_eof().map_err(|e| e.to_string())? {
        match tag >> 3 {
            1 => pages_id = Some(s.read_uint32().map_err(|e| e.to_string())?),
            _ => skip(&mut s, tag)?,
        }
    }
    pages_id.ok_or_else(|| "its head names no pages image".into())
}

/// An entry with the compatibility rules CRIU applies to images of older versions: a set
/// `in_parent` means [`PE_PARENT`], no flags at all means [`PE_PRESENT`], and the 32-bit
/// page count stands in for a missing 64-bit one.
fn parse_entry(rec: &[u8]) -> Result<Entry, String> {
    let mut s = CodedInputStream::from_bytes(rec);
    let (mut vaddr, mut compat_nr, mut in_parent, mut flags, mut nr) =
        (None, 0u64, false, None, None);
    let err = |e: protobuf::Error| e.to_string();
    while let Some(tag) = s.read_raw_tag_or_eof().map_err(err)? {
        match tag >> 3 {
            1 => vaddr = Some(s.read_uint64().map_err(err)?),
            2 => compat_nr = u64::from(s.read_uint32().map_err(err)?),
            3 => in_parent = s.read_bool().map_err(err)?,
            4 => flags = Some(s.read_uint32().map_err(err)?),
            5 => nr = Some(s.read_uint64().map_err(err)?),
            _ => skip(&mut s, tag)?,
        }
    }
    let vaddr = vaddr.ok_or("an entry has no address")?;
    let flags = if in_parent {
        flags.unwrap_or(0) | PE_PARENT
    } else {
        flags.unwrap_or(PE_PRESENT)
    };
    Ok(Entry {
        vaddr,
        nr_pages: nr.unwrap_or(compat_nr),
        flags,
    })
}

fn skip(s: &mut CodedInputStream<'_>, tag: u32) -> Result<(), String> {
    let wire = protobuf::rt::WireType::new(tag & 7).ok_or("an unknown wire type")?;
    s.skip_field(wire).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn round_trips_what_the_receiver_writes() {
        let pm = Pagemap {
            pages_id: 3,
            entries: vec![
                Entry {
                    vaddr: 0x40_1000,
                    nr_pages: 2,
                    flags: PE_PRESENT,
                },
                Entry {
                    vaddr: 0x7fff_0000_0000,
                    nr_pages: 1 << 20,
                    flags: PE_PARENT,
                },
            ],
        };
        let bytes = pm.encode();
        assert_eq!(Pagemap::parse(&bytes).unwrap(), pm);
        assert_eq!(pm.present_bytes(), 2 * PAGE_SIZE);
    }

    #[test]
    fn refuses_what_is_not_a_pagemap() {
        let pm = Pagemap {
            pages_id: 1,
            entries: vec![Entry {
                vaddr: 0x1000,
                nr_pages: 1,
                flags: PE_PRESENT,
            }],
        };
        let bytes = pm.encode();
        assert!(Pagemap::parse(&bytes[..bytes.len() - 1])
            .unwrap_err()
            .contains("truncated"));
        assert!(Pagemap::parse(b"not a pagemap")
            .unwrap_err()
            .contains("magic"));
        let mut backwards = pm.clone();
        backwards.entries.push(Entry {
            vaddr: 0,
            nr_pages: 1,
            flags: PE_PRESENT,
        });
        assert!(Pagemap::parse(&backwards.encode())
            .unwrap_err()
            .contains("ascending"));
    }

    #[test]
    fn older_entries_read_as_criu_reads_them() {
        use protobuf::CodedOutputStream;
        let mut entry = Vec::new();
        {
            let mut s = CodedOutputStream::vec(&mut entry);
            s.write_uint64(1, 0x2000).unwrap();
            s.write_uint32(2, 7).unwrap();
            s.write_bool(3, true).unwrap();
            s.flush().unwrap();
        }
        let mut bytes = protocol::pagemap_head(1);
        bytes.extend_from_slice(&(entry.len() as u32).to_ne_bytes());
        bytes.extend_from_slice(&entry);
        let pm = Pagemap::parse(&bytes).unwrap();
        assert_eq!(
            pm.entries,
            vec![Entry {
                vaddr: 0x2000,
                nr_pages: 7,
                flags: PE_PARENT
            }]
        );
    }
}
