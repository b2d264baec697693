//! `strata bitmap`, `strata io` and `strata info` on images with
//! persistent dirty bitmaps, against qemu-img bitmap, qemu-io and
//! qemu-img info on twins. Dirty ranges are read through QEMU itself
//! (`qemu-nbd -B NAME` + `qemu-img map` with `x-dirty-bitmap`).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

fn bitmaps_json(img: &Path) -> Vec<serde_json::Value> {
    let out = qemu_img_ok(&["info", "-U", "--output=json", s(img)]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["format-specific"]["data"]["bitmaps"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// Bitmap `name`'s dirty ranges as QEMU reads them.
fn qemu_dirty(img: &Path, name: &str) -> Vec<(u64, u64)> {
    let dir = tempdir();
    let sock = dir.path().join("nbd.sock");
    let o = Command::new("qemu-nbd")
        .args([
            "--fork",
            "-r",
            "-f",
            "qcow2",
            "-B",
            name,
            "-k",
            s(&sock),
            s(img),
        ])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "qemu-nbd: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let opts = format!(
        "driver=nbd,server.type=unix,server.path={},x-dirty-bitmap=qemu:dirty-bitmap:{name}",
        s(&sock)
    );
    let out = qemu_img_ok(&["map", "--output=json", "--image-opts", &opts]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for e in v.as_array().unwrap() {
        if e["data"] == false {
            let (st, l) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
            match ranges.last_mut() {
                Some((ps, pl)) if *ps + *pl == st => *pl += l,
                _ => ranges.push((st, l)),
            }
        }
    }
    ranges
}

fn check_clean(img: &Path) {
    let r = qemu_img(&["check", "-U", s(img)]);
    assert_eq!(
        r.code, 0,
        "qemu-img check {img:?}: {}{}",
        r.stdout, r.stderr
    );
}

/// Same bitmap list, same dirty ranges of every consistent bitmap.
fn assert_same_bitmaps(q: &Path, st: &Path) {
    let (qb, sb) = (bitmaps_json(q), bitmaps_json(st));
    assert_eq!(qb, sb, "bitmap lists differ");
    for b in &qb {
        if b["flags"].as_array().unwrap().iter().any(|f| f == "in-use") {
            continue;
        }
        let name = b["name"].as_str().unwrap();
        assert_eq!(
            qemu_dirty(q, name),
            qemu_dirty(st, name),
            "dirty ranges of {name}"
        );
    }
    check_clean(st);
}

/// A 16 MiB image with data and bitmap "a" (dirty at 0-1M), and its twin.
fn twins(dir: &Path, opts: &str) -> (PathBuf, PathBuf) {
    let q = dir.join("q.qcow2");
    qemu_img_ok(&["create", "-q", "-f", "qcow2", "-o", opts, s(&q), "16M"]);
    qemu_io("qcow2", &q, &["write -P 1 0 2M"]);
    qemu_img_ok(&["bitmap", "--add", s(&q), "a"]);
    qemu_io("qcow2", &q, &["write -P 2 0 1M"]);
    let t = dir.join("s.qcow2");
    std::fs::copy(&q, &t).unwrap();
    (q, t)
}

fn both(q: &Path, t: &Path, args: &[&str]) {
    let (file_at, rest) = (args.len() - 1, args);
    let mut qa = vec!["bitmap"];
    let mut sa = vec!["bitmap"];
    for (i, a) in rest.iter().enumerate() {
        if i == file_at {
            qa.push(s(q));
            sa.push(s(t));
        }
        qa.push(a);
        sa.push(a);
    }
    let qr = qemu_img(&qa);
    let sr = strata(&sa);
    assert_eq!(
        qr.code, sr.code,
        "{args:?}: qemu-img exit {} ({}), strata exit {} ({})",
        qr.code, qr.stderr, sr.code, sr.stderr
    );
    if qr.code != 0 {
        // The same message after the program's name (the first line: the
        // hints name each program's own commands).
        let tail = |e: &str| {
            let first = e.lines().next().unwrap_or("");
            first.split_once(": ").map(|(_, m)| m.trim().to_string())
        };
        assert_eq!(tail(&qr.stderr), tail(&sr.stderr), "{args:?}");
    }
}

#[test]
fn strata_bitmap_matches_qemu_img_bitmap_for_every_subcommand_sequence() {
    if !qemu_available() {
        return;
    }
    let sequences: &[&[&[&str]]] = &[
        &[
            &["--add", "b"],
            &["--add", "-g", "4k", "c"],
            &["--add", "--disable", "d"],
        ],
        &[&["--add", "b"], &["--add", "b"]],
        &[
            &["--remove", "nope"],
            &["--clear", "nope"],
            &["--enable", "nope"],
        ],
        &[&["--disable", "--add", "x"]],
        &[
            &["--add", "-g", "1M", "big"],
            &["--merge", "a", "big"],
            &["--disable", "big"],
        ],
        &[&["--add", "-g", "512", "fine"], &["--merge", "a", "fine"]],
        &[
            &["--add", "--disable", "-g", "128k", "d"],
            &["--merge", "a", "d"],
            &["--enable", "d"],
        ],
        &[&["--clear", "a"], &["--add", "a"]],
        &[&["--remove", "a"]],
        &[
            &["--remove", "a"],
            &["--add", "-g", "2M", "n"],
            &["--remove", "n"],
        ],
        &[
            &["--add", "-g", "1000", "bad"],
            &["--add", "-g", "256", "bad"],
        ],
        &[&["-g", "64k", "--enable", "a"]],
        &[&["--add", "--merge", "a", "--disable", "m"]],
        &[&["--merge", "nope", "a"]],
    ];
    for seq in sequences {
        for opts in ["cluster_size=65536", "cluster_size=512"] {
            let dir = tempdir();
            let (q, t) = twins(dir.path(), opts);
            for args in *seq {
                both(&q, &t, args);
            }
            // Writes after the edits dirty the enabled bitmaps alike.
            qemu_io("qcow2", &q, &["write -P 3 5M 100k", "write -z 9M 1M"]);
            strata(&[
                "io",
                "-c",
                "write -P 3 5M 100k",
                "-c",
                "write -z 9M 1M",
                s(&t),
            ]);
            assert_same_bitmaps(&q, &t);
        }
    }
}

#[test]
fn merge_from_another_file_matches_qemu_img() {
    if !qemu_available() {
        return;
    }
    let dir = tempdir();
    let (q, t) = twins(dir.path(), "cluster_size=65536");
    let src = dir.path().join("src.qcow2");
    qemu_img_ok(&["create", "-q", "-f", "qcow2", s(&src), "16M"]);
    qemu_img_ok(&["bitmap", "--add", "-g", "4k", s(&src), "other"]);
    qemu_io("qcow2", &src, &["write 7M 5k", "write 15M 1M"]);
    for args in [
        &["--merge", "other", "-b", s(&src), "-F", "qcow2", "a"][..],
        &["--add", "n", "--merge", "other", "-b", s(&src), "n"][..],
        &["--merge", "missing", "-b", s(&src), "a"][..],
        &["-b", s(&src), "--add", "z"][..],
    ] {
        both(&q, &t, args);
    }
    assert_same_bitmaps(&q, &t);
}

#[test]
fn strata_io_dirties_the_same_granules_as_qemu_io() {
    if !qemu_available() {
        return;
    }
    for g in ["64k", "128k", "4k", "1M"] {
        let dir = tempdir();
        let (q, t) = twins(dir.path(), "cluster_size=65536");
        qemu_img_ok(&["bitmap", "--add", "-g", g, s(&q), "g"]);
        qemu_img_ok(&["bitmap", "--add", "--disable", "-g", g, s(&q), "off"]);
        std::fs::copy(&q, &t).unwrap();
        let cmds = [
            "write -P 4 100k 4k",
            "write -z 3M 300k",
            "flush",
            "write -z -u 5M 1M",
            "discard 10M 64k",
            "discard 12M 8k",
            "write -P 5 16380k 4k",
        ];
        let mut qa = Vec::new();
        let mut sa = vec!["io"];
        for c in &cmds {
            qa.push(*c);
            sa.push("-c");
            sa.push(c);
        }
        qemu_io("qcow2", &q, &qa);
        sa.push(s(&t));
        let r = strata(&sa);
        assert_eq!(r.code, 0, "{}", r.stderr);
        assert!(!qemu_dirty(&t, "g").is_empty());
        assert_same_bitmaps(&q, &t);
        assert_eq!(
            qemu_img_ok(&["compare", s(&q), s(&t)]).trim(),
            "Images are identical."
        );
    }
}

/// Sets bitmap number `i`'s in_use flag directly in the file.
fn flag_in_use(img: &Path, i: usize) {
    let bytes = std::fs::read(img).unwrap();
    let h = strata_format::Header::parse(&bytes[..65536.min(bytes.len())]).unwrap();
    let (nb, size, off) = h.bitmaps().unwrap();
    let dir = &bytes[off as usize..(off + size) as usize];
    let es = strata_format::bitmap::parse_directory(dir, nb, off).unwrap();
    let at = (off + es[i].dir_offset + 15) as usize;
    let mut bytes = bytes;
    bytes[at] |= 1;
    std::fs::write(img, bytes).unwrap();
}

#[test]
fn info_lists_bitmaps_exactly_as_qemu_img_human_and_json() {
    if !qemu_available() {
        return;
    }
    let dir = tempdir();
    let (q, _) = twins(dir.path(), "cluster_size=65536");
    qemu_img_ok(&["bitmap", "--add", "--disable", "-g", "4k", s(&q), "off"]);
    qemu_img_ok(&["bitmap", "--add", "-g", "2M", s(&q), "broken"]);
    flag_in_use(&q, 2);
    let section = |t: &str| {
        let from = t.find("    bitmaps:").expect("bitmaps listed");
        let to = t[from..]
            .find("refcount bits")
            .map_or(t.len(), |e| from + e);
        t[from..to].to_string()
    };
    let qh = qemu_img_ok(&["info", "-U", s(&q)]);
    let sh = strata(&["info", s(&q)]);
    assert_eq!(sh.code, 0, "{}", sh.stderr);
    assert_eq!(section(&qh), section(&sh.stdout));
    let qj: serde_json::Value =
        serde_json::from_str(&qemu_img_ok(&["info", "-U", "--output=json", s(&q)])).unwrap();
    let sj = strata(&["info", "--output", "json", s(&q)]);
    let sj: serde_json::Value = serde_json::from_str(&sj.stdout).unwrap();
    assert_eq!(
        qj["format-specific"]["data"]["bitmaps"],
        sj["format-specific"]["data"]["bitmaps"]
    );
    assert!(section(&qh).contains("in-use"), "{}", section(&qh));
    // An in-use bitmap stays in use through writes, and can be removed.
    let t = dir.path().join("t.qcow2");
    std::fs::copy(&q, &t).unwrap();
    qemu_io("qcow2", &q, &["write 0 64k"]);
    strata(&["io", "-c", "write 0 64k", s(&t)]);
    assert_same_bitmaps(&q, &t);
    both(&q, &t, &["--clear", "broken"]);
    both(&q, &t, &["--remove", "broken"]);
    assert_same_bitmaps(&q, &t);
}

// ---------------------------------------------------------------------
// commit, pull and safe rebase on chains whose images carry bitmaps.
// ---------------------------------------------------------------------

fn raw_view(img: &Path, dir: &Path) -> Vec<u8> {
    let out = dir.join(format!(
        "{}.view.raw",
        img.file_name().unwrap().to_str().unwrap()
    ));
    qemu_img_ok(&["convert", "-U", "-O", "raw", s(img), s(&out)]);
    std::fs::read(out).unwrap()
}

/// Whether the dirty ranges `d` cover byte `off`.
fn covers(d: &[(u64, u64)], off: u64) -> bool {
    d.iter().any(|(st, l)| off >= *st && off < st + l)
}

/// Every enabled bitmap of `img` (after) is dirty wherever the guest
/// view changed between `before` and `after`, and wherever it was dirty
/// before (`old`); disabled ones are unchanged.
fn assert_never_loses_a_bit(
    label: &str,
    img: &Path,
    old: &[Snapshot],
    before: &[u8],
    after: &[u8],
) {
    let now = bitmaps_json(img);
    let names: Vec<_> = now
        .iter()
        .map(|b| b["name"].as_str().unwrap().to_string())
        .collect();
    let old_names: Vec<_> = old.iter().map(|b| b.0.clone()).collect();
    assert_eq!(names, old_names, "{label}: bitmap list changed");
    for ((name, auto, old_d), b) in old.iter().zip(&now) {
        let flags = b["flags"].as_array().unwrap();
        assert!(
            !flags.iter().any(|f| f == "in-use"),
            "{label}: {name} left in use"
        );
        let d = qemu_dirty(img, name);
        if !auto {
            assert_eq!(&d, old_d, "{label}: disabled {name} changed");
            continue;
        }
        for (st, l) in old_d {
            assert!(
                covers(&d, *st) && covers(&d, st + l - 1),
                "{label}: {name} lost {st:#x}"
            );
        }
        let g = b["granularity"].as_u64().unwrap() as usize;
        for start in (0..after.len()).step_by(g) {
            let end = (start + g).min(after.len());
            // Past the old end the disk grew: nothing before, zeros now
            // (QEMU leaves such granules clean).
            let prev = before.get(start..end.min(before.len())).unwrap_or(&[]);
            let changed = after[start..start + prev.len()] != *prev
                || after[start + prev.len()..end].iter().any(|b| *b != 0);
            assert!(
                !changed || covers(&d, start as u64),
                "{label}: {name} claims {start:#x} clean but the guest view changed"
            );
        }
    }
}

/// A bitmap's name, whether it is enabled, and its dirty ranges.
type Snapshot = (String, bool, Vec<(u64, u64)>);

fn bitmap_snapshot(img: &Path) -> Vec<Snapshot> {
    bitmaps_json(img)
        .iter()
        .map(|b| {
            let name = b["name"].as_str().unwrap().to_string();
            let auto = b["flags"].as_array().unwrap().iter().any(|f| f == "auto");
            let d = qemu_dirty(img, &name);
            (name, auto, d)
        })
        .collect()
}

/// base (bitmaps "b-on" 64k, "b-off" disabled) <- top (bitmaps "t-on"
/// 128k, "t-off" disabled), with data, zeros and discards in the top.
fn chain_with_bitmaps(dir: &Path, top_size: Option<&str>) -> (PathBuf, PathBuf) {
    let base = dir.join("base.qcow2");
    let top = dir.join("top.qcow2");
    qemu_img_ok(&["create", "-q", "-f", "qcow2", s(&base), "8M"]);
    qemu_io(
        "qcow2",
        &base,
        &["write -P 0x11 0 3M", "write -P 0x12 6M 1M"],
    );
    qemu_img_ok(&["bitmap", "--add", s(&base), "b-on"]);
    qemu_img_ok(&["bitmap", "--add", "-g", "4k", s(&base), "b-off"]);
    qemu_io("qcow2", &base, &["write -P 0x13 7M 4k"]);
    qemu_img_ok(&["bitmap", "--disable", s(&base), "b-off"]);
    let mut args = vec![
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        s(&base),
        "-F",
        "qcow2",
        s(&top),
    ];
    args.extend(top_size);
    qemu_img_ok(&args);
    qemu_img_ok(&["bitmap", "--add", "-g", "128k", s(&top), "t-on"]);
    qemu_img_ok(&["bitmap", "--add", s(&top), "t-off"]);
    qemu_io(
        "qcow2",
        &top,
        &[
            "write -P 0x21 100k 10k",
            "write -P 0x22 2M 1M",
            "write -z 512k 64k",
            "discard 6M 128k",
            "write -P 0x23 5M 4k",
        ],
    );
    if top_size.is_some() {
        qemu_io("qcow2", &top, &["write -P 0x24 10M 8k"]);
    }
    qemu_img_ok(&["bitmap", "--disable", s(&top), "t-off"]);
    (base, top)
}

/// Runs `q` (qemu-img) on one copy of the chain and `st` (strata) on
/// another; checks both against the rules, and that Strata's bitmaps
/// agree with QEMU's.
fn merge_twins(q: &[&str], st: &[&str], changed_image: &str) {
    merge_twins_sized(q, st, changed_image, None)
}

fn merge_twins_sized(q: &[&str], st: &[&str], changed_image: &str, top_size: Option<&str>) {
    let dir = tempdir();
    let qd = dir.path().join("q");
    let sd = dir.path().join("s");
    std::fs::create_dir_all(&qd).unwrap();
    std::fs::create_dir_all(&sd).unwrap();
    chain_with_bitmaps(&qd, top_size);
    chain_with_bitmaps(&sd, top_size);
    let new = |d: &Path| {
        let n = d.join("new.qcow2");
        qemu_img_ok(&["create", "-q", "-f", "qcow2", s(&n), "8M"]);
        qemu_io("qcow2", &n, &["write -P 0x11 0 1M", "write -P 0x31 4M 1M"]);
        n
    };
    new(&qd);
    new(&sd);
    let img = |d: &Path| d.join(changed_image);
    let views = |d: &Path| {
        (
            raw_view(&d.join(changed_image), d),
            bitmap_snapshot(&img(d)),
        )
    };
    let (before, old) = views(&sd);
    let run = |d: &Path, args: &[&str], strata_run: bool| {
        let args: Vec<String> = args
            .iter()
            .map(|a| a.replace("{dir}", d.to_str().unwrap()))
            .collect();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        if strata_run {
            let r = strata(&args);
            assert_eq!(r.code, 0, "strata {args:?}: {}", r.stderr);
        } else {
            qemu_img_ok(&args);
        }
    };
    run(&qd, q, false);
    run(&sd, st, true);
    let after = raw_view(&img(&sd), &sd);
    assert_never_loses_a_bit(&format!("{st:?}"), &img(&sd), &old, &before, &after);
    for name in ["base.qcow2", "top.qcow2"] {
        let (qi, si) = (qd.join(name), sd.join(name));
        check_clean(&si);
        let (qb, sb) = (bitmaps_json(&qi), bitmaps_json(&si));
        assert_eq!(
            qb, sb,
            "{st:?}: {name}: bitmap lists differ from qemu-img's"
        );
        for b in &qb {
            let n = b["name"].as_str().unwrap();
            let (qr, sr) = (qemu_dirty(&qi, n), qemu_dirty(&si, n));
            // Never cleaner than QEMU.
            for (o, l) in &qr {
                assert!(
                    covers(&sr, *o) && covers(&sr, o + l - 1),
                    "{st:?}: {name}: {n}: QEMU has {o:#x}+{l:#x} dirty, Strata {sr:x?}"
                );
            }
            assert_eq!(
                qr, sr,
                "{st:?}: {name}: {n}: dirty ranges differ from qemu-img's"
            );
        }
    }
}

#[test]
fn commit_keeps_bitmaps_and_dirties_the_base_where_the_top_landed() {
    if !qemu_available() {
        return;
    }
    merge_twins(
        &["commit", "-q", "{dir}/top.qcow2"],
        &["commit", "{dir}/top.qcow2"],
        "base.qcow2",
    );
    merge_twins(
        &["commit", "-q", "-d", "{dir}/top.qcow2"],
        &["commit", "-d", "{dir}/top.qcow2"],
        "base.qcow2",
    );
}

#[test]
fn commit_into_a_smaller_base_grows_its_bitmaps_like_qemu_img() {
    if !qemu_available() {
        return;
    }
    merge_twins_sized(
        &["commit", "-q", "{dir}/top.qcow2"],
        &["commit", "{dir}/top.qcow2"],
        "base.qcow2",
        Some("12M"),
    );
}

#[test]
fn pull_keeps_the_tops_bitmaps_and_loses_no_dirty_bit() {
    if !qemu_available() {
        return;
    }
    merge_twins(
        &["rebase", "-b", "", "{dir}/top.qcow2"],
        &["pull", "{dir}/top.qcow2"],
        "top.qcow2",
    );
}

#[test]
fn safe_rebase_keeps_the_tops_bitmaps_and_loses_no_dirty_bit() {
    if !qemu_available() {
        return;
    }
    merge_twins(
        &[
            "rebase",
            "-b",
            "{dir}/new.qcow2",
            "-F",
            "qcow2",
            "{dir}/top.qcow2",
        ],
        &[
            "rebase",
            "-b",
            "{dir}/new.qcow2",
            "-F",
            "qcow2",
            "{dir}/top.qcow2",
        ],
        "top.qcow2",
    );
}

#[test]
fn convert_bitmaps_copies_them_like_qemu_img() {
    if !qemu_available() {
        return;
    }
    let dir = tempdir();
    let (src, _) = twins(dir.path(), "cluster_size=65536");
    qemu_img_ok(&["bitmap", "--add", "--disable", "-g", "4k", s(&src), "off"]);
    qemu_img_ok(&["bitmap", "--add", "-g", "1M", s(&src), "coarse"]);
    qemu_io("qcow2", &src, &["write -P 9 9M 5k"]);
    for opts in ["cluster_size=65536", "cluster_size=4096"] {
        let (q, t) = (dir.path().join("q.out"), dir.path().join("s.out"));
        qemu_img_ok(&[
            "convert",
            "--bitmaps",
            "-O",
            "qcow2",
            "-o",
            opts,
            s(&src),
            s(&q),
        ]);
        let r = strata(&[
            "convert",
            "--bitmaps",
            "-O",
            "qcow2",
            "-o",
            opts,
            s(&src),
            s(&t),
        ]);
        assert_eq!(r.code, 0, "{}", r.stderr);
        assert_same_bitmaps(&q, &t);
        assert_eq!(bitmaps_json(&t).len(), 3);
        assert!(!qemu_dirty(&t, "coarse").is_empty());
    }
    // Refusals: a raw target, an inconsistent bitmap.
    let raw = dir.path().join("out.raw");
    let r = strata(&["convert", "--bitmaps", "-O", "raw", s(&src), s(&raw)]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains("does not support bitmaps"),
        "{}",
        r.stderr
    );
    flag_in_use(&src, 1);
    let out = dir.path().join("bad.qcow2");
    let q = qemu_img(&["convert", "--bitmaps", "-O", "qcow2", s(&src), s(&out)]);
    let r = strata(&["convert", "--bitmaps", "-O", "qcow2", s(&src), s(&out)]);
    assert_eq!((q.code, r.code), (1, 1), "{} / {}", q.stderr, r.stderr);
    assert!(r.stderr.contains("inconsistent"), "{}", r.stderr);
    assert!(!out.exists(), "a refused convert creates nothing");
}
