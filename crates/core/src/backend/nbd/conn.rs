//! One NBD connection in transmission: requests from any number of tasks (on any number of queue
//! threads) are sent under a send lock, and replies are read by whichever waiting request holds
//! the *reader turn*: it reads the next reply header and, if the reply is another request's,
//! hands the turn (and the stream positioned at that reply's payload) to it. So every payload is
//! read straight into the buffer of the request it answers, and nothing reads in the background.
//! Socket I/O goes through the calling thread's io_uring (blocking I/O without one).
//!
//! Every reply is checked by [`proto::ReplyCheck`]; a reply that breaks the protocol fails its
//! request and closes the connection (all other requests on it see it broken).

use std::future::poll_fn;
use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::task::{Poll, Waker};
use std::time::Instant;

use rustls::ClientConnection;

use super::handshake::{Negotiated, Socket};
use super::proto::{self, Answer, Command, Expect, ReplyCheck, ReplyHeader, ReplyStart, Step};
use crate::sys::uring::Ring;

/// Why a request did not get an answer.
#[derive(Debug)]
pub enum Failure {
    /// The connection broke (or was broken before); the request may be retried elsewhere.
    Broken,
    /// The server broke the protocol answering this request; the connection is closed.
    Protocol(proto::ProtoError),
}

enum Slot {
    Free,
    /// Sent (or about to be); nobody has read a reply header for it yet.
    Waiting {
        seq: u32,
        waker: Option<Waker>,
        /// When it was sent on this connection (the request timeout counts from here).
        sent: Instant,
    },
    /// Its next reply header was read by another request: the stream is positioned at that
    /// reply's payload and the reader turn belongs to this request.
    Handed {
        seq: u32,
        header: ReplyHeader,
        sent: Instant,
    },
}

struct RecvState {
    slots: Vec<Slot>,
    free: Vec<u32>,
    next_seq: u32,
    /// Some request is reading from the stream (or was handed a header).
    reader: bool,
}

/// TLS records received but not yet fed to rustls (the reader turn's own buffer).
struct Cipher {
    buf: Box<[u8]>,
    pos: usize,
    end: usize,
}

pub struct Conn {
    socket: Socket,
    tls: Option<Mutex<ClientConnection>>,
    pub structured: bool,
    /// This connection's `base:allocation` context id.
    pub allocation: Option<u32>,
    /// Held while a request (header and payload) is written; with TLS it holds the records.
    send: tokio::sync::Mutex<Vec<u8>>,
    cipher: tokio::sync::Mutex<Cipher>,
    state: Mutex<RecvState>,
    broken: AtomicBool,
}

