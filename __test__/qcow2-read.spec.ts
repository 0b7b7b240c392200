/**
 * Issue 6, reading qcow2: images made by qemu-img (compat 0.10 = v2 and 1.1 = v3, compressed
 * clusters, a three-level backing chain) with data written by qemu-io. The export of each must be
 * what QEMU says the disk is: `qemu-img compare -f raw -F qcow2 <export> <image>` reports them
 * identical, and the export equals an offline `qemu-img convert -O raw` byte for byte.
 */
import test, { type ExecutionContext } from 'ava'

import { assertE2eEnvironment } from './helpers/env.js'
import { KiB, MiB, sha256 } from './helpers/files.js'
import {
  assertIdentical,
  convertToRaw,
  createQcow2,
  map,
  qcow2Dir,
  qemuIo,
  threeLevelChain,
  virtualSize,
  type Compat,
} from './helpers/qcow2.js'
import { mustClient, openExport, sizeOf } from './helpers/semantics.js'

test.before(() => {
  assertE2eEnvironment(['qemu-img', 'qemu-io', 'cmp', 'findmnt'])
})

/** Asserts the export equals the image: qemu-img compare, and cmp against an offline conversion. */
async function assertExportIsImage(
  t: ExecutionContext,
  mountpoint: string,
  image: string,
  offlineRaw: string,
): Promise<void> {
  t.is(await sizeOf(mountpoint), await virtualSize(image), 'the export has the virtual size')
  await assertIdentical(t, mountpoint, image, 'qcow2', 'export vs image')
  await convertToRaw(image, offlineRaw)
  await mustClient('cmp', [mountpoint, offlineRaw])
  t.pass()
}

for (const compat of ['0.10', '1.1'] as Compat[]) {
  test(`a qcow2 image of compat ${compat} reads as the disk qemu-img sees`, async (t) => {
    const d = await qcow2Dir(t)
    const image = d.path('img.qcow2')
    // An odd virtual size, so the last READ is short; small clusters, so requests span several.
    await createQcow2(image, 20 * MiB + 3 * KiB, { compat, clusterSize: 4 * KiB })
    await qemuIo(
      image,
      'qcow2',
      'write -P 0xa1 0 64k',
      'write -P 0xa2 100000 300000', // unaligned, across clusters
      'write -P 0xa3 5M 2M',
      `write -P 0xa4 ${20 * MiB} ${3 * KiB}`, // the short tail
      'write -z 5500k 64k', // zeros in the middle of data (zero clusters on v3)
    )
    await openExport(t, { source: image, mountpoint: d.mountpoint, format: 'qcow2' })
    await assertExportIsImage(t, d.mountpoint, image, d.path('offline.raw'))
  })
}

test('compressed clusters (qemu-img convert -c) read back as the original data', async (t) => {
  const d = await qcow2Dir(t)
  const plain = d.path('plain.qcow2')
  const compressed = d.path('compressed.qcow2')
  await createQcow2(plain, 8 * MiB)
  // Compressible patterns and one incompressible stretch (random data, stored uncompressed).
  const random = d.path('random.bin')
  await mustClient('dd', ['if=/dev/urandom', `of=${random}`, 'bs=64k', 'count=4', 'status=none'])
  await qemuIo(
    plain,
    'qcow2',
    'write -P 0x5a 0 3M',
    'write -P 0x01 4M 64k',
    `write -s ${random} 5M 256k`,
    'write -P 0x7e 6M 1M',
  )
  await mustClient('qemu-img', ['convert', '-c', '-O', 'qcow2', plain, compressed])
  const entries = await map(compressed)
  t.true(
    entries.some((e) => e.compressed === true),
    `qemu-img map shows compressed clusters: ${JSON.stringify(entries)}`,
  )
  await openExport(t, { source: compressed, mountpoint: d.mountpoint, format: 'qcow2' })
  await assertExportIsImage(t, d.mountpoint, compressed, d.path('offline.raw'))
  // And equal to the uncompressed original.
  await assertIdentical(t, d.mountpoint, plain, 'qcow2', 'export vs the uncompressed original')
})

for (const compat of ['0.10', '1.1'] as Compat[]) {
  test(`a three-level backing chain (compat ${compat}) reads as its top image; format auto finds qcow2`, async (t) => {
    const d = await qcow2Dir(t)
    const { base, mid, top } = await threeLevelChain(d, 8 * MiB, compat)
    const before = [await sha256(base), await sha256(mid), await sha256(top)]
    // format: 'auto' is the default: the probe must find qcow2 (else the size would be the file's).
    await openExport(t, { source: top, mountpoint: d.mountpoint })
    await assertExportIsImage(t, d.mountpoint, top, d.path('offline.raw'))
    // Each level shows where it is on top.
    const at = async (offset: number) => {
      const r = await mustClient('od', ['-An', '-tx1', '-N1', `-j${offset}`, d.mountpoint])
      return r.stdout.trim()
    }
    t.is(await at(0), '11') // base only
    t.is(await at(600 * KiB), '21') // mid over base
    t.is(await at(768 * KiB), '31') // top over mid over base
    t.is(await at(3 * MiB), '32') // top over base
    t.is(await at(3 * MiB + 512), '12') // base beside the top's 512 bytes
    t.is(await at(3200 * KiB), '22') // mid over base
    t.is(await at(2 * MiB), '00') // unallocated everywhere
    t.is(await at(7 * MiB), '33')
    t.deepEqual([await sha256(base), await sha256(mid), await sha256(top)], before, 'reading changed no file')
  })
}

test('a qcow2 on top of a raw backing file reads through to the raw data', async (t) => {
  const d = await qcow2Dir(t)
  const base = d.path('base.raw')
  await mustClient('dd', ['if=/dev/urandom', `of=${base}`, 'bs=1M', 'count=4', 'status=none'])
  const top = d.path('top.qcow2')
  await createQcow2(top, 6 * MiB, { backing: 'base.raw', backingFormat: 'raw' })
  await qemuIo(top, 'qcow2', 'write -P 0x44 1M 4k', 'write -P 0x45 5M 4k')
  await openExport(t, { source: top, mountpoint: d.mountpoint, format: 'qcow2' })
  await assertExportIsImage(t, d.mountpoint, top, d.path('offline.raw'))
})
