//! Checkpoint/restore of a container with an established TCP connection and of one with a
//! bind mount whose source moves at restore.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use cryo_tests::{unique, Bundle, Runtime};

/// A server and a client inside the container, connected over 127.0.0.1; the client sends a
/// counter, the container prints the last number the server received.
const TCP: &str =
    "mkfifo /tmp/f; sleep 100000 > /tmp/f & nc -l -p 5000 < /tmp/f > /tmp/recv & sleep 0.5; \
    i=0; while true; do i=$((i+1)); echo $i; sleep 0.1; done | nc 127.0.0.1 5000 & \
    while true; do tail -n1 /tmp/recv; sleep 0.2; done";

#[test]
fn established_tcp_connection_survives_checkpoint_and_restore() {
    let rt = Runtime::cryo();
    let b = Bundle::busybox(&["sh", "-c", TCP]);
    let (id, id2) = (unique("tcp"), unique("tcp-r"));
    let (_g, _g2) = (rt.guard(&id), rt.guard(&id2));
    let lines = rt.spawn_with_pipe(&["run", "-d", "--bundle", b.dir.to_str().unwrap(), &id]);
    lines.wait_count(5, Duration::from_secs(20));
    let img = b.dir.join("img");
    let e = rt.fails(&["checkpoint", "--image-path", img.to_str().unwrap(), &id]);
    assert!(
        e.contains("tcp-established"),
        "CRIU's advice must reach the user: {e}"
    );
    assert_eq!(rt.state(&id)["status"], "running");
    rt.ok(&[
        "checkpoint",
        "--tcp-established",
        "--image-path",
        img.to_str().unwrap(),
        &id,
    ]);
    let at_ckpt = lines
        .drain(Duration::from_secs(3))
        .last()
        .map(|l| l.trim().parse::<u64>().unwrap())
        .unwrap_or(5);
    let restored = rt.spawn_with_pipe(&[
        "restore",
        "--tcp-established",
        "-d",
        "--bundle",
        b.dir.to_str().unwrap(),
        "--image-path",
        img.to_str().unwrap(),
        &id2,
    ]);
    // The server keeps receiving on the restored connection: numbers grow past the checkpoint.
    let n = restored.wait_count(at_ckpt + 5, Duration::from_secs(15));
    assert!(n > at_ckpt);
}

#[test]
fn bind_mount_source_is_remapped_at_restore() {
    let rt = Runtime::cryo();
    let script = "i=0; while true; do i=$((i+1)); echo $i > /data/count; echo $i; sleep 0.1; done";
    let src1 = std::env::temp_dir().join(unique("bind-src"));
    let src2 = std::env::temp_dir().join(unique("bind-src2"));
    std::fs::create_dir_all(&src1).unwrap();
    std::fs::create_dir_all(&src2).unwrap();
    let b = Bundle::busybox(&["sh", "-c", script]);
    std::fs::create_dir_all(b.rootfs().join("data")).unwrap();
    let with_source = |src: &std::path::Path| {
        let src = src.to_str().unwrap().to_string();
        move |v: &mut serde_json::Value| {
            v["mounts"].as_array_mut().unwrap().push(serde_json::json!({
                "destination": "/data", "type": "bind", "source": src, "options": ["rbind", "rw"]
            }));
        }
    };
    b.write_config(&["sh", "-c", script], with_source(&src1));
    let (id, id2) = (unique("bind"), unique("bind-r"));
    let (_g, _g2) = (rt.guard(&id), rt.guard(&id2));
    let lines = rt.spawn_with_pipe(&["run", "-d", "--bundle", b.dir.to_str().unwrap(), &id]);
    lines.wait_count(3, Duration::from_secs(20));
    let img = b.dir.join("img");
    rt.ok(&["checkpoint", "--image-path", img.to_str().unwrap(), &id]);
    let manifest = std::fs::read_to_string(img.join("cryo-manifest.json")).unwrap();
    assert!(
        manifest.contains("\"/data\""),
        "bind mount not handed to CRIU as external"
    );
    b.write_config(&["sh", "-c", script], with_source(&src2));
    let restored = rt.spawn_with_pipe(&[
        "restore",
        "-d",
        "--bundle",
        b.dir.to_str().unwrap(),
        "--image-path",
        img.to_str().unwrap(),
        &id2,
    ]);
    let n = restored.wait_count(0, Duration::from_secs(10));
    restored.wait_count(n + 2, Duration::from_secs(10));
    let written: u64 = std::fs::read_to_string(src2.join("count"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        written >= n,
        "the restored process must write into the new bind source"
    );
    let _ = std::fs::remove_dir_all(&src1);
    let _ = std::fs::remove_dir_all(&src2);
}

/// Docker users can only set CRIU options through a config file: the `org.criu.config`
/// annotation (or /etc/criu/runc.conf) must reach CRIU, as with runc.
#[test]
fn criu_config_annotation_is_honoured() {
    let rt = Runtime::cryo();
    let b = Bundle::busybox(&["sh", "-c", TCP]);
    let conf = b.dir.join("criu.conf");
    std::fs::write(&conf, "tcp-established\n").unwrap();
    let path = conf.to_str().unwrap().to_string();
    b.write_config(&["sh", "-c", TCP], move |v| {
        v["annotations"] = serde_json::json!({"org.criu.config": path});
    });
    let id = unique("conf");
    let _g = rt.guard(&id);
    let lines = rt.spawn_with_pipe(&["run", "-d", "--bundle", b.dir.to_str().unwrap(), &id]);
    lines.wait_count(5, Duration::from_secs(20));
    let img = b.dir.join("img");
    rt.ok(&[
        "checkpoint",
        "--leave-running",
        "--image-path",
        img.to_str().unwrap(),
        &id,
    ]);
    assert_eq!(rt.state(&id)["status"], "running");
}
