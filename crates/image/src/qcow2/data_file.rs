//! External data files (qcow2 incompatible feature bit 2, "external data
//! file"; autoclear bit 1, "raw external data"; header extension
//! 0x44415441 names the file).
//!
//! What QEMU 10 does, and Strata with it (block/qcow2.c, qcow2-cluster.c,
//! qcow2-refcount.c; iotest 244):
//!
//! - The name in the header extension is opened as it is written: QEMU
//!   opens it as a plain file name, so a relative name is relative to the
//!   *current directory* of the process, not to the image's directory
//!   (unlike backing file names; checked live against qemu-io 10). Protocol
//!   names (`json:`, `nbd:`, ...) are refused, as for backing files.
//! - The data file is opened with the image's mode (read-only or
//!   read-write) and locked as QEMU locks a data child: read-write takes
//!   `consistent read`, `write` and `resize` and refuses to share only
//!   `resize` (bytes 100 101 103 203); read-only takes `consistent read`
//!   and refuses `resize` (100 203).
//! - The bit set and no name: refused at open ("'data-file' is required
//!   for this image"). The raw bit without the data file bit: refused
//!   ("data-file-raw requires a data file").
//! - A data cluster's host offset is an offset in the data file, and a
//!   new data cluster is placed at its guest offset (`do_alloc_cluster_offset`:
//!   host = start of the guest cluster). Data clusters are not
//!   refcounted in the qcow2 file; freeing one passes a discard to the
//!   data file instead.
//! - Compressed clusters are invalid with a data file: reading one is a
//!   corruption ("Compressed cluster entry found in image with external
//!   data file"), and compressed writes are refused (ENOTSUP).
//! - With `data_file_raw` the data file must stay the guest view: zero
//!   writes also write zeros into the data file, and images are created
//!   with every cluster mapped (metadata preallocation).
//! - Internal snapshots are refused (ENOTSUP).
//!
//! `qemu-img info` does not open the data file (its metadata only): a
//! [`DataFile`] whose file could not be opened records the error, and
//! only operations that need the data (reads, writes, check, map,
//! convert) raise it ([`DataFile::storage`]).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use strata_format::header::{Autoclear, Extension, Incompatible};
use strata_format::Header;

use crate::backing::is_protocol_name;
use crate::error::{Error, Result};
use crate::lock::{ImageLock, LockMode};
use crate::qcow2::{View, WritableImage};
use crate::storage::{FileStorage, Storage};
use strata_format::table::{OFFSET_MASK, OFLAG_ZERO};
use strata_format::{HostOffset, L1Entry, L2Entry, SubclusterState};

/// The longest data file name accepted (as backing file names).
pub const MAX_DATA_FILE_NAME: usize = 1023;

/// The external data file of an open image.
#[derive(Debug)]
pub struct DataFile {
    /// The name as the header records it.
    name: String,
    /// Where it was opened from (the name, as QEMU opens it).
    path: PathBuf,
    /// The image whose data file this is (named in errors).
    image: PathBuf,
    /// The storage, or why it could not be opened.
    storage: std::result::Result<Arc<dyn Storage>, String>,
    /// Whether the raw bit (`data_file_raw`) is set.
    raw: bool,
    /// The lock held on it, when the image is locked.
    lock: Mutex<Option<ImageLock>>,
    /// Data-file ranges to discard once the L2 entries that stopped
    /// pointing at them are durable (freed data clusters).
    pending_discards: Mutex<Vec<(u64, u64)>>,
    /// The L1 index of the last L2 table whose guest offset was looked up
    /// (`Qcow2Image::data_file_table_base`).
    table_hint: std::sync::atomic::AtomicUsize,
}

/// QEMU's refusal of an image with the data file bit and no name.
const NO_NAME: &str = "'data-file' is required for this image (the external data file bit \
                       is set but the header names no data file)";

