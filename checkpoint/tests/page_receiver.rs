//! cryo's page receiver against a fake CRIU speaking the dump side of the page-server
//! protocol: the images it leaves are what CRIU would have written, and a broken stream
//! leaves nothing behind.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use cryo_checkpoint::image::digest::digest_file;
use cryo_checkpoint::page_receiver::protocol::{
    self, encode, Command, Dest, PAGE_SIZE, PE_PARENT, PE_PRESENT,
};
use cryo_checkpoint::page_receiver::{Estimate, Mode, PageReceiver};

const MODES: [Mode; 2] = [Mode::Memory, Mode::PageCache];

/// A page whose bytes tell which task and page they are.
fn page(task: u8, n: u64) -> Vec<u8> {
    let mut p = vec![task; PAGE_SIZE as usize];
    p[..8].copy_from_slice(&n.to_le_bytes());
    p
}

/// What CRIU does for one pagemap: open (and read the "has parent" byte), then add runs.
fn send_pagemap(sk: &mut UnixStream, dest: Dest, runs: &[(u64, u64, u32)], task: u8) {
    sk.write_all(&encode(
        Command::Open {
            dest: Some(dest),
            reply: true,
        },
        dest.encode(),
    ))
    .unwrap();
    let mut has_parent = [9u8];
    sk.read_exact(&mut has_parent).unwrap();
    assert_eq!(has_parent, [0], "the receiver has no parent image");
    let mut n = 0;
    for &(vaddr, nr_pages, flags) in runs {
        let add = Command::Add {
            vaddr,
            nr_pages,
            flags,
        };
        sk.write_all(&encode(add, dest.encode())).unwrap();
        if flags & PE_PRESENT != 0 {
            for _ in 0..nr_pages {
                sk.write_all(&page(task, n)).unwrap();
                n += 1;
            }
        }
    }
}

fn expected_pagemap(pages_id: u32, runs: &[(u64, u64, u32)]) -> Vec<u8> {
    let mut img = protocol::pagemap_head(pages_id);
    for &(vaddr, nr, flags) in runs {
        protocol::push_pagemap_entry(&mut img, vaddr, nr, flags);
    }
    img
}

fn expected_pages(task: u8, count: u64) -> Vec<u8> {
    (0..count).flat_map(|n| page(task, n)).collect()
}

/// A receiver expecting `bytes` of task 1.
fn start_one_task(dir: &Path, bytes: u64, mode: Mode) -> (PageReceiver, std::os::fd::OwnedFd) {
    PageReceiver::start(dir, vec![Estimate { vpid: 1, bytes }], mode, false).unwrap()
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    v.sort();
    v
}

#[test]
fn images_match_what_criu_writes_staged_overflowing_and_unstaged() {
    for mode in MODES {
        images_match(mode);
    }
}

