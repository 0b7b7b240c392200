/**
 * Damaging images on purpose, byte by byte (python3, as a careless user or a crash would), and a
 * small tmpfs for running out of space. Every mount is removed by the test's teardown.
 */
import { mkdir } from 'node:fs/promises'
import { join } from 'node:path'

import type { ExecutionContext } from 'ava'

import { mustClient } from './semantics.js'

const PATCH = `
import sys
path, offset, data = sys.argv[1], int(sys.argv[2]), bytes.fromhex(sys.argv[3])
with open(path, 'r+b') as f:
    f.seek(offset)
    f.write(data)
`

const PEEK = `
import sys
path, offset, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
with open(path, 'rb') as f:
    f.seek(offset)
    sys.stdout.write(f.read(n).hex())
`

/** Writes `data` at `offset` of `path` in place. */
export async function patch(path: string, offset: number | bigint, data: Buffer): Promise<void> {
  await mustClient('python3', ['-c', PATCH, path, String(offset), data.toString('hex')])
}

/** Reads `n` bytes at `offset` of `path`. */
export async function peek(path: string, offset: number | bigint, n: number): Promise<Buffer> {
  const r = await mustClient('python3', ['-c', PEEK, path, String(offset), String(n)])
  return Buffer.from(r.stdout, 'hex')
}

/** A big-endian u64 field. */
export function be64(value: bigint): Buffer {
  const b = Buffer.alloc(8)
  b.writeBigUInt64BE(value)
  return b
}

/** A big-endian u32 field. */
export function be32(value: number): Buffer {
  const b = Buffer.alloc(4)
  b.writeUInt32BE(value)
  return b
}

/** Reads a big-endian u64 of the file. */
export async function readBe64(path: string, offset: number | bigint): Promise<bigint> {
  return (await peek(path, offset, 8)).readBigUInt64BE()
}

/** Mounts a tmpfs of `size` (e.g. `8m`) in `dir`/name; unmounted by the test's teardown. */
export async function smallTmpfs(t: ExecutionContext, dir: string, size: string, name = 'tmpfs'): Promise<string> {
  const mnt = join(dir, name)
  await mkdir(mnt)
  await mustClient('mount', ['-t', 'tmpfs', '-o', `size=${size}`, 'tmpfs', mnt])
  t.teardown(async () => {
    await mustClient('umount', [mnt])
  })
  return mnt
}
