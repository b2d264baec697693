//! The positioned storage an image lives on: a small trait with a file
//! backend and an in-memory backend.

use std::fmt;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Positioned reads and writes on something that holds an image.
///
/// Reads past the end of the storage read as zeros (as QEMU's file layer
/// does); `read_at` says how many bytes really came from the storage so
/// that metadata reads can insist on all of them.
pub trait Storage: Send + Sync + fmt::Debug {
    /// Fills `buf` from `offset`; bytes past the end are zeros. Returns the
    /// number of bytes that were inside the storage.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
    /// Writes all of `buf` at `offset`, growing the storage if needed.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Current length in bytes.
    fn len(&self) -> io::Result<u64>;
    /// Whether the storage is empty.
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }
    /// Writes `bufs` one after the other from `offset` (one system call
    /// where the backend can).
    fn write_vectored_at(&self, bufs: &[&[u8]], offset: u64) -> io::Result<()> {
        let mut at = offset;
        for b in bufs {
            self.write_at(b, at)?;
            at += b.len() as u64;
        }
        Ok(())
    }
    /// Truncates or extends to `len` bytes.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Makes everything written so far durable.
    fn sync(&self) -> io::Result<()>;
    /// Whether a [`Storage::sync`] now may have anything to make durable:
    /// `false` only when the backend knows that nothing was written,
    /// cloned, copied, punched or resized through it, and nothing could
    /// have been written through its file ([`Storage::file`]), since its
    /// last successful `sync`. The default, `true`, is for backends that
    /// cannot tell (a wrapper writing through descriptors of its own, as
    /// convert's `O_DIRECT` target does). The qcow2 writer skips a barrier
    /// that would find nothing to write (docs/crash-consistency.md,
    /// "Barriers with nothing to write").
    fn unsynced(&self) -> bool {
        true
    }
    /// Whether `offset` starts a run of data (`true`) or of a hole that
    /// reads as zeros (`false`), and the run's length, at most `len`.
    fn data_run(&self, offset: u64, len: u64) -> io::Result<(bool, u64)> {
        let _ = offset;
        Ok((true, len))
    }
    /// A hint that `[offset, offset+len)` will be read soon: a file starts
    /// reading it in now (`posix_fadvise(WILLNEED)`), without waiting, so
    /// that several cold reads are in flight at once instead of one after
    /// the other. Changes nothing; errors are ignored. The default does
    /// nothing.
    fn will_need(&self, offset: u64, len: u64) {
        let _ = (offset, len);
    }
    /// Bytes the storage occupies on disk (st_blocks * 512 for a file).
    fn allocated_bytes(&self) -> io::Result<u64> {
        self.len()
    }
    /// The OS file behind the storage, if any (for locking).
    fn file(&self) -> Option<&File> {
        None
    }
    /// Gives `[offset, offset+len)` back to the filesystem (the range then
    /// reads as zeros; the length does not change), for clusters nothing
    /// references any more. A backend that cannot does nothing; an error
    /// is only advisory. Not a write the crash protocol orders: it only
    /// ever touches unreferenced clusters.
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        let _ = (offset, len);
        Ok(())
    }
    /// The bytes `[offset, offset+len)` mapped into memory read-only, so a
    /// caller that only passes them on (a merge copying data) needs no copy
    /// of its own. `None` when the backend does not map, or cannot map this
    /// range (not wholly inside the storage, a hole, an error while
    /// mapping or paging it in): the caller reads instead, and a read
    /// reports any error.
    ///
    /// The caller must hold the image's locks (or otherwise know that no
    /// one truncates the file meanwhile): see [`MappedBytes`].
    fn mapped(&self, offset: u64, len: usize) -> io::Result<Option<MappedBytes>> {
        let _ = (offset, len);
        Ok(None)
    }
    /// Writes the bytes `[src_offset, src_offset+len)` of `src` at
    /// `dst_offset` of this storage, as `write_at` would (growing it if
    /// needed; bytes past the end of `src` are zeros), without passing
    /// them through user space where the backends allow: a clone that
    /// shares the filesystem's extents (`FICLONERANGE`), else an in-kernel
    /// copy (`copy_file_range`), else a read and a write. Returns which.
    ///
    /// For the crash protocol and fault injection this is one write: the
    /// bytes are pending until the next `sync`, like written ones. The
    /// default reads and writes through a bounded buffer.
    fn copy_range_from(
        &self,
        src: &dyn Storage,
        src_offset: u64,
        len: u64,
        dst_offset: u64,
    ) -> io::Result<RangeCopy> {
        copy_by_reading(src, self, src_offset, len, dst_offset)?;
        Ok(RangeCopy::ReadWrite)
    }
    /// Whether [`Storage::copy_range_from`] from `src` shares extents
    /// (clones) rather than copies bytes, for ranges aligned to
    /// [`Storage::clone_granule`]: found out by trying once (a block of
    /// `src` cloned into a temporary file beside this one), then
    /// remembered. False for backends without files.
    fn clones_from(&self, src: &dyn Storage) -> bool {
        let _ = src;
        false
    }
    /// The unit a clone needs its offsets and length aligned to (the
    /// filesystem block size); 0 when this storage cannot clone.
    fn clone_granule(&self) -> u64 {
        0
    }
    /// What holds the storage, for tuning: the filesystem of a file.
    fn filesystem(&self) -> FsKind {
        FsKind::Other
    }
    /// The device (`st_dev`) of the file behind the storage, read once at
    /// open; `None` for backends without files.
    fn device(&self) -> Option<u64> {
        None
    }
}

/// How [`Storage::copy_range_from`] moved the bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeCopy {
    /// The destination now shares the source's extents (`FICLONERANGE`).
    Cloned,
    /// Copied inside the kernel (`copy_file_range`; on a filesystem that
    /// shares extents, the kernel may still have cloned).
    Copied,
    /// Read into memory and written.
    ReadWrite,
}

/// The filesystem a file storage lives on (`statfs`'s `f_type`), for the
/// choices that depend on it (writeback hints, cloning).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsKind {
    /// ext2/3/4.
    Ext4,
    /// XFS.
    Xfs,
    /// btrfs.
    Btrfs,
    /// tmpfs (memory: nothing to write back).
    Tmpfs,
    /// Anything else, or not a file.
    Other,
}

/// Bytes moved per step of a read+write fallback copy.
const COPY_CHUNK: u64 = 4 << 20;

/// Copies by reading `src` and writing `dst`, [`COPY_CHUNK`] at a time.
fn copy_by_reading(
    src: &dyn Storage,
    dst: &(impl Storage + ?Sized),
    src_offset: u64,
    len: u64,
    dst_offset: u64,
) -> io::Result<()> {
    let overflow = || io::Error::new(io::ErrorKind::InvalidInput, "offset overflows");
    src_offset.checked_add(len).ok_or_else(overflow)?;
    dst_offset.checked_add(len).ok_or_else(overflow)?;
    let mut buf = vec![0u8; len.min(COPY_CHUNK) as usize];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(COPY_CHUNK) as usize;
        src.read_at(&mut buf[..n], src_offset + done)?;
        dst.write_at(&buf[..n], dst_offset + done)?;
        done += n as u64;
    }
    Ok(())
}

/// Bytes of a storage mapped into memory read-only, unmapped when dropped
/// (or, from a backend without files, a copy of them).
///
/// A mapping reads the page cache in place: no copy into a buffer. It is
/// created for one range just before it is written elsewhere and dropped
/// right after, so it adds at most that range to the resident memory. Its
/// pages are read in when it is made (`MADV_POPULATE_READ`), so an I/O
/// error shows there, as a fallback to reading, not as a signal. A process
/// that truncated the file below the range after that, ignoring the image
/// locks Strata holds, would make the next access fail with `SIGBUS` (in
/// a `write`, with `EFAULT`): like any crash, this loses nothing
/// (docs/crash-consistency.md).
pub struct MappedBytes {
    bytes: Mapped,
}

enum Mapped {
    Map(memmap2::Mmap),
    Copy(Vec<u8>),
}

impl MappedBytes {
    /// Bytes that stand in for a mapping (backends without files).
    pub fn copied(bytes: Vec<u8>) -> MappedBytes {
        MappedBytes {
            bytes: Mapped::Copy(bytes),
        }
    }
}

impl std::ops::Deref for MappedBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match &self.bytes {
            Mapped::Map(m) => m,
            Mapped::Copy(v) => v,
        }
    }
}

impl fmt::Debug for MappedBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MappedBytes({} bytes)", self.len())
    }
}

/// Maps `[offset, offset+len)` of `file`, which is data (no holes) and at
/// least that long, and reads its pages in. `None` if either fails.
#[allow(unsafe_code)]
fn map_range(file: &File, offset: u64, len: usize) -> Option<MappedBytes> {
    let mut opts = memmap2::MmapOptions::new();
    opts.offset(offset).len(len);
    // SAFETY: the mapping is read-only and the caller checked that the
    // range lies inside the file. What `Mmap` cannot rule out is another
    // process changing or truncating the file while it is mapped: the
    // images a merge reads are locked against writers (QEMU-compatible
    // locks), the range is used at once and unmapped, and a truncation
    // would raise SIGBUS (a crash, which the write protocol tolerates),
    // not corrupt memory.
    let map = unsafe { opts.map(file) }.ok()?;
    match map.advise(memmap2::Advice::PopulateRead) {
        // EINVAL: a kernel before 5.14; the pages come in as they are read.
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
        Err(_) => return None,
    }
    Some(MappedBytes {
        bytes: Mapped::Map(map),
    })
}

