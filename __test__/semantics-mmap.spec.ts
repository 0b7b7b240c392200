/**
 * Issue 17, mmap: `mmap(MAP_SHARED)` of the exported file works for every format and mode (every
 * open is FOPEN_DIRECT_IO; INIT agrees on FUSE_DIRECT_IO_ALLOW_MMAP). A real process (python3's
 * mmap) maps the export: the mapping shows the image, a store through the mapping plus msync
 * lands in the image, and a pwrite(2) through another fd is visible in the existing mapping;
 * with FUSE passthrough too (the kernel then maps the image itself).
 */
import { open, readFile } from 'node:fs/promises'

import test from 'ava'

import { assertE2eEnvironment } from './helpers/env.js'
import { imageFixture } from './helpers/exports.js'
import { KiB, MiB } from './helpers/files.js'
import { createQcow2, qcow2Dir } from './helpers/qcow2.js'
import { client, mustClient, openExport, writableRawExport } from './helpers/semantics.js'

test.before(() => {
  assertE2eEnvironment(['python3', 'qemu-img'])
})

/**
 * Maps `path` shared (read-only, or read-write), prints the mapping's bytes at `probe` (hex,
 * 64 bytes); read-write also stores `stored` (hex) at `storeAt` and msyncs, then pwrites `written`
 * (hex) at `writeAt` through a second fd and prints what the mapping shows there.
 */
const MMAP_CLIENT = `
import json, mmap, os, sys
path, rw, probe, store_at, stored, write_at, written = sys.argv[1:]
probe, store_at, write_at = int(probe), int(store_at), int(write_at)
stored, written = bytes.fromhex(stored), bytes.fromhex(written)
fd = os.open(path, os.O_RDWR if rw == 'rw' else os.O_RDONLY)
size = os.fstat(fd).st_size
prot = mmap.PROT_READ | (mmap.PROT_WRITE if rw == 'rw' else 0)
m = mmap.mmap(fd, size, mmap.MAP_SHARED, prot)
out = {'probe': m[probe:probe + 64].hex()}
if rw == 'rw':
    m[store_at:store_at + len(stored)] = stored
    m.flush()
    fd2 = os.open(path, os.O_WRONLY)
    os.pwrite(fd2, written, write_at)
    os.close(fd2)
    out['seen'] = m[write_at:write_at + len(written)].hex()
m.close()
os.close(fd)
print(json.dumps(out))
`

interface MmapResult {
  probe: string
  seen?: string
}

interface MmapPlan {
  probe: number
  storeAt: number
  stored: Buffer
  writeAt: number
  written: Buffer
}

const PLAN: MmapPlan = {
  probe: MiB + 512,
  // Unaligned, across a page boundary.
  storeAt: 2 * MiB - 100,
  stored: Buffer.alloc(300, 0xa5),
  writeAt: 3 * MiB + 4 * KiB + 7,
  written: Buffer.alloc(200, 0x5a),
}

async function mapExport(path: string, rw: boolean, plan = PLAN): Promise<MmapResult> {
  const args = [path, rw ? 'rw' : 'ro', plan.probe, plan.storeAt, plan.stored.toString('hex'), plan.writeAt]
  const r = await mustClient('python3', ['-c', MMAP_CLIENT, ...args.map(String), plan.written.toString('hex')])
  return JSON.parse(r.stdout) as MmapResult
}

async function pread(path: string, offset: number, length: number): Promise<Buffer> {
  const fh = await open(path, 'r')
  try {
    const buf = Buffer.alloc(length)
    const { bytesRead } = await fh.read(buf, 0, length, offset)
    return buf.subarray(0, bytesRead)
  } finally {
    await fh.close()
  }
}

for (const passthrough of ['auto', 'off'] as const) {
  test(`raw, read-only, passthrough ${passthrough}: a shared read-only mapping shows the image`, async (t) => {
    const f = await imageFixture(t, 4 * MiB)
    const exp = await openExport(t, { source: f.image, mountpoint: f.mountpoint, passthrough })
    t.is(exp.passthrough, passthrough === 'auto', exp.passthroughFallback)
    const r = await mapExport(f.mountpoint, false)
    t.is(r.probe, f.data.subarray(PLAN.probe, PLAN.probe + 64).toString('hex'))
    // A writable shared mapping needs a writable fd; the ro mount refuses that open.
    const w = await client('python3', ['-c', MMAP_CLIENT, f.mountpoint, 'rw', '0', '0', '00', '0', '00'])
    t.not(w.code, 0)
    t.regex(w.stderr, /Read-only file system/)
    t.true((await readFile(f.image)).equals(f.data), 'the image is unchanged')
  })
}

const WRITABLE_RAW = [
  { cache: 'writeback', passthrough: 'off' },
  { cache: 'none', passthrough: 'off' },
  // With passthrough the mapping is the image's own (the kernel maps the backing file).
  { cache: 'writeback', passthrough: 'on' },
] as const

for (const { cache, passthrough } of WRITABLE_RAW) {
  test(`raw, writable, cache ${cache}, passthrough ${passthrough}: stores + msync land in the image; pwrite shows in the mapping`, async (t) => {
    const { f, exp } = await writableRawExport(t, 4 * MiB, { cache, passthrough })
    t.is(exp.passthrough, passthrough === 'on')
    const r = await mapExport(f.mountpoint, true)
    t.is(r.probe, f.data.subarray(PLAN.probe, PLAN.probe + 64).toString('hex'))
    t.is(r.seen, PLAN.written.toString('hex'), 'the pwrite is visible in the existing mapping')
    const image = await readFile(f.image)
    t.deepEqual(image.subarray(PLAN.storeAt, PLAN.storeAt + PLAN.stored.length), PLAN.stored, 'msync reached the image')
    t.deepEqual(image.subarray(PLAN.writeAt, PLAN.writeAt + PLAN.written.length), PLAN.written)
    // Nothing else changed.
    const expected = Buffer.from(f.data)
    PLAN.stored.copy(expected, PLAN.storeAt)
    PLAN.written.copy(expected, PLAN.writeAt)
    t.true(image.equals(expected), 'only the stored and written ranges changed')
    t.is(image.length, 4 * MiB, 'the image did not grow')
  })
}

test('qcow2, writable: stores + msync reach the image; pwrite shows in the mapping', async (t) => {
  const q = await qcow2Dir(t)
  const image = q.path('disk.qcow2')
  await createQcow2(image, 4 * MiB)
  const exp = await openExport(t, { source: image, mountpoint: q.mountpoint, writable: true })
  const r = await mapExport(q.mountpoint, true)
  t.is(r.probe, Buffer.alloc(64).toString('hex'), 'an empty qcow2 reads zeros')
  t.is(r.seen, PLAN.written.toString('hex'), 'the pwrite is visible in the existing mapping')
  await exp.close()
  // Read the image back through a fresh read-only export: the stores are in the qcow2 file.
  await openExport(t, { source: image, mountpoint: q.mountpoint })
  t.deepEqual(await pread(q.mountpoint, PLAN.storeAt, PLAN.stored.length), PLAN.stored, 'msync reached the image')
  t.deepEqual(await pread(q.mountpoint, PLAN.writeAt, PLAN.written.length), PLAN.written)
})
