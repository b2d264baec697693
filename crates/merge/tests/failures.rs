//! Merges that fail part-way (a full disk, a source truncated under them)
//! and the shared-base guard's and confinement's reach: what the error
//! says, what state the files are left in, and that the rerun finishes.
//!
//! The full disk is a [`FaultStorage`] behind a byte limit (writes or
//! length changes past it fail with ENOSPC, as a full filesystem does),
//! so that every fill level is deterministic; `crates/cli/tests/enospc.rs`
//! does the same on a real, loop-mounted ext4 filesystem.

mod common;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use common::*;
use strata_image::Storage;
use strata_image::{Chain, FaultStorage, Image, ImageFormat, Layer, Qcow2Image};
use strata_merge::{
    commit, commit_open, pull, pull_confined, pull_open, rebase, CommitOptions, CommitParts, Hooks,
    MergeError, PullOptions, RebaseOptions,
};

/// A file on a filesystem with `limit` bytes for it: writes and length
/// changes past the limit fail with ENOSPC. Also, from operation number
/// `fail_from` on (writes, length changes and syncs), every operation
/// fails with ENOSPC, as when a delayed allocation finds the disk full
/// at writeback (at any moment, a sync of metadata included).
#[derive(Debug, Clone)]
struct Full {
    inner: FaultStorage,
    limit: Arc<AtomicU64>,
    ops: Arc<AtomicU64>,
    fail_from: Arc<AtomicU64>,
}

impl Full {
    fn op(&self) -> io::Result<()> {
        if self.ops.fetch_add(1, Ordering::SeqCst) >= self.fail_from.load(Ordering::SeqCst) {
            return Err(enospc());
        }
        Ok(())
    }
}

fn enospc() -> io::Error {
    io::Error::from_raw_os_error(28)
}

impl Storage for Full {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.op()?;
        let end = offset + buf.len() as u64;
        if end > self.limit.load(Ordering::SeqCst) && end > self.inner.len()? {
            return Err(enospc());
        }
        self.inner.write_at(buf, offset)
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.op()?;
        if len > self.limit.load(Ordering::SeqCst) && len > self.inner.len()? {
            return Err(enospc());
        }
        self.inner.set_len(len)
    }
    fn sync(&self) -> io::Result<()> {
        self.op()?;
        self.inner.sync()
    }
}

