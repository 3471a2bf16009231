//! The command lines of `cryo checkpoint` and `cryo restore` for containerd's requests: the
//! runc shim's checkpoint options (`containerd.runc.v1.CheckpointOptions`), as go-runc turns
//! them into runc flags, plus the checkpoint defaults of the runtime's config.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::Message;
use containerd_shim::protos::shim::oci::CheckpointOptions;

use crate::options::CheckpointDefaults;

/// Type of the checkpoint options ctr and containerd's clients send to a runc-style shim.
pub const CHECKPOINT_OPTIONS_TYPE: &str = "containerd.runc.v1.CheckpointOptions";
/// What containerd 1.6's client sends instead for a runtime not named `io.containerd.runc.*`
/// (`WithCheckpointTaskExit`, `WithCheckpointImagePath`): the old linux runtime's message,
/// field for field the same as [`CHECKPOINT_OPTIONS_TYPE`] except that fields 8 and 9 are
/// work path and image path, the other way round.
pub const LINUX_CHECKPOINT_OPTIONS_TYPE: &str = "containerd.linux.runc.CheckpointOptions";

/// The checkpoint options of a request.
pub fn checkpoint_options(any: Option<&Any>) -> Result<CheckpointOptions, String> {
    let Some(any) = any.filter(|a| !a.type_url.is_empty()) else {
        return Ok(CheckpointOptions::default());
    };
    let name = any.type_url.rsplit('/').next().unwrap_or(&any.type_url);
    if name != CHECKPOINT_OPTIONS_TYPE && name != LINUX_CHECKPOINT_OPTIONS_TYPE {
        return Err(format!(
            "checkpoint options of type {:?} are not understood: containerd-shim-cryo-v1 takes \
             {CHECKPOINT_OPTIONS_TYPE} or {LINUX_CHECKPOINT_OPTIONS_TYPE}",
            any.type_url
        ));
    }
    let mut options = CheckpointOptions::parse_from_bytes(&any.value)
        .map_err(|e| format!("cannot decode the checkpoint options: {e}"))?;
    if name == LINUX_CHECKPOINT_OPTIONS_TYPE {
        std::mem::swap(&mut options.image_path, &mut options.work_path);
    }
    Ok(options)
}

/// Where a checkpoint goes and where its logs go.
pub struct CheckpointPaths {
    /// The image directory.
    pub image: PathBuf,
    /// The work directory (dump.log, stats-dump).
    pub work: PathBuf,
    /// The work directory is the shim's own, removed afterwards.
    pub work_is_temporary: bool,
}

/// The image goes where the options say (`ctr t checkpoint --image-path`), else where
/// containerd asked (its temporary directory, which it then stores as the checkpoint's
/// content); the work directory likewise, else `<bundle>/criu-work`, as with the runc shim.
pub fn checkpoint_paths(
    request_path: &str,
    options: &CheckpointOptions,
    bundle: &Path,
) -> Result<CheckpointPaths, String> {
    let image = if !options.image_path.is_empty() {
        PathBuf::from(&options.image_path)
    } else if !request_path.is_empty() {
        PathBuf::from(request_path)
    } else {
        return Err("checkpoint request names no image path".into());
    };
    let (work, work_is_temporary) = if options.work_path.is_empty() {
        (bundle.join("criu-work"), true)
    } else {
        (PathBuf::from(&options.work_path), false)
    };
    Ok(CheckpointPaths {
        image,
        work,
        work_is_temporary,
    })
}

/// `cryo checkpoint` arguments (after the verb).
pub fn checkpoint_args(
    id: &str,
    paths: &CheckpointPaths,
    options: &CheckpointOptions,
    defaults: &CheckpointDefaults,
) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec![
        "--image-path".into(),
        paths.image.clone().into(),
        "--work-path".into(),
        paths.work.clone().into(),
    ];
    let mut flag = |on: bool, name: &str| {
        if on {
            args.push(name.into());
        }
    };
    flag(options.open_tcp, "--tcp-established");
    flag(options.external_unix_sockets, "--ext-unix-sk");
    flag(options.terminal, "--shell-job");
    flag(options.file_locks, "--file-locks");
    flag(!options.exit, "--leave-running");
    flag(defaults.compress_pages, "--compress-pages");
    flag(!defaults.page_staging, "--no-page-staging");
    if !options.cgroups_mode.is_empty() {
        args.push("--manage-cgroups-mode".into());
        args.push(options.cgroups_mode.clone().into());
    }
    for ns in &options.empty_namespaces {
        args.push("--empty-ns".into());
        args.push(ns.into());
    }
    args.push("--rootfs-snapshot".into());
    args.push(defaults.rootfs_snapshot.as_arg().into());
    args.push(id.into());
    args
}

/// What a restore needs besides the container's id and bundle.
pub struct RestoreRequest {
    /// The image directory (containerd's extraction of the checkpoint).
    pub image: PathBuf,
    /// A parent checkpoint, if containerd named one.
    pub parent: Option<PathBuf>,
}

