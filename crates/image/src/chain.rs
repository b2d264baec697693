//! Backing chains: open an image and its backing files, resolve any guest
//! range down the chain, read the guest view.
//!
//! Policy (see docs/hostile-images.md, "Backing-file policy", and
//! [`crate::backing`]): a backing file's format comes from
//! the image's backing-format extension (never from probing its contents);
//! relative names resolve against the directory of the image naming them;
//! protocol names (`json:`, `nbd:`, ...) are refused; loops and chains
//! deeper than [`limits::MAX_CHAIN_DEPTH`] are refused before any data is
//! read.

use std::fmt;
use std::path::{Path, PathBuf};

use strata_format::header::has_qcow2_magic;
use strata_format::limits;

use crate::backing::{check_backing, BackingRef, FileId};
pub use crate::backing::{is_protocol_name, resolve_backing_path};
use crate::error::{Error, Result};
use crate::lock::{ImageLock, LockMode};
use crate::mapping::{Extent, Mapping};
use crate::qcow2::Qcow2Image;
use crate::raw::RawImage;
use crate::storage::{FileStorage, MappedBytes, Storage};

/// An image format Strata reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    /// qcow2 (versions 2 and 3).
    Qcow2,
    /// A raw disk image.
    Raw,
}

impl ImageFormat {
    /// Parses a format name as qemu-img spells it.
    pub fn from_name(name: &str) -> Option<ImageFormat> {
        match name {
            "qcow2" => Some(ImageFormat::Qcow2),
            "raw" => Some(ImageFormat::Raw),
            _ => None,
        }
    }
    /// The name as qemu-img spells it.
    pub fn name(self) -> &'static str {
        match self {
            ImageFormat::Qcow2 => "qcow2",
            ImageFormat::Raw => "raw",
        }
    }
}

impl fmt::Display for ImageFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An open image of either format.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // one per layer; boxing buys nothing
pub enum Image {
    /// A qcow2 image.
    Qcow2(Qcow2Image),
    /// A raw image.
    Raw(RawImage),
}

impl Image {
    /// Opens `storage` as `format`.
    pub fn open(storage: Box<dyn Storage>, path: &Path, format: ImageFormat) -> Result<Image> {
        Ok(match format {
            ImageFormat::Qcow2 => Image::Qcow2(Qcow2Image::open(storage, path)?),
            ImageFormat::Raw => Image::Raw(RawImage::open(storage, path)?),
        })
    }
    /// The image's format.
    pub fn format(&self) -> ImageFormat {
        match self {
            Image::Qcow2(_) => ImageFormat::Qcow2,
            Image::Raw(_) => ImageFormat::Raw,
        }
    }
    /// Virtual size in bytes.
    pub fn virtual_size(&self) -> u64 {
        match self {
            Image::Qcow2(q) => q.virtual_size(),
            Image::Raw(r) => r.virtual_size(),
        }
    }
    /// The path the image was opened from.
    pub fn path(&self) -> &Path {
        match self {
            Image::Qcow2(q) => q.path(),
            Image::Raw(r) => r.path(),
        }
    }
    /// The storage the image lives on.
    pub fn storage(&self) -> &dyn Storage {
        match self {
            Image::Qcow2(q) => q.storage(),
            Image::Raw(r) => r.storage(),
        }
    }
    /// The storage data clusters' host offsets point into: a qcow2
    /// image's external data file when it has one, else [`Image::storage`].
    pub fn data_storage(&self) -> Result<&dyn Storage> {
        match self {
            Image::Qcow2(q) => q.data_storage(),
            Image::Raw(r) => Ok(r.storage()),
        }
    }
    /// The extent of this image alone at `start`.
    pub fn map(&self, start: u64, max_len: u64) -> Result<Extent> {
        match self {
            Image::Qcow2(q) => q.map(start, max_len),
            Image::Raw(r) => r.map(start, max_len),
        }
    }
    /// Reads bytes this image maps with `m` at `guest`.
    pub fn read_mapped(&self, m: Mapping, guest: u64, buf: &mut [u8]) -> Result<()> {
        match self {
            Image::Qcow2(q) => q.read_mapped(m, guest, buf),
            Image::Raw(r) => match m {
                Mapping::Data { .. } => r.read(buf, guest),
                _ => {
                    buf.fill(0);
                    Ok(())
                }
            },
        }
    }
    /// What [`Image::read_mapped`] would read for `len` bytes mapped with
    /// `m`, mapped in place instead of copied, when the image stores them
    /// uncompressed on a storage that can map.
    pub fn mapped_data(&self, m: Mapping, len: usize) -> Result<Option<MappedBytes>> {
        let Mapping::Data { host } = m else {
            return Ok(None);
        };
        self.data_storage()?
            .mapped(host.get(), len)
            .map_err(|e| Error::io(self.path(), "map data", host.get(), e))
    }
    /// The backing file name and format recorded in the image.
    pub fn backing(&self) -> (Option<&str>, Option<&str>) {
        match self {
            Image::Qcow2(q) => (
                q.header().backing_file().filter(|n| !n.is_empty()),
                q.header().backing_format(),
            ),
            Image::Raw(_) => (None, None),
        }
    }
    /// The qcow2 image, if it is one.
    pub fn as_qcow2(&self) -> Option<&Qcow2Image> {
        match self {
            Image::Qcow2(q) => Some(q),
            Image::Raw(_) => None,
        }
    }
}

