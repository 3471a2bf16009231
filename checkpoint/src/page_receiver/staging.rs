//! Page images prepared before the freeze.
//!
//! CRIU allocates the page cache of its page images while the container is frozen. cryo
//! sizes each task's pages image from its resident anonymous memory and faults it in
//! ([`crate::prefault`]) while the container still runs, so inside the freeze the pages
//! are only copied.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use memmap2::MmapMut;

use super::protocol::PAGE_SIZE;
use super::ReceiveError;

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
    /// The pre-faulted mapping of the first `map.len()` bytes, if staged.
    pub map: Option<MmapMut>,
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
    })
}

/// Create a pages file of `bytes` and fault all of it in, writable. If the file system cannot
/// map or populate it, the file is returned unstaged (correct, only without the head start).
pub fn stage(dir: &Path, key: &str, bytes: u64) -> Result<PagesFile, ReceiveError> {
    let mut pf = create(dir, key)?;
    pf.map = crate::prefault::map_prefaulted(&pf.file, bytes);
    if pf.map.is_none() && bytes > 0 {
        tracing::debug!(
            "{}: cannot pre-fault, receiving unstaged",
            pf.path.display()
        );
    }
    Ok(pf)
}

impl PagesFile {
    /// Unmap, cut the file to the `len` bytes received and give it its final name.
    pub fn finish(mut self, len: u64, final_path: &Path) -> Result<(), ReceiveError> {
        self.map = None;
        self.file
            .set_len(len)
            .map_err(ReceiveError::io("truncate", &self.path))?;
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
    fn staged_file_is_mapped_and_finished_to_its_length() {
        let dir = tempfile::tempdir().unwrap();
        let mut pf = stage(dir.path(), "1", 8 * PAGE_SIZE).unwrap();
        let map = pf
            .map
            .as_mut()
            .expect("a local file system can be pre-faulted");
        assert_eq!(map.len() as u64, 8 * PAGE_SIZE);
        map[..4].copy_from_slice(b"page");
        let dst = dir.path().join("pages-1.img");
        pf.finish(PAGE_SIZE, &dst).unwrap();
        let data = std::fs::read(&dst).unwrap();
        assert_eq!(data.len() as u64, PAGE_SIZE);
        assert_eq!(&data[..4], b"page");
        assert!(!temp_name(dir.path(), "1").exists());
    }
}
