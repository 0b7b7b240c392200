//! The FUSE wire protocol: kernel ABI constants, request decoding, reply encoding.
//! Pure: no I/O, no unsafe; depends on nothing else in the crate.

pub mod abi;
pub mod decode;
pub mod encode;

#[cfg(test)]
mod tests;
