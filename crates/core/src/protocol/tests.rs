//! Byte-fixture tests of the wire protocol: requests built byte by byte as the kernel lays them out
//! (include/uapi/linux/fuse.h), replies checked at the kernel's field offsets.

use super::abi::{opcode::*, size};
use super::decode::{
    decode, decode_header, decode_ring, DecodeError, HaltReason, InHeader, Op, SetattrIn,
};
use super::encode::{
    attr_out, init_out, lseek_out, open_out, out_header, statfs_out, write_out, Attr, InitOut,
    Statfs, MAX_SMALL_REPLY,
};

/// Builds one request: `fuse_in_header` (40 bytes) followed by a body appended field by field.
struct Fixture {
    opcode: u32,
    unique: u64,
    nodeid: u64,
    uid: u32,
    gid: u32,
    pid: u32,
    body: Vec<u8>,
    len: Option<u32>,
}

fn req(opcode: u32, unique: u64) -> Fixture {
    Fixture {
        opcode,
        unique,
        nodeid: 1,
        uid: 1000,
        gid: 100,
        pid: 4242,
        body: Vec::new(),
        len: None,
    }
}

impl Fixture {
    fn u32(mut self, v: u32) -> Self {
        self.body.extend_from_slice(&v.to_ne_bytes());
        self
    }
    fn u64(mut self, v: u64) -> Self {
        self.body.extend_from_slice(&v.to_ne_bytes());
        self
    }
    fn bytes(mut self, b: &[u8]) -> Self {
        self.body.extend_from_slice(b);
        self
    }
    fn zeros(self, n: usize) -> Self {
        self.bytes(&vec![0; n])
    }
    fn nodeid(mut self, n: u64) -> Self {
        self.nodeid = n;
        self
    }
    /// Overrides the header's `len` (default: the real byte count).
    fn len(mut self, len: u32) -> Self {
        self.len = Some(len);
        self
    }
    /// The body truncated to `n` bytes.
    fn truncated(mut self, n: usize) -> Self {
        self.body.truncate(n);
        self
    }
    fn build(&self) -> Vec<u8> {
        let total = size::IN_HEADER + self.body.len();
        let mut v = Vec::with_capacity(total);
        v.extend_from_slice(&self.len.unwrap_or(total as u32).to_ne_bytes());
        v.extend_from_slice(&self.opcode.to_ne_bytes());
        v.extend_from_slice(&self.unique.to_ne_bytes());
        v.extend_from_slice(&self.nodeid.to_ne_bytes());
        v.extend_from_slice(&self.uid.to_ne_bytes());
        v.extend_from_slice(&self.gid.to_ne_bytes());
        v.extend_from_slice(&self.pid.to_ne_bytes());
        v.extend_from_slice(&0u16.to_ne_bytes()); // total_extlen
        v.extend_from_slice(&0u16.to_ne_bytes()); // padding
        assert_eq!(v.len(), size::IN_HEADER);
        v.extend_from_slice(&self.body);
        v
    }
    fn decode(&self) -> Result<Op, DecodeError> {
        let buf = self.build();
        decode(&buf).map(|r| {
            assert_eq!(r.header, self.header(buf.len() as u32));
            r.op
        })
    }
    fn header(&self, len: u32) -> InHeader {
        InHeader {
            len,
            opcode: self.opcode,
            unique: self.unique,
            nodeid: self.nodeid,
            uid: self.uid,
            gid: self.gid,
            pid: self.pid,
        }
    }
}

// Request bodies with a distinct value in every field, so a decoder reading the wrong offset
// picks up a wrong value.

/// `fuse_init_in`: the 16-byte compat part, optionally the 7.36+ tail (flags2, unused[11]).
fn init_in(unique: u64, major: u32, minor: u32, full: bool) -> Fixture {
    let f = req(FUSE_INIT, unique).nodeid(0).u32(major).u32(minor).u32(0x20000).u32(0x8000_1021);
    if full {
        f.u32(0x0000_0003).zeros(44)
    } else {
        f
    }
}

/// `fuse_setattr_in` (88 bytes).
fn setattr_in(unique: u64, valid: u32) -> Fixture {
    req(FUSE_SETATTR, unique)
        .u32(valid)
        .u32(0xdead_0001) // padding
        .u64(0x1111) // fh
        .u64(0x2222_3333) // size
        .u64(0x4444) // lock_owner
        .u64(0x5555) // atime
        .u64(0x6666) // mtime
        .u64(0x7777) // ctime
        .u32(0x88) // atimensec
        .u32(0x99) // mtimensec
        .u32(0xaa) // ctimensec
        .u32(0o100640) // mode
        .u32(0xdead_0004) // unused4
        .u32(501) // uid
        .u32(502) // gid
        .u32(0xdead_0005) // unused5
}

