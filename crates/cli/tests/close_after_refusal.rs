//! A refused write or amend is reported once: closing the image after it
//! prints no second "closing ...: flush failed" when nothing was pending
//! (the refusal wrote nothing), and still says so when writes made
//! before the refusal could not be flushed (they are lost). Run through
//! the built binary: the close's message goes to the process's stderr.

mod common;

use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use common::*;

fn poke(path: &Path, offset: u64, bytes: &[u8]) {
    let mut f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.write_all(bytes).unwrap();
}

/// 271's "allocated subcluster marked zero too": subcluster 0 of the
/// first cluster both allocated and zero (the first L2 table at 0x40000).
fn bad_bitmap_image(dir: &Path) -> PathBuf {
    let img = dir.join("bad.qcow2");
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
    qemu_io("qcow2", &img, &["write -q 0 64k"]);
    poke(&img, 0x40008, b"\x00\x00\x00\x01\x00\x00\x00\x01");
    img
}

fn strata_lines(stderr: &str) -> Vec<&str> {
    stderr
        .lines()
        .filter(|l| l.starts_with("strata: "))
        .collect()
}

#[test]
fn a_refused_write_is_reported_once() {
    if !qemu_available() {
        return;
    }
    let dir = tempdir();
    let img = bad_bitmap_image(dir.path());
    let r = strata_bin(&["io", "-c", "write 0 512", s(&img)]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    let lines = strata_lines(&r.stderr);
    assert_eq!(lines.len(), 1, "{}", r.stderr);
    assert!(
        lines[0].contains("subcluster both allocated and zero"),
        "{}",
        r.stderr
    );
    assert!(!r.stderr.contains("closing"), "{}", r.stderr);
}

#[test]
fn a_refused_amend_is_reported_once() {
    if !qemu_available() {
        return;
    }
    // 060 "unaligned pre-allocated zero cluster": amend -o compat=0.10
    // meets it while expanding zero clusters and refuses.
    let dir = tempdir();
    let img = dir.path().join("a.qcow2");
    qemu_img_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "compat=1.1",
        s(&img),
        "64M",
    ]);
    qemu_io("qcow2", &img, &["write -q 0 64k"]);
    poke(&img, 0x40000, b"\x80\x00\x00\x00\x00\x05\x2a\x01");
    let r = strata_bin(&["amend", "-o", "compat=0.10", s(&img)]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    let lines = strata_lines(&r.stderr);
    assert_eq!(lines.len(), 1, "{}", r.stderr);
    assert!(
        lines[0].contains("cluster offset not aligned"),
        "{}",
        r.stderr
    );
    assert!(!r.stderr.contains("closing"), "{}", r.stderr);
}

#[test]
fn writes_lost_to_a_refusal_are_still_reported_at_close() {
    if !qemu_available() {
        return;
    }
    let dir = tempdir();
    let img = bad_bitmap_image(dir.path());
    // The first write allocates a cluster whose L2 entry waits for the
    // flush; the second is refused, so the flush cannot run.
    let r = strata_bin(&[
        "io",
        "-c",
        "write -P 0xcd 128k 512",
        "-c",
        "write 0 512",
        s(&img),
    ]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    let lines = strata_lines(&r.stderr);
    assert_eq!(lines.len(), 2, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("flush failed (the writes not flushed before the refused one are lost)"),
        "{}",
        r.stderr
    );
    // They are: the cluster reads as it did (read-only: the image is
    // marked corrupt).
    let o = std::process::Command::new("qemu-io")
        .args(["-r", "-f", "qcow2", "-c", "read -P 0 128k 512", s(&img)])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        out.contains("read 512/512") && !out.contains("failed"),
        "{out}"
    );
}
