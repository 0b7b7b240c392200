/**
 * Export options: their types and defaults, pure validation ({@link normalizeOptions}), and the
 * filesystem checks that turn them into what the native core gets ({@link resolveOptions}). The
 * native core trusts what it gets from here; every rejection is a {@link BlockfuseError} whose
 * message names the offending value.
 *
 * @module
 */
import { lstat, readFile, realpath, stat } from 'node:fs/promises'
import type { Stats } from 'node:fs'
import { basename, dirname, join, resolve } from 'node:path'

import { BlockfuseError } from './errors.js'
import { isExported } from './registry.js'

/**
 * Image format: `raw` is a file (or block device) used as is; `qcow2` is a qcow2 image (v2 or v3,
 * with its backing chain) presented as the disk it describes; `vmdk` is a VMDK descriptor with flat
 * extents (read-only; `snapshot` makes it writable); `null` reads zeros and drops writes;
 * `auto` probes the image header (qcow2 magic → `qcow2`, a vmdk descriptor → `vmdk`, else `raw`). A raw image found by probing
 * refuses writes that would make its first sector look like another format (EPERM); give `'raw'`
 * to lift that (see docs/formats.md).
 */
export type ExportFormat = 'raw' | 'qcow2' | 'vmdk' | 'null' | 'auto'
/** The format an export serves: what `auto` resolved to. */
export type ServedFormat = Exclude<ExportFormat, 'auto'>
/** Whether other users may access the export (`allow_other` mount option). */
export type AllowOther = 'on' | 'off' | 'auto'
/** Host cache mode for the backing file. */
export type CacheMode = 'writeback' | 'none'
/** How requests reach the export: FUSE-over-io_uring, `read(2)` on /dev/fuse, or the first that works. */
export type IoUringMode = 'auto' | 'on' | 'off'
/** Whether opens may go straight to a raw image (FUSE passthrough); see {@link FuseExportOptions.passthrough}. */
export type PassthroughMode = 'auto' | 'on' | 'off'
/** QEMU-compatible image locking (QEMU's `locking=`): take the locks, fall back with a warning where the file system has none, or take none. */
export type LockingMode = 'auto' | 'on' | 'off'
/** What to do when the native core halts the export. */
export type OnHalt = 'unmount' | 'keep'

/** A null backend of the given size. */
export interface NullSource {
  /**
   * Size in bytes: a positive integer (number or bigint, at most 2^53-1), or a string such as
   * `'1G'`, `'512M'`, `'64k'` or `'4096'`. Units are binary (k = KiB, M = MiB, G = GiB, T = TiB)
   * and may be followed by `i`, `iB` or `B`.
   */
  null: number | bigint | string
}

/**
 * How to use an NBD source (a `source` that is an NBD URI). Times are in seconds (fractions
 * allowed). See docs/remote.md.
 */
export interface NbdOptions {
  /** PEM file of the CA(s) that sign the server's certificate (`nbds://`). Default: the system's CA bundle. */
  tlsCa?: string
  /** PEM file of a client certificate, for servers that verify clients. Needs `tlsKey`. */
  tlsCert?: string
  /** PEM file of the client certificate's private key. Needs `tlsCert`. */
  tlsKey?: string
  /** The name the server's certificate must carry. Default: the URI's host (`localhost` for Unix sockets). */
  tlsServerName?: string
  /** Time limit for connecting and the handshake, at `create` and when reconnecting. Default: `10`. */
  connectTimeout?: number
  /**
   * When the connection breaks, requests wait this long for blockfuse to reconnect (and are
   * then retried) before failing with EIO; the export stays up and serves again once the server
   * is back. `0` fails them at once. Default: `10`.
   */
  reconnectDelay?: number
  /**
   * A request the server has not answered after this many seconds is taken as a sign of a dead
   * server or a silently dropping network: its connection is closed and replaced (the
   * `reconnectDelay` window, then EIO). A silent server gives EIO after at most
   * `2 × requestTimeout + reconnectDelay` (plus a second). `0` waits forever. Default: `30`.
   */
  requestTimeout?: number
}

/** The URI schemes of NBD sources. */
const NBD_SCHEMES = ['nbd://', 'nbds://', 'nbd+unix://', 'nbds+unix://', 'nbd+tcp://', 'nbds+tcp://'] as const

