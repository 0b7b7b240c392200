/**
 * Issue 18, `format` on top of NBD: a qcow2 file served raw (`nbdkit file`, `qemu-nbd -f raw`)
 * exports as the disk inside it, through imago over the NBD connection. Images are made by
 * qemu-img with data written by qemu-io; what the export serves is judged by qemu-img compare,
 * check and qemu-io reads of the image file; SEEK_DATA/SEEK_HOLE against the qcow2 allocation;
 * fio verify with 2 jobs and one connection per queue; FALLOCATE; snapshot and overlay (the
 * overlay records the URI as its backing file); damaged images as for files (the dirty bit, the
 * metadata overlap check of issue 21); the NBD client's properties underneath (block-size limits,
 * an outage); the limits (no room to grow: ENOSPC; a backing file named by a path:
 * NBD_BACKING_UNSUPPORTED).
 */
import { open, readFile, rm, stat, truncate } from 'node:fs/promises'
import { join } from 'node:path'

import test, { type ExecutionContext } from 'ava'

import { FuseExport, isBlockfuseError } from '../ts/index.js'
import { be64, patch, peek, readBe64 } from './helpers/damage.js'
import { CliProcess, assertCliBuilt } from './helpers/cli.js'
import { assertE2eEnvironment } from './helpers/env.js'
import { KiB, MiB, makeMountpoint, sha256, tempDir } from './helpers/files.js'
import { fioVerifyArgs, parseFioReport } from './helpers/fio.js'
import { freePort, nbdkit, qemuNbd, type Listen } from './helpers/nbd.js'
import { assertClean, assertIdentical, createQcow2, qemuIo } from './helpers/qcow2.js'
import { client, C_ENV, mustClient, openExport, seekProbes } from './helpers/semantics.js'
import { run } from './helpers/run.js'

test.before(() => {
  assertCliBuilt()
  assertE2eEnvironment([
    'nbdkit',
    'qemu-nbd',
    'qemu-img',
    'qemu-io',
    'fio',
    'dd',
    'fallocate',
    'python3',
    'findmnt',
    'ss',
  ])
})

const CLUSTER = 64 * KiB

async function fixture(t: ExecutionContext) {
  const dir = await tempDir(t)
  const mountpoint = join(dir, 'mnt')
  await makeMountpoint(mountpoint)
  return { dir, mountpoint, path: (name: string) => join(dir, name) }
}

async function listenOn(kind: 'unix' | 'tcp', dir: string): Promise<Listen> {
  return kind === 'unix' ? { kind, socket: join(dir, 'nbd.sock') } : { kind, port: await freePort() }
}

/** Established TCP connections to the server's port (`ss`). */
async function serverConnections(port: number): Promise<number> {
  const r = await run('ss', ['-Htn', 'state', 'established', `sport = :${port}`])
  if (r.code !== 0) throw new Error(`ss failed: ${r.stderr}`)
  return r.stdout.split('\n').filter((l) => l.trim() !== '').length
}

/**
 * A qcow2 image of `size` with data at 1 MiB (0x11) and 5 MiB (0x22), 1 MiB each, written by
 * qemu-io; with `room`, the file is extended by that many bytes, so the image can allocate new
 * clusters inside the fixed size of an NBD export (qcow2 allocates where refcounts say a cluster
 * is free, also below the file's end).
 */
async function dataQcow2(path: string, size: number, room = 0): Promise<void> {
  await createQcow2(path, size)
  await qemuIo(path, 'qcow2', 'write -P 0x11 1M 1M', 'write -P 0x22 5M 1M')
  if (room > 0) {
    await truncate(path, (await stat(path)).size + room)
  }
}

for (const kind of ['unix', 'tcp'] as const) {
  test(`nbdkit file serving a qcow2 over ${kind === 'unix' ? 'a Unix socket' : '127.0.0.1'}: format auto exports the disk inside, qemu-img compare says identical`, async (t) => {
    const d = await fixture(t)
    const image = d.path('img.qcow2')
    await dataQcow2(image, 8 * MiB)
    const server = await nbdkit(t, await listenOn(kind, d.dir), ['-r', 'file', image])
    const exp = await openExport(t, { source: server.uri, mountpoint: d.mountpoint })
    t.is(exp.format, 'qcow2')
    t.is(exp.size, 8 * MiB, 'the virtual size, not the file size')
    await assertIdentical(t, d.mountpoint, image)
  })
}