/// A storage backed by a file.
pub struct FileStorage {
    file: File,
    path: PathBuf,
    writeback: Writeback,
    fs: FsInfo,
    /// Whether clones from a source on device `st_dev` work: the probe's
    /// answers (see [`Storage::clones_from`]).
    clone_probes: Mutex<Vec<(u64, bool)>>,
    /// On XFS, what [`FileStorage::growing`] knows of the file's length
    /// (a lower bound: a write ending inside it cannot extend the file).
    known_len: std::sync::atomic::AtomicU64,
    /// Held while a write, clone or copy may extend the file (XFS).
    grow: Mutex<()>,
    /// Whether anything may have changed the file since the last
    /// successful sync through this storage ([`Storage::unsynced`]): set
    /// by every write, clone, copy, punch and length change (after it, so
    /// that a sync running meanwhile cannot clear it too early) and by
    /// every handout of the file; cleared just before each `fdatasync`.
    /// Set at open: whatever was written before (by anyone) is not known
    /// to be durable until the first sync.
    unsynced: std::sync::atomic::AtomicBool,
}

/// The filesystem of a file storage, read once at open.
#[derive(Debug, Clone, Copy)]
struct FsInfo {
    kind: FsKind,
    /// `f_bsize`: the unit of clones (0: unknown, or a block device).
    block: u64,
    /// `st_dev` of the file.
    dev: Option<u64>,
}

impl FsInfo {
    fn of(file: &File) -> FsInfo {
        use nix::sys::statfs;
        use std::os::unix::fs::FileTypeExt;
        use std::os::unix::fs::MetadataExt;
        let meta = file.metadata().ok();
        let regular = meta
            .as_ref()
            .is_some_and(|m| !m.file_type().is_block_device());
        let dev = meta.as_ref().map(|m| m.dev());
        let Ok(st) = statfs::fstatfs(file) else {
            return FsInfo {
                kind: FsKind::Other,
                block: 0,
                dev,
            };
        };
        let t = st.filesystem_type();
        let kind = if t == statfs::XFS_SUPER_MAGIC {
            FsKind::Xfs
        } else if t == statfs::BTRFS_SUPER_MAGIC {
            FsKind::Btrfs
        } else if t == statfs::EXT4_SUPER_MAGIC {
            FsKind::Ext4
        } else if t == statfs::TMPFS_MAGIC {
            FsKind::Tmpfs
        } else {
            FsKind::Other
        };
        let block = if regular {
            u64::try_from(st.block_size()).unwrap_or(0)
        } else {
            0
        };
        FsInfo { kind, block, dev }
    }
}

/// Starts the kernel's writeback of written data early, on a helper thread,
/// so that the disk works while the caller goes on writing and the next
/// `sync` finds little left to do.
///
/// Every [`WRITEBACK_EVERY`] bytes the helper submits the dirty range for
/// writeback; every [`FLUSH_EVERY`] bytes it also flushes the file
/// (`fdatasync`). A virtual disk with a write-back cache in its host (this
/// project's machines) takes writes fast and pays for durability only
/// when flushed, at about the rate the data reaches it; flushing as the
/// data comes, off the writer's path, overlaps that cost with the writing,
/// and the caller's own `sync` then waits for the last few MiB only.
///
/// Hints only: durability still comes from `sync` alone, and writing back
/// or persisting written data early is something the page cache and the
/// disk may do at any moment anyway (the crash protocol assumes it; an
/// extra flush never makes a later write durable before an earlier one).
/// The helper flushes through its own open file description, not a
/// duplicate descriptor, so that a write error it sees is still reported
/// by the caller's `sync` (the kernel reports a writeback error once per
/// open file description).
///
/// What the helper does depends on the filesystem ([`WritebackMode::for_fs`]):
/// the hints were tuned on ext4; on btrfs each `DONTNEED` on dirty pages
/// runs the copy-on-write allocation of the range in the helper while the
/// writer waits on the same extent locks, and on tmpfs there is nothing to
/// write back.
#[derive(Default)]
struct Writeback {
    mode: WritebackMode,
    state: Mutex<WritebackState>,
}

/// Which of the early writeback helper's actions run on a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct WritebackMode {
    /// `posix_fadvise(DONTNEED)` every [`WRITEBACK_EVERY`] bytes.
    hint: bool,
    /// `fdatasync` every [`FLUSH_EVERY`] bytes.
    flush: bool,
}

impl Default for WritebackMode {
    fn default() -> WritebackMode {
        WritebackMode::FULL
    }
}

impl WritebackMode {
    const FULL: WritebackMode = WritebackMode {
        hint: true,
        flush: true,
    };
    const OFF: WritebackMode = WritebackMode {
        hint: false,
        flush: false,
    };
    /// The mode for a file on `fs`; `STRATA_WRITEBACK` (`full`, `flush`,
    /// `hint`, `off`) overrides it, for measurements (docs/BENCHMARKS.md).
    fn for_fs(fs: FsKind) -> WritebackMode {
        let forced = std::env::var("STRATA_WRITEBACK").ok();
        match forced.as_deref() {
            Some("full") => return WritebackMode::FULL,
            Some("off") => return WritebackMode::OFF,
            Some("flush") => {
                return WritebackMode {
                    hint: false,
                    flush: true,
                }
            }
            Some("hint") => {
                return WritebackMode {
                    hint: true,
                    flush: false,
                }
            }
            _ => {}
        }
        match fs {
            FsKind::Tmpfs => WritebackMode::OFF,
            FsKind::Btrfs => WritebackMode {
                hint: false,
                flush: true,
            },
            FsKind::Ext4 | FsKind::Xfs | FsKind::Other => WritebackMode::FULL,
        }
    }
}

#[derive(Default)]
struct WritebackState {
    /// Range written since the last hint: (start, end).
    dirty: Option<(u64, u64)>,
    /// Bytes written since the last hint.
    bytes: u64,
    /// The helper thread's queue (started at the first hint).
    tx: Option<std::sync::mpsc::Sender<(u64, u64, u64)>>,
    /// Early flushes the helper has done.
    flushes: Arc<std::sync::atomic::AtomicU64>,
    handle: Option<std::thread::JoinHandle<()>>,
}

/// Bytes written between two writeback hints.
const WRITEBACK_EVERY: u64 = 8 << 20;
/// Bytes written between two early flushes.
const FLUSH_EVERY: u64 = 32 << 20;

impl Writeback {
    fn wrote(&self, file: &File, offset: u64, len: u64) {
        if self.mode == WritebackMode::OFF {
            return;
        }
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let end = offset.saturating_add(len);
        st.dirty = Some(match st.dirty {
            Some((s, e)) => (s.min(offset), e.max(end)),
            None => (offset, end),
        });
        st.bytes += len;
        if st.bytes < WRITEBACK_EVERY {
            return;
        }
        let Some((start, end)) = st.dirty.take() else {
            return;
        };
        let bytes = std::mem::take(&mut st.bytes);
        if st.tx.is_none() {
            let Ok(f) = file.try_clone() else { return };
            let (tx, rx) = std::sync::mpsc::channel::<(u64, u64, u64)>();
            let flushes = st.flushes.clone();
            let mode = self.mode;
            let handle = std::thread::Builder::new()
                .name("writeback".into())
                .spawn(move || writeback_helper(&f, rx, &flushes, mode));
            let Ok(handle) = handle else { return };
            st.tx = Some(tx);
            st.handle = Some(handle);
        }
        if let Some(tx) = &st.tx {
            let _ = tx.send((start, end, bytes));
        }
    }
}

/// The helper thread of [`Writeback`]: hints for each range received
/// (start, end, bytes written in it), flushes every [`FLUSH_EVERY`] bytes
/// written. Errors are for the caller's `sync` to report.
fn writeback_helper(
    f: &File,
    ranges: std::sync::mpsc::Receiver<(u64, u64, u64)>,
    flushes: &std::sync::atomic::AtomicU64,
    mode: WritebackMode,
) {
    // Without /proc, no flushes.
    let own = own_description(f).filter(|_| mode.flush);
    let mut unflushed = 0u64;
    for (s, e, bytes) in ranges {
        let (Ok(start), Ok(len)) = (i64::try_from(s), i64::try_from(e - s)) else {
            continue;
        };
        // DONTNEED submits the dirty pages for writeback (and drops clean
        // ones).
        if mode.hint {
            let _ = nix::fcntl::posix_fadvise(
                f,
                start,
                len,
                nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
            );
        }
        unflushed += bytes;
        if unflushed >= FLUSH_EVERY {
            unflushed = 0;
            if own.as_ref().is_some_and(|o| o.sync_data().is_ok()) {
                flushes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
    }
}

/// A second open file description of `f`'s file, not a duplicate of the
/// descriptor: a flush through it cannot consume a write error that the
/// owner of `f` must still see from its own `sync`. None without /proc.
fn own_description(f: &File) -> Option<File> {
    use std::os::fd::AsRawFd;
    File::open(format!("/proc/self/fd/{}", f.as_raw_fd())).ok()
}

impl Drop for Writeback {
    fn drop(&mut self) {
        let st = self.state.get_mut().unwrap_or_else(|p| p.into_inner());
        st.tx = None;
        if let Some(h) = st.handle.take() {
            let _ = h.join();
        }
    }
}

impl fmt::Debug for FileStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FileStorage({})", self.path.display())
    }
}

