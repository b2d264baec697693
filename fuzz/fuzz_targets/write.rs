#![no_main]
//! Fuzz target `write`: see strata_fuzz::harness::write (or strata_fuzz::merge).
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    strata_fuzz::harness::write(data);
});
