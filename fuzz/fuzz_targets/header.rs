#![no_main]
//! Fuzz target `header`: see strata_fuzz::harness::header (or strata_fuzz::merge).
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    strata_fuzz::harness::header(data);
});
