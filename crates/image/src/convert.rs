//! Copying the guest view of one or more chains into an image (`convert`),
//! raw or qcow2, with qemu-img convert's options.
//!
//! The walk follows the sources' block status ([`Chain::block_status`]):
//! ranges that are unallocated or zero in the metadata are never read, so
//! the cost follows the data, not the virtual size. Data is read (mapped in
//! place where the storage can) and scanned for zeros at the `-S`
//! granularity, as qemu-img does; all-zero blocks are left sparse (or
//! written as zeros where the target does not read as zeros already).
//!
//! The target's cache mode (`-t`) decides whether the writer's barriers and
//! the end of the convert sync it; the default, as qemu-img's, is
//! [`CacheMode::Unsafe`]: nothing is synced.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::block_status::BlockStatus;
use crate::chain::{read_below, Chain, Image, ImageFormat, OpenOptions};
use crate::create::{create_qcow2, create_raw, CreateOptions, NewImageFile};
use crate::error::{Error, Result};
use crate::qcow2::Qcow2Image;
use crate::raw::RawImage;
use crate::storage::{FileStorage, FsKind, RangeCopy, Storage};

/// Bytes read from a source per step (bounds memory).
pub const CONVERT_WINDOW: u64 = 4 << 20;
/// Data runs at least this long are mapped in place instead of read.
const MAP_MIN: u64 = 1 << 20;
/// qemu-img convert's default `-S`: zero blocks of 4 KiB are left sparse.
pub const SPARSE_BLOCK: u64 = 4096;
/// Largest `-S` qemu-img accepts (16 MiB).
pub const MAX_SPARSE: u64 = 16 << 20;

/// A cache mode (`-t` for the target, `-T` for the source), as QEMU
/// spells and means them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CacheMode {
    /// Bypass the host page cache (`O_DIRECT`); flushes are honoured.
    None,
    /// Through the page cache; flushes (the writer's barriers and the end
    /// of the convert) sync the file.
    Writeback,
    /// Through the page cache; flushes are ignored: nothing is synced
    /// (qemu-img convert's default for the target).
    #[default]
    Unsafe,
    /// `O_DIRECT`, and every write is durable before it completes.
    DirectSync,
    /// Through the page cache, every write durable before it completes.
    WriteThrough,
}

impl CacheMode {
    /// Parses a mode as QEMU spells it.
    pub fn from_name(name: &str) -> Option<CacheMode> {
        Some(match name {
            "none" | "off" => CacheMode::None,
            "writeback" => CacheMode::Writeback,
            "unsafe" => CacheMode::Unsafe,
            "directsync" => CacheMode::DirectSync,
            "writethrough" => CacheMode::WriteThrough,
            _ => return None,
        })
    }
    /// The name as QEMU spells it.
    pub fn name(self) -> &'static str {
        match self {
            CacheMode::None => "none",
            CacheMode::Writeback => "writeback",
            CacheMode::Unsafe => "unsafe",
            CacheMode::DirectSync => "directsync",
            CacheMode::WriteThrough => "writethrough",
        }
    }
    /// Whether the page cache is bypassed (`O_DIRECT`).
    pub fn direct(self) -> bool {
        matches!(self, CacheMode::None | CacheMode::DirectSync)
    }
    /// Whether flushes sync the file.
    pub fn flushes(self) -> bool {
        self != CacheMode::Unsafe
    }
    /// Whether each write is synced before it completes.
    pub fn write_through(self) -> bool {
        matches!(self, CacheMode::DirectSync | CacheMode::WriteThrough)
    }
}

/// Copy offload (`-C`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Offload {
    /// Where the storages allow (raw data runs into a raw target): extents
    /// are shared or copied in the kernel, else read and written.
    #[default]
    Auto,
    /// Required (`-C`): as qemu-img, refused with `-c` and with `-S`;
    /// zero detection on data is off (data is copied as it is).
    Required,
}

