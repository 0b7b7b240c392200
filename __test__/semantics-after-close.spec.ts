/**
 * iotest 308 "Remove export": once the export is closed the mountpoint is the plain file it was:
 * same inode, size, mode, owner, times and content, and findmnt finds nothing on it. This holds
 * even after the export's own attributes were changed (chmod, truncate, writes).
 */
import { chmod, readFile, stat, writeFile } from 'node:fs/promises'

import test from 'ava'

import { assertE2eEnvironment } from './helpers/env.js'
import { imageFixture } from './helpers/exports.js'
import { MiB } from './helpers/files.js'
import { isMounted } from './helpers/mounts.js'
import { client, mustClient, openExport, statField } from './helpers/semantics.js'

test.before(() => {
  assertE2eEnvironment(['stat', 'chmod', 'truncate', 'dd', 'findmnt'])
})

const STAT_FORMAT = '%i %s %a %u %g %Y %Z %F'

for (const writable of [false, true]) {
  test(`after closing a ${writable ? 'writable' : 'read-only'} export the mountpoint looks exactly as before`, async (t) => {
    const f = await imageFixture(t, 2 * MiB)
    const content = 'the file under the export\n'
    await writeFile(f.mountpoint, content)
    await chmod(f.mountpoint, 0o640)
    const before = await statField(f.mountpoint, STAT_FORMAT)
    const beforeNode = await stat(f.mountpoint)

    const exp = await openExport(t, { source: f.image, mountpoint: f.mountpoint, writable, allowOther: 'on' })
    const during = await statField(f.mountpoint, '%i %s %a')
    t.not(during, before, 'while exported the path shows the export')
    t.is(during.split(' ')[1], String(2 * MiB))
    if (writable) {
      // Change what can be changed through the export; none of it may stick to the file below.
      await mustClient('chmod', ['0644', f.mountpoint])
      await mustClient('dd', ['if=/dev/zero', `of=${f.mountpoint}`, 'bs=4k', 'count=1', 'conv=notrunc', 'status=none'])
      await mustClient('truncate', ['-s', String(MiB), f.mountpoint])
    }
    await exp.close()

    t.false(await isMounted(f.mountpoint), 'findmnt finds nothing on the mountpoint')
    const findmnt = await client('findmnt', ['-n', f.mountpoint])
    t.is(findmnt.stdout, '')
    t.is(await statField(f.mountpoint, STAT_FORMAT), before, `stat -c '${STAT_FORMAT}'`)
    const afterNode = await stat(f.mountpoint)
    t.is(afterNode.mtimeMs, beforeNode.mtimeMs)
    t.is(afterNode.ctimeMs, beforeNode.ctimeMs)
    t.is(await readFile(f.mountpoint, 'utf8'), content)
  })
}
