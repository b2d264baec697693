//! Merges on filesystems that share extents (XFS with `reflink=1`, btrfs),
//! each made for the test on a loop device: whole clusters are cloned,
//! not copied; the result reads as qemu-img's on a twin, checks clean,
//! and shares its extents with the source; a SIGKILL at any moment loses
//! nothing and a rerun completes.
//!
//! They need root (mount) and mkfs.xfs / mkfs.btrfs
//! (scripts/install-deps.sh installs them); without, each test prints why
//! it is skipped and passes.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use strata_image::ImageFormat;
use strata_merge::{commit, pull, rebase, CommitOptions, Hooks, PullOptions, RebaseOptions};

/// A filesystem made for one test in a file, loop-mounted, unmounted and
/// removed when dropped (also when the test panics).
struct LoopFs {
    dir: tempfile::TempDir,
    mounted: bool,
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|t| {
        t.lines()
            .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"))
    })
}

impl LoopFs {
    /// `kind` is "xfs" (made with reflink=1), "xfs-copy" (XFS with
    /// reflink=0: merges copy) or "btrfs"; `None`, with the reason
    /// printed, when it cannot be made here.
    fn new(kind: &str, size: u64) -> Option<LoopFs> {
        if !is_root() {
            eprintln!("skipped: mounting a {kind} loop filesystem needs root");
            return None;
        }
        let (mkfs, opts): (&str, &[&str]) = match kind {
            "xfs" => ("mkfs.xfs", &["-q", "-m", "reflink=1"]),
            "xfs-copy" => ("mkfs.xfs", &["-q", "-m", "reflink=0"]),
            _ => ("mkfs.btrfs", &["-q"]),
        };
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("fs.img");
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        std::fs::File::create(&img).unwrap().set_len(size).unwrap();
        let made = Command::new(mkfs).args(opts).arg(&img).output();
        if !made.is_ok_and(|o| o.status.success()) {
            eprintln!("skipped: {mkfs} is not installed or failed (scripts/install-deps.sh)");
            return None;
        }
        let mounted = Command::new("mount")
            .args(["-o", "loop"])
            .arg(&img)
            .arg(&mnt)
            .output();
        if !mounted.is_ok_and(|o| o.status.success()) {
            eprintln!("skipped: mount -o loop of a {kind} image failed");
            return None;
        }
        Some(LoopFs { dir, mounted: true })
    }

    fn path(&self) -> PathBuf {
        self.dir.path().join("mnt")
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        if self.mounted {
            // The loop device goes with the mount (autoclear).
            let _ = Command::new("umount").arg(self.path()).status();
        }
    }
}

/// Bytes of `path`'s extents that FIEMAP flags as shared (`filefrag -v`),
/// and all its extent bytes.
fn shared_bytes(path: &Path) -> (u64, u64) {
    let text = run("filefrag", &["-v", "-b4096", s(path)]);
    let (mut shared, mut all) = (0, 0);
    for l in text.lines() {
        // " 0:   0..  15:  1234..  1249:  16:   flags"
        let cols: Vec<&str> = l.split(':').map(str::trim).collect();
        if cols.len() < 4 || cols[0].parse::<u64>().is_err() {
            continue;
        }
        let Ok(blocks) = cols[3].parse::<u64>() else {
            continue;
        };
        all += blocks * 4096;
        if l.contains("shared") {
            shared += blocks * 4096;
        }
    }
    (shared, all)
}

fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().blocks() * 512
}

/// A chain in `dir`: base (32 MiB of data, some of it compressed), mid
/// (whole clusters, partial clusters, zeros), top (the same); 64 KiB
/// clusters everywhere except where `top_cluster` says.
fn make_chain(dir: &Path, top_cluster: u32) -> PathBuf {
    let base = dir.join("base.qcow2");
    let mid = dir.join("mid.qcow2");
    let top = dir.join("top.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&base), "96M"]);
    qemu_io(&base, &["write -P 0xb1 0 24M", "write -P 0xb2 28M 8M"]);
    // Compressed clusters in the base: they are copied, not cloned.
    let comp = dir.join("comp.raw");
    std::fs::write(&comp, vec![0x5au8; 1 << 20]).unwrap();
    let overlay = |img: &Path, backing: &str, cluster: u32| {
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &format!("cluster_size={cluster}"),
            "-b",
            backing,
            "-F",
            "qcow2",
            s(img),
        ]);
    };
    overlay(&mid, "base.qcow2", 65536);
    qemu_io(
        &mid,
        &[
            "write -c -P 0x77 40M 1M",
            "write -P 0xc1 8M 6M",
            "write -P 0xc2 20M 100k",
            "write -z 30M 1M",
            "write -P 0xc3 50M 2M",
        ],
    );
    overlay(&top, "mid.qcow2", top_cluster);
    qemu_io(
        &top,
        &[
            "write -P 0xd1 1M 3M",
            "write -P 0xd2 12M 1000",
            "write -z 60M 512k",
            "write -P 0xd3 70M 5M",
        ],
    );
    top
}

