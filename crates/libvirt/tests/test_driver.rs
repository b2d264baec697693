//! The snapshot lifecycle against libvirt's in-process test driver.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use strata_libvirt::xml::STRATA_NS;
use strata_libvirt::{
    blockcommit, blockpull, render_tree, snapshot_create, snapshot_delete, snapshot_list,
    snapshot_revert, BlockCommitOptions, BlockPullOptions, Error, SnapshotCreateOptions,
};
use strata_merge::Hooks;

fn create(vm: &TestVm, name: &str, file: Option<PathBuf>) {
    let opts = SnapshotCreateOptions::default().with_description(format!("snapshot {name}"));
    let _ = snapshot_create(
        &vm.conn,
        "vm",
        name,
        &match file {
            Some(f) => opts.with_file(f),
            None => opts,
        },
    )
    .unwrap();
}

fn state_file(vm: &TestVm, name: &str) -> PathBuf {
    let s = snapshot_list(&vm.conn, "vm").unwrap();
    let s = s.into_iter().find(|s| s.name == name).unwrap();
    s.disks[0].state_file.clone().unwrap()
}

fn all_clean(vm: &TestVm) {
    for f in vm.files() {
        if f.extension().is_some_and(|e| e == "raw" || e == "mem") {
            continue;
        }
        qemu_img_check(&f);
    }
}

/// The seed's first half: take-1 (default name), write, take-2 into a
/// subdirectory, write. Returns the guest views at take-1, at take-2, and
/// now.
fn seed(vm: &TestVm) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let at1 = view(&vm.active());
    create(vm, "take-1", None);
    write(&vm.active(), 2 * MIB, 4096, 0x22);
    let at2 = view(&vm.active());
    std::fs::create_dir(vm.root().join("test")).unwrap();
    create(vm, "take-2", Some(vm.root().join("test/test.take-2")));
    write(&vm.active(), 3 * MIB, 4096, 0x33);
    let now = view(&vm.active());
    (at1, at2, now)
}

#[test]
fn create_swaps_the_disk_to_an_overlay_and_records_the_snapshot() {
    let vm = TestVm::new();
    let uuid_before = vm.dom().get_uuid_string().unwrap();
    let before = view(&vm.base);

    create(&vm, "take-1", None);

    let o1 = vm.root().join("test.take-1");
    assert_eq!(vm.active(), o1);
    assert_eq!(chain(&o1), vec![o1.clone(), vm.base.clone()]);
    assert_eq!(view(&o1), before);
    assert_eq!(vm.dom().get_uuid_string().unwrap(), uuid_before);
    let list = snapshot_list(&vm.conn, "vm").unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].name, "take-1");
    assert!(list[0].current);
    assert_eq!(list[0].parent, None);
    assert_eq!(list[0].state, "shutoff");
    assert_eq!(list[0].description.as_deref(), Some("snapshot take-1"));
    assert_eq!(list[0].disks[0].overlay.as_deref(), Some(o1.as_path()));
    assert_eq!(
        list[0].disks[0].state_file.as_deref(),
        Some(vm.base.as_path())
    );
    // The backing name is the absolute path, as libvirt records it.
    let out = std::process::Command::new("qemu-img")
        .args(["info", "-U", "--output=json"])
        .arg(&o1)
        .output()
        .unwrap();
    let info = String::from_utf8_lossy(&out.stdout);
    assert!(info.contains(&format!("\"backing-filename\": \"{}\"", vm.base.display())));
    assert!(info.contains("\"backing-filename-format\": \"qcow2\""));
    all_clean(&vm);
}

#[test]
fn second_snapshot_into_a_subdirectory_chains_on_the_first() {
    let vm = TestVm::new();
    seed(&vm);
    let o1 = vm.root().join("test.take-1");
    let o2 = vm.root().join("test/test.take-2");
    assert_eq!(vm.active(), o2);
    assert_eq!(chain(&o2), vec![o2.clone(), o1.clone(), vm.base.clone()]);
    let list = snapshot_list(&vm.conn, "vm").unwrap();
    assert_eq!(list[1].name, "take-2");
    assert_eq!(list[1].parent.as_deref(), Some("take-1"));
    assert!(list[1].current && !list[0].current);
    assert_eq!(list[1].disks[0].state_chain, vec![o1, vm.base.clone()]);
    assert_eq!(
        render_tree(&list),
        "take-1\n  |\n  +- take-2 (current)\n    \n"
    );
    all_clean(&vm);
}

