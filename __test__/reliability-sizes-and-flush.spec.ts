/**
 * Issue 21, cases 3 to 5: a growing write that fails leaves the size as it was; sizes are exact
 * everywhere (above 2^53-1 bytes an image is refused with IMAGE_TOO_LARGE, and what QEMU refuses
 * as too large is refused with QEMU's reason); a read-only export never flushes or syncs its image.
 */
import { open, stat, truncate, writeFile } from 'node:fs/promises'
import { join } from 'node:path'

import test, { type ExecutionContext } from 'ava'

import { FuseExport, isBlockfuseError, type BlockfuseErrorCode } from '../ts/index.js'
import { assertCliBuilt, CliProcess } from './helpers/cli.js'
import { be32, be64, patch, smallTmpfs } from './helpers/damage.js'
import { assertE2eEnvironment } from './helpers/env.js'
import { makeImage, makeMountpoint, MiB, tempDir } from './helpers/files.js'
import { createQcow2 } from './helpers/qcow2.js'
import { client, mustClient, openExport } from './helpers/semantics.js'

test.before(() => {
  assertE2eEnvironment(['qemu-img', 'dd', 'mount', 'umount', 'python3', 'findmnt'])
  assertCliBuilt()
})

const MAX_SAFE = Number.MAX_SAFE_INTEGER

async function refused(t: ExecutionContext, promise: Promise<unknown>, code: BlockfuseErrorCode, pattern: RegExp) {
  const err = await t.throwsAsync(promise)
  t.true(isBlockfuseError(err, code), `${code} expected, got ${String(err)}`)
  t.regex(err?.message ?? '', pattern)
}

test('a read-only export of a file without fsync (/proc) serves, answers fsync, and stops with exit 0', async (t) => {
  const dir = await tempDir(t)
  const m = join(dir, 'm')
  await makeMountpoint(m)
  const cli = new CliProcess(['export', '--format', 'raw', '/proc/version', m])
  t.teardown(() => {
    if (cli.child.exitCode === null) cli.child.kill('SIGKILL')
  })
  await cli.waitForLine(/^ready/)
  const dd = await client('dd', [`if=${m}`, 'of=/dev/null', 'bs=4k'])
  t.is(dd.code, 0, dd.stderr)
  t.notRegex(dd.stderr, /closing|Invalid argument/)
  const fsync = await client('python3', [
    '-c',
    `import os; fd = os.open(${JSON.stringify(m)}, os.O_RDONLY); os.fsync(fd)`,
  ])
  t.is(fsync.code, 0, fsync.stderr)
  const { code } = await cli.stop('SIGTERM')
  t.is(code, 0, cli.stderr)
  t.notRegex(cli.stderr, /flush failed|INTERNAL/)
})

test('sizes up to 2^53-1 are shown exactly: the API, the ready line and the JSON event', async (t) => {
  const dir = await tempDir(t)
  const m = join(dir, 'm')
  await makeMountpoint(m)
  const exp = await openExport(t, { source: { null: MAX_SAFE }, mountpoint: m })
  t.is(exp.size, MAX_SAFE)
  t.is((await stat(m, { bigint: true })).size, BigInt(MAX_SAFE))
  await exp.close()
  for (const json of [false, true]) {
    const cli = new CliProcess(['export', ...(json ? ['--json'] : []), `null:${MAX_SAFE}`, m])
    t.teardown(() => {
      if (cli.child.exitCode === null) cli.child.kill('SIGKILL')
    })
    const line = await cli.waitForLine(json ? /"event":"ready"/ : /^ready/)
    if (json) t.is((JSON.parse(line) as { size: number }).size, MAX_SAFE)
    t.true(line.includes(String(MAX_SAFE)), line)
    t.is((await cli.stop('SIGTERM')).code, 0, cli.stderr)
  }
})

test('images above 2^53-1 bytes are refused with IMAGE_TOO_LARGE (raw on tmpfs, qcow2 up to 2^63-1)', async (t) => {
  const dir = await tempDir(t)
  const fs = await smallTmpfs(t, dir, '1m')
  const m = join(dir, 'm')
  await makeMountpoint(m)
  const raw = join(fs, 'huge.raw')
  await mustClient('truncate', ['-s', String(2 ** 53), raw])
  await refused(
    t,
    FuseExport.create({ source: raw, mountpoint: m, format: 'raw' }),
    'IMAGE_TOO_LARGE',
    /9007199254740992/,
  )
  await truncate(raw, 0)
  t.is((await stat(raw)).size, 0)
  const q = join(dir, 'huge.qcow2')
  for (const size of [2n ** 53n, 2n ** 63n - 1n]) {
    await createQcow2(q, MiB)
    await patch(q, 24, be64(size))
    await refused(t, FuseExport.create({ source: q, mountpoint: m }), 'IMAGE_TOO_LARGE', new RegExp(`${size} bytes`))
    await refused(t, FuseExport.create({ source: q, mountpoint: m, format: 'qcow2' }), 'IMAGE_TOO_LARGE', /2\^53-1/)
  }
})

