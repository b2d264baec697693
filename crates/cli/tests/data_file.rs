//! Images with an external data file (qcow2 `data_file`) through the
//! command line, each step on twins against qemu-img / qemu-io: create,
//! info, map, check, convert, amend, resize, io, and the merges' refusal.
//! Data file names are opened as QEMU opens them: relative to the current
//! directory, so these tests run both tools in the images' directory.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

/// Runs `cmd` (the built strata binary when "strata") in `dir`.
fn run_in(dir: &Path, cmd: &str, args: &[&str]) -> Run {
    let prog = if cmd == "strata" {
        env!("CARGO_BIN_EXE_strata").to_string()
    } else {
        cmd.to_string()
    };
    let o = Command::new(prog)
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run");
    Run {
        code: o.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

fn ok_in(dir: &Path, cmd: &str, args: &[&str]) -> String {
    let r = run_in(dir, cmd, args);
    assert_eq!(r.code, 0, "{cmd} {args:?}: {}{}", r.stdout, r.stderr);
    r.stdout
}

/// `text` with the twin's names made the same ("s." for "q.").
fn norm(text: &str) -> String {
    text.replace("q.qcow2", "s.qcow2")
        .replace("q.data", "s.data")
}

/// The same command by both tools, one per twin: same exit code, same
/// standard output (names aside).
fn both(dir: &Path, args: &[&str]) -> String {
    let q: Vec<String> = args.iter().map(|a| a.replace("IMG", "q")).collect();
    let s: Vec<String> = args.iter().map(|a| a.replace("IMG", "s")).collect();
    let qr = run_in(
        dir,
        "qemu-img",
        &q.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let sr = run_in(
        dir,
        "strata",
        &s.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    assert_eq!(
        qr.code, sr.code,
        "{args:?}: qemu-img {}, strata {}",
        qr.stderr, sr.stderr
    );
    assert_eq!(norm(&qr.stdout), sr.stdout, "{args:?}");
    sr.stdout
}

fn io_both(dir: &Path, cmds: &[&str]) {
    for img in ["q.qcow2", "s.qcow2"] {
        let mut a = Vec::new();
        for c in cmds {
            a.extend(["-c", c]);
        }
        a.push(img);
        let tool = if img == "q.qcow2" {
            "qemu-io"
        } else {
            "strata"
        };
        let args: Vec<&str> = if tool == "strata" {
            std::iter::once("io").chain(a.iter().copied()).collect()
        } else {
            a.clone()
        };
        let r = run_in(dir, tool, &args);
        assert!(
            r.code == 0 && !r.stdout.contains("failed"),
            "{tool}: {}{}",
            r.stdout,
            r.stderr
        );
    }
}

/// The twins' data files hold the same bytes; both images check clean and
/// read the same.
fn same_data(dir: &Path) {
    let (q, s) = (
        std::fs::read(dir.join("q.data")).unwrap(),
        std::fs::read(dir.join("s.data")).unwrap(),
    );
    assert!(q == s, "the data files differ");
    for img in ["q.qcow2", "s.qcow2"] {
        let r = run_in(dir, "qemu-img", &["check", img]);
        assert_eq!(r.code, 0, "{img}: {}", r.stdout);
    }
    let r = run_in(dir, "qemu-img", &["compare", "q.qcow2", "s.qcow2"]);
    assert_eq!(r.code, 0, "{}", r.stdout);
}

/// `create -o data_file=NAME[,data_file_raw=on]`: qemu-img's Formatting
/// line, info (text and JSON: "data file", "data file raw"), the data
/// file created to the virtual size (an existing one truncated, as
/// qemu-img does), and the map of a raw one (every cluster mapped).
#[test]
fn create_with_a_data_file_matches_qemu_img() {
    if !qemu_available() {
        return;
    }
    let dir = tempdir();
    let d = dir.path();
    for opts in ["data_file=IMG.data", "data_file=IMG.data,data_file_raw=on"] {
        std::fs::write(d.join("s.data"), b"old contents").unwrap();
        std::fs::write(d.join("q.data"), b"old contents").unwrap();
        let out = both(
            d,
            &["create", "-f", "qcow2", "-o", opts, "IMG.qcow2", "64M"],
        );
        assert!(out.contains(" data_file=s.data"), "{out}");
        for img in ["q.data", "s.data"] {
            assert_eq!(std::fs::metadata(d.join(img)).unwrap().len(), 64 << 20);
        }
        same_data(d);
        // qemu-img's text info differs in its disk sizes: compare the
        // lines that matter, and the JSON's format-specific part.
        let qi = norm(&ok_in(d, "qemu-img", &["info", "q.qcow2"]));
        let si = ok_in(d, "strata", &["info", "s.qcow2"]);
        for key in ["data file:", "data file raw:", "compat:", "virtual size:"] {
            let pick = |t: &str| t.lines().find(|l| l.contains(key)).map(str::to_string);
            assert_eq!(pick(&qi), pick(&si), "{key}");
            assert!(pick(&si).is_some(), "{key} missing: {si}");
        }
        let json = |t: &str| -> serde_json::Value {
            let v: serde_json::Value = serde_json::from_str(t).unwrap();
            v["format-specific"].clone()
        };
        let qj = ok_in(d, "qemu-img", &["info", "--output=json", "q.qcow2"]);
        let sj = ok_in(d, "strata", &["info", "--output", "json", "s.qcow2"]);
        assert_eq!(json(&norm(&qj)), json(&sj));
        both(d, &["map", "--output=json", "IMG.qcow2"]);
    }
}

/// qemu-img's refusals at creation, with its words: the raw bit without a
/// data file, a v2 image, a backing file with data_file_raw, a data file
/// in a directory that does not exist.
#[test]
fn create_refusals_match_qemu_img() {
    if !qemu_available() {
        return;
    }
    let dir = tempdir();
    let d = dir.path();
    std::fs::write(d.join("b.qcow2"), b"").unwrap();
    qemu_img_ok(&["create", "-q", "-f", "qcow2", s(&d.join("b.qcow2")), "1M"]);
    for (opts, words) in [
        ("data_file_raw=on", "data-file-raw requires data-file"),
        (
            "compat=0.10,data_file=x.data",
            "External data files are only supported",
        ),
        (
            "data_file=x.data,data_file_raw=on,backing_file=b.qcow2,backing_fmt=qcow2",
            "Backing file and data-file-raw cannot be used at the same time",
        ),
        (
            "data_file=nowhere/x.data",
            "Could not create 'nowhere/x.data'",
        ),
    ] {
        let q = run_in(
            d,
            "qemu-img",
            &["create", "-f", "qcow2", "-o", opts, "q.qcow2", "1M"],
        );
        let s = run_in(
            d,
            "strata",
            &["create", "-f", "qcow2", "-o", opts, "s.qcow2", "1M"],
        );
        assert!(
            q.code != 0 && q.stderr.contains(words),
            "qemu-img {opts}: {}",
            q.stderr
        );
        assert!(
            s.code != 0 && s.stderr.contains(words),
            "strata {opts}: {}",
            s.stderr
        );
        assert!(!d.join("x.data").exists(), "{opts}: a data file was made");
    }
}

/// The name is opened relative to the current directory, as QEMU opens
/// it (not the image's directory): from elsewhere, both tools fail to
/// open it, with qemu-img's "Could not open 'NAME'".
#[test]
fn data_file_names_are_opened_relative_to_the_current_directory_as_qemu_does() {
    if !qemu_available() {
        return;
    }
    let dir = tempdir();
    let d = dir.path();
    std::fs::create_dir(d.join("sub")).unwrap();
    let sub = d.join("sub");
    both(
        &sub,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "data_file=IMG.data",
            "IMG.qcow2",
            "1M",
        ],
    );
    for (tool, img) in [("qemu-img", "sub/q.qcow2"), ("strata", "sub/s.qcow2")] {
        let r = run_in(d, tool, &["convert", "-O", "raw", img, "out.raw"]);
        assert!(
            r.code != 0,
            "{tool}: opened {img} from its parent directory"
        );
        assert!(
            r.stderr.contains("Could not open '"),
            "{tool}: {}",
            r.stderr
        );
    }
    let r = run_in(
        &sub,
        "strata",
        &["convert", "-O", "raw", "s.qcow2", "out.raw"],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
}

/// 244's layouts through `strata io` and `qemu-io`: the same map (human:
/// the data file named in the File column; JSON: data file offsets),
/// check (text and JSON), guest views and data files; with
/// `data_file_raw=on` the raw file is the guest view.
#[test]
fn io_map_and_check_match_qemu_on_data_file_images() {
    if !qemu_available() {
        return;
    }
    for raw in ["", ",data_file_raw=on"] {
        let dir = tempdir();
        let d = dir.path();
        both(
            d,
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                &format!("data_file=IMG.data{raw}"),
                "IMG.qcow2",
                "64M",
            ],
        );
        io_both(
            d,
            &[
                "write -P 0x11 1M 4M",
                "discard 2M 2M",
                "write -z 3M 3M",
                "write -P 0x22 0 4k",
            ],
        );
        same_data(d);
        let human = both(d, &["map", "IMG.qcow2"]);
        assert!(human.contains("s.data"), "{human}");
        both(d, &["map", "--output=json", "IMG.qcow2"]);
        both(d, &["check", "IMG.qcow2"]);
        both(d, &["check", "--output=json", "IMG.qcow2"]);
        if !raw.is_empty() {
            let r = run_in(
                d,
                "qemu-img",
                &["compare", "-f", "raw", "-F", "qcow2", "s.data", "s.qcow2"],
            );
            assert_eq!(r.code, 0, "raw data file: {}", r.stdout);
        }
    }
}

/// `convert -O qcow2 -o data_file=NAME` from a plain image, and back to
/// raw and to a plain qcow2 image, as qemu-img converts; `-c` with a data
/// file refused before anything is made (qemu-img creates the image and
/// then fails every write); `-n` into an existing data file image.
#[test]
fn convert_to_and_from_data_file_images_matches_qemu_img() {
    if !qemu_available() {
        return;
    }
    let dir = tempdir();
    let d = dir.path();
    ok_in(
        d,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "src.qcow2", "64M"],
    );
    qemu_io(
        "qcow2",
        &d.join("src.qcow2"),
        &["write -P 0x11 0 1M", "write -P 0x22 3M 100k"],
    );
    both(
        d,
        &[
            "convert",
            "-O",
            "qcow2",
            "-o",
            "data_file=IMG.data",
            "src.qcow2",
            "IMG.qcow2",
        ],
    );
    same_data(d);
    both(d, &["map", "--output=json", "IMG.qcow2"]);
    ok_in(d, "strata", &["convert", "-O", "raw", "s.qcow2", "s.raw"]);
    ok_in(
        d,
        "qemu-img",
        &["convert", "-O", "raw", "src.qcow2", "src.raw"],
    );
    assert!(std::fs::read(d.join("s.raw")).unwrap() == std::fs::read(d.join("src.raw")).unwrap());
    ok_in(
        d,
        "strata",
        &["convert", "-O", "qcow2", "s.qcow2", "plain.qcow2"],
    );
    let info = ok_in(d, "qemu-img", &["info", "plain.qcow2"]);
    assert!(!info.contains("data file"), "{info}");
    check_clean(&d.join("plain.qcow2"));
    identical(&d.join("plain.qcow2"), &d.join("src.qcow2"));
    let r = run_in(
        d,
        "strata",
        &[
            "convert",
            "-O",
            "qcow2",
            "-c",
            "-o",
            "data_file=c.data",
            "src.qcow2",
            "c.qcow2",
        ],
    );
    assert!(
        r.code != 0 && r.stderr.contains("external data file"),
        "{}",
        r.stderr
    );
    assert!(!d.join("c.qcow2").exists() && !d.join("c.data").exists());
    // 244's "Copy offloading": -n -C into an existing image with a data file.
    both(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "data_file=IMG.data",
            "IMG.qcow2",
            "64M",
        ],
    );
    both(
        d,
        &[
            "convert",
            "-n",
            "-C",
            "-O",
            "qcow2",
            "src.qcow2",
            "IMG.qcow2",
        ],
    );
    same_data(d);
    let r = run_in(d, "qemu-img", &["compare", "s.qcow2", "src.qcow2"]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
}

/// `amend -o data_file=NAME` (renamed), `data_file=` (name removed) and
/// `data_file_raw=off` give the bytes qemu-img amend gives; its refusals
/// (data_file on a plain image, data_file_raw=on on a non-raw one, a
/// downgrade) with its words, nothing changed.
#[test]
fn amend_of_data_file_options_matches_qemu_img() {
    if !qemu_available() {
        return;
    }
    let dir = tempdir();
    let d = dir.path();
    for (opts, amend) in [
        ("data_file=x.data", "data_file=y.data"),
        ("data_file=x.data", "data_file="),
        ("data_file=x.data,data_file_raw=on", "data_file_raw=off"),
        ("data_file=x.data,data_file_raw=on", "data_file_raw=on"),
    ] {
        // Both images name the same data file: their bytes must match.
        ok_in(
            d,
            "qemu-img",
            &["create", "-q", "-f", "qcow2", "-o", opts, "q.qcow2", "1M"],
        );
        std::fs::copy(d.join("q.qcow2"), d.join("s.qcow2")).unwrap();
        std::fs::copy(d.join("x.data"), d.join("y.data")).unwrap();
        ok_in(d, "qemu-img", &["amend", "-o", amend, "q.qcow2"]);
        ok_in(d, "strata", &["amend", "-o", amend, "s.qcow2"]);
        assert!(
            std::fs::read(d.join("q.qcow2")).unwrap() == std::fs::read(d.join("s.qcow2")).unwrap(),
            "{opts} amended with {amend}"
        );
    }
    ok_in(
        d,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "plain.qcow2", "1M"],
    );
    ok_in(
        d,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "data_file=x.data",
            "df.qcow2",
            "1M",
        ],
    );
    for (img, amend, words) in [
        (
            "plain.qcow2",
            "data_file=x.data",
            "data-file can only be set for images that use an external data file",
        ),
        (
            "df.qcow2",
            "data_file_raw=on",
            "data-file-raw cannot be set on existing images",
        ),
        (
            "df.qcow2",
            "compat=0.10",
            "Cannot downgrade an image with a data file",
        ),
    ] {
        let before = std::fs::read(d.join(img)).unwrap();
        let q = run_in(d, "qemu-img", &["amend", "-o", amend, img]);
        assert!(
            q.code != 0 && q.stderr.contains(words),
            "qemu-img: {}",
            q.stderr
        );
        let s = run_in(d, "strata", &["amend", "-o", amend, img]);
        assert!(
            s.code != 0 && s.stderr.contains(words),
            "strata: {}",
            s.stderr
        );
        assert!(
            std::fs::read(d.join(img)).unwrap() == before,
            "{img} changed"
        );
    }
}

