//! `virsh snapshot-list --tree` rendering.

use crate::snapshot::SnapshotInfo;

/// Renders snapshots as `virsh snapshot-list --tree` does (same indent,
/// `|` and `+-` characters, same blank lines), with ` (current)` after the
/// current snapshot.
pub fn render_tree(snaps: &[SnapshotInfo]) -> String {
    let mut out = String::new();
    let mut indent = String::new();
    for (i, s) in snaps.iter().enumerate() {
        let orphan = s
            .parent
            .as_deref()
            .is_none_or(|p| !snaps.iter().any(|o| o.name == p));
        if orphan {
            print_node(snaps, i, i, true, &mut indent, &mut out);
        }
    }
    out
}

fn label(s: &SnapshotInfo) -> String {
    if s.current {
        format!("{} (current)", s.name)
    } else {
        s.name.clone()
    }
}

/// A port of virsh's `vshTreePrintInternal`.
fn print_node(
    snaps: &[SnapshotInfo],
    id: usize,
    last: usize,
    root: bool,
    indent: &mut String,
    out: &mut String,
) {
    let Some(me) = snaps.get(id) else { return };
    out.push_str(&format!(
        "{indent}{}{}\n",
        if root { "" } else { "+- " },
        label(me)
    ));
    if !root {
        indent.push(if id == last { ' ' } else { '|' });
        indent.push(' ');
    }
    let kids: Vec<usize> = snaps
        .iter()
        .enumerate()
        .filter(|(_, s)| s.parent.as_deref() == Some(me.name.as_str()))
        .map(|(i, _)| i)
        .collect();
    let next_last = kids.last().copied();
    if next_last.is_some() {
        out.push_str(&format!("{indent}  |\n"));
    }
    indent.push_str("  ");
    for k in &kids {
        print_node(snaps, *k, next_last.unwrap_or(*k), false, indent, out);
    }
    indent.truncate(indent.len().saturating_sub(2));
    if next_last.is_none() && id == last {
        out.push_str(&format!("{indent}\n"));
    }
    if !root {
        indent.truncate(indent.len().saturating_sub(2));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(name: &str, parent: Option<&str>, current: bool) -> SnapshotInfo {
        SnapshotInfo {
            name: name.into(),
            description: None,
            creation_time: 0,
            state: "shutoff".into(),
            parent: parent.map(str::to_string),
            current,
            disks: vec![],
            internal: false,
            memory_file: None,
        }
    }

    #[test]
    // Checked against `virsh -c test:///default snapshot-list test --tree` (libvirt 9.0).
    fn tree_looks_like_virsh() {
        let snaps = vec![
            s("take-1", None, false),
            s("take-2", Some("take-1"), false),
            s("take-3", Some("take-2"), true),
            s("take-4", Some("take-1"), false),
        ];
        let expected = "take-1\n  |\n  +- take-2\n  |   |\n  |   +- take-3 (current)\n  |     \n  +- take-4\n    \n";
        assert_eq!(render_tree(&snaps), expected);
    }
}
