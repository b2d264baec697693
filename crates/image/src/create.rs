//! Creating qcow2 images (and overlays) with qemu-img's options.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use strata_format::header::{Autoclear, Compatible, FeatureKind, Incompatible};
use strata_format::{limits, CompressionType, Extension, FeatureName, Geometry, Header};

use crate::chain::ImageFormat;
use crate::error::{Error, Result};
use crate::lock::{ImageLock, LockMode};
use crate::qcow2::Qcow2Image;
use crate::storage::{FileStorage, Storage};
use crate::write::PreallocFill;

/// Preallocation modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Preallocation {
    /// Nothing allocated up front.
    #[default]
    Off,
    /// Every L2 table and data cluster allocated (data reads as zeros;
    /// the file is sparse).
    Metadata,
    /// As `Metadata`, and the data clusters' space reserved with
    /// `posix_fallocate`.
    Falloc,
    /// As `Metadata`, and the data clusters written with zeros.
    Full,
}

impl Preallocation {
    /// qemu-img's name of the mode.
    pub fn name(self) -> &'static str {
        match self {
            Preallocation::Off => "off",
            Preallocation::Metadata => "metadata",
            Preallocation::Falloc => "falloc",
            Preallocation::Full => "full",
        }
    }

    /// The mode qemu-img names `name`.
    pub fn from_name(name: &str) -> Option<Preallocation> {
        [
            Preallocation::Off,
            Preallocation::Metadata,
            Preallocation::Falloc,
            Preallocation::Full,
        ]
        .into_iter()
        .find(|p| p.name() == name)
    }
}

/// Options of a new qcow2 image, as `qemu-img create -o`.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// Virtual size in bytes.
    pub size: u64,
    /// Cluster size in bytes (512 B to 2 MiB, a power of two).
    pub cluster_size: u64,
    /// Version 2 (`compat=0.10`) instead of 3 (`compat=1.1`).
    pub compat_v2: bool,
    /// Extended L2 entries (32 subclusters per cluster).
    pub extended_l2: bool,
    /// Refcount width in bits (1, 2, 4, 8, 16, 32 or 64).
    pub refcount_bits: u32,
    /// Lazy refcounts (compatible feature bit 0).
    pub lazy_refcounts: bool,
    /// Compression type for compressed clusters.
    pub compression_type: CompressionType,
    /// Preallocation mode.
    pub preallocation: Preallocation,
    /// Backing file name (stored as given) and format.
    pub backing: Option<(String, ImageFormat)>,
    /// External data file name (`data_file=`), stored as given and
    /// opened as QEMU opens it (qcow2/data_file.rs); created (or
    /// truncated) to the virtual size by [`create_qcow2`].
    pub data_file: Option<String>,
    /// The data file stays valid as a raw image (`data_file_raw=on`):
    /// forces at least metadata preallocation, as qemu-img does.
    pub data_file_raw: bool,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            size: 0,
            cluster_size: 65536,
            compat_v2: false,
            extended_l2: false,
            refcount_bits: 16,
            lazy_refcounts: false,
            compression_type: CompressionType::Deflate,
            preallocation: Preallocation::Off,
            backing: None,
            data_file: None,
            data_file_raw: false,
        }
    }
}

fn feature_table() -> Extension {
    let f = |kind, _kind_byte: u8, bit, name: &str| FeatureName::new(kind, bit, name);
    Extension::FeatureTable(vec![
        f(FeatureKind::Incompatible, 0, 0, "dirty bit"),
        f(FeatureKind::Incompatible, 0, 1, "corrupt bit"),
        f(FeatureKind::Incompatible, 0, 2, "external data file"),
        f(FeatureKind::Incompatible, 0, 3, "compression type"),
        f(FeatureKind::Incompatible, 0, 4, "extended L2 entries"),
        f(FeatureKind::Compatible, 1, 0, "lazy refcounts"),
        f(FeatureKind::Autoclear, 2, 0, "bitmaps"),
        f(FeatureKind::Autoclear, 2, 1, "raw external data"),
    ])
}

