/**
 * Issue 17, FUSE passthrough: read-only opens of a raw export go straight to the image (no READ
 * reaches the export), writable opens are served as without it, and both kinds mixed on one
 * export stay coherent; a non-growable export still refuses writes at its end. `'auto'` passes
 * through read-only exports only; `'on'` fails with PASSTHROUGH_UNAVAILABLE where it cannot be
 * used. Real clients: dd and python3 (pread/pwrite on several fds of one file).
 */
import { readFile } from 'node:fs/promises'

import test from 'ava'

import { isBlockfuseError } from '../ts/index.js'
import { assertE2eEnvironment } from './helpers/env.js'
import { imageFixture } from './helpers/exports.js'
import { KiB, MiB } from './helpers/files.js'
import { createQcow2, qcow2Dir } from './helpers/qcow2.js'
import { mustClient, openExport, sizeOf, writableRawExport } from './helpers/semantics.js'

test.before(() => {
  assertE2eEnvironment(['dd', 'python3', 'qemu-img'])
})

/** READ requests the export has served so far. */
function reads(exp: { stats(): { requests: Record<string, number> } }): number {
  return exp.stats().requests.READ ?? 0
}

async function ddRead(path: string, flags: string[] = []): Promise<void> {
  await mustClient('dd', [`if=${path}`, 'of=/dev/null', 'bs=64k', ...flags, 'status=none'])
}

test("'auto' on a read-only raw export: passed through, reads never reach the export", async (t) => {
  const f = await imageFixture(t, 4 * MiB)
  const exp = await openExport(t, { source: f.image, mountpoint: f.mountpoint })
  t.true(exp.passthrough, exp.passthroughFallback)
  t.is(exp.passthroughFallback, undefined)
  t.true((await readFile(f.mountpoint)).equals(f.data))
  await ddRead(f.mountpoint, ['iflag=direct'])
  t.is(reads(exp), 0, 'every read went to the image')
})

test("'auto' does not pass through writable exports or qcow2 images, and says why; 'off' never", async (t) => {
  const f = await imageFixture(t, 2 * MiB)
  const rw = await openExport(t, { source: f.image, mountpoint: f.mountpoint, writable: true })
  t.false(rw.passthrough)
  t.regex(rw.passthroughFallback ?? '', /read-only exports only/)
  await ddRead(f.mountpoint)
  t.true(reads(rw) > 0, 'reads are served by the export')
  await rw.close()

  const off = await openExport(t, { source: f.image, mountpoint: f.mountpoint, passthrough: 'off' })
  t.false(off.passthrough)
  t.is(off.passthroughFallback, undefined, 'not asked for')
  await off.close()

  const q = await qcow2Dir(t)
  const image = q.path('disk.qcow2')
  await createQcow2(image, 2 * MiB)
  const qcow2 = await openExport(t, { source: image, mountpoint: q.mountpoint })
  t.false(qcow2.passthrough)
  t.regex(qcow2.passthroughFallback ?? '', /only raw images/)
  await qcow2.close()
  const err = await t.throwsAsync(openExport(t, { source: image, mountpoint: q.mountpoint, passthrough: 'on' }))
  t.true(isBlockfuseError(err) && err.code === 'PASSTHROUGH_UNAVAILABLE', String(err))
  t.regex(err?.message ?? '', /only raw images/)
})

/**
 * On one export: `ro_before` is opened read-only before the writes and read (filling the image's
 * page cache), then `pwrite`s through a read-write fd; `ro_before` and a read-only fd opened
 * after the writes must both see them, and so must the read-write fd. A write at the end fails.
 */
const MIXED_CLIENT = `
import errno, json, os, sys
path, size = sys.argv[1], int(sys.argv[2])
a, b = 1024 * 1024 + 100, 3 * 1024 * 1024 - 50
ro_before = os.open(path, os.O_RDONLY)
os.pread(ro_before, size, 0)
rw = os.open(path, os.O_RDWR)
os.pwrite(rw, b'\\x11' * 5000, a)
os.pwrite(rw, b'\\x22' * 300, b)
ro_after = os.open(path, os.O_RDONLY)
out = {}
for name, fd in (('ro_before', ro_before), ('ro_after', ro_after), ('rw', rw)):
    out[name] = [os.pread(fd, 5000, a) == b'\\x11' * 5000, os.pread(fd, 300, b) == b'\\x22' * 300]
try:
    os.pwrite(rw, b'x' * 10, size)
    out['eof'] = 'written'
except OSError as e:
    out['eof'] = errno.errorcode[e.errno]
print(json.dumps(out))
`

