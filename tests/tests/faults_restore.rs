//! The reliability suite, restore side: a damaged image is refused before anything is touched,
//! naming the file; a restore that is killed, hangs or is interrupted leaves nothing behind,
//! and `delete --force` afterwards never touches the bundle's rootfs. Outcomes go to the
//! reliability table beside runc's on the same case.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use cryo_checkpoint::manifest::Manifest;
use cryo_tests::bundle::busybox_rootfs;
use cryo_tests::fanotify::OpenTrap;
use cryo_tests::faults::{
    criu_child, finish, has_open, heartbeat_bin, mounts_below, processes_mentioning, record,
    signal, spawn, Heartbeat,
};
use cryo_tests::tree_digest::tree_digest;
use cryo_tests::{unique, Bundle, Runtime};
use nix::sys::signal::Signal;

const MIB: u32 = 64;
/// The container changes its filesystem (so the image has a changeset), then beats.
const SCRIPT: &str = "echo new > /root/newfile; rm /bin/vi; exec /heartbeat 64";

/// A lower dir with busybox and the heartbeat, shared by the bundles of one test.
struct Lower(PathBuf);

impl Lower {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(unique("cryo-lower"));
        busybox_rootfs(&dir);
        std::fs::copy(heartbeat_bin(), dir.join("heartbeat")).unwrap();
        Self(dir)
    }

    fn bundle(&self) -> Bundle {
        Bundle::overlay(&self.0, &["sh", "-c", SCRIPT])
    }
}

impl Drop for Lower {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Run the workload on an overlay and checkpoint it (stopping it); returns the image.
fn good_image(rt: &Runtime, lower: &Lower, keep: &Path) -> PathBuf {
    let b = lower.bundle();
    let id = unique("src");
    let _g = rt.guard(&id);
    let lines = rt.spawn_with_pipe(&["run", "-d", "--bundle", b.dir.to_str().unwrap(), &id]);
    lines.wait_count(100, Duration::from_secs(30));
    let img = keep.join("img");
    rt.ok(&["checkpoint", "--image-path", img.to_str().unwrap(), &id]);
    assert!(img.join("rootfs-diff.tar.zst").exists());
    img
}

/// Wait until `child` (a restore of `id` under `rt`) runs CRIU's restore itself: its journal
/// records the cgroup (the last thing made before CRIU) and a CRIU child runs. Returns CRIU's
/// pid.
fn wait_for_restoring_criu(rt: &Runtime, id: &str, child: &mut std::process::Child) -> i32 {
    let journal = rt.root.join(id).join("restore-journal.json");
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the restore ended before CRIU restored"
        );
        assert!(Instant::now() < end, "CRIU's restore never started");
        let recorded = std::fs::read_to_string(&journal).is_ok_and(|j| j.contains("cgroup_path"));
        if recorded {
            if let Some(c) = criu_child(child.id()).filter(|&c| has_open(c, "restore.log")) {
                return c;
            }
        }
        std::thread::sleep(Duration::from_micros(300));
    }
}

/// `cp -a` of an image.
fn copy_image(from: &Path, to: &Path) {
    let st = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(st.success());
}

/// The largest pages-*.img of an image.
fn largest_pages(img: &Path) -> PathBuf {
    std::fs::read_dir(img)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy();
            n.starts_with("pages-") && n.ends_with(".img")
        })
        .max_by_key(|p| std::fs::metadata(p).unwrap().len())
        .unwrap()
}

fn flip_byte(file: &Path, at: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(file)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).unwrap();
    b[0] ^= 0x40;
    f.write_all_at(&b, at).unwrap();
}

/// After a refused or undone restore of `id`: no state, no mount, no cgroup, no journal,
/// no process; the target rootfs exactly as before.
fn assert_nothing_left(
    rt: &Runtime,
    id: &str,
    rootfs: &Path,
    before: &std::collections::BTreeMap<String, cryo_tests::tree_digest::EntryDigest>,
) {
    let end = Instant::now() + Duration::from_secs(10);
    // A killed restore is undone by its guardian: give it the moment it needs.
    while rt.root.join(id).exists() || !processes_mentioning(id).is_empty() {
        assert!(
            Instant::now() < end,
            "left: state dir {}, processes {:?}",
            rt.root.join(id).exists(),
            processes_mentioning(id)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(rt.fails(&["state", id]).contains("does not exist"));
    assert!(
        mounts_below(&rt.root).is_empty(),
        "mounts left: {:?}",
        mounts_below(&rt.root)
    );
    for name in [format!(":youki:{id}"), id.to_string()] {
        cryo_tests::cgroups::assert_no_cgroup(&name);
    }
    let after = tree_digest(rootfs);
    assert!(
        &after == before,
        "the target rootfs changed: {:?}",
        cryo_tests::tree_digest::diff_trees(before, &after)
    );
}

fn restore_args<'a>(b: &'a Bundle, img: &'a Path, id: &'a str) -> Vec<&'a str> {
    vec![
        "restore",
        "-d",
        "--bundle",
        b.dir.to_str().unwrap(),
        "--image-path",
        img.to_str().unwrap(),
        id,
    ]
}