impl CreateOptions {
    /// Checks the options against each other and the limits.
    pub fn validate(&self) -> Result<Geometry> {
        let bad = |m: String| Err(Error::InvalidArgument(m));
        if !self.cluster_size.is_power_of_two() {
            return bad(format!(
                "cluster size {} is not a power of two",
                self.cluster_size
            ));
        }
        let bits = self.cluster_size.trailing_zeros();
        if !(limits::MIN_CLUSTER_BITS..=limits::MAX_CLUSTER_BITS).contains(&bits) {
            return bad(format!(
                "cluster size {} is outside 512 B..2 MiB",
                self.cluster_size
            ));
        }
        if !self.refcount_bits.is_power_of_two() || self.refcount_bits > 64 {
            return bad(format!(
                "refcount_bits {} is not one of 1, 2, 4, 8, 16, 32, 64",
                self.refcount_bits
            ));
        }
        if self.compat_v2 {
            if self.refcount_bits != 16 {
                return bad("compat=0.10 images need refcount_bits=16".into());
            }
            if self.extended_l2 {
                return bad("extended_l2 needs compat=1.1".into());
            }
            if self.lazy_refcounts {
                return bad("lazy_refcounts needs compat=1.1".into());
            }
            if self.compression_type != CompressionType::Deflate {
                return bad("compression_type=zstd needs compat=1.1".into());
            }
        }
        if self.extended_l2 && bits < limits::MIN_EXTENDED_L2_CLUSTER_BITS {
            return bad("extended_l2 needs a cluster size of at least 16 KiB".into());
        }
        if self.size > limits::MAX_VIRTUAL_SIZE {
            return bad(format!("size {} is too large", self.size));
        }
        if let Some((name, _)) = &self.backing {
            if name.is_empty() || name.len() > limits::MAX_BACKING_NAME as usize {
                return bad("backing file name must be 1 to 1023 bytes".into());
            }
            // Preallocated standard L2 entries would hide the backing
            // file; extended ones leave every subcluster unallocated.
            // qemu-img's words (issue 15 defect 4).
            if self.preallocation != Preallocation::Off && !self.extended_l2 {
                return bad(
                    "Backing file and preallocation can only be used at the same time if \
                     extended_l2 is on"
                        .into(),
                );
            }
        }
        // External data files, in qemu-img's words.
        if self.data_file_raw && self.data_file.is_none() {
            return bad("data-file-raw requires data-file".into());
        }
        if let Some(name) = &self.data_file {
            if self.compat_v2 {
                return bad(
                    "External data files are only supported with compatibility level \
                            1.1 and above (use version=v3 or greater)"
                        .into(),
                );
            }
            if self.backing.is_some() && self.data_file_raw {
                return bad(
                    "Backing file and data-file-raw cannot be used at the same time".into(),
                );
            }
            crate::qcow2::data_file::check_name(name, Path::new(""))
                .map_err(|e| Error::InvalidArgument(e.to_string()))?;
        }
        let geo = Geometry::new(bits, self.extended_l2)
            .map_err(|e| Error::InvalidArgument(e.to_string()))?;
        // The L1 table the size needs (checked again, later, by resize):
        // checked here so that nothing is touched for a size that cannot
        // be made. qemu-img's words.
        if geo.l1_entries_for(round_up_to_sector(self.size)) * 8 > limits::MAX_L1_BYTES {
            return bad(format!(
                "the image size {} is too large for file format 'qcow2' with a cluster size \
                 of {} (try using a larger cluster size)",
                self.size, self.cluster_size
            ));
        }
        Ok(geo)
    }
}

/// QEMU's `BDRV_SECTOR_SIZE`: `qemu-img create` rounds every size up to
/// a multiple of it (qcow2 and raw alike).
pub const SECTOR_SIZE: u64 = 512;