/// One image of a chain.
#[derive(Debug)]
pub struct Layer {
    /// Path of the image file (as resolved, not canonicalised).
    pub path: PathBuf,
    /// The backing name as the image above recorded it (None for the top).
    pub named_as: Option<String>,
    /// The open image.
    pub image: Image,
    /// The lock held on the file while it is open.
    _lock: Option<ImageLock>,
}

impl Layer {
    /// A layer from an already open image (no lock is taken).
    pub fn new(path: PathBuf, named_as: Option<String>, image: Image) -> Layer {
        Layer {
            path,
            named_as,
            image,
            _lock: None,
        }
    }
}

/// What the write path does, at the first write to a qcow2 image, with a
/// state it could only write through by changing the image beyond the
/// write itself. Every choice defaults to refusing (an
/// [`Error::ReadOnly`] naming the image and the state, before anything is
/// written); [`WritePolicy::qemu`] is what QEMU does when it opens an
/// image read-write (the CLI's `io`, `resize` and `bitmap` use it, as
/// qemu-io and qemu-img do).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct WritePolicy {
    /// A dirty image (lazy refcounts left unrepaired by a crash).
    pub dirty: OnDirty,
    /// Persistent dirty bitmaps that cannot be read (a damaged bitmap
    /// directory or table).
    pub bitmaps: OnBadBitmaps,
    /// Autoclear feature bits Strata does not know.
    pub unknown_autoclear: OnUnknownAutoclear,
}

impl WritePolicy {
    /// Refuse every such state (the default).
    pub const REFUSE: WritePolicy = WritePolicy {
        dirty: OnDirty::Refuse,
        bitmaps: OnBadBitmaps::Refuse,
        unknown_autoclear: OnUnknownAutoclear::Refuse,
    };
    /// Sets [`WritePolicy::dirty`].
    pub const fn dirty(mut self, on: OnDirty) -> WritePolicy {
        self.dirty = on;
        self
    }
    /// Sets [`WritePolicy::bitmaps`].
    pub const fn bitmaps(mut self, on: OnBadBitmaps) -> WritePolicy {
        self.bitmaps = on;
        self
    }
    /// Sets [`WritePolicy::unknown_autoclear`].
    pub const fn unknown_autoclear(mut self, on: OnUnknownAutoclear) -> WritePolicy {
        self.unknown_autoclear = on;
        self
    }
    /// What QEMU does opening an image read-write: repair a dirty image
    /// (rebuild its refcounts), refuse unreadable bitmaps, clear unknown
    /// autoclear bits.
    #[must_use]
    pub const fn qemu() -> WritePolicy {
        WritePolicy {
            dirty: OnDirty::Repair,
            bitmaps: OnBadBitmaps::Refuse,
            unknown_autoclear: OnUnknownAutoclear::Clear,
        }
    }
}

