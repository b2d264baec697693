//! The qcow2 header (versions 2 and 3), its extensions and feature bits.
//!
//! [`RawHeader`] is the fixed 104-byte layout as it sits on disk;
//! [`Header`] is the validated, typed form. [`Header::parse`] takes the
//! bytes of cluster 0 (or the whole file when it is shorter) and checks
//! every field against [`crate::limits`] before anything else trusts it.
//! [`Header::encode`] writes the header, its extensions and the backing
//! file name back into a cluster-0 buffer, preserving unknown extensions
//! and unknown header bytes.

use zerocopy::big_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::error::{FormatError, Result};
use crate::limits;
use crate::types::Geometry;

/// The qcow2 magic, "QFI\xfb".
pub const MAGIC: u32 = 0x5146_49fb;

bitflags::bitflags! {
    /// Incompatible feature bits (header offset 72): an implementation
    /// that does not know one must not open the image. Unknown bits are
    /// kept as read.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct Incompatible: u64 {
        /// Bit 0: refcounts may be inconsistent (lazy refcounts).
        const DIRTY = 1 << 0;
        /// Bit 1: the image is corrupt; writes are refused.
        const CORRUPT = 1 << 1;
        /// Bit 2: data lives in an external data file.
        const EXTERNAL_DATA = 1 << 2;
        /// Bit 3: the compression_type field is not deflate.
        const COMPRESSION = 1 << 3;
        /// Bit 4: L2 entries are extended (subclusters).
        const EXTENDED_L2 = 1 << 4;
        const _ = !0;
    }
}

impl Incompatible {
    /// All incompatible bits this implementation knows.
    pub const KNOWN: Incompatible = Incompatible::DIRTY
        .union(Incompatible::CORRUPT)
        .union(Incompatible::EXTERNAL_DATA)
        .union(Incompatible::COMPRESSION)
        .union(Incompatible::EXTENDED_L2);
}

bitflags::bitflags! {
    /// Compatible feature bits (header offset 80): safe to ignore.
    /// Unknown bits are kept as read.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct Compatible: u64 {
        /// Bit 0: lazy refcounts.
        const LAZY_REFCOUNTS = 1 << 0;
        const _ = !0;
    }
}

bitflags::bitflags! {
    /// Auto-clear feature bits (header offset 88): a writer that does not
    /// know one clears it. Unknown bits are kept as read.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct Autoclear: u64 {
        /// Bit 0: the bitmaps extension is consistent.
        const BITMAPS = 1 << 0;
        /// Bit 1: the external data file is a raw image.
        const DATA_FILE_RAW = 1 << 1;
        const _ = !0;
    }
}

/// Header extension type: end of the extension area.
pub const EXT_END: u32 = 0;
/// Header extension type: backing file format name.
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// Header extension type: feature name table.
pub const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
/// Header extension type: bitmaps.
pub const EXT_BITMAPS: u32 = 0x2385_2875;
/// Header extension type: full disk encryption header pointer.
pub const EXT_FDE: u32 = 0x0537_be77;
/// Header extension type: external data file name.
pub const EXT_DATA_FILE: u32 = 0x4441_5441;

/// The fixed part of a version 3 header as stored (a v2 header is the
/// first 72 bytes of it).
#[derive(Debug, Clone, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RawHeader {
    /// QCOW magic string ("QFI\xfb").
    pub magic: U32,
    /// Version number (valid values are 2 and 3).
    pub version: U32,
    /// Offset into the image file at which the backing file name is stored
    /// (NB: The string is not null terminated). 0 if the image doesn't have
    /// a backing file.
    pub backing_file_offset: U64,
    /// Length of the backing file name in bytes. Must not be longer than 1023.
    pub backing_file_size: U32,
    /// Number of bits that are used for addressing an offset within a
    /// cluster (1 << cluster_bits is the cluster size).
    pub cluster_bits: U32,
    /// Virtual disk size in bytes.
    pub size: U64,
    /// 0 for no encryption, 1 for AES, 2 for LUKS.
    pub crypt_method: U32,
    /// Number of entries in the active L1 table.
    pub l1_size: U32,
    /// Offset into the image file at which the active L1 table starts.
    /// Must be aligned to a cluster boundary.
    pub l1_table_offset: U64,
    /// Offset into the image file at which the refcount table starts.
    /// Must be aligned to a cluster boundary.
    pub refcount_table_offset: U64,
    /// Number of clusters that the refcount table occupies.
    pub refcount_table_clusters: U32,
    /// Number of snapshots contained in the image.
    pub nb_snapshots: U32,
    /// Offset into the image file at which the snapshot table starts.
    /// Must be aligned to a cluster boundary.
    pub snapshots_offset: U64,
    /// Bitmask of incompatible features (v3).
    pub incompatible_features: U64,
    /// Bitmask of compatible features (v3).
    pub compatible_features: U64,
    /// Bitmask of auto-clear features (v3).
    pub autoclear_features: U64,
    /// Describes the width of a reference count block entry:
    /// refcount_bits = 1 << refcount_order (v3; 4 in v2).
    pub refcount_order: U32,
    /// Length of the header structure in bytes (v3).
    pub header_length: U32,
}

const _: () = assert!(std::mem::size_of::<RawHeader>() == 104);

/// The algorithm of compressed clusters (header byte 104).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompressionType {
    /// zlib/deflate (raw deflate, no zlib header), the default.
    Deflate,
    /// zstd.
    Zstd,
}

impl CompressionType {
    /// The name qemu-img prints ("zlib" or "zstd").
    pub fn name(self) -> &'static str {
        match self {
            CompressionType::Deflate => "zlib",
            CompressionType::Zstd => "zstd",
        }
    }
}

/// Kind of a feature named in the feature name table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeatureKind {
    /// An incompatible feature.
    Incompatible,
    /// A compatible feature.
    Compatible,
    /// An auto-clear feature.
    Autoclear,
}

