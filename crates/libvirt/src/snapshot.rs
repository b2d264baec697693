//! External snapshots of shut-off domains: create, list, revert, delete.

use std::collections::{BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use strata_image::ImageFormat;
use strata_merge::{CommitOptions, Hooks, MergeError, PullOptions};
use virt::connect::Connect;
use virt::domain::Domain;

use crate::ctx::{
    canon, default_overlay_path, foreign_users, path_str, remove_files, unique_path, Ctx, Graph,
    Txn,
};
use crate::error::{Error, Result};
use crate::xml::{self, DomainDisk, NewSnapshot, OwnedFile};

/// One `--diskspec` of `virsh snapshot-create-as`: what to do with a disk.
/// `#[non_exhaustive]`: built with [`DiskSpec::new`] and the `with_*`
/// methods.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DiskSpec {
    /// Disk target (`vda`) or its source file.
    pub disk: String,
    /// `true`: `snapshot=external` (the default); `false`: `snapshot=no`.
    pub external: bool,
    /// `file=`: the overlay's path.
    pub file: Option<PathBuf>,
}

/// Options of [`snapshot_create`] (`virsh snapshot-create-as --disk-only`).
/// `#[non_exhaustive]`: start from `default()` and use the `with_*`
/// methods.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct SnapshotCreateOptions {
    /// Disk targets to snapshot (`vda`, ...), and only those; `None`: the
    /// disks `virsh snapshot-create-as --disk-only` takes (see
    /// [`crate::xml::DomainDisk::snapshot_skip`]), changed by `diskspecs`.
    pub disks: Option<Vec<String>>,
    /// virsh's `--diskspec`s: per disk, `snapshot=no` or an overlay file
    /// name; a disk not named keeps its default. `snapshot=external` on a
    /// `snapshot='no'` disk takes it (as libvirt does); on a cdrom,
    /// read-only, shareable or non-file disk it is refused.
    pub diskspecs: Vec<DiskSpec>,
    /// Path of the overlay (only with a single disk); `None`: libvirt's
    /// default, the current file name with its suffix replaced by the
    /// snapshot name.
    pub file: Option<PathBuf>,
    /// The snapshot's description.
    pub description: Option<String>,
    /// Freeze the guest's file systems for the snapshot (`--quiesce`):
    /// running domains only, through the QEMU guest agent; an error when
    /// it does not answer (nothing is changed then).
    pub quiesce: bool,
}

impl DiskSpec {
    /// `disk` (target or source file) taken by an external snapshot, the
    /// overlay at libvirt's default path.
    pub fn new(disk: impl Into<String>) -> DiskSpec {
        DiskSpec {
            disk: disk.into(),
            external: true,
            file: None,
        }
    }
    /// `false`: `snapshot=no` (the disk is left out); `true`:
    /// `snapshot=external`.
    pub fn with_external(mut self, yes: bool) -> DiskSpec {
        self.external = yes;
        self
    }
    /// The overlay's path (`file=`).
    pub fn with_file(mut self, file: impl Into<PathBuf>) -> DiskSpec {
        self.file = Some(file.into());
        self
    }
}

impl SnapshotCreateOptions {
    /// Snapshots these disks only ([`SnapshotCreateOptions::disks`]).
    pub fn with_disks(mut self, disks: Vec<String>) -> SnapshotCreateOptions {
        self.disks = Some(disks);
        self
    }
    /// Sets [`SnapshotCreateOptions::diskspecs`].
    pub fn with_diskspecs(mut self, specs: Vec<DiskSpec>) -> SnapshotCreateOptions {
        self.diskspecs = specs;
        self
    }
    /// The overlay's path ([`SnapshotCreateOptions::file`]).
    pub fn with_file(mut self, file: impl Into<PathBuf>) -> SnapshotCreateOptions {
        self.file = Some(file.into());
        self
    }
    /// The snapshot's description.
    pub fn with_description(mut self, text: impl Into<String>) -> SnapshotCreateOptions {
        self.description = Some(text.into());
        self
    }
    /// Sets [`SnapshotCreateOptions::quiesce`] (`--quiesce`).
    pub fn with_quiesce(mut self, yes: bool) -> SnapshotCreateOptions {
        self.quiesce = yes;
        self
    }
}

/// One disk of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SnapshotDisk {
    /// Disk target (`vda`).
    pub disk: String,
    /// The overlay the snapshot created (it took the writes made after the
    /// snapshot). It may be gone after a revert discarded those writes.
    pub overlay: Option<PathBuf>,
    /// The file holding the disk's state at the snapshot (read-only since).
    pub state_file: Option<PathBuf>,
    /// The backing chain of `state_file`, top first (empty when missing).
    pub state_chain: Vec<PathBuf>,
}

/// A snapshot as [`snapshot_list`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SnapshotInfo {
    /// Name.
    pub name: String,
    /// Description, when one was given.
    pub description: Option<String>,
    /// Creation time, seconds since the Unix epoch.
    pub creation_time: i64,
    /// libvirt's state (`shutoff` for snapshots of shut-off domains).
    pub state: String,
    /// The parent snapshot.
    pub parent: Option<String>,
    /// Whether it is the domain's current snapshot.
    pub current: bool,
    /// Its disks with external state.
    pub disks: Vec<SnapshotDisk>,
    /// Whether any of its state is inside an image (an internal snapshot).
    pub internal: bool,
    /// The memory state file of a snapshot taken with `--memspec`.
    pub memory_file: Option<PathBuf>,
}

/// What an operation did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
#[must_use]
pub struct Report {
    /// Disks whose source changed: (target, the file the domain now uses).
    pub swapped: Vec<(String, PathBuf)>,
    /// Files created.
    pub created: Vec<PathBuf>,
    /// Merges run, as sentences ("committed A into B").
    pub merges: Vec<String>,
    /// Files removed because nothing needs them any more.
    pub removed: Vec<PathBuf>,
    /// Snapshots removed from libvirt's metadata.
    pub snapshots_removed: Vec<String>,
    /// Disks left out of a new snapshot: (target, why).
    pub skipped: Vec<(String, String)>,
    /// Files kept although the operation stopped needing them, or that the
    /// user may expect to be gone: (file, why).
    pub kept: Vec<(PathBuf, String)>,
    /// Things that did not stop the operation but deserve a look.
    pub warnings: Vec<String>,
    /// The domain was running and was stopped first (revert `--force`).
    pub stopped: bool,
    /// Revert of a snapshot with memory state: the memory file the domain
    /// was restored from (`virDomainRestoreFlags`; it is only read).
    pub restored: Option<PathBuf>,
}

