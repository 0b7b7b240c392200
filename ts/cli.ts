#!/usr/bin/env node
/**
 * The `blockfuse` command. Exit codes: 0 after a clean close (SIGINT/SIGTERM/SIGHUP), 2 on a usage
 * error (anything wrong with the command line, see cli-args.ts), 1 on a runtime error (what only
 * the filesystem or the kernel can tell, or when a halt unmounted the export).
 *
 * @module
 */
import { readFileSync } from 'node:fs'

import { EXPORT_USAGE, MAIN_USAGE, parseCliArgs, UsageError, type HelpTopic } from './cli-args.js'
import { statsEvent, statsLine } from './cli-stats.js'
import { FuseExport, type ExportStats } from './index.js'
import { toBlockfuseError } from './native.js'

function packageVersion(): string {
  const pkg = JSON.parse(readFileSync(new URL('../package.json', import.meta.url), 'utf8')) as { version: string }
  return pkg.version
}

function usage(topic: HelpTopic): string {
  return topic === 'export' ? EXPORT_USAGE : MAIN_USAGE
}

function fail(err: unknown): never {
  const error = toBlockfuseError(err)
  process.stderr.write(`blockfuse: ${error.message} (${error.code})\n`)
  process.exit(1)
}

function describeSource(exp: FuseExport): string {
  const { source } = exp.options
  return typeof source === 'string' ? source : `null:${source.null}`
}

function readyLine(exp: FuseExport): string {
  const { writable, growable, threads } = exp.options
  const mode = writable ? (growable ? 'writable, growable' : 'writable') : 'read-only'
  return (
    `ready: ${describeSource(exp)} exported at ${exp.mountpoint} ` +
    `(${exp.format}, ${exp.size} bytes, ${mode}, ${threads} ${threads === 1 ? 'thread' : 'threads'}, ` +
    `${exp.ioUring ? 'io_uring' : 'read(2)'}${exp.passthrough ? ', passthrough' : ''})`
  )
}

const STATS_INTERVAL_MS = 1000

/** Reports `exp`'s counters once a second until it closes (`--stats`). */
function reportStats(exp: FuseExport, json: boolean): void {
  let previous: ExportStats | undefined
  let previousAt = Date.now()
  const timer = setInterval(() => {
    if (exp.closed) return
    const stats = exp.stats()
    const now = Date.now()
    if (json) process.stdout.write(`${JSON.stringify(statsEvent(stats))}\n`)
    else process.stderr.write(`blockfuse: ${statsLine(stats, previous, (now - previousAt) / 1000)}\n`)
    previous = stats
    previousAt = now
  }, STATS_INTERVAL_MS)
  // The export keeps the process alive while it is open; the reporter must not keep it after.
  timer.unref()
  exp.once('close', () => clearInterval(timer))
}

async function runExport(command: Extract<ReturnType<typeof parseCliArgs>, { kind: 'export' }>): Promise<never> {
  const { json } = command
  const out = (text: string, event: Record<string, unknown>) =>
    process.stdout.write(json ? `${JSON.stringify(event)}\n` : `${text}\n`)

  // Signals are taken from the start: one that arrives while mounting closes right after.
  let stopRequested = false
  let exp: FuseExport | undefined
  const onSignal = (signal: NodeJS.Signals) => {
    if (stopRequested) {
      process.stderr.write(`blockfuse: ${signal}: already closing, waiting for in-flight requests\n`)
      return
    }
    stopRequested = true
    exp?.close().catch(fail)
  }
  process.on('SIGINT', onSignal)
  process.on('SIGTERM', onSignal)
  // A closed terminal should unmount too, not leave a mount whose server is gone.
  process.on('SIGHUP', onSignal)
  // A reader that went away (e.g. `| head -1`) must not kill the process while it serves.
  process.stdout.on('error', () => {})

  try {
    exp = await FuseExport.create(command.options)
  } catch (err) {
    fail(err)
  }
  const closed = new Promise<void>((resolve) => exp.once('close', resolve))
  exp.on('halt', (reason) => {
    if (json) out('', { event: 'halt', reason })
    else process.stderr.write(`blockfuse: export halted: ${reason}\n`)
  })
  exp.on('error', fail)
  if (exp.allowOtherFallback !== undefined) {
    process.stderr.write(
      `blockfuse: warning: --allow-other auto: mounting with allow_other failed (${exp.allowOtherFallback}); ` +
        `falling back to off: only uid ${process.getuid?.()} can access ${exp.mountpoint}\n`,
    )
  }
  out(readyLine(exp), {
    event: 'ready',
    mountpoint: exp.mountpoint,
    source: describeSource(exp),
    format: exp.format,
    size: exp.size,
    writable: exp.options.writable,
    growable: exp.options.growable,
    allowOther: exp.allowOther,
    threads: exp.options.threads,
    ioUring: exp.ioUring,
    passthrough: exp.passthrough,
  })
  if (command.stats) reportStats(exp, json)
  if (stopRequested) exp.close().catch(fail)

  await closed
  out('closed', { event: 'close' })
  // A halted export did not serve correctly: that is an error even if a signal closed it.
  const reason = exp.haltReason
  if (reason !== undefined) {
    process.stderr.write(`blockfuse: the export halted and was unmounted: ${reason} (HALTED)\n`)
    process.exit(1)
  }
  process.exit(0)
}

async function main(argv: string[]): Promise<void> {
  let command
  try {
    command = parseCliArgs(argv)
  } catch (err) {
    if (!(err instanceof UsageError)) throw err
    process.stderr.write(`blockfuse: ${err.message}\n\n${usage(err.topic)}`)
    process.exit(2)
  }
  switch (command.kind) {
    case 'help':
      process.stdout.write(usage(command.topic))
      return
    case 'version':
      process.stdout.write(`blockfuse ${packageVersion()}\n`)
      return
    case 'export':
      await runExport(command)
  }
}

main(process.argv.slice(2)).catch(fail)
