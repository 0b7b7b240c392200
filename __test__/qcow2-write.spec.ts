/**
 * Issue 6, writing qcow2: writes through a writable qcow2 export (dd into allocated and unallocated
 * clusters, unaligned, over a backing chain; fio with crc32c verify; growing and shrinking) leave
 * an image that `qemu-img check` finds free of errors and leaks, and that `qemu-img compare` finds
 * identical to a raw copy which received the same writes. Backing files are never written, and a
 * flush through the export makes the data visible to an independent reader at once.
 */
import { readFile } from 'node:fs/promises'

import test from 'ava'

import { assertE2eEnvironment } from './helpers/env.js'
import { KiB, MiB, sha256 } from './helpers/files.js'
import { fioVerifyArgs, parseFioReport } from './helpers/fio.js'
import {
  assertClean,
  assertIdentical,
  convertToRaw,
  createQcow2,
  qcow2Dir,
  qemuIo,
  threeLevelChain,
  virtualSize,
  type Compat,
} from './helpers/qcow2.js'
import { run } from './helpers/run.js'
import { C_ENV, mustClient, openExport, sizeOf } from './helpers/semantics.js'

test.before(() => {
  assertE2eEnvironment(['qemu-img', 'qemu-io', 'fio', 'dd', 'truncate', 'findmnt'])
})

/** One write: `len` bytes of `pattern` at `offset`, by dd (conv=notrunc, so it never truncates). */
interface Write {
  offset: number
  len: number
  pattern: number
}

/** Applies `w` to `path` with dd (from a pattern file), optionally fsyncing. */
async function ddWrite(path: string, w: Write, source: string, fsync = false): Promise<void> {
  await mustClient('dd', [
    `if=${source}`,
    `of=${path}`,
    'bs=64k',
    `count=${w.len}`,
    `seek=${w.offset}`,
    'iflag=count_bytes',
    'oflag=seek_bytes',
    `conv=notrunc${fsync ? ',fsync' : ''}`,
    'status=none',
  ])
}

/** Makes a file of `len` bytes of `pattern` for dd to copy from. */
async function patternFile(dir: (name: string) => string, w: Write): Promise<string> {
  const p = dir(`pattern-${w.pattern}-${w.len}`)
  await mustClient('sh', ['-c', `head -c ${w.len} /dev/zero | tr '\\0' '\\${w.pattern.toString(8)}' > '${p}'`])
  return p
}

const WRITES: Write[] = [
  { offset: 0, len: 4 * KiB, pattern: 0o101 }, // the first cluster
  { offset: 70_000, len: 200_000, pattern: 0o102 }, // unaligned, spans clusters
  { offset: 3 * MiB - 100, len: 300, pattern: 0o103 }, // across a cluster boundary, into data
  { offset: 5 * MiB, len: 1 * MiB, pattern: 0o104 }, // whole clusters, one request
  { offset: 7 * MiB + 12_345, len: 1, pattern: 0o105 }, // one byte into an unallocated cluster
  { offset: 8 * MiB - 512, len: 512, pattern: 0o106 }, // the last sector
]

for (const compat of ['0.10', '1.1'] as Compat[]) {
  test(`dd writes through a writable export (compat ${compat}, over a backing chain): check clean, compare identical to a raw copy with the same writes; backing files untouched`, async (t) => {
    const d = await qcow2Dir(t)
    const { base, mid, top } = await threeLevelChain(d, 8 * MiB, compat)
    const mirror = d.path('mirror.raw')
    await convertToRaw(top, mirror)
    const backingBefore = [await sha256(base), await sha256(mid)]

    const exp = await openExport(t, { source: top, mountpoint: d.mountpoint, format: 'qcow2', writable: true })
    for (const w of WRITES) {
      const src = await patternFile(d.path, w)
      await ddWrite(d.mountpoint, w, src)
      await ddWrite(mirror, w, src)
    }
    // What the export serves now equals the mirror.
    await mustClient('cmp', [d.mountpoint, mirror])
    // A flush through the export (fsync) puts data and metadata on disk: an independent reader
    // sees the writes while the export is still up.
    const last: Write = { offset: 6 * MiB + 1, len: 4097, pattern: 0o107 }
    const src = await patternFile(d.path, last)
    await ddWrite(d.mountpoint, last, src, true)
    await ddWrite(mirror, last, src)
    await assertIdentical(t, mirror, top, 'qcow2', 'while exported, after fsync')
    await assertClean(t, top)

    await exp.close()
    await assertClean(t, top)
    await assertIdentical(t, mirror, top, 'qcow2', 'after close')
    t.deepEqual([await sha256(base), await sha256(mid)], backingBefore, 'the backing files were not written')
  })
}

