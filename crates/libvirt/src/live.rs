//! Operations on a running (or paused) domain: libvirt's own live
//! snapshot and block jobs do the work (QEMU runs them), Strata plans them
//! with the same rules as offline and does the bookkeeping as offline
//! (its owned-file list, snapshot metadata, files nothing needs).
//!
//! After every live operation the persistent definition names the file
//! QEMU uses and carries no `<backingStore>` for the changed disk (libvirt
//! probes the chain from the image headers, which QEMU's chain matches).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use strata_image::ImageFormat;
use strata_merge::Hooks;
use virt::domain_snapshot::DomainSnapshot;
use virt::sys;
use xmltree::{Element, XMLNode};

use crate::ctx::{canon, path_str, remove_files, Ctx, Graph, Txn};
use crate::error::{Error, Result};
use crate::jobs::{self, Waited};
use crate::snapshot::{garbage, Gc, Report};
use crate::xml::{self, OwnedFile};

/// The chain of disk `target` as the live definition records it (the
/// source first, then each `<backingStore>`'s source), as libvirt spells
/// the paths.
pub(crate) fn live_chain(live: &Element, target: &str) -> Vec<PathBuf> {
    let Some(devices) = live.get_child("devices") else {
        return Vec::new();
    };
    let Some(disk) = devices
        .children
        .iter()
        .filter_map(XMLNode::as_element)
        .find(|d| {
            d.name == "disk"
                && d.get_child("target")
                    .and_then(|t| t.attributes.get("dev"))
                    .is_some_and(|t| t == target)
        })
    else {
        return Vec::new();
    };
    let mut v = Vec::new();
    let mut cur = Some(disk);
    while let Some(e) = cur {
        match e.get_child("source").and_then(|s| s.attributes.get("file")) {
            Some(f) => v.push(PathBuf::from(f)),
            None => break,
        }
        cur = e.get_child("backingStore");
    }
    v
}

/// The live spelling of the canonical `path` in disk `target`'s live chain.
fn live_name(ctx: &Ctx<'_>, target: &str, path: &Path) -> Result<String> {
    let live = ctx.live.as_ref().ok_or_else(|| not_running(ctx))?;
    let c = canon(path);
    let chain = live_chain(live, target);
    let p = chain.iter().find(|p| canon(p) == c).cloned().unwrap_or(c);
    Ok(path_str(&p)?.to_string())
}

fn not_running(ctx: &Ctx<'_>) -> Error {
    Error::InvalidArgument(format!("domain {:?} is not running any more", ctx.name))
}

/// Refuses a disk whose persistent definition and running QEMU disagree
/// on the active file (someone redefined the domain while it runs): a live
/// job would leave them disagreeing.
pub(crate) fn check_agree(ctx: &Ctx<'_>, target: &str) -> Result<()> {
    let live = ctx.live.as_ref().ok_or_else(|| not_running(ctx))?;
    let running = live_chain(live, target).first().map(|p| canon(p));
    let persistent = ctx
        .disks()
        .into_iter()
        .find(|d| d.target == target)
        .and_then(|d| d.source)
        .map(|p| canon(&p));
    if running != persistent {
        return Err(Error::Unsupported(format!(
            "domain {:?} disk {target}: the running domain uses {} but its persistent \
             definition names {}; Strata will not run a live job that would leave them \
             disagreeing (redefine the domain to match, or shut it down); nothing was changed",
            ctx.name,
            running.map_or("nothing".into(), |p| p.display().to_string()),
            persistent.map_or("nothing".into(), |p| p.display().to_string()),
        )));
    }
    Ok(())
}

