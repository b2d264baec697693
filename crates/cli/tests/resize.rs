//! `strata resize` against `qemu-img resize` on twins: the same virtual
//! size, a clean `qemu-img check`, the same guest view, and qemu-img's
//! refusals word for word.

mod common;

use std::path::{Path, PathBuf};

use common::*;

fn strata_ok(args: &[&str]) -> Run {
    let r = strata(args);
    assert_eq!(r.code, 0, "strata {args:?}: {}{}", r.stdout, r.stderr);
    r
}

fn virtual_size(img: &Path) -> u64 {
    let v: serde_json::Value =
        serde_json::from_str(&qemu_img_ok(&["info", "-U", "--output", "json", s(img)])).unwrap();
    v["virtual-size"].as_u64().unwrap()
}

/// A qcow2 image of `size` with data written by qemu-io, and its twin.
fn qcow2_twins(dir: &Path, size: &str, writes: &[&str]) -> (PathBuf, PathBuf) {
    let a = dir.join("strata.qcow2");
    let b = dir.join("qemu.qcow2");
    qemu_img_ok(&["create", "-q", "-f", "qcow2", s(&a), size]);
    if !writes.is_empty() {
        qemu_io("qcow2", &a, writes);
    }
    std::fs::copy(&a, &b).unwrap();
    (a, b)
}

/// Runs the same resize on both twins and checks they agree.
fn resize_both(a: &Path, b: &Path, args: &[&str]) {
    let size = *args.last().unwrap();
    let opts = &args[..args.len() - 1];
    let mut sa: Vec<&str> = vec!["resize"];
    sa.extend(opts);
    sa.extend([s(a), size]);
    let r = strata_ok(&sa);
    assert_eq!(r.stdout, "Image resized.\n");
    let mut qa: Vec<&str> = vec!["resize"];
    qa.extend(opts);
    qa.extend([s(b), size]);
    qemu_img_ok(&qa);
    assert_eq!(virtual_size(a), virtual_size(b), "{args:?}");
}

#[test]
fn resize_grows_qcow2_like_qemu_img() {
    if !qemu_available() {
        return;
    }
    let d = tempdir();
    let (a, b) = qcow2_twins(d.path(), "1M", &["write -P 7 0 64k", "write -P 9 960k 64k"]);
    resize_both(&a, &b, &["+3M"]);
    assert_eq!(virtual_size(&a), 4 << 20);
    resize_both(&a, &b, &["3G"]); // needs a larger L1 table
    check_clean(&a);
    identical(&a, &b);
}

#[test]
fn resize_grows_raw_like_qemu_img() {
    if !qemu_available() {
        return;
    }
    let d = tempdir();
    let a = d.path().join("a.raw");
    let b = d.path().join("b.raw");
    qemu_img_ok(&["create", "-q", "-f", "raw", s(&a), "1M"]);
    qemu_io("raw", &a, &["write -P 5 4k 8k"]);
    std::fs::copy(&a, &b).unwrap();
    resize_both(&a, &b, &["-f", "raw", "+1000"]);
    assert_eq!(std::fs::metadata(&a).unwrap().len(), (1 << 20) + 1000);
    assert_eq!(
        std::fs::metadata(&a).unwrap().len(),
        std::fs::metadata(&b).unwrap().len()
    );
    identical(&a, &b);
}

#[test]
fn resize_refuses_to_shrink_without_shrink_like_qemu_img() {
    if !qemu_available() {
        return;
    }
    let d = tempdir();
    let (a, b) = qcow2_twins(d.path(), "1M", &[]);
    let before = std::fs::read(&a).unwrap();
    let q = qemu_img(&["resize", s(&b), "512k"]);
    assert_eq!(q.code, 1);
    assert!(q
        .stderr
        .contains("Use the --shrink option to perform a shrink operation."));
    let r = strata(&["resize", s(&a), "512k"]);
    assert_fails_with(
        &r,
        1,
        &[
            "Use the --shrink option to perform a shrink operation.",
            "Shrinking an image will delete all data beyond the shrunken image's end",
        ],
    );
    let r = strata(&["resize", s(&a), "-4k"]);
    assert_fails_with(&r, 1, &["Use the --shrink option"]);
    assert_eq!(
        std::fs::read(&a).unwrap(),
        before,
        "a refused resize changed the file"
    );
}