/// commit, pull and safe rebase of chains with external data files (in
/// the base, the top, or both; the base's raw or not) give what qemu-img
/// commit and rebase give on twins: the same guest views, maps and data
/// file bytes (the emptied top's data discarded in its data file, as
/// qemu-img's), clean checks.
#[test]
fn merges_of_chains_with_data_files_match_qemu_img() {
    if !qemu_available() {
        return;
    }
    let make = |d: &Path, p: &str, base: &str, top: &str| {
        let bo = base.replace("PFX", p);
        let to = top.replace("PFX", p);
        let (b, t) = (format!("{p}b.qcow2"), format!("{p}t.qcow2"));
        let mut args = vec!["create", "-q", "-f", "qcow2"];
        if !bo.is_empty() {
            args.extend(["-o", &bo]);
        }
        args.extend([b.as_str(), "4M"]);
        ok_in(d, "qemu-img", &args);
        ok_in(
            d,
            "qemu-io",
            &["-c", "write -P 1 0 1M", "-c", "write -P 2 2M 64k", &b],
        );
        let mut args = vec!["create", "-q", "-f", "qcow2", "-b", &b, "-F", "qcow2"];
        if !to.is_empty() {
            args.extend(["-o", &to]);
        }
        args.push(&t);
        ok_in(d, "qemu-img", &args);
        ok_in(
            d,
            "qemu-io",
            &[
                "-c",
                "write -P 3 512k 1M",
                "-c",
                "write -z 2M 4k",
                "-c",
                "discard 0 64k",
                &t,
            ],
        );
    };
    let cases = [
        ("data_file=PFXb.data", ""),
        ("", "data_file=PFXt.data"),
        ("data_file=PFXb.data", "data_file=PFXt.data"),
        (
            "data_file=PFXb.data,data_file_raw=on",
            "data_file=PFXt.data",
        ),
    ];
    for (base, top) in cases {
        for op in ["commit", "pull", "rebase"] {
            let dir = tempdir();
            let d = dir.path();
            make(d, "q", base, top);
            make(d, "s", base, top);
            match op {
                "commit" => {
                    ok_in(d, "qemu-img", &["commit", "-q", "qt.qcow2"]);
                    ok_in(d, "strata", &["commit", "st.qcow2"]);
                }
                "pull" => {
                    ok_in(d, "qemu-img", &["rebase", "-q", "-b", "", "qt.qcow2"]);
                    ok_in(d, "strata", &["pull", "st.qcow2"]);
                }
                _ => {
                    ok_in(d, "qemu-img", &["rebase", "-q", "-b", "", "qt.qcow2"]);
                    ok_in(d, "strata", &["rebase", "-b", "", "st.qcow2"]);
                }
            }
            let what = format!("{op} of [{base}] <- [{top}]");
            for img in ["b", "t"] {
                let (q, s) = (format!("q{img}.qcow2"), format!("s{img}.qcow2"));
                let r = run_in(d, "qemu-img", &["compare", &q, &s]);
                assert_eq!(r.code, 0, "{what}: {img}: {}", r.stdout);
                let r = run_in(d, "qemu-img", &["check", &s]);
                assert_eq!(r.code, 0, "{what}: {s}: {}", r.stdout);
                let map = |f: &str| ok_in(d, "qemu-img", &["map", "--output=json", f]);
                assert_eq!(map(&q), map(&s), "{what}: {img} map");
                let (qd, sd) = (
                    d.join(format!("q{img}.data")),
                    d.join(format!("s{img}.data")),
                );
                if qd.exists() {
                    let same = std::fs::read(&qd).unwrap() == std::fs::read(&sd).unwrap();
                    assert!(same, "{what}: {img}: the data files differ");
                }
            }
        }
    }
}

