//! qcow2 images: open, validate, map and read; the write path, check and
//! repair, amend, internal snapshots, bitmaps and resize build on the same
//! structures.
//!
//! # Design (issue 16)
//!
//! The module tree:
//!
//! - `view.rs`: the `View`, the read-only metadata view every open
//!   image has: the header and geometry, the active L1 table, the L2
//!   cache, the snapshot table, the file's length and the storage reads
//!   go through, and the reads through them (`map`, `read_mapped`,
//!   `l2_table`, `decompress`, snapshot and bitmap reads). Its fields are
//!   private to `view.rs`; everything else reads through its methods, and
//!   the write path changes it through a few setters (`header_mut`,
//!   `l1_mut`, `set_snapshots`, the L2 cache's `cache_l2` /
//!   `uncache_l2`).
//! - `mod.rs`: the two kinds of open image, and the public handle.
//!   `ReadOnlyImage` is a view (and a memo of the last extent mapped:
//!   its mappings never change); it has no write methods at all.
//!   `WritableImage` owns a view and the `Writer`, and the write
//!   protocol is implemented on it alone, so that a write through an
//!   image opened read-only does not compile inside the crate. The public
//!   [`Qcow2Image`] holds one or the other (chosen by `open` or
//!   `open_rw`) and is the one place the choice is looked at at run time:
//!   its reads go to the view, its write methods to the writable image or
//!   fail with `Error::ReadOnly` (`flush` and `close` of a read-only
//!   image have nothing to do). Chains, `create` and `convert` keep using
//!   [`Qcow2Image`] (an image in a chain is opened one way or the other);
//!   free functions that write (`repair`, `rebuild_refcounts`, amend,
//!   shrink) take the writable image from it once.
//! - `writer.rs`: the `Writer`, the state only a writable image has: the
//!   refcount structures and the overlap map, the dirty L2 tables (pinned
//!   there, never in the cache, until their entries are written), the
//!   dirty L1 entries, the clusters to free at the next flush, the
//!   persistent bitmaps kept up to date, the write policy, and its own
//!   handle on the storage. Its fields are private to `writer.rs`: every
//!   other module changes that state through its methods, and every write
//!   of metadata or data to the storage goes through
//!   `Writer::write_metadata` / `Writer::write_data`. Reads of a writable
//!   image pass the writer to the view, which looks at its pinned tables
//!   before the cache.
//! - `write/`: the write protocol on `WritableImage`, in the order
//!   docs/crash-consistency.md sets: data and new tables, barrier, then
//!   the pointers, frees only after the next barrier. `write/mod.rs` is
//!   the protocol itself (begin, overlap guard, barrier, metadata commit,
//!   flush, header, growing resize, close); the writes built on it are
//!   `write/data.rs` (allocating writes with copy-on-write: a plan per
//!   cluster, then its execution), `write/zero.rs` (zero writes,
//!   discards, deallocation, emptying), `write/prealloc.rs` and
//!   `write/compressed.rs`.
//! - `alloc.rs`: the refcount structures and the metadata (overlap) map,
//!   owned by the writer.
//! - `check.rs`: the consistency check, reading through the view only
//!   (`&View`). `repair.rs`: repairs, writing through the writable image
//!   (rebuilding the refcounts replaces the writer's refcount state with
//!   `Writer::replace_refcounts`).
//! - `amend.rs`, `snapshot_internal.rs`, `bitmap.rs`, `resize.rs`: the
//!   other metadata writers, on `WritableImage` too (their reads, such as
//!   loading a snapshot's L1 table or a bitmap's bits, are the view's).
//! - `data_file.rs`: external data files (the view's `data`, one handle
//!   shared with the writer, which sends guest data there): opening and
//!   locking them, data clusters at their guest offset, unrefcounted,
//!   discards passed to the data file, `data_file_raw`.
//!
//! Format details come from `strata-format`, typed: L2 entries are built
//! with its `L2Entry` constructors (`data`, `zero`, `compressed_at`,
//! `with_subclusters`, ...), never bit by bit; feature bits are the typed
//! flags `Incompatible`, `Compatible` and `Autoclear`; `GuestOffset` and
//! `HostOffset` are opaque, and `Geometry` turns them into indices and
//! back (`l1_index`, `l2_index`, `cluster_index`, `cluster_start`,
//! `guest_cluster_start`, `host_clusters`, `guest_clusters`,
//! `subcluster_index`, `in_subcluster`, `clusters_bytes`): no module of
//! `qcow2` shifts an offset by the cluster bits by hand (the refcount
//! structures in `alloc.rs` hold a `Geometry` too).
//!
//! The header's fields are private to `strata-format`: it is read through
//! getters and changed through its update methods (`set_l1_table`,
//! `set_refcount_table`, `set_snapshot_table`, `set_size`, ...), in the
//! write path only (`View::header_mut`).

