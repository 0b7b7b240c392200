//! Hot-path micro-benchmark: one request's decode + dispatch (`Export::handle`) + reply header
//! encode, without FUSE or the kernel, so per-request regressions show up on their own.
//! Run: `cargo bench -p blockfuse-core --bench hot_path`; criterion's time is ns per request.

use std::future::Future;
use std::hint::black_box;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use blockfuse_core::backend::{Backend, MemoryBackend, NullBackend};
use blockfuse_core::export::{Export, ExportOptions, Outcome};
use blockfuse_core::protocol::abi::{opcode, size};
use blockfuse_core::protocol::decode::{decode, DecodeError};
use blockfuse_core::protocol::encode::{out_header, MAX_SMALL_REPLY};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

const IMAGE: u64 = 64 << 20;
const IO: u32 = 4096;

/// Drives a future that never waits on I/O (null and memory backends complete on first poll).
fn run<F: Future>(f: F) -> F::Output {
    let mut f = pin!(f);
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
    }
}

fn header(buf: &mut Vec<u8>, len: usize, opcode: u32, unique: u64) {
    buf.extend_from_slice(&(len as u32).to_ne_bytes());
    buf.extend_from_slice(&opcode.to_ne_bytes());
    buf.extend_from_slice(&unique.to_ne_bytes());
    buf.extend_from_slice(&1u64.to_ne_bytes()); // nodeid: the root, our only inode
    buf.extend_from_slice(&[0u8; 12]); // uid, gid, pid
    buf.extend_from_slice(&[0u8; 4]); // total_extlen, padding
}

/// `fuse_read_in` / `fuse_write_in` share their first fields: fh, offset, size.
fn rw_body(buf: &mut Vec<u8>, offset: u64, len: u32) {
    buf.extend_from_slice(&0u64.to_ne_bytes()); // fh
    buf.extend_from_slice(&offset.to_ne_bytes());
    buf.extend_from_slice(&len.to_ne_bytes());
    buf.extend_from_slice(&[0u8; 20]); // read_flags/write_flags, lock_owner, flags, padding
}

fn read_request(offset: u64) -> Vec<u8> {
    let len = size::IN_HEADER + size::READ_IN;
    let mut b = Vec::with_capacity(len);
    header(&mut b, len, opcode::FUSE_READ, 7);
    rw_body(&mut b, offset, IO);
    b
}

fn write_request(offset: u64) -> Vec<u8> {
    let len = size::WRITE_PREFIX + IO as usize;
    let mut b = Vec::with_capacity(len);
    header(&mut b, len, opcode::FUSE_WRITE, 8);
    rw_body(&mut b, offset, IO);
    b.resize(len, 0xa5);
    b
}

fn getattr_request() -> Vec<u8> {
    let len = size::IN_HEADER + 16; // fuse_getattr_in
    let mut b = Vec::with_capacity(len);
    header(&mut b, len, opcode::FUSE_GETATTR, 9);
    b.extend_from_slice(&[0u8; 16]);
    b
}

fn export(backend: Backend) -> Export {
    let opts = ExportOptions {
        writable: true,
        growable: false,
        allow_other: false,
        writethrough: false,
        max_read: 1 << 20,
    };
    Export::new(backend, opts, 0, 0)
}

/// The per-queue buffers the transport reuses across requests.
struct Buffers {
    small: [u8; MAX_SMALL_REPLY],
    data: Vec<u8>,
    out: [u8; size::OUT_HEADER],
}

/// What the transport does between one `/dev/fuse` read and the `writev` of the reply.
fn one_request(exp: &Export, req: &[u8], bufs: &mut Buffers) -> usize {
    let r = match decode(req) {
        Ok(r) => r,
        Err(DecodeError::Malformed { .. } | DecodeError::Halt(_)) => unreachable!("bad fixture"),
    };
    // A WRITE's payload follows `fuse_write_in` in the receive buffer; the transport hands that
    // region to the handler as the data buffer.
    let data: &mut [u8] = if r.header.opcode == opcode::FUSE_WRITE {
        &mut bufs.data[..IO as usize]
    } else {
        &mut bufs.data
    };
    let outcome = run(exp.handle(r.header.opcode, r.op, &mut bufs.small, data));
    let (body, error) = match outcome {
        Outcome::NoReply => return 0,
        Outcome::Error(e) => (0, -e),
        Outcome::Small(n) | Outcome::Data(n) => (n, 0),
    };
    let len = size::OUT_HEADER + body;
    out_header(&mut bufs.out, len as u32, error, r.header.unique);
    len
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("hot_path");
    g.throughput(Throughput::Elements(1));
    let backends = [
        ("null", Backend::Null(NullBackend::new(IMAGE))),
        ("memory", Backend::Memory(MemoryBackend::new(vec![0u8; IMAGE as usize]))),
    ];
    for (name, backend) in backends {
        let exp = export(backend);
        let mut bufs = Buffers {
            small: [0; MAX_SMALL_REPLY],
            data: vec![0; 1 << 20],
            out: [0; size::OUT_HEADER],
        };
        let cases = [
            ("read4k", read_request(1 << 20)),
            ("write4k", write_request(2 << 20)),
            ("getattr", getattr_request()),
        ];
        for (op, req) in &cases {
            g.bench_with_input(BenchmarkId::new(name, op), req, |b, req| {
                b.iter(|| one_request(&exp, black_box(req), &mut bufs))
            });
        }
    }
    g.bench_function("decode_only/read4k", |b| {
        let req = read_request(1 << 20);
        b.iter(|| decode(black_box(&req)).map(|r| r.header.unique).unwrap_or(0))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