/// A copy of the chain of `top` in `dir/name` that shares nothing with
/// it (for qemu-img to work on).
fn twin_of(top: &Path, name: &str) -> PathBuf {
    let from = top.parent().unwrap();
    let to = from.parent().unwrap().join(name);
    std::fs::create_dir(&to).unwrap();
    for f in ["base.qcow2", "mid.qcow2", "top.qcow2"] {
        run("cp", &["--reflink=never", s(&from.join(f)), s(&to.join(f))]);
    }
    to.join("top.qcow2")
}

fn on_each_fs(test: impl Fn(&str, &Path)) {
    for kind in ["xfs", "btrfs"] {
        let Some(fs) = LoopFs::new(kind, 1 << 30) else {
            continue;
        };
        test(kind, &fs.path());
    }
}

#[test]
fn pull_on_xfs_and_btrfs_clones_and_reads_as_qemu_img_rebase() {
    on_each_fs(|kind, root| {
        let work = root.join("chain");
        std::fs::create_dir(&work).unwrap();
        let top = make_chain(&work, 65536);
        let twin = twin_of(&top, "twin");
        let before = view(&top);

        let report = pull(&top, &PullOptions::default(), &mut Hooks::default()).unwrap();
        qemu_img(&["rebase", "-q", "-b", "", s(&twin)]);

        assert_eq!(backing_of(&top), None, "{kind}");
        assert_same(&top, &twin);
        assert!(view(&top) == before, "{kind}: the guest view changed");
        assert_clean(&top);
        let st = report.stats;
        // Most of the base's 32 MiB and mid's whole clusters are cloned; the
        // compressed, partial and zero clusters are not.
        assert!(
            st.cloned_bytes >= 24 << 20 && st.cloned_bytes < st.copied_bytes,
            "{kind}: {st:?}"
        );
        let (shared, all) = shared_bytes(&top);
        assert!(
            shared >= st.cloned_bytes && shared <= all,
            "{kind}: {shared} of {all} bytes shared, {} cloned",
            st.cloned_bytes
        );
        // The sources kept their data.
        assert_same(&work.join("mid.qcow2"), &twin.with_file_name("mid.qcow2"));
    });
}

#[test]
fn pull_b_on_xfs_keeps_the_base_and_clones_the_middle() {
    let Some(fs) = LoopFs::new("xfs", 1 << 30) else {
        return;
    };
    let work = fs.path().join("chain");
    std::fs::create_dir(&work).unwrap();
    // 512-byte clusters in the top: smaller than the filesystem block,
    // so nothing can be cloned into it; the pull copies.
    for (cluster, clones) in [(65536, true), (512, false)] {
        let top = make_chain(&work, cluster);
        let twin = twin_of(&top, &format!("twin{cluster}"));
        let opts = PullOptions::default().with_base(work.join("base.qcow2"));
        let report = pull(&top, &opts, &mut Hooks::default()).unwrap();
        qemu_img(&["rebase", "-q", "-b", "base.qcow2", "-F", "qcow2", s(&twin)]);
        assert_eq!(backing_of(&top).as_deref(), Some("base.qcow2"));
        assert_same(&top, &twin);
        assert_clean(&top);
        assert_eq!(
            report.stats.cloned_bytes > 0,
            clones,
            "{cluster}: {report:?}"
        );
        for f in ["top.qcow2", "mid.qcow2", "base.qcow2", "comp.raw"] {
            let _ = std::fs::remove_file(work.join(f));
        }
    }
}

