//! `strata check [-r leaks|all]` against `qemu-img check` on twin images
//! (iotest 112's refcount overflow, leaks, a leak that makes a COPIED
//! flag wrong, a refcount below the references, a clean image): the same
//! stdout, the same stderr (Strata's overflow hint names `strata amend`
//! and `strata convert` where qemu-img names itself), the same exit code,
//! then the same `qemu-img check` of both images.

mod common;

use std::io::{Seek, SeekFrom, Write};
use std::path::Path;

use common::*;

/// qemu-img's advice after a refcount overflow.
const QEMU_HINT: &str = "Use qemu-img amend to increase the refcount entry width or \
     qemu-img convert to create a clean copy if the image cannot be opened for writing";
/// Strata's.
const STRATA_HINT: &str = "Use strata amend to increase the refcount entry width or \
     strata convert to create a clean copy if the image cannot be opened for writing";

fn poke(path: &Path, offset: u64, bytes: &[u8]) {
    let mut f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.write_all(bytes).unwrap();
}

/// Sets the 16-bit refcount of cluster `ci` (64 KiB clusters, the first
/// refcount block at 0x20000: qemu-img's layout of a new image).
fn set_refcount(img: &Path, ci: u64, value: u16) {
    poke(img, 0x20000 + 2 * ci, &value.to_be_bytes());
}

/// A 64 MiB image with one data cluster (at 0x50000, cluster 5), built
/// by qemu-img and qemu-io, then changed by `damage`.
fn image(dir: &Path, opts: &str, damage: impl FnOnce(&Path)) -> std::path::PathBuf {
    let img = dir.join("orig.qcow2");
    qemu_img_ok(&["create", "-q", "-f", "qcow2", "-o", opts, s(&img), "64M"]);
    qemu_io("qcow2", &img, &["write -q 0 64k"]);
    damage(&img);
    img
}

/// Runs `check ARGS` with each tool on its twin of `orig`: the same
/// output (hint aside), exit code and resulting image check.
fn same_as_qemu_img(dir: &Path, orig: &Path, args: &[&str], what: &str) {
    let (q, t) = (dir.join("q.qcow2"), dir.join("t.qcow2"));
    std::fs::copy(orig, &q).unwrap();
    std::fs::copy(orig, &t).unwrap();
    let mut qa = vec!["check"];
    qa.extend(args);
    let mut ta = qa.clone();
    qa.push(s(&q));
    ta.push(s(&t));
    let qr = qemu_img(&qa);
    let tr = strata(&ta);
    assert_eq!(tr.stdout, qr.stdout, "{what} {args:?}: stdout");
    // Where the words are qemu-img's own: its name, and the leaks its
    // rebuild leaves behind (the old refcount table and block, repaired
    // at once: "Repairing cluster 1/2 refcount=1 reference=0"; Strata's
    // rebuild frees them: docs/qemu-iotests.md, divergences).
    let rebuilt = qr.stderr.contains("Rebuilding refcount structure");
    let qerr: String = qr
        .stderr
        .replace(QEMU_HINT, STRATA_HINT)
        .replace("qemu-img: ", "strata: ")
        .lines()
        .filter(|l| !(rebuilt && l.starts_with("Repairing cluster") && l.ends_with("reference=0")))
        .map(|l| format!("{l}\n"))
        .collect();
    assert_eq!(tr.stderr, qerr, "{what} {args:?}: stderr");
    assert_eq!(tr.code, qr.code, "{what} {args:?}: exit code");
    let (cq, ct) = (qemu_img(&["check", s(&q)]), qemu_img(&["check", s(&t)]));
    assert_eq!(cq.code, ct.code, "{what} {args:?}: check afterwards");
    assert_eq!(cq.stdout, ct.stdout, "{what} {args:?}: check afterwards");
}

#[test]
fn check_and_repair_of_a_refcount_overflow_print_like_qemu_img() {
    if !qemu_available() {
        return;
    }
    let dir = tempdir();
    // 112 "testing too many references for check": cluster 5 referenced
    // twice with 1-bit refcounts.
    let orig = image(dir.path(), "refcount_bits=1", |img| {
        poke(img, 0x40008, b"\x80\x00\x00\x00\x00\x05\x00\x00");
    });
    let qr = qemu_img(&["check", s(&orig)]);
    assert!(qr.stderr.contains(QEMU_HINT), "{}", qr.stderr);
    for args in [&[][..], &["-r", "leaks"], &["-r", "all"]] {
        same_as_qemu_img(dir.path(), &orig, args, "overflow");
    }
    // Printed once, not twice (the check before and after the repair).
    let r = strata(&["check", "-r", "all", s(&orig)]);
    assert_eq!(
        r.stderr.matches("ERROR: overflow").count(),
        1,
        "{}",
        r.stderr
    );
}

/// A change made to a new image.
type Damage = dyn Fn(&Path);

#[test]
fn repair_of_leaks_prints_like_qemu_img() {
    if !qemu_available() {
        return;
    }
    let dir = tempdir();
    let cases: [(&str, &Damage); 4] = [
        ("clean", &|_| {}),
        ("leaks", &|img| {
            std::fs::File::options()
                .write(true)
                .open(img)
                .unwrap()
                .set_len(0x80000)
                .unwrap();
            set_refcount(img, 6, 1);
            set_refcount(img, 7, 1);
        }),
        ("a leak on the data cluster", &|img| {
            std::fs::File::options()
                .write(true)
                .open(img)
                .unwrap()
                .set_len(0x80000)
                .unwrap();
            set_refcount(img, 5, 2);
            set_refcount(img, 7, 1);
        }),
        ("a refcount below the references", &|img| {
            set_refcount(img, 5, 0)
        }),
    ];
    for (what, damage) in cases {
        let orig = image(dir.path(), "compat=1.1", damage);
        for args in [&[][..], &["-r", "leaks"], &["-r", "all"]] {
            same_as_qemu_img(dir.path(), &orig, args, what);
        }
    }
}
