//! Errors of the libvirt layer: what was refused or failed, on which domain,
//! snapshot, disk or file.

use std::io;
use std::path::PathBuf;

/// Result alias for the libvirt layer.
pub type Result<T> = std::result::Result<T, Error>;

/// An error of a snapshot or block operation.
///
/// The refusing kinds (`DomainActive`, `Busy`, `NoSuchSnapshot`,
/// `SnapshotExists`, `NoSuchDisk`, `FileExists`, `SnapshotsDestroyed`,
/// `Unsupported`, `InvalidArgument`) are returned before anything is
/// changed. Any other error met part-way is
/// returned after the rollback (see [`Error::RolledBack`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A libvirt call failed.
    #[error("libvirt: {op}: {cause}")]
    Libvirt {
        /// What was being done ("define domain", "redefine snapshot take-1", ...).
        op: String,
        /// libvirt's error (said in the message, so not a `source()`).
        cause: virt::error::Error,
    },
    /// The domain is running or paused: only shut-off domains are handled.
    #[error(
        "domain {domain:?} is {state}: Strata changes the disks of shut-off domains only; \
         shut it down first (virsh shutdown {domain})"
    )]
    DomainActive {
        /// The domain.
        domain: String,
        /// Its state ("running", "paused", ...).
        state: String,
    },
    /// A live block job was cancelled (Ctrl-C / SIGTERM, or the caller's
    /// cancel flag) and aborted; the chain is as it was before the job.
    #[error(
        "the block job on disk {disk} was cancelled and aborted: the domain keeps its chain \
         as it was before the job (an image the job was writing into may hold part of the \
         copied data, which every image above it hides); nothing else was changed"
    )]
    Cancelled {
        /// The disk target.
        disk: String,
    },
    /// A revert of a running or paused domain, without `force`.
    #[error(
        "domain {domain:?} is {state}: a revert discards its current state; stop it first \
         (virsh destroy {domain}), or pass --force, which stops it, reverts, and with \
         --running / --paused starts it again; nothing was changed"
    )]
    RevertRunning {
        /// The domain.
        domain: String,
        /// Its state ("running", "paused", ...).
        state: String,
    },
    /// No snapshot of that name.
    #[error("domain {domain:?} has no snapshot {name:?}")]
    NoSuchSnapshot {
        /// The domain.
        domain: String,
        /// The snapshot name asked for.
        name: String,
    },
    /// A snapshot of that name exists already.
    #[error("domain {domain:?} already has a snapshot {name:?}")]
    SnapshotExists {
        /// The domain.
        domain: String,
        /// The snapshot name.
        name: String,
    },
    /// The domain has no such disk, or it is not a file-backed qcow2/raw disk.
    #[error("domain {domain:?}: {why}")]
    NoSuchDisk {
        /// The domain.
        domain: String,
        /// What is wrong with the disk selection.
        why: String,
    },
    /// A file Strata would create exists already.
    #[error("{}: the file exists already; choose another name (--file)", .0.display())]
    FileExists(PathBuf),
    /// The block merge would destroy the state of snapshots.
    #[error(
        "domain {domain:?} disk {disk}: {op} into {} would change the state saved by snapshot(s) {}; \
         delete them first or pass delete_snapshots (--delete-snapshots)",
        .base.display(), .snapshots.join(", ")
    )]
    SnapshotsDestroyed {
        /// The domain.
        domain: String,
        /// The disk target.
        disk: String,
        /// The operation.
        op: &'static str,
        /// The file that would be written.
        base: PathBuf,
        /// The snapshots whose state lives in or below `base`.
        snapshots: Vec<String>,
    },
    /// A merge (commit or pull) failed part-way. Merges are not undone;
    /// `state` says what each file holds now and what to run next.
    #[error("{op} failed: {}; {state}", full_text(.cause.as_ref()))]
    MergeFailed {
        /// The merge ("commit /kvm/a into /kvm/b").
        op: String,
        /// The state each file is in, and what to do.
        state: String,
        /// The error (its full text, sources included, is said).
        cause: Box<Error>,
    },
    /// Another operation on the same domain is running (Strata serialises
    /// operations per domain with a lock file keyed by the domain's UUID).
    #[error(
        "domain {domain:?} is busy: another Strata operation on it is running (it holds {}); \
         nothing was changed; run this again when it has finished",
        .lock.display()
    )]
    Busy {
        /// The domain.
        domain: String,
        /// The lock file.
        lock: PathBuf,
    },
    /// Something Strata does not do (said why, and what to do instead).
    #[error("{0}")]
    Unsupported(String),
    /// The caller asked for something invalid.
    #[error("{0}")]
    InvalidArgument(String),
    /// Domain or snapshot XML is not what Strata expects.
    #[error("{what}: {why}")]
    Xml {
        /// Which document.
        what: String,
        /// What is wrong.
        why: String,
    },
    /// The image engine failed.
    #[error(transparent)]
    Image(#[from] strata_image::Error),
    /// A merge (commit or pull) failed or was refused.
    #[error(transparent)]
    Merge(#[from] strata_merge::MergeError),
    /// A file operation failed.
    #[error("{}: {op}: {cause}", .path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// The underlying error (said in the message).
        cause: io::Error,
    },
    /// The operation failed part-way and was rolled back: files it created
    /// are removed, the domain XML and the snapshot metadata are as before.
    /// `problems` lists rollback steps that failed themselves (empty when
    /// the rollback was complete).
    #[error("{}{}", full_text(.cause.as_ref()), rollback_note(.problems))]
    RolledBack {
        /// The error that stopped the operation (said in the message).
        cause: Box<Error>,
        /// Rollback steps that failed.
        problems: Vec<String>,
    },
}

