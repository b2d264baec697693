//! The write-path and merge commands (create, io, check -r, rebase,
//! commit, pull) against qemu-img and qemu-io, and the libvirt commands
//! against libvirt's test driver.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

const MIB: u64 = 1 << 20;

fn qemu_io_ok(img: &Path, cmds: &[&str]) {
    qemu_io("qcow2", img, cmds);
}

fn strata_ok(args: &[&str]) -> Run {
    let r = strata(args);
    assert_eq!(r.code, 0, "strata {args:?}: {}{}", r.stdout, r.stderr);
    r
}

fn info_json(img: &Path) -> serde_json::Value {
    serde_json::from_str(&qemu_img_ok(&["info", "--output", "json", s(img)])).unwrap()
}

fn read_file(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap()
}

#[test]
fn create_with_each_option_is_accepted_by_qemu_img() {
    if !qemu_available() {
        return;
    }
    let d = tempdir();
    // (option, key in format-specific data, expected value)
    let cases: &[(&str, &str, serde_json::Value)] = &[
        ("refcount_bits=1", "refcount-bits", 1.into()),
        ("refcount_bits=64", "refcount-bits", 64.into()),
        ("compat=0.10", "compat", "0.10".into()),
        ("compat=1.1", "compat", "1.1".into()),
        ("extended_l2=on", "extended-l2", true.into()),
        ("lazy_refcounts=on", "lazy-refcounts", true.into()),
        ("compression_type=zstd", "compression-type", "zstd".into()),
        ("preallocation=metadata", "compat", "1.1".into()),
    ];
    for (i, (opt, key, want)) in cases.iter().enumerate() {
        let img = d.path().join(format!("o{i}.qcow2"));
        let r = strata_ok(&["create", "-f", "qcow2", "-o", opt, s(&img), "4M"]);
        assert!(r.stdout.starts_with("Formatting '"), "{}", r.stdout);
        check_clean(&img);
        let info = info_json(&img);
        assert_eq!(info["format-specific"]["data"][key], *want, "{opt}: {info}");
        assert_eq!(info["virtual-size"], 4 * MIB);
    }
    for cs in ["512", "4k", "2M"] {
        let img = d.path().join(format!("cs{cs}.qcow2"));
        strata_ok(&[
            "create",
            "-q",
            "-o",
            &format!("cluster_size={cs}"),
            s(&img),
            "1G",
        ]);
        check_clean(&img);
        let want = strata_cli::size::parse_size(cs).unwrap();
        assert_eq!(info_json(&img)["cluster-size"], want);
    }
    let raw = d.path().join("r.raw");
    strata_ok(&["create", "-f", "raw", s(&raw), "3M"]);
    assert_eq!(std::fs::metadata(&raw).unwrap().len(), 3 * MIB);
}

#[test]
fn create_with_a_backing_file_but_no_format_fails_and_creates_nothing() {
    let d = tempdir();
    let base = d.path().join("base.qcow2");
    strata_ok(&["create", "-q", s(&base), "1M"]);
    let top = d.path().join("top.qcow2");
    let r = strata(&["create", "-b", "base.qcow2", s(&top)]);
    assert_ne!(r.code, 0);
    assert!(r.stderr.starts_with("strata: "), "{}", r.stderr);
    assert!(r.stderr.contains("backing format"), "{}", r.stderr);
    assert!(!top.exists());
    let bad = strata(&["create", "-o", "cluster_size=3k", s(&top), "1M"]);
    assert_ne!(bad.code, 0);
    assert!(!top.exists());
}

#[test]
fn create_size_defaults_to_the_backing_files_and_the_name_is_stored_as_given() {
    if !qemu_available() {
        return;
    }
    let d = tempdir();
    let base = d.path().join("base.qcow2");
    qemu_img_ok(&["create", "-q", "-f", "qcow2", s(&base), "7M"]);
    let top = d.path().join("top.qcow2");
    // Run from another directory: the relative name is resolved against
    // the new image's directory.
    let r = strata_ok(&["create", "-b", "base.qcow2", "-F", "qcow2", s(&top)]);
    assert!(r.stdout.contains("backing_file=base.qcow2"), "{}", r.stdout);
    let info = info_json(&top);
    assert_eq!(info["virtual-size"], 7 * MIB);
    assert_eq!(info["backing-filename"], "base.qcow2");
    assert_eq!(info["backing-filename-format"], "qcow2");
    check_clean(&top);
}

