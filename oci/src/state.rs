//! cryo's own per-container record, stored as `<root>/<id>/cryo.json` beside libcontainer's
//! `state.json`, and the per-container lock every verb holds while it acts.
//!
//! libcontainer owns the lifecycle state (status, pid, cgroup path). The record adds what a
//! checkpoint needs later and libcontainer does not keep: the stdio the init process was
//! started with (runc's "external descriptors", the inodes written to `descriptors.json`), the
//! rootfs and whether the container came from a restore.

use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{DateTime, Utc};
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::atomic::write_atomic;

const RECORD_FILE: &str = "cryo.json";
const LOCK_DIR: &str = ".locks";

/// runc's rule for container ids: `[A-Za-z0-9_+.-]+`, and not `.` or `..`, so an id is
/// always one path component below the state root.
pub fn validate_id(id: &str) -> Result<(), StateError> {
    let plain = !id.is_empty()
        && id != "."
        && id != ".."
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_+-.".contains(&b));
    if plain {
        Ok(())
    } else {
        Err(StateError::InvalidId(id.to_string()))
    }
}

/// What cryo remembers about one container.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ContainerRecord {
    /// Container id.
    pub id: String,
    /// Absolute bundle directory.
    pub bundle: PathBuf,
    /// Host path of the root filesystem.
    pub rootfs: PathBuf,
    /// What fds 0, 1 and 2 of the init process pointed to when it started (`/dev/null`,
    /// `pipe:[123]`, `/dev/pts/0` …). Written to `descriptors.json` at checkpoint so a restore
    /// can map the caller's new pipes onto them.
    pub stdio: Vec<String>,
    /// Whether the init process has a terminal (`process.terminal`).
    pub terminal: bool,
    /// When the record was made.
    pub created: DateTime<Utc>,
    /// Image directory this container was restored from, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restored_from: Option<PathBuf>,
}

/// Errors of the state store.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// No such container.
    #[error("container {0} does not exist")]
    NotFound(String),
    /// An id that is not a plain name (it would name a path outside the state root).
    #[error("invalid container id {0:?}: use letters, digits and _ + - . only, as runc")]
    InvalidId(String),
    /// Filesystem trouble, with the path.
    #[error("{step} {path}: {source}")]
    Io {
        /// What we were doing.
        step: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Another process holds the container's lock for too long.
    #[error("container {id} is busy: after {waited:?} its lock is still held by {holder}")]
    Busy {
        /// The container.
        id: String,
        /// How long we waited.
        waited: Duration,
        /// Who holds it.
        holder: String,
    },
    /// The record is unreadable.
    #[error("container record {path} is corrupt ({reason}); `cryo delete --force` removes it")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Parser message.
        reason: String,
    },
}

/// Where containers live: `--root` (default `/run/cryo`).
#[derive(Debug, Clone)]
pub struct StateStore {
    root: PathBuf,
}

/// An exclusive flock on one container id, held for the duration of a verb.
///
/// When it is released and the id has no container directory (the container was deleted, or
/// never existed: `cryo state typo`), the lock file is unlinked first, still under the lock, so
/// the lock directory does not grow with every id ever named. [`StateStore::lock`] re-checks
/// after each flock that it holds the file the path names, so a waiter left with the unlinked
/// inode takes the lock again on a fresh file instead of acting beside the next holder.
#[derive(Debug)]
pub struct StoreLock {
    // Never read: holding it is the lock.
    _guard: Flock<File>,
    path: PathBuf,
    container_dir: PathBuf,
}

impl std::os::fd::AsFd for StoreLock {
    /// The locked file (handed to cryo's guardian, which holds the lock while it lives).
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self._guard.as_fd()
    }
}

impl StoreLock {
    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// How long a verb waits for a container's lock: `CRYO_LOCK_TIMEOUT` seconds, default 60.
pub fn lock_timeout() -> Duration {
    std::env::var("CRYO_LOCK_TIMEOUT")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map(Duration::from_secs_f64)
        .unwrap_or(Duration::from_secs(60))
}

/// Lock the file at `path` exclusively, blocking; re-locks when the holder unlinked it.
fn lock_file(path: &Path) -> Result<Flock<File>, StateError> {
    loop {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(path)
            .map_err(|source| StateError::Io {
                step: "open lock",
                path: path.to_path_buf(),
                source,
            })?;
        let guard =
            Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, errno)| StateError::Io {
                step: "lock",
                path: path.to_path_buf(),
                source: errno.into(),
            })?;
        // If the previous holder unlinked the file while we waited, this flock guards
        // nothing: let it go (without Drop's unlink, the path may be a newer file) and retry.
        if is_file_at(&guard, path) {
            return Ok(guard);
        }
    }
}

