/**
 * FUSE-over-io_uring (`ioUring`): which intake an export uses and why, and the export's semantics
 * when requests come through ring entries instead of read(2): the replies of every kind travel
 * through the entry's payload buffer (data, attributes, statfs, lseek, write counts, errors), so
 * each is checked here with a real client. Needs the kernel's `enable_uring` parameter on (`npm
 * test` switches it on for the run and back afterwards). On a kernel without FUSE-over-io_uring
 * (no `enable_uring` parameter, as on many CI runners) these specs check the documented fallback
 * instead: `auto` serves with read(2) and says why, `on` fails with `IO_URING_UNAVAILABLE`.
 */
import { readFile } from 'node:fs/promises'

import test from 'ava'

import { isBlockfuseError } from '../ts/errors.js'
import { FuseExport } from '../ts/index.js'
import { assertE2eEnvironment } from './helpers/env.js'
import { imageFixture } from './helpers/exports.js'
import { MiB } from './helpers/files.js'
import {
  blocksOf,
  ddRecords,
  mustClient,
  client,
  openExport,
  seekProbes,
  sizeOf,
  statField,
} from './helpers/semantics.js'

const ENABLE_URING = '/sys/module/fuse/parameters/enable_uring'
const uringParam = (await readFile(ENABLE_URING, 'utf8').catch(() => undefined))?.trim()
/** The kernel offers FUSE-over-io_uring and it is on: the io_uring specs run. */
const uringOn = uringParam === 'Y'
/** Only the io_uring specs (without FUSE-over-io_uring only the fallback specs) are registered. */
const uringTest = uringOn ? test : undefined
const fallbackTest = uringOn ? undefined : test

test.before(async () => {
  assertE2eEnvironment(['dd', 'cmp', 'stat', 'truncate', 'fallocate', 'df', 'chmod', 'python3', 'findmnt'])
  if (uringParam === 'N') {
    throw new Error(`FUSE-over-io_uring is off in this kernel (${ENABLE_URING}: N); as root: echo Y > ${ENABLE_URING}`)
  }
  if (!uringOn) {
    console.log(
      `io-uring.spec: this kernel has no FUSE-over-io_uring (${ENABLE_URING} is missing): checking the read(2) fallback instead`,
    )
  }
})

fallbackTest?.("without FUSE-over-io_uring, ioUring 'auto' serves with read(2) and says why", async (t) => {
  const f = await imageFixture(t, MiB)
  for (const threads of [1, 2]) {
    const exp = await openExport(t, { source: f.image, mountpoint: f.mountpoint, threads })
    t.false(exp.ioUring)
    t.regex(exp.ioUringFallback ?? '', threads === 1 ? /one thread/ : /no FUSE-over-io_uring.*CONFIG_FUSE_IO_URING/)
    await mustClient('cmp', [f.image, f.mountpoint])
    await exp.close()
  }
})

fallbackTest?.(
  "without FUSE-over-io_uring, ioUring 'on' fails with IO_URING_UNAVAILABLE and mounts nothing",
  async (t) => {
    const f = await imageFixture(t, MiB)
    for (const threads of [1, 2]) {
      const err = await t.throwsAsync(
        FuseExport.create({ source: f.image, mountpoint: f.mountpoint, threads, ioUring: 'on' }),
      )
      t.true(isBlockfuseError(err, 'IO_URING_UNAVAILABLE'), String(err))
      t.regex(err?.message ?? '', /no FUSE-over-io_uring/)
      t.deepEqual(await readFile(f.mountpoint), Buffer.alloc(0), 'the mountpoint is the plain file it was')
    }
  },
)

uringTest?.(
  "ioUring 'auto' uses io_uring with several threads, read(2) with one (and says why); 'off' never",
  async (t) => {
    const f = await imageFixture(t, MiB)
    const one = await openExport(t, { source: f.image, mountpoint: f.mountpoint })
    t.is(one.options.ioUring, 'auto')
    t.false(one.ioUring)
    t.regex(one.ioUringFallback ?? '', /one thread/)
    await one.close()
    const two = await openExport(t, { source: f.image, mountpoint: f.mountpoint, threads: 2 })
    t.true(two.ioUring)
    t.is(two.ioUringFallback, undefined)
    await two.close()
    const off = await openExport(t, { source: f.image, mountpoint: f.mountpoint, threads: 2, ioUring: 'off' })
    t.false(off.ioUring)
    t.is(off.ioUringFallback, undefined, "'off' is not a fallback")
  },
)

