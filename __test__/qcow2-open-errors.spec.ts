/**
 * Issue 6, corrupt images: what cannot be served is refused by create() with SOURCE_OPEN_FAILED
 * and a message naming the reason (bad header, missing backing file, backing loop, a raw file
 * given as qcow2); corruption found only at request time is EIO for that request, and the export
 * keeps serving the rest. Never a crash.
 */
import { open, readFile, writeFile } from 'node:fs/promises'

import test, { type ExecutionContext } from 'ava'

import { FuseExport, type FuseExportOptions } from '../ts/index.js'
import { assertE2eEnvironment } from './helpers/env.js'
import { KiB, makeImage, MiB } from './helpers/files.js'
import { createQcow2, qcow2Dir, qemuIo } from './helpers/qcow2.js'
import { client, mustClient, openExport } from './helpers/semantics.js'

test.before(() => {
  assertE2eEnvironment(['qemu-img', 'qemu-io', 'dd', 'findmnt'])
})

/** Overwrites bytes of `path` at `offset`. */
async function patch(path: string, offset: number, bytes: Buffer): Promise<void> {
  const fh = await open(path, 'r+')
  try {
    await fh.write(bytes, 0, bytes.length, offset)
  } finally {
    await fh.close()
  }
}

function be32(n: number): Buffer {
  const b = Buffer.alloc(4)
  b.writeUInt32BE(n)
  return b
}

function be64(n: bigint): Buffer {
  const b = Buffer.alloc(8)
  b.writeBigUInt64BE(n)
  return b
}

/** create() must reject with SOURCE_OPEN_FAILED and a message matching `reason`. */
async function assertRefused(t: ExecutionContext, options: FuseExportOptions, reason: RegExp) {
  const err = await t.throwsAsync<Error & { code?: string }>(FuseExport.create(options))
  t.is(err?.code, 'SOURCE_OPEN_FAILED', `got ${err?.code}: ${err?.message}`)
  t.regex(err?.message ?? '', reason)
  t.regex(err?.message ?? '', new RegExp(String(options.source).replace(/[.*+?^${}()|[\]\\]/g, '\\$&')))
}

const formats = ['qcow2', 'auto'] as const

for (const format of formats) {
  test(`bad headers are refused at create (format ${format})`, async (t) => {
    const d = await qcow2Dir(t)
    const image = d.path('img.qcow2')
    const base = { mountpoint: d.mountpoint, format, writable: true }

    await createQcow2(image, 4 * MiB)
    await patch(image, 4, be32(7))
    await assertRefused(t, { ...base, source: image }, /unsupported qcow2 version 7/)

    await createQcow2(image, 4 * MiB)
    await patch(image, 20, be32(40))
    await assertRefused(t, { ...base, source: image }, /cluster_bits 40/)

    await createQcow2(image, 4 * MiB)
    await patch(image, 32, be32(2)) // crypt_method LUKS: imago cannot decrypt
    await assertRefused(t, { ...base, source: image }, /encrypted qcow2 images are not supported/)

    await createQcow2(image, 4 * MiB)
    await patch(image, 40, be64(0x12345n)) // l1_table_offset, not cluster aligned
    await assertRefused(t, { ...base, source: image }, /L1/i)

    // Only a magic and a version: the header is cut short.
    const short = d.path('short.qcow2')
    await writeFile(short, Buffer.from('QFI\xfb\0\0\0\x03', 'latin1'))
    await assertRefused(t, { ...base, source: short }, /truncated/)
  })
}

test('a raw file given as qcow2 is refused: not a qcow2 image', async (t) => {
  const d = await qcow2Dir(t)
  const raw = d.path('disk.raw')
  await makeImage(raw, MiB)
  await assertRefused(t, { source: raw, mountpoint: d.mountpoint, format: 'qcow2' }, /not a qcow2 image/)
})

for (const format of formats) {
  test(`a missing backing file is refused at create, naming the file (format ${format})`, async (t) => {
    const d = await qcow2Dir(t)
    const base = d.path('base.qcow2')
    const top = d.path('top.qcow2')
    await createQcow2(base, 4 * MiB)
    await createQcow2(top, undefined, { backing: 'base.qcow2' })
    await mustClient('rm', [base])
    await assertRefused(t, { source: top, mountpoint: d.mountpoint, format }, /base\.qcow2.*No such file or directory/)
  })
}

test('a backing chain that loops is refused at create', async (t) => {
  const d = await qcow2Dir(t)
  const a = d.path('a.qcow2')
  const b = d.path('b.qcow2')
  await createQcow2(a, 4 * MiB)
  await createQcow2(b, undefined, { backing: 'a.qcow2' })
  // a's backing file becomes b: a → b → a.
  await mustClient('qemu-img', ['rebase', '-u', '-f', 'qcow2', '-b', 'b.qcow2', '-F', 'qcow2', a])
  await assertRefused(t, { source: a, mountpoint: d.mountpoint, format: 'qcow2' }, /backing chain loop/)
})

test('a corrupt L1 table is refused at create; a corrupt L2 entry is EIO for that request while the rest is served', async (t) => {
  const d = await qcow2Dir(t)
  const image = d.path('img.qcow2')
  // 64 KiB clusters: one L2 table covers 512 MiB, so the second L1 entry maps [512M, 1G).
  await createQcow2(image, 1024 * MiB)
  await qemuIo(image, 'qcow2', 'write -P 0x11 0 64k', `write -P 0x22 ${512 * MiB} 64k`)
  const pristine = await readFile(image)
  const l1 = Number(pristine.readBigUInt64BE(40))
  const l2 = pristine.readBigUInt64BE(l1 + 8) & 0x00fffffffffffe00n

  // The L1 table is read at open: an unaligned L2 offset there is refused at once.
  await patch(image, l1 + 8, be64((1n << 63n) | 0x10200n))
  await assertRefused(t, { source: image, mountpoint: d.mountpoint, format: 'qcow2' }, /Invalid L1 entry/)

  // An L2 table is read when a request needs it: an unaligned data offset there fails that
  // request with EIO.
  await writeFile(image, pristine)
  await patch(image, Number(l2), be64((1n << 63n) | 0x30200n))
  const before = await readFile(image)
  const exp = await openExport(t, { source: image, mountpoint: d.mountpoint, format: 'qcow2' })
  const bad = await client('dd', [
    `if=${d.mountpoint}`,
    'of=/dev/null',
    'bs=64k',
    'count=1',
    `skip=${(512 * MiB) / (64 * KiB)}`,
  ])
  t.not(bad.code, 0, 'reading the corrupt cluster fails')
  t.regex(bad.stderr, /Input\/output error/)
  const good = await mustClient('od', ['-An', '-tx1', '-N1', d.mountpoint])
  t.is(good.stdout.trim(), '11', 'the intact part is still served')
  t.is(exp.haltReason, undefined)
  await exp.close()
  t.deepEqual(await readFile(image), before, 'a read-only export wrote nothing')
})
