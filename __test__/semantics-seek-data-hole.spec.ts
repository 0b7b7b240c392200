/**
 * SEEK_DATA / SEEK_HOLE on a sparse raw image: the export reports the same data and hole offsets
 * as the image file itself (the kernel forwards both whences as FUSE_LSEEK), with ENXIO at and
 * past EOF. A kernel fallback (no LSEEK support) would report everything as data and fail here.
 */
import { randomBytes } from 'node:crypto'
import { open } from 'node:fs/promises'
import { join } from 'node:path'

import test from 'ava'

import { assertE2eEnvironment } from './helpers/env.js'
import { makeMountpoint, MiB, tempDir } from './helpers/files.js'
import { client, mustClient, openExport, seekProbes, type SeekProbe } from './helpers/semantics.js'

test.before(() => {
  assertE2eEnvironment(['truncate', 'python3', 'fallocate', 'findmnt'])
})

const SIZE = 8 * MiB
/** 1 MiB of data at each of these offsets; everything else is a hole. */
const DATA_AT = [1 * MiB, 4 * MiB, 6 * MiB]
const OFFSETS = [0, MiB / 2, MiB, 1.5 * MiB, 2 * MiB, 3 * MiB, 4 * MiB, 5 * MiB, 5.5 * MiB, 6 * MiB, 7 * MiB]
const EOF_OFFSETS = [7.5 * MiB, SIZE - 1, SIZE, SIZE + MiB]

/** What SEEK_DATA/SEEK_HOLE must answer for a file of `size` with 1 MiB data extents at `dataAt`. */
function expectedProbes(dataAt: readonly number[], size: number, offsets: readonly number[]): SeekProbe[] {
  const inData = (o: number) => dataAt.some((d) => o >= d && o < d + MiB)
  return offsets.flatMap((offset): SeekProbe[] => {
    if (offset >= size) {
      return [
        { offset, whence: 'DATA', result: 'ENXIO' },
        { offset, whence: 'HOLE', result: 'ENXIO' },
      ]
    }
    const nextData = inData(offset) ? offset : dataAt.find((d) => d > offset)
    let hole = offset
    while (hole < size && inData(hole)) hole = dataAt.find((d) => hole >= d && hole < d + MiB)! + MiB
    return [
      { offset, whence: 'DATA', result: nextData ?? 'ENXIO' },
      { offset, whence: 'HOLE', result: hole },
    ]
  })
}

async function sparseImage(dir: string): Promise<string> {
  const image = join(dir, 'sparse.raw')
  await mustClient('truncate', ['-s', String(SIZE), image])
  const fh = await open(image, 'r+')
  try {
    for (const at of DATA_AT) await fh.write(randomBytes(MiB), 0, MiB, at)
    await fh.sync()
  } finally {
    await fh.close()
  }
  return image
}

test('SEEK_DATA/SEEK_HOLE through the export equal the image file, ENXIO at and past EOF', async (t) => {
  const dir = await tempDir(t)
  const image = await sparseImage(dir)
  const mountpoint = join(dir, 'mnt')
  await makeMountpoint(mountpoint)
  const offsets = [...OFFSETS, ...EOF_OFFSETS]
  const expected = expectedProbes(DATA_AT, SIZE, offsets)
  const onImage = await seekProbes(image, offsets)
  t.deepEqual(onImage, expected, 'the image is sparse as intended (the temp filesystem must support holes)')

  await openExport(t, { source: image, mountpoint })
  const onExport = await seekProbes(mountpoint, offsets)
  t.deepEqual(onExport, onImage, 'the export reports what the image file reports')
})

test('SEEK_DATA/SEEK_HOLE through a writable export follow a hole punched through it', async (t) => {
  const dir = await tempDir(t)
  const image = await sparseImage(dir)
  const mountpoint = join(dir, 'mnt')
  await makeMountpoint(mountpoint)
  await openExport(t, { source: image, mountpoint, writable: true })
  const punch = await client('fallocate', ['--punch-hole', '-o', String(4 * MiB), '-l', String(MiB), mountpoint])
  t.is(punch.code, 0, punch.stderr)
  const offsets = [...OFFSETS, ...EOF_OFFSETS]
  const expected = expectedProbes([MiB, 6 * MiB], SIZE, offsets)
  t.deepEqual(await seekProbes(image, offsets), expected, 'the image lost its data extent at 4M')
  t.deepEqual(await seekProbes(mountpoint, offsets), expected, 'and the export reports the same')
})
