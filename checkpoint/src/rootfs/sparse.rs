//! Sparse files in the archive: finding the data extents with SEEK_DATA/SEEK_HOLE and writing
//! them as old-GNU sparse entries (type `S`).
//!
//! The tar crate reads this format but cannot write it, so the header bytes are built here:
//! a GNU header whose `size` is the stored data and `realsize` the file size, the first 4
//! extents in the header's sparse map, `isextended` set when 512-byte extension headers of 21
//! extents each follow, then the data of every extent back to back, padded to 512 bytes.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use nix::errno::Errno;
use nix::unistd::{lseek, Whence};
use tar::{EntryType, GnuExtSparseHeader, Header};

/// Tar block size.
const BLOCK: u64 = 512;
/// Extents held by the main GNU header.
const IN_HEADER: usize = 4;
/// Extents held by one extension header.
const PER_EXTENSION: usize = 21;

/// `(offset, length)` of the data regions of `f` (size `size`), in order, aligned to 512
/// bytes (the tar reader wants every data chunk but the last to be a multiple of 512; the
/// widened regions just carry a few zeros). Empty when the file is all hole.
pub(crate) fn data_extents(f: &File, size: u64) -> io::Result<Vec<(u64, u64)>> {
    let fd = f.as_raw_fd();
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut pos: u64 = 0;
    while pos < size {
        let at = i64::try_from(pos).map_err(|_| io::Error::from(Errno::EOVERFLOW))?;
        let data = match lseek(fd, at, Whence::SeekData) {
            Ok(d) => d as u64,
            // No data after `pos`: the rest is a hole.
            Err(Errno::ENXIO) => break,
            Err(e) => return Err(e.into()),
        };
        if data >= size {
            break;
        }
        let hole = lseek(fd, data as i64, Whence::SeekHole)? as u64;
        let start = data / BLOCK * BLOCK;
        let end = hole.div_ceil(BLOCK).saturating_mul(BLOCK).min(size);
        match out.last_mut() {
            Some(last) if last.0 + last.1 >= start => last.1 = end.max(last.0 + last.1) - last.0,
            _ => out.push((start, end - start)),
        }
        pos = hole.max(data + 1);
    }
    Ok(out)
}

/// Whether `extents` leave holes in a file of `size` bytes.
pub(crate) fn has_holes(extents: &[(u64, u64)], size: u64) -> bool {
    extents.iter().map(|e| e.1).sum::<u64>() < size
}

/// Write a GNU long-name entry (`L`) for `path` when it does not fit the 100-byte name field;
/// otherwise put it in `h`. (The tar crate does this for its own entries; sparse entries are
/// written by hand.)
fn set_path(w: &mut impl Write, h: &mut Header, path: &[u8]) -> io::Result<()> {
    let g = h
        .as_gnu_mut()
        .ok_or_else(|| io::Error::other("not a GNU header"))?;
    if path.len() <= g.name.len() {
        g.name = [0; 100];
        g.name[..path.len()].copy_from_slice(path);
        return Ok(());
    }
    let mut l = Header::new_gnu();
    let name = b"././@LongLink";
    if let Some(lg) = l.as_gnu_mut() {
        lg.name[..name.len()].copy_from_slice(name);
    }
    l.set_mode(0o644);
    l.set_entry_type(EntryType::GNULongName);
    l.set_size(path.len() as u64 + 1);
    l.set_cksum();
    w.write_all(l.as_bytes())?;
    w.write_all(path)?;
    w.write_all(&[0])?;
    pad(w, path.len() as u64 + 1)?;
    // The reader takes the long name; the header keeps a truncated copy for old tools.
    g.name = [0; 100];
    g.name[..99].copy_from_slice(&path[..99]);
    Ok(())
}

/// Zeros up to the next 512-byte boundary after `len` bytes of data.
fn pad(w: &mut impl Write, len: u64) -> io::Result<()> {
    let n = ((BLOCK - len % BLOCK) % BLOCK) as usize;
    w.write_all(&[0u8; BLOCK as usize][..n])
}

/// Write `f` (`size` bytes, data in `extents`) as a GNU sparse entry named `path`, with the
/// mode/owner/times already set in `h`. Returns the data bytes stored.
pub(crate) fn write_sparse(
    w: &mut impl Write,
    mut h: Header,
    path: &[u8],
    f: &File,
    size: u64,
    extents: &[(u64, u64)],
    buf: &mut [u8],
) -> io::Result<u64> {
    let stored: u64 = extents.iter().map(|e| e.1).sum();
    let mut map: Vec<(u64, u64)> = extents.to_vec();
    // The reader checks the map reaches the real size: a file ending in a hole ends with an
    // empty extent at its end.
    if map.last().map(|(o, l)| o + l) != Some(size) {
        map.push((size, 0));
    }
    set_path(w, &mut h, path)?;
    h.set_entry_type(EntryType::GNUSparse);
    h.set_size(stored);
    let (head, rest) = map.split_at(map.len().min(IN_HEADER));
    let chunks: Vec<&[(u64, u64)]> = rest.chunks(PER_EXTENSION).collect();
    let g = h
        .as_gnu_mut()
        .ok_or_else(|| io::Error::other("not a GNU header"))?;
    for (slot, (off, len)) in g.sparse.iter_mut().zip(head) {
        slot.set_offset(*off);
        slot.set_length(*len);
    }
    g.isextended[0] = u8::from(!chunks.is_empty());
    g.set_real_size(size);
    h.set_cksum();
    w.write_all(h.as_bytes())?;
    for (i, chunk) in chunks.iter().enumerate() {
        let mut x = GnuExtSparseHeader::new();
        for (slot, (off, len)) in x.sparse.iter_mut().zip(chunk.iter()) {
            slot.set_offset(*off);
            slot.set_length(*len);
        }
        x.isextended[0] = u8::from(i + 1 < chunks.len());
        w.write_all(x.as_bytes())?;
    }
    for (off, len) in extents {
        copy_range(w, f, *off, *len, buf)?;
    }
    pad(w, stored)?;
    Ok(stored)
}

