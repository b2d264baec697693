//! `amend`: change a qcow2 image's format options in place, as
//! `qemu-img amend -o compat=0.10|1.1,lazy_refcounts=on|off,refcount_bits=N`
//! does (QEMU's `qcow2_amend_options`).
//!
//! The operations run in QEMU's order: upgrade to version 3, change the
//! refcount width, lazy refcounts on or off, resize, downgrade to version
//! 2. Unlike QEMU, every refusal that can be known in advance (a v2 image
//! cannot have lazy refcounts, refcounts other than 16 bits, extended L2
//! entries, zstd-compressed clusters, ...) is checked before anything is
//! written, so a refused amend leaves the file as it was; the first
//! refusal reported is the one QEMU reports, with QEMU's words.
//!
//! A dirty image (lazy refcounts in use) is repaired first, as QEMU
//! repairs it when it opens it for writing. Each operation is crash-safe
//! (docs/crash-consistency.md, "Amend"):
//!
//! - **Upgrade** (0.10 -> 1.1): snapshot table entries without the v3
//!   extra data are rewritten to new clusters (synced) before one header
//!   write switches to version 3 and to the new table; the old table is
//!   freed afterwards.
//! - **Refcount width**: complete new refcount structures at the new
//!   width are written past everything in use and synced, then one header
//!   write switches the width and the table; the old structures count
//!   zero in the new ones.
//! - **Lazy refcounts**: one header write.
//! - **Downgrade** (1.1 -> 0.10): zero clusters are expanded first (the
//!   active and every snapshot's L2 tables): zeros are written to the
//!   clusters that will hold them and synced with their refcounts before
//!   each L2 table entry is changed; then one header write switches to
//!   version 2 (72-byte header, no feature bits, no feature table).
//!   Persistent bitmaps, which v2 cannot have, are dropped as QEMU drops
//!   them, but their clusters are freed (QEMU leaks them).

use std::path::Path;

use strata_format::header::{
    Autoclear, Compatible, CompressionType, Extension, FeatureKind, FeatureName, Incompatible,
};
use strata_format::refcount;
use strata_format::table::OFLAG_ZERO;
use strata_format::HostOffset;
use strata_format::{L1Entry, L2Entry, SubclusterState};

use crate::chain::{Chain, Image, OpenOptions};
use crate::error::{Error, Result};
use crate::qcow2::alloc::Meta;
use crate::qcow2::WritableImage;
use crate::resize::{resize_chain, ResizePrealloc};

/// `compat=`: the qcow2 version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compat {
    /// `0.10` (or `v2`): version 2.
    V2,
    /// `1.1` (or `v3`): version 3.
    V3,
}

impl Compat {
    /// Parses qemu-img's spellings: `0.10`, `v2`, `1.1`, `v3`.
    pub fn parse(s: &str) -> Option<Compat> {
        match s {
            "0.10" | "v2" => Some(Compat::V2),
            "1.1" | "v3" => Some(Compat::V3),
            _ => None,
        }
    }

    fn version(self) -> u32 {
        match self {
            Compat::V2 => 2,
            Compat::V3 => 3,
        }
    }
}

/// What to change; `None` keeps the image's current value.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AmendOptions {
    /// `compat=`.
    pub compat: Option<Compat>,
    /// `lazy_refcounts=on|off`.
    pub lazy_refcounts: Option<bool>,
    /// `refcount_bits=N` (a power of two, 1 to 64).
    pub refcount_bits: Option<u32>,
    /// `size=`: the new virtual size (as `strata resize`, shrinking
    /// allowed, as QEMU's amend allows it).
    pub size: Option<u64>,
    /// `backing_file=`: must name the current backing file (QEMU refuses
    /// to change it here: that is `rebase`).
    pub backing_file: Option<String>,
    /// `backing_fmt=`: likewise.
    pub backing_fmt: Option<String>,
}

impl AmendOptions {
    /// Whether no option was given.
    pub fn is_empty(&self) -> bool {
        *self == AmendOptions::default()
    }
}