/// base.qcow2 (4 MiB, data in its first 2 MiB) <- top.qcow2 (1 MiB of
/// data over the base's data, 512 KiB past it, a zero range), made by
/// qemu-img; returns their bytes.
fn build_pair(dir: &Path) -> (Vec<u8>, Vec<u8>) {
    let base = dir.join("base.qcow2");
    let top = dir.join("top.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&base), "4M"]);
    qemu_io(&base, &["write -P 0x11 0 2M"]);
    qemu_overlay(&top, "base.qcow2");
    qemu_io(
        &top,
        &[
            "write -P 0x22 64k 1M",
            "write -P 0x33 2560k 512k",
            "write -z 1536k 64k",
        ],
    );
    (std::fs::read(&base).unwrap(), std::fs::read(&top).unwrap())
}

fn layer(st: &Full, name: &str, named_as: Option<&str>, writable: bool) -> Layer {
    let storage: Box<dyn Storage> = Box::new(st.clone());
    let path = PathBuf::from(name);
    let image = if writable {
        Image::Qcow2(Qcow2Image::open_rw(storage, &path).unwrap())
    } else {
        Image::open(storage, &path, ImageFormat::Qcow2).unwrap()
    };
    Layer::new(path, named_as.map(str::to_string), image)
}

fn read_all(chain: &Chain) -> Vec<u8> {
    let mut v = vec![0u8; chain.virtual_size() as usize];
    chain.read_at(&mut v, 0).unwrap();
    v
}

/// Commits top into base (both on `Full` storages) as `commit` does after
/// opening the files.
fn commit_on(base: &Full, top: &Full) -> strata_merge::Result<()> {
    let mut top_w = Chain::from_layers(vec![layer(top, "top.qcow2", None, true)]).unwrap();
    let view = Chain::from_layers(vec![layer(top, "top.qcow2", None, false)]).unwrap();
    let mut base_chain = Chain::from_layers(vec![layer(base, "base.qcow2", None, true)]).unwrap();
    commit_open(
        CommitParts {
            upper: view.layers(),
            base: &mut base_chain,
            top: &mut top_w,
            backing: None,
        },
        &CommitOptions::default(),
        &mut Hooks::default(),
    )
    .map(|_| ())
}

fn pull_on(base: &Full, top: &Full) -> strata_merge::Result<()> {
    let mut chain = Chain::from_layers(vec![
        layer(top, "top.qcow2", None, true),
        layer(base, "base.qcow2", Some("base.qcow2"), false),
    ])
    .unwrap();
    pull_open(&mut chain, 2, None, false, &mut Hooks::default()).map(|_| ())
}

fn full(bytes: &[u8], limit: u64) -> Full {
    Full {
        inner: FaultStorage::new(bytes.to_vec()),
        limit: Arc::new(AtomicU64::new(limit)),
        ops: Arc::default(),
        fail_from: Arc::new(AtomicU64::new(u64::MAX)),
    }
}

/// Strata's check on the bytes: no corruption (leaks allowed).
fn assert_no_corruption(bytes: &[u8], what: &str) {
    let img =
        Qcow2Image::open(Box::new(FaultStorage::new(bytes.to_vec())), Path::new(what)).unwrap();
    let r = strata_image::check::check(&img).unwrap();
    assert_eq!(
        (r.corruptions, r.check_errors),
        (0, 0),
        "{what}: {:?}",
        r.problems
    );
}

fn assert_explains_enospc(e: &MergeError, op: &str, file: &str, leaky: &str) {
    let msg = e.to_string();
    assert!(msg.starts_with(&format!("{op} failed: {file}: ")), "{msg}");
    assert!(
        msg.contains("No space left on device (os error 28)"),
        "{msg}"
    );
    assert!(msg.contains(" at offset 0x"), "{msg}");
    assert!(
        msg.contains(&format!("`strata check -r leaks {leaky}`")),
        "{msg}"
    );
    assert!(msg.contains("the same command again"), "{msg}");
    assert!(msg.contains("free space on the filesystem"), "{msg}");
    assert!(!msg.contains("reopen"), "{msg}");
    assert!(e.is_no_space(), "{msg}");
}

#[test]
fn a_commit_out_of_space_says_enospc_the_file_and_the_next_step_and_the_rerun_finishes() {
    let dir = tempfile::tempdir().unwrap();
    let (base0, top0) = build_pair(dir.path());
    let expected = {
        let t = full(&top0, u64::MAX);
        let b = full(&base0, u64::MAX);
        read_all(
            &Chain::from_layers(vec![
                layer(&t, "top.qcow2", None, false),
                layer(&b, "base.qcow2", Some("base.qcow2"), false),
            ])
            .unwrap(),
        )
    };
    // Fill levels from "not a byte more" to the data fitting but not all
    // of the metadata (the base already holds clusters under the first 2 MiB: 512 KiB of new clusters).
    let mut failed = 0;
    for extra in (0..=12u64).map(|i| i * 64 * 1024) {
        let base = full(&base0, base0.len() as u64 + extra);
        let top = full(&top0, u64::MAX);
        let Err(e) = commit_on(&base, &top) else {
            continue;
        };
        failed += 1;
        assert_explains_enospc(&e, "commit", "base.qcow2", "base.qcow2");
        assert!(e.to_string().contains("top.qcow2: not changed"), "{e}");
        // The top was not touched; the base has no corruption.
        assert_eq!(top.inner.current(), top0, "top changed at +{extra}");
        assert_no_corruption(&base.inner.current(), "base.qcow2");
        // Space freed: the same commit finishes.
        base.limit.store(u64::MAX, Ordering::SeqCst);
        commit_on(&base, &top).unwrap_or_else(|e| panic!("rerun at +{extra}: {e}"));
        let b = Chain::from_layers(vec![layer(&base, "base.qcow2", None, false)]).unwrap();
        assert_eq!(read_all(&b), expected, "base after the rerun at +{extra}");
        assert_no_corruption(&base.inner.current(), "base.qcow2");
    }
    assert!(
        failed >= 6,
        "only {failed} fill levels made the commit fail"
    );
}

#[test]
fn a_pull_out_of_space_says_enospc_the_file_and_the_next_step_and_the_rerun_finishes() {
    let dir = tempfile::tempdir().unwrap();
    let (base0, top0) = build_pair(dir.path());
    let base = full(&base0, u64::MAX);
    let expected = {
        let t = full(&top0, u64::MAX);
        read_all(
            &Chain::from_layers(vec![
                layer(&t, "top.qcow2", None, false),
                layer(&base, "base.qcow2", Some("base.qcow2"), false),
            ])
            .unwrap(),
        )
    };
    let mut failed = 0;
    for extra in (0..=18u64).map(|i| i * 64 * 1024) {
        let top = full(&top0, top0.len() as u64 + extra);
        let Err(e) = pull_on(&base, &top) else {
            continue;
        };
        failed += 1;
        assert_explains_enospc(&e, "pull", "top.qcow2", "top.qcow2");
        assert!(
            e.to_string()
                .contains("top.qcow2: still names its backing file \"base.qcow2\""),
            "{e}"
        );
        assert_no_corruption(&top.inner.current(), "top.qcow2");
        let reopened = Chain::from_layers(vec![
            layer(&top, "top.qcow2", None, false),
            layer(&base, "base.qcow2", Some("base.qcow2"), false),
        ])
        .unwrap();
        assert_eq!(
            reopened.top().image.backing().0,
            Some("base.qcow2"),
            "at +{extra}"
        );
        assert_eq!(read_all(&reopened), expected, "top's view at +{extra}");
        drop(reopened);
        top.limit.store(u64::MAX, Ordering::SeqCst);
        pull_on(&base, &top).unwrap_or_else(|e| panic!("rerun at +{extra}: {e}"));
        let t = Chain::from_layers(vec![layer(&top, "top.qcow2", None, false)]).unwrap();
        assert_eq!(t.top().image.backing().0, None);
        assert_eq!(read_all(&t), expected, "top after the rerun at +{extra}");
    }
    assert!(failed >= 10, "only {failed} fill levels made the pull fail");
}

#[test]
fn a_poisoned_image_names_the_error_that_poisoned_it() {
    let dir = tempfile::tempdir().unwrap();
    let (base0, _) = build_pair(dir.path());
    let base = full(&base0, base0.len() as u64);
    let mut img = Chain::from_layers(vec![layer(&base, "base.qcow2", None, true)]).unwrap();
    let first = img
        .write_at(&[7u8; 65536], 3 << 20)
        .and_then(|()| img.flush());
    let first = first.unwrap_err().to_string();
    assert!(first.contains("No space left on device"), "{first}");
    let later = img.write_at(&[7u8; 512], 0).unwrap_err().to_string();
    assert!(later.contains(&first), "{later}");
    assert!(!later.contains("reopen"), "{later}");
}

/// base.raw (8 MiB of data) <- top.qcow2 (one cluster), as files.
fn raw_pair(dir: &Path) -> (PathBuf, PathBuf, Vec<u8>) {
    let base = dir.join("base.raw");
    let top = dir.join("top.qcow2");
    qemu_img(&["create", "-q", "-f", "raw", s(&base), "8M"]);
    qemu_io(&base, &["write -P 0x44 0 8M"]);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.raw",
        "-F",
        "raw",
        s(&top),
    ]);
    qemu_io(&top, &["write -P 0x55 0 64k"]);
    let v = view(&top);
    (base, top, v)
}

