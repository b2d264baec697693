//! Repairs: `check -r leaks`, `check -r all`, and the refcount rebuild a
//! dirty image (lazy refcounts) needs before its first write.
//!
//! A rebuild writes complete new refcount structures (blocks and table)
//! past the end of everything in use, syncs them, and only then switches
//! the header to them, so a crash at any point leaves either the old or
//! the new structures in force. The old structures become unreferenced
//! (their clusters count zero in the new ones).

use strata_format::header::{Autoclear, Incompatible};
use strata_format::refcount::{self, REFTABLE_OFFSET_MASK};
use strata_format::table::{decode_u64_table, encode_u64_table, OFFSET_MASK, OFLAG_ZERO};
use strata_format::{HostOffset, L1Entry, L2Entry};

use crate::check::{self, CheckReport};
use crate::error::{Error, Result};
use crate::qcow2::alloc::Refcounts;
use crate::qcow2::{Qcow2Image, WritableImage};

/// What `check -r` repairs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepairMode {
    /// `-r leaks`: lower refcounts that exceed the references.
    Leaks,
    /// `-r all`: rebuild every refcount from the references and fix the
    /// COPIED flags of the active tables.
    All,
}

/// The result of a repair: the check before, and the check after.
#[derive(Debug)]
#[must_use = "the report says whether the repair left the image clean"]
pub struct RepairReport {
    /// What the check found before repairing.
    pub before: CheckReport,
    /// What the check finds afterwards.
    pub after: CheckReport,
    /// Leaked clusters released.
    pub leaks_fixed: u64,
    /// Corruptions fixed (refcounts raised, COPIED flags corrected).
    pub corruptions_fixed: u64,
}

/// Checks `img` and repairs what `mode` covers, then checks again.
pub fn repair(img: &mut Qcow2Image, mode: RepairMode) -> Result<RepairReport> {
    let path = img.path().to_path_buf();
    match img.writable() {
        Ok(img) => repair_writable(img, mode),
        Err(_) => Err(Error::ReadOnly {
            path,
            why: "repairs need the image open for writing".into(),
        }),
    }
}

