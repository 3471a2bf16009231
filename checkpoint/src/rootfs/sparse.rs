//! Sparse files in the archive, in GNU tar's PAX sparse format 0.1: a regular entry holding
//! only the data extents back to back, preceded by PAX records giving the map:
//!
//! - `GNU.sparse.size`: the file's real size;
//! - `GNU.sparse.numblocks`: how many `(offset, length)` pairs the map has;
//! - `GNU.sparse.map`: `offset,length,offset,length,…` in decimal.
//!
//! GNU tar and bsdtar extract it as the sparse file; the tar crate (and any reader that
//! ignores those records) sees a regular file of the data's length. The apply reads the map
//! itself, writes each extent at its offset and sets the final length: its work grows with the
//! extents and the data, never with the holes. A file ending in a hole ends its map with a
//! zero-length extent at the real size (GNU tar sets the length from it).

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use nix::errno::Errno;
use nix::unistd::{lseek, Whence};
use tar::Entry;

/// Tar block size: extents are widened to it (a few zeros more, aligned writes).
const BLOCK: u64 = 512;

/// The most extents one file's map may have. A file with more is captured with its closest
/// holes filled (stored as zeros), so its map stays a few MB at most.
pub(crate) const MAX_EXTENTS: usize = 65_536;

const SIZE: &str = "GNU.sparse.size";
const NUMBLOCKS: &str = "GNU.sparse.numblocks";
const MAP: &str = "GNU.sparse.map";
const PREFIX: &str = "GNU.sparse.";

/// `(offset, length)` of the data regions of `f` (size `size`), in order, aligned to 512
/// bytes. Empty when the file is all hole.
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

/// At most `max` extents: the smallest holes between them are filled (their zeros stored as
/// data) until the map is short enough.
pub(crate) fn coalesce(extents: Vec<(u64, u64)>, max: usize) -> Vec<(u64, u64)> {
    if extents.len() <= max || max == 0 {
        return extents;
    }
    let mut gaps: Vec<u64> = extents
        .windows(2)
        .map(|w| w[1].0 - (w[0].0 + w[0].1))
        .collect();
    gaps.sort_unstable();
    // Filling every gap up to this size removes at least len - max of them.
    let fill_upto = gaps[extents.len() - max - 1];
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(max);
    let mut filled = 0;
    let must_fill = extents.len() - max;
    for (off, len) in extents {
        match out.last_mut() {
            Some(last) if filled < must_fill && off - (last.0 + last.1) <= fill_upto => {
                last.1 = off + len - last.0;
                filled += 1;
            }
            _ => out.push((off, len)),
        }
    }
    out
}

/// The PAX records describing a file of `size` bytes with data in `extents`.
pub(crate) fn pax_records(size: u64, extents: &[(u64, u64)]) -> Vec<(String, Vec<u8>)> {
    let mut map: Vec<(u64, u64)> = extents.to_vec();
    if map.last().map(|(o, l)| o + l) != Some(size) {
        map.push((size, 0));
    }
    let text: Vec<String> = map.iter().map(|(o, l)| format!("{o},{l}")).collect();
    vec![
        (SIZE.to_string(), size.to_string().into_bytes()),
        (NUMBLOCKS.to_string(), map.len().to_string().into_bytes()),
        (MAP.to_string(), text.join(",").into_bytes()),
    ]
}

/// The data of `extents` of `f`, back to back: what a sparse entry stores. A file that
/// shrank under us (only possible when something outside the frozen container writes to it)
/// reads as zeros past its end, so the archive keeps the sizes its headers announce.
pub(crate) struct ExtentReader<'a> {
    f: &'a File,
    extents: &'a [(u64, u64)],
    /// Bytes of `extents[0]` already delivered.
    done: u64,
}

impl<'a> ExtentReader<'a> {
    pub(crate) fn new(f: &'a File, extents: &'a [(u64, u64)]) -> Self {
        ExtentReader {
            f,
            extents,
            done: 0,
        }
    }
}

impl Read for ExtentReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let Some(&(off, len)) = self.extents.first() else {
                return Ok(0);
            };
            if self.done == len {
                self.extents = &self.extents[1..];
                self.done = 0;
                continue;
            }
            let want = (len - self.done).min(buf.len() as u64) as usize;
            if want == 0 {
                return Ok(0);
            }
            let n = match self.f.read_at(&mut buf[..want], off + self.done)? {
                0 => {
                    buf[..want].fill(0);
                    want
                }
                n => n,
            };
            self.done += n as u64;
            return Ok(n);
        }
    }
}

