//! Values printed the way QEMU prints its QObjects.
//!
//! `qemu-img info --output json` serialises a QDict, whose keys come out in
//! hash-bucket order (QEMU's `tdb_hash` modulo 512, newest first within a
//! bucket), not in insertion order. Scripts diff that output, so Strata
//! prints the same bytes: the same key order, the same pretty-printing
//! (four-space indent, empty containers split over two lines) and the same
//! string escapes. The human `Format specific information:` block walks the
//! same order.

use std::fmt::Write as _;

/// A QObject: what QEMU's QAPI output visitor builds.
#[derive(Debug, Clone, PartialEq)]
pub enum QValue {
    /// A signed integer (QNum).
    Int(i64),
    /// An unsigned integer (QNum; sizes beyond i64 do not occur, but keep them exact).
    UInt(u64),
    /// A boolean (QBool).
    Bool(bool),
    /// A string (QString).
    Str(String),
    /// A list (QList), in order.
    List(Vec<QValue>),
    /// A dictionary (QDict), keys in insertion (QAPI field) order; printed
    /// in QDict order.
    Dict(QDict),
}

/// A QDict under construction: keys in insertion order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct QDict {
    entries: Vec<(String, QValue)>,
}

/// QEMU's number of QDict hash buckets (`QDICT_BUCKET_MAX`).
const QDICT_BUCKETS: u32 = 512;

/// QEMU's `tdb_hash` (qobject/qdict.c), the bucket a key lands in.
fn qdict_bucket(key: &str) -> u32 {
    let mut value: u32 = 0x238F_13AFu32.wrapping_mul(key.len() as u32);
    for (i, &c) in key.as_bytes().iter().enumerate() {
        value = value.wrapping_add(u32::from(c) << ((i * 5) % 24));
    }
    1_103_515_243u32.wrapping_mul(value).wrapping_add(12345) % QDICT_BUCKETS
}

impl QDict {
    /// An empty dictionary.
    pub fn new() -> QDict {
        QDict::default()
    }
    /// Adds (or replaces) `key`.
    pub fn put(&mut self, key: &str, value: impl Into<QValue>) -> &mut QDict {
        let value = value.into();
        self.entries.retain(|(k, _)| k != key);
        self.entries.push((key.to_string(), value));
        self
    }
    /// Looks a key up.
    pub fn get(&self, key: &str) -> Option<&QValue> {
        self.entries.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }
    /// Whether the dictionary has no keys.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
    /// The entries in the order QEMU iterates them: by bucket, and inside
    /// a bucket newest first (QEMU inserts at the head of the bucket list).
    pub fn iter_qemu_order(&self) -> Vec<(&str, &QValue)> {
        let mut v: Vec<(usize, &str, &QValue)> = self
            .entries
            .iter()
            .enumerate()
            .map(|(i, (k, v))| (i, k.as_str(), v))
            .collect();
        v.sort_by_key(|(i, k, _)| (qdict_bucket(k), std::cmp::Reverse(*i)));
        v.into_iter().map(|(_, k, v)| (k, v)).collect()
    }
}

impl From<i64> for QValue {
    fn from(v: i64) -> QValue {
        QValue::Int(v)
    }
}
impl From<u64> for QValue {
    fn from(v: u64) -> QValue {
        match i64::try_from(v) {
            Ok(i) => QValue::Int(i),
            Err(_) => QValue::UInt(v),
        }
    }
}
impl From<u32> for QValue {
    fn from(v: u32) -> QValue {
        QValue::Int(i64::from(v))
    }
}
impl From<bool> for QValue {
    fn from(v: bool) -> QValue {
        QValue::Bool(v)
    }
}
impl From<&str> for QValue {
    fn from(v: &str) -> QValue {
        QValue::Str(v.to_string())
    }
}
impl From<String> for QValue {
    fn from(v: String) -> QValue {
        QValue::Str(v)
    }
}
impl From<QDict> for QValue {
    fn from(v: QDict) -> QValue {
        QValue::Dict(v)
    }
}
impl From<Vec<QValue>> for QValue {
    fn from(v: Vec<QValue>) -> QValue {
        QValue::List(v)
    }
}

/// Appends `s` as a JSON string the way QEMU's `to_json` does: printable
/// ASCII as is, the usual short escapes, everything else as `\uXXXX`
/// (upper-case hex, surrogate pairs beyond the BMP).
fn push_json_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (' '..'\u{7f}').contains(&c) => out.push(c),
            c => {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{:04X}", u);
                }
            }
        }
    }
    out.push('"');
}