pub(crate) mod alloc;
pub mod amend;
pub mod bitmap;
pub mod check;
pub mod data_file;
pub mod repair;
pub mod resize;
pub mod snapshot_internal;
mod view;
pub mod write;
mod writer;

use std::path::Path;
use std::sync::{Arc, Mutex};

use strata_format::snapshot::Snapshot;
use strata_format::{Geometry, Header};

use crate::error::{Error, Poison, Result};
use crate::mapping::{Extent, Mapping};
use crate::storage::Storage;
use bitmap::{BitmapEdit, BitmapInfo, DirtyBitmap};
use snapshot_internal::SnapshotRef;
use view::lock;
pub(crate) use view::View;
use write::{BackingRead, CompressedTail, PreallocFill};
use writer::Writer;

/// An open qcow2 image, read-only or writable (as it was opened).
///
/// The choice is made once, at open ([`Qcow2Image::open`] or
/// [`Qcow2Image::open_rw`]), and this is the one place it is looked at:
/// inside, a read-only image and a writable one are two types, and only
/// the writable one has the write protocol. The write methods of a
/// read-only image fail with [`Error::ReadOnly`] (and [`Qcow2Image::flush`]
/// and [`Qcow2Image::close`] have nothing to do).
#[derive(Debug)]
pub struct Qcow2Image(Mode);

#[derive(Debug)]
enum Mode {
    ReadOnly(Box<ReadOnlyImage>),
    Writable(Box<WritableImage>),
}

/// A qcow2 image opened read-only: the view, and a memo of the last
/// extent mapped. It has no write methods.
#[derive(Debug)]
pub(crate) struct ReadOnlyImage {
    view: View,
    /// The last extent [`ReadOnlyImage::map`] found, reused while later
    /// calls start inside it (walks of deep chains ask each layer again
    /// and again about the same unallocated run): the mappings of an
    /// image opened read-only never change.
    last_map: Mutex<Option<Extent>>,
}

/// A qcow2 image opened for writing: the view and the [`Writer`], on
/// which the write protocol (`write/`, `repair.rs`, `amend.rs`,
/// `snapshot_internal.rs`, `bitmap.rs`, `resize.rs`) is implemented.
#[derive(Debug)]
pub(crate) struct WritableImage {
    view: View,
    w: Writer,
    /// Set by the first I/O error of the write path: no more writes.
    poisoned: Arc<Poison>,
    /// Where the next compressed cluster may be packed.
    compressed_tail: CompressedTail,
    /// Set once closed (or once a close failed): the drop does not flush.
    closed: bool,
}

