//! Bad chains and bad input: clear errors on stderr, nonzero exit, never a
//! panic.

mod common;

use std::path::{Path, PathBuf};

use common::*;

fn create(args: &[&str]) {
    let mut full = vec!["create", "-q", "-f", "qcow2"];
    full.extend_from_slice(args);
    qemu_img_ok(&full);
}

/// Creates a 1 MiB qcow2 image `base` in `dir` and an overlay `top` on it
/// (its backing file named relatively, its format recorded).
fn create_base_and_overlay(dir: &Path, base: &str, top: &str) -> (PathBuf, PathBuf) {
    let (base_path, top_path) = (dir.join(base), dir.join(top));
    create(&[s(&base_path), "1M"]);
    create(&["-b", base, "-F", "qcow2", s(&top_path)]);
    (base_path, top_path)
}

/// Runs ARGS with qemu-img and with strata and asserts that both succeed
/// with the same stdout.
fn assert_succeeds_like_qemu_img(args: &[&str]) {
    let expected = qemu_img_ok(args);
    let r = strata(args);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.stdout, expected);
}

/// A small file of zeros, which qemu-img probes as raw.
fn zeroed_file(dir: &Path) -> PathBuf {
    let f = dir.join("x.img");
    std::fs::write(&f, [0u8; 512]).unwrap();
    f
}

/// Renames the backing-format header extension of a qcow2 image to an
/// unknown extension type, so the image names a backing file without
/// recording its format (what old qemu-img versions wrote).
fn forget_backing_format(img: &Path) {
    let mut b = std::fs::read(img).unwrap();
    let be32 = |b: &[u8], at: usize| u32::from_be_bytes(b[at..at + 4].try_into().unwrap());
    let mut at = be32(&b, 100) as usize; // header_length (v3)
    loop {
        let (magic, len) = (be32(&b, at), be32(&b, at + 4) as usize);
        assert_ne!(magic, 0, "no backing format extension found");
        if magic == 0xe279_2aca {
            b[at..at + 4].copy_from_slice(&0x5354_5241u32.to_be_bytes());
            break;
        }
        at += 8 + len.div_ceil(8) * 8;
    }
    std::fs::write(img, b).unwrap();
}

/// Creates base.qcow2 and an overlay top.qcow2 on it in `dir`, then
/// forgets the overlay's backing format; returns the overlay.
fn overlay_without_backing_format(dir: &Path) -> PathBuf {
    let (_, top) = create_base_and_overlay(dir, "base.qcow2", "top.qcow2");
    forget_backing_format(&top);
    top
}

#[test]
fn a_backing_file_without_recorded_format_is_refused_with_how_to_record_it() {
    if !qemu_available() {
        return;
    }
    // Arrange
    let d = tempdir();
    let top = overlay_without_backing_format(d.path());
    // Act
    let r = strata_bin(&["map", s(&top)]);
    // Assert
    assert_fails_with(
        &r,
        1,
        &[
            "top.qcow2",
            "no recorded format",
            "rebase -u -b base.qcow2 -F",
        ],
    );
    for cmd in [&["convert", "-O", "raw"][..], &["info", "--backing-chain"]] {
        let mut args = cmd.to_vec();
        args.push(s(&top));
        let out = d.path().join("out.raw");
        if cmd[0] == "convert" {
            args.push(s(&out));
        }
        let r = strata(&args);
        assert_eq!(r.code, 1, "{args:?}");
        assert!(r.stderr.contains("no recorded format"), "{}", r.stderr);
    }
}

#[test]
fn info_of_an_image_alone_does_not_need_its_backing_format() {
    if !qemu_available() {
        return;
    }
    // qemu-img info opens the image without its backing chain; so does
    // strata info without --backing-chain.
    let d = tempdir();
    let top = overlay_without_backing_format(d.path());
    assert_succeeds_like_qemu_img(&["info", "--output", "json", s(&top)]);
}

#[test]
fn a_backing_loop_between_two_images_is_refused() {
    if !qemu_available() {
        return;
    }
    let d = tempdir();
    let (a, b) = create_base_and_overlay(d.path(), "a.qcow2", "b.qcow2");
    qemu_img_ok(&["rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", s(&a)]);
    for cmd in ["map", "info --backing-chain", "compare"] {
        let mut args: Vec<&str> = cmd.split(' ').collect();
        args.push(s(&a));
        if cmd == "compare" {
            args.push(s(&b));
        }
        let r = strata(&args);
        assert_ne!(r.code, 0, "{args:?}");
        assert!(r.stderr.starts_with("strata: "), "{}", r.stderr);
        assert!(r.stderr.contains("loops"), "{args:?}: {}", r.stderr);
    }
}

