//! Revert of an external snapshot with memory state (issue 18, issue 12
//! item 4), against a real private libvirtd and a real QEMU (TCG) running
//! the test guest in `strata.mode=write` (it keeps writing a numbered block
//! at 8 MiB of vda and says each one on the console once durable).
//!
//! libvirt takes `take-m` with `--memspec` while the guest writes; the
//! guest writes on; `snapshot revert --force` stops it, reverts the disks
//! offline and restores the memory (`virDomainRestoreFlags` with the
//! snapshot's definition on the new overlay). Then: the domain runs, QEMU
//! has the new overlay open over the snapshot's state file, the memory file
//! is byte-identical, and the guest continues from the snapshot's moment:
//! its console counts on from the number the disk held at the snapshot
//! (not from 1, as a fresh boot would, nor from the later number), and the
//! disk soon holds a number between the two. Once more with `--paused`:
//! the domain comes back paused on a fresh overlay.
//!
//! Needs root; without libvirtd it fails unless STRATA_SKIP_LIBVIRTD_TESTS=1.

mod guest;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use guest::*;
use strata_libvirt::{snapshot_list, snapshot_revert_with, Connect, RevertOptions};

const DOM: &str = "mem";

/// The numbers the guest said were durable, in the order of the console.
fn said(serial: &Path) -> Vec<u64> {
    let log = std::fs::read_to_string(serial).unwrap_or_default();
    assert!(!log.contains("STRATA-ERROR"), "the guest failed:\n{log}");
    log.lines()
        .filter_map(|l| l.trim_end().strip_prefix("STRATA-WROTE "))
        .filter_map(|v| v.trim().parse::<u64>().ok())
        .collect()
}

