/**
 * Issue 5's counters: `FuseExport.stats()` after known workloads through a real mount (requests
 * by op, bytes, errors, in-flight per queue), and the CLI's `--stats` stream (`--json`: one
 * `{"event":"stats"}` line per second on stdout; otherwise a line per second on stderr).
 */
import { join } from 'node:path'
import { setTimeout as sleep } from 'node:timers/promises'

import test, { type ExecutionContext } from 'ava'

import type { ExportStats } from '../ts/index.js'
import { assertCliBuilt, CliProcess } from './helpers/cli.js'
import { assertE2eEnvironment } from './helpers/env.js'
import { imageFixture } from './helpers/exports.js'
import { makeMountpoint, MiB, tempDir } from './helpers/files.js'
import { isMounted } from './helpers/mounts.js'
import { run } from './helpers/run.js'
import { client, mustClient, openExport } from './helpers/semantics.js'

test.before(() => {
  assertCliBuilt()
  assertE2eEnvironment(['dd', 'chmod', 'findmnt', 'umount'])
})

const KiB64 = 64 * 1024

function total(stats: ExportStats): number {
  return Object.values(stats.requests).reduce((a, b) => a + b, 0)
}

test('after dd reads 10 × 64 KiB: READ ≥ 10, bytesRead ≥ 655360, one idle in-flight entry per queue', async (t) => {
  const f = await imageFixture(t, 4 * MiB)
  // Stats count what passes through the server: passed-through reads would not be in them.
  const exp = await openExport(t, { source: f.image, mountpoint: f.mountpoint, threads: 3, passthrough: 'off' })
  const before = exp.stats()
  t.deepEqual(before.inFlight, [0, 0, 0], 'threads entries, nothing in flight yet')
  t.is(before.requests.READ ?? 0, 0)
  t.is(before.bytesRead, 0)

  await mustClient('dd', [`if=${f.mountpoint}`, 'of=/dev/null', `bs=${KiB64}`, 'count=10'])
  const after = exp.stats()
  t.true((after.requests.READ ?? 0) >= 10, `READ ${after.requests.READ}`)
  t.true(after.bytesRead >= 10 * KiB64, `bytesRead ${after.bytesRead}`)
  // Direct I/O (no page cache, no readahead): nothing but dd read, and it read exactly this much.
  t.is(after.bytesRead, 10 * KiB64)
  t.is(after.bytesWritten, 0)
  t.is(after.errors, 0)
  t.is(after.lostReplies, 0)
  t.deepEqual(after.inFlight, [0, 0, 0], 'idle again once dd is done')
  t.true(total(after) > total(before))
  // Every request was taken in by one of the three queues.
  t.is(after.served.length, 3)
  t.is(
    after.served.reduce((a, b) => a + b, 0),
    total(after),
  )
})

test("Node's fs.stat (STATX, answered ENOSYS by design) counts as unsupported, not as an error", async (t) => {
  const f = await imageFixture(t, 4 * MiB)
  const exp = await openExport(t, { source: f.image, mountpoint: f.mountpoint })
  // Node asks for the birth time, so the kernel tries STATX first, once per connection.
  const r = await run(process.execPath, [
    '-e',
    `console.log(require('fs').statSync(process.argv[1]).size)`,
    f.mountpoint,
  ])
  t.is(r.stdout.trim(), String(4 * MiB), r.stderr)
  await mustClient('dd', [`if=${f.mountpoint}`, 'of=/dev/null', `bs=${KiB64}`, 'count=2'])
  const stats = exp.stats()
  t.is(stats.errors, 0, 'a clean run has no errors')
  t.true(stats.unsupported >= 1, `unsupported ${stats.unsupported} (requests ${JSON.stringify(stats.requests)})`)
  t.is(stats.requests.STATX ?? 0, stats.unsupported, 'every unsupported answer here was a STATX')
})

