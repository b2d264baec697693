//! The libvirt commands (cargo feature `libvirt`): `strata snapshot
//! create|list|revert|delete`, `strata blockcommit`, `strata blockpull`,
//! through strata-libvirt (offline for shut-off domains, libvirt's live
//! jobs for running ones). The connection URI comes
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
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Once;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Subcommand};
use strata_libvirt::{
    render_tree, BlockCommitOptions, BlockPullOptions, Connect, DiskSpec, Report, RevertOptions,
    SnapshotCreateOptions, SnapshotInfo,
};
use strata_merge::Hooks;

use crate::localtime::{format_time, local_offset};
use crate::OutputFormat;

/// `strata snapshot` subcommands, spelled as virsh's `snapshot-*`
/// commands (the domain and name also as `--domain` / `--name`).
#[derive(Debug, Clone, Subcommand)]
pub enum SnapshotAction {
    /// Take a disk-only external snapshot (virsh snapshot-create-as --disk-only).
    Create(CreateArgs),
    /// List snapshots (virsh snapshot-list).
    List(ListArgs),
    /// Show or name the current snapshot (virsh snapshot-current).
    Current(CurrentArgs),
    /// Show a snapshot's details (virsh snapshot-info).
    Info(PickArgs),
    /// Print a snapshot's XML (virsh snapshot-dumpxml).
    Dumpxml(PickArgs),
    /// Return the domain's disks to a snapshot's state (virsh snapshot-revert).
    Revert(RevertArgs),
    /// Remove a snapshot, keeping every other state (virsh snapshot-delete).
    Delete(DeleteArgs),
}

/// The domain (and snapshot name) as positionals or as virsh's
/// `--domain` / `--name`, and the connection.
#[derive(Debug, Clone, Args)]
pub struct Target {
    /// The domain.
    #[arg(value_name = "DOMAIN")]
    domain_pos: Option<String>,
    /// The domain (virsh's --domain).
    #[arg(long = "domain", value_name = "DOMAIN")]
    domain: Option<String>,
    /// libvirt connection URI (also accepted before the subcommand;
    /// default: LIBVIRT_DEFAULT_URI, else libvirt's default).
    #[arg(short = 'c', long = "connect", value_name = "URI")]
    pub uri: Option<String>,
}

impl Target {
    fn domain(&self) -> Result<String> {
        match (&self.domain_pos, &self.domain) {
            (Some(a), Some(b)) if a != b => bail!("two domains given: {a} and {b}"),
            (Some(d), _) | (None, Some(d)) => Ok(d.clone()),
            (None, None) => bail!("no domain given (DOMAIN or --domain)"),
        }
    }
}

fn one_name(pos: &Option<String>, opt: &Option<String>) -> Result<Option<String>> {
    match (pos, opt) {
        (Some(a), Some(b)) if a != b => bail!("two snapshot names given: {a} and {b}"),
        (Some(n), _) | (None, Some(n)) => Ok(Some(n.clone())),
        (None, None) => Ok(None),
    }
}

/// `snapshot create`.
#[derive(Debug, Clone, Args)]
pub struct CreateArgs {
    #[command(flatten)]
    target: Target,
    /// Snapshot name.
    #[arg(value_name = "NAME")]
    name_pos: Option<String>,
    /// Snapshot name (virsh's --name; default: the time, as virsh).
    #[arg(long = "name")]
    name: Option<String>,
    /// Description.
    #[arg(long = "description")]
    description: Option<String>,
    /// Disk target to snapshot, and only those (repeatable; default: the
    /// disks virsh snapshot-create-as --disk-only takes).
    #[arg(long = "disk")]
    disks: Vec<String>,
    /// Overlay file name (one disk).
    #[arg(long = "file")]
    file: Option<PathBuf>,
    /// virsh's --diskspec DISK[,snapshot=external|no][,driver=qcow2][,file=PATH]
    /// (repeatable; a comma inside PATH is written ",,").
    #[arg(long = "diskspec")]
    diskspecs: Vec<String>,
    /// Accepted: Strata's snapshots are always disk-only.
    #[arg(long = "disk-only")]
    disk_only: bool,
    /// Accepted: Strata's snapshots are always atomic (all or nothing).
    #[arg(long = "atomic")]
    atomic: bool,
    /// Freeze the guest's file systems (running domains, through the QEMU
    /// guest agent; an error when it does not answer).
    #[arg(long = "quiesce")]
    quiesce: bool,
    /// Refused: memory state needs a running domain.
    #[arg(long = "memspec")]
    memspec: Option<String>,
}

