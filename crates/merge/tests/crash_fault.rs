//! Fault-injection crash tests of commit and pull, at every storage
//! operation (docs/merge-protocol.md, "Tested").
//!
//! The files of a chain live on [`FaultStorage`]s that share one crash
//! clock, so operation N counts the writes, length changes and syncs of
//! every file in the order the merge does them. A reference run counts
//! them; then, for every N, the merge runs again and crashes at N (that
//! operation and all later ones fail). For each file, what a disk could
//! hold afterwards is its durable bytes plus a subset of its unsynced
//! writes (none, all, the first half, random ones; chosen per file). For
//! every such state:
//!
//! - every file opens, Strata's check and `qemu-img check` find no
//!   corruption (leaks are allowed);
//! - the top's guest view (its chain as its header now names it) is the
//!   view it had before the merge (read by Strata for every state, and by
//!   `qemu-img compare` for a sample);
//! - running the same merge again, without a crash, succeeds and leaves
//!   the complete result: after a commit the base reads as the original
//!   top and the top allocates nothing and names the base; after a pull
//!   the top names the kept layer (or nothing) and reads as before. The
//!   rerun goes through the open-image entry point for every state, and
//!   through the path-based API (with its refusals and guard) on files for
//!   a sample.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use strata_image::{Chain, FaultStorage, Image, ImageFormat, Layer, Qcow2Image};
use strata_merge::{
    commit, commit_open, pull, pull_open, CommitOptions, CommitParts, Hooks, MergeError,
    PullOptions,
};

/// Image files by name, as one directory holds them.
type Files = BTreeMap<String, Vec<u8>>;
/// The same files on fault-injecting storages that share one crash clock.
type Disks = BTreeMap<String, FaultStorage>;

const TOP: &str = "top.qcow2";

