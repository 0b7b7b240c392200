//! A fault-injecting wrapper for reliability tests (never for production): fails the requests
//! that touch chosen byte ranges with a chosen errno (EIO, ENOSPC, ...) and delays every request
//! by a fixed latency, on top of any other backend.
//!
//! Spec syntax (what `BLOCKFUSE_FAULTS` holds, see docs/reliability.md), comma-separated items:
//! - `eio@START-END`, `enospc@START-END`, `edquot@...`, `erofs@...`: reads and writes that overlap
//!   the byte range `[START, END)` fail with that errno; `...:r` only reads, `...:w` only writes
//!   (WRITE and the zeroing/punching of FALLOCATE). Sizes take K/M/G/T suffixes (binary).
//! - `flush=eio` (or another errno): every FLUSH/FSYNC fails.
//! - `delay=5ms` (`us`, `ms`, `s`): every backend request completes that much later. The wait
//!   happens on a timer thread, so a delayed request never blocks its queue's intake.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::{Backend, BlockBackend, Extent};

/// Which requests a rule applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultOps {
    Read,
    Write,
    ReadWrite,
}

impl FaultOps {
    fn reads(self) -> bool {
        self != FaultOps::Write
    }
    fn writes(self) -> bool {
        self != FaultOps::Read
    }
}

/// Requests overlapping `[start, end)` fail with `errno`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaultRule {
    pub errno: i32,
    pub start: u64,
    pub end: u64,
    pub ops: FaultOps,
}

/// A parsed fault specification.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FaultSpec {
    pub rules: Vec<FaultRule>,
    /// Errno for every flush, if set.
    pub flush: Option<i32>,
    /// Added to every request.
    pub delay: Duration,
}

const ERRNOS: [(&str, i32); 5] = [
    ("eio", libc::EIO),
    ("enospc", libc::ENOSPC),
    ("edquot", libc::EDQUOT),
    ("erofs", libc::EROFS),
    ("eacces", libc::EACCES),
];

fn errno_named(name: &str) -> Result<i32, String> {
    ERRNOS.iter().find(|(n, _)| name.eq_ignore_ascii_case(n)).map(|&(_, e)| e).ok_or_else(|| {
        let known: Vec<_> = ERRNOS.iter().map(|(n, _)| *n).collect();
        format!("unknown errno {name:?} (known: {})", known.join(", "))
    })
}

fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (digits, shift) = match s.as_bytes().last().map(u8::to_ascii_uppercase) {
        Some(b'K') => (&s[..s.len() - 1], 10),
        Some(b'M') => (&s[..s.len() - 1], 20),
        Some(b'G') => (&s[..s.len() - 1], 30),
        Some(b'T') => (&s[..s.len() - 1], 40),
        _ => (s, 0),
    };
    let n: u64 = digits.parse().map_err(|_| format!("bad size {s:?}"))?;
    n.checked_mul(1 << shift).ok_or_else(|| format!("size {s:?} is too large"))
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let n: u64 = s[..split].parse().map_err(|_| format!("bad duration {s:?}"))?;
    match &s[split..] {
        "us" => Ok(Duration::from_micros(n)),
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        _ => Err(format!("bad duration {s:?} (use us, ms or s)")),
    }
}

impl FaultSpec {
    /// Parses `eio@0-4096,enospc@1M-2M:w,flush=eio,delay=5ms`.
    pub fn parse(spec: &str) -> Result<FaultSpec, String> {
        let mut out = FaultSpec::default();
        for item in spec.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            if let Some(d) = item.strip_prefix("delay=") {
                out.delay = parse_duration(d)?;
            } else if let Some(e) = item.strip_prefix("flush=") {
                out.flush = Some(errno_named(e)?);
            } else if let Some((name, rest)) = item.split_once('@') {
                let (range, ops) = match rest.split_once(':') {
                    None => (rest, FaultOps::ReadWrite),
                    Some((r, "r")) => (r, FaultOps::Read),
                    Some((r, "w")) => (r, FaultOps::Write),
                    Some((r, "rw")) => (r, FaultOps::ReadWrite),
                    Some((_, o)) => return Err(format!("bad ops {o:?} in {item:?} (r, w or rw)")),
                };
                let (start, end) = range
                    .split_once('-')
                    .ok_or_else(|| format!("bad range in {item:?} (START-END)"))?;
                let (start, end) = (parse_size(start)?, parse_size(end)?);
                if start >= end {
                    return Err(format!("empty range in {item:?}"));
                }
                out.rules.push(FaultRule { errno: errno_named(name)?, start, end, ops });
            } else {
                return Err(format!("bad fault item {item:?}"));
            }
        }
        Ok(out)
    }

    fn errno_for(&self, offset: u64, len: u64, write: bool) -> Option<i32> {
        let end = offset.saturating_add(len.max(1));
        self.rules
            .iter()
            .filter(|r| if write { r.ops.writes() } else { r.ops.reads() })
            .find(|r| offset < r.end && r.start < end)
            .map(|r| r.errno)
    }
}

