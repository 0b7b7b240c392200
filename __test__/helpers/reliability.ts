/**
 * Helpers of the reliability specs (issue 7): the CLI run as any user with any environment, other
 * users as clients (setpriv), an unprivileged test user, per-block I/O probes that report errno
 * names, acknowledged-write logs, and VmRSS samples.
 */
import { spawn, type ChildProcessWithoutNullStreams } from 'node:child_process'
import { chown, readFile, stat } from 'node:fs/promises'
import { setTimeout as sleep } from 'node:timers/promises'

import { CLI, cliForOtherUsers } from './cli.js'
import { isMounted } from './mounts.js'
import { mustRun, run, type RunResult } from './run.js'
import { C_ENV } from './semantics.js'

/** The unprivileged user the tests export as (created when missing). */
export const TEST_USER = 'blockfuse-test'
/** `nobody`: the "other user" of the access tests. */
export const NOBODY = { uid: 65534, gid: 65534 }

export interface User {
  name: string
  uid: number
  gid: number
}

/** The test user, created with `useradd -m` if it does not exist yet. */
export async function testUser(): Promise<User> {
  let r = await run('id', ['-u', TEST_USER])
  if (r.code !== 0) {
    await mustRun('useradd', ['-m', '-s', '/bin/sh', TEST_USER])
    r = await mustRun('id', ['-u', TEST_USER])
  }
  const gid = await mustRun('id', ['-g', TEST_USER])
  return { name: TEST_USER, uid: Number(r.stdout.trim()), gid: Number(gid.stdout.trim()) }
}

/**
 * Unprivileged users open /dev/fuse (for fusermount3's mount): mode 0666 as distributions ship
 * it. Some containers create it 0600; `npm test` opens it for the run and puts the mode back.
 */
export async function assertDevFuseOpenToAll(): Promise<void> {
  const mode = (await stat('/dev/fuse')).mode & 0o777
  if ((mode & 0o666) !== 0o666) {
    throw new Error(
      `/dev/fuse has mode 0${mode.toString(8)}: other users cannot open it (run the specs with \`npm test\`, which opens it for the run, or \`chmod 0666 /dev/fuse\`)`,
    )
  }
}

/** Gives `paths` to `user`. */
export async function giveTo(user: User, ...paths: string[]): Promise<void> {
  for (const p of paths) await chown(p, user.uid, user.gid)
}

/** A PATH without root's private directories, for programs run as other users. */
const OTHER_USER_ENV: NodeJS.ProcessEnv = { ...C_ENV, PATH: '/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin' }

export interface SpawnAs {
  uid?: number
  gid?: number
  env?: NodeJS.ProcessEnv
}

/** The CLI as a running process, as any user, with any environment. */
export class Cli {
  readonly child: ChildProcessWithoutNullStreams
  stdout = ''
  stderr = ''
  readonly exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>
  #done = false

  constructor(args: readonly string[], as: SpawnAs = {}) {
    this.child = spawn(process.execPath, [as.uid === undefined ? CLI : cliForOtherUsers(), ...args], {
      stdio: 'pipe',
      env: as.env ?? (as.uid === undefined ? process.env : OTHER_USER_ENV),
      ...(as.uid === undefined ? {} : { uid: as.uid, gid: as.gid ?? as.uid }),
      cwd: '/',
    })
    this.child.stdin.end()
    this.child.stdout.setEncoding('utf8').on('data', (d: string) => (this.stdout += d))
    this.child.stderr.setEncoding('utf8').on('data', (d: string) => (this.stderr += d))
    this.exited = new Promise((resolve) => {
      this.child.on('close', (code, signal) => {
        this.#done = true
        resolve({ code, signal })
      })
    })
  }

  get pid(): number {
    return this.child.pid!
  }

  get output(): string {
    return `stdout:\n${this.stdout}\nstderr:\n${this.stderr}`
  }