impl FileStorage {
    /// Opens `path` read-only or read-write.
    ///
    /// Only regular files and block devices are accepted, and the open
    /// never blocks: a FIFO (which `open` would wait on until a writer
    /// came, forever if none does), a character device, a socket or a
    /// directory, named as an image or by a hostile backing name, is
    /// refused with an error naming what it is (see [`check_file_type`]).
    pub fn open(path: &Path, writable: bool) -> io::Result<FileStorage> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(writable)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)?;
        check_file_type(&file)?;
        clear_nonblock(&file)?;
        Ok(FileStorage::from_file(file, path))
    }
    /// Creates (or truncates) `path` for reading and writing.
    pub fn create(path: &Path) -> io::Result<FileStorage> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        Ok(FileStorage::from_file(file, path))
    }
    /// Wraps an open file.
    pub fn from_file(file: File, path: &Path) -> FileStorage {
        let fs = FsInfo::of(&file);
        FileStorage {
            file,
            path: path.to_path_buf(),
            writeback: Writeback {
                mode: WritebackMode::for_fs(fs.kind),
                state: Mutex::default(),
            },
            fs,
            clone_probes: Mutex::new(Vec::new()),
            known_len: std::sync::atomic::AtomicU64::new(0),
            grow: Mutex::new(()),
            unsynced: std::sync::atomic::AtomicBool::new(true),
        }
    }
}

/// Accepts an open file as image storage only when it is a regular file or
/// a block device; otherwise an error saying what it is ("a FIFO", "a
/// directory", ...), in the words of QEMU's `file` driver.
pub fn check_file_type(file: &File) -> io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let t = file.metadata()?.file_type();
    let what = if t.is_file() || t.is_block_device() {
        return Ok(());
    } else if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a file"
    };
    Err(io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("{what}, not a regular file or block device"),
    ))
}

/// Clears `O_NONBLOCK` (set only so that opening could not hang) so that
/// reads and writes block as usual.
fn clear_nonblock(file: &File) -> io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let flags = fcntl(file, FcntlArg::F_GETFL).map_err(io::Error::from)?;
    let flags = OFlag::from_bits_truncate(flags) & !OFlag::O_NONBLOCK;
    fcntl(file, FcntlArg::F_SETFL(flags)).map_err(io::Error::from)?;
    Ok(())
}

/// Length of a file; for a block device (whose `st_size` is 0), the
/// device's size.
fn file_len(file: &File) -> io::Result<u64> {
    use std::os::unix::fs::FileTypeExt;
    let m = file.metadata()?;
    if m.file_type().is_block_device() {
        let end =
            nix::unistd::lseek(file, 0, nix::unistd::Whence::SeekEnd).map_err(io::Error::from)?;
        return Ok(end as u64);
    }
    Ok(m.len())
}

impl FileStorage {
    /// Records that the file may have changed since the last sync.
    fn changed(&self) {
        self.unsynced
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// `pwritev` of all of `bufs` at `offset` (in groups of up to 1024
    /// buffers, resuming after short writes).
    fn pwritev_all(&self, bufs: &[&[u8]], offset: u64) -> io::Result<()> {
        use std::io::IoSlice;
        // (buffer index, bytes of it already written)
        let (mut i, mut skip) = (0usize, 0usize);
        let mut at = offset;
        while i < bufs.len() {
            let slices: Vec<IoSlice<'_>> = bufs[i..]
                .iter()
                .take(1024)
                .enumerate()
                .map(|(k, b)| IoSlice::new(if k == 0 { &b[skip..] } else { b }))
                .collect();
            let off =
                i64::try_from(at).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
            let mut n = match nix::sys::uio::pwritev(&self.file, &slices, off) {
                Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero)),
                Ok(n) => n,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(io::Error::from(e)),
            };
            at += n as u64;
            while n > 0 && i < bufs.len() {
                let left = bufs[i].len() - skip;
                if n >= left {
                    n -= left;
                    i += 1;
                    skip = 0;
                } else {
                    skip += n;
                    n = 0;
                }
            }
            while i < bufs.len() && bufs[i].len() == skip {
                i += 1;
                skip = 0;
            }
        }
        Ok(())
    }

    /// Runs `op`, a write (or clone, or copy) ending at `end`. On XFS,
    /// when `end` lies past the end of the file and `extend` is set, the
    /// file is first extended to `end` (a truncate up, which writes no
    /// byte): the write then lands inside the file, where XFS does not
    /// preallocate speculatively. A write past the end of a file makes XFS
    /// reserve blocks beyond it, up to the file's own size (kept until
    /// the next sync trims them, [`FileStorage::trim_preallocation`], or
    /// the last close): measured, a commit copying 2 GiB into a 2 GiB base
    /// peaked at 4.6 to 6.1 GiB on disk for a 4 GiB result, and a pull by
    /// clones at +512 MiB behind the L2 table written after a clone
    /// (docs/BENCHMARKS.md). Clones (`extend` unset) allocate nothing and
    /// need no extension; they still run under the lock, so that no
    /// extension can cut short a clone that grew the file meanwhile.
    ///
    /// The extension only moves the end of the file earlier than the
    /// write would: a crash may leave the file longer, ending in a hole,
    /// as a crash after the write but before its data was durable could.
    /// Nothing reads past the clusters the image references. Errors of
    /// the extension are ignored (the write reports its own).
    fn growing<T>(
        &self,
        end: u64,
        extend: bool,
        op: impl FnOnce() -> io::Result<T>,
    ) -> io::Result<T> {
        use std::sync::atomic::Ordering;
        if self.fs.kind != FsKind::Xfs || end <= self.known_len.load(Ordering::Relaxed) {
            return op();
        }
        let _g = self.grow.lock().unwrap_or_else(|p| p.into_inner());
        let len = file_len(&self.file).ok();
        if let (true, Some(len)) = (extend, len) {
            if end > len {
                let _ = self.file.set_len(end);
            }
        }
        let r = op();
        if let Ok(len) = file_len(&self.file) {
            self.known_len.fetch_max(len, Ordering::Relaxed);
        }
        r
    }
}

