//! Strata's commit, pull and safe rebase against qemu-img on twins: the
//! same chain copied twice, qemu-img run on one copy, Strata on the other.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use strata_image::ImageFormat;
use strata_merge::{commit, pull, rebase, CommitOptions, Hooks, PullOptions, RebaseOptions};

/// Shapes with a backing file that the write path can modify.
const SHAPES: &[&str] = &[
    "cluster512",
    "cluster4k",
    "cluster64k",
    "cluster2m",
    "extended_l2",
    "compat010",
    "refcount1",
    "refcount64",
    "compressed_deflate",
    "compressed_zstd",
    "raw_backing",
    "relative_backing",
    "short_backing",
];

fn base_of(top: &Path) -> PathBuf {
    let name = backing_of(top).unwrap();
    top.parent().unwrap().join(name)
}

#[test]
fn commit_matches_qemu_img_commit_on_every_shape() {
    for shape in SHAPES {
        let dir = tempfile::tempdir().unwrap();
        let q_top = twin(shape, dir.path(), "qemu");
        let s_top = twin(shape, dir.path(), "strata");
        let (q_base, s_base) = (base_of(&q_top), base_of(&s_top));
        let before = view(&s_top);

        qemu_img(&["commit", "-q", s(&q_top)]);
        let r = commit(&s_top, &CommitOptions::default(), &mut Hooks::default())
            .unwrap_or_else(|e| panic!("{shape}: {e}"));

        assert!(r.top_emptied, "{shape}");
        assert_same(&q_base, &s_base);
        assert_eq!(view(&s_base), before, "{shape}: base holds the top's view");
        assert_eq!(view(&s_top), before, "{shape}: top's view unchanged");
        assert_eq!(own_allocated(&s_top), 0, "{shape}: top emptied");
        assert_eq!(
            own_allocated(&q_top),
            0,
            "{shape}: qemu-img empties the top too"
        );
        for img in [&q_base, &s_base, &q_top, &s_top] {
            assert_clean(img);
        }
    }
}

#[test]
fn pull_matches_qemu_img_rebase_to_nothing_on_every_shape() {
    for shape in SHAPES {
        let dir = tempfile::tempdir().unwrap();
        let q_top = twin(shape, dir.path(), "qemu");
        let s_top = twin(shape, dir.path(), "strata");
        let before = view(&s_top);

        qemu_img(&["rebase", "-q", "-b", "", s(&q_top)]);
        let r = pull(&s_top, &PullOptions::default(), &mut Hooks::default())
            .unwrap_or_else(|e| panic!("{shape}: {e}"));

        assert_eq!(r.new_backing, None);
        assert_eq!(backing_of(&s_top), None, "{shape}: no backing left");
        assert_same(&q_top, &s_top);
        assert_eq!(view(&s_top), before, "{shape}");
        assert_clean(&s_top);
    }
}

#[test]
fn commit_with_deep_base_matches_qemu_img_commit_b() {
    let dir = tempfile::tempdir().unwrap();
    let q_top = twin("depth12", dir.path(), "qemu");
    let s_top = twin("depth12", dir.path(), "strata");
    let q_base = q_top.with_file_name("layer4.qcow2");
    let s_base = s_top.with_file_name("layer4.qcow2");
    let before = view(&s_top);

    qemu_img(&["commit", "-q", "-b", s(&q_base), s(&q_top)]);
    let opts = CommitOptions {
        base: Some(s_base.clone()),
        ..CommitOptions::default()
    };
    let r = commit(&s_top, &opts, &mut Hooks::default()).unwrap();

    assert_eq!(r.layers_merged, 7);
    assert_eq!(r.top_repointed.as_deref(), Some("layer4.qcow2"));
    assert_same(&q_base, &s_base);
    assert_eq!(view(&s_base), before);
    assert_eq!(view(&s_top), before);
    assert_eq!(backing_of(&s_top).as_deref(), Some("layer4.qcow2"));
    assert_eq!(own_allocated(&s_top), 0);
    assert_clean(&s_base);
    assert_clean(&s_top);
}

#[test]
fn pull_with_deep_base_matches_qemu_img_rebase_b() {
    let dir = tempfile::tempdir().unwrap();
    let q_top = twin("depth12", dir.path(), "qemu");
    let s_top = twin("depth12", dir.path(), "strata");
    let before = view(&s_top);

    qemu_img(&[
        "rebase",
        "-q",
        "-b",
        "layer3.qcow2",
        "-F",
        "qcow2",
        s(&q_top),
    ]);
    let opts = PullOptions {
        base: Some(PathBuf::from("layer3.qcow2")),
        ..PullOptions::default()
    };
    let r = pull(&s_top, &opts, &mut Hooks::default()).unwrap();

    assert_eq!(r.layers_pulled, 7);
    assert_eq!(r.new_backing.as_deref(), Some("layer3.qcow2"));
    assert_eq!(backing_of(&s_top).as_deref(), Some("layer3.qcow2"));
    assert_same(&q_top, &s_top);
    assert_eq!(view(&s_top), before);
    assert_clean(&s_top);
}