/// See [`WritePolicy::dirty`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum OnDirty {
    /// Refuse to write (repair with `strata check -r all` first).
    #[default]
    Refuse,
    /// Rebuild the refcounts, then clear the dirty bit (QEMU's way).
    Repair,
}

/// See [`WritePolicy::bitmaps`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum OnBadBitmaps {
    /// Refuse to write (QEMU refuses to open such an image read-write).
    #[default]
    Refuse,
    /// Write, clearing the bitmaps' autoclear bit: every bitmap is then
    /// inconsistent and ignored, as after a program without bitmap support
    /// wrote the image (the next incremental backup must be a full one).
    Drop,
}

/// See [`WritePolicy::unknown_autoclear`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum OnUnknownAutoclear {
    /// Refuse to write.
    #[default]
    Refuse,
    /// Clear them (what the bits' definition asks of a program that does
    /// not know them, and what QEMU does).
    Clear,
}

/// How to open a chain.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct OpenOptions {
    /// Format of the top image; `None` probes it (the top only: backing
    /// files are never probed).
    pub format: Option<ImageFormat>,
    /// Take no locks and tolerate other users, as `qemu-img -U`.
    pub force_share: bool,
    /// Open the top image for writing.
    pub writable: bool,
    /// Do not open backing files (the chain is the top image alone).
    pub no_backing: bool,
    /// When set, every backing file must lie under this directory.
    pub confine_to: Option<PathBuf>,
    /// A chain deeper than [`limits::MAX_CHAIN_DEPTH`] opens: the first
    /// layer past the limit is a stand-in that is not opened, whose every
    /// read fails (so an operation that never reads that deep, such as a
    /// commit into the parent, works on any depth, and one that does
    /// fails with a clear error instead of reading zeros). The stand-in
    /// resolves as data everywhere: code that asks whether a range may
    /// hold data gets the cautious answer. Deeper layers are not opened,
    /// so memory stays bounded by the limit.
    pub stub_beyond_limit: bool,
    /// What the first write to the (qcow2) top image does with a dirty
    /// image, unreadable bitmaps or unknown autoclear bits: refuse by
    /// default (see [`WritePolicy`]).
    pub write_policy: WritePolicy,
    /// Show this internal snapshot of the top image instead of its
    /// active state (read-only; `qemu-img convert -l`). Backing files
    /// are those of the image.
    pub snapshot: Option<crate::snapshot_internal::SnapshotRef>,
    /// The deepest chain that opens in full, instead of
    /// [`limits::MAX_CHAIN_DEPTH`] (`None`). Operations that read every
    /// layer (map, convert, `info --backing-chain`) raise it to
    /// [`READ_CHAIN_DEPTH`], as qemu-img opens such chains; deeper than
    /// the limit is refused, or stubbed with `stub_beyond_limit`.
    pub depth_limit: Option<usize>,
    /// Open qcow2 images whose external data file is missing (their
    /// metadata only, as `qemu-img info` opens them: it never opens the
    /// data file). Reads of their data then fail, naming the data file.
    pub without_data_file: bool,
}

