//! `strata bitmap`: add, remove, clear, enable, disable and merge
//! persistent dirty bitmaps, spelled as `qemu-img bitmap`:
//!
//! ```text
//! strata bitmap (--add [-g SIZE] [--disable] | --remove | --clear | --enable
//!               | --disable | --merge SRC [-b SRC_FILE [-F FMT]])... [-f FMT] FILE BITMAP
//! ```
//!
//! The operations run in order, each made durable before the next (as
//! qemu-img does, an operation that fails leaves the earlier ones done).

use std::ffi::OsString;
use std::io::Write;
use std::path::PathBuf;

use anyhow::{anyhow, bail, Result};
use strata_image::{BitmapEdit, Chain, Image};

use crate::size::parse_size;
use crate::{open_options, NameFile};

/// One operation of the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// `--add`.
    Add,
    /// `--remove`.
    Remove,
    /// `--clear`.
    Clear,
    /// `--enable`.
    Enable,
    /// `--disable`.
    Disable,
    /// `--merge SRC`.
    Merge(String),
}

/// The parsed command line.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BitmapArgs {
    /// The operations, in order.
    pub ops: Vec<Op>,
    /// `-g`: granularity for `--add`.
    pub granularity: Option<u64>,
    /// `-b`: the file `--merge` reads its source bitmap from.
    pub source_file: Option<PathBuf>,
    /// `-F`: that file's format.
    pub source_format: Option<String>,
    /// `-f`: the image's format.
    pub format: Option<String>,
    /// The image.
    pub file: PathBuf,
    /// The bitmap.
    pub bitmap: String,
}

/// Parses the arguments after `bitmap`, with qemu-img's checks and
/// messages.
pub fn parse(args: &[OsString]) -> Result<BitmapArgs> {
    let mut a = BitmapArgs::default();
    let mut positional = Vec::new();
    let mut it = args.iter();
    let value = |it: &mut std::slice::Iter<'_, OsString>, opt: &str| -> Result<String> {
        it.next()
            .map(|v| v.to_string_lossy().into_owned())
            .ok_or_else(|| anyhow!("option '{opt}' requires an argument"))
    };
    let mut only_positional = false;
    while let Some(arg) = it.next() {
        let s = arg.to_string_lossy();
        if only_positional || !s.starts_with('-') || s == "-" {
            positional.push(arg.clone());
            continue;
        }
        let (opt, inline) = match s.split_once('=') {
            Some((o, v)) if s.starts_with("--") => (o.to_string(), Some(v.to_string())),
            _ => (s.to_string(), None),
        };
        let take = |it: &mut std::slice::Iter<'_, OsString>| match &inline {
            Some(v) => Ok(v.clone()),
            None => value(it, &opt),
        };
        match opt.as_str() {
            "--" => only_positional = true,
            "--add" => a.ops.push(Op::Add),
            "--remove" => a.ops.push(Op::Remove),
            "--clear" => a.ops.push(Op::Clear),
            "--enable" => a.ops.push(Op::Enable),
            "--disable" => a.ops.push(Op::Disable),
            "--merge" => a.ops.push(Op::Merge(take(&mut it)?)),
            "-g" | "--granularity" => {
                let v = take(&mut it)?;
                a.granularity =
                    Some(parse_size(&v).map_err(|_| anyhow!("Invalid granularity specified"))?);
            }
            "-b" | "--source-file" => a.source_file = Some(PathBuf::from(take(&mut it)?)),
            "-F" | "--source-format" => a.source_format = Some(take(&mut it)?),
            "-f" | "--format" => a.format = Some(take(&mut it)?),
            _ => bail!("unrecognized option '{s}'"),
        }
    }
    if a.ops.is_empty() {
        bail!("Need at least one of --add, --remove, --clear, --enable, --disable, or --merge");
    }
    let add = a.ops.contains(&Op::Add);
    if a.granularity.is_some() && !add {
        bail!("granularity only supported with --add");
    }
    let merge = a.ops.iter().any(|o| matches!(o, Op::Merge(_)));
    if a.source_format.is_some() && a.source_file.is_none() {
        bail!("-F (source format) only supported with -b");
    }
    if a.source_file.is_some() && !merge {
        bail!("Merge bitmap source file only supported with --merge");
    }
    let [file, bitmap] = <[OsString; 2]>::try_from(positional)
        .map_err(|_| anyhow!("Expecting filename and bitmap name"))?;
    a.file = PathBuf::from(file);
    a.bitmap = bitmap.to_string_lossy().into_owned();
    Ok(a)
}

