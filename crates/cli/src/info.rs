//! `strata info`: what `qemu-img info` prints, in both output formats.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Result;
use strata_format::header::{Autoclear, Incompatible};
use strata_format::Extension;
use strata_image::{Chain, Image};

use crate::bitmaps::bitmap_infos;
use crate::dot::GraphOutput;
use crate::qjson::{dump_human_dict, to_json_pretty, QDict, QValue};
use crate::size::size_to_str;
use crate::{localtime, open_options, OutputFormat};

/// Arguments of `strata info`.
#[derive(Debug, Clone, clap::Args)]
pub struct InfoArgs {
    /// Image format (qcow2 or raw); probed when omitted.
    #[arg(short = 'f', long = "format")]
    pub format: Option<String>,
    /// Force share: take no locks, tolerate other users of the image.
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// Describe every image of the backing chain.
    #[arg(long = "backing-chain")]
    pub backing_chain: bool,
    /// Output format (dot: a Graphviz graph of the chain).
    #[arg(long = "output", value_enum, default_value_t)]
    pub output: GraphOutput,
    /// The image.
    pub file: PathBuf,
}

/// QEMU's `path_combine`: a relative backing name is taken relative to the
/// directory part of the name of the image that records it, by string
/// concatenation (no normalisation), so that Strata prints the same names.
pub fn path_combine(base: &str, name: &str) -> String {
    if name.starts_with('/') || strata_image::chain::is_protocol_name(name) {
        return name.to_string();
    }
    match base.rfind('/') {
        Some(i) => format!("{}{}", &base[..=i], name),
        None => name.to_string(),
    }
}

/// The `children` list: the protocol node (`file`) under a format node.
fn file_child(filename: &str, image: &Image) -> Result<QValue> {
    let st = image.storage();
    // QEMU's block layer counts whole 512-byte sectors.
    let len = st
        .len()
        .map_err(|e| anyhow::anyhow!("{filename}: cannot read the file size: {e}"))?
        .div_ceil(512)
        .saturating_mul(512);
    let alloc = st
        .allocated_bytes()
        .map_err(|e| anyhow::anyhow!("{filename}: cannot read the allocated size: {e}"))?;
    let mut fs = QDict::new();
    fs.put("type", "file");
    fs.put("data", QDict::new());
    let mut info = QDict::new();
    info.put("filename", filename);
    info.put("format", "file");
    info.put("dirty-flag", false);
    info.put("actual-size", alloc);
    info.put("virtual-size", len);
    info.put("format-specific", fs);
    info.put("children", QValue::List(vec![]));
    let mut child = QDict::new();
    child.put("name", "file");
    child.put("info", info);
    Ok(QValue::List(vec![QValue::Dict(child)]))
}

/// The qcow2 `format-specific` dictionary.
fn qcow2_specific(q: &strata_image::Qcow2Image) -> Result<QDict> {
    let h = q.header();
    let mut data = QDict::new();
    if h.version() == 2 {
        data.put("compat", "0.10");
        data.put("refcount-bits", h.refcount_bits());
    } else {
        data.put("compat", "1.1");
        if let Some(name) = h.extensions().iter().find_map(|e| match e {
            Extension::DataFile(n) => Some(n.clone()),
            _ => None,
        }) {
            data.put("data-file", name);
        }
        if h.incompatible_features()
            .contains(Incompatible::EXTERNAL_DATA)
        {
            data.put(
                "data-file-raw",
                h.autoclear_features().contains(Autoclear::DATA_FILE_RAW),
            );
        }
        data.put("extended-l2", h.extended_l2());
        data.put("lazy-refcounts", h.lazy_refcounts());
        data.put("corrupt", h.corrupt());
        data.put("refcount-bits", h.refcount_bits());
        if let Some(bitmaps) = bitmap_infos(q)? {
            let list = bitmaps
                .into_iter()
                .map(|b| {
                    let mut d = QDict::new();
                    d.put("name", b.name);
                    d.put("granularity", b.granularity);
                    d.put(
                        "flags",
                        QValue::List(b.flags.into_iter().map(QValue::from).collect()),
                    );
                    QValue::Dict(d)
                })
                .collect::<Vec<_>>();
            data.put("bitmaps", QValue::List(list));
        }
    }
    // compression_type is not optional in QAPI: v2 images show "zlib" too.
    data.put("compression-type", h.compression_type().name());
    let mut spec = QDict::new();
    spec.put("type", "qcow2");
    spec.put("data", data);
    Ok(spec)
}

