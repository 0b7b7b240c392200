/**
 * `npm start`: exports a demo image (created on first run) writable at ./blockfuse-demo.mnt until
 * Ctrl-C or SIGTERM.
 *
 * @module
 */
import { spawnSync } from 'node:child_process'
import { constants } from 'node:fs'
import { access, mkdtemp, open, rename, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join, resolve } from 'node:path'

import { FuseExport } from './index.js'
import { toBlockfuseError } from './native.js'

const IMAGE = 'blockfuse-demo.raw'
const MOUNTPOINT = 'blockfuse-demo.mnt'
const IMAGE_SIZE = 64 * 1024 * 1024

/** False only when `path` does not exist (a stale mount on it counts as existing). */
async function exists(path: string): Promise<boolean> {
  try {
    await access(path, constants.F_OK)
    return true
  } catch (err) {
    return (err as NodeJS.ErrnoException).code !== 'ENOENT'
  }
}

/** Where the demo's one partition starts and how long it is, in 512-byte sectors. */
const PART_START = 2048
const PART_SECTORS = IMAGE_SIZE / 512 - PART_START
const README_TEXT = `Hello from inside blockfuse-demo.raw!

This file lives in an ext4 file system, in partition 1 of a disk image with an MBR partition
table. blockfuse exports the whole image as one regular file (blockfuse-demo.mnt), and the
kernel's loop device and ext4 driver read it through that file like a real disk.
`

/**
 * The image's first sector: an MBR with one Linux partition (type 0x83) at PART_START. Written here
 * rather than with sfdisk so that `npm start` needs no tool beyond mkfs.ext4 (Debian's e2fsprogs is
 * part of every installation).
 */
function masterBootRecord(): Buffer {
  const mbr = Buffer.alloc(512)
  mbr.writeUInt32LE(0xb10cf05e, 440) // disk identifier
  const entry = 446
  mbr.writeUInt8(0x00, entry) // not bootable
  mbr.set([0xfe, 0xff, 0xff], entry + 1) // CHS start: beyond CHS, use LBA
  mbr.writeUInt8(0x83, entry + 4) // Linux
  mbr.set([0xfe, 0xff, 0xff], entry + 5) // CHS end: beyond CHS, use LBA
  mbr.writeUInt32LE(PART_START, entry + 8)
  mbr.writeUInt32LE(PART_SECTORS, entry + 12)
  mbr.writeUInt16LE(0xaa55, 510)
  return mbr
}

/**
 * Builds the image under a temporary name first, so an interrupted first run leaves no half image:
 * a partition table, then an ext4 file system in partition 1 holding hello.txt (mkfs.ext4 -d).
 */
async function createImage(path: string): Promise<void> {
  const partial = `${path}.partial`
  const staging = await mkdtemp(join(tmpdir(), 'blockfuse-demo-'))
  try {
    await writeFile(join(staging, 'hello.txt'), README_TEXT)
    const file = await open(partial, 'w')
    try {
      await file.truncate(IMAGE_SIZE)
      await file.write(masterBootRecord(), 0, 512, 0)
    } finally {
      await file.close()
    }
    const mkfs = spawnSync(
      'mkfs.ext4',
      [
        '-q',
        '-F',
        '-L',
        'blockfuse-demo',
        '-d',
        staging,
        '-E',
        `offset=${PART_START * 512},nodiscard`,
        partial,
        `${(PART_SECTORS * 512) / 1024}k`,
      ],
      { encoding: 'utf8', env: { ...process.env, PATH: `${process.env.PATH ?? ''}:/usr/sbin:/sbin` } },
    )
    if (mkfs.error || mkfs.status !== 0) {
      const why = mkfs.error ? mkfs.error.message : mkfs.stderr.trim()
      throw new Error(
        `mkfs.ext4 could not build the demo's file system (${why}); install it with \`apt-get install e2fsprogs\``,
      )
    }
    await rename(partial, path)
  } finally {
    await rm(staging, { recursive: true, force: true })
    await rm(partial, { force: true })
  }
}

async function main(): Promise<void> {
  const image = resolve(IMAGE)
  const mountpoint = resolve(MOUNTPOINT)
  if (!(await exists(image))) {
    await createImage(image)
    console.log(`created ${IMAGE} (64 MiB: an MBR partition table, ext4 with hello.txt in partition 1)`)
  }
  if (!(await exists(mountpoint))) await writeFile(mountpoint, '', { flag: 'wx' })

  const exp = await FuseExport.create({ source: image, mountpoint, writable: true })
  exp.on('halt', (reason) => console.error(`blockfuse: export halted: ${reason}`))
  console.log(`blockfuse: ${IMAGE} is exported at ${MOUNTPOINT} (${exp.size} bytes, writable)

Try, in another terminal in this directory:
  cmp ${IMAGE} ${MOUNTPOINT} && echo identical
  qemu-img info -f raw ${MOUNTPOINT}
  sfdisk -l ${MOUNTPOINT}                     # the partition table, read through the export

Look inside the ext4 file system of partition 1 (starts at ${PART_START * 512} bytes), read-only:
  mkdir -p /tmp/blockfuse-demo-fs
  mount -o ro,loop,offset=${PART_START * 512} ${MOUNTPOINT} /tmp/blockfuse-demo-fs
  cat /tmp/blockfuse-demo-fs/hello.txt
  umount /tmp/blockfuse-demo-fs
or with a partition-scanning loop device (where udev makes /dev/loopNp1):
  losetup -P -r --show -f ${MOUNTPOINT}       # prints /dev/loopN; mount /dev/loopNp1 read-only

Press Ctrl-C to unmount.`)

  let stopping = false
  const stop = () => {
    if (stopping) return
    stopping = true
    exp.close().then(
      () => {
        console.log(`\nunmounted; ${MOUNTPOINT} is a plain file again`)
        process.exit(0)
      },
      (err: unknown) => fail(err),
    )
  }
  process.on('SIGINT', stop)
  process.on('SIGTERM', stop)
  exp.once('close', () => {
    if (!stopping) process.exit(exp.haltReason === undefined ? 0 : 1)
  })
}

function fail(err: unknown): never {
  const error = toBlockfuseError(err)
  console.error(`blockfuse demo: ${error.message} (${error.code})`)
  process.exit(1)
}

main().catch(fail)
