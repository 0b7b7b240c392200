/**
 * iotest 308 "Double export": a second export on a mountpoint that is already exported is refused
 * with MOUNTPOINT_IN_USE (QEMU would deadlock on its own stat), whether this process or another
 * one (the CLI) holds it; the first export keeps serving and nothing is stacked on it.
 */
import { readFile, symlink } from 'node:fs/promises'
import { join } from 'node:path'

import test, { type ExecutionContext } from 'ava'

import { FuseExport, isBlockfuseError } from '../ts/index.js'
import { parseMountinfo } from '../ts/options.js'
import { assertCliBuilt, CliProcess } from './helpers/cli.js'
import { assertE2eEnvironment } from './helpers/env.js'
import { imageFixture } from './helpers/exports.js'
import { MiB } from './helpers/files.js'
import { isMounted } from './helpers/mounts.js'
import { run } from './helpers/run.js'
import { mustClient, openExport } from './helpers/semantics.js'

test.before(() => {
  assertCliBuilt()
  assertE2eEnvironment(['cmp', 'findmnt', 'umount'])
})

/** How many mounts sit on exactly `path` (stacked mounts count once each). */
async function mountCount(path: string): Promise<number> {
  const entries = parseMountinfo(await readFile('/proc/self/mountinfo', 'utf8'))
  return entries.filter((e) => e.mountPoint === path).length
}

function codeOf(err: unknown): string | undefined {
  return (err as { code?: string } | undefined)?.code
}

test('a second export on the same mountpoint from this process is refused with MOUNTPOINT_IN_USE', async (t) => {
  const f = await imageFixture(t, 2 * MiB)
  const other = await imageFixture(t, MiB)
  await openExport(t, { source: f.image, mountpoint: f.mountpoint })
  const err = await t.throwsAsync(FuseExport.create({ source: other.image, mountpoint: f.mountpoint }))
  t.true(isBlockfuseError(err, 'MOUNTPOINT_IN_USE'), `code: ${codeOf(err)}, ${err?.message}`)
  t.true(err!.message.includes(f.mountpoint), 'the message names the mountpoint')

  // The same file reached through a symlink is the same mountpoint.
  const link = join(f.dir, 'mnt-link')
  await symlink(f.mountpoint, link)
  const viaLink = await t.throwsAsync(FuseExport.create({ source: other.image, mountpoint: link }))
  t.true(isBlockfuseError(viaLink, 'MOUNTPOINT_IN_USE'), `via a symlink: ${codeOf(viaLink)}, ${viaLink?.message}`)

  t.is(await mountCount(f.mountpoint), 1, 'nothing was stacked on the first export')
  await mustClient('cmp', [f.image, f.mountpoint])
})

test('two concurrent create() calls on one mountpoint: exactly one wins, the other gets MOUNTPOINT_IN_USE', async (t) => {
  const f = await imageFixture(t, MiB)
  const results = await Promise.allSettled([
    FuseExport.create({ source: f.image, mountpoint: f.mountpoint }),
    FuseExport.create({ source: f.image, mountpoint: f.mountpoint }),
  ])
  for (const r of results) {
    if (r.status === 'fulfilled') t.teardown(() => r.value.close())
  }
  const won = results.filter((r) => r.status === 'fulfilled')
  const lost = results.filter((r): r is PromiseRejectedResult => r.status === 'rejected')
  t.is(won.length, 1, `fulfilled: ${won.length}, rejections: ${lost.map((r) => String(r.reason)).join('; ')}`)
  t.is(lost.length, 1)
  t.is(codeOf(lost[0]?.reason), 'MOUNTPOINT_IN_USE', String(lost[0]?.reason))
  t.is(await mountCount(f.mountpoint), 1)
  await mustClient('cmp', [f.image, f.mountpoint])
})

function startCliExport(t: ExecutionContext, args: string[]): CliProcess {
  const cli = new CliProcess(['export', ...args])
  const mountpoint = args.at(-1)!
  t.teardown(async () => {
    if (cli.child.exitCode === null && cli.child.signalCode === null) await cli.stop('SIGTERM').catch(() => undefined)
    if (await isMounted(mountpoint)) await run('umount', ['-l', mountpoint])
  })
  return cli
}

test('an export on a mountpoint another process (the CLI) exports is refused with MOUNTPOINT_IN_USE', async (t) => {
  const f = await imageFixture(t, 2 * MiB)
  const other = await imageFixture(t, MiB)
  const cli = startCliExport(t, [f.image, f.mountpoint])
  await cli.waitForLine(/^ready/)
  const err = await t.throwsAsync(FuseExport.create({ source: other.image, mountpoint: f.mountpoint }))
  t.true(isBlockfuseError(err, 'MOUNTPOINT_IN_USE'), `code: ${codeOf(err)}, ${err?.message}`)
  t.is(await mountCount(f.mountpoint), 1, 'nothing was stacked on the CLI export')
  await mustClient('cmp', [f.image, f.mountpoint])
  t.is((await cli.stop('SIGINT')).code, 0, cli.stderr)
  t.false(await isMounted(f.mountpoint))
})
