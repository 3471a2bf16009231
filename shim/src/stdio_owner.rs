//! runc gives a container process its stdio: before it drops to the process's user, each of
//! its fds 0-2 that the user does not own (a terminal cryo's caller or libcontainer made, a
//! pipe) is chowned to that user, the group kept; `/dev/null` is left alone. A process running
//! as uid 1000 can then reopen its terminal, and `stat $(tty)` shows `1000:5` as under runc.
//!
//! libcontainer does not, and by the time cryo's executor runs (see `workload`) the process
//! has dropped the capability to chown. So cryo, as root, does it:
//! - for a container's init, from outside, between create and start (the init waits);
//! - for an `exec`, whose process runs on as soon as it is set up, by a handshake: the process
//!   sends its fds 0-2 to cryo over an inherited socket, cryo chowns them and answers, and only
//!   then does the process exec. The process asks only when one of them needs it.

use std::io::IoSlice;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use nix::sys::socket::{
    recvmsg, sendmsg, socketpair, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags,
    SockFlag, SockType,
};

/// Whether a stdio file owned by `owner` with device number `rdev` must become `uid`'s.
pub fn needs_chown(owner: u32, rdev: u64, uid: u32, null_rdev: u64) -> bool {
    owner != uid && rdev != null_rdev
}

fn null_rdev() -> u64 {
    std::fs::metadata("/dev/null")
        .map(|m| m.rdev())
        .unwrap_or(0)
}

/// The init of a created container (pid on the host), before `start`: through
/// `/proc/<pid>/fd/N`, which names the file itself.
pub fn fix_for_pid(pid: i32, uid: u32) {
    let null = null_rdev();
    for fd in 0..3 {
        let path = format!("/proc/{pid}/fd/{fd}");
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        if needs_chown(meta.uid(), meta.rdev(), uid, null) {
            // As runc: a file that cannot change owner (EINVAL, EPERM) stays as it is.
            let _ = std::os::unix::fs::chown(Path::new(&path), Some(uid), None);
        }
    }
}

/// cryo's end of an exec's handshake: a thread that chowns what the process sends.
pub struct Fixer {
    child: OwnedFd,
    thread: std::thread::JoinHandle<()>,
}

impl Fixer {
    /// Start serving; `child_fd()` goes to the process (see `workload`).
    pub fn start(uid: u32) -> nix::Result<Self> {
        let (ours, child) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )?;
        let thread = std::thread::spawn(move || serve(ours, uid));
        Ok(Self { child, thread })
    }

    /// The process's end.
    pub fn child_fd(&self) -> RawFd {
        self.child.as_raw_fd()
    }

    /// After the process was started (or failed to): close the process's end here; the thread
    /// ends once the process has exec'd and its copy closed too.
    pub fn finish(self) {
        drop(self.child);
        drop(self.thread);
    }
}

fn serve(sock: OwnedFd, uid: u32) {
    let null = null_rdev();
    loop {
        let mut data = [0u8; 1];
        let mut iov = [std::io::IoSliceMut::new(&mut data)];
        let mut space = nix::cmsg_space!([RawFd; 3]);
        let Ok(msg) = recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) else {
            return;
        };
        if msg.bytes == 0 {
            return; // the process exec'd (or died): its end closed
        }
        let mut received = Vec::new();
        if let Ok(cmsgs) = msg.cmsgs() {
            for cmsg in cmsgs {
                if let ControlMessageOwned::ScmRights(fds) = cmsg {
                    // SAFETY: SCM_RIGHTS just installed these descriptors; we own them.
                    received.extend(
                        fds.into_iter()
                            .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                    );
                }
            }
        }
        for fd in &received {
            if let Ok(st) = nix::sys::stat::fstat(fd.as_raw_fd()) {
                if needs_chown(st.st_uid, st.st_rdev, uid, null) {
                    // As runc: a file that cannot change owner stays as it is.
                    let _ = nix::unistd::fchown(fd.as_raw_fd(), Some(uid.into()), None);
                }
            }
        }
        drop(received);
        let _ = sendmsg::<()>(
            sock.as_raw_fd(),
            &[IoSlice::new(b"k")],
            &[],
            MsgFlags::empty(),
            None,
        );
    }
}

/// The process's side, in `workload`: when one of fds 0-2 is not its user's (and not
/// `/dev/null`), send them to cryo on `sock` and wait for the answer.
pub fn ask(sock: RawFd) -> std::io::Result<()> {
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    let null = null_rdev();
    let needed = (0..3).any(|fd| {
        nix::sys::stat::fstat(fd).is_ok_and(|st| needs_chown(st.st_uid, st.st_rdev, uid, null))
    });
    if !needed {
        return Ok(());
    }
    let fds = [0, 1, 2];
    sendmsg::<()>(
        sock,
        &[IoSlice::new(b"s")],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )?;
    let mut answer = [0u8; 1];
    // SAFETY: read writes at most one byte into the buffer, which outlives the call.
    let n = unsafe { libc::read(sock, answer.as_mut_ptr().cast(), 1) };
    if n == 1 {
        Ok(())
    } else {
        Err(std::io::Error::other(
            "cryo did not answer the stdio ownership request",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runcs_rule_skips_dev_null_and_files_already_the_users() {
        let null = 0x103;
        assert!(
            needs_chown(0, 0x8800, 1000, null),
            "root's pty for uid 1000"
        );
        assert!(!needs_chown(1000, 0x8800, 1000, null), "already the user's");
        assert!(!needs_chown(0, null, 1000, null), "/dev/null stays root's");
    }

    #[test]
    fn a_sent_pipe_comes_back_owned_by_the_user() {
        let fixer = Fixer::start(4242).expect("start");
        let (r, _w) = nix::unistd::pipe().expect("pipe");
        let fds = [r.as_raw_fd()];
        sendmsg::<()>(
            fixer.child_fd(),
            &[IoSlice::new(b"s")],
            &[ControlMessage::ScmRights(&fds)],
            MsgFlags::empty(),
            None,
        )
        .expect("send");
        let mut answer = [0u8; 1];
        // SAFETY: one byte into a one-byte buffer.
        let n = unsafe { libc::read(fixer.child_fd(), answer.as_mut_ptr().cast(), 1) };
        assert_eq!(n, 1);
        // cryo's tests run as root (only root may give a file away).
        assert_eq!(std::fs::File::from(r).metadata().expect("meta").uid(), 4242);
        fixer.finish();
    }
}
