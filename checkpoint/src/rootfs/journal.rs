//! The undo journal: one JSON record per line, appended (one `write`) *before* the change it
//! describes, in the undo directory inside the target root. Whatever ends the process, the
//! journal on disk names every change that may have happened; a record cut short by the end
//! of the process is the last line, and its change never started.
//!
//! Paths are the real paths from the target root (symlinks resolved at apply time), so a
//! rollback walks them without following anything. While a journal is open it holds an
//! exclusive `flock`: a second process never rolls back an apply still running.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};

use nix::errno::Errno;
use nix::fcntl::{openat, Flock, FlockArg, OFlag};
use nix::sys::stat::{FileStat, Mode};
use nix::sys::time::TimeSpec;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::safe::owned;

/// The journal's name in the undo directory.
pub(crate) const JOURNAL: &str = "journal";
/// First record's magic: this is cryo's undo journal.
const MAGIC: &str = "cryo-rootfs-undo";
/// Journal format version.
const VERSION: u32 = 1;

/// A path below the target root, as its components (never empty for an entry, empty for the
/// root itself). Written as `a/b` with `%XX` for `%` and bytes outside printable ASCII.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct RelPath(pub(crate) Vec<OsString>);

impl RelPath {
    /// The parent's components and the leaf name (`None` for the root).
    pub(crate) fn split(&self) -> Option<(&[OsString], &OsStr)> {
        let (leaf, parents) = self.0.split_last()?;
        Some((parents, leaf.as_os_str()))
    }

    /// `a/b` for messages.
    pub(crate) fn shown(&self) -> String {
        super::safe::show(&self.0)
    }
}

fn encode(bytes: &[u8], out: &mut String) {
    for b in bytes {
        if (0x21..0x7f).contains(b) && *b != b'%' {
            out.push(char::from(*b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
}

fn decode(s: &str) -> Result<Vec<u8>, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3).ok_or("cut %-escape")?;
            out.push(u8::from_str_radix(hex, 16).map_err(|e| format!("bad %-escape: {e}"))?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Ok(out)
}

impl Serialize for RelPath {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut out = String::new();
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                out.push('/');
            }
            encode(p.as_bytes(), &mut out);
        }
        s.serialize_str(&out)
    }
}

impl<'de> Deserialize<'de> for RelPath {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if s.is_empty() {
            return Ok(RelPath(Vec::new()));
        }
        let mut parts = Vec::new();
        for p in s.split('/') {
            let bytes = decode(p).map_err(serde::de::Error::custom)?;
            if bytes.is_empty() || bytes == b"." || bytes == b".." || bytes.contains(&b'/') {
                return Err(serde::de::Error::custom(format!(
                    "bad path component in {s:?}"
                )));
            }
            parts.push(OsString::from_vec(bytes));
        }
        Ok(RelPath(parts))
    }
}

/// Bytes (an xattr name or value) written as a `%`-escaped string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Bytes(pub(crate) Vec<u8>);

impl Serialize for Bytes {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut out = String::new();
        encode(&self.0, &mut out);
        s.serialize_str(&out)
    }
}

impl<'de> Deserialize<'de> for Bytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        decode(&s).map(Bytes).map_err(serde::de::Error::custom)
    }
}

/// Access and modification times, to the nanosecond.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Times {
    atime: (i64, i64),
    mtime: (i64, i64),
}

impl Times {
    pub(crate) fn of(st: &FileStat) -> Self {
        Times {
            atime: (st.st_atime, st.st_atime_nsec),
            mtime: (st.st_mtime, st.st_mtime_nsec),
        }
    }

    pub(crate) fn atime(&self) -> TimeSpec {
        TimeSpec::new(self.atime.0, self.atime.1)
    }

    pub(crate) fn mtime(&self) -> TimeSpec {
        TimeSpec::new(self.mtime.0, self.mtime.1)
    }
}

/// A directory's own metadata (not what it holds).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct DirState {
    pub(crate) mode: u32,
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    /// Every attribute but overlay's private ones, which the merged view never shows.
    pub(crate) xattrs: Vec<(Bytes, Bytes)>,
    pub(crate) times: Times,
}

/// One change, recorded before it is made. Undone in reverse order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub(crate) enum Record {
    /// First record: the journal is cryo's; the root's times before the undo dir was made.
    Begin {
        magic: String,
        version: u32,
        root: Times,
    },
    /// The directory's times, before the first change among its entries.
    DirTimes { path: RelPath, times: Times },
    /// An existing directory's metadata, before it is changed.
    DirMeta { path: RelPath, state: DirState },
    /// The entry at `path` is renamed to `saved` in the undo directory (a directory also
    /// gets its times back: moving it changes them on some filesystems).
    MovedAside {
        path: RelPath,
        saved: String,
        times: Option<Times>,
    },
    /// The regular file at `path` was copied to `saved` in the undo directory (complete, with
    /// its metadata) and is unlinked: undoing it renames the copy over whatever is there (the
    /// original, if the process ended before the unlink).
    CopiedAside { path: RelPath, saved: String },
    /// Something is made at `path`, where nothing is.
    Created { path: RelPath },
    /// The directory at `path`, emptied (its entries moved aside one by one: renaming it
    /// failed, as for a lower directory of an overlay), is removed.
    RemovedDir { path: RelPath, state: DirState },
    /// The apply is kept: what the undo directory holds goes.
    Commit,
}

