//! Barriers with nothing to write: the qcow2 writer skips a sync when its
//! storage knows that nothing changed the file since the last successful
//! one (docs/crash-consistency.md, "Barriers with nothing to write"), and
//! only then. Counted on a [`FaultStorage`], which tracks that as a file
//! storage does; the crash tests (crash_consistency.rs, resize_crash.rs,
//! the merge crate's crash_fault.rs) run every workload with the skips.

use std::path::Path;

use strata_image::create::{create_qcow2, CreateOptions};
use strata_image::{FaultStorage, MemStorage, Qcow2Image, Storage};

fn image(size: u64) -> Vec<u8> {
    let m = MemStorage::new();
    create_qcow2(
        Box::new(m.clone()),
        Path::new("t.qcow2"),
        &CreateOptions {
            size,
            ..Default::default()
        },
    )
    .unwrap();
    m.to_bytes()
}

fn zeros(b: &mut [u8], _: u64) -> strata_image::Result<()> {
    b.fill(0);
    Ok(())
}

#[test]
fn a_flush_after_a_flush_syncs_nothing_and_a_write_brings_the_sync_back() {
    let st = FaultStorage::new(image(64 << 20));
    let mut img = Qcow2Image::open_rw(Box::new(st.clone()), Path::new("t.qcow2")).unwrap();
    // Freshly opened: a sync is not known to be unneeded.
    assert!(st.unsynced());
    img.write(0, &[1u8; 70_000], &zeros).unwrap();
    img.flush().unwrap();
    let after_first = st.syncs();
    assert!(
        after_first >= 2,
        "data, then the entries: {after_first} syncs"
    );
    assert_eq!(st.pending(), 0);
    assert!(!st.unsynced());
    // Nothing written since: no sync, no operation at all.
    let ops = st.own_ops();
    img.flush().unwrap();
    img.flush().unwrap();
    assert_eq!(st.syncs(), after_first);
    assert_eq!(st.own_ops(), ops);
    // A write: the next flush syncs again, and leaves nothing pending.
    img.write(1 << 20, &[2u8; 512], &zeros).unwrap();
    assert!(st.unsynced());
    img.flush().unwrap();
    assert!(st.syncs() > after_first);
    assert_eq!(st.pending(), 0);
    assert!(st.durable_image(&mut |_| false) == st.current());
}

#[test]
fn the_header_switch_of_a_pull_syncs_once_after_the_entries() {
    // What a pull ends with: the entries committed (a flush), then the
    // backing file dropped from the header. The flush that starts the
    // switch and the close find nothing to write: the header write has
    // exactly one sync after it, and nothing is left pending.
    let st = FaultStorage::new(image(64 << 20));
    let mut img = Qcow2Image::open_rw(Box::new(st.clone()), Path::new("t.qcow2")).unwrap();
    img.write(0, &[3u8; 4096], &zeros).unwrap();
    img.flush().unwrap();
    let before = st.syncs();
    img.set_backing(None).unwrap();
    assert_eq!(st.syncs(), before + 1, "one sync: the header's");
    img.close().unwrap();
    assert_eq!(st.syncs(), before + 1, "the close syncs nothing");
    assert_eq!(st.pending(), 0);
}

#[test]
fn a_failed_sync_is_not_taken_for_a_clean_one() {
    let st = FaultStorage::new(image(64 << 20));
    let mut img = Qcow2Image::open_rw(Box::new(st.clone()), Path::new("t.qcow2")).unwrap();
    img.write(0, &[4u8; 4096], &zeros).unwrap();
    // Crash at the very next operation (the first sync of the flush).
    st.crash_at(st.ops());
    assert!(img.flush().is_err());
    assert!(st.unsynced(), "a sync that failed made nothing durable");
    assert!(st.pending() > 0);
}
