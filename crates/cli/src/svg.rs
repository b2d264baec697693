//! `strata map --output svg`: the chain as a picture.
//!
//! The virtual disk runs left to right. One strip per layer, top image
//! first, shows what that layer alone holds (data, compressed, zero,
//! unallocated, or nothing past the end of a short backing file); the bottom
//! strip shows which layer answers reads (the `depth` of `strata map`).
//!
//! The disk is aggregated into at most [`COLUMNS`] columns of one pixel, each
//! covering an equal share of the disk, so a TiB disk draws as fast as a MiB
//! one (the work is one pass over each layer's extents). A column shows the
//! most significant thing anywhere in it: in a layer strip data over
//! compressed over zero over unallocated over past-the-end, in the answer
//! strip the highest layer that answers any byte of it. A single 4 KiB write
//! into a TiB disk is so still visible. Runs of equal columns are one
//! `<rect>`, which carries `data-kind` (layer strips) or `data-depth` (answer
//! strip, absent where no layer allocates the range) for tools and tests.

use std::fmt::Write as _;

use anyhow::Result;
use strata_image::{Chain, Layer, Mapping};

use crate::map::MapEntry;
use crate::size::size_to_str;

/// The drawing's width in columns (pixels) for disks at least that large.
pub const COLUMNS: u64 = 800;

const LABEL_WIDTH: u64 = 260;
const MARGIN: u64 = 10;
const STRIP: u64 = 18;
const GAP: u64 = 6;

/// What one layer holds in a range, in rising order of significance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    /// Beyond the end of this (shorter) layer.
    PastEnd,
    /// Not allocated here: reads fall through to the layer below.
    Unallocated,
    /// Reads as zeros (a zero cluster, or a hole in a raw file).
    Zero,
    /// Data in compressed clusters.
    Compressed,
    /// Data.
    Data,
}

impl Kind {
    /// All kinds, in the legend's order.
    pub const ALL: [Kind; 5] = [
        Kind::Data,
        Kind::Compressed,
        Kind::Zero,
        Kind::Unallocated,
        Kind::PastEnd,
    ];

    /// The name used in `data-kind` and in the legend.
    pub fn name(self) -> &'static str {
        match self {
            Kind::PastEnd => "past-end",
            Kind::Unallocated => "unallocated",
            Kind::Zero => "zero",
            Kind::Compressed => "compressed",
            Kind::Data => "data",
        }
    }

    fn colour(self) -> &'static str {
        match self {
            Kind::PastEnd => "#ffffff",
            Kind::Unallocated => "#e6e6e6",
            Kind::Zero => "#f2d16b",
            Kind::Compressed => "#8e5cc4",
            Kind::Data => "#2f6fd0",
        }
    }
}

/// Who answers a column: the highest layer answering any byte of it, or
/// `None` when no layer allocates any of it (it reads as zeros).
pub type Answer = Option<u64>;

/// The number of columns for a disk of `size` bytes.
pub fn columns(size: u64) -> u64 {
    size.clamp(1, COLUMNS)
}

/// Guest bytes `[start, end)` of column `c` of `cols` over `size` bytes.
pub fn column_range(c: u64, cols: u64, size: u64) -> (u64, u64) {
    let at = |c: u64| (u128::from(size) * u128::from(c) / u128::from(cols)) as u64;
    (at(c), at(c + 1))
}

/// The columns that bytes `[start, end)` (not empty) touch.
fn touched(start: u64, end: u64, cols: u64, size: u64) -> std::ops::RangeInclusive<u64> {
    let col = |b: u64| (u128::from(b) * u128::from(cols) / u128::from(size)) as u64;
    col(start)..=col(end - 1).min(cols - 1)
}

/// What `layer` alone holds, column by column, over a disk of `size` bytes.
pub fn layer_columns(layer: &Layer, size: u64) -> Result<Vec<Kind>> {
    let cols = columns(size);
    let mut out = vec![Kind::PastEnd; cols as usize];
    let own = layer.image.virtual_size().min(size);
    let mut pos = 0;
    while pos < own {
        let e = layer.image.map(pos, own - pos)?;
        let len = e.len.min(own - pos);
        if len == 0 {
            anyhow::bail!("internal error: empty extent at guest offset {pos:#x}");
        }
        let kind = match e.mapping {
            Mapping::Unallocated => Kind::Unallocated,
            Mapping::Zero { .. } => Kind::Zero,
            Mapping::Data { .. } => Kind::Data,
            Mapping::Compressed(_) => Kind::Compressed,
        };
        for c in touched(pos, pos + len, cols, size) {
            let k = &mut out[c as usize];
            *k = (*k).max(kind);
        }
        pos += len;
    }
    Ok(out)
}

