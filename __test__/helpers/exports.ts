/** Real exports for tests: fixtures with known content and an always-closing `withExport`. */
import { join } from 'node:path'

import type { ExecutionContext } from 'ava'

import { FuseExport, type FuseExportOptions } from '../../ts/index.js'
import { makeImage, makeMountpoint, MiB, tempDir } from './files.js'

export interface ImageFixture {
  dir: string
  /** A raw image with random content. */
  image: string
  /** An empty regular file to mount on. */
  mountpoint: string
  /** The image's content at creation. */
  data: Buffer
}

/** A temp dir with `img.raw` (random content of `size` bytes) and an empty `mnt`. */
export async function imageFixture(t: ExecutionContext, size = 4 * MiB): Promise<ImageFixture> {
  const dir = await tempDir(t)
  const image = join(dir, 'img.raw')
  const mountpoint = join(dir, 'mnt')
  const data = await makeImage(image, size)
  await makeMountpoint(mountpoint)
  return { dir, image, mountpoint, data }
}

/** Creates an export, runs `fn` with it and always closes it, even when `fn` throws. */
export async function withExport<T>(options: FuseExportOptions, fn: (exp: FuseExport) => Promise<T>): Promise<T> {
  const exp = await FuseExport.create(options)
  let result: T
  try {
    result = await fn(exp)
  } catch (err) {
    await exp.close().catch((closeErr: unknown) => {
      console.error(`withExport: close after a failure failed too: ${String(closeErr)}`)
    })
    throw err
  }
  await exp.close()
  return result
}
