#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::json;

use super::*;
use crate::criu::{
    AcceptAll, CallObserver, CriuCall, CriuClient, CriuError, CriuOutcome, Features,
};

const OPEN_MODULE: &str = "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.159.04  Release Build  (dvs-builder@U16-I2-C04-12-1)  Wed Oct  1 00:00:00 UTC 2025\nGCC version:  gcc version 12.3.0 (Ubuntu 12.3.0-1ubuntu1~22.04)\n";
const PROPRIETARY: &str =
    "NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15  Tue Mar  5 22:23:56 UTC 2024\n";

fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

/// A proc dir with `version` (if given) and one GPU (if asked).
fn proc_dir(root: &Path, version: Option<&str>, gpu: bool) -> PathBuf {
    let p = root.join("proc-nvidia");
    std::fs::create_dir_all(p.join("gpus")).unwrap();
    if let Some(v) = version {
        std::fs::write(p.join("version"), v).unwrap();
    }
    if gpu {
        std::fs::create_dir_all(p.join("gpus/0000:00:1e.0")).unwrap();
    }
    p
}

const GOOD_HELP: &str = "echo 'CUDA checkpoint and restore utility.'; echo '--action lock | checkpoint | restore | unlock --pid <pid>'";

/// A machine with everything: driver, GPU, tool on PATH, plugin in a default dir.
fn full_machine(root: &Path) -> GpuLookup {
    let bin = root.join("bin");
    let plugins = root.join("plugins");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::create_dir_all(&plugins).unwrap();
    script(&bin, TOOL_NAME, GOOD_HELP);
    std::fs::write(plugins.join(PLUGIN_FILE), b"\x7fELF").unwrap();
    GpuLookup {
        proc_dir: proc_dir(root, Some(OPEN_MODULE), true),
        tool: None,
        search_path: Some(std::env::join_paths([root.join("nowhere"), bin]).unwrap()),
        plugin_dir: None,
        default_plugin_dirs: vec![root.join("none"), plugins],
    }
}

fn bare_machine(root: &Path) -> GpuLookup {
    GpuLookup {
        proc_dir: root.join("no-driver"),
        tool: None,
        search_path: Some(root.join("empty-bin").into_os_string()),
        plugin_dir: None,
        default_plugin_dirs: vec![root.join("no-plugins")],
    }
}

fn spec_with(patch: serde_json::Value) -> Spec {
    let mut v = serde_json::to_value(Spec::default()).unwrap();
    for (k, val) in patch.as_object().unwrap() {
        match k.as_str() {
            "devices" => v["linux"]["devices"] = val.clone(),
            "mounts" => {
                let mounts = v["mounts"].as_array_mut().unwrap();
                mounts.extend(val.as_array().unwrap().iter().cloned());
            }
            "hooks" => v["hooks"] = val.clone(),
            _ => unreachable!(),
        }
    }
    serde_json::from_value(v).unwrap()
}

fn gpu_spec() -> Spec {
    spec_with(json!({"devices": [
        {"path": "/dev/nvidiactl", "type": "c", "major": 195, "minor": 255},
        {"path": "/dev/nvidia0", "type": "c", "major": 195, "minor": 0},
        {"path": "/dev/null", "type": "c", "major": 1, "minor": 3},
    ]}))
}

#[test]
fn driver_versions_are_read_from_both_modules() {
    assert_eq!(
        parse_driver_version(OPEN_MODULE).as_deref(),
        Some("580.159.04")
    );
    assert_eq!(
        parse_driver_version(PROPRIETARY).as_deref(),
        Some("550.54.15")
    );
    assert_eq!(parse_driver_version("NVRM version: garbage\n"), None);
    assert_eq!(parse_driver_version(""), None);
}