/// `fuse_read_in` / `fuse_write_in` share one 40-byte layout.
fn rw_in(opcode: u32, unique: u64, offset: u64, size: u32) -> Fixture {
    req(opcode, unique)
        .u64(0xf00d) // fh
        .u64(offset)
        .u32(size)
        .u32(0x1) // read_flags / write_flags
        .u64(0xbeef) // lock_owner
        .u32(0o2) // flags
        .u32(0xdead) // padding
}

fn fsync_in(unique: u64, fsync_flags: u32) -> Fixture {
    req(FUSE_FSYNC, unique).u64(0xf00d).u32(fsync_flags).u32(0xdead)
}

fn fallocate_in(unique: u64, offset: u64, length: u64, mode: u32) -> Fixture {
    req(FUSE_FALLOCATE, unique).u64(0xf00d).u64(offset).u64(length).u32(mode).u32(0xdead)
}

fn lseek_in(unique: u64, offset: u64, whence: u32) -> Fixture {
    req(FUSE_LSEEK, unique).u64(0xf00d).u64(offset).u32(whence).u32(0xdead)
}

fn flush_in(unique: u64) -> Fixture {
    req(FUSE_FLUSH, unique).u64(0xf00d).u32(0).u32(0xdead).u64(0xbeef)
}

fn release_in(unique: u64) -> Fixture {
    req(FUSE_RELEASE, unique).u64(0xf00d).u32(0o2).u32(0x1).u64(0xbeef)
}

fn open_in(unique: u64, flags: u32) -> Fixture {
    req(FUSE_OPEN, unique).u32(flags).u32(0xdead)
}

/// Every opcode the decoder reads a body for, with a well-formed body and the size of the struct
/// the decoder must insist on.
fn fixed_size_requests() -> Vec<(&'static str, Fixture, usize)> {
    vec![
        ("INIT", init_in(1, 7, 31, false), size::INIT_IN_COMPAT),
        ("SETATTR", setattr_in(2, 0), size::SETATTR_IN),
        ("OPEN", open_in(3, 0), size::OPEN_IN),
        ("RELEASE", release_in(4), size::RELEASE_IN),
        ("READ", rw_in(FUSE_READ, 5, 0, 0), size::READ_IN),
        ("WRITE", rw_in(FUSE_WRITE, 6, 0, 0), size::WRITE_IN),
        ("FLUSH", flush_in(7), size::FLUSH_IN),
        ("FSYNC", fsync_in(8, 0), size::FSYNC_IN),
        ("FALLOCATE", fallocate_in(9, 0, 0, 0), size::FALLOCATE_IN),
        ("LSEEK", lseek_in(10, 0, 0), size::LSEEK_IN),
    ]
}

fn rd32(b: &[u8], off: usize) -> u32 {
    u32::from_ne_bytes(b[off..off + 4].try_into().unwrap())
}
fn rd16(b: &[u8], off: usize) -> u16 {
    u16::from_ne_bytes(b[off..off + 2].try_into().unwrap())
}
fn rd64(b: &[u8], off: usize) -> u64 {
    u64::from_ne_bytes(b[off..off + 8].try_into().unwrap())
}

// ---------------------------------------------------------------------------------------------
// Decoding: every opcode

#[test]
fn header_fields_are_read_from_their_offsets() {
    let mut f = req(FUSE_GETATTR, 0x0102_0304_0506_0708).nodeid(0x1122_3344_5566_7788);
    f.uid = 0xa1a2_a3a4;
    f.gid = 0xb1b2_b3b4;
    f.pid = 0xc1c2_c3c4;
    let buf = f.build();
    let h = decode_header(&buf).unwrap();
    assert_eq!(
        h,
        InHeader {
            len: 40,
            opcode: FUSE_GETATTR,
            unique: 0x0102_0304_0506_0708,
            nodeid: 0x1122_3344_5566_7788,
            uid: 0xa1a2_a3a4,
            gid: 0xb1b2_b3b4,
            pid: 0xc1c2_c3c4,
        }
    );
}

#[test]
fn init_compat_and_full_bodies() {
    for full in [false, true] {
        let op = init_in(1, 7, 41, full).decode().unwrap();
        assert_eq!(
            op,
            Op::Init { major: 7, minor: 41, max_readahead: 0x20000, flags: 0x8000_1021, flags2: 0 },
            "full body: {full}"
        );
    }
    // An old kernel with the 16-byte struct and a major we do not speak still decodes: refusing
    // it is negotiation's job, which can say why.
    assert_eq!(
        init_in(1, 6, 2, false).decode().unwrap(),
        Op::Init { major: 6, minor: 2, max_readahead: 0x20000, flags: 0x8000_1021, flags2: 0 }
    );
}

#[test]
fn getattr_with_and_without_body() {
    assert_eq!(req(FUSE_GETATTR, 3).decode().unwrap(), Op::Getattr);
    // fuse_getattr_in: getattr_flags, dummy, fh.
    let with_body = req(FUSE_GETATTR, 3).u32(1).u32(0).u64(0xf00d);
    assert_eq!(with_body.decode().unwrap(), Op::Getattr);
}

