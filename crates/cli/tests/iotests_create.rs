//! qemu-iotest 112's "refcount_bits limits" of image creation, on twins:
//! each `-o` is given to `qemu-img create` and to `strata create`; both
//! must refuse or accept it alike, a refusal must leave no image behind
//! in either tool, and an accepted image must check clean and report the
//! same refcount width to `qemu-img info`. The refusal messages differ in
//! words (Strata names the widths it accepts), not in what they refuse.

mod common;

use common::*;

/// The refcount width `qemu-img info` reports.
fn refcount_bits(img: &std::path::Path) -> u64 {
    let out = qemu_img_ok(&["info", "--output=json", "-U", s(img)]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["format-specific"]["data"]["refcount-bits"]
        .as_u64()
        .unwrap_or_else(|| panic!("{}: no refcount-bits in {out}", img.display()))
}

#[test]
fn iotest_112_refcount_bits_limits_of_create_match_qemu_img() {
    if !qemu_available() {
        return;
    }
    let dir = tempdir();
    let cases = [
        // The test's invalid widths: negative, zero, past 64, not a power of two.
        ("refcount_bits=-1", false),
        ("refcount_bits=0", false),
        ("refcount_bits=65", false),
        ("refcount_bits=42", false),
        // compat=0.10 only knows 16-bit refcounts.
        ("compat=0.10,refcount_bits=1", false),
        ("compat=0.10,refcount_bits=64", false),
        ("compat=0.10,refcount_bits=16", true),
        // Every valid width.
        ("refcount_bits=1", true),
        ("refcount_bits=2", true),
        ("refcount_bits=4", true),
        ("refcount_bits=8", true),
        ("refcount_bits=16", true),
        ("refcount_bits=32", true),
        ("refcount_bits=64", true),
    ];
    for (i, (opts, valid)) in cases.iter().enumerate() {
        let q = dir.path().join(format!("q{i}.qcow2"));
        let t = dir.path().join(format!("t{i}.qcow2"));
        let qr = qemu_img(&["create", "-q", "-f", "qcow2", "-o", opts, s(&q), "64M"]);
        let sr = strata(&["create", "-q", "-f", "qcow2", "-o", opts, s(&t), "64M"]);
        assert_eq!(qr.code == 0, *valid, "qemu-img -o {opts}: {}", qr.stderr);
        assert_eq!(
            (sr.code, t.exists()),
            (qr.code, q.exists()),
            "-o {opts}: strata {sr:?}, qemu-img {qr:?}"
        );
        if *valid {
            check_clean(&t);
            assert_eq!(refcount_bits(&t), refcount_bits(&q), "-o {opts}");
            let expect = opts
                .rsplit("refcount_bits=")
                .next()
                .and_then(|w| w.parse::<u64>().ok())
                .unwrap();
            assert_eq!(refcount_bits(&t), expect, "-o {opts}");
        } else {
            assert!(
                sr.stderr.contains("refcount") && sr.stderr.contains(s(&t)),
                "-o {opts}: the refusal names the file and the option: {}",
                sr.stderr
            );
        }
    }
}