test('writes through a writable qcow2-on-nbdkit export land in the image: qemu-img check clean, qemu-io reads them back', async (t) => {
  const d = await fixture(t)
  const image = d.path('img.qcow2')
  await dataQcow2(image, 16 * MiB, 8 * MiB)
  const server = await nbdkit(t, await listenOn('unix', d.dir), ['file', image])
  const exp = await openExport(t, { source: server.uri, mountpoint: d.mountpoint, writable: true, format: 'qcow2' })
  t.is(exp.format, 'qcow2')
  // Into allocated clusters (1 MiB..) and into unallocated ones (new clusters, a new L2 entry),
  // with a partial cluster at either end.
  await mustClient('sh', [
    '-c',
    'printf "\\063%.0s" $(seq 1 196608) | dd of="$1" bs=64k seek=1572864 oflag=seek_bytes conv=notrunc,fsync status=none',
    'sh',
    d.mountpoint,
  ])
  await mustClient('sh', [
    '-c',
    'printf "\\104%.0s" $(seq 1 100000) | dd of="$1" bs=4k seek=10000000 oflag=seek_bytes conv=notrunc,fsync status=none',
    'sh',
    d.mountpoint,
  ])
  await exp.close()
  await server.kill('SIGTERM')
  await assertClean(t, image)
  await qemuIo(
    image,
    'qcow2',
    'read -P 0x11 1M 512k',
    'read -P 0x33 1536k 192k',
    'read -P 0x11 1728k 320k',
    'read -P 0x22 5M 1M',
    'read -P 0 9999360 640',
    'read -P 0x44 10000000 100000',
    'read -P 0 10100000 100000',
  )
})

test('fio randwrite + verify, 2 jobs × iodepth 16, 2 threads, on a qcow2 served by nbdkit file: zero verify errors, check clean', async (t) => {
  const d = await fixture(t)
  const image = d.path('img.qcow2')
  await dataQcow2(image, 64 * MiB, 40 * MiB)
  const listen = await listenOn('tcp', d.dir)
  const server = await nbdkit(t, listen, ['file', image])
  await openExport(t, { source: server.uri, mountpoint: d.mountpoint, writable: true, threads: 2 })
  // nbdkit file advertises CAN_MULTI_CONN: one connection per queue, imago's I/O on both.
  t.is(await serverConnections(listen.port!), 2, 'connections after create')
  const output = d.path('fio.json')
  const r = await run(
    'fio',
    fioVerifyArgs({ filename: d.mountpoint, jobs: 2, size: 12 * MiB, offsetIncrement: 24 * MiB, output }),
    { env: C_ENV },
  )
  t.is(r.code, 0, `fio failed: ${r.stderr}`)
  const report = parseFioReport(await readFile(output, 'utf8'))
  t.is(report.jobs.length, 2)
  for (const job of report.jobs) t.is(job.error, 0, `fio job ${job.jobname} reports error ${job.error}`)
  t.is(await serverConnections(listen.port!), 2, 'the same connections after fio')
  const fh = await open(d.mountpoint, 'r')
  await fh.sync()
  await fh.close()
  await server.kill('SIGTERM')
  await assertClean(t, image)
})

