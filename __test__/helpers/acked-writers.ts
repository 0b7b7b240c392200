/**
 * Writers for the "every acknowledged write is in the image" tests. Each is a python3 process that
 * writes distinct 4 KiB blocks with O_DIRECT in a shuffled order, each block filled with a pattern
 * naming it (`blockfuse <index>` at the start of every 64 bytes, so a torn block shows), and prints
 * a block's index only after its pwrite returned the full block. On the first error it prints
 * `error <errno name>` to stderr and exits 0. Exit 3: it ran out of blocks; exit 4: the file it
 * opened does not have the expected size (the plain mountpoint under an export already gone).
 */
import { spawn, type ChildProcessWithoutNullStreams } from 'node:child_process'

import { C_ENV } from './semantics.js'

export const ACKED_BLOCK = 4096

const WRITER = String.raw`
import errno, mmap, os, random, sys
path, first, count, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
if size >= 0 and os.fstat(fd).st_size != size:
    sys.stderr.write('opened a file of %d bytes, not the export\n' % os.fstat(fd).st_size)
    sys.exit(4)
buf = mmap.mmap(-1, ${ACKED_BLOCK})
order = list(range(first, first + count))
random.shuffle(order)
for i in order:
    unit = ('blockfuse %d' % i).encode().ljust(64, b'.')
    buf.seek(0)
    buf.write(unit * (${ACKED_BLOCK} // 64))
    try:
        n = os.pwrite(fd, buf, i * ${ACKED_BLOCK})
    except OSError as e:
        sys.stderr.write('error %s\n' % errno.errorcode.get(e.errno, e.errno))
        sys.exit(0)
    if n != ${ACKED_BLOCK}:
        sys.stderr.write('error short write %d\n' % n)
        sys.exit(0)
    os.write(1, b'%d\n' % i)
sys.exit(3)
`

/** What block `index` holds once a writer's write of it was acknowledged. */
export function ackedPattern(index: number): Buffer {
  const unit = Buffer.alloc(64, '.')
  unit.write(`blockfuse ${index}`)
  return Buffer.concat(Array.from({ length: ACKED_BLOCK / 64 }, () => unit))
}

export interface Writer {
  child: ChildProcessWithoutNullStreams
  /** Indexes of the blocks whose writes were acknowledged, in order. */
  acked: number[]
  stderr: string
  /** Resolves with the exit code once stdout is drained (every acknowledgement is in `acked`). */
  exited: Promise<number | null>
}

/** Starts a writer of blocks [first, first+count) of `path`; with `expectSize`, it checks the size first. */
export function startWriter(path: string, first: number, count: number, expectSize = -1): Writer {
  const child = spawn('python3', ['-c', WRITER, path, String(first), String(count), String(expectSize)], {
    env: C_ENV,
  })
  const writer: Writer = { child, acked: [], stderr: '', exited: Promise.resolve(null) }
  let pending = ''
  child.stdout.setEncoding('utf8').on('data', (d: string) => {
    const lines = (pending + d).split('\n')
    pending = lines.pop()!
    for (const line of lines) writer.acked.push(Number(line))
  })
  child.stderr.setEncoding('utf8').on('data', (d: string) => (writer.stderr += d))
  // 'close', not 'exit': stdout is drained by then.
  writer.exited = new Promise((resolve) => child.on('close', (code) => resolve(code)))
  return writer
}