/// How to convert.
#[derive(Debug, Clone)]
pub struct ConvertOptions {
    /// Format of the target.
    pub format: ImageFormat,
    /// qcow2 options (the size is taken from the sources; `backing` is
    /// `-B`/`-F`: the target is an overlay of it, and only what the
    /// sources' top images allocate is written).
    pub create: CreateOptions,
    /// Compress data clusters (qcow2 only).
    pub compress: bool,
    /// Copy the top image's persistent dirty bitmaps (qcow2 to qcow2,
    /// as `qemu-img convert --bitmaps`).
    pub bitmaps: bool,
    /// `-S`: all-zero blocks of this many bytes (aligned in the target)
    /// are not written; 0 writes everything (fully allocates the target).
    pub sparse_size: u64,
    /// `-n`: write into the existing image at the path instead of creating
    /// one (it must be at least as large as the sources).
    pub existing: bool,
    /// `--target-is-zero` (with `-n`): the existing target reads as zeros,
    /// so zero ranges need not be written.
    pub target_is_zero: bool,
    /// `-C` or not.
    pub offload: Offload,
    /// `-t`: the target's cache mode.
    pub cache: CacheMode,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        ConvertOptions {
            format: ImageFormat::Qcow2,
            create: CreateOptions::default(),
            compress: false,
            bitmaps: false,
            sparse_size: SPARSE_BLOCK,
            existing: false,
            target_is_zero: false,
            offload: Offload::Auto,
            cache: CacheMode::Unsafe,
        }
    }
}

/// Checks option combinations as qemu-img does, with its messages.
fn check_options(sources: &[&Chain], opts: &ConvertOptions) -> Result<()> {
    let bad = |m: &str| Err(Error::InvalidArgument(m.into()));
    if sources.is_empty() {
        return bad("convert needs at least one source image");
    }
    if opts.compress && opts.format != ImageFormat::Qcow2 {
        return bad("compression (-c) needs a qcow2 target");
    }
    if opts.sparse_size > MAX_SPARSE || !opts.sparse_size.is_multiple_of(512) {
        return bad(
            "Invalid buffer size for sparse output specified. Valid sizes are multiples of \
             512 up to 16777216. Select 0 to disable sparse detection (fully allocates output).",
        );
    }
    if opts.compress && opts.create.data_file.is_some() {
        // QEMU creates the image, then fails its first write.
        return bad(
            "compression (-c) cannot be used with an external data file (data_file): \
             compressed clusters are invalid there (Operation not supported)",
        );
    }
    if opts.offload == Offload::Required && opts.compress {
        return bad("Cannot enable copy offloading when -c is used");
    }
    if opts.target_is_zero && !opts.existing {
        return bad("--target-is-zero requires use of -n flag");
    }
    if opts.create.backing.is_some() && opts.existing {
        return bad(
            "-B and -n cannot be used together (the existing target keeps its backing file)",
        );
    }
    if opts.create.backing.is_some() && opts.format != ImageFormat::Qcow2 {
        return bad("Format driver 'raw' does not support backing files");
    }
    if opts.create.backing.is_some() && sources.len() > 1 {
        // qemu-img's refusal (iotest 122, "concatenate multiple source
        // images").
        return bad(
            "Having a backing file for the target makes no sense when concatenating multiple \
             input images",
        );
    }
    if opts.bitmaps && sources.len() > 1 {
        return bad("--bitmaps is incompatible with multiple source images");
    }
    if opts.bitmaps && opts.existing {
        return bad("--bitmaps is not supported with -n");
    }
    Ok(())
}

