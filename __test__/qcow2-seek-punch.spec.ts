/**
 * Issue 6, allocation: SEEK_DATA/SEEK_HOLE on a sparse qcow2 with a backing file find exactly the
 * ranges `qemu-img map` reports as data (a cluster unallocated in the whole chain, or a zero
 * cluster, is a hole); FALLOCATE punch hole makes the range read zeros and `qemu-img map` no
 * longer report it as data, even where the backing file has data; zero range reads zeros; the
 * image stays clean. GETATTR's block count is the image file's allocation.
 */
import test from 'ava'

import { assertE2eEnvironment } from './helpers/env.js'
import { KiB, MiB } from './helpers/files.js'
import {
  assertClean,
  assertIdentical,
  convertToRaw,
  createQcow2,
  dataRanges,
  map,
  qcow2Dir,
  qemuIo,
  type Compat,
} from './helpers/qcow2.js'
import { blocksOf, mustClient, openExport, seekProbes, type SeekProbe } from './helpers/semantics.js'

test.before(() => {
  assertE2eEnvironment(['qemu-img', 'qemu-io', 'python3', 'fallocate', 'findmnt'])
})

/** SEEK_DATA/SEEK_HOLE answers for a disk of `size` whose data is exactly `ranges`. */
function expected(ranges: Array<[number, number]>, size: number, offsets: readonly number[]): SeekProbe[] {
  return offsets.flatMap((offset): SeekProbe[] => {
    if (offset >= size) {
      return [
        { offset, whence: 'DATA', result: 'ENXIO' },
        { offset, whence: 'HOLE', result: 'ENXIO' },
      ]
    }
    const inside = ranges.find(([s, e]) => offset >= s && offset < e)
    const nextData = inside ? offset : ranges.find(([s]) => s > offset)?.[0]
    return [
      { offset, whence: 'DATA', result: nextData ?? 'ENXIO' },
      { offset, whence: 'HOLE', result: inside ? inside[1] : offset },
    ]
  })
}

/** Every range boundary, and points just inside and around them. */
function probeOffsets(ranges: Array<[number, number]>, size: number): number[] {
  const set = new Set<number>([0, 1, size - 1, size, size + MiB])
  for (const [s, e] of ranges) for (const o of [s - 1, s, s + 1, e - 1, e, e + 1]) if (o >= 0) set.add(o)
  return [...set].sort((a, b) => a - b)
}

const SIZE = 16 * MiB

test('SEEK_DATA/SEEK_HOLE on a sparse qcow2 over a backing file find exactly what qemu-img map calls data', async (t) => {
  const d = await qcow2Dir(t)
  const base = d.path('base.qcow2')
  const top = d.path('top.qcow2')
  await createQcow2(base, SIZE)
  await qemuIo(base, 'qcow2', 'write -P 1 1M 1M', 'write -P 2 8M 64k', 'write -P 3 12M 2M')
  await createQcow2(top, undefined, { backing: 'base.qcow2' })
  await qemuIo(
    top,
    'qcow2',
    'write -P 4 4M 1M', // data only in the top
    'write -P 5 2M 64k', // adjacent to the base's data: one data range across both layers
    'write -z 12M 512k', // a zero cluster over the base's data: a hole
    'write -P 6 15M 64k',
  )
  const ranges = await dataRanges(top)
  // The layout qemu-img reports, so the test proves what it claims.
  t.deepEqual(ranges, [
    [1 * MiB, 2 * MiB + 64 * KiB],
    [4 * MiB, 5 * MiB],
    [8 * MiB, 8 * MiB + 64 * KiB],
    [12 * MiB + 512 * KiB, 14 * MiB],
    [15 * MiB, 15 * MiB + 64 * KiB],
  ])
  await openExport(t, { source: top, mountpoint: d.mountpoint, format: 'qcow2' })
  const offsets = probeOffsets(ranges, SIZE)
  t.deepEqual(await seekProbes(d.mountpoint, offsets), expected(ranges, SIZE, offsets))
})

for (const compat of ['0.10', '1.1'] as Compat[]) {
  test(`punch hole (compat ${compat}, no backing file): reads zeros, qemu-img map shows no data there, check clean`, async (t) => {
    const d = await qcow2Dir(t)
    const image = d.path('img.qcow2')
    await createQcow2(image, 4 * MiB, { compat })
    await qemuIo(image, 'qcow2', 'write -P 0x77 0 4M')
    const exp = await openExport(t, { source: image, mountpoint: d.mountpoint, format: 'qcow2', writable: true })
    // Whole clusters, and an unaligned range whose partial clusters must read zeros as well.
    await mustClient('fallocate', ['-p', '-o', String(1 * MiB), '-l', String(128 * KiB), d.mountpoint])
    await mustClient('fallocate', ['-p', '-o', String(2 * MiB + 1000), '-l', String(200 * KiB), d.mountpoint])
    const mirror = d.path('mirror.raw')
    await mustClient('sh', [
      '-c',
      `head -c ${4 * MiB} /dev/zero | tr '\\0' '\\167' > '${mirror}'` +
        ` && fallocate -p -o ${1 * MiB} -l ${128 * KiB} '${mirror}'` +
        ` && fallocate -p -o ${2 * MiB + 1000} -l ${200 * KiB} '${mirror}'`,
    ])
    await mustClient('cmp', [d.mountpoint, mirror])
    await exp.close()
    await assertClean(t, image)
    await assertIdentical(t, mirror, image)
    const data = await dataRanges(image)
    const overlaps = (s: number, e: number) => data.some(([ds, de]) => ds < e && de > s)
    t.false(overlaps(1 * MiB, 1 * MiB + 128 * KiB), `punched clusters are no data: ${JSON.stringify(data)}`)
    // The clusters wholly inside the unaligned range are deallocated too.
    t.false(overlaps(2 * MiB + 64 * KiB, 2 * MiB + 192 * KiB), `inner clusters are no data: ${JSON.stringify(data)}`)
  })
}

