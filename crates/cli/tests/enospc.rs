//! `strata commit` and `strata pull` on a real, full filesystem: a small
//! ext4 filesystem in a file, loop-mounted (needs root; set
//! STRATA_SKIP_LOOP_TESTS=1 to skip). The error names ENOSPC, the file and
//! the next step; the top still reads the same; after space is freed, the
//! same command finishes and the result equals what qemu-img makes of a
//! twin of the chain.
//!
//! The mount is always undone and every file removed, on failure too (a
//! guard's `Drop`).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

fn sh(cmd: &str, args: &[&str]) {
    let o = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        o.status.success(),
        "{cmd} {args:?}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// A loop-mounted ext4 filesystem of `mib` MiB, unmounted on drop.
struct LoopFs {
    mnt: PathBuf,
    mounted: bool,
}

impl LoopFs {
    fn new(dir: &Path, mib: u64) -> LoopFs {
        let img = dir.join("fs.img");
        let mnt = dir.join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        let f = std::fs::File::create(&img).unwrap();
        f.set_len(mib << 20).unwrap();
        drop(f);
        sh(
            "mkfs.ext4",
            &["-q", "-F", "-m", "0", "-O", "^has_journal", p(&img)],
        );
        let mut fs = LoopFs {
            mnt,
            mounted: false,
        };
        sh("mount", &["-o", "loop", p(&img), p(&fs.mnt)]);
        fs.mounted = true;
        // The image file is not needed once mounted (the loop device holds
        // it); removing it now leaves nothing behind even if umount fails.
        std::fs::remove_file(&img).unwrap();
        fs
    }

    fn avail(&self) -> u64 {
        let o = Command::new("df")
            .args(["-B1", "--output=avail", p(&self.mnt)])
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .nth(1)
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    /// Fills the filesystem up to `left` bytes free; returns the filler.
    fn fill_leaving(&self, left: u64) -> PathBuf {
        let filler = self.mnt.join("filler");
        let n = self.avail().saturating_sub(left);
        sh("fallocate", &["-l", &n.to_string(), p(&filler)]);
        filler
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        if self.mounted {
            let ok = Command::new("umount")
                .arg(&self.mnt)
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
            }
        }
    }
}

fn loop_tests_enabled() -> bool {
    if std::env::var("STRATA_SKIP_LOOP_TESTS").as_deref() == Ok("1") || !qemu_available() {
        return false;
    }
    let uid = Command::new("id").arg("-u").output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&uid.stdout).trim(),
        "0",
        "these tests loop-mount a filesystem and need root (STRATA_SKIP_LOOP_TESTS=1 skips them)"
    );
    true
}

fn io(img: &Path, fmt: &str, cmds: &[&str]) {
    let mut args = vec!["-f", fmt];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(p(img));
    sh("qemu-io", &args);
}

fn create(img: &Path, backing: Option<&str>, size: &str) {
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if let Some(b) = backing {
        args.extend(["-b", b, "-F", "qcow2"]);
    }
    args.push(p(img));
    if backing.is_none() {
        args.push(size);
    }
    sh("qemu-img", &args);
}

fn compare(a: &Path, b: &Path) -> bool {
    Command::new("qemu-img")
        .args(["compare", "-U", p(a), p(b)])
        .output()
        .unwrap()
        .status
        .success()
}

fn no_corruption(img: &Path) {
    // 0: clean, 3: leaks only.
    let o = Command::new("qemu-img")
        .args(["check", "-U", p(img)])
        .output()
        .unwrap();
    assert!(
        matches!(o.status.code(), Some(0 | 3)),
        "qemu-img check {}: {}",
        img.display(),
        String::from_utf8_lossy(&o.stdout)
    );
}

fn assert_explains(r: &Run, op: &str, file: &Path) {
    assert_ne!(r.code, 0, "{op} must fail: {}", r.stdout);
    let e = &r.stderr;
    assert!(
        e.contains(&format!("{op} failed: {}", file.display())),
        "{e}"
    );
    assert!(e.contains("No space left on device (os error 28)"), "{e}");
    assert!(e.contains("free space on the filesystem"), "{e}");
    assert!(
        e.contains(&format!("strata check -r leaks {}", file.display())),
        "{e}"
    );
    assert!(e.contains("the same command again"), "{e}");
    assert!(!e.contains("reopen"), "{e}");
}