/// Who answers, column by column, from `strata map`'s entries.
pub fn answer_columns(entries: &[MapEntry], size: u64) -> Vec<Answer> {
    let cols = columns(size);
    // `None` loses to any layer, a higher layer (smaller depth) wins.
    let rank = |a: Answer| a.map_or(0, |d| u64::MAX - d);
    let mut out: Vec<Answer> = vec![None; cols as usize];
    for e in entries.iter().filter(|e| e.length > 0) {
        let end = (e.start + e.length).min(size);
        if e.start >= end {
            continue;
        }
        let a = e.present.then_some(e.depth);
        for c in touched(e.start, end, cols, size) {
            let cur = &mut out[c as usize];
            if rank(a) > rank(*cur) {
                *cur = a;
            }
        }
    }
    out
}

/// The colour of layer `depth` of `layers` in the answer strip.
fn layer_colour(depth: u64, layers: u64) -> String {
    let hue = if layers <= 1 {
        210
    } else {
        (depth * 300 / (layers - 1) + 210) % 360
    };
    format!("hsl({hue},65%,50%)")
}

fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for ch in s.chars() {
        match ch {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            // Not allowed in XML 1.0 at all.
            c if (c as u32) < 0x20 && !matches!(c, '\t' | '\n' | '\r') => out.push('?'),
            c => out.push(c),
        }
    }
    out
}

/// Runs of equal values: (first column, count, value).
fn runs<T: Copy + PartialEq>(v: &[T]) -> Vec<(u64, u64, T)> {
    let mut out: Vec<(u64, u64, T)> = Vec::new();
    for (i, &x) in v.iter().enumerate() {
        match out.last_mut() {
            Some((_, n, y)) if *y == x => *n += 1,
            _ => out.push((i as u64, 1, x)),
        }
    }
    out
}

