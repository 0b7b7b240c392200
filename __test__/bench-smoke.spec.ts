/**
 * The benchmark harness runs one tiny cell end to end: bench/run.mjs starts blockfuse through the
 * CLI, runs fio against it, stops it and prints a table with a nonzero IOPS figure. Timings are
 * not asserted (they are not tests); that the harness works is.
 */
import { mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'

import test from 'ava'

import { assertCliBuilt } from './helpers/cli.js'
import { assertE2eEnvironment } from './helpers/env.js'
import { isMounted } from './helpers/mounts.js'
import { run } from './helpers/run.js'

const BENCH = fileURLToPath(new URL('../bench/run.mjs', import.meta.url))

test.before(() => {
  assertCliBuilt()
  assertE2eEnvironment(['fio', 'findmnt', 'nbdkit', 'nbdfuse'])
})

test('bench --quick runs one null cell against blockfuse and reports nonzero IOPS', async (t) => {
  const work = await mkdtemp(join(tmpdir(), 'blockfuse-bench-smoke-'))
  t.teardown(async () => {
    for (const peer of ['blockfuse-1t', 'blockfuse-2t']) {
      const mnt = join(work, 'mnt', peer)
      if (await isMounted(mnt)) await run('umount', ['-l', mnt])
    }
    await rm(work, { recursive: true, force: true })
  })
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
  for (const peer of ['blockfuse-1t', 'blockfuse-2t']) {
    const row = new RegExp(`^\\| \`null:randread:aio:j1\` \\| ${peer} \\| (\\d+) \\|`, 'm').exec(r.stdout)
    t.truthy(row, `no table row for ${peer} in:\n${r.stdout}`)
    t.true(Number(row![1]) > 0, `${peer} reported ${row![1]} IOPS`)
  }
  t.regex(r.stdout, /\| `null:randread:aio:j1` \| \d/, 'summary row present')
})

test('bench runs one nbd cell: blockfuse, nbdfuse and the fio nbd-engine ceiling on one nbdkit, with the ratio table', async (t) => {
  const work = await mkdtemp(join(tmpdir(), 'blockfuse-bench-smoke-nbd-'))
  const peers = ['blockfuse-1t', 'nbdfuse', 'ceiling']
  t.teardown(async () => {
    for (const peer of peers) {
      const mnt = join(work, 'mnt', peer)
      if (await isMounted(mnt)) await run('umount', ['-l', mnt])
    }
    await rm(work, { recursive: true, force: true })
  })
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
  for (const peer of peers) {
    const row = new RegExp(`^\\| \`nbd:randread:aio:j1\` \\| ${peer} \\| (\\d+) \\|`, 'm').exec(r.stdout)
    t.truthy(row, `no table row for ${peer} in:\n${r.stdout}`)
    t.true(Number(row![1]) > 0, `${peer} reported ${row![1]} IOPS`)
  }
  t.regex(r.stdout, /^\| `nbd:randread:aio:j1` \| \d+\.\d\d \| — \| \d+\.\d\d \| — \|$/m, 'nbd ratio row')
})
