/**
 * Issue 19, VMDK through imago: flat VMDK images made by `qemu-img create -f vmdk` (subformats
 * monolithicFlat and twoGbMaxExtentFlat), with data written by qemu-io, are served as the disk they
 * describe (`qemu-img compare` identical), with `format: 'vmdk'` and found by `auto`. imago does
 * not write VMDK, so a writable export is refused (a snapshot makes it writable), and sparse
 * images, which imago cannot read, are refused with its reason.
 */
import { readFile } from 'node:fs/promises'

import test from 'ava'

import type { BlockfuseError } from '../ts/index.js'
import { assertE2eEnvironment } from './helpers/env.js'
import { MiB, sha256 } from './helpers/files.js'
import { qcow2Dir } from './helpers/qcow2.js'
import { client, mustClient, openExport } from './helpers/semantics.js'

test.before(() => {
  assertE2eEnvironment(['qemu-img', 'qemu-io', 'dd'])
})

/** `qemu-img create -f vmdk -o subformat=<sub>` with a pattern written at three places by qemu-io. */
async function flatVmdk(path: string, subformat: string): Promise<void> {
  await mustClient('qemu-img', ['create', '-q', '-f', 'vmdk', '-o', `subformat=${subformat}`, path, String(8 * MiB)])
  const r = await mustClient('qemu-io', [
    '-f',
    'vmdk',
    '-c',
    'write -P 0x61 0 64k',
    '-c',
    'write -P 0x62 1000000 300000',
    '-c',
    'write -P 0x63 8387584 512',
    path,
  ])
  if (/error|failed/i.test(r.stdout + r.stderr)) throw new Error(r.stdout + r.stderr)
}

/** `qemu-img compare` of a vmdk image against the mounted export (raw). */
async function assertSameDisk(t: import('ava').ExecutionContext, vmdk: string, mountpoint: string): Promise<void> {
  const r = await client('qemu-img', ['compare', '-U', '-f', 'vmdk', '-F', 'raw', vmdk, mountpoint])
  t.is(r.code, 0, r.stdout + r.stderr)
}

for (const subformat of ['monolithicFlat', 'twoGbMaxExtentFlat']) {
  test(`a ${subformat} vmdk: served as its disk with format vmdk and with auto`, async (t) => {
    const d = await qcow2Dir(t)
    const vmdk = d.path('disk.vmdk')
    await flatVmdk(vmdk, subformat)
    for (const format of ['vmdk', 'auto'] as const) {
      const exp = await openExport(t, { source: vmdk, mountpoint: d.mountpoint, format })
      t.is(exp.format, 'vmdk')
      t.is(exp.size, 8 * MiB)
      await assertSameDisk(t, vmdk, d.mountpoint)
      const data = await readFile(d.mountpoint)
      t.true(data.subarray(0, 65536).equals(Buffer.alloc(65536, 0x61)))
      await exp.close()
    }
  })
}

test('a writable vmdk export is refused; with snapshot it is writable and the image stays unchanged', async (t) => {
  const d = await qcow2Dir(t)
  const vmdk = d.path('disk.vmdk')
  await flatVmdk(vmdk, 'monolithicFlat')
  const flat = d.path('disk-flat.vmdk')
  const hash = await sha256(flat)
  const err = await t.throwsAsync(
    openExport(t, { source: vmdk, mountpoint: d.mountpoint, format: 'vmdk', writable: true }),
  )
  t.is((err as BlockfuseError).code, 'SOURCE_OPEN_FAILED')
  t.regex(err!.message, /read-only.*snapshot/)
  const exp = await openExport(t, { source: vmdk, mountpoint: d.mountpoint, snapshot: true })
  await mustClient('dd', [
    'if=/dev/urandom',
    `of=${d.mountpoint}`,
    'bs=4k',
    'count=4',
    'conv=notrunc,fsync',
    'status=none',
  ])
  const r = await client('qemu-img', ['compare', '-U', '-f', 'vmdk', '-F', 'raw', vmdk, d.mountpoint])
  t.is(r.code, 1, 'the export differs from the image after the write')
  await exp.close()
  t.is(await sha256(flat), hash)
})

test('a sparse vmdk (qemu-img default, monolithicSparse) is refused with the reason', async (t) => {
  const d = await qcow2Dir(t)
  const vmdk = d.path('sparse.vmdk')
  await mustClient('qemu-img', ['create', '-q', '-f', 'vmdk', vmdk, String(4 * MiB)])
  for (const format of ['vmdk', 'auto'] as const) {
    const err = await t.throwsAsync(openExport(t, { source: vmdk, mountpoint: d.mountpoint, format }))
    t.is((err as BlockfuseError).code, 'SOURCE_OPEN_FAILED')
    t.regex(err!.message, /vmdk: .*sparse/i)
  }
})
