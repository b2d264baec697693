//! Commit: merge the top image (and the layers between it and the base)
//! into the base, then empty the top.
//!
//! As `qemu-img commit`: without `-b` the top is committed into its
//! backing file and emptied (unless `-d`); with `-b BASE` the top and the
//! layers between are committed into BASE and nothing else changes (the
//! top keeps its data and its backing file; `-b` implies `-d`). With
//! [`CommitOptions::shorten_chain`] (Strata's own mode, which the libvirt
//! layer uses) the top is then re-pointed at BASE and emptied, dropping the
//! layers between from its chain.
//!
//! Protocol (docs/merge-protocol.md): grow the base if needed; copy every
//! extent the merged layers allocate into the base (data as data, zeros as
//! zeros); flush the base; when the chain is shortened and the base is
//! deeper than the immediate backing file, re-point the top at the base
//! (one header write); then, when emptying, empty the top (every cluster
//! unallocated) and flush. At every moment the top reads the same; a rerun
//! after a crash redoes the idempotent copy and finishes.

use std::path::{Path, PathBuf};

use strata_image::block_status::StatusCache;
use strata_image::{Chain, Image, ImageFormat, Layer, OpenOptions};

use crate::error::{MergeError, Result};
use crate::open::{self, layer_id};
use crate::progress::Hooks;
use crate::walk::{self, Job, Kind, Plan, Seg, Stats};

/// Options of [`commit`] (qemu-img commit's `-b`, `-d`, plus Strata's
/// guard and dry run).
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct CommitOptions {
    /// The image to commit into (`-b`): a file of the top's backing chain.
    /// A relative path is resolved as qemu-img resolves it: equal to a
    /// backing name some image of the chain records, or relative to the
    /// directory of an image of the chain (top first); else relative to
    /// the working directory. `None`: the top's immediate backing file.
    /// Given, the top is not emptied (as qemu-img) unless
    /// [`CommitOptions::shorten_chain`].
    pub base: Option<PathBuf>,
    /// Leave the top's clusters in place instead of emptying it (`-d`).
    pub keep_top: bool,
    /// With `base`: after the commit, re-point the top at the base (when
    /// deeper than the top's backing file) and empty it unless
    /// `keep_top`: the chain becomes top -> base. Strata's own mode (CLI:
    /// `--shorten-chain`); qemu-img's `-b` leaves the top as it is.
    pub shorten_chain: bool,
    /// Commit even when other images use the base as their backing file
    /// and the commit would change what the base reads.
    pub force: bool,
    /// Plan only: open (read-only), check, compute the plan, change nothing.
    pub dry_run: bool,
    /// More images to check for the guard, besides those in the
    /// directories it searches (e.g. the disks of other domains).
    pub also_check: Vec<PathBuf>,
    /// More directories the guard searches for users of the base, besides
    /// the base's and the top's directories (CLI: `--users-in DIR`).
    pub users_in: Vec<PathBuf>,
    /// When set, every image of the chain (the top included) must lie
    /// under this directory (CLI: `--confine DIR`).
    pub confine_to: Option<PathBuf>,
}

/// What [`commit`] did (or, with `dry_run`, would do).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
#[must_use]
pub struct CommitReport {
    /// The top image.
    pub top: PathBuf,
    /// The base committed into.
    pub base: PathBuf,
    /// Number of images whose data went into the base (top included).
    pub layers_merged: usize,
    /// The plan (metadata walk before anything was written).
    pub plan: Plan,
    /// What was written (zero for a dry run).
    pub stats: Stats,
    /// `(old, new)` virtual size when the base was grown to the top's.
    pub base_resized: Option<(u64, u64)>,
    /// The backing name recorded in the top when it was re-pointed at a
    /// deeper base.
    pub top_repointed: Option<String>,
    /// Whether the top was emptied.
    pub top_emptied: bool,
    /// Whether this was a dry run.
    pub dry_run: bool,
    /// Images found using the base as their backing file (other than the
    /// chain merged) whose view the commit changes: a real commit is
    /// refused then unless forced; a dry run reports them here.
    pub base_users: Vec<PathBuf>,
    /// Where the guard looked for such users: directories (not their
    /// subdirectories), then the files named by `also_check`. Empty when
    /// the guard was not run (`force`).
    pub users_searched: Vec<PathBuf>,
    /// Leaked clusters of the base released before copying (a failed
    /// earlier run, e.g. out of space, may have left them).
    pub leaks_reclaimed: u64,
}