#[test]
fn resize_refuses_sizes_qemu_img_refuses() {
    if !qemu_available() {
        return;
    }
    let d = tempdir();
    let (a, b) = qcow2_twins(d.path(), "1M", &[]);
    for (size, msg) in [
        ("2000001", "The new size must be a multiple of 512"),
        ("-2M", "New image size must be positive"),
        (
            "1X",
            "Parameter 'size' expects a non-negative number below 2^64",
        ),
        (
            "+1X",
            "Parameter 'size' expects a non-negative number below 2^64",
        ),
    ] {
        let q = qemu_img(&["resize", "--shrink", s(&b), size]);
        assert_eq!(q.code, 1, "{size}");
        assert!(q.stderr.contains(msg), "qemu-img {size}: {}", q.stderr);
        let r = strata(&["resize", "--shrink", s(&a), size]);
        assert_fails_with(&r, 1, &[msg]);
    }
    let r = strata(&["resize", "--preallocation=bogus", s(&a), "2M"]);
    assert_fails_with(&r, 1, &["Invalid preallocation mode"]);
    assert_eq!(virtual_size(&a), 1 << 20);
}

#[test]
fn resize_shrinks_qcow2_with_shrink_like_qemu_img() {
    if !qemu_available() {
        return;
    }
    let d = tempdir();
    let (a, b) = qcow2_twins(
        d.path(),
        "2M",
        &["write -P 1 0 1M", "write -P 2 1M 1M", "write -z 100k 4k"],
    );
    // 700k is not a whole number of 64k clusters: the partial cluster stays.
    resize_both(&a, &b, &["--shrink", "700k"]);
    check_clean(&a);
    identical(&a, &b);
    // The freed tail of the file is cut off, as qemu-img cuts it.
    let len = |p: &Path| std::fs::metadata(p).unwrap().len();
    assert_eq!(len(&a), len(&b));
    assert!(len(&a) < 2 << 20, "{}", len(&a));
    // Grown again, the area past the old end reads as zeros in both.
    resize_both(&a, &b, &["+1M"]);
    check_clean(&a);
    identical(&a, &b);
}

#[test]
fn resize_shrinks_qcow2_with_internal_snapshots_keeping_them() {
    if !qemu_available() {
        return;
    }
    let d = tempdir();
    let (a, b) = qcow2_twins(d.path(), "1M", &["write -P 3 0 1M"]);
    qemu_img_ok(&["snapshot", "-c", "s1", s(&a)]);
    qemu_img_ok(&["snapshot", "-c", "s1", s(&b)]);
    resize_both(&a, &b, &["--shrink", "256k"]);
    check_clean(&a);
    identical(&a, &b);
    // The snapshot still reads the same through qemu-img in both twins.
    let snap_a = d.path().join("snap-a.raw");
    let snap_b = d.path().join("snap-b.raw");
    qemu_img_ok(&[
        "convert",
        "-l",
        "snapshot.name=s1",
        "-O",
        "raw",
        s(&a),
        s(&snap_a),
    ]);
    qemu_img_ok(&[
        "convert",
        "-l",
        "snapshot.name=s1",
        "-O",
        "raw",
        s(&b),
        s(&snap_b),
    ]);
    let data = std::fs::read(&snap_a).unwrap();
    assert_eq!(data, std::fs::read(&snap_b).unwrap());
    assert!(data.iter().all(|&b| b == 3));
}

#[test]
fn resize_shrinks_raw_with_shrink_to_any_length() {
    if !qemu_available() {
        return;
    }
    let d = tempdir();
    let a = d.path().join("a.raw");
    let b = d.path().join("b.raw");
    qemu_img_ok(&["create", "-q", "-f", "raw", s(&a), "1M"]);
    qemu_io("raw", &a, &["write -P 5 0 1M"]);
    std::fs::copy(&a, &b).unwrap();
    resize_both(&a, &b, &["-f", "raw", "--shrink", "1000"]);
    assert_eq!(std::fs::metadata(&a).unwrap().len(), 1000);
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
}

#[test]
fn resize_of_an_overlay_leaves_its_backing_file_alone() {
    if !qemu_available() {
        return;
    }
    let d = tempdir();
    let base = d.path().join("base.qcow2");
    qemu_img_ok(&["create", "-q", "-f", "qcow2", s(&base), "1M"]);
    qemu_io("qcow2", &base, &["write -P 4 0 1M"]);
    let a = d.path().join("a.qcow2");
    let b = d.path().join("b.qcow2");
    for t in [&a, &b] {
        qemu_overlay(t, "base.qcow2");
    }
    qemu_io("qcow2", &a, &["write -P 6 0 64k"]);
    qemu_io("qcow2", &b, &["write -P 6 0 64k"]);
    let base_before = std::fs::read(&base).unwrap();
    resize_both(&a, &b, &["+1M"]);
    check_clean(&a);
    identical(&a, &b);
    assert_eq!(std::fs::read(&base).unwrap(), base_before);
}

