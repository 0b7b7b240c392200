/**
 * FALLOCATE through a writable export: PUNCH_HOLE really deallocates (the image's allocated
 * blocks go down) and reads back zeros; ZERO_RANGE reads back zeros (growing the image when
 * KEEP_SIZE is absent); plain allocation before EOF is not supported; a read-only export refuses.
 */
import { readFile } from 'node:fs/promises'

import test from 'ava'

import { assertE2eEnvironment } from './helpers/env.js'
import { imageFixture } from './helpers/exports.js'
import { KiB, MiB } from './helpers/files.js'
import { blocksOf, client, mustClient, openExport, sizeOf } from './helpers/semantics.js'

test.before(() => {
  assertE2eEnvironment(['fallocate', 'cmp', 'stat', 'findmnt'])
})

const LEN = 4 * MiB

/** The image content expected after zeroing [offset, offset + length). */
function zeroed(data: Buffer, offset: number, length: number): Buffer {
  const expected = Buffer.from(data)
  expected.fill(0, offset, offset + length)
  return expected
}

test('fallocate --punch-hole lowers the allocated blocks of the image and the range reads back zeros', async (t) => {
  const f = await imageFixture(t, LEN)
  const exp = await openExport(t, { source: f.image, mountpoint: f.mountpoint, writable: true })
  const before = await blocksOf(f.image)
  t.true(before * 512 >= LEN, `the random image is fully allocated (${before} blocks)`)
  const r = await client('fallocate', ['--punch-hole', '-o', String(MiB), '-l', String(MiB), f.mountpoint])
  t.is(r.code, 0, `fallocate --punch-hole: ${r.stderr}`)
  const after = await blocksOf(f.image)
  t.true(after <= before - MiB / 512, `1 MiB was deallocated: ${before} -> ${after} blocks`)
  t.is(await sizeOf(f.mountpoint), LEN, 'KEEP_SIZE: the size stays')
  await mustClient('cmp', ['-n', String(MiB), '-i', `${MiB}:0`, f.mountpoint, '/dev/zero'])
  await exp.close()
  t.true((await readFile(f.image)).equals(zeroed(f.data, MiB, MiB)), 'only the punched range changed')
})

test('fallocate --zero-range (unaligned, with and without --keep-size) reads back zeros', async (t) => {
  const f = await imageFixture(t, LEN)
  const exp = await openExport(t, { source: f.image, mountpoint: f.mountpoint, writable: true })
  const offset = 2 * MiB + 4 * KiB + 100
  const length = 100 * KiB + 7
  const r = await client('fallocate', ['--zero-range', '-o', String(offset), '-l', String(length), f.mountpoint])
  t.is(r.code, 0, `fallocate --zero-range: ${r.stderr}`)
  t.is(await sizeOf(f.mountpoint), LEN)
  await mustClient('cmp', ['-n', String(length), '-i', `${offset}:0`, f.mountpoint, '/dev/zero'])
  let expected = zeroed(f.data, offset, length)

  // Across EOF with --keep-size: zeroes up to EOF, the size stays.
  const keep = await client('fallocate', [
    '--zero-range',
    '--keep-size',
    '-o',
    String(LEN - 64 * KiB),
    '-l',
    String(128 * KiB),
    f.mountpoint,
  ])
  t.is(keep.code, 0, `fallocate --zero-range --keep-size: ${keep.stderr}`)
  t.is(await sizeOf(f.mountpoint), LEN, 'KEEP_SIZE: no growth')
  expected = zeroed(expected, LEN - 64 * KiB, 64 * KiB)

  // Across EOF without --keep-size: the image grows first, the new part is zeros too.
  const grow = await client('fallocate', [
    '--zero-range',
    '-o',
    String(LEN - 32 * KiB),
    '-l',
    String(96 * KiB),
    f.mountpoint,
  ])
  t.is(grow.code, 0, `fallocate --zero-range across EOF: ${grow.stderr}`)
  t.is(await sizeOf(f.mountpoint), LEN + 64 * KiB, 'without KEEP_SIZE the export grows')
  t.is(await sizeOf(f.image), LEN + 64 * KiB, 'and so does the image')
  await mustClient('cmp', ['-n', String(128 * KiB), '-i', `${LEN - 64 * KiB}:0`, f.mountpoint, '/dev/zero'])
  await exp.close()
  expected = Buffer.concat([expected, Buffer.alloc(64 * KiB)])
  t.true((await readFile(f.image)).equals(expected), 'exactly the zeroed ranges changed')
})

test('plain fallocate (mode 0) before EOF fails with "Operation not supported"', async (t) => {
  const f = await imageFixture(t, LEN)
  await openExport(t, { source: f.image, mountpoint: f.mountpoint, writable: true })
  for (const [offset, length] of [
    [0, 4 * KiB],
    [MiB, MiB],
    // Straddling EOF starts before it, so it is refused too.
    [LEN - 4 * KiB, 64 * KiB],
  ] as const) {
    const r = await client('fallocate', ['-o', String(offset), '-l', String(length), f.mountpoint])
    t.not(r.code, 0, `fallocate -o ${offset} -l ${length} must fail`)
    t.is(r.stderr.trim(), 'fallocate: fallocate failed: Operation not supported', `-o ${offset} -l ${length}`)
  }
  t.is(await sizeOf(f.image), LEN)
  t.true((await readFile(f.image)).equals(f.data), 'the image is unchanged')
})

test('fallocate on a read-only export fails: Read-only file system', async (t) => {
  const f = await imageFixture(t, LEN)
  await openExport(t, { source: f.image, mountpoint: f.mountpoint })
  for (const args of [
    ['--punch-hole', '-o', '0', '-l', String(MiB)],
    ['--zero-range', '-o', '0', '-l', String(MiB)],
    ['-o', String(LEN), '-l', String(MiB)],
  ]) {
    const r = await client('fallocate', [...args, f.mountpoint])
    t.not(r.code, 0, `fallocate ${args.join(' ')} must fail`)
    // fallocate(1) opens the file for writing; the VFS refuses that on the ro mount.
    t.regex(r.stderr, /Read-only file system/, `fallocate ${args.join(' ')}`)
  }
  t.is(await sizeOf(f.image), LEN)
  t.true((await readFile(f.image)).equals(f.data), 'the image is unchanged')
})
