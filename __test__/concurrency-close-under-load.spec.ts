/**
 * Issue 5, closing during a write load: writers keep writing distinct 4 KiB blocks with O_DIRECT
 * through a writable export and log a block's index only after its write returned successfully;
 * meanwhile close() is called. Afterwards every block a writer logged as acknowledged must be in
 * the image with its pattern. Writes that fail because the export went away are expected; only
 * acknowledged writes count.
 */
import { open, truncate } from 'node:fs/promises'
import { join } from 'node:path'
import { setTimeout as sleep } from 'node:timers/promises'

import test from 'ava'

import { ACKED_BLOCK as BLOCK, ackedPattern, startWriter } from './helpers/acked-writers.js'
import { assertE2eEnvironment } from './helpers/env.js'
import { makeMountpoint, tempDir } from './helpers/files.js'
import { isMounted } from './helpers/mounts.js'
import { openExport } from './helpers/semantics.js'

const WRITERS = 4
/** Blocks per writer: far more than get written before close, so the load is on when it comes. */
const BLOCKS_PER_WRITER = 16_384
const IMAGE = WRITERS * BLOCKS_PER_WRITER * BLOCK
/** Acknowledged writes (all writers together) before close() is called. */
const ACKS_BEFORE_CLOSE = 2000
/** ... of which each writer has at least this many (so every writer writes through the export). */
const ACKS_PER_WRITER_BEFORE_CLOSE = 100

test.before(() => {
  assertE2eEnvironment(['python3', 'findmnt'])
})

for (const [threads, ioUring] of [
  [1, 'off'],
  [4, 'off'],
  [1, 'on'],
  [4, 'on'],
] as const) {
  const intake = ioUring === 'on' ? 'io_uring' : 'read(2)'
  test.serial(
    `close() during ${WRITERS} O_DIRECT writers (${threads} thread(s), ${intake}): every acknowledged write is in the image`,
    async (t) => {
      const dir = await tempDir(t)
      const image = join(dir, 'img.raw')
      const mountpoint = join(dir, 'mnt')
      await (await open(image, 'w')).close()
      await truncate(image, IMAGE)
      await makeMountpoint(mountpoint)
      const exp = await openExport(t, { source: image, mountpoint, writable: true, threads, ioUring })
      t.is(exp.ioUring, ioUring === 'on')

      const writers = Array.from({ length: WRITERS }, (_, w) =>
        startWriter(mountpoint, w * BLOCKS_PER_WRITER, BLOCKS_PER_WRITER, IMAGE),
      )
      t.teardown(() => writers.forEach((w) => w.child.kill('SIGKILL')))
      const acked = () => writers.reduce((n, w) => n + w.acked.length, 0)
      const deadline = Date.now() + 30_000
      // Every writer must be under way: one that opened the mountpoint only after close() would
      // write into the plain file under it.
      while (acked() < ACKS_BEFORE_CLOSE || writers.some((w) => w.acked.length < ACKS_PER_WRITER_BEFORE_CLOSE)) {
        const early = writers.find((w) => w.child.exitCode !== null)
        if (early) throw new Error(`a writer exited before close (${early.child.exitCode}): ${early.stderr}`)
        if (Date.now() > deadline) throw new Error(`only ${acked()} writes acknowledged within 30 s`)
        await sleep(5)
      }
      const atClose = acked()
      const ackedAtClose = writers.map((w) => w.acked.length)
      const inFlight = exp.stats().inFlight.reduce((a, b) => a + b, 0)
      const closeStarted = Date.now()
      await exp.close()
      const closeMs = Date.now() - closeStarted
      const ackedAfterClose = writers.map((w) => w.acked.length)
      t.log(
        `close() took ${closeMs} ms; acknowledged per writer at close ${ackedAtClose.join(' ')}, when it returned ${ackedAfterClose.join(' ')}`,
      )
      t.false(await isMounted(mountpoint))

      // Every writer must notice that the export is gone (an error), not hang or run out of blocks.
      const hung = new AbortController()
      const codes = await Promise.race([
        Promise.all(writers.map((w) => w.exited)),
        sleep(20_000, undefined, { signal: hung.signal }).then(() => {
          throw new Error('a writer still runs 20 s after close(): its write was never answered')
        }),
      ]).finally(() => hung.abort())
      t.deepEqual(codes, Array(WRITERS).fill(0), writers.map((w) => w.stderr).join(''))
      for (const w of writers) t.regex(w.stderr, /^error /, 'each writer saw its writes fail after close')
      const total = acked()
      t.log(`${atClose} writes acknowledged when close() was called (${inFlight} in flight), ${total} in all`)
      t.true(total >= ACKS_BEFORE_CLOSE)

      const fh = await open(image, 'r')
      const missing: number[] = []
      try {
        const buf = Buffer.alloc(BLOCK)
        for (const w of writers) {
          for (const index of w.acked) {
            await fh.read(buf, 0, BLOCK, index * BLOCK)
            if (!buf.equals(ackedPattern(index))) missing.push(index)
          }
        }
      } finally {
        await fh.close()
      }
      t.deepEqual(missing.slice(0, 20), [], `${missing.length} of ${total} acknowledged blocks are not in the image`)
      // The check can fail: an unwritten block is zeros, not the pattern.
      const blank = Buffer.alloc(BLOCK)
      t.false(ackedPattern(0).equals(blank))
    },
  )
}