/// Base + overlay made by qemu-img in `dir`, the base holding data.
fn qemu_chain(dir: &Path, opts: &str) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let base = dir.join("base.qcow2");
    let top = dir.join("top.qcow2");
    qemu_img_ok(&["create", "-q", "-f", "qcow2", "-o", opts, s(&base), "4M"]);
    qemu_io_ok(
        &base,
        &[
            "write -P 0x11 0 1M",
            "write -P 0x12 2M 300k",
            "write -z 3M 128k",
        ],
    );
    qemu_img_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        opts,
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        s(&top),
    ]);
    top
}

const TWIN_COMMANDS: &[&str] = &[
    "write -P 0xa1 0 4k",
    "write -P 0xa2 1000 3000",
    "write -P 0xa3 64k 192k",
    "write -z 512k 64k",
    "write -z -u 1M 128k",
    "write -P 0xa4 0x1ff000 0x3000",
    "discard 64k 64k",
    "write -z 2M 1000",
    "write -P 0xa5 3M 70k",
    "flush",
    "write -P 0xa6 4000k 96k",
];

#[test]
fn io_twin_gives_the_same_image_as_qemu_io_on_three_shapes() {
    if !qemu_available() {
        return;
    }
    let d = tempdir();
    for (i, opts) in [
        "cluster_size=64k",
        "cluster_size=512",
        "extended_l2=on,cluster_size=64k",
    ]
    .iter()
    .enumerate()
    {
        let q = qemu_chain(&d.path().join(format!("q{i}")), opts);
        let t = qemu_chain(&d.path().join(format!("s{i}")), opts);
        qemu_io_ok(&q, TWIN_COMMANDS);
        let mut args = vec!["io", "-f", "qcow2"];
        for c in TWIN_COMMANDS {
            args.extend(["-c", c]);
        }
        args.push(s(&t));
        let r = strata_ok(&args);
        assert!(
            r.stdout.contains("wrote 4096/4096 bytes at offset 0\n"),
            "{}",
            r.stdout
        );
        identical(&q, &t);
        check_clean(&t);
        check_clean(&q);
        check_clean(&t.with_file_name("base.qcow2"));
        // And strata reads back what it wrote.
        strata_ok(&[
            "io",
            "-c",
            "read -P 0xa3 128k 64k",
            "-c",
            "read -P 0 512k 64k",
            s(&t),
        ]);
    }
}

#[test]
fn io_read_pattern_mismatch_exits_nonzero_and_stops() {
    let d = tempdir();
    let img = d.path().join("a.qcow2");
    strata_ok(&["create", "-q", s(&img), "1M"]);
    let r = strata(&[
        "io",
        "-c",
        "write -P 0x5a 0 64k",
        "-c",
        "read -P 0x5b 0 4k",
        "-c",
        "write -P 0x77 0 64k",
        s(&img),
    ]);
    assert_ne!(r.code, 0);
    assert!(
        r.stderr
            .contains("Pattern verification failed at offset 0, 4096 bytes"),
        "{}",
        r.stderr
    );
    // The command after the failure did not run.
    strata_ok(&["io", "-c", "read -P 0x5a 0 64k", s(&img)]);
    let past = strata(&["io", "-c", "write 1M 1", s(&img)]);
    assert_ne!(past.code, 0);
    assert!(past.stderr.contains("past the end"), "{}", past.stderr);
}

