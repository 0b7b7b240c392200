// Running fio against a peer and sampling the server process meanwhile (CPU ticks, peak RSS).

import { spawn, spawnSync } from 'node:child_process'
import fs from 'node:fs'
import path from 'node:path'

import { syncImage } from './image.mjs'
import { ENGINES, hasImage } from './options.mjs'
import { nbdUri } from './peers.mjs'

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

export const ceilingTarget = (backend, image) => (backend.kind === 'nbd' ? nbdUri(image) : image)

/** Seconds as fio takes them: whole seconds bare, fractions in milliseconds (fio's time unit suffix). */
const fioSeconds = (s) => (Number.isInteger(s) ? `${s}` : `${Math.round(s * 1000)}ms`)

export function fioArgs({ target, rw, engine, jobs, direct, runtime, ramp, output }) {
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
    `--runtime=${fioSeconds(runtime)}`,
    '--invalidate=0',
    '--allow_file_create=0',
    '--norandommap=1',
    '--randrepeat=0',
    '--output-format=json',
    `--output=${output}`,
  ]
  if (ramp > 0) args.push(`--ramp_time=${fioSeconds(ramp)}`)
  return args
}

export function runFio(args) {
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
export async function measure({ cell, peer, server, image, opts, tmp }) {
  const target = peer.family === 'ceiling' ? ceilingTarget(cell.backend, image) : server.target
  // The ceiling for page-cache mode is buffered I/O on the image (what the servers do there);
  // everything else is O_DIRECT from fio's side. A passed-through open reaches the image with
  // the client's own flags, so the passthrough peer (all of whose opens pass through) does
  // buffered I/O in page-cache cells and O_DIRECT in file-direct cells, like the ceiling.
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