/// Writes the guest view of `src` into a new image at `dst` (see
/// [`convert_sources`]).
pub fn convert(
    src: &Chain,
    dst: &Path,
    opts: &ConvertOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<()> {
    convert_sources(&[src], dst, opts, progress)
}

/// Writes the guest views of `sources`, one after the other (their sizes
/// add up), into `dst`.
///
/// A new image (no `-n`) replaces the file at `dst` (if any) only once
/// complete, under its write lock ([`NewImageFile`]): a convert that fails
/// leaves `dst` as it was. With a cache mode other than
/// [`CacheMode::Unsafe`] the new file is synced before the rename. With
/// `-n` the existing image is written in place (as qemu-img does).
/// `progress(done, total)` is called per step.
pub fn convert_sources(
    sources: &[&Chain],
    dst: &Path,
    opts: &ConvertOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<()> {
    check_options(sources, opts)?;
    let total = total_size(sources, dst)?;
    let bitmaps = match sources {
        [one] if opts.bitmaps => source_bitmaps(one, opts.format)?,
        _ => Vec::new(),
    };
    if opts.existing {
        let mut target = Target::open_existing(dst, opts, total)?;
        copy_all(sources, &mut target, opts, progress)?;
        return target.finish(&bitmaps);
    }
    let create = match opts.format {
        ImageFormat::Qcow2 => {
            let mut c = opts.create.clone();
            c.size = total;
            crate::create::check_qcow2_options(dst, &c)?;
            Some(c)
        }
        ImageFormat::Raw => None,
    };
    let new = NewImageFile::begin(dst)?;
    let storage = cached(new.storage()?, opts.cache, dst)?;
    let mut target = Target::create(storage, dst, create.as_ref(), total)?;
    copy_all(sources, &mut target, opts, progress)?;
    target.finish(&bitmaps)?;
    new.commit_synced(opts.cache.flushes())
}

fn total_size(sources: &[&Chain], dst: &Path) -> Result<u64> {
    sources
        .iter()
        .try_fold(0u64, |a, c| a.checked_add(c.virtual_size()))
        .ok_or_else(|| {
            Error::InvalidArgument(format!(
                "{}: the sources' sizes add up to more than 2^64 bytes",
                dst.display()
            ))
        })
}

/// `storage` with cache mode `mode`.
fn cached(storage: FileStorage, mode: CacheMode, path: &Path) -> Result<CachedStorage> {
    let direct = if mode.direct() {
        let file = storage
            .file()
            .ok_or_else(|| Error::InvalidArgument("no file for O_DIRECT".into()))?;
        Some(open_direct(file).map_err(|e| Error::io(path, "open with O_DIRECT", 0, e))?)
    } else {
        None
    };
    Ok(CachedStorage {
        inner: storage,
        mode,
        direct,
    })
}

/// A second descriptor of `file`, opened with `O_DIRECT`.
fn open_direct(file: &File) -> std::io::Result<File> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(format!("/proc/self/fd/{}", file.as_raw_fd()))
}

/// Alignment of `O_DIRECT` writes (offsets, lengths and buffers).
const DIRECT_ALIGN: u64 = 4096;

/// A target file with a cache mode: flushes are ignored (`unsafe`) or
/// honoured, each write is synced (`writethrough`, `directsync`), and
/// aligned writes bypass the page cache (`none`, `directsync`; unaligned
/// ones, a few metadata writes, go through it).
#[derive(Debug)]
struct CachedStorage {
    inner: FileStorage,
    mode: CacheMode,
    direct: Option<File>,
}

impl CachedStorage {
    fn after_write(&self) -> std::io::Result<()> {
        if self.mode.write_through() {
            self.inner.sync()?;
        }
        Ok(())
    }
}

impl Storage for CachedStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        let len = buf.len() as u64;
        match &self.direct {
            Some(d)
                if offset.is_multiple_of(DIRECT_ALIGN)
                    && len.is_multiple_of(DIRECT_ALIGN)
                    && len > 0 =>
            {
                // A bounce buffer: O_DIRECT needs aligned memory too.
                let mut bounce = vec![0u8; buf.len() + DIRECT_ALIGN as usize];
                let at = bounce.as_ptr().align_offset(DIRECT_ALIGN as usize);
                let aligned = &mut bounce[at..at + buf.len()];
                aligned.copy_from_slice(buf);
                d.write_all_at(aligned, offset)?;
            }
            _ => self.inner.write_at(buf, offset)?,
        }
        self.after_write()
    }
    fn write_vectored_at(&self, bufs: &[&[u8]], offset: u64) -> std::io::Result<()> {
        if self.direct.is_some() {
            let mut at = offset;
            for b in bufs {
                self.write_at(b, at)?;
                at += b.len() as u64;
            }
            return Ok(());
        }
        self.inner.write_vectored_at(bufs, offset)?;
        self.after_write()
    }
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.inner.set_len(len)
    }
    fn sync(&self) -> std::io::Result<()> {
        if self.mode.flushes() {
            self.inner.sync()
        } else {
            Ok(())
        }
    }
    fn data_run(&self, offset: u64, len: u64) -> std::io::Result<(bool, u64)> {
        self.inner.data_run(offset, len)
    }
    fn allocated_bytes(&self) -> std::io::Result<u64> {
        self.inner.allocated_bytes()
    }
    fn file(&self) -> Option<&File> {
        self.inner.file()
    }
    fn punch_hole(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.inner.punch_hole(offset, len)
    }
    fn copy_range_from(
        &self,
        src: &dyn Storage,
        src_offset: u64,
        len: u64,
        dst_offset: u64,
    ) -> std::io::Result<RangeCopy> {
        let how = self
            .inner
            .copy_range_from(src, src_offset, len, dst_offset)?;
        self.after_write()?;
        Ok(how)
    }
    fn clones_from(&self, src: &dyn Storage) -> bool {
        self.inner.clones_from(src)
    }
    fn clone_granule(&self) -> u64 {
        self.inner.clone_granule()
    }
    fn filesystem(&self) -> FsKind {
        self.inner.filesystem()
    }
}