fn images_match(mode: Mode) {
    let dir = tempfile::tempdir().unwrap();
    // Task 1 is staged for 2 pages but sends 5 (the overflow is written unstaged); task 9 is
    // staged but never sent; task 3 and the shmem segment were not expected at all.
    let estimates = vec![
        Estimate {
            vpid: 1,
            bytes: 2 * PAGE_SIZE,
        },
        Estimate {
            vpid: 9,
            bytes: 4 * PAGE_SIZE,
        },
    ];
    let (receiver, criu_end) = PageReceiver::start(dir.path(), estimates, mode, false).unwrap();
    receiver.wait_staged();
    let mut sk = UnixStream::from(criu_end);
    let t1 = [
        (0x40_0000, 3, PE_PRESENT),
        (0x50_0000, 1, PE_PARENT),
        (0x7f00_0000, 2, PE_PRESENT),
    ];
    let t3 = [(0x1000, 1, PE_PRESENT)];
    let shm = [(0, 2, PE_PRESENT)];
    send_pagemap(&mut sk, Dest::Task(1), &t1, 1);
    send_pagemap(&mut sk, Dest::Task(3), &t3, 3);
    send_pagemap(&mut sk, Dest::Shmem(77), &shm, 7);
    sk.write_all(&encode(Command::Close, 0)).unwrap();
    let mut status = [1u8; 4];
    sk.read_exact(&mut status).unwrap();
    assert_eq!(i32::from_ne_bytes(status), 0);

    let summary = receiver.finish().unwrap();
    assert_eq!(summary.bytes, 8 * PAGE_SIZE);
    assert_eq!(
        summary.staged_bytes,
        2 * PAGE_SIZE,
        "only task 1's first 2 pages were staged"
    );
    assert_eq!(summary.pagemaps, 3);
    assert_eq!(
        summary.prefaulted_bytes,
        6 * PAGE_SIZE,
        "tasks 1 and 9, {mode:?}"
    );
    check_digests(dir.path(), &summary.digests, mode, 3);
    let read = |n: &str| std::fs::read(dir.path().join(n)).unwrap();
    assert_eq!(read("pagemap-1.img"), expected_pagemap(1, &t1));
    assert_eq!(read("pages-1.img"), expected_pages(1, 5));
    assert_eq!(read("pagemap-3.img"), expected_pagemap(2, &t3));
    assert_eq!(read("pages-2.img"), expected_pages(3, 1));
    assert_eq!(read("pagemap-shmem-77.img"), expected_pagemap(3, &shm));
    assert_eq!(read("pages-3.img"), expected_pages(7, 2));
    assert_eq!(
        names(dir.path()),
        [
            "pagemap-1.img",
            "pagemap-3.img",
            "pagemap-shmem-77.img",
            "pages-1.img",
            "pages-2.img",
            "pages-3.img"
        ],
        "no staging file is left"
    );
}

/// Memory staging hashes each pages file as it writes it; page-cache staging leaves that to
/// the manifest.
fn check_digests(
    dir: &Path,
    digests: &[cryo_checkpoint::image::blocks::HashedPages],
    mode: Mode,
    files: usize,
) {
    match mode {
        Mode::PageCache => assert!(digests.is_empty()),
        Mode::Memory => {
            assert_eq!(digests.len(), files);
            for h in digests {
                let d = &h.record;
                let (size, blake3) = digest_file(&dir.join(&d.name)).unwrap();
                assert_eq!((d.size, &d.blake3), (size, &blake3), "{}", d.name);
                let (blocks, _) =
                    cryo_checkpoint::image::blocks::BlockDigests::of_file(&dir.join(&d.name))
                        .unwrap();
                assert_eq!(h.blocks, blocks, "the block digests of {}", d.name);
            }
        }
    }
}

#[test]
fn many_pieces_and_an_unstaged_tail_arrive_whole() {
    // 20 MiB sent, 12 MiB staged: the writer gets pieces of memory, then the tail the
    // receiver wrote itself, and hashes them all in order.
    for mode in MODES {
        let dir = tempfile::tempdir().unwrap();
        let pages = (20 << 20) / PAGE_SIZE;
        let estimates = vec![Estimate {
            vpid: 1,
            bytes: 12 << 20,
        }];
        let (receiver, criu_end) = PageReceiver::start(dir.path(), estimates, mode, false).unwrap();
        receiver.wait_staged();
        let mut sk = UnixStream::from(criu_end);
        let runs = [
            (0x40_0000, pages - 1, PE_PRESENT),
            (0x7f_0000_0000, 1, PE_PRESENT),
        ];
        send_pagemap(&mut sk, Dest::Task(1), &runs, 5);
        sk.write_all(&encode(Command::Close, 0)).unwrap();
        let mut status = [1u8; 4];
        sk.read_exact(&mut status).unwrap();
        let summary = receiver.finish().unwrap();
        assert_eq!(summary.bytes, 20 << 20);
        assert_eq!(summary.staged_bytes, 12 << 20, "{mode:?}");
        check_digests(dir.path(), &summary.digests, mode, 1);
        let data = std::fs::read(dir.path().join("pages-1.img")).unwrap();
        assert!(
            data == expected_pages(5, pages),
            "{mode:?}: the pages differ"
        );
    }
}

#[test]
fn a_stream_cut_short_fails_and_leaves_nothing() {
    for mode in MODES {
        cut_short(mode);
    }
}