#[test]
fn create_refuses_existing_names_and_files() {
    let vm = TestVm::new();
    create(&vm, "take-1", None);
    let again = snapshot_create(&vm.conn, "vm", "take-1", &SnapshotCreateOptions::default());
    assert!(matches!(again, Err(Error::SnapshotExists { .. })));
    std::fs::write(vm.root().join("test.take-2"), b"x").unwrap();
    let clash = snapshot_create(&vm.conn, "vm", "take-2", &SnapshotCreateOptions::default());
    assert!(matches!(clash, Err(Error::FileExists(_))));
    assert_eq!(vm.snapshot_names(), vec!["take-1"]);
}

#[test]
fn revert_goes_back_to_each_state_without_touching_the_others() {
    let vm = TestVm::new();
    let (at1, at2, _) = seed(&vm);
    let o1 = vm.root().join("test.take-1");
    let o2 = vm.root().join("test/test.take-2");

    let r = snapshot_revert(&vm.conn, "vm", "take-1").unwrap();
    let a = vm.active();
    assert_eq!(view(&a), at1, "the guest sees the state at take-1");
    assert_eq!(chain(&a), vec![a.clone(), vm.base.clone()]);
    assert_eq!(view(&state_file(&vm, "take-2")), at2, "take-2's state kept");
    assert!(o1.exists(), "take-1's overlay holds take-2's state");
    assert!(!o2.exists(), "the discarded current state is removed");
    assert_eq!(r.removed, vec![o2.clone()]);
    let list = snapshot_list(&vm.conn, "vm").unwrap();
    assert!(list[0].current, "take-1 is current");

    // Writes after the revert go into the new overlay only.
    write(&a, 0, 4096, 0x44);
    assert_eq!(view(&vm.base)[..4096], at1[..4096]);

    let _ = snapshot_revert(&vm.conn, "vm", "take-2").unwrap();
    assert_eq!(vm.active(), o2, "take-2's overlay name is reused");
    assert_eq!(view(&o2), at2);
    assert!(!a.exists(), "the revert overlay of take-1 is gone");
    assert_eq!(view(&state_file(&vm, "take-1")), at1);
    all_clean(&vm);
}

#[test]
fn revert_to_the_current_snapshot_discards_the_writes_since() {
    let vm = TestVm::new();
    create(&vm, "take-1", None);
    let at1 = view(&vm.active());
    write(&vm.active(), 0, 4096, 0x55);
    let _ = snapshot_revert(&vm.conn, "vm", "take-1").unwrap();
    assert_eq!(vm.active(), vm.root().join("test.take-1"));
    assert_eq!(view(&vm.active()), at1);
    assert_eq!(
        vm.files(),
        vec![vm.root().join("test.qcow2"), vm.root().join("test.take-1")]
    );
    all_clean(&vm);
}

#[test]
fn deleting_an_internal_snapshot_commits_its_overlay_down() {
    let vm = TestVm::new();
    let (_, at2, now) = seed(&vm);
    let o1 = vm.root().join("test.take-1");
    let o2 = vm.root().join("test/test.take-2");

    let r = snapshot_delete(&vm.conn, "vm", "take-1", &mut Hooks::default()).unwrap();

    assert_eq!(vm.active(), o2, "the domain keeps its file");
    assert_eq!(view(&o2), now, "the guest view is unchanged");
    assert_eq!(
        view(&state_file(&vm, "take-2")),
        at2,
        "take-2's state unchanged"
    );
    assert_eq!(state_file(&vm, "take-2"), vm.base);
    assert!(!o1.exists());
    assert_eq!(r.removed, vec![o1]);
    assert_eq!(chain(&o2), vec![o2.clone(), vm.base.clone()]);
    let list = snapshot_list(&vm.conn, "vm").unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].parent, None, "take-2 is re-parented");
    assert!(list[0].current);
    all_clean(&vm);
}

#[test]
fn deleting_the_leaf_snapshot_keeps_the_domain_on_its_overlay() {
    let vm = TestVm::new();
    let (at1, _, now) = seed(&vm);
    let o1 = vm.root().join("test.take-1");
    let o2 = vm.root().join("test/test.take-2");

    let _ = snapshot_delete(&vm.conn, "vm", "take-2", &mut Hooks::default()).unwrap();

    assert_eq!(vm.active(), o2);
    assert_eq!(view(&o2), now);
    assert_eq!(view(&state_file(&vm, "take-1")), at1);
    assert!(
        !o1.exists(),
        "take-1's overlay was pulled into the active image"
    );
    assert_eq!(chain(&o2), vec![o2.clone(), vm.base.clone()]);
    let list = snapshot_list(&vm.conn, "vm").unwrap();
    assert_eq!(list.len(), 1);
    assert!(list[0].current, "the parent becomes current");
    all_clean(&vm);
}

