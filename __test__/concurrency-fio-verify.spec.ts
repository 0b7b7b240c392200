/**
 * Issue 5, integrity under concurrency: fio random 4 KiB writes with `verify=crc32c` from 2 jobs ×
 * iodepth 16 (O_DIRECT, libaio; each job on its own 128 MiB half so their verify passes do not
 * clash), then fio's verify pass, over a writable raw export of a 256 MiB image with 1 and with 4
 * threads, each by read(2) and through FUSE-over-io_uring. fio must report zero errors for every job, and after close the image offline must hash
 * the same as the whole export read back through the mount just before closing.
 */
import { createHash } from 'node:crypto'
import { readFile } from 'node:fs/promises'
import { join } from 'node:path'

import test from 'ava'

import { assertE2eEnvironment } from './helpers/env.js'
import { imageFixture } from './helpers/exports.js'
import { MiB, sha256 } from './helpers/files.js'
import { fioVerifyArgs, parseFioReport } from './helpers/fio.js'
import { run } from './helpers/run.js'
import { C_ENV, openExport } from './helpers/semantics.js'

const IMAGE = 256 * MiB
const HALF = IMAGE / 2
const JOBS = 2

test.before(() => {
  assertE2eEnvironment(['fio', 'findmnt'])
})

for (const [threads, ioUring] of [
  [1, 'off'],
  [4, 'off'],
  [1, 'on'],
  [4, 'on'],
] as const) {
  const intake = ioUring === 'on' ? 'io_uring' : 'read(2)'
  test.serial(
    `fio randwrite + verify=crc32c, ${JOBS} jobs × iodepth 16, ${threads} thread(s), ${intake}: zero verify errors, the image offline equals what the export served`,
    async (t) => {
      const f = await imageFixture(t, IMAGE)
      const exp = await openExport(t, { source: f.image, mountpoint: f.mountpoint, writable: true, threads, ioUring })
      t.is(exp.ioUring, ioUring === 'on')
      const output = join(f.dir, 'fio.json')
      const started = Date.now()
      const r = await run('fio', fioVerifyArgs({ filename: f.mountpoint, jobs: JOBS, size: HALF, output }), {
        cwd: f.dir,
        env: C_ENV,
      })
      t.log(`fio took ${Date.now() - started} ms`)
      const report = await readFile(output, 'utf8').catch(() => '')
      t.is(r.code, 0, `fio failed:\n${r.stdout}\n${r.stderr}\n${report}`)
      const { jobs } = parseFioReport(report)
      t.is(jobs.length, JOBS)
      for (const job of jobs) {
        t.is(job.error, 0, `job ${job.jobname} reports error ${job.error}`)
        t.is(job.write.io_bytes, HALF, 'each job wrote its whole half')
        t.is(job.read.io_bytes, HALF, 'and read all of it back in the verify pass')
      }
      t.true(!/verify: bad|bad magic|crc32c: verify failed/i.test(`${r.stdout}${r.stderr}`), r.stderr)

      const stats = exp.stats()
      t.true((stats.requests.WRITE ?? 0) >= IMAGE / 4096, `WRITE ${stats.requests.WRITE}`)
      t.is(stats.bytesWritten, IMAGE)
      t.is(stats.inFlight.length, threads)
      t.is(stats.lostReplies, 0, 'every reply reached the kernel')

      const served = await sha256(f.mountpoint)
      await exp.close()
      const offline = await sha256(f.image)
      t.is(offline, served, 'the image offline is what the export served')
      t.not(offline, createHash('sha256').update(f.data).digest('hex'), 'fio changed the image')
    },
  )
}
