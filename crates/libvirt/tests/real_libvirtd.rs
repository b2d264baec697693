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
         </devices></domain>",
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

/// One private libvirtd for the whole binary (its start-up is most of the
/// cost): the scenarios run one after the other on it.
#[test]
fn on_a_real_libvirtd_and_qemu() {
    let t0 = Instant::now();
    let Some(d) = Libvirtd::start() else { return };
    eprintln!("libvirtd up after {:?}", t0.elapsed());
    the_seed_walk_through(&d);
    eprintln!("seed walk-through done after {:?}", t0.elapsed());
    libvirt_made_chains_give_qemu_the_right_disk(&d);
    eprintln!("libvirt-made chains done after {:?}", t0.elapsed());
}

fn the_seed_walk_through(d: &Libvirtd) {
    let t0 = Instant::now();
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
    assert_eq!(blklist_source(d), base.display().to_string());

    // snapshot-create-as --disk-only take-1 (default file name)
    let state0 = work.path().join("state0.raw");
    snapshot_view(&base, &state0);
    let _ = snapshot_create(
        &conn,
        "test",
        "take-1",
        &SnapshotCreateOptions::default().with_description("first snapshot"),
    )
    .unwrap();
    let o1 = kvm.join("test.take-1");
    assert_eq!(blklist_source(d), o1.display().to_string());
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
    let _ = snapshot_create(
        &conn,
        "test",
        "take-2",
        &SnapshotCreateOptions::default().with_file(o2.clone()),
    )
    .unwrap();
    assert_eq!(blklist_source(d), o2.display().to_string());
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
    let _ = snapshot_revert(&conn, "test", "take-1").unwrap();
    let a = PathBuf::from(blklist_source(d));
    assert!(
        compare(&a, &state0),
        "guest view equals the state at take-1"
    );
    assert!(d
        .virsh(&["snapshot-current", "test", "--name"])
        .contains("take-1"));
    assert!(!o2.exists());

    // revert to take-2
    let _ = snapshot_revert(&conn, "test", "take-2").unwrap();
    assert_eq!(blklist_source(d), o2.display().to_string());
    assert!(compare(&o2, &state1));
    assert!(!a.exists());
    write(&o2, 4 * MIB, 4096, 0x44);
    let now = work.path().join("now.raw");
    snapshot_view(&o2, &now);

    // delete take-1: the current view and take-2's state are unchanged
    let _ = snapshot_delete(&conn, "test", "take-1", &mut Hooks::default()).unwrap();
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
    let _ = snapshot_delete(&conn, "test", "take-2", &mut Hooks::default()).unwrap();
    assert!(compare(&o2, &now));
    assert!(!d.virsh(&["snapshot-list", "test"]).contains("take-"));

    // blockcommit --active --pivot: back on the base, data kept
    let _ = blockcommit(
        &conn,
        "test",
        &BlockCommitOptions::default(),
        &mut Hooks::default(),
    )
    .unwrap();
    assert_eq!(blklist_source(d), base.display().to_string());
    assert!(compare(&base, &now));
    assert!(backing_lines(&base).is_empty());
    assert!(!o2.exists() && !o1.exists());
    let (ok, out) = qemu_img(&["check", &base.display().to_string()]);
    assert!(ok, "{out}");
    // Not the word "strata": the images' own path may contain it.
    assert!(!d
        .virsh(&["dumpxml", "test", "--inactive"])
        .contains(STRATA_NS));

    // A started domain: a live snapshot; a revert without force is refused.
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
            // Live: libvirt's own snapshot; a revert without force is refused.
            let _ = snapshot_create(&conn, "tiny", "take-1", &SnapshotCreateOptions::default())
                .unwrap();
            assert!(kvm.join("tiny.take-1").exists());
            let e = snapshot_revert(&conn, "tiny", "take-1");
            assert!(matches!(e, Err(Error::RevertRunning { .. })), "{e:?}");
            assert!(vm2.is_active().unwrap());
            vm2.destroy().unwrap();
        }
        Err(e) => panic!("QEMU did not start under the private libvirtd: {e}"),
    }
    conn.close().unwrap();
    eprintln!("real libvirtd walk-through took {:?}", t0.elapsed());
}

