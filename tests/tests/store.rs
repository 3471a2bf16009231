//! Checkpoint stores, for real (root, CRIU, overlay): generations written incrementally,
//! restored exactly as they were (memory and files, checked by the workload itself), a
//! damaged newest generation passed over with a note, periodic mode ending cleanly, and
//! `checkpoint --every` killed at random instants never leaving a store whose newest complete
//! generation does not restore; on ext4 (chains of `parent` links) and on XFS (generations
//! that share extents).
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use cryo_tests::churn::{shared_bundle, Churn, State};
use cryo_tests::faults::{processes_mentioning, signal};
use cryo_tests::{unique, Runtime};
use nix::sys::signal::Signal;

/// A small random source; the seed is printed, and `CRYO_TEST_SEED` replays a run.
struct Rng(u64);

impl Rng {
    fn new() -> Self {
        let seed = std::env::var("CRYO_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
            });
        eprintln!("random seed: CRYO_TEST_SEED={seed}");
        Self(seed | 1)
    }

    /// A duration in `[0, max)`.
    fn below(&mut self, max: Duration) -> Duration {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        Duration::from_micros(self.0 % max.as_micros().max(1) as u64)
    }
}

/// A store directory, removed at the end.
struct StoreDir(PathBuf);

impl StoreDir {
    fn new() -> Self {
        Self(std::env::temp_dir().join(unique("cryo-store")))
    }

    fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for StoreDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `store ls --format json`.
fn ls(rt: &Runtime, store: &StoreDir) -> Vec<serde_json::Value> {
    serde_json::from_str(&rt.ok(&["store", "ls", "--format", "json", store.path()])).unwrap()
}

/// The newest generation's name.
fn newest(rt: &Runtime, store: &StoreDir) -> String {
    ls(rt, store).last().unwrap()["generation"]
        .as_str()
        .unwrap()
        .to_string()
}

/// The generation a successful `checkpoint --store` wrote (its summary line starts with it).
fn written(stdout: &str) -> String {
    stdout.split(':').next().unwrap().trim().to_string()
}

/// Kill the container (if it still runs), wait until it is stopped, delete it.
fn finish_off(c: Churn) {
    if c.rt.state(&c.id)["status"] == "running" {
        c.kill();
    }
    let end = Instant::now() + Duration::from_secs(10);
    while c.rt.state(&c.id)["status"] != "stopped" && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(20));
    }
    c.rt.ok(&["delete", "--force", &c.id]);
}