#[test]
fn deleting_a_snapshot_reverted_away_from_removes_its_files() {
    let vm = TestVm::new();
    let (at1, _, _) = seed(&vm);
    let _ = snapshot_revert(&vm.conn, "vm", "take-1").unwrap();
    let a = vm.active();
    write(&a, 5 * MIB, 4096, 0x66);
    let now = view(&a);

    let _ = snapshot_delete(&vm.conn, "vm", "take-2", &mut Hooks::default()).unwrap();

    assert_eq!(vm.active(), a);
    assert_eq!(view(&a), now);
    assert_eq!(view(&state_file(&vm, "take-1")), at1);
    assert!(
        !vm.root().join("test.take-1").exists(),
        "take-2's state file is gone"
    );
    assert_eq!(vm.snapshot_names(), vec!["take-1"]);
    all_clean(&vm);
}

#[test]
fn the_seed_sequence_ends_with_blockcommit_on_the_base() {
    let vm = TestVm::new();
    seed(&vm);
    let _ = snapshot_revert(&vm.conn, "vm", "take-1").unwrap();
    let _ = snapshot_revert(&vm.conn, "vm", "take-2").unwrap();
    write(&vm.active(), 6 * MIB, 4096, 0x77);
    let now = view(&vm.active());
    assert!(
        vm.xml().contains(STRATA_NS),
        "control: Strata's metadata is there"
    );
    let _ = snapshot_delete(&vm.conn, "vm", "take-1", &mut Hooks::default()).unwrap();
    let _ = snapshot_delete(&vm.conn, "vm", "take-2", &mut Hooks::default()).unwrap();
    assert!(vm.snapshot_names().is_empty());
    assert_eq!(view(&vm.active()), now);

    let r = blockcommit(
        &vm.conn,
        "vm",
        &BlockCommitOptions::default(),
        &mut Hooks::default(),
    )
    .unwrap();

    assert_eq!(vm.active(), vm.base);
    assert_eq!(view(&vm.base), now);
    assert_eq!(vm.files(), vec![vm.base.clone()]);
    assert_eq!(r.removed, vec![vm.root().join("test/test.take-2")]);
    // Not the word "strata": the images' own path may contain it.
    assert!(!vm.xml().contains(STRATA_NS), "no Strata metadata left");
    all_clean(&vm);
}

#[test]
fn blockcommit_refuses_to_destroy_snapshots_unless_asked() {
    let vm = TestVm::new();
    let (_, _, now) = seed(&vm);
    let xml = vm.xml();
    let refused = blockcommit(
        &vm.conn,
        "vm",
        &BlockCommitOptions::default(),
        &mut Hooks::default(),
    );
    assert!(
        matches!(refused, Err(Error::SnapshotsDestroyed { ref snapshots, .. }) if snapshots.len() == 2)
    );
    assert_eq!(vm.xml(), xml);

    let r = blockcommit(
        &vm.conn,
        "vm",
        &BlockCommitOptions::default().with_delete_snapshots(true),
        &mut Hooks::default(),
    )
    .unwrap();
    assert_eq!(r.snapshots_removed.len(), 2);
    assert_eq!(vm.active(), vm.base);
    assert_eq!(view(&vm.base), now);
    assert!(vm.snapshot_names().is_empty());
    assert_eq!(vm.files(), vec![vm.base.clone()]);
    all_clean(&vm);
}

#[test]
fn blockcommit_into_an_intermediate_base_keeps_older_snapshots() {
    let vm = TestVm::new();
    let (at1, _, now) = seed(&vm);
    let o1 = vm.root().join("test.take-1");
    let r = blockcommit(
        &vm.conn,
        "vm",
        &BlockCommitOptions::default()
            .with_base(o1.clone())
            .with_delete_snapshots(true),
        &mut Hooks::default(),
    )
    .unwrap();
    assert_eq!(r.snapshots_removed, vec!["take-2"]);
    assert_eq!(vm.active(), o1);
    assert_eq!(view(&o1), now);
    assert_eq!(view(&state_file(&vm, "take-1")), at1);
    let list = snapshot_list(&vm.conn, "vm").unwrap();
    assert_eq!(list.len(), 1);
    assert!(list[0].current);
    all_clean(&vm);
}

