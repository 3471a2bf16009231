//! Writing the changeset. This runs inside the freeze window, so it is one pass over the
//! tree, buffered, uncompressed and not synced (the checkpoint syncs its zstd copy). A capture
//! that runs after CRIU's dump writes into a file measured and faulted in before the freeze
//! ([`prepare_capture`]); one beside the dump writes on its own core.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs::{self, File, Metadata};
use std::io::{BufWriter, Seek, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tar::{Builder, EntryType, Header};

use super::policy::ChangesetSizes;
use super::sparse::{coalesce, data_extents, has_holes, pax_records, ExtentReader, MAX_EXTENTS};
use super::{io_err, Result, RootfsError, OPAQUE_MARKER, WHITEOUT_PREFIX};
use crate::prefault::{SmallWrites, WRITE_CHUNK};

/// How to read the captured tree.
#[derive(Debug, Clone, Default)]
pub struct CaptureOptions {
    /// The tree is a plain directory, not an overlay upper dir: 0:0 char devices and opaque
    /// attributes mean nothing special and are not translated.
    pub plain: bool,
    /// fsync the archive before returning (off by default: inside the freeze window the raw
    /// file only has to outlive the compression that follows, which syncs its output).
    pub sync: bool,
    /// The capture runs while CRIU dumps: see [`FrozenTop`].
    pub during_dump: Option<FrozenTop>,
}

/// What CRIU itself may change in the upper dir while it dumps, as it was when the container
/// froze. To reach overmounted tmpfs mounts CRIU makes and removes `/tmp/cr-tmpfs.XXXXXX`
/// (or `/cr-tmpfs.XXXXXX` without a /tmp) in the container's root, which copies /tmp up and
/// touches its mtime. A capture running beside CRIU leaves those names out and describes
/// /tmp as it was at the freeze, so the snapshot is the container's tree, not CRIU's.
#[derive(Debug, Clone)]
pub struct FrozenTop {
    /// `<upper>/tmp` at the freeze (`None`: /tmp was not in the upper dir).
    tmp: Option<Metadata>,
}

/// CRIU's temporary directories (criu/mount.c, get_clean_fd).
const CRIU_TEMP_PREFIX: &str = "cr-tmpfs.";

impl FrozenTop {
    /// Record it: call once the container is frozen and before CRIU dumps.
    pub fn record(upper: &Path) -> Self {
        Self {
            tmp: fs::symlink_metadata(upper.join("tmp")).ok(),
        }
    }
}

/// What a capture wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaptureReport {
    /// Archive entries (markers included).
    pub entries: u64,
    /// Bytes of file data stored (holes of sparse files excluded).
    pub bytes: u64,
    /// Sum of the sizes of the regular files captured (holes included; a hard link counts
    /// once). Record it with `bytes` ([`Self::sizes`]) so a restore can refuse an archive
    /// that declares more ([`super::ApplyPolicy::with_declared_sizes`]).
    #[serde(default)]
    pub logical_bytes: u64,
    /// Whiteouts translated to `.wh.<name>`.
    pub whiteouts: u64,
    /// Opaque directories (each with a `.wh..wh..opq` marker).
    pub opaque_dirs: u64,
    /// Paths (relative, `dev/null2`) of the real device nodes in the archive, for the record
    /// (a restore creates a node only if the target spec's runtime would:
    /// [`super::ApplyPolicy::for_spec`]).
    pub device_nodes: Vec<String>,
    /// Time taken.
    pub elapsed: Duration,
}

impl CaptureReport {
    /// The sizes a restore checks the archive against.
    pub fn sizes(&self) -> ChangesetSizes {
        ChangesetSizes {
            data_bytes: self.bytes,
            logical_bytes: self.logical_bytes,
        }
    }
}

/// Trees with more entries than this are not measured ahead: the walk would cost more than
/// faulting the file in saves.
const PREPARE_MAX_ENTRIES: u64 = 20_000;

