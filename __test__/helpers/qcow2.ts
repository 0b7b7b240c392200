/**
 * qcow2 fixtures and the independent reference: images are made by qemu-img, data is written by
 * qemu-io, and what an export serves is judged by qemu-img (compare, check, map, convert).
 */
import { join } from 'node:path'

import type { ExecutionContext } from 'ava'

import { makeMountpoint, tempDir } from './files.js'
import { client, mustClient } from './semantics.js'

/** qcow2 compatibility level: `0.10` is version 2, `1.1` is version 3. */
export type Compat = '0.10' | '1.1'

export interface CreateOptions {
  compat?: Compat
  /** Backing file name as stored in the header (relative names are relative to the image). */
  backing?: string
  backingFormat?: 'qcow2' | 'raw'
  clusterSize?: number
}

/** `qemu-img create -f qcow2` with the given options. */
export async function createQcow2(path: string, size: number | undefined, o: CreateOptions = {}): Promise<void> {
  const opts = [`compat=${o.compat ?? '1.1'}`]
  if (o.clusterSize !== undefined) opts.push(`cluster_size=${o.clusterSize}`)
  const args = ['create', '-q', '-f', 'qcow2', '-o', opts.join(',')]
  if (o.backing !== undefined) args.push('-b', o.backing, '-F', o.backingFormat ?? 'qcow2')
  args.push(path)
  if (size !== undefined) args.push(String(size))
  await mustClient('qemu-img', args)
}

/** One `qemu-io` command line (e.g. `write -P 7 0 64k`) run against `image`. */
export async function qemuIo(image: string, format: 'qcow2' | 'raw', ...commands: string[]): Promise<void> {
  const args = ['-f', format]
  for (const c of commands) args.push('-c', c)
  args.push(image)
  const r = await mustClient('qemu-io', args)
  // qemu-io exits 0 even when a command fails; its error lines say so.
  if (/error|failed|cannot/i.test(r.stdout + r.stderr))
    throw new Error(`qemu-io ${args.join(' ')}:\n${r.stdout}${r.stderr}`)
}

/** `qemu-img compare -f raw -F <format> a b`: the code and the verdict line. */
export async function compare(
  rawPath: string,
  image: string,
  format: 'qcow2' | 'raw' = 'qcow2',
): Promise<{ code: number | null; out: string }> {
  // -U: the image may be exported at the same time (blockfuse holds QEMU's image locks on it).
  const r = await client('qemu-img', ['compare', '-U', '-f', 'raw', '-F', format, rawPath, image])
  return { code: r.code, out: (r.stdout + r.stderr).trim() }
}

/** Asserts that `qemu-img compare` finds the raw file and the image identical. */
export async function assertIdentical(
  t: ExecutionContext,
  rawPath: string,
  image: string,
  format: 'qcow2' | 'raw' = 'qcow2',
  what = '',
): Promise<void> {
  const r = await compare(rawPath, image, format)
  t.is(r.code, 0, `qemu-img compare ${what}: ${r.out}`)
  t.is(r.out, 'Images are identical.', what)
}

/** `qemu-img convert -O raw` of `image` into `out`. */
export async function convertToRaw(image: string, out: string): Promise<void> {
  await mustClient('qemu-img', ['convert', '-U', '-O', 'raw', image, out])
}

export interface CheckResult {
  'check-errors': number
  corruptions?: number
  leaks?: number
  'compressed-clusters'?: number
  'allocated-clusters'?: number
}

/** `qemu-img check --output=json` (exit 2 = corruptions, 3 = leaks; both still print JSON). */
export async function check(image: string): Promise<CheckResult & { code: number | null }> {
  const r = await client('qemu-img', ['check', '-U', '--output=json', image])
  const start = r.stdout.indexOf('{')
  if (start < 0) throw new Error(`qemu-img check printed no JSON (exit ${r.code}):\n${r.stdout}${r.stderr}`)
  return { ...(JSON.parse(r.stdout.slice(start)) as CheckResult), code: r.code }
}

/** Asserts that `qemu-img check` finds neither errors nor corruptions nor leaks. */
export async function assertClean(t: ExecutionContext, image: string): Promise<void> {
  const c = await check(image)
  t.is(c.code, 0, `qemu-img check: ${JSON.stringify(c)}`)
  t.is(c['check-errors'], 0)
  t.is(c.corruptions ?? 0, 0)
  t.is(c.leaks ?? 0, 0)
}

export interface MapEntry {
  start: number
  length: number
  depth: number
  present: boolean
  zero: boolean
  data: boolean
  compressed?: boolean
}

/** `qemu-img map --output=json`. */
export async function map(image: string): Promise<MapEntry[]> {
  const r = await mustClient('qemu-img', ['map', '-U', '--output=json', image])
  return JSON.parse(r.stdout) as MapEntry[]
}

/** The ranges `[start, end)` that `qemu-img map` reports as data, adjacent ones merged. */
export async function dataRanges(image: string): Promise<Array<[number, number]>> {
  const out: Array<[number, number]> = []
  for (const e of await map(image)) {
    if (!e.data) continue
    const last = out.at(-1)
    if (last && last[1] === e.start) last[1] = e.start + e.length
    else out.push([e.start, e.start + e.length])
  }
  return out
}

/** The virtual size `qemu-img info` reports. */
export async function virtualSize(image: string): Promise<number> {
  const r = await mustClient('qemu-img', ['info', '-U', '--output=json', image])
  return (JSON.parse(r.stdout) as { 'virtual-size': number })['virtual-size']
}

export interface Qcow2Dir {
  dir: string
  /** An empty regular file to mount on. */
  mountpoint: string
  /** `join(dir, name)`. */
  path(name: string): string
}

/** A temp dir (removed after the test) with an empty `mnt` to mount on. */
export async function qcow2Dir(t: ExecutionContext): Promise<Qcow2Dir> {
  const dir = await tempDir(t)
  const mountpoint = join(dir, 'mnt')
  await makeMountpoint(mountpoint)
  return { dir, mountpoint, path: (name) => join(dir, name) }
}

/**
 * A three-level chain base ← mid ← top (all qcow2 of `compat`), each level with its own pattern
 * written by qemu-io, overlapping the level below in places and leaving unallocated ranges that
 * read through to the base or as zeros. Returns the paths.
 */
export async function threeLevelChain(
  d: Qcow2Dir,
  size: number,
  compat: Compat = '1.1',
): Promise<{ base: string; mid: string; top: string }> {
  const base = d.path('base.qcow2')
  const mid = d.path('mid.qcow2')
  const top = d.path('top.qcow2')
  await createQcow2(base, size, { compat })
  await qemuIo(base, 'qcow2', 'write -P 0x11 0 1M', 'write -P 0x12 3M 1M', 'write -P 0x13 6M 512k')
  // Relative backing names, as users write them.
  await createQcow2(mid, undefined, { compat, backing: 'base.qcow2' })
  await qemuIo(mid, 'qcow2', 'write -P 0x21 512k 1M', 'write -P 0x22 3200k 4k', 'write -P 0x23 5M 100k')
  await createQcow2(top, undefined, { compat, backing: 'mid.qcow2' })
  await qemuIo(top, 'qcow2', 'write -P 0x31 768k 4k', 'write -P 0x32 3M 512', 'write -P 0x33 7M 1M')
  return { base, mid, top }
}
