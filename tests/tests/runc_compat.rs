//! Where runc's own integration suite (scripts/runc-suite) found cryo behaving unlike runc: each
//! difference, fixed, with a test of its own here.
#![allow(clippy::unwrap_used)]

use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cryo_tests::cgroups::{self, Layout};
use cryo_tests::{unique, Bundle, Runtime};

const SLEEPER: &[&str] = &["sleep", "60"];

fn run_detached(rt: &Runtime, b: &Bundle, id: &str) {
    rt.spawn_with_pipe(&["run", "-d", "--bundle", b.dir.to_str().unwrap(), id]);
}

fn stdout_of(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn spec_writes_runcs_default_spec() {
    let rt = Runtime::cryo();
    let runc = Runtime::runc();
    let dir = std::env::temp_dir().join(unique("spec"));
    let (mine, theirs) = (dir.join("cryo"), dir.join("runc"));
    for d in [&mine, &theirs] {
        std::fs::create_dir_all(d).unwrap();
    }
    rt.ok(&["spec", "--bundle", mine.to_str().unwrap()]);
    runc.ok(&["spec", "--bundle", theirs.to_str().unwrap()]);
    let read = |d: &Path| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(d.join("config.json")).unwrap()).unwrap()
    };
    assert_eq!(read(&mine), read(&theirs));
    let e = rt.fails(&["spec", "--bundle", mine.to_str().unwrap()]);
    assert!(e.contains("exists"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The hierarchies of this host that have a directory for `path` (`controllers → dir`).
fn cgroup_dirs(path: &str) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if cgroups::layout() == Layout::Unified {
        let d = Path::new("/sys/fs/cgroup").join(path.trim_start_matches('/'));
        return if d.is_dir() { vec![d] } else { dirs };
    }
    for entry in std::fs::read_dir("/sys/fs/cgroup").unwrap().flatten() {
        let d = entry.path().join(path.trim_start_matches('/'));
        if d.is_dir() {
            dirs.push(d);
        }
    }
    dirs
}

#[test]
fn a_default_spec_container_lives_in_runcs_cgroup_in_every_hierarchy() {
    let rt = Runtime::cryo();
    let b = Bundle::busybox(SLEEPER);
    let config_before = std::fs::read(b.dir.join("config.json")).unwrap();
    let id = unique("cg");
    let _g = rt.guard(&id);
    run_detached(&rt, &b, &id);
    let pid = rt.state(&id)["pid"].as_i64().unwrap();
    let init = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let exec = rt.ok(&["exec", &id, "cat", "/proc/self/cgroup"]);
    let sub = match cgroups::layout() {
        Layout::Hybrid => {
            let expect_all_in = |cgroup: &str, who: &str| {
                for line in cgroup.lines() {
                    assert!(line.ends_with(&format!(":/{id}")), "{who}: {line}");
                }
                assert!(
                    cgroup.contains(":name=systemd:") && cgroup.contains("\n0::"),
                    "{cgroup}"
                );
            };
            expect_all_in(&init, "init");
            expect_all_in(&exec, "exec");
            assert!(cgroup_dirs(&id).len() >= 3, "{:?}", cgroup_dirs(&id));
            Path::new("/sys/fs/cgroup/memory").join(&id).join("sub")
        }
        Layout::Unified => {
            // One hierarchy; runc's default spec there has a cgroup namespace, so the
            // container sees its cgroup as the root. (The v1 lines an emulated v2 host still
            // lists are not the container's: a real v2 host has none.)
            assert!(
                init.lines().any(|l| l == format!("0::/{id}")),
                "init: {init}"
            );
            assert!(exec.lines().any(|l| l == "0::/"), "exec: {exec}");
            assert_eq!(cgroup_dirs(&id).len(), 1, "{:?}", cgroup_dirs(&id));
            Path::new("/sys/fs/cgroup").join(&id).join("sub")
        }
    };
    assert_eq!(
        std::fs::read(b.dir.join("config.json")).unwrap(),
        config_before,
        "the user's config.json is never written"
    );
    assert_eq!(rt.state(&id)["bundle"], b.dir.to_str().unwrap());
    // A sub-cgroup made inside the container's does not keep delete from removing it.
    std::fs::create_dir(&sub).unwrap();
    rt.ok(&["delete", "--force", &id]);
    assert!(cgroup_dirs(&id).is_empty(), "left: {:?}", cgroup_dirs(&id));
    assert!(!rt.root.join(format!(".bundle-{id}")).exists());
}

/// runc's default spec, `/sys/fs/cgroup` mounted and no cgroupsPath: a checkpoint taken by runc
/// restores under cryo (CRIU finds the container's cgroup mounts by runc's path) and back.
#[test]
fn default_spec_checkpoints_cross_between_runc_and_cryo_both_ways() {
    let cryo = Runtime::cryo();
    let runc = Runtime::runc();
    let counter = [
        "sh",
        "-c",
        "i=0; while true; do i=$((i+1)); echo $i; sleep 0.1; done",
    ];
    let b = Bundle::busybox(&counter);
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(b.dir.join("config.json")).unwrap()).unwrap();
    assert!(cfg["linux"].get("cgroupsPath").is_none());
    assert!(cfg["mounts"]
        .as_array()
        .unwrap()
        .iter()
        .any(|m| m["destination"] == "/sys/fs/cgroup"));
    for (from, to) in [(&runc, &cryo), (&cryo, &runc)] {
        let (id, id2) = (unique("xc-from"), unique("xc-to"));
        let (_g, _g2) = (from.guard(&id), to.guard(&id2));
        let lines = from.spawn_with_pipe(&["run", "-d", "--bundle", b.dir.to_str().unwrap(), &id]);
        lines.wait_count(3, Duration::from_secs(20));
        let img = b.dir.join(unique("img"));
        from.ok(&["checkpoint", "--image-path", img.to_str().unwrap(), &id]);
        let last = lines
            .drain(Duration::from_secs(2))
            .last()
            .and_then(|l| l.trim().parse::<u64>().ok());
        let restored = to.spawn_with_pipe(&[
            "restore",
            "-d",
            "--bundle",
            b.dir.to_str().unwrap(),
            "--image-path",
            img.to_str().unwrap(),
            &id2,
        ]);
        let first: u64 = restored
            .next(Duration::from_secs(10))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        if let Some(last) = last {
            assert_eq!(
                first,
                last + 1,
                "{} -> {}",
                from.bin.display(),
                to.bin.display()
            );
        }
        to.ok(&["delete", "--force", &id2]);
        assert!(
            cgroup_dirs(&id2).is_empty(),
            "left: {:?}",
            cgroup_dirs(&id2)
        );
    }
}

