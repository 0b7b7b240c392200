/**
 * Every option rejection by its stable `code`: pure validation of ts/options.ts, then the same
 * through FuseExport.create with real files, directories and mounts.
 */
import { mkdir, symlink, writeFile } from 'node:fs/promises'
import { join, resolve } from 'node:path'

import test from 'ava'

import {
  BlockfuseError,
  FuseExport,
  isBlockfuseError,
  normalizeOptions,
  parseSize,
  type BlockfuseErrorCode,
  type FuseExportOptions,
} from '../ts/index.js'
import { parseMountinfo } from '../ts/options.js'
import { imageFixture, withExport } from './helpers/exports.js'
import { isMounted } from './helpers/mounts.js'
import { mustRun } from './helpers/run.js'

// --- pure validation -------------------------------------------------------------------------

const base = { source: '/img.raw', mountpoint: '/mnt' }

test('defaults are applied and paths made absolute', (t) => {
  const raw = normalizeOptions({ source: 'img.raw', mountpoint: 'mnt' })
  t.deepEqual(raw, {
    source: join(process.cwd(), 'img.raw'),
    mountpoint: join(process.cwd(), 'mnt'),
    format: 'auto',
    writable: false,
    growable: false,
    snapshot: false,
    allowOther: 'auto',
    threads: 1,
    cache: 'writeback',
    writethrough: false,
    ioUring: 'auto',
    passthrough: 'auto',
    locking: 'auto',
    forceShare: false,
    onHalt: 'unmount',
  })
  const nul = normalizeOptions({ source: { null: '1G' }, mountpoint: '/mnt' })
  t.deepEqual(nul.source, { null: 1024 ** 3 })
  t.is(nul.format, 'null')
})

test('explicit options are kept', (t) => {
  const o = normalizeOptions({
    ...base,
    format: 'raw',
    writable: true,
    growable: true,
    allowOther: 'off',
    threads: 64,
    cache: 'none',
    writethrough: true,
    ioUring: 'off',
    passthrough: 'on',
    locking: 'on',
    onHalt: 'keep',
    // undefined means "not given"
    source: '/img.raw',
  })
  t.like(o, {
    writable: true,
    growable: true,
    allowOther: 'off',
    threads: 64,
    cache: 'none',
    writethrough: true,
    ioUring: 'off',
    passthrough: 'on',
    locking: 'on',
    onHalt: 'keep',
  })
  t.is(normalizeOptions({ ...base, forceShare: true }).forceShare, true)
  t.is(normalizeOptions({ ...base, writable: undefined }).writable, false)
})

