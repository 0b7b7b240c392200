/**
 * FuseExport end to end: real FUSE mounts driven by real clients (cmp, dd, qemu-img, qemu-io,
 * stat, findmnt) and by Node's own fs.
 */
import { spawnSync } from 'node:child_process'
import { chmod, open, readFile, stat, symlink, writeFile } from 'node:fs/promises'
import { join } from 'node:path'

import test from 'ava'

import { FuseExport } from '../ts/index.js'
import { assertE2eEnvironment } from './helpers/env.js'
import { imageFixture, withExport } from './helpers/exports.js'
import { KiB, MiB } from './helpers/files.js'
import { isMounted } from './helpers/mounts.js'
import { mustRun, run } from './helpers/run.js'

test.before(() => {
  assertE2eEnvironment(['cmp', 'dd', 'stat', 'findmnt', 'qemu-img', 'qemu-io'])
})

async function mountOptions(path: string): Promise<string[]> {
  const { stdout } = await mustRun('findmnt', ['-n', '-o', 'OPTIONS', path])
  return stdout.trim().split(',')
}

test('reading the export equals the image byte for byte (cmp and a Node read)', async (t) => {
  const f = await imageFixture(t, 4 * MiB + 3 * KiB)
  await withExport({ source: f.image, mountpoint: f.mountpoint }, async (exp) => {
    t.true(await isMounted(f.mountpoint))
    t.is(exp.size, f.data.length)
    const { stdout } = await mustRun('stat', ['-c', '%s %F', f.mountpoint])
    t.is(stdout.trim(), `${f.data.length} regular file`)
    await mustRun('cmp', [f.image, f.mountpoint])
    t.true((await readFile(f.mountpoint)).equals(f.data), 'Node reads the same bytes')
    // A read straddling the end is short, not an error.
    const fh = await open(f.mountpoint, 'r')
    try {
      const buf = Buffer.alloc(64 * KiB)
      const { bytesRead } = await fh.read(buf, 0, buf.length, f.data.length - 1000)
      t.is(bytesRead, 1000)
      t.true(buf.subarray(0, 1000).equals(f.data.subarray(-1000)))
    } finally {
      await fh.close()
    }
  })
})

test('qemu-img compare -f raw -F raw of the export and the image says identical', async (t) => {
  const f = await imageFixture(t, 8 * MiB)
  await withExport({ source: f.image, mountpoint: f.mountpoint }, async () => {
    const r = await mustRun('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', f.mountpoint, f.image])
    t.regex(r.stdout, /Images are identical/)
  })
})

test('a dd write (conv=notrunc) through a writable export lands in the image', async (t) => {
  const f = await imageFixture(t, 4 * MiB)
  const patch = Buffer.alloc(128 * KiB, 0xa5)
  const patchFile = join(f.dir, 'patch')
  await writeFile(patchFile, patch)
  await withExport({ source: f.image, mountpoint: f.mountpoint, writable: true }, async () => {
    t.true((await mountOptions(f.mountpoint)).includes('rw'))
    await mustRun('dd', [`if=${patchFile}`, `of=${f.mountpoint}`, 'bs=64k', 'seek=5', 'conv=notrunc', 'status=none'])
    await mustRun('cmp', [f.image, f.mountpoint])
  })
  const expected = Buffer.from(f.data)
  patch.copy(expected, 5 * 64 * KiB)
  t.true((await readFile(f.image)).equals(expected), 'the image has the write and nothing else changed')
})

test("qemu-io 'write -P 42 1M 64k' through the export lands in the image", async (t) => {
  const f = await imageFixture(t, 4 * MiB)
  await withExport({ source: f.image, mountpoint: f.mountpoint, writable: true }, async () => {
    const w = await mustRun('qemu-io', ['-f', 'raw', '-c', 'write -P 42 1M 64k', f.mountpoint])
    t.regex(w.stdout, /wrote 65536\/65536 bytes at offset 1048576/)
  })
  const r = await run('qemu-io', ['-f', 'raw', '-c', 'read -P 42 1M 64k', f.image])
  t.is(r.code, 0, r.stdout + r.stderr)
  t.notRegex(r.stdout, /Pattern verification failed/)
  const image = await readFile(f.image)
  t.true(image.subarray(0, MiB).equals(f.data.subarray(0, MiB)), 'bytes before the write are untouched')
  t.true(image.subarray(MiB + 64 * KiB).equals(f.data.subarray(MiB + 64 * KiB)), 'bytes after the write are untouched')
})