#[test]
fn setattr_reads_every_field_it_uses_from_the_right_offset() {
    let op = setattr_in(4, 0x0000_0e4f).decode().unwrap();
    assert_eq!(
        op,
        Op::Setattr(SetattrIn {
            valid: 0x0000_0e4f,
            fh: 0x1111,
            size: 0x2222_3333,
            mode: 0o100640,
            uid: 501,
            gid: 502,
        })
    );
}

#[test]
fn open_flags() {
    assert!(matches!(open_in(5, 0o100002).decode().unwrap(), Op::Open { flags: 0o100002, .. }));
}

#[test]
fn read_offset_and_size() {
    let op = rw_in(FUSE_READ, 6, 0x0123_4567_89ab_cdef, 131072).decode().unwrap();
    assert_eq!(op, Op::Read { offset: 0x0123_4567_89ab_cdef, size: 131072 });
}

#[test]
fn write_with_payload() {
    let payload: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
    let f = rw_in(FUSE_WRITE, 7, 4096, 1000).bytes(&payload);
    assert_eq!(f.decode().unwrap(), Op::Write { offset: 4096, size: 1000 });
    // The payload is not copied: it starts right after fuse_write_in.
    let buf = f.build();
    assert_eq!(&buf[size::WRITE_PREFIX..], &payload[..]);
    // A zero-length write has no payload at all.
    assert_eq!(rw_in(FUSE_WRITE, 7, 9, 0).decode().unwrap(), Op::Write { offset: 9, size: 0 });
}

#[test]
fn flush_release_statfs_destroy_lookup() {
    assert_eq!(flush_in(8).decode().unwrap(), Op::Flush);
    assert_eq!(release_in(9).decode().unwrap(), Op::Release);
    assert_eq!(req(FUSE_STATFS, 10).decode().unwrap(), Op::Statfs);
    assert_eq!(req(FUSE_DESTROY, 11).nodeid(0).decode().unwrap(), Op::Destroy);
    assert_eq!(req(FUSE_LOOKUP, 12).bytes(b"disk.img\0").decode().unwrap(), Op::Lookup);
}

#[test]
fn fsync_datasync_is_bit_zero_only() {
    assert_eq!(fsync_in(13, 0).decode().unwrap(), Op::Fsync { datasync: false });
    assert_eq!(fsync_in(13, 1).decode().unwrap(), Op::Fsync { datasync: true });
    assert_eq!(fsync_in(13, 3).decode().unwrap(), Op::Fsync { datasync: true });
    assert_eq!(fsync_in(13, 2).decode().unwrap(), Op::Fsync { datasync: false });
}

#[test]
fn fallocate_offset_length_mode() {
    let op = fallocate_in(14, 1 << 40, 0x1234_5678_9abc, 0x11).decode().unwrap();
    assert_eq!(op, Op::Fallocate { offset: 1 << 40, length: 0x1234_5678_9abc, mode: 0x11 });
}

#[test]
fn lseek_offset_whence() {
    let op = lseek_in(15, 0xffff_0000_1234, 4).decode().unwrap();
    assert_eq!(op, Op::Lseek { offset: 0xffff_0000_1234, whence: 4 });
}

#[test]
fn forget_and_batch_forget_never_reply_even_when_malformed() {
    // fuse_forget_in: nlookup.
    assert_eq!(req(FUSE_FORGET, 16).u64(3).decode().unwrap(), Op::Forget);
    // fuse_batch_forget_in: count, dummy; then count × fuse_forget_one { nodeid, nlookup }.
    let batch = req(FUSE_BATCH_FORGET, 17).nodeid(0).u32(2).u32(0).u64(1).u64(5).u64(1).u64(7);
    assert_eq!(batch.decode().unwrap(), Op::Forget);
    // A Malformed result would make the transport send a reply the kernel does not expect.
    assert_eq!(req(FUSE_FORGET, 18).decode().unwrap(), Op::Forget);
    assert_eq!(req(FUSE_BATCH_FORGET, 19).u32(1000).decode().unwrap(), Op::Forget);
}

#[test]
fn unknown_and_unimplemented_opcodes_are_unsupported() {
    assert_eq!(req(9999, 20).decode().unwrap(), Op::Unsupported);
    assert_eq!(req(u32::MAX, 20).decode().unwrap(), Op::Unsupported);
    assert_eq!(req(0, 20).decode().unwrap(), Op::Unsupported);
    // fuse_mkdir_in { mode, umask } + name.
    let mkdir = req(FUSE_MKDIR, 21).u32(0o755).u32(0o022).bytes(b"d\0");
    assert_eq!(mkdir.decode().unwrap(), Op::Unsupported);
    for op in [FUSE_MKNOD, FUSE_UNLINK, FUSE_RENAME, FUSE_SETXATTR, FUSE_GETXATTR, FUSE_READDIR] {
        assert_eq!(req(op, 22).decode().unwrap(), Op::Unsupported, "opcode {op}");
    }
    // No body at all is fine too: an unsupported op's body is never looked at.
    assert_eq!(req(FUSE_INTERRUPT, 23).decode().unwrap(), Op::Unsupported);
}

