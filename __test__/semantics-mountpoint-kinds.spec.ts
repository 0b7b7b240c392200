/**
 * iotest 308 "Mount point checks": an export needs an existing regular file to mount on. A
 * missing path and a directory are refused before anything is mounted; a regular file works.
 */
import { mkdir, readdir, stat } from 'node:fs/promises'
import { join } from 'node:path'

import test from 'ava'

import { FuseExport, isBlockfuseError } from '../ts/index.js'
import { assertE2eEnvironment } from './helpers/env.js'
import { imageFixture } from './helpers/exports.js'
import { MiB } from './helpers/files.js'
import { isMounted } from './helpers/mounts.js'
import { mustClient, openExport, statField } from './helpers/semantics.js'

test.before(() => {
  assertE2eEnvironment(['cmp', 'stat', 'findmnt'])
})

test('a missing mountpoint is refused with MOUNTPOINT_NOT_FOUND and nothing is mounted', async (t) => {
  const f = await imageFixture(t, MiB)
  const missing = join(f.dir, 'does-not-exist')
  const err = await t.throwsAsync(FuseExport.create({ source: f.image, mountpoint: missing }))
  t.true(isBlockfuseError(err, 'MOUNTPOINT_NOT_FOUND'), `code: ${(err as { code?: string }).code}, ${err?.message}`)
  t.true(err!.message.includes(missing), 'the message names the path')
  t.false(await isMounted(missing))
  t.deepEqual(new Set(await readdir(f.dir)), new Set(['img.raw', 'mnt']), 'create() did not create the mountpoint')
})

test('a directory as mountpoint is refused with MOUNTPOINT_NOT_FILE and nothing is mounted', async (t) => {
  const f = await imageFixture(t, MiB)
  const dir = join(f.dir, 'a-directory')
  await mkdir(dir)
  const err = await t.throwsAsync(FuseExport.create({ source: f.image, mountpoint: dir }))
  t.true(isBlockfuseError(err, 'MOUNTPOINT_NOT_FILE'), `code: ${(err as { code?: string }).code}, ${err?.message}`)
  t.true(err!.message.includes(dir), 'the message names the path')
  t.false(await isMounted(dir))
  t.true((await stat(dir)).isDirectory(), 'the directory is untouched')
})

test('a regular file as mountpoint works: it shows the image while exported', async (t) => {
  const f = await imageFixture(t, 3 * MiB)
  const exp = await openExport(t, { source: f.image, mountpoint: f.mountpoint })
  t.true(await isMounted(f.mountpoint))
  t.is(exp.mountpoint, f.mountpoint)
  t.is(await statField(f.mountpoint, '%s %F'), `${3 * MiB} regular file`)
  await mustClient('cmp', [f.image, f.mountpoint])
  await exp.close()
  t.false(await isMounted(f.mountpoint))
})
