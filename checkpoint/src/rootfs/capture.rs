//! Writing the changeset. Runs inside the freeze window: one pass, buffered, no compression.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tar::{Builder, EntryType, GnuExtSparseHeader, Header, HeaderMode};

use super::{io_err, RootfsError, OPAQUE_MARKER, WHITEOUT_PREFIX};

/// Capture options.
#[derive(Debug, Clone, Default)]
pub struct CaptureOptions {
    /// Treat the tree as a plain directory (no overlay whiteout/opaque translation).
    pub plain: bool,
}

/// What a capture wrote.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CaptureReport {
    /// Archive entries.
    pub entries: u64,
    /// Bytes of file data.
    pub bytes: u64,
    /// Whiteouts translated.
    pub whiteouts: u64,
    /// Opaque directories.
    pub opaque_dirs: u64,
    /// Real device nodes (the only ones a restore may create).
    pub device_nodes: Vec<String>,
    /// Time taken.
    pub elapsed: Duration,
}

struct Walker<W: Write> {
    tar: Builder<W>,
    plain: bool,
    links: HashMap<(u64, u64), PathBuf>,
    report: CaptureReport,
}

/// Capture an overlay upper dir into an uncompressed tar at `out`.
pub fn capture_upper(
    upper: &Path,
    out: &Path,
    opts: &CaptureOptions,
) -> Result<CaptureReport, RootfsError> {
    let start = Instant::now();
    let file = File::create(out).map_err(io_err("create", out))?;
    let mut w = Walker {
        tar: Builder::new(BufWriter::with_capacity(1 << 20, file)),
        plain: opts.plain,
        links: HashMap::new(),
        report: CaptureReport::default(),
    };
    w.tar.follow_symlinks(false);
    w.walk(upper, Path::new(""))?;
    let inner = w.tar.into_inner().map_err(io_err("finish", out))?;
    let file = inner.into_inner().map_err(|e| RootfsError::Io {
        step: "flush",
        path: out.to_path_buf(),
        source: e.into_error(),
    })?;
    file.sync_data().map_err(io_err("sync", out))?;
    w.report.elapsed = start.elapsed();
    Ok(w.report)
}

/// Capture a plain directory (a host-mounted /dev/shm).
pub fn capture_dir(dir: &Path, out: &Path) -> Result<CaptureReport, RootfsError> {
    capture_upper(dir, out, &CaptureOptions { plain: true })
}

impl<W: Write> Walker<W> {
    fn walk(&mut self, dir: &Path, rel: &Path) -> Result<(), RootfsError> {
        let mut names: Vec<_> = fs::read_dir(dir)
            .map_err(io_err("list", dir))?
            .filter_map(Result::ok)
            .map(|e| e.file_name())
            .collect();
        names.sort();
        for name in names {
            let host = dir.join(&name);
            let rel = rel.join(&name);
            let md = fs::symlink_metadata(&host).map_err(io_err("stat", &host))?;
            let ft = md.file_type();
            if !self.plain && ft.is_char_device() && md.rdev() == 0 {
                let wh = rel.with_file_name(format!("{WHITEOUT_PREFIX}{}", name.to_string_lossy()));
                self.empty_file(&wh)?;
                self.report.whiteouts += 1;
                continue;
            }
            self.xattrs(&host)?;
            let mut h = Header::new_gnu();
            h.set_metadata_in_mode(&md, HeaderMode::Complete);
            self.report.entries += 1;
            if ft.is_dir() {
                h.set_entry_type(EntryType::Directory);
                h.set_size(0);
                self.tar
                    .append_data(&mut h, &rel, std::io::empty())
                    .map_err(io_err("write", &host))?;
                if !self.plain && is_opaque(&host) {
                    self.empty_file(&rel.join(OPAQUE_MARKER))?;
                    self.report.opaque_dirs += 1;
                }
                self.walk(&host, &rel)?;
            } else if ft.is_symlink() {
                let target = fs::read_link(&host).map_err(io_err("readlink", &host))?;
                h.set_size(0);
                self.tar
                    .append_link(&mut h, &rel, &target)
                    .map_err(io_err("write", &host))?;
            } else if ft.is_file() {
                if md.nlink() > 1 {
                    if let Some(first) = self.links.get(&(md.dev(), md.ino())) {
                        h.set_entry_type(EntryType::Link);
                        h.set_size(0);
                        let first = first.clone();
                        self.tar
                            .append_link(&mut h, &rel, &first)
                            .map_err(io_err("write", &host))?;
                        continue;
                    }
                    self.links.insert((md.dev(), md.ino()), rel.clone());
                }
                self.regular(&host, &rel, h, &md)?;
            } else {
                // fifo, char or block device
                h.set_size(0);
                if ft.is_char_device() || ft.is_block_device() {
                    // The tar crate fills device numbers only for ustar headers: set them.
                    let rdev = md.rdev();
                    h.set_device_major(libc::major(rdev))
                        .map_err(io_err("device", &host))?;
                    h.set_device_minor(libc::minor(rdev))
                        .map_err(io_err("device", &host))?;
                    self.report
                        .device_nodes
                        .push(rel.to_string_lossy().into_owned());
                }
                self.tar
                    .append_data(&mut h, &rel, std::io::empty())
                    .map_err(io_err("write", &host))?;
            }
        }
        Ok(())
    }

