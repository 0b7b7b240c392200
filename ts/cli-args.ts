/**
 * Command-line parsing for the `blockfuse` CLI: pure (no I/O), so it is unit-testable. Everything
 * wrong with the command line itself (syntax, and values that can be judged without the filesystem:
 * the thread range, a null size, --growable without --writable, --format against the source) is a
 * {@link UsageError} (exit 2) worded in CLI terms; what only the filesystem or the kernel can tell
 * (a missing source, a mountpoint that is not a file, a failed mount) is a runtime error (exit 1).
 *
 * @module
 */
import { parseArgs } from 'node:util'

import { BlockfuseError } from './errors.js'
import {
  MAX_THREADS,
  parseSize,
  type AllowOther,
  type CacheMode,
  type ExportFormat,
  type FuseExportOptions,
  type IoUringMode,
  type LockingMode,
  type NbdOptions,
  type OnHalt,
  type PassthroughMode,
} from './options.js'

/** A command line the CLI cannot make sense of; the CLI prints usage and exits 2. */
export class UsageError extends Error {
  readonly code = 'USAGE'
  /** Which usage text fits the error. */
  readonly topic: HelpTopic

  constructor(message: string, topic: HelpTopic = 'main') {
    super(message)
    this.name = 'UsageError'
    this.topic = topic
  }
}

export type HelpTopic = 'main' | 'export'

/** What the command line asks for. */
export type CliCommand =
  | { kind: 'help'; topic: HelpTopic }
  | { kind: 'version' }
  | {
      kind: 'export'
      options: FuseExportOptions
      /** Print one JSON object per line instead of text. */
      json: boolean
      /** Report the export's counters once a second while it runs. */
      stats: boolean
    }

export const MAIN_USAGE = `Usage: blockfuse <command> [options]

Export a disk image as one regular file through FUSE.

Commands:
  export <source> <mountpoint>   export an image (run \`blockfuse export --help\`)

Options:
  -h, --help       show this help
  -V, --version    show the version
`

export const EXPORT_USAGE = `Usage: blockfuse export [options] <source> <mountpoint>

Export <source> on <mountpoint> (an existing regular file) until SIGINT, SIGTERM
or SIGHUP, which drain in-flight requests and unmount.
<source> is a path of an image (raw, qcow2 or vmdk), an NBD URI (nbd://host[:port]/export,
nbd+unix:///export?socket=PATH, with TLS nbds:// or nbds+unix://; see
docs/remote.md), or null:<size> for a null backend that reads zeros (e.g.
null:1G; units k, M, G, T are binary). Prints a line starting with "ready" once
the export serves.

Options:
  --writable                     allow writes (default: read-only)
  --growable                     let writes past the end grow the image (needs --writable)
  --allow-other on|off|auto      let other users access the file (default: auto)
  --threads N                    number of /dev/fuse queues, 1 to 64 (default: 1)
  --format raw|qcow2|vmdk|null|auto
                                 image format (default: auto, which probes the header;
                                 null for null:<size>; vmdk is read-only)
  --offset BYTES, --size BYTES   export a byte range of the disk (units k, M, G, T;
                                 default: from 0 to the end)
  --partition N                  export partition N of the disk's MBR (1-4 primary,
                                 5+ logical) or GPT
  --snapshot                     writable; writes go to a temporary overlay dropped
                                 at close, the source is never changed
  --overlay PATH                 writable; writes go to the qcow2 image PATH whose
                                 backing file is the source (created if missing)
  --cache writeback|none         host cache for the image file (default: writeback)
  --writethrough                 flush after every write before acknowledging it
  --io-uring auto|on|off         FUSE-over-io_uring: on (fail if unavailable), off
                                 (read(2) on /dev/fuse), auto: io_uring when the
                                 kernel offers it and --threads is 2 or more, else
                                 read(2) (default: auto)
  --passthrough auto|on|off      FUSE passthrough of read-only opens to a raw image:
                                 on (fail if unavailable; writable exports too), off,
                                 auto: read-only exports when the kernel and
                                 privileges allow it (default: auto)
  --locking auto|on|off          QEMU-compatible image locks (default: auto: lock, or
                                 warn and go on where the file system cannot)
  --force-share                  read-only: let others write the image meanwhile
                                 (qemu-img -U)
  --on-halt unmount|keep         on a fatal protocol error: unmount (default) or keep
  --tls-ca FILE                  NBD over TLS: PEM file of the server's CA
                                 (default: the system's CA bundle)
  --tls-cert FILE, --tls-key FILE
                                 NBD over TLS: client certificate and its key
  --tls-server-name NAME         NBD over TLS: name the server's certificate must
                                 carry (default: the URI's host, or localhost)
  --connect-timeout SECONDS      NBD: limit for connecting and the handshake
                                 (default: 10)
  --reconnect-delay SECONDS      NBD: how long requests wait for a lost connection
                                 to come back before failing with EIO (default: 10)
  --request-timeout SECONDS      NBD: a request unanswered this long closes its
                                 connection (reconnect, then EIO); 0: never
                                 (default: 30)
  --json                         print one JSON object per line instead of text
  --stats                        report counters once a second while running: with
                                 --json a {"event":"stats",...} line on stdout
                                 (requests by op, bytesRead, bytesWritten, errors,
                                 inFlight per queue, lostReplies), else a line
                                 on stderr
  -h, --help                     show this help
`