#[test]
fn blockpull_makes_the_active_image_stand_alone_and_keeps_snapshots() {
    let vm = TestVm::new();
    let (at1, at2, now) = seed(&vm);
    let o2 = vm.root().join("test/test.take-2");
    let _ = blockpull(
        &vm.conn,
        "vm",
        &BlockPullOptions::default(),
        &mut Hooks::default(),
    )
    .unwrap();
    assert_eq!(vm.active(), o2);
    assert_eq!(chain(&o2), vec![o2.clone()]);
    assert_eq!(view(&o2), now);
    assert_eq!(view(&state_file(&vm, "take-1")), at1);
    assert_eq!(view(&state_file(&vm, "take-2")), at2);
    all_clean(&vm);
}

#[test]
fn a_running_domain_revert_is_refused_without_force_and_nothing_changes() {
    let vm = TestVm::new();
    create(&vm, "take-1", None);
    let files = vm.files();
    vm.dom().create().unwrap();
    let xml = vm
        .dom()
        .get_xml_desc(virt::sys::VIR_DOMAIN_XML_INACTIVE)
        .unwrap();
    let e = snapshot_revert(&vm.conn, "vm", "take-1");
    assert!(
        matches!(e, Err(Error::RevertRunning { ref state, .. }) if state == "running"),
        "{e:?}"
    );
    assert!(e.unwrap_err().to_string().contains("--force"));
    vm.dom().suspend().unwrap();
    assert!(matches!(
        snapshot_revert(&vm.conn, "vm", "take-1"),
        Err(Error::RevertRunning { ref state, .. }) if state == "paused"
    ));
    // The test driver has no block jobs: libvirt's error, nothing changed.
    assert!(blockcommit(
        &vm.conn,
        "vm",
        &BlockCommitOptions::default(),
        &mut Hooks::default()
    )
    .is_err());
    assert_eq!(vm.files(), files);
    assert_eq!(
        vm.dom()
            .get_xml_desc(virt::sys::VIR_DOMAIN_XML_INACTIVE)
            .unwrap(),
        xml
    );
    assert_eq!(vm.snapshot_names(), vec!["take-1"]);
}

fn snapshot_xmls(vm: &TestVm) -> Vec<String> {
    let dom = vm.dom();
    let mut v: Vec<String> = dom
        .list_all_snapshots(0)
        .unwrap()
        .iter()
        .map(|s| {
            format!(
                "{} current={}",
                s.get_xml_desc(0).unwrap(),
                s.is_current(0).unwrap()
            )
        })
        .collect();
    v.sort();
    v
}

#[test]
fn a_failure_part_way_rolls_everything_back() {
    use strata_libvirt::testing::set_fail_point;
    let vm = TestVm::new();
    seed(&vm);
    let xml = vm.xml();
    let snaps = snapshot_xmls(&vm);
    let files = vm.files();

    // create: the overlay exists and the domain was redefined when the
    // snapshot definition fails.
    set_fail_point(Some("define_snapshot"));
    let e = snapshot_create(&vm.conn, "vm", "take-3", &SnapshotCreateOptions::default());
    assert!(
        matches!(e, Err(Error::RolledBack { ref problems, .. }) if problems.is_empty()),
        "{e:?}"
    );
    assert_eq!(vm.xml(), xml);
    assert_eq!(snapshot_xmls(&vm), snaps);
    assert_eq!(vm.files(), files);

    // revert: the domain was switched when making take-1 current fails.
    set_fail_point(Some("define_snapshot"));
    let e = snapshot_revert(&vm.conn, "vm", "take-1");
    assert!(matches!(e, Err(Error::RolledBack { .. })), "{e:?}");
    assert_eq!(vm.xml(), xml);
    assert_eq!(snapshot_xmls(&vm), snaps);
    assert_eq!(vm.files(), files);

    // delete: metadata removed, then re-parenting fails.
    set_fail_point(Some("define_snapshot"));
    let e = snapshot_delete(&vm.conn, "vm", "take-1", &mut Hooks::default());
    assert!(matches!(e, Err(Error::RolledBack { .. })), "{e:?}");
    assert_eq!(vm.xml(), xml);
    assert_eq!(snapshot_xmls(&vm), snaps);
    for f in vm.files() {
        qemu_img_check(&f);
    }
    set_fail_point(None);

    // A nonexistent directory for the overlay: refused, nothing created.
    let e = snapshot_create(
        &vm.conn,
        "vm",
        "take-3",
        &SnapshotCreateOptions::default().with_file(vm.root().join("missing/dir.qcow2")),
    );
    assert!(e.is_err());
    assert_eq!(vm.xml(), xml);
    assert_eq!(vm.files(), files);
}