  /** Waits until stdout or stderr (`where`) matches `pattern`; fails on exit or timeout. */
  async waitFor(pattern: RegExp, where: 'stdout' | 'stderr' = 'stdout', ms = 30_000): Promise<string> {
    const deadline = Date.now() + ms
    for (;;) {
      const m = pattern.exec(where === 'stdout' ? this.stdout : this.stderr)
      if (m) return m[0]
      if (this.#done) throw new Error(`the CLI exited before printing ${pattern}\n${this.output}`)
      if (Date.now() > deadline) throw new Error(`the CLI did not print ${pattern} within ${ms} ms\n${this.output}`)
      await sleep(20)
    }
  }

  /** Sends `signal` (if given) and waits for the exit; SIGKILLs and throws after `ms`. */
  async stop(
    signal: NodeJS.Signals | undefined,
    ms = 30_000,
  ): Promise<{ code: number | null; signal: NodeJS.Signals | null }> {
    if (signal) this.child.kill(signal)
    const timer = setTimeout(() => this.child.kill('SIGKILL'), ms)
    try {
      const r = await this.exited
      if (r.signal === 'SIGKILL' && signal !== 'SIGKILL') {
        throw new Error(`the CLI did not exit within ${ms} ms of ${signal ?? 'waiting'}\n${this.output}`)
      }
      return r
    } finally {
      clearTimeout(timer)
    }
  }
}

/** Starts the CLI and registers a teardown that kills it and removes any mount it left. */
export function startCli(
  t: { teardown: (fn: () => Promise<void> | void) => void },
  args: readonly string[],
  mountpoint: string,
  as: SpawnAs = {},
): Cli {
  const cli = new Cli(args, as)
  t.teardown(async () => {
    if (cli.child.exitCode === null && cli.child.signalCode === null) {
      cli.child.kill('SIGKILL')
      await cli.exited
    }
    // A failed test may leave the mount; the guard removes it, but do not wait on that here.
    if (await isMounted(mountpoint)) await run('umount', ['-l', mountpoint])
  })
  return cli
}

/** Polls until nothing is mounted on `path`; resolves with the milliseconds it took. */
export async function waitUnmounted(path: string, ms = 10_000): Promise<number> {
  const started = Date.now()
  while (await isMounted(path)) {
    if (Date.now() - started > ms) throw new Error(`${path} is still mounted after ${ms} ms`)
    await sleep(10)
  }
  return Date.now() - started
}

/**
 * The system's python3 (Debian's python3-minimal): another user cannot run the python3 that root's
 * PATH may find first (e.g. a pyenv shim under /root).
 */
export const SYSTEM_PYTHON = '/usr/bin/python3'

/** Runs `cmd args` as `nobody` (or another uid/gid) without supplementary groups. */
export function runAs(who: { uid: number; gid: number }, cmd: string, args: readonly string[]): Promise<RunResult> {
  const program = cmd === 'python3' ? SYSTEM_PYTHON : cmd
  return run('setpriv', [`--reuid=${who.uid}`, `--regid=${who.gid}`, '--clear-groups', '--', program, ...args], {
    env: OTHER_USER_ENV,
    timeout: 30_000,
  })
}

/**
 * Per-block client I/O: `python3 io_probe <path> <read|write> <offset> <count> <bs>` opens the
 * file with O_DIRECT and preads (or pwrites a pattern naming the block) `count` blocks of `bs`
 * bytes from `offset`, printing one JSON list: per block the errno name, or 'ok'.
 */
const IO_PROBE = String.raw`
import errno, json, mmap, os, sys
path, op, off, count, bs = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
fd = os.open(path, (os.O_RDONLY if op == 'read' else os.O_WRONLY) | os.O_DIRECT)
buf = mmap.mmap(-1, bs)
out = []
for i in range(count):
    pos = off + i * bs
    try:
        if op == 'read':
            n = os.preadv(fd, [buf], pos)
        else:
            buf.seek(0)
            buf.write((b'block %d ' % (pos // bs)).ljust(bs, b'.'))
            n = os.pwritev(fd, [buf], pos)
        out.append('ok' if n == bs else 'short %d' % n)
    except OSError as e:
        out.append(errno.errorcode.get(e.errno, str(e.errno)))
print(json.dumps(out))
`

/** What each block of a per-block read or write through `path` got: 'ok' or an errno name. */
export async function probeBlocks(
  path: string,
  op: 'read' | 'write',
  offset: number,
  count: number,
  bs = 4096,
  as?: { uid: number; gid: number },
): Promise<string[]> {
  const args = ['-c', IO_PROBE, path, op, String(offset), String(count), String(bs)]
  const r = as ? await runAs(as, 'python3', args) : await run('python3', args, { env: C_ENV, timeout: 60_000 })
  if (r.code !== 0) throw new Error(`io probe failed (${r.code ?? r.signal}):\n${r.stdout}\n${r.stderr}`)
  return JSON.parse(r.stdout) as string[]
}

/** The pattern `probeBlocks(.., 'write', ..)` writes into block `index`. */
export function blockPattern(index: number, bs = 4096): Buffer {
  const b = Buffer.alloc(bs, '.')
  b.write(`block ${index} `)
  return b
}

/** VmRSS of process `pid` in KiB. */
export async function vmRssKiB(pid: number): Promise<number> {
  const status = await readFile(`/proc/${pid}/status`, 'utf8')
  const m = /^VmRSS:\s+(\d+) kB$/m.exec(status)
  if (!m) throw new Error(`no VmRSS in /proc/${pid}/status`)
  return Number(m[1])
}
