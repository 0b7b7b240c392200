//! libFuzzer target: NBD transmission replies through the reply decoder and `ReplyCheck` (see
//! `fuzz/src/lib.rs`, `run_nbd_reply`, for the input layout and the invariants).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    blockfuse_fuzz::run_nbd_reply(data);
});
