/**
 * NBD servers for the NBD specs (issue 18): real `nbdkit` and `qemu-nbd` processes on a Unix
 * socket or 127.0.0.1, stopped by the test's teardown (also when the test fails), and a tiny
 * scripted server for replies no real server sends.
 */
import { spawn, type ChildProcess } from 'node:child_process'
import { once } from 'node:events'
import { existsSync } from 'node:fs'
import { createServer, connect, type Server, type Socket } from 'node:net'

import type { ExecutionContext } from 'ava'

/** A free TCP port on 127.0.0.1 (the kernel's choice; closed again before use). */
export async function freePort(): Promise<number> {
  const server = createServer()
  server.listen(0, '127.0.0.1')
  await once(server, 'listening')
  const port = (server.address() as { port: number }).port
  server.close()
  await once(server, 'close')
  return port
}

function canConnect(where: { path: string } | { port: number; host: string }): Promise<boolean> {
  return new Promise((resolve) => {
    const s = connect(where as never)
    s.once('connect', () => {
      s.destroy()
      resolve(true)
    })
    s.once('error', () => resolve(false))
  })
}

/** Where a server listens, and the URI blockfuse gets for it. */
export interface Listen {
  kind: 'unix' | 'tcp'
  socket?: string
  port?: number
}

/** A running server process. */
export class NbdServer {
  readonly uri: string
  #child: ChildProcess
  #exited: Promise<void>
  output = ''

  constructor(child: ChildProcess, uri: string) {
    this.#child = child
    this.uri = uri
    this.#exited = new Promise((resolve) => child.once('exit', () => resolve()))
    child.stderr?.setEncoding('utf8').on('data', (d: string) => (this.output += d))
    child.stdout?.setEncoding('utf8').on('data', (d: string) => (this.output += d))
  }

  /** Sends `signal` (e.g. SIGSTOP: a server that stays connected but never answers). */
  signal(signal: NodeJS.Signals): void {
    if (this.running) this.#child.kill(signal)
  }

  get running(): boolean {
    return this.#child.exitCode === null && this.#child.signalCode === null
  }

  /**
   * Stops the server (SIGKILL: like a crash) and waits for it to be gone. nbdkit waits for its
   * clients on SIGTERM; a server still running 2 s after another signal gets SIGKILL.
   */
  async kill(signal: NodeJS.Signals = 'SIGKILL'): Promise<void> {
    if (this.running) this.#child.kill(signal)
    const timer = setTimeout(() => {
      if (this.running) this.#child.kill('SIGKILL')
    }, 2000)
    await this.#exited
    clearTimeout(timer)
  }
}

function uriFor(listen: Listen, exportName: string, tls: boolean): string {
  const s = tls ? 's' : ''
  if (listen.kind === 'unix') return `nbd${s}+unix:///${exportName}?socket=${listen.socket}`
  return `nbd${s}://127.0.0.1:${listen.port}/${exportName}`
}

async function waitListening(server: NbdServer, listen: Listen): Promise<void> {
  const deadline = Date.now() + 10_000
  for (;;) {
    const ok =
      listen.kind === 'unix'
        ? existsSync(listen.socket!) && (await canConnect({ path: listen.socket! }))
        : await canConnect({ port: listen.port!, host: '127.0.0.1' })
    if (ok) return
    if (!server.running) throw new Error(`the NBD server exited before listening:\n${server.output}`)
    if (Date.now() > deadline) throw new Error(`the NBD server did not listen within 10 s:\n${server.output}`)
    await new Promise((r) => setTimeout(r, 50))
  }
}

function start(
  t: ExecutionContext,
  cmd: string,
  args: string[],
  listen: Listen,
  exportName: string,
  tls: boolean,
): Promise<NbdServer> {
  const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] })
  const server = new NbdServer(child, uriFor(listen, exportName, tls))
  t.teardown(() => server.kill('SIGTERM'))
  return waitListening(server, listen).then(() => server)
}

/**
 * Starts `nbdkit` in the foreground with `pluginArgs` (plugin, its parameters, `--filter=...`
 * options and `-r` may be mixed as nbdkit allows). Probing connections by waitListening are
 * harmless to nbdkit.
 */
export function nbdkit(
  t: ExecutionContext,
  listen: Listen,
  pluginArgs: string[],
  opts: { tls?: 'require'; certDir?: string; verifyPeer?: boolean } = {},
): Promise<NbdServer> {
  const where = listen.kind === 'unix' ? ['-U', listen.socket!] : ['-i', '127.0.0.1', '-p', String(listen.port!)]
  const tls = opts.tls
    ? [`--tls=${opts.tls}`, `--tls-certificates=${opts.certDir}`, ...(opts.verifyPeer ? ['--tls-verify-peer'] : [])]
    : []
  return start(t, 'nbdkit', ['-f', '--exit-with-parent', ...where, ...tls, ...pluginArgs], listen, '', !!opts.tls)
}

