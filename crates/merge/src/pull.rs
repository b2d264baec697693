//! Pull and safe rebase: make the top hold, itself, every range where its
//! old backing chain and its new backing file (a lower layer of the chain,
//! another image, or none) read differently; then point it at the new
//! backing file.
//!
//! Protocol (docs/merge-protocol.md): copies go into ranges the top does
//! not allocate, with exactly the bytes it reads there through its old
//! backing chain, so its view never changes; the top is flushed (data,
//! L2/L1 tables, refcounts durable) before the header names the new
//! backing file, in one header write. A rerun after a crash skips what the
//! top already holds and finishes.

use std::path::{Path, PathBuf};

use strata_format::limits;
use strata_image::block_status::StatusCache;
use strata_image::chain::{is_protocol_name, read_below, resolve_backing_path};
use strata_image::{Chain, Image, ImageFormat, Layer, OpenOptions};

use crate::commit::cluster_of;
use crate::error::{MergeError, Result};
use crate::open::{self, layer_id};
use crate::progress::Hooks;
use crate::walk::{self, Job, Kind, Plan, Seg, Stats};

/// Options of [`pull`] (`strata pull [-b BASE]`).
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct PullOptions {
    /// Keep this file of the chain (and what is below it) as the top's
    /// backing file; pull only the layers above it. A path relative to the
    /// working directory or to the top's directory. `None`: pull
    /// everything; the top then stands alone.
    pub base: Option<PathBuf>,
    /// Plan only: change nothing.
    pub dry_run: bool,
}

/// What [`pull`] did (or, with `dry_run`, would do).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
#[must_use]
pub struct PullReport {
    /// The top image.
    pub top: PathBuf,
    /// Number of backing layers whose data was pulled into the top.
    pub layers_pulled: usize,
    /// The backing name the top now records (None: no backing file).
    pub new_backing: Option<String>,
    /// The plan (metadata walk before anything was written).
    pub plan: Plan,
    /// What was written.
    pub stats: Stats,
    /// Whether this was a dry run.
    pub dry_run: bool,
    /// Leaked clusters of the top released before copying (a failed
    /// earlier run, e.g. out of space, may have left them).
    pub leaks_reclaimed: u64,
}

/// Options of [`rebase`] (safe mode: `strata rebase -b NEW -F FMT`).
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct RebaseOptions {
    /// Plan only: change nothing.
    pub dry_run: bool,
    /// When set, every image of the old and the new chain (the top
    /// included) must lie under this directory (CLI: `--confine DIR`).
    pub confine_to: Option<PathBuf>,
}

/// What [`rebase`] did (or, with `dry_run`, would do).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
#[must_use]
pub struct RebaseReport {
    /// The top image.
    pub top: PathBuf,
    /// The backing name the top recorded before.
    pub old_backing: Option<String>,
    /// The backing name the top records now.
    pub new_backing: Option<String>,
    /// The plan: `copy_bytes` is an upper bound (ranges equal in both views
    /// are not written).
    pub plan: Plan,
    /// What was written, and how much compared equal.
    pub stats: Stats,
    /// Whether this was a dry run.
    pub dry_run: bool,
}

/// The view the top will have below it afterwards.
enum Reference<'a> {
    /// Layers `k..` of the top's own chain (none when `k` is the length).
    Shared(usize),
    /// Another chain.
    Separate(&'a Chain),
}

struct BackingJob<'a> {
    chain: &'a mut Chain,
    reference: Reference<'a>,
    lens: Vec<u64>,
    granule: u64,
    cluster: u64,
    last_grown: Option<u64>,
    op: &'static str,
    /// Block status of the view below the top now (not written).
    old_status: StatusCache,
    /// Block status of the view below it afterwards (not written).
    new_status: StatusCache,
}

impl BackingJob<'_> {
    fn new_layers(&self) -> &[Layer] {
        view_after(self.chain, &self.reference)
    }
}

/// The layers of the view the top will have below it afterwards.
fn view_after<'a>(chain: &'a Chain, reference: &'a Reference<'_>) -> &'a [Layer] {
    match reference {
        Reference::Shared(k) => chain.layers().get(*k..).unwrap_or(&[]),
        Reference::Separate(c) => c.layers(),
    }
}

