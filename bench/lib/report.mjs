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

const iopsOf = (cell, id) => cell.peers[id]?.iops

/** The larger of two IOPS figures, ignoring one that is missing; NaN when both are. */
function bestOf(a, b) {
  const v = [a, b].filter((x) => Number.isFinite(x))
  return v.length ? Math.max(...v) : NaN
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
  const seed1 = 'qemu-seed-1t'
  const seedN = `qemu-seed-${nThreads}t`
  const lines = []
  const pt = present.some((p) => p.id === 'blockfuse-pt')
  const seed = present.some((p) => p.family === 'qemu-seed')
  const head = ['cell', ...present.map((p) => p.label)]
  // The seed's QEMU leads: blockfuse against the seed with the same threads, then against the
  // better of the seed's two forms, then against Debian's QEMU.
  if (seed)
    head.push(
      'bf-1t / seed-1t',
      `bf-${nThreads}t / seed-${nThreads}t`,
      'bf-1t / best seed',
      `bf-${nThreads}t / best seed`,
    )
  head.push('bf-1t / Debian QEMU', `bf-${nThreads}t / Debian QEMU`, 'best bf / ceiling')
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
    ]
    if (seed) {
      const best = bestOf(get(seed1), get(seedN))
      row.push(ratio(get(bf1), get(seed1)), ratio(get(bfN), get(seedN)), ratio(get(bf1), best), ratio(get(bfN), best))
    }
    row.push(
      ratio(get(bf1), get('qemu')),
      ratio(get(bfN), get('qemu')),
      reused ? `${ratio(bestBf, reused.iops)} ¹` : ratio(bestBf, get('ceiling')),
    )
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
      const servers = [
        ...(seed
          ? [
              [seed1, 'seed 1t'],
              [seedN, `seed ${nThreads}t`],
            ]
          : []),
        [bf1, 'bf 1t'],
        [bfN, `bf ${nThreads}t`],
        ['qemu', 'Debian QEMU'],
      ]
      const qh = ['qcow2 cell', 'raw bf 1t', 'qcow2 bf 1t', ...servers.map(([, label]) => `qcow2 / raw (${label})`)]
      f.push(`| ${qh.join(' | ')} |`)
      f.push(`|${qh.map((_, i) => (i === 0 ? ':---' : '---:')).join('|')}|`)
      for (const [q, r] of pairs) {
        const ratios = servers.map(([id]) => ratio(iopsOf(q, id), iopsOf(r, id)))
        f.push(`| \`${q.id}\` | ${kilo(iopsOf(r, bf1))} | ${kilo(iopsOf(q, bf1))} | ${ratios.join(' | ')} |`)
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
    `- fio: ${m.fio}; Debian QEMU: ${m.qemu}; seed QEMU: ${m.qemuSeed ?? 'not run'}; node: ${m.node}; fuser crate: ${m.fuser}`,
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

/** Cell classes of issue 16's targets, from a cell id `backend:rw:engine:jN`. */
function cellClass(id) {
  const [backend, rw, engine] = id.split(':')
  const cachedRead = backend.endsWith('-cached') && (rw === 'read' || rw === 'randread')
  return {
    // No storage behind the FUSE path, or reads served from the page cache: the server's CPU
    // is the limit.
    cpuBound: backend === 'null' || cachedRead,
    // O_DIRECT on the raw image: the disk is the limit (qcow2 has no ceiling of its own).
    direct: backend === 'file-direct',
    aio: engine === 'aio',
  }
}

/**
 * One check of one blockfuse form (`label`, e.g. "1t"): `{ form, text, value, ok }`, ok undefined
 * when a figure is missing (then the check is counted as not measured, never as held).
 */
function check(label, value, holds, show = (v) => v.toFixed(2)) {
  if (!Number.isFinite(value)) return { form: label, text: `${label} —`, value: null, ok: undefined }
  const ok = holds(value)
  return { form: label, text: `${label} ${show(value)} ${ok ? '✓' : '✗'}`, value, ok }
}

/** Issue 16's targets, in the order of the report's columns. */
export const TARGETS = [
  'CPU-bound: ≥ 1.5× seed, same threads',
  'CPU-bound aio: ≥ 1.5× best seed',
  'O_DIRECT aio: ≥ 0.9 ceiling',
  '≥ best seed',
  'CPU µs/IO < seed, same threads',
]

/**
 * Issue 16's targets per cell, for blockfuse 1t and Nt (each against the seed's QEMU with the same
 * threads, or against the better of its two forms):
 * - CPU-bound cells (null, page-cache reads): >= 1.5x the seed with the same threads, and on aio
 *   cells >= 1.5x the better seed form;
 * - O_DIRECT file cells (aio): >= 0.9 of the ceiling;
 * - every cell: not below the seed's better form (IOPS);
 * - every cell: server CPU per I/O below the seed's with the same threads.
 * Returns `[{ cell, checks }]`, `checks[i]` for `TARGETS[i]`: null where the target does not apply,
 * else `[{ form, value, ok, text }]` per blockfuse form (`ok` undefined when a figure is missing).
 * Null when no seed peer ran.
 */
export function targetVerdicts(cells, nThreads) {
  const seed1 = 'qemu-seed-1t'
  const seedN = `qemu-seed-${nThreads}t`
  if (!cells.some((c) => c.peers[seed1] || c.peers[seedN])) return null
  const forms = [
    ['1t', 'blockfuse-1t', seed1],
    [`${nThreads}t`, `blockfuse-${nThreads}t`, seedN],
  ]
  return cells.map((c) => {
    const cls = cellClass(c.id)
    const get = (id) => c.peers[id]?.iops
    const cpu = (id) => c.peers[id]?.cpuUsPerIo
    const best = bestOf(get(seed1), get(seedN))
    const applies = [cls.cpuBound, cls.cpuBound && cls.aio, cls.direct && cls.aio, true, true]
    const rules = [
      (t, bf, sd) => check(t, get(bf) / get(sd), (r) => r >= 1.5),
      (t, bf) => check(t, get(bf) / best, (r) => r >= 1.5),
      (t, bf) => check(t, get(bf) / get('ceiling'), (r) => r >= 0.9),
      (t, bf) => check(t, get(bf) / best, (r) => r >= 1),
      (t, bf, sd) =>
        check(
          t,
          cpu(bf) - cpu(sd),
          (d) => d < 0,
          () => `${cpu(bf).toFixed(1)}/${cpu(sd).toFixed(1)}`,
        ),
    ]
    const checks = rules.map((rule, i) => (applies[i] ? forms.map(([t, bf, sd]) => rule(t, bf, sd)) : null))
    return { cell: c.id, checks }
  })
}

/** The report's section on issue 16's targets (see `targetVerdicts`); empty without the seed. */
export function renderTargets(cells, nThreads) {
  const verdicts = targetVerdicts(cells, nThreads)
  if (!verdicts) return ''
  const tally = TARGETS.map(() => ({ held: 0, missed: [], unmeasured: [] }))
  const lines = [
    `## Issue 16 targets (blockfuse 1t and ${nThreads}t against the seed's QEMU; ✓ holds, ✗ misses, — not measured)`,
    '',
    `| cell | ${TARGETS.join(' | ')} |`,
    `|:---|${TARGETS.map(() => ':---').join('|')}|`,
  ]
  for (const { cell, checks } of verdicts) {
    const row = [`\`${cell}\``]
    for (const [i, results] of checks.entries()) {
      if (!results) {
        row.push('')
        continue
      }
      for (const r of results) {
        const what = `${cell} ${r.form}`
        if (r.ok === true) tally[i].held++
        else if (r.ok === false) tally[i].missed.push(what)
        else tally[i].unmeasured.push(what)
      }
      row.push(results.map((r) => r.text).join(', '))
    }
    lines.push(`| ${row.join(' | ')} |`)
  }
  lines.push('')
  lines.push(
    'IOPS ratios use medians; "best seed" is the better of qemu-seed-1t and qemu-seed-Nt in that cell; CPU is the server\'s µs per I/O, blockfuse / seed.',
  )
  lines.push('')
  for (const [i, name] of TARGETS.entries()) {
    const t = tally[i]
    const total = t.held + t.missed.length + t.unmeasured.length
    if (!total) continue
    let line = `- ${name}: ${t.held} of ${total} hold`
    if (t.missed.length) line += `; missed: ${t.missed.join(', ')}`
    if (t.unmeasured.length) line += `; not measured: ${t.unmeasured.join(', ')}`
    lines.push(line)
  }
  return lines.join('\n')
}

/** A command line as a shell would take it back: arguments with special characters single-quoted. */
function shellLine(argv) {
  return argv.map((a) => (/^[\w@%+=:,./-]+$/.test(a) ? a : `'${a.replaceAll("'", "'\\''")}'`)).join(' ')
}

/** Every server's command line, per backend group: `{ [backendId]: { [peerId]: argv } }`. */
export function renderCommands(commands) {
  const lines = []
  for (const [backend, byPeer] of Object.entries(commands)) {
    for (const [peer, argv] of Object.entries(byPeer)) lines.push(`- ${backend}, ${peer}: \`${shellLine(argv)}\``)
  }
  return lines.length ? lines.join('\n') : '(no server ran)'
}
