/**
 * blockfuse: export a disk image as one regular file through FUSE.
 *
 * ```ts
 * await using exp = await FuseExport.create({ source: 'disk.raw', mountpoint: 'disk.mnt' })
 * // any program now reads disk.mnt as the raw disk
 * ```
 *
 * @module
 */
import { EventEmitter } from 'node:events'

import { BlockfuseError } from './errors.js'
import { internals, type StartNative } from './internal.js'
import {
  nativeClose,
  nativeFormat,
  nativeMount,
  toBlockfuseError,
  type NativeEvent,
  type NativeExport,
  type NativeExportConfig,
} from './native.js'
import { resolveOptions, type FuseExportOptions, type ResolvedFuseExportOptions, type ServedFormat } from './options.js'
import { claim, release } from './registry.js'

export { BlockfuseError, isBlockfuseError } from './errors.js'
export type { BlockfuseErrorCode, NativeErrorCode, PolicyErrorCode } from './errors.js'
export { normalizeOptions, parseSize, isNbdUri, MAX_THREADS } from './options.js'
export type {
  AllowOther,
  CacheMode,
  ExportFormat,
  FuseExportOptions,
  IoUringMode,
  LockingMode,
  NbdOptions,
  NullSource,
  PassthroughMode,
  ResolvedNbdOptions,
  OnHalt,
  ResolvedFuseExportOptions,
  ServedFormat,
} from './options.js'

/** Events of a {@link FuseExport}. */
export interface FuseExportEvents {
  /** The export is unmounted; the mountpoint is the plain file it was. Emitted once. */
  close: []
  /**
   * The native core halted the export (the kernel stream can no longer be trusted); it serves no
   * more requests. With `onHalt: 'unmount'` (the default) the export then closes itself.
   */
  halt: [reason: string]
  /** Closing after a halt failed (only emitted if someone listens; otherwise a process warning). */
  error: [err: BlockfuseError]
}

/** Counters of an export, from {@link FuseExport.stats}. */
export interface ExportStats {
  /**
   * Requests served since the export started, by FUSE opcode name (`READ`, `WRITE`, `GETATTR`,
   * `SETATTR`, `FLUSH`, ...). Only opcodes seen at least once are present.
   */
  requests: Record<string, number>
  /** Bytes returned to READ requests. */
  bytesRead: number
  /** Bytes accepted from WRITE requests. */
  bytesWritten: number
  /** Requests answered with an error (e.g. `EPERM` for a refused chmod); `ENOSYS` is not one. */
  errors: number
  /**
   * Requests answered `ENOSYS`: operations blockfuse does not implement by design, such as `STATX`
   * (sent by Node's `fs.stat`; the kernel then falls back to `GETATTR`). Not failures.
   */
  unsupported: number
  /** Requests being served right now, one entry per queue (`threads` entries). */
  inFlight: number[]
  /** Requests each queue has taken in since the start, one entry per queue: how the load spread. */
  served: number[]
  /**
   * Replies that could not be written to the kernel (each is also logged to stderr). Should stay 0;
   * anything else means a client waited for an answer that never came.
   */
  lostReplies: number
}

/** The source part of the native configuration: a path, a null size or an NBD source. */
function sourceConfig(resolved: ResolvedFuseExportOptions): Pick<NativeExportConfig, 'source' | 'nullSize' | 'nbd'> {
  const { source, nbd } = resolved
  if (typeof source !== 'string') return { nullSize: source.null }
  if (nbd === undefined) return { source }
  return {
    nbd: {
      uri: source,
      ...(nbd.tlsCa !== undefined ? { tlsCa: nbd.tlsCa } : {}),
      ...(nbd.tlsCert !== undefined ? { tlsCert: nbd.tlsCert } : {}),
      ...(nbd.tlsKey !== undefined ? { tlsKey: nbd.tlsKey } : {}),
      ...(nbd.tlsServerName !== undefined ? { tlsServerName: nbd.tlsServerName } : {}),
      connectTimeoutMs: Math.round(nbd.connectTimeout * 1000),
      reconnectDelayMs: Math.round(nbd.reconnectDelay * 1000),
      requestTimeoutMs: Math.round(nbd.requestTimeout * 1000),
    },
  }
}

function copyStats(stats: ExportStats): ExportStats {
  return {
    requests: { ...stats.requests },
    bytesRead: stats.bytesRead,
    bytesWritten: stats.bytesWritten,
    errors: stats.errors,
    unsupported: stats.unsupported,
    inFlight: [...stats.inFlight],
    served: [...stats.served],
    lostReplies: stats.lostReplies,
  }
}