/// The commit as a walk: source = the layers above the base, destination =
/// the base (as its own chain, for copy-on-write from its backing files).
struct CommitJob<'a> {
    upper: &'a [Layer],
    upper_lens: Vec<u64>,
    base: &'a mut Chain,
    size: u64,
    base_cluster: u64,
    last_grown: Option<u64>,
    /// Block status of the layers above the base (not written).
    upper_status: StatusCache,
    /// Block status of the base's chain (written by the walk).
    base_status: StatusCache,
}

impl Job for CommitJob<'_> {
    fn size(&self) -> u64 {
        self.size
    }

    fn next(&mut self, pos: u64, max: u64) -> Result<Seg> {
        let a = walk::answer(self.upper, &mut self.upper_status, pos, max)?;
        let len = a.len();
        let Some(layer) = self.upper.get(a.depth) else {
            return Ok(Seg {
                len,
                kind: Kind::Skip,
            });
        };
        if !a.zero {
            let flen = self.upper_lens.get(a.depth).copied().unwrap_or(0);
            walk::check_inside(layer, &a.status, flen, "commit")?;
            return Ok(Seg {
                len,
                kind: Kind::Copy,
            });
        }
        // Zeros above the base: write them only where the base does not
        // already read zeros. The walk writes the base between two
        // questions: what its tables held may have changed.
        self.base_status.forget_tables();
        let b = walk::answer(self.base.layers(), &mut self.base_status, pos, len)?;
        let kind = if b.zero { Kind::Skip } else { Kind::Zero };
        Ok(Seg { len: b.len(), kind })
    }

    fn read_reference(&self, buf: &mut [u8], _at: u64) -> Result<()> {
        buf.fill(0);
        Ok(())
    }

    fn write_data(&mut self, buf: &[u8], at: u64) -> Result<()> {
        Ok(self.base.write_at(buf, at)?)
    }

    fn write_zeroes(&mut self, at: u64, len: u64) -> Result<()> {
        Ok(self.base.write_zeroes(at, len, true)?)
    }

    fn granule(&self) -> u64 {
        self.base_cluster
    }

    fn growth(&mut self, at: u64, len: u64) -> Result<u64> {
        let img = &self.base.top().image;
        let vs = img.virtual_size();
        let cs = self.base_cluster;
        let mut grown = 0u64;
        let mut count = |s: u64, e: u64, last: &mut Option<u64>| {
            let first = s / cs;
            let lastc = (e - 1) / cs;
            let first = match *last {
                Some(l) if l >= first => l + 1,
                _ => first,
            };
            if first <= lastc {
                grown += (lastc - first + 1) * cs;
            }
            *last = Some(lastc.max(last.unwrap_or(0)));
        };
        let end = at + len;
        let mut pos = at;
        while pos < end.min(vs) {
            let e = img.map(pos, end.min(vs) - pos)?;
            let n = e.len.clamp(1, end.min(vs) - pos);
            if !matches!(e.mapping, strata_image::Mapping::Data { .. }) {
                count(pos, pos + n, &mut self.last_grown);
            }
            pos += n;
        }
        if end > vs {
            count(at.max(vs), end, &mut self.last_grown);
        }
        Ok(grown)
    }

    fn growing_file(&self) -> PathBuf {
        self.base.top().path.clone()
    }

    fn source_layers(&self) -> &[Layer] {
        self.upper
    }

    fn destination(&self) -> &Layer {
        self.base.top()
    }

    fn write_range(&mut self, at: u64, len: u64, depth: usize, host: u64) -> Result<()> {
        let upper = self.upper;
        let layer = upper.get(depth).ok_or_else(|| {
            MergeError::InvalidArgument(format!("commit: no source layer {depth}"))
        })?;
        Ok(self
            .base
            .write_range_from(at, len, layer.image.data_storage()?, host)?)
    }
}

pub(crate) fn cluster_of(image: &Image) -> u64 {
    match image {
        Image::Qcow2(q) => q.geometry().cluster_size(),
        Image::Raw(_) => 4096,
    }
}

