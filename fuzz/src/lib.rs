//! The fuzz harness: one input is an export configuration and a stream of `/dev/fuse` messages,
//! each decoded, dispatched to a real `Export` and answered with an encoded reply, exactly as a
//! queue does, with invariants checked at every step. Any panic is a finding.
//!
//! Shared by the libFuzzer target (`fuzz_targets/request_stream.rs`) and by the workspace test
//! that replays the seeds and every past finding (`crates/core/tests/fuzz_regressions.rs`).
//!
//! Input layout:
//! - byte 0, the export: bit 0 writable, bit 1 growable (with writable), bit 2 allow_other,
//!   bit 3 writethrough, bit 4 null backend (else memory), bit 5 stream mode, bit 6 also parse the
//!   first message as a `BLOCKFUSE_FAULTS` spec and serve through the fault backend;
//! - byte 1, the image size: 0, 4 KiB, 64 KiB + 123 or 256 KiB (low two bits);
//! - the rest: one message, or in stream mode up to 64 messages each prefixed by its length
//!   (u16, little endian).

use blockfuse_core::backend::{Backend, BlockBackend, FaultBackend, FaultSpec};
use blockfuse_core::backend::{MemoryBackend, NullBackend};
use blockfuse_core::export::{negotiate_init, Export, ExportOptions, InitLimits, Outcome};
use blockfuse_core::protocol::abi::uring::{IN_OUT_HEADER_SZ, OP_IN_OUT_SZ};
use blockfuse_core::protocol::abi::{falloc, fattr, opcode, size};
use blockfuse_core::protocol::decode::{decode, decode_ring, DecodeError, HaltReason, Op};
use blockfuse_core::protocol::encode::{init_out, out_header, MAX_SMALL_REPLY};

/// `max_read` of the fuzzed export; the data area is this large, as a queue's is `max_write`.
pub const MAX_READ: usize = 128 << 10;
/// A memory image may not grow beyond this (the memory backend really allocates).
const MEMORY_CAP: u64 = 8 << 20;
const MAX_MESSAGES: usize = 64;
const UID: u32 = 1000;
const GID: u32 = 1000;

fn image_len(selector: u8) -> usize {
    [0, 4096, (64 << 10) + 123, 256 << 10][(selector & 3) as usize]
}

/// The initial image content for a size selector (computed once per thread).
fn pattern(selector: u8) -> Vec<u8> {
    thread_local! {
        static PATTERNS: Vec<Vec<u8>> = (0..4)
            .map(|s| (0..image_len(s)).map(|i| (i * 31 % 251) as u8 + 1).collect())
            .collect();
    }
    PATTERNS.with(|p| p[(selector & 3) as usize].clone())
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    thread_local! {
        static RT: tokio::runtime::Runtime =
            tokio::runtime::Builder::new_current_thread().build().expect("runtime");
    }
    RT.with(|rt| rt.block_on(f))
}

/// Splits the message part of an input into messages.
fn messages(stream: bool, rest: &[u8]) -> Vec<&[u8]> {
    if !stream {
        return vec![rest];
    }
    let mut out = Vec::new();
    let mut pos = 0;
    while out.len() < MAX_MESSAGES && pos + 2 <= rest.len() {
        let len = u16::from_le_bytes([rest[pos], rest[pos + 1]]) as usize;
        let end = (pos + 2 + len).min(rest.len());
        out.push(&rest[pos + 2..end]);
        pos = end;
    }
    out
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes(b[at..at + 4].try_into().unwrap())
}

