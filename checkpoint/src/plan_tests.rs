#![allow(clippy::unwrap_used)]
use super::*;

fn spec(json: &str) -> Spec {
    serde_json::from_str(json).unwrap()
}

const SPEC: &str = r#"{
  "ociVersion": "1.0.2",
  "root": {"path": "rootfs"},
  "mounts": [
    {"destination": "/proc", "type": "proc", "source": "proc"},
    {"destination": "/data", "type": "bind", "source": "/srv/data", "options": ["rbind", "rw"]},
    {"destination": "/etc/hosts", "source": "/tmp/hosts", "options": ["bind"]},
    {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup"}
  ],
  "linux": {
    "namespaces": [{"type": "pid"}, {"type": "network", "path": "/var/run/netns/x"}, {"type": "ipc", "path": "/proc/7/ns/ipc"}, {"type": "mount"}],
    "maskedPaths": ["/proc/kcore", "/proc/acpi"],
    "devices": [{"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229}]
  }
}"#;

#[test]
fn dump_plan_makes_binds_masks_devices_cgroups_and_netns_external() {
    let facts = DumpFacts {
        rootfs: "/b/rootfs".into(),
        mounts: vec![
            ContainerMount {
                mount_point: "/sys/fs/cgroup/freezer".into(),
                root: "/cryo/c1".into(),
                fstype: "cgroup".into(),
            },
            ContainerMount {
                mount_point: "/dev/shm".into(),
                root: "/".into(),
                fstype: "tmpfs".into(),
            },
        ],
        masked_files: vec!["/proc/kcore".into()],
        ns_inodes: vec![(LinuxNamespaceType::Network, 4026532000)],
        freeze_cgroup: Some("/sys/fs/cgroup/freezer/cryo/c1".into()),
        own_cgroup_ns: false,
        cgroup_hierarchies: vec!["freezer".into(), "cpu,cpuacct".into()],
    };
    let plan = dump_plan(&spec(SPEC), &facts, &[]).unwrap();
    assert_eq!(plan.cgroup_dump_controllers, ["freezer", "cpu,cpuacct"]);
    let keys: Vec<(&str, &str)> = plan
        .ext_mounts
        .iter()
        .map(|m| (m.key.as_str(), m.val.as_str()))
        .collect();
    assert_eq!(
        keys,
        vec![
            ("/data", "/data"),
            ("/etc/hosts", "/etc/hosts"),
            ("/sys/fs/cgroup/freezer", "/sys/fs/cgroup/freezer"),
            ("/proc/kcore", "/dev/null"),
            ("/dev/fuse", "/dev/fuse"),
        ]
    );
    assert_eq!(plan.externals, vec!["net[4026532000]:extRootNetNS"]);
    assert_eq!(plan.empty_ns, CLONE_NEWNET);
    assert_eq!(plan.root, PathBuf::from("/b/rootfs"));
}

#[test]
fn restore_plan_maps_sources_stdio_and_namespaces() {
    let facts = RestoreFacts {
        criu_root: "/run/cryo/c2/criu-root".into(),
        host_cgroup_mounts: vec![
            "/sys/fs/cgroup/freezer".into(),
            "/sys/fs/cgroup/cpu,cpuacct".into(),
        ],
        cgroup_path: "/cryo/c2".into(),
    };
    let desc = vec![
        "/dev/null".to_string(),
        "pipe:[11]".into(),
        "pipe:[12]".into(),
    ];
    let plan = restore_plan(&spec(SPEC), &facts, &desc, &["network".into()]).unwrap();
    let find = |k: &str| {
        plan.ext_mounts
            .iter()
            .find(|m| m.key == k)
            .map(|m| m.val.clone())
    };
    assert_eq!(find("/data").as_deref(), Some("/srv/data"));
    assert_eq!(find("/etc/hosts").as_deref(), Some("/tmp/hosts"));
    assert_eq!(
        find("/sys/fs/cgroup/freezer").as_deref(),
        Some("/sys/fs/cgroup/freezer/cryo/c2")
    );
    assert_eq!(
        find("/sys/fs/cgroup/cpu,cpuacct").as_deref(),
        Some("/sys/fs/cgroup/cpu,cpuacct/cryo/c2")
    );
    assert_eq!(find("/dev/null").as_deref(), Some("/dev/null"));
    assert_eq!(find("/dev/fuse").as_deref(), Some("/dev/fuse"));
    assert_eq!(
        plan.inherit_fds,
        vec![
            InheritFd {
                key: "pipe:[11]".into(),
                source: FdSource::Stdio(1)
            },
            InheritFd {
                key: "pipe:[12]".into(),
                source: FdSource::Stdio(2)
            },
            InheritFd {
                key: "extRootNetNS".into(),
                source: FdSource::NsPath("/var/run/netns/x".into())
            },
        ]
    );
    assert_eq!(
        plan.join_ns,
        vec![("ipc".to_string(), PathBuf::from("/proc/7/ns/ipc"))]
    );
}

fn cgroup_mount(mount_point: &str, root: &str, fstype: &str) -> ContainerMount {
    ContainerMount {
        mount_point: mount_point.into(),
        root: root.into(),
        fstype: fstype.into(),
    }
}

#[test]
fn cgroup_mounts_of_a_container_with_its_own_cgroup_namespace_stay_with_criu() {
    // What cryo reads in the mountinfo of a container with a cgroup namespace: the roots are
    // shown relative to cryo's namespace, so they look like binds; CRIU dumps them as real
    // mounts and mounts them afresh at restore (runc leaves them to CRIU the same way).
    let pure_v2 = vec![cgroup_mount("/sys/fs/cgroup", "/cryo/c1", "cgroup2")];
    let hybrid = vec![
        cgroup_mount("/sys/fs/cgroup/cpu", "/cryo/c1", "cgroup"),
        cgroup_mount("/sys/fs/cgroup/freezer", "/cryo/c1", "cgroup"),
    ];
    for mounts in [pure_v2, hybrid] {
        let own_ns = DumpFacts {
            mounts: mounts.clone(),
            own_cgroup_ns: true,
            ..Default::default()
        };
        let plan = dump_plan(&spec(SPEC), &own_ns, &[]).unwrap();
        assert!(
            plan.ext_mounts
                .iter()
                .all(|m| !m.key.starts_with("/sys/fs/cgroup")),
            "{:?}",
            plan.ext_mounts
        );
        // Without a namespace of its own those mounts are binds of host cgroup directories.
        let shared_ns = DumpFacts {
            mounts: mounts.clone(),
            ..Default::default()
        };
        let plan = dump_plan(&spec(SPEC), &shared_ns, &[]).unwrap();
        for m in &mounts {
            assert!(
                plan.ext_mounts
                    .iter()
                    .any(|e| e.key == m.mount_point && e.val == m.mount_point),
                "{} missing in {:?}",
                m.mount_point,
                plan.ext_mounts
            );
        }
    }
    // A cgroup2 mount of the whole hierarchy (cgroup v2, no cgroup namespace) is CRIU's.
    let whole = DumpFacts {
        mounts: vec![cgroup_mount("/sys/fs/cgroup", "/", "cgroup2")],
        ..Default::default()
    };
    let plan = dump_plan(&spec(SPEC), &whole, &[]).unwrap();
    assert!(plan.ext_mounts.iter().all(|m| m.key != "/sys/fs/cgroup"));
}

#[test]
fn restore_offers_each_host_cgroup_hierarchy_where_the_container_sees_it() {
    let mapping = |host_cgroup_mounts: Vec<PathBuf>| {
        let facts = RestoreFacts {
            host_cgroup_mounts,
            cgroup_path: "/cryo/c2".into(),
            ..Default::default()
        };
        let plan = restore_plan(&spec(SPEC), &facts, &[], &[]).unwrap();
        plan.ext_mounts
            .into_iter()
            .filter(|m| m.key.starts_with("/sys/fs/cgroup"))
            .map(|m| (m.key, m.val))
            .collect::<Vec<_>>()
    };
    // Pure cgroup v2: the hierarchy is /sys/fs/cgroup itself (no trailing "/": CRIU matches
    // the key exactly).
    assert_eq!(
        mapping(vec!["/sys/fs/cgroup".into()]),
        vec![(
            "/sys/fs/cgroup".to_string(),
            "/sys/fs/cgroup/cryo/c2".to_string()
        )]
    );
    // Hybrid: each v1 controller and the unified mount below it.
    assert_eq!(
        mapping(vec![
            "/sys/fs/cgroup/freezer".into(),
            "/sys/fs/cgroup/unified".into()
        ]),
        vec![
            (
                "/sys/fs/cgroup/freezer".to_string(),
                "/sys/fs/cgroup/freezer/cryo/c2".to_string()
            ),
            (
                "/sys/fs/cgroup/unified".to_string(),
                "/sys/fs/cgroup/unified/cryo/c2".to_string()
            ),
        ]
    );
    // A cgroup hierarchy mounted elsewhere is not the container's to see.
    assert_eq!(mapping(vec!["/mnt/cgroup".into()]), vec![]);
}

#[test]
fn bad_inputs_are_refused_with_reasons() {
    let e = empty_ns_mask(&["pid".into()]).unwrap_err().to_string();
    assert!(e.contains("only \"network\""), "{e}");
    let no_linux = spec(r#"{"ociVersion":"1.0.2","root":{"path":"r"}}"#);
    let mut s = no_linux.clone();
    s.set_linux(None);
    assert_eq!(
        dump_plan(&s, &DumpFacts::default(), &[]),
        Err(PlanError::NoLinux)
    );
    let cg = spec(
        r#"{"ociVersion":"1.0.2","linux":{"namespaces":[{"type":"cgroup","path":"/proc/1/ns/cgroup"}]}}"#,
    );
    let e = restore_plan(&cg, &RestoreFacts::default(), &[], &[]).unwrap_err();
    assert_eq!(e, PlanError::UnsupportedNamespace("cgroup".into()));
}
