//! `strata map`: the chain's extents as `qemu-img map` prints them.
//!
//! The rules, found by experiment against qemu-img 10 and its source
//! (`qemu-img.c: get_block_status`, `block/io.c`):
//! - `depth` is the index of the layer that answered. A range no layer
//!   allocates is answered by the bottom image (a qcow2 image without a
//!   backing file reports unallocated ranges as zeros): depth = layers - 1,
//!   `present: false`, `zero: true`.
//! - Past the end of a backing file shorter than the image above it, the
//!   image above answers "zeros" itself: depth of that image,
//!   `present: false`, `zero: true`.
//! - A raw image reports data and holes (`zero: true`), both `present`,
//!   both with an `offset` equal to the guest offset.
//! - A qcow2 zero cluster with a preallocated host cluster has an `offset`;
//!   a compressed cluster has none and `compressed: true`.
//! - With extended L2 entries, an unallocated subcluster of an allocated
//!   cluster still carries the cluster's host offset when the layer that
//!   answers is the one holding it (the bottom, or the image above a short
//!   backing file).
//! - Neighbouring entries merge when depth, present, zero, data and
//!   compressed agree, and, when they have offsets, the offsets are
//!   contiguous.

use std::fmt::Write as _;
use std::io::Write;

use anyhow::Result;
use strata_format::{GuestOffset, L2Entry};
use strata_image::{check, Chain, Layer, Mapping};

use crate::info::path_combine;
use crate::open_options;

/// One line of `qemu-img map --output json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapEntry {
    /// First guest byte.
    pub start: u64,
    /// Length in bytes.
    pub length: u64,
    /// Index of the layer that answered (0 = top).
    pub depth: u64,
    /// Whether a layer allocates the range.
    pub present: bool,
    /// Whether it reads as zeros.
    pub zero: bool,
    /// Whether data is stored for it.
    pub data: bool,
    /// Whether it lies in compressed clusters.
    pub compressed: bool,
    /// Host offset in the answering layer's file, when there is one.
    pub offset: Option<u64>,
}

impl MapEntry {
    /// Whether `next` continues `self` into one entry (qemu-img's
    /// `entry_mergeable`).
    pub fn mergeable(&self, next: &MapEntry) -> bool {
        if self.length == 0
            || self.zero != next.zero
            || self.data != next.data
            || self.compressed != next.compressed
            || self.depth != next.depth
            || self.present != next.present
            || self.offset.is_some() != next.offset.is_some()
        {
            return false;
        }
        match (self.offset, next.offset) {
            (Some(a), Some(b)) => a.checked_add(self.length) == Some(b),
            _ => true,
        }
    }
}

/// The host cluster behind guest offset `g` in `layer` (a qcow2 image with
/// an uncompressed L2 entry pointing at a cluster), plus `g`'s offset in it.
fn host_in_cluster(layer: &Layer, g: u64) -> Result<Option<u64>> {
    let Some(q) = layer.image.as_qcow2() else {
        return Ok(None);
    };
    let geo = q.geometry();
    let Some((_, table)) = q.l2_for(geo.l1_index(GuestOffset::new(g)))? else {
        return Ok(None);
    };
    let e = L2Entry::read(&table, geo, geo.l2_index(GuestOffset::new(g))).map_err(|source| {
        anyhow::anyhow!(
            "{}: invalid L2 entry for guest offset {g:#x}: {source}",
            layer.path.display()
        )
    })?;
    Ok(e.host_cluster().map(|h| h.get() + geo.in_cluster(g)))
}

/// Entries for `[start, start+len)` answered by `layer` at `depth` as
/// "unallocated, reads as zeros" (QEMU's ZERO without ALLOCATED).
fn unallocated_zero(
    layer: &Layer,
    depth: u64,
    start: u64,
    len: u64,
    out: &mut Vec<MapEntry>,
) -> Result<()> {
    let base = MapEntry {
        start,
        length: len,
        depth,
        present: false,
        zero: true,
        data: false,
        compressed: false,
        offset: None,
    };
    // Only extended L2 entries can leave part of an allocated cluster
    // unallocated; split such a range by cluster to find host offsets.
    let extended = layer
        .image
        .as_qcow2()
        .map(|q| q.geometry())
        .filter(|g| g.extended_l2());
    let Some(geo) = extended else {
        out.push(base);
        return Ok(());
    };
    let end = start + len;
    let mut pos = start;
    while pos < end {
        let next = (geo.align_down(pos) + geo.cluster_size()).min(end);
        out.push(MapEntry {
            start: pos,
            length: next - pos,
            offset: host_in_cluster(layer, pos)?,
            ..base
        });
        pos = next;
    }
    Ok(())
}

