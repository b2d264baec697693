//! `strata convert`: the guest view of one or more chains (concatenated)
//! into an image, raw or qcow2, with qemu-img convert's options.
//!
//! The copy itself is strata-image's convert: it follows the sources'
//! block status (unallocated and zero ranges are never read), scans data
//! for zeros at the `-S` granularity as qemu-img does, and writes the
//! target with the `-t` cache mode (default `unsafe`, as qemu-img: the
//! output is not synced).

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use strata_format::CompressionType;
use strata_image::convert::{CacheMode, ConvertOptions, Offload, SPARSE_BLOCK};
use strata_image::create::CreateOptions;
use strata_image::{Chain, ImageFormat};

use crate::open_options;
use crate::size::parse_size;

/// Arguments of `strata convert`.
#[derive(Debug, Clone, clap::Args)]
#[command(
    after_help = "The output is not synced at the end by default (-t unsafe, as qemu-img): \
a crash soon after may lose it. -t writeback syncs it before the command succeeds."
)]
pub struct ConvertArgs {
    /// Source format.
    #[arg(short = 'f')]
    pub format: Option<String>,
    /// Output format: raw or qcow2.
    #[arg(short = 'O', default_value = "raw")]
    pub output_format: String,
    /// Compress data clusters (qcow2 output).
    #[arg(short = 'c')]
    pub compress: bool,
    /// qcow2 options: cluster_size, compat, refcount_bits, lazy_refcounts,
    /// extended_l2, compression_type, data_file, data_file_raw
    /// (comma-separated name=value).
    #[arg(short = 'o')]
    pub options: Option<String>,
    /// Show progress.
    #[arg(short = 'p')]
    pub progress: bool,
    /// Force share on the source: take no locks.
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// Copy the source's persistent dirty bitmaps (qcow2 to qcow2).
    #[arg(long = "bitmaps")]
    pub bitmaps: bool,
    /// Write into the existing image at the output path (no create; it
    /// must be at least as large as the sources).
    #[arg(short = 'n')]
    pub no_create: bool,
    /// With -n: the existing target reads as zeros (zero ranges are not
    /// written).
    #[arg(long = "target-is-zero")]
    pub target_is_zero: bool,
    /// Sparse detection: all-zero blocks of SIZE bytes (a multiple of 512,
    /// up to 16M) are not written; 0 fully allocates the output.
    #[arg(short = 'S', value_name = "SIZE")]
    pub sparse_size: Option<String>,
    /// The output is an overlay of BACKING (qcow2): only what the source's
    /// top image allocates is written.
    #[arg(short = 'B', value_name = "BACKING")]
    pub backing: Option<String>,
    /// Format of BACKING (-B); required with it.
    #[arg(short = 'F', value_name = "FMT")]
    pub backing_format: Option<String>,
    /// Copy offload: no zero detection on data; refused with -c and -S.
    #[arg(short = 'C')]
    pub copy_offload: bool,
    /// Out-of-order writes (accepted, as qemu-img's -W; Strata writes in
    /// order, which allows it).
    #[arg(short = 'W')]
    pub out_of_order: bool,
    /// Cache mode of the output: none, writeback, unsafe (default: the
    /// output is not synced), directsync, writethrough.
    #[arg(short = 't', value_name = "CACHE")]
    pub cache: Option<String>,
    /// Cache mode of the sources (accepted: none, writeback, unsafe,
    /// directsync, writethrough; default writeback). Strata reads the
    /// sources through the page cache in every mode.
    #[arg(short = 'T', value_name = "SRC_CACHE")]
    pub src_cache: Option<String>,
    /// Convert this internal snapshot of the source instead of its active
    /// state: an ID or name, or snapshot.id=ID and/or snapshot.name=NAME
    /// (qemu-img convert -l).
    #[arg(short = 'l', value_name = "SNAPSHOT")]
    pub snapshot: Option<String>,
    /// Source images (concatenated), then the output file.
    #[arg(required = true, num_args = 2.., value_name = "FILE")]
    pub files: Vec<PathBuf>,
}

fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

fn cache_mode(name: &str) -> Result<CacheMode> {
    CacheMode::from_name(name).ok_or_else(|| anyhow::anyhow!("Invalid cache option: {name}"))
}

