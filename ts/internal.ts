/**
 * A hook that lets ts/testing.ts build a {@link FuseExport} on a native export of its choosing (a
 * fake device). Not public: ts/index.ts exports nothing from here and package.json exports only
 * `"."`.
 *
 * @module
 */
import type { FuseExport } from './index.js'
import type { NativeEventCallback, NativeExport, NativeExportConfig } from './native.js'
import type { FuseExportOptions } from './options.js'

/** Starts the native side of an export: a mount, or (tests) a fake device. */
export type StartNative = (
  config: NativeExportConfig,
  onEvent: NativeEventCallback,
) => NativeExport | Promise<NativeExport>

/** Filled in by FuseExport's static initialiser. */
export const internals: {
  /** {@link FuseExport.create} with `start` instead of a mount. */
  open?: (options: FuseExportOptions, start: StartNative) => Promise<FuseExport>
} = {}