/// The image being written.
struct Target {
    image: Image,
    path: PathBuf,
    /// The target's backing chain (`-B`), for copy-on-write of partly
    /// written clusters.
    backing: Option<Chain>,
    /// Whether the target reads as zeros where nothing is written (a new
    /// image without a backing file, or `--target-is-zero`).
    zero_init: bool,
    /// The write lock on an existing target (`-n`).
    _lock: Option<crate::lock::ImageLock>,
}

impl Target {
    fn create(
        storage: CachedStorage,
        dst: &Path,
        create: Option<&CreateOptions>,
        size: u64,
    ) -> Result<Target> {
        let (image, backing) = match create {
            None => {
                create_raw(&storage, dst, size)?;
                // As QEMU's file driver does on create (allocate_first_block,
                // for probing O_DIRECT alignment later): the first 4 KiB are
                // written, so the file's layout is qemu-img's.
                let first = vec![0u8; size.min(4096) as usize];
                storage
                    .write_at(&first, 0)
                    .map_err(|e| Error::io(dst, "write", 0, e))?;
                (Image::Raw(RawImage::open(Box::new(storage), dst)?), None)
            }
            Some(c) => {
                let backing = match &c.backing {
                    Some((name, fmt)) => {
                        let p = crate::chain::resolve_backing_path(dst, name);
                        let o = OpenOptions {
                            format: Some(*fmt),
                            force_share: true,
                            depth_limit: Some(crate::chain::READ_CHAIN_DEPTH),
                            ..OpenOptions::default()
                        };
                        Some(Chain::open(&p, &o)?)
                    }
                    None => None,
                };
                let q = create_qcow2(Box::new(storage), dst, c)?;
                // Its external data file is locked as QEMU locks it.
                if let Some(d) = q.data_file() {
                    d.lock(true)?;
                }
                (Image::Qcow2(q), backing)
            }
        };
        Ok(Target {
            image,
            path: dst.to_path_buf(),
            zero_init: backing.is_none(),
            backing,
            _lock: None,
        })
    }