#[test]
fn processes_in_the_container_have_sigpipe_at_its_default() {
    let rt = Runtime::cryo();
    // `yes` ends by SIGPIPE once `head` is gone; with SIGPIPE ignored it would loop on EPIPE.
    let b = Bundle::busybox(&[
        "sh",
        "-c",
        "grep SigIgn /proc/self/status; yes | head -1; echo done",
    ]);
    let id = unique("pipe");
    let _g = rt.guard(&id);
    let out = rt.run(&["run", "--bundle", b.dir.to_str().unwrap(), &id]);
    let text = stdout_of(&out);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("y\ndone"), "{text}");
    let mask = text
        .lines()
        .find_map(|l| l.strip_prefix("SigIgn:"))
        .map(|m| u64::from_str_radix(m.trim(), 16).unwrap())
        .unwrap();
    assert_eq!(
        mask & (1 << (libc::SIGPIPE - 1)),
        0,
        "SIGPIPE ignored: {mask:x}"
    );
    let b = Bundle::busybox(SLEEPER);
    let id = unique("pipe-exec");
    let _g = rt.guard(&id);
    run_detached(&rt, &b, &id);
    let status = rt.ok(&["exec", &id, "grep", "SigIgn", "/proc/self/status"]);
    let mask = u64::from_str_radix(status.trim().trim_start_matches("SigIgn:").trim(), 16).unwrap();
    assert_eq!(mask & (1 << (libc::SIGPIPE - 1)), 0, "exec: {mask:x}");
}

