/**
 * Issue 7, other users of a root export: without allow-other, another user (`nobody`, through
 * setpriv) gets EACCES on the export whatever its mode; with allow-other, access follows the
 * file mode (chmod through the export); the mount is always nosuid,nodev. A control file with the
 * same mode in the same directory shows that the refusals are the export's, not the directory's.
 */
import { chmod, writeFile } from 'node:fs/promises'
import { join } from 'node:path'

import test from 'ava'

import { assertE2eEnvironment } from './helpers/env.js'
import { imageFixture, type ImageFixture } from './helpers/exports.js'
import { MiB } from './helpers/files.js'
import { NOBODY, runAs } from './helpers/reliability.js'
import { mustClient, openExport } from './helpers/semantics.js'

test.before(() => {
  assertE2eEnvironment(['setpriv', 'python3', 'findmnt'])
})

/** As `nobody`: the result of open(O_RDONLY), open(O_WRONLY) and stat, and the first 4 KiB's hex. */
const ACCESS = String.raw`
import errno, os, sys
def attempt(flags):
    try:
        fd = os.open(sys.argv[1], flags)
    except OSError as e:
        return errno.errorcode[e.errno], ''
    try:
        return 'ok', (os.read(fd, 4096).hex() if flags == os.O_RDONLY else '')
    finally:
        os.close(fd)
r, data = attempt(os.O_RDONLY)
w, _ = attempt(os.O_WRONLY)
try:
    os.stat(sys.argv[1])
    s = 'ok'
except OSError as e:
    s = errno.errorcode[e.errno]
print(r, w, s, data)
`

interface Access {
  read: string
  write: string
  stat: string
  data: string
}

async function asNobody(path: string): Promise<Access> {
  const r = await runAs(NOBODY, 'python3', ['-c', ACCESS, path])
  if (r.code !== 0) throw new Error(`access probe failed: ${r.stderr}`)
  const [read, write, stat, data = ''] = r.stdout.trim().split(' ')
  return { read: read!, write: write!, stat: stat!, data }
}

/** The fixture's directory opened to everyone, and a control file of `mode` beside the mountpoint. */
async function openDir(f: ImageFixture, mode: number): Promise<string> {
  await chmod(f.dir, 0o755)
  const control = join(f.dir, 'control')
  await writeFile(control, f.data.subarray(0, 4096))
  await chmod(control, mode)
  return control
}

async function mountOptions(path: string): Promise<string[]> {
  return (await mustClient('findmnt', ['-n', '-o', 'OPTIONS', path])).stdout.trim().split(',')
}

test('allow-other off: nobody gets EACCES on open and stat, even where the mode would allow it; the mount is nosuid,nodev', async (t) => {
  const f = await imageFixture(t, MiB)
  const control = await openDir(f, 0o644)
  const exp = await openExport(t, { source: f.image, mountpoint: f.mountpoint, writable: true, allowOther: 'off' })
  t.false(exp.allowOther)
  const opts = await mountOptions(f.mountpoint)
  t.true(opts.includes('nosuid') && opts.includes('nodev'), opts.join(','))
  t.false(opts.includes('allow_other'))
  t.deepEqual(await asNobody(control), {
    read: 'ok',
    write: 'EACCES',
    stat: 'ok',
    data: f.data.subarray(0, 4096).toString('hex'),
  })
  t.deepEqual(await asNobody(f.mountpoint), { read: 'EACCES', write: 'EACCES', stat: 'EACCES', data: '' })
})

test('allow-other on: access follows the file mode set through the export (0600, 0644, 0646)', async (t) => {
  const f = await imageFixture(t, MiB)
  await openDir(f, 0o644)
  const exp = await openExport(t, { source: f.image, mountpoint: f.mountpoint, writable: true, allowOther: 'on' })
  t.true(exp.allowOther)
  t.is(exp.allowOtherFallback, undefined)
  const opts = await mountOptions(f.mountpoint)
  t.true(opts.includes('nosuid') && opts.includes('nodev') && opts.includes('allow_other'), opts.join(','))
  const head = f.data.subarray(0, 4096).toString('hex')

  // The default mode of a writable export is 0600: the owner only.
  t.deepEqual(await asNobody(f.mountpoint), { read: 'EACCES', write: 'EACCES', stat: 'ok', data: '' })
  await chmod(f.mountpoint, 0o644)
  t.deepEqual(await asNobody(f.mountpoint), { read: 'ok', write: 'EACCES', stat: 'ok', data: head })
  await chmod(f.mountpoint, 0o646)
  t.deepEqual(await asNobody(f.mountpoint), { read: 'ok', write: 'ok', stat: 'ok', data: head })
  await chmod(f.mountpoint, 0o600)
  t.deepEqual(await asNobody(f.mountpoint), { read: 'EACCES', write: 'EACCES', stat: 'ok', data: '' })
})

test('allow-other on, read-only export: the mode stays 0400 (the ro mount refuses chmod with EROFS), so nobody cannot read it', async (t) => {
  const f = await imageFixture(t, MiB)
  await openDir(f, 0o644)
  await openExport(t, { source: f.image, mountpoint: f.mountpoint, allowOther: 'on' })
  const opts = await mountOptions(f.mountpoint)
  t.true(opts.includes('ro') && opts.includes('nosuid') && opts.includes('nodev'), opts.join(','))
  t.deepEqual(await asNobody(f.mountpoint), { read: 'EACCES', write: 'EROFS', stat: 'ok', data: '' })
  const err = await chmod(f.mountpoint, 0o444).catch((e: NodeJS.ErrnoException) => e)
  t.is((err as NodeJS.ErrnoException | undefined)?.code, 'EROFS')
})

test('allow-other auto as root resolves to on, without a fallback', async (t) => {
  const f = await imageFixture(t, MiB)
  const exp = await openExport(t, { source: f.image, mountpoint: f.mountpoint })
  t.is(exp.options.allowOther, 'auto')
  t.true(exp.allowOther)
  t.is(exp.allowOtherFallback, undefined)
  t.true((await mountOptions(f.mountpoint)).includes('allow_other'))
})