/// The `BlockGraphInfo` QEMU builds for one image opened alone.
pub fn image_info(filename: &str, image: &Image) -> Result<QDict> {
    let st = image.storage();
    let alloc = st
        .allocated_bytes()
        .map_err(|e| anyhow::anyhow!("{filename}: cannot read the allocated size: {e}"))?;
    let mut d = QDict::new();
    d.put("filename", filename);
    d.put("format", image.format().name());
    let dirty = image.as_qcow2().is_some_and(|q| q.header().dirty());
    d.put("dirty-flag", dirty);
    d.put("actual-size", alloc);
    d.put("virtual-size", image.virtual_size());
    if let Some(q) = image.as_qcow2() {
        d.put("cluster-size", q.header().cluster_size());
        let (backing, backing_fmt) = image.backing();
        if let Some(b) = backing {
            d.put("backing-filename", b);
            d.put("full-backing-filename", path_combine(filename, b));
            if let Some(f) = backing_fmt {
                d.put("backing-filename-format", f);
            }
        }
        if !q.snapshots().is_empty() {
            let list = q
                .snapshots()
                .iter()
                .map(|s| {
                    let mut sd = QDict::new();
                    sd.put("id", s.id.as_str());
                    sd.put("name", s.name.as_str());
                    sd.put("vm-state-size", s.vm_state_size);
                    sd.put("date-sec", u64::from(s.date_sec));
                    sd.put("date-nsec", u64::from(s.date_nsec));
                    sd.put("vm-clock-sec", s.vm_clock_nsec / 1_000_000_000);
                    sd.put("vm-clock-nsec", s.vm_clock_nsec % 1_000_000_000);
                    if let Some(ic) = s.icount.filter(|&i| i != u64::MAX) {
                        sd.put("icount", ic);
                    }
                    QValue::Dict(sd)
                })
                .collect();
            d.put("snapshots", QValue::List(list));
        }
        d.put("format-specific", qcow2_specific(q)?);
    }
    d.put("children", file_child(filename, image)?);
    Ok(d)
}

fn int(d: &QDict, key: &str) -> Option<i64> {
    match d.get(key) {
        Some(QValue::Int(i)) => Some(*i),
        _ => None,
    }
}
fn string<'a>(d: &'a QDict, key: &str) -> Option<&'a str> {
    match d.get(key) {
        Some(QValue::Str(s)) => Some(s),
        _ => None,
    }
}

