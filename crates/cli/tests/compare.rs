//! strata compare against qemu-img compare: same messages, same exit codes.

mod common;

use std::path::PathBuf;

use tempfile::TempDir;

use common::*;

/// Runs `compare ARGS` with both tools and asserts the same stdout and
/// exit code.
fn assert_same_as_qemu_img(args: &[&str]) -> Run {
    let mut full = vec!["compare"];
    full.extend_from_slice(args);
    let q = qemu_img(&full);
    let r = strata(&full);
    assert_eq!(r.stdout, q.stdout, "stdout differs for compare {args:?}");
    assert_eq!(
        r.code, q.code,
        "exit code differs for compare {args:?}: {}",
        r.stderr
    );
    r
}

/// Creates two empty qcow2 images in `d`, a.qcow2 of `size_a` and
/// b.qcow2 of `size_b`.
fn create_a_and_b(d: &TempDir, size_a: &str, size_b: &str) -> (PathBuf, PathBuf) {
    let (a, b) = (d.path().join("a.qcow2"), d.path().join("b.qcow2"));
    for (path, size) in [(&a, size_a), (&b, size_b)] {
        qemu_img_ok(&["create", "-q", "-f", "qcow2", s(path), size]);
    }
    (a, b)
}

#[test]
fn one_differing_byte_is_reported_at_its_sector_like_qemu_img() {
    if !qemu_available() {
        return;
    }
    // Arrange
    let d = tempdir();
    let (a, b) = create_a_and_b(&d, "4M", "4M");
    qemu_io("qcow2", &a, &["write -P 0x11 64k 256k"]);
    qemu_io(
        "qcow2",
        &b,
        &["write -P 0x11 64k 256k", "write -P 0x12 200000 1"],
    );
    // Act + Assert
    let r = assert_same_as_qemu_img(&[s(&a), s(&b)]);
    assert_eq!(r.code, 1);
    assert_eq!(r.stdout, "Content mismatch at offset 199680!\n");
}

#[test]
fn data_against_unallocated_zeros_is_compared_by_content() {
    if !qemu_available() {
        return;
    }
    let d = tempdir();
    let (a, b) = create_a_and_b(&d, "4M", "4M");
    // Zeros written as data in a, nothing in b: identical guest view.
    qemu_io("qcow2", &a, &["write -P 0 1M 64k", "write -P 7 3M 1"]);
    qemu_io("qcow2", &b, &["write -P 7 3M 1"]);
    let r = assert_same_as_qemu_img(&[s(&a), s(&b)]);
    assert_eq!(r.code, 0);
    // A nonzero byte against nothing is a mismatch.
    qemu_io("qcow2", &a, &["write -P 9 1500000 1"]);
    let r = assert_same_as_qemu_img(&[s(&a), s(&b)]);
    assert_eq!(r.code, 1);
}

#[test]
fn a_larger_image_with_a_zero_tail_is_identical_with_a_warning() {
    if !qemu_available() {
        return;
    }
    let d = tempdir();
    let (a, b) = create_a_and_b(&d, "1M", "2M");
    qemu_io("qcow2", &b, &["write -z 1536k 64k"]);
    let r = assert_same_as_qemu_img(&[s(&a), s(&b)]);
    assert_eq!(
        r.stdout,
        "Warning: Image size mismatch!\nImages are identical.\n"
    );
    assert_eq!(r.code, 0);
}

#[test]
fn a_larger_image_with_data_in_its_tail_differs() {
    if !qemu_available() {
        return;
    }
    let d = tempdir();
    let (a, b) = create_a_and_b(&d, "1M", "2M");
    qemu_io("qcow2", &b, &["write -P 1 1536700 1"]);
    let r = assert_same_as_qemu_img(&[s(&b), s(&a)]);
    assert_eq!(r.code, 1);
    assert!(r.stdout.ends_with("Content mismatch at offset 1536512!\n"));
}

#[test]
fn strict_mode_refuses_different_sizes() {
    if !qemu_available() {
        return;
    }
    let d = tempdir();
    let (a, b) = create_a_and_b(&d, "1M", "2M");
    let r = assert_same_as_qemu_img(&["-s", s(&a), s(&b)]);
    assert_eq!(r.stdout, "Strict mode: Image size mismatch!\n");
}

#[test]
fn strict_mode_reports_an_allocation_difference() {
    if !qemu_available() {
        return;
    }
    let d = tempdir();
    let (a, b) = create_a_and_b(&d, "4M", "4M");
    qemu_io("qcow2", &a, &["write -P 0 1M 64k"]);
    let r = assert_same_as_qemu_img(&["-s", s(&a), s(&b)]);
    assert_eq!(r.code, 1);
    // Offset 0, not 1 MiB: b's unallocated run reaches the end of the
    // image and so carries QEMU's EOF bit, a's stops at the data.
    assert_eq!(r.stdout, "Strict mode: Offset 0 block status mismatch!\n");
}

#[test]
fn a_chain_and_a_raw_copy_compare_identical_with_formats_given() {
    if !qemu_available() {
        return;
    }
    let top = shape_top("short_backing");
    let d = tempdir();
    let raw = d.path().join("flat.raw");
    qemu_img_ok(&["convert", "-O", "raw", s(&top), s(&raw)]);
    let r = assert_same_as_qemu_img(&["-f", "qcow2", "-F", "raw", s(&top), s(&raw)]);
    assert_eq!(r.code, 0);
}

#[test]
fn a_missing_image_is_an_error_with_exit_code_2() {
    let d = tempdir();
    let a = d.path().join("a.qcow2");
    let missing = d.path().join("missing.qcow2");
    std::fs::write(&a, vec![0u8; 4096]).unwrap();
    let r = strata_bin(&["compare", s(&a), s(&missing)]);
    assert_fails_with(&r, 2, &["missing.qcow2"]);
}