/// Why an amend was refused, before anything was written. The messages
/// are qemu-img's.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum AmendRefusal {
    /// `refcount_bits` is not a power of two from 1 to 64.
    RefcountWidthInvalid,
    /// A refcount width other than 16 asked of a version 2 image.
    RefcountWidthNeedsV3,
    /// A cluster's refcount does not fit the narrower width.
    RefcountTooLarge {
        /// The new width.
        bits: u32,
        /// Host offset of the cluster.
        offset: u64,
        /// Its refcount.
        refcount: u64,
    },
    /// `backing_file`/`backing_fmt` differ from the image's.
    BackingFile,
    /// Lazy refcounts asked of a version 2 image.
    LazyRefcountsNeedV3,
    /// A downgrade of an image whose refcounts are not 16 bits wide.
    DowngradeRefcountBits,
    /// A downgrade of an image with internal snapshots v2 cannot
    /// describe (another disk size, or a VM state over 4 GiB).
    DowngradeSnapshots,
    /// A downgrade of an image with incompatible features v2 has no room
    /// for (extended L2 entries, ...).
    DowngradeIncompatible(u64),
    /// A downgrade of an image with zstd-compressed clusters.
    DowngradeZstd,
    /// The `size` change is refused (as by `strata resize`).
    Resize(String),
}

impl AmendRefusal {
    /// qemu-img's message.
    pub fn message(&self) -> String {
        match self {
            AmendRefusal::RefcountWidthInvalid => {
                "Refcount width must be a power of two and may not exceed 64 bits".into()
            }
            AmendRefusal::RefcountWidthNeedsV3 => {
                "Refcount widths other than 16 bits require compatibility level 1.1 or above \
                 (use compat=1.1 or greater)"
                    .into()
            }
            AmendRefusal::RefcountTooLarge {
                bits,
                offset,
                refcount,
            } => format!(
                "Cannot decrease refcount entry width to {bits} bits: Cluster at offset \
                 {offset:#x} has a refcount of {refcount}"
            ),
            AmendRefusal::BackingFile => "Cannot amend the backing file (use `strata rebase` \
                                          instead)"
                .into(),
            AmendRefusal::LazyRefcountsNeedV3 => {
                "Lazy refcounts only supported with compatibility level 1.1 and above \
                 (use compat=1.1 or greater)"
                    .into()
            }
            AmendRefusal::DowngradeRefcountBits => "compat=0.10 requires refcount_bits=16".into(),
            AmendRefusal::DowngradeSnapshots => {
                "Internal snapshots prevent downgrade of image".into()
            }
            AmendRefusal::DowngradeIncompatible(bits) => {
                format!("Cannot downgrade an image with incompatible features {bits:#x} set")
            }
            AmendRefusal::DowngradeZstd => "Cannot downgrade an image with zstd compression \
                                            type and existing compressed clusters"
                .into(),
            AmendRefusal::Resize(m) => m.clone(),
        }
    }
}

/// What an amend did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
#[must_use]
pub struct AmendReport {
    /// The image was dirty (lazy refcounts) and its refcounts were
    /// rebuilt first.
    pub repaired_dirty: bool,
    /// Upgraded from version 2 to 3.
    pub upgraded: bool,
    /// The refcount width changed: (old, new) bits.
    pub refcount_bits: Option<(u32, u32)>,
    /// Lazy refcounts switched on (`Some(true)`) or off.
    pub lazy_refcounts: Option<bool>,
    /// The virtual size changed to this.
    pub resized: Option<u64>,
    /// Downgraded from version 3 to 2.
    pub downgraded: bool,
    /// Zero clusters turned into data clusters holding zeros (downgrade).
    pub zero_clusters_expanded: u64,
    /// Zero clusters without a backing file made unallocated (downgrade;
    /// they read as zeros either way).
    pub zero_clusters_dropped: u64,
    /// Of those expanded or dropped: preallocated zero clusters whose host
    /// cluster a snapshot reads as data, moved off it rather than zeroed.
    pub zero_clusters_moved: u64,
    /// Persistent bitmaps dropped by a downgrade (v2 cannot have them).
    pub bitmaps_dropped: Vec<String>,
}

/// Amends the qcow2 image at `path` (opened for writing, with its
/// backing files, under QEMU's write lock), as `qemu-img amend` does: a
/// dirty image is repaired first ([`WritePolicy::qemu`]; see
/// [`AmendReport::repaired_dirty`]).
///
/// [`WritePolicy::qemu`]: crate::WritePolicy::qemu
pub fn amend(path: &Path, opts: &AmendOptions) -> Result<AmendReport> {
    let open = OpenOptions::new()
        .writable(true)
        .write_policy(crate::WritePolicy::qemu());
    let mut chain = Chain::open(path, &open)?;
    amend_chain(&mut chain, opts)
}

