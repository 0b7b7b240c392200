/**
 * Issue 19, overlays. `snapshot: true`: writes land in a temporary overlay, so the export reads
 * back what was written while the source (raw, qcow2, a read-only NBD export) keeps its bytes and
 * mtime; the overlay file is unlinked from the start, so a kill -9 leaves nothing behind; a
 * partition of a qcow2 image under a snapshot takes a file system. `overlay: PATH`: a qcow2 image
 * with the source as backing file that `qemu-img info` / `check` / `compare` read as expected,
 * reused when it matches and refused when its backing file is another image.
 */
import { mkdir, readdir, readFile, readlink, stat, writeFile } from 'node:fs/promises'
import { join } from 'node:path'

import test from 'ava'

import type { BlockfuseError } from '../ts/index.js'
import { CliProcess, assertCliBuilt } from './helpers/cli.js'
import { assertE2eEnvironment } from './helpers/env.js'
import { KiB, MiB, sha256 } from './helpers/files.js'
import { forceUnmountAll } from './helpers/mounts.js'
import { qemuNbd, type NbdServer } from './helpers/nbd.js'
import { assertClean, createQcow2, qcow2Dir, qemuIo, type Qcow2Dir } from './helpers/qcow2.js'
import { client, fillBytes, mustClient, openExport } from './helpers/semantics.js'

test.before(() => {
  assertE2eEnvironment(['qemu-img', 'qemu-io', 'qemu-nbd', 'sgdisk', 'mkfs.ext4', 'fsck.ext4', 'dd'])
  assertCliBuilt()
})

/** The writes every overlay test makes: unaligned, across 64 KiB clusters, and at the end. */
const WRITES: Array<[offset: number, len: number, byte: number]> = [
  [0, 4 * KiB, 0o101],
  [70_000, 200_000, 0o102],
  [3 * MiB - 100, 300, 0o103],
  [8 * MiB - 512, 512, 0o104],
]

/** Applies {@link WRITES} to `path`, and to `mirror` (a raw file) if given. */
async function writeAll(path: string, mirror?: string): Promise<void> {
  for (const [offset, len, byte] of WRITES) {
    await fillBytes(path, offset, len, byte)
    if (mirror) await fillBytes(mirror, offset, len, byte)
  }
}

/** A raw 8 MiB source with a pattern, and a mirror copy that receives the same writes as the export. */
async function rawSource(d: Qcow2Dir): Promise<{ source: string; mirror: string }> {
  const source = d.path('source.raw')
  await writeFile(source, Buffer.alloc(8 * MiB, 0x5a))
  const mirror = d.path('mirror.raw')
  await writeFile(mirror, await readFile(source))
  return { source, mirror }
}

/** A private scratch directory for snapshot overlays (`TMPDIR` of the exporting process). */
async function scratchDir(d: Qcow2Dir): Promise<string> {
  const dir = d.path('scratch')
  await mkdir(dir)
  return dir
}

/** `qemu-img compare` of the mounted export against the mirror: identical. */
async function assertServes(t: import('ava').ExecutionContext, mountpoint: string, mirror: string): Promise<void> {
  const r = await client('qemu-img', ['compare', '-U', '-f', 'raw', '-F', 'raw', mirror, mountpoint])
  t.is(r.code, 0, r.stdout + r.stderr)
}

test('snapshot of a raw and of a qcow2 source: writes read back, the source keeps its bytes and mtime', async (t) => {
  const d = await qcow2Dir(t)
  const { source: raw, mirror } = await rawSource(d)
  const qcow2 = d.path('source.qcow2')
  await mustClient('qemu-img', ['convert', '-q', '-f', 'raw', '-O', 'qcow2', raw, qcow2])
  const mirrorBefore = await readFile(mirror)
  for (const [source, format] of [
    [raw, 'raw'],
    [qcow2, 'qcow2'],
  ] as const) {
    await writeFile(mirror, mirrorBefore)
    const [hash, mtime] = [await sha256(source), (await stat(source)).mtimeMs]
    const exp = await openExport(t, { source, mountpoint: d.mountpoint, snapshot: true })
    t.true(exp.options.writable, 'snapshot implies writable')
    await writeAll(d.mountpoint, mirror)
    await mustClient('fallocate', ['-p', '-o', String(1 * MiB), '-l', String(200 * KiB), d.mountpoint])
    await fillBytes(mirror, 1 * MiB, 200 * KiB, 0)
    await assertServes(t, d.mountpoint, mirror)
    await exp.close()
    t.is(await sha256(source), hash, `${format}: source bytes`)
    t.is((await stat(source)).mtimeMs, mtime, `${format}: source mtime`)
  }
  await assertClean(t, qcow2)
  // The source was opened read-only: a writer beside the snapshot is refused by the lock.
  const exp = await openExport(t, { source: raw, mountpoint: d.mountpoint, snapshot: true })
  const io = await client('qemu-io', ['-f', 'raw', '-c', 'write 0 512', raw])
  t.regex(io.stdout + io.stderr, /Failed to get "write" lock/)
  await exp.close()
})

test('snapshot of a read-only NBD export (qemu-nbd -r): writable, writes read back', async (t) => {
  const d = await qcow2Dir(t)
  const { source, mirror } = await rawSource(d)
  const hash = await sha256(source)
  const server: NbdServer = await qemuNbd(t, { kind: 'unix', socket: d.path('nbd.sock') }, source, 'raw', 'disk', [
    '-r',
  ])
  const exp = await openExport(t, { source: server.uri, mountpoint: d.mountpoint, format: 'raw', snapshot: true })
  await writeAll(d.mountpoint, mirror)
  await assertServes(t, d.mountpoint, mirror)
  await exp.close()
  t.is(await sha256(source), hash)
})