#[test]
fn commit_on_xfs_and_btrfs_clones_into_the_base_without_growing_it_twice() {
    on_each_fs(|kind, root| {
        for keep_top in [false, true] {
            let work = root.join(format!("chain-{keep_top}"));
            std::fs::create_dir(&work).unwrap();
            let top = make_chain(&work, 65536);
            let twin = twin_of(&top, &format!("twin-{keep_top}"));
            let mid = work.join("mid.qcow2");
            let before = view(&top);
            let mid_before = allocated(&mid);

            let opts = CommitOptions::default().with_keep_top(keep_top);
            let report = commit(&top, &opts, &mut Hooks::default()).unwrap();
            let mut args = vec!["commit", "-q"];
            if keep_top {
                args.push("-d");
            }
            args.push(s(&twin));
            qemu_img(&args);

            assert_same(&mid, &twin.with_file_name("mid.qcow2"));
            assert!(view(&top) == before, "{kind}: the top's view changed");
            assert_clean(&mid);
            assert_clean(&top);
            let st = report.stats;
            assert!(st.cloned_bytes >= 8 << 20, "{kind}: {st:?}");
            // The base grew by what was committed (plus tables), not by a
            // copy of it and preallocation on top.
            let grown = allocated(&mid).saturating_sub(mid_before);
            assert!(
                grown <= st.copied_bytes + (4 << 20),
                "{kind}: the base grew by {grown} for {} copied",
                st.copied_bytes
            );
            let (shared, _) = shared_bytes(&mid);
            if keep_top {
                // The top still holds them: shared by both files.
                assert!(shared >= st.cloned_bytes, "{kind}: {shared} shared");
            }
        }
    });
}

#[test]
fn safe_rebase_on_xfs_clones_and_reads_as_qemu_img_rebase() {
    let Some(fs) = LoopFs::new("xfs", 1 << 30) else {
        return;
    };
    let work = fs.path().join("chain");
    std::fs::create_dir(&work).unwrap();
    let top = make_chain(&work, 65536);
    // The new backing file: another image, with data of its own where
    // the old chain has some and where it has none.
    let other = work.join("other.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&other), "96M"]);
    qemu_io(&other, &["write -P 0xe1 4M 8M", "write -P 0xe2 80M 4M"]);
    let twin = twin_of(&top, "twin");
    run(
        "cp",
        &[
            "--reflink=never",
            s(&other),
            s(&twin.with_file_name("other.qcow2")),
        ],
    );
    let before = view(&top);

    let r = rebase(
        &top,
        Some(("other.qcow2", ImageFormat::Qcow2)),
        &RebaseOptions::default(),
        &mut Hooks::default(),
    )
    .unwrap();
    qemu_img(&["rebase", "-q", "-b", "other.qcow2", "-F", "qcow2", s(&twin)]);

    assert_eq!(backing_of(&top).as_deref(), Some("other.qcow2"));
    assert_same(&top, &twin);
    assert!(view(&top) == before, "the guest view changed");
    assert_clean(&top);
    assert!(r.stats.cloned_bytes >= 16 << 20, "{:?}", r.stats);
    let (shared, _) = shared_bytes(&top);
    assert!(shared >= r.stats.cloned_bytes, "{shared} bytes shared");
}

const CHILD_ENV: &str = "STRATA_REFLINK_CRASH_CHILD";

/// In the child (env set): run the merge and exit. In a normal test run:
/// nothing.
#[test]
fn child_entry() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let (op, path) = spec.split_once(':').unwrap();
    run_op(op, Path::new(path));
    std::process::exit(0);
}

