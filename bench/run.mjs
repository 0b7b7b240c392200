#!/usr/bin/env node
// blockfuse benchmark: fio against blockfuse, QEMU's FUSE export, a fuser-based server and the
// image file itself, interleaved case by case. See bench/README.md. Needs root, /dev/fuse, fio.
//
//   node bench/run.mjs [--quick] [--only CELLS] [--peers PEERS] [--threads N] [--reps R]
//                      [--runtime S] [--ramp S] [--out DIR] [--no-save] [--keep-going]

import { spawn, spawnSync } from 'node:child_process'
import fs from 'node:fs'
import os from 'node:os'
import path from 'node:path'
import { fileURLToPath } from 'node:url'
import { parseArgs } from 'node:util'

import { renderMachine, renderTables, summarise } from './lib/report.mjs'

const BENCH_DIR = path.dirname(fileURLToPath(import.meta.url))
const ROOT = path.dirname(BENCH_DIR)

const USAGE = `Usage: node bench/run.mjs [options]

  --quick            small subset (null and file-direct; randread, randwrite; aio; 1 job; 1 rep)
  --only CELLS       comma-separated cell patterns backend[:rw[:engine[:jN]]], '*' for any part;
                     backend is null, file-direct, file-cached, or file (both file modes), or
                     qcow2-direct, qcow2-cached, qcow2 (both), or nbd (nbdkit memory); qcow2
                     and nbd cells run only when a pattern names them (not in the default run,
                     --quick or a '*' backend)
                     e.g. --only null:randread:aio  or  --only file-direct:*:sync:j2
                     or  --only qcow2-direct:randread:aio,file-direct:randread:aio
  --peers PEERS      comma-separated peers: blockfuse, qemu, fuser, nbdfuse, ceiling, or exact ids like
                     blockfuse-1t, fuser-2t (default: all)
  --threads N        threads of the multi-threaded blockfuse and fuser peers (default: 2)
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

// ---------------------------------------------------------------------------------------------
// Options and the matrix

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

function parseCli(argv) {
  const { values } = parseArgs({
    args: argv,
    options: {
      quick: { type: 'boolean' },
      only: { type: 'string' },
      peers: { type: 'string' },
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
  return {
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
      : [],
    threads: Math.floor(num('threads', values.threads, 2, 2)),
    ioUring: oneOf('io-uring', values['io-uring'] ?? 'auto', ['auto', 'on', 'off']),
    reps: Math.floor(num('reps', values.reps, quick ? 1 : 3, 1)),
    runtime: num('runtime', values.runtime, quick ? 3 : 2, 1),
    ramp: num('ramp', values.ramp, 0, 0),
    imageSize: values['image-size'] ?? '1G',
    workDir: path.resolve(values['work-dir'] ?? path.join(BENCH_DIR, 'work')),
    out: path.resolve(values.out ?? path.join(BENCH_DIR, 'results')),
    save: !values['no-save'],
    keepGoing: !!values['keep-going'],
  }
}

const BACKENDS = [
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
const hasImage = (b) => b.kind === 'file' || b.kind === 'qcow2'
const RWS = ['read', 'write', 'randread', 'randwrite']
const ENGINES = {
  aio: { ioengine: 'libaio', iodepth: 16 },
  sync: { ioengine: 'pvsync2', iodepth: 1 },
}
const JOBS = [1, 2]

function buildMatrix(opts) {
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

/**
 * Whether `peer` runs in the cells of `backend`. The ceiling is fio on the raw image: qcow2 cells
 * reuse the ceiling of the raw backend with the same cache mode (the report marks it) instead of
 * measuring it again. bench-fuser serves raw images and null only.
 */
function peerRuns(peer, backend) {
  if (peer.family === 'ceiling') return backend.kind === 'file' || backend.kind === 'nbd'
  // Passthrough exists for raw images on files only.
  if (peer.passthrough) return backend.kind === 'file'
  if (peer.family === 'fuser') return backend.kind === 'null' || backend.kind === 'file'
  if (peer.family === 'nbdfuse') return backend.kind === 'nbd'
  return true
}

function peerList(opts) {
  const N = opts.threads
  const all = [
    { id: 'blockfuse-1t', family: 'blockfuse', threads: 1, label: 'blockfuse 1t' },
    { id: `blockfuse-${N}t`, family: 'blockfuse', threads: N, label: `blockfuse ${N}t` },
    // FUSE passthrough ('on': the export is writable): read-only opens go straight to the image.
    { id: 'blockfuse-pt', family: 'blockfuse', threads: 1, passthrough: true, label: 'blockfuse pt' },
    { id: 'qemu', family: 'qemu', threads: 1, label: 'QEMU' },
    { id: 'fuser-1t', family: 'fuser', threads: 1, label: 'fuser 1t' },
    { id: `fuser-${N}t`, family: 'fuser', threads: N, label: `fuser ${N}t` },
    // libnbd's FUSE server (nbd cells only), with its default connections (4 under multi-conn).
    { id: 'nbdfuse', family: 'nbdfuse', threads: 0, label: 'nbdfuse' },
    { id: 'ceiling', family: 'ceiling', threads: 0, label: 'ceiling (no FUSE)' },
  ]
  if (!opts.peers.length) return all
  for (const p of opts.peers) {
    if (!all.some((x) => x.id === p || x.family === p)) throw new Error(`unknown peer "${p}"`)
  }
  return all.filter((x) => opts.peers.includes(x.id) || opts.peers.includes(x.family))
}

// ---------------------------------------------------------------------------------------------
// Small system helpers

const sleep = (ms) => new Promise((r) => setTimeout(r, ms))

function run(cmd, args, { allowFail = false, ...o } = {}) {
  const r = spawnSync(cmd, args, { encoding: 'utf8', ...o })
  if (!allowFail && (r.error || r.status !== 0)) {
    const why = r.error ? r.error.message : `exit ${r.status}: ${(r.stderr || '').trim()}`
    throw new Error(`${cmd} ${args.join(' ')} failed: ${why}`)
  }
  return r
}

function which(cmd) {
  const r = spawnSync('sh', ['-c', `command -v ${cmd}`], { encoding: 'utf8' })
  return r.status === 0 ? r.stdout.trim() : null
}

function firstLine(cmd, args) {
  const r = spawnSync(cmd, args, { encoding: 'utf8' })
  return r.status === 0 ? (r.stdout || r.stderr).split('\n')[0].trim() : 'unknown'
}

function parseSize(s) {
  const m = /^(\d+)([kKmMgGtT]?)$/.exec(s)
  if (!m) throw new Error(`bad size "${s}"`)
  const mult = { '': 1, k: 2 ** 10, m: 2 ** 20, g: 2 ** 30, t: 2 ** 40 }[m[2].toLowerCase()]
  return Number(m[1]) * mult
}

/** Whether `p` (absolute) is a mountpoint right now. */
function isMounted(p) {
  const mounts = fs.readFileSync('/proc/self/mounts', 'utf8')
  return mounts.split('\n').some((l) => l.split(' ')[1]?.replaceAll('\\040', ' ') === p)
}

/** Clock ticks of user+system CPU the whole process (all threads) has used. */
function cpuTicks(pid) {
  const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8')
  const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ')
  return Number(f[11]) + Number(f[12]) // fields 14 (utime) and 15 (stime)
}

/** Resets the process's peak RSS (VmHWM) to its current RSS. */
function resetPeakRss(pid) {
  try {
    fs.writeFileSync(`/proc/${pid}/clear_refs`, '5')
  } catch {
    // Not allowed (not root): the peak then covers the server's whole life so far.
  }
}

function peakRssKiB(pid) {
  const m = /VmHWM:\s+(\d+) kB/.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'))
  return m ? Number(m[1]) : NaN
}

const CLK_TCK = Number(spawnSync('getconf', ['CLK_TCK'], { encoding: 'utf8' }).stdout) || 100

// ---------------------------------------------------------------------------------------------
// Cleanup: every mount we make is undone, also on errors and signals

const live = new Set() // servers: { child, mnt }
const ourMounts = new Set()

function cleanupSync() {
  for (const s of live) {
    try {
      s.child.kill('SIGINT')
    } catch {}
  }
  const deadline = Date.now() + 3000
  for (const s of live) {
    while (s.child.exitCode === null && s.child.signalCode === null && Date.now() < deadline) {
      spawnSync('sleep', ['0.05'])
      if (!isMounted(s.mnt)) break
    }
  }
  for (const m of ourMounts) {
    if (isMounted(m)) {
      spawnSync('fusermount3', ['-u', '-z', m])
      if (isMounted(m)) spawnSync('umount', ['-l', m])
    }
  }
  for (const s of live) {
    try {
      s.child.kill('SIGKILL')
    } catch {}
  }
  live.clear()
}

process.on('exit', cleanupSync)

// ---------------------------------------------------------------------------------------------
// FUSE-over-io_uring: a kernel parameter, off by default; turned on for the run, then restored

const ENABLE_URING = '/sys/module/fuse/parameters/enable_uring'
let uringRestore

/** Turns the kernel's FUSE-over-io_uring on unless --io-uring off; returns what the run used. */
function prepareUring(opts) {
  let before
  try {
    before = fs.readFileSync(ENABLE_URING, 'utf8').trim()
  } catch {
    if (opts.ioUring === 'on') throw new Error(`--io-uring on, but this kernel has no ${ENABLE_URING}`)
    return 'not available in this kernel'
  }
  if (opts.ioUring === 'off' || before === 'Y') return `${ENABLE_URING} = ${before}`
  fs.writeFileSync(ENABLE_URING, 'Y')
  uringRestore = before
  process.on('exit', () => {
    if (uringRestore !== undefined) fs.writeFileSync(ENABLE_URING, uringRestore)
  })
  return `${ENABLE_URING} = Y for the run (was ${before}; restored after)`
}
for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP']) {
  process.on(sig, () => {
    process.stderr.write(`bench: ${sig}, cleaning up\n`)
    cleanupSync()
    process.exit(130)
  })
}

// ---------------------------------------------------------------------------------------------
// Preflight

function preflight(opts, peers, cells) {
  if (process.getuid?.() !== 0) throw new Error('the bench needs root (mounting, /proc/PID/clear_refs)')
  if (!which('fio')) throw new Error('fio not found: apt-get install fio')
  fs.accessSync('/dev/fuse', fs.constants.R_OK | fs.constants.W_OK)
  const families = new Set(peers.map((p) => p.family))
  const available = new Map()

  if (families.has('qemu')) {
    if (!which('qemu-storage-daemon')) {
      process.stderr.write('bench: qemu-storage-daemon missing, installing qemu-utils\n')
      run('apt-get', ['install', '-y', '--no-install-recommends', 'qemu-utils'], { stdio: 'inherit' })
    }
    available.set('qemu', which('qemu-storage-daemon') ? null : 'qemu-storage-daemon not installed')
  }
  if (families.has('nbdfuse')) {
    available.set('nbdfuse', which('nbdfuse') ? null : 'nbdfuse not installed (apt-get install libnbd-bin)')
  }
  if (cells.some((c) => c.backend.kind === 'nbd')) {
    if (!which('nbdkit')) throw new Error('nbd cells need nbdkit: apt-get install nbdkit')
    const engines = spawnSync('fio', ['--enghelp'], { encoding: 'utf8' }).stdout ?? ''
    if (families.has('ceiling') && !/^\s*nbd$/m.test(engines)) {
      throw new Error("nbd cells: this fio has no nbd engine for the ceiling (use --peers without 'ceiling')")
    }
  }
  if (families.has('fuser')) {
    process.stderr.write('bench: building bench-fuser (cargo build --release -p blockfuse-bench-fuser)\n')
    const r = spawnSync('cargo', ['build', '--release', '-p', 'blockfuse-bench-fuser'], {
      cwd: ROOT,
      stdio: ['ignore', 'ignore', 'pipe'],
      encoding: 'utf8',
    })
    const bin = path.join(ROOT, 'target', 'release', 'bench-fuser')
    let why = null
    if (r.status !== 0) {
      why = `cargo build failed: ${r.stderr.trim().split('\n').slice(-3).join(' ')}`
      // The workspace may be mid-edit by others; an earlier build of the peer still measures.
      if (fs.existsSync(bin)) {
        process.stderr.write(`bench: ${why}\nbench: using the existing ${path.relative(ROOT, bin)}\n`)
        why = null
      }
    }
    available.set('fuser', why)
  }
  if (families.has('blockfuse')) {
    const cli = path.join(ROOT, 'dist', 'cli.js')
    let why = null
    if (!fs.existsSync(cli)) why = 'dist/cli.js missing (npm run build)'
    else {
      const r = spawnSync(process.execPath, [cli, '--version'], { encoding: 'utf8' })
      if (r.status !== 0) why = `node dist/cli.js --version failed: ${(r.stderr || '').trim().split('\n')[0]}`
    }
    available.set('blockfuse', why)
  }
  available.set('ceiling', null)
  for (const [fam, why] of available) {
    if (why === null) continue
    if (!opts.keepGoing) throw new Error(`peer ${fam} unavailable: ${why} (use --keep-going or --peers to skip it)`)
    process.stderr.write(`bench: skipping ${fam}: ${why}\n`)
  }
  const usable = peers.filter((p) => available.get(p.family) === null)
  if (!usable.length) throw new Error('no peer left to run')
  if (!cells.length) throw new Error('no cell matches --only')
  return usable
}

function machineInfo(opts, workDir) {
  const cpus = os.cpus()
  const src = firstLine('findmnt', ['-n', '-o', 'SOURCE,FSTYPE', '-T', workDir]).replace(/\s+/, ' ')
  const dev = src.split(' ')[0]
  let disk = src
  const base = dev.startsWith('/dev/') ? path.basename(dev) : null
  if (base) {
    const parent = firstLine('lsblk', ['-no', 'PKNAME', dev]) || base
    const name = parent && parent !== 'unknown' ? parent : base
    const model = firstLine('lsblk', ['-dno', 'MODEL,SIZE', `/dev/${name}`]).replace(/\s+/g, ' ')
    let rota = ''
    try {
      rota =
        fs.readFileSync(`/sys/block/${name}/queue/rotational`, 'utf8').trim() === '1'
          ? ', rotational'
          : ', non-rotational'
    } catch {}
    let virt = ''
    try {
      virt = fs.realpathSync(`/sys/block/${name}`).includes('virtio') ? ', virtio' : ''
    } catch {}
    disk = `${src} on ${name} (${model || '?'}${virt}${rota})`
  }
  let fuser = '?'
  const lock = path.join(ROOT, 'Cargo.lock')
  if (fs.existsSync(lock)) {
    const m = /name = "fuser"\nversion = "([^"]+)"/.exec(fs.readFileSync(lock, 'utf8'))
    if (m) fuser = m[1]
  }
  const commit = firstLine('git', ['-C', ROOT, 'describe', '--always', '--dirty'])
  return {
    date: new Date().toISOString(),
    cores: cpus.length,
    cpuModel: cpus[0]?.model?.trim() ?? '?',
    memGiB: Math.round(os.totalmem() / 2 ** 30),
    kernel: `${os.type()} ${os.release()}`,
    disk,
    fio: firstLine('fio', ['--version']),
    qemu: firstLine('qemu-storage-daemon', ['--version']),
    node: process.version,
    fuser,
    commit,
    loadStart: os
      .loadavg()
      .map((x) => x.toFixed(2))
      .join(' '),
    settings: {
      threads: opts.threads,
      reps: opts.reps,
      runtime: opts.runtime,
      ramp: opts.ramp,
      imageSize: opts.imageSize,
      quick: opts.quick,
      only: opts.only,
      peers: opts.peers,
      ioUring: opts.ioUring,
    },
  }
}

// ---------------------------------------------------------------------------------------------
// The image

function ensureImage(image, size) {
  const st = fs.existsSync(image) ? fs.statSync(image) : null
  // Fully allocated, non-zero data: reads must hit the disk, not holes.
  if (st && st.size === size && st.blocks * 512 >= size) return
  process.stderr.write(`bench: creating ${size}-byte image ${image}\n`)
  fs.rmSync(image, { force: true })
  const mib = Math.ceil(size / 2 ** 20)
  run('dd', ['if=/dev/urandom', `of=${image}`, 'bs=1M', `count=${mib}`, 'conv=fsync', 'status=none'])
  fs.truncateSync(image, size)
}

/**
 * The qcow2 bench image: `qemu-img convert -O qcow2 -o cluster_size=64k` of the raw image, so every
 * cluster is allocated (reads hit data, writes overwrite allocated clusters: no allocation in the
 * measured path). Reused while `qemu-img check` passes and its virtual size is right.
 */
function ensureQcow2(qcow2, rawImage, size) {
  if (fs.existsSync(qcow2)) {
    const info = run('qemu-img', ['info', '--output=json', '-U', qcow2], { allowFail: true })
    let ok = false
    try {
      const j = JSON.parse(info.stdout)
      ok = j.format === 'qcow2' && j['virtual-size'] === size && j['cluster-size'] === 65536
    } catch {}
    if (ok) ok = run('qemu-img', ['check', '-q', qcow2], { allowFail: true }).status === 0
    if (ok) return
    process.stderr.write(`bench: ${qcow2} is stale or fails qemu-img check, recreating it\n`)
  }
  process.stderr.write(`bench: creating ${qcow2} from ${rawImage}\n`)
  fs.rmSync(qcow2, { force: true })
  run('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', '-o', 'cluster_size=64k', rawImage, qcow2])
}

/** Writes back dirty pages of the image so no run pays for an earlier run's writes. */
function syncImage(image) {
  const fd = fs.openSync(image, 'r')
  try {
    fs.fdatasyncSync(fd)
  } finally {
    fs.closeSync(fd)
  }
}

function prepareCache(image, backend) {
  syncImage(image)
  if (backend.cache === 'writeback') {
    // Page-cache mode measures the page cache: start with the whole image in it.
    run('dd', [`if=${image}`, 'of=/dev/null', 'bs=1M', 'status=none'])
  } else {
    // O_DIRECT mode measures the disk: drop the image's cached pages.
    run('dd', [`if=${image}`, 'iflag=nocache', 'count=0', 'status=none'])
  }
}

// ---------------------------------------------------------------------------------------------
// Servers

function serverCommand(peer, backend, image, mnt, opts) {
  const size = opts.imageSize
  switch (peer.family) {
    case 'blockfuse': {
      const args = [path.join(ROOT, 'dist', 'cli.js'), 'export', '--writable', '--threads', String(peer.threads)]
      args.push('--io-uring', opts.ioUring, '--passthrough', peer.passthrough ? 'on' : 'off')
      // The group's servers share the image side by side; a second writable blockfuse would
      // otherwise be refused the image lock (IMAGE_LOCKED).
      args.push('--locking', 'off')
      // An explicit format: no probing of the image's first sector.
      if (backend.kind === 'file') args.push('--format', 'raw', '--cache', backend.cache)
      if (backend.kind === 'qcow2') args.push('--format', 'qcow2', '--cache', backend.cache)
      if (backend.kind === 'nbd') args.push('--format', 'raw')
      args.push(backend.kind === 'null' ? `null:${size}` : backend.kind === 'nbd' ? nbdUri(image) : image, mnt)
      return { cmd: process.execPath, args, ready: 'line' }
    }
    case 'fuser': {
      const args = ['--threads', String(peer.threads)]
      if (backend.kind === 'file') args.push('--cache', backend.cache)
      args.push(backend.kind === 'null' ? `null:${size}` : image, mnt)
      return { cmd: path.join(ROOT, 'target', 'release', 'bench-fuser'), args, ready: 'line' }
    }
    case 'qemu': {
      const direct = backend.cache === 'none' ? 'on' : 'off'
      const blockdevs =
        backend.kind === 'null'
          ? [`null-co,node-name=n,size=${parseSize(size)},read-zeroes=on`]
          : backend.kind === 'nbd'
            ? [`nbd,node-name=n,server.type=unix,server.path=${image}`]
            : backend.kind === 'qcow2'
              ? // locking=off: blockfuse has the same image open while QEMU serves it (all servers of a
                // group stay mounted). Safe here as every cluster is allocated, so no peer changes
                // the qcow2 metadata; only data clusters are overwritten.
                [`file,node-name=f,filename=${image},cache.direct=${direct},locking=off`, 'qcow2,node-name=n,file=f']
              : [`file,node-name=n,filename=${image},cache.direct=${direct}`]
      const exp = `fuse,id=e,node-name=n,mountpoint=${mnt},writable=on,allow-other=off`
      const args = [...blockdevs.flatMap((b) => ['--blockdev', b]), '--export', exp]
      return { cmd: 'qemu-storage-daemon', args, ready: 'mount' }
    }
    case 'nbdfuse':
      // nbdfuse serves a file inside a directory mountpoint: MNT/nbd.
      return { cmd: 'nbdfuse', args: [path.join(mnt, 'nbd'), '--unix', image], ready: 'mount' }
    default:
      throw new Error(`no server for ${peer.id}`)
  }
}

async function startServer(peer, backend, image, mntDir, opts) {
  const mnt = path.join(mntDir, peer.id)
  if (isMounted(mnt)) run('umount', ['-l', mnt], { allowFail: true })
  fs.rmSync(mnt, { recursive: true, force: true })
  if (peer.family === 'nbdfuse') fs.mkdirSync(mnt)
  else fs.writeFileSync(mnt, '')
  const { cmd, args, ready } = serverCommand(peer, backend, image, mnt, opts)
  const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] })
  // What fio opens: the mountpoint itself, or the file nbdfuse serves inside it.
  const target = peer.family === 'nbdfuse' ? path.join(mnt, 'nbd') : mnt
  const server = { peer, child, mnt, target, stderr: '', exited: false }
  live.add(server)
  ourMounts.add(mnt)
  child.stderr.on('data', (d) => {
    server.stderr = (server.stderr + d).slice(-4000)
  })
  let sawReady = false
  let out = ''
  child.stdout.on('data', (d) => {
    out += d
    const ready = /^ready\b.*$/m.exec(out)
    if (ready) {
      sawReady = true
      // blockfuse's ready line ends with how requests arrive: "io_uring" or "read(2)".
      if (peer.family === 'blockfuse') server.intake = /(io_uring|read\(2\))(, passthrough)?\)$/.exec(ready[0])?.[1]
    }
  })
  child.on('exit', () => {
    server.exited = true
  })
  const deadline = Date.now() + 30000
  while (Date.now() < deadline) {
    if (server.exited) {
      live.delete(server)
      throw new Error(`${peer.id} exited before it was ready: ${server.stderr.trim()}`)
    }
    if ((ready === 'line' ? sawReady : true) && isMounted(mnt)) return server
    await sleep(50)
  }
  await stopServer(server)
  throw new Error(`${peer.id} not ready after 30 s: ${server.stderr.trim()}`)
}

async function stopServer(server) {
  const { child, mnt } = server
  if (!server.exited) child.kill('SIGINT')
  const deadline = Date.now() + 15000
  while (!server.exited && Date.now() < deadline) await sleep(50)
  if (!server.exited) {
    process.stderr.write(`bench: ${server.peer.id} ignored SIGINT for 15 s, killing it\n`)
    child.kill('SIGKILL')
    while (!server.exited) await sleep(50)
  }
  if (isMounted(mnt)) {
    run('fusermount3', ['-u', '-z', mnt], { allowFail: true })
    if (isMounted(mnt)) run('umount', ['-l', mnt], { allowFail: true })
  }
  live.delete(server)
  ourMounts.delete(mnt)
  try {
    fs.rmSync(mnt, { recursive: true, force: true })
  } catch {}
}

/** The NBD URI of the bench's nbdkit on Unix socket `socket`. */
const nbdUri = (socket) => `nbd+unix:///?socket=${socket}`