#[test]
fn sigkilled_io_leaves_no_corruption() {
    if !qemu_available() {
        return;
    }
    let d = tempdir();
    let mut cmds = Vec::new();
    for i in 0..400u64 {
        let off = (i * 37 * 4096) % (60 * MIB);
        match i % 4 {
            0 | 1 => cmds.push(format!(
                "write -P {} {off} {}",
                i % 250,
                4096 + (i % 7) * 30000
            )),
            2 => cmds.push(format!("write -z {off} 128k")),
            _ => cmds.push(format!("discard {off} 64k")),
        }
        if i % 50 == 0 {
            cmds.push("flush".into());
        }
    }
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64;
    for iter in 0..4u64 {
        let base = d.path().join(format!("b{iter}.qcow2"));
        let img = d.path().join(format!("k{iter}.qcow2"));
        strata_ok(&["create", "-q", s(&base), "64M"]);
        qemu_io_ok(&base, &["write -P 0x11 0 8M"]);
        strata_ok(&["create", "-q", "-b", s(&base), "-F", "qcow2", s(&img)]);
        let mut c = Command::new(env!("CARGO_BIN_EXE_strata"));
        c.arg("io");
        for cmd in &cmds {
            c.args(["-c", cmd]);
        }
        c.arg(&img)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        let mut child = c.spawn().unwrap();
        let delay = 5 + (seed.wrapping_mul(iter + 7) >> 3) % 120;
        std::thread::sleep(std::time::Duration::from_millis(delay));
        let _ = child.kill(); // SIGKILL
        let _ = child.wait();
        let r = qemu_img(&["check", s(&img)]);
        assert!(
            r.code == 0 || r.code == 3,
            "iteration {iter} (killed after {delay} ms): {}{}",
            r.stdout,
            r.stderr
        );
    }
}

/// Sets the 16-bit refcount of cluster `n` of a 64 KiB-cluster image
/// whose first refcount block covers it.
fn set_refcount(img: &Path, n: u64, value: u16) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(img)
        .unwrap();
    let mut b8 = [0u8; 8];
    f.read_exact_at(&mut b8, 48).unwrap();
    let table = u64::from_be_bytes(b8);
    f.read_exact_at(&mut b8, table).unwrap();
    let block = u64::from_be_bytes(b8);
    f.write_all_at(&value.to_be_bytes(), block + 2 * n).unwrap();
    f.sync_all().unwrap();
}

#[test]
fn check_r_leaks_and_all_repair_what_qemu_img_check_finds() {
    if !qemu_available() {
        return;
    }
    let d = tempdir();
    // A leak: a cluster past the end counted as used.
    let img = d.path().join("leak.qcow2");
    strata_ok(&["create", "-q", s(&img), "8M"]);
    strata_ok(&["io", "-c", "write -P 0x42 0 256k", s(&img)]);
    let len = std::fs::metadata(&img).unwrap().len();
    let n = len.div_ceil(65536);
    set_refcount(&img, n, 1);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len((n + 1) * 65536)
        .unwrap();
    assert_eq!(qemu_img(&["check", s(&img)]).code, 3);
    let r = strata(&["check", "-r", "leaks", s(&img)]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert!(
        r.stdout
            .contains("The following inconsistencies were found and repaired:")
            && r.stdout.contains("    1 leaked clusters\n")
            && r.stdout.contains("Double checking the fixed image now...")
            && r.stdout.contains("No errors were found on the image."),
        "{}",
        r.stdout
    );
    check_clean(&img);
    strata_ok(&["io", "-c", "read -P 0x42 0 256k", s(&img)]);

    // A corruption: the header cluster's refcount dropped to zero.
    let img = d.path().join("corrupt.qcow2");
    strata_ok(&["create", "-q", s(&img), "8M"]);
    strata_ok(&["io", "-c", "write -P 0x43 64k 128k", s(&img)]);
    set_refcount(&img, 0, 0);
    assert_eq!(qemu_img(&["check", s(&img)]).code, 2);
    assert_eq!(strata(&["check", s(&img)]).code, 2);
    // -r leaks does not fix it (it fails as qemu-img's: "need to rebuild
    // refcount structures", on a copy); -r all does.
    let copy = d.path().join("copy.qcow2");
    std::fs::copy(&img, &copy).unwrap();
    assert_eq!(qemu_img(&["check", "-r", "leaks", s(&copy)]).code, 1);
    assert_eq!(strata(&["check", "-r", "leaks", s(&img)]).code, 1);
    let r = strata(&["check", "-r", "all", s(&img)]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("corruptions"), "{}", r.stdout);
    check_clean(&img);
    strata_ok(&["io", "-c", "read -P 0x43 64k 128k", s(&img)]);
    let bad = strata(&["check", "-r", "some", s(&img)]);
    assert_ne!(bad.code, 0);
}

#[test]
fn rebase_u_rewrites_the_backing_name_and_empty_b_drops_it() {
    if !qemu_available() {
        return;
    }
    let d = tempdir();
    let top = qemu_chain(d.path(), "cluster_size=64k");
    std::fs::copy(d.path().join("base.qcow2"), d.path().join("moved.qcow2")).unwrap();
    let no_fmt = strata(&["rebase", "-u", "-b", "moved.qcow2", s(&top)]);
    assert_ne!(no_fmt.code, 0);
    strata_ok(&["rebase", "-u", "-b", "moved.qcow2", "-F", "qcow2", s(&top)]);
    let info = info_json(&top);
    assert_eq!(info["backing-filename"], "moved.qcow2");
    assert_eq!(info["backing-filename-format"], "qcow2");
    check_clean(&top);
    strata_ok(&["io", "-c", "read -P 0x11 0 1M", s(&top)]);
    strata_ok(&["rebase", "-u", "-b", "", s(&top)]);
    let info = info_json(&top);
    assert!(info.get("backing-filename").is_none(), "{info}");
    check_clean(&top);
}

#[test]
fn safe_rebase_keeps_the_view_like_qemu_img_rebase() {
    if !qemu_available() {
        return;
    }
    let d = tempdir();
    let q = qemu_chain(&d.path().join("q"), "cluster_size=64k");
    let t = qemu_chain(&d.path().join("t"), "cluster_size=64k");
    for top in [&q, &t] {
        qemu_io_ok(top, &["write -P 0x21 512k 64k"]);
        qemu_img_ok(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            s(&top.with_file_name("new.qcow2")),
            "4M",
        ]);
    }
    qemu_img_ok(&["rebase", "-b", "new.qcow2", "-F", "qcow2", s(&q)]);
    strata_ok(&["rebase", "-b", "new.qcow2", "-F", "qcow2", s(&t)]);
    identical(&q, &t);
    check_clean(&t);
    assert_eq!(info_json(&t)["backing-filename"], "new.qcow2");
}

