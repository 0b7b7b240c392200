/**
 * Cache and durability options. `cache: 'none'` opens the image with O_DIRECT and must honour its
 * alignment itself: clients may still do any I/O (fio with O_DIRECT and verification, unaligned dd
 * writes and reads, a tail that is not block-aligned). `writethrough` is checked functionally.
 */
import { randomBytes } from 'node:crypto'
import { readFile, writeFile } from 'node:fs/promises'
import { join } from 'node:path'

import test from 'ava'

import { assertE2eEnvironment } from './helpers/env.js'
import { imageFixture } from './helpers/exports.js'
import { KiB, MiB } from './helpers/files.js'
import { client, mustClient, openExport } from './helpers/semantics.js'

test.before(() => {
  assertE2eEnvironment(['fio', 'dd', 'cmp', 'qemu-io', 'findmnt'])
})

test("cache 'none': fio randwrite with O_DIRECT, libaio iodepth 8 and crc32c verification passes", async (t) => {
  const f = await imageFixture(t, 16 * MiB)
  const exp = await openExport(t, { source: f.image, mountpoint: f.mountpoint, writable: true, cache: 'none' })
  t.is(exp.options.cache, 'none')
  const r = await client('fio', [
    '--name=v',
    `--filename=${f.mountpoint}`,
    '--rw=randwrite',
    '--bs=4k',
    '--size=16M',
    '--direct=1',
    '--ioengine=libaio',
    '--iodepth=8',
    '--verify=crc32c',
    '--do_verify=1',
  ])
  t.is(r.code, 0, `fio exited ${r.code}\n${r.stdout}\n${r.stderr}`)
  t.regex(r.stdout, /err= 0/)
  t.notRegex(r.stdout + r.stderr, /verify: |bad magic|crc32c: verify failed/i)
  t.regex(r.stdout, /WRITE: bw=.*io=16\.0MiB/, 'all 16 MiB were written')
  t.regex(r.stdout, /READ: bw=.*io=16\.0MiB/, 'and all of it was read back for verification')
})

test("cache 'none': unaligned dd writes (bs=1000 seek=3) and reads land correctly, also at an unaligned EOF", async (t) => {
  const len = 4 * MiB + 1000
  const f = await imageFixture(t, len)
  const pattern = randomBytes(5000)
  const patternFile = join(f.dir, 'pattern')
  await writeFile(patternFile, pattern)
  const tail = randomBytes(300)
  const tailFile = join(f.dir, 'tail')
  await writeFile(tailFile, tail)
  const expected = Buffer.from(f.data)
  pattern.copy(expected, 3000)
  tail.copy(expected, len - 300)
  const expectedFile = join(f.dir, 'expected')
  await writeFile(expectedFile, expected)

  await openExport(t, { source: f.image, mountpoint: f.mountpoint, writable: true, cache: 'none' })
  const w = await client('dd', [`if=${patternFile}`, `of=${f.mountpoint}`, 'bs=1000', 'seek=3', 'conv=notrunc'])
  t.is(w.code, 0, `unaligned write: ${w.stderr}`)
  const wt = await client('dd', [
    `if=${tailFile}`,
    `of=${f.mountpoint}`,
    'bs=100',
    `seek=${len - 300}`,
    'oflag=seek_bytes',
    'conv=notrunc',
  ])
  t.is(wt.code, 0, `unaligned write at the unaligned EOF: ${wt.stderr}`)

  const readBack = join(f.dir, 'read-back')
  const rd = await client('dd', [`if=${f.mountpoint}`, `of=${readBack}`, 'bs=1000', 'skip=3', 'count=5'])
  t.is(rd.code, 0, `unaligned read: ${rd.stderr}`)
  if (rd.code === 0) t.true((await readFile(readBack)).equals(pattern), 'the unaligned read returns the write')
  const cmp = await client('cmp', [expectedFile, f.mountpoint])
  t.is(cmp.code, 0, `the export equals the expected content: ${cmp.stdout}${cmp.stderr}`)
})

test("cache 'none': after close the image has exactly the unaligned writes", async (t) => {
  const f = await imageFixture(t, 2 * MiB)
  const pattern = randomBytes(5000)
  const patternFile = join(f.dir, 'pattern')
  await writeFile(patternFile, pattern)
  const exp = await openExport(t, { source: f.image, mountpoint: f.mountpoint, writable: true, cache: 'none' })
  const w = await client('dd', [`if=${patternFile}`, `of=${f.mountpoint}`, 'bs=1000', 'seek=3', 'conv=notrunc'])
  await exp.close()
  t.is(w.code, 0, `unaligned write: ${w.stderr}`)
  const expected = Buffer.from(f.data)
  pattern.copy(expected, 3000)
  t.true((await readFile(f.image)).equals(expected), 'the image has the write at 3000 and nothing else changed')
})

test('writethrough: writes through the export work and are in the image (writeback and none)', async (t) => {
  for (const cache of ['writeback', 'none'] as const) {
    const f = await imageFixture(t, 4 * MiB)
    const exp = await openExport(t, {
      source: f.image,
      mountpoint: f.mountpoint,
      writable: true,
      writethrough: true,
      cache,
    })
    t.true(exp.options.writethrough)
    const w = await client('qemu-io', ['-f', 'raw', '-c', 'write -P 0x33 64k 192k', f.mountpoint])
    t.regex(w.stdout, /^wrote 196608\/196608 bytes at offset 65536$/m, `${cache}: ${w.stdout}${w.stderr}`)
    await mustClient('dd', [
      'if=/dev/zero',
      `of=${f.mountpoint}`,
      'bs=4k',
      'count=2',
      'seek=300',
      'conv=notrunc,fsync',
      'status=none',
    ])
    await exp.close()
    const expected = Buffer.from(f.data)
    expected.fill(0x33, 64 * KiB, 256 * KiB)
    expected.fill(0, 300 * 4 * KiB, 302 * 4 * KiB)
    t.true((await readFile(f.image)).equals(expected), `${cache}: the image has both writes`)
  }
})