/// Capture the overlay upper dir `upper` into an uncompressed tar at `out` (see the module
/// docs for the format). Run it while the container is frozen.
pub fn capture_upper(upper: &Path, out: &Path, opts: &CaptureOptions) -> Result<CaptureReport> {
    let file = File::create(out).map_err(io_err("create", out))?;
    capture_upper_into(upper, file, out, opts)
}

/// Before the freeze: create `out` sized for a capture of `upper` as it is now, with its page
/// cache allocated ([`crate::prefault`]), for [`capture_upper_into`]. `None` when the tree
/// is too large to measure quickly or the file system has no room (capture then creates the
/// file itself).
pub fn prepare_capture(upper: &Path, out: &Path) -> Option<File> {
    let mut entries = 0;
    let bytes = archive_estimate(upper, &mut entries)?;
    let file = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(out)
        .ok()?;
    // Slack for what the container writes before the freeze; writing past it only costs
    // the allocation the preparation saves.
    let size = (bytes + bytes / 16 + (64 << 10)).div_ceil(4096) * 4096;
    crate::prefault::fill_page_cache(&file, size).then_some(file)
}

/// Bytes a tar of the tree at `dir` takes: a header block (plus room for long names and
/// xattrs) per entry and the data blocks of regular files, holes excluded.
fn archive_estimate(dir: &Path, entries: &mut u64) -> Option<u64> {
    let mut bytes = 0;
    for e in fs::read_dir(dir).ok()? {
        let e = e.ok()?;
        *entries += 1;
        if *entries > PREPARE_MAX_ENTRIES {
            return None;
        }
        let md = e.metadata().ok()?;
        bytes += 1536;
        if md.is_dir() {
            bytes += archive_estimate(&e.path(), entries)?;
        } else if md.is_file() {
            bytes += md.size().min(md.blocks() * 512).div_ceil(512) * 512;
        }
    }
    Some(bytes)
}

/// [`capture_upper`] into an open file (from [`prepare_capture`]): written from its start and
/// cut to what was written.
pub fn capture_upper_into(
    upper: &Path,
    file: File,
    out: &Path,
    opts: &CaptureOptions,
) -> Result<CaptureReport> {
    let start = Instant::now();
    let mut w = Walker {
        tar: Builder::new(BufWriter::with_capacity(WRITE_CHUNK, SmallWrites(file))),
        during_dump: opts.during_dump.clone(),
        overlay: !opts.plain,
        links: HashMap::new(),
        report: CaptureReport::default(),
    };
    w.walk(upper, Path::new(""))?;
    let inner = w.tar.into_inner().map_err(io_err("finish", out))?;
    let SmallWrites(mut file) = inner.into_inner().map_err(|e| RootfsError::Io {
        step: "flush",
        path: out.to_path_buf(),
        source: e.into_error(),
    })?;
    let written = file.stream_position().map_err(io_err("finish", out))?;
    file.set_len(written).map_err(io_err("truncate", out))?;
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
            during_dump: None,
        },
    )
}

struct Walker<W: Write> {
    tar: Builder<W>,
    during_dump: Option<FrozenTop>,
    overlay: bool,
    /// First archive path of every multiply-linked inode seen, by (dev, ino).
    links: HashMap<(u64, u64), PathBuf>,
    report: CaptureReport,
}