    fn empty_file(&mut self, rel: &Path) -> Result<(), RootfsError> {
        let mut h = Header::new_gnu();
        h.set_entry_type(EntryType::Regular);
        h.set_mode(0o600);
        h.set_size(0);
        self.report.entries += 1;
        self.tar
            .append_data(&mut h, rel, std::io::empty())
            .map_err(io_err("write", rel))
    }

    fn xattrs(&mut self, host: &Path) -> Result<(), RootfsError> {
        let Ok(names) = xattr::list(host) else {
            return Ok(());
        };
        let mut pax: Vec<(String, Vec<u8>)> = Vec::new();
        for n in names {
            let name = n.to_string_lossy().into_owned();
            if name.starts_with("trusted.overlay.") || name.starts_with("user.overlay.") {
                continue; // overlay's own bookkeeping, translated (opaque) or meaningless elsewhere
            }
            if let Ok(Some(v)) = xattr::get(host, &n) {
                pax.push((format!("SCHILY.xattr.{name}"), v));
            }
        }
        if pax.is_empty() {
            return Ok(());
        }
        self.tar
            .append_pax_extensions(pax.iter().map(|(k, v)| (k.as_str(), v.as_slice())))
            .map_err(io_err("write xattrs", host))
    }

    fn regular(
        &mut self,
        host: &Path,
        rel: &Path,
        mut h: Header,
        md: &fs::Metadata,
    ) -> Result<(), RootfsError> {
        let mut f = File::open(host).map_err(io_err("open", host))?;
        let sparse = md.blocks() * 512 < md.size() && rel.as_os_str().len() < 100;
        if sparse {
            let extents = data_extents(&f, md.size()).map_err(io_err("scan holes", host))?;
            return self.sparse(&mut f, rel, h, md.size(), &extents, host);
        }
        self.report.bytes += md.size();
        h.set_size(md.size());
        self.tar
            .append_data(&mut h, rel, f)
            .map_err(io_err("write", host))
    }