// ---------------------------------------------------------------------------------------------
// Decoding: what halts, what is malformed

#[test]
fn shorter_than_a_header_halts() {
    let full = req(FUSE_GETATTR, 1).build();
    for n in [0, 1, 16, 39] {
        assert_eq!(
            decode(&full[..n]),
            Err(DecodeError::Halt(HaltReason::ShortHeader { got: n })),
            "{n} bytes"
        );
        assert_eq!(decode_header(&full[..n]), Err(HaltReason::ShortHeader { got: n }));
    }
    // Even when the truncated header's len claims exactly what was read.
    let mut b = req(FUSE_GETATTR, 1).build();
    b[..4].copy_from_slice(&39u32.to_ne_bytes());
    assert_eq!(decode(&b[..39]), Err(DecodeError::Halt(HaltReason::ShortHeader { got: 39 })));
}

#[test]
fn header_length_different_from_bytes_read_halts() {
    // Header claims more than was read.
    let more = req(FUSE_GETATTR, 1).len(56).build();
    assert_eq!(
        decode(&more),
        Err(DecodeError::Halt(HaltReason::LengthMismatch { header: 56, got: 40 }))
    );
    // Header claims less than was read.
    let less = flush_in(2).len(40).build();
    assert_eq!(
        decode(&less),
        Err(DecodeError::Halt(HaltReason::LengthMismatch { header: 40, got: 64 }))
    );
    // Absurd lengths, and a length of zero.
    for bogus in [0, 39, u32::MAX] {
        let b = req(FUSE_READ, 3).len(bogus).zeros(40).build();
        assert_eq!(
            decode(&b),
            Err(DecodeError::Halt(HaltReason::LengthMismatch { header: bogus, got: 80 })),
            "len {bogus}"
        );
    }
    // A WRITE whose header disagrees halts rather than being answered: the stream is suspect.
    let w = rw_in(FUSE_WRITE, 4, 0, 8).bytes(&[1; 8]).len(80).build();
    assert_eq!(
        decode(&w),
        Err(DecodeError::Halt(HaltReason::LengthMismatch { header: 80, got: 88 }))
    );
}

#[test]
fn halt_reasons_say_what_happened() {
    let short = HaltReason::ShortHeader { got: 10 }.to_string();
    assert!(short.contains("10") && short.contains("header"), "{short}");
    let mismatch = HaltReason::LengthMismatch { header: 64, got: 40 }.to_string();
    assert!(mismatch.contains("64") && mismatch.contains("40"), "{mismatch}");
}

#[test]
fn every_body_shorter_than_its_struct_is_einval_for_that_unique() {
    for (name, f, need) in fixed_size_requests() {
        let unique = f.unique;
        for n in [0, 1, need / 2, need - 1] {
            let short = Fixture { body: f.body.clone(), ..req(f.opcode, unique) }.truncated(n);
            let buf = short.build();
            assert_eq!(
                decode(&buf),
                Err(DecodeError::Malformed {
                    header: short.header(buf.len() as u32),
                    errno: libc::EINVAL
                }),
                "{name} with a {n}-byte body"
            );
        }
        // Exactly the struct is enough (a zero-size WRITE has no payload).
        let exact = Fixture { body: f.body.clone(), ..req(f.opcode, unique) }.truncated(need);
        assert!(exact.decode().is_ok(), "{name} with exactly {need} bytes");
    }
}

#[test]
fn write_payload_must_match_its_size() {
    let f = |payload: usize| rw_in(FUSE_WRITE, 77, 0, 10).bytes(&vec![0xab; payload]);
    assert_eq!(f(10).decode().unwrap(), Op::Write { offset: 0, size: 10 });
    for payload in [0, 9, 11, 4096] {
        let fx = f(payload);
        let buf = fx.build();
        assert_eq!(
            decode(&buf),
            Err(DecodeError::Malformed {
                header: fx.header(buf.len() as u32),
                errno: libc::EINVAL
            }),
            "payload {payload} for size 10"
        );
    }
    // A size near u32::MAX with a tiny payload.
    let huge = rw_in(FUSE_WRITE, 78, 0, u32::MAX).bytes(&[0; 3]);
    assert!(matches!(
        huge.decode(),
        Err(DecodeError::Malformed { errno: libc::EINVAL, header: InHeader { unique: 78, .. } })
    ));
}

