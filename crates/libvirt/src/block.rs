//! Offline `blockcommit` and `blockpull` of a shut-off domain's active
//! chain, with the pivot.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use strata_image::ImageFormat;
use strata_merge::{Hooks, PullOptions};
use virt::connect::Connect;

use crate::ctx::{canon, remove_files, Ctx, Graph, Txn};
use crate::error::{Error, Result};
use crate::live;
use crate::snapshot::{commit_guarded, garbage, Gc, Report};
use crate::xml;

/// Options of [`blockcommit`] (`virsh blockcommit --active --pivot`).
/// `#[non_exhaustive]`: start from `default()` and use the `with_*`
/// methods (or assign the fields of a value you hold).
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct BlockCommitOptions {
    /// Disk target; `None`: the domain's only file-backed disk.
    pub disk: Option<String>,
    /// The image to commit into, a file of the active chain; `None`: the
    /// bottom of the chain.
    pub base: Option<PathBuf>,
    /// Remove the snapshots whose state the commit overwrites (their state
    /// lives in or below the base), with their files, instead of refusing.
    pub delete_snapshots: bool,
    /// `virsh blockcommit --delete`: also remove the committed images
    /// above the base that nothing needs any more when Strata did not
    /// create them (its own and snapshots' overlays are removed anyway).
    pub delete_merged: bool,
    /// `--top`: the image to commit from, a file of the active chain;
    /// `None`: the active image (an active commit, with the pivot). An
    /// inner layer is committed only on a running domain (libvirt's
    /// job); offline that is a snapshot delete.
    pub top: Option<PathBuf>,
    /// `--shallow`: commit into the immediate backing file of the top.
    pub shallow: bool,
    /// Bandwidth limit of a live job, bytes per second (0: none; offline
    /// merges ignore it).
    pub bandwidth: u64,
}

/// Options of [`blockpull`] (`virsh blockpull`). `#[non_exhaustive]`:
/// start from `default()` and use the `with_*` methods.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct BlockPullOptions {
    /// Disk target; `None`: the domain's only file-backed disk.
    pub disk: Option<String>,
    /// Keep this file of the chain (and what is below it) as the active
    /// image's backing file; `None`: pull everything, the active image
    /// then stands alone.
    pub base: Option<PathBuf>,
    /// Bandwidth limit of a live job, bytes per second (0: none; offline
    /// merges ignore it).
    pub bandwidth: u64,
}

impl BlockCommitOptions {
    /// Commits the disk `disk` (target or source file; see
    /// [`BlockCommitOptions::disk`]).
    pub fn with_disk(mut self, disk: impl Into<String>) -> BlockCommitOptions {
        self.disk = Some(disk.into());
        self
    }
    /// Commits into `base` ([`BlockCommitOptions::base`]).
    pub fn with_base(mut self, base: impl Into<PathBuf>) -> BlockCommitOptions {
        self.base = Some(base.into());
        self
    }
    /// Sets [`BlockCommitOptions::delete_snapshots`].
    pub fn with_delete_snapshots(mut self, yes: bool) -> BlockCommitOptions {
        self.delete_snapshots = yes;
        self
    }
    /// Sets [`BlockCommitOptions::delete_merged`] (`--delete`).
    pub fn with_delete_merged(mut self, yes: bool) -> BlockCommitOptions {
        self.delete_merged = yes;
        self
    }
    /// Commits from `top` (`--top`; [`BlockCommitOptions::top`]).
    pub fn with_top(mut self, top: impl Into<PathBuf>) -> BlockCommitOptions {
        self.top = Some(top.into());
        self
    }
    /// Sets [`BlockCommitOptions::shallow`] (`--shallow`).
    pub fn with_shallow(mut self, yes: bool) -> BlockCommitOptions {
        self.shallow = yes;
        self
    }
    /// Sets [`BlockCommitOptions::bandwidth`], bytes per second.
    pub fn with_bandwidth(mut self, bytes_per_second: u64) -> BlockCommitOptions {
        self.bandwidth = bytes_per_second;
        self
    }
}

impl BlockPullOptions {
    /// Pulls into the disk `disk` ([`BlockPullOptions::disk`]).
    pub fn with_disk(mut self, disk: impl Into<String>) -> BlockPullOptions {
        self.disk = Some(disk.into());
        self
    }
    /// Keeps `base` as the backing file ([`BlockPullOptions::base`]).
    pub fn with_base(mut self, base: impl Into<PathBuf>) -> BlockPullOptions {
        self.base = Some(base.into());
        self
    }
    /// Sets [`BlockPullOptions::bandwidth`], bytes per second.
    pub fn with_bandwidth(mut self, bytes_per_second: u64) -> BlockPullOptions {
        self.bandwidth = bytes_per_second;
        self
    }
}