/// Amends the top image of a writable chain.
pub fn amend_chain(chain: &mut Chain, opts: &AmendOptions) -> Result<AmendReport> {
    let mut report = AmendReport::default();
    {
        let img = top_qcow2(chain)?;
        img.begin_write_for_amend(&mut report)?;
        if let Some(r) = refusal(img, opts)? {
            return Err(Error::Unsupported {
                path: img.view.path().to_path_buf(),
                what: r.message(),
            });
        }
    }
    if let Some(Compat::V3) = opts.compat {
        let img = top_qcow2(chain)?;
        if img.view.header().version() < 3 {
            upgrade(img)?;
            report.upgraded = true;
        }
    }
    if let Some(bits) = opts.refcount_bits {
        let img = top_qcow2(chain)?;
        let old = img.view.header().refcount_bits();
        if bits != old {
            change_refcount_width(img, bits.trailing_zeros())?;
            report.refcount_bits = Some((old, bits));
        }
    }
    if let Some(on) = opts.lazy_refcounts {
        let img = top_qcow2(chain)?;
        if on != img.view.header().lazy_refcounts() {
            // Off on a dirty image: begin_write already rebuilt its
            // refcounts (QEMU's qcow2_mark_clean).
            if on {
                let v = img.view.header().compatible_features() | Compatible::LAZY_REFCOUNTS;
                img.view.header_mut().set_compatible(v);
            } else {
                let v = img.view.header().compatible_features() & !Compatible::LAZY_REFCOUNTS;
                img.view.header_mut().set_compatible(v);
            }
            img.write_header()?;
            img.sync()?;
            report.lazy_refcounts = Some(on);
        }
    }
    if let Some(size) = opts.size {
        if size != chain.top().image.virtual_size() {
            resize_chain(chain, size, true, ResizePrealloc::Off)?;
            report.resized = Some(size);
        }
    }
    if let Some(Compat::V2) = opts.compat {
        let img = top_qcow2(chain)?;
        if img.view.header().version() >= 3 {
            downgrade(img, &mut report)?;
            report.downgraded = true;
        }
    }
    top_qcow2(chain)?.flush()?;
    Ok(report)
}

fn top_qcow2(chain: &mut Chain) -> Result<&mut WritableImage> {
    match chain.layers_mut().first_mut().map(|l| &mut l.image) {
        Some(Image::Qcow2(q)) => q.writable(),
        Some(Image::Raw(r)) => Err(Error::Unsupported {
            path: r.path().to_path_buf(),
            what: "amend works on qcow2 images only (this one is raw)".into(),
        }),
        None => Err(Error::InvalidArgument("empty chain".into())),
    }
}

impl WritableImage {
    /// The first-write preparation (a dirty image is repaired, as QEMU
    /// repairs it at open), then a flush so that nothing is pending.
    fn begin_write_for_amend(&mut self, report: &mut AmendReport) -> Result<()> {
        report.repaired_dirty = self.view.header().dirty();
        self.begin_write()?;
        self.flush()
    }
}

