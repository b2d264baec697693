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

const MIB: u64 = 1 << 20;

/// Arguments of `strata demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Directory for the demo files (a new temporary one by default).
    pub dir: Option<PathBuf>,
    /// libvirt URI for the snapshot steps (default: libvirt's test driver).
    #[arg(short = 'c', long = "connect")]
    pub uri: Option<String>,
    /// With -c: the existing shut-off domain to use.
    #[arg(long = "domain")]
    pub domain: Option<String>,
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
    let opts = OpenOptions::new().writable(true);
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

/// A new directory under the system's temporary directory, kept after the
/// demo so that the user can look at the images it made.
fn unique_temp_dir() -> Result<PathBuf> {
    let base = std::env::temp_dir();
    let dir = tempfile::Builder::new()
        .prefix("strata-demo-")
        .tempdir_in(&base)
        .with_context(|| {
            format!(
                "cannot create a temporary directory under {}",
                base.display()
            )
        })?;
    Ok(dir.keep())
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
            file: s(&top).into(),
            format: None,
            force_share: false,
            backing_chain: true,
            output: crate::dot::GraphOutput::Human,
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
            file: s(&top).into(),
            format: None,
            force_share: false,
            output: crate::map::MapOutput::Json,
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
            files: vec![s(&top).into(), s(&raw).into()],
            format: None,
            output_format: "raw".into(),
            progress: false,
            compress: false,
            options: None,
            force_share: false,
            bitmaps: false,
            snapshot: None,
            no_create: false,
            target_is_zero: false,
            sparse_size: None,
            backing: None,
            backing_format: None,
            copy_offload: false,
            out_of_order: false,
            cache: None,
            src_cache: None,
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
            file1: s(&top).into(),
            file2: s(&raw).into(),
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

    write_steps(&dir, out, err)?;
    libvirt_steps(args, &dir, out)?;

    writeln!(out)?;
    writeln!(
        out,
        "Done. The files are in {} (cross-check with `qemu-img check` and `qemu-img compare` \
         if QEMU is installed).",
        dir.display()
    )?;
    Ok(0)
}

/// Runs a strata command in-process (as the demo prints it) and insists
/// on success.
fn strata(args: &[&str], out: &mut dyn Write, err: &mut dyn Write) -> Result<()> {
    let mut argv = vec!["strata"];
    argv.extend_from_slice(args);
    let mut line = String::from("$ strata");
    for a in args {
        if a.is_empty() || a.contains(' ') {
            line.push_str(&format!(" '{a}'"));
        } else {
            line.push(' ');
            line.push_str(a);
        }
    }
    writeln!(out, "{line}")?;
    let rc = crate::run(argv, out, err);
    if rc != 0 {
        anyhow::bail!("demo step `{}` failed (exit {rc})", &line[2..]);
    }
    Ok(())
}

fn title(out: &mut dyn Write, t: &str) -> Result<()> {
    writeln!(out)?;
    writeln!(out, "== {t}")?;
    Ok(())
}

/// The write-path and merge steps: create, io, check, commit, rebase -u,
/// pull.
fn write_steps(dir: &Path, out: &mut dyn Write, err: &mut dyn Write) -> Result<()> {
    let p = |n: &str| dir.join(n).display().to_string();
    let (base, top, over) = (p("base.qcow2"), p("top.qcow2"), p("over.qcow2"));
    title(
        out,
        "6. A new overlay on the chain (size taken from its backing file)",
    )?;
    strata(
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "top.qcow2",
            "-F",
            "qcow2",
            &over,
        ],
        out,
        err,
    )?;
    title(out, "7. Guest writes into the overlay, qemu-io style")?;
    strata(
        &[
            "io",
            "-c",
            "write -P 0xc1 1M 128k",
            "-c",
            "write -z 0 64k",
            "-c",
            "discard 3M 64k",
            "-c",
            "read -P 0xc1 1M 128k",
            "-c",
            "flush",
            &over,
        ],
        out,
        err,
    )?;
    title(out, "8. The overlay's metadata is consistent")?;
    strata(&["check", &over], out, err)?;
    title(
        out,
        "9. Plan a commit of the overlay into top.qcow2 (changes nothing)",
    )?;
    strata(&["commit", "--dry-run", &over], out, err)?;
    title(
        out,
        "10. Commit the overlay into top.qcow2 (the overlay is emptied)",
    )?;
    strata(&["commit", &over], out, err)?;
    strata(&["check", &top], out, err)?;
    title(
        out,
        "11. Header-only rebase: point top.qcow2 at a copy of its base",
    )?;
    let copy = p("base-copy.qcow2");
    let view = p("top-view.raw");
    strata(&["convert", "-O", "raw", &top, &view], out, err)?;
    std::fs::copy(&base, &copy).with_context(|| format!("{copy}: cannot copy {base}"))?;
    writeln!(out, "$ cp {base} {copy}")?;
    strata(
        &["rebase", "-u", "-b", "base-copy.qcow2", "-F", "qcow2", &top],
        out,
        err,
    )?;
    strata(&["compare", &top, &view], out, err)?;
    title(
        out,
        "12. Pull the backing data into top.qcow2, which then stands alone",
    )?;
    strata(&["pull", "--dry-run", &top], out, err)?;
    strata(&["pull", &top], out, err)?;
    strata(&["compare", &top, &view], out, err)?;
    strata(&["info", &top], out, err)?;
    strata(&["check", &top], out, err)?;
    Ok(())
}

