//! The snapshot lifecycle against libvirt's in-process test driver.

mod common;

use std::path::PathBuf;

use common::*;
use strata_libvirt::xml::STRATA_NS;
use strata_libvirt::{
    blockcommit, blockpull, render_tree, snapshot_create, snapshot_delete, snapshot_list,
    snapshot_revert, BlockCommitOptions, BlockPullOptions, Error, SnapshotCreateOptions,
};
use strata_merge::Hooks;

fn create(vm: &TestVm, name: &str, file: Option<PathBuf>) {
    snapshot_create(
        &vm.conn,
        "vm",
        name,
        &SnapshotCreateOptions {
            file,
            description: Some(format!("snapshot {name}")),
            ..SnapshotCreateOptions::default()
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

    snapshot_revert(&vm.conn, "vm", "take-2").unwrap();
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
    snapshot_revert(&vm.conn, "vm", "take-1").unwrap();
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

    snapshot_delete(&vm.conn, "vm", "take-2", &mut Hooks::default()).unwrap();

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
    snapshot_revert(&vm.conn, "vm", "take-1").unwrap();
    let a = vm.active();
    write(&a, 5 * MIB, 4096, 0x66);
    let now = view(&a);

    snapshot_delete(&vm.conn, "vm", "take-2", &mut Hooks::default()).unwrap();

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
    snapshot_revert(&vm.conn, "vm", "take-1").unwrap();
    snapshot_revert(&vm.conn, "vm", "take-2").unwrap();
    write(&vm.active(), 6 * MIB, 4096, 0x77);
    let now = view(&vm.active());
    assert!(
        vm.xml().contains(STRATA_NS),
        "control: Strata's metadata is there"
    );
    snapshot_delete(&vm.conn, "vm", "take-1", &mut Hooks::default()).unwrap();
    snapshot_delete(&vm.conn, "vm", "take-2", &mut Hooks::default()).unwrap();
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
        &BlockCommitOptions {
            delete_snapshots: true,
            ..BlockCommitOptions::default()
        },
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
        &BlockCommitOptions {
            base: Some(o1.clone()),
            delete_snapshots: true,
            ..BlockCommitOptions::default()
        },
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
    blockpull(
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
fn a_running_domain_is_refused_and_nothing_changes() {
    let vm = TestVm::new();
    create(&vm, "take-1", None);
    let files = vm.files();
    vm.dom().create().unwrap();
    let xml = vm
        .dom()
        .get_xml_desc(virt::sys::VIR_DOMAIN_XML_INACTIVE)
        .unwrap();
    let e = snapshot_create(&vm.conn, "vm", "take-2", &SnapshotCreateOptions::default());
    assert!(
        matches!(e, Err(Error::DomainActive { ref state, .. }) if state == "running"),
        "{e:?}"
    );
    assert!(e.unwrap_err().to_string().contains("shut it down first"));
    assert!(matches!(
        snapshot_revert(&vm.conn, "vm", "take-1"),
        Err(Error::DomainActive { .. })
    ));
    assert!(matches!(
        snapshot_delete(&vm.conn, "vm", "take-1", &mut Hooks::default()),
        Err(Error::DomainActive { .. })
    ));
    vm.dom().suspend().unwrap();
    assert!(matches!(
        blockcommit(&vm.conn, "vm", &BlockCommitOptions::default(), &mut Hooks::default()),
        Err(Error::DomainActive { ref state, .. }) if state == "paused"
    ));
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
        &SnapshotCreateOptions {
            file: Some(vm.root().join("missing/dir.qcow2")),
            ..SnapshotCreateOptions::default()
        },
    );
    assert!(e.is_err());
    assert_eq!(vm.xml(), xml);
    assert_eq!(vm.files(), files);
}

#[test]
fn only_chosen_disks_are_snapshotted() {
    let vm = TestVm::with_disks(&["vda", "vdb"]);
    let vdb = vm.active_of("vdb");
    snapshot_create(
        &vm.conn,
        "vm",
        "take-1",
        &SnapshotCreateOptions {
            disks: Some(vec!["vda".into()]),
            ..SnapshotCreateOptions::default()
        },
    )
    .unwrap();
    assert_eq!(vm.active_of("vda"), vm.root().join("test.take-1"));
    assert_eq!(vm.active_of("vdb"), vdb);
    let both = snapshot_create(
        &vm.conn,
        "vm",
        "take-2",
        &SnapshotCreateOptions {
            file: Some(vm.root().join("x.qcow2")),
            ..SnapshotCreateOptions::default()
        },
    );
    assert!(matches!(both, Err(Error::InvalidArgument(_))));
    create(&vm, "take-2", None);
    assert_eq!(vm.active_of("vdb"), vm.root().join("test-vdb.take-2"));
    snapshot_revert(&vm.conn, "vm", "take-1").unwrap();
    // take-1 did not cover vdb: it stays where it is.
    assert_eq!(vm.active_of("vdb"), vm.root().join("test-vdb.take-2"));
    all_clean(&vm);
}
