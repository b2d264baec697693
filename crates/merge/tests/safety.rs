//! Refusals, the base guard, dry runs, progress and cancellation.

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use common::*;
use strata_merge::{commit, pull, CommitOptions, Hooks, MergeError, Progress, PullOptions};

fn bytes(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap()
}

fn patch(p: &Path, at: u64, data: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
    f.write_all_at(data, at).unwrap();
}

#[test]
fn commit_refuses_when_a_sibling_overlay_uses_the_base_and_force_overrides() {
    let dir = tempfile::tempdir().unwrap();
    let top = twin("cluster64k", dir.path(), "t");
    let base = top.with_file_name("base.qcow2");
    let sibling = top.with_file_name("sibling.qcow2");
    qemu_overlay(&sibling, "base.qcow2");
    let (base_before, top_before) = (bytes(&base), bytes(&top));

    let err = commit(&top, &CommitOptions::default(), &mut Hooks::default()).unwrap_err();

    match &err {
        MergeError::BaseInUse { users, .. } => assert_eq!(users, &vec![sibling.clone()]),
        e => panic!("unexpected error: {e}"),
    }
    assert!(err.to_string().contains("sibling.qcow2"), "{err}");
    assert_eq!(bytes(&base), base_before, "base unchanged");
    assert_eq!(bytes(&top), top_before, "top unchanged");

    let forced = CommitOptions::default().with_force(true);
    let _ = commit(&top, &forced, &mut Hooks::default()).unwrap();
    assert_ne!(bytes(&base), base_before);
}

#[test]
fn commit_refuses_when_an_image_named_by_the_caller_uses_the_base() {
    let dir = tempfile::tempdir().unwrap();
    let top = twin("cluster64k", dir.path(), "t");
    let elsewhere = dir.path().join("elsewhere.qcow2");
    qemu_overlay(&elsewhere, "t/base.qcow2");
    let opts = CommitOptions::default().with_also_check(vec![elsewhere.clone()]);
    let err = commit(&top, &opts, &mut Hooks::default()).unwrap_err();
    assert!(matches!(err, MergeError::BaseInUse { .. }), "{err}");
    // Without naming it, the image outside the base's directory is not seen.
    let _ = commit(&top, &CommitOptions::default(), &mut Hooks::default()).unwrap();
}

#[test]
fn commit_ignores_the_layers_of_its_own_chain_in_the_guard() {
    let dir = tempfile::tempdir().unwrap();
    let top = twin("depth12", dir.path(), "t");
    let opts = CommitOptions::default().with_base(top.with_file_name("layer8.qcow2"));
    let _ = commit(&top, &opts, &mut Hooks::default()).unwrap();
}

#[test]
fn commit_refuses_a_top_marked_corrupt_before_writing_the_base() {
    let dir = tempfile::tempdir().unwrap();
    let top = twin("cluster64k", dir.path(), "t");
    let base = top.with_file_name("base.qcow2");
    // incompatible_features (header offset 72, big endian): bit 1 = corrupt.
    patch(&top, 79, &[2]);
    let base_before = bytes(&base);

    let err = commit(&top, &CommitOptions::default(), &mut Hooks::default()).unwrap_err();

    assert!(err.to_string().contains("corrupt"), "{err}");
    assert_eq!(bytes(&base), base_before);
}

#[test]
fn commit_refuses_a_top_whose_tables_point_outside_the_file_before_writing_the_base() {
    let dir = tempfile::tempdir().unwrap();
    let top = twin("cluster64k", dir.path(), "t");
    let base = top.with_file_name("base.qcow2");
    let h = bytes(&top);
    let l1 = u64::from_be_bytes(h[40..48].try_into().unwrap());
    // Last L1 entry: an L2 table far past the end of the file.
    let l1_size = u32::from_be_bytes(h[36..40].try_into().unwrap()) as u64;
    let bogus = (1u64 << 63) | (1 << 40);
    patch(&top, l1 + 8 * (l1_size - 1), &bogus.to_be_bytes());
    let base_before = bytes(&base);

    let err = commit(&top, &CommitOptions::default(), &mut Hooks::default()).unwrap_err();

    assert!(err.to_string().contains("end of the file"), "{err}");
    assert_eq!(bytes(&base), base_before);
}

