//! `strata create`: new qcow2 or raw images and overlays, with qemu-img
//! create's options and semantics (SIZE defaults to the backing file's; a
//! relative backing name is resolved against the new image's directory and
//! stored as given; a backing file needs its format).

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use strata_format::CompressionType;
use strata_image::chain::resolve_backing_path;
use strata_image::create::{
    check_qcow2_options, create_qcow2, create_raw, CreateOptions, NewImageFile, Preallocation,
};
use strata_image::{Chain, ImageFormat, OpenOptions};

use crate::size::parse_size;
use crate::NameFile;

/// Arguments of `strata create`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct CreateArgs {
    /// Format: qcow2 (default) or raw.
    #[arg(short = 'f')]
    pub format: Option<String>,
    /// Backing file, stored as given (relative: to the new image's directory).
    #[arg(short = 'b')]
    pub backing: Option<String>,
    /// Backing file format (required with -b).
    #[arg(short = 'F')]
    pub backing_format: Option<String>,
    /// Options: cluster_size, compat, extended_l2, refcount_bits,
    /// lazy_refcounts, compression_type, preallocation, backing_file,
    /// backing_fmt, data_file (an external data file, created; a relative
    /// name is relative to the current directory, as QEMU opens it),
    /// data_file_raw (comma-separated name=value).
    #[arg(short = 'o')]
    pub options: Vec<String>,
    /// Do not open the backing file (SIZE is then required).
    #[arg(short = 'u')]
    pub unsafe_backing: bool,
    /// Quiet: do not print the Formatting line.
    #[arg(short = 'q')]
    pub quiet: bool,
    /// The new image.
    pub file: PathBuf,
    /// Virtual size (k, M, G, T suffixes), rounded up to 512 bytes; the
    /// backing file's by default.
    pub size: Option<String>,
}

/// Options collected from `-o`, before they are applied.
#[derive(Debug, Default)]
struct Parsed {
    opts: CreateOptions,
    /// The options given, in qemu-img's print order.
    given_compat: Option<String>,
    given_prealloc: Option<String>,
    backing: Option<String>,
    backing_fmt: Option<String>,
    given_data_file_raw: Option<String>,
    size: Option<u64>,
}

fn on_off(k: &str, v: &str) -> Result<bool> {
    match v {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => bail!("invalid value {v:?} for option {k}: expected on or off"),
    }
}

fn parse_options(specs: &[String], p: &mut Parsed) -> Result<()> {
    for spec in specs {
        for item in spec.split(',').filter(|i| !i.is_empty()) {
            let (k, v) = item
                .split_once('=')
                .ok_or_else(|| anyhow!("invalid option {item:?}: expected name=value"))?;
            let o = &mut p.opts;
            match k {
                "cluster_size" => o.cluster_size = parse_size(v)?,
                "compat" => {
                    o.compat_v2 = match v {
                        "0.10" | "v2" => true,
                        "1.1" | "v3" => false,
                        _ => bail!("invalid compat value {v:?}: expected 0.10 or 1.1"),
                    };
                    p.given_compat = Some(v.to_string());
                }
                "refcount_bits" => {
                    o.refcount_bits = v
                        .parse()
                        .map_err(|_| anyhow!("invalid refcount_bits {v:?}: not a number"))?
                }
                "lazy_refcounts" => o.lazy_refcounts = on_off(k, v)?,
                "extended_l2" => o.extended_l2 = on_off(k, v)?,
                "compression_type" => {
                    o.compression_type = match v {
                        "zlib" => CompressionType::Deflate,
                        "zstd" => CompressionType::Zstd,
                        _ => bail!("invalid compression_type {v:?}: expected zlib or zstd"),
                    }
                }
                "preallocation" => {
                    o.preallocation = match Preallocation::from_name(v) {
                        Some(p) => p,
                        None => bail!(
                            "invalid preallocation mode {v:?}: expected off, metadata, falloc \
                             or full"
                        ),
                    };
                    p.given_prealloc = Some(v.to_string());
                }
                "backing_file" => p.backing = Some(v.to_string()),
                "backing_fmt" => p.backing_fmt = Some(v.to_string()),
                "data_file" => o.data_file = Some(v.to_string()),
                "data_file_raw" => {
                    o.data_file_raw = on_off(k, v)?;
                    p.given_data_file_raw = Some(v.to_string());
                }
                "size" => p.size = Some(parse_size(v)?),
                _ => bail!(
                    "invalid option {k:?} (supported: cluster_size, compat, extended_l2, \
                     refcount_bits, lazy_refcounts, compression_type, preallocation, \
                     backing_file, backing_fmt, data_file, data_file_raw, size)"
                ),
            }
        }
    }
    Ok(())
}