#[test]
fn an_image_naming_itself_as_backing_is_refused() {
    if !qemu_available() {
        return;
    }
    let d = tempdir();
    let a = d.path().join("self.qcow2");
    create(&[s(&a), "1M"]);
    qemu_img_ok(&["rebase", "-u", "-b", "self.qcow2", "-F", "qcow2", s(&a)]);
    let r = strata_bin(&["convert", "-O", "raw", s(&a), s(&d.path().join("o.raw"))]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("loops"), "{}", r.stderr);
    assert!(r.stderr.contains("self.qcow2"), "{}", r.stderr);
}

#[test]
fn a_missing_backing_file_is_a_clear_error() {
    if !qemu_available() {
        return;
    }
    let d = tempdir();
    let (base, top) = create_base_and_overlay(d.path(), "gone.qcow2", "top.qcow2");
    std::fs::remove_file(&base).unwrap();
    let r = strata_bin(&["map", "--output", "json", s(&top)]);
    assert_fails_with(&r, 1, &["top.qcow2", "gone.qcow2", "No such file"]);
    assert!(r.stdout.is_empty());
}

#[test]
fn a_file_without_qcow2_magic_is_probed_as_raw_like_qemu_img() {
    if !qemu_available() {
        return;
    }
    let d = tempdir();
    let f = d.path().join("junk.img");
    std::fs::write(
        &f,
        (0..10_000u32)
            .map(|i| (i * 7 % 251) as u8)
            .collect::<Vec<_>>(),
    )
    .unwrap();
    assert_succeeds_like_qemu_img(&["info", "--output", "json", s(&f)]);
    let expected = qemu_img_ok(&["map", "--output", "json", s(&f)]);
    assert_eq!(strata(&["map", "--output", "json", s(&f)]).stdout, expected);
}