    /// An old-GNU sparse entry ('S'): 4 map entries in the header, 21 per extension block.
    fn sparse(
        &mut self,
        f: &mut File,
        rel: &Path,
        mut h: Header,
        real: u64,
        ext: &[(u64, u64)],
        host: &Path,
    ) -> Result<(), RootfsError> {
        let data: u64 = ext.iter().map(|e| e.1).sum();
        self.report.bytes += data;
        h.set_entry_type(EntryType::GNUSparse);
        h.set_path(rel).map_err(io_err("path", host))?;
        h.set_size(data);
        let (head, rest) = ext.split_at(ext.len().min(4));
        let chunks: Vec<&[(u64, u64)]> = rest.chunks(21).collect();
        if let Some(g) = h.as_gnu_mut() {
            for (i, (off, len)) in head.iter().enumerate() {
                g.sparse[i].set_offset(*off);
                g.sparse[i].set_length(*len);
            }
            g.isextended[0] = u8::from(!chunks.is_empty());
            g.set_real_size(real);
        }
        h.set_cksum();
        let w = self.tar.get_mut();
        let wr = |e| RootfsError::Io {
            step: "write",
            path: host.to_path_buf(),
            source: e,
        };
        w.write_all(h.as_bytes()).map_err(wr)?;
        for (ci, chunk) in chunks.iter().enumerate() {
            let mut x = GnuExtSparseHeader::new();
            for (i, (off, len)) in chunk.iter().enumerate() {
                x.sparse[i].set_offset(*off);
                x.sparse[i].set_length(*len);
            }
            x.isextended[0] = u8::from(ci + 1 < chunks.len());
            w.write_all(x.as_bytes()).map_err(wr)?;
        }
        let mut buf = vec![0u8; 1 << 16];
        for (off, len) in ext {
            f.seek(SeekFrom::Start(*off)).map_err(wr)?;
            let mut left = *len;
            while left > 0 {
                let n = (left as usize).min(buf.len());
                f.read_exact(&mut buf[..n]).map_err(wr)?;
                w.write_all(&buf[..n]).map_err(wr)?;
                left -= n as u64;
            }
        }
        let pad = (512 - (data % 512) as usize) % 512;
        w.write_all(&vec![0u8; pad]).map_err(wr)
    }
}

/// Data extents of a file, via SEEK_DATA/SEEK_HOLE.
fn data_extents(f: &File, size: u64) -> std::io::Result<Vec<(u64, u64)>> {
    use nix::unistd::{lseek, Whence};
    let fd = f.as_raw_fd();
    let mut out = Vec::new();
    let mut pos: i64 = 0;
    while (pos as u64) < size {
        let data = match lseek(fd, pos, Whence::SeekData) {
            Ok(d) => d,
            Err(nix::errno::Errno::ENXIO) => break,
            Err(e) => return Err(e.into()),
        };
        let hole = lseek(fd, data, Whence::SeekHole).map_err(std::io::Error::from)?;
        out.push((data as u64, (hole - data) as u64));
        pos = hole;
    }
    // GNU readers expect a final (size, 0) entry when the file ends in a hole.
    if out.last().is_none_or(|(o, l)| o + l < size) {
        out.push((size, 0));
    }
    Ok(out)
}

fn is_opaque(dir: &Path) -> bool {
    ["trusted.overlay.opaque", "user.overlay.opaque"]
        .iter()
        .any(|n| matches!(xattr::get(dir, n), Ok(Some(v)) if v == b"y"))
}

/// Compress `raw` into `out` with multi-threaded zstd; returns the compressed size.
pub fn compress_zstd(raw: &Path, out: &Path, level: i32, threads: u32) -> Result<u64, RootfsError> {
    let mut input = File::open(raw).map_err(io_err("open", raw))?;
    let output = File::create(out).map_err(io_err("create", out))?;
    let mut enc =
        zstd::stream::Encoder::new(BufWriter::new(output), level).map_err(io_err("zstd", out))?;
    enc.multithread(threads)
        .map_err(io_err("zstd threads", out))?;
    std::io::copy(&mut input, &mut enc).map_err(io_err("compress", raw))?;
    let w = enc.finish().map_err(io_err("compress", out))?;
    let f = w.into_inner().map_err(|e| RootfsError::Io {
        step: "flush",
        path: out.to_path_buf(),
        source: e.into_error(),
    })?;
    f.sync_all().map_err(io_err("sync", out))?;
    Ok(f.metadata().map(|m| m.len()).unwrap_or(0))
}

/// Open a changeset, decompressing `.zst` transparently.
pub fn open_changeset(path: &Path) -> Result<Box<dyn Read>, RootfsError> {
    let f = File::open(path).map_err(io_err("open", path))?;
    if path.extension().is_some_and(|e| e == "zst") {
        let d = zstd::stream::Decoder::new(f).map_err(io_err("zstd", path))?;
        Ok(Box::new(d))
    } else {
        Ok(Box::new(std::io::BufReader::new(f)))
    }
}
