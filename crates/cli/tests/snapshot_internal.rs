//! `strata snapshot-internal` and `strata convert -l` against `qemu-img
//! snapshot` and `qemu-img convert -l`, on twin images: the same output
//! text, the same exit codes and messages, images that check clean and
//! read the same.

mod common;

use std::path::{Path, PathBuf};

use common::*;

/// An image with data and a compressed cluster, and its twin.
fn twins(dir: &Path) -> (PathBuf, PathBuf) {
    let q = dir.join("q.qcow2");
    let t = dir.join("t.qcow2");
    qemu_img_ok(&["create", "-q", "-f", "qcow2", s(&q), "4M"]);
    qemu_io(
        "qcow2",
        &q,
        &[
            "write -P 0x11 0 300k",
            "write -c -P 0x12 1M 64k",
            "write -z 2M 64k",
        ],
    );
    std::fs::copy(&q, &t).unwrap();
    (q, t)
}

/// stderr without the program's prefix.
fn message(stderr: &str) -> String {
    stderr
        .trim()
        .trim_start_matches("strata: ")
        .trim_start_matches("qemu-img: ")
        .to_string()
}

fn convert_l(tool: &str, img: &Path, snap: &str, out: &Path) -> i32 {
    let args = ["convert", "-U", "-l", snap, "-O", "raw", s(img), s(out)];
    if tool == "qemu-img" {
        qemu_img(&args).code
    } else {
        strata(&args).code
    }
}

fn same_bytes(a: &Path, b: &Path) {
    assert!(
        std::fs::read(a).unwrap() == std::fs::read(b).unwrap(),
        "{} and {} differ",
        a.display(),
        b.display()
    );
}