/// Creates a disk-only external snapshot of the running domain through
/// libvirt (`virDomainSnapshotCreateXML` with DISK_ONLY | ATOMIC, and
/// QUIESCE when asked): libvirt creates the overlays and switches QEMU to
/// them. Then the overlays go into Strata's owned list and the changed
/// disks' `<backingStore>` out of the persistent definition.
pub(crate) fn snapshot_create(
    mut ctx: Ctx<'_>,
    name: &str,
    plan: &[(String, PathBuf)],
    quiesce: bool,
    description: Option<&str>,
) -> Result<Report> {
    for (t, _) in plan {
        check_agree(&ctx, t)?;
    }
    let live = ctx.live.clone().ok_or_else(|| not_running(&ctx))?;
    // Every disk of the running domain: the chosen ones external, the
    // others not snapshotted (as the offline snapshot records them).
    let mut root = Element::new("domainsnapshot");
    let text = |n: &str, t: &str| {
        let mut e = Element::new(n);
        e.children.push(XMLNode::Text(t.to_string()));
        XMLNode::Element(e)
    };
    root.children.push(text("name", name));
    if let Some(d) = description {
        root.children.push(text("description", d));
    }
    let mut disks = Element::new("disks");
    for d in xml::domain_disks(&live) {
        let mut e = Element::new("disk");
        e.attributes.insert("name".into(), d.target.clone());
        match plan.iter().find(|p| p.0 == d.target) {
            Some((_, overlay)) => {
                e.attributes.insert("snapshot".into(), "external".into());
                let mut drv = Element::new("driver");
                drv.attributes.insert("type".into(), "qcow2".into());
                e.children.push(XMLNode::Element(drv));
                let mut src = Element::new("source");
                src.attributes
                    .insert("file".into(), path_str(overlay)?.to_string());
                e.children.push(XMLNode::Element(src));
            }
            None => {
                e.attributes.insert("snapshot".into(), "no".into());
            }
        }
        disks.children.push(XMLNode::Element(e));
    }
    root.children.push(XMLNode::Element(disks));
    let snap_xml = xml::write(&root, "snapshot XML")?;
    let mut flags =
        sys::VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY | sys::VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC;
    if quiesce {
        flags |= sys::VIR_DOMAIN_SNAPSHOT_CREATE_QUIESCE;
    }
    crate::testing::fail_point("live_snapshot")?;
    let state = ctx.state_name();
    DomainSnapshot::create_xml(&ctx.dom, &snap_xml, flags).map_err(|e| {
        if quiesce {
            Error::Unsupported(format!(
                "--quiesce: the guest agent of domain {:?} ({state}) could not freeze its file \
                 systems: libvirt: {} (quiescing needs the domain running, not paused, a \
                 <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel> \
                 in the domain and qemu-guest-agent running in the guest); nothing was changed \
                 (the snapshot is atomic); run it without --quiesce for a crash-consistent \
                 snapshot",
                ctx.name,
                e.message()
            ))
        } else {
            Error::libvirt(format!("create live snapshot {name}"), e)
        }
    })?;
    // libvirt switched the disks and recorded the snapshot; now Strata's
    // records, from the definition libvirt just wrote.
    ctx.refresh()?;
    let mut owned = ctx.owned();
    for (t, o) in plan {
        owned.push(OwnedFile {
            disk: t.clone(),
            path: o.clone(),
        });
    }
    let targets: Vec<String> = plan.iter().map(|p| p.0.clone()).collect();
    finish_domain(&ctx, &owned, &targets)?;
    let mut report = Report::default();
    for (t, o) in plan {
        report.created.push(o.clone());
        report.swapped.push((t.clone(), o.clone()));
    }
    Ok(report)
}

/// Redefines the persistent definition (as libvirt has it now) with
/// Strata's owned list `owned` and without `<backingStore>` on `targets`,
/// when that changes anything. Not undone on failure: the live job it
/// follows is not either; the error says so.
pub(crate) fn finish_domain(ctx: &Ctx<'_>, owned: &[OwnedFile], targets: &[String]) -> Result<()> {
    let mut new_dom = ctx.xml.clone();
    xml::set_owned_files(&mut new_dom, owned)?;
    for t in targets {
        xml::drop_backing_store(&mut new_dom, t);
    }
    if xml::write(&new_dom, "domain XML")? != xml::write(&ctx.xml, "domain XML")? {
        let text = xml::write(&new_dom, "domain XML")?;
        crate::testing::fail_point("define_domain")?;
        virt::domain::Domain::define_xml(ctx.conn, &text)
            .map_err(|e| Error::libvirt("define domain (after the live job)", e))?;
    }
    Ok(())
}

