//! The seed's workflow on a RUNNING domain (issue 18): a real private
//! libvirtd, a real QEMU (TCG) started paused (libvirt treats it as
//! running; its block jobs run), data written through the running QEMU
//! (HMP `qemu-io` on the guest's disk) between the steps, and Strata's
//! live create, delete, blockcommit, blockpull and forced revert through
//! libvirt's own jobs. After each: the persistent XML and the running QEMU
//! agree on the chain (`dumpxml --inactive`, `query-block`,
//! `query-named-block-nodes`), no stale `<backingStore>`, every snapshot's
//! state and the guest view as recorded (`qemu-img`); one cancelled job
//! leaves a valid chain and the next operation succeeds; at the end the
//! checksum guest boots and reads the expected data.
//!
//! One libvirtd and one domain for the whole binary (one test function).
//! Needs root; without libvirtd it fails unless STRATA_SKIP_LIBVIRTD_TESTS=1.

mod guest;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

use guest::*;
use strata_libvirt::{
    blockcommit, blockpull, snapshot_create, snapshot_delete, snapshot_list, snapshot_revert_with,
    BlockCommitOptions, BlockPullOptions, Connect, DiskSpec, Error, RevertOptions,
    SnapshotCreateOptions,
};
use strata_merge::Hooks;

const DOM: &str = "live";

struct T {
    lv: Libvirtd,
    conn: Connect,
    dom: GuestDomain,
    dir: PathBuf,
    /// snapshot -> sha256 of its state's guest view
    states: BTreeMap<String, String>,
}

impl T {
    fn hmp(&self, cmd: &str) -> String {
        self.lv.virsh(&["qemu-monitor-command", DOM, "--hmp", cmd])
    }

    /// Writes through the running QEMU (as the guest would), flushed.
    fn write(&self, pattern: u8, offset: &str) {
        let out = self.hmp(&format!(
            "qemu-io -d /machine/peripheral/virtio-disk0/virtio-backend \"write -P 0x{pattern:02x} {offset} 64k\""
        ));
        assert!(!out.contains("rror"), "qemu-io: {out}");
        self.hmp("qemu-io -d /machine/peripheral/virtio-disk0/virtio-backend \"flush\"");
    }

    fn persistent_source(&self) -> PathBuf {
        let xml = self.lv.virsh(&["dumpxml", "--inactive", DOM]);
        let disk = &xml[xml.find("<disk ").unwrap()..xml.find("</disk>").unwrap()];
        assert!(
            !disk.contains("<backingStore type="),
            "stale <backingStore> kept in the persistent definition:\n{disk}"
        );
        let i = disk.find("<source file='").unwrap() + 14;
        PathBuf::from(&disk[i..i + disk[i..].find('\'').unwrap()])
    }

    /// QEMU's chain of the disk (query-block), top first.
    fn qemu_chain(&self) -> Vec<PathBuf> {
        let j: serde_json::Value = serde_json::from_str(&self.lv.virsh(&[
            "qemu-monitor-command",
            DOM,
            r#"{"execute":"query-block"}"#,
        ]))
        .unwrap();
        let dev = j["return"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["qdev"].as_str().unwrap_or("").contains("virtio-disk0"))
            .unwrap_or_else(|| panic!("no virtio-disk0 in {j}"));
        let mut v = Vec::new();
        let mut img = &dev["inserted"]["image"];
        while img.is_object() {
            v.push(PathBuf::from(img["filename"].as_str().unwrap()));
            img = &img["backing-image"];
        }
        v
    }

    /// The files QEMU has open (query-named-block-nodes, protocol nodes).
    fn qemu_files(&self) -> Vec<PathBuf> {
        let j: serde_json::Value = serde_json::from_str(&self.lv.virsh(&[
            "qemu-monitor-command",
            DOM,
            r#"{"execute":"query-named-block-nodes","arguments":{"flat":true}}"#,
        ]))
        .unwrap();
        let mut v: Vec<PathBuf> = j["return"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|n| n["drv"] == "file")
            .map(|n| PathBuf::from(n["file"].as_str().unwrap()))
            .collect();
        v.sort();
        v.dedup();
        v
    }

