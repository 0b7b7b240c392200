// Small system helpers shared by the bench's parts: paths, child processes, sizes, mounts.

import { spawnSync } from 'node:child_process'
import fs from 'node:fs'
import path from 'node:path'
import { fileURLToPath } from 'node:url'

/** bench/ and the repository root. */
export const BENCH_DIR = path.dirname(path.dirname(fileURLToPath(import.meta.url)))
export const ROOT = path.dirname(BENCH_DIR)

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms))

export function run(cmd, args, { allowFail = false, ...o } = {}) {
  const r = spawnSync(cmd, args, { encoding: 'utf8', ...o })
  if (!allowFail && (r.error || r.status !== 0)) {
    const why = r.error ? r.error.message : `exit ${r.status}: ${(r.stderr || '').trim()}`
    throw new Error(`${cmd} ${args.join(' ')} failed: ${why}`)
  }
  return r
}

export function which(cmd) {
  const r = spawnSync('sh', ['-c', `command -v ${cmd}`], { encoding: 'utf8' })
  return r.status === 0 ? r.stdout.trim() : null
}

export function firstLine(cmd, args) {
  const r = spawnSync(cmd, args, { encoding: 'utf8' })
  return r.status === 0 ? (r.stdout || r.stderr).split('\n')[0].trim() : 'unknown'
}

export function parseSize(s) {
  const m = /^(\d+)([kKmMgGtT]?)$/.exec(s)
  if (!m) throw new Error(`bad size "${s}"`)
  const mult = { '': 1, k: 2 ** 10, m: 2 ** 20, g: 2 ** 30, t: 2 ** 40 }[m[2].toLowerCase()]
  return Number(m[1]) * mult
}

/** Whether `p` (absolute) is a mountpoint right now. */
export function isMounted(p) {
  const mounts = fs.readFileSync('/proc/self/mounts', 'utf8')
  return mounts.split('\n').some((l) => l.split(' ')[1]?.replaceAll('\\040', ' ') === p)
}