impl Storage for FileStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let mut done = 0;
        while done < buf.len() {
            let pos = offset
                .checked_add(done as u64)
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "offset overflows"))?;
            match self.file.read_at(&mut buf[done..], pos) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        buf[done..].fill(0);
        Ok(done)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let end = offset.saturating_add(buf.len() as u64);
        let r = self.growing(end, true, || self.file.write_all_at(buf, offset));
        self.changed();
        r?;
        self.writeback.wrote(&self.file, offset, buf.len() as u64);
        Ok(())
    }
    fn write_vectored_at(&self, bufs: &[&[u8]], offset: u64) -> io::Result<()> {
        let total: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        let end = offset.saturating_add(total);
        let r = self.growing(end, true, || self.pwritev_all(bufs, offset));
        self.changed();
        r?;
        self.writeback.wrote(&self.file, offset, total);
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        file_len(&self.file)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        if self.fs.kind != FsKind::Xfs {
            let r = self.file.set_len(len);
            self.changed();
            return r;
        }
        let _g = self.grow.lock().unwrap_or_else(|p| p.into_inner());
        let r = self.file.set_len(len);
        self.changed();
        let known = if r.is_ok() { len } else { 0 };
        self.known_len
            .store(known, std::sync::atomic::Ordering::Relaxed);
        r
    }
    fn sync(&self) -> io::Result<()> {
        use std::sync::atomic::Ordering;
        // Cleared before the fdatasync: a change made while it runs sets
        // it again (the next sync then runs); a failed sync leaves it set.
        self.unsynced.store(false, Ordering::SeqCst);
        if let Err(e) = self.file.sync_data() {
            self.changed();
            return Err(e);
        }
        if self.fs.kind == FsKind::Xfs {
            self.trim_preallocation();
        }
        Ok(())
    }
    fn unsynced(&self) -> bool {
        self.unsynced.load(std::sync::atomic::Ordering::SeqCst)
    }
    fn data_run(&self, offset: u64, len: u64) -> io::Result<(bool, u64)> {
        use nix::unistd::{lseek, Whence};
        let size = self.len()?;
        if offset >= size {
            return Ok((false, len));
        }
        let off =
            i64::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let fd = &self.file;
        match lseek(fd, off, Whence::SeekData) {
            Ok(d) if d as u64 == offset => {
                let h = lseek(fd, off, Whence::SeekHole)
                    .map(|h| h as u64)
                    .unwrap_or(size);
                Ok((true, (h - offset).min(len).max(1)))
            }
            Ok(d) => Ok((false, (d as u64 - offset).min(len))),
            // ENXIO: no data after offset.
            Err(nix::errno::Errno::ENXIO) => Ok((false, len)),
            // Filesystems without SEEK_DATA: everything up to the end is
            // data.
            Err(_) => Ok((true, (size - offset).min(len))),
        }
    }
    fn will_need(&self, offset: u64, len: u64) {
        if let (Ok(off), Ok(n)) = (i64::try_from(offset), i64::try_from(len)) {
            let _ = nix::fcntl::posix_fadvise(
                &self.file,
                off,
                n,
                nix::fcntl::PosixFadviseAdvice::POSIX_FADV_WILLNEED,
            );
        }
    }
    fn allocated_bytes(&self) -> io::Result<u64> {
        use std::os::unix::fs::MetadataExt;
        Ok(self.file.metadata()?.blocks() * 512)
    }
    /// The file; handing it out counts as a change ([`Storage::unsynced`]):
    /// what the caller does with it (`posix_fallocate`, a descriptor of
    /// its own) is out of this storage's sight.
    fn file(&self) -> Option<&File> {
        self.changed();
        Some(&self.file)
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        use nix::fcntl::{fallocate, FallocateFlags};
        // Before and after: the punch may be under way when a sync runs.
        self.changed();
        let _after = ChangedOnDrop(self);
        let (Ok(off), Ok(n)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        };
        let mode = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
        loop {
            match fallocate(&self.file, mode, off, n) {
                Err(nix::errno::Errno::EINTR) => continue,
                r => return r.map_err(io::Error::from),
            }
        }
    }
    fn mapped(&self, offset: u64, len: usize) -> io::Result<Option<MappedBytes>> {
        // Data all through (a data run ends at the end of the file):
        // touching a hole through a mapping would allocate a page for it
        // (on tmpfs, in the file), and past the end raise SIGBUS.
        match self.data_run(offset, len as u64) {
            Ok((true, run)) if len > 0 && run == len as u64 => {
                Ok(map_range(&self.file, offset, len))
            }
            _ => Ok(None),
        }
    }
    fn copy_range_from(
        &self,
        src: &dyn Storage,
        src_offset: u64,
        len: u64,
        dst_offset: u64,
    ) -> io::Result<RangeCopy> {
        let overflow = || io::Error::new(io::ErrorKind::InvalidInput, "offset overflows");
        src_offset.checked_add(len).ok_or_else(overflow)?;
        dst_offset.checked_add(len).ok_or_else(overflow)?;
        // A clone or copy changes the file: marked once it is over,
        // whichever way it ends.
        let _after = ChangedOnDrop(self);
        let Some(from) = src.file() else {
            copy_by_reading(src, self, src_offset, len, dst_offset)?;
            return Ok(RangeCopy::ReadWrite);
        };
        if len == 0 {
            return Ok(RangeCopy::Copied);
        }
        // Past the end of the source: zeros, written (a clone or an
        // in-kernel copy would stop short there).
        let inside = src.len()?.saturating_sub(src_offset).min(len);
        if inside < len {
            let zeros = vec![0u8; (len - inside).min(COPY_CHUNK) as usize];
            let mut at = inside;
            while at < len {
                let n = (len - at).min(COPY_CHUNK) as usize;
                self.write_at(&zeros[..n], dst_offset + at)?;
                at += n as u64;
            }
        }
        if inside == 0 {
            return Ok(RangeCopy::ReadWrite);
        }
        let g = self.fs.block;
        let aligned = g > 0
            && src_offset.is_multiple_of(g)
            && dst_offset.is_multiple_of(g)
            && inside.is_multiple_of(g);
        if aligned && self.clone_known(src) != Some(false) {
            let end = dst_offset + inside;
            let cloned = self.growing(end, false, || {
                clone_range(from, &self.file, src_offset, inside, dst_offset)
            });
            match cloned {
                Ok(()) => {
                    self.clone_learned(src, true);
                    return Ok(RangeCopy::Cloned);
                }
                Err(e) if not_supported(&e) => {
                    // EINVAL may be this range alone (e.g. a source opened
                    // with O_APPEND, an inline extent): only the others
                    // say the filesystem cannot.
                    if e.raw_os_error() != Some(libc::EINVAL) {
                        self.clone_learned(src, false);
                    }
                }
                Err(e) => return Err(e),
            }
        }
        let copied = self.growing(dst_offset + inside, true, || {
            copy_in_kernel(from, &self.file, src_offset, inside, dst_offset)
        })?;
        if copied > 0 {
            self.writeback.wrote(&self.file, dst_offset, copied);
        }
        if copied == inside {
            return Ok(RangeCopy::Copied);
        }
        copy_by_reading(
            src,
            self,
            src_offset + copied,
            inside - copied,
            dst_offset + copied,
        )?;
        Ok(RangeCopy::ReadWrite)
    }
    fn clones_from(&self, src: &dyn Storage) -> bool {
        let Some(from) = src.file() else {
            return false;
        };
        if self.fs.block == 0 {
            return false;
        }
        if let Some(known) = self.clone_known(src) {
            return known;
        }
        let works = probe_clone(from, &self.path, self.fs.block);
        self.clone_learned(src, works);
        works
    }
    fn clone_granule(&self) -> u64 {
        self.fs.block
    }
    fn filesystem(&self) -> FsKind {
        self.fs.kind
    }
    fn device(&self) -> Option<u64> {
        self.fs.dev
    }
}

/// Marks its storage changed when dropped: at the end of an operation
/// whichever way it leaves.
struct ChangedOnDrop<'a>(&'a FileStorage);

impl Drop for ChangedOnDrop<'_> {
    fn drop(&mut self) {
        self.0.changed();
    }
}

/// Blocks past the end of a file on XFS beyond which [`FileStorage::sync`]
/// gives them back.
const PREALLOC_SLACK: u64 = 64 << 20;

impl FileStorage {
    /// Gives back the blocks XFS preallocates past the end of a growing
    /// file ("speculative preallocation", as large as the file itself,
    /// kept after the file is closed when it was opened more than once):
    /// a truncate to the same length, which changes no byte. Measured: a
    /// commit of 2 GiB into a 2 GiB base left it holding 6 to 8 GiB for a
    /// 4 GiB file (docs/BENCHMARKS.md). Only when the file holds more
    /// than [`PREALLOC_SLACK`] beyond its length (a sparse image holds
    /// less than its length); errors are ignored (a read-only file).
    fn trim_preallocation(&self) {
        use std::os::unix::fs::MetadataExt;
        let Ok(m) = self.file.metadata() else { return };
        if m.blocks().saturating_mul(512) > m.len().saturating_add(PREALLOC_SLACK) {
            let _ = self.file.set_len(m.len());
        }
    }
    /// What the probe (or an earlier clone) found for sources on `src`'s
    /// device.
    fn clone_known(&self, src: &dyn Storage) -> Option<bool> {
        let dev = src.device()?;
        let probes = self.clone_probes.lock().unwrap_or_else(|p| p.into_inner());
        probes.iter().find(|(d, _)| *d == dev).map(|(_, w)| *w)
    }
    fn clone_learned(&self, src: &dyn Storage, works: bool) {
        let Some(dev) = src.device() else { return };
        let mut probes = self.clone_probes.lock().unwrap_or_else(|p| p.into_inner());
        match probes.iter_mut().find(|(d, _)| *d == dev) {
            Some(p) => p.1 = works,
            None => probes.push((dev, works)),
        }
    }
}

/// Errors that say a clone or an in-kernel copy cannot be done here (the
/// caller falls back), as opposed to a failure of the storage itself.
fn not_supported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL | libc::EOPNOTSUPP | libc::EXDEV | libc::ENOSYS | libc::ENOTTY)
    )
}

/// `FICLONERANGE`: makes `[dst_offset, +len)` of `to` share the extents of
/// `[src_offset, +len)` of `from` (all aligned to the block size).
#[allow(unsafe_code)]
fn clone_range(
    from: &File,
    to: &File,
    src_offset: u64,
    len: u64,
    dst_offset: u64,
) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let arg = libc::file_clone_range {
        src_fd: i64::from(from.as_raw_fd()),
        src_offset,
        src_length: len,
        dest_offset: dst_offset,
    };
    loop {
        // SAFETY: FICLONERANGE reads one `file_clone_range`, which `arg`
        // is, alive for the call; both descriptors are open files we own.
        let r = unsafe { libc::ioctl(to.as_raw_fd(), libc::FICLONERANGE, &arg) };
        if r == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// `copy_file_range` of up to `len` bytes; returns how many were copied
/// before the kernel said it cannot (those the caller copies otherwise).
fn copy_in_kernel(
    from: &File,
    to: &File,
    src_offset: u64,
    len: u64,
    dst_offset: u64,
) -> io::Result<u64> {
    let mut done = 0u64;
    while done < len {
        let (Ok(mut off_in), Ok(mut off_out)) = (
            i64::try_from(src_offset + done),
            i64::try_from(dst_offset + done),
        ) else {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        };
        let want = usize::try_from(len - done)
            .unwrap_or(usize::MAX)
            .min(1 << 30);
        match nix::fcntl::copy_file_range(from, Some(&mut off_in), to, Some(&mut off_out), want) {
            Ok(0) => break,
            Ok(n) => done += n as u64,
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => {
                let e = io::Error::from(e);
                if not_supported(&e) {
                    break;
                }
                return Err(e);
            }
        }
    }
    Ok(done)
}

/// Tries a clone of `from`'s first block into an unnamed temporary file in
/// `beside`'s directory (nothing is left behind).
fn probe_clone(from: &File, beside: &Path, block: u64) -> bool {
    use std::os::unix::fs::OpenOptionsExt;
    if from.metadata().map_or(true, |m| m.len() < block) {
        return false;
    }
    let dir = match beside.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let Ok(tmp) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_TMPFILE)
        .open(dir)
    else {
        return false;
    };
    clone_range(from, &tmp, 0, block, 0).is_ok()
}

