//! The `merge` target: commit or pull on a two-image chain made from fuzzed
//! bytes. strata-merge works on paths (it locks and re-opens files), so
//! each iteration writes the two images into a fresh temporary directory
//! (on /dev/shm when there is one, so the merge's fdatasync barriers cost
//! nothing).
//!
//! Properties, beyond "no panic":
//! - a dry run changes neither file;
//! - pull never changes the base;
//! - a commit that fails leaves the base as it was (the merge refuses a
//!   damaged top before writing);
//! - after a successful commit or pull the top's guest view (the first
//!   READ_CAP bytes) is what it was before.

use std::path::Path;

use strata_format::header::{peek_cluster_bits, Extension};
use strata_format::Header;
use strata_image::{Chain, OpenOptions};
use strata_merge::{commit, pull, CommitOptions, Hooks, PullOptions};

use super::harness::{decode_chain_input, READ_CAP};

/// Largest virtual size of the top (the merge walks all of it).
pub const MERGE_SIZE_CAP: u64 = 8 << 20;

/// The top's bytes with its header re-pointed at `base.img` (format
/// `fmt`) and its virtual size capped; `None` when the header does not
/// parse or does not fit again.
pub fn repoint_top(top: &[u8], fmt: &str) -> Option<Vec<u8>> {
    let bits = peek_cluster_bits(top).ok()?;
    let c0_len = (1usize << bits).min(top.len());
    let mut h = Header::parse(top.get(..c0_len)?).ok()?;
    h.set_size(h.size().min(MERGE_SIZE_CAP));
    h.set_backing_file(Some("base.img".into()));
    h.extensions_mut()
        .retain(|e| !matches!(e, Extension::BackingFormat(_)));
    h.extensions_mut()
        .insert(0, Extension::BackingFormat(fmt.into()));
    let c0 = h.encode().ok()?;
    let mut out = top.to_vec();
    if out.len() < c0.len() {
        out.resize(c0.len(), 0);
    }
    out.get_mut(..c0.len())?.copy_from_slice(&c0);
    Some(out)
}

fn read_view(top: &Path) -> Option<Vec<u8>> {
    let opts = OpenOptions::new().force_share(true);
    let chain = Chain::open(top, &opts).ok()?;
    let len = chain.virtual_size().min(READ_CAP) as usize;
    let mut buf = vec![0u8; len];
    chain.read_at(&mut buf, 0).ok()?;
    Some(buf)
}

fn tempdir() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    let made = if shm.is_dir() {
        tempfile::Builder::new()
            .prefix("strata-fuzz")
            .tempdir_in(shm)
    } else {
        tempfile::Builder::new().prefix("strata-fuzz").tempdir()
    };
    match made {
        Ok(d) => d,
        Err(e) => panic!("cannot make a temporary directory: {e}"),
    }
}

fn bytes(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_default()
}

/// `merge`: flags bit 1: raw base; bit 2: pull (else commit); bit 3:
/// commit keeps the top (`-d`).
pub fn merge(data: &[u8]) {
    let input = decode_chain_input(data);
    let raw_base = input.flags & 2 != 0;
    let Some(top) = repoint_top(input.top, if raw_base { "raw" } else { "qcow2" }) else {
        return;
    };
    let dir = tempdir();
    let top_path = dir.path().join("top.qcow2");
    let base_path = dir.path().join("base.img");
    let write = |p: &Path, b: &[u8]| {
        if let Err(e) = std::fs::write(p, b) {
            panic!("cannot write {}: {e}", p.display());
        }
    };
    write(&top_path, &top);
    // Keep a raw base small: its length is its virtual size.
    let base = if raw_base {
        input
            .base
            .get(..input.base.len().min(MERGE_SIZE_CAP as usize))
            .unwrap_or(&[])
    } else {
        input.base
    };
    write(&base_path, base);
    let view = read_view(&top_path);
    let pulling = input.flags & 4 != 0;

    // A dry run changes nothing.
    let before = (bytes(&top_path), bytes(&base_path));
    if pulling {
        let opts = PullOptions::default().with_dry_run(true);
        let _ = pull(&top_path, &opts, &mut Hooks::default());
    } else {
        let opts = CommitOptions::default().with_dry_run(true).with_force(true);
        let _ = commit(&top_path, &opts, &mut Hooks::default());
    }
    assert!(
        before == (bytes(&top_path), bytes(&base_path)),
        "a dry run changed a file"
    );

    let ok = if pulling {
        let r = pull(&top_path, &PullOptions::default(), &mut Hooks::default());
        assert!(
            bytes(&base_path) == before.1,
            "pull changed the base ({r:?})"
        );
        r.is_ok()
    } else {
        let opts = CommitOptions::default()
            .with_force(true)
            .with_keep_top(input.flags & 8 != 0);
        let r = commit(&top_path, &opts, &mut Hooks::default());
        if let Err(e) = &r {
            assert!(
                bytes(&base_path) == before.1,
                "a failed commit changed the base: {e}"
            );
        }
        r.is_ok()
    };
    if let (true, Some(view)) = (ok, view) {
        match read_view(&top_path) {
            Some(after) => assert!(after == view, "the merge changed the top's guest view"),
            None => panic!("the top does not open or read after a successful merge"),
        }
    }
}
