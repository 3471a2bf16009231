#![allow(clippy::unwrap_used)]
//! A two-generation chain of synthetic images: the restore of the newer one reads the older
//! one's pages only where the newer one left them to it, and only those are checked.

use std::path::Path;

use super::*;
use crate::image::alongside::AlongsideCheck;
use crate::image::blocks::{blocks_name, BlockDigests, BLOCK};
use crate::image::digest::digest_files;
use crate::image::verify::ImageError;
use crate::image::verify_image_but_pages;
use crate::manifest::Manifest;
use crate::page_receiver::protocol::{PAGE_SIZE, PE_PARENT, PE_PRESENT};
use crate::store::pagemap::{Entry, Pagemap};
use crate::store::{ParentRecord, PARENT_LINK};

const PAGES: u64 = 64;
/// The pages the newer generation rewrote: the first 16 (64 KiB, four blocks).
const CHANGED: u64 = 16;
const VADDR: u64 = 0x7f00_0000_0000;

/// Write a generation: pagemap-1.img with `entries`, pages-1.img with `data`, the side file
/// of the pages, a manifest over all of it.
fn generation(dir: &Path, entries: Vec<Entry>, data: &[u8], parent: Option<&Manifest>) -> Manifest {
    std::fs::create_dir_all(dir).unwrap();
    let pm = Pagemap {
        pages_id: 1,
        entries,
    };
    std::fs::write(dir.join("pagemap-1.img"), pm.encode()).unwrap();
    std::fs::write(dir.join("pages-1.img"), data).unwrap();
    let (blocks, _) = BlockDigests::of_bytes(data, 1);
    std::fs::write(dir.join(blocks_name("pages-1.img")), blocks.encode()).unwrap();
    std::fs::write(dir.join("inventory.img"), "inventory").unwrap();
    let names = [
        "inventory.img",
        "pagemap-1.img",
        "pages-1.img",
        "pages-1.img.blocks",
    ]
    .map(String::from);
    let mut m = crate::manifest::tests::sample();
    m.files = digest_files(dir, &names).unwrap();
    m.parent = parent.map(|pm| ParentRecord {
        name: "gen-1".into(),
        manifest_blake3: pm.manifest_blake3.clone(),
        pages_written: 0,
        pages_in_parent: 0,
        shared_files: vec![],
    });
    if parent.is_some() {
        std::os::unix::fs::symlink("../gen-1", dir.join(PARENT_LINK)).unwrap();
    }
    m.write(dir).unwrap();
    Manifest::read(dir).unwrap().unwrap()
}

fn chain(store: &Path) {
    let full: Vec<u8> = (0..PAGES * PAGE_SIZE).map(|i| (i % 251) as u8).collect();
    let g1 = generation(
        &store.join("gen-1"),
        vec![Entry {
            vaddr: VADDR,
            nr_pages: PAGES,
            flags: PE_PRESENT,
        }],
        &full,
        None,
    );
    generation(
        &store.join("gen-2"),
        vec![
            Entry {
                vaddr: VADDR,
                nr_pages: CHANGED,
                flags: PE_PRESENT,
            },
            Entry {
                vaddr: VADDR + CHANGED * PAGE_SIZE,
                nr_pages: PAGES - CHANGED,
                flags: PE_PARENT,
            },
        ],
        &vec![9u8; (CHANGED * PAGE_SIZE) as usize],
        Some(&g1),
    );
}

fn check(top: &Path) -> Result<u64, ImageError> {
    let mut pending = verify_image_but_pages(top).unwrap().pages_pending;
    let reads = chain_reads(top).unwrap();
    narrow_to_reads(&reads, &mut pending).unwrap();
    AlongsideCheck::start(pending, reads.in_order)
        .finish()
        .map(|t| t.unread_bytes)
}

#[test]
fn a_restore_reads_the_parents_pages_only_where_they_were_left_to_it() {
    let s = tempfile::tempdir().unwrap();
    chain(s.path());
    let top = s.path().join("gen-2");
    let reads = pages_read(&top).unwrap();
    let at = |g: &str| s.path().join(g).join("pages-1.img").canonicalize().unwrap();
    assert_eq!(reads[&at("gen-2")], [(0, CHANGED * PAGE_SIZE)]);
    assert_eq!(
        reads[&at("gen-1")],
        [(CHANGED * PAGE_SIZE, PAGES * PAGE_SIZE)]
    );
    assert_eq!(check(&top).unwrap(), CHANGED * PAGE_SIZE);
}

