//! Creating qcow2 images (and overlays) with qemu-img's options.

use std::path::Path;

use strata_format::header::{
    FeatureKind, COMPAT_LAZY_REFCOUNTS, INCOMPAT_COMPRESSION, INCOMPAT_EXTENDED_L2,
};
use strata_format::{limits, CompressionType, Extension, FeatureName, Geometry, Header};

use crate::chain::ImageFormat;
use crate::error::{Error, Result};
use crate::qcow2::Qcow2Image;
use crate::storage::Storage;

/// Preallocation modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Preallocation {
    /// Nothing allocated up front.
    #[default]
    Off,
    /// Every L2 table and data cluster allocated (data reads as zeros).
    Metadata,
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
        }
        Geometry::new(bits, self.extended_l2).map_err(|e| Error::InvalidArgument(e.to_string()))
    }
}

/// Creates a qcow2 image on `storage` (which is truncated) and returns it
/// open for writing.
pub fn create_qcow2(
    storage: Box<dyn Storage>,
    path: &Path,
    opts: &CreateOptions,
) -> Result<Qcow2Image> {
    let geo = opts.validate()?;
    let cs = geo.cluster_size();
    let order = opts.refcount_bits.trailing_zeros();
    let mut incompat = 0;
    if opts.extended_l2 {
        incompat |= INCOMPAT_EXTENDED_L2;
    }
    if opts.compression_type != CompressionType::Deflate {
        incompat |= INCOMPAT_COMPRESSION;
    }
    let mut extensions = Vec::new();
    if let Some((_, fmt)) = &opts.backing {
        extensions.push(Extension::BackingFormat(fmt.name().to_string()));
    }
    if !opts.compat_v2 {
        extensions.push(feature_table());
    }
    let header = Header {
        version: if opts.compat_v2 { 2 } else { 3 },
        backing_file_offset: 0,
        backing_file_size: 0,
        backing_file: opts.backing.as_ref().map(|(n, _)| n.clone()),
        cluster_bits: geo.cluster_bits(),
        size: 0,
        l1_size: 0,
        l1_table_offset: 0,
        refcount_table_offset: cs,
        refcount_table_clusters: 1,
        nb_snapshots: 0,
        snapshots_offset: 0,
        incompatible_features: incompat,
        compatible_features: if opts.lazy_refcounts {
            COMPAT_LAZY_REFCOUNTS
        } else {
            0
        },
        autoclear_features: 0,
        refcount_order: order,
        header_length: if opts.compat_v2 {
            limits::V2_HEADER_LEN
        } else {
            112
        },
        compression_type: opts.compression_type,
        extra: if opts.compat_v2 {
            Vec::new()
        } else {
            vec![0; 7]
        },
        extensions,
    };
    let mut header = header;
    if header.layout().is_err() {
        // Small clusters: the optional feature name table does not fit (QEMU
        // leaves it out too).
        header
            .extensions
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
    let io = |op, e| Error::io(path, op, 0, e);
    storage.set_len(0).map_err(|e| io("truncate", e))?;
    storage
        .write_at(&buf, 0)
        .map_err(|e| io("write new image", e))?;
    storage.sync().map_err(|e| io("sync", e))?;
    let mut img = Qcow2Image::open_rw(storage, path)?;
    if opts.size > 0 {
        img.resize(opts.size)?;
    }
    if opts.preallocation == Preallocation::Metadata {
        img.preallocate_metadata()?;
    }
    img.flush()?;
    Ok(img)
}

/// Creates a raw image of `size` bytes (sparse).
pub fn create_raw(storage: &dyn Storage, path: &Path, size: u64) -> Result<()> {
    storage
        .set_len(0)
        .map_err(|e| Error::io(path, "truncate", 0, e))?;
    storage
        .set_len(size)
        .map_err(|e| Error::io(path, "resize", size, e))?;
    storage.sync().map_err(|e| Error::io(path, "sync", 0, e))
}