/** Whether a source string is an NBD URI rather than a path. */
export function isNbdUri(source: string): boolean {
  return NBD_SCHEMES.some((scheme) => source.startsWith(scheme))
}

/** {@link NbdOptions} after validation and defaults; paths are absolute. */
export interface ResolvedNbdOptions {
  readonly tlsCa?: string
  readonly tlsCert?: string
  readonly tlsKey?: string
  readonly tlsServerName?: string
  readonly connectTimeout: number
  readonly reconnectDelay: number
  readonly requestTimeout: number
}

/** Options of {@link FuseExport.create}. */
export interface FuseExportOptions {
  /**
   * Path of an image file (or block device); an NBD URI (`nbd://host[:port]/export`,
   * `nbd+unix:///export?socket=PATH`, TLS: `nbds://`, `nbds+unix://`; see docs/remote.md); or a
   * null backend: `{ null: size }` or the CLI's spelling `'null:<size>'` (e.g. `'null:1G'`; a file
   * with such a name is given as `'./null:1G'`). Required.
   */
  source: string | `null:${string}` | NullSource
  /** For an NBD source: TLS files, timeouts and the reconnect window. */
  nbd?: NbdOptions
  /**
   * Path of an existing regular file the export is mounted on; it is covered while the export lives
   * and uncovered by `close()`. It may be the source image itself. Required.
   */
  mountpoint: string
  /**
   * Image format. Default: `'null'` when `source` is `{ null }`, else `'auto'`. An NBD source
   * takes `'raw'`, `'qcow2'` (a qcow2 file served raw, read through the NBD connection) or
   * `'auto'` (which probes the export's first sector like a file's).
   */
  format?: ExportFormat
  /** Allow writes through the export. Default: `false` (mounted read-only). */
  writable?: boolean
  /** Let writes past the end grow the image (and allow truncate to grow it). Needs `writable`. Default: `false`. */
  growable?: boolean
  /**
   * Export a byte range of the disk: from `offset` (default 0), `size` bytes (default: to the
   * disk's end). Numbers, bigints or strings with binary units as for null sizes (`'1M'`, `'2G'`).
   * The range must lie inside the disk (`SLICE_OUT_OF_RANGE`). Excludes `partition` and `growable`.
   */
  offset?: number | bigint | string
  /** See {@link FuseExportOptions.offset}. */
  size?: number | bigint | string
  /**
   * Export partition N of the disk's MBR (1-4 primary, 5 and up logical) or GPT partition table,
   * found through the export's own source (so also inside a qcow2 image or on an NBD server).
   * `PARTITION_NOT_FOUND` when there is no such partition. Excludes `offset`/`size` and `growable`.
   */
  partition?: number
  /**
   * Writes go to a temporary overlay that is dropped when the export closes (QEMU's
   * `snapshot=on`): the source is opened read-only and never changes. Implies `writable`.
   * The overlay is a sparse, already unlinked file in `$TMPDIR` (default `/var/tmp`), so nothing
   * is left behind, even after kill -9. Excludes `overlay` and `growable`. Default: `false`.
   */
  snapshot?: boolean
  /**
   * Writes go to the qcow2 image at this path, whose backing file is the source (created if
   * missing, with the source's name relative to the overlay's directory, or an NBD source's URI,
   * and its format; reused if its backing file is the source, else `OVERLAY_INVALID`). QEMU and
   * `qemu-img` read it (`qemu-img commit` merges it into the source). Implies `writable`. Needs an
   * image file or NBD source.
   */
  overlay?: string
  /**
   * Mount with `allow_other` so users other than the exporting one can access the file.
   * `'auto'` tries `'on'` and falls back to `'off'` if that mount fails. Default: `'auto'`.
   */
  allowOther?: AllowOther
  /** Number of `/dev/fuse` queues, each served by its own thread; an integer from 1 to 64. Default: `1`. */
  threads?: number
  /**
   * `'writeback'` uses the host page cache for the backing file (like QEMU's file driver);
   * `'none'` opens it with `O_DIRECT` and honours its alignment. Default: `'writeback'`.
   */
  cache?: CacheMode
  /** Flush the backend after every write before acknowledging it. Default: `false`. */
  writethrough?: boolean
  /**
   * How requests reach the export's threads. `'on'`: FUSE-over-io_uring (Linux 6.14+, with the
   * `fuse` module's `enable_uring` parameter set): the kernel hands requests to ring entries and
   * takes replies from them, several per system call; creating the export fails with
   * `IO_URING_UNAVAILABLE` if that cannot be used. `'off'`: `read(2)`/`writev(2)` on
   * `/dev/fuse`. `'auto'`: io_uring when the kernel offers it and `threads` is 2 or more, else
   * `read(2)`, which is faster with one thread ({@link FuseExport.ioUring} says which, and
   * {@link FuseExport.ioUringFallback} why not io_uring). Default: `'auto'`.
   */
  ioUring?: IoUringMode
  /**
   * FUSE passthrough (Linux 6.9+, CAP_SYS_ADMIN): the kernel sends an open's reads straight to
   * the image, without a round trip through the export. Only for a raw image on a regular
   * file, where offset N of the export is offset N of the image. Decided per open: read-only
   * opens pass through (with `cache: 'none'` only those opened with O_DIRECT); writable opens
   * are served as without it, so size, read-only and first-sector rules hold. `'auto'`: used on
   * read-only exports when the kernel and privileges allow it ({@link FuseExport.passthrough}
   * says whether, {@link FuseExport.passthroughFallback} why not); a writable export is not
   * passed through in `'auto'` (docs/DESIGN.md, "Passthrough"). `'on'`: used on read-only and
   * writable exports; `create()` fails with `PASSTHROUGH_UNAVAILABLE` where it cannot be.
   * `'off'`: never. Default: `'auto'`.
   */
  passthrough?: PassthroughMode
  /**
   * Image locks that QEMU understands: the OFD byte-range locks of QEMU's `file-posix` driver, on
   * the image and on every backing file. A writable export holds write and resize and shares
   * neither; a read-only export holds consistent-read and does not let others write or resize
   * (like `qemu-img`) unless {@link FuseExportOptions.forceShare}. A conflicting holder (another
   * export, a running QEMU, `qemu-io`) makes `create()` fail with `IMAGE_LOCKED`. `'on'` fails with
   * `SOURCE_OPEN_FAILED` where the file system cannot lock; `'auto'` then serves unlocked with a
   * warning; `'off'` takes and checks no locks. Default: `'auto'`.
   */
  locking?: LockingMode
  /**
   * Read-only exports only: let others write and resize the image meanwhile (`qemu-img -U`, what
   * QEMU calls force-share); the export may then read data that changes under it. Default: `false`.
   */
  forceShare?: boolean
  /**
   * On a native halt (the kernel stream can no longer be trusted): `'unmount'` emits `halt` and
   * then closes the export, so clients get errors instead of hanging; `'keep'` only emits `halt`.
   * Default: `'unmount'`.
   */
  onHalt?: OnHalt
}

