//! Internal snapshots: `qemu-img snapshot -c/-a/-d` and the read-only
//! snapshot view `qemu-img convert -l` reads.
//!
//! The semantics are QEMU's (block/qcow2-snapshot.c): a snapshot records
//! a copy of the active L1 table, its clusters are shared by counting
//! them once more, `apply` makes a copy of the snapshot's L1 table the
//! active one (with the snapshot's virtual size), `delete` drops an entry
//! and the references it held. IDs are the next integer; names need not
//! be unique.
//!
//! The way there is not QEMU's. QEMU changes refcounts and the COPIED
//! flags of the active tables in place, so that between the two a crash
//! leaves COPIED flags that disagree with the refcounts (which `qemu-img
//! check` reports as errors). Strata commits each operation as one new
//! state instead, in the manner of shadow paging: every table that
//! changes (the snapshot table, the active L1 table, the active L2 tables
//! whose COPIED flags change, and complete new refcount structures) is
//! written to clusters the current state neither uses nor counts (holes,
//! or past the end of the file), synced, and a single header write
//! switches to all of it at once. Nothing in use is written in place; a
//! crash leaves the old state or the new one, without even a leak (the
//! clusters the old state used and the new one does not count zero in
//! the new refcount structures). docs/crash-consistency.md has the
//! protocol.

use strata_format::snapshot::{self, Snapshot};
use strata_format::table::{decode_u64_table, encode_u64_table, OFFSET_MASK, OFLAG_COPIED};
use strata_format::{limits, HostOffset, L1Entry, L2Entry};

use crate::error::{Error, Result};
use crate::qcow2::{ReadOnlyImage, View, WritableImage};

/// Most internal snapshots an image may have (QEMU's
/// `QCOW_MAX_SNAPSHOTS`).
pub const MAX_SNAPSHOTS: usize = 65536;

/// Longest ID or name QEMU keeps (`sizeof(QEMUSnapshotInfo.name) - 1`).
pub const MAX_NAME_BYTES: usize = 255;

/// Length of the extra data Strata (and QEMU) writes: vm_state_size_large,
/// disk_size and icount.
const EXTRA_LEN: usize = 24;

/// Which snapshot an operation names, as QEMU looks it up.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SnapshotRef {
    /// An ID, or else a name (`qemu-img snapshot -a`, `convert -l NAME`).
    IdOrName(String),
    /// The first snapshot with this name (`qemu-img snapshot -d`).
    Name(String),
    /// By ID and/or name, each checked when given (`convert -l
    /// snapshot.id=ID,snapshot.name=NAME`).
    IdAndName {
        /// The ID, if given.
        id: Option<String>,
        /// The name, if given.
        name: Option<String>,
    },
}

impl SnapshotRef {
    /// The index of the snapshot this names in `list`.
    pub fn find(&self, list: &[Snapshot]) -> Option<usize> {
        match self {
            SnapshotRef::IdOrName(s) => list
                .iter()
                .position(|sn| sn.id == *s)
                .or_else(|| list.iter().position(|sn| sn.name == *s)),
            SnapshotRef::Name(n) => list.iter().position(|sn| sn.name == *n),
            SnapshotRef::IdAndName { id, name } => {
                if id.is_none() && name.is_none() {
                    return None;
                }
                list.iter().position(|sn| {
                    id.as_ref().is_none_or(|i| sn.id == *i)
                        && name.as_ref().is_none_or(|n| sn.name == *n)
                })
            }
        }
    }

    /// Parses qemu-img's `convert -l` argument: `snapshot.id=ID`,
    /// `snapshot.name=NAME` (comma-separated), or a bare ID or name.
    pub fn parse_convert_arg(arg: &str) -> std::result::Result<SnapshotRef, String> {
        if !arg.starts_with("snapshot.") {
            return Ok(SnapshotRef::IdOrName(arg.to_string()));
        }
        let (mut id, mut name) = (None, None);
        for part in arg.split(',') {
            match part.split_once('=') {
                Some(("snapshot.id", v)) => id = Some(v.to_string()),
                Some(("snapshot.name", v)) => name = Some(v.to_string()),
                _ => return Err(format!("Invalid parameter '{part}'")),
            }
        }
        Ok(SnapshotRef::IdAndName { id, name })
    }
}

