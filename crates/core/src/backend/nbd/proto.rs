//! The NBD wire protocol (doc/proto.md of NetworkBlockDevice/nbd), sans I/O: constants, request
//! and option encoding, option-reply and transmission-reply decoding, and [`ReplyCheck`], which
//! checks every reply (simple or structured, chunk by chunk) against the request it answers.
//! Pure: no I/O, no unsafe, never panics on any input (fuzzed by `fuzz/fuzz_targets/nbd_replies.rs`).

/// "NBDMAGIC": the first 8 bytes a newstyle server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// "IHAVEOPT": newstyle negotiation; also prefixes every option the client sends.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of an option reply.
pub const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

pub const OPT_ABORT: u32 = 2;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_SET_META_CONTEXT: u32 = 10;

pub const REP_ACK: u32 = 1;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_FLAG_ERROR: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
pub const REP_ERR_POLICY: u32 = REP_FLAG_ERROR | 2;
pub const REP_ERR_INVALID: u32 = REP_FLAG_ERROR | 3;
pub const REP_ERR_PLATFORM: u32 = REP_FLAG_ERROR | 4;
pub const REP_ERR_TLS_REQD: u32 = REP_FLAG_ERROR | 5;
pub const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR | 6;
pub const REP_ERR_SHUTDOWN: u32 = REP_FLAG_ERROR | 7;
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_FLAG_ERROR | 8;
pub const REP_ERR_TOO_BIG: u32 = REP_FLAG_ERROR | 9;

pub const INFO_EXPORT: u16 = 0;
pub const INFO_BLOCK_SIZE: u16 = 3;

pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const TFLAG_SEND_FAST_ZERO: u16 = 1 << 11;

pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR_BIT: u16 = 1 << 15;
pub const REPLY_TYPE_ERROR: u16 = REPLY_TYPE_ERROR_BIT | 1;
pub const REPLY_TYPE_ERROR_OFFSET: u16 = REPLY_TYPE_ERROR_BIT | 2;

/// `base:allocation` status bits.
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;

/// The metadata context for SEEK_DATA/SEEK_HOLE.
pub const BASE_ALLOCATION: &str = "base:allocation";

/// Size of a request header on the wire.
pub const REQUEST_LEN: usize = 28;
/// Size of a simple reply header; a structured one is [`STRUCTURED_HEADER_LEN`].
pub const SIMPLE_HEADER_LEN: usize = 16;
pub const STRUCTURED_HEADER_LEN: usize = 20;
/// Longest error or block-status chunk payload accepted (the spec caps error messages at 4 KiB;
/// with REQ_ONE a block status chunk carries one descriptor).
pub const MAX_META_PAYLOAD: u32 = 64 << 10;
/// Disjoint ranges a READ's chunks may leave before they merge (in-order chunks always merge).
const MAX_FRAGMENTS: usize = 32;

/// A reply or chunk that breaks the protocol: the connection can no longer be trusted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtoError(pub &'static str);

impl std::fmt::Display for ProtoError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}
fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

/// One transmission request's header fields (the cookie is the connection's to choose).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Command {
    pub flags: u16,
    pub cmd: u16,
    pub offset: u64,
    pub len: u32,
}

/// Encodes a transmission request header.
pub fn request(flags: u16, cmd: u16, cookie: u64, offset: u64, len: u32) -> [u8; REQUEST_LEN] {
    let mut b = [0u8; REQUEST_LEN];
    b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&cmd.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..24].copy_from_slice(&offset.to_be_bytes());
    b[24..28].copy_from_slice(&len.to_be_bytes());
    b
}

/// Encodes an option (handshake phase) with its data.
pub fn option(opt: u32, data: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(16 + data.len());
    b.extend_from_slice(&IHAVEOPT.to_be_bytes());
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    b
}

/// The data of NBD_OPT_GO for `export`, asking for block size information.
pub fn opt_go_data(export: &str) -> Vec<u8> {
    let mut d = Vec::with_capacity(8 + export.len());
    d.extend_from_slice(&(export.len() as u32).to_be_bytes());
    d.extend_from_slice(export.as_bytes());
    d.extend_from_slice(&1u16.to_be_bytes());
    d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    d
}

