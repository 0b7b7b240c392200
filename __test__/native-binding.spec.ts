/**
 * ts/native.ts: the one function that turns native errors into BlockfuseErrors with a stable `code`,
 * and the built binding having the shape ts/native.ts declares (the lint job type-checks without it).
 */
import { readFile } from 'node:fs/promises'
import { createRequire } from 'node:module'

import test from 'ava'

import { BlockfuseError, isBlockfuseErrorCode, NATIVE_ERROR_CODES } from '../ts/errors.js'
import {
  nativeStartFakeDevice,
  nativeVersion,
  toBlockfuseError,
  type NativeExport,
  type NativeExportStatic,
  type NativeStats,
} from '../ts/native.js'

test('a native "CODE: message" error becomes code and message', (t) => {
  const native = new Error('MOUNT_FAILED: mount(2) on /x failed: Permission denied (os error 13)')
  const err = toBlockfuseError(native)
  t.true(err instanceof BlockfuseError)
  t.is(err.code, 'MOUNT_FAILED')
  t.is(err.message, 'mount(2) on /x failed: Permission denied (os error 13)')
  t.is(err.cause, native)
})

test('every native code is mapped, multi-line messages are kept whole', (t) => {
  for (const code of NATIVE_ERROR_CODES) {
    t.is(toBlockfuseError(new Error(`${code}: x\ny`)).code, code)
    t.is(toBlockfuseError(new Error(`${code}: x\ny`)).message, 'x\ny')
  }
})

test('every code the Rust side raises is in NATIVE_ERROR_CODES (the closed union)', async (t) => {
  const root = new URL('../crates/', import.meta.url)
  const core = await readFile(new URL('core/src/error.rs', root), 'utf8')
  const node = await readFile(new URL('node/src/lib.rs', root), 'utf8')
  const raised = new Set([
    ...[...core.matchAll(/=> "([A-Z][A-Z0-9_]*)"/g)].map((m) => m[1]!),
    ...[...node.matchAll(/js_error\("([A-Z][A-Z0-9_]*)"/g)].map((m) => m[1]!),
  ])
  t.true(raised.size >= 5, `found only ${[...raised].join(', ')}`)
  for (const code of raised) t.true(isBlockfuseErrorCode(code), `${code} is missing from ts/errors.ts`)
})

test('a native code this version does not know is INTERNAL and keeps the whole message', (t) => {
  const err = toBlockfuseError(new Error('SOMETHING_NEW: x'))
  t.is(err.code, 'INTERNAL')
  t.is(err.message, 'SOMETHING_NEW: x')
})

test('an error without a code prefix is INTERNAL and keeps its message', (t) => {
  for (const message of ['something broke', 'lowercase: not a code', 'NO_SPACE:x']) {
    const err = toBlockfuseError(new Error(message))
    t.is(err.code, 'INTERNAL')
    t.is(err.message, message)
  }
  t.is(toBlockfuseError('a string').message, 'a string')
})

test('a BlockfuseError passes through unchanged', (t) => {
  const err = new BlockfuseError('MOUNTPOINT_IN_USE', 'x')
  t.is(toBlockfuseError(err), err)
})

test('the binding loads and reports its version', (t) => {
  t.regex(nativeVersion(), /^\d+\.\d+\.\d+/)
})

/**
 * Every member of ts/native.ts's binding types, by kind. Typed against those interfaces, so a
 * member added there (or renamed) fails to compile until it is listed here, and the test below then
 * checks it against the built binding.
 */
const STATIC_MEMBERS: Record<keyof NativeExportStatic, 'function'> = { mount: 'function', startFakeDevice: 'function' }
const INSTANCE_MEMBERS: Record<keyof NativeExport, 'method' | 'getter'> = {
  close: 'method',
  stats: 'method',
  size: 'getter',
  format: 'getter',
  ioUring: 'getter',
  ioUringFallback: 'getter',
  passthrough: 'getter',
  passthroughFallback: 'getter',
  fakeDevicePeerFd: 'getter',
}
const STATS_KEYS: Record<keyof NativeStats, 'object' | 'number'> = {
  requests: 'object',
  bytesRead: 'number',
  bytesWritten: 'number',
  errors: 'number',
  unsupported: 'number',
  inFlight: 'object',
  served: 'object',
  lostReplies: 'number',
}

test('the built binding has the shape ts/native.ts declares', (t) => {
  const binding = createRequire(import.meta.url)('../native/binding.cjs') as Record<string, unknown>
  const NativeExport = binding.NativeExport as (Record<string, unknown> & { prototype?: object }) | undefined
  for (const [name, kind] of Object.entries(STATIC_MEMBERS)) {
    t.is(typeof NativeExport?.[name], kind, `NativeExport.${name}`)
  }
  for (const [name, kind] of Object.entries(INSTANCE_MEMBERS)) {
    const descriptor = Object.getOwnPropertyDescriptor(NativeExport?.prototype ?? {}, name)
    if (kind === 'method') t.is(typeof descriptor?.value, 'function', `${name}()`)
    else t.is(typeof descriptor?.get, 'function', `get ${name}`)
  }
  t.is(typeof binding.version, 'function', 'version()')
})

test('a native export reports stats of the declared shape; a fake device has a peer fd, and counters are zero once closed', async (t) => {
  const exp = nativeStartFakeDevice(
    {
      format: 'null',
      nullSize: 1 << 20,
      mountpoint: '/nonexistent',
      writable: false,
      growable: false,
      allowOther: false,
      threads: 1,
      cache: 'writeback',
      writethrough: false,
      ioUring: 'off',
      passthrough: 'auto',
      locking: 'auto',
      forceShare: false,
    },
    () => {},
  )
  t.is(typeof exp.fakeDevicePeerFd, 'number')
  const stats = exp.stats()
  t.deepEqual(Object.keys(stats).sort(), Object.keys(STATS_KEYS).sort())
  for (const [key, type] of Object.entries(STATS_KEYS)) t.is(typeof stats[key as keyof NativeStats], type, key)
  t.true(Array.isArray(stats.inFlight))
  t.deepEqual(stats.inFlight, [0])
  t.is(exp.size, 1 << 20)
  await exp.close()
  t.deepEqual(exp.stats(), {
    requests: {},
    bytesRead: 0,
    bytesWritten: 0,
    errors: 0,
    unsupported: 0,
    inFlight: [],
    served: [],
    lostReplies: 0,
  })
})
