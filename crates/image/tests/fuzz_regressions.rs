//! `cargo test` replays the fuzz corpus: every committed file of
//! `fuzz/corpus/<target>/` and every saved crash input of
//! `fuzz/regressions/<target>/` runs through the same target body the
//! fuzzer runs (tests/fuzz_harness/mod.rs, included by the fuzz crate too).
//!
//! Each finding also has its own named test below, so a regression says
//! what came back. The `merge` target needs strata-merge and is replayed by
//! the fuzz crate itself (`scripts/fuzz.sh` runs its corpus), not here.

mod fuzz_harness;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz")
}

fn target_fn(target: &str) -> fn(&[u8]) {
    match target {
        "header" => fuzz_harness::header,
        "l2_refcount" => fuzz_harness::l2_refcount,
        "open_read" => fuzz_harness::open_read,
        "write" => fuzz_harness::write,
        "header_strict" => fuzz_harness::header_strict,
        other => panic!("no target {other}"),
    }
}

/// Runs every file of `dir` through `target`; returns the files that
/// panicked, with the panic message.
fn replay_dir(target: &str, dir: &Path) -> (usize, Vec<String>) {
    let f = target_fn(target);
    let Ok(entries) = std::fs::read_dir(dir) else {
        return (0, Vec::new());
    };
    let mut files: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    files.sort();
    let mut failures = Vec::new();
    for p in &files {
        let data = std::fs::read(p).unwrap();
        if let Err(e) = catch_unwind(AssertUnwindSafe(|| f(&data))) {
            let msg = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            failures.push(format!("{}: {msg}", p.display()));
        }
    }
    (files.len(), failures)
}

fn replay(target: &str) {
    let mut total = 0;
    let mut failures = Vec::new();
    for sub in ["corpus", "regressions"] {
        let (n, f) = replay_dir(target, &fuzz_dir().join(sub).join(target));
        total += n;
        failures.extend(f);
    }
    assert!(total > 0, "no corpus files for {target}");
    eprintln!("{target}: replayed {total} inputs");
    assert!(
        failures.is_empty(),
        "{} of {total} inputs of {target} panic:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Runs one saved input (a path under fuzz/) through `target`.
fn replay_one(target: &str, file: &str) {
    let data = std::fs::read(fuzz_dir().join(file)).unwrap();
    target_fn(target)(&data);
}

#[test]
fn header_corpus_replays_without_panics() {
    replay("header");
}

#[test]
fn l2_refcount_corpus_replays_without_panics() {
    replay("l2_refcount");
}

#[test]
fn open_read_corpus_replays_without_panics() {
    replay("open_read");
}

#[test]
fn write_corpus_replays_without_panics() {
    replay("write");
}

#[test]
fn the_reader_yields_zeros_past_the_end() {
    let mut r = fuzz_harness::Reader::new(&[1, 2, 3]);
    assert_eq!(r.u16(), 0x0201);
    assert_eq!(r.u32(), 3);
    assert_eq!(r.u64(), 0);
    assert!(r.is_empty());
}

#[test]
fn chain_inputs_round_trip() {
    let v = fuzz_harness::encode_chain_input(3, 9, b"top", b"base!", b"ops");
    let i = fuzz_harness::decode_chain_input(&v);
    assert_eq!(
        (i.flags, i.seed, i.top, i.base, i.rest),
        (3, 9, &b"top"[..], &b"base!"[..], &b"ops"[..])
    );
}

// Named regressions, one per finding (inputs in fuzz/regressions/).

/// Finding F1 (header fuzzer): a feature name that is not valid UTF-8 is
/// decoded lossily by `parse_extensions` (crates/format/src/header.rs) and
/// re-encoded by `Extension::encode_data` cut at 46 bytes, so rewriting the
/// header (any header update of the write path) changes the image's
/// feature name table. Open until the format crate keeps names as bytes.
#[test]
fn feature_names_that_are_not_utf8_survive_a_header_rewrite() {
    replay_one(
        "header_strict",
        "regressions/header/feature-name-not-utf8-changes-on-rewrite",
    );
}

/// The tolerant `header` target still runs the input (no panic).
#[test]
fn feature_name_rewrite_input_does_not_panic_the_header_target() {
    replay_one(
        "header",
        "regressions/header/feature-name-not-utf8-changes-on-rewrite",
    );
}

/// Finding F2 (header fuzzer), fixed: `Header::encode` wrote the backing
/// file name of a v2 header without extensions at byte 72 while
/// `backing_file_offset` said 80 (`layout` reserves the end marker), so
/// any header rewrite of such an image made it unreadable.
#[test]
fn a_v2_header_with_a_backing_name_and_no_extensions_round_trips() {
    replay_one(
        "header_strict",
        "regressions/header/v2-backing-name-without-extensions-misplaced",
    );
}