/// A storage held in memory, cheap to clone (clones share the bytes).
#[derive(Debug, Clone, Default)]
pub struct MemStorage {
    bytes: Arc<Mutex<Vec<u8>>>,
}

impl MemStorage {
    /// An empty in-memory storage.
    pub fn new() -> MemStorage {
        MemStorage::default()
    }
    /// An in-memory storage holding `bytes`.
    pub fn from_bytes(bytes: Vec<u8>) -> MemStorage {
        MemStorage {
            bytes: Arc::new(Mutex::new(bytes)),
        }
    }
    /// A copy of the current bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.lock().clone()
    }
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        // A panic while holding the lock cannot leave the Vec invalid.
        self.bytes.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Largest size an in-memory storage grows to (guards fuzzers and tests
/// against hostile offsets).
pub const MEM_STORAGE_MAX: u64 = 1 << 32;

impl Storage for MemStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let b = self.lock();
        let len = b.len() as u64;
        let n = if offset >= len {
            0
        } else {
            (len - offset).min(buf.len() as u64) as usize
        };
        if n > 0 {
            buf[..n].copy_from_slice(&b[offset as usize..offset as usize + n]);
        }
        buf[n..].fill(0);
        Ok(n)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|e| *e <= MEM_STORAGE_MAX)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "write past the memory storage limit",
                )
            })?;
        let mut b = self.lock();
        if (b.len() as u64) < end {
            b.resize(end as usize, 0);
        }
        b[offset as usize..end as usize].copy_from_slice(buf);
        Ok(())
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut b = self.lock();
        let size = b.len() as u64;
        let end = offset.saturating_add(len).min(size);
        if offset < end {
            b[offset as usize..end as usize].fill(0);
        }
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.lock().len() as u64)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        if len > MEM_STORAGE_MAX {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "length past the memory storage limit",
            ));
        }
        self.lock().resize(len as usize, 0);
        Ok(())
    }
    fn sync(&self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_past_the_end_are_zero_filled_and_counted() {
        let s = MemStorage::from_bytes(vec![1, 2, 3]);
        let mut buf = [9u8; 5];
        assert_eq!(s.read_at(&mut buf, 1).unwrap(), 2);
        assert_eq!(buf, [2, 3, 0, 0, 0]);
        assert_eq!(s.read_at(&mut buf, 100).unwrap(), 0);
        assert_eq!(buf, [0; 5]);
    }

    #[test]
    fn open_refuses_a_fifo_and_a_directory_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        // Nobody writes to the FIFO: a blocking open would never return.
        for writable in [false, true] {
            let e = FileStorage::open(&fifo, writable).unwrap_err();
            assert!(e.to_string().contains("a FIFO"), "{e}");
            let e = FileStorage::open(dir.path(), false).unwrap_err();
            assert!(e.to_string().contains("a directory"), "{e}");
        }
        // A regular file opens, and blocks as usual afterwards.
        let f = dir.path().join("f");
        std::fs::write(&f, [7u8; 512]).unwrap();
        let s = FileStorage::open(&f, true).unwrap();
        let flags = nix::fcntl::fcntl(&s.file, nix::fcntl::FcntlArg::F_GETFL).unwrap();
        assert_eq!(flags & libc::O_NONBLOCK, 0);
        assert_eq!(s.len().unwrap(), 512);
    }

    #[test]
    fn file_storage_reports_holes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let s = FileStorage::create(&p).unwrap();
        s.set_len(1 << 20).unwrap();
        s.write_at(&[1u8; 4096], 512 << 10).unwrap();
        let (data, len) = s.data_run(0, 1 << 20).unwrap();
        assert!(!data);
        assert_eq!(len, 512 << 10);
        let (data, _) = s.data_run(512 << 10, 4096).unwrap();
        assert!(data);
    }

    #[test]
    fn unsynced_counts_every_change_and_every_handout_of_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, [5u8; 8192]).unwrap();
        let s = FileStorage::open(&p, true).unwrap();
        // Just opened: whatever was written before is not known durable.
        assert!(s.unsynced());
        s.sync().unwrap();
        assert!(!s.unsynced());
        // Reads, lengths and maps change nothing.
        let mut b = [0u8; 16];
        s.read_at(&mut b, 0).unwrap();
        s.len().unwrap();
        s.data_run(0, 8192).unwrap();
        drop(s.mapped(0, 4096).unwrap());
        assert!(!s.unsynced());
        let changes: [&dyn Fn(&FileStorage); 6] = [
            &|s| s.write_at(&[1; 10], 100).unwrap(),
            &|s| s.write_vectored_at(&[&[1; 10], &[2; 10]], 200).unwrap(),
            &|s| s.set_len(16384).unwrap(),
            &|s| s.punch_hole(0, 4096).unwrap(),
            &|s| {
                let src = MemStorage::from_bytes(vec![9; 4096]);
                s.copy_range_from(&src, 0, 4096, 4096).unwrap();
            },
            // What a caller does with the file is out of sight: e.g. a
            // write through it (or posix_fallocate, or an O_DIRECT
            // descriptor opened from it).
            &|s| s.file().unwrap().write_all_at(&[7; 10], 300).unwrap(),
        ];
        for (i, change) in changes.iter().enumerate() {
            change(&s);
            assert!(s.unsynced(), "change {i} not seen");
            s.sync().unwrap();
            assert!(!s.unsynced(), "change {i}: the sync did not count");
        }
        // A failed operation counts too (it may have written part).
        let e = s.write_at(&[1], u64::MAX).unwrap_err();
        let _ = e;
        assert!(s.unsynced());
        // Backends that cannot tell always say a sync may be needed.
        let m = MemStorage::new();
        m.sync().unwrap();
        assert!(m.unsynced());
    }

    #[test]
    fn writeback_hints_keep_every_byte_and_stop_with_the_storage() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let mut s = FileStorage::create(&p).unwrap();
        s.writeback.mode = WritebackMode::FULL;
        // Several hints' worth of writes, single and vectored, some
        // rewriting what an earlier hint covered.
        let n = (3 * WRITEBACK_EVERY / (1 << 20)) as usize;
        for i in 0..n {
            let a = vec![i as u8; 512 << 10];
            let b = vec![!(i as u8); 512 << 10];
            s.write_vectored_at(&[&a, &b], (i as u64) << 20).unwrap();
        }
        s.write_at(&vec![0xee; WRITEBACK_EVERY as usize], 1 << 20)
            .unwrap();
        assert!(s.writeback.state.lock().unwrap().handle.is_some());
        s.sync().unwrap();
        drop(s); // joins the helper thread
        let bytes = std::fs::read(&p).unwrap();
        assert_eq!(bytes.len(), n << 20);
        for i in 0..n {
            let chunk = &bytes[i << 20..(i + 1) << 20];
            let rewritten = (1..=(WRITEBACK_EVERY >> 20) as usize).contains(&i);
            if rewritten {
                assert!(chunk.iter().all(|b| *b == 0xee), "MiB {i}");
            } else {
                assert!(chunk[..512 << 10].iter().all(|b| *b == i as u8), "MiB {i}");
                assert!(
                    chunk[512 << 10..].iter().all(|b| *b == !(i as u8)),
                    "MiB {i}"
                );
            }
        }
    }

    #[test]
    fn the_writeback_helper_adapts_to_the_filesystem() {
        if std::env::var_os("STRATA_WRITEBACK").is_some() {
            return; // overridden for a measurement
        }
        assert_eq!(WritebackMode::for_fs(FsKind::Ext4), WritebackMode::FULL);
        assert_eq!(WritebackMode::for_fs(FsKind::Xfs), WritebackMode::FULL);
        assert_eq!(WritebackMode::for_fs(FsKind::Tmpfs), WritebackMode::OFF);
        let b = WritebackMode::for_fs(FsKind::Btrfs);
        assert!(!b.hint && b.flush, "{b:?}");
        // Nothing written back, no helper, on a file with the mode off.
        let dir = tempfile::tempdir().unwrap();
        let mut s = FileStorage::create(&dir.path().join("f")).unwrap();
        s.writeback.mode = WritebackMode::OFF;
        s.write_at(&vec![1u8; 3 * WRITEBACK_EVERY as usize], 0)
            .unwrap();
        assert!(s.writeback.state.lock().unwrap().handle.is_none());
    }

    #[test]
    fn the_writeback_helper_flushes_as_the_data_comes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let mut s = FileStorage::create(&p).unwrap();
        s.writeback.mode = WritebackMode::FULL;
        let chunk = vec![0x5au8; 1 << 20];
        for i in 0..(2 * FLUSH_EVERY + WRITEBACK_EVERY) >> 20 {
            s.write_at(&chunk, i << 20).unwrap();
        }
        let flushes = s.writeback.state.lock().unwrap().flushes.clone();
        drop(s); // joins the helper thread
        assert_eq!(flushes.load(std::sync::atomic::Ordering::Relaxed), 2);
    }

    #[test]
    fn the_helper_flushes_through_an_open_file_description_of_its_own() {
        use std::io::{Read, Seek, SeekFrom, Write};
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let mut f = File::create(&p).unwrap();
        let mut own = own_description(&f).expect("/proc is mounted");
        // Same file: what one writes, the other reads.
        f.write_all(b"through the first").unwrap();
        let mut text = String::new();
        own.read_to_string(&mut text).unwrap();
        assert_eq!(text, "through the first");
        // Not a duplicate descriptor: the file offset (kept per open file
        // description, as write errors are) is not shared. A `try_clone`
        // would share it.
        f.seek(SeekFrom::Start(3)).unwrap();
        own.seek(SeekFrom::Start(11)).unwrap();
        assert_eq!(f.stream_position().unwrap(), 3);
        let mut dup = f.try_clone().unwrap();
        dup.seek(SeekFrom::Start(5)).unwrap();
        assert_eq!(f.stream_position().unwrap(), 5, "control: dup shares it");
        assert_eq!(own.stream_position().unwrap(), 11);
    }

    #[test]
    fn file_storage_maps_ranges_inside_the_file_only() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let s = FileStorage::create(&p).unwrap();
        let bytes: Vec<u8> = (0..3 * 4096 + 100).map(|i| (i % 251) as u8).collect();
        s.write_at(&bytes, 0).unwrap();
        // Unaligned start and length, across pages, up to the last byte.
        let m = s.mapped(100, 5000).unwrap().unwrap();
        assert_eq!(*m, bytes[100..5100]);
        let end = bytes.len() as u64;
        let m = s.mapped(end - 7, 7).unwrap().unwrap();
        assert_eq!(*m, bytes[bytes.len() - 7..]);
        // Past the end, overflowing, or empty: read instead.
        assert!(s.mapped(end - 7, 8).unwrap().is_none());
        assert!(s.mapped(u64::MAX - 3, 8).unwrap().is_none());
        assert!(s.mapped(0, 0).unwrap().is_none());
        // A mapping sees the file as it is when it is made.
        s.set_len(4096).unwrap();
        assert!(s.mapped(100, 5000).unwrap().is_none());
        assert_eq!(*s.mapped(0, 4096).unwrap().unwrap(), bytes[..4096]);
        // Backends without files never map.
        let mem = MemStorage::from_bytes(bytes.clone());
        assert!(mem.mapped(0, 10).unwrap().is_none());
    }

    #[test]
    fn file_storage_never_maps_a_hole() {
        // Touching a hole through a mapping would allocate a page for it
        // (on tmpfs, in the file itself): holes are read instead.
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let s = FileStorage::create(&p).unwrap();
        s.set_len(4 << 20).unwrap();
        s.write_at(&[7u8; 65536], 1 << 20).unwrap();
        s.sync().unwrap();
        let (data, _) = s.data_run(0, 4096).unwrap();
        if data {
            return; // a file system without holes: nothing to test
        }
        assert!(s.mapped(0, 4096).unwrap().is_none());
        assert!(s.mapped((1 << 20) - 4096, 8192).unwrap().is_none());
        assert!(s.mapped((1 << 20) + 4096, 65536).unwrap().is_none());
        assert_eq!(*s.mapped(1 << 20, 65536).unwrap().unwrap(), [7u8; 65536]);
        assert_eq!(s.allocated_bytes().unwrap(), 65536);
    }

    #[test]
    fn file_storage_copies_ranges_between_files_as_written_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let src = FileStorage::create(&dir.path().join("src")).unwrap();
        let bytes: Vec<u8> = (0..(3 << 20) + 777).map(|i| (i % 253) as u8).collect();
        src.write_at(&bytes, 0).unwrap();
        src.sync().unwrap();
        let dst = FileStorage::create(&dir.path().join("dst")).unwrap();
        dst.write_at(&[0xaa; 8192], 0).unwrap();
        // Aligned (a clone where the filesystem shares extents), unaligned,
        // and running past the end of the source (zeros).
        let how = dst.copy_range_from(&src, 1 << 20, 1 << 20, 65536).unwrap();
        let how2 = dst.copy_range_from(&src, 13, 5000, 100).unwrap();
        let end = bytes.len() as u64;
        dst.copy_range_from(&src, end - 10, 4096, 3 << 20).unwrap();
        let got = std::fs::read(dir.path().join("dst")).unwrap();
        assert!(got[..100] == [0xaa; 100]);
        assert!(got[100..5100] == bytes[13..5013]);
        assert!(got[5100..8192] == [0xaa; 8192 - 5100]);
        assert!(got[8192..65536].iter().all(|b| *b == 0));
        assert!(got[65536..65536 + (1 << 20)] == bytes[1 << 20..2 << 20]);
        let tail = &got[3 << 20..];
        assert_eq!(tail.len(), 4096);
        assert!(tail[..10] == bytes[bytes.len() - 10..]);
        assert!(tail[10..].iter().all(|b| *b == 0));
        // Unaligned ranges are never clones.
        assert_ne!(how2, RangeCopy::Cloned);
        let clones = dst.clones_from(&src);
        assert_eq!(how == RangeCopy::Cloned, clones, "{how:?}");
        // From a storage without a file: read and written.
        let mem = MemStorage::from_bytes(vec![9; 4096]);
        assert_eq!(
            dst.copy_range_from(&mem, 0, 4096, 0).unwrap(),
            RangeCopy::ReadWrite
        );
        assert!(!dst.clones_from(&mem));
        assert_eq!(
            std::fs::read(dir.path().join("dst")).unwrap()[..4096],
            [9; 4096]
        );
    }

    /// A loop-mounted filesystem made for one test, unmounted and removed
    /// when dropped (also when the test fails). `None`, with the reason
    /// printed, when not root or the tools are missing.
    struct LoopFs {
        dir: tempfile::TempDir,
        mounted: bool,
    }

    impl LoopFs {
        fn new(kind: &str) -> Option<LoopFs> {
            use std::process::Command;
            let root = std::fs::read_to_string("/proc/self/status").is_ok_and(|t| {
                t.lines()
                    .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"))
            });
            if !root {
                eprintln!("skipped: {kind} loop mount needs root");
                return None;
            }
            let mkfs = format!("mkfs.{kind}");
            let opts: &[&str] = if kind == "xfs" {
                &["-q", "-m", "reflink=1"]
            } else {
                &["-q"]
            };
            let dir = tempfile::tempdir().unwrap();
            let img = dir.path().join("fs.img");
            let mnt = dir.path().join("mnt");
            std::fs::create_dir(&mnt).unwrap();
            File::create(&img).unwrap().set_len(2 << 30).unwrap();
            let made = Command::new(&mkfs).args(opts).arg(&img).output();
            if !made.is_ok_and(|o| o.status.success()) {
                eprintln!("skipped: {mkfs} not available or failed");
                return None;
            }
            let mut fs = LoopFs {
                dir,
                mounted: false,
            };
            let m = Command::new("mount")
                .args(["-o", "loop"])
                .arg(&img)
                .arg(&mnt)
                .output();
            if !m.is_ok_and(|o| o.status.success()) {
                eprintln!("skipped: mount -o loop failed");
                return None;
            }
            fs.mounted = true;
            Some(fs)
        }
        fn path(&self) -> PathBuf {
            self.dir.path().join("mnt")
        }
    }

    impl Drop for LoopFs {
        fn drop(&mut self) {
            if self.mounted {
                let _ = std::process::Command::new("umount")
                    .arg(self.path())
                    .status();
            }
        }
    }

    /// Whether `filefrag -v` shows every extent of `path` as shared.
    fn all_shared(path: &Path) -> bool {
        let out = std::process::Command::new("filefrag")
            .arg("-v")
            .arg(path)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let extents: Vec<&str> = text
            .lines()
            .filter(|l| {
                l.trim_start()
                    .chars()
                    .next()
                    .is_some_and(|c| c.is_ascii_digit())
            })
            .filter(|l| l.contains(".."))
            .collect();
        !extents.is_empty() && extents.iter().all(|l| l.contains("shared"))
    }

    #[test]
    fn on_xfs_and_btrfs_an_aligned_range_copy_is_a_clone_sharing_extents() {
        for kind in ["xfs", "btrfs"] {
            let Some(fs) = LoopFs::new(kind) else {
                continue;
            };
            let src_path = fs.path().join("src");
            let src = FileStorage::create(&src_path).unwrap();
            assert_eq!(
                src.filesystem(),
                if kind == "xfs" {
                    FsKind::Xfs
                } else {
                    FsKind::Btrfs
                }
            );
            let bytes: Vec<u8> = (0..4 << 20).map(|i| (i % 251) as u8).collect();
            src.write_at(&bytes, 0).unwrap();
            src.sync().unwrap();
            let dst_path = fs.path().join("dst");
            let dst = FileStorage::create(&dst_path).unwrap();
            assert!(dst.clones_from(&src), "{kind}");
            let g = dst.clone_granule();
            assert!(g >= 512 && (1 << 20) % g == 0, "{kind}: {g}");
            let how = dst.copy_range_from(&src, 1 << 20, 2 << 20, 0).unwrap();
            assert_eq!(how, RangeCopy::Cloned, "{kind}");
            // Unaligned: copied, not cloned, and right.
            let how = dst.copy_range_from(&src, 7, 100, 2 << 20).unwrap();
            assert_ne!(how, RangeCopy::Cloned, "{kind}");
            dst.sync().unwrap();
            let got = std::fs::read(&dst_path).unwrap();
            assert!(got[..2 << 20] == bytes[1 << 20..3 << 20], "{kind}");
            assert!(got[2 << 20..] == bytes[7..107], "{kind}");
            dst.set_len(2 << 20).unwrap();
            dst.sync().unwrap();
            assert!(all_shared(&dst_path), "{kind}: extents not shared");
            drop((src, dst));
            // A growing file: what XFS preallocates past its end is given
            // back at each sync.
            let grow = FileStorage::create(&fs.path().join("grow")).unwrap();
            let chunk = vec![7u8; 1 << 20];
            for i in 0..512u64 {
                grow.write_at(&chunk, i << 20).unwrap();
            }
            grow.sync().unwrap();
            let held = grow.allocated_bytes().unwrap();
            assert!(
                held <= (512 << 20) + PREALLOC_SLACK,
                "{kind}: {held} bytes held for 512 MiB"
            );
            assert_eq!(grow.len().unwrap(), 512 << 20);
        }
    }

    /// Bytes `s`'s file holds past its end (XFS's speculative
    /// preallocation shows there before any sync).
    fn held_past_end(s: &FileStorage) -> u64 {
        s.allocated_bytes()
            .unwrap()
            .saturating_sub(s.len().unwrap())
    }

    #[test]
    fn on_xfs_writes_past_the_end_leave_no_preallocation_behind_them() {
        let Some(fs) = LoopFs::new("xfs") else {
            return;
        };
        // A file growing by appends (the copy path of a merge): nothing
        // held past its end at any moment, not only after a sync.
        let grow = FileStorage::create(&fs.path().join("grow")).unwrap();
        let chunk = vec![7u8; 1 << 20];
        let mut worst = 0;
        for i in 0..256u64 {
            if i % 2 == 0 {
                grow.write_at(&chunk, i << 20).unwrap();
            } else {
                grow.write_vectored_at(&[&chunk[..4096], &chunk[4096..]], i << 20)
                    .unwrap();
            }
            worst = worst.max(held_past_end(&grow));
        }
        assert_eq!(grow.len().unwrap(), 256 << 20);
        assert!(worst < 1 << 20, "{worst} bytes held past the end");
        // A clone that grows the file, then a small write past its new end
        // (a merge's next L2 table): nothing held past the end either.
        let src = FileStorage::create(&fs.path().join("src")).unwrap();
        src.write_at(&vec![9u8; 64 << 20], 0).unwrap();
        src.sync().unwrap();
        let mut at = 256 << 20;
        for _ in 0..3 {
            let how = grow.copy_range_from(&src, 0, 64 << 20, at).unwrap();
            assert_eq!(how, RangeCopy::Cloned);
            at += 64 << 20;
            grow.write_at(&[1u8; 65536], at).unwrap();
            at += 65536;
            assert_eq!(grow.len().unwrap(), at);
            let held = held_past_end(&grow);
            assert!(held < 1 << 20, "{held} bytes held past the end");
        }
        // set_len still shrinks and grows exactly; a write after a shrink
        // extends from the new end.
        grow.set_len(1 << 20).unwrap();
        assert_eq!(grow.len().unwrap(), 1 << 20);
        grow.write_at(&[3u8; 4096], 8 << 20).unwrap();
        assert_eq!(grow.len().unwrap(), (8 << 20) + 4096);
        let mut b = [0u8; 4096];
        grow.read_at(&mut b, 8 << 20).unwrap();
        assert_eq!(b, [3u8; 4096]);
        grow.read_at(&mut b, 4 << 20).unwrap();
        assert_eq!(b, [0u8; 4096]);
    }

    #[test]
    fn a_range_copy_into_fault_storage_is_one_write_the_crash_may_drop() {
        let src = MemStorage::from_bytes((0..64u8).collect());
        let s = FaultStorage::new(vec![0; 16]);
        s.crash_at(1);
        assert_eq!(
            s.copy_range_from(&src, 8, 8, 4).unwrap(),
            RangeCopy::ReadWrite
        );
        assert_eq!(s.ops(), 1);
        assert_eq!(s.pending(), 1);
        assert_eq!(&s.current()[4..12], &(8..16u8).collect::<Vec<_>>()[..]);
        assert_eq!(s.durable_image(&mut |_| false), vec![0; 16]);
        // The next copy is the crash.
        assert!(s.copy_range_from(&src, 0, 4, 0).is_err());
        assert!(s.crashed());
        assert_eq!(s.range_copies(), 2);
    }

    #[test]
    fn fault_storage_clones_on_request_and_fails_them_on_request() {
        let src = MemStorage::from_bytes(vec![5; 1024]);
        let s = FaultStorage::new(vec![0; 1024]);
        assert!(!s.clones_from(&src));
        assert_eq!(s.clone_granule(), 0);
        s.set_clones(true);
        assert!(s.clones_from(&src));
        assert_eq!(s.clone_granule(), 512);
        assert_eq!(
            s.copy_range_from(&src, 0, 512, 512).unwrap(),
            RangeCopy::Cloned
        );
        s.fail_clones(true);
        let e = s.copy_range_from(&src, 0, 512, 0).unwrap_err();
        assert!(e.to_string().contains("injected clone failure"), "{e}");
        assert!(!s.crashed());
        assert_eq!(&s.current()[..512], &[0; 512]);
        assert_eq!(&s.current()[512..], &[5; 512]);
        // Not a crash: other writes go on.
        s.write_at(&[1], 0).unwrap();
        assert_eq!(s.ops(), 3);
    }

    #[test]
    fn fault_storage_maps_copies_of_what_it_holds() {
        let s = FaultStorage::new(vec![1, 2, 3, 4]);
        assert_eq!(*s.mapped(1, 3).unwrap().unwrap(), [2, 3, 4]);
        assert!(s.mapped(1, 4).unwrap().is_none());
        assert!(s.mapped(0, 0).unwrap().is_none());
    }

    #[test]
    fn fault_storages_sharing_a_clock_crash_together_and_keep_their_own_bytes() {
        let a = FaultStorage::new(vec![0; 8]);
        let b = a.new_sharing_clock(vec![1; 8]);
        let alone = FaultStorage::new(vec![2; 8]);
        a.crash_at(3);
        a.write_at(&[5], 0).unwrap(); // op 0
        b.write_at(&[6], 1).unwrap(); // op 1
        alone.write_at(&[7], 2).unwrap(); // its own clock: op 0
        b.sync().unwrap(); // op 2
        assert_eq!((a.ops(), b.ops(), alone.ops()), (3, 3, 1));
        assert_eq!((a.own_ops(), b.own_ops()), (1, 2));
        assert!(!a.crashed());
        // Op 3 is the crash, on whichever storage does it; both stop.
        assert!(a.write_at(&[8], 3).is_err());
        assert!(a.crashed() && b.crashed());
        assert!(b.write_at(&[9], 4).is_err());
        assert!(b.sync().is_err());
        assert!(!alone.crashed());
        alone.sync().unwrap();
        // Durable and pending state stays per storage.
        assert_eq!(a.pending(), 1);
        assert_eq!(b.pending(), 0);
        assert_eq!(a.durable_image(&mut |_| false), vec![0; 8]);
        assert_eq!(a.durable_image(&mut |_| true), [5, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(b.durable_image(&mut |_| true), [1, 6, 1, 1, 1, 1, 1, 1]);
        assert_eq!(
            alone.durable_image(&mut |_| false),
            [2, 2, 7, 2, 2, 2, 2, 2]
        );
    }
}

#[cfg(any(test, feature = "testing"))]
/// What happened to a storage operation not yet made durable.
#[derive(Debug, Clone)]
enum Pending {
    Write(u64, Vec<u8>),
    SetLen(u64),
}

#[cfg(any(test, feature = "testing"))]
#[derive(Debug, Default)]
struct FaultState {
    /// What reads see (every write applied).
    current: Vec<u8>,
    /// What survived the last sync.
    durable: Vec<u8>,
    /// Writes and length changes since the last sync, in order.
    pending: Vec<Pending>,
    /// Syncs of this storage so far.
    syncs: u64,
    /// Operations of this storage so far.
    own_ops: u64,
    /// The crash clock (shared by the storages of one simulated machine).
    clock: Arc<Mutex<FaultClock>>,
    /// Whether range copies into this storage report clones (and
    /// [`Storage::clones_from`] says they do), as on XFS or btrfs.
    clones: bool,
    /// Whether range copies into this storage fail (an I/O error, not a
    /// crash: later operations work).
    clone_fails: bool,
    /// Range copies done.
    range_copies: u64,
    /// Whether the last sync succeeded and nothing was written, copied,
    /// punched or resized since ([`Storage::unsynced`] is its negation;
    /// `false` at first, as for a file just opened).
    synced_clean: bool,
}

#[cfg(any(test, feature = "testing"))]
/// The operation counter and crash point of one simulated machine: every
/// storage sharing it counts its writes, length changes and syncs on it,
/// and a crash stops them all.
#[derive(Debug, Default)]
struct FaultClock {
    /// Writes, length changes and syncs done so far (all storages).
    ops: u64,
    /// The operation number that "crashes": it and all later ones fail.
    crash_at: Option<u64>,
    crashed: bool,
}

#[cfg(any(test, feature = "testing"))]
/// A storage for crash tests: it keeps what was made durable by `sync`
/// apart from what was only written, and can "crash" at the Nth write,
/// length change or sync (that operation and every later one fail with an
/// I/O error). After a crash, [`FaultStorage::durable_image`] gives what a
/// disk could hold: the durable bytes plus any subset of the later writes.
///
/// Several storages (the files of one machine, e.g. a base and its
/// overlay) can share one operation counter and crash point:
/// [`FaultStorage::new_sharing_clock`]. Then [`FaultStorage::crash_at`]
/// counts the operations of all of them, in the order they happen, and the
/// crash stops them all; durable and pending bytes stay per storage. Clones
/// of a `FaultStorage` are the same file (they share everything).
#[derive(Debug, Clone, Default)]
pub struct FaultStorage {
    state: Arc<Mutex<FaultState>>,
}

#[cfg(any(test, feature = "testing"))]
fn apply(bytes: &mut Vec<u8>, p: &Pending) {
    match p {
        Pending::Write(off, data) => {
            let end = *off as usize + data.len();
            if bytes.len() < end {
                bytes.resize(end, 0);
            }
            bytes[*off as usize..end].copy_from_slice(data);
        }
        Pending::SetLen(len) => bytes.resize(*len as usize, 0),
    }
}

#[cfg(any(test, feature = "testing"))]
impl FaultStorage {
    /// A storage holding `bytes`, all durable, with a clock of its own.
    pub fn new(bytes: Vec<u8>) -> FaultStorage {
        FaultStorage::with_clock(bytes, Arc::default())
    }
    /// Another storage (another file of the same machine) holding `bytes`,
    /// all durable, that shares this storage's operation counter and crash
    /// point: operation numbers count the operations of both, and when one
    /// crashes, both do.
    pub fn new_sharing_clock(&self, bytes: Vec<u8>) -> FaultStorage {
        FaultStorage::with_clock(bytes, self.lock().clock.clone())
    }
    fn with_clock(bytes: Vec<u8>, clock: Arc<Mutex<FaultClock>>) -> FaultStorage {
        let st = FaultState {
            current: bytes.clone(),
            durable: bytes,
            clock,
            ..Default::default()
        };
        FaultStorage {
            state: Arc::new(Mutex::new(st)),
        }
    }
    fn lock(&self) -> std::sync::MutexGuard<'_, FaultState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
    fn clock(&self) -> Arc<Mutex<FaultClock>> {
        self.lock().clock.clone()
    }
    /// Makes operation number `n` (counting writes, length changes and
    /// syncs from 0, of every storage sharing the clock) and all later ones
    /// fail.
    pub fn crash_at(&self, n: u64) {
        lock_clock(&self.clock()).crash_at = Some(n);
    }
    /// Number of writes, length changes and syncs so far, of every storage
    /// sharing the clock (failed ones included).
    pub fn ops(&self) -> u64 {
        lock_clock(&self.clock()).ops
    }
    /// Number of writes, length changes and syncs of this storage alone
    /// (failed ones included).
    pub fn own_ops(&self) -> u64 {
        self.lock().own_ops
    }
    /// Makes range copies into this storage behave as clones do on a
    /// filesystem that shares extents: [`Storage::clones_from`] says yes
    /// (for any source), the clone unit is 512 bytes, and each copy
    /// reports [`RangeCopy::Cloned`]. The bytes and the crash model are
    /// those of one write.
    pub fn set_clones(&self, clones: bool) {
        self.lock().clones = clones;
    }
    /// Makes every later range copy into this storage fail with an I/O
    /// error (counted as an operation; nothing is written).
    pub fn fail_clones(&self, fail: bool) {
        self.lock().clone_fails = fail;
    }
    /// Number of range copies into this storage so far (failed included).
    pub fn range_copies(&self) -> u64 {
        self.lock().range_copies
    }
    /// Number of syncs of this storage so far.
    pub fn syncs(&self) -> u64 {
        self.lock().syncs
    }
    /// Whether the crash point was reached (by any storage sharing the
    /// clock).
    pub fn crashed(&self) -> bool {
        lock_clock(&self.clock()).crashed
    }
    /// Number of operations of this storage pending since its last sync.
    pub fn pending(&self) -> usize {
        self.lock().pending.len()
    }
    /// What the disk may hold after the crash: the durable bytes plus the
    /// pending operations selected by `keep(i)` (applied in order).
    pub fn durable_image(&self, keep: &mut dyn FnMut(usize) -> bool) -> Vec<u8> {
        let st = self.lock();
        let mut bytes = st.durable.clone();
        for (i, p) in st.pending.iter().enumerate() {
            if keep(i) {
                apply(&mut bytes, p);
            }
        }
        bytes
    }
    /// The bytes as reads see them now.
    pub fn current(&self) -> Vec<u8> {
        self.lock().current.clone()
    }
    /// Counts one operation on the clock; fails from the crash point on.
    /// Any operation but a sync leaves something to sync.
    fn op(&self, st: &mut FaultState) -> io::Result<()> {
        st.own_ops += 1;
        st.synced_clean = false;
        let mut clock = lock_clock(&st.clock);
        let n = clock.ops;
        clock.ops += 1;
        if clock.crashed || clock.crash_at.is_some_and(|c| n >= c) {
            clock.crashed = true;
            return Err(io::Error::other("injected crash"));
        }
        Ok(())
    }
}

#[cfg(any(test, feature = "testing"))]
/// Lock order: a storage's state, then the clock (never the other way).
fn lock_clock(c: &Mutex<FaultClock>) -> std::sync::MutexGuard<'_, FaultClock> {
    c.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(any(test, feature = "testing"))]