impl std::fmt::Display for SnapshotRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SnapshotRef::IdOrName(s) | SnapshotRef::Name(s) => write!(f, "{s}"),
            SnapshotRef::IdAndName { id, name } => {
                let parts: Vec<String> = id
                    .iter()
                    .map(|i| format!("snapshot.id={i}"))
                    .chain(name.iter().map(|n| format!("snapshot.name={n}")))
                    .collect();
                write!(f, "{}", parts.join(","))
            }
        }
    }
}

/// Encodes one snapshot table entry as QEMU writes it
/// (`qcow2_write_snapshots`): the fixed part, extra data with
/// vm_state_size_large, disk_size (`current_size` when the entry recorded
/// none) and icount (-1 when none) followed by any extra data Strata does
/// not know, the ID, the name, padding to 8 bytes.
pub fn encode_entry(sn: &Snapshot, current_size: u64) -> Vec<u8> {
    let mut extra = Vec::with_capacity(EXTRA_LEN + sn.extra.len());
    extra.extend_from_slice(&sn.vm_state_size.to_be_bytes());
    extra.extend_from_slice(&sn.disk_size.unwrap_or(current_size).to_be_bytes());
    extra.extend_from_slice(&sn.icount.unwrap_or(u64::MAX).to_be_bytes());
    if let Some(unknown) = sn.extra.get(EXTRA_LEN..) {
        extra.extend_from_slice(unknown);
    }
    let id = clip(&sn.id);
    let name = clip(&sn.name);
    let mut e = Vec::with_capacity(snapshot::FIXED_LEN + extra.len() + id.len() + name.len() + 8);
    e.extend_from_slice(&sn.l1_table_offset.to_be_bytes());
    e.extend_from_slice(&sn.l1_size.to_be_bytes());
    e.extend_from_slice(&(id.len() as u16).to_be_bytes());
    e.extend_from_slice(&(name.len() as u16).to_be_bytes());
    e.extend_from_slice(&sn.date_sec.to_be_bytes());
    e.extend_from_slice(&sn.date_nsec.to_be_bytes());
    e.extend_from_slice(&sn.vm_clock_nsec.to_be_bytes());
    // The 32-bit field, as QEMU truncates it.
    e.extend_from_slice(&(sn.vm_state_size as u32).to_be_bytes());
    e.extend_from_slice(&(extra.len() as u32).to_be_bytes());
    e.extend_from_slice(&extra);
    e.extend_from_slice(id);
    e.extend_from_slice(name);
    e.resize(e.len().div_ceil(8) * 8, 0);
    e
}

/// The first `MAX_NAME_BYTES` bytes of `s`, cut at a character boundary.
fn clip(s: &str) -> &[u8] {
    let mut end = s.len().min(MAX_NAME_BYTES);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s.as_bytes()[..end]
}

/// The ID a new snapshot gets: one more than the largest numeric ID
/// (QEMU's `find_new_snapshot_id`; IDs that are not numbers count 0).
pub fn next_snapshot_id(list: &[Snapshot]) -> String {
    let max = list
        .iter()
        .map(|sn| leading_number(&sn.id))
        .max()
        .unwrap_or(0);
    (max + 1).to_string()
}

/// `strtoul` of an ID: its leading decimal digits (0 when none).
fn leading_number(s: &str) -> u64 {
    let digits: String = s.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().unwrap_or(0)
}

/// Where new tables go: clusters neither the current state references nor
/// its refcounts count (holes, such as the tables an earlier commit
/// replaced), else past the end of the file and of everything in use.
struct Tail {
    /// Free runs below `next`: (first cluster, clusters).
    holes: Vec<(u64, u64)>,
    /// Host offset past everything in use.
    next: u64,
}

impl Tail {
    /// Writes `bytes` (zero-padded to clusters) to the first hole large
    /// enough, or at the end; returns its offset.
    fn put(&mut self, img: &WritableImage, bytes: &[u8], op: &'static str) -> Result<u64> {
        let geo = img.view.geometry();
        let cs = img.view.geometry().cluster_size();
        let n = (bytes.len() as u64).div_ceil(cs).max(1);
        let at = match self.holes.iter_mut().find(|(_, len)| *len >= n) {
            Some((first, len)) => {
                let at = geo.cluster_start(*first).get();
                *first += n;
                *len -= n;
                at
            }
            None => {
                let at = self.next;
                self.next = at + n * cs;
                at
            }
        };
        let mut buf = bytes.to_vec();
        buf.resize((n * cs) as usize, 0);
        img.w.write_metadata(&buf, at, op)?;
        Ok(at)
    }
}

