//! `strata convert` options against `qemu-img convert` on twins (iotest
//! 122's cases: -B, -S, -n, compressed output, zero detection; and -C, -W,
//! -t, --target-is-zero, several sources, a depth-200 chain): the same
//! command runs through both tools on the same sources, and the outputs
//! must show the same guest data, pass `qemu-img check`, and, where the
//! layout is the point, have the same `qemu-img map` (host offsets aside).

mod common;

use std::path::{Path, PathBuf};

use common::*;

/// A chain of iotest 122's kind: a 4 MiB base with data, an overlay with
/// data, a zero write, a cluster written with zeros (data that reads as
/// zeros: zero detection) and a cluster half zeros, half data.
fn chain(dir: &Path) -> (PathBuf, PathBuf) {
    let base = dir.join("base.qcow2");
    let top = dir.join("top.qcow2");
    qemu_img_ok(&["create", "-q", "-f", "qcow2", s(&base), "4M"]);
    qemu_io(
        "qcow2",
        &base,
        &["write -P 1 0 1M", "write -P 2 2M 512k", "write -P 0 3M 64k"],
    );
    qemu_overlay(&top, "base.qcow2");
    qemu_io(
        "qcow2",
        &top,
        &[
            "write -P 3 1M 128k",
            "write -z 0 64k",
            "write -P 0 1536k 64k",
            "write -P 4 2112k 32k",
            "write -P 5 3840k 4k",
        ],
    );
    (base, top)
}

/// Runs `convert ARGS.. SRCS.. OUT` through qemu-img (into `q-NAME`) and
/// strata (into `s-NAME`); both must succeed. Returns the two outputs.
fn twins(dir: &Path, args: &[&str], srcs: &[&Path], name: &str) -> (PathBuf, PathBuf) {
    let q = dir.join(format!("q-{name}"));
    let st = dir.join(format!("s-{name}"));
    let mut qa = vec!["convert"];
    qa.extend_from_slice(args);
    qa.extend(srcs.iter().map(|p| s(p)));
    let mut sa = qa.clone();
    qa.push(s(&q));
    sa.push(s(&st));
    qemu_img_ok(&qa);
    let r = strata(&sa);
    assert_eq!(r.code, 0, "strata {sa:?}: {}", r.stderr);
    (q, st)
}

/// `qemu-img map --output json` of `img`, without host offsets.
fn layout(img: &Path, fmt: &str) -> Vec<serde_json::Value> {
    let out = qemu_img_ok(&["map", "-f", fmt, "--output", "json", s(img)]);
    let mut v: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    for e in &mut v {
        e.as_object_mut().unwrap().remove("offset");
    }
    v
}

/// Both outputs read like `src`, pass check (qcow2) and map alike.
fn same_result(q: &Path, st: &Path, src: &Path, fmt: &str) {
    identical(q, st);
    identical(src, st);
    if fmt == "qcow2" {
        check_clean(st);
    }
    assert_eq!(layout(q, fmt), layout(st, fmt), "{}", st.display());
}

/// Both tools refuse `convert ARGS.. DIR/x.EXT`, strata naming the cause
/// and creating nothing (qemu-img leaves an empty output behind for some
/// refusals, such as a bad `-t`: removed here).
fn both_refuse(dir: &Path, args: &[&str], ext: &str, needle: &str) {
    let out = dir.join(format!("x.{ext}"));
    let mut a = vec!["convert"];
    a.extend_from_slice(args);
    a.push(s(&out));
    let r = strata(&a);
    assert_fails_with(&r, 1, &[needle]);
    assert!(!out.exists(), "strata left {} behind", out.display());
    let q = qemu_img(&a);
    assert_ne!(q.code, 0, "qemu-img accepted {a:?}");
    assert!(q.stderr.contains(needle), "qemu-img: {}", q.stderr);
    let _ = std::fs::remove_file(&out);
}

