/**
 * Issue 22: a process that has its own export's file open exits promptly however it ends:
 * process.exit, an uncaught exception, an unhandled rejection, SIGINT, SIGTERM, SIGHUP (no
 * handlers: the kernel's default action) and SIGKILL; read(2) and io_uring intakes; as root and
 * as an ordinary user (fusermount3). Within 2 s the process is reaped (no zombie) and the mount
 * is gone. docs/DESIGN.md ("Ending without close()") has the mechanism: the process's own opens
 * get FOPEN_NOFLUSH, so closing them at exit waits for nobody.
 *
 * Mid-read and mid-write: the script keeps reads or writes going through Node's thread pool on
 * an NBD source that answers after a delay (nbdkit's `delay` filter), so requests are in flight
 * when it ends; a thread stuck on one keeps the fd table alive, and the unmount guard must abort
 * the connection (its sentinel thread's private fd table tells it the process is dying), with
 * either intake. An ordinary user's guard aborts through fusectl: this spec mounts fusectl at
 * /sys/fs/fuse/connections when it is missing (systemd does so on every boot) and leaves it.
 */
import { spawn } from 'node:child_process'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { chmod, mkdir, open, readdir, readFile, writeFile } from 'node:fs/promises'
import { setTimeout as sleep } from 'node:timers/promises'

import test, { type ExecutionContext } from 'ava'

import { FuseExport } from '../ts/index.js'
import { assertCliBuilt, packageCopyForOtherUsers } from './helpers/cli.js'
import { assertE2eEnvironment } from './helpers/env.js'
import { imageFixture } from './helpers/exports.js'
import { MiB } from './helpers/files.js'
import { forceUnmountAll, mountsOn } from './helpers/mounts.js'
import { assertDevFuseOpenToAll, giveTo, testUser, type User } from './helpers/reliability.js'
import { nbdkit } from './helpers/nbd.js'
import { mustRun } from './helpers/run.js'
import { fuseConnectionId } from './helpers/semantics.js'

const INDEX = fileURLToPath(new URL('../dist/index.js', import.meta.url))
const SCRIPT = fileURLToPath(new URL('fixtures/exit-own-export.mjs', import.meta.url))

let user: User

test.before(async () => {
  assertCliBuilt()
  assertE2eEnvironment(['fusermount3', 'findmnt', 'umount', 'useradd'])
  await assertDevFuseOpenToAll()
  user = await testUser()
  await fusectlMounted()
})

const FUSECTL = '/sys/fs/fuse/connections'

/**
 * Mounts fusectl where the kernel's connections are listed, unless it is there. It stays mounted
 * (as in semantics-halt.spec.ts): specs running at the same time may rely on it.
 */
async function fusectlMounted(): Promise<void> {
  const mountinfo = await readFile('/proc/self/mountinfo', 'utf8')
  if (mountinfo.split('\n').some((l) => l.split(' ')[4] === FUSECTL)) return
  await mustRun('mount', ['-t', 'fusectl', 'none', FUSECTL])
  await readdir(FUSECTL)
}

/**
 * A 2 MiB NBD source (nbdkit memory) whose every read and write takes 0.3 s, served on a socket any
 * user can connect to: requests of the script are reliably in flight when it ends.
 */
async function slowSource(t: ExecutionContext, dir: string): Promise<string> {
  const sockDir = join(dir, 'nbd')
  await mkdir(sockDir)
  await chmod(sockDir, 0o777)
  const socket = join(sockDir, 'sock')
  const server = await nbdkit(t, { kind: 'unix', socket }, [
    '--filter=delay',
    'memory',
    '2M',
    'delay-read=300ms',
    'delay-write=300ms',
  ])
  await chmod(socket, 0o666)
  return server.uri
}

type How = 'exit' | 'throw' | 'reject' | 'SIGINT' | 'SIGTERM' | 'SIGHUP' | 'SIGKILL'
type State = 'idle' | 'read' | 'write'
const HOWS: How[] = ['exit', 'throw', 'reject', 'SIGINT', 'SIGTERM', 'SIGHUP', 'SIGKILL']

/** The script ends itself this long after printing `ready` (see the fixture). */
const ACTION_DELAY_MS = 150
const BOUND_MS = 2000

