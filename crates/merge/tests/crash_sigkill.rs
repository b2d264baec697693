//! Process-level crash tests: commit and pull run in a child process that
//! is SIGKILLed at moments spread over the whole run; afterwards the top
//! reads as before, no image is corrupt (leaks are allowed), and running
//! the same operation again completes the job.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;

const CHILD_ENV: &str = "STRATA_MERGE_CRASH_CHILD";

/// In the child (env set): run the operation and exit. In a normal test
/// run: nothing.
#[test]
fn child_entry() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let (op, path) = spec.split_once(':').unwrap();
    run_op(op, Path::new(path));
    std::process::exit(0);
}

/// A chain with enough data that the operation takes a while: 64 MiB
/// disk, base data in the first half, top data, zeros and partial writes
/// scattered over the whole disk.
fn make_chain(dir: &Path) -> PathBuf {
    let base = dir.join("base.qcow2");
    let top = dir.join("top.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&base), "64M"]);
    qemu_io(&base, &["write -P 0xa1 0 32M", "write -P 0xa2 40M 4M"]);
    qemu_overlay(&top, "base.qcow2");
    let mut cmds = Vec::new();
    for i in 0..48u64 {
        let off = i * (1 << 20) + (i % 7) * 4096;
        match i % 4 {
            0 | 1 => cmds.push(format!("write -P {} {off} 768k", 0x10 + i)),
            2 => cmds.push(format!("write -z {off} 256k")),
            _ => cmds.push(format!("write -P {} {} 1000", 0x40 + i, off + 333)),
        }
    }
    let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qemu_io(&top, &refs);
    top
}

fn crash_and_rerun(op: &str, iterations: u32) {
    let work = tempfile::tempdir().unwrap();
    let pristine = work.path().join("pristine");
    std::fs::create_dir(&pristine).unwrap();
    let top0 = make_chain(&pristine);
    let orig = work.path().join("orig.raw");
    qemu_img(&["convert", "-O", "raw", s(&top0), s(&orig)]);
    let fresh = |name: &str| -> PathBuf {
        let d = work.path().join(name);
        let _ = std::fs::remove_dir_all(&d);
        run("cp", &["-a", s(&pristine), s(&d)]);
        d.join("top.qcow2")
    };

    // How long an uninterrupted run takes in a child process: the fastest
    // of three (the first one runs with cold caches and, on a loaded
    // machine, can take twice as long as the runs that are killed).
    let mut full = Duration::MAX;
    for _ in 0..3 {
        let top = fresh("timing");
        let t0 = Instant::now();
        assert!(spawn_child(CHILD_ENV, op, &top).wait().unwrap().success());
        full = full.min(t0.elapsed());
    }

    let mut killed_midway = 0;
    for i in 0..iterations {
        let top = fresh("run");
        let base = top.with_file_name("base.qcow2");
        let at = kill_moment(i, iterations, full, Duration::from_nanos(3_000_000));
        if kill_after(spawn_child(CHILD_ENV, op, &top), at) {
            killed_midway += 1;
        }

        assert!(
            same_as_raw(&top, &orig),
            "{op} killed at {at:?}: top's view changed"
        );
        assert_no_corruption_after_kill(op, at, &[&top, &base]);

        run_op(op, &top);

        assert!(same_as_raw(&top, &orig), "{op} rerun after kill at {at:?}");
        match op {
            "commit" => {
                assert!(
                    same_as_raw(&base, &orig),
                    "commit rerun: base holds the view"
                );
                assert_eq!(own_allocated(&top), 0, "commit rerun: top emptied");
            }
            _ => assert_eq!(backing_of(&top), None, "pull rerun: no backing left"),
        }
        for img in [&top, &base] {
            let rc = check_exit(img);
            assert!(
                rc == 0 || rc == 3,
                "{op} rerun: qemu-img check {} exited {rc}",
                img.display()
            );
        }
    }
    assert!(
        killed_midway > iterations / 2,
        "only {killed_midway} kills landed mid-run ({full:?} per run)"
    );
}

#[test]
fn commit_killed_at_any_moment_keeps_the_top_intact_and_a_rerun_completes() {
    crash_and_rerun("commit", 12);
}

#[test]
fn pull_killed_at_any_moment_keeps_the_top_intact_and_a_rerun_completes() {
    crash_and_rerun("pull", 12);
}