    fn open_existing(dst: &Path, opts: &ConvertOptions, size: u64) -> Result<Target> {
        let o = OpenOptions {
            format: Some(opts.format),
            writable: true,
            no_backing: true,
            ..OpenOptions::default()
        };
        // Opened as a chain for the checks and the lock; the image is
        // then reopened on a storage with the cache mode.
        let chain = Chain::open(dst, &o)?;
        if chain.virtual_size() < size {
            return Err(Error::InvalidArgument(format!(
                "{}: output file is smaller than input file",
                dst.display()
            )));
        }
        let (bname, bfmt) = chain.top().image.backing();
        let backing = match bname {
            Some(name) => {
                let fmt = bfmt.and_then(ImageFormat::from_name).ok_or_else(|| {
                    Error::BackingFormatUnknown {
                        path: dst.to_path_buf(),
                        backing: name.to_string(),
                    }
                })?;
                let p = crate::chain::resolve_backing_path(dst, name);
                let bo = OpenOptions {
                    format: Some(fmt),
                    force_share: true,
                    depth_limit: Some(crate::chain::READ_CHAIN_DEPTH),
                    ..OpenOptions::default()
                };
                Some(Chain::open(&p, &bo)?)
            }
            None => None,
        };
        drop(chain);
        let storage = FileStorage::open(dst, true).map_err(|e| Error::io(dst, "open", 0, e))?;
        let file = storage
            .file()
            .ok_or_else(|| Error::InvalidArgument("no file to lock".into()))?;
        let lock = crate::lock::ImageLock::acquire(file, dst, crate::lock::LockMode::ReadWrite)?;
        let storage = cached(storage, opts.cache, dst)?;
        let image = match opts.format {
            ImageFormat::Raw => Image::Raw(RawImage::open(Box::new(storage), dst)?),
            ImageFormat::Qcow2 => Image::Qcow2(Qcow2Image::open_rw(Box::new(storage), dst)?),
        };
        // Its external data file is locked as QEMU locks it.
        if let Some(d) = image.as_qcow2().and_then(|q| q.data_file()) {
            d.lock(true)?;
        }
        Ok(Target {
            image,
            path: dst.to_path_buf(),
            zero_init: opts.target_is_zero && backing.is_none(),
            backing,
            _lock: Some(lock),
        })
    }

    fn write(&mut self, at: u64, data: &[u8], compress: bool) -> Result<()> {
        let backing = self.backing.take();
        let r = {
            let below = |b: &mut [u8], off: u64| match &backing {
                Some(c) => read_below(c.layers(), b, off),
                None => {
                    b.fill(0);
                    Ok(())
                }
            };
            match &mut self.image {
                Image::Raw(r) => r.write(data, at),
                Image::Qcow2(q) if compress => q.write_compressed(at, data, &below),
                Image::Qcow2(q) => q.write(at, data, &below),
            }
        };
        self.backing = backing;
        r
    }

    /// Makes `[at, at+len)` read as zeros (where the target does not
    /// already).
    fn write_zeroes(&mut self, at: u64, len: u64, unmap: bool) -> Result<()> {
        if self.zero_init || len == 0 {
            return Ok(());
        }
        let backing = self.backing.take();
        let r = {
            let below = |b: &mut [u8], off: u64| match &backing {
                Some(c) => read_below(c.layers(), b, off),
                None => {
                    b.fill(0);
                    Ok(())
                }
            };
            match &mut self.image {
                Image::Raw(r) => r.write_zeroes(at, len),
                // As `Chain::write_zeroes`: a v2 image without a backing
                // file has its whole clusters deallocated (`-n` into such
                // an image; iotest 122, "-n to an empty image").
                Image::Qcow2(q) if backing.is_none() => {
                    match crate::chain::v2_deallocatable(q, at, len)? {
                        Some((a, b)) => {
                            let end = at + len;
                            if a > at {
                                q.write_zeroes(at, a - at, unmap, &below)?;
                            }
                            if b > a {
                                q.deallocate(a, b - a)?;
                            }
                            if end > b {
                                q.write_zeroes(b, end - b, unmap, &below)?;
                            }
                            Ok(())
                        }
                        None => q.write_zeroes(at, len, unmap, &below),
                    }
                }
                Image::Qcow2(q) => q.write_zeroes(at, len, unmap, &below),
            }
        };
        self.backing = backing;
        r
    }

    fn cluster_size(&self) -> u64 {
        match &self.image {
            Image::Qcow2(q) => q.geometry().cluster_size(),
            Image::Raw(_) => 512,
        }
    }

    fn finish(
        mut self,
        bitmaps: &[(crate::bitmap::BitmapInfo, crate::bitmap::DirtyBitmap)],
    ) -> Result<()> {
        match &mut self.image {
            Image::Raw(r) => r.flush()?,
            Image::Qcow2(q) => q.flush()?,
        }
        // The bitmaps, after the data (whose writes must not mark them).
        if let Image::Qcow2(q) = &mut self.image {
            for (b, bits) in bitmaps {
                q.edit_bitmap(
                    &b.name,
                    crate::bitmap::BitmapEdit::Add {
                        granularity: Some(b.granularity),
                        disabled: !b.auto,
                    },
                )?;
                q.edit_bitmap(&b.name, crate::bitmap::BitmapEdit::Merge(bits))?;
            }
            if !bitmaps.is_empty() {
                q.flush()?;
            }
        }
        Ok(())
    }
}

