//! Internal snapshots (create, apply, delete, the read-only view) against
//! qemu-img on twin images: the same starting file, one changed by
//! `qemu-img snapshot`, the other by Strata; both must check clean
//! (without leaks), list the same snapshots and read the same guest data,
//! the snapshot's view included. Crashes at every write and sync must
//! leave the old state or the new one.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use strata_image::{
    Chain, FaultStorage, FileStorage, MemStorage, OpenOptions, Qcow2Image, SnapshotRef,
};

const DATE: (u32, u32) = (1_700_000_000, 0);

/// Runs `f` on `p` opened read-write by Strata, then closes it.
fn with_rw<T>(p: &Path, f: impl FnOnce(&mut Qcow2Image) -> strata_image::Result<T>) -> T {
    let st = FileStorage::open(p, true).unwrap();
    let mut img = Qcow2Image::open_rw(Box::new(st), p).unwrap();
    let r = f(&mut img).unwrap_or_else(|e| panic!("strata on {}: {e}", p.display()));
    img.flush().unwrap();
    r
}

/// `qemu-img check` must exit 0: no corruption and no leaks.
fn check_clean(p: &Path) {
    let out = std::process::Command::new("qemu-img")
        .args(["check", "-U", p.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "qemu-img check {}:\n{}{}",
        p.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// (ID, name, VM size) of every snapshot as `qemu-img snapshot -l` lists it.
fn qemu_list(p: &Path) -> Vec<(String, String, String)> {
    qemu_img(&["snapshot", "-U", "-l", p.to_str().unwrap()])
        .lines()
        .skip(2)
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (
                f[0].to_string(),
                f[1].to_string(),
                format!("{} {}", f[2], f[3]),
            )
        })
        .collect()
}

/// The snapshots as `qemu-img info --output json` shows them, without
/// their dates (the twins' were taken at other moments).
fn qemu_info_snapshots(p: &Path) -> serde_json::Value {
    let info = qemu_img(&["info", "-U", "--output", "json", p.to_str().unwrap()]);
    let mut v: serde_json::Value = serde_json::from_str(&info).unwrap();
    let mut snaps = v["snapshots"].take();
    for sn in snaps.as_array_mut().into_iter().flatten() {
        let o = sn.as_object_mut().unwrap();
        o.remove("date-sec");
        o.remove("date-nsec");
    }
    snaps
}

/// The snapshot's guest view as `qemu-img convert -l` reads it.
fn qemu_snapshot_raw(p: &Path, snap: &str) -> Vec<u8> {
    let out = p.with_extension(format!("{snap}.snap.raw"));
    qemu_img(&[
        "convert",
        "-U",
        "-l",
        snap,
        "-O",
        "raw",
        p.to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    let v = std::fs::read(&out).unwrap();
    std::fs::remove_file(out).unwrap();
    v
}

/// Strata's guest view of `p` (its chain), or of one of its snapshots.
fn strata_raw(p: &Path, snap: Option<SnapshotRef>) -> Vec<u8> {
    let chain = Chain::open(p, &OpenOptions::new().force_share(true).snapshot(snap))
        .unwrap_or_else(|e| panic!("open {}: {e}", p.display()));
    let mut v = vec![0u8; chain.virtual_size() as usize];
    chain.read_at(&mut v, 0).unwrap();
    v
}

/// A 2 MiB image with data, zeros and (when asked) compressed clusters,
/// made by qemu-img with `opts`, and its twin.
fn twins(dir: &Path, opts: &str, compressed: bool) -> (PathBuf, PathBuf) {
    let q = dir.join("q.qcow2");
    let s = dir.join("s.qcow2");
    let mut args = vec!["-o", opts, q.to_str().unwrap(), "2M"];
    if opts.is_empty() {
        args.drain(..2);
    }
    qemu_create(&args);
    let mut cmds = vec![
        "write -P 0x11 0 200k",
        "write -z 300k 64k",
        "write -P 0x12 1000k 10k",
    ];
    if compressed {
        cmds.push("write -c -P 0x13 1536k 64k");
    }
    qemu_io(&q, &cmds);
    std::fs::copy(&q, &s).unwrap();
    (q, s)
}

const SHAPES: &[(&str, bool)] = &[
    ("", false),
    ("cluster_size=4096", true),
    ("extended_l2=on", false),
    ("refcount_bits=64,cluster_size=16384", true),
    ("compat=0.10", false),
];

#[test]
fn create_lists_and_reads_like_qemu_img_snapshot_c() {
    if skip() {
        return;
    }
    for (opts, compressed) in SHAPES {
        let dir = tempfile::tempdir().unwrap();
        let (q, s) = twins(dir.path(), opts, *compressed);
        let before = qemu_raw(&q, dir.path());
        qemu_img(&["snapshot", "-c", "one", q.to_str().unwrap()]);
        let made = with_rw(&s, |img| img.snapshot_create("one", DATE));
        assert_eq!((made.id.as_str(), made.name.as_str()), ("1", "one"));
        check_clean(&s);
        assert_eq!(qemu_list(&s), qemu_list(&q), "{opts}");
        assert_eq!(qemu_info_snapshots(&s), qemu_info_snapshots(&q), "{opts}");
        // The active state and the snapshot both read as before.
        assert_eq!(qemu_raw(&s, dir.path()), before, "{opts}");
        assert_eq!(qemu_snapshot_raw(&s, "one"), before, "{opts}");
        assert_eq!(
            strata_raw(&s, Some(SnapshotRef::IdOrName("one".into()))),
            before
        );
        // Writes after the snapshot leave its view alone (on both twins).
        for p in [&q, &s] {
            qemu_io(p, &["write -P 0x21 0 100k", "write -P 0x22 1800k 64k"]);
            check_clean(p);
            assert_eq!(qemu_snapshot_raw(p, "one"), before, "{opts}");
        }
        assert_eq!(qemu_raw(&s, dir.path()), qemu_raw(&q, dir.path()));
        // A second snapshot gets ID 2 and sees the new data.
        qemu_img(&["snapshot", "-c", "two", q.to_str().unwrap()]);
        with_rw(&s, |img| img.snapshot_create("two", DATE));
        check_clean(&s);
        assert_eq!(qemu_list(&s), qemu_list(&q), "{opts}");
        assert_eq!(qemu_snapshot_raw(&s, "two"), qemu_snapshot_raw(&q, "two"));
    }
}

#[test]
fn apply_gives_the_guest_data_qemu_img_snapshot_a_gives() {
    if skip() {
        return;
    }
    for (opts, compressed) in SHAPES {
        let dir = tempfile::tempdir().unwrap();
        let (q, s) = twins(dir.path(), opts, *compressed);
        for p in [&q, &s] {
            qemu_img(&["snapshot", "-c", "one", p.to_str().unwrap()]);
            qemu_io(p, &["write -P 0x31 50k 300k", "write -P 0x32 1900k 100k"]);
        }
        qemu_img(&["snapshot", "-a", "one", q.to_str().unwrap()]);
        with_rw(&s, |img| {
            img.snapshot_apply(&SnapshotRef::IdOrName("one".into()))
        });
        check_clean(&s);
        let want = qemu_raw(&q, dir.path());
        assert_eq!(qemu_raw(&s, dir.path()), want, "{opts}");
        assert_eq!(strata_raw(&s, None), want, "{opts}");
        assert_eq!(qemu_list(&s), qemu_list(&q));
        // Writes after the apply keep the snapshot intact.
        qemu_io(&s, &["write -P 0x33 0 64k"]);
        check_clean(&s);
        assert_eq!(qemu_snapshot_raw(&s, "one"), qemu_snapshot_raw(&q, "one"));
    }
}

#[test]
fn delete_frees_what_only_the_snapshot_held_like_qemu_img_snapshot_d() {
    if skip() {
        return;
    }
    for (opts, compressed) in SHAPES {
        let dir = tempfile::tempdir().unwrap();
        let (q, s) = twins(dir.path(), opts, *compressed);
        for p in [&q, &s] {
            qemu_img(&["snapshot", "-c", "one", p.to_str().unwrap()]);
            qemu_io(p, &["write -P 0x41 0 400k"]);
            qemu_img(&["snapshot", "-c", "two", p.to_str().unwrap()]);
            qemu_io(p, &["write -P 0x42 100k 64k"]);
        }
        qemu_img(&["snapshot", "-d", "one", q.to_str().unwrap()]);
        with_rw(&s, |img| {
            img.snapshot_delete(&SnapshotRef::Name("one".into()))
        });
        check_clean(&s);
        assert_eq!(qemu_list(&s), qemu_list(&q), "{opts}");
        assert_eq!(qemu_raw(&s, dir.path()), qemu_raw(&q, dir.path()));
        assert_eq!(qemu_snapshot_raw(&s, "two"), qemu_snapshot_raw(&q, "two"));
        // Writing in place again where the snapshot no longer shares.
        qemu_io(&s, &["write -P 0x43 100k 64k"]);
        check_clean(&s);
        // The last one: the table goes away.
        with_rw(&s, |img| {
            img.snapshot_delete(&SnapshotRef::Name("two".into()))
        });
        check_clean(&s);
        assert!(qemu_list(&s).is_empty());
        let h = strata_format::Header::parse(&std::fs::read(&s).unwrap()[..4096]).unwrap();
        assert_eq!((h.nb_snapshots(), h.snapshots_offset()), (0, 0));
    }
}

#[test]
fn snapshots_made_by_strata_and_by_qemu_mix() {
    if skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (p, _) = twins(dir.path(), "", true);
    let v0 = qemu_raw(&p, dir.path());
    with_rw(&p, |img| img.snapshot_create("strata", DATE));
    qemu_io(&p, &["write -P 0x51 0 64k"]);
    let v1 = qemu_raw(&p, dir.path());
    qemu_img(&["snapshot", "-c", "qemu", p.to_str().unwrap()]);
    qemu_io(&p, &["write -P 0x52 64k 64k"]);
    assert_eq!(
        strata_raw(&p, Some(SnapshotRef::IdOrName("qemu".into()))),
        v1
    );
    assert_eq!(strata_raw(&p, Some(SnapshotRef::IdOrName("1".into()))), v0);
    // qemu-img applies Strata's snapshot; Strata applies qemu's.
    qemu_img(&["snapshot", "-a", "strata", p.to_str().unwrap()]);
    check_clean(&p);
    assert_eq!(strata_raw(&p, None), v0);
    with_rw(&p, |img| {
        img.snapshot_apply(&SnapshotRef::IdOrName("2".into()))
    });
    check_clean(&p);
    assert_eq!(qemu_raw(&p, dir.path()), v1);
    // Strata deletes qemu's, qemu-img deletes Strata's.
    with_rw(&p, |img| {
        img.snapshot_delete(&SnapshotRef::Name("qemu".into()))
    });
    check_clean(&p);
    qemu_img(&["snapshot", "-d", "strata", p.to_str().unwrap()]);
    check_clean(&p);
    assert_eq!(qemu_raw(&p, dir.path()), v1);
}

#[test]
fn apply_restores_the_virtual_size_of_the_snapshot() {
    if skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (q, s) = twins(dir.path(), "", false);
    for p in [&q, &s] {
        qemu_img(&["snapshot", "-c", "small", p.to_str().unwrap()]);
        qemu_img(&["resize", "-q", p.to_str().unwrap(), "600M"]);
        qemu_io(p, &["write -P 0x61 590M 1M"]);
    }
    qemu_img(&["snapshot", "-a", "small", q.to_str().unwrap()]);
    with_rw(&s, |img| {
        img.snapshot_apply(&SnapshotRef::IdOrName("small".into()))
    });
    check_clean(&s);
    let qs = Qcow2Image::open(Box::new(FileStorage::open(&s, false).unwrap()), &s).unwrap();
    assert_eq!(qs.virtual_size(), 2 << 20);
    assert_eq!(qemu_raw(&s, dir.path()), qemu_raw(&q, dir.path()));
}

#[test]
fn snapshots_of_an_overlay_keep_its_backing_file() {
    if skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    qemu_create(&[base.to_str().unwrap(), "2M"]);
    qemu_io(&base, &["write -P 0x71 0 2M"]);
    let mk = |name: &str| {
        let p = dir.path().join(name);
        qemu_create(&["-b", "base.qcow2", "-F", "qcow2", p.to_str().unwrap()]);
        qemu_io(&p, &["write -P 0x72 64k 64k"]);
        p
    };
    let (q, s) = (mk("q.qcow2"), mk("s.qcow2"));
    qemu_img(&["snapshot", "-c", "one", q.to_str().unwrap()]);
    with_rw(&s, |img| img.snapshot_create("one", DATE));
    for p in [&q, &s] {
        qemu_io(p, &["write -P 0x73 0 128k"]);
    }
    assert_eq!(qemu_snapshot_raw(&s, "one"), qemu_snapshot_raw(&q, "one"));
    assert_eq!(
        strata_raw(&s, Some(SnapshotRef::IdOrName("one".into()))),
        qemu_snapshot_raw(&q, "one")
    );
    qemu_img(&["snapshot", "-a", "one", q.to_str().unwrap()]);
    with_rw(&s, |img| {
        img.snapshot_apply(&SnapshotRef::IdOrName("one".into()))
    });
    check_clean(&s);
    assert_eq!(qemu_raw(&s, dir.path()), qemu_raw(&q, dir.path()));
}

#[test]
fn one_bit_refcounts_refuse_a_snapshot_and_write_nothing() {
    if skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (q, s) = twins(dir.path(), "refcount_bits=1", false);
    // qemu-img fails too (its attempt leaks a cluster).
    let out = std::process::Command::new("qemu-img")
        .args(["snapshot", "-c", "x", q.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let before = std::fs::read(&s).unwrap();
    let st = FileStorage::open(&s, true).unwrap();
    let mut img = Qcow2Image::open_rw(Box::new(st), &s).unwrap();
    let err = img.snapshot_create("x", DATE).unwrap_err().to_string();
    assert!(err.contains("1-bit refcounts"), "{err}");
    drop(img);
    check_clean(&s);
    assert!(qemu_list(&s).is_empty());
    let after = std::fs::read(&s).unwrap();
    assert_eq!(
        after[..before.len()],
        before[..],
        "nothing in use was written"
    );
}

#[test]
fn a_snapshot_that_does_not_exist_is_an_error_naming_the_file() {
    let m = MemStorage::new();
    let opts = strata_image::create::CreateOptions {
        size: 1 << 20,
        ..Default::default()
    };
    strata_image::create::create_qcow2(Box::new(m.clone()), Path::new("x.qcow2"), &opts).unwrap();
    let mut img = Qcow2Image::open_rw(Box::new(m.clone()), Path::new("x.qcow2")).unwrap();
    for r in [
        img.snapshot_apply(&SnapshotRef::IdOrName("nope".into())),
        img.snapshot_delete(&SnapshotRef::Name("nope".into())),
    ] {
        let e = r.unwrap_err().to_string();
        assert!(e.contains("x.qcow2") && e.contains("nope"), "{e}");
    }
    let mut ro = Qcow2Image::open(Box::new(m.clone()), Path::new("x.qcow2")).unwrap();
    assert!(ro
        .load_snapshot(&SnapshotRef::IdOrName("1".into()))
        .is_err());
    // A snapshot recording an absurd virtual size is refused, not read.
    img.snapshot_create("huge", DATE).unwrap();
    img.flush().unwrap();
    drop(img);
    let mut bytes = m.to_bytes();
    let h = strata_format::Header::parse(&bytes[..512]).unwrap();
    let at = h.snapshots_offset() as usize + 40 + 8;
    bytes[at..at + 8].copy_from_slice(&u64::MAX.to_be_bytes());
    let mut ro = Qcow2Image::open(
        Box::new(MemStorage::from_bytes(bytes)),
        Path::new("x.qcow2"),
    )
    .unwrap();
    let e = ro
        .load_snapshot(&SnapshotRef::IdOrName("huge".into()))
        .unwrap_err()
        .to_string();
    assert!(e.contains("x.qcow2") && e.contains("virtual size"), "{e}");
}

#[test]
fn a_damaged_snapshot_table_refuses_snapshot_writes() {
    if skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (p, _) = twins(dir.path(), "", false);
    qemu_img(&["snapshot", "-c", "one", p.to_str().unwrap()]);
    // Give the snapshot an L1 table of 2^30 entries (iotest 080).
    let mut bytes = std::fs::read(&p).unwrap();
    let h = strata_format::Header::parse(&bytes[..4096]).unwrap();
    let at = h.snapshots_offset() as usize + 8;
    bytes[at..at + 4].copy_from_slice(&(1u32 << 30).to_be_bytes());
    std::fs::write(&p, &bytes).unwrap();
    let st = FileStorage::open(&p, true).unwrap();
    let mut img = Qcow2Image::open_rw(Box::new(st), &p).unwrap();
    assert!(img.snapshot_create("two", DATE).is_err());
    assert!(img
        .snapshot_delete(&SnapshotRef::Name("one".into()))
        .is_err());
    drop(img);
    assert_eq!(std::fs::read(&p).unwrap(), bytes, "nothing was written");
}

#[test]
fn persistent_bitmaps_survive_create_and_delete_and_block_apply() {
    if skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (p, _) = twins(dir.path(), "", false);
    qemu_img(&["bitmap", "--add", p.to_str().unwrap(), "b0"]);
    qemu_io(&p, &["write -P 0x81 0 64k"]);
    with_rw(&p, |img| img.snapshot_create("one", DATE));
    check_clean(&p);
    qemu_io(&p, &["write -P 0x82 1M 64k"]);
    let st = FileStorage::open(&p, true).unwrap();
    let mut img = Qcow2Image::open_rw(Box::new(st), &p).unwrap();
    let e = img
        .snapshot_apply(&SnapshotRef::IdOrName("one".into()))
        .unwrap_err()
        .to_string();
    assert!(e.contains("bitmaps"), "{e}");
    img.snapshot_delete(&SnapshotRef::Name("one".into()))
        .unwrap();
    drop(img);
    check_clean(&p);
    // The bitmap is still there, and consistent (not flagged in use).
    let info = qemu_img(&["info", "--output", "json", p.to_str().unwrap()]);
    assert!(
        info.contains("\"b0\"") && !info.contains("in-use"),
        "{info}"
    );
}

#[test]
fn repeated_snapshots_reuse_the_space_earlier_ones_freed() {
    if skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (p, _) = twins(dir.path(), "", true);
    let mut sizes = Vec::new();
    for _ in 0..12 {
        with_rw(&p, |img| img.snapshot_create("s", DATE));
        with_rw(&p, |img| {
            img.snapshot_delete(&SnapshotRef::Name("s".into()))
        });
        sizes.push(std::fs::metadata(&p).unwrap().len());
    }
    check_clean(&p);
    // The file stops growing after the first rounds (64 KiB clusters).
    assert!(
        sizes[11] <= sizes[2] + (128 << 10),
        "the file keeps growing: {sizes:?}"
    );
}

/// iotest 261: extra data a newer QEMU may write (past the 24 bytes known
/// today) is kept when the table is rewritten.
#[test]
fn unknown_extra_data_of_existing_snapshots_is_kept() {
    if skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (p, _) = twins(dir.path(), "", false);
    qemu_img(&["snapshot", "-c", "old", p.to_str().unwrap()]);
    // Grow the entry's extra data from 24 to 32 bytes (0xab each).
    let mut bytes = std::fs::read(&p).unwrap();
    let h = strata_format::Header::parse(&bytes[..4096]).unwrap();
    let at = h.snapshots_offset() as usize;
    let extra_len = u32::from_be_bytes(bytes[at + 36..at + 40].try_into().unwrap()) as usize;
    assert_eq!(extra_len, 24);
    let id_len = u16::from_be_bytes(bytes[at + 12..at + 14].try_into().unwrap()) as usize;
    let name_len = u16::from_be_bytes(bytes[at + 14..at + 16].try_into().unwrap()) as usize;
    let strings: Vec<u8> = bytes[at + 64..at + 64 + id_len + name_len].to_vec();
    // The table's cluster is allocated whole; the file may end inside it.
    let need = (at + 72 + strings.len()).div_ceil(512) * 512;
    if bytes.len() < need {
        bytes.resize(need, 0);
    }
    bytes[at + 36..at + 40].copy_from_slice(&32u32.to_be_bytes());
    bytes[at + 64..at + 72].fill(0xab);
    bytes[at + 72..at + 72 + strings.len()].copy_from_slice(&strings);
    std::fs::write(&p, &bytes).unwrap();
    check_clean(&p);
    with_rw(&p, |img| img.snapshot_create("new", DATE));
    check_clean(&p);
    let img = Qcow2Image::open(Box::new(FileStorage::open(&p, false).unwrap()), &p).unwrap();
    let old = &img.snapshots()[0];
    assert_eq!(old.name, "old");
    assert_eq!(old.extra.len(), 32);
    assert_eq!(old.extra[24..], [0xab; 8]);
    let names: Vec<String> = qemu_list(&p).into_iter().map(|(_, n, _)| n).collect();
    assert_eq!(names, ["old", "new"]);
}

/// Damaged metadata (bytes of the header, L1 tables, snapshot table and
/// refcount table flipped at random) never makes a snapshot operation
/// panic: it fails with an error, or succeeds.
#[test]
fn damaged_images_never_panic_snapshot_operations() {
    if skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (p, _) = twins(dir.path(), "cluster_size=4096", true);
    qemu_img(&["snapshot", "-c", "one", p.to_str().unwrap()]);
    qemu_io(&p, &["write -P 0x91 0 64k"]);
    let good = std::fs::read(&p).unwrap();
    let h = strata_format::Header::parse(&good[..4096]).unwrap();
    let regions = [
        (0u64, 104u64),
        (h.l1_table_offset(), 64),
        (h.snapshots_offset(), 80),
        (h.refcount_table_offset(), 64),
    ];
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let (mut ok, mut refused) = (0, 0);
    for round in 0..300 {
        let mut bytes = good.clone();
        for _ in 0..1 + next() % 3 {
            let (start, len) = regions[(next() % regions.len() as u64) as usize];
            let at = (start + next() % len) as usize;
            if let Some(b) = bytes.get_mut(at) {
                *b ^= 1 << (next() % 8);
            }
        }
        let st = MemStorage::from_bytes(bytes);
        let Ok(mut img) = Qcow2Image::open_rw(Box::new(st), Path::new("d.qcow2")) else {
            continue;
        };
        let r = match round % 3 {
            0 => img.snapshot_create("x", DATE).map(|_| ()),
            1 => img
                .snapshot_apply(&SnapshotRef::IdOrName("1".into()))
                .map(|_| ()),
            _ => img
                .snapshot_delete(&SnapshotRef::Name("one".into()))
                .map(|_| ()),
        };
        match r {
            Ok(()) => ok += 1,
            Err(e) => {
                // Errors name the file.
                assert!(e.to_string().contains("d.qcow2"), "{e}");
                refused += 1;
            }
        }
        let _ = img.flush();
    }
    // Both outcomes were exercised.
    assert!(ok > 10 && refused > 10, "{ok} succeeded, {refused} refused");
}

// ---- model -----------------------------------------------------------

mod model {
    use super::*;
    use proptest::prelude::*;
    use strata_image::create::{create_qcow2, CreateOptions};

    const SIZE: u64 = 256 << 10;

    #[derive(Debug, Clone)]
    pub enum Op {
        Write { off: u64, len: u64, byte: u8 },
        Zero { off: u64, len: u64 },
        Create,
        Apply(usize),
        Delete(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        let range = (0..SIZE).prop_flat_map(|off| (Just(off), 1..=(SIZE - off).min(40_000)));
        prop_oneof![
            3 => (range.clone(), any::<u8>()).prop_map(|((off, len), byte)| Op::Write { off, len, byte }),
            1 => range.prop_map(|(off, len)| Op::Zero { off, len }),
            2 => Just(Op::Create),
            1 => (0usize..4).prop_map(Op::Apply),
            1 => (0usize..4).prop_map(Op::Delete),
        ]
    }

    fn view(img: Qcow2Image) -> Vec<u8> {
        let chain = Chain::from_layers(vec![strata_image::Layer::new(
            "m.qcow2".into(),
            None,
            strata_image::Image::Qcow2(img),
        )])
        .unwrap();
        let mut v = vec![0u8; SIZE as usize];
        chain.read_at(&mut v, 0).unwrap();
        v
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        /// Random writes, zero writes and snapshot operations against a
        /// model (the active disk and each snapshot a `Vec<u8>`): after
        /// every step the active view and every snapshot's view equal the
        /// model and Strata's check is clean (no leaks); at the end
        /// `qemu-img check` agrees.
        #[test]
        fn snapshot_sequences_match_the_model(
            cluster in prop_oneof![Just(512u64), Just(4096), Just(65536)],
            ops in prop::collection::vec(op(), 1..14),
        ) {
            let m = MemStorage::new();
            let opts = CreateOptions { size: SIZE, cluster_size: cluster, ..Default::default() };
            create_qcow2(Box::new(m.clone()), Path::new("m.qcow2"), &opts).unwrap();
            let mut active = vec![0u8; SIZE as usize];
            let mut snaps: Vec<(String, Vec<u8>)> = Vec::new();
            for op in &ops {
                let mut img = Qcow2Image::open_rw(Box::new(m.clone()), Path::new("m.qcow2")).unwrap();
                match *op {
                    Op::Write { off, len, byte } => {
                        img.write(off, &vec![byte; len as usize], &|b, _| { b.fill(0); Ok(()) }).unwrap();
                        active[off as usize..(off + len) as usize].fill(byte);
                    }
                    Op::Zero { off, len } => {
                        img.write_zeroes(off, len, false, &|b, _| { b.fill(0); Ok(()) }).unwrap();
                        active[off as usize..(off + len) as usize].fill(0);
                    }
                    Op::Create => {
                        let sn = img.snapshot_create("s", DATE).unwrap();
                        snaps.push((sn.id, active.clone()));
                    }
                    Op::Apply(i) if i < snaps.len() => {
                        img.snapshot_apply(&SnapshotRef::IdOrName(snaps[i].0.clone())).unwrap();
                        active = snaps[i].1.clone();
                    }
                    Op::Delete(i) if i < snaps.len() => {
                        let id = snaps.remove(i).0;
                        img.snapshot_delete(&SnapshotRef::IdAndName { id: Some(id), name: None }).unwrap();
                    }
                    Op::Apply(_) | Op::Delete(_) => {}
                }
                img.flush().unwrap();
                drop(img);
                let img = Qcow2Image::open(Box::new(m.clone()), Path::new("m.qcow2")).unwrap();
                let report = strata_image::check::check(&img).unwrap();
                prop_assert!(report.is_clean(), "after {op:?}: {report:?}");
                prop_assert!(view(img) == active, "active view after {op:?}");
                for (id, want) in &snaps {
                    let mut img = Qcow2Image::open(Box::new(m.clone()), Path::new("m.qcow2")).unwrap();
                    img.load_snapshot(&SnapshotRef::IdOrName(id.clone())).unwrap();
                    prop_assert!(view(img) == *want, "snapshot {id} after {op:?}");
                }
            }
            if !skip() {
                let dir = tempfile::tempdir().unwrap();
                let p = dir.path().join("m.qcow2");
                std::fs::write(&p, m.to_bytes()).unwrap();
                check_clean(&p);
            }
        }
    }
}

// ---- crashes ---------------------------------------------------------

#[derive(Clone, Copy, Debug)]
enum SnapOp {
    Create,
    Apply,
    Delete,
}

fn view_of(bytes: &[u8], snap: Option<&str>) -> (Vec<u8>, Vec<String>) {
    let mut img = Qcow2Image::open(
        Box::new(MemStorage::from_bytes(bytes.to_vec())),
        Path::new("top.qcow2"),
    )
    .unwrap_or_else(|e| panic!("does not open: {e}"));
    let names = img.snapshots().iter().map(|s| s.name.clone()).collect();
    if let Some(s) = snap {
        img.load_snapshot(&SnapshotRef::Name(s.into())).unwrap();
    }
    let mut v = vec![0u8; img.virtual_size() as usize];
    let chain = Chain::from_layers(vec![strata_image::Layer::new(
        "top.qcow2".into(),
        None,
        strata_image::Image::Qcow2(img),
    )])
    .unwrap();
    chain.read_at(&mut v, 0).unwrap();
    (v, names)
}

fn run_op(st: &FaultStorage, op: SnapOp) -> strata_image::Result<()> {
    let mut img = Qcow2Image::open_rw(Box::new(st.clone()), Path::new("top.qcow2"))?;
    match op {
        SnapOp::Create => img.snapshot_create("new", DATE).map(|_| ()),
        SnapOp::Apply => img
            .snapshot_apply(&SnapshotRef::Name("old".into()))
            .map(|_| ()),
        SnapOp::Delete => img
            .snapshot_delete(&SnapshotRef::Name("old".into()))
            .map(|_| ()),
    }?;
    img.flush()
}

/// Crashes `op` at every write and sync of it; every durable state must
/// be the old one or the new one, and check clean (not even a leak).
/// Returns the file's length after the operation.
fn crash_everywhere(initial: &[u8], op: SnapOp) -> usize {
    let dir = tempfile::tempdir().unwrap();
    let old = view_of(initial, None);
    let reference = FaultStorage::new(initial.to_vec());
    run_op(&reference, op).unwrap();
    let new = view_of(&reference.current(), None);
    assert_ne!(old, new, "{op:?} changed nothing");
    let total = reference.ops();
    assert!(total >= 4, "{op:?}: only {total} storage operations");
    eprintln!(
        "{op:?}: {total} storage operations to crash at; file {} -> {} bytes",
        initial.len(),
        reference.current().len()
    );
    for n in 0..total {
        let st = FaultStorage::new(initial.to_vec());
        st.crash_at(n);
        // The last operations may come from closing the image (errors
        // there cannot be returned).
        let _ = run_op(&st, op);
        assert!(st.crashed(), "{op:?}: crash point {n} not reached");
        for keep in 0..3 {
            // None, all, or every other one of the writes not yet synced.
            let mut i = 0;
            let bytes = st.durable_image(&mut |_| {
                i += 1;
                keep == 1 || keep == 2 && i % 2 == 0
            });
            let label = format!("{op:?} crashed at op {n}/{total} (pending subset {keep})");
            let got = view_of(&bytes, None);
            assert!(
                got == old || got == new,
                "{label}: neither the old nor the new state"
            );
            // The snapshot "old" (when still there) reads as it did.
            if got.1.iter().any(|s| s == "old") {
                assert_eq!(
                    view_of(&bytes, Some("old")).0,
                    view_of(initial, Some("old")).0,
                    "{label}"
                );
            }
            let p = dir.path().join("top.qcow2");
            std::fs::write(&p, &bytes).unwrap();
            check_clean(&p);
        }
    }
    reference.current().len()
}

#[test]
fn create_apply_and_delete_survive_a_crash_at_every_step() {
    if skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("c.qcow2");
    qemu_create(&["-o", "cluster_size=4096", p.to_str().unwrap(), "1M"]);
    qemu_io(&p, &["write -P 0x51 0 300k", "write -c -P 0x53 512k 4k"]);
    qemu_img(&["snapshot", "-c", "old", p.to_str().unwrap()]);
    qemu_io(&p, &["write -P 0x52 100k 300k"]);
    // Made by qemu-img: no holes, the new tables go at the end.
    let packed = std::fs::read(&p).unwrap();
    // After a commit by Strata: the tables it replaced are holes the
    // operations place their new tables in (the file keeps its length).
    with_rw(&p, |img| img.snapshot_create("mid", DATE));
    with_rw(&p, |img| {
        img.snapshot_delete(&SnapshotRef::Name("mid".into()))
    });
    let holey = std::fs::read(&p).unwrap();
    for op in [SnapOp::Create, SnapOp::Apply, SnapOp::Delete] {
        assert!(crash_everywhere(&packed, op) > packed.len(), "{op:?}");
        assert_eq!(crash_everywhere(&holey, op), holey.len(), "{op:?}");
    }
}
