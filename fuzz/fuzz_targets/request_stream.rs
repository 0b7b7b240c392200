//! libFuzzer target: decode + dispatch + reply encoding of `/dev/fuse` message streams (see
//! `fuzz/src/lib.rs` for the input layout and the invariants).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    blockfuse_fuzz::run_one(data);
});