/// A disk of the domain as [`domain_disks`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DiskInfo {
    /// Target (`vda`).
    pub disk: String,
    /// The file the domain uses.
    pub source: PathBuf,
    /// Its format (`qcow2`, `raw`).
    pub format: String,
    /// Its backing chain, top first (the source included).
    pub chain: Vec<PathBuf>,
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn chain_paths(path: &Path, format: Option<ImageFormat>) -> Vec<PathBuf> {
    strata_image::backing::chain_files(path, format)
        .map(|c| c.into_iter().map(|f| f.path).collect())
        .unwrap_or_default()
}

/// Re-points `child` at `base` (header only), as `qemu-img rebase -u`
/// would: after the merge this is the last step, so a dirty child is
/// repaired and unknown autoclear bits cleared rather than the delete left
/// half done.
fn set_backing(child: &Path, base: &str, format: ImageFormat) -> Result<()> {
    Ok(strata_image::set_backing_file(
        child,
        Some((base, format)),
        strata_image::WritePolicy::qemu(),
    )?)
}

fn check_name(name: &str) -> Result<()> {
    if name.is_empty() || name.contains('/') || name == "." || name == ".." || name.contains('\0') {
        return Err(Error::InvalidArgument(format!(
            "{name:?} is not a valid snapshot name (it is used in file names: no '/', not empty)"
        )));
    }
    Ok(())
}

/// The domain's file-backed qcow2 and raw disks with their chains (as
/// `virsh domblklist` plus `qemu-img info --backing-chain`).
pub fn domain_disks(conn: &Connect, domain: &str) -> Result<Vec<DiskInfo>> {
    let dom = Domain::lookup_by_name(conn, domain)
        .map_err(|e| Error::libvirt(format!("look up domain {domain:?}"), e))?;
    let text = dom
        .get_xml_desc(virt::sys::VIR_DOMAIN_XML_INACTIVE)
        .map_err(|e| Error::libvirt("dump domain XML", e))?;
    let x = xml::parse(&text, "domain XML")?;
    Ok(xml::domain_disks(&x)
        .into_iter()
        .filter(DomainDisk::is_eligible)
        .filter_map(|d| {
            let source = d.source?;
            let format = d.format.unwrap_or_default();
            let chain = chain_paths(&source, ImageFormat::from_name(&format));
            Some(DiskInfo {
                disk: d.target,
                source,
                format,
                chain,
            })
        })
        .collect())
}

/// A disk a new snapshot takes, with its `--diskspec` file.
type Chosen = (DomainDisk, Option<PathBuf>);
/// A disk left out: (target, why).
type Skipped = (String, String);

/// The disks a new snapshot takes, each with its `--diskspec` file, and
/// the ones it leaves out with the reason (as `virsh snapshot-create-as
/// --disk-only` chooses).
fn choose_disks(
    ctx: &Ctx<'_>,
    opts: &SnapshotCreateOptions,
) -> Result<(Vec<Chosen>, Vec<Skipped>)> {
    let all = ctx.disks();
    let find = |t: &str| {
        all.iter()
            .find(|d| d.target == t || d.source.as_deref() == Some(Path::new(t)))
            .ok_or_else(|| Error::NoSuchDisk {
                domain: ctx.name.clone(),
                why: format!("no disk {t}"),
            })
    };
    let mut specs: Vec<(&str, &DiskSpec)> = Vec::new();
    for s in &opts.diskspecs {
        let d = find(&s.disk)?;
        if specs.iter().any(|(t, _)| *t == d.target) {
            return Err(Error::InvalidArgument(format!(
                "disk {} is named by two --diskspec",
                d.target
            )));
        }
        specs.push((d.target.as_str(), s));
    }
    if let Some(list) = &opts.disks {
        for t in list {
            find(t)?;
        }
    }
    let mut chosen = Vec::new();
    let mut skipped = Vec::new();
    for d in &all {
        let spec = specs.iter().find(|(t, _)| *t == d.target).map(|s| s.1);
        let listed = opts.disks.as_ref().map(|l| {
            l.iter()
                .any(|t| *t == d.target || d.source.as_deref() == Some(Path::new(t)))
        });
        let why = d.snapshot_skip();
        match (spec, listed) {
            (Some(s), _) if !s.external => {
                skipped.push((d.target.clone(), "snapshot=no (--diskspec)".into()));
            }
            (_, Some(false)) => {
                skipped.push((d.target.clone(), "not among the disks asked for".into()));
            }
            (Some(s), _) => match why {
                // An explicit choice overrides the domain's snapshot='no'.
                Some(_) if d.snapshot.as_deref() == Some("no") && d.is_eligible() => {
                    chosen.push((d.clone(), s.file.clone()));
                }
                Some(w) => {
                    return Err(Error::NoSuchDisk {
                        domain: ctx.name.clone(),
                        why: format!("disk {} cannot have an external snapshot: {w}", d.target),
                    })
                }
                None => chosen.push((d.clone(), s.file.clone())),
            },
            (None, Some(true)) => match why {
                Some(w) if !(d.snapshot.as_deref() == Some("no") && d.is_eligible()) => {
                    return Err(Error::NoSuchDisk {
                        domain: ctx.name.clone(),
                        why: format!("disk {} cannot have an external snapshot: {w}", d.target),
                    })
                }
                _ => chosen.push((d.clone(), None)),
            },
            (None, None) => match why {
                Some(w) => skipped.push((d.target.clone(), w)),
                None => chosen.push((d.clone(), None)),
            },
        }
    }
    Ok((chosen, skipped))
}

