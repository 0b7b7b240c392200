/**
 * An open export keeps its Node.js process alive (so clients never see a server vanish under a
 * mount), and once every export is closed nothing does: the process exits by itself.
 */
import { fileURLToPath } from 'node:url'

import test from 'ava'

import { assertCliBuilt } from './helpers/cli.js'
import { assertE2eEnvironment } from './helpers/env.js'
import { imageFixture } from './helpers/exports.js'
import { MiB } from './helpers/files.js'
import { isMounted } from './helpers/mounts.js'
import { run } from './helpers/run.js'

const INDEX = fileURLToPath(new URL('../dist/index.js', import.meta.url))

test.before(() => {
  assertCliBuilt()
  assertE2eEnvironment(['findmnt'])
})

test('the process lives while an export is open and exits by itself after close()', async (t) => {
  const f = await imageFixture(t, MiB)
  t.teardown(async () => {
    if (await isMounted(f.mountpoint)) await run('umount', ['-l', f.mountpoint])
  })
  // The script never calls process.exit: it only ends when its event loop is empty.
  const script = `
    import { FuseExport } from ${JSON.stringify(INDEX)}
    const exp = await FuseExport.create({ source: ${JSON.stringify(f.image)}, mountpoint: ${JSON.stringify(f.mountpoint)} })
    const started = Date.now()
    console.log('open')
    // A timer that is unref'd does not keep the loop alive: only the export can.
    setTimeout(() => { console.log('alive ' + (Date.now() - started)); exp.close().then(() => console.log('closed')) }, 1500).unref()
  `
  const started = Date.now()
  const r = await run(process.execPath, ['--input-type=module', '-e', script], { timeout: 30_000 })
  t.is(r.code, 0, r.stderr)
  const lines = r.stdout.trim().split('\n')
  t.is(lines[0], 'open')
  t.regex(lines[1] ?? '', /^alive \d+$/, 'the open export kept the process alive for the unref()d timer')
  t.is(lines[2], 'closed')
  t.true(Date.now() - started < 25_000, 'the process exited by itself after close()')
  t.false(await isMounted(f.mountpoint))
})
