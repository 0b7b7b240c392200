/**
 * The only module that loads the napi-rs binding. It declares the binding's shape, loads it lazily
 * (so that option validation and the CLI's `--help` work without it) and turns native errors into
 * {@link BlockfuseError}s. Nothing here makes policy decisions.
 *
 * @module
 */
import { createRequire } from 'node:module'

import { BlockfuseError, isBlockfuseErrorCode } from './errors.js'
import type { ServedFormat } from './options.js'
import { loadFailureContext, loadFailureMessage } from './platform.js'

/** Configuration handed to the native core; every path is absolute and already checked. */
export interface NativeExportConfig {
  format: string
  source?: string
  nullSize?: number
  mountpoint: string
  writable: boolean
  growable: boolean
  allowOther: boolean
  threads: number
  cache: string
  writethrough: boolean
  /** 'auto' | 'on' | 'off' */
  ioUring: string
  /** 'auto' | 'on' | 'off' */
  passthrough: string
  /** 'auto' | 'on' | 'off' */
  locking: string
  forceShare: boolean
  /** An NBD source (then `source` and `nullSize` are unset). */
  nbd?: NativeNbdConfig
  /** A slice: bytes from `offset` (`size` of them, or to the end), or partition N. */
  offset?: number
  size?: number
  partition?: number
  snapshot?: boolean
  /** Absolute path of the qcow2 overlay. */
  overlay?: string
}

/** An NBD source as the native core takes it. */
export interface NativeNbdConfig {
  uri: string
  tlsCa?: string
  tlsCert?: string
  tlsKey?: string
  tlsServerName?: string
  connectTimeoutMs: number
  reconnectDelayMs: number
  requestTimeoutMs: number
}

/** An asynchronous notification from the native core (today only `halt`). */
export interface NativeEvent {
  kind: string
  reason: string
}

/** Counters of a native export since it started; all zero once it is closed. */
export interface NativeStats {
  /** Requests served, by FUSE opcode name (`READ`, `WRITE`, `GETATTR`, ...); only nonzero entries. */
  requests: Record<string, number>
  bytesRead: number
  bytesWritten: number
  /** Requests answered with an error, except `ENOSYS`. */
  errors: number
  /** Requests answered `ENOSYS` (operations not implemented by design, e.g. `STATX`). */
  unsupported: number
  /** Requests being served right now, one entry per queue. */
  inFlight: number[]
  /** Requests each queue has taken in since the start, one entry per queue. */
  served: number[]
  /** Replies that could not be sent to the kernel (logged; should stay 0). */
  lostReplies: number
}

/** Receives the native core's events; `err` is set if the event could not be converted. */
export type NativeEventCallback = (err: Error | null, event: NativeEvent) => void

/** A mounted export owned by the native core. */
export interface NativeExport {
  close(): Promise<void>
  stats(): NativeStats
  readonly size: number
  /** 'raw' | 'qcow2' | 'vmdk' | 'null': the format served ('' once closed). */
  readonly format: string
  /** Whether requests come through FUSE-over-io_uring (false once closed). */
  readonly ioUring: boolean
  /** With ioUring 'auto' served by read(2): why io_uring was not used; else null. */
  readonly ioUringFallback: string | null
  /** Whether opens may go straight to the image (FUSE passthrough; false once closed). */
  readonly passthrough: boolean
  /** With passthrough 'auto' not used: why; else null. */
  readonly passthroughFallback: string | null
  /** For an export made by `startFakeDevice`: the socket end that stands in for the kernel; else null. */
  readonly fakeDevicePeerFd: number | null
}

export interface NativeExportStatic {
  mount(config: NativeExportConfig, onEvent: NativeEventCallback): Promise<NativeExport>
  startFakeDevice(config: NativeExportConfig, onEvent: NativeEventCallback): NativeExport
}

interface NativeBinding {
  NativeExport?: NativeExportStatic
  version(): string
}

let binding: NativeBinding | undefined

function load(): NativeBinding {
  if (binding === undefined) {
    try {
      // ts/ compiles to dist/; from either directory the binding is one level up.
      binding = createRequire(import.meta.url)('../native/binding.cjs') as NativeBinding
    } catch (err) {
      const reason = err instanceof Error ? err.message : String(err)
      throw new BlockfuseError('NATIVE_LOAD_FAILED', loadFailureMessage(loadFailureContext(), reason), { cause: err })
    }
  }
  return binding
}

const NATIVE_MESSAGE = /^([A-Z][A-Z0-9_]*): ([\s\S]*)$/

/**
 * Turns anything thrown by the native core into a {@link BlockfuseError}: a message of the form
 * `CODE: human message` becomes `code` and `message`; anything else is `INTERNAL`.
 */
export function toBlockfuseError(err: unknown): BlockfuseError {
  if (err instanceof BlockfuseError) return err
  const message = err instanceof Error ? err.message : String(err)
  const match = NATIVE_MESSAGE.exec(message)
  const code = match?.[1]
  if (isBlockfuseErrorCode(code)) return new BlockfuseError(code, match![2]!, { cause: err })
  // A code this version does not know (or none) keeps the whole message, code prefix included.
  return new BlockfuseError('INTERNAL', message, { cause: err })
}

function nativeStatic<K extends keyof NativeExportStatic>(method: K): NativeExportStatic {
  const { NativeExport } = load()
  if (typeof NativeExport?.[method] !== 'function') {
    throw new BlockfuseError(
      'NATIVE_LOAD_FAILED',
      `the native binding has no NativeExport.${method}; rebuild it with \`npm run build:native\``,
    )
  }
  return NativeExport
}

/** Mounts an export; rejects with a {@link BlockfuseError}. */
export async function nativeMount(config: NativeExportConfig, onEvent: NativeEventCallback): Promise<NativeExport> {
  const NativeExport = nativeStatic('mount')
  try {
    return await NativeExport.mount(config, onEvent)
  } catch (err) {
    throw toBlockfuseError(err)
  }
}

/**
 * Serves an export over a fake device (a socketpair standing in for the kernel) instead of a
 * mount; for tests only. Throws a {@link BlockfuseError}.
 */
export function nativeStartFakeDevice(config: NativeExportConfig, onEvent: NativeEventCallback): NativeExport {
  const NativeExport = nativeStatic('startFakeDevice')
  try {
    return NativeExport.startFakeDevice(config, onEvent)
  } catch (err) {
    throw toBlockfuseError(err)
  }
}

/** Closes a native export; rejects with a {@link BlockfuseError}. */
export async function nativeClose(native: NativeExport): Promise<void> {
  try {
    await native.close()
  } catch (err) {
    throw toBlockfuseError(err)
  }
}

/** Version of the native core. */
export function nativeVersion(): string {
  return load().version()
}

/** The format `native` serves, checked (the native core names it; 'auto' never reaches here). */
export function nativeFormat(native: NativeExport): ServedFormat {
  const format = native.format
  if (format === 'raw' || format === 'qcow2' || format === 'vmdk' || format === 'null') return format
  throw new BlockfuseError('INTERNAL', `the native core reports an unknown format "${format}"`)
}