#[test]
fn a_source_truncated_under_a_pull_fails_it_and_keeps_the_backing_file() {
    let dir = tempfile::tempdir().unwrap();
    let (base, top, before) = raw_pair(dir.path());
    let original_base = std::fs::read(&base).unwrap();
    // Another process truncates the base after the first write of the
    // pull (the progress hook runs after each write): the rest of the
    // base then reads as zeros.
    let mut truncated = false;
    let mut cb = |_p: strata_merge::Progress| {
        if !truncated {
            truncated = true;
            let f = std::fs::OpenOptions::new().write(true).open(&base).unwrap();
            f.set_len(1 << 20).unwrap();
        }
    };
    let mut hooks = Hooks::new().with_progress(&mut cb);
    let r = pull(&top, &PullOptions::default(), &mut hooks);
    assert!(truncated, "the hook never ran");
    let e = r.expect_err("pull must fail when its source was truncated");
    let msg = e.to_string();
    assert!(msg.starts_with("pull failed: "), "{msg}");
    assert!(
        msg.contains(&format!("{}: was truncated", base.display())),
        "{msg}"
    );
    assert!(
        msg.contains("still names its backing file \"base.raw\""),
        "{msg}"
    );
    // The top still reads through the base: restored, the view is the
    // one from before the pull.
    assert_eq!(backing_of(&top).as_deref(), Some("base.raw"));
    std::fs::write(&base, &original_base).unwrap();
    assert_eq!(view(&top), before);
    assert_clean(&top);
    // And the pull then finishes.
    let _ = pull(&top, &PullOptions::default(), &mut Hooks::default()).unwrap();
    assert_eq!(backing_of(&top), None);
    assert_eq!(view(&top), before);
}