/** Options after validation and defaults; paths are absolute (real paths after {@link resolveOptions}). */
export interface ResolvedFuseExportOptions {
  readonly source: string | { readonly null: number }
  /** Set exactly when `source` is an NBD URI. */
  readonly nbd?: ResolvedNbdOptions
  readonly mountpoint: string
  readonly format: ExportFormat
  readonly writable: boolean
  readonly growable: boolean
  /** A byte range of the disk: `size` undefined means to the end. */
  readonly offset?: number
  readonly size?: number
  readonly partition?: number
  readonly snapshot: boolean
  /** Absolute path of the qcow2 overlay. */
  readonly overlay?: string
  readonly allowOther: AllowOther
  readonly threads: number
  readonly cache: CacheMode
  readonly writethrough: boolean
  readonly ioUring: IoUringMode
  readonly passthrough: PassthroughMode
  readonly locking: LockingMode
  readonly forceShare: boolean
  readonly onHalt: OnHalt
}

/** Upper bound of {@link FuseExportOptions.threads}. */
export const MAX_THREADS = 64

const KNOWN_OPTIONS = [
  'source',
  'nbd',
  'mountpoint',
  'format',
  'writable',
  'growable',
  'offset',
  'size',
  'partition',
  'snapshot',
  'overlay',
  'allowOther',
  'threads',
  'cache',
  'writethrough',
  'ioUring',
  'passthrough',
  'locking',
  'forceShare',
  'onHalt',
] as const