impl Job for BackingJob<'_> {
    fn size(&self) -> u64 {
        self.chain.virtual_size()
    }

    fn next(&mut self, pos: u64, max: u64) -> Result<Seg> {
        let layers = self.chain.layers();
        let t = self.chain.top().image.map(pos, max)?;
        let len = t.len.clamp(1, max);
        if t.mapping.is_allocated() {
            return Ok(Seg {
                len,
                kind: Kind::Skip,
            });
        }
        let below = layers.get(1..).unwrap_or(&[]);
        let old = walk::answer(below, &mut self.old_status, pos, len)?;
        let len = old.len();
        if let Reference::Shared(k) = self.reference {
            if old.depth + 1 >= k {
                // The same layers answer before and after.
                return Ok(Seg {
                    len,
                    kind: Kind::Skip,
                });
            }
        }
        let source_zero = old.zero;
        if let (false, Some(layer)) = (source_zero, below.get(old.depth)) {
            let flen = self.lens.get(old.depth + 1).copied().unwrap_or(0);
            walk::check_inside(layer, &old.status, flen, self.op)?;
        }
        let after = view_after(self.chain, &self.reference);
        let new = walk::answer(after, &mut self.new_status, pos, len)?;
        let len = new.len();
        if let Reference::Shared(k) = self.reference {
            let n = self.chain.layers().len();
            if n > limits::MAX_CHAIN_DEPTH && k + new.depth + 1 == n {
                // The new view here lies past the open limit (the
                // stand-in answers): it cannot be compared, so the top
                // takes the old view whole, which keeps what it reads.
                let kind = if source_zero { Kind::Zero } else { Kind::Copy };
                return Ok(Seg { len, kind });
            }
        }
        let reference_zero = new.zero;
        let kind = if source_zero && reference_zero {
            Kind::Skip
        } else {
            Kind::Diff {
                source_zero,
                reference_zero,
            }
        };
        Ok(Seg { len, kind })
    }

    fn read_reference(&self, buf: &mut [u8], at: u64) -> Result<()> {
        Ok(read_below(self.new_layers(), buf, at)?)
    }

    fn write_data(&mut self, buf: &[u8], at: u64) -> Result<()> {
        Ok(self.chain.write_at(buf, at)?)
    }

    fn write_zeroes(&mut self, at: u64, len: u64) -> Result<()> {
        Ok(self.chain.write_zeroes(at, len, true)?)
    }

    fn granule(&self) -> u64 {
        self.granule
    }

    fn growth(&mut self, at: u64, len: u64) -> Result<u64> {
        let cs = self.cluster;
        let first = at / cs;
        let last = (at + len - 1) / cs;
        let first = match self.last_grown {
            Some(l) if l >= first => l + 1,
            _ => first,
        };
        self.last_grown = Some(last.max(self.last_grown.unwrap_or(0)));
        Ok(if first <= last {
            (last - first + 1) * cs
        } else {
            0
        })
    }

    fn growing_file(&self) -> PathBuf {
        self.chain.top().path.clone()
    }

    fn source_layers(&self) -> &[Layer] {
        self.chain.layers().get(1..).unwrap_or(&[])
    }

    fn destination(&self) -> &Layer {
        self.chain.top()
    }

    fn write_range(&mut self, at: u64, len: u64, depth: usize, host: u64) -> Result<()> {
        Ok(self
            .chain
            .write_range_from_layer(at, len, depth + 1, host)?)
    }
}

fn granule_of(image: &Image) -> u64 {
    match image {
        Image::Qcow2(q) => q.geometry().subcluster_size(),
        Image::Raw(_) => 4096,
    }
}