#[test]
fn a_source_replaced_under_a_pull_fails_it_and_keeps_the_backing_file() {
    let dir = tempfile::tempdir().unwrap();
    let (base, top, before) = raw_pair(dir.path());
    let mut replaced = false;
    let mut cb = |_p: strata_merge::Progress| {
        if !replaced {
            replaced = true;
            let other = base.with_extension("new");
            std::fs::copy(&base, &other).unwrap();
            std::fs::rename(&other, &base).unwrap();
        }
    };
    let mut hooks = Hooks::new().with_progress(&mut cb);
    let e = pull(&top, &PullOptions::default(), &mut hooks).unwrap_err();
    assert!(
        e.to_string().contains("was replaced by another file"),
        "{e}"
    );
    assert_eq!(backing_of(&top).as_deref(), Some("base.raw"));
    assert_eq!(view(&top), before);
}

/// base.qcow2 in `dir/images`, the top beside it, and a sibling overlay of
/// the same base in `dir/elsewhere`.
fn shared_base(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let images = dir.join("images");
    let elsewhere = dir.join("elsewhere");
    std::fs::create_dir_all(&images).unwrap();
    std::fs::create_dir_all(&elsewhere).unwrap();
    let base = images.join("base.qcow2");
    let top = images.join("top.qcow2");
    let sibling = elsewhere.join("sibling.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&base), "1M"]);
    qemu_io(&base, &["write -P 0x11 0 1M"]);
    qemu_overlay(&top, "base.qcow2");
    qemu_io(&top, &["write -P 0x22 0 64k"]);
    qemu_overlay(&sibling, "../images/base.qcow2");
    (base, top, sibling)
}

#[test]
fn the_guard_finds_a_user_of_the_base_in_a_users_in_directory_and_says_where_it_looked() {
    let dir = tempfile::tempdir().unwrap();
    let (base, top, sibling) = shared_base(dir.path());
    let before = std::fs::read(&base).unwrap();
    let elsewhere = sibling.parent().unwrap().to_path_buf();
    let opts = CommitOptions::default().with_users_in(vec![elsewhere.clone()]);
    let e = commit(&top, &opts, &mut Hooks::default()).unwrap_err();
    match &e {
        MergeError::BaseInUse {
            users, searched, ..
        } => {
            assert_eq!(users, &vec![sibling.canonicalize().unwrap()]);
            assert!(searched.contains(&elsewhere.canonicalize().unwrap()), "{e}");
            assert!(
                searched.contains(&base.parent().unwrap().canonicalize().unwrap()),
                "{e}"
            );
        }
        other => panic!("expected BaseInUse, got {other}"),
    }
    assert!(
        e.to_string().contains("Looked for users of the base in: "),
        "{e}"
    );
    assert_eq!(std::fs::read(&base).unwrap(), before);

    // A dry run shows the plan and the user instead of being refused.
    let dry = opts.clone().with_dry_run(true);
    let r = commit(&top, &dry, &mut Hooks::default()).unwrap();
    assert!(r.dry_run);
    assert_eq!(r.base_users, vec![sibling.canonicalize().unwrap()]);
    assert_eq!(r.plan.copy_bytes, 64 * 1024);
    assert_eq!(std::fs::read(&base).unwrap(), before);
}

#[test]
fn the_guard_finds_a_user_of_the_base_in_the_tops_directory() {
    let dir = tempfile::tempdir().unwrap();
    let (base, _top, _) = shared_base(dir.path());
    // The top lives elsewhere than the base; a second overlay beside it.
    let tops = dir.path().join("tops");
    std::fs::create_dir_all(&tops).unwrap();
    let top = tops.join("top.qcow2");
    let other = tops.join("other.qcow2");
    for t in [&top, &other] {
        qemu_overlay(t, "../images/base.qcow2");
    }
    qemu_io(&top, &["write -P 0x22 0 64k"]);
    let e = commit(&top, &CommitOptions::default(), &mut Hooks::default()).unwrap_err();
    match &e {
        MergeError::BaseInUse { users, .. } => {
            assert!(users.contains(&other.canonicalize().unwrap()), "{e}")
        }
        other => panic!("expected BaseInUse, got {other}"),
    }
    let _ = base;
}

/// dir/jail/top.qcow2 names `../outside/base.qcow2`.
fn climbing_chain(dir: &Path) -> (PathBuf, PathBuf) {
    let jail = dir.join("jail");
    let outside = dir.join("outside");
    std::fs::create_dir_all(&jail).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    let base = outside.join("base.qcow2");
    let top = jail.join("top.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&base), "1M"]);
    qemu_io(&base, &["write -P 0x11 0 1M"]);
    qemu_overlay(&top, "../outside/base.qcow2");
    qemu_io(&top, &["write -P 0x22 0 64k"]);
    (jail, base)
}

#[test]
fn confinement_refuses_a_chain_member_outside_the_directory_before_writing() {
    let dir = tempfile::tempdir().unwrap();
    let (jail, base) = climbing_chain(dir.path());
    let top = jail.join("top.qcow2");
    let (top0, base0) = (std::fs::read(&top).unwrap(), std::fs::read(&base).unwrap());
    let outside_msg = "is outside the allowed directory";

    let opts = CommitOptions::default().with_confine_to(jail.clone());
    let e = commit(&top, &opts, &mut Hooks::default()).unwrap_err();
    assert!(e.to_string().contains(outside_msg), "{e}");
    let e = pull_confined(
        &top,
        &PullOptions::default(),
        Some(&jail),
        &mut Hooks::default(),
    )
    .unwrap_err();
    assert!(e.to_string().contains(outside_msg), "{e}");
    let e = rebase(
        &top,
        None,
        &RebaseOptions::default().with_confine_to(jail.clone()),
        &mut Hooks::default(),
    )
    .unwrap_err();
    assert!(e.to_string().contains(outside_msg), "{e}");
    assert_eq!(std::fs::read(&top).unwrap(), top0);
    assert_eq!(std::fs::read(&base).unwrap(), base0);

    // Confined to a directory that holds the whole chain: allowed.
    let opts = CommitOptions::default().with_confine_to(dir.path().to_path_buf());
    let _ = commit(&top, &opts, &mut Hooks::default()).unwrap();
}

#[test]
fn confinement_refuses_a_top_outside_the_directory() {
    let dir = tempfile::tempdir().unwrap();
    let (jail, base) = climbing_chain(dir.path());
    let outside = base.parent().unwrap();
    let top = jail.join("top.qcow2");
    let e = pull_confined(
        &top,
        &PullOptions::default(),
        Some(outside),
        &mut Hooks::default(),
    )
    .unwrap_err();
    assert!(
        e.to_string().contains("is outside the allowed directory"),
        "{e}"
    );
}

fn leaks_of(bytes: &[u8]) -> u64 {
    let img =
        Qcow2Image::open(Box::new(FaultStorage::new(bytes.to_vec())), Path::new("x")).unwrap();
    strata_image::check::check(&img).unwrap().leaks
}

/// Runs `merge` with the destination failing with ENOSPC from operation
/// N on, for every N of a full run; for each failure that left leaked
/// clusters in the destination, writes the files to a directory and
/// returns it with the number of leaks.
fn leaky_failures(
    base0: &[u8],
    top0: &[u8],
    into_base: bool,
    merge: &dyn Fn(&Full, &Full) -> strata_merge::Result<()>,
    dir: &Path,
) -> Vec<(PathBuf, u64)> {
    let (base, top) = (full(base0, u64::MAX), full(top0, u64::MAX));
    merge(&base, &top).unwrap();
    let dest = |b: &Full, t: &Full| if into_base { b.clone() } else { t.clone() };
    let total = dest(&base, &top).ops.load(Ordering::SeqCst);
    let mut out = Vec::new();
    // At most about 48 crash points, spread over the run.
    for n in (0..total).step_by((total as usize).div_ceil(48).max(1)) {
        let (base, top) = (full(base0, u64::MAX), full(top0, u64::MAX));
        dest(&base, &top).fail_from.store(n, Ordering::SeqCst);
        // The last operations are the syncs of closing the images, after
        // the merge returned.
        let Err(e) = merge(&base, &top) else {
            continue;
        };
        assert!(e.to_string().contains("No space left on device"), "{e}");
        let d = dest(&base, &top).inner.current();
        assert_no_corruption(&d, "destination");
        let leaks = leaks_of(&d);
        if leaks == 0 {
            continue;
        }
        out.push((n, base.inner.current(), top.inner.current(), leaks));
    }
    // Four of them, spread over the run, keep the test fast.
    let step = out.len().div_ceil(4).max(1);
    out.into_iter()
        .step_by(step)
        .map(|(n, b, t, leaks)| {
            let run = dir.join(format!("{}-{n}", if into_base { "commit" } else { "pull" }));
            std::fs::create_dir(&run).unwrap();
            std::fs::write(run.join("base.qcow2"), b).unwrap();
            std::fs::write(run.join("top.qcow2"), t).unwrap();
            (run, leaks)
        })
        .collect()
}

#[test]
fn the_rerun_of_a_merge_stopped_by_a_full_disk_reclaims_what_it_leaked() {
    let dir = tempfile::tempdir().unwrap();
    let (base0, top0) = build_pair(dir.path());
    let expected = view(&dir.path().join("top.qcow2"));
    let commits = leaky_failures(&base0, &top0, true, &commit_on, dir.path());
    assert!(!commits.is_empty(), "no commit failure left leaks");
    for (run, leaked) in &commits {
        let r = commit(
            &run.join("top.qcow2"),
            &CommitOptions::default(),
            &mut Hooks::default(),
        )
        .unwrap();
        assert_eq!(r.leaks_reclaimed, *leaked, "{}", run.display());
        assert_clean(&run.join("base.qcow2"));
        assert_eq!(view(&run.join("base.qcow2")), expected, "{}", run.display());
    }
    let pulls = leaky_failures(&base0, &top0, false, &pull_on, dir.path());
    assert!(!pulls.is_empty(), "no pull failure left leaks");
    for (run, leaked) in &pulls {
        let r = pull(
            &run.join("top.qcow2"),
            &PullOptions::default(),
            &mut Hooks::default(),
        )
        .unwrap();
        assert_eq!(r.leaks_reclaimed, *leaked, "{}", run.display());
        assert_clean(&run.join("top.qcow2"));
        assert_eq!(view(&run.join("top.qcow2")), expected, "{}", run.display());
    }
}

#[test]
fn a_source_truncated_under_a_commit_fails_it_before_the_top_is_emptied() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    let top = dir.path().join("top.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&base), "8M"]);
    qemu_overlay(&top, "base.qcow2");
    qemu_io(&top, &["write -P 0x66 0 8M"]);
    let top_len = std::fs::metadata(&top).unwrap().len();
    let mut truncated = false;
    let mut cb = |_p: strata_merge::Progress| {
        if !truncated {
            truncated = true;
            let f = std::fs::OpenOptions::new().write(true).open(&top).unwrap();
            f.set_len(top_len / 2).unwrap();
        }
    };
    let mut hooks = Hooks::new().with_progress(&mut cb);
    let e = commit(&top, &CommitOptions::default(), &mut hooks)
        .expect_err("commit must fail when its source was truncated");
    let msg = e.to_string();
    assert!(msg.starts_with("commit failed: "), "{msg}");
    assert!(
        msg.contains(&format!("{}: was truncated", top.display())),
        "{msg}"
    );
    // The top was neither emptied nor re-pointed: its L2 tables (at the
    // start of the file) still map every cluster.
    assert_eq!(own_allocated(&top), 8 << 20);
    assert_eq!(backing_of(&top).as_deref(), Some("base.qcow2"));
}

#[test]
fn a_new_backing_file_truncated_under_a_rebase_fails_it_and_keeps_the_old_one() {
    let dir = tempfile::tempdir().unwrap();
    let (_base, top, before) = raw_pair(dir.path());
    let new = dir.path().join("new.raw");
    qemu_img(&["create", "-q", "-f", "raw", s(&new), "8M"]);
    qemu_io(&new, &["write -P 0x77 0 8M"]);
    let mut truncated = false;
    let mut cb = |_p: strata_merge::Progress| {
        if !truncated {
            truncated = true;
            let f = std::fs::OpenOptions::new().write(true).open(&new).unwrap();
            f.set_len(1 << 20).unwrap();
        }
    };
    let mut hooks = Hooks::new().with_progress(&mut cb);
    let e = rebase(
        &top,
        Some(("new.raw", ImageFormat::Raw)),
        &RebaseOptions::default(),
        &mut hooks,
    )
    .expect_err("rebase must fail when the new backing file was truncated");
    assert!(e.to_string().starts_with("rebase failed: "), "{e}");
    assert!(
        e.to_string()
            .contains(&format!("{}: was truncated", new.display())),
        "{e}"
    );
    assert_eq!(backing_of(&top).as_deref(), Some("base.raw"));
    assert_eq!(view(&top), before);
}
