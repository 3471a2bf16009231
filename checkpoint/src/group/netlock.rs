//! Locking the network of a group's members. CRIU, asked to dump one container with its TCP
//! connections, locks that container's network only during its own dump. A group needs more:
//! no packet may enter or leave any member's network namespace from before the first dump
//! until after the last, or a member dumped later would count as delivered what one dumped
//! earlier still counts as unsent (or lost). So cryo puts the same lock CRIU uses (iptables
//! rules dropping everything but CRIU's own marked packets) in every member's namespace, in a
//! chain of its own name so that CRIU's lock and cryo's never remove each other, and tells
//! CRIU to skip its own (`network_lock = skip`).
//!
//! A group checkpoint that stops its members leaves the lock in place, as CRIU does for one
//! container: the peers' packets are dropped, not refused, so their connections wait for the
//! restore instead of being reset. The group's restore removes it once every member is back.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// The iptables chain cryo's lock lives in.
pub const CHAIN: &str = "CRYO-GROUP-LOCK";

/// How long one iptables run may take before it is killed.
pub const TOOL_TIMEOUT: Duration = Duration::from_secs(20);

/// A network namespace, held open (it stays the same namespace even if its processes die).
#[derive(Debug)]
pub struct Netns {
    file: File,
    /// Its inode: two members with the same one share the namespace.
    pub inode: u64,
    /// The path it was opened from (`/proc/<pid>/ns/net`), for messages and the guardian.
    pub source: PathBuf,
}

impl Netns {
    /// The network namespace of process `pid`.
    pub fn of_pid(pid: i32) -> std::io::Result<Self> {
        Self::open(&PathBuf::from(format!("/proc/{pid}/ns/net")))
    }

    /// The network namespace at `path` (a `/proc/<pid>/ns/net` or a bind mount of one).
    pub fn open(path: &Path) -> std::io::Result<Self> {
        let file = File::open(path)?;
        let inode = file.metadata()?.ino();
        Ok(Self {
            file,
            inode,
            source: path.to_path_buf(),
        })
    }

    /// The host's own network namespace: that of process 1, or cryo's own where process 1
    /// is out of reach (a sandbox hiding it; cryo runs in the host's namespace there).
    pub fn is_hosts(&self) -> bool {
        std::fs::metadata("/proc/1/ns/net")
            .or_else(|_| std::fs::metadata("/proc/self/ns/net"))
            .is_ok_and(|m| m.ino() == self.inode)
    }

    /// The open namespace.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// `net:[inode]`, as the kernel names it.
    pub fn name(&self) -> String {
        format!("net:[{}]", self.inode)
    }
}

/// How the network of a namespace is locked and unlocked: [`Iptables`], or a fake in tests.
pub trait NetLock: Sync {
    /// Drop every packet in and out of `ns` (but CRIU's own).
    fn lock(&self, ns: &Netns) -> Result<(), String>;
    /// Remove cryo's lock from `ns`; nothing to do when there is none.
    fn unlock(&self, ns: &Netns) -> Result<(), String>;
    /// Whether cryo's lock is in `ns`.
    fn is_locked(&self, ns: &Netns) -> Result<bool, String>;
}

/// The lock as CRIU makes it: `iptables-restore` (and `ip6tables-restore`) run inside the
/// namespace.
#[derive(Debug, Clone)]
pub struct Iptables {
    /// How long one run may take.
    pub timeout: Duration,
}

impl Default for Iptables {
    fn default() -> Self {
        Self {
            timeout: TOOL_TIMEOUT,
        }
    }
}

/// The families to lock: IPv6 too when the kernel has it.
fn families() -> &'static [Family] {
    if Path::new("/proc/sys/net/ipv6").exists() {
        &[Family::V4, Family::V6]
    } else {
        &[Family::V4]
    }
}

#[derive(Debug, Clone, Copy)]
enum Family {
    V4,
    V6,
}

impl Family {
    fn restore(self) -> &'static str {
        match self {
            Family::V4 => "iptables-restore",
            Family::V6 => "ip6tables-restore",
        }
    }
    fn save(self) -> &'static str {
        match self {
            Family::V4 => "iptables-save",
            Family::V6 => "ip6tables-save",
        }
    }
}

/// The rules: every packet in and out goes through cryo's chain, which lets CRIU's own
/// (marked 0xC114 by CRIU's TCP repair library, e.g. to close a half-closed connection at
/// restore) through and drops the rest.
fn lock_rules() -> String {
    format!(
        "*filter\n:{CHAIN} - [0:0]\n-I INPUT -j {CHAIN}\n-I OUTPUT -j {CHAIN}\n\
         -A {CHAIN} -m mark --mark 0xc114 -j ACCEPT\n-A {CHAIN} -j DROP\nCOMMIT\n"
    )
}

/// Removing `jumps_in`/`jumps_out` jumps to the chain, then the chain.
fn unlock_rules(jumps_in: usize, jumps_out: usize) -> String {
    let mut s = String::from("*filter\n");
    for _ in 0..jumps_in {
        s.push_str(&format!("-D INPUT -j {CHAIN}\n"));
    }
    for _ in 0..jumps_out {
        s.push_str(&format!("-D OUTPUT -j {CHAIN}\n"));
    }
    s.push_str(&format!("-F {CHAIN}\n-X {CHAIN}\nCOMMIT\n"));
    s
}

