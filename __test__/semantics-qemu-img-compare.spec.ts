/**
 * iotest 308 "Compare export with original": `qemu-img compare -f raw -F raw` of the export and
 * the image says identical, for a read-only and for a writable export.
 */
import test from 'ava'

import { assertE2eEnvironment } from './helpers/env.js'
import { imageFixture } from './helpers/exports.js'
import { KiB, MiB } from './helpers/files.js'
import { client, openExport } from './helpers/semantics.js'

test.before(() => {
  assertE2eEnvironment(['qemu-img', 'findmnt'])
})

for (const writable of [false, true]) {
  test(`qemu-img compare of a ${writable ? 'writable' : 'read-only'} export and its image: identical`, async (t) => {
    // An odd size, so that the last request is short.
    const f = await imageFixture(t, 16 * MiB + 3 * KiB)
    await openExport(t, { source: f.image, mountpoint: f.mountpoint, writable })
    const r = await client('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', f.mountpoint, f.image])
    t.is(r.code, 0, `qemu-img compare exited ${r.code}\n${r.stdout}${r.stderr}`)
    t.is(r.stdout.trim(), 'Images are identical.')
  })
}
