//! The NBD backend: a disk on an NBD server (qemu-nbd, qemu-storage-daemon, nbdkit, ...). The
//! export's requests become NBD commands: READ/WRITE split at the server's maximum block size,
//! FLUSH, WRITE_ZEROES for FALLOCATE, BLOCK_STATUS (`base:allocation`) for SEEK_DATA/SEEK_HOLE,
//! FUA for writethrough. With CAN_MULTI_CONN each queue thread gets a connection of its own, else
//! all share one.
//!
//! A connection that breaks is replaced by a reconnect thread; requests wait for it up to
//! `reconnect_delay`, then fail with EIO (the export stays up and serves again once the server is
//! back). A request is retried on the new connection only if it got no answer, so a write is
//! acknowledged only when a server confirmed it. Acknowledged writes not yet flushed when a
//! connection broke may be lost with the server's cache: the next flush reports EIO.
//!
//! A server that stays connected but stops answering (or a network that silently drops) is
//! caught by a watchdog thread: a request without an answer for `request_timeout` breaks its
//! connection, which then goes the reconnect way above. A request is retried on new
//! connections only until `reconnect_delay` after the first break it saw, so a server that
//! accepts connections but never answers cannot keep it waiting either.

pub mod conn;
pub mod handshake;
pub mod proto;
mod storage;
pub mod uri;

use std::future::poll_fn;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use self::conn::{Conn, Failure};
use self::handshake::{ConnectError, Target};
use self::proto::{Answer, Command, Expect, ExportInfo};
use super::{BlockBackend, Extent};

pub use self::handshake::TlsFiles;
pub use self::storage::NbdStorage;
pub use self::uri::NbdUri;

/// How to reach and use the server.
#[derive(Debug, Clone)]
pub struct NbdOptions {
    pub uri: NbdUri,
    pub tls: TlsFiles,
    pub writable: bool,
    /// Writes carry FUA (when the server has it), so flushing after them costs nothing.
    pub writethrough: bool,
    /// Connect and handshake time limit.
    pub connect_timeout: Duration,
    /// How long requests wait for a broken connection to come back before failing with EIO.
    pub reconnect_delay: Duration,
    /// A request without an answer for this long breaks its connection; zero: never.
    pub request_timeout: Duration,
    /// Connections to open when the server allows several (one per queue thread).
    pub connections: usize,
}

/// How to reach NBD servers besides the URI: for the export's source, and for an NBD export
/// that an image names as its backing file (a qcow2 overlay over an NBD source).
#[derive(Debug, Clone)]
pub struct NbdSettings {
    pub tls: TlsFiles,
    pub connect_timeout: Duration,
    pub reconnect_delay: Duration,
    pub request_timeout: Duration,
    /// Connections to open when the server allows several (one per queue thread).
    pub connections: usize,
}

impl Default for NbdSettings {
    fn default() -> Self {
        NbdSettings {
            tls: TlsFiles::default(),
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            reconnect_delay: DEFAULT_RECONNECT_DELAY,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            connections: 1,
        }
    }
}

impl NbdSettings {
    /// Options for a read-only connection to `uri` with these settings.
    pub fn read_only(&self, uri: NbdUri) -> NbdOptions {
        NbdOptions {
            uri,
            tls: self.tls.clone(),
            writable: false,
            writethrough: false,
            connect_timeout: self.connect_timeout,
            reconnect_delay: self.reconnect_delay,
            request_timeout: self.request_timeout,
            connections: self.connections,
        }
    }
}

impl OpenError {
    /// The stable code of the refusal (`NBD_CONNECT_FAILED`, ...) and its message.
    pub fn code_and_message(self) -> (&'static str, String) {
        match self {
            OpenError::ReadOnly(m) => ("NBD_READ_ONLY", m),
            OpenError::Connect(ConnectError::Unreachable(m)) => ("NBD_CONNECT_FAILED", m),
            OpenError::Connect(ConnectError::UnknownExport(m)) => ("NBD_EXPORT_NOT_FOUND", m),
            OpenError::Connect(ConnectError::Tls(m)) => ("NBD_TLS_FAILED", m),
            OpenError::Connect(ConnectError::Handshake(m)) => ("NBD_HANDSHAKE_FAILED", m),
        }
    }
}

