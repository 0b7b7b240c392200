/** The CLI's argument parsing, as pure unit tests (no process is spawned here). */
import test from 'ava'

import { EXPORT_USAGE, parseCliArgs, parseSource, UsageError } from '../ts/cli-args.js'

test('help and version', (t) => {
  t.deepEqual(parseCliArgs(['--help']), { kind: 'help', topic: 'main' })
  t.deepEqual(parseCliArgs(['-h']), { kind: 'help', topic: 'main' })
  t.deepEqual(parseCliArgs(['help', 'export']), { kind: 'help', topic: 'export' })
  t.deepEqual(parseCliArgs(['export', '--help']), { kind: 'help', topic: 'export' })
  t.deepEqual(parseCliArgs(['export', 'a', '-h']), { kind: 'help', topic: 'export' })
  t.deepEqual(parseCliArgs(['--version']), { kind: 'version' })
  t.deepEqual(parseCliArgs(['-V']), { kind: 'version' })
})

test('a minimal export uses the API defaults', (t) => {
  t.deepEqual(parseCliArgs(['export', 'img.raw', 'mnt']), {
    kind: 'export',
    options: { source: 'img.raw', mountpoint: 'mnt' },
    json: false,
    stats: false,
  })
})

test('every export option maps to the API option', (t) => {
  const cmd = parseCliArgs([
    'export',
    '--writable',
    '--growable',
    '--allow-other',
    'off',
    '--threads',
    '4',
    '--format',
    'raw',
    '--cache',
    'none',
    '--writethrough',
    '--io-uring',
    'on',
    '--passthrough',
    'off',
    '--on-halt',
    'keep',
    '--json',
    '--stats',
    'img.raw',
    'mnt',
  ])
  t.deepEqual(cmd, {
    kind: 'export',
    options: {
      source: 'img.raw',
      mountpoint: 'mnt',
      writable: true,
      growable: true,
      allowOther: 'off',
      threads: 4,
      format: 'raw',
      cache: 'none',
      writethrough: true,
      ioUring: 'on',
      passthrough: 'off',
      onHalt: 'keep',
    },
    json: true,
    stats: true,
  })
  t.like(parseCliArgs(['export', '--threads=2', '--allow-other=auto', 'a', 'b']), {
    options: { threads: 2, allowOther: 'auto' },
  })
  t.like(parseCliArgs(['export', '--locking', 'off', '--force-share', 'a', 'b']), {
    options: { locking: 'off', forceShare: true },
  })
  t.throws(() => parseCliArgs(['export', '--locking', 'maybe', 'a', 'b']), { message: /--locking must be one of/ })
  t.throws(() => parseCliArgs(['export', '--passthrough', 'yes', 'a', 'b']), {
    message: /--passthrough must be one of/,
  })
})

test('--stats is a flag of its own, with or without --json, in any position', (t) => {
  t.like(parseCliArgs(['export', '--stats', 'a', 'b']), { kind: 'export', json: false, stats: true })
  t.like(parseCliArgs(['export', 'a', 'b', '--stats', '--json']), { kind: 'export', json: true, stats: true })
  t.like(parseCliArgs(['export', '--json', 'a', 'b']), { kind: 'export', json: true, stats: false })
  t.deepEqual(
    (parseCliArgs(['export', '--stats', 'a', 'b']) as { options: unknown }).options,
    { source: 'a', mountpoint: 'b' },
    '--stats is no export option',
  )
})

