/**
 * The benchmark harness runs one tiny cell end to end: bench/run.mjs starts blockfuse through the
 * CLI, runs fio against it, stops it and prints a table with a nonzero IOPS figure. Timings are
 * not asserted (they are not tests); that the harness works is.
 */
import { mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'

import test, { type ExecutionContext } from 'ava'

import { assertCliBuilt } from './helpers/cli.js'
import { assertE2eEnvironment } from './helpers/env.js'
import { isMounted } from './helpers/mounts.js'
import { run } from './helpers/run.js'

const BENCH = fileURLToPath(new URL('../bench/run.mjs', import.meta.url))

test.before(() => {
  assertCliBuilt()
  assertE2eEnvironment(['fio', 'findmnt', 'nbdkit', 'nbdfuse'])
})

/**
 * A work directory for one bench run, removed after the test with any mount of `peers` the
 * bench left behind (it unmounts its own; this covers a bench that died).
 */
async function benchWork(t: ExecutionContext, peers: string[]): Promise<string> {
  const work = await mkdtemp(join(tmpdir(), 'blockfuse-bench-smoke-'))
  t.teardown(async () => {
    for (const peer of peers) {
      const mnt = join(work, 'mnt', peer)
      if (await isMounted(mnt)) await run('umount', ['-l', mnt])
    }
    await rm(work, { recursive: true, force: true })
  })
  return work
}

/** Asserts the detail table has a row with nonzero IOPS for each of `peers` in `cell`. */
function assertRows(t: ExecutionContext, stdout: string, cell: string, peers: string[]) {
  for (const peer of peers) {
    const row = new RegExp(`^\\| \`${cell}\` \\| ${peer} \\| (\\d+) \\|`, 'm').exec(stdout)
    t.truthy(row, `no table row for ${peer} in:\n${stdout}`)
    t.true(Number(row![1]) > 0, `${peer} reported ${row![1]} IOPS`)
  }
}

test('bench --quick runs one null cell against blockfuse and reports nonzero IOPS', async (t) => {
  const work = await benchWork(t, ['blockfuse-1t', 'blockfuse-2t'])
  const r = await run(process.execPath, [
    BENCH,
    '--quick',
    '--only',
    'null:randread:aio',
    '--runtime',
    '2',
    '--reps',
    '1',
    '--peers',
    'blockfuse',
    '--work-dir',
    work,
    '--no-save',
  ])
  t.is(r.code, 0, `bench failed:\n${r.stderr}`)
  assertRows(t, r.stdout, 'null:randread:aio:j1', ['blockfuse-1t', 'blockfuse-2t'])
  t.regex(r.stdout, /\| `null:randread:aio:j1` \| \d/, 'summary row present')
})

test('bench runs one nbd cell: blockfuse, nbdfuse and the fio nbd-engine ceiling on one nbdkit, with the ratio table', async (t) => {
  const peers = ['blockfuse-1t', 'nbdfuse', 'ceiling']
  const work = await benchWork(t, peers)
  const r = await run(process.execPath, [
    BENCH,
    '--only',
    'nbd:randread:aio:j1',
    '--runtime',
    '1',
    '--reps',
    '1',
    '--peers',
    peers.join(','),
    '--image-size',
    '64M',
    '--work-dir',
    work,
    '--no-save',
  ])
  t.is(r.code, 0, `bench failed:\n${r.stderr}`)
  assertRows(t, r.stdout, 'nbd:randread:aio:j1', peers)
  t.regex(r.stdout, /^\| `nbd:randread:aio:j1` \| \d+\.\d\d \| — \| \d+\.\d\d \| — \|$/m, 'nbd ratio row')
})

/** The environment without BLOCKFUSE_QEMU_SEED, so a test decides whether the seed is named. */
function envWithoutSeed(): NodeJS.ProcessEnv {
  const env = { ...process.env }
  delete env.BLOCKFUSE_QEMU_SEED
  return env
}

test('bench without --qemu-seed or BLOCKFUSE_QEMU_SEED skips the seed peers with one line and runs the rest', async (t) => {
  const work = await benchWork(t, ['blockfuse-1t'])
  const r = await run(
    process.execPath,
    [
      BENCH,
      '--only',
      'null:randread:aio:j1',
      '--runtime',
      '1',
      '--reps',
      '1',
      '--peers',
      'qemu-seed,blockfuse-1t',
      '--image-size',
      '64M',
      '--work-dir',
      work,
      '--no-save',
    ],
    { env: envWithoutSeed() },
  )
  t.is(r.code, 0, `bench failed:\n${r.stderr}`)
  const skips = r.stderr.split('\n').filter((l) => /qemu-seed/.test(l))
  t.deepEqual(skips, [
    "bench: skipping qemu-seed-1t and qemu-seed-2t: no --qemu-seed PATH or BLOCKFUSE_QEMU_SEED (the seed's qemu-storage-daemon)",
  ])
  assertRows(t, r.stdout, 'null:randread:aio:j1', ['blockfuse-1t'])
  t.notRegex(r.stdout, /qemu-seed-1t \|/, 'no seed row')
})

test('bench --qemu-seed naming no executable fails, naming the path and the way to skip it', async (t) => {
  const work = await benchWork(t, ['blockfuse-1t'])
  const missing = join(work, 'no-such-qemu-storage-daemon')
  const r = await run(
    process.execPath,
    [
      BENCH,
      '--only',
      'null:randread:aio:j1',
      '--peers',
      'qemu-seed,blockfuse-1t',
      '--qemu-seed',
      missing,
      '--work-dir',
      work,
      '--no-save',
    ],
    { env: envWithoutSeed() },
  )
  t.is(r.code, 1)
  t.is(
    r.stderr.trim(),
    `bench: peer qemu-seed unavailable: ${missing} is not an executable file (use --keep-going or --peers to skip it)`,
  )
})