/// A small deterministic generator for mutations.
struct XorShift(u64);
impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn damaged_qcow2_images_give_errors_not_panics() {
    if !qemu_available() {
        return;
    }
    // Arrange: a small valid image with data, zeros and a snapshot.
    let d = tempdir();
    let good = d.path().join("good.qcow2");
    create(&["-o", "cluster_size=4k", s(&good), "256k"]);
    qemu_io("qcow2", &good, &["write -P 0xaa 0 40k", "write -z 64k 8k"]);
    qemu_img_ok(&["snapshot", "-c", "s1", s(&good)]);
    let bytes = std::fs::read(&good).unwrap();
    let bad = d.path().join("bad.qcow2");
    let out = d.path().join("out.raw");
    let mut rng = XorShift(0x5eed_1234_5678_9abc);
    // STRATA_MUTATION_ROUNDS raises the count for a longer hunt.
    let rounds: u32 = std::env::var("STRATA_MUTATION_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(150);
    for round in 0..rounds {
        // Act: flip a few bytes in the metadata area, or truncate.
        let mut b = bytes.clone();
        if round % 10 == 9 {
            b.truncate((rng.next() % b.len() as u64) as usize);
        } else {
            let hot = b.len().min(6 * 4096) as u64;
            for _ in 0..1 + rng.next() % 4 {
                let at = (rng.next() % hot) as usize;
                b[at] = rng.next() as u8;
            }
        }
        std::fs::write(&bad, &b).unwrap();
        // Assert: every command finishes with an exit code (a panic would
        // fail this test), errors are prefixed.
        for args in [
            vec!["info", "--output", "json", s(&bad)],
            vec!["info", s(&bad)],
            vec!["map", "--output", "json", s(&bad)],
            vec!["convert", "-O", "raw", s(&bad), s(&out)],
            vec!["compare", s(&bad), s(&good)],
        ] {
            let r = strata(&args);
            // compare: 1 means "different", 2 an error.
            let failed = if args[0] == "compare" {
                r.code == 2
            } else {
                r.code != 0
            };
            if failed {
                assert!(r.stderr.starts_with("strata: "), "{args:?}: {}", r.stderr);
            } else {
                assert!(
                    r.code == 0 || r.stdout.contains("mismatch"),
                    "{args:?}: {r:?}"
                );
            }
        }
    }
    // And the binary exits 1 with a message on a header that is garbage
    // after the magic.
    let mut b = b"QFI\xfb".to_vec();
    b.extend((0..4096u32).map(|i| (i * 31 % 256) as u8));
    std::fs::write(&bad, &b).unwrap();
    let r = strata_bin(&["info", s(&bad)]);
    assert_fails_with(&r, 1, &["bad.qcow2"]);
    assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
}

#[test]
fn info_without_force_share_fails_while_a_writer_holds_the_image() {
    if !qemu_available() {
        return;
    }
    use std::io::Write as _;
    use std::process::{Command, Stdio};
    // Arrange: qemu-io keeps the image open read-write while it waits for
    // commands on stdin.
    let d = tempdir();
    let img = d.path().join("busy.qcow2");
    create(&[s(&img), "1M"]);
    let mut writer = Command::new("qemu-io")
        .args(["-f", "qcow2", s(&img)])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Once qemu-io answers a command it has the image open, and locked.
    // (Polling with `qemu-img info` instead raced: a probe holding its
    // read lock while qemu-io opened made qemu-io fail to lock.)
    let mut stdin = writer.stdin.take().unwrap();
    stdin.write_all(b"length\n").unwrap();
    let mut answer = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(writer.stdout.take().unwrap()),
        &mut answer,
    )
    .unwrap();
    let qemu_img_refused = qemu_img(&["info", s(&img)]).code != 0;
    // Act
    let locked = strata(&["info", s(&img)]);
    let shared = strata(&["info", "-U", s(&img)]);
    stdin.write_all(b"quit\n").unwrap();
    drop(stdin);
    let out = writer.wait_with_output().unwrap();
    // Assert
    assert!(
        answer.contains("MiB") && qemu_img_refused,
        "qemu-io did not hold the image (answer {answer:?}; stderr: {})",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(locked.code, 1);
    assert!(locked.stderr.contains("busy.qcow2"), "{}", locked.stderr);
    assert_eq!(shared.code, 0, "{}", shared.stderr);
}

#[test]
fn convert_refuses_to_overwrite_its_own_source() {
    if !qemu_available() {
        return;
    }
    let d = tempdir();
    let (base, top) = create_base_and_overlay(d.path(), "base.qcow2", "top.qcow2");
    let before = std::fs::read(&base).unwrap();
    let r = strata(&["convert", "-O", "raw", s(&top), s(&base)]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("refusing to overwrite"), "{}", r.stderr);
    assert_eq!(std::fs::read(&base).unwrap(), before);
}

#[test]
fn unknown_formats_and_options_are_usage_errors() {
    let d = tempdir();
    let f = zeroed_file(d.path());
    let r = strata(&["info", "-f", "vmdk", s(&f)]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("unknown image format"), "{}", r.stderr);
    let r = strata(&["convert", "-O", "vdi", s(&f), s(&d.path().join("y"))]);
    assert_eq!(r.code, 1);
    let r = strata(&["map", "--output", "xml", s(&f)]);
    assert_ne!(r.code, 0);
    let r = strata(&["frobnicate"]);
    assert_ne!(r.code, 0);
}

#[test]
fn check_of_a_raw_image_is_unsupported_with_qemu_img_exit_code() {
    let d = tempdir();
    let f = zeroed_file(d.path());
    let r = strata_bin(&["check", s(&f)]);
    assert_eq!(r.code, 63);
    assert!(r.stderr.contains("does not support checks"), "{}", r.stderr);
}

#[test]
fn check_repair_of_a_clean_image_changes_nothing_and_bad_modes_are_refused() {
    if !qemu_available() {
        return;
    }
    let d = tempdir();
    let img = d.path().join("x.qcow2");
    create(&[s(&img), "1M"]);
    let before = std::fs::read(&img).unwrap();
    let r = strata(&["check", "-r", "leaks", s(&img)]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(!r.stdout.contains("repaired"), "{}", r.stdout);
    assert_eq!(std::fs::read(&img).unwrap(), before);
    let r = strata(&["check", "-r", "everything", s(&img)]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("invalid repair mode"), "{}", r.stderr);
    assert_eq!(std::fs::read(&img).unwrap(), before);
}

#[test]
fn check_of_a_leaky_image_exits_3_like_qemu_img() {
    if !qemu_available() {
        return;
    }
    // Arrange: a cluster past the end of the metadata that has a
    // refcount but no reference (a leak), made by hand in the first
    // refcount block.
    let d = tempdir();
    let img = d.path().join("leaky.qcow2");
    create(&["-o", "cluster_size=64k", s(&img), "1M"]);
    qemu_io("qcow2", &img, &["write -P 1 0 64k"]);
    let mut b = std::fs::read(&img).unwrap();
    let be64 = |b: &[u8], at: usize| u64::from_be_bytes(b[at..at + 8].try_into().unwrap());
    let reftable = be64(&b, 48) as usize;
    let block = be64(&b, reftable) as usize;
    // Append one cluster and give it refcount 1 (16-bit refcounts).
    let idx = b.len() / 65536;
    b.resize(b.len() + 65536, 0);
    b[block + 2 * idx..block + 2 * idx + 2].copy_from_slice(&1u16.to_be_bytes());
    std::fs::write(&img, &b).unwrap();
    // Act
    let q = qemu_img(&["check", s(&img)]);
    let r = strata(&["check", s(&img)]);
    // Assert
    assert_eq!(q.code, 3, "{}", q.stdout);
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert_eq!(r.stdout, q.stdout);
    assert!(r.stderr.contains("Leaked cluster"), "{}", r.stderr);
}

/// Runs the `strata` binary with a deadline: a command that hangs is
/// killed and reported as such (exit code `None`).
fn strata_bin_within(args: &[&str], deadline: std::time::Duration) -> (Option<i32>, String) {
    use std::process::{Command, Stdio};
    let mut child = Command::new(env!("CARGO_BIN_EXE_strata"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run strata");
    let start = std::time::Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("wait for strata") {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut e, &mut err);
            }
            return (status.code(), err);
        }
        if start.elapsed() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return (None, String::new());
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

#[test]
fn a_fifo_or_directory_as_image_or_backing_file_is_refused_at_once() {
    if !qemu_available() {
        return;
    }
    // Arrange: a FIFO nobody writes to (opening it to read would wait
    // forever), a directory, and qcow2 overlays naming each as backing
    // file (a hostile image can name any host path).
    let d = tempdir();
    let fifo = d.path().join("fifo");
    nix_mkfifo(&fifo);
    std::fs::create_dir(d.path().join("dir")).unwrap();
    for (top, backing) in [("on-fifo.qcow2", "fifo"), ("on-dir.qcow2", "dir")] {
        create(&[
            "-u",
            "-b",
            backing,
            "-F",
            "raw",
            s(&d.path().join(top)),
            "1M",
        ]);
    }
    let out = d.path().join("out.raw");
    let deadline = std::time::Duration::from_secs(10);
    for (image, what) in [
        ("fifo", "a FIFO"),
        ("on-fifo.qcow2", "a FIFO"),
        ("on-dir.qcow2", "a directory"),
    ] {
        let img = d.path().join(image);
        let img = s(&img);
        for args in [
            vec!["info", img],
            vec!["info", "--backing-chain", img],
            vec!["map", img],
            vec!["convert", "-O", "raw", img, s(&out)],
            vec!["commit", img],
            vec!["pull", img],
            vec!["io", "-c", "read 0 512", img],
        ] {
            // `info` of the overlay alone does not open its backing file.
            if args == ["info", img] && image != "fifo" {
                continue;
            }
            let (code, err) = strata_bin_within(&args, deadline);
            assert_eq!(code, Some(1), "strata {args:?} hung or did not fail: {err}");
            assert!(err.contains(what), "strata {args:?}: {err}");
            let named = if image == "fifo" { "fifo" } else { image };
            assert!(err.contains(named), "strata {args:?}: {err}");
        }
    }
    assert!(!out.exists());
    // A directory as the named backing file of `create` is refused too.
    let r = strata(&[
        "create",
        "-b",
        "dir",
        "-F",
        "raw",
        s(&d.path().join("new.qcow2")),
    ]);
    assert_fails_with(&r, 1, &["dir", "a directory"]);
}

/// Makes a FIFO at `path` with mkfifo(1).
fn nix_mkfifo(path: &Path) {
    let st = std::process::Command::new("mkfifo")
        .arg(path)
        .status()
        .expect("run mkfifo");
    assert!(st.success());
}

#[test]
fn rebase_onto_a_missing_file_says_its_cause_once() {
    let d = tempdir();
    let img = d.path().join("t.qcow2");
    assert_eq!(strata(&["create", "-q", s(&img), "1M"]).code, 0);
    let r = strata(&["rebase", "-b", "missing.qcow2", "-F", "qcow2", s(&img)]);
    assert_fails_with(&r, 1, &["missing.qcow2", "No such file or directory"]);
    assert_eq!(
        r.stderr.matches("No such file or directory").count(),
        1,
        "{}",
        r.stderr
    );
}

#[test]
fn file_names_that_are_not_utf8_work() {
    if !qemu_available() {
        return;
    }
    use std::ffi::{OsStr, OsString};
    use std::os::unix::ffi::OsStrExt;
    let d = tempdir();
    let img = d.path().join(OsStr::from_bytes(b"\xff.qcow2"));
    let out = d.path().join(OsStr::from_bytes(b"\xfe.raw"));
    let run = |args: &[&OsStr]| {
        let mut argv: Vec<OsString> = vec!["strata".into()];
        argv.extend(args.iter().map(|a| a.to_os_string()));
        let (mut o, mut e) = (Vec::new(), Vec::new());
        let code = strata_cli::run(argv, &mut o, &mut e);
        let text = String::from_utf8_lossy(&e).into_owned();
        assert_eq!(code, 0, "strata {args:?}: {text}");
        String::from_utf8_lossy(&o).into_owned()
    };
    let os = |s: &'static str| OsStr::new(s);
    run(&[os("create"), os("-q"), img.as_os_str(), os("1M")]);
    run(&[
        os("io"),
        os("-c"),
        os("write -P 0x3c 0 4k"),
        img.as_os_str(),
    ]);
    let info = run(&[os("info"), img.as_os_str()]);
    assert!(info.contains("virtual size: 1 MiB"), "{info}");
    run(&[os("map"), img.as_os_str()]);
    run(&[os("check"), img.as_os_str()]);
    run(&[os("check"), os("-r"), os("leaks"), img.as_os_str()]);
    run(&[
        os("convert"),
        os("-O"),
        os("raw"),
        img.as_os_str(),
        out.as_os_str(),
    ]);
    run(&[os("compare"), img.as_os_str(), out.as_os_str()]);
    let bytes = std::fs::read(&out).unwrap();
    assert!(bytes[..4096].iter().all(|&b| b == 0x3c));
    // The merges too: an overlay named in non-UTF-8 bytes on an image
    // (whose name, written into the overlay's header, is UTF-8),
    // committed into it, pulled, rebased.
    let base = d.path().join("base.qcow2");
    run(&[os("create"), os("-q"), base.as_os_str(), os("1M")]);
    let top = d.path().join(OsStr::from_bytes(b"\xfd.qcow2"));
    let back = [os("-b"), base.as_os_str(), os("-F"), os("qcow2")];
    let mut create_top = vec![os("create"), os("-q"), os("-f"), os("qcow2")];
    create_top.extend(back);
    create_top.push(top.as_os_str());
    run(&create_top);
    run(&[
        os("io"),
        os("-c"),
        os("write -P 0x5a 0 4k"),
        top.as_os_str(),
    ]);
    let dry = run(&[os("commit"), os("--dry-run"), top.as_os_str()]);
    assert!(dry.contains("commit 1 layer(s)"), "{dry}");
    run(&[os("commit"), top.as_os_str()]);
    run(&[os("pull"), top.as_os_str()]);
    run(&[os("rebase"), os("-u"), os("-b"), os(""), top.as_os_str()]);
    run(&[
        os("convert"),
        os("-O"),
        os("raw"),
        top.as_os_str(),
        out.as_os_str(),
    ]);
    let bytes = std::fs::read(&out).unwrap();
    assert!(bytes[..4096].iter().all(|&b| b == 0x5a));
}

#[test]
fn info_notes_a_backing_file_outside_the_top_images_directory_tree() {
    if !qemu_available() {
        return;
    }
    // Arrange: vm/top.qcow2 -> ../base.qcow2 (climbs out), and
    // vm/inside.qcow2 -> disks/b.qcow2 (stays inside).
    let d = tempdir();
    let vm = d.path().join("vm");
    std::fs::create_dir_all(vm.join("disks")).unwrap();
    create(&[s(&d.path().join("base.qcow2")), "1M"]);
    create(&[s(&vm.join("disks/b.qcow2")), "1M"]);
    let top = vm.join("top.qcow2");
    let inside = vm.join("inside.qcow2");
    create(&["-b", "../base.qcow2", "-F", "qcow2", s(&top)]);
    create(&["-b", "disks/b.qcow2", "-F", "qcow2", s(&inside)]);
    for chain in [&[][..], &["--backing-chain"][..]] {
        let mut args = vec!["info"];
        args.extend_from_slice(chain);
        // Act
        let mut out_args = args.clone();
        out_args.push(s(&top));
        let out = strata(&out_args);
        let mut in_args = args.clone();
        in_args.push(s(&inside));
        let inn = strata(&in_args);
        // Assert: a note on stderr; stdout stays qemu-img's.
        assert_eq!(out.code, 0, "{}", out.stderr);
        assert!(
            out.stderr.contains("\"../base.qcow2\"")
                && out.stderr.contains("outside the directory tree of"),
            "{}",
            out.stderr
        );
        assert_eq!(out.stdout, qemu_img_ok(&out_args));
        assert_eq!(inn.code, 0, "{}", inn.stderr);
        assert_eq!(inn.stderr, "");
    }
}