/// A 1 GiB workload rewriting 5 % between checkpoints into a store with `--keep 3`, killed at
/// a random moment in some rounds (during or after the checkpoint): the restore brings back
/// the newest generation exactly (the round and checksum its memory and files held when it
/// was frozen), and the chain carries on from the restored container. A damaged newest
/// generation is passed over, said so, and the one before it restored exactly.
#[test]
fn generations_restore_exactly_the_newest_and_fall_back_past_a_damaged_one() {
    const MIB: u32 = 1024;
    let rt = Runtime::cryo();
    let store = StoreDir::new();
    let mut rng = Rng::new();
    let base = unique("gen");
    let id = |n: usize| format!("{base}-{n}");
    let _guards: Vec<_> = (0..5).map(|n| rt.guard(&id(n))).collect();
    let mut c = Churn::start(&rt, &id(0), MIB);
    // Which state each generation froze: the workload is idle while a checkpoint runs.
    let mut held: HashMap<String, State> = HashMap::new();
    let mut restores = 0;
    for k in 1..=7 {
        let state = c.round();
        let cp = rt
            .cmd()
            .args([
                "checkpoint",
                "--store",
                store.path(),
                "--keep",
                "3",
                "--leave-running",
                &c.id,
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let kill_at = [3, 5, 6]
            .contains(&k)
            .then(|| rng.below(Duration::from_secs(4)));
        if let Some(at) = kill_at {
            kill_at_instant(at, &c);
        }
        let out = cp.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() {
            held.insert(written(&stdout), state.clone());
        } else {
            assert!(
                kill_at.is_some(),
                "checkpoint {k} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let Some(at) = kill_at else { continue };
        // The workload was killed (at `at`): restore the newest generation into a new id.
        let gen = newest(&rt, &store);
        let expected = held
            .get(&gen)
            .unwrap_or_else(|| {
                panic!("the newest generation {gen} was not written by a checkpoint that succeeded")
            })
            .clone();
        finish_off(c);
        restores += 1;
        let (restored, stderr) = Churn::restore_from_store(&rt, &store.0, &id(restores), MIB);
        assert!(
            !stderr.contains("falling back"),
            "killed at {at:?}: {stderr}"
        );
        restored.assert_holds(&expected);
        c = restored;
    }
    assert_eq!(restores, 3);
    // The chain carried on across the restores; --keep 3 kept 3 and what they depend on.
    let gens = ls(&rt, &store);
    assert!(gens.iter().all(|g| g["verified"] == true), "{gens:#?}");
    let incremental = gens.iter().filter(|g| g["kind"] == "incremental").count();
    assert!(incremental >= 1, "no incremental generation: {gens:#?}");
    for g in gens.iter().filter(|g| g["kind"] == "incremental") {
        // 5 % of 1 GiB in 64 KiB chunks, plus the process's other pages.
        let changed = g["pages_written"].as_u64().unwrap();
        assert!(
            changed < 100 << 20,
            "an increment wrote {changed} bytes of pages: {g:#}"
        );
    }

    // Damage the newest generation: the restore says so and restores the one before it.
    let names: Vec<String> = gens
        .iter()
        .map(|g| g["generation"].as_str().unwrap().to_string())
        .collect();
    let (damaged, before) = (&names[names.len() - 1], &names[names.len() - 2]);
    flip_a_byte_of_the_largest_file(&store.0.join(damaged));
    let (older, stderr) = Churn::restore_from_store(&rt, &store.0, &id(4), MIB);
    assert!(
        stderr.contains(&format!(
            "generation {damaged} cannot be restored, falling back"
        )) && stderr.contains(&format!("restored generation {before}")),
        "{stderr}"
    );
    older.assert_holds(&held[before]);
    // The next generation is not built on the damaged one.
    c.round();
    let stdout = rt.ok(&[
        "checkpoint",
        "--store",
        store.path(),
        "--keep",
        "3",
        "--leave-running",
        &c.id,
    ]);
    assert!(!stdout.contains(&format!("over {damaged}")), "{stdout}");
    let listed = ls(&rt, &store);
    let bad: Vec<_> = listed.iter().filter(|g| g["verified"] == false).collect();
    assert_eq!(bad.len(), 1, "{listed:#?}");
    assert_eq!(bad[0]["generation"], damaged.as_str());
    assert!(
        bad[0]["problem"].as_str().unwrap().contains("BLAKE3"),
        "{bad:#?}"
    );
    finish_off(older);
    finish_off(c);
}

/// SIGKILL the workload once `at` has passed (the checkpoint runs meanwhile).
fn kill_at_instant(at: Duration, c: &Churn) {
    let pid = c.pid();
    let t = Instant::now();
    while t.elapsed() < at {
        std::thread::sleep(Duration::from_millis(1));
    }
    signal(pid, Signal::SIGKILL);
}

fn flip_a_byte_of_the_largest_file(dir: &Path) {
    use std::os::unix::fs::FileExt;
    let largest = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_type().unwrap().is_file())
        .max_by_key(|e| e.metadata().unwrap().len())
        .unwrap()
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

/// `checkpoint --every` SIGKILLed at random instants (before, inside and after freezes,
/// during pruning): the container keeps running, and the newest generation that looks
/// complete always verifies and restores (memory and files consistent, as the workload
/// checks), with no fallback.
#[test]
fn killing_periodic_checkpoints_never_leaves_a_broken_newest_generation() {
    kill_periodic_checkpoints(&StoreDir::new());
}

/// The same where generations share extents instead of chaining (XFS): the kills land in
/// the cloning too.
#[test]
fn killing_periodic_checkpoints_that_share_extents_never_leaves_a_broken_newest_generation() {
    let fs = cryo_tests::faults::Xfs::new(3 << 30);
    kill_periodic_checkpoints(&StoreDir(fs.dir.join("store")));
}

fn kill_periodic_checkpoints(store: &StoreDir) {
    const MIB: u32 = 256;
    let rt = Runtime::cryo();
    let mut rng = Rng::new();
    let id = unique("every");
    let _g = rt.guard(&id);
    let c = Churn::start(&rt, &id, MIB);
    let root = rt.root.to_string_lossy().into_owned();
    for i in 0..8 {
        c.round();
        let mut cp = rt
            .cmd()
            .args([
                "checkpoint",
                "--store",
                store.path(),
                "--every",
                "1s",
                "--keep",
                "3",
                "--full-every",
                "4",
                &id,
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let at = Duration::from_millis(300) + rng.below(Duration::from_millis(3500));
        std::thread::sleep(at);
        signal(cp.id() as i32, Signal::SIGKILL);
        cp.wait().unwrap();
        // Its guardian undoes what it left, then goes.
        let end = Instant::now() + Duration::from_secs(20);
        while processes_mentioning(&root)
            .iter()
            .any(|p| p.contains("__guardian") || p.contains(" swrk "))
        {
            assert!(
                Instant::now() < end,
                "the guardian never finished after a kill at {at:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(
            c.beating(Duration::from_secs(10)),
            "frozen after a kill at {at:?}"
        );
        assert_eq!(rt.state(&id)["status"], "running");
        let gens = ls(&rt, store);
        let complete: Vec<_> = gens
            .iter()
            .filter(|g| {
                store
                    .0
                    .join(g["generation"].as_str().unwrap())
                    .join("cryo-manifest.json")
                    .exists()
            })
            .collect();
        let Some(last) = complete.last() else {
            continue;
        };
        assert_eq!(
            last["verified"], true,
            "killed at {at:?}, the newest complete generation: {last:#}"
        );
        if i % 3 == 2 {
            let rid = format!("{id}-r{i}");
            let _rg = rt.guard(&rid);
            let (r, stderr) = Churn::restore_from_store(&rt, &store.0, &rid, MIB);
            assert!(
                !stderr.contains("falling back"),
                "killed at {at:?}: {stderr}"
            );
            let v = r.self_check();
            assert!(
                v.starts_with("ok "),
                "killed at {at:?}, the restored workload says: {v}"
            );
            assert!(r.state().round() <= c.state().round());
            finish_off(r);
        }
    }
    // A run that is let finish removes what the killed ones left.
    rt.ok(&[
        "checkpoint",
        "--store",
        store.path(),
        "--keep",
        "3",
        "--leave-running",
        &id,
    ]);
    let debris: Vec<String> = std::fs::read_dir(&store.0)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.') && n != ".cryo-store.lock")
        .collect();
    assert!(debris.is_empty(), "{debris:?}");
    assert!(ls(&rt, store).iter().all(|g| g["verified"] == true));
    finish_off(c);
}

/// Periodic mode prints one line per generation and ends cleanly on SIGTERM (the container
/// runs on) and by itself when the container stops.
#[test]
fn periodic_mode_ends_on_sigterm_and_when_the_container_stops() {
    const MIB: u32 = 64;
    let rt = Runtime::cryo();
    let store = StoreDir::new();
    let id = unique("periodic");
    let _g = rt.guard(&id);
    let c = Churn::start(&rt, &id, MIB);
    let every = |rt: &Runtime| {
        let mut child = rt
            .cmd()
            .args([
                "checkpoint",
                "--store",
                store.path(),
                "--every",
                "500ms",
                "--keep",
                "2",
                &id,
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for l in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        (child, rx)
    };
    let (mut child, lines) = every(&rt);
    let mut seen = Vec::new();
    while seen.len() < 3 {
        c.round();
        let l = lines
            .recv_timeout(Duration::from_secs(60))
            .expect("no summary line");
        // gen-…: incremental over …; frozen N ms, wrote X MiB, took T s, at TIME
        assert!(
            l.starts_with("gen-")
                && l.contains("frozen ")
                && l.contains(" ms, wrote ")
                && l.contains(", took "),
            "{l}"
        );
        seen.push(l);
    }
    assert!(seen[1].contains("incremental over"), "{seen:#?}");
    signal(child.id() as i32, Signal::SIGTERM);
    let st = child.wait().unwrap();
    assert!(st.success(), "{st}");
    let rest: Vec<String> = lines.iter().collect();
    assert!(
        rest.last()
            .is_some_and(|l| l.starts_with("stopped by a signal")),
        "{rest:#?}"
    );
    assert!(c.beating(Duration::from_secs(5)));
    assert_eq!(rt.state(&id)["status"], "running");

    // Now the container stops under it: periodic mode ends by itself.
    let (mut child, lines) = every(&rt);
    lines
        .recv_timeout(Duration::from_secs(60))
        .expect("no summary line");
    c.kill();
    let end = Instant::now() + Duration::from_secs(30);
    let st = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(
            Instant::now() < end,
            "periodic mode did not end when its container stopped"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(st.success(), "{st}");
    let rest: Vec<String> = lines.iter().collect();
    assert!(
        rest.last()
            .is_some_and(|l| l.contains("periodic checkpoints end")),
        "{rest:#?}"
    );
    rt.ok(&["delete", "--force", &id]);
}

/// What a store refuses, and how it says so: before anything is touched.
#[test]
fn store_refusals_name_the_problem() {
    let rt = Runtime::cryo();
    let store = StoreDir::new();
    let id = unique("refuse");
    let _g = rt.guard(&id);
    let c = Churn::start(&rt, &id, 16);
    for (flags, says) in [
        (
            &["--compress-pages"][..],
            "cannot be combined with --compress-pages",
        ),
        (&["--keep", "0"][..], "--keep 0"),
        (&["--every", "soon"][..], "invalid --every"),
        (&["--full-every", "0"][..], "--full-every 0"),
    ] {
        let mut args = vec!["checkpoint", "--store", store.path(), "--leave-running"];
        args.extend_from_slice(flags);
        args.push(&id);
        let e = rt.fails(&args);
        assert!(e.contains(says), "{flags:?}: {e}");
    }
    assert!(!store.0.exists() || std::fs::read_dir(&store.0).unwrap().count() <= 1);
    let e = rt.fails(&[
        "restore",
        "--store",
        store.path(),
        "--bundle",
        c.bundle.dir.to_str().unwrap(),
        &unique("r"),
    ]);
    assert!(
        e.contains("not a checkpoint store") || e.contains("holds no generation"),
        "{e}"
    );
    std::fs::create_dir_all(&store.0).unwrap();
    std::fs::write(store.0.join("notes.txt"), "mine").unwrap();
    let e = rt.fails(&[
        "checkpoint",
        "--store",
        store.path(),
        "--leave-running",
        &id,
    ]);
    assert!(
        e.contains("notes.txt") && e.contains("directory of its own"),
        "{e}"
    );
    assert_eq!(
        std::fs::read_to_string(store.0.join("notes.txt")).unwrap(),
        "mine"
    );
    std::fs::remove_file(store.0.join("notes.txt")).unwrap();
    // Every generation damaged: refused, naming each.
    rt.ok(&[
        "checkpoint",
        "--store",
        store.path(),
        "--leave-running",
        &id,
    ]);
    let gen = newest(&rt, &store);
    std::fs::remove_file(store.0.join(&gen).join("inventory.img")).unwrap();
    let e = rt.fails(&[
        "restore",
        "--store",
        store.path(),
        "--bundle",
        c.bundle.dir.to_str().unwrap(),
        &unique("r"),
    ]);
    assert!(
        e.contains("no generation of checkpoint store")
            && e.contains(&gen)
            && e.contains("inventory.img"),
        "{e}"
    );
    let e = rt.fails(&["store", "ls", "/nonexistent/store"]);
    assert!(e.contains("not a checkpoint store"), "{e}");
    assert!(c.beating(Duration::from_secs(5)));
    finish_off(c);
}

/// Shared memory (a shared anonymous mapping, dumped as `pagemap-shmem-*`) goes through the
/// same increments and comes back exactly.
#[test]
fn shared_memory_generations_restore_exactly() {
    const MIB: u32 = 128;
    let rt = Runtime::cryo();
    let store = StoreDir::new();
    let (id, rid) = (unique("shm"), unique("shm-r"));
    let (_g, _rg) = (rt.guard(&id), rt.guard(&rid));
    let c = Churn::start_in(&rt, &id, shared_bundle(MIB));
    let mut state = c.state();
    for _ in 0..3 {
        state = c.round();
        rt.ok(&[
            "checkpoint",
            "--store",
            store.path(),
            "--leave-running",
            &id,
        ]);
    }
    let gens = ls(&rt, &store);
    let last = gens.last().unwrap();
    assert_eq!(last["kind"], "incremental", "{gens:#?}");
    // 5 % of the segment changed; the rest is left to the parents.
    assert!(
        last["pages_in_parent"].as_u64().unwrap() > (MIB as u64 * 8 / 10) << 20,
        "{last:#}"
    );
    let gen_dir = store.0.join(last["generation"].as_str().unwrap());
    assert!(
        std::fs::read_dir(&gen_dir).unwrap().flatten().any(|e| e
            .file_name()
            .to_string_lossy()
            .starts_with("pagemap-shmem-")),
        "the workload's memory was not dumped as shared memory"
    );
    let (r, stderr) = Churn::restore_into(&rt, &store.0, &rid, shared_bundle(MIB));
    assert!(!stderr.contains("falling back"), "{stderr}");
    r.assert_holds(&state);
    finish_off(r);
    finish_off(c);
}

/// A restore of a chain checks exactly the page bytes it reads: a flipped byte in a page of
/// the full generation that later generations replaced does not stop it, and the memory
/// restored is exactly the newest generation's (so that page really was never read); a
/// flipped byte in a page it still takes from there is caught, and no generation of the
/// chain restores.
#[test]
fn a_chain_restore_checks_exactly_the_pages_it_reads() {
    use cryo_checkpoint::image::blocks::BLOCK;
    use std::os::unix::fs::FileExt;
    const MIB: u32 = 64;
    let rt = Runtime::cryo();
    let store = StoreDir::new();
    let base = unique("reads");
    let id = |n: usize| format!("{base}-{n}");
    let _guards: Vec<_> = (0..3).map(|n| rt.guard(&id(n))).collect();
    let state = three_generations(&rt, &store, &id(0), MIB);
    let gens = ls(&rt, &store);
    let dir = |g: &serde_json::Value| store.0.join(g["generation"].as_str().unwrap());
    let (full, top) = (dir(&gens[0]), dir(&gens[2]));
    let pages = std::fs::read_dir(&full)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "img"))
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("pages-")
        })
        .max_by_key(|p| p.metadata().unwrap().len())
        .unwrap();
    assert!(
        full.join(format!(
            "{}.blocks",
            pages.file_name().unwrap().to_string_lossy()
        ))
        .exists(),
        "the full generation's pages have no block digests"
    );
    let reads = cryo_checkpoint::image::reads::pages_read(&top).unwrap();
    let read = &reads[&pages.canonicalize().unwrap()];
    let len = pages.metadata().unwrap().len();
    let unread_block = (0..len / BLOCK)
        .find(|b| {
            let (from, to) = (b * BLOCK, (b + 1) * BLOCK);
            read.iter().all(|&(a, z)| z <= from || a >= to)
        })
        .expect("the later generations replaced no whole block of the full one");
    let flip = |at: u64| {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&pages)
            .unwrap();
        let mut b = [0u8];
        f.read_exact_at(&mut b, at).unwrap();
        f.write_all_at(&[b[0] ^ 0x20], at).unwrap();
    };

    flip(unread_block * BLOCK + 7);
    let (r, stderr) = Churn::restore_from_store(&rt, &store.0, &id(1), MIB);
    assert!(!stderr.contains("falling back"), "{stderr}");
    r.assert_holds(&state);
    finish_off(r);

    let (from, to) = read[read.len() / 2];
    flip(from + (to - from) / 2);
    let bundle = cryo_tests::churn::bundle(MIB);
    let out = rt
        .cmd()
        .args([
            "restore",
            "-d",
            "--store",
            store.path(),
            "--bundle",
            bundle.dir.to_str().unwrap(),
            &id(2),
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "restored from a damaged chain: {stderr}"
    );
    let name = pages.file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        stderr.contains(&name)
            && stderr.contains("falling back")
            && stderr.contains("no generation of checkpoint store"),
        "{stderr}"
    );
    assert!(
        !rt.run(&["state", &id(2)]).status.success(),
        "a refused restore left a container"
    );
}

/// A full generation and two incremental ones of a churn workload of `mib` MiB run as `id`
/// (gone afterwards); the state the newest one holds.
fn three_generations(rt: &Runtime, store: &StoreDir, id: &str, mib: u32) -> State {
    let c = Churn::start(rt, id, mib);
    let mut state = c.state();
    for _ in 0..3 {
        state = c.round();
        rt.ok(&[
            "checkpoint",
            "--store",
            store.path(),
            "--leave-running",
            &c.id,
        ]);
    }
    finish_off(c);
    let gens = ls(rt, store);
    let kinds: Vec<_> = gens.iter().map(|g| g["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["full", "incremental", "incremental"], "{gens:#?}");
    state
}

/// A chain restore SIGKILLed while it checks the older generations' blocks beside CRIU (the
/// moment: cryo's page check thread runs and CRIU is restoring): nothing is left (no state,
/// no process, no cgroup), the bundle's rootfs is as it was, every generation still verifies,
/// and the newest restores exactly afterwards.
#[test]
fn a_chain_restore_killed_inside_its_page_check_leaves_nothing() {
    use cryo_tests::faults::{criu_child, has_open};
    use cryo_tests::tree_digest::tree_digest;
    // Big enough that the check of the older generations outlasts the polling.
    const MIB: u32 = 512;
    let rt = Runtime::cryo();
    let store = StoreDir::new();
    let base = unique("chk-kill");
    let id = |n: usize| format!("{base}-{n}");
    let _guards: Vec<_> = (0..3).map(|n| rt.guard(&id(n))).collect();
    let state = three_generations(&rt, &store, &id(0), MIB);
    let bundle = cryo_tests::churn::bundle(MIB);
    let before = tree_digest(&bundle.rootfs());
    let mut child = rt
        .cmd()
        .args([
            "restore",
            "-d",
            "--store",
            store.path(),
            "--bundle",
            bundle.dir.to_str().unwrap(),
            &id(1),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let checking = |pid: u32| {
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .into_iter()
            .flatten()
            .flatten()
            .any(|t| {
                std::fs::read_to_string(t.path().join("comm"))
                    .is_ok_and(|c| c.trim() == "cryo-pages-chec")
            })
    };
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the restore ended before its page check was seen beside CRIU: case not reached"
        );
        assert!(Instant::now() < end, "the page check never ran beside CRIU");
        let criu = criu_child(child.id()).filter(|&c| has_open(c, "restore.log"));
        if criu.is_some() && checking(child.id()) {
            break;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    signal(child.id() as i32, Signal::SIGKILL);
    let _ = child.wait();
    // The guardian undoes the restore.
    let end = Instant::now() + Duration::from_secs(15);
    while rt.root.join(id(1)).exists() || !processes_mentioning(&id(1)).is_empty() {
        assert!(
            Instant::now() < end,
            "left: state dir {}, processes {:?}",
            rt.root.join(id(1)).exists(),
            processes_mentioning(&id(1))
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(rt.fails(&["state", &id(1)]).contains("does not exist"));
    for name in [format!(":youki:{}", id(1)), id(1)] {
        cryo_tests::cgroups::assert_no_cgroup(&name);
    }
    assert!(
        tree_digest(&bundle.rootfs()) == before,
        "the killed restore changed the bundle's rootfs"
    );
    rt.ok(&["delete", "--force", &id(1)]);
    let gens = ls(&rt, &store);
    assert!(gens.iter().all(|g| g["verified"] == true), "{gens:#?}");
    let (r, stderr) = Churn::restore_from_store(&rt, &store.0, &id(2), MIB);
    assert!(!stderr.contains("falling back"), "{stderr}");
    r.assert_holds(&state);
    finish_off(r);
}

/// On a file system that clones ranges (XFS), every generation after the first is a full
/// image that shares its unchanged pages' extents with the one before: no `parent` link, the
/// changed pages all it adds to the disk, older generations pruned without regard to the
/// newer ones, and the newest restored exactly. A checkpoint SIGKILLed while it builds the
/// shared pages image (the moment: its temporary file exists) leaves no generation and the
/// container running; the next checkpoint, and the restore of it, are exact. A damaged byte
/// of the newest generation leaves the one before it, which shares the rest, restorable.
#[test]
fn on_a_reflink_file_system_generations_share_extents_and_stand_alone() {
    use cryo_tests::faults::Xfs;
    const MIB: u32 = 256;
    let fs = Xfs::new(3 << 30);
    let store = StoreDir(fs.dir.join("store"));
    let rt = Runtime::cryo();
    let base = unique("reflink");
    let id = |n: usize| format!("{base}-{n}");
    let _guards: Vec<_> = (0..3).map(|n| rt.guard(&id(n))).collect();
    let c = Churn::start(&rt, &id(0), MIB);
    let checkpoint = |c: &Churn| {
        rt.ok(&[
            "checkpoint",
            "--store",
            store.path(),
            "--keep",
            "2",
            "--leave-running",
            &c.id,
        ])
    };
    let mut written_names = Vec::new();
    let mut held = HashMap::new();
    for round in 0..4 {
        let state = c.round();
        let (before, device_before) = (fs.used(), fs.device_written());
        let out = checkpoint(&c);
        let grew = fs.used().saturating_sub(before);
        let wrote = fs.device_written() - device_before;
        written_names.push(written(&out));
        held.insert(written(&out), state);
        if round > 0 {
            assert!(
                out.contains("sharing the extents of"),
                "round {round}: {out}"
            );
            // What changed is a few MiB; a quarter of the memory is far more than that and
            // far less than the whole dump (which a staged file written back would cost).
            assert!(
                grew < u64::from(MIB) << 18,
                "round {round}: a shared generation took {grew} bytes of the disk: {out}"
            );
            assert!(
                wrote < u64::from(MIB) << 18,
                "round {round}: a shared generation wrote {wrote} bytes to the disk: {out}"
            );
        }
    }
    let gens = ls(&rt, &store);
    let names: Vec<_> = gens
        .iter()
        .map(|g| g["generation"].as_str().unwrap())
        .collect();
    assert_eq!(names, written_names[2..], "{gens:#?}");
    for g in &gens {
        assert_eq!(g["kind"], "shared", "{gens:#?}");
        assert_eq!(g["verified"], true, "{gens:#?}");
        assert!(g["pages_shared"].as_u64().unwrap() > 0, "{gens:#?}");
        let dir = store.0.join(g["generation"].as_str().unwrap());
        assert!(
            std::fs::symlink_metadata(dir.join("parent")).is_err(),
            "{} has a parent link",
            dir.display()
        );
    }

    // Killed while it builds the shared pages image.
    c.round();
    let mut child = cryo_tests::faults::spawn(
        &rt,
        &[
            "checkpoint",
            "--store",
            store.path(),
            "--keep",
            "2",
            "--leave-running",
            &c.id,
        ],
    );
    let building = || {
        std::fs::read_dir(&store.0)
            .into_iter()
            .flatten()
            .flatten()
            .any(|staging| {
                std::fs::read_dir(staging.path())
                    .into_iter()
                    .flatten()
                    .flatten()
                    .any(|f| f.file_name().to_string_lossy().starts_with(".cryo-shared-"))
            })
    };
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the checkpoint ended before its shared pages image was seen: case not reached"
        );
        assert!(Instant::now() < end, "no shared pages image was ever built");
        if building() {
            break;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    signal(child.id() as i32, Signal::SIGKILL);
    let _ = child.wait();
    assert!(
        c.beating(Duration::from_secs(10)),
        "the container stopped beating"
    );
    let after = ls(&rt, &store);
    let after_names: Vec<_> = after
        .iter()
        .map(|g| g["generation"].as_str().unwrap())
        .collect();
    assert_eq!(after_names, names, "{after:#?}");
    assert!(after.iter().all(|g| g["verified"] == true), "{after:#?}");

    let state = c.round();
    let newest = written(&checkpoint(&c));
    let left: Vec<_> = std::fs::read_dir(&store.0)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.') && n != ".cryo-store.lock")
        .collect();
    assert!(left.is_empty(), "left in the store: {left:?}");
    assert_eq!(
        ls(&rt, &store).last().unwrap()["generation"],
        newest.as_str()
    );
    finish_off(c);
    let (r, stderr) = Churn::restore_from_store(&rt, &store.0, &id(1), MIB);
    assert!(!stderr.contains("falling back"), "{stderr}");
    r.assert_holds(&state);
    finish_off(r);

    // A byte of the newest generation's pages damaged (written in place, so the file system
    // gives that block its own extent): the one before it, which shares the rest, is
    // restored exactly, and the fallback is said.
    flip_a_byte_of_the_largest_file(&store.0.join(&newest));
    let (r, stderr) = Churn::restore_from_store(&rt, &store.0, &id(2), MIB);
    assert!(
        stderr.contains("falling back") && stderr.contains(&newest),
        "{stderr}"
    );
    r.assert_holds(&held[&written_names[3]]);
    finish_off(r);
}