/// One entry of the feature name table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeatureName {
    /// Which feature bitmask the bit belongs to (type byte 0, 1 or 2; other
    /// values are kept as `None` and ignored).
    pub kind: Option<FeatureKind>,
    /// The raw type byte.
    pub kind_byte: u8,
    /// Bit number within the bitmask (0-63).
    pub bit: u8,
    /// Feature name (padded with zeros on disk, at most 46 bytes), decoded
    /// for display.
    pub name: String,
    /// The 46 name bytes exactly as stored, so that a header rewrite keeps
    /// them even when they are not UTF-8.
    pub raw: [u8; 46],
}

impl FeatureName {
    /// A feature name entry; `name` is cut to 46 bytes.
    pub fn new(kind: FeatureKind, bit: u8, name: &str) -> FeatureName {
        let mut raw = [0u8; 46];
        let b = name.as_bytes();
        let l = b.len().min(46);
        raw[..l].copy_from_slice(&b[..l]);
        let kind_byte = match kind {
            FeatureKind::Incompatible => 0,
            FeatureKind::Compatible => 1,
            FeatureKind::Autoclear => 2,
        };
        FeatureName {
            kind: Some(kind),
            kind_byte,
            bit,
            name: String::from_utf8_lossy(&raw[..l]).into_owned(),
            raw,
        }
    }
}

/// A header extension.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Extension {
    /// The backing file's format name (e.g. "qcow2", "raw").
    BackingFormat(String),
    /// The feature name table.
    FeatureTable(Vec<FeatureName>),
    /// Bitmaps extension: number of bitmaps, bitmap directory size and offset.
    Bitmaps {
        /// Number of bitmaps in the image.
        nb_bitmaps: u32,
        /// Size of the bitmap directory in bytes.
        directory_size: u64,
        /// Offset of the bitmap directory in the image file.
        directory_offset: u64,
    },
    /// External data file name.
    DataFile(String),
    /// Full disk encryption header pointer.
    FullDiskEncryption {
        /// Offset of the encryption header.
        offset: u64,
        /// Length of the encryption header.
        length: u64,
    },
    /// Any other extension, kept byte for byte so it survives a rewrite.
    Unknown {
        /// Extension type.
        magic: u32,
        /// Its data, unpadded.
        data: Vec<u8>,
    },
}

impl Extension {
    /// The extension's type number.
    pub fn magic(&self) -> u32 {
        match self {
            Extension::BackingFormat(_) => EXT_BACKING_FORMAT,
            Extension::FeatureTable(_) => EXT_FEATURE_TABLE,
            Extension::Bitmaps { .. } => EXT_BITMAPS,
            Extension::DataFile(_) => EXT_DATA_FILE,
            Extension::FullDiskEncryption { .. } => EXT_FDE,
            Extension::Unknown { magic, .. } => *magic,
        }
    }

    fn encode_data(&self) -> Vec<u8> {
        match self {
            Extension::BackingFormat(s) | Extension::DataFile(s) => s.as_bytes().to_vec(),
            Extension::FeatureTable(names) => {
                let mut v = Vec::with_capacity(names.len() * 48);
                for n in names {
                    let mut e = [0u8; 48];
                    e[0] = n.kind_byte;
                    e[1] = n.bit;
                    e[2..].copy_from_slice(&n.raw);
                    v.extend_from_slice(&e);
                }
                v
            }
            Extension::Bitmaps {
                nb_bitmaps,
                directory_size,
                directory_offset,
            } => {
                let mut v = Vec::with_capacity(24);
                v.extend_from_slice(&nb_bitmaps.to_be_bytes());
                v.extend_from_slice(&0u32.to_be_bytes());
                v.extend_from_slice(&directory_size.to_be_bytes());
                v.extend_from_slice(&directory_offset.to_be_bytes());
                v
            }
            Extension::FullDiskEncryption { offset, length } => {
                let mut v = Vec::with_capacity(16);
                v.extend_from_slice(&offset.to_be_bytes());
                v.extend_from_slice(&length.to_be_bytes());
                v
            }
            Extension::Unknown { data, .. } => data.clone(),
        }
    }
}

/// A validated qcow2 header.
///
/// The fields are private: read them with the getters of the same name;
/// change them with the `set_*` methods, which keep what belongs together
/// (a table's offset and size) in one call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Version (2 or 3).
    version: u32,
    /// Offset of the backing file name in the image file (0: none).
    backing_file_offset: u64,
    /// Length of the backing file name.
    backing_file_size: u32,
    /// The backing file name, when there is one (must be UTF-8 here).
    backing_file: Option<String>,
    /// log2 of the cluster size.
    cluster_bits: u32,
    /// Virtual disk size in bytes.
    size: u64,
    /// Number of entries in the active L1 table.
    l1_size: u32,
    /// Offset of the active L1 table (cluster-aligned).
    l1_table_offset: u64,
    /// Offset of the refcount table (cluster-aligned).
    refcount_table_offset: u64,
    /// Number of clusters the refcount table occupies.
    refcount_table_clusters: u32,
    /// Number of internal snapshots.
    nb_snapshots: u32,
    /// Offset of the snapshot table (cluster-aligned).
    snapshots_offset: u64,
    /// Incompatible feature bits.
    incompatible_features: Incompatible,
    /// Compatible feature bits.
    compatible_features: Compatible,
    /// Auto-clear feature bits.
    autoclear_features: Autoclear,
    /// refcount_bits = 1 << refcount_order.
    refcount_order: u32,
    /// Length of the header structure (72 for v2).
    header_length: u32,
    /// Compression type of compressed clusters.
    compression_type: CompressionType,
    /// Header bytes after the compression type byte (offsets 105 to
    /// header_length), kept so that a rewrite preserves them.
    extra: Vec<u8>,
    /// Header extensions in on-disk order (the end marker excluded).
    extensions: Vec<Extension>,
}

fn be32(b: &[u8], at: usize) -> Option<u32> {
    let s = b.get(at..at.checked_add(4)?)?;
    Some(u32::from_be_bytes(s.try_into().ok()?))
}

fn be64(b: &[u8], at: usize) -> Option<u64> {
    let s = b.get(at..at.checked_add(8)?)?;
    Some(u64::from_be_bytes(s.try_into().ok()?))
}

