/** Temporary directories and images with known content. */
import { createHash, randomBytes } from 'node:crypto'
import { createReadStream } from 'node:fs'
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

import type { ExecutionContext } from 'ava'

import { parseMountinfo } from '../../ts/options.js'

export const KiB = 1024
export const MiB = 1024 * 1024

/**
 * A fresh directory under os.tmpdir(), removed after the test. If a test left something mounted
 * in it, the removal is skipped and the teardown fails, so leaks are visible.
 */
export async function tempDir(t: ExecutionContext): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), 'blockfuse-test-'))
  t.teardown(async () => {
    const leaked = await mountsUnder(dir)
    if (leaked.length > 0) throw new Error(`test left mounts behind: ${leaked.join(', ')}`)
    await rm(dir, { recursive: true, force: true })
  })
  return dir
}

async function mountsUnder(dir: string): Promise<string[]> {
  const text = await readFile('/proc/self/mountinfo', 'utf8')
  return parseMountinfo(text)
    .map((e) => e.mountPoint)
    .filter((p) => p.startsWith(`${dir}/`))
}

/** Writes a file of `size` random bytes and returns its content. */
export async function makeImage(path: string, size: number): Promise<Buffer> {
  const data = randomBytes(size)
  await writeFile(path, data)
  return data
}

/** Creates an empty regular file to mount on. */
export async function makeMountpoint(path: string): Promise<void> {
  await writeFile(path, '')
}

/** sha256 of a file's content, streamed (images are larger than is comfortable to buffer). */
export async function sha256(path: string): Promise<string> {
  const hash = createHash('sha256')
  for await (const chunk of createReadStream(path, { highWaterMark: MiB })) hash.update(chunk as Buffer)
  return hash.digest('hex')
}