/// The first refusal QEMU would report, checked before anything is
/// written (QEMU finds some of them half-way).
fn refusal(img: &mut WritableImage, opts: &AmendOptions) -> Result<Option<AmendRefusal>> {
    let h = img.view.header();
    let new_version = opts.compat.map_or(h.version(), Compat::version);
    let mut order = h.refcount_order();
    if let Some(bits) = opts.refcount_bits {
        if bits == 0 || bits > 64 || !bits.is_power_of_two() {
            return Ok(Some(AmendRefusal::RefcountWidthInvalid));
        }
        if bits != h.refcount_bits() {
            if new_version < 3 && bits != 16 {
                return Ok(Some(AmendRefusal::RefcountWidthNeedsV3));
            }
            let new_order = bits.trailing_zeros();
            if new_order < order {
                if let Some(r) = refcount_over(img, new_order)? {
                    return Ok(Some(r));
                }
            }
            order = new_order;
        }
    }
    let h = img.view.header();
    if opts.backing_file.is_some() || opts.backing_fmt.is_some() {
        let same = opts.backing_file.as_deref() == h.backing_file()
            && opts.backing_fmt.as_deref() == h.backing_format();
        if !same {
            return Ok(Some(AmendRefusal::BackingFile));
        }
    }
    if opts.lazy_refcounts == Some(true) && !h.lazy_refcounts() && new_version < 3 {
        return Ok(Some(AmendRefusal::LazyRefcountsNeedV3));
    }
    let mut size = img.virtual_size();
    if let Some(s) = opts.size {
        if s != size {
            // resize_refusal needs a chain; only the top matters here.
            if let Some(r) = resize_refusal_of(img, s) {
                return Ok(Some(AmendRefusal::Resize(r)));
            }
            size = s;
        }
    }
    let h = img.view.header();
    if new_version < 3 && h.version() >= 3 {
        if order != 4 {
            return Ok(Some(AmendRefusal::DowngradeRefcountBits));
        }
        let bad_snapshot =
            img.view.snapshots().iter().any(|s| {
                s.vm_state_size > u64::from(u32::MAX) || s.disk_size.unwrap_or(size) != size
            });
        if bad_snapshot {
            return Ok(Some(AmendRefusal::DowngradeSnapshots));
        }
        let left = h.incompatible_features() & !(Incompatible::DIRTY | Incompatible::COMPRESSION);
        if !left.is_empty() {
            return Ok(Some(AmendRefusal::DowngradeIncompatible(left.bits())));
        }
        if h.compression_type() != CompressionType::Deflate && has_compressed_clusters(img)? {
            return Ok(Some(AmendRefusal::DowngradeZstd));
        }
    }
    Ok(None)
}

/// The resize checks `strata resize` makes, on the image alone.
fn resize_refusal_of(img: &WritableImage, new_size: u64) -> Option<String> {
    if new_size == 0 {
        return Some("New image size must be positive".into());
    }
    if !new_size.is_multiple_of(512) {
        return Some("The new size must be a multiple of 512".into());
    }
    if img.view.header().version() < 3 && !img.view.snapshots().is_empty() {
        return Some("Can't resize a v2 image which has snapshots".into());
    }
    if new_size < img.virtual_size() && img.has_live_bitmaps() {
        return Some(
            "shrinking an image with persistent bitmaps is not supported by Strata yet \
             (remove them with `strata bitmap --remove` first)"
                .into(),
        );
    }
    if let Some(b) = img
        .bitmaps()
        .ok()
        .and_then(|l| l.into_iter().find(|b| b.in_use))
    {
        return Some(format!(
            "Bitmap '{}' is inconsistent and cannot be used",
            b.name
        ));
    }
    None
}

/// The first cluster whose current refcount exceeds what `order` can
/// count (QEMU checks the refcounts as stored, leaks included).
fn refcount_over(img: &mut WritableImage, order: u32) -> Result<Option<AmendRefusal>> {
    let max = refcount::max_refcount(order);
    let geo = img.view.geometry();
    let clusters = geo.clusters_for(img.view.storage_len()?);
    for ci in 0..clusters {
        let r = img.w.refcount(ci)?;
        if r > max {
            return Ok(Some(AmendRefusal::RefcountTooLarge {
                bits: 1 << order,
                offset: geo.cluster_start(ci).get(),
                refcount: r,
            }));
        }
    }
    Ok(None)
}

/// Whether the guest view of the active L1 table has a compressed
/// cluster (QEMU's `qcow2_has_compressed_clusters`).
fn has_compressed_clusters(img: &WritableImage) -> Result<bool> {
    let geo = img.view.geometry();
    for e in img.view.l1().to_vec() {
        let Some(off) = L1Entry(e).l2_offset() else {
            continue;
        };
        let table = img.l2_table(off.get())?;
        for i in 0..geo.l2_entries() {
            let entry = L2Entry::read(&table, geo, i).map_err(|source| Error::Format {
                path: img.view.path().to_path_buf(),
                source,
            })?;
            if entry.compressed() {
                return Ok(true);
            }
        }
    }
    Ok(false)
}

/// QEMU 10's feature name table (written with every v3 header).
fn feature_table() -> Extension {
    Extension::FeatureTable(vec![
        FeatureName::new(FeatureKind::Incompatible, 0, "dirty bit"),
        FeatureName::new(FeatureKind::Incompatible, 1, "corrupt bit"),
        FeatureName::new(FeatureKind::Incompatible, 2, "external data file"),
        FeatureName::new(FeatureKind::Incompatible, 3, "compression type"),
        FeatureName::new(FeatureKind::Incompatible, 4, "extended L2 entries"),
        FeatureName::new(FeatureKind::Compatible, 0, "lazy refcounts"),
        FeatureName::new(FeatureKind::Autoclear, 0, "bitmaps"),
        FeatureName::new(FeatureKind::Autoclear, 1, "raw external data"),
    ])
}

