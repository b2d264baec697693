//! `strata measure`: how large a new image would be (qemu-img measure).
//!
//! `required` is the file size a `convert` of the input (or a new image
//! of `--size`) needs; `fully-allocated` the size with every cluster
//! allocated; `bitmaps` (qcow2 output at compat=1.1 from a qcow2 v3 input)
//! the space its persistent bitmaps take. The formulas are QEMU's
//! `qcow2_measure`, `qcow2_calc_prealloc_size`,
//! `qcow2_refcount_metadata_size` and
//! `qcow2_get_persistent_dirty_bitmap_size`, and `raw_measure` for raw
//! output (the input's length, or `--size` rounded up to 512 bytes).
//! Data is counted as QEMU's block status walk counts it: a range that
//! some layer of the chain stores as data (plain or compressed), rounded
//! out to whole output clusters; zero and unallocated ranges cost nothing.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Result};
use strata_image::block_status::{block_status_at, StatusCache};
use strata_image::{Chain, Image};

use crate::size::parse_size;
use crate::{open_options, NameFile, OutputFormat};

/// Arguments of `strata measure`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct MeasureArgs {
    /// Input format (qcow2 or raw); probed when omitted.
    #[arg(short = 'f')]
    pub format: Option<String>,
    /// Output format: raw (default) or qcow2.
    #[arg(short = 'O')]
    pub output_format: Option<String>,
    /// Output format options: cluster_size, compat, refcount_bits,
    /// extended_l2, preallocation, backing_file (comma-separated name=value).
    #[arg(short = 'o')]
    pub options: Vec<String>,
    /// Measure a new empty image of this size (instead of FILE).
    #[arg(long = "size", value_name = "SIZE", allow_hyphen_values = true)]
    pub size: Option<String>,
    /// Force share: take no locks on the input.
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// Output format.
    #[arg(long = "output", value_enum, default_value_t)]
    pub output: OutputFormat,
    /// The input image.
    pub file: Option<PathBuf>,
}

/// The qcow2 creation options measure takes into account.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Qcow2Geometry {
    /// Cluster size in bytes.
    pub cluster_size: u64,
    /// log2 of the refcount width.
    pub refcount_order: u32,
    /// Extended L2 entries (16 bytes instead of 8).
    pub extended_l2: bool,
    /// Image version (2 for compat=0.10, 3 for 1.1).
    pub version: u32,
}

impl Default for Qcow2Geometry {
    fn default() -> Self {
        Qcow2Geometry {
            cluster_size: 65536,
            refcount_order: 4,
            extended_l2: false,
            version: 3,
        }
    }
}

/// What `measure` reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Measure {
    /// Bytes a new image needs.
    pub required: u64,
    /// Bytes with every cluster allocated.
    pub fully_allocated: u64,
    /// Bytes the persistent bitmaps take (when both sides support them).
    pub bitmaps: Option<u64>,
}

fn round_up(x: u64, to: u64) -> u64 {
    x.div_ceil(to) * to
}

/// QEMU's `qcow2_refcount_metadata_size` (without the generous increase):
/// the refcount blocks and table that count `clusters` clusters and
/// themselves, in bytes.
pub fn refcount_metadata_size(clusters: u64, cluster_size: u64, refcount_order: u32) -> u64 {
    let blocks_per_table_cluster = cluster_size / 8;
    let refcounts_per_block = cluster_size * 8 / (1u64 << refcount_order);
    let (mut table, mut blocks, mut n) = (0u64, 0u64, 0u64);
    loop {
        let last = n;
        blocks = (clusters + table + blocks).div_ceil(refcounts_per_block);
        table = blocks.div_ceil(blocks_per_table_cluster);
        n = clusters + blocks + table;
        if n == last {
            break;
        }
    }
    (blocks + table) * cluster_size
}

/// QEMU's `qcow2_calc_prealloc_size`: the file size of a qcow2 image of
/// `total_size` with every cluster allocated.
pub fn qcow2_prealloc_size(total_size: u64, g: &Qcow2Geometry) -> u64 {
    let cs = g.cluster_size;
    let l2e = if g.extended_l2 { 16 } else { 8 };
    let aligned = round_up(total_size, cs);
    let mut meta = cs; // header
    let nl2e = round_up(aligned / cs, cs / l2e);
    meta += nl2e * l2e;
    let nl1e = round_up(nl2e * l2e / cs, cs / 8);
    meta += nl1e * 8;
    meta += refcount_metadata_size((meta + aligned) / cs, cs, g.refcount_order);
    meta + aligned
}