/// The SVG picture of `chain` whose map is `entries`; `names` are the
/// layers' names as `strata map` shows them (top first).
pub fn render(chain: &Chain, names: &[String], entries: &[MapEntry]) -> Result<String> {
    let size = chain.virtual_size();
    let layers = chain.layers();
    let nlayers = layers.len() as u64;
    let cols = columns(size);
    let per_col = size.div_ceil(cols);
    let x0 = MARGIN + LABEL_WIDTH;
    let width = x0 + cols.max(360) + MARGIN;
    let top = MARGIN + 24;
    let strip_y = |i: u64| top + i * (STRIP + GAP);
    let answer_y = strip_y(nlayers) + GAP;
    let axis_y = answer_y + STRIP + 14;
    let legend_y = axis_y + 24;
    let legend_rows = 2 + nlayers.div_ceil(3);
    let height = legend_y + legend_rows * 20 + 20 + MARGIN;

    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">"#
    );
    let top_name = names.first().map_or("", String::as_str);
    let _ = writeln!(s, "<title>strata map {}</title>", escape(top_name));
    let _ = writeln!(
        s,
        r#"<text x="{MARGIN}" y="{}" font-size="14">{} — {} layers, {} ({} bytes)</text>"#,
        MARGIN + 12,
        escape(top_name),
        nlayers,
        escape(&size_to_str(size)),
        size
    );

    // One strip per layer, top first.
    for (depth, layer) in layers.iter().enumerate() {
        let kinds = layer_columns(layer, size)?;
        let y = strip_y(depth as u64);
        let name = names.get(depth).map_or("", String::as_str);
        let _ = writeln!(
            s,
            r#"<g class="layer" data-depth="{depth}" data-file="{}">"#,
            escape(name)
        );
        let _ = writeln!(
            s,
            r#"<text x="{MARGIN}" y="{}">{depth}: {}</text>"#,
            y + 13,
            escape(&short_name(name, 38))
        );
        for (c, n, k) in runs(&kinds) {
            let _ = writeln!(
                s,
                r#"<rect x="{}" y="{y}" width="{n}" height="{STRIP}" fill="{}" data-kind="{}"/>"#,
                x0 + c,
                k.colour(),
                k.name()
            );
        }
        let _ = writeln!(
            s,
            r##"<rect x="{x0}" y="{y}" width="{cols}" height="{STRIP}" fill="none" stroke="#999"/>"##
        );
        s.push_str("</g>\n");
    }

    // Who answers reads.
    let answers = answer_columns(entries, size);
    let _ = writeln!(s, r#"<g class="answer">"#);
    let _ = writeln!(
        s,
        r#"<text x="{MARGIN}" y="{}" font-weight="bold">answers reads</text>"#,
        answer_y + 13
    );
    for (c, n, a) in runs(&answers) {
        let (fill, attr) = match a {
            Some(d) => (layer_colour(d, nlayers), format!(r#" data-depth="{d}""#)),
            None => (Kind::Unallocated.colour().to_string(), String::new()),
        };
        let _ = writeln!(
            s,
            r#"<rect x="{}" y="{answer_y}" width="{n}" height="{STRIP}" fill="{fill}"{attr}/>"#,
            x0 + c
        );
    }
    let _ = writeln!(
        s,
        r##"<rect x="{x0}" y="{answer_y}" width="{cols}" height="{STRIP}" fill="none" stroke="#333"/>"##
    );
    s.push_str("</g>\n");

    // Guest offsets under the strips.
    s.push_str("<g class=\"axis\">\n");
    for q in 0..=4u64 {
        let x = x0 + cols * q / 4;
        let at = (u128::from(size) * u128::from(q) / 4) as u64;
        let anchor = match q {
            0 => "start",
            4 => "end",
            _ => "middle",
        };
        let _ = writeln!(
            s,
            r##"<line x1="{x}" y1="{}" x2="{x}" y2="{}" stroke="#333"/><text x="{x}" y="{}" text-anchor="{anchor}">{}</text>"##,
            answer_y + STRIP,
            answer_y + STRIP + 4,
            axis_y,
            escape(&size_to_str(at))
        );
    }
    s.push_str("</g>\n");

    // Legend: the kinds, the layers' colours, and how columns aggregate.
    s.push_str("<g class=\"legend\">\n");
    let mut x = MARGIN;
    for k in Kind::ALL {
        let _ = writeln!(
            s,
            r##"<rect x="{x}" y="{}" width="12" height="12" fill="{}" stroke="#999" data-kind="{}"/><text x="{}" y="{}">{}</text>"##,
            legend_y,
            k.colour(),
            k.name(),
            x + 16,
            legend_y + 11,
            k.name()
        );
        x += 110;
    }
    let _ = writeln!(
        s,
        r##"<rect x="{x}" y="{legend_y}" width="12" height="12" fill="{}" stroke="#333"/><text x="{}" y="{}">answer: no layer (reads zeros)</text>"##,
        Kind::Unallocated.colour(),
        x + 16,
        legend_y + 11
    );
    for depth in 0..nlayers {
        let row = 1 + depth / 3;
        let x = MARGIN + (depth % 3) * 350;
        let y = legend_y + row * 20;
        let name = names.get(depth as usize).map_or("", String::as_str);
        let _ = writeln!(
            s,
            r#"<rect x="{x}" y="{y}" width="12" height="12" fill="{}" data-depth="{depth}"/><text x="{}" y="{}">answered by {depth}: {}</text>"#,
            layer_colour(depth, nlayers),
            x + 16,
            y + 11,
            escape(&short_name(name, 36))
        );
    }
    let _ = writeln!(
        s,
        r#"<text class="aggregation" x="{MARGIN}" y="{}">{cols} columns of at most {per_col} bytes ({}) each. A column shows the most significant kind in it<tspan x="{MARGIN}" dy="15">(data &gt; compressed &gt; zero &gt; unallocated &gt; past-end), and the highest layer that answers any byte of it.</tspan></text>"#,
        legend_y + legend_rows * 20 + 4,
        escape(&size_to_str(per_col))
    );
    s.push_str("</g>\n</svg>\n");
    Ok(s)
}

/// `name`, shortened in the middle to at most `max` characters.
fn short_name(name: &str, max: usize) -> String {
    let chars: Vec<char> = name.chars().collect();
    if chars.len() <= max {
        return name.to_string();
    }
    let keep = max.saturating_sub(1);
    let head = keep / 3;
    let tail = keep - head;
    let mut s: String = chars[..head].iter().collect();
    s.push('…');
    s.extend(&chars[chars.len() - tail..]);
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(start: u64, length: u64, depth: u64, present: bool) -> MapEntry {
        MapEntry {
            start,
            length,
            depth,
            present,
            zero: false,
            data: present,
            compressed: false,
            offset: None,
        }
    }

    #[test]
    fn columns_split_the_disk_evenly_and_cover_it() {
        let size = (1u64 << 40) + 12345;
        let cols = columns(size);
        assert_eq!(cols, COLUMNS);
        assert_eq!(column_range(0, cols, size).0, 0);
        assert_eq!(column_range(cols - 1, cols, size).1, size);
        for c in 0..cols - 1 {
            assert_eq!(
                column_range(c, cols, size).1,
                column_range(c + 1, cols, size).0
            );
        }
        assert_eq!(columns(100), 100);
        assert_eq!(columns(0), 1);
    }

    #[test]
    fn a_small_write_in_a_huge_disk_still_shows_and_the_top_layer_wins() {
        let size = 1u64 << 40;
        let entries = [
            entry(0, 4096, 0, true),
            entry(4096, size / 2 - 4096, 2, false),
            entry(size / 2, size / 2, 1, true),
        ];
        let a = answer_columns(&entries, size);
        assert_eq!(a[0], Some(0));
        assert_eq!(a[1], None);
        assert_eq!(a[399], None);
        assert_eq!(a[400], Some(1));
        assert_eq!(a[799], Some(1));
    }

    #[test]
    fn names_are_escaped_and_shortened() {
        assert_eq!(escape("a<b>&\"c'"), "a&lt;b&gt;&amp;&quot;c&apos;");
        assert_eq!(escape("x\u{1}y"), "x?y");
        let s = short_name(&"x".repeat(100), 20);
        assert_eq!(s.chars().count(), 20);
        assert_eq!(short_name("short", 20), "short");
    }

    #[test]
    fn runs_merge_equal_neighbours() {
        assert_eq!(
            runs(&[1, 1, 2, 2, 2, 1]),
            vec![(0, 2, 1), (2, 3, 2), (5, 1, 1)]
        );
    }
}
