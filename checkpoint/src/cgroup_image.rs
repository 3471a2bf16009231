//! The freezer state CRIU records in `cgroup.img`, set to what the container had before cryo
//! froze it.
//!
//! With `freeze_cgroup` CRIU stores the state it found the freezer cgroup in as the
//! `freezer.state` property of the container's v1 freezer directory, and a restore that writes
//! existing cgroups' properties (`--manage-cgroups-mode full`, or a parent CRIU created) writes
//! it back at its very end. cryo freezes the container itself before CRIU looks, so CRIU always
//! found it `FROZEN`: such a restore froze the restored container, and CRIU itself with it when
//! it ran in that cgroup (a hang). runc lets CRIU freeze, so its images say `THAWED` for a
//! running container; after [`record_freezer_state`] cryo's say the same, and `FROZEN` only for
//! a container that was paused.
//!
//! The image is a CRIU image file (two magic numbers, then one size-prefixed `cgroup_entry`
//! protobuf, `images/cgroup.proto`). The property's value is replaced in place: `FROZEN` and
//! `THAWED` have the same length, so no size or offset changes.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

/// CRIU's image file name.
pub const CGROUP_IMAGE: &str = "cgroup.img";

const FROZEN: &[u8] = b"FROZEN";
const THAWED: &[u8] = b"THAWED";
/// The magic numbers that open an image file, then the entry's size.
const HEADER: usize = 8;
const IMG_COMMON_MAGIC: u32 = 0x5456_4319;
const CGROUP_MAGIC: u32 = 0x5938_3330;

/// Why the image could not be corrected.
#[derive(Debug, thiserror::Error)]
pub enum CgroupImageError {
    /// Reading or writing the file.
    #[error("{path}: {source}")]
    Io {
        /// The image file.
        path: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// Not the image format this module knows.
    #[error("{path} is not a CRIU cgroup image cryo can read: {why}")]
    Format {
        /// The image file.
        path: String,
        /// What did not fit.
        why: String,
    },
}

/// Make `cgroup.img` in `image_dir` record the freezer state the container had before the
/// checkpoint: `FROZEN` if it was paused, else `THAWED`. No image (CRIU dumped no cgroups, as
/// with `--manage-cgroups-mode ignore`) or no `freezer.state` in it (no v1 freezer: cgroup v2)
/// is fine. Returns how many properties were changed.
pub fn record_freezer_state(image_dir: &Path, was_paused: bool) -> Result<usize, CgroupImageError> {
    let path = image_dir.join(CGROUP_IMAGE);
    let shown = path.display().to_string();
    let io = |source| CgroupImageError::Io {
        path: shown.clone(),
        source,
    };
    let mut file = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(io(e)),
    };
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).map_err(io)?;
    let (from, to) = if was_paused {
        (THAWED, FROZEN)
    } else {
        (FROZEN, THAWED)
    };
    let offsets = freezer_state_values(&bytes, from).map_err(|why| CgroupImageError::Format {
        path: shown.clone(),
        why,
    })?;
    for &at in &offsets {
        file.seek(SeekFrom::Start(at as u64)).map_err(io)?;
        file.write_all(to).map_err(io)?;
    }
    Ok(offsets.len())
}

/// Offsets of every `freezer.state` value equal to `value` in a cgroup image file.
fn freezer_state_values(image: &[u8], value: &[u8]) -> Result<Vec<usize>, String> {
    let word = |at: usize| -> Result<u32, String> {
        image
            .get(at..at + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .ok_or_else(|| "the file is too short".to_string())
    };
    if word(0)? != IMG_COMMON_MAGIC || word(4)? != CGROUP_MAGIC {
        return Err("wrong magic numbers".into());
    }
    let mut found = Vec::new();
    let mut at = HEADER;
    // CRIU writes one entry; read every entry there is.
    while at < image.len() {
        let size = word(at)? as usize;
        let start = at + 4;
        let entry = image
            .get(start..start + size)
            .ok_or("an entry runs past the end of the file")?;
        // cgroup_entry.controllers (2) → cg_controller_entry.dirs (2) → cgroup_dir_entry.
        for (c_at, controller) in fields(entry, start, 2)? {
            for (d_at, dir) in fields(controller, c_at, 2)? {
                dir_values(dir, d_at, value, &mut found, 0)?;
            }
        }
        at = start + size;
    }
    Ok(found)
}

/// cgroup_dir_entry: its properties (3) and, recursively, its children (2).
fn dir_values(
    dir: &[u8],
    base: usize,
    value: &[u8],
    found: &mut Vec<usize>,
    depth: usize,
) -> Result<(), String> {
    // Deeper than any cgroup tree (the kernel's default cgroup.max.depth is unlimited, but a
    // path holds at most PATH_MAX / 2 levels): a corrupt file, not a tree.
    if depth > 2048 {
        return Err("cgroup directories nest too deep".into());
    }
    for (p_at, prop) in fields(dir, base, 3)? {
        let name = fields(prop, p_at, 1)?;
        let val = fields(prop, p_at, 2)?;
        if let ([(_, name)], [(v_at, v)]) = (name.as_slice(), val.as_slice()) {
            if *name == b"freezer.state" && *v == value {
                found.push(*v_at);
            }
        }
    }
    for (c_at, child) in fields(dir, base, 2)? {
        dir_values(child, c_at, value, found, depth + 1)?;
    }
    Ok(())
}

/// The length-delimited fields numbered `number` of protobuf message `msg` (which starts at
/// `base` in the file), each with the file offset of its contents.
fn fields(msg: &[u8], base: usize, number: u64) -> Result<Vec<(usize, &[u8])>, String> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < msg.len() {
        let key = varint(msg, &mut at)?;
        match key & 7 {
            0 => {
                varint(msg, &mut at)?;
            }
            1 => at += 8,
            5 => at += 4,
            2 => {
                let len = usize::try_from(varint(msg, &mut at)?)
                    .map_err(|_| "a field length does not fit in memory")?;
                let body = msg
                    .get(at..at.saturating_add(len))
                    .ok_or("a field runs past the end of its message")?;
                if key >> 3 == number {
                    out.push((base + at, body));
                }
                at += len;
            }
            t => return Err(format!("unknown protobuf wire type {t}")),
        }
    }
    if at != msg.len() {
        return Err("a field runs past the end of its message".into());
    }
    Ok(out)
}

fn varint(buf: &[u8], at: &mut usize) -> Result<u64, String> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *buf
            .get(*at)
            .ok_or("a number runs past the end of its message")?;
        *at += 1;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err("a number is longer than 10 bytes".into())
}

#[cfg(test)]
#[path = "cgroup_image_tests.rs"]
mod tests;