/// The in-memory state a commit replaces, to restore when it fails.
struct Saved {
    header: strata_format::Header,
    l1: Vec<u64>,
    snapshots: Vec<Snapshot>,
    snapshot_table_end: u64,
}

impl View {
    fn not_found(&self, sel: &SnapshotRef) -> Error {
        Error::InvalidArgument(format!(
            "{}: there is no internal snapshot {sel}",
            self.path().display()
        ))
    }

    /// Reads the L1 table of `sn`, after checking it as QEMU's
    /// `qcow2_validate_table` does (size limit, alignment, inside the file).
    pub(crate) fn snapshot_l1(&self, sn: &Snapshot) -> Result<Vec<u64>> {
        let bytes = u64::from(sn.l1_size) * 8;
        let file_len = self.storage_len()?;
        let bad = |what: &str| {
            Error::corrupt(
                self.path(),
                sn.l1_table_offset,
                format!("snapshot {:?} (ID {}): {what}", sn.name, sn.id),
            )
        };
        if !sn.l1_size_is_valid() {
            return Err(bad("its L1 table is too large"));
        }
        if !self.geometry().is_aligned(sn.l1_table_offset) {
            return Err(bad("its L1 table is not cluster-aligned"));
        }
        if sn
            .l1_table_offset
            .checked_add(bytes)
            .is_none_or(|e| e > file_len)
        {
            return Err(bad("its L1 table lies past the end of the file"));
        }
        let mut raw = vec![0u8; bytes as usize];
        self.storage()
            .read_at(&mut raw, sn.l1_table_offset)
            .map_err(|e| Error::io(self.path(), "read snapshot L1 table", sn.l1_table_offset, e))?;
        Ok(decode_u64_table(&raw))
    }
}

impl ReadOnlyImage {
    /// Makes this read-only image show the snapshot `sel` instead of the
    /// active state (QEMU's `bdrv_snapshot_load_tmp`): its L1 table and
    /// its virtual size. The backing file stays.
    pub(crate) fn load_snapshot(&mut self, sel: &SnapshotRef) -> Result<()> {
        let i = sel
            .find(self.view.snapshots())
            .ok_or_else(|| self.view.not_found(sel))?;
        let sn = self.view.snapshots()[i].clone();
        let l1 = self.view.snapshot_l1(&sn)?;
        if sn.disk_size.is_some_and(|d| d > limits::MAX_VIRTUAL_SIZE) {
            return Err(Error::corrupt(
                self.view.path(),
                self.view.header().snapshots_offset(),
                format!(
                    "snapshot {:?} records a virtual size over the limit",
                    sn.name
                ),
            ));
        }
        self.view
            .header_mut()
            .set_l1_table(sn.l1_table_offset, sn.l1_size);
        if let Some(size) = sn.disk_size {
            self.view.header_mut().set_size(size);
        }
        *self.view.l1_mut() = l1;
        self.forget_caches();
        Ok(())
    }
}

impl WritableImage {
    /// Creates an internal snapshot of the active state named `name`
    /// (`qemu-img snapshot -c`), dated `date` (seconds, nanoseconds since
    /// the epoch). Returns the new entry.
    pub fn snapshot_create(&mut self, name: &str, date: (u32, u32)) -> Result<Snapshot> {
        self.view.refuse_with_data_file("internal snapshots")?;
        self.begin_write()?;
        self.flush()?;
        if self.view.snapshots().len() >= MAX_SNAPSHOTS {
            return Err(Error::Unsupported {
                path: self.view.path().to_path_buf(),
                what: format!("too many snapshots (at most {MAX_SNAPSHOTS})"),
            });
        }
        let id = next_snapshot_id(self.view.snapshots());
        let sn = Snapshot {
            l1_table_offset: 0,
            l1_size: self.view.header().l1_size(),
            id,
            name: String::from_utf8_lossy(clip(name)).into_owned(),
            date_sec: date.0,
            date_nsec: date.1,
            vm_clock_nsec: 0,
            vm_state_size: 0,
            disk_size: Some(self.view.header().size()),
            // qemu-img snapshot -c records 0.
            icount: Some(0),
            extra: Vec::new(),
        };
        let saved = self.save_state();
        let r = self.create_inner(sn);
        self.finish(saved, r)
    }