for (const compat of ['0.10', '1.1'] as Compat[]) {
  test(`punch hole over backing data (compat ${compat}) reads zeros, not the backing data${compat === '1.1' ? '; map shows zero, not data' : ''}`, async (t) => {
    const d = await qcow2Dir(t)
    const base = d.path('base.qcow2')
    const top = d.path('top.qcow2')
    await createQcow2(base, 4 * MiB, { compat })
    await qemuIo(base, 'qcow2', 'write -P 0x55 0 4M')
    await createQcow2(top, undefined, { compat, backing: 'base.qcow2' })
    await qemuIo(top, 'qcow2', 'write -P 0x66 1M 64k')
    const exp = await openExport(t, { source: top, mountpoint: d.mountpoint, format: 'qcow2', writable: true })
    await mustClient('fallocate', ['-p', '-o', String(512 * KiB), '-l', String(1 * MiB), d.mountpoint])
    const r = await mustClient('od', ['-An', '-tx1', '-v', `-j${512 * KiB}`, `-N${1 * MiB}`, d.mountpoint])
    t.true(/^[\s0]*$/.test(r.stdout), 'the punched range reads zeros')
    if (compat === '1.1') {
      // SEEK_HOLE at the punched range: it is a hole now (zero clusters).
      const probes = await seekProbes(d.mountpoint, [512 * KiB])
      t.deepEqual(probes, [
        { offset: 512 * KiB, whence: 'DATA', result: 1536 * KiB },
        { offset: 512 * KiB, whence: 'HOLE', result: 512 * KiB },
      ])
    }
    await exp.close()
    await assertClean(t, top)
    const mirror = d.path('mirror.raw')
    await convertToRaw(base, mirror)
    await mustClient('sh', [
      '-c',
      `head -c ${64 * KiB} /dev/zero | tr '\\0' '\\146' |` +
        ` dd of='${mirror}' bs=64k seek=16 conv=notrunc status=none` +
        ` && fallocate -p -o ${512 * KiB} -l ${1 * MiB} '${mirror}'`,
    ])
    await assertIdentical(t, mirror, top)
    if (compat === '1.1') {
      const entries = (await map(top)).filter((e) => e.start < 1536 * KiB && e.start + e.length > 512 * KiB)
      t.true(
        entries.every((e) => e.zero && !e.data && e.start >= 512 * KiB && e.start + e.length <= 1536 * KiB),
        JSON.stringify(entries),
      )
    }
  })
}

for (const compat of ['0.10', '1.1'] as Compat[]) {
  test(`zero range (fallocate -z, compat ${compat}) reads zeros and keeps the image clean`, async (t) => {
    const d = await qcow2Dir(t)
    const image = d.path('img.qcow2')
    await createQcow2(image, 2 * MiB, { compat })
    await qemuIo(image, 'qcow2', 'write -P 0x33 0 2M')
    const exp = await openExport(t, { source: image, mountpoint: d.mountpoint, format: 'qcow2', writable: true })
    await mustClient('fallocate', ['-z', '-o', String(100 * KiB), '-l', String(300 * KiB), d.mountpoint])
    const offline = d.path('offline.raw')
    await exp.close()
    await assertClean(t, image)
    await convertToRaw(image, offline)
    const r = await mustClient('od', ['-An', '-tx1', '-v', `-j${100 * KiB}`, `-N${300 * KiB}`, offline])
    t.true(/^[\s0]*$/.test(r.stdout), 'the zeroed range reads zeros')
    const before = await mustClient('od', ['-An', '-tx1', '-v', `-j${100 * KiB - 1}`, '-N1', offline])
    t.is(before.stdout.trim(), '33')
  })
}

test("GETATTR's block count is the image file's allocation, not the virtual size", async (t) => {
  const d = await qcow2Dir(t)
  const image = d.path('img.qcow2')
  await createQcow2(image, 1024 * MiB)
  await qemuIo(image, 'qcow2', 'write -P 1 0 1M')
  await openExport(t, { source: image, mountpoint: d.mountpoint, format: 'qcow2' })
  t.is(await blocksOf(d.mountpoint), await blocksOf(image))
  t.true((await blocksOf(d.mountpoint)) * 512 < 16 * MiB)
})
