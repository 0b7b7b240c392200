/**
 * Test support, not public API (package.json exports only `"."`): a {@link FuseExport} served over
 * a fake device instead of a mount, so that tests can feed the real request path with byte
 * streams the kernel never sends (malformed requests that halt the export). Events, the halt
 * policy and close() are FuseExport's own.
 *
 * @module
 */
import { BlockfuseError } from './errors.js'
// Imported as a value: loading index.js runs FuseExport's static initialiser, which fills in `internals`.
import { FuseExport } from './index.js'
import { internals } from './internal.js'
import { nativeStartFakeDevice, type NativeExport } from './native.js'
import type { FuseExportOptions } from './options.js'

/** A {@link FuseExport} on a fake device and the fd that stands in for the kernel. */
export interface FakeDeviceExport {
  exp: FuseExport
  /**
   * One end of an AF_UNIX SOCK_SEQPACKET socketpair: write whole FUSE requests into it, read whole
   * replies from it. Owned by the native export (closed when it is garbage-collected); do not
   * close it.
   */
  peerFd: number
}

/**
 * Creates an export whose requests come from a fake device. Options are validated and checked
 * like for {@link FuseExport.create} (so `mountpoint` must be an existing regular file, and it is
 * claimed in this process's registry until close), but nothing is mounted and the native side
 * serves one queue whatever `threads` says.
 */
export async function createFakeDeviceExport(options: FuseExportOptions): Promise<FakeDeviceExport> {
  const open = internals.open
  if (open === undefined) throw new BlockfuseError('INTERNAL', 'FuseExport did not register its internals')
  let native: NativeExport | undefined
  const exp = await open(options, (config, onEvent) => (native = nativeStartFakeDevice(config, onEvent)))
  const peerFd = native?.fakeDevicePeerFd
  if (!(exp instanceof FuseExport) || typeof peerFd !== 'number') {
    await exp.close()
    throw new BlockfuseError('INTERNAL', 'the native fake-device export has no peer fd')
  }
  return { exp, peerFd }
}
