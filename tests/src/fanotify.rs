//! An open trap for fault tests: with fanotify permission events the kernel holds every
//! `open(2)` on one mount until this answers, so a test can act (kill cryo) at the exact
//! moment a given file is opened, e.g. as cryo starts writing its manifest, instead of
//! hoping a sleep lands there.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

/// A running trap; [`OpenTrap::finish`] stops it and says which path fired it.
pub struct OpenTrap {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Option<PathBuf>>>,
}

impl OpenTrap {
    /// Watch every open on the mount at `mount` (it must be a mount point: use a dedicated
    /// tmpfs, never a mount the system uses). The first open whose path satisfies `hit` runs
    /// `action` while the opener is held; then every open is let through.
    pub fn on_mount(
        mount: &Path,
        hit: impl Fn(&Path) -> bool + Send + 'static,
        action: impl FnOnce(&Path) + Send + 'static,
    ) -> Self {
        // SAFETY: fanotify_init takes flags only and returns a new fd or -1.
        let fd = unsafe {
            libc::fanotify_init(
                libc::FAN_CLASS_CONTENT | libc::FAN_CLOEXEC | libc::FAN_NONBLOCK,
                (libc::O_RDONLY | libc::O_LARGEFILE | libc::O_CLOEXEC) as libc::c_uint,
            )
        };
        assert!(
            fd >= 0,
            "fanotify_init: {} (needs root and CONFIG_FANOTIFY_ACCESS_PERMISSIONS)",
            std::io::Error::last_os_error()
        );
        // SAFETY: the kernel just returned this fd for us.
        let fan = unsafe { OwnedFd::from_raw_fd(fd) };
        let c = std::ffi::CString::new(mount.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: fanotify_mark with our fanotify fd and a valid C path.
        let r = unsafe {
            libc::fanotify_mark(
                fan.as_raw_fd(),
                libc::FAN_MARK_ADD | libc::FAN_MARK_MOUNT,
                libc::FAN_OPEN_PERM,
                libc::AT_FDCWD,
                c.as_ptr(),
            )
        };
        assert!(
            r == 0,
            "fanotify_mark {}: {}",
            mount.display(),
            std::io::Error::last_os_error()
        );
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || serve(fan, &s, hit, action));
        Self {
            stop,
            thread: Some(thread),
        }
    }

    /// Stop watching; the path that fired the action, if one did.
    pub fn finish(mut self) -> Option<PathBuf> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.take().and_then(|t| t.join().ok()).flatten()
    }
}

impl Drop for OpenTrap {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(
    fan: OwnedFd,
    stop: &AtomicBool,
    hit: impl Fn(&Path) -> bool,
    action: impl FnOnce(&Path),
) -> Option<PathBuf> {
    let mut action = Some(action);
    let mut fired = None;
    let mut buf = vec![0u8; 64 * 1024];
    while !stop.load(Ordering::SeqCst) {
        let mut pfd = libc::pollfd {
            fd: fan.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&mut pfd, 1, 20) } <= 0 {
            continue;
        }
        // SAFETY: reading into our own buffer of the given length.
        let n = unsafe { libc::read(fan.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            continue;
        }
        let meta_len = std::mem::size_of::<libc::fanotify_event_metadata>();
        let mut at = 0usize;
        while at + meta_len <= n as usize {
            // SAFETY: the kernel wrote whole event records; read_unaligned copes with any
            // alignment of the buffer.
            let meta: libc::fanotify_event_metadata =
                unsafe { std::ptr::read_unaligned(buf[at..].as_ptr().cast()) };
            if meta.event_len == 0 {
                break;
            }
            if meta.fd >= 0 {
                // The path from the fd the event carries (readlink opens nothing on the mount).
                let path =
                    std::fs::read_link(format!("/proc/self/fd/{}", meta.fd)).unwrap_or_default();
                if fired.is_none() && hit(&path) {
                    if let Some(a) = action.take() {
                        a(&path);
                    }
                    fired = Some(path);
                }
                let resp = libc::fanotify_response {
                    fd: meta.fd,
                    response: libc::FAN_ALLOW,
                };
                // SAFETY: writing one response struct; then closing the event's fd.
                unsafe {
                    libc::write(
                        fan.as_raw_fd(),
                        (&resp as *const libc::fanotify_response).cast(),
                        std::mem::size_of::<libc::fanotify_response>(),
                    );
                    libc::close(meta.fd);
                }
            }
            at += meta.event_len as usize;
        }
    }
    fired
}