#[test]
fn commit_refuses_a_damaged_base_before_writing_it() {
    // Fuzz finding F3: an L2 entry of the base pointing past the end of the
    // file made commit write into the base, then fail half-way.
    let dir = tempfile::tempdir().unwrap();
    let top = twin("cluster64k", dir.path(), "t");
    let base = top.with_file_name("base.qcow2");
    let h = bytes(&base);
    let l1 = u64::from_be_bytes(h[40..48].try_into().unwrap());
    let l2 = u64::from_be_bytes(h[l1 as usize..l1 as usize + 8].try_into().unwrap())
        & 0x00ff_ffff_ffff_fe00;
    assert_ne!(l2, 0, "the base should have an L2 table");
    // Its first entry: data far past the end of the file.
    let bogus = (1u64 << 63) | (1 << 40);
    patch(&base, l2, &bogus.to_be_bytes());
    let base_before = bytes(&base);
    let top_before = bytes(&top);

    let err = commit(&top, &CommitOptions::default(), &mut Hooks::default()).unwrap_err();

    assert!(err.to_string().contains("corruption"), "{err}");
    assert_eq!(bytes(&base), base_before);
    assert_eq!(bytes(&top), top_before);
}

#[test]
fn commit_refuses_a_dirty_top_before_writing_the_base() {
    let dir = tempfile::tempdir().unwrap();
    let top = twin("dirty_lazy_refcounts", dir.path(), "t");
    let base = top.with_file_name("base.qcow2");
    let base_before = bytes(&base);
    let err = commit(&top, &CommitOptions::default(), &mut Hooks::default()).unwrap_err();
    assert!(err.to_string().contains("dirty"), "{err}");
    assert_eq!(bytes(&base), base_before);
}

#[test]
fn dry_run_plans_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let top = twin("cluster64k", dir.path(), "t");
    let base = top.with_file_name("base.qcow2");
    let (base_before, top_before) = (bytes(&base), bytes(&top));

    let c = commit(
        &top,
        &CommitOptions::default().with_dry_run(true),
        &mut Hooks::default(),
    )
    .unwrap();
    let p = pull(
        &top,
        &PullOptions::default().with_dry_run(true),
        &mut Hooks::default(),
    )
    .unwrap();

    assert!(c.dry_run && p.dry_run);
    assert!(
        c.plan.copy_bytes > 0 && c.plan.zero_bytes > 0,
        "{:?}",
        c.plan
    );
    assert!(c.plan.exact);
    assert_eq!(c.plan.growth.len(), 1);
    assert_eq!(c.plan.growth[0].path, base);
    assert!(p.plan.copy_bytes > 0);
    assert!(p.plan.growth[0].bytes >= p.plan.copy_clusters * 65536);
    assert_eq!(c.stats, Default::default());
    assert_eq!(bytes(&base), base_before);
    assert_eq!(bytes(&top), top_before);
}

#[test]
fn commit_reports_progress_up_to_the_planned_total() {
    let dir = tempfile::tempdir().unwrap();
    let top = twin("cluster512", dir.path(), "t");
    let mut seen: Vec<Progress> = Vec::new();
    let mut cb = |p: Progress| seen.push(p);
    let r = commit(
        &top,
        &CommitOptions::default(),
        &mut Hooks::new().with_progress(&mut cb),
    )
    .unwrap();
    let total = r.plan.total_bytes();
    assert!(total > 0);
    assert!(seen.len() > 1);
    assert!(seen.windows(2).all(|w| w[0].done_bytes <= w[1].done_bytes));
    assert!(seen.iter().all(|p| p.total_bytes == total));
    assert_eq!(seen.last().unwrap().done_bytes, total);
    assert_eq!(r.stats.copied_bytes + r.stats.zeroed_bytes, total);
}

#[test]
fn a_cancelled_commit_leaves_the_top_intact_and_a_rerun_finishes() {
    let dir = tempfile::tempdir().unwrap();
    let top = twin("cluster512", dir.path(), "t");
    let base = top.with_file_name("base.qcow2");
    let before = view(&top);
    let cancel = AtomicBool::new(false);
    let mut calls = 0;
    let mut cb = |_: Progress| {
        calls += 1;
        if calls == 2 {
            cancel.store(true, Ordering::Relaxed);
        }
    };
    let err = commit(
        &top,
        &CommitOptions::default(),
        &mut Hooks::new().with_progress(&mut cb).with_cancel(&cancel),
    )
    .unwrap_err();
    assert!(matches!(err, MergeError::Cancelled), "{err}");
    assert_eq!(view(&top), before);
    assert_clean(&top);
    assert_clean(&base);

    let _ = commit(&top, &CommitOptions::default(), &mut Hooks::default()).unwrap();
    assert_eq!(view(&top), before);
    assert_eq!(view(&base), before);
    assert_eq!(own_allocated(&top), 0);
}