/// A sparse entry's map, checked: sorted, not overlapping, within the real size, the lengths
/// adding up to the data the entry holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SparseMap {
    /// The file's size.
    pub(crate) real_size: u64,
    /// `(offset, length)` of the data, in the order the entry holds it.
    pub(crate) extents: Vec<(u64, u64)>,
}

/// A decimal number as GNU tar writes it: digits only.
fn number(what: &str, s: &[u8]) -> Result<u64, String> {
    let bad = || {
        format!(
            "{what}: {:?} is not a decimal number",
            String::from_utf8_lossy(s)
        )
    };
    if s.is_empty() || s.len() > 20 || !s.iter().all(u8::is_ascii_digit) {
        return Err(bad());
    }
    std::str::from_utf8(s)
        .map_err(|_| bad())?
        .parse::<u64>()
        .map_err(|_| bad())
}

/// The sparse map of `entry` (whose data is `data_len` bytes), if its PAX records give one.
pub(crate) fn sparse_map<R: Read>(
    entry: &mut Entry<'_, R>,
    data_len: u64,
) -> Result<Option<SparseMap>, String> {
    let Some(exts) = entry
        .pax_extensions()
        .map_err(|e| format!("bad PAX header: {e}"))?
    else {
        return Ok(None);
    };
    let (mut size, mut count, mut map) = (None, None, None);
    for ext in exts {
        let ext = ext.map_err(|e| format!("bad PAX record: {e}"))?;
        let Ok(key) = ext.key() else { continue };
        let Some(rest) = key.strip_prefix(PREFIX) else {
            continue;
        };
        let v = ext.value_bytes();
        match rest {
            "size" => size = Some(number(SIZE, v)?),
            "numblocks" => count = Some(number(NUMBLOCKS, v)?),
            "map" => map = Some(v.to_vec()),
            "major" if v == b"0" => {}
            "minor" if v == b"1" => {}
            _ => {
                return Err(format!(
                    "PAX record {key}: only GNU tar's sparse format 0.1 (GNU.sparse.size, \
                     numblocks and map) is supported"
                ))
            }
        }
    }
    let (real_size, count, map) = match (size, count, map) {
        (None, None, None) => return Ok(None),
        (Some(s), Some(c), Some(m)) => (s, c, m),
        _ => {
            return Err(format!(
                "incomplete sparse map: {SIZE}, {NUMBLOCKS} and {MAP} must all be given"
            ))
        }
    };
    if count > MAX_EXTENTS as u64 {
        return Err(format!(
            "sparse map of {count} extents: at most {MAX_EXTENTS} are accepted"
        ));
    }
    let fields: Vec<&[u8]> = if map.is_empty() {
        Vec::new()
    } else {
        map.split(|b| *b == b',').collect()
    };
    if fields.len() as u64 != count * 2 {
        return Err(format!(
            "sparse map has {} numbers, {NUMBLOCKS} says {count} pairs",
            fields.len()
        ));
    }
    let mut extents = Vec::with_capacity(count as usize);
    let (mut end, mut stored) = (0u64, 0u64);
    for pair in fields.chunks(2) {
        let off = number(MAP, pair[0])?;
        let len = number(MAP, pair[1])?;
        let stop = off
            .checked_add(len)
            .filter(|s| *s <= real_size)
            .ok_or_else(|| {
                format!("sparse extent {off}+{len} ends past the file's size {real_size}")
            })?;
        if off < end {
            return Err(format!(
                "sparse extent at {off} overlaps or precedes the one ending at {end}"
            ));
        }
        end = stop;
        stored = stored.saturating_add(len);
        extents.push((off, len));
    }
    if stored != data_len {
        return Err(format!(
            "sparse map covers {stored} bytes of data but the entry holds {data_len}"
        ));
    }
    Ok(Some(SparseMap { real_size, extents }))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::io::Write;

    fn archive_of(records: &[(String, Vec<u8>)], data: &[u8]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        b.append_pax_extensions(records.iter().map(|(k, v)| (k.as_str(), v.as_slice())))
            .unwrap();
        let mut h = tar::Header::new_ustar();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        b.append_data(&mut h, "f", data).unwrap();
        b.into_inner().unwrap()
    }

    fn map_of(records: &[(&str, &str)], data_len: usize) -> Result<Option<SparseMap>, String> {
        let recs: Vec<(String, Vec<u8>)> = records
            .iter()
            .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
            .collect();
        let bytes = archive_of(&recs, &vec![1u8; data_len]);
        let mut ar = tar::Archive::new(&bytes[..]);
        let mut e = ar.entries().unwrap().next().unwrap().unwrap();
        let size = e.size();
        sparse_map(&mut e, size)
    }

    #[test]
    fn maps_are_checked_strictly() {
        let ok = map_of(
            &[
                (SIZE, "10000"),
                (NUMBLOCKS, "3"),
                (MAP, "0,10,512,20,10000,0"),
            ],
            30,
        )
        .unwrap()
        .unwrap();
        assert_eq!(ok.real_size, 10000);
        assert_eq!(ok.extents, vec![(0, 10), (512, 20), (10000, 0)]);
        assert_eq!(map_of(&[("SCHILY.xattr.user.x", "y")], 5).unwrap(), None);
        let refused = [
            (
                vec![(SIZE, "100"), (NUMBLOCKS, "1"), (MAP, "90,20")],
                20,
                "past the file",
            ),
            (
                vec![(SIZE, "100"), (NUMBLOCKS, "2"), (MAP, "0,20,10,5")],
                25,
                "overlaps",
            ),
            (
                vec![(SIZE, "100"), (NUMBLOCKS, "2"), (MAP, "50,5,0,5")],
                10,
                "precedes",
            ),
            (
                vec![(SIZE, "100"), (NUMBLOCKS, "1"), (MAP, "0,10")],
                11,
                "entry holds 11",
            ),
            (
                vec![(SIZE, "100"), (NUMBLOCKS, "2"), (MAP, "0,10")],
                10,
                "says 2 pairs",
            ),
            (
                vec![(SIZE, "+100"), (NUMBLOCKS, "1"), (MAP, "0,1")],
                1,
                "not a decimal",
            ),
            (vec![(SIZE, "100"), (MAP, "0,1")], 1, "incomplete"),
            (
                vec![(SIZE, "1"), (NUMBLOCKS, "99999999"), (MAP, "")],
                0,
                "at most",
            ),
            (vec![("GNU.sparse.realsize", "100")], 0, "format 0.1"),
            (
                vec![
                    (SIZE, "18446744073709551615"),
                    (NUMBLOCKS, "1"),
                    (MAP, "18446744073709551615,1"),
                ],
                1,
                "past the file",
            ),
        ];
        for (recs, len, why) in refused {
            let e = map_of(&recs, len).unwrap_err();
            assert!(e.contains(why), "{recs:?}: {e}");
        }
    }

    #[test]
    fn coalescing_keeps_every_byte_and_bounds_the_map() {
        let ext: Vec<(u64, u64)> = (0..100u64)
            .map(|i| (i * 4096 + (i % 7) * 512, 512))
            .collect();
        let c = coalesce(ext.clone(), 10);
        assert!(c.len() <= 10, "{}", c.len());
        for (o, l) in &ext {
            assert!(
                c.iter().any(|(co, cl)| co <= o && o + l <= co + cl),
                "{o} lost"
            );
        }
        assert!(c.windows(2).all(|w| w[0].0 + w[0].1 <= w[1].0));
        assert_eq!(coalesce(ext.clone(), 1000), ext);
    }

    /// GNU tar itself extracts the format: same data at the same offsets, same size, holes.
    #[test]
    fn gnu_tar_extracts_the_sparse_file() {
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("src");
        let f = File::create(&src).unwrap();
        let size = 64u64 << 20;
        f.set_len(size).unwrap();
        for (i, off) in [4096u64, 10 << 20, 40 << 20].iter().enumerate() {
            f.write_all_at(&[b'a' + i as u8; 3000], *off).unwrap();
        }
        let f = File::open(&src).unwrap();
        let ext = data_extents(&f, size).unwrap();
        let mut recs = pax_records(size, &ext);
        recs.push(("path".into(), b"out/sparse".to_vec()));
        let mut data = Vec::new();
        ExtentReader::new(&f, &ext).read_to_end(&mut data).unwrap();
        assert_eq!(data.len() as u64, ext.iter().map(|e| e.1).sum::<u64>());
        let bytes = archive_of(&recs, &data);
        let tarball = t.path().join("a.tar");
        std::fs::File::create(&tarball)
            .unwrap()
            .write_all(&bytes)
            .unwrap();
        let st = std::process::Command::new("tar")
            .arg("-xf")
            .arg(&tarball)
            .arg("-C")
            .arg(t.path())
            .status()
            .expect("GNU tar runs");
        assert!(st.success());
        let out = t.path().join("out/sparse");
        let got = std::fs::read(&out).unwrap();
        assert_eq!(got, std::fs::read(&src).unwrap());
        let blocks = std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&out).unwrap());
        assert!(blocks * 512 < 1 << 20, "extracted dense: {blocks} blocks");
        // The tar crate sees a plain file of the data's length.
        let mut ar = tar::Archive::new(&bytes[..]);
        let e = ar.entries().unwrap().next().unwrap().unwrap();
        assert_eq!(e.size(), data.len() as u64);
        assert_eq!(e.header().entry_type(), tar::EntryType::Regular);
    }
}
