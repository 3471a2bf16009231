//! GPU containers on a machine without a GPU (CI's): the bundle generator, the refusals (no
//! NVIDIA driver here), and the whole CUDA path through CRIU's real CUDA plugin with a fake
//! driver (`tests/gpu/with-fake-nvidia-driver`: a tmpfs on /proc/driver in a private mount
//! namespace, which cryo's preflight and the plugin both read) and a fake `cuda-checkpoint`
//! (`tests/gpu/fake-cuda-checkpoint`) acting on `tests/gpu/cpu-counter`, the CPU twin of
//! examples/gpu-counter.cu. The real GPU check is scripts/gpu-check.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use cryo_tests::runtime::{freezer_state, spawn_with_pipe, Lines};
use cryo_tests::{unique, workspace, Bundle, Runtime};

/// The plugin scripts/setup builds.
const PLUGIN: &str = "/opt/cryo/criu/plugins/cuda_plugin.so";

/// tests/gpu/cpu-counter.c, built once (static) for every test here, in cargo's test scratch
/// directory under target/.
fn counter() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        let (building, out) = (dir.join(unique("cpu-counter")), dir.join("cpu-counter"));
        let st = Command::new("cc")
            .args(["-O2", "-static", "-pthread", "-o"])
            .arg(&building)
            .arg(workspace().join("tests/gpu/cpu-counter.c"))
            .status()
            .expect("cc is missing: run scripts/setup (installs build-essential)");
        assert!(st.success(), "building tests/gpu/cpu-counter.c failed");
        std::fs::rename(&building, &out).unwrap();
        out
    })
}

/// A parsed `tick=N ok=1 …` line.
fn tick(line: &str) -> Option<(u64, bool)> {
    let n = line
        .strip_prefix("tick=")?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some((n, line.contains(" ok=1 ")))
}

/// Wait for a tick line numbered at least `min`; every tick line seen must say ok=1.
fn wait_tick(lines: &Lines, min: u64, timeout: Duration) -> u64 {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if let Some(l) = lines.next(Duration::from_millis(200)) {
            if let Some((n, ok)) = tick(&l) {
                assert!(ok, "the counter's memory check failed: {l}");
                if n >= min {
                    return n;
                }
            }
        }
    }
    panic!("no tick >= {min} within {timeout:?}");
}

/// Fake NVIDIA devices and libraries, the fake tool, and its state.
struct Rig {
    dir: PathBuf,
}

