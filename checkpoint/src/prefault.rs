//! Files whose page cache is faulted in before the freeze.
//!
//! Getting fresh page-cache pages (allocation, zeroing, and on a VM the hypervisor backing
//! each guest page anew) costs more than copying data into them. Whatever cryo writes while
//! the container is frozen (the page images, the rootfs changeset) is therefore written into
//! files sized and faulted in beforehand, while the container still runs.

use std::fs::File;

use memmap2::{Advice, MmapMut};

/// Size `file` (new and empty) to `bytes` and fault every page of it in, writable. Returns
/// the mapping, or `None` (the file cut back to empty) where the file system cannot map or
/// populate it: writing is then only slower, never wrong.
pub fn map_prefaulted(file: &File, bytes: u64) -> Option<MmapMut> {
    if bytes == 0 || file.set_len(bytes).is_err() {
        return None;
    }
    // SAFETY: callers pass a file they just created under a private name; nothing else
    // truncates it while the mapping lives (they drop the mapping before cutting the file).
    let mapped = unsafe { MmapMut::map_mut(file) };
    match mapped {
        Ok(map) if map.advise(Advice::PopulateWrite).is_ok() => Some(map),
        _ => {
            let _ = file.set_len(0);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn maps_the_whole_file_or_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let f = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(dir.path().join("f"))
            .unwrap();
        assert!(map_prefaulted(&f, 0).is_none());
        let map = map_prefaulted(&f, 3 * 4096).unwrap();
        assert_eq!(map.len(), 3 * 4096);
        assert_eq!(f.metadata().unwrap().len(), 3 * 4096);
    }
}