async function exitsPromptly(t: ExecutionContext, ioUring: 'on' | 'off', how: How, state: State, asUser: boolean) {
  const f = await imageFixture(t, 2 * MiB)
  if (asUser) {
    await giveTo(user, f.dir, f.image, f.mountpoint)
    await chmod(f.dir, 0o755)
  }
  // Another user runs the copy it can read: the clone may be in a folder only root can enter.
  const copy = asUser ? packageCopyForOtherUsers() : undefined
  const script = copy ? join(copy, '__test__', 'fixtures', 'exit-own-export.mjs') : SCRIPT
  const index = copy ? join(copy, 'dist', 'index.js') : INDEX
  const source = state === 'idle' ? f.image : await slowSource(t, f.dir)
  const child = spawn(process.execPath, [script, index, source, f.mountpoint, ioUring, how, state], {
    stdio: ['ignore', 'pipe', 'pipe'],
    ...(asUser ? { uid: user.uid, gid: user.gid } : {}),
  })
  let out = ''
  let err = ''
  child.stdout.setEncoding('utf8').on('data', (d: string) => (out += d))
  child.stderr.setEncoding('utf8').on('data', (d: string) => (err += d))
  let reaped = false
  const exited = new Promise<void>((resolve) =>
    child.on('exit', () => {
      reaped = true
      resolve()
    }),
  )
  const conn: { id?: number } = {}
  t.teardown(async () => {
    // Whatever happened: end the connection (nothing may wait on it), unmount, kill.
    if (!reaped && conn.id !== undefined) {
      await writeFile(`${FUSECTL}/${conn.id}/abort`, '1').catch(() => undefined)
    }
    await forceUnmountAll(f.mountpoint)
    if (!reaped) {
      child.kill('SIGKILL')
      // A process the kernel cannot finish off must not keep this test worker alive as well.
      child.stdout.destroy()
      child.stderr.destroy()
      child.unref()
    }
  })

  const startDeadline = Date.now() + 30_000
  while (!/^ready \d+$/m.test(out)) {
    if (reaped || Date.now() > startDeadline) throw new Error(`the script did not get ready: ${out} ${err}`)
    await sleep(10)
  }
  const readyAt = Date.now()
  t.truthy((await mountsOn(f.mountpoint))[0], 'the export is mounted')
  conn.id = await fuseConnectionId(f.mountpoint)

  // The bound, measured from the moment the script ends itself; polled generously.
  const deadline = readyAt + ACTION_DELAY_MS + BOUND_MS
  await Promise.race([exited, sleep(Math.max(0, deadline - Date.now()) + 500)])
  t.true(reaped, `the process was reaped within ${BOUND_MS} ms of ending (not a zombie); output: ${out} ${err}`)
  let mounts = await mountsOn(f.mountpoint)
  while (mounts.length > 0 && Date.now() < deadline + 500) {
    await sleep(20)
    mounts = await mountsOn(f.mountpoint)
  }
  t.deepEqual(mounts, [], 'the mount is gone')
  t.log(`reaped ${reaped ? 'yes' : 'NO'}, ${Date.now() - readyAt - ACTION_DELAY_MS} ms after the end began`)
}

for (const how of HOWS) {
  for (const ioUring of ['off', 'on'] as const) {
    const intake = ioUring === 'on' ? 'io_uring' : 'read(2)'
    test.serial(`${intake} intake, root: ${how} with its own export's file open`, (t) =>
      exitsPromptly(t, ioUring, how, 'idle', false),
    )
    test.serial(`${intake} intake, an ordinary user (fusermount3): ${how} with its own export's file open`, (t) =>
      exitsPromptly(t, ioUring, how, 'idle', true),
    )
  }
  for (const state of ['read', 'write'] as const) {
    for (const ioUring of ['off', 'on'] as const) {
      const intake = ioUring === 'on' ? 'io_uring' : 'read(2)'
      test.serial(`${intake} intake, root: ${how} in the middle of a ${state} on its own export`, (t) =>
        exitsPromptly(t, ioUring, how, state, false),
      )
      test.serial(`${intake} intake, an ordinary user (fusermount3): ${how} in the middle of a ${state}`, (t) =>
        exitsPromptly(t, ioUring, how, state, true),
      )
    }
  }
}

test("closing a file the exporting process opened sends no FLUSH; another process's close does", async (t) => {
  const f = await imageFixture(t, MiB)
  t.teardown(() => forceUnmountAll(f.mountpoint))
  const exp = await FuseExport.create({ source: f.image, mountpoint: f.mountpoint, writable: true })
  try {
    const fh = await open(f.mountpoint, 'r+')
    await fh.read(Buffer.alloc(4096), 0, 4096, 0)
    await fh.close()
    t.is(exp.stats().requests.FLUSH ?? 0, 0, 'our own close: FOPEN_NOFLUSH')
    await mustRun('dd', [`if=${f.mountpoint}`, 'of=/dev/null', 'bs=4k', 'count=1', 'status=none'])
    t.true((exp.stats().requests.FLUSH ?? 0) >= 1, "dd's close still flushes")
  } finally {
    await exp.close()
  }
})
