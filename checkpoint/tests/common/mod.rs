//! Shared by the rootfs tests: a busybox lower, overlay mounts that unmount themselves, the
//! realistic set of changes a container makes, tree comparison.
#![allow(clippy::unwrap_used, dead_code)]

use std::fs;
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use cryo_tests::tree_digest::{diff_trees, tree_digest};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::stat::{mknod, Mode, SFlag};

pub const GIB: u64 = 1 << 30;

pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the rootfs round-trip tests mount overlays, chown and mknod: run them as root \
         (sudo -E cargo test -p cryo-checkpoint rootfs)"
    );
    assert!(
        Path::new("/bin/busybox").exists(),
        "/bin/busybox is missing: install busybox-static (scripts/setup)"
    );
}

/// Overlay mounts, unmounted (lazily, last first) however the test ends.
pub struct Mounts(pub Vec<PathBuf>);

impl Mounts {
    pub fn overlay(&mut self, base: &Path, lower: &Path, n: u32) -> (PathBuf, PathBuf) {
        let (upper, work, merged) = (
            base.join(format!("upper{n}")),
            base.join(format!("work{n}")),
            base.join(format!("merged{n}")),
        );
        for d in [&upper, &work, &merged] {
            fs::create_dir_all(d).unwrap();
        }
        let opts = format!(
            "lowerdir={},upperdir={},workdir={}",
            lower.display(),
            upper.display(),
            work.display()
        );
        mount(
            Some("overlay"),
            &merged,
            Some("overlay"),
            MsFlags::empty(),
            Some(opts.as_str()),
        )
        .unwrap_or_else(|e| panic!("mount overlay {opts}: {e}"));
        self.0.push(merged.clone());
        (upper, merged)
    }
}

impl Drop for Mounts {
    fn drop(&mut self) {
        for m in self.0.iter().rev() {
            let _ = umount2(m, MntFlags::MNT_DETACH);
        }
    }
}

pub fn write(p: &Path, data: &[u8]) {
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(p, data).unwrap();
}

pub fn build_lower(lower: &Path) {
    fs::create_dir_all(lower.join("bin")).unwrap();
    let st = Command::new("/bin/busybox")
        .args(["--install", "-s"])
        .arg(lower.join("bin"))
        .status()
        .unwrap();
    assert!(st.success(), "busybox --install failed");
    write(
        &lower.join("etc/passwd"),
        b"root:x:0:0:root:/root:/bin/sh\n",
    );
    write(&lower.join("etc/hosts"), b"127.0.0.1 localhost\n");
    write(&lower.join("var/log/old.log"), b"old\n");
    write(&lower.join("appendme"), b"line1\n");
    write(&lower.join("modifyme"), b"original\n");
    write(&lower.join("deleteme"), b"bye\n");
    write(&lower.join("deldir/sub/f1"), b"1");
    write(&lower.join("deldir/f2"), b"2");
    write(&lower.join("dir2file/a"), b"a");
    write(&lower.join("dir2file/b/c"), b"c");
    write(&lower.join("file2dir"), b"was a file");
    write(&lower.join("opq/keep1"), b"k1");
    write(&lower.join("opq/sub/x"), b"x");
    write(&lower.join("data/hard_lower"), b"shared");
    xattr::set(lower.join("var"), "user.lower", b"l").unwrap();
}