/// The active chain of a disk, canonical paths, top first.
pub(crate) fn active_chain(
    src: &Path,
    format: Option<ImageFormat>,
) -> Result<Vec<(PathBuf, ImageFormat)>> {
    Ok(strata_image::backing::chain_files(src, format)?
        .into_iter()
        .map(|f| (canon(&f.path), f.format))
        .collect())
}

fn find_in_chain(chain: &[(PathBuf, ImageFormat)], base: &Path, what: &str) -> Result<usize> {
    let b = canon(base);
    chain
        .iter()
        .skip(1)
        .position(|(p, _)| *p == b)
        .map(|i| i + 1)
        .ok_or_else(|| {
            Error::InvalidArgument(format!(
                "{}: is not a backing file of the disk's active image ({what})",
                base.display()
            ))
        })
}

/// Commits the active chain of a disk of the shut-off `domain` into its
/// base (default: the bottom of the chain) and switches the domain to the
/// base. Snapshots whose state lives in or below the base would change:
/// refused, unless `delete_snapshots`, which removes them (metadata and
/// files Strata made). Files Strata made that nothing needs afterwards are
/// removed.
pub fn blockcommit(
    conn: &Connect,
    domain: &str,
    opts: &BlockCommitOptions,
    hooks: &mut Hooks<'_>,
) -> Result<Report> {
    let ctx = Ctx::load_any(conn, domain)?;
    let disk = ctx.disk(opts.disk.as_deref())?;
    let target = disk.target.clone();
    let src = disk.source.clone().unwrap_or_default();
    let chain = active_chain(
        &src,
        disk.format.as_deref().and_then(ImageFormat::from_name),
    )?;
    if chain.len() < 2 {
        return Err(Error::InvalidArgument(format!(
            "disk {target}: {} has no backing file; nothing to commit",
            src.display()
        )));
    }
    let t = match &opts.top {
        Some(p) if canon(p) == chain[0].0 => 0,
        Some(p) => find_in_chain(&chain, p, "--top")?,
        None => 0,
    };
    if t > 0 && ctx.live.is_none() {
        return Err(Error::Unsupported(format!(
            "--top {}: on a shut-off domain Strata commits the active image only (a commit of \
             an inner layer is a snapshot delete: strata snapshot delete); on a running \
             domain libvirt commits inner layers",
            opts.top.as_deref().unwrap_or(Path::new("")).display()
        )));
    }
    let k = match &opts.base {
        Some(_) if opts.shallow => {
            return Err(Error::InvalidArgument(
                "--shallow and --base are exclusive".into(),
            ))
        }
        Some(b) => find_in_chain(&chain, b, "blockcommit")?,
        None if opts.shallow => t + 1,
        None => chain.len() - 1,
    };
    if k <= t || k >= chain.len() {
        return Err(Error::InvalidArgument(format!(
            "disk {target}: the base must be below the top in the chain of {}",
            src.display()
        )));
    }
    let (base, base_fmt) = chain
        .get(k)
        .cloned()
        .ok_or_else(|| Error::InvalidArgument("no base".into()))?;
    let graph = Graph::load(&ctx.known_files())?;

    // Snapshots whose state reads through the base, not through the top
    // (the top's view does not change; everything else reading the base
    // does).
    let top_file = chain[t].0.clone();
    let doomed: Vec<String> = ctx
        .snaps
        .iter()
        .filter(|s| {
            s.state_file(&target).is_some_and(|(f, _)| {
                let c = graph.closure(&[canon(&f)]);
                c.contains(&base) && !c.contains(&top_file)
            })
        })
        .map(|s| s.info.name.clone())
        .collect();
    if !doomed.is_empty() && !opts.delete_snapshots {
        return Err(Error::SnapshotsDestroyed {
            domain: domain.into(),
            disk: target,
            op: "blockcommit",
            base,
            snapshots: doomed,
        });
    }
    if ctx.live.is_some() {
        return live_commit(ctx, &target, &chain, t, k, doomed, opts, hooks);
    }
    let doomed_refs: Vec<&str> = doomed.iter().map(String::as_str).collect();
    let mut roots = ctx.state_roots(&doomed_refs);
    for (t, a) in ctx.actives() {
        roots.push(if t == target { base.clone() } else { a });
    }
    let needed = graph.closure(&roots);
    let mut gc = garbage(&ctx, &graph, &needed, &[]);
    if opts.delete_merged {
        // The merged layers (top..base), asked to be removed: taken out of
        // the kept list unless something else reads through them.
        let merged: Vec<PathBuf> = chain.iter().take(k).map(|c| c.0.clone()).collect();
        let (go, stay): (Vec<_>, Vec<_>) = std::mem::take(&mut gc.kept)
            .into_iter()
            .partition(|(f, why)| merged.contains(f) && why.contains("did not create"));
        gc.kept = stay;
        gc.remove.extend(go.into_iter().map(|g| g.0));
    }
    let removable: HashSet<PathBuf> = gc.remove.iter().cloned().collect();

    // 1. The commit (refusals come before anything is written). The
    //    active image reads the same throughout; the domain still uses it.
    let top = canon(&src);
    let cr = commit_guarded(&top, &base, &removable, hooks).map_err(|e| match e {
        Error::Merge(m) if matches!(m, strata_merge::MergeError::BaseInUse { .. }) => {
            Error::Merge(m)
        }
        e => {
            let doomed_note = if doomed.is_empty() {
                String::new()
            } else {
                format!(
                    "; snapshot(s) {} had their state in {}, which may be partly overwritten",
                    doomed.join(", "),
                    base.display()
                )
            };
            Error::MergeFailed {
                op: format!("commit {} into {}", top.display(), base.display()),
                state: format!(
                    "the domain still uses {}, which is unchanged and reads the same; {} may \
                     be partly written; libvirt's metadata is unchanged{doomed_note}: fix the \
                     cause and run the same blockcommit again to finish",
                    top.display(),
                    base.display()
                ),
                cause: Box::new(e),
            }
        }
    })?;

    // 2. libvirt: pivot, drop the destroyed snapshots.
    let mut new_dom = ctx.xml.clone();
    xml::set_disk_source(&mut new_dom, &target, &base, base_fmt.name())?;
    let owned: Vec<xml::OwnedFile> = ctx
        .owned()
        .into_iter()
        .filter(|o| !removable.contains(&canon(&o.path)))
        .collect();
    xml::set_owned_files(&mut new_dom, &owned)?;
    let mut txn = Txn::new(&ctx);
    let run = (|| -> Result<()> {
        txn.define_domain(&new_dom)?;
        for n in doomed.iter().rev() {
            txn.delete_snapshot_metadata(n)?;
        }
        // The current snapshot, if destroyed, passes to its nearest
        // surviving ancestor.
        if let Some(cur) = ctx.current() {
            if doomed.contains(&cur.info.name) {
                let mut p = cur.info.parent.clone();
                while let Some(name) = p {
                    if !doomed.contains(&name) {
                        let s = ctx.snap(&name)?;
                        txn.define_snapshot(&s.tree, &name, true)?;
                        break;
                    }
                    p = ctx.snap(&name)?.info.parent.clone();
                }
            }
        }
        Ok(())
    })();
    if let Err(e) = run {
        return Err(txn.rollback(e));
    }
    txn.finish()?;
    let (removed, mut warnings) = remove_files(&gc.remove);
    let mut report = Report {
        swapped: vec![(disk.target.clone(), base.clone())],
        merges: vec![format!(
            "committed {} ({} image(s)) into {}",
            top.display(),
            cr.layers_merged,
            base.display()
        )],
        removed,
        snapshots_removed: doomed,
        kept: gc.kept,
        ..Report::default()
    };
    report.warnings.append(&mut warnings);
    Ok(report)
}

