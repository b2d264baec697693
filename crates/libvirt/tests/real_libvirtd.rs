//! The seed's walk-through against a real, private libvirtd (QEMU driver),
//! started by scripts/libvirtd/start-libvirtd.sh and stopped on drop.
//! Each step is checked with `virsh` and `qemu-img`, as a person would.
//!
//! Needs root and the packages of `scripts/install-deps.sh --libvirt`.
//! Without them the test fails, unless STRATA_SKIP_LIBVIRTD_TESTS=1.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use common::*;
use strata_libvirt::xml::STRATA_NS;
use strata_libvirt::{
    blockcommit, snapshot_create, snapshot_delete, snapshot_list, snapshot_revert,
    BlockCommitOptions, Error, SnapshotCreateOptions,
};
use strata_merge::Hooks;
use virt::connect::Connect;
use virt::domain::Domain;

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../scripts/libvirtd")
        .join(name)
}

/// A private libvirtd whose state lives in a temporary directory.
struct Libvirtd {
    dir: tempfile::TempDir,
    uri: String,
}

impl Libvirtd {
    fn start() -> Option<Libvirtd> {
        let skip = std::env::var("STRATA_SKIP_LIBVIRTD_TESTS").is_ok_and(|v| v == "1");
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new("bash")
            .arg(script("start-libvirtd.sh"))
            .env("D", dir.path())
            .output();
        let ok = matches!(&out, Ok(o) if o.status.success());
        if !ok {
            let why = match &out {
                Ok(o) => format!(
                    "{}{}",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                ),
                Err(e) => e.to_string(),
            };
            if skip {
                eprintln!("SKIPPED (STRATA_SKIP_LIBVIRTD_TESTS=1): libvirtd did not start: {why}");
                return None;
            }
            panic!(
                "could not start a private libvirtd with scripts/libvirtd/start-libvirtd.sh \
                 (needs root and `scripts/install-deps.sh --libvirt`; set \
                 STRATA_SKIP_LIBVIRTD_TESTS=1 to skip): {why}"
            );
        }
        let uri = format!(
            "qemu+unix:///system?socket={}/run/libvirt-sock",
            dir.path().display()
        );
        Some(Libvirtd { dir, uri })
    }

    fn virsh(&self, args: &[&str]) -> String {
        let out = Command::new("virsh")
            .arg("-c")
            .arg(&self.uri)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "virsh {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Libvirtd {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(script("stop-libvirtd.sh"))
            .env("D", self.dir.path())
            .output();
    }
}