#[test]
fn commit_and_pull_match_qemu_img_on_twins_and_dry_runs_change_nothing() {
    if !qemu_available() {
        return;
    }
    let d = tempdir();
    let q = qemu_chain(&d.path().join("q"), "cluster_size=64k");
    let t = qemu_chain(&d.path().join("t"), "cluster_size=64k");
    for top in [&q, &t] {
        qemu_io_ok(top, TWIN_COMMANDS);
    }
    let files = |top: &Path| [read_file(top), read_file(&top.with_file_name("base.qcow2"))];
    // Dry runs change nothing.
    let before = files(&t);
    let r = strata_ok(&["commit", "--dry-run", s(&t)]);
    assert!(
        r.stdout.contains("Dry run") && r.stdout.contains("grows by"),
        "{}",
        r.stdout
    );
    let r = strata_ok(&["pull", "--dry-run", s(&t)]);
    assert!(r.stdout.contains("data to copy"), "{}", r.stdout);
    assert!(before == files(&t), "a dry run changed a file");
    // Pull vs qemu-img rebase -b '' on copies of the twins.
    let (qp, tp) = (
        q.with_file_name("pulled.qcow2"),
        t.with_file_name("pulled.qcow2"),
    );
    std::fs::copy(&q, &qp).unwrap();
    std::fs::copy(&t, &tp).unwrap();
    qemu_img_ok(&["rebase", "-b", "", s(&qp)]);
    strata_ok(&["pull", s(&tp)]);
    identical(&qp, &tp);
    identical(&tp, &t);
    check_clean(&tp);
    assert!(info_json(&tp).get("backing-filename").is_none());
    // Commit vs qemu-img commit.
    qemu_img_ok(&["commit", s(&q)]);
    let r = strata_ok(&["commit", s(&t)]);
    assert_eq!(r.stdout, "Image committed.\n");
    let (qb, tb) = (
        q.with_file_name("base.qcow2"),
        t.with_file_name("base.qcow2"),
    );
    identical(&qb, &tb);
    identical(&q, &t);
    check_clean(&tb);
    check_clean(&t);
    // The top was emptied.
    let map: serde_json::Value =
        serde_json::from_str(&strata_ok(&["map", "--output", "json", s(&t)]).stdout).unwrap();
    assert!(
        map.as_array().unwrap().iter().all(|e| e["depth"] != 0),
        "{map}"
    );
}