    fn create_inner(&mut self, mut sn: Snapshot) -> Result<Snapshot> {
        let mut tail = self.tail()?;
        // The snapshot's own copy of the active L1 table (COPIED flags
        // dropped: they mean nothing in an inactive table).
        let copy: Vec<u64> = self.view.l1().iter().map(|e| e & !OFLAG_COPIED).collect();
        if !copy.is_empty() {
            sn.l1_table_offset = tail.put(self, &encode_u64_table(&copy), "write snapshot L1")?;
        }
        let mut list = self.view.snapshots().to_vec();
        list.push(sn);
        self.stage_snapshot_table(&mut tail, list)?;
        let l1 = self.view.l1().to_vec();
        let size = self.view.header().size();
        self.commit_state(&mut tail, l1, size)?;
        self.view
            .snapshots()
            .last()
            .cloned()
            .ok_or_else(|| Error::InvalidArgument("snapshot list empty after create".into()))
    }

    /// Reverts the active state to the snapshot `sel` (`qemu-img snapshot
    /// -a`): the active L1 table becomes a copy of the snapshot's, the
    /// virtual size the snapshot's. Returns the snapshot applied.
    pub fn snapshot_apply(&mut self, sel: &SnapshotRef) -> Result<Snapshot> {
        self.begin_write()?;
        self.flush()?;
        let i = sel
            .find(self.view.snapshots())
            .ok_or_else(|| self.view.not_found(sel))?;
        let sn = self.view.snapshots()[i].clone();
        let entries = self.view.snapshot_l1(&sn)?;
        let size = sn.disk_size.unwrap_or(self.view.header().size());
        if self.view.header().bitmaps().is_some() {
            // The guest view changes wholesale, and the bitmaps would have
            // to say so (or be dropped): not done by Strata yet.
            return Err(Error::Unsupported {
                path: self.view.path().to_path_buf(),
                what: "applying an internal snapshot to an image with persistent dirty bitmaps \
                       is not supported by Strata yet (their dirty bits would not cover the \
                       change; remove them with `strata bitmap --remove` first)"
                    .into(),
            });
        }
        if size > limits::MAX_VIRTUAL_SIZE {
            return Err(Error::corrupt(
                self.view.path(),
                self.view.header().snapshots_offset(),
                format!(
                    "snapshot {:?} records a virtual size over the limit",
                    sn.name
                ),
            ));
        }
        // As QEMU: the active table keeps its size when larger, and grows
        // to the snapshot's and to what the size needs.
        let n = (self.view.l1().len() as u64)
            .max(self.view.geometry().l1_entries_for(size))
            .max(u64::from(sn.l1_size));
        if n * 8 > limits::MAX_L1_BYTES {
            return Err(Error::corrupt(
                self.view.path(),
                sn.l1_table_offset,
                "the snapshot's L1 table would exceed the size limit",
            ));
        }
        let mut l1: Vec<u64> = entries.iter().map(|e| e & !OFLAG_COPIED).collect();
        l1.resize(n as usize, 0);
        let saved = self.save_state();
        let r = (|| {
            let mut tail = self.tail()?;
            self.commit_state(&mut tail, l1, size)
        })();
        self.finish(saved, r.map(|()| sn))
    }

    /// Deletes the snapshot `sel` (`qemu-img snapshot -d`). Returns the
    /// entry deleted.
    pub fn snapshot_delete(&mut self, sel: &SnapshotRef) -> Result<Snapshot> {
        self.begin_write()?;
        self.flush()?;
        let i = sel
            .find(self.view.snapshots())
            .ok_or_else(|| self.view.not_found(sel))?;
        let sn = self.view.snapshots()[i].clone();
        // As QEMU: a snapshot whose L1 table is invalid is not deleted.
        self.view.snapshot_l1(&sn)?;
        let saved = self.save_state();
        let r = (|| {
            let mut tail = self.tail()?;
            let mut list = self.view.snapshots().to_vec();
            list.remove(i);
            self.stage_snapshot_table(&mut tail, list)?;
            let l1 = self.view.l1().to_vec();
            let size = self.view.header().size();
            self.commit_state(&mut tail, l1, size)
        })();
        self.finish(saved, r.map(|()| sn))
    }