impl OpenOptions {
    /// The default options: read-only, locking, probing the top's format,
    /// the whole chain, the refusing write policy.
    pub fn new() -> OpenOptions {
        OpenOptions::default()
    }
    /// Sets [`OpenOptions::format`].
    pub fn format(mut self, format: Option<ImageFormat>) -> OpenOptions {
        self.format = format;
        self
    }
    /// Sets [`OpenOptions::force_share`].
    pub fn force_share(mut self, yes: bool) -> OpenOptions {
        self.force_share = yes;
        self
    }
    /// Sets [`OpenOptions::writable`].
    pub fn writable(mut self, yes: bool) -> OpenOptions {
        self.writable = yes;
        self
    }
    /// Sets [`OpenOptions::without_data_file`].
    pub fn without_data_file(mut self, yes: bool) -> OpenOptions {
        self.without_data_file = yes;
        self
    }
    /// Sets [`OpenOptions::no_backing`].
    pub fn no_backing(mut self, yes: bool) -> OpenOptions {
        self.no_backing = yes;
        self
    }
    /// Sets [`OpenOptions::confine_to`].
    pub fn confine_to(mut self, dir: Option<PathBuf>) -> OpenOptions {
        self.confine_to = dir;
        self
    }
    /// Sets [`OpenOptions::stub_beyond_limit`].
    pub fn stub_beyond_limit(mut self, yes: bool) -> OpenOptions {
        self.stub_beyond_limit = yes;
        self
    }
    /// Sets [`OpenOptions::depth_limit`].
    pub fn depth_limit(mut self, limit: Option<usize>) -> OpenOptions {
        self.depth_limit = limit;
        self
    }
    /// Sets [`OpenOptions::write_policy`].
    pub fn write_policy(mut self, policy: WritePolicy) -> OpenOptions {
        self.write_policy = policy;
        self
    }
    /// Sets [`OpenOptions::snapshot`].
    pub fn snapshot(
        mut self,
        snapshot: Option<crate::snapshot_internal::SnapshotRef>,
    ) -> OpenOptions {
        self.snapshot = snapshot;
        self
    }
}

/// The depth limit ([`OpenOptions::depth_limit`]) of operations that read
/// every layer of a chain: qemu-img maps and converts a chain of 200
/// images; each open layer costs a file descriptor, its L1 table and a
/// bounded L2 cache (512 stays clear of the usual limit of 1024 open files).
pub const READ_CHAIN_DEPTH: usize = 512;

/// The stand-in for the layers past the depth limit (see
/// [`OpenOptions::stub_beyond_limit`]).
#[derive(Debug)]
struct NotOpened {
    path: PathBuf,
}

impl NotOpened {
    fn err(&self) -> std::io::Error {
        std::io::Error::other(format!(
            "{} lies deeper than {} images in the backing chain and was not opened; \
             this operation would read it",
            self.path.display(),
            limits::MAX_CHAIN_DEPTH
        ))
    }
}