test('--format takes raw, qcow2, vmdk, null and auto; the usage names them and the auto default', (t) => {
  for (const format of ['raw', 'qcow2', 'vmdk', 'null', 'auto']) {
    const source = format === 'null' ? 'null:1G' : 'a'
    t.like(parseCliArgs(['export', '--format', format, source, 'b']), { options: { format } })
  }
  t.regex(EXPORT_USAGE, /--format raw\|qcow2\|vmdk\|null\|auto\s+image format \(default: auto/)
})

test('the export usage documents --stats', (t) => {
  t.regex(EXPORT_USAGE, /^ {2}--stats {2,}\S/m)
  t.regex(EXPORT_USAGE, /"event":"stats"/)
})

test('null:<size> is a null backend; other sources are paths', (t) => {
  t.deepEqual(parseSource('null:1G'), { null: '1G' })
  t.deepEqual(parseSource('null:'), { null: '' })
  t.is(parseSource('./null:1G'), './null:1G')
  t.is(parseSource('/images/disk.raw'), '/images/disk.raw')
  t.like(parseCliArgs(['export', 'null:64k', 'mnt']), { options: { source: { null: '64k' }, mountpoint: 'mnt' } })
})

test('positionals after -- may start with a dash', (t) => {
  t.like(parseCliArgs(['export', '--', '-img.raw', '-mnt']), { options: { source: '-img.raw', mountpoint: '-mnt' } })
})

const usageErrors: Array<[string, string[], RegExp]> = [
  ['no command', [], /missing command/],
  ['an unknown command', ['serve', 'a', 'b'], /unknown command "serve"/],
  ['an unknown top-level option', ['--verbose'], /unknown option --verbose/],
  ['extra arguments after --version', ['--version', 'x'], /unexpected argument/],
  ['export without arguments', ['export'], /export needs <source> and <mountpoint>/],
  ['export with one argument', ['export', 'img.raw'], /export needs <source> and <mountpoint>/],
  ['export with three arguments', ['export', 'a', 'b', 'c'], /export takes two arguments, got 3: a b c/],
  ['an unknown export option', ['export', '--readonly', 'a', 'b'], /Unknown option '--readonly'/],
  ['a flag given a value', ['export', '--writable=yes', 'a', 'b'], /--writable/],
  ['a missing option value', ['export', 'a', 'b', '--threads'], /--threads/],
  [
    'non-numeric threads',
    ['export', '--threads', 'many', 'a', 'b'],
    /--threads must be a whole number from 1 to 64, got "many"/,
  ],
  ['negative threads', ['export', '--threads=-1', 'a', 'b'], /--threads must be a whole number from 1 to 64, got "-1"/],
  [
    'a bad --allow-other',
    ['export', '--allow-other', 'yes', 'a', 'b'],
    /--allow-other must be one of on, off, auto, got "yes"/,
  ],
  [
    'a bad --format',
    ['export', '--format', 'vhdx', 'a', 'b'],
    /--format must be one of raw, qcow2, vmdk, null, auto, got "vhdx"/,
  ],
  ['a bad --cache', ['export', '--cache', 'direct', 'a', 'b'], /--cache must be one of writeback, none/],
  ['a bad --on-halt', ['export', '--on-halt', 'stop', 'a', 'b'], /--on-halt must be one of unmount, keep/],
  ['--stats given a value', ['export', '--stats=1', 'a', 'b'], /--stats/],
]

for (const [what, argv, message] of usageErrors) {
  test(`usage error: ${what}`, (t) => {
    const err = t.throws(() => parseCliArgs(argv), { instanceOf: UsageError, message })
    t.is(err?.code, 'USAGE')
  })
}

test('usage errors after export point at the export usage', (t) => {
  t.is(t.throws(() => parseCliArgs(['export', 'a']), { instanceOf: UsageError })?.topic, 'export')
  t.is(t.throws(() => parseCliArgs(['nope']), { instanceOf: UsageError })?.topic, 'main')
})

test('values judged without the filesystem are usage errors in CLI terms, not option names', (t) => {
  const cases: Array<[string[], RegExp]> = [
    [['--threads', '0', 'a', 'b'], /^--threads must be a whole number from 1 to 64, got "0"$/],
    [['--threads', '65', 'a', 'b'], /^--threads must be a whole number from 1 to 64, got "65"$/],
    [['--threads', '10000', 'a', 'b'], /^--threads must be a whole number from 1 to 64, got "10000"$/],
    [['--growable', 'a', 'b'], /^--growable needs --writable/],
    [['--format', 'null', 'img.raw', 'b'], /^--format null needs a source of the form null:<size> .*"img.raw"$/],
    [['--format', 'raw', 'null:1G', 'b'], /^--format raw needs an image path, but "null:1G" is a null source/],
    [['null:0', 'b'], /^null:0: null backend size "0" is invalid: it must be greater than 0$/],
    [['null:1.5G', 'b'], /^null:1.5G: null backend size "1.5G" is invalid: expected a decimal integer/],
    [['null:', 'b'], /^null:: null backend size "" is invalid/],
    [['', 'b'], /^<source> must not be empty$/],
    [['a', ''], /^<mountpoint> must not be empty$/],
  ]
  for (const [argv, message] of cases) {
    const err = t.throws(() => parseCliArgs(['export', ...argv]), { instanceOf: UsageError, message }, argv.join(' '))
    t.is(err?.topic, 'export')
    t.notRegex(err?.message ?? '', /option "|source: \{|writable: true/, 'no API syntax in a CLI message')
  }
  // The bounds themselves and a valid null size parse.
  t.like(parseCliArgs(['export', '--threads', '64', '--format', 'null', 'null:1G', 'm']), {
    options: { threads: 64, format: 'null', source: { null: '1G' } },
  })
  t.like(parseCliArgs(['export', '--threads', '1', '--growable', '--writable', 'a', 'b']), {
    options: { threads: 1, growable: true, writable: true },
  })
})

test('--request-timeout sets nbd.requestTimeout; a non-number is a usage error', (t) => {
  t.like(parseCliArgs(['export', '--request-timeout', '5', 'nbd://h/x', 'b']), {
    kind: 'export',
    options: { nbd: { requestTimeout: 5 } },
  })
  t.throws(() => parseCliArgs(['export', '--request-timeout', 'soon', 'nbd://h/x', 'b']), {
    instanceOf: UsageError,
    message: /--request-timeout/,
  })
})

test('slice and overlay flags map to offset, size, partition, snapshot and overlay; a bad --partition is a usage error', (t) => {
  t.like(parseCliArgs(['export', '--offset', '1M', '--size', '64M', '--snapshot', 'a', 'b']), {
    options: { offset: '1M', size: '64M', snapshot: true },
  })
  t.like(parseCliArgs(['export', '--partition', '5', '--overlay', 'ov.qcow2', 'a', 'b']), {
    options: { partition: 5, overlay: 'ov.qcow2' },
  })
  for (const bad of ['0', 'x', '1.5']) {
    t.throws(() => parseCliArgs(['export', '--partition', bad, 'a', 'b']), {
      message: /--partition must be a partition number from 1/,
    })
  }
})