fn repair_writable(img: &mut WritableImage, mode: RepairMode) -> Result<RepairReport> {
    img.flush()?;
    // A dirty image's refcounts are stale: lowering the ones above the
    // references cannot fix them. qemu-img check -r leaks fails there
    // ("need to rebuild refcount structures"); so does Strata (039).
    if mode == RepairMode::Leaks && img.view.header().dirty() {
        return Err(Error::Unsupported {
            path: img.view.path().to_path_buf(),
            what: "the image is dirty (lazy refcounts): its refcount structures need a \
                   rebuild, which `check -r all` does"
                .into(),
        });
    }
    // As QEMU opening an image read-write: autoclear bits it does not
    // know are cleared (iotest 036). Known ones (bitmaps, raw external
    // data) are left to the code that maintains what they protect.
    let known = Autoclear::BITMAPS | Autoclear::DATA_FILE_RAW;
    if !(img.view.header().autoclear_features() & !known).is_empty() {
        let v = img.view.header().autoclear_features() & known;
        img.view.header_mut().set_autoclear(v);
        img.write_header()?;
        img.sync()?;
    }
    let before = check::check_view(&img.view)?;
    let (mut leaks_fixed, mut corruptions_fixed) = (0, 0);
    let needs = match mode {
        RepairMode::Leaks => before.leaks > 0 || only_copied_flags(&before),
        // A refcount overflow alone (more references than the width
        // counts) is nothing a rebuild can fix: QEMU reports it, says to
        // widen the refcounts with amend and changes nothing (iotest 112,
        // "too many references for check").
        RepairMode::All => {
            (!before.is_clean() && !only_overflows(&before))
                || img.view.header().dirty()
                || img.view.header().corrupt()
        }
    };
    // Leaks (and the COPIED flags they make wrong) are fixed in place by
    // QEMU's -r all too: its rebuild is for refcount errors.
    let mode = if mode == RepairMode::All && leaks_only(&before) && !header_flagged(img) {
        RepairMode::Leaks
    } else {
        mode
    };
    if needs {
        match mode {
            RepairMode::Leaks => {
                leaks_fixed = fix_leaks(img)?;
                // As QEMU's check_oflag_copied under -r leaks: COPIED
                // flags are repaired when the refcounts are otherwise
                // right (a leak fixed may have brought a refcount to one;
                // iotest 112).
                let mid = check::check_view(&img.view)?;
                if only_copied_flags(&mid) {
                    corruptions_fixed = fix_copied_flags(img)?;
                }
            }
            RepairMode::All => {
                fix_misaligned_zero_clusters(img)?;
                rebuild_refcounts_of(img)?;
                corruptions_fixed = fix_copied_flags(img)?;
                img.flush()?;
                let mid = check::check_view(&img.view)?;
                leaks_fixed = before.leaks.saturating_sub(mid.leaks);
                corruptions_fixed += before
                    .corruptions
                    .saturating_sub(mid.corruptions)
                    .saturating_sub(corruptions_fixed);
                corruptions_fixed = corruptions_fixed.min(before.corruptions);
            }
        }
    }
    let mut after = check::check_view(&img.view)?;
    let flags = Incompatible::CORRUPT | Incompatible::DIRTY;
    if img.view.header().incompatible_features().intersects(flags)
        && after.corruptions == 0
        && after.check_errors == 0
    {
        // As QEMU after a repair that left no corruption: the image is
        // clean (refcounts rebuilt: no longer dirty) and consistent (not
        // corrupt) again; iotests 039, 060, 061.
        let v = img.view.header().incompatible_features() & !flags;
        img.view.header_mut().set_incompatible(v);
        img.write_header()?;
        img.sync()?;
        after = check::check_view(&img.view)?;
    }
    Ok(RepairReport {
        before,
        after,
        leaks_fixed,
        corruptions_fixed,
    })
}

/// Whether `r` found leaks and no other problem than COPIED flags (which
/// a leak's refcount makes wrong).
fn leaks_only(r: &CheckReport) -> bool {
    r.leaks > 0
        && r.check_errors == 0
        && r.problems_omitted == 0
        && r.problems.iter().all(|p| {
            p.message.starts_with("Leaked cluster ") || p.message.starts_with("ERROR OFLAG_COPIED")
        })
}

/// Whether the header says dirty or corrupt (a rebuild's business).
fn header_flagged(img: &WritableImage) -> bool {
    img.view.header().dirty() || img.view.header().corrupt()
}

/// Whether the only problems of `r` are COPIED flags that disagree with
/// the refcounts (no leaks, no other corruption, no check error): then
/// the refcounts can be trusted to fix them, even under `-r leaks`.
fn only_overflows(r: &CheckReport) -> bool {
    r.leaks == 0
        && r.check_errors == 0
        && r.corruptions > 0
        && r.problems_omitted == 0
        && r.problems
            .iter()
            .all(|p| p.message.starts_with("ERROR: overflow"))
}

fn only_copied_flags(r: &CheckReport) -> bool {
    r.leaks == 0
        && r.check_errors == 0
        && r.corruptions > 0
        && r.problems_omitted == 0
        && r.problems
            .iter()
            .all(|p| p.message.starts_with("ERROR OFLAG_COPIED"))
}

/// Lowers every refcount that exceeds the references to the referenced
/// count. Returns the number of clusters changed.
fn fix_leaks(img: &mut WritableImage) -> Result<u64> {
    let expected = check::compute_refcounts_view(&img.view)?;
    let per = refcount::entries_per_block(
        img.view.geometry().cluster_bits(),
        img.view.header().refcount_order(),
    );
    let ws = &mut img.w;
    let mut fixed = 0;
    // The clusters `check` compares (QEMU's nb_clusters), not every
    // cluster the refcount table could cover: with 1-bit refcounts one
    // table cluster covers 2^32 clusters, and walking them all took a
    // minute where QEMU takes milliseconds (iotest 112).
    let covered = (ws.refcount_table().len() as u64)
        .saturating_mul(per)
        .min(expected.len() as u64);
    for ci in 0..covered {
        let want = expected.get(ci as usize).copied().unwrap_or(0);
        let have = ws.refcount(ci)?;
        if have > want {
            ws.set_refcount(ci, want)?;
            fixed += 1;
        }
    }
    img.barrier()?;
    Ok(fixed)
}