    fn save_state(&self) -> Saved {
        Saved {
            header: self.view.header().clone(),
            l1: self.view.l1().to_vec(),
            snapshots: self.view.snapshots().to_vec(),
            snapshot_table_end: self.view.snapshot_table_end(),
        }
    }

    /// On failure before the header switch, the in-memory state goes back
    /// to what is on disk (the new tables past the old end are garbage
    /// nothing counts or points at).
    fn finish<T>(&mut self, saved: Saved, r: Result<T>) -> Result<T> {
        if r.is_err() && !self.poisoned.is_set() {
            *self.view.header_mut() = saved.header;
            *self.view.l1_mut() = saved.l1;
            self.view
                .set_snapshots(saved.snapshots, saved.snapshot_table_end);
            self.view.forget_caches();
            // The metadata map may name the staged tables: rebuild it.
            let _ = self.load_metadata_map();
        }
        r
    }

    /// Where new tables go (see [`Tail`]).
    fn tail(&mut self) -> Result<Tail> {
        let cs = self.view.geometry().cluster_size();
        let file = self.view.storage_len()?.div_ceil(cs);
        // Before anything is written: the new refcounts must count every
        // cluster in use.
        let refs = crate::check::compute_refcounts_inside_file(&self.view)?;
        let used = refs
            .iter()
            .rposition(|r| *r != 0)
            .map_or(0, |i| i as u64 + 1);
        let mut holes: Vec<(u64, u64)> = Vec::new();
        {
            // Cluster 0 is the header; a hole must be free by both counts.
            for ci in 1..file {
                let referenced = refs.get(ci as usize).copied().unwrap_or(0) != 0;
                if referenced || self.w.refcount(ci)? != 0 {
                    continue;
                }
                match holes.last_mut() {
                    Some((first, len)) if *first + *len == ci => *len += 1,
                    _ => holes.push((ci, 1)),
                }
            }
        }
        Ok(Tail {
            holes,
            next: file.max(used) * cs,
        })
    }

    /// Writes the snapshot table `list` past the end and makes it the
    /// in-memory one (the header on disk switches to it at the commit).
    fn stage_snapshot_table(&mut self, tail: &mut Tail, list: Vec<Snapshot>) -> Result<()> {
        let size = self.view.header().size();
        let mut bytes = Vec::new();
        let mut parsed = Vec::with_capacity(list.len());
        for sn in &list {
            let e = encode_entry(sn, size);
            parsed.push(Snapshot::parse(&e, 0).map_err(|source| Error::Format {
                path: self.view.path().to_path_buf(),
                source,
            })?);
            bytes.extend_from_slice(&e);
        }
        if bytes.len() as u64 > limits::MAX_SNAPSHOT_TABLE_BYTES {
            return Err(Error::Unsupported {
                path: self.view.path().to_path_buf(),
                what: "the snapshot table would exceed its size limit".into(),
            });
        }
        let (off, end) = if parsed.is_empty() {
            (0, 0)
        } else {
            let off = tail.put(self, &bytes, "write snapshot table")?;
            (off, off + bytes.len() as u64)
        };
        self.view
            .header_mut()
            .set_snapshot_table(off, parsed.len() as u32);
        self.view.set_snapshots(parsed, end);
        Ok(())
    }

