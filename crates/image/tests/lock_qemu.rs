//! Interoperability of `strata_image::lock` with real QEMU tools
//! (`qemu-img`, `qemu-io`), which lock images with OFD locks on bytes
//! 100+perm / 200+perm.
//!
//! The tests fail if the QEMU tools are missing, unless
//! `STRATA_SKIP_QEMU_TESTS` is set, in which case they are skipped.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use strata_image::lock::{lock_file, ImageLock, LockError, LockMode};

/// How long to wait for a spawned QEMU process to take its locks.
const LOCK_TIMEOUT: Duration = Duration::from_secs(20);
/// Polling interval while waiting.
const POLL: Duration = Duration::from_millis(5);

fn have_qemu() -> bool {
    let ok = |tool: &str| {
        Command::new(tool)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    };
    let have = ok("qemu-img") && ok("qemu-io");
    // Missing tools must not turn into silently passing tests: skipping
    // needs an explicit opt-out.
    if !have {
        assert!(
            std::env::var_os("STRATA_SKIP_QEMU_TESTS").is_some(),
            "qemu-img / qemu-io not found (set STRATA_SKIP_QEMU_TESTS=1 to skip)"
        );
        eprintln!("qemu-img / qemu-io not found; skipping");
    }
    have
}

/// A fresh 1 MiB qcow2 image in its own temporary directory.
fn qcow2_image() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("img.qcow2");
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&path)
        .arg("1M")
        .output()
        .expect("run qemu-img create");
    assert!(out.status.success(), "qemu-img create: {out:?}");
    (dir, path)
}

fn open_rw(path: &Path) -> File {
    File::options()
        .read(true)
        .write(true)
        .open(path)
        .expect("open image")
}

/// Kills and reaps the child on drop, whatever way the test ends.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Lock bytes currently held on `path`'s inode, from /proc/locks.
fn locked_bytes(path: &Path) -> Vec<u64> {
    let meta = std::fs::metadata(path).expect("stat image");
    let inode = format!(":{}", meta.ino());
    let locks = std::fs::read_to_string("/proc/locks").expect("read /proc/locks");
    let mut bytes = Vec::new();
    for line in locks.lines() {
        // "1: OFDLCK ADVISORY  READ -1 fe:00:10010841 100 101"
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 8 || fields[1] != "OFDLCK" {
            continue;
        }
        let dev_ino = fields[fields.len() - 3];
        if !dev_ino.ends_with(&inode) {
            continue;
        }
        let (Ok(start), Ok(end)) = (
            fields[fields.len() - 2].parse::<u64>(),
            fields[fields.len() - 1].parse::<u64>(),
        ) else {
            continue;
        };
        bytes.extend(start..=end);
    }
    bytes.sort_unstable();
    bytes.dedup();
    bytes
}

