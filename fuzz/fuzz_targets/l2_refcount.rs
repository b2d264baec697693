#![no_main]
//! Fuzz target `l2_refcount`: see strata_fuzz::harness::l2_refcount (or strata_fuzz::merge).
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    strata_fuzz::harness::l2_refcount(data);
});