impl ReadOnlyImage {
    /// The longest extent starting at `start` (at most `max_len` bytes)
    /// whose bytes have one mapping, contiguous on the host.
    pub(crate) fn map(&self, start: u64, max_len: u64) -> Result<Extent> {
        let end = self.view.map_end(start, max_len)?;
        let known = *lock(&self.last_map);
        let e = match known.filter(|e| e.start <= start && start < e.end()) {
            Some(e) => {
                let mut hit = Extent {
                    start,
                    len: e.end().min(end) - start,
                    mapping: e.mapping.advance(start - e.start),
                };
                // The remembered extent may have been cut short by the
                // length asked for then: look on, as a fresh walk would.
                if hit.end() < end {
                    let next = self.view.map_uncached(hit.end(), end, None)?;
                    if hit.mapping.continues(hit.len, next.mapping) {
                        hit.len += next.len;
                    } else {
                        self.remember(next);
                        return Ok(hit);
                    }
                }
                hit
            }
            None => self.view.map_uncached(start, end, None)?,
        };
        self.remember(e);
        Ok(e)
    }

    fn remember(&self, e: Extent) {
        if !matches!(e.mapping, Mapping::Compressed(_)) {
            *lock(&self.last_map) = Some(e);
        }
    }

    /// Drops every cached table, decompressed cluster and remembered
    /// extent (the image now shows another L1 table).
    pub(crate) fn forget_caches(&mut self) {
        self.view.forget_caches();
        *lock(&self.last_map) = None;
    }
}

impl WritableImage {
    /// Opens a qcow2 image for reading and writing (the storage must be
    /// writable). Nothing is written until the first write.
    fn open(storage: Box<dyn Storage>, path: &Path) -> Result<WritableImage> {
        let view = View::open(
            storage,
            path,
            data_file::Source::FileSystem { writable: true },
        )?;
        WritableImage::from_view(view)
    }

    /// Adds the write state to a view opened for writing.
    fn from_view(view: View) -> Result<WritableImage> {
        let path = &view.path().to_path_buf();
        let data = match view.data_ref() {
            Some(d) => Some((d.clone(), d.storage()?.clone())),
            None => None,
        };
        let h = view.header();
        let refcounts = crate::qcow2::alloc::Refcounts::load(
            view.storage(),
            path,
            view.file_len(),
            view.geometry(),
            h.refcount_order(),
            h.refcount_table_offset(),
            h.refcount_table_clusters(),
        )?;
        let poisoned = Arc::<Poison>::default();
        let mut w = Writer::new(view.storage_arc(), path, poisoned.clone(), refcounts);
        if let Some((d, s)) = data {
            w.set_data_file(d, s);
        }
        let mut img = WritableImage {
            view,
            w,
            poisoned,
            compressed_tail: CompressedTail::default(),
            closed: false,
        };
        img.load_metadata_map()?;
        Ok(img)
    }

    /// Virtual size in bytes.
    pub(crate) fn virtual_size(&self) -> u64 {
        self.view.virtual_size()
    }

    /// The L2 table at `offset`: the writer's pinned copy when it has
    /// changes not yet written, else through the cache.
    pub(crate) fn l2_table(&self, offset: u64) -> Result<Arc<Vec<u8>>> {
        self.view.l2_table(offset, Some(&self.w))
    }

    /// The image's persistent dirty bitmaps (as tracked in this session
    /// once loaded).
    pub(crate) fn bitmaps(&self) -> Result<Vec<BitmapInfo>> {
        self.view.bitmaps(self.w.bitmaps())
    }

    /// The longest extent starting at `start` with one mapping, as the
    /// tables (pinned copies first) say now.
    pub(crate) fn map(&self, start: u64, max_len: u64) -> Result<Extent> {
        self.view.map(start, max_len, Some(&self.w))
    }
}

/// Forwards a write method of [`Qcow2Image`] to the writable image, or
/// fails on a read-only one.
macro_rules! writable {
    ($self:ident) => {
        match &mut $self.0 {
            Mode::Writable(w) => &mut **w,
            Mode::ReadOnly(r) => return Err(read_only(r.view.path())),
        }
    };
}

fn read_only(path: &Path) -> Error {
    Error::ReadOnly {
        path: path.to_path_buf(),
        why: "image is open read-only".into(),
    }
}

impl Qcow2Image {
    /// Opens and validates a qcow2 image on `storage`, read-only. `path`
    /// names it in errors. Nothing is written.
    pub fn open(storage: Box<dyn Storage>, path: &Path) -> Result<Qcow2Image> {
        let view = View::open(
            storage,
            path,
            data_file::Source::FileSystem { writable: false },
        )?;
        Ok(Qcow2Image::read_only(view))
    }