/// The data file name the header records, when the external data file bit
/// is set. `Ok(None)`: no data file. Errors: the bit without a name, the
/// raw bit without the data file bit, or a name Strata will not open.
pub fn name_from_header(header: &Header, image: &Path) -> Result<Option<String>> {
    let has_bit = header
        .incompatible_features()
        .contains(Incompatible::EXTERNAL_DATA);
    let raw = header
        .autoclear_features()
        .contains(Autoclear::DATA_FILE_RAW);
    if !has_bit {
        if raw {
            return Err(unsupported(image, "data-file-raw requires a data file"));
        }
        return Ok(None);
    }
    let name = header.extensions().iter().find_map(|e| match e {
        Extension::DataFile(n) => Some(n.as_str()),
        _ => None,
    });
    let Some(name) = name else {
        return Err(unsupported(image, NO_NAME));
    };
    check_name(name, image)?;
    Ok(Some(name.to_string()))
}

/// Refuses a data file name Strata will not open: empty, too long, with a
/// NUL byte, or a protocol name.
pub fn check_name(name: &str, image: &Path) -> Result<()> {
    let why = if name.is_empty() {
        "the external data file name is empty; 'data-file' is required for this image"
    } else if name.len() > MAX_DATA_FILE_NAME {
        "the external data file name is longer than 1023 bytes"
    } else if name.contains('\0') {
        "the external data file name contains a NUL byte"
    } else if is_protocol_name(name) {
        "the external data file name is a protocol name (json:, nbd:, ...), \
         which Strata does not open"
    } else {
        return Ok(());
    };
    Err(unsupported(image, why))
}

fn unsupported(image: &Path, what: &str) -> Error {
    Error::Unsupported {
        path: image.to_path_buf(),
        what: what.to_string(),
    }
}

/// Where QEMU opens a data file name from: the name itself (relative to
/// the current directory).
pub fn resolve(name: &str) -> PathBuf {
    PathBuf::from(name)
}

/// Where the data file of an image being opened comes from.
#[derive(Debug)]
pub(crate) enum Source {
    /// Opened from the file system by its name, with the image's mode.
    FileSystem {
        /// The image is opened for writing.
        writable: bool,
    },
    /// Given by the caller (tests, in-memory images).
    Given(Arc<dyn Storage>),
}

/// The corruption QEMU signals for a compressed entry in an image with an
/// external data file (`qcow2_get_host_offset`).
pub(crate) fn compressed_entry(image: &Path, l2_offset: u64, l2_index: u64, at: u64) -> Error {
    Error::corrupt(
        image,
        at,
        format!(
            "Compressed cluster entry found in image with external data file \
             (L2 offset: {l2_offset:#x}, L2 index: {l2_index:#x})"
        ),
    )
}

/// Creates (or opens, to truncate) the data file named `name` for a new
/// image at `image`, as qemu-img create does. An existing file is locked
/// first, as QEMU locks a data file it writes: one that another process
/// holds is refused (`Failed to get "resize" lock`) before it is
/// truncated. The caller truncates it.
pub fn create_by_name(name: &str, image: &Path) -> Result<FileStorage> {
    let p = resolve(name);
    let could_not = |e: std::io::Error| Error::Unsupported {
        path: image.to_path_buf(),
        what: format!("Could not create '{name}': {e}"),
    };
    let opened = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&p)
        .map_err(could_not)?;
    crate::storage::check_file_type(&opened).map_err(could_not)?;
    let storage = FileStorage::from_file(opened, &p);
    if let Some(f) = storage.file() {
        // Held only to check: the image's open locks it again.
        ImageLock::acquire(f, &p, LockMode::DataReadWrite)?;
    }
    Ok(storage)
}