/// Runs one input. Panics when an invariant does not hold.
pub fn run_one(data: &[u8]) {
    let (cfg, sizes, rest) = match data {
        [c, s, rest @ ..] => (*c, *s, rest),
        _ => return,
    };
    let writable = cfg & 1 != 0;
    let opts = ExportOptions {
        writable,
        growable: writable && cfg & 2 != 0,
        allow_other: cfg & 4 != 0,
        writethrough: cfg & 8 != 0,
        max_read: MAX_READ as u32,
    };
    let null = cfg & 0x10 != 0;
    let mut msgs = messages(cfg & 0x20 != 0, rest);
    let initial = pattern(sizes);
    let mut backend = if null {
        Backend::Null(NullBackend::new(initial.len() as u64))
    } else {
        Backend::Memory(MemoryBackend::new(initial.clone()))
    };
    if cfg & 0x40 != 0 && !msgs.is_empty() {
        let spec = String::from_utf8_lossy(msgs.remove(0)).into_owned();
        if let Ok(mut spec) = FaultSpec::parse(&spec) {
            // Latency only slows the fuzzer down; the timer is tested elsewhere.
            spec.delay = std::time::Duration::ZERO;
            backend = Backend::Fault(FaultBackend::new(backend, spec).expect("fault backend"));
        }
    }
    let export = Export::new(backend, opts, UID, GID);
    let mut small = [0u8; MAX_SMALL_REPLY];
    let mut area = vec![0u8; MAX_READ];
    for msg in msgs {
        if !serve(&export, msg, &mut small, &mut area) {
            break;
        }
    }
    if !writable && !null {
        assert_eq!(memory(&export).snapshot(), initial, "a read-only export changed its image");
    }
}

fn memory(export: &Export) -> &MemoryBackend {
    match export.backend() {
        Backend::Memory(m) => m,
        Backend::Fault(f) => match f.inner() {
            Backend::Memory(m) => m,
            _ => unreachable!(),
        },
        _ => unreachable!(),
    }
}

fn is_memory(export: &Export) -> bool {
    match export.backend() {
        Backend::Memory(_) => true,
        Backend::Fault(f) => matches!(f.inner(), Backend::Memory(_)),
        _ => false,
    }
}

/// The size `op` would give the image, if it asks for one.
fn requested_size(op: &Op, len: u64, growable: bool) -> Option<u64> {
    match *op {
        Op::Setattr(s) if s.valid & fattr::FATTR_SIZE != 0 => Some(s.size),
        Op::Write { offset, size } if growable => Some(offset.saturating_add(size as u64)),
        Op::Fallocate { offset, length, mode }
            if mode & falloc::FALLOC_FL_KEEP_SIZE == 0
                && mode & falloc::FALLOC_FL_PUNCH_HOLE == 0 =>
        {
            Some(offset.saturating_add(length))
        }
        _ => None,
    }
    .filter(|&n| n > len)
}

/// The same request as FUSE-over-io_uring delivers it (header, then the op's struct, then the
/// payload elsewhere): split after at most 128 bytes of body, decoding must not panic, and a
/// request with no payload part must decode to what the /dev/fuse decoder made of it.
fn check_ring_decode(msg: &[u8], op: &Op) {
    let mut in_out = [0u8; IN_OUT_HEADER_SZ];
    in_out[..size::IN_HEADER].copy_from_slice(&msg[..size::IN_HEADER]);
    let body = &msg[size::IN_HEADER..];
    let fixed = body.len().min(OP_IN_OUT_SZ);
    let mut op_in = [0u8; OP_IN_OUT_SZ];
    op_in[..fixed].copy_from_slice(&body[..fixed]);
    let ring = decode_ring(&in_out, &op_in, body.len() - fixed);
    if body.len() <= OP_IN_OUT_SZ {
        assert_eq!(ring.map(|r| r.op), Ok(*op), "ring decoding differs");
    }
}

