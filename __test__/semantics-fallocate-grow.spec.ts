/**
 * iotest 308 "Resize export": a non-growable export can still be grown explicitly with
 * `fallocate` at EOF. The image grows identically to a size that is not a multiple of 128 KiB,
 * its disk usage grows (preallocation), and a read across the new EOF is short.
 */
import { readFile } from 'node:fs/promises'
import { join } from 'node:path'

import test from 'ava'

import { assertE2eEnvironment } from './helpers/env.js'
import { imageFixture } from './helpers/exports.js'
import { KiB, MiB } from './helpers/files.js'
import { blocksOf, client, ddRecords, mustClient, openExport, sizeOf } from './helpers/semantics.js'

test.before(() => {
  assertE2eEnvironment(['fallocate', 'dd', 'stat', 'cmp', 'findmnt'])
})

test('fallocate -o EOF grows a non-growable export to a non-128k-multiple; disk usage grows; a read across the new EOF is short', async (t) => {
  // An EOF that is not even 4k-aligned: the extension starts mid-block.
  const origLen = 4 * MiB + 3 * KiB
  const bs = 128 * KiB
  const extendTo = Math.ceil(origLen / bs) * bs + bs / 2
  const extendBy = extendTo - origLen
  t.not(extendTo % bs, 0, 'the new size must not be a multiple of 128 KiB')

  const f = await imageFixture(t, origLen)
  const exp = await openExport(t, { source: f.image, mountpoint: f.mountpoint, writable: true })
  const origBlocks = await blocksOf(f.image)

  const r = await client('fallocate', ['-o', String(origLen), '-l', String(extendBy), f.mountpoint])
  t.is(r.code, 0, `fallocate: ${r.stderr}`)
  t.is(await sizeOf(f.mountpoint), extendTo, 'the export has the new size')
  t.is(await sizeOf(f.image), extendTo, 'the image grew identically')
  t.is(exp.size, extendTo, 'FuseExport.size follows')
  const newBlocks = await blocksOf(f.image)
  t.true(newBlocks > origBlocks, `disk usage grew: ${origBlocks} -> ${newBlocks} blocks`)
  t.true(newBlocks * 512 >= extendTo, `the extension is preallocated: ${newBlocks} blocks for ${extendTo} bytes`)

  // dd can only read in bs units; with the EOF in the middle of a 128k block the read is short.
  const out = join(f.dir, 'across-eof')
  const dd = await client('dd', [
    `if=${f.mountpoint}`,
    `of=${out}`,
    `bs=${bs}`,
    'count=2',
    `skip=${Math.floor(extendTo / bs)}`,
  ])
  t.is(dd.code, 0, dd.stderr)
  t.deepEqual(ddRecords(dd.stderr), { fullIn: 0, partialIn: 1, fullOut: 0, partialOut: 1 })
  t.is(await sizeOf(out), extendTo % bs, 'the short read returned exactly the bytes up to EOF')

  // The old content is intact and the extension reads as zeros.
  await mustClient('cmp', ['-n', String(origLen), f.mountpoint, f.image])
  await mustClient('cmp', ['-n', String(extendBy), '-i', `${origLen}:0`, f.mountpoint, '/dev/zero'])
  await exp.close()
  const image = await readFile(f.image)
  t.is(image.length, extendTo)
  t.true(image.subarray(0, origLen).equals(f.data))
  t.true(
    image.subarray(origLen).every((b) => b === 0),
    'the extension is zeros in the image',
  )
})