/// Recomputes every refcount from the references and writes new refcount
/// structures; the header is switched to them (and written, with any
/// change the caller made to it in memory) once they are durable.
pub fn rebuild_refcounts(img: &mut Qcow2Image) -> Result<()> {
    img.writable()?.rebuild_refcounts()
}

/// [`rebuild_refcounts`] of a writable image.
pub(crate) fn rebuild_refcounts_of(img: &mut WritableImage) -> Result<()> {
    let geo = img.view.geometry();
    let cb = geo.cluster_bits();
    let cs = geo.cluster_size();
    let order = img.view.header().refcount_order();
    let per = refcount::entries_per_block(cb, order);
    let mut refs = check::compute_refcounts_view(&img.view)?;
    // The old refcount structures are not kept: drop their references.
    let old_table = read_table(img)?;
    let sub = |refs: &mut Vec<u64>, ci: u64| {
        if let Some(r) = usize::try_from(ci).ok().and_then(|i| refs.get_mut(i)) {
            *r = r.saturating_sub(1);
        }
    };
    let t0 = geo.cluster_index(HostOffset::new(img.view.header().refcount_table_offset()));
    for ci in t0..t0 + u64::from(img.view.header().refcount_table_clusters()) {
        sub(&mut refs, ci);
    }
    for e in &old_table {
        let off = e & REFTABLE_OFFSET_MASK;
        if off != 0 && geo.is_aligned(off) {
            sub(&mut refs, geo.cluster_index(HostOffset::new(off)));
        }
    }
    let max = refcount::max_refcount(order);
    if let Some(ci) = refs.iter().position(|r| *r > max) {
        return Err(Error::Unsupported {
            path: img.view.path().to_path_buf(),
            what: format!(
                "cluster {ci} has more references than {}-bit refcounts can count",
                1u32 << order
            ),
        });
    }
    // New structures after the last referenced cluster and the file end.
    let file_clusters = img
        .view
        .storage()
        .len()
        .map_err(|e| Error::io(img.view.path(), "stat", 0, e))
        .map(|len| geo.clusters_for(len))?;
    let used = refs
        .iter()
        .rposition(|r| *r != 0)
        .map_or(0, |i| i as u64 + 1);
    let start = used.max(file_clusters);
    let (mut k, mut t) = (0u64, 1u64);
    loop {
        let end = start + k + t;
        let nk = end.div_ceil(per);
        let nt = (nk * 8).div_ceil(cs).max(1);
        if nk == k && nt == t {
            break;
        }
        (k, t) = (nk, nt);
    }
    if t * cs > strata_format::limits::MAX_REFTABLE_BYTES {
        return Err(Error::Unsupported {
            path: img.view.path().to_path_buf(),
            what: "refcount table would exceed its size limit".into(),
        });
    }
    let blocks_at = start;
    let table_at = start + k;
    refs.resize((start + k + t) as usize, 0);
    for ci in start..start + k + t {
        refs[ci as usize] = 1;
    }
    // Every block gets a slot, so that the layout stays simple.
    let blocks: Vec<u64> = (blocks_at..blocks_at + k).collect();
    install_refcounts(img, &refs, &blocks, table_at, t)
}