#[cfg(feature = "libvirt")]
mod libvirt {
    use super::*;

    /// A test-driver domain "vm" with disk vda on DIR/vm.qcow2; returns
    /// the URI.
    fn test_domain(dir: &Path) -> String {
        let dir = std::fs::canonicalize(dir).unwrap();
        let disk = dir.join("vm.qcow2");
        strata_ok(&["create", "-q", s(&disk), "16M"]);
        strata_ok(&["io", "-c", "write -P 0x11 0 1M", s(&disk)]);
        test_driver_uri(&dir, &qcow2_disk_xml(&disk, "vda"))
    }

    #[test]
    fn snapshot_commands_run_the_lifecycle_on_the_test_driver() {
        let d = tempdir();
        let uri = test_domain(d.path());
        let u = uri.as_str();
        let dir = std::fs::canonicalize(d.path()).unwrap();
        let r = strata_ok(&["snapshot", "create", "vm", "take-1", "-c", u]);
        assert!(
            r.stdout.contains("Domain snapshot take-1 created"),
            "{}",
            r.stdout
        );
        let overlay = dir.join("vm.take-1");
        assert!(overlay.exists());
        strata_ok(&["io", "-c", "write -P 0x22 2M 64k", s(&overlay)]);
        strata_ok(&[
            "snapshot",
            "create",
            "vm",
            "take-2",
            "--description",
            "second",
            "-c",
            u,
        ]);
        let tree = strata_ok(&["snapshot", "list", "vm", "--tree", "-c", u]).stdout;
        assert!(
            tree.starts_with("take-1\n  |\n  +- take-2 (current)\n"),
            "{tree:?}"
        );
        let list = strata_ok(&["snapshot", "list", "vm", "-c", u]).stdout;
        assert!(list.starts_with(" Name "), "{list}");
        assert!(
            list.contains("Creation Time") && list.contains(" take-2 "),
            "{list}"
        );
        let json: serde_json::Value = serde_json::from_str(
            &strata_ok(&["snapshot", "list", "vm", "--output", "json", "-c", u]).stdout,
        )
        .unwrap();
        let snaps = json.as_array().unwrap();
        assert_eq!(snaps.len(), 2);
        assert_eq!(snaps[1]["name"], "take-2");
        assert_eq!(snaps[1]["parent"], "take-1");
        assert_eq!(snaps[1]["current"], true);
        assert_eq!(snaps[0]["disks"][0]["disk"], "vda");
        assert_eq!(
            snaps[0]["disks"][0]["state-file"],
            dir.join("vm.qcow2").display().to_string()
        );
        assert_eq!(
            snaps[0]["disks"][0]["overlay"],
            overlay.display().to_string()
        );
        // Revert to take-1: the view is take-1's.
        let r = strata_ok(&["snapshot", "revert", "vm", "take-1", "-c", u]);
        assert!(
            r.stdout.contains("reverted to snapshot take-1"),
            "{}",
            r.stdout
        );
        let tree = strata_ok(&["snapshot", "list", "vm", "--tree", "-c", u]).stdout;
        assert!(tree.starts_with("take-1 (current)\n"), "{tree:?}");
        // Delete take-2.
        strata_ok(&["snapshot", "delete", "vm", "take-2", "-c", u]);
        let json: serde_json::Value = serde_json::from_str(
            &strata_ok(&["snapshot", "list", "vm", "--output", "json", "-c", u]).stdout,
        )
        .unwrap();
        assert_eq!(json.as_array().unwrap().len(), 1);
        // Blockcommit refuses to destroy take-1's state without the flag.
        let refused = strata(&["blockcommit", "vm", "-c", u]);
        assert_ne!(refused.code, 0);
        assert!(refused.stderr.starts_with("strata: "), "{}", refused.stderr);
        let r = strata_ok(&["blockcommit", "vm", "--delete-snapshots", "-c", u]);
        assert!(
            r.stdout.contains("Successfully committed and pivoted"),
            "{}",
            r.stdout
        );
        assert!(r.stdout.contains("Disk vda now uses"), "{}", r.stdout);
        let list = strata_ok(&["snapshot", "list", "vm", "--output", "json", "-c", u]).stdout;
        assert_eq!(list.trim(), "[]");
        strata_ok(&["io", "-c", "read -P 0x11 0 1M", s(&dir.join("vm.qcow2"))]);
        // Errors name the problem and exit nonzero.
        let missing = strata(&["snapshot", "revert", "vm", "nope", "-c", u]);
        assert_ne!(missing.code, 0);
        assert!(missing.stderr.starts_with("strata: "), "{}", missing.stderr);
    }
}