/// `size` rounded up to a multiple of 512 bytes, as `qemu-img create`
/// (`ROUND_UP(size, BDRV_SECTOR_SIZE)`) stores it: 513 becomes 1024.
/// Saturates at the largest multiple of 512 (larger sizes are refused
/// by the limits anyway).
pub fn round_up_to_sector(size: u64) -> u64 {
    size.checked_next_multiple_of(SECTOR_SIZE)
        .unwrap_or(u64::MAX / SECTOR_SIZE * SECTOR_SIZE)
}

/// Creates a qcow2 image on `storage` (which is truncated) and returns it
/// open for writing.
///
/// The size is rounded up to a multiple of 512 bytes, as qemu-img does.
/// Everything that can be refused (options, limits, the header) is
/// checked before `storage` is touched.
pub fn create_qcow2(
    storage: Box<dyn Storage>,
    path: &Path,
    opts: &CreateOptions,
) -> Result<Qcow2Image> {
    create_qcow2_on(storage, None, path, opts)
}

/// [`create_qcow2`] for an image with an external data file on `data`
/// (tests, in-memory images), which is truncated to the virtual size.
pub fn create_qcow2_with_data_file(
    storage: Box<dyn Storage>,
    data: Box<dyn Storage>,
    path: &Path,
    opts: &CreateOptions,
) -> Result<Qcow2Image> {
    create_qcow2_on(storage, Some(data), path, opts)
}

fn create_qcow2_on(
    storage: Box<dyn Storage>,
    data: Option<Box<dyn Storage>>,
    path: &Path,
    opts: &CreateOptions,
) -> Result<Qcow2Image> {
    let buf = initial_clusters(path, opts)?;
    let io = |op, e| Error::io(path, op, 0, e);
    let given = data.is_some();
    // The data file first, created (or truncated) to the virtual size, as
    // qemu-img creates it (by its name, as it is opened).
    let data = match (&opts.data_file, data) {
        (None, _) => None,
        (Some(_), Some(d)) => Some(d),
        (Some(name), None) => {
            let d = crate::qcow2::data_file::create_by_name(name, path)?;
            Some(Box::new(d) as Box<dyn Storage>)
        }
    };
    if let Some(d) = &data {
        let dio = |op, e| Error::io(Path::new(opts.data_file.as_deref().unwrap_or("")), op, 0, e);
        d.set_len(0).map_err(|e| dio("truncate", e))?;
        d.set_len(round_up_to_sector(opts.size))
            .map_err(|e| dio("resize", e))?;
    }
    storage.set_len(0).map_err(|e| io("truncate", e))?;
    storage
        .write_at(&buf, 0)
        .map_err(|e| io("write new image", e))?;
    storage.sync().map_err(|e| io("sync", e))?;
    let mut img = match data {
        // Opened by its name: the data file just created.
        Some(_) if !given => Qcow2Image::open_rw(storage, path)?,
        Some(d) => Qcow2Image::open_with_data_file(storage, d, path, true)?,
        None => Qcow2Image::open_rw(storage, path)?,
    };
    let size = round_up_to_sector(opts.size);
    if size > 0 {
        img.resize(size)?;
    }
    let fill = match opts.preallocation {
        // data_file_raw: every cluster mapped, so the raw file is the
        // guest view (qemu-img forces metadata preallocation).
        Preallocation::Off if opts.data_file_raw => Some(PreallocFill::Sparse),
        Preallocation::Off => None,
        Preallocation::Metadata => Some(PreallocFill::Sparse),
        Preallocation::Falloc => Some(PreallocFill::Fallocate),
        Preallocation::Full => Some(PreallocFill::Zeros),
    };
    if let Some(fill) = fill {
        img.preallocate(fill)?;
    }
    img.flush()?;
    Ok(img)
}

/// Checks `opts` (see [`CreateOptions::validate`]) and that the header
/// they make can be encoded, touching nothing: what a caller runs before
/// it tells the user that it is formatting.
pub fn check_qcow2_options(path: &Path, opts: &CreateOptions) -> Result<()> {
    initial_clusters(path, opts).map(|_| ())
}