    /// Commits the new state: active L1 entries `l1` (pointing at
    /// existing L2 tables, COPIED flags not yet right), virtual size
    /// `size`, and the snapshot list already staged in memory.
    ///
    /// The refcounts of the new state are computed; each active L2 table
    /// whose COPIED flags disagree with them gets a corrected copy past
    /// the end (count one: COPIED in the L1 entry); the corrected L1 table
    /// is written past the end; then the refcount rebuild writes complete
    /// new refcount structures after them, syncs, and switches the header
    /// to all of it in one write.
    fn commit_state(&mut self, tail: &mut Tail, mut l1: Vec<u64>, size: u64) -> Result<()> {
        let geo = self.view.geometry();
        self.view.header_mut().set_size(size);
        let l1_at = self.view.header().l1_table_offset();
        self.view.header_mut().set_l1_table(l1_at, l1.len() as u32);
        *self.view.l1_mut() = l1.clone();
        self.view.forget_caches();
        let refs = crate::check::compute_refcounts_view(&self.view)?;
        let max = strata_format::refcount::max_refcount(self.view.header().refcount_order());
        // The count stops at the largest refcount, reporting the overflow:
        // only then is the full report needed.
        if refs.iter().any(|r| *r >= max) {
            let report = crate::check::check_view(&self.view)?;
            if let Some(p) = report
                .problems
                .iter()
                .find(|p| p.message.contains("overflow"))
            {
                return Err(Error::Unsupported {
                    path: self.view.path().to_path_buf(),
                    what: format!(
                        "a cluster would have more references than {}-bit refcounts can \
                         count ({})",
                        1u32 << self.view.header().refcount_order(),
                        p.message
                    ),
                });
            }
        }
        let count = |ci: u64| refs.get(ci as usize).copied().unwrap_or(0);
        // Each entry gets its own copy, even of a table two entries name
        // (a hostile image): a copy named twice would count 2, not 1.
        for e in l1.iter_mut() {
            let Some(l2) = L1Entry(*e).l2_offset() else {
                *e = 0;
                continue;
            };
            let table = self.l2_table(l2.get())?;
            let mut fixed = table.as_ref().clone();
            let mut changed = false;
            for idx in 0..geo.l2_entries() {
                let mut entry =
                    L2Entry::read(&fixed, geo, idx).map_err(|source| Error::Format {
                        path: self.view.path().to_path_buf(),
                        source,
                    })?;
                if entry.compressed() {
                    continue;
                }
                let Some(h) = entry.host_cluster() else {
                    continue;
                };
                let want = count(geo.cluster_index(h)) == 1;
                if want != entry.copied() {
                    entry = entry.with_copied(want);
                    entry
                        .write(&mut fixed, geo, idx)
                        .map_err(|source| Error::Format {
                            path: self.view.path().to_path_buf(),
                            source,
                        })?;
                    changed = true;
                }
            }
            if changed {
                let at = tail.put(self, &fixed, "write L2 table")?;
                *e = L1Entry::new(strata_format::HostOffset::new(at), true).0;
            } else {
                let shared = count(geo.cluster_index(l2)) != 1;
                *e = L1Entry::new(
                    strata_format::HostOffset::new(l2.get() & OFFSET_MASK),
                    !shared,
                )
                .0;
            }
        }
        let l1_at = if !l1.is_empty() {
            tail.put(self, &encode_u64_table(&l1), "write L1 table")?
        } else {
            0
        };
        let l1_size = self.view.header().l1_size();
        self.view.header_mut().set_l1_table(l1_at, l1_size);
        *self.view.l1_mut() = l1;
        self.view.forget_caches();
        // Syncs the tables written above, writes the refcount structures,
        // syncs, switches the header (with every change above), syncs.
        if !self.refcounts_in_holes(tail)? {
            crate::repair::rebuild_refcounts_of(self)?;
        }
        self.view.forget_caches();
        Ok(())
    }

