//! Page images prepared before the freeze.
//!
//! CRIU allocates the page cache of its page images while the container is frozen. cryo
//! sizes each task's pages image from its resident anonymous memory and faults the memory in
//! while the container still runs, so inside the freeze the pages are only copied: anonymous
//! memory written out after the freeze ([`Mode::Memory`], [`super::memory`]), or the file's
//! own page cache ([`Mode::PageCache`], [`crate::prefault`]) where the images are read again
//! right after the dump. Staging takes no more than the memory that is free, and stops when
//! the freeze begins: what is not staged by then is received all the same, only slower.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use memmap2::MmapMut;

use super::memory::Memory;
use super::protocol::PAGE_SIZE;
use super::ReceiveError;

/// Where the pages are staged before the freeze.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// In anonymous memory, written to the files with `O_DIRECT` from the freeze on and
    /// hashed on the way: the default, as it has no writeback cliff.
    Memory,
    /// In the files' own page cache: for images read whole right after the dump (a store
    /// generation compared with its parent, `--compress-pages`), which then find them
    /// cached.
    PageCache,
}

impl Mode {
    /// The name the manifest records.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Memory => "memory",
            Mode::PageCache => "page-cache",
        }
    }
}

/// Memory staging leaves this fraction of the machine's memory (at least
/// [`MIN_MEMORY_LEFT`]) to everything else.
const MEMORY_LEFT_DIVISOR: u64 = 16;
const MIN_MEMORY_LEFT: u64 = 256 << 20;

/// How many bytes staging may take: the memory available now less a reserve, so that the
/// container and the machine never run short because of a checkpoint. 0 where it cannot be
/// read.
pub fn memory_budget() -> u64 {
    use procfs::Current;
    let Ok(m) = procfs::Meminfo::current() else {
        return 0;
    };
    let reserve = (m.mem_total / MEMORY_LEFT_DIVISOR).max(MIN_MEMORY_LEFT);
    m.mem_available
        .unwrap_or(m.mem_free)
        .saturating_sub(reserve)
}

/// How long the freeze waits for staging: long enough for memory faulted in at a healthy
/// rate, bounded, and growing with the size. Past it the freeze starts and the rest is
/// received unstaged.
pub fn wait_limit(bytes: u64) -> Duration {
    const BASE: Duration = Duration::from_secs(1);
    const PER_GIB: Duration = Duration::from_millis(500);
    const MAX: Duration = Duration::from_secs(10);
    let gib = bytes as f64 / (1u64 << 30) as f64;
    (BASE + PER_GIB.mul_f64(gib)).min(MAX)
}

/// Slack over the measured size: the container keeps running (and allocating) until the
/// freeze. Pages beyond the staged size are still received, only written without the
/// head start.
const SLACK_BYTES: u64 = 1 << 20;

/// What CRIU is expected to send for one task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Estimate {
    /// The task's pid inside the container's pid namespace (CRIU's pagemap id).
    pub vpid: u64,
    /// Bytes of pages to prepare.
    pub bytes: u64,
}

/// Estimate each process's page image from `/proc`: its resident anonymous memory (what
/// CRIU dumps of a task: private anonymous and copied-on-write pages) plus slack. Processes
/// that vanish or cannot be read are left out: their pages are then written unstaged.
pub fn estimate(pids: &[i32]) -> Vec<Estimate> {
    pids.iter()
        .filter_map(|&pid| {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
            let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
            let vpid = innermost_pid(&status)?;
            let anon = kib_field(&rollup, "Anonymous:")? * 1024;
            Some(Estimate {
                vpid,
                bytes: round_up(anon + anon / 64 + SLACK_BYTES),
            })
        })
        .collect()
}

/// The last `NSpid:` value: the pid as the container's own pid namespace sees it.
fn innermost_pid(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))?
        .split_whitespace()
        .last()?
        .parse()
        .ok()
}

