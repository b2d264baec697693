//! "The real client decides": a real guest, booted by a private libvirtd
//! from the chains Strata left, reads its disks and prints their sha256.
//! After every Strata operation the guest's checksum must equal the state
//! the operation promises, computed beforehand with `qemu-img convert -O raw`.
//!
//! The guest is scripts/guest/build-guest.sh's tiny Linux (Debian's cloud
//! kernel, busybox-static; built once per machine under CARGO_TARGET_TMPDIR).
//! Each test has its own libvirtd and directory. A boot takes ~4 s with TCG.
//! Needs root and `scripts/install-deps.sh --libvirt`; without libvirtd the
//! tests fail, unless STRATA_SKIP_LIBVIRTD_TESTS=1.

mod guest;

use std::path::PathBuf;

use guest::*;
use strata_libvirt::{
    blockcommit, blockpull, snapshot_create, snapshot_delete, snapshot_revert, BlockCommitOptions,
    BlockPullOptions, Connect, SnapshotCreateOptions,
};
use strata_merge::Hooks;

/// Asserts the boot's checksum of `disk` is `want` and that QEMU opened
/// exactly the files `files` (the chain the image headers describe), with
/// the evidence: what QEMU opened, the domain's disks, the serial console.
fn assert_guest_sees(
    lv: &Libvirtd,
    dom: &GuestDomain,
    disk: &str,
    want: &str,
    files: &[PathBuf],
    what: &str,
) {
    let boot = match dom.boot(lv) {
        Ok(b) => b,
        Err(e) => panic!(
            "{what}: the guest did not boot: {e}\n--- domain disks (inactive XML):\n{}\
             --- libvirtd log:\n{}",
            dom.disk_xml(lv),
            lv.log_tail(5)
        ),
    };
    let got = boot.sums.get(disk).map(String::as_str).unwrap_or("(none)");
    assert!(
        got == want,
        "{what}: the guest read {disk} = {got}, expected {want}\n\
         --- block nodes QEMU opened (query-named-block-nodes):\n{}\n\
         --- domain disks (inactive XML):\n{}--- serial console:\n{}",
        boot.nodes.join("\n"),
        dom.disk_xml(lv),
        boot.serial
    );
    assert!(
        boot.opened_files() == files,
        "{what}: the guest read the right data, but QEMU opened {:?}, and the images' \
         chain is {files:?}\n--- block nodes QEMU opened (query-named-block-nodes):\n{}\n\
         --- domain disks (inactive XML):\n{}",
        boot.opened_files(),
        boot.nodes.join("\n"),
        dom.disk_xml(lv),
    );
    eprintln!(
        "{what}: guest sees the expected {disk} ({:.1?})",
        boot.elapsed
    );
}

#[test]
fn harness_raw_disk_and_qcow2_chain_read_as_qemu_img_does() {
    let Some(lv) = Libvirtd::start() else { return };
    let g = guest_image();
    eprintln!("guest: {}", g.versions.replace('\n', "; "));
    let work = tempfile::tempdir().unwrap();
    let dir = std::fs::canonicalize(work.path()).unwrap();

    let raw = dir.join("disk.raw");
    qemu_img(&["create", "-q", "-f", "raw", &s(&raw), "8M"]);
    qemu_io(&raw, "raw", "write -P 0x5a 0 1M");
    qemu_io(&raw, "raw", "write -P 0xa5 7M 4k");

    let base = dir.join("base.qcow2");
    let top = dir.join("top.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", &s(&base), "16M"]);
    qemu_io(&base, "qcow2", "write -P 0x11 0 2M");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        &s(&base),
        "-F",
        "qcow2",
        &s(&top),
    ]);
    qemu_io(&top, "qcow2", "write -P 0x22 1M 64k");
    qemu_io(&top, "qcow2", "write -z 8M 1M");
    qemu_io(&top, "qcow2", "write -P 0x33 15M 4k");

    let want_raw = sha256_file(&raw);
    let want_chain = sha256_view(&top, &dir);
    assert_ne!(
        want_chain,
        sha256_view(&base, &dir),
        "control: the top matters"
    );

    let dom = GuestDomain::define(
        &lv,
        "harness",
        &g,
        &[
            Disk::new("vda", &raw, "raw"),
            Disk::new("vdb", &top, "qcow2"),
        ],
        &dir,
    );
    let boot = dom.boot(&lv).unwrap();
    eprintln!("block nodes: {:#?}", boot.nodes);
    assert_eq!(boot.sums["vda"], want_raw, "raw disk\n{}", boot.serial);
    assert_eq!(boot.sums["vdb"], want_chain, "qcow2 chain\n{}", boot.serial);
    let mut files = chain_files(&top);
    files.push(raw.clone());
    files.sort();
    assert_eq!(
        boot.opened_files(),
        files,
        "QEMU opened the raw disk and the chain"
    );
    assert!(files.contains(&base));
    lv.virsh(&["undefine", "harness"]);
}

