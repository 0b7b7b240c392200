/**
 * The `blockfuse` CLI as users run it: node dist/cli.js, real exports, real clients (cmp, dd,
 * findmnt), real signals.
 */
import { readFileSync } from 'node:fs'
import { readFile, stat, writeFile } from 'node:fs/promises'
import { join } from 'node:path'

import test, { type ExecutionContext } from 'ava'

import { assertCliBuilt, CliProcess, runCli } from './helpers/cli.js'
import { assertE2eEnvironment } from './helpers/env.js'
import { imageFixture } from './helpers/exports.js'
import { MiB } from './helpers/files.js'
import { isMounted } from './helpers/mounts.js'
import { mustRun, run } from './helpers/run.js'

test.before(() => {
  assertCliBuilt()
  assertE2eEnvironment(['cmp', 'dd', 'findmnt', 'umount'])
})

const VERSION = (JSON.parse(readFileSync(new URL('../package.json', import.meta.url), 'utf8')) as { version: string })
  .version

/** Starts `blockfuse export ...`; the teardown makes sure neither the process nor its mount outlive the test. */
function startExport(t: ExecutionContext, args: string[]): CliProcess {
  const cli = new CliProcess(['export', ...args])
  const mountpoint = args.at(-1)!
  t.teardown(async () => {
    if (cli.child.exitCode === null && cli.child.signalCode === null) await cli.stop('SIGTERM').catch(() => undefined)
    if (await isMounted(mountpoint)) await run('umount', ['-l', mountpoint])
  })
  return cli
}

// --- no export involved ----------------------------------------------------------------------

test('--help prints the usage on stdout and exits 0', async (t) => {
  const r = await runCli(['--help'])
  t.is(r.code, 0)
  t.regex(r.stdout, /^Usage: blockfuse <command>/)
  t.regex(r.stdout, /export <source> <mountpoint>/)
  t.is(r.stderr, '')
})

test('export --help prints the export usage and exits 0', async (t) => {
  const r = await runCli(['export', '--help'])
  t.is(r.code, 0)
  t.regex(r.stdout, /^Usage: blockfuse export \[options\] <source> <mountpoint>/)
  for (const flag of [
    '--writable',
    '--growable',
    '--allow-other',
    '--threads',
    '--format',
    '--cache',
    '--writethrough',
    '--on-halt',
    '--json',
    '--stats',
  ]) {
    t.true(r.stdout.includes(flag), `usage mentions ${flag}`)
  }
})

test('--version prints the package version and exits 0', async (t) => {
  const r = await runCli(['--version'])
  t.is(r.code, 0)
  t.is(r.stdout, `blockfuse ${VERSION}\n`)
})