/// Parses `-o` creation options for a qcow2 target, as qemu-img spells them.
pub fn parse_create_options(spec: Option<&str>) -> Result<CreateOptions> {
    let mut o = CreateOptions::default();
    let Some(spec) = spec else { return Ok(o) };
    let on_off = |k: &str, v: &str| -> Result<bool> {
        match v {
            "on" | "true" | "yes" => Ok(true),
            "off" | "false" | "no" => Ok(false),
            _ => bail!("option {k}: expected on or off, not {v:?}"),
        }
    };
    for item in spec.split(',').filter(|i| !i.is_empty()) {
        let (k, v) = item
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("option {item:?}: expected name=value"))?;
        match k {
            "cluster_size" => o.cluster_size = parse_size(v)?,
            "compat" => {
                o.compat_v2 = match v {
                    "0.10" => true,
                    "1.1" | "v3" => false,
                    _ => bail!("option compat: expected 0.10 or 1.1, not {v:?}"),
                }
            }
            "refcount_bits" => {
                o.refcount_bits = v
                    .parse()
                    .map_err(|_| anyhow::anyhow!("option refcount_bits: not a number: {v:?}"))?
            }
            "lazy_refcounts" => o.lazy_refcounts = on_off(k, v)?,
            "extended_l2" => o.extended_l2 = on_off(k, v)?,
            "compression_type" => {
                o.compression_type = match v {
                    "zlib" => CompressionType::Deflate,
                    "zstd" => CompressionType::Zstd,
                    _ => bail!("option compression_type: expected zlib or zstd, not {v:?}"),
                }
            }
            "preallocation" if v == "off" => {}
            // External data files (strata-image qcow2/data_file.rs).
            "data_file" => o.data_file = Some(v.to_string()),
            "data_file_raw" => o.data_file_raw = on_off(k, v)?,
            _ => bail!(
                "unsupported option {k:?} (supported: cluster_size, compat, refcount_bits, \
                 lazy_refcounts, extended_l2, compression_type, data_file, data_file_raw)"
            ),
        }
    }
    o.validate()?;
    Ok(o)
}

/// Runs `strata convert`.
pub fn run(args: &ConvertArgs, _out: &mut dyn Write, err: &mut dyn Write) -> Result<i32> {
    let target = match args.output_format.as_str() {
        "raw" => ImageFormat::Raw,
        "qcow2" => ImageFormat::Qcow2,
        other => bail!("unknown output format {other:?}: strata converts to raw or qcow2"),
    };
    if target == ImageFormat::Raw && args.bitmaps {
        bail!("Format driver 'raw' does not support bitmaps");
    }
    if target == ImageFormat::Raw && (args.compress || args.options.is_some()) {
        bail!("-c and -o apply to qcow2 output only (-O qcow2)");
    }
    let Some((dst, srcs)) = args.files.split_last() else {
        bail!("Expecting image file name");
    };
    if srcs.is_empty() {
        bail!("Expecting one image file name");
    }
    let cache = match &args.cache {
        Some(c) => cache_mode(c)?,
        None => CacheMode::Unsafe,
    };
    if let Some(c) = &args.src_cache {
        cache_mode(c)?;
    }
    if args.copy_offload && args.sparse_size.is_some() {
        bail!("Cannot enable copy offloading when -S is used");
    }
    let sparse_size = match &args.sparse_size {
        Some(s) => parse_size(s)?,
        None => SPARSE_BLOCK,
    };
    let mut create = match target {
        ImageFormat::Qcow2 => parse_create_options(args.options.as_deref())?,
        ImageFormat::Raw => CreateOptions::default(),
    };
    if let Some(b) = &args.backing {
        let Some(f) = &args.backing_format else {
            bail!("Use of backing file requires explicit backing format");
        };
        let Some(fmt) = ImageFormat::from_name(f) else {
            bail!("unknown backing format {f:?}: Strata reads qcow2 and raw");
        };
        create.backing = Some((b.clone(), fmt));
    } else if args.backing_format.is_some() {
        bail!("-F needs -B BACKING");
    }
    let mut opts = open_options(args.format.as_deref(), args.force_share)?;
    // Convert reads every layer: chains as deep as qemu-img converts open.
    opts.depth_limit = Some(strata_image::READ_CHAIN_DEPTH);
    if let Some(l) = &args.snapshot {
        if srcs.len() > 1 {
            bail!("No support for concatenating multiple snapshot");
        }
        opts.snapshot = Some(
            strata_image::SnapshotRef::parse_convert_arg(l)
                .map_err(|e| anyhow::anyhow!("Failed to load snapshot: {e}"))?,
        );
    }
    let mut chains = Vec::new();
    for src in srcs {
        chains.push(Chain::open(src, &opts).map_err(|e| match e {
            // qemu-img's words for a snapshot that is not there.
            strata_image::Error::InvalidArgument(m) if m.contains("no internal snapshot") => {
                anyhow::anyhow!("Failed to load snapshot: Can't find snapshot ({m})")
            }
            e => e.into(),
        })?);
    }
    for chain in &chains {
        for l in chain.layers() {
            if same_file(&l.path, dst) {
                bail!(
                    "{}: the output file is {} of the source chain; refusing to overwrite it",
                    dst.display(),
                    l.path.display()
                );
            }
        }
    }
    let mut last = u64::MAX;
    let mut progress = |done: u64, total: u64| {
        if !args.progress {
            return;
        }
        let pct = (done * 10000).checked_div(total).unwrap_or(10000);
        if pct != last {
            last = pct;
            let _ = write!(err, "    ({}.{:02}/100%)\r", pct / 100, pct % 100);
            let _ = err.flush();
        }
    };
    let o = ConvertOptions {
        format: target,
        create,
        compress: args.compress,
        bitmaps: args.bitmaps,
        sparse_size,
        existing: args.no_create,
        target_is_zero: args.target_is_zero,
        offload: if args.copy_offload {
            Offload::Required
        } else {
            Offload::Auto
        },
        cache,
    };
    let refs: Vec<&Chain> = chains.iter().collect();
    strata_image::convert::convert_sources(&refs, dst, &o, &mut progress)?;
    if args.progress {
        let _ = writeln!(err);
    }
    Ok(0)
}