/// The sizes of the files of `layers` (to check data pointers against):
/// a qcow2 layer's external data file, where its data lies, when it has
/// one.
pub(crate) fn file_lens(layers: &[Layer]) -> Result<Vec<u64>> {
    layers
        .iter()
        .map(|l| {
            l.image
                .data_storage()?
                .len()
                .map_err(|e| MergeError::io(&l.path, "stat", e))
        })
        .collect()
}

/// Whether committing `upper` (of virtual size `size`) into `base` would
/// change what the base reads anywhere: compares, extent by extent, what
/// the commit would write with what the base reads there, and stops at the
/// first difference. Writes nothing.
fn changes_base_view(upper: &[Layer], base: &mut Chain, size: u64) -> Result<bool> {
    let base_cluster = cluster_of(&base.top().image);
    let mut job = CommitJob {
        upper,
        upper_lens: file_lens(upper)?,
        base,
        size,
        base_cluster,
        last_grown: None,
        upper_status: StatusCache::new(),
        base_status: StatusCache::new(),
    };
    let (mut new, mut old) = (Vec::new(), Vec::new());
    let mut pos = 0u64;
    while pos < size {
        let seg = job.next(pos, size - pos)?;
        let len = seg.len.clamp(1, size - pos);
        if seg.kind != Kind::Skip {
            let mut done = 0u64;
            while done < len {
                let n = (len - done).min(walk::BUF_BYTES as u64) as usize;
                new.resize(n, 0);
                old.resize(n, 0);
                job.read_source(&mut new, pos + done)?;
                strata_image::chain::read_below(job.base.layers(), &mut old, pos + done)?;
                if new != old {
                    return Ok(true);
                }
                done += n as u64;
            }
        }
        pos += len;
    }
    Ok(false)
}

