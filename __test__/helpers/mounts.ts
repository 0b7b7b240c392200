/** Asking the system (not blockfuse) what is mounted. */
import { run } from './run.js'

/** True when findmnt finds a mount on exactly `path`. */
export async function isMounted(path: string): Promise<boolean> {
  const result = await run('findmnt', ['-n', path])
  if (result.code !== 0 && result.code !== 1) {
    throw new Error(`findmnt -n ${path} failed (${result.code}): ${result.stderr}`)
  }
  return result.code === 0
}
