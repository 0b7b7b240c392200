/**
 * Issue 7, unprivileged use: an ordinary user (`blockfuse-test`, created when missing) exports an
 * image it owns through fusermount3 with the CLI: it reads and writes through the export, SIGINT
 * unmounts, `kill -9` is cleaned up by the unmount guard (through `fusermount3 -u -z`), and
 * `--allow-other auto` without `user_allow_other` in /etc/fuse.conf falls back to off and says so.
 */
import { chmod, readFile, stat } from 'node:fs/promises'

import test, { type ExecutionContext } from 'ava'

import { assertCliBuilt } from './helpers/cli.js'
import { assertE2eEnvironment } from './helpers/env.js'
import { imageFixture, type ImageFixture } from './helpers/exports.js'
import { MiB } from './helpers/files.js'
import { isMounted } from './helpers/mounts.js'
import {
  blockPattern,
  assertDevFuseOpenToAll,
  giveTo,
  NOBODY,
  probeBlocks,
  runAs,
  startCli,
  testUser,
  waitUnmounted,
  type User,
} from './helpers/reliability.js'
import { client, mustClient } from './helpers/semantics.js'

let user: User

test.before(async () => {
  assertCliBuilt()
  assertE2eEnvironment(['fusermount3', 'setpriv', 'python3', 'findmnt', 'useradd'])
  const fm = await stat((await mustClient('sh', ['-c', 'command -v fusermount3'])).stdout.trim())
  if ((fm.mode & 0o4000) === 0 || fm.uid !== 0) {
    throw new Error('fusermount3 is not setuid root: unprivileged users cannot mount (reinstall fuse3)')
  }
  await assertDevFuseOpenToAll()
  user = await testUser()
})

/** A fixture owned by the test user, in a directory others may traverse. */
async function userFixture(t: ExecutionContext, size = MiB): Promise<ImageFixture> {
  const f = await imageFixture(t, size)
  await giveTo(user, f.dir, f.image, f.mountpoint)
  await chmod(f.dir, 0o755)
  return f
}

function asUser(): { uid: number; gid: number } {
  return { uid: user.uid, gid: user.gid }
}

async function mountInfo(path: string): Promise<{ fstype: string; options: string[] }> {
  const out = (await mustClient('findmnt', ['-n', '-o', 'FSTYPE,OPTIONS', path])).stdout.trim()
  const [fstype, options] = out.split(/\s+/)
  return { fstype: fstype!, options: options!.split(',') }
}

test.serial('an ordinary user exports its image through fusermount3: reads, writes, SIGINT unmounts', async (t) => {
  const f = await userFixture(t, 2 * MiB)
  const cli = startCli(
    t,
    ['export', '--writable', '--format', 'raw', '--allow-other', 'off', f.image, f.mountpoint],
    f.mountpoint,
    asUser(),
  )
  await cli.waitFor(/^ready/m)
  const mi = await mountInfo(f.mountpoint)
  t.is(mi.fstype, 'fuse.blockfuse')
  for (const o of ['nosuid', 'nodev', `user_id=${user.uid}`, `group_id=${user.gid}`]) t.true(mi.options.includes(o), o)
  t.false(mi.options.includes('allow_other'))

  // The owner reads it all and writes through it.
  const cmp = await runAs(asUser(), 'cmp', [f.image, f.mountpoint])
  t.is(cmp.code, 0, cmp.stderr)
  t.deepEqual(await probeBlocks(f.mountpoint, 'write', 4096 * 10, 2, 4096, asUser()), ['ok', 'ok'])
  // Nobody else, not even root: the mount is the user's alone.
  const other = await runAs(NOBODY, 'cat', [f.mountpoint])
  t.regex(other.stderr, /Permission denied/)
  const root = await client('cat', [f.mountpoint])
  t.regex(root.stderr, /Permission denied/, 'root is another user too')

  t.is((await cli.stop('SIGINT')).code, 0, cli.output)
  t.false(await isMounted(f.mountpoint))
  const image = await readFile(f.image)
  t.true(image.subarray(40960, 40960 + 4096).equals(blockPattern(10)))
  t.true(image.subarray(45056, 45056 + 4096).equals(blockPattern(11)))
})

