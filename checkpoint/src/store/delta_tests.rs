#![allow(clippy::unwrap_used)]
//! Increments against synthetic images: a generation read back through its chain (as CRIU
//! reads it) is byte for byte the full image it was made from.

use std::collections::BTreeMap;
use std::path::Path;

use super::*;
use crate::page_receiver::protocol::PE_PRESENT;

const P: u64 = PAGE_SIZE;

/// A page whose bytes say which address and version it is.
fn page(vaddr: u64, version: u8) -> Vec<u8> {
    let mut p = vec![version; P as usize];
    p[..8].copy_from_slice(&vaddr.to_le_bytes());
    p
}

/// Write a full image (every page present) of `pages` (address → version) as pagemap `name`.
fn write_full(dir: &Path, name: &str, pages_id: u32, pages: &BTreeMap<u64, u8>) {
    std::fs::create_dir_all(dir).unwrap();
    let mut entries: Vec<Entry> = Vec::new();
    let mut data = Vec::new();
    for (&vaddr, &v) in pages {
        match entries.last_mut() {
            Some(e) if e.end() == vaddr => e.nr_pages += 1,
            _ => entries.push(Entry {
                vaddr,
                nr_pages: 1,
                flags: PE_PRESENT,
            }),
        }
        data.extend(page(vaddr, v));
    }
    let pm = Pagemap { pages_id, entries };
    std::fs::write(dir.join(name), pm.encode()).unwrap();
    std::fs::write(dir.join(pages_name(pages_id)), data).unwrap();
}

/// Every page of pagemap `name` of the generation in `dir`, read through its chain.
fn read_back(dir: &Path, name: &str) -> BTreeMap<u64, Vec<u8>> {
    let mut out = BTreeMap::new();
    for x in locate(dir, name).unwrap() {
        for i in 0..x.nr_pages {
            let va = x.vaddr + i * P;
            out.insert(va, page_of(&x, va).to_vec());
        }
    }
    out
}

fn expected(pages: &BTreeMap<u64, u8>) -> BTreeMap<u64, Vec<u8>> {
    pages.iter().map(|(&va, &v)| (va, page(va, v))).collect()
}

fn link_parent(dir: &Path, parent: &str) {
    std::os::unix::fs::symlink(parent_target(parent), dir.join(PARENT_LINK)).unwrap();
}

