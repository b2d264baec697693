//! The libvirt commands (cargo feature `libvirt`): `strata snapshot
//! create|list|revert|delete`, `strata blockcommit`, `strata blockpull`,
//! for shut-off domains, through strata-libvirt. The connection URI comes
//! from `-c`, else `LIBVIRT_DEFAULT_URI`, else libvirt's default.
//!
//! libvirt's in-process test driver (`test:///...`) keeps its state in
//! the connection, so connections to `test:` URIs are kept open for the
//! rest of the thread and reused by later commands in the same process
//! (the demo, and tests that call [`crate::run`] several times). Other
//! connections are closed after each command.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Once;

use anyhow::{anyhow, Context, Result};
use strata_libvirt::{
    render_tree, BlockCommitOptions, BlockPullOptions, Connect, Report, SnapshotCreateOptions,
    SnapshotInfo,
};
use strata_merge::Hooks;

use crate::localtime::{format_time, local_offset};
use crate::OutputFormat;

/// One libvirt command with its arguments.
#[derive(Debug, Clone)]
pub enum LibvirtCommand {
    /// `snapshot create DOMAIN NAME`.
    Create {
        /// Domain name.
        domain: String,
        /// Snapshot name.
        name: String,
        /// Disk targets (`--disk`, repeatable); all eligible disks by default.
        disks: Vec<String>,
        /// Overlay file (`--file`, one disk only).
        file: Option<PathBuf>,
        /// Description.
        description: Option<String>,
    },
    /// `snapshot list DOMAIN`.
    List {
        /// Domain name.
        domain: String,
        /// As a tree.
        tree: bool,
        /// Human or JSON.
        output: OutputFormat,
    },
    /// `snapshot revert DOMAIN NAME`.
    Revert {
        /// Domain name.
        domain: String,
        /// Snapshot name.
        name: String,
    },
    /// `snapshot delete DOMAIN NAME`.
    Delete {
        /// Domain name.
        domain: String,
        /// Snapshot name.
        name: String,
    },
    /// `blockcommit DOMAIN`.
    BlockCommit {
        /// Domain name.
        domain: String,
        /// Disk target.
        disk: Option<String>,
        /// Base image.
        base: Option<PathBuf>,
        /// Remove the snapshots the commit destroys.
        delete_snapshots: bool,
    },
    /// `blockpull DOMAIN`.
    BlockPull {
        /// Domain name.
        domain: String,
        /// Disk target.
        disk: Option<String>,
        /// Base image kept as backing file.
        base: Option<PathBuf>,
    },
}

/// The URI to connect to: `-c`, else `LIBVIRT_DEFAULT_URI`, else `None`
/// (libvirt's own default).
pub fn effective_uri(uri: Option<&str>) -> Option<String> {
    match uri {
        Some(u) => Some(u.to_string()),
        None => std::env::var("LIBVIRT_DEFAULT_URI")
            .ok()
            .filter(|u| !u.is_empty()),
    }
}

thread_local! {
    static TEST_CONNECTIONS: RefCell<HashMap<String, Connect>> = RefCell::new(HashMap::new());
}

fn init_libvirt() {
    static ONCE: Once = Once::new();
    // libvirt prints every error to stderr by default; Strata reports
    // errors itself.
    ONCE.call_once(virt::error::clear_error_callback);
}

fn open(uri: Option<&str>) -> Result<Connect> {
    init_libvirt();
    Connect::open(uri).map_err(|e| {
        anyhow!(
            "cannot connect to libvirt at {}: {e}",
            uri.unwrap_or("the default URI")
        )
    })
}

/// Runs `f` with a connection to `uri` (see the module documentation for
/// the reuse of `test:` connections).
pub fn with_connection<T>(uri: Option<&str>, f: impl FnOnce(&Connect) -> Result<T>) -> Result<T> {
    let uri = effective_uri(uri);
    match uri.as_deref() {
        Some(u) if u.starts_with("test:") => {
            let conn = TEST_CONNECTIONS.with(|m| -> Result<Connect> {
                let mut m = m.borrow_mut();
                if let Some(c) = m.get(u) {
                    return Ok(c.clone());
                }
                let c = open(Some(u))?;
                m.insert(u.to_string(), c.clone());
                Ok(c)
            })?;
            let mut conn = conn;
            let r = f(&conn);
            let _ = conn.close(); // drops the clone's reference only
            r
        }
        u => {
            let mut conn = open(u)?;
            let r = f(&conn);
            let _ = conn.close();
            r
        }
    }
}

fn state_name(s: &str) -> &str {
    if s.is_empty() {
        "disk-snapshot"
    } else {
        s
    }
}

/// `virsh snapshot-list`'s table.
pub fn list_human(snaps: &[SnapshotInfo]) -> String {
    let rows: Vec<[String; 3]> = snaps
        .iter()
        .map(|s| {
            let off = local_offset(s.creation_time);
            let sign = if off < 0 { '-' } else { '+' };
            let a = off.abs();
            [
                s.name.clone(),
                format!(
                    "{} {sign}{:02}{:02}",
                    format_time(s.creation_time, off),
                    a / 3600,
                    (a / 60) % 60
                ),
                state_name(&s.state).to_string(),
            ]
        })
        .collect();
    let head = ["Name", "Creation Time", "State"];
    let mut w = head.map(str::len);
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.len());
        }
    }
    let line = |c: [&str; 3]| {
        format!(
            " {:<w0$}   {:<w1$}   {}\n",
            c[0],
            c[1],
            c[2],
            w0 = w[0],
            w1 = w[1]
        )
        .trim_end()
        .to_string()
            + "\n"
    };
    let mut out = line(head);
    out.push_str(&"-".repeat(w[0] + w[1] + w[2] + 7));
    out.push('\n');
    for r in &rows {
        out.push_str(&line([&r[0], &r[1], &r[2]]));
    }
    out.push('\n');
    out
}

