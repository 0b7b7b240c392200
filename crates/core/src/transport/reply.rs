//! What goes back to the kernel for one handled request, whichever way it came in.

use crate::export::Outcome;
use crate::protocol::abi::size;
use crate::protocol::encode::out_header;

/// Where a reply's body is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Body {
    /// No body (an error, or a bare success).
    None,
    /// The first `n` bytes of the small reply buffer.
    Small(usize),
    /// The first `n` bytes of the request's data buffer (READ data).
    Data(usize),
}

impl Body {
    /// The body's bytes, given the request's small reply buffer and data buffer.
    pub(super) fn bytes<'a>(self, small: &'a [u8], data: &'a [u8]) -> &'a [u8] {
        match self {
            Body::None => &[],
            Body::Small(n) => &small[..n],
            Body::Data(n) => &data[..n],
        }
    }

    pub(super) fn len(self) -> usize {
        match self {
            Body::None => 0,
            Body::Small(n) | Body::Data(n) => n,
        }
    }
}

/// The `fuse_out_header` and body location for `outcome`, or `None` when the kernel expects no
/// reply (FORGET).
pub(super) fn reply_for(unique: u64, outcome: Outcome) -> Option<([u8; size::OUT_HEADER], Body)> {
    let (error, body) = match outcome {
        Outcome::NoReply => return None,
        Outcome::Error(errno) => (-errno, Body::None),
        Outcome::Small(n) => (0, Body::Small(n)),
        Outcome::Data(n) => (0, Body::Data(n)),
    };
    let mut header = [0u8; size::OUT_HEADER];
    out_header(&mut header, (size::OUT_HEADER + body.len()) as u32, error, unique);
    Some((header, body))
}