/// `snapshot list`.
#[derive(Debug, Clone, Args)]
pub struct ListArgs {
    #[command(flatten)]
    target: Target,
    /// As a tree, like virsh snapshot-list --tree.
    #[arg(long = "tree")]
    tree: bool,
    /// With a Parent column.
    #[arg(long = "parent")]
    parent: bool,
    /// Only snapshots without a parent.
    #[arg(long = "roots")]
    roots: bool,
    /// Only snapshots without children.
    #[arg(long = "leaves")]
    leaves: bool,
    /// Names only, one per line.
    #[arg(long = "name")]
    name: bool,
    /// Output format (dot: the snapshot tree as a Graphviz graph, with
    /// each snapshot's files).
    #[arg(long = "output", value_enum, default_value_t)]
    output: crate::dot::GraphOutput,
}

/// `snapshot current`.
#[derive(Debug, Clone, Args)]
pub struct CurrentArgs {
    #[command(flatten)]
    target: Target,
    /// Print the name only (else the XML).
    #[arg(long = "name")]
    name: bool,
}

/// `snapshot info` and `snapshot dumpxml`: one snapshot.
#[derive(Debug, Clone, Args)]
pub struct PickArgs {
    #[command(flatten)]
    target: Target,
    /// Snapshot name.
    #[arg(value_name = "NAME")]
    name_pos: Option<String>,
    /// Snapshot name (virsh's --snapshotname).
    #[arg(long = "snapshotname", alias = "name")]
    name: Option<String>,
    /// The current snapshot.
    #[arg(long = "current")]
    current: bool,
}

/// `snapshot revert`.
#[derive(Debug, Clone, Args)]
pub struct RevertArgs {
    #[command(flatten)]
    pick: PickArgs,
    /// Start the domain after the revert.
    #[arg(long = "running", conflicts_with = "paused")]
    running: bool,
    /// Start the domain paused after the revert.
    #[arg(long = "paused")]
    paused: bool,
    /// Revert only the disks of a snapshot with memory state, dropping that
    /// state (without it the memory state is restored: the domain comes
    /// back running at the snapshot's moment, or paused with --paused).
    #[arg(long = "disks-only")]
    disks_only: bool,
    /// Revert a running or paused domain: stop it first (virsh destroy).
    #[arg(long = "force")]
    force: bool,
}

/// `snapshot delete`.
#[derive(Debug, Clone, Args)]
pub struct DeleteArgs {
    #[command(flatten)]
    pick: PickArgs,
    /// Also delete its descendants.
    #[arg(long = "children", conflicts_with = "children_only")]
    children: bool,
    /// Delete only its descendants.
    #[arg(long = "children-only")]
    children_only: bool,
    /// Remove libvirt's metadata only; no file is merged or removed.
    #[arg(long = "metadata")]
    metadata: bool,
    /// Show the merges' progress (on a terminal).
    #[arg(long = "verbose", short = 'p')]
    verbose: bool,
}