/// Copies every source into `target`, one after the other.
fn copy_all(
    sources: &[&Chain],
    target: &mut Target,
    opts: &ConvertOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<()> {
    let total: u64 = sources.iter().map(|c| c.virtual_size()).sum();
    let mut base = 0u64;
    let mut buf = Vec::new();
    progress(0, total);
    // Compressed output goes by whole clusters of the output, which may
    // take data from more than one source.
    if opts.compress {
        let has_backing_target = opts.create.backing.is_some();
        let fully_allocate = opts.sparse_size == 0;
        copy_compressed(
            sources,
            target,
            (has_backing_target, fully_allocate),
            &mut buf,
            &mut |d| progress(d, total),
        )?;
        progress(total, total);
        return Ok(());
    }
    for src in sources {
        copy_one(src, base, target, opts, &mut buf, &mut |d| {
            progress(base + d, total)
        })?;
        base += src.virtual_size();
    }
    progress(total, total);
    Ok(())
}

/// What to do with a source range.
enum Action {
    /// Leave it: the target's backing file answers (`-B`).
    Skip,
    /// Zeros.
    Zero,
    /// Data to read.
    Data,
}

fn action(s: &BlockStatus, has_backing_target: bool, src_layers: usize) -> Action {
    if has_backing_target {
        // qemu-img -B looks at the source's top image only: what it does
        // not allocate is left to the target's backing file.
        return match s.layer {
            Some(0) if s.reads_data() => Action::Data,
            Some(0) => Action::Zero,
            _ if src_layers > 1 => Action::Skip,
            _ if s.reads_data() => Action::Data,
            _ => Action::Zero,
        };
    }
    if s.reads_data() {
        Action::Data
    } else {
        Action::Zero
    }
}

fn copy_one(
    src: &Chain,
    base: u64,
    target: &mut Target,
    opts: &ConvertOptions,
    buf: &mut Vec<u8>,
    progress: &mut dyn FnMut(u64),
) -> Result<()> {
    let size = src.virtual_size();
    let cs = target.cluster_size();
    let has_backing_target = opts.create.backing.is_some();
    // -C copies data as it is; -S 0 writes zeros too.
    let sparse = if opts.offload == Offload::Required {
        0
    } else {
        opts.sparse_size
    };
    let fully_allocate = opts.sparse_size == 0;
    let layers = src.layers().len();
    for s in src.block_status(0, size) {
        let s = s?;
        progress(s.start);
        match action(&s, has_backing_target, layers) {
            Action::Skip => {}
            Action::Zero if fully_allocate => {
                write_zero_data(target, base + s.start, s.length, buf)?
            }
            Action::Zero => target.write_zeroes(base + s.start, s.length, true)?,
            Action::Data => {
                let layer = s.layer.unwrap_or(0);
                let image = &src.layers()[layer].image;
                let (mut pos, end) = match offload_range(&s, image, base, target, opts)? {
                    Some(r) => r,
                    None => (s.start, s.end()),
                };
                while pos < end {
                    let n = (end - pos).min(CONVERT_WINDOW);
                    // (A compressed extent never crosses its cluster.)
                    let m = s.mapping.advance(pos - s.start);
                    // Mapping pays off for large runs only (a map, a
                    // populate and an unmap, with its TLB flush, per run).
                    let mapped = if n >= MAP_MIN {
                        image.mapped_data(m, n as usize)?
                    } else {
                        None
                    };
                    let data: &[u8] = match &mapped {
                        Some(b) if b.len() as u64 == n => b,
                        _ => {
                            buf.resize(n as usize, 0);
                            image.read_mapped(m, pos, buf)?;
                            buf
                        }
                    };
                    write_sparse(target, base + pos, data, sparse, cs)?;
                    pos += n;
                }
            }
        }
    }
    Ok(())
}

/// Copy offload of the data extent `s` of `image` (source guest offsets;
/// the target's are `base` on): where `-C` asks for it, or where the
/// target's filesystem shares extents with the source's (a clone costs
/// nothing and reads nothing), the bytes are moved by
/// [`Storage::copy_range_from`] (`FICLONERANGE`, else `copy_file_range`,
/// else read and write). A qcow2 target takes whole clusters that way
/// (not with extended L2 entries): the head and tail of the extent are
/// left to the caller, as the returned sub-range; `None`: nothing moved,
/// copy all of it.
fn offload_range(
    s: &BlockStatus,
    image: &Image,
    base: u64,
    target: &mut Target,
    opts: &ConvertOptions,
) -> Result<Option<(u64, u64)>> {
    let crate::mapping::Mapping::Data { host } = s.mapping else {
        return Ok(None);
    };
    let src = image.data_storage()?;
    if opts.offload != Offload::Required && !target.image.data_storage()?.clones_from(src) {
        return Ok(None);
    }
    let (at, end) = (base + s.start, base + s.end());
    let path = target.path.clone();
    match &mut target.image {
        Image::Raw(r) => {
            r.check_range(at, s.length)?;
            r.storage()
                .copy_range_from(src, host.get(), s.length, at)
                .map_err(|e| Error::io(&path, "copy data", at, e))?;
            Ok(Some((s.end(), s.end())))
        }
        Image::Qcow2(q) => {
            let geo = q.geometry();
            let cs = geo.cluster_size();
            let a = at.div_ceil(cs) * cs;
            let b = end / cs * cs;
            if geo.extended_l2() || b <= a {
                return Ok(None);
            }
            q.write_range_from(a, b - a, src, host.get() + (a - at))?;
            // The head is copied by the caller now, the tail next.
            if at < a {
                let head = (s.start, a - base);
                copy_plain(s, image, base, target, opts, head)?;
            }
            Ok(Some((b - base, s.end())))
        }
    }
}

/// Copies `[range.0, range.1)` (source guest offsets) of the data extent
/// `s` through memory.
fn copy_plain(
    s: &BlockStatus,
    image: &Image,
    base: u64,
    target: &mut Target,
    opts: &ConvertOptions,
    range: (u64, u64),
) -> Result<()> {
    let n = range.1 - range.0;
    let m = s.mapping.advance(range.0 - s.start);
    let mut buf = vec![0u8; n as usize];
    image.read_mapped(m, range.0, &mut buf)?;
    let sparse = if opts.offload == Offload::Required {
        0
    } else {
        opts.sparse_size
    };
    write_sparse(target, base + range.0, &buf, sparse, 0)
}

/// Writes `len` zero bytes as data (`-S 0`).
fn write_zero_data(target: &mut Target, at: u64, len: u64, buf: &mut Vec<u8>) -> Result<()> {
    let mut done = 0;
    while done < len {
        let n = (len - done).min(CONVERT_WINDOW);
        buf.clear();
        buf.resize(n as usize, 0);
        target.write(at + done, buf, false)?;
        done += n;
    }
    Ok(())
}

/// Writes `data` at `at`: all-zero blocks of `sparse` bytes (aligned in the
/// target) are left out (written as zeros where the target does not read
/// as zeros); `sparse == 0` writes everything.
fn write_sparse(target: &mut Target, at: u64, data: &[u8], sparse: u64, _cs: u64) -> Result<()> {
    if sparse == 0 {
        return target.write(at, data, false);
    }
    let len = data.len() as u64;
    let block_end = |i: u64| ((at + i) / sparse + 1) * sparse - at;
    let is_zero = |a: u64, b: u64| data[a as usize..b as usize].iter().all(|&x| x == 0);
    let mut i = 0u64;
    while i < len {
        let zero = is_zero(i, block_end(i).min(len));
        let mut j = block_end(i).min(len);
        while j < len && is_zero(j, block_end(j).min(len)) == zero {
            j = block_end(j).min(len);
        }
        if zero {
            target.write_zeroes(at + i, j - i, true)?;
        } else {
            target.write(at + i, &data[i as usize..j as usize], false)?;
        }
        i = j;
    }
    Ok(())
}

/// [`copy_all`] for compressed output: cluster-aligned windows of the
/// output, each output cluster gathered from every source it overlaps
/// (a source may end inside a cluster: qemu-img reads across sources;
/// iotest 122, "compression with misaligned allocations and image
/// sizes"), and each nonzero cluster compressed. All-zero clusters are
/// left out, as qemu-img does, unless `fully_allocate` (`-S 0`: qemu-img
/// then writes them compressed too, except where `-B`'s backing file
/// answers).
fn copy_compressed(
    sources: &[&Chain],
    target: &mut Target,
    (has_backing_target, fully_allocate): (bool, bool),
    buf: &mut Vec<u8>,
    progress: &mut dyn FnMut(u64),
) -> Result<()> {
    let cs = target.cluster_size();
    let mut spans = Vec::with_capacity(sources.len());
    let mut at = 0u64;
    for src in sources {
        spans.push((*src, at));
        at += src.virtual_size();
    }
    let total = at;
    let mut pos = 0u64;
    while pos < total {
        progress(pos);
        let win = (total - pos).min(CONVERT_WINDOW);
        let end = pos + win;
        // Each overlapping source's ranges (in output offsets) and data.
        let mut acts = Vec::new();
        buf.clear();
        buf.resize(win as usize, 0);
        for &(src, s0) in &spans {
            let s1 = s0 + src.virtual_size();
            let (a, b) = (pos.max(s0), end.min(s1));
            if a >= b {
                continue;
            }
            let layers = src.layers().len();
            let mut data = false;
            for st in src.block_status(a - s0, b - a) {
                let st = st?;
                let act = action(&st, has_backing_target, layers);
                data |= matches!(act, Action::Data);
                acts.push((s0 + st.start, st.length, act));
            }
            if data {
                src.read_at(&mut buf[(a - pos) as usize..(b - pos) as usize], a - s0)?;
            }
        }
        let mut i = 0u64;
        while i < win {
            let n = cs.min(win - i);
            let (c0, c1) = (pos + i, pos + i + n);
            let overlaps = |a: u64, len: u64| a < c1 && a + len > c0;
            let has = |want: fn(&Action) -> bool| {
                acts.iter()
                    .any(|(a, len, act)| overlaps(*a, *len) && want(act))
            };
            let chunk = &buf[i as usize..(i + n) as usize];
            let data = has(|a| matches!(a, Action::Data)) && chunk.iter().any(|&b| b != 0);
            // (Zeros compressed over a part `-B`'s backing file answers
            // would hide it: such a cluster gets zero writes instead.)
            let zeros_as_data = fully_allocate
                && has(|a| !matches!(a, Action::Skip))
                && !has(|a| matches!(a, Action::Skip));
            if data || zeros_as_data {
                let mut c = chunk.to_vec();
                c.resize(cs as usize, 0);
                target.write(c0, &c, true)?;
            } else if has(|a| !matches!(a, Action::Skip)) {
                for (a, len, act) in &acts {
                    if overlaps(*a, *len) && !matches!(act, Action::Skip) {
                        let from = (*a).max(c0);
                        let to = (a + len).min(c1);
                        target.write_zeroes(from, to - from, true)?;
                    }
                }
            }
            i += n;
        }
        pos = end;
    }
    Ok(())
}

/// The top image's bitmaps and their bits, for `--bitmaps`; QEMU's
/// refusals (a raw side, an inconsistent bitmap) before anything is
/// written.
fn source_bitmaps(
    src: &Chain,
    format: ImageFormat,
) -> Result<Vec<(crate::bitmap::BitmapInfo, crate::bitmap::DirtyBitmap)>> {
    if format != ImageFormat::Qcow2 {
        return Err(Error::InvalidArgument(
            "Format driver 'raw' does not support bitmaps".into(),
        ));
    }
    let Some(q) = src.top().image.as_qcow2() else {
        return Err(Error::InvalidArgument("Source lacks bitmap support".into()));
    };
    let mut out = Vec::new();
    for b in q.bitmaps()? {
        if b.in_use {
            return Err(Error::InvalidArgument(format!(
                "Failed to populate bitmap {0}: Bitmap '{0}' is inconsistent and cannot be used",
                b.name
            )));
        }
        let bits = q.dirty_bitmap(&b.name)?;
        out.push((b, bits));
    }
    Ok(out)
}
