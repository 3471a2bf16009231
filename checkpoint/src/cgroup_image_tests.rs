#![allow(clippy::unwrap_used)]
use super::*;

/// Protobuf length-delimited field `number` holding `body`.
fn field(number: u64, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    push_varint(&mut out, number << 3 | 2);
    push_varint(&mut out, body.len() as u64);
    out.extend_from_slice(body);
    out
}

fn push_varint(out: &mut Vec<u8>, mut v: u64) {
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

fn prop(name: &str, value: &str) -> Vec<u8> {
    // cgroup_prop_entry { name = 1; value = 2; perms = 3 { mode = 1 (varint) } }
    let mut p = field(1, name.as_bytes());
    p.extend(field(2, value.as_bytes()));
    p.extend(field(3, &[0x08, 0xa4, 0x03]));
    p
}

fn dir(name: &str, props: &[Vec<u8>], children: &[Vec<u8>]) -> Vec<u8> {
    let mut d = field(1, name.as_bytes());
    for c in children {
        d.extend(field(2, c));
    }
    for p in props {
        d.extend(field(3, p));
    }
    d
}

/// A cgroup image as CRIU writes it for a container in a v1 freezer cgroup `a` (its child `b`
/// frozen too) and a cgroup2 cgroup, with `state` as the freezer state found at dump.
fn image(state: &str) -> Vec<u8> {
    let member = [field(1, b"freezer"), field(2, b"/a")].concat();
    let set = [vec![0x08, 0x01], field(2, &member)].concat();
    let freezer_dirs = dir(
        "a",
        &[prop("freezer.state", state), prop("cgroup.procs", "")],
        &[dir("a/b", &[prop("freezer.state", state)], &[])],
    );
    let freezer = [field(1, b"freezer"), field(2, &freezer_dirs)].concat();
    let unified_dirs = dir("c", &[prop("cgroup.freeze", "0")], &[]);
    let unified = [field(1, b""), field(2, &unified_dirs)].concat();
    let entry = [field(1, &set), field(2, &freezer), field(2, &unified)].concat();
    let mut file = Vec::new();
    file.extend(IMG_COMMON_MAGIC.to_le_bytes());
    file.extend(CGROUP_MAGIC.to_le_bytes());
    file.extend((entry.len() as u32).to_le_bytes());
    file.extend(entry);
    file
}

fn dir_with(bytes: &[u8]) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join(CGROUP_IMAGE), bytes).unwrap();
    d
}

#[test]
fn a_running_container_is_recorded_thawed_and_nothing_else_changes() {
    let d = dir_with(&image("FROZEN"));
    assert_eq!(record_freezer_state(d.path(), false).unwrap(), 2);
    let after = std::fs::read(d.path().join(CGROUP_IMAGE)).unwrap();
    assert_eq!(after, image("THAWED"));
    // Idempotent.
    assert_eq!(record_freezer_state(d.path(), false).unwrap(), 0);
}

#[test]
fn a_paused_container_stays_recorded_frozen() {
    let d = dir_with(&image("FROZEN"));
    assert_eq!(record_freezer_state(d.path(), true).unwrap(), 0);
    assert_eq!(
        std::fs::read(d.path().join(CGROUP_IMAGE)).unwrap(),
        image("FROZEN")
    );
    let d = dir_with(&image("THAWED"));
    assert_eq!(record_freezer_state(d.path(), true).unwrap(), 2);
    assert_eq!(
        std::fs::read(d.path().join(CGROUP_IMAGE)).unwrap(),
        image("FROZEN")
    );
}

#[test]
fn no_cgroup_image_is_nothing_to_do() {
    let d = tempfile::tempdir().unwrap();
    assert_eq!(record_freezer_state(d.path(), false).unwrap(), 0);
}

#[test]
fn a_damaged_image_is_refused_and_left_as_it_was() {
    let good = image("FROZEN");
    let mut cut = good.clone();
    cut.truncate(good.len() - 5);
    let mut bad_magic = good.clone();
    bad_magic[4] ^= 0xff;
    for (bytes, why) in [
        (cut, "past the end"),
        (bad_magic, "magic"),
        (good[..6].to_vec(), "too short"),
    ] {
        let d = dir_with(&bytes);
        let e = record_freezer_state(d.path(), false)
            .unwrap_err()
            .to_string();
        assert!(e.contains(why) && e.contains("cgroup.img"), "{e}");
        assert_eq!(std::fs::read(d.path().join(CGROUP_IMAGE)).unwrap(), bytes);
    }
}