function describe(value: unknown): string {
  if (typeof value === 'string') return JSON.stringify(value)
  if (typeof value === 'bigint') return `${value}n`
  if (value === null) return 'null'
  if (Array.isArray(value)) return 'an array'
  if (typeof value === 'object') return 'an object'
  if (typeof value === 'function') return 'a function'
  return String(value)
}

function invalid(message: string): BlockfuseError {
  return new BlockfuseError('INVALID_OPTION', message)
}

function optionalBoolean(options: Record<string, unknown>, key: string): boolean {
  const value = options[key]
  if (value === undefined) return false
  if (typeof value !== 'boolean') {
    throw invalid(`option "${key}" must be a boolean, got ${describe(value)}`)
  }
  return value
}

function optionalEnum<T extends string>(
  options: Record<string, unknown>,
  key: string,
  allowed: readonly T[],
  fallback: T,
): T {
  const value = options[key]
  if (value === undefined) return fallback
  if (typeof value !== 'string' || !(allowed as readonly string[]).includes(value)) {
    throw invalid(`option "${key}" must be one of ${allowed.map((a) => `"${a}"`).join(', ')}, got ${describe(value)}`)
  }
  return value as T
}

/** A string source with this prefix is a null backend (`'null:1G'`), as on the command line. */
const NULL_PREFIX = 'null:'

const UNIT_SHIFT: Record<string, bigint> = { '': 0n, k: 10n, m: 20n, g: 30n, t: 40n }
const SIZE_PATTERN = /^(\d+)(?:([kKmMgGtT])(?:i|iB|B)?|B)?$/
const MAX_SIZE = BigInt(Number.MAX_SAFE_INTEGER)

/** A byte count as a bigint: a number, a bigint, or a decimal string with an optional binary unit. */
function byteCount(value: unknown, fail: (why: string) => BlockfuseError): bigint {
  if (typeof value === 'number') {
    if (!Number.isInteger(value)) throw fail('it must be an integer number of bytes')
    if (!Number.isSafeInteger(value)) throw fail('it must be at most 2^53-1 bytes')
    return BigInt(value)
  }
  if (typeof value === 'bigint') return value
  if (typeof value === 'string') {
    const match = SIZE_PATTERN.exec(value)
    if (!match) {
      throw fail('expected a decimal integer with an optional unit k, M, G or T (e.g. 1G, 512M, 64k)')
    }
    return BigInt(match[1]!) << UNIT_SHIFT[(match[2] ?? '').toLowerCase()]!
  }
  throw fail('expected a number, a bigint or a string such as "1G"')
}

/**
 * Parses a null backend size: a positive integer number or bigint, or a decimal string with an
 * optional binary unit (`64k`, `512M`, `1G`, `2T`, `1GiB`, `4096`, `4096B`). Rejects 0, negative,
 * fractional and oversized (> 2^53-1) values with `NULL_SIZE_INVALID`.
 */
export function parseSize(value: unknown): number {
  const fail = (why: string) =>
    new BlockfuseError('NULL_SIZE_INVALID', `null backend size ${describe(value)} is invalid: ${why}`)
  const bytes = byteCount(value, fail)
  if (bytes <= 0n) throw fail('it must be greater than 0')
  if (bytes > MAX_SIZE) throw fail('it must be at most 2^53-1 bytes')
  return Number(bytes)
}

/** Parses option `key` (`offset` or `size` of a slice) in the units of {@link parseSize}; `size` must not be 0. */
function sliceBytes(options: Record<string, unknown>, key: 'offset' | 'size'): number | undefined {
  const value = options[key]
  if (value === undefined) return undefined
  const fail = (why: string) => invalid(`option "${key}" ${describe(value)} is invalid: ${why}`)
  const bytes = byteCount(value, fail)
  if (bytes < 0n) throw fail('it must not be negative')
  if (key === 'size' && bytes === 0n) throw fail('it must be greater than 0')
  if (bytes > MAX_SIZE) throw fail('it must be at most 2^53-1 bytes')
  return Number(bytes)
}

