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

export function preflight(opts, peers, cells) {
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
      if (backend.kind === 'file') args.push('--format', 'raw', '--cache', backend.cache)
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