/// Completes each delay on one thread: with a constant delay, deadlines arrive in order, so the
/// thread only ever sleeps until the oldest one.
struct Timer {
    tx: mpsc::Sender<(Instant, tokio::sync::oneshot::Sender<()>)>,
}

impl Timer {
    fn start() -> io::Result<Timer> {
        let (tx, rx) = mpsc::channel::<(Instant, tokio::sync::oneshot::Sender<()>)>();
        std::thread::Builder::new().name("blockfuse-fault-timer".into()).spawn(move || {
            // Ends when the backend (the only sender) is dropped.
            for (deadline, done) in rx {
                let now = Instant::now();
                if deadline > now {
                    std::thread::sleep(deadline - now);
                }
                let _ = done.send(());
            }
        })?;
        Ok(Timer { tx })
    }

    async fn sleep(&self, d: Duration) {
        let (done, wait) = tokio::sync::oneshot::channel();
        if self.tx.send((Instant::now() + d, done)).is_ok() {
            let _ = wait.await;
        }
    }
}

pub struct FaultBackend {
    inner: Box<Backend>,
    spec: FaultSpec,
    timer: Option<Timer>,
    injected: AtomicU64,
}

type Io<'a, T> = Pin<Box<dyn Future<Output = io::Result<T>> + 'a>>;

impl FaultBackend {
    pub fn new(inner: Backend, spec: FaultSpec) -> io::Result<FaultBackend> {
        let timer = if spec.delay.is_zero() { None } else { Some(Timer::start()?) };
        Ok(FaultBackend { inner: Box::new(inner), spec, timer, injected: AtomicU64::new(0) })
    }

    pub fn inner(&self) -> &Backend {
        &self.inner
    }

    /// Requests failed on purpose so far.
    pub fn injected(&self) -> u64 {
        self.injected.load(Ordering::Relaxed)
    }

    async fn delay(&self) {
        if let Some(t) = &self.timer {
            t.sleep(self.spec.delay).await;
        }
    }

    fn fail(&self, errno: i32) -> io::Error {
        self.injected.fetch_add(1, Ordering::Relaxed);
        io::Error::from_raw_os_error(errno)
    }

    async fn check(&self, offset: u64, len: u64, write: bool) -> io::Result<()> {
        self.delay().await;
        match self.spec.errno_for(offset, len, write) {
            Some(errno) => Err(self.fail(errno)),
            None => Ok(()),
        }
    }

    // The inner backend's futures are boxed: `Backend` contains this type, so awaiting its
    // future directly would make the future type contain itself.
    fn inner_read<'a>(&'a self, buf: &'a mut [u8], offset: u64) -> Io<'a, ()> {
        Box::pin(self.inner.read_at(buf, offset))
    }
    fn inner_write<'a>(&'a self, buf: &'a [u8], offset: u64) -> Io<'a, ()> {
        Box::pin(self.inner.write_at(buf, offset))
    }
    fn inner_flush(&self) -> Io<'_, ()> {
        Box::pin(self.inner.flush())
    }
    fn inner_truncate(&self, new_len: u64, preallocate: bool) -> Io<'_, ()> {
        Box::pin(self.inner.truncate(new_len, preallocate))
    }
    fn inner_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Io<'_, ()> {
        Box::pin(self.inner.write_zeroes(offset, len, unmap))
    }
    fn inner_extent(&self, offset: u64) -> Io<'_, Extent> {
        Box::pin(self.inner.extent_at(offset))
    }
}