#[test]
fn driver_missing_old_gpuless_or_fine() {
    let t = tempfile::tempdir().unwrap();
    let missing = t.path().join("absent");
    assert_eq!(
        driver_version(&missing),
        Err(Problem::NoDriver(missing.join("version")))
    );
    let old = proc_dir(
        &t.path().join("old"),
        Some(&PROPRIETARY.replace("550.54.15", "535.183.01")),
        true,
    );
    assert_eq!(
        driver_version(&old),
        Err(Problem::DriverTooOld("535.183.01".into()))
    );
    let junk = proc_dir(&t.path().join("junk"), Some("hello\n"), true);
    assert!(matches!(
        driver_version(&junk),
        Err(Problem::DriverUnreadable { .. })
    ));
    let no_gpu = proc_dir(&t.path().join("nogpu"), Some(OPEN_MODULE), false);
    assert_eq!(
        driver_version(&no_gpu),
        Err(Problem::NoGpu(no_gpu.join("gpus")))
    );
    let fine = proc_dir(&t.path().join("fine"), Some(PROPRIETARY), true);
    assert_eq!(driver_version(&fine).unwrap(), "550.54.15");
    let msg = Problem::DriverTooOld("535.183.01".into()).to_string();
    assert!(
        msg.contains("535.183.01") && msg.contains(">= 550"),
        "{msg}"
    );
}

#[test]
fn gpu_devices_come_from_devices_mounts_and_the_toolkit_hook() {
    assert!(gpu_devices(&Spec::default()).is_empty());
    assert_eq!(
        gpu_devices(&gpu_spec()),
        vec!["/dev/nvidiactl", "/dev/nvidia0"]
    );
    let mounted = spec_with(json!({"mounts": [
        {"destination": "/dev/nvidia-uvm", "type": "bind", "source": "/dev/nvidia-uvm"},
        {"destination": "/usr/local/nvidia/lib64", "type": "bind", "source": "/x"},
    ]}));
    assert_eq!(gpu_devices(&mounted), vec!["/dev/nvidia-uvm"]);
    let hooked = spec_with(json!({"hooks": {"prestart": [
        {"path": "/usr/bin/nvidia-container-runtime-hook", "args": ["prestart"]}
    ]}}));
    assert_eq!(
        gpu_devices(&hooked),
        vec!["/usr/bin/nvidia-container-runtime-hook hook"]
    );
}

#[test]
fn a_container_without_gpu_needs_nothing() {
    let t = tempfile::tempdir().unwrap();
    assert_eq!(
        preflight(&Spec::default(), &bare_machine(t.path())).unwrap(),
        None
    );
}

#[test]
fn a_gpu_container_on_a_bare_machine_is_refused_with_every_reason() {
    let t = tempfile::tempdir().unwrap();
    let e = preflight(&gpu_spec(), &bare_machine(t.path())).unwrap_err();
    let GpuError::Unavailable { devices, problems } = &e else {
        panic!("{e}")
    };
    assert_eq!(devices, "/dev/nvidiactl, /dev/nvidia0");
    assert!(matches!(problems[0], Problem::NoDriver(_)), "{problems:?}");
    assert!(
        matches!(problems[1], Problem::ToolMissing { .. }),
        "{problems:?}"
    );
    assert!(
        matches!(problems[2], Problem::PluginMissing { .. }),
        "{problems:?}"
    );
    let msg = e.to_string();
    for needle in [
        "no NVIDIA driver",
        "cuda-checkpoint was not found on PATH",
        "cuda_plugin.so",
        "--criu-plugin-dir",
    ] {
        assert!(msg.contains(needle), "{needle:?} missing from: {msg}");
    }
}

#[test]
fn a_gpu_container_on_a_full_machine_gets_a_plan() {
    let t = tempfile::tempdir().unwrap();
    let lookup = full_machine(t.path());
    let plan = preflight(&gpu_spec(), &lookup).unwrap().unwrap();
    assert_eq!(plan.driver_version, "580.159.04");
    assert_eq!(plan.tool, t.path().join("bin").join(TOOL_NAME));
    assert_eq!(plan.plugin_dir, t.path().join("plugins"));
    assert_eq!(plan.devices, vec!["/dev/nvidiactl", "/dev/nvidia0"]);
    assert!(!plan.tree_still_at_pre_dump());
    assert!(GpuSupport::probe(&lookup).problems().is_empty());
}

