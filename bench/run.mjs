#!/usr/bin/env node
// blockfuse benchmark: fio against blockfuse, QEMU's FUSE export, a fuser-based server and the
// image file itself, interleaved case by case. See bench/README.md. Needs root, /dev/fuse, fio.
//
//   node bench/run.mjs [--quick] [--only CELLS] [--peers PEERS] [--threads N] [--reps R]
//                      [--runtime S] [--ramp S] [--out DIR] [--no-save] [--keep-going]
//
// This file is the main loop: per backend group, start the group's servers, warm them up, run
// every cell against every peer in rotation, stop them; then report. The parts live in lib/:
// options.mjs (options, matrix), peers.mjs (peers and their command lines), servers.mjs (server
// processes, cleanup), fio.mjs (fio runs, server sampling), image.mjs, machine.mjs, report.mjs.

import fs from 'node:fs'
import os from 'node:os'
import path from 'node:path'

import { measure, ceilingTarget, fioArgs, runFio } from './lib/fio.mjs'
import { ensureImage, ensureQcow2, prepareCache } from './lib/image.mjs'
import { machineInfo, prepareUring } from './lib/machine.mjs'
import { BACKENDS, buildMatrix, hasImage, parseCli } from './lib/options.mjs'
import { peerList, peerRuns, preflight, seedVersion } from './lib/peers.mjs'
import {
  renderCommands,
  renderMachine,
  renderTables,
  renderTargets,
  summarise,
  TARGETS,
  targetVerdicts,
} from './lib/report.mjs'
import { cleanupSync, startNbdkit, startServer, stopNbdkit, stopServer } from './lib/servers.mjs'
import { isMounted, parseSize, ROOT, run } from './lib/system.mjs'

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
  machine.qemuSeed = peers.some((p) => p.family === 'qemu-seed') ? seedVersion(opts.qemuSeed) : 'not run'
  machine.uring = prepareUring(opts)
  machine.intakes = {}
  // backend id -> peer id -> the command line that started the server
  machine.commands = {}

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
        machine.commands[backend.id] ??= {}
        machine.commands[backend.id][p.id] = server.command
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
  const targets = renderTargets(summaryCells, opts.threads)
  const title = `blockfuse bench${opts.quick ? ' (quick)' : ''}${opts.preset ? ` (preset ${opts.preset})` : ''}`
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
    ...(targets ? [targets, ''] : []),
    ...(formats ? [formats, ''] : []),
    '## Per peer',
    '',
    'Server CPU = utime+stime of the server process during the fio run, per I/O (median of runs); peak RSS = VmHWM, reset before each run (max of runs).',
    '',
    detail,
    '',
    '## Server command lines',
    '',
    renderCommands(machine.commands),
    '',
  ].join('\n')
  process.stdout.write(`\n${md}`)

  if (opts.save) {
    const day = machine.date.slice(0, 10)
    const name = `${day}${opts.quick ? '-quick' : ''}${opts.preset ? `-${opts.preset}` : ''}${opts.partial ? '-partial' : ''}`
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
    // Issue 16's verdicts, machine-readable: per cell, per target (TARGETS order), per blockfuse form.
    const verdicts = targetVerdicts(summaryCells, opts.threads)
    const targetsJson = verdicts && { names: TARGETS, cells: verdicts }
    fs.writeFileSync(
      path.join(rawDir, 'summary.json'),
      JSON.stringify({ machine, cells: parsed, targets: targetsJson }, null, 1),
    )
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