/// Reads the cluster_bits field from the first bytes of a file, after
/// checking the magic, so a caller knows how much of the file is cluster 0.
pub fn peek_cluster_bits(prefix: &[u8]) -> Result<u32> {
    let magic = be32(prefix, 0).ok_or(FormatError::new("file too short for a qcow2 header", 0))?;
    if magic != MAGIC {
        return Err(FormatError::new("not a qcow2 image (bad magic)", 0));
    }
    let bits = be32(prefix, 20).ok_or(FormatError::new("file too short for a qcow2 header", 0))?;
    if !(limits::MIN_CLUSTER_BITS..=limits::MAX_CLUSTER_BITS).contains(&bits) {
        return Err(FormatError::with_detail(
            "cluster_bits out of range (9..=21)",
            20,
            bits.to_string(),
        ));
    }
    Ok(bits)
}

/// Whether `bytes` start with the qcow2 magic.
pub fn has_qcow2_magic(bytes: &[u8]) -> bool {
    be32(bytes, 0) == Some(MAGIC)
}

fn bit_names(bits: u64, kind: FeatureKind, table: &[FeatureName]) -> String {
    let mut parts = Vec::new();
    for bit in 0..64u8 {
        if bits & (1u64 << bit) != 0 {
            let name = table
                .iter()
                .find(|f| f.kind == Some(kind) && f.bit == bit)
                .map(|f| f.name.clone());
            parts.push(match name {
                Some(n) if !n.is_empty() => format!("bit {bit} ({n})"),
                _ => format!("bit {bit} (unnamed)"),
            });
        }
    }
    parts.join(", ")
}

impl Header {
    /// A header of `version` (2 or 3) with no tables, no backing file, no
    /// feature bits and no extensions: what `create` starts from. Its
    /// header length is the version's (72, or 112 with the compression
    /// type and its padding).
    pub fn new(
        version: u32,
        cluster_bits: u32,
        refcount_order: u32,
        compression_type: CompressionType,
    ) -> Header {
        let v2 = version < 3;
        Header {
            version,
            backing_file_offset: 0,
            backing_file_size: 0,
            backing_file: None,
            cluster_bits,
            size: 0,
            l1_size: 0,
            l1_table_offset: 0,
            refcount_table_offset: 0,
            refcount_table_clusters: 0,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: Incompatible::empty(),
            compatible_features: Compatible::empty(),
            autoclear_features: Autoclear::empty(),
            refcount_order,
            header_length: if v2 { limits::V2_HEADER_LEN } else { 112 },
            compression_type,
            extra: if v2 { Vec::new() } else { vec![0; 7] },
            extensions: Vec::new(),
        }
    }

    /// Version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }
    /// Offset of the backing file name in the image file (0: none).
    pub fn backing_file_offset(&self) -> u64 {
        self.backing_file_offset
    }
    /// Length of the backing file name.
    pub fn backing_file_size(&self) -> u32 {
        self.backing_file_size
    }
    /// The backing file name, when there is one.
    pub fn backing_file(&self) -> Option<&str> {
        self.backing_file.as_deref()
    }
    /// log2 of the cluster size.
    pub fn cluster_bits(&self) -> u32 {
        self.cluster_bits
    }
    /// Virtual disk size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }
    /// Number of entries in the active L1 table.
    pub fn l1_size(&self) -> u32 {
        self.l1_size
    }
    /// Offset of the active L1 table.
    pub fn l1_table_offset(&self) -> u64 {
        self.l1_table_offset
    }
    /// Offset of the refcount table.
    pub fn refcount_table_offset(&self) -> u64 {
        self.refcount_table_offset
    }
    /// Number of clusters the refcount table occupies.
    pub fn refcount_table_clusters(&self) -> u32 {
        self.refcount_table_clusters
    }
    /// Number of internal snapshots.
    pub fn nb_snapshots(&self) -> u32 {
        self.nb_snapshots
    }
    /// Offset of the snapshot table.
    pub fn snapshots_offset(&self) -> u64 {
        self.snapshots_offset
    }
    /// Incompatible feature bits.
    pub fn incompatible_features(&self) -> Incompatible {
        self.incompatible_features
    }
    /// Compatible feature bits.
    pub fn compatible_features(&self) -> Compatible {
        self.compatible_features
    }
    /// Auto-clear feature bits.
    pub fn autoclear_features(&self) -> Autoclear {
        self.autoclear_features
    }
    /// refcount_bits = 1 << refcount_order.
    pub fn refcount_order(&self) -> u32 {
        self.refcount_order
    }
    /// Length of the header structure (72 for v2).
    pub fn header_length(&self) -> u32 {
        self.header_length
    }
    /// Compression type of compressed clusters.
    pub fn compression_type(&self) -> CompressionType {
        self.compression_type
    }
    /// Header bytes after the compression type byte (offsets 105 to
    /// `header_length`), kept so that a rewrite preserves them.
    pub fn extra(&self) -> &[u8] {
        &self.extra
    }
    /// Header extensions in on-disk order (the end marker excluded).
    pub fn extensions(&self) -> &[Extension] {
        &self.extensions
    }

