//! `descriptors.json`: runc's record of what the init process's fds 0-2 were at dump time
//! (`["/dev/null","pipe:[112178]","pipe:[112179]"]`). A restore maps the caller's new stdio
//! onto these keys with CRIU's `inherit_fd`, which is how `podman logs` keeps flowing.

use std::path::Path;

/// File name inside the image directory.
pub const FILE: &str = "descriptors.json";

/// Read `/proc/<pid>/fd/{0,1,2}` (a missing fd is recorded as `/dev/null`, as runc does).
pub fn read_stdio(pid: i32) -> Vec<String> {
    (0..3)
        .map(|fd| {
            std::fs::read_link(format!("/proc/{pid}/fd/{fd}"))
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_else(|_| "/dev/null".to_string())
        })
        .collect()
}

/// Write the list into the image directory.
pub fn write(image_dir: &Path, stdio: &[String]) -> std::io::Result<()> {
    let bytes = serde_json::to_vec(stdio)?;
    cryo_oci::atomic::write_atomic(&image_dir.join(FILE), &bytes)
}

/// Read the list from an image directory; `Ok(None)` when the image has none (a pre-dump).
pub fn read(image_dir: &Path) -> Result<Option<Vec<String>>, String> {
    let path = image_dir.join(FILE);
    match std::fs::read(&path) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| format!("{} is not a JSON list of strings: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn roundtrip_in_runc_format() {
        let dir = std::env::temp_dir().join(format!("cryo-desc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let v = vec![
            "/dev/null".to_string(),
            "pipe:[1]".into(),
            "pipe:[2]".into(),
        ];
        write(&dir, &v).unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.join(FILE)).unwrap(),
            r#"["/dev/null","pipe:[1]","pipe:[2]"]"#
        );
        assert_eq!(read(&dir).unwrap(), Some(v));
        std::fs::write(dir.join(FILE), "{").unwrap();
        assert!(read(&dir).unwrap_err().contains("not a JSON list"));
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(read(&dir).unwrap(), None);
    }

    #[test]
    fn own_stdio_is_readable() {
        let me = std::process::id() as i32;
        assert_eq!(read_stdio(me).len(), 3);
    }
}