/// Where an entry's metadata comes from.
enum FrozenView {
    /// The tree as it is.
    Live,
    /// As recorded at the freeze.
    Recorded(Metadata),
    /// Not the container's: left out.
    Skip,
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
            let md = match self.frozen_view(&rel) {
                FrozenView::Live => fs::symlink_metadata(&host).map_err(io_err("stat", &host))?,
                FrozenView::Recorded(md) => md,
                FrozenView::Skip => continue,
            };
            self.entry(&host, &rel, &name, &md)?;
        }
        Ok(())
    }

    /// How a capture beside CRIU sees `rel` ([`FrozenTop`]).
    fn frozen_view(&self, rel: &Path) -> FrozenView {
        let Some(top) = &self.during_dump else {
            return FrozenView::Live;
        };
        let criu_temp = |p: &Path| {
            p.file_name()
                .is_some_and(|n| n.as_bytes().starts_with(CRIU_TEMP_PREFIX.as_bytes()))
        };
        let parent = rel.parent().unwrap_or(Path::new(""));
        if criu_temp(rel) && (parent == Path::new("") || parent == Path::new("tmp")) {
            return FrozenView::Skip;
        }
        if rel == Path::new("tmp") {
            return match &top.tmp {
                Some(md) => FrozenView::Recorded(md.clone()),
                None => FrozenView::Skip,
            };
        }
        FrozenView::Live
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
        if !ft.is_file() || md.nlink() > 1 && self.links.contains_key(&(md.dev(), md.ino())) {
            // A regular file's records go out with its sparse map, if it has one.
            self.pax(&attrs.pax, host)?;
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
            return self.regular(host, rel, h, md, attrs.pax);
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

    /// One PAX extended header with `records` (none when empty).
    fn pax(&mut self, records: &[(String, Vec<u8>)], host: &Path) -> Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        let pax = records.iter().map(|(k, v)| (k.as_str(), v.as_slice()));
        self.tar
            .append_pax_extensions(pax)
            .map_err(io_err("write the PAX records of", host))
    }

    fn regular(
        &mut self,
        host: &Path,
        rel: &Path,
        mut h: Header,
        md: &Metadata,
        mut pax: Vec<(String, Vec<u8>)>,
    ) -> Result<()> {
        let f = File::open(host).map_err(io_err("open", host))?;
        let size = md.size();
        self.report.logical_bytes += size;
        h.set_entry_type(EntryType::Regular);
        // Fewer blocks than bytes hints at holes (or inline data): only then ask where the
        // data is.
        if size > 0 && md.blocks().saturating_mul(512) < size {
            let ext = data_extents(&f, size).map_err(io_err("find holes in", host))?;
            if has_holes(&ext, size) {
                let ext = coalesce(ext, MAX_EXTENTS);
                let stored: u64 = ext.iter().map(|e| e.1).sum();
                pax.extend(pax_records(size, &ext));
                // GNU tar reads a PAX sparse map only on a POSIX (ustar) header; the atime
                // the GNU header would carry goes in a PAX record.
                let mut u = ustar_header(md);
                pax.push(("atime".into(), md.atime().max(0).to_string().into_bytes()));
                for (key, id) in [("uid", md.uid()), ("gid", md.gid())] {
                    if u64::from(id) > USTAR_MAX_ID {
                        pax.push((key.into(), id.to_string().into_bytes()));
                    }
                }
                self.pax(&pax, host)?;
                u.set_size(stored);
                self.append(u, rel, ExtentReader::new(&f, &ext), host)?;
                self.report.bytes += stored;
                return Ok(());
            }
        }
        self.pax(&pax, host)?;
        h.set_size(size);
        // The header announces `size` bytes: write exactly that many whatever the file does.
        let whole = [(0, size)];
        self.append(h, rel, ExtentReader::new(&f, &whole), host)?;
        self.report.bytes += size;
        Ok(())
    }
}

/// The largest owner id a ustar header's octal field holds (7 digits).
const USTAR_MAX_ID: u64 = 0o7777777;

