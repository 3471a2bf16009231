//! Helpers for cryo's end-to-end tests: busybox bundles (plain or overlay rootfs), a runner for
//! the `cryo` binary (or runc) with a private `--root`, and container guards that clean up.
//!
//! Every test here needs root, CRIU >= 4.2 and busybox-static: [`require_prerequisites`] fails
//! the test loudly when one is missing, it never skips.
#![allow(clippy::unwrap_used)]

pub mod bundle;
pub mod cgroups;
pub mod churn;
pub mod fanotify;
pub mod faults;
pub mod runtime;
pub mod tree_digest;

pub use bundle::Bundle;
pub use runtime::{ContainerGuard, Runtime};

use std::path::PathBuf;

/// The workspace root.
pub fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The cryo binary under test (`CRYO_BIN`, else target/debug/cryo).
pub fn cryo_bin() -> PathBuf {
    let p = std::env::var_os("CRYO_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target/debug/cryo"));
    assert!(
        p.exists(),
        "{} is missing: build it first with `cargo build --workspace`",
        p.display()
    );
    p
}

/// Fail (not skip) unless root, CRIU >= 4.2 passing `criu check`, and busybox are present.
pub fn require_prerequisites() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "these tests need root (they create containers, cgroups and mounts): run them as root"
    );
    assert!(
        std::path::Path::new("/bin/busybox").exists(),
        "/bin/busybox is missing: run scripts/setup (installs busybox-static)"
    );
    let out = std::process::Command::new("criu").arg("--version").output();
    let out = out.unwrap_or_else(|e| {
        panic!("criu is not on PATH ({e}): run scripts/setup, which builds CRIU 4.2.1")
    });
    let text = String::from_utf8_lossy(&out.stdout);
    let v = text
        .lines()
        .find_map(|l| l.strip_prefix("Version: "))
        .unwrap_or("0")
        .trim()
        .to_string();
    let mut it = v.split('.').map(|x| x.parse::<u32>().unwrap_or(0));
    let (maj, min) = (it.next().unwrap_or(0), it.next().unwrap_or(0));
    assert!(
        (maj, min) >= (4, 2),
        "criu {v} is too old: this kernel needs CRIU >= 4.2 (run scripts/setup)"
    );
    // scripts/test runs the suite on each cgroup layout and names the one it means: a run
    // that did not get it must not pass for it.
    if let Ok(want) = std::env::var("CRYO_TEST_CGROUP_LAYOUT") {
        let have = cgroups::layout();
        assert_eq!(
            have.name(),
            want,
            "CRYO_TEST_CGROUP_LAYOUT={want}, but /sys/fs/cgroup here is {have:?} \
             (scripts/pure-v2 emulates a pure cgroup v2 host)"
        );
    }
    let check = std::process::Command::new("criu")
        .arg("check")
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "`criu check` fails: {}",
        String::from_utf8_lossy(&check.stderr)
    );
}

/// A unique name for this test run.
pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    )
}