#[test]
fn damage_the_restore_would_read_is_caught_and_damage_it_never_reads_is_not_its_concern() {
    let s = tempfile::tempdir().unwrap();
    chain(s.path());
    let top = s.path().join("gen-2");
    let pages = s.path().join("gen-1/pages-1.img");
    let mut data = std::fs::read(&pages).unwrap();
    // A page the newer generation replaced: never restored.
    data[100] ^= 1;
    std::fs::write(&pages, &data).unwrap();
    assert!(check(&top).is_ok());
    // A page it still takes from its parent.
    data[(CHANGED * PAGE_SIZE + 3 * BLOCK + 5) as usize] ^= 1;
    std::fs::write(&pages, &data).unwrap();
    let e = check(&top).unwrap_err();
    assert!(
        matches!(&e, ImageError::Digest { dir, file } if dir.ends_with("gen-1") && file == "pages-1.img"),
        "{e}"
    );
}

#[test]
fn block_digests_that_do_not_add_up_to_the_files_digest_are_refused() {
    let s = tempfile::tempdir().unwrap();
    chain(s.path());
    let top = s.path().join("gen-2");
    let mut pending = verify_image_but_pages(&top).unwrap().pages_pending;
    let reads = chain_reads(&top).unwrap();
    narrow_to_reads(&reads, &mut pending).unwrap();
    // The side file of other bytes of the same length, after verification (as if it had
    // been made wrong and digested so).
    let other = vec![1u8; (PAGES * PAGE_SIZE) as usize];
    let (wrong, _) = BlockDigests::of_bytes(&other, 1);
    std::fs::write(s.path().join("gen-1/pages-1.img.blocks"), wrong.encode()).unwrap();
    let e = AlongsideCheck::start(pending, reads.in_order)
        .finish()
        .unwrap_err();
    assert!(
        matches!(&e, ImageError::Digest { file, .. } if file == "pages-1.img.blocks"),
        "{e}"
    );
}

#[test]
fn an_image_without_block_digests_is_checked_whole() {
    let s = tempfile::tempdir().unwrap();
    chain(s.path());
    let top = s.path().join("gen-2");
    let mut pending = verify_image_but_pages(&top).unwrap().pages_pending;
    for p in &mut pending {
        p.blocks_listed = false;
    }
    narrow_to_reads(&chain_reads(&top).unwrap(), &mut pending).unwrap();
    assert!(pending.iter().all(|p| p.only.is_none()));
    let t = AlongsideCheck::start(pending, Vec::new()).finish().unwrap();
    assert_eq!(t.unread_bytes, 0);
}

#[test]
fn ranges_are_sorted_and_merged() {
    assert_eq!(
        merged(vec![(8, 12), (0, 4), (4, 6), (10, 20), (30, 31)]),
        vec![(0, 6), (8, 20), (30, 31)]
    );
    assert!(merged(Vec::new()).is_empty());
}

#[test]
fn without_the_read_order_the_blocks_read_are_still_checked() {
    let s = tempfile::tempdir().unwrap();
    chain(s.path());
    let top = s.path().join("gen-2");
    let pages = s.path().join("gen-1/pages-1.img");
    let mut data = std::fs::read(&pages).unwrap();
    data[(PAGES * PAGE_SIZE - 1) as usize] ^= 1;
    std::fs::write(&pages, &data).unwrap();
    let mut pending = verify_image_but_pages(&top).unwrap().pages_pending;
    narrow_to_reads(&chain_reads(&top).unwrap(), &mut pending).unwrap();
    let e = AlongsideCheck::start(pending, Vec::new())
        .finish()
        .unwrap_err();
    assert!(
        matches!(&e, ImageError::Digest { dir, file } if dir.ends_with("gen-1") && file == "pages-1.img"),
        "{e}"
    );
}