impl Storage for FaultStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let st = self.lock();
        let len = st.current.len() as u64;
        let n = if offset >= len {
            0
        } else {
            (len - offset).min(buf.len() as u64) as usize
        };
        if n > 0 {
            buf[..n].copy_from_slice(&st.current[offset as usize..offset as usize + n]);
        }
        buf[n..].fill(0);
        Ok(n)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut st = self.lock();
        self.op(&mut st)?;
        if offset
            .checked_add(buf.len() as u64)
            .is_none_or(|e| e > MEM_STORAGE_MAX)
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "write past the memory storage limit",
            ));
        }
        let p = Pending::Write(offset, buf.to_vec());
        apply(&mut st.current, &p);
        st.pending.push(p);
        Ok(())
    }
    fn write_vectored_at(&self, bufs: &[&[u8]], offset: u64) -> io::Result<()> {
        // One operation, as one pwritev.
        self.write_at(&bufs.concat(), offset)
    }
    /// One operation, as one write of the bytes `src` reads (a crash keeps
    /// it or not, like any write not yet synced).
    fn copy_range_from(
        &self,
        src: &dyn Storage,
        src_offset: u64,
        len: u64,
        dst_offset: u64,
    ) -> io::Result<RangeCopy> {
        if len > MEM_STORAGE_MAX {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "copy past the memory storage limit",
            ));
        }
        // Read first: `src` may be this storage (its lock is not held).
        let mut bytes = vec![0u8; len as usize];
        src.read_at(&mut bytes, src_offset)?;
        let clones = {
            let mut st = self.lock();
            st.range_copies += 1;
            if st.clone_fails {
                self.op(&mut st)?;
                return Err(io::Error::other("injected clone failure"));
            }
            st.clones
        };
        self.write_at(&bytes, dst_offset)?;
        Ok(if clones {
            RangeCopy::Cloned
        } else {
            RangeCopy::ReadWrite
        })
    }
    fn clones_from(&self, _src: &dyn Storage) -> bool {
        self.lock().clones
    }
    fn clone_granule(&self) -> u64 {
        if self.lock().clones {
            512
        } else {
            0
        }
    }
    /// One operation, as an unsynced write of zeros over the part inside
    /// the storage: a crash may keep it or not, and a hole punched into
    /// anything still referenced shows in the crash tests.
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut st = self.lock();
        self.op(&mut st)?;
        let size = st.current.len() as u64;
        let end = offset.saturating_add(len).min(size);
        if offset >= end {
            return Ok(());
        }
        let p = Pending::Write(offset, vec![0u8; (end - offset) as usize]);
        apply(&mut st.current, &p);
        st.pending.push(p);
        Ok(())
    }
    fn mapped(&self, offset: u64, len: usize) -> io::Result<Option<MappedBytes>> {
        // A copy, so that crash tests see the write pattern of files.
        let mut bytes = vec![0u8; len];
        let inside = self.read_at(&mut bytes, offset)?;
        Ok((len > 0 && inside == len).then(|| MappedBytes::copied(bytes)))
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.lock().current.len() as u64)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut st = self.lock();
        self.op(&mut st)?;
        if len > MEM_STORAGE_MAX {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "length past the memory storage limit",
            ));
        }
        let p = Pending::SetLen(len);
        apply(&mut st.current, &p);
        st.pending.push(p);
        Ok(())
    }
    fn sync(&self) -> io::Result<()> {
        let mut st = self.lock();
        self.op(&mut st)?;
        st.durable = st.current.clone();
        st.pending.clear();
        st.syncs += 1;
        st.synced_clean = true;
        Ok(())
    }
    fn unsynced(&self) -> bool {
        !self.lock().synced_clean
    }
}
