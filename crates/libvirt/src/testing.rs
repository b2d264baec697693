//! Fault injection and lock helpers for this workspace's tests (feature
//! `testing`; not part of the stable API). Without the feature only the
//! internal fail points remain, and they never fire.

#[cfg(feature = "testing")]
use std::cell::RefCell;

#[cfg(feature = "testing")]
use crate::error::Error;
use crate::error::Result;

#[cfg(feature = "testing")]
/// Takes the per-domain lock of `domain` as an operation does and holds it
/// until the returned guard is dropped (for tests of the lock across
/// processes).
#[must_use = "the lock is released when the guard is dropped"]
pub fn lock_domain(conn: &virt::connect::Connect, domain: &str) -> Result<impl Drop> {
    let dom = virt::domain::Domain::lookup_by_name(conn, domain)
        .map_err(|e| Error::libvirt(format!("look up domain {domain:?}"), e))?;
    let uuid = dom
        .get_uuid_string()
        .map_err(|e| Error::libvirt("get domain UUID", e))?;
    crate::ctx::DomainLock::acquire(conn, domain, &uuid)
}

#[cfg(feature = "testing")]
thread_local! {
    static FAIL_AT: RefCell<Option<String>> = const { RefCell::new(None) };
}

#[cfg(feature = "testing")]
/// Makes the next libvirt step named `point` on this thread fail
/// (`define_domain`, `define_snapshot`, `delete_snapshot`); `None` clears.
pub fn set_fail_point(point: Option<&str>) {
    FAIL_AT.with(|f| *f.borrow_mut() = point.map(str::to_string));
}

/// Fails when the test set `point` as the next failure (see
/// [`set_fail_point`]).
#[cfg(feature = "testing")]
pub(crate) fn fail_point(point: &str) -> Result<()> {
    let hit = FAIL_AT.with(|f| {
        let mut f = f.borrow_mut();
        if f.as_deref() == Some(point) {
            *f = None;
            true
        } else {
            false
        }
    });
    if hit {
        return Err(Error::InvalidArgument(format!(
            "injected failure at {point}"
        )));
    }
    Ok(())
}

/// Without the `testing` feature no fail point is ever set.
#[cfg(not(feature = "testing"))]
#[inline]
pub(crate) fn fail_point(_point: &str) -> Result<()> {
    Ok(())
}
