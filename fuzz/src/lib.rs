//! The fuzz target bodies. `harness` is the file `cargo test` replays the
//! corpus with (crates/image/tests/fuzz_regressions.rs includes the same
//! file), so a crash found here reproduces there byte for byte.

#[path = "../../crates/image/tests/fuzz_harness/mod.rs"]
pub mod harness;

pub mod merge;