    fn read_only(view: View) -> Qcow2Image {
        Qcow2Image(Mode::ReadOnly(Box::new(ReadOnlyImage {
            view,
            last_map: Mutex::new(None),
        })))
    }

    /// Opens a qcow2 image whose external data file is on `data` (tests,
    /// in-memory images); `writable` as [`Qcow2Image::open_rw`].
    pub fn open_with_data_file(
        storage: Box<dyn Storage>,
        data: Box<dyn Storage>,
        path: &Path,
        writable: bool,
    ) -> Result<Qcow2Image> {
        let view = View::open(storage, path, data_file::Source::Given(Arc::from(data)))?;
        Ok(if writable {
            Qcow2Image(Mode::Writable(Box::new(WritableImage::from_view(view)?)))
        } else {
            Qcow2Image::read_only(view)
        })
    }

    /// Opens a qcow2 image for reading and writing (the storage must be
    /// writable). Nothing is written until the first write.
    pub fn open_rw(storage: Box<dyn Storage>, path: &Path) -> Result<Qcow2Image> {
        Ok(Qcow2Image(Mode::Writable(Box::new(WritableImage::open(
            storage, path,
        )?))))
    }

    /// The metadata view (either kind of image).
    pub(crate) fn view(&self) -> &View {
        match &self.0 {
            Mode::ReadOnly(r) => &r.view,
            Mode::Writable(w) => &w.view,
        }
    }

    /// The writable image, or [`Error::ReadOnly`].
    pub(crate) fn writable(&mut self) -> Result<&mut WritableImage> {
        Ok(writable!(self))
    }

    /// The writer, when opened for writing (its pinned tables).
    fn pinned(&self) -> Option<&Writer> {
        match &self.0 {
            Mode::ReadOnly(_) => None,
            Mode::Writable(w) => Some(&w.w),
        }
    }

    /// Whether the image was opened for writing.
    pub fn is_writable(&self) -> bool {
        matches!(self.0, Mode::Writable(_))
    }

    /// Whether the image has a `poisoned` state from an earlier I/O error.
    pub fn is_poisoned(&self) -> bool {
        match &self.0 {
            Mode::ReadOnly(_) => false,
            Mode::Writable(w) => w.poisoned.is_set(),
        }
    }

    // --- reads -----------------------------------------------------------

    /// The file's path.
    pub fn path(&self) -> &Path {
        self.view().path()
    }
    /// The validated header.
    pub fn header(&self) -> &Header {
        self.view().header()
    }
    /// The cluster geometry.
    pub fn geometry(&self) -> Geometry {
        self.view().geometry()
    }
    /// Virtual size in bytes.
    pub fn virtual_size(&self) -> u64 {
        self.view().virtual_size()
    }
    /// The internal snapshots.
    pub fn snapshots(&self) -> &[Snapshot] {
        self.view().snapshots()
    }
    /// The storage.
    pub fn storage(&self) -> &dyn Storage {
        self.view().storage()
    }
    /// The active L1 table's raw entries.
    pub fn l1(&self) -> &[u64] {
        self.view().l1()
    }
    /// The external data file, when the image has one.
    pub fn data_file(&self) -> Option<&data_file::DataFile> {
        self.view().data_file()
    }
    /// The storage data clusters' host offsets point into: the external
    /// data file when the image has one (an error when it could not be
    /// opened), the image's own storage otherwise.
    pub fn data_storage(&self) -> Result<&dyn Storage> {
        self.view().data_storage()
    }
    /// Refuses, as `qemu-img amend` does and before any change, the
    /// external data file options an amend cannot apply: `data_file=` on
    /// an image without a data file, `data_file_raw=on` on one whose
    /// data file is not raw, and a downgrade (`compat=0.10`) of an image
    /// with a data file.
    pub fn check_data_file_amend(
        &self,
        name: Option<&str>,
        raw: Option<bool>,
        downgrade: bool,
    ) -> Result<()> {
        self.view().check_data_file_amend(name, raw, downgrade)
    }
    /// Applies `data_file=NAME` (a new name; empty: the name is removed,
    /// the image then needs one given at open, as in QEMU) and
    /// `data_file_raw=off` (clears the raw bit) to the header, as
    /// `qemu-img amend` does. Checked first with
    /// [`Qcow2Image::check_data_file_amend`].
    pub fn amend_data_file(&mut self, name: Option<&str>, raw: Option<bool>) -> Result<()> {
        writable!(self).amend_data_file(name, raw)
    }