#[test]
fn the_tool_must_run_offer_action_and_carry_its_name() {
    let t = tempfile::tempdir().unwrap();
    let mut lookup = full_machine(t.path());
    let odd = t.path().join("odd");
    std::fs::create_dir_all(&odd).unwrap();

    lookup.tool = Some(script(
        &odd,
        TOOL_NAME,
        "echo 'CUDA checkpoint utility'; echo '--toggle --pid <pid>'",
    ));
    let e = GpuSupport::probe(&lookup).tool.unwrap_err();
    assert!(
        matches!(e, Problem::ToolUnusable { .. }) && e.to_string().contains("no --action"),
        "{e}"
    );

    std::fs::remove_file(odd.join(TOOL_NAME)).unwrap();
    lookup.tool = Some(script(
        &odd,
        TOOL_NAME,
        "echo 'libcuda.so.1: cannot open shared object file' >&2; exit 127",
    ));
    let e = GpuSupport::probe(&lookup).tool.unwrap_err();
    assert!(e.to_string().contains("libcuda.so.1"), "{e}");

    lookup.tool = Some(script(&odd, "cuda-checkpoint-570", GOOD_HELP));
    let e = GpuSupport::probe(&lookup).tool.unwrap_err();
    assert!(matches!(e, Problem::ToolMisnamed(_)), "{e}");

    lookup.tool = Some(odd.join("absent").join(TOOL_NAME));
    let e = GpuSupport::probe(&lookup).tool.unwrap_err();
    assert!(e.to_string().contains("--cuda-checkpoint"), "{e}");

    lookup.tool = Some(script(&odd, TOOL_NAME, GOOD_HELP));
    assert_eq!(
        GpuSupport::probe(&lookup).tool.unwrap(),
        odd.join(TOOL_NAME)
    );
}

#[test]
fn without_a_driver_the_tool_is_found_but_not_run() {
    let t = tempfile::tempdir().unwrap();
    let mut lookup = full_machine(t.path());
    lookup.proc_dir = t.path().join("no-driver");
    let marker = t.path().join("ran");
    lookup.tool = Some(script(
        &t.path().join("bin"),
        TOOL_NAME,
        &format!("touch {}", marker.display()),
    ));
    let s = GpuSupport::probe(&lookup);
    assert!(s.tool.is_ok() && s.plugin_dir.is_ok());
    assert!(matches!(s.driver, Err(Problem::NoDriver(_))));
    assert!(!marker.exists(), "the tool was run without a driver");
}

#[test]
fn a_named_plugin_dir_must_hold_the_plugin() {
    let t = tempfile::tempdir().unwrap();
    let mut lookup = full_machine(t.path());
    lookup.plugin_dir = Some(t.path().join("empty"));
    let e = GpuSupport::probe(&lookup).plugin_dir.unwrap_err();
    assert!(
        e.to_string()
            .contains(&t.path().join("empty").display().to_string()),
        "{e}"
    );
}

#[test]
fn restore_needs_a_gpu_bundle_for_an_image_with_cuda_state() {
    let t = tempfile::tempdir().unwrap();
    let img = t.path().join("img");
    let with_cuda = GpuRecord {
        cuda_pids: 1,
        ..Default::default()
    };
    let without_cuda = GpuRecord::default();
    let bare = bare_machine(t.path());
    let full = full_machine(t.path());
    let plain = Spec::default();
    assert!(matches!(
        restore_preflight(&plain, Some(&with_cuda), &img, &full),
        Err(GpuError::BundleHasNoGpu { .. })
    ));
    assert_eq!(
        restore_preflight(&plain, Some(&without_cuda), &img, &bare).unwrap(),
        None
    );
    assert_eq!(restore_preflight(&plain, None, &img, &bare).unwrap(), None);
    assert!(
        restore_preflight(&gpu_spec(), Some(&with_cuda), &img, &full)
            .unwrap()
            .is_some()
    );
    assert!(matches!(
        restore_preflight(&gpu_spec(), None, &img, &bare),
        Err(GpuError::Unavailable { .. })
    ));
}