/// Waits until `f` of the console's numbers holds.
fn wait_said(serial: &Path, what: &str, f: impl Fn(&[u64]) -> bool) -> Vec<u64> {
    let t0 = Instant::now();
    loop {
        let v = said(serial);
        if f(&v) {
            return v;
        }
        assert!(
            t0.elapsed() < BOOT_TIMEOUT,
            "{what}: not within {BOOT_TIMEOUT:?}; the guest said {v:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The numbers said since the last restart of the count (a number not
/// above the one before it), or all of them when the console was
/// truncated by the restore.
fn since_restart(v: &[u64]) -> &[u64] {
    let r = (1..v.len()).rev().find(|&i| v[i] <= v[i - 1]).unwrap_or(0);
    &v[r..]
}

fn qemu_files(lv: &Libvirtd) -> Vec<PathBuf> {
    let j: serde_json::Value = serde_json::from_str(&lv.virsh(&[
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

fn persistent_source(lv: &Libvirtd) -> PathBuf {
    let xml = lv.virsh(&["dumpxml", "--inactive", DOM]);
    let disk = &xml[xml.find("<disk ").unwrap()..xml.find("</disk>").unwrap()];
    assert!(
        !disk.contains("<backingStore type="),
        "stale <backingStore> in the persistent definition:\n{disk}"
    );
    let i = disk.find("<source file='").unwrap() + 14;
    PathBuf::from(&disk[i..i + disk[i..].find('\'').unwrap()])
}

/// Sets the guest kernel's command line (persistent definition).
fn cmdline(lv: &Libvirtd, dir: &Path, args: &str) {
    let xml = lv.virsh(&["dumpxml", "--inactive", DOM]);
    let i = xml.find("strata.disks=").unwrap();
    let j = i + xml[i..].find("</cmdline>").unwrap();
    let f = dir.join("redefine.xml");
    std::fs::write(&f, format!("{}{args}{}", &xml[..i], &xml[j..])).unwrap();
    lv.virsh(&["define", &s(&f)]);
    std::fs::remove_file(&f).unwrap();
}

#[test]
fn reverting_a_memory_snapshot_restores_the_running_guest_at_that_moment() {
    let Some(lv) = Libvirtd::start() else { return };
    let g = guest_image();
    let work = tempfile::tempdir().unwrap();
    let dir = std::fs::canonicalize(work.path()).unwrap();
    let base = dir.join("test.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", &s(&base), "16M"]);
    qemu_io(&base, "qcow2", "write -P 0x11 0 4M");
    let dom = GuestDomain::define(&lv, DOM, &g, &[Disk::new("vda", &base, "qcow2")], &dir);
    cmdline(&lv, &dir, "strata.disks=1 strata.mode=write");
    let mut conn = Connect::open(Some(&lv.uri)).unwrap();
    let t0 = Instant::now();
    lv.virsh(&["start", DOM]);
    wait_said(&dom.serial, "the guest writes", |v| {
        v.last().is_some_and(|&n| n >= 3)
    });

    // take-m: memory and disk, while the guest writes.
    let mem = dir.join("take-m.mem");
    let ovl = dir.join("test.take-m");
    lv.virsh(&[
        "snapshot-create-as",
        DOM,
        "take-m",
        "--memspec",
        &format!("file={},snapshot=external", s(&mem)),
        "--diskspec",
        &format!("vda,snapshot=external,file={}", s(&ovl)),
    ]);
    assert_eq!(lv.state(DOM), "running", "libvirt resumed the guest");
    let mem_sum = sha256_file(&mem);
    // Nothing writes into the state file any more: its number is the
    // snapshot's moment.
    let at = counter(&raw_of(&base, &dir));
    assert!(at >= 3, "the disk held write {at} at take-m");
    // The guest writes on, well past it.
    let later = at + 15;
    wait_said(&dom.serial, "the guest writes on", |v| {
        v.last().is_some_and(|&n| n >= later)
    });
    let on_disk = counter(&raw_of(&ovl, &dir));
    assert!(on_disk >= later, "the overlay holds write {on_disk}");

    // A running domain needs --force.
    let e = snapshot_revert_with(&conn, DOM, "take-m", &RevertOptions::default()).unwrap_err();
    assert!(
        matches!(e, strata_libvirt::Error::RevertRunning { .. }),
        "{e:?}"
    );
    let r = snapshot_revert_with(
        &conn,
        DOM,
        "take-m",
        &RevertOptions::default().with_force(true),
    )
    .unwrap();
    eprintln!("revert --force of take-m: {r:?}");
    assert!(r.stopped);
    assert_eq!(r.restored.as_deref(), Some(mem.as_path()));
    assert_eq!(lv.state(DOM), "running", "restored running");
    assert_eq!(sha256_file(&mem), mem_sum, "the memory file is untouched");

    // QEMU has the new overlay open over the snapshot's state file, as
    // the persistent definition and the headers say.
    let src = persistent_source(&lv);
    let mut want = vec![src.clone(), base.clone()];
    want.sort();
    assert_eq!(chain_files(&src), want, "new overlay over the state file");
    assert_eq!(qemu_files(&lv), want, "QEMU's open files");
    let snaps = snapshot_list(&conn, DOM).unwrap();
    assert!(snaps.iter().any(|sn| sn.name == "take-m" && sn.current));

    // The guest continues from the snapshot's moment: its count restarts
    // at the snapshot's number (the next or, when it was stopped between
    // the write and the message, the same), and goes on by one.
    let v = wait_said(&dom.serial, "the restored guest writes", |v| {
        let n = since_restart(v);
        n.first().is_some_and(|&f| f <= at + 1) && n.len() >= 3
    });
    let n = since_restart(&v).to_vec();
    assert!(
        n[0] == at || n[0] == at + 1,
        "the restored guest counts on from {} (the disk held {at} at take-m; \
         a fresh boot would start at 1): {v:?}",
        n[0]
    );
    assert!(n.windows(2).all(|w| w[1] == w[0] + 1), "{v:?}");
    let got = counter(&raw_of(&src, &dir));
    assert!(
        got >= n[n.len() - 1] && got > at && got < later,
        "the new overlay holds write {got}: after take-m's {at}, before the {later} \
         written since take-m (the guest said {n:?})"
    );
    assert_eq!(sha256_file(&mem), mem_sum, "the memory file is untouched");

    // Again, --paused: the domain comes back paused at the same moment.
    let r = snapshot_revert_with(
        &conn,
        DOM,
        "take-m",
        &RevertOptions::default().with_force(true).with_paused(true),
    )
    .unwrap();
    assert!(r.stopped && r.restored.is_some(), "{r:?}");
    assert_eq!(lv.state(DOM), "paused", "restored paused");
    let src = persistent_source(&lv);
    let mut want = vec![src.clone(), base.clone()];
    want.sort();
    assert_eq!(qemu_files(&lv), want, "QEMU's open files (--paused)");
    assert_eq!(
        counter(&raw_of(&src, &dir)),
        at,
        "a fresh overlay over take-m's state, nothing written while paused"
    );
    assert_eq!(sha256_file(&mem), mem_sum, "the memory file is untouched");
    lv.virsh(&["destroy", DOM]);
    assert!(mem.exists());
    eprintln!("memory revert test: {:?}", t0.elapsed());
    conn.close().unwrap();
    drop(work);
}