/// The first three clusters of a new, empty image: header, refcount
/// table, refcount block.
fn initial_clusters(path: &Path, opts: &CreateOptions) -> Result<Vec<u8>> {
    let geo = opts.validate()?;
    let cs = geo.cluster_size();
    let order = opts.refcount_bits.trailing_zeros();
    let mut incompat = Incompatible::empty();
    if opts.extended_l2 {
        incompat |= Incompatible::EXTENDED_L2;
    }
    if opts.compression_type != CompressionType::Deflate {
        incompat |= Incompatible::COMPRESSION;
    }
    let mut extensions = Vec::new();
    if let Some((_, fmt)) = &opts.backing {
        extensions.push(Extension::BackingFormat(fmt.name().to_string()));
    }
    let mut autoclear = Autoclear::empty();
    if let Some(name) = &opts.data_file {
        incompat |= Incompatible::EXTERNAL_DATA;
        extensions.push(Extension::DataFile(name.clone()));
        if opts.data_file_raw {
            autoclear |= Autoclear::DATA_FILE_RAW;
        }
    }
    if !opts.compat_v2 {
        extensions.push(feature_table());
    }
    let mut header = Header::new(
        if opts.compat_v2 { 2 } else { 3 },
        geo.cluster_bits(),
        order,
        opts.compression_type,
    );
    header.set_backing_file(opts.backing.as_ref().map(|(n, _)| n.clone()));
    header.set_refcount_table(cs, 1);
    header.set_incompatible(incompat);
    header.set_compatible(if opts.lazy_refcounts {
        Compatible::LAZY_REFCOUNTS
    } else {
        Compatible::empty()
    });
    header.set_autoclear(autoclear);
    *header.extensions_mut() = extensions;
    if header.layout().is_err() {
        // Small clusters: the optional feature name table does not fit (QEMU
        // leaves it out too).
        header
            .extensions_mut()
            .retain(|e| !matches!(e, Extension::FeatureTable(_)));
    }
    let c0 = header.encode().map_err(|source| Error::Format {
        path: path.to_path_buf(),
        source,
    })?;
    let mut buf = vec![0u8; 3 * cs as usize];
    buf[..cs as usize].copy_from_slice(&c0);
    // Refcount table: one entry, the block at cluster 2.
    buf[cs as usize..cs as usize + 8].copy_from_slice(&(2 * cs).to_be_bytes());
    // Refcount block: clusters 0, 1 and 2 are in use.
    let block = &mut buf[2 * cs as usize..];
    for ci in 0..3 {
        strata_format::refcount::set(block, order, ci, 1);
    }
    Ok(buf)
}

/// Creates a raw image of `size` bytes rounded up to a multiple of 512, as
/// qemu-img does (sparse).
pub fn create_raw(storage: &dyn Storage, path: &Path, size: u64) -> Result<()> {
    let size = round_up_to_sector(size);
    storage
        .set_len(0)
        .map_err(|e| Error::io(path, "truncate", 0, e))?;
    storage
        .set_len(size)
        .map_err(|e| Error::io(path, "resize", size, e))?;
    storage.sync().map_err(|e| Error::io(path, "sync", 0, e))
}

/// A new image file that takes the place of `target` only once it is
/// complete: built under a temporary name in the target's directory, synced,
/// then renamed over the target (and the directory synced), so that a
/// create or convert that fails halfway leaves the old file as it was.
///
/// While it exists it holds QEMU's write lock on the file it will replace
/// ([`LockMode::ReadWrite`]), taken in [`NewImageFile::begin`]: a file a
/// VM, `qemu-io` or a Strata merge has open is refused, as `qemu-img create`
/// and `convert` refuse it (`Failed to get "write" lock`), and nobody can
/// open the old file with locking until the rename is done.
///
/// A target that is a symbolic link is followed: the file it points to is
/// replaced, as `qemu-img` writes through the link. Other hard links of
/// the old file keep its old contents (`qemu-img` would truncate them
/// too). The new file keeps the old file's permission bits (new files:
/// `0644` less the umask, as QEMU creates them). Dropped without
/// [`NewImageFile::commit`], the temporary file is removed.
#[derive(Debug)]
pub struct NewImageFile {
    /// The file replaced (symbolic links resolved).
    target: PathBuf,
    /// The temporary file, in the target's directory.
    temp: PathBuf,
    /// The temporary file, open for reading and writing.
    file: File,
    /// The write lock on the old file, if there was one.
    _old_lock: Option<ImageLock>,
    /// Set once renamed: nothing to remove on drop.
    committed: bool,
}

