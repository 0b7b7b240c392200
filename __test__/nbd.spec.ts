/**
 * Issue 18, the NBD client backend: exports of real NBD servers (nbdkit's memory, file and null
 * plugins, its error filter; qemu-nbd serving a qcow2 image) on Unix sockets and on 127.0.0.1,
 * driven by dd, fio verify and qemu-img compare; SEEK_DATA/SEEK_HOLE from base:allocation;
 * FALLOCATE as WRITE_ZEROES; the errors `create` gives for bad URIs, unknown exports, unreachable
 * and read-only servers; and a scripted server whose hostile replies must fail the request (EIO),
 * never return wrong data as good, and leave the export up.
 */
import { readFile, writeFile } from 'node:fs/promises'
import { createServer, type Socket } from 'node:net'
import { join } from 'node:path'

import test from 'ava'

import { FuseExport } from '../ts/index.js'
import { assertE2eEnvironment } from './helpers/env.js'
import { KiB, MiB, makeImage, makeMountpoint, tempDir } from './helpers/files.js'
import { fioVerifyArgs, parseFioReport } from './helpers/fio.js'
import { chunk, freePort, nbdkit, qemuNbd, scriptedServer, type Listen } from './helpers/nbd.js'
import { client, C_ENV, mustClient, openExport, seekProbes, sizeOf } from './helpers/semantics.js'
import { run } from './helpers/run.js'

test.before(() => {
  assertE2eEnvironment(['nbdkit', 'qemu-nbd', 'qemu-img', 'fio', 'dd', 'cmp', 'fallocate', 'python3', 'findmnt', 'ss'])
})

async function fixture(t: Parameters<typeof tempDir>[0]) {
  const dir = await tempDir(t)
  const mountpoint = join(dir, 'mnt')
  await makeMountpoint(mountpoint)
  return { dir, mountpoint, path: (name: string) => join(dir, name) }
}

async function listenOn(kind: 'unix' | 'tcp', dir: string): Promise<Listen> {
  return kind === 'unix' ? { kind, socket: join(dir, 'nbd.sock') } : { kind, port: await freePort() }
}

for (const kind of ['unix', 'tcp'] as const) {
  test(`nbdkit memory over ${kind === 'unix' ? 'a Unix socket' : '127.0.0.1'}: dd writes read back byte for byte, the size is the server's`, async (t) => {
    const d = await fixture(t)
    const server = await nbdkit(t, await listenOn(kind, d.dir), ['memory', '24M'])
    const exp = await openExport(t, { source: server.uri, mountpoint: d.mountpoint, writable: true })
    t.is(exp.format, 'raw')
    t.is(exp.size, 24 * MiB)
    t.is(await sizeOf(d.mountpoint), 24 * MiB)
    const data = await makeImage(d.path('data'), 8 * MiB + 3 * KiB)
    // O_DIRECT 1 MiB writes at an unaligned offset, then a buffered read of everything.
    await mustClient('dd', [
      `if=${d.path('data')}`,
      `of=${d.mountpoint}`,
      'bs=1M',
      'seek=5000',
      'oflag=seek_bytes',
      'conv=notrunc,fsync',
      'status=none',
    ])
    const back = await readFile(d.mountpoint)
    t.true(back.subarray(5000, 5000 + data.length).equals(data), 'the data read back is what was written')
    t.true(back.subarray(0, 5000).equals(Buffer.alloc(5000)), 'untouched bytes read as zeros')
  })
}

test('nbdkit file over 127.0.0.1: a writable export changes the file on the server, fsync included', async (t) => {
  const d = await fixture(t)
  const image = d.path('disk.img')
  const original = await makeImage(image, 16 * MiB)
  const server = await nbdkit(t, await listenOn('tcp', d.dir), ['file', image])
  const exp = await openExport(t, { source: server.uri, mountpoint: d.mountpoint, writable: true })
  const patch = await makeImage(d.path('patch'), 3 * MiB)
  await mustClient('dd', [
    `if=${d.path('patch')}`,
    `of=${d.mountpoint}`,
    'bs=64k',
    'seek=2M',
    'oflag=seek_bytes,direct',
    'conv=notrunc,fsync',
    'status=none',
  ])
  await exp.close()
  const expected = Buffer.from(original)
  patch.copy(expected, 2 * MiB)
  t.true((await readFile(image)).equals(expected), 'the server file holds the writes')
})

