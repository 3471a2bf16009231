//! One process of a task (the init, or an exec) as the shim tracks it: its phase, pid, exit
//! and stdio. The shim keeps the phase itself, as the runc shim does, instead of asking cryo
//! on every `State`.

use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::SystemTime;

use crate::io::{ProcessIo, StdioPaths};

/// Where a process is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Created (init: `cryo create` done, or a restore waiting for start; exec: recorded).
    Created,
    /// Running.
    Running,
    /// Frozen (init only; an exec reports its container's pause).
    Paused,
    /// Exited.
    Stopped,
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    /// Exit status; 128 + signal for a killed process.
    pub status: u32,
    /// When the shim saw it.
    pub at: SystemTime,
}

/// The mutable part of a process.
pub struct ProcessState {
    /// Its pid (0 before it runs).
    pub pid: i32,
    /// Its phase.
    pub phase: Phase,
    /// Its end, once it ended.
    pub exit: Option<Exit>,
    /// The shim's side of its stdio.
    pub io: Arc<ProcessIo>,
}

/// A process; the init's id is empty.
pub struct Process {
    /// Exec id ("" for the init).
    pub id: String,
    /// The stdio containerd asked for.
    pub stdio: StdioPaths,
    state: Mutex<ProcessState>,
    ended: Condvar,
}

impl Process {
    /// A process not yet running.
    pub fn new(id: &str, stdio: StdioPaths) -> Self {
        Self {
            id: id.to_string(),
            stdio,
            state: Mutex::new(ProcessState {
                pid: 0,
                phase: Phase::Created,
                exit: None,
                io: Arc::new(ProcessIo::none()),
            }),
            ended: Condvar::new(),
        }
    }

    /// Its state, locked. Operations that must not interleave with an exit report (start:
    /// the exit event must follow the start event) hold this across their work.
    pub fn lock(&self) -> MutexGuard<'_, ProcessState> {
        // A panic while holding the lock leaves plain data behind: keep using it.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Record the exit (under the caller's lock) and wake the waiters. Returns false if an
    /// exit was already recorded.
    pub fn set_exited(&self, state: &mut ProcessState, status: i32) -> bool {
        if state.exit.is_some() {
            return false;
        }
        state.exit = Some(Exit {
            status: u32::try_from(status).unwrap_or(u32::MAX),
            at: SystemTime::now(),
        });
        state.phase = Phase::Stopped;
        self.ended.notify_all();
        true
    }

    /// Block until the process has exited.
    pub fn wait(&self) -> Exit {
        let mut state = self.lock();
        loop {
            if let Some(exit) = state.exit {
                return exit;
            }
            state = self
                .ended
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// pid, phase and exit at this moment.
    pub fn snapshot(&self) -> (i32, Phase, Option<Exit>) {
        let state = self.lock();
        (state.pid, state.phase, state.exit)
    }

    /// The shim's side of the stdio.
    pub fn io(&self) -> Arc<ProcessIo> {
        self.lock().io.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread;
    use std::time::Duration;

    #[test]
    fn wait_returns_the_first_exit() {
        let process = Arc::new(Process::new("e1", StdioPaths::default()));
        let waiter = {
            let process = process.clone();
            thread::spawn(move || process.wait())
        };
        thread::sleep(Duration::from_millis(20));
        {
            let mut state = process.lock();
            assert!(process.set_exited(&mut state, 3));
            assert!(!process.set_exited(&mut state, 9));
        }
        let exit = waiter.join().expect("waiter");
        assert_eq!(exit.status, 3);
        assert_eq!(process.snapshot().1, Phase::Stopped);
    }
}
