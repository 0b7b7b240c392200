/** `npm start`: the demo creates its image on first run, exports it writable, and Ctrl-C unmounts. */
import { spawn } from 'node:child_process'
import { mkdir, readFile, stat } from 'node:fs/promises'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'

import test from 'ava'

import { assertCliBuilt } from './helpers/cli.js'
import { assertE2eEnvironment } from './helpers/env.js'
import { MiB, tempDir } from './helpers/files.js'
import { isMounted } from './helpers/mounts.js'
import { mustRun, run } from './helpers/run.js'

const DEMO = fileURLToPath(new URL('../dist/demo.js', import.meta.url))

test.before(() => {
  assertCliBuilt()
  assertE2eEnvironment(['cmp', 'dd', 'findmnt', 'mount', 'umount', 'sfdisk', 'mkfs.ext4'])
})

/** Runs the demo in `cwd` until it says how to use the export, lets `use` run, then sends `signal`. */
async function runDemo(
  cwd: string,
  signal: NodeJS.Signals,
  use: () => Promise<void>,
): Promise<{ code: number | null; stdout: string; stderr: string }> {
  const child = spawn(process.execPath, [DEMO], { cwd, stdio: ['ignore', 'pipe', 'pipe'] })
  let stdout = ''
  let stderr = ''
  child.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d))
  const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)))
  try {
    await new Promise<void>((resolve, reject) => {
      const timer = setTimeout(
        () => reject(new Error(`the demo did not get ready in 60 s\n${stdout}\n${stderr}`)),
        60_000,
      )
      child.stdout.setEncoding('utf8').on('data', (d: string) => {
        stdout += d
        if (stdout.includes('Ctrl-C')) {
          clearTimeout(timer)
          resolve()
        }
      })
      child.on('exit', (code) => {
        clearTimeout(timer)
        reject(new Error(`the demo exited (${code}) before it was ready\n${stdout}\n${stderr}`))
      })
    })
    await use()
  } finally {
    child.kill(signal)
  }
  return { code: await exited, stdout, stderr }
}

test('the demo creates its image, exports it writable, and SIGINT / SIGTERM unmount it', async (t) => {
  const dir = await tempDir(t)
  const image = join(dir, 'blockfuse-demo.raw')
  const mountpoint = join(dir, 'blockfuse-demo.mnt')
  t.teardown(async () => {
    if (await isMounted(mountpoint)) await run('umount', ['-l', mountpoint])
  })

  const fsDir = join(dir, 'fs')
  await mkdir(fsDir)
  t.teardown(async () => {
    if (await isMounted(fsDir)) await run('umount', ['-l', fsDir])
  })
  const first = await runDemo(dir, 'SIGINT', async () => {
    t.true(await isMounted(mountpoint))
    await mustRun('cmp', [image, mountpoint])
    // What the hints print: the partition table and the ext4 file system, read through the export.
    const table = await mustRun('sfdisk', ['--dump', mountpoint])
    t.regex(table.stdout, /label: dos/)
    t.regex(table.stdout, /start=\s*2048, size=\s*129024, type=83/)
    await mustRun('mount', ['-o', 'ro,loop,offset=1048576', mountpoint, fsDir])
    t.regex(await readFile(join(fsDir, 'hello.txt'), 'utf8'), /^Hello from inside blockfuse-demo\.raw!/)
    await mustRun('umount', [fsDir])
    await mustRun('sh', ['-c', `printf 'hello' | dd of='${mountpoint}' bs=1 seek=4096 conv=notrunc status=none`])
  })
  t.is(first.code, 0, first.stderr)
  t.regex(first.stdout, /created blockfuse-demo\.raw/)
  t.regex(first.stdout, /cmp blockfuse-demo\.raw blockfuse-demo\.mnt/)
  t.regex(first.stdout, /qemu-img info/)
  t.regex(first.stdout, /mount -o ro,loop,offset=1048576 blockfuse-demo\.mnt/)
  t.regex(first.stdout, /losetup -P -r --show -f blockfuse-demo\.mnt/)
  t.false(await isMounted(mountpoint))
  t.is((await stat(mountpoint)).size, 0, 'the mountpoint is an empty plain file again')

  const data = await readFile(image)
  t.is(data.length, 64 * MiB)
  t.is(data.readUInt16LE(510), 0xaa55, 'an MBR boot signature')
  t.is(data.readUInt16LE(1048576 + 1024 + 56), 0xef53, 'the ext4 superblock magic at the partition start')
  t.is(data.subarray(4096, 4101).toString(), 'hello', 'the write through the export landed in the image')

  // Second run: the image (with the write) is reused, not recreated.
  const second = await runDemo(dir, 'SIGTERM', async () => {
    await mustRun('cmp', [image, mountpoint])
  })
  t.is(second.code, 0, second.stderr)
  t.notRegex(second.stdout, /created/)
  t.is((await readFile(image)).subarray(4096, 4101).toString(), 'hello')
  t.false(await isMounted(mountpoint))
})