/**
 * Validates options and applies defaults without touching the filesystem. Paths are made absolute
 * against the current directory. Throws a {@link BlockfuseError} (`INVALID_OPTION`,
 * `NULL_SIZE_INVALID`).
 */
export function normalizeOptions(input: unknown): ResolvedFuseExportOptions {
  if (typeof input !== 'object' || input === null || Array.isArray(input)) {
    throw invalid(`options must be an object, got ${describe(input)}`)
  }
  const options = input as Record<string, unknown>
  for (const key of Object.keys(options)) {
    if (!(KNOWN_OPTIONS as readonly string[]).includes(key)) {
      throw invalid(`unknown option "${key}" (known options: ${KNOWN_OPTIONS.join(', ')})`)
    }
  }

  const rawSource = options.source
  let source: string | { null: number }
  const nbdSource = typeof rawSource === 'string' && isNbdUri(rawSource)
  if (nbdSource) {
    source = rawSource
  } else if (typeof rawSource === 'string' && rawSource.startsWith(NULL_PREFIX)) {
    source = { null: parseSize(rawSource.slice(NULL_PREFIX.length)) }
  } else if (typeof rawSource === 'string') {
    if (rawSource === '') throw invalid('option "source" must not be an empty path')
    source = resolve(rawSource)
  } else if (typeof rawSource === 'object' && rawSource !== null && !Array.isArray(rawSource)) {
    const keys = Object.keys(rawSource)
    if (keys.length !== 1 || keys[0] !== 'null') {
      throw invalid(
        `option "source" must be a path or { null: <size> }, got an object with keys ${describe(keys.join(', '))}`,
      )
    }
    source = { null: parseSize((rawSource as NullSource).null) }
  } else if (rawSource === undefined) {
    throw invalid('option "source" is required: a path of an image, or { null: <size> }')
  } else {
    throw invalid(`option "source" must be a path or { null: <size> }, got ${describe(rawSource)}`)
  }

  const rawMountpoint = options.mountpoint
  if (rawMountpoint === undefined) {
    throw invalid('option "mountpoint" is required: the path of an existing regular file')
  }
  if (typeof rawMountpoint !== 'string') {
    throw invalid(`option "mountpoint" must be a path, got ${describe(rawMountpoint)}`)
  }
  if (rawMountpoint === '') throw invalid('option "mountpoint" must not be an empty path')
  const mountpoint = resolve(rawMountpoint)

  const isNull = typeof source !== 'string'
  const format = optionalEnum<ExportFormat>(
    options,
    'format',
    ['raw', 'qcow2', 'vmdk', 'null', 'auto'],
    isNull ? 'null' : 'auto',
  )
  if (format === 'null' && !isNull) {
    throw invalid(
      `option "format" is "null" but "source" is a path (${describe(source)}); a null backend is given as source: { null: <size> }`,
    )
  }
  if (format !== 'null' && isNull) {
    throw invalid(`option "format" is ${describe(format)} but "source" is a null backend; use a path`)
  }
  if (nbdSource && format !== 'raw' && format !== 'qcow2' && format !== 'auto') {
    throw invalid(`option "format" is ${describe(format)} but an NBD source is served as "raw", "qcow2" or "auto"`)
  }
  if (options.nbd !== undefined && !nbdSource) {
    throw invalid('option "nbd" is only for an NBD source (nbd://, nbds://, nbd+unix://, nbds+unix://)')
  }
  const nbd = nbdSource ? normalizeNbd(options.nbd) : undefined

  const layers = normalizeLayers(options, isNull)
  const writable = optionalBoolean(options, 'writable') || layers.snapshot || layers.overlay !== undefined
  const growable = optionalBoolean(options, 'growable')
  if (growable && layersFixSize(layers)) {
    throw invalid('option "growable" cannot be used with a slice, a snapshot or an overlay (their size is fixed)')
  }
  if (growable && !writable) {
    throw invalid('option "growable" needs "writable: true" (a read-only export cannot grow)')
  }
  if (growable && nbdSource) {
    throw invalid('option "growable" cannot be used with an NBD source (its size is the server\'s)')
  }

  const forceShare = optionalBoolean(options, 'forceShare')
  if (forceShare && writable) {
    throw invalid('option "forceShare" is for read-only exports (a writer never shares write)')
  }

  let threads = 1
  if (options.threads !== undefined) {
    const value = options.threads
    if (typeof value !== 'number' || !Number.isInteger(value) || value < 1 || value > MAX_THREADS) {
      throw invalid(`option "threads" must be an integer from 1 to ${MAX_THREADS}, got ${describe(value)}`)
    }
    threads = value
  }

  return {
    source,
    ...(nbd ? { nbd } : {}),
    mountpoint,
    format,
    writable,
    growable,
    ...layers,
    allowOther: optionalEnum<AllowOther>(options, 'allowOther', ['on', 'off', 'auto'], 'auto'),
    threads,
    cache: optionalEnum<CacheMode>(options, 'cache', ['writeback', 'none'], 'writeback'),
    writethrough: optionalBoolean(options, 'writethrough'),
    ioUring: optionalEnum<IoUringMode>(options, 'ioUring', ['auto', 'on', 'off'], 'auto'),
    passthrough: optionalEnum<PassthroughMode>(options, 'passthrough', ['auto', 'on', 'off'], 'auto'),
    locking: optionalEnum<LockingMode>(options, 'locking', ['auto', 'on', 'off'], 'auto'),
    forceShare,
    onHalt: optionalEnum<OnHalt>(options, 'onHalt', ['unmount', 'keep'], 'unmount'),
  }
}