/// QEMU's `bdrv_node_info_dump`.
fn dump_node(out: &mut String, d: &QDict, indent: usize, protocol: bool) {
    use std::fmt::Write as _;
    let ind = " ".repeat(indent);
    let vsize = int(d, "virtual-size").unwrap_or(0);
    let dsize = match int(d, "actual-size") {
        Some(a) => size_to_str(a as u64),
        None => "unavailable".to_string(),
    };
    let _ = writeln!(
        out,
        "{ind}{}: {}",
        if protocol { "filename" } else { "image" },
        string(d, "filename").unwrap_or("")
    );
    let _ = writeln!(
        out,
        "{ind}{}: {}",
        if protocol {
            "protocol type"
        } else {
            "file format"
        },
        string(d, "format").unwrap_or("")
    );
    let _ = writeln!(
        out,
        "{ind}{}: {} ({vsize} bytes)",
        if protocol {
            "file length"
        } else {
            "virtual size"
        },
        size_to_str(vsize as u64)
    );
    let _ = writeln!(out, "{ind}disk size: {dsize}");
    if let Some(cs) = int(d, "cluster-size") {
        let _ = writeln!(out, "{ind}cluster_size: {cs}");
    }
    if d.get("dirty-flag") == Some(&QValue::Bool(true)) {
        let _ = writeln!(out, "{ind}cleanly shut down: no");
    }
    if let Some(b) = string(d, "backing-filename") {
        let _ = write!(out, "{ind}backing file: {b}");
        match string(d, "full-backing-filename") {
            None => out.push_str(" (cannot determine actual path)"),
            Some(full) if full != b => {
                let _ = write!(out, " (actual path: {full})");
            }
            Some(_) => {}
        }
        out.push('\n');
        if let Some(f) = string(d, "backing-filename-format") {
            let _ = writeln!(out, "{ind}backing file format: {f}");
        }
    }
    if let Some(QValue::List(snaps)) = d.get("snapshots") {
        let _ = writeln!(out, "{ind}Snapshot list:");
        let _ = writeln!(
            out,
            "{ind}{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}",
            "ID", "TAG", "VM_SIZE", "DATE", "VM_CLOCK", "ICOUNT"
        );
        for s in snaps {
            let QValue::Dict(s) = s else { continue };
            let secs = int(s, "vm-clock-sec").unwrap_or(0);
            let nsec = int(s, "vm-clock-nsec").unwrap_or(0);
            let clock = format!(
                "{:04}:{:02}:{:02}.{:03}",
                secs / 3600,
                (secs / 60) % 60,
                secs % 60,
                nsec / 1_000_000
            );
            let icount = int(s, "icount").map(|i| i.to_string()).unwrap_or_default();
            let date = localtime::format_local(int(s, "date-sec").unwrap_or(0));
            let _ = writeln!(
                out,
                "{ind}{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}",
                string(s, "id").unwrap_or(""),
                string(s, "name").unwrap_or(""),
                size_to_str(int(s, "vm-state-size").unwrap_or(0) as u64),
                date,
                clock,
                icount
            );
        }
    }
    if let Some(QValue::Dict(fs)) = d.get("format-specific") {
        if let Some(QValue::Dict(data)) = fs.get("data") {
            if !data.is_empty() {
                let _ = writeln!(out, "{ind}Format specific information:");
                dump_human_dict(out, indent + 4, data);
            }
        }
    }
}

/// QEMU's `dump_human_image_info`: the node, then its children.
fn dump_human(out: &mut String, d: &QDict, level: usize, path: Option<&str>) {
    use std::fmt::Write as _;
    dump_node(out, d, level * 4, path.is_some());
    if let Some(QValue::List(children)) = d.get("children") {
        for c in children {
            let QValue::Dict(c) = c else { continue };
            let name = string(c, "name").unwrap_or("");
            let _ = writeln!(
                out,
                "{:w$}Child node '{}{name}':",
                "",
                path.unwrap_or("/"),
                w = level * 4
            );
            if let Some(QValue::Dict(info)) = c.get("info") {
                let child_path = format!("{}{name}/", path.unwrap_or("/"));
                dump_human(out, info, level + 1, Some(&child_path));
            }
        }
    }
}

/// Runs `strata info`.
pub fn run(args: &InfoArgs, out: &mut dyn Write) -> Result<i32> {
    run_noting(args, out, &mut std::io::sink())
}

