/**
 * A hook that lets ts/testing.ts build a `FuseExport` on a native export of its choosing (a
 * fake device). Not public: ts/index.ts exports nothing from here and package.json exports only
 * `"."`. Imports point one way: index.ts fills this in, so nothing here names `FuseExport`
 * (testing.ts checks what it gets with `instanceof`).
 *
 * @module
 */
import type { NativeEventCallback, NativeExport, NativeExportConfig } from './native.js'
import type { FuseExportOptions } from './options.js'

/** Starts the native side of an export: a mount, or (tests) a fake device. */
export type StartNative = (
  config: NativeExportConfig,
  onEvent: NativeEventCallback,
) => NativeExport | Promise<NativeExport>

/** What `open` returns: a `FuseExport`, seen only as far as this module needs. */
export interface OpenedExport {
  close(): Promise<void>
}

/** Filled in by FuseExport's static initialiser. */
export const internals: {
  /** `FuseExport.create` with `start` instead of a mount. */
  open?: (options: FuseExportOptions, start: StartNative) => Promise<OpenedExport>
} = {}