    /// The persistent XML, QEMU and the image headers agree on the chain;
    /// every file of it passes qemu-img check; the domain still runs.
    fn agree(&self, what: &str) -> PathBuf {
        assert!(
            matches!(self.lv.state(DOM).as_str(), "running" | "paused"),
            "{what}: the domain is {}",
            self.lv.state(DOM)
        );
        let src = self.persistent_source();
        let chain = self.qemu_chain();
        assert_eq!(chain.first(), Some(&src), "{what}: persistent XML vs QEMU");
        let mut headers = chain_files(&src);
        assert_eq!(
            self.qemu_files(),
            headers,
            "{what}: QEMU's open files vs headers"
        );
        let mut sorted = chain.clone();
        sorted.sort();
        headers.sort();
        assert_eq!(sorted, headers, "{what}: QEMU's chain vs headers");
        // The top is open read-write in a QEMU whose guest may be
        // writing: its in-flight allocations show as leaked clusters
        // (exit 3) until QEMU flushes its metadata. Any corruption (exit 2)
        // fails; the files are checked strictly once the domain is off.
        for f in &chain {
            let out = std::process::Command::new("qemu-img")
                .args(["check", "-U"])
                .arg(f)
                .output()
                .expect("qemu-img");
            assert!(
                matches!(out.status.code(), Some(0) | Some(3)),
                "{what}: qemu-img check -U {}: {}{}",
                f.display(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        src
    }

    /// Every snapshot's state reads as recorded.
    fn states_hold(&self, what: &str) {
        let _ = self.view();
        for sn in snapshot_list(&self.conn, DOM).unwrap() {
            let want = &self.states[&sn.name];
            let f = sn.disks[0].state_file.clone().unwrap();
            assert_eq!(
                &sha256_view(&f, &self.dir),
                want,
                "{what}: snapshot {}'s state ({})",
                sn.name,
                f.display()
            );
        }
    }

    fn view(&self) -> String {
        // QEMU's qcow2 metadata cache reaches the file on a flush.
        if self.lv.state(DOM) != "shut off" {
            self.hmp("qemu-io -d /machine/peripheral/virtio-disk0/virtio-backend \"flush\"");
        }
        sha256_view(&self.persistent_source(), &self.dir)
    }
}

#[test]
fn the_seed_workflow_on_a_running_domain() {
    let Some(lv) = Libvirtd::start() else { return };
    let g = guest_image();
    let work = tempfile::tempdir().unwrap();
    let dir = std::fs::canonicalize(work.path()).unwrap();
    let kvm = dir.join("kvm");
    std::fs::create_dir_all(kvm.join("test")).unwrap();
    let base = kvm.join("test.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", &s(&base), "16M"]);
    qemu_io(&base, "qcow2", "write -P 0x11 0 4M");
    let dom = GuestDomain::define(&lv, DOM, &g, &[Disk::new("vda", &base, "qcow2")], &dir);
    let conn = Connect::open(Some(&lv.uri)).unwrap();
    let mut t = T {
        lv,
        conn,
        dom,
        dir: dir.clone(),
        states: BTreeMap::new(),
    };
    t.lv.virsh(&["start", "--paused", DOM]);

    // 1. create, twice (libvirt's default name, then --diskspec file=).
    let v0 = t.view();
    let q = snapshot_create(
        &t.conn,
        DOM,
        "take-q",
        &SnapshotCreateOptions::default().with_quiesce(true),
    );
    let e = q.unwrap_err().to_string();
    assert!(
        e.contains("guest agent") && e.contains("nothing was changed"),
        "{e}"
    );
    assert!(!kvm.join("test.take-q").exists());
    let _ = snapshot_create(&t.conn, DOM, "take-1", &SnapshotCreateOptions::default()).unwrap();
    t.states.insert("take-1".into(), v0);
    let o1 = kvm.join("test.take-1");
    assert_eq!(t.agree("create take-1"), o1);
    t.write(0x22, "2M");
    let v1 = t.view();
    let o2 = kvm.join("test/test.take-2");
    let _ = snapshot_create(
        &t.conn,
        DOM,
        "take-2",
        &SnapshotCreateOptions::default()
            .with_diskspecs(vec![DiskSpec::new("vda").with_file(o2.clone())]),
    )
    .unwrap();
    t.states.insert("take-2".into(), v1);
    assert_eq!(t.agree("create take-2"), o2);
    let xml = t.lv.virsh(&["dumpxml", "--inactive", DOM]);
    assert!(
        xml.contains(&s(&o1)) && xml.contains(&s(&o2)),
        "owned list: {xml}"
    );
    t.write(0x33, "3M");
    t.states_hold("after two live snapshots");

    // 2. A cancelled active commit (slow: 64 KiB/s) leaves the chain.
    let cancel = AtomicBool::new(false);
    let mut seen = 0;
    let mut cb = |_p: strata_merge::Progress| {
        seen += 1;
        if seen == 3 {
            cancel.store(true, Ordering::SeqCst);
        }
    };
    let e = blockcommit(
        &t.conn,
        DOM,
        &BlockCommitOptions::default()
            .with_delete_snapshots(true)
            .with_bandwidth(64 << 10),
        &mut Hooks::new().with_progress(&mut cb).with_cancel(&cancel),
    );
    let e = e.unwrap_err();
    assert!(
        matches!(e.root(), Error::Cancelled { .. }) || e.to_string().contains("cancelled"),
        "{e}"
    );
    assert_eq!(t.agree("cancelled blockcommit"), o2);
    assert_eq!(snapshot_list(&t.conn, DOM).unwrap().len(), 2);
    let v2 = t.view();

    // 3. delete take-1: its overlay (take-2's state) committed into the
    //    base by libvirt's commit of an inner layer.
    let _ = snapshot_delete(&t.conn, DOM, "take-1", &mut Hooks::default()).unwrap();
    t.states.remove("take-1");
    assert_eq!(t.agree("delete take-1"), o2);
    assert_eq!(chain_files(&o2), {
        let mut v = vec![base.clone(), o2.clone()];
        v.sort();
        v
    });
    assert!(!o1.exists(), "take-1's overlay merged away");
    assert_eq!(t.view(), v2, "delete keeps the domain's view");
    t.states_hold("after delete take-1");

    // 4. blockpull --base test.qcow2 after a third snapshot.
    let _ = snapshot_create(&t.conn, DOM, "take-3", &SnapshotCreateOptions::default()).unwrap();
    t.states.insert("take-3".into(), v2.clone());
    let o3 = t.agree("create take-3");
    t.write(0x44, "4M");
    let v3 = t.view();
    let _ = blockpull(
        &t.conn,
        DOM,
        &BlockPullOptions::default().with_base(base.clone()),
        &mut Hooks::default(),
    )
    .unwrap();
    assert_eq!(t.agree("blockpull --base"), o3);
    assert_eq!(chain_files(&o3), {
        let mut v = vec![base.clone(), o3.clone()];
        v.sort();
        v
    });
    assert_eq!(t.view(), v3, "pull keeps the view");
    t.states_hold("after blockpull");

    // 4b. blockcommit --top (an inner layer) into the base: take-2 (its
    //     state is the base since take-1's delete) and take-3 (reads
    //     through the base) go; take-5's state (the top) and
    //     the domain's view stay.
    let _ = snapshot_create(&t.conn, DOM, "take-5", &SnapshotCreateOptions::default()).unwrap();
    t.states.insert("take-5".into(), v3.clone());
    let o5 = t.agree("create take-5");
    t.write(0x66, "6M");
    let v5 = t.view();
    let refused = blockcommit(
        &t.conn,
        DOM,
        &BlockCommitOptions::default()
            .with_top(o3.clone())
            .with_base(base.clone()),
        &mut Hooks::default(),
    );
    assert!(
        matches!(refused, Err(Error::SnapshotsDestroyed { ref snapshots, .. }) if snapshots == &["take-2", "take-3"]),
        "{refused:?}"
    );
    let r = blockcommit(
        &t.conn,
        DOM,
        &BlockCommitOptions::default()
            .with_top(o3.clone())
            .with_shallow(true)
            .with_delete_snapshots(true),
        &mut Hooks::default(),
    )
    .unwrap();
    assert_eq!(r.snapshots_removed, vec!["take-2", "take-3"]);
    t.states.remove("take-2");
    t.states.remove("take-3");
    assert_eq!(t.agree("blockcommit --top --shallow"), o5);
    assert_eq!(chain_files(&o5), {
        let mut v = vec![base.clone(), o5.clone()];
        v.sort();
        v
    });
    assert_eq!(t.view(), v5, "an inner commit keeps the view");
    t.states_hold("after blockcommit --top");
    let v3 = v5;

    // 5. blockcommit --active --pivot into the base, snapshots deleted.
    let _ = blockcommit(
        &t.conn,
        DOM,
        &BlockCommitOptions::default().with_delete_snapshots(true),
        &mut Hooks::default(),
    )
    .unwrap();
    t.states.clear();
    assert_eq!(t.agree("blockcommit --active --pivot"), base);
    assert_eq!(t.view(), v3, "commit keeps the view");
    assert!(snapshot_list(&t.conn, DOM).unwrap().is_empty());

    // 6. revert: refused while running, done with force.
    let _ = snapshot_create(&t.conn, DOM, "take-4", &SnapshotCreateOptions::default()).unwrap();
    t.states.insert("take-4".into(), v3.clone());
    t.agree("create take-4");
    t.write(0x55, "5M");
    // 5b. delete of the current leaf: its state file (take-4's overlay)
    //     pulled into the active image by libvirt's pull job.
    let o4 = t.persistent_source();
    let v4 = t.view();
    let _ = snapshot_create(&t.conn, DOM, "take-4b", &SnapshotCreateOptions::default()).unwrap();
    t.states.insert("take-4b".into(), v4);
    let o4b = t.agree("create take-4b");
    t.write(0x77, "7M");
    let v4b = t.view();
    let r = snapshot_delete(&t.conn, DOM, "take-4b", &mut Hooks::default()).unwrap();
    assert!(r.merges[0].contains("live block pull"), "{r:?}");
    t.states.remove("take-4b");
    assert_eq!(t.agree("delete take-4b"), o4b);
    assert_eq!(chain_files(&o4b), {
        let mut v = vec![base.clone(), o4b.clone()];
        v.sort();
        v
    });
    assert!(!o4.exists(), "take-4's overlay pulled up and removed");
    assert_eq!(t.view(), v4b, "delete keeps the domain's view");
    t.states_hold("after delete take-4b");
    let e = snapshot_revert_with(&t.conn, DOM, "take-4", &RevertOptions::default());
    assert!(matches!(e, Err(Error::RevertRunning { .. })), "{e:?}");
    let r = snapshot_revert_with(
        &t.conn,
        DOM,
        "take-4",
        &RevertOptions::default().with_force(true),
    )
    .unwrap();
    assert!(r.stopped);
    assert_eq!(t.lv.state(DOM), "shut off");
    assert_eq!(t.view(), v3, "reverted to take-4");
    t.states_hold("after revert --force");

    // 7. A guest that keeps writing (init's strata.mode=write: a numbered
    //    block at 8 MiB, each one said on the console once durable) during
    //    a live create, an active commit with pivot, a create and a pull.
    let src = t.persistent_source();
    let before = raw_of(&src, &dir);
    t.cmdline("strata.disks=1 strata.mode=write");
    t.agent_channel();
    let _ = std::fs::remove_file(&t.dom.serial);
    t.lv.virsh(&["start", DOM]);
    let mut n = t.wait_wrote(3);
    // --quiesce on a running domain with an agent channel but no agent
    // in the guest: libvirt's "not connected", said clearly, nothing done.
    let e = snapshot_create(
        &t.conn,
        DOM,
        "take-q2",
        &SnapshotCreateOptions::default().with_quiesce(true),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("--quiesce") && e.contains("agent") && e.contains("nothing was changed"),
        "{e}"
    );
    eprintln!("quiesce without an answering agent: {e}");
    assert!(!src
        .with_file_name(format!(
            "{}.take-q2",
            src.file_stem().unwrap().to_string_lossy()
        ))
        .exists());
    assert!(snapshot_list(&t.conn, DOM)
        .unwrap()
        .iter()
        .all(|s| s.name != "take-q2"));
    let _ = snapshot_create(&t.conn, DOM, "take-w1", &SnapshotCreateOptions::default()).unwrap();
    t.agree("create while the guest writes");
    n = t.wait_wrote(n + 3);
    let _ = blockcommit(
        &t.conn,
        DOM,
        &BlockCommitOptions::default().with_delete_snapshots(true),
        &mut Hooks::default(),
    )
    .unwrap();
    assert_eq!(t.agree("blockcommit while the guest writes"), base);
    n = t.wait_wrote(n + 3);
    let _ = snapshot_create(&t.conn, DOM, "take-w2", &SnapshotCreateOptions::default()).unwrap();
    let ow2 = t.agree("create take-w2 while the guest writes");
    n = t.wait_wrote(n + 3);
    let _ = blockpull(
        &t.conn,
        DOM,
        &BlockPullOptions::default(),
        &mut Hooks::default(),
    )
    .unwrap();
    assert_eq!(t.agree("blockpull while the guest writes"), ow2);
    assert_eq!(
        chain_files(&ow2),
        vec![ow2.clone()],
        "the pull made it stand alone"
    );
    n = t.wait_wrote(n + 3);
    t.lv.virsh(&["destroy", DOM]);
    let last = t.wait_wrote(n);
    let after = raw_of(&ow2, &dir);
    let got = counter(&after);
    assert!(
        got == last || got == last + 1,
        "the disk holds write {got}; the guest said {last} was durable"
    );
    let state_w2 = raw_of(&base, &dir);
    let at_w2 = counter(&state_w2);
    assert!(
        at_w2 >= 3 && at_w2 <= got,
        "take-w2's state holds write {at_w2}"
    );
    let w = 8 << 20;
    for (what, img) in [("the disk", &after), ("take-w2's state", &state_w2)] {
        assert!(
            img[..w] == before[..w] && img[w + 4096..] == before[w + 4096..],
            "{what}: everything but the guest's block is as before"
        );
    }
    // `virsh destroy` may kill QEMU before it flushes its refcounts: the
    // disk it wrote may leak clusters (exit 3), never be corrupt.
    let top = std::process::Command::new("qemu-img")
        .args(["check", &s(&ow2)])
        .output()
        .expect("qemu-img");
    assert!(
        matches!(top.status.code(), Some(0) | Some(3)),
        "qemu-img check {}: {}",
        ow2.display(),
        String::from_utf8_lossy(&top.stdout)
    );
    qemu_img(&["check", &s(&base)]);
    t.cmdline("strata.disks=1");

    // The guest reads what the files hold.
    let want = sha256_view(&ow2, &dir);
    let src = t.persistent_source();
    let files = chain_files(&src);
    let boot = t.dom.boot(&t.lv).unwrap();
    assert_eq!(boot.sums["vda"], want, "the guest reads what it wrote");
    assert_eq!(boot.opened_files(), files, "QEMU opened the headers' chain");
    t.conn.close().unwrap();
}

impl T {
    /// Sets the guest kernel's command line (persistent definition).
    fn cmdline(&self, args: &str) {
        let xml = self.lv.virsh(&["dumpxml", "--inactive", DOM]);
        let i = xml.find("strata.disks=").unwrap();
        let j = i + xml[i..].find("</cmdline>").unwrap();
        let new = format!("{}{args}{}", &xml[..i], &xml[j..]);
        let f = self.dir.join("redefine.xml");
        std::fs::write(&f, new).unwrap();
        self.lv.virsh(&["define", &s(&f)]);
        std::fs::remove_file(&f).unwrap();
    }

    /// Adds a guest agent channel (the test guest runs no agent).
    fn agent_channel(&self) {
        let xml = self.lv.virsh(&["dumpxml", "--inactive", DOM]);
        let new = xml.replacen(
            "</devices>",
            "<channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/>\
             </channel></devices>",
            1,
        );
        let f = self.dir.join("redefine.xml");
        std::fs::write(&f, new).unwrap();
        self.lv.virsh(&["define", &s(&f)]);
        std::fs::remove_file(&f).unwrap();
    }

    /// Waits until the guest said write `n` (or later) was durable;
    /// returns the last one it said.
    fn wait_wrote(&self, n: u64) -> u64 {
        let t0 = std::time::Instant::now();
        loop {
            let log = std::fs::read_to_string(&self.dom.serial).unwrap_or_default();
            assert!(!log.contains("STRATA-ERROR"), "the guest failed:\n{log}");
            let last = log
                .lines()
                .filter_map(|l| l.trim_end().strip_prefix("STRATA-WROTE "))
                .filter_map(|v| v.trim().parse::<u64>().ok())
                .max()
                .unwrap_or(0);
            if last >= n {
                return last;
            }
            assert!(
                t0.elapsed() < BOOT_TIMEOUT,
                "the guest did not say write {n} within {BOOT_TIMEOUT:?}:\n{log}"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
}