/// Every kind of change a container makes, through the merged view.
pub fn change(m: &Path) {
    // created, with odd names and long paths
    write(&m.join("new/dir/file.txt"), b"hello");
    write(&m.join("new/with space ✓.txt"), b"unicode");
    let long = m.join(format!("new/{}/deep/file", "l".repeat(120)));
    write(&long, b"long path");
    // modified, appended, deleted (a file, a whole directory, a lower symlink)
    write(&m.join("etc/hosts"), b"10.0.0.1 changed\n");
    let mut f = fs::OpenOptions::new()
        .append(true)
        .open(m.join("appendme"))
        .unwrap();
    std::io::Write::write_all(&mut f, b"line2\n").unwrap();
    write(&m.join("modifyme"), b"modified\n");
    fs::remove_file(m.join("deleteme")).unwrap();
    fs::remove_dir_all(m.join("deldir")).unwrap();
    fs::remove_file(m.join("bin/vi")).unwrap();
    // a directory replaced by a file, a file by a directory
    fs::remove_dir_all(m.join("dir2file")).unwrap();
    write(&m.join("dir2file"), b"now a file");
    fs::remove_file(m.join("file2dir")).unwrap();
    write(&m.join("file2dir/inside"), b"now a dir");
    // symlinks (relative, absolute, long target)
    std::os::unix::fs::symlink("../etc/passwd", m.join("new/rel")).unwrap();
    std::os::unix::fs::symlink("/etc/hosts", m.join("new/abs")).unwrap();
    std::os::unix::fs::symlink("t".repeat(150), m.join("new/longtarget")).unwrap();
    // hard links: a new pair, and a new link to a lower file
    write(&m.join("new/h1"), b"linked");
    fs::hard_link(m.join("new/h1"), m.join("new/h2")).unwrap();
    fs::hard_link(m.join("data/hard_lower"), m.join("data/hard_lower2")).unwrap();
    // sparse: 1 GiB with data at a few offsets, ending in a hole; and one with many extents
    let f = fs::File::create(m.join("new/sparse")).unwrap();
    f.set_len(GIB).unwrap();
    for (i, off) in [0u64, (300 << 20) + 5, (700 << 20) + 123]
        .iter()
        .enumerate()
    {
        f.write_all_at(&[b'A' + i as u8; 3000], *off).unwrap();
    }
    let many = m.join(format!("new/{}/many-extents", "s".repeat(110)));
    fs::create_dir_all(many.parent().unwrap()).unwrap();
    let f = fs::File::create(&many).unwrap();
    for i in 0..50u64 {
        f.write_all_at(&[i as u8 + 1; 100], i * (1 << 20)).unwrap();
    }
    // fifo and a real device node
    nix::unistd::mkfifo(&m.join("new/fifo"), Mode::from_bits_truncate(0o640)).unwrap();
    let dev = nix::sys::stat::makedev(1, 3);
    mknod(
        &m.join("new/null2"),
        SFlag::S_IFCHR,
        Mode::from_bits_truncate(0o666),
        dev,
    )
    .unwrap();
    // xattrs: user, trusted, and file capabilities (v2, cap_net_bind_service)
    xattr::set(m.join("new/dir/file.txt"), "user.test", b"value").unwrap();
    xattr::set(m.join("modifyme"), "trusted.test", b"t").unwrap();
    write(&m.join("new/capbin"), b"#!/bin/sh\n");
    let cap = [1u8, 0, 0, 2, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    xattr::set(m.join("new/capbin"), "security.capability", &cap).unwrap();
    // an opaque directory: a lower dir removed and made again with other content
    fs::remove_dir_all(m.join("opq")).unwrap();
    write(&m.join("opq/fresh"), b"fresh");
    fs::create_dir(m.join("opq/sub2")).unwrap();
    // a lower directory's mode and attributes changed
    fs::set_permissions(m.join("var"), fs::Permissions::from_mode(0o750)).unwrap();
    xattr::set(m.join("var"), "user.changed", b"1").unwrap();
    // owners, set-id and sticky modes, an old mtime
    write(&m.join("new/suid"), b"suid");
    nix::unistd::chown(&m.join("new/suid"), Some(1234.into()), Some(5678.into())).unwrap();
    fs::set_permissions(m.join("new/suid"), fs::Permissions::from_mode(0o4755)).unwrap();
    fs::create_dir(m.join("new/sticky")).unwrap();
    nix::unistd::chown(&m.join("new/sticky"), Some(42.into()), Some(42.into())).unwrap();
    fs::set_permissions(m.join("new/sticky"), fs::Permissions::from_mode(0o1777)).unwrap();
    let old = nix::sys::time::TimeSpec::new(1_000_000_000, 0);
    nix::sys::stat::utimensat(
        None,
        &m.join("modifyme"),
        &old,
        &old,
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    )
    .unwrap();
    fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(m.join("new/private"))
        .unwrap();
}

pub fn assert_same(a: &Path, b: &Path, what: &str) {
    let diff = diff_trees(&tree_digest(a), &tree_digest(b));
    assert!(
        diff.is_empty(),
        "{what}: trees differ:\n{}",
        diff.join("\n")
    );
}
