//! OOM kills in a container's memory cgroup, reported as containerd's `/tasks/oom` event (the
//! CRI plugin turns it into the "OOMKilled" reason). cgroup v1: an eventfd registered on
//! `memory.oom_control`, as the runc shim does; cgroup v2: `memory.events`, whose `oom_kill`
//! count grows, watched with inotify. One thread per container, ending with its cgroup.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::thread;

use containerd_shim::warn;
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};

/// Watch the memory cgroup of `pid` (the container's init) and call `on_oom` for every OOM
/// kill. A host without a memory controller, or a cgroup that cannot be watched, only leaves
/// a warning: the task runs on without OOM events.
pub fn watch(pid: i32, on_oom: impl Fn() + Send + 'static) {
    let dirs = match cryo_cgroup::v1_controller_paths(pid) {
        Ok(dirs) => dirs,
        Err(e) => {
            warn!("no OOM events for pid {pid}: {e}");
            return;
        }
    };
    let memory_v1 = dirs
        .iter()
        .find(|(controllers, _)| controllers.split(',').any(|c| c == "memory"));
    let result = match memory_v1 {
        Some((_, dir)) => watch_v1(dir.clone(), on_oom),
        None => match dirs.iter().find(|(controllers, _)| controllers.is_empty()) {
            Some((_, dir)) if dir.join("memory.events").exists() => watch_v2(dir.clone(), on_oom),
            _ => Err(format!("pid {pid} is in no memory cgroup")),
        },
    };
    if let Err(e) = result {
        warn!("no OOM events for pid {pid}: {e}");
    }
}

fn watch_v1(dir: PathBuf, on_oom: impl Fn() + Send + 'static) -> Result<(), String> {
    let control_path = dir.join("memory.oom_control");
    let control =
        File::open(&control_path).map_err(|e| format!("open {}: {e}", control_path.display()))?;
    let efd = EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC)
        .map_err(|e| format!("eventfd: {e}"))?;
    let register = dir.join("cgroup.event_control");
    std::fs::write(
        &register,
        format!("{} {}", efd.as_raw_fd(), control.as_raw_fd()),
    )
    .map_err(|e| format!("write {}: {e}", register.display()))?;
    thread::spawn(move || {
        let _control = control;
        loop {
            match efd.read() {
                // The kernel also signals the eventfd when the cgroup is removed.
                Ok(_) if !dir.exists() => return,
                Ok(_) => on_oom(),
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    warn!("OOM watch of {}: {e}", dir.display());
                    return;
                }
            }
        }
    });
    Ok(())
}

/// `oom_kill` of a `memory.events` file.
fn oom_kills(events: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(events).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .and_then(|v| v.trim().parse().ok())
}

fn watch_v2(dir: PathBuf, on_oom: impl Fn() + Send + 'static) -> Result<(), String> {
    let events = dir.join("memory.events");
    let inotify = Inotify::init(InitFlags::IN_CLOEXEC).map_err(|e| format!("inotify: {e}"))?;
    inotify
        .add_watch(&events, AddWatchFlags::IN_MODIFY)
        .map_err(|e| format!("watch {}: {e}", events.display()))?;
    let mut seen = oom_kills(&events).unwrap_or(0);
    thread::spawn(move || loop {
        match inotify.read_events() {
            Ok(list) => {
                // IN_IGNORED: the watch went with the cgroup.
                if list
                    .iter()
                    .any(|e| e.mask.contains(AddWatchFlags::IN_IGNORED))
                {
                    return;
                }
                let Some(now) = oom_kills(&events) else {
                    return;
                };
                if now > seen {
                    seen = now;
                    on_oom();
                }
            }
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                warn!("OOM watch of {}: {e}", events.display());
                return;
            }
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oom_kills_are_read_from_memory_events() {
        let dir = tempfile::tempdir().expect("tempdir");
        let events = dir.path().join("memory.events");
        std::fs::write(&events, "low 0\nhigh 0\nmax 4\noom 2\noom_kill 1\n").expect("write");
        assert_eq!(oom_kills(&events), Some(1));
        assert_eq!(oom_kills(&dir.path().join("absent")), None);
    }
}