    /// Points the header at an active L1 table of `size` entries at
    /// `offset`.
    pub fn set_l1_table(&mut self, offset: u64, size: u32) {
        self.l1_table_offset = offset;
        self.l1_size = size;
    }
    /// Points the header at a refcount table of `clusters` clusters at
    /// `offset`.
    pub fn set_refcount_table(&mut self, offset: u64, clusters: u32) {
        self.refcount_table_offset = offset;
        self.refcount_table_clusters = clusters;
    }
    /// Points the header at a snapshot table of `count` entries at
    /// `offset`.
    pub fn set_snapshot_table(&mut self, offset: u64, count: u32) {
        self.snapshots_offset = offset;
        self.nb_snapshots = count;
    }
    /// Sets the backing file name (`None`: no backing file). Where it is
    /// stored is [`Header::set_backing_file_location`]'s (or
    /// [`Header::encode`]'s) business.
    pub fn set_backing_file(&mut self, name: Option<String>) {
        self.backing_file = name;
    }
    /// Records where the backing file name lies in the file.
    pub fn set_backing_file_location(&mut self, offset: u64, size: u32) {
        self.backing_file_offset = offset;
        self.backing_file_size = size;
    }
    /// Sets the virtual disk size.
    pub fn set_size(&mut self, size: u64) {
        self.size = size;
    }
    /// Sets the version (2 or 3).
    pub fn set_version(&mut self, version: u32) {
        self.version = version;
    }
    /// Sets the incompatible feature bits.
    pub fn set_incompatible(&mut self, bits: Incompatible) {
        self.incompatible_features = bits;
    }
    /// Sets the compatible feature bits.
    pub fn set_compatible(&mut self, bits: Compatible) {
        self.compatible_features = bits;
    }
    /// Sets the auto-clear feature bits.
    pub fn set_autoclear(&mut self, bits: Autoclear) {
        self.autoclear_features = bits;
    }
    /// Sets refcount_order (refcount_bits = 1 << it).
    pub fn set_refcount_order(&mut self, order: u32) {
        self.refcount_order = order;
    }
    /// Sets the header length, and the bytes kept after the compression
    /// type byte (`extra`).
    pub fn set_header_length(&mut self, length: u32, extra: Vec<u8>) {
        self.header_length = length;
        self.extra = extra;
    }
    /// Sets the compression type.
    pub fn set_compression_type(&mut self, kind: CompressionType) {
        self.compression_type = kind;
    }
    /// The header extensions, to change.
    pub fn extensions_mut(&mut self) -> &mut Vec<Extension> {
        &mut self.extensions
    }