/**
 * One mounted export. Create it with {@link FuseExport.create}; close it with {@link FuseExport.close}
 * or `await using`. While it is open it keeps the Node.js event loop alive, like a listening server.
 */
export class FuseExport extends EventEmitter<FuseExportEvents> {
  /** Options after validation and defaults, with absolute real paths. */
  readonly options: ResolvedFuseExportOptions
  /** The mountpoint (absolute real path). */
  readonly mountpoint: string
  /** The format served: `'raw'`, `'qcow2'`, `'vmdk'` or `'null'` (what probing found for `format: 'auto'`). */
  readonly format: ServedFormat
  /** Whether the mount uses `allow_other` (how `allowOther: 'auto'` was resolved). */
  readonly allowOther: boolean
  /**
   * Why `allowOther: 'auto'` fell back to off: the error of the mount with `allow_other` (an
   * unprivileged user without `user_allow_other` in /etc/fuse.conf). Undefined when it did not.
   */
  readonly allowOtherFallback: string | undefined
  /**
   * Whether requests come through FUSE-over-io_uring (how `ioUring: 'auto'` was resolved); false
   * means `read(2)` on /dev/fuse.
   */
  readonly ioUring: boolean
  /**
   * With `ioUring: 'auto'` served by `read(2)`: why io_uring was not used (e.g. the kernel's
   * `enable_uring` parameter is off). Undefined when io_uring is used or was not asked for.
   */
  readonly ioUringFallback: string | undefined
  /**
   * Whether FUSE passthrough is used (how `passthrough: 'auto'` was resolved): read-only opens
   * of the exported file then go straight to the image.
   */
  readonly passthrough: boolean
  /**
   * With `passthrough: 'auto'` not used: why (e.g. the export is writable, the image is not raw,
   * or the process lacks CAP_SYS_ADMIN). Undefined when passthrough is used or was not asked for.
   */
  readonly passthroughFallback: string | undefined

  #native: NativeExport
  #closing: Promise<void> | undefined
  #closed = false
  #haltReason: string | undefined
  #lastSize = 0
  /** Taken when closing begins; from then on {@link FuseExport.stats} returns it. */
  #finalStats: ExportStats | undefined
  #keepAlive: NodeJS.Timeout | undefined

  private constructor(
    options: ResolvedFuseExportOptions,
    native: NativeExport,
    allowOther: boolean,
    allowOtherFallback: string | undefined,
  ) {
    super()
    this.options = options
    this.mountpoint = options.mountpoint
    this.allowOther = allowOther
    this.allowOtherFallback = allowOtherFallback
    this.format = nativeFormat(native)
    this.ioUring = native.ioUring
    this.ioUringFallback = options.ioUring === 'auto' ? (native.ioUringFallback ?? undefined) : undefined
    this.passthrough = native.passthrough
    this.passthroughFallback = options.passthrough === 'auto' ? (native.passthroughFallback ?? undefined) : undefined
    this.#native = native
    // A mounted export is like a listening server: the process must not exit under it, or
    // clients would see ENOTCONN until someone unmounts by hand.
    this.#keepAlive = setInterval(() => {}, 2 ** 30)
  }

  /**
   * Validates `options`, checks the source and mountpoint, mounts, and resolves once the kernel
   * can serve requests on the mountpoint. Rejects with a {@link BlockfuseError} whose `code` says
   * why (`INVALID_OPTION`, `SOURCE_NOT_FOUND`, `MOUNTPOINT_IN_USE`, `MOUNT_FAILED`, ...).
   */
  static async create(options: FuseExportOptions): Promise<FuseExport> {
    return FuseExport.#open(options, nativeMount)
  }

  static {
    internals.open = (options, start) => FuseExport.#open(options, start)
  }

