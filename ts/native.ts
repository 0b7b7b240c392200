/**
 * The only module that loads the napi-rs binding. It declares the binding's shape, loads it lazily
 * (so that option validation and the CLI's `--help` work without it) and turns native errors into
 * {@link BlockfuseError}s. Nothing here makes policy decisions.
 *
 * @module
 */
import { createRequire } from 'node:module'

import { BlockfuseError } from './errors.js'

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
}

/** An asynchronous notification from the native core (today only `halt`). */
export interface NativeEvent {
  kind: string
  reason: string
}

/** A mounted export owned by the native core. */
export interface NativeExport {
  close(): Promise<void>
  readonly size: number
}

interface NativeExportStatic {
  mount(config: NativeExportConfig, onEvent: (err: Error | null, event: NativeEvent) => void): Promise<NativeExport>
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
      throw new BlockfuseError(
        'NATIVE_LOAD_FAILED',
        `cannot load the native binding (native/binding.cjs): ${(err as Error).message}; build it with \`npm run build:native\``,
        { cause: err },
      )
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
  if (match) return new BlockfuseError(match[1]!, match[2]!, { cause: err })
  return new BlockfuseError('INTERNAL', message, { cause: err })
}

/** Mounts an export; rejects with a {@link BlockfuseError}. */
export async function nativeMount(
  config: NativeExportConfig,
  onEvent: (err: Error | null, event: NativeEvent) => void,
): Promise<NativeExport> {
  const { NativeExport } = load()
  if (typeof NativeExport?.mount !== 'function') {
    throw new BlockfuseError(
      'NATIVE_LOAD_FAILED',
      'the native binding has no NativeExport.mount; rebuild it with `npm run build:native`',
    )
  }
  try {
    return await NativeExport.mount(config, onEvent)
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