/**
 * The NBD server of the nbd cells: `nbdkit memory` (sparse RAM, multi-conn) on a Unix socket in
 * the foreground, stopped with the group (and by the exit cleanup).
 */
async function startNbdkit(workDir, size) {
  const socket = path.join(workDir, 'nbdkit.sock')
  fs.rmSync(socket, { force: true })
  const args = ['--foreground', '--exit-with-parent', '-U', socket, 'memory', String(parseSize(size))]
  const child = spawn('nbdkit', args, { stdio: ['ignore', 'ignore', 'pipe'] })
  const server = { peer: { id: 'nbdkit' }, child, mnt: socket, stderr: '', exited: false }
  live.add(server)
  child.stderr.on('data', (d) => {
    server.stderr = (server.stderr + d).slice(-4000)
  })
  child.on('exit', () => {
    server.exited = true
  })
  const deadline = Date.now() + 10000
  while (!fs.existsSync(socket)) {
    if (server.exited || Date.now() > deadline) {
      live.delete(server)
      throw new Error(`nbdkit did not start: ${server.stderr.trim()}`)
    }
    await sleep(50)
  }
  return { server, socket }
}

async function stopNbdkit({ server, socket }) {
  if (!server.exited) server.child.kill('SIGTERM')
  while (!server.exited) await sleep(50)
  live.delete(server)
  fs.rmSync(socket, { force: true })
}

