//! `commit_chain`: a commit of a chain the caller holds open, compared
//! with `qemu-img commit` of a twin; and its refusal when the files changed
//! under the held chain.

mod common;

use common::{assert_clean, assert_same, qemu_img, s, twin, view};
use strata_image::{Chain, OpenOptions};
use strata_merge::{commit_chain, CommitOptions, Hooks, MergeError};

#[test]
fn committing_a_held_chain_matches_qemu_img_commit() {
    let dir = tempfile::tempdir().unwrap();
    for shape in ["cluster64k", "depth12"] {
        let q = twin(shape, dir.path(), &format!("q-{shape}"));
        let st = twin(shape, dir.path(), &format!("s-{shape}"));
        let before = view(&st);
        qemu_img(&["commit", "-q", s(&q)]);

        let chain = Chain::open(&st, &OpenOptions::default()).unwrap();
        let base_q = Chain::open(&q, &OpenOptions::new().force_share(true))
            .unwrap()
            .layers()[1]
            .path
            .clone();
        let base_s = chain.layers()[1].path.clone();
        let mut done = 0;
        let mut progress = |p: strata_merge::Progress| done = p.done_bytes;
        let mut hooks = Hooks::new().with_progress(&mut progress);
        let r = commit_chain(chain, &CommitOptions::default(), &mut hooks).unwrap();
        assert_eq!(r.layers_merged, 1, "{shape}");
        assert!(done > 0, "{shape}: progress reported");
        assert_same(&base_s, &base_q);
        assert_same(&st, &q);
        assert!(view(&st) == before, "{shape}: the top's view is kept");
        assert_clean(&base_s);
        assert_clean(&st);
    }
}

#[test]
fn a_held_chain_whose_top_was_repointed_is_refused_and_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let st = twin("cluster64k", dir.path(), "s");
    let other = dir.path().join("other.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&other), "64M"]);
    let opts = OpenOptions::new().force_share(true);
    let chain = Chain::open(&st, &opts).unwrap();
    let base = chain.layers()[1].path.clone();
    let base_bytes = std::fs::read(&base).unwrap();
    let top_bytes = std::fs::read(&st).unwrap();
    // Re-pointed while the caller holds it (header only).
    qemu_img(&["rebase", "-u", "-b", s(&other), "-F", "qcow2", s(&st)]);
    let top_bytes_after = std::fs::read(&st).unwrap();
    assert!(top_bytes_after != top_bytes);
    let e = commit_chain(chain, &CommitOptions::default(), &mut Hooks::default()).unwrap_err();
    assert!(matches!(e, MergeError::SourceChanged { .. }), "{e}");
    assert!(e.to_string().contains("s/"), "{e}");
    assert!(
        std::fs::read(&base).unwrap() == base_bytes,
        "the base was written"
    );
    assert!(
        std::fs::read(&st).unwrap() == top_bytes_after,
        "the top was written"
    );
}