/// The JSON list: name, parent, current, creation-time, state,
/// description and disks (disk, overlay, state-file).
pub fn list_json(snaps: &[SnapshotInfo]) -> serde_json::Value {
    let path = |p: &Option<PathBuf>| p.as_ref().map(|p| p.display().to_string());
    serde_json::Value::Array(
        snaps
            .iter()
            .map(|s| {
                serde_json::json!({
                    "name": s.name,
                    "parent": s.parent,
                    "current": s.current,
                    "creation-time": s.creation_time,
                    "state": state_name(&s.state),
                    "description": s.description,
                    "disks": s.disks.iter().map(|k| serde_json::json!({
                        "disk": k.disk,
                        "overlay": path(&k.overlay),
                        "state-file": path(&k.state_file),
                    })).collect::<Vec<_>>(),
                })
            })
            .collect(),
    )
}

fn print_report(out: &mut dyn Write, r: &Report) -> Result<()> {
    for (disk, file) in &r.swapped {
        writeln!(out, "Disk {disk} now uses {}", file.display())?;
    }
    for m in &r.merges {
        writeln!(out, "Merged: {m}")?;
    }
    for f in &r.removed {
        writeln!(out, "Removed {}", f.display())?;
    }
    for s in &r.snapshots_removed {
        writeln!(out, "Snapshot {s} removed")?;
    }
    for w in &r.warnings {
        writeln!(out, "Warning: {w}")?;
    }
    Ok(())
}

/// Runs one libvirt command on `uri`.
pub fn run(cmd: &LibvirtCommand, uri: Option<&str>, out: &mut dyn Write) -> Result<i32> {
    with_connection(uri, |conn| run_on(conn, cmd, out))
}

/// Runs one libvirt command on an open connection.
pub fn run_on(conn: &Connect, cmd: &LibvirtCommand, out: &mut dyn Write) -> Result<i32> {
    match cmd {
        LibvirtCommand::Create {
            domain,
            name,
            disks,
            file,
            description,
        } => {
            let opts = SnapshotCreateOptions {
                disks: if disks.is_empty() {
                    None
                } else {
                    Some(disks.clone())
                },
                file: file.clone(),
                description: description.clone(),
            };
            let r = strata_libvirt::snapshot_create(conn, domain, name, &opts)
                .with_context(|| format!("{domain}: snapshot create {name}"))?;
            writeln!(out, "Domain snapshot {name} created")?;
            print_report(out, &r)?;
        }
        LibvirtCommand::List {
            domain,
            tree,
            output,
        } => {
            let snaps = strata_libvirt::snapshot_list(conn, domain)
                .with_context(|| format!("{domain}: snapshot list"))?;
            match (output, tree) {
                (OutputFormat::Json, _) => {
                    writeln!(out, "{}", serde_json::to_string_pretty(&list_json(&snaps))?)?;
                }
                (OutputFormat::Human, true) => {
                    out.write_all(render_tree(&snaps).as_bytes())?;
                }
                (OutputFormat::Human, false) => out.write_all(list_human(&snaps).as_bytes())?,
            }
        }
        LibvirtCommand::Revert { domain, name } => {
            let r = strata_libvirt::snapshot_revert(conn, domain, name)
                .with_context(|| format!("{domain}: snapshot revert {name}"))?;
            writeln!(out, "Domain {domain} reverted to snapshot {name}")?;
            print_report(out, &r)?;
        }
        LibvirtCommand::Delete { domain, name } => {
            let r = strata_libvirt::snapshot_delete(conn, domain, name, &mut Hooks::default())
                .with_context(|| format!("{domain}: snapshot delete {name}"))?;
            writeln!(out, "Domain snapshot {name} deleted")?;
            print_report(out, &r)?;
        }
        LibvirtCommand::BlockCommit {
            domain,
            disk,
            base,
            delete_snapshots,
        } => {
            let opts = BlockCommitOptions {
                disk: disk.clone(),
                base: base.clone(),
                delete_snapshots: *delete_snapshots,
            };
            let r = strata_libvirt::blockcommit(conn, domain, &opts, &mut Hooks::default())
                .with_context(|| format!("{domain}: blockcommit"))?;
            writeln!(out, "Successfully committed and pivoted")?;
            print_report(out, &r)?;
        }
        LibvirtCommand::BlockPull { domain, disk, base } => {
            let opts = BlockPullOptions {
                disk: disk.clone(),
                base: base.clone(),
            };
            let r = strata_libvirt::blockpull(conn, domain, &opts, &mut Hooks::default())
                .with_context(|| format!("{domain}: blockpull"))?;
            writeln!(out, "Block pull complete")?;
            print_report(out, &r)?;
        }
    }
    Ok(0)
}
