// Statistics and markdown rendering for bench results. Pure: no I/O.

/** Median of numbers (mean of the middle two for an even count); NaN when empty. */
export function median(values) {
  const v = values.filter((x) => Number.isFinite(x)).sort((a, b) => a - b)
  if (v.length === 0) return NaN
  const mid = Math.floor(v.length / 2)
  return v.length % 2 ? v[mid] : (v[mid - 1] + v[mid]) / 2
}

export function minMax(values) {
  const v = values.filter((x) => Number.isFinite(x))
  if (v.length === 0) return [NaN, NaN]
  return [Math.min(...v), Math.max(...v)]
}

/** 123456 -> "123.5k", 950 -> "950". */
export function kilo(n) {
  if (!Number.isFinite(n)) return '—'
  if (Math.abs(n) >= 1000) return `${(n / 1000).toFixed(1)}k`
  return `${Math.round(n)}`
}

function ratio(a, b) {
  if (!Number.isFinite(a) || !Number.isFinite(b) || b <= 0) return '—'
  return `${(a / b).toFixed(2)}`
}

function fixed(n, digits) {
  return Number.isFinite(n) ? n.toFixed(digits) : '—'
}

/**
 * Summarises the runs of one (cell, peer): IOPS median and spread, median server CPU µs per I/O,
 * highest peak RSS. `runs` are `{ iops, cpuUsPerIo, rssKiB, error }`.
 */
export function summarise(runs) {
  const ok = runs.filter((r) => !r.error)
  const iops = ok.map((r) => r.iops)
  const [min, max] = minMax(iops)
  const rss = ok.map((r) => r.rssKiB).filter((x) => Number.isFinite(x))
  return {
    n: ok.length,
    errors: runs.filter((r) => r.error).map((r) => r.error),
    iops: median(iops),
    min,
    max,
    cpuUsPerIo: median(ok.map((r) => r.cpuUsPerIo)),
    rssMiB: rss.length ? Math.max(...rss) / 1024 : NaN,
  }
}

function cellText(s) {
  if (!s || s.n === 0) return s && s.errors.length ? 'error' : '—'
  if (s.n === 1) return kilo(s.iops)
  return `${kilo(s.iops)} (${kilo(s.min)}–${kilo(s.max)})`
}

/**
 * Renders the summary (one row per cell, one column per peer, plus ratios) and the detail table
 * (one row per cell and peer). `cells` is `[{ id, peers: { [peerId]: summary } }]`, `peers` the
 * ordered `[{ id, label }]`, `nThreads` the N of the multi-threaded peers.
 */