#[cfg(not(feature = "libvirt"))]
fn libvirt_steps(args: &DemoArgs, _dir: &Path, out: &mut dyn Write) -> Result<()> {
    if args.uri.is_some() || args.domain.is_some() {
        anyhow::bail!(
            "this strata was built without the libvirt feature: -c and --domain are not available"
        );
    }
    title(out, "13. Snapshots of libvirt domains")?;
    writeln!(
        out,
        "(skipped: this strata was built without the libvirt feature)"
    )?;
    Ok(())
}

/// The node XML of the test driver's demo domain (shut off, one disk).
#[cfg(feature = "libvirt")]
fn node_xml(disk: &Path) -> String {
    format!(
        "<node>\n  <domain type='test' xmlns:test='http://libvirt.org/schemas/domain/test/1.0'>\n    \
         <name>strata-demo</name>\n    <uuid>9b0c1d5e-4f0a-4c36-8c1e-5d7f3a2b6e10</uuid>\n    \
         <memory>65536</memory>\n    <os><type>hvm</type></os>\n    <devices>\n      \
         <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>\
         <source file='{}'/><target dev='vda' bus='virtio'/></disk>\n    </devices>\n    \
         <test:runstate>5</test:runstate>\n  </domain>\n</node>\n",
        disk.display()
    )
}

/// The snapshot lifecycle: create take-1, write, create take-2, revert to
/// take-1, delete take-2, blockcommit.
#[cfg(feature = "libvirt")]
fn libvirt_steps(args: &DemoArgs, dir: &Path, out: &mut dyn Write) -> Result<()> {
    let mut err = Vec::new();
    let r = libvirt_steps_inner(args, dir, out, &mut err);
    if let Err(e) = r {
        let detail = String::from_utf8_lossy(&err);
        return Err(e.context(detail.trim().to_string()));
    }
    Ok(())
}

#[cfg(feature = "libvirt")]
fn libvirt_steps_inner(
    args: &DemoArgs,
    dir: &Path,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<()> {
    let (uri, domain) = match (&args.uri, &args.domain) {
        (Some(u), Some(d)) => (u.clone(), d.clone()),
        (Some(_), None) => anyhow::bail!(
            "with -c URI, name an existing shut-off domain with --domain NAME \
             (the demo takes snapshots of its disk and merges them back)"
        ),
        (None, _) => {
            let dir = std::fs::canonicalize(dir)
                .with_context(|| format!("{}: cannot resolve", dir.display()))?;
            let disk = dir.join("vm.qcow2");
            new_image(&disk, 16 * MIB, None)?;
            write_layer(&disk, &[(0, MIB, 0x11)], &[])?;
            let node = dir.join("node.xml");
            std::fs::write(&node, node_xml(&disk))
                .with_context(|| format!("{}: cannot write", node.display()))?;
            title(
                out,
                "13. A shut-off domain on libvirt's test driver (no daemon needed)",
            )?;
            writeln!(
                out,
                "{} defines domain strata-demo with disk vda = {}",
                node.display(),
                disk.display()
            )?;
            (
                format!("test://{}", node.display()),
                "strata-demo".to_string(),
            )
        }
    };
    let u = uri.as_str();
    let d = domain.as_str();
    let active = |d: &str| -> Result<String> {
        crate::snapshot::with_connection(Some(u), |conn| {
            let disks = strata_libvirt::domain_disks(conn, d)?;
            let first = disks
                .first()
                .ok_or_else(|| anyhow::anyhow!("domain {d} has no file-backed disk"))?;
            Ok(first.source.display().to_string())
        })
    };
    title(
        out,
        "14. Snapshot take-1: an overlay per disk, recorded in libvirt",
    )?;
    strata(&["snapshot", "create", d, "take-1", "-c", u], out, err)?;
    title(out, "15. The guest writes (into take-1's overlay)")?;
    let a = active(d)?;
    strata(&["io", "-c", "write -P 0x22 2M 64k", &a], out, err)?;
    title(out, "16. Snapshot take-2, and the tree")?;
    strata(&["snapshot", "create", d, "take-2", "-c", u], out, err)?;
    let a = active(d)?;
    strata(&["io", "-c", "write -P 0x33 3M 64k", &a], out, err)?;
    strata(&["snapshot", "list", d, "--tree", "-c", u], out, err)?;
    title(
        out,
        "17. Revert to take-1 (a fresh overlay on take-1's state)",
    )?;
    strata(&["snapshot", "revert", d, "take-1", "-c", u], out, err)?;
    let a = active(d)?;
    strata(
        &[
            "io",
            "-c",
            "read -P 0x11 0 1M",
            "-c",
            "read -P 0 2M 64k",
            &a,
        ],
        out,
        err,
    )?;
    title(
        out,
        "18. Delete take-2 (its data merged where still needed)",
    )?;
    strata(&["snapshot", "delete", d, "take-2", "-c", u], out, err)?;
    strata(&["snapshot", "list", d, "-c", u], out, err)?;
    title(
        out,
        "19. Blockcommit the active chain into the base and pivot",
    )?;
    strata(&["blockcommit", d, "--delete-snapshots", "-c", u], out, err)?;
    let a = active(d)?;
    writeln!(out, "domain {d} now uses {a}")?;
    strata(&["check", &a], out, err)?;
    strata(&["snapshot", "list", d, "-c", u], out, err)?;
    Ok(())
}
