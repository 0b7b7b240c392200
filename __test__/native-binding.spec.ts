/**
 * ts/native.ts: the one function that turns native errors into BlockfuseErrors with a stable `code`,
 * and the built binding having the shape ts/native.ts declares (the lint job type-checks without it).
 */
import { createRequire } from 'node:module'

import test from 'ava'

import { BlockfuseError } from '../ts/errors.js'
import { nativeVersion, toBlockfuseError } from '../ts/native.js'

test('a native "CODE: message" error becomes code and message', (t) => {
  const native = new Error('MOUNT_FAILED: mount(2) on /x failed: Permission denied (os error 13)')
  const err = toBlockfuseError(native)
  t.true(err instanceof BlockfuseError)
  t.is(err.code, 'MOUNT_FAILED')
  t.is(err.message, 'mount(2) on /x failed: Permission denied (os error 13)')
  t.is(err.cause, native)
})

test('every documented native code is mapped, multi-line messages are kept whole', (t) => {
  for (const code of [
    'SOURCE_OPEN_FAILED',
    'MOUNTPOINT_NOT_FOUND',
    'MOUNTPOINT_NOT_FILE',
    'FUSE_DEVICE_FAILED',
    'MOUNT_FAILED',
    'INIT_FAILED',
    'INVALID_CONFIG',
    'CLOSE_FAILED',
    'INTERNAL',
  ]) {
    t.is(toBlockfuseError(new Error(`${code}: x\ny`)).code, code)
    t.is(toBlockfuseError(new Error(`${code}: x\ny`)).message, 'x\ny')
  }
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

test('the built binding has the shape ts/native.ts declares', (t) => {
  const binding = createRequire(import.meta.url)('../native/binding.cjs') as Record<string, unknown>
  const NativeExport = binding.NativeExport as { mount?: unknown; prototype?: object } | undefined
  t.is(typeof NativeExport?.mount, 'function', 'NativeExport.mount')
  t.is(typeof Object.getOwnPropertyDescriptor(NativeExport?.prototype ?? {}, 'close')?.value, 'function', 'close()')
  t.is(typeof Object.getOwnPropertyDescriptor(NativeExport?.prototype ?? {}, 'size')?.get, 'function', 'get size')
  t.is(typeof binding.version, 'function', 'version()')
})
