// The bench's options and its cell matrix (backend × rw × engine × jobs). Pure: no I/O.

import path from 'node:path'
import { parseArgs } from 'node:util'

import { BENCH_DIR } from './system.mjs'

export const USAGE = `Usage: node bench/run.mjs [options]

  --quick            small subset (null and file-direct; randread, randwrite; aio; 1 job; 1 rep)
  --preset seed      issue 16's run in about 20 min: every default cell against blockfuse 1t / Nt,
                     the seed's QEMU 1t / Nt and the ceiling, 3 reps × 1.5 s (needs the seed:
                     --qemu-seed or BLOCKFUSE_QEMU_SEED); --peers, --reps, --runtime override it
  --only CELLS       comma-separated cell patterns backend[:rw[:engine[:jN]]], '*' for any part;
                     backend is null, file-direct, file-cached, or file (both file modes), or
                     qcow2-direct, qcow2-cached, qcow2 (both), or nbd (nbdkit memory); qcow2
                     and nbd cells run only when a pattern names them (not in the default run,
                     --quick or a '*' backend)
                     e.g. --only null:randread:aio  or  --only file-direct:*:sync:j2
                     or  --only qcow2-direct:randread:aio,file-direct:randread:aio
  --peers PEERS      comma-separated peers: qemu-seed, blockfuse, qemu, fuser, nbdfuse, ceiling, or
                     exact ids like blockfuse-1t, qemu-seed-2t, fuser-2t (default: all)
  --qemu-seed PATH   the seed's qemu-storage-daemon (upstream QEMU with the whole FUSE series), run
                     as qemu-seed-1t (main loop) and qemu-seed-Nt (N iothreads); default: the
                     environment variable BLOCKFUSE_QEMU_SEED; without either both are skipped
  --threads N        threads of the multi-threaded blockfuse, seed QEMU and fuser peers (default: 2)
  --io-uring MODE    blockfuse's --io-uring for both blockfuse peers: auto (default: io_uring
                     with several threads, read(2) with one), on, off. Unless off, the bench
                     turns the kernel's FUSE-over-io_uring on (fuse.enable_uring=Y) for the
                     run and restores it afterwards
  --reps R           repetitions per cell and peer (default: 3; --quick: 1)
  --runtime S        fio runtime per run in seconds (default: 2; --quick: 3)
  --ramp S           fio ramp_time in seconds (default: 0; servers are warmed up once per group)
  --image-size SIZE  size of the raw image and the null disk (default: 1G)
  --work-dir DIR     image, mountpoints and scratch files (default: bench/work)
  --out DIR          results directory (default: bench/results)
  --no-save          print the table only, write no result files
  --keep-going       skip peers that are not available (e.g. blockfuse not built) instead of failing
  -h, --help         show this help
`

function num(name, v, dflt, min) {
  if (v === undefined) return dflt
  const n = Number(v)
  if (!Number.isFinite(n) || n < min) throw new Error(`--${name} must be a number >= ${min}, got "${v}"`)
  return n
}

function oneOf(name, v, allowed) {
  if (!allowed.includes(v)) throw new Error(`--${name} must be one of ${allowed.join(', ')}, got "${v}"`)
  return v
}

/**
 * Named runs. `seed` answers issue 16: the whole default matrix (48 cells) with the peers its
 * targets name, sized for about 20 min on 2 cores (224 cell-peer pairs × 3 reps × 1.5 s).
 */
const PRESETS = {
  seed: {
    peers: (n) => ['blockfuse-1t', `blockfuse-${n}t`, 'qemu-seed', 'ceiling'],
    reps: 3,
    runtime: 1.5,
    needsSeed: true,
  },
}

/** The seed's binary as an absolute path, or null when neither the option nor the variable is set. */
function seedPath(p) {
  return p ? path.resolve(p) : null
}

