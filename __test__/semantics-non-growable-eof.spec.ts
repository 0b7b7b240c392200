/**
 * iotest 308 "Try growing non-growable export": writes at or past EOF of a writable, non-growable
 * export write nothing and fail with ENOSPC (never a 0-byte write, which Node's fs functions retry
 * forever), a write straddling EOF writes the part before it,
 * a read straddling EOF is short and a read past EOF is empty. Export and image keep their size.
 */
import { randomBytes } from 'node:crypto'
import { open, readFile, writeFile } from 'node:fs/promises'
import { join } from 'node:path'

import test from 'ava'

import { assertE2eEnvironment } from './helpers/env.js'
import { imageFixture } from './helpers/exports.js'
import { KiB, MiB } from './helpers/files.js'
import { run } from './helpers/run.js'
import { client, ddRecords, openExport, sizeOf } from './helpers/semantics.js'

test.before(() => {
  assertE2eEnvironment(['dd', 'stat', 'findmnt'])
})

const LEN = 4 * MiB

test('dd at EOF (bs=1 count=64k seek=EOF conv=notrunc) fails with ENOSPC and writes nothing', async (t) => {
  const f = await imageFixture(t, LEN)
  await openExport(t, { source: f.image, mountpoint: f.mountpoint, writable: true })
  const r = await client('dd', [
    'if=/dev/zero',
    `of=${f.mountpoint}`,
    'bs=1',
    'count=64k',
    `seek=${LEN}`,
    'conv=notrunc',
  ])
  t.not(r.code, 0)
  t.true(r.stderr.includes(`dd: error writing '${f.mountpoint}': No space left on device`), r.stderr)
  t.deepEqual(ddRecords(r.stderr), { fullIn: 1, partialIn: 0, fullOut: 0, partialOut: 0 })
  t.is(await sizeOf(f.mountpoint), LEN, 'the export did not grow')
  t.is(await sizeOf(f.image), LEN, 'the image did not grow')
})

test('dd squarely past EOF (seek=EOF+32k count=1) fails with ENOSPC and writes nothing', async (t) => {
  const f = await imageFixture(t, LEN)
  await openExport(t, { source: f.image, mountpoint: f.mountpoint, writable: true })
  const r = await client('dd', [
    'if=/dev/zero',
    `of=${f.mountpoint}`,
    'bs=1',
    'count=1',
    `seek=${LEN + 32 * KiB}`,
    'conv=notrunc',
  ])
  t.not(r.code, 0)
  t.true(r.stderr.includes(`dd: error writing '${f.mountpoint}': No space left on device`), r.stderr)
  t.deepEqual(ddRecords(r.stderr), { fullIn: 1, partialIn: 0, fullOut: 0, partialOut: 0 })
  t.is(await sizeOf(f.mountpoint), LEN)
  t.is(await sizeOf(f.image), LEN)
  t.true((await readFile(f.image)).equals(f.data), 'the image is unchanged')
})

test('a write straddling EOF writes the part before EOF, then ENOSPC', async (t) => {
  const f = await imageFixture(t, LEN)
  const pattern = randomBytes(64 * KiB)
  const patternFile = join(f.dir, 'pattern')
  await writeFile(patternFile, pattern)
  await openExport(t, { source: f.image, mountpoint: f.mountpoint, writable: true })
  const r = await client('dd', [
    `if=${patternFile}`,
    `of=${f.mountpoint}`,
    'bs=64k',
    'count=1',
    `seek=${LEN - 32 * KiB}`,
    'oflag=seek_bytes',
    'conv=notrunc',
  ])
  t.not(r.code, 0, 'the second half cannot be written')
  t.true(r.stderr.includes('No space left on device'), r.stderr)
  // dd counts no record out for a write that ended in an error, but reports the bytes it wrote.
  t.deepEqual(ddRecords(r.stderr), { fullIn: 1, partialIn: 0, fullOut: 0, partialOut: 0 })
  t.regex(r.stderr, /^32768 bytes \(33 kB, 32 KiB\) copied/m)
  t.is(await sizeOf(f.image), LEN)
  const expected = Buffer.from(f.data)
  pattern.copy(expected, LEN - 32 * KiB, 0, 32 * KiB)
  t.true((await readFile(f.image)).equals(expected), 'the first 32 KiB landed before EOF')
})

