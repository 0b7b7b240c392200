/**
 * chmod/chown rules (SETATTR mode/uid/gid), as a user observes them. Two layers answer:
 * - the VFS, because of the mount flags: `ro` makes every metadata change EROFS before the
 *   request reaches us; `default_permissions` checks ownership/capabilities (root passes);
 * - the export's SETATTR policy: without allow-other no group/other mode bits (EPERM) and no
 *   uid/gid changes (ENOTSUP); with allow-other both work and GETATTR reports them.
 * A writable export starts as 0600, a read-only one as 0400, owned by the exporting process.
 */
import test from 'ava'

import { assertE2eEnvironment } from './helpers/env.js'
import { imageFixture } from './helpers/exports.js'
import { MiB } from './helpers/files.js'
import { client, mustClient, openExport, statField } from './helpers/semantics.js'

test.before(() => {
  assertE2eEnvironment(['chmod', 'chown', 'stat', 'findmnt'])
})

const UID = process.getuid!()
const GID = process.getgid!()

test('without allowOther: chmod 0600/0700 work, chmod 0640 fails EPERM, chown fails ENOTSUP', async (t) => {
  const f = await imageFixture(t, MiB)
  await openExport(t, { source: f.image, mountpoint: f.mountpoint, writable: true, allowOther: 'off' })
  t.is(await statField(f.mountpoint, '%a %u %g %F'), `600 ${UID} ${GID} regular file`, 'initial attributes')

  await mustClient('chmod', ['0700', f.mountpoint])
  t.is(await statField(f.mountpoint, '%a'), '700', 'owner bits may change')
  await mustClient('chmod', ['0600', f.mountpoint])
  t.is(await statField(f.mountpoint, '%a'), '600')

  // Answered by the export: the VFS lets the owner chmod, our policy refuses group/other bits.
  for (const mode of ['0640', '0604', '0666']) {
    const r = await client('chmod', [mode, f.mountpoint])
    t.not(r.code, 0, `chmod ${mode} must fail`)
    t.is(r.stderr.trim(), `chmod: changing permissions of '${f.mountpoint}': Operation not permitted`, mode)
  }
  t.is(await statField(f.mountpoint, '%a'), '600', 'the mode did not change')

  // Answered by the export: root passes the VFS's CAP_CHOWN check, our policy says ENOTSUP.
  for (const [owner, what] of [
    ['1000', 'ownership'],
    ['1000:1000', 'ownership'],
    [':1000', 'group'],
  ] as const) {
    const r = await client('chown', [owner, f.mountpoint])
    t.not(r.code, 0, `chown ${owner} must fail`)
    t.is(r.stderr.trim(), `chown: changing ${what} of '${f.mountpoint}': Operation not supported`, owner)
  }
  t.is(await statField(f.mountpoint, '%a %u %g'), `600 ${UID} ${GID}`, 'owner and mode unchanged')
})

test("with allowOther 'on': chmod 0644 and chown 1000:1000 work and stat shows them", async (t) => {
  const f = await imageFixture(t, MiB)
  const exp = await openExport(t, { source: f.image, mountpoint: f.mountpoint, writable: true, allowOther: 'on' })
  t.true(exp.allowOther)
  await mustClient('chmod', ['0644', f.mountpoint])
  t.is(await statField(f.mountpoint, '%a'), '644')
  await mustClient('chown', ['1000:1000', f.mountpoint])
  t.is(await statField(f.mountpoint, '%a %u %g %F'), '644 1000 1000 regular file')
  await mustClient('chown', [':2000', f.mountpoint])
  t.is(await statField(f.mountpoint, '%u %g'), '1000 2000', 'a group-only change keeps the owner')
  await mustClient('chmod', ['0660', f.mountpoint])
  t.is(await statField(f.mountpoint, '%a %u %g %F'), '660 1000 2000 regular file', 'the type stays regular')
})

for (const allowOther of ['off', 'on'] as const) {
  test(`read-only export (allowOther ${allowOther}): chmod 0600 and chown fail with EROFS`, async (t) => {
    const f = await imageFixture(t, MiB)
    await openExport(t, { source: f.image, mountpoint: f.mountpoint, allowOther })
    t.is(await statField(f.mountpoint, '%a %u %g'), `400 ${UID} ${GID}`, 'a read-only export starts as 0400')
    // Answered by the VFS: the mount is MS_RDONLY, so SETATTR is never sent.
    for (const mode of ['0600', '0400', '0444']) {
      const r = await client('chmod', [mode, f.mountpoint])
      t.not(r.code, 0, `chmod ${mode} must fail`)
      t.is(r.stderr.trim(), `chmod: changing permissions of '${f.mountpoint}': Read-only file system`, mode)
    }
    const r = await client('chown', ['1000:1000', f.mountpoint])
    t.not(r.code, 0)
    t.is(r.stderr.trim(), `chown: changing ownership of '${f.mountpoint}': Read-only file system`)
    t.is(await statField(f.mountpoint, '%a %u %g'), `400 ${UID} ${GID}`)
  })
}