/// Writes new refcount structures and switches the image to them: block
/// `i` (covering clusters `i * per ..`) at cluster `blocks[i]`, holding
/// `refs`, and a table of `table_clusters` clusters at cluster `table_at`
/// naming them. Both are made durable before the header names them (one
/// header write, with any change the caller made to the header in
/// memory), which is made durable in turn; then the allocator and the
/// overlap map are reloaded from the new structures. `refs` must already
/// count the new structures themselves.
pub(crate) fn install_refcounts(
    img: &mut WritableImage,
    refs: &[u64],
    blocks: &[u64],
    table_at: u64,
    table_clusters: u64,
) -> Result<()> {
    let geo = img.view.geometry();
    let cs = geo.cluster_size();
    let order = img.view.header().refcount_order();
    let per = refcount::entries_per_block(geo.cluster_bits(), order);
    let mut table = vec![0u64; (geo.clusters_bytes(table_clusters) / 8) as usize];
    let mut block = vec![0u8; cs as usize];
    for (bi, &at) in blocks.iter().enumerate() {
        block.fill(0);
        for j in 0..per {
            let r = refs
                .get((bi as u64 * per + j) as usize)
                .copied()
                .unwrap_or(0);
            if r != 0 {
                refcount::set(&mut block, order, j, r);
            }
        }
        let at = geo.cluster_start(at).get();
        img.w.write_metadata(&block, at, "write refcount block")?;
        table[bi] = at;
    }
    let table_at = geo.cluster_start(table_at).get();
    img.w
        .write_metadata(&encode_u64_table(&table), table_at, "write refcount table")?;
    img.sync()?;
    img.view
        .header_mut()
        .set_refcount_table(table_at, table_clusters as u32);
    img.write_header()?;
    img.sync()?;
    // Reload the allocator's view of the new structures.
    let len = img
        .view
        .storage()
        .len()
        .map_err(|e| Error::io(img.view.path(), "stat", 0, e))?;
    let fresh = Refcounts::load(
        img.view.storage(),
        img.view.path(),
        len,
        geo,
        order,
        table_at,
        table_clusters as u32,
    )?;
    img.w.replace_refcounts(fresh);
    // The old structures are free now; the overlap check must know.
    img.load_metadata_map()
}

fn read_table(img: &WritableImage) -> Result<Vec<u64>> {
    let geo = img.view.geometry();
    let bytes = geo.clusters_bytes(u64::from(img.view.header().refcount_table_clusters())) as usize;
    let mut raw = vec![0u8; bytes];
    img.view
        .storage()
        .read_at(&mut raw, img.view.header().refcount_table_offset())
        .map_err(|e| {
            Error::io(
                img.view.path(),
                "read refcount table",
                img.view.header().refcount_table_offset(),
                e,
            )
        })?;
    Ok(decode_u64_table(&raw))
}