/// Commits `top` into its base: see the module documentation and
/// docs/merge-protocol.md. With `opts.dry_run` nothing is written and the
/// report carries the plan.
///
/// Refuses, before writing anything: a top without backing file, a base
/// not in the chain, a damaged image (corrupt bit, tables or data pointers
/// outside the file), an image the write path cannot keep (dirty, with
/// bitmaps), and — unless `opts.force` — a base that other images use as
/// their backing file, when the commit would change what the base reads
/// (a commit that writes only what the base already reads, such as the
/// rerun of a commit stopped after its base was flushed, changes nothing
/// for them). Then runs [`commit_open`] on the open images.
pub fn commit(top: &Path, opts: &CommitOptions, hooks: &mut Hooks<'_>) -> Result<CommitReport> {
    const OP: &str = "commit";
    let confine_to = opts.confine_to.as_deref();
    open::confine(top, confine_to)?;
    // A commit reads the layers it merges and, for copy-on-write, what
    // the base reads: a chain deeper than the open limit is committed as
    // long as nothing needs the layers past it (a read there fails).
    let probe_opts = OpenOptions::new()
        .force_share(true)
        .confine_to(opts.confine_to.clone())
        .stub_beyond_limit(true);
    // Discover the chain (validated: names, formats, loops, depth), then
    // take the locks, then look again and insist on the same files.
    let first = Chain::open(top, &probe_opts)?;
    if first.layers().len() < 2 || first.top().image.format() != ImageFormat::Qcow2 {
        return Err(MergeError::NoBacking {
            top: top.to_path_buf(),
        });
    }
    let k = match &opts.base {
        Some(b) => open::find_commit_base(&first, top, b)?,
        None => 1,
    };
    // qemu-img's -b: the base alone is written (-b implies -d).
    let base_only = opts.base.is_some() && !opts.shorten_chain;
    let eff = CommitOptions {
        keep_top: opts.keep_top || base_only,
        ..opts.clone()
    };
    let opts = &eff;
    let writable = !opts.dry_run;
    let repoint = k > 1 && !base_only;
    let write_top = writable && (!opts.keep_top || repoint);
    let mut locks: Vec<Chain> = Vec::new();
    let mut top_chain = open::open_alone(top, ImageFormat::Qcow2, write_top)?;
    for l in first.layers().get(1..k).unwrap_or(&[]) {
        locks.push(open::open_alone(&l.path, l.image.format(), false)?);
    }
    let base_layer = first.layers().get(k).ok_or_else(|| MergeError::NoBacking {
        top: top.to_path_buf(),
    })?;
    let base_path = base_layer.path.clone();
    let base_format = base_layer.image.format();
    let mut base = Chain::open(
        &base_path,
        &OpenOptions::new()
            .format(Some(base_format))
            .writable(writable)
            .confine_to(opts.confine_to.clone())
            .stub_beyond_limit(true),
    )?;
    drop(first);
    let probe = Chain::open(top, &probe_opts)?;
    let mut locked_ids = vec![layer_id(top_chain.top())?];
    for c in &locks {
        locked_ids.push(layer_id(c.top())?);
    }
    locked_ids.push(layer_id(base.top())?);
    let probe_ids = probe
        .layers()
        .iter()
        .take(k + 1)
        .map(layer_id)
        .collect::<Result<Vec<_>>>()?;
    if probe_ids != locked_ids {
        return Err(MergeError::InvalidArgument(format!(
            "{}: the backing chain changed while it was being opened; retry",
            top.display()
        )));
    }
    let upper = probe.layers().get(..k).unwrap_or(&[]);

    // Refuse damaged or unwritable images before anything is written (the
    // checks side by side; the refusals in this order: the layers above
    // the base, the top unwritable, the base unwritable, the base).
    let mut checked: Vec<&Layer> = upper.iter().collect();
    if writable {
        checked.push(base.top());
    }
    let mut results = open::refuse_damaged_each(&checked, OP).into_iter();
    for _ in upper {
        results.next().transpose()?;
    }
    if write_top {
        open::refuse_unwritable(top_chain.top(), OP)?;
    }
    let mut base_leaks = 0;
    if writable {
        open::refuse_unwritable(base.top(), OP)?;
        base_leaks = results.next().transpose()?.unwrap_or(0);
    }
    // The guard: nobody else may read through the base, unless the commit
    // leaves what the base reads as it is (the rerun of a commit stopped
    // after its base was flushed: e.g. `-b` after the top was re-pointed,
    // when the former intermediate layers still name the base).
    // A dry run reports the users instead of being refused.
    let mut base_users = Vec::new();
    let mut users_searched = Vec::new();
    if !opts.force {
        let exclude = probe_ids.get(..k).unwrap_or(&[]).to_vec();
        let dirs = open::search_places(&base_path, top, &opts.users_in);
        let users = open::users_of(&base_path, &exclude, &dirs, &opts.also_check)?;
        users_searched = dirs;
        users_searched.extend(opts.also_check.iter().cloned());
        if !users.is_empty() && changes_base_view(upper, &mut base, probe.virtual_size())? {
            if !opts.dry_run {
                return Err(MergeError::BaseInUse {
                    base: base_path,
                    users,
                    searched: users_searched,
                });
            }
            base_users = users;
        }
    }
    // Leaked clusters in the base (what a run stopped by a full disk
    // leaves) are released before the copy, so that the rerun has the
    // space back: once the plan pass has found nothing to refuse, since a
    // commit that fails must not have written the base.
    let reclaim = writable && base_leaks > 0;

    // The name the top will record for a deeper base (step 4), found
    // before anything is written.
    let top_name = if repoint && !opts.dry_run {
        Some(open::backing_name_for(top, &probe.layers()[k])?)
    } else {
        None
    };
    let mut report = commit_parts(
        CommitParts {
            upper,
            base: &mut base,
            top: &mut top_chain,
            backing: top_name.as_deref().map(|name| (name, base_format)),
        },
        opts,
        reclaim,
        hooks,
    )?;
    drop(locks);
    report.base_users = base_users;
    report.users_searched = users_searched;
    Ok(report)
}

/// The open images of a commit, for [`commit_open`].
///
/// `upper` and `top` are the same top image opened twice, as [`commit`]
/// does: `upper` to read (it may be a lock-free second open), `top` to
/// write. They must show the same bytes (the same file, or storages that
/// share their bytes).
#[derive(Debug)]
pub struct CommitParts<'a> {
    /// The layers whose data goes into the base, top first: `L0..Lk-1`,
    /// opened for reading (their own backing files are not needed).
    pub upper: &'a [Layer],
    /// The base `Lk` as its own chain (the base on top, writable, followed
    /// by its backing files for copy-on-write).
    pub base: &'a mut Chain,
    /// The top image `L0` alone, writable when it is to be emptied or
    /// re-pointed (it is not written with `keep_top` and k = 1, nor in a
    /// dry run).
    pub top: &'a mut Chain,
    /// The backing name (as the top's header is to record it, relative to
    /// the top's directory) and format of the base, recorded in the top
    /// when k > 1. Required then to empty the top (the layers between
    /// would show through otherwise); `None` with k > 1 and
    /// `opts.keep_top` commits into the base alone (qemu-img's `-b`).
    /// Ignored when k = 1.
    pub backing: Option<(&'a str, ImageFormat)>,
}