const invalidOptions: Array<[string, unknown, RegExp]> = [
  ['options that are not an object', 'img.raw', /options must be an object/],
  ['null options', null, /options must be an object/],
  ['an unknown option', { ...base, readonly: true }, /unknown option "readonly"/],
  ['an unknown locking mode', { ...base, locking: 'yes' }, /"locking"/],
  ['forceShare on a writable export', { ...base, writable: true, forceShare: true }, /"forceShare" is for read-only/],
  ['a missing source', { mountpoint: '/mnt' }, /"source" is required/],
  ['an empty source', { ...base, source: '' }, /"source" must not be an empty path/],
  ['a numeric source', { ...base, source: 42 }, /"source" must be a path or \{ null: <size> \}, got 42/],
  ['a source object with other keys', { ...base, source: { null: 1, raw: 'x' } }, /"source" must be a path/],
  ['a missing mountpoint', { source: '/img.raw' }, /"mountpoint" is required/],
  ['a non-string mountpoint', { ...base, mountpoint: ['/mnt'] }, /"mountpoint" must be a path, got an array/],
  ['a non-boolean writable', { ...base, writable: 'yes' }, /"writable" must be a boolean, got "yes"/],
  ['a non-boolean writethrough', { ...base, writethrough: 1 }, /"writethrough" must be a boolean, got 1/],
  ['an unknown ioUring mode', { ...base, ioUring: 'yes' }, /"ioUring" must be one of "auto", "on", "off", got "yes"/],
  [
    'an unknown passthrough mode',
    { ...base, passthrough: 'yes' },
    /"passthrough" must be one of "auto", "on", "off", got "yes"/,
  ],
  ['growable without writable', { ...base, growable: true }, /"growable" needs "writable: true"/],
  ['partition 0', { ...base, partition: 0 }, /"partition" must be a partition number from 1/],
  ['a fractional partition', { ...base, partition: 1.5 }, /"partition" must be a partition number from 1/],
  ['partition with offset', { ...base, partition: 1, offset: '1M' }, /"partition" excludes "offset" and "size"/],
  ['a negative offset', { ...base, offset: -512 }, /"offset" -512 is invalid: it must not be negative/],
  ['a zero size', { ...base, size: 0 }, /"size" 0 is invalid: it must be greater than 0/],
  ['a size with a bad unit', { ...base, size: '1X' }, /"size" "1X" is invalid: expected a decimal integer/],
  [
    'snapshot with overlay',
    { ...base, snapshot: true, overlay: '/ov.qcow2' },
    /"snapshot" and "overlay" exclude each other/,
  ],
  ['an empty overlay path', { ...base, overlay: '' }, /"overlay" must be a non-empty path/],
  [
    'an overlay of a null source',
    { source: { null: '1M' }, mountpoint: '/mnt', overlay: '/ov.qcow2' },
    /"overlay" needs an image file/,
  ],
  [
    'growable with a snapshot',
    { ...base, writable: true, growable: true, snapshot: true },
    /"growable" cannot be used with a slice, a snapshot or an overlay/,
  ],
  [
    'a bad format',
    { ...base, format: 'vhdx' },
    /"format" must be one of "raw", "qcow2", "vmdk", "null", "auto", got "vhdx"/,
  ],
  ['format null with a path', { ...base, format: 'null' }, /"format" is "null" but "source" is a path \("\/img.raw"\)/],
  [
    'format raw with a null source',
    { ...base, source: { null: 1 }, format: 'raw' },
    /"format" is "raw" but "source" is a null backend/,
  ],
  [
    'format qcow2 with a null source',
    { ...base, source: { null: 1 }, format: 'qcow2' },
    /"format" is "qcow2" but "source" is a null backend/,
  ],
  [
    'format auto with a null source',
    { ...base, source: { null: 1 }, format: 'auto' },
    /"format" is "auto" but "source" is a null backend/,
  ],
  ['a boolean allowOther', { ...base, allowOther: true }, /"allowOther" must be one of "on", "off", "auto", got true/],
  ['a bad allowOther', { ...base, allowOther: 'maybe' }, /"allowOther" must be one of .* got "maybe"/],
  ['a bad cache', { ...base, cache: 'direct' }, /"cache" must be one of "writeback", "none", got "direct"/],
  ['a bad onHalt', { ...base, onHalt: 'stop' }, /"onHalt" must be one of "unmount", "keep", got "stop"/],
  ['zero threads', { ...base, threads: 0 }, /"threads" must be an integer from 1 to 64, got 0/],
  ['too many threads', { ...base, threads: 65 }, /got 65/],
  ['fractional threads', { ...base, threads: 1.5 }, /got 1.5/],
  ['threads as a string', { ...base, threads: '2' }, /got "2"/],
  ['NaN threads', { ...base, threads: Number.NaN }, /got NaN/],
]

for (const [what, input, message] of invalidOptions) {
  test(`INVALID_OPTION: ${what}`, (t) => {
    const err = t.throws(() => normalizeOptions(input), { instanceOf: BlockfuseError, message })
    t.is(err?.code, 'INVALID_OPTION')
  })
}

const validSizes: Array<[number | bigint | string, number]> = [
  [4096, 4096],
  [4096n, 4096],
  ['4096', 4096],
  ['4096B', 4096],
  ['64k', 64 * 1024],
  ['64K', 64 * 1024],
  ['64KiB', 64 * 1024],
  ['512M', 512 * 1024 ** 2],
  ['512Mi', 512 * 1024 ** 2],
  ['1G', 1024 ** 3],
  ['1GB', 1024 ** 3],
  ['2T', 2 * 1024 ** 4],
  [Number.MAX_SAFE_INTEGER, Number.MAX_SAFE_INTEGER],
  [String(Number.MAX_SAFE_INTEGER), Number.MAX_SAFE_INTEGER],
]