/// The data of NBD_OPT_SET_META_CONTEXT for `export` and one `context`.
pub fn set_meta_context_data(export: &str, context: &str) -> Vec<u8> {
    let mut d = Vec::with_capacity(12 + export.len() + context.len());
    d.extend_from_slice(&(export.len() as u32).to_be_bytes());
    d.extend_from_slice(export.as_bytes());
    d.extend_from_slice(&1u32.to_be_bytes());
    d.extend_from_slice(&(context.len() as u32).to_be_bytes());
    d.extend_from_slice(context.as_bytes());
    d
}

/// The fixed part of an option reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReply {
    pub option: u32,
    pub reply: u32,
    pub len: u32,
}

/// Decodes the 20-byte head of an option reply.
pub fn option_reply(b: &[u8; 20]) -> Result<OptionReply, ProtoError> {
    if be64(b, 0) != REPLY_MAGIC {
        return Err(ProtoError("bad option reply magic"));
    }
    Ok(OptionReply { option: be32(b, 8), reply: be32(b, 12), len: be32(b, 16) })
}

/// What NBD_OPT_GO's NBD_REP_INFO replies said.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ExportInfo {
    pub size: u64,
    pub flags: u16,
    pub min_block: u32,
    pub pref_block: u32,
    pub max_block: u32,
}

/// Folds one NBD_REP_INFO payload into `info`; unknown information types are ignored.
pub fn apply_info(info: &mut ExportInfo, data: &[u8]) -> Result<(), ProtoError> {
    if data.len() < 2 {
        return Err(ProtoError("NBD_REP_INFO shorter than its type"));
    }
    match be16(data, 0) {
        INFO_EXPORT => {
            if data.len() != 12 {
                return Err(ProtoError("NBD_INFO_EXPORT has the wrong length"));
            }
            info.size = be64(data, 2);
            info.flags = be16(data, 10);
        }
        INFO_BLOCK_SIZE => {
            if data.len() != 14 {
                return Err(ProtoError("NBD_INFO_BLOCK_SIZE has the wrong length"));
            }
            let (min, pref, max) = (be32(data, 2), be32(data, 6), be32(data, 10));
            let pow2 = |v: u32| v != 0 && v.is_power_of_two();
            if !pow2(min) || min > 64 << 10 || !pow2(pref) || pref < min || max < pref.max(min) {
                return Err(ProtoError("NBD_INFO_BLOCK_SIZE constraints are inconsistent"));
            }
            info.min_block = min;
            info.pref_block = pref;
            info.max_block = max;
        }
        _ => {}
    }
    Ok(())
}

/// A meta context reply's id, if the payload names `wanted`.
pub fn meta_context(data: &[u8], wanted: &str) -> Result<Option<u32>, ProtoError> {
    if data.len() < 4 {
        return Err(ProtoError("NBD_REP_META_CONTEXT is too short"));
    }
    Ok((&data[4..] == wanted.as_bytes()).then(|| be32(data, 0)))
}

/// A human name for an option error reply.
pub fn option_error_name(reply: u32) -> &'static str {
    match reply {
        REP_ERR_UNSUP => "unsupported option",
        REP_ERR_POLICY => "refused by the server's policy",
        REP_ERR_INVALID => "invalid request",
        REP_ERR_PLATFORM => "not supported on the server's platform",
        REP_ERR_TLS_REQD => "the server requires TLS",
        REP_ERR_UNKNOWN => "the export is unknown to the server",
        REP_ERR_SHUTDOWN => "the server is shutting down",
        REP_ERR_BLOCK_SIZE_REQD => "the server requires block size negotiation",
        REP_ERR_TOO_BIG => "the request is too big",
        _ => "error",
    }
}

/// The head of a transmission reply, after its first 16 bytes (and, for a structured chunk,
/// the 4 bytes after them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyHeader {
    Simple { cookie: u64, error: u32 },
    Chunk { cookie: u64, flags: u16, ty: u16, len: u32 },
}

impl ReplyHeader {
    pub fn cookie(&self) -> u64 {
        match *self {
            ReplyHeader::Simple { cookie, .. } | ReplyHeader::Chunk { cookie, .. } => cookie,
        }
    }
}

