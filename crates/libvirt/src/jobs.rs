//! libvirt's live block jobs (`virDomainBlockCommit`, `virDomainBlockPull`,
//! `virDomainBlockRebase`, `virDomainBlockJobAbort`,
//! `virDomainGetBlockJobInfo`), which the `virt` crate 0.4 does not wrap:
//! called through `virt-sys`, the only unsafe code of this crate, each call
//! a plain C call on the domain pointer `virt` owns with C strings that
//! live across the call.
#![allow(unsafe_code)]

use std::ffi::CString;
use std::os::raw::c_ulong;
use std::sync::atomic::Ordering;
use std::time::Duration;

use strata_merge::{Hooks, Progress};
use virt::domain::Domain;
use virt::sys;

use crate::error::{Error, Result};

fn cstr(s: &str) -> Result<CString> {
    CString::new(s).map_err(|_| Error::InvalidArgument(format!("{s:?}: contains a NUL byte")))
}

fn last(op: String) -> Error {
    Error::libvirt(op, virt::error::Error::last_error())
}

/// Bandwidth of a job in bytes per second (0: unlimited).
pub(crate) type Bandwidth = u64;

fn bw(b: Bandwidth) -> c_ulong {
    c_ulong::try_from(b).unwrap_or(c_ulong::MAX)
}

/// Starts `virDomainBlockCommit(disk, base, top, bandwidth, flags)`
/// (bandwidth in bytes/s).
pub(crate) fn start_commit(
    dom: &Domain,
    disk: &str,
    base: &str,
    top: Option<&str>,
    bandwidth: Bandwidth,
    active: bool,
) -> Result<()> {
    let d = cstr(disk)?;
    let b = cstr(base)?;
    let t = top.map(cstr).transpose()?;
    let mut flags = sys::VIR_DOMAIN_BLOCK_COMMIT_BANDWIDTH_BYTES;
    if active {
        flags |= sys::VIR_DOMAIN_BLOCK_COMMIT_ACTIVE;
    }
    // SAFETY: the domain pointer is valid while `dom` lives; the strings
    // outlive the call; libvirt copies what it keeps.
    let r = unsafe {
        sys::virDomainBlockCommit(
            dom.as_ptr(),
            d.as_ptr(),
            b.as_ptr(),
            t.as_ref().map_or(std::ptr::null(), |t| t.as_ptr()),
            bw(bandwidth),
            flags,
        )
    };
    if r < 0 {
        return Err(last(format!("start block commit of {disk} into {base}")));
    }
    Ok(())
}

/// Starts a pull into the active image of `disk`: of every backing file
/// (`virDomainBlockPull`), or of those above `base` (`virDomainBlockRebase`).
pub(crate) fn start_pull(
    dom: &Domain,
    disk: &str,
    base: Option<&str>,
    bandwidth: Bandwidth,
) -> Result<()> {
    let d = cstr(disk)?;
    let r = match base {
        None => {
            // SAFETY: as in start_commit.
            unsafe {
                sys::virDomainBlockPull(
                    dom.as_ptr(),
                    d.as_ptr(),
                    bw(bandwidth),
                    sys::VIR_DOMAIN_BLOCK_PULL_BANDWIDTH_BYTES,
                )
            }
        }
        Some(b) => {
            let b = cstr(b)?;
            // SAFETY: as in start_commit.
            unsafe {
                sys::virDomainBlockRebase(
                    dom.as_ptr(),
                    d.as_ptr(),
                    b.as_ptr(),
                    bw(bandwidth),
                    sys::VIR_DOMAIN_BLOCK_REBASE_BANDWIDTH_BYTES,
                )
            }
        }
    };
    if r < 0 {
        return Err(last(format!("start block pull into {disk}")));
    }
    Ok(())
}

/// A block job's state (`virDomainGetBlockJobInfo`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct JobInfo {
    pub kind: i32,
    pub cur: u64,
    pub end: u64,
}