/// Runs a backing job on an open, writable chain: plan, then (unless a dry
/// run) copy, flush, and only then switch the backing file.
/// With `reclaim`, the top's leaked clusters are released once the plan
/// pass has found nothing to refuse, before the copy; their count is
/// returned.
#[allow(clippy::too_many_arguments)]
fn run_backing_job(
    chain: &mut Chain,
    reference: Reference<'_>,
    new_backing: Option<(&str, &str)>,
    switch: bool,
    dry_run: bool,
    reclaim: bool,
    op: &'static str,
    hooks: &mut Hooks<'_>,
) -> Result<(Plan, Stats, u64)> {
    let lens = crate::commit::file_lens(chain.layers())?;
    let granule = granule_of(&chain.top().image);
    let cluster = cluster_of(&chain.top().image);
    let separate = match &reference {
        Reference::Separate(c) => Some(*c),
        Reference::Shared(_) => None,
    };
    let mut job = BackingJob {
        chain,
        reference,
        lens,
        granule,
        cluster,
        last_grown: None,
        op,
        old_status: StatusCache::new(),
        new_status: StatusCache::new(),
    };
    // What each source is before anything is read from it, to insist on
    // the same files, no shorter, before the header switch.
    let mut sources = open::Sources::default();
    sources.record(job.chain.layers().get(1..).unwrap_or(&[]))?;
    if let Some(c) = separate {
        sources.record(c.layers())?;
    }
    let plan = walk::plan(&mut job, cluster)?;
    if dry_run {
        return Ok((plan, Stats::default(), 0));
    }
    let mut reclaimed = 0;
    if reclaim {
        if let Image::Qcow2(q) = &mut job.chain.layers_mut()[0].image {
            reclaimed = strata_image::repair::repair(q, strata_image::repair::RepairMode::Leaks)?
                .leaks_fixed;
        }
    }
    let top = job.chain.top().path.clone();
    let old_backing = job.chain.top().image.backing().0.map(str::to_string);
    let failure =
        |e: MergeError, switching: bool| fail(op, e, &top, old_backing.as_deref(), switching);
    let done = walk::execute(&mut job, plan.total_bytes(), hooks);
    drop(job);
    // The copies, their tables and refcounts are durable before the header
    // stops naming the old backing file (also on cancellation). The first
    // error is the one reported.
    let flushed = chain.flush();
    let stats = done.map_err(|e| failure(e, false))?;
    flushed.map_err(|e| failure(e.into(), false))?;
    if switch {
        // A source truncated or replaced under the copy read as zeros
        // (or as another file): keep the old backing file then.
        let read = chain.layers().get(1..).unwrap_or(&[]).iter();
        let new_chain = separate.map(Chain::layers).unwrap_or(&[]).iter();
        sources
            .verify(read.chain(new_chain), op)
            .map_err(|e| failure(e, false))?;
        if let Image::Qcow2(q) = &mut chain.layers_mut()[0].image {
            q.set_backing(new_backing)
                .map_err(|e| failure(e.into(), true))?;
        }
    }
    Ok((plan, stats, reclaimed))
}

/// Wraps the first error of a pull or rebase that had started writing
/// with the state of the files and what to run next (a cancellation is
/// left as it is).
fn fail(
    op: &'static str,
    cause: MergeError,
    top: &Path,
    old_backing: Option<&str>,
    switching: bool,
) -> MergeError {
    if matches!(cause, MergeError::Cancelled) {
        return cause;
    }
    let space = cause.remedy(top);
    let old = old_backing.map_or_else(|| "(none)".to_string(), |b| format!("{b:?}"));
    let top_state = if switching {
        format!(
            "reads the same as before: it holds everything it read through its backing chain, \
             durably; its header names either the old backing file {old} or the new one"
        )
    } else {
        format!(
            "still names its backing file {old} and reads through it as before; it may hold \
             leaked clusters"
        )
    };
    let mut files = vec![(top.to_path_buf(), top_state)];
    let next = if let MergeError::SourceChanged { path, .. } = &cause {
        files.push((path.clone(), "changed by another process".to_string()));
        format!(
            "find out what changed {} and restore it; then run `strata check -r leaks {}` and \
             the same command again",
            path.display(),
            top.display()
        )
    } else {
        format!(
            "{space}run `strata check -r leaks {}` to reclaim leaked clusters, then run the \
             same command again to finish the {op}",
            top.display()
        )
    };
    MergeError::Failed {
        op,
        cause: Box::new(cause),
        files,
        next,
    }
}

