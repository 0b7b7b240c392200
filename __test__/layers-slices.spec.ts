/**
 * Issue 19, slices: `offset`/`size` export a byte range of the disk and `partition: N` partition N
 * of an MBR (primary and logical) or GPT table made by sfdisk / sgdisk, also inside a qcow2 image.
 * A file system made in an exported partition by mkfs.ext4 is clean for fsck.ext4 and the bytes
 * outside the partition are untouched; EOF, SEEK_DATA/HOLE and FALLOCATE are the slice's; a range
 * or a partition that is not on the disk is refused with its code.
 */
import { readFile } from 'node:fs/promises'

import test from 'ava'

import { BlockfuseError } from '../ts/index.js'
import { assertE2eEnvironment } from './helpers/env.js'
import { KiB, MiB } from './helpers/files.js'
import { qcow2Dir } from './helpers/qcow2.js'
import { client, fillBytes, mustClient, openExport, seekProbes, sizeOf } from './helpers/semantics.js'

test.before(() => {
  assertE2eEnvironment(['sfdisk', 'sgdisk', 'mkfs.ext4', 'fsck.ext4', 'qemu-img', 'dd', 'truncate', 'fallocate'])
})

const DISK = 48 * MiB

interface Part {
  node: string
  start: number
  size: number
}

/** The partitions `sfdisk --json` reads from `image` (works for MBR and GPT), in bytes. */
async function partitions(image: string): Promise<Part[]> {
  const r = await mustClient('sfdisk', ['--json', image])
  const table = (
    JSON.parse(r.stdout) as { partitiontable: { partitions: Array<{ node: string; start: number; size: number }> } }
  ).partitiontable
  return table.partitions.map((p) => ({ node: p.node, start: p.start * 512, size: p.size * 512 }))
}

/** A sparse raw disk with an MBR: primaries 1-3, the extended 4 holding logicals 5 and 6. */
async function mbrDisk(path: string): Promise<Part[]> {
  await mustClient('truncate', ['-s', String(DISK), path])
  const script = [
    'label: dos',
    'start=2048, size=16384, type=83',
    'size=8192, type=83',
    'size=4096, type=83',
    'type=5',
    'size=8192, type=83',
    'size=12288, type=83',
    '',
  ].join('\n')
  await mustClient('sh', ['-c', `printf '%s' '${script}' | sfdisk -q '${path}'`])
  return partitions(path)
}

/** A sparse raw disk with a GPT of three partitions made by sgdisk. */
async function gptDisk(path: string): Promise<Part[]> {
  await mustClient('truncate', ['-s', String(DISK), path])
  await mustClient('sgdisk', ['-n', '1:2048:+8M', '-n', '2:0:+16M', '-n', '3:0:+4M', path])
  return partitions(path)
}

/** `len` bytes of `path` from `offset`. */
async function bytesAt(path: string, offset: number, len: number): Promise<Buffer> {
  const data = await readFile(path)
  return data.subarray(offset, offset + len)
}

test('MBR partition 1: its size; mkfs.ext4 inside it is clean for fsck.ext4 -n; bytes outside it unchanged', async (t) => {
  const d = await qcow2Dir(t)
  const disk = d.path('disk.raw')
  const parts = await mbrDisk(disk)
  t.is(parts.length, 6)
  const p1 = parts[0]!
  const before = await readFile(disk)
  const exp = await openExport(t, {
    source: disk,
    mountpoint: d.mountpoint,
    format: 'raw',
    writable: true,
    partition: 1,
  })
  t.is(exp.size, p1.size)
  t.is(await sizeOf(d.mountpoint), p1.size)
  await mustClient('mkfs.ext4', ['-q', '-F', '-E', 'nodiscard', d.mountpoint])
  const fsck = await client('fsck.ext4', ['-n', '-f', d.mountpoint])
  t.is(fsck.code, 0, fsck.stdout + fsck.stderr)
  await exp.close()
  const after = await readFile(disk)
  t.true(before.subarray(0, p1.start).equals(after.subarray(0, p1.start)), 'the table and the bytes before partition 1')
  t.true(before.subarray(p1.start + p1.size).equals(after.subarray(p1.start + p1.size)), 'the bytes after partition 1')
  // The file system really is in the partition: fsck on the partition's bytes of the image.
  const copy = d.path('p1.raw')
  await mustClient('dd', [
    `if=${disk}`,
    `of=${copy}`,
    'bs=512',
    `skip=${p1.start / 512}`,
    `count=${p1.size / 512}`,
    'status=none',
  ])
  const again = await client('fsck.ext4', ['-n', '-f', copy])
  t.is(again.code, 0, again.stdout + again.stderr)
})

test('MBR logical partitions 5 and 6: writes land at their offsets; the extended partition and absent numbers are refused', async (t) => {
  const d = await qcow2Dir(t)
  const disk = d.path('disk.raw')
  const parts = await mbrDisk(disk)
  const [p5, p6] = [parts[4]!, parts[5]!]
  for (const [n, p, byte] of [
    [5, p5, 0o105],
    [6, p6, 0o106],
  ] as const) {
    const exp = await openExport(t, {
      source: disk,
      mountpoint: d.mountpoint,
      format: 'raw',
      writable: true,
      partition: n,
    })
    t.is(exp.size, p.size, `partition ${n}`)
    await fillBytes(d.mountpoint, 0, 64 * KiB, byte)
    await fillBytes(d.mountpoint, p.size - 4 * KiB, 4 * KiB, byte)
    await exp.close()
    t.true((await bytesAt(disk, p.start, 64 * KiB)).equals(Buffer.alloc(64 * KiB, byte)), `start of ${n}`)
    t.true(
      (await bytesAt(disk, p.start + p.size - 4 * KiB, 4 * KiB)).equals(Buffer.alloc(4 * KiB, byte)),
      `end of ${n}`,
    )
  }
  // The extended container, an unused slot and a number past the table.
  for (const n of [4, 7, 9]) {
    const err = await t.throwsAsync(
      openExport(t, { source: disk, mountpoint: d.mountpoint, format: 'raw', partition: n }),
      { instanceOf: BlockfuseError },
    )
    t.is(err?.code, 'PARTITION_NOT_FOUND', `partition ${n}: ${err?.message}`)
  }
  const noTable = d.path('blank.raw')
  await mustClient('truncate', ['-s', '1M', noTable])
  const err = await t.throwsAsync(openExport(t, { source: noTable, mountpoint: d.mountpoint, partition: 1 }))
  t.is((err as BlockfuseError).code, 'PARTITION_NOT_FOUND')
  t.regex(err!.message, /no partition table/)
})