impl Storage for NotOpened {
    fn read_at(&self, _buf: &mut [u8], _offset: u64) -> std::io::Result<usize> {
        Err(self.err())
    }
    fn write_at(&self, _buf: &[u8], _offset: u64) -> std::io::Result<()> {
        Err(self.err())
    }
    fn len(&self) -> std::io::Result<u64> {
        Ok(limits::MAX_VIRTUAL_SIZE)
    }
    fn set_len(&self, _len: u64) -> std::io::Result<()> {
        Err(self.err())
    }
    fn sync(&self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Where a guest range is resolved to: the first layer that allocates it
/// (block status derives QEMU's answers from it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Resolved {
    /// The extent, in the layer that answers for it.
    pub extent: Extent,
    /// Index of that layer (0 = top). Equal to the number of layers when no
    /// layer allocates the range (it reads as zeros).
    pub depth: usize,
    /// True when the range lies past the end of the layer at `depth` (a
    /// backing file shorter than the image above it): it reads as zeros.
    pub past_end: bool,
}

/// An image and its backing files, top first.
///
/// Dropping a chain flushes its top image; a flush error can then only be
/// logged (to standard error): call [`Chain::close`] to get it.
#[derive(Debug)]
pub struct Chain {
    layers: Vec<Layer>,
}

impl Chain {
    /// Opens `path` and its backing chain from files.
    pub fn open(path: &Path, opts: &OpenOptions) -> Result<Chain> {
        let open_file = |p: &Path,
                         writable: bool,
                         named_as: Option<String>,
                         fmt: Option<ImageFormat>|
         -> Result<Layer> {
            let storage = FileStorage::open(p, writable).map_err(|e| Error::io(p, "open", 0, e))?;
            let lock = if opts.force_share {
                None
            } else {
                let file = storage
                    .file()
                    .ok_or_else(|| Error::InvalidArgument("no file to lock".into()))?;
                let mode = if writable {
                    LockMode::ReadWrite
                } else {
                    LockMode::ReadOnly
                };
                Some(ImageLock::acquire(file, p, mode)?)
            };
            let format = match fmt {
                Some(f) => f,
                None => {
                    let mut magic = [0u8; 4];
                    storage
                        .read_at(&mut magic, 0)
                        .map_err(|e| Error::io(p, "read", 0, e))?;
                    if has_qcow2_magic(&magic) {
                        ImageFormat::Qcow2
                    } else {
                        ImageFormat::Raw
                    }
                }
            };
            let image = match (format, writable) {
                (ImageFormat::Qcow2, true) => {
                    let mut q = Qcow2Image::open_rw(Box::new(storage), p)?;
                    q.set_write_policy(opts.write_policy)?;
                    Image::Qcow2(q)
                }
                _ => Image::open(Box::new(storage), p, format)?,
            };
            // An external data file is opened with the image, and locked
            // as QEMU locks it (qcow2/data_file.rs).
            if let Image::Qcow2(q) = &image {
                if let Some(d) = q.data_file() {
                    let open = d.storage().map(|_| ());
                    if !opts.without_data_file || open.is_ok() {
                        open?;
                        if !opts.force_share {
                            d.lock(writable)?;
                        }
                    }
                }
            }
            Ok(Layer {
                path: p.to_path_buf(),
                named_as,
                image,
                _lock: lock,
            })
        };
        let mut top = open_file(path, opts.writable, None, opts.format)?;
        if let Some(sel) = &opts.snapshot {
            match &mut top.image {
                Image::Qcow2(q) => q.load_snapshot(sel)?,
                Image::Raw(_) => {
                    return Err(Error::Unsupported {
                        path: path.to_path_buf(),
                        what: "Block format 'raw' does not support temporarily loading \
                               internal snapshots"
                            .into(),
                    })
                }
            }
        }
        let mut chain = Chain { layers: vec![top] };
        if opts.no_backing {
            return Ok(chain);
        }
        let mut ids = vec![FileId::of(path).map_err(|e| Error::io(path, "stat", 0, e))?];
        let confine = match &opts.confine_to {
            Some(dir) => Some(
                std::fs::canonicalize(dir)
                    .map_err(|e| Error::io(dir, "resolve directory", 0, e))?,
            ),
            None => None,
        };
        loop {
            let parent = chain
                .layers
                .last()
                .map(|l| l.path.clone())
                .unwrap_or_default();
            let backing = match chain.layers.last() {
                Some(l) => {
                    let (n, f) = l.image.backing();
                    n.map(|n| BackingRef {
                        name: n.to_string(),
                        format: f.map(str::to_string),
                    })
                }
                None => None,
            };
            let Some(backing) = backing else { break };
            let (bpath, format) = check_backing(&parent, &backing)?;
            let name = backing.name;
            let limit = opts.depth_limit.unwrap_or(limits::MAX_CHAIN_DEPTH);
            if chain.layers.len() >= limit && opts.stub_beyond_limit {
                let storage = NotOpened {
                    path: bpath.clone(),
                };
                chain.layers.push(Layer {
                    path: bpath.clone(),
                    named_as: Some(name),
                    image: Image::Raw(RawImage::open(Box::new(storage), &bpath)?),
                    _lock: None,
                });
                break;
            }
            if chain.layers.len() >= limit {
                return Err(Error::ChainTooDeep {
                    path: path.to_path_buf(),
                    limit,
                });
            }
            let id = FileId::of(&bpath).map_err(|e| Error::Backing {
                path: parent.clone(),
                backing: name.clone(),
                why: format!("cannot open {}: {e}", bpath.display()),
            })?;
            if ids.contains(&id) {
                return Err(Error::BackingLoop {
                    path: parent.clone(),
                    backing: bpath,
                });
            }
            if let Some(dir) = &confine {
                let canon = std::fs::canonicalize(&bpath)
                    .map_err(|e| Error::io(&bpath, "resolve path", 0, e))?;
                if !canon.starts_with(dir) {
                    return Err(Error::Backing {
                        path: parent.clone(),
                        backing: name.clone(),
                        why: format!(
                            "{} is outside the allowed directory {}",
                            canon.display(),
                            dir.display()
                        ),
                    });
                }
            }
            ids.push(id);
            let layer = match open_file(&bpath, false, Some(name.clone()), Some(format)) {
                Ok(l) => l,
                // Keep lock conflicts as they are; name the image that
                // points at a backing file that cannot be opened.
                Err(e @ Error::Lock(_)) => return Err(e),
                Err(e) => {
                    return Err(Error::Backing {
                        path: parent.clone(),
                        backing: name,
                        why: e.to_string(),
                    })
                }
            };
            chain.layers.push(layer);
        }
        Ok(chain)
    }

