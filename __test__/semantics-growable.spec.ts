/**
 * iotest 308 "Try growing growable export": writes past EOF grow a growable export (and its
 * image), `truncate` shrinks it, and a file written through the export compares equal with the
 * image offline.
 */
import { randomBytes } from 'node:crypto'
import { readFile, writeFile } from 'node:fs/promises'
import { join } from 'node:path'

import test from 'ava'

import { assertE2eEnvironment } from './helpers/env.js'
import { imageFixture } from './helpers/exports.js'
import { KiB, MiB } from './helpers/files.js'
import { client, ddRecords, mustClient, openExport, sizeOf } from './helpers/semantics.js'

test.before(() => {
  assertE2eEnvironment(['dd', 'truncate', 'stat', 'cmp', 'findmnt'])
})

const LEN = 4 * MiB

test('dd past EOF (bs=1 count=64k seek=EOF conv=notrunc) grows a growable export and its image by 64k', async (t) => {
  const f = await imageFixture(t, LEN)
  const pattern = randomBytes(64 * KiB)
  const patternFile = join(f.dir, 'pattern')
  await writeFile(patternFile, pattern)
  const exp = await openExport(t, { source: f.image, mountpoint: f.mountpoint, writable: true, growable: true })
  const r = await client('dd', [
    `if=${patternFile}`,
    `of=${f.mountpoint}`,
    'bs=1',
    'count=64k',
    `seek=${LEN}`,
    'conv=notrunc',
  ])
  t.is(r.code, 0, r.stderr)
  t.deepEqual(ddRecords(r.stderr), { fullIn: 65536, partialIn: 0, fullOut: 65536, partialOut: 0 })
  t.is(await sizeOf(f.mountpoint), LEN + 64 * KiB)
  t.is(await sizeOf(f.image), LEN + 64 * KiB, 'image size = old + 64k')
  t.is(exp.size, LEN + 64 * KiB)
  await mustClient('cmp', ['-n', String(64 * KiB), '-i', `${LEN}:0`, f.mountpoint, patternFile])
  await exp.close()
  t.true((await readFile(f.image)).equals(Buffer.concat([f.data, pattern])), 'the image is old content + the write')
})

test('a write squarely past EOF grows a growable export; the gap reads as zeros', async (t) => {
  const f = await imageFixture(t, LEN)
  const exp = await openExport(t, { source: f.image, mountpoint: f.mountpoint, writable: true, growable: true })
  const at = LEN + 32 * KiB
  await mustClient('sh', ['-c', `printf X | dd of='${f.mountpoint}' bs=1 count=1 seek=${at} conv=notrunc status=none`])
  t.is(await sizeOf(f.mountpoint), at + 1)
  t.is(await sizeOf(f.image), at + 1)
  await exp.close()
  const image = await readFile(f.image)
  t.true(image.subarray(0, LEN).equals(f.data))
  t.true(
    image.subarray(LEN, at).every((b) => b === 0),
    'the gap is zeros',
  )
  t.is(image.subarray(at).toString(), 'X')
})

test('truncate -s shrinks a growable export and its image (and grows it again)', async (t) => {
  const f = await imageFixture(t, LEN)
  const exp = await openExport(t, { source: f.image, mountpoint: f.mountpoint, writable: true, growable: true })
  await mustClient('truncate', ['-s', String(MiB + 512), f.mountpoint])
  t.is(await sizeOf(f.mountpoint), MiB + 512, 'the export shrank')
  t.is(await sizeOf(f.image), MiB + 512, 'the image shrank')
  t.is(exp.size, MiB + 512)
  await mustClient('cmp', [f.mountpoint, f.image])
  await mustClient('truncate', ['-s', String(2 * MiB), f.mountpoint])
  t.is(await sizeOf(f.mountpoint), 2 * MiB, 'truncate grows it again')
  t.is(await sizeOf(f.image), 2 * MiB)
  await exp.close()
  const image = await readFile(f.image)
  t.true(image.subarray(0, MiB + 512).equals(f.data.subarray(0, MiB + 512)), 'what was kept is unchanged')
  t.true(
    image.subarray(MiB + 512).every((b) => b === 0),
    'what was cut off and regrown reads as zeros',
  )
})

test('a random 3 MiB file dd-ed onto a (smaller) growable export equals the image offline', async (t) => {
  const f = await imageFixture(t, MiB)
  const rand = join(f.dir, 'rand')
  const data = randomBytes(3 * MiB)
  await writeFile(rand, data)
  const exp = await openExport(t, { source: f.image, mountpoint: f.mountpoint, writable: true, growable: true })
  // Without conv=notrunc: dd truncates the export to 0 first (O_TRUNC), then grows it by writing.
  await mustClient('dd', [`if=${rand}`, `of=${f.mountpoint}`, 'bs=256k', 'status=none'])
  t.is(await sizeOf(f.mountpoint), 3 * MiB)
  await mustClient('cmp', [rand, f.mountpoint])
  await exp.close()
  await mustClient('cmp', [rand, f.image])
  t.is(await sizeOf(f.image), 3 * MiB)
  t.true((await readFile(f.image)).equals(data))
})
