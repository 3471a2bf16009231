//! The overlay upper dir's part of a checkpoint. The raw changeset is captured while the
//! container is frozen, beside CRIU's dump on the other core where that is safe (else after
//! the dump, into a file faulted in before the freeze), and compressed as soon as it is
//! complete, at the lowest CPU priority, so that what is left of the freeze (CRIU) and the
//! thawed container come first.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Instant;

use crate::rootfs::{self, CaptureOptions, CaptureReport, FrozenTop, RootfsError};

/// zstd level of the rootfs changeset. A fast (negative) level: the changeset is compressed
/// while the checkpoint's caller waits, and on this project's benchmark data (file contents
/// half random, half zeros) `--fast=3` runs 3x faster than level 1 for the same size. Text
/// compresses some 10-20% less well than at level 1.
const LEVEL: i32 = -3;

/// A result and how long it took (ms).
type Timed<T> = (Result<T, RootfsError>, f64);

/// One checkpoint's capture of an upper dir. Dropped before [`UpperCapture::compressed`]
/// succeeded (a failed checkpoint), it waits for its threads and removes what it wrote.
pub(crate) struct UpperCapture {
    upper: PathBuf,
    raw: PathBuf,
    zst: PathBuf,
    beside_dump: bool,
    prep: Option<JoinHandle<Option<File>>>,
    file: Option<File>,
    captured: Option<mpsc::Receiver<Timed<CaptureReport>>>,
    compressing: Option<JoinHandle<Option<Timed<u64>>>>,
    kept: bool,
}

impl UpperCapture {
    /// Before CRIU starts: prepare the raw changeset `raw` for a capture of `upper` in a
    /// thread of its own; the compressed changeset goes to `zst`. `beside_dump`: the capture
    /// may run while CRIU dumps (not with `--link-remap`, whose link files CRIU creates in
    /// the container's tree while dumping).
    ///
    /// Only a capture that will run after the dump, inside the freeze, has its file faulted in
    /// beforehand: one beside the dump allocates on its own core while CRIU works, and
    /// faulting in ahead would only delay the freeze.
    pub(crate) fn prepare(upper: &Path, raw: &Path, zst: &Path, beside_dump: bool) -> Self {
        let (u, r) = (upper.to_path_buf(), raw.to_path_buf());
        let prep =
            (!beside_dump).then(|| std::thread::spawn(move || rootfs::prepare_capture(&u, &r)));
        Self {
            upper: upper.to_path_buf(),
            raw: raw.to_path_buf(),
            zst: zst.to_path_buf(),
            beside_dump,
            prep,
            file: None,
            captured: None,
            compressing: None,
            kept: false,
        }
    }

    /// Just before the freeze: wait for the preparation.
    pub(crate) fn wait_prepared(&mut self) {
        if let Some(prep) = self.prep.take() {
            self.file = prep.join().ok().flatten();
        }
    }

    /// Frozen, before CRIU dumps: start capturing (then compressing) beside CRIU, if allowed.
    pub(crate) fn start_beside_dump(&mut self) {
        if !self.beside_dump || self.compressing.is_some() {
            return;
        }
        self.wait_prepared();
        let opts = CaptureOptions {
            during_dump: Some(FrozenTop::record(&self.upper)),
            ..CaptureOptions::default()
        };
        let (upper, raw, zst) = (self.upper.clone(), self.raw.clone(), self.zst.clone());
        let file = self.file.take();
        let (tx, rx) = mpsc::channel();
        self.captured = Some(rx);
        self.compressing = Some(std::thread::spawn(move || {
            let (report, took) = capture(&upper, &raw, file, &opts);
            let ok = report.is_ok();
            let _ = tx.send((report, took));
            ok.then(|| {
                lowest_cpu_priority();
                compress(&raw, &zst)
            })
        }));
    }

    /// After CRIU's dump, still frozen: the capture's report. A capture not started beside
    /// the dump runs now.
    pub(crate) fn finish(&mut self) -> Timed<CaptureReport> {
        if let Some(rx) = self.captured.take() {
            return rx.recv().unwrap_or_else(|_| {
                let err = std::io::Error::other("the capture thread ended without a report");
                (Err(rootfs::io_err("capture", &self.raw)(err)), 0.0)
            });
        }
        self.wait_prepared();
        capture(
            &self.upper,
            &self.raw,
            self.file.take(),
            &CaptureOptions::default(),
        )
    }

    /// After the thaw: the compressed changeset's size (compressed now if it was not already),
    /// the raw one removed. From here on the compressed file is the image's.
    pub(crate) fn compressed(&mut self) -> Timed<u64> {
        let done = match self.compressing.take() {
            Some(t) => t.join().ok().flatten(),
            None => None,
        };
        let (size, took) = done.unwrap_or_else(|| compress(&self.raw, &self.zst));
        let _ = std::fs::remove_file(&self.raw);
        self.kept = size.is_ok();
        (size, took)
    }
}

fn capture(
    upper: &Path,
    raw: &Path,
    file: Option<File>,
    opts: &CaptureOptions,
) -> Timed<CaptureReport> {
    let t = Instant::now();
    let report = match file {
        Some(f) => rootfs::capture_upper_into(upper, f, raw, opts),
        None => rootfs::capture_upper(upper, raw, opts),
    };
    (report, super::ms(t.elapsed()))
}

fn compress(raw: &Path, zst: &Path) -> Timed<u64> {
    let t = Instant::now();
    let size = rootfs::compress_zstd(raw, zst, LEVEL, super::compress_threads());
    (size, super::ms(t.elapsed()))
}

/// Nice 19 for the calling thread (and the zstd workers it starts, which inherit it).
fn lowest_cpu_priority() {
    let tid = nix::unistd::gettid().as_raw() as libc::id_t;
    // SAFETY: setpriority only reads its integer arguments; PRIO_PROCESS with a thread id
    // changes that thread alone. Failure leaves the priority as it was, which is harmless.
    unsafe {
        libc::setpriority(libc::PRIO_PROCESS, tid, 19);
    }
}

impl Drop for UpperCapture {
    fn drop(&mut self) {
        if let Some(p) = self.prep.take() {
            let _ = p.join();
        }
        if let Some(c) = self.compressing.take() {
            let _ = c.join();
        }
        let _ = std::fs::remove_file(&self.raw);
        if !self.kept {
            let _ = std::fs::remove_file(&self.zst);
        }
    }
}
