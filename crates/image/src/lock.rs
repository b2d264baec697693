//! QEMU-compatible image locking.
//!
//! QEMU (block/file-posix.c, `raw_apply_lock_bytes` / `raw_check_lock_bytes`)
//! coordinates processes sharing an image file with *open file description*
//! (OFD) byte-range locks (`F_OFD_SETLK` / `F_OFD_GETLK`), one byte per block
//! permission:
//!
//! * byte `100 + i` is read-locked while the holder *uses* permission bit `i`;
//! * byte `200 + i` is read-locked while the holder *refuses to share*
//!   permission bit `i` with anybody else.
//!
//! The permission bits (QEMU `include/block/block-common.h`, unchanged since
//! QEMU 6.2 dropped `GRAPH_MOD`) are `CONSISTENT_READ` (bit 0), `WRITE`
//! (bit 1), `WRITE_UNCHANGED` (bit 2) and `RESIZE` (bit 3).
//!
//! Taking a lock follows QEMU's order: first the bytes are locked (shared
//! read locks never conflict with each other), then the bytes of other
//! processes are tested with `F_OFD_GETLK` using a write lock — byte
//! `200 + i` for every permission we want and byte `100 + i` for every
//! permission we refuse to share. Locking before checking means that two
//! processes racing for incompatible permissions both see each other and
//! neither wins silently. On a conflict the bytes are restored.
//!
//! What QEMU 10 takes in practice (observed in `/proc/locks`):
//!
//! | opener                                  | bytes           |
//! |-----------------------------------------|-----------------|
//! | read-write qcow2 image (`qemu-io img`)  | 100 101 103 201 203 |
//! | read-only qcow2 (`qemu-io -r`, backing file of a running VM, `qemu-img info`) | 100 201 203 |
//! | force-share (`qemu-io -U -r`, `qemu-img info -U`) | 100 |
//!
//! [`LockMode`] mirrors exactly these three cases.
//!
//! OFD locks belong to the open file description: they are shared by every
//! file descriptor duplicated from it (`File::try_clone`) and vanish when the
//! last of those descriptors is closed, or when the process dies. Two
//! separate `open()` calls of the same path — even in one process — produce
//! two descriptions whose locks conflict, exactly like two QEMU processes.

use std::fmt;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg};

/// QEMU's `RAW_LOCK_PERM_BASE`: byte `100 + i` marks permission `i` as used.
const LOCK_BYTE_PERM_BASE: i64 = 100;
/// QEMU's `RAW_LOCK_SHARED_BASE`: byte `200 + i` marks permission `i` as
/// not shared.
const LOCK_BYTE_SHARED_BASE: i64 = 200;

/// `BLK_PERM_CONSISTENT_READ`.
const PERM_CONSISTENT_READ: u8 = 0x1;
/// `BLK_PERM_WRITE`.
const PERM_WRITE: u8 = 0x2;
/// `BLK_PERM_WRITE_UNCHANGED`.
const PERM_WRITE_UNCHANGED: u8 = 0x4;
/// `BLK_PERM_RESIZE`.
const PERM_RESIZE: u8 = 0x8;
/// `BLK_PERM_ALL`: QEMU 6.2+ has four permission bits.
const PERM_COUNT: u32 = 4;

/// Names as printed by QEMU's `bdrv_perm_names`, indexed by bit number.
const PERM_NAMES: [&str; PERM_COUNT as usize] =
    ["consistent read", "write", "write unchanged", "resize"];

/// How an image file is going to be used, and therefore which QEMU
/// permissions are taken and which are refused to other processes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LockMode {
    /// Read the image, refusing concurrent writers. Takes `consistent read`
    /// and refuses to share `write` and `resize` (bytes 100, 201, 203), which
    /// is what QEMU does for a read-only qcow2 open: `qemu-io -r`,
    /// `qemu-img info`, and every backing file of a running VM.
    ///
    /// Coexists with other readers (QEMU's or Strata's), including the
    /// backing-file opens of a running VM, but fails while a writer holds
    /// the image, exactly as `qemu-io -r` / `qemu-img info` do.
    ReadOnly,
    /// Read and modify the image. Takes `consistent read`, `write` and
    /// `resize` and refuses to share `write` and `resize` (bytes 100, 101,
    /// 103, 201, 203), which is what QEMU does for a writable qcow2 image.
    ///
    /// Fails if anybody else reads or writes the image with locking, except
    /// force-share readers ([`LockMode::ForceShare`], `qemu-img info -U`).
    ReadWrite,
    /// Read the image while sharing everything (`-U` / `force-share=on` in
    /// QEMU). Takes only `consistent read` (byte 100), so it succeeds even
    /// while a VM writes the image; the data read may then be inconsistent.
    ForceShare,
    /// The external data file of an image opened read-only (QEMU's data
    /// child): takes `consistent read` and refuses to share only
    /// `resize` (bytes 100, 203), as `qemu-io -r` on such an image.
    DataReadOnly,
    /// The external data file of an image opened read-write: takes
    /// `consistent read`, `write` and `resize` and refuses to share only
    /// `resize` (bytes 100, 101, 103, 203), as `qemu-io` on such an image.
    DataReadWrite,
}

