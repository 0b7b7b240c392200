/**
 * A real file system without lock support, for the image-lock specs: bench-fuser (the workspace's
 * fuser-based single-file server) with `--refuse-locks` serves an image as one file and answers
 * every POSIX/OFD lock request ENOLCK, as NFS without lockd does.
 */
import { spawn } from 'node:child_process'
import { fileURLToPath } from 'node:url'

import type { ExecutionContext } from 'ava'

import { forceUnmountAll, isMounted } from './mounts.js'
import { mustRun } from './run.js'

const ROOT = fileURLToPath(new URL('../..', import.meta.url))

/** Builds bench-fuser if needed (a no-op after `cargo test --workspace`) and returns its path. */
async function benchFuser(): Promise<string> {
  const r = await mustRun('cargo', ['build', '-q', '-p', 'blockfuse-bench-fuser', '--message-format=json'], {
    cwd: ROOT,
  })
  for (const line of r.stdout.split('\n')) {
    if (!line.startsWith('{')) continue
    const msg = JSON.parse(line) as { reason?: string; executable?: string | null; target?: { name?: string } }
    if (msg.reason === 'compiler-artifact' && msg.target?.name === 'bench-fuser' && msg.executable) {
      return msg.executable
    }
  }
  throw new Error(`cargo build -p blockfuse-bench-fuser named no bench-fuser executable:\n${r.stdout}`)
}

/** Serves `image` at the file `mountpoint` without lock support until the test ends. */
export async function serveWithoutLocks(t: ExecutionContext, image: string, mountpoint: string): Promise<void> {
  const child = spawn(await benchFuser(), ['--refuse-locks', image, mountpoint], { stdio: ['ignore', 'pipe', 'pipe'] })
  let output = ''
  child.stdout.setEncoding('utf8').on('data', (d: string) => (output += d))
  child.stderr.setEncoding('utf8').on('data', (d: string) => (output += d))
  t.teardown(async () => {
    child.kill('SIGTERM')
    await new Promise((resolve) => (child.exitCode === null ? child.once('close', resolve) : resolve(null)))
    if (await isMounted(mountpoint)) await forceUnmountAll(mountpoint)
  })
  const deadline = Date.now() + 30_000
  while (!/^ready:/m.test(output)) {
    if (child.exitCode !== null || Date.now() > deadline) {
      throw new Error(`bench-fuser --refuse-locks did not become ready:\n${output}`)
    }
    await new Promise((resolve) => setTimeout(resolve, 20))
  }
}