for (const threads of [1, 4]) {
  test.serial(
    `fio randwrite + verify=crc32c on an empty qcow2 (${threads} thread(s)): zero errors; check clean; the image equals what the export served`,
    async (t) => {
      const d = await qcow2Dir(t)
      const image = d.path('img.qcow2')
      const SIZE = 64 * MiB
      await createQcow2(image, SIZE)
      const exp = await openExport(t, {
        source: image,
        mountpoint: d.mountpoint,
        format: 'qcow2',
        writable: true,
        threads,
      })
      const output = d.path('fio.json')
      const r = await run('fio', fioVerifyArgs({ filename: d.mountpoint, jobs: 2, size: SIZE / 2, output }), {
        cwd: d.dir,
        env: C_ENV,
      })
      const report = parseFioReport(await readFile(output, 'utf8').catch(() => r.stdout))
      t.is(r.code, 0, `fio exited ${r.code}:\n${r.stderr}`)
      for (const job of report.jobs) {
        t.is(job.error, 0, `job ${job.jobname}`)
        t.is(job.write.io_bytes, SIZE / 2, `job ${job.jobname} wrote its half`)
      }
      // The raw copy of what the export served, taken before close.
      const served = d.path('served.raw')
      await mustClient('dd', [`if=${d.mountpoint}`, `of=${served}`, 'bs=1M', 'status=none'])
      await exp.close()
      await assertClean(t, image)
      await assertIdentical(t, served, image, 'qcow2', 'served vs image after close')
    },
  )
}

test('growable: writes past the end grow the image, truncate shrinks and grows it; qemu-img agrees', async (t) => {
  const d = await qcow2Dir(t)
  const image = d.path('img.qcow2')
  await createQcow2(image, 1 * MiB + 512)
  await qemuIo(image, 'qcow2', 'write -P 0x61 0 1M')
  const mirror = d.path('mirror.raw')
  await convertToRaw(image, mirror)
  const exp = await openExport(t, {
    source: image,
    mountpoint: d.mountpoint,
    format: 'qcow2',
    writable: true,
    growable: true,
  })

  const grow: Write = { offset: 3 * MiB + 7, len: 70_000, pattern: 0o141 }
  const src = await patternFile(d.path, grow)
  for (const path of [d.mountpoint, mirror]) await ddWrite(path, grow, src)
  t.is(await sizeOf(d.mountpoint), grow.offset + grow.len)
  t.is(exp.size, grow.offset + grow.len)
  await mustClient('cmp', [d.mountpoint, mirror])

  // Shrink into the data, then grow again: the regrown range reads as zeros, not the old data.
  for (const path of [d.mountpoint, mirror]) await mustClient('truncate', ['-s', String(512 * KiB + 3), path])
  for (const path of [d.mountpoint, mirror]) await mustClient('truncate', ['-s', String(2 * MiB), path])
  t.is(await sizeOf(d.mountpoint), 2 * MiB)
  await mustClient('cmp', [d.mountpoint, mirror])

  await exp.close()
  t.is(await virtualSize(image), 2 * MiB)
  await assertClean(t, image)
  await assertIdentical(t, mirror, image, 'qcow2', 'after close')
})

test('growing an image whose backing file is longer does not let the backing data show through', async (t) => {
  const d = await qcow2Dir(t)
  const base = d.path('base.qcow2')
  await createQcow2(base, 4 * MiB)
  await qemuIo(base, 'qcow2', 'write -P 0x71 0 4M')
  const top = d.path('top.qcow2')
  await createQcow2(top, 1 * MiB, { backing: 'base.qcow2' })
  const exp = await openExport(t, {
    source: top,
    mountpoint: d.mountpoint,
    format: 'qcow2',
    writable: true,
    growable: true,
  })
  await mustClient('truncate', ['-s', String(3 * MiB), d.mountpoint])
  const tail = await mustClient('od', ['-An', '-tx1', '-v', `-j${1 * MiB}`, d.mountpoint])
  t.true(/^[\s0]*$/.test(tail.stdout), 'the grown range reads as zeros')
  await exp.close()
  await assertClean(t, top)
  const mirror = d.path('mirror.raw')
  await mustClient('sh', ['-c', `head -c ${1 * MiB} /dev/zero | tr '\\0' '\\161' > '${mirror}'`])
  await mustClient('truncate', ['-s', String(3 * MiB), mirror])
  await assertIdentical(t, mirror, top, 'qcow2', 'after close')
})

test("cache 'none' (O_DIRECT on every file of the chain): unaligned writes over a backing file, check clean, compare identical", async (t) => {
  const d = await qcow2Dir(t)
  const { top } = await threeLevelChain(d, 8 * MiB)
  const mirror = d.path('mirror.raw')
  await convertToRaw(top, mirror)
  const exp = await openExport(t, { source: top, mountpoint: d.mountpoint, writable: true, cache: 'none' })
  for (const w of WRITES) {
    const src = await patternFile(d.path, w)
    await ddWrite(d.mountpoint, w, src)
    await ddWrite(mirror, w, src)
  }
  await mustClient('cmp', [d.mountpoint, mirror])
  await exp.close()
  await assertClean(t, top)
  await assertIdentical(t, mirror, top, 'qcow2', 'after close')
})
