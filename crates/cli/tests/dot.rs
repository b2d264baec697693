//! `info --backing-chain --output dot` and `snapshot list --tree --output
//! dot`: well-formed DOT (parsed here; rendered by Graphviz's `dot -Tsvg`
//! when it is installed) that says what the JSON of the same chain or
//! snapshot list says.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::*;
use strata_cli::size::size_to_str;

fn strata_ok(args: &[&str]) -> Run {
    let r = strata(args);
    assert_eq!(r.code, 0, "strata {args:?}: {}{}", r.stdout, r.stderr);
    r
}

/// A parsed DOT digraph: node id -> attributes, and edges (from, to).
#[derive(Debug, Default)]
struct Graph {
    name: String,
    nodes: BTreeMap<String, BTreeMap<String, String>>,
    edges: Vec<(String, String)>,
}

/// Tokens of the DOT subset Strata writes: identifiers, quoted strings
/// (escapes decoded, `\n` as a newline), `->`, and punctuation.
fn tokens(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut it = text.chars().peekable();
    while let Some(c) = it.next() {
        match c {
            c if c.is_whitespace() => {}
            '"' => {
                let mut s = String::from("\"");
                loop {
                    match it.next().expect("unterminated string") {
                        '"' => break,
                        '\\' => match it.next().expect("dangling escape") {
                            'n' => s.push('\n'),
                            c => s.push(c),
                        },
                        c => s.push(c),
                    }
                }
                out.push(s);
            }
            '-' => {
                assert_eq!(it.next(), Some('>'), "stray '-'");
                out.push("->".into());
            }
            '{' | '}' | '[' | ']' | ';' | ',' | '=' => out.push(c.to_string()),
            c if c.is_alphanumeric() || c == '_' => {
                let mut s = c.to_string();
                while let Some(&n) = it.peek() {
                    if n.is_alphanumeric() || n == '_' || n == '.' {
                        s.push(n);
                        it.next();
                    } else {
                        break;
                    }
                }
                out.push(s);
            }
            c => panic!("unexpected character {c:?} in DOT"),
        }
    }
    out
}

fn unq(t: &str) -> String {
    t.strip_prefix('"').unwrap_or(t).to_string()
}

/// Parses `digraph NAME { stmt; ... }` with node, edge and default
/// attribute statements; panics on anything else.
fn parse_dot(text: &str) -> Graph {
    let t = tokens(text);
    assert_eq!(t[0], "digraph", "{text}");
    assert_eq!(t[2], "{", "{text}");
    assert_eq!(t.last().unwrap(), "}", "{text}");
    let mut g = Graph {
        name: t[1].clone(),
        ..Graph::default()
    };
    let body = &t[3..t.len() - 1];
    for stmt in body.split(|x| x == ";").filter(|s| !s.is_empty()) {
        let (head, attrs) = match stmt.iter().position(|x| x == "[") {
            Some(i) => {
                assert_eq!(stmt.last().unwrap(), "]", "{stmt:?}");
                (&stmt[..i], &stmt[i + 1..stmt.len() - 1])
            }
            None => (stmt, &[][..]),
        };
        let mut map = BTreeMap::new();
        for a in attrs.split(|x| x == ",").filter(|a| !a.is_empty()) {
            assert!(a.len() == 3 && a[1] == "=", "bad attribute {a:?}");
            map.insert(a[0].clone(), unq(&a[2]));
        }
        match head {
            [k, eq, _] if eq == "=" => assert!(k == "rankdir", "{stmt:?}"),
            [k] if k == "node" || k == "edge" || k == "graph" => {}
            [id] => {
                assert!(g.nodes.insert(unq(id), map).is_none(), "node {id} twice");
            }
            [a, arrow, b] if arrow == "->" => g.edges.push((unq(a), unq(b))),
            _ => panic!("unexpected statement {stmt:?}"),
        }
    }
    for (a, b) in &g.edges {
        assert!(
            g.nodes.contains_key(a) && g.nodes.contains_key(b),
            "edge {a} -> {b}"
        );
    }
    g
}

/// Renders with Graphviz when it is installed: it must accept the text.
fn render_if_graphviz(text: &str, dir: &Path) {
    let Ok(status) = std::process::Command::new("dot").arg("-V").output() else {
        return;
    };
    if !status.status.success() {
        return;
    }
    let src = dir.join("g.dot");
    let svg = dir.join("g.svg");
    std::fs::write(&src, text).unwrap();
    let r = std::process::Command::new("dot")
        .args(["-Tsvg", "-o", s(&svg), s(&src)])
        .output()
        .unwrap();
    assert!(
        r.status.success(),
        "dot -Tsvg: {}",
        String::from_utf8_lossy(&r.stderr)
    );
    let out = std::fs::read_to_string(&svg).unwrap();
    assert!(
        out.contains("<svg") && out.trim_end().ends_with("</svg>"),
        "{out}"
    );
}