impl Rig {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(unique("cryo-gpu-rig"));
        for d in ["dev", "lib", "bin", "cuda-state", "no-plugins"] {
            std::fs::create_dir_all(dir.join(d)).unwrap();
        }
        for (name, major, minor) in [
            ("nvidiactl", 195, 255),
            ("nvidia0", 195, 0),
            ("nvidia-uvm", 510, 0),
            ("nvidia-uvm-tools", 510, 1),
        ] {
            let st = Command::new("mknod")
                .arg(dir.join("dev").join(name))
                .args(["c", &major.to_string(), &minor.to_string()])
                .status()
                .unwrap();
            assert!(st.success(), "mknod {name}");
        }
        std::fs::write(dir.join("lib/libcuda.so.1"), "fake libcuda\n").unwrap();
        std::fs::write(dir.join("lib/libnvidia-ml.so.1"), "fake libnvidia-ml\n").unwrap();
        std::fs::copy(
            workspace().join("tests/gpu/fake-cuda-checkpoint"),
            dir.join("bin/cuda-checkpoint"),
        )
        .unwrap();
        Self { dir }
    }

    fn tool(&self) -> PathBuf {
        self.dir.join("bin/cuda-checkpoint")
    }

    /// examples/gpu-bundle.sh for `program args`, with FAKE_CUDA_ID=`cuda_id` in its env.
    fn bundle(&self, name: &str, cuda_id: &str, args: &[&str], extra: &[(&str, &str)]) -> PathBuf {
        let b = self.dir.join(name);
        let (flags, program) = match args.first() {
            Some(&"--no-cgroup-mount") => (&args[..1], &args[1..]),
            _ => (&args[..0], args),
        };
        let out = Command::new(workspace().join("examples/gpu-bundle.sh"))
            .args(flags)
            .args(["--env", &format!("FAKE_CUDA_ID={cuda_id}")])
            .arg(&b)
            .args(program)
            .env("CRYO", cryo_tests::cryo_bin())
            .env("NVIDIA_DEV_DIR", self.dir.join("dev"))
            .env("NVIDIA_LIB_DIR", self.dir.join("lib"))
            .envs(extra.iter().copied())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "gpu-bundle.sh failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        b
    }

    /// `cryo --root … --cuda-checkpoint <fake> ARGS` on a machine with the fake driver.
    fn with_driver(&self, rt: &Runtime, args: &[&str], env: &[(&str, &str)]) -> Command {
        let mut c = Command::new(workspace().join("tests/gpu/with-fake-nvidia-driver"));
        c.arg(&rt.bin)
            .arg("--root")
            .arg(&rt.root)
            .arg("--cuda-checkpoint")
            .arg(self.tool())
            .args(args)
            .env("FAKE_CUDA_DIR", self.dir.join("cuda-state"))
            .envs(env.iter().copied());
        c
    }

    fn run(&self, rt: &Runtime, args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
        let out = self.with_driver(rt, args, env).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !stderr.contains("panicked"),
            "cryo {args:?} panicked: {stderr}"
        );
        out
    }

    fn ok(&self, rt: &Runtime, args: &[&str], env: &[(&str, &str)]) -> String {
        let out = self.run(rt, args, env);
        assert!(
            out.status.success(),
            "cryo {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn fails(&self, rt: &Runtime, args: &[&str], env: &[(&str, &str)]) -> String {
        let out = self.run(rt, args, env);
        assert!(!out.status.success(), "cryo {args:?} should have failed");
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// The fake tool's actions: "<action> <id> <pid>" lines.
    fn calls(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.join("cuda-state/calls"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// The fake CUDA state of `pid`.
    fn cuda_state(&self, pid: i64) -> String {
        std::fs::read_to_string(self.dir.join(format!("cuda-state/state.{pid}")))
            .unwrap_or_else(|_| "running".into())
            .trim()
            .to_string()
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn features(out: &str) -> serde_json::Value {
    let v: serde_json::Value = serde_json::from_str(out).unwrap();
    v["annotations"].clone()
}

fn pid_of(rt: &Runtime, id: &str) -> i64 {
    rt.state(id)["pid"].as_i64().unwrap()
}

#[test]
fn setup_built_the_cuda_plugin_and_features_say_what_gpu_checkpointing_lacks() {
    let rt = Runtime::cryo();
    let elf = std::fs::read(PLUGIN).unwrap_or_else(|e| {
        panic!("{PLUGIN}: {e}: scripts/setup builds CRIU's CUDA plugin (make cuda_plugin)")
    });
    assert!(
        elf.starts_with(b"\x7fELF"),
        "{PLUGIN} is not a shared object"
    );

    let here = features(&rt.ok(&["features"]));
    let gpu = here["io.cryo.checkpoint.gpu"].as_str().unwrap();
    assert!(
        gpu.starts_with("unavailable: no NVIDIA driver is loaded"),
        "{gpu}"
    );
    assert_eq!(here["io.cryo.checkpoint.gpu.criu-plugin"], PLUGIN);

    let rig = Rig::new();
    let faked = features(&rig.ok(&rt, &["features"], &[]));
    assert_eq!(faked["io.cryo.checkpoint.gpu"], "available", "{faked}");
    assert_eq!(faked["io.cryo.checkpoint.gpu.driver"], "580.159.04");
    assert_eq!(
        faked["io.cryo.checkpoint.gpu.cuda-checkpoint"],
        rig.tool().display().to_string()
    );

    let no_plugin = rig.dir.join("no-plugins");
    let out = rig.ok(
        &rt,
        &["--criu-plugin-dir", no_plugin.to_str().unwrap(), "features"],
        &[],
    );
    let gpu = features(&out)["io.cryo.checkpoint.gpu"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        gpu.contains("cuda_plugin.so) is not in") && gpu.contains("no-plugins"),
        "{gpu}"
    );
    let out = rig.ok(&rt, &["features"], &[("FAKE_CUDA_OLD", "1")]);
    let gpu = features(&out)["io.cryo.checkpoint.gpu"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(gpu.contains("offers no --action"), "{gpu}");
}

#[test]
fn the_bundle_generator_gives_devices_rules_and_read_only_driver_libraries() {
    let rt = Runtime::cryo();
    let rig = Rig::new();
    let script = "ls -ln /dev/nvidia0 /dev/nvidiactl /dev/nvidia-uvm; \
                  cat /usr/local/nvidia/lib64/libcuda.so.1; echo \"LD=$LD_LIBRARY_PATH\"; \
                  touch /usr/local/nvidia/lib64/libcuda.so.1 2>/dev/null || echo read-only";
    let b = rig.bundle("b-files", "x", &["/bin/busybox", "sh", "-c", script], &[]);
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(b.join("config.json")).unwrap()).unwrap();
    let devices = cfg["linux"]["devices"].as_array().unwrap();
    let dev = |p: &str| devices.iter().find(|d| d["path"] == p).cloned();
    let ctl = dev("/dev/nvidiactl").unwrap();
    assert_eq!(
        (
            ctl["type"].as_str(),
            ctl["major"].as_i64(),
            ctl["minor"].as_i64()
        ),
        (Some("c"), Some(195), Some(255))
    );
    assert_eq!(dev("/dev/nvidia-uvm").unwrap()["major"], 510);
    assert_eq!(devices.len(), 4, "{devices:?}");
    let rules = cfg["linux"]["resources"]["devices"].as_array().unwrap();
    for (major, minor) in [(195, 255), (195, 0), (510, 0), (510, 1)] {
        assert!(
            rules.iter().any(|r| r["allow"] == true
                && r["major"] == major
                && r["minor"] == minor
                && r["access"] == "rwm"),
            "no rule for {major}:{minor}: {rules:?}"
        );
    }
    let binds: Vec<&serde_json::Value> = cfg["mounts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["type"] == "bind")
        .collect();
    assert_eq!(binds.len(), 2, "one bind per driver library: {binds:?}");
    for m in &binds {
        assert!(m["destination"]
            .as_str()
            .unwrap()
            .starts_with("/usr/local/nvidia/lib64/lib"));
        assert!(
            m["options"].as_array().unwrap().iter().any(|o| o == "ro"),
            "{m}"
        );
    }
    let namespaces = cfg["linux"]["namespaces"].to_string();
    assert!(!namespaces.contains("network"), "{namespaces}");
    assert!(cfg["mounts"].to_string().contains("/sys/fs/cgroup"));
    let env = cfg["process"]["env"].to_string();
    assert!(
        env.contains("FAKE_CUDA_ID=x") && env.contains("LD_LIBRARY_PATH=/usr/local/nvidia/lib64:"),
        "{env}"
    );
    assert!(b.join("rootfs/app/busybox").exists() && b.join("rootfs/bin/sh").exists());

    let run_id = unique("gpu-bundle");
    let _g = rt.guard(&run_id);
    let out = rt.ok(&["run", "--bundle", b.to_str().unwrap(), &run_id]);
    assert!(
        out.contains("195,   0") && out.contains("195, 255") && out.contains("510,   0"),
        "{out}"
    );
    assert!(
        out.contains("fake libcuda") && out.contains("read-only"),
        "{out}"
    );
    assert!(out.contains("LD=/usr/local/nvidia/lib64:"), "{out}");

    // A driver library directory of its own is mounted whole; the cgroup mount can go.
    let nvidia = rig.dir.join("nvidia/lib64");
    std::fs::create_dir_all(&nvidia).unwrap();
    std::fs::copy(
        rig.dir.join("lib/libcuda.so.1"),
        nvidia.join("libcuda.so.1"),
    )
    .unwrap();
    let b2 = rig.bundle(
        "b-dir",
        "x",
        &["--no-cgroup-mount", "/bin/busybox", "true"],
        &[("NVIDIA_LIB_DIR", nvidia.to_str().unwrap())],
    );
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(b2.join("config.json")).unwrap()).unwrap();
    let mounts = cfg["mounts"].to_string();
    assert!(
        mounts.contains(&format!("\"source\":\"{}\"", nvidia.display())),
        "{mounts}"
    );
    assert!(!mounts.contains("/sys/fs/cgroup"), "{mounts}");

    // No device nodes: a clear error, no bundle.
    let out = Command::new(workspace().join("examples/gpu-bundle.sh"))
        .arg(rig.dir.join("b-none"))
        .arg("/bin/busybox")
        .env("NVIDIA_DEV_DIR", rig.dir.join("lib"))
        .env("NVIDIA_LIB_DIR", rig.dir.join("lib"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("nvidiactl"));
}

#[test]
fn a_gpu_container_is_refused_before_the_freeze_where_gpu_checkpointing_is_unavailable() {
    let rt = Runtime::cryo();
    let rig = Rig::new();
    let b = rig.bundle("b", "refused", &[counter().to_str().unwrap()], &[]);
    let id = unique("gpu-refused");
    let _g = rt.guard(&id);
    let lines = rt.spawn_with_pipe(&["run", "-d", "--bundle", b.to_str().unwrap(), &id]);
    let mut n = wait_tick(&lines, 2, Duration::from_secs(20));
    let pid = pid_of(&rt, &id);
    let img = rig.dir.join("img");
    let img_s = img.to_str().unwrap();
    let mut still_running = |what: &str| {
        assert_eq!(rt.state(&id)["status"], "running", "after {what}");
        assert_eq!(freezer_state(pid), "THAWED", "after {what}");
        n = wait_tick(&lines, n + 1, Duration::from_secs(5));
        assert!(!img.exists(), "{what}: the image dir was created");
    };

    let e = rt.fails(&["checkpoint", "--image-path", img_s, &id]);
    assert!(e.contains("uses an NVIDIA GPU (/dev/nvidiactl"), "{e}");
    assert!(
        e.contains("no NVIDIA driver is loaded (/proc/driver/nvidia/version is missing)"),
        "{e}"
    );
    still_running("no driver");

    let no_plugin = rig.dir.join("no-plugins");
    let args = [
        "--criu-plugin-dir",
        no_plugin.to_str().unwrap(),
        "checkpoint",
        "--image-path",
        img_s,
        &id,
    ];
    let e = rig.fails(&rt, &args, &[]);
    assert!(
        e.contains("cuda_plugin.so) is not in") && !e.contains("driver"),
        "{e}"
    );
    still_running("no plugin");

    let e = rig.fails(
        &rt,
        &["checkpoint", "--pre-dump", "--image-path", img_s, &id],
        &[],
    );
    assert!(e.contains("does not take part in pre-dumps"), "{e}");
    still_running("pre-dump");

    // An image without CUDA state into a GPU bundle: the bundle's GPU needs the driver too.
    let plain = Bundle::busybox(&["sleep", "1000"]);
    let pid_plain = unique("plain");
    let _gp = rt.guard(&pid_plain);
    let _plain_lines = rt.spawn_with_pipe(&[
        "run",
        "-d",
        "--bundle",
        plain.dir.to_str().unwrap(),
        &pid_plain,
    ]);
    let plain_img = plain.dir.join("img");
    rt.ok(&[
        "checkpoint",
        "--image-path",
        plain_img.to_str().unwrap(),
        &pid_plain,
    ]);
    let restored = unique("gpu-restore-refused");
    let e = rt.fails(&[
        "restore",
        "-d",
        "--bundle",
        b.to_str().unwrap(),
        "--image-path",
        plain_img.to_str().unwrap(),
        &restored,
    ]);
    assert!(
        e.contains("cannot restore container") && e.contains("no NVIDIA driver"),
        "{e}"
    );
    assert!(rt.fails(&["state", &restored]).contains("does not exist"));
}

#[test]
fn checkpoint_and_restore_go_through_crius_cuda_plugin() {
    let rt = Runtime::cryo();
    let rig = Rig::new();
    let b = rig.bundle("b", "through", &[counter().to_str().unwrap()], &[]);
    let (id, copy) = (unique("gpu-c1"), unique("gpu-c2"));
    let (_g, _g2) = (rt.guard(&id), rt.guard(&copy));
    let lines = rt.spawn_with_pipe(&["run", "-d", "--bundle", b.to_str().unwrap(), &id]);
    wait_tick(&lines, 3, Duration::from_secs(20));
    let pid = pid_of(&rt, &id);

    let img1 = rig.dir.join("img1");
    rig.ok(
        &rt,
        &[
            "checkpoint",
            "--leave-running",
            "--image-path",
            img1.to_str().unwrap(),
            &id,
        ],
        &[],
    );
    let since = lines.drain(Duration::from_millis(300));
    assert!(
        since.iter().filter_map(|l| tick(l)).all(|(_, ok)| ok),
        "{since:?}"
    );
    let at_checkpoint = since
        .iter()
        .filter_map(|l| tick(l))
        .map(|(n, _)| n)
        .max()
        .unwrap();
    let calls = rig.calls();
    let expect: Vec<String> = ["lock", "checkpoint", "restore", "unlock"]
        .iter()
        .map(|a| format!("{a} through {pid}"))
        .collect();
    assert_eq!(
        calls, expect,
        "the plugin's steps on the container's process"
    );
    assert_eq!(rig.cuda_state(pid), "running");
    assert_eq!(freezer_state(pid), "THAWED");
    wait_tick(&lines, at_checkpoint + 2, Duration::from_secs(5));
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(img1.join("cryo-manifest.json")).unwrap()).unwrap();
    let gpu = &m["gpu"];
    assert_eq!(gpu["driver_version"], "580.159.04", "{gpu}");
    assert_eq!(gpu["cuda_pids"], 1, "{gpu}");
    assert!(gpu["devices"].to_string().contains("/dev/nvidia0"), "{gpu}");
    for step in ["lock_ms", "checkpoint_ms", "resume_ms"] {
        assert!(gpu["plugin_timings"][step].as_f64().unwrap() > 0.0, "{gpu}");
    }
    let log = std::fs::read_to_string(img1.join("dump.log")).unwrap();
    assert!(
        log.contains("unfreezing cgroup for plugin compatibility"),
        "CRIU did not load the plugin in interrupt mode"
    );

    // A copy under a new id, from the image of the running container.
    let restore = |img: &Path, as_id: &str, env: &[(&str, &str)]| {
        spawn_with_pipe(rig.with_driver(
            &rt,
            &[
                "restore",
                "-d",
                "--bundle",
                b.to_str().unwrap(),
                "--image-path",
                img.to_str().unwrap(),
                as_id,
            ],
            env,
        ))
    };
    let copy_lines = restore(&img1, &copy, &[]);
    let first = wait_tick(&copy_lines, 1, Duration::from_secs(10));
    assert!(
        first > 3 && first <= at_checkpoint + 1,
        "copy started at {first}, checkpoint before {at_checkpoint}"
    );
    let copy_pid = pid_of(&rt, &copy);
    assert_eq!(
        rig.calls()[4..],
        [
            format!("restore through {copy_pid}"),
            format!("unlock through {copy_pid}")
        ]
    );
    assert_eq!(rig.cuda_state(copy_pid), "running");
    wait_tick(&copy_lines, first + 2, Duration::from_secs(5));
    rt.ok(&["delete", "--force", &copy]);

    // Stopped by the checkpoint, restored in place (same id, same bundle) where it stopped.
    let img2 = rig.dir.join("img2");
    rig.ok(
        &rt,
        &["checkpoint", "--image-path", img2.to_str().unwrap(), &id],
        &[],
    );
    let last = lines
        .drain(Duration::from_secs(3))
        .iter()
        .filter_map(|l| tick(l))
        .map(|(n, _)| n)
        .max()
        .unwrap();
    assert!(rt.fails(&["state", &id]).contains("does not exist"));
    let plain = Bundle::busybox(&["true"]);
    let e = rig.fails(
        &rt,
        &[
            "restore",
            "-d",
            "--bundle",
            plain.dir.to_str().unwrap(),
            "--image-path",
            img2.to_str().unwrap(),
            &unique("nogpu"),
        ],
        &[],
    );
    assert!(
        e.contains("holds CUDA state") && e.contains("no /dev/nvidia* device"),
        "{e}"
    );
    let again = restore(&img2, &id, &[]);
    assert_eq!(
        wait_tick(&again, 1, Duration::from_secs(10)),
        last + 1,
        "the counter must continue"
    );
    assert_eq!(rig.cuda_state(pid_of(&rt, &id)), "running");
}

#[test]
fn plugin_failures_leave_the_container_running_with_its_cuda_state_usable() {
    let rt = Runtime::cryo();
    let rig = Rig::new();
    let b = rig.bundle("b", "fail", &[counter().to_str().unwrap()], &[]);
    let id = unique("gpu-fail");
    let _g = rt.guard(&id);
    let lines = rt.spawn_with_pipe(&["run", "-d", "--bundle", b.to_str().unwrap(), &id]);
    let mut n = wait_tick(&lines, 2, Duration::from_secs(20));
    let pid = pid_of(&rt, &id);
    let img = rig.dir.join("img");
    let args = ["checkpoint", "--image-path", img.to_str().unwrap(), &id];
    let mut intact = |what: &str| {
        assert_eq!(rt.state(&id)["status"], "running", "after {what}");
        assert_eq!(freezer_state(pid), "THAWED", "after {what}");
        assert_eq!(rig.cuda_state(pid), "running", "after {what}");
        assert!(!img.join("cryo-manifest.json").exists(), "after {what}");
        n = wait_tick(&lines, n + 1, Duration::from_secs(5));
    };

    let e = rig.fails(&rt, &args, &[("FAKE_CUDA_FAIL", "lock")]);
    assert!(
        e.contains("PAUSE_DEVICES failed with fake cuda-checkpoint: lock failed"),
        "{e}"
    );
    assert!(e.contains("thawed and keeps running"), "{e}");
    intact("a failed lock");

    // CRIU's plugin then tries to restore a process that is only locked and leaves it
    // locked; cryo unlocks it.
    let e = rig.fails(&rt, &args, &[("FAKE_CUDA_FAIL", "checkpoint")]);
    assert!(e.contains("CHECKPOINT_DEVICES failed"), "{e}");
    assert!(
        e.contains(&format!(
            "pid {pid}: its CUDA state was locked, now running again"
        )),
        "{e}"
    );
    intact("a failed checkpoint step");

    let e = rig.fails(&rt, &args, &[("FAKE_CUDA_KILL_CRIU_AFTER", "checkpoint")]);
    assert!(e.contains("CRIU closed the connection"), "{e}");
    assert!(
        e.contains(&format!(
            "pid {pid}: its CUDA state was checkpointed, now running again"
        )),
        "{e}"
    );
    intact("CRIU killed inside the plugin");

    // A restore whose plugin cannot bring the GPU state back fails and leaves nothing.
    let good = rig.dir.join("good");
    rig.ok(
        &rt,
        &[
            "checkpoint",
            "--leave-running",
            "--image-path",
            good.to_str().unwrap(),
            &id,
        ],
        &[],
    );
    let copy = unique("gpu-fail-copy");
    let _gc = rt.guard(&copy);
    let before = rig.calls().len();
    let e = rig.fails(
        &rt,
        &[
            "restore",
            "-d",
            "--bundle",
            b.to_str().unwrap(),
            "--image-path",
            good.to_str().unwrap(),
            &copy,
        ],
        &[("FAKE_CUDA_FAIL", "restore")],
    );
    assert!(
        e.contains("could not bring their GPU state back") && e.contains("restore failed"),
        "{e}"
    );
    assert!(rt.fails(&["state", &copy]).contains("does not exist"));
    let restored_pid: i64 = rig.calls()[before]
        .split_whitespace()
        .nth(2)
        .unwrap()
        .parse()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    // Dead: gone, or a zombie left to whoever adopted it once cryo exited.
    let stat = std::fs::read_to_string(format!("/proc/{restored_pid}/stat")).unwrap_or_default();
    let state = stat
        .rsplit(')')
        .next()
        .and_then(|r| r.split_whitespace().next());
    assert!(
        matches!(state, None | Some("Z")),
        "the restored process was left: {stat}"
    );
    intact("a failed restore of a copy");
}