/// Decodes, dispatches and answers one message as a queue does. False when the stream halts.
fn serve(export: &Export, msg: &[u8], small: &mut [u8; MAX_SMALL_REPLY], area: &mut [u8]) -> bool {
    let req = match decode(msg) {
        Err(DecodeError::Halt(reason)) => {
            match reason {
                HaltReason::ShortHeader { got } => {
                    assert!(got == msg.len() && got < size::IN_HEADER, "{reason:?}")
                }
                HaltReason::LengthMismatch { header, got } => {
                    assert!(got == msg.len() && header as usize != got, "{reason:?}");
                    assert_eq!(header, u32_at(msg, 0));
                }
                HaltReason::RingLengthMismatch { .. } => panic!("decode reported {reason:?}"),
            }
            assert!(!reason.to_string().is_empty());
            return false;
        }
        Err(DecodeError::Malformed { header, errno }) => {
            assert_eq!(errno, libc::EINVAL);
            assert_eq!(header.len as usize, msg.len());
            assert!(matches!(
                header.opcode,
                opcode::FUSE_INIT
                    | opcode::FUSE_SETATTR
                    | opcode::FUSE_OPEN
                    | opcode::FUSE_RELEASE
                    | opcode::FUSE_READ
                    | opcode::FUSE_WRITE
                    | opcode::FUSE_FLUSH
                    | opcode::FUSE_FSYNC
                    | opcode::FUSE_FALLOCATE
                    | opcode::FUSE_LSEEK
            ));
            encode_reply(header.unique, Outcome::Error(errno), small, area);
            return true;
        }
        Ok(req) => req,
    };
    let header = req.header;
    assert!(msg.len() >= size::IN_HEADER && header.len as usize == msg.len());
    check_ring_decode(msg, &req.op);
    let opts = *export.options();
    let len_before = export.backend().len();
    if let Op::Init { major, minor, max_readahead, flags, flags2 } = req.op {
        // What the transport does with the first INIT.
        let limits = InitLimits {
            max_write: MAX_READ as u32,
            page_size: 4096,
            io_uring: true,
            passthrough: true,
        };
        let negotiated = negotiate_init(major, minor, max_readahead, flags, flags2, limits);
        if let Ok((out, negotiated)) = negotiated {
            let n = init_out(small, &out);
            assert!(n == size::INIT_OUT || n == size::INIT_OUT_COMPAT_22);
            assert!(negotiated.max_write <= MAX_READ as u32 && negotiated.max_write >= 4096);
            assert_eq!(negotiated.flags & !flags, 0, "we may only accept offered flags");
        }
    }
    if is_memory(export) {
        if let Some(n) = requested_size(&req.op, len_before, opts.growable) {
            if n > MEMORY_CAP {
                // Would allocate the requested size for real: not this harness's subject.
                return true;
            }
        }
    }
    let mut payload = Vec::new();
    if let Op::Write { size: n, .. } = req.op {
        // The transport reads a WRITE's payload straight into the data area.
        let p = &msg[size::WRITE_PREFIX..];
        assert_eq!(p.len(), n as usize, "decode accepted a WRITE whose payload length differs");
        if p.len() <= area.len() {
            area[..p.len()].copy_from_slice(p);
        }
        payload = p.to_vec();
    }
    let outcome = block_on(export.handle(header.opcode, req.op, small, area));
    check(export, &req.op, header.opcode, outcome, len_before, &payload, small, area);
    encode_reply(header.unique, outcome, small, area);
    true
}