impl LockMode {
    /// Permissions used in this mode (QEMU `perm`).
    fn perm(self) -> u8 {
        match self {
            LockMode::ReadOnly | LockMode::ForceShare | LockMode::DataReadOnly => {
                PERM_CONSISTENT_READ
            }
            LockMode::ReadWrite | LockMode::DataReadWrite => {
                PERM_CONSISTENT_READ | PERM_WRITE | PERM_RESIZE
            }
        }
    }

    /// Permissions shared with other users in this mode (QEMU `shared_perm`).
    /// A qcow2 format layer never lets others write or resize its file.
    fn shared(self) -> u8 {
        match self {
            LockMode::ReadOnly | LockMode::ReadWrite => PERM_CONSISTENT_READ | PERM_WRITE_UNCHANGED,
            LockMode::ForceShare => {
                PERM_CONSISTENT_READ | PERM_WRITE | PERM_WRITE_UNCHANGED | PERM_RESIZE
            }
            LockMode::DataReadOnly | LockMode::DataReadWrite => {
                PERM_CONSISTENT_READ | PERM_WRITE | PERM_WRITE_UNCHANGED
            }
        }
    }
}

impl fmt::Display for LockMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LockMode::ReadOnly => "read-only",
            LockMode::ReadWrite => "read-write",
            LockMode::ForceShare => "force-share",
            LockMode::DataReadOnly => "data file read-only",
            LockMode::DataReadWrite => "data file read-write",
        })
    }
}

/// Error taking or releasing an image lock.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process (or another open of the same file in this process)
    /// holds locks incompatible with the requested [`LockMode`].
    #[error(
        "\"{}\": image is in use by another process ({}; is a VM running?). \
         Failed to get {}\"{}\" lock",
        .path.display(),
        conflict_reason(*.shared, .permission),
        if *.shared { "shared " } else { "" },
        .permission
    )]
    Conflict {
        /// The image file.
        path: PathBuf,
        /// QEMU's name of the contested permission: `"consistent read"`,
        /// `"write"`, `"write unchanged"` or `"resize"`.
        permission: &'static str,
        /// `false`: we need `permission` but another process refuses to
        /// share it (QEMU: `Failed to get "write" lock`). `true`: another
        /// process uses `permission`, which we refuse to share (QEMU:
        /// `Failed to get shared "write" lock`).
        shared: bool,
    },
    /// The lock system call itself failed (e.g. a file system without OFD
    /// lock support, or a file not opened for reading).
    #[error("\"{}\": cannot lock image: {source}", .path.display())]
    Io {
        /// The image file.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
}

/// Human explanation for [`LockError::Conflict`].
fn conflict_reason(shared: bool, permission: &str) -> String {
    if shared {
        format!("it holds the '{permission}' permission lock")
    } else {
        format!("it refuses to share the '{permission}' permission")
    }
}

/// Takes the QEMU-compatible locks for `mode` on the open file description
/// of `file`, after checking that no other process holds incompatible ones.
///
/// The locks live as long as the open file description: they are released
/// when `file` and every descriptor cloned from it are closed (or by
/// [`unlock_file`]). Calling this again on the same description switches it
/// to the new mode; on failure all lock bytes of this description are
/// released. For a guard that releases on drop, use [`ImageLock`].
///
/// `file` must be open for reading. `path` is only used for error messages.
pub fn lock_file(file: &File, path: &Path, mode: LockMode) -> Result<(), LockError> {
    set_mode(file, path, mode, None)
}