/// `blockcommit` (virsh blockcommit DOMAIN DISK --active --pivot).
#[derive(Debug, Clone, Args)]
pub struct BlockcommitArgs {
    #[command(flatten)]
    target: Target,
    /// Disk target (vda) or its source file.
    #[arg(value_name = "PATH|DISK")]
    path_pos: Option<String>,
    /// Disk target or file (virsh's --path).
    #[arg(long = "path", alias = "disk")]
    path: Option<String>,
    /// The image to commit into (default: the bottom of the chain).
    #[arg(long = "base")]
    base: Option<PathBuf>,
    /// The image to commit from (default: the active image; an inner
    /// image on running domains only).
    #[arg(long = "top")]
    top: Option<PathBuf>,
    /// Commit into the active image's immediate backing file.
    #[arg(long = "shallow", conflicts_with = "base")]
    shallow: bool,
    /// Accepted: Strata's blockcommit is always an active commit.
    #[arg(long = "active")]
    active: bool,
    /// Accepted: Strata always pivots to the base.
    #[arg(long = "pivot")]
    pivot: bool,
    /// Also remove the committed images Strata did not create.
    #[arg(long = "delete")]
    delete: bool,
    /// Accepted: Strata always waits.
    #[arg(long = "wait")]
    wait: bool,
    /// Show progress (on a terminal).
    #[arg(long = "verbose", short = 'p')]
    verbose: bool,
    /// Remove the snapshots whose state the commit overwrites.
    #[arg(long = "delete-snapshots")]
    delete_snapshots: bool,
    /// Bandwidth limit of the live job, MiB/s (bytes/s with --bytes).
    #[arg(long = "bandwidth", default_value_t = 0)]
    bandwidth: u64,
    /// --bandwidth is in bytes/s.
    #[arg(long = "bytes")]
    bytes: bool,
}

/// `blockpull` (virsh blockpull DOMAIN DISK).
#[derive(Debug, Clone, Args)]
pub struct BlockpullArgs {
    #[command(flatten)]
    target: Target,
    /// Disk target (vda) or its source file.
    #[arg(value_name = "PATH|DISK")]
    path_pos: Option<String>,
    /// Disk target or file (virsh's --path).
    #[arg(long = "path", alias = "disk")]
    path: Option<String>,
    /// Keep this image of the chain as backing file.
    #[arg(long = "base")]
    base: Option<PathBuf>,
    /// Accepted: Strata always waits.
    #[arg(long = "wait")]
    wait: bool,
    /// Show progress (on a terminal).
    #[arg(long = "verbose", short = 'p')]
    verbose: bool,
    /// Bandwidth limit of the live job, MiB/s (bytes/s with --bytes).
    #[arg(long = "bandwidth", default_value_t = 0)]
    bandwidth: u64,
    /// --bandwidth is in bytes/s.
    #[arg(long = "bytes")]
    bytes: bool,
}

fn bandwidth(n: u64, bytes: bool) -> u64 {
    if bytes {
        n
    } else {
        n.saturating_mul(1 << 20)
    }
}

/// One libvirt command with its arguments.
#[derive(Debug, Clone)]
pub enum LibvirtCommand {
    /// `snapshot ...`.
    Snapshot(SnapshotAction),
    /// `blockcommit ...`.
    Blockcommit(BlockcommitArgs),
    /// `blockpull ...`.
    Blockpull(BlockpullArgs),
}

impl LibvirtCommand {
    /// The `-c` URI given.
    pub fn uri(&self) -> Option<&str> {
        let t = match self {
            LibvirtCommand::Snapshot(a) => match a {
                SnapshotAction::Create(x) => &x.target,
                SnapshotAction::List(x) => &x.target,
                SnapshotAction::Current(x) => &x.target,
                SnapshotAction::Info(x) | SnapshotAction::Dumpxml(x) => &x.target,
                SnapshotAction::Revert(x) => &x.pick.target,
                SnapshotAction::Delete(x) => &x.pick.target,
            },
            LibvirtCommand::Blockcommit(x) => &x.target,
            LibvirtCommand::Blockpull(x) => &x.target,
        };
        t.uri.as_deref()
    }
}