test('qemu-nbd serving a qcow2 image: qemu-img compare finds the export identical to the image', async (t) => {
  const d = await fixture(t)
  const image = d.path('img.qcow2')
  await mustClient('qemu-img', ['create', '-q', '-f', 'qcow2', image, String(32 * MiB + 512)])
  await mustClient('qemu-io', [
    '-f',
    'qcow2',
    '-c',
    'write -P 0x5a 1M 3M',
    '-c',
    `write -P 0x17 ${32 * MiB} 512`,
    image,
  ])
  const server = await qemuNbd(t, await listenOn('unix', d.dir), image, 'qcow2', 'disk', ['-r'])
  await openExport(t, { source: server.uri, mountpoint: d.mountpoint })
  t.is(await sizeOf(d.mountpoint), 32 * MiB + 512)
  const r = await client('qemu-img', ['compare', '-U', '-f', 'raw', '-F', 'qcow2', d.mountpoint, image])
  t.is(r.code, 0, `qemu-img compare: ${r.stdout}${r.stderr}`)
  // base:allocation from qemu-nbd: the unwritten start is a hole, the written range data.
  const probes = await seekProbes(d.mountpoint, [0])
  t.deepEqual(probes, [
    { offset: 0, whence: 'DATA', result: 1 * MiB },
    { offset: 0, whence: 'HOLE', result: 0 },
  ])
})

/** Established TCP connections the server on 127.0.0.1:`port` has (its side: source port). */
async function serverConnections(port: number): Promise<number> {
  const r = await run('ss', ['-Htn', 'state', 'established', `sport = :${port}`])
  if (r.code !== 0) throw new Error(`ss failed: ${r.stderr}`)
  return r.stdout.split('\n').filter((l) => l.trim() !== '').length
}

// One connection per queue thread when the server advertises CAN_MULTI_CONN (nbdkit memory
// does), exactly one shared by all queues when it does not (the multi-conn filter hides it).
for (const { threads, multiConn } of [
  { threads: 1, multiConn: true },
  { threads: 2, multiConn: true },
  { threads: 2, multiConn: false },
]) {
  const conns = multiConn ? threads : 1
  test(`fio randwrite + verify over nbdkit memory${multiConn ? '' : ' without CAN_MULTI_CONN'}, 2 jobs × iodepth 16, ${threads} thread(s): ${conns} connection(s), zero verify errors`, async (t) => {
    const d = await fixture(t)
    const listen = await listenOn('tcp', d.dir)
    // Filter parameters follow the plugin's.
    const args = multiConn ? ['memory', '64M'] : ['--filter=multi-conn', 'memory', '64M', 'multi-conn-mode=disable']
    const server = await nbdkit(t, listen, args)
    await openExport(t, { source: server.uri, mountpoint: d.mountpoint, writable: true, threads })
    t.is(await serverConnections(listen.port!), conns, 'connections after create')
    const output = d.path('fio.json')
    const r = await run(
      'fio',
      fioVerifyArgs({ filename: d.mountpoint, jobs: 2, size: 16 * MiB, offsetIncrement: 32 * MiB, output }),
      { env: C_ENV },
    )
    t.is(r.code, 0, `fio failed: ${r.stderr}`)
    const report = parseFioReport(await readFile(output, 'utf8'))
    t.is(report.jobs.length, 2)
    for (const job of report.jobs) t.is(job.error, 0, `fio job ${job.jobname} reports error ${job.error}`)
    t.is(await serverConnections(listen.port!), conns, 'the same connections after fio (none lost or added)')
  })
}

