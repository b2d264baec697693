//! Block status answers a long range in few steps, whatever the entry
//! width: an unallocated range of an extended-L2 layer is one extent up
//! to the next cluster with a host cluster (not one per cluster, nor one
//! per subcluster), and the extents, merged, are `qemu-img map`'s.

mod common;

use common::*;
use strata_image::{BlockStatus, Chain, OpenOptions};

/// The merged entries of `qemu-img map --output=json` and of Strata's
/// block status, as (start, length, depth, present, zero, data, offset).
type Entry = (u64, u64, u64, bool, bool, bool, Option<u64>);

fn qemu_map(top: &std::path::Path) -> Vec<Entry> {
    let out = qemu_img(&["map", "--output=json", top.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["start"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["depth"].as_u64().unwrap(),
                e["present"].as_bool().unwrap(),
                e["zero"].as_bool().unwrap(),
                e["data"].as_bool().unwrap(),
                e["offset"].as_u64(),
            )
        })
        .collect()
}

fn merged(extents: &[BlockStatus]) -> Vec<Entry> {
    let mut out: Vec<BlockStatus> = Vec::new();
    for s in extents {
        match out.last_mut() {
            Some(last) if last.mergeable(s) => last.length += s.length,
            _ => out.push(*s),
        }
    }
    out.iter()
        .map(|s| {
            (
                s.start,
                s.length,
                s.depth as u64,
                s.allocated,
                s.zero,
                s.data,
                s.offset,
            )
        })
        .collect()
}

#[test]
fn an_extended_l2_chain_is_walked_in_few_steps_and_maps_like_qemu_img() {
    if skip() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let base = d.path().join("base.qcow2");
    let top = d.path().join("top.qcow2");
    let (b, t) = (base.to_str().unwrap(), top.to_str().unwrap());
    // 2 MiB clusters, 64 KiB subclusters: one L2 table maps 256 GiB, so
    // the whole 64 GiB disk is one table of 131072 entries per layer.
    let opts = "cluster_size=2M,extended_l2=on";
    qemu_create(&["-o", opts, b, "64G"]);
    qemu_io(
        &base,
        &[
            "write -P 1 1G 64k",
            "write -P 2 40G 2M",
            "write -z 50G 128k",
        ],
    );
    qemu_create(&["-o", opts, "-b", b, "-F", "qcow2", t]);
    qemu_io(&top, &["write -P 3 30G 64k"]);
    let chain = Chain::open(&top, &OpenOptions::new()).unwrap();
    let size = chain.virtual_size();
    let extents: Vec<BlockStatus> = chain
        .block_status(0, size)
        .collect::<Result<_, _>>()
        .unwrap();
    // They tile the disk.
    let mut pos = 0;
    for s in &extents {
        assert_eq!(s.start, pos);
        assert!(s.length > 0);
        pos = s.end();
    }
    assert_eq!(pos, size);
    // Each allocated cluster takes a few extents (its subcluster runs);
    // each run of clusters without a host cluster, one. One extent per
    // cluster would be 32768, per subcluster a million.
    assert!(
        extents.len() <= 20,
        "{} extents: {extents:#?}",
        extents.len()
    );
    // The first gigabyte, allocated nowhere, is one answer.
    assert_eq!((extents[0].start, extents[0].length), (0, 1 << 30));
    assert!(!extents[0].allocated && extents[0].offset.is_none());
    // The unallocated subclusters of the base's partly written cluster
    // carry its host offset, as QEMU reports them.
    let rest = extents
        .iter()
        .find(|s| s.start == (1 << 30) + (64 << 10))
        .expect("an extent where the write at 1 GiB ends");
    assert!(!rest.allocated && rest.offset.is_some(), "{rest:?}");
    assert_eq!(merged(&extents), qemu_map(&top));
}