#[test]
fn iotest_122_default_convert_skips_zeros_as_qemu_img_does() {
    if !qemu_available() {
        return;
    }
    let dir = tempdir();
    let (_, top) = chain(dir.path());
    for fmt in ["qcow2", "raw"] {
        let (q, st) = twins(dir.path(), &["-O", fmt], &[&top], fmt);
        same_result(&q, &st, &top, fmt);
    }
}

#[test]
fn iotest_122_sparse_size_matches_qemu_img_and_zero_fully_allocates() {
    if !qemu_available() {
        return;
    }
    let dir = tempdir();
    let (_, top) = chain(dir.path());
    for (i, sz) in ["0", "512", "8k", "64k", "1M"].iter().enumerate() {
        for fmt in ["qcow2", "raw"] {
            let (q, st) = twins(
                dir.path(),
                &["-O", fmt, "-S", sz],
                &[&top],
                &format!("{i}.{fmt}"),
            );
            same_result(&q, &st, &top, fmt);
        }
    }
    // -S 0: one data extent over the whole disk.
    let (_, st) = twins(dir.path(), &["-O", "qcow2", "-S", "0"], &[&top], "full");
    let map = layout(&st, "qcow2");
    assert_eq!(map.len(), 1, "{map:?}");
    assert_eq!(map[0]["data"], true);
    let t = s(&top);
    both_refuse(
        dir.path(),
        &["-O", "raw", "-S", "100", t],
        "raw",
        "Invalid buffer size",
    );
    both_refuse(
        dir.path(),
        &["-O", "raw", "-S", "32M", t],
        "raw",
        "Invalid buffer size",
    );
}

#[test]
fn iotest_122_backing_target_holds_only_the_top_images_allocation() {
    if !qemu_available() {
        return;
    }
    let dir = tempdir();
    let (base, top) = chain(dir.path());
    let args = ["-O", "qcow2", "-B", "base.qcow2", "-F", "qcow2"];
    let (q, st) = twins(dir.path(), &args, &[&top], "b.qcow2");
    same_result(&q, &st, &top, "qcow2");
    let info = |p: &Path| {
        let v: serde_json::Value =
            serde_json::from_str(&qemu_img_ok(&["info", "--output", "json", s(p)])).unwrap();
        (
            v["backing-filename"].clone(),
            v["backing-filename-format"].clone(),
        )
    };
    assert_eq!(info(&q), info(&st));
    assert_eq!(info(&st).0, "base.qcow2");
    // A flat source: everything it shows is written, zeros as zeros.
    let flat = dir.path().join("flat.qcow2");
    qemu_img_ok(&["convert", "-O", "qcow2", s(&top), s(&flat)]);
    let (q, st) = twins(dir.path(), &args, &[&flat], "bflat.qcow2");
    same_result(&q, &st, &top, "qcow2");
    // Compressed, with a backing file (iotest 122's first case).
    let mut c = args.to_vec();
    c.push("-c");
    let (q, st) = twins(dir.path(), &c, &[&top], "bc.qcow2");
    same_result(&q, &st, &top, "qcow2");
    let _ = base;
    both_refuse(
        dir.path(),
        &["-O", "qcow2", "-B", "base.qcow2", s(&top)],
        "qcow2",
        "explicit backing format",
    );
}

#[test]
fn iotest_122_compressed_output_maps_as_qemu_imgs() {
    if !qemu_available() {
        return;
    }
    let dir = tempdir();
    let (_, top) = chain(dir.path());
    let (q, st) = twins(dir.path(), &["-O", "qcow2", "-c"], &[&top], "c.qcow2");
    same_result(&q, &st, &top, "qcow2");
    assert!(layout(&st, "qcow2").iter().any(|e| e["compressed"] == true));
}