test('SEEK_DATA/SEEK_HOLE follow base:allocation, and a punched range reads as zeros and becomes a hole', async (t) => {
  const d = await fixture(t)
  const server = await nbdkit(t, await listenOn('unix', d.dir), ['memory', '16M'])
  await openExport(t, { source: server.uri, mountpoint: d.mountpoint, writable: true })
  await mustClient('dd', [
    'if=/dev/urandom',
    `of=${d.mountpoint}`,
    'bs=1M',
    'seek=4',
    'count=4',
    'conv=notrunc,fsync',
    'status=none',
  ])
  t.deepEqual(await seekProbes(d.mountpoint, [0, 5 * MiB]), [
    { offset: 0, whence: 'DATA', result: 4 * MiB },
    { offset: 0, whence: 'HOLE', result: 0 },
    { offset: 5 * MiB, whence: 'DATA', result: 5 * MiB },
    { offset: 5 * MiB, whence: 'HOLE', result: 8 * MiB },
  ])
  await mustClient('fallocate', ['-p', '-o', String(5 * MiB), '-l', String(1 * MiB), d.mountpoint])
  const punched = (await readFile(d.mountpoint)).subarray(5 * MiB, 6 * MiB)
  t.true(punched.equals(Buffer.alloc(MiB)), 'the punched range reads as zeros')
  t.deepEqual(await seekProbes(d.mountpoint, [5 * MiB]), [
    { offset: 5 * MiB, whence: 'DATA', result: 6 * MiB },
    { offset: 5 * MiB, whence: 'HOLE', result: 5 * MiB },
  ])
  // Zeroing without punching (FALLOC_FL_ZERO_RANGE) reads as zeros too.
  await mustClient('fallocate', ['-z', '-o', String(6 * MiB), '-l', String(4 * KiB), d.mountpoint])
  t.true((await readFile(d.mountpoint)).subarray(6 * MiB, 6 * MiB + 4 * KiB).equals(Buffer.alloc(4 * KiB)))
})

test('a read-only server gives a read-only export; asking for a writable one fails with NBD_READ_ONLY', async (t) => {
  const d = await fixture(t)
  const server = await nbdkit(t, await listenOn('unix', d.dir), ['-r', 'null', '8M'])
  await t.throwsAsync(FuseExport.create({ source: server.uri, mountpoint: d.mountpoint, writable: true }), {
    code: 'NBD_READ_ONLY',
  })
  await openExport(t, { source: server.uri, mountpoint: d.mountpoint })
  const r = await client('dd', [
    'if=/dev/zero',
    `of=${d.mountpoint}`,
    'bs=4k',
    'count=1',
    'conv=notrunc',
    'status=none',
  ])
  t.not(r.code, 0, 'writing to a read-only export fails')
  t.is((await readFile(d.mountpoint)).length, 8 * MiB)
})

test('server errors (nbdkit error filter) fail the request with EIO and the export keeps serving', async (t) => {
  const d = await fixture(t)
  const server = await nbdkit(t, await listenOn('unix', d.dir), [
    '--filter=error',
    'memory',
    '8M',
    'error-pread=EIO',
    'error-pread-rate=100%',
  ])
  // format raw: probing would read the first sector, which fails here.
  await openExport(t, { source: server.uri, mountpoint: d.mountpoint, writable: true, format: 'raw' })
  const r = await client('dd', [
    `if=${d.mountpoint}`,
    'of=/dev/null',
    'bs=4k',
    'count=1',
    'iflag=direct',
    'status=none',
  ])
  t.not(r.code, 0)
  t.regex(r.stderr, /Input\/output error/)
  // Writes still work: the connection stayed up.
  await mustClient('dd', [
    'if=/dev/zero',
    `of=${d.mountpoint}`,
    'bs=4k',
    'count=4',
    'oflag=direct',
    'conv=notrunc',
    'status=none',
  ])
})