/// Opens the top writable (unless a dry run) with its chain. With
/// `stub_beyond_limit`, a chain deeper than the open limit opens with a
/// stand-in past it (see [`OpenOptions::stub_beyond_limit`]).
fn open_top(
    top: &Path,
    dry_run: bool,
    confine_to: Option<&Path>,
    stub_beyond_limit: bool,
) -> Result<Chain> {
    open::confine(top, confine_to)?;
    Ok(Chain::open(
        top,
        &OpenOptions::new()
            .format(Some(ImageFormat::Qcow2))
            .writable(!dry_run)
            .confine_to(confine_to.map(Path::to_path_buf))
            .stub_beyond_limit(stub_beyond_limit),
    )?)
}

/// Pulls the backing chain above `opts.base` into `top` (all of it when
/// `None`), then points `top` at `opts.base` (or at nothing). The result
/// reads as `qemu-img rebase -b BASE` / `-b ''` leaves it; unlike
/// qemu-img, the header changes only after the copies are durable.
///
/// Opens the chain, refuses damaged layers and an unwritable top before
/// anything is written, then runs [`pull_open`].
pub fn pull(top: &Path, opts: &PullOptions, hooks: &mut Hooks<'_>) -> Result<PullReport> {
    pull_confined(top, opts, None, hooks)
}

/// [`pull`], refusing any image of the chain (the top included) that does
/// not lie under `confine_to` (CLI: `--confine DIR`) before anything is
/// written.
pub fn pull_confined(
    top: &Path,
    opts: &PullOptions,
    confine_to: Option<&Path>,
    hooks: &mut Hooks<'_>,
) -> Result<PullReport> {
    // A pull reads the layers above the kept one: on a chain deeper than
    // the open limit, it works as long as those are inside it (the layers
    // past the limit are not opened; a stand-in holds their place). A pull
    // of the whole of such a chain goes in stages, each reading inside the
    // limit: the top is pulled down to the deepest layer opened and
    // re-pointed at it (its view unchanged, durably), then the chain, now
    // shorter, is opened again, until it fits.
    let mut done: Option<PullReport> = None;
    loop {
        let (report, staged) = pull_stage(top, opts, confine_to, done.is_none(), hooks)?;
        let staged = staged && !opts.dry_run;
        done = Some(match done {
            None => report,
            Some(d) => add_reports(d, report),
        });
        if !staged {
            return done.ok_or_else(|| MergeError::InvalidArgument("pull: no stage ran".into()));
        }
    }
}

/// Sums the reports of two stages of a pull (the later one last).
fn add_reports(a: PullReport, b: PullReport) -> PullReport {
    let mut growth = a.plan.growth;
    for g in b.plan.growth {
        match growth.iter_mut().find(|x| x.path == g.path) {
            Some(x) => x.bytes += g.bytes,
            None => growth.push(g),
        }
    }
    PullReport {
        top: b.top,
        layers_pulled: a.layers_pulled + b.layers_pulled,
        new_backing: b.new_backing,
        plan: Plan {
            copy_bytes: a.plan.copy_bytes + b.plan.copy_bytes,
            zero_bytes: a.plan.zero_bytes + b.plan.zero_bytes,
            copy_clusters: a.plan.copy_clusters + b.plan.copy_clusters,
            extents: a.plan.extents + b.plan.extents,
            exact: false,
            growth,
        },
        stats: Stats {
            copied_bytes: a.stats.copied_bytes + b.stats.copied_bytes,
            zeroed_bytes: a.stats.zeroed_bytes + b.stats.zeroed_bytes,
            equal_bytes: a.stats.equal_bytes + b.stats.equal_bytes,
            cloned_bytes: a.stats.cloned_bytes + b.stats.cloned_bytes,
        },
        dry_run: b.dry_run,
        leaks_reclaimed: a.leaks_reclaimed + b.leaks_reclaimed,
    }
}