fn format_by_name(name: &str) -> Result<ImageFormat> {
    ImageFormat::from_name(name)
        .ok_or_else(|| anyhow!("unknown image format {name:?}: Strata creates qcow2 and raw"))
}

/// The `Formatting '...'` line qemu-img prints.
fn formatting_line(file: &str, p: &Parsed, size: u64, format: ImageFormat) -> String {
    if format == ImageFormat::Raw {
        return format!("Formatting '{file}', fmt=raw size={size}");
    }
    let o = &p.opts;
    let on = |b: bool| if b { "on" } else { "off" };
    let mut s = format!(
        "Formatting '{file}', fmt=qcow2 cluster_size={} extended_l2={}",
        o.cluster_size,
        on(o.extended_l2)
    );
    if let Some(pre) = &p.given_prealloc {
        s.push_str(&format!(" preallocation={pre}"));
    }
    let ct = match o.compression_type {
        CompressionType::Zstd => "zstd",
        _ => "zlib",
    };
    s.push_str(&format!(" compression_type={ct} size={size}"));
    if let Some(b) = &p.backing {
        s.push_str(&format!(" backing_file={b}"));
    }
    if let Some(f) = &p.backing_fmt {
        s.push_str(&format!(" backing_fmt={f}"));
    }
    if let Some(c) = &p.given_compat {
        s.push_str(&format!(" compat={c}"));
    }
    if let Some(d) = &o.data_file {
        s.push_str(&format!(" data_file={d}"));
    }
    if let Some(r) = &p.given_data_file_raw {
        s.push_str(&format!(" data_file_raw={r}"));
    }
    s.push_str(&format!(
        " lazy_refcounts={} refcount_bits={}",
        on(o.lazy_refcounts),
        o.refcount_bits
    ));
    s
}

