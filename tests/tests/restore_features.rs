//! Restore details runc users rely on: a terminal container gets its pty back through
//! --console-socket, --pid-file is written, prestart/createRuntime hooks run, and a restore
//! without --detach waits and exits with the container's status.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use cryo_tests::{unique, Bundle, Runtime};

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

/// Read from a pty until a number greater than `after` shows up; returns it.
fn read_count_after(pty: &mut std::fs::File, after: u64) -> u64 {
    let end = Instant::now() + Duration::from_secs(15);
    let mut text = String::new();
    let mut buf = [0u8; 512];
    while Instant::now() < end {
        let n = std::io::Read::read(pty, &mut buf).unwrap();
        text.push_str(&String::from_utf8_lossy(&buf[..n]));
        if let Some(v) = text
            .split_whitespace()
            .filter_map(|w| w.parse::<u64>().ok())
            .find(|v| *v > after)
        {
            return v;
        }
    }
    panic!("no count > {after} on the pty: {text:?}");
}

#[test]
fn terminal_container_is_restored_with_a_new_pty() {
    let rt = Runtime::cryo();
    let script = "i=0; while true; do i=$((i+1)); echo $i; sleep 0.1; done";
    let b = Bundle::busybox(&["sh", "-c", script]);
    b.write_config(&["sh", "-c", script], |v| {
        v["process"]["terminal"] = true.into()
    });
    let (id, id2) = (unique("tty"), unique("tty-r"));
    let (_g, _g2) = (rt.guard(&id), rt.guard(&id2));
    let sock = b.dir.join("c1.sock");
    let l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let rx = std::thread::spawn(move || receive_pty(l));
    rt.ok(&[
        "run",
        "-d",
        "--console-socket",
        sock.to_str().unwrap(),
        "--bundle",
        b.dir.to_str().unwrap(),
        &id,
    ]);
    let mut pty = rx.join().unwrap();
    read_count_after(&mut pty, 3);
    let img = b.dir.join("img");
    rt.ok(&["checkpoint", "--image-path", img.to_str().unwrap(), &id]);
    let at = std::fs::read_to_string(img.join("cryo-manifest.json")).is_ok();
    assert!(at);
    let sock2 = b.dir.join("c2.sock");
    let l2 = std::os::unix::net::UnixListener::bind(&sock2).unwrap();
    let rx2 = std::thread::spawn(move || receive_pty(l2));
    rt.ok(&[
        "restore",
        "-d",
        "--console-socket",
        sock2.to_str().unwrap(),
        "--bundle",
        b.dir.to_str().unwrap(),
        "--image-path",
        img.to_str().unwrap(),
        &id2,
    ]);
    let mut pty2 = rx2.join().unwrap();
    let n = read_count_after(&mut pty2, 3);
    assert!(n > 3);
    assert_eq!(rt.state(&id2)["status"], "running");
}

#[test]
fn pid_file_hooks_and_attached_exit_status() {
    let rt = Runtime::cryo();
    // Counts to 30 then exits 7: restored without --detach, cryo must exit 7.
    let script = "i=0; while [ $i -lt 30 ]; do i=$((i+1)); echo $i; sleep 0.1; done; exit 7";
    let b = Bundle::busybox(&["sh", "-c", script]);
    let marker = b.dir.join("hooks.log");
    let hook = |name: &str| serde_json::json!({"path": "/bin/sh", "args": ["sh", "-c", format!("echo {name} >> {}", marker.display())]});
    let (pre, cr) = (hook("prestart"), hook("createRuntime"));
    b.write_config(&["sh", "-c", script], move |v| {
        v["hooks"] = serde_json::json!({"prestart": [pre], "createRuntime": [cr]});
    });
    let (id, id2) = (unique("hooks"), unique("hooks-r"));
    let (_g, _g2) = (rt.guard(&id), rt.guard(&id2));
    let lines = rt.spawn_with_pipe(&["run", "-d", "--bundle", b.dir.to_str().unwrap(), &id]);
    lines.wait_count(3, Duration::from_secs(20));
    let img = b.dir.join("img");
    rt.ok(&["checkpoint", "--image-path", img.to_str().unwrap(), &id]);
    std::fs::remove_file(&marker).unwrap();
    let pid_file = b.dir.join("restored.pid");
    let out = rt
        .cmd()
        .args([
            "restore",
            "--pid-file",
            pid_file.to_str().unwrap(),
            "--bundle",
            b.dir.to_str().unwrap(),
        ])
        .args(["--image-path", img.to_str().unwrap(), &id2])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(7),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(pid > 1);
    let hooks = std::fs::read_to_string(&marker).unwrap();
    assert!(
        hooks.contains("prestart") && hooks.contains("createRuntime"),
        "hooks ran: {hooks:?}"
    );
    assert!(
        rt.fails(&["state", &id2]).contains("does not exist"),
        "an attached restore cleans up after the exit"
    );
}