#[test]
fn only_chosen_disks_are_snapshotted() {
    let vm = TestVm::with_disks(&["vda", "vdb"]);
    let vdb = vm.active_of("vdb");
    let _ = snapshot_create(
        &vm.conn,
        "vm",
        "take-1",
        &SnapshotCreateOptions::default().with_disks(vec!["vda".into()]),
    )
    .unwrap();
    assert_eq!(vm.active_of("vda"), vm.root().join("test.take-1"));
    assert_eq!(vm.active_of("vdb"), vdb);
    let both = snapshot_create(
        &vm.conn,
        "vm",
        "take-2",
        &SnapshotCreateOptions::default().with_file(vm.root().join("x.qcow2")),
    );
    assert!(matches!(both, Err(Error::InvalidArgument(_))));
    create(&vm, "take-2", None);
    assert_eq!(vm.active_of("vdb"), vm.root().join("test-vdb.take-2"));
    let _ = snapshot_revert(&vm.conn, "vm", "take-1").unwrap();
    // take-1 did not cover vdb: it stays where it is.
    assert_eq!(vm.active_of("vdb"), vm.root().join("test-vdb.take-2"));
    all_clean(&vm);
}

/// A domain with one of each kind of disk `virsh snapshot-create-as
/// --disk-only` treats differently: qcow2 `vda` (0x11 in its first MiB),
/// raw `vdb`, qcow2 `vdc` with `snapshot='no'`, read-only raw `vdd`,
/// shareable raw `vde`, and an empty cdrom `hdc`. The directory has a
/// space in its name.
fn multi_disk_vm() -> TestVm {
    TestVm::with_devices(|root| {
        let dir = root.join("vm disks");
        std::fs::create_dir(&dir).unwrap();
        make_qcow2(&root.join("test.qcow2"), SIZE);
        write(&root.join("test.qcow2"), 0, MIB as usize, 0x11);
        make_qcow2(&dir.join("nosnap.qcow2"), SIZE);
        for f in ["data.raw", "ro.raw", "shared.raw"] {
            std::fs::write(dir.join(f), vec![0u8; MIB as usize]).unwrap();
        }
        let disk = |fmt: &str, file: &Path, dev: &str, extra: &str, attr: &str| {
            format!(
                "<disk type='file' device='disk'{attr}><driver name='qemu' type='{fmt}'/>\
                 <source file='{}'/><target dev='{dev}' bus='virtio'/>{extra}</disk>",
                file.display()
            )
        };
        [
            disk("qcow2", &root.join("test.qcow2"), "vda", "", ""),
            disk("raw", &dir.join("data.raw"), "vdb", "", ""),
            disk(
                "qcow2",
                &dir.join("nosnap.qcow2"),
                "vdc",
                "",
                " snapshot='no'",
            ),
            disk("raw", &dir.join("ro.raw"), "vdd", "<readonly/>", ""),
            disk("raw", &dir.join("shared.raw"), "vde", "<shareable/>", ""),
            "<disk type='file' device='cdrom'><driver name='qemu' type='raw'/>\
             <target dev='hdc' bus='ide'/><readonly/></disk>"
                .to_string(),
        ]
        .concat()
    })
}

#[test]
fn create_takes_the_disks_virsh_takes_and_says_why_the_others_were_skipped() {
    let vm = multi_disk_vm();
    let d = vm.root().join("vm disks");
    let fixed: Vec<PathBuf> = ["vdc", "vdd", "vde"].map(|t| vm.active_of(t)).to_vec();

    let r = snapshot_create(&vm.conn, "vm", "take-1", &SnapshotCreateOptions::default()).unwrap();

    assert_eq!(vm.active(), vm.root().join("test.take-1"));
    assert_eq!(vm.active_of("vdb"), d.join("data.take-1"));
    assert_eq!(
        ["vdc", "vdd", "vde"].map(|t| vm.active_of(t)).to_vec(),
        fixed
    );
    let skipped: Vec<&str> = r.skipped.iter().map(|s| s.0.as_str()).collect();
    assert_eq!(skipped, ["vdc", "vdd", "vde", "hdc"]);
    assert!(r.skipped[0].1.contains("snapshot='no'"), "{:?}", r.skipped);
    assert!(r.skipped[1].1.contains("read-only"), "{:?}", r.skipped);
    assert!(r.skipped[2].1.contains("shareable"), "{:?}", r.skipped);
    assert!(r.skipped[3].1.contains("cdrom"), "{:?}", r.skipped);
    let s = &snapshot_list(&vm.conn, "vm").unwrap()[0];
    let covered: Vec<&str> = s.disks.iter().map(|k| k.disk.as_str()).collect();
    assert_eq!(covered, ["vda", "vdb"]);
    all_clean(&vm);
}

