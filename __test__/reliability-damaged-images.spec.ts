/**
 * Issue 21: dirty and corrupt qcow2 images are still readable. A crash with lazy_refcounts leaves
 * the dirty bit: the image exports read-only, and writable is refused with the exact
 * `qemu-img check -r all` hint until repaired. The corrupt bit: read-only with a warning, writable
 * refused.
 */
import { open } from 'node:fs/promises'
import { join } from 'node:path'

import test, { type ExecutionContext } from 'ava'

import { FuseExport, isBlockfuseError } from '../ts/index.js'
import { assertCliBuilt, CliProcess } from './helpers/cli.js'
import { patch, peek } from './helpers/damage.js'
import { assertE2eEnvironment } from './helpers/env.js'
import { KiB, makeMountpoint, MiB, tempDir } from './helpers/files.js'
import { assertClean, createQcow2, qemuIo } from './helpers/qcow2.js'
import { client, mustClient, openExport } from './helpers/semantics.js'

test.before(() => {
  assertE2eEnvironment(['qemu-img', 'qemu-io', 'python3', 'findmnt'])
  assertCliBuilt()
})

async function readThrough(mnt: string, offset: number, length: number): Promise<Buffer> {
  const fh = await open(mnt, 'r')
  try {
    const buf = Buffer.alloc(length)
    await fh.read(buf, 0, length, offset)
    return buf
  } finally {
    await fh.close()
  }
}

/** A qcow2 with lazy refcounts whose writer was killed: the dirty bit stays set. */
async function crashedImage(t: ExecutionContext) {
  const dir = await tempDir(t)
  const image = join(dir, 'crashed.qcow2')
  const mnt = join(dir, 'm')
  await makeMountpoint(mnt)
  await mustClient('qemu-img', [
    'create',
    '-q',
    '-f',
    'qcow2',
    '-o',
    'compat=1.1,lazy_refcounts=on',
    image,
    String(4 * MiB),
  ])
  // qemu-io kills itself with SIGKILL after the write: no clean close, the dirty bit stays.
  const r = await client('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x33 0 64k', '-c', 'sigraise 9', image])
  t.is(r.signal, 'SIGKILL', r.stdout + r.stderr)
  const incompatible = (await peek(image, 72, 8)).readBigUInt64BE()
  t.is(incompatible & 1n, 1n, 'the dirty bit is set')
  return { dir, image, mnt }
}

test('a dirty qcow2 (crash with lazy_refcounts) exports read-only; writable is refused with the repair hint', async (t) => {
  const f = await crashedImage(t)
  const ro = await openExport(t, { source: f.image, mountpoint: f.mnt })
  t.true((await readThrough(f.mnt, 0, 64 * KiB)).equals(Buffer.alloc(64 * KiB, 0x33)), 'the data reads back')
  await ro.close()
  const err = await t.throwsAsync(FuseExport.create({ source: f.image, mountpoint: f.mnt, writable: true }))
  t.true(isBlockfuseError(err, 'IMAGE_DIRTY'), String(err))
  t.true(err?.message.includes(`qemu-img check -r all ${f.image}`), err?.message)
  // The image itself is unchanged by the refusal (still dirty), and the hint works.
  t.is((await peek(f.image, 72, 8)).readBigUInt64BE() & 1n, 1n)
  await mustClient('qemu-img', ['check', '-q', '-r', 'all', f.image])
  const rw = await openExport(t, { source: f.image, mountpoint: f.mnt, writable: true })
  const fh = await open(f.mnt, 'r+')
  await fh.write(Buffer.alloc(4096, 0x44), 0, 4096, MiB)
  await fh.sync()
  await fh.close()
  await rw.close()
  await assertClean(t, f.image)
})

test('a qcow2 with the corrupt bit exports read-only with a warning; writable is refused (as QEMU)', async (t) => {
  const dir = await tempDir(t)
  const image = join(dir, 'c.qcow2')
  const mnt = join(dir, 'm')
  await makeMountpoint(mnt)
  await createQcow2(image, 4 * MiB)
  await qemuIo(image, 'qcow2', 'write -P 0x55 0 64k')
  const field = await peek(image, 72, 8)
  field.writeBigUInt64BE(field.readBigUInt64BE() | 2n)
  await patch(image, 72, field)
  const q = await client('qemu-io', ['-f', 'qcow2', '-c', 'write 0 4k', image])
  t.regex(q.stderr, /corrupt/i, 'QEMU refuses to write it')
  const err = await t.throwsAsync(FuseExport.create({ source: image, mountpoint: mnt, writable: true }))
  t.true(isBlockfuseError(err, 'IMAGE_CORRUPT'), String(err))
  t.true(err?.message.includes(`qemu-img check -r all ${image}`), err?.message)
  const cli = new CliProcess(['export', image, mnt])
  t.teardown(() => {
    if (cli.child.exitCode === null) cli.child.kill('SIGKILL')
  })
  await cli.waitForLine(/^ready/)
  t.regex(cli.stderr, /marked corrupt; serving it read-only/)
  t.true((await readThrough(mnt, 0, 64 * KiB)).equals(Buffer.alloc(64 * KiB, 0x55)))
  t.is((await cli.stop('SIGTERM')).code, 0, cli.stderr)
  // Read-only export changed nothing: the bit is still set.
  t.is((await peek(image, 72, 8)).readBigUInt64BE() & 2n, 2n)
})

test('a dirty backing file is read through a writable export of its overlay', async (t) => {
  const f = await crashedImage(t)
  const top = join(f.dir, 'top.qcow2')
  await createQcow2(top, undefined, { backing: 'crashed.qcow2' })
  await openExport(t, { source: top, mountpoint: f.mnt, writable: true })
  t.true((await readThrough(f.mnt, 0, 64 * KiB)).equals(Buffer.alloc(64 * KiB, 0x33)))
  const fh = await open(f.mnt, 'r+')
  await fh.write(Buffer.alloc(4096, 0x66), 0, 4096, 4096)
  await fh.sync()
  await fh.close()
  t.pass()
})
