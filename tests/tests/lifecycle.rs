//! The runc lifecycle through the `cryo` binary, as docker/podman/containerd drive it.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use cryo_tests::runtime::freezer_state;
use cryo_tests::{unique, Bundle, Runtime};

const COUNTER: &[&str] = &[
    "sh",
    "-c",
    "i=0; while true; do i=$((i+1)); echo $i > /tmp/count; echo $i; sleep 0.1; done",
];

#[test]
fn create_start_exec_ps_pause_resume_kill_delete() {
    let rt = Runtime::cryo();
    let b = Bundle::busybox(COUNTER);
    let id = unique("life");
    let _g = rt.guard(&id);
    let lines = rt.spawn_with_pipe(&["create", "--bundle", b.dir.to_str().unwrap(), &id]);
    let st = rt.state(&id);
    assert_eq!(st["status"], "created");
    let pid = st["pid"].as_i64().unwrap();
    assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
    let cg = cryo_tests::cgroups::cgroup_path_of(pid);
    rt.ok(&["start", &id]);
    assert_eq!(rt.state(&id)["status"], "running");
    assert_eq!(rt.state(&id)["pid"].as_i64().unwrap(), pid);
    lines.wait_count(2, Duration::from_secs(10));
    let out = rt.ok(&["exec", &id, "sh", "-c", "echo hello-$((6*7))"]);
    assert_eq!(out.trim(), "hello-42");
    let ps: Vec<i64> = serde_json::from_str(&rt.ok(&["ps", "--format", "json", &id])).unwrap();
    assert!(ps.contains(&pid), "{ps:?} lacks {pid}");
    rt.ok(&["pause", &id]);
    assert_eq!(rt.state(&id)["status"], "paused");
    assert_eq!(freezer_state(pid), "FROZEN");
    rt.ok(&["resume", &id]);
    assert_eq!(freezer_state(pid), "THAWED");
    assert_eq!(rt.state(&id)["status"], "running");
    let list = rt.ok(&["list", "--format", "json"]);
    assert!(list.contains(&id));
    assert!(rt.ok(&["list"]).contains(&id));
    rt.ok(&["kill", &id, "KILL"]);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(rt.state(&id)["status"], "stopped");
    rt.ok(&["delete", &id]);
    assert!(rt.fails(&["state", &id]).contains("does not exist"));
    assert!(!rt.root.join(&id).exists(), "state dir left behind");
    cryo_tests::cgroups::assert_no_cgroup(&cg);
}

#[test]
fn run_attached_returns_exit_code_and_detached_runs() {
    let rt = Runtime::cryo();
    let b = Bundle::busybox(&["sh", "-c", "exit 3"]);
    let id = unique("run");
    let _g = rt.guard(&id);
    let out = rt.run(&["run", "--bundle", b.dir.to_str().unwrap(), &id]);
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let b2 = Bundle::busybox(&["sleep", "30"]);
    let id2 = unique("rund");
    let _g2 = rt.guard(&id2);
    let _out = rt.spawn_with_pipe(&["run", "-d", "--bundle", b2.dir.to_str().unwrap(), &id2]);
    assert_eq!(rt.state(&id2)["status"], "running");
    rt.ok(&["kill", &id2, "9"]);
    rt.ok(&["delete", "--force", &id2]);
}

#[test]
fn bad_inputs_give_clear_errors() {
    let rt = Runtime::cryo();
    assert!(rt
        .fails(&["state", "nope"])
        .contains("container nope does not exist"));
    assert!(rt.fails(&["delete", "nope"]).contains("does not exist"));
    // As runc: forcing the delete of a container that is gone succeeds.
    rt.ok(&["delete", "--force", "nope"]);
    // An id is one path component: `../x` must never name a directory outside the root.
    assert!(rt
        .fails(&["delete", "--force", "../x"])
        .contains("invalid container id"));
    assert!(rt.fails(&["state", "a/b"]).contains("invalid container id"));
    assert!(rt
        .fails(&["create", "--bundle", "/nonexistent", "x"])
        .contains("does not exist"));
    let b = Bundle::busybox(&["sleep", "30"]);
    std::fs::write(b.dir.join("config.json"), "{ nope").unwrap();
    assert!(rt
        .fails(&["create", "--bundle", b.dir.to_str().unwrap(), "x"])
        .contains("not a valid OCI runtime spec"));
    let b = Bundle::busybox(&["sleep", "30"]);
    let id = unique("dup");
    let _g = rt.guard(&id);
    rt.spawn_with_pipe(&["create", "--bundle", b.dir.to_str().unwrap(), &id]);
    assert!(rt
        .fails(&["create", "--bundle", b.dir.to_str().unwrap(), &id])
        .contains("already exists"));
    rt.ok(&["start", &id]);
    let e = rt.fails(&["start", &id]);
    assert!(
        e.contains("cannot start container") && e.contains("running"),
        "{e}"
    );
    let e = rt.fails(&["delete", &id]);
    assert!(e.contains("--force"), "{e}");
    let e = rt.fails(&["kill", &id, "NOTASIGNAL"]);
    assert!(e.contains("invalid signal"), "{e}");
}

