//! cryo needs no host tool a minimal host may lack at run time: with PATH empty of `ip` and
//! `nsenter` (with nothing at all on it), `cryo run` of a spec with a network namespace of its
//! own works and the container's `lo` is up (cryo speaks netlink itself, as runc does).
#![allow(clippy::unwrap_used)]

use std::process::Stdio;

use cryo_tests::{unique, Bundle, Runtime};

/// `lo`'s flags inside the container (IFF_UP is bit 0), its state as busybox's `ip` sees it,
/// then a line sent to itself over 127.0.0.1 (retried until the listener is up: a fixed
/// sleep lost that race on a loaded machine).
const SHOW_LO: &[&str] = &[
    "sh",
    "-c",
    "cat /sys/class/net/lo/flags; ip -o link show lo; \
     nc -l -p 7777 >/tmp/got & \
     for i in $(seq 100); do echo over-lo | nc 127.0.0.1 7777 2>/dev/null && break; sleep 0.1; done; \
     wait; cat /tmp/got",
];

#[test]
fn run_with_a_network_namespace_needs_no_ip_or_nsenter_and_brings_lo_up() {
    let rt = Runtime::cryo();
    let b = Bundle::busybox(SHOW_LO);
    let spec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(b.dir.join("config.json")).unwrap()).unwrap();
    assert!(
        spec["linux"]["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["type"] == "network" && n.get("path").is_none()),
        "the test needs a spec with a network namespace of its own: {spec}"
    );
    let id = unique("nopath");
    let _g = rt.guard(&id);
    let out = rt
        .cmd()
        .args(["run", "--bundle", b.dir.to_str().unwrap(), &id])
        .env_clear()
        .env("PATH", "/nonexistent")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "cryo run without ip/nsenter on PATH failed: {}{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut lines = stdout.lines();
    let flags = lines.next().unwrap_or_default();
    let flags = u32::from_str_radix(flags.trim().trim_start_matches("0x"), 16).unwrap();
    assert_eq!(flags & 1, 1, "lo is down inside the container: {stdout}");
    assert!(stdout.contains("UP"), "{stdout}");
    assert!(
        stdout.contains("over-lo"),
        "127.0.0.1 unreachable: {stdout}"
    );
    assert!(rt.fails(&["state", &id]).contains("does not exist"));
}