for (const [what, args, message] of [
  ['no command', [], /missing command/],
  ['an unknown command', ['frobnicate'], /unknown command "frobnicate"/],
  ['export without a mountpoint', ['export', 'img.raw'], /export needs <source> and <mountpoint>/],
  ['an unknown option', ['export', '--read-only', 'a', 'b'], /Unknown option '--read-only'/],
  [
    'a bad --allow-other',
    ['export', '--allow-other', 'sometimes', 'a', 'b'],
    /--allow-other must be one of on, off, auto/,
  ],
  ['a non-numeric --threads', ['export', '--threads', 'x', 'a', 'b'], /--threads must be a whole number/],
  ['--threads 0', ['export', '--threads', '0', 'a', 'b'], /--threads must be a whole number from 1 to 64, got "0"/],
  ['--threads 10000', ['export', '--threads', '10000', 'a', 'b'], /--threads must be a whole number from 1 to 64/],
  ['--threads without a value', ['export', 'a', 'b', '--threads'], /--threads/],
  ['--growable without --writable', ['export', '--growable', 'a', 'b'], /--growable needs --writable/],
  ['--format null with a path', ['export', '--format', 'null', 'img.raw', 'b'], /--format null needs .*null:<size>/],
  [
    '--format qcow2 with a null source',
    ['export', '--format', 'qcow2', 'null:1G', 'b'],
    /--format qcow2 needs an image path/,
  ],
  ['a bad --format', ['export', '--format', 'vhdx', 'a', 'b'], /--format must be one of raw, qcow2, vmdk, null, auto/],
  ['a bad --cache', ['export', '--cache', 'direct', 'a', 'b'], /--cache must be one of writeback, none/],
  ['a bad --io-uring', ['export', '--io-uring', 'yes', 'a', 'b'], /--io-uring must be one of auto, on, off/],
  ['a bad --on-halt', ['export', '--on-halt', 'stop', 'a', 'b'], /--on-halt must be one of unmount, keep/],
  ['--writable given a value', ['export', '--writable=yes', 'a', 'b'], /--writable/],
  ['--writethrough given a value', ['export', '--writethrough=1', 'a', 'b'], /--writethrough/],
  ['--json given a value', ['export', '--json=1', 'a', 'b'], /--json/],
  ['--stats given a value', ['export', '--stats=1', 'a', 'b'], /--stats/],
  ['a null size of 0', ['export', 'null:0', 'b'], /null:0: null backend size "0" is invalid/],
  ['a fractional null size', ['export', 'null:1.5G', 'b'], /null:1.5G: null backend size "1.5G" is invalid/],
  ['an empty source', ['export', '', 'b'], /<source> must not be empty/],
  ['three arguments', ['export', 'a', 'b', 'c'], /export takes two arguments/],
  ['extra arguments after --version', ['--version', 'x'], /unexpected argument/],
] as Array<[string, string[], RegExp]>) {
  test(`usage error exits 2 with the usage on stderr: ${what}`, async (t) => {
    const r = await runCli(args)
    t.is(r.code, 2, r.stderr)
    t.is(r.stdout, '')
    t.regex(r.stderr, /^blockfuse: /)
    t.regex(r.stderr, message)
    t.regex(r.stderr, /Usage: blockfuse/)
    t.notRegex(r.stderr, /option "|source: \{|writable: true|INVALID_OPTION/, 'CLI syntax, not API option names')
  })
}

test('a missing source exits 1 with the message and code', async (t) => {
  const f = await imageFixture(t, MiB)
  const missing = join(f.dir, 'missing.raw')
  const r = await runCli(['export', missing, f.mountpoint])
  t.is(r.code, 1)
  t.is(r.stdout, '')
  t.is(r.stderr, `blockfuse: source "${missing}" does not exist (SOURCE_NOT_FOUND)\n`)
})

test('runtime errors (what only the filesystem or the kernel can tell) exit 1 with their code', async (t) => {
  const f = await imageFixture(t, MiB)
  await writeFile(join(f.dir, 'qcow2-named.raw'), Buffer.alloc(MiB))
  const cases: Array<[string[], string]> = [
    [[join(f.dir, 'nope.raw'), f.mountpoint], 'SOURCE_NOT_FOUND'],
    [[f.dir, f.mountpoint], 'SOURCE_NOT_FILE'],
    [['--format', 'qcow2', join(f.dir, 'qcow2-named.raw'), f.mountpoint], 'SOURCE_OPEN_FAILED'],
    [[f.image, f.dir], 'MOUNTPOINT_NOT_FILE'],
    [[f.image, join(f.dir, 'nope')], 'MOUNTPOINT_NOT_FOUND'],
  ]
  for (const [args, code] of cases) {
    const r = await runCli(['export', ...args])
    t.is(r.code, 1, `${args.join(' ')}: ${r.stderr}`)
    t.regex(r.stderr, new RegExp(`^blockfuse: .+ \\(${code}\\)\\n$`), args.join(' '))
  }
  t.false(await isMounted(f.mountpoint))
})

// --- real exports ----------------------------------------------------------------------------

test('the ready line names passthrough when a read-only raw export uses it (the default as root)', async (t) => {
  const f = await imageFixture(t, 2 * MiB)
  const cli = startExport(t, ['--json', f.image, f.mountpoint])
  const ready = JSON.parse(await cli.waitForLine(/^\{"event":"ready"/)) as { passthrough: boolean }
  t.true(ready.passthrough)
  await cli.stop('SIGINT')
  const text = startExport(t, [f.image, f.mountpoint])
  t.regex(await text.waitForLine(/^ready/), /, read\(2\), passthrough\)$/)
  await text.stop('SIGINT')
})

test('ready / SIGINT cycle: cmp sees the image, SIGINT unmounts and exits 0', async (t) => {
  const f = await imageFixture(t, 4 * MiB)
  const before = await stat(f.mountpoint)
  // Without passthrough: the ready line names it when used (the test above).
  const cli = startExport(t, ['--passthrough', 'off', f.image, f.mountpoint])
  const ready = await cli.waitForLine(/^ready/)
  t.is(ready, `ready: ${f.image} exported at ${f.mountpoint} (raw, ${4 * MiB} bytes, read-only, 1 thread, read(2))`)
  t.is(cli.lines.length, 1, 'exactly one line before the export is used')
  t.true(await isMounted(f.mountpoint))
  await mustRun('cmp', [f.image, f.mountpoint])

  const { code, signal } = await cli.stop('SIGINT')
  t.is(code, 0, cli.stderr)
  t.is(signal, null)
  t.deepEqual(cli.lines, [ready, 'closed'])
  t.false(await isMounted(f.mountpoint), 'findmnt finds nothing on the mountpoint')
  const after = await stat(f.mountpoint)
  t.is(after.size, 0)
  t.is(after.ino, before.ino, 'the mountpoint is the plain file it was')
})

test('--json / SIGTERM cycle: one JSON object per line, SIGTERM unmounts and exits 0', async (t) => {
  const f = await imageFixture(t, 2 * MiB)
  const cli = startExport(t, ['--json', '--allow-other', 'off', f.image, f.mountpoint])
  const ready = JSON.parse(await cli.waitForLine(/^\{/)) as Record<string, unknown>
  t.like(ready, {
    event: 'ready',
    mountpoint: f.mountpoint,
    source: f.image,
    format: 'raw',
    size: 2 * MiB,
    writable: false,
    growable: false,
    allowOther: false,
    threads: 1,
  })
  await mustRun('cmp', [f.image, f.mountpoint])

  const { code } = await cli.stop('SIGTERM')
  t.is(code, 0, cli.stderr)
  t.deepEqual(
    cli.lines.map((l) => JSON.parse(l) as unknown),
    [ready, { event: 'close' }],
  )
  t.false(await isMounted(f.mountpoint))
})

test('--writable: a dd write through the export is in the image afterwards', async (t) => {
  const f = await imageFixture(t, 4 * MiB)
  const cli = startExport(t, ['--writable', f.image, f.mountpoint])
  t.regex(await cli.waitForLine(/^ready/), /\(raw, 4194304 bytes, writable, /)
  const payload = 'written through blockfuse'
  await mustRun('sh', [
    '-c',
    `printf '%s' '${payload}' | dd of='${f.mountpoint}' bs=1 seek=123456 conv=notrunc status=none`,
  ])
  t.is((await cli.stop('SIGINT')).code, 0, cli.stderr)

  const image = await readFile(f.image)
  t.is(image.length, 4 * MiB, 'conv=notrunc keeps the size')
  t.is(image.subarray(123456, 123456 + payload.length).toString(), payload)
  const expected = Buffer.from(f.data)
  expected.write(payload, 123456)
  t.true(image.equals(expected), 'nothing else changed')
})

test('null:<size> exports zeros of that size', async (t) => {
  const f = await imageFixture(t, MiB)
  const cli = startExport(t, ['null:3M', f.mountpoint])
  t.is(
    await cli.waitForLine(/^ready/),
    `ready: null:${3 * MiB} exported at ${f.mountpoint} (null, ${3 * MiB} bytes, read-only, 1 thread, read(2))`,
  )
  t.is((await stat(f.mountpoint)).size, 3 * MiB)
  await mustRun('cmp', ['-n', String(3 * MiB), f.mountpoint, '/dev/zero'])
  t.is((await cli.stop('SIGINT')).code, 0, cli.stderr)
})

test('a second export on a mountpoint another process exports is refused (MOUNTPOINT_IN_USE)', async (t) => {
  const f = await imageFixture(t, MiB)
  const first = startExport(t, [f.image, f.mountpoint])
  await first.waitForLine(/^ready/)
  const second = await runCli(['export', f.image, f.mountpoint])
  t.is(second.code, 1)
  t.regex(
    second.stderr,
    /^blockfuse: mountpoint ".*\/mnt" already has a filesystem \(fuse[^)]*\) mounted on it.* \(MOUNTPOINT_IN_USE\)\n$/,
  )
  await mustRun('cmp', [f.image, f.mountpoint])
  t.is((await first.stop('SIGINT')).code, 0, first.stderr)
  t.false(await isMounted(f.mountpoint))
})

test('a mount whose server does not answer (a stopped export) is refused with a hint, not stat()ed', async (t) => {
  const f = await imageFixture(t, MiB)
  const first = startExport(t, [f.image, f.mountpoint])
  await first.waitForLine(/^ready/)
  // A stopped server answers nothing: a stat() of its mountpoint would hang until SIGCONT.
  first.child.kill('SIGSTOP')
  t.teardown(() => first.child.kill('SIGCONT'))
  t.true(await isMounted(f.mountpoint))
  const second = await runCli(['export', f.image, f.mountpoint])
  t.is(second.code, 1)
  t.regex(
    second.stderr,
    /already has a filesystem \(fuse[^)]*\) mounted on it.*`fusermount3 -u .*\/mnt`.*\(MOUNTPOINT_IN_USE\)/,
  )
  first.child.kill('SIGCONT')
  t.is((await first.stop('SIGTERM')).code, 0, first.stderr)
  t.false(await isMounted(f.mountpoint))
})

test('an export killed with SIGKILL does not leave its mount behind (the unmount guard removes it)', async (t) => {
  const f = await imageFixture(t, MiB)
  const first = startExport(t, [f.image, f.mountpoint])
  await first.waitForLine(/^ready/)
  t.true(await isMounted(f.mountpoint))
  // SIGKILL gives the CLI no chance to unmount itself.
  await first.stop('SIGKILL')
  const deadline = Date.now() + 10_000
  while ((await isMounted(f.mountpoint)) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50))
  t.false(await isMounted(f.mountpoint), 'still mounted 10 s after the export was killed')
  t.is((await stat(f.mountpoint)).size, 0, 'the mountpoint is the plain file again')
  // And it can be exported again at once.
  const second = startExport(t, [f.image, f.mountpoint])
  await second.waitForLine(/^ready/)
  await mustRun('cmp', [f.image, f.mountpoint])
  t.is((await second.stop('SIGTERM')).code, 0, second.stderr)
})