    /// A chain of already open layers (top first), e.g. on memory storage.
    pub fn from_layers(layers: Vec<Layer>) -> Result<Chain> {
        if layers.is_empty() {
            return Err(Error::InvalidArgument(
                "a chain needs at least one image".into(),
            ));
        }
        if layers.len() > limits::MAX_CHAIN_DEPTH {
            let path = layers.first().map(|l| l.path.clone()).unwrap_or_default();
            return Err(Error::ChainTooDeep {
                path,
                limit: limits::MAX_CHAIN_DEPTH,
            });
        }
        Ok(Chain { layers })
    }

    /// The layers, top first.
    pub fn layers(&self) -> &[Layer] {
        &self.layers
    }
    /// The layers, mutably (the write path uses the top).
    pub fn layers_mut(&mut self) -> &mut [Layer] {
        &mut self.layers
    }
    /// The top layer.
    pub fn top(&self) -> &Layer {
        // A chain always has at least one layer.
        &self.layers[0]
    }
    /// The guest-visible size (the top's virtual size).
    pub fn virtual_size(&self) -> u64 {
        self.top().image.virtual_size()
    }

    /// Reads the guest view at `offset` into `buf`, from layer `from`
    /// downwards (0: the whole chain). The range must lie inside layer
    /// `from`'s virtual disk.
    pub fn read_from(&self, from: usize, buf: &mut [u8], offset: u64) -> Result<()> {
        let layers = self.layers.get(from..).unwrap_or(&[]);
        let size = layers.first().map_or(0, |l| l.image.virtual_size());
        let len = buf.len() as u64;
        if offset.checked_add(len).is_none_or(|e| e > size) {
            let path = layers.first().map(|l| l.path.clone()).unwrap_or_default();
            return Err(Error::OutOfRange {
                path,
                offset,
                len,
                size,
            });
        }
        read_in(layers, buf, offset)
    }

    /// Reads the guest view at `offset` into `buf`.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.read_from(0, buf, offset)
    }

    /// The top image for writing, and the layers below it.
    fn split_top(&mut self) -> Result<(&mut Image, &[Layer])> {
        let (top, rest) = self
            .layers
            .split_first_mut()
            .ok_or_else(|| Error::InvalidArgument("empty chain".into()))?;
        Ok((&mut top.image, rest))
    }

    /// Writes `buf` at guest `offset` into the top image (copy-on-write
    /// from the layers below for partly written clusters).
    pub fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<()> {
        let (top, rest) = self.split_top()?;
        let below = |b: &mut [u8], off: u64| read_below(rest, b, off);
        match top {
            Image::Qcow2(q) => q.write(offset, buf, &below),
            Image::Raw(r) => r.write(buf, offset),
        }
    }

    /// Writes guest `[offset, offset+len)` of the top image with the
    /// bytes `src` holds at `src_offset`, moved by
    /// [`Storage::copy_range_from`] (a clone where the filesystem shares
    /// extents). A qcow2 top takes whole clusters only and no subclusters
    /// ([`Qcow2Image::write_range_from`]); a raw one any range.
    pub fn write_range_from(
        &mut self,
        offset: u64,
        len: u64,
        src: &dyn Storage,
        src_offset: u64,
    ) -> Result<()> {
        let (top, _) = self.split_top()?;
        write_range_into(top, offset, len, src, src_offset)
    }