#[test]
fn bodies_longer_than_the_struct_are_accepted() {
    // Newer kernels append fields; everything but WRITE tolerates a longer body.
    for (name, f, _) in fixed_size_requests() {
        if f.opcode == FUSE_WRITE {
            continue;
        }
        assert!(f.zeros(24).decode().is_ok(), "{name} with trailing bytes");
    }
}

// ---------------------------------------------------------------------------------------------
// Encoding

#[test]
fn struct_sizes_match_the_kernel() {
    assert_eq!(size::IN_HEADER, 40);
    assert_eq!(size::OUT_HEADER, 16);
    assert_eq!(size::ATTR, 88);
    assert_eq!(size::ATTR_OUT, 104);
    assert_eq!(size::INIT_OUT, 64);
    assert_eq!(size::INIT_OUT_COMPAT_22, 24);
    assert_eq!(size::SETATTR_IN, 88);
    assert_eq!(size::STATFS_OUT, 80);
    assert_eq!(size::WRITE_PREFIX, 80);
    assert!(MAX_SMALL_REPLY >= size::ATTR_OUT.max(size::INIT_OUT).max(size::STATFS_OUT));
}

#[test]
fn out_header_layout() {
    let mut b = [0xaau8; 16];
    out_header(&mut b, 120, -libc::ENOSYS, 0x0102_0304_0506_0708);
    assert_eq!(rd32(&b, 0), 120);
    assert_eq!(rd32(&b, 4) as i32, -38);
    assert_eq!(rd64(&b, 8), 0x0102_0304_0506_0708);
}

#[test]
fn attr_out_fields_at_kernel_offsets() {
    let a = Attr {
        ino: 1,
        size: 0x1_0000_0001,
        blocks: 77,
        time_sec: 1_700_000_000,
        time_nsec: 123_456_789,
        mode: 0o100600,
        nlink: 1,
        uid: 1001,
        gid: 1002,
        blksize: 4096,
    };
    let mut b = [0xaau8; MAX_SMALL_REPLY];
    assert_eq!(attr_out(&mut b, 1, &a), 104);
    // fuse_attr_out: attr_valid, attr_valid_nsec, dummy, then fuse_attr at 16.
    assert_eq!(rd64(&b, 0), 1, "attr_valid");
    assert_eq!(rd32(&b, 8), 0, "attr_valid_nsec");
    assert_eq!(rd32(&b, 12), 0, "dummy");
    assert_eq!(rd64(&b, 16), 1, "ino");
    assert_eq!(rd64(&b, 24), 0x1_0000_0001, "size");
    assert_eq!(rd64(&b, 32), 77, "blocks");
    for (off, name) in [(40, "atime"), (48, "mtime"), (56, "ctime")] {
        assert_eq!(rd64(&b, off), 1_700_000_000, "{name}");
    }
    for (off, name) in [(64, "atimensec"), (68, "mtimensec"), (72, "ctimensec")] {
        assert_eq!(rd32(&b, off), 123_456_789, "{name}");
    }
    assert_eq!(rd32(&b, 76), 0o100600, "mode");
    assert_eq!(rd32(&b, 80), 1, "nlink");
    assert_eq!(rd32(&b, 84), 1001, "uid");
    assert_eq!(rd32(&b, 88), 1002, "gid");
    assert_eq!(rd32(&b, 92), 0, "rdev");
    assert_eq!(rd32(&b, 96), 4096, "blksize");
    assert_eq!(rd32(&b, 100), 0, "flags");
    assert!(b[104..].iter().all(|&x| x == 0xaa), "wrote past the struct");
}

fn sample_init_out(minor: u32) -> InitOut {
    InitOut {
        major: 7,
        minor,
        max_readahead: 0x20000,
        flags: 0x0040_8021,
        max_background: 65535,
        congestion_threshold: 49151,
        max_write: 1 << 20,
        time_gran: 1,
        max_pages: 256,
        flags2: 0,
        max_stack_depth: 0,
    }
}

#[test]
fn init_out_layout_and_size_by_minor() {
    for minor in [23, 31, 41] {
        let mut b = [0xaau8; MAX_SMALL_REPLY];
        assert_eq!(init_out(&mut b, &sample_init_out(minor)), 64, "7.{minor}");
        assert_eq!(rd32(&b, 0), 7, "major");
        assert_eq!(rd32(&b, 4), minor, "minor");
        assert_eq!(rd32(&b, 8), 0x20000, "max_readahead");
        assert_eq!(rd32(&b, 12), 0x0040_8021, "flags");
        assert_eq!(rd16(&b, 16), 65535, "max_background");
        assert_eq!(rd16(&b, 18), 49151, "congestion_threshold");
        assert_eq!(rd32(&b, 20), 1 << 20, "max_write");
        assert_eq!(rd32(&b, 24), 1, "time_gran");
        assert_eq!(rd16(&b, 28), 256, "max_pages");
        assert_eq!(rd16(&b, 30), 0, "map_alignment");
        assert_eq!(rd32(&b, 32), 0, "flags2");
        assert!(b[36..64].iter().all(|&x| x == 0), "unused tail must be zero");
    }
    // Before 7.23 the kernel knows only the first 24 bytes (FUSE_COMPAT_22_INIT_OUT_SIZE).
    for minor in [9, 13, 22] {
        let mut b = [0u8; MAX_SMALL_REPLY];
        assert_eq!(init_out(&mut b, &sample_init_out(minor)), 24, "7.{minor}");
        assert_eq!(rd32(&b, 4), minor);
        assert_eq!(rd32(&b, 20), 1 << 20, "max_write is inside the compat part");
    }
}

