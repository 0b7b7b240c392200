/**
 * Issue 21, case 2: a damaged qcow2 must not let guest writes overwrite its metadata. L2 entry 0
 * is pointed (with the COPIED flag, so a write goes in place) at the refcount table, the L1 table
 * or the L2 table itself. As QEMU does: the write fails with EIO, nothing is written, the image is
 * marked corrupt, and the export keeps serving reads.
 */
import { copyFile, open } from 'node:fs/promises'
import { join } from 'node:path'

import test, { type ExecutionContext } from 'ava'

import { FuseExport, isBlockfuseError } from '../ts/index.js'
import { be64, patch, peek, readBe64 } from './helpers/damage.js'
import { assertE2eEnvironment } from './helpers/env.js'
import { KiB, makeMountpoint, MiB, tempDir } from './helpers/files.js'
import { assertClean, createQcow2, qemuIo } from './helpers/qcow2.js'
import { client, mustClient, openExport } from './helpers/semantics.js'

test.before(() => {
  assertE2eEnvironment(['qemu-img', 'qemu-io', 'python3', 'findmnt'])
})

const COPIED = 1n << 63n
const CLUSTER = 64 * KiB

/** An image with 128 KiB of data (clusters 0 and 1) and where its metadata lives. */
async function dataImage(t: ExecutionContext, compat: '0.10' | '1.1' = '1.1', size = 4 * MiB) {
  const dir = await tempDir(t)
  const image = join(dir, 'd.qcow2')
  const mnt = join(dir, 'm')
  await makeMountpoint(mnt)
  await createQcow2(image, size, { compat })
  await qemuIo(image, 'qcow2', 'write -P 0x11 0 64k', 'write -P 0x22 64k 64k')
  await assertClean(t, image)
  const l1 = await readBe64(image, 40)
  const refcountTable = await readBe64(image, 48)
  const l2 = (await readBe64(image, l1)) & 0x00ff_ffff_ffff_fe00n
  return { dir, image, mnt, l1, refcountTable, l2 }
}

async function corruptFlag(image: string): Promise<boolean | undefined> {
  const r = await mustClient('qemu-img', ['info', '-U', '--output=json', image])
  const info = JSON.parse(r.stdout) as { 'format-specific'?: { data?: { corrupt?: boolean } } }
  return info['format-specific']?.data?.corrupt
}

for (const target of ['refcount table', 'L1 table', 'L2 table itself'] as const) {
  test(`a write through an L2 entry pointing at the ${target} fails with EIO, writes nothing, marks the image corrupt; reads go on`, async (t) => {
    const f = await dataImage(t)
    const host = target === 'refcount table' ? f.refcountTable : target === 'L1 table' ? f.l1 : f.l2
    // L2 entry 0: guest cluster 0 now "lives" on that metadata cluster.
    await patch(f.image, f.l2, be64(COPIED | host))
    const before = await peek(f.image, host, CLUSTER)
    const exp = await openExport(t, { source: f.image, mountpoint: f.mnt, writable: true })
    const fh = await open(f.mnt, 'r+')
    t.teardown(() => fh.close().catch(() => undefined))
    const err = await t.throwsAsync(async () => {
      await fh.write(Buffer.alloc(CLUSTER, 0xee), 0, CLUSTER, 0)
      await fh.sync()
    })
    t.is((err as NodeJS.ErrnoException | undefined)?.code, 'EIO', String(err))
    t.true((await peek(f.image, host, CLUSTER)).equals(before), `the ${target} is untouched`)
    // Reads still work, and further writes fail (the image is corrupt now).
    const second = Buffer.alloc(CLUSTER)
    await fh.read(second, 0, CLUSTER, CLUSTER)
    t.true(second.equals(Buffer.alloc(CLUSTER, 0x22)), 'cluster 1 reads back')
    const again = await t.throwsAsync(fh.write(Buffer.alloc(4096, 1), 0, 4096, 2 * CLUSTER))
    t.is((again as NodeJS.ErrnoException | undefined)?.code, 'EIO')
    await fh.close()
    await exp.close()
    t.true((await peek(f.image, host, CLUSTER)).equals(before), `the ${target} is still untouched after close`)
    t.is(await corruptFlag(f.image), true, 'the corrupt bit is set')
    // QEMU refuses to write it too, and so does a later writable export.
    const q = await client('qemu-io', ['-f', 'qcow2', '-c', 'write 0 4k', f.image])
    t.regex(q.stderr, /corrupt/i)
    const w = await t.throwsAsync(FuseExport.create({ source: f.image, mountpoint: f.mnt, writable: true }))
    t.true(isBlockfuseError(w, 'IMAGE_CORRUPT'), String(w))
    t.regex(w?.message ?? '', new RegExp(`qemu-img check -r all ${f.image}`))
  })
}

