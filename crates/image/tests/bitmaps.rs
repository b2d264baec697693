//! Persistent dirty bitmaps through Strata's write path, with QEMU as the
//! oracle: the same writes, zero writes and discards applied through
//! qemu-io and through Strata to twin images must leave the same bitmap
//! list (`qemu-img info`) and the same dirty ranges, as QEMU reads them
//! back over NBD (`qemu-nbd -B NAME` + `qemu-img map` with
//! `x-dirty-bitmap`, where dirty ranges are `"data": false`).

mod common;

use std::path::Path;

use common::{qemu_create, qemu_img, qemu_io, run, skip};
use strata_image::{Chain, FileStorage, OpenOptions, Qcow2Image};

fn arg(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// One guest operation, in qemu-io's spelling and as Strata applies it.
#[derive(Debug, Clone, Copy)]
enum Op {
    Write(u64, u64, u8),
    Zero(u64, u64, bool),
    Discard(u64, u64),
    Flush,
}

impl Op {
    fn qemu_io(self) -> String {
        match self {
            Op::Write(o, l, p) => format!("write -P {p} {o} {l}"),
            Op::Zero(o, l, false) => format!("write -z {o} {l}"),
            Op::Zero(o, l, true) => format!("write -z -u {o} {l}"),
            Op::Discard(o, l) => format!("discard {o} {l}"),
            Op::Flush => "flush".into(),
        }
    }

    fn strata(self, c: &mut Chain) {
        match self {
            Op::Write(o, l, p) => c.write_at(&vec![p; l as usize], o).unwrap(),
            Op::Zero(o, l, unmap) => c.write_zeroes(o, l, unmap).unwrap(),
            Op::Discard(o, l) => c.discard(o, l).unwrap(),
            Op::Flush => c.flush().unwrap(),
        }
    }
}

fn open_writable(img: &Path) -> Chain {
    Chain::open(
        img,
        &OpenOptions {
            writable: true,
            ..Default::default()
        },
    )
    .unwrap()
}

fn apply_both(q: &Path, s: &Path, ops: &[Op]) {
    let cmds: Vec<String> = ops.iter().map(|o| o.qemu_io()).collect();
    let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qemu_io(q, &cmds);
    let mut c = open_writable(s);
    for op in ops {
        op.strata(&mut c);
    }
    c.flush().unwrap();
}

/// The bitmaps `qemu-img info` lists: (name, granularity, flags).
fn qemu_bitmaps(img: &Path) -> Vec<serde_json::Value> {
    let out = qemu_img(&["info", "-U", "--output=json", arg(img)]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["format-specific"]["data"]["bitmaps"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// Bitmap `name`'s dirty ranges as QEMU reads them.
pub fn qemu_dirty(img: &Path, name: &str) -> Vec<(u64, u64)> {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("nbd.sock");
    run(
        "qemu-nbd",
        &[
            "--fork", "-r", "-f", "qcow2", "-B", name, "-k", arg(&sock), arg(img),
        ],
    );
    let opts = format!(
        "driver=nbd,server.type=unix,server.path={},x-dirty-bitmap=qemu:dirty-bitmap:{name}",
        arg(&sock)
    );
    let out = qemu_img(&["map", "--output=json", "--image-opts", &opts]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for e in v.as_array().unwrap() {
        if e["data"] == false {
            let (s, l) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
            match ranges.last_mut() {
                Some((ps, pl)) if *ps + *pl == s => *pl += l,
                _ => ranges.push((s, l)),
            }
        }
    }
    ranges
}

/// Bitmap `name`'s dirty ranges as Strata's library reads them.
fn strata_dirty(img: &Path, name: &str) -> Vec<(u64, u64)> {
    let q = Qcow2Image::open(Box::new(FileStorage::open(img, false).unwrap()), img).unwrap();
    let b = q.dirty_bitmap(name).unwrap();
    b.extents(0, q.virtual_size()).collect()
}

fn check_clean(img: &Path) {
    let out = std::process::Command::new("qemu-img")
        .args(["check", "-U", arg(img)])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "qemu-img check {img:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn assert_twins_agree(q: &Path, s: &Path) {
    let (qb, sb) = (qemu_bitmaps(q), qemu_bitmaps(s));
    assert_eq!(qb, sb, "bitmap lists differ");
    assert!(!qb.is_empty(), "the twins have no bitmaps");
    for b in &qb {
        let name = b["name"].as_str().unwrap();
        let qd = qemu_dirty(q, name);
        assert!(!qd.is_empty(), "{name} has no dirty range: the test proves nothing");
        assert_eq!(qd, qemu_dirty(s, name), "dirty ranges of {name} differ");
        if !b["flags"].as_array().unwrap().iter().any(|f| f == "in-use") {
            assert_eq!(qd, strata_dirty(s, name), "library view of {name}");
        }
    }
    check_clean(s);
    let qr = dir_raw(q);
    assert!(qr == dir_raw(s), "guest views differ");
}

fn dir_raw(img: &Path) -> Vec<u8> {
    let out = img.with_extension("raw");
    qemu_img(&["convert", "-U", "-O", "raw", arg(img), arg(&out)]);
    std::fs::read(out).unwrap()
}

/// An image with an enabled bitmap "on" (granularity `g`, already dirty
/// at 0-64k), an enabled default "b64" and a disabled "off"; and its twin.
fn twins(dir: &Path, create_opts: &[&str], size: &str, g: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let q = dir.join("q.qcow2");
    let mut args: Vec<&str> = create_opts.to_vec();
    args.push(arg(&q));
    args.push(size);
    qemu_create(&args);
    qemu_io(&q, &["write -P 7 0 256k"]);
    qemu_img(&["bitmap", "--add", "-g", g, arg(&q), "on"]);
    qemu_img(&["bitmap", "--add", arg(&q), "b64"]);
    qemu_img(&["bitmap", "--add", "--disable", "-g", g, arg(&q), "off"]);
    qemu_io(&q, &["write -P 8 0 64k"]);
    qemu_img(&["bitmap", "--disable", arg(&q), "off"]);
    let s = dir.join("s.qcow2");
    std::fs::copy(&q, &s).unwrap();
    (q, s)
}

const OPS: &[Op] = &[
    Op::Write(100 << 10, 4 << 10, 1),
    Op::Write((1 << 20) - 512, 1024, 2),
    Op::Zero(3 << 20, 300 << 10, false),
    Op::Flush,
    Op::Zero(5 << 20, 1 << 20, true),
    Op::Discard(10 << 20, 64 << 10),
    Op::Discard((12 << 20) + 4096, 8192),
    Op::Write((16 << 20) - 4096, 4096, 3),
];

#[test]
fn writes_zeroes_and_discards_dirty_the_same_granules_as_qemu_for_each_granularity() {
    if skip() {
        return;
    }
    for g in ["64k", "128k", "4k", "1M", "512"] {
        let dir = tempfile::tempdir().unwrap();
        let (q, s) = twins(dir.path(), &[], "16M", g);
        apply_both(&q, &s, OPS);
        assert_twins_agree(&q, &s);
    }
}

#[test]
fn bitmaps_spanning_several_clusters_with_small_clusters_agree_with_qemu() {
    if skip() {
        return;
    }
    // 512-byte clusters: the 4k bitmap of 16 MiB takes 512 bytes of bits
    // (one cluster); at 512 bytes it takes 8 clusters.
    for g in ["512", "4k"] {
        let dir = tempfile::tempdir().unwrap();
        let (q, s) = twins(dir.path(), &["-o", "cluster_size=512"], "16M", g);
        apply_both(&q, &s, OPS);
        assert_twins_agree(&q, &s);
    }
}

#[test]
fn several_sessions_accumulate_dirty_bits_like_qemu() {
    if skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (q, s) = twins(dir.path(), &[], "16M", "64k");
    apply_both(&q, &s, &OPS[..3]);
    apply_both(&q, &s, &OPS[3..]);
    apply_both(&q, &s, &[Op::Write(8 << 20, 1, 9)]);
    assert_twins_agree(&q, &s);
}

#[test]
fn an_image_written_by_strata_keeps_autoclear_and_no_bitmap_in_use() {
    if skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (_, s) = twins(dir.path(), &[], "16M", "64k");
    {
        let mut c = open_writable(&s);
        c.write_at(&[1; 512], 0).unwrap();
        // Mid-session the enabled bitmaps are flagged in use on disk.
        let b = qemu_bitmaps(&s);
        let in_use: Vec<_> = b
            .iter()
            .filter(|b| b["flags"].as_array().unwrap().iter().any(|f| f == "in-use"))
            .map(|b| b["name"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(in_use, ["on", "b64"]);
    }
    let b = qemu_bitmaps(&s);
    assert_eq!(b.len(), 3);
    for b in &b {
        assert!(!b["flags"].as_array().unwrap().iter().any(|f| f == "in-use"));
    }
    let q = Qcow2Image::open(Box::new(FileStorage::open(&s, false).unwrap()), &s).unwrap();
    assert_eq!(q.header().autoclear_features & 1, 1);
    let names: Vec<_> = q.bitmaps().unwrap().into_iter().map(|b| (b.name, b.auto)).collect();
    assert_eq!(
        names,
        [("on".into(), true), ("b64".into(), true), ("off".into(), false)]
    );
}

#[test]
fn v2_images_have_no_bitmaps() {
    if skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("v2.qcow2");
    qemu_create(&["-o", "compat=0.10", arg(&p), "1M"]);
    let q = Qcow2Image::open(Box::new(FileStorage::open(&p, false).unwrap()), &p).unwrap();
    assert!(q.bitmaps().unwrap().is_empty());
}