/// Backing files of `chain` (and, when only the top is open, the file its
/// backing name resolves to) that lie outside the directory tree of the top
/// image: (name as recorded, where it resolves). Such a name climbs out
/// (`../..`) or is absolute elsewhere; `commit` would write there.
pub fn members_outside_top_tree(chain: &Chain) -> Vec<(String, PathBuf)> {
    let top = chain.top();
    let Some(top_dir) = std::fs::canonicalize(&top.path)
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
    else {
        return Vec::new();
    };
    let mut members: Vec<(String, PathBuf)> = chain
        .layers()
        .iter()
        .skip(1)
        .map(|l| (l.named_as.clone().unwrap_or_default(), l.path.clone()))
        .collect();
    if chain.layers().len() == 1 {
        if let (Some(name), _) = top.image.backing() {
            if !strata_image::chain::is_protocol_name(name) {
                members.push((
                    name.to_string(),
                    strata_image::chain::resolve_backing_path(&top.path, name),
                ));
            }
        }
    }
    members
        .into_iter()
        .filter_map(|(name, path)| {
            let real = std::fs::canonicalize(&path).ok()?;
            (!real.starts_with(&top_dir)).then_some((name, real))
        })
        .collect()
}

/// `info --output dot`: the chain as a Graphviz digraph, drawn from the
/// JSON `--output json` prints (see [`crate::dot::chain_dot`]).
pub fn run_dot(args: &InfoArgs, out: &mut dyn Write, err: &mut dyn Write) -> Result<i32> {
    let json_args = InfoArgs {
        output: GraphOutput::Json,
        ..args.clone()
    };
    let mut json = Vec::new();
    run_noting(&json_args, &mut json, err)?;
    let v: serde_json::Value = serde_json::from_slice(&json)?;
    out.write_all(crate::dot::chain_dot(&v).as_bytes())?;
    Ok(0)
}

/// [`run`], with notes for people on `err`: a chain member outside the
/// top image's directory tree. The output itself stays qemu-img's.
pub fn run_noting(args: &InfoArgs, out: &mut dyn Write, err: &mut dyn Write) -> Result<i32> {
    let Some(output) = args.output.plain() else {
        return run_dot(args, out, err);
    };
    let mut opts = open_options(args.format.as_deref(), args.force_share)?;
    opts.no_backing = !args.backing_chain;
    // --backing-chain reads every layer's header: as deep as qemu-img goes.
    opts.depth_limit = Some(strata_image::READ_CHAIN_DEPTH);
    // As qemu-img info: an external data file is not needed.
    opts.without_data_file = true;
    let chain = Chain::open(&args.file, &opts)?;
    for (name, real) in members_outside_top_tree(&chain) {
        writeln!(
            err,
            "strata: note: backing file {name:?} is {}, outside the directory tree of {}",
            real.display(),
            args.file.display()
        )?;
    }
    let mut infos = Vec::new();
    let mut name = args.file.to_string_lossy().into_owned();
    for (i, layer) in chain.layers().iter().enumerate() {
        if i > 0 {
            name = path_combine(&name, layer.named_as.as_deref().unwrap_or(""));
        }
        infos.push(image_info(&name, &layer.image)?);
    }
    let mut text = String::new();
    match output {
        OutputFormat::Json => {
            let v = if args.backing_chain {
                QValue::List(infos.into_iter().map(QValue::Dict).collect())
            } else {
                infos
                    .into_iter()
                    .next()
                    .map(QValue::Dict)
                    .unwrap_or(QValue::Dict(QDict::new()))
            };
            text = to_json_pretty(&v);
            text.push('\n');
        }
        OutputFormat::Human => {
            for (i, d) in infos.iter().enumerate() {
                if i > 0 {
                    text.push('\n');
                }
                dump_human(&mut text, d, 0, None);
            }
        }
    }
    out.write_all(text.as_bytes())?;
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backing_names_combine_like_qemu() {
        assert_eq!(path_combine("top.qcow2", "base.qcow2"), "base.qcow2");
        assert_eq!(path_combine("./top.qcow2", "../b/base"), "./../b/base");
        assert_eq!(path_combine("d/sub/top", "../base"), "d/sub/../base");
        assert_eq!(path_combine("d/top", "/abs/base"), "/abs/base");
    }
}
