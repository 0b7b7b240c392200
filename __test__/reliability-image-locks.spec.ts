/**
 * Issue 21, case 1: image locks that QEMU understands. A writable export holds the image the way
 * QEMU's file-posix driver does (OFD locks on bytes 100+perm and 200+perm), so a second writer,
 * qemu-io, qemu-img and a running qemu-storage-daemon see each other; backing files are held too.
 */
import { spawn } from 'node:child_process'
import { access } from 'node:fs/promises'
import { join } from 'node:path'

import test, { type ExecutionContext } from 'ava'

import { FuseExport, isBlockfuseError, type BlockfuseErrorCode } from '../ts/index.js'
import { assertCliBuilt, CliProcess, runCli } from './helpers/cli.js'
import { assertE2eEnvironment } from './helpers/env.js'
import { makeImage, makeMountpoint, MiB, tempDir } from './helpers/files.js'
import { serveWithoutLocks } from './helpers/lockless-fs.js'
import { assertClean, createQcow2, qemuIo } from './helpers/qcow2.js'
import { client, openExport } from './helpers/semantics.js'

test.before(() => {
  assertE2eEnvironment(['qemu-img', 'qemu-io', 'qemu-storage-daemon', 'fio', 'findmnt'])
  assertCliBuilt()
})

async function fixture(t: ExecutionContext, format: 'raw' | 'qcow2') {
  const dir = await tempDir(t)
  const image = join(dir, `disk.${format}`)
  if (format === 'raw') await makeImage(image, 8 * MiB)
  else await createQcow2(image, 8 * MiB)
  const m1 = join(dir, 'm1')
  const m2 = join(dir, 'm2')
  await makeMountpoint(m1)
  await makeMountpoint(m2)
  return { dir, image, m1, m2 }
}

/** Asserts that `promise` rejects with a BlockfuseError of `code` whose message names `path`. */
async function rejectsWith(t: ExecutionContext, promise: Promise<unknown>, code: BlockfuseErrorCode, path: string) {
  const err = await t.throwsAsync(promise)
  t.true(isBlockfuseError(err, code), `${code} expected, got ${String(err)}`)
  t.true(err?.message.includes(path), `the message names ${path}: ${err?.message}`)
  return err
}

for (const format of ['raw', 'qcow2'] as const) {
  test(`a second writable export of one ${format} image fails with IMAGE_LOCKED naming the image`, async (t) => {
    const f = await fixture(t, format)
    await openExport(t, { source: f.image, mountpoint: f.m1, writable: true })
    const err = await rejectsWith(
      t,
      FuseExport.create({ source: f.image, mountpoint: f.m2, writable: true }),
      'IMAGE_LOCKED',
      f.image,
    )
    t.regex(err?.message ?? '', /Failed to get "write" lock/)
    // A read-only export does not share write either, so it is refused beside a writer too...
    await rejectsWith(t, FuseExport.create({ source: f.image, mountpoint: f.m2 }), 'IMAGE_LOCKED', f.image)
    // ...unless it force-shares (qemu-img -U), which reads beside the writer.
    const shared = await openExport(t, { source: f.image, mountpoint: f.m2, forceShare: true })
    await shared.close()
    if (format === 'qcow2') await assertClean(t, f.image)
  })
}