/// Note in the lock file who holds it: the pid, since when, the command.
fn write_holder(file: &File) {
    use std::io::Write;
    let cmd = fs::read("/proc/self/cmdline")
        .map(|c| {
            c.split(|b| *b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default();
    let line = format!(
        "{} {} {}\n",
        std::process::id(),
        Utc::now().timestamp(),
        cmd
    );
    let mut f = file;
    let _ = f.set_len(0);
    let _ = std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(0));
    let _ = f.write_all(line.as_bytes());
}

/// Who holds the lock at `path`, in words.
fn describe_holder(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let mut parts = text.trim().splitn(3, ' ');
    let (Some(pid), Some(since), cmd) = (parts.next(), parts.next(), parts.next()) else {
        return "another cryo process".into();
    };
    let held = since
        .parse::<i64>()
        .map(|t| format!(" for {} s", (Utc::now().timestamp() - t).max(0)))
        .unwrap_or_default();
    let cmd = cmd.unwrap_or("cryo");
    if Path::new(&format!("/proc/{pid}")).exists() {
        format!("`{cmd}` (pid {pid}), which has held it{held}; wait for it to finish or stop it (kill {pid})")
    } else {
        format!(
            "the guardian of `{cmd}` (pid {pid}, gone), which is undoing what it left{held}; wait for it"
        )
    }
}

/// Whether `file` is the file `path` names now (not one a releaser has unlinked).
fn is_file_at(file: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), fs::metadata(path)) {
        (Ok(held), Ok(named)) => held.dev() == named.dev() && held.ino() == named.ino(),
        _ => false,
    }
}

impl Drop for StoreLock {
    fn drop(&mut self) {
        // Runs before the flock field is dropped, so the unlink happens while still locked.
        if !self.container_dir.exists() {
            let _ = fs::remove_file(&self.path);
        }
    }
}

impl StateStore {
    /// A store rooted at `root` (created on first use, mode 0700).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `<root>/<id>`: libcontainer's container directory.
    pub fn container_dir(&self, id: &str) -> PathBuf {
        self.root.join(id)
    }

    /// Take the per-container lock, waiting while another cryo process acts on the same id,
    /// but not for longer than [`lock_timeout`]: then the error says who holds it. Refuses an
    /// id that is not a plain name.
    pub fn lock(&self, id: &str) -> Result<StoreLock, StateError> {
        self.lock_within(id, lock_timeout())
    }

    /// [`StateStore::lock`] with an explicit limit on the wait.
    pub fn lock_within(&self, id: &str, timeout: Duration) -> Result<StoreLock, StateError> {
        validate_id(id)?;
        let dir = self.root.join(LOCK_DIR);
        create_private_dir(&dir)?;
        let path = dir.join(id);
        // The flock blocks in a thread of its own (the kernel queues waiters fairly); if the
        // wait runs out, the thread is left to drop a lock it may still get.
        let (tx, rx) = std::sync::mpsc::channel();
        let p = path.clone();
        std::thread::spawn(move || {
            let _ = tx.send(lock_file(&p));
        });
        let guard = match rx.recv_timeout(timeout) {
            Ok(r) => r?,
            Err(_) => {
                return Err(StateError::Busy {
                    id: id.to_string(),
                    waited: timeout,
                    holder: describe_holder(&path),
                })
            }
        };
        write_holder(&guard);
        Ok(StoreLock {
            _guard: guard,
            path,
            container_dir: self.container_dir(id),
        })
    }

    /// Whether libcontainer has a state for `id`.
    pub fn exists(&self, id: &str) -> bool {
        self.container_dir(id).join("state.json").exists()
    }

    /// Read the record of `id`; `Ok(None)` when the container has none (made by another tool).
    pub fn load(&self, id: &str) -> Result<Option<ContainerRecord>, StateError> {
        let path = self.container_dir(id).join(RECORD_FILE);
        match fs::read(&path) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes)
                    .map(Some)
                    .map_err(|e| StateError::Corrupt {
                        path,
                        reason: e.to_string(),
                    })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(StateError::Io {
                step: "read",
                path,
                source,
            }),
        }
    }

    /// Persist the record atomically (temp file, fsync, rename).
    pub fn save(&self, record: &ContainerRecord) -> Result<(), StateError> {
        let dir = self.container_dir(&record.id);
        create_private_dir(&dir)?;
        let path = dir.join(RECORD_FILE);
        let bytes = serde_json::to_vec_pretty(record).map_err(|e| StateError::Corrupt {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        write_atomic(&path, &bytes).map_err(|source| StateError::Io {
            step: "write",
            path,
            source,
        })
    }

    /// Ids of every container with a libcontainer state, sorted.
    pub fn list(&self) -> Result<Vec<String>, StateError> {
        let entries = match fs::read_dir(&self.root) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => {
                return Err(StateError::Io {
                    step: "list",
                    path: self.root.clone(),
                    source,
                })
            }
        };
        let mut ids: Vec<String> = entries
            .filter_map(Result::ok)
            .filter(|e| e.path().join("state.json").exists())
            .filter_map(|e| e.file_name().into_string().ok())
            .collect();
        ids.sort();
        Ok(ids)
    }
}