test('SIGHUP (a closed terminal) also drains, unmounts and exits 0', async (t) => {
  const f = await imageFixture(t, MiB)
  const cli = startExport(t, ['--writable', f.image, f.mountpoint])
  await cli.waitForLine(/^ready/)
  await mustRun('cmp', [f.image, f.mountpoint])
  t.is((await cli.stop('SIGHUP')).code, 0, cli.stderr)
  t.is(cli.lines.at(-1), 'closed')
  t.false(await isMounted(f.mountpoint))
})

/**
 * Aborts the FUSE connection of the export on `mountpoint` through fusectl, as
 * `echo 1 > /sys/fs/fuse/connections/<id>/abort` does: the native core sees its /dev/fuse stream
 * end, which is a halt.
 */
async function abortFuseConnection(mountpoint: string): Promise<void> {
  const fusectl = '/sys/fs/fuse/connections'
  if (!(await isMounted(fusectl))) await mustRun('mount', ['-t', 'fusectl', 'fusectl', fusectl])
  const { stdout } = await mustRun('findmnt', ['-n', '-o', 'MAJ:MIN', mountpoint])
  const match = /^\s*(\d+):(\d+)\s*$/.exec(stdout)
  if (!match) throw new Error(`findmnt printed no MAJ:MIN for ${mountpoint}: ${JSON.stringify(stdout)}`)
  // The kernel's dev_t: major in the top 12 of 32 bits, minor in the low 20.
  await writeFile(`${fusectl}/${Number(match[1]) * 2 ** 20 + Number(match[2])}/abort`, '1')
}

test('a halt (aborted FUSE connection) prints a halt event, unmounts and exits 1', async (t) => {
  const f = await imageFixture(t, MiB)
  const cli = startExport(t, ['--json', f.image, f.mountpoint])
  await cli.waitForLine(/"event":"ready"/)
  await abortFuseConnection(f.mountpoint)
  const { code } = await cli.waitForExit(15_000, 'of the halt (it should unmount and exit by itself)')
  t.is(code, 1, cli.stderr)
  const events = cli.lines.map((l) => JSON.parse(l) as { event: string; reason?: string })
  t.deepEqual(
    events.map((e) => e.event),
    ['ready', 'halt', 'close'],
  )
  t.true((events[1]?.reason ?? '').length > 0, 'the halt carries a reason')
  t.regex(cli.stderr, /^blockfuse: the export halted and was unmounted: .+ \(HALTED\)\n$/)
  t.false(await isMounted(f.mountpoint))
})