#[test]
fn iotest_122_existing_target_is_overwritten_in_place() {
    if !qemu_available() {
        return;
    }
    let dir = tempdir();
    let (_, top) = chain(dir.path());
    for fmt in ["qcow2", "raw"] {
        // Targets full of other data: everything must be overwritten.
        let q = dir.path().join(format!("q-n.{fmt}"));
        let st = dir.path().join(format!("s-n.{fmt}"));
        for t in [&q, &st] {
            qemu_img_ok(&["create", "-q", "-f", fmt, s(t), "4M"]);
            qemu_io(fmt, t, &["write -P 9 0 4M"]);
        }
        qemu_img_ok(&["convert", "-n", "-O", fmt, s(&top), s(&q)]);
        let r = strata(&["convert", "-n", "-O", fmt, s(&top), s(&st)]);
        assert_eq!(r.code, 0, "{}", r.stderr);
        identical(&q, &st);
        identical(&top, &st);
        if fmt == "qcow2" {
            check_clean(&st);
        }
    }
    // A fresh target and --target-is-zero: zeros are left as they are.
    for fmt in ["qcow2", "raw"] {
        let q = dir.path().join(format!("q-z.{fmt}"));
        let st = dir.path().join(format!("s-z.{fmt}"));
        for t in [&q, &st] {
            qemu_img_ok(&["create", "-q", "-f", fmt, s(t), "4M"]);
        }
        let a = ["-n", "--target-is-zero", "-O", fmt];
        let mut qa = vec!["convert"];
        qa.extend_from_slice(&a);
        qa.extend([s(&top), s(&q)]);
        qemu_img_ok(&qa);
        let mut sa = vec!["convert"];
        sa.extend_from_slice(&a);
        sa.extend([s(&top), s(&st)]);
        let r = strata(&sa);
        assert_eq!(r.code, 0, "{}", r.stderr);
        same_result(&q, &st, &top, fmt);
    }
    let small = dir.path().join("small.raw");
    qemu_img_ok(&["create", "-q", "-f", "raw", s(&small), "1M"]);
    let a = ["convert", "-n", "-O", "raw", s(&top), s(&small)];
    let q = qemu_img(&a);
    assert!(
        q.stderr.contains("output file is smaller than input file"),
        "{}",
        q.stderr
    );
    let r = strata(&a);
    assert_fails_with(&r, 1, &["output file is smaller than input file"]);
    both_refuse(
        dir.path(),
        &["--target-is-zero", "-O", "raw", s(&top)],
        "raw",
        "--target-is-zero requires use of -n flag",
    );
}

#[test]
fn copy_offload_copies_and_is_refused_where_qemu_img_refuses_it() {
    if !qemu_available() {
        return;
    }
    let dir = tempdir();
    let (_, top) = chain(dir.path());
    for fmt in ["qcow2", "raw"] {
        let (q, st) = twins(dir.path(), &["-C", "-O", fmt], &[&top], &format!("C.{fmt}"));
        identical(&q, &st);
        identical(&top, &st);
        if fmt == "qcow2" {
            check_clean(&st);
        }
    }
    let t = s(&top);
    both_refuse(
        dir.path(),
        &["-C", "-c", "-O", "qcow2", t],
        "qcow2",
        "Cannot enable copy offloading when -c is used",
    );
    both_refuse(
        dir.path(),
        &["-C", "-S", "4k", "-O", "raw", t],
        "raw",
        "Cannot enable copy offloading when -S is used",
    );
}

#[test]
fn out_of_order_and_every_cache_mode_give_the_same_image() {
    if !qemu_available() {
        return;
    }
    let dir = tempdir();
    let (_, top) = chain(dir.path());
    // -W: qemu-img's host layout follows its write order, so its map
    // splits where host offsets jump; the guest data is the point.
    let (q, st) = twins(dir.path(), &["-W", "-O", "qcow2"], &[&top], "W.qcow2");
    identical(&q, &st);
    identical(&top, &st);
    check_clean(&st);
    for mode in ["none", "writeback", "unsafe", "directsync", "writethrough"] {
        for fmt in ["qcow2", "raw"] {
            let (q, st) = twins(
                dir.path(),
                &["-t", mode, "-T", mode, "-O", fmt],
                &[&top],
                &format!("t-{mode}.{fmt}"),
            );
            same_result(&q, &st, &top, fmt);
        }
    }
    both_refuse(
        dir.path(),
        &["-t", "bogus", "-O", "raw", s(&top)],
        "raw",
        "Invalid cache option",
    );
}