export function parseCli(argv) {
  const { values } = parseArgs({
    args: argv,
    options: {
      quick: { type: 'boolean' },
      preset: { type: 'string' },
      only: { type: 'string' },
      peers: { type: 'string' },
      'qemu-seed': { type: 'string' },
      threads: { type: 'string' },
      'io-uring': { type: 'string' },
      reps: { type: 'string' },
      runtime: { type: 'string' },
      ramp: { type: 'string' },
      'image-size': { type: 'string' },
      'work-dir': { type: 'string' },
      out: { type: 'string' },
      'no-save': { type: 'boolean' },
      'keep-going': { type: 'boolean' },
      help: { type: 'boolean', short: 'h' },
    },
    strict: true,
  })
  if (values.help) {
    process.stdout.write(USAGE)
    process.exit(0)
  }
  const quick = !!values.quick
  const preset = values.preset === undefined ? {} : PRESETS[oneOf('preset', values.preset, Object.keys(PRESETS))]
  const threads = Math.floor(num('threads', values.threads, 2, 2))
  const qemuSeed = seedPath(values['qemu-seed'] ?? process.env.BLOCKFUSE_QEMU_SEED)
  if (preset.needsSeed && !qemuSeed) {
    throw new Error(`--preset ${values.preset} needs the seed's QEMU: --qemu-seed PATH or BLOCKFUSE_QEMU_SEED`)
  }
  return {
    preset: values.preset ?? null,
    quick,
    only: values.only
      ? values.only
          .split(',')
          .map((s) => s.trim())
          .filter(Boolean)
      : [],
    peers: values.peers
      ? values.peers
          .split(',')
          .map((s) => s.trim())
          .filter(Boolean)
      : (preset.peers?.(threads) ?? []),
    // Cells or peers chosen by hand: the results file says "-partial".
    partial: !!(values.only || values.peers),
    qemuSeed,
    threads,
    ioUring: oneOf('io-uring', values['io-uring'] ?? 'auto', ['auto', 'on', 'off']),
    reps: Math.floor(num('reps', values.reps, preset.reps ?? (quick ? 1 : 3), 1)),
    runtime: num('runtime', values.runtime, preset.runtime ?? (quick ? 3 : 2), 1),
    ramp: num('ramp', values.ramp, 0, 0),
    imageSize: values['image-size'] ?? '1G',
    workDir: path.resolve(values['work-dir'] ?? path.join(BENCH_DIR, 'work')),
    out: path.resolve(values.out ?? path.join(BENCH_DIR, 'results')),
    save: !values['no-save'],
    keepGoing: !!values['keep-going'],
  }
}

export const BACKENDS = [
  // The null disk: no storage behind the FUSE path; no ceiling.
  { id: 'null', kind: 'null' },
  // O_DIRECT on the image: QEMU cache.direct=on, blockfuse --cache none.
  { id: 'file-direct', kind: 'file', cache: 'none' },
  // Through the host page cache: QEMU cache.direct=off (its default), blockfuse --cache writeback.
  { id: 'file-cached', kind: 'file', cache: 'writeback' },
  // The raw image converted to qcow2 (64 KiB clusters, every cluster allocated), same two cache
  // modes. Opt-in (`optIn`): only when an --only pattern names the backend, so the default full
  // run stays at its 48 cells. `raw` names the raw backend whose ceiling they share.
  { id: 'qcow2-direct', kind: 'qcow2', cache: 'none', optIn: true, raw: 'file-direct' },
  { id: 'qcow2-cached', kind: 'qcow2', cache: 'writeback', optIn: true, raw: 'file-cached' },
  // A disk on an NBD server: `nbdkit memory` on a Unix socket, started once for the group. Opt-in
  // like qcow2. The ceiling is fio's own nbd engine on the same server (no FUSE).
  { id: 'nbd', kind: 'nbd', optIn: true },
]
/** Backends with an image file. */
export const hasImage = (b) => b.kind === 'file' || b.kind === 'qcow2'
const RWS = ['read', 'write', 'randread', 'randwrite']
export const ENGINES = {
  aio: { ioengine: 'libaio', iodepth: 16 },
  sync: { ioengine: 'pvsync2', iodepth: 1 },
}
const JOBS = [1, 2]

export function buildMatrix(opts) {
  let cells = []
  for (const b of BACKENDS) {
    for (const rw of RWS) {
      for (const engine of Object.keys(ENGINES)) {
        for (const jobs of JOBS) cells.push({ id: `${b.id}:${rw}:${engine}:j${jobs}`, backend: b, rw, engine, jobs })
      }
    }
  }
  if (opts.quick) {
    cells = cells.filter(
      (c) =>
        (c.backend.id === 'null' || c.backend.id === 'file-direct') &&
        (c.rw === 'randread' || c.rw === 'randwrite') &&
        c.engine === 'aio' &&
        c.jobs === 1,
    )
  }
  if (opts.only.length) cells = cells.filter((c) => opts.only.some((p) => cellMatches(c, p)))
  else cells = cells.filter((c) => !c.backend.optIn)
  return cells
}

const partOk = (want, have) => want === '*' || want === have

function cellMatches(cell, pattern) {
  const [b = '*', rw = '*', engine = '*', jobs = '*'] = pattern.split(':')
  const ok = partOk
  // Opt-in backends must be named: a '*' backend part keeps selecting only the default ones.
  if (cell.backend.optIn && b === '*') return false
  return (
    (ok(b, cell.backend.id) || cell.backend.id.startsWith(`${b}-`)) &&
    ok(rw, cell.rw) &&
    ok(engine, cell.engine) &&
    ok(jobs === '*' ? jobs : jobs.replace(/^j?/, 'j'), `j${cell.jobs}`)
  )
}
