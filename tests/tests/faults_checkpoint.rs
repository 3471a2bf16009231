//! The reliability suite, checkpoint side: a fault at the moment that matters (found by
//! watching the workload stop and start, or by trapping the open of a file) costs nothing.
//! The container runs on with its memory intact (or stays paused), the image path holds a
//! complete image or none, nothing is left behind. Each case also runs on runc where runc
//! has one, and both outcomes go to the reliability table.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::{Duration, Instant};

use cryo_tests::faults::{
    criu_child, diagnose, finish, processes_mentioning, record, signal, spawn, staging_left,
    time_to_thaw, wait_for_criu_before_freeze, wait_for_freeze, wait_for_thaw, Heartbeat, Tmpfs,
};
use cryo_tests::{unique, Runtime};
use nix::sys::signal::Signal;

/// Memory of the workload: big enough that the freeze lasts long enough to be seen.
const MIB: u32 = 256;
/// How long the workload (beating every millisecond) must not beat to count as frozen.
const QUIET: Duration = Duration::from_millis(8);
const WITHIN: Duration = Duration::from_secs(60);

/// After a fault: running (thawed), memory intact, no image at `img` unless `image_ok` says
/// one may be there (then it must verify), nothing of cryo's beside it, no CRIU or guardian.
/// Returns a short description for the table.
fn assert_survived(hb: &Heartbeat, img: &Path, image_may_exist: bool, thawed: Duration) -> String {
    assert!(
        hb.advancing(Duration::from_secs(10)),
        "the container is still frozen 10 s after the fault: {}",
        diagnose(hb)
    );
    assert_eq!(hb.rt.state(&hb.id)["status"], "running");
    hb.assert_memory_intact(Duration::from_secs(30));
    let image = if img.exists() {
        assert!(
            image_may_exist,
            "a failed checkpoint left an image at {}",
            img.display()
        );
        let out = hb
            .rt
            .run(&["verify", "--image-path", img.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "the image left is not complete and intact: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        "complete image"
    } else {
        "no image"
    };
    let left = staging_left(img);
    assert!(left.is_empty(), "left beside the image: {left:?}");
    let root = hb.rt.root.to_string_lossy().into_owned();
    // The guardian ends once it has undone; give it the moment it needs.
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let procs = processes_mentioning(&root);
        let stray: Vec<_> = procs
            .iter()
            .filter(|p| p.contains("__guardian") || p.contains(" swrk "))
            .collect();
        if stray.is_empty() {
            break;
        }
        assert!(Instant::now() < end, "left running: {stray:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    format!(
        "running again {:.2} s after the fault, memory intact, {image}, nothing left",
        thawed.as_secs_f64()
    )
}

/// What runc did with the same fault: the container's state, whether it is frozen, whether
/// an image is there. Cleans up after runc.
fn runc_outcome(hb: &Heartbeat, img: &Path) -> String {
    let frozen_for_good = !hb.advancing(Duration::from_secs(5));
    let state = hb.rt.run(&["state", &hb.id]);
    let status = serde_json::from_slice::<serde_json::Value>(&state.stdout)
        .ok()
        .and_then(|v| v["status"].as_str().map(str::to_string))
        .unwrap_or_else(|| "gone".into());
    let image = if img.join("inventory.img").exists() {
        "an image (unchecked: runc records no digests)"
    } else if img.exists() {
        "a partial image dir"
    } else {
        "no image"
    };
    let out = if status == "stopped" || status == "gone" {
        format!("container dead (state says {status}), {image}")
    } else if frozen_for_good {
        format!("FROZEN for good (state says {status}), {image}")
    } else {
        format!("running ({status}), {image}")
    };
    let _ = hb.rt.run(&["resume", &hb.id]);
    out
}

fn args<'a>(extra: &[&'a str], img: &'a Path, id: &'a str) -> Vec<&'a str> {
    let mut v = vec!["checkpoint"];
    v.extend_from_slice(extra);
    v.extend(["--image-path", img.to_str().unwrap(), id]);
    v
}