/// The usage text (`strata bitmap --help`).
pub const USAGE: &str = "\
Usage: strata bitmap (--add [-g SIZE] | --remove | --clear | --enable | --disable
                     | --merge SRC [-b SRC_FILE [-F SRC_FMT]])... [-f FMT] FILE BITMAP

Change the persistent dirty bitmaps of a qcow2 image, as qemu-img bitmap does.
The operations run in order; each is durable before the next starts.

  --add            create BITMAP, empty and enabled
  -g, --granularity SIZE
                   bytes per bit for --add (a power of two, 512..2G; default:
                   the cluster size within 4k..64k)
  --remove         delete BITMAP
  --clear          clear every bit of BITMAP
  --enable         make BITMAP track writes
  --disable        stop BITMAP from tracking writes
  --merge SRC      set every bit of BITMAP that is set in bitmap SRC
  -b, --source-file SRC_FILE
                   read SRC from SRC_FILE (default: FILE itself)
  -F, --source-format SRC_FMT
                   format of SRC_FILE
  -f, --format FMT format of FILE
";

/// Runs `strata bitmap`; returns the exit code.
pub fn run(args: &[OsString], out: &mut dyn Write) -> Result<i32> {
    if args.iter().any(|a| a == "--help" || a == "-h") {
        out.write_all(USAGE.as_bytes())?;
        return Ok(0);
    }
    let a = parse(args)?;
    let mut opts = open_options(a.format.as_deref(), false)?;
    opts.writable = true;
    // As qemu-io / qemu-img open an image read-write: a dirty image is
    // repaired, unknown autoclear bits are cleared, unreadable bitmaps refused.
    opts.write_policy = strata_image::WritePolicy::qemu();
    opts.no_backing = true;
    let mut chain = Chain::open(&a.file, &opts).name_file(&a.file)?;
    // As in qemu-img, `--add --disable` is two operations: add, then
    // disable (`--disable --add` fails: no such bitmap yet).
    for op in &a.ops {
        let src;
        let edit = match op {
            Op::Add => BitmapEdit::Add {
                granularity: a.granularity,
                disabled: false,
            },
            Op::Remove => BitmapEdit::Remove,
            Op::Clear => BitmapEdit::Clear,
            Op::Enable => BitmapEdit::Enable,
            Op::Disable => BitmapEdit::Disable,
            Op::Merge(name) => {
                src = merge_source(&a, &mut chain, name)?;
                BitmapEdit::Merge(&src)
            }
        };
        let q = match &mut chain.layers_mut()[0].image {
            Image::Qcow2(q) => q,
            _ => bail!(
                "Operation {} on bitmap {} failed: Format driver 'raw' does not support bitmaps",
                edit.name(),
                a.bitmap
            ),
        };
        q.edit_bitmap(&a.bitmap, edit).map_err(|e| anyhow!("{e}"))?;
    }
    chain.flush().name_file(&a.file)?;
    Ok(0)
}

/// The source bitmap of `--merge`: in `-b FILE` or in the image itself.
fn merge_source(
    a: &BitmapArgs,
    chain: &mut Chain,
    name: &str,
) -> Result<strata_image::DirtyBitmap> {
    let missing = || {
        anyhow!(
            "Operation merge on bitmap {} failed: Dirty bitmap '{name}' not found",
            a.bitmap
        )
    };
    let find = |q: &strata_image::Qcow2Image| -> Result<strata_image::DirtyBitmap> {
        if !q.bitmaps()?.iter().any(|b| b.name == name) {
            return Err(missing());
        }
        q.dirty_bitmap(name)
            .map_err(|e| anyhow!("Operation merge on bitmap {} failed: {e}", a.bitmap))
    };
    match &a.source_file {
        None => match &chain.layers()[0].image {
            Image::Qcow2(q) => find(q),
            _ => Err(missing()),
        },
        Some(f) => {
            let mut opts = open_options(a.source_format.as_deref(), true)?;
            opts.no_backing = true;
            let src = Chain::open(f, &opts).name_file(f)?;
            match &src.layers()[0].image {
                Image::Qcow2(q) => find(q),
                _ => Err(missing()),
            }
        }
    }
}
