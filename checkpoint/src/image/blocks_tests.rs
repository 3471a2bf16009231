#![allow(clippy::unwrap_used)]
use super::*;

fn data(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 % 253) as u8).collect()
}

/// Lengths around every boundary the tree has: empty, one chunk, one block, two, a power of
/// two of blocks and one byte more, an odd count with a partial last block.
const LENGTHS: &[usize] = &[
    0,
    1,
    1024,
    16 << 10,
    (16 << 10) + 1,
    32 << 10,
    (48 << 10) + 1,
    (64 << 10) - 1,
    64 << 10,
    (64 << 10) + 4096,
    (7 << 20) + 12345,
];

#[test]
fn blocks_merge_into_the_files_blake3_for_every_shape_of_tree() {
    for &len in LENGTHS {
        let d = data(len);
        let want = blake3::hash(&d);
        for threads in [1, 3] {
            let (b, root) = BlockDigests::of_bytes(&d, threads);
            assert_eq!(root, want, "len {len}, {threads} threads");
            assert_eq!(b.len, len as u64);
            assert_eq!(b.cvs.is_empty(), len <= BLOCK as usize, "len {len}");
        }
    }
}

#[test]
fn the_writers_hasher_agrees_however_the_bytes_arrive() {
    for &len in LENGTHS {
        let d = data(len);
        let (whole, root) = BlockDigests::of_bytes(&d, 2);
        for piece in [1usize, 4096, 16 << 10, 40000, 1 << 20] {
            let mut h = BlockHasher::default();
            for p in d.chunks(piece) {
                h.update(p);
            }
            let (b, r) = h.finish();
            assert_eq!(r, root, "len {len}, pieces of {piece}");
            assert_eq!(b, whole, "len {len}, pieces of {piece}");
        }
    }
}

#[test]
fn each_block_is_checked_on_its_own_and_one_flipped_bit_is_found() {
    let mut d = data((5 << 20) + 100);
    let (b, _) = BlockDigests::of_bytes(&d, 2);
    let blocks = BlockDigests::count(d.len() as u64);
    for i in 0..blocks {
        let from = (i * BLOCK) as usize;
        let to = (from + BLOCK as usize).min(d.len());
        assert!(b.block_matches(i, &d[from..to]), "block {i}");
    }
    d[(3 * BLOCK + 17) as usize] ^= 0x10;
    assert!(!b.block_matches(3, &d[(3 * BLOCK) as usize..(4 * BLOCK) as usize]));
    assert!(!b.block_matches(blocks, &[]), "a block past the end");
}

#[test]
fn the_side_file_reads_back_and_damage_is_refused() {
    let d = data((1 << 20) + 3);
    let (b, _) = BlockDigests::of_bytes(&d, 1);
    let bytes = b.encode();
    assert_eq!(BlockDigests::decode(&bytes).unwrap(), b);
    assert!(BlockDigests::decode(&bytes[..bytes.len() - 1]).is_err());
    assert!(BlockDigests::decode(b"CRYOB3K1").is_err());
    let mut other = bytes.clone();
    other[9] = 0x80; // blocks of 32 KiB
    assert!(BlockDigests::decode(&other)
        .unwrap_err()
        .contains("this cryo reads"));
    let small = BlockDigests::of_bytes(b"tiny", 1).0;
    assert_eq!(BlockDigests::decode(&small.encode()).unwrap(), small);
}

#[test]
fn a_file_on_disk_gives_what_its_bytes_give() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("pages-1.img");
    let d = data((3 << 20) + 5);
    std::fs::write(&p, &d).unwrap();
    assert_eq!(
        BlockDigests::of_file(&p).unwrap(),
        BlockDigests::of_bytes(&d, 1)
    );
    assert_eq!(blocks_name("pages-1.img"), "pages-1.img.blocks");
}
