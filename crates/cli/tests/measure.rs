//! `strata measure` prints what `qemu-img measure` prints, byte for byte,
//! in both output formats, for new images of a size and for converting
//! existing images and chains, and refuses what qemu-img refuses.

mod common;

use std::path::{Path, PathBuf};

use common::*;

/// Runs both with the same arguments; the outputs (stdout, exit code)
/// must be equal.
fn same_as_qemu(args: &[&str]) -> String {
    let mut qa = vec!["measure"];
    qa.extend(args);
    let q = qemu_img(&qa);
    let r = strata(&qa);
    assert_eq!(
        r.code, q.code,
        "{args:?}: strata {}{} / qemu-img {}{}",
        r.stdout, r.stderr, q.stdout, q.stderr
    );
    assert_eq!(r.stdout, q.stdout, "{args:?}: {}", q.stderr);
    q.stdout
}

const OUTPUTS: &[&[&str]] = &[
    &["-O", "raw"],
    &["-O", "qcow2"],
    &["-O", "qcow2", "-o", "cluster_size=4k"],
    &["-O", "qcow2", "-o", "cluster_size=2M,refcount_bits=1"],
    &["-O", "qcow2", "-o", "compat=0.10"],
    &["-O", "qcow2", "-o", "extended_l2=on"],
    &["-O", "qcow2", "-o", "backing_file=other.qcow2"],
    &["-O", "qcow2", "-o", "preallocation=full"],
    &["-O", "qcow2", "-o", "preallocation=metadata"],
];

fn measure_each_way(img: &Path, extra: &[&str]) {
    for out in OUTPUTS {
        for fmt in ["human", "json"] {
            let mut a: Vec<&str> = extra.to_vec();
            a.extend(*out);
            a.extend(["--output", fmt, s(img)]);
            same_as_qemu(&a);
        }
    }
}

/// A 100 MiB qcow2 with data, a short write, a zero range and a run far in.
fn partly_written(dir: &Path) -> PathBuf {
    let img = dir.join("part.qcow2");
    qemu_img_ok(&["create", "-q", "-f", "qcow2", s(&img), "100M"]);
    qemu_io(
        "qcow2",
        &img,
        &[
            "write -P 1 0 1M",
            "write -P 2 5000k 3k",
            "write -z 2M 1M",
            "write -P 3 50M 100k",
        ],
    );
    img
}

#[test]
fn measure_size_matches_qemu_img() {
    if !qemu_available() {
        return;
    }
    for size in ["0", "1", "512", "1000", "1G", "1T", "3.5G"] {
        for out in OUTPUTS {
            for fmt in ["human", "json"] {
                let mut a: Vec<&str> = out.to_vec();
                a.extend(["--output", fmt, "--size", size]);
                same_as_qemu(&a);
            }
        }
    }
    let j = same_as_qemu(&["-O", "qcow2", "--output", "json", "--size", "1G"]);
    assert_eq!(
        j,
        "{\n    \"required\": 393216,\n    \"fully-allocated\": 1074135040\n}\n"
    );
}

#[test]
fn measure_an_empty_image_matches_qemu_img() {
    if !qemu_available() {
        return;
    }
    let d = tempdir();
    let img = d.path().join("empty.qcow2");
    qemu_img_ok(&["create", "-q", "-f", "qcow2", s(&img), "10M"]);
    measure_each_way(&img, &[]);
}

#[test]
fn measure_a_partly_written_image_counts_its_data_clusters_like_qemu_img() {
    if !qemu_available() {
        return;
    }
    let d = tempdir();
    let img = partly_written(d.path());
    measure_each_way(&img, &[]);
    measure_each_way(&img, &["-f", "qcow2"]);
}

#[test]
fn measure_a_compressed_image_matches_qemu_img() {
    if !qemu_available() {
        return;
    }
    let d = tempdir();
    let part = partly_written(d.path());
    let comp = d.path().join("comp.qcow2");
    qemu_img_ok(&["convert", "-c", "-O", "qcow2", s(&part), s(&comp)]);
    measure_each_way(&comp, &[]);
}

#[test]
fn measure_a_chain_counts_every_layers_data_like_qemu_img() {
    if !qemu_available() {
        return;
    }
    let d = tempdir();
    partly_written(d.path());
    let top = d.path().join("top.qcow2");
    qemu_img_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "part.qcow2",
        "-F",
        "qcow2",
        s(&top),
        "120M",
    ]);
    qemu_io(
        "qcow2",
        &top,
        &["write -P 4 70M 64k", "write -z 0 64k", "write -P 6 110M 1k"],
    );
    measure_each_way(&top, &[]);
    measure_each_way(&top, &["-U"]);
}

