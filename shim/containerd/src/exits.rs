//! Who exited. The shim is a child subreaper: a container's processes, whose parent (cryo)
//! exits right after starting them, become its children, and so do the cryo commands it runs.
//! containerd-shim's reaper thread waits for every child and hands each exit to the monitor's
//! subscribers; [`ExitTracker::run`] is the one that routes them to the processes the shim
//! watches.
//!
//! A process can exit before the shim knows its pid: `cryo exec --detach` starts it and the
//! shim reads the pid file only when cryo is done, and a short `sh -c 'exit 3'` may be gone by
//! then. While such a launch is in progress ([`ExitTracker::begin_launch`]) exits of unknown
//! pids are kept, and [`ExitTracker::watch`] claims the one of the pid it then learns.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use containerd_shim::monitor::{monitor_subscribe, ExitEvent, Subject, Subscription, Topic};

/// What the shim does when a watched process exits.
pub trait ExitSink: Send + Sync {
    /// The process exited with this status (128 + signal when killed).
    fn exited(&self, status: i32);
}

/// The routing table.
#[derive(Default)]
pub struct ExitTracker {
    state: Mutex<TrackerState>,
}

#[derive(Default)]
struct TrackerState {
    /// Container processes by pid.
    watched: HashMap<i32, Arc<dyn ExitSink>>,
    /// cryo commands still running (their exits are the command runner's).
    commands: HashSet<i32>,
    /// Launches whose pid is not known yet.
    launches: usize,
    /// Exits of unknown pids seen while a launch was in progress: pid → status.
    unclaimed: HashMap<i32, i32>,
}

/// A launch in progress; dropping it ends it.
#[must_use = "exits are kept only while the launch guard lives"]
pub struct Launch<'a> {
    tracker: &'a ExitTracker,
}

impl Drop for Launch<'_> {
    fn drop(&mut self) {
        let mut state = self.tracker.lock();
        state.launches = state.launches.saturating_sub(1);
        if state.launches == 0 {
            state.unclaimed.clear();
        }
    }
}

impl ExitTracker {
    /// A tracker whose subscription to the reaper is taken now, before the shim starts any
    /// child, so that no exit is missed. Call [`Self::run`] on a thread of its own with it.
    pub fn new() -> (Arc<Self>, Subscription) {
        let subscription = monitor_subscribe(Topic::Pid)
            .unwrap_or_else(|e| unreachable!("the in-process monitor cannot refuse: {e}"));
        (Arc::new(Self::default()), subscription)
    }

    fn lock(&self) -> MutexGuard<'_, TrackerState> {
        // A panic while holding the lock leaves plain data behind: keep using it.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Route the exits of `subscription` until the shim ends.
    pub fn run(self: Arc<Self>, subscription: Subscription) {
        while let Ok(ExitEvent { subject, exit_code }) = subscription.rx.recv() {
            if let Subject::Pid(pid) = subject {
                self.route(pid, exit_code);
            }
        }
    }

    /// One exit.
    pub fn route(&self, pid: i32, status: i32) {
        let sink = {
            let mut state = self.lock();
            if state.commands.remove(&pid) {
                return;
            }
            match state.watched.remove(&pid) {
                Some(sink) => sink,
                None => {
                    if state.launches > 0 {
                        state.unclaimed.insert(pid, status);
                    }
                    return;
                }
            }
        };
        // Outside the lock: the sink takes the process's own lock and publishes.
        sink.exited(status);
    }

    /// Keep the exits of unknown pids until the returned guard is dropped.
    pub fn begin_launch(&self) -> Launch<'_> {
        self.lock().launches += 1;
        Launch { tracker: self }
    }

    /// Watch `pid`. Returns its status if it exited during the current launch; the caller
    /// then reports that exit itself (`sink` is not called).
    pub fn watch(&self, _launch: &Launch<'_>, pid: i32, sink: Arc<dyn ExitSink>) -> Option<i32> {
        let mut state = self.lock();
        if let Some(status) = state.unclaimed.remove(&pid) {
            return Some(status);
        }
        state.watched.insert(pid, sink);
        None
    }

    /// Stop watching `pid` (its process record is gone).
    pub fn unwatch(&self, pid: i32) {
        self.lock().watched.remove(&pid);
    }

    /// A cryo command with this pid was started: its exit is not a container's.
    pub fn command_started(&self, pid: i32) {
        let mut state = self.lock();
        if state.unclaimed.remove(&pid).is_none() {
            state.commands.insert(pid);
        }
    }

    /// The command runner saw its command's exit itself.
    pub fn command_finished(&self, pid: i32) {
        self.lock().commands.remove(&pid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder(Mutex<Vec<i32>>);

    impl ExitSink for Recorder {
        fn exited(&self, status: i32) {
            self.0.lock().expect("recorder").push(status);
        }
    }

    #[test]
    fn a_watched_pid_reaches_its_sink_once() {
        let tracker = ExitTracker::default();
        let sink = Arc::new(Recorder::default());
        {
            let launch = tracker.begin_launch();
            assert_eq!(tracker.watch(&launch, 100, sink.clone()), None);
        }
        tracker.route(100, 3);
        tracker.route(100, 9);
        assert_eq!(*sink.0.lock().expect("recorder"), vec![3]);
    }

    #[test]
    fn an_exit_before_the_pid_is_known_is_claimed_by_watch() {
        let tracker = ExitTracker::default();
        let sink = Arc::new(Recorder::default());
        let launch = tracker.begin_launch();
        tracker.route(200, 137);
        assert_eq!(tracker.watch(&launch, 200, sink.clone()), Some(137));
        assert!(sink.0.lock().expect("recorder").is_empty());
    }

    #[test]
    fn unknown_exits_are_dropped_outside_launches() {
        let tracker = ExitTracker::default();
        tracker.route(300, 0);
        let launch = tracker.begin_launch();
        let sink = Arc::new(Recorder::default());
        assert_eq!(tracker.watch(&launch, 300, sink), None);
        drop(launch);
        assert!(tracker.lock().unclaimed.is_empty());
    }

    #[test]
    fn command_exits_are_never_a_containers() {
        let tracker = ExitTracker::default();
        let sink = Arc::new(Recorder::default());
        let launch = tracker.begin_launch();
        // The command's exit arrives before the runner noted its pid, and after.
        tracker.route(400, 0);
        tracker.command_started(400);
        tracker.command_started(401);
        tracker.route(401, 1);
        assert_eq!(tracker.watch(&launch, 400, sink.clone()), None);
        assert_eq!(tracker.watch(&launch, 401, sink.clone()), None);
        drop(launch);
        assert!(tracker.lock().commands.is_empty());
    }

    #[test]
    fn unwatched_pids_are_forgotten() {
        let tracker = ExitTracker::default();
        let sink = Arc::new(Recorder::default());
        {
            let launch = tracker.begin_launch();
            assert_eq!(tracker.watch(&launch, 500, sink.clone()), None);
        }
        tracker.unwatch(500);
        tracker.route(500, 0);
        assert!(sink.0.lock().expect("recorder").is_empty());
    }
}