for (const [input, bytes] of validSizes) {
  test(`null size ${typeof input === 'bigint' ? `${input}n` : JSON.stringify(input)} is ${bytes} bytes`, (t) => {
    t.is(parseSize(input), bytes)
  })
}

const invalidSizes: unknown[] = [
  0,
  0n,
  '0',
  '0G',
  -1,
  -1n,
  '-1',
  1.5,
  '1.5G',
  '',
  ' 1G',
  'abc',
  '1X',
  '1 G',
  '+5',
  '0x10',
  2 ** 53,
  2n ** 53n,
  '8192T',
  Number.POSITIVE_INFINITY,
  Number.NaN,
  true,
  null,
  undefined,
]

for (const input of invalidSizes) {
  test(`NULL_SIZE_INVALID: ${typeof input === 'bigint' ? `${input}n` : typeof input === 'string' ? JSON.stringify(input) : String(input)}`, (t) => {
    const err = t.throws(() => normalizeOptions({ source: { null: input }, mountpoint: '/mnt' }), {
      instanceOf: BlockfuseError,
      message: /^null backend size .* is invalid: /,
    })
    t.is(err?.code, 'NULL_SIZE_INVALID')
  })
}

test("source 'null:<size>' (the CLI's spelling) is a null backend; './null:x' is a path", (t) => {
  const nul = normalizeOptions({ source: 'null:1G', mountpoint: '/mnt' })
  t.deepEqual(nul.source, { null: 1024 ** 3 })
  t.is(nul.format, 'null')
  t.is(normalizeOptions({ source: './null:1G', mountpoint: '/mnt' }).source, resolve('null:1G'))
  const err = t.throws(() => normalizeOptions({ source: 'null:0', mountpoint: '/mnt' }))
  t.true(isBlockfuseError(err, 'NULL_SIZE_INVALID'))
  t.throws(() => normalizeOptions({ source: 'null:1G', mountpoint: '/mnt', format: 'raw' }), {
    message: /"format" is "raw" but "source" is a null backend/,
  })
})

test('error codes are a closed union: a misspelt code does not compile', (t) => {
  const err: unknown = new BlockfuseError('MOUNT_FAILED', 'x')
  // The directives below fail the type check (npm run lint) if the misspelt codes ever compile.
  // @ts-expect-error: 'MOUNT_FAILD' is not a BlockfuseErrorCode
  t.false(isBlockfuseError(err, 'MOUNT_FAILD'))
  // @ts-expect-error: neither is it for the constructor
  t.is(new BlockfuseError('NO_SUCH_CODE', 'x').code, 'NO_SUCH_CODE')
  if (isBlockfuseError(err)) {
    const code: BlockfuseErrorCode = err.code
    // @ts-expect-error: `code` is the union, so comparing with a misspelt code is an error too
    t.false(code === 'MOUNT_FAILD')
  }
  // The typed API takes the CLI's null spelling.
  const options: FuseExportOptions = { source: 'null:1G', mountpoint: 'null.mnt' }
  t.is(options.source, 'null:1G')
})

test('mountinfo lines are parsed with their escapes decoded', (t) => {
  const text = [
    '22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw',
    '42 27 254:0 /tmp/a /tmp/sp\\040ace/m\\011x rw,relatime - ext4 /dev/vda rw',
    '50 22 0:45 / /tmp/img.mnt rw,nosuid,nodev,relatime shared:3 master:1 - fuse /dev/fuse rw,user_id=0',
    'garbage',
    '',
  ].join('\n')
  t.deepEqual(parseMountinfo(text), [
    { mountPoint: '/', fsType: 'ext4', source: '/dev/sda1' },
    { mountPoint: '/tmp/sp ace/m\tx', fsType: 'ext4', source: '/dev/vda' },
    { mountPoint: '/tmp/img.mnt', fsType: 'fuse', source: '/dev/fuse' },
  ])
})

// --- FuseExport.create with real files -------------------------------------------------------

