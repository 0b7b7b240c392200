/**
 * iotest 308 "Read-only export": the export is mounted `ro`, so the kernel refuses every change
 * with EROFS before the request reaches us (QEMU's series: "It is no longer possible to modify
 * metadata of read-only exports"). The image stays untouched.
 */
import { readFile } from 'node:fs/promises'

import test from 'ava'

import { assertE2eEnvironment } from './helpers/env.js'
import { imageFixture } from './helpers/exports.js'
import { MiB } from './helpers/files.js'
import { client, openExport, sizeOf, statField } from './helpers/semantics.js'

test.before(() => {
  assertE2eEnvironment(['chmod', 'stat', 'truncate', 'qemu-io', 'findmnt'])
})

test('chmod u+w and chmod u+x on a read-only export fail with EROFS; the mode stays 400', async (t) => {
  const f = await imageFixture(t, 2 * MiB)
  await openExport(t, { source: f.image, mountpoint: f.mountpoint })
  t.is(await statField(f.mountpoint, '%a'), '400', 'a read-only export starts as 0400')
  // The VFS answers both (mnt_want_write on an MS_RDONLY mount); +x would be allowed by our
  // SETATTR policy but never reaches it.
  for (const change of ['u+w', 'u+x']) {
    const r = await client('chmod', [change, f.mountpoint])
    t.not(r.code, 0, `chmod ${change} must fail`)
    t.is(r.stderr.trim(), `chmod: changing permissions of '${f.mountpoint}': Read-only file system`, `chmod ${change}`)
    t.is(await statField(f.mountpoint, '%a'), '400', `mode after chmod ${change}`)
  }
})

test("qemu-io 'write' on a read-only export cannot open it: Read-only file system", async (t) => {
  const f = await imageFixture(t, 2 * MiB)
  await openExport(t, { source: f.image, mountpoint: f.mountpoint })
  const r = await client('qemu-io', ['-f', 'raw', '-c', 'write -P 42 1M 64k', f.mountpoint])
  const output = r.stdout + r.stderr
  t.true(output.includes(`Could not open '${f.mountpoint}': Read-only file system`), output)
  t.notRegex(r.stdout, /wrote/)
  t.true((await readFile(f.image)).equals(f.data), 'the image is unchanged')
})

test('truncate -s on a read-only export fails; export and image keep their size', async (t) => {
  const f = await imageFixture(t, 2 * MiB)
  await openExport(t, { source: f.image, mountpoint: f.mountpoint })
  for (const size of [String(MiB), String(4 * MiB)]) {
    const r = await client('truncate', ['-s', size, f.mountpoint])
    t.not(r.code, 0, `truncate -s ${size} must fail`)
    // truncate(1) opens for writing first; the VFS refuses that on the ro mount.
    t.regex(r.stderr, /Read-only file system/, `truncate -s ${size}`)
    t.is(await sizeOf(f.mountpoint), 2 * MiB)
  }
  t.is(await sizeOf(f.image), 2 * MiB)
  t.true((await readFile(f.image)).equals(f.data), 'the image is unchanged')
})