    /// Reads (through the cache) the L2 table at `offset`.
    pub fn l2_table(&self, offset: u64) -> Result<Arc<Vec<u8>>> {
        self.view().l2_table(offset, self.pinned())
    }

    /// The L2 table mapping L1 index `l1i` of the active table, if any.
    pub fn l2_for(&self, l1i: u64) -> Result<Option<(u64, Arc<Vec<u8>>)>> {
        self.view().l2_for(l1i, self.pinned())
    }

    /// The longest extent starting at `start` (at most `max_len` bytes)
    /// whose bytes have one mapping, contiguous on the host.
    pub fn map(&self, start: u64, max_len: u64) -> Result<Extent> {
        match &self.0 {
            Mode::ReadOnly(r) => r.map(start, max_len),
            Mode::Writable(w) => w.map(start, max_len),
        }
    }

    /// Reads `buf.len()` guest bytes at `guest` that this image maps with
    /// `m` (the mapping of `guest` itself, as [`Qcow2Image::map`] returns
    /// it advanced to `guest`). Unallocated ranges are the caller's.
    pub fn read_mapped(&self, m: Mapping, guest: u64, buf: &mut [u8]) -> Result<()> {
        self.view().read_mapped(m, guest, buf)
    }

    /// Decompresses the cluster `d` describes (cached: the last one).
    pub fn decompress(&self, d: strata_format::CompressedDescriptor) -> Result<Arc<Vec<u8>>> {
        self.view().decompress(d)
    }

    /// The image's persistent dirty bitmaps, in directory order (empty
    /// when it has none, or when QEMU would ignore them: a v2 image, or
    /// the bitmaps autoclear bit cleared).
    pub fn bitmaps(&self) -> Result<Vec<BitmapInfo>> {
        self.view().bitmaps(self.pinned().and_then(Writer::bitmaps))
    }

    /// Loads bitmap `name`'s dirty bits (as of the last save, or as
    /// tracked in this session).
    pub fn dirty_bitmap(&self, name: &str) -> Result<DirtyBitmap> {
        self.view()
            .dirty_bitmap(name, self.pinned().and_then(Writer::bitmaps))
    }

    /// Makes this read-only image show the snapshot `sel` instead of the
    /// active state (QEMU's `bdrv_snapshot_load_tmp`): its L1 table and
    /// its virtual size. The backing file stays. Fails on an image opened
    /// for writing.
    pub fn load_snapshot(&mut self, sel: &SnapshotRef) -> Result<()> {
        match &mut self.0 {
            Mode::ReadOnly(r) => r.load_snapshot(sel),
            Mode::Writable(w) => Err(Error::InvalidArgument(format!(
                "{}: a snapshot can only be loaded into an image opened read-only",
                w.view.path().display()
            ))),
        }
    }

    // --- writes (an image opened read-only fails with Error::ReadOnly) ---

    /// Sets what the first write does with a dirty image, unreadable
    /// bitmaps or unknown autoclear bits (default: refuse; see
    /// [`WritePolicy`](crate::chain::WritePolicy)). Fails on an image
    /// opened read-only.
    pub fn set_write_policy(&mut self, policy: crate::chain::WritePolicy) -> Result<()> {
        writable!(self).set_write_policy(policy);
        Ok(())
    }

