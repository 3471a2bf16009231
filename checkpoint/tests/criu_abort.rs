//! A CRIU past its deadline is ended gently: let go if it was stopped, its socket cut, and
//! only killed if it does not end by itself. (A CRIU killed with its code inside a task leaves
//! that task to die of SIGTRAP; one that ends by itself cures its tasks first.)

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use cryo_checkpoint::criu::swrk::SwrkClient;
use cryo_checkpoint::criu::CriuClient;

/// A stand-in `criu swrk 3` that stops itself (a hung CRIU), then, once running again,
/// reads its socket to the end and records that it ended by itself.
fn stand_in(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let marker = dir.join("ended-by-itself");
    let script = dir.join("criu");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nkill -STOP $$\ncat <&3 >/dev/null\ntouch {}\n",
            marker.display()
        ),
    )
    .expect("write stand-in");
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    (script, marker)
}

#[test]
fn a_stopped_criu_past_its_deadline_is_let_go_and_ends_by_itself() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (script, marker) = stand_in(dir.path());
    let client = SwrkClient::new(&script).with_probe_timeout(Duration::from_millis(500));
    let started = Instant::now();
    let err = client.version().expect_err("a stopped CRIU answered");
    assert!(err.to_string().contains("CRIU was stopped"), "{err}");
    assert!(
        marker.exists(),
        "CRIU was killed instead of being let end by itself ({:?} after the start)",
        started.elapsed()
    );
}
