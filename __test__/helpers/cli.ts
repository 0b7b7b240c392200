/**
 * Driving the compiled CLI (dist/cli.js) as a real process. A missing or stale dist/ fails with a
 * clear message instead of testing old code.
 */
import { spawn, type ChildProcessWithoutNullStreams } from 'node:child_process'
import { chmodSync, cpSync, mkdtempSync, readdirSync, rmSync, statSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'

import { run, type RunResult } from './run.js'

const ROOT = fileURLToPath(new URL('../../', import.meta.url))
export const CLI = `${ROOT}dist/cli.js`

let copyForOtherUsers: string | undefined

/**
 * What another user runs: a copy of what the package ships (package.json, dist/, native/) and of
 * the specs' fixture scripts (__test__/fixtures/) in a world-readable temporary folder, made once
 * per test process and removed at its exit. The clone itself may sit in a folder only its owner can
 * enter (under /root, or a `mktemp -d`). Returns the copy's root folder.
 */
export function packageCopyForOtherUsers(): string {
  if (copyForOtherUsers === undefined) {
    const dir = mkdtempSync(join(tmpdir(), 'blockfuse-copy-'))
    chmodSync(dir, 0o755)
    for (const part of ['package.json', 'dist', 'native', '__test__/fixtures']) {
      cpSync(`${ROOT}${part}`, join(dir, part), { recursive: true })
    }
    process.on('exit', () => rmSync(dir, { recursive: true, force: true }))
    copyForOtherUsers = dir
  }
  return copyForOtherUsers
}

/** The CLI as another user runs it, from packageCopyForOtherUsers(). */
export function cliForOtherUsers(): string {
  return join(packageCopyForOtherUsers(), 'dist', 'cli.js')
}

/** Throws unless dist/ holds a build of every ts/*.ts that is at least as new as its source. */
export function assertCliBuilt(): void {
  const stale: string[] = []
  for (const name of readdirSync(`${ROOT}ts`).filter((n) => n.endsWith('.ts'))) {
    const built = `${ROOT}dist/${name.replace(/\.ts$/, '.js')}`
    let builtTime: number
    try {
      builtTime = statSync(built).mtimeMs
    } catch {
      stale.push(`${built} is missing`)
      continue
    }
    if (statSync(`${ROOT}ts/${name}`).mtimeMs > builtTime) stale.push(`ts/${name} is newer than ${built}`)
  }
  if (stale.length > 0) {
    throw new Error(
      `the CLI tests run the compiled CLI, but dist/ is not up to date (run \`npm run build:ts\`):\n  ${stale.join('\n  ')}`,
    )
  }
}

/** Runs the CLI to completion. */
export function runCli(args: readonly string[]): Promise<RunResult> {
  return run(process.execPath, [CLI, ...args])
}

/** A CLI process that keeps running (an export in the foreground). */
export class CliProcess {
  readonly child: ChildProcessWithoutNullStreams
  stdout = ''
  stderr = ''
  /**
   * Resolves once the process exited and its stdout and stderr are drained ('close', not 'exit':
   * after 'exit' the last output may still be in flight).
   */
  readonly exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>
  #done = false
  #waiters: Array<() => void> = []

  constructor(args: readonly string[]) {
    this.child = spawn(process.execPath, [CLI, ...args], { stdio: 'pipe' })
    this.child.stdin.end()
    this.child.stdout.setEncoding('utf8').on('data', (d: string) => {
      this.stdout += d
      this.#notify()
    })
    this.child.stderr.setEncoding('utf8').on('data', (d: string) => {
      this.stderr += d
      this.#notify()
    })
    this.exited = new Promise((resolve) => {
      this.child.on('close', (code, signal) => {
        this.#done = true
        resolve({ code, signal })
        this.#notify()
      })
    })
  }

  /** Complete lines printed on stdout so far. */
  get lines(): string[] {
    return this.stdout.split('\n').slice(0, -1)
  }

  #notify(): void {
    for (const waiter of this.#waiters.splice(0)) waiter()
  }

  /** Resolves with the first stdout line matching `pattern`; rejects (with the output) on exit or timeout. */
  async waitForLine(pattern: RegExp, timeoutMs = 30_000): Promise<string> {
    const deadline = Date.now() + timeoutMs
    for (;;) {
      const line = this.lines.find((l) => pattern.test(l))
      if (line !== undefined) return line
      if (this.#done) {
        throw new Error(
          `the CLI exited (${this.child.exitCode ?? this.child.signalCode}) before printing ${pattern}\n${this.#output()}`,
        )
      }
      const left = deadline - Date.now()
      if (left <= 0) throw new Error(`the CLI did not print ${pattern} within ${timeoutMs} ms\n${this.#output()}`)
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, left)
        this.#waiters.push(() => {
          clearTimeout(timer)
          resolve()
        })
      })
    }
  }

  /** Sends `signal` and waits for the exit (see {@link CliProcess.waitForExit}). */
  stop(signal: NodeJS.Signals, timeoutMs = 30_000): Promise<{ code: number | null; signal: NodeJS.Signals | null }> {
    this.child.kill(signal)
    return this.waitForExit(timeoutMs, `of ${signal}`)
  }

  /** Waits for the process to exit; kills it (and rejects with its output) if it does not in time. */
  async waitForExit(
    timeoutMs = 30_000,
    after = 'of waiting',
  ): Promise<{ code: number | null; signal: NodeJS.Signals | null }> {
    let timer: NodeJS.Timeout | undefined
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(() => {
        this.child.kill('SIGKILL')
        reject(new Error(`the CLI did not exit within ${timeoutMs} ms ${after}\n${this.#output()}`))
      }, timeoutMs)
    })
    try {
      return await Promise.race([this.exited, timeout])
    } finally {
      clearTimeout(timer)
    }
  }

  #output(): string {
    return `stdout:\n${this.stdout}\nstderr:\n${this.stderr}`
  }
}