test('qemu-io and qemu-img meet the lock of a writable export; qemu-img -U reads beside it', async (t) => {
  const f = await fixture(t, 'qcow2')
  const exp = await openExport(t, { source: f.image, mountpoint: f.m1, writable: true })
  const w = await client('qemu-io', ['-f', 'qcow2', '-c', 'write 0 4k', f.image])
  t.not(w.code, 0, w.stdout + w.stderr)
  t.regex(w.stderr, /Failed to get "write" lock/)
  t.notRegex(w.stdout, /wrote/)
  const info = await client('qemu-img', ['info', f.image])
  t.not(info.code, 0, info.stdout + info.stderr)
  t.regex(info.stderr, /Failed to get shared "write" lock/)
  const infoU = await client('qemu-img', ['info', '-U', f.image])
  t.is(infoU.code, 0, infoU.stderr)
  t.regex(infoU.stdout, /file format: qcow2/)
  // The export itself still writes: fio through it, then the image is clean.
  const fio = await client('fio', [
    '--name=w',
    `--filename=${f.m1}`,
    '--rw=randwrite',
    '--bs=4k',
    '--size=4M',
    '--ioengine=psync',
    '--io_size=1M',
    '--fsync=64',
    '--verify=crc32c',
    '--randrepeat=1',
  ])
  t.is(fio.code, 0, fio.stdout + fio.stderr)
  await exp.close()
  // Closing releases the locks.
  await qemuIo(f.image, 'qcow2', 'write -P 7 0 4k')
  await assertClean(t, f.image)
})

test('read-only exports share with each other and keep writers out (as qemu-img does)', async (t) => {
  const f = await fixture(t, 'raw')
  await openExport(t, { source: f.image, mountpoint: f.m1 })
  await openExport(t, { source: f.image, mountpoint: f.m2 })
  const w = await client('qemu-io', ['-f', 'raw', '-c', 'write 0 4k', f.image])
  t.regex(w.stderr, /Failed to get "write" lock/)
  const r = await client('qemu-io', ['-f', 'raw', '-r', '-c', 'read 0 4k', f.image])
  t.is(r.code, 0, r.stderr)
  t.regex(r.stdout, /read 4096\/4096 bytes at offset 0/)
})

test('backing files are locked: qemu-io cannot write the base under a writable export of the top', async (t) => {
  const dir = await tempDir(t)
  const base = join(dir, 'base.qcow2')
  const top = join(dir, 'top.qcow2')
  const m = join(dir, 'm')
  await createQcow2(base, 8 * MiB)
  await qemuIo(base, 'qcow2', 'write -P 1 0 1M')
  await createQcow2(top, undefined, { backing: 'base.qcow2' })
  await makeMountpoint(m)
  const exp = await openExport(t, { source: top, mountpoint: m, writable: true })
  const w = await client('qemu-io', ['-f', 'qcow2', '-c', 'write 0 4k', base])
  t.regex(w.stderr, /Failed to get "write" lock/, w.stdout + w.stderr)
  // Reading the base is fine (it is shared for reading, as QEMU shares it).
  const info = await client('qemu-img', ['info', base])
  t.is(info.code, 0, info.stderr)
  // A writer holding the base keeps a new export of the top out, naming the base.
  await exp.close()
  const holder = await startStorageDaemon(t, dir, base)
  await rejectsWith(t, FuseExport.create({ source: top, mountpoint: m }), 'IMAGE_LOCKED', base)
  await holder.stop()
  await assertClean(t, top)
  await assertClean(t, base)
})

/** qemu-storage-daemon with `image` as a writable NBD export (so it holds write on the file). */
async function startStorageDaemon(t: ExecutionContext, dir: string, image: string) {
  const sock = join(dir, 'qsd.sock')
  const child = spawn(
    '/usr/bin/qemu-storage-daemon',
    [
      '--blockdev',
      `driver=file,node-name=file0,filename=${image}`,
      '--blockdev',
      'driver=qcow2,node-name=fmt0,file=file0',
      '--nbd-server',
      `addr.type=unix,addr.path=${sock}`,
      '--export',
      'type=nbd,id=e0,node-name=fmt0,writable=on',
    ],
    { stdio: ['ignore', 'ignore', 'pipe'] },
  )
  let stderr = ''
  child.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d))
  const exited = new Promise<void>((resolve) => child.on('close', () => resolve()))
  let alive = true
  void exited.then(() => (alive = false))
  const stop = async () => {
    if (alive) child.kill('SIGTERM')
    await exited
  }
  t.teardown(stop)
  const deadline = Date.now() + 20_000
  for (;;) {
    try {
      await access(sock)
      break
    } catch {
      if (!alive) throw new Error(`qemu-storage-daemon exited: ${stderr}`)
      if (Date.now() > deadline) throw new Error(`qemu-storage-daemon did not start: ${stderr}`)
      await new Promise((r) => setTimeout(r, 50))
    }
  }
  return { stop }
}