#[test]
fn the_lifecycle_matches_qemu_img_snapshot_step_by_step() {
    if !qemu_available() {
        return;
    }
    let dir = tempdir();
    let (q, t) = twins(dir.path());
    let steps: &[&[&str]] = &[
        &["-c", "one"],
        &["-c", "two"],
        &["-c", "one"],
        &["-a", "2"],
        &["-a", "one"],
        &["-d", "one"],
        &["-c", "three"],
        &["-d", "two"],
    ];
    for (i, step) in steps.iter().enumerate() {
        // Change the guest data between steps, the same way on both.
        for p in [&q, &t] {
            let at = format!("write -P {} {}k 64k", 0x40 + i, 128 * i);
            qemu_io("qcow2", p, &[&at]);
        }
        let mut qa = vec!["snapshot"];
        qa.extend_from_slice(step);
        qa.push(s(&q));
        qemu_img_ok(&qa);
        let mut sa = vec!["snapshot-internal"];
        sa.extend_from_slice(step);
        sa.push(s(&t));
        let r = strata(&sa);
        assert_eq!(r.code, 0, "{step:?}: {}", r.stderr);
        assert!(r.stdout.is_empty(), "{step:?} printed {}", r.stdout);
        check_clean(&t);
        identical(&q, &t);
        // The listings differ only in the dates (taken at other moments).
        let ql = qemu_img_ok(&["snapshot", "-l", s(&q)]);
        let sl = strata(&["snapshot-internal", "-l", s(&t)]).stdout;
        let cut = |l: &str| {
            l.lines()
                .map(|x| {
                    let f: Vec<&str> = x.split_whitespace().collect();
                    format!("{:?}", f.iter().take(4).collect::<Vec<_>>())
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(cut(&sl), cut(&ql), "{step:?}");
        // Every snapshot's view, by qemu-img convert -l and by strata's.
        for line in ql.lines().skip(2) {
            let id = line.split_whitespace().next().unwrap();
            let (a, b, c) = (
                dir.path().join("a.raw"),
                dir.path().join("b.raw"),
                dir.path().join("c.raw"),
            );
            let sel = format!("snapshot.id={id}");
            assert_eq!(convert_l("qemu-img", &q, &sel, &a), 0);
            assert_eq!(convert_l("qemu-img", &t, &sel, &b), 0);
            assert_eq!(convert_l("strata", &t, &sel, &c), 0);
            same_bytes(&a, &b);
            same_bytes(&a, &c);
        }
    }
}

#[test]
fn the_list_is_qemu_img_snapshot_l_byte_for_byte() {
    if !qemu_available() {
        return;
    }
    let dir = tempdir();
    let (q, _) = twins(dir.path());
    // Nothing at all without snapshots.
    assert_eq!(strata(&["snapshot-internal", "-l", s(&q)]).stdout, "");
    qemu_img_ok(&["snapshot", "-c", "by-qemu", s(&q)]);
    assert_eq!(
        strata(&["snapshot-internal", "-c", "by-strata", s(&q)]).code,
        0
    );
    qemu_img_ok(&["snapshot", "-c", "by-strata", s(&q)]);
    // Columns are padded by bytes, as C pads them.
    qemu_img_ok(&["snapshot", "-c", "café", s(&q)]);
    assert_eq!(
        strata(&["snapshot-internal", "-c", "thé-vert", s(&q)]).code,
        0
    );
    let want = qemu_img_ok(&["snapshot", "-l", s(&q)]);
    assert_eq!(strata(&["snapshot-internal", "-l", s(&q)]).stdout, want);
    // -l is the default, with -U (no locks) as well.
    assert_eq!(strata(&["snapshot-internal", "-U", s(&q)]).stdout, want);
}

#[test]
fn refusals_have_qemu_imgs_messages_and_exit_codes() {
    if !qemu_available() {
        return;
    }
    let dir = tempdir();
    let (q, t) = twins(dir.path());
    for p in [&q, &t] {
        qemu_img_ok(&["snapshot", "-c", "one", s(p)]);
    }
    let raw = dir.path().join("r.raw");
    qemu_img_ok(&["create", "-q", "-f", "raw", s(&raw), "1M"]);
    let before = dir.path().join("before.qcow2");
    std::fs::copy(&t, &before).unwrap();
    let cases: &[&[&str]] = &[
        &["-a", "nope"],
        &["-d", "nope"],
        &["-d", "1"],
        &["-l", "-c", "x"],
        &["-U", "-c", "x"],
    ];
    for case in cases {
        let mut qa = vec!["snapshot"];
        qa.extend_from_slice(case);
        qa.push(s(&q));
        let mut sa = vec!["snapshot-internal"];
        sa.extend_from_slice(case);
        sa.push(s(&t));
        let (qr, sr) = (qemu_img(&qa), strata(&sa));
        assert_eq!(sr.code, qr.code, "{case:?}: {}", sr.stderr);
        let qm = message(&qr.stderr).replace(s(&q), s(&t));
        let first = qm.lines().next().unwrap_or("").to_string();
        assert!(
            message(&sr.stderr).starts_with(&first),
            "{case:?}: strata said {:?}, qemu-img {:?}",
            sr.stderr,
            qr.stderr
        );
    }
    same_bytes(&before, &t);
    // A raw image: nothing to list, nothing to create.
    assert_eq!(
        strata(&["snapshot-internal", "-f", "raw", s(&raw)]).stdout,
        ""
    );
    let r = strata(&["snapshot-internal", "-f", "raw", "-c", "x", s(&raw)]);
    let qr = qemu_img(&["snapshot", "-f", "raw", "-c", "x", s(&raw)]);
    assert_eq!((r.code, message(&r.stderr)), (qr.code, message(&qr.stderr)));
    // convert -l of a snapshot that does not exist.
    let out = dir.path().join("o.raw");
    let r = strata(&["convert", "-l", "nope", "-O", "raw", s(&t), s(&out)]);
    let qr = qemu_img(&["convert", "-l", "nope", "-O", "raw", s(&q), s(&out)]);
    assert_eq!(r.code, qr.code);
    assert!(
        message(&r.stderr).starts_with(&message(&qr.stderr)),
        "{}",
        r.stderr
    );
}

#[test]
fn convert_l_takes_qemu_imgs_snapshot_id_and_name_options() {
    if !qemu_available() {
        return;
    }
    let dir = tempdir();
    let (q, _) = twins(dir.path());
    qemu_img_ok(&["snapshot", "-c", "a", s(&q)]);
    qemu_io("qcow2", &q, &["write -P 0x77 0 1M"]);
    qemu_img_ok(&["snapshot", "-c", "a", s(&q)]);
    qemu_io("qcow2", &q, &["write -P 0x78 0 2M"]);
    for sel in [
        "a",
        "2",
        "snapshot.id=2",
        "snapshot.name=a",
        "snapshot.id=2,snapshot.name=a",
        "snapshot.id=1,snapshot.name=b",
    ] {
        let (a, b) = (dir.path().join("a.raw"), dir.path().join("b.raw"));
        let qc = convert_l("qemu-img", &q, sel, &a);
        let sc = convert_l("strata", &q, sel, &b);
        assert_eq!(sc, qc, "{sel}");
        if qc == 0 {
            same_bytes(&a, &b);
        }
        let _ = std::fs::remove_file(&a);
        let _ = std::fs::remove_file(&b);
    }
    // To qcow2 as well.
    let (a, b) = (dir.path().join("a.qcow2"), dir.path().join("b.qcow2"));
    qemu_img_ok(&["convert", "-l", "1", "-O", "qcow2", s(&q), s(&a)]);
    assert_eq!(
        strata(&["convert", "-l", "1", "-O", "qcow2", s(&q), s(&b)]).code,
        0
    );
    check_clean(&b);
    identical(&a, &b);
}
