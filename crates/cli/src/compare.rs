//! `strata compare`: whether two images show the same guest data, with
//! qemu-img compare's messages and exit codes (0 identical, 1 different,
//! 2 error).

use std::io::Write;

use anyhow::Result;
use strata_image::Chain;

use crate::open_options;

/// qemu-img compare's read size (IO_BUF_SIZE).
const CHUNK: u64 = 2 << 20;
/// Mismatches are reported at sector granularity, as qemu-img does.
const SECTOR: u64 = 512;

/// Arguments of `strata compare`.
#[derive(Debug, Clone, clap::Args)]
pub struct CompareArgs {
    /// Format of the first image.
    #[arg(short = 'f')]
    pub format1: Option<String>,
    /// Format of the second image.
    #[arg(short = 'F')]
    pub format2: Option<String>,
    /// Strict: sizes and allocation must match too.
    #[arg(short = 's')]
    pub strict: bool,
    /// Quiet: print nothing, only the exit code tells.
    #[arg(short = 'q')]
    pub quiet: bool,
    /// Force share: take no locks.
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// First image.
    pub file1: std::path::PathBuf,
    /// Second image.
    pub file2: std::path::PathBuf,
}

/// What the block layer says about a range of a whole chain
/// (`bdrv_block_status_above` reduced to the bits compare uses). Strict
/// mode compares all of them, as qemu-img compares the whole status word:
/// whether a host offset is known, and whether the range reaches the end
/// of the image (QEMU's EOF bit), count too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Status {
    allocated: bool,
    zero: bool,
    data: bool,
    offset_valid: bool,
    eof: bool,
}

/// QEMU answers block-status queries at most one L2 table's span at a
/// time; stop extents at the next such boundary of any qcow2 layer so the
/// EOF bit is set where QEMU sets it.
fn l2_span_end(chain: &Chain, pos: u64) -> u64 {
    chain
        .layers()
        .iter()
        .filter_map(|l| l.image.as_qcow2())
        .map(|q| {
            let span = q.geometry().l2_span();
            (pos / span + 1).saturating_mul(span)
        })
        .min()
        .unwrap_or(u64::MAX)
}

fn status(chain: &Chain, pos: u64, max: u64) -> Result<(Status, u64)> {
    let max = max.min(l2_span_end(chain, pos) - pos);
    let Some(s) = chain.block_status(pos, max).next().transpose()? else {
        anyhow::bail!("internal error: no block status at guest offset {pos:#x}");
    };
    let len = s.length.clamp(1, max);
    let st = Status {
        // Zeros past a short backing file count as allocated there.
        allocated: s.allocated || s.past_end,
        zero: s.zero,
        data: s.data,
        offset_valid: s.allocated && s.offset.is_some(),
        eof: pos + len == chain.virtual_size(),
    };
    Ok((st, len))
}

/// Offset of the first 512-byte sector of `buf` (which starts at guest
/// `base`) that is not all zeros.
fn first_nonzero_sector(buf: &[u8], base: u64) -> Option<u64> {
    buf.chunks(SECTOR as usize)
        .position(|s| s.iter().any(|&b| b != 0))
        .map(|i| base + i as u64 * SECTOR)
}

/// Offset of the first 512-byte sector where `a` and `b` differ.
fn first_diff_sector(a: &[u8], b: &[u8], base: u64) -> Option<u64> {
    a.chunks(SECTOR as usize)
        .zip(b.chunks(SECTOR as usize))
        .position(|(x, y)| x != y)
        .map(|i| base + i as u64 * SECTOR)
}

/// The outcome of a comparison.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Same guest data.
    Identical {
        /// The sizes differ (the extra part reads as zeros).
        size_mismatch: bool,
    },
    /// Guest data differs at this offset.
    ContentMismatch(u64),
    /// Strict mode: sizes differ.
    StrictSizeMismatch,
    /// Strict mode: allocation differs at this offset.
    StrictStatusMismatch(u64),
}

