//! `strata amend -p` against `qemu-img amend -p` on twin images: the
//! same stdout byte for byte where qemu-img reports no intermediate step
//! (a header change, a refusal, an option error, a missing file), and the
//! same first and last lines where it reports its walks (a refcount width
//! change: Strata's amend is one step, docs/qemu-iotests.md).

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

fn qemu_amend(args: &[&str]) -> (Vec<u8>, i32) {
    let o = Command::new("qemu-img")
        .arg("amend")
        .args(args)
        .output()
        .unwrap();
    (o.stdout, o.status.code().unwrap_or(-1))
}

fn strata_amend(args: &[&str]) -> (Vec<u8>, i32) {
    let mut a = vec!["amend"];
    a.extend(args);
    let r = strata(&a);
    (r.stdout.into_bytes(), r.code)
}

fn twins(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let (q, t) = (dir.join("q.qcow2"), dir.join("t.qcow2"));
    qemu_img_ok(&["create", "-q", "-f", "qcow2", s(&q), "64M"]);
    qemu_io("qcow2", &q, &["write -q 0 1M"]);
    std::fs::copy(&q, &t).unwrap();
    (q, t)
}

#[test]
fn amend_p_prints_progress_like_qemu_img() {
    if !qemu_available() {
        return;
    }
    let dir = tempdir();
    for o in [
        "lazy_refcounts=on",
        "compat=0.9",
        "refcount_bits=3",
        "backing_file=x",
        "compat=0.10,refcount_bits=8",
        "foo=bar",
        "cluster_size=4k",
        "lazy_refcounts=maybe",
        "size=128M",
    ] {
        let (q, t) = twins(dir.path());
        let qr = qemu_amend(&["-p", "-o", o, s(&q)]);
        let tr = strata_amend(&["-p", "-o", o, s(&t)]);
        assert_eq!(
            String::from_utf8_lossy(&tr.0),
            String::from_utf8_lossy(&qr.0),
            "{o}"
        );
        assert_eq!(tr.1, qr.1, "{o}: exit code");
        // -q silences it.
        let tr = strata_amend(&["-p", "-q", "-o", o, s(&t)]);
        assert!(tr.0.is_empty(), "{o}: {:?}", tr.0);
    }
    let missing = dir.path().join("missing.qcow2");
    let qr = qemu_amend(&["-p", "-o", "size=1M", s(&missing)]);
    let tr = strata_amend(&["-p", "-o", "size=1M", s(&missing)]);
    assert_eq!((tr.0, tr.1), (qr.0, qr.1), "missing file");
}

#[test]
fn amend_p_of_a_refcount_width_change_starts_and_ends_like_qemu_img() {
    if !qemu_available() {
        return;
    }
    let dir = tempdir();
    let (q, t) = twins(dir.path());
    let qr = qemu_amend(&["-p", "-o", "refcount_bits=1", s(&q)]);
    let tr = strata_amend(&["-p", "-o", "refcount_bits=1", s(&t)]);
    assert_eq!((qr.1, tr.1), (0, 0));
    let (qs, ts) = (
        String::from_utf8_lossy(&qr.0),
        String::from_utf8_lossy(&tr.0),
    );
    assert_eq!(ts, "    (0.00/100%)\r    (100.00/100%)\r\n");
    assert!(qs.starts_with("    (0.00/100%)\r"), "{qs:?}");
    assert!(qs.ends_with("    (100.00/100%)\r\n"), "{qs:?}");
    identical(&q, &t);
}