impl Libvirtd {
    /// virsh's exit status and its stdout + stderr.
    fn try_virsh(&self, args: &[&str]) -> (bool, String) {
        let out = Command::new("virsh")
            .arg("-c")
            .arg(&self.uri)
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }

    fn qmp(&self, dom: &str, cmd: serde_json::Value) -> serde_json::Value {
        let out = self.virsh(&["qemu-monitor-command", dom, &cmd.to_string()]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert!(v.get("error").is_none(), "{cmd}: {v}");
        v["return"].clone()
    }
}

/// What QEMU, started by libvirt, opened for one disk and what the guest
/// reads from it.
struct Seen {
    /// The chain of the disk's top node, top first (`image` and its
    /// `backing-image`s in `query-block`).
    chain: Vec<PathBuf>,
    /// Every file QEMU opened, for any disk (`query-named-block-nodes`).
    files: Vec<PathBuf>,
    /// The guest view of the disk, read over NBD from QEMU itself.
    view: Vec<u8>,
}

/// `virsh start`, ask QEMU what it opened for disk `target`, export that
/// disk's node over NBD on a unix socket in `dir` and read it with
/// qemu-img, then `virsh destroy`.
fn qemu_sees(d: &Libvirtd, dom: &str, target: &str, dir: &Path) -> Seen {
    let (ok, out) = d.try_virsh(&["start", dom]);
    assert!(ok, "virsh start {dom}: {out}");
    let index = target.as_bytes()[2] - b'a';
    let qdev = format!("/machine/peripheral/virtio-disk{index}/virtio-backend");
    let blocks = d.qmp(dom, serde_json::json!({"execute": "query-block"}));
    let inserted = blocks
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["qdev"] == qdev.as_str())
        .map(|b| b["inserted"].clone())
        .unwrap_or_else(|| panic!("no {qdev} in {blocks}"));
    let node = inserted["node-name"].as_str().unwrap().to_string();
    let nodes = d.qmp(
        dom,
        serde_json::json!({"execute": "query-named-block-nodes", "arguments": {"flat": true}}),
    );
    let nodes = nodes.as_array().unwrap();
    let mut files: Vec<PathBuf> = nodes
        .iter()
        .filter_map(|n| n["file"].as_str())
        .filter(|f| !f.starts_with("json:"))
        .map(PathBuf::from)
        .collect();
    files.sort();
    files.dedup();
    let mut chain = Vec::new();
    let mut image = Some(&inserted["image"]);
    while let Some(i) = image.filter(|i| i.is_object()) {
        let f = i["filename"].as_str().unwrap();
        assert!(
            !f.starts_with("json:"),
            "QEMU was given a chain other than the images' own: {f}"
        );
        chain.push(PathBuf::from(f));
        image = i.get("backing-image");
    }
    let sock = dir.join("nbd.sock");
    d.qmp(
        dom,
        serde_json::json!({"execute": "nbd-server-start", "arguments": {
            "addr": {"type": "unix", "data": {"path": sock.to_str().unwrap()}}}}),
    );
    d.qmp(
        dom,
        serde_json::json!({"execute": "block-export-add", "arguments": {
            "type": "nbd", "id": "strata-check", "node-name": node, "name": target,
            "writable": false}}),
    );
    let raw = dir.join("guest-view.raw");
    let (ok, out) = qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "raw",
        &format!("nbd:unix:{}:exportname={target}", sock.display()),
        raw.to_str().unwrap(),
    ]);
    assert!(ok, "{out}");
    let view = std::fs::read(&raw).unwrap();
    std::fs::remove_file(&raw).unwrap();
    d.virsh(&["destroy", dom]);
    let _ = std::fs::remove_file(&sock);
    Seen { chain, files, view }
}

