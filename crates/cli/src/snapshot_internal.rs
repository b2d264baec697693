//! `strata snapshot-internal`: a qcow2 image's internal snapshots, as
//! `qemu-img snapshot` lists, creates, applies and deletes them.
//!
//! The spelling is `snapshot-internal` because `strata snapshot` is the
//! libvirt (external) snapshot command; the flags, the lookups and the
//! messages are qemu-img's: `-l` (the default) lists in qemu-img's table,
//! `-c NAME` creates (the ID is the next integer; names may repeat), `-a
//! ID_OR_NAME` applies (an ID first, then a name), `-d NAME` deletes the
//! first snapshot of that name. The engine is
//! `strata_image::snapshot_internal`.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Result};
use strata_image::{Chain, Image, SnapshotRef};

use crate::size::size_to_str;
use crate::{localtime, open_options, NameFile};

/// Arguments of `strata snapshot-internal`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct SnapshotInternalArgs {
    /// List the snapshots (the default).
    #[arg(short = 'l')]
    pub list: bool,
    /// Create a snapshot named NAME.
    #[arg(short = 'c', value_name = "NAME")]
    pub create: Option<String>,
    /// Apply (revert the disk to) the snapshot with this ID or name.
    #[arg(short = 'a', value_name = "SNAPSHOT")]
    pub apply: Option<String>,
    /// Delete the snapshot named NAME.
    #[arg(short = 'd', value_name = "NAME")]
    pub delete: Option<String>,
    /// Image format (qcow2 or raw); probed when omitted.
    #[arg(short = 'f')]
    pub format: Option<String>,
    /// Force share: take no locks (only with -l, as in qemu-img).
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// Quiet (qemu-img prints nothing else for these commands either).
    #[arg(short = 'q')]
    pub quiet: bool,
    /// The image.
    pub file: PathBuf,
}

/// What the command line asked for.
enum Action<'a> {
    List,
    Create(&'a str),
    Apply(&'a str),
    Delete(&'a str),
}

/// qemu-img's `bdrv_snapshot_dump` table of `snapshots` (nothing when
/// there are none).
pub fn format_list(snapshots: &[strata_format::snapshot::Snapshot]) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    if snapshots.is_empty() {
        return s;
    }
    s.push_str("Snapshot list:\n");
    let _ = writeln!(
        s,
        "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}",
        "ID", "TAG", "VM_SIZE", "DATE", "VM_CLOCK", "ICOUNT"
    );
    for sn in snapshots {
        let secs = sn.vm_clock_nsec / 1_000_000_000;
        let clock = format!(
            "{:04}:{:02}:{:02}.{:03}",
            secs / 3600,
            (secs / 60) % 60,
            secs % 60,
            (sn.vm_clock_nsec / 1_000_000) % 1000
        );
        let icount = match sn.icount {
            Some(i) if i != u64::MAX => i.to_string(),
            _ => String::new(),
        };
        let _ = writeln!(
            s,
            "{} {} {:>8} {:>19} {:>15} {:>10}",
            pad_bytes(&sn.id, 7),
            pad_bytes(&sn.name, 16),
            size_to_str(sn.vm_state_size),
            localtime::format_local(i64::from(sn.date_sec)),
            clock,
            icount
        );
    }
    s
}

/// `s` padded with spaces to `width` bytes, as C's `%-*s` pads (by bytes,
/// not characters: names need not be ASCII).
fn pad_bytes(s: &str, width: usize) -> String {
    format!("{s}{}", " ".repeat(width.saturating_sub(s.len())))
}

/// Runs `strata snapshot-internal`.
pub fn run(args: &SnapshotInternalArgs, out: &mut dyn Write) -> Result<i32> {
    let given = [
        args.list,
        args.create.is_some(),
        args.apply.is_some(),
        args.delete.is_some(),
    ];
    if given.iter().filter(|g| **g).count() > 1 {
        bail!("Cannot mix '-l', '-a', '-c', '-d'");
    }
    let action = if let Some(n) = &args.create {
        Action::Create(n)
    } else if let Some(n) = &args.apply {
        Action::Apply(n)
    } else if let Some(n) = &args.delete {
        Action::Delete(n)
    } else {
        Action::List
    };
    let file = args.file.display().to_string();
    let writable = !matches!(action, Action::List);
    if writable && args.force_share {
        bail!("Could not open '{file}': force-share=on can only be used with read-only images");
    }
    let mut opts = open_options(args.format.as_deref(), args.force_share)?;
    opts.writable = writable;
    // As qemu-img opens an image read-write: a dirty image is repaired,
    // unknown autoclear bits are cleared, unreadable bitmaps refused.
    opts.write_policy = strata_image::WritePolicy::qemu();
    let mut chain = Chain::open(&args.file, &opts).name_file(&file)?;
    let Some(layer) = chain.layers_mut().first_mut() else {
        bail!("{file}: empty chain");
    };
    let img = match &mut layer.image {
        Image::Qcow2(q) => q,
        Image::Raw(_) => {
            return match action {
                // qemu-img lists nothing for a format without snapshots.
                Action::List => Ok(0),
                Action::Create(n) => bail!("Could not create snapshot '{n}': Operation not supported"),
                Action::Apply(n) => bail!(
                    "Could not apply snapshot '{n}': Failed to load snapshot: Operation not supported"
                ),
                Action::Delete(n) => bail!("Could not delete snapshot '{n}': snapshot not found"),
            };
        }
    };
    match action {
        Action::List => out.write_all(format_list(img.snapshots()).as_bytes())?,
        Action::Create(name) => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            let date = (now.as_secs() as u32, now.subsec_micros() * 1000);
            img.snapshot_create(name, date)
                .map_err(|e| anyhow::anyhow!("Could not create snapshot '{name}': {e}"))?;
        }
        Action::Apply(name) => {
            let sel = SnapshotRef::IdOrName(name.to_string());
            if sel.find(img.snapshots()).is_none() {
                bail!(
                    "Could not apply snapshot '{name}': Failed to load snapshot: No such file or \
                     directory"
                );
            }
            img.snapshot_apply(&sel)
                .map_err(|e| anyhow::anyhow!("Could not apply snapshot '{name}': {e}"))?;
        }
        Action::Delete(name) => {
            let sel = SnapshotRef::Name(name.to_string());
            if sel.find(img.snapshots()).is_none() {
                bail!("Could not delete snapshot '{name}': snapshot not found");
            }
            img.snapshot_delete(&sel)
                .map_err(|e| anyhow::anyhow!("Could not delete snapshot '{name}': {e}"))?;
        }
    }
    chain.flush().name_file(&file)?;
    Ok(0)
}