/// Runs `args` while qemu-io holds `held`, and asserts that strata refuses
/// with qemu-img's words and that every file in `dir` is byte-identical
/// afterwards (and no other file appeared).
fn refused_while_held(dir: &Path, held: &Path, args: &[&str]) {
    let snapshot = || {
        let mut files: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .map(|p| {
                let bytes = std::fs::read(&p).unwrap();
                (p, bytes)
            })
            .collect();
        files.sort();
        files
    };
    let before = snapshot();
    let holder = QemuIoHolds::start(held);
    let r = strata(args);
    drop(holder);
    assert_fails_with(&r, 1, &["Failed to get \"write\" lock", s(held)]);
    assert!(
        before == snapshot(),
        "strata {args:?} changed the files in {}",
        dir.display()
    );
}

#[test]
fn every_writing_command_is_refused_while_qemu_io_holds_the_image_and_changes_nothing() {
    if !qemu_available() {
        return;
    }
    // Arrange: base <- top with data in both, and a separate source.
    let d = tempdir();
    let dir = d.path();
    let base = dir.join("base.qcow2");
    let top = dir.join("top.qcow2");
    let src = dir.join("src.qcow2");
    qemu_img_ok(&["create", "-q", "-f", "qcow2", s(&base), "2M"]);
    qemu_io_ok(&base, &["write -P 0x11 0 64k"]);
    qemu_overlay(&top, "base.qcow2");
    qemu_io_ok(&top, &["write -P 0x22 64k 64k"]);
    qemu_img_ok(&["create", "-q", "-f", "qcow2", s(&src), "1M"]);
    // qemu-img itself refuses to replace a held image.
    {
        let _holder = QemuIoHolds::start(&src);
        let q = qemu_img(&["create", "-f", "qcow2", s(&src), "1M"]);
        assert_ne!(q.code, 0, "qemu-img create replaced a held image");
        assert!(
            q.stderr.contains("Failed to get \"write\" lock"),
            "{}",
            q.stderr
        );
    }
    // Act + Assert: every command that writes or replaces a file, on the
    // file qemu-io holds.
    let (b, t, sr) = (s(&base), s(&top), s(&src));
    let cases: &[(&Path, Vec<&str>)] = &[
        (&top, vec!["create", "-q", t, "4M"]),
        (&top, vec!["create", "-f", "raw", t, "4M"]),
        (&top, vec!["create", "-b", "base.qcow2", "-F", "qcow2", t]),
        (&base, vec!["convert", "-O", "qcow2", sr, b]),
        (&base, vec!["convert", "-O", "raw", sr, b]),
        (&base, vec!["convert", "-c", "-O", "qcow2", sr, b]),
        (&top, vec!["io", "-c", "write 0 512", t]),
        (&top, vec!["check", "-r", "leaks", t]),
        (&top, vec!["check", "-r", "all", t]),
        (&top, vec!["rebase", "-u", "-b", "", t]),
        (&top, vec!["rebase", "-b", "", t]),
        (&top, vec!["commit", t]),
        (&base, vec!["commit", t]),
        (&top, vec!["pull", t]),
    ];
    for (held, args) in cases {
        refused_while_held(dir, held, args);
    }
}