/// Cleans up after a request that did not finish (its future was dropped): the stream may be
/// mid-reply, so the connection cannot be trusted any more.
struct InFlight<'a> {
    conn: &'a Conn,
    idx: u32,
    finished: bool,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if !self.finished {
            self.conn.fail("a request was abandoned");
        }
        self.conn.release(self.idx);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Conn {
    pub fn new(n: Negotiated) -> Self {
        // Transmission waits as long as the server takes; timeouts only guard the blocking
        // fallback from a server that went silent.
        let _ = n.socket.set_timeouts(Some(std::time::Duration::from_secs(120)));
        Conn {
            socket: n.socket,
            tls: n.tls.map(Mutex::new),
            structured: n.structured,
            allocation: n.allocation,
            send: tokio::sync::Mutex::new(Vec::new()),
            cipher: tokio::sync::Mutex::new(Cipher {
                buf: vec![0u8; 32 << 10].into_boxed_slice(),
                pos: 0,
                end: 0,
            }),
            state: Mutex::new(RecvState {
                slots: Vec::new(),
                free: Vec::new(),
                next_seq: 1,
                reader: false,
            }),
            broken: AtomicBool::new(false),
        }
    }

    pub fn is_broken(&self) -> bool {
        self.broken.load(Ordering::Acquire)
    }

    /// Marks the connection broken, wakes every waiting request and shuts the socket down (which
    /// also ends a read in progress).
    pub fn fail(&self, why: &str) {
        if self.broken.swap(true, Ordering::AcqRel) {
            return;
        }
        log::warn!("NBD connection closed: {why}");
        self.socket.shutdown();
        let st = lock(&self.state);
        for slot in &st.slots {
            if let Slot::Waiting { waker: Some(w), .. } = slot {
                w.wake_by_ref();
            }
        }
    }

    /// Sends NBD_CMD_DISC (best effort) and closes.
    pub fn disconnect(&self) {
        if self.is_broken() {
            return;
        }
        let req = proto::request(0, proto::CMD_DISC, 0, 0, 0);
        if let Ok(_guard) = self.send.try_lock() {
            match &self.tls {
                None => {
                    let _ = (&self.socket).write_all(&req);
                }
                Some(tls) => {
                    let mut tls = lock(tls);
                    let _ = tls.writer().write_all(&req);
                    tls.send_close_notify();
                    while tls.wants_write() {
                        if tls.write_tls(&mut &self.socket).is_err() {
                            break;
                        }
                    }
                }
            }
        }
        self.broken.store(true, Ordering::Release);
        self.socket.shutdown();
    }

    /// When the longest-waiting request in flight was sent, if any (for the request timeout).
    pub fn oldest_request(&self) -> Option<Instant> {
        let st = lock(&self.state);
        st.slots
            .iter()
            .filter_map(|s| match s {
                Slot::Waiting { sent, .. } | Slot::Handed { sent, .. } => Some(*sent),
                Slot::Free => None,
            })
            .min()
    }

    fn acquire(&self, sent: Instant) -> u32 {
        let mut st = lock(&self.state);
        let seq = st.next_seq;
        st.next_seq = st.next_seq.wrapping_add(1);
        let idx = match st.free.pop() {
            Some(i) => i,
            None => {
                st.slots.push(Slot::Free);
                (st.slots.len() - 1) as u32
            }
        };
        st.slots[idx as usize] = Slot::Waiting { seq, waker: None, sent };
        idx
    }

    fn release(&self, idx: u32) {
        let mut st = lock(&self.state);
        if !matches!(st.slots[idx as usize], Slot::Free) {
            st.slots[idx as usize] = Slot::Free;
            st.free.push(idx);
        }
    }

    fn cookie(&self, idx: u32) -> u64 {
        let st = lock(&self.state);
        match st.slots[idx as usize] {
            Slot::Waiting { seq, .. } | Slot::Handed { seq, .. } => (seq as u64) << 32 | idx as u64,
            Slot::Free => 0,
        }
    }

    /// Sends one request and waits for its whole reply; a READ's data lands in `buf`.
    pub async fn call(
        &self,
        c: Command,
        payload: &[u8],
        expect: Expect,
        buf: &mut [u8],
    ) -> Result<Answer, Failure> {
        if self.is_broken() {
            return Err(Failure::Broken);
        }
        let idx = self.acquire(Instant::now());
        let mut guard = InFlight { conn: self, idx, finished: false };
        let cookie = self.cookie(idx);
        let header = proto::request(c.flags, c.cmd, cookie, c.offset, c.len);
        if let Err(e) = self.send_request(&header, payload).await {
            self.fail(&format!("send failed: {e}"));
            guard.finished = true;
            return Err(Failure::Broken);
        }
        let mut check = ReplyCheck::new(expect, self.structured);
        let r = self.receive(idx, cookie, &mut check, buf).await;
        guard.finished = true;
        r
    }

    async fn send_request(&self, header: &[u8], payload: &[u8]) -> io::Result<()> {
        let mut records = self.send.lock().await;
        if self.is_broken() {
            return Err(io::Error::from(io::ErrorKind::NotConnected));
        }
        match &self.tls {
            None => self.send_all(header, payload).await,
            Some(tls) => {
                records.clear();
                {
                    let mut tls = lock(tls);
                    tls.writer().write_all(header)?;
                    tls.writer().write_all(payload)?;
                    while tls.wants_write() {
                        tls.write_tls(&mut *records)?;
                    }
                }
                self.send_all(&records, &[]).await
            }
        }
    }

    async fn send_all(&self, mut first: &[u8], mut second: &[u8]) -> io::Result<()> {
        let ring = Ring::current();
        while !first.is_empty() || !second.is_empty() {
            let r = match &ring {
                Some(ring) => match ring.send2(self.socket.fd(), first, second).await {
                    Some(r) => r,
                    None => blocking_send(&self.socket, first, second),
                },
                None => blocking_send(&self.socket, first, second),
            };
            let mut n = match r {
                Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero)),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            let a = n.min(first.len());
            first = &first[a..];
            n -= a;
            second = &second[n.min(second.len())..];
        }
        Ok(())
    }

    /// Reads exactly `buf.len()` bytes of the reply stream (the caller holds the reader turn).
    async fn recv_exact(&self, buf: &mut [u8]) -> io::Result<()> {
        match &self.tls {
            None => self.recv_raw_exact(buf).await,
            Some(tls) => {
                let mut cipher = self.cipher.lock().await;
                let mut done = 0;
                while done < buf.len() {
                    {
                        let mut tls = lock(tls);
                        match tls.reader().read(&mut buf[done..]) {
                            Ok(0) => return Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
                            Ok(n) => {
                                done += n;
                                continue;
                            }
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                            Err(e) => return Err(e),
                        }
                        if cipher.pos < cipher.end {
                            let c = &mut *cipher;
                            let n = tls.read_tls(&mut &c.buf[c.pos..c.end])?;
                            c.pos += n;
                            tls.process_new_packets()
                                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                            continue;
                        }
                    }
                    let c = &mut *cipher;
                    let n = self.recv_some(&mut c.buf).await?;
                    if n == 0 {
                        return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
                    }
                    c.pos = 0;
                    c.end = n;
                }
                Ok(())
            }
        }
    }

    async fn recv_some(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let r = match Ring::current() {
                Some(ring) => match ring.recv(self.socket.fd(), buf, false).await {
                    Some(r) => r,
                    None => (&self.socket).read(buf),
                },
                None => (&self.socket).read(buf),
            };
            match r {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => return r,
            }
        }
    }

    async fn recv_raw_exact(&self, buf: &mut [u8]) -> io::Result<()> {
        let ring = Ring::current();
        let mut done = 0;
        while done < buf.len() {
            let r = match &ring {
                Some(ring) => match ring.recv(self.socket.fd(), &mut buf[done..], true).await {
                    Some(r) => r,
                    None => (&self.socket).read(&mut buf[done..]),
                },
                None => (&self.socket).read(&mut buf[done..]),
            };
            match r {
                Ok(0) => return Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    async fn read_header(&self) -> Result<ReplyHeader, Failure> {
        let mut head = [0u8; proto::SIMPLE_HEADER_LEN];
        self.recv_exact(&mut head).await.map_err(|e| self.broke(e))?;
        match proto::reply_start(&head).map_err(|e| self.protocol(e))? {
            ReplyStart::Done(h) => Ok(h),
            ReplyStart::NeedLength { flags, ty, cookie } => {
                let mut len = [0u8; 4];
                self.recv_exact(&mut len).await.map_err(|e| self.broke(e))?;
                Ok(proto::chunk_header(flags, ty, cookie, len))
            }
        }
    }

    fn broke(&self, e: io::Error) -> Failure {
        self.fail(&format!("receive failed: {e}"));
        Failure::Broken
    }

    fn protocol(&self, e: proto::ProtoError) -> Failure {
        self.fail(&format!("the server broke the protocol: {e}"));
        Failure::Protocol(e)
    }

    /// Waits for this request's turn: a header handed over by another reader, or the free
    /// stream. `Ok(Some(h))`: handed `h`; `Ok(None)`: this request now reads the next header.
    async fn turn(&self, idx: u32) -> Result<Option<ReplyHeader>, Failure> {
        poll_fn(|cx| {
            if self.is_broken() {
                return Poll::Ready(Err(Failure::Broken));
            }
            let mut st = lock(&self.state);
            let st = &mut *st;
            match &mut st.slots[idx as usize] {
                Slot::Handed { seq, header, sent } => {
                    let (seq, header, sent) = (*seq, *header, *sent);
                    st.slots[idx as usize] = Slot::Waiting { seq, waker: None, sent };
                    Poll::Ready(Ok(Some(header)))
                }
                Slot::Waiting { waker, .. } => {
                    if !st.reader {
                        st.reader = true;
                        // No longer waiting: end_turn must wake someone else.
                        *waker = None;
                        return Poll::Ready(Ok(None));
                    }
                    match waker {
                        Some(w) if w.will_wake(cx.waker()) => {}
                        _ => *waker = Some(cx.waker().clone()),
                    }
                    Poll::Pending
                }
                Slot::Free => Poll::Ready(Err(Failure::Broken)),
            }
        })
        .await
    }

    /// Gives the reader turn up and wakes a request (not `idx`, the caller's) that waits for
    /// it. Only requests parked in [`Conn::turn`] have a waker stored.
    fn end_turn(&self, idx: u32) {
        let mut st = lock(&self.state);
        st.reader = false;
        for (i, slot) in st.slots.iter_mut().enumerate() {
            if i == idx as usize {
                continue;
            }
            if let Slot::Waiting { waker: w @ Some(_), .. } = slot {
                if let Some(w) = w.take() {
                    w.wake();
                }
                break;
            }
        }
    }

    async fn receive(
        &self,
        idx: u32,
        cookie: u64,
        check: &mut ReplyCheck,
        buf: &mut [u8],
    ) -> Result<Answer, Failure> {
        loop {
            let header = match self.turn(idx).await? {
                Some(h) => h,
                None => {
                    let h = self.read_header().await?;
                    if h.cookie() != cookie {
                        self.hand_over(h)?;
                        continue;
                    }
                    h
                }
            };
            let mut step = check.header(&header).map_err(|e| self.protocol(e))?;
            loop {
                match step {
                    Step::Prefix(n) => {
                        let mut p = [0u8; 12];
                        let p = &mut p[..n.min(12)];
                        self.recv_exact(p).await.map_err(|e| self.broke(e))?;
                        step = check.prefix(p).map_err(|e| self.protocol(e))?;
                        continue;
                    }
                    Step::Data { at, len } => {
                        let Some(dst) = buf.get_mut(at..at + len) else {
                            return Err(self.protocol(proto::ProtoError("data beyond the buffer")));
                        };
                        self.recv_exact(dst).await.map_err(|e| self.broke(e))?;
                    }
                    Step::Zero { at, len } => {
                        let Some(dst) = buf.get_mut(at..at + len) else {
                            return Err(self.protocol(proto::ProtoError("hole beyond the buffer")));
                        };
                        dst.fill(0);
                    }
                    Step::Skip(mut n) => {
                        let mut scratch = [0u8; 512];
                        while n > 0 {
                            let k = (n as usize).min(scratch.len());
                            self.recv_exact(&mut scratch[..k]).await.map_err(|e| self.broke(e))?;
                            n -= k as u32;
                        }
                    }
                    Step::Nothing => {}
                }
                break;
            }
            self.end_turn(idx);
            if check.is_done() {
                return check.answer().map_err(|e| self.protocol(e));
            }
        }
    }

    /// A header for another request: hand it (and the reader turn) over.
    fn hand_over(&self, h: ReplyHeader) -> Result<(), Failure> {
        let cookie = h.cookie();
        let (seq, idx) = ((cookie >> 32) as u32, cookie as u32);
        let mut st = lock(&self.state);
        let (waker, sent) = match st.slots.get_mut(idx as usize) {
            Some(Slot::Waiting { seq: s, waker, sent }) if *s == seq => (waker.take(), *sent),
            _ => {
                drop(st);
                return Err(self.protocol(proto::ProtoError("reply with an unknown cookie")));
            }
        };
        st.slots[idx as usize] = Slot::Handed { seq, header: h, sent };
        drop(st);
        if let Some(w) = waker {
            w.wake();
        }
        Ok(())
    }
}

fn blocking_send(socket: &Socket, first: &[u8], second: &[u8]) -> io::Result<usize> {
    let mut w = socket;
    if !first.is_empty() {
        w.write(first)
    } else {
        w.write(second)
    }
}