/** Starts `qemu-nbd` serving `image` (format `format`) under the export name `name`, for any number of clients. */
export function qemuNbd(
  t: ExecutionContext,
  listen: Listen,
  image: string,
  format: string,
  name: string,
  extra: string[] = [],
): Promise<NbdServer> {
  const where = listen.kind === 'unix' ? ['-k', listen.socket!] : ['-b', '127.0.0.1', '-p', String(listen.port!)]
  return start(
    t,
    'qemu-nbd',
    [...where, '-f', format, '-x', name, '-t', '-e', '8', ...extra, image],
    listen,
    name,
    false,
  )
}

/**
 * A scripted NBD server for one purpose: it negotiates like a real one (fixed newstyle,
 * structured replies, NBD_OPT_GO) for an export of `size` bytes, then answers each request with
 * `reply(header)`, whose bytes it sends as they are. Closed by the test's teardown.
 */
export async function scriptedServer(
  t: ExecutionContext,
  socketPath: string,
  size: bigint,
  reply: (req: { cmd: number; cookie: Buffer; offset: bigint; length: number }) => Buffer,
): Promise<Server> {
  const sockets = new Set<Socket>()
  const server = createServer((sock) => {
    sockets.add(sock)
    sock.on('close', () => sockets.delete(sock))
    sock.on('error', () => {})
    let buf = Buffer.alloc(0)
    let phase: 'flags' | 'options' | 'transmission' = 'flags'
    const optReply = (opt: number, type: number, data: Buffer = Buffer.alloc(0)) => {
      const h = Buffer.alloc(20)
      h.writeBigUInt64BE(0x3e889045565a9n, 0)
      h.writeUInt32BE(opt, 8)
      h.writeUInt32BE(type >>> 0, 12)
      h.writeUInt32BE(data.length, 16)
      sock.write(Buffer.concat([h, data]))
    }
    const greeting = Buffer.alloc(18)
    greeting.write('NBDMAGIC', 0, 'latin1')
    greeting.write('IHAVEOPT', 8, 'latin1')
    greeting.writeUInt16BE(3, 16)
    sock.write(greeting)
    sock.on('data', (d: Buffer) => {
      buf = Buffer.concat([buf, d])
      for (;;) {
        if (phase === 'flags') {
          if (buf.length < 4) return
          buf = buf.subarray(4)
          phase = 'options'
        } else if (phase === 'options') {
          if (buf.length < 16) return
          const opt = buf.readUInt32BE(8)
          const len = buf.readUInt32BE(12)
          if (buf.length < 16 + len) return
          buf = buf.subarray(16 + len)
          if (opt === 8)
            optReply(opt, 1) // STRUCTURED_REPLY: ack
          else if (opt === 7) {
            const info = Buffer.alloc(12)
            info.writeUInt16BE(0, 0)
            info.writeBigUInt64BE(size, 2)
            info.writeUInt16BE(1 | 4, 10) // HAS_FLAGS | SEND_FLUSH
            optReply(opt, 3, info)
            optReply(opt, 1)
            phase = 'transmission'
          } else optReply(opt, 0x80000001) // anything else: unsupported
        } else {
          if (buf.length < 28) return
          const cmd = buf.readUInt16BE(6)
          const cookie = Buffer.from(buf.subarray(8, 16))
          const offset = buf.readBigUInt64BE(16)
          const length = buf.readUInt32BE(24)
          const payload = cmd === 1 ? length : 0
          if (buf.length < 28 + payload) return
          buf = buf.subarray(28 + payload)
          if (cmd === 2) {
            sock.end()
            return
          }
          sock.write(reply({ cmd, cookie, offset, length }))
        }
      }
    })
  })
  server.listen(socketPath)
  await once(server, 'listening')
  t.teardown(async () => {
    for (const s of sockets) s.destroy()
    server.close()
  })
  return server
}

/** A structured reply chunk. */
export function chunk(cookie: Buffer, flags: number, type: number, payload: Buffer): Buffer {
  const h = Buffer.alloc(20)
  h.writeUInt32BE(0x668e33ef, 0)
  h.writeUInt16BE(flags, 4)
  h.writeUInt16BE(type, 6)
  cookie.copy(h, 8)
  h.writeUInt32BE(payload.length, 16)
  return Buffer.concat([h, payload])
}