impl DataFile {
    /// The data file of the image `header` describes. `Ok(None)`: the
    /// image has none. A data file that cannot be opened (missing, or the
    /// image is not on a file and none was given) is recorded, not
    /// returned as an error: see [`DataFile::storage`].
    pub(crate) fn open(
        header: &Header,
        image: &Path,
        source: Source,
        image_on_file: bool,
    ) -> Result<Option<DataFile>> {
        let named = match name_from_header(header, image) {
            // Without a name only the metadata can be read (qemu-img info
            // shows such an image): recorded, raised by any data access.
            Err(Error::Unsupported { what, .. })
                if what == NO_NAME && matches!(source, Source::FileSystem { .. }) =>
            {
                return Ok(Some(DataFile::new(
                    header,
                    image,
                    String::new(),
                    PathBuf::new(),
                    Err(NO_NAME.to_string()),
                )));
            }
            r => r?,
        };
        let Some(name) = named else {
            if let Source::Given(_) = source {
                return Err(unsupported(
                    image,
                    "'data-file' can only be set for images with an external data file",
                ));
            }
            return Ok(None);
        };
        let path = resolve(&name);
        let storage = match source {
            Source::Given(s) => Ok(s),
            Source::FileSystem { .. } if !image_on_file => Err(format!(
                "Could not open '{name}': the image is not on a file, and no storage \
                 was given for its data file"
            )),
            Source::FileSystem { writable } => FileStorage::open(&path, writable)
                .map(|s| Arc::new(s) as Arc<dyn Storage>)
                .map_err(|e| format!("Could not open '{name}': {e}")),
        };
        Ok(Some(DataFile::new(header, image, name, path, storage)))
    }

    fn new(
        header: &Header,
        image: &Path,
        name: String,
        path: PathBuf,
        storage: std::result::Result<Arc<dyn Storage>, String>,
    ) -> DataFile {
        DataFile {
            image: image.to_path_buf(),
            name,
            path,
            storage,
            raw: header
                .autoclear_features()
                .contains(Autoclear::DATA_FILE_RAW),
            lock: Mutex::new(None),
            pending_discards: Mutex::new(Vec::new()),
            table_hint: Default::default(),
        }
    }

    /// The name the header records.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// The path it is opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// Whether the data file must stay valid as a raw image of the guest
    /// (`data_file_raw`).
    pub fn is_raw(&self) -> bool {
        self.raw
    }

    /// The data file's storage, or the error of its open (QEMU's "Could
    /// not open 'NAME': ..."), naming the image and the data file.
    pub fn storage(&self) -> Result<&Arc<dyn Storage>> {
        self.storage.as_ref().map_err(|why| Error::Unsupported {
            path: self.image.clone(),
            what: why.clone(),
        })
    }

    /// Locks the data file as QEMU locks a data child (see the module
    /// documentation); `writable` as the image. A storage that is not a
    /// file is not locked.
    pub fn lock(&self, writable: bool) -> Result<()> {
        let storage = self.storage()?;
        let Some(file) = storage.file() else {
            return Ok(());
        };
        let mode = if writable {
            LockMode::DataReadWrite
        } else {
            LockMode::DataReadOnly
        };
        let l = ImageLock::acquire(file, &self.path, mode)?;
        *self.lock.lock().unwrap_or_else(|p| p.into_inner()) = Some(l);
        Ok(())
    }

    /// Queues `[offset, offset+len)` of the data file to be discarded
    /// after the next barrier (a data cluster lost its last pointer).
    pub(crate) fn discard_later(&self, offset: u64, len: u64) {
        let mut q = self
            .pending_discards
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        match q.last_mut() {
            Some((a, n)) if *a + *n == offset => *n += len,
            _ => q.push((offset, len)),
        }
    }

    /// Drops the queued discards that overlap `[offset, offset+len)`: data
    /// is being written there again (a new cluster at the same guest, so
    /// the same host, offset).
    pub(crate) fn cancel_discards(&self, offset: u64, len: u64) {
        let mut q = self
            .pending_discards
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if q.is_empty() {
            return;
        }
        let end = offset.saturating_add(len);
        let mut kept = Vec::with_capacity(q.len() + 1);
        for &(a, n) in q.iter() {
            let b = a.saturating_add(n);
            if b <= offset || a >= end {
                kept.push((a, n));
                continue;
            }
            if a < offset {
                kept.push((a, offset - a));
            }
            if b > end {
                kept.push((end, b - end));
            }
        }
        *q = kept;
    }