/// Copy `len` bytes of `f` from `off`. A file that shrank under us (only possible when
/// something outside the frozen container writes to it) reads as zeros past its end, so the
/// archive keeps the sizes its headers announce.
pub(crate) fn copy_range(
    w: &mut impl Write,
    f: &File,
    mut off: u64,
    len: u64,
    buf: &mut [u8],
) -> io::Result<()> {
    let mut left = len;
    while left > 0 {
        let want = (left.min(buf.len() as u64)) as usize;
        let n = match f.read_at(&mut buf[..want], off) {
            Ok(0) => {
                buf[..want].fill(0);
                want
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        w.write_all(&buf[..n])?;
        off += n as u64;
        left -= n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::io::Read;
    use std::os::unix::fs::MetadataExt;

    /// A 1 GiB file with a few KiB of data, in a tar of a few KiB, read back by the tar crate
    /// with the same content at the same offsets.
    #[test]
    fn one_gib_sparse_file_costs_kilobytes() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("big");
        let f = File::create(&p).unwrap();
        const GIB: u64 = 1 << 30;
        f.set_len(GIB).unwrap();
        let offsets = [0u64, 4096 * 1000 + 100, 700 << 20, GIB - 10];
        for (i, o) in offsets.iter().enumerate() {
            f.write_all_at(&[b'a' + i as u8; 10], *o).unwrap();
        }
        let f = File::open(&p).unwrap();
        let ext = data_extents(&f, GIB).unwrap();
        assert!(has_holes(&ext, GIB));
        let mut h = Header::new_gnu();
        h.set_mode(0o640);
        let long = format!("{}/big", "d".repeat(120));
        let mut out = Vec::new();
        let mut buf = vec![0u8; 1 << 16];
        let stored = write_sparse(&mut out, h, long.as_bytes(), &f, GIB, &ext, &mut buf).unwrap();
        assert!(stored <= 4 * 8192, "{stored} bytes stored");
        out.extend_from_slice(&[0u8; 1024]);
        assert!(out.len() < 64 * 1024, "archive of {} bytes", out.len());
        let mut ar = tar::Archive::new(&out[..]);
        let mut e = ar.entries().unwrap().next().unwrap().unwrap();
        assert_eq!(e.path_bytes().as_ref(), long.as_bytes());
        assert_eq!(e.size(), GIB);
        let mut got = [0u8; 10];
        let mut pos = 0u64;
        let mut chunk = vec![0u8; 1 << 20];
        let mut found = Vec::new();
        loop {
            let n = e.read(&mut chunk).unwrap();
            if n == 0 {
                break;
            }
            for o in offsets {
                if o >= pos && o + 10 <= pos + n as u64 {
                    let s = (o - pos) as usize;
                    got.copy_from_slice(&chunk[s..s + 10]);
                    found.push(got[0]);
                }
            }
            pos += n as u64;
        }
        assert_eq!(pos, GIB);
        assert_eq!(found, vec![b'a', b'b', b'c', b'd']);
        assert!(std::fs::metadata(&p).unwrap().blocks() < 1024);
    }

    /// More than 4 extents need extension headers; a file ending in a hole needs the final
    /// empty extent.
    #[test]
    fn many_extents_and_trailing_hole() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("f");
        let f = File::create(&p).unwrap();
        let size = 200u64 << 20;
        f.set_len(size).unwrap();
        for i in 0..60u64 {
            f.write_all_at(&[i as u8 + 1; 3000], i * (3 << 20)).unwrap();
        }
        let f = File::open(&p).unwrap();
        let ext = data_extents(&f, size).unwrap();
        assert_eq!(ext.len(), 60);
        let mut out = Vec::new();
        let mut buf = vec![0u8; 1 << 16];
        write_sparse(&mut out, Header::new_gnu(), b"f", &f, size, &ext, &mut buf).unwrap();
        out.extend_from_slice(&[0u8; 1024]);
        let mut ar = tar::Archive::new(&out[..]);
        let mut e = ar.entries().unwrap().next().unwrap().unwrap();
        let mut all = Vec::new();
        e.read_to_end(&mut all).unwrap();
        assert_eq!(all.len() as u64, size);
        for i in 0..60u64 {
            let o = (i * (3 << 20)) as usize;
            assert!(all[o..o + 3000].iter().all(|b| *b == i as u8 + 1));
            assert_eq!(all[o + 3000], 0);
        }
    }
}