/// The seed's workflow, with libvirt making the snapshots of a running
/// domain (QEMU started paused: libvirt snapshots it live, the guest need
/// not run), so that libvirt writes the chain into `<backingStore>`:
///
/// - kvm/test.qcow2: 0x11 at 0..1M                      state of take-1 (s0)
/// - take-1 (libvirt's default name kvm/test.take-1): 0x22 at 2M   state of take-2 (s1)
/// - take-2 (`--diskspec vda,snapshot=external,file=kvm/test/test.take-2`): 0x33 at 3M
///   the domain's current view (s2)
struct Seed {
    // Field order is drop order: libvirtd (and its QEMUs) first, then files.
    lv: Libvirtd,
    conn: Connect,
    dom: GuestDomain,
    _work: tempfile::TempDir,
    dir: PathBuf,
    base: PathBuf,
    o1: PathBuf,
    o2: PathBuf,
    s0: String,
    s1: String,
    s2: String,
}

const DOM: &str = "test";

impl Seed {
    fn new() -> Option<Seed> {
        let lv = Libvirtd::start()?;
        let g = guest_image();
        let work = tempfile::tempdir().unwrap();
        let dir = std::fs::canonicalize(work.path()).unwrap();
        let kvm = dir.join("kvm");
        std::fs::create_dir_all(kvm.join("test")).unwrap();
        let base = kvm.join("test.qcow2");
        qemu_img(&["create", "-q", "-f", "qcow2", &s(&base), "16M"]);
        qemu_io(&base, "qcow2", "write -P 0x11 0 1M");
        let dom = GuestDomain::define(&lv, DOM, &g, &[Disk::new("vda", &base, "qcow2")], &dir);
        let s0 = sha256_view(&base, &dir);

        dom.while_running(&lv, || {
            lv.virsh(&[
                "snapshot-create-as",
                DOM,
                "take-1",
                "--disk-only",
                "--atomic",
            ]);
        });
        let o1 = kvm.join("test.take-1");
        assert_eq!(active(&lv), o1, "libvirt's default overlay name");
        qemu_io(&o1, "qcow2", "write -P 0x22 2M 64k");
        let s1 = sha256_view(&o1, &dir);

        let o2 = kvm.join("test/test.take-2");
        dom.while_running(&lv, || {
            lv.virsh(&[
                "snapshot-create-as",
                DOM,
                "take-2",
                "--disk-only",
                "--atomic",
                "--diskspec",
                &format!("vda,snapshot=external,file={}", o2.display()),
            ]);
        });
        assert_eq!(active(&lv), o2);
        qemu_io(&o2, "qcow2", "write -P 0x33 3M 64k");
        let s2 = sha256_view(&o2, &dir);
        assert!(s0 != s1 && s1 != s2 && s0 != s2, "the states differ");
        let xml = lv.virsh(&["dumpxml", "--inactive", DOM]);
        assert!(
            xml.contains("<backingStore type='file'"),
            "control: libvirt wrote the chain into <backingStore>:\n{xml}"
        );
        let conn = Connect::open(Some(&lv.uri)).unwrap();
        Some(Seed {
            lv,
            conn,
            dom,
            _work: work,
            dir,
            base,
            o1,
            o2,
            s0,
            s1,
            s2,
        })
    }

    /// sha256 of the guest view of the domain's active file now.
    fn view_now(&self) -> String {
        sha256_view(&active(&self.lv), &self.dir)
    }

    fn sees(&self, want: &str, what: &str) {
        let files = chain_files(&active(&self.lv));
        assert_guest_sees(&self.lv, &self.dom, "vda", want, &files, what);
    }
}

impl Drop for Seed {
    fn drop(&mut self) {
        let _ = self.conn.close();
    }
}

/// The file `vda` uses, from `virsh domblklist`.
fn active(lv: &Libvirtd) -> PathBuf {
    let out = lv.virsh(&["domblklist", DOM]);
    let line = out
        .lines()
        .find(|l| l.trim_start().starts_with("vda"))
        .unwrap_or_else(|| panic!("no vda in {out}"));
    PathBuf::from(line.split_whitespace().nth(1).unwrap())
}

