//! Request decoding: one `/dev/fuse` read in, owned scalars out, every length checked.
//! Pure: no I/O, no unsafe, never panics on any input (fuzzable).

use super::abi::{init_flags::FUSE_INIT_EXT, opcode::*, size};

/// The fixed header of every request (`fuse_in_header`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InHeader {
    pub len: u32,
    pub opcode: u32,
    pub unique: u64,
    pub nodeid: u64,
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
}

/// `fuse_setattr_in`, reduced to what the export looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SetattrIn {
    pub valid: u32,
    pub fh: u64,
    pub size: u64,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

/// A decoded operation. WRITE's payload is not copied: it stays in the receive buffer right
/// after the `fuse_write_in` struct ([`size::WRITE_PREFIX`]), `size` bytes long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Init {
        major: u32,
        minor: u32,
        max_readahead: u32,
        flags: u32,
        /// The flags' upper half; 0 unless `flags` has FUSE_INIT_EXT.
        flags2: u32,
    },
    Destroy,
    Statfs,
    Lookup,
    /// FORGET and BATCH_FORGET: the kernel expects no reply, even when the body is malformed.
    Forget,
    Getattr,
    Setattr(SetattrIn),
    Open {
        flags: u32,
        /// The opening thread (the header's pid: a thread id, in the connection's namespace).
        pid: u32,
    },
    Release,
    Read {
        offset: u64,
        size: u32,
    },
    Write {
        offset: u64,
        size: u32,
    },
    Flush,
    Fsync {
        datasync: bool,
    },
    Fallocate {
        offset: u64,
        length: u64,
        mode: u32,
    },
    Lseek {
        offset: u64,
        whence: u32,
    },
    /// An opcode we do not implement: answered with ENOSYS.
    Unsupported,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub header: InHeader,
    pub op: Op,
}

/// Why a read from `/dev/fuse` cannot be trusted any more. The export halts: it stops taking
/// requests, because it can no longer tell where one request ends and the next begins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HaltReason {
    ShortHeader {
        got: usize,
    },
    LengthMismatch {
        header: u32,
        got: usize,
    },
    /// An io_uring entry whose header length does not fit its parts (see [`decode_ring`]).
    RingLengthMismatch {
        header: u32,
        op_room: usize,
        payload: usize,
    },
}

impl std::fmt::Display for HaltReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HaltReason::ShortHeader { got } => write!(
                f,
                "read {got} bytes from /dev/fuse, shorter than the {}-byte request header",
                size::IN_HEADER
            ),
            HaltReason::LengthMismatch { header, got } => {
                write!(f, "request header says {header} bytes but /dev/fuse returned {got}")
            }
            HaltReason::RingLengthMismatch { header, op_room, payload } => write!(
                f,
                "io_uring request header says {header} bytes, which is not the {}-byte header, \
                 an op struct of at most {op_room} bytes and the {payload}-byte payload",
                size::IN_HEADER
            ),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeError {
    /// Halt the export (see [`HaltReason`]).
    Halt(HaltReason),
    /// The header is sound but the op's body is not: answer `errno` to `unique`.
    Malformed { header: InHeader, errno: i32 },
}

/// A bounds-checked little cursor over native-endian integers.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }
    fn take<const N: usize>(&mut self) -> [u8; N] {
        // Callers check the body length first; a short buffer still yields zeros, not a panic.
        let mut out = [0u8; N];
        if let Some(src) = self.buf.get(self.pos..self.pos + N) {
            out.copy_from_slice(src);
        }
        self.pos += N;
        out
    }
    fn u32(&mut self) -> u32 {
        u32::from_ne_bytes(self.take())
    }
    fn u64(&mut self) -> u64 {
        u64::from_ne_bytes(self.take())
    }
    fn skip(&mut self, n: usize) {
        self.pos += n;
    }
}

/// The header's fields from the first [`size::IN_HEADER`] bytes of `buf` (checked by callers).
fn decode_header_fields(buf: &[u8]) -> InHeader {
    let mut r = Reader::new(buf);
    InHeader {
        len: r.u32(),
        opcode: r.u32(),
        unique: r.u64(),
        nodeid: r.u64(),
        uid: r.u32(),
        gid: r.u32(),
        pid: r.u32(),
    }
}

/// Decodes the header only. `buf` is exactly what one read from `/dev/fuse` returned.
pub fn decode_header(buf: &[u8]) -> Result<InHeader, HaltReason> {
    if buf.len() < size::IN_HEADER {
        return Err(HaltReason::ShortHeader { got: buf.len() });
    }
    let header = decode_header_fields(buf);
    if header.len as usize != buf.len() {
        return Err(HaltReason::LengthMismatch { header: header.len, got: buf.len() });
    }
    Ok(header)
}

