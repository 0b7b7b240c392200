/**
 * Helpers of the export-semantics specs (issue 3, modelled on QEMU's iotest 308): clients run in
 * the C locale so their error texts are stable, exports are always closed by the test's teardown,
 * and small probes (sizes, allocated blocks, SEEK_DATA/SEEK_HOLE) ask the system, not blockfuse.
 */
import { once, type EventEmitter } from 'node:events'

import type { ExecutionContext } from 'ava'

import { FuseExport, type FuseExportOptions } from '../../ts/index.js'
import { imageFixture, type ImageFixture } from './exports.js'
import { run, type RunResult } from './run.js'

/** The environment of every client: the C locale, so that `strerror` texts are the English ones. */
export const C_ENV: NodeJS.ProcessEnv = { ...process.env, LC_ALL: 'C', LANG: 'C', LANGUAGE: 'C' }

/** Runs a client in the C locale to completion; never rejects for a non-zero exit. */
export function client(cmd: string, args: readonly string[]): Promise<RunResult> {
  return run(cmd, args, { env: C_ENV })
}

/** Runs a client in the C locale and throws (with its output) unless it exits 0. */
export async function mustClient(cmd: string, args: readonly string[]): Promise<RunResult> {
  const r = await client(cmd, args)
  if (r.code !== 0) {
    throw new Error(`${cmd} ${args.join(' ')} exited ${r.code ?? r.signal}\nstdout: ${r.stdout}\nstderr: ${r.stderr}`)
  }
  return r
}

/**
 * Creates an export whose closing is registered with `t.teardown` (teardowns run in reverse
 * order, so it runs before the temp dir's leak check). Returns the export.
 */
export async function openExport(t: ExecutionContext, options: FuseExportOptions): Promise<FuseExport> {
  const exp = await FuseExport.create(options)
  t.teardown(async () => {
    await exp.close()
  })
  return exp
}

/** A writable export of a fresh raw image of `size` (format `'raw'`: no probing), closed by teardown. */
export async function writableRawExport(
  t: ExecutionContext,
  size: number,
  options: Pick<FuseExportOptions, 'cache' | 'growable' | 'passthrough'>,
): Promise<{ f: ImageFixture; exp: FuseExport }> {
  const f = await imageFixture(t, size)
  const exp = await openExport(t, {
    source: f.image,
    mountpoint: f.mountpoint,
    writable: true,
    format: 'raw',
    ...options,
  })
  return { f, exp }
}

/** `stat -c <format> path`, trimmed. */
export async function statField(path: string, format: string): Promise<string> {
  return (await mustClient('stat', ['-c', format, path])).stdout.trim()
}

/** Size in bytes as stat(1) reports it. */
export async function sizeOf(path: string): Promise<number> {
  return Number(await statField(path, '%s'))
}

/** Allocated 512-byte blocks as stat(1) reports them (`%b`; `%B` is 512 on Linux). */
export async function blocksOf(path: string): Promise<number> {
  const [blocks, unit] = (await statField(path, '%b %B')).split(' ')
  if (unit !== '512') throw new Error(`stat reports blocks of ${unit} bytes, expected 512`)
  return Number(blocks)
}

/** Counts parsed from dd's statistics (`a+b records in`, `c+d records out`). */
export interface DdRecords {
  fullIn: number
  partialIn: number
  fullOut: number
  partialOut: number
}

/** Parses dd's record counts from its stderr; throws if they are not there. */
export function ddRecords(stderr: string): DdRecords {
  const input = /^(\d+)\+(\d+) records in$/m.exec(stderr)
  const output = /^(\d+)\+(\d+) records out$/m.exec(stderr)
  if (!input || !output) throw new Error(`dd printed no record counts:\n${stderr}`)
  return {
    fullIn: Number(input[1]),
    partialIn: Number(input[2]),
    fullOut: Number(output[1]),
    partialOut: Number(output[2]),
  }
}

/** The result of one lseek(2): the offset, or the errno name (e.g. `ENXIO`). */
export type SeekResult = number | string

/** One probe: `lseek(fd, offset, whence)` with whence `DATA` or `HOLE`. */
export interface SeekProbe {
  offset: number
  whence: 'DATA' | 'HOLE'
  result: SeekResult
}

const SEEK_PROBE = `
import errno, json, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
out = []
for off in map(int, sys.argv[2:]):
    for name, whence in (('DATA', os.SEEK_DATA), ('HOLE', os.SEEK_HOLE)):
        try:
            r = os.lseek(fd, off, whence)
        except OSError as e:
            r = errno.errorcode.get(e.errno, str(e.errno))
        out.append({'offset': off, 'whence': name, 'result': r})
print(json.dumps(out))
`

/**
 * SEEK_DATA and SEEK_HOLE from each of `offsets` on `path`, by a real client (python3's
 * os.lseek; Node has no SEEK_DATA).
 */
export async function seekProbes(path: string, offsets: readonly number[]): Promise<SeekProbe[]> {
  const r = await mustClient('python3', ['-c', SEEK_PROBE, path, ...offsets.map(String)])
  return JSON.parse(r.stdout) as SeekProbe[]
}

/** The kernel's device number of the FUSE connection mounted on `path` (its fusectl directory name). */
export async function fuseConnectionId(path: string): Promise<number> {
  const { stdout } = await mustClient('findmnt', ['-n', '-o', 'MAJ:MIN', path])
  const match = /^\s*(\d+):(\d+)\s*$/.exec(stdout)
  if (!match) throw new Error(`findmnt printed no MAJ:MIN for ${path}: ${JSON.stringify(stdout)}`)
  // The kernel's internal dev_t (MKDEV): major in the top 12 bits of 32, minor in the low 20.
  return Number(match[1]) * 2 ** 20 + Number(match[2])
}

/**
 * Waits for `emitter` to emit `event` and resolves with the event's first argument; rejects with
 * a clear message if that does not happen within `ms`.
 */
export async function waitForEvent<T>(emitter: EventEmitter, event: string, ms: number): Promise<T> {
  try {
    const args = await once(emitter, event, { signal: AbortSignal.timeout(ms) })
    return args[0] as T
  } catch (err) {
    if ((err as Error).name === 'AbortError') throw new Error(`no '${event}' event within ${ms} ms`, { cause: err })
    throw err
  }
}

/** Writes `len` bytes of `byte` at `offset` of `path` with dd (fsync, no truncation). */
export async function fillBytes(path: string, offset: number, len: number, byte: number): Promise<void> {
  await mustClient('sh', [
    '-c',
    `head -c ${len} /dev/zero | tr '\\0' '\\${byte.toString(8)}' | dd of='${path}' bs=64k seek=${offset} oflag=seek_bytes conv=notrunc,fsync status=none`,
  ])
}