/// The default of [`NbdOptions::connect_timeout`].
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The default of [`NbdOptions::reconnect_delay`].
pub const DEFAULT_RECONNECT_DELAY: Duration = Duration::from_secs(10);
/// The default of [`NbdOptions::request_timeout`] (as the Linux kernel's NBD client).
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Why the backend could not be opened; maps to an error code.
#[derive(Debug)]
pub enum OpenError {
    Connect(ConnectError),
    /// A writable export of a read-only server.
    ReadOnly(String),
}

/// Longest WRITE_ZEROES or BLOCK_STATUS request (lengths are 32-bit).
const MAX_RANGE: u64 = 1 << 30;
/// Zeros written when the server cannot zero by itself.
static ZEROS: [u8; 64 << 10] = [0; 64 << 10];

enum State {
    Up(Arc<Conn>),
    /// Broken at `since`; the reconnect thread is at work. `failed`: the window is over and
    /// requests fail at once until it succeeds.
    Down {
        since: Instant,
        failed: bool,
        waiters: Vec<Waker>,
    },
    Closed,
}

/// One connection slot and its replacement logic.
struct Channel {
    state: Mutex<State>,
}

struct Shared {
    target: Target,
    info: ExportInfo,
    reconnect_delay: Duration,
    request_timeout: Duration,
    channels: Vec<Channel>,
    /// Writes acknowledged without FUA, and how many of them a completed flush covered.
    acked: AtomicU64,
    flushed: AtomicU64,
    /// Acknowledged writes may have been lost with a connection: the next flush fails.
    lost_writes: AtomicBool,
}

pub struct NbdBackend {
    shared: Arc<Shared>,
    fua: bool,
    writable: bool,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn eio() -> io::Error {
    io::Error::from_raw_os_error(libc::EIO)
}

thread_local! {
    /// This thread's number, which picks its channel.
    static THREAD_SEQ: usize = {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        NEXT.fetch_add(1, Ordering::Relaxed)
    };
}

impl NbdBackend {
    /// Connects (all connections when the server allows several) and checks the export.
    pub fn open(opts: &NbdOptions) -> Result<Self, OpenError> {
        let target = Target::new(opts.uri.clone(), &opts.tls, opts.connect_timeout)
            .map_err(OpenError::Connect)?;
        let first = handshake::connect(&target).map_err(OpenError::Connect)?;
        let info = first.info;
        if opts.writable && info.flags & proto::TFLAG_READ_ONLY != 0 {
            return Err(OpenError::ReadOnly(format!(
                "the NBD export {} is read-only; export it without writable",
                opts.uri
            )));
        }
        let mut conns = vec![Arc::new(Conn::new(first))];
        if info.flags & proto::TFLAG_CAN_MULTI_CONN != 0 {
            for _ in 1..opts.connections.max(1) {
                let n = handshake::connect(&target).map_err(OpenError::Connect)?;
                conns.push(Arc::new(Conn::new(n)));
            }
        }
        let channels =
            conns.into_iter().map(|c| Channel { state: Mutex::new(State::Up(c)) }).collect();
        let shared = Arc::new(Shared {
            target,
            info,
            reconnect_delay: opts.reconnect_delay,
            request_timeout: opts.request_timeout,
            channels,
            acked: AtomicU64::new(0),
            flushed: AtomicU64::new(0),
            lost_writes: AtomicBool::new(false),
        });
        if !opts.request_timeout.is_zero() {
            let weak = Arc::downgrade(&shared);
            std::thread::Builder::new()
                .name("blockfuse-nbd-watchdog".into())
                .spawn(move || watchdog(weak))
                .map_err(|e| {
                    OpenError::Connect(ConnectError::Handshake(format!(
                        "cannot start the NBD request watchdog thread: {e}"
                    )))
                })?;
        }
        let fua = opts.writethrough && info.flags & proto::TFLAG_SEND_FUA != 0;
        Ok(NbdBackend { shared, fua, writable: opts.writable })
    }

    /// Connections in use (1, or one per queue with CAN_MULTI_CONN).
    pub fn connections(&self) -> usize {
        self.shared.channels.len()
    }

    pub fn info(&self) -> ExportInfo {
        self.shared.info
    }

    fn has(&self, flag: u16) -> bool {
        self.shared.info.flags & flag != 0
    }

    fn channel(&self) -> usize {
        THREAD_SEQ.with(|s| *s) % self.shared.channels.len()
    }