/// A data file a running qemu-io holds (through its image) is neither
/// truncated by `create` nor written by `convert` into a new image naming
/// it, as qemu-img refuses them (`Failed to get "resize" lock`).
#[test]
fn a_data_file_in_use_is_not_truncated_by_create_or_convert() {
    if !qemu_available() {
        return;
    }
    let dir = tempdir();
    let d = dir.path();
    let data = d.join("held.data");
    let img = d.join("held.qcow2");
    let o = format!("data_file={}", s(&data));
    qemu_img_ok(&["create", "-q", "-f", "qcow2", "-o", &o, s(&img), "1M"]);
    qemu_io("qcow2", &img, &["write -P 7 0 64k"]);
    let before = std::fs::read(&data).unwrap();
    let holds = QemuIoHolds::start(&img);
    let q = qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        &o,
        s(&d.join("q.qcow2")),
        "1M",
    ]);
    assert!(
        q.code != 0 && q.stderr.contains("\"resize\" lock"),
        "{}",
        q.stderr
    );
    let r = strata(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        &o,
        s(&d.join("n.qcow2")),
        "1M",
    ]);
    assert!(
        r.code != 0 && r.stderr.contains("\"resize\" lock"),
        "{}",
        r.stderr
    );
    ok_in(
        d,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "src.qcow2", "1M"],
    );
    let r = strata(&[
        "convert",
        "-O",
        "qcow2",
        "-o",
        &o,
        s(&d.join("src.qcow2")),
        s(&d.join("c.qcow2")),
    ]);
    assert!(
        r.code != 0 && r.stderr.contains("\"resize\" lock"),
        "{}",
        r.stderr
    );
    drop(holds);
    assert!(
        std::fs::read(&data).unwrap() == before,
        "the data file was changed"
    );
    assert!(!d.join("n.qcow2").exists() && !d.join("c.qcow2").exists());
}