fn push_indent(out: &mut String, level: usize) {
    for _ in 0..level {
        out.push_str("    ");
    }
}

fn push_pretty(out: &mut String, v: &QValue, level: usize) {
    match v {
        QValue::Int(i) => {
            let _ = write!(out, "{i}");
        }
        QValue::UInt(u) => {
            let _ = write!(out, "{u}");
        }
        QValue::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        QValue::Str(s) => push_json_string(out, s),
        QValue::List(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push('\n');
                push_indent(out, level + 1);
                push_pretty(out, item, level + 1);
            }
            out.push('\n');
            push_indent(out, level);
            out.push(']');
        }
        QValue::Dict(d) => {
            out.push('{');
            for (i, (k, item)) in d.iter_qemu_order().into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push('\n');
                push_indent(out, level + 1);
                push_json_string(out, k);
                out.push_str(": ");
                push_pretty(out, item, level + 1);
            }
            out.push('\n');
            push_indent(out, level);
            out.push('}');
        }
    }
}

/// `qobject_to_json_pretty`: the text qemu-img prints (without the final
/// newline).
pub fn to_json_pretty(v: &QValue) -> String {
    let mut out = String::new();
    push_pretty(&mut out, v, 0);
    out
}

fn is_composite(v: &QValue) -> bool {
    matches!(v, QValue::List(_) | QValue::Dict(_))
}

fn push_human_scalar(out: &mut String, v: &QValue) {
    match v {
        QValue::Int(i) => {
            let _ = writeln!(out, "{i}");
        }
        QValue::UInt(u) => {
            let _ = writeln!(out, "{u}");
        }
        QValue::Bool(b) => {
            let _ = writeln!(out, "{b}");
        }
        QValue::Str(s) => {
            let _ = writeln!(out, "{s}");
        }
        QValue::List(_) | QValue::Dict(_) => {}
    }
}

/// QEMU's `dump_qdict` (block/qapi.c): the human rendering of a
/// format-specific dictionary, keys with `-` shown as spaces.
pub fn dump_human_dict(out: &mut String, indent: usize, d: &QDict) {
    for (k, v) in d.iter_qemu_order() {
        let key = k.replace('-', " ");
        let _ = write!(out, "{:indent$}{key}:", "");
        if is_composite(v) {
            out.push('\n');
            dump_human_value(out, indent + 4, v);
        } else {
            out.push(' ');
            push_human_scalar(out, v);
        }
    }
}

fn dump_human_value(out: &mut String, indent: usize, v: &QValue) {
    match v {
        QValue::Dict(d) => dump_human_dict(out, indent, d),
        QValue::List(items) => {
            for (i, item) in items.iter().enumerate() {
                let _ = write!(out, "{:indent$}[{i}]:", "");
                if is_composite(item) {
                    out.push('\n');
                    dump_human_value(out, indent + 4, item);
                } else {
                    out.push(' ');
                    push_human_scalar(out, item);
                }
            }
        }
        scalar => push_human_scalar(out, scalar),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_come_out_in_qemu_hash_order() {
        // Insertion order as QAPI's BlockNodeInfo declares the fields.
        let mut d = QDict::new();
        for k in [
            "filename",
            "format",
            "dirty-flag",
            "actual-size",
            "virtual-size",
            "cluster-size",
            "backing-filename",
            "full-backing-filename",
            "backing-filename-format",
            "format-specific",
            "children",
        ] {
            d.put(k, 0u32);
        }
        let order: Vec<&str> = d.iter_qemu_order().into_iter().map(|(k, _)| k).collect();
        // As qemu-img 10 prints them.
        assert_eq!(
            order,
            [
                "children",
                "backing-filename-format",
                "virtual-size",
                "filename",
                "cluster-size",
                "format",
                "actual-size",
                "format-specific",
                "full-backing-filename",
                "backing-filename",
                "dirty-flag"
            ]
        );
    }

    #[test]
    fn empty_containers_print_over_two_lines() {
        let mut d = QDict::new();
        d.put("data", QDict::new());
        d.put("children", QValue::List(vec![]));
        assert_eq!(
            to_json_pretty(&QValue::Dict(d)),
            "{\n    \"children\": [\n    ],\n    \"data\": {\n    }\n}"
        );
    }

    #[test]
    fn strings_escape_like_qemu() {
        let mut s = String::new();
        push_json_string(&mut s, "a\"b\\c\né\u{1F600}/");
        assert_eq!(s, "\"a\\\"b\\\\c\\n\\u00E9\\uD83D\\uDE00/\"");
    }
}