for (const cache of ['writeback', 'none'] as const) {
  test(`'on', writable, cache ${cache}: read-only opens pass through, writes are served; mixed opens stay coherent`, async (t) => {
    const { f, exp } = await writableRawExport(t, 4 * MiB, { cache, passthrough: 'on' })
    t.true(exp.passthrough)
    // With cache none only O_DIRECT read-only opens pass through (else they would fill the
    // page cache 'none' bypasses); python's buffered ones are then served, which is coherent too.
    const r = await mustClient('python3', ['-c', MIXED_CLIENT, f.mountpoint, String(4 * MiB)])
    t.deepEqual(JSON.parse(r.stdout), {
      ro_before: [true, true],
      ro_after: [true, true],
      rw: [true, true],
      eof: 'ENOSPC',
    })
    const image = await readFile(f.image)
    t.is(image.length, 4 * MiB, 'a non-growable export never grows its image')
    t.true(image.subarray(MiB + 100, MiB + 5100).equals(Buffer.alloc(5000, 0x11)))
    const before = reads(exp)
    await ddRead(f.mountpoint, ['iflag=direct'])
    t.is(reads(exp), before, 'an O_DIRECT read-only open passes through')
    await ddRead(f.mountpoint)
    if (cache === 'none') t.true(reads(exp) > before, 'a buffered read-only open is served with cache none')
    else t.is(reads(exp), before, 'a buffered read-only open passes through')
  })
}

/** WRITE requests the export has served so far. */
function writes(exp: { stats(): { requests: Record<string, number> } }): number {
  return exp.stats().requests.WRITE ?? 0
}

/**
 * Through one read-write fd: a write inside, a write past the end (a hole between), fsync, then
 * fstat's size and the data read back through that fd and through a new read-only one.
 */
const GROWING_CLIENT = `
import json, os, sys
path, size = sys.argv[1], int(sys.argv[2])
rw = os.open(path, os.O_RDWR)
os.pwrite(rw, b'\\x33' * 4096, 100)
os.pwrite(rw, b'\\x44' * 4096, size + 8192)
os.fsync(rw)
ro = os.open(path, os.O_RDONLY)
print(json.dumps({
    'size': os.fstat(rw).st_size,
    'inside': [os.pread(fd, 4096, 100) == b'\\x33' * 4096 for fd in (rw, ro)],
    'hole': [os.pread(fd, 8192, size) == bytes(8192) for fd in (rw, ro)],
    'past': [os.pread(fd, 4096, size + 8192) == b'\\x44' * 4096 for fd in (rw, ro)],
}))
`

for (const cache of ['writeback', 'none'] as const) {
  const how = cache === 'writeback' ? 'writes pass through too' : 'writes are served (an O_DIRECT image)'
  test(`'on', growable, cache ${cache}: ${how}; writes past the end grow the image, stat follows`, async (t) => {
    const { f, exp } = await writableRawExport(t, MiB, { cache, growable: true, passthrough: 'on' })
    t.true(exp.passthrough)
    const r = await mustClient('python3', ['-c', GROWING_CLIENT, f.mountpoint, String(MiB)])
    const grownSize = MiB + 12 * KiB
    t.deepEqual(JSON.parse(r.stdout), {
      size: grownSize,
      inside: [true, true],
      hole: [true, true],
      past: [true, true],
    })
    if (cache === 'writeback') t.is(writes(exp), 0, 'no WRITE reached the export')
    else t.true(writes(exp) > 0, 'the buffered writes were served by the export')
    t.is(await sizeOf(f.mountpoint), grownSize, "GETATTR follows the image's size")
    const image = await readFile(f.image)
    t.is(image.length, grownSize)
    t.true(image.subarray(100, 4196).equals(Buffer.alloc(4096, 0x33)))
    t.true(image.subarray(MiB + 8 * KiB).equals(Buffer.alloc(4096, 0x44)))
    // dd past the end too (O_DIRECT where the image is), and SETATTR's truncate stays ours.
    await mustClient('dd', [
      'if=/dev/zero',
      `of=${f.mountpoint}`,
      'bs=4k',
      'count=4',
      `seek=${grownSize / (4 * KiB)}`,
      'conv=notrunc',
      'oflag=direct',
      'status=none',
    ])
    t.is(await sizeOf(f.mountpoint), grownSize + 16 * KiB)
    await mustClient('truncate', ['-s', String(2 * MiB), f.mountpoint])
    t.is(await sizeOf(f.mountpoint), 2 * MiB)
    t.is((await readFile(f.image)).length, 2 * MiB)
  })
}

test("'on', writable but not growable, or writethrough: writes stay with the export", async (t) => {
  for (const options of [{ growable: false }, { growable: true, writethrough: true }]) {
    const f = await imageFixture(t, MiB)
    const exp = await openExport(t, {
      source: f.image,
      mountpoint: f.mountpoint,
      writable: true,
      format: 'raw',
      passthrough: 'on',
      ...options,
    })
    t.true(exp.passthrough)
    await mustClient('dd', ['if=/dev/zero', `of=${f.mountpoint}`, 'bs=4k', 'count=2', 'conv=notrunc', 'status=none'])
    t.true(writes(exp) > 0, JSON.stringify(options))
    await exp.close()
  }
})