// ---------------------------------------------------------------------------------------------
// fio

/** What the ceiling's fio opens: the image, or for nbd cells the server itself. */
const ceilingTarget = (backend, image) => (backend.kind === 'nbd' ? nbdUri(image) : image)

function fioArgs({ target, rw, engine, jobs, direct, runtime, ramp, output }) {
  const e = ENGINES[engine]
  // An NBD URI: fio's own nbd engine (libnbd, one connection per job), the same queue depth.
  const where = target.startsWith('nbd')
    ? ['--ioengine=nbd', `--uri=${target}`]
    : [`--filename=${target}`, `--direct=${direct}`, `--ioengine=${e.ioengine}`]
  const args = [
    '--name=bench',
    ...where,
    `--rw=${rw}`,
    '--bs=4k',
    `--iodepth=${e.iodepth}`,
    `--numjobs=${jobs}`,
    '--group_reporting=1',
    '--time_based=1',
    `--runtime=${runtime}`,
    '--invalidate=0',
    '--allow_file_create=0',
    '--norandommap=1',
    '--randrepeat=0',
    '--output-format=json',
    `--output=${output}`,
  ]
  if (ramp > 0) args.push(`--ramp_time=${ramp}`)
  return args
}

function runFio(args) {
  return new Promise((resolve) => {
    const child = spawn('fio', args, { stdio: ['ignore', 'pipe', 'pipe'] })
    let err = ''
    child.stderr.on('data', (d) => {
      err = (err + d).slice(-2000)
    })
    child.stdout.resume()
    child.on('exit', (code) => resolve({ code, err }))
  })
}