/// Parses virsh's `--diskspec` text.
pub fn parse_diskspec(text: &str) -> Result<DiskSpec> {
    // Fields are separated by ',' and a literal comma is ",,".
    let mut fields = vec![String::new()];
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                if let Some(f) = fields.last_mut() {
                    f.push(',');
                }
            } else {
                fields.push(String::new());
            }
        } else if let Some(f) = fields.last_mut() {
            f.push(c);
        }
    }
    let mut it = fields.into_iter();
    let disk = it.next().filter(|d| !d.is_empty());
    let Some(disk) = disk else {
        bail!("--diskspec {text:?}: no disk name");
    };
    let mut spec = DiskSpec::new(disk);
    for f in it {
        let (k, v) = f.split_once('=').unwrap_or((f.as_str(), ""));
        match (k, v) {
            ("snapshot", "external") => spec.external = true,
            ("snapshot", "no") => spec.external = false,
            ("snapshot", "internal") => bail!(
                "--diskspec {text:?}: snapshot=internal is not supported: Strata makes \
                 external snapshots only"
            ),
            ("file", p) if !p.is_empty() => spec.file = Some(PathBuf::from(p)),
            ("driver", "qcow2") => {}
            ("driver", d) => bail!("--diskspec {text:?}: driver={d}: overlays are qcow2"),
            ("stype", "file") => {}
            _ => bail!("--diskspec {text:?}: unknown field {f:?}"),
        }
    }
    Ok(spec)
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
    list_table(snaps, false)
}

/// `virsh snapshot-list`'s table, with virsh's Parent column when `parent`.
pub fn list_table(snaps: &[SnapshotInfo], parent: bool) -> String {
    let rows: Vec<Vec<String>> = snaps
        .iter()
        .map(|s| {
            let off = local_offset(s.creation_time);
            let sign = if off < 0 { '-' } else { '+' };
            let a = off.abs();
            let mut r = vec![
                s.name.clone(),
                format!(
                    "{} {sign}{:02}{:02}",
                    format_time(s.creation_time, off),
                    a / 3600,
                    (a / 60) % 60
                ),
                state_name(&s.state).to_string(),
            ];
            if parent {
                r.push(s.parent.clone().unwrap_or_default());
            }
            r
        })
        .collect();
    let mut head = vec!["Name", "Creation Time", "State"];
    if parent {
        head.push("Parent");
    }
    let mut w: Vec<usize> = head.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            if let Some(x) = w.get_mut(i) {
                *x = (*x).max(c.len());
            }
        }
    }
    let line = |cells: &[&str]| {
        let mut l = String::from(" ");
        for (i, c) in cells.iter().enumerate() {
            if i + 1 < cells.len() {
                l.push_str(&format!("{:<w$}   ", c, w = w.get(i).copied().unwrap_or(0)));
            } else {
                l.push_str(c);
            }
        }
        l.trim_end().to_string() + "\n"
    };
    let mut out = line(&head);
    out.push_str(&"-".repeat(w.iter().sum::<usize>() + 1 + 3 * (w.len() - 1) + 3));
    out.push('\n');
    for r in &rows {
        let cells: Vec<&str> = r.iter().map(String::as_str).collect();
        out.push_str(&line(&cells));
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
    for (disk, why) in &r.skipped {
        writeln!(out, "Disk {disk} skipped: {why}")?;
    }
    for (disk, file) in &r.swapped {
        writeln!(out, "Disk {disk} now uses {}", file.display())?;
    }
    for m in &r.merges {
        writeln!(out, "Merged: {m}")?;
    }
    for f in &r.removed {
        writeln!(out, "Removed {}", f.display())?;
    }
    for (f, why) in &r.kept {
        writeln!(out, "Kept {}: {why}", f.display())?;
    }
    for s in &r.snapshots_removed {
        writeln!(out, "Snapshot {s} removed")?;
    }
    for w in &r.warnings {
        writeln!(out, "Warning: {w}")?;
    }
    Ok(())
}

/// Runs one libvirt command (on its `-c` URI).
pub fn run(cmd: &LibvirtCommand, out: &mut dyn Write) -> Result<i32> {
    with_connection(cmd.uri(), |conn| run_on(conn, cmd, out))
}

/// virsh's progress line on a terminal ("Block commit: [ 42 %]").
struct Bar {
    label: &'static str,
    shown: bool,
}

impl Bar {
    fn new(label: &'static str, verbose: bool) -> Bar {
        use std::io::IsTerminal;
        Bar {
            label,
            shown: verbose && std::io::stderr().is_terminal(),
        }
    }
    fn update(&mut self, p: strata_merge::Progress) {
        if self.shown {
            let pct = (p.done_bytes * 100)
                .checked_div(p.total_bytes)
                .unwrap_or(100);
            eprint!("\r{}: [{pct:3} %]", self.label);
        }
    }
    fn done(&self) {
        if self.shown {
            eprintln!();
        }
    }
}