/// Length of the v3 extra data QEMU writes for every snapshot:
/// vm_state_size_large, disk_size, icount.
const V3_SNAPSHOT_EXTRA: usize = 24;

/// Encodes the snapshot table with the v3 extra data in every entry
/// (extra data past it kept), each entry padded to 8 bytes.
fn encode_snapshots(
    img: &WritableImage,
) -> Result<(Vec<u8>, Vec<strata_format::snapshot::Snapshot>)> {
    let size = img.virtual_size();
    let mut out = Vec::new();
    let mut snaps = Vec::with_capacity(img.view.snapshots().len());
    for s in img.view.snapshots() {
        let mut extra = Vec::with_capacity(V3_SNAPSHOT_EXTRA.max(s.extra.len()));
        extra.extend_from_slice(&s.vm_state_size.to_be_bytes());
        extra.extend_from_slice(&s.disk_size.unwrap_or(size).to_be_bytes());
        extra.extend_from_slice(&s.icount.unwrap_or(u64::MAX).to_be_bytes());
        if let Some(rest) = s.extra.get(V3_SNAPSHOT_EXTRA..) {
            extra.extend_from_slice(rest);
        }
        let (id, name) = (s.id.as_bytes(), s.name.as_bytes());
        let id_len = u16::try_from(id.len()).ok();
        let name_len = u16::try_from(name.len()).ok();
        let (Some(id_len), Some(name_len)) = (id_len, name_len) else {
            return Err(Error::corrupt(
                img.view.path(),
                img.view.header().snapshots_offset(),
                "snapshot id or name too long",
            ));
        };
        let start = out.len();
        out.extend_from_slice(&s.l1_table_offset.to_be_bytes());
        out.extend_from_slice(&s.l1_size.to_be_bytes());
        out.extend_from_slice(&id_len.to_be_bytes());
        out.extend_from_slice(&name_len.to_be_bytes());
        out.extend_from_slice(&s.date_sec.to_be_bytes());
        out.extend_from_slice(&s.date_nsec.to_be_bytes());
        out.extend_from_slice(&s.vm_clock_nsec.to_be_bytes());
        // The 32-bit field, as QEMU writes it (truncated; the 64-bit one
        // is in the extra data).
        out.extend_from_slice(&(s.vm_state_size as u32).to_be_bytes());
        out.extend_from_slice(&(extra.len() as u32).to_be_bytes());
        out.extend_from_slice(&extra);
        out.extend_from_slice(id);
        out.extend_from_slice(name);
        out.resize(start + (out.len() - start).div_ceil(8) * 8, 0);
        let mut n = s.clone();
        n.extra = extra;
        n.disk_size = Some(s.disk_size.unwrap_or(size));
        snaps.push(n);
    }
    Ok((out, snaps))
}