/// Decodes the first 16 bytes of a reply; a structured chunk needs the 4 bytes after them (its
/// payload length), given to [`chunk_header`].
pub fn reply_start(b: &[u8; SIMPLE_HEADER_LEN]) -> Result<ReplyStart, ProtoError> {
    match be32(b, 0) {
        SIMPLE_REPLY_MAGIC => {
            Ok(ReplyStart::Done(ReplyHeader::Simple { cookie: be64(b, 8), error: be32(b, 4) }))
        }
        STRUCTURED_REPLY_MAGIC => {
            Ok(ReplyStart::NeedLength { flags: be16(b, 4), ty: be16(b, 6), cookie: be64(b, 8) })
        }
        _ => Err(ProtoError("bad reply magic")),
    }
}

/// What the first 16 bytes of a reply say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyStart {
    Done(ReplyHeader),
    /// A structured chunk: its length is bytes 16..20, which the caller reads next.
    NeedLength {
        flags: u16,
        ty: u16,
        cookie: u64,
    },
}

/// Completes a structured chunk header from [`ReplyStart::NeedLength`]'s fields and bytes 16..20.
pub fn chunk_header(flags: u16, ty: u16, cookie: u64, len: [u8; 4]) -> ReplyHeader {
    ReplyHeader::Chunk { cookie, flags, ty, len: u32::from_be_bytes(len) }
}

/// What a request expects back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// A READ of `len` bytes at `offset`: data, holes or errors covering the range.
    Read { offset: u64, len: u32 },
    /// A BLOCK_STATUS with REQ_ONE for the given context: one descriptor.
    BlockStatus { context: u32 },
    /// Any other command: no payload.
    Plain,
}

/// What the caller does with the next bytes of the stream after a header or prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Read exactly this many bytes (at most 12) and pass them to [`ReplyCheck::prefix`].
    Prefix(usize),
    /// Read `len` bytes into the request's buffer at `at`; the chunk is then complete.
    Data { at: usize, len: usize },
    /// Zero the request's buffer at `at` for `len` bytes; the chunk is complete.
    Zero { at: usize, len: usize },
    /// Read and discard `n` bytes; the chunk is complete.
    Skip(u32),
    /// The chunk is complete.
    Nothing,
}

/// The answer to one request, checked as its reply arrives: handle (by the caller, which looks
/// the cookie up), types, lengths, chunk offsets inside the request, no overlap, full coverage.
#[derive(Debug, Clone)]
pub struct ReplyCheck {
    expect: Expect,
    structured: bool,
    /// The chunk whose prefix is awaited: (type, payload length).
    pending: Option<(u16, u32)>,
    /// Merged, sorted, disjoint ranges of the READ covered so far (relative to its offset).
    covered: [(u32, u32); MAX_FRAGMENTS],
    fragments: usize,
    error: Option<u32>,
    extent: Option<(u32, u32)>,
    done: bool,
}

/// A request's final result: `Ok` or the server's NBD error number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    Ok,
    /// For BLOCK_STATUS: the first extent's (length, flags).
    Extent(u32, u32),
    Error(u32),
}

impl ReplyCheck {
    pub fn new(expect: Expect, structured: bool) -> Self {
        ReplyCheck {
            expect,
            structured,
            pending: None,
            covered: [(0, 0); MAX_FRAGMENTS],
            fragments: 0,
            error: None,
            extent: None,
            done: false,
        }
    }

    /// Whether the reply is complete (the final chunk, or a simple reply, was seen).
    pub fn is_done(&self) -> bool {
        self.done && self.pending.is_none()
    }

    /// Takes a reply header addressed to this request.
    pub fn header(&mut self, h: &ReplyHeader) -> Result<Step, ProtoError> {
        if self.done || self.pending.is_some() {
            return Err(ProtoError("reply for a request that is already answered"));
        }
        match *h {
            ReplyHeader::Simple { error, .. } => {
                self.done = true;
                if error != 0 {
                    self.error = Some(error);
                    return Ok(Step::Nothing);
                }
                match self.expect {
                    Expect::Read { len, .. } => {
                        self.covered[0] = (0, len);
                        self.fragments = 1;
                        Ok(Step::Data { at: 0, len: len as usize })
                    }
                    Expect::BlockStatus { .. } => {
                        Err(ProtoError("simple reply without error to BLOCK_STATUS"))
                    }
                    Expect::Plain => Ok(Step::Nothing),
                }
            }
            ReplyHeader::Chunk { flags, ty, len, .. } => {
                if !self.structured {
                    return Err(ProtoError("structured reply that was not negotiated"));
                }
                if flags & REPLY_FLAG_DONE != 0 {
                    self.done = true;
                }
                self.chunk(ty, len)
            }
        }
    }