/// Run one checkpoint of `hb` with `extra` flags, strike with `fault` at the moment `when`
/// finds; returns the checkpoint's exit status and stderr. The moment can pass between seeing
/// it and striking (CRIU already gone): then the checkpoint is let finish and run again.
fn strike(
    hb: &Heartbeat,
    extra: &[&str],
    img: &Path,
    when: Moment,
    fault: Fault,
) -> (std::process::ExitStatus, String, Duration) {
    for _ in 0..5 {
        let mut child = spawn(&hb.rt, &args(extra, img, &hb.id));
        let mut held_criu = None;
        let seen = match when {
            Moment::InsideFreeze => wait_for_freeze(hb, &mut child, QUIET, WITHIN),
            Moment::BeforeFreeze => {
                held_criu = wait_for_criu_before_freeze(hb, &mut child, WITHIN);
                held_criu.is_some()
            }
            Moment::AfterThaw => wait_for_thaw(hb, &mut child, WITHIN),
        };
        assert!(seen, "the moment was never seen: {:?}", finish(child));
        if let Some(target) = pick(fault, &child) {
            signal(target, fault.signal());
            if let Some(c) = held_criu {
                signal(c, Signal::SIGCONT);
            }
            let thawed =
                time_to_thaw(hb, Duration::from_secs(10)).unwrap_or(Duration::from_secs(10));
            let (status, err) = finish(child);
            return (status, err, thawed);
        }
        let _ = finish(child);
        let _ = std::fs::remove_dir_all(img);
    }
    panic!("CRIU was never running at the moment of the fault in 5 tries");
}

#[derive(Clone, Copy)]
enum Moment {
    BeforeFreeze,
    InsideFreeze,
    AfterThaw,
}

#[derive(Clone, Copy)]
enum Fault {
    KillCheckpointer,
    KillCriu,
    CrashCriu,
}

impl Fault {
    fn signal(self) -> Signal {
        match self {
            Fault::CrashCriu => Signal::SIGSEGV,
            _ => Signal::SIGKILL,
        }
    }
}

fn pick(fault: Fault, child: &std::process::Child) -> Option<i32> {
    match fault {
        Fault::KillCheckpointer => Some(child.id() as i32),
        Fault::KillCriu | Fault::CrashCriu => criu_child(child.id()),
    }
}

/// One case on cryo and on runc.
fn case(name: &str, extra: &[&str], when: Moment, fault: Fault, runc_too: bool) {
    let rt = Runtime::cryo();
    let hb = Heartbeat::start(&rt, &unique("fault"), MIB);
    let _g = rt.guard(&hb.id);
    let img = hb.bundle.dir.join("img");
    let init = hb.rt.state(&hb.id)["pid"].as_i64().unwrap_or(0);
    let (status, err, thawed) = strike(&hb, extra, &img, when, fault);
    if err.contains("its init died") {
        // CRIU died with its code inside the workload (its parasite, or the syscall it plants
        // to inject it): the workload dies of that trap as it runs, under any runtime. Only a
        // CRIU killed inside the freeze can do this; the rest must still hold.
        assert!(
            matches!(fault, Fault::KillCriu | Fault::CrashCriu)
                && matches!(when, Moment::InsideFreeze),
            "the container died: {err}"
        );
        let cryo = assert_killed_by_criu_trap(&hb, &img, init);
        let runc = if runc_too {
            runc_case(extra, when, fault)
        } else {
            "-".to_string()
        };
        record(name, &cryo, &runc);
        return;
    }
    if !matches!(fault, Fault::KillCheckpointer) {
        assert!(
            !status.success(),
            "a checkpoint whose CRIU died succeeded: {err}"
        );
        let said = match when {
            Moment::BeforeFreeze => "not touched",
            _ => "thawed and keeps running",
        };
        assert!(err.contains(said), "{err}");
    }
    let cryo = assert_survived(&hb, &img, matches!(when, Moment::AfterThaw), thawed);
    let runc = if runc_too {
        runc_case(extra, when, fault)
    } else {
        "-".to_string()
    };
    record(name, &cryo, &runc);
}