/// compat=0.10 -> 1.1 (QEMU's `qcow2_upgrade`).
fn upgrade(img: &mut WritableImage) -> Result<()> {
    let geo = img.view.geometry();
    let cs = geo.cluster_size();
    let mut h = img.view.header().clone();
    h.set_version(3);
    h.set_compression_type(CompressionType::Deflate);
    h.set_header_length(112, vec![0; 112 - 105]);
    h.set_incompatible(Incompatible::empty());
    h.set_compatible(Compatible::empty());
    h.set_autoclear(Autoclear::empty());
    h.set_refcount_order(4);
    // QEMU writes the feature name table only with clusters over 4 KiB
    // (in 512-byte clusters it would leave no room for a backing name).
    if img.view.geometry().cluster_size() > 4096
        && !h
            .extensions()
            .iter()
            .any(|e| matches!(e, Extension::FeatureTable(_)))
    {
        let at = h
            .extensions()
            .iter()
            .position(|e| !matches!(e, Extension::BackingFormat(_)))
            .unwrap_or(h.extensions().len());
        h.extensions_mut().insert(at, feature_table());
    }
    h.layout().map_err(|source| Error::Format {
        path: img.view.path().to_path_buf(),
        source,
    })?;
    // v3 requires the 64-bit VM state size and the disk size in every
    // snapshot entry: rewrite the table when one lacks them.
    let need = img.view.snapshots().iter().any(|s| s.extra.len() < 16);
    let mut moved = None;
    if need {
        let (bytes, snaps) = encode_snapshots(img)?;
        let n = img.view.geometry().clusters_for(bytes.len() as u64).max(1);
        let at = img.alloc_contiguous(n, "the snapshot table")?;
        let mut padded = bytes.clone();
        padded.resize((n * cs) as usize, 0);
        img.w.write_metadata(&padded, at, "write snapshot table")?;
        // The new table and the refcounts that count it are durable
        // before the header points at it.
        img.barrier()?;
        let old = (
            img.view.header().snapshots_offset(),
            img.view
                .snapshot_table_end()
                .saturating_sub(img.view.header().snapshots_offset()),
        );
        h.set_snapshot_table(at, h.nb_snapshots());
        moved = Some((old, snaps, at + bytes.len() as u64));
    }
    *img.view.header_mut() = h;
    img.write_header()?;
    img.sync()?;
    if let Some(((old_off, old_len), snaps, end)) = moved {
        img.view.set_snapshots(snaps, end);
        if old_len > 0 {
            img.w
                .free_later(geo.host_clusters(HostOffset::new(old_off), old_len));
        }
        img.load_metadata_map()?;
        // The header switch is durable: the old table's clusters may go.
        img.flush()?;
    }
    Ok(())
}

/// Rebuilds the refcount structures at `order` (QEMU's
/// `qcow2_change_refcount_order`): written past the end, synced, then one
/// header write switches to them.
fn change_refcount_width(img: &mut WritableImage, order: u32) -> Result<()> {
    let old = img.view.header().refcount_order();
    // The rebuild writes the structures at the header's width, and then
    // the header itself.
    img.view.header_mut().set_refcount_order(order);
    let r = crate::repair::rebuild_refcounts_of(img);
    if r.is_err() {
        // Failed before the switch (a refusal), or on an I/O error, after
        // which the image takes no more writes.
        img.view.header_mut().set_refcount_order(old);
    }
    r
}

/// One zero cluster to turn into something v2 can express.
#[derive(Debug, Clone, Copy)]
enum Expand {
    /// No backing file: the entry becomes unallocated (reads as zeros).
    Drop,
    /// A new cluster of zeros.
    New,
    /// The preallocated cluster at this host offset is filled with zeros
    /// and the zero flag cleared.
    InPlace(u64),
    /// The preallocated cluster at this host offset holds data another
    /// entry (a snapshot's) reads: the entry moves to a new cluster of
    /// zeros (or becomes unallocated, without a backing file) and this
    /// table's references to the old cluster are released afterwards.
    /// QEMU 10 zeroes it in place, destroying the snapshot's data
    /// (docs/qemu-img-bugs.md, section 9).
    Relocate(u64),
}

/// compat=1.1 -> 0.10 (QEMU's `qcow2_downgrade`); the refusals were
/// checked before.
fn downgrade(img: &mut WritableImage, report: &mut AmendReport) -> Result<()> {
    expand_zero_clusters(img, report)?;
    let mut h = img.view.header().clone();
    let had_bitmaps = h.bitmaps().is_some();
    if had_bitmaps {
        report.bitmaps_dropped = img.bitmaps()?.into_iter().map(|b| b.name).collect();
    }
    h.set_version(2);
    h.set_incompatible(Incompatible::empty());
    h.set_compatible(Compatible::empty());
    h.set_autoclear(Autoclear::empty());
    h.set_compression_type(CompressionType::Deflate);
    h.set_header_length(strata_format::limits::V2_HEADER_LEN, Vec::new());
    h.extensions_mut()
        .retain(|e| !matches!(e, Extension::FeatureTable(_) | Extension::Bitmaps { .. }));
    h.layout().map_err(|source| Error::Format {
        path: img.view.path().to_path_buf(),
        source,
    })?;
    *img.view.header_mut() = h;
    if had_bitmaps {
        // The bitmaps are no longer tracked; the rebuild counts their
        // clusters free and writes the v2 header in the same single
        // header write that switches to the new refcount structures.
        img.w.set_bitmaps(None);
        crate::repair::rebuild_refcounts_of(img)?;
    } else {
        img.write_header()?;
        img.sync()?;
    }
    Ok(())
}