#[test]
fn client_quirks_are_accepted() {
    let rt = Runtime::cryo();
    assert!(rt.run(&["checkpoint", "--help"]).status.success());
    let out = rt.run(&["restore", "--lsm-mount-context"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("flag needs an argument"));
    let log = std::env::temp_dir().join(unique("log.json"));
    let out = rt
        .cmd()
        .args([
            "--log",
            log.to_str().unwrap(),
            "--log-format",
            "json",
            "state",
            "ghost",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let line = std::fs::read_to_string(&log).unwrap();
    let v: serde_json::Value = serde_json::from_str(line.lines().last().unwrap()).unwrap();
    assert_eq!(v["level"], "error");
    assert!(v["msg"].as_str().unwrap().contains("ghost does not exist"));
    let _ = std::fs::remove_file(&log);
    // go-runc's single-dash long flag and podman's repeated bool flag parse.
    let out = rt.run(&["checkpoint", "--leave-running", "--leave-running", "ghost"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("ghost does not exist"));
    let out = rt.run(&[
        "restore",
        "-no-subreaper",
        "--detach",
        "--bundle",
        "/nonexistent",
        "ghost",
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not exist"));
    let f: serde_json::Value = serde_json::from_str(&rt.ok(&["features"])).unwrap();
    assert_eq!(
        f["annotations"]["org.opencontainers.runc.checkpoint.enabled"],
        "true"
    );
    let v = rt.ok(&["--version"]);
    assert!(v.starts_with("cryo version"));
}

#[test]
fn events_stats_and_update_resources() {
    let rt = Runtime::cryo();
    let b = Bundle::busybox(&["sleep", "60"]);
    let id = unique("upd");
    let _g = rt.guard(&id);
    let _out = rt.spawn_with_pipe(&["run", "-d", "--bundle", b.dir.to_str().unwrap(), &id]);
    let res = b.dir.join("res.json");
    std::fs::write(
        &res,
        r#"{"memory": {"limit": 104857600}, "pids": {"limit": 77}}"#,
    )
    .unwrap();
    let pid = rt.state(&id)["pid"].as_i64().unwrap();
    use cryo_tests::cgroups::{has_controller, layout, Layout};
    if !(has_controller("memory") && has_controller("pids")) {
        // A host whose cgroups offer no such controllers (scripts/pure-v2 emulates a v2 host
        // on a hybrid one, whose v1 hierarchies keep them): refused, the container runs on.
        let e = rt.fails(&["update", "--resources", res.to_str().unwrap(), &id]);
        assert!(e.contains("memory.max") || e.contains("pids.max"), "{e}");
        assert_eq!(rt.state(&id)["status"], "running");
        return;
    }
    rt.ok(&["update", "--resources", res.to_str().unwrap(), &id]);
    let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let pids_max = match layout() {
        Layout::Hybrid => {
            let path = cg
                .lines()
                .find_map(|l| l.split_once(":pids:").map(|(_, p)| p.to_string()))
                .unwrap();
            format!("/sys/fs/cgroup/pids{path}/pids.max")
        }
        Layout::Unified => {
            let path = cg.lines().find_map(|l| l.strip_prefix("0::")).unwrap();
            format!("/sys/fs/cgroup{path}/pids.max")
        }
    };
    let max = std::fs::read_to_string(&pids_max).unwrap();
    assert_eq!(max.trim(), "77");
    rt.ok(&["update", "--pids-limit", "88", &id]);
    let max = std::fs::read_to_string(&pids_max).unwrap();
    assert_eq!(max.trim(), "88");
    let ev = rt.ok(&["events", "--stats", &id]);
    assert!(ev.contains("pids") || ev.contains("memory"), "{ev}");
    let e = rt.fails(&["update", "--resources", "/nonexistent.json", &id]);
    assert!(e.contains("cannot read"), "{e}");
}

/// Receive the pty master a runtime sends to `--console-socket` (SCM_RIGHTS).
fn receive_pty(listener: std::os::unix::net::UnixListener) -> std::fs::File {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    use std::os::fd::{AsRawFd, FromRawFd};
    let (conn, _) = listener.accept().unwrap();
    let mut buf = [0u8; 256];
    let mut iov = [std::io::IoSliceMut::new(&mut buf)];
    let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    let msg = recvmsg::<()>(
        conn.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::empty(),
    )
    .unwrap();
    for c in msg.cmsgs().unwrap() {
        if let ControlMessageOwned::ScmRights(fds) = c {
            // SAFETY: SCM_RIGHTS just installed this fd for us.
            return unsafe { std::fs::File::from_raw_fd(fds[0]) };
        }
    }
    panic!("no fd received on the console socket");
}

#[test]
fn terminal_via_console_socket_and_exec_process_file() {
    let rt = Runtime::cryo();
    let b = Bundle::busybox(&["sh", "-c", "echo hello-tty; tty; sleep 30"]);
    b.write_config(&["sh", "-c", "echo hello-tty; tty; sleep 30"], |v| {
        v["process"]["terminal"] = true.into()
    });
    let id = unique("tty");
    let _g = rt.guard(&id);
    let sock = b.dir.join("console.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let receiver = std::thread::spawn(move || receive_pty(listener));
    rt.ok(&[
        "create",
        "--bundle",
        b.dir.to_str().unwrap(),
        "--console-socket",
        sock.to_str().unwrap(),
        &id,
    ]);
    let mut pty = receiver.join().unwrap();
    rt.ok(&["start", &id]);
    let mut seen = String::new();
    let end = std::time::Instant::now() + Duration::from_secs(10);
    let mut buf = [0u8; 512];
    while std::time::Instant::now() < end
        && !(seen.contains("hello-tty") && seen.contains("/dev/pts/"))
    {
        let n = std::io::Read::read(&mut pty, &mut buf).unwrap();
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert!(
        seen.contains("hello-tty") && seen.contains("/dev/pts/"),
        "terminal output: {seen:?}"
    );
    let process = b.dir.join("process.json");
    std::fs::write(&process, r#"{"terminal": false, "cwd": "/", "user": {"uid": 0, "gid": 0}, "args": ["sh", "-c", "echo from-process-file"], "env": ["PATH=/bin"]}"#).unwrap();
    let out = rt.ok(&["exec", "--process", process.to_str().unwrap(), &id]);
    assert_eq!(out.trim(), "from-process-file");
}