/// What `iptables-save -t filter` says of cryo's lock: whether the chain exists, and how many
/// jumps to it INPUT and OUTPUT hold.
fn lock_state(saved: &str) -> (bool, usize, usize) {
    let chain = saved
        .lines()
        .any(|l| l.split_whitespace().next() == Some(&format!(":{CHAIN}")));
    let jumps = |hook: &str| {
        saved
            .lines()
            .filter(|l| l.trim() == format!("-A {hook} -j {CHAIN}"))
            .count()
    };
    (chain, jumps("INPUT"), jumps("OUTPUT"))
}

impl Iptables {
    fn run(&self, ns: &Netns, program: &str, args: &[&str], input: &str) -> Result<String, String> {
        run_in_netns(ns.fd(), program, args, input, self.timeout)
            .map_err(|e| format!("{program} in {}: {e}", ns.name()))
    }

    /// Each family at once (each is a process of its own).
    fn each_family(&self, f: impl Fn(Family) -> Result<(), String> + Sync) -> Result<(), String> {
        let results: Vec<Result<(), String>> = std::thread::scope(|s| {
            let f = &f;
            let handles: Vec<_> = families()
                .iter()
                .map(|&fam| s.spawn(move || f(fam)))
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err("an iptables thread panicked".into()))
                })
                .collect()
        });
        let errors: Vec<String> = results.into_iter().filter_map(Result::err).collect();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }

    fn saved(&self, ns: &Netns, fam: Family) -> Result<(bool, usize, usize), String> {
        Ok(lock_state(&self.run(
            ns,
            fam.save(),
            &["-t", "filter"],
            "",
        )?))
    }
}

impl NetLock for Iptables {
    fn lock(&self, ns: &Netns) -> Result<(), String> {
        self.each_family(|fam| {
            self.run(ns, fam.restore(), &["-w", "--noflush"], &lock_rules())
                .map(|_| ())
        })
    }

    fn unlock(&self, ns: &Netns) -> Result<(), String> {
        self.each_family(|fam| {
            // The usual case first: one jump each, one run.
            if self
                .run(ns, fam.restore(), &["-w", "--noflush"], &unlock_rules(1, 1))
                .is_ok()
            {
                return Ok(());
            }
            // No lock, or a lock made twice: remove exactly what is there.
            let (chain, jumps_in, jumps_out) = self.saved(ns, fam)?;
            if !chain {
                return Ok(());
            }
            self.run(
                ns,
                fam.restore(),
                &["-w", "--noflush"],
                &unlock_rules(jumps_in, jumps_out),
            )
            .map(|_| ())
        })
    }

    fn is_locked(&self, ns: &Netns) -> Result<bool, String> {
        for &fam in families() {
            if self.saved(ns, fam)?.0 {
                return Ok(true);
            }
        }
        Ok(false)
    }
}

/// Run `program args` inside the network namespace `ns` with `input` on its stdin, within
/// `timeout` (killed past it); its stdout, or its stderr as the error.
pub fn run_in_netns(
    ns: BorrowedFd<'_>,
    program: &str,
    args: &[&str],
    input: &str,
    timeout: Duration,
) -> Result<String, String> {
    let raw = ns.as_raw_fd();
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: the closure only calls setns(2), which is async-signal-safe, on a descriptor
    // that stays open in the parent until spawn returns; it allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(raw, libc::CLONE_NEWNET) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot run it: {e} (scripts/setup installs iptables)"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(input.as_bytes())
            .map_err(|e| format!("writing its input: {e}"))?;
    }
    // Output is read while waiting (a large ruleset fills a pipe); the wait has a deadline.
    let pid = child.id() as i32;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = match rx.recv_timeout(timeout) {
        Ok(out) => out.map_err(|e| format!("waiting for it: {e}"))?,
        Err(_) => {
            // Not reaped yet (the waiting thread reaps it only once it exits): still ours.
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            let _ = rx.recv();
            return Err(format!("did not finish within {}s", timeout.as_secs()));
        }
    };
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_state_of_the_lock_is_read_from_iptables_save() {
        let saved = format!(
            "*filter\n:INPUT ACCEPT [0:0]\n:{CHAIN} - [0:0]\n-A INPUT -j {CHAIN}\n\
             -A INPUT -j {CHAIN}\n-A OUTPUT -j {CHAIN}\n-A {CHAIN} -j DROP\nCOMMIT\n"
        );
        assert_eq!(lock_state(&saved), (true, 2, 1));
        assert_eq!(
            lock_state("*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -j CRIU\nCOMMIT\n"),
            (false, 0, 0)
        );
    }

    #[test]
    fn unlock_removes_every_jump_before_the_chain() {
        let r = unlock_rules(2, 1);
        assert_eq!(r.matches("-D INPUT").count(), 2);
        assert_eq!(r.matches("-D OUTPUT").count(), 1);
        assert!(r.find("-D OUTPUT").unwrap() < r.find("-X").unwrap());
        assert!(lock_rules().contains("--mark 0xc114 -j ACCEPT"));
    }
}