/// The block job on `disk`, `None` when there is none.
pub(crate) fn job_info(dom: &Domain, disk: &str) -> Result<Option<JobInfo>> {
    let d = cstr(disk)?;
    let mut info = sys::virDomainBlockJobInfo {
        type_: 0,
        bandwidth: 0,
        cur: 0,
        end: 0,
    };
    // SAFETY: `info` is a valid, writable struct for the call.
    let r = unsafe { sys::virDomainGetBlockJobInfo(dom.as_ptr(), d.as_ptr(), &mut info, 0) };
    match r {
        r if r < 0 => Err(last(format!("query the block job of {disk}"))),
        0 => Ok(None),
        _ => Ok(Some(JobInfo {
            kind: info.type_,
            cur: info.cur,
            end: info.end,
        })),
    }
}

/// `virDomainBlockJobAbort(disk, 0)`: cancels the job on `disk` (the
/// chain stays as it was).
pub(crate) fn abort(dom: &Domain, disk: &str) -> Result<()> {
    let d = cstr(disk)?;
    // SAFETY: as in start_commit.
    let r = unsafe { sys::virDomainBlockJobAbort(dom.as_ptr(), d.as_ptr(), 0) };
    if r < 0 {
        return Err(last(format!("abort the block job of {disk}")));
    }
    Ok(())
}

/// Longest wait for libvirt to take a ready active commit as ready: its
/// job can report `cur == end` a moment before QEMU's READY event has
/// reached libvirt, and a pivot in between is refused with
/// `VIR_ERR_BLOCK_COPY_ACTIVE` ("not ready for pivot yet").
const PIVOT_READY_WAIT: Duration = Duration::from_secs(60);

/// Pivots the ready active commit on `disk` ([`abort`] with pivot),
/// retrying while libvirt says the job is not ready yet.
pub(crate) fn pivot(dom: &Domain, disk: &str) -> Result<()> {
    let d = cstr(disk)?;
    let start = std::time::Instant::now();
    loop {
        // SAFETY: as in start_commit.
        let r = unsafe {
            sys::virDomainBlockJobAbort(
                dom.as_ptr(),
                d.as_ptr(),
                sys::VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT,
            )
        };
        if r >= 0 {
            return Ok(());
        }
        let e = virt::error::Error::last_error();
        let not_ready = e.code() == virt::error::ErrorNumber::BlockCopyActive;
        if !not_ready || start.elapsed() >= PIVOT_READY_WAIT {
            return Err(Error::libvirt(format!("pivot the block job of {disk}"), e));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// How a waited-for job ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Waited {
    /// The job finished by itself (commit of an inner layer, pull).
    Finished,
    /// An active commit is ready to pivot (the job still runs, mirroring).
    Ready,
}

/// Waits for the job on `disk`: until it is gone, or (`ready_ends`, an
/// active commit) until it is ready to pivot. Reports progress through
/// `hooks`; when `hooks.cancel` becomes true the job is aborted (the
/// chain stays as it was: QEMU's jobs change the chain only when they
/// complete) and [`Error::Cancelled`] is returned.
pub(crate) fn wait(
    dom: &Domain,
    disk: &str,
    ready_ends: bool,
    hooks: &mut Hooks<'_>,
) -> Result<Waited> {
    loop {
        if hooks.cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
            // The job may have ended in between: then there is nothing to abort.
            let r = abort(dom, disk);
            if let Err(e) = r {
                if job_info(dom, disk).ok().flatten().is_some() {
                    return Err(e);
                }
            }
            return Err(Error::Cancelled {
                disk: disk.to_string(),
            });
        }
        match job_info(dom, disk)? {
            // libvirt registers the job before the start call returns, so
            // no job means it ended.
            None if ready_ends => {
                return Err(Error::InvalidArgument(format!(
                    "the active block commit of disk {disk} ended without becoming ready to \
                     pivot (libvirtd's log says why); the domain keeps its chain"
                )));
            }
            None => {
                if let Some(p) = hooks.progress.as_mut() {
                    p(Progress {
                        done_bytes: 1,
                        total_bytes: 1,
                    });
                }
                return Ok(Waited::Finished);
            }
            Some(i) => {
                if let Some(p) = hooks.progress.as_mut() {
                    p(Progress {
                        done_bytes: i.cur,
                        total_bytes: i.end,
                    });
                }
                if ready_ends && i.end > 0 && i.cur == i.end {
                    return Ok(Waited::Ready);
                }
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