test('SEEK_DATA/SEEK_HOLE over NBD reflect the qcow2 allocation, not the served file', async (t) => {
  const d = await fixture(t)
  const image = d.path('img.qcow2')
  await dataQcow2(image, 8 * MiB)
  const server = await nbdkit(t, await listenOn('unix', d.dir), ['-r', 'file', image])
  await openExport(t, { source: server.uri, mountpoint: d.mountpoint })
  t.deepEqual(await seekProbes(d.mountpoint, [0, 1 * MiB, 3 * MiB, 5 * MiB + 4096, 7 * MiB]), [
    { offset: 0, whence: 'DATA', result: 1 * MiB },
    { offset: 0, whence: 'HOLE', result: 0 },
    { offset: 1 * MiB, whence: 'DATA', result: 1 * MiB },
    { offset: 1 * MiB, whence: 'HOLE', result: 2 * MiB },
    { offset: 3 * MiB, whence: 'DATA', result: 5 * MiB },
    { offset: 3 * MiB, whence: 'HOLE', result: 3 * MiB },
    { offset: 5 * MiB + 4096, whence: 'DATA', result: 5 * MiB + 4096 },
    { offset: 5 * MiB + 4096, whence: 'HOLE', result: 6 * MiB },
    { offset: 7 * MiB, whence: 'DATA', result: 'ENXIO' },
    { offset: 7 * MiB, whence: 'HOLE', result: 7 * MiB },
  ])
})

test('qemu-nbd -f raw serving a qcow2 file: format auto exports the disk inside, format raw the file bytes', async (t) => {
  const d = await fixture(t)
  const image = d.path('img.qcow2')
  await dataQcow2(image, 8 * MiB)
  const server = await qemuNbd(t, await listenOn('tcp', d.dir), image, 'raw', 'disk', ['-r'])
  const exp = await openExport(t, { source: server.uri, mountpoint: d.mountpoint })
  t.is(exp.format, 'qcow2')
  await assertIdentical(t, d.mountpoint, image)
  await exp.close()
  const raw = await openExport(t, { source: server.uri, mountpoint: d.mountpoint, format: 'raw' })
  t.is(raw.format, 'raw')
  t.true((await readFile(d.mountpoint)).equals(await readFile(image)), 'the served bytes are the qcow2 file')
})

test('snapshot on a qcow2 served read-only by nbdkit: writes read back, the image file is never changed', async (t) => {
  const d = await fixture(t)
  const image = d.path('img.qcow2')
  await dataQcow2(image, 8 * MiB)
  const before = await sha256(image)
  const server = await nbdkit(t, await listenOn('unix', d.dir), ['-r', 'file', image])
  const exp = await openExport(t, { source: server.uri, mountpoint: d.mountpoint, snapshot: true })
  t.is(exp.format, 'qcow2')
  const fh = await open(d.mountpoint, 'r+')
  await fh.write(Buffer.alloc(96 * KiB, 0x5a), 0, 96 * KiB, 1 * MiB + 4 * KiB)
  await fh.sync()
  const back = Buffer.alloc(2 * MiB)
  await fh.read(back, 0, back.length, 0)
  await fh.close()
  t.true(back.subarray(0, MiB).equals(Buffer.alloc(MiB)), 'unallocated clusters read zeros')
  t.true(back.subarray(MiB, MiB + 4 * KiB).equals(Buffer.alloc(4 * KiB, 0x11)), 'the image data around the write')
  t.true(back.subarray(MiB + 4 * KiB, MiB + 100 * KiB).equals(Buffer.alloc(96 * KiB, 0x5a)), 'the write reads back')
  t.true(back.subarray(MiB + 100 * KiB).equals(Buffer.alloc(MiB - 100 * KiB, 0x11)), 'the rest is the image')
  await exp.close()
  t.is(await sha256(image), before, 'the image file is unchanged')
})

test('no room in the export: a write that needs a new cluster fails with ENOSPC, the export goes on, qemu-img check stays clean', async (t) => {
  const d = await fixture(t)
  const image = d.path('img.qcow2')
  await dataQcow2(image, 8 * MiB)
  const server = await nbdkit(t, await listenOn('unix', d.dir), ['file', image])
  await openExport(t, { source: server.uri, mountpoint: d.mountpoint, writable: true })
  const fh = await open(d.mountpoint, 'r+')
  t.teardown(() => fh.close().catch(() => undefined))
  const err = await t.throwsAsync(async () => {
    await fh.write(Buffer.alloc(4 * KiB, 0x77), 0, 4 * KiB, 3 * MiB)
    await fh.sync()
  })
  t.is((err as NodeJS.ErrnoException | undefined)?.code, 'ENOSPC', String(err))
  // Allocated clusters are still written in place, and read back.
  await fh.write(Buffer.alloc(4 * KiB, 0x66), 0, 4 * KiB, 1 * MiB)
  await fh.sync()
  const back = Buffer.alloc(4 * KiB)
  await fh.read(back, 0, back.length, 1 * MiB)
  t.true(back.equals(Buffer.alloc(4 * KiB, 0x66)))
  await fh.close()
  await server.kill('SIGTERM')
  // The clusters reserved for the refused write were given back: no leak, no corruption.
  await assertClean(t, image)
})