const EXPORT_OPTIONS = {
  writable: { type: 'boolean' },
  growable: { type: 'boolean' },
  'allow-other': { type: 'string' },
  threads: { type: 'string' },
  format: { type: 'string' },
  offset: { type: 'string' },
  size: { type: 'string' },
  partition: { type: 'string' },
  snapshot: { type: 'boolean' },
  overlay: { type: 'string' },
  cache: { type: 'string' },
  writethrough: { type: 'boolean' },
  'io-uring': { type: 'string' },
  passthrough: { type: 'string' },
  'on-halt': { type: 'string' },
  locking: { type: 'string' },
  'force-share': { type: 'boolean' },
  'tls-ca': { type: 'string' },
  'tls-cert': { type: 'string' },
  'tls-key': { type: 'string' },
  'tls-server-name': { type: 'string' },
  'connect-timeout': { type: 'string' },
  'reconnect-delay': { type: 'string' },
  'request-timeout': { type: 'string' },
  json: { type: 'boolean' },
  stats: { type: 'boolean' },
  help: { type: 'boolean', short: 'h' },
} as const

function oneOf<T extends string>(flag: string, value: string | undefined, allowed: readonly T[]): T | undefined {
  if (value === undefined) return undefined
  if (!(allowed as readonly string[]).includes(value)) {
    throw new UsageError(`--${flag} must be one of ${allowed.join(', ')}, got "${value}"`, 'export')
  }
  return value as T
}

/** Turns `null:<size>` into a null source; anything else is a path (write `./null:x` for such a file). */
export function parseSource(text: string): FuseExportOptions['source'] {
  return text.startsWith('null:') ? { null: text.slice('null:'.length) } : text
}

