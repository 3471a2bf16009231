#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;

use super::*;
use crate::image::digest::digest_files;

/// Write a small but complete cryo image (manifest listing its files) into `dir`.
fn write_image(dir: &Path, marker: &str) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("inventory.img"), marker).unwrap();
    std::fs::write(dir.join("core-1.img"), format!("core {marker}")).unwrap();
    std::fs::write(dir.join("dump.log"), "log").unwrap();
    let names = vec!["core-1.img".to_string(), "inventory.img".to_string()];
    let mut m = crate::manifest::tests::sample();
    m.files = digest_files(dir, &names).unwrap();
    m.write(dir).unwrap();
}

fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn a_new_target_appears_whole_and_private() {
    let t = tempfile::tempdir().unwrap();
    let target = t.path().join("deep/ck");
    let mut s = Staging::create(ImageTarget::inspect(&target).unwrap()).unwrap();
    assert!(!target.exists(), "nothing at the target before publishing");
    write_image(s.dir(), "new");
    s.publish().unwrap();
    assert_eq!(
        std::fs::read_to_string(target.join("inventory.img")).unwrap(),
        "new"
    );
    let mode = std::fs::metadata(&target).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);
    assert_eq!(listing(t.path().join("deep").as_path()), vec!["ck"]);
}

#[test]
fn an_old_checkpoint_stays_whole_until_the_new_one_replaces_it() {
    let t = tempfile::tempdir().unwrap();
    let target = t.path().join("ck");
    write_image(&target, "old");
    let target_info = ImageTarget::inspect(&target).unwrap();
    assert_eq!(target_info.existing(), Existing::Checkpoint);
    let mut s = Staging::create(target_info).unwrap();
    write_image(s.dir(), "new");
    // Before publishing, the target is the old image, untouched.
    assert_eq!(
        std::fs::read_to_string(target.join("inventory.img")).unwrap(),
        "old"
    );
    assert!(s.publish().unwrap().is_none());
    assert_eq!(
        std::fs::read_to_string(target.join("inventory.img")).unwrap(),
        "new"
    );
    assert_eq!(
        listing(t.path()),
        vec!["ck"],
        "the old image and the staging dir are gone"
    );
    assert!(crate::image::verify_image(&target).is_ok());
}

#[test]
fn a_failed_checkpoint_leaves_the_callers_directory_as_it_was() {
    let t = tempfile::tempdir().unwrap();
    let target = t.path().join("ck");
    std::fs::create_dir(&target).unwrap();
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o755)).unwrap();
    {
        let s = Staging::create(ImageTarget::inspect(&target).unwrap()).unwrap();
        write_image(s.dir(), "half");
        // dropped unpublished: a failure
    }
    assert!(listing(&target).is_empty());
    assert_eq!(listing(t.path()), vec!["ck"]);
    let mode = std::fs::metadata(&target).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o755, "the caller's directory mode is untouched");
}

#[test]
fn foreign_content_is_refused_before_anything_is_written() {
    let t = tempfile::tempdir().unwrap();
    // User files (think --image-path /tmp or the container's rootfs).
    let user = t.path().join("user");
    std::fs::create_dir(&user).unwrap();
    std::fs::write(user.join("notes.txt"), "mine").unwrap();
    let e = ImageTarget::inspect(&user).unwrap_err().to_string();
    assert!(
        e.contains("notes.txt") && e.contains("choose another --image-path"),
        "{e}"
    );
    // A runc image (no manifest).
    let runc = t.path().join("runc");
    std::fs::create_dir(&runc).unwrap();
    std::fs::write(runc.join("inventory.img"), "x").unwrap();
    let e = ImageTarget::inspect(&runc).unwrap_err().to_string();
    assert!(e.contains("without a cryo manifest"), "{e}");
    // A cryo checkpoint plus a stranger.
    let mixed = t.path().join("mixed");
    write_image(&mixed, "old");
    std::fs::write(mixed.join("pages-9.img"), "x").unwrap();
    let e = ImageTarget::inspect(&mixed).unwrap_err().to_string();
    assert!(e.contains("pages-9.img"), "{e}");
    // A plain file.
    let file = t.path().join("file");
    std::fs::write(&file, "x").unwrap();
    assert!(ImageTarget::inspect(&file).is_err());
    assert_eq!(listing(&user), vec!["notes.txt"]);
}

#[test]
fn a_symlinked_target_is_resolved_and_the_link_kept() {
    let t = tempfile::tempdir().unwrap();
    let real = t.path().join("real");
    std::fs::create_dir(&real).unwrap();
    let link = t.path().join("link");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let mut s = Staging::create(ImageTarget::inspect(&link).unwrap()).unwrap();
    write_image(s.dir(), "new");
    s.publish().unwrap();
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(
        std::fs::read_to_string(link.join("inventory.img")).unwrap(),
        "new"
    );
}

#[test]
fn staging_left_by_a_dead_process_is_removed() {
    let t = tempfile::tempdir().unwrap();
    let target = t.path().join("ck");
    // A pid that cannot exist (above pid_max's ceiling).
    let stale = t.path().join(".ck.cryo-new-99999999");
    std::fs::create_dir(&stale).unwrap();
    std::fs::write(stale.join("pages-1.img"), "half").unwrap();
    let s = Staging::create(ImageTarget::inspect(&target).unwrap()).unwrap();
    assert!(!stale.exists());
    drop(s);
    assert!(listing(t.path()).is_empty());
}

#[test]
fn a_mount_point_target_gets_the_files_moved_in_manifest_last() {
    // Needs root: a tmpfs mounted at the target, which cannot be renamed or swapped.
    let t = tempfile::tempdir().unwrap();
    let target = t.path().join("mnt");
    std::fs::create_dir(&target).unwrap();
    nix::mount::mount(
        Some("tmpfs"),
        &target,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some("size=16m"),
    )
    .expect("mount tmpfs (these tests run as root)");
    let result = std::panic::catch_unwind(|| {
        write_image(&target, "old");
        let mut s = Staging::create(ImageTarget::inspect(&target).unwrap()).unwrap();
        assert!(
            s.dir().starts_with(&target),
            "staging lives inside the mount"
        );
        write_image(s.dir(), "new");
        assert!(!s.publish_debris().is_empty());
        s.publish().unwrap();
        assert_eq!(
            std::fs::read_to_string(target.join("inventory.img")).unwrap(),
            "new"
        );
        assert!(crate::image::verify_image(&target).is_ok());
        assert!(!listing(&target).iter().any(|n| n.starts_with(".cryo-")));
    });
    nix::mount::umount2(&target, nix::mount::MntFlags::MNT_DETACH).unwrap();
    result.unwrap();
}
