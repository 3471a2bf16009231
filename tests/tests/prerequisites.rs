//! Fails loudly (never skips) when the machine lacks what the end-to-end tests need.

#[test]
fn root_criu_4_2_and_busybox_are_present() {
    cryo_tests::require_prerequisites();
    assert!(cryo_tests::cryo_bin().exists());
}