export function renderTables(cells, peers, nThreads, rawOf = {}) {
  const present = peers.filter((p) => cells.some((c) => c.peers[p.id]))
  const byId = new Map(cells.map((c) => [c.id, c]))
  // A qcow2 cell's counterpart on the raw image: `qcow2-direct:rw:engine:jN` -> `file-direct:...`.
  const rawCell = (id) => {
    const [b, ...rest] = id.split(':')
    return rawOf[b] ? byId.get([rawOf[b], ...rest].join(':')) : undefined
  }
  const bf1 = `blockfuse-1t`
  const bfN = `blockfuse-${nThreads}t`
  const lines = []
  const pt = present.some((p) => p.id === 'blockfuse-pt')
  const head = ['cell', ...present.map((p) => p.label), `bf-1t / QEMU`, `bf-${nThreads}t / QEMU`, 'best bf / ceiling']
  if (pt) head.push('bf-pt / ceiling')
  lines.push(`| ${head.join(' | ')} |`)
  lines.push(`|${head.map((_, i) => (i === 0 ? ':---' : '---:')).join('|')}|`)
  for (const c of cells) {
    const get = (id) => c.peers[id]?.iops
    const bestBf = Math.max(...[get(bf1), get(bfN)].filter((x) => Number.isFinite(x)))
    // qcow2 cells have no ceiling of their own: they reuse the raw cell's (same cache mode), marked ¹.
    const reused = !c.peers.ceiling && rawOf[c.id.split(':')[0]] ? rawCell(c.id)?.peers.ceiling : undefined
    const row = [
      `\`${c.id}\``,
      ...present.map((p) => (p.id === 'ceiling' && reused ? `${cellText(reused)} ¹` : cellText(c.peers[p.id]))),
      ratio(get(bf1), get('qemu')),
      ratio(get(bfN), get('qemu')),
      reused ? `${ratio(bestBf, reused.iops)} ¹` : ratio(bestBf, get('ceiling')),
    ]
    if (pt) row.push(ratio(get('blockfuse-pt'), get('ceiling')))
    lines.push(`| ${row.join(' | ')} |`)
  }
  if (cells.some((c) => rawOf[c.id.split(':')[0]])) {
    lines.push('')
    lines.push(
      "qcow2 cells: no ceiling of their own; ¹ = the raw image's ceiling of the same cache mode (fio on image.raw), when that raw cell ran too, else —.",
    )
  }
  const summary = lines.join('\n')

  // qcow2 / raw: the same cell on the qcow2 image against the raw image, per server.
  const pairs = cells.map((c) => [c, rawCell(c.id)]).filter(([, r]) => r)
  let formats = ''
  if (cells.some((c) => rawOf[c.id.split(':')[0]])) {
    const f = []
    f.push(`## qcow2 / raw (IOPS medians, same run)`)
    f.push('')
    if (!pairs.length) {
      f.push('No qcow2 cell ran together with its raw counterpart (add e.g. `file-direct:randread:aio` to `--only`).')
    } else {
      const nq = (c, id) => c.peers[id]?.iops
      f.push(
        `| qcow2 cell | raw bf 1t | qcow2 bf 1t | qcow2 / raw (bf 1t) | qcow2 / raw (bf ${nThreads}t) | qcow2 / raw (QEMU) |`,
      )
      f.push('|:---|---:|---:|---:|---:|---:|')
      for (const [q, r] of pairs) {
        f.push(
          `| \`${q.id}\` | ${kilo(nq(r, bf1))} | ${kilo(nq(q, bf1))} | ${ratio(nq(q, bf1), nq(r, bf1))} | ${ratio(nq(q, bfN), nq(r, bfN))} | ${ratio(nq(q, 'qemu'), nq(r, 'qemu'))} |`,
        )
      }
    }
    formats = f.join('\n')
  }

  const nbd = renderNbd(cells, bf1, bfN, nThreads)
  if (nbd) formats = formats ? `${formats}\n\n${nbd}` : nbd

  const d = []
  d.push('| cell | peer | IOPS (median) | IOPS min–max | runs | server CPU µs/IO | server peak RSS MiB |')
  d.push('|:---|:---|---:|---:|---:|---:|---:|')
  for (const c of cells) {
    for (const p of present) {
      const s = c.peers[p.id]
      if (!s) continue
      const spread = s.n ? `${Math.round(s.min)}–${Math.round(s.max)}` : '—'
      const iops = s.n ? `${Math.round(s.iops)}` : `error: ${s.errors[0] ?? 'no runs'}`.replaceAll('|', '/')
      d.push(
        `| \`${c.id}\` | ${p.id} | ${iops} | ${spread} | ${s.n} | ${fixed(s.cpuUsPerIo, 2)} | ${fixed(s.rssMiB, 1)} |`,
      )
    }
  }
  return { summary, detail: d.join('\n'), formats }
}

/** The machine block printed above every table. */
export function renderMachine(m) {
  return [
    `- date: ${m.date}`,
    `- CPU: ${m.cores} cores (${m.cpuModel}), ${m.memGiB} GiB RAM`,
    `- kernel: ${m.kernel}`,
    `- image disk: ${m.disk}`,
    `- fio: ${m.fio}; qemu-storage-daemon: ${m.qemu}; node: ${m.node}; fuser crate: ${m.fuser}`,
    `- blockfuse commit: ${m.commit}`,
    `- FUSE-over-io_uring: ${m.uring ?? '—'}; blockfuse intake (--io-uring ${m.settings?.ioUring ?? 'auto'}): ${
      Object.entries(m.intakes ?? {})
        .map(([id, how]) => `${id} ${how}`)
        .join(', ') || '—'
    }`,
    `- load average at start / end: ${m.loadStart} / ${m.loadEnd ?? '—'}`,
  ].join('\n')
}

/**
 * nbd cells (issue 18's targets): each blockfuse peer against the ceiling (fio's nbd engine on
 * the same server, no FUSE; target >= 0.8) and against nbdfuse (target >= 2). Empty without nbd
 * cells.
 */
function renderNbd(cells, bf1, bfN, nThreads) {
  const nbd = cells.filter((c) => c.id.startsWith('nbd:'))
  if (!nbd.length) return ''
  const f = ['## nbd: blockfuse / ceiling (fio nbd engine) and / nbdfuse (IOPS medians, same run)', '']
  f.push(`| nbd cell | bf 1t / ceiling | bf ${nThreads}t / ceiling | bf 1t / nbdfuse | bf ${nThreads}t / nbdfuse |`)
  f.push('|:---|---:|---:|---:|---:|')
  for (const c of nbd) {
    const get = (id) => c.peers[id]?.iops
    f.push(
      `| \`${c.id}\` | ${ratio(get(bf1), get('ceiling'))} | ${ratio(get(bfN), get('ceiling'))} | ${ratio(get(bf1), get('nbdfuse'))} | ${ratio(get(bfN), get('nbdfuse'))} |`,
    )
  }
  return f.join('\n')
}
