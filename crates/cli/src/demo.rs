//! `strata demo [DIR]`: builds a small chain with Strata itself and walks
//! through what Strata can do so far, printing each step.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use strata_image::create::{create_qcow2, CreateOptions};
use strata_image::{Chain, FileStorage, ImageFormat, OpenOptions};

use crate::compare::CompareArgs;
use crate::convert::ConvertArgs;
use crate::info::InfoArgs;
use crate::map::MapArgs;
use crate::OutputFormat;

const MIB: u64 = 1 << 20;

/// Arguments of `strata demo`.
#[derive(Debug, Clone)]
pub struct DemoArgs {
    /// Where to build the chain (a new temporary directory when `None`).
    pub dir: Option<PathBuf>,
}

fn step(out: &mut dyn Write, title: &str, cmd: &str) -> Result<()> {
    writeln!(out)?;
    writeln!(out, "== {title}")?;
    writeln!(out, "$ {cmd}")?;
    Ok(())
}

fn new_image(path: &Path, size: u64, backing: Option<&str>) -> Result<()> {
    let storage =
        FileStorage::create(path).with_context(|| format!("{}: cannot create", path.display()))?;
    let opts = CreateOptions {
        size,
        backing: backing.map(|b| (b.to_string(), ImageFormat::Qcow2)),
        ..CreateOptions::default()
    };
    let mut img = create_qcow2(Box::new(storage), path, &opts)?;
    img.flush()?;
    Ok(())
}

fn write_layer(path: &Path, writes: &[(u64, u64, u8)], zeroes: &[(u64, u64)]) -> Result<()> {
    let opts = OpenOptions {
        writable: true,
        ..OpenOptions::default()
    };
    let mut chain = Chain::open(path, &opts)?;
    for &(off, len, byte) in writes {
        chain.write_at(&vec![byte; len as usize], off)?;
    }
    for &(off, len) in zeroes {
        chain.write_zeroes(off, len, false)?;
    }
    chain.flush()?;
    Ok(())
}

fn unique_temp_dir() -> Result<PathBuf> {
    let base = std::env::temp_dir();
    for i in 0..1000u32 {
        let p = base.join(format!("strata-demo-{}-{i}", std::process::id()));
        match std::fs::create_dir(&p) {
            Ok(()) => return Ok(p),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e).with_context(|| format!("{}: cannot create", p.display())),
        }
    }
    anyhow::bail!(
        "cannot create a temporary directory under {}",
        base.display()
    )
}

/// Runs the demo.
pub fn run(args: &DemoArgs, out: &mut dyn Write, err: &mut dyn Write) -> Result<i32> {
    let dir = match &args.dir {
        Some(d) => {
            std::fs::create_dir_all(d)
                .with_context(|| format!("{}: cannot create", d.display()))?;
            d.clone()
        }
        None => unique_temp_dir()?,
    };
    let base = dir.join("base.qcow2");
    let top = dir.join("top.qcow2");
    let raw = dir.join("top.raw");
    let s = |p: &Path| p.display().to_string();
    writeln!(out, "Strata demo in {}", dir.display())?;

    step(
        out,
        "1. Build a two-image chain with Strata's own write path",
        "(library) create base.qcow2 4M; write 0xa1 at 0 (1M), 0xa2 at 2M (512k); \
         create top.qcow2 -b base.qcow2 -F qcow2; write 0xb1 at 512k (64k), zero 2M+64k (64k)",
    )?;
    new_image(&base, 4 * MIB, None)?;
    write_layer(&base, &[(0, MIB, 0xa1), (2 * MIB, MIB / 2, 0xa2)], &[])?;
    new_image(&top, 4 * MIB, Some("base.qcow2"))?;
    write_layer(
        &top,
        &[(MIB / 2, 64 << 10, 0xb1)],
        &[(2 * MIB + (64 << 10), 64 << 10)],
    )?;
    writeln!(out, "created {} and {}", s(&base), s(&top))?;

    step(
        out,
        "2. Inspect the chain",
        &format!("strata info --backing-chain {}", s(&top)),
    )?;
    crate::info::run(
        &InfoArgs {
            file: s(&top),
            format: None,
            force_share: false,
            backing_chain: true,
            output: OutputFormat::Human,
        },
        out,
    )?;

    step(
        out,
        "3. Which layer answers for each guest range",
        &format!("strata map --output json {}", s(&top)),
    )?;
    crate::map::run(
        &MapArgs {
            file: s(&top),
            format: None,
            force_share: false,
            output: OutputFormat::Json,
        },
        out,
    )?;

    step(
        out,
        "4. Flatten the chain's guest view to a sparse raw file",
        &format!("strata convert -O raw {} {}", s(&top), s(&raw)),
    )?;
    crate::convert::run(
        &ConvertArgs {
            src: s(&top),
            dst: s(&raw),
            format: None,
            output_format: "raw".into(),
            progress: false,
            compress: false,
            options: None,
            force_share: false,
        },
        out,
        err,
    )?;
    let meta = std::fs::metadata(&raw)?;
    {
        use std::os::unix::fs::MetadataExt;
        writeln!(
            out,
            "{}: {} bytes, {} allocated on disk",
            s(&raw),
            meta.len(),
            meta.blocks() * 512
        )?;
    }

    step(
        out,
        "5. The raw copy reads the same as the chain",
        &format!("strata compare {} {}", s(&top), s(&raw)),
    )?;
    let rc = crate::compare::run(
        &CompareArgs {
            file1: s(&top),
            file2: s(&raw),
            format1: None,
            format2: Some("raw".into()),
            strict: false,
            force_share: false,
            quiet: false,
        },
        out,
    )?;
    if rc != 0 {
        anyhow::bail!("the demo's raw copy differs from its chain (compare exited {rc})");
    }

    writeln!(out)?;
    writeln!(
        out,
        "Done. The files are in {} (cross-check with `qemu-img compare {} {}` if QEMU is installed).",
        dir.display(),
        s(&top),
        s(&raw)
    )?;
    Ok(0)
}
