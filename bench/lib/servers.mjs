// Server processes: starting a peer and waiting for its mount, stopping it, nbdkit for the nbd
// cells, and the cleanup that undoes every mount the bench made, also on errors and signals.

import { spawn, spawnSync } from 'node:child_process'
import fs from 'node:fs'
import path from 'node:path'

import { parseSize, isMounted, run, sleep } from './system.mjs'
import { serverCommand } from './peers.mjs'

const live = new Set() // servers: { child, mnt }
const ourMounts = new Set()

export function cleanupSync() {
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

for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP']) {
  process.on(sig, () => {
    process.stderr.write(`bench: ${sig}, cleaning up\n`)
    cleanupSync()
    process.exit(130)
  })
}

export async function startServer(peer, backend, image, mntDir, opts) {
  const mnt = path.join(mntDir, peer.id)
  if (isMounted(mnt)) run('umount', ['-l', mnt], { allowFail: true })
  fs.rmSync(mnt, { recursive: true, force: true })
  if (peer.family === 'nbdfuse') fs.mkdirSync(mnt)
  else fs.writeFileSync(mnt, '')
  const { cmd, args, ready } = serverCommand(peer, backend, image, mnt, opts)
  const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] })
  // What fio opens: the mountpoint itself, or the file nbdfuse serves inside it.
  const target = peer.family === 'nbdfuse' ? path.join(mnt, 'nbd') : mnt
  const server = { peer, child, mnt, target, command: [cmd, ...args], stderr: '', exited: false }
  live.add(server)
  ourMounts.add(mnt)
  child.stderr.on('data', (d) => {
    server.stderr = (server.stderr + d).slice(-4000)
  })
  let sawReady = false
  let out = ''
  child.stdout.on('data', (d) => {
    out += d
    const readyLine = /^ready\b.*$/m.exec(out)
    if (readyLine) {
      sawReady = true
      // blockfuse's ready line ends with how requests arrive: "io_uring" or "read(2)".
      if (peer.family === 'blockfuse') server.intake = /(io_uring|read\(2\))(, passthrough)?\)$/.exec(readyLine[0])?.[1]
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

export async function stopServer(server) {
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

/**
 * The NBD server of the nbd cells: `nbdkit memory` (sparse RAM, multi-conn) on a Unix socket in
 * the foreground, stopped with the group (and by the exit cleanup).
 */
export async function startNbdkit(workDir, size) {
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

export async function stopNbdkit({ server, socket }) {
  if (!server.exited) server.child.kill('SIGTERM')
  while (!server.exited) await sleep(50)
  live.delete(server)
  fs.rmSync(socket, { force: true })
}
