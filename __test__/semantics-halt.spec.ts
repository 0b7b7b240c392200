/**
 * The halt policy in TypeScript (`onHalt`), driven by a real kernel event: aborting the FUSE
 * connection through fusectl (`/sys/fs/fuse/connections/<dev>/abort`). The native core must
 * notice that its /dev/fuse stream ended and report a halt; with `onHalt: 'unmount'` the export
 * then closes itself, with `'keep'` it stays mounted until `close()`.
 *
 * A malformed request stream (short read, length mismatch) cannot be produced through the
 * kernel; that halt is proven over a fake device, by the Rust-level test and, with the same
 * FuseExport policy as here, by halt-fake-device.spec.ts.
 */
import { access, writeFile } from 'node:fs/promises'

import test from 'ava'

import { assertE2eEnvironment } from './helpers/env.js'
import { imageFixture } from './helpers/exports.js'
import { MiB } from './helpers/files.js'
import { isMounted } from './helpers/mounts.js'
import { client, fuseConnectionId, openExport, sizeOf, waitForEvent } from './helpers/semantics.js'

const FUSECTL = '/sys/fs/fuse/connections'

test.before(async () => {
  assertE2eEnvironment(['findmnt', 'mount', 'cat'])
  // systemd mounts fusectl; a bare container may not. Mount it (and leave it: other processes
  // may rely on it as soon as it exists).
  if (!(await isMounted(FUSECTL))) {
    const r = await client('mount', ['-t', 'fusectl', 'fusectl', FUSECTL])
    if (r.code !== 0) throw new Error(`fusectl is not mounted on ${FUSECTL} and mounting it failed: ${r.stderr}`)
  }
})

/** Aborts the FUSE connection of the export mounted on `mountpoint`, as `echo 1 > .../abort` does. */
async function abortConnection(mountpoint: string): Promise<void> {
  const dir = `${FUSECTL}/${await fuseConnectionId(mountpoint)}`
  await access(dir)
  await writeFile(`${dir}/abort`, '1')
}

const HALT_WAIT_MS = 10_000

for (const ioUring of ['off', 'on'] as const) {
  const intake = ioUring === 'on' ? 'io_uring' : 'read(2)'
  test(`onHalt 'unmount' (the default), ${intake}: an aborted connection emits 'halt' with a reason, then the export closes itself`, async (t) => {
    const f = await imageFixture(t, 2 * MiB)
    const exp = await openExport(t, { source: f.image, mountpoint: f.mountpoint, ioUring })
    t.is(exp.ioUring, ioUring === 'on')
    t.is(exp.options.onHalt, 'unmount')
    const closed = waitForEvent<void>(exp, 'close', HALT_WAIT_MS)
    const halted = waitForEvent<string>(exp, 'halt', HALT_WAIT_MS)
    closed.catch(() => undefined)
    await abortConnection(f.mountpoint)

    const reason = await halted
    t.is(typeof reason, 'string')
    t.true(reason.length > 0, 'the halt carries a reason')
    t.is(exp.haltReason, reason)
    await closed
    t.true(exp.closed)
    t.false(await isMounted(f.mountpoint), 'the export unmounted itself')
    t.is(await sizeOf(f.mountpoint), 0, 'the mountpoint is the plain (empty) file again')
  })

  test(`onHalt 'keep', ${intake}: an aborted connection emits 'halt'; the export stays mounted (clients get ENOTCONN) until close()`, async (t) => {
    const f = await imageFixture(t, 2 * MiB)
    const exp = await openExport(t, { source: f.image, mountpoint: f.mountpoint, onHalt: 'keep', ioUring })
    t.is(exp.ioUring, ioUring === 'on')
    let closes = 0
    exp.on('close', () => closes++)
    const halted = waitForEvent<string>(exp, 'halt', HALT_WAIT_MS)
    halted.catch(() => undefined)
    await abortConnection(f.mountpoint)
    // The abort took effect: the kernel fails client requests itself now.
    const r = await client('cat', [f.mountpoint])
    t.not(r.code, 0)
    t.regex(r.stderr, /Transport endpoint is not connected/)

    const reason = await halted
    t.true(reason.length > 0, 'the halt carries a reason')
    // Give a wrongly wired 'unmount' policy the time to act.
    await new Promise((resolve) => setTimeout(resolve, 500))
    t.false(exp.closed, "'keep' does not close")
    t.is(closes, 0)
    t.true(await isMounted(f.mountpoint), 'still mounted')

    await exp.close()
    t.is(closes, 1)
    t.false(await isMounted(f.mountpoint))
    t.is(await sizeOf(f.mountpoint), 0)
  })
}
