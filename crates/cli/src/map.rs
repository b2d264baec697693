//! `strata map`: the chain's extents as `qemu-img map` prints them.
//!
//! The extents and QEMU's rules for depth, present, zero, data and offset
//! are strata-image's block status ([`Chain::block_status`]); this module
//! merges neighbouring extents as qemu-img does and prints them.

use std::fmt::Write as _;
use std::io::Write;

use anyhow::Result;
use strata_image::{BlockStatus, Chain};

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

impl From<BlockStatus> for MapEntry {
    fn from(s: BlockStatus) -> MapEntry {
        MapEntry {
            start: s.start,
            length: s.length,
            depth: s.depth as u64,
            present: s.allocated,
            zero: s.zero,
            data: s.data,
            compressed: s.compressed,
            offset: s.offset,
        }
    }
}

/// The chain's merged map entries, as qemu-img prints them.
pub fn map_entries(chain: &Chain) -> Result<Vec<MapEntry>> {
    let size = chain.virtual_size();
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
    for s in chain.block_status(0, size) {
        let e = MapEntry::from(s?);
        match merged.last_mut() {
            Some(last) if last.mergeable(&e) => last.length += e.length,
            _ => merged.push(e),
        }
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

/// The files the human map names for data: a layer's external data file
/// (as it was opened, as qemu-img shows it) in place of the layer.
fn data_file_names(mut names: Vec<String>, chain: &Chain) -> Vec<String> {
    for (name, l) in names.iter_mut().zip(chain.layers()) {
        if let Some(d) = l.image.as_qcow2().and_then(|q| q.data_file()) {
            *name = d.path().to_string_lossy().into_owned();
        }
    }
    names
}

/// Runs `strata map`.
pub fn run(args: &MapArgs, out: &mut dyn Write) -> Result<i32> {
    let mut opts = open_options(args.format.as_deref(), args.force_share)?;
    // Map reads every layer: chains as deep as qemu-img maps open.
    opts.depth_limit = Some(strata_image::READ_CHAIN_DEPTH);
    let chain = Chain::open(&args.file, &opts)?;
    let entries = map_entries(&chain)?;
    match args.output {
        MapOutput::Json => out.write_all(entries_json(&entries).as_bytes())?,
        MapOutput::Svg => out.write_all(
            crate::svg::render(&chain, &layer_names(args, &chain), &entries)?.as_bytes(),
        )?,
        MapOutput::Human => {
            let names = data_file_names(layer_names(args, &chain), &chain);
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