/** The slice and overlay options, validated. */
interface Layers {
  offset?: number
  size?: number
  partition?: number
  snapshot: boolean
  overlay?: string
}

function layersFixSize(layers: Layers): boolean {
  return (
    layers.offset !== undefined ||
    layers.size !== undefined ||
    layers.partition !== undefined ||
    layers.snapshot ||
    layers.overlay !== undefined
  )
}

function normalizeLayers(options: Record<string, unknown>, isNull: boolean): Layers {
  const offset = sliceBytes(options, 'offset')
  const size = sliceBytes(options, 'size')
  const partition = options.partition
  if (partition !== undefined) {
    if (typeof partition !== 'number' || !Number.isInteger(partition) || partition < 1 || partition > 0xffffffff) {
      throw invalid(`option "partition" must be a partition number from 1 (as in sda1), got ${describe(partition)}`)
    }
    if (offset !== undefined || size !== undefined) {
      throw invalid('option "partition" excludes "offset" and "size" (a partition is its own byte range)')
    }
  }
  const snapshot = optionalBoolean(options, 'snapshot')
  const rawOverlay = options.overlay
  if (rawOverlay !== undefined && (typeof rawOverlay !== 'string' || rawOverlay === '')) {
    throw invalid(`option "overlay" must be a non-empty path, got ${describe(rawOverlay)}`)
  }
  if (snapshot && rawOverlay !== undefined) {
    throw invalid('options "snapshot" and "overlay" exclude each other (a snapshot\'s overlay is temporary)')
  }
  if (rawOverlay !== undefined && isNull) {
    throw invalid('option "overlay" needs an image file as the source (it becomes the backing file)')
  }
  return {
    ...(offset !== undefined ? { offset } : {}),
    ...(size !== undefined ? { size } : {}),
    ...(partition !== undefined ? { partition } : {}),
    snapshot,
    ...(rawOverlay !== undefined ? { overlay: resolve(rawOverlay) } : {}),
  }
}

const NBD_KEYS = [
  'tlsCa',
  'tlsCert',
  'tlsKey',
  'tlsServerName',
  'connectTimeout',
  'reconnectDelay',
  'requestTimeout',
] as const
const MAX_SECONDS = 86400