/// The guest view of `path`'s chain read by qemu-img.
fn raw_view(path: &Path) -> Vec<u8> {
    let tmp = path.with_file_name(".raw-view.tmp");
    snapshot_view(path, &tmp);
    let v = std::fs::read(&tmp).unwrap();
    std::fs::remove_file(&tmp).unwrap();
    v
}

fn multi_disk_xml(name: &str, dir: &Path) -> String {
    let disk = |fmt: &str, file: &str, dev: &str, attr: &str, extra: &str| {
        format!(
            "<disk type='file' device='disk'{attr}><driver name='qemu' type='{fmt}'/>\
             <source file='{}'/><target dev='{dev}' bus='virtio'/>{extra}</disk>",
            dir.join(file).display()
        )
    };
    format!(
        "<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>\
         <os><type arch='x86_64' machine='pc'>hvm</type></os><features><acpi/></features>\
         <devices>{}{}{}{}<disk type='file' device='cdrom'><driver name='qemu' type='raw'/>\
         <target dev='hdc' bus='ide'/><readonly/></disk>\
         </devices></domain>",
        disk("qcow2", "test.qcow2", "vda", "", ""),
        disk("raw", "data.raw", "vdb", "", ""),
        disk("qcow2", "nosnap.qcow2", "vdc", " snapshot='no'", ""),
        disk("raw", "ro.raw", "vdd", "", "<readonly/>"),
    )
}