    /// The channel's connection, waiting for a reconnect if it is down.
    async fn conn(&self, ch: usize) -> io::Result<Arc<Conn>> {
        let channel = &self.shared.channels[ch];
        poll_fn(|cx| {
            let mut st = lock(&channel.state);
            match &mut *st {
                State::Up(c) => Poll::Ready(Ok(c.clone())),
                State::Down { failed: true, .. } | State::Closed => Poll::Ready(Err(eio())),
                State::Down { waiters, .. } => {
                    if !waiters.iter().any(|w| w.will_wake(cx.waker())) {
                        waiters.push(cx.waker().clone());
                    }
                    Poll::Pending
                }
            }
        })
        .await
    }

    /// Sends one command (retrying on a new connection while the reconnect window lasts) and
    /// returns the server's answer; NBD errors become errnos.
    async fn call(
        &self,
        c: Command,
        payload: &[u8],
        expect: Expect,
        buf: &mut [u8],
    ) -> io::Result<Answer> {
        let ch = self.channel();
        // When this request first saw its connection break: it is retried on new connections
        // only within the reconnect window from then.
        let mut first_break: Option<Instant> = None;
        loop {
            let conn = self.conn(ch).await?;
            let expect = match expect {
                Expect::BlockStatus { .. } => match conn.allocation {
                    Some(context) => Expect::BlockStatus { context },
                    // No base:allocation on this connection: everything is data.
                    None => return Ok(Answer::Ok),
                },
                e => e,
            };
            match conn.call(c, payload, expect, buf).await {
                Ok(Answer::Error(e)) => return Err(io::Error::from_raw_os_error(proto::errno(e))),
                Ok(a) => return Ok(a),
                Err(Failure::Broken) => {
                    Shared::connection_lost(&self.shared, ch, &conn);
                    let since = *first_break.get_or_insert_with(Instant::now);
                    if since.elapsed() >= self.shared.reconnect_delay {
                        return Err(eio());
                    }
                }
                Err(Failure::Protocol(e)) => {
                    Shared::connection_lost(&self.shared, ch, &conn);
                    log::warn!("NBD request failed: {e}");
                    return Err(eio());
                }
            }
        }
    }

    fn max_io(&self) -> usize {
        let info = &self.shared.info;
        (info.max_block as usize).clamp(info.min_block.max(512) as usize, 32 << 20)
    }

    async fn write_piece(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let flags = if self.fua { proto::CMD_FLAG_FUA } else { 0 };
        let len = buf.len() as u32;
        let c = Command { flags, cmd: proto::CMD_WRITE, offset, len };
        self.call(c, buf, Expect::Plain, &mut []).await?;
        self.acknowledged(flags);
        Ok(())
    }

    /// Counts an acknowledged write that a flush still has to cover.
    fn acknowledged(&self, flags: u16) {
        if flags & proto::CMD_FLAG_FUA == 0 {
            self.shared.acked.fetch_add(1, Ordering::AcqRel);
        }
    }