#[allow(clippy::too_many_arguments)]
fn check(
    export: &Export,
    op: &Op,
    opcode_: u32,
    outcome: Outcome,
    len_before: u64,
    payload: &[u8],
    small: &[u8],
    area: &[u8],
) {
    let opts = export.options();
    let len = export.backend().len();
    match outcome {
        Outcome::NoReply => assert!(
            matches!(opcode_, opcode::FUSE_FORGET | opcode::FUSE_BATCH_FORGET),
            "only FORGETs go unanswered, not opcode {opcode_}"
        ),
        Outcome::Error(e) => assert!((1..4096).contains(&e), "errno {e} out of range"),
        Outcome::Small(n) => {
            let want = match op {
                Op::Getattr | Op::Setattr(_) => Some(size::ATTR_OUT),
                Op::Statfs => Some(size::STATFS_OUT),
                Op::Open { .. } => Some(size::OPEN_OUT),
                Op::Write { .. } => Some(size::WRITE_OUT),
                Op::Lseek { .. } => Some(size::LSEEK_OUT),
                Op::Destroy | Op::Release | Op::Flush | Op::Fsync { .. } | Op::Fallocate { .. } => {
                    Some(0)
                }
                _ => None,
            };
            assert_eq!(Some(n), want, "reply body size for {op:?}");
        }
        Outcome::Data(n) => {
            let Op::Read { offset, size } = *op else { panic!("data reply to {op:?}") };
            let want =
                if offset >= len_before { 0 } else { (size as u64).min(len_before - offset) };
            assert_eq!(n as u64, want, "READ {offset}+{size} of a {len_before}-byte image");
            assert!(n <= area.len());
        }
    }
    match (*op, outcome) {
        (Op::Write { offset, size }, Outcome::Small(_)) => {
            assert!(opts.writable, "a read-only export acknowledged a WRITE");
            let written = u32_at(small, 0);
            assert!(written <= size, "wrote {written} of {size}");
            if !opts.growable || written == 0 {
                assert_eq!(len, len_before, "WRITE of {written} bytes resized the image");
            }
            if is_memory(export) && written > 0 {
                let mut back = vec![0u8; written as usize];
                block_on(export.backend().read_at(&mut back, offset)).expect("read back");
                assert_eq!(back, payload[..written as usize], "WRITE {offset}+{size} not in image");
            }
        }
        (Op::Write { .. }, Outcome::Error(_)) if !opts.growable => assert_eq!(len, len_before),
        (Op::Fallocate { length, .. }, Outcome::Small(_)) => {
            assert!(opts.writable && length > 0, "FALLOCATE of {length} bytes succeeded")
        }
        (Op::Lseek { .. }, Outcome::Small(_)) => {
            let at = u64::from_ne_bytes(small[..8].try_into().unwrap());
            assert!(at <= len, "LSEEK answered {at} past EOF {len}");
        }
        (Op::Getattr | Op::Setattr(_), Outcome::Small(_)) => {
            let size_field = u64::from_ne_bytes(small[24..32].try_into().unwrap());
            assert_eq!(size_field, len, "attributes report a stale size");
            let mode = u32_at(small, 16 + 60);
            assert_eq!(mode & libc::S_IFMT, libc::S_IFREG, "the file type changed");
        }
        _ => {}
    }
}

/// The reply a queue would send: `fuse_out_header` and the body, checked for consistency.
fn encode_reply(unique: u64, outcome: Outcome, small: &[u8], area: &[u8]) {
    let (error, body) = match outcome {
        Outcome::NoReply => return,
        Outcome::Error(e) => (-e, &[][..]),
        Outcome::Small(n) => (0, &small[..n]),
        Outcome::Data(n) => (0, &area[..n]),
    };
    let mut header = [0u8; size::OUT_HEADER];
    out_header(&mut header, (size::OUT_HEADER + body.len()) as u32, error, unique);
    assert_eq!(u32_at(&header, 0) as usize, size::OUT_HEADER + body.len());
    assert_eq!(i32::from_ne_bytes(header[4..8].try_into().unwrap()), error);
    assert_eq!(u64::from_ne_bytes(header[8..16].try_into().unwrap()), unique);
}