/// Waits (a few seconds at most) until libvirt's live definition shows
/// `want` as the active file of `target` (libvirt updates it when it has
/// processed the job's completion).
fn wait_live_source(ctx: &mut Ctx<'_>, target: &str, want: &Path) -> Result<()> {
    let t0 = Instant::now();
    loop {
        ctx.refresh()?;
        let now = ctx
            .live
            .as_ref()
            .and_then(|l| live_chain(l, target).first().map(|p| canon(p)));
        if now.as_deref() == Some(&canon(want)) {
            return Ok(());
        }
        if t0.elapsed() > Duration::from_secs(10) {
            return Err(Error::InvalidArgument(format!(
                "after the block job, libvirt's live definition of disk {target} names {} \
                 instead of {}",
                now.map_or("nothing".into(), |p| p.display().to_string()),
                want.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until libvirt's live chain of `target` has `len` files.
fn wait_live_chain_len(ctx: &mut Ctx<'_>, target: &str, len: usize) -> Result<()> {
    let t0 = Instant::now();
    loop {
        ctx.refresh()?;
        let n = ctx.live.as_ref().map_or(0, |l| live_chain(l, target).len());
        if n == len || t0.elapsed() > Duration::from_secs(10) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A live commit of `chain[top..base]` into `chain[base]` of disk `target`
/// (`chain`: canonical paths, active first). An active commit (`top ==
/// 0`) is pivoted to the base when ready.
pub(crate) fn run_commit(
    ctx: &mut Ctx<'_>,
    target: &str,
    chain: &[PathBuf],
    top: usize,
    base: usize,
    bandwidth: u64,
    hooks: &mut Hooks<'_>,
) -> Result<()> {
    let base_name = live_name(ctx, target, &chain[base])?;
    let top_name = if top == 0 {
        None
    } else {
        Some(live_name(ctx, target, &chain[top])?)
    };
    jobs::start_commit(
        &ctx.dom,
        target,
        &base_name,
        top_name.as_deref(),
        bandwidth,
        top == 0,
    )?;
    match jobs::wait(&ctx.dom, target, top == 0, hooks)? {
        Waited::Ready => {
            jobs::pivot(&ctx.dom, target)?;
            wait_live_source(ctx, target, &chain[base])?;
        }
        Waited::Finished => {
            wait_live_chain_len(ctx, target, chain.len() - (base - top))?;
        }
    }
    Ok(())
}

/// A live pull into the active image of `target`, of every backing file
/// (`base` `None`) or of those above `base`.
pub(crate) fn run_pull(
    ctx: &mut Ctx<'_>,
    target: &str,
    chain: &[PathBuf],
    base: Option<usize>,
    bandwidth: u64,
    hooks: &mut Hooks<'_>,
) -> Result<()> {
    let base_name = match base {
        Some(k) => Some(live_name(ctx, target, &chain[k])?),
        None => None,
    };
    jobs::start_pull(&ctx.dom, target, base_name.as_deref(), bandwidth)?;
    jobs::wait(&ctx.dom, target, false, hooks)?;
    wait_live_chain_len(ctx, target, base.map_or(1, |k| 1 + chain.len() - k))?;
    Ok(())
}

/// What [`after_jobs`] did: (files removed, files kept with why, warnings).
pub(crate) type AfterJobs = (Vec<PathBuf>, Vec<(PathBuf, String)>, Vec<String>);

/// The bookkeeping after live jobs changed disk `target`'s chain: files
/// owned and not needed any more are removed (as offline), the owned list
/// and `<backingStore>` of the persistent definition updated, stale
/// `<backingStore>` dropped from the snapshots' saved definitions.
pub(crate) fn after_jobs(
    ctx: &Ctx<'_>,
    targets: &[String],
    drop_snaps: &[String],
    extra_remove: &[PathBuf],
) -> Result<AfterJobs> {
    let graph = Graph::load(&ctx.known_files())?;
    let except: Vec<&str> = drop_snaps.iter().map(String::as_str).collect();
    let mut roots = ctx.state_roots(&except);
    roots.extend(ctx.actives().into_iter().map(|a| a.1));
    let needed = graph.closure(&roots);
    let Gc { mut remove, kept } = garbage(ctx, &graph, &needed, &[]);
    let (kept, extra): (Vec<_>, Vec<_>) = kept
        .into_iter()
        .partition(|(f, why)| !(extra_remove.contains(f) && why.contains("did not create")));
    remove.extend(extra.into_iter().map(|e| e.0));
    let gone: HashSet<PathBuf> = remove.iter().cloned().collect();
    let owned: Vec<OwnedFile> = ctx
        .owned()
        .into_iter()
        .filter(|o| !gone.contains(&canon(&o.path)))
        .collect();
    let mut txn = Txn::new(ctx);
    let run = (|| -> Result<()> {
        for n in drop_snaps.iter().rev() {
            txn.delete_snapshot_metadata(n)?;
        }
        if let Some(cur) = ctx.current() {
            if drop_snaps.contains(&cur.info.name) {
                let mut p = cur.info.parent.clone();
                while let Some(name) = p {
                    if !drop_snaps.contains(&name) {
                        let s = ctx.snap(&name)?;
                        txn.define_snapshot(&s.tree, &name, true)?;
                        break;
                    }
                    p = ctx.snap(&name)?.info.parent.clone();
                }
            }
        }
        for s in &ctx.snaps {
            if drop_snaps.contains(&s.info.name) {
                continue;
            }
            let mut tree = s.tree.clone();
            let mut changed = false;
            // A child of a dropped snapshot gets its nearest surviving
            // ancestor (libvirt re-parented it already; the redefinition
            // below must say the same).
            let mut parent = s.info.parent.clone();
            while let Some(p) = parent.as_ref().filter(|p| drop_snaps.contains(p)) {
                parent = ctx.snap(p)?.info.parent.clone();
            }
            if parent != s.info.parent {
                crate::snapshot::set_parent(&mut tree, parent.as_deref());
                changed = true;
            }
            for t in targets {
                changed |= xml::drop_snapshot_backing_store(&mut tree, t);
            }
            if changed {
                txn.define_snapshot(&tree, &s.info.name, s.current)?;
            }
        }
        Ok(())
    })();
    let after = |e: Error| Error::MergeFailed {
        op: "the bookkeeping after libvirt's live job".into(),
        state: "the job itself completed and QEMU uses the new chain; libvirt's snapshot \
                metadata was put back as before, so it may still list snapshots whose state \
                the job overwrote (remove those with strata snapshot delete --metadata)"
            .into(),
        cause: Box::new(e),
    };
    if let Err(e) = run {
        return Err(after(txn.rollback(e)));
    }
    txn.finish().map_err(after)?;
    finish_domain(ctx, &owned, targets).map_err(after)?;
    let (removed, warnings) = remove_files(&remove);
    Ok((removed, kept, warnings))
}

/// Whether `p` is in disk `target`'s live chain (QEMU has it open).
pub(crate) fn in_live_chain(ctx: &Ctx<'_>, target: &str, p: &Path) -> bool {
    let c = canon(p);
    ctx.live
        .as_ref()
        .is_some_and(|l| live_chain(l, target).iter().any(|x| canon(x) == c))
}

/// The canonical chain of `target`'s active file from the image headers,
/// checked against libvirt's live chain.
pub(crate) fn checked_chain(
    ctx: &Ctx<'_>,
    target: &str,
    headers: &[(PathBuf, ImageFormat)],
) -> Result<Vec<PathBuf>> {
    check_agree(ctx, target)?;
    let live = ctx.live.as_ref().ok_or_else(|| not_running(ctx))?;
    let lc: Vec<PathBuf> = live_chain(live, target).iter().map(|p| canon(p)).collect();
    let hc: Vec<PathBuf> = headers.iter().map(|h| h.0.clone()).collect();
    // libvirt may not record the whole chain; what it records must agree.
    if lc.len() > 1 && lc != hc {
        return Err(Error::Unsupported(format!(
            "domain {:?} disk {target}: QEMU's chain as libvirt records it ({}) is not the \
             chain the image headers describe ({}); nothing was changed",
            ctx.name,
            lc.iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(" -> "),
            hc.iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(" -> "),
        )));
    }
    Ok(hc)
}