/// Pulls the layers above `opts.base` (all when `None`) into the active
/// image of a disk of the shut-off `domain`. The domain keeps using the
/// same file; no snapshot's state changes; files Strata made that nothing
/// needs afterwards are removed.
pub fn blockpull(
    conn: &Connect,
    domain: &str,
    opts: &BlockPullOptions,
    hooks: &mut Hooks<'_>,
) -> Result<Report> {
    let ctx = Ctx::load_any(conn, domain)?;
    let disk = ctx.disk(opts.disk.as_deref())?;
    let src = disk.source.clone().unwrap_or_default();
    let chain = active_chain(
        &src,
        disk.format.as_deref().and_then(ImageFormat::from_name),
    )?;
    if chain.len() < 2 || chain.first().is_some_and(|c| c.1 != ImageFormat::Qcow2) {
        return Err(Error::InvalidArgument(format!(
            "disk {}: {} has no backing file; nothing to pull",
            disk.target,
            src.display()
        )));
    }
    let base = match &opts.base {
        Some(b) => {
            let k = find_in_chain(&chain, b, "blockpull")?;
            if k == 1 {
                return Err(Error::InvalidArgument(format!(
                    "{} is the immediate backing file: nothing to pull",
                    b.display()
                )));
            }
            chain.get(k).map(|c| c.0.clone())
        }
        None => None,
    };
    if ctx.live.is_some() {
        return live_pull(ctx, &disk.target, &chain, base, opts, hooks);
    }
    let top = canon(&src);
    let mut opts = PullOptions::default();
    opts.base = base.clone();
    let pr = strata_merge::pull(&top, &opts, hooks).map_err(|e| Error::MergeFailed {
        op: format!("pull into {}", top.display()),
        state: format!(
            "{} may be partly written but reads the same, its backing files are unchanged, \
             libvirt's metadata is unchanged: fix the cause and run the same blockpull again",
            top.display()
        ),
        cause: Box::new(Error::Merge(e)),
    })?;
    // The pull is done and changed no view: from here only bookkeeping.
    let graph = Graph::load(&ctx.known_files())?;
    let mut roots = ctx.state_roots(&[]);
    roots.extend(ctx.actives().into_iter().map(|a| a.1));
    let needed = graph.closure(&roots);
    let Gc { remove: gc, kept } = garbage(&ctx, &graph, &needed, &[]);
    let mut report = Report {
        merges: vec![format!(
            "pulled {} image(s) into {}",
            pr.layers_pulled,
            top.display()
        )],
        kept,
        ..Report::default()
    };
    let mut new_dom = ctx.xml.clone();
    let owned: Vec<xml::OwnedFile> = ctx
        .owned()
        .into_iter()
        .filter(|o| !gc.contains(&canon(&o.path)))
        .collect();
    xml::set_owned_files(&mut new_dom, &owned)?;
    // The active image's chain is shorter now.
    xml::drop_backing_store(&mut new_dom, &disk.target);
    if xml::write(&new_dom, "domain XML")? != xml::write(&ctx.xml, "domain XML")? {
        let mut txn = Txn::new(&ctx);
        if let Err(e) = txn.define_domain(&new_dom) {
            return Err(txn.rollback(e));
        }
        txn.finish()?;
        let (removed, mut w) = remove_files(&gc);
        report.removed = removed;
        report.warnings.append(&mut w);
    }
    Ok(report)
}