    /// Parses and validates the header from the bytes of cluster 0 (or of
    /// the whole file when it is shorter than a cluster).
    ///
    /// Checks every field against the limits; refuses encrypted images
    /// and unknown incompatible feature bits (naming
    /// them from the image's feature name table when it has one).
    pub fn parse(cluster0: &[u8]) -> Result<Header> {
        let cluster_bits = peek_cluster_bits(cluster0)?;
        if cluster0.len() < limits::V2_HEADER_LEN as usize {
            return Err(FormatError::new("file too short for a qcow2 header", 0));
        }
        // A v2 header is only 72 bytes: view it through a zero-padded copy.
        let mut fixed = [0u8; 104];
        let n = cluster0.len().min(104);
        if let (Some(dst), Some(src)) = (fixed.get_mut(..n), cluster0.get(..n)) {
            dst.copy_from_slice(src);
        }
        let (raw, _) = RawHeader::read_from_prefix(&fixed[..])
            .map_err(|_| FormatError::new("file too short for a qcow2 header", 0))?;
        let version = raw.version.get();
        if version != 2 && version != 3 {
            return Err(FormatError::with_detail(
                "unsupported qcow2 version",
                4,
                version.to_string(),
            ));
        }
        let cluster_size = 1u64 << cluster_bits;
        // Only cluster 0 holds the header, extensions and backing name.
        let c0_len = (cluster0.len() as u64).min(cluster_size) as usize;
        let c0 = cluster0.get(..c0_len).unwrap_or(cluster0);

        let (incompat, compat, autoclear, refcount_order, header_length) = if version == 2 {
            (0, 0, 0, 4, limits::V2_HEADER_LEN)
        } else {
            if c0.len() < limits::V3_HEADER_MIN_LEN as usize {
                return Err(FormatError::new("file too short for a version 3 header", 0));
            }
            (
                raw.incompatible_features.get(),
                raw.compatible_features.get(),
                raw.autoclear_features.get(),
                raw.refcount_order.get(),
                raw.header_length.get(),
            )
        };
        if version == 3 {
            if header_length < limits::V3_HEADER_MIN_LEN {
                return Err(FormatError::with_detail(
                    "header_length is smaller than 104",
                    100,
                    header_length.to_string(),
                ));
            }
            if header_length % 8 != 0 && header_length != limits::V3_HEADER_MIN_LEN {
                return Err(FormatError::with_detail(
                    "header_length is not a multiple of 8",
                    100,
                    header_length.to_string(),
                ));
            }
            if u64::from(header_length) > cluster_size || header_length as usize > c0.len() {
                return Err(FormatError::with_detail(
                    "header_length reaches past the first cluster or the end of the file",
                    100,
                    header_length.to_string(),
                ));
            }
        }
        if refcount_order > limits::MAX_REFCOUNT_ORDER {
            return Err(FormatError::with_detail(
                "refcount_order out of range (0..=6)",
                96,
                refcount_order.to_string(),
            ));
        }
        let crypt = raw.crypt_method.get();
        if crypt != 0 {
            return Err(FormatError::with_detail(
                "encrypted images are not supported",
                32,
                match crypt {
                    1 => "AES (crypt_method 1)".to_string(),
                    2 => "LUKS (crypt_method 2)".to_string(),
                    n => format!("crypt_method {n}"),
                },
            ));
        }

        let compression_byte = if header_length > 104 {
            c0.get(104).copied().unwrap_or(0)
        } else {
            0
        };
        let extra = if header_length > 105 {
            c0.get(105..header_length as usize).unwrap_or(&[]).to_vec()
        } else {
            Vec::new()
        };

        let backing_file_offset = raw.backing_file_offset.get();
        let backing_file_size = raw.backing_file_size.get();

        // Extensions: from the end of the header up to the backing file name
        // (or the end of cluster 0).
        let ext_start = header_length as usize;
        let ext_end = if backing_file_offset != 0 {
            (backing_file_offset.min(c0.len() as u64)) as usize
        } else {
            c0.len()
        };
        // The backing file name ends the area where QEMU looks for them.
        let named_end = backing_file_offset != 0 && backing_file_offset <= c0.len() as u64;
        let extensions = parse_extensions(c0, ext_start, ext_end, named_end)?;
        let feature_table: Vec<FeatureName> = extensions
            .iter()
            .filter_map(|e| match e {
                Extension::FeatureTable(t) => Some(t.clone()),
                _ => None,
            })
            .flatten()
            .collect();

        let unknown = incompat & !Incompatible::KNOWN.bits();
        if unknown != 0 {
            return Err(FormatError::with_detail(
                "unsupported incompatible features",
                72,
                bit_names(unknown, FeatureKind::Incompatible, &feature_table),
            ));
        }
        // External data files (bit 2) are opened by strata-image
        // (qcow2/data_file.rs): the name is the DataFile extension.
        let compression_type = match compression_byte {
            0 => CompressionType::Deflate,
            1 => CompressionType::Zstd,
            n => {
                return Err(FormatError::with_detail(
                    "unknown compression type",
                    104,
                    n.to_string(),
                ))
            }
        };
        if (compression_type != CompressionType::Deflate)
            != (incompat & Incompatible::COMPRESSION.bits() != 0)
        {
            return Err(FormatError::new(
                "compression type bit and compression_type field disagree",
                72,
            ));
        }
        let extended_l2 = incompat & Incompatible::EXTENDED_L2.bits() != 0;
        let geometry = Geometry::new(cluster_bits, extended_l2)?;

        // Backing file name.
        let backing_file = if backing_file_offset != 0 {
            if backing_file_size > limits::MAX_BACKING_NAME {
                return Err(FormatError::with_detail(
                    "backing file name too long (over 1023 bytes)",
                    16,
                    backing_file_size.to_string(),
                ));
            }
            let end = backing_file_offset
                .checked_add(u64::from(backing_file_size))
                .filter(|e| *e <= cluster_size)
                .ok_or(FormatError::new(
                    "backing file name is not inside the first cluster",
                    8,
                ))?;
            let bytes =
                c0.get(backing_file_offset as usize..end as usize)
                    .ok_or(FormatError::new(
                        "backing file name reaches past the end of the file",
                        8,
                    ))?;
            let name = std::str::from_utf8(bytes).map_err(|_| {
                FormatError::new("backing file name is not valid UTF-8", backing_file_offset)
            })?;
            if name.contains('\0') {
                return Err(FormatError::new(
                    "backing file name contains a NUL byte",
                    backing_file_offset,
                ));
            }
            Some(name.to_string())
        } else {
            None
        };

        let size = raw.size.get();
        if size > limits::MAX_VIRTUAL_SIZE {
            return Err(FormatError::with_detail(
                "virtual size too large",
                24,
                size.to_string(),
            ));
        }
        let l1_size = raw.l1_size.get();
        if u64::from(l1_size) * 8 > limits::MAX_L1_BYTES {
            return Err(FormatError::with_detail(
                "L1 table too large",
                36,
                l1_size.to_string(),
            ));
        }
        if geometry.l1_entries_for(size) > u64::from(l1_size) {
            return Err(FormatError::with_detail(
                "L1 table too small for the virtual size",
                36,
                format!("l1_size {l1_size}, virtual size {size}"),
            ));
        }
        let l1_table_offset = raw.l1_table_offset.get();
        // QEMU checks the alignment even of an empty table.
        if !geometry.is_aligned(l1_table_offset) || (l1_size > 0 && l1_table_offset == 0) {
            return Err(FormatError::with_detail(
                "L1 table offset invalid (zero or not cluster-aligned)",
                40,
                format!("{l1_table_offset:#x}"),
            ));
        }
        if l1_table_offset
            .checked_add(u64::from(l1_size) * 8)
            .is_none()
        {
            return Err(FormatError::new("L1 table offset overflows", 40));
        }
        let refcount_table_offset = raw.refcount_table_offset.get();
        let refcount_table_clusters = raw.refcount_table_clusters.get();
        // As QEMU's qcow2_validate_table: offset 0 and an empty table pass
        // here (qemu-img check reports such an image and `check -r all`
        // rebuilds its refcounts; iotests 060, 108). Writers refuse it.
        if !geometry.is_aligned(refcount_table_offset) {
            return Err(FormatError::with_detail(
                "refcount table offset invalid (not cluster-aligned)",
                48,
                format!("{refcount_table_offset:#x}"),
            ));
        }
        if u64::from(refcount_table_clusters) << cluster_bits > limits::MAX_REFTABLE_BYTES {
            return Err(FormatError::with_detail(
                "refcount table too large",
                56,
                refcount_table_clusters.to_string(),
            ));
        }
        if refcount_table_offset
            .checked_add(u64::from(refcount_table_clusters) << cluster_bits)
            .is_none()
        {
            return Err(FormatError::new("refcount table offset overflows", 48));
        }
        let nb_snapshots = raw.nb_snapshots.get();
        let snapshots_offset = raw.snapshots_offset.get();
        if nb_snapshots > limits::MAX_SNAPSHOTS {
            return Err(FormatError::with_detail(
                "too many snapshots",
                60,
                nb_snapshots.to_string(),
            ));
        }
        if nb_snapshots > 0 && (snapshots_offset == 0 || !geometry.is_aligned(snapshots_offset)) {
            return Err(FormatError::with_detail(
                "snapshot table offset invalid (zero or not cluster-aligned)",
                64,
                format!("{snapshots_offset:#x}"),
            ));
        }
        // As QEMU's qcow2_validate_table: the offset must be aligned and
        // the table must fit below 2^63 even when there are no snapshots
        // (iotest 080).
        let table_min = u64::from(nb_snapshots) * crate::snapshot::FIXED_LEN as u64;
        if !geometry.is_aligned(snapshots_offset)
            || snapshots_offset
                .checked_add(table_min)
                .is_none_or(|e| e > i64::MAX as u64)
        {
            return Err(FormatError::with_detail(
                "snapshot table offset invalid (not cluster-aligned or too large)",
                64,
                format!("{snapshots_offset:#x}"),
            ));
        }

        Ok(Header {
            version,
            backing_file_offset,
            backing_file_size,
            backing_file,
            cluster_bits,
            size,
            l1_size,
            l1_table_offset,
            refcount_table_offset,
            refcount_table_clusters,
            nb_snapshots,
            snapshots_offset,
            incompatible_features: Incompatible::from_bits_retain(incompat),
            compatible_features: Compatible::from_bits_retain(compat),
            autoclear_features: Autoclear::from_bits_retain(autoclear),
            refcount_order,
            header_length,
            compression_type,
            extra,
            extensions,
        })
    }

