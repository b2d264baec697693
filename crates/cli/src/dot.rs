//! Graphviz DOT pictures of a backing chain (`strata info --backing-chain
//! --output dot`) and of a domain's snapshot tree (`strata snapshot list
//! DOMAIN --tree --output dot`).
//!
//! Both are drawn from the JSON the same command prints with `--output
//! json`, so that the picture says exactly what the JSON says: one node
//! per image (file name, format, virtual size, disk size) with an edge to
//! its backing file; one node per snapshot (name, state, each disk's
//! overlay file) with an edge from its parent. Render with `dot -Tsvg`.

use std::fmt::Write as _;

use clap::ValueEnum;
use serde_json::Value;

use crate::size::size_to_str;

/// `--output` of `info` and `snapshot list`: text, JSON or a DOT graph.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum GraphOutput {
    /// Text for people, as qemu-img / virsh print it.
    #[default]
    Human,
    /// JSON with qemu-img's keys.
    Json,
    /// A Graphviz DOT digraph.
    Dot,
}

impl GraphOutput {
    /// The text or JSON format (`None` for DOT).
    pub fn plain(self) -> Option<crate::OutputFormat> {
        match self {
            GraphOutput::Human => Some(crate::OutputFormat::Human),
            GraphOutput::Json => Some(crate::OutputFormat::Json),
            GraphOutput::Dot => None,
        }
    }
}

/// A DOT double-quoted string: `"` and `\` escaped, newlines as `\n`
/// (centred line breaks in a label).
pub fn quote(s: &str) -> String {
    let mut q = String::with_capacity(s.len() + 2);
    q.push('"');
    for c in s.chars() {
        match c {
            '"' => q.push_str("\\\""),
            '\\' => q.push_str("\\\\"),
            '\n' => q.push_str("\\n"),
            '\r' => {}
            c => q.push(c),
        }
    }
    q.push('"');
    q
}

fn str_of<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Value::as_str)
}

fn size_of(v: &Value, key: &str) -> String {
    v.get(key)
        .and_then(Value::as_u64)
        .map(size_to_str)
        .unwrap_or_else(|| "unknown".into())
}

/// The chain as a digraph, from `info --backing-chain --output json`
/// (an array, top first) or `info --output json` (one object). Node `n0`
/// is the top; each image has an edge `backing` to the next. A backing
/// file named but not opened (no `--backing-chain`) is a dashed node.
pub fn chain_dot(info: &Value) -> String {
    let images: Vec<&Value> = match info {
        Value::Array(a) => a.iter().collect(),
        v => vec![v],
    };
    let mut out = String::from("digraph chain {\n");
    out.push_str("  rankdir=TB;\n  node [shape=box, fontname=\"monospace\"];\n");
    for (i, img) in images.iter().enumerate() {
        let label = format!(
            "{}\nformat: {}\nvirtual size: {}\ndisk size: {}",
            str_of(img, "filename").unwrap_or("?"),
            str_of(img, "format").unwrap_or("?"),
            size_of(img, "virtual-size"),
            size_of(img, "actual-size"),
        );
        let _ = writeln!(out, "  n{i} [label={}];", quote(&label));
    }
    for i in 1..images.len() {
        let _ = writeln!(out, "  n{} -> n{i} [label=\"backing\"];", i - 1);
    }
    if let Some(last) = images.last() {
        if let Some(b) = str_of(last, "full-backing-filename")
            .or_else(|| str_of(last, "backing-filename"))
            .filter(|_| images.len() == 1)
        {
            let n = images.len();
            let fmt = str_of(last, "backing-filename-format").unwrap_or("?");
            let label = format!("{b}\nformat: {fmt}\n(not opened)");
            let _ = writeln!(out, "  n{n} [label={}, style=dashed];", quote(&label));
            let _ = writeln!(out, "  n{} -> n{n} [label=\"backing\"];", n - 1);
        }
    }
    out.push_str("}\n");
    out
}

/// The snapshot tree as a digraph, from `snapshot list --output json`:
/// a node per snapshot (its name quoted as the node id) with its state,
/// whether it is current and each disk's overlay; an edge from each
/// parent to its children.
pub fn snapshot_tree_dot(list: &Value) -> String {
    let empty = Vec::new();
    let snaps = list.as_array().unwrap_or(&empty);
    let mut out = String::from("digraph snapshots {\n");
    out.push_str("  rankdir=TB;\n  node [shape=box, fontname=\"monospace\"];\n");
    for s in snaps {
        let name = str_of(s, "name").unwrap_or("?");
        let mut label = name.to_string();
        if let Some(state) = str_of(s, "state") {
            let _ = write!(label, "\nstate: {state}");
        }
        if s.get("current").and_then(Value::as_bool) == Some(true) {
            label.push_str("\n(current)");
        }
        for d in s
            .get("disks")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or(&[])
        {
            let disk = str_of(d, "disk").unwrap_or("?");
            let file = str_of(d, "overlay").unwrap_or("(none)");
            let _ = write!(label, "\n{disk}: {file}");
        }
        let style = if s.get("current").and_then(Value::as_bool) == Some(true) {
            ", style=bold"
        } else {
            ""
        };
        let _ = writeln!(out, "  {} [label={}{style}];", quote(name), quote(&label));
    }
    for s in snaps {
        if let (Some(name), Some(parent)) = (str_of(s, "name"), str_of(s, "parent")) {
            let _ = writeln!(out, "  {} -> {};", quote(parent), quote(name));
        }
    }
    out.push_str("}\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quote_escapes_quotes_backslashes_and_newlines() {
        assert_eq!(quote("a\"b\\c\nd"), r#""a\"b\\c\nd""#);
    }

    #[test]
    fn chain_dot_links_each_image_to_its_backing_file() {
        let v = serde_json::json!([
            {"filename": "top.qcow2", "format": "qcow2", "virtual-size": 1048576, "actual-size": 200704},
            {"filename": "base.raw", "format": "raw", "virtual-size": 1048576, "actual-size": 0},
        ]);
        let d = chain_dot(&v);
        assert!(d.starts_with("digraph chain {\n"), "{d}");
        assert!(d.contains("n0 -> n1 [label=\"backing\"]"), "{d}");
        assert!(
            d.contains("top.qcow2\\nformat: qcow2\\nvirtual size: 1 MiB\\ndisk size: 196 KiB"),
            "{d}"
        );
    }

    #[test]
    fn snapshot_tree_dot_draws_parent_edges_and_files() {
        let v = serde_json::json!([
            {"name": "s1", "parent": null, "current": false, "state": "shutoff",
             "disks": [{"disk": "vda", "overlay": "/v/a.s1", "state-file": null}]},
            {"name": "s\"2", "parent": "s1", "current": true, "state": "shutoff", "disks": []},
        ]);
        let d = snapshot_tree_dot(&v);
        assert!(d.contains("\"s1\" -> \"s\\\"2\";"), "{d}");
        assert!(d.contains("vda: /v/a.s1"), "{d}");
        assert!(d.contains("style=bold"), "{d}");
    }
}