fn runc_case(extra: &[&str], when: Moment, fault: Fault) -> String {
    let r = Runtime::runc();
    let hb = Heartbeat::start(&r, &unique("fault-runc"), MIB);
    let _g = r.guard(&hb.id);
    let img = hb.bundle.dir.join("img");
    let _ = strike(&hb, extra, &img, when, fault);
    runc_outcome(&hb, &img)
}

/// The workload (init `pid`) was thawed and died of the trap CRIU left in it (the kernel logs
/// "trap int3" for it); no image, no CRIU or guardian left, state says stopped.
fn assert_killed_by_criu_trap(hb: &Heartbeat, img: &Path, pid: i64) -> String {
    let dmesg = std::process::Command::new("dmesg")
        .output()
        .expect("run dmesg");
    let needle = format!("[{pid}] trap int3");
    assert!(
        String::from_utf8_lossy(&dmesg.stdout).contains(&needle),
        "cryo says the init died, but the kernel logged no trap of pid {pid}: {}",
        diagnose(hb)
    );
    assert_eq!(hb.rt.state(&hb.id)["status"], "stopped");
    assert!(!img.exists(), "a failed checkpoint left {}", img.display());
    let left = staging_left(img);
    assert!(left.is_empty(), "left beside the image: {left:?}");
    let root = hb.rt.root.to_string_lossy().into_owned();
    let end = Instant::now() + Duration::from_secs(10);
    while processes_mentioning(&root)
        .iter()
        .any(|p| p.contains("__guardian") || p.contains(" swrk "))
    {
        assert!(Instant::now() < end, "a guardian or CRIU was left running");
        std::thread::sleep(Duration::from_millis(50));
    }
    "thawed, but the init died of the trap CRIU left in it (SIGTRAP; reported as such), no image, nothing left".into()
}

#[test]
fn sigkill_of_cryo_inside_the_freeze_leave_running() {
    case(
        "SIGKILL cryo inside the freeze (--leave-running)",
        &["--leave-running"],
        Moment::InsideFreeze,
        Fault::KillCheckpointer,
        true,
    );
}

#[test]
fn sigkill_of_cryo_inside_the_freeze_stopping() {
    case(
        "SIGKILL cryo inside the freeze (stopping checkpoint)",
        &[],
        Moment::InsideFreeze,
        Fault::KillCheckpointer,
        true,
    );
}

#[test]
fn sigkill_of_cryo_before_the_freeze() {
    case(
        "SIGKILL cryo after CRIU started, before the freeze",
        &["--leave-running"],
        Moment::BeforeFreeze,
        Fault::KillCheckpointer,
        false,
    );
}

#[test]
fn sigkill_of_cryo_after_the_thaw() {
    case(
        "SIGKILL cryo after the thaw, while it finishes the image",
        &["--leave-running"],
        Moment::AfterThaw,
        Fault::KillCheckpointer,
        false,
    );
}

#[test]
fn sigkill_of_criu_inside_the_freeze() {
    case(
        "SIGKILL CRIU inside the freeze",
        &["--leave-running"],
        Moment::InsideFreeze,
        Fault::KillCriu,
        true,
    );
}

#[test]
fn sigkill_of_criu_before_the_freeze() {
    case(
        "SIGKILL CRIU before the freeze",
        &[],
        Moment::BeforeFreeze,
        Fault::KillCriu,
        false,
    );
}

#[test]
fn criu_crashing_inside_the_freeze() {
    case(
        "CRIU crashes (SIGSEGV) inside the freeze",
        &[],
        Moment::InsideFreeze,
        Fault::CrashCriu,
        false,
    );
}