/// Set by the signal thread of [`cancel_on_signals`]: the running merge
/// or live block job stops (a live job is aborted; the chain stays valid).
static CANCEL: AtomicBool = AtomicBool::new(false);
/// An operation that can be cancelled is running.
static ARMED: AtomicBool = AtomicBool::new(false);

/// For the `strata-libvirt` binary only: SIGINT and SIGTERM cancel a
/// running merge or live block job (which is aborted cleanly: the chain
/// stays valid, and the command fails saying so); outside one they end
/// the process at once, as before. The signals are blocked in every
/// thread and taken by one thread with `sigwait` (no async handler).
/// Call it before any other thread starts.
pub fn cancel_on_signals() {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    if set.thread_block().is_err() {
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("strata-signals".into())
        .spawn(move || loop {
            let Ok(sig) = set.wait() else { return };
            if ARMED.load(Ordering::SeqCst) {
                if !CANCEL.swap(true, Ordering::SeqCst) {
                    eprintln!("\n{sig}: cancelling the block job (the chain stays as it was)...");
                }
            } else {
                std::process::exit(128 + sig as i32);
            }
        });
    if spawned.is_err() {
        let _ = set.thread_unblock();
    }
}

fn with_bar<T>(label: &'static str, verbose: bool, f: impl FnOnce(&mut Hooks<'_>) -> T) -> T {
    let mut bar = Bar::new(label, verbose);
    let mut cb = |p: strata_merge::Progress| bar.update(p);
    ARMED.store(true, Ordering::SeqCst);
    let r = f(&mut Hooks::new().with_progress(&mut cb).with_cancel(&CANCEL));
    ARMED.store(false, Ordering::SeqCst);
    bar.done();
    r
}

/// The snapshot `pick` names (`NAME`, `--snapshotname` or `--current`).
fn picked(conn: &Connect, domain: &str, pick: &PickArgs) -> Result<String> {
    match (one_name(&pick.name_pos, &pick.name)?, pick.current) {
        (Some(_), true) => bail!("give a snapshot name or --current, not both"),
        (Some(n), false) => Ok(n),
        (None, _) => current_name(conn, domain)?
            .ok_or_else(|| anyhow!("domain {domain:?} has no current snapshot")),
    }
}

fn current_name(conn: &Connect, domain: &str) -> Result<Option<String>> {
    let snaps = strata_libvirt::snapshot_list(conn, domain)
        .with_context(|| format!("{domain}: snapshot list"))?;
    Ok(snaps.into_iter().find(|s| s.current).map(|s| s.name))
}

fn descendants(snaps: &[SnapshotInfo], name: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut todo = vec![name.to_string()];
    while let Some(n) = todo.pop() {
        for s in snaps
            .iter()
            .filter(|s| s.parent.as_deref() == Some(n.as_str()))
        {
            out.push(s.name.clone());
            todo.push(s.name.clone());
        }
    }
    out
}

/// Runs one libvirt command on an open connection.
pub fn run_on(conn: &Connect, cmd: &LibvirtCommand, out: &mut dyn Write) -> Result<i32> {
    match cmd {
        LibvirtCommand::Snapshot(action) => return snapshot_on(conn, action, out),
        LibvirtCommand::Blockcommit(a) => {
            let domain = a.target.domain()?;
            let disk = one_name(&a.path_pos, &a.path)?;
            let mut opts = BlockCommitOptions::default()
                .with_delete_snapshots(a.delete_snapshots)
                .with_delete_merged(a.delete)
                .with_shallow(a.shallow)
                .with_bandwidth(bandwidth(a.bandwidth, a.bytes));
            opts.disk = disk;
            opts.base = a.base.clone();
            opts.top = a.top.clone();
            let r = with_bar("Block commit", a.verbose, |h| {
                strata_libvirt::blockcommit(conn, &domain, &opts, h)
            })
            .with_context(|| format!("{domain}: blockcommit"))?;
            if r.swapped.is_empty() {
                writeln!(out, "Commit complete")?;
            } else {
                writeln!(out, "Successfully committed and pivoted")?;
            }
            print_report(out, &r)?;
        }
        LibvirtCommand::Blockpull(a) => {
            let domain = a.target.domain()?;
            let mut opts =
                BlockPullOptions::default().with_bandwidth(bandwidth(a.bandwidth, a.bytes));
            opts.disk = one_name(&a.path_pos, &a.path)?;
            opts.base = a.base.clone();
            let r = with_bar("Block Pull", a.verbose, |h| {
                strata_libvirt::blockpull(conn, &domain, &opts, h)
            })
            .with_context(|| format!("{domain}: blockpull"))?;
            writeln!(out, "Block pull complete")?;
            print_report(out, &r)?;
        }
    }
    Ok(0)
}