/// `cryo restore` arguments (after the verb): detached, the pid into `pid_file`.
#[allow(clippy::too_many_arguments)]
pub fn restore_args(
    id: &str,
    bundle: &Path,
    request: &RestoreRequest,
    work: &Path,
    pid_file: &Path,
    console_socket: Option<&Path>,
    no_pivot: bool,
) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec![
        "--image-path".into(),
        request.image.clone().into(),
        "--work-path".into(),
        work.into(),
        "--detach".into(),
        "--pid-file".into(),
        pid_file.into(),
    ];
    if let Some(parent) = &request.parent {
        args.push("--parent-path".into());
        args.push(parent.into());
    }
    if let Some(socket) = console_socket {
        args.push("--console-socket".into());
        args.push(socket.into());
    }
    if no_pivot {
        args.push("--no-pivot".into());
    }
    args.push("--bundle".into());
    args.push(bundle.into());
    args.push(id.into());
    args
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::options::RootfsSnapshot;

    fn strings(args: &[OsString]) -> Vec<String> {
        args.iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn ctr_c_checkpoint_leaves_the_task_running_with_the_defaults() {
        let options = CheckpointOptions::default();
        let paths =
            checkpoint_paths("/tmp/ctd-checkpoint1", &options, Path::new("/b")).expect("paths");
        assert!(paths.work_is_temporary);
        let args = checkpoint_args("c1", &paths, &options, &CheckpointDefaults::default());
        assert_eq!(
            strings(&args),
            [
                "--image-path",
                "/tmp/ctd-checkpoint1",
                "--work-path",
                "/b/criu-work",
                "--leave-running",
                "--rootfs-snapshot",
                "auto",
                "c1"
            ]
        );
    }

    #[test]
    fn every_runc_option_becomes_its_flag() {
        let options = CheckpointOptions {
            exit: true,
            open_tcp: true,
            external_unix_sockets: true,
            terminal: true,
            file_locks: true,
            empty_namespaces: vec!["network".into()],
            cgroups_mode: "soft".into(),
            image_path: "/img".into(),
            work_path: "/work".into(),
            ..Default::default()
        };
        let paths = checkpoint_paths("/tmp/ctd", &options, Path::new("/b")).expect("paths");
        assert_eq!(paths.image, PathBuf::from("/img"));
        assert!(!paths.work_is_temporary);
        let defaults = CheckpointDefaults {
            rootfs_snapshot: RootfsSnapshot::None,
            page_staging: false,
            compress_pages: true,
        };
        let args = strings(&checkpoint_args("c1", &paths, &options, &defaults));
        assert_eq!(
            args,
            [
                "--image-path",
                "/img",
                "--work-path",
                "/work",
                "--tcp-established",
                "--ext-unix-sk",
                "--shell-job",
                "--file-locks",
                "--compress-pages",
                "--no-page-staging",
                "--manage-cgroups-mode",
                "soft",
                "--empty-ns",
                "network",
                "--rootfs-snapshot",
                "none",
                "c1"
            ]
        );
        assert!(!args.contains(&"--leave-running".to_string()));
    }

    #[test]
    fn options_of_another_type_are_refused() {
        let mut any = Any::new();
        any.type_url = "io.containerd.runhcs.v1.CheckpointOptions".into();
        let err = checkpoint_options(Some(&any)).expect_err("foreign type");
        assert!(err.contains(CHECKPOINT_OPTIONS_TYPE), "{err}");
        let mut ours = Any::new();
        ours.type_url = format!("type.googleapis.com/{CHECKPOINT_OPTIONS_TYPE}");
        ours.value = CheckpointOptions {
            exit: true,
            image_path: "/img".into(),
            work_path: "/work".into(),
            ..Default::default()
        }
        .write_to_bytes()
        .expect("encode");
        let runc = checkpoint_options(Some(&ours)).expect("ours");
        assert!(runc.exit);
        assert_eq!(
            (runc.image_path.as_str(), runc.work_path.as_str()),
            ("/img", "/work")
        );
        // The same bytes as the linux runtime's message: fields 8 and 9 swap meaning.
        ours.type_url = LINUX_CHECKPOINT_OPTIONS_TYPE.into();
        let linux = checkpoint_options(Some(&ours)).expect("linux runtime's");
        assert!(linux.exit);
        assert_eq!(
            (linux.image_path.as_str(), linux.work_path.as_str()),
            ("/work", "/img")
        );
        assert!(!checkpoint_options(None).expect("none").exit);
    }

    #[test]
    fn a_request_without_any_path_is_refused() {
        let err = checkpoint_paths("", &CheckpointOptions::default(), Path::new("/b"))
            .err()
            .expect("no path");
        assert!(err.contains("image path"), "{err}");
    }

    #[test]
    fn restore_is_detached_with_its_pid_file() {
        let request = RestoreRequest {
            image: PathBuf::from("/tmp/ctrd-checkpoint2"),
            parent: None,
        };
        let args = strings(&restore_args(
            "c2",
            Path::new("/b"),
            &request,
            Path::new("/b/work"),
            Path::new("/b/init.pid"),
            Some(Path::new("/tmp/s/console.sock")),
            false,
        ));
        assert_eq!(
            args,
            [
                "--image-path",
                "/tmp/ctrd-checkpoint2",
                "--work-path",
                "/b/work",
                "--detach",
                "--pid-file",
                "/b/init.pid",
                "--console-socket",
                "/tmp/s/console.sock",
                "--bundle",
                "/b",
                "c2"
            ]
        );
    }
}
