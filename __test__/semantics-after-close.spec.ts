/**
 * iotest 308 "Remove export": once the export is closed the mountpoint is the plain file it was:
 * same inode, size, mode, owner, times and content, and findmnt finds nothing on it. This holds
 * even after the export's own attributes were changed (chmod, truncate, writes).
 */
import { spawn } from 'node:child_process'
import { chmod, readFile, stat, writeFile } from 'node:fs/promises'
import { setTimeout as sleep } from 'node:timers/promises'

import test from 'ava'

import { assertE2eEnvironment } from './helpers/env.js'
import { imageFixture } from './helpers/exports.js'
import { MiB } from './helpers/files.js'
import { isMounted } from './helpers/mounts.js'
import { C_ENV, client, mustClient, openExport, statField } from './helpers/semantics.js'

test.before(() => {
  assertE2eEnvironment(['stat', 'chmod', 'truncate', 'dd', 'findmnt'])
})

const STAT_FORMAT = '%i %s %a %u %g %Y %Z %F'

for (const writable of [false, true]) {
  test(`after closing a ${writable ? 'writable' : 'read-only'} export the mountpoint looks exactly as before`, async (t) => {
    const f = await imageFixture(t, 2 * MiB)
    const content = 'the file under the export\n'
    await writeFile(f.mountpoint, content)
    await chmod(f.mountpoint, 0o640)
    const before = await statField(f.mountpoint, STAT_FORMAT)
    const beforeNode = await stat(f.mountpoint)

    const exp = await openExport(t, { source: f.image, mountpoint: f.mountpoint, writable, allowOther: 'on' })
    const during = await statField(f.mountpoint, '%i %s %a')
    t.not(during, before, 'while exported the path shows the export')
    t.is(during.split(' ')[1], String(2 * MiB))
    if (writable) {
      // Change what can be changed through the export; none of it may stick to the file below.
      await mustClient('chmod', ['0644', f.mountpoint])
      await mustClient('dd', ['if=/dev/zero', `of=${f.mountpoint}`, 'bs=4k', 'count=1', 'conv=notrunc', 'status=none'])
      await mustClient('truncate', ['-s', String(MiB), f.mountpoint])
    }
    await exp.close()

    t.false(await isMounted(f.mountpoint), 'findmnt finds nothing on the mountpoint')
    const findmnt = await client('findmnt', ['-n', f.mountpoint])
    t.is(findmnt.stdout, '')
    t.is(await statField(f.mountpoint, STAT_FORMAT), before, `stat -c '${STAT_FORMAT}'`)
    const afterNode = await stat(f.mountpoint)
    t.is(afterNode.mtimeMs, beforeNode.mtimeMs)
    t.is(afterNode.ctimeMs, beforeNode.ctimeMs)
    t.is(await readFile(f.mountpoint, 'utf8'), content)
  })
}

// null: requests are answered without waiting, so the idle queue sleeps in read(2) and close()
// must end the connection to wake it; raw: after a read through the ring it waits in epoll.
for (const [backend, threads] of [
  ['null', 1],
  ['raw', 1],
  ['raw', 2],
] as const) {
  test(`close() while a client holds the file open and idle (${backend}, ${threads} thread(s)) returns promptly; the client then gets ENOTCONN`, async (t) => {
    const f = await imageFixture(t, 2 * MiB)
    const source = backend === 'null' ? { null: 2 * MiB } : f.image
    const exp = await openExport(t, { source, mountpoint: f.mountpoint, writable: true, threads })
    // The holder opens the export, reads a block through it, then waits on its fd while close()
    // runs; the lazy unmount keeps the connection alive for it, so close() must end it.
    const holder = spawn(
      'sh',
      [
        '-c',
        'exec 3<"$1"; dd bs=4k count=1 status=none <&3 >/dev/null && echo open; read _; cat <&3 >/dev/null',
        'holder',
        f.mountpoint,
      ],
      { env: C_ENV },
    )
    t.teardown(() => holder.kill('SIGKILL'))
    let stderr = ''
    holder.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d))
    await new Promise<void>((resolve, reject) => {
      holder.stdout.setEncoding('utf8').on('data', (d: string) => d.includes('open') && resolve())
      holder.on('exit', (code) =>
        reject(new Error(`the holder exited (${code}) before it opened the export: ${stderr}`)),
      )
    })
    const started = Date.now()
    await exp.close()
    t.log(`close() took ${Date.now() - started} ms with an idle client holding the file`)
    t.false(await isMounted(f.mountpoint))
    const exited = new Promise<number | null>((resolve) => holder.on('close', resolve))
    holder.stdin.end('go\n')
    t.not(await exited, 0, 'the held fd no longer reads')
    t.regex(stderr, /Transport endpoint is not connected/)
  })
}

/**
 * The errno docs/reliability.md promises per intake: a request the connection held while the queues
 * stopped fails with ECONNABORTED (read(2)) or ECANCELED/ECONNABORTED (io_uring); one sent after
 * the connection ended fails with ENOTCONN. Never a success, never a hang.
 */
const BUSY_WRITER = `
import errno, mmap, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_DIRECT)
buf = mmap.mmap(-1, 4096)
n = 0
print('go', flush=True)
while True:
    try:
        os.pwrite(fd, buf, (n % 256) * 4096)
        n += 1
    except OSError as e:
        print(errno.errorcode[e.errno], flush=True)
        sys.stdin.readline()
        break
after = []
for name, op in [('read', lambda: os.pread(fd, 4096, 0)), ('write', lambda: os.pwrite(fd, buf, 0)),
                 ('fsync', lambda: os.fsync(fd)), ('fstat', lambda: os.fstat(fd))]:
    try:
        op()
        after.append(name + ':ok')
    except OSError as e:
        after.append(name + ':' + errno.errorcode[e.errno])
print(' '.join(after), flush=True)
`

for (const ioUring of ['off', 'on'] as const) {
  test(`after close() under a busy O_DIRECT writer (${ioUring === 'on' ? 'io_uring' : 'read(2)'} intake): the errno docs/reliability.md names`, async (t) => {
    const f = await imageFixture(t, 2 * MiB)
    const exp = await openExport(t, { source: f.image, mountpoint: f.mountpoint, writable: true, threads: 2, ioUring })
    const writer = spawn('timeout', ['-k', '1', '60', 'python3', '-c', BUSY_WRITER, f.mountpoint], { env: C_ENV })
    t.teardown(() => writer.kill('SIGKILL'))
    let out = ''
    let stderr = ''
    writer.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d))
    writer.stdout.setEncoding('utf8').on('data', (d: string) => (out += d))
    const lines = async (n: number) => {
      const deadline = Date.now() + 30_000
      while (out.split('\n').length <= n) {
        if (writer.exitCode !== null || Date.now() > deadline) throw new Error(`writer: ${out} ${stderr}`)
        await sleep(20)
      }
    }
    await lines(1)
    await exp.close()
    await lines(2)
    const [, during] = out.split('\n')
    t.regex(during!, ioUring === 'on' ? /^(ECANCELED|ECONNABORTED)$/ : /^ECONNABORTED$/, 'a write the close caught')
    writer.stdin.write('\n')
    await lines(3)
    // io_uring: the rings' teardown (asynchronous in the kernel) can still hold the connection when
    // close() returns, so the first request after it may be failed by the abort instead.
    const first = ioUring === 'on' ? '(ENOTCONN|ECONNABORTED)' : 'ENOTCONN'
    t.regex(out.split('\n')[2]!, new RegExp(`^read:${first} write:ENOTCONN fsync:ENOTCONN fstat:ENOTCONN$`))
  })
}