    fn check_aligned(&self, offset: u64, len: u64) -> io::Result<()> {
        let min = self.shared.info.min_block as u64;
        if !offset.is_multiple_of(min) || !len.is_multiple_of(min) {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        Ok(())
    }

    /// Closes every connection politely (NBD_CMD_DISC).
    pub fn close(&self) {
        for ch in &self.shared.channels {
            let old = std::mem::replace(&mut *lock(&ch.state), State::Closed);
            match old {
                State::Up(c) => c.disconnect(),
                State::Down { waiters, .. } => waiters.into_iter().for_each(Waker::wake),
                State::Closed => {}
            }
        }
    }
}

impl Drop for NbdBackend {
    fn drop(&mut self) {
        self.close();
    }
}

impl Shared {
    /// `conn` (channel `ch`'s) broke: take it down and start reconnecting.
    fn connection_lost(this: &Arc<Shared>, ch: usize, conn: &Arc<Conn>) {
        conn.fail("connection lost");
        {
            let mut st = lock(&this.channels[ch].state);
            match &*st {
                State::Up(c) if Arc::ptr_eq(c, conn) => {}
                // Already replaced or closed.
                _ => return,
            }
            *st = State::Down { since: Instant::now(), failed: false, waiters: Vec::new() };
        }
        if this.acked.load(Ordering::Acquire) > this.flushed.load(Ordering::Acquire) {
            this.lost_writes.store(true, Ordering::Release);
        }
        let weak = Arc::downgrade(this);
        let spawned = std::thread::Builder::new()
            .name("blockfuse-nbd-reconnect".into())
            .spawn(move || reconnect(weak, ch));
        if let Err(e) = spawned {
            log::error!("cannot start the NBD reconnect thread: {e}");
            let mut st = lock(&this.channels[ch].state);
            if let State::Down { failed, waiters, .. } = &mut *st {
                *failed = true;
                waiters.drain(..).for_each(Waker::wake);
            }
        }
    }
}

/// The reconnect thread of channel `ch`: tries until it succeeds or the backend is gone; once
/// the window is over, waiting requests fail with EIO and new ones fail at once.
fn reconnect(weak: Weak<Shared>, ch: usize) {
    let mut pause = Duration::from_millis(100);
    loop {
        let Some(shared) = weak.upgrade() else { return };
        let since = match &*lock(&shared.channels[ch].state) {
            State::Down { since, .. } => *since,
            _ => return,
        };
        match handshake::connect(&shared.target) {
            Ok(n) if compatible(&shared.info, &n.info) => {
                let conn = Arc::new(Conn::new(n));
                let mut st = lock(&shared.channels[ch].state);
                match std::mem::replace(&mut *st, State::Up(conn.clone())) {
                    State::Down { waiters, .. } => {
                        drop(st);
                        log::warn!("NBD connection to {} is back", shared.target.uri);
                        waiters.into_iter().for_each(Waker::wake);
                    }
                    other => {
                        // Closed meanwhile.
                        *st = other;
                        drop(st);
                        conn.disconnect();
                    }
                }
                return;
            }
            Ok(n) => {
                log::warn!(
                    "NBD server at {} came back with a different export (size {} flags {:#x}); \
                     not using it",
                    shared.target.uri,
                    n.info.size,
                    n.info.flags
                );
                Conn::new(n).disconnect();
            }
            Err(e) => log::debug!("NBD reconnect failed: {e}"),
        }
        let deadline = since + shared.reconnect_delay;
        let now = Instant::now();
        if now >= deadline {
            let mut st = lock(&shared.channels[ch].state);
            if let State::Down { failed, waiters, .. } = &mut *st {
                if !*failed {
                    log::warn!(
                        "NBD server at {} unreachable for {:?}: failing requests until it is back",
                        shared.target.uri,
                        shared.reconnect_delay
                    );
                }
                *failed = true;
                waiters.drain(..).for_each(Waker::wake);
            }
        }
        drop(shared);
        let wait = if now < deadline { pause.min(deadline - now) } else { pause };
        std::thread::sleep(wait.max(Duration::from_millis(10)));
        pause = (pause * 2).min(Duration::from_secs(1));
    }
}

/// The request watchdog: every quarter of the timeout (at most a second), a connection whose
/// oldest request has waited longer than `request_timeout` is treated as broken. Ends with the
/// backend.
fn watchdog(weak: Weak<Shared>) {
    loop {
        let Some(shared) = weak.upgrade() else { return };
        let timeout = shared.request_timeout;
        let mut open = false;
        for (ch, channel) in shared.channels.iter().enumerate() {
            let conn = match &*lock(&channel.state) {
                State::Up(c) => c.clone(),
                State::Down { .. } => {
                    open = true;
                    continue;
                }
                State::Closed => continue,
            };
            open = true;
            if conn.oldest_request().is_some_and(|sent| sent.elapsed() >= timeout) {
                log::warn!(
                    "NBD server at {} did not answer a request within {timeout:?}",
                    shared.target.uri
                );
                Shared::connection_lost(&shared, ch, &conn);
            }
        }
        drop(shared);
        if !open {
            return;
        }
        std::thread::sleep((timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(1)));
    }
}

/// Whether a reconnected export can stand in for the one the export was opened with.
fn compatible(old: &ExportInfo, new: &ExportInfo) -> bool {
    let keep = proto::TFLAG_READ_ONLY | proto::TFLAG_CAN_MULTI_CONN;
    old.size == new.size
        && (old.flags & keep) == (new.flags & keep)
        && new.min_block <= old.min_block
        && new.max_block >= old.max_block.min(1 << 20)
}

impl BlockBackend for NbdBackend {
    fn len(&self) -> u64 {
        self.shared.info.size
    }
    fn alignment(&self) -> u32 {
        self.shared.info.min_block
    }
    fn optimal_transfer(&self) -> u32 {
        self.shared.info.pref_block.clamp(4096, 1 << 20)
    }
    fn allocated_bytes(&self) -> Option<u64> {
        None
    }
    async fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.check_aligned(offset, buf.len() as u64)?;
        let max = self.max_io();
        let mut done = 0;
        while done < buf.len() {
            let n = (buf.len() - done).min(max);
            let off = offset + done as u64;
            let expect = Expect::Read { offset: off, len: n as u32 };
            let piece = &mut buf[done..done + n];
            let c = Command { flags: 0, cmd: proto::CMD_READ, offset: off, len: n as u32 };
            self.call(c, &[], expect, piece).await?;
            done += n;
        }
        Ok(())
    }
    async fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if !self.writable {
            return Err(io::Error::from_raw_os_error(libc::EROFS));
        }
        self.check_aligned(offset, buf.len() as u64)?;
        for (i, piece) in buf.chunks(self.max_io()).enumerate() {
            self.write_piece(piece, offset + (i * self.max_io()) as u64).await?;
        }
        Ok(())
    }
    async fn flush(&self) -> io::Result<()> {
        if !self.writable {
            return Ok(());
        }
        if self.shared.lost_writes.swap(false, Ordering::AcqRel) {
            log::warn!("NBD flush fails: acknowledged writes may have been lost with a connection");
            return Err(eio());
        }
        let covered = self.shared.acked.load(Ordering::Acquire);
        if covered == self.shared.flushed.load(Ordering::Acquire) {
            // Nothing acknowledged since the last flush (or every write had FUA).
            return Ok(());
        }
        if self.has(proto::TFLAG_SEND_FLUSH) {
            let c = Command { flags: 0, cmd: proto::CMD_FLUSH, offset: 0, len: 0 };
            self.call(c, &[], Expect::Plain, &mut []).await?;
        }
        if self.shared.lost_writes.swap(false, Ordering::AcqRel) {
            return Err(eio());
        }
        self.shared.flushed.fetch_max(covered, Ordering::AcqRel);
        Ok(())
    }
    async fn truncate(&self, _new_len: u64, _preallocate: bool) -> io::Result<()> {
        // NBD exports have a fixed size (NBD_CMD_RESIZE is not widely served).
        Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP))
    }
    async fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        if !self.writable {
            return Err(io::Error::from_raw_os_error(libc::EROFS));
        }
        self.check_aligned(offset, len)?;
        if !self.has(proto::TFLAG_SEND_WRITE_ZEROES) {
            let mut pos = offset;
            while pos < offset + len {
                let n = (offset + len - pos).min(ZEROS.len() as u64) as usize;
                self.write_piece(&ZEROS[..n], pos).await?;
                pos += n as u64;
            }
            return Ok(());
        }
        let mut flags = if self.fua { proto::CMD_FLAG_FUA } else { 0 };
        if !unmap {
            flags |= proto::CMD_FLAG_NO_HOLE;
        }
        let min = self.shared.info.min_block as u64;
        let step = MAX_RANGE / min * min;
        let mut pos = offset;
        while pos < offset + len {
            let n = (offset + len - pos).min(step);
            let c = Command { flags, cmd: proto::CMD_WRITE_ZEROES, offset: pos, len: n as u32 };
            self.call(c, &[], Expect::Plain, &mut []).await?;
            self.acknowledged(flags);
            pos += n;
        }
        Ok(())
    }
    async fn extent_at(&self, offset: u64) -> io::Result<Extent> {
        let size = self.shared.info.size;
        let rest = size.saturating_sub(offset).max(1);
        let min = self.shared.info.min_block as u64;
        let start = offset / min * min;
        let len = (size - start).min(MAX_RANGE / min * min).max(1);
        // The context id is the connection's own; `call` fills it in.
        let expect = Expect::BlockStatus { context: 0 };
        let c = Command {
            flags: proto::CMD_FLAG_REQ_ONE,
            cmd: proto::CMD_BLOCK_STATUS,
            offset: start,
            len: len as u32,
        };
        match self.call(c, &[], expect, &mut []).await? {
            Answer::Extent(ext_len, status) => {
                let end = (start + ext_len as u64).min(size);
                let n = end.saturating_sub(offset).max(1);
                let hole = status & (proto::STATE_HOLE | proto::STATE_ZERO)
                    == proto::STATE_HOLE | proto::STATE_ZERO;
                Ok(if hole { Extent::Hole(n) } else { Extent::Data(n) })
            }
            _ => Ok(Extent::Data(rest)),
        }
    }
    fn can_unmap(&self) -> bool {
        self.has(proto::TFLAG_SEND_WRITE_ZEROES)
    }
}