#[test]
fn only_changed_pages_are_kept_and_the_chain_reads_back_exactly() {
    let store = tempfile::tempdir().unwrap();
    let (a, b, c) = (
        store.path().join("gen-1"),
        store.path().join("gen-2"),
        store.path().join("gen-3"),
    );
    // Generation 1: 16 pages at 0x10000, 4 at 0x80000; a shared memory segment.
    let mut mem: BTreeMap<u64, u8> = (0..16).map(|i| (0x10000 + i * P, 1)).collect();
    mem.extend((0..4).map(|i| (0x80000 + i * P, 1)));
    let shm: BTreeMap<u64, u8> = (0..4).map(|i| (i * P, 1)).collect();
    write_full(&a, "pagemap-1.img", 1, &mem);
    write_full(&a, "pagemap-shmem-7.img", 2, &shm);

    // Generation 2: pages 3..5 rewritten, page 15 freed, two new pages after the first run,
    // a new process.
    let mut mem2 = mem.clone();
    for i in 3..6 {
        mem2.insert(0x10000 + i * P, 2);
    }
    mem2.remove(&(0x10000 + 15 * P));
    mem2.insert(0x10000 + 16 * P, 2);
    mem2.insert(0x10000 + 17 * P, 2);
    let child: BTreeMap<u64, u8> = (0..3).map(|i| (0x10000 + i * P, 9)).collect();
    write_full(&b, "pagemap-1.img", 1, &mem2);
    write_full(&b, "pagemap-shmem-7.img", 2, &shm);
    write_full(&b, "pagemap-4.img", 3, &child);
    let (inc, _) = make_incremental(&b, &a, &[]).unwrap();
    link_parent(&b, "gen-1");
    assert_eq!(inc.pagemaps, 3);
    // Kept: 3 rewritten + 2 new pages of task 1, all 3 of the new process.
    assert_eq!(inc.written_bytes, 8 * P);
    // Left to the parent: 12 unchanged pages of the first run, 4 of the second, 4 of shmem.
    assert_eq!(inc.parent_bytes, 20 * P);
    let pm = Pagemap::read(&b.join("pagemap-1.img")).unwrap();
    let runs: Vec<(u64, u64, u32)> = pm
        .entries
        .iter()
        .map(|e| ((e.vaddr - 0x10000) / P, e.nr_pages, e.flags))
        .collect();
    assert_eq!(
        runs,
        [
            (0, 3, PE_PARENT),
            (3, 3, PE_PRESENT),
            (6, 9, PE_PARENT),
            (16, 2, PE_PRESENT),
            (0x70, 4, PE_PARENT)
        ]
    );
    assert_eq!(
        std::fs::metadata(b.join("pages-1.img")).unwrap().len(),
        5 * P
    );
    assert_eq!(std::fs::metadata(b.join("pages-2.img")).unwrap().len(), 0);
    assert_eq!(read_back(&b, "pagemap-1.img"), expected(&mem2));
    assert_eq!(read_back(&b, "pagemap-shmem-7.img"), expected(&shm));
    assert_eq!(read_back(&b, "pagemap-4.img"), expected(&child));

    // Generation 3 over 2 over 1: one page back to what generation 1 had (it is the parent's
    // bytes that count, not history), one page of the second run changed.
    let mut mem3 = mem2.clone();
    mem3.insert(0x10000 + 4 * P, 1);
    mem3.insert(0x80000 + 2 * P, 3);
    write_full(&c, "pagemap-1.img", 1, &mem3);
    let (inc, _) = make_incremental(&c, &b, &[]).unwrap();
    link_parent(&c, "gen-2");
    assert_eq!(inc.written_bytes, 2 * P);
    assert_eq!(read_back(&c, "pagemap-1.img"), expected(&mem3));
    // What is left in no file is not invented: generation 3 has no shmem pagemap.
    assert!(read_back(&c, "pagemap-shmem-7.img").is_empty());
    // No staging debris.
    let debris: Vec<String> = std::fs::read_dir(&c)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".cryo-"))
        .collect();
    assert!(debris.is_empty(), "{debris:?}");
}

#[test]
fn a_chain_that_lacks_a_page_is_refused() {
    let store = tempfile::tempdir().unwrap();
    let (a, b) = (store.path().join("gen-1"), store.path().join("gen-2"));
    write_full(&a, "pagemap-1.img", 1, &[(0x1000, 1)].into());
    std::fs::create_dir_all(&b).unwrap();
    let pm = Pagemap {
        pages_id: 1,
        entries: vec![Entry {
            vaddr: 0x1000,
            nr_pages: 2,
            flags: PE_PARENT,
        }],
    };
    std::fs::write(b.join("pagemap-1.img"), pm.encode()).unwrap();
    std::fs::write(b.join("pages-1.img"), b"").unwrap();
    link_parent(&b, "gen-1");
    let e = locate(&b, "pagemap-1.img").unwrap_err().to_string();
    assert!(
        e.contains("0x2000") && e.contains("does not have it"),
        "{e}"
    );
    // A pages image shorter than its pagemap says.
    std::fs::write(a.join("pages-1.img"), b"short").unwrap();
    let e = locate(&a, "pagemap-1.img").unwrap_err().to_string();
    assert!(e.contains("fewer pages"), "{e}");
}

