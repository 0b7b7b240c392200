/**
 * Issue 3's malformed-stream halt, end to end through TypeScript: a FuseExport served over a fake
 * device (ts/testing.ts; an AF_UNIX SOCK_SEQPACKET socketpair whose other end stands in for the
 * kernel) gets crafted byte streams the kernel never sends. The real decode/dispatch/halt path
 * runs; the halt must reach FuseExport as a 'halt' event, its `onHalt` policy must apply, and
 * after a halt no request may be answered.
 */
import { join } from 'node:path'
import { setTimeout as sleep } from 'node:timers/promises'

import test, { type ExecutionContext } from 'ava'

import { createFakeDeviceExport, type FakeDeviceExport } from '../ts/testing.js'
import type { FuseExportOptions } from '../ts/index.js'
import { makeImage, makeMountpoint, tempDir } from './helpers/files.js'
import {
  attrOf,
  GETATTR_REPLY_LEN,
  getattr,
  makeNonBlocking,
  read,
  readMessage,
  readReply,
  request,
  send,
  OPCODE,
  OUT_HEADER,
} from './helpers/fuse-wire.js'
import { hasTool } from './helpers/run.js'
import { waitForEvent } from './helpers/semantics.js'

const IMAGE_SIZE = 1024 * 1024
const HALT_WAIT_MS = 5000
/** How long a request after a halt is given to (wrongly) get an answer. */
const NO_REPLY_WAIT_MS = 1000

test.before(() => {
  if (!hasTool('python3')) throw new Error('the fake-device tests need python3 (to set O_NONBLOCK on the peer fd)')
})

interface Fixture extends FakeDeviceExport {
  data: Buffer
  /** Events of the export in the order they came. */
  events: string[]
}

async function fakeExport(t: ExecutionContext, options: Partial<FuseExportOptions> = {}): Promise<Fixture> {
  const dir = await tempDir(t)
  const image = join(dir, 'img.raw')
  const mountpoint = join(dir, 'mnt')
  const data = await makeImage(image, IMAGE_SIZE)
  await makeMountpoint(mountpoint)
  const fake = await createFakeDeviceExport({ source: image, mountpoint, ...options })
  t.teardown(() => fake.exp.close())
  const events: string[] = []
  fake.exp.on('halt', () => events.push('halt'))
  fake.exp.on('close', () => events.push('close'))
  makeNonBlocking(fake.peerFd)
  return { ...fake, data, events }
}

/** Sends a GETATTR and asserts that nothing answers it (the device is closed, or stays silent). */
async function assertUnanswered(t: ExecutionContext, fd: number, unique: bigint): Promise<void> {
  if (send(fd, getattr(unique)) === 'closed') {
    t.pass('the fake device is closed: nobody takes requests')
    return
  }
  const message = await readMessage(fd, NO_REPLY_WAIT_MS)
  t.true(message === 'timeout' || message === 'eof', `a request after the halt was answered: ${String(message)}`)
}

test('a GETATTR through the fake device gets a 120-byte reply with error 0 and its unique; READ returns the image', async (t) => {
  const f = await fakeExport(t)
  t.is(send(f.peerFd, getattr(0x1234_5678_9abcn)), 'sent')
  const reply = await readReply(f.peerFd)
  t.is(reply.bytes, GETATTR_REPLY_LEN)
  t.is(reply.len, GETATTR_REPLY_LEN, 'the header length is the message length')
  t.is(reply.error, 0)
  t.is(reply.unique, 0x1234_5678_9abcn)
  const attr = attrOf(reply)
  t.is(attr.ino, 1n)
  t.is(attr.size, BigInt(IMAGE_SIZE))
  t.is(attr.mode & 0o170000, 0o100000, 'a regular file')

  t.is(send(f.peerFd, read(77n, 8192, 4096)), 'sent')
  const data = await readReply(f.peerFd)
  t.is(data.unique, 77n)
  t.is(data.error, 0)
  t.is(data.len, OUT_HEADER + 4096)
  t.true(data.body.equals(f.data.subarray(8192, 8192 + 4096)), 'READ returns the image bytes')

  // FuseExport.stats() sees exactly what went through.
  t.like(f.exp.stats(), {
    requests: { GETATTR: 1, READ: 1 },
    bytesRead: 4096,
    bytesWritten: 0,
    errors: 0,
    lostReplies: 0,
  })
  t.deepEqual(f.events, [])
  t.false(f.exp.closed)
})