fn snapshot_on(conn: &Connect, action: &SnapshotAction, out: &mut dyn Write) -> Result<i32> {
    match action {
        SnapshotAction::Create(a) => {
            let domain = a.target.domain()?;
            if a.memspec.is_some() {
                bail!(
                    "--memspec: refused: a memory state exists only while the domain runs; \
                     Strata takes disk-only snapshots"
                );
            }
            let _ = (a.disk_only, a.atomic); // always so
            let name = match one_name(&a.name_pos, &a.name)? {
                Some(n) => n,
                None => std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs().to_string())
                    .unwrap_or_else(|_| "snapshot".into()),
            };
            let mut opts = SnapshotCreateOptions::default()
                .with_diskspecs(
                    a.diskspecs
                        .iter()
                        .map(|d| parse_diskspec(d))
                        .collect::<Result<_>>()?,
                )
                .with_quiesce(a.quiesce);
            opts.disks = (!a.disks.is_empty()).then(|| a.disks.clone());
            opts.file = a.file.clone();
            opts.description = a.description.clone();
            let r = strata_libvirt::snapshot_create(conn, &domain, &name, &opts)
                .with_context(|| format!("{domain}: snapshot create {name}"))?;
            writeln!(out, "Domain snapshot {name} created")?;
            print_report(out, &r)?;
        }
        SnapshotAction::List(a) => {
            let domain = a.target.domain()?;
            let mut snaps = strata_libvirt::snapshot_list(conn, &domain)
                .with_context(|| format!("{domain}: snapshot list"))?;
            let all = snaps.clone();
            if a.roots {
                snaps.retain(|s| s.parent.is_none());
            }
            if a.leaves {
                snaps.retain(|s| !all.iter().any(|c| c.parent.as_deref() == Some(&s.name)));
            }
            let Some(output) = a.output.plain() else {
                let dot = crate::dot::snapshot_tree_dot(&list_json(&snaps));
                out.write_all(dot.as_bytes())?;
                return Ok(0);
            };
            match (output, a.tree, a.name) {
                (OutputFormat::Json, _, _) => {
                    writeln!(out, "{}", serde_json::to_string_pretty(&list_json(&snaps))?)?;
                }
                (OutputFormat::Human, true, _) => {
                    out.write_all(render_tree(&snaps).as_bytes())?;
                }
                (OutputFormat::Human, false, true) => {
                    for s in &snaps {
                        writeln!(out, "{}", s.name)?;
                    }
                    writeln!(out)?;
                }
                (OutputFormat::Human, false, false) => {
                    out.write_all(list_table(&snaps, a.parent).as_bytes())?
                }
            }
        }
        SnapshotAction::Current(a) => {
            let domain = a.target.domain()?;
            let name = current_name(conn, &domain)?
                .ok_or_else(|| anyhow!("domain {domain:?} has no current snapshot"))?;
            if a.name {
                writeln!(out, "{name}")?;
            } else {
                writeln!(
                    out,
                    "{}",
                    strata_libvirt::snapshot_dumpxml(conn, &domain, &name)?
                )?;
            }
        }
        SnapshotAction::Dumpxml(a) => {
            let domain = a.target.domain()?;
            let name = picked(conn, &domain, a)?;
            writeln!(
                out,
                "{}",
                strata_libvirt::snapshot_dumpxml(conn, &domain, &name)?
            )?;
        }
        SnapshotAction::Info(a) => {
            let domain = a.target.domain()?;
            let name = picked(conn, &domain, a)?;
            let snaps = strata_libvirt::snapshot_list(conn, &domain)?;
            let s = snaps
                .iter()
                .find(|s| s.name == name)
                .ok_or_else(|| anyhow!("domain {domain:?} has no snapshot {name:?}"))?;
            let children = snaps
                .iter()
                .filter(|c| c.parent.as_deref() == Some(name.as_str()))
                .count();
            let row = |k: &str, v: &str| format!("{:<16}{v}\n", format!("{k}:"));
            let mut text = String::new();
            text += &row("Name", &s.name);
            text += &row("Domain", &domain);
            text += &row("Current", if s.current { "yes" } else { "no" });
            text += &row("State", state_name(&s.state));
            text += &row("Location", if s.internal { "internal" } else { "external" });
            text += &row("Parent", s.parent.as_deref().unwrap_or("-"));
            text += &row("Children", &children.to_string());
            text += &row("Descendants", &descendants(&snaps, &name).len().to_string());
            text += &row("Metadata", "yes");
            writeln!(out, "{text}")?;
        }
        SnapshotAction::Revert(a) => {
            let domain = a.pick.target.domain()?;
            let name = picked(conn, &domain, &a.pick)?;
            let r = strata_libvirt::snapshot_revert_with(
                conn,
                &domain,
                &name,
                &RevertOptions::default()
                    .with_disks_only(a.disks_only)
                    .with_force(a.force)
                    .with_running(a.running)
                    .with_paused(a.paused),
            )
            .with_context(|| format!("{domain}: snapshot revert {name}"))?;
            if r.stopped {
                writeln!(out, "Domain {domain} was running: stopped it (--force)")?;
            }
            writeln!(out, "Domain {domain} reverted to snapshot {name}")?;
            print_report(out, &r)?;
            if let Some(m) = &r.restored {
                let dom = virt::domain::Domain::lookup_by_name(conn, &domain)?;
                let paused = dom
                    .get_state()
                    .is_ok_and(|(s, _)| s == virt::sys::VIR_DOMAIN_PAUSED);
                writeln!(
                    out,
                    "Domain {domain} restored from the memory state in {}{}",
                    m.display(),
                    if paused { " (paused)" } else { " (running)" }
                )?;
            } else if a.running || a.paused {
                let dom = virt::domain::Domain::lookup_by_name(conn, &domain)?;
                let flags = if a.paused {
                    virt::sys::VIR_DOMAIN_START_PAUSED
                } else {
                    0
                };
                dom.create_with_flags(flags)
                    .with_context(|| format!("{domain}: start after the revert"))?;
                writeln!(
                    out,
                    "Domain {domain} started{}",
                    if a.paused { " (paused)" } else { "" }
                )?;
            }
        }
        SnapshotAction::Delete(a) => {
            let domain = a.pick.target.domain()?;
            let name = picked(conn, &domain, &a.pick)?;
            let mut names = Vec::new();
            if a.children || a.children_only {
                let snaps = strata_libvirt::snapshot_list(conn, &domain)?;
                // Deepest first, so that each is a leaf when deleted.
                let mut d = descendants(&snaps, &name);
                d.reverse();
                names.extend(d);
            }
            if !a.children_only {
                names.push(name.clone());
            }
            for n in &names {
                let r = if a.metadata {
                    strata_libvirt::snapshot_delete_metadata(conn, &domain, n)
                } else {
                    with_bar("Block commit", a.verbose, |h| {
                        strata_libvirt::snapshot_delete(conn, &domain, n, h)
                    })
                }
                .with_context(|| format!("{domain}: snapshot delete {n}"))?;
                writeln!(out, "Domain snapshot {n} deleted")?;
                print_report(out, &r)?;
            }
            if names.is_empty() {
                writeln!(out, "Domain snapshot {name} has no children")?;
            }
        }
    }
    Ok(0)
}
