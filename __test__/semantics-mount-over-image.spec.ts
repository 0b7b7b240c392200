/**
 * iotest 308 "Mount over existing file": an export may cover the image file itself and then shows
 * the image's old content through the same path. Together with a second export of the same image
 * both are read concurrently, and `cp` of the export works (it expects a short read at EOF).
 */
import { readFile, stat } from 'node:fs/promises'
import { join } from 'node:path'

import test from 'ava'

import { assertE2eEnvironment } from './helpers/env.js'
import { imageFixture } from './helpers/exports.js'
import { MiB } from './helpers/files.js'
import { isMounted } from './helpers/mounts.js'
import { client, mustClient, openExport, sizeOf } from './helpers/semantics.js'

test.before(() => {
  assertE2eEnvironment(['cmp', 'cp', 'stat', 'qemu-img', 'qemu-io', 'findmnt'])
})

// Not a multiple of any buffer size cp uses, so its last read is short.
const SIZE = 4 * MiB + 1000

test('an export over the image itself reads the old content, next to a second export of it', async (t) => {
  const f = await imageFixture(t, SIZE)
  const before = await stat(f.image)
  // The second export opens the image while it is still uncovered, like QEMU's second export
  // of the same node.
  const second = await openExport(t, { source: f.image, mountpoint: f.mountpoint })
  const over = await openExport(t, { source: f.image, mountpoint: f.image })
  t.is(over.mountpoint, f.image)
  t.true(await isMounted(f.image), 'findmnt sees a mount on the image path')
  const covered = await stat(f.image)
  t.not(covered.ino, before.ino, 'the image path now shows the export, not the file')
  t.is(covered.size, SIZE)
  t.true((await readFile(f.image)).equals(f.data), 'reading the image path gives the old content')

  // Both exports at the same time: a concurrency test.
  const [cmp, compare] = await Promise.all([
    client('cmp', [f.mountpoint, f.image]),
    client('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', f.mountpoint, f.image]),
  ])
  t.is(cmp.code, 0, cmp.stdout + cmp.stderr)
  t.is(compare.code, 0, compare.stdout + compare.stderr)
  t.is(compare.stdout.trim(), 'Images are identical.')

  const copy = join(f.dir, 'img.exported')
  const cp = await client('cp', [f.image, copy])
  t.is(cp.code, 0, `cp of the export: ${cp.stderr}`)
  t.is(await sizeOf(copy), SIZE, 'the copy has the full size: the short read at EOF was taken as EOF')

  await over.close()
  await second.close()
  t.false(await isMounted(f.image))
  t.false(await isMounted(f.mountpoint))
  const after = await stat(f.image)
  t.is(after.ino, before.ino, 'the image path is the image file again')
  t.true((await readFile(copy)).equals(f.data), 'the copy equals the image offline')
  await mustClient('cmp', [copy, f.image])
})

test('an export over the image itself can be written and the write is in the file afterwards', async (t) => {
  const f = await imageFixture(t, SIZE)
  const over = await openExport(t, { source: f.image, mountpoint: f.image, writable: true })
  await mustClient('qemu-io', ['-f', 'raw', '-c', 'write -P 0x5a 1M 64k', f.image])
  await over.close()
  t.false(await isMounted(f.image))
  const expected = Buffer.from(f.data)
  expected.fill(0x5a, MiB, MiB + 64 * 1024)
  t.true((await readFile(f.image)).equals(expected), 'the write went to the covered file')
})