fn cut_short(mode: Mode) {
    let dir = tempfile::tempdir().unwrap();
    let (receiver, criu_end) = start_one_task(dir.path(), 4 * PAGE_SIZE, mode);
    let mut sk = UnixStream::from(criu_end);
    send_pagemap(&mut sk, Dest::Task(1), &[(0x40_0000, 2, PE_PRESENT)], 1);
    // CRIU dies half-way through a run of pages.
    sk.write_all(&encode(
        Command::Add {
            vaddr: 0x41_0000,
            nr_pages: 4,
            flags: PE_PRESENT,
        },
        0,
    ))
    .unwrap();
    sk.write_all(&page(1, 0)).unwrap();
    drop(sk);
    let err = receiver.finish().unwrap_err().to_string();
    assert!(err.contains("CRIU's page stream broke"), "{err}");
    assert!(
        names(dir.path()).is_empty(),
        "left behind: {:?}",
        names(dir.path())
    );
}

#[test]
fn a_request_the_receiver_does_not_serve_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (receiver, criu_end) =
        PageReceiver::start(dir.path(), Vec::new(), Mode::Memory, false).unwrap();
    let mut sk = UnixStream::from(criu_end);
    // PS_IOV_GET: a lazy-pages request, not part of a dump.
    sk.write_all(&encode(Command::Other(7), 0)).unwrap();
    let err = receiver.finish().unwrap_err().to_string();
    assert!(err.contains("0x7") && err.contains("lazy pages"), "{err}");
    assert!(names(dir.path()).is_empty());
}

#[test]
fn dropping_an_unfinished_receiver_removes_its_staging() {
    for mode in MODES {
        drop_unfinished(mode);
    }
}

fn drop_unfinished(mode: Mode) {
    let dir = tempfile::tempdir().unwrap();
    let (receiver, criu_end) = start_one_task(dir.path(), 16 * PAGE_SIZE, mode);
    receiver.wait_staged();
    assert_eq!(names(dir.path()), [".cryo-pages-1.tmp"]);
    drop(criu_end); // CRIU never started
    drop(receiver);
    assert!(names(dir.path()).is_empty());
}

#[test]
fn dropping_a_receiver_whose_criu_never_ran_does_not_wait_for_it() {
    // A member of a group abandoned before its CRIU started: CRIU's end of the socket is
    // still open in the caller while the receiver is dropped.
    for mode in MODES {
        let dir = tempfile::tempdir().unwrap();
        let (receiver, criu_end) = start_one_task(dir.path(), 16 * PAGE_SIZE, mode);
        let (done_tx, done) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            drop(receiver);
            let _ = done_tx.send(());
        });
        assert!(
            done.recv_timeout(std::time::Duration::from_secs(20))
                .is_ok(),
            "{mode:?}: dropping the receiver waited for a CRIU that never ran"
        );
        drop(criu_end);
        assert!(names(dir.path()).is_empty(), "{:?}", names(dir.path()));
    }
}

/// Pages files that are replaced after the dump (a store increment) keep their staged length:
/// the pages received first, the staged tail untouched after them, so that no file system
/// is made to write a cut file's dirty pages back (XFS does on close).
#[test]
fn files_to_be_replaced_keep_their_staged_length() {
    let dir = tempfile::tempdir().unwrap();
    let estimates = vec![Estimate {
        vpid: 1,
        bytes: 8 * PAGE_SIZE,
    }];
    let (receiver, criu_end) =
        PageReceiver::start(dir.path(), estimates, Mode::PageCache, true).unwrap();
    receiver.wait_staged();
    let mut sk = UnixStream::from(criu_end);
    send_pagemap(&mut sk, Dest::Task(1), &[(0x40_0000, 3, PE_PRESENT)], 1);
    sk.write_all(&encode(Command::Close, 0)).unwrap();
    let mut status = [1u8; 4];
    sk.read_exact(&mut status).unwrap();
    let summary = receiver.finish().unwrap();
    assert_eq!(summary.bytes, 3 * PAGE_SIZE);
    let pages = std::fs::read(dir.path().join("pages-1.img")).unwrap();
    assert!(
        pages.len() as u64 > 3 * PAGE_SIZE,
        "the staged tail was cut"
    );
    assert_eq!(pages[..(3 * PAGE_SIZE) as usize], expected_pages(1, 3)[..]);
}
