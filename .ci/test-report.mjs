// The closing lines of a CI run, from the `npm test` log: which tests failed and why (briefly),
// then one line counting both runners: cargo's "test result:" lines and ava's report. Only the
// tail of a CI run may be kept, so this is printed last and kept short.
import { readFileSync } from 'node:fs'

const text = readFileSync(process.argv[2], 'utf8')
const lines = text.split('\n')
const MAX_DETAIL_LINES = 30

let passed = 0
let failed = 0
let skipped = 0
for (const m of text.matchAll(/^test result: \w+\. (\d+) passed; (\d+) failed; (\d+) ignored/gm)) {
  passed += +m[1]
  failed += +m[2]
  skipped += +m[3]
}
passed += (text.match(/^\s*✔ /gm) ?? []).length
const avaCount = (re) => +(text.match(re)?.[1] ?? 0)
failed += avaCount(/^\s*(\d+) tests? failed/m) + avaCount(/^\s*(\d+) uncaught exceptions?/m)
failed += avaCount(/^\s*(\d+) unhandled rejections?/m)
skipped += avaCount(/^\s*(\d+) tests? skipped/m) + avaCount(/^\s*(\d+) tests? todo/m)

// Names: ava's ✘ lines, uncaught exceptions and timeouts; cargo's "test x ... FAILED" lines.
const named = lines.filter(
  (l) =>
    /^\s*✘ /.test(l) ||
    /^\s*(Uncaught exception|Unhandled rejection) in /.test(l) ||
    /Timed out while running tests/.test(l) ||
    /^test .* \.\.\. FAILED$/.test(l),
)
// Why: cargo's panic lines, and ava's failure details (between its first and last "─" rule)
// without source excerpts, stack frames and blank lines.
const detail = []
for (let i = 0; i < lines.length; i++) {
  if (/^thread '.*' panicked at /.test(lines[i])) detail.push(lines[i], lines[i + 1] ?? '')
}
const rules = lines.flatMap((l, i) => (l.trim() === '─' ? [i] : []))
if (rules.length >= 2) {
  for (const l of lines.slice(rules[0] + 1, rules.at(-1))) {
    if (l.trim() === '' || /^\s+\d+: /.test(l) || /^\s+at /.test(l) || /^\s+› /.test(l)) continue
    detail.push(l)
  }
}

if (named.length > 0 || detail.length > 0) {
  console.log('failed tests:')
  for (const l of named) console.log(`  ${l.trim()}`)
  const shown = detail.slice(0, MAX_DETAIL_LINES)
  for (const l of shown) console.log(`  | ${l.trimEnd()}`)
  if (detail.length > shown.length) console.log(`  | ... ${detail.length - shown.length} more lines in the log`)
}
console.log(`tests: ${passed} passed, ${failed} failed, ${skipped} skipped`)
