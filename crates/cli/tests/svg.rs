//! `strata map --output svg`: the picture parses as XML, and its strips
//! and legend say what the JSON map of the same chain says.

mod common;

use std::path::Path;

use common::{s, strata};
use xmltree::{Element, XMLNode};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    PastEnd,
    Unallocated,
    Zero,
    Compressed,
    Data,
}

fn kind(name: &str) -> Kind {
    match name {
        "past-end" => Kind::PastEnd,
        "unallocated" => Kind::Unallocated,
        "zero" => Kind::Zero,
        "compressed" => Kind::Compressed,
        "data" => Kind::Data,
        other => panic!("unknown data-kind {other:?}"),
    }
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    start: u64,
    length: u64,
    depth: u64,
    present: bool,
    zero: bool,
    compressed: bool,
}

fn ok(args: &[&str]) -> String {
    let r = strata(args);
    assert_eq!(r.code, 0, "strata {args:?}: {}", r.stderr);
    r.stdout
}

fn json_map(top: &Path) -> Vec<Entry> {
    let v: serde_json::Value =
        serde_json::from_str(&ok(&["map", "--output", "json", s(top)])).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|e| Entry {
            start: e["start"].as_u64().unwrap(),
            length: e["length"].as_u64().unwrap(),
            depth: e["depth"].as_u64().unwrap(),
            present: e["present"].as_bool().unwrap(),
            zero: e["zero"].as_bool().unwrap(),
            compressed: e["compressed"].as_bool().unwrap(),
        })
        .collect()
}

fn attr<'a>(e: &'a Element, name: &str) -> Option<&'a str> {
    e.attributes.get(name).map(String::as_str)
}

fn num(e: &Element, name: &str) -> u64 {
    attr(e, name)
        .unwrap_or_else(|| panic!("<{}> without {name}", e.name))
        .parse()
        .unwrap()
}

fn children<'a>(e: &'a Element, name: &'a str) -> impl Iterator<Item = &'a Element> + 'a {
    e.children.iter().filter_map(move |n| match n {
        XMLNode::Element(c) if c.name == name => Some(c),
        _ => None,
    })
}

fn text(e: &Element) -> String {
    let mut s = String::new();
    for n in &e.children {
        match n {
            XMLNode::Text(t) => s.push_str(t),
            XMLNode::Element(c) => s.push_str(&text(c)),
            _ => {}
        }
    }
    s
}

/// The filled rects of a strip, expanded to one value per column; checks
/// that they tile the strip from x0 without gaps.
fn columns<T: Clone>(g: &Element, value: impl Fn(&Element) -> T) -> (u64, Vec<T>) {
    let rects: Vec<&Element> = children(g, "rect")
        .filter(|r| attr(r, "fill") != Some("none"))
        .collect();
    let x0 = num(rects[0], "x");
    let mut out = Vec::new();
    for r in rects {
        assert_eq!(num(r, "x"), x0 + out.len() as u64, "gap in the strip");
        let v = value(r);
        for _ in 0..num(r, "width") {
            out.push(v.clone());
        }
    }
    (x0, out)
}

/// Columns `[lo, hi)` guest ranges, as the picture divides the disk.
fn col_range(c: u64, cols: u64, size: u64) -> (u64, u64) {
    let at = |c: u64| (u128::from(size) * u128::from(c) / u128::from(cols)) as u64;
    (at(c), at(c + 1))
}

fn overlaps(e: &Entry, lo: u64, hi: u64) -> bool {
    e.length > 0 && e.start < hi && lo < e.start + e.length
}

fn entry_kind(e: &Entry) -> Kind {
    if e.compressed {
        Kind::Compressed
    } else if e.zero {
        Kind::Zero
    } else {
        Kind::Data
    }
}