test('GPT partitions (sgdisk), raw and inside a qcow2 image: each reads as its bytes of the disk', async (t) => {
  const d = await qcow2Dir(t)
  const disk = d.path('disk.raw')
  const parts = await gptDisk(disk)
  t.is(parts.length, 3)
  for (const [i, p] of parts.entries()) await fillBytes(disk, p.start + 512 * i, 96 * KiB, 0o141 + i)
  const qcow2 = d.path('disk.qcow2')
  await mustClient('qemu-img', ['convert', '-q', '-f', 'raw', '-O', 'qcow2', disk, qcow2])
  for (const [source, format] of [
    [disk, 'raw'],
    [qcow2, 'qcow2'],
  ] as const) {
    for (const [i, p] of parts.entries()) {
      const exp = await openExport(t, { source, mountpoint: d.mountpoint, format, partition: i + 1 })
      t.is(exp.size, p.size)
      t.true(
        (await readFile(d.mountpoint)).equals(await bytesAt(disk, p.start, p.size)),
        `${format} partition ${i + 1}`,
      )
      await exp.close()
    }
  }
  const err = await t.throwsAsync(openExport(t, { source: qcow2, mountpoint: d.mountpoint, partition: 4 }))
  t.is((err as BlockfuseError).code, 'PARTITION_NOT_FOUND')
  t.regex(err!.message, /partitions 1, 2, 3/)
})

test('offset/size: EOF of the slice (ENOSPC past it), SEEK_DATA/HOLE and punch-hole translated by the offset', async (t) => {
  const d = await qcow2Dir(t)
  const disk = d.path('disk.raw')
  await mustClient('truncate', ['-s', String(8 * MiB), disk])
  // Data at [1M, 1M+64k) and [3M, 3M+64k) of the disk; the slice is [1M, 4M).
  await fillBytes(disk, 1 * MiB, 64 * KiB, 0o61)
  await fillBytes(disk, 3 * MiB, 64 * KiB, 0o62)
  await fillBytes(disk, 4 * MiB, 64 * KiB, 0o63)
  const exp = await openExport(t, {
    source: disk,
    mountpoint: d.mountpoint,
    format: 'raw',
    writable: true,
    offset: '1M',
    size: '3M',
  })
  t.is(await sizeOf(d.mountpoint), 3 * MiB)
  const probes = await seekProbes(d.mountpoint, [0, 64 * KiB, 2 * MiB + 64 * KiB])
  t.deepEqual(
    probes.map((p) => p.result),
    // At 2M+64k (disk 3M+64k) a hole begins; the data after it (disk 4M) is past the slice.
    [0, 64 * KiB, 2 * MiB, 64 * KiB, 'ENXIO', 2 * MiB + 64 * KiB],
  )
  // A write at the slice's end fails and does not reach the disk beyond it.
  const past = await client('dd', [
    'if=/dev/zero',
    `of=${d.mountpoint}`,
    'bs=4k',
    'count=1',
    `seek=${(3 * MiB) / 4096}`,
    'conv=notrunc',
    'status=none',
  ])
  t.not(past.code, 0)
  t.regex(past.stderr, /No space left on device/)
  await mustClient('fallocate', ['-p', '-o', String(2 * MiB), '-l', String(64 * KiB), d.mountpoint])
  await exp.close()
  t.true((await bytesAt(disk, 3 * MiB, 64 * KiB)).equals(Buffer.alloc(64 * KiB)), 'punched at disk offset 3M')
  t.true((await bytesAt(disk, 4 * MiB, 64 * KiB)).equals(Buffer.alloc(64 * KiB, 0o63)), 'the byte after the slice')
  t.true((await bytesAt(disk, 1 * MiB, 64 * KiB)).equals(Buffer.alloc(64 * KiB, 0o61)))
})

test('slices outside the disk are refused with SLICE_OUT_OF_RANGE; growable and partition+offset with INVALID_OPTION', async (t) => {
  const d = await qcow2Dir(t)
  const disk = d.path('disk.raw')
  await mustClient('truncate', ['-s', String(4 * MiB), disk])
  for (const slice of [{ offset: '4M' }, { offset: '3M', size: '2M' }, { offset: 5 * MiB }]) {
    const err = await t.throwsAsync(openExport(t, { source: disk, mountpoint: d.mountpoint, ...slice }))
    t.is((err as BlockfuseError).code, 'SLICE_OUT_OF_RANGE', JSON.stringify(slice))
  }
  const grow = await t.throwsAsync(
    openExport(t, { source: disk, mountpoint: d.mountpoint, writable: true, growable: true, offset: 0 }),
  )
  t.is((grow as BlockfuseError).code, 'INVALID_OPTION')
  const both = await t.throwsAsync(openExport(t, { source: disk, mountpoint: d.mountpoint, partition: 1, size: '1M' }))
  t.is((both as BlockfuseError).code, 'INVALID_OPTION')
})