async function rejects(t: import('ava').ExecutionContext, options: unknown, code: BlockfuseErrorCode, message: RegExp) {
  const err = await t.throwsAsync(FuseExport.create(options as FuseExportOptions), {
    instanceOf: BlockfuseError,
    message,
  })
  t.is(err?.code, code, `expected ${code}, got ${err?.code}: ${err?.message}`)
}

test('create: a missing mountpoint is MOUNTPOINT_NOT_FOUND', async (t) => {
  const f = await imageFixture(t)
  await rejects(
    t,
    { source: f.image, mountpoint: join(f.dir, 'nope') },
    'MOUNTPOINT_NOT_FOUND',
    /mountpoint ".*\/nope" does not exist/,
  )
  await rejects(
    t,
    { source: f.image, mountpoint: join(f.dir, 'no/such/dir/mnt') },
    'MOUNTPOINT_NOT_FOUND',
    /does not exist/,
  )
})

test('create: a directory mountpoint is MOUNTPOINT_NOT_FILE', async (t) => {
  const f = await imageFixture(t)
  const dir = join(f.dir, 'dir')
  await mkdir(dir)
  await rejects(
    t,
    { source: f.image, mountpoint: dir },
    'MOUNTPOINT_NOT_FILE',
    /mountpoint ".*\/dir" is a directory; it must be a regular file/,
  )
  await rejects(t, { source: f.image, mountpoint: '/' }, 'MOUNTPOINT_NOT_FILE', /is a directory/)
  const link = join(f.dir, 'link-to-dir')
  await symlink(dir, link)
  await rejects(t, { source: f.image, mountpoint: link }, 'MOUNTPOINT_NOT_FILE', /is a directory/)
})

test('create: a FIFO mountpoint is MOUNTPOINT_NOT_FILE', async (t) => {
  const f = await imageFixture(t)
  const fifo = join(f.dir, 'fifo')
  await mustRun('mkfifo', [fifo])
  await rejects(t, { source: f.image, mountpoint: fifo }, 'MOUNTPOINT_NOT_FILE', /is a FIFO/)
})

test('create: a mountpoint with something else mounted on it is MOUNTPOINT_IN_USE', async (t) => {
  const f = await imageFixture(t)
  const other = join(f.dir, 'other')
  await writeFile(other, 'x')
  await mustRun('mount', ['--bind', other, f.mountpoint])
  try {
    t.true(await isMounted(f.mountpoint))
    await rejects(
      t,
      { source: f.image, mountpoint: f.mountpoint },
      'MOUNTPOINT_IN_USE',
      /already has a filesystem \(ext4\) mounted on it/,
    )
  } finally {
    await mustRun('umount', [f.mountpoint])
  }
})

test('create: a mountpoint this process already exports is MOUNTPOINT_IN_USE, also through another path', async (t) => {
  const f = await imageFixture(t)
  const alias = join(f.dir, 'alias')
  await symlink(f.mountpoint, alias)
  await withExport({ source: f.image, mountpoint: f.mountpoint }, async () => {
    await rejects(
      t,
      { source: f.image, mountpoint: f.mountpoint },
      'MOUNTPOINT_IN_USE',
      /is already exported by this process/,
    )
    await rejects(
      t,
      { source: { null: '1M' }, mountpoint: alias },
      'MOUNTPOINT_IN_USE',
      /is already exported by this process/,
    )
    await rejects(
      t,
      { source: f.image, mountpoint: join(f.dir, '.', 'x', '..', 'mnt') },
      'MOUNTPOINT_IN_USE',
      /already exported/,
    )
  })
  t.false(await isMounted(f.mountpoint))
})

test('create: two concurrent exports on one mountpoint, one wins and the other is MOUNTPOINT_IN_USE', async (t) => {
  const f = await imageFixture(t)
  const results = await Promise.allSettled([
    FuseExport.create({ source: f.image, mountpoint: f.mountpoint }),
    FuseExport.create({ source: f.image, mountpoint: f.mountpoint }),
  ])
  const won = results.filter((r): r is PromiseFulfilledResult<FuseExport> => r.status === 'fulfilled')
  const lost = results.filter((r): r is PromiseRejectedResult => r.status === 'rejected')
  for (const r of won) await r.value.close()
  t.is(won.length, 1, `rejections: ${lost.map((r) => String(r.reason)).join('; ')}`)
  t.is((lost[0]?.reason as BlockfuseError | undefined)?.code, 'MOUNTPOINT_IN_USE')
  t.false(await isMounted(f.mountpoint))
})

