#![no_main]
//! Fuzz target `merge`: see strata_fuzz::harness::merge (or strata_fuzz::merge).
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    strata_fuzz::merge::merge(data);
});