fn kib_field(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn round_up(bytes: u64) -> u64 {
    bytes.div_ceil(PAGE_SIZE) * PAGE_SIZE
}

/// A pages image being received: a file in the image dir under a temporary name, and, when it
/// was staged, its pre-faulted mapping.
#[derive(Debug)]
pub struct PagesFile {
    /// Temporary path (renamed to `pages-<id>.img` when complete).
    pub path: PathBuf,
    /// The open file.
    pub file: File,
    /// The pre-faulted mapping of the first `map.len()` bytes, if staged in the page cache.
    pub map: Option<MmapMut>,
    /// The memory that takes the first `memory.len()` bytes, if staged in memory.
    pub memory: Option<Memory>,
}

/// The temporary name of a pages image received for `key`.
pub fn temp_name(dir: &Path, key: &str) -> PathBuf {
    dir.join(format!(".cryo-pages-{key}.tmp"))
}

/// Create an empty, unstaged pages file.
pub fn create(dir: &Path, key: &str) -> Result<PagesFile, ReceiveError> {
    let path = temp_name(dir, key);
    // Private: it holds the container's memory.
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .map_err(ReceiveError::io("create", &path))?;
    Ok(PagesFile {
        path,
        file,
        map: None,
        memory: None,
    })
}

/// Create a pages file for `bytes` staged as `mode` says, faulted in until `stop` is set.
/// Returns it and the bytes faulted in. Where memory cannot be had, the file is returned
/// unstaged (correct, only without the head start).
pub fn stage(
    dir: &Path,
    key: &str,
    bytes: u64,
    mode: Mode,
    stop: &AtomicBool,
) -> Result<(PagesFile, u64), ReceiveError> {
    let mut pf = create(dir, key)?;
    let faulted = match mode {
        Mode::PageCache => {
            pf.map = crate::prefault::map_prefaulted(&pf.file, bytes, stop);
            pf.map.as_ref().map_or(0, |m| m.len() as u64)
        }
        Mode::Memory => match Memory::stage(bytes, stop) {
            Some((memory, faulted)) => {
                pf.memory = Some(memory);
                faulted
            }
            None => 0,
        },
    };
    if faulted == 0 && bytes > 0 {
        tracing::debug!("{}: not staged, receiving unstaged", pf.path.display());
    }
    Ok((pf, faulted))
}

impl PagesFile {
    /// Unmap, cut the file to the `len` bytes received (unless `untrimmed`) and give it its
    /// final name.
    ///
    /// `untrimmed` is for a file that is replaced after the dump (a store increment): its size
    /// is not touched ([`crate::prefault::resize`] says why), and its staged tail, past `len`,
    /// is left in place for the replacement to ignore.
    pub fn finish(
        mut self,
        len: u64,
        final_path: &Path,
        untrimmed: bool,
    ) -> Result<(), ReceiveError> {
        self.map = None;
        self.memory = None;
        let staged = self
            .file
            .metadata()
            .map_err(ReceiveError::io("stat", &self.path))?
            .len();
        if !(untrimmed && staged > len) {
            crate::prefault::resize(&self.file, len)
                .map_err(ReceiveError::io("truncate", &self.path))?;
        }
        std::fs::rename(&self.path, final_path).map_err(ReceiveError::io("rename", &self.path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_proc_fields() {
        let status = "Name:\tsh\nTgid:\t4242\nNSpid:\t4242\t1\nPPid:\t1\n";
        assert_eq!(innermost_pid(status), Some(1));
        assert_eq!(innermost_pid("NSpid:\t77\n"), Some(77));
        assert_eq!(innermost_pid("Name: x\n"), None);
        let rollup = "Rss:             524776 kB\nAnonymous:       524420 kB\n";
        assert_eq!(kib_field(rollup, "Anonymous:"), Some(524_420));
    }

    #[test]
    fn estimates_this_process() {
        let me = std::process::id() as i32;
        let e = estimate(&[me, -1]);
        assert_eq!(e.len(), 1, "an unreadable pid is left out");
        assert!(e[0].bytes >= SLACK_BYTES && e[0].bytes.is_multiple_of(PAGE_SIZE));
    }

    #[test]
    fn wait_limit_grows_with_size_and_is_bounded() {
        assert_eq!(wait_limit(0), Duration::from_secs(1));
        assert_eq!(wait_limit(4 << 30), Duration::from_secs(3));
        assert_eq!(wait_limit(64 << 30), Duration::from_secs(10));
    }

    #[test]
    fn budget_leaves_memory_to_the_machine() {
        let text = std::fs::read_to_string("/proc/meminfo").unwrap();
        let avail = kib_field(&text, "MemAvailable:").unwrap() * 1024;
        assert!(memory_budget() < avail, "some memory is always left");
    }

    #[test]
    fn memory_staging_stops_when_told() {
        let dir = tempfile::tempdir().unwrap();
        let stop = AtomicBool::new(true);
        let (pf, faulted) = stage(dir.path(), "1", 64 << 20, Mode::Memory, &stop).unwrap();
        assert_eq!(faulted, 0, "stopped before it began");
        assert_eq!(
            pf.memory.map(|m| m.len()),
            Some(64 << 20),
            "the memory is still there"
        );
        let go = AtomicBool::new(false);
        let (pf, faulted) = stage(dir.path(), "2", 64 << 20, Mode::Memory, &go).unwrap();
        assert_eq!(faulted, 64 << 20);
        assert!(pf.map.is_none());
    }

    #[test]
    fn staged_file_is_mapped_and_finished_to_its_length() {
        let dir = tempfile::tempdir().unwrap();
        let stop = AtomicBool::new(false);
        let (mut pf, faulted) =
            stage(dir.path(), "1", 8 * PAGE_SIZE, Mode::PageCache, &stop).unwrap();
        assert_eq!(faulted, 8 * PAGE_SIZE);
        let map = pf
            .map
            .as_mut()
            .expect("a local file system can be pre-faulted");
        assert_eq!(map.len() as u64, 8 * PAGE_SIZE);
        map[..4].copy_from_slice(b"page");
        let dst = dir.path().join("pages-1.img");
        pf.finish(PAGE_SIZE, &dst, false).unwrap();
        let data = std::fs::read(&dst).unwrap();
        assert_eq!(data.len() as u64, PAGE_SIZE);
        assert_eq!(&data[..4], b"page");
        assert!(!temp_name(dir.path(), "1").exists());
    }
}