/// Commits open images: the plan, then steps 1-5 of docs/merge-protocol.md
/// (grow the base, copy, flush the base, re-point the top when k > 1, empty
/// the top unless `opts.keep_top`). With `opts.dry_run` only the plan.
///
/// This is [`commit`] after it has opened the files, taken the locks and
/// run its refusals; `commit_open` itself refuses only what the plan pass
/// finds (data pointers past the end of a file, unreadable tables). The
/// caller is responsible for the rest: images marked corrupt or dirty,
/// bitmaps, and the guard (`opts.base`, `opts.force` and `opts.also_check`
/// are not used here). Useful to run a commit on images that are not plain
/// files, e.g. `strata_image::FaultStorage` (feature `testing`) in crash tests.
///
/// The report's `top` and `base` are the paths of `parts.upper[0]` and
/// `parts.base`'s top layer.
pub fn commit_open(
    parts: CommitParts<'_>,
    opts: &CommitOptions,
    hooks: &mut Hooks<'_>,
) -> Result<CommitReport> {
    commit_parts(parts, opts, false, hooks)
}

/// [`commit_open`]; with `reclaim`, the base's leaked clusters are
/// released after the plan pass (which refuses bad sources before anything
/// is written) and before the copy.
fn commit_parts(
    parts: CommitParts<'_>,
    opts: &CommitOptions,
    reclaim: bool,
    hooks: &mut Hooks<'_>,
) -> Result<CommitReport> {
    let CommitParts {
        upper,
        base,
        top: top_chain,
        backing,
    } = parts;
    let k = upper.len();
    let Some(top_layer) = upper.first() else {
        return Err(MergeError::InvalidArgument(
            "commit: no layer above the base".into(),
        ));
    };
    let top = top_layer.path.clone();
    let repoint = k > 1 && backing.is_some();
    let writes_top = !opts.dry_run && (!opts.keep_top || repoint);
    if writes_top && top_chain.top().image.format() != ImageFormat::Qcow2 {
        return Err(MergeError::InvalidArgument(format!(
            "{}: commit: only a qcow2 top can be emptied or re-pointed",
            top.display()
        )));
    }
    let backing = match backing {
        Some(b) => Some(b),
        None if k > 1 && !opts.dry_run && !opts.keep_top => {
            return Err(MergeError::InvalidArgument(format!(
                "{}: emptying the top after a commit into a deeper base needs the backing \
                 name to record in the top",
                top.display()
            )))
        }
        None => None,
    };
    let base_path = base.top().path.clone();
    let size = top_layer.image.virtual_size();
    let base_size = base.virtual_size();
    let upper_lens = file_lens(upper)?;
    let base_cluster = cluster_of(&base.top().image);
    let mut job = CommitJob {
        upper,
        upper_lens,
        base,
        size,
        base_cluster,
        last_grown: None,
        upper_status: StatusCache::new(),
        base_status: StatusCache::new(),
    };
    // What each source is before anything is read from it, to insist on
    // the same files, no shorter, before the top is changed.
    let mut sources = open::Sources::default();
    sources.record(upper)?;
    let plan = walk::plan(&mut job, base_cluster)?;
    let mut report = CommitReport {
        top,
        base: base_path,
        layers_merged: k,
        plan,
        stats: Stats::default(),
        base_resized: (size > base_size).then_some((base_size, size)),
        top_repointed: None,
        top_emptied: false,
        dry_run: opts.dry_run,
        base_users: Vec::new(),
        users_searched: Vec::new(),
        leaks_reclaimed: 0,
    };
    if opts.dry_run {
        return Ok(report);
    }
    if reclaim {
        if let Image::Qcow2(q) = &mut job.base.layers_mut()[0].image {
            report.leaks_reclaimed =
                strata_image::repair::repair(q, strata_image::repair::RepairMode::Leaks)?
                    .leaks_fixed;
        }
    }

    let total = report.plan.total_bytes();
    let failure = Failure {
        top: report.top.clone(),
        middle: upper.iter().skip(1).map(|l| l.path.clone()).collect(),
        base: report.base.clone(),
    };
    // 1.-3.
    report.stats = grow_copy_flush(&mut job, size, base_size, total, hooks)
        .map_err(|e| failure.fail(e, Step::Copy))?;
    drop(job);
    // A source truncated or replaced under the copy read as zeros (or as
    // another file): the top must not be emptied or re-pointed then.
    sources
        .verify(upper, "commit")
        .map_err(|e| failure.fail(e, Step::Copy))?;

    // 4. Re-point the top at a deeper base: the layers in between now add
    //    nothing the base does not hold.
    if let (true, Some((name, format))) = (k > 1, backing) {
        if let Image::Qcow2(q) = &mut top_chain.layers_mut()[0].image {
            q.set_backing(Some((name, format.name())))
                .map_err(|e| failure.fail(e.into(), Step::Repoint))?;
        }
        report.top_repointed = Some(name.to_string());
    }
    // 5. Empty the top: every cluster reads through to the base.
    if !opts.keep_top {
        if let Image::Qcow2(q) = &mut top_chain.layers_mut()[0].image {
            // The base holds the top's data now: the top's guest view, and
            // so its bitmaps, do not change.
            q.make_empty()
                .and_then(|()| q.flush())
                .map_err(|e| failure.fail(e.into(), Step::Empty))?;
        }
        report.top_emptied = true;
    }
    Ok(report)
}