for (const threads of [1, 2, 3]) {
  uringTest?.(
    `io_uring, ${threads} thread(s): reads, 1 MiB O_DIRECT requests, EOF, SETATTR, FALLOCATE, SEEK_DATA/HOLE, STATFS, FSYNC`,
    async (t) => {
      const f = await imageFixture(t, 4 * MiB)
      const exp = await openExport(t, {
        source: f.image,
        mountpoint: f.mountpoint,
        format: 'raw',
        writable: true,
        growable: true,
        threads,
        ioUring: 'on',
      })
      t.true(exp.ioUring)
      t.is(exp.stats().inFlight.length, threads)

      // READ: the whole image through the page cache, and GETATTR.
      t.is(await sizeOf(f.mountpoint), 4 * MiB)
      await mustClient('cmp', [f.image, f.mountpoint])

      // WRITE and READ of 1 MiB with O_DIRECT arrive as single requests.
      const before = exp.stats()
      await mustClient('dd', [
        'if=/dev/urandom',
        `of=${f.mountpoint}`,
        'bs=1M',
        'count=1',
        'seek=1',
        'oflag=direct',
        'conv=notrunc',
      ])
      await mustClient('dd', [`if=${f.mountpoint}`, 'of=/dev/null', 'bs=1M', 'count=1', 'skip=1', 'iflag=direct'])
      const after = exp.stats()
      t.is(after.bytesWritten - before.bytesWritten, MiB)
      t.is((after.requests.WRITE ?? 0) - (before.requests.WRITE ?? 0), 1, 'one WRITE for 1 MiB')
      t.is((after.requests.READ ?? 0) - (before.requests.READ ?? 0), 1, 'one READ for 1 MiB')
      await mustClient('cmp', [f.image, f.mountpoint])

      // EOF: a read that starts inside and ends past the end is short.
      const dd = await mustClient('dd', [`if=${f.mountpoint}`, 'of=/dev/null', 'bs=3M', 'skip=1', 'iflag=direct'])
      t.deepEqual(ddRecords(dd.stderr), { fullIn: 0, partialIn: 1, fullOut: 0, partialOut: 1 })

      // SETATTR: size (growable) and mode.
      await mustClient('truncate', ['-s', String(6 * MiB), f.mountpoint])
      t.is(await sizeOf(f.mountpoint), 6 * MiB)
      t.is((await readFile(f.image)).length, 6 * MiB)
      await mustClient('chmod', ['640', f.mountpoint])
      t.is(await statField(f.mountpoint, '%a'), '640')

      // FALLOCATE punch hole reads zeros; SEEK_HOLE finds it (the image is a sparse-capable file).
      await mustClient('fallocate', ['-p', '-o', String(2 * MiB), '-l', String(MiB), f.mountpoint])
      const hole = await readFile(f.image)
      t.true(
        hole.subarray(2 * MiB, 3 * MiB).every((b) => b === 0),
        'punched range reads zeros',
      )
      const probes = await seekProbes(f.mountpoint, [2 * MiB])
      t.deepEqual(
        probes.map((p) => [p.whence, p.result]),
        [
          ['DATA', 3 * MiB],
          ['HOLE', 2 * MiB],
        ],
      )
      t.true((await blocksOf(f.mountpoint)) < (6 * MiB) / 512, 'the hole is not allocated')

      // STATFS and FSYNC.
      const df = await mustClient('df', ['-B1', '--output=size', f.mountpoint])
      t.regex(df.stdout, /\d+/)
      await mustClient('dd', ['if=/dev/zero', `of=${f.mountpoint}`, 'bs=4k', 'count=1', 'conv=notrunc,fsync'])
      t.true((exp.stats().requests.FSYNC ?? 0) + (exp.stats().requests.FLUSH ?? 0) > 0)

      const stats = exp.stats()
      t.is(stats.lostReplies, 0)
      t.deepEqual(
        stats.inFlight,
        Array.from({ length: threads }, () => 0),
      )
    },
  )
}

uringTest?.(
  'io_uring: a write past the end of a non-growable export fails with ENOSPC and changes nothing',
  async (t) => {
    const f = await imageFixture(t, MiB)
    const exp = await openExport(t, {
      source: f.image,
      mountpoint: f.mountpoint,
      writable: true,
      threads: 2,
      ioUring: 'on',
    })
    t.true(exp.ioUring)
    const r = await client('dd', [
      'if=/dev/zero',
      `of=${f.mountpoint}`,
      'bs=4k',
      'count=1',
      'seek=256',
      'conv=notrunc',
      'oflag=direct',
    ])
    t.not(r.code, 0)
    t.regex(r.stderr, /No space left on device/)
    t.is(await sizeOf(f.mountpoint), MiB)
    // The export answered "0 bytes written", which the client reports as ENOSPC.
    t.is(exp.stats().bytesWritten, 0)
    await mustClient('cmp', [f.image, f.mountpoint])
    t.deepEqual(await readFile(f.image), f.data)
  },
)

uringTest?.('io_uring: a read-only export refuses writes (EROFS from the mount, EACCES from ours)', async (t) => {
  const f = await imageFixture(t, MiB)
  const exp = await openExport(t, { source: f.image, mountpoint: f.mountpoint, threads: 2, ioUring: 'on' })
  t.true(exp.ioUring)
  const r = await client('dd', ['if=/dev/zero', `of=${f.mountpoint}`, 'bs=4k', 'count=1', 'conv=notrunc'])
  t.not(r.code, 0)
  t.regex(r.stderr, /Read-only file system|Permission denied/)
  await mustClient('cmp', [f.image, f.mountpoint])
})
