//! Injected failures with rollback: a disk whose directory cannot take a
//! new file (made immutable with `chattr +i`, which stops root too, unlike
//! permission bits). An operation that fails half-way must leave libvirt's
//! view and the files exactly as they were.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use strata_libvirt::{snapshot_create, snapshot_list, snapshot_revert, SnapshotCreateOptions};

/// Makes `dir` immutable for as long as it lives (and mutable again on
/// drop, even when the test panics, so that the temporary directory can
/// be removed).
struct Immutable(PathBuf);

impl Immutable {
    fn new(dir: &Path) -> Immutable {
        chattr("+i", dir);
        let probe = dir.join("probe");
        assert!(
            std::fs::write(&probe, b"x").is_err(),
            "chattr +i did not stop a new file in {}",
            dir.display()
        );
        Immutable(dir.to_path_buf())
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        chattr("-i", &self.0);
    }
}

fn chattr(flag: &str, dir: &Path) {
    let out = Command::new("chattr")
        .arg(flag)
        .arg(dir)
        .output()
        .expect("chattr (e2fsprogs)");
    assert!(
        out.status.success(),
        "chattr {flag} {}: {} (needs root and a filesystem with the immutable flag)",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A domain with two qcow2 disks: vda in the test directory, vdb in its
/// subdirectory `locked`.
fn two_disk_vm() -> TestVm {
    TestVm::with_devices(|root| {
        let locked = root.join("locked");
        std::fs::create_dir(&locked).unwrap();
        let mut xml = String::new();
        for (dev, path) in [
            ("vda", root.join("test.qcow2")),
            ("vdb", locked.join("data.qcow2")),
        ] {
            make_qcow2(&path, SIZE);
            write(&path, 0, MIB as usize, 0x11);
            xml.push_str(&format!(
                "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>\
                 <source file='{}'/><target dev='{dev}' bus='virtio'/></disk>",
                path.display()
            ));
        }
        xml
    })
}

fn files(vm: &TestVm) -> BTreeSet<PathBuf> {
    vm.files().into_iter().collect()
}

#[test]
fn a_create_that_cannot_make_the_second_overlay_changes_nothing() {
    let vm = two_disk_vm();
    let xml = vm.xml();
    let before = files(&vm);
    let _locked = Immutable::new(&vm.root().join("locked"));

    let err = snapshot_create(&vm.conn, "vm", "take-1", &SnapshotCreateOptions::default())
        .expect_err("the overlay of vdb cannot be created");

    let text = format!("{err:#}");
    assert!(text.contains("data.take-1"), "names the file: {text}");
    assert!(text.contains("Operation not permitted"), "says why: {text}");
    assert_eq!(vm.xml(), xml, "the domain is as it was");
    assert!(snapshot_list(&vm.conn, "vm").unwrap().is_empty());
    assert_eq!(files(&vm), before, "vda's overlay was removed again");
}

#[test]
fn a_revert_that_cannot_make_the_second_overlay_changes_nothing() {
    let vm = two_disk_vm();
    let _ = snapshot_create(&vm.conn, "vm", "take-1", &SnapshotCreateOptions::default()).unwrap();
    write(&vm.active(), 0, 4096, 0x22);
    write(&vm.active_of("vdb"), 0, 4096, 0x22);
    let xml = vm.xml();
    let before = files(&vm);
    let views = (view(&vm.active()), view(&vm.active_of("vdb")));
    let _locked = Immutable::new(&vm.root().join("locked"));

    let err = snapshot_revert(&vm.conn, "vm", "take-1").expect_err("vdb's overlay cannot be made");

    let text = format!("{err:#}");
    assert!(text.contains("Operation not permitted"), "says why: {text}");
    assert_eq!(vm.xml(), xml, "the domain is as it was");
    assert_eq!(files(&vm), before, "no file added or removed");
    assert_eq!(
        (view(&vm.active()), view(&vm.active_of("vdb"))),
        views,
        "both disks still read what was written since take-1"
    );
    let snaps = snapshot_list(&vm.conn, "vm").unwrap();
    assert_eq!(snaps.len(), 1);
    assert!(snaps[0].current);
}