    fn chunk(&mut self, ty: u16, len: u32) -> Result<Step, ProtoError> {
        let read = matches!(self.expect, Expect::Read { .. });
        match ty {
            REPLY_TYPE_NONE => {
                if len != 0 {
                    return Err(ProtoError("NBD_REPLY_TYPE_NONE with a payload"));
                }
                if !self.done {
                    return Err(ProtoError("NBD_REPLY_TYPE_NONE without the DONE flag"));
                }
                Ok(Step::Nothing)
            }
            REPLY_TYPE_OFFSET_DATA if read => {
                if len <= 8 {
                    return Err(ProtoError("NBD_REPLY_TYPE_OFFSET_DATA without data"));
                }
                self.pending = Some((ty, len));
                Ok(Step::Prefix(8))
            }
            REPLY_TYPE_OFFSET_HOLE if read => {
                if len != 12 {
                    return Err(ProtoError("NBD_REPLY_TYPE_OFFSET_HOLE has the wrong length"));
                }
                self.pending = Some((ty, len));
                Ok(Step::Prefix(12))
            }
            REPLY_TYPE_BLOCK_STATUS if matches!(self.expect, Expect::BlockStatus { .. }) => {
                if len < 12 || !(len - 4).is_multiple_of(8) || len > MAX_META_PAYLOAD {
                    return Err(ProtoError("NBD_REPLY_TYPE_BLOCK_STATUS has a bad length"));
                }
                if self.extent.is_some() {
                    return Err(ProtoError("a second block status chunk"));
                }
                self.pending = Some((ty, len));
                Ok(Step::Prefix(12))
            }
            t if t & REPLY_TYPE_ERROR_BIT != 0 => {
                if !(6..=MAX_META_PAYLOAD).contains(&len) {
                    return Err(ProtoError("error chunk has a bad length"));
                }
                self.pending = Some((ty, len));
                Ok(Step::Prefix(6))
            }
            _ => Err(ProtoError("unexpected reply chunk type for this request")),
        }
    }

    /// Takes the prefix bytes a [`Step::Prefix`] asked for.
    pub fn prefix(&mut self, p: &[u8]) -> Result<Step, ProtoError> {
        let Some((ty, len)) = self.pending.take() else {
            return Err(ProtoError("no chunk prefix expected"));
        };
        match ty {
            REPLY_TYPE_OFFSET_DATA | REPLY_TYPE_OFFSET_HOLE => {
                let want = if ty == REPLY_TYPE_OFFSET_DATA { 8 } else { 12 };
                if p.len() != want {
                    return Err(ProtoError("chunk prefix has the wrong length"));
                }
                let Expect::Read { offset, len: req_len } = self.expect else {
                    return Err(ProtoError("data chunk for a request without data"));
                };
                let at = be64(p, 0);
                let n = if ty == REPLY_TYPE_OFFSET_DATA { len - 8 } else { be32(p, 8) };
                if n == 0 {
                    return Err(ProtoError("empty data or hole chunk"));
                }
                let rel = at.checked_sub(offset).ok_or(ProtoError("chunk before the request"))?;
                if rel.checked_add(n as u64).is_none_or(|end| end > req_len as u64) {
                    return Err(ProtoError("chunk beyond the request"));
                }
                self.cover(rel as u32, rel as u32 + n)?;
                let (at, len) = (rel as usize, n as usize);
                Ok(if ty == REPLY_TYPE_OFFSET_DATA {
                    Step::Data { at, len }
                } else {
                    Step::Zero { at, len }
                })
            }
            REPLY_TYPE_BLOCK_STATUS => {
                let Expect::BlockStatus { context } = self.expect else {
                    return Err(ProtoError("block status for another request"));
                };
                if p.len() != 12 {
                    return Err(ProtoError("block status prefix has the wrong length"));
                }
                if be32(p, 0) != context {
                    return Err(ProtoError("block status for a context not negotiated"));
                }
                let (ext_len, ext_flags) = (be32(p, 4), be32(p, 8));
                if ext_len == 0 {
                    return Err(ProtoError("empty block status extent"));
                }
                self.extent = Some((ext_len, ext_flags));
                Ok(if len > 12 { Step::Skip(len - 12) } else { Step::Nothing })
            }
            _ => {
                if p.len() != 6 {
                    return Err(ProtoError("error chunk prefix has the wrong length"));
                }
                let error = be32(p, 0);
                let msg_len = be16(p, 4) as u32;
                if error == 0 {
                    return Err(ProtoError("error chunk with error 0"));
                }
                let rest = len - 6;
                let ok = match ty {
                    REPLY_TYPE_ERROR => msg_len == rest,
                    REPLY_TYPE_ERROR_OFFSET => rest.checked_sub(8) == Some(msg_len),
                    _ => msg_len <= rest,
                };
                if !ok {
                    return Err(ProtoError("error chunk message length is inconsistent"));
                }
                self.error.get_or_insert(error);
                Ok(if rest > 0 { Step::Skip(rest) } else { Step::Nothing })
            }
        }
    }