/// Parses the SVG of `top` and checks it against the JSON map; returns
/// the answer strip.
fn check_picture(top: &Path, names: &[&str], size: u64) -> Vec<Option<u64>> {
    let svg = ok(&["map", "--output", "svg", s(top)]);
    let root = Element::parse(svg.as_bytes()).expect("the SVG is well-formed XML");
    assert_eq!(root.name, "svg");
    assert_eq!(
        root.namespace.as_deref(),
        Some("http://www.w3.org/2000/svg")
    );
    let entries = json_map(top);
    let groups: Vec<&Element> = children(&root, "g").collect();
    let class = |c: &'static str| {
        groups
            .iter()
            .copied()
            .filter(move |g| attr(g, "class") == Some(c))
    };

    // One strip per layer, top first, named like the map names them.
    let layers: Vec<&Element> = class("layer").collect();
    assert_eq!(layers.len(), names.len());
    let mut strips = Vec::new();
    let mut last_y = 0;
    for (d, g) in layers.iter().enumerate() {
        assert_eq!(num(g, "data-depth"), d as u64);
        assert!(attr(g, "data-file").unwrap().ends_with(names[d]));
        let y = num(children(g, "rect").next().unwrap(), "y");
        assert!(y > last_y, "strips top first");
        last_y = y;
        let (_, kinds) = columns(g, |r| kind(attr(r, "data-kind").unwrap()));
        strips.push(kinds);
    }
    let answer = class("answer").next().expect("answer strip");
    let (_, answers) = columns(answer, |r| {
        attr(r, "data-depth").map(|d| d.parse().unwrap())
    });
    let cols = answers.len() as u64;
    assert_eq!(cols, size.clamp(1, 800));
    for k in &strips {
        assert_eq!(k.len() as u64, cols);
    }

    let n = names.len() as u64;
    for c in 0..cols {
        let (lo, hi) = col_range(c, cols, size);
        let here: Vec<&Entry> = entries.iter().filter(|e| overlaps(e, lo, hi)).collect();
        // The highest layer answering any byte of the column.
        let want = here.iter().filter(|e| e.present).map(|e| e.depth).min();
        assert_eq!(answers[c as usize], want, "answer of column {c}");
        // Each layer's strip holds at least what the map says it answers
        // for, nothing above the answering layer holds anything, and the
        // top layer's strip is exactly the map's depth-0 entries.
        for d in 0..n {
            let got = strips[d as usize][c as usize];
            let answered = here
                .iter()
                .filter(|e| e.present && e.depth == d)
                .map(|e| entry_kind(e))
                .max();
            if let Some(k) = answered {
                assert!(got >= k, "layer {d} column {c}: {got:?} < {k:?}");
            }
            if want.is_none_or(|w| d < w) {
                assert!(got <= Kind::Unallocated, "layer {d} column {c}: {got:?}");
            }
            if d == 0 {
                assert_eq!(
                    got,
                    answered.unwrap_or(Kind::Unallocated),
                    "top, column {c}"
                );
            }
        }
        // Past the end of a short backing file (answered "zeros" by the
        // layer above it), that file and all below it have nothing.
        let past = here
            .iter()
            .all(|e| !e.present && e.depth + 1 < n && e.start <= lo && hi <= e.start + e.length);
        if past && !here.is_empty() {
            for strip in strips.iter().skip(here[0].depth as usize + 1) {
                assert_eq!(strip[c as usize], Kind::PastEnd, "column {c}");
            }
        }
    }

    // The legend: every kind, every layer's colour with its name, and how
    // the columns aggregate.
    let legend = class("legend").next().expect("legend");
    let legend_text: String = children(legend, "text")
        .map(text)
        .collect::<Vec<_>>()
        .join("\n");
    for k in ["data", "compressed", "zero", "unallocated", "past-end"] {
        assert!(
            children(legend, "rect").any(|r| attr(r, "data-kind") == Some(k)),
            "legend lacks {k}"
        );
    }
    for (d, name) in names.iter().enumerate() {
        let swatch = children(legend, "rect")
            .find(|r| attr(r, "data-depth") == Some(&d.to_string()))
            .unwrap_or_else(|| panic!("legend lacks layer {d}"));
        let fill = attr(swatch, "fill").unwrap();
        assert!(
            children(answer, "rect")
                .all(|r| attr(r, "data-depth") != Some(&d.to_string())
                    || attr(r, "fill") == Some(fill)),
            "layer {d}'s colour differs from the legend's"
        );
        assert!(legend_text.contains(name), "legend lacks {name}");
    }
    let per_col = size.div_ceil(cols);
    assert!(
        legend_text.contains(&format!("{cols} columns of at most {per_col} bytes")),
        "{legend_text}"
    );
    answers
}