/// [`blockcommit`] on a running domain: libvirt's commit job (an active
/// commit pivots to the base), then the bookkeeping as offline.
#[allow(clippy::too_many_arguments)]
fn live_commit(
    mut ctx: Ctx<'_>,
    target: &str,
    chain: &[(PathBuf, ImageFormat)],
    t: usize,
    k: usize,
    doomed: Vec<String>,
    opts: &BlockCommitOptions,
    hooks: &mut Hooks<'_>,
) -> Result<Report> {
    let chain = live::checked_chain(&ctx, target, chain)?;
    let base = chain[k].clone();
    live::run_commit(&mut ctx, target, &chain, t, k, opts.bandwidth, hooks).map_err(|e| {
        if doomed.is_empty() {
            e
        } else {
            Error::MergeFailed {
                op: format!("live commit into {}", base.display()),
                state: format!(
                    "the domain keeps its chain; snapshot(s) {} had their state in or below {}, \
                     which may be partly overwritten; run the same blockcommit again to finish",
                    doomed.join(", "),
                    base.display()
                ),
                cause: Box::new(e),
            }
        }
    })?;
    ctx.refresh()?;
    let merged: Vec<PathBuf> = if opts.delete_merged {
        chain[t..k].to_vec()
    } else {
        Vec::new()
    };
    let (removed, kept, warnings) =
        live::after_jobs(&ctx, &[target.to_string()], &doomed, &merged)?;
    let mut report = Report {
        merges: vec![format!(
            "committed {} ({} image(s)) into {} (libvirt's live block commit)",
            chain[t].display(),
            k - t,
            base.display()
        )],
        removed,
        snapshots_removed: doomed,
        kept,
        warnings,
        ..Report::default()
    };
    if t == 0 {
        report.swapped.push((target.to_string(), base));
    }
    Ok(report)
}

/// [`blockpull`] on a running domain: libvirt's pull job, then the
/// bookkeeping as offline.
fn live_pull(
    mut ctx: Ctx<'_>,
    target: &str,
    chain: &[(PathBuf, ImageFormat)],
    base: Option<PathBuf>,
    opts: &BlockPullOptions,
    hooks: &mut Hooks<'_>,
) -> Result<Report> {
    let chain = live::checked_chain(&ctx, target, chain)?;
    let k = base
        .as_ref()
        .and_then(|b| chain.iter().position(|c| c == b));
    live::run_pull(&mut ctx, target, &chain, k, opts.bandwidth, hooks)?;
    ctx.refresh()?;
    let (removed, kept, warnings) = live::after_jobs(&ctx, &[target.to_string()], &[], &[])?;
    Ok(Report {
        merges: vec![format!(
            "pulled {} image(s) into {} (libvirt's live block pull)",
            k.map_or(chain.len() - 1, |k| k - 1),
            chain[0].display()
        )],
        removed,
        kept,
        warnings,
        ..Report::default()
    })
}