/// `check` and `check -r leaks` of a data file image whose entries lack
/// the COPIED flag: qemu-img's report (data clusters count as referenced
/// once), and the same bytes after the repair (COPIED set again, no
/// refcount made for data file offsets).
#[test]
fn check_and_repair_of_copied_flags_in_a_data_file_image_match_qemu_img() {
    if !qemu_available() {
        return;
    }
    let dir = tempdir();
    let d = dir.path();
    both(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "data_file=IMG.data",
            "IMG.qcow2",
            "1M",
        ],
    );
    io_both(d, &["write -P 7 0 128k"]);
    for img in ["q.qcow2", "s.qcow2"] {
        // L2 entry 1 (guest 64k) without COPIED.
        let p = d.join(img);
        let mut b = std::fs::read(&p).unwrap();
        b[0x40008] = 0;
        std::fs::write(&p, &b).unwrap();
    }
    let out = both(d, &["check", "--output=json", "IMG.qcow2"]);
    assert!(out.contains("\"corruptions\": 1"), "{out}");
    both(d, &["check", "-r", "leaks", "IMG.qcow2"]);
    // The repaired images differ only in the data file name.
    let (q, s) = (
        std::fs::read(d.join("q.qcow2")).unwrap(),
        std::fs::read(d.join("s.qcow2")).unwrap(),
    );
    let diff: Vec<usize> = (0..q.len().max(s.len()))
        .filter(|i| q.get(*i) != s.get(*i))
        .collect();
    assert!(
        diff.iter().all(|&i| (0x70..0x80).contains(&i)),
        "bytes differ at {diff:x?}"
    );
    both(d, &["check", "IMG.qcow2"]);
}