impl BlockBackend for FaultBackend {
    fn len(&self) -> u64 {
        self.inner.len()
    }
    fn alignment(&self) -> u32 {
        self.inner.alignment()
    }
    fn optimal_transfer(&self) -> u32 {
        self.inner.optimal_transfer()
    }
    fn allocated_bytes(&self) -> Option<u64> {
        self.inner.allocated_bytes()
    }
    async fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.check(offset, buf.len() as u64, false).await?;
        self.inner_read(buf, offset).await
    }
    async fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.check(offset, buf.len() as u64, true).await?;
        self.inner_write(buf, offset).await
    }
    async fn flush(&self) -> io::Result<()> {
        self.delay().await;
        if let Some(errno) = self.spec.flush {
            return Err(self.fail(errno));
        }
        self.inner_flush().await
    }
    async fn truncate(&self, new_len: u64, preallocate: bool) -> io::Result<()> {
        self.delay().await;
        self.inner_truncate(new_len, preallocate).await
    }
    async fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        self.check(offset, len, true).await?;
        self.inner_zeroes(offset, len, unmap).await
    }
    async fn extent_at(&self, offset: u64) -> io::Result<Extent> {
        self.inner_extent(offset).await
    }
    fn can_unmap(&self) -> bool {
        self.inner.can_unmap()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::MemoryBackend;

    fn block_on<F: Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(f)
    }

    #[test]
    fn parses_the_documented_syntax() {
        let s = FaultSpec::parse("eio@0-4096, enospc@1M-2M:w,edquot@4k-8K:r,flush=eio,delay=5ms")
            .unwrap();
        assert_eq!(
            s.rules,
            vec![
                FaultRule { errno: libc::EIO, start: 0, end: 4096, ops: FaultOps::ReadWrite },
                FaultRule {
                    errno: libc::ENOSPC,
                    start: 1 << 20,
                    end: 2 << 20,
                    ops: FaultOps::Write
                },
                FaultRule { errno: libc::EDQUOT, start: 4096, end: 8192, ops: FaultOps::Read },
            ]
        );
        assert_eq!(s.flush, Some(libc::EIO));
        assert_eq!(s.delay, Duration::from_millis(5));
        assert_eq!(FaultSpec::parse("").unwrap(), FaultSpec::default());
        assert_eq!(FaultSpec::parse("delay=250us").unwrap().delay, Duration::from_micros(250));
    }

    #[test]
    fn rejects_what_it_cannot_mean() {
        for bad in [
            "eio",
            "eio@5",
            "eio@5-5",
            "eio@9-1",
            "ebadness@0-1",
            "eio@0-1:x",
            "delay=5",
            "delay=fast",
            "eio@0-99999999999999999999T",
            "flush=nope",
            "what=ever",
        ] {
            assert!(FaultSpec::parse(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn only_overlapping_requests_of_the_right_kind_fail() {
        let spec = FaultSpec::parse("eio@4096-8192,enospc@16K-20K:w").unwrap();
        let b = FaultBackend::new(Backend::Memory(MemoryBackend::new(vec![7; 32 << 10])), spec)
            .unwrap();
        let mut buf = [0u8; 4096];
        let errno = |r: io::Result<()>| r.err().and_then(|e| e.raw_os_error());
        block_on(async {
            assert_eq!(errno(b.read_at(&mut buf, 0).await), None);
            assert_eq!(errno(b.read_at(&mut buf, 1).await), Some(libc::EIO));
            assert_eq!(errno(b.read_at(&mut buf, 8191).await), Some(libc::EIO));
            assert_eq!(errno(b.read_at(&mut buf, 8192).await), None);
            assert_eq!(errno(b.write_at(&buf, 4096).await), Some(libc::EIO));
            assert_eq!(errno(b.read_at(&mut buf, 16 << 10).await), None, "write-only rule");
            assert_eq!(errno(b.write_at(&buf, 15 << 10).await), Some(libc::ENOSPC));
            assert_eq!(errno(b.write_zeroes(19 << 10, 100, false).await), Some(libc::ENOSPC));
            assert_eq!(errno(b.write_at(&buf, 20 << 10).await), None);
            assert_eq!(errno(b.flush().await), None);
        });
        assert_eq!(b.injected(), 5);
        // Failed writes changed nothing; the rest went through.
        let Backend::Memory(m) = b.inner() else { unreachable!() };
        let snap = m.snapshot();
        assert!(snap[4096..8192].iter().all(|&x| x == 7));
        assert!(snap[15 << 10..19 << 10].iter().all(|&x| x == 7));
    }

    #[test]
    fn flush_faults_and_delays() {
        let spec = FaultSpec::parse("flush=enospc,delay=30ms").unwrap();
        let b =
            FaultBackend::new(Backend::Memory(MemoryBackend::new(vec![0; 4096])), spec).unwrap();
        let started = Instant::now();
        let r = block_on(b.flush());
        assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::ENOSPC));
        let mut buf = [0u8; 16];
        block_on(b.read_at(&mut buf, 0)).unwrap();
        assert!(started.elapsed() >= Duration::from_millis(60), "{:?}", started.elapsed());
    }
}