/// The merge under test, as the command line would say it.
#[derive(Debug, Clone, Copy)]
enum Op {
    /// `commit top` (`dash_b` false: `base` is the immediate backing file)
    /// or `commit -b base top`.
    Commit { base: &'static str, dash_b: bool },
    /// `pull top` (`keep` None) or `pull -b keep top`.
    Pull { keep: Option<&'static str> },
}

fn format_of(name: &str) -> ImageFormat {
    if name.ends_with(".raw") {
        ImageFormat::Raw
    } else {
        ImageFormat::Qcow2
    }
}

thread_local! {
    /// Whether the storages of this test act as a filesystem that clones
    /// ([`FaultStorage::set_clones`]): merges then clone whole clusters.
    static CLONES: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// The files on storages sharing one clock, crashing at `crash_at`.
fn disks(files: &Files, crash_at: Option<u64>) -> Disks {
    let mut out = Disks::new();
    let mut clock: Option<FaultStorage> = None;
    for (name, bytes) in files {
        let d = match &clock {
            Some(c) => c.new_sharing_clock(bytes.clone()),
            None => FaultStorage::new(bytes.clone()),
        };
        clock.get_or_insert_with(|| d.clone());
        d.set_clones(CLONES.with(|c| c.get()));
        out.insert(name.clone(), d);
    }
    if let (Some(n), Some(c)) = (crash_at, &clock) {
        c.crash_at(n);
    }
    out
}

fn open_layer(
    disks: &Disks,
    name: &str,
    named_as: Option<String>,
    writable: bool,
) -> strata_image::Result<Layer> {
    let disk = disks.get(name).ok_or_else(|| {
        strata_image::Error::InvalidArgument(format!("{name}: no such file in the state"))
    })?;
    let storage = Box::new(disk.clone());
    let path = PathBuf::from(name);
    let image = match (format_of(name), writable) {
        (ImageFormat::Qcow2, true) => Image::Qcow2(Qcow2Image::open_rw(storage, &path)?),
        (format, _) => Image::open(storage, &path, format)?,
    };
    Ok(Layer::new(path, named_as, image))
}

/// Opens `name` and the backing chain its header names (the layer names
/// are the file names; formats from the headers, which must match).
fn chain_of(disks: &Disks, name: &str, writable: bool) -> strata_image::Result<Chain> {
    let mut layers = vec![open_layer(disks, name, None, writable)?];
    while let Some((Some(b), f)) = layers.last().map(|l| l.image.backing()) {
        let (backing, fmt) = (b.to_string(), f.map(str::to_string));
        assert_eq!(
            fmt.as_deref(),
            Some(format_of(&backing).name()),
            "{name}: backing format of {backing}"
        );
        layers.push(open_layer(disks, &backing, Some(backing.clone()), false)?);
    }
    Chain::from_layers(layers)
}

fn position(chain: &Chain, name: &str) -> Option<usize> {
    chain
        .layers()
        .iter()
        .position(|l| l.path == Path::new(name))
}

/// Runs `op` on open images, as `commit` and `pull` do after opening the
/// files: the top opened twice for commit (read view, writer), the base
/// as its own writable chain. Returns the result and the number of storage
/// operations done when the merge returned (closing the images afterwards
/// syncs once more).
fn run(op: Op, disks: &Disks) -> (strata_merge::Result<()>, u64) {
    let clock = disks.values().next().unwrap().clone();
    let mut returned_at = None;
    let res = run_merge(op, disks, &mut || returned_at = Some(clock.ops()));
    (res, returned_at.unwrap_or_else(|| clock.ops()))
}

fn run_merge(op: Op, disks: &Disks, returned: &mut dyn FnMut()) -> strata_merge::Result<()> {
    let mut hooks = Hooks::default();
    match op {
        Op::Commit { base, .. } => {
            let mut top = Chain::from_layers(vec![open_layer(disks, TOP, None, true)?])?;
            let view = chain_of(disks, TOP, false)?;
            let k = position(&view, base)
                .ok_or_else(|| MergeError::InvalidArgument(format!("{base}: not in the chain")))?;
            let mut base_chain = chain_of(disks, base, true)?;
            let res = commit_open(
                CommitParts {
                    upper: &view.layers()[..k],
                    base: &mut base_chain,
                    top: &mut top,
                    backing: (k > 1).then_some((base, format_of(base))),
                },
                &CommitOptions::default(),
                &mut hooks,
            );
            returned();
            let _ = res?;
        }
        Op::Pull { keep } => {
            let mut chain = chain_of(disks, TOP, true)?;
            let k = match keep {
                Some(name) => position(&chain, name).ok_or_else(|| {
                    MergeError::InvalidArgument(format!("{name}: not in the chain"))
                })?,
                None => chain.layers().len(),
            };
            let res = pull_open(
                &mut chain,
                k,
                keep.map(|n| (n, format_of(n))),
                false,
                &mut hooks,
            );
            returned();
            let _ = res?;
        }
    }
    Ok(())
}

/// The same merge through the path-based API, on files.
fn run_on_files(op: Op, dir: &Path) -> strata_merge::Result<()> {
    let top = dir.join(TOP);
    let mut hooks = Hooks::default();
    match op {
        Op::Commit { base, dash_b } => {
            // The protocol under test re-points and empties the top.
            let mut opts = CommitOptions::default().with_shorten_chain(dash_b);
            opts.base = dash_b.then(|| dir.join(base));
            let _ = commit(&top, &opts, &mut hooks)?;
        }
        Op::Pull { keep } => {
            let mut opts = PullOptions::default();
            opts.base = keep.map(|k| dir.join(k));
            let _ = pull(&top, &opts, &mut hooks)?;
        }
    }
    Ok(())
}

fn read_view(chain: &Chain) -> Vec<u8> {
    let mut v = vec![0u8; chain.virtual_size() as usize];
    chain.read_at(&mut v, 0).unwrap();
    v
}

fn snapshot(disks: &Disks) -> Files {
    disks
        .iter()
        .map(|(n, d)| (n.clone(), d.current()))
        .collect()
}

/// Opens every qcow2 file alone and checks it with Strata: it opens, is
/// not marked corrupt or dirty, and has no corruption (leaks allowed).
fn assert_opens_uncorrupted(files: &Files, label: &str) {
    for (name, bytes) in files {
        if format_of(name) != ImageFormat::Qcow2 {
            continue;
        }
        let img = Qcow2Image::open(Box::new(FaultStorage::new(bytes.clone())), Path::new(name))
            .unwrap_or_else(|e| panic!("{label}: {name} does not open: {e}"));
        let h = img.header();
        assert!(!h.corrupt() && !h.dirty(), "{label}: {name}: header bits");
        let r = strata_image::check::check(&img)
            .unwrap_or_else(|e| panic!("{label}: {name}: check failed: {e}"));
        assert!(
            r.corruptions == 0 && r.check_errors == 0,
            "{label}: {name}: strata check: {:?}",
            r.problems
        );
    }
}

/// The backing file name the top's header records.
fn backing_name(files: &Files) -> Option<String> {
    let img = Qcow2Image::open(
        Box::new(FaultStorage::new(files[TOP].clone())),
        Path::new(TOP),
    )
    .unwrap();
    img.header()
        .backing_file()
        .map(str::to_owned)
        .filter(|n| !n.is_empty())
}

/// The top's chain as its header names it reads `orig`.
fn assert_top_view(files: &Files, orig: &[u8], label: &str) {
    let d = disks(files, None);
    let chain = chain_of(&d, TOP, false).unwrap_or_else(|e| panic!("{label}: opening: {e}"));
    let v = read_view(&chain);
    assert_eq!(v.len(), orig.len(), "{label}: top's size changed");
    if v == orig {
        return;
    }
    if let Some(i) = v.iter().zip(orig).position(|(a, b)| a != b) {
        panic!(
            "{label}: top's view changed at byte {i:#x}: {:#x}, was {:#x}",
            v[i], orig[i]
        );
    }
}

/// After a merge ran to its end: the complete result.
fn assert_complete(op: Op, files: &Files, orig: &[u8], label: &str) {
    assert_opens_uncorrupted(files, label);
    assert_top_view(files, orig, label);
    let d = disks(files, None);
    let chain = chain_of(&d, TOP, false).unwrap();
    let names: Vec<_> = chain.layers().iter().map(|l| l.path.clone()).collect();
    match op {
        Op::Commit { base, .. } => {
            assert_eq!(
                names,
                [PathBuf::from(TOP), PathBuf::from(base)],
                "{label}: after commit the top names the base"
            );
            let base_chain = chain_of(&d, base, false).unwrap();
            assert!(
                read_view(&base_chain) == orig,
                "{label}: the base does not read as the original top"
            );
            let top = &chain.top().image;
            let size = top.virtual_size();
            let mut pos = 0;
            while pos < size {
                let e = top.map(pos, size - pos).unwrap();
                assert!(!e.mapping.is_allocated(), "{label}: top not emptied: {e:?}");
                pos += e.len.max(1);
            }
        }
        Op::Pull { keep } => {
            let want: Vec<PathBuf> = std::iter::once(TOP)
                .chain(keep)
                .map(PathBuf::from)
                .collect();
            assert_eq!(
                names, want,
                "{label}: after pull the top names the kept layer"
            );
        }
    }
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn hash_of(bytes: &[u8]) -> u64 {
    let mut h = DefaultHasher::new();
    bytes.hash(&mut h);
    h.finish()
}

fn write_dir(dir: &Path, files: &Files) {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
    for (name, bytes) in files {
        std::fs::write(dir.join(name), bytes).unwrap();
    }
}

fn read_dir(dir: &Path, like: &Files) -> Files {
    like.keys()
        .map(|n| (n.clone(), std::fs::read(dir.join(n)).unwrap()))
        .collect()
}

/// `qemu-img check`: no corruption (exit 0, or 3 for leaks only).
fn qemu_check(img: &Path, label: &str) {
    let out = Command::new("qemu-img")
        .args(["check", "-U", s(img)])
        .output()
        .unwrap();
    let code = out.status.code().unwrap_or(-1);
    assert!(
        code == 0 || code == 3,
        "{label}: qemu-img check {} exit {code}:\n{}{}",
        img.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn qemu_same(img: &Path, raw: &Path, label: &str) {
    let fmt = format_of(&img.to_string_lossy()).name();
    let out = Command::new("qemu-img")
        .args(["compare", "-U", "-f", fmt, "-F", "raw", s(img), s(raw)])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{label}: qemu-img compare {} with the original view: {}{}",
        img.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Which unsynced writes of one file reached the disk.
#[derive(Debug, Clone, Copy)]
enum Subset {
    None,
    All,
    /// The older half (an in-order write-back cut short).
    FirstHalf,
    /// Each one with probability 1/2, or 1/3 (seeded per file).
    Random(u64, u64),
}

/// What the checks of one scenario covered, and where the time went.
#[derive(Debug, Default)]
struct Tally {
    crash_points: u64,
    states: u64,
    distinct_states: u64,
    qemu_checks: u64,
    qemu_compares: u64,
    path_reruns: u64,
    t_crash: Duration,
    t_strata: Duration,
    t_qemu: Duration,
    t_sampled: Duration,
}

struct Checker {
    op: Op,
    orig: Vec<u8>,
    orig_raw: PathBuf,
    work: PathBuf,
    /// Hashes of the states (all files) already checked.
    seen_states: HashSet<u64>,
    /// Hashes of the states checked with qemu-img compare and a rerun on
    /// files.
    sampled_states: HashSet<u64>,
    /// Hashes of the files `qemu-img check` already passed.
    qemu_checked: HashSet<u64>,
    /// The backing name the top recorded before the merge.
    orig_backing: Option<String>,
    /// Check every `sample`th distinct state with qemu-img compare and a
    /// path-based rerun.
    sample: u64,
    tally: Tally,
    /// Per image with persistent bitmaps: its guest view and bitmaps
    /// before the merge (see [`check_bitmaps`]).
    bitmaps: Vec<BitmapOrig>,
}

/// An image's guest view and its bitmaps (name, enabled, dirty bits)
/// before the merge.
struct BitmapOrig {
    name: String,
    view: Vec<u8>,
    bitmaps: Vec<(String, bool, strata_image::DirtyBitmap)>,
}

fn bitmap_origs(files: &Files) -> Vec<BitmapOrig> {
    let d = disks(files, None);
    let mut out = Vec::new();
    for name in files.keys().filter(|n| format_of(n) == ImageFormat::Qcow2) {
        let chain = chain_of(&d, name, false).unwrap();
        let Some(q) = chain.top().image.as_qcow2() else {
            continue;
        };
        let bitmaps: Vec<_> = q
            .bitmaps()
            .unwrap()
            .into_iter()
            .map(|b| (b.name.clone(), b.auto, q.dirty_bitmap(&b.name).unwrap()))
            .collect();
        if !bitmaps.is_empty() {
            out.push(BitmapOrig {
                name: name.clone(),
                view: read_view(&chain),
                bitmaps,
            });
        }
    }
    out
}

/// After any crash, each image keeps its bitmaps; each enabled one is
/// flagged in use, or dirty wherever it was before and wherever the
/// image's guest view changed; a disabled one is unchanged.
fn check_bitmaps(origs: &[BitmapOrig], files: &Files, label: &str) {
    let d = disks(files, None);
    for o in origs {
        let chain = chain_of(&d, &o.name, false).unwrap();
        let view = read_view(&chain);
        let q = chain.top().image.as_qcow2().unwrap();
        let now = q.bitmaps().unwrap();
        let names: Vec<_> = now.iter().map(|b| b.name.as_str()).collect();
        let before: Vec<_> = o.bitmaps.iter().map(|b| b.0.as_str()).collect();
        assert_eq!(names, before, "{label}: {}: bitmap list changed", o.name);
        for ((name, auto, old), b) in o.bitmaps.iter().zip(&now) {
            if b.in_use {
                assert!(*auto, "{label}: {}: disabled {name} flagged in use", o.name);
                continue;
            }
            let new = q.dirty_bitmap(name).unwrap();
            let g = new.granularity() as usize;
            for start in (0..view.len()).step_by(g) {
                let end = (start + g).min(view.len());
                let prev = o.view.get(start..end.min(o.view.len())).unwrap_or(&[]);
                let changed = view[start..start + prev.len()] != *prev
                    || view[start + prev.len()..end].iter().any(|x| *x != 0);
                let was = old.is_dirty(start as u64);
                if *auto {
                    assert!(
                        !(changed || was) || new.is_dirty(start as u64),
                        "{label}: {}: {name} claims {start:#x} clean (changed {changed}, was dirty {was})",
                        o.name
                    );
                } else {
                    assert_eq!(
                        was,
                        new.is_dirty(start as u64),
                        "{label}: {}: disabled {name}",
                        o.name
                    );
                }
            }
        }
    }
}

impl Checker {
    /// Checks one post-crash state; `force_sample`: also with qemu-img
    /// compare and a path-based rerun.
    fn check_state(&mut self, files: &Files, label: &str, force_sample: bool) {
        self.tally.states += 1;
        let file_hashes: Vec<(String, u64)> =
            files.iter().map(|(n, b)| (n.clone(), hash_of(b))).collect();
        let mut h = DefaultHasher::new();
        file_hashes.hash(&mut h);
        let state_hash = h.finish();
        let dir = self.work.join("state");
        if self.seen_states.insert(state_hash) {
            self.tally.distinct_states += 1;
            let t = Instant::now();
            // (a) Every file opens; Strata finds no corruption.
            assert_opens_uncorrupted(files, label);
            // (b) The top reads as before.
            assert_top_view(files, &self.orig, label);
            // Bitmaps: in use, or dirty wherever the view changed.
            check_bitmaps(&self.bitmaps, files, label);
            // (c) The same merge, run again, completes.
            let d = disks(files, None);
            run(self.op, &d)
                .0
                .unwrap_or_else(|e| panic!("{label}: rerun failed: {e}"));
            assert_complete(
                self.op,
                &snapshot(&d),
                &self.orig,
                &format!("{label}, rerun"),
            );
            self.tally.t_strata += t.elapsed();

            // (a) qemu-img check finds no corruption either (each distinct
            // file once).
            let t = Instant::now();
            let unchecked: Vec<&str> = file_hashes
                .iter()
                .filter(|(n, fh)| {
                    format_of(n) == ImageFormat::Qcow2 && !self.qemu_checked.contains(fh)
                })
                .map(|(n, _)| n.as_str())
                .collect();
            if !unchecked.is_empty() {
                write_dir(&dir, files);
            }
            for name in unchecked {
                qemu_check(&dir.join(name), label);
                self.tally.qemu_checks += 1;
            }
            for (n, fh) in &file_hashes {
                if format_of(n) == ImageFormat::Qcow2 {
                    self.qemu_checked.insert(*fh);
                }
            }
            self.tally.t_qemu += t.elapsed();
        }
        // Every state whose top names another backing file than before
        // (re-pointed or switched), and a regular sample of the others.
        let switched = backing_name(files) != self.orig_backing;
        let due = force_sample
            || switched
            || (self.tally.distinct_states - 1).is_multiple_of(self.sample);
        if !due || !self.sampled_states.insert(state_hash) {
            return;
        }
        let t = Instant::now();
        // (b) by qemu-img; (c) through the path-based API, with its
        // refusals and guard, on files.
        write_dir(&dir, files);
        qemu_same(&dir.join(TOP), &self.orig_raw, label);
        self.tally.qemu_compares += 1;
        run_on_files(self.op, &dir)
            .unwrap_or_else(|e| panic!("{label}: rerun on files failed: {e}"));
        let after = read_dir(&dir, files);
        let label = format!("{label}, rerun on files");
        assert_complete(self.op, &after, &self.orig, &label);
        for name in files.keys() {
            if format_of(name) == ImageFormat::Qcow2 {
                qemu_check(&dir.join(name), &label);
            }
        }
        qemu_same(&dir.join(TOP), &self.orig_raw, &label);
        if let Op::Commit { base, .. } = self.op {
            qemu_same(&dir.join(base), &self.orig_raw, &label);
        }
        self.tally.path_reruns += 1;
        self.tally.t_sampled += t.elapsed();
    }
}

/// Crashes `op` on `files` at every `stride`th storage operation (and the
/// last one) and checks every durable state (see the module docs).
fn crash_everywhere(name: &str, files: Files, op: Op, stride: u64) -> Tally {
    let t0 = Instant::now();
    let work = work_dir();
    // The original view, by Strata and by qemu-img (they must agree).
    write_dir(&work.path().join("orig"), &files);
    let orig = read_view(&chain_of(&disks(&files, None), TOP, false).unwrap());
    let orig_raw = work.path().join("orig.raw");
    qemu_img(&[
        "convert",
        "-U",
        "-O",
        "raw",
        s(&work.path().join("orig").join(TOP)),
        s(&orig_raw),
    ]);
    assert!(
        std::fs::read(&orig_raw).unwrap() == orig,
        "{name}: Strata and qemu-img disagree"
    );

    // Reference run: count the operations; the result is complete.
    let reference = disks(&files, None);
    let (res, merge_ops) = run(op, &reference);
    res.unwrap();
    let total = reference.values().next().unwrap().ops();
    if CLONES.with(|c| c.get()) {
        let clones: u64 = reference.values().map(FaultStorage::range_copies).sum();
        assert!(clones > 0, "{name}: nothing was cloned");
        eprintln!("{name}: {clones} clones in the reference run");
    }
    let syncs: u64 = reference.values().map(FaultStorage::syncs).sum();
    assert_complete(
        op,
        &snapshot(&reference),
        &orig,
        &format!("{name}: reference run"),
    );
    // The smallest merge here, a pull by clones that keeps a backing
    // file, makes 9: fewer means the workload did not run.
    assert!(total > 8, "{name}: only {total} operations");

    let mut ck = Checker {
        op,
        orig,
        orig_raw,
        work: work.path().to_path_buf(),
        seen_states: HashSet::new(),
        sampled_states: HashSet::new(),
        orig_backing: backing_name(&files),
        qemu_checked: HashSet::new(),
        sample: 8,
        tally: Tally::default(),
        bitmaps: bitmap_origs(&files),
    };
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let points: Vec<u64> = (0..total)
        .filter(|n| n % stride == 0 || n + 1 == total)
        .collect();
    for &n in &points {
        let t = Instant::now();
        let d = disks(&files, Some(n));
        let (res, _) = run(op, &d);
        let first = d.values().next().unwrap();
        assert!(first.crashed(), "{name}: crash point {n} not reached");
        // A crash before the merge returned is an error; one while the
        // images are closed afterwards (their last sync) is not its own.
        assert_eq!(
            res.is_err(),
            n < merge_ops,
            "{name}: crash at op {n}/{total} (the merge returned after op {merge_ops}): {res:?}"
        );
        ck.tally.crash_points += 1;
        ck.tally.t_crash += t.elapsed();
        let pending: Vec<usize> = d.values().map(FaultStorage::pending).collect();
        let subsets = [
            ("none", Subset::None),
            ("all", Subset::All),
            ("first-half", Subset::FirstHalf),
            ("random-1/2", Subset::Random(rng.next() | 1, 2)),
            ("random-1/3", Subset::Random(rng.next() | 1, 3)),
        ];
        for (sname, subset) in subsets {
            let state: Files = d
                .iter()
                .enumerate()
                .map(|(i, (fname, disk))| {
                    let p = disk.pending();
                    let mut r = match subset {
                        Subset::Random(seed, _) => Rng(seed.wrapping_mul(i as u64 + 1) | 1),
                        _ => Rng(1),
                    };
                    let mut keep = |j: usize| match subset {
                        Subset::None => false,
                        Subset::All => true,
                        Subset::FirstHalf => j < p / 2,
                        Subset::Random(_, m) => r.next().is_multiple_of(m),
                    };
                    (fname.clone(), disk.durable_image(&mut keep))
                })
                .collect();
            let label = format!("{name}: crash at op {n}/{total} (pending {pending:?}, {sname})");
            ck.check_state(&state, &label, n + stride >= total);
        }
    }
    let t = &ck.tally;
    eprintln!(
        "{name}: {total} operations ({merge_ops} in the merge, {syncs} syncs), {} crash points, {} states ({} distinct), \
         {} qemu-img checks, {} qemu-img compares, {} reruns on files; {:.1?} \
         (crash runs {:.1?}, Strata checks and reruns {:.1?}, qemu-img checks {:.1?}, \
         samples {:.1?})",
        t.crash_points,
        t.states,
        t.distinct_states,
        t.qemu_checks,
        t.qemu_compares,
        t.path_reruns,
        t0.elapsed(),
        t.t_crash,
        t.t_strata,
        t.t_qemu,
        t.t_sampled,
    );
    ck.tally
}

/// One file to build: its name, its `qemu-img create` arguments (`FILE`
/// stands for its path) and the qemu-io commands that fill it.
struct Img {
    name: &'static str,
    create: String,
    io: Vec<String>,
}

fn img(name: &'static str, create: &str, io: &[&str], more: Vec<String>) -> Img {
    let mut cmds: Vec<String> = io.iter().map(|c| c.to_string()).collect();
    cmds.extend(more);
    Img {
        name,
        create: create.to_string(),
        io: cmds,
    }
}

/// `count` writes `step` apart from `start`, in turn: zeros, a short
/// unaligned write, and two data writes of `len` bytes (offsets shifted by
/// a few sectors so that they do not line up with clusters).
fn scattered(pattern: u64, start: u64, step: u64, count: u64, len: u64) -> Vec<String> {
    (0..count)
        .map(|i| {
            let off = start + i * step + (i % 3) * 512;
            let p = 0x20 + (pattern + i) % 200;
            match i % 4 {
                0 => format!("write -z {off} {len}"),
                1 => format!("write -P {p} {} 1000", off + 100),
                _ => format!("write -P {p} {off} {len}"),
            }
        })
        .collect()
}

/// A work directory in memory when there is one (the path-based reruns
/// sync their files).
fn work_dir() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(d) = tempfile::tempdir_in(shm) {
            return d;
        }
    }
    tempfile::tempdir().unwrap()
}

/// Builds the files with qemu-img and qemu-io.
fn build(imgs: &[Img]) -> Files {
    let dir = work_dir();
    for i in imgs {
        let p = dir.path().join(i.name);
        let mut args: Vec<String> = vec!["create".into(), "-q".into()];
        args.extend(
            i.create
                .split_whitespace()
                .map(|a| a.replace("FILE", s(&p))),
        );
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        qemu_img(&refs);
        // qemu-io commands, in runs; `qemu-img ARGS` entries (FILE: the
        // image) run in between, in order.
        let mut io: Vec<&str> = Vec::new();
        for c in &i.io {
            if let Some(rest) = c.strip_prefix("qemu-img ") {
                if !io.is_empty() {
                    qemu_io(&p, &io);
                    io.clear();
                }
                let args: Vec<String> = rest
                    .split_whitespace()
                    .map(|a| a.replace("FILE", s(&p)))
                    .collect();
                let refs: Vec<&str> = args.iter().map(String::as_str).collect();
                qemu_img(&refs);
            } else {
                io.push(c);
            }
        }
        if !io.is_empty() {
            qemu_io(&p, &io);
        }
    }
    imgs.iter()
        .map(|i| {
            (
                i.name.to_string(),
                std::fs::read(dir.path().join(i.name)).unwrap(),
            )
        })
        .collect()
}

fn assert_covered(t: &Tally, min_points: u64) {
    assert!(
        t.crash_points >= min_points,
        "only {} crash points",
        t.crash_points
    );
    assert!(
        t.distinct_states > t.crash_points,
        "too few distinct states"
    );
    assert!(t.path_reruns >= 2 && t.qemu_compares >= 2);
}

const K: u64 = 1024;

#[test]
fn commit_into_a_growing_qcow2_base_survives_a_crash_at_every_operation() {
    // Base: 2 MiB, 4 KiB clusters, data and a zero cluster. Top: 3 MiB,
    // 512-byte clusters: data, zeros and unaligned writes scattered over
    // the base's data, across its end and past it (the base grows).
    let files = build(&[
        img(
            "base.qcow2",
            "-f qcow2 -o cluster_size=4096 FILE 2M",
            &[
                "write -P 0xa1 0 640k",
                "write -P 0xa2 1M 512k",
                "write -z 1100k 8k",
            ],
            vec![],
        ),
        img(
            TOP,
            "-f qcow2 -o cluster_size=512 -b base.qcow2 -F qcow2 FILE 3M",
            &["write -z 2980k 32k"],
            scattered(1, 0, 72 * K, 41, 6 * K),
        ),
    ]);
    let t = crash_everywhere(
        "commit (k=1, base grows)",
        files,
        Op::Commit {
            base: "base.qcow2",
            dash_b: false,
        },
        1,
    );
    assert_covered(&t, 100);
}

#[test]
fn commit_and_pull_with_bitmaps_survive_a_crash_at_every_operation() {
    // Base and top carry enabled and disabled bitmaps, already dirty
    // somewhere; the base grows.
    let chain = || {
        build(&[
            img(
                "base.qcow2",
                "-f qcow2 -o cluster_size=4096 FILE 1M",
                &[
                    "write -P 0xa1 0 300k",
                    "qemu-img bitmap --add -g 4k FILE b-on",
                    "qemu-img bitmap --add -g 64k FILE b-off",
                    "write -P 0xa2 600k 8k",
                    "qemu-img bitmap --disable FILE b-off",
                ],
                vec![],
            ),
            img(
                TOP,
                "-f qcow2 -o cluster_size=4096 -b base.qcow2 -F qcow2 FILE 1536k",
                &[
                    "qemu-img bitmap --add -g 16k FILE t-on",
                    "qemu-img bitmap --add FILE t-off",
                    "write -P 0xb1 1200k 4k",
                    "qemu-img bitmap --disable FILE t-off",
                ],
                scattered(7, 0, 36 * K, 40, 6 * K),
            ),
        ])
    };
    let t = crash_everywhere(
        "commit with bitmaps",
        chain(),
        Op::Commit {
            base: "base.qcow2",
            dash_b: false,
        },
        1,
    );
    assert_covered(&t, 30);
    let t = crash_everywhere("pull with bitmaps", chain(), Op::Pull { keep: None }, 1);
    assert_covered(&t, 30);
}

#[test]
fn commit_b_over_three_layers_survives_a_crash_at_every_operation() {
    // base <- mid <- top, commit -b base: k = 2, the top is re-pointed at
    // the base before it is emptied.
    let files = build(&[
        img(
            "base.qcow2",
            "-f qcow2 -o cluster_size=65536 FILE 2M",
            &["write -P 0xb1 0 1M"],
            vec![],
        ),
        img(
            "mid.qcow2",
            "-f qcow2 -o cluster_size=4096 -b base.qcow2 -F qcow2 FILE 2M",
            &[],
            scattered(50, 16 * K, 96 * K, 20, 8 * K),
        ),
        img(
            TOP,
            "-f qcow2 -o cluster_size=16384 -b mid.qcow2 -F qcow2 FILE 2M",
            &[],
            scattered(100, 40 * K, 128 * K, 15, 16 * K),
        ),
    ]);
    let t = crash_everywhere(
        "commit -b (k=2)",
        files,
        Op::Commit {
            base: "base.qcow2",
            dash_b: true,
        },
        1,
    );
    assert_covered(&t, 40);
}

#[test]
fn commit_into_a_raw_base_survives_a_crash_at_every_operation() {
    // A raw base (zeros are written as zeros, growth is a length change)
    // under a larger qcow2 top.
    let files = build(&[
        img(
            "base.raw",
            "-f raw FILE 1M",
            &["write -P 0xe1 0 1M"],
            vec![],
        ),
        img(
            TOP,
            "-f qcow2 -o cluster_size=4096 -b base.raw -F raw FILE 1536k",
            &[],
            scattered(150, 0, 80 * K, 19, 4 * K),
        ),
    ]);
    let t = crash_everywhere(
        "commit into raw",
        files,
        Op::Commit {
            base: "base.raw",
            dash_b: false,
        },
        1,
    );
    assert_covered(&t, 20);
}

/// base <- mid <- top, 2 MiB, the top with `top_cluster`-byte clusters.
fn three_layers(top_cluster: u32) -> Files {
    build(&[
        img(
            "base.qcow2",
            "-f qcow2 -o cluster_size=65536 FILE 2M",
            &["write -P 0x21 0 1M", "write -P 0x22 1536k 256k"],
            vec![],
        ),
        img(
            "mid.qcow2",
            "-f qcow2 -o cluster_size=4096 -b base.qcow2 -F qcow2 FILE 2M",
            &[],
            scattered(60, 8 * K, 100 * K, 20, 8 * K),
        ),
        img(
            TOP,
            &format!("-f qcow2 -o cluster_size={top_cluster} -b mid.qcow2 -F qcow2 FILE 2M"),
            &[],
            scattered(120, 0, 150 * K, 13, 4 * K),
        ),
    ])
}

#[test]
fn pull_of_a_whole_chain_survives_a_crash_at_every_operation() {
    let t = crash_everywhere(
        "pull (k=n=3)",
        three_layers(4096),
        Op::Pull { keep: None },
        1,
    );
    assert_covered(&t, 20);
}

#[test]
fn pull_b_keeping_the_bottom_layer_survives_a_crash_at_every_operation() {
    let t = crash_everywhere(
        "pull -b base",
        three_layers(512),
        Op::Pull {
            keep: Some("base.qcow2"),
        },
        1,
    );
    assert_covered(&t, 30);
}

/// base <- mid <- top (base <- top without `mid`), 64 KiB clusters
/// everywhere: whole clusters (which clone), partial ones and zeros, in
/// every layer.
fn cloning_chain(mid: bool) -> Files {
    let under_top = if mid { "mid.qcow2" } else { "base.qcow2" };
    let mut imgs = vec![
        img(
            "base.qcow2",
            "-f qcow2 -o cluster_size=65536 FILE 2M",
            &[
                "write -P 0x31 0 512k",
                "write -P 0x32 1M 256k",
                "write -P 0x33 1800k 10k",
            ],
            vec![],
        ),
        img(
            "mid.qcow2",
            "-f qcow2 -o cluster_size=65536 -b base.qcow2 -F qcow2 FILE 2M",
            &[
                "write -P 0x41 128k 192k",
                "write -P 0x42 900k 5k",
                "write -z 1088k 64k",
                "write -P 0x43 1536k 128k",
            ],
            vec![],
        ),
    ];
    if !mid {
        imgs.pop();
    }
    imgs.push(Img {
        name: TOP,
        create: format!("-f qcow2 -o cluster_size=65536 -b {under_top} -F qcow2 FILE 2M"),
        io: [
            "write -P 0x51 256k 128k",
            "write -P 0x52 700k 3k",
            "write -P 0x53 1920k 128k",
            "write -z 0 64k",
        ]
        .map(String::from)
        .to_vec(),
    });
    build(&imgs)
}

#[test]
fn commit_by_clones_survives_a_crash_at_every_operation() {
    CLONES.with(|c| c.set(true));
    let t = crash_everywhere(
        "commit by clones (k=1)",
        cloning_chain(false),
        Op::Commit {
            base: "base.qcow2",
            dash_b: false,
        },
        1,
    );
    assert_covered_few(&t, 10);
    let t = crash_everywhere(
        "commit -b by clones (k=2)",
        cloning_chain(true),
        Op::Commit {
            base: "base.qcow2",
            dash_b: true,
        },
        1,
    );
    assert_covered_few(&t, 10);
}

#[test]
fn pull_by_clones_survives_a_crash_at_every_operation() {
    CLONES.with(|c| c.set(true));
    let t = crash_everywhere(
        "pull by clones",
        cloning_chain(true),
        Op::Pull { keep: None },
        1,
    );
    assert_covered(&t, 10);
    let t = crash_everywhere(
        "pull -b base by clones",
        cloning_chain(true),
        Op::Pull {
            keep: Some("base.qcow2"),
        },
        1,
    );
    // 9 operations (11 before the barriers that found nothing to write
    // were skipped): the clone, the tables and entries, the header and
    // the 3 barriers between them.
    assert_covered_few(&t, 9);
}

#[test]
fn a_failing_clone_stops_the_merge_and_changes_no_view() {
    CLONES.with(|c| c.set(true));
    let files = cloning_chain(false);
    let orig = read_view(&chain_of(&disks(&files, None), TOP, false).unwrap());
    for op in [
        Op::Commit {
            base: "base.qcow2",
            dash_b: false,
        },
        Op::Pull { keep: None },
    ] {
        let d = disks(&files, None);
        for disk in d.values() {
            disk.fail_clones(true);
        }
        let (res, _) = run(op, &d);
        let e = res.expect_err("the clone failed").to_string();
        assert!(e.contains("injected clone failure"), "{op:?}: {e}");
        // What is on the disks now, and what only the synced state holds:
        // both read as before, and a rerun finishes.
        let now = snapshot(&d);
        assert_opens_uncorrupted(&now, &format!("{op:?} after a failed clone"));
        assert_top_view(&now, &orig, &format!("{op:?} after a failed clone"));
        let synced: Files = d
            .iter()
            .map(|(n, disk)| (n.clone(), disk.durable_image(&mut |_| false)))
            .collect();
        assert_top_view(&synced, &orig, &format!("{op:?}: synced state"));
        let again = disks(&now, None);
        run(op, &again).0.unwrap();
        assert_complete(op, &snapshot(&again), &orig, &format!("{op:?} rerun"));
    }
}

/// [`assert_covered`] for merges with few writes (clones of whole
/// clusters): fewer distinct states than crash points.
fn assert_covered_few(t: &Tally, min_points: u64) {
    assert!(
        t.crash_points >= min_points,
        "only {} crash points",
        t.crash_points
    );
    assert!(t.distinct_states >= min_points, "too few distinct states");
    assert!(t.path_reruns >= 2 && t.qemu_compares >= 2);
}