#[test]
fn create_refuses_an_image_backed_by_itself_by_name_symlink_or_hard_link() {
    if !qemu_available() {
        return;
    }
    let d = tempdir();
    let x = d.path().join("x.qcow2");
    qemu_img_ok(&["create", "-q", "-f", "qcow2", s(&x), "1M"]);
    qemu_io_ok(&x, &["write -P 0x5a 0 4k"]);
    std::os::unix::fs::symlink("x.qcow2", d.path().join("sym.qcow2")).unwrap();
    std::fs::hard_link(&x, d.path().join("hard.qcow2")).unwrap();
    let before = read_file(&x);
    // The oracle refuses the plain case (it compares the names as given),
    // touching nothing.
    let q = qemu_img(&["create", "-f", "qcow2", "-b", s(&x), "-F", "qcow2", s(&x)]);
    assert_ne!(q.code, 0);
    assert!(
        q.stderr.contains("same filename as the backing file"),
        "{}",
        q.stderr
    );
    assert_eq!(read_file(&x), before);
    for name in [s(&x), "x.qcow2", "./x.qcow2", "sym.qcow2", "hard.qcow2"] {
        for extra in [&[][..], &["-u", "1M"][..]] {
            let mut args = vec!["create", "-b", name, "-F", "qcow2", s(&x)];
            args.extend_from_slice(extra);
            let r = strata(&args);
            assert_fails_with(&r, 1, &["same filename as the backing file"]);
            assert!(!r.stdout.contains("Formatting"), "{}", r.stdout);
            assert_eq!(read_file(&x), before, "{args:?} changed x.qcow2");
        }
    }
    // A backing file whose own chain holds the image would make a loop.
    let y = d.path().join("y.qcow2");
    qemu_overlay(&y, "x.qcow2");
    let r = strata(&["create", "-b", "y.qcow2", "-F", "qcow2", s(&x)]);
    assert_fails_with(&r, 1, &["x.qcow2", "loop"]);
    assert_eq!(read_file(&x), before);
}

/// The names in `dir`, sorted.
fn names_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn a_create_that_fails_leaves_the_old_file_as_it_was_and_prints_no_formatting_line() {
    if !qemu_available() {
        return;
    }
    let d = tempdir();
    let old = d.path().join("existing.qcow2");
    qemu_img_ok(&["create", "-q", "-f", "qcow2", s(&old), "1M"]);
    qemu_io_ok(&old, &["write -P 0x77 0 64k"]);
    let before = read_file(&old);
    // qemu-img refuses these sizes too.
    for size in ["5P", "4E"] {
        assert_ne!(
            qemu_img(&["create", "-f", "qcow2", "/dev/null/x", size]).code,
            0
        );
        let r = strata(&["create", s(&old), size]);
        assert_fails_with(&r, 1, &["existing.qcow2", "too large"]);
        assert_eq!(r.stdout, "", "printed Formatting for a create that failed");
        assert_eq!(read_file(&old), before, "size {size}");
    }
    let r = strata(&["create", "-o", "cluster_size=512", s(&old), "1P"]);
    assert_fails_with(&r, 1, &["too large"]);
    assert_eq!(read_file(&old), before);
    // A header that cannot hold the backing name in one 512-byte cluster.
    let long = "b".repeat(1000);
    let r = strata(&[
        "create",
        "-u",
        "-o",
        "cluster_size=512",
        "-b",
        &long,
        "-F",
        "qcow2",
        s(&old),
        "1M",
    ]);
    assert_fails_with(&r, 1, &["do not fit"]);
    assert_eq!(r.stdout, "");
    assert_eq!(read_file(&old), before);
    assert_eq!(names_in(d.path()), ["existing.qcow2"]);
}