/// One stage of [`pull_confined`]: opens the chain and pulls it (all of
/// it, or down to `opts.base`), or, when the whole of a chain deeper than
/// the open limit is to be pulled, down to the deepest layer opened.
/// Returns the report and whether it was such a partial stage (a dry run
/// then plans that stage only: its plan is marked inexact).
fn pull_stage(
    top: &Path,
    opts: &PullOptions,
    confine_to: Option<&Path>,
    first: bool,
    hooks: &mut Hooks<'_>,
) -> Result<(PullReport, bool)> {
    const OP: &str = "pull";
    let mut chain = open_top(top, opts.dry_run, confine_to, true)?;
    let n = chain.layers().len();
    let k = match &opts.base {
        Some(b) => open::find_layer(&chain, top, b).map_err(|e| match e {
            MergeError::NotInChain { .. } if n > limits::MAX_CHAIN_DEPTH => {
                MergeError::InvalidArgument(format!(
                    "{}: {} is not among the first {} images of the backing chain; a pull \
                     keeping it would read deeper than the open limit",
                    top.display(),
                    b.display(),
                    limits::MAX_CHAIN_DEPTH
                ))
            }
            e => e,
        })?,
        None => n,
    };
    // The stand-in past the limit is layer n - 1: keep the one above it.
    let staged = k == n && n > limits::MAX_CHAIN_DEPTH;
    let k = if staged { n - 2 } else { k };
    let checked: Vec<&Layer> = chain.layers().get(..k).unwrap_or(&[]).iter().collect();
    let top_leaks = open::refuse_damaged_all(&checked, OP)?
        .first()
        .copied()
        .unwrap_or(0);
    if !opts.dry_run && k > 1 {
        open::refuse_unwritable(chain.top(), OP)?;
    }
    // The format the layer above records for it (what it was opened as;
    // also right for the stand-in past the open limit, which is not).
    let new = match chain.layers().get(k) {
        Some(l) => {
            let recorded = chain
                .layers()
                .get(k - 1)
                .and_then(|above| above.image.backing().1)
                .and_then(ImageFormat::from_name);
            Some((
                open::backing_name_for(top, l)?,
                recorded.unwrap_or(l.image.format()),
            ))
        }
        None => None,
    };
    // Leaked clusters in the top (what a run stopped by a full disk leaves)
    // are released before the copy, so that the rerun has the space back
    // (after the plan pass: a pull that fails must not have written).
    let reclaim = first && !opts.dry_run && k > 1 && top_leaks > 0;
    let mut report = pull_chain(
        &mut chain,
        k,
        new.as_ref().map(|(name, f)| (name.as_str(), *f)),
        opts.dry_run,
        reclaim,
        hooks,
    )?;
    if staged {
        report.plan.exact = false;
    }
    Ok((report, staged))
}

/// Pulls an open chain: the layers between the top and layer `keep` (the
/// new backing file; `keep` = the number of layers for none) are copied
/// into the top where the views differ, the top is flushed, and only then
/// does its header name `new_backing` (the name relative to the top's
/// directory and the format of layer `keep`; `None` when `keep` is the
/// number of layers). With `keep` = 1 there is nothing to pull and the
/// header is not rewritten. With `dry_run`, only the plan.
///
/// `chain` is the top (writable unless a dry run) and its whole backing
/// chain. This is [`pull`] after it has opened the chain and run its
/// refusals; `pull_open` itself refuses only what the plan pass finds
/// (data pointers past the end of a file, unreadable tables), not images
/// marked corrupt or dirty or carrying bitmaps: the caller checks those.
/// Useful to run a pull on images that are not plain files, e.g.
/// `strata_image::FaultStorage` (feature `testing`) in crash tests.
pub fn pull_open(
    chain: &mut Chain,
    keep: usize,
    new_backing: Option<(&str, ImageFormat)>,
    dry_run: bool,
    hooks: &mut Hooks<'_>,
) -> Result<PullReport> {
    pull_chain(chain, keep, new_backing, dry_run, false, hooks)
}