/// A POSIX (ustar) header with the entry's mode, owner (a larger id goes in a PAX record)
/// and mtime, for a regular file.
fn ustar_header(md: &Metadata) -> Header {
    let mut h = Header::new_ustar();
    h.set_entry_type(EntryType::Regular);
    h.set_mode(md.mode() & 0o7777);
    h.set_uid(u64::from(md.uid()).min(USTAR_MAX_ID));
    h.set_gid(u64::from(md.gid()).min(USTAR_MAX_ID));
    h.set_mtime(u64::try_from(md.mtime()).unwrap_or(0));
    h
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn archive_entries(path: &Path) -> Vec<(String, u64)> {
        let mut a = tar::Archive::new(File::open(path).unwrap());
        a.entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let p = e.path().unwrap().to_string_lossy().into_owned();
                (p, e.header().mtime().unwrap())
            })
            .collect()
    }

    /// What CRIU does in the tree while a capture runs beside it stays out of the snapshot:
    /// its temporary directories, and its touch of /tmp's mtime.
    #[test]
    fn a_capture_beside_criu_sees_the_tree_as_frozen() {
        let upper = tempfile::tempdir().unwrap();
        let tmp = upper.path().join("tmp");
        fs::create_dir(&tmp).unwrap();
        fs::write(tmp.join("app.sock.lock"), b"x").unwrap();
        let old = filetime_secs(&tmp, 1_000_000);
        let top = FrozenTop::record(upper.path());
        // CRIU, after the freeze: a temporary dir in /tmp (and one at the root), /tmp touched.
        fs::create_dir(tmp.join("cr-tmpfs.AbC123")).unwrap();
        fs::create_dir(upper.path().join("cr-tmpfs.XyZ789")).unwrap();
        assert_ne!(fs::metadata(&tmp).unwrap().mtime(), old);
        let out = upper.path().join("../beside.tar");
        let opts = CaptureOptions {
            during_dump: Some(top),
            ..CaptureOptions::default()
        };
        capture_upper(upper.path(), &out, &opts).unwrap();
        let entries = archive_entries(&out);
        let names: Vec<&str> = entries.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(names, ["tmp", "tmp/app.sock.lock"], "{entries:?}");
        assert_eq!(entries[0].1, old as u64, "/tmp as it was at the freeze");
        // A capture after the dump (or without CRIU) sees everything.
        capture_upper(upper.path(), &out, &CaptureOptions::default()).unwrap();
        assert_eq!(archive_entries(&out).len(), 4);
        let _ = fs::remove_file(out);
    }

    /// A /tmp that was not in the upper dir at the freeze (CRIU copies it up) is left out.
    #[test]
    fn a_tmp_copied_up_by_criu_is_left_out() {
        let upper = tempfile::tempdir().unwrap();
        fs::write(upper.path().join("file"), b"data").unwrap();
        let top = FrozenTop::record(upper.path());
        fs::create_dir(upper.path().join("tmp")).unwrap();
        let out = upper.path().join("../copied-up.tar");
        let opts = CaptureOptions {
            during_dump: Some(top),
            ..CaptureOptions::default()
        };
        capture_upper(upper.path(), &out, &opts).unwrap();
        let names: Vec<String> = archive_entries(&out).into_iter().map(|(p, _)| p).collect();
        assert_eq!(names, ["file"]);
        let _ = fs::remove_file(out);
    }

    /// Set a path's mtime (whole seconds) and return it.
    fn filetime_secs(p: &Path, secs: i64) -> i64 {
        let t = nix::sys::time::TimeSpec::new(secs, 0);
        nix::sys::stat::utimensat(
            None,
            p,
            &t,
            &t,
            nix::sys::stat::UtimensatFlags::NoFollowSymlink,
        )
        .unwrap();
        secs
    }

    #[test]
    fn prepared_file_is_cut_to_the_archive() {
        let upper = tempfile::tempdir().unwrap();
        fs::write(upper.path().join("f"), vec![7u8; 10_000]).unwrap();
        let out = upper.path().join("../prepared.tar");
        let file = prepare_capture(upper.path(), &out).expect("a local fs can be prepared");
        let prepared = file.metadata().unwrap().len();
        let report =
            capture_upper_into(upper.path(), file, &out, &CaptureOptions::default()).unwrap();
        let len = fs::metadata(&out).unwrap().len();
        assert!(len < prepared && len >= 10_000 + 512, "{len} of {prepared}");
        assert_eq!(report.bytes, 10_000);
        assert_eq!(archive_entries(&out).len(), 1);
        let _ = fs::remove_file(out);
    }
}
