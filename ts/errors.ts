/**
 * Errors thrown by blockfuse: every rejection carries a stable `code` that callers and tests can
 * match on, and a message that names the offending value.
 *
 * @module
 */

/*
 * The one list of error codes. A code is added here (one line, anywhere in its list) and nowhere
 * else: the types below, `isBlockfuseError`'s parameter and the mapping of native errors
 * (ts/native.ts) all derive from these arrays.
 */

/** Codes raised by the TypeScript policy layer (option validation, filesystem checks). */
export const POLICY_ERROR_CODES = [
  'INVALID_OPTION',
  'SOURCE_NOT_FOUND',
  'SOURCE_NOT_FILE',
  'NULL_SIZE_INVALID',
  'MOUNTPOINT_NOT_FOUND',
  'MOUNTPOINT_NOT_FILE',
  'MOUNTPOINT_IN_USE',
  'NATIVE_LOAD_FAILED',
  'EXPORT_CLOSED',
  'HALTED',
] as const

/** Codes raised by the native core (the prefix of a native error's message, `Error::code` in Rust). */
export const NATIVE_ERROR_CODES = [
  'SOURCE_OPEN_FAILED',
  'MOUNTPOINT_NOT_FOUND',
  'MOUNTPOINT_NOT_FILE',
  'MOUNTPOINT_IN_USE',
  'FUSE_DEVICE_FAILED',
  'MOUNT_FAILED',
  'INIT_FAILED',
  'INVALID_CONFIG',
  'CLOSE_FAILED',
  'IO_URING_UNAVAILABLE',
  'PASSTHROUGH_UNAVAILABLE',
  'IMAGE_LOCKED',
  'IMAGE_TOO_LARGE',
  'IMAGE_DIRTY',
  'IMAGE_CORRUPT',
  'NBD_URI_INVALID',
  'NBD_CONNECT_FAILED',
  'NBD_EXPORT_NOT_FOUND',
  'NBD_TLS_FAILED',
  'NBD_HANDSHAKE_FAILED',
  'NBD_READ_ONLY',
  'NBD_BACKING_UNSUPPORTED',
  'SLICE_OUT_OF_RANGE',
  'PARTITION_NOT_FOUND',
  'OVERLAY_INVALID',
  'INTERNAL',
] as const

/** Codes raised by the TypeScript policy layer. */
export type PolicyErrorCode = (typeof POLICY_ERROR_CODES)[number]

/** Codes raised by the native core. */
export type NativeErrorCode = (typeof NATIVE_ERROR_CODES)[number]

/**
 * Every code a {@link BlockfuseError} may carry: a closed union, so that a misspelt code in
 * `isBlockfuseError(err, 'MOUNT_FAILD')` or `err.code === 'MOUNT_FAILD'` does not compile. A native
 * error with a code not in this list becomes `INTERNAL` (see ts/native.ts).
 */
export type BlockfuseErrorCode = PolicyErrorCode | NativeErrorCode

const KNOWN_CODES: ReadonlySet<string> = new Set<string>([...POLICY_ERROR_CODES, ...NATIVE_ERROR_CODES])

/** True when `code` is one of the {@link BlockfuseErrorCode}s. */
export function isBlockfuseErrorCode(code: unknown): code is BlockfuseErrorCode {
  return typeof code === 'string' && KNOWN_CODES.has(code)
}

/** An error with a stable, machine-readable {@link BlockfuseError.code}. */
export class BlockfuseError extends Error {
  /** Stable identifier of the failure, e.g. `MOUNTPOINT_IN_USE`. */
  readonly code: BlockfuseErrorCode

  constructor(code: BlockfuseErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options)
    this.name = 'BlockfuseError'
    this.code = code
  }
}

/** True when `err` is a {@link BlockfuseError}, optionally with the given code. */
export function isBlockfuseError(err: unknown, code?: BlockfuseErrorCode): err is BlockfuseError {
  return err instanceof BlockfuseError && (code === undefined || err.code === code)
}