#[test]
fn measure_a_sparse_raw_input_counts_its_data_like_qemu_img() {
    if !qemu_available() {
        return;
    }
    let d = tempdir();
    let img = d.path().join("r.raw");
    qemu_img_ok(&["create", "-q", "-f", "raw", s(&img), "20M"]);
    qemu_io("raw", &img, &["write -P 5 1M 8k", "write -P 5 10M 1M"]);
    measure_each_way(&img, &["-f", "raw"]);
}

#[test]
fn measure_reports_persistent_bitmaps_like_qemu_img() {
    if !qemu_available() {
        return;
    }
    let d = tempdir();
    let img = d.path().join("bm.qcow2");
    qemu_img_ok(&["create", "-q", "-f", "qcow2", s(&img), "10M"]);
    qemu_img_ok(&["bitmap", "--add", s(&img), "b1"]);
    qemu_img_ok(&["bitmap", "--add", "-g", "512", s(&img), "a-longer-name"]);
    measure_each_way(&img, &[]);
    let j = same_as_qemu(&["-O", "qcow2", "--output", "json", s(&img)]);
    let v: serde_json::Value = serde_json::from_str(&j).unwrap();
    assert!(v["bitmaps"].as_u64().unwrap() > 0, "{j}");
}

#[test]
fn measure_refuses_what_qemu_img_refuses() {
    if !qemu_available() {
        return;
    }
    let d = tempdir();
    let img = partly_written(d.path());
    let cases: &[(&[&str], &str)] = &[
        (
            &["-O", "qcow2", "-o", "cluster_size=512", "--size", "1T"],
            "The image size is too large (try using a larger cluster size)",
        ),
        (
            &["-O", "qcow2", "-o", "cluster_size=1000", "--size", "1G"],
            "Cluster size must be a power of two between 512 and 2048k",
        ),
        (
            &["-O", "qcow2", "-o", "foo=1", "--size", "1G"],
            "Invalid parameter 'foo'",
        ),
        (
            &["-O", "raw", "-o", "cluster_size=4k", "--size", "1G"],
            "Invalid parameter 'cluster_size'",
        ),
        (
            &["-O", "qcow2", "-o", "refcount_bits=3", "--size", "1G"],
            "Refcount width must be a power of two and may not exceed 64 bits",
        ),
        (
            &[
                "-O",
                "qcow2",
                "-o",
                "compat=0.10,refcount_bits=8",
                "--size",
                "1G",
            ],
            "Different refcount widths than 16 bits require compatibility level 1.1 or above",
        ),
        (
            &[
                "-O",
                "qcow2",
                "-o",
                "cluster_size=4k,extended_l2=on",
                "--size",
                "1G",
            ],
            "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes",
        ),
        (
            &["-O", "qcow2", "--size", "1G", s(&img)],
            "--size N cannot be used together with a filename.",
        ),
        (
            &["-O", "qcow2"],
            "Either --size N or one filename must be specified.",
        ),
        (&["--size", "1X"], "Invalid image size specified: '1X'."),
        (
            &["--size", "-5"],
            "Invalid image size specified. Must be between 0 and 9223372036854775807.",
        ),
    ];
    for (args, msg) in cases {
        let mut qa = vec!["measure"];
        qa.extend(*args);
        let q = qemu_img(&qa);
        assert_eq!(q.code, 1, "qemu-img {args:?}");
        assert!(q.stderr.contains(msg), "qemu-img {args:?}: {}", q.stderr);
        assert_fails_with(&strata(&qa), 1, &[msg]);
    }
}

#[test]
fn measure_a_metadata_preallocated_input_skips_its_holes_like_qemu_img() {
    if !qemu_available() {
        return;
    }
    // Every cluster is allocated, but only the written ones hold data in
    // the file: QEMU's block status reports the rest as zeros, which
    // measure does not count.
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("pre.qcow2");
    qemu_img_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "preallocation=metadata",
        s(&img),
        "64M",
    ]);
    qemu_io("qcow2", &img, &["write -P 7 1M 128k", "write -P 8 40M 64k"]);
    let out = same_as_qemu(&["-O", "qcow2", "--output", "json", s(&img)]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    // Far less than the 64 MiB every cluster would count for.
    assert!(v["required"].as_u64().unwrap() < 8 << 20, "{out}");
    measure_each_way(&img, &[]);
}