test('a partition of a qcow2 image under a snapshot: mkfs.ext4 and fsck.ext4 -n clean inside it, the image unchanged', async (t) => {
  const d = await qcow2Dir(t)
  const raw = d.path('disk.raw')
  await mustClient('truncate', ['-s', String(40 * MiB), raw])
  await mustClient('sgdisk', ['-n', '1:2048:+4M', '-n', '2:0:+24M', raw])
  const image = d.path('disk.qcow2')
  await mustClient('qemu-img', ['convert', '-q', '-f', 'raw', '-O', 'qcow2', raw, image])
  const hash = await sha256(image)
  const exp = await openExport(t, { source: image, mountpoint: d.mountpoint, partition: 2, snapshot: true })
  t.is(exp.size, 24 * MiB)
  await mustClient('mkfs.ext4', ['-q', '-F', d.mountpoint])
  const fsck = await client('fsck.ext4', ['-n', '-f', d.mountpoint])
  t.is(fsck.code, 0, fsck.stdout + fsck.stderr)
  await exp.close()
  t.is(await sha256(image), hash)
})

// Serial: TMPDIR is set in this process's environment for the moment the CLI is spawned.
test.serial('kill -9 of a CLI snapshot export leaves no overlay file: it is unlinked from the start', async (t) => {
  const d = await qcow2Dir(t)
  const { source } = await rawSource(d)
  const scratch = await scratchDir(d)
  const saved = process.env.TMPDIR
  process.env.TMPDIR = scratch
  const cli = new CliProcess(['export', '--snapshot', '--format', 'raw', source, d.mountpoint])
  if (saved === undefined) delete process.env.TMPDIR
  else process.env.TMPDIR = saved
  t.teardown(async () => {
    if (cli.child.exitCode === null && cli.child.signalCode === null) cli.child.kill('SIGKILL')
    await cli.exited
    await forceUnmountAll(d.mountpoint)
  })
  await cli.waitForLine(/^ready/)
  await writeAll(d.mountpoint)
  // The overlay is open in the exporter but has no name anywhere.
  t.deepEqual(await readdir(scratch), [])
  const fdDir = `/proc/${cli.child.pid}/fd`
  const targets = await Promise.all((await readdir(fdDir)).map((fd) => readlink(join(fdDir, fd)).catch(() => '')))
  t.true(
    targets.some((l) => l.startsWith(`${scratch}/`) && l.endsWith(' (deleted)')),
    targets.join('\n'),
  )
  cli.child.kill('SIGKILL')
  await cli.exited
  t.deepEqual(await readdir(scratch), [])
})

test('overlay PATH: created with a relative backing name; qemu-img info, check and compare read it; reused; a foreign overlay is refused', async (t) => {
  const d = await qcow2Dir(t)
  const { source, mirror } = await rawSource(d)
  const hash = await sha256(source)
  const overlayDir = d.path('overlays')
  await mkdir(overlayDir)
  const overlay = join(overlayDir, 'ov.qcow2')
  let exp = await openExport(t, { source, mountpoint: d.mountpoint, format: 'raw', overlay })
  await writeAll(d.mountpoint, mirror)
  await assertServes(t, d.mountpoint, mirror)
  await exp.close()
  t.is(await sha256(source), hash, 'the source is never written')
  const info = JSON.parse((await mustClient('qemu-img', ['info', '--output=json', overlay])).stdout) as Record<
    string,
    unknown
  >
  t.is(info['backing-filename'], '../source.raw')
  t.is(info['backing-filename-format'], 'raw')
  t.is(info['virtual-size'], 8 * MiB)
  await assertClean(t, overlay)
  const cmp = await client('qemu-img', ['compare', '-f', 'raw', '-F', 'qcow2', mirror, overlay])
  t.is(cmp.code, 0, cmp.stdout + cmp.stderr)
  // Reused: earlier writes are there, new ones add to them.
  exp = await openExport(t, { source, mountpoint: d.mountpoint, format: 'raw', overlay })
  await assertServes(t, d.mountpoint, mirror)
  await fillBytes(d.mountpoint, 5 * MiB, 64 * KiB, 0o110)
  await fillBytes(mirror, 5 * MiB, 64 * KiB, 0o110)
  await exp.close()
  t.is((await client('qemu-img', ['compare', '-f', 'raw', '-F', 'qcow2', mirror, overlay])).code, 0)
  // qemu-img commit merges it into the source.
  await mustClient('qemu-img', ['commit', '-q', overlay])
  t.true((await readFile(source)).equals(await readFile(mirror)))
  // An overlay of another image is refused.
  const other = d.path('other.raw')
  await writeFile(other, Buffer.alloc(8 * MiB))
  const foreign = d.path('foreign.qcow2')
  await createQcow2(foreign, undefined, { backing: other, backingFormat: 'raw' })
  const err = await t.throwsAsync(openExport(t, { source, mountpoint: d.mountpoint, format: 'raw', overlay: foreign }))
  t.is((err as BlockfuseError).code, 'OVERLAY_INVALID')
  t.regex(err!.message, /other\.raw/)
  await qemuIo(foreign, 'qcow2', 'read 0 512')
})
