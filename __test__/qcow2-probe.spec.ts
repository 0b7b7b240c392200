/**
 * Issue 6, format probing (QEMU's rule): `format: 'auto'` (the default) finds qcow2 by its magic
 * and takes anything else as raw. A raw image found by probing stays writable, but a write that
 * would make its first sector look like another format (a qcow2 magic: the next prober would
 * follow a backing file name the guest chose) fails with EPERM and a warning naming `--format
 * raw`; with `format: 'raw'` the same write is allowed. Images that look like formats blockfuse
 * cannot read are refused rather than served as raw bytes.
 */
import { readFile, writeFile } from 'node:fs/promises'

import test from 'ava'

import { assertE2eEnvironment } from './helpers/env.js'
import { CliProcess } from './helpers/cli.js'
import { makeImage, MiB } from './helpers/files.js'
import { createQcow2, qcow2Dir } from './helpers/qcow2.js'
import { run } from './helpers/run.js'
import { client, openExport, sizeOf } from './helpers/semantics.js'

test.before(() => {
  assertE2eEnvironment(['qemu-img', 'dd', 'findmnt'])
})

/** A qcow2 header as a guest would write it: magic, version 3, and a backing file name. */
const QCOW2_MAGIC = Buffer.from('QFI\xfb\0\0\0\x03', 'latin1')

/** Writes `bytes` at `offset` of `path` with dd (conv=notrunc), from a file in `dir`. */
async function ddAt(path: string, offset: number, bytes: Buffer, dir: (n: string) => string) {
  const src = dir(`bytes-${offset}-${bytes.length}`)
  await writeFile(src, bytes)
  return client('dd', [
    `if=${src}`,
    `of=${path}`,
    `bs=${bytes.length}`,
    'count=1',
    `seek=${offset}`,
    'oflag=seek_bytes',
    'conv=notrunc',
    'status=none',
  ])
}

test('format auto on a raw image: writing a qcow2 magic to the first sector fails with EPERM; elsewhere it is data', async (t) => {
  const d = await qcow2Dir(t)
  const image = d.path('disk.raw')
  const data = await makeImage(image, 4 * MiB)
  data[0] = 0x00 // never a magic by chance
  await writeFile(image, data)
  const exp = await openExport(t, { source: image, mountpoint: d.mountpoint, writable: true })
  t.is(exp.format, 'raw', 'probing found raw')
  t.is(await sizeOf(d.mountpoint), 4 * MiB)

  const refused = await ddAt(d.mountpoint, 0, QCOW2_MAGIC, d.path)
  t.not(refused.code, 0)
  t.regex(refused.stderr, /Operation not permitted/)
  // Two partial writes that would assemble the magic: the second is refused.
  t.is((await ddAt(d.mountpoint, 0, Buffer.from('QF'), d.path)).code, 0)
  const second = await ddAt(d.mountpoint, 2, Buffer.from('I\xfb', 'latin1'), d.path)
  t.regex(second.stderr, /Operation not permitted/)
  // A magic past the first sector is just data, and ordinary first-sector writes pass.
  t.is((await ddAt(d.mountpoint, 512, QCOW2_MAGIC, d.path)).code, 0)
  t.is((await ddAt(d.mountpoint, 0, Buffer.from('\xeb\x63\x90', 'latin1'), d.path)).code, 0)

  const now = await readFile(d.mountpoint)
  t.deepEqual(now.subarray(0, 3), Buffer.from('\xeb\x63\x90', 'latin1'))
  t.deepEqual(now.subarray(3, 4), Buffer.from([data[3]!]), 'nothing of the refused write landed')
  t.deepEqual(now.subarray(512, 520), QCOW2_MAGIC)
})

test('format raw allows the same write: the image then starts with the qcow2 magic', async (t) => {
  const d = await qcow2Dir(t)
  const image = d.path('disk.raw')
  await makeImage(image, 4 * MiB)
  const exp = await openExport(t, { source: image, mountpoint: d.mountpoint, writable: true, format: 'raw' })
  const r = await ddAt(d.mountpoint, 0, QCOW2_MAGIC, d.path)
  t.is(r.code, 0, r.stderr)
  await exp.close()
  t.deepEqual((await readFile(image)).subarray(0, 8), QCOW2_MAGIC)
})

test('the CLI warns once on stderr, naming --format raw', async (t) => {
  const d = await qcow2Dir(t)
  const image = d.path('disk.raw')
  const data = await makeImage(image, 1 * MiB)
  data[0] = 0
  await writeFile(image, data)
  const cli = new CliProcess(['export', '--writable', '--allow-other', 'off', image, d.mountpoint])
  t.teardown(async () => {
    if (cli.child.exitCode === null && cli.child.signalCode === null) await cli.stop('SIGTERM').catch(() => undefined)
    await run('umount', ['-l', d.mountpoint])
  })
  t.regex(await cli.waitForLine(/^ready/), /\(raw, /)
  for (let i = 0; i < 2; i++) {
    const r = await ddAt(d.mountpoint, 0, QCOW2_MAGIC, d.path)
    t.regex(r.stderr, /Operation not permitted/)
  }
  const { code } = await cli.stop('SIGTERM')
  t.is(code, 0, cli.stderr)
  const warnings = cli.stderr.split('\n').filter((l) => /first sector/.test(l))
  t.is(warnings.length, 1, cli.stderr)
  t.regex(warnings[0]!, /look like qcow2.*--format raw/)
})

test('format auto on a qcow2 image serves the disk it describes, not the file', async (t) => {
  const d = await qcow2Dir(t)
  const image = d.path('disk.qcow2')
  await createQcow2(image, 64 * MiB)
  const exp = await openExport(t, { source: image, mountpoint: d.mountpoint })
  t.is(exp.format, 'qcow2', 'probing found qcow2')
  t.is(exp.options.format, 'auto', 'the options keep what was asked for')
  t.is(await sizeOf(d.mountpoint), 64 * MiB)
})

test('the CLI ready line names the probed format, not auto', async (t) => {
  const d = await qcow2Dir(t)
  const image = d.path('disk.qcow2')
  await createQcow2(image, 64 * MiB)
  const cli = new CliProcess(['export', '--json', '--allow-other', 'off', image, d.mountpoint])
  t.teardown(async () => {
    if (cli.child.exitCode === null && cli.child.signalCode === null) await cli.stop('SIGTERM').catch(() => undefined)
    await run('umount', ['-l', d.mountpoint])
  })
  const ready = JSON.parse(await cli.waitForLine(/^\{/)) as Record<string, unknown>
  t.like(ready, { event: 'ready', format: 'qcow2', size: 64 * MiB })
  t.is((await cli.stop('SIGTERM')).code, 0, cli.stderr)
})

test('format auto refuses an image that looks like a format blockfuse cannot read', async (t) => {
  const d = await qcow2Dir(t)
  const image = d.path('disk.vhdx')
  await client('qemu-img', ['create', '-q', '-f', 'vhdx', image, '4M'])
  const err = await t.throwsAsync<Error & { code?: string }>(openExport(t, { source: image, mountpoint: d.mountpoint }))
  t.is(err?.code, 'SOURCE_OPEN_FAILED')
  t.regex(err?.message ?? '', /looks like vhdx.*format raw/)
})