/// Compares two open chains as qemu-img compare does.
pub fn compare_chains(a: &Chain, b: &Chain, strict: bool) -> Result<Outcome> {
    let (size1, size2) = (a.virtual_size(), b.virtual_size());
    if strict && size1 != size2 {
        return Ok(Outcome::StrictSizeMismatch);
    }
    let common = size1.min(size2);
    let mut buf1 = Vec::new();
    let mut buf2 = Vec::new();
    let mut pos = 0u64;
    while pos < common {
        let (s1, n1) = status(a, pos, common - pos)?;
        let (s2, n2) = status(b, pos, common - pos)?;
        let mut chunk = n1.min(n2);
        if strict && s1 != s2 {
            return Ok(Outcome::StrictStatusMismatch(pos));
        }
        if s1.zero && s2.zero {
            // Both read as zeros.
        } else if s1.allocated == s2.allocated {
            if s1.allocated {
                chunk = chunk.min(CHUNK);
                buf1.resize(chunk as usize, 0);
                buf2.resize(chunk as usize, 0);
                a.read_at(&mut buf1, pos)?;
                b.read_at(&mut buf2, pos)?;
                if let Some(off) = first_diff_sector(&buf1, &buf2, pos) {
                    return Ok(Outcome::ContentMismatch(off));
                }
            }
        } else {
            chunk = chunk.min(CHUNK);
            let (c, st) = if s1.allocated { (a, s1) } else { (b, s2) };
            if !st.zero {
                buf1.resize(chunk as usize, 0);
                c.read_at(&mut buf1, pos)?;
                if let Some(off) = first_nonzero_sector(&buf1, pos) {
                    return Ok(Outcome::ContentMismatch(off));
                }
            }
        }
        pos += chunk;
    }
    if size1 == size2 {
        return Ok(Outcome::Identical {
            size_mismatch: false,
        });
    }
    // The larger image's extra part must read as zeros.
    let (over, total) = if size1 > size2 {
        (a, size1)
    } else {
        (b, size2)
    };
    let mut pos = common;
    while pos < total {
        let (s, n) = status(over, pos, total - pos)?;
        let mut chunk = n;
        if s.allocated && !s.zero {
            chunk = chunk.min(CHUNK);
            buf1.resize(chunk as usize, 0);
            over.read_at(&mut buf1, pos)?;
            if let Some(off) = first_nonzero_sector(&buf1, pos) {
                return Ok(Outcome::ContentMismatch(off));
            }
        }
        pos += chunk;
    }
    Ok(Outcome::Identical {
        size_mismatch: true,
    })
}

/// Runs `strata compare`: exit 0 identical, 1 different. Errors are the
/// caller's to turn into exit code 2.
pub fn run(args: &CompareArgs, out: &mut dyn Write) -> Result<i32> {
    let o1 = open_options(args.format1.as_deref(), args.force_share)?;
    let o2 = open_options(args.format2.as_deref(), args.force_share)?;
    let a = Chain::open(&args.file1, &o1)?;
    let b = Chain::open(&args.file2, &o2)?;
    let outcome = compare_chains(&a, &b, args.strict)?;
    let mut say = |s: &str| -> Result<()> {
        if !args.quiet {
            writeln!(out, "{s}")?;
        }
        Ok(())
    };
    // qemu-img warns about differing sizes only once the common part
    // compared equal.
    let common = a.virtual_size().min(b.virtual_size());
    let reached_extra = match outcome {
        Outcome::Identical { size_mismatch } => size_mismatch,
        Outcome::ContentMismatch(off) => off >= common,
        _ => false,
    };
    if a.virtual_size() != b.virtual_size() && !args.strict && reached_extra {
        say("Warning: Image size mismatch!")?;
    }
    Ok(match outcome {
        Outcome::Identical { .. } => {
            say("Images are identical.")?;
            0
        }
        Outcome::ContentMismatch(off) => {
            say(&format!("Content mismatch at offset {off}!"))?;
            1
        }
        Outcome::StrictSizeMismatch => {
            say("Strict mode: Image size mismatch!")?;
            1
        }
        Outcome::StrictStatusMismatch(off) => {
            say(&format!("Strict mode: Offset {off} block status mismatch!"))?;
            1
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mismatches_are_reported_at_sector_granularity() {
        let a = vec![0u8; 2048];
        let mut b = a.clone();
        b[1100] = 1;
        assert_eq!(first_diff_sector(&a, &b, 4096), Some(4096 + 1024));
        assert_eq!(first_nonzero_sector(&b, 0), Some(1024));
        assert_eq!(first_diff_sector(&a, &a, 0), None);
    }
}