/// Steps 1-3: grow the base, copy, make the base durable (also after an
/// error or a cancellation: what was written is flushed if it can be).
/// The first error is the one returned.
fn grow_copy_flush(
    job: &mut CommitJob<'_>,
    size: u64,
    base_size: u64,
    total: u64,
    hooks: &mut Hooks<'_>,
) -> Result<Stats> {
    // 1. Grow the base to the top's size (the new part reads as zeros, as
    //    the top already sees past the base's end).
    if size > base_size {
        match &mut job.base.layers_mut()[0].image {
            Image::Qcow2(q) => q.resize(size)?,
            Image::Raw(r) => r.resize(size)?,
        }
    }
    // 2. Copy. 3. Make the base durable.
    let copied = walk::execute(job, total, hooks);
    let flushed = job.base.flush();
    let stats = copied?;
    flushed?;
    Ok(stats)
}

/// Where a commit stopped, for the error message.
#[derive(Debug, Clone, Copy)]
enum Step {
    /// Steps 1-3: growing, copying into or flushing the base.
    Copy,
    /// Step 4: re-pointing the top at a deeper base.
    Repoint,
    /// Step 5: emptying the top.
    Empty,
}

/// The files of a commit, to describe what a failure left.
struct Failure {
    top: PathBuf,
    middle: Vec<PathBuf>,
    base: PathBuf,
}

impl Failure {
    /// Wraps the first error of a commit that had started writing with the
    /// state of every file and what to run next (a cancellation is left as
    /// it is: it is not a failure).
    fn fail(&self, cause: MergeError, step: Step) -> MergeError {
        if matches!(cause, MergeError::Cancelled) {
            return cause;
        }
        let space = cause.remedy(&self.base);
        let mut files = Vec::new();
        let (top_state, leaky) = match step {
            Step::Copy => (
                "not changed: it reads the same as before and still names its backing file",
                self.base.clone(),
            ),
            Step::Repoint => (
                "reads the same as before (its header names either the old or the new \
                 backing file; both read the same)",
                self.top.clone(),
            ),
            Step::Empty => (
                "reads the same as before: partly emptied; what was emptied reads the same \
                 bytes from the base; it may hold leaked clusters",
                self.top.clone(),
            ),
        };
        files.push((self.top.clone(), top_state.to_string()));
        for m in &self.middle {
            files.push((m.clone(), "not changed".to_string()));
        }
        files.push((
            self.base.clone(),
            match step {
                Step::Copy => "partly written, only in ranges the top itself holds (the top's \
                               view does not read them from the base); it may hold leaked \
                               clusters"
                    .to_string(),
                _ => "holds the whole committed view, durably".to_string(),
            },
        ));
        let next = format!(
            "{space}run `strata check -r leaks {}` to reclaim leaked clusters, then run the \
             same command again to finish the commit",
            leaky.display()
        );
        MergeError::Failed {
            op: "commit",
            cause: Box::new(cause),
            files,
            next,
        }
    }
}
