/**
 * The FUSE wire format from the kernel's side, for tests that talk to a fake device
 * (ts/testing.ts): encoding requests, decoding replies, and reading replies with a bounded wait.
 * Little-endian, as on x86_64 and aarch64.
 */
import { spawnSync } from 'node:child_process'
import { readSync, writeSync } from 'node:fs'
import { setTimeout as sleep } from 'node:timers/promises'

export const IN_HEADER = 40
export const OUT_HEADER = 16
export const OPCODE = { GETATTR: 3, READ: 15 } as const
/** fuse_out_header + fuse_attr_out (attr_valid, attr_valid_nsec, dummy, fuse_attr of 88 bytes). */
export const GETATTR_REPLY_LEN = OUT_HEADER + 16 + 88

export interface RequestHeader {
  opcode: number
  unique: bigint
  nodeid?: bigint
  /** The header's `len`; default: the real length (header + body). */
  len?: number
}

/** fuse_in_header followed by `body`. */
export function request(h: RequestHeader, body: Buffer = Buffer.alloc(0)): Buffer {
  const buf = Buffer.alloc(IN_HEADER + body.length)
  buf.writeUInt32LE(h.len ?? buf.length, 0)
  buf.writeUInt32LE(h.opcode, 4)
  buf.writeBigUInt64LE(h.unique, 8)
  buf.writeBigUInt64LE(h.nodeid ?? 1n, 16)
  buf.writeUInt32LE(process.getuid?.() ?? 0, 24)
  buf.writeUInt32LE(process.getgid?.() ?? 0, 28)
  buf.writeUInt32LE(process.pid, 32)
  // total_extlen and padding stay 0.
  body.copy(buf, IN_HEADER)
  return buf
}

/** GETATTR with a fuse_getattr_in (getattr_flags, dummy, fh): 56 bytes. */
export function getattr(unique: bigint): Buffer {
  return request({ opcode: OPCODE.GETATTR, unique }, Buffer.alloc(16))
}

/** READ with a fuse_read_in (fh, offset, size, read_flags, lock_owner, flags, padding): 80 bytes. */
export function read(unique: bigint, offset: number, size: number): Buffer {
  const body = Buffer.alloc(40)
  body.writeBigUInt64LE(BigInt(offset), 8)
  body.writeUInt32LE(size, 16)
  return request({ opcode: OPCODE.READ, unique }, body)
}

export interface Reply {
  len: number
  /** Negative errno, 0 on success. */
  error: number
  unique: bigint
  body: Buffer
  /** Bytes the read returned (to compare with `len`). */
  bytes: number
}

export function decodeReply(buf: Buffer): Reply {
  if (buf.length < OUT_HEADER) throw new Error(`a reply of ${buf.length} bytes is shorter than fuse_out_header`)
  return {
    len: buf.readUInt32LE(0),
    error: buf.readInt32LE(4),
    unique: buf.readBigUInt64LE(8),
    body: buf.subarray(OUT_HEADER),
    bytes: buf.length,
  }
}

/** Size and inode of a GETATTR reply's fuse_attr. */
export function attrOf(reply: Reply): { ino: bigint; size: bigint; mode: number } {
  const attr = reply.body.subarray(16)
  return { ino: attr.readBigUInt64LE(0), size: attr.readBigUInt64LE(8), mode: attr.readUInt32LE(60) }
}

/**
 * Sets O_NONBLOCK on `fd`'s open file description (Node has no fcntl; python3 does it on the
 * inherited descriptor, which shares the description), so reads can be polled with a deadline.
 */
export function makeNonBlocking(fd: number): void {
  const r = spawnSync(
    'python3',
    ['-c', 'import fcntl, os; fcntl.fcntl(3, fcntl.F_SETFL, fcntl.fcntl(3, fcntl.F_GETFL) | os.O_NONBLOCK)'],
    { stdio: ['ignore', 'pipe', 'pipe', fd], encoding: 'utf8', timeout: 10_000 },
  )
  if (r.status !== 0) throw new Error(`python3 could not set O_NONBLOCK on fd ${fd}: ${r.error?.message ?? r.stderr}`)
  // Proof that it took: with nothing to read, a read fails at once instead of blocking.
  const result = tryRead(fd, Buffer.alloc(64))
  if (result !== 'again') throw new Error(`fd ${fd} is not non-blocking (a read gave ${String(result)})`)
}

function tryRead(fd: number, buf: Buffer): number | 'again' | 'eof' {
  try {
    const n = readSync(fd, buf)
    return n === 0 ? 'eof' : n
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code
    if (code === 'EAGAIN') return 'again'
    // The other end closed while requests it never read were still queued.
    if (code === 'ECONNRESET') return 'eof'
    throw err
  }
}

/**
 * Reads one whole message (SOCK_SEQPACKET) from the non-blocking `fd`, waiting at most
 * `timeoutMs`. `'timeout'` if nothing came, `'eof'` if the other end is closed (or reset).
 */
export async function readMessage(fd: number, timeoutMs: number): Promise<Buffer | 'timeout' | 'eof'> {
  const buf = Buffer.alloc(2 * 1024 * 1024)
  const deadline = Date.now() + timeoutMs
  for (;;) {
    const result = tryRead(fd, buf)
    if (result === 'eof') return 'eof'
    if (result !== 'again') return Buffer.from(buf.subarray(0, result))
    if (Date.now() >= deadline) return 'timeout'
    await sleep(5)
  }
}

/** Reads one reply, failing with a clear message if none comes within `timeoutMs`. */
export async function readReply(fd: number, timeoutMs = 5000): Promise<Reply> {
  const message = await readMessage(fd, timeoutMs)
  if (message === 'timeout') throw new Error(`no reply within ${timeoutMs} ms`)
  if (message === 'eof') throw new Error('the fake device was closed instead of replying')
  return decodeReply(message)
}

/**
 * Writes one message; `'closed'` if the other end is gone (EPIPE / ECONNRESET), which for a
 * request means that nobody will answer it.
 */
export function send(fd: number, message: Buffer): 'sent' | 'closed' {
  try {
    const n = writeSync(fd, message)
    if (n !== message.length) throw new Error(`wrote ${n} of ${message.length} bytes`)
    return 'sent'
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code
    if (code === 'EPIPE' || code === 'ECONNRESET') return 'closed'
    throw err
  }
}