    /// The cluster geometry this header describes.
    pub fn geometry(&self) -> Geometry {
        // parse() validated both values.
        Geometry::new(self.cluster_bits, self.extended_l2()).unwrap_or(Geometry::DEFAULT)
    }
    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }
    /// Width of a refcount in bits.
    pub fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order
    }
    /// Whether L2 entries are extended.
    pub fn extended_l2(&self) -> bool {
        self.incompatible_features
            .contains(Incompatible::EXTENDED_L2)
    }
    /// Whether the dirty bit is set.
    pub fn dirty(&self) -> bool {
        self.incompatible_features.contains(Incompatible::DIRTY)
    }
    /// Whether the corrupt bit is set.
    pub fn corrupt(&self) -> bool {
        self.incompatible_features.contains(Incompatible::CORRUPT)
    }
    /// Whether lazy refcounts are enabled.
    pub fn lazy_refcounts(&self) -> bool {
        self.compatible_features
            .contains(Compatible::LAZY_REFCOUNTS)
    }
    /// The backing format named by the backing format extension.
    pub fn backing_format(&self) -> Option<&str> {
        self.extensions.iter().find_map(|e| match e {
            Extension::BackingFormat(f) => Some(f.as_str()),
            _ => None,
        })
    }
    /// The bitmaps extension's bitmap count, when present.
    pub fn bitmaps(&self) -> Option<(u32, u64, u64)> {
        self.extensions.iter().find_map(|e| match e {
            Extension::Bitmaps {
                nb_bitmaps,
                directory_size,
                directory_offset,
            } => Some((*nb_bitmaps, *directory_size, *directory_offset)),
            _ => None,
        })
    }
    /// The feature name table entries, if the image has the extension.
    pub fn feature_names(&self) -> impl Iterator<Item = &FeatureName> {
        self.extensions
            .iter()
            .filter_map(|e| match e {
                Extension::FeatureTable(t) => Some(t.iter()),
                _ => None,
            })
            .flatten()
    }

    /// Encodes the header, its extensions (end marker included) and the
    /// backing file name into a buffer of `cluster_size` bytes.
    ///
    /// The backing file name is placed right after the extensions and
    /// `backing_file_offset`/`backing_file_size` are set accordingly in the
    /// encoded bytes (and returned in `self`'s copy via [`Header::layout`]).
    /// Fails when everything does not fit in the first cluster.
    pub fn encode(&self) -> Result<Vec<u8>> {
        let cluster_size = usize::try_from(self.cluster_size())
            .map_err(|_| FormatError::new("cluster size too large", 20))?;
        let mut buf = vec![0u8; cluster_size];
        let (bf_off, bf_len) = self.layout()?;
        let raw = RawHeader {
            magic: MAGIC.into(),
            version: self.version.into(),
            backing_file_offset: bf_off.into(),
            backing_file_size: bf_len.into(),
            cluster_bits: self.cluster_bits.into(),
            size: self.size.into(),
            crypt_method: 0.into(),
            l1_size: self.l1_size.into(),
            l1_table_offset: self.l1_table_offset.into(),
            refcount_table_offset: self.refcount_table_offset.into(),
            refcount_table_clusters: self.refcount_table_clusters.into(),
            nb_snapshots: self.nb_snapshots.into(),
            snapshots_offset: self.snapshots_offset.into(),
            incompatible_features: self.incompatible_features.bits().into(),
            compatible_features: self.compatible_features.bits().into(),
            autoclear_features: self.autoclear_features.bits().into(),
            refcount_order: self.refcount_order.into(),
            header_length: self.header_length.into(),
        };
        let fixed = raw.as_bytes();
        let hl = self.header_length as usize;
        if self.version == 2 {
            buf[..72].copy_from_slice(&fixed[..72]);
        } else {
            buf[..104].copy_from_slice(fixed);
            if hl > 104 {
                buf[104] = match self.compression_type {
                    CompressionType::Deflate => 0,
                    CompressionType::Zstd => 1,
                };
                let n = self.extra.len().min(hl - 105);
                buf[105..105 + n].copy_from_slice(&self.extra[..n]);
            }
        }
        let mut at = hl;
        if self.version == 3 || !self.extensions.is_empty() {
            for ext in &self.extensions {
                let data = ext.encode_data();
                let padded = data.len().div_ceil(8) * 8;
                buf[at..at + 4].copy_from_slice(&ext.magic().to_be_bytes());
                buf[at + 4..at + 8].copy_from_slice(&(data.len() as u32).to_be_bytes());
                buf[at + 8..at + 8 + data.len()].copy_from_slice(&data);
                at += 8 + padded;
            }
            // The end marker (8 zero bytes) is already zero.
        }
        // The name goes where the header says it is: `layout` reserves the
        // end marker even for a v2 header without extensions.
        if let Some(name) = &self.backing_file {
            let at = bf_off as usize;
            buf[at..at + name.len()].copy_from_slice(name.as_bytes());
        }
        Ok(buf)
    }

    /// Number of meaningful bytes [`Header::encode`] produces: the header,
    /// its extensions with the end marker, and the backing file name.
    pub fn encoded_len(&self) -> Result<u64> {
        let (off, len) = self.layout()?;
        let mut at = u64::from(self.header_length);
        for ext in &self.extensions {
            at += 8 + (ext.encode_data().len() as u64).div_ceil(8) * 8;
        }
        Ok((at + 8).max(off + u64::from(len)))
    }

    /// Where [`Header::encode`] places the backing file name: its offset
    /// and length (0, 0 when there is none). Fails when the header, its
    /// extensions and the name do not fit in the first cluster.
    pub fn layout(&self) -> Result<(u64, u32)> {
        let mut at = self.header_length as u64;
        for ext in &self.extensions {
            let len = ext.encode_data().len() as u64;
            if len > u64::from(u32::MAX) {
                return Err(FormatError::new("header extension too large", at));
            }
            at += 8 + len.div_ceil(8) * 8;
        }
        at += 8;
        let name_len = self.backing_file.as_ref().map_or(0, |n| n.len() as u64);
        if name_len > u64::from(limits::MAX_BACKING_NAME) {
            return Err(FormatError::new(
                "backing file name too long (over 1023 bytes)",
                at,
            ));
        }
        if at + name_len > self.cluster_size() {
            return Err(FormatError::new(
                "header, extensions and backing file name do not fit in the first cluster",
                at,
            ));
        }
        Ok(match &self.backing_file {
            Some(n) => (at, n.len() as u32),
            None => (0, 0),
        })
    }
}