#[test]
fn a_cancelled_pull_keeps_the_backing_file_and_a_rerun_finishes() {
    let dir = tempfile::tempdir().unwrap();
    let top = twin("cluster512", dir.path(), "t");
    let before = view(&top);
    let cancel = AtomicBool::new(false);
    let mut cb = |_: Progress| cancel.store(true, Ordering::Relaxed);
    let err = pull(
        &top,
        &PullOptions::default(),
        &mut Hooks::new().with_progress(&mut cb).with_cancel(&cancel),
    )
    .unwrap_err();
    assert!(matches!(err, MergeError::Cancelled), "{err}");
    assert_eq!(backing_of(&top).as_deref(), Some("base.qcow2"));
    assert_eq!(view(&top), before);
    assert_clean(&top);

    let _ = pull(&top, &PullOptions::default(), &mut Hooks::default()).unwrap();
    assert_eq!(backing_of(&top), None);
    assert_eq!(view(&top), before);
}

#[test]
fn rerunning_a_finished_commit_or_pull_changes_nothing_visible() {
    let dir = tempfile::tempdir().unwrap();
    let top = twin("cluster64k", dir.path(), "t");
    let base = top.with_file_name("base.qcow2");
    let before = view(&top);
    let _ = commit(&top, &CommitOptions::default(), &mut Hooks::default()).unwrap();
    let again = commit(&top, &CommitOptions::default(), &mut Hooks::default()).unwrap();
    assert_eq!(again.stats.copied_bytes, 0);
    assert_eq!(view(&base), before);
    let _ = pull(&top, &PullOptions::default(), &mut Hooks::default()).unwrap();
    let again = pull(&top, &PullOptions::default(), &mut Hooks::default()).unwrap();
    assert_eq!(again.plan.total_bytes(), 0);
    assert_eq!(view(&top), before);
    assert_eq!(backing_of(&top), None);
}

#[test]
fn commit_refuses_a_base_outside_the_chain() {
    let dir = tempfile::tempdir().unwrap();
    let top = twin("cluster64k", dir.path(), "t");
    let other = dir.path().join("other.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&other), "1M"]);
    let opts = CommitOptions::default().with_base(other);
    let err = commit(&top, &opts, &mut Hooks::default()).unwrap_err();
    assert!(matches!(err, MergeError::NotInChain { .. }), "{err}");
}

/// base <- mid <- top.
fn three_layer_chain(dir: &Path) -> std::path::PathBuf {
    let (base, mid, top) = (
        dir.join("base.qcow2"),
        dir.join("mid.qcow2"),
        dir.join("top.qcow2"),
    );
    qemu_img(&["create", "-q", "-f", "qcow2", s(&base), "4M"]);
    qemu_io(&base, &["write -P 0xb1 0 2M"]);
    for (img, below) in [(&mid, "base.qcow2"), (&top, "mid.qcow2")] {
        qemu_overlay(img, below);
    }
    qemu_io(&mid, &["write -P 0xc1 512k 512k", "write -z 1536k 256k"]);
    qemu_io(&top, &["write -P 0xd1 768k 128k", "write -P 0xd2 3M 64k"]);
    top
}

/// A `commit -b` that stopped after re-pointing the top (step 4; `keep_top`
/// leaves exactly that state) left the former intermediate naming the
/// base. The rerun writes only what the base already reads, so the guard
/// lets it finish; a commit that would change the base is still refused.
#[test]
fn the_rerun_of_a_commit_b_stopped_after_the_repoint_is_not_refused_by_the_guard() {
    let dir = tempfile::tempdir().unwrap();
    let top = three_layer_chain(dir.path());
    let (base, mid) = (dir.path().join("base.qcow2"), dir.path().join("mid.qcow2"));
    let before = view(&top);
    let opts = CommitOptions::default()
        .with_base(base.clone())
        .with_shorten_chain(true);
    let stopped = opts.clone().with_keep_top(true);
    let _ = commit(&top, &stopped, &mut Hooks::default()).unwrap();
    assert_eq!(backing_of(&top).as_deref(), Some("base.qcow2"));
    assert!(own_allocated(&top) > 0);

    let r = commit(&top, &opts, &mut Hooks::default()).unwrap();
    assert!(r.top_emptied);
    assert_eq!(own_allocated(&top), 0);
    assert_eq!(view(&top), before);
    assert_eq!(view(&base), before);
    // Finished: the same command again.
    let _ = commit(&top, &opts, &mut Hooks::default()).unwrap();

    // New data in the top would change what mid reads: refused.
    qemu_io(&top, &["write -P 0xe1 0 4k"]);
    let base_before = bytes(&base);
    let err = commit(&top, &opts, &mut Hooks::default()).unwrap_err();
    match &err {
        MergeError::BaseInUse { users, .. } => assert_eq!(users, &vec![mid]),
        e => panic!("unexpected error: {e}"),
    }
    assert_eq!(bytes(&base), base_before);
}