function normalizeNbd(input: unknown): ResolvedNbdOptions {
  if (input === undefined) input = {}
  if (typeof input !== 'object' || input === null || Array.isArray(input)) {
    throw invalid(`option "nbd" must be an object, got ${describe(input)}`)
  }
  const nbd = input as Record<string, unknown>
  for (const key of Object.keys(nbd)) {
    if (!(NBD_KEYS as readonly string[]).includes(key)) {
      throw invalid(`unknown option "nbd.${key}" (known: ${NBD_KEYS.join(', ')})`)
    }
  }
  const path = (key: string): string | undefined => {
    const value = nbd[key]
    if (value === undefined) return undefined
    if (typeof value !== 'string' || value === '') {
      throw invalid(`option "nbd.${key}" must be a non-empty path, got ${describe(value)}`)
    }
    return resolve(value)
  }
  const seconds = (key: string, fallback: number): number => {
    const value = nbd[key]
    if (value === undefined) return fallback
    if (typeof value !== 'number' || !Number.isFinite(value) || value < 0 || value > MAX_SECONDS) {
      throw invalid(`option "nbd.${key}" must be a number of seconds from 0 to ${MAX_SECONDS}, got ${describe(value)}`)
    }
    return value
  }
  const tlsCert = path('tlsCert')
  const tlsKey = path('tlsKey')
  if ((tlsCert === undefined) !== (tlsKey === undefined)) {
    throw invalid('options "nbd.tlsCert" and "nbd.tlsKey" go together: a client certificate needs its key')
  }
  const serverName = nbd.tlsServerName
  if (serverName !== undefined && (typeof serverName !== 'string' || serverName === '')) {
    throw invalid(`option "nbd.tlsServerName" must be a non-empty string, got ${describe(serverName)}`)
  }
  const connectTimeout = seconds('connectTimeout', 10)
  if (connectTimeout === 0) throw invalid('option "nbd.connectTimeout" must be greater than 0')
  const tlsCa = path('tlsCa')
  return {
    ...(tlsCa !== undefined ? { tlsCa } : {}),
    ...(tlsCert !== undefined ? { tlsCert } : {}),
    ...(tlsKey !== undefined ? { tlsKey } : {}),
    ...(serverName !== undefined ? { tlsServerName: serverName } : {}),
    connectTimeout,
    reconnectDelay: seconds('reconnectDelay', 10),
    requestTimeout: seconds('requestTimeout', 30),
  }
}

/** One line of `/proc/self/mountinfo`, reduced to what the checks need. */
export interface MountInfoEntry {
  /** Where it is mounted (escapes such as `\040` decoded). */
  mountPoint: string
  /** Filesystem type, e.g. `fuse` or `fuse.blockfuse`. */
  fsType: string
  /** Mount source, e.g. `/dev/sda1`. */
  source: string
}

function unescapeMountinfo(field: string): string {
  return field.replace(/\\([0-7]{3})/g, (_, octal: string) => String.fromCharCode(parseInt(octal, 8)))
}

/** Parses the text of `/proc/<pid>/mountinfo` (see proc(5)); malformed lines are skipped. */
export function parseMountinfo(text: string): MountInfoEntry[] {
  const entries: MountInfoEntry[] = []
  for (const line of text.split('\n')) {
    const fields = line.split(' ')
    const separator = fields.indexOf('-', 6)
    if (fields.length < 7 || separator < 0 || fields.length < separator + 3) continue
    entries.push({
      mountPoint: unescapeMountinfo(fields[4]!),
      fsType: unescapeMountinfo(fields[separator + 1]!),
      source: unescapeMountinfo(fields[separator + 2]!),
    })
  }
  return entries
}

/**
 * Mount points currently visible to this process, with their filesystem type; empty if
 * `/proc/self/mountinfo` is unreadable.
 */
export async function readMountPoints(): Promise<Map<string, string>> {
  try {
    const entries = parseMountinfo(await readFile('/proc/self/mountinfo', 'utf8'))
    return new Map(entries.map((e) => [e.mountPoint, e.fsType]))
  } catch {
    return new Map()
  }
}

function errnoCode(err: unknown): string | undefined {
  return (err as NodeJS.ErrnoException | undefined)?.code
}

function fileKind(st: Stats): string {
  if (st.isDirectory()) return 'a directory'
  if (st.isSymbolicLink()) return 'a symbolic link'
  if (st.isCharacterDevice()) return 'a character device'
  if (st.isBlockDevice()) return 'a block device'
  if (st.isFIFO()) return 'a FIFO'
  if (st.isSocket()) return 'a socket'
  return 'not a regular file'
}

