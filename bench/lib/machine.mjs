// The machine a run measures: its description for the results, and FUSE-over-io_uring (a kernel
// parameter, off by default; turned on for the run, then restored).

import fs from 'node:fs'
import os from 'node:os'
import path from 'node:path'

import { firstLine, ROOT } from './system.mjs'

const ENABLE_URING = '/sys/module/fuse/parameters/enable_uring'
let uringRestore

/** Turns the kernel's FUSE-over-io_uring on unless --io-uring off; returns what the run used. */
export function prepareUring(opts) {
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

export function machineInfo(opts, workDir) {
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
      preset: opts.preset,
      qemuSeed: opts.qemuSeed,
      only: opts.only,
      peers: opts.peers,
      ioUring: opts.ioUring,
    },
  }
}