test('writes count bytesWritten; requests answered with an error count as errors; stats survive close()', async (t) => {
  const f = await imageFixture(t, 4 * MiB)
  const exp = await openExport(t, { source: f.image, mountpoint: f.mountpoint, writable: true, allowOther: 'off' })
  await mustClient('dd', ['if=/dev/zero', `of=${f.mountpoint}`, `bs=${KiB64}`, 'count=5', 'seek=3', 'conv=notrunc'])
  const written = exp.stats()
  t.true((written.requests.WRITE ?? 0) >= 5, `WRITE ${written.requests.WRITE}`)
  t.is(written.bytesWritten, 5 * KiB64)
  t.is(written.errors, 0)

  // Without allow-other the export refuses group/other mode bits with EPERM (a SETATTR error).
  const r = await client('chmod', ['0640', f.mountpoint])
  t.not(r.code, 0, 'chmod 0640 is refused')
  const refused = exp.stats()
  t.true(refused.errors >= 1, `errors ${refused.errors}`)
  t.true((refused.requests.SETATTR ?? 0) >= 1)

  await exp.close()
  const closed = exp.stats()
  t.is(closed.bytesWritten, 5 * KiB64, 'the counters taken before closing, not zeros')
  t.true(closed.errors >= 1)
  t.is(closed.inFlight.length, 1)
})

/** Starts the CLI; the teardown makes sure neither the process nor its mount outlive the test. */
async function startCli(t: ExecutionContext, args: string[]): Promise<{ cli: CliProcess; mountpoint: string }> {
  const dir = await tempDir(t)
  const mountpoint = join(dir, 'mnt')
  await makeMountpoint(mountpoint)
  const cli = new CliProcess(['export', ...args, mountpoint])
  t.teardown(async () => {
    if (cli.child.exitCode === null && cli.child.signalCode === null) await cli.stop('SIGTERM').catch(() => undefined)
    if (await isMounted(mountpoint)) await run('umount', ['-l', mountpoint])
  })
  return { cli, mountpoint }
}

test('CLI --json --stats: a {"event":"stats"} line per second that reflects the workload', async (t) => {
  const { cli, mountpoint } = await startCli(t, ['--json', '--stats', '--threads', '2', 'null:4M'])
  await cli.waitForLine(/"event":"ready"/)
  await mustClient('dd', [`if=${mountpoint}`, 'of=/dev/null', `bs=${KiB64}`, 'count=10'])
  const line = await cli.waitForLine(/"event":"stats".*"READ":(\d\d+)/, 5000)
  const event = JSON.parse(line) as Record<string, unknown> & ExportStats
  t.is(event.event, 'stats')
  t.true((event.requests.READ ?? 0) >= 10)
  t.true(event.bytesRead >= 10 * KiB64)
  t.is(event.bytesWritten, 0)
  t.is(event.errors, 0)
  t.deepEqual(event.inFlight, [0, 0])
  // Once a second, not once: wait for another line.
  const count = () => cli.lines.filter((l) => l.includes('"event":"stats"')).length
  const seen = count()
  await sleep(2200)
  t.true(count() >= seen + 1, `${count()} stats lines`)

  t.is((await cli.stop('SIGTERM')).code, 0, cli.stderr)
  const events = cli.lines.map((l) => (JSON.parse(l) as { event: string }).event)
  t.is(events[0], 'ready')
  t.is(events.at(-1), 'close', 'no stats line after close')
  t.true(events.slice(1, -1).every((e) => e === 'stats'))
  t.is(cli.stderr, '')
})

test('CLI --stats without --json: a human line per second on stderr, stdout untouched', async (t) => {
  const { cli, mountpoint } = await startCli(t, ['--stats', 'null:4M'])
  await cli.waitForLine(/^ready/)
  await mustClient('dd', [`if=${mountpoint}`, 'of=/dev/null', `bs=${KiB64}`, 'count=10'])
  const deadline = Date.now() + 5000
  while (!/total \d\d+ req/.test(cli.stderr) && Date.now() < deadline) await sleep(100)
  t.regex(
    cli.stderr,
    /^blockfuse: stats: \d+ req\/s.*, read [\d.]+ [KMG]?i?B\/s, written 0 B\/s; total \d+ req, 0 errors; in flight 0$/m,
  )
  t.regex(cli.stderr, /total \d\d+ req/)
  t.is((await cli.stop('SIGINT')).code, 0, cli.stderr)
  t.is(cli.lines.length, 2, 'stdout has the ready and closed lines only')
  t.regex(cli.lines[0]!, /^ready/)
  t.is(cli.lines[1], 'closed')
})

test('without --stats the CLI prints no stats', async (t) => {
  const { cli } = await startCli(t, ['--json', 'null:1M'])
  await cli.waitForLine(/"event":"ready"/)
  await sleep(1500)
  t.is((await cli.stop('SIGTERM')).code, 0, cli.stderr)
  t.deepEqual(
    cli.lines.map((l) => (JSON.parse(l) as { event: string }).event),
    ['ready', 'close'],
  )
})