/// Starts `qemu-io <args> -c 'sleep 60000' path` and waits (polling
/// /proc/locks, without taking any lock ourselves) until it holds exactly
/// `expected` lock bytes.
fn spawn_qemu_io(args: &[&str], path: &Path, expected: &[u64]) -> KillOnDrop {
    let child = Command::new("qemu-io")
        .args(args)
        .args(["-c", "sleep 60000"])
        .arg(path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn qemu-io");
    let mut guard = KillOnDrop(child);
    let start = Instant::now();
    loop {
        let held = locked_bytes(path);
        if held == expected {
            return guard;
        }
        if let Ok(Some(status)) = guard.0.try_wait() {
            panic!("qemu-io exited early ({status}); locks seen: {held:?}");
        }
        assert!(
            start.elapsed() < LOCK_TIMEOUT,
            "qemu-io did not take locks {expected:?} in time; seen {held:?}"
        );
        std::thread::sleep(POLL);
    }
}

fn run(tool: &str, args: &[&str], path: &Path) -> Output {
    Command::new(tool)
        .args(args)
        .arg(path)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {tool}: {e}"))
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn assert_conflict(res: Result<(), LockError>, permission: &str, shared: bool) {
    match res {
        Err(LockError::Conflict {
            permission: p,
            shared: s,
            ..
        }) if p == permission && s == shared => {}
        other => panic!("expected conflict on {permission:?} (shared={shared}), got {other:?}"),
    }
}

/// (1) A QEMU writer blocks Strata writers and (non-force-share) readers.
#[test]
fn qemu_writer_blocks_strata() {
    if !have_qemu() {
        return;
    }
    let (_dir, path) = qcow2_image();
    // A writable qcow2 open: uses consistent read (100), write (101),
    // resize (103); refuses to share write (201) and resize (203).
    let _qemu = spawn_qemu_io(&[], &path, &[100, 101, 103, 201, 203]);

    let f = open_rw(&path);
    let err = lock_file(&f, &path, LockMode::ReadWrite).expect_err("must conflict");
    let msg = err.to_string();
    eprintln!("{msg}");
    assert!(msg.contains("image is in use by another process"), "{msg}");
    assert!(msg.contains("Failed to get \"write\" lock"), "{msg}");
    assert_conflict(Err(err), "write", false);

    // QEMU's writer shares 'consistent read' (no byte 200), but Strata's
    // ReadOnly mirrors QEMU's read-only qcow2 open, which refuses to share
    // 'write' — and QEMU holds 'write' (byte 101). So a plain read-only lock
    // fails too, exactly like `qemu-io -r` / `qemu-img info` against a
    // running VM ("Failed to get shared "write" lock").
    let res = lock_file(&f, &path, LockMode::ReadOnly);
    if let Err(e) = &res {
        eprintln!("{e}");
    }
    assert_conflict(res, "write", true);
    let out = run("qemu-io", &["-r", "-c", "read 0 512"], &path);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("Failed to get shared \"write\" lock"));

    // Force-share (like `-U`) only needs 'consistent read', which is shared.
    lock_file(&f, &path, LockMode::ForceShare).expect("force-share lock");

    // The failed attempts left no stray bytes behind.
    drop(f);
    assert_eq!(locked_bytes(&path), [100, 101, 103, 201, 203]);
}

/// (1b) A QEMU reader (as for a VM's backing file) allows Strata readers,
/// blocks Strata writers.
#[test]
fn qemu_reader_allows_strata_readers_only() {
    if !have_qemu() {
        return;
    }
    let (_dir, path) = qcow2_image();
    let _qemu = spawn_qemu_io(&["-r"], &path, &[100, 201, 203]);

    let f = open_rw(&path);
    assert_conflict(lock_file(&f, &path, LockMode::ReadWrite), "write", false);
    lock_file(&f, &path, LockMode::ReadOnly).expect("read-only lock");
}

/// (2) While Strata holds the image, QEMU refuses to open it (unless -U).
#[test]
fn strata_writer_blocks_qemu() {
    if !have_qemu() {
        return;
    }
    let (_dir, path) = qcow2_image();
    let f = open_rw(&path);
    let lock = ImageLock::acquire(&f, &path, LockMode::ReadWrite).expect("lock");
    // Strata takes the very bytes QEMU takes for a writable image.
    assert_eq!(locked_bytes(&path), [100, 101, 103, 201, 203]);

    let out = run("qemu-io", &["-c", "read 0 512"], &path);
    assert!(!out.status.success(), "qemu-io rw must fail: {out:?}");
    assert!(
        stderr(&out).contains("Failed to get \"write\" lock"),
        "{}",
        stderr(&out)
    );

    // qemu-img info without -U opens read-only but refuses to share
    // 'write', so it fails against a writer.
    let out = run("qemu-img", &["info"], &path);
    assert!(!out.status.success(), "qemu-img info must fail: {out:?}");
    assert!(
        stderr(&out).contains("Failed to get shared \"write\" lock"),
        "{}",
        stderr(&out)
    );

    let out = run("qemu-img", &["info", "-U"], &path);
    assert!(out.status.success(), "qemu-img info -U: {}", stderr(&out));

    // Once released, QEMU may write.
    drop(lock);
    let out = run("qemu-io", &["-c", "write 0 512"], &path);
    assert!(
        out.status.success(),
        "qemu-io after unlock: {}",
        stderr(&out)
    );
}

/// (2b) A Strata reader lets `qemu-img info` in but keeps QEMU writers out.
#[test]
fn strata_reader_blocks_qemu_writer_only() {
    if !have_qemu() {
        return;
    }
    let (_dir, path) = qcow2_image();
    let f = File::open(&path).expect("open ro");
    let _lock = ImageLock::acquire(&f, &path, LockMode::ReadOnly).expect("lock");
    assert_eq!(locked_bytes(&path), [100, 201, 203]);

    let out = run("qemu-img", &["info"], &path);
    assert!(out.status.success(), "qemu-img info: {}", stderr(&out));
    let out = run("qemu-io", &["-r", "-c", "read 0 512"], &path);
    assert!(out.status.success(), "qemu-io -r: {}", stderr(&out));

    let out = run("qemu-io", &["-c", "write 0 512"], &path);
    assert!(!out.status.success(), "qemu-io rw must fail: {out:?}");
    assert!(
        stderr(&out).contains("Failed to get \"write\" lock"),
        "{}",
        stderr(&out)
    );
}

/// (3) Two opens of one path in this process behave like two processes.
#[test]
fn strata_vs_strata() {
    if !have_qemu() {
        return;
    }
    let (_dir, path) = qcow2_image();
    let a = open_rw(&path);
    let b = open_rw(&path);
    let la = ImageLock::acquire(&a, &path, LockMode::ReadWrite).expect("a");
    assert!(matches!(
        ImageLock::acquire(&b, &path, LockMode::ReadWrite),
        Err(LockError::Conflict { .. })
    ));
    drop(la);

    let _ra = ImageLock::acquire(&a, &path, LockMode::ReadOnly).expect("a ro");
    let _rb = ImageLock::acquire(&b, &path, LockMode::ReadOnly).expect("b ro");
    assert_eq!(locked_bytes(&path), [100, 201, 203]);
}

/// (4) Locks go away with the File (lock_file) or with the guard (ImageLock).
#[test]
fn lock_released_on_drop() {
    if !have_qemu() {
        return;
    }
    let (_dir, path) = qcow2_image();

    // lock_file: tied to the open file description, released on close.
    let f = open_rw(&path);
    lock_file(&f, &path, LockMode::ReadWrite).expect("lock");
    assert!(!run("qemu-io", &["-c", "read 0 512"], &path)
        .status
        .success());
    drop(f);
    assert!(locked_bytes(&path).is_empty());
    let out = run("qemu-io", &["-c", "write 0 512"], &path);
    assert!(out.status.success(), "{}", stderr(&out));

    // ImageLock: released on drop even though the File stays open...
    let f = open_rw(&path);
    let lock = ImageLock::acquire(&f, &path, LockMode::ReadWrite).expect("lock");
    drop(lock);
    assert!(locked_bytes(&path).is_empty());
    // ...and kept while the guard lives even if the File is closed.
    let lock = ImageLock::acquire(&f, &path, LockMode::ReadWrite).expect("relock");
    drop(f);
    assert!(!run("qemu-io", &["-c", "read 0 512"], &path)
        .status
        .success());
    drop(lock);
    let out = run("qemu-io", &["-c", "read 0 512"], &path);
    assert!(out.status.success(), "{}", stderr(&out));
}

/// A QEMU process that dies releases its locks (the kernel closes its fds).
#[test]
fn killed_qemu_releases_locks() {
    if !have_qemu() {
        return;
    }
    let (_dir, path) = qcow2_image();
    let qemu = spawn_qemu_io(&[], &path, &[100, 101, 103, 201, 203]);
    let f = open_rw(&path);
    assert!(lock_file(&f, &path, LockMode::ReadWrite).is_err());
    drop(qemu); // kill + wait
    lock_file(&f, &path, LockMode::ReadWrite).expect("lock after qemu died");
}

/// The files in `dir`, sorted by name.
fn dir_names(dir: &Path) -> Vec<std::ffi::OsString> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .expect("list dir")
        .map(|e| e.expect("entry").file_name())
        .collect();
    v.sort();
    v
}

