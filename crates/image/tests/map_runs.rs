//! `map` over runs of data clusters: a long extent is recognised from the
//! raw L2 words (qcow2/view.rs, `data_run_in`), and must come out exactly
//! as mapping cluster by cluster and joining does (the slow path: a map
//! of one cluster at a time never takes the shortcut), and as qemu-img
//! map reports (the differential tests of the cli crate).

use std::path::Path;

use strata_image::create::{create_qcow2, CreateOptions};
use strata_image::{Extent, MemStorage, Qcow2Image, Storage};

const CS: u64 = 64 << 10;

/// A change of L2 entry `i`'s word.
type Patch = Box<dyn Fn(u64, u64) -> u64>;
const N: u64 = 40;

/// An image with `N` data clusters written at once (contiguous on the
/// host), then L2 entries patched: `patch(i, word) -> word`.
fn image(patch: impl Fn(u64, u64) -> u64) -> Qcow2Image {
    let m = MemStorage::new();
    let mut img = create_qcow2(
        Box::new(m.clone()),
        Path::new("t.qcow2"),
        &CreateOptions {
            size: 16 << 20,
            ..Default::default()
        },
    )
    .unwrap();
    let zeros = |b: &mut [u8], _| {
        b.fill(0);
        Ok(())
    };
    img.write(0, &vec![0x5a; (N * CS) as usize], &zeros)
        .unwrap();
    img.flush().unwrap();
    let l2 = img.l1()[0] & 0x00ff_ffff_ffff_fe00;
    drop(img);
    for i in 0..N {
        let mut w = [0u8; 8];
        m.read_at(&mut w, l2 + i * 8).unwrap();
        let new = patch(i, u64::from_be_bytes(w));
        m.write_at(&new.to_be_bytes(), l2 + i * 8).unwrap();
    }
    Qcow2Image::open(Box::new(m), Path::new("t.qcow2")).unwrap()
}

/// The extents of `[start, end)`: from long maps, and cluster by cluster
/// joined where `continues` says so.
fn both(img: &Qcow2Image, start: u64, end: u64) -> (Vec<Extent>, Vec<Extent>) {
    let mut long = Vec::new();
    let mut at = start;
    while at < end {
        let e = img.map(at, end - at).unwrap();
        at = e.start + e.len;
        long.push(e);
    }
    let mut joined: Vec<Extent> = Vec::new();
    let mut at = start;
    while at < end {
        let step = (CS - at % CS).min(end - at);
        let e = img.map(at, step).unwrap();
        assert_eq!(e.len, step, "one cluster at {at:#x}");
        match joined.last_mut() {
            Some(l) if l.mapping.continues(l.len, e.mapping) => l.len += e.len,
            _ => joined.push(e),
        }
        at += step;
    }
    (long, joined)
}

#[test]
fn a_run_of_data_maps_as_cluster_by_cluster_and_stops_where_it_changes() {
    const COPIED: u64 = 1 << 63;
    const ZERO: u64 = 1;
    let cases: Vec<(&str, Patch)> = vec![
        ("untouched", Box::new(|_, w| w)),
        // The flags change, the host run does not: one extent still.
        (
            "copied flag off at 5",
            Box::new(|i, w| if i == 5 { w & !COPIED } else { w }),
        ),
        (
            "zero flag at 9",
            Box::new(|i, w| if i == 9 { w | ZERO } else { w }),
        ),
        // Host order broken: 12 and 13 swapped.
        (
            "12 and 13 swapped",
            Box::new(|i, w| match i {
                12 => w + CS,
                13 => w - CS,
                _ => w,
            }),
        ),
        ("a hole at 20", Box::new(|i, w| if i == 20 { 0 } else { w })),
        // A cluster pointing one further: the run continues past a gap
        // of the host only when contiguous.
        (
            "skip ahead at 30",
            Box::new(|i, w| if i >= 30 { w + CS } else { w }),
        ),
    ];
    for (what, patch) in cases {
        let img = image(patch);
        for (start, end) in [
            (0, N * CS),
            (0, 16 << 20),
            (CS / 2, N * CS - 100),
            (7 * CS + 512, 33 * CS + 4096),
        ] {
            let (long, joined) = both(&img, start, end);
            assert_eq!(long, joined, "{what}: [{start:#x}, {end:#x})");
        }
        if what == "untouched" {
            let (long, _) = both(&img, 0, N * CS);
            assert_eq!(long.len(), 1, "one extent: {long:?}");
        }
    }
}
