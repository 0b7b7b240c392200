/**
 * The bench report's verdicts on issue 16's targets (bench/lib/report.mjs, pure): which cells each
 * target applies to, a held and a missed check, a figure that is missing counted as not measured,
 * and no section without the seed's QEMU.
 */
import { fileURLToPath } from 'node:url'

import test from 'ava'

interface PeerSummary {
  n: number
  errors: string[]
  iops: number
  min: number
  max: number
  cpuUsPerIo: number
  rssMiB: number
}
interface Cell {
  id: string
  peers: Record<string, PeerSummary>
}
interface Report {
  renderTargets(cells: Cell[], nThreads: number): string
}

const REPORT = fileURLToPath(new URL('../bench/lib/report.mjs', import.meta.url))
const report = (await import(REPORT)) as Report

const s = (iops: number, cpuUsPerIo = NaN): PeerSummary => ({
  n: 1,
  errors: [],
  iops,
  min: iops,
  max: iops,
  cpuUsPerIo,
  rssMiB: 10,
})

/** The table row of `cell`, split into its columns (cell id first). */
function row(md: string, cell: string): string[] {
  const line = md.split('\n').find((l) => l.startsWith(`| \`${cell}\` |`))
  if (!line) throw new Error(`no row for ${cell} in:\n${md}`)
  return line
    .slice(1, -1)
    .split('|')
    .map((x) => x.trim())
}

test('a null aio cell: ≥ 1.5x the seed with the same threads and the best seed, CPU per I/O below the seed', (t) => {
  const md = report.renderTargets(
    [
      {
        id: 'null:randread:aio:j1',
        peers: {
          'qemu-seed-1t': s(100_000, 8),
          'qemu-seed-2t': s(120_000, 7),
          'blockfuse-1t': s(190_000, 4),
          'blockfuse-2t': s(170_000, 7.5),
        },
      },
    ],
    2,
  )
  const [, sameThreads, bestSeed, ceiling, notBelow, cpu] = row(md, 'null:randread:aio:j1')
  t.is(sameThreads, '1t 1.90 ✓, 2t 1.42 ✗')
  t.is(bestSeed, '1t 1.58 ✓, 2t 1.42 ✗')
  t.is(ceiling, '', 'the ceiling target is for O_DIRECT file cells only')
  t.is(notBelow, '1t 1.58 ✓, 2t 1.42 ✓')
  t.is(cpu, '1t 4.0/8.0 ✓, 2t 7.5/7.0 ✗')
  t.regex(md, /^- CPU-bound: ≥ 1\.5× seed, same threads: 1 of 2 hold; missed: null:randread:aio:j1 2t$/m)
  t.regex(md, /^- CPU µs\/IO < seed, same threads: 1 of 2 hold; missed: null:randread:aio:j1 2t$/m)
})

test('an O_DIRECT sync cell has no CPU-bound or aio targets; an aio one is held to 0.9 of the ceiling', (t) => {
  const md = report.renderTargets(
    [
      {
        id: 'file-direct:randread:sync:j1',
        peers: { 'qemu-seed-1t': s(9000, 60), 'qemu-seed-2t': s(8000, 62), 'blockfuse-1t': s(8500, 50) },
      },
      {
        id: 'file-direct:randread:aio:j1',
        peers: {
          'qemu-seed-1t': s(39_000, 20),
          'qemu-seed-2t': s(38_000, 21),
          'blockfuse-1t': s(54_000, 15),
          'blockfuse-2t': s(50_000, 16),
          ceiling: s(58_000),
        },
      },
    ],
    2,
  )
  const sync = row(md, 'file-direct:randread:sync:j1')
  t.deepEqual(sync.slice(1, 4), ['', '', ''])
  t.is(sync[4], '1t 0.94 ✗, 2t —', 'below the best seed; a peer that did not run is not measured')
  const aio = row(md, 'file-direct:randread:aio:j1')
  t.is(aio[3], '1t 0.93 ✓, 2t 0.86 ✗')
  t.regex(
    md,
    /^- ≥ best seed: 2 of 4 hold; missed: file-direct:randread:sync:j1 1t; not measured: file-direct:randread:sync:j1 2t$/m,
  )
})

test('page-cache reads are CPU-bound, page-cache writes are not', (t) => {
  const peers = { 'qemu-seed-1t': s(50_000, 10), 'qemu-seed-2t': s(60_000, 9), 'blockfuse-1t': s(100_000, 5) }
  const md = report.renderTargets(
    [
      { id: 'file-cached:read:aio:j1', peers },
      { id: 'file-cached:randwrite:aio:j1', peers },
    ],
    2,
  )
  t.is(row(md, 'file-cached:read:aio:j1')[1], '1t 2.00 ✓, 2t —')
  t.is(row(md, 'file-cached:randwrite:aio:j1')[1], '')
})

test('without the seed in any cell there is no targets section', (t) => {
  t.is(report.renderTargets([{ id: 'null:randread:aio:j1', peers: { 'blockfuse-1t': s(100_000, 4) } }], 2), '')
})
