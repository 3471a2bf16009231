//! A private copy of a regular file, data (holes kept), owner, mode, xattrs and times: what
//! the undo keeps of a file an overlay would otherwise copy up (and fsync) to move it aside.

use std::ffi::OsString;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;

use nix::sys::stat::{fchmod, futimens, FileStat, Mode};
use nix::unistd::{fchown, Gid, Uid};

use super::journal::Times;
use super::seam::{FsOpKind, FsSeam};
use super::sparse::data_extents;
use super::undo::{ask, overlay_private, At, OpError};
use crate::prefault::WRITE_CHUNK;

/// Copy `src` (whose stat is `st`) into the fresh 0600 file `dst`, `shown` naming `dst`.
pub(crate) fn copy_file(
    src: &File,
    st: &FileStat,
    dst: &File,
    seam: &dyn FsSeam,
    shown: &str,
) -> Result<(), OpError> {
    let size = st.st_size as u64;
    let extents = data_extents(src, size).at("find the data of the original of", shown)?;
    // Fresh files get at most WRITE_CHUNK per write: see crate::prefault.
    let mut buf = vec![0u8; WRITE_CHUNK];
    for (off, len) in extents {
        ask(seam, FsOpKind::Write, shown)?;
        let mut done = 0u64;
        while done < len {
            let want = (len - done).min(buf.len() as u64) as usize;
            let n = src
                .read_at(&mut buf[..want], off + done)
                .at("read the original of", shown)?;
            if n == 0 {
                break; // shorter than its stat said: the rest stays a hole
            }
            dst.write_all_at(&buf[..n], off + done).at("write", shown)?;
            done += n as u64;
        }
    }
    ask(seam, FsOpKind::Truncate, shown)?;
    dst.set_len(size).at("set the size of", shown)?;
    ask(seam, FsOpKind::Owner, shown)?;
    fchown(
        dst.as_raw_fd(),
        Some(Uid::from_raw(st.st_uid)),
        Some(Gid::from_raw(st.st_gid)),
    )
    .at("chown", shown)?;
    // After chown, which clears set-id bits; capabilities (an xattr) after both.
    ask(seam, FsOpKind::Mode, shown)?;
    fchmod(
        dst.as_raw_fd(),
        Mode::from_bits_truncate(st.st_mode & 0o7777),
    )
    .at("chmod", shown)?;
    let names: Vec<OsString> = match xattr::FileExt::list_xattr(src) {
        Ok(n) => n.collect(),
        Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => Vec::new(),
        Err(e) => return Err(e).at("list the xattrs of the original of", shown),
    };
    for n in names {
        if overlay_private(n.as_bytes()) {
            continue;
        }
        let Some(v) =
            xattr::FileExt::get_xattr(src, &n).at("read an xattr of the original of", shown)?
        else {
            continue;
        };
        ask(seam, FsOpKind::Xattr, shown)?;
        xattr::FileExt::set_xattr(dst, &n, &v).at("set an xattr of", shown)?;
    }
    let t = Times::of(st);
    ask(seam, FsOpKind::Times, shown)?;
    futimens(dst.as_raw_fd(), &t.atime(), &t.mtime()).at("set the times of", shown)
}
