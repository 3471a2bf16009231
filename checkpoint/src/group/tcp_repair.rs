//! Stopping a group's members without a word on the wire. CRIU, stopping one container it
//! dumped with `--tcp-established`, kills its tasks while their TCP sockets are still in
//! repair mode: a socket closed in repair mode goes away at once and silently (no FIN, no
//! RST, no socket left behind in FIN-WAIT), so the connection is intact for the restore and
//! its address is free for it. A group's members are stopped only after the whole group is
//! published, long after CRIU let go of them; cryo puts their TCP sockets back into repair
//! mode itself just before it kills them (it takes a copy of each socket with
//! `pidfd_getfd(2)`: the processes are frozen, nothing else changes).

use std::collections::HashSet;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use nix::sys::socket::{getsockopt, setsockopt, sockopt, SockType, SockaddrLike};

/// What [`silence`] did.
#[derive(Debug, Default)]
pub struct Silenced {
    /// TCP sockets put in repair mode.
    pub sockets: usize,
    /// Sockets that could not be (named, with the reason).
    pub problems: Vec<String>,
}

/// Put every connected TCP socket the processes `pids` hold into repair mode, so that killing
/// them closes those sockets silently.
pub fn silence(pids: &[i32]) -> Silenced {
    let mut done = Silenced::default();
    let mut seen = HashSet::new();
    for &pid in pids {
        let pidfd = match pidfd_open(pid) {
            Ok(fd) => fd,
            Err(e) => {
                done.problems.push(format!("process {pid}: {e}"));
                continue;
            }
        };
        let Ok(entries) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(target) = std::fs::read_link(e.path()) else {
                continue;
            };
            let target = target.to_string_lossy().into_owned();
            if !target.starts_with("socket:[") || !seen.insert(target.clone()) {
                continue;
            }
            let Some(fd) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
                continue;
            };
            match repair(&pidfd, fd) {
                Ok(true) => done.sockets += 1,
                Ok(false) => {}
                Err(err) => done
                    .problems
                    .push(format!("process {pid} fd {fd} ({target}): {err}")),
            }
        }
    }
    done
}

/// Put the socket at `fd` of the process behind `pidfd` in repair mode if it is a TCP socket
/// that is not listening; whether it was one.
fn repair(pidfd: &OwnedFd, fd: i32) -> std::io::Result<bool> {
    let sock = pidfd_getfd(pidfd, fd)?;
    let is_tcp = getsockopt(&sock, sockopt::SockType).is_ok_and(|t| t == SockType::Stream)
        && is_inet(&sock)
        && !getsockopt(&sock, sockopt::AcceptConn).unwrap_or(true);
    if !is_tcp {
        return Ok(false);
    }
    setsockopt(&sock, sockopt::TcpRepair, &1).map_err(std::io::Error::from)?;
    Ok(true)
}

fn is_inet(sock: &OwnedFd) -> bool {
    nix::sys::socket::getsockname::<nix::sys::socket::SockaddrStorage>(sock.as_raw_fd())
        .ok()
        .and_then(|a| a.family())
        .is_some_and(|f| {
            matches!(
                f,
                nix::sys::socket::AddressFamily::Inet | nix::sys::socket::AddressFamily::Inet6
            )
        })
}

fn pidfd_open(pid: i32) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1; no memory is passed.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this fd for us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// A copy of descriptor `fd` of the process behind `pidfd` (Linux >= 5.6).
fn pidfd_getfd(pidfd: &OwnedFd, fd: i32) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_getfd takes a pidfd, a descriptor number and flags and returns a new fd
    // in our table or -1; no memory is passed.
    let got = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
    if got < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just installed this fd for us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(got as i32) })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::io::Read;
    use std::net::TcpListener;
    use std::process::{Command, Stdio};
    use std::time::Duration;

    /// What the accepting end hears when a process holding the other end is killed, with its
    /// socket put in repair mode first or not.
    fn peer_hears_when_killed(silenced: bool) -> std::io::Result<usize> {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test needs root (TCP_REPAIR needs CAP_NET_ADMIN): run it as root"
        );
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port().to_string();
        let mut child = Command::new("/bin/busybox")
            .args(["nc", "127.0.0.1", &port])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("/bin/busybox is needed (scripts/setup installs busybox-static)");
        let (mut server, _) = listener.accept().unwrap();
        if silenced {
            let done = silence(&[child.id() as i32]);
            assert_eq!(done.sockets, 1, "{done:?}");
        }
        child.kill().unwrap();
        child.wait().unwrap();
        server
            .set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        server.read(&mut [0u8; 1])
    }

    /// CRIU's way of stopping a dumped process: its connection's peer hears nothing (no FIN,
    /// no RST), where a plain kill closes the connection.
    #[test]
    fn a_socket_closed_in_repair_mode_says_nothing() {
        assert_eq!(
            peer_hears_when_killed(false).unwrap(),
            0,
            "a plain kill sends a FIN"
        );
        let e = peer_hears_when_killed(true).unwrap_err();
        assert!(
            matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
            "the peer must hear nothing, got {e:?}"
        );
    }
}
