//! Writing the changeset. This runs inside the freeze window, so it is one pass over the
//! tree, buffered, uncompressed and not synced (the zstd copy made after the thaw is).

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs::{self, File, Metadata};
use std::io::{BufWriter, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tar::{Builder, EntryType, Header};

use super::sparse::{data_extents, has_holes, write_sparse};
use super::{io_err, Result, RootfsError, OPAQUE_MARKER, WHITEOUT_PREFIX};

/// How to read the captured tree.
#[derive(Debug, Clone, Default)]
pub struct CaptureOptions {
    /// The tree is a plain directory, not an overlay upper dir: 0:0 char devices and opaque
    /// attributes mean nothing special and are not translated.
    pub plain: bool,
    /// fsync the archive before returning (off by default: inside the freeze window the raw
    /// file only has to outlive the compression that follows, which syncs its output).
    pub sync: bool,
}

/// What a capture wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaptureReport {
    /// Archive entries (markers included).
    pub entries: u64,
    /// Bytes of file data stored (holes of sparse files excluded).
    pub bytes: u64,
    /// Whiteouts translated to `.wh.<name>`.
    pub whiteouts: u64,
    /// Opaque directories (each with a `.wh..wh..opq` marker).
    pub opaque_dirs: u64,
    /// Paths (relative, `dev/null2`) of the real device nodes in the archive: the only ones a
    /// restore may create ([`super::ApplyPolicy::allowed_devices`]).
    pub device_nodes: Vec<String>,
    /// Time taken.
    pub elapsed: Duration,
}

/// Capture the overlay upper dir `upper` into an uncompressed tar at `out` (see the module
/// docs for the format). Run it while the container is frozen.
pub fn capture_upper(upper: &Path, out: &Path, opts: &CaptureOptions) -> Result<CaptureReport> {
    let start = Instant::now();
    let file = File::create(out).map_err(io_err("create", out))?;
    let mut w = Walker {
        tar: Builder::new(BufWriter::with_capacity(1 << 20, file)),
        overlay: !opts.plain,
        links: HashMap::new(),
        report: CaptureReport::default(),
        buf: vec![0u8; 1 << 20],
    };
    w.walk(upper, Path::new(""))?;
    let inner = w.tar.into_inner().map_err(io_err("finish", out))?;
    let file = inner.into_inner().map_err(|e| RootfsError::Io {
        step: "flush",
        path: out.to_path_buf(),
        source: e.into_error(),
    })?;
    if opts.sync {
        file.sync_all().map_err(io_err("sync", out))?;
    }
    w.report.elapsed = start.elapsed();
    Ok(w.report)
}

/// Capture a plain directory (a /dev/shm the client bind-mounts from the host) into an
/// uncompressed tar at `out`, in the same format but with no overlay translation.
pub fn capture_dir(dir: &Path, out: &Path) -> Result<CaptureReport> {
    capture_upper(
        dir,
        out,
        &CaptureOptions {
            plain: true,
            sync: false,
        },
    )
}

struct Walker<W: Write> {
    tar: Builder<W>,
    overlay: bool,
    /// First archive path of every multiply-linked inode seen, by (dev, ino).
    links: HashMap<(u64, u64), PathBuf>,
    report: CaptureReport,
    buf: Vec<u8>,
}

/// Extended attributes of one entry, split into what travels and what overlay means by them.
#[derive(Default)]
struct Attrs {
    pax: Vec<(String, Vec<u8>)>,
    opaque: bool,
}

impl<W: Write> Walker<W> {
    fn walk(&mut self, dir: &Path, rel: &Path) -> Result<()> {
        let mut names: Vec<OsString> = fs::read_dir(dir)
            .map_err(io_err("list", dir))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<std::io::Result<_>>()
            .map_err(io_err("list", dir))?;
        // Sorted, so the same tree always gives the same archive.
        names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        for name in names {
            let host = dir.join(&name);
            let rel = rel.join(&name);
            let md = fs::symlink_metadata(&host).map_err(io_err("stat", &host))?;
            self.entry(&host, &rel, &name, &md)?;
        }
        Ok(())
    }

    fn entry(&mut self, host: &Path, rel: &Path, name: &OsString, md: &Metadata) -> Result<()> {
        let ft = md.file_type();
        if self.overlay && ft.is_char_device() && md.rdev() == 0 {
            // An overlay whiteout: the path was deleted.
            let mut wh = OsString::from(WHITEOUT_PREFIX);
            wh.push(name);
            self.marker(&rel.with_file_name(wh))?;
            self.report.whiteouts += 1;
            return Ok(());
        }
        if ft.is_socket() {
            // A socket file cannot live in a tar; whoever bound it binds it again after the
            // restore (CRIU recreates the sockets of restored processes).
            tracing::debug!(path = %host.display(), "socket not captured");
            return Ok(());
        }
        let attrs = self.attrs(host)?;
        if !attrs.pax.is_empty() {
            let pax = attrs.pax.iter().map(|(k, v)| (k.as_str(), v.as_slice()));
            self.tar
                .append_pax_extensions(pax)
                .map_err(io_err("write xattrs of", host))?;
        }
        let mut h = header(md);
        self.report.entries += 1;
        if ft.is_dir() {
            h.set_entry_type(EntryType::Directory);
            self.append(h, rel, std::io::empty(), host)?;
            if self.overlay && attrs.opaque {
                self.marker(&rel.join(OPAQUE_MARKER))?;
                self.report.opaque_dirs += 1;
            }
            return self.walk(host, rel);
        }
        if ft.is_symlink() {
            let target = fs::read_link(host).map_err(io_err("readlink", host))?;
            h.set_entry_type(EntryType::Symlink);
            return self
                .tar
                .append_link(&mut h, rel, &target)
                .map_err(io_err("write", host));
        }
        if ft.is_file() {
            if md.nlink() > 1 {
                let id = (md.dev(), md.ino());
                if let Some(first) = self.links.get(&id) {
                    let first = first.clone();
                    h.set_entry_type(EntryType::Link);
                    return self
                        .tar
                        .append_link(&mut h, rel, &first)
                        .map_err(io_err("write", host));
                }
                self.links.insert(id, rel.to_path_buf());
            }
            return self.regular(host, rel, h, md);
        }
        // A fifo or a real device node.
        if ft.is_fifo() {
            h.set_entry_type(EntryType::Fifo);
        } else {
            h.set_entry_type(if ft.is_char_device() {
                EntryType::Char
            } else {
                EntryType::Block
            });
            // The tar crate fills device numbers only for ustar headers from metadata.
            let rdev = md.rdev();
            h.set_device_major(libc::major(rdev))
                .map_err(io_err("device number of", host))?;
            h.set_device_minor(libc::minor(rdev))
                .map_err(io_err("device number of", host))?;
            self.report
                .device_nodes
                .push(rel.to_string_lossy().into_owned());
        }
        self.append(h, rel, std::io::empty(), host)
    }