/// What runc does with a damaged image: restores it anyway (and what the workload then says
/// of its memory), or fails.
fn runc_on(img: &Path, lower: &Lower) -> String {
    let r = Runtime::runc();
    let b = lower.bundle();
    let id = unique("runc-dmg");
    let _g = r.guard(&id);
    let mut child = r
        .cmd()
        .args(restore_args(&b, img, &id))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let end = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > end {
            let criu = criu_child(child.id());
            let _ = child.kill();
            if let Some(c) = criu {
                signal(c, Signal::SIGKILL);
            }
            let _ = child.wait();
            return "hangs (stopped after 20 s)".into();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let (status, _) = finish(child);
    if !status.success() {
        return "refuses (CRIU error)".into();
    }
    std::thread::sleep(Duration::from_secs(2));
    let check = std::fs::read_to_string(b.rootfs().join("tmp/check")).unwrap_or_default();
    let newfile = b.rootfs().join("root/newfile").exists();
    format!(
        "exit 0; workload says {:?}; file changes {}",
        check.trim(),
        if newfile { "kept" } else { "LOST" }
    )
}

/// The page images' digests are checked beside CRIU (the rest before anything is touched):
/// a flipped page byte must still fail the restore before any restored task runs. CRIU's log
/// says whether it resumed the tasks; and the restored heartbeat, which writes a line to the
/// restore's stdout at every beat, must write none.
#[test]
fn a_flipped_page_byte_is_caught_before_any_restored_task_runs() {
    let rt = Runtime::cryo();
    let lower = Lower::new();
    let keep = tempfile_dir("dmg-pages");
    let good = good_image(&rt, &lower, &keep);
    let img = keep.join("flipped");
    copy_image(&good, &img);
    let p = largest_pages(&img);
    flip_byte(&p, std::fs::metadata(&p).unwrap().len() / 2);
    let b = lower.bundle();
    let before = tree_digest(&b.rootfs());
    let id = unique("dmg-pages");
    let _g = rt.guard(&id);
    let mut child = rt
        .cmd()
        .args(restore_args(&b, &img, &id))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let beats = cryo_tests::runtime::Lines::from_stdout(child.stdout.take().unwrap());
    let mut stderr = child.stderr.take().unwrap();
    let said = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr, &mut s);
        s
    });
    let end = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < end, "the restore did not end");
        std::thread::sleep(Duration::from_millis(20));
    };
    // The pipe closes once nothing holds it: every restored task is gone.
    let lines = beats.drain(Duration::from_secs(10));
    assert!(!status.success(), "a damaged page image restored");
    assert!(
        lines.is_empty(),
        "a restored task ran on damaged pages: {lines:?}"
    );
    let err = said.join().unwrap();
    assert!(
        err.contains("does not match its recorded") && err.contains("pages-"),
        "{err}"
    );
    let log = std::fs::read_to_string(img.join("restore.log")).unwrap();
    assert!(
        log.contains("Aborting restore due to post-restore script"),
        "CRIU was not stopped at post-restore"
    );
    assert!(
        !log.contains("Tasks resumed"),
        "CRIU resumed the tasks of a damaged image"
    );
    assert_nothing_left(&rt, &id, &b.rootfs(), &before);
    let _ = std::fs::remove_dir_all(&keep);
}