#[test]
fn a_hostname_without_a_uts_namespace_is_refused() {
    let rt = Runtime::cryo();
    let b = Bundle::busybox(&["true"]);
    b.write_config(&["true"], |v| {
        v["linux"]["namespaces"]
            .as_array_mut()
            .unwrap()
            .retain(|n| n["type"] != "uts");
        v["hostname"] = "box".into();
    });
    let id = unique("uts");
    let e = rt.fails(&["run", "--bundle", b.dir.to_str().unwrap(), &id]);
    assert!(e.contains("no UTS namespace"), "{e}");
    assert!(!rt.root.join(&id).exists());
}

#[test]
fn exec_follows_runc_exit_codes_groups_fds_and_cgroups() {
    let rt = Runtime::cryo();
    let b = Bundle::busybox(SLEEPER);
    let id = unique("exec");
    let _g = rt.guard(&id);
    run_detached(&rt, &b, &id);
    let code = |args: &[&str]| rt.run(args).status.code();
    assert_eq!(code(&["exec", &id, "sh", "-c", "exit 42"]), Some(42));
    assert_eq!(code(&["exec", &id, "no-such-binary"]), Some(255));
    assert_eq!(
        code(&["exec", "--pid-file", "/nonexistent/dir/p", &id, "true"]),
        Some(255)
    );
    assert_eq!(code(&["exec", "no-such-container", "true"]), Some(255));
    let groups = rt.ok(&[
        "exec",
        "--user",
        "1000:1000",
        "--additional-gids",
        "100",
        "-g",
        "65534",
        &id,
        "id",
        "-G",
    ]);
    assert_eq!(groups.trim(), "1000 100 65534");
    let file = b.dir.join("preserved");
    std::fs::write(&file, "hello").unwrap();
    let f = std::fs::File::open(&file).unwrap();
    let out = rt
        .cmd()
        .args(["exec", "--preserve-fds=1", &id, "cat", "/proc/self/fd/3"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .pre_exec_fd3(f)
        .output()
        .unwrap();
    assert_eq!(
        stdout_of(&out),
        "hello",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // --cgroup: runc's checks, and a per-controller sub-cgroup.
    assert!(rt
        .fails(&["exec", "--cgroup", "..", &id, "true"])
        .contains(" .. is not a sub cgroup path"));
    let e = rt.fails(&["exec", "--cgroup", "nonexistent", &id, "true"]);
    assert!(
        e.contains("/nonexistent/cgroup.procs: no such file "),
        "{e}"
    );
    assert!(rt
        .fails(&["exec", "--cgroup", "whaaat:/", &id, "true"])
        .contains("unknown controller "));
    if cgroups::layout() == Layout::Hybrid {
        std::fs::create_dir(Path::new("/sys/fs/cgroup/memory").join(&id).join("sub")).unwrap();
        let cg = rt.ok(&[
            "exec",
            "--cgroup",
            "memory:sub",
            &id,
            "cat",
            "/proc/self/cgroup",
        ]);
        assert!(cg.contains(&format!(":memory:/{id}/sub\n")), "{cg}");
        assert!(cg.contains(&format!(":pids:/{id}\n")), "{cg}");
    } else {
        // One hierarchy: the sub-cgroup is the process's cgroup (seen from the container's
        // cgroup namespace, whose root is the container's cgroup).
        std::fs::create_dir(Path::new("/sys/fs/cgroup").join(&id).join("sub")).unwrap();
        let cg = rt.ok(&["exec", "--cgroup", "sub", &id, "cat", "/proc/self/cgroup"]);
        assert!(cg.lines().any(|l| l == "0::/sub"), "{cg}");
    }
    rt.ok(&["delete", "--force", &id]);
}

/// Give a child the file as its fd 3.
trait PreExecFd3 {
    fn pre_exec_fd3(&mut self, f: std::fs::File) -> &mut Self;
}

impl PreExecFd3 for Command {
    fn pre_exec_fd3(&mut self, f: std::fs::File) -> &mut Self {
        use std::os::fd::AsRawFd;
        use std::os::unix::process::CommandExt;
        let fd = f.as_raw_fd();
        // SAFETY: dup2 and fcntl are async-signal-safe; `f` stays open in the parent (it is
        // leaked below) until the child has exec'd.
        unsafe {
            self.pre_exec(move || {
                // dup2 onto itself keeps close-on-exec, hence the explicit clear.
                if (fd != 3 && libc::dup2(fd, 3) < 0) || libc::fcntl(3, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            })
        };
        std::mem::forget(f);
        self
    }
}

#[test]
fn library_errors_reach_the_log_without_debug() {
    let rt = Runtime::cryo();
    let b = Bundle::busybox(SLEEPER);
    let id = unique("log");
    let _g = rt.guard(&id);
    run_detached(&rt, &b, &id);
    let log = b.dir.join("cryo.log");
    let out = rt.run(&[
        "--log",
        log.to_str().unwrap(),
        "exec",
        &id,
        "no-such-binary",
    ]);
    assert_eq!(out.status.code(), Some(255));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.lines()
            .any(|l| l.contains("level=error") && l.contains("libcontainer")),
        "{text}"
    );
    assert!(!text.contains("level=debug"), "{text}");
    let out = rt.run(&[
        "--debug",
        "--log",
        log.to_str().unwrap(),
        "exec",
        &id,
        "true",
    ]);
    assert!(out.status.success());
    assert!(!String::from_utf8_lossy(&out.stderr).contains("level=debug"));
    assert!(std::fs::read_to_string(&log)
        .unwrap()
        .contains("level=debug"));
}

/// A pty pair: cryo gets the replica as its stdin, the test holds the main side.
fn pty() -> (OwnedFd, OwnedFd) {
    let p = nix::pty::openpty(None, None).unwrap();
    (p.master, p.slave)
}

#[test]
fn a_foreground_terminal_gets_a_pty_relayed_through_cryo() {
    let rt = Runtime::cryo();
    let script = "for f in /proc/self/fd/0 /proc/self/fd/1 /proc/self/fd/2; do readlink $f; done; \
                  stat -c %u:%g $(tty); stty size";
    let b = Bundle::busybox(&["sh", "-c", script]);
    b.write_config(&["sh", "-c", script], |v| {
        v["process"]["terminal"] = true.into();
        v["process"]["consoleSize"] = serde_json::json!({"height": 10, "width": 110});
    });
    let (_main, replica) = pty();
    let id = unique("fg");
    let _g = rt.guard(&id);
    let out = rt
        .cmd()
        .args(["run", "--bundle", b.dir.to_str().unwrap(), &id])
        .stdin(Stdio::from(replica.as_fd().try_clone_to_owned().unwrap()))
        .output()
        .unwrap();
    let text = stdout_of(&out);
    assert!(
        out.status.success(),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = text.lines().map(|l| l.trim_end_matches('\r')).collect();
    assert!(
        lines[..3].iter().all(|l| l.starts_with("/dev/pts/")),
        "{lines:?}"
    );
    assert_eq!(lines[3], "0:5", "pty owner");
    assert_eq!(lines[4], "10 110", "pty size");
    assert!(rt.fails(&["state", &id]).contains("does not exist"));

    // The terminal of a process running as another user is that user's (exec and init).
    let b = Bundle::busybox(SLEEPER);
    b.write_config(SLEEPER, |v| {
        v["process"]["user"] = serde_json::json!({"uid": 1000, "gid": 100});
    });
    let id = unique("fg-user");
    let _g = rt.guard(&id);
    run_detached(&rt, &b, &id);
    let (_main, replica) = pty();
    let out = rt
        .cmd()
        .args(["exec", "-t", &id, "sh", "-c", "stat -c %u:%g $(tty)"])
        .stdin(Stdio::from(replica))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout_of(&out).trim(), "1000:5");
}

#[test]
fn run_keep_ps_list_events_and_kill_all_behave_as_runc() {
    let rt = Runtime::cryo();
    let b = Bundle::busybox(&["true"]);
    let id = unique("keep");
    let _g = rt.guard(&id);
    rt.ok(&["run", "--keep", "--bundle", b.dir.to_str().unwrap(), &id]);
    assert_eq!(rt.state(&id)["status"], "stopped");
    assert_eq!(rt.state(&id)["pid"], 0);
    rt.ok(&["kill", "--all", &id, "0"]);
    rt.ok(&["delete", &id]);

    // exec in a created container: it runs, and the container stays created.
    let b = Bundle::busybox(SLEEPER);
    let id = unique("created");
    let _g = rt.guard(&id);
    rt.spawn_with_pipe(&["create", "--bundle", b.dir.to_str().unwrap(), &id]);
    assert_eq!(
        rt.ok(&["exec", &id, "echo", "in-created"]).trim(),
        "in-created"
    );
    assert_eq!(rt.state(&id)["status"], "created");
    rt.ok(&["start", &id]);
    assert_eq!(rt.state(&id)["status"], "running");
    rt.ok(&["delete", "--force", &id]);

    let b = Bundle::busybox(SLEEPER);
    let id = unique("info");
    let _g = rt.guard(&id);
    run_detached(&rt, &b, &id);
    let pid = rt.state(&id)["pid"].as_i64().unwrap();
    let ps = rt.ok(&["ps", &id]);
    assert!(
        ps.starts_with("UID") && ps.contains("PID") && ps.contains("CMD"),
        "{ps}"
    );
    assert!(
        ps.lines().nth(1).unwrap().split_whitespace().nth(1) == Some(&pid.to_string()),
        "{ps}"
    );
    let ps = rt.ok(&["ps", &id, "-e", "-x"]);
    assert!(ps.lines().next().unwrap().contains("COMMAND"), "{ps}");
    let list = rt.ok(&["list", "--format", "json"]);
    let keys: Vec<&str> = list
        .split('"')
        .collect::<Vec<_>>()
        .chunks(2)
        .filter_map(|c| c.get(1).copied())
        .filter(|k| {
            [
                "ociVersion",
                "id",
                "pid",
                "status",
                "bundle",
                "rootfs",
                "created",
                "owner",
            ]
            .contains(k)
        })
        .collect();
    assert_eq!(
        keys,
        [
            "ociVersion",
            "id",
            "pid",
            "status",
            "bundle",
            "rootfs",
            "created",
            "owner"
        ]
    );
    // events --interval ends when the container is deleted.
    let mut events = rt
        .cmd()
        .args(["events", "--interval", "100ms", &id])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Read in a thread: a cryo that prints nothing must fail the test, not hang it.
    let mut out = events.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut first = [0u8; 40];
        let _ = tx.send(out.read_exact(&mut first).map(|()| first));
    });
    let Ok(Ok(first)) = rx.recv_timeout(Duration::from_secs(20)) else {
        let _ = events.kill();
        let mut err = String::new();
        let _ = events.stderr.take().unwrap().read_to_string(&mut err);
        panic!("events printed no stats line within 20 s; stderr: {err}");
    };
    assert!(
        String::from_utf8_lossy(&first).starts_with(&format!(r#"{{"type":"stats","id":"{id}""#)),
        "{}",
        String::from_utf8_lossy(&first)
    );
    rt.ok(&["delete", "--force", &id]);
    let end = Instant::now() + Duration::from_secs(5);
    while events.try_wait().unwrap().is_none() {
        assert!(Instant::now() < end, "events kept running after the delete");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn every_verb_answers_h() {
    let rt = Runtime::cryo();
    for verb in [
        "checkpoint",
        "create",
        "delete",
        "events",
        "exec",
        "features",
        "kill",
        "list",
        "pause",
        "ps",
        "restore",
        "resume",
        "run",
        "spec",
        "start",
        "state",
        "update",
    ] {
        let out = rt.run(&[verb, "-h"]);
        assert!(out.status.success(), "{verb} -h: {:?}", out.status);
        assert!(stdout_of(&out).contains(&format!("cryo {verb}")), "{verb}");
    }
    assert!(rt.run(&["-h"]).status.success());
}
