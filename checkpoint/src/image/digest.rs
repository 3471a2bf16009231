//! File digests for the manifest: BLAKE3, computed on all cores (the page images of a big
//! container are GiBs, and a restore verifies them before CRIU runs). `b3sum` checks them by
//! hand.

use std::path::Path;

use serde::{Deserialize, Serialize};

/// One image file as the manifest records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRecord {
    /// File name in the image directory.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// BLAKE3 of the content, hex.
    pub blake3: String,
}

/// BLAKE3 of a file, hex, and its size. Large files are memory-mapped and hashed on all
/// cores; small ones read.
pub fn digest_file(path: &Path) -> std::io::Result<(u64, String)> {
    let mut h = blake3::Hasher::new();
    h.update_mmap_rayon(path)?;
    let size = std::fs::metadata(path)?.len();
    Ok((size, h.finalize().to_hex().to_string()))
}

/// BLAKE3 of bytes, hex.
pub fn digest_bytes(bytes: &[u8]) -> String {
    blake3::hash(bytes).to_hex().to_string()
}

/// Digest every named file in `dir` (each one on all cores).
pub fn digest_files(dir: &Path, names: &[String]) -> std::io::Result<Vec<FileRecord>> {
    let mut out = Vec::with_capacity(names.len());
    for name in names {
        let path = dir.join(name);
        let (size, blake3) = digest_file(&path)
            .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        out.push(FileRecord {
            name: name.clone(),
            size,
            blake3,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn digest_matches_the_reference_and_changes_with_one_bit() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        let mut data = vec![7u8; 3 << 20];
        std::fs::write(&p, &data).unwrap();
        let (size, a) = digest_file(&p).unwrap();
        assert_eq!(size, 3 << 20);
        assert_eq!(a, digest_bytes(&data));
        data[1 << 20] ^= 1;
        std::fs::write(&p, &data).unwrap();
        assert_ne!(digest_file(&p).unwrap().1, a);
        let empty = d.path().join("e");
        std::fs::write(&empty, b"").unwrap();
        assert_eq!(digest_file(&empty).unwrap(), (0, digest_bytes(b"")));
    }
}
