//! `strata amend` against `qemu-img amend` on twins: the same `-o`
//! string on two copies; the same qcow2 info fields, a clean `qemu-img
//! check`, the same guest view; refusals with qemu-img's words, exit 1
//! and the file left as it was.

mod common;

use std::path::{Path, PathBuf};

use common::*;

fn info_data(img: &Path) -> serde_json::Value {
    let v: serde_json::Value =
        serde_json::from_str(&qemu_img_ok(&["info", "-U", "--output", "json", s(img)])).unwrap();
    v["format-specific"]["data"].clone()
}

/// `img` copied to `a.strata.qcow2` and `a.qemu.qcow2` beside it.
fn twins(img: &Path) -> (PathBuf, PathBuf) {
    let a = img.with_file_name("a.strata.qcow2");
    let b = img.with_file_name("a.qemu.qcow2");
    std::fs::copy(img, &a).unwrap();
    std::fs::copy(img, &b).unwrap();
    (a, b)
}

/// `strata amend ARGS` and `qemu-img amend -f qcow2 ARGS` on twins of
/// `img`: both succeed and agree.
fn amend_both(img: &Path, args: &[&str]) -> PathBuf {
    let (a, b) = twins(img);
    let mut sa = vec!["amend"];
    sa.extend(args);
    sa.push(s(&a));
    let r = strata(&sa);
    assert_eq!(r.code, 0, "strata {sa:?}: {}{}", r.stdout, r.stderr);
    assert_eq!(r.stdout, "", "amend prints nothing on success");
    let mut qa = vec!["amend", "-f", "qcow2"];
    qa.extend(args);
    qa.push(s(&b));
    qemu_img_ok(&qa);
    check_clean(&a);
    assert_eq!(info_data(&a), info_data(&b), "{args:?}");
    identical(&a, &b);
    a
}

/// Both refuse; strata's stderr holds qemu-img's first line; the file is
/// unchanged.
fn refuse_both(img: &Path, args: &[&str]) {
    let (a, b) = twins(img);
    let before = std::fs::read(&a).unwrap();
    let mut sa = vec!["amend"];
    sa.extend(args);
    sa.push(s(&a));
    let r = strata(&sa);
    let mut qa = vec!["amend", "-f", "qcow2"];
    qa.extend(args);
    qa.push(s(&b));
    let q = qemu_img(&qa);
    assert_ne!(q.code, 0, "qemu-img {qa:?} succeeded");
    let qmsg = q
        .stderr
        .lines()
        .next()
        .unwrap()
        .trim_start_matches("qemu-img: ");
    assert_fails_with(&r, 1, &[qmsg]);
    assert!(std::fs::read(&a).unwrap() == before, "{args:?} wrote");
}

/// A base of 0xaa under a top with zero clusters, data and a snapshot.
fn chain(dir: &Path) -> PathBuf {
    let base = dir.join("base.qcow2");
    let top = dir.join("top.qcow2");
    qemu_img_ok(&["create", "-q", "-f", "qcow2", s(&base), "1M"]);
    qemu_io("qcow2", &base, &["write -P 0xaa 0 1M"]);
    qemu_overlay(&top, "base.qcow2");
    qemu_io(
        "qcow2",
        &top,
        &[
            "write -z 0 128k",
            "write -P 0x11 256k 64k",
            "write -z 256k 64k",
        ],
    );
    qemu_img_ok(&["snapshot", "-c", "sn", s(&top)]);
    qemu_io("qcow2", &top, &["write -z 512k 64k"]);
    top
}

#[test]
fn amend_downgrades_a_chain_with_zero_clusters_like_qemu_img() {
    if !qemu_available() {
        return;
    }
    let dir = tempdir();
    let top = chain(dir.path());
    let a = amend_both(&top, &["-o", "compat=0.10"]);
    assert_eq!(info_data(&a)["compat"], "0.10");
}

#[test]
fn amend_upgrades_and_changes_refcount_width_and_lazy_refcounts() {
    if !qemu_available() {
        return;
    }
    let dir = tempdir();
    let img = dir.path().join("v2.qcow2");
    qemu_img_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "compat=0.10",
        s(&img),
        "1M",
    ]);
    qemu_io("qcow2", &img, &["write -P 0x42 0 128k"]);
    qemu_img_ok(&["snapshot", "-c", "sn", s(&img)]);
    let a = amend_both(
        &img,
        &[
            "-o",
            "compat=1.1",
            "-o",
            "lazy_refcounts=on,refcount_bits=64",
        ],
    );
    let d = info_data(&a);
    assert_eq!(d["compat"], "1.1");
    assert_eq!(d["lazy-refcounts"], true);
    assert_eq!(d["refcount-bits"], 64);
}

#[test]
fn amend_refuses_what_qemu_img_refuses() {
    if !qemu_available() {
        return;
    }
    let dir = tempdir();
    let img = dir.path().join("x.qcow2");
    qemu_img_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "extended_l2=on",
        s(&img),
        "1M",
    ]);
    refuse_both(&img, &["-o", "compat=0.10"]);
    for o in [
        "cluster_size=4k",
        "extended_l2=off",
        "preallocation=full",
        "compression_type=zstd",
        "compat=0.9",
        "foo=1",
        "lazy_refcounts=maybe",
        "refcount_bits=x",
        "refcount_bits=3",
        "compat=0.10,lazy_refcounts=on",
        "backing_file=elsewhere.qcow2",
        "data_file=d.raw",
        "data_file_raw=on",
        "encrypt.iter-time=10",
    ] {
        refuse_both(&img, &["-o", o]);
    }
}

#[test]
fn amend_without_options_says_so() {
    let dir = tempdir();
    let img = dir.path().join("n.qcow2");
    let r = strata(&["amend", s(&img)]);
    assert_fails_with(&r, 1, &["Must specify options (-o)"]);
    let r = strata(&["amend", "-o", "help", s(&img)]);
    assert_eq!(r.code, 0);
    assert!(r.stdout.contains("compat=<str>"), "{}", r.stdout);
}

#[test]
fn amend_of_a_raw_image_is_refused() {
    let dir = tempdir();
    let img = dir.path().join("r.raw");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let r = strata(&["amend", "-f", "raw", "-o", "compat=1.1", s(&img)]);
    assert_fails_with(
        &r,
        1,
        &["Format driver 'raw' does not support option amendment"],
    );
}

#[test]
fn a_downgrade_that_drops_bitmaps_says_so_unless_quiet() {
    if !qemu_available() {
        return;
    }
    let dir = tempdir();
    let img = dir.path().join("bm.qcow2");
    qemu_img_ok(&["create", "-q", "-f", "qcow2", s(&img), "1M"]);
    qemu_img_ok(&["bitmap", "--add", s(&img), "nightly"]);
    let (a, b) = twins(&img);
    let r = strata(&["amend", "-o", "compat=0.10", s(&a)]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr.contains("warning") && r.stderr.contains("nightly"),
        "{}",
        r.stderr
    );
    check_clean(&a);
    let r = strata(&["amend", "-q", "-o", "compat=0.10", s(&b)]);
    assert_eq!((r.code, r.stderr.as_str()), (0, ""));
    assert_eq!(info_data(&a)["compat"], "0.10");
}