/// Start a checkpoint of `hb` and stop (SIGSTOP) its CRIU inside the freeze, while the
/// container is held: a hung CRIU. The freeze can end between seeing it and the stop; then the
/// checkpoint is let finish and tried again. Returns the checkpoint and CRIU's pid.
fn hang_criu_inside_the_freeze(
    hb: &Heartbeat,
    extra: &[&str],
    img: &Path,
) -> (std::process::Child, i32) {
    for _ in 0..5 {
        let mut child = spawn(&hb.rt, &args(extra, img, &hb.id));
        assert!(
            wait_for_freeze(hb, &mut child, QUIET, WITHIN),
            "the freeze was never seen"
        );
        if let Some(criu) = criu_child(child.id()) {
            signal(criu, Signal::SIGSTOP);
            if !hb.advancing(Duration::from_millis(300)) {
                return (child, criu);
            }
            signal(criu, Signal::SIGCONT);
        }
        let _ = finish(child);
        let _ = std::fs::remove_dir_all(img);
    }
    panic!("CRIU could not be stopped inside the freeze in 5 tries");
}

/// A hung CRIU (stopped inside the freeze): SIGTERM to cryo ends the checkpoint and thaws.
#[test]
fn sigterm_while_criu_hangs() {
    let rt = Runtime::cryo();
    let hb = Heartbeat::start(&rt, &unique("hang"), MIB);
    let _g = rt.guard(&hb.id);
    let img = hb.bundle.dir.join("img");
    let (child, criu) =
        hang_criu_inside_the_freeze(&hb, &["--leave-running", "--no-page-staging"], &img);
    signal(child.id() as i32, Signal::SIGTERM);
    let thawed = time_to_thaw(&hb, Duration::from_secs(10)).unwrap_or(Duration::from_secs(10));
    let (status, err) = finish(child);
    assert!(!status.success());
    assert!(
        err.contains("interrupted") && err.contains("thawed and keeps running"),
        "{err}"
    );
    let cryo = assert_survived(&hb, &img, false, thawed);
    assert!(
        !Path::new(&format!("/proc/{criu}")).exists() || is_zombie(criu),
        "the hung CRIU was not stopped"
    );
    record(
        "CRIU hangs inside the freeze, then SIGTERM to cryo",
        &cryo,
        "-",
    );
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.split_whitespace().nth(2) == Some("Z"))
        .unwrap_or(true)
}

/// A hung CRIU and nobody to signal cryo: the freeze deadline ends it. runc waits forever.
#[test]
fn the_freeze_deadline_ends_a_hung_criu() {
    let rt = Runtime::cryo();
    let hb = Heartbeat::start(&rt, &unique("deadline"), MIB);
    let _g = rt.guard(&hb.id);
    let img = hb.bundle.dir.join("img");
    let started = Instant::now();
    let (child, _) = hang_criu_inside_the_freeze(
        &hb,
        &[
            "--leave-running",
            "--no-page-staging",
            "--freeze-timeout",
            "3",
        ],
        &img,
    );
    let (status, err) = finish(child);
    assert!(!status.success());
    assert!(err.contains("--freeze-timeout 3s"), "{err}");
    let cryo = assert_survived(&hb, &img, false, started.elapsed());

    let r = Runtime::runc();
    let hb = Heartbeat::start(&r, &unique("deadline-runc"), MIB);
    let _g = r.guard(&hb.id);
    let img = hb.bundle.dir.join("img");
    let (mut child, criu) = hang_criu_inside_the_freeze(&hb, &["--leave-running"], &img);
    let criu = Some(criu);
    std::thread::sleep(Duration::from_secs(10));
    let still = child.try_wait().unwrap().is_none();
    let frozen = !hb.advancing(Duration::from_millis(500));
    let runc = format!(
        "after 10 s: runc {}, container {}",
        if still { "still waiting" } else { "ended" },
        if frozen { "FROZEN" } else { "running" }
    );
    if let Some(c) = criu {
        signal(c, Signal::SIGKILL);
    }
    let _ = child.kill();
    let _ = child.wait();
    let _ = runc_outcome(&hb, &img);
    record(
        "CRIU hangs inside the freeze, nobody intervenes",
        &format!("stopped at --freeze-timeout: {cryo}"),
        &runc,
    );
}

