/**
 * Issue 7, soak: a bounded mixed load — fio random read/write with `verify=crc32c` and
 * `verify_backlog` (written blocks are read back and checked throughout), 4 jobs × iodepth 16,
 * 4 KiB / 64 KiB / 1 MiB requests, O_DIRECT — against the CLI serving a 256 MiB raw image with 4
 * queue threads. It must end with zero errors, and the serving process's VmRSS after the warm-up
 * must stay stable: at the end it may exceed the post-warm-up sample by at most RSS_GROWTH_BOUND.
 *
 * Duration: BLOCKFUSE_SOAK_SECONDS (default 45, what .ci/run uses; the documented full run is
 * `BLOCKFUSE_SOAK_SECONDS=300 npx ava __test__/reliability-soak.spec.ts`).
 */
import { readFile, truncate, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { setTimeout as sleep } from 'node:timers/promises'

import test from 'ava'

import { assertCliBuilt } from './helpers/cli.js'
import { assertE2eEnvironment } from './helpers/env.js'
import { makeMountpoint, MiB, tempDir } from './helpers/files.js'
import { isMounted } from './helpers/mounts.js'
import { startCli, vmRssKiB } from './helpers/reliability.js'
import { run } from './helpers/run.js'
import { C_ENV } from './helpers/semantics.js'

const SECONDS = Number(process.env.BLOCKFUSE_SOAK_SECONDS ?? 45)
const JOBS = 4
const REGION = 64 * MiB
/** Growth of VmRSS allowed between the post-warm-up sample and the end (documented in docs/reliability.md). */
const RSS_GROWTH_BOUND_KIB = 16 * 1024
/** The baseline sample is taken this far into the run: by then every queue buffer has been used. */
const WARMUP_SECONDS = Math.min(10, Math.max(3, Math.floor(SECONDS / 4)))

test.before(() => {
  assertCliBuilt()
  assertE2eEnvironment(['fio', 'findmnt'])
  if (!Number.isInteger(SECONDS) || SECONDS < 10)
    throw new Error(`BLOCKFUSE_SOAK_SECONDS must be an integer >= 10, not ${SECONDS}`)
})

function mib(kib: number): string {
  return `${(kib / 1024).toFixed(1)} MiB`
}

interface FioJob {
  jobname: string
  error: number
  read: { io_bytes: number; total_ios: number }
  write: { io_bytes: number; total_ios: number }
}

test(`soak: ${SECONDS} s of fio randrw + verify, ${JOBS} jobs, 4 threads: zero errors, VmRSS stable after warm-up`, async (t) => {
  t.timeout((SECONDS + 120) * 1000)
  const dir = await tempDir(t)
  const image = join(dir, 'img.raw')
  const mountpoint = join(dir, 'mnt')
  await writeFile(image, '')
  await truncate(image, JOBS * REGION)
  await makeMountpoint(mountpoint)
  const cli = startCli(t, ['export', '--writable', '--format', 'raw', '--threads', '4', image, mountpoint], mountpoint)
  await cli.waitFor(/^ready/m)
  const idle = await vmRssKiB(cli.pid)

  const output = join(dir, 'fio.json')
  const started = Date.now()
  const fio = run(
    'fio',
    [
      '--name=soak',
      `--filename=${mountpoint}`,
      '--rw=randrw',
      '--rwmixread=50',
      '--bssplit=4k/60:64k/30:1m/10',
      '--direct=1',
      '--ioengine=libaio',
      '--iodepth=16',
      `--numjobs=${JOBS}`,
      `--size=${REGION}`,
      `--offset_increment=${REGION}`,
      '--verify=crc32c',
      '--verify_backlog=1024',
      '--verify_fatal=1',
      '--verify_state_save=0',
      '--time_based',
      `--runtime=${SECONDS}`,
      '--output-format=json',
      `--output=${output}`,
    ],
    { cwd: dir, env: C_ENV },
  )
  const state = { done: false }
  void fio.then(() => (state.done = true))
  const samples: Array<{ at: number; kib: number }> = []
  while (!state.done) {
    samples.push({ at: (Date.now() - started) / 1000, kib: await vmRssKiB(cli.pid) })
    await sleep(1000)
  }
  const r = await fio
  const text = await readFile(output, 'utf8').catch(() => '')
  t.is(r.code, 0, `fio failed:\n${r.stdout}\n${r.stderr}\n${text}`)
  const jobs = (JSON.parse(text.slice(text.search(/^\{/m))) as { jobs: FioJob[] }).jobs
  t.is(jobs.length, JOBS)
  for (const job of jobs) t.is(job.error, 0, `job ${job.jobname}: error ${job.error}`)
  t.false(/verify: bad|bad magic|verify failed/i.test(`${r.stdout}${r.stderr}`), r.stderr)
  const reads = jobs.reduce((n, j) => n + j.read.total_ios, 0)
  const writes = jobs.reduce((n, j) => n + j.write.total_ios, 0)
  t.true(reads > 0 && writes > 0)
  t.is(cli.child.exitCode, null, 'the export still runs')

  const baseline = samples.find((s) => s.at >= WARMUP_SECONDS) ?? samples[0]!
  const end = samples.at(-1)!
  const peak = Math.max(...samples.map((s) => s.kib))
  t.log(
    `${((Date.now() - started) / 1000).toFixed(0)} s, ${reads} reads + ${writes} writes (incl. verify reads), 0 errors; ` +
      `VmRSS idle ${mib(idle)}, after ${baseline.at.toFixed(0)} s warm-up ${mib(baseline.kib)}, ` +
      `end (${end.at.toFixed(0)} s) ${mib(end.kib)}, peak ${mib(peak)}, growth ${mib(end.kib - baseline.kib)} ` +
      `(bound ${mib(RSS_GROWTH_BOUND_KIB)})`,
  )
  t.true(
    end.kib - baseline.kib <= RSS_GROWTH_BOUND_KIB,
    `VmRSS grew from ${mib(baseline.kib)} to ${mib(end.kib)} after the warm-up`,
  )

  t.is((await cli.stop('SIGINT')).code, 0, cli.output)
  t.false(await isMounted(mountpoint))
})