async function resolveSource(path: string): Promise<string> {
  let st: Stats
  try {
    st = await stat(path)
  } catch (err) {
    const code = errnoCode(err)
    if (code === 'ENOENT' || code === 'ENOTDIR' || code === 'ELOOP') {
      throw new BlockfuseError('SOURCE_NOT_FOUND', `source ${describe(path)} does not exist`, { cause: err })
    }
    throw new BlockfuseError('SOURCE_OPEN_FAILED', `cannot stat source ${describe(path)}: ${(err as Error).message}`, {
      cause: err,
    })
  }
  if (!st.isFile() && !st.isBlockDevice()) {
    throw new BlockfuseError(
      'SOURCE_NOT_FILE',
      `source ${describe(path)} is ${fileKind(st)}; it must be a regular file or a block device`,
    )
  }
  return realpath(path)
}

function inUse(path: string, why: string): BlockfuseError {
  return new BlockfuseError('MOUNTPOINT_IN_USE', `mountpoint ${describe(path)} ${why}`)
}

function notFile(path: string, st: Stats): BlockfuseError {
  return new BlockfuseError(
    'MOUNTPOINT_NOT_FILE',
    `mountpoint ${describe(path)} is ${fileKind(st)}; it must be a regular file (the export is one file)`,
  )
}

function notFound(path: string, err?: unknown): BlockfuseError {
  return new BlockfuseError(
    'MOUNTPOINT_NOT_FOUND',
    `mountpoint ${describe(path)} does not exist; create it as an empty regular file (e.g. \`touch ${path}\`)`,
    { cause: err },
  )
}

/**
 * Checks a mountpoint without stat()ing a FUSE mount (a stat on a FUSE mount whose server is stuck,
 * or is this very process, could hang): the registry and mountinfo are consulted first with the
 * canonical path, and only then is the file itself examined.
 */
async function resolveMountpoint(path: string): Promise<string> {
  const mounted = await readMountPoints()
  const check = async (candidate: string) => {
    if (isExported(candidate)) throw inUse(path, 'is already exported by this process')
    const fsType = mounted.get(candidate)
    if (fsType === undefined) return
    // Another filesystem's root (e.g. /proc) is safe to stat and is better reported as what it is.
    if (!fsType.startsWith('fuse')) {
      const st = await lstat(candidate).catch(() => undefined)
      if (st && !st.isFile()) throw notFile(path, st)
    }
    const unmount = fsType.startsWith('fuse') ? `fusermount3 -u ${candidate}` : `umount ${candidate}`
    throw inUse(
      path,
      `already has a filesystem (${fsType}) mounted on it: another export, or a stale one (unmount it with \`${unmount}\`)`,
    )
  }
  await check(path)
  if (path === '/') throw notFile(path, await lstat(path))
  let parent: string
  try {
    parent = await realpath(dirname(path))
  } catch (err) {
    throw notFound(path, err)
  }
  let candidate = join(parent, basename(path))
  await check(candidate)
  let st: Stats
  try {
    st = await lstat(candidate)
    if (st.isSymbolicLink()) {
      candidate = await realpath(candidate)
      await check(candidate)
      st = await lstat(candidate)
    }
  } catch (err) {
    if (err instanceof BlockfuseError) throw err
    const code = errnoCode(err)
    if (code === 'ENOENT' || code === 'ENOTDIR' || code === 'ELOOP') throw notFound(path, err)
    throw new BlockfuseError(
      'MOUNTPOINT_NOT_FOUND',
      `cannot stat mountpoint ${describe(path)}: ${(err as Error).message}`,
      {
        cause: err,
      },
    )
  }
  if (!st.isFile()) throw notFile(path, st)
  return candidate
}

/**
 * Validates options ({@link normalizeOptions}) and checks the filesystem: the source exists and is
 * a regular file or block device; the mountpoint exists, is a regular file, is not exported by this
 * process and has nothing mounted on it. Paths in the result are absolute real paths.
 */
export async function resolveOptions(input: unknown): Promise<ResolvedFuseExportOptions> {
  const options = normalizeOptions(input)
  const source =
    typeof options.source === 'string' && options.nbd === undefined
      ? await resolveSource(options.source)
      : options.source
  const mountpoint = await resolveMountpoint(options.mountpoint)
  return { ...options, source, mountpoint }
}