/// Creates a disk-only external snapshot `name` of the shut-off `domain`:
/// a qcow2 overlay on each chosen disk's current file, the domain switched
/// to the overlays, and the snapshot recorded in libvirt (redefined, made
/// current, with the current snapshot as its parent).
pub fn snapshot_create(
    conn: &Connect,
    domain: &str,
    name: &str,
    opts: &SnapshotCreateOptions,
) -> Result<Report> {
    check_name(name)?;
    let ctx = Ctx::load_any(conn, domain)?;
    if opts.quiesce && ctx.live.is_none() {
        return Err(Error::InvalidArgument(format!(
            "--quiesce: domain {domain:?} is shut off: quiescing needs the QEMU guest agent of \
             a running domain, and a shut-off domain's disks are consistent already; \
             nothing was changed"
        )));
    }
    if ctx.snap(name).is_ok() {
        return Err(Error::SnapshotExists {
            domain: domain.into(),
            name: name.into(),
        });
    }
    let all = ctx.disks();
    let (chosen, skipped) = choose_disks(&ctx, opts)?;
    if chosen.is_empty() {
        return Err(Error::NoSuchDisk {
            domain: domain.into(),
            why: format!(
                "no disk to snapshot{}",
                skipped
                    .iter()
                    .map(|(t, w)| format!("; {t}: {w}"))
                    .collect::<String>()
            ),
        });
    }
    if opts.file.is_some() && chosen.len() != 1 {
        return Err(Error::InvalidArgument(
            "an overlay file name can only be given for a single disk".into(),
        ));
    }
    // Plan: (disk, current file, its format, overlay).
    let mut plan = Vec::new();
    let mut taken = BTreeSet::new();
    for (d, spec_file) in &chosen {
        let src = d.source.clone().unwrap_or_default();
        let src = std::path::absolute(&src).map_err(|e| Error::io(&src, "resolve path", e))?;
        let fmt = d
            .format
            .as_deref()
            .and_then(ImageFormat::from_name)
            .ok_or_else(|| Error::InvalidArgument(format!("disk {}: unknown format", d.target)))?;
        let overlay = match spec_file.as_ref().or(opts.file.as_ref()) {
            Some(f) => std::path::absolute(f).map_err(|e| Error::io(f, "resolve path", e))?,
            None => default_overlay_path(&src, name),
        };
        if canon(&overlay) == canon(&src) {
            return Err(Error::InvalidArgument(format!(
                "disk {}: the overlay name {} is the disk's own file",
                d.target,
                overlay.display()
            )));
        }
        if overlay.exists() || !taken.insert(overlay.clone()) {
            return Err(Error::FileExists(overlay));
        }
        plan.push((d.target.clone(), src, fmt, overlay));
    }
    if ctx.live.is_some() {
        let p: Vec<(String, PathBuf)> = plan.iter().map(|p| (p.0.clone(), p.3.clone())).collect();
        let mut report =
            crate::live::snapshot_create(ctx, name, &p, opts.quiesce, opts.description.as_deref())?;
        report.skipped = skipped;
        return Ok(report);
    }
    let mut new_dom = ctx.xml.clone();
    let mut owned = ctx.owned();
    for (target, _, _, overlay) in &plan {
        xml::set_disk_source(&mut new_dom, target, overlay, "qcow2")?;
        owned.push(OwnedFile {
            disk: target.clone(),
            path: overlay.clone(),
        });
    }
    xml::set_owned_files(&mut new_dom, &owned)?;
    // The definition saved with the snapshot: the chains of the disks it
    // covers are probed again from the images, never taken from a
    // recorded (possibly stale) <backingStore>.
    let mut saved_domain = ctx.xml.clone();
    for (target, _, _, _) in &plan {
        xml::drop_backing_store(&mut saved_domain, target);
    }
    let snap = xml::build_snapshot(NewSnapshot {
        name,
        description: opts.description.as_deref(),
        parent: ctx.current().map(|s| s.info.name.as_str()),
        creation_time: now(),
        disks: all
            .iter()
            .map(|d| {
                let o = plan.iter().find(|p| p.0 == d.target).map(|p| p.3.clone());
                (d.target.clone(), o)
            })
            .collect(),
        domain: saved_domain,
    })?;

    let mut txn = Txn::new(&ctx);
    let mut report = Report {
        skipped,
        ..Report::default()
    };
    let run = (|| -> Result<()> {
        for (_, src, fmt, overlay) in &plan {
            let size = crate::ctx::image_of(src, Some(*fmt))?.virtual_size;
            txn.create_overlay(overlay, src, *fmt, size)?;
        }
        txn.define_domain(&new_dom)?;
        txn.define_snapshot(&snap, name, true)?;
        Ok(())
    })();
    if let Err(e) = run {
        return Err(txn.rollback(e));
    }
    txn.finish()?;
    for (target, _, _, overlay) in plan {
        report.created.push(overlay.clone());
        report.swapped.push((target, overlay));
    }
    Ok(report)
}

/// The snapshot's XML as libvirt keeps it (`virsh snapshot-dumpxml`).
pub fn snapshot_dumpxml(conn: &Connect, domain: &str, name: &str) -> Result<String> {
    let dom = Domain::lookup_by_name(conn, domain)
        .map_err(|e| Error::libvirt(format!("look up domain {domain:?}"), e))?;
    let s = virt::domain_snapshot::DomainSnapshot::lookup_by_name(&dom, name, 0).map_err(|_| {
        Error::NoSuchSnapshot {
            domain: domain.into(),
            name: name.into(),
        }
    })?;
    s.get_xml_desc(0)
        .map_err(|e| Error::libvirt(format!("dump snapshot {name} XML"), e))
}

