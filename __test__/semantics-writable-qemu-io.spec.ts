/**
 * iotest 308 "Writable export": `qemu-io -c 'write -P 42 1M 64k'` through the export lands in the
 * image, and nothing else changes.
 */
import { readFile } from 'node:fs/promises'

import test from 'ava'

import { assertE2eEnvironment } from './helpers/env.js'
import { imageFixture } from './helpers/exports.js'
import { KiB, MiB } from './helpers/files.js'
import { client, openExport } from './helpers/semantics.js'

test.before(() => {
  assertE2eEnvironment(['qemu-io', 'findmnt'])
})

test("qemu-io 'write -P 42 1M 64k' through a writable export lands in the image", async (t) => {
  const f = await imageFixture(t, 4 * MiB)
  const exp = await openExport(t, { source: f.image, mountpoint: f.mountpoint, writable: true })
  const w = await client('qemu-io', ['-f', 'raw', '-c', 'write -P 42 1M 64k', f.mountpoint])
  t.is(w.code, 0, w.stdout + w.stderr)
  t.regex(w.stdout, /^wrote 65536\/65536 bytes at offset 1048576$/m)
  const through = await client('qemu-io', ['-f', 'raw', '-c', 'read -P 42 1M 64k', f.mountpoint])
  t.regex(through.stdout, /^read 65536\/65536 bytes at offset 1048576$/m, 'read back through the export')
  t.notRegex(through.stdout + through.stderr, /Pattern verification failed/)
  await exp.close()

  const r = await client('qemu-io', ['-f', 'raw', '-c', 'read -P 42 1M 64k', f.image])
  t.is(r.code, 0, r.stdout + r.stderr)
  t.regex(r.stdout, /^read 65536\/65536 bytes at offset 1048576$/m, 'read back from the image after close')
  t.notRegex(r.stdout + r.stderr, /Pattern verification failed/)
  const expected = Buffer.from(f.data)
  expected.fill(42, MiB, MiB + 64 * KiB)
  t.true((await readFile(f.image)).equals(expected), 'the image has the write and nothing else changed')
})