/// Data entries for the guest range `[start, start+len)` stored at `host`
/// in `layer`'s file, split where the file has holes or ends: those parts
/// read as zeros (`zero: true`, still `data` with an offset). QEMU asks
/// the file so only for images it takes for metadata-preallocated
/// (`qcow2_detect_metadata_preallocation`; iotests 080, 121, 061).
fn file_holes(
    layer: &Layer,
    start: u64,
    len: u64,
    host: u64,
    depth: u64,
    out: &mut Vec<MapEntry>,
) -> Result<()> {
    let storage = layer.image.storage();
    let mut done = 0;
    while done < len {
        let (data, run) = storage
            .data_run(host + done, len - done)
            .map_err(|e| anyhow::anyhow!("{}: seek data/hole: {e}", layer.path.display()))?;
        let run = run.clamp(1, len - done);
        out.push(MapEntry {
            start: start + done,
            length: run,
            depth,
            present: true,
            zero: !data,
            data: true,
            compressed: false,
            offset: Some(host + done),
        });
        done += run;
    }
    Ok(())
}

/// The chain's merged map entries, as qemu-img prints them.
pub fn map_entries(chain: &Chain) -> Result<Vec<MapEntry>> {
    let size = chain.virtual_size();
    let layers = chain.layers();
    let nlayers = layers.len() as u64;
    let mut merged: Vec<MapEntry> = Vec::new();
    if size == 0 {
        merged.push(MapEntry {
            start: 0,
            length: 0,
            depth: 0,
            present: false,
            zero: false,
            data: false,
            compressed: false,
            offset: None,
        });
        return Ok(merged);
    }
    let mut pos = 0u64;
    let mut fresh = Vec::new();
    // Per layer: whether QEMU would ask its file about holes (see
    // `file_holes`), decided once, as QEMU does.
    let mut recurse = std::collections::HashMap::new();
    while pos < size {
        let r = chain.resolve(pos, size - pos)?;
        let len = r.extent.len.min(size - pos);
        if len == 0 {
            anyhow::bail!("internal error: empty extent at guest offset {pos:#x}");
        }
        fresh.clear();
        let entry = |present, zero, data, compressed, offset| MapEntry {
            start: pos,
            length: len,
            depth: r.depth as u64,
            present,
            zero,
            data,
            compressed,
            offset,
        };
        if r.past_end {
            // The layer above the short one answers "zeros".
            let d = r.depth.saturating_sub(1);
            unallocated_zero(&layers[d], d as u64, pos, len, &mut fresh)?;
        } else {
            match r.extent.mapping {
                Mapping::Unallocated => {
                    let d = (nlayers - 1) as usize;
                    unallocated_zero(&layers[d], d as u64, pos, len, &mut fresh)?;
                }
                Mapping::Zero { host } => {
                    fresh.push(entry(true, true, false, false, host.map(|h| h.get())));
                }
                Mapping::Data { host } => {
                    let layer = &layers[r.depth];
                    if *recurse.entry(r.depth).or_insert_with(|| {
                        layer
                            .image
                            .as_qcow2()
                            .is_some_and(check::detect_metadata_preallocation)
                    }) {
                        file_holes(layer, pos, len, host.get(), r.depth as u64, &mut fresh)?;
                    } else {
                        fresh.push(entry(true, false, true, false, Some(host.get())));
                    }
                }
                Mapping::Compressed(_) => {
                    fresh.push(entry(true, false, true, true, None));
                }
            }
        }
        for e in fresh.drain(..) {
            match merged.last_mut() {
                Some(last) if last.mergeable(&e) => last.length += e.length,
                _ => merged.push(e),
            }
        }
        pos += len;
    }
    Ok(merged)
}

/// `%#-16x` as C prints it (`0` has no `0x` prefix).
fn hex16(v: u64) -> String {
    let s = if v == 0 {
        "0".to_string()
    } else {
        format!("{v:#x}")
    };
    format!("{s:<16}")
}

/// `--output` of `strata map`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum MapOutput {
    /// Text for people, as qemu-img prints it.
    #[default]
    Human,
    /// JSON with qemu-img's keys.
    Json,
    /// An SVG picture: a strip per layer and who answers (see [`crate::svg`]).
    Svg,
}