    /// Writes `data` at guest `offset`. `backing` reads the layers below
    /// (for copy-on-write of partly written clusters).
    pub fn write(&mut self, offset: u64, data: &[u8], backing: BackingRead) -> Result<()> {
        writable!(self).write(offset, data, backing)
    }

    /// Writes guest `[offset, offset+len)` with the bytes `src` holds at
    /// `[src_offset, src_offset+len)`, moved by
    /// [`Storage::copy_range_from`] (a clone sharing the filesystem's
    /// extents where it can) instead of through memory. Whole clusters
    /// only (`offset` and `len` cluster-aligned), and not on images with
    /// extended L2 entries: callers use [`Qcow2Image::write`] for the rest.
    ///
    /// The protocol is that of `write`: a cluster the image does not own
    /// alone gets a new one, the moved bytes land in clusters nothing
    /// points at yet, and their L2 entries are written after the barrier
    /// that makes them durable (docs/crash-consistency.md).
    pub fn write_range_from(
        &mut self,
        offset: u64,
        len: u64,
        src: &dyn Storage,
        src_offset: u64,
    ) -> Result<()> {
        writable!(self).write_range_from(offset, len, src, src_offset)
    }

    /// Makes `[offset, offset+len)` read as zeros. With `unmap`, host
    /// clusters are released where possible. v2 images (no zero flag)
    /// get explicit zeros.
    pub fn write_zeroes(
        &mut self,
        offset: u64,
        len: u64,
        unmap: bool,
        backing: BackingRead,
    ) -> Result<()> {
        writable!(self).write_zeroes(offset, len, unmap, backing)
    }

    /// Discards `[offset, offset+len)` as QEMU's qcow2 driver does: whole
    /// clusters only; they then read as zeros on v3 images (when there is
    /// a backing file or they were allocated) and become unallocated on v2
    /// images without a backing file. On a v2 image with a backing file
    /// nothing changes (QEMU 290): there is no zero flag to hide it.
    pub fn discard(&mut self, offset: u64, len: u64, has_backing: bool) -> Result<()> {
        writable!(self).discard(offset, len, has_backing)
    }

    /// Makes the whole clusters in `[offset, offset+len)` unallocated, so
    /// that they read through to the backing file, and queues their host
    /// clusters for freeing. Partial clusters at the edges are left as
    /// they are (except at the end of the disk).
    pub fn deallocate(&mut self, offset: u64, len: u64) -> Result<()> {
        writable!(self).deallocate(offset, len)
    }

    /// Empties the image after a commit: every cluster unallocated, reads
    /// falling through to the backing file, which now holds the same data
    /// (the persistent dirty bitmaps are left as they are, as QEMU's
    /// `bdrv_make_empty` leaves them; [`Qcow2Image::deallocate`] marks
    /// them). The cost follows what is allocated, not the virtual size.
    pub fn make_empty(&mut self) -> Result<()> {
        writable!(self).make_empty()
    }

    /// Makes every write durable and releases clusters that lost their
    /// last pointer. Nothing to do on an image opened read-only.
    pub fn flush(&mut self) -> Result<()> {
        match &mut self.0 {
            Mode::ReadOnly(_) => Ok(()),
            Mode::Writable(w) => w.flush(),
        }
    }

    /// Closes the image: flushes it (an image open for writing) and
    /// returns the flush's error, which a drop could only log.
    pub fn close(self) -> Result<()> {
        match self.0 {
            Mode::ReadOnly(_) => Ok(()),
            Mode::Writable(mut w) => w.close(),
        }
    }

    /// Grows the virtual disk to `new_size` (growing the L1 table when
    /// needed). Shrinking is refused.
    pub fn resize(&mut self, new_size: u64) -> Result<()> {
        writable!(self).resize(new_size)
    }

    /// Rewrites the backing file name and format in the header (nothing
    /// else: the unsafe `rebase -u`). `None` removes the backing file.
    pub fn set_backing(&mut self, backing: Option<(&str, &str)>) -> Result<()> {
        writable!(self).set_backing(backing)
    }

