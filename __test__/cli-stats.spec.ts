/** What `blockfuse export --stats` prints, as pure unit tests of ts/cli-stats.ts. */
import test from 'ava'

import { formatBytes, statsEvent, statsLine } from '../ts/cli-stats.js'
import type { ExportStats } from '../ts/index.js'

const before: ExportStats = {
  requests: { READ: 100, GETATTR: 4 },
  bytesRead: 100 * 4096,
  bytesWritten: 0,
  errors: 0,
  unsupported: 0,
  inFlight: [0, 0],
  served: [60, 44],
  lostReplies: 0,
}
const after: ExportStats = {
  requests: { READ: 12_100, GETATTR: 6, WRITE: 10 },
  bytesRead: 12_100 * 4096,
  bytesWritten: 10 * 65536,
  errors: 1,
  unsupported: 2,
  inFlight: [3, 1],
  served: [7000, 5120],
  lostReplies: 0,
}

test('the JSON event carries every counter under the names of ExportStats', (t) => {
  const event = statsEvent(after)
  t.deepEqual(JSON.parse(JSON.stringify(event)), {
    event: 'stats',
    requests: { READ: 12_100, GETATTR: 6, WRITE: 10 },
    bytesRead: 12_100 * 4096,
    bytesWritten: 655360,
    errors: 1,
    unsupported: 2,
    inFlight: [3, 1],
    served: [7000, 5120],
    lostReplies: 0,
  })
})

test('the human line shows rates since the previous sample, totals and in-flight per queue', (t) => {
  t.is(
    statsLine(after, before, 2),
    'stats: 6006 req/s (READ 6000, WRITE 5, GETATTR 1), read 23.4 MiB/s, written 320.0 KiB/s; ' +
      'total 12116 req, 1 error, 2 unsupported; in flight 3 1',
  )
})

test('the first human line counts from zero; an idle export shows no ops', (t) => {
  t.is(
    statsLine(before, undefined, 1),
    'stats: 104 req/s (READ 100, GETATTR 4), read 400.0 KiB/s, written 0 B/s; total 104 req, 0 errors; in flight 0 0',
  )
  t.is(
    statsLine(before, before, 1),
    'stats: 0 req/s, read 0 B/s, written 0 B/s; total 104 req, 0 errors; in flight 0 0',
  )
})

test('lost replies are shouted in the human line only when there are any', (t) => {
  t.regex(statsLine({ ...after, lostReplies: 2 }, before, 1), /; 2 LOST REPLIES$/)
  t.regex(statsLine({ ...after, lostReplies: 1 }, before, 1), /; 1 LOST REPLY$/)
  t.notRegex(statsLine(after, before, 1), /LOST/)
})

test('formatBytes uses binary units', (t) => {
  t.is(formatBytes(0), '0 B')
  t.is(formatBytes(1023), '1023 B')
  t.is(formatBytes(1536), '1.5 KiB')
  t.is(formatBytes(3 * 1024 ** 3), '3.0 GiB')
})
