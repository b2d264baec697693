#![no_main]
//! Fuzz target `open_read`: see strata_fuzz::harness::open_read (or strata_fuzz::merge).
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    strata_fuzz::harness::open_read(data);
});
