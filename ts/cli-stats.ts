/**
 * What `blockfuse export --stats` prints once a second: pure formatting of {@link ExportStats}
 * (the JSON event and the human line), so that it is unit-testable.
 *
 * @module
 */
import type { ExportStats } from './index.js'

/** The `--json --stats` line's object: `{"event":"stats", requests, bytesRead, ...}` (totals). */
export function statsEvent(stats: ExportStats): Record<string, unknown> {
  return {
    event: 'stats',
    requests: stats.requests,
    bytesRead: stats.bytesRead,
    bytesWritten: stats.bytesWritten,
    errors: stats.errors,
    unsupported: stats.unsupported,
    inFlight: stats.inFlight,
    served: stats.served,
    lostReplies: stats.lostReplies,
  }
}

const UNITS = ['B', 'KiB', 'MiB', 'GiB', 'TiB']

/** `1536` → `1.5 KiB`; binary units, one decimal above bytes. */
export function formatBytes(bytes: number): string {
  let value = bytes
  let unit = 0
  while (Math.abs(value) >= 1024 && unit < UNITS.length - 1) {
    value /= 1024
    unit++
  }
  return unit === 0 ? `${value} B` : `${value.toFixed(1)} ${UNITS[unit]}`
}

function total(requests: Record<string, number>): number {
  return Object.values(requests).reduce((a, b) => a + b, 0)
}

/**
 * The human line (without a trailing newline): rates since `previous` over `seconds`, then
 * totals and in-flight requests per queue (and lost replies, if any), e.g.
 * `stats: 12000 req/s (READ 11990, GETATTR 10), read 46.8 MiB/s, written 0 B/s; total 75000 req, 0 errors; in flight 3 1`.
 */
export function statsLine(stats: ExportStats, previous: ExportStats | undefined, seconds: number): string {
  const rate = (now: number, before: number) => Math.round((now - before) / (seconds > 0 ? seconds : 1))
  const perOp = Object.entries(stats.requests)
    .map(([op, n]): [string, number] => [op, rate(n, previous?.requests[op] ?? 0)])
    .filter(([, n]) => n > 0)
    .sort((a, b) => b[1] - a[1] || a[0].localeCompare(b[0]))
  const requests = rate(total(stats.requests), previous ? total(previous.requests) : 0)
  const ops = perOp.length > 0 ? ` (${perOp.map(([op, n]) => `${op} ${n}`).join(', ')})` : ''
  return (
    `stats: ${requests} req/s${ops}, ` +
    `read ${formatBytes(rate(stats.bytesRead, previous?.bytesRead ?? 0))}/s, ` +
    `written ${formatBytes(rate(stats.bytesWritten, previous?.bytesWritten ?? 0))}/s; ` +
    `total ${total(stats.requests)} req, ${stats.errors} ${stats.errors === 1 ? 'error' : 'errors'}` +
    (stats.unsupported > 0 ? `, ${stats.unsupported} unsupported; ` : '; ') +
    `in flight ${stats.inFlight.join(' ')}` +
    (stats.lostReplies > 0 ? `; ${stats.lostReplies} LOST ${stats.lostReplies === 1 ? 'REPLY' : 'REPLIES'}` : '')
  )
}