test('a read-only export refuses writes', async (t) => {
  const f = await imageFixture(t, 2 * MiB)
  await withExport({ source: f.image, mountpoint: f.mountpoint }, async (exp) => {
    t.false(exp.options.writable)
    t.true((await mountOptions(f.mountpoint)).includes('ro'))
    const err = await t.throwsAsync(open(f.mountpoint, 'r+'))
    t.true(['EROFS', 'EACCES'].includes((err as NodeJS.ErrnoException).code ?? ''), `open for write: ${err?.message}`)
    const dd = await run('dd', [
      'if=/dev/zero',
      `of=${f.mountpoint}`,
      'bs=4k',
      'count=1',
      'conv=notrunc',
      'status=none',
    ])
    t.not(dd.code, 0)
    t.regex(dd.stderr, /Read-only file system|Permission denied/)
  })
  t.true((await readFile(f.image)).equals(f.data), 'the image is unchanged')
})

test('close() leaves the mountpoint as the plain file it was', async (t) => {
  const f = await imageFixture(t, 2 * MiB)
  const content = 'I am the plain file under the export.\n'
  await writeFile(f.mountpoint, content)
  await chmod(f.mountpoint, 0o640)
  const before = await stat(f.mountpoint)
  await withExport({ source: f.image, mountpoint: f.mountpoint, writable: true }, async () => {
    const during = await stat(f.mountpoint)
    t.is(during.size, 2 * MiB, 'while exported, the path shows the image')
    t.not(during.ino, before.ino)
  })
  t.false(await isMounted(f.mountpoint), 'findmnt finds nothing on the mountpoint')
  const after = await stat(f.mountpoint)
  t.is(after.ino, before.ino)
  t.is(after.size, before.size)
  t.is(after.mode, before.mode)
  t.is(after.mtimeMs, before.mtimeMs)
  t.is(await readFile(f.mountpoint, 'utf8'), content)
})

test('await using closes the export when the scope ends', async (t) => {
  const f = await imageFixture(t, MiB)
  let exp: FuseExport | undefined
  {
    await using scoped = await FuseExport.create({ source: f.image, mountpoint: f.mountpoint })
    exp = scoped
    t.true(await isMounted(f.mountpoint))
    t.false(scoped.closed)
  }
  t.true(exp.closed)
  t.false(await isMounted(f.mountpoint))
})

test("close() is idempotent, concurrent calls share one promise, 'close' fires once after unmount", async (t) => {
  const f = await imageFixture(t, MiB)
  const exp = await FuseExport.create({ source: f.image, mountpoint: f.mountpoint })
  const seen: Array<number | null> = []
  exp.on('close', () => {
    // findmnt exits 1 when nothing is mounted there.
    seen.push(spawnSync('findmnt', ['-n', f.mountpoint]).status)
  })
  const first = exp.close()
  const second = exp.close()
  t.is(first, second)
  await first
  await exp.close()
  await exp[Symbol.asyncDispose]()
  t.deepEqual(seen, [1], "'close' fired exactly once, after the unmount")
  t.true(exp.closed)
  t.is(exp.size, MiB, 'the last size stays readable after close')
})

test('several exports in one process work independently', async (t) => {
  const a = await imageFixture(t, 2 * MiB)
  const b = await imageFixture(t, 3 * MiB)
  const c = await imageFixture(t, MiB)
  const ea = await FuseExport.create({ source: a.image, mountpoint: a.mountpoint })
  const eb = await FuseExport.create({ source: b.image, mountpoint: b.mountpoint, writable: true, threads: 2 })
  const ec = await FuseExport.create({ source: { null: '5M' }, mountpoint: c.mountpoint })
  try {
    await Promise.all([
      mustRun('cmp', [a.image, a.mountpoint]),
      mustRun('cmp', [b.image, b.mountpoint]),
      mustRun('cmp', ['-n', String(5 * MiB), c.mountpoint, '/dev/zero']),
    ])
    t.deepEqual([ea.size, eb.size, ec.size], [2 * MiB, 3 * MiB, 5 * MiB])
    await mustRun('dd', ['if=/dev/zero', `of=${b.mountpoint}`, 'bs=4k', 'count=1', 'conv=notrunc', 'status=none'])
    await ea.close()
    t.false(await isMounted(a.mountpoint))
    t.true(await isMounted(b.mountpoint), 'closing one export leaves the others mounted')
    await mustRun('cmp', [b.image, b.mountpoint])
    await mustRun('cmp', ['-n', String(5 * MiB), c.mountpoint, '/dev/zero'])
  } finally {
    await Promise.all([ea.close(), eb.close(), ec.close()])
  }
  t.true((await readFile(a.image)).equals(a.data))
  const bImage = await readFile(b.image)
  t.true(bImage.subarray(0, 4 * KiB).equals(Buffer.alloc(4 * KiB)), 'the write went to b')
  t.true(bImage.subarray(4 * KiB).equals(b.data.subarray(4 * KiB)))
  t.true((await readFile(c.image)).equals(c.data))
})