#[test]
fn resize_grows_an_image_with_a_persistent_bitmap_and_refuses_to_shrink_it() {
    if !qemu_available() {
        return;
    }
    let d = tempdir();
    let (a, b) = qcow2_twins(d.path(), "1M", &[]);
    qemu_img_ok(&["bitmap", "--add", s(&a), "bm"]);
    qemu_img_ok(&["bitmap", "--add", s(&b), "bm"]);
    resize_both(&a, &b, &["2M"]);
    check_clean(&a);
    let r = strata(&["resize", "--shrink", s(&a), "512k"]);
    assert_fails_with(
        &r,
        1,
        &["persistent bitmaps", "not supported by Strata yet"],
    );
    assert_eq!(virtual_size(&a), 2 << 20);
    check_clean(&a);
}

#[test]
fn resize_is_refused_while_another_process_has_the_image_open() {
    if !qemu_available() {
        return;
    }
    let d = tempdir();
    let (a, _) = qcow2_twins(d.path(), "1M", &[]);
    let holder = QemuIoHolds::start(&a);
    let r = strata(&["resize", s(&a), "2M"]);
    drop(holder);
    assert_fails_with(&r, 1, &["Failed to get \"write\" lock"]);
    assert_eq!(virtual_size(&a), 1 << 20);
}

/// `qemu-img map --output json` without host offsets (they may differ).
fn map_shape(img: &Path) -> String {
    let m: serde_json::Value =
        serde_json::from_str(&qemu_img_ok(&["map", "--output", "json", s(img)])).unwrap();
    let mut v = m.as_array().unwrap().clone();
    for e in &mut v {
        e.as_object_mut().unwrap().remove("offset");
    }
    serde_json::to_string(&v).unwrap()
}

#[test]
fn resize_grow_of_an_overlay_over_a_longer_backing_file_reads_zeros_like_qemu_img() {
    if !qemu_available() {
        return;
    }
    let d = tempdir();
    let base = d.path().join("base.qcow2");
    qemu_img_ok(&["create", "-q", "-f", "qcow2", s(&base), "4M"]);
    qemu_io("qcow2", &base, &["write -P 9 0 4M"]);
    let a = d.path().join("a.qcow2");
    let b = d.path().join("b.qcow2");
    for t in [&a, &b] {
        // 1000k: the old end is inside a cluster.
        qemu_img_ok(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            s(t),
            "1000k",
        ]);
    }
    resize_both(&a, &b, &["3M"]);
    check_clean(&a);
    identical(&a, &b);
    assert_eq!(map_shape(&a), map_shape(&b));
    // The backing file's tail does not show through.
    qemu_io("qcow2", &a, &["read -P 0 1000k 2072k"]);
}

#[test]
fn resize_preallocation_full_and_falloc_allocate_the_new_area_like_qemu_img() {
    if !qemu_available() {
        return;
    }
    for mode in ["full", "falloc"] {
        let d = tempdir();
        let opt = format!("--preallocation={mode}");
        let (a, b) = qcow2_twins(d.path(), "1000k", &["write -P 1 0 64k"]);
        resize_both(&a, &b, &[&opt, "+1M"]);
        check_clean(&a);
        identical(&a, &b);
        assert_eq!(map_shape(&a), map_shape(&b), "{mode}");

        let ra = d.path().join("a.raw");
        let rb = d.path().join("b.raw");
        // Each made by qemu-img (a copy would not keep the holes).
        qemu_img_ok(&["create", "-q", "-f", "raw", s(&ra), "1M"]);
        qemu_img_ok(&["create", "-q", "-f", "raw", s(&rb), "1M"]);
        resize_both(&ra, &rb, &["-f", "raw", &opt, "+1M"]);
        assert_eq!(std::fs::read(&ra).unwrap(), std::fs::read(&rb).unwrap());
        assert_eq!(map_shape(&ra), map_shape(&rb), "raw {mode}");
    }
}