/// Releases every QEMU lock byte held by the open file description of
/// `file`. `path` is only used for error messages.
pub fn unlock_file(file: &File, path: &Path) -> Result<(), LockError> {
    unlock_all(file).map_err(|source| LockError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// A QEMU-compatible lock on an image file, released when dropped.
///
/// The guard keeps its own duplicate of the file descriptor, so the lock
/// stays valid until the guard is dropped even if the original `File` is
/// closed first; dropping the guard releases the locks even while the
/// original `File` stays open (both descriptors share one open file
/// description, which is what OFD locks belong to).
#[derive(Debug)]
pub struct ImageLock {
    /// Duplicate of the locked descriptor (same open file description).
    file: File,
    /// The image path, for error messages.
    path: PathBuf,
    /// The mode currently held.
    mode: LockMode,
}

impl ImageLock {
    /// Locks `file` (open for reading) in `mode`; see [`lock_file`].
    /// `path` is only used for error messages.
    pub fn acquire(file: &File, path: &Path, mode: LockMode) -> Result<Self, LockError> {
        let dup = file.try_clone().map_err(|source| LockError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        set_mode(&dup, path, mode, None)?;
        Ok(ImageLock {
            file: dup,
            path: path.to_path_buf(),
            mode,
        })
    }

    /// The mode currently held.
    pub fn mode(&self) -> LockMode {
        self.mode
    }

    /// The image path given at acquisition.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Switches to `mode` (e.g. upgrade a read-only open to read-write for
    /// a commit). On failure the previous mode is still held.
    pub fn set_mode(&mut self, mode: LockMode) -> Result<(), LockError> {
        set_mode(&self.file, &self.path, mode, Some(self.mode))?;
        self.mode = mode;
        Ok(())
    }
}

impl Drop for ImageLock {
    fn drop(&mut self) {
        // Nothing useful can be done about a failed unlock here; closing the
        // last descriptor of the description releases the locks anyway.
        let _ = unlock_all(&self.file);
    }
}

/// Applies `mode`, checks for conflicts, and on failure returns to
/// `previous` (or to no locks at all).
fn set_mode(
    file: &File,
    path: &Path,
    mode: LockMode,
    previous: Option<LockMode>,
) -> Result<(), LockError> {
    let result = apply_bytes(file, path, mode).and_then(|()| check_bytes(file, path, mode));
    if result.is_err() {
        // Best effort: restoring only removes or re-adds shared read locks,
        // which cannot conflict with QEMU's (it never takes write locks).
        let _ = match previous {
            Some(old) => apply_bytes(file, path, old),
            None => unlock_all(file).map_err(|source| LockError::Io {
                path: path.to_path_buf(),
                source,
            }),
        };
    }
    result
}

/// Read-locks exactly the bytes `mode` needs and unlocks the others.
fn apply_bytes(file: &File, path: &Path, mode: LockMode) -> Result<(), LockError> {
    let perm = mode.perm();
    let unshared = !mode.shared();
    for i in 0..PERM_COUNT {
        let bit = 1u8 << i;
        for (base, wanted, shared) in [
            (LOCK_BYTE_PERM_BASE, perm & bit != 0, true),
            (LOCK_BYTE_SHARED_BASE, unshared & bit != 0, false),
        ] {
            let kind = if wanted { libc::F_RDLCK } else { libc::F_UNLCK };
            match set_lock(file, base + i64::from(i), 1, kind) {
                Ok(()) => {}
                // Somebody holds a write lock on the byte: not something
                // QEMU does, but it certainly means the image is busy.
                Err(Errno::EAGAIN | Errno::EACCES) => {
                    return Err(conflict(path, i, shared));
                }
                Err(e) => return Err(io_error(path, e)),
            }
        }
    }
    Ok(())
}

/// Tests, as QEMU does, that nobody refuses a permission we use and nobody
/// uses a permission we refuse to share.
fn check_bytes(file: &File, path: &Path, mode: LockMode) -> Result<(), LockError> {
    let perm = mode.perm();
    let shared = mode.shared();
    for i in 0..PERM_COUNT {
        let bit = 1u8 << i;
        if perm & bit != 0
            && is_locked_by_other(file, LOCK_BYTE_SHARED_BASE + i64::from(i))
                .map_err(|e| io_error(path, e))?
        {
            return Err(conflict(path, i, false));
        }
    }
    for i in 0..PERM_COUNT {
        let bit = 1u8 << i;
        if shared & bit == 0
            && is_locked_by_other(file, LOCK_BYTE_PERM_BASE + i64::from(i))
                .map_err(|e| io_error(path, e))?
        {
            return Err(conflict(path, i, true));
        }
    }
    Ok(())
}

/// Builds a [`LockError::Conflict`] for permission bit `i`.
fn conflict(path: &Path, i: u32, shared: bool) -> LockError {
    LockError::Conflict {
        path: path.to_path_buf(),
        permission: PERM_NAMES.get(i as usize).copied().unwrap_or("unknown"),
        shared,
    }
}

/// Builds a [`LockError::Io`] from an errno.
fn io_error(path: &Path, e: Errno) -> LockError {
    LockError::Io {
        path: path.to_path_buf(),
        source: io::Error::from(e),
    }
}

/// Releases all lock bytes this module may have taken on the description.
fn unlock_all(file: &File) -> io::Result<()> {
    set_lock(
        file,
        LOCK_BYTE_PERM_BASE,
        i64::from(PERM_COUNT),
        libc::F_UNLCK,
    )?;
    set_lock(
        file,
        LOCK_BYTE_SHARED_BASE,
        i64::from(PERM_COUNT),
        libc::F_UNLCK,
    )?;
    Ok(())
}

/// A `struct flock` for `len` bytes at absolute offset `start`.
fn flock(start: i64, len: i64, kind: libc::c_int) -> libc::flock {
    libc::flock {
        // F_RDLCK / F_WRLCK / F_UNLCK and SEEK_SET are tiny constants.
        l_type: kind as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: start,
        l_len: len,
        // Must be 0 for OFD lock requests.
        l_pid: 0,
    }
}

/// `F_OFD_SETLK` (non-blocking) of `kind` on `len` bytes at `start`.
fn set_lock(file: &File, start: i64, len: i64, kind: libc::c_int) -> Result<(), Errno> {
    let fl = flock(start, len, kind);
    fcntl(file, FcntlArg::F_OFD_SETLK(&fl)).map(|_| ())
}

/// `F_OFD_GETLK` with a write lock on one byte: whether another open file
/// description holds any lock on it (our own locks never conflict).
fn is_locked_by_other(file: &File, offset: i64) -> Result<bool, Errno> {
    let mut fl = flock(offset, 1, libc::F_WRLCK);
    fcntl(file, FcntlArg::F_OFD_GETLK(&mut fl))?;
    Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_image() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("img");
        std::fs::write(&path, [0u8; 512]).expect("write image");
        (dir, path)
    }

    fn open_rw(path: &Path) -> File {
        File::options()
            .read(true)
            .write(true)
            .open(path)
            .expect("open image")
    }

    #[test]
    fn lock_modes_compatibility() {
        use LockMode::*;
        // (held, requested, compatible)
        let table = [
            (ReadOnly, ReadOnly, true),
            (ReadOnly, ReadWrite, false),
            (ReadOnly, ForceShare, true),
            (ReadWrite, ReadOnly, false),
            (ReadWrite, ReadWrite, false),
            (ReadWrite, ForceShare, true),
            (ForceShare, ReadOnly, true),
            (ForceShare, ReadWrite, true),
            (ForceShare, ForceShare, true),
        ];
        let (_dir, path) = temp_image();
        for (held, requested, ok) in table {
            let a = open_rw(&path);
            let b = open_rw(&path);
            let _guard = ImageLock::acquire(&a, &path, held).expect("first lock");
            let res = lock_file(&b, &path, requested);
            assert_eq!(res.is_ok(), ok, "{held} then {requested}: {res:?}");
        }
    }

    #[test]
    fn conflict_message_and_rollback() {
        let (_dir, path) = temp_image();
        let a = open_rw(&path);
        let b = open_rw(&path);
        lock_file(&a, &path, LockMode::ReadWrite).expect("first lock");
        let err = lock_file(&b, &path, LockMode::ReadWrite).expect_err("must conflict");
        let msg = err.to_string();
        assert!(msg.contains("image is in use by another process"), "{msg}");
        assert!(msg.contains("Failed to get \"write\" lock"), "{msg}");
        // The failed attempt left nothing behind: once `a` goes, `b` works.
        drop(a);
        lock_file(&b, &path, LockMode::ReadWrite).expect("lock after release");
    }

    #[test]
    fn failed_upgrade_keeps_previous_mode() {
        let (_dir, path) = temp_image();
        let a = open_rw(&path);
        let b = open_rw(&path);
        let _ra = ImageLock::acquire(&a, &path, LockMode::ReadOnly).expect("a ro");
        let mut rb = ImageLock::acquire(&b, &path, LockMode::ReadOnly).expect("b ro");
        assert!(rb.set_mode(LockMode::ReadWrite).is_err());
        assert_eq!(rb.mode(), LockMode::ReadOnly);
        // `b` still refuses writers.
        let c = open_rw(&path);
        drop(_ra);
        assert!(lock_file(&c, &path, LockMode::ReadWrite).is_err());
        drop(rb);
        lock_file(&c, &path, LockMode::ReadWrite).expect("all released");
    }
}