    /// The refcount rebuild of [`crate::repair::rebuild_refcounts`], with
    /// the new structures placed in the holes `tail` has left (so that
    /// repeated operations do not grow the file) instead of at its end.
    /// Returns `false`, having written nothing, when the holes are too
    /// small; the caller then rebuilds at the end.
    fn refcounts_in_holes(&mut self, tail: &Tail) -> Result<bool> {
        use strata_format::refcount::{self, REFTABLE_OFFSET_MASK};
        let geo = self.view.geometry();
        let cs = self.view.geometry().cluster_size();
        let order = self.view.header().refcount_order();
        let per = refcount::entries_per_block(geo.cluster_bits(), order);
        let mut refs = crate::check::compute_refcounts_view(&self.view)?;
        // The old refcount structures are not kept.
        let old_table = self.w.refcount_table().to_vec();
        let mut drop_ref = |ci: u64| {
            if let Some(r) = usize::try_from(ci).ok().and_then(|i| refs.get_mut(i)) {
                *r = r.saturating_sub(1);
            }
        };
        let t0 = geo.cluster_index(HostOffset::new(self.view.header().refcount_table_offset()));
        for ci in t0..t0 + u64::from(self.view.header().refcount_table_clusters()) {
            drop_ref(ci);
        }
        for e in &old_table {
            let off = e & REFTABLE_OFFSET_MASK;
            if off != 0 && self.view.geometry().is_aligned(off) {
                drop_ref(geo.cluster_index(HostOffset::new(off)));
            }
        }
        let used = refs
            .iter()
            .rposition(|r| *r != 0)
            .map_or(0, |i| i as u64 + 1);
        // Choose k block clusters and a run of t table clusters in the
        // holes, until the count of blocks covers everything in use.
        let mut k = used.div_ceil(per);
        let mut t;
        let (table_at, blocks) = loop {
            t = (k * 8).div_ceil(cs).max(1);
            let mut holes = tail.holes.clone();
            let Some(run) = holes.iter_mut().find(|(_, len)| *len >= t) else {
                return Ok(false);
            };
            let table_at = run.0;
            run.0 += t;
            run.1 -= t;
            let mut blocks = Vec::new();
            for (first, len) in holes.iter_mut() {
                while *len > 0 && (blocks.len() as u64) < k {
                    blocks.push(*first);
                    *first += 1;
                    *len -= 1;
                }
            }
            if (blocks.len() as u64) < k {
                return Ok(false);
            }
            let end = blocks
                .iter()
                .copied()
                .chain([table_at + t - 1])
                .max()
                .map_or(used, |m| used.max(m + 1));
            let need = end.div_ceil(per);
            if need == k {
                break (table_at, blocks);
            }
            k = need;
        };
        if t * cs > limits::MAX_REFTABLE_BYTES {
            return Ok(false);
        }
        let end = blocks
            .iter()
            .chain([&(table_at + t - 1)])
            .max()
            .copied()
            .unwrap_or(0)
            + 1;
        if refs.len() < end as usize {
            refs.resize(end as usize, 0);
        }
        for ci in blocks.iter().copied().chain(table_at..table_at + t) {
            refs[ci as usize] = 1;
        }
        crate::repair::install_refcounts(self, &refs, &blocks, table_at, t)?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sn(id: &str, name: &str) -> Snapshot {
        Snapshot {
            l1_table_offset: 0x50000,
            l1_size: 2,
            id: id.into(),
            name: name.into(),
            date_sec: 1_600_000_000,
            date_nsec: 7,
            vm_clock_nsec: 0,
            vm_state_size: 0,
            disk_size: Some(1 << 20),
            icount: Some(0),
            extra: Vec::new(),
        }
    }

    #[test]
    fn an_encoded_entry_parses_back_with_qemus_24_bytes_of_extra_data() {
        let e = encode_entry(&sn("1", "snap1"), 0);
        // 40 fixed + 24 extra + "1" + "snap1" = 70, padded to 72.
        assert_eq!(e.len(), 72);
        let p = Snapshot::parse(&e, 0).unwrap();
        assert_eq!(p.id, "1");
        assert_eq!(p.name, "snap1");
        assert_eq!(p.disk_size, Some(1 << 20));
        assert_eq!(p.icount, Some(0));
        assert_eq!(p.extra.len(), 24);
    }

    #[test]
    fn ids_are_one_more_than_the_largest_number() {
        assert_eq!(next_snapshot_id(&[]), "1");
        assert_eq!(
            next_snapshot_id(&[sn("1", "a"), sn("7", "b"), sn("x", "c")]),
            "8"
        );
    }

    #[test]
    fn lookups_follow_qemu() {
        let list = [sn("1", "2"), sn("2", "a"), sn("3", "a")];
        assert_eq!(SnapshotRef::IdOrName("2".into()).find(&list), Some(1));
        assert_eq!(SnapshotRef::Name("2".into()).find(&list), Some(0));
        assert_eq!(SnapshotRef::Name("a".into()).find(&list), Some(1));
        let both = SnapshotRef::parse_convert_arg("snapshot.id=3,snapshot.name=a").unwrap();
        assert_eq!(both.find(&list), Some(2));
        let wrong = SnapshotRef::parse_convert_arg("snapshot.id=1,snapshot.name=a").unwrap();
        assert_eq!(wrong.find(&list), None);
        assert!(SnapshotRef::parse_convert_arg("snapshot.bogus=1").is_err());
    }
}