impl NewImageFile {
    /// Checks and locks the file at `target` if there is one (it must be a
    /// regular file, and nobody may have it open with locking), and creates
    /// the temporary file beside it.
    pub fn begin(target: &Path) -> Result<NewImageFile> {
        let (target, old) = match std::fs::canonicalize(target) {
            Ok(real) => {
                let old = open_old_target(&real, target)?;
                (real, old)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => (target.to_path_buf(), None),
            Err(e) => return Err(Error::io(target, "resolve path", 0, e)),
        };
        let dir = parent_dir(&target);
        let name = target.file_name().unwrap_or(target.as_os_str());
        let (temp, file) = create_temp_beside(&dir, name).map_err(|e| {
            let what = format!("the new image's temporary file in {}", dir.display());
            Error::io(&target, "create", 0, explained(e, &what))
        })?;
        let mut new = NewImageFile {
            target,
            temp,
            file,
            _old_lock: None,
            committed: false,
        };
        if let Some((old_file, lock)) = old {
            new._old_lock = Some(lock);
            // Same permissions (and, where allowed, owner) as the old file.
            if let Ok(m) = old_file.metadata() {
                use std::os::unix::fs::{MetadataExt, PermissionsExt};
                let mode = std::fs::Permissions::from_mode(m.mode() & 0o7777);
                new.file.set_permissions(mode).map_err(|e| {
                    let what = "giving the new image the old file's permissions";
                    Error::io(&new.target, "create", 0, explained(e, what))
                })?;
                let _ = std::os::unix::fs::fchown(&new.file, Some(m.uid()), Some(m.gid()));
            }
        }
        Ok(new)
    }

    /// The file that will be replaced (symbolic links resolved).
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// The temporary file's path (where the new image is built).
    pub fn temp_path(&self) -> &Path {
        &self.temp
    }

    /// A storage on the temporary file (a new descriptor of it each call).
    pub fn storage(&self) -> Result<FileStorage> {
        let f = self
            .file
            .try_clone()
            .map_err(|e| Error::io(&self.temp, "open", 0, e))?;
        Ok(FileStorage::from_file(f, &self.target))
    }

    /// Syncs the new file, renames it over the target and syncs the
    /// directory. Only now does the old file go.
    pub fn commit(self) -> Result<()> {
        self.commit_synced(true)
    }

    /// [`NewImageFile::commit`], syncing the file and the directory only
    /// when `sync` (`false`: cache mode `unsafe`, as `qemu-img convert`
    /// by default: a crash soon after may leave the new name with data
    /// missing).
    pub fn commit_synced(mut self, sync: bool) -> Result<()> {
        if sync {
            self.file
                .sync_all()
                .map_err(|e| Error::io(&self.temp, "sync", 0, e))?;
        }
        std::fs::rename(&self.temp, &self.target).map_err(|e| {
            let what = format!("renaming the new image {} over it", self.temp.display());
            Error::io(&self.target, "create", 0, explained(e, &what))
        })?;
        self.committed = true;
        if !sync {
            return Ok(());
        }
        let dir = parent_dir(&self.target);
        File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| Error::io(&dir, "sync", 0, e))?;
        Ok(())
    }
}

impl Drop for NewImageFile {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.temp);
        }
    }
}

