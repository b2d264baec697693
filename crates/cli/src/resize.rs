//! `strata resize`: change an image's virtual size (qemu-img resize).
//!
//! `SIZE` is absolute or relative (`+1G`, `-512M`). Shrinking needs
//! `--shrink`, as in qemu-img, whose messages are kept word for word. A
//! qcow2 size must be a multiple of 512 bytes; a raw file takes any
//! length. The image is opened for writing, under QEMU's write lock.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Result};
use strata_image::resize::{resize_chain, resize_refusal, ResizePrealloc, ResizeRefusal};
use strata_image::Chain;

use crate::size::parse_size;
use crate::{open_options, NameFile};

/// Arguments of `strata resize`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ResizeArgs {
    /// Image format (qcow2 or raw); probed when omitted.
    #[arg(short = 'f')]
    pub format: Option<String>,
    /// Allow the image to shrink (data past the new end is lost).
    #[arg(long = "shrink")]
    pub shrink: bool,
    /// Preallocation of the new area: off, metadata (qcow2 only), falloc
    /// or full, as qemu-img allocates it.
    #[arg(long = "preallocation", value_name = "MODE")]
    pub preallocation: Option<String>,
    /// Quiet: do not print `Image resized.`.
    #[arg(short = 'q')]
    pub quiet: bool,
    /// The image.
    pub file: PathBuf,
    /// New size, or +SIZE / -SIZE relative to the current one (k, M, G, T suffixes).
    #[arg(allow_hyphen_values = true)]
    pub size: String,
}

/// A parsed `[+|-]SIZE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SizeChange {
    /// The new size.
    Absolute(u64),
    /// Grow by this much.
    Grow(u64),
    /// Shrink by this much.
    Shrink(u64),
}

impl SizeChange {
    /// Parses `SIZE`, `+SIZE` or `-SIZE`.
    pub fn parse(s: &str) -> Result<SizeChange> {
        let parsed = |t: &str| {
            parse_size(t).map_err(|_| {
                anyhow::anyhow!(
                    "Parameter 'size' expects a non-negative number below 2^64\n\
                     Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n\
                     and exabytes, respectively."
                )
            })
        };
        Ok(if let Some(t) = s.strip_prefix('+') {
            SizeChange::Grow(parsed(t)?)
        } else if let Some(t) = s.strip_prefix('-') {
            SizeChange::Shrink(parsed(t)?)
        } else {
            SizeChange::Absolute(parsed(s)?)
        })
    }

    /// The new size for an image of `current` bytes; qemu-img's message
    /// when it is not positive.
    pub fn apply(self, current: u64) -> Result<u64> {
        let new = match self {
            SizeChange::Absolute(n) => Some(n),
            SizeChange::Grow(n) => current.checked_add(n),
            SizeChange::Shrink(n) => current.checked_sub(n),
        };
        match new {
            Some(n) if n > 0 && n <= i64::MAX as u64 => Ok(n),
            Some(n) if n > 0 => bail!("Image size too large"),
            _ => bail!("New image size must be positive"),
        }
    }
}

/// Runs `strata resize`; prints `Image resized.` as qemu-img does.
pub fn run(args: &ResizeArgs, out: &mut dyn Write, err: &mut dyn Write) -> Result<i32> {
    let prealloc = match args.preallocation.as_deref() {
        None | Some("off") => ResizePrealloc::Off,
        Some("metadata") => ResizePrealloc::Metadata,
        Some("falloc") => ResizePrealloc::Falloc,
        Some("full") => ResizePrealloc::Full,
        Some(p) => bail!("Invalid preallocation mode: '{p}'"),
    };
    let change = SizeChange::parse(&args.size)?;
    let mut opts = open_options(args.format.as_deref(), false)?;
    opts.writable = true;
    // As qemu-io / qemu-img open an image read-write: a dirty image is
    // repaired, unknown autoclear bits are cleared, unreadable bitmaps refused.
    opts.write_policy = strata_image::WritePolicy::qemu();
    let file = args.file.display().to_string();
    let mut chain = Chain::open(&args.file, &opts).name_file(&file)?;
    let new_size = change.apply(chain.top().image.virtual_size())?;
    if let Some(r) = resize_refusal(&chain, new_size, args.shrink, prealloc) {
        if r == ResizeRefusal::ShrinkNotAllowed {
            writeln!(
                err,
                "strata: warning: Shrinking an image will delete all data beyond the \
                 shrunken image's end. Before performing such an operation, make sure \
                 there is no important data there."
            )?;
        }
        bail!("{}", r.message());
    }
    resize_chain(&mut chain, new_size, args.shrink, prealloc).name_file(&file)?;
    if !args.quiet {
        writeln!(out, "Image resized.")?;
    }
    Ok(0)
}