/// QEMU's `qcow2_get_persistent_dirty_bitmap_size` for bitmaps of
/// (name length, granularity) over a disk of `virtual_size`.
pub fn bitmaps_size(bitmaps: &[(usize, u64)], virtual_size: u64, cluster_size: u64) -> u64 {
    let mut size = 0;
    let mut dir = 0;
    for &(name_len, granularity) in bitmaps {
        let bytes = virtual_size.div_ceil(granularity.max(1)).div_ceil(8);
        let clusters = bytes.div_ceil(cluster_size);
        size += clusters * cluster_size;
        size += round_up(clusters * 8, cluster_size);
        dir += round_up(24 + name_len as u64, 8);
    }
    size + round_up(dir, cluster_size)
}

/// Bytes of the chain that QEMU's measure counts as data, in whole
/// clusters of `cluster_size` (its block status walk: allocated data that
/// does not read as zeros).
pub fn data_bytes(chain: &Chain, cluster_size: u64) -> Result<u64> {
    let size = chain.virtual_size();
    let mut required = 0;
    let mut offset = 0;
    let mut cache = StatusCache::new();
    while offset < size {
        let s = block_status_at(chain.layers(), &mut cache, offset, size - offset)?;
        let len = s.length.max(1);
        if s.allocated && s.data && !s.zero {
            let end = round_up(offset + len, cluster_size).min(round_up(size, cluster_size));
            required += offset % cluster_size + (end - offset);
            offset = end;
        } else {
            offset += len;
        }
    }
    Ok(required)
}

/// Output options parsed from `-o`.
#[derive(Debug, Clone, Default)]
struct OutOptions {
    geometry: Qcow2Geometry,
    full_prealloc: bool,
    has_backing: bool,
}

fn parse_options(specs: &[String], qcow2: bool) -> Result<OutOptions> {
    let mut o = OutOptions::default();
    let mut refcount_bits: Option<u64> = None;
    for item in specs
        .iter()
        .flat_map(|s| s.split(','))
        .filter(|i| !i.is_empty())
    {
        let (k, v) = item.split_once('=').unwrap_or((item, "on"));
        let on_off = || match v {
            "on" => Ok(true),
            "off" => Ok(false),
            _ => bail!("Parameter '{k}' expects 'on' or 'off'"),
        };
        match (k, qcow2) {
            ("preallocation", _) => match v {
                "off" | "metadata" => {}
                "falloc" | "full" => o.full_prealloc = true,
                _ => bail!("Invalid parameter '{v}'"),
            },
            ("cluster_size", true) => {
                let cs = parse_size(v)?;
                if !cs.is_power_of_two() || !(512..=2 << 20).contains(&cs) {
                    bail!("Cluster size must be a power of two between 512 and 2048k");
                }
                o.geometry.cluster_size = cs;
            }
            ("compat", true) => {
                o.geometry.version = match v {
                    "0.10" | "v2" => 2,
                    "1.1" | "v3" => 3,
                    _ => bail!("Invalid compatibility level: '{v}'"),
                }
            }
            ("refcount_bits", true) => {
                refcount_bits = Some(v.parse().map_err(|_| {
                    anyhow::anyhow!(
                        "Parameter 'refcount_bits' expects a non-negative number below 2^64"
                    )
                })?)
            }
            ("extended_l2", true) => o.geometry.extended_l2 = on_off()?,
            ("lazy_refcounts", true) => {
                on_off()?;
            }
            ("backing_file", true) => o.has_backing = true,
            ("backing_fmt" | "compression_type", true) => {}
            // Accepted and ignored, as qemu-img measure does: the sizes
            // are those of an image without a data file.
            ("data_file", true) => {}
            ("data_file_raw", true) => {
                on_off()?;
            }
            _ => {
                let fmt = if qcow2 { "qcow2" } else { "raw" };
                bail!("Invalid parameter '{k}': Invalid options for file format '{fmt}'")
            }
        }
    }
    if let Some(bits) = refcount_bits {
        if !bits.is_power_of_two() || bits > 64 {
            bail!("Refcount width must be a power of two and may not exceed 64 bits");
        }
        if o.geometry.version < 3 && bits != 16 {
            bail!(
                "Different refcount widths than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)"
            );
        }
        o.geometry.refcount_order = bits.trailing_zeros();
    }
    if o.geometry.extended_l2 && o.geometry.cluster_size < 16384 {
        bail!("Extended L2 entries are only supported with cluster sizes of at least 16384 bytes");
    }
    Ok(o)
}