test('a qcow2 on NBD whose backing file is a path on the server is refused with NBD_BACKING_UNSUPPORTED', async (t) => {
  const d = await fixture(t)
  await createQcow2(d.path('base.qcow2'), 4 * MiB)
  const top = d.path('top.qcow2')
  await createQcow2(top, undefined, { backing: 'base.qcow2' })
  const server = await nbdkit(t, await listenOn('unix', d.dir), ['-r', 'file', top])
  const err = await t.throwsAsync(FuseExport.create({ source: server.uri, mountpoint: d.mountpoint }))
  t.true(isBlockfuseError(err, 'NBD_BACKING_UNSUPPORTED'), String(err))
  t.regex(err?.message ?? '', /base\.qcow2/)
  t.regex(err?.message ?? '', /qemu-nbd -f qcow2/)
  const st = await mustClient('stat', ['-c', '%s', d.mountpoint])
  t.is(st.stdout.trim(), '0', 'nothing was mounted')
})

test('format qcow2 on an NBD export that holds no qcow2 image fails with SOURCE_OPEN_FAILED', async (t) => {
  const d = await fixture(t)
  const server = await nbdkit(t, await listenOn('unix', d.dir), ['memory', '4M'])
  const err = await t.throwsAsync(FuseExport.create({ source: server.uri, mountpoint: d.mountpoint, format: 'qcow2' }))
  t.true(isBlockfuseError(err, 'SOURCE_OPEN_FAILED'), String(err))
  t.regex(err?.message ?? '', /not a qcow2 image/)
})

test('metadata overlap check over NBD: a write through an L2 entry pointing at the L1 table fails with EIO, writes nothing, marks the image corrupt', async (t) => {
  const d = await fixture(t)
  const image = d.path('img.qcow2')
  await createQcow2(image, 4 * MiB)
  await qemuIo(image, 'qcow2', 'write -P 0x11 0 64k', 'write -P 0x22 64k 64k')
  const l1 = await readBe64(image, 40)
  const l2 = (await readBe64(image, l1)) & 0x00ff_ffff_ffff_fe00n
  // L2 entry 0 (COPIED): guest cluster 0 now "lives" on the L1 table.
  await patch(image, l2, be64((1n << 63n) | l1))
  const before = await peek(image, l1, CLUSTER)
  const server = await nbdkit(t, await listenOn('unix', d.dir), ['file', image])
  await openExport(t, { source: server.uri, mountpoint: d.mountpoint, writable: true })
  const fh = await open(d.mountpoint, 'r+')
  t.teardown(() => fh.close().catch(() => undefined))
  const err = await t.throwsAsync(async () => {
    await fh.write(Buffer.alloc(CLUSTER, 0xee), 0, CLUSTER, 0)
    await fh.sync()
  })
  t.is((err as NodeJS.ErrnoException | undefined)?.code, 'EIO', String(err))
  const second = Buffer.alloc(CLUSTER)
  await fh.read(second, 0, CLUSTER, CLUSTER)
  t.true(second.equals(Buffer.alloc(CLUSTER, 0x22)), 'reads go on')
  await fh.close()
  t.true((await peek(image, l1, CLUSTER)).equals(before), 'the L1 table is untouched')
  const info = await mustClient('qemu-img', ['info', '-U', '--output=json', image])
  const corrupt = (JSON.parse(info.stdout) as { 'format-specific'?: { data?: { corrupt?: boolean } } })[
    'format-specific'
  ]?.data?.corrupt
  t.is(corrupt, true, 'the corrupt bit is set, through NBD')
})