#[test]
fn commit_on_a_full_filesystem_says_enospc_and_the_rerun_after_freeing_space_finishes() {
    if !loop_tests_enabled() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let fs = LoopFs::new(dir.path(), 24);
    let base = fs.mnt.join("base.qcow2");
    let top = fs.mnt.join("top.qcow2");
    create(&base, None, "16M");
    io(&base, "qcow2", &["write -P 0x11 0 4M"]);
    create(&top, Some("base.qcow2"), "");
    io(
        &top,
        "qcow2",
        &[
            "write -P 0x22 1M 1M",
            "write -P 0x33 4M 8M",
            "write -z 14M 1M",
        ],
    );
    // The twin, off the small filesystem, for qemu-img.
    let twin = dir.path().join("twin");
    std::fs::create_dir(&twin).unwrap();
    for f in ["base.qcow2", "top.qcow2"] {
        std::fs::copy(fs.mnt.join(f), twin.join(f)).unwrap();
    }
    let filler = fs.fill_leaving(2 << 20);

    let r = strata_bin(&["commit", p(&top)]);
    assert_explains(&r, "commit", &base);
    assert!(
        r.stderr.contains(&format!(
            "{}: not changed: it reads the same",
            top.display()
        )),
        "{}",
        r.stderr
    );
    assert!(compare(&top, &twin.join("top.qcow2")), "top's view changed");
    no_corruption(&base);

    // Still full: the rerun explains itself the same way.
    let again = strata_bin(&["commit", p(&top)]);
    assert_explains(&again, "commit", &base);

    std::fs::remove_file(&filler).unwrap();
    let done = strata_bin(&["commit", p(&top)]);
    assert_eq!(done.code, 0, "{}", done.stderr);
    assert!(done.stdout.contains("Image committed."), "{}", done.stdout);

    qemu_img_ok(&["commit", "-q", p(&twin.join("top.qcow2"))]);
    assert!(
        compare(&base, &twin.join("base.qcow2")),
        "base differs from qemu-img's"
    );
    assert!(
        compare(&top, &twin.join("top.qcow2")),
        "top differs from qemu-img's"
    );
    no_corruption(&base);
    let leaks = strata_bin(&["check", p(&base)]);
    assert_eq!(leaks.code, 0, "{}{}", leaks.stdout, leaks.stderr);
    drop(fs);
}

#[test]
fn pull_on_a_full_filesystem_says_enospc_and_the_rerun_after_freeing_space_finishes() {
    if !loop_tests_enabled() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let fs = LoopFs::new(dir.path(), 24);
    let base = fs.mnt.join("base.qcow2");
    let top = fs.mnt.join("top.qcow2");
    create(&base, None, "16M");
    io(&base, "qcow2", &["write -P 0x11 0 10M", "write -z 12M 1M"]);
    create(&top, Some("base.qcow2"), "");
    io(&top, "qcow2", &["write -P 0x22 1M 1M"]);
    let twin = dir.path().join("twin");
    std::fs::create_dir(&twin).unwrap();
    for f in ["base.qcow2", "top.qcow2"] {
        std::fs::copy(fs.mnt.join(f), twin.join(f)).unwrap();
    }
    let filler = fs.fill_leaving(2 << 20);

    let r = strata_bin(&["pull", p(&top)]);
    assert_explains(&r, "pull", &top);
    assert!(
        r.stderr
            .contains("still names its backing file \"base.qcow2\""),
        "{}",
        r.stderr
    );
    assert!(compare(&top, &twin.join("top.qcow2")), "top's view changed");
    no_corruption(&top);

    let again = strata_bin(&["pull", p(&top)]);
    assert_explains(&again, "pull", &top);

    std::fs::remove_file(&filler).unwrap();
    let done = strata_bin(&["pull", p(&top)]);
    assert_eq!(done.code, 0, "{}", done.stderr);

    qemu_img_ok(&["rebase", "-q", "-b", "", p(&twin.join("top.qcow2"))]);
    assert!(
        compare(&top, &twin.join("top.qcow2")),
        "top differs from qemu-img's"
    );
    let info = qemu_img_ok(&["info", "-U", p(&top)]);
    assert!(!info.contains("backing file"), "{info}");
    no_corruption(&top);
    drop(fs);
}

#[test]
fn io_on_a_full_filesystem_names_enospc_and_never_says_reopen() {
    if !loop_tests_enabled() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let fs = LoopFs::new(dir.path(), 16);
    let img = fs.mnt.join("disk.qcow2");
    create(&img, None, "32M");
    let _filler = fs.fill_leaving(1 << 20);
    let r = strata_bin(&[
        "io",
        "-c",
        "write -P 0x5a 0 4M",
        "-c",
        "write -P 0x5b 8M 4M",
        "-c",
        "flush",
        p(&img),
    ]);
    assert_ne!(r.code, 0, "{}", r.stdout);
    assert!(
        r.stderr.contains("No space left on device (os error 28)"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains(p(&img)), "{}", r.stderr);
    assert!(!r.stderr.contains("reopen"), "{}", r.stderr);
    no_corruption(&img);
    drop(fs);
}