/// `e` with what was being done in front, keeping its kind.
fn explained(e: io::Error, what: &str) -> io::Error {
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

/// The directory of `path` (`.` for a bare name).
fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Opens the existing file `real` (named `given` by the user) without
/// blocking, accepts only a regular file, and takes QEMU's write lock on
/// it.
fn open_old_target(real: &Path, given: &Path) -> Result<Option<(File, ImageLock)>> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = match File::options()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(real)
    {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(given, "open", 0, e)),
    };
    let meta = file
        .metadata()
        .map_err(|e| Error::io(given, "stat", 0, e))?;
    if !meta.file_type().is_file() {
        let what = crate::storage::check_file_type(&file)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_else(|| "a block device".into());
        return Err(Error::InvalidArgument(format!(
            "{}: cannot replace it: it is {what}; Strata creates images in regular files only",
            given.display()
        )));
    }
    let lock = ImageLock::acquire(&file, given, LockMode::ReadWrite)?;
    Ok(Some((file, lock)))
}

/// Creates `.NAME.strata-XXXXXX` (new, mode 0644 less the umask) in `dir`.
fn create_temp_beside(dir: &Path, name: &std::ffi::OsStr) -> io::Result<(PathBuf, File)> {
    use std::os::unix::fs::OpenOptionsExt;
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    for _ in 0..100 {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let mut temp_name = std::ffi::OsString::from(".");
        temp_name.push(name);
        temp_name.push(format!(".strata-{}-{nanos:x}-{n}", std::process::id()));
        let temp = dir.join(temp_name);
        match File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&temp)
        {
            Ok(f) => return Ok((temp, f)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AlreadyExists,
        "no free temporary name",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_round_up_to_512_like_qemu_img() {
        for (given, stored) in [(0, 0), (1, 512), (512, 512), (513, 1024), (65537, 66048)] {
            assert_eq!(round_up_to_sector(given), stored, "{given}");
        }
        assert_eq!(round_up_to_sector(u64::MAX) % 512, 0);
    }

    #[test]
    fn sizes_over_the_l1_limit_are_refused_by_validate() {
        let opts = |size, cluster_size| CreateOptions {
            size,
            cluster_size,
            ..CreateOptions::default()
        };
        // 64 KiB clusters: 32 MiB of L1 entries map 2^22 * 512 MiB = 2 PiB.
        assert!(opts(2 << 50, 65536).validate().is_ok());
        let e = opts(5 << 50, 65536).validate().unwrap_err().to_string();
        assert!(e.contains("too large for file format 'qcow2'"), "{e}");
        assert!(opts(5 << 50, 2 << 20).validate().is_ok());
    }

    #[test]
    fn a_new_image_file_replaces_the_target_only_on_commit() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("img");
        std::fs::write(&target, b"old").unwrap();
        let names = || {
            let mut v: Vec<_> = std::fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            v.sort();
            v
        };
        // Dropped: the old file stays, the temporary file goes.
        let new = NewImageFile::begin(&target).unwrap();
        new.storage().unwrap().write_at(b"new", 0).unwrap();
        assert_eq!(names().len(), 2);
        drop(new);
        assert_eq!(std::fs::read(&target).unwrap(), b"old");
        assert_eq!(names(), ["img"]);
        // Committed: the new contents, one file.
        let new = NewImageFile::begin(&target).unwrap();
        new.storage().unwrap().write_at(b"new", 0).unwrap();
        new.commit().unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"new");
        assert_eq!(names(), ["img"]);
        // A new file where there was none.
        let fresh = dir.path().join("fresh");
        NewImageFile::begin(&fresh).unwrap().commit().unwrap();
        assert_eq!(std::fs::metadata(&fresh).unwrap().len(), 0);
    }

    #[test]
    fn a_target_that_is_not_a_regular_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let e = NewImageFile::begin(&fifo).unwrap_err().to_string();
        assert!(e.contains("a FIFO"), "{e}");
        let e = NewImageFile::begin(dir.path()).unwrap_err().to_string();
        assert!(e.contains("a directory"), "{e}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
