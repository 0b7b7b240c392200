/**
 * `npm start`: exports a demo image (created on first run) writable at ./blockfuse-demo.mnt until
 * Ctrl-C or SIGTERM.
 *
 * @module
 */
import { constants } from 'node:fs'
import { access, open, rename, writeFile } from 'node:fs/promises'
import { resolve } from 'node:path'

import { FuseExport } from './index.js'
import { toBlockfuseError } from './native.js'

const IMAGE = 'blockfuse-demo.raw'
const MOUNTPOINT = 'blockfuse-demo.mnt'
const IMAGE_SIZE = 64 * 1024 * 1024
const MIB = 1024 * 1024

/** False only when `path` does not exist (a stale mount on it counts as existing). */
async function exists(path: string): Promise<boolean> {
  try {
    await access(path, constants.F_OK)
    return true
  } catch (err) {
    return (err as NodeJS.ErrnoException).code !== 'ENOENT'
  }
}

/** One MiB of the demo image: a text header naming the block, then a byte pattern. */
function demoBlock(index: number): Buffer {
  const block = Buffer.alloc(MIB)
  for (let i = 0; i < MIB; i++) block[i] = (i + index) & 0xff
  const header =
    index === 0
      ? 'blockfuse demo image\n' +
        'This 64 MiB raw image is exported as one regular file through FUSE.\n' +
        'Every MiB starts with a line naming it, followed by a byte pattern.\n'
      : ''
  block.write(`${header}[block ${index} of ${IMAGE_SIZE / MIB}]\n`, 0, 'latin1')
  return block
}

/** Writes the image under a temporary name first, so an interrupted first run leaves no half image. */
async function createImage(path: string): Promise<void> {
  const partial = `${path}.partial`
  const file = await open(partial, 'w')
  try {
    for (let i = 0; i < IMAGE_SIZE / MIB; i++) await file.write(demoBlock(i), 0, MIB, i * MIB)
  } finally {
    await file.close()
  }
  await rename(partial, path)
}

async function main(): Promise<void> {
  const image = resolve(IMAGE)
  const mountpoint = resolve(MOUNTPOINT)
  if (!(await exists(image))) {
    await createImage(image)
    console.log(`created ${IMAGE} (64 MiB)`)
  }
  if (!(await exists(mountpoint))) await writeFile(mountpoint, '', { flag: 'wx' })

  const exp = await FuseExport.create({ source: image, mountpoint, writable: true })
  exp.on('halt', (reason) => console.error(`blockfuse: export halted: ${reason}`))
  console.log(`blockfuse: ${IMAGE} is exported at ${MOUNTPOINT} (${exp.size} bytes, writable)

Try, in another terminal in this directory:
  cmp ${IMAGE} ${MOUNTPOINT} && echo identical
  dd if=${MOUNTPOINT} bs=1M count=1 status=none | hexdump -C | head
  qemu-img info -f raw ${MOUNTPOINT}
  printf 'hello' | dd of=${MOUNTPOINT} bs=1 seek=4096 conv=notrunc status=none   # lands in ${IMAGE}

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
