//! `strata convert -O raw|qcow2`: the chain's guest view into a new image.
//!
//! qcow2 output (optionally compressed, `-c`) goes through strata-image's
//! convert. Raw output is written here and is sparse: ranges the chain reads as zeros are never read
//! nor written (the file is sized with `set_len`), and 4 KiB blocks of
//! data that happen to be all zeros are skipped too, as qemu-img does.

use std::io::Write;
use std::path::Path;

use anyhow::{bail, Context, Result};
use strata_format::CompressionType;
use strata_image::convert::ConvertOptions;
use strata_image::create::{round_up_to_sector, CreateOptions, NewImageFile};
use strata_image::{Chain, FileStorage, ImageFormat, Storage};

use crate::size::parse_size;

use crate::{open_options, NameFile};

/// Largest read from the source at a time.
const READ_CHUNK: u64 = 4 << 20;
/// Blocks of zeros at least this large (and aligned) are left as holes.
const SPARSE_BLOCK: usize = 4096;

/// Arguments of `strata convert`.
#[derive(Debug, Clone, clap::Args)]
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
    /// extended_l2, compression_type (comma-separated name=value).
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
    /// Source image.
    pub src: std::path::PathBuf,
    /// Destination file.
    pub dst: std::path::PathBuf,
}

fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

/// Writes the guest view of `chain` into a new file that replaces `dst`
/// once complete, under `dst`'s write lock ([`NewImageFile`]): a convert
/// that fails leaves `dst` as it was. Calls `progress` with the bytes done
/// so far.
pub fn convert_to_raw(chain: &Chain, dst: &Path, progress: &mut dyn FnMut(u64, u64)) -> Result<()> {
    let new = NewImageFile::begin(dst).name_file(dst)?;
    convert_to_raw_into(chain, &new.storage()?, dst, progress)?;
    new.commit()?;
    Ok(())
}

/// [`convert_to_raw`] into `file` (empty; `dst` names it in errors).
fn convert_to_raw_into(
    chain: &Chain,
    file: &FileStorage,
    dst: &Path,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<()> {
    // The size rounded up to 512 bytes, as qemu-img makes it.
    let size = chain.virtual_size();
    // A FileStorage: its writes start the kernel's writeback early, so the
    // final sync finds little left to write.
    file.set_len(round_up_to_sector(size))
        .with_context(|| format!("{}: cannot size the output file", dst.display()))?;
    let mut buf = Vec::new();
    let mut pos = 0u64;
    progress(0, size);
    while pos < size {
        let r = chain.resolve(pos, (size - pos).min(READ_CHUNK))?;
        let len = r.extent.len.clamp(1, size - pos);
        let reads_data =
            !r.past_end && !r.extent.mapping.is_zero() && r.extent.mapping.is_allocated();
        if reads_data {
            let layer = &chain.layers()[r.depth];
            buf.resize(len as usize, 0);
            layer.image.read_mapped(r.extent.mapping, pos, &mut buf)?;
            write_sparse(file, dst, &buf, pos)?;
        }
        pos += len;
        progress(pos, size);
    }
    file.sync()
        .with_context(|| format!("{}: cannot sync the output file", dst.display()))?;
    Ok(())
}

/// Writes `buf` at `pos`, leaving aligned all-zero blocks as holes.
fn write_sparse(file: &FileStorage, dst: &Path, buf: &[u8], pos: u64) -> Result<()> {
    let mut i = 0usize;
    while i < buf.len() {
        // Up to the next SPARSE_BLOCK boundary of the output file.
        let next =
            (((pos + i as u64) / SPARSE_BLOCK as u64 + 1) * SPARSE_BLOCK as u64 - pos) as usize;
        let end = next.min(buf.len());
        let block = &buf[i..end];
        if block.iter().any(|&b| b != 0) {
            // Extend the run over following non-zero blocks.
            let mut run_end = end;
            while run_end < buf.len() {
                let e = (run_end + SPARSE_BLOCK).min(buf.len());
                if buf[run_end..e].iter().all(|&b| b == 0) {
                    break;
                }
                run_end = e;
            }
            file.write_at(&buf[i..run_end], pos + i as u64)
                .with_context(|| {
                    format!("{}: write at {:#x} failed", dst.display(), pos + i as u64)
                })?;
            i = run_end;
        } else {
            i = end;
        }
    }
    Ok(())
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
            _ => bail!(
                "unsupported option {k:?} (supported: cluster_size, compat, refcount_bits, \
                 lazy_refcounts, extended_l2, compression_type)"
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
    let create = match target {
        ImageFormat::Qcow2 => parse_create_options(args.options.as_deref())?,
        ImageFormat::Raw => CreateOptions::default(),
    };
    let opts = open_options(args.format.as_deref(), args.force_share)?;
    let chain = Chain::open(&args.src, &opts)?;
    let dst = args.dst.as_path();
    for l in chain.layers() {
        if same_file(&l.path, dst) {
            bail!(
                "{}: the output file is {} of the source chain; refusing to overwrite it",
                args.dst.display(),
                l.path.display()
            );
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
    match target {
        ImageFormat::Raw => convert_to_raw(&chain, dst, &mut progress)?,
        ImageFormat::Qcow2 => {
            let o = ConvertOptions {
                format: ImageFormat::Qcow2,
                create,
                compress: args.compress,
                bitmaps: args.bitmaps,
            };
            strata_image::convert::convert(&chain, dst, &o, &mut progress)?
        }
    }
    if args.progress {
        let _ = writeln!(err);
    }
    Ok(0)
}