test('the CLI: --format qcow2 on an NBD URI serves the disk inside, the ready line names qcow2', async (t) => {
  const d = await fixture(t)
  const image = d.path('img.qcow2')
  await dataQcow2(image, 8 * MiB)
  const server = await nbdkit(t, await listenOn('unix', d.dir), ['-r', 'file', image])
  const cli = new CliProcess(['export', '--format', 'qcow2', server.uri, d.mountpoint])
  t.teardown(async () => {
    if (cli.child.exitCode === null && cli.child.signalCode === null) await cli.stop('SIGTERM').catch(() => undefined)
  })
  const ready = await cli.waitForLine(/^ready/)
  t.regex(ready, /\(qcow2, 8388608 bytes, read-only,/)
  await assertIdentical(t, d.mountpoint, image)
  const { code } = await cli.stop('SIGINT')
  t.is(code, 0, cli.stderr)
})

test('overlay over an NBD export: writes land in the local qcow2 overlay, which names the URI as its backing file; the server image is unchanged; a second export reuses it', async (t) => {
  const d = await fixture(t)
  const image = d.path('img.qcow2')
  await dataQcow2(image, 8 * MiB)
  const before = await sha256(image)
  const server = await nbdkit(t, await listenOn('unix', d.dir), ['-r', 'file', image])
  const overlay = d.path('changes.qcow2')
  const exp = await openExport(t, { source: server.uri, mountpoint: d.mountpoint, overlay })
  t.is(exp.format, 'qcow2')
  t.is(exp.size, 8 * MiB)
  const fh = await open(d.mountpoint, 'r+')
  await fh.write(Buffer.alloc(64 * KiB, 0x5b), 0, 64 * KiB, 5 * MiB + 32 * KiB)
  await fh.sync()
  await fh.close()
  await exp.close()
  t.is(await sha256(image), before, 'the image behind the server is unchanged')
  const info = JSON.parse((await mustClient('qemu-img', ['info', '--output=json', overlay])).stdout) as {
    'backing-filename'?: string
    'backing-filename-format'?: string
  }
  t.is(info['backing-filename'], server.uri)
  t.is(info['backing-filename-format'], 'qcow2')
  await assertClean(t, overlay)
  // QEMU reads the overlay through the same server: the image's data with the write over it.
  await qemuIo(
    overlay,
    'qcow2',
    'read -P 0x11 1M 1M',
    'read -P 0x22 5M 32k',
    'read -P 0x5b 5152k 64k',
    'read -P 0x22 5216k 928k',
  )
  const again = await openExport(t, { source: server.uri, mountpoint: d.mountpoint, overlay })
  const back = Buffer.alloc(64 * KiB)
  const rh = await open(d.mountpoint, 'r')
  await rh.read(back, 0, back.length, 5 * MiB + 32 * KiB)
  await rh.close()
  t.true(back.equals(Buffer.alloc(64 * KiB, 0x5b)), 'the reused overlay keeps the write')
  await again.close()
})

test('overlay over a raw NBD export (nbdkit memory): created with backing format raw, writes read back, a different URI is OVERLAY_INVALID', async (t) => {
  const d = await fixture(t)
  const server = await nbdkit(t, await listenOn('unix', d.dir), ['-r', 'memory', '4M'])
  const overlay = d.path('ov.qcow2')
  const exp = await openExport(t, { source: server.uri, mountpoint: d.mountpoint, overlay, format: 'raw' })
  t.is(exp.size, 4 * MiB)
  const fh = await open(d.mountpoint, 'r+')
  await fh.write(Buffer.alloc(4 * KiB, 0x3c), 0, 4 * KiB, 12 * KiB)
  await fh.sync()
  const back = Buffer.alloc(32 * KiB)
  await fh.read(back, 0, back.length, 0)
  await fh.close()
  const expected = Buffer.alloc(32 * KiB)
  expected.fill(0x3c, 12 * KiB, 16 * KiB)
  t.true(back.equals(expected))
  await exp.close()
  const info = JSON.parse((await mustClient('qemu-img', ['info', '-U', '--output=json', overlay])).stdout) as {
    'backing-filename-format'?: string
  }
  t.is(info['backing-filename-format'], 'raw')
  const other = await nbdkit(t, { kind: 'unix', socket: d.path('other.sock') }, ['-r', 'memory', '4M'])
  const err = await t.throwsAsync(
    FuseExport.create({ source: other.uri, mountpoint: d.mountpoint, overlay, format: 'raw' }),
  )
  t.true(isBlockfuseError(err, 'OVERLAY_INVALID'), String(err))
  t.regex(err?.message ?? '', /not the source/)
})

test('block-size limits: a server that refuses requests below 4 KiB or above 64 KiB (nbdkit blocksize-policy, error policy) serves the qcow2 disk and takes its writes', async (t) => {
  const d = await fixture(t)
  const image = d.path('img.qcow2')
  await dataQcow2(image, 16 * MiB, 8 * MiB)
  const server = await nbdkit(t, await listenOn('unix', d.dir), [
    '--filter=blocksize-policy',
    'file',
    image,
    'blocksize-minimum=4096',
    'blocksize-preferred=65536',
    'blocksize-maximum=65536',
    'blocksize-error-policy=error',
  ])
  const exp = await openExport(t, { source: server.uri, mountpoint: d.mountpoint, writable: true })
  t.is(exp.format, 'qcow2')
  await assertIdentical(t, d.mountpoint, image, 'qcow2', 'before writing')
  // A 1 MiB write (split at 64 KiB), a small one inside a cluster, one into new clusters.
  await mustClient('sh', [
    '-c',
    'printf "\\125%.0s" $(seq 1 1048576) | dd of="$1" bs=1M seek=3 iflag=fullblock oflag=direct conv=notrunc,fsync status=none && printf "\\126%.0s" $(seq 1 700) | dd of="$1" bs=700 seek=1049000 oflag=seek_bytes conv=notrunc,fsync status=none && printf "\\127%.0s" $(seq 1 5000) | dd of="$1" bs=5000 seek=12582913 oflag=seek_bytes conv=notrunc,fsync status=none',
    'sh',
    d.mountpoint,
  ])
  await exp.close()
  await server.kill('SIGTERM')
  await assertClean(t, image)
  await qemuIo(
    image,
    'qcow2',
    'read -P 0x11 1M 424',
    'read -P 0x56 1049000 700',
    'read -P 0x11 1049700 1047452',
    'read -P 0x55 3M 1M',
    'read -P 0x57 12582913 5000',
  )
})

test.serial(
  'an outage of the server: reads of the qcow2 disk fail with EIO past reconnectDelay, and the export serves the same disk once the server is back',
  async (t) => {
    const d = await fixture(t)
    const image = d.path('img.qcow2')
    await dataQcow2(image, 8 * MiB)
    const listen: Listen = { kind: 'unix', socket: d.path('nbd.sock') }
    const start = async () => {
      await rm(listen.socket!, { force: true })
      return nbdkit(t, listen, ['-r', 'file', image])
    }
    const first = await start()
    await openExport(t, { source: first.uri, mountpoint: d.mountpoint, nbd: { reconnectDelay: 1 } })
    await first.kill()
    const failed = await client('dd', [
      `if=${d.mountpoint}`,
      'of=/dev/null',
      'bs=64k',
      'count=1',
      'skip=80',
      'iflag=direct',
      'status=none',
    ])
    t.not(failed.code, 0)
    t.regex(failed.stderr, /Input\/output error/)
    await start()
    let ok = false
    for (let i = 0; i < 50 && !ok; i++) {
      ok =
        (
          await client('dd', [
            `if=${d.mountpoint}`,
            'of=/dev/null',
            'bs=64k',
            'count=1',
            'skip=80',
            'iflag=direct',
            'status=none',
          ])
        ).code === 0
      if (!ok) await new Promise((r) => setTimeout(r, 200))
    }
    t.true(ok, 'reads succeed again after the server returned')
    await assertIdentical(t, d.mountpoint, image, 'qcow2', 'after the outage')
  },
)

test('FALLOCATE on a qcow2 over NBD: punch-hole and zero-range read zeros, the punched clusters become a hole, check stays clean', async (t) => {
  const d = await fixture(t)
  const image = d.path('img.qcow2')
  await dataQcow2(image, 8 * MiB)
  const server = await nbdkit(t, await listenOn('unix', d.dir), ['file', image])
  await openExport(t, { source: server.uri, mountpoint: d.mountpoint, writable: true })
  await mustClient('fallocate', ['-p', '-o', String(1 * MiB), '-l', String(256 * KiB), d.mountpoint])
  await mustClient('fallocate', ['-z', '-o', String(5 * MiB + 4 * KiB), '-l', String(8 * KiB), d.mountpoint])
  const back = await readFile(d.mountpoint)
  t.true(back.subarray(1 * MiB, 1 * MiB + 256 * KiB).equals(Buffer.alloc(256 * KiB)), 'the punched range reads zeros')
  t.true(
    back.subarray(1 * MiB + 256 * KiB, 2 * MiB).equals(Buffer.alloc(768 * KiB, 0x11)),
    'the rest of the data stays',
  )
  t.true(back.subarray(5 * MiB, 5 * MiB + 4 * KiB).equals(Buffer.alloc(4 * KiB, 0x22)))
  t.true(
    back.subarray(5 * MiB + 4 * KiB, 5 * MiB + 12 * KiB).equals(Buffer.alloc(8 * KiB)),
    'the zeroed range reads zeros',
  )
  t.true(back.subarray(5 * MiB + 12 * KiB, 6 * MiB).equals(Buffer.alloc(MiB - 12 * KiB, 0x22)))
  t.deepEqual(await seekProbes(d.mountpoint, [1 * MiB]), [
    { offset: 1 * MiB, whence: 'DATA', result: 1 * MiB + 256 * KiB },
    { offset: 1 * MiB, whence: 'HOLE', result: 1 * MiB },
  ])
  const fh = await open(d.mountpoint, 'r')
  await fh.sync()
  await fh.close()
  await server.kill('SIGTERM')
  await assertClean(t, image)
  await qemuIo(
    image,
    'qcow2',
    'read -P 0 1M 256k',
    'read -P 0x11 1280k 768k',
    'read -P 0 5124k 8k',
    'read -P 0x22 5132k 1012k',
  )
})

test('a dirty qcow2 (crash with lazy_refcounts) on NBD exports read-only with its data; writable is refused with IMAGE_DIRTY', async (t) => {
  const d = await fixture(t)
  const image = d.path('dirty.qcow2')
  await mustClient('qemu-img', [
    'create',
    '-q',
    '-f',
    'qcow2',
    '-o',
    'compat=1.1,lazy_refcounts=on',
    image,
    String(4 * MiB),
  ])
  // qemu-io kills itself after the write: no clean close, the dirty bit stays.
  const r = await client('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x33 0 64k', '-c', 'sigraise 9', image])
  t.is(r.signal, 'SIGKILL', r.stdout + r.stderr)
  t.is((await peek(image, 72, 8)).readBigUInt64BE() & 1n, 1n, 'the dirty bit is set')
  const server = await nbdkit(t, await listenOn('unix', d.dir), ['file', image])
  const ro = await openExport(t, { source: server.uri, mountpoint: d.mountpoint })
  t.is(ro.format, 'qcow2')
  const fh = await open(d.mountpoint, 'r')
  const back = Buffer.alloc(64 * KiB)
  await fh.read(back, 0, back.length, 0)
  await fh.close()
  t.true(back.equals(Buffer.alloc(64 * KiB, 0x33)), 'the data reads back')
  await ro.close()
  const err = await t.throwsAsync(FuseExport.create({ source: server.uri, mountpoint: d.mountpoint, writable: true }))
  t.true(isBlockfuseError(err, 'IMAGE_DIRTY'), String(err))
  t.is((await peek(image, 72, 8)).readBigUInt64BE() & 1n, 1n, 'the image is unchanged by the refusal')
})