/// A CRIU that never answers at all (a broken install): --criu-timeout bounds it.
#[test]
fn a_criu_that_never_answers_times_out() {
    let rt = Runtime::cryo();
    let hb = Heartbeat::start(&rt, &unique("mute"), 64);
    let _g = rt.guard(&hb.id);
    let fake = hb.bundle.dir.join("mute-criu");
    std::fs::write(&fake, "#!/bin/sh\nexec sleep 1000\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let img = hb.bundle.dir.join("img");
    let start = Instant::now();
    let out = rt
        .cmd()
        .arg("--criu")
        .arg(&fake)
        .args(args(&["--criu-timeout", "2"], &img, &hb.id))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("did not answer") && err.contains("--criu-timeout"),
        "{err}"
    );
    assert!(
        start.elapsed() < Duration::from_secs(30),
        "took {:?}",
        start.elapsed()
    );
    let cryo = assert_survived(&hb, &img, false, Duration::ZERO);
    assert!(
        hb.max_gap_ms() < 1000.0,
        "the container was frozen: gap {} ms",
        hb.max_gap_ms()
    );
    assert!(
        processes_mentioning(&fake.to_string_lossy()).is_empty(),
        "the mute CRIU was left running"
    );
    record(
        "a CRIU that never answers",
        &format!("refused after --criu-timeout, never frozen: {cryo}"),
        "-",
    );
}

/// Not enough room for the image: refused before the freeze, with the path and the bytes.
#[test]
fn a_full_disk_is_refused_before_the_freeze() {
    let disk = Tmpfs::new("32m");
    let rt = Runtime::cryo();
    let hb = Heartbeat::start(&rt, &unique("full"), MIB);
    let _g = rt.guard(&hb.id);
    let img = disk.dir.join("img");
    let err = rt.fails(&args(&["--leave-running"], &img, &hb.id));
    assert!(
        err.contains("not enough free space")
            && err.contains(&*img.to_string_lossy())
            && err.contains("MiB"),
        "{err}"
    );
    let cryo = assert_survived(&hb, &img, false, Duration::ZERO);
    assert!(
        hb.max_gap_ms() < 200.0,
        "the container was frozen: gap {} ms",
        hb.max_gap_ms()
    );
    assert_eq!(
        std::fs::read_dir(&disk.dir).unwrap().count(),
        0,
        "something was written"
    );

    let r = Runtime::runc();
    let hb = Heartbeat::start(&r, &unique("full-runc"), MIB);
    let _g = r.guard(&hb.id);
    let img = disk.dir.join("img-runc");
    let out = r.run(&args(&["--leave-running"], &img, &hb.id));
    let said = String::from_utf8_lossy(&out.stderr);
    let names_enospc = said.contains("No space left");
    let runc = format!(
        "{}, message {} the full disk; {}",
        if out.status.success() {
            "succeeded"
        } else {
            "failed inside the freeze"
        },
        if names_enospc {
            "names"
        } else {
            "does not name"
        },
        runc_outcome(&hb, &img)
    );
    record(
        "disk too small for the image",
        &format!("refused before freezing: {cryo}"),
        &runc,
    );
}

/// The disk fills up while CRIU writes (inside the freeze): the error names it.
#[test]
fn a_disk_filling_up_inside_the_dump() {
    let disk = Tmpfs::new("400m");
    let rt = Runtime::cryo();
    let hb = Heartbeat::start(&rt, &unique("fill"), MIB);
    let _g = rt.guard(&hb.id);
    let img = disk.dir.join("img");
    let mut child = spawn(
        &rt,
        &args(&["--leave-running", "--no-page-staging"], &img, &hb.id),
    );
    assert!(wait_for_freeze(&hb, &mut child, QUIET, WITHIN));
    // Hold CRIU while the rest of the disk is taken, so the dump cannot win the race for it.
    let criu = criu_child(child.id()).expect("no CRIU inside the freeze: case not reached");
    signal(criu, Signal::SIGSTOP);
    let (filler, f) = fill_up(&disk.dir);
    signal(criu, Signal::SIGCONT);
    let thawed = time_to_thaw(&hb, Duration::from_secs(10)).unwrap_or(Duration::from_secs(10));
    let (status, err) = finish(child);
    drop(f);
    std::fs::remove_file(&filler).unwrap();
    assert!(!status.success());
    assert!(
        err.contains("No space left on device"),
        "{err}\nCRIU's log ends:\n{}",
        log_tail(&err)
    );
    let cryo = assert_survived(&hb, &img, false, thawed);
    record("the disk fills up inside the dump", &cryo, "-");
}