#[test]
fn criu_gets_the_tool_directory_first_on_path() {
    let t = tempfile::tempdir().unwrap();
    let lookup = full_machine(t.path());
    let plan = preflight(&gpu_spec(), &lookup).unwrap().unwrap();
    let bin = t.path().join("bin");
    assert_eq!(plan.criu_path(Some(bin.as_os_str())), None);
    let path = plan
        .criu_path(Some(std::ffi::OsStr::new("/usr/bin:/bin")))
        .unwrap();
    assert_eq!(
        std::env::split_paths(&path).collect::<Vec<_>>(),
        vec![bin, PathBuf::from("/usr/bin"), PathBuf::from("/bin")]
    );
}

const DUMP_LOG: &str = "\
(00.083943) Plugin \"cuda_plugin\" (version 512 hooks 13)
(00.093543) cuda_plugin: initialized: cuda_plugin stage 0
(00.094504) Warn  (criu/seize.c:531): unfreezing cgroup for plugin compatibility
(00.179047) cuda_plugin: pausing devices on pid 6425
(00.215131) Seized task 6425, state 1
(00.257652) cuda_plugin: Checkpointing CUDA devices on pid 6425 restore_tid 6428
(00.293573) mnt: something
(00.413832) cuda_plugin: finished cuda_plugin stage 0 err 0
(00.453537) cuda_plugin: resuming devices on pid 6425
(00.453565) cuda_plugin: Restore thread pid 6428 found for real pid 6425
(00.510159) Unfreezing tasks into 1
";

#[test]
fn plugin_steps_are_timed_from_the_log() {
    let log = PluginLog::parse(DUMP_LOG);
    assert!(log.initialized);
    assert_eq!(log.cuda_pids, vec![6425]);
    assert!(log.errors.is_empty());
    let t = log.timings.unwrap();
    assert!((t.lock_ms - 36.084).abs() < 0.01, "{t:?}");
    assert!((t.checkpoint_ms - 35.921).abs() < 0.01, "{t:?}");
    assert!((t.resume_ms - 56.622).abs() < 0.01, "{t:?}");
}

#[test]
fn plugin_errors_exclude_processes_without_cuda() {
    let log = PluginLog::parse(
        "\
(00.100000) cuda_plugin: initialized: cuda_plugin stage 2
(00.200000) Error (cuda_plugin.c:239): cuda_plugin: Failed to launch cuda-checkpoint to retrieve restore tid: no such process
(00.200100) cuda_plugin: No need to resume devices on pid 11
(00.300000) cuda_plugin: resuming devices on pid 12
(00.900000) Error (cuda_plugin.c:510): cuda_plugin: RESUME_DEVICES RESTORE failed with out of memory
(00.900100) Restore finished successfully. Tasks resumed.
",
    );
    assert_eq!(log.errors.len(), 1, "{:?}", log.errors);
    assert!(log.errors[0].contains("RESUME_DEVICES RESTORE failed"));
    assert_eq!(log.cuda_pids, vec![12]);
    assert!((log.timings.unwrap().resume_ms - 600.0).abs() < 0.01);
}

#[test]
fn a_disabled_or_untimed_plugin_is_reported_as_such() {
    let log = PluginLog::parse(
        "(00.010000) Warn  (cuda_plugin.c:600): cuda_plugin: check that cuda-checkpoint is present in $PATH\n",
    );
    assert!(!log.initialized);
    assert!(log.disabled.unwrap().contains("cuda-checkpoint"));
    let untimed = PluginLog::parse("cuda_plugin: pausing devices on pid 5\nSeized task 5\n");
    assert_eq!(untimed.cuda_pids, vec![5]);
    assert_eq!(untimed.timings, None);
    assert_eq!(
        PluginLog::read(Path::new("/nonexistent/dump.log")),
        PluginLog::default()
    );
}

#[test]
fn a_stuck_tool_is_killed_at_its_deadline() {
    let t = tempfile::tempdir().unwrap();
    let slow = script(t.path(), "slow", "sleep 30");
    let started = std::time::Instant::now();
    let e = tool::run(&slow, &["--help"], Duration::from_millis(200)).unwrap_err();
    assert!(e.contains("did not finish") && e.contains("killed"), "{e}");
    assert!(started.elapsed() < Duration::from_secs(10));
}