    /// Recomputes every refcount from the references and rewrites the
    /// refcount structures (used for dirty images and `check -r all`).
    pub fn rebuild_refcounts(&mut self) -> Result<()> {
        writable!(self).rebuild_refcounts()
    }

    /// Allocates every L2 table and data cluster of the disk, as qemu-img
    /// `preallocation=metadata` does (see [`Qcow2Image::preallocate`]).
    pub fn preallocate_metadata(&mut self) -> Result<()> {
        writable!(self).preallocate(PreallocFill::Sparse)
    }

    /// Allocates every L2 table and data cluster of the disk, as qemu-img
    /// does: the L2 entries are plain data entries (no zero flag: the
    /// clusters read as zeros because they are holes, reserved or zeroed
    /// space), and with extended L2 entries every subcluster is left
    /// unallocated, so that reads still fall through to a backing file
    /// (qemu-img allows a backing file only then; iotest 271 / issue 15
    /// defect 4). A cluster the allocator found inside the old end of the
    /// file (which may hold stale bytes) is written with zeros.
    pub fn preallocate(&mut self, fill: PreallocFill) -> Result<()> {
        writable!(self).preallocate(fill)
    }

    /// Writes whole clusters compressed (with the image's compression
    /// type) at the cluster-aligned guest offset `offset`; `data` is a
    /// multiple of the cluster size (the last cluster may reach past the
    /// end of the disk). Clusters that do not shrink are written plainly.
    /// Meant for filling new images (`convert -c`): clusters already
    /// allocated are replaced and their old space released at flush.
    pub fn write_compressed(
        &mut self,
        offset: u64,
        data: &[u8],
        backing: BackingRead,
    ) -> Result<()> {
        writable!(self).write_compressed(offset, data, backing)
    }

    /// Creates an internal snapshot of the active state named `name`
    /// (`qemu-img snapshot -c`), dated `date` (seconds, nanoseconds since
    /// the epoch). Returns the new entry.
    pub fn snapshot_create(&mut self, name: &str, date: (u32, u32)) -> Result<Snapshot> {
        writable!(self).snapshot_create(name, date)
    }

    /// Reverts the active state to the snapshot `sel` (`qemu-img snapshot
    /// -a`). Returns the snapshot applied.
    pub fn snapshot_apply(&mut self, sel: &SnapshotRef) -> Result<Snapshot> {
        writable!(self).snapshot_apply(sel)
    }

    /// Deletes the snapshot `sel` (`qemu-img snapshot -d`). Returns the
    /// entry deleted.
    pub fn snapshot_delete(&mut self, sel: &SnapshotRef) -> Result<Snapshot> {
        writable!(self).snapshot_delete(sel)
    }