    fn cover(&mut self, start: u32, end: u32) -> Result<(), ProtoError> {
        let ranges = &mut self.covered[..self.fragments];
        if ranges.iter().any(|&(s, e)| start < e && s < end) {
            return Err(ProtoError("overlapping read chunks"));
        }
        // Extend a neighbour if adjacent (in-order chunks always do), else insert.
        if let Some(r) = ranges.iter_mut().find(|r| r.1 == start) {
            r.1 = end;
        } else if let Some(r) = ranges.iter_mut().find(|r| r.0 == end) {
            r.0 = start;
        } else if self.fragments < MAX_FRAGMENTS {
            self.covered[self.fragments] = (start, end);
            self.fragments += 1;
        } else {
            return Err(ProtoError("read reply in too many fragments"));
        }
        Ok(())
    }

    fn covered_bytes(&self) -> u64 {
        self.covered[..self.fragments].iter().map(|&(s, e)| (e - s) as u64).sum()
    }

    /// The result, once [`ReplyCheck::is_done`]: a success must have covered the whole READ
    /// (or delivered the block status).
    pub fn answer(&self) -> Result<Answer, ProtoError> {
        if !self.is_done() {
            return Err(ProtoError("reply is not complete"));
        }
        if let Some(e) = self.error {
            return Ok(Answer::Error(e));
        }
        match self.expect {
            Expect::Read { len, .. } => {
                if self.covered_bytes() != len as u64 {
                    return Err(ProtoError("read reply does not cover the request"));
                }
                Ok(Answer::Ok)
            }
            Expect::BlockStatus { .. } => match self.extent {
                Some((l, f)) => Ok(Answer::Extent(l, f)),
                None => Err(ProtoError("block status reply without an extent")),
            },
            Expect::Plain => Ok(Answer::Ok),
        }
    }
}