/// Well-formed inputs for every opcode the export implements, and a few streams: the seed
/// corpus (`fuzz/seeds/request_stream/`, rewritten by
/// `BLOCKFUSE_WRITE_FUZZ_SEEDS=1 cargo test --test fuzz_regressions`).
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    fn req(op: u32, unique: u64, body: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&((40 + body.len()) as u32).to_ne_bytes());
        v.extend_from_slice(&op.to_ne_bytes());
        v.extend_from_slice(&unique.to_ne_bytes());
        v.extend_from_slice(&1u64.to_ne_bytes());
        v.extend_from_slice(&UID.to_ne_bytes());
        v.extend_from_slice(&GID.to_ne_bytes());
        v.extend_from_slice(&[0; 8]);
        v.extend_from_slice(body);
        v
    }
    fn words(ws: &[u64]) -> Vec<u8> {
        ws.iter().flat_map(|w| w.to_ne_bytes()).collect()
    }
    let rw = |off: u64, size: u32, payload: &[u8]| {
        let mut b = words(&[7, off]);
        b.extend_from_slice(&size.to_ne_bytes());
        b.extend_from_slice(&[0; 20]);
        b.extend_from_slice(payload);
        b
    };
    let mut setattr = vec![0u8; 88];
    setattr[..4].copy_from_slice(&(fattr::FATTR_SIZE | fattr::FATTR_MODE).to_ne_bytes());
    setattr[16..24].copy_from_slice(&5000u64.to_ne_bytes());
    setattr[68..72].copy_from_slice(&0o640u32.to_ne_bytes());
    let mut init = words(&[]);
    for w in [7u32, 41, 131072, (1 << 0) | (1 << 5) | (1 << 15) | (1 << 22)] {
        init.extend_from_slice(&w.to_ne_bytes());
    }
    init.extend_from_slice(&[0; 48]);
    let one: Vec<(&str, Vec<u8>)> = vec![
        ("init", req(opcode::FUSE_INIT, 1, &init)),
        ("getattr", req(opcode::FUSE_GETATTR, 2, &[0; 16])),
        ("setattr", req(opcode::FUSE_SETATTR, 3, &setattr)),
        ("open", req(opcode::FUSE_OPEN, 4, &words(&[2]))),
        ("read", req(opcode::FUSE_READ, 5, &rw(100, 4096, &[]))),
        ("write", req(opcode::FUSE_WRITE, 6, &rw(4000, 200, &[0x5a; 200]))),
        ("statfs", req(opcode::FUSE_STATFS, 7, &[])),
        ("release", req(opcode::FUSE_RELEASE, 8, &[0; 24])),
        ("flush", req(opcode::FUSE_FLUSH, 9, &[0; 24])),
        ("fsync", req(opcode::FUSE_FSYNC, 10, &words(&[7, 1]))),
        ("fallocate-punch", req(opcode::FUSE_FALLOCATE, 11, &words(&[7, 512, 4096, 3]))),
        ("fallocate-grow", req(opcode::FUSE_FALLOCATE, 12, &words(&[7, 70000, 4096, 0]))),
        ("lseek-data", req(opcode::FUSE_LSEEK, 13, &words(&[7, 10, 3]))),
        ("forget", req(opcode::FUSE_FORGET, 14, &words(&[1]))),
        ("lookup", req(opcode::FUSE_LOOKUP, 15, b"name\0")),
        ("interrupt", req(opcode::FUSE_INTERRUPT, 16, &words(&[5]))),
        ("destroy", req(opcode::FUSE_DESTROY, 17, &[])),
    ];
    let mut out = Vec::new();
    for (name, msg) in &one {
        // Writable + growable + allow_other, 64 KiB image, single message.
        let mut input = vec![0x07, 2];
        input.extend_from_slice(msg);
        out.push((format!("seed-{name}"), input));
    }
    let stream = |cfg: u8, msgs: &[&Vec<u8>]| {
        let mut input = vec![cfg | 0x20, 2];
        for m in msgs {
            input.extend_from_slice(&(m.len() as u16).to_le_bytes());
            input.extend_from_slice(m);
        }
        input
    };
    let all: Vec<&Vec<u8>> = one.iter().map(|(_, m)| m).collect();
    out.push(("seed-stream-writable".into(), stream(0x03, &all)));
    out.push(("seed-stream-read-only".into(), stream(0x00, &all)));
    out.push(("seed-stream-null".into(), stream(0x13, &all)));
    let spec = b"eio@0-4096,enospc@64K-128K:w,flush=eio".to_vec();
    let mut faulty = vec![&spec];
    faulty.extend(all.iter().copied());
    out.push(("seed-stream-faults".into(), stream(0x43, &faulty)));
    out
}