test('a read straddling EOF (bs=1 count=64k skip=EOF-32k) reads exactly 32768 bytes', async (t) => {
  const f = await imageFixture(t, LEN)
  await openExport(t, { source: f.image, mountpoint: f.mountpoint, writable: true })
  const out = join(f.dir, 'tail')
  const r = await client('dd', [`if=${f.mountpoint}`, `of=${out}`, 'bs=1', 'count=64k', `skip=${LEN - 32 * KiB}`])
  t.is(r.code, 0, r.stderr)
  t.deepEqual(ddRecords(r.stderr), { fullIn: 32768, partialIn: 0, fullOut: 32768, partialOut: 0 })
  t.true((await readFile(out)).equals(f.data.subarray(LEN - 32 * KiB)), 'the bytes are the image tail')
})

test('a read past EOF (bs=1 count=1 skip=EOF+32k) reads 0 bytes', async (t) => {
  const f = await imageFixture(t, LEN)
  await openExport(t, { source: f.image, mountpoint: f.mountpoint, writable: true })
  const out = join(f.dir, 'nothing')
  const r = await client('dd', [`if=${f.mountpoint}`, `of=${out}`, 'bs=1', 'count=1', `skip=${LEN + 32 * KiB}`])
  t.true(r.stderr.includes(`dd: ${f.mountpoint}: cannot skip to specified offset`), r.stderr)
  t.deepEqual(ddRecords(r.stderr), { fullIn: 0, partialIn: 0, fullOut: 0, partialOut: 0 })
  t.is((await readFile(out)).length, 0)
  // The same with plain preads: at EOF and past it both read nothing, without an error.
  const fh = await open(f.mountpoint, 'r')
  try {
    const buf = Buffer.alloc(4 * KiB)
    t.is((await fh.read(buf, 0, buf.length, LEN)).bytesRead, 0, 'pread at EOF')
    t.is((await fh.read(buf, 0, buf.length, LEN + 32 * KiB)).bytesRead, 0, 'pread past EOF')
  } finally {
    await fh.close()
  }
})

/**
 * Node's fs functions repeat a write until everything is written, so a 0-byte answer made them spin
 * (issue 22). They run in a child process under a deadline: a regression fails the test instead of
 * spinning the test's own thread pool.
 */
const NODE_CLIENT = `
const fs = require('node:fs')
const [path, how, at] = process.argv.slice(1)
const data = Buffer.alloc(100, 0x5a)
const done = (err) => { process.stdout.write(JSON.stringify(err ? { code: err.code } : { ok: true })) }
if (how === 'appendFile') fs.appendFile(path, data, done)
else if (how === 'writeFile-a') fs.writeFile(path, data, { flag: 'a' }, done)
else {
  const fd = fs.openSync(path, 'r+')
  try { fs.writeSync(fd, data, 0, data.length, Number(at)); done() } catch (e) { done(e) }
}
`

async function nodeClient(path: string, how: string, at = 0): Promise<{ code?: string; ok?: boolean }> {
  const r = await run('timeout', ['-k', '1', '20', process.execPath, '-e', NODE_CLIENT, path, how, String(at)])
  if (r.code !== 0) throw new Error(`node client ${how} exited ${r.code ?? r.signal}: ${r.stderr}`)
  return JSON.parse(r.stdout) as { code?: string; ok?: boolean }
}

for (const how of ['appendFile', 'writeFile-a'] as const) {
  test(`fs.${how === 'appendFile' ? 'appendFile' : "writeFile(flag 'a')"} at the end throws ENOSPC and writes nothing`, async (t) => {
    const f = await imageFixture(t, LEN)
    const exp = await openExport(t, { source: f.image, mountpoint: f.mountpoint, writable: true })
    t.deepEqual(await nodeClient(f.mountpoint, how), { code: 'ENOSPC' })
    t.is(await sizeOf(f.mountpoint), LEN)
    t.true((await readFile(f.image)).equals(f.data), 'the image is unchanged')
    t.true(exp.stats().requests.WRITE <= 4, `a handful of WRITEs, not a spin: ${exp.stats().requests.WRITE}`)
  })
}

test('fs.writeSync at and past EOF throws ENOSPC; across EOF it writes the part before EOF', async (t) => {
  const f = await imageFixture(t, LEN)
  await openExport(t, { source: f.image, mountpoint: f.mountpoint, writable: true })
  t.deepEqual(await nodeClient(f.mountpoint, 'writeSync', LEN), { code: 'ENOSPC' })
  t.deepEqual(await nodeClient(f.mountpoint, 'writeSync', LEN + 4096), { code: 'ENOSPC' })
  // writeSync writes once: the part before EOF (a short write is not an error).
  t.deepEqual(await nodeClient(f.mountpoint, 'writeSync', LEN - 10), { ok: true })
  const expected = Buffer.from(f.data)
  expected.fill(0x5a, LEN - 10)
  t.true((await readFile(f.image)).equals(expected), 'exactly the 10 bytes before EOF were written')
  t.is(await sizeOf(f.image), LEN)
})