/// Each damage of a good image, restored into a fresh overlay: refused with the file named,
/// nothing touched. runc on the same damaged images, where runc restores such an image.
#[test]
fn damaged_images_are_refused_before_anything_is_touched() {
    let rt = Runtime::cryo();
    let lower = Lower::new();
    let keep = tempfile_dir("dmg");
    let good = good_image(&rt, &lower, &keep);
    type Damage = (&'static str, &'static str, fn(&Path), bool);
    let damages: Vec<Damage> = vec![
        (
            "one flipped byte in the page image",
            "does not match its recorded",
            |i| {
                let p = largest_pages(i);
                let len = std::fs::metadata(&p).unwrap().len();
                flip_byte(&p, len / 2);
            },
            true,
        ),
        (
            "page image truncated",
            "bytes, the manifest recorded",
            |i| {
                let p = largest_pages(i);
                let len = std::fs::metadata(&p).unwrap().len();
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(&p)
                    .unwrap()
                    .set_len(len / 2)
                    .unwrap();
            },
            true,
        ),
        (
            "one flipped byte in the rootfs changeset",
            "rootfs-diff.tar.zst",
            |i| {
                let p = i.join("rootfs-diff.tar.zst");
                let len = std::fs::metadata(&p).unwrap().len();
                flip_byte(&p, len / 2);
            },
            false,
        ),
        (
            "manifest deleted",
            "incomplete or damaged",
            |i| {
                std::fs::remove_file(i.join("cryo-manifest.json")).unwrap();
            },
            false,
        ),
        (
            "descriptors.json deleted",
            "descriptors.json is missing",
            |i| {
                std::fs::remove_file(i.join("descriptors.json")).unwrap();
            },
            true,
        ),
        (
            "a size in the manifest edited",
            "damaged or was edited",
            |i| {
                let p = i.join("cryo-manifest.json");
                let t = std::fs::read_to_string(&p).unwrap();
                let at = t.find("\"size\": ").unwrap() + 8;
                let mut t = t.into_bytes();
                t[at] = if t[at] == b'9' { b'1' } else { t[at] + 1 };
                std::fs::write(&p, t).unwrap();
            },
            false,
        ),
        (
            "a page image of another dump beside it",
            "does not list",
            |i| {
                std::fs::copy(largest_pages(i), i.join("pages-99.img")).unwrap();
            },
            false,
        ),
        (
            "made by a newer CRIU (manifest consistent)",
            "restore it with CRIU >=",
            |i| {
                let mut m = Manifest::read(i).unwrap().unwrap();
                m.criu_version = 59_900;
                m.write(i).unwrap();
            },
            false,
        ),
        (
            "changeset with the host's disk as a 0666 block device (manifest consistent)",
            "is not one the runtime creates",
            |i| hostile_changeset(i),
            false,
        ),
        (
            "needs a feature this cryo lacks (manifest consistent)",
            "newer cryo",
            |i| {
                let mut m = Manifest::read(i).unwrap().unwrap();
                m.requires.push("quantum-pages".into());
                m.write(i).unwrap();
            },
            false,
        ),
    ];
    for (n, (what, says, damage, runc_too)) in damages.into_iter().enumerate() {
        let img = keep.join(format!("img-{n}"));
        copy_image(&good, &img);
        damage(&img);
        let b = lower.bundle();
        let before = tree_digest(&b.rootfs());
        let id = unique("dmg");
        let _g = rt.guard(&id);
        let err = rt.fails(&restore_args(&b, &img, &id));
        assert!(err.contains(says), "{what}: {err}");
        assert_nothing_left(&rt, &id, &b.rootfs(), &before);
        let runc = if runc_too {
            runc_on(&img, &lower)
        } else {
            "-".into()
        };
        let first_line = err.lines().next().unwrap_or("").to_string();
        let reason = first_line.rsplit(": ").next().unwrap_or("").to_string();
        record(
            &format!("restore: {what}"),
            &format!("refused, nothing touched ({})", shorten(&reason)),
            &runc,
        );
    }
    // The good image still restores, exactly.
    let b = lower.bundle();
    let id = unique("good");
    let _g = rt.guard(&id);
    rt.ok(&["verify", "--image-path", good.to_str().unwrap()]);
    let hb = Heartbeat {
        rt: rt.clone(),
        lines: rt.spawn_with_pipe(&restore_args(&b, &good, &id)),
        bundle: b,
        id: id.clone(),
    };
    assert!(hb.advancing(Duration::from_secs(10)));
    hb.assert_memory_intact(Duration::from_secs(30));
    assert!(hb.bundle.rootfs().join("root/newfile").exists());
    assert!(!hb.bundle.rootfs().join("bin/vi").exists());
    drop(hb);
    let _ = std::fs::remove_dir_all(&keep);
}

fn shorten(s: &str) -> String {
    let s = s.trim();
    if s.len() > 90 {
        format!(
            "{}…",
            &s[..s.char_indices().nth(90).map_or(s.len(), |(i, _)| i)]
        )
    } else {
        s.to_string()
    }
}