/// Parses the header extensions in `c0[start..end]`. `named_end`: `end`
/// is the backing file name's offset (else the end of what was read of
/// the first cluster).
fn parse_extensions(
    c0: &[u8],
    start: usize,
    end: usize,
    named_end: bool,
) -> Result<Vec<Extension>> {
    let mut exts = Vec::new();
    let mut at = start;
    loop {
        if at >= end {
            // An image without extensions (v2 with a backing name right
            // after the header) is fine.
            break;
        }
        if at + 8 > end {
            if named_end {
                // As QEMU's qcow2_read_extensions: an extension header
                // that does not fit before the backing file name (iotest
                // 080, "huge unknown header extension").
                return Err(FormatError::new(
                    "header extension too large (its type and length reach past the backing \
                     file name)",
                    at as u64,
                ));
            }
            // A first cluster cut short by the end of the file: QEMU
            // reads zeros there, an end marker.
            break;
        }
        let magic =
            be32(c0, at).ok_or(FormatError::new("header extension truncated", at as u64))?;
        let len =
            be32(c0, at + 4).ok_or(FormatError::new("header extension truncated", at as u64))?;
        if magic == EXT_END {
            break;
        }
        if exts.len() >= limits::MAX_EXTENSIONS {
            return Err(FormatError::new("too many header extensions", at as u64));
        }
        let data_start = at + 8;
        let data_end = data_start
            .checked_add(len as usize)
            .filter(|e| *e <= end)
            .ok_or(FormatError::with_detail(
                "header extension reaches past the end of the extension area",
                at as u64,
                format!("type {magic:#x}, length {len}"),
            ))?;
        let data = c0
            .get(data_start..data_end)
            .ok_or(FormatError::new("header extension truncated", at as u64))?;
        let ext = match magic {
            EXT_BACKING_FORMAT => Extension::BackingFormat(
                std::str::from_utf8(data)
                    .map_err(|_| FormatError::new("backing format name is not UTF-8", at as u64))?
                    .trim_end_matches('\0')
                    .to_string(),
            ),
            EXT_DATA_FILE => Extension::DataFile(
                std::str::from_utf8(data)
                    .map_err(|_| FormatError::new("data file name is not UTF-8", at as u64))?
                    .to_string(),
            ),
            EXT_FEATURE_TABLE => {
                let mut names = Vec::with_capacity(data.len() / 48);
                for e in data.chunks_exact(48) {
                    let kind_byte = e[0];
                    let raw_name = &e[2..];
                    let n = raw_name
                        .iter()
                        .position(|b| *b == 0)
                        .unwrap_or(raw_name.len());
                    names.push(FeatureName {
                        kind: match kind_byte {
                            0 => Some(FeatureKind::Incompatible),
                            1 => Some(FeatureKind::Compatible),
                            2 => Some(FeatureKind::Autoclear),
                            _ => None,
                        },
                        kind_byte,
                        bit: e[1],
                        name: String::from_utf8_lossy(&raw_name[..n]).into_owned(),
                        raw: raw_name.try_into().unwrap_or([0u8; 46]),
                    });
                }
                Extension::FeatureTable(names)
            }
            EXT_BITMAPS => {
                if data.len() != 24 {
                    return Err(FormatError::new(
                        "bitmaps extension has the wrong length",
                        at as u64,
                    ));
                }
                Extension::Bitmaps {
                    nb_bitmaps: be32(data, 0).unwrap_or(0),
                    directory_size: be64(data, 8).unwrap_or(0),
                    directory_offset: be64(data, 16).unwrap_or(0),
                }
            }
            EXT_FDE => {
                if data.len() != 16 {
                    return Err(FormatError::new(
                        "encryption extension has the wrong length",
                        at as u64,
                    ));
                }
                Extension::FullDiskEncryption {
                    offset: be64(data, 0).unwrap_or(0),
                    length: be64(data, 8).unwrap_or(0),
                }
            }
            _ => Extension::Unknown {
                magic,
                data: data.to_vec(),
            },
        };
        exts.push(ext);
        let padded = (len as usize).div_ceil(8) * 8;
        at = data_start.checked_add(padded).ok_or(FormatError::new(
            "header extension length overflows",
            at as u64,
        ))?;
    }
    Ok(exts)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A v3 header for a 1 MiB image with 64 KiB clusters: L1 at 0x30000
    /// (1 entry), refcount table at 0x10000 (1 cluster), no snapshots.
    fn v3_bytes() -> Vec<u8> {
        let mut b = vec![0u8; 65536];
        b[0..4].copy_from_slice(&MAGIC.to_be_bytes()); // magic "QFI\xfb"
        b[4..8].copy_from_slice(&3u32.to_be_bytes()); // version 3
        b[20..24].copy_from_slice(&16u32.to_be_bytes()); // cluster_bits
        b[24..32].copy_from_slice(&(1u64 << 20).to_be_bytes()); // size 1 MiB
        b[36..40].copy_from_slice(&1u32.to_be_bytes()); // l1_size
        b[40..48].copy_from_slice(&0x30000u64.to_be_bytes()); // l1_table_offset
        b[48..56].copy_from_slice(&0x10000u64.to_be_bytes()); // refcount_table_offset
        b[56..60].copy_from_slice(&1u32.to_be_bytes()); // refcount_table_clusters
        b[96..100].copy_from_slice(&4u32.to_be_bytes()); // refcount_order
        b[100..104].copy_from_slice(&112u32.to_be_bytes()); // header_length
        b
    }

    #[test]
    fn parses_a_minimal_v3_header() {
        let h = Header::parse(&v3_bytes()).unwrap();
        assert_eq!(h.version, 3);
        assert_eq!(h.cluster_size(), 65536);
        assert_eq!(h.size, 1 << 20);
        assert_eq!(h.refcount_bits(), 16);
        assert_eq!(h.compression_type, CompressionType::Deflate);
        assert!(h.extensions.is_empty());
        assert_eq!(h.backing_file, None);
    }

    #[test]
    fn parses_a_v2_header_with_a_backing_name() {
        let mut b = v3_bytes();
        b[4..8].copy_from_slice(&2u32.to_be_bytes());
        b[72..104].fill(0xee); // v2 has no such fields: ignored
        b[8..16].copy_from_slice(&72u64.to_be_bytes()); // backing_file_offset
        b[16..20].copy_from_slice(&8u32.to_be_bytes()); // backing_file_size
        b[72..80].copy_from_slice(b"base.img");
        let h = Header::parse(&b).unwrap();
        assert_eq!(h.version, 2);
        assert_eq!(h.refcount_order, 4);
        assert_eq!(h.header_length, 72);
        assert_eq!(h.backing_file.as_deref(), Some("base.img"));
    }

    #[test]
    fn feature_bits_are_typed_and_unknown_ones_survive_encode() {
        let mut b = v3_bytes();
        // Incompatible: dirty; compatible: lazy refcounts and unknown bit
        // 7; autoclear: bitmaps and unknown bit 5.
        b[72..80].copy_from_slice(&1u64.to_be_bytes());
        b[80..88].copy_from_slice(&(1u64 | 1 << 7).to_be_bytes());
        b[88..96].copy_from_slice(&(1u64 | 1 << 5).to_be_bytes());
        let h = Header::parse(&b).unwrap();
        assert!(h.dirty() && !h.corrupt());
        assert_eq!(h.incompatible_features, Incompatible::DIRTY);
        assert!(h.lazy_refcounts());
        assert_eq!(h.compatible_features.bits(), 1 | 1 << 7);
        assert!(h.autoclear_features.contains(Autoclear::BITMAPS));
        assert!(!h.autoclear_features.contains(Autoclear::DATA_FILE_RAW));
        let out = h.encode().unwrap();
        assert_eq!(out[72..96], b[72..96]);
        // Clearing a known bit keeps the unknown one.
        let mut h = h;
        h.autoclear_features.remove(Autoclear::BITMAPS);
        h.incompatible_features.insert(Incompatible::CORRUPT);
        let out = h.encode().unwrap();
        assert_eq!(out[88..96], (1u64 << 5).to_be_bytes());
        assert_eq!(out[72..80], 3u64.to_be_bytes());
    }

    #[test]
    fn unknown_incompatible_bits_are_named_from_the_feature_table() {
        let mut b = v3_bytes();
        b[72..80].copy_from_slice(&(1u64 << 9).to_be_bytes());
        // Feature table extension with one entry: incompatible bit 9 "frob".
        b[112..116].copy_from_slice(&EXT_FEATURE_TABLE.to_be_bytes());
        b[116..120].copy_from_slice(&48u32.to_be_bytes());
        b[120] = 0;
        b[121] = 9;
        b[122..126].copy_from_slice(b"frob");
        let e = Header::parse(&b).unwrap_err();
        assert_eq!(e.what, "unsupported incompatible features");
        assert_eq!(e.detail.as_deref(), Some("bit 9 (frob)"));
    }

    #[test]
    fn encrypted_images_are_refused() {
        let mut b = v3_bytes();
        b[32..36].copy_from_slice(&2u32.to_be_bytes());
        let e = Header::parse(&b).unwrap_err();
        assert!(e.what.contains("encrypted"));
    }

    #[test]
    fn a_wild_snapshot_table_offset_is_refused_even_without_snapshots() {
        // iotest 080: nb_snapshots 0 (bytes 60..64), snapshots_offset
        // 0x1234567890abcdef (bytes 64..72): QEMU refuses to open it.
        let mut b = v3_bytes();
        b[60..64].copy_from_slice(&0u32.to_be_bytes());
        b[64..72].copy_from_slice(&0x1234_5678_90ab_cdefu64.to_be_bytes());
        let e = Header::parse(&b).unwrap_err();
        assert_eq!(e.offset, 64, "{e}");
    }

    #[test]
    fn limits_are_checked_before_anything_is_allocated() {
        let mut b = v3_bytes();
        b[36..40].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(Header::parse(&b).unwrap_err().what, "L1 table too large");
        let mut b = v3_bytes();
        b[56..60].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(Header::parse(&b)
            .unwrap_err()
            .what
            .contains("refcount table too large"));
        let mut b = v3_bytes();
        b[20..24].copy_from_slice(&30u32.to_be_bytes());
        assert!(Header::parse(&b).is_err());
        let mut b = v3_bytes();
        b[100..104].copy_from_slice(&0x20000u32.to_be_bytes());
        assert!(Header::parse(&b).is_err());
    }

    #[test]
    fn an_extension_whose_length_lies_is_refused() {
        let mut b = v3_bytes();
        b[112..116].copy_from_slice(&0x1234_5678u32.to_be_bytes());
        b[116..120].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(Header::parse(&b).unwrap_err().what.contains("past the end"));
    }

    #[test]
    fn encode_round_trips_unknown_extensions_and_extra_header_bytes() {
        let mut h = Header::parse(&v3_bytes()).unwrap();
        h.extensions.push(Extension::BackingFormat("qcow2".into()));
        h.extensions.push(Extension::Unknown {
            magic: 0xabcd,
            data: vec![1, 2, 3],
        });
        h.backing_file = Some("../base.qcow2".into());
        h.extra = vec![0, 0, 0, 0, 0, 0, 9];
        let bytes = h.encode().unwrap();
        let back = Header::parse(&bytes).unwrap();
        assert_eq!(back.extensions, h.extensions);
        assert_eq!(back.backing_file, h.backing_file);
        assert_eq!(back.backing_format(), Some("qcow2"));
        assert_eq!(back.extra, h.extra);
        let (off, len) = h.layout().unwrap();
        assert_eq!(
            (back.backing_file_offset, back.backing_file_size),
            (off, len)
        );
    }
}