test('create fails clearly: bad URI, unreachable server, unknown export, silent server, a path-less Unix URI', async (t) => {
  const d = await fixture(t)
  await t.throwsAsync(FuseExport.create({ source: 'nbd://127.0.0.1:99999/x', mountpoint: d.mountpoint }), {
    code: 'NBD_URI_INVALID',
  })
  await t.throwsAsync(FuseExport.create({ source: 'nbd+unix:///x', mountpoint: d.mountpoint }), {
    code: 'NBD_URI_INVALID',
  })
  const closedPort = await freePort()
  await t.throwsAsync(FuseExport.create({ source: `nbd://127.0.0.1:${closedPort}/`, mountpoint: d.mountpoint }), {
    code: 'NBD_CONNECT_FAILED',
  })
  await t.throwsAsync(
    FuseExport.create({ source: `nbd+unix:///?socket=${d.path('nobody.sock')}`, mountpoint: d.mountpoint }),
    { code: 'NBD_CONNECT_FAILED' },
  )
  // qemu-nbd knows only the export "disk".
  const image = d.path('img.raw')
  await writeFile(image, Buffer.alloc(MiB))
  const qemu = await qemuNbd(t, await listenOn('unix', d.dir), image, 'raw', 'disk')
  await t.throwsAsync(FuseExport.create({ source: qemu.uri.replace('/disk?', '/other?'), mountpoint: d.mountpoint }), {
    code: 'NBD_EXPORT_NOT_FOUND',
    message: /other/,
  })
  // A server that accepts and never speaks: the handshake times out.
  const sockets: Socket[] = []
  const silent = createServer((s) => sockets.push(s))
  silent.listen(join(d.dir, 'silent.sock'))
  t.teardown(() => {
    for (const s of sockets) s.destroy()
    silent.close()
  })
  const started = Date.now()
  await t.throwsAsync(
    FuseExport.create({
      source: `nbd+unix:///?socket=${join(d.dir, 'silent.sock')}`,
      mountpoint: d.mountpoint,
      nbd: { connectTimeout: 0.5 },
    }),
    { code: 'NBD_CONNECT_FAILED' },
  )
  t.log(`silent server refused after ${Date.now() - started} ms`)
  // Nothing was mounted by any of these.
  const st = await mustClient('stat', ['-c', '%s', d.mountpoint])
  t.is(st.stdout.trim(), '0')
})

test('format auto probes the export: a qcow2 image served raw exports the disk inside it, format raw serves its bytes', async (t) => {
  const d = await fixture(t)
  const image = d.path('img.qcow2')
  await mustClient('qemu-img', ['create', '-q', '-f', 'qcow2', image, String(8 * MiB)])
  const server = await nbdkit(t, await listenOn('unix', d.dir), ['-r', 'file', image])
  const probed = await openExport(t, { source: server.uri, mountpoint: d.mountpoint })
  t.is(probed.format, 'qcow2')
  t.is(probed.size, 8 * MiB)
  await probed.close()
  await openExport(t, { source: server.uri, mountpoint: d.mountpoint, format: 'raw' })
  const head = (await readFile(d.mountpoint)).subarray(0, 4)
  t.deepEqual([...head], [0x51, 0x46, 0x49, 0xfb])
})

test('hostile replies: a data chunk outside the request fails that read with EIO, no wrong data, the export stays up', async (t) => {
  const d = await fixture(t)
  const sock = d.path('hostile.sock')
  let served = 0
  await scriptedServer(t, sock, BigInt(MiB), ({ cmd, cookie, offset, length }) => {
    if (cmd !== 0) return chunk(cookie, 1, 0, Buffer.alloc(0)) // NONE + DONE
    served++
    const payload = Buffer.alloc(8 + length, 0xee)
    // Odd reads: the chunk claims an offset past the request. Even reads: correct.
    payload.writeBigUInt64BE(served % 2 === 1 ? offset + BigInt(length) : offset, 0)
    return chunk(cookie, 1, 1, payload)
  })
  await openExport(t, {
    source: `nbd+unix:///?socket=${sock}`,
    mountpoint: d.mountpoint,
    format: 'raw',
    nbd: { reconnectDelay: 5 },
  })
  const first = await client('dd', [
    `if=${d.mountpoint}`,
    'of=/dev/null',
    'bs=4k',
    'count=1',
    'iflag=direct',
    'status=none',
  ])
  t.not(first.code, 0, 'the hostile reply fails the read')
  t.regex(first.stderr, /Input\/output error/)
  // The connection was closed; blockfuse reconnects and the next (correct) reply is served.
  const second = await mustClient('python3', [
    '-c',
    'import os,sys; fd=os.open(sys.argv[1], os.O_RDONLY|os.O_DIRECT); import mmap; b=mmap.mmap(-1,4096); n=os.readv(fd,[b]); print(n, b[:4].hex())',
    d.mountpoint,
  ])
  t.is(second.stdout.trim(), '4096 eeeeeeee')
})