/// Arguments of `strata map`.
#[derive(Debug, Clone, clap::Args)]
pub struct MapArgs {
    /// Image format (qcow2 or raw); probed when omitted.
    #[arg(short = 'f', long = "format")]
    pub format: Option<String>,
    /// Force share: take no locks.
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// Output format.
    #[arg(long = "output", value_enum, default_value_t)]
    pub output: MapOutput,
    /// The image.
    pub file: std::path::PathBuf,
}

/// The JSON text of `entries`, byte for byte as qemu-img prints it.
pub fn entries_json(entries: &[MapEntry]) -> String {
    let mut s = String::from("[");
    for (i, e) in entries.iter().enumerate() {
        if i > 0 {
            s.push_str(",\n");
        }
        let _ = write!(
            s,
            "{{ \"start\": {}, \"length\": {}, \"depth\": {}, \"present\": {}, \"zero\": {}, \"data\": {}, \"compressed\": {}",
            e.start, e.length, e.depth, e.present, e.zero, e.data, e.compressed
        );
        if let Some(o) = e.offset {
            let _ = write!(s, ", \"offset\": {o}");
        }
        s.push('}');
    }
    s.push_str("]\n");
    s
}

/// The layers' names as qemu-img shows them: backing names combined with
/// the name of the image recording them.
fn layer_names(args: &MapArgs, chain: &Chain) -> Vec<String> {
    // Names as qemu-img shows them: backing names combined with the name
    // of the image recording them.
    let mut names = vec![args.file.to_string_lossy().into_owned()];
    for l in chain.layers().iter().skip(1) {
        let prev = names.last().cloned().unwrap_or_default();
        names.push(path_combine(&prev, l.named_as.as_deref().unwrap_or("")));
    }
    names
}

/// Runs `strata map`.
pub fn run(args: &MapArgs, out: &mut dyn Write) -> Result<i32> {
    let opts = open_options(args.format.as_deref(), args.force_share)?;
    let chain = Chain::open(&args.file, &opts)?;
    let entries = map_entries(&chain)?;
    match args.output {
        MapOutput::Json => out.write_all(entries_json(&entries).as_bytes())?,
        MapOutput::Svg => out.write_all(
            crate::svg::render(&chain, &layer_names(args, &chain), &entries)?.as_bytes(),
        )?,
        MapOutput::Human => {
            let names = layer_names(args, &chain);
            let mut s = format!(
                "{:<16}{:<16}{:<16}{}\n",
                "Offset", "Length", "Mapped to", "File"
            );
            for e in &entries {
                if e.data && e.offset.is_none() {
                    out.write_all(s.as_bytes())?;
                    anyhow::bail!(
                        "{}: the image contains compressed clusters at guest offset {:#x}, which the human \
                         map cannot show (File contains external, encrypted or compressed clusters); \
                         use --output json",
                        args.file.display(),
                        e.start
                    );
                }
                if e.data && !e.zero {
                    let name = names.get(e.depth as usize).map_or("", String::as_str);
                    let _ = writeln!(
                        s,
                        "{}{}{}{}",
                        hex16(e.start),
                        hex16(e.length),
                        hex16(e.offset.unwrap_or(0)),
                        name
                    );
                }
            }
            out.write_all(s.as_bytes())?;
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(start: u64, length: u64, offset: Option<u64>) -> MapEntry {
        MapEntry {
            start,
            length,
            depth: 0,
            present: true,
            zero: false,
            data: true,
            compressed: false,
            offset,
        }
    }

    #[test]
    fn entries_merge_only_when_host_offsets_continue() {
        assert!(e(0, 4096, Some(8192)).mergeable(&e(4096, 10, Some(12288))));
        assert!(!e(0, 4096, Some(8192)).mergeable(&e(4096, 10, Some(0))));
        assert!(!e(0, 4096, Some(8192)).mergeable(&e(4096, 10, None)));
        assert!(e(0, 4096, None).mergeable(&e(4096, 10, None)));
        assert!(!e(0, 0, None).mergeable(&e(0, 10, None)));
    }

    #[test]
    fn hex_columns_print_zero_without_prefix() {
        assert_eq!(hex16(0), format!("{:<16}", "0"));
        assert_eq!(hex16(0x20000), format!("{:<16}", "0x20000"));
    }
}