#[test]
fn resize_refuses_preallocation_where_qemu_img_does() {
    if !qemu_available() {
        return;
    }
    let d = tempdir();
    let ra = d.path().join("a.raw");
    qemu_img_ok(&["create", "-q", "-f", "raw", s(&ra), "1M"]);
    let rb = d.path().join("b.raw");
    std::fs::copy(&ra, &rb).unwrap();
    for (args, msg) in [
        (
            &["--preallocation=metadata", "+1M"][..],
            "Unsupported preallocation mode: metadata",
        ),
        (
            &["--shrink", "--preallocation=full", "512k"][..],
            "Preallocation can only be used for growing images",
        ),
    ] {
        let size = *args.last().unwrap();
        let opts = &args[..args.len() - 1];
        let mut q = vec!["resize", "-f", "raw"];
        q.extend(opts);
        let mut st = q.clone();
        q.extend([s(&rb), size]);
        st.extend([s(&ra), size]);
        let qr = qemu_img(&q);
        assert_eq!(qr.code, 1, "{args:?}");
        assert!(qr.stderr.contains(msg), "qemu-img {args:?}: {}", qr.stderr);
        assert_fails_with(&strata(&st), 1, &[msg]);
    }
    assert_eq!(std::fs::metadata(&ra).unwrap().len(), 1 << 20);
    // qcow2 takes it (compared with qemu-img in iotests_resize.rs).
    let (a, _) = qcow2_twins(d.path(), "1M", &[]);
    let r = strata(&["resize", "--preallocation=metadata", s(&a), "2M"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(virtual_size(&a), 2 << 20);
}

/// Each refusal as qemu-img gives it, on a twin: exit 1, the message,
/// and neither file changed.
fn refused_like_qemu_img(a: &Path, b: &Path, opts: &[&str], size: &str, msg: &str) {
    let before = std::fs::read(a).unwrap();
    let mut q = vec!["resize"];
    q.extend(opts);
    let mut st = q.clone();
    q.extend([s(b), size]);
    st.extend([s(a), size]);
    let qr = qemu_img(&q);
    assert_eq!(qr.code, 1, "qemu-img {q:?}: {}", qr.stdout);
    assert!(qr.stderr.contains(msg), "qemu-img {q:?}: {}", qr.stderr);
    assert_fails_with(&strata(&st), 1, &[msg]);
    assert_eq!(std::fs::read(a).unwrap(), before, "{st:?} changed the file");
}

#[test]
fn resize_refuses_an_image_with_an_inconsistent_bitmap_like_qemu_img() {
    if !qemu_available() {
        return;
    }
    let d = tempdir();
    let (a, _) = qcow2_twins(d.path(), "1M", &[]);
    qemu_img_ok(&["bitmap", "--add", s(&a), "bm"]);
    // qemu-io killed while it has the image open leaves the bitmap in use.
    let r = std::process::Command::new("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-c",
            "write 0 64k",
            "-c",
            "sigraise 9",
            s(&a),
        ])
        .output()
        .unwrap();
    assert!(!r.status.success());
    let b = d.path().join("twin.qcow2");
    std::fs::copy(&a, &b).unwrap();
    let msg = "Bitmap 'bm' is inconsistent and cannot be used";
    refused_like_qemu_img(&a, &b, &[], "2M", msg);
    refused_like_qemu_img(&a, &b, &["--shrink"], "512k", msg);
}

#[test]
fn resize_refuses_a_v2_image_with_snapshots_like_qemu_img() {
    if !qemu_available() {
        return;
    }
    let d = tempdir();
    let a = d.path().join("a.qcow2");
    qemu_img_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "compat=0.10",
        s(&a),
        "1M",
    ]);
    qemu_img_ok(&["snapshot", "-c", "s", s(&a)]);
    let b = d.path().join("b.qcow2");
    std::fs::copy(&a, &b).unwrap();
    refused_like_qemu_img(
        &a,
        &b,
        &[],
        "2M",
        "Can't resize a v2 image which has snapshots",
    );
    // qemu-img's own checks come before the driver's.
    refused_like_qemu_img(&a, &b, &[], "1000", "Use the --shrink option");
}

#[test]
fn resize_shrink_then_grow_of_an_overlay_matches_qemu_img() {
    if !qemu_available() {
        return;
    }
    let d = tempdir();
    let base = d.path().join("base.qcow2");
    qemu_img_ok(&["create", "-q", "-f", "qcow2", s(&base), "2M"]);
    qemu_io("qcow2", &base, &["write -P 8 0 2M"]);
    let a = d.path().join("a.qcow2");
    let b = d.path().join("b.qcow2");
    for t in [&a, &b] {
        qemu_overlay(t, "base.qcow2");
        qemu_io("qcow2", t, &["write -P 6 512k 1M"]);
    }
    resize_both(&a, &b, &["--shrink", "700k"]);
    check_clean(&a);
    identical(&a, &b);
    resize_both(&a, &b, &["2M"]);
    check_clean(&a);
    identical(&a, &b);
    assert_eq!(map_shape(&a), map_shape(&b));
}
