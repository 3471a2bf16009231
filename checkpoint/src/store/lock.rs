//! The store's lock: an flock on `<store>/.cryo-store.lock`. A writer (a checkpoint, from
//! choosing its parent to the end of pruning) holds it exclusively; readers (a restore until
//! CRIU has read the pages, a listing) share it, so no generation they read is pruned under
//! them. Waits are bounded; the error names the holder, which an exclusive holder records in
//! the file. The lock file is never removed (a waiter must not lock an unlinked file).

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};

use super::StoreError;

/// The lock file's name in the store.
pub const LOCK_FILE: &str = ".cryo-store.lock";

/// How the lock is held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    /// Readers: restore, listing.
    Shared,
    /// The one writer.
    Exclusive,
}

/// A held store lock; released on drop.
#[derive(Debug)]
pub struct StoreLock {
    _flock: Flock<File>,
    path: PathBuf,
}

impl StoreLock {
    /// Take the lock of the store in `dir`, waiting at most `timeout`.
    pub fn take(dir: &Path, mode: LockMode, timeout: Duration) -> Result<Self, StoreError> {
        let path = dir.join(LOCK_FILE);
        let arg = match mode {
            LockMode::Shared => FlockArg::LockSharedNonblock,
            LockMode::Exclusive => FlockArg::LockExclusiveNonblock,
        };
        let end = Instant::now() + timeout;
        loop {
            let file = OpenOptions::new()
                .create(true)
                .truncate(false)
                .read(true)
                .write(true)
                .open(&path)
                .map_err(StoreError::io("open", &path))?;
            match Flock::lock(file, arg) {
                Ok(flock) => {
                    if mode == LockMode::Exclusive {
                        note_holder(&flock);
                    }
                    return Ok(Self {
                        _flock: flock,
                        path,
                    });
                }
                Err((_, nix::errno::Errno::EWOULDBLOCK)) if Instant::now() < end => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                    return Err(StoreError::Busy {
                        dir: dir.to_path_buf(),
                        holder: describe_holder(&path, timeout),
                    })
                }
                Err((_, e)) => return Err(StoreError::io("lock", &path)(e.into())),
            }
        }
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Record who writes: pid, since when, the command line.
fn note_holder(file: &File) {
    use std::io::{Seek, Write};
    let cmd = std::fs::read("/proc/self/cmdline")
        .map(|c| {
            c.split(|b| *b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default();
    let line = format!(
        "{} {} {cmd}\n",
        std::process::id(),
        chrono::Utc::now().timestamp()
    );
    let mut f = file;
    let _ = f.set_len(0);
    let _ = f.seek(std::io::SeekFrom::Start(0));
    let _ = f.write_all(line.as_bytes());
}

fn describe_holder(path: &Path, waited: Duration) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut parts = text.trim().splitn(3, ' ');
    let waited = format!("waited {:.0} s", waited.as_secs_f64());
    match (parts.next(), parts.next(), parts.next()) {
        (Some(pid), Some(_), Some(cmd)) if Path::new(&format!("/proc/{pid}")).exists() => {
            format!(
                "`{cmd}` (pid {pid}) is writing a generation ({waited}); wait for it or stop it"
            )
        }
        _ => format!("another cryo process reads or writes it ({waited}); try again"),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn readers_share_and_a_writer_waits_then_says_who() {
        let d = tempfile::tempdir().unwrap();
        let short = Duration::from_millis(100);
        let r1 = StoreLock::take(d.path(), LockMode::Shared, short).unwrap();
        let r2 = StoreLock::take(d.path(), LockMode::Shared, short).unwrap();
        let e = StoreLock::take(d.path(), LockMode::Exclusive, short)
            .unwrap_err()
            .to_string();
        assert!(e.contains("busy") && e.contains("try again"), "{e}");
        drop((r1, r2));
        let w = StoreLock::take(d.path(), LockMode::Exclusive, short).unwrap();
        let e = StoreLock::take(d.path(), LockMode::Shared, short)
            .unwrap_err()
            .to_string();
        assert!(e.contains(&format!("pid {}", std::process::id())), "{e}");
        drop(w);
        StoreLock::take(d.path(), LockMode::Shared, short).unwrap();
    }
}