/// `measure -o data_file=...`: accepted and the sizes qemu-img gives (it
/// measures the image as if the data were inside).
#[test]
fn measure_with_data_file_options_matches_qemu_img() {
    if !qemu_available() {
        return;
    }
    let dir = tempdir();
    let d = dir.path();
    for o in ["data_file=x.data", "data_file=x.data,data_file_raw=on"] {
        let args = ["measure", "-O", "qcow2", "-o", o, "--size", "1G"];
        let q = ok_in(d, "qemu-img", &args);
        let s = ok_in(d, "strata", &args);
        assert_eq!(q, s, "{o}");
    }
    assert!(!d.join("x.data").exists());
}

/// Partial, subcluster and whole-cluster writes, zero writes with and
/// without unmap, discards, rewrites over discarded clusters, at guest 0
/// and beyond, given to `qemu-io` and to `strata io` on twins with and
/// without `data_file_raw` and extended L2 entries: the qcow2 files are
/// byte for byte the same (but for the data file's name), and so are the
/// data files.
#[test]
fn strata_io_writes_the_bytes_qemu_io_writes_on_data_file_images() {
    if !qemu_available() {
        return;
    }
    let cmds = [
        "write -P 1 0 5k",
        "write -P 4 70k 3k",
        "write -z -u 1M 1M",
        "write -P 1 1M 4k",
        "discard 2M 64k",
        "write -z -u 100k 3k",
        "write -P 2 3M 10k",
        "write -z 3M 4k",
        "write -P 3 2M 512",
        "discard 0 64k",
        "write -P 5 8k 2k",
    ];
    for raw in ["off", "on"] {
        for el2 in ["off", "on"] {
            let dir = tempdir();
            let d = dir.path();
            let o = format!("data_file=IMG.data,data_file_raw={raw},extended_l2={el2}");
            both(
                d,
                &["create", "-q", "-f", "qcow2", "-o", &o, "IMG.qcow2", "8M"],
            );
            io_both(d, &cmds);
            same_data(d);
            let (q, s) = (
                std::fs::read(d.join("q.qcow2")).unwrap(),
                std::fs::read(d.join("s.qcow2")).unwrap(),
            );
            let diff: Vec<usize> = (0..q.len().max(s.len()))
                .filter(|i| q.get(*i) != s.get(*i))
                .collect();
            assert!(
                diff.iter().all(|&i| (0x70..0x80).contains(&i)),
                "raw={raw} extended_l2={el2}: qcow2 bytes differ at {diff:x?}"
            );
        }
    }
}