/// A tool whose process 4242 has CUDA in `state`, logging its actions.
fn recovering_tool(dir: &Path, state: &str, failing: &str) -> (PathBuf, PathBuf) {
    let calls = dir.join("calls");
    let body = format!(
        r#"case "$1 $2" in
  "--get-restore-tid --pid") [ "$3" = 4242 ] && echo 4243 || exit 1 ;;
  "--get-state --pid") echo {state} ;;
  "--action "*) echo "$2 $4" >> {calls}; [ "$2" = "{failing}" ] && {{ echo "$2 refused"; exit 1; }}; true ;;
esac"#,
        calls = calls.display()
    );
    (script(dir, TOOL_NAME, &body), calls)
}

#[test]
fn recovery_brings_back_checkpointed_and_locked_processes_only() {
    let t = tempfile::tempdir().unwrap();
    let (tool, calls) = recovering_tool(t.path(), "checkpointed", "none");
    let notes = tool::recover(&tool, &[4242, 77]);
    assert_eq!(
        std::fs::read_to_string(&calls).unwrap(),
        "restore 4242\nunlock 4242\n"
    );
    assert_eq!(notes.len(), 1, "{notes:?}");
    assert!(
        notes[0].contains("was checkpointed, now running again"),
        "{notes:?}"
    );

    let t = tempfile::tempdir().unwrap();
    let (tool, calls) = recovering_tool(t.path(), "locked", "unlock");
    let notes = tool::recover(&tool, &[4242]);
    assert_eq!(std::fs::read_to_string(&calls).unwrap(), "unlock 4242\n");
    assert!(
        notes[0].contains("was locked; unlock failed: unlock refused"),
        "{notes:?}"
    );

    let t = tempfile::tempdir().unwrap();
    let (tool, calls) = recovering_tool(t.path(), "running", "none");
    assert!(tool::recover(&tool, &[4242]).is_empty());
    assert!(!calls.exists());
}

/// A CRIU that writes `log_text` as its log and succeeds.
struct LoggingCriu(&'static str);

impl CriuClient for LoggingCriu {
    fn version(&self) -> Result<u32, CriuError> {
        Ok(40201)
    }
    fn features(&self, _ask: Features) -> Result<Features, CriuError> {
        Ok(Features::default())
    }
    fn call(&self, call: CriuCall, _n: &mut dyn CallObserver) -> Result<CriuOutcome, CriuError> {
        std::fs::write(call.work_dir.join(call.kind.log_name()), self.0).unwrap();
        Ok(CriuOutcome {
            restored_pid: Some(12),
        })
    }
}

fn call(kind: crate::criu::CallKind, dir: &Path) -> CriuCall {
    CriuCall {
        kind,
        opts: crate::criu::rpc::Criu_opts::new(),
        images_dir: dir.to_path_buf(),
        work_dir: dir.to_path_buf(),
        extra_fds: Vec::new(),
        inherit_stdio: false,
        umask: None,
    }
}

#[test]
fn a_restore_whose_plugin_failed_is_a_failed_restore() {
    use crate::criu::CallKind;
    let t = tempfile::tempdir().unwrap();
    let failed = "(00.300000) cuda_plugin: resuming devices on pid 12\n(00.900000) Error (cuda_plugin.c:510): cuda_plugin: RESUME_DEVICES RESTORE failed with out of memory\n(00.900100) Restore finished successfully. Tasks resumed.\n";
    let inner = LoggingCriu(failed);
    let criu = GpuCriu::new(&inner);
    let e = criu
        .call(call(CallKind::Restore, t.path()), &mut AcceptAll)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("could not bring their GPU state back") && e.contains("out of memory"),
        "{e}"
    );
    assert_eq!(criu.last_plugin_log().unwrap().cuda_pids, vec![12]);

    let inner = LoggingCriu(DUMP_LOG);
    let criu = GpuCriu::new(&inner);
    let out = criu
        .call(call(CallKind::Restore, t.path()), &mut AcceptAll)
        .unwrap();
    assert_eq!(out.restored_pid, Some(12));
    assert!(criu.last_plugin_log().unwrap().timings.is_some());
}