/// base <- top with many separate whole-cluster runs (so that a merge
/// makes thousands of clones and several metadata commits), partial
/// clusters and zeros.
fn many_runs(dir: &Path) -> PathBuf {
    let base = dir.join("base.qcow2");
    let top = dir.join("top.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&base), "512M"]);
    let mut cmds = Vec::new();
    for i in 0..1024u64 {
        cmds.push(format!("write -P {} {} 64k", i % 200 + 1, i * 256 * 1024));
    }
    let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qemu_io(&base, &refs);
    qemu_overlay(&top, "base.qcow2");
    let mut cmds = Vec::new();
    for i in 0..1024u64 {
        let off = i * 256 * 1024 + 128 * 1024;
        match i % 8 {
            7 => cmds.push(format!("write -z {off} 64k")),
            6 => cmds.push(format!("write -P 9 {} 3000", off + 77)),
            _ => cmds.push(format!("write -P {} {off} 64k", i % 100 + 3)),
        }
    }
    let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qemu_io(&top, &refs);
    top
}

/// `op` on a loop XFS (`kind`: "xfs" clones, "xfs-copy" copies), killed
/// by SIGKILL at moments spread over a run, then rerun.
fn killed_and_rerun_on_xfs(op: &str, iterations: u32, kind: &str) {
    let Some(fs) = LoopFs::new(kind, 2 << 30) else {
        return;
    };
    let root = fs.path();
    let pristine = root.join("pristine");
    std::fs::create_dir(&pristine).unwrap();
    let top0 = many_runs(&pristine);
    let orig = root.join("orig.raw");
    qemu_img(&["convert", "-O", "raw", s(&top0), s(&orig)]);
    let fresh = |name: &str| -> PathBuf {
        let d = root.join(name);
        let _ = std::fs::remove_dir_all(&d);
        run("cp", &["-a", "--reflink=never", s(&pristine), s(&d)]);
        d.join("top.qcow2")
    };
    let mut full = Duration::MAX;
    for _ in 0..3 {
        let top = fresh("timing");
        let t0 = Instant::now();
        assert!(spawn_child(CHILD_ENV, op, &top).wait().unwrap().success());
        full = full.min(t0.elapsed());
        // The merge cloned: the pulled top shares the base's extents.
        if op == "pull" && kind == "xfs" {
            let (shared, _) = shared_bytes(&top);
            assert!(shared >= 32 << 20, "pull on XFS shared only {shared} bytes");
        }
        // Nothing held past the end of the file written (XFS's
        // speculative preallocation, docs/BENCHMARKS.md).
        let written = if op == "pull" {
            top.clone()
        } else {
            top.with_file_name("base.qcow2")
        };
        let (held, len) = (
            allocated(&written),
            std::fs::metadata(&written).unwrap().len(),
        );
        assert!(
            held <= len + (1 << 20),
            "{kind} {op}: {held} bytes held for a file of {len}"
        );
    }
    let mut killed_midway = 0;
    for i in 0..iterations {
        let top = fresh("run");
        let base = top.with_file_name("base.qcow2");
        let at = kill_moment(i, iterations, full, Duration::from_nanos(1_000_000));
        if kill_after(spawn_child(CHILD_ENV, op, &top), at) {
            killed_midway += 1;
        }
        assert!(
            same_as_raw(&top, &orig),
            "{op} killed at {at:?}: view changed"
        );
        assert_no_corruption_after_kill(op, at, &[&top, &base]);
        run_op(op, &top);
        assert!(
            same_as_raw(&top, &orig),
            "{op} rerun after a kill at {at:?}"
        );
        if op == "commit" {
            assert!(
                same_as_raw(&base, &orig),
                "commit rerun: base holds the view"
            );
            assert_eq!(own_allocated(&top), 0, "commit rerun: top emptied");
        } else {
            assert_eq!(backing_of(&top), None, "pull rerun: no backing left");
        }
        for img in [&top, &base] {
            assert_clean_or_leaks(img);
        }
    }
    eprintln!("{op}: {killed_midway} of {iterations} kills mid-run ({full:?} per run)");
    assert!(
        killed_midway >= iterations / 3,
        "only {killed_midway} kills landed mid-run ({full:?} per run)"
    );
}

fn assert_clean_or_leaks(img: &Path) {
    let rc = check_exit(img);
    assert!(
        rc == 0 || rc == 3,
        "qemu-img check {} exited {rc}",
        img.display()
    );
}

#[test]
fn commit_by_clones_on_xfs_killed_at_any_moment_loses_nothing() {
    killed_and_rerun_on_xfs("commit", 10, "xfs");
}

#[test]
fn pull_by_clones_on_xfs_killed_at_any_moment_loses_nothing() {
    killed_and_rerun_on_xfs("pull", 10, "xfs");
}

/// The copy path on XFS (no reflink), where writes past the end of the
/// file first extend it (`FileStorage`, against speculative
/// preallocation): the same guarantees.
#[test]
fn commit_by_copies_on_xfs_without_reflink_killed_at_any_moment_loses_nothing() {
    killed_and_rerun_on_xfs("commit", 10, "xfs-copy");
}

#[test]
fn pull_by_copies_on_xfs_without_reflink_killed_at_any_moment_loses_nothing() {
    killed_and_rerun_on_xfs("pull", 10, "xfs-copy");
}
