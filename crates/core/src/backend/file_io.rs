//! Positional file I/O for the file-based backends: through the queue thread's io_uring when it
//! has one, so a queue never blocks on the disk; synchronous elsewhere (opening, closing, tests).

use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;

use crate::sys;
use crate::sys::uring::{Ring, Submission};

fn retryable(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EINTR) | Some(libc::EAGAIN))
}

/// How a file's I/O is handed to the ring: at once for O_DIRECT, batched for the page cache
/// (see [`Submission`]).
pub fn submission_for(direct: bool) -> Submission {
    if direct {
        Submission::Now
    } else {
        Submission::Batched
    }
}

/// Reads into `buf` from `offset` until it is full or EOF; returns the bytes read.
pub async fn read_full(
    file: &File,
    buf: &mut [u8],
    offset: u64,
    submission: Submission,
) -> io::Result<usize> {
    let ring = Ring::current();
    let mut done = 0;
    while done < buf.len() {
        let pos = offset + done as u64;
        let r = match &ring {
            Some(ring) => match ring.read_at(file.as_fd(), &mut buf[done..], pos, submission).await
            {
                Some(r) => r,
                None => file.read_at(&mut buf[done..], pos),
            },
            None => file.read_at(&mut buf[done..], pos),
        };
        match r {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if retryable(&e) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Writes all of `buf` at `offset`.
pub async fn write_all(
    file: &File,
    buf: &[u8],
    offset: u64,
    submission: Submission,
) -> io::Result<()> {
    let ring = Ring::current();
    let mut done = 0;
    while done < buf.len() {
        let pos = offset + done as u64;
        let r = match &ring {
            Some(ring) => match ring.write_at(file.as_fd(), &buf[done..], pos, submission).await {
                Some(r) => r,
                None => file.write_at(&buf[done..], pos),
            },
            None => file.write_at(&buf[done..], pos),
        };
        match r {
            Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero)),
            Ok(n) => done += n,
            Err(e) if retryable(&e) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// fallocate(2).
pub async fn fallocate(file: &File, mode: i32, offset: u64, len: u64) -> io::Result<()> {
    if let Some(ring) = Ring::current() {
        if let Some(r) = ring.fallocate(file.as_fd(), mode, offset, len).await {
            return r;
        }
    }
    sys::fallocate(file, mode, offset, len)
}

/// fdatasync(2).
pub async fn datasync(file: &File) -> io::Result<()> {
    if let Some(ring) = Ring::current() {
        if let Some(r) = ring.datasync(file.as_fd()).await {
            return r;
        }
    }
    file.sync_data()
}