#[test]
fn revert_leaves_disks_the_snapshot_does_not_cover_with_their_writes() {
    let vm = multi_disk_vm();
    create(&vm, "take-1", None);
    let nosnap = vm.active_of("vdc");
    write(&nosnap, 0, 4096, 0x5a);
    write(&vm.active(), 0, 4096, 0x22);
    let data_now = view(&nosnap);

    let _ = snapshot_revert(&vm.conn, "vm", "take-1").unwrap();

    assert_eq!(vm.active_of("vdc"), nosnap, "vdc is not switched");
    assert_eq!(view(&nosnap), data_now, "vdc keeps what was written since");
    assert_eq!(view(&vm.active())[0], 0x11, "vda is back at take-1");
    all_clean(&vm);
}

#[test]
fn diskspecs_choose_files_and_leave_disks_out_as_virsh_does() {
    use strata_libvirt::DiskSpec;
    let vm = multi_disk_vm();
    let file = vm.root().join("vm disks/vda at take 1.qcow2");
    let r = snapshot_create(
        &vm.conn,
        "vm",
        "take-1",
        &SnapshotCreateOptions::default().with_diskspecs(vec![
            DiskSpec::new("vda").with_file(file.clone()),
            DiskSpec::new("vdb").with_external(false),
            DiskSpec::new("vdc"),
        ]),
    )
    .unwrap();
    assert_eq!(vm.active(), file);
    assert_eq!(vm.active_of("vdb"), vm.root().join("vm disks/data.raw"));
    assert_eq!(
        vm.active_of("vdc"),
        vm.root().join("vm disks/nosnap.take-1"),
        "an explicit diskspec overrides snapshot='no', as in libvirt"
    );
    assert!(r
        .skipped
        .iter()
        .any(|s| s.0 == "vdb" && s.1.contains("--diskspec")));
    // A read-only disk cannot be asked for.
    let e = snapshot_create(
        &vm.conn,
        "vm",
        "take-2",
        &SnapshotCreateOptions::default().with_diskspecs(vec![DiskSpec::new("vdd")]),
    );
    assert!(
        matches!(&e, Err(Error::NoSuchDisk { why, .. }) if why.contains("read-only")),
        "{e:?}"
    );
    all_clean(&vm);
}

#[test]
fn create_drops_an_empty_backing_store_that_would_hide_the_backing_file() {
    let vm = TestVm::new();
    let xml = replace_disk(&vm.xml(), "vda", &vm.base, "<backingStore/>");
    virt::domain::Domain::define_xml(&vm.conn, &xml).unwrap();
    assert_eq!(
        vm.backing_stores("vda"),
        1,
        "control: the test driver keeps it"
    );

    create(&vm, "take-1", None);

    assert_eq!(vm.backing_stores("vda"), 0, "{}", vm.xml());
    let snap = vm
        .dom()
        .list_all_snapshots(0)
        .unwrap()
        .pop()
        .unwrap()
        .get_xml_desc(0)
        .unwrap();
    assert!(!snap.contains("<backingStore"), "{snap}");
}