/// Removes snapshot `name` from libvirt's metadata only (`virsh
/// snapshot-delete --metadata`): no file is merged or removed; the report
/// lists the snapshot's files as kept. Its children get its parent.
pub fn snapshot_delete_metadata(conn: &Connect, domain: &str, name: &str) -> Result<Report> {
    let ctx = Ctx::load_any(conn, domain)?;
    let snap = ctx.snap(name)?;
    let mut kept = Vec::new();
    for t in snap.external_disks() {
        if let Some((f, _)) = snap.state_file(&t) {
            kept.push((f, format!("held {name}'s state of disk {t} (--metadata)")));
        }
        if let Some(o) = snap.overlay(&t).filter(|o| o.exists()) {
            kept.push((
                o,
                format!("the overlay {name} created for disk {t} (--metadata)"),
            ));
        }
    }
    if let Some(m) = snap.info.memory_file.clone().filter(|m| m.exists()) {
        kept.push((m, format!("the memory state of {name} (--metadata)")));
    }
    let parent = snap.info.parent.clone();
    let mut txn = Txn::new(&ctx);
    let run = (|| -> Result<()> {
        txn.delete_snapshot_metadata(name)?;
        for s in &ctx.snaps {
            if s.info.parent.as_deref() == Some(name) {
                let mut tree = s.tree.clone();
                set_parent(&mut tree, parent.as_deref());
                txn.define_snapshot(&tree, &s.info.name, false)?;
            }
        }
        if snap.current {
            if let Some(p) = &parent {
                txn.define_snapshot(&ctx.snap(p)?.tree, p, true)?;
            }
        }
        Ok(())
    })();
    if let Err(e) = run {
        return Err(txn.rollback(e));
    }
    txn.finish()?;
    Ok(Report {
        snapshots_removed: vec![name.to_string()],
        kept,
        ..Report::default()
    })
}

/// The domain's snapshots, oldest first, with their files.
pub fn snapshot_list(conn: &Connect, domain: &str) -> Result<Vec<SnapshotInfo>> {
    let dom = Domain::lookup_by_name(conn, domain)
        .map_err(|e| Error::libvirt(format!("look up domain {domain:?}"), e))?;
    let mut out = Vec::new();
    for s in dom
        .list_all_snapshots(0)
        .map_err(|e| Error::libvirt("list snapshots", e))?
    {
        let text = s
            .get_xml_desc(0)
            .map_err(|e| Error::libvirt("dump snapshot XML", e))?;
        let tree = xml::parse(&text, "snapshot XML")?;
        let info = xml::read_snapshot(&tree)?;
        let current = s
            .is_current(0)
            .map_err(|e| Error::libvirt("query snapshot", e))?;
        let snap = crate::ctx::Snap {
            text,
            tree,
            info,
            current,
        };
        let disks = snap
            .external_disks()
            .into_iter()
            .map(|t| {
                let state = snap.state_file(&t);
                let state_chain = state
                    .as_ref()
                    .map(|(f, fmt)| chain_paths(f, fmt.as_deref().and_then(ImageFormat::from_name)))
                    .unwrap_or_default();
                SnapshotDisk {
                    overlay: snap.overlay(&t),
                    state_file: state.map(|s| s.0),
                    state_chain,
                    disk: t,
                }
            })
            .collect();
        out.push(SnapshotInfo {
            name: snap.info.name.clone(),
            description: snap.info.description.clone(),
            creation_time: snap.info.creation_time,
            state: snap.info.state.clone(),
            parent: snap.info.parent.clone(),
            current,
            disks,
            internal: snap.info.is_internal(),
            memory_file: snap.info.memory_file.clone(),
        });
    }
    out.sort_by(|a, b| (a.creation_time, &a.name).cmp(&(b.creation_time, &b.name)));
    Ok(out)
}

/// What to do with the files an operation stops needing.
#[derive(Debug, Default)]
pub(crate) struct Gc {
    /// Removable ([`Ctx::removable`]), existing, not needed, and not read
    /// through by images Strata does not know: removed at the end.
    pub remove: Vec<PathBuf>,
    /// Not needed any more, but kept: (file, why).
    pub kept: Vec<(PathBuf, String)>,
}