/// The disk fills up after CRIU took the pages into cryo's memory, while cryo's writer sends
/// them to disk: the writer's error (naming the pages file) is the checkpoint's, the container
/// runs on and nothing is left. CRIU is held at the freeze while the disk is taken, leaving
/// room for its own small images but not for the pages.
#[test]
fn a_disk_filling_up_while_the_staged_pages_are_written_out() {
    let disk = Tmpfs::new("400m");
    let rt = Runtime::cryo();
    let hb = Heartbeat::start(&rt, &unique("fill-writer"), MIB);
    let _g = rt.guard(&hb.id);
    let img = disk.dir.join("img");
    let mut child = spawn(&rt, &args(&["--leave-running"], &img, &hb.id));
    assert!(wait_for_freeze(&hb, &mut child, QUIET, WITHIN));
    let criu = criu_child(child.id()).expect("no CRIU inside the freeze: case not reached");
    signal(criu, Signal::SIGSTOP);
    let (filler, f) = fill_up(&disk.dir);
    let full = f.metadata().unwrap().len();
    f.set_len(full - (4 << 20)).unwrap();
    signal(criu, Signal::SIGCONT);
    let thawed = time_to_thaw(&hb, Duration::from_secs(10)).unwrap_or(Duration::from_secs(10));
    let (status, err) = finish(child);
    drop(f);
    std::fs::remove_file(&filler).unwrap();
    assert!(!status.success(), "the checkpoint succeeded on a full disk");
    assert!(
        err.contains("No space left on device") && err.contains(".cryo-pages-"),
        "not the page writer's error: {err}"
    );
    let cryo = assert_survived(&hb, &img, false, thawed);
    record(
        "the disk fills up while the pages are written out",
        &cryo,
        "-",
    );
}

/// SIGKILL of cryo after the thaw while the staged pages are still being written out (a pages
/// file still has its temporary name): the guardian removes the half-written image, the
/// container runs on. runc has no such step (its CRIU writes inside the freeze).
#[test]
fn sigkill_of_cryo_while_the_staged_pages_are_written_out() {
    let rt = Runtime::cryo();
    let hb = Heartbeat::start(&rt, &unique("fault-writer"), MIB);
    let _g = rt.guard(&hb.id);
    let img = hb.bundle.dir.join("img");
    for _ in 0..5 {
        let mut child = spawn(&rt, &args(&["--leave-running"], &img, &hb.id));
        assert!(
            wait_for_thaw(&hb, &mut child, WITHIN),
            "no thaw: {:?}",
            finish(child)
        );
        if pages_being_written(&img) {
            signal(child.id() as i32, Signal::SIGKILL);
            let thawed =
                time_to_thaw(&hb, Duration::from_secs(10)).unwrap_or(Duration::from_secs(10));
            let _ = finish(child);
            let cryo = assert_survived(&hb, &img, false, thawed);
            record("SIGKILL cryo while the pages are written out", &cryo, "-");
            return;
        }
        let _ = finish(child);
        let _ = std::fs::remove_dir_all(&img);
    }
    panic!("the pages were never seen being written out after the thaw in 5 tries");
}