fn create_private_dir(dir: &Path) -> Result<(), StateError> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| StateError::Io {
            step: "create directory",
            path: dir.to_path_buf(),
            source,
        })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn ids_are_plain_names() {
        for ok in ["c1", "a.b_c+d-e", "856d25e4d464f2d65e05e773d347ba45"] {
            assert!(validate_id(ok).is_ok(), "{ok}");
        }
        for bad in ["", ".", "..", "../x", "a/b", "a b", "x\n"] {
            let e = validate_id(bad).unwrap_err().to_string();
            assert!(e.contains("invalid container id"), "{bad}: {e}");
        }
    }

    fn record(id: &str) -> ContainerRecord {
        ContainerRecord {
            id: id.into(),
            bundle: "/b".into(),
            rootfs: "/b/rootfs".into(),
            stdio: vec!["/dev/null".into(), "pipe:[1]".into(), "pipe:[2]".into()],
            terminal: false,
            created: Utc::now(),
            restored_from: None,
        }
    }

    #[test]
    fn save_load_roundtrip_and_missing_is_none() {
        let root = std::env::temp_dir().join(format!("cryo-store-{}", std::process::id()));
        let store = StateStore::new(&root);
        assert!(store.load("a").unwrap().is_none());
        let _lock = store.lock("a").unwrap();
        let r = record("a");
        store.save(&r).unwrap();
        assert_eq!(store.load("a").unwrap(), Some(r));
        fs::write(store.container_dir("a").join(RECORD_FILE), "{").unwrap();
        let e = store.load("a").unwrap_err().to_string();
        assert!(e.contains("corrupt") && e.contains("delete --force"), "{e}");
        fs::remove_dir_all(&root).unwrap();
    }

    fn fresh_store(tag: &str) -> (StateStore, PathBuf) {
        let root = std::env::temp_dir().join(format!("cryo-store-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        (StateStore::new(&root), root)
    }

    #[test]
    fn the_lock_file_of_an_id_without_container_goes_with_the_lock() {
        let (store, root) = fresh_store("unlink");
        let lock = store.lock("typo").unwrap();
        let path = lock.path().to_path_buf();
        assert!(path.exists());
        drop(lock);
        assert!(
            !path.exists(),
            "lock file of a missing container left behind"
        );

        fs::create_dir_all(store.container_dir("live")).unwrap();
        let lock = store.lock("live").unwrap();
        let path = lock.path().to_path_buf();
        drop(lock);
        assert!(path.exists(), "lock file of an existing container removed");
        fs::remove_dir_all(&root).unwrap();
    }

    /// Whether /proc/locks shows a blocked flock request (`->` lines) on `path`'s inode.
    fn someone_waits_on(path: &Path) -> bool {
        use std::os::unix::fs::MetadataExt;
        let Ok(meta) = fs::metadata(path) else {
            return false;
        };
        let inode = format!(":{}", meta.ino());
        fs::read_to_string("/proc/locks")
            .unwrap()
            .lines()
            .any(|l| l.contains("->") && l.contains("FLOCK") && l.contains(&inode))
    }

    #[test]
    fn a_busy_lock_times_out_naming_its_holder() {
        let (store, root) = fresh_store("busy");
        let held = store.lock("c1").unwrap();
        let start = std::time::Instant::now();
        let e = store
            .lock_within("c1", Duration::from_millis(200))
            .unwrap_err()
            .to_string();
        assert!(start.elapsed() < Duration::from_secs(5));
        let me = std::process::id().to_string();
        assert!(
            e.contains("container c1 is busy") && e.contains(&me) && e.contains("kill"),
            "{e}"
        );
        drop(held);
        // Free again: taken at once.
        drop(store.lock_within("c1", Duration::from_millis(200)).unwrap());
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_waiter_on_an_unlinked_lock_file_locks_the_new_one() {
        let (store, root) = fresh_store("waiter");
        let first = store.lock("gone").unwrap();
        let path = first.path().to_path_buf();
        let waiter = {
            let store = StateStore::new(&root);
            std::thread::spawn(move || store.lock("gone").unwrap())
        };
        // Release only once the waiter is blocked on the file about to be unlinked.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !someone_waits_on(&path) {
            assert!(
                std::time::Instant::now() < deadline,
                "the waiter never blocked"
            );
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        drop(first);
        let second = waiter.join().unwrap();
        // The waiter must hold the file the path names, so a third caller is excluded.
        let third = File::open(second.path()).expect("the waiter's lock file exists");
        let try_third = Flock::lock(third, FlockArg::LockExclusiveNonblock);
        assert!(
            try_third.is_err(),
            "a third caller got the lock beside the waiter"
        );
        drop(second);
        fs::remove_dir_all(&root).unwrap();
    }
}