/// The `nbd_replies` target: one NBD request and the byte stream a server sends back, fed
/// through the reply decoder and [`ReplyCheck`](blockfuse_core::backend::nbd::proto::ReplyCheck)
/// exactly as a connection does. Any panic is a finding; every data or zero step must stay inside
/// the request's buffer, and a successful READ must have covered all of it.
///
/// Input layout: byte 0 the request kind (0 READ, 1 BLOCK_STATUS, else plain) and bit 7
/// structured replies; bytes 1..3 the length (u16, big endian, READ only); the rest the stream.
pub fn run_nbd_reply(data: &[u8]) {
    use blockfuse_core::backend::nbd::proto::{
        chunk_header, reply_start, Answer, Expect, ReplyCheck, ReplyStart, Step,
    };
    const COOKIE: u64 = 0x1_0000_0001;
    const OFFSET: u64 = 1 << 20;
    if data.len() < 3 {
        return;
    }
    let len = u16::from_be_bytes([data[1], data[2]]) as u32 + 1;
    let expect = match data[0] & 0x7f {
        0 => Expect::Read { offset: OFFSET, len },
        1 => Expect::BlockStatus { context: 1 },
        _ => Expect::Plain,
    };
    let read_len = if let Expect::Read { len, .. } = expect { len as usize } else { 0 };
    let mut buf = vec![0u8; read_len];
    let mut check = ReplyCheck::new(expect, data[0] & 0x80 != 0);
    let mut stream = &data[3..];
    let mut take = |n: usize| -> Option<Vec<u8>> {
        if stream.len() < n {
            return None;
        }
        let (head, rest) = stream.split_at(n);
        stream = rest;
        Some(head.to_vec())
    };
    while !check.is_done() {
        let Some(head) = take(16) else { return };
        let head: [u8; 16] = head.try_into().expect("16 bytes");
        let header = match reply_start(&head) {
            Ok(ReplyStart::Done(h)) => h,
            Ok(ReplyStart::NeedLength { flags, ty, cookie }) => {
                let Some(l) = take(4) else { return };
                chunk_header(flags, ty, cookie, [l[0], l[1], l[2], l[3]])
            }
            Err(_) => return,
        };
        // A connection hands other cookies to their requests; here there are none.
        if header.cookie() != COOKIE {
            return;
        }
        let mut step = match check.header(&header) {
            Ok(s) => s,
            Err(_) => return,
        };
        loop {
            match step {
                Step::Prefix(n) => {
                    assert!(n <= 12, "prefixes are at most 12 bytes");
                    let Some(p) = take(n) else { return };
                    step = match check.prefix(&p) {
                        Ok(s) => s,
                        Err(_) => return,
                    };
                    continue;
                }
                Step::Data { at, len } => {
                    assert!(at + len <= buf.len(), "data step outside the request");
                    let Some(d) = take(len) else { return };
                    buf[at..at + len].copy_from_slice(&d);
                }
                Step::Zero { at, len } => {
                    assert!(at + len <= buf.len(), "zero step outside the request");
                    buf[at..at + len].fill(0);
                }
                Step::Skip(n) => {
                    if take(n as usize).is_none() {
                        return;
                    }
                }
                Step::Nothing => {}
            }
            break;
        }
    }
    match check.answer() {
        Ok(Answer::Extent(len, _)) => assert!(len > 0, "empty extent accepted"),
        Ok(Answer::Error(e)) => assert!(e != 0, "error 0 accepted"),
        Ok(Answer::Ok) | Err(_) => {}
    }
}