/// QEMU's `fix_l2_entry_by_zero` under `check -r all`: a preallocated
/// zero cluster (no data) whose host offset is not cluster-aligned becomes
/// a plain zero cluster (extended L2: every allocated subcluster zero, no
/// host cluster), in the active and the snapshots' L2 tables, before the
/// refcounts are rebuilt (so the bogus offset is not counted; iotest 060).
/// Returns the number of entries changed.
fn fix_misaligned_zero_clusters(img: &mut WritableImage) -> Result<u64> {
    let geo = img.view.geometry();
    let cs = geo.cluster_size();
    let file_len = img
        .view
        .storage()
        .len()
        .map_err(|e| Error::io(img.view.path(), "stat", 0, e))?;
    // Every L2 table of every L1 table, each once.
    let mut l1s = vec![img.view.l1().to_vec()];
    for sn in img.view.snapshots() {
        let bytes = u64::from(sn.l1_size) * 8;
        let inside = sn
            .l1_table_offset
            .checked_add(bytes)
            .is_some_and(|e| e <= file_len);
        if !sn.l1_size_is_valid() || !geo.is_aligned(sn.l1_table_offset) || !inside {
            continue;
        }
        let mut raw = vec![0u8; bytes as usize];
        img.view
            .storage()
            .read_at(&mut raw, sn.l1_table_offset)
            .map_err(|e| {
                Error::io(
                    img.view.path(),
                    "read snapshot L1 table",
                    sn.l1_table_offset,
                    e,
                )
            })?;
        l1s.push(decode_u64_table(&raw));
    }
    let mut seen = std::collections::BTreeSet::new();
    let mut fixed = 0;
    for l1 in l1s {
        for e in l1 {
            let Some(l2) = L1Entry(e).l2_offset() else {
                continue;
            };
            if !geo.is_aligned(l2.get())
                || l2.get().saturating_add(cs) > file_len
                || !seen.insert(l2.get())
            {
                continue;
            }
            let mut table = img.l2_table(l2.get())?.as_ref().clone();
            let mut changed = false;
            for idx in 0..geo.l2_entries() {
                let mut entry =
                    L2Entry::read(&table, geo, idx).map_err(|source| Error::Format {
                        path: img.view.path().to_path_buf(),
                        source,
                    })?;
                let host = entry.word & OFFSET_MASK;
                if entry.compressed() || host == 0 || geo.is_aligned(host) {
                    continue;
                }
                let alloc_bits = entry.bitmap & 0xffff_ffff;
                let contains_data = if geo.extended_l2() {
                    alloc_bits != 0
                } else {
                    entry.word & OFLAG_ZERO == 0
                };
                if contains_data {
                    continue;
                }
                entry = if geo.extended_l2() {
                    L2Entry::default().with_subclusters(0, entry.zero_bits() | alloc_bits as u32)
                } else {
                    L2Entry::zero()
                };
                entry
                    .write(&mut table, geo, idx)
                    .map_err(|source| Error::Format {
                        path: img.view.path().to_path_buf(),
                        source,
                    })?;
                changed = true;
                fixed += 1;
            }
            if changed {
                img.write_l2_table(l2.get(), table)?;
            }
        }
    }
    if fixed > 0 {
        img.sync()?;
    }
    Ok(fixed)
}

/// Sets COPIED on active L1 and L2 entries exactly where the refcount is
/// one. Returns the number of entries changed.
fn fix_copied_flags(img: &mut WritableImage) -> Result<u64> {
    let geo = img.view.geometry();
    let path = img.view.path().to_path_buf();
    let mut fixed = 0;
    for i in 0..img.view.l1().len() {
        let e = L1Entry(img.view.l1()[i]);
        let Some(l2) = e.l2_offset() else { continue };
        let rc = refcount_of(img, geo.cluster_index(l2))?;
        let want = rc == 1;
        if want != e.copied() {
            let v = L1Entry::new(l2, want).0;
            img.view.l1_mut()[i] = v;
            img.w.write_metadata(
                &v.to_be_bytes(),
                img.view.header().l1_table_offset() + 8 * i as u64,
                "write L1 entry",
            )?;
            fixed += 1;
        }
        let mut table = img.l2_table(l2.get())?.as_ref().clone();
        let mut changed = false;
        for idx in 0..geo.l2_entries() {
            let mut entry = L2Entry::read(&table, geo, idx).map_err(|source| Error::Format {
                path: path.clone(),
                source,
            })?;
            if entry.compressed() {
                continue;
            }
            let Some(h) = entry.host_cluster() else {
                continue;
            };
            // Clusters of an external data file are unrefcounted and
            // always COPIED (QEMU counts them as referenced once).
            let want =
                img.view.data_file().is_some() || refcount_of(img, geo.cluster_index(h))? == 1;
            if want != entry.copied() {
                entry = entry.with_copied(want);
                entry
                    .write(&mut table, geo, idx)
                    .map_err(|source| Error::Format {
                        path: path.clone(),
                        source,
                    })?;
                changed = true;
                fixed += 1;
            }
        }
        if changed {
            img.write_l2_table(l2.get(), table)?;
        }
    }
    img.sync()?;
    Ok(fixed)
}

fn refcount_of(img: &mut WritableImage, ci: u64) -> Result<u64> {
    img.w.refcount(ci)
}