    fn append(
        &mut self,
        mut h: Header,
        rel: &Path,
        data: impl std::io::Read,
        host: &Path,
    ) -> Result<()> {
        self.tar
            .append_data(&mut h, rel, data)
            .map_err(io_err("write", host))
    }

    /// An empty regular file standing for a whiteout or an opaque marker.
    fn marker(&mut self, rel: &Path) -> Result<()> {
        let mut h = Header::new_gnu();
        h.set_entry_type(EntryType::Regular);
        h.set_mode(0o600);
        h.set_size(0);
        self.report.entries += 1;
        self.append(h, rel, std::io::empty(), rel)
    }

    /// Read the xattrs: overlay's private ones are translated (opaque) or dropped, and two
    /// overlay features whose files the upper dir alone does not hold are refused.
    fn attrs(&mut self, host: &Path) -> Result<Attrs> {
        let mut a = Attrs::default();
        let names = match xattr::list(host) {
            Ok(n) => n,
            // A filesystem without xattrs has none to capture.
            Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => return Ok(a),
            Err(e) => return Err(io_err("list xattrs of", host)(e)),
        };
        for n in names {
            let name = n.to_string_lossy().into_owned();
            let private = name
                .strip_prefix("trusted.overlay.")
                .or_else(|| name.strip_prefix("user.overlay."));
            if let Some(what) = private {
                if !self.overlay {
                    continue;
                }
                match what {
                    "opaque" => {
                        a.opaque = xattr::get(host, &n)
                            .map_err(io_err("read xattr of", host))?
                            .is_some_and(|v| v == b"y");
                    }
                    "metacopy" | "redirect" => {
                        return Err(RootfsError::Unsupported {
                            path: host.to_path_buf(),
                            reason: format!(
                                "it carries {name}: the overlay is mounted with metacopy=on or \
                                 redirect_dir=on, so its data lives in a lower layer; mount the \
                                 container's overlay without them"
                            ),
                        });
                    }
                    // origin, impure, nlink, uuid...: bookkeeping of this very overlay.
                    _ => {}
                }
                continue;
            }
            if let Some(v) = xattr::get(host, &n).map_err(io_err("read xattr of", host))? {
                a.pax.push((format!("SCHILY.xattr.{name}"), v));
            }
        }
        Ok(a)
    }

    fn regular(&mut self, host: &Path, rel: &Path, mut h: Header, md: &Metadata) -> Result<()> {
        let f = File::open(host).map_err(io_err("open", host))?;
        let size = md.size();
        // Fewer blocks than bytes hints at holes (or inline data): only then ask where the
        // data is.
        if size > 0 && md.blocks().saturating_mul(512) < size {
            let ext = data_extents(&f, size).map_err(io_err("find holes in", host))?;
            if has_holes(&ext, size) {
                let path = rel.as_os_str().as_bytes();
                let w = self.tar.get_mut();
                let stored = write_sparse(w, h, path, &f, size, &ext, &mut self.buf)
                    .map_err(io_err("write", host))?;
                self.report.bytes += stored;
                return Ok(());
            }
        }
        h.set_entry_type(EntryType::Regular);
        h.set_size(size);
        // The header announces `size` bytes: write exactly that many whatever the file does.
        let reader = ExactFile {
            f: &f,
            off: 0,
            left: size,
        };
        self.append(h, rel, reader, host)?;
        self.report.bytes += size;
        Ok(())
    }
}

/// Exactly `left` bytes of a file from `off`, zeros past its end (see `copy_range`).
struct ExactFile<'a> {
    f: &'a File,
    off: u64,
    left: u64,
}

impl std::io::Read for ExactFile<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let want = (self.left.min(buf.len() as u64)) as usize;
        if want == 0 {
            return Ok(0);
        }
        let n = match std::os::unix::fs::FileExt::read_at(self.f, &mut buf[..want], self.off)? {
            0 => {
                buf[..want].fill(0);
                want
            }
            n => n,
        };
        self.off += n as u64;
        self.left -= n as u64;
        Ok(n)
    }
}

/// A GNU header with the entry's mode, owner and times.
fn header(md: &Metadata) -> Header {
    let mut h = Header::new_gnu();
    h.set_mode(md.mode() & 0o7777);
    h.set_uid(u64::from(md.uid()));
    h.set_gid(u64::from(md.gid()));
    h.set_mtime(u64::try_from(md.mtime()).unwrap_or(0));
    if let Some(g) = h.as_gnu_mut() {
        g.set_atime(u64::try_from(md.atime()).unwrap_or(0));
    }
    h.set_size(0);
    h
}