    /// Discards the queued ranges (called after the barrier that made the
    /// pointer changes durable). Space given back is a courtesy: errors
    /// are ignored, as QEMU ignores a failed discard passthrough.
    pub(crate) fn run_discards(&self) {
        let q = std::mem::take(
            &mut *self
                .pending_discards
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        );
        if let Ok(s) = self.storage() {
            for (a, n) in q {
                let _ = s.punch_hole(a, n);
            }
        }
    }

    /// Syncs the data file (every barrier syncs it before the qcow2 file,
    /// so data reaches it before any L2 entry points at it).
    pub(crate) fn sync(&self) -> std::io::Result<()> {
        match &self.storage {
            Ok(s) => s.sync(),
            Err(_) => Ok(()),
        }
    }
}

/// The data file's side of the reads and of the write path's decisions
/// (the few touch points in view.rs and write/ call these).
impl View {
    /// Whether `e` is a data cluster at host offset 0 of the data file:
    /// offset 0 means "unallocated" in a qcow2 file, but is a valid data
    /// file offset; QEMU tells them apart by the COPIED flag, which every
    /// data file cluster has (`qcow2_get_cluster_type`).
    fn at_data_file_start(&self, e: &L2Entry) -> bool {
        self.data_ref().is_some() && !e.compressed() && e.copied() && e.word & OFFSET_MASK == 0
    }

    /// The host cluster of `e` ([`L2Entry::host_cluster`]), counting a
    /// data file cluster at offset 0.
    pub(crate) fn entry_host(&self, e: &L2Entry) -> Option<HostOffset> {
        e.host_cluster()
            .or_else(|| self.at_data_file_start(e).then(|| HostOffset::new(0)))
    }