#[test]
fn identical_files_are_shared_by_hard_link_and_the_parent_linked() {
    use std::os::unix::fs::MetadataExt;
    let store = tempfile::tempdir().unwrap();
    let (a, b) = (store.path().join("gen-1"), store.path().join("gen-2"));
    for d in [&a, &b] {
        std::fs::create_dir_all(d).unwrap();
        std::fs::write(d.join("rootfs-diff.tar.zst"), b"same changeset").unwrap();
    }
    std::fs::write(a.join("core-1.img"), b"old").unwrap();
    std::fs::write(b.join("core-1.img"), b"new").unwrap();
    let names = vec!["core-1.img".to_string(), "rootfs-diff.tar.zst".to_string()];
    let mut parent_manifest = crate::manifest::tests::sample();
    parent_manifest.files = crate::image::digest::digest_files(&a, &names).unwrap();
    parent_manifest.manifest_blake3 = "ab".repeat(32);
    let files = crate::image::digest::digest_files(&b, &names).unwrap();
    let parent = ParentImage {
        name: "gen-1".into(),
        dir: a.clone(),
        manifest: parent_manifest,
    };
    let inc = Increment {
        pagemaps: 1,
        written_bytes: 7,
        parent_bytes: 9,
        shares_extents: false,
    };
    let Lineage::Parent(record) = share_and_link(&b, &files, &parent, &inc).unwrap() else {
        panic!("a chain increment got no parent record");
    };
    assert_eq!(record.shared_files, ["rootfs-diff.tar.zst"]);
    assert_eq!(record.manifest_blake3, "ab".repeat(32));
    assert_eq!((record.pages_written, record.pages_in_parent), (7, 9));
    let ino = |p: &Path| std::fs::metadata(p).unwrap().ino();
    assert_eq!(
        ino(&a.join("rootfs-diff.tar.zst")),
        ino(&b.join("rootfs-diff.tar.zst"))
    );
    assert_ne!(ino(&a.join("core-1.img")), ino(&b.join("core-1.img")));
    assert_eq!(
        std::fs::read_link(b.join(PARENT_LINK)).unwrap(),
        Path::new("../gen-1")
    );
}

/// Sharing extents, a generation keeps the full layout and exactly the bytes received, not
/// the staged tail after them (the ranges the file system will not clone, here on whatever
/// file system the temp dir is, are written instead), and the digests it returns are those
/// of the file.
#[test]
fn a_shared_generation_holds_exactly_the_bytes_received() {
    let store = tempfile::tempdir().unwrap();
    let (a, b) = (store.path().join("gen-1"), store.path().join("gen-2"));
    let mem: BTreeMap<u64, u8> = (0..32).map(|i| (0x10000 + i * P, 1)).collect();
    write_full(&a, "pagemap-1.img", 1, &mem);
    let mut mem2 = mem.clone();
    for i in [0, 7, 8, 30] {
        mem2.insert(0x10000 + i * P, 2);
    }
    mem2.insert(0x90000, 2);
    write_full(&b, "pagemap-1.img", 1, &mem2);
    let received = std::fs::read(b.join("pages-1.img")).unwrap();
    let pagemap = std::fs::read(b.join("pagemap-1.img")).unwrap();
    // The receiver's staged tail, left untrimmed for a file it knows will be replaced.
    let mut staged = received.clone();
    staged.extend(vec![0u8; 3 * P as usize]);
    std::fs::write(b.join("pages-1.img"), &staged).unwrap();
    let (inc, digests) = super::super::shared::share_unchanged(&b, &a, &[]).unwrap();
    assert_eq!(std::fs::read(b.join("pages-1.img")).unwrap(), received);
    assert_eq!(std::fs::read(b.join("pagemap-1.img")).unwrap(), pagemap);
    assert_eq!(inc.written_bytes + inc.parent_bytes, received.len() as u64);
    assert!(inc.written_bytes >= 5 * P, "{inc:?}");
    assert_eq!(digests.len(), 1);
    assert_eq!(digests[0].record.name, "pages-1.img");
    assert_eq!(
        digests[0].record.blake3,
        blake3::hash(&received).to_hex().as_str()
    );
    let debris: Vec<String> = std::fs::read_dir(&b)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".cryo"))
        .collect();
    assert!(debris.is_empty(), "{debris:?}");
    // Already digested by the receiver: not again.
    write_full(&b, "pagemap-1.img", 1, &mem2);
    let (_, again) = super::super::shared::share_unchanged(&b, &a, &digests).unwrap();
    assert!(again.is_empty());
}