/// Snapshots taken by `virsh snapshot-create-as --disk-only` on a RUNNING
/// multi-disk domain (libvirt writes the chain into `<backingStore>`),
/// then every Strata operation offline; after each, QEMU started by
/// libvirt must open the chain the images describe and the guest must
/// read the expected state. Paths have a space and a non-ASCII letter.
fn libvirt_made_chains_give_qemu_the_right_disk(d: &Libvirtd) {
    let mut conn = Connect::open(Some(&d.uri)).unwrap();
    let work = tempfile::tempdir().unwrap();
    let root = std::fs::canonicalize(work.path()).unwrap();
    let dir = root.join("kvm dïr");
    std::fs::create_dir(&dir).unwrap();
    let base = dir.join("test.qcow2");
    for (f, fmt, size) in [
        ("test.qcow2", "qcow2", "16M"),
        ("data.raw", "raw", "4M"),
        ("nosnap.qcow2", "qcow2", "4M"),
        ("ro.raw", "raw", "1M"),
    ] {
        let (ok, out) = qemu_img(&[
            "create",
            "-q",
            "-f",
            fmt,
            dir.join(f).to_str().unwrap(),
            size,
        ]);
        assert!(ok, "{out}");
    }
    write(&base, 0, MIB as usize, 0x11);
    let nosnap = dir.join("nosnap.qcow2");
    write(&nosnap, 0, 4096, 0x5a);
    Domain::define_xml(&conn, &multi_disk_xml("multi", &dir)).unwrap();

    // Two snapshots by libvirt on the running domain.
    let at_s1 = raw_view(&base);
    d.virsh(&["start", "multi"]);
    d.virsh(&[
        "snapshot-create-as",
        "multi",
        "s1",
        "--disk-only",
        "--atomic",
    ]);
    d.virsh(&["destroy", "multi"]);
    let o1 = dir.join("test.s1");
    write(&o1, 2 * MIB, 4096, 0x22);
    let at_s2 = raw_view(&o1);
    let o2 = dir.join("s2 vda.qcow2");
    d.virsh(&["start", "multi"]);
    d.virsh(&[
        "snapshot-create-as",
        "multi",
        "s2",
        "--disk-only",
        "--diskspec",
        &format!("vda,snapshot=external,file={}", o2.display()),
    ]);
    d.virsh(&["destroy", "multi"]);
    write(&o2, 3 * MIB, 4096, 0x33);
    let now = raw_view(&o2);
    let xml = d.virsh(&["dumpxml", "multi", "--inactive"]);
    assert!(
        xml.contains("<backingStore"),
        "control: libvirt wrote the chain: {xml}"
    );

    // create on libvirt's chain: QEMU must not skip s2's overlay.
    let _ = snapshot_create(&conn, "multi", "take-3", &SnapshotCreateOptions::default()).unwrap();
    let o3 = dir.join("s2 vda.take-3");
    let seen = qemu_sees(d, "multi", "vda", &root);
    assert_eq!(
        seen.chain,
        vec![o3.clone(), o2.clone(), o1.clone(), base.clone()]
    );
    assert!(
        seen.view == now,
        "after create the guest reads the state it had"
    );
    assert!(seen.files.contains(&nosnap), "vdc still uses its own file");
    assert!(
        !seen
            .files
            .iter()
            .any(|f| f.to_string_lossy().contains("nosnap.") && *f != nosnap),
        "snapshot='no' disk left alone: {:?}",
        seen.files
    );
    write(&o3, 4 * MIB, 4096, 0x44);

    // revert to s1: the guest sees s1's state, not a later one.
    let _ = snapshot_revert(&conn, "multi", "s1").unwrap();
    let seen = qemu_sees(d, "multi", "vda", &root);
    assert_eq!(seen.chain.len(), 2, "{:?}", seen.chain);
    assert_eq!(seen.chain[1], base);
    assert!(
        seen.view == at_s1,
        "after revert s1 the guest reads s1's state"
    );
    assert_eq!(raw_view(&nosnap)[0], 0x5a, "vdc keeps its data");

    // revert to take-3 (Strata's snapshot on libvirt's chain).
    let _ = snapshot_revert(&conn, "multi", "take-3").unwrap();
    let seen = qemu_sees(d, "multi", "vda", &root);
    assert_eq!(&seen.chain[1..], &[o2.clone(), o1.clone(), base.clone()]);
    assert!(
        seen.view == now,
        "after revert take-3 the guest reads take-3's state"
    );

    // delete s1 (libvirt's): its overlay is committed into the base and
    // removed; the guest's view is unchanged.
    let r = snapshot_delete(&conn, "multi", "s1", &mut Hooks::default()).unwrap();
    assert!(!o1.exists(), "{r:?}");
    let seen = qemu_sees(d, "multi", "vda", &root);
    assert_eq!(&seen.chain[1..], &[o2.clone(), base.clone()]);
    assert!(seen.view == now);
    let l = snapshot_list(&conn, "multi").unwrap();
    let s2 = l.iter().find(|s| s.name == "s2").unwrap();
    let s2_vda = s2.disks.iter().find(|k| k.disk == "vda").unwrap();
    assert!(raw_view(s2_vda.state_file.as_ref().unwrap()) == at_s2);

    // blockcommit: QEMU starts on the base (no chain looping back to it).
    let _ = blockcommit(
        &conn,
        "multi",
        &BlockCommitOptions::default()
            .with_disk("vda")
            .with_delete_snapshots(true),
        &mut Hooks::default(),
    )
    .unwrap();
    let seen = qemu_sees(d, "multi", "vda", &root);
    assert_eq!(seen.chain, vec![base.clone()]);
    assert!(seen.view == now);
    let (ok, out) = qemu_img(&["check", base.to_str().unwrap()]);
    assert!(ok, "{out}");

    // A snapshot with memory state (taken by libvirt with --memspec):
    // reverted with its memory (the domain comes back running, the memory
    // file untouched), or with --disks-only the disks alone.
    let mem = dir.join("m1.mem");
    d.virsh(&["start", "multi"]);
    d.virsh(&[
        "snapshot-create-as",
        "multi",
        "m1",
        "--memspec",
        &format!("file={},snapshot=external", mem.display()),
        "--diskspec",
        "vda,snapshot=external",
        "--diskspec",
        "vdb,snapshot=no",
    ]);
    d.virsh(&["destroy", "multi"]);
    let at_m1 = raw_view(&base);
    let mem_bytes = std::fs::read(&mem).unwrap();
    write(&dir.join("test.m1"), 0, 4096, 0x66);
    let r = snapshot_revert(&conn, "multi", "m1").unwrap();
    assert_eq!(r.restored.as_deref(), Some(mem.as_path()), "{r:?}");
    assert_eq!(d.virsh(&["domstate", "multi"]).trim(), "running");
    assert!(
        std::fs::read(&mem).unwrap() == mem_bytes,
        "memory file untouched"
    );
    d.virsh(&["destroy", "multi"]);
    write(&dir.join("test.m1"), 0, 4096, 0x66);
    let r = strata_libvirt::snapshot_revert_with(
        &conn,
        "multi",
        "m1",
        &strata_libvirt::RevertOptions::default().with_disks_only(true),
    )
    .unwrap();
    assert!(r.kept.iter().any(|k| k.0 == mem), "{r:?}");
    assert!(mem.exists());
    let seen = qemu_sees(d, "multi", "vda", &root);
    assert_eq!(seen.chain[1], base);
    assert!(seen.view == at_m1, "the disks are back at m1");

    // blockpull: the active image stands alone, QEMU opens it alone.
    let _ = strata_libvirt::blockpull(
        &conn,
        "multi",
        &strata_libvirt::BlockPullOptions::default().with_disk("vda"),
        &mut Hooks::default(),
    )
    .unwrap();
    let seen = qemu_sees(d, "multi", "vda", &root);
    assert_eq!(seen.chain.len(), 1, "{:?}", seen.chain);
    assert!(seen.view == at_m1);

    // An internal snapshot (libvirt makes one of a shut-off all-qcow2
    // domain): delete is refused, and the snapshot stays in the image.
    let solo = dir.join("solo.qcow2");
    let (ok, out) = qemu_img(&["create", "-q", "-f", "qcow2", solo.to_str().unwrap(), "1M"]);
    assert!(ok, "{out}");
    Domain::define_xml(&conn, &domain_xml("solo", &solo)).unwrap();
    d.virsh(&["snapshot-create-as", "solo", "i1"]);
    let e = snapshot_delete(&conn, "solo", "i1", &mut Hooks::default()).unwrap_err();
    assert!(matches!(e, Error::Unsupported(_)), "{e:?}");
    let (_, list) = qemu_img(&["snapshot", "-l", "-U", solo.to_str().unwrap()]);
    assert!(list.contains("i1"), "{list}");
    d.virsh(&["snapshot-delete", "solo", "i1"]);
    d.virsh(&["undefine", "solo"]);

    // An empty <backingStore/> ("no backing file"): after Strata's
    // create QEMU must still read the new overlay's backing file.
    let eb = dir.join("eb.qcow2");
    let (ok, out) = qemu_img(&["create", "-q", "-f", "qcow2", eb.to_str().unwrap(), "1M"]);
    assert!(ok, "{out}");
    write(&eb, 0, 4096, 0x11);
    let xml =
        domain_xml("eb", &eb).replace("<target dev='vda'", "<backingStore/><target dev='vda'");
    Domain::define_xml(&conn, &xml).unwrap();
    let _ = snapshot_create(&conn, "eb", "take-1", &SnapshotCreateOptions::default()).unwrap();
    let seen = qemu_sees(d, "eb", "vda", &root);
    assert_eq!(seen.chain, vec![dir.join("eb.take-1"), eb.clone()]);
    assert!(seen.view == raw_view(&eb), "not an all-zero disk");
    d.virsh(&["undefine", "eb", "--snapshots-metadata"]);

    d.virsh(&["undefine", "multi", "--snapshots-metadata"]);
    conn.close().unwrap();
}