    /// [`Chain::write_range_from`] with the bytes layer `depth` (below the
    /// top: at least 1) stores at host offset `src_offset`.
    pub fn write_range_from_layer(
        &mut self,
        offset: u64,
        len: u64,
        depth: usize,
        src_offset: u64,
    ) -> Result<()> {
        let (top, rest) = self
            .layers
            .split_first_mut()
            .ok_or_else(|| Error::InvalidArgument("empty chain".into()))?;
        let src = depth
            .checked_sub(1)
            .and_then(|d| rest.get(d))
            .ok_or_else(|| Error::InvalidArgument(format!("no layer {depth} below the top")))?;
        write_range_into(
            &mut top.image,
            offset,
            len,
            src.image.data_storage()?,
            src_offset,
        )
    }

    /// Makes `[offset, offset+len)` read as zeros in the top image.
    pub fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        if let Some((a, b)) = self.v2_deallocatable(offset, len)? {
            // A v2 image has no zero flag; without a backing file an
            // unallocated cluster reads as zeros, so whole clusters are
            // deallocated, as QEMU's qcow2_subcluster_zeroize discards
            // them (iotests 061, 112; issue 15 defect 8). A partial
            // cluster at an edge counts as whole when none of it holds
            // data (QEMU's is_zero head/tail extension); else it gets
            // written zeros.
            let end = offset + len;
            let (top, rest) = self.split_top()?;
            let below = |b: &mut [u8], off: u64| read_below(rest, b, off);
            if let Image::Qcow2(q) = top {
                if a > offset {
                    q.write_zeroes(offset, a - offset, unmap, &below)?;
                }
                if b > a {
                    q.deallocate(a, b - a)?;
                }
                if end > b {
                    q.write_zeroes(b, end - b, unmap, &below)?;
                }
            }
            return Ok(());
        }
        let (top, rest) = self.split_top()?;
        let below = |b: &mut [u8], off: u64| read_below(rest, b, off);
        match top {
            Image::Qcow2(q) => q.write_zeroes(offset, len, unmap, &below),
            Image::Raw(r) => r.write_zeroes(offset, len),
        }
    }

    /// For a zero write on a v2 qcow2 image without a backing file: the
    /// range `[a, b)` of whole clusters to deallocate instead (see
    /// [`Chain::write_zeroes`]); `None` for other images or a range
    /// outside the disk (the ordinary path reports that).
    fn v2_deallocatable(&self, offset: u64, len: u64) -> Result<Option<(u64, u64)>> {
        let Some(Image::Qcow2(q)) = self.layers.first().map(|l| &l.image) else {
            return Ok(None);
        };
        if self.layers.len() != 1 {
            return Ok(None);
        }
        v2_deallocatable(q, offset, len)
    }

    /// Discards `[offset, offset+len)` in the top image, as QEMU does.
    pub fn discard(&mut self, offset: u64, len: u64) -> Result<()> {
        let has_backing = self.layers.len() > 1;
        let (top, _) = self.split_top()?;
        match top {
            Image::Qcow2(q) => q.discard(offset, len, has_backing),
            Image::Raw(r) => r.check_range(offset, len),
        }
    }

    /// Closes the chain: flushes the top image and returns the flush's
    /// error (a drop flushes too, but can only log a failure).
    #[must_use = "the flush error is the point of close()"]
    pub fn close(self) -> Result<()> {
        let Some(top) = self.layers.into_iter().next() else {
            return Ok(());
        };
        match top.image {
            Image::Qcow2(q) => q.close(),
            Image::Raw(mut r) => r.flush(),
        }
    }

    /// Makes all writes to the top image durable.
    pub fn flush(&mut self) -> Result<()> {
        let (top, _) = self.split_top()?;
        match top {
            Image::Qcow2(q) => q.flush(),
            Image::Raw(r) => r.flush(),
        }
    }
}

/// [`Chain::write_range_from`] on one image.
fn write_range_into(
    image: &mut Image,
    offset: u64,
    len: u64,
    src: &dyn Storage,
    src_offset: u64,
) -> Result<()> {
    match image {
        Image::Qcow2(q) => q.write_range_from(offset, len, src, src_offset),
        Image::Raw(r) => {
            let size = r.virtual_size();
            if offset.checked_add(len).is_none_or(|e| e > size) {
                return Err(Error::OutOfRange {
                    path: r.path().to_path_buf(),
                    offset,
                    len,
                    size,
                });
            }
            r.storage()
                .copy_range_from(src, src_offset, len, offset)
                .map(|_| ())
                .map_err(|e| Error::io(r.path(), "move data", offset, e))
        }
    }
}