    /// Applies one `qemu-img bitmap` operation to bitmap `name`, durably:
    /// pending writes are flushed (and the bitmaps saved) first, then the
    /// bitmaps go to new clusters, a new directory is written, the header
    /// points at it, and the old clusters are freed, in the order of
    /// docs/crash-consistency.md. The errors are QEMU's.
    pub fn edit_bitmap(&mut self, name: &str, edit: BitmapEdit<'_>) -> Result<()> {
        writable!(self).edit_bitmap(name, edit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::create::{create_qcow2, CreateOptions};
    use crate::storage::MemStorage;

    const CS: u64 = 64 << 10;

    fn zeros_below(b: &mut [u8], _: u64) -> Result<()> {
        b.fill(0);
        Ok(())
    }

    /// A 4 MiB image holding one written cluster, and its storage.
    fn image() -> MemStorage {
        let disk = MemStorage::new();
        let opts = CreateOptions {
            size: 4 << 20,
            ..Default::default()
        };
        let mut img = create_qcow2(Box::new(disk.clone()), Path::new("t.qcow2"), &opts).unwrap();
        img.write(CS, &[0xab; 512], &zeros_below).unwrap();
        img.close().unwrap();
        disk
    }

    fn is_read_only(r: Result<impl std::fmt::Debug>) -> bool {
        matches!(r, Err(Error::ReadOnly { .. }))
    }

    #[test]
    fn every_write_method_of_a_read_only_image_fails_and_writes_nothing() {
        let disk = image();
        let before = disk.to_bytes();
        let mut img = Qcow2Image::open(Box::new(disk.clone()), Path::new("t.qcow2")).unwrap();
        assert!(!img.is_writable());
        assert!(img.writable().is_err());
        let sel = SnapshotRef::parse_convert_arg("s").unwrap();
        let policy = crate::chain::WritePolicy::qemu();
        assert!(is_read_only(img.set_write_policy(policy)));
        assert!(is_read_only(img.write(0, &[1; 512], &zeros_below)));
        assert!(is_read_only(img.write_zeroes(0, CS, true, &zeros_below)));
        assert!(is_read_only(img.discard(0, CS, false)));
        assert!(is_read_only(img.deallocate(0, CS)));
        assert!(is_read_only(img.make_empty()));
        assert!(is_read_only(img.resize(8 << 20)));
        assert!(is_read_only(img.set_backing(None)));
        assert!(is_read_only(img.rebuild_refcounts()));
        assert!(is_read_only(img.preallocate_metadata()));
        assert!(is_read_only(img.preallocate(PreallocFill::Zeros)));
        let cluster = vec![0u8; CS as usize];
        assert!(is_read_only(img.write_compressed(
            0,
            &cluster,
            &zeros_below
        )));
        assert!(is_read_only(img.snapshot_create("s", (0, 0))));
        assert!(is_read_only(img.snapshot_apply(&sel)));
        assert!(is_read_only(img.snapshot_delete(&sel)));
        let add = BitmapEdit::Add {
            granularity: None,
            disabled: false,
        };
        assert!(is_read_only(img.edit_bitmap("b", add)));
        assert!(is_read_only(crate::repair::repair(
            &mut img,
            crate::repair::RepairMode::All
        )));
        // Nothing to do for a read-only image, and nothing done.
        img.flush().unwrap();
        assert!(!img.is_poisoned());
        // Reads still work.
        let e = img.map(CS, CS).unwrap();
        assert!(matches!(e.mapping, Mapping::Data { .. }), "{e:?}");
        img.close().unwrap();
        assert_eq!(disk.to_bytes(), before);
    }

    #[test]
    fn a_writable_image_reads_its_pinned_tables_before_the_flush() {
        let disk = image();
        let mut img = Qcow2Image::open_rw(Box::new(disk.clone()), Path::new("t.qcow2")).unwrap();
        assert!(img.is_writable());
        // A snapshot is shown only by an image opened read-only.
        let sel = SnapshotRef::parse_convert_arg("s").unwrap();
        assert!(matches!(
            img.load_snapshot(&sel),
            Err(Error::InvalidArgument(_))
        ));
        // A write through the L2 table: its changed entries are pinned in the
        // writer (not on disk, not in the cache) until the next commit.
        let g = 3 << 20;
        img.write(g, &[0xcd; 512], &zeros_below).unwrap();
        let e = img.map(g, CS).unwrap();
        assert!(matches!(e.mapping, Mapping::Data { .. }), "{e:?}");
        let mut buf = [0u8; 512];
        img.read_mapped(e.mapping, g, &mut buf).unwrap();
        assert_eq!(buf, [0xcd; 512]);
        // A read-only image opened now sees what is on disk: not yet it.
        let ro = Qcow2Image::open(Box::new(disk.clone()), Path::new("t.qcow2")).unwrap();
        assert_eq!(ro.map(g, CS).unwrap().mapping, Mapping::Unallocated);
        img.close().unwrap();
        let ro = Qcow2Image::open(Box::new(disk), Path::new("t.qcow2")).unwrap();
        assert!(matches!(
            ro.map(g, CS).unwrap().mapping,
            Mapping::Data { .. }
        ));
    }
}
