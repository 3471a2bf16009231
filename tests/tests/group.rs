//! Coordinated checkpoints for real: containers in network namespaces of their own, joined by
//! veth pairs to a bridge in a hub namespace (no outside network), run the pingpong exchange
//! (`tests/fixtures/pingpong.c`: sequence numbers and a running checksum over TCP, requests
//! always in flight). Each member connects to the next one (a ring), so every member is both a
//! client and a server.
//!
//! A node crash is modelled whole: the members are killed and their namespaces deleted and made
//! again (same addresses, no sockets), then the group image is restored into them.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use cryo_tests::runtime::Lines;
use cryo_tests::{unique, Bundle, ContainerGuard, Runtime};

const PORT: &str = "7000";

/// `ip ARGS`, which must succeed.
fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("`ip` is needed (scripts/setup installs iproute2)");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The members' network namespaces and the hub between them.
struct Net {
    hub: String,
    members: Vec<String>,
}

impl Net {
    fn new(n: usize) -> Self {
        let tag = unique("g");
        let net = Net {
            hub: format!("{tag}-hub"),
            members: (0..n).map(|i| format!("{tag}-{i}")).collect(),
        };
        ip(&["netns", "add", &net.hub]);
        ip(&["-n", &net.hub, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &net.hub, "link", "set", "br0", "up"]);
        net.wire();
        net
    }