#[test]
fn safe_rebase_onto_another_image_matches_qemu_img_rebase() {
    for shape in ["cluster64k", "extended_l2", "compat010", "cluster512"] {
        let dir = tempfile::tempdir().unwrap();
        let q_top = twin(shape, dir.path(), "qemu");
        let s_top = twin(shape, dir.path(), "strata");
        let size = info(&s_top)["virtual-size"].as_u64().unwrap();
        for d in ["qemu", "strata"] {
            let new = dir.path().join(d).join("new.qcow2");
            qemu_img(&["create", "-q", "-f", "qcow2", s(&new), &size.to_string()]);
            let (a, b) = (
                format!("write -P 0xc1 {} 96k", size / 4),
                format!("write -z {} 64k", size / 2),
            );
            qemu_io(&new, &["write -P 0xa1 0 64k", &a, &b]);
        }
        let before = view(&s_top);

        qemu_img(&["rebase", "-q", "-b", "new.qcow2", "-F", "qcow2", s(&q_top)]);
        let r = rebase(
            &s_top,
            Some(("new.qcow2", ImageFormat::Qcow2)),
            &RebaseOptions::default(),
            &mut Hooks::default(),
        )
        .unwrap_or_else(|e| panic!("{shape}: {e}"));

        assert_eq!(r.new_backing.as_deref(), Some("new.qcow2"));
        assert_eq!(backing_of(&s_top).as_deref(), Some("new.qcow2"));
        assert_same(&q_top, &s_top);
        assert_eq!(view(&s_top), before, "{shape}");
        assert_clean(&s_top);
    }
}

#[test]
fn safe_rebase_onto_a_lower_layer_matches_qemu_img_rebase() {
    let dir = tempfile::tempdir().unwrap();
    let q_top = twin("depth12", dir.path(), "qemu");
    let s_top = twin("depth12", dir.path(), "strata");
    let before = view(&s_top);

    qemu_img(&[
        "rebase",
        "-q",
        "-b",
        "layer2.qcow2",
        "-F",
        "qcow2",
        s(&q_top),
    ]);
    rebase(
        &s_top,
        Some(("layer2.qcow2", ImageFormat::Qcow2)),
        &RebaseOptions::default(),
        &mut Hooks::default(),
    )
    .unwrap();

    assert_same(&q_top, &s_top);
    assert_eq!(view(&s_top), before);
    assert_clean(&s_top);
}

#[test]
fn commit_grows_a_smaller_base() {
    let dir = tempfile::tempdir().unwrap();
    let top = twin("short_backing", dir.path(), "t");
    let base = base_of(&top);
    let before = view(&top);
    let r = commit(&top, &CommitOptions::default(), &mut Hooks::default()).unwrap();
    assert_eq!(r.base_resized, Some((1024 * 1024 + 4096, 4 * 1024 * 1024)));
    assert_eq!(info(&base)["virtual-size"], 4 * 1024 * 1024);
    assert_eq!(view(&base), before);
}

#[test]
fn commit_keep_top_leaves_the_top_allocated() {
    let dir = tempfile::tempdir().unwrap();
    let top = twin("cluster64k", dir.path(), "t");
    let own = own_allocated(&top);
    let before = view(&top);
    let opts = CommitOptions {
        keep_top: true,
        ..CommitOptions::default()
    };
    let r = commit(&top, &opts, &mut Hooks::default()).unwrap();
    assert!(!r.top_emptied);
    assert_eq!(own_allocated(&top), own);
    assert_eq!(view(&base_of(&top)), before);
    assert_eq!(view(&top), before);
}

/// Bytes a file occupies on disk.
fn on_disk(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).unwrap().blocks() * 512
}

/// A 32 MiB base and a top with data in five L2 tables' spans (4 KiB
/// clusters: 2 MiB each), with zero clusters and compressed clusters.
fn sparse_pair(dir: &Path, name: &str, snapshot: bool) -> PathBuf {
    let d = dir.join(name);
    std::fs::create_dir(&d).unwrap();
    let (base, top) = (d.join("base.qcow2"), d.join("top.qcow2"));
    let o = "cluster_size=4k";
    qemu_img(&["create", "-q", "-f", "qcow2", "-o", o, s(&base), "32M"]);
    qemu_io(&base, &["write -P 1 0 1M", "write -P 2 16M 1M"]);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        o,
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        s(&top),
    ]);
    qemu_io(
        &top,
        &[
            "write -P 3 64k 256k",
            "write -z 512k 128k",
            "write -P 4 6M 1M",
            "write -c -P 5 11M 64k",
            "write -c -P 8 12M 8k",
            "write -P 6 16M 64k",
            "write -P 7 31M 1M",
        ],
    );
    if snapshot {
        qemu_img(&["snapshot", "-c", "s1", s(&top)]);
    }
    top
}

