use super::*;

fn any(type_url: &str, value: Vec<u8>) -> Any {
    let mut any = Any::new();
    any.type_url = type_url.to_string();
    any.value = value;
    any
}

/// A `runtimeoptions.v1.Options` as containerd encodes it: field 1 type_url, field 2
/// config_path, both strings.
fn runtime_options(config_path: &str) -> Any {
    let mut fields = Empty::new();
    let unknown = fields.special_fields.mut_unknown_fields();
    unknown.add_length_delimited(1, b"io.containerd.cryo.v1.Config".to_vec());
    unknown.add_length_delimited(2, config_path.as_bytes().to_vec());
    any(
        RUNTIME_OPTIONS_TYPE,
        fields.write_to_bytes().expect("encode"),
    )
}

#[test]
fn no_options_give_the_defaults() {
    let options = ShimOptions::from_any(None).expect("defaults");
    assert_eq!(options.root, PathBuf::from("/run/containerd/cryo"));
    assert_eq!(options.checkpoint, CheckpointDefaults::default());
    assert!(options.checkpoint.page_staging);
    assert_eq!(
        ShimOptions::from_any(Some(&Any::new())).expect("empty any"),
        options
    );
}

#[test]
fn runc_options_name_the_binary_and_root() {
    let runc = RuncOptions {
        binary_name: "/opt/cryo/bin/cryo".into(),
        root: "/run/cryo-ctr".into(),
        systemd_cgroup: true,
        criu_work_path: "/var/lib/cryo-work".into(),
        no_pivot_root: true,
        ..Default::default()
    };
    let options = ShimOptions::from_any(Some(&any(
        "type.googleapis.com/containerd.runc.v1.Options",
        runc.write_to_bytes().expect("encode"),
    )))
    .expect("runc options");
    assert_eq!(options.cryo, PathBuf::from("/opt/cryo/bin/cryo"));
    assert_eq!(
        options.state_root("k8s.io"),
        PathBuf::from("/run/cryo-ctr/k8s.io")
    );
    assert!(options.systemd_cgroup && options.no_pivot_root);
    assert_eq!(
        options.criu_work_path,
        Some(PathBuf::from("/var/lib/cryo-work"))
    );
}

#[test]
fn runtime_options_read_the_config_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("cryo.toml");
    fs::write(
        &path,
        r#"
cryo = "/usr/local/bin/cryo"
root = "/run/cryo-shim"
criu = "/usr/local/sbin/criu"

[checkpoint]
rootfs_snapshot = "none"
page_staging = false
compress_pages = true
"#,
    )
    .expect("write config");
    let options = ShimOptions::from_any(Some(&runtime_options(path.to_str().expect("utf-8"))))
        .expect("config file");
    assert_eq!(options.cryo, PathBuf::from("/usr/local/bin/cryo"));
    assert_eq!(options.root, PathBuf::from("/run/cryo-shim"));
    assert_eq!(options.criu, Some(PathBuf::from("/usr/local/sbin/criu")));
    assert_eq!(
        options.checkpoint,
        CheckpointDefaults {
            rootfs_snapshot: RootfsSnapshot::None,
            page_staging: false,
            compress_pages: true,
        }
    );
}

#[test]
fn a_partial_config_keeps_the_other_defaults() {
    let file: ConfigFile = toml::from_str("[checkpoint]\ncompress_pages = true\n").expect("toml");
    let options = ShimOptions::from_config(file).expect("config");
    assert!(options.checkpoint.compress_pages);
    assert!(options.checkpoint.page_staging);
    assert_eq!(options.checkpoint.rootfs_snapshot, RootfsSnapshot::Auto);
    assert_eq!(options.root, PathBuf::from(DEFAULT_ROOT));
}

#[test]
fn bad_configs_name_the_problem() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("cryo.toml");

    fs::write(&path, "[checkpoint]\npage_stagin = false\n").expect("write");
    let err = ShimOptions::from_config_file(&path).expect_err("typo");
    let text = err.to_string();
    assert!(
        text.contains("cryo.toml") && text.contains("page_stagin"),
        "{text}"
    );

    fs::write(&path, "[checkpoint]\nrootfs_snapshot = \"always\"\n").expect("write");
    let text = ShimOptions::from_config_file(&path)
        .expect_err("bad mode")
        .to_string();
    assert!(text.contains("always"), "{text}");

    fs::write(&path, "root = \"run/cryo\"\n").expect("write");
    let text = ShimOptions::from_config_file(&path)
        .expect_err("relative root")
        .to_string();
    assert!(
        text.contains("absolute") && text.contains("run/cryo"),
        "{text}"
    );

    let missing = dir.path().join("absent.toml");
    let text = ShimOptions::from_any(Some(&runtime_options(missing.to_str().expect("utf-8"))))
        .expect_err("missing file")
        .to_string();
    assert!(
        text.contains("absent.toml") && text.contains("ConfigPath"),
        "{text}"
    );
}

#[test]
fn unknown_option_types_are_refused() {
    let text = ShimOptions::from_any(Some(&any("io.containerd.runhcs.v1.Options", vec![])))
        .expect_err("unknown type")
        .to_string();
    assert!(text.contains("io.containerd.runhcs.v1.Options"), "{text}");
    assert!(
        text.contains(RUNC_OPTIONS_TYPE) && text.contains("ConfigPath"),
        "{text}"
    );
}

#[test]
fn saved_options_round_trip_and_default_when_absent() {
    let dir = tempfile::tempdir().expect("tempdir");
    assert_eq!(
        ShimOptions::load(dir.path()).expect("absent"),
        ShimOptions::default()
    );
    let options = ShimOptions {
        root: PathBuf::from("/run/x"),
        checkpoint: CheckpointDefaults {
            compress_pages: true,
            ..Default::default()
        },
        ..Default::default()
    };
    options.save(dir.path()).expect("save");
    assert_eq!(ShimOptions::load(dir.path()).expect("load"), options);
}

#[test]
fn the_example_config_is_valid_and_documents_the_defaults() {
    let example =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/clients/cryo-shim.toml");
    let options = ShimOptions::from_config_file(&example).expect("examples/clients/cryo-shim.toml");
    let defaults = ShimOptions::default();
    assert_eq!(options.cryo, PathBuf::from("/usr/local/bin/cryo"));
    assert_eq!(options.root, defaults.root);
    assert_eq!(options.criu, None);
    assert_eq!(options.checkpoint, defaults.checkpoint);
}