    /// Make every member's namespace and link it to the hub.
    fn wire(&self) {
        for (i, ns) in self.members.iter().enumerate() {
            let port = format!("p{i}");
            ip(&["netns", "add", ns]);
            ip(&[
                "link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", &port, "netns",
                &self.hub,
            ]);
            ip(&["-n", &self.hub, "link", "set", &port, "master", "br0", "up"]);
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("{}/24", self.addr(i)),
                "dev",
                "eth0",
            ]);
            ip(&["-n", ns, "link", "set", "eth0", "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
    }

    /// The node died: the members' namespaces (and every socket in them) are gone; new ones
    /// with the same addresses take their place.
    fn replace_member_namespaces(&self) {
        for ns in &self.members {
            ip(&["netns", "del", ns]);
        }
        // The kernel tears a namespace down in the background: its veth ends in the hub go
        // only then.
        let end = Instant::now() + Duration::from_secs(20);
        for i in 0..self.members.len() {
            let port = format!("p{i}");
            while Command::new("ip")
                .args(["-n", &self.hub, "link", "show", &port])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()
                .unwrap()
                .success()
            {
                assert!(
                    Instant::now() < end,
                    "{port} outlived its namespace by 20 s"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        self.wire();
    }

    fn addr(&self, i: usize) -> String {
        format!("10.213.0.{}", i + 1)
    }

    fn path(&self, i: usize) -> String {
        format!("/var/run/netns/{}", self.members[i])
    }

    /// The iptables rules in member `i`'s namespace (a network lock left behind shows here).
    fn rules(&self, i: usize) -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.members[i], "iptables", "-S"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in self.members.iter().chain([&self.hub]) {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// The pingpong workload built for this machine (static: it runs in a busybox rootfs).
fn pingpong_bin() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let src = cryo_tests::workspace().join("tests/fixtures/pingpong.c");
            let dir = cryo_tests::workspace().join("target/cryo-fixtures");
            std::fs::create_dir_all(&dir).unwrap();
            let out = dir.join(format!("pingpong-{}", std::process::id()));
            let st = Command::new("cc")
                .args(["-O2", "-static", "-o"])
                .arg(&out)
                .arg(&src)
                .status()
                .expect("a C compiler (cc) is needed: scripts/setup installs build-essential");
            assert!(st.success(), "building {} failed", src.display());
            out
        })
        .clone()
}

fn name(i: usize) -> String {
    format!("m{i}")
}

/// One running member: `pingpong m<i> 7000 <next member> 7000` in namespace `i`.
struct Member {
    id: String,
    bundle: Bundle,
    lines: Lines,
    _guard: ContainerGuard,
}

/// Start `n` members in `net` (member `i` in namespace `i`, the one in `unsupported` holding
/// a socket CRIU cannot dump); returns once every member's exchange is under way.
fn start(rt: &Runtime, net: &Net, unsupported: Option<usize>) -> Vec<Member> {
    let n = net.members.len();
    let members: Vec<Member> = (0..n)
        .map(|i| {
            let args = [
                "/pingpong".to_string(),
                name(i),
                PORT.into(),
                net.addr((i + 1) % n),
                PORT.into(),
            ];
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let bundle = Bundle::busybox(&args);
            std::fs::copy(pingpong_bin(), bundle.rootfs().join("pingpong")).unwrap();
            let path = net.path(i);
            bundle.write_config(&args, |v| {
                for ns in v["linux"]["namespaces"].as_array_mut().unwrap() {
                    if ns["type"] == "network" {
                        ns["path"] = path.clone().into();
                    }
                }
                if unsupported == Some(i) {
                    v["process"]["env"]
                        .as_array_mut()
                        .unwrap()
                        .push("PINGPONG_HOLD_VSOCK=1".into());
                }
            });
            let id = unique(&format!("grp-{}", name(i)));
            let guard = rt.guard(&id);
            let lines =
                rt.spawn_with_pipe(&["run", "-d", "--bundle", bundle.dir.to_str().unwrap(), &id]);
            Member {
                id,
                bundle,
                lines,
                _guard: guard,
            }
        })
        .collect();
    for (i, m) in members.iter().enumerate() {
        let mut p = Progress::default();
        p.read(&m.lines, &name(i), 3, Duration::from_secs(30));
    }
    members
}

/// What one member printed: its last sequence number.
#[derive(Default, Debug)]
struct Progress {
    last_seq: Option<u64>,
    first_seq: Option<u64>,
}

impl Progress {
    /// Read `lines` until `count` more progress lines of member `who` came (within `within`);
    /// any ERROR line fails the test, naming it.
    fn read(&mut self, lines: &Lines, who: &str, count: usize, within: Duration) {
        let end = Instant::now() + within;
        let mut seen = 0;
        while seen < count {
            let left = end.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "{who}: {seen} of {count} progress lines in {within:?} (last seq {:?})",
                self.last_seq
            );
            let Some(l) = lines.next(left.min(Duration::from_millis(500))) else {
                continue;
            };
            self.take(&l, who, &mut seen);
        }
    }

    fn take(&mut self, l: &str, who: &str, seen: &mut usize) {
        let mut words = l.split_whitespace();
        if words.next() != Some(who) {
            return;
        }
        assert!(!l.contains("ERROR"), "the exchange broke: {l}");
        if let Some(seq) = words
            .next()
            .and_then(|w| w.strip_prefix("seq="))
            .and_then(|s| s.parse::<u64>().ok())
        {
            if let Some(last) = self.last_seq {
                assert!(seq > last, "{who}: seq {seq} after {last}: {l}");
            }
            self.first_seq.get_or_insert(seq);
            self.last_seq = Some(seq);
            *seen += 1;
        }
    }
}

/// Every line that came on `lines` within `within`.
fn collect(lines: &Lines, within: Duration) -> Vec<String> {
    let end = Instant::now() + within;
    let mut v = Vec::new();
    while Instant::now() < end {
        if let Some(l) = lines.next(Duration::from_millis(100)) {
            v.push(l);
        }
    }
    v
}

fn checkpoint_group(rt: &Runtime, members: &[Member], img: &Path, extra: &[&str]) -> String {
    let mut args = vec!["checkpoint"];
    args.extend_from_slice(extra);
    args.extend(["--image-path", img.to_str().unwrap()]);
    args.extend(members.iter().map(|m| m.id.as_str()));
    let out = rt.run(&args);
    assert!(
        out.status.success(),
        "group checkpoint failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Kill every member and delete it; its namespace goes with the node.
fn crash(rt: &Runtime, net: &Net, members: &[Member]) {
    for m in members {
        let _ = rt.run(&["kill", &m.id, "KILL"]);
        rt.ok(&["delete", "--force", &m.id]);
    }
    net.replace_member_namespaces();
}

/// Several coordinated checkpoints of `n` members while traffic flows, a crash, and the
/// restore of the last checkpoint: every connection continues where the cut was taken, with
/// no message lost, duplicated or reordered (each member checks sequence numbers and the
/// checksum of every byte on every reply).
fn group_survives_a_crash(n: usize) {
    let rt = Runtime::cryo();
    let net = Net::new(n);
    let members = start(&rt, &net, None);
    let dir = members[0].bundle.dir.join("group-images");
    let mut progress: Vec<Progress> = (0..n).map(|_| Progress::default()).collect();
    let mut at_cut = vec![0; n];
    for round in 0..3 {
        let img = dir.join(format!("cut-{round}"));
        for (i, m) in members.iter().enumerate() {
            progress[i].read(&m.lines, &name(i), 1, Duration::from_secs(30));
            at_cut[i] = progress[i].last_seq.unwrap();
        }
        checkpoint_group(&rt, &members, &img, &["--leave-running"]);
        // Every member runs on after the group thawed, the same connections still good.
        for (i, m) in members.iter().enumerate() {
            progress[i].read(&m.lines, &name(i), 2, Duration::from_secs(30));
            assert_eq!(rt.state(&m.id)["status"], "running");
        }
    }
    let last = dir.join("cut-2");
    let verify = rt.run(&["verify", "--image-path", last.to_str().unwrap()]);
    assert!(
        verify.status.success(),
        "the group image does not verify: {}",
        String::from_utf8_lossy(&verify.stderr)
    );
    crash(&rt, &net, &members);
    // What the members printed until they died.
    for (i, m) in members.iter().enumerate() {
        for l in m.lines.drain(Duration::from_secs(10)) {
            if l.contains("ERROR") {
                break; // its peer died first
            }
            progress[i].take(&l, &name(i), &mut 0);
        }
    }
    let restored = rt.spawn_with_pipe(&["restore", "-d", "--image-path", last.to_str().unwrap()]);
    // The members share the restore's stdout: their lines interleave.
    let mut after: Vec<Progress> = (0..n).map(|_| Progress::default()).collect();
    let mut lines_after = vec![0; n];
    let end = Instant::now() + Duration::from_secs(60);
    while lines_after.iter().any(|&c| c < 3) {
        assert!(
            Instant::now() < end,
            "the restored group made too little progress in 60 s: {after:?}"
        );
        let Some(l) = restored.next(Duration::from_millis(500)) else {
            continue;
        };
        let who = l.split_whitespace().next().unwrap_or("").to_string();
        if let Some(i) = (0..n).find(|&i| name(i) == who) {
            after[i].take(&l, &who, &mut lines_after[i]);
        }
    }
    for (i, m) in members.iter().enumerate() {
        assert_eq!(rt.state(&m.id)["status"], "running");
        // The exchange continues from the cut: not from the start, not from a later state.
        let first = after[i].first_seq.unwrap();
        assert!(
            first > at_cut[i],
            "{}: first seq after the restore {first} is not past {} (printed before the cut)",
            name(i),
            at_cut[i]
        );
        // It prints every 100 replies: the cut may lie up to 100 past its last line (the crash
        // can end it before the next).
        assert!(
            first <= progress[i].last_seq.unwrap() + 100,
            "{}: the restore starts at {first}, past what ran before the crash ({:?})",
            name(i),
            progress[i].last_seq
        );
    }
    for l in collect(&restored, Duration::from_secs(1)) {
        assert!(
            !l.contains("ERROR"),
            "the exchange broke after a while: {l}"
        );
    }
    for (i, _) in members.iter().enumerate() {
        let rules = net.rules(i);
        assert!(
            !rules.contains("CRIU") && !rules.contains("cryo"),
            "a network lock was left in member {i}'s namespace: {rules}"
        );
    }
}

#[test]
fn two_members_continue_every_connection_after_a_crash() {
    group_survives_a_crash(2);
}

#[test]
fn three_members_continue_every_connection_after_a_crash() {
    group_survives_a_crash(3);
}

/// The failure a group checkpoint prevents: the members checkpointed one after another (each
/// with its TCP connections) while they talk. Restored together after a crash, their
/// connections disagree about what was sent and received; pingpong detects it.
#[test]
fn members_checkpointed_one_after_another_break_their_connection() {
    let rt = Runtime::cryo();
    let net = Net::new(2);
    let members = start(&rt, &net, None);
    let dir = members[0].bundle.dir.join("one-by-one");
    for (i, m) in members.iter().enumerate() {
        let img = dir.join(&m.id);
        rt.ok(&[
            "checkpoint",
            "--leave-running",
            "--tcp-established",
            "--image-path",
            img.to_str().unwrap(),
            &m.id,
        ]);
        // Traffic moves between the two dumps.
        let mut p = Progress::default();
        p.read(&m.lines, &name(i), 2, Duration::from_secs(30));
    }
    crash(&rt, &net, &members);
    let mut detected = Vec::new();
    let mut outputs = Vec::new();
    for m in &members {
        let img = dir.join(&m.id);
        let out = rt
            .cmd()
            .args([
                "restore",
                "-d",
                "--tcp-established",
                "--bundle",
                m.bundle.dir.to_str().unwrap(),
                "--image-path",
                img.to_str().unwrap(),
                &m.id,
            ])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        outputs.push(out);
    }
    for mut c in outputs {
        let stdout = c.stdout.take().unwrap();
        let status = c.wait().unwrap();
        if !status.success() {
            detected.push("a restore was refused".to_string());
            continue;
        }
        let lines = Lines::from_stdout(stdout);
        // pingpong stops with an ERROR line: a bad checksum or sequence number, a broken
        // connection, or no reply for 5 s of running time.
        if let Some(l) = collect(&lines, Duration::from_secs(12))
            .into_iter()
            .find(|l| l.contains("ERROR"))
        {
            detected.push(l);
        }
    }
    assert!(
        !detected.is_empty(),
        "checkpoints taken one after another restored a consistent exchange: the test no \
         longer shows what group checkpoints are for"
    );
}

/// A member whose dump fails inside the group's freeze (it holds a socket CRIU cannot dump):
/// the group checkpoint fails naming it, every member is thawed and its connections still
/// work, the network is unlocked, and no group image is left.
#[test]
fn a_member_whose_dump_fails_leaves_every_member_running() {
    let rt = Runtime::cryo();
    let net = Net::new(2);
    let members = start(&rt, &net, Some(1));
    let img = members[0].bundle.dir.join("failed-group");
    let mut args = vec!["checkpoint", "--leave-running", "--image-path"];
    args.push(img.to_str().unwrap());
    args.extend(members.iter().map(|m| m.id.as_str()));
    let err = rt.fails(&args);
    assert!(
        err.contains(&members[1].id),
        "the failing member is not named: {err}"
    );
    assert!(
        !img.exists(),
        "a failed group checkpoint left {}",
        img.display()
    );
    for (i, m) in members.iter().enumerate() {
        assert_eq!(rt.state(&m.id)["status"], "running");
        let mut p = Progress::default();
        p.read(&m.lines, &name(i), 3, Duration::from_secs(30));
        let rules = net.rules(i);
        assert!(
            !rules.contains("CRIU") && !rules.contains("cryo"),
            "the network lock stayed in member {i}'s namespace: {rules}"
        );
    }
}

/// Coordinated checkpoints into a store (`checkpoint --store DIR --keep 2 ID1 ID2`, and with
/// `--every` until SIGTERM): each generation holds the whole group. A writer SIGKILLed while the members are frozen leaves
/// them running (the network unlocked) and no generation; `store ls` lists group generations;
/// with the newest generation damaged (a flipped byte in a member's pages), `restore --store`
/// falls back to the one before it, says so, and every connection continues from that cut.
#[test]
fn a_group_store_restores_the_newest_good_generation() {
    let rt = Runtime::cryo();
    let net = Net::new(2);
    let members = start(&rt, &net, None);
    let store = members[0].bundle.dir.join("group-store");
    let store_arg = store.to_str().unwrap().to_string();
    let ids: Vec<&str> = members.iter().map(|m| m.id.as_str()).collect();
    let mut write = vec!["checkpoint", "--store", &store_arg, "--keep", "2"];
    write.push("--leave-running");
    write.extend(&ids);
    // Periodic mode: a generation of the group per interval, until SIGTERM.
    let mut every = write.clone();
    every.extend(["--every", "300ms"]);
    let mut periodic = rt
        .cmd()
        .args(&every)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let said = Lines::from_stdout(periodic.stdout.take().unwrap());
    let mut summaries = 0;
    let end = Instant::now() + Duration::from_secs(60);
    while summaries < 2 {
        assert!(
            Instant::now() < end,
            "periodic mode wrote {summaries} generations in 60 s"
        );
        if let Some(l) = said.next(Duration::from_millis(500)) {
            assert!(l.contains("group of"), "{l}");
            summaries += 1;
        }
    }
    cryo_tests::faults::signal(periodic.id() as i32, nix::sys::signal::Signal::SIGTERM);
    assert!(periodic.wait().unwrap().success());
    let last = said.drain(Duration::from_secs(5));
    assert!(
        last.last()
            .is_some_and(|l| l.starts_with("stopped by a signal")),
        "{last:?}"
    );
    let mut progress: Vec<Progress> = (0..2).map(|_| Progress::default()).collect();
    let mut at_cut = Vec::new();
    for _ in 0..3 {
        for (i, m) in members.iter().enumerate() {
            progress[i].read(&m.lines, &name(i), 1, Duration::from_secs(30));
        }
        at_cut.push(
            progress
                .iter()
                .map(|p| p.last_seq.unwrap())
                .collect::<Vec<_>>(),
        );
        let out = rt.run(&write);
        let said = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "group checkpoint into the store failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(said.contains("group of"), "the summary line: {said}");
        for (i, m) in members.iter().enumerate() {
            progress[i].read(&m.lines, &name(i), 2, Duration::from_secs(30));
        }
    }
    let gens = store_ls(&rt, &store);
    assert_eq!(gens.len(), 2, "--keep 2 kept: {gens:?}");
    for g in &gens {
        assert_eq!(g["kind"], "group", "{g}");
        assert_eq!(g["verified"], true, "{g}");
        let held: Vec<&str> = g["containers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_str().unwrap())
            .collect();
        assert_eq!(held, ids);
    }
    let older = gens[0]["generation"].as_str().unwrap().to_string();
    let newest = gens[1]["generation"].as_str().unwrap().to_string();

    // A writer killed inside the group's freeze: no generation, every member running.
    let m0_pid = rt.state(&members[0].id)["pid"].as_i64().unwrap();
    let mut writer = cryo_tests::faults::spawn(&rt, &write);
    let end = Instant::now() + Duration::from_secs(60);
    while cryo_tests::cgroups::freezer_state(m0_pid) != "FROZEN" {
        assert!(
            writer.try_wait().unwrap().is_none(),
            "the writer ended before the group froze"
        );
        assert!(Instant::now() < end, "the group never froze in 60 s");
        std::thread::sleep(Duration::from_micros(500));
    }
    cryo_tests::faults::signal(writer.id() as i32, nix::sys::signal::Signal::SIGKILL);
    let _ = writer.wait();
    for (i, m) in members.iter().enumerate() {
        progress[i].read(&m.lines, &name(i), 3, Duration::from_secs(30));
        assert_eq!(rt.state(&m.id)["status"], "running");
    }
    // The group's guardian removes the staging once it has unlocked the network.
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        let debris: Vec<String> = std::fs::read_dir(&store)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with('.') && n.contains("cryo-new"))
            .collect();
        let rules: Vec<String> = (0..2).map(|i| net.rules(i)).collect();
        let locked = rules
            .iter()
            .any(|r| r.contains("CRIU") || r.contains("cryo"));
        if debris.is_empty() && !locked {
            break;
        }
        assert!(
            Instant::now() < end,
            "20 s after the kill: staging {debris:?} holding {:?}, rules {rules:?}",
            Command::new("find")
                .arg(&store)
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let after_kill: Vec<String> = store_ls(&rt, &store)
        .iter()
        .map(|g| g["generation"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(after_kill, [older.clone(), newest.clone()]);

    // A store of a group takes no single container's checkpoint.
    let e = rt.fails(&[
        "checkpoint",
        "--store",
        &store_arg,
        "--leave-running",
        ids[0],
    ]);
    assert!(e.contains("holds a group's checkpoints"), "{e}");

    flip_a_byte_of_member_pages(&store.join(&newest), ids[0]);
    crash(&rt, &net, &members);
    for (i, m) in members.iter().enumerate() {
        for l in m.lines.drain(Duration::from_secs(10)) {
            if l.contains("ERROR") {
                break; // its peer died first
            }
            progress[i].take(&l, &name(i), &mut 0);
        }
    }
    let log = store.with_extension("log");
    let mut cmd = rt.cmd();
    cmd.arg("--log").arg(&log);
    cmd.args(["restore", "-d", "--store", &store_arg]);
    let restored = cryo_tests::runtime::spawn_with_pipe(cmd);
    let said = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        said.contains(&format!("restored generation {older}, not the newest"))
            && said.contains(&newest),
        "the restore does not say it fell back from {newest} to {older}: {said}"
    );
    // Generation `older` is the second of the three cuts (the first was pruned).
    let cut = &at_cut[1];
    let mut after: Vec<Progress> = (0..2).map(|_| Progress::default()).collect();
    let mut lines_after = [0; 2];
    let end = Instant::now() + Duration::from_secs(60);
    while lines_after.iter().any(|&c| c < 3) {
        assert!(
            Instant::now() < end,
            "the restored group made too little progress in 60 s: {after:?}"
        );
        let Some(l) = restored.next(Duration::from_millis(500)) else {
            continue;
        };
        let who = l.split_whitespace().next().unwrap_or("").to_string();
        if let Some(i) = (0..2).find(|&i| name(i) == who) {
            after[i].take(&l, &who, &mut lines_after[i]);
        }
    }
    for (i, m) in members.iter().enumerate() {
        assert_eq!(rt.state(&m.id)["status"], "running");
        let first = after[i].first_seq.unwrap();
        // Past what was printed before that cut; the log above says which cut it was.
        assert!(
            first > cut[i] && first <= progress[i].last_seq.unwrap() + 100,
            "{}: the restore starts at {first}, not within generation {older}'s cut (after {}, \
             ran until {:?})",
            name(i),
            cut[i],
            progress[i].last_seq
        );
    }
    for l in collect(&restored, Duration::from_secs(1)) {
        assert!(
            !l.contains("ERROR"),
            "the exchange broke after a while: {l}"
        );
    }
}

fn store_ls(rt: &Runtime, store: &Path) -> Vec<serde_json::Value> {
    let out = rt.ok(&["store", "ls", "--format", "json", store.to_str().unwrap()]);
    serde_json::from_str::<Vec<serde_json::Value>>(&out).unwrap()
}

/// Flip one byte in the middle of member `id`'s largest pages file in group image `dir`.
fn flip_a_byte_of_member_pages(dir: &Path, id: &str) {
    use std::os::unix::fs::FileExt;
    let member = dir.join("members").join(id);
    let largest = std::fs::read_dir(&member)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("pages-"))
        .max_by_key(|e| e.metadata().unwrap().len())
        .unwrap_or_else(|| panic!("{} has no pages file", member.display()))
        .path();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&largest)
        .unwrap();
    let at = f.metadata().unwrap().len() / 2;
    let mut b = [0u8];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0] ^ 0x40], at).unwrap();
}
