// The bench's peers: which exist, where each runs, whether it is available here, and the command
// line that starts it.

import { spawnSync } from 'node:child_process'
import fs from 'node:fs'
import path from 'node:path'

import { parseSize, ROOT, run, which } from './system.mjs'

/**
 * Whether `peer` runs in the cells of `backend`. The ceiling is fio on the raw image: qcow2 cells
 * reuse the ceiling of the raw backend with the same cache mode (the report marks it) instead of
 * measuring it again. bench-fuser serves raw images and null only.
 */
export function peerRuns(peer, backend) {
  if (peer.family === 'ceiling') return backend.kind === 'file' || backend.kind === 'nbd'
  // Passthrough exists for raw images on files only.
  if (peer.passthrough) return backend.kind === 'file'
  if (peer.family === 'fuser') return backend.kind === 'null' || backend.kind === 'file'
  if (peer.family === 'nbdfuse') return backend.kind === 'nbd'
  return true
}

export function peerList(opts) {
  const N = opts.threads
  const all = [
    // The seed's own QEMU (upstream with the whole FUSE series): the main loop with one queue, and
    // N iothreads with one cloned /dev/fuse fd each (its multi-queue mode). First: the anchor.
    { id: 'qemu-seed-1t', family: 'qemu-seed', threads: 1, label: 'seed QEMU 1t' },
    { id: `qemu-seed-${N}t`, family: 'qemu-seed', threads: N, label: `seed QEMU ${N}t` },
    { id: 'blockfuse-1t', family: 'blockfuse', threads: 1, label: 'blockfuse 1t' },
    { id: `blockfuse-${N}t`, family: 'blockfuse', threads: N, label: `blockfuse ${N}t` },
    // FUSE passthrough ('on', growable, page cache): every open goes straight to the image.
    { id: 'blockfuse-pt', family: 'blockfuse', threads: 1, passthrough: true, label: 'blockfuse pt' },
    // Debian's QEMU (qemu-utils): its FUSE export predates the seed series (libfuse, one thread).
    { id: 'qemu', family: 'qemu', threads: 1, label: 'Debian QEMU' },
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

/** Where `cargo build --release` puts bench-fuser: CARGO_TARGET_DIR (relative to the root) or target/. */
function fuserBinary() {
  const targetDir = path.resolve(ROOT, process.env.CARGO_TARGET_DIR || 'target')
  return path.join(targetDir, 'release', 'bench-fuser')
}

export function preflight(opts, peers, cells) {
  if (process.getuid?.() !== 0) throw new Error('the bench needs root (mounting, /proc/PID/clear_refs)')
  if (!which('fio')) throw new Error('fio not found: apt-get install fio')
  fs.accessSync('/dev/fuse', fs.constants.R_OK | fs.constants.W_OK)
  const families = new Set(peers.map((p) => p.family))
  const available = new Map()
  const skipped = new Set()

  if (families.has('qemu')) {
    if (!which('qemu-storage-daemon')) {
      process.stderr.write('bench: qemu-storage-daemon missing, installing qemu-utils\n')
      run('apt-get', ['install', '-y', '--no-install-recommends', 'qemu-utils'], { stdio: 'inherit' })
    }
    available.set('qemu', which('qemu-storage-daemon') ? null : 'qemu-storage-daemon not installed')
  }
  if (families.has('qemu-seed')) {
    if (opts.qemuSeed) available.set('qemu-seed', seedProblem(opts.qemuSeed))
    else {
      // Not an error: the seed's build is not on every machine.
      process.stderr.write(
        `bench: skipping qemu-seed-1t and qemu-seed-${opts.threads}t: no --qemu-seed PATH or ${SEED_ENV} (the seed's qemu-storage-daemon)\n`,
      )
      skipped.add('qemu-seed')
    }
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
    const bin = fuserBinary()
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
  const usable = peers.filter((p) => !skipped.has(p.family) && available.get(p.family) === null)
  if (!usable.length) throw new Error('no peer left to run')
  if (!cells.length) throw new Error('no cell matches --only')
  return usable
}

/** The environment variable naming the seed's qemu-storage-daemon when --qemu-seed is not given. */
export const SEED_ENV = 'BLOCKFUSE_QEMU_SEED'

/** Debian packages of the seed build's runtime libraries (its README). */
const SEED_LIBS_APT = 'apt-get install -y libfuse3-3 libglib2.0-0 liburing2 libaio1 zlib1g'

/**
 * Why the seed's qemu-storage-daemon at `bin` cannot run here, or null. Missing runtime libraries
 * are named with the apt-get command that installs them (as fio and nbdkit are).
 */
function seedProblem(bin) {
  try {
    fs.accessSync(bin, fs.constants.X_OK)
  } catch {
    return `${bin} is not an executable file`
  }
  const ldd = spawnSync('ldd', [bin], { encoding: 'utf8' })
  const missing = [...(ldd.stdout ?? '').matchAll(/^\s*(\S+) => not found$/gm)].map((m) => m[1])
  if (missing.length) return `${bin} misses ${missing.join(', ')}: ${SEED_LIBS_APT}`
  const r = spawnSync(bin, ['--version'], { encoding: 'utf8' })
  const version = /qemu-storage-daemon version (\S+)/.exec(r.stdout ?? '')
  if (r.status !== 0 || !version) {
    const why = (r.error?.message ?? r.stderr ?? '').trim().split('\n')[0]
    return `${bin} --version failed (${why}); its runtime libraries: ${SEED_LIBS_APT}`
  }
  return null
}

/** The version line of the seed's qemu-storage-daemon, for the machine description. */
export function seedVersion(bin) {
  if (!bin) return 'not run'
  const r = spawnSync(bin, ['--version'], { encoding: 'utf8' })
  const version = /qemu-storage-daemon version (\S+)/.exec(r.stdout ?? '')
  return `${bin} (${version ? version[1] : 'unknown version'})`
}

/**
 * QEMU's block nodes for a backend: node `n` is the one exported. `aioNative` makes O_DIRECT
 * file nodes use Linux AIO (aio=native) instead of QEMU's thread pool.
 */
function qemuBlockdevs(backend, image, size, { aioNative }) {
  const direct = backend.cache === 'none' ? 'on' : 'off'
  const aio = aioNative && backend.cache === 'none' ? ',aio=native' : ''
  if (backend.kind === 'null') return [`null-co,node-name=n,size=${parseSize(size)},read-zeroes=on`]
  if (backend.kind === 'nbd') return [`nbd,node-name=n,server.type=unix,server.path=${image}`]
  if (backend.kind === 'qcow2') {
    // locking=off: blockfuse has the same image open while QEMU serves it (all servers of a
    // group stay mounted). Safe here as every cluster is allocated, so no peer changes the
    // qcow2 metadata; only data clusters are overwritten.
    return [`file,node-name=f,filename=${image},cache.direct=${direct}${aio},locking=off`, 'qcow2,node-name=n,file=f']
  }
  return [`file,node-name=n,filename=${image},cache.direct=${direct}${aio}`]
}

export const nbdUri = (socket) => `nbd+unix:///?socket=${socket}`

export function serverCommand(peer, backend, image, mnt, opts) {
  const size = opts.imageSize
  switch (peer.family) {
    case 'blockfuse': {
      const args = [path.join(ROOT, 'dist', 'cli.js'), 'export', '--writable', '--threads', String(peer.threads)]
      args.push('--io-uring', opts.ioUring, '--passthrough', peer.passthrough ? 'on' : 'off')
      // The group's servers share the image side by side; a second writable blockfuse would
      // otherwise be refused the image lock (IMAGE_LOCKED).
      args.push('--locking', 'off')
      // An explicit format: no probing of the image's first sector.
      if (backend.kind === 'file' && peer.passthrough) {
        // Growable, page cache: the one setting where writable opens pass through too (docs/
        // DESIGN.md, "Passthrough"), so fio's writes reach the image with fio's own flags:
        // O_DIRECT in file-direct cells, as for the ceiling. fio never writes past the end.
        args.push('--format', 'raw', '--cache', 'writeback', '--growable')
      } else if (backend.kind === 'file') args.push('--format', 'raw', '--cache', backend.cache)
      if (backend.kind === 'qcow2') args.push('--format', 'qcow2', '--cache', backend.cache)
      if (backend.kind === 'nbd') args.push('--format', 'raw')
      args.push(backend.kind === 'null' ? `null:${size}` : backend.kind === 'nbd' ? nbdUri(image) : image, mnt)
      return { cmd: process.execPath, args, ready: 'line' }
    }
    case 'fuser': {
      // --no-locking: the group's servers share the image (as blockfuse's --locking off).
      const args = ['--threads', String(peer.threads), '--no-locking']
      if (backend.kind === 'file') args.push('--cache', backend.cache)
      args.push(backend.kind === 'null' ? `null:${size}` : image, mnt)
      return { cmd: fuserBinary(), args, ready: 'line' }
    }
    case 'qemu': {
      const blockdevs = qemuBlockdevs(backend, image, size, { aioNative: false })
      const exp = `fuse,id=e,node-name=n,mountpoint=${mnt},writable=on,allow-other=off`
      const args = [...blockdevs.flatMap((b) => ['--blockdev', b]), '--export', exp]
      return { cmd: 'qemu-storage-daemon', args, ready: 'mount' }
    }
    case 'qemu-seed': {
      // Nt: N iothreads named in the export's "iothread" list, each with its own cloned
      // /dev/fuse fd; 1t: no iothread, the main loop serves the one queue.
      const iothreads = peer.threads > 1 ? Array.from({ length: peer.threads }, (_, i) => `iot${i}`) : []
      const blockdevs = qemuBlockdevs(backend, image, size, { aioNative: true })
      const exp = { type: 'fuse', id: 'e', 'node-name': 'n', mountpoint: mnt, writable: true, 'allow-other': 'off' }
      if (iothreads.length) exp.iothread = iothreads
      const args = [
        ...iothreads.flatMap((id) => ['--object', `iothread,id=${id}`]),
        ...blockdevs.flatMap((b) => ['--blockdev', b]),
        '--export',
        JSON.stringify(exp),
      ]
      return { cmd: opts.qemuSeed, args, ready: 'mount' }
    }
    case 'nbdfuse':
      // nbdfuse serves a file inside a directory mountpoint: MNT/nbd.
      return { cmd: 'nbdfuse', args: [path.join(mnt, 'nbd'), '--unix', image], ready: 'mount' }
    default:
      throw new Error(`no server for ${peer.id}`)
  }
}