/// Sorts the files of `graph` nothing in `needed` (or `keep`) reads into
/// those to remove and those kept, with the reason.
pub(crate) fn garbage(
    ctx: &Ctx<'_>,
    graph: &Graph,
    needed: &HashSet<PathBuf>,
    keep: &[PathBuf],
) -> Gc {
    let known: HashSet<PathBuf> = graph.nodes.keys().cloned().collect();
    let removable: HashSet<PathBuf> = ctx.removable().iter().map(|o| canon(&o.path)).collect();
    let mut files: Vec<&PathBuf> = graph.nodes.keys().collect();
    files.sort();
    let unneeded: Vec<&PathBuf> = files
        .into_iter()
        .filter(|c| !needed.contains(*c) && !keep.contains(*c) && c.is_file())
        .collect();
    let mut gc = Gc::default();
    // First the files that stay whatever happens: not ours to remove, or
    // read through by images Strata does not know.
    let mut candidates = Vec::new();
    for c in unneeded {
        if !removable.contains(c) {
            gc.kept.push((
                c.clone(),
                "no snapshot or disk needs it any more, but Strata did not create it and no \
                 snapshot's metadata names it as its overlay (remove it yourself if it is not \
                 wanted)"
                    .into(),
            ));
            continue;
        }
        let users = foreign_users(c, &known);
        if users.is_empty() {
            candidates.push(c);
        } else {
            gc.kept.push((
                c.clone(),
                format!(
                    "no snapshot needs it, but {} use it as backing file",
                    users
                        .iter()
                        .map(|u| u.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
    }
    // Then nothing a kept file reads through may go.
    let kept_roots: Vec<PathBuf> = gc.kept.iter().map(|k| k.0.clone()).collect();
    let read_by_kept = graph.closure(&kept_roots);
    for c in candidates {
        if read_by_kept.contains(c) {
            gc.kept.push((
                c.clone(),
                "no snapshot or disk needs it, but a file kept above reads through it".into(),
            ));
        } else {
            gc.remove.push(c.clone());
        }
    }
    gc
}

fn owned_minus(ctx: &Ctx<'_>, gone: &[PathBuf]) -> Vec<OwnedFile> {
    ctx.owned()
        .into_iter()
        .filter(|o| !gone.contains(&canon(&o.path)))
        .collect()
}

/// Options of [`snapshot_revert_with`]. `#[non_exhaustive]`: start from
/// `default()` and use the `with_*` methods.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct RevertOptions {
    /// Revert only the disks of a snapshot that also saved the memory
    /// state (`--memspec`), dropping that state: the domain then starts
    /// from the disks as they were, as after a power cut. Without it the
    /// memory state is restored after the disks (the domain comes back
    /// running, or paused, at the snapshot's moment).
    pub disks_only: bool,
    /// When the memory state is restored: come back running
    /// (`VIR_DOMAIN_SAVE_RUNNING`) whatever the state saved in it.
    pub running: bool,
    /// When the memory state is restored: come back paused
    /// (`VIR_DOMAIN_SAVE_PAUSED`).
    pub paused: bool,
    /// Revert a running or paused domain: stop it first
    /// (`virDomainDestroy`; its current state is what the revert discards
    /// anyway). Without it such a revert is refused.
    pub force: bool,
}

impl RevertOptions {
    /// Sets [`RevertOptions::disks_only`].
    pub fn with_disks_only(mut self, yes: bool) -> RevertOptions {
        self.disks_only = yes;
        self
    }
    /// Sets [`RevertOptions::running`].
    pub fn with_running(mut self, yes: bool) -> RevertOptions {
        self.running = yes;
        self
    }
    /// Sets [`RevertOptions::paused`].
    pub fn with_paused(mut self, yes: bool) -> RevertOptions {
        self.paused = yes;
        self
    }
    /// Sets [`RevertOptions::force`].
    pub fn with_force(mut self, yes: bool) -> RevertOptions {
        self.force = yes;
        self
    }
}

/// [`snapshot_revert_with`] with the default options.
pub fn snapshot_revert(conn: &Connect, domain: &str, name: &str) -> Result<Report> {
    snapshot_revert_with(conn, domain, name, &RevertOptions::default())
}

/// Reverts the shut-off `domain`'s disks to the state captured by
/// snapshot `name`: for each disk the snapshot covers, a new overlay on the
/// file holding that state (never written, so every snapshot stays valid),
/// the domain switched to it, `name` made current, and files Strata made
/// that nothing needs any more removed. Disks the snapshot does not cover
/// are not touched. Internal snapshots are refused; snapshots with memory
/// state unless `opts.disks_only`.
pub fn snapshot_revert_with(
    conn: &Connect,
    domain: &str,
    name: &str,
    opts: &RevertOptions,
) -> Result<Report> {
    let mut ctx = Ctx::load_any(conn, domain)?;
    let snap = ctx.snap(name)?;
    if snap.info.is_internal() {
        return Err(Error::Unsupported(format!(
            "snapshot {name} is an internal snapshot (its state is inside the qcow2 image): \
             Strata reverts external snapshots only; use virsh snapshot-revert {domain} {name}"
        )));
    }
    let was_live = ctx.live.is_some();
    if was_live && !opts.force {
        return Err(Error::RevertRunning {
            domain: domain.into(),
            state: ctx.state_name(),
        });
    }
    let mut memory_kept = None;
    let mut restore = None;
    if snap.info.memory == "external" {
        let file = snap.info.memory_file.clone();
        if opts.disks_only {
            memory_kept = file;
        } else {
            let file = file.ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "snapshot {name} saved the domain's memory state but names no memory file; \
                     pass --disks-only to revert the disks only"
                ))
            })?;
            if let Err(e) = std::fs::metadata(&file) {
                return Err(Error::InvalidArgument(format!(
                    "snapshot {name}: its memory state file {} cannot be read ({e}); nothing \
                     was changed; pass --disks-only to revert the disks only (the memory state \
                     is then dropped)",
                    file.display()
                )));
            }
            // libvirt reads the image's header (and its saved definition):
            // a file it cannot restore from is refused before any change.
            Domain::save_image_get_xml_desc(conn, path_str(&file)?, 0).map_err(|e| {
                Error::libvirt(
                    format!(
                        "read the memory state of snapshot {name} from {} (nothing was changed; \
                         pass --disks-only to revert the disks only, dropping that state)",
                        file.display()
                    ),
                    e,
                )
            })?;
            if snap.info.domain.is_none() {
                return Err(Error::xml(
                    format!("snapshot {name}"),
                    "no saved domain definition to restore the memory state with",
                ));
            }
            restore = Some(file);
        }
    }
    if was_live {
        // Everything that refuses without a look at the files is done:
        // stop the domain (its state is what the revert discards), then
        // revert it offline from what libvirt says now.
        ctx.dom
            .destroy()
            .map_err(|e| Error::libvirt("stop the domain for the revert (--force)", e))?;
        ctx.refresh()?;
        if ctx.live.is_some() {
            return Err(Error::InvalidArgument(format!(
                "domain {domain:?} is still running after virDomainDestroy"
            )));
        }
    }
    let ctx = ctx;
    let snap = ctx.snap(name)?;
    let targets = snap.external_disks();
    if targets.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "snapshot {name} has no external disk state to revert to"
        )));
    }
    let graph = Graph::load(&ctx.known_files())?;
    let disks = ctx.disks();
    // Roots after the revert: every snapshot's state, and the disks that
    // are not reverted.
    let mut roots = ctx.state_roots(&[]);
    for (t, a) in ctx.actives() {
        if !targets.contains(&t) {
            roots.push(a);
        }
    }
    let needed = graph.closure(&roots);
    let known: HashSet<PathBuf> = graph.nodes.keys().cloned().collect();
    // (target, state file, its format, new overlay, replaces an old file)
    let mut plan = Vec::new();
    let mut taken = BTreeSet::new();
    for t in &targets {
        if !disks.iter().any(|d| &d.target == t && d.is_eligible()) {
            return Err(Error::NoSuchDisk {
                domain: domain.into(),
                why: format!("snapshot {name} has disk {t}, which the domain no longer has as a file-backed disk"),
            });
        }
        let (state, _) = snap.state_file(t).ok_or_else(|| {
            Error::xml(
                format!("snapshot {name}"),
                format!("no saved domain definition for disk {t}"),
            )
        })?;
        let node = graph.node(&state).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "snapshot {name}: the state of disk {t} was in {}, which is missing",
                state.display()
            ))
        })?;
        let overlay = snap
            .overlay(t)
            .unwrap_or_else(|| default_overlay_path(&state, name));
        let oc = canon(&overlay);
        let reusable = !overlay.exists()
            || (ctx.is_owned(&overlay)
                && !needed.contains(&oc)
                && foreign_users(&oc, &known).is_empty());
        let (path, replaces) = if reusable && !taken.contains(&overlay) {
            (overlay.clone(), overlay.exists())
        } else {
            (unique_path(&overlay, &taken), false)
        };
        taken.insert(path.clone());
        plan.push((
            t.clone(),
            state,
            node.format,
            node.virtual_size,
            path,
            replaces,
        ));
    }
    let keep: Vec<PathBuf> = plan.iter().filter(|p| p.5).map(|p| canon(&p.4)).collect();
    let Gc {
        remove: gc,
        mut kept,
    } = garbage(&ctx, &graph, &needed, &keep);
    if let Some(m) = memory_kept {
        kept.push((
            m,
            format!("the memory state of snapshot {name}, not restored (--disks-only)"),
        ));
    }
    let mut new_dom = ctx.xml.clone();
    let mut owned = owned_minus(&ctx, &gc);
    for (t, _, _, _, path, _) in &plan {
        xml::set_disk_source(&mut new_dom, t, path, "qcow2")?;
        if !owned.iter().any(|o| canon(&o.path) == canon(path)) {
            owned.push(OwnedFile {
                disk: t.clone(),
                path: path.clone(),
            });
        }
    }
    xml::set_owned_files(&mut new_dom, &owned)?;
    let mut snap_tree = snap.tree.clone();
    for t in &targets {
        xml::drop_snapshot_backing_store(&mut snap_tree, t);
    }
    // The definition the memory state is restored with: the one saved
    // with the snapshot, its disks on the new overlays (no <backingStore>:
    // libvirt probes the chain from the headers).
    let dxml = match (&restore, &snap.info.domain) {
        (Some(_), Some(d)) => {
            let mut d = d.clone();
            for (t, _, _, _, path, _) in &plan {
                xml::set_disk_source(&mut d, t, path, "qcow2")?;
            }
            Some(xml::write(&d, "the snapshot's domain definition")?)
        }
        _ => None,
    };

    let mut txn = Txn::new(&ctx);
    let run = (|| -> Result<()> {
        for (_, state, fmt, size, path, replaces) in &plan {
            let abs_state = canon(state);
            if *replaces {
                txn.create_overlay_replacing(path, &abs_state, *fmt, *size)?;
            } else {
                txn.create_overlay(path, &abs_state, *fmt, *size)?;
            }
        }
        txn.define_domain(&new_dom)?;
        txn.define_snapshot(&snap_tree, name, true)?;
        Ok(())
    })();
    if let Err(e) = run {
        return Err(txn.rollback(e));
    }
    txn.finish()?;
    let (removed, warnings) = remove_files(&gc);
    let mut report = Report {
        removed,
        warnings,
        kept,
        stopped: was_live,
        ..Report::default()
    };
    if let (Some(mem), Some(dxml)) = (restore, dxml) {
        let mut flags = 0;
        if opts.running {
            flags |= virt::sys::VIR_DOMAIN_SAVE_RUNNING;
        }
        if opts.paused {
            flags |= virt::sys::VIR_DOMAIN_SAVE_PAUSED;
        }
        // libvirt only reads the memory file (qemuSaveImageOpen, read-only).
        Domain::domain_restore_flags(conn, path_str(&mem)?, Some(&dxml), flags).map_err(|e| {
            Error::libvirt(
                format!(
                    "restore the memory state of snapshot {name} from {} (the disks were \
                         reverted and {name} is current; the domain is shut off; start it, or \
                         run the revert again)",
                    mem.display()
                ),
                e,
            )
        })?;
        report.restored = Some(mem);
    }
    for (t, _, _, _, path, _) in plan {
        report.created.push(path.clone());
        report.swapped.push((t, path));
    }
    Ok(report)
}