/// Replace the image's changeset by one that makes /dev/sda (block 8:0, 0666) and reseal the
/// manifest around it, listing the node as the old format trusted it: an edited image that is
/// consistent in itself. Only the target spec decides which device nodes may be made.
fn hostile_changeset(img: &Path) {
    use cryo_checkpoint::rootfs::{capture_upper, compress_zstd, CaptureOptions};
    let src = img.join("hostile-src");
    std::fs::create_dir_all(src.join("dev")).unwrap();
    nix::sys::stat::mknod(
        &src.join("dev/sda"),
        nix::sys::stat::SFlag::S_IFBLK,
        nix::sys::stat::Mode::from_bits_truncate(0o666),
        nix::sys::stat::makedev(8, 0),
    )
    .unwrap();
    let raw = img.join("hostile.tar");
    let rep = capture_upper(&src, &raw, &CaptureOptions::default()).unwrap();
    let zst = img.join("rootfs-diff.tar.zst");
    compress_zstd(&raw, &zst, 3, 1).unwrap();
    std::fs::remove_file(&raw).unwrap();
    std::fs::remove_dir_all(&src).unwrap();
    let (size, blake3) = cryo_checkpoint::image::digest::digest_file(&zst).unwrap();
    let mut m = Manifest::read(img).unwrap().unwrap();
    for f in m
        .files
        .iter_mut()
        .filter(|f| f.name == "rootfs-diff.tar.zst")
    {
        f.size = size;
        f.blake3 = blake3.clone();
    }
    m.rootfs.device_nodes = rep.device_nodes;
    m.rootfs.entries = rep.entries;
    m.rootfs.bytes = rep.bytes;
    m.rootfs.logical_bytes = Some(rep.logical_bytes);
    m.write(img).unwrap();
}

fn tempfile_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(unique(&format!("cryo-{tag}")));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A restore killed while CRIU restores, then `delete --force` (what clients send): the
/// guardian undoes it (changeset rolled back, processes, cgroup, mount, state gone), the
/// bundle's rootfs is intact, and the same id restores afterwards. runc on the same case.
#[test]
fn a_killed_restore_is_undone_and_delete_never_touches_the_rootfs() {
    let rt = Runtime::cryo();
    let lower = Lower::new();
    let keep = tempfile_dir("kill-rst");
    let img = good_image(&rt, &lower, &keep);
    let b = lower.bundle();
    let before = tree_digest(&b.rootfs());
    let id = unique("killed");
    let mut child = spawn(&rt, &restore_args(&b, &img, &id));
    wait_for_restoring_criu(&rt, &id, &mut child);
    signal(child.id() as i32, Signal::SIGKILL);
    let _ = child.wait();
    assert_nothing_left(&rt, &id, &b.rootfs(), &before);
    rt.ok(&["delete", "--force", &id]);
    assert_eq!(
        tree_digest(&b.rootfs()),
        before,
        "delete --force touched the rootfs"
    );
    // The id is free and the image restores.
    let _g = rt.guard(&id);
    let hb = Heartbeat {
        rt: rt.clone(),
        lines: rt.spawn_with_pipe(&restore_args(&b, &img, &id)),
        bundle: b,
        id: id.clone(),
    };
    assert!(hb.advancing(Duration::from_secs(10)));
    hb.assert_memory_intact(Duration::from_secs(30));
    drop(hb);

    // runc: the same kill, then `runc delete -f`, on a plain-directory copy of the rootfs.
    let r = Runtime::runc();
    let rb = Bundle::busybox(&["/heartbeat", &MIB.to_string()]);
    std::fs::copy(heartbeat_bin(), rb.rootfs().join("heartbeat")).unwrap();
    let rid = unique("runc-src");
    let _rg = r.guard(&rid);
    let lines = r.spawn_with_pipe(&["run", "-d", "--bundle", rb.dir.to_str().unwrap(), &rid]);
    lines.wait_count(100, Duration::from_secs(30));
    let rimg = rb.dir.join("img");
    r.ok(&["checkpoint", "--image-path", rimg.to_str().unwrap(), &rid]);
    let files_before = count_files(&rb.rootfs());
    let rid2 = unique("runc-killed");
    let mut child = spawn(&r, &restore_args(&rb, &rimg, &rid2));
    let end = Instant::now() + Duration::from_secs(30);
    let mut seen = false;
    while child.try_wait().unwrap().is_none() && Instant::now() < end {
        if criu_child(child.id()).is_some_and(|c| has_open(c, "restore.log")) {
            seen = true;
            break;
        }
        std::thread::sleep(Duration::from_micros(300));
    }
    let _ = child.kill();
    let _ = child.wait();
    let _ = r.run(&["delete", "--force", &rid2]);
    let files_after = count_files(&rb.rootfs());
    let runc = if !seen {
        "(CRIU not seen: case not reached)".to_string()
    } else if files_after < files_before {
        format!(
            "delete -f removed {} of the bundle rootfs's {files_before} files",
            files_before - files_after
        )
    } else {
        "rootfs intact".to_string()
    };
    record(
        "SIGKILL restore inside CRIU, then delete -f",
        "undone by the guardian; rootfs identical; nothing left; the id restores again",
        &runc,
    );
    let _ = std::fs::remove_dir_all(&keep);
}