#[test]
fn commit_gives_the_emptied_tops_clusters_back_as_qemu_img_does() {
    let dir = tempfile::tempdir().unwrap();
    let q_top = sparse_pair(dir.path(), "qemu", false);
    let s_top = sparse_pair(dir.path(), "strata", false);
    let before = view(&s_top);
    qemu_img(&["commit", "-q", s(&q_top)]);
    commit(&s_top, &CommitOptions::default(), &mut Hooks::default()).unwrap();

    assert_eq!(view(&s_top), before, "the emptied top reads as before");
    assert_same(&q_top, &s_top);
    assert_same(&base_of(&q_top), &base_of(&s_top));
    assert_eq!(own_allocated(&s_top), 0);
    for img in [&q_top, &s_top, &base_of(&s_top)] {
        // Exit status 0: no corruption and no leaked clusters.
        assert_clean(img);
    }
    // The clusters are given back: no table or data cluster is left (the
    // header, L1 table, refcount table and block remain), as with qemu-img.
    let (q, st) = (on_disk(&q_top), on_disk(&s_top));
    let (ql, sl) = (
        std::fs::metadata(&q_top).unwrap().len(),
        std::fs::metadata(&s_top).unwrap().len(),
    );
    assert!(
        st <= q.max(256 << 10),
        "strata top {st} bytes on disk, qemu-img {q}"
    );
    assert!(sl <= ql, "strata top {sl} bytes long, qemu-img {ql}");
}

#[test]
fn commit_empties_a_top_with_internal_snapshots_keeping_them() {
    let dir = tempfile::tempdir().unwrap();
    let s_top = sparse_pair(dir.path(), "strata", true);
    let before = view(&s_top);
    commit(&s_top, &CommitOptions::default(), &mut Hooks::default()).unwrap();
    assert_eq!(view(&s_top), before);
    assert_eq!(own_allocated(&s_top), 0);
    assert_clean(&s_top);
    let list = qemu_img(&["snapshot", "-l", "-U", s(&s_top)]);
    assert!(list.contains("s1"), "{list}");
}

/// A chain of `depth` images `l0.qcow2` (1 MiB, `cluster` clusters) …
/// `l{depth-1}.qcow2` (64 KiB clusters) in `dir`; returns the top.
fn deep_chain(dir: &Path, depth: u32, cluster: &str) -> PathBuf {
    let p = |i: u32| dir.join(format!("l{i}.qcow2"));
    let o = format!("cluster_size={cluster}");
    qemu_img(&["create", "-q", "-f", "qcow2", "-o", &o, s(&p(0)), "1M"]);
    for i in 1..depth {
        let below = format!("l{}.qcow2", i - 1);
        let o = if i == depth - 1 {
            o.as_str()
        } else {
            "cluster_size=64k"
        };
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            o,
            "-b",
            &below,
            "-F",
            "qcow2",
            s(&p(i)),
        ]);
    }
    p(depth - 1)
}

#[test]
fn commit_into_the_parent_of_a_200_deep_chain_matches_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let (qd, sd) = (dir.path().join("qemu"), dir.path().join("strata"));
    std::fs::create_dir(&qd).unwrap();
    let q_top = deep_chain(&qd, 200, "64k");
    qemu_io(
        &q_top,
        &[
            "write -P 9 0 64k",
            "write -P 7 128k 128k",
            "write -z 512k 64k",
        ],
    );
    run("cp", &["-a", s(&qd), s(&sd)]);
    let s_top = sd.join("l199.qcow2");
    qemu_img(&["commit", "-q", s(&q_top)]);
    commit(&s_top, &CommitOptions::default(), &mut Hooks::default()).unwrap();
    assert_same(&q_top, &s_top);
    assert_same(&qd.join("l198.qcow2"), &sd.join("l198.qcow2"));
    assert_eq!(own_allocated(&s_top), 0);
    assert_clean(&s_top);
    assert_clean(&sd.join("l198.qcow2"));
}

#[test]
fn a_commit_that_would_read_past_the_open_limit_fails_and_changes_nothing_it_reads() {
    // 4 KiB clusters in the top, 64 KiB in the parent: a 4 KiB write needs
    // the rest of the parent's cluster, which only the deepest layer holds.
    let dir = tempfile::tempdir().unwrap();
    let top = deep_chain(dir.path(), 200, "4k");
    qemu_io(&dir.path().join("l0.qcow2"), &["write -P 3 0 64k"]);
    qemu_io(&top, &["write -P 9 0 4k"]);
    let before = view(&top);
    let e = commit(&top, &CommitOptions::default(), &mut Hooks::default()).unwrap_err();
    assert!(e.to_string().contains("deeper than 128"), "{e}");
    // The top still reads as before (it is emptied only after the copy).
    assert_eq!(view(&top), before);
    assert_clean(&top);
}
