#![allow(clippy::unwrap_used)]
//! Chains of synthetic generations: a generation verifies only with every generation it
//! depends on, each the very image it was made from.

use std::path::Path;

use super::*;
use crate::image::digest::digest_files;
use crate::image::verify_image;

/// Write a generation `name` in `store` holding `files`, over `parent` (name, its manifest).
fn generation(
    store: &Path,
    name: &str,
    files: &[(&str, &str)],
    parent: Option<(&str, &Manifest)>,
) -> Manifest {
    let dir = store.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    for (f, content) in files {
        std::fs::write(dir.join(f), content).unwrap();
    }
    let names: Vec<String> = files.iter().map(|(f, _)| f.to_string()).collect();
    let mut m = crate::manifest::tests::sample();
    m.files = digest_files(&dir, &names).unwrap();
    m.parent = parent.map(|(p, pm)| ParentRecord {
        name: p.into(),
        manifest_blake3: pm.manifest_blake3.clone(),
        pages_written: 0,
        pages_in_parent: 0,
        shared_files: vec![],
    });
    if let Some((p, _)) = parent {
        std::os::unix::fs::symlink(Path::new("..").join(p), dir.join(PARENT_LINK)).unwrap();
    }
    m.write(&dir).unwrap();
    Manifest::read(&dir).unwrap().unwrap()
}

#[test]
fn a_generation_verifies_with_its_whole_chain() {
    let s = tempfile::tempdir().unwrap();
    let g1 = generation(
        s.path(),
        "gen-1",
        &[("inventory.img", "i1"), ("pages-1.img", "full")],
        None,
    );
    let g2 = generation(
        s.path(),
        "gen-2",
        &[("inventory.img", "i2"), ("pages-1.img", "d2")],
        Some(("gen-1", &g1)),
    );
    generation(
        s.path(),
        "gen-3",
        &[("inventory.img", "i3"), ("pages-1.img", "d3")],
        Some(("gen-2", &g2)),
    );
    let v = verify_image(&s.path().join("gen-3")).unwrap();
    assert_eq!(
        v.ancestors,
        [s.path().join("gen-2"), s.path().join("gen-1")]
    );
    assert_eq!(v.files_checked, 6);

    // Damage at the root of the chain shows at its top, naming the generation.
    std::fs::write(s.path().join("gen-1/pages-1.img"), "fulL").unwrap();
    let e = verify_image(&s.path().join("gen-3"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("depends on generation gen-1, which is damaged"),
        "{e}"
    );
    // Sizes only: the same damage passes a quick look.
    assert!(verify_chain(&s.path().join("gen-3"), Thoroughness::Sizes).is_ok());
    std::fs::write(s.path().join("gen-1/pages-1.img"), "full").unwrap();

    // A parent replaced by another image (intact, but not the one it was made from).
    let other = generation(
        s.path(),
        "other",
        &[("inventory.img", "x"), ("pages-1.img", "y")],
        None,
    );
    std::fs::rename(s.path().join("gen-1"), s.path().join("gen-1.orig")).unwrap();
    std::fs::rename(s.path().join("other"), s.path().join("gen-1")).unwrap();
    let e = verify_image(&s.path().join("gen-2"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("no longer the image it was made from"), "{e}");
    let _ = other;
    std::fs::remove_dir_all(s.path().join("gen-1")).unwrap();
    let e = verify_image(&s.path().join("gen-2"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("gen-1, which is gone"), "{e}");
    std::fs::rename(s.path().join("gen-1.orig"), s.path().join("gen-1")).unwrap();
    verify_image(&s.path().join("gen-3")).unwrap();
}

#[test]
fn links_must_be_what_the_manifest_records() {
    let s = tempfile::tempdir().unwrap();
    let g1 = generation(s.path(), "gen-1", &[("inventory.img", "i1")], None);
    generation(
        s.path(),
        "gen-2",
        &[("inventory.img", "i2")],
        Some(("gen-1", &g1)),
    );
    let link = s.path().join("gen-2").join(PARENT_LINK);
    std::fs::remove_file(&link).unwrap();
    let e = verify_image(&s.path().join("gen-2"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("link is missing"), "{e}");
    std::os::unix::fs::symlink("/somewhere/else", &link).unwrap();
    let e = verify_image(&s.path().join("gen-2"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("points to /somewhere/else"), "{e}");
    // A full image with a parent link CRIU would follow.
    std::os::unix::fs::symlink("../gen-2", s.path().join("gen-1").join(PARENT_LINK)).unwrap();
    let e = verify_image(&s.path().join("gen-1"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("does not record"), "{e}");
}

#[test]
fn page_images_of_the_whole_chain_are_left_to_the_check_beside_criu() {
    use crate::image::alongside::AlongsideCheck;
    use crate::image::verify_image_but_pages;
    let s = tempfile::tempdir().unwrap();
    let g1 = generation(
        s.path(),
        "gen-1",
        &[("inventory.img", "i1"), ("pages-1.img", "full")],
        None,
    );
    generation(
        s.path(),
        "gen-2",
        &[("inventory.img", "i2"), ("pages-1.img", "d2")],
        Some(("gen-1", &g1)),
    );
    let top = s.path().join("gen-2");
    let v = verify_image_but_pages(&top).unwrap();
    let pending: Vec<_> = v
        .pages_pending
        .iter()
        .map(|p| (p.dir.clone(), p.file.clone()))
        .collect();
    assert_eq!(
        pending,
        [
            (top.clone(), "pages-1.img".to_string()),
            (s.path().join("gen-1"), "pages-1.img".to_string())
        ]
    );
    assert_eq!(v.files_checked, 2, "the other files are checked at once");

    // A flipped page byte passes the first look and is caught by the check beside CRIU.
    std::fs::write(s.path().join("gen-1/pages-1.img"), "fulL").unwrap();
    let v = verify_image_but_pages(&top).unwrap();
    let e = AlongsideCheck::start(v.pages_pending, Vec::new())
        .finish()
        .unwrap_err();
    assert!(
        matches!(&e, ImageError::Digest { dir, file } if dir.ends_with("gen-1") && file == "pages-1.img"),
        "{e}"
    );
    // A page image of another size, or any other damaged file, is refused at once.
    std::fs::write(s.path().join("gen-1/pages-1.img"), "ful").unwrap();
    assert!(verify_image_but_pages(&top).is_err());
    std::fs::write(s.path().join("gen-1/pages-1.img"), "full").unwrap();
    std::fs::write(s.path().join("gen-1/inventory.img"), "I1").unwrap();
    assert!(verify_image_but_pages(&top).is_err());
}
