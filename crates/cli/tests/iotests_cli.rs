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

fn blocks_of(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).unwrap().blocks() * 512
}

/// Issue 15 defect 11: `create -o preallocation=metadata|falloc|full`, as
/// qemu-img: the same map, the same guest view, a clean image; `metadata`
/// leaves the data area sparse, `falloc` and `full` give it disk space.
#[test]
fn create_preallocation_modes_match_qemu_img() {
    if !qemu_available() {
        return;
    }
    let dir = tempdir();
    let (q, st) = (dir.path().join("q.qcow2"), dir.path().join("s.qcow2"));
    for mode in ["metadata", "falloc", "full"] {
        for extra in ["", ",extended_l2=on", ",compat=0.10"] {
            let o = format!("preallocation={mode}{extra}");
            qemu_img_ok(&["create", "-q", "-f", "qcow2", "-o", &o, s(&q), "4M"]);
            let r = strata(&["create", "-q", "-f", "qcow2", "-o", &o, s(&st), "4M"]);
            assert_eq!(r.code, 0, "{o}: {}", r.stderr);
            assert_eq!(
                json(&qemu_img_ok(&["map", "--output", "json", s(&st)]), "map"),
                json(&qemu_img_ok(&["map", "--output", "json", s(&q)]), "map"),
                "{o}: maps differ"
            );
            assert_eq!(qemu_img(&["check", s(&st)]).code, 0, "{o}");
            assert_eq!(qemu_img(&["compare", s(&q), s(&st)]).code, 0, "{o}");
            let data = 4 << 20;
            if mode == "metadata" {
                assert!(blocks_of(&st) < data, "{o}: the data area is sparse");
            } else {
                assert!(blocks_of(&st) >= data, "{o}: the data area has disk space");
            }
        }
    }
}

/// Issue 15 defect 4: preallocation with a backing file. Standard L2
/// entries would hide the backing data: qemu-img refuses, with these
/// words; so does Strata (writing nothing). With extended L2 entries the
/// guest reads the backing file, as in QEMU.
#[test]
fn create_preallocation_with_a_backing_file_matches_qemu_img() {
    if !qemu_available() {
        return;
    }
    let dir = tempdir();
    let base = dir.path().join("b.qcow2");
    qemu_img_ok(&["create", "-q", "-f", "qcow2", s(&base), "1M"]);
    qemu_io("qcow2", &base, &["write -P 7 0 1M"]);
    let (q, st) = (dir.path().join("q.qcow2"), dir.path().join("s.qcow2"));
    for mode in ["metadata", "falloc", "full"] {
        let o = format!("preallocation={mode}");
        let args = |img: &Path, o: &str| {
            vec![
                "create".to_string(),
                "-q".into(),
                "-f".into(),
                "qcow2".into(),
                "-b".into(),
                "b.qcow2".into(),
                "-F".into(),
                "qcow2".into(),
                "-o".into(),
                o.to_string(),
                s(img).to_string(),
                "1M".into(),
            ]
        };
        let qa = args(&q, &o);
        let sa = args(&st, &o);
        let qr = qemu_img(&qa.iter().map(String::as_str).collect::<Vec<_>>());
        let sr = strata(&sa.iter().map(String::as_str).collect::<Vec<_>>());
        assert_eq!(qr.code, 1, "{o}");
        assert_eq!(sr.code, 1, "{o}");
        let words = "Backing file and preallocation can only be used at the same time if \
                     extended_l2 is on";
        assert!(
            qr.stderr.contains(words) && sr.stderr.contains(words),
            "{o}: {}",
            sr.stderr
        );
        assert!(!st.exists(), "{o}: nothing written");

        let o = format!("preallocation={mode},extended_l2=on");
        let qa = args(&q, &o);
        let sa = args(&st, &o);
        qemu_img_ok(&qa.iter().map(String::as_str).collect::<Vec<_>>());
        let sr = strata(&sa.iter().map(String::as_str).collect::<Vec<_>>());
        assert_eq!(sr.code, 0, "{o}: {}", sr.stderr);
        qemu_io("qcow2", &st, &["read -P 7 0 1M"]);
        assert_eq!(qemu_img(&["compare", s(&q), s(&st)]).code, 0, "{o}");
        assert_eq!(
            json(&qemu_img_ok(&["map", "--output", "json", s(&st)]), "map"),
            json(&qemu_img_ok(&["map", "--output", "json", s(&q)]), "map"),
            "{o}: maps differ"
        );
        assert_eq!(qemu_img(&["check", s(&st)]).code, 0, "{o}");
        std::fs::remove_file(&st).unwrap();
    }
}