/// Resolves a guest range down `layers` (depth relative to the slice): the
/// first layer that allocates it, and the longest extent with one answer.
pub(crate) fn resolve_in(layers: &[Layer], start: u64, max_len: u64) -> Result<Resolved> {
    let mut len = max_len;
    for (depth, layer) in layers.iter().enumerate() {
        let vs = layer.image.virtual_size();
        if start >= vs {
            return Ok(Resolved {
                extent: Extent {
                    start,
                    len,
                    mapping: Mapping::Zero { host: None },
                },
                depth,
                past_end: true,
            });
        }
        let e = layer.image.map(start, len.min(vs - start))?;
        if e.mapping.is_allocated() {
            return Ok(Resolved {
                extent: e,
                depth,
                past_end: false,
            });
        }
        len = e.len;
    }
    Ok(Resolved {
        extent: Extent {
            start,
            len,
            mapping: Mapping::Unallocated,
        },
        depth: layers.len(),
        past_end: false,
    })
}

/// Reads the guest view of `layers` (top first) at `offset`.
fn read_in(layers: &[Layer], buf: &mut [u8], offset: u64) -> Result<()> {
    let len = buf.len() as u64;
    let mut done = 0u64;
    while done < len {
        let pos = offset + done;
        let r = resolve_in(layers, pos, len - done)?;
        let n = r.extent.len.min(len - done) as usize;
        let chunk = &mut buf[done as usize..done as usize + n];
        match layers.get(r.depth) {
            Some(layer) if !r.past_end && r.extent.mapping.is_allocated() => {
                layer.image.read_mapped(r.extent.mapping, pos, chunk)?
            }
            _ => chunk.fill(0),
        }
        done += n as u64;
    }
    Ok(())
}

/// Reads what `layers` show at `offset`, zeros past the end of the first
/// (the view an image has of its backing chain).
pub fn read_below(layers: &[Layer], buf: &mut [u8], offset: u64) -> Result<()> {
    let size = layers.first().map_or(0, |l| l.image.virtual_size());
    let inside = size.saturating_sub(offset).min(buf.len() as u64) as usize;
    let (head, tail) = buf.split_at_mut(inside);
    tail.fill(0);
    if inside > 0 {
        read_in(layers, head, offset)?;
    }
    Ok(())
}

/// [`Chain::write_zeroes`]'s range of whole clusters to deallocate for a
/// zero write of `[offset, offset+len)` on `q`, a v2 image read without a
/// backing file (`None` for a v3 image, or a range past the disk). Also
/// used by `convert -n` into such an image.
pub(crate) fn v2_deallocatable(
    q: &Qcow2Image,
    offset: u64,
    len: u64,
) -> Result<Option<(u64, u64)>> {
    let vs = q.virtual_size();
    let end = match offset.checked_add(len) {
        Some(e) if q.header().version() < 3 && e <= vs => e,
        _ => return Ok(None),
    };
    let cs = q.geometry().cluster_size();
    let cluster_end = |c: u64| c.saturating_add(cs).min(vs);
    // Whether the whole cluster at `c` reads as zeros by its mapping
    // (no data in it), as QEMU's is_zero asks the block status.
    let unallocated = |c: u64| -> Result<bool> {
        let mut pos = c;
        while pos < cluster_end(c) {
            let e = q.map(pos, cluster_end(c) - pos)?;
            if matches!(e.mapping, Mapping::Data { .. } | Mapping::Compressed(_)) {
                return Ok(false);
            }
            pos += e.len.max(1);
        }
        Ok(true)
    };
    let head = offset / cs * cs;
    let a = if head == offset || unallocated(head)? {
        head
    } else {
        cluster_end(head).min(end)
    };
    let tail = end / cs * cs;
    let b = if tail == end {
        end
    } else if tail >= a && unallocated(tail)? {
        cluster_end(tail)
    } else {
        tail
    };
    Ok(Some((a, b.max(a))))
}