// The Strata operations, as `strata snapshot ...` / `strata blockcommit` /
// `strata blockpull` run them (the CLI calls these functions).
fn revert(t: &Seed, name: &str) {
    let _ = snapshot_revert(&t.conn, DOM, name).unwrap();
}

fn create(t: &Seed, name: &str) {
    let _ = snapshot_create(&t.conn, DOM, name, &SnapshotCreateOptions::default()).unwrap();
}

fn delete(t: &Seed, name: &str) {
    let _ = snapshot_delete(&t.conn, DOM, name, &mut Hooks::default()).unwrap();
}

fn commit(t: &Seed) {
    let opts = BlockCommitOptions::default().with_delete_snapshots(true);
    let _ = blockcommit(&t.conn, DOM, &opts, &mut Hooks::default()).unwrap();
}

fn pull(t: &Seed) {
    let _ = blockpull(
        &t.conn,
        DOM,
        &BlockPullOptions::default(),
        &mut Hooks::default(),
    )
    .unwrap();
}

#[test]
fn control_libvirt_made_chain_boots_with_its_current_state() {
    let Some(t) = Seed::new() else { return };
    t.sees(&t.s2, "after libvirt's two snapshots");
    // And the files agree with what libvirt's XML says.
    assert_eq!(t.view_now(), t.s2);
    let _ = (&t.base, &t.o1, &t.s0, &t.s1);
}

#[test]
fn revert_on_libvirt_made_snapshots_boots_the_snapshot_state() {
    let Some(t) = Seed::new() else { return };
    revert(&t, "take-1");
    assert_eq!(t.view_now(), t.s0, "control: the files hold take-1's state");
    t.sees(&t.s0, "strata snapshot revert test take-1");
    revert(&t, "take-2");
    assert_eq!(t.view_now(), t.s1, "control: the files hold take-2's state");
    t.sees(&t.s1, "strata snapshot revert test take-2");
}

#[test]
fn create_on_libvirt_made_chain_keeps_the_current_state() {
    let Some(t) = Seed::new() else { return };
    let before = t.view_now();
    create(&t, "take-3");
    t.sees(&before, "strata snapshot create test take-3");
}

#[test]
fn delete_on_libvirt_made_snapshots_keeps_the_current_state() {
    let Some(t) = Seed::new() else { return };
    let before = t.view_now();
    delete(&t, "take-1");
    t.sees(&before, "strata snapshot delete test take-1");
    delete(&t, "take-2");
    t.sees(&before, "strata snapshot delete test take-2");
}

#[test]
fn blockcommit_on_libvirt_made_chain_keeps_the_current_state() {
    let Some(t) = Seed::new() else { return };
    let before = t.view_now();
    commit(&t);
    assert_eq!(active(&t.lv), t.base, "the domain is on the base");
    t.sees(&before, "strata blockcommit test vda --delete (snapshots)");
}

#[test]
fn blockpull_on_libvirt_made_chain_keeps_the_current_state() {
    let Some(t) = Seed::new() else { return };
    let before = t.view_now();
    pull(&t);
    assert_eq!(active(&t.lv), t.o2, "the domain keeps its file");
    t.sees(&before, "strata blockpull test vda");
}

/// A disk defined with an empty `<backingStore/>` (libvirt: "this image has
/// no backing file"), then `strata snapshot create`: QEMU must open the new
/// overlay with its backing file.
#[test]
fn create_on_a_disk_with_empty_backing_store_keeps_the_data() {
    let Some(lv) = Libvirtd::start() else { return };
    let g = guest_image();
    let work = tempfile::tempdir().unwrap();
    let dir = std::fs::canonicalize(work.path()).unwrap();
    let base = dir.join("empty-bs.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", &s(&base), "16M"]);
    qemu_io(&base, "qcow2", "write -P 0x55 0 1M");
    let dom = GuestDomain::define(
        &lv,
        DOM,
        &g,
        &[Disk::new("vda", &base, "qcow2").with_extra("<backingStore/>")],
        &dir,
    );
    let want = sha256_view(&base, &dir);
    let mut conn = Connect::open(Some(&lv.uri)).unwrap();
    let _ = snapshot_create(&conn, DOM, "take-1", &SnapshotCreateOptions::default()).unwrap();
    let top = active(&lv);
    assert_ne!(top, base);
    assert_eq!(
        sha256_view(&top, &dir),
        want,
        "control: the files keep the data"
    );
    assert_guest_sees(
        &lv,
        &dom,
        "vda",
        &want,
        &chain_files(&top),
        "strata snapshot create on <backingStore/>",
    );
    conn.close().unwrap();
}