test('what QEMU refuses as too large is refused at create with QEMU reason', async (t) => {
  const dir = await tempDir(t)
  const m = join(dir, 'm')
  await makeMountpoint(m)
  const q = join(dir, 'q.qcow2')
  const cases: Array<{ what: string; make: () => Promise<void>; reason: RegExp }> = [
    {
      what: 'refcount table clusters (offset 56)',
      make: () => patch(q, 56, be32(1000)),
      reason: /Reference count table too large/,
    },
    { what: 'snapshot count (offset 60)', make: () => patch(q, 60, be32(70000)), reason: /Snapshot table too large/ },
    { what: 'L1 size (offset 36)', make: () => patch(q, 36, be32(5 << 20)), reason: /Active L1 table too large/ },
  ]
  for (const c of cases) {
    await createQcow2(q, MiB)
    await c.make()
    const info = await client('qemu-img', ['info', q])
    t.not(info.code, 0, `qemu-img refuses the ${c.what} too`)
    t.regex(info.stderr, c.reason, `qemu-img's reason for the ${c.what}`)
    await refused(t, FuseExport.create({ source: q, mountpoint: m }), 'SOURCE_OPEN_FAILED', c.reason)
  }
  // 512-byte clusters: a 2^47-byte disk needs an L1 index QEMU cannot hold.
  await createQcow2(q, MiB, { clusterSize: 512 })
  await patch(q, 24, be64(2n ** 47n))
  const info = await client('qemu-img', ['info', q])
  t.regex(info.stderr, /Image is too big/)
  await refused(t, FuseExport.create({ source: q, mountpoint: m }), 'SOURCE_OPEN_FAILED', /Image is too big/)
})

test('a growable export keeps the size when a growing write fails on a full tmpfs; acknowledged data stays', async (t) => {
  const dir = await tempDir(t)
  const fs = await smallTmpfs(t, dir, '8m')
  const image = join(fs, 'grow.raw')
  const data = await makeImage(image, MiB)
  // Fill the tmpfs but for 512 KiB.
  const filler = join(fs, 'filler')
  await writeFile(filler, Buffer.alloc(8 * MiB - MiB - 512 * 1024, 1)).catch(() => undefined)
  const m = join(dir, 'm')
  await makeMountpoint(m)
  await openExport(t, { source: image, mountpoint: m, writable: true, growable: true, format: 'raw' })
  const fh = await open(m, 'r+')
  t.teardown(() => fh.close().catch(() => undefined))
  for (const at of [4 * MiB, 20 * MiB]) {
    const before = (await stat(image)).size
    const payload = Buffer.alloc(2 * MiB, 0x5a)
    let written = 0
    try {
      written = (await fh.write(payload, 0, payload.length, at)).bytesWritten
    } catch (err) {
      t.is((err as NodeJS.ErrnoException).code, 'ENOSPC', String(err))
    }
    t.true(written < payload.length, `the write at ${at} cannot fit (wrote ${written})`)
    const expected = written > 0 ? Math.max(before, at + written) : before
    t.is((await stat(image)).size, expected, `size after the write at ${at}`)
    t.is((await stat(m)).size, expected, `size through the export after the write at ${at}`)
    if (written > 0) {
      const back = Buffer.alloc(written)
      await fh.read(back, 0, written, at)
      t.true(back.equals(payload.subarray(0, written)), 'the acknowledged part reads back')
    }
  }
  const head = Buffer.alloc(MiB)
  await fh.read(head, 0, MiB, 0)
  t.true(head.equals(data), 'the original data is intact')
  // Past 2^53-1 a growing write fails with EFBIG (the size stays exact).
  const far = await client('python3', [
    '-c',
    `import os; fd = os.open(${JSON.stringify(m)}, os.O_WRONLY); os.pwrite(fd, b"x", ${2 ** 53})`,
  ])
  t.regex(far.stderr, /File too large/)
  await fh.close()
})