test('a null backend reads zeros, has the requested size and drops writes', async (t) => {
  const f = await imageFixture(t, KiB)
  await withExport({ source: { null: 16 * MiB + 512 }, mountpoint: f.mountpoint, writable: true }, async (exp) => {
    t.is(exp.options.format, 'null')
    t.is(exp.size, 16 * MiB + 512)
    t.is((await stat(f.mountpoint)).size, 16 * MiB + 512)
    await mustRun('cmp', ['-n', String(16 * MiB + 512), f.mountpoint, '/dev/zero'])
    const data = await readFile(f.mountpoint)
    t.is(data.length, 16 * MiB + 512)
    t.true(data.every((byte) => byte === 0))
    await mustRun('dd', ['if=/dev/urandom', `of=${f.mountpoint}`, 'bs=4k', 'count=4', 'conv=notrunc', 'status=none'])
    await mustRun('cmp', ['-n', String(16 * KiB), f.mountpoint, '/dev/zero'])
  })
  await withExport({ source: { null: '1G' }, mountpoint: f.mountpoint }, async (exp) => {
    t.is(exp.size, 1024 ** 3)
    const { stdout } = await mustRun('qemu-img', ['info', '-f', 'raw', '--output=json', f.mountpoint])
    t.is((JSON.parse(stdout) as { 'virtual-size': number })['virtual-size'], 1024 ** 3)
  })
})

test('exporting on the image itself shows its old content', async (t) => {
  const f = await imageFixture(t, 2 * MiB)
  await withExport({ source: f.image, mountpoint: f.image }, async (exp) => {
    t.is(exp.mountpoint, f.image)
    t.true(await isMounted(f.image))
    t.true((await readFile(f.image)).equals(f.data))
  })
  t.false(await isMounted(f.image))
  t.true((await readFile(f.image)).equals(f.data))
})

test('paths are resolved to real paths and allowOther is resolved', async (t) => {
  const f = await imageFixture(t, MiB)
  const imageLink = join(f.dir, 'image-link')
  const mountLink = join(f.dir, 'mount-link')
  await symlink(f.image, imageLink)
  await symlink(f.mountpoint, mountLink)
  await withExport({ source: imageLink, mountpoint: mountLink }, async (exp) => {
    t.is(exp.options.source, f.image)
    t.is(exp.mountpoint, f.mountpoint)
    t.is(exp.options.allowOther, 'auto')
    t.true(exp.allowOther, 'root may always mount with allow_other')
    t.true((await fsOptions(f.mountpoint)).includes('allow_other'))
  })
  await withExport({ source: f.image, mountpoint: f.mountpoint, allowOther: 'off' }, async (exp) => {
    t.false(exp.allowOther)
    t.false((await fsOptions(f.mountpoint)).includes('allow_other'))
  })
})

async function fsOptions(path: string): Promise<string[]> {
  const { stdout } = await mustRun('findmnt', ['-n', '-o', 'FS-OPTIONS', path])
  return stdout.trim().split(',')
}

test('threads: 4 serves concurrent readers like one thread', async (t) => {
  const f = await imageFixture(t, 16 * MiB)
  await withExport({ source: f.image, mountpoint: f.mountpoint, threads: 4 }, async (exp) => {
    t.is(exp.options.threads, 4)
    await Promise.all(Array.from({ length: 4 }, () => mustRun('cmp', [f.image, f.mountpoint])))
  })
})

test('cache none with writethrough: aligned writes land in the image', async (t) => {
  const f = await imageFixture(t, 4 * MiB)
  await withExport(
    { source: f.image, mountpoint: f.mountpoint, writable: true, cache: 'none', writethrough: true },
    async () => {
      await mustRun('qemu-io', ['-f', 'raw', '-c', 'write -P 7 64k 64k', f.mountpoint])
      await mustRun('cmp', [f.image, f.mountpoint])
    },
  )
  const r = await run('qemu-io', ['-f', 'raw', '-c', 'read -P 7 64k 64k', f.image])
  t.is(r.code, 0, r.stdout + r.stderr)
})