#[test]
fn svg_map_parses_and_matches_the_json_map() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    // base: data at 0 and 40M, compressed; mid: data and zeros, 64M;
    // top: 96M, longer than its backing file, a little data.
    ok(&["create", "-q", "-f", "qcow2", s(&p("plain.qcow2")), "64M"]);
    ok(&[
        "io",
        "-c",
        "write -P 1 0 8M",
        "-c",
        "write -P 2 40M 4M",
        s(&p("plain.qcow2")),
    ]);
    ok(&[
        "convert",
        "-O",
        "qcow2",
        "-c",
        s(&p("plain.qcow2")),
        s(&p("base.qcow2")),
    ]);
    ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        s(&p("mid.qcow2")),
    ]);
    ok(&[
        "io",
        "-c",
        "write -P 3 4M 4M",
        "-c",
        "write -z 20M 8M",
        s(&p("mid.qcow2")),
    ]);
    ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "mid.qcow2",
        "-F",
        "qcow2",
        s(&p("top.qcow2")),
        "96M",
    ]);
    ok(&[
        "io",
        "-c",
        "write -P 4 6M 64k",
        "-c",
        "write -P 5 70M 1M",
        s(&p("top.qcow2")),
    ]);

    let answers = check_picture(
        &p("top.qcow2"),
        &["top.qcow2", "mid.qcow2", "base.qcow2"],
        96 << 20,
    );
    // Everything the chain has shows up: each layer answers somewhere, and
    // somewhere no layer does.
    for d in 0..3 {
        assert!(answers.contains(&Some(d)), "layer {d} answers nowhere");
    }
    assert!(answers.contains(&None));
}

#[test]
fn svg_map_of_a_tib_disk_keeps_a_single_write_visible() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    let top = dir.path().join("top.qcow2");
    ok(&["create", "-q", "-f", "qcow2", s(&base), "1T"]);
    ok(&["io", "-c", "write -P 7 512G 4k", s(&base)]);
    ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        s(&top),
    ]);
    ok(&["io", "-c", "write -P 8 0 4k", s(&top)]);
    let answers = check_picture(&top, &["top.qcow2", "base.qcow2"], 1 << 40);
    assert_eq!(answers[0], Some(0));
    assert_eq!(answers[400], Some(1));
    assert_eq!(answers.iter().filter(|a| a.is_some()).count(), 2);
    // Runs of equal columns are one rect: the picture stays small.
    let svg = ok(&["map", "--output", "svg", s(&top)]);
    assert!(svg.len() < 16 * 1024, "{} bytes", svg.len());
}

#[test]
fn svg_map_of_a_16_deep_chain_shows_every_layer_answering() {
    let dir = tempfile::tempdir().unwrap();
    let name = |i: usize| format!("l{i:02}.qcow2");
    ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        s(&dir.path().join(name(0))),
        "16M",
    ]);
    for i in 1..16 {
        let prev = name(i - 1);
        ok(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            &prev,
            "-F",
            "qcow2",
            s(&dir.path().join(name(i))),
        ]);
    }
    // Layer i (from the bottom) writes MiB i; the top layer's MiB 15.
    for i in 0..16 {
        let w = format!("write -P {} {}M 64k", i + 1, i);
        ok(&["io", "-c", &w, s(&dir.path().join(name(i)))]);
    }
    let names: Vec<String> = (0..16).rev().map(name).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let answers = check_picture(&dir.path().join(name(15)), &names, 16 << 20);
    for depth in 0..16u64 {
        // MiB i is answered by the layer that wrote it, at depth 15 - i.
        let col = (15 - depth) * 50;
        assert_eq!(answers[col as usize], Some(depth), "column {col}");
    }
}