/// A restore killed while it applies the changeset to the target rootfs (the moment: cryo
/// opens a data file in the apply's undo directory, held there by an open trap): the guardian
/// rolls the apply back from its journal; the target is as it was and the image restores.
#[test]
fn a_restore_killed_inside_the_rootfs_apply_leaves_the_rootfs_as_it_was() {
    let rt = Runtime::cryo();
    let lower = Lower::new();
    let keep = tempfile_dir("kill-apply");
    let img = good_image(&rt, &lower, &keep);
    let b = lower.bundle();
    let before = tree_digest(&b.rootfs());
    let id = unique("killed-apply");
    let mut child = spawn(&rt, &restore_args(&b, &img, &id));
    let victim = child.id() as i32;
    let trap = OpenTrap::on_mount(
        &b.rootfs(),
        |p: &Path| {
            let in_undo = p
                .parent()
                .and_then(|d| d.file_name())
                .is_some_and(|n| n == ".cryo-rootfs-undo");
            in_undo && p.file_name().is_some_and(|n| n != "journal")
        },
        move |_| signal(victim, Signal::SIGKILL),
    );
    let _ = child.wait();
    let fired = trap.finish();
    assert!(
        fired.is_some(),
        "the restore never wrote into the apply's undo directory: case not reached"
    );
    assert_nothing_left(&rt, &id, &b.rootfs(), &before);
    assert!(
        !b.rootfs().join(".cryo-rootfs-undo").exists(),
        "undo data left in the target"
    );
    rt.ok(&["delete", "--force", &id]);
    assert_eq!(
        tree_digest(&b.rootfs()),
        before,
        "delete --force touched the rootfs"
    );
    // The id is free and the image restores, with the checkpointed file changes.
    let _g = rt.guard(&id);
    let hb = Heartbeat {
        rt: rt.clone(),
        lines: rt.spawn_with_pipe(&restore_args(&b, &img, &id)),
        bundle: b,
        id: id.clone(),
    };
    assert!(hb.advancing(Duration::from_secs(10)));
    assert_eq!(
        std::fs::read_to_string(hb.bundle.rootfs().join("root/newfile")).unwrap(),
        "new\n"
    );
    assert!(!hb.bundle.rootfs().join("bin/vi").exists());
    assert!(!hb.bundle.rootfs().join(".cryo-rootfs-undo").exists());
    drop(hb);
    record(
        "SIGKILL restore inside the rootfs apply",
        "rolled back by the guardian from the apply's journal; rootfs identical; the id restores again",
        "no such step: runc does not restore the container's files",
    );
    let _ = std::fs::remove_dir_all(&keep);
}

fn count_files(root: &Path) -> usize {
    let mut n = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            n += 1;
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(e.path());
            }
        }
    }
    n
}

/// A restore whose CRIU hangs: --criu-timeout ends it, and SIGTERM ends it sooner; both undo.
#[test]
fn a_hung_restore_times_out_or_is_interrupted_and_undone() {
    let rt = Runtime::cryo();
    let lower = Lower::new();
    let keep = tempfile_dir("hang-rst");
    let img = good_image(&rt, &lower, &keep);
    for how in ["timeout", "sigterm"] {
        let b = lower.bundle();
        let before = tree_digest(&b.rootfs());
        let id = unique("hung");
        let mut args = restore_args(&b, &img, &id);
        if how == "timeout" {
            args.insert(2, "--criu-timeout");
            args.insert(3, "3");
        }
        let mut child = spawn(&rt, &args);
        let criu = wait_for_restoring_criu(&rt, &id, &mut child);
        signal(criu, Signal::SIGSTOP);
        if how == "sigterm" {
            std::thread::sleep(Duration::from_millis(300));
            signal(child.id() as i32, Signal::SIGTERM);
        }
        let (status, err) = finish(child);
        assert!(!status.success());
        let says = if how == "timeout" {
            "--criu-timeout 3s"
        } else {
            "interrupted"
        };
        assert!(err.contains(says), "{how}: {err}");
        assert_nothing_left(&rt, &id, &b.rootfs(), &before);
    }
    record(
        "restore: CRIU hangs (then --criu-timeout, or SIGTERM)",
        "CRIU stopped, restore undone, rootfs identical, nothing left",
        "-",
    );
    let _ = std::fs::remove_dir_all(&keep);
}