/// 138: a data cluster at 32 PB of a 512-byte-cluster image (the image
/// "has" a multiple of 2^32 clusters). `strata check` reports exactly what
/// `qemu-img check` reports (no allocation sized by the offset, no
/// truncated count); `check -r all` gives the same verdict on twins.
#[test]
fn iotest_138_check_on_an_image_with_a_multiple_of_2_32_clusters() {
    if !qemu_available() {
        return;
    }
    let dir = tempdir();
    let (q, st) = (dir.path().join("q.qcow2"), dir.path().join("s.qcow2"));
    qemu_img_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=512",
        s(&q),
        "512",
    ]);
    qemu_io("qcow2", &q, &["write 0 512"]);
    poke(&q, 2048, b"\x80\x80\x00\x00\x00\x00\x00\x00");
    std::fs::copy(&q, &st).unwrap();
    let qr = qemu_img(&["check", s(&q)]);
    let sr = strata(&["check", s(&st)]);
    assert_eq!(
        (sr.code, &sr.stdout, &sr.stderr),
        (qr.code, &qr.stdout, &qr.stderr)
    );
    let qr = qemu_img(&["check", "-r", "all", s(&q)]);
    let sr = strata(&["check", "-r", "all", s(&st)]);
    assert_eq!(sr.code, qr.code, "{}", sr.stderr);
    assert_eq!(qemu_img(&["compare", s(&q), s(&st)]).code, 0);
}

/// 122's "full allocation" images converted without `-S` (which Strata
/// does not have): a standalone image with data and zero-filled data, and
/// an overlay over a half-written base, each converted to qcow2 plain and
/// compressed (`-c`). The output maps and reads as qemu-img's output.
#[test]
fn iotest_122_convert_and_convert_c_match_qemu_img() {
    if !qemu_available() {
        return;
    }
    let dir = tempdir();
    let (src, base) = (dir.path().join("t.qcow2"), dir.path().join("t.qcow2.base"));
    let (q, st) = (dir.path().join("q.orig"), dir.path().join("s.orig"));
    for backed in [false, true] {
        if backed {
            qemu_img_ok(&["create", "-q", "-f", "qcow2", s(&base), "64M"]);
            qemu_io("qcow2", &base, &["write -P 0x11 0 32M"]);
            qemu_img_ok(&[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                "t.qcow2.base",
                "-F",
                "qcow2",
                s(&src),
                "64M",
            ]);
            qemu_io("qcow2", &src, &["write -P 0x22 0 3M"]);
        } else {
            qemu_img_ok(&["create", "-q", "-f", "qcow2", s(&src), "64M"]);
            qemu_io("qcow2", &src, &["write -P 0x22 0 3M", "write -P 0 3M 3M"]);
        }
        for compress in [false, true] {
            let mut qa = vec!["convert", "-O", "qcow2"];
            if compress {
                qa.push("-c");
            }
            let mut sa = qa.clone();
            qa.extend([s(&src), s(&q)]);
            sa.extend([s(&src), s(&st)]);
            qemu_img_ok(&qa);
            let r = strata(&sa);
            assert_eq!(r.code, 0, "{sa:?}: {}", r.stderr);
            assert_eq!(
                json(&qemu_img_ok(&["map", "--output", "json", s(&st)]), "map"),
                json(&qemu_img_ok(&["map", "--output", "json", s(&q)]), "map"),
                "backed {backed}, -c {compress}: maps differ"
            );
            assert_eq!(qemu_img(&["compare", s(&q), s(&st)]).code, 0);
            assert_eq!(qemu_img(&["check", s(&st)]).code, 0);
        }
    }
}

/// The metadata-preallocation heuristic behind `map` walks refcounts: a
/// 1 TiB sparse file whose 8 MiB refcount table names one empty block a
/// million times must not make it walk 2^24 clusters one by one. The map
/// is qemu-img's, in well under a second.
#[test]
fn map_of_a_sparse_file_with_a_huge_empty_refcount_table_is_fast() {
    if !qemu_available() {
        return;
    }
    let dir = tempdir();
    let img = dir.path().join("h.qcow2");
    qemu_img_ok(&["create", "-q", "-f", "qcow2", s(&img), "64M"]);
    qemu_io("qcow2", &img, &["write 0 64k"]);
    let mut rt = 0x20000u64.to_be_bytes().to_vec();
    for _ in 1..128 * 8192 {
        rt.extend_from_slice(&0x200_0000u64.to_be_bytes());
    }
    poke(&img, 0x10_0000, &rt);
    let mut h = 0x10_0000u64.to_be_bytes().to_vec();
    h.extend_from_slice(&128u32.to_be_bytes());
    poke(&img, 48, &h);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(1 << 40)
        .unwrap();
    let started = std::time::Instant::now();
    let r = strata(&["map", "--output", "json", s(&img)]);
    assert!(started.elapsed().as_secs() < 5, "{:?}", started.elapsed());
    assert_eq!(r.code, 0, "{}", r.stderr);
    let q = qemu_img_ok(&["map", "--output", "json", s(&img)]);
    assert_eq!(json(&r.stdout, "strata map"), json(&q, "qemu-img map"));
}