#[test]
fn every_operation_on_a_libvirt_made_chain_drops_the_stale_backing_store() {
    let vm = TestVm::new();
    vm.libvirt_snapshot("s1", &["vda"]);
    vm.libvirt_snapshot("s2", &["vda"]);
    assert_eq!(
        vm.backing_stores("vda"),
        3,
        "control: s1 overlay, base, end"
    );

    // revert
    let _ = snapshot_revert(&vm.conn, "vm", "s1").unwrap();
    assert_eq!(vm.backing_stores("vda"), 0, "revert: {}", vm.xml());
    let s1 = vm.active();

    // create on top of a libvirt-made chain
    vm.libvirt_snapshot("s3", &["vda"]);
    assert!(vm.backing_stores("vda") > 0);
    create(&vm, "take-4", None);
    assert_eq!(vm.backing_stores("vda"), 0, "create: {}", vm.xml());
    assert_eq!(
        chain(&vm.active())[1],
        chain(&s1)[0].with_file_name("test.s3")
    );

    // delete (merges change the chain under an unchanged source)
    vm.libvirt_snapshot("s5", &["vda"]);
    let _ = snapshot_delete(&vm.conn, "vm", "s5", &mut Hooks::default()).unwrap();
    assert_eq!(vm.backing_stores("vda"), 0, "delete: {}", vm.xml());
    for s in vm.dom().list_all_snapshots(0).unwrap() {
        let x = s.get_xml_desc(0).unwrap();
        let dom = &x[x.find("<domain").unwrap()..];
        assert!(!dom.contains("<backingStore"), "{x}");
    }

    // blockpull, blockcommit
    vm.libvirt_snapshot("s6", &["vda"]);
    let base = chain(&vm.active())[2].clone();
    let _ = blockpull(
        &vm.conn,
        "vm",
        &BlockPullOptions::default().with_base(base),
        &mut Hooks::default(),
    )
    .unwrap();
    assert_eq!(vm.backing_stores("vda"), 0, "blockpull: {}", vm.xml());
    vm.libvirt_snapshot("s7", &["vda"]);
    let _ = blockcommit(
        &vm.conn,
        "vm",
        &BlockCommitOptions::default().with_delete_snapshots(true),
        &mut Hooks::default(),
    )
    .unwrap();
    assert_eq!(vm.backing_stores("vda"), 0, "blockcommit: {}", vm.xml());
    assert_eq!(vm.active(), vm.base);
    all_clean(&vm);
}

#[test]
fn deleting_libvirt_made_snapshots_merges_and_removes_their_overlays() {
    let vm = TestVm::new();
    vm.libvirt_snapshot("s1", &["vda"]);
    write(&vm.active(), 2 * MIB, 4096, 0x22);
    let at_s2 = view(&vm.active());
    vm.libvirt_snapshot("s2", &["vda"]);
    write(&vm.active(), 3 * MIB, 4096, 0x33);
    let now = view(&vm.active());
    let o1 = vm.root().join("test.s1");
    let o2 = vm.root().join("test.s2");
    let stray = vm.root().join("unrelated.qcow2");
    make_qcow2(&stray, MIB);

    let r = snapshot_delete(&vm.conn, "vm", "s1", &mut Hooks::default()).unwrap();

    assert!(!o1.exists(), "s1's overlay was committed into the base");
    assert_eq!(r.removed, vec![o1.clone()]);
    assert_eq!(chain(&o2), vec![o2.clone(), vm.base.clone()]);
    assert_eq!(view(&o2), now);
    assert_eq!(view(&state_file(&vm, "s2")), at_s2);

    let r = snapshot_delete(&vm.conn, "vm", "s2", &mut Hooks::default()).unwrap();
    assert_eq!(view(&o2), now);
    assert!(vm.base.exists() && o2.exists() && stray.exists());
    assert!(
        r.kept
            .iter()
            .any(|(f, why)| *f == vm.base && why.contains("did not create")),
        "the user's base is kept, and the report says why: {:?}",
        r.kept
    );
    assert!(vm.snapshot_names().is_empty());
    all_clean(&vm);
}

#[test]
fn a_second_operation_on_the_domain_is_refused_while_one_runs() {
    let vm = TestVm::new();
    create(&vm, "take-1", None);
    write(&vm.active(), 0, 2 * MIB as usize, 0x22);
    let files_before = vm.files();
    let mut second: Option<Result<strata_libvirt::Report, Error>> = None;
    let mut during = |_: strata_merge::Progress| {
        if second.is_none() {
            second = Some(snapshot_create(
                &vm.conn,
                "vm",
                "take-2",
                &SnapshotCreateOptions::default(),
            ));
        }
    };
    let _ = blockcommit(
        &vm.conn,
        "vm",
        &BlockCommitOptions::default().with_delete_snapshots(true),
        &mut Hooks::new().with_progress(&mut during),
    )
    .unwrap();
    let second = second.expect("the commit reported progress");
    assert!(
        matches!(&second, Err(Error::Busy { .. })),
        "the second operation is refused: {second:?}"
    );
    let msg = second.unwrap_err().to_string();
    assert!(
        msg.contains("busy") && msg.contains("nothing was changed"),
        "{msg}"
    );
    assert!(!vm.root().join("test.take-2").exists());
    assert_eq!(vm.active(), vm.base, "the commit finished as asked");
    assert!(files_before.contains(&vm.base));
    assert!(vm.snapshot_names().is_empty());
    // The lock is released with the operation.
    create(&vm, "take-3", None);
}