test.serial(
  "kill -9 of an ordinary user's export: the guard unmounts through fusermount3; the user exports again at once",
  async (t) => {
    const f = await userFixture(t)
    const args = ['export', '--format', 'raw', '--allow-other', 'off', f.image, f.mountpoint]
    const first = startCli(t, args, f.mountpoint, asUser())
    await first.waitFor(/^ready/m)
    await first.stop('SIGKILL')
    const ms = await waitUnmounted(f.mountpoint, 3000)
    t.log(`mount gone ${ms} ms after the exporting process was reaped`)
    const second = startCli(t, args, f.mountpoint, asUser())
    await second.waitFor(/^ready/m)
    const cmp = await runAs(asUser(), 'cmp', [f.image, f.mountpoint])
    t.is(cmp.code, 0, cmp.stderr)
    t.is((await second.stop('SIGTERM')).code, 0, second.output)
    t.false(await isMounted(f.mountpoint))
  },
)

test.serial(
  'allow-other auto without user_allow_other: falls back to off and says so; others get EACCES',
  async (t) => {
    const conf = await readFile('/etc/fuse.conf', 'utf8').catch(() => '')
    if (/^\s*user_allow_other\s*$/m.test(conf)) {
      throw new Error('/etc/fuse.conf enables user_allow_other: this test needs it disabled (the distribution default)')
    }
    const f = await userFixture(t)
    const cli = startCli(t, ['export', '--json', '--format', 'raw', f.image, f.mountpoint], f.mountpoint, asUser())
    const ready = JSON.parse(await cli.waitFor(/^\{"event":"ready".*$/m)) as {
      allowOther: boolean
      passthrough: boolean
    }
    t.false(ready.allowOther)
    // A read-only raw export would pass through, but registering the image needs CAP_SYS_ADMIN.
    t.false(ready.passthrough)
    await cli.waitFor(
      /warning: --allow-other auto: .*user_allow_other.*falling back to off: only uid \d+ can access/,
      'stderr',
    )
    t.false((await mountInfo(f.mountpoint)).options.includes('allow_other'))
    const other = await runAs(NOBODY, 'cat', [f.mountpoint])
    t.regex(other.stderr, /Permission denied/)
    const own = await runAs(asUser(), 'cmp', [f.image, f.mountpoint])
    t.is(own.code, 0, own.stderr)
    t.is((await cli.stop('SIGINT')).code, 0, cli.output)
  },
)

test.serial('allow-other on as an ordinary user without user_allow_other is refused (MOUNT_FAILED)', async (t) => {
  const f = await userFixture(t)
  const cli = startCli(
    t,
    ['export', '--format', 'raw', '--allow-other', 'on', f.image, f.mountpoint],
    f.mountpoint,
    asUser(),
  )
  const exit = await cli.stop(undefined)
  t.is(exit.code, 1)
  t.regex(cli.stderr, /user_allow_other.*\(MOUNT_FAILED\)/)
  t.false(await isMounted(f.mountpoint))
})

test.serial(
  '--passthrough on as an ordinary user fails with PASSTHROUGH_UNAVAILABLE and leaves no mount',
  async (t) => {
    const f = await userFixture(t)
    const cli = startCli(
      t,
      ['export', '--format', 'raw', '--passthrough', 'on', f.image, f.mountpoint],
      f.mountpoint,
      asUser(),
    )
    const { code } = await cli.exited
    t.is(code, 1, cli.output)
    t.regex(cli.output, /CAP_SYS_ADMIN.*\(PASSTHROUGH_UNAVAILABLE\)/)
    t.false(await isMounted(f.mountpoint))
  },
)