/// The errno for an NBD error number (the protocol's numbers are Linux's).
pub fn errno(nbd_error: u32) -> i32 {
    match nbd_error {
        1 => libc::EPERM,
        5 => libc::EIO,
        12 => libc::ENOMEM,
        22 => libc::EINVAL,
        28 => libc::ENOSPC,
        75 => libc::EOVERFLOW,
        95 => libc::EOPNOTSUPP,
        _ => libc::EIO,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(flags: u16, ty: u16, len: u32) -> ReplyHeader {
        ReplyHeader::Chunk { cookie: 7, flags, ty, len }
    }

    fn data_prefix(offset: u64) -> [u8; 8] {
        offset.to_be_bytes()
    }

    #[test]
    fn request_encoding() {
        let r = request(CMD_FLAG_FUA, CMD_WRITE, 0x0102, 4096, 512);
        assert_eq!(&r[0..4], &[0x25, 0x60, 0x95, 0x13]);
        assert_eq!(&r[4..8], &[0, 1, 0, 1]);
        assert_eq!(be64(&r, 8), 0x0102);
        assert_eq!(be64(&r, 16), 4096);
        assert_eq!(be32(&r, 24), 512);
    }

    #[test]
    fn reply_start_decodes_both_kinds() {
        let mut b = [0u8; 16];
        b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        b[4..8].copy_from_slice(&5u32.to_be_bytes());
        b[8..16].copy_from_slice(&9u64.to_be_bytes());
        assert_eq!(
            reply_start(&b),
            Ok(ReplyStart::Done(ReplyHeader::Simple { cookie: 9, error: 5 }))
        );
        b[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        assert!(matches!(reply_start(&b), Ok(ReplyStart::NeedLength { flags: 0, ty: 5, .. })));
        b[0] = 0;
        assert!(reply_start(&b).is_err());
    }

    #[test]
    fn in_order_data_chunks_cover_a_read() {
        let mut c = ReplyCheck::new(Expect::Read { offset: 1000, len: 100 }, true);
        assert_eq!(c.header(&chunk(0, REPLY_TYPE_OFFSET_DATA, 8 + 60)), Ok(Step::Prefix(8)));
        assert_eq!(c.prefix(&data_prefix(1000)), Ok(Step::Data { at: 0, len: 60 }));
        assert_eq!(
            c.header(&chunk(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_HOLE, 12)),
            Ok(Step::Prefix(12))
        );
        let mut p = [0u8; 12];
        p[..8].copy_from_slice(&1060u64.to_be_bytes());
        p[8..].copy_from_slice(&40u32.to_be_bytes());
        assert_eq!(c.prefix(&p), Ok(Step::Zero { at: 60, len: 40 }));
        assert!(c.is_done());
        assert_eq!(c.answer(), Ok(Answer::Ok));
    }

    #[test]
    fn hostile_read_chunks_are_protocol_errors() {
        // Outside the request.
        let mut c = ReplyCheck::new(Expect::Read { offset: 1000, len: 100 }, true);
        c.header(&chunk(0, REPLY_TYPE_OFFSET_DATA, 8 + 60)).unwrap();
        assert!(c.prefix(&data_prefix(1041)).is_err());
        let mut c = ReplyCheck::new(Expect::Read { offset: 1000, len: 100 }, true);
        c.header(&chunk(0, REPLY_TYPE_OFFSET_DATA, 8 + 60)).unwrap();
        assert!(c.prefix(&data_prefix(999)).is_err());
        let mut c = ReplyCheck::new(Expect::Read { offset: 1000, len: 100 }, true);
        c.header(&chunk(0, REPLY_TYPE_OFFSET_DATA, 8 + 60)).unwrap();
        assert!(c.prefix(&data_prefix(u64::MAX)).is_err());
        // Overlap.
        let mut c = ReplyCheck::new(Expect::Read { offset: 0, len: 100 }, true);
        c.header(&chunk(0, REPLY_TYPE_OFFSET_DATA, 8 + 60)).unwrap();
        c.prefix(&data_prefix(0)).unwrap();
        c.header(&chunk(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, 8 + 60)).unwrap();
        assert!(c.prefix(&data_prefix(40)).is_err());
        // Gap: done without full coverage.
        let mut c = ReplyCheck::new(Expect::Read { offset: 0, len: 100 }, true);
        c.header(&chunk(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, 8 + 60)).unwrap();
        c.prefix(&data_prefix(0)).unwrap();
        assert!(c.answer().is_err());
        // Structured chunk without negotiation; data chunk for a write; NONE with payload.
        let mut c = ReplyCheck::new(Expect::Read { offset: 0, len: 100 }, false);
        assert!(c.header(&chunk(REPLY_FLAG_DONE, REPLY_TYPE_NONE, 0)).is_err());
        let mut c = ReplyCheck::new(Expect::Plain, true);
        assert!(c.header(&chunk(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, 20)).is_err());
        let mut c = ReplyCheck::new(Expect::Plain, true);
        assert!(c.header(&chunk(REPLY_FLAG_DONE, REPLY_TYPE_NONE, 4)).is_err());
        // A second reply after the final one.
        let mut c = ReplyCheck::new(Expect::Plain, true);
        c.header(&chunk(REPLY_FLAG_DONE, REPLY_TYPE_NONE, 0)).unwrap();
        assert!(c.header(&chunk(REPLY_FLAG_DONE, REPLY_TYPE_NONE, 0)).is_err());
    }

    #[test]
    fn error_chunks_become_the_answer() {
        let mut c = ReplyCheck::new(Expect::Read { offset: 0, len: 100 }, true);
        assert_eq!(c.header(&chunk(REPLY_FLAG_DONE, REPLY_TYPE_ERROR, 6 + 3)), Ok(Step::Prefix(6)));
        let mut p = [0u8; 6];
        p[..4].copy_from_slice(&5u32.to_be_bytes());
        p[4..].copy_from_slice(&3u16.to_be_bytes());
        assert_eq!(c.prefix(&p), Ok(Step::Skip(3)));
        assert_eq!(c.answer(), Ok(Answer::Error(5)));
        // Error 0 and inconsistent message lengths are protocol errors.
        let mut c = ReplyCheck::new(Expect::Plain, true);
        c.header(&chunk(REPLY_FLAG_DONE, REPLY_TYPE_ERROR, 6)).unwrap();
        assert!(c.prefix(&[0, 0, 0, 0, 0, 0]).is_err());
        let mut c = ReplyCheck::new(Expect::Plain, true);
        c.header(&chunk(REPLY_FLAG_DONE, REPLY_TYPE_ERROR, 6)).unwrap();
        assert!(c.prefix(&[0, 0, 0, 5, 0, 9]).is_err());
        // Simple error reply.
        let mut c = ReplyCheck::new(Expect::Plain, true);
        c.header(&ReplyHeader::Simple { cookie: 1, error: 28 }).unwrap();
        assert_eq!(c.answer(), Ok(Answer::Error(28)));
        assert_eq!(errno(28), libc::ENOSPC);
    }

    #[test]
    fn block_status_needs_our_context_and_an_extent() {
        let mut c = ReplyCheck::new(Expect::BlockStatus { context: 3 }, true);
        assert_eq!(
            c.header(&chunk(REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, 12)),
            Ok(Step::Prefix(12))
        );
        let mut p = [0u8; 12];
        p[..4].copy_from_slice(&3u32.to_be_bytes());
        p[4..8].copy_from_slice(&4096u32.to_be_bytes());
        p[8..].copy_from_slice(&STATE_HOLE.to_be_bytes());
        assert_eq!(c.prefix(&p), Ok(Step::Nothing));
        assert_eq!(c.answer(), Ok(Answer::Extent(4096, STATE_HOLE)));
        let mut c = ReplyCheck::new(Expect::BlockStatus { context: 4 }, true);
        c.header(&chunk(REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, 12)).unwrap();
        assert!(c.prefix(&p).is_err());
        let mut c = ReplyCheck::new(Expect::BlockStatus { context: 3 }, true);
        c.header(&chunk(REPLY_FLAG_DONE, REPLY_TYPE_NONE, 0)).unwrap();
        assert!(c.answer().is_err());
    }

    #[test]
    fn info_block_size_is_checked() {
        let mut info = ExportInfo::default();
        let mut d = vec![0, 3];
        d.extend_from_slice(&512u32.to_be_bytes());
        d.extend_from_slice(&4096u32.to_be_bytes());
        d.extend_from_slice(&(32u32 << 20).to_be_bytes());
        apply_info(&mut info, &d).unwrap();
        assert_eq!((info.min_block, info.pref_block, info.max_block), (512, 4096, 32 << 20));
        d[2..6].copy_from_slice(&3u32.to_be_bytes());
        assert!(apply_info(&mut info, &d).is_err());
        let mut e = vec![0, 0];
        e.extend_from_slice(&(1u64 << 30).to_be_bytes());
        e.extend_from_slice(&(TFLAG_HAS_FLAGS | TFLAG_READ_ONLY).to_be_bytes());
        apply_info(&mut info, &e).unwrap();
        assert_eq!(info.size, 1 << 30);
        assert!(apply_info(&mut info, &e[..5]).is_err());
    }
}