test("a 10-byte message (shorter than fuse_in_header) halts: 'halt' with a reason about the header, then (onHalt 'unmount', the default) 'close'", async (t) => {
  const f = await fakeExport(t)
  t.is(f.exp.options.onHalt, 'unmount')
  const closed = waitForEvent<void>(f.exp, 'close', HALT_WAIT_MS)
  closed.catch(() => undefined)
  t.is(send(f.peerFd, Buffer.alloc(10, 0xab)), 'sent')
  const reason = await waitForEvent<string>(f.exp, 'halt', HALT_WAIT_MS)
  t.regex(reason, /header/)
  t.regex(reason, /\b10\b/, 'the reason says how many bytes came')
  t.is(f.exp.haltReason, reason)
  await closed
  t.true(f.exp.closed)
  t.deepEqual(f.events, ['halt', 'close'])
  await assertUnanswered(t, f.peerFd, 99n)
})

test("a message whose header length differs from the bytes written halts the export ('halt', then 'close')", async (t) => {
  const f = await fakeExport(t)
  // Sound requests first: the stream is served until the bad one.
  t.is(send(f.peerFd, getattr(1n)), 'sent')
  t.is((await readReply(f.peerFd)).error, 0)
  const closed = waitForEvent<void>(f.exp, 'close', HALT_WAIT_MS)
  closed.catch(() => undefined)
  const lying = request({ opcode: OPCODE.GETATTR, unique: 2n, len: 80 }, Buffer.alloc(16))
  t.is(lying.length, 56)
  t.is(send(f.peerFd, lying), 'sent')
  const reason = await waitForEvent<string>(f.exp, 'halt', HALT_WAIT_MS)
  t.regex(reason, /80/, 'the reason names the header length')
  t.regex(reason, /56/, 'and the bytes that came')
  await closed
  t.deepEqual(f.events, ['halt', 'close'])
  t.is(await readMessage(f.peerFd, 200).then((m) => (Buffer.isBuffer(m) ? 'reply' : m)), 'eof')
})

test("onHalt 'keep': 'halt' but no 'close' until close() is called; no request is answered after the halt", async (t) => {
  const f = await fakeExport(t, { onHalt: 'keep' })
  t.is(send(f.peerFd, getattr(1n)), 'sent')
  t.is((await readReply(f.peerFd)).unique, 1n, 'the device serves before the halt')

  const halted = waitForEvent<string>(f.exp, 'halt', HALT_WAIT_MS)
  // The malformed message and a sound request right behind it, before the halt is even seen:
  // the request must not be served by another worker of the queue.
  t.is(send(f.peerFd, Buffer.alloc(10)), 'sent')
  const behind = send(f.peerFd, getattr(2n))
  const reason = await halted
  t.regex(reason, /header/)
  if (behind === 'sent') {
    const message = await readMessage(f.peerFd, NO_REPLY_WAIT_MS)
    t.false(Buffer.isBuffer(message), 'the request queued behind the malformed one was answered')
  }
  await assertUnanswered(t, f.peerFd, 3n)

  // Give a wrongly wired 'unmount' policy the time to act.
  await sleep(300)
  t.false(f.exp.closed, "'keep' does not close")
  t.deepEqual(f.events, ['halt'])
  t.is(f.exp.size, IMAGE_SIZE, 'a halted export still knows its size')

  await f.exp.close()
  t.true(f.exp.closed)
  t.deepEqual(f.events, ['halt', 'close'])
})

test('stats() after close returns the counters taken just before closing', async (t) => {
  const f = await fakeExport(t)
  for (let i = 0; i < 3; i++) {
    t.is(send(f.peerFd, read(BigInt(10 + i), i * 65536, 65536)), 'sent')
    t.is((await readReply(f.peerFd)).error, 0)
  }
  const before = f.exp.stats()
  t.like(before, { requests: { READ: 3 }, bytesRead: 3 * 65536, errors: 0, inFlight: [0] })
  await f.exp.close()
  t.deepEqual(f.exp.stats(), before, 'not the zeros of the closed native export')
  const copy = f.exp.stats()
  copy.requests.READ = 0
  copy.inFlight.push(5)
  t.deepEqual(f.exp.stats(), before, 'each call returns a copy')
})