impl Record {
    pub(crate) fn begin(root: Times) -> Self {
        Record::Begin {
            magic: MAGIC.into(),
            version: VERSION,
            root,
        }
    }
}

/// The open journal, locked.
pub(crate) struct Journal {
    file: Flock<File>,
    len: u64,
}

/// Why an existing journal cannot be used.
#[derive(Debug)]
pub(crate) enum OpenError {
    /// Another process holds it: an apply or a rollback is running.
    Busy,
    /// It is not there.
    Missing,
    Io(std::io::Error),
}

impl Journal {
    /// Create it (0600) in the undo directory and lock it.
    pub(crate) fn create(undo_dir: &OwnedFd) -> std::io::Result<Self> {
        let flags = OFlag::O_RDWR
            | OFlag::O_CREAT
            | OFlag::O_EXCL
            | OFlag::O_APPEND
            | OFlag::O_NOFOLLOW
            | OFlag::O_CLOEXEC;
        let fd = openat(
            Some(undo_dir.as_raw_fd()),
            JOURNAL,
            flags,
            Mode::from_bits_truncate(0o600),
        )?;
        let file = File::from(owned(fd));
        let file = Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|(_, e)| e)?;
        Ok(Journal { file, len: 0 })
    }

    /// Open an existing one and lock it.
    pub(crate) fn open(undo_dir: &OwnedFd) -> Result<Self, OpenError> {
        let flags = OFlag::O_RDWR | OFlag::O_APPEND | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        let fd = match openat(Some(undo_dir.as_raw_fd()), JOURNAL, flags, Mode::empty()) {
            Ok(fd) => fd,
            Err(Errno::ENOENT) => return Err(OpenError::Missing),
            Err(e) => return Err(OpenError::Io(e.into())),
        };
        let file = File::from(owned(fd));
        let file = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(f) => f,
            Err((_, Errno::EWOULDBLOCK)) => return Err(OpenError::Busy),
            Err((_, e)) => return Err(OpenError::Io(e.into())),
        };
        let len = file.metadata().map_err(OpenError::Io)?.len();
        Ok(Journal { file, len })
    }

    /// Append `rec` in one write. On failure the journal is cut back to what it was.
    pub(crate) fn append(&mut self, rec: &Record) -> std::io::Result<()> {
        let mut line = serde_json::to_vec(rec).map_err(std::io::Error::other)?;
        line.push(b'\n');
        if let Err(e) = (&*self.file).write_all(&line) {
            let _ = self.file.set_len(self.len);
            return Err(e);
        }
        self.len += line.len() as u64;
        Ok(())
    }

    /// Every complete record with the offset where it starts. A last line without its
    /// newline is a record the process did not finish writing: its change never began.
    pub(crate) fn read(&mut self) -> Result<Vec<(u64, Record)>, String> {
        let mut text = Vec::new();
        (&*self.file)
            .seek(SeekFrom::Start(0))
            .and_then(|_| (&*self.file).read_to_end(&mut text))
            .map_err(|e| format!("read: {e}"))?;
        let mut out = Vec::new();
        let mut off = 0u64;
        for line in text.split_inclusive(|b| *b == b'\n') {
            let Some(body) = line.strip_suffix(b"\n") else {
                break; // cut short
            };
            let rec: Record =
                serde_json::from_slice(body).map_err(|e| format!("record at byte {off}: {e}"))?;
            out.push((off, rec));
            off += line.len() as u64;
        }
        match out.first() {
            Some((_, Record::Begin { magic, version, .. }))
                if magic == MAGIC && *version == VERSION => {}
            Some(_) => return Err("it does not start with cryo's begin record".into()),
            None => {}
        }
        self.len = off;
        Ok(out)
    }

    /// Cut the journal at `len` (a rollback drops each record it has undone).
    pub(crate) fn truncate(&mut self, len: u64) -> std::io::Result<()> {
        self.file.set_len(len)?;
        self.len = len;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn paths_and_bytes_survive_the_journal() {
        let odd = RelPath(vec![
            OsString::from("a b%"),
            OsString::from_vec(vec![0xff, b'\n', b'x']),
            OsString::from("✓"),
        ]);
        let rec = Record::MovedAside {
            path: odd.clone(),
            saved: "s1".into(),
            times: None,
        };
        let line = serde_json::to_string(&rec).unwrap();
        assert!(!line.contains('\n'));
        assert_eq!(serde_json::from_str::<Record>(&line).unwrap(), rec);
        let bad = line.replace("a%20b%25", "..");
        assert!(serde_json::from_str::<Record>(&bad).is_err(), "{bad}");
    }

    #[test]
    fn a_torn_last_record_is_dropped_and_a_lock_is_exclusive() {
        let t = tempfile::tempdir().unwrap();
        let dir = super::super::safe::open_root(t.path()).unwrap();
        let mut j = Journal::create(&dir).unwrap();
        let root = Times {
            atime: (1, 2),
            mtime: (3, 4),
        };
        j.append(&Record::begin(root)).unwrap();
        j.append(&Record::Commit).unwrap();
        assert!(matches!(Journal::open(&dir), Err(OpenError::Busy)));
        (&*j.file).write_all(b"{\"op\":\"crea").unwrap();
        let recs = j.read().unwrap();
        assert_eq!(recs.len(), 2);
        assert_eq!(recs[1].1, Record::Commit);
        drop(j);
        let mut again = Journal::open(&dir).unwrap();
        assert_eq!(again.read().unwrap().len(), 2);
    }
}
