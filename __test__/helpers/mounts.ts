/** Asking the system (not blockfuse) what is mounted. */
import { readFile, writeFile } from 'node:fs/promises'

import { run } from './run.js'

/** True when findmnt finds a mount on exactly `path`. */
export async function isMounted(path: string): Promise<boolean> {
  const result = await run('findmnt', ['-n', path])
  if (result.code !== 0 && result.code !== 1) {
    throw new Error(`findmnt -n ${path} failed (${result.code}): ${result.stderr}`)
  }
  return result.code === 0
}

function unescapeMountinfo(s: string): string {
  return s.replace(/\\([0-7]{3})/g, (_, o: string) => String.fromCharCode(parseInt(o, 8)))
}

/** MAJ:MIN and filesystem type of every mount on exactly `path`, bottom first (/proc/self/mountinfo). */
export async function mountsOn(path: string): Promise<Array<{ dev: string; fsType: string }>> {
  const info = await readFile('/proc/self/mountinfo', 'utf8')
  const out: Array<{ dev: string; fsType: string }> = []
  for (const line of info.split('\n')) {
    const fields = line.split(' ')
    if (fields.length < 10 || unescapeMountinfo(fields[4]!) !== path) continue
    const sep = fields.indexOf('-')
    out.push({ dev: fields[2]!, fsType: fields[sep + 1] ?? '' })
  }
  return out
}

/**
 * Teardown for tests that may leave a mount behind even when they fail: aborts every FUSE
 * connection mounted on `path` (fusectl, so nothing waits on a dead server) and unmounts lazily
 * until nothing is left. Never throws.
 */
export async function forceUnmountAll(path: string): Promise<void> {
  for (let i = 0; i < 8; i++) {
    const mounts = await mountsOn(path).catch(() => [])
    if (mounts.length === 0) return
    for (const m of mounts) {
      if (!m.fsType.startsWith('fuse')) continue
      const minor = m.dev.split(':')[1]
      await writeFile(`/sys/fs/fuse/connections/${minor}/abort`, '1').catch(() => undefined)
    }
    await run('umount', ['-l', path]).catch(() => undefined)
  }
}