#[test]
fn statfs_out_layout() {
    let s = Statfs {
        blocks: 11,
        bfree: 12,
        bavail: 13,
        files: 14,
        ffree: 15,
        bsize: 4096,
        namelen: 255,
        frsize: 512,
    };
    let mut b = [0xaau8; MAX_SMALL_REPLY];
    assert_eq!(statfs_out(&mut b, &s), 80);
    for (i, v) in [11u64, 12, 13, 14, 15].into_iter().enumerate() {
        assert_eq!(rd64(&b, i * 8), v);
    }
    assert_eq!(rd32(&b, 40), 4096, "bsize");
    assert_eq!(rd32(&b, 44), 255, "namelen");
    assert_eq!(rd32(&b, 48), 512, "frsize");
    assert!(b[52..80].iter().all(|&x| x == 0), "padding and spare must be zero");
    assert!(b[80..].iter().all(|&x| x == 0xaa));
}

#[test]
fn open_write_lseek_out_layouts() {
    let mut b = [0xaau8; MAX_SMALL_REPLY];
    assert_eq!(open_out(&mut b, 0x1234, 0x41, 0), 16);
    assert_eq!((rd64(&b, 0), rd32(&b, 8), rd32(&b, 12)), (0x1234, 0x41, 0));

    let mut b = [0xaau8; MAX_SMALL_REPLY];
    assert_eq!(write_out(&mut b, 65536), 8);
    assert_eq!((rd32(&b, 0), rd32(&b, 4)), (65536, 0));

    let mut b = [0xaau8; MAX_SMALL_REPLY];
    assert_eq!(lseek_out(&mut b, 0x7fff_ffff_ffff), 8);
    assert_eq!(rd64(&b, 0), 0x7fff_ffff_ffff);
}

// ---------------------------------------------------------------------------------------------
// Robustness: random and mutated input

/// xorshift64*: deterministic, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
    /// Random bytes, fewer than `max`.
    fn noise(&mut self, max: usize) -> Vec<u8> {
        let n = self.below(max);
        self.bytes(n)
    }
}

/// A valid request of a random kind, with random field values.
fn random_valid(rng: &mut Rng) -> Vec<u8> {
    let unique = rng.next();
    let pick = rng.below(18);
    let f = match pick {
        0 => init_in(unique, 7, rng.below(64) as u32, rng.below(2) == 0),
        1 => req(FUSE_GETATTR, unique),
        2 => setattr_in(unique, rng.next() as u32),
        3 => open_in(unique, rng.next() as u32),
        4 => rw_in(FUSE_READ, unique, rng.next(), rng.next() as u32),
        5 => {
            let n = rng.below(300);
            let payload = rng.bytes(n);
            rw_in(FUSE_WRITE, unique, rng.next(), n as u32).bytes(&payload)
        }
        6 => flush_in(unique),
        7 => fsync_in(unique, rng.next() as u32),
        8 => fallocate_in(unique, rng.next(), rng.next(), rng.next() as u32),
        9 => lseek_in(unique, rng.next(), rng.below(6) as u32),
        10 => release_in(unique),
        11 => req(FUSE_FORGET, unique).u64(rng.next()),
        12 => req(FUSE_BATCH_FORGET, unique).u32(1).u32(0).u64(rng.next()).u64(1),
        13 => req(FUSE_LOOKUP, unique).bytes(b"x\0"),
        14 => req(FUSE_STATFS, unique),
        15 => req(FUSE_DESTROY, unique),
        16 => req(rng.next() as u32, unique).bytes(&rng.noise(64)),
        _ => req(FUSE_MKDIR, unique).u32(0o755).u32(0).bytes(b"d\0"),
    };
    f.build()
}