test('writes that do not touch metadata keep working on a clean image; check stays clean', async (t) => {
  const f = await dataImage(t)
  await openExport(t, { source: f.image, mountpoint: f.mnt, writable: true, growable: true })
  const fh = await open(f.mnt, 'r+')
  t.teardown(() => fh.close().catch(() => undefined))
  for (let i = 0; i < 64; i++) await fh.write(Buffer.alloc(4096, i), 0, 4096, i * 61 * 1024)
  // Growing moves the L1 table; the data written after it must not be mistaken for metadata.
  await fh.truncate(512 * MiB)
  for (let i = 0; i < 16; i++) await fh.write(Buffer.alloc(CLUSTER, i + 1), 0, CLUSTER, 256 * MiB + i * CLUSTER)
  await fh.sync()
  await fh.close()
  t.is(await corruptFlag(f.image), false)
  await assertClean(t, f.image)
})

test('a writable open refuses an image whose metadata cluster has refcount 0; read-only serves it', async (t) => {
  const f = await dataImage(t)
  // The refcount of the L1 table's cluster (16-bit entries in refcount block 0).
  const block = (await readBe64(f.image, f.refcountTable)) & ~0x1ffn
  await patch(f.image, block + (f.l1 / BigInt(CLUSTER)) * 2n, Buffer.alloc(2))
  const err = await t.throwsAsync(FuseExport.create({ source: f.image, mountpoint: f.mnt, writable: true }))
  t.true(isBlockfuseError(err, 'IMAGE_CORRUPT'), String(err))
  t.regex(err?.message ?? '', /active L1 table .* has refcount 0/)
  t.regex(err?.message ?? '', /qemu-img check -r all/)
  const ro = await openExport(t, { source: f.image, mountpoint: f.mnt })
  const fh = await open(f.mnt, 'r')
  const buf = Buffer.alloc(CLUSTER)
  await fh.read(buf, 0, CLUSTER, 0)
  await fh.close()
  t.true(buf.equals(Buffer.alloc(CLUSTER, 0x11)))
  await ro.close()
})

test('v2 (compat 0.10) images are protected too (no corrupt bit to set: writes fail until closed)', async (t) => {
  const f = await dataImage(t, '0.10')
  await patch(f.image, f.l2, be64(COPIED | f.l1))
  const before = await peek(f.image, f.l1, CLUSTER)
  await openExport(t, { source: f.image, mountpoint: f.mnt, writable: true })
  const fh = await open(f.mnt, 'r+')
  t.teardown(() => fh.close().catch(() => undefined))
  const err = await t.throwsAsync(fh.write(Buffer.alloc(4096, 0xee), 0, 4096, 0))
  t.is((err as NodeJS.ErrnoException | undefined)?.code, 'EIO')
  t.true((await peek(f.image, f.l1, CLUSTER)).equals(before))
  await fh.close()
})

test('an L2 entry pointing at a free cluster that later becomes a new L2 table: the write through it fails with EIO', async (t) => {
  // 2 GiB: guest offset 1 GiB needs a second L2 table (one covers 512 MiB with 64 KiB clusters).
  const { dir, image, mnt, l1, l2 } = await dataImage(t, '1.1', 2048 * MiB)
  // Where the second L2 table goes: found on a copy, with the same writes through an export.
  const probe = join(dir, 'probe.qcow2')
  await copyFile(image, probe)
  const probeExp = await openExport(t, { source: probe, mountpoint: mnt, writable: true })
  const p = await open(mnt, 'r+')
  await p.write(Buffer.alloc(4096, 0x33), 0, 4096, 1024 * MiB)
  await p.sync()
  await p.close()
  await probeExp.close()
  const newL2 = (await readBe64(probe, l1 + 2n * 8n)) & 0x00ff_ffff_ffff_fe00n
  t.not(newL2, 0n, 'the write at 1 GiB allocated an L2 table')
  // Guest cluster 2 (not allocated) now "lives" on that cluster, which is free at open.
  await patch(image, l2 + 16n, be64(COPIED | newL2))

  await openExport(t, { source: image, mountpoint: mnt, writable: true })
  const fh = await open(mnt, 'r+')
  t.teardown(() => fh.close().catch(() => undefined))
  await fh.write(Buffer.alloc(4096, 0x33), 0, 4096, 1024 * MiB)
  await fh.sync()
  t.is(
    (await readBe64(image, l1 + 2n * 8n)) & 0x00ff_ffff_ffff_fe00n,
    newL2,
    'the new L2 table is where the copy had it',
  )
  const tableBefore = await peek(image, newL2, CLUSTER)
  const err = await t.throwsAsync(async () => {
    await fh.write(Buffer.alloc(CLUSTER, 0xee), 0, CLUSTER, 2 * CLUSTER)
    await fh.sync()
  })
  t.is((err as NodeJS.ErrnoException | undefined)?.code, 'EIO', String(err))
  t.true((await peek(image, newL2, CLUSTER)).equals(tableBefore), 'the new L2 table is untouched')
  const back = Buffer.alloc(4096)
  await fh.read(back, 0, 4096, 1024 * MiB)
  t.true(back.equals(Buffer.alloc(4096, 0x33)), 'the data behind the new L2 table reads back')
  await fh.close()
  t.is(await corruptFlag(image), true, 'the corrupt bit is set')
})