/// Redefines a snapshot `name` of `vm` from `extra` (memory and disks
/// elements) and the current domain definition.
fn redefine_raw(vm: &TestVm, name: &str, extra: &str) {
    let xml = format!(
        "<domainsnapshot><name>{name}</name><state>running</state>\
         <creationTime>1700000000</creationTime>{extra}{}</domainsnapshot>",
        vm.xml()
    );
    virt::domain_snapshot::DomainSnapshot::create_xml(
        &vm.dom(),
        &xml,
        virt::sys::VIR_DOMAIN_SNAPSHOT_CREATE_REDEFINE,
    )
    .unwrap();
}

#[test]
fn reverting_a_snapshot_with_an_unusable_memory_state_changes_nothing_and_disks_only_works() {
    use strata_libvirt::{snapshot_revert_with, RevertOptions};
    let vm = TestVm::new();
    let mem = vm.root().join("test.mem");
    std::fs::write(&mem, b"memory").unwrap();
    let o1 = vm.root().join("test.take-1");
    qemu(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-F",
        "qcow2",
        "-b",
        vm.base.to_str().unwrap(),
        o1.to_str().unwrap(),
    ]);
    redefine_raw(
        &vm,
        "take-1",
        &format!(
            "<memory snapshot='external' file='{}'/><disks><disk name='vda' \
             snapshot='external' type='file'><source file='{}'/></disk></disks>",
            mem.display(),
            o1.display()
        ),
    );
    let xml = vm.xml();

    // Not a save image libvirt can restore from: refused before any change.
    let e = snapshot_revert(&vm.conn, "vm", "take-1").unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, Error::Libvirt { .. }), "{e:?}");
    assert!(
        msg.contains(&mem.display().to_string())
            && msg.contains("--disks-only")
            && msg.contains("nothing was changed"),
        "{msg}"
    );
    assert_eq!(vm.xml(), xml, "nothing changed");

    let r = snapshot_revert_with(
        &vm.conn,
        "vm",
        "take-1",
        &RevertOptions::default().with_disks_only(true),
    )
    .unwrap();
    assert!(
        r.kept
            .iter()
            .any(|(f, why)| *f == mem && why.contains("memory")),
        "{r:?}"
    );
    assert!(mem.exists());
    assert_eq!(chain(&vm.active())[1], vm.base);
}

#[test]
fn deleting_an_internal_snapshot_is_refused_and_changes_nothing() {
    let vm = TestVm::new();
    redefine_raw(
        &vm,
        "inside",
        "<memory snapshot='internal'/><disks><disk name='vda' snapshot='internal'/></disks>",
    );
    let e = snapshot_delete(&vm.conn, "vm", "inside", &mut Hooks::default()).unwrap_err();
    assert!(matches!(e, Error::Unsupported(_)), "{e:?}");
    assert!(e.to_string().contains("internal snapshot"), "{e}");
    assert_eq!(vm.snapshot_names(), vec!["inside"]);
    let e = snapshot_revert(&vm.conn, "vm", "inside").unwrap_err();
    assert!(matches!(e, Error::Unsupported(_)), "{e:?}");
}

#[test]
fn blockcommit_keeps_a_merged_image_it_did_not_make_unless_asked_to_delete_it() {
    for delete_merged in [false, true] {
        let vm = TestVm::new();
        // An overlay the user made by hand and pointed the domain at.
        let manual = vm.root().join("manual.qcow2");
        qemu(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "qcow2",
            "-b",
            vm.base.to_str().unwrap(),
            manual.to_str().unwrap(),
        ]);
        write(&manual, 0, 4096, 0x77);
        let xml = replace_disk(&vm.xml(), "vda", &manual, "");
        virt::domain::Domain::define_xml(&vm.conn, &xml).unwrap();

        let r = blockcommit(
            &vm.conn,
            "vm",
            &BlockCommitOptions::default().with_delete_merged(delete_merged),
            &mut Hooks::default(),
        )
        .unwrap();

        assert_eq!(vm.active(), vm.base);
        assert_eq!(view(&vm.base)[0], 0x77);
        if delete_merged {
            assert!(!manual.exists(), "--delete removes it: {r:?}");
            assert_eq!(r.removed, vec![manual.clone()]);
        } else {
            assert!(manual.exists());
            assert!(
                r.kept
                    .iter()
                    .any(|(f, why)| *f == manual && why.contains("did not create")),
                "{r:?}"
            );
        }
    }
}