/// (5) Replacing an image (create, convert) is refused while QEMU has it
/// open, as `qemu-img create` refuses it; nothing is touched or left.
#[test]
fn replacing_an_image_qemu_holds_is_refused() {
    use strata_image::create::NewImageFile;
    if !have_qemu() {
        return;
    }
    let (dir, path) = qcow2_image();
    let before = std::fs::read(&path).expect("read image");
    for args in [&[][..], &["-r"][..]] {
        let expected: &[u64] = if args.is_empty() {
            &[100, 101, 103, 201, 203]
        } else {
            &[100, 201, 203]
        };
        let _qemu = spawn_qemu_io(args, &path, expected);
        let err = NewImageFile::begin(&path).expect_err("must be refused");
        let msg = err.to_string();
        assert!(msg.contains("Failed to get \"write\" lock"), "{msg}");
        assert!(msg.contains("img.qcow2"), "{msg}");
    }
    assert_eq!(std::fs::read(&path).expect("read image"), before);
    assert_eq!(dir_names(dir.path()), ["img.qcow2"]);
}

/// (6) While the new image is built, QEMU cannot open the old one (Strata
/// holds its write lock); after the rename QEMU opens the new image.
#[test]
fn qemu_cannot_open_an_image_while_strata_replaces_it() {
    use strata_image::create::{create_qcow2, CreateOptions, NewImageFile};
    if !have_qemu() {
        return;
    }
    let (dir, path) = qcow2_image();
    let new = NewImageFile::begin(&path).expect("begin");
    let out = run("qemu-io", &["-c", "write 0 512"], &path);
    assert!(
        !out.status.success(),
        "qemu-io opened the old image: {out:?}"
    );
    assert!(
        stderr(&out).contains("Failed to get \"write\" lock"),
        "{}",
        stderr(&out)
    );
    let opts = CreateOptions {
        size: 3 << 20,
        ..CreateOptions::default()
    };
    let storage = new.storage().expect("storage");
    drop(create_qcow2(Box::new(storage), &path, &opts).expect("create"));
    new.commit().expect("commit");
    let out = run("qemu-img", &["check"], &path);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = run("qemu-io", &["-c", "length"], &path);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("3 MiB"),
        "{out:?}"
    );
    assert_eq!(dir_names(dir.path()), ["img.qcow2"]);
}
