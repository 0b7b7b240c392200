/**
 * Issue 7, backend faults end to end: the CLI exports a raw image with BLOCKFUSE_FAULTS (the
 * test-only fault injector: EIO / ENOSPC on chosen byte ranges, a failing flush, latency), and real
 * clients (O_DIRECT preads and pwrites per 4 KiB block, dd, fsync) see that errno on exactly the
 * affected requests, the export keeps serving all others, and nothing hangs.
 */
import { readFile } from 'node:fs/promises'

import test from 'ava'

import { assertCliBuilt } from './helpers/cli.js'
import { assertE2eEnvironment } from './helpers/env.js'
import { imageFixture } from './helpers/exports.js'
import { MiB } from './helpers/files.js'
import { isMounted } from './helpers/mounts.js'
import { blockPattern, probeBlocks, startCli } from './helpers/reliability.js'
import { client } from './helpers/semantics.js'

const B = 4096

test.before(() => {
  assertCliBuilt()
  assertE2eEnvironment(['python3', 'dd', 'findmnt'])
})

/** Indexes of blocks [first, first+count) whose probe result differs from 'ok'. */
function failed(results: string[], first: number): Map<number, string> {
  const out = new Map<number, string>()
  results.forEach((r, i) => r !== 'ok' && out.set(first + i, r))
  return out
}

function range(from: number, to: number, value: string): Map<number, string> {
  return new Map(Array.from({ length: to - from }, (_, i) => [from + i, value]))
}

test('EIO and ENOSPC on exactly the affected 4 KiB requests; all others served; the image keeps only acknowledged writes', async (t) => {
  t.timeout(120_000)
  const f = await imageFixture(t, 8 * MiB)
  // Reads and writes over [1M, 1M+8K) fail EIO; writes over [4M, 5M) ENOSPC (reads there work);
  // every request waits 2 ms (on the injector's timer thread, not the queue).
  const faults = `eio@1M-${MiB + 2 * B},enospc@4M-5M:w,delay=2ms`
  const cli = startCli(
    t,
    ['export', '--writable', '--format', 'raw', '--threads', '2', f.image, f.mountpoint],
    f.mountpoint,
    {
      env: { ...process.env, BLOCKFUSE_FAULTS: faults },
    },
  )
  await cli.waitFor(/^ready/m)
  t.regex(cli.stderr, /BLOCKFUSE_FAULTS is set: injecting faults \(eio@1M-.*\); for tests only/)

  // Reads of [0, 2M) per block: only blocks 256 and 257 fail, with EIO.
  const reads = await probeBlocks(f.mountpoint, 'read', 0, 512)
  t.deepEqual(failed(reads, 0), range(256, 258, 'EIO'))
  // A read straddling into the range from outside fails as a whole (one request).
  t.deepEqual(await probeBlocks(f.mountpoint, 'read', MiB - B, 1, 2 * B), ['EIO'])
  // ENOSPC is write-only: the reads there succeed.
  t.deepEqual(failed(await probeBlocks(f.mountpoint, 'read', 4 * MiB, 256), 0).size, 0)

  // dd as a client: the same answer, with the errno's text.
  const bad = await client('dd', [
    `if=${f.mountpoint}`,
    'of=/dev/null',
    `bs=${B}`,
    'skip=257',
    'count=1',
    'iflag=direct',
  ])
  t.not(bad.code, 0)
  t.regex(bad.stderr, /Input\/output error/)
  const good = await client('dd', [
    `if=${f.mountpoint}`,
    'of=/dev/null',
    `bs=${B}`,
    'skip=258',
    'count=1',
    'iflag=direct',
  ])
  t.is(good.code, 0, good.stderr)

  // Writes of [3M, 6M) per block: exactly the 256 blocks of [4M, 5M) get ENOSPC.
  const writes = await probeBlocks(f.mountpoint, 'write', 3 * MiB, 768)
  t.deepEqual(failed(writes, 3 * 256), range(4 * 256, 5 * 256, 'ENOSPC'))
  // Writes into the EIO range fail EIO, around it they work.
  t.deepEqual(await probeBlocks(f.mountpoint, 'write', MiB - B, 4), ['ok', 'EIO', 'EIO', 'ok'])
  const ddw = await client('dd', [
    'if=/dev/zero',
    `of=${f.mountpoint}`,
    `bs=${B}`,
    `seek=${4 * 256 + 9}`,
    'count=1',
    'oflag=direct',
    'conv=notrunc',
  ])
  t.not(ddw.code, 0)
  t.regex(ddw.stderr, /No space left on device/)

  // Still serving: a full read of an unaffected range matches, and the process is alive.
  t.deepEqual(failed(await probeBlocks(f.mountpoint, 'read', 2 * MiB, 256), 0).size, 0)
  t.true(await isMounted(f.mountpoint))
  t.is(cli.child.exitCode, null)

  t.is((await cli.stop('SIGINT')).code, 0, cli.output)
  t.false(await isMounted(f.mountpoint))
  const image = await readFile(f.image)
  const want = Buffer.from(f.data)
  for (let i = 3 * 256; i < 6 * 256; i++) if (i < 4 * 256 || i >= 5 * 256) blockPattern(i).copy(want, i * B)
  blockPattern(MiB / B - 1).copy(want, MiB - B)
  blockPattern(MiB / B + 2).copy(want, MiB + 2 * B)
  t.true(image.equals(want), 'the image holds every acknowledged write and nothing of the refused ones')
})