/// Take every free byte of the file system of `dir` with a file; returns its path and handle.
fn fill_up(dir: &Path) -> (std::path::PathBuf, std::fs::File) {
    let filler = dir.join("filler");
    let mut f = std::fs::File::create(&filler).unwrap();
    let chunk = vec![1u8; 1 << 20];
    while std::io::Write::write_all(&mut f, &chunk).is_ok() {}
    (filler, f)
}

/// Whether a checkpoint into `img` is still writing its pages: a pages file under its
/// temporary name in the staging directory beside `img`.
fn pages_being_written(img: &Path) -> bool {
    let entries = |d: &Path| {
        std::fs::read_dir(d)
            .into_iter()
            .flatten()
            .flatten()
            .collect::<Vec<_>>()
    };
    entries(img.parent().unwrap())
        .iter()
        .filter(|e| e.file_name().to_string_lossy().contains(".cryo-new-"))
        .any(|e| {
            entries(&e.path())
                .iter()
                .any(|f| f.file_name().to_string_lossy().starts_with(".cryo-pages-"))
        })
}

/// While a checkpoint holds the container, other verbs wait a bounded time and say who holds it.
#[test]
fn a_busy_container_names_its_holder() {
    let rt = Runtime::cryo();
    let hb = Heartbeat::start(&rt, &unique("busy"), MIB);
    let _g = rt.guard(&hb.id);
    let img = hb.bundle.dir.join("img");
    let (child, _) =
        hang_criu_inside_the_freeze(&hb, &["--leave-running", "--no-page-staging"], &img);
    let out = rt
        .cmd()
        .env("CRYO_LOCK_TIMEOUT", "1")
        .args(["pause", &hb.id])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    let pid = child.id().to_string();
    assert!(
        err.contains("is busy") && err.contains(&pid) && err.contains("checkpoint"),
        "{err}"
    );
    // `state` does not wait for the lock.
    let start = Instant::now();
    let _ = rt.state(&hb.id);
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "state waited for the lock"
    );
    signal(child.id() as i32, Signal::SIGTERM);
    let thawed = time_to_thaw(&hb, Duration::from_secs(10)).unwrap_or(Duration::from_secs(10));
    let _ = finish(child);
    let cryo = assert_survived(&hb, &img, false, thawed);
    record(
        "another verb while a checkpoint hangs",
        &format!("waits 1 s, names the holder (pid, command); {cryo}"),
        "-",
    );
}

/// A container frozen behind cryo's back reads "paused" and can be resumed (as runc).
#[test]
fn a_frozen_container_reads_paused_and_resumes() {
    for rt in [Runtime::cryo(), Runtime::runc()] {
        let hb = Heartbeat::start(&rt, &unique("frozen"), 16);
        let _g = rt.guard(&hb.id);
        let pid = rt.state(&hb.id)["pid"].as_i64().unwrap();
        let dir = cryo_tests::cgroups::freezer_dir(pid);
        if dir.join("freezer.state").exists() {
            std::fs::write(dir.join("freezer.state"), "FROZEN").unwrap();
        } else {
            std::fs::write(dir.join("cgroup.freeze"), "1").unwrap();
        }
        assert!(!hb.advancing(Duration::from_millis(300)));
        let status = rt.state(&hb.id)["status"].as_str().unwrap().to_string();
        rt.ok(&["resume", &hb.id]);
        assert!(hb.advancing(Duration::from_secs(5)));
        if rt.bin.ends_with("runc") {
            record(
                "container frozen outside the runtime",
                "-",
                &format!("state says {status}; resume works"),
            );
        } else {
            assert_eq!(status, "paused");
            record(
                "container frozen outside the runtime",
                &format!("state says {status}; resume works"),
                "-",
            );
        }
    }
}

/// The last lines of the log file an error names ("log file: PATH").
fn log_tail(err: &str) -> String {
    let Some(path) = err
        .lines()
        .find_map(|l| l.trim().strip_prefix("log file: "))
    else {
        return "(no log named)".into();
    };
    let text = std::fs::read_to_string(path.trim()).unwrap_or_else(|e| format!("{path}: {e}"));
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(25)..].join("\n")
}