    /// The state of subcluster `sc` of `e` ([`L2Entry::state`]), counting
    /// a data file cluster at offset 0 as QEMU does.
    pub(crate) fn entry_state(
        &self,
        e: &L2Entry,
        sc: u32,
    ) -> std::result::Result<SubclusterState, &'static str> {
        let geo = self.geometry();
        if !self.at_data_file_start(e) {
            return e.state(geo, sc);
        }
        if !geo.extended_l2() {
            // The zero flag first: QEMU's ZERO_PLAIN.
            if e.word & OFLAG_ZERO != 0 {
                return Ok(SubclusterState::Zero { host: None });
            }
            return Ok(SubclusterState::Data {
                host: HostOffset::new(0),
            });
        }
        if sc >= 32 {
            return Err("subcluster index out of range");
        }
        let alloc = e.alloc_bits() & (1 << sc) != 0;
        let zero = e.zero_bits() & (1 << sc) != 0;
        match (alloc, zero) {
            (true, true) => Err("subcluster both allocated and zero"),
            (true, false) => Ok(SubclusterState::Data {
                host: HostOffset::new(u64::from(sc) * geo.subcluster_size()),
            }),
            (false, true) => Ok(SubclusterState::Zero {
                host: Some(HostOffset::new(0)),
            }),
            (false, false) => Ok(SubclusterState::Unallocated),
        }
    }

    /// Refuses, as `qemu-img amend` does and before any change, the
    /// external data file options an amend cannot apply: `data_file=` on
    /// an image without a data file, `data_file_raw=on` on one whose
    /// data file is not raw, and a downgrade (`compat=0.10`) of an image
    /// with a data file.
    pub(crate) fn check_data_file_amend(
        &self,
        name: Option<&str>,
        raw: Option<bool>,
        downgrade: bool,
    ) -> Result<()> {
        let bad = |m: &str| Err(unsupported(self.path(), m));
        if name.is_some() && self.data_ref().is_none() {
            return bad("data-file can only be set for images that use an external data file");
        }
        if raw == Some(true) && !self.data_ref().as_ref().is_some_and(|d| d.is_raw()) {
            return bad("data-file-raw cannot be set on existing images");
        }
        if downgrade && self.data_ref().is_some() {
            return bad("Cannot downgrade an image with a data file");
        }
        if let Some(n) = name.filter(|n| !n.is_empty()) {
            check_name(n, self.path())?;
        }
        Ok(())
    }

    /// Refuses a backing file for an image whose data file is raw, as
    /// QEMU's `qcow2_change_backing_file` does (EINVAL): its data file is
    /// the whole guest view, nothing can fall through to a backing file.
    pub(crate) fn refuse_backing_with_raw_data_file(&self, backing: bool) -> Result<()> {
        if backing && self.data_ref().as_ref().is_some_and(|d| d.is_raw()) {
            return Err(Error::InvalidArgument(format!(
                "{}: Could not change the backing file: Invalid argument (a backing file \
                 and data-file-raw cannot be used at the same time)",
                self.path().display()
            )));
        }
        Ok(())
    }

    /// With a data file, refuses an entry whose host cluster is not its
    /// guest cluster, as QEMU (`qcow2_get_host_offset`: "External data
    /// file host cluster offset ... does not match guest cluster
    /// offset"): `guest` is the guest offset the entry maps, `at` the
    /// entry's host offset in the qcow2 file.
    pub(crate) fn check_data_file_host(
        &self,
        e: &L2Entry,
        guest: u64,
        idx: u64,
        at: u64,
    ) -> Result<()> {
        if self.data_ref().is_none() || e.compressed() {
            return Ok(());
        }
        let Some(h) = self.entry_host(e) else {
            return Ok(());
        };
        let g = self.geometry().align_down(guest);
        if h.get() == g {
            return Ok(());
        }
        Err(Error::corrupt(
            self.path(),
            at,
            format!(
                "External data file host cluster offset {:#x} does not match guest cluster \
                 offset: {g:#x}, L2 index: {idx:#x}",
                h.get()
            ),
        ))
    }

    /// The raw external data autoclear bit when the image has a raw data
    /// file (a bit the write path knows and keeps), else nothing.
    pub(crate) fn data_file_autoclear(&self) -> Autoclear {
        match &self.data_ref() {
            Some(d) if d.is_raw() => Autoclear::DATA_FILE_RAW,
            _ => Autoclear::empty(),
        }
    }

    /// Discards the data file clusters queued by [`Self::data_file_release`]
    /// (after the barrier that made the entries' change durable).
    pub(crate) fn run_data_file_discards(&self) {
        if let Some(d) = &self.data_ref() {
            d.run_discards();
        }
    }

    /// The guest offset of the first cluster the active L2 table at
    /// `toff` maps (its L1 index times the span of a table): with a data
    /// file, a new cluster's host offset is its guest offset.
    pub(crate) fn data_file_table_base(&self, toff: u64) -> Result<u64> {
        let is = |i: &usize| {
            self.l1()
                .get(*i)
                .and_then(|e| L1Entry(*e).l2_offset())
                .map(|o| o.get())
                == Some(toff)
        };
        // Writes go forward through the disk: look from the last table
        // found on, then from the start (one L1 scan at most).
        let hint = self.data_ref().as_ref().map_or(0, |d| {
            d.table_hint.load(std::sync::atomic::Ordering::Relaxed)
        });
        let i = (hint..self.l1().len())
            .chain(0..hint.min(self.l1().len()))
            .find(is)
            .ok_or_else(|| {
                Error::corrupt(
                    self.path(),
                    toff,
                    "L2 table being written is not in the active L1 table",
                )
            })?;
        if let Some(d) = &self.data_ref() {
            d.table_hint.store(i, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(i as u64 * self.geometry().l2_span())
    }

    /// An L2 entry changes from `old` to `new`: with a data file, the data
    /// cluster `old` pointed at and `new` no longer does is discarded in
    /// the data file at the next flush (QEMU passes the discard through
    /// to the data file instead of freeing a refcount).
    pub(crate) fn data_file_release(&self, old: L2Entry, new: L2Entry) {
        let Some(d) = &self.data_ref() else { return };
        if old.compressed() {
            return;
        }
        let Some(h) = self.entry_host(&old) else {
            return;
        };
        if self.entry_host(&new) == Some(h) || !self.geometry().is_aligned(h.get()) {
            return;
        }
        d.discard_later(h.get(), self.geometry().cluster_size());
    }

    /// Refuses what QEMU refuses on an image with an external data file:
    /// `what` ("compressed writes", "internal snapshots") is not supported
    /// (QEMU: "Operation not supported").
    pub(crate) fn refuse_with_data_file(&self, what: &str) -> Result<()> {
        if self.data_ref().is_some() {
            return Err(Error::Unsupported {
                path: self.path().to_path_buf(),
                what: format!("{what} with an external data file: Operation not supported"),
            });
        }
        Ok(())
    }
}

/// The write path's uses of the data file.
impl WritableImage {
    /// Syncs the external data file, when there is one (first in every
    /// sync of the image: docs/crash-consistency.md, "External data
    /// files").
    pub(crate) fn sync_data_file(&self) -> Result<()> {
        match &self.view.data_ref() {
            Some(d) => d.sync().map_err(|e| {
                let e = Error::io(d.path(), "sync data file", 0, e);
                self.poisoned.set(&e);
                e
            }),
            None => Ok(()),
        }
    }

    /// Applies `data_file=NAME` (a new name; empty: the name is removed,
    /// the image then needs one given at open, as in QEMU) and
    /// `data_file_raw=off` (clears the raw bit) to the header, as
    /// `qemu-img amend` does. Checked first with
    /// [`Qcow2Image::check_data_file_amend`](crate::Qcow2Image::check_data_file_amend).
    pub(crate) fn amend_data_file(&mut self, name: Option<&str>, raw: Option<bool>) -> Result<()> {
        self.view.check_data_file_amend(name, raw, false)?;
        if self.view.data_ref().is_none() {
            return Ok(());
        }
        self.begin_write()?;
        self.flush()?;
        if let Some(n) = name {
            let exts = &mut self.view.header_mut().extensions_mut();
            let at = exts
                .iter()
                .position(|e| matches!(e, Extension::DataFile(_)))
                .unwrap_or_else(|| {
                    exts.iter()
                        .position(|e| matches!(e, Extension::BackingFormat(_)))
                        .map_or(0, |i| i + 1)
                });
            exts.retain(|e| !matches!(e, Extension::DataFile(_)));
            if !n.is_empty() {
                exts.insert(at.min(exts.len()), Extension::DataFile(n.to_string()));
            }
        }
        if raw == Some(false) {
            let v = self.view.header().autoclear_features() - Autoclear::DATA_FILE_RAW;
            self.view.header_mut().set_autoclear(v);
        }
        self.write_header()?;
        self.sync()
    }

    /// The disk was resized from `old` to `new` bytes: as QEMU truncates
    /// the data file with the image, a growth extends a shorter data file
    /// to the new size and a shrink cuts it there; with `data_file_raw`
    /// the new clusters are mapped at once (metadata preallocation, as
    /// QEMU's truncate of such an image), so the raw file stays the guest
    /// view.
    pub(crate) fn data_file_resized(&mut self, old: u64, new: u64) -> Result<()> {
        let Some(d) = self.view.data_ref().clone() else {
            return Ok(());
        };
        let storage = d.storage()?;
        let io = |op, at, e| {
            let e = Error::io(d.path(), op, at, e);
            self.poisoned.set(&e);
            e
        };
        let len = storage.len().map_err(|e| io("stat", 0, e))?;
        if (new > old && len < new) || new < old {
            storage
                .set_len(new)
                .map_err(|e| io("resize data file", new, e))?;
        }
        if new > old && d.is_raw() {
            self.preallocate(crate::write::PreallocFill::Sparse)?;
        }
        Ok(())
    }

    /// With `data_file_raw`, writes zeros into the data file for
    /// `[offset, offset+len)` of the guest (QEMU's
    /// `qcow2_subcluster_zeroize` does it before the metadata), so that
    /// the raw file stays the guest view.
    pub(crate) fn zero_raw_data_file(&self, offset: u64, len: u64) -> Result<()> {
        let Some(d) = self.view.data_ref().as_ref().filter(|d| d.is_raw()) else {
            return Ok(());
        };
        let storage = d.storage()?;
        let end = offset.saturating_add(len).min(self.view.virtual_size());
        let chunk = vec![0u8; (end.saturating_sub(offset)).min(1 << 20) as usize];
        let mut at = offset;
        while at < end {
            let n = (end - at).min(chunk.len() as u64);
            d.cancel_discards(at, n);
            let r = storage.write_at(&chunk[..n as usize], at);
            r.map_err(|e| {
                let e = Error::io(d.path(), "write zeros", at, e);
                self.poisoned.set(&e);
                e
            })?;
            at += n;
        }
        Ok(())
    }

    /// Preallocation with a data file: the clusters of the table at `toff`
    /// in `[g, g + n clusters)` get host offsets equal to their guest
    /// offsets; the data file is extended (and reserved or zeroed) to
    /// hold them. Returns the host offsets, in order.
    pub(crate) fn data_file_prealloc(
        &self,
        first_guest: u64,
        n: u64,
        fill: crate::write::PreallocFill,
    ) -> Result<()> {
        let Some(d) = &self.view.data_ref() else {
            return Ok(());
        };
        let storage = d.storage()?;
        let cs = self.view.geometry().cluster_size();
        let start = first_guest;
        let end = (first_guest + n * cs).min(self.view.virtual_size().next_multiple_of(cs));
        let io = |op, at, e| {
            let e = Error::io(d.path(), op, at, e);
            self.poisoned.set(&e);
            e
        };
        let len = storage.len().map_err(|e| io("stat", 0, e))?;
        let size_end = end.min(self.view.virtual_size());
        if size_end > len {
            storage
                .set_len(size_end)
                .map_err(|e| io("extend data file", size_end, e))?;
        }
        match fill {
            crate::write::PreallocFill::Sparse => {}
            crate::write::PreallocFill::Fallocate => {
                if let Some(f) = storage.file() {
                    let (o, l) = (start as i64, (size_end - start) as i64);
                    nix::fcntl::posix_fallocate(f, o, l)
                        .map_err(|e| io("fallocate", start, std::io::Error::from(e)))?;
                }
            }
            crate::write::PreallocFill::Zeros => {
                let zeros = vec![0u8; cs as usize];
                let mut at = start;
                while at < size_end {
                    let k = (size_end - at).min(cs) as usize;
                    storage
                        .write_at(&zeros[..k], at)
                        .map_err(|e| io("write zeros", at, e))?;
                    at += cs;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_names_are_refused_without_panicking() {
        let img = Path::new("img.qcow2");
        for bad in ["", "a\0b", "json:{}", "nbd:localhost:10809"] {
            assert!(check_name(bad, img).is_err(), "{bad:?}");
        }
        assert!(check_name(&"x".repeat(5000), img).is_err());
        assert!(check_name("../d/x.data", img).is_ok());
        assert!(check_name("/abs/x.data", img).is_ok());
    }

    #[test]
    fn relative_names_are_opened_as_qemu_opens_them() {
        assert_eq!(resolve("x.data"), PathBuf::from("x.data"));
        assert_eq!(resolve("/a/x.data"), PathBuf::from("/a/x.data"));
    }
}