test('create: a missing source is SOURCE_NOT_FOUND', async (t) => {
  const f = await imageFixture(t)
  await rejects(
    t,
    { source: join(f.dir, 'missing.raw'), mountpoint: f.mountpoint },
    'SOURCE_NOT_FOUND',
    /source ".*\/missing.raw" does not exist/,
  )
})

test('create: a directory source is SOURCE_NOT_FILE', async (t) => {
  const f = await imageFixture(t)
  await rejects(
    t,
    { source: f.dir, mountpoint: f.mountpoint },
    'SOURCE_NOT_FILE',
    /source ".*" is a directory; it must be a regular file or a block device/,
  )
})

test('create: rejects a bad null size, growable without writable, bad threads, an unknown option, a bad allowOther', async (t) => {
  const f = await imageFixture(t)
  const mp = { mountpoint: f.mountpoint }
  await rejects(t, { ...mp, source: { null: '1.5G' } }, 'NULL_SIZE_INVALID', /null backend size "1.5G" is invalid/)
  await rejects(t, { ...mp, source: { null: 0 } }, 'NULL_SIZE_INVALID', /greater than 0/)
  await rejects(t, { ...mp, source: f.image, growable: true }, 'INVALID_OPTION', /"growable" needs "writable: true"/)
  await rejects(t, { ...mp, source: f.image, threads: 0 }, 'INVALID_OPTION', /"threads"/)
  await rejects(t, { ...mp, source: f.image, threads: 1000 }, 'INVALID_OPTION', /got 1000/)
  await rejects(t, { ...mp, source: f.image, allowOthers: 'on' }, 'INVALID_OPTION', /unknown option "allowOthers"/)
  await rejects(
    t,
    { ...mp, source: f.image, allowOther: 'yes' },
    'INVALID_OPTION',
    /"allowOther" must be one of "on", "off", "auto", got "yes"/,
  )
  t.false(await isMounted(f.mountpoint))
})

test('create: a mount that fails in the native core leaves no claim behind', async (t) => {
  const f = await imageFixture(t)
  // A read-only bind mount of the image: the native core cannot open it for writing.
  const readOnly = join(f.dir, 'ro.raw')
  await writeFile(readOnly, '')
  await mustRun('mount', ['--bind', f.image, readOnly])
  try {
    await mustRun('mount', ['-o', 'remount,bind,ro', readOnly])
    const err = await t.throwsAsync(FuseExport.create({ source: readOnly, mountpoint: f.mountpoint, writable: true }), {
      instanceOf: BlockfuseError,
    })
    t.is(err?.code, 'SOURCE_OPEN_FAILED', `got ${err?.code}: ${err?.message}`)
    t.false(await isMounted(f.mountpoint))
    await withExport({ source: readOnly, mountpoint: f.mountpoint }, async (exp) => {
      t.is(exp.mountpoint, f.mountpoint)
      t.true(await isMounted(f.mountpoint))
    })
  } finally {
    await mustRun('umount', [readOnly])
  }
})

test('nbd.requestTimeout: 30 s by default, 0 allowed (never), negative or non-numbers refused', (t) => {
  const src = { source: 'nbd://127.0.0.1/x', mountpoint: '/mnt' }
  t.is(normalizeOptions(src).nbd?.requestTimeout, 30)
  t.is(normalizeOptions({ ...src, nbd: { requestTimeout: 0 } }).nbd?.requestTimeout, 0)
  t.is(normalizeOptions({ ...src, nbd: { requestTimeout: 2.5 } }).nbd?.requestTimeout, 2.5)
  for (const bad of [-1, 'x', Number.NaN, 86401]) {
    const err = t.throws(() => normalizeOptions({ ...src, nbd: { requestTimeout: bad as number } }), {
      instanceOf: BlockfuseError,
      message: /nbd\.requestTimeout/,
    })
    t.is(err?.code, 'INVALID_OPTION')
  }
})