/// A file's identity (device, inode), following symbolic links; `None`
/// when it does not exist (or cannot be examined).
fn file_id(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// `path` made absolute and cleaned of `.` components, for comparing names
/// of files that do not exist (yet).
fn lexical(path: &Path) -> PathBuf {
    std::path::absolute(path)
        .unwrap_or_else(|_| path.to_path_buf())
        .components()
        .collect()
}

/// Refuses a backing file that is the new image itself, as qemu-img does
/// ("Trying to create an image with the same filename as the backing
/// file"), but by file identity, so that a symbolic or hard link to the
/// image is caught too.
fn refuse_self_backing(file: &Path, backing_path: &Path, name: &str) -> Result<()> {
    let same = match (file_id(file), file_id(backing_path)) {
        (Some(a), Some(b)) => a == b,
        _ => lexical(file) == lexical(backing_path),
    };
    if same {
        bail!(
            "{}: Error: Trying to create an image with the same filename as the backing file \
             ({name:?} is {} itself); refusing, nothing was changed",
            file.display(),
            file.display()
        );
    }
    Ok(())
}

/// Runs `strata create`.
///
/// Everything is checked before anything is touched: options, limits,
/// the backing file (never the new image itself, nor a chain that contains
/// it), the lock on an existing file. Only then is the `Formatting` line
/// printed and the image built, beside the target under a temporary name,
/// and renamed over it when complete ([`NewImageFile`]).
pub fn run(args: &CreateArgs, out: &mut dyn Write) -> Result<i32> {
    let path = args.file.as_path();
    let file = path.display().to_string();
    let file = file.as_str();
    let format = format_by_name(args.format.as_deref().unwrap_or("qcow2"))?;
    let mut p = Parsed::default();
    parse_options(&args.options, &mut p).with_context(|| file.to_string())?;
    if let Some(b) = &args.backing {
        p.backing = Some(b.clone());
    }
    if let Some(f) = &args.backing_format {
        p.backing_fmt = Some(f.clone());
    }
    if let Some(s) = &args.size {
        p.size = Some(parse_size(s).with_context(|| file.to_string())?);
    }
    let backing = match (&p.backing, &p.backing_fmt) {
        (None, None) => None,
        (None, Some(_)) => bail!("{file}: a backing format (-F) needs a backing file (-b)"),
        (Some(_), _) if format == ImageFormat::Raw => {
            bail!("{file}: raw images cannot have a backing file")
        }
        (Some(b), None) => bail!(
            "{file}: backing file {b:?} specified without backing format: give it with -F \
             (e.g. -F qcow2)"
        ),
        (Some(b), Some(f)) => {
            if b.is_empty() {
                bail!("{file}: empty backing file name");
            }
            Some((
                b.clone(),
                format_by_name(f).with_context(|| file.to_string())?,
            ))
        }
    };
    // Open the backing file, relative to the new image's directory, to
    // check it and to take its size when SIZE is not given.
    if let Some((name, bfmt)) = &backing {
        let bpath = resolve_backing_path(path, name);
        refuse_self_backing(path, &bpath, name)?;
        if !args.unsafe_backing || p.size.is_none() {
            let chain = Chain::open(&bpath, &OpenOptions::new().format(Some(*bfmt)))
                .with_context(|| format!("{file}: could not open backing file {name:?}"))?;
            // Replacing an image that the backing file's own chain uses
            // would make a loop (and destroy that image).
            if let Some(id) = file_id(path) {
                if let Some(l) = chain.layers().iter().find(|l| file_id(&l.path) == Some(id)) {
                    bail!(
                        "{file}: the backing file {name:?} has {file} in its own backing chain \
                         (as {}); refusing to make a loop, nothing was changed",
                        l.path.display()
                    );
                }
            }
            if p.size.is_none() {
                p.size = Some(chain.virtual_size());
            }
        }
    }
    let Some(size) = p.size else {
        bail!("{file}: image size must be given (SIZE), or taken from a backing file (-b)");
    };
    p.opts.size = size;
    p.opts.backing = backing;
    if format == ImageFormat::Qcow2 {
        check_qcow2_options(path, &p.opts).name_file(file)?;
    } else if p.given_compat.is_some()
        || p.opts.extended_l2
        || p.opts.lazy_refcounts
        || p.opts.cluster_size != CreateOptions::default().cluster_size
        || p.opts.data_file.is_some()
    {
        bail!("{file}: qcow2 options given for a raw image");
    }
    // Lock (and check) the file being replaced, and make the new one
    // beside it; the old file is untouched until the rename.
    let new = NewImageFile::begin(path).name_file(file)?;
    if !args.quiet {
        writeln!(out, "{}", formatting_line(file, &p, size, format))?;
        out.flush()?;
    }
    let storage = new.storage().name_file(file)?;
    match format {
        ImageFormat::Qcow2 => {
            let mut img = create_qcow2(Box::new(storage), path, &p.opts)
                .with_context(|| format!("{file}: cannot create the image"))?;
            img.flush()?;
        }
        ImageFormat::Raw => create_raw(&storage, path, size)
            .with_context(|| format!("{file}: cannot create the image"))?,
    }
    new.commit().name_file(file)?;
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_formatting_line_follows_qemu_img() {
        let p = Parsed {
            backing: Some("x1.qcow2".into()),
            backing_fmt: Some("qcow2".into()),
            ..Parsed::default()
        };
        assert_eq!(
            formatting_line("/tmp/x3.qcow2", &p, 1048576, ImageFormat::Qcow2),
            "Formatting '/tmp/x3.qcow2', fmt=qcow2 cluster_size=65536 extended_l2=off \
             compression_type=zlib size=1048576 backing_file=x1.qcow2 backing_fmt=qcow2 \
             lazy_refcounts=off refcount_bits=16"
        );
    }
}