/// A raw base, a qcow2 middle with data and a compressed top.
fn three_deep(dir: &Path) -> std::path::PathBuf {
    let base = dir.join("base.raw");
    let mid = dir.join("mid.qcow2");
    let top = dir.join("top \"quoted\".qcow2");
    strata_ok(&["create", "-q", "-f", "raw", s(&base), "4M"]);
    strata_ok(&["create", "-q", "-b", "base.raw", "-F", "raw", s(&mid)]);
    strata_ok(&["io", "-c", "write -P 1 0 1M", s(&mid)]);
    strata_ok(&[
        "create",
        "-q",
        "-b",
        "mid.qcow2",
        "-F",
        "qcow2",
        s(&top),
        "8M",
    ]);
    strata_ok(&["io", "-c", "write -P 2 64k 64k", s(&top)]);
    top
}

#[test]
fn info_dot_has_a_node_per_image_and_edges_to_backing_files_as_the_json_says() {
    let d = tempdir();
    let top = three_deep(d.path());
    let json: serde_json::Value = serde_json::from_str(
        &strata_ok(&["info", "--backing-chain", "--output", "json", s(&top)]).stdout,
    )
    .unwrap();
    let text = strata_ok(&["info", "--backing-chain", "--output", "dot", s(&top)]).stdout;
    let g = parse_dot(&text);
    assert_eq!(g.name, "chain");
    let images = json.as_array().unwrap();
    assert_eq!(g.nodes.len(), images.len());
    assert_eq!(images.len(), 3);
    for (i, img) in images.iter().enumerate() {
        let label = &g.nodes[&format!("n{i}")]["label"];
        let want = format!(
            "{}\nformat: {}\nvirtual size: {}\ndisk size: {}",
            img["filename"].as_str().unwrap(),
            img["format"].as_str().unwrap(),
            size_to_str(img["virtual-size"].as_u64().unwrap()),
            size_to_str(img["actual-size"].as_u64().unwrap()),
        );
        assert_eq!(*label, want);
    }
    let want_edges: Vec<(String, String)> = (1..images.len())
        .map(|i| (format!("n{}", i - 1), format!("n{i}")))
        .collect();
    assert_eq!(g.edges, want_edges);
    render_if_graphviz(&text, d.path());
}

#[test]
fn info_dot_without_backing_chain_shows_the_unopened_backing_file_dashed() {
    let d = tempdir();
    let top = three_deep(d.path());
    let text = strata_ok(&["info", "--output", "dot", s(&top)]).stdout;
    let g = parse_dot(&text);
    assert_eq!(g.nodes.len(), 2);
    assert_eq!(g.nodes["n1"]["style"], "dashed");
    assert!(g.nodes["n1"]["label"].contains("mid.qcow2\nformat: qcow2"));
    assert_eq!(g.edges, vec![("n0".to_string(), "n1".to_string())]);
    render_if_graphviz(&text, d.path());
}

#[test]
fn info_dot_of_a_lone_image_is_one_node() {
    let d = tempdir();
    let img = d.path().join("a.qcow2");
    strata_ok(&["create", "-q", s(&img), "1M"]);
    let g = parse_dot(&strata_ok(&["info", "--backing-chain", "--output", "dot", s(&img)]).stdout);
    assert_eq!(g.nodes.len(), 1);
    assert!(g.edges.is_empty());
}

/// A test-driver domain "vm" with one qcow2 disk; returns its URI.
#[cfg(feature = "libvirt")]
fn test_domain(dir: &Path) -> String {
    let dir = std::fs::canonicalize(dir).unwrap();
    let disk = dir.join("vm.qcow2");
    strata_ok(&["create", "-q", s(&disk), "4M"]);
    test_driver_uri(&dir, &qcow2_disk_xml(&disk, "vda"))
}

#[cfg(feature = "libvirt")]
#[test]
fn snapshot_list_tree_dot_matches_the_json_list() {
    let d = tempdir();
    let uri = test_domain(d.path());
    let u = uri.as_str();
    strata_ok(&["snapshot", "create", "vm", "take-1", "-c", u]);
    strata_ok(&["snapshot", "create", "vm", "take-2", "-c", u]);
    let json: serde_json::Value = serde_json::from_str(
        &strata_ok(&["snapshot", "list", "vm", "--output", "json", "-c", u]).stdout,
    )
    .unwrap();
    let text = strata_ok(&[
        "snapshot", "list", "vm", "--tree", "--output", "dot", "-c", u,
    ])
    .stdout;
    let g = parse_dot(&text);
    assert_eq!(g.name, "snapshots");
    let snaps = json.as_array().unwrap();
    assert_eq!(g.nodes.len(), snaps.len());
    let mut want_edges = Vec::new();
    for snap in snaps {
        let name = snap["name"].as_str().unwrap();
        let node = &g.nodes[name];
        let label = &node["label"];
        assert!(label.starts_with(name), "{label}");
        for disk in snap["disks"].as_array().unwrap() {
            let line = format!(
                "{}: {}",
                disk["disk"].as_str().unwrap(),
                disk["overlay"].as_str().unwrap_or("(none)")
            );
            assert!(label.lines().any(|l| l == line), "{line} not in {label}");
        }
        assert_eq!(
            node.get("style").map(String::as_str) == Some("bold"),
            snap["current"].as_bool().unwrap()
        );
        if let Some(p) = snap["parent"].as_str() {
            want_edges.push((p.to_string(), name.to_string()));
        }
    }
    assert_eq!(g.edges, want_edges);
    assert_eq!(
        want_edges,
        vec![("take-1".to_string(), "take-2".to_string())]
    );
    render_if_graphviz(&text, d.path());
}