  /** {@link FuseExport.create}, with the native side started by `start` (a mount, or a test's fake device). */
  static async #open(options: FuseExportOptions, start: StartNative): Promise<FuseExport> {
    const resolved = await resolveOptions(options)
    const { mountpoint } = resolved
    if (!claim(mountpoint)) {
      throw new BlockfuseError('MOUNTPOINT_IN_USE', `mountpoint "${mountpoint}" is already exported by this process`)
    }
    // Events may arrive before mount() resolves; they are queued until the object exists.
    let instance: FuseExport | undefined
    const early: NativeEvent[] = []
    const onEvent = (err: Error | null, event: NativeEvent) => {
      const ev: NativeEvent = err ? { kind: 'halt', reason: toBlockfuseError(err).message } : event
      if (instance) instance.#onNativeEvent(ev)
      else early.push(ev)
    }
    try {
      const base = {
        format: resolved.format,
        ...sourceConfig(resolved),
        mountpoint,
        writable: resolved.writable,
        growable: resolved.growable,
        threads: resolved.threads,
        cache: resolved.cache,
        writethrough: resolved.writethrough,
        ioUring: resolved.ioUring,
        passthrough: resolved.passthrough,
        locking: resolved.locking,
        forceShare: resolved.forceShare,
        ...(resolved.offset !== undefined ? { offset: resolved.offset } : {}),
        ...(resolved.size !== undefined ? { size: resolved.size } : {}),
        ...(resolved.partition !== undefined ? { partition: resolved.partition } : {}),
        snapshot: resolved.snapshot,
        ...(resolved.overlay !== undefined ? { overlay: resolved.overlay } : {}),
      }
      let allowOther = resolved.allowOther !== 'off'
      let fallback: string | undefined
      let native: NativeExport
      try {
        native = await start({ ...base, allowOther }, onEvent)
      } catch (err) {
        if (resolved.allowOther !== 'auto' || (err as BlockfuseError).code !== 'MOUNT_FAILED') throw err
        allowOther = false
        fallback = (err as BlockfuseError).message
        native = await start({ ...base, allowOther }, onEvent)
      }
      instance = new FuseExport(resolved, native, allowOther, fallback)
      instance.#lastSize = instance.size
    } catch (err) {
      release(mountpoint)
      throw err
    }
    // Delivered after the caller's `await` resumes, so its listeners are attached by then.
    if (early.length > 0) setImmediate(() => early.forEach((ev) => instance.#onNativeEvent(ev)))
    return instance
  }

  /** Current size of the exported image in bytes (the last known size once closed). */
  get size(): number {
    if (!this.#closed) {
      try {
        this.#lastSize = this.#native.size
      } catch {
        // After a halt the native side may refuse; the last known size is still right.
      }
    }
    return this.#lastSize
  }

  /**
   * Counters since the export started: requests by FUSE opcode, bytes read and written, errors,
   * and requests in flight per queue. Cheap (relaxed atomic loads); poll it as often as you like.
   * Once `close()` has been called it returns the counters taken just before closing began, so
   * requests that finish while close() drains are not in them, and `inFlight` is what was in
   * flight at that moment.
   */
  stats(): ExportStats {
    if (this.#finalStats) return copyStats(this.#finalStats)
    return copyStats(this.#native.stats())
  }

  /** True once the export is unmounted. */
  get closed(): boolean {
    return this.#closed
  }

  /** Reason of the native halt, if the export halted. */
  get haltReason(): string | undefined {
    return this.#haltReason
  }

  /**
   * Stops taking requests, waits for in-flight ones, flushes the backend and unmounts; then emits
   * `close`. Idempotent: concurrent and later calls share one promise. If unmounting fails the
   * promise rejects and a later call tries again.
   */
  close(): Promise<void> {
    this.#closing ??= this.#doClose()
    return this.#closing
  }

  async #doClose(): Promise<void> {
    this.#lastSize = this.size
    // The native counters read zero once its session is closed; keep the last ones.
    this.#finalStats ??= this.stats()
    try {
      await nativeClose(this.#native)
    } catch (err) {
      this.#closing = undefined
      throw err
    }
    this.#closed = true
    release(this.mountpoint)
    clearInterval(this.#keepAlive)
    this.#keepAlive = undefined
    this.emit('close')
  }

  /** Closes the export (for `await using`). */
  async [Symbol.asyncDispose](): Promise<void> {
    await this.close()
  }

  #onNativeEvent(event: NativeEvent): void {
    if (event.kind !== 'halt' || this.#haltReason !== undefined) return
    this.#haltReason = event.reason
    this.emit('halt', event.reason)
    if (this.options.onHalt === 'unmount' && !this.#closed) {
      this.close().catch((err: unknown) => {
        const error = toBlockfuseError(err)
        if (this.listenerCount('error') > 0) this.emit('error', error)
        else process.emitWarning(`blockfuse: closing ${this.mountpoint} after a halt failed: ${error.message}`)
      })
    }
  }
}