fn mutate(rng: &mut Rng, mut b: Vec<u8>) -> Vec<u8> {
    match rng.below(6) {
        // Keep it valid.
        0 => {}
        // Flip a few random bytes (anywhere, the length and opcode included).
        1 => {
            for _ in 0..1 + rng.below(4) {
                if !b.is_empty() {
                    let i = rng.below(b.len());
                    b[i] ^= 1 << rng.below(8);
                }
            }
        }
        // Truncate, keeping the header's len (a short read).
        2 => b.truncate(rng.below(b.len() + 1)),
        // Truncate and fix up the header's len (a short body that is consistently framed).
        3 => {
            let n = size::IN_HEADER + rng.below(b.len() - size::IN_HEADER + 1);
            b.truncate(n);
            b[..4].copy_from_slice(&(n as u32).to_ne_bytes());
        }
        // Append garbage, sometimes fixing up len.
        4 => {
            let mut extra = rng.noise(64);
            extra.push(0x5a);
            b.extend_from_slice(&extra);
            if rng.below(2) == 0 {
                let n = b.len() as u32;
                b[..4].copy_from_slice(&n.to_ne_bytes());
            }
        }
        // Pure noise, sometimes with a consistent len.
        _ => {
            b = rng.noise(200);
            if b.len() >= 4 && rng.below(2) == 0 {
                let n = b.len() as u32;
                b[..4].copy_from_slice(&n.to_ne_bytes());
            }
        }
    }
    b
}

#[test]
fn random_and_mutated_input_never_panics_and_halts_exactly_on_framing_errors() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut seen = [0usize; 3]; // ok, malformed, halt
    for i in 0..200_000 {
        let base = random_valid(&mut rng);
        let buf = mutate(&mut rng, base);
        let framing_ok = buf.len() >= size::IN_HEADER && rd32(&buf, 0) as usize == buf.len();
        match decode(&buf) {
            Ok(r) => {
                seen[0] += 1;
                assert!(framing_ok, "iteration {i}: accepted a badly framed buffer {buf:?}");
                assert_eq!(r.header.unique, rd64(&buf, 8));
                assert_eq!(r.header.opcode, rd32(&buf, 4));
                // A WRITE's claimed payload is exactly what follows fuse_write_in.
                if let Op::Write { size: n, .. } = r.op {
                    assert_eq!(buf.len(), size::WRITE_PREFIX + n as usize, "iteration {i}");
                }
            }
            Err(DecodeError::Malformed { header, errno }) => {
                seen[1] += 1;
                assert!(framing_ok, "iteration {i}: malformed instead of halt");
                assert_eq!(errno, libc::EINVAL);
                assert_eq!(header.unique, rd64(&buf, 8));
                assert_eq!(header.len as usize, buf.len());
            }
            Err(DecodeError::Halt(reason)) => {
                seen[2] += 1;
                assert!(!framing_ok, "iteration {i}: halted on a well-framed buffer {buf:?}");
                match reason {
                    HaltReason::ShortHeader { got } => {
                        assert!(buf.len() < size::IN_HEADER);
                        assert_eq!(got, buf.len());
                    }
                    HaltReason::LengthMismatch { header, got } => {
                        assert!(buf.len() >= size::IN_HEADER);
                        assert_eq!(got, buf.len());
                        assert_eq!(header, rd32(&buf, 0));
                        assert_ne!(header as usize, got);
                    }
                    HaltReason::RingLengthMismatch { .. } => panic!("{reason:?} from decode"),
                }
            }
        }
    }
    // The generator must actually reach every outcome, or the test proves little.
    assert!(seen.iter().all(|&n| n > 10_000), "outcome counts {seen:?}");
}

// INIT's flags2 and FUSE-over-io_uring delivery

#[test]
fn init_flags2_is_read_only_with_init_ext() {
    use crate::protocol::abi::init_flags::FUSE_INIT_EXT;
    let with = |flags: u32| {
        req(FUSE_INIT, 1)
            .nodeid(0)
            .u32(7)
            .u32(42)
            .u32(0x20000)
            .u32(flags)
            .u32(0x0000_0200)
            .zeros(44)
    };
    let op = with(0x8000_1021 | FUSE_INIT_EXT).decode().unwrap();
    assert_eq!(
        op,
        Op::Init {
            major: 7,
            minor: 42,
            max_readahead: 0x20000,
            flags: 0x8000_1021 | FUSE_INIT_EXT,
            flags2: 0x200
        }
    );
    let Op::Init { flags2, .. } = with(0x8000_1021).decode().unwrap() else { unreachable!() };
    assert_eq!(flags2, 0, "without INIT_EXT the upper half is not there");
    // INIT_EXT with a body that stops before flags2 (a confused kernel): no flags2.
    let short = req(FUSE_INIT, 1).nodeid(0).u32(7).u32(42).u32(0).u32(FUSE_INIT_EXT);
    let Op::Init { flags2, .. } = short.decode().unwrap() else { unreachable!() };
    assert_eq!(flags2, 0);
}

#[test]
fn init_out_carries_flags2() {
    let mut b = [0u8; MAX_SMALL_REPLY];
    let out = InitOut { flags2: 0x200, ..sample_init_out(42) };
    assert_eq!(init_out(&mut b, &out), 64);
    assert_eq!(rd32(&b, 32), 0x200, "flags2 at its offset");
    let out = InitOut { max_stack_depth: 1, ..sample_init_out(42) };
    init_out(&mut b, &out);
    assert_eq!(rd32(&b, 36), 1, "max_stack_depth after flags2");
}