/// Measures per `args`.
pub fn measure(args: &MeasureArgs) -> Result<Measure> {
    let qcow2 = match args.output_format.as_deref() {
        None | Some("raw") => false,
        Some("qcow2") => true,
        Some(other) => bail!("Strata measures raw or qcow2 output, not '{other}'"),
    };
    let o = parse_options(&args.options, qcow2)?;
    let chain = match (&args.file, &args.size) {
        (Some(_), Some(_)) => bail!("--size N cannot be used together with a filename."),
        (None, None) => bail!("Either --size N or one filename must be specified."),
        (Some(file), None) => {
            let opts = open_options(args.format.as_deref(), args.force_share)?;
            Some(Chain::open(file, &opts).name_file(file)?)
        }
        (None, Some(_)) => None,
    };
    let size = match &args.size {
        Some(s) if s.trim_start().starts_with('-') => bail!(
            "Invalid image size specified. Must be between 0 and {}.",
            i64::MAX
        ),
        Some(s) => Some(
            parse_size(s).map_err(|_| anyhow::anyhow!("Invalid image size specified: '{s}'."))?,
        ),
        None => None,
    };
    if !qcow2 {
        let required = match (&chain, size) {
            (Some(c), _) => c.virtual_size(),
            (None, Some(s)) => round_up(s, 512),
            (None, None) => 0,
        };
        return Ok(Measure {
            required,
            fully_allocated: required,
            bitmaps: None,
        });
    }
    let g = o.geometry;
    let cs = g.cluster_size;
    let (virtual_size, mut required) = match &chain {
        Some(c) => {
            let vs = round_up(c.virtual_size(), cs);
            let data = if o.has_backing {
                vs
            } else {
                data_bytes(c, cs)?
            };
            (vs, data)
        }
        None => (round_up(size.unwrap_or(0), cs), 0),
    };
    // QEMU's limit on the L1 table (QCOW_MAX_L1_SIZE, 32 MiB).
    let l2e = if g.extended_l2 { 16 } else { 8 };
    let l2_tables = (virtual_size / cs).div_ceil(cs / l2e);
    if l2_tables.saturating_mul(8) > 32 << 20 {
        bail!("The image size is too large (try using a larger cluster size)");
    }
    if o.full_prealloc {
        required = virtual_size;
    }
    let fully_allocated = qcow2_prealloc_size(virtual_size, &g);
    let required = fully_allocated - virtual_size + required;
    let bitmaps = match &chain {
        Some(c) if g.version >= 3 => match &c.top().image {
            Image::Qcow2(q) if q.header().version() >= 3 => {
                let list: Vec<(usize, u64)> = q
                    .bitmaps()?
                    .iter()
                    .map(|b| (b.name.len(), b.granularity))
                    .collect();
                Some(if list.is_empty() {
                    0
                } else {
                    bitmaps_size(&list, c.virtual_size(), cs)
                })
            }
            _ => None,
        },
        _ => None,
    };
    Ok(Measure {
        required,
        fully_allocated,
        bitmaps,
    })
}

/// Runs `strata measure`, printing as qemu-img does.
pub fn run(args: &MeasureArgs, out: &mut dyn Write) -> Result<i32> {
    let m = measure(args)?;
    match args.output {
        OutputFormat::Human => {
            writeln!(out, "required size: {}", m.required)?;
            writeln!(out, "fully allocated size: {}", m.fully_allocated)?;
            if let Some(b) = m.bitmaps {
                writeln!(out, "bitmaps size: {b}")?;
            }
        }
        OutputFormat::Json => {
            writeln!(out, "{{")?;
            if let Some(b) = m.bitmaps {
                writeln!(out, "    \"bitmaps\": {b},")?;
            }
            writeln!(out, "    \"required\": {},", m.required)?;
            writeln!(out, "    \"fully-allocated\": {}", m.fully_allocated)?;
            writeln!(out, "}}")?;
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_1g_qcow2_needs_what_qemu_img_says() {
        let g = Qcow2Geometry::default();
        assert_eq!(qcow2_prealloc_size(1 << 30, &g), 1_074_135_040);
        assert_eq!(qcow2_prealloc_size(1000, &g), 393_216);
    }

    #[test]
    fn one_bitmap_over_10m_takes_three_clusters() {
        assert_eq!(bitmaps_size(&[(1, 65536)], 10 << 20, 65536), 196_608);
    }
}