/// Decodes one request. `buf` is exactly what one read from `/dev/fuse` returned.
pub fn decode(buf: &[u8]) -> Result<Request, DecodeError> {
    let header = decode_header(buf).map_err(DecodeError::Halt)?;
    decode_op(header, &buf[size::IN_HEADER..], 0)
}

/// Decodes one request delivered through FUSE-over-io_uring, where it arrives in three parts:
/// `in_out` starts with the header, `op_in` holds the op's fixed struct, and everything after
/// that struct (a WRITE's data, a name) is in the entry's payload buffer, `payload_len` bytes.
/// The header's length counts all three, so the struct's length is what remains.
pub fn decode_ring(
    in_out: &[u8],
    op_in: &[u8],
    payload_len: usize,
) -> Result<Request, DecodeError> {
    let head = in_out.get(..size::IN_HEADER).ok_or(HaltReason::ShortHeader { got: in_out.len() });
    let header = decode_header_fields(head.map_err(DecodeError::Halt)?);
    let mismatch = DecodeError::Halt(HaltReason::RingLengthMismatch {
        header: header.len,
        op_room: op_in.len(),
        payload: payload_len,
    });
    let fixed = (header.len as usize).checked_sub(size::IN_HEADER + payload_len).ok_or(mismatch)?;
    let op_bytes = op_in.get(..fixed).ok_or(mismatch)?;
    decode_op(header, op_bytes, payload_len)
}

/// Decodes the op after `header`: `body` is the bytes that follow the header up to where
/// `trailing` more bytes (that this decoder never reads) sit elsewhere.
fn decode_op(header: InHeader, body: &[u8], trailing: usize) -> Result<Request, DecodeError> {
    let need = |n: usize| {
        if body.len() < n {
            Err(DecodeError::Malformed { header, errno: libc::EINVAL })
        } else {
            Ok(Reader::new(body))
        }
    };
    let op = match header.opcode {
        FUSE_INIT => {
            let mut r = need(size::INIT_IN_COMPAT)?;
            let (major, minor, max_readahead, flags) = (r.u32(), r.u32(), r.u32(), r.u32());
            let ext = flags & FUSE_INIT_EXT != 0 && body.len() >= size::INIT_IN_FLAGS2;
            let flags2 = if ext { r.u32() } else { 0 };
            Op::Init { major, minor, max_readahead, flags, flags2 }
        }
        FUSE_DESTROY => Op::Destroy,
        FUSE_STATFS => Op::Statfs,
        FUSE_LOOKUP => Op::Lookup,
        FUSE_FORGET | FUSE_BATCH_FORGET => Op::Forget,
        // Before 7.9 GETATTR had no body, and we ignore `fuse_getattr_in` anyway.
        FUSE_GETATTR => Op::Getattr,
        FUSE_SETATTR => {
            let mut r = need(size::SETATTR_IN)?;
            let valid = r.u32();
            r.skip(4);
            let fh = r.u64();
            let size = r.u64();
            r.skip(8 + 8 * 3 + 4 * 3); // lock_owner, a/m/ctime, a/m/ctimensec
            let mode = r.u32();
            r.skip(4);
            let uid = r.u32();
            let gid = r.u32();
            Op::Setattr(SetattrIn { valid, fh, size, mode, uid, gid })
        }
        FUSE_OPEN => {
            let mut r = need(size::OPEN_IN)?;
            Op::Open { flags: r.u32(), pid: header.pid }
        }
        FUSE_RELEASE => {
            need(size::RELEASE_IN)?;
            Op::Release
        }
        FUSE_READ => {
            let mut r = need(size::READ_IN)?;
            r.skip(8); // fh
            Op::Read { offset: r.u64(), size: r.u32() }
        }
        FUSE_WRITE => {
            let mut r = need(size::WRITE_IN)?;
            r.skip(8); // fh
            let offset = r.u64();
            let size = r.u32();
            // The payload must be exactly as long as claimed: a shorter one would make us write
            // bytes the client never sent.
            if body.len() + trailing - size::WRITE_IN != size as usize {
                return Err(DecodeError::Malformed { header, errno: libc::EINVAL });
            }
            Op::Write { offset, size }
        }
        FUSE_FLUSH => {
            need(size::FLUSH_IN)?;
            Op::Flush
        }
        FUSE_FSYNC => {
            let mut r = need(size::FSYNC_IN)?;
            r.skip(8);
            Op::Fsync { datasync: r.u32() & 1 != 0 }
        }
        FUSE_FALLOCATE => {
            let mut r = need(size::FALLOCATE_IN)?;
            r.skip(8);
            Op::Fallocate { offset: r.u64(), length: r.u64(), mode: r.u32() }
        }
        FUSE_LSEEK => {
            let mut r = need(size::LSEEK_IN)?;
            r.skip(8);
            Op::Lseek { offset: r.u64(), whence: r.u32() }
        }
        _ => Op::Unsupported,
    };
    Ok(Request { header, op })
}