#[test]
fn open_out_carries_the_backing_id() {
    let mut b = [0xaau8; MAX_SMALL_REPLY];
    assert_eq!(open_out(&mut b, 0, 0x80, 7), 16);
    assert_eq!((rd32(&b, 8), rd32(&b, 12)), (0x80, 7));
}

/// A fixture as FUSE-over-io_uring hands it over: `in_out` (128 bytes, header first), `op_in`
/// (128 bytes, the op's first `fixed` body bytes), and what the payload buffer would hold.
fn ring_parts(f: &Fixture, fixed: usize) -> ([u8; 128], [u8; 128], usize) {
    let buf = f.build();
    let mut in_out = [0xeeu8; 128];
    in_out[..size::IN_HEADER].copy_from_slice(&buf[..size::IN_HEADER]);
    let mut op_in = [0xddu8; 128];
    op_in[..fixed].copy_from_slice(&buf[size::IN_HEADER..size::IN_HEADER + fixed]);
    (in_out, op_in, buf.len() - size::IN_HEADER - fixed)
}

#[test]
fn ring_requests_decode_like_dev_fuse_ones() {
    let payload = vec![7u8; 4096];
    let cases: Vec<(Fixture, usize)> = vec![
        (rw_in(FUSE_WRITE, 21, 8192, 4096).bytes(&payload), size::WRITE_IN),
        (rw_in(FUSE_WRITE, 22, 8192, 0), size::WRITE_IN),
        (rw_in(FUSE_READ, 23, 1 << 40, 1 << 20), size::READ_IN),
        (req(FUSE_GETATTR, 24).zeros(16), 16),
        (req(FUSE_STATFS, 25), 0),
        (req(FUSE_LOOKUP, 26).bytes(b"disk.img\0"), 0),
        (setattr_in(27, 0x1f), size::SETATTR_IN),
        (fallocate_in(28, 4096, 8192, 0x3), size::FALLOCATE_IN),
        (lseek_in(29, 512, 3), size::LSEEK_IN),
        (open_in(30, 2), 8),
        (fsync_in(31, 1), size::FSYNC_IN),
    ];
    for (f, fixed) in cases {
        let (in_out, op_in, payload_len) = ring_parts(&f, fixed);
        let ring = decode_ring(&in_out, &op_in, payload_len).expect("well-formed ring request");
        let buf = f.build();
        assert_eq!(ring, decode(&buf).unwrap(), "opcode {}", f.opcode);
    }
}

#[test]
fn ring_write_payload_must_match_its_size() {
    let f = rw_in(FUSE_WRITE, 40, 0, 4096).zeros(4095);
    let (in_out, op_in, payload_len) = ring_parts(&f, size::WRITE_IN);
    assert_eq!(
        decode_ring(&in_out, &op_in, payload_len),
        Err(DecodeError::Malformed { header: f.header(40 + 40 + 4095), errno: libc::EINVAL })
    );
}

#[test]
fn ring_op_struct_cut_short_is_einval() {
    // The kernel's header length says the struct had 20 bytes: too short for fuse_read_in.
    let f = rw_in(FUSE_READ, 41, 0, 4096).truncated(20);
    let (in_out, op_in, payload_len) = ring_parts(&f, 20);
    assert_eq!(
        decode_ring(&in_out, &op_in, payload_len),
        Err(DecodeError::Malformed { header: f.header(60), errno: libc::EINVAL })
    );
}

#[test]
fn ring_lengths_that_do_not_add_up_halt() {
    let f = rw_in(FUSE_READ, 42, 0, 4096);
    let (in_out, op_in, _) = ring_parts(&f, size::READ_IN);
    // More payload than the header's length leaves room for.
    let halt = |payload: usize| {
        DecodeError::Halt(HaltReason::RingLengthMismatch { header: 80, op_room: 128, payload })
    };
    assert_eq!(decode_ring(&in_out, &op_in, 41), Err(halt(41)));
    // A header length that would put more than 128 bytes into op_in.
    let long = rw_in(FUSE_READ, 43, 0, 4096).zeros(100);
    let (in_out, op_in, _) = ring_parts(&long, 128);
    assert_eq!(
        decode_ring(&in_out, &op_in, 0),
        Err(DecodeError::Halt(HaltReason::RingLengthMismatch {
            header: 180,
            op_room: 128,
            payload: 0
        }))
    );
    // An in_out area shorter than a header.
    assert_eq!(
        decode_ring(&in_out[..39], &op_in, 0),
        Err(DecodeError::Halt(HaltReason::ShortHeader { got: 39 }))
    );
    let msg = HaltReason::RingLengthMismatch { header: 80, op_room: 128, payload: 41 }.to_string();
    assert!(msg.contains("80") && msg.contains("41") && msg.contains("io_uring"), "{msg}");
}
