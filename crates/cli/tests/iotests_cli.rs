//! qemu-iotests scenarios whose outcome is a `strata` command's output
//! (map, check verdicts, create, commit): each image is built as the
//! iotest builds it, then `strata` and `qemu-img` run on it (or on twin
//! copies) and their outputs are compared live. docs/qemu-iotests.md
//! lists the scenarios; crates/image/tests/iotests.rs has the ones that
//! compare guest writes.

mod common;

use std::io::{Seek, SeekFrom, Write};
use std::path::Path;
use std::process::Command;

use common::*;

fn json(text: &str, what: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{what} is not JSON ({e}): {text}"))
}

/// `poke_file`: writes `bytes` at `offset` of `path`.
fn poke(path: &Path, offset: u64, bytes: &[u8]) {
    let mut f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.write_all(bytes).unwrap();
}

fn run_ok(cmd: &str, args: &[&str]) {
    let o = Command::new(cmd).args(args).output().unwrap();
    assert!(
        o.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// `strata map --output json` equals `qemu-img map --output json`, and
/// the human maps are equal too.
fn assert_same_map(img: &Path, what: &str) {
    let q = qemu_img_ok(&["map", "-U", "--output", "json", s(img)]);
    let r = strata(&["map", "-U", "--output", "json", s(img)]);
    assert_eq!(r.code, 0, "{what}: strata map failed: {}", r.stderr);
    assert_eq!(
        json(&r.stdout, "strata map"),
        json(&q, "qemu-img map"),
        "{what}: map differs\nqemu-img: {q}\nstrata:   {}",
        r.stdout
    );
    let q = qemu_img_ok(&["map", "-U", s(img)]);
    let r = strata(&["map", "-U", s(img)]);
    assert_eq!(r.stdout, q, "{what}: human map differs");
}

/// Two data clusters (guest 0 and 128k, host 0x50000 and 0x60000) in a
/// fresh 1 MiB image.
fn two_data_clusters(img: &Path) {
    qemu_img_ok(&["create", "-q", "-f", "qcow2", s(img), "1M"]);
    qemu_io("qcow2", img, &["write -P 1 0 64k", "write -P 2 128k 64k"]);
}

/// Issue 15 defect 7: data clusters past the end of a truncated image
/// file (080's "invalid L2 entry" family; a truncated copy) read as zeros,
/// and qemu-img map says `"zero": true` there once it takes the image for
/// metadata-preallocated (more clusters in use than the file has blocks).
#[test]
fn map_of_data_clusters_past_the_end_of_the_file_matches_qemu_img() {
    if !qemu_available() {
        return;
    }
    let dir = tempdir();
    let img = dir.path().join("t.qcow2");
    // File lengths: cutting the second cluster in half, exactly at the
    // first data cluster (QEMU's heuristic says "not preallocated"),
    // one byte into it, one sector short of its end.
    for len in [0x58000u64, 0x50000, 0x50001, 0x5fe00] {
        two_data_clusters(&img);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&img)
            .unwrap()
            .set_len(len)
            .unwrap();
        assert_same_map(&img, &format!("file cut at {len:#x}"));
    }
}

/// Issue 15 defect 7: a data cluster whose host range is a hole in the
/// file (punched) maps as zeros, as qemu-img says.
#[test]
fn map_of_a_data_cluster_over_a_hole_in_the_file_matches_qemu_img() {
    if !qemu_available() {
        return;
    }
    let dir = tempdir();
    let img = dir.path().join("t.qcow2");
    two_data_clusters(&img);
    run_ok(
        "fallocate",
        &["-p", "-o", "0x50000", "-l", "65536", s(&img)],
    );
    assert_same_map(&img, "hole punched in the first data cluster");
}

/// 121 builds its images with `preallocation=metadata,cluster_size=1k`
/// (every L2 entry points at a cluster the file has no blocks for), then
/// resizes and writes: the maps must agree at each step, as must check.
#[test]
fn iotest_121_maps_and_checks_of_metadata_preallocated_images_match_qemu_img() {
    if !qemu_available() {
        return;
    }
    let dir = tempdir();
    let img = dir.path().join("t.qcow2");
    for (size, write) in [
        ("64512K", &["write 62M 1025K", "write 64M 1M"][..]),
        ("64513K", &["write 63M 130K"][..]),
    ] {
        qemu_img_ok(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "preallocation=metadata,cluster_size=1k",
            s(&img),
            size,
        ]);
        assert_same_map(&img, &format!("{size}, preallocated"));
        qemu_img_ok(&["resize", "-q", s(&img), "65M"]);
        assert_same_map(&img, &format!("{size}, resized"));
        qemu_io("qcow2", &img, write);
        assert_same_map(&img, &format!("{size}, written"));
        let q = qemu_img(&["check", s(&img)]);
        let r = strata(&["check", s(&img)]);
        assert_eq!((r.code, q.code), (0, 0), "{}{}", r.stderr, q.stderr);
    }
}

/// Issue 15 defect 7 at the CLI: `strata check` exits 2 (corruptions
/// found), as `qemu-img check`, on images whose refcount table is gone
/// (060, 108), and prints the same problem lines.
#[test]
fn check_verdicts_on_missing_refcount_tables_match_qemu_img() {
    if !qemu_available() {
        return;
    }
    let dir = tempdir();
    let img = dir.path().join("t.qcow2");
    let cases: [&[(u64, &[u8])]; 3] = [
        &[(48, &[0; 8]), (56, &[0; 4])],
        &[(56, &[0; 4])],
        &[(48, &[0; 8])],
    ];
    for pokes in cases {
        qemu_img_ok(&["create", "-q", "-f", "qcow2", s(&img), "64M"]);
        qemu_io("qcow2", &img, &["write -P 42 0 64k"]);
        for (at, bytes) in pokes {
            poke(&img, *at, bytes);
        }
        let q = qemu_img(&["check", s(&img)]);
        let r = strata(&["check", s(&img)]);
        assert_eq!(q.code, 2, "{}", q.stderr);
        assert_eq!(r.code, 2, "{pokes:?}: {}", r.stderr);
        assert_eq!(r.stdout, q.stdout, "{pokes:?}");
        assert_eq!(r.stderr, q.stderr, "{pokes:?}");
    }
}
