/**
 * `npm test`: prepares the machine (scripts/test-machine.mjs), runs `cargo test --workspace` and
 * the ava specs, then puts the machine back, also when a step fails or the run is interrupted.
 * `npm test -- <ava arguments>` (spec files, `--match`) runs only ava with them.
 *
 * A FUSE mount that appeared during the run and is still there at the end is a failure: it is
 * named, lazily unmounted, and the run exits 1.
 */
import { spawn, spawnSync } from 'node:child_process'
import { fileURLToPath } from 'node:url'

import { MachineError, prepareMachine } from './test-machine.mjs'

const ROOT = fileURLToPath(new URL('..', import.meta.url))
const avaArgs = process.argv.slice(2)

function fuseMounts() {
  const r = spawnSync('findmnt', ['-rn', '-t', 'fuse,fuseblk', '-o', 'TARGET'], { encoding: 'utf8' })
  return new Set(r.stdout.split('\n').filter(Boolean))
}

let child = null
let interrupted = null

/** Runs one step to completion; resolves with its exit code (128 + n for a signal). */
function step(title, command, args) {
  console.log(`\nblockfuse test: ${title}: ${[command, ...args].join(' ')}`)
  return new Promise((resolve) => {
    child = spawn(command, args, { cwd: ROOT, stdio: 'inherit' })
    child.on('error', (err) => {
      console.error(`blockfuse test: cannot run ${command}: ${err.message}`)
      resolve(127)
    })
    child.on('exit', (code, signal) => {
      child = null
      resolve(code ?? 128 + (signal ? ({ SIGHUP: 1, SIGINT: 2, SIGKILL: 9, SIGTERM: 15 }[signal] ?? 0) : 0))
    })
  })
}

async function main() {
  let restore
  try {
    restore = prepareMachine()
  } catch (err) {
    if (!(err instanceof MachineError)) throw err
    console.error(`\nblockfuse test: cannot run the tests: ${err.message}`)
    return 1
  }
  for (const signal of ['SIGINT', 'SIGTERM', 'SIGHUP']) {
    process.on(signal, () => {
      interrupted = signal
      console.error(`\nblockfuse test: ${signal}: stopping the tests, then putting the machine back`)
      // The step's process group got the terminal's signal too; a kill(1) sends it only to us.
      child?.kill(signal)
    })
  }

  const before = fuseMounts()
  let status = 0
  try {
    if (avaArgs.length === 0) status = await step('Rust tests', 'cargo', ['test', '--workspace'])
    if (status === 0 && !interrupted) {
      status = await step('specs', process.execPath, [`${ROOT}node_modules/ava/entrypoints/cli.mjs`, ...avaArgs])
    }
  } finally {
    const left = [...fuseMounts()].filter((m) => !before.has(m))
    if (left.length > 0) {
      console.error(`\nblockfuse test: FUSE mounts left behind by the tests (unmounting them):\n  ${left.join('\n  ')}`)
      for (const m of left) spawnSync('umount', ['-l', m])
      if (status === 0) status = 1
    }
    restore()
  }
  if (interrupted) return 128 + { SIGHUP: 1, SIGINT: 2, SIGTERM: 15 }[interrupted]
  return status
}

process.exitCode = await main()