/// [`pull_open`]; with `reclaim`, the top's leaked clusters are released
/// after the plan pass and before the copy.
fn pull_chain(
    chain: &mut Chain,
    keep: usize,
    new_backing: Option<(&str, ImageFormat)>,
    dry_run: bool,
    reclaim: bool,
    hooks: &mut Hooks<'_>,
) -> Result<PullReport> {
    const OP: &str = "pull";
    let n = chain.layers().len();
    if keep == 0 || keep > n {
        return Err(MergeError::InvalidArgument(format!(
            "{}: pull: layer {keep} is not a backing file of a chain of {n}",
            chain.top().path.display()
        )));
    }
    if new_backing.is_some() != (keep < n) {
        return Err(MergeError::InvalidArgument(format!(
            "{}: pull: the new backing name must be given exactly when a layer is kept",
            chain.top().path.display()
        )));
    }
    let new_ref = new_backing.map(|(name, f)| (name, f.name()));
    let (plan, stats, leaks_reclaimed) = run_backing_job(
        chain,
        Reference::Shared(keep),
        new_ref,
        keep > 1,
        dry_run,
        reclaim,
        OP,
        hooks,
    )?;
    Ok(PullReport {
        top: chain.top().path.clone(),
        layers_pulled: keep - 1,
        new_backing: if keep > 1 {
            new_backing.map(|(name, _)| name.to_string())
        } else {
            chain.top().image.backing().0.map(str::to_string)
        },
        plan,
        stats,
        dry_run,
        leaks_reclaimed,
    })
}

/// Safe rebase: changes `top`'s backing file to `new_backing` (a name as
/// the header records it, relative to the top's directory, and its format;
/// `None`: no backing file) while keeping `top`'s guest view, by copying
/// into `top` every range where the old chain and the new backing file
/// read differently. As `qemu-img rebase -b NEW -F FMT`, but the header
/// changes only after the copies are durable.
pub fn rebase(
    top: &Path,
    new_backing: Option<(&str, ImageFormat)>,
    opts: &RebaseOptions,
    hooks: &mut Hooks<'_>,
) -> Result<RebaseReport> {
    const OP: &str = "rebase";
    let confine_to = opts.confine_to.as_deref();
    let mut chain = open_top(top, opts.dry_run, confine_to, false)?;
    for l in chain.layers() {
        open::refuse_damaged(l, OP)?;
    }
    if !opts.dry_run {
        open::refuse_unwritable(chain.top(), OP)?;
    }
    let old_backing = chain.top().image.backing().0.map(str::to_string);
    let n = chain.layers().len();
    let mut separate: Option<Chain> = None;
    let mut shared = n;
    if let Some((name, format)) = new_backing {
        if name.is_empty() || is_protocol_name(name) {
            return Err(MergeError::InvalidArgument(format!(
                "{name:?}: only plain file paths can be backing files"
            )));
        }
        let path = resolve_backing_path(top, name);
        let id = open::file_id(&path)?;
        let top_id = layer_id(chain.top())?;
        let found = chain
            .layers()
            .iter()
            .enumerate()
            .skip(1)
            .find(|(_, l)| layer_id(l).ok() == Some(id) && l.image.format() == format)
            .map(|(i, _)| i);
        match found {
            Some(i) => shared = i,
            None => {
                // Refuse a loop before taking locks that would conflict
                // with our own hold on the top.
                let probe = Chain::open(
                    &path,
                    &OpenOptions::new()
                        .format(Some(format))
                        .force_share(true)
                        .confine_to(opts.confine_to.clone()),
                )?;
                for l in probe.layers() {
                    if layer_id(l)? == top_id {
                        return Err(MergeError::InvalidArgument(format!(
                            "{}: cannot be the backing file of {}: its chain contains {}",
                            path.display(),
                            top.display(),
                            top.display()
                        )));
                    }
                }
                drop(probe);
                open::confine(&path, confine_to)?;
                let c = Chain::open(
                    &path,
                    &OpenOptions::new()
                        .format(Some(format))
                        .confine_to(opts.confine_to.clone()),
                )?;
                for l in c.layers() {
                    open::refuse_damaged(l, OP)?;
                }
                separate = Some(c);
            }
        }
    }
    let reference = match &separate {
        Some(c) => Reference::Separate(c),
        None => Reference::Shared(shared),
    };
    let fmt_name = new_backing.map(|(name, f)| (name, f.name()));
    let (plan, stats, _) = run_backing_job(
        &mut chain,
        reference,
        fmt_name,
        true,
        opts.dry_run,
        false,
        OP,
        hooks,
    )?;
    Ok(RebaseReport {
        top: top.to_path_buf(),
        old_backing,
        new_backing: new_backing.map(|(name, _)| name.to_string()),
        plan,
        stats,
        dry_run: opts.dry_run,
    })
}