/// Every L2 table of the active and of every snapshot's L1 table, once.
/// Each distinct snapshot L1 table is read once, one at a time (many
/// snapshots usually share one table's offset and size); their sizes
/// were checked against the limit when the image was opened for writing.
fn all_l2_tables(img: &WritableImage) -> Result<Vec<u64>> {
    let mut seen = std::collections::BTreeSet::new();
    let mut out = Vec::new();
    let mut add = |l1: &[u64]| {
        for e in l1 {
            if let Some(off) = L1Entry(*e).l2_offset() {
                if seen.insert(off.get()) {
                    out.push(off.get());
                }
            }
        }
    };
    add(img.view.l1());
    let mut read = std::collections::HashSet::new();
    for sn in img.view.snapshots() {
        let bytes = u64::from(sn.l1_size) * 8;
        if !sn.l1_size_is_valid() || !read.insert((sn.l1_table_offset, bytes)) {
            continue;
        }
        let mut raw = vec![0u8; bytes as usize];
        let n = img
            .view
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
        if n < raw.len() {
            return Err(Error::corrupt(
                img.view.path(),
                sn.l1_table_offset,
                format!(
                    "the L1 table of snapshot {:?} extends past the end of the file",
                    sn.name
                ),
            ));
        }
        add(&strata_format::table::decode_u64_table(&raw));
    }
    Ok(out)
}

/// Largest single write of zeros.
const ZERO_RUN: u64 = 4 << 20;

/// Writes zeros over the host clusters `fill` (merged into runs of
/// adjacent clusters, at most [`ZERO_RUN`] bytes a write).
fn write_zero_runs(img: &mut WritableImage, fill: &mut [u64], zeros: &[u8]) -> Result<()> {
    let cs = img.view.geometry().cluster_size();
    fill.sort_unstable();
    let mut i = 0;
    while i < fill.len() {
        let start = fill[i];
        let mut len = cs;
        i += 1;
        while i < fill.len() && fill[i] == start + len && len + cs <= zeros.len() as u64 {
            len += cs;
            i += 1;
        }
        img.w
            .write_data(&zeros[..len as usize], start, "write zero clusters")?;
    }
    Ok(())
}

