/**
 * Issue 22: claiming a mountpoint is atomic. Exports started at the same moment, from two
 * processes or one, give exactly one export and one `MOUNTPOINT_IN_USE` (the mountpoint file's
 * `flock`, taken before mounting and held for the export's life); and an export unmounts only its
 * own mount, never one stacked on top of it.
 */
import { copyFile, readFile, writeFile } from 'node:fs/promises'
import { join } from 'node:path'

import test from 'ava'

import { FuseExport } from '../ts/index.js'
import { assertCliBuilt, CliProcess } from './helpers/cli.js'
import { assertE2eEnvironment } from './helpers/env.js'
import { imageFixture } from './helpers/exports.js'
import { MiB } from './helpers/files.js'
import { forceUnmountAll, isMounted, mountsOn } from './helpers/mounts.js'
import { mustRun } from './helpers/run.js'

test.before(() => {
  assertCliBuilt()
  assertE2eEnvironment(['findmnt', 'umount', 'mount', 'cmp'])
})

/** Which of the two racers got the export: resolves once each printed `ready` or exited. */
async function settle(cli: CliProcess): Promise<'ready' | 'exited'> {
  return Promise.race([
    cli.waitForLine(/^ready/, 60_000).then(() => 'ready' as const),
    cli.exited.then(() => 'exited' as const),
  ])
}

test('two CLIs racing for one mountpoint, 20 times: exactly one export and one MOUNTPOINT_IN_USE each time', async (t) => {
  const f = await imageFixture(t, MiB)
  const all: CliProcess[] = []
  const reasons = new Map<string, number>()
  t.teardown(async () => {
    for (const cli of all) if (cli.child.exitCode === null && cli.child.signalCode === null) cli.child.kill('SIGKILL')
    await forceUnmountAll(f.mountpoint)
  })
  for (let round = 0; round < 20; round++) {
    const pair = [new CliProcess(['export', f.image, f.mountpoint]), new CliProcess(['export', f.image, f.mountpoint])]
    all.push(...pair)
    const outcomes = await Promise.all(pair.map(settle))
    const winners = pair.filter((_, i) => outcomes[i] === 'ready')
    const losers = pair.filter((_, i) => outcomes[i] === 'exited')
    const detail = pair.map((c) => `${c.stdout}${c.stderr}`).join(' | ')
    t.is(winners.length, 1, `round ${round}: one export (${detail})`)
    t.is(losers.length, 1, `round ${round}: one refusal (${detail})`)
    for (const loser of losers) {
      t.is((await loser.exited).code, 1, `round ${round}`)
      t.regex(loser.stderr, /\(MOUNTPOINT_IN_USE\)\n$/, `round ${round}`)
      const why = /lock|already has a filesystem|already exported/.exec(loser.stderr)?.[0] ?? 'other'
      reasons.set(why, (reasons.get(why) ?? 0) + 1)
    }
    t.is((await mountsOn(f.mountpoint)).length, 1, `round ${round}: one mount, nothing stacked`)
    await mustRun('cmp', [f.image, f.mountpoint])
    for (const winner of winners) t.is((await winner.stop('SIGINT')).code, 0, winner.stderr)
    t.false(await isMounted(f.mountpoint), `round ${round}: the winner unmounted`)
  }
  t.log(`refused by: ${JSON.stringify(Object.fromEntries(reasons))}`)
})

test('exports created at once in one process: one resolves, the other rejects with MOUNTPOINT_IN_USE', async (t) => {
  const f = await imageFixture(t, MiB)
  t.teardown(() => forceUnmountAll(f.mountpoint))
  for (let round = 0; round < 5; round++) {
    const results = await Promise.allSettled([
      FuseExport.create({ source: f.image, mountpoint: f.mountpoint }),
      FuseExport.create({ source: f.image, mountpoint: f.mountpoint }),
    ])
    const made = results.flatMap((r) => (r.status === 'fulfilled' ? [r.value] : []))
    const refused = results.flatMap((r) => (r.status === 'rejected' ? [r.reason as Error & { code?: string }] : []))
    try {
      t.is(made.length, 1, `round ${round}`)
      t.deepEqual(
        refused.map((e) => e.code),
        ['MOUNTPOINT_IN_USE'],
        refused.map((e) => e.message).join('; '),
      )
      t.is((await mountsOn(f.mountpoint)).length, 1)
    } finally {
      for (const exp of made) await exp.close()
    }
    t.false(await isMounted(f.mountpoint))
  }
})

test('close() unmounts only its own mount: a mount stacked on top of it stays', async (t) => {
  const f = await imageFixture(t, MiB)
  t.teardown(() => forceUnmountAll(f.mountpoint))
  const exp = await FuseExport.create({ source: f.image, mountpoint: f.mountpoint })
  const other = join(f.dir, 'other')
  await writeFile(other, 'the file mounted on top\n')
  await mustRun('mount', ['--bind', other, f.mountpoint])
  t.is((await mountsOn(f.mountpoint)).length, 2)
  await exp.close()
  const left = await mountsOn(f.mountpoint)
  t.is(left.length, 2, 'the bind mount on top was not unmounted, and neither was ours under it')
  t.is(await readFile(f.mountpoint, 'utf8'), 'the file mounted on top\n')
  // Whoever mounted on top unmounts theirs; ours under it is dead (its connection ended).
  await mustRun('umount', [f.mountpoint])
  t.regex(left[0]!.fsType, /^fuse/)
})

test('a clean close releases the claim: the next export on the mountpoint works at once', async (t) => {
  const f = await imageFixture(t, MiB)
  t.teardown(() => forceUnmountAll(f.mountpoint))
  const copy = join(f.dir, 'copy.raw')
  await copyFile(f.image, copy)
  for (const source of [f.image, copy]) {
    const exp = await FuseExport.create({ source, mountpoint: f.mountpoint })
    await t.throwsAsync(FuseExport.create({ source, mountpoint: f.mountpoint }), { code: 'MOUNTPOINT_IN_USE' })
    await exp.close()
    t.false(await isMounted(f.mountpoint))
  }
})