test('a failing flush: fsync, fdatasync and dd conv=fsync report EIO, reads go on, close reports it and still unmounts', async (t) => {
  const f = await imageFixture(t, MiB)
  const cli = startCli(t, ['export', '--writable', '--format', 'raw', f.image, f.mountpoint], f.mountpoint, {
    env: { ...process.env, BLOCKFUSE_FAULTS: 'flush=eio' },
  })
  await cli.waitFor(/^ready/m)
  const script = String.raw`
import errno, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
os.pwrite(fd, b'x' * 512, 0)
for name, call in (('fsync', os.fsync), ('fdatasync', os.fdatasync)):
    try:
        call(fd)
        print(name, 'ok')
    except OSError as e:
        print(name, errno.errorcode[e.errno])
print('read', len(os.pread(fd, 4096, 0)))
`
  const r = await client('python3', ['-c', script, f.mountpoint])
  t.is(r.code, 0, r.stderr)
  t.deepEqual(r.stdout.trim().split('\n'), ['fsync EIO', 'fdatasync EIO', 'read 4096'])
  const dd = await client('dd', ['if=/dev/zero', `of=${f.mountpoint}`, 'bs=512', 'count=1', 'conv=notrunc,fsync'])
  t.not(dd.code, 0)
  t.regex(dd.stderr, /Input\/output error/)
  // Closing flushes too: the failure is reported (exit 1), and the CLI still unmounts.
  const exit = await cli.stop('SIGINT')
  t.false(await isMounted(f.mountpoint))
  t.is(exit.code, 1, cli.output)
  t.regex(cli.stderr, /final flush failed: Input\/output error/)
})

test('a bad BLOCKFUSE_FAULTS is refused at mount with INVALID_CONFIG', async (t) => {
  const f = await imageFixture(t, MiB)
  const cli = startCli(t, ['export', f.image, f.mountpoint], f.mountpoint, {
    env: { ...process.env, BLOCKFUSE_FAULTS: 'eio@5' },
  })
  const exit = await cli.stop(undefined)
  t.is(exit.code, 1)
  t.regex(cli.stderr, /BLOCKFUSE_FAULTS: bad range in "eio@5".*\(INVALID_CONFIG\)/)
  t.false(await isMounted(f.mountpoint))
})