/// How one disk's part of a deleted snapshot is merged away.
#[derive(Debug)]
enum Merge {
    /// Commit `top` (the only image reading through `base`) into `base`,
    /// point `top`'s children at `base`, then `top` is not needed.
    Commit {
        top: PathBuf,
        base: PathBuf,
        disk: String,
    },
    /// Pull `base` (the only backing file of `top` nobody else needs) into
    /// `top`, then `base` is not needed.
    Pull {
        top: PathBuf,
        base: PathBuf,
        disk: String,
    },
}

/// Runs a commit, tolerating (with `force`) users of the base that are
/// all files about to be removed.
pub(crate) fn commit_guarded(
    top: &Path,
    base: &Path,
    removable: &HashSet<PathBuf>,
    hooks: &mut Hooks<'_>,
) -> Result<strata_merge::CommitReport> {
    // The disk's chain becomes top -> base, the top emptied (not
    // qemu-img's -b, which writes the base alone).
    let mut opts = CommitOptions::default()
        .with_base(base)
        .with_shorten_chain(true)
        .with_dry_run(true);
    match strata_merge::commit(top, &opts, &mut Hooks::default()) {
        Ok(_) => {}
        Err(MergeError::BaseInUse { users, .. })
            if users.iter().all(|u| removable.contains(&canon(u))) =>
        {
            opts.force = true;
        }
        Err(e) => return Err(e.into()),
    }
    opts.dry_run = false;
    Ok(strata_merge::commit(top, &opts, hooks)?)
}

