// The bench images: the raw image, its qcow2 conversion, and the page cache state before a group.

import fs from 'node:fs'

import { run } from './system.mjs'

export function ensureImage(image, size) {
  const st = fs.existsSync(image) ? fs.statSync(image) : null
  // Fully allocated, non-zero data: reads must hit the disk, not holes.
  if (st && st.size === size && st.blocks * 512 >= size) return
  process.stderr.write(`bench: creating ${size}-byte image ${image}\n`)
  fs.rmSync(image, { force: true })
  const mib = Math.ceil(size / 2 ** 20)
  run('dd', ['if=/dev/urandom', `of=${image}`, 'bs=1M', `count=${mib}`, 'conv=fsync', 'status=none'])
  fs.truncateSync(image, size)
}

/**
 * The qcow2 bench image: `qemu-img convert -O qcow2 -o cluster_size=64k` of the raw image, so every
 * cluster is allocated (reads hit data, writes overwrite allocated clusters: no allocation in the
 * measured path). Reused while `qemu-img check` passes and its virtual size is right.
 */
export function ensureQcow2(qcow2, rawImage, size) {
  if (fs.existsSync(qcow2)) {
    const info = run('qemu-img', ['info', '--output=json', '-U', qcow2], { allowFail: true })
    let ok = false
    try {
      const j = JSON.parse(info.stdout)
      ok = j.format === 'qcow2' && j['virtual-size'] === size && j['cluster-size'] === 65536
    } catch {}
    if (ok) ok = run('qemu-img', ['check', '-q', qcow2], { allowFail: true }).status === 0
    if (ok) return
    process.stderr.write(`bench: ${qcow2} is stale or fails qemu-img check, recreating it\n`)
  }
  process.stderr.write(`bench: creating ${qcow2} from ${rawImage}\n`)
  fs.rmSync(qcow2, { force: true })
  run('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', '-o', 'cluster_size=64k', rawImage, qcow2])
}

/** Writes back dirty pages of the image so no run pays for an earlier run's writes. */
export function syncImage(image) {
  const fd = fs.openSync(image, 'r')
  try {
    fs.fdatasyncSync(fd)
  } finally {
    fs.closeSync(fd)
  }
}

export function prepareCache(image, backend) {
  syncImage(image)
  if (backend.cache === 'writeback') {
    // Page-cache mode measures the page cache: start with the whole image in it.
    run('dd', [`if=${image}`, 'of=/dev/null', 'bs=1M', 'status=none'])
  } else {
    // O_DIRECT mode measures the disk: drop the image's cached pages.
    run('dd', [`if=${image}`, 'iflag=nocache', 'count=0', 'status=none'])
  }
}