function parseExport(args: string[]): CliCommand {
  let parsed
  try {
    parsed = parseArgs({ args, options: EXPORT_OPTIONS, allowPositionals: true, strict: true })
  } catch (err) {
    throw new UsageError((err as Error).message, 'export')
  }
  const { values, positionals } = parsed
  if (values.help) return { kind: 'help', topic: 'export' }
  if (positionals.length !== 2) {
    throw new UsageError(
      positionals.length < 2
        ? 'export needs <source> and <mountpoint>'
        : `export takes two arguments, got ${positionals.length}: ${positionals.join(' ')}`,
      'export',
    )
  }
  const [sourceText, mountpoint] = positionals as [string, string]
  if (sourceText === '') throw new UsageError('<source> must not be empty', 'export')
  if (mountpoint === '') throw new UsageError('<mountpoint> must not be empty', 'export')
  const options: FuseExportOptions = { source: parseSource(sourceText), mountpoint }
  if (values.writable) options.writable = true
  if (values.growable) options.growable = true
  if (values.writethrough) options.writethrough = true
  const allowOther = oneOf<AllowOther>('allow-other', values['allow-other'], ['on', 'off', 'auto'])
  if (allowOther) options.allowOther = allowOther
  const format = oneOf<ExportFormat>('format', values.format, ['raw', 'qcow2', 'vmdk', 'null', 'auto'])
  if (format) options.format = format
  if (values.offset !== undefined) options.offset = values.offset
  if (values.size !== undefined) options.size = values.size
  if (values.partition !== undefined) {
    if (!/^\d+$/.test(values.partition) || Number(values.partition) < 1) {
      throw new UsageError(
        `--partition must be a partition number from 1 (as in sda1), got "${values.partition}"`,
        'export',
      )
    }
    options.partition = Number(values.partition)
  }
  if (values.snapshot) options.snapshot = true
  if (values.overlay !== undefined) options.overlay = values.overlay
  const cache = oneOf<CacheMode>('cache', values.cache, ['writeback', 'none'])
  if (cache) options.cache = cache
  const ioUring = oneOf<IoUringMode>('io-uring', values['io-uring'], ['auto', 'on', 'off'])
  if (ioUring) options.ioUring = ioUring
  const passthrough = oneOf<PassthroughMode>('passthrough', values.passthrough, ['auto', 'on', 'off'])
  if (passthrough) options.passthrough = passthrough
  const locking = oneOf<LockingMode>('locking', values.locking, ['auto', 'on', 'off'])
  if (locking) options.locking = locking
  if (values['force-share']) options.forceShare = true
  const onHalt = oneOf<OnHalt>('on-halt', values['on-halt'], ['unmount', 'keep'])
  if (onHalt) options.onHalt = onHalt
  if (values.threads !== undefined) {
    const n = Number(values.threads)
    if (!/^\d+$/.test(values.threads) || n < 1 || n > MAX_THREADS) {
      throw new UsageError(
        `--threads must be a whole number from 1 to ${MAX_THREADS}, got "${values.threads}"`,
        'export',
      )
    }
    options.threads = n
  }
  const nbd: NbdOptions = {}
  if (values['tls-ca'] !== undefined) nbd.tlsCa = values['tls-ca']
  if (values['tls-cert'] !== undefined) nbd.tlsCert = values['tls-cert']
  if (values['tls-key'] !== undefined) nbd.tlsKey = values['tls-key']
  if (values['tls-server-name'] !== undefined) nbd.tlsServerName = values['tls-server-name']
  for (const [flag, key] of [
    ['connect-timeout', 'connectTimeout'],
    ['reconnect-delay', 'reconnectDelay'],
    ['request-timeout', 'requestTimeout'],
  ] as const) {
    const text = values[flag]
    if (text === undefined) continue
    if (!/^\d+(\.\d+)?$/.test(text)) {
      throw new UsageError(`--${flag} must be a number of seconds, got "${text}"`, 'export')
    }
    nbd[key] = Number(text)
  }
  if (Object.keys(nbd).length > 0) options.nbd = nbd
  checkCombination(options, sourceText)
  return { kind: 'export', options, json: values.json ?? false, stats: values.stats ?? false }
}

function usage(message: string): UsageError {
  return new UsageError(message, 'export')
}

/** The checks the options layer would make, made here so that they speak of flags, not options. */
function checkCombination(options: FuseExportOptions, sourceText: string): void {
  if (options.growable && !options.writable) {
    throw usage('--growable needs --writable (a read-only export cannot grow)')
  }
  const { source, format } = options
  if (typeof source === 'string') {
    if (format === 'null') {
      throw usage(`--format null needs a source of the form null:<size> (e.g. null:1G), got the path "${sourceText}"`)
    }
    return
  }
  if (format !== undefined && format !== 'null') {
    throw usage(`--format ${format} needs an image path, but "${sourceText}" is a null source; leave --format out`)
  }
  try {
    parseSize(source.null)
  } catch (err) {
    if (!(err instanceof BlockfuseError)) throw err
    throw usage(`${sourceText}: ${err.message}`)
  }
}

/** Parses the arguments after `node cli.js` (i.e. `process.argv.slice(2)`). Throws {@link UsageError}. */
export function parseCliArgs(argv: readonly string[]): CliCommand {
  const [first, ...rest] = argv
  if (first === undefined) throw new UsageError('missing command')
  if (first === '-h' || first === '--help' || first === 'help') {
    if (rest.length === 0) return { kind: 'help', topic: 'main' }
    if (rest.length === 1 && rest[0] === 'export') return { kind: 'help', topic: 'export' }
    throw new UsageError(`unexpected argument after ${first}: ${rest.join(' ')}`)
  }
  if (first === '-V' || first === '--version') {
    if (rest.length > 0) throw new UsageError(`unexpected argument after ${first}: ${rest.join(' ')}`)
    return { kind: 'version' }
  }
  if (first === 'export') return parseExport(rest)
  if (first.startsWith('-')) throw new UsageError(`unknown option ${first}`)
  throw new UsageError(`unknown command "${first}"`)
}