/// The L2 entries (word with the host offset reduced to "has one", and
/// bitmap) of the first L2 table of `img`.
fn l2_shape(img: &Path) -> Vec<(u64, u64)> {
    let b = std::fs::read(img).unwrap();
    let be = |at: usize| u64::from_be_bytes(b[at..at + 8].try_into().unwrap());
    let extended = be(72) & 16 != 0;
    let l2 = (be(be(40) as usize) & 0x00ff_ffff_ffff_fe00) as usize;
    let (step, n) = if extended { (16, 4096) } else { (8, 8192) };
    if l2 == 0 {
        // No table maps as a table of empty entries (QEMU allocates one
        // for a v2 zero write over unallocated clusters; Strata does not).
        return vec![(0, 0); n];
    }
    (0..n)
        .map(|i| {
            let w = be(l2 + step * i);
            let flags = w & (3 << 62 | 1);
            let host = u64::from(w & !(3 << 62 | 1) != 0) << 8;
            let bitmap = if extended { be(l2 + step * i + 8) } else { 0 };
            (flags | host, bitmap)
        })
        .collect()
}

/// `qemu-img map --output json` without host offsets (QEMU and Strata
/// may place new clusters differently), equal neighbours merged.
fn map_shape(img: &Path) -> Vec<serde_json::Value> {
    let v = json(
        &qemu_img_ok(&["map", "-U", "--output", "json", s(img)]),
        "qemu-img map",
    );
    let mut out: Vec<serde_json::Value> = Vec::new();
    for mut e in v.as_array().unwrap().clone() {
        e.as_object_mut().unwrap().remove("offset");
        let key = |e: &serde_json::Value| {
            let mut o = e.as_object().unwrap().clone();
            o.remove("start");
            o.remove("length");
            o
        };
        if let Some(last) = out.last_mut() {
            if key(last) == key(&e) {
                let len = last["length"].as_u64().unwrap() + e["length"].as_u64().unwrap();
                last["length"] = len.into();
                continue;
            }
        }
        out.push(e);
    }
    out
}

/// Issue 15 defect 8 through the CLI: the same qemu-io command lines
/// (271's zero-write patterns: cluster-aligned, subcluster-aligned and
/// unaligned `write -z` and `write -z -u` over unallocated and allocated
/// clusters, a discard) given to `qemu-io` on one twin and to `strata io`
/// on the other, on extended-L2, v3 and v2 images, with and without a
/// raw backing file full of 0xff. After each command: the same map
/// (without offsets), the same L2 entries and bitmaps, the same guest
/// view, both clean.
#[test]
fn write_zeroes_allocation_decisions_of_strata_io_match_qemu_io() {
    if !qemu_available() {
        return;
    }
    let cmds = [
        "write -z 0 192k",
        "write -z 208k 128k",
        "write -z 415k 128k",
        "write -P 7 576k 576k",
        "write -z 576k 192k",
        "write -z -u 800k 128k",
        "write -z 991k 128k",
        "write -z -u 1200k 3k",
        "discard 1024k 128k",
        "write -z 2048k 35k",
    ];
    for opts in ["extended_l2=on", "compat=1.1", "compat=0.10"] {
        for backing in [false, true] {
            let d = tempdir();
            let (q, st) = (d.path().join("q.qcow2"), d.path().join("s.qcow2"));
            let mut o = opts.to_string();
            if backing {
                let base = d.path().join("base.raw");
                qemu_img_ok(&["create", "-q", "-f", "raw", s(&base), "2083k"]);
                qemu_io("raw", &base, &["write -P 0xff 0 2083k"]);
                o.push_str(",backing_file=base.raw,backing_fmt=raw");
            }
            qemu_img_ok(&["create", "-q", "-f", "qcow2", "-o", &o, s(&q), "2083k"]);
            std::fs::copy(&q, &st).unwrap();
            for cmd in cmds {
                let what = format!("{opts}, backing {backing}: {cmd}");
                qemu_io("qcow2", &q, &[cmd]);
                let r = strata(&["io", "-c", cmd, s(&st)]);
                assert_eq!(r.code, 0, "{what}: {}", r.stderr);
                assert_eq!(map_shape(&q), map_shape(&st), "{what}: maps differ");
                assert!(l2_shape(&q) == l2_shape(&st), "{what}: L2 entries differ");
                identical(&q, &st);
                check_clean(&q);
                check_clean(&st);
            }
        }
    }
}