fn qemu_img(args: &[&str]) -> (bool, String) {
    let out = Command::new("qemu-img").args(args).output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// `qemu-img info --backing-chain` "backing file:" lines.
fn backing_lines(path: &Path) -> Vec<String> {
    let (ok, out) = qemu_img(&["info", "-U", "--backing-chain", &path.display().to_string()]);
    assert!(ok, "{out}");
    out.lines()
        .filter(|l| l.starts_with("backing file"))
        .map(str::to_string)
        .collect()
}

fn compare(a: &Path, b: &Path) -> bool {
    qemu_img(&[
        "compare",
        "-U",
        &a.display().to_string(),
        &b.display().to_string(),
    ])
    .0
}

/// A raw copy of the guest view, for `qemu-img compare` later.
fn snapshot_view(path: &Path, to: &Path) {
    let (ok, out) = qemu_img(&[
        "convert",
        "-U",
        "-O",
        "raw",
        &path.display().to_string(),
        &to.display().to_string(),
    ]);
    assert!(ok, "{out}");
}

fn domain_xml(name: &str, disk: &Path) -> String {
    format!(
        "<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>\
         <os><type arch='x86_64' machine='pc'>hvm</type></os><features><acpi/></features>\
         <devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/>\
         <source file='{}'/><target dev='vda' bus='virtio'/></disk>\
         <graphics type='vnc' autoport='yes' listen='127.0.0.1'/></devices></domain>",
        disk.display()
    )
}

fn blklist_source(d: &Libvirtd) -> String {
    d.virsh(&["domblklist", "test"])
        .lines()
        .find(|l| l.trim_start().starts_with("vda"))
        .map(|l| l.split_whitespace().nth(1).unwrap_or("").to_string())
        .unwrap_or_default()
}

#[test]
fn the_seed_walk_through_on_a_real_libvirtd() {
    let t0 = Instant::now();
    let Some(d) = Libvirtd::start() else { return };
    eprintln!("libvirtd up after {:?}", t0.elapsed());
    let mut conn = Connect::open(Some(&d.uri)).unwrap();
    let work = tempfile::tempdir().unwrap();
    let kvm = std::fs::canonicalize(work.path()).unwrap().join("kvm");
    std::fs::create_dir_all(kvm.join("test")).unwrap();
    let base = kvm.join("test.qcow2");
    let (ok, out) = qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        &base.display().to_string(),
        "16M",
    ]);
    assert!(ok, "{out}");
    write(&base, 0, MIB as usize, 0x11);
    Domain::define_xml(&conn, &domain_xml("test", &base)).unwrap();
    assert_eq!(blklist_source(&d), base.display().to_string());

    // snapshot-create-as --disk-only take-1 (default file name)
    let state0 = work.path().join("state0.raw");
    snapshot_view(&base, &state0);
    snapshot_create(
        &conn,
        "test",
        "take-1",
        &SnapshotCreateOptions {
            description: Some("first snapshot".into()),
            ..SnapshotCreateOptions::default()
        },
    )
    .unwrap();
    let o1 = kvm.join("test.take-1");
    assert_eq!(blklist_source(&d), o1.display().to_string());
    let info = d.virsh(&["snapshot-info", "test", "take-1"]);
    assert!(info.contains("Current:        yes"), "{info}");
    assert!(d
        .virsh(&["snapshot-dumpxml", "test", "take-1"])
        .contains("first snapshot"));
    write(&o1, 2 * MIB, 4096, 0x22);
    let state1 = work.path().join("state1.raw");
    snapshot_view(&o1, &state1);

    // take-2 with --diskspec file=... into a subdirectory
    let o2 = kvm.join("test/test.take-2");
    snapshot_create(
        &conn,
        "test",
        "take-2",
        &SnapshotCreateOptions {
            file: Some(o2.clone()),
            ..SnapshotCreateOptions::default()
        },
    )
    .unwrap();
    assert_eq!(blklist_source(&d), o2.display().to_string());
    assert_eq!(
        backing_lines(&o2),
        vec![
            format!("backing file: {}", o1.display()),
            "backing file format: qcow2".to_string(),
            format!("backing file: {}", base.display()),
            "backing file format: qcow2".to_string(),
        ]
    );
    let list = d.virsh(&["snapshot-list", "test", "--parent"]);
    let take2 = list.lines().find(|l| l.contains("take-2")).unwrap();
    assert!(take2.trim_end().ends_with("take-1"), "{list}");
    write(&o2, 3 * MIB, 4096, 0x33);

    // revert to take-1: the guest sees the state at take-1
    snapshot_revert(&conn, "test", "take-1").unwrap();
    let a = PathBuf::from(blklist_source(&d));
    assert!(
        compare(&a, &state0),
        "guest view equals the state at take-1"
    );
    assert!(d
        .virsh(&["snapshot-current", "test", "--name"])
        .contains("take-1"));
    assert!(!o2.exists());

    // revert to take-2
    snapshot_revert(&conn, "test", "take-2").unwrap();
    assert_eq!(blklist_source(&d), o2.display().to_string());
    assert!(compare(&o2, &state1));
    assert!(!a.exists());
    write(&o2, 4 * MIB, 4096, 0x44);
    let now = work.path().join("now.raw");
    snapshot_view(&o2, &now);

    // delete take-1: the current view and take-2's state are unchanged
    snapshot_delete(&conn, "test", "take-1", &mut Hooks::default()).unwrap();
    assert!(compare(&o2, &now));
    let l = snapshot_list(&conn, "test").unwrap();
    assert_eq!(l.len(), 1);
    assert!(compare(l[0].disks[0].state_file.as_ref().unwrap(), &state1));
    let list = d.virsh(&["snapshot-list", "test", "--parent"]);
    assert!(!list.contains("take-1"), "{list}");
    for f in [&base, &o2] {
        let (ok, out) = qemu_img(&["check", "-U", &f.display().to_string()]);
        assert!(ok, "{out}");
    }

    // delete take-2
    assert!(
        d.virsh(&["dumpxml", "test", "--inactive"])
            .contains(STRATA_NS),
        "control: Strata's metadata is there"
    );
    snapshot_delete(&conn, "test", "take-2", &mut Hooks::default()).unwrap();
    assert!(compare(&o2, &now));
    assert!(!d.virsh(&["snapshot-list", "test"]).contains("take-"));

    // blockcommit --active --pivot: back on the base, data kept
    blockcommit(
        &conn,
        "test",
        &BlockCommitOptions::default(),
        &mut Hooks::default(),
    )
    .unwrap();
    assert_eq!(blklist_source(&d), base.display().to_string());
    assert!(compare(&base, &now));
    assert!(backing_lines(&base).is_empty());
    assert!(!o2.exists() && !o1.exists());
    let (ok, out) = qemu_img(&["check", &base.display().to_string()]);
    assert!(ok, "{out}");
    // Not the word "strata": the images' own path may contain it.
    assert!(!d
        .virsh(&["dumpxml", "test", "--inactive"])
        .contains(STRATA_NS));

    // A started domain is refused, and nothing changes.
    let tiny = kvm.join("tiny.qcow2");
    let (ok, out) = qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        &tiny.display().to_string(),
        "1M",
    ]);
    assert!(ok, "{out}");
    let vm2 = Domain::define_xml(&conn, &domain_xml("tiny", &tiny)).unwrap();
    match vm2.create() {
        Ok(_) => {
            let e = snapshot_create(&conn, "tiny", "take-1", &SnapshotCreateOptions::default());
            assert!(matches!(e, Err(Error::DomainActive { .. })), "{e:?}");
            assert!(!kvm.join("tiny.take-1").exists());
            vm2.destroy().unwrap();
        }
        Err(e) => panic!("QEMU did not start under the private libvirtd: {e}"),
    }
    conn.close().unwrap();
    eprintln!("real libvirtd walk-through took {:?}", t0.elapsed());
}