#[test]
fn iotest_122_several_sources_are_concatenated() {
    if !qemu_available() {
        return;
    }
    let dir = tempdir();
    let (_, top) = chain(dir.path());
    let raw = dir.path().join("b.raw");
    qemu_img_ok(&["create", "-q", "-f", "raw", s(&raw), "1M"]);
    qemu_io("raw", &raw, &["write -P 7 64k 64k"]);
    for fmt in ["qcow2", "raw"] {
        let q = dir.path().join(format!("q-cat.{fmt}"));
        let st = dir.path().join(format!("s-cat.{fmt}"));
        // qemu-img needs -f per source only when they differ: raw for the
        // second is probed (qemu-img warns); strata probes the top too.
        qemu_img_ok(&["convert", "-O", fmt, s(&top), s(&raw), s(&q)]);
        let r = strata(&["convert", "-O", fmt, s(&top), s(&raw), s(&st)]);
        assert_eq!(r.code, 0, "{}", r.stderr);
        identical(&q, &st);
        if fmt == "qcow2" {
            check_clean(&st);
        }
        assert_eq!(layout(&q, fmt), layout(&st, fmt));
    }
}

#[test]
fn a_depth_200_chain_maps_lists_and_converts_as_with_qemu_img() {
    if !qemu_available() {
        return;
    }
    let dir = tempdir();
    let p = |i: u32| dir.path().join(format!("l{i}.qcow2"));
    qemu_img_ok(&["create", "-q", "-f", "qcow2", s(&p(0)), "4M"]);
    qemu_io("qcow2", &p(0), &["write -P 1 0 1M"]);
    for i in 1..200 {
        let below = format!("l{}.qcow2", i - 1);
        qemu_overlay(&p(i), &below);
        if i % 50 == 0 {
            qemu_io(
                "qcow2",
                &p(i),
                &[&format!("write -P {} {}k 64k", i % 250, i * 8)],
            );
        }
    }
    let top = p(199);
    qemu_io("qcow2", &top, &["write -P 9 2M 64k"]);
    let expected = qemu_img_ok(&["map", "--output", "json", s(&top)]);
    let r = strata(&["map", "--output", "json", s(&top)]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.stdout, expected);
    let r = strata(&["info", "--backing-chain", "--output", "json", s(&top)]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let v: Vec<serde_json::Value> = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v.len(), 200);
    for fmt in ["qcow2", "raw"] {
        let (q, st) = twins(dir.path(), &["-O", fmt], &[&top], &format!("deep.{fmt}"));
        same_result(&q, &st, &top, fmt);
    }
}

#[test]
fn a_32_tib_overlay_is_walked_in_steps_that_follow_the_data() {
    if !qemu_available() {
        return;
    }
    let dir = tempdir();
    chain(dir.path());
    let big = dir.path().join("big.qcow2");
    qemu_img_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "top.qcow2",
        "-F",
        "qcow2",
        s(&big),
        "32T",
    ]);
    let expected = qemu_img_ok(&["map", "--output", "json", s(&big)]);
    let r = strata(&["map", "--output", "json", s(&big)]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.stdout, expected);
    // Block status steps: a few per extent of data, not one per L2 span
    // of the 32 TiB (65,536 of them).
    let chain = strata_image::Chain::open(&big, &strata_image::OpenOptions::default()).unwrap();
    let steps = chain.block_status(0, chain.virtual_size()).count();
    let entries = expected.lines().count();
    assert!(
        steps <= 4 * entries,
        "{steps} steps for {entries} map entries"
    );
    let (q, st) = twins(dir.path(), &["-O", "qcow2"], &[&big], "big.qcow2");
    same_result(&q, &st, &big, "qcow2");
}