/// Deletes snapshot `name` of the shut-off `domain` without changing what
/// the domain's disks read or any other snapshot's state: for each disk,
/// the file that held the snapshot's state is merged with the one image
/// that still reads through it (commit into it, or pull it up), files
/// nobody needs are removed, children are re-parented, and libvirt's
/// metadata is updated. The domain keeps using the same files.
pub fn snapshot_delete(
    conn: &Connect,
    domain: &str,
    name: &str,
    hooks: &mut Hooks<'_>,
) -> Result<Report> {
    let mut ctx = Ctx::load_any(conn, domain)?;
    let snap = ctx.snap(name)?.clone();
    if snap.info.is_internal() {
        return Err(Error::Unsupported(format!(
            "snapshot {name} is an internal snapshot (its state is inside the qcow2 image): \
             Strata deletes external snapshots only, and removing only the metadata would \
             leave the state in the image; delete it with virsh snapshot-delete {domain} {name} \
             (or qemu-img snapshot -d on the shut-off image); nothing was changed"
        )));
    }
    let graph = Graph::load(&ctx.known_files())?;
    let actives = ctx.actives();
    let mut kept: Vec<(PathBuf, String)> = Vec::new();
    let mut roots = ctx.state_roots(&[name]);
    roots.extend(actives.iter().map(|a| a.1.clone()));
    let needed = graph.closure(&roots);
    let known: HashSet<PathBuf> = graph.nodes.keys().cloned().collect();

    let mut merges = Vec::new();
    for t in snap.external_disks() {
        let Some((state, _)) = snap.state_file(&t) else {
            continue;
        };
        let n = canon(&state);
        if roots.contains(&n) || !needed.contains(&n) {
            continue; // still a state of something, or simply unneeded
        }
        let kids = graph.children(&n, &needed);
        let [c] = kids.as_slice() else {
            kept.push((
                n.clone(),
                format!(
                    "held {name}'s state of disk {t}; {} images read through it, so it stays \
                     as it is",
                    kids.len()
                ),
            ));
            continue;
        };
        let c_active = actives.iter().any(|a| &a.1 == c);
        let c_ok = ctx.is_owned(c) && foreign_users(c, &known).is_empty();
        let n_ok = ctx.is_owned(&n) && foreign_users(&n, &known).is_empty();
        if !c_active && c_ok {
            merges.push(Merge::Commit {
                top: c.clone(),
                base: n,
                disk: t.clone(),
            });
        } else if n_ok {
            merges.push(Merge::Pull {
                top: c.clone(),
                base: n,
                disk: t.clone(),
            });
        } else {
            kept.push((
                n.clone(),
                format!(
                    "held {name}'s state of disk {t}; not merged into {}: Strata did not create \
                     it and no snapshot names it as its overlay (the user's image; \
                     blockcommit folds the disk's chain into it when wanted)",
                    c.display()
                ),
            ));
        }
    }
    if let Some(m) = &snap.info.memory_file {
        if m.exists() {
            kept.push((
                m.clone(),
                format!("the memory state of snapshot {name} (Strata never removes memory files)"),
            ));
        }
    }

    // On a running domain, a merge of files QEMU has open is libvirt's
    // live job; the others are Strata's own (QEMU does not have them open).
    let mut live_chains: Vec<(String, Vec<PathBuf>)> = Vec::new();
    if ctx.live.is_some() {
        for m in &merges {
            let (Merge::Commit { top, disk, .. } | Merge::Pull { top, disk, .. }) = m;
            if !crate::live::in_live_chain(&ctx, disk, top) {
                continue;
            }
            let d = ctx.disk(Some(disk))?;
            let headers = crate::block::active_chain(
                &d.source.clone().unwrap_or_default(),
                d.format.as_deref().and_then(ImageFormat::from_name),
            )?;
            let chain = crate::live::checked_chain(&ctx, disk, &headers)?;
            if let Merge::Pull { top, .. } = m {
                if chain.first() != Some(top) {
                    return Err(Error::Unsupported(format!(
                        "deleting {name} needs a pull into {}, an inner image of disk {disk}'s \
                         chain: libvirt pulls into the active image only; shut the domain down \
                         and run the same delete again (offline); nothing was changed",
                        top.display()
                    )));
                }
            }
            live_chains.push((disk.clone(), chain));
        }
    }
    let live_chain_of = |disk: &str, top: &Path| -> Option<Vec<PathBuf>> {
        live_chains
            .iter()
            .find(|(d, c)| d == disk && c.contains(&canon(top)))
            .map(|(_, c)| c.clone())
    };

    // Files about to go (for the commit guard): owned and unneeded now.
    let pre_gc = garbage(&ctx, &graph, &needed, &[]);
    let removable: HashSet<PathBuf> = pre_gc.remove.into_iter().collect();
    let mut report = Report::default();
    // Merges keep every needed view; they are not undone on a later
    // failure (docs/libvirt.md).
    let mut replaced: Vec<(PathBuf, PathBuf)> = Vec::new(); // (gone, now)
    let mut rechained: Vec<String> = Vec::new(); // disks whose chains changed
    for m in &merges {
        match m {
            Merge::Commit { top, base, disk } if live_chain_of(disk, top).is_some() => {
                rechained.push(disk.clone());
                let chain = live_chain_of(disk, top).unwrap_or_default();
                let t = chain.iter().position(|c| c == top).unwrap_or(0);
                crate::live::run_commit(&mut ctx, disk, &chain, t, t + 1, 0, hooks)?;
                // QEMU rebased the image above `top` in its chain; any
                // other image reading through `top` (not open in QEMU)
                // is rebased here, header only, as offline.
                let node = graph
                    .node(base)
                    .ok_or_else(|| Error::InvalidArgument("base vanished".into()))?;
                let base_str = path_str(base)?.to_string();
                for k in graph.children(top, &needed) {
                    if chain.contains(&k) {
                        continue;
                    }
                    set_backing(&k, &base_str, node.format)?;
                }
                report.merges.push(format!(
                    "committed {} into {} (libvirt's live block commit)",
                    top.display(),
                    base.display()
                ));
                replaced.push((top.clone(), base.clone()));
            }
            Merge::Pull { top, base, disk } if live_chain_of(disk, top).is_some() => {
                rechained.push(disk.clone());
                let chain = live_chain_of(disk, top).unwrap_or_default();
                let k = chain.iter().position(|c| c == base).map(|k| k + 1);
                let k = k.filter(|k| *k < chain.len());
                crate::live::run_pull(&mut ctx, disk, &chain, k, 0, hooks)?;
                report.merges.push(format!(
                    "pulled {} into {} (libvirt's live block pull)",
                    base.display(),
                    top.display()
                ));
            }
            Merge::Commit { top, base, disk } => {
                rechained.push(disk.clone());
                // What the commit did is in `report` below; its own report
                // adds nothing the caller sees.
                let _ = commit_guarded(top, base, &removable, hooks).map_err(|e| {
                    Error::MergeFailed {
                        op: format!("commit {} into {}", top.display(), base.display()),
                        state: format!(
                            "{} is unchanged; {} may be partly written, but only {} reads it and \
                         still reads the same; libvirt's metadata is unchanged: fix the cause \
                         and run the same delete again",
                            top.display(),
                            base.display(),
                            top.display()
                        ),
                        cause: Box::new(e),
                    }
                })?;
                let node = graph
                    .node(base)
                    .ok_or_else(|| Error::InvalidArgument("base vanished".into()))?;
                let base_str = path_str(base)?.to_string();
                for k in graph.children(top, &needed) {
                    set_backing(&k, &base_str, node.format)?;
                }
                report.merges.push(format!(
                    "committed {} into {}",
                    top.display(),
                    base.display()
                ));
                replaced.push((top.clone(), base.clone()));
            }
            Merge::Pull { top, base, disk } => {
                rechained.push(disk.clone());
                let below = graph.node(base).and_then(|n| n.backing.clone());
                let mut opts = PullOptions::default();
                opts.base = below.map(|b| b.0);
                let _ = strata_merge::pull(top, &opts, hooks).map_err(|e| Error::MergeFailed {
                    op: format!("pull {} into {}", base.display(), top.display()),
                    state: format!(
                        "{} may be partly written but reads the same; {} is unchanged; \
                         libvirt's metadata is unchanged: fix the cause and run the same delete \
                         again",
                        top.display(),
                        base.display()
                    ),
                    cause: Box::new(Error::Merge(e)),
                })?;
                report
                    .merges
                    .push(format!("pulled {} into {}", base.display(), top.display()));
            }
        }
    }

    // The new state of things (live jobs changed libvirt's definitions).
    if ctx.live.is_some() && !live_chains.is_empty() {
        ctx.refresh()?;
    }
    let ctx = ctx;
    let graph = Graph::load(&ctx.known_files())?;
    let swap = |p: PathBuf| -> PathBuf {
        replaced
            .iter()
            .find(|(gone, _)| *gone == p)
            .map(|(_, now)| now.clone())
            .unwrap_or(p)
    };
    let roots: Vec<PathBuf> = roots.into_iter().map(swap).collect();
    let needed = graph.closure(&roots);
    let Gc {
        remove: gc,
        kept: mut more_kept,
    } = garbage(&ctx, &graph, &needed, &[]);
    kept.append(&mut more_kept);

    // Snapshot metadata: the children get the deleted one's parent, and
    // any state that moved to another file is recorded there.
    let parent = snap.info.parent.clone();
    let mut redefs = Vec::new();
    for s in &ctx.snaps {
        if s.info.name == name {
            continue;
        }
        let mut tree = s.tree.clone();
        let mut changed = false;
        if s.info.parent.as_deref() == Some(name) {
            set_parent(&mut tree, parent.as_deref());
            changed = true;
        }
        for t in s.external_disks() {
            if let Some((f, fmt)) = s.state_file(&t) {
                let now = swap(canon(&f));
                if now != canon(&f) {
                    let fmt = graph
                        .node(&now)
                        .map(|n| n.format.name().to_string())
                        .or(fmt)
                        .unwrap_or_else(|| "qcow2".into());
                    xml::set_snapshot_state_file(&mut tree, &t, &now, &fmt)?;
                    changed = true;
                }
            }
        }
        // The chains of merged disks changed under their state files.
        for t in &rechained {
            changed |= xml::drop_snapshot_backing_store(&mut tree, t);
        }
        if changed {
            redefs.push((s.info.name.clone(), tree));
        }
    }
    let mut new_dom = ctx.xml.clone();
    xml::set_owned_files(&mut new_dom, &owned_minus(&ctx, &gc))?;
    for t in &rechained {
        xml::drop_backing_store(&mut new_dom, t);
    }
    let dom_changed = xml::write(&new_dom, "domain XML")? != xml::write(&ctx.xml, "domain XML")?;

    let mut txn = Txn::new(&ctx);
    let run = (|| -> Result<()> {
        txn.delete_snapshot_metadata(name)?;
        for (n, tree) in &redefs {
            txn.define_snapshot(tree, n, false)?;
        }
        if snap.current {
            if let Some(p) = &parent {
                let ps = ctx.snap(p)?;
                let tree = redefs
                    .iter()
                    .find(|r| &r.0 == p)
                    .map(|r| r.1.clone())
                    .unwrap_or_else(|| ps.tree.clone());
                txn.define_snapshot(&tree, p, true)?;
            }
        }
        if dom_changed {
            txn.define_domain(&new_dom)?;
        }
        Ok(())
    })();
    if let Err(e) = run {
        return Err(txn.rollback(e));
    }
    txn.finish()?;
    let (removed, warnings) = remove_files(&gc);
    report.removed = removed;
    report.warnings = warnings;
    report.kept = kept;
    report.snapshots_removed.push(name.to_string());
    Ok(report)
}

/// Sets (or removes) `<parent><name>` of a snapshot document.
pub(crate) fn set_parent(tree: &mut xmltree::Element, parent: Option<&str>) {
    use xmltree::{Element, XMLNode};
    let pos = tree
        .children
        .iter()
        .position(|n| n.as_element().is_some_and(|e| e.name == "parent"));
    match (pos, parent) {
        (Some(i), None) => {
            tree.children.remove(i);
        }
        (pos, Some(p)) => {
            let mut name = Element::new("name");
            name.children.push(XMLNode::Text(p.to_string()));
            let mut e = Element::new("parent");
            e.children.push(XMLNode::Element(name));
            match pos {
                Some(i) => tree.children[i] = XMLNode::Element(e),
                None => {
                    // After <state>, where libvirt puts it.
                    let at = tree
                        .children
                        .iter()
                        .position(|n| n.as_element().is_some_and(|e| e.name == "state"))
                        .map_or(0, |i| i + 1);
                    tree.children.insert(at, XMLNode::Element(e));
                }
            }
        }
        (None, None) => {}
    }
}
