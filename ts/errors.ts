/**
 * Errors thrown by blockfuse: every rejection carries a stable `code` that callers and tests can
 * match on, and a message that names the offending value.
 *
 * @module
 */

/** Codes raised by the TypeScript policy layer (option validation, filesystem checks). */
export type PolicyErrorCode =
  | 'INVALID_OPTION'
  | 'SOURCE_NOT_FOUND'
  | 'SOURCE_NOT_FILE'
  | 'NULL_SIZE_INVALID'
  | 'MOUNTPOINT_NOT_FOUND'
  | 'MOUNTPOINT_NOT_FILE'
  | 'MOUNTPOINT_IN_USE'
  | 'NATIVE_LOAD_FAILED'
  | 'EXPORT_CLOSED'
  | 'HALTED'

/** Codes raised by the native core (the prefix of a native error's message). */
export type NativeErrorCode =
  | 'SOURCE_OPEN_FAILED'
  | 'MOUNTPOINT_NOT_FOUND'
  | 'MOUNTPOINT_NOT_FILE'
  | 'FUSE_DEVICE_FAILED'
  | 'MOUNT_FAILED'
  | 'INIT_FAILED'
  | 'INVALID_CONFIG'
  | 'CLOSE_FAILED'
  | 'IO_URING_UNAVAILABLE'
  | 'INTERNAL'
  | 'NBD_URI_INVALID'
  | 'NBD_CONNECT_FAILED'
  | 'NBD_EXPORT_NOT_FOUND'
  | 'NBD_TLS_FAILED'
  | 'NBD_HANDSHAKE_FAILED'
  | 'NBD_READ_ONLY'

/**
 * Every code a {@link BlockfuseError} may carry. Open-ended so that a newer native core's codes pass
 * through unchanged.
 */
export type BlockfuseErrorCode = PolicyErrorCode | NativeErrorCode | (string & {})

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