/// An error's message followed by each of its sources' (": "-separated,
/// a source already said by the message is not repeated), so that the first
/// cause (e.g. `No space left on device`) is never hidden.
pub fn full_text(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let t = s.to_string();
        if !text.contains(&t) {
            text.push_str(": ");
            text.push_str(&t);
        }
        cur = s.source();
    }
    text
}

fn rollback_note(problems: &[String]) -> String {
    if problems.is_empty() {
        " (rolled back: nothing was changed)".to_string()
    } else {
        format!(
            " (rollback incomplete: {}; see docs/libvirt.md)",
            problems.join("; ")
        )
    }
}

impl Error {
    pub(crate) fn libvirt(op: impl Into<String>, cause: virt::error::Error) -> Error {
        Error::Libvirt {
            op: op.into(),
            cause,
        }
    }
    pub(crate) fn io(path: &std::path::Path, op: &'static str, cause: io::Error) -> Error {
        Error::Io {
            path: path.to_path_buf(),
            op,
            cause,
        }
    }
    pub(crate) fn xml(what: impl Into<String>, why: impl Into<String>) -> Error {
        Error::Xml {
            what: what.into(),
            why: why.into(),
        }
    }
    /// The error that stopped the operation, looking through
    /// [`Error::RolledBack`].
    pub fn root(&self) -> &Error {
        match self {
            Error::RolledBack { cause, .. } => cause.root(),
            e => e,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rolled_back_error_says_its_first_cause() {
        let io = io::Error::from_raw_os_error(28); // ENOSPC
        let inner = Error::Merge(strata_merge::MergeError::from(strata_image::Error::Io {
            path: "/b".into(),
            op: "write data",
            offset: 65536,
            cause: io,
        }));
        let e = Error::RolledBack {
            cause: Box::new(Error::MergeFailed {
                op: "commit /a into /b".into(),
                state: "/a is unchanged".into(),
                cause: Box::new(inner),
            }),
            problems: vec![],
        };
        let text = e.to_string();
        assert!(text.contains("No space left on device"), "{text}");
        assert!(text.contains("/a is unchanged"), "{text}");
    }
}