test('export --writable of an image a running qemu-storage-daemon writes fails with IMAGE_LOCKED', async (t) => {
  const f = await fixture(t, 'qcow2')
  const holder = await startStorageDaemon(t, f.dir, f.image)
  const cli = new CliProcess(['export', '--writable', f.image, f.m1])
  t.teardown(() => {
    if (cli.child.exitCode === null) cli.child.kill('SIGKILL')
  })
  const { code } = await cli.waitForExit()
  t.is(code, 1, cli.stderr)
  t.regex(cli.stderr, /\(IMAGE_LOCKED\)/)
  t.true(cli.stderr.includes(f.image), cli.stderr)
  t.regex(cli.stderr, /Failed to get "write" lock/)
  // Read-only with --force-share still serves (qemu-img -U's meaning).
  const ro = new CliProcess(['export', '--force-share', f.image, f.m1])
  t.teardown(() => {
    if (ro.child.exitCode === null) ro.child.kill('SIGKILL')
  })
  await ro.waitForLine(/^ready/)
  t.is((await ro.stop('SIGTERM')).code, 0, ro.stderr)
  await holder.stop()
  await assertClean(t, f.image)
})

test("locking: 'off' takes and checks no locks; forceShare on a writable export is refused", async (t) => {
  const f = await fixture(t, 'raw')
  await openExport(t, { source: f.image, mountpoint: f.m1, writable: true, locking: 'off' })
  // Nothing held: qemu-io may write (this is what 'off' risks).
  await qemuIo(f.image, 'raw', 'write -P 9 0 4k')
  await openExport(t, { source: f.image, mountpoint: f.m2, locking: 'on' })
  const err = await t.throwsAsync(
    FuseExport.create({ source: f.image, mountpoint: f.m2, writable: true, forceShare: true }),
  )
  t.true(isBlockfuseError(err, 'INVALID_OPTION'), String(err))
})

test("locking: 'auto' serves an image on a file system without locks, with a warning; 'on' refuses it", async (t) => {
  const f = await fixture(t, 'raw')
  // The image as seen through a file system that answers every lock request ENOLCK.
  const lockless = join(f.dir, 'lockless.raw')
  await makeMountpoint(lockless)
  await serveWithoutLocks(t, f.image, lockless)

  const on = await t.throwsAsync(
    FuseExport.create({ source: lockless, mountpoint: f.m1, writable: true, locking: 'on' }),
  )
  t.true(isBlockfuseError(on, 'SOURCE_OPEN_FAILED'), String(on))
  t.regex(on?.message ?? '', /failed to lock byte 100: No locks available/)
  t.regex(on?.message ?? '', /may not support OFD locks .*'auto'/)

  const cli = new CliProcess(['export', '--writable', lockless, f.m1])
  t.teardown(() => cli.stop('SIGTERM').catch(() => undefined))
  await cli.waitForLine(/^ready:/)
  t.regex(cli.stderr, /warn: .*cannot take image locks .*No locks available.*served unlocked/)
  // Served, and unlocked: a second writer is not kept out (what 'auto' warns about).
  const second = await openExport(t, { source: lockless, mountpoint: f.m2, writable: true })
  await second.close()
  t.is((await cli.stop('SIGTERM')).code, 0)
  const cliOn = await runCli(['export', '--writable', '--locking', 'on', lockless, f.m1])
  t.is(cliOn.code, 1, cliOn.stderr)
  t.regex(cliOn.stderr, /No locks available.*\(SOURCE_OPEN_FAILED\)/)
})
