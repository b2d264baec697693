//! `cargo test` replays the `merge` fuzz target's corpus and saved crash
//! inputs (`fuzz/corpus/merge/`, `fuzz/regressions/merge/`) through the very
//! target body the fuzzer runs (fuzz/src/merge.rs, included here), so a
//! finding reproduces byte for byte. Each finding also has a named test.

#[path = "../../image/tests/fuzz_harness/mod.rs"]
mod harness;
#[path = "../../../fuzz/src/merge.rs"]
mod merge_target;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz")
}

#[test]
fn merge_corpus_and_regressions_replay_without_failures() {
    let mut files = Vec::new();
    for sub in ["corpus/merge", "regressions/merge"] {
        for e in std::fs::read_dir(fuzz_dir().join(sub)).unwrap() {
            files.push(e.unwrap().path());
        }
    }
    files.sort();
    assert!(files.len() > 3, "no merge corpus");
    let mut failures = Vec::new();
    for p in &files {
        let data = std::fs::read(p).unwrap();
        if let Err(e) = catch_unwind(AssertUnwindSafe(|| merge_target::merge(&data))) {
            let msg = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            failures.push(format!("{}: {msg}", p.display()));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Finding F4 (merge target, 2026-11-26): a commit whose top holds a
/// compressed cluster that does not decompress failed part-way, after it
/// had written into the base. The plan pass now decompresses every
/// compressed cluster the merge will copy, before anything is written.
#[test]
fn commit_of_a_top_with_a_bad_compressed_cluster_fails_before_writing_the_base() {
    let data = std::fs::read(
        fuzz_dir().join("regressions/merge/commit-top-compressed-cluster-not-deflate"),
    )
    .unwrap();
    merge_target::merge(&data);
}

/// Finding F5 (merge target, 2026-12-01, the CI fuzz smoke run): the
/// rerun of a failed merge reclaims the leaked clusters it left (issue 13),
/// and did so before the plan pass, so a commit that the plan pass then
/// refused (a compressed cluster of the top that does not decompress) had
/// already rewritten the base's refcount block. Leaks are now reclaimed
/// after the plan pass, just before the copy.
#[test]
fn a_commit_refused_by_the_plan_pass_does_not_reclaim_the_bases_leaks_first() {
    let data =
        std::fs::read(fuzz_dir().join("regressions/merge/commit-leaky-base-bad-compressed-top"))
            .unwrap();
    merge_target::merge(&data);
}

/// Finding F3 (merge target, 2026-11-25): a commit into a base whose L2
/// entry points past the end of its file wrote into the base, then failed.
/// Every image a merge touches is now checked before anything is written.
#[test]
fn commit_into_a_base_with_an_l2_entry_past_eof_fails_before_writing_it() {
    let data =
        std::fs::read(fuzz_dir().join("regressions/merge/commit-into-base-with-l2-entry-past-eof"))
            .unwrap();
    merge_target::merge(&data);
}