/** One measured fio run against `peer`. Returns the metrics and the raw fio JSON. */
async function measure({ cell, peer, server, image, opts, tmp }) {
  const target = peer.family === 'ceiling' ? ceilingTarget(cell.backend, image) : server.target
  // The ceiling for page-cache mode is buffered I/O on the image (what the servers do there);
  // everything else is O_DIRECT from fio's side. A passed-through open reaches the image with
  // the client's own flags, so the passthrough peer reads buffered in page-cache mode too (its
  // writes are served by blockfuse, where O_DIRECT from fio changes nothing).
  const buffered = peer.family === 'ceiling' || peer.passthrough
  const direct = buffered && cell.backend.cache === 'writeback' ? 0 : 1
  if (hasImage(cell.backend)) syncImage(image)
  const output = path.join(tmp, 'fio.json')
  fs.rmSync(output, { force: true })
  const args = fioArgs({
    target,
    rw: cell.rw,
    engine: cell.engine,
    jobs: cell.jobs,
    direct,
    runtime: opts.runtime,
    ramp: opts.ramp,
    output,
  })
  const pid = server?.child.pid
  if (server?.exited) return { error: `${peer.id} is not running` }
  if (pid) resetPeakRss(pid)
  const cpu0 = pid ? cpuTicks(pid) : 0
  const { code, err } = await runFio(args)
  if (server?.exited) return { error: `${peer.id} died during the run: ${server.stderr.trim().split('\n').pop()}` }
  const cpu1 = pid ? cpuTicks(pid) : 0
  const rssKiB = pid ? peakRssKiB(pid) : NaN
  let raw
  try {
    raw = JSON.parse(fs.readFileSync(output, 'utf8').replace(/^[^{]*/, ''))
  } catch {
    return { error: `fio exit ${code}: ${err.trim().split('\n').pop() ?? ''}` }
  }
  const job = raw.jobs?.[0]
  if (!job || job.error) return { error: `fio job error ${job?.error}`, raw }
  const iops = (job.read?.iops ?? 0) + (job.write?.iops ?? 0)
  const totalIos = (job.read?.total_ios ?? 0) + (job.write?.total_ios ?? 0)
  // With a ramp, fio counts only post-ramp I/Os; the CPU delta covers the whole run.
  const ios = opts.ramp > 0 ? iops * (opts.runtime + opts.ramp) : totalIos
  const cpuUs = ((cpu1 - cpu0) * 1e6) / CLK_TCK
  return {
    iops,
    totalIos,
    cpuUsPerIo: pid && ios > 0 ? cpuUs / ios : NaN,
    rssKiB,
    raw,
  }
}

// ---------------------------------------------------------------------------------------------
// Main loop

async function main() {
  const opts = parseCli(process.argv.slice(2))
  const cells = buildMatrix(opts)
  // Peers that run in none of the selected cells (e.g. fuser for qcow2-only) are not prepared.
  const peers = preflight(
    opts,
    peerList(opts).filter((p) => !cells.length || cells.some((c) => peerRuns(p, c.backend))),
    cells,
  )
  const { workDir } = opts
  const mntDir = path.join(workDir, 'mnt')
  const tmp = path.join(workDir, 'tmp')
  fs.mkdirSync(mntDir, { recursive: true })
  fs.mkdirSync(tmp, { recursive: true })
  // Leftovers of an interrupted run.
  for (const f of fs.readdirSync(mntDir)) {
    const m = path.join(mntDir, f)
    if (isMounted(m)) run('umount', ['-l', m], { allowFail: true })
  }
  const rawImage = path.join(workDir, 'image.raw')
  const qcow2Image = path.join(workDir, 'image.qcow2')
  const size = parseSize(opts.imageSize)
  const machine = machineInfo(opts, workDir)
  machine.uring = prepareUring(opts)
  machine.intakes = {}

  const groups = BACKENDS.map((b) => ({ backend: b, cells: cells.filter((c) => c.backend.id === b.id) })).filter(
    (g) => g.cells.length,
  )
  const nRuns = groups.reduce(
    (n, g) => n + g.cells.length * opts.reps * peers.filter((p) => peerRuns(p, g.backend)).length,
    0,
  )
  const eta = Math.round((nRuns * (opts.runtime + opts.ramp + 0.35)) / 60)
  process.stderr.write(
    `bench: ${cells.length} cells × ${peers.length} peers × ${opts.reps} reps = ${nRuns} fio runs, about ${eta} min\n`,
  )

  const results = new Map() // cell id -> peer id -> [run]
  const raws = new Map() // cell id -> [{ peer, rep, fio }]
  let done = 0
  const t0 = Date.now()
  for (const g of groups) {
    const { backend } = g
    const groupPeers = peers.filter((p) => peerRuns(p, backend))
    let image = backend.kind === 'qcow2' ? qcow2Image : rawImage
    if (hasImage(backend)) {
      ensureImage(rawImage, size)
      if (backend.kind === 'qcow2') ensureQcow2(qcow2Image, rawImage, size)
      prepareCache(image, backend)
    }
    // nbd cells: the peers' "image" is the nbdkit socket.
    const nbd = backend.kind === 'nbd' ? await startNbdkit(workDir, opts.imageSize) : null
    if (nbd) image = nbd.socket
    // All servers of a group stay mounted side by side (idle ones sit in read(2) on /dev/fuse),
    // so each cell can rotate through the peers without remounting.
    const servers = new Map()
    try {
      for (const p of groupPeers) {
        if (p.family === 'ceiling') continue
        const server = await startServer(p, backend, image, mntDir, opts)
        servers.set(p.id, server)
        if (server.intake) machine.intakes[p.id] = server.intake
      }
      // Warm-up: first requests allocate buffers, spawn threads, fault pages in.
      for (const p of groupPeers) {
        const target = p.family === 'ceiling' ? ceilingTarget(backend, image) : servers.get(p.id).target
        const direct = p.family === 'ceiling' && backend.cache === 'writeback' ? 0 : 1
        const output = path.join(tmp, 'warmup.json')
        await runFio(fioArgs({ target, rw: 'randrw', engine: 'aio', jobs: 1, direct, runtime: 1, ramp: 0, output }))
      }
      for (const cell of g.cells) {
        const byPeer = new Map(groupPeers.map((p) => [p.id, []]))
        const raw = []
        for (let rep = 0; rep < opts.reps; rep++) {
          // Rotate the order each repetition so no peer always runs first or last.
          const order = groupPeers.map((_, i) => groupPeers[(i + rep) % groupPeers.length])
          for (const peer of order) {
            const prev = servers.get(peer.id)
            if (prev?.exited) {
              // A server that died (e.g. its binary was rebuilt under it) is restarted before its next run.
              process.stderr.write(`bench: ${peer.id} exited (${prev.stderr.trim().split('\n').pop()}), restarting\n`)
              await stopServer(prev)
              try {
                servers.set(peer.id, await startServer(peer, backend, image, mntDir, opts))
              } catch (err) {
                process.stderr.write(`bench: ${err.message}\n`)
              }
            }
            const r = await measure({ cell, peer, server: servers.get(peer.id), image, opts, tmp })
            byPeer.get(peer.id).push(r)
            if (r.raw) raw.push({ peer: peer.id, rep: rep + 1, fio: r.raw })
            done++
            const status = r.error ? `error: ${r.error}` : `${Math.round(r.iops)} IOPS`
            const elapsed = Math.round((Date.now() - t0) / 1000)
            process.stderr.write(`[${done}/${nRuns} ${elapsed}s] ${cell.id} ${peer.id} rep ${rep + 1}: ${status}\n`)
          }
        }
        results.set(cell.id, byPeer)
        raws.set(cell.id, raw)
      }
    } finally {
      for (const s of servers.values()) await stopServer(s)
      if (nbd) await stopNbdkit(nbd)
    }
  }
  machine.loadEnd = os
    .loadavg()
    .map((x) => x.toFixed(2))
    .join(' ')
  machine.durationMin = ((Date.now() - t0) / 60000).toFixed(1)

  const summaryCells = cells.map((c) => ({
    id: c.id,
    peers: Object.fromEntries([...(results.get(c.id) ?? new Map())].map(([pid, runs]) => [pid, summarise(runs)])),
  }))
  const rawOf = Object.fromEntries(BACKENDS.filter((b) => b.raw).map((b) => [b.id, b.raw]))
  const { summary, detail, formats } = renderTables(summaryCells, peerList({ ...opts, peers: [] }), opts.threads, rawOf)
  const title = opts.quick ? 'blockfuse bench (quick)' : 'blockfuse bench'
  const md = [
    `# ${title}: ${machine.date.slice(0, 10)}`,
    '',
    renderMachine(machine),
    `- settings: bs 4k, fio direct=1 on FUSE files; ${opts.reps} rep(s) × ${opts.runtime} s` +
      `${opts.ramp ? ` (+${opts.ramp} s ramp)` : ''}; N = ${opts.threads} threads; aio = libaio iodepth 16, sync = pvsync2 iodepth 1; ` +
      `took ${machine.durationMin} min`,
    '',
    'IOPS median (min–max) per cell; ratios use medians.',
    '',
    summary,
    '',
    ...(formats ? [formats, ''] : []),
    '## Per peer',
    '',
    'Server CPU = utime+stime of the server process during the fio run, per I/O (median of runs); peak RSS = VmHWM, reset before each run (max of runs).',
    '',
    detail,
    '',
  ].join('\n')
  process.stdout.write(`\n${md}`)

  if (opts.save) {
    const day = machine.date.slice(0, 10)
    const partial = opts.only.length || opts.peers.length
    const name = `${day}${opts.quick ? '-quick' : ''}${partial ? '-partial' : ''}`
    const rawDir = path.join(opts.out, name)
    fs.mkdirSync(rawDir, { recursive: true })
    fs.writeFileSync(path.join(opts.out, `${name}.md`), md)
    for (const [cellId, list] of raws) {
      fs.writeFileSync(path.join(rawDir, `${cellId.replaceAll(':', '_')}.json`), JSON.stringify(list))
    }
    const parsed = summaryCells.map((c) => ({
      cell: c.id,
      peers: c.peers,
      runs: Object.fromEntries(
        [...(results.get(c.id) ?? new Map())].map(([pid, runs]) => [pid, runs.map(({ raw: _raw, ...rest }) => rest)]),
      ),
    }))
    fs.writeFileSync(path.join(rawDir, 'summary.json'), JSON.stringify({ machine, cells: parsed }, null, 1))
    process.stderr.write(
      `bench: wrote ${path.relative(ROOT, path.join(opts.out, `${name}.md`))} and ${path.relative(ROOT, rawDir)}/\n`,
    )
  }
}

main().catch((err) => {
  process.stderr.write(`bench: ${err.message}\n`)
  cleanupSync()
  process.exit(1)
})