/// QEMU's `qcow2_expand_zero_clusters`, crash-safe: per L2 table, the
/// zeros (and the refcounts of new clusters) are made durable by a
/// barrier before the table's entries change; each entry change reads
/// as zeros before and after.
fn expand_zero_clusters(img: &mut WritableImage, report: &mut AmendReport) -> Result<()> {
    let geo = img.view.geometry();
    let cs = geo.cluster_size();
    // Index of the host cluster holding host offset `h`.
    let cluster_of = |h: u64| geo.cluster_index(HostOffset::new(h));
    let has_backing = img.view.header().backing_file().is_some();
    let tables = all_l2_tables(img)?;
    // Plan first: host clusters that some entry uses as data must never
    // be overwritten with zeros.
    let mut data_clusters = std::collections::HashSet::new();
    let mut plans: Vec<(u64, Vec<(u64, Expand)>)> = Vec::new();
    for &toff in &tables {
        // As QEMU's qcow2_expand_zero_clusters, before anything is
        // written: an unaligned L2 table, or a preallocated zero cluster
        // at an unaligned offset, is a fatal corruption (the corrupt bit
        // is set; iotest 060, "unaligned L1 entry" and "unaligned
        // pre-allocated zero cluster").
        let table = match img.l2_table(toff) {
            Err(e) if !geo.is_aligned(toff) => return Err(img.fatal_corruption(e)),
            r => r?,
        };
        let mut work = Vec::new();
        for i in 0..geo.l2_entries() {
            let e = L2Entry::read(&table, geo, i).map_err(|source| Error::Format {
                path: img.view.path().to_path_buf(),
                source,
            })?;
            let state = match e.state(geo, 0) {
                Ok(s) => s,
                Err(what) => {
                    let err = Error::corrupt(
                        img.view.path(),
                        toff + i * 8,
                        format!("L2 entry {i}: {what}"),
                    );
                    if !geo.extended_l2() && e.word & OFLAG_ZERO != 0 {
                        return Err(img.fatal_corruption(err));
                    }
                    return Err(err);
                }
            };
            match state {
                SubclusterState::Data { host } => {
                    data_clusters.insert(geo.cluster_index(host));
                }
                SubclusterState::Zero { host: None } if has_backing => work.push((i, Expand::New)),
                SubclusterState::Zero { host: None } => work.push((i, Expand::Drop)),
                SubclusterState::Zero { host: Some(h) } => work.push((i, Expand::InPlace(h.get()))),
                _ => {}
            }
        }
        if !work.is_empty() {
            plans.push((toff, work));
        }
    }
    // A preallocated zero cluster that another entry reads as data may
    // only be filled with zeros when it holds nothing else (an amend
    // interrupted after expanding one of the tables sharing it leaves
    // exactly that: zeros, read as data by the expanded table); holding
    // data, the entry is moved instead.
    let mut holds_data = std::collections::HashMap::new();
    let mut buf = vec![0u8; cs as usize];
    for (_, work) in &mut plans {
        for (_, x) in work.iter_mut() {
            let Expand::InPlace(h) = *x else {
                continue;
            };
            if !data_clusters.contains(&cluster_of(h)) {
                continue;
            }
            let data = match holds_data.get(&h) {
                Some(d) => *d,
                None => {
                    let n = img
                        .view
                        .storage()
                        .read_at(&mut buf, h)
                        .map_err(|e| Error::io(img.view.path(), "read data cluster", h, e))?;
                    let d = buf.get(..n).is_some_and(|b| b.iter().any(|x| *x != 0));
                    holds_data.insert(h, d);
                    d
                }
            };
            if data {
                *x = Expand::Relocate(h);
            }
        }
    }
    let zeros = vec![0u8; ZERO_RUN.max(cs) as usize];
    for (toff, work) in plans {
        let l2_refs = img.w.refcount(cluster_of(toff))?;
        let mut table = img.l2_table(toff)?.as_ref().clone();
        // Host clusters to fill with zeros, written in runs.
        let mut fill = Vec::new();
        // References released once the table no longer points at them.
        let mut frees = Vec::new();
        for (i, x) in work {
            let x = match x {
                Expand::Relocate(h) => {
                    // Loaded (and validated) now, before any entry changes.
                    img.w.refcount(cluster_of(h))?;
                    frees.extend(std::iter::repeat_n(cluster_of(h), l2_refs as usize));
                    report.zero_clusters_moved += 1;
                    if has_backing {
                        Expand::New
                    } else {
                        Expand::Drop
                    }
                }
                x => x,
            };
            let e = match x {
                Expand::Drop => {
                    report.zero_clusters_dropped += 1;
                    L2Entry::default()
                }
                Expand::New => {
                    let at = img.alloc_contiguous(1, "a zero cluster expansion")?;
                    // A shared table's users all reference it.
                    for _ in 1..l2_refs {
                        img.w.adjust_refcount(cluster_of(at), 1)?;
                    }
                    img.guard_write("zero cluster expansion", at, cs, &[])?;
                    fill.push(at);
                    report.zero_clusters_expanded += 1;
                    L2Entry::data(Some(HostOffset::new(at)), l2_refs == 1)
                }
                Expand::InPlace(h) => {
                    img.guard_write("zero cluster expansion", h, cs, &[])?;
                    fill.push(h);
                    let r = img.w.refcount(cluster_of(h))?;
                    report.zero_clusters_expanded += 1;
                    L2Entry::data(Some(HostOffset::new(h)), r == 1)
                }
                Expand::Relocate(_) => {
                    return Err(Error::InvalidArgument("relocation not resolved".into()))
                }
            };
            debug_assert_eq!(e.word & OFLAG_ZERO, 0);
            e.write(&mut table, geo, i)
                .map_err(|source| Error::Format {
                    path: img.view.path().to_path_buf(),
                    source,
                })?;
        }
        write_zero_runs(img, &mut fill, &zeros)?;
        // Zeros and refcounts durable before any entry points at them.
        img.barrier()?;
        img.guard_write(
            "L2 table write (zero cluster expansion)",
            toff,
            cs,
            &[Meta::ActiveL2, Meta::InactiveL2],
        )?;
        img.write_l2_table(toff, table)?;
        img.w.free_later(frees);
    }
    // The entries are made durable, then the references moved away from
    // are released (step 6 of the write protocol).
    img.flush()
}