#[test]
fn create_over_an_existing_image_replaces_it_whole_keeping_its_mode() {
    if !qemu_available() {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let d = tempdir();
    let img = d.path().join("img.qcow2");
    qemu_img_ok(&["create", "-q", "-f", "qcow2", s(&img), "1M"]);
    qemu_io_ok(&img, &["write -P 0x77 0 64k"]);
    std::fs::set_permissions(&img, std::fs::Permissions::from_mode(0o640)).unwrap();
    std::os::unix::fs::symlink("img.qcow2", d.path().join("link.qcow2")).unwrap();
    // Through the link: the file it points to is replaced, the link stays.
    strata_ok(&["create", "-q", s(&d.path().join("link.qcow2")), "3M"]);
    let info = info_json(&img);
    assert_eq!(info["virtual-size"], 3 * MIB);
    check_clean(&img);
    // The old data is gone: the new image reads zeros.
    qemu_io_ok(&img, &["read -P 0 0 3M"]);
    assert_eq!(
        std::fs::metadata(&img).unwrap().permissions().mode() & 0o777,
        0o640
    );
    assert!(std::fs::symlink_metadata(d.path().join("link.qcow2"))
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(names_in(d.path()), ["img.qcow2", "link.qcow2"]);
}

#[test]
fn sizes_are_rounded_up_to_512_bytes_like_qemu_img_create() {
    if !qemu_available() {
        return;
    }
    let d = tempdir();
    let (qd, sd) = (d.path().join("qemu"), d.path().join("strata"));
    std::fs::create_dir_all(&qd).unwrap();
    std::fs::create_dir_all(&sd).unwrap();
    for fmt in ["qcow2", "raw"] {
        for size in ["1", "511", "512", "513", "1000", "65537", "1048575"] {
            let name = format!("s{size}.{fmt}");
            let (q, st) = (qd.join(&name), sd.join(&name));
            let qout = qemu_img_ok(&["create", "-f", fmt, s(&q), size]);
            let r = strata_ok(&["create", "-f", fmt, s(&st), size]);
            // The same Formatting line (qemu-img prints the size as given).
            assert_eq!(r.stdout.replace(s(&sd), s(&qd)), qout, "{fmt} {size}");
            let (qi, si) = (info_json(&q), info_json(&st));
            assert_eq!(si["virtual-size"], qi["virtual-size"], "{fmt} {size}");
            if fmt == "raw" {
                assert_eq!(
                    std::fs::metadata(&st).unwrap().len(),
                    std::fs::metadata(&q).unwrap().len(),
                    "raw {size}"
                );
            } else {
                check_clean(&st);
            }
        }
    }
    // convert's output has the rounded length too.
    let src = sd.join("s513.qcow2");
    let (qraw, sraw) = (qd.join("c.raw"), sd.join("c.raw"));
    qemu_img_ok(&["convert", "-O", "raw", s(&src), s(&qraw)]);
    strata_ok(&["convert", "-O", "raw", s(&src), s(&sraw)]);
    assert_eq!(
        std::fs::metadata(&sraw).unwrap().len(),
        std::fs::metadata(&qraw).unwrap().len()
    );
}

#[test]
fn a_convert_that_fails_leaves_the_existing_destination_as_it_was() {
    if !qemu_available() {
        return;
    }
    // Arrange: a source whose L1 entry points at an unaligned L2 table,
    // so that reading its data fails once the convert has started (a
    // table past the end of the file would read as zeros, as in QEMU).
    let d = tempdir();
    let src = d.path().join("src.qcow2");
    qemu_img_ok(&["create", "-q", "-f", "qcow2", s(&src), "4M"]);
    qemu_io_ok(&src, &["write -P 0x11 0 64k"]);
    let mut bytes = read_file(&src);
    let l1 = u64::from_be_bytes(bytes[40..48].try_into().unwrap()) as usize;
    bytes[l1..l1 + 8].copy_from_slice(&((1u64 << 63) | 0x10200).to_be_bytes());
    std::fs::write(&src, &bytes).unwrap();
    let dst = d.path().join("dst.img");
    std::fs::write(&dst, b"the old contents").unwrap();
    for fmt in ["raw", "qcow2"] {
        // Act
        let r = strata(&["convert", "-O", fmt, s(&src), s(&dst)]);
        // Assert
        assert_fails_with(&r, 1, &["src.qcow2", "L2 table offset not cluster-aligned"]);
        let now = read_file(&dst);
        assert!(
            now == b"the old contents",
            "-O {fmt}: the destination was changed ({} bytes now)",
            now.len()
        );
        assert_eq!(names_in(d.path()), ["dst.img", "src.qcow2"]);
    }
}
